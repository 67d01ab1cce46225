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
    shown(
        "config_url",
        "config_url_is_fetched_and_an_unreachable_one_is_a_warning",
    ),
    // --- stages and steps ---
    // --- install, upgrade, reset ---
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
    unsupported("k0s.**", "k0s is not supported by this agent; use k3s"),
    unsupported(
        "k0s-worker.**",
        "k0s is not supported by this agent; use k3s-agent",
    ),
];
