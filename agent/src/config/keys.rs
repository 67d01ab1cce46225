//! Every cloud-config key the agent accepts, and what it does with it. A key is accepted
//! only when it is listed here, and each entry says either which test shows its effect or
//! that it is not supported (said out loud every time the config is loaded, and by
//! `kairos-agent validate`). Anything else is an unknown key (kept in the raw tree, warned).
//!
//! Paths: names joined by `.`; list items are transparent (`write_files.path` is the `path`
//! of every `write_files` entry); `*` is any one map key (`stages.*.files`, a stage's
//! name); a path ending in `.**` accepts everything below it as free-form data
//! (`k3s.config.**`: K3s' own flags).
//!
//! Sections are owned by the part of the agent that gives the keys their effect; keep each
//! section sorted by path.

/// What a key does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Has an effect; the named test (a `fn` of that name under `agent/`, `build/`,
    /// `init/` or `tests/`) shows it.
    Shown(&'static str),
    /// Accepted so an upstream file loads; warned as not supported (the text says why or
    /// what to use instead) every time the config is loaded.
    Unsupported(&'static str),
}

/// One accepted key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub path: &'static str,
    pub support: Support,
}

const fn shown(path: &'static str, test: &'static str) -> Key {
    Key {
        path,
        support: Support::Shown(test),
    }
}

const fn unsupported(path: &'static str, why: &'static str) -> Key {
    Key {
        path,
        support: Support::Unsupported(why),
    }
}

/// The registry. Sections: top level and cloud-init; stages and steps; install, upgrade,
/// reset; k3s, kubevip, p2p; bundles.
pub const KEYS: &[Key] = &[
    // --- top level, cloud-init, config surface ---
    unsupported(
        "arch",
        "images are built for one architecture by kairos-build; the config cannot choose it",
    ),
    unsupported(
        "bind-pcrs",
        "partition encryption (kcrypt) is not supported by this agent",
    ),
    unsupported(
        "bind-public-pcrs",
        "partition encryption (kcrypt) is not supported by this agent",
    ),
    shown("cloud-init-paths", "cloud_init_paths_add_stage_files"),
    shown(
        "config_url",
        "config_url_is_fetched_and_an_unreachable_one_is_a_warning",
    ),
    unsupported(
        "cosign",
        "images are verified by digest (install.source/upgrade pins); cosign signatures are not checked",
    ),
    unsupported(
        "cosign-key",
        "images are verified by digest; cosign signatures are not checked",
    ),
    shown("debug", "debug_logs_sources_filters_and_modules"),
    unsupported(
        "eject-cd",
        "the CD is not ejected after install; remove it or let the boot order skip it",
    ),
    unsupported(
        "growpart.**",
        "partitions are not grown at boot; install sizes COS_PERSISTENT to fill the disk (install.partitions sets the sizes)",
    ),
    shown("hostname", "templates_render_per_source_before_parsing"),
    unsupported(
        "kairos.**",
        "entangle (kairos.entangle) is not supported by this agent",
    ),
    unsupported(
        "logs.**",
        "kairos-agent logs shows the agent's and kairos-init's logs of this boot; extra journal units and files (logs.journal, logs.files) are not collected",
    ),
    shown("name", "a_files_name_shows_in_the_stage_log"),
    shown(
        "runcmd",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    unsupported(
        "squash-no-compression",
        "images are built by kairos-build; its own options set the compression",
    ),
    shown(
        "ssh_authorized_keys",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    shown("strict", "strict_fails_hooks_and_counts_skipped_sources"),
    shown(
        "users.gecos",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown("users.groups", "users_groups_keys_and_passwords"),
    shown(
        "users.homedir",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    unsupported(
        "users.lock_passwd",
        "ignored, as upstream does: a user with `passwd` can log in with it, one without is locked; use `passwd: \"!\"` to lock",
    ),
    shown("users.name", "users_groups_keys_and_passwords"),
    shown(
        "users.no-create-home",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown(
        "users.no-user-group",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown("users.no_create_home", "users_groups_keys_and_passwords"),
    shown(
        "users.no_user_group",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown("users.passwd", "users_groups_keys_and_passwords"),
    shown(
        "users.primary-group",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown(
        "users.primary_group",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown("users.shell", "users_groups_keys_and_passwords"),
    shown(
        "users.ssh-authorized-keys",
        "users_groups_keys_and_passwords",
    ),
    shown(
        "users.ssh_authorized_keys",
        "users_groups_keys_and_passwords",
    ),
    shown("users.system", "users_groups_keys_and_passwords"),
    shown("users.uid", "user_fields_uid_home_gecos_and_primary_group"),
    unsupported(
        "verify",
        "images are verified by digest (install.source/upgrade pins); cosign signatures are not checked",
    ),
    unsupported(
        "vpn.**",
        "the standalone vpn block is not supported; use p2p.network_token with p2p.vpn",
    ),
    shown(
        "write_files.append",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    shown(
        "write_files.content",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    shown(
        "write_files.encoding",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    shown(
        "write_files.group",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    shown(
        "write_files.owner",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    shown(
        "write_files.owner_string",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    shown(
        "write_files.path",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    shown(
        "write_files.permissions",
        "cloud_init_write_files_runcmd_and_keys_take_effect",
    ),
    // --- stages and steps ---
    unsupported(
        "stages.*.after.**",
        "steps run in file order; yip's `after:` dependencies between steps are not used",
    ),
    shown(
        "stages.*.authorized_keys.**",
        "users_groups_keys_and_passwords",
    ),
    shown(
        "stages.*.commands",
        "a_failing_step_is_named_and_the_rest_still_runs",
    ),
    unsupported(
        "stages.*.datasource.**",
        "cloud datasources are not read; use config_url or the files in /oem",
    ),
    shown(
        "stages.*.delete_entities.entity",
        "entities_are_ensured_and_deleted",
    ),
    shown(
        "stages.*.delete_entities.path",
        "entities_are_ensured_and_deleted",
    ),
    shown(
        "stages.*.directories.group",
        "files_directories_and_encodings",
    ),
    shown(
        "stages.*.directories.owner",
        "files_directories_and_encodings",
    ),
    shown(
        "stages.*.directories.path",
        "files_directories_and_encodings",
    ),
    shown(
        "stages.*.directories.permissions",
        "files_directories_and_encodings",
    ),
    shown(
        "stages.*.dns.nameservers",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    shown(
        "stages.*.dns.options",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    shown(
        "stages.*.dns.path",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    shown(
        "stages.*.dns.search",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    shown(
        "stages.*.downloads.group",
        "a_download_with_the_wrong_sha256_is_not_written",
    ),
    shown(
        "stages.*.downloads.owner",
        "a_download_with_the_wrong_sha256_is_not_written",
    ),
    shown(
        "stages.*.downloads.owner_string",
        "a_download_with_the_wrong_sha256_is_not_written",
    ),
    shown(
        "stages.*.downloads.path",
        "a_download_with_the_wrong_sha256_is_not_written",
    ),
    shown(
        "stages.*.downloads.permissions",
        "a_download_with_the_wrong_sha256_is_not_written",
    ),
    shown(
        "stages.*.downloads.sha256",
        "a_download_with_the_wrong_sha256_is_not_written",
    ),
    shown(
        "stages.*.downloads.timeout",
        "a_download_with_the_wrong_sha256_is_not_written",
    ),
    shown(
        "stages.*.downloads.url",
        "a_download_with_the_wrong_sha256_is_not_written",
    ),
    shown(
        "stages.*.ensure_entities.entity",
        "entities_are_ensured_and_deleted",
    ),
    shown(
        "stages.*.ensure_entities.path",
        "entities_are_ensured_and_deleted",
    ),
    shown(
        "stages.*.environment.**",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    shown(
        "stages.*.environment_file",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    shown("stages.*.files.append", "files_directories_and_encodings"),
    shown("stages.*.files.content", "files_directories_and_encodings"),
    shown("stages.*.files.encoding", "files_directories_and_encodings"),
    shown("stages.*.files.group", "files_directories_and_encodings"),
    shown("stages.*.files.owner", "files_directories_and_encodings"),
    shown(
        "stages.*.files.owner_string",
        "files_directories_and_encodings",
    ),
    shown("stages.*.files.path", "files_directories_and_encodings"),
    shown(
        "stages.*.files.permissions",
        "files_directories_and_encodings",
    ),
    unsupported(
        "stages.*.git.**",
        "the git module is not supported; use downloads (with sha256) or commands",
    ),
    shown(
        "stages.*.hostname",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    shown("stages.*.if", "before_stage_after_and_file_order_and_if"),
    shown(
        "stages.*.if_files.**",
        "only_os_version_arch_and_service_manager_filter_steps",
    ),
    unsupported(
        "stages.*.layout.**",
        "the layout module is not supported; the disk is laid out by install (install.partitions, install.extra-partitions)",
    ),
    shown("stages.*.modules", "modules_use_the_roots_modprobe"),
    shown("stages.*.name", "before_stage_after_and_file_order_and_if"),
    unsupported(
        "stages.*.node",
        "per-node steps (`node:`) are not supported; use `if:` or only_os",
    ),
    shown(
        "stages.*.only_arch",
        "only_os_version_arch_and_service_manager_filter_steps",
    ),
    shown(
        "stages.*.only_os",
        "only_os_version_arch_and_service_manager_filter_steps",
    ),
    shown(
        "stages.*.only_os_version",
        "only_os_version_arch_and_service_manager_filter_steps",
    ),
    shown(
        "stages.*.only_service_manager",
        "only_os_version_arch_and_service_manager_filter_steps",
    ),
    unsupported(
        "stages.*.package_pins.**",
        "the image is immutable: packages are not installed or pinned at boot",
    ),
    unsupported(
        "stages.*.packages.**",
        "the image is immutable: packages are not installed at boot; build them into the image",
    ),
    shown(
        "stages.*.sysctl.**",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    shown(
        "stages.*.systctl.**",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    shown(
        "stages.*.systemctl.disable",
        "systemctl_overrides_are_drop_ins_and_verbs_call_systemctl",
    ),
    shown(
        "stages.*.systemctl.enable",
        "systemctl_overrides_are_drop_ins_and_verbs_call_systemctl",
    ),
    shown(
        "stages.*.systemctl.mask",
        "systemctl_overrides_are_drop_ins_and_verbs_call_systemctl",
    ),
    shown(
        "stages.*.systemctl.overrides.content",
        "systemctl_overrides_are_drop_ins_and_verbs_call_systemctl",
    ),
    shown(
        "stages.*.systemctl.overrides.name",
        "systemctl_overrides_are_drop_ins_and_verbs_call_systemctl",
    ),
    shown(
        "stages.*.systemctl.overrides.service",
        "systemctl_overrides_are_drop_ins_and_verbs_call_systemctl",
    ),
    shown(
        "stages.*.systemctl.start",
        "systemctl_overrides_are_drop_ins_and_verbs_call_systemctl",
    ),
    unsupported(
        "stages.*.systemd_firstboot.**",
        "systemd-firstboot is not run; use hostname, environment and files steps",
    ),
    shown(
        "stages.*.timesyncd.**",
        "hostname_environment_sysctl_dns_timesyncd",
    ),
    unsupported(
        "stages.*.unpack_images.**",
        "unpacking images in a step is not supported; use bundles",
    ),
    shown(
        "stages.*.users.*.gecos",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown("stages.*.users.*.groups", "users_groups_keys_and_passwords"),
    shown(
        "stages.*.users.*.homedir",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    unsupported(
        "stages.*.users.*.lock_passwd",
        "ignored, as upstream does: a user with `passwd` can log in with it, one without is locked; use `passwd: \"!\"` to lock",
    ),
    shown("stages.*.users.*.name", "users_groups_keys_and_passwords"),
    shown(
        "stages.*.users.*.no-create-home",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown(
        "stages.*.users.*.no-user-group",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown(
        "stages.*.users.*.no_create_home",
        "users_groups_keys_and_passwords",
    ),
    shown(
        "stages.*.users.*.no_user_group",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown("stages.*.users.*.passwd", "users_groups_keys_and_passwords"),
    shown(
        "stages.*.users.*.primary-group",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown(
        "stages.*.users.*.primary_group",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    shown("stages.*.users.*.shell", "users_groups_keys_and_passwords"),
    shown(
        "stages.*.users.*.ssh-authorized-keys",
        "users_groups_keys_and_passwords",
    ),
    shown(
        "stages.*.users.*.ssh_authorized_keys",
        "users_groups_keys_and_passwords",
    ),
    shown("stages.*.users.*.system", "users_groups_keys_and_passwords"),
    shown(
        "stages.*.users.*.uid",
        "user_fields_uid_home_gecos_and_primary_group",
    ),
    // --- install, upgrade, reset ---
    shown(
        "install.allow-removable",
        "auto_skips_removable_disks_unless_allowed",
    ),
    shown("install.auto", "auto_install_runs_on_live_boots_only"),
    shown(
        "install.bind_mounts",
        "install_bind_and_ephemeral_mounts_reach_the_layout_kairos_init_reads",
    ),
    shown(
        "install.device",
        "manual_install_takes_its_defaults_from_the_config",
    ),
    unsupported(
        "install.encrypted_partitions",
        "partition encryption (kcrypt) is not supported; the partitions are not encrypted",
    ),
    unsupported(
        "install.env",
        "installer environment variables are not supported; the installer takes no environment",
    ),
    shown(
        "install.ephemeral_mounts",
        "install_bind_and_ephemeral_mounts_reach_the_layout_kairos_init_reads",
    ),
    unsupported(
        "install.extra-dirs-rootfs",
        "the image is immutable: directories are not added to it at install; build them into the image or use install.bind_mounts",
    ),
    // schema.rs accepts `Name` as an alias of `name` (ExtraPartition).
    shown(
        "install.extra-partitions.Name",
        "install_partitions_sizes_and_filesystems_are_read",
    ),
    shown(
        "install.extra-partitions.fs",
        "cd_under_seabios_installs_the_disk_boots_bios_and_the_iso_again_changes_nothing",
    ),
    shown(
        "install.extra-partitions.label",
        "cd_under_seabios_installs_the_disk_boots_bios_and_the_iso_again_changes_nothing",
    ),
    shown(
        "install.extra-partitions.name",
        "cd_under_seabios_installs_the_disk_boots_bios_and_the_iso_again_changes_nothing",
    ),
    shown(
        "install.extra-partitions.size",
        "cd_under_seabios_installs_the_disk_boots_bios_and_the_iso_again_changes_nothing",
    ),
    unsupported(
        "install.firmware",
        "not read from the config; pass kairos-agent install --firmware bios|efi|hybrid (default: how this system booted)",
    ),
    shown(
        "install.force",
        "install_force_takes_the_disk_holding_kairos",
    ),
    shown(
        "install.grub-entry-name",
        "install_grub_options_go_to_the_oem_grubenv_that_grub_cfg_reads",
    ),
    shown(
        "install.grub_options.*",
        "install_grub_options_go_to_the_oem_grubenv_that_grub_cfg_reads",
    ),
    unsupported(
        "install.image",
        "use install.source (oci:REF, dir:PATH, file:PATH, ocifile:PATH)",
    ),
    shown(
        "install.no-format",
        "no_format_uses_the_labelled_partitions_and_needs_force_over_an_installation",
    ),
    unsupported(
        "install.part-table",
        "the installer writes GPT only (msdos is not supported)",
    ),
    shown(
        "install.partitions.oem.fs",
        "configured_partitions_make_the_layout",
    ),
    shown(
        "install.partitions.oem.size",
        "cd_under_seabios_installs_the_disk_boots_bios_and_the_iso_again_changes_nothing",
    ),
    shown(
        "install.partitions.persistent.fs",
        "configured_partitions_make_the_layout",
    ),
    shown(
        "install.partitions.persistent.size",
        "configured_partitions_make_the_layout",
    ),
    shown(
        "install.partitions.recovery.fs",
        "install_partitions_sizes_and_filesystems_are_read",
    ),
    shown(
        "install.partitions.recovery.size",
        "install_partitions_sizes_and_filesystems_are_read",
    ),
    shown(
        "install.partitions.state.fs",
        "bad_partition_values_are_refused_naming_the_key",
    ),
    shown(
        "install.partitions.state.size",
        "cd_under_seabios_installs_the_disk_boots_bios_and_the_iso_again_changes_nothing",
    ),
    unsupported(
        "install.passive.**",
        "passive.img is always a copy of the installed active.img, sized like it",
    ),
    shown(
        "install.poweroff",
        "install_reboot_and_poweroff_decide_what_follows_the_install",
    ),
    shown(
        "install.reboot",
        "install_reboot_and_poweroff_decide_what_follows_the_install",
    ),
    unsupported(
        "install.recovery-system.**",
        "the recovery image is the installed image as a squashfs, sized like it",
    ),
    shown("install.source", "qr_pairing_delivers_the_config"),
    unsupported(
        "install.system.**",
        "active.img is sized from the image's contents; install.partitions.state sizes the partition",
    ),
    unsupported(
        "reset.extra-dirs-rootfs",
        "the image is immutable: directories are not added to it at reset; build them into the image",
    ),
    unsupported(
        "reset.grub-entry-name",
        "the entries' title is set at install (install.grub-entry-name); reset keeps it",
    ),
    shown("reset.poweroff", "flags_win_over_the_reset_block"),
    shown("reset.reboot", "flags_win_over_the_reset_block"),
    shown("reset.reset-oem", "flags_win_over_the_reset_block"),
    shown("reset.reset-persistent", "flags_win_over_the_reset_block"),
    shown(
        "reset.system.source",
        "reset_system_source_and_after_reset_chroot",
    ),
    unsupported(
        "upgrade.extra-dirs-rootfs",
        "the image is immutable: directories are not added to it at upgrade; build them into the image",
    ),
    unsupported(
        "upgrade.grub-entry-name",
        "the entries' title is set at install (install.grub-entry-name); upgrade keeps it",
    ),
    shown(
        "upgrade.poweroff",
        "upgrade_sources_and_what_follows_come_from_the_upgrade_block",
    ),
    shown(
        "upgrade.reboot",
        "after_upgrade_chroot_writes_into_the_new_image_and_upgrade_reboot_is_honoured",
    ),
    unsupported(
        "upgrade.recovery",
        "not read from the config; pass kairos-agent upgrade --recovery",
    ),
    unsupported(
        "upgrade.recovery-system.size",
        "the recovery image is sized from the new image's contents",
    ),
    shown(
        "upgrade.recovery-system.source",
        "upgrade_sources_and_what_follows_come_from_the_upgrade_block",
    ),
    unsupported(
        "upgrade.system.size",
        "the new active.img is sized from the image's contents",
    ),
    shown(
        "upgrade.system.source",
        "booted_from_passive_the_passive_is_left_alone",
    ),
    // --- k3s, kubevip, p2p ---
    shown(
        "k3s.args",
        "k3s_server_is_supervised_with_the_configured_args",
    ),
    shown("k3s.config.**", "server_rendering"),
    shown("k3s.embedded_registry", "server_rendering"),
    shown(
        "k3s.enabled",
        "k3s_server_is_supervised_with_the_configured_args",
    ),
    shown("k3s.env.**", "server_rendering"),
    shown("k3s.replace_args", "replace_args_and_env"),
    shown("k3s.replace_env", "replace_args_and_env"),
    shown(
        "k3s-agent.args",
        "ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig",
    ),
    shown("k3s-agent.config.**", "server_rendering"),
    unsupported(
        "k3s-agent.embedded_registry",
        "the embedded registry is a K3s server flag (as upstream, only k3s.embedded_registry is read); set it on the servers",
    ),
    shown(
        "k3s-agent.enabled",
        "k3s_agent_joins_with_server_url_and_token",
    ),
    shown("k3s-agent.env.**", "agent_joins_with_url_and_token"),
    shown("k3s-agent.replace_args", "replace_args_and_env"),
    shown("k3s-agent.replace_env", "replace_args_and_env"),
    unsupported(
        "kubevip.args",
        "provider-kairos reads kubevip.args but passes it nowhere; the manifest's settings are kube-vip's control-plane defaults (ARP, leader election, port 6443)",
    ),
    shown(
        "kubevip.eip",
        "ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig",
    ),
    shown("kubevip.enable", "kubevip_enabled_by_enable_or_by_an_eip"),
    shown("kubevip.enabled", "kubevip_enabled_by_enable_or_by_an_eip"),
    shown("kubevip.interface", "kubevip_deploy_writes_both_manifests"),
    shown(
        "kubevip.manifest_url",
        "kubevip_deploy_writes_both_manifests",
    ),
    shown(
        "kubevip.static_pod",
        "kubevip_manifest_renders_daemonset_or_pod",
    ),
    shown(
        "kubevip.version",
        "kubevip_manifest_renders_daemonset_or_pod",
    ),
    shown(
        "p2p.announce_interval",
        "ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig",
    ),
    shown(
        "p2p.auto.enable",
        "p2p_role_and_auto_enable_decide_the_role_source",
    ),
    shown(
        "p2p.auto.ha.enable",
        "ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig",
    ),
    shown("p2p.auto.ha.external_db", "k3s_specs_per_role"),
    shown(
        "p2p.auto.ha.master_nodes",
        "ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig",
    ),
    shown(
        "p2p.disable_dht",
        "ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig",
    ),
    unsupported(
        "p2p.distribution",
        "the mesh runs K3s only (k0s is not supported)",
    ),
    unsupported(
        "p2p.dns",
        "the embedded DNS over the mesh ledger is not implemented; give nodes names through your own DNS or /etc/hosts (stages)",
    ),
    unsupported(
        "p2p.dynamic_roles",
        "roles are kept once given (a K3s node does not change role); dynamic role changes are not implemented",
    ),
    shown(
        "p2p.listen_port",
        "ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig",
    ),
    unsupported(
        "p2p.loglevel",
        "the mesh logs at one level, to the agent's log",
    ),
    shown(
        "p2p.minimum_nodes",
        "assignment_waits_for_minimum_then_one_master",
    ),
    shown("p2p.network_id", "network_id_separates_the_ledger_topic"),
    shown(
        "p2p.network_token",
        "three_nodes_roles_k3s_vpn_restart_and_failover",
    ),
    shown(
        "p2p.role",
        "p2p_role_and_auto_enable_decide_the_role_source",
    ),
    unsupported(
        "p2p.vpn.create",
        "only the default (true) works: without the VPN the mesh assigns roles but starts no K3s",
    ),
    unsupported(
        "p2p.vpn.env.*",
        "edgevpn's environment settings are not read, except IFACE (the VPN interface)",
    ),
    shown("p2p.vpn.env.IFACE", "reads_upstream_keys_and_defaults"),
    shown(
        "p2p.vpn.interface",
        "ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig",
    ),
    shown(
        "p2p.vpn.range",
        "ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig",
    ),
    unsupported(
        "p2p.vpn.use",
        "K3s always runs over the mesh VPN (flannel on its interface); use: false is not implemented",
    ),
    // --- bundles ---
    unsupported(
        "bundles.db_path",
        "luet's package database is not used: package:// targets are OCI images here",
    ),
    shown(
        "bundles.local_file",
        "bundle_targets_parse_with_upstreams_types",
    ),
    unsupported(
        "bundles.repository",
        "a luet repository is not used: package:// targets are OCI images here",
    ),
    shown(
        "bundles.rootfs_path",
        "a_bundle_with_a_file_outside_the_persistent_paths_is_refused",
    ),
    shown(
        "bundles.targets",
        "a_run_bundle_runs_its_script_once_per_digest",
    ),
    shown(
        "fail_on_bundles_errors",
        "a_failing_run_sh_names_the_bundle_and_its_exit_status",
    ),
    unsupported(
        "install.bundles.db_path",
        "luet's package database is not used: package:// targets are OCI images here",
    ),
    shown(
        "install.bundles.local_file",
        "install_bundles_land_in_the_new_disks_persistent_partition",
    ),
    unsupported(
        "install.bundles.repository",
        "a luet repository is not used: package:// targets are OCI images here",
    ),
    shown(
        "install.bundles.rootfs_path",
        "install_bundles_land_in_the_new_disks_persistent_partition",
    ),
    shown(
        "install.bundles.targets",
        "install_bundles_land_in_the_new_disks_persistent_partition",
    ),
    unsupported("k0s.**", "k0s is not supported by this agent; use k3s"),
    unsupported(
        "k0s-worker.**",
        "k0s is not supported by this agent; use k3s-agent",
    ),
];

/// How a key path relates to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Listed (or under a listed `.**`).
    Key(&'static Key),
    /// Not listed itself, but listed keys live below it (`install`, `stages.boot`).
    Parent,
    Unknown,
}

/// Whether `pattern` (registry syntax) names `path` (segments): `Some(true)` exactly or
/// through a `.**` tail, `Some(false)` when `path` is a proper prefix of it, `None` otherwise.
fn relate(pattern: &str, path: &[&str]) -> Option<bool> {
    let pat: Vec<&str> = pattern.split('.').collect();
    for (i, seg) in path.iter().enumerate() {
        match pat.get(i) {
            Some(&"**") => return Some(true),
            Some(&"*") => {}
            Some(p) if p == seg => {}
            _ => return None,
        }
    }
    match pat.get(path.len()) {
        None => Some(true),
        // `k0s.**` names `k0s` itself too.
        Some(&"**") if pat.len() == path.len() + 1 => Some(true),
        Some(_) => Some(false),
    }
}

/// The registry entry for a key path (segments, list items left out). An exact entry wins
/// over a `*` one, which wins over a `.**` one.
pub fn lookup(path: &[&str]) -> Lookup {
    let mut best: Option<(&'static Key, usize)> = None;
    let mut parent = false;
    for k in KEYS {
        match relate(k.path, path) {
            Some(true) => {
                let score = if k.path.ends_with(".**") {
                    0
                } else if k.path.contains('*') {
                    1
                } else {
                    2
                };
                if best.is_none_or(|(_, s)| score > s) {
                    best = Some((k, score));
                }
            }
            Some(false) => parent = true,
            None => {}
        }
    }
    match best {
        Some((k, _)) => Lookup::Key(k),
        None if parent => Lookup::Parent,
        None => Lookup::Unknown,
    }
}

/// What one walk over a config tree found: key paths as the user wrote them (dotted), each
/// with the sources that hold it, in the order first seen.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    pub unknown: Vec<(String, Vec<String>)>,
    /// (path as written, the registry's text, sources).
    pub unsupported: Vec<(String, &'static str, Vec<String>)>,
    /// Every accepted path with its entry (for the corpus test and `validate`).
    pub accepted: Vec<(String, &'static Key)>,
}

impl Findings {
    /// Walk one source's tree.
    pub fn check(&mut self, origin: &str, tree: &serde_json::Map<String, serde_json::Value>) {
        let mut path = Vec::new();
        self.walk(origin, tree, &mut path);
    }

    fn walk<'a>(
        &mut self,
        origin: &str,
        tree: &'a serde_json::Map<String, serde_json::Value>,
        path: &mut Vec<&'a str>,
    ) {
        for (k, v) in tree {
            path.push(k.as_str());
            let dotted = path.join(".");
            match lookup(path) {
                Lookup::Unknown => note(&mut self.unknown, dotted, origin),
                Lookup::Key(key) => {
                    if !self.accepted.iter().any(|(p, _)| *p == dotted) {
                        self.accepted.push((dotted.clone(), key));
                    }
                    match key.support {
                        Support::Unsupported(why) => {
                            match self.unsupported.iter_mut().find(|(p, ..)| *p == dotted) {
                                Some((.., from)) => add_origin(from, origin),
                                None => self.unsupported.push((dotted, why, vec![origin.into()])),
                            }
                        }
                        Support::Shown(_) if !key.path.ends_with(".**") => {
                            self.descend(origin, v, path)
                        }
                        Support::Shown(_) => {}
                    }
                }
                Lookup::Parent => self.descend(origin, v, path),
            }
            path.pop();
        }
    }

    /// Into a map, or into the maps of a list (list items are transparent in paths).
    fn descend<'a>(&mut self, origin: &str, v: &'a serde_json::Value, path: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(m) => self.walk(origin, m, path),
            serde_json::Value::Array(items) => {
                for i in items {
                    self.descend(origin, i, path);
                }
            }
            _ => {}
        }
    }

    /// The loader's warning lines: unknown keys, then keys that are not supported.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .unknown
            .iter()
            .map(|(p, from)| format!("unknown key {p:?} (in {}): kept, not used", from.join(", ")))
            .collect();
        out.extend(self.unsupported.iter().map(|(p, why, from)| {
            format!("not supported: key {p:?} (in {}): {why}", from.join(", "))
        }));
        out
    }
}

fn add_origin(from: &mut Vec<String>, origin: &str) {
    if !from.iter().any(|f| f == origin) {
        from.push(origin.to_owned());
    }
}

fn note(list: &mut Vec<(String, Vec<String>)>, path: String, origin: &str) {
    match list.iter_mut().find(|(p, _)| *p == path) {
        Some((_, from)) => add_origin(from, origin),
        None => list.push((path, vec![origin.to_owned()])),
    }
}
