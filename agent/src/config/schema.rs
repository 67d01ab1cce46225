//! The typed cloud-config model: data types only, the bottom layer every other module
//! reads (the stage runner, users, K3s, install, upgrade, p2p). Unknown keys stay in the
//! generic tree next to it ([`super::Source::raw`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::de;

/// The typed configuration. Known keys only; the rest stays in [`super::Source::raw`].
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Config {
    #[serde(deserialize_with = "de::map_defaults")]
    pub stages: BTreeMap<String, Vec<Step>>,
    /// cloud-init `users:` (a list); mapped to a `boot` step.
    #[serde(deserialize_with = "de::list")]
    pub users: Vec<User>,
    /// cloud-init `write_files:`; mapped to a `boot` step.
    #[serde(deserialize_with = "de::list")]
    pub write_files: Vec<File>,
    /// cloud-init `runcmd:`; each entry a shell line or an argv list.
    #[serde(deserialize_with = "de::commands")]
    pub runcmd: Vec<String>,
    /// cloud-init `ssh_authorized_keys:`: for every listed user, root when there is none.
    #[serde(deserialize_with = "de::strings")]
    pub ssh_authorized_keys: Vec<String>,
    /// cloud-init `hostname:`; mapped to an `initramfs` step.
    #[serde(deserialize_with = "de::opt_string")]
    pub hostname: Option<String>,
    #[serde(deserialize_with = "de::opt")]
    pub k3s: Option<K3sBlock>,
    #[serde(rename = "k3s-agent", deserialize_with = "de::opt")]
    pub k3s_agent: Option<K3sBlock>,
    #[serde(deserialize_with = "de::opt")]
    pub install: Option<Install>,
    #[serde(deserialize_with = "de::opt")]
    pub p2p: Option<P2p>,
    #[serde(deserialize_with = "de::opt")]
    pub upgrade: Option<Upgrade>,
    /// `bundles:` applied on the installed system's boot, before K3s (the bundles module).
    #[serde(deserialize_with = "de::list")]
    pub bundles: Vec<Bundle>,
    /// A bundle that fails fails its install, boot or command (else a warning).
    #[serde(deserialize_with = "de::boolean")]
    pub fail_on_bundles_errors: bool,
    #[serde(deserialize_with = "de::opt_string")]
    pub config_url: Option<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub name: Option<String>,
    /// A failing step, or a source skipped as malformed, fails the stage: run-stage exits 1
    /// for it and the install, upgrade and reset hooks stop their command.
    #[serde(deserialize_with = "de::boolean")]
    pub strict: bool,
    /// The agent logs debug lines (the sources read, each step's filters and modules).
    #[serde(deserialize_with = "de::boolean")]
    pub debug: bool,
    /// Extra directories whose `.yaml`/`.yml` files run as stage files (yip files, no header
    /// needed, not merged into the node's config), after the node's own.
    #[serde(rename = "cloud-init-paths", deserialize_with = "de::strings")]
    pub cloud_init_paths: Vec<String>,
    /// provider-kairos' `kubevip:` (see [`Kubevip`]).
    #[serde(deserialize_with = "de::opt")]
    pub kubevip: Option<Kubevip>,
}

/// `kubevip:` as provider-kairos reads it: a control-plane node deploys kube-vip for the
/// virtual address `eip` on `interface`, and K3s serves its certificate for it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Kubevip {
    /// Unset: on when `eip` is set (upstream's rule). `enabled` is read too.
    #[serde(alias = "enabled", deserialize_with = "de::opt_bool")]
    pub enable: Option<bool>,
    #[serde(deserialize_with = "de::opt_string")]
    pub eip: Option<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub interface: Option<String>,
    /// A static Pod instead of a DaemonSet.
    #[serde(deserialize_with = "de::boolean")]
    pub static_pod: bool,
    /// kube-vip's image tag.
    #[serde(deserialize_with = "de::opt_string")]
    pub version: Option<String>,
    /// Replaces the RBAC manifest shipped with the agent (fetched over HTTP(S)).
    #[serde(deserialize_with = "de::opt_string")]
    pub manifest_url: Option<String>,
    #[serde(deserialize_with = "de::strings")]
    pub args: Vec<String>,
}

/// `k3s:` and `k3s-agent:` (provider-kairos' fields, plus `config`: keys for
/// /etc/rancher/k3s/config.yaml).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct K3sBlock {
    #[serde(deserialize_with = "de::boolean")]
    pub enabled: bool,
    #[serde(deserialize_with = "de::strings")]
    pub args: Vec<String>,
    #[serde(deserialize_with = "de::string_map")]
    pub env: BTreeMap<String, String>,
    #[serde(deserialize_with = "de::boolean")]
    pub replace_args: bool,
    #[serde(deserialize_with = "de::boolean")]
    pub replace_env: bool,
    #[serde(deserialize_with = "de::boolean")]
    pub embedded_registry: bool,
    /// Keys written to /etc/rancher/k3s/config.yaml as they are (K3s' own flag names).
    pub config: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Install {
    #[serde(deserialize_with = "de::boolean")]
    pub auto: bool,
    #[serde(deserialize_with = "de::opt_string")]
    pub device: Option<String>,
    #[serde(deserialize_with = "de::boolean")]
    pub reboot: bool,
    #[serde(deserialize_with = "de::boolean")]
    pub poweroff: bool,
    /// Sizes (MiB) and filesystems of oem, recovery, state and persistent.
    #[serde(deserialize_with = "de::opt")]
    pub partitions: Option<Partitions>,
    #[serde(deserialize_with = "de::string_map")]
    pub grub_options: BTreeMap<String, String>,
    #[serde(deserialize_with = "de::strings")]
    pub bind_mounts: Vec<String>,
    #[serde(deserialize_with = "de::strings")]
    pub ephemeral_mounts: Vec<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub source: Option<String>,
    #[serde(rename = "recovery-system")]
    pub recovery_system: Option<Value>,
    pub passive: Option<Value>,
    #[serde(rename = "grub-entry-name", deserialize_with = "de::opt_string")]
    pub grub_entry_name: Option<String>,
    /// Bundles installed right after the install, into the new system's persistent paths.
    #[serde(deserialize_with = "de::list")]
    pub bundles: Vec<Bundle>,
    /// Partitions created (and formatted when `fs` is set) after the Kairos ones.
    #[serde(rename = "extra-partitions", deserialize_with = "de::list")]
    pub extra_partitions: Vec<ExtraPartition>,
    /// Use the disk's existing labelled partitions: no partitioning, no formatting.
    #[serde(rename = "no-format", deserialize_with = "de::boolean")]
    pub no_format: bool,
    /// Install over a disk that already holds a Kairos installation (a COS_STATE or
    /// COS_PERSISTENT on it); without it `install.auto` refuses such a disk.
    #[serde(deserialize_with = "de::boolean")]
    pub force: bool,
    /// Let `install.device: auto` pick a removable or USB-attached disk (ours; upstream has
    /// no such key). An explicit `install.device` path is always allowed.
    #[serde(rename = "allow-removable", deserialize_with = "de::boolean")]
    pub allow_removable: bool,
}

/// `install.partitions`: upstream's four partitions; each is optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Partitions {
    #[serde(deserialize_with = "de::opt")]
    pub oem: Option<PartitionSpec>,
    #[serde(deserialize_with = "de::opt")]
    pub recovery: Option<PartitionSpec>,
    #[serde(deserialize_with = "de::opt")]
    pub state: Option<PartitionSpec>,
    #[serde(deserialize_with = "de::opt")]
    pub persistent: Option<PartitionSpec>,
}

/// A partition's size in MiB (0: the rest of the disk) and filesystem.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct PartitionSpec {
    #[serde(deserialize_with = "de::opt_u32")]
    pub size: Option<u32>,
    #[serde(deserialize_with = "de::opt_string")]
    pub fs: Option<String>,
}

/// An entry of `install.extra-partitions` (upstream's examples also spell `Name`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ExtraPartition {
    #[serde(alias = "Name", deserialize_with = "de::opt_string")]
    pub name: Option<String>,
    #[serde(deserialize_with = "de::opt_u32")]
    pub size: Option<u32>,
    #[serde(deserialize_with = "de::opt_string")]
    pub fs: Option<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub label: Option<String>,
}

/// One entry of `bundles:` / `install.bundles:` (upstream's fields). `repository` and
/// `db_path` are luet's; here a `package://` target is an OCI image, so they are not used.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Bundle {
    /// `run://REF`, `container://REF` (`docker://`), `package://REF` (`luet://`).
    #[serde(deserialize_with = "de::strings")]
    pub targets: Vec<String>,
    /// Where a container or package bundle's files are put (default `/`).
    #[serde(deserialize_with = "de::opt_string")]
    pub rootfs_path: Option<String>,
    /// The target after the scheme is an image archive or OCI layout on this machine.
    #[serde(deserialize_with = "de::boolean")]
    pub local_file: bool,
    #[serde(deserialize_with = "de::opt_string")]
    pub repository: Option<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub db_path: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct P2p {
    #[serde(deserialize_with = "de::opt_string")]
    pub network_token: Option<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub network_id: Option<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub role: Option<String>,
    #[serde(deserialize_with = "de::boolean")]
    pub dns: bool,
    #[serde(deserialize_with = "de::opt")]
    pub vpn: Option<P2pVpn>,
    #[serde(deserialize_with = "de::opt_u32")]
    pub minimum_nodes: Option<u32>,
    #[serde(deserialize_with = "de::boolean")]
    pub disable_dht: bool,
    #[serde(deserialize_with = "de::opt")]
    pub auto: Option<P2pAuto>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct P2pVpn {
    #[serde(deserialize_with = "de::opt_bool")]
    pub create: Option<bool>,
    #[serde(rename = "use", deserialize_with = "de::opt_bool")]
    pub use_: Option<bool>,
    #[serde(deserialize_with = "de::string_map")]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct P2pAuto {
    #[serde(deserialize_with = "de::opt_bool")]
    pub enable: Option<bool>,
    #[serde(deserialize_with = "de::opt")]
    pub ha: Option<P2pHa>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct P2pHa {
    #[serde(deserialize_with = "de::opt_bool")]
    pub enable: Option<bool>,
    #[serde(deserialize_with = "de::opt_u32")]
    pub master_nodes: Option<u32>,
    #[serde(deserialize_with = "de::opt_string")]
    pub external_db: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Upgrade {
    #[serde(deserialize_with = "de::opt")]
    pub system: Option<UpgradeSource>,
    #[serde(rename = "recovery-system", deserialize_with = "de::opt")]
    pub recovery_system: Option<UpgradeSource>,
    /// Reboot after a successful upgrade.
    #[serde(deserialize_with = "de::boolean")]
    pub reboot: bool,
    /// Power off after a successful upgrade (wins over `reboot`).
    #[serde(deserialize_with = "de::boolean")]
    pub poweroff: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct UpgradeSource {
    #[serde(deserialize_with = "de::opt_string")]
    pub source: Option<String>,
}

/// Which K3s runs: `k3s` (server) or `k3s-agent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Agent,
}

/// One step of a stage (yip's schema; field names as upstream).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Step {
    #[serde(deserialize_with = "de::opt_string")]
    pub name: Option<String>,
    /// Shell condition (`/bin/sh -c`); the step runs only when it exits 0.
    #[serde(rename = "if", deserialize_with = "de::opt_string")]
    pub if_: Option<String>,
    /// Regex over /etc/os-release's PRETTY_NAME (yip's `only_os`); the step runs on a match.
    #[serde(deserialize_with = "de::opt_string")]
    pub only_os: Option<String>,
    /// Regex over /etc/os-release's VERSION_ID.
    #[serde(deserialize_with = "de::opt_string")]
    pub only_os_version: Option<String>,
    /// Regex over the architecture in Go's names (amd64, arm64).
    #[serde(deserialize_with = "de::opt_string")]
    pub only_arch: Option<String>,
    /// `systemd` or `openrc`, told by which one's binary the root has.
    #[serde(deserialize_with = "de::opt_string")]
    pub only_service_manager: Option<String>,
    /// yip's `if_files`: `any`, `all` or `none` of these paths exist (under the root).
    #[serde(deserialize_with = "de::keys_map")]
    pub if_files: BTreeMap<String, Vec<String>>,
    #[serde(deserialize_with = "de::list")]
    pub files: Vec<File>,
    #[serde(deserialize_with = "de::list")]
    pub directories: Vec<Directory>,
    #[serde(deserialize_with = "de::commands")]
    pub commands: Vec<String>,
    #[serde(deserialize_with = "de::map_defaults")]
    pub users: BTreeMap<String, User>,
    #[serde(deserialize_with = "de::keys_map")]
    pub authorized_keys: BTreeMap<String, Vec<String>>,
    #[serde(deserialize_with = "de::opt_string")]
    pub hostname: Option<String>,
    #[serde(deserialize_with = "de::string_map")]
    pub environment: BTreeMap<String, String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub environment_file: Option<String>,
    /// Upstream's examples spell it `systctl`; both are read.
    #[serde(alias = "systctl", deserialize_with = "de::string_map")]
    pub sysctl: BTreeMap<String, String>,
    #[serde(deserialize_with = "de::strings")]
    pub modules: Vec<String>,
    #[serde(deserialize_with = "de::opt")]
    pub dns: Option<Dns>,
    #[serde(deserialize_with = "de::list")]
    pub ensure_entities: Vec<Entity>,
    #[serde(deserialize_with = "de::list")]
    pub delete_entities: Vec<Entity>,
    #[serde(deserialize_with = "de::list")]
    pub downloads: Vec<Download>,
    #[serde(deserialize_with = "de::opt")]
    pub systemctl: Option<Systemctl>,
    #[serde(deserialize_with = "de::string_map")]
    pub timesyncd: BTreeMap<String, String>,
    // Accepted so a Kairos file parses, reported as not supported when used.
    pub layout: Option<Value>,
    pub git: Option<Value>,
    pub datasource: Option<Value>,
    pub packages: Option<Value>,
    pub systemd_firstboot: Option<Value>,
    pub unpack_images: Option<Value>,
}

/// A user (a step's `users:` value, or an entry of cloud-init `users:`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct User {
    #[serde(deserialize_with = "de::opt_string")]
    pub name: Option<String>,
    /// A crypt(3) hash (`$6$…`), `!`/`*` (locked), or a clear-text password (hashed here).
    #[serde(deserialize_with = "de::opt_string")]
    pub passwd: Option<String>,
    #[serde(alias = "ssh-authorized-keys", deserialize_with = "de::strings")]
    pub ssh_authorized_keys: Vec<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub gecos: Option<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub homedir: Option<String>,
    #[serde(alias = "no-create-home", deserialize_with = "de::boolean")]
    pub no_create_home: bool,
    #[serde(alias = "primary-group", deserialize_with = "de::opt_string")]
    pub primary_group: Option<String>,
    #[serde(deserialize_with = "de::groups")]
    pub groups: Vec<String>,
    #[serde(alias = "no-user-group", deserialize_with = "de::boolean")]
    pub no_user_group: bool,
    #[serde(deserialize_with = "de::boolean")]
    pub system: bool,
    #[serde(deserialize_with = "de::opt_string")]
    pub shell: Option<String>,
    #[serde(deserialize_with = "de::boolean")]
    pub lock_passwd: bool,
    #[serde(deserialize_with = "de::opt_u32")]
    pub uid: Option<u32>,
}

/// An owner or group: a number or a name.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Id {
    Num(u32),
    Name(String),
}

/// An owner or group field: a number, a numeric string or a name; empty is none.
fn opt_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Id>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|n| Some(Id::Num(n)))
            .ok_or_else(|| serde::de::Error::custom(format!("{n}: not a user or group id"))),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(match s.parse() {
            Ok(n) => Id::Num(n),
            Err(_) => Id::Name(s),
        })),
        v => Err(serde::de::Error::custom(format!(
            "expected an id or a name, found {v}"
        ))),
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct File {
    #[serde(deserialize_with = "de::string")]
    pub path: String,
    #[serde(deserialize_with = "de::string")]
    pub content: String,
    #[serde(deserialize_with = "de::mode")]
    pub permissions: Option<u32>,
    #[serde(deserialize_with = "opt_id")]
    pub owner: Option<Id>,
    #[serde(deserialize_with = "opt_id")]
    pub group: Option<Id>,
    /// `b64`/`base64`, `gz`/`gzip`, or both (`gz+b64`, …).
    #[serde(deserialize_with = "de::opt_string")]
    pub encoding: Option<String>,
    /// `user:group` or `user`.
    #[serde(deserialize_with = "de::opt_string")]
    pub owner_string: Option<String>,
    /// cloud-init `write_files` `append: true`.
    #[serde(deserialize_with = "de::boolean")]
    pub append: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Directory {
    #[serde(deserialize_with = "de::string")]
    pub path: String,
    #[serde(deserialize_with = "de::mode")]
    pub permissions: Option<u32>,
    #[serde(deserialize_with = "opt_id")]
    pub owner: Option<Id>,
    #[serde(deserialize_with = "opt_id")]
    pub group: Option<Id>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Download {
    #[serde(deserialize_with = "de::string")]
    pub path: String,
    #[serde(deserialize_with = "de::string")]
    pub url: String,
    #[serde(deserialize_with = "de::mode")]
    pub permissions: Option<u32>,
    #[serde(deserialize_with = "opt_id")]
    pub owner: Option<Id>,
    #[serde(deserialize_with = "opt_id")]
    pub group: Option<Id>,
    #[serde(deserialize_with = "de::opt_u32")]
    pub timeout: Option<u32>,
    #[serde(deserialize_with = "de::opt_string")]
    pub owner_string: Option<String>,
    /// The content's SHA-256 (hex); when set, a mismatch is an error and nothing is written.
    /// Not in upstream's yip (which has no checksum for downloads).
    #[serde(deserialize_with = "de::opt_string")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Dns {
    #[serde(deserialize_with = "de::strings")]
    pub nameservers: Vec<String>,
    #[serde(deserialize_with = "de::strings")]
    pub search: Vec<String>,
    #[serde(deserialize_with = "de::strings")]
    pub options: Vec<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub path: Option<String>,
}

/// `ensure_entities`/`delete_entities`: an entity (YAML text) kept in the file at `path`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Entity {
    #[serde(deserialize_with = "de::string")]
    pub path: String,
    #[serde(deserialize_with = "de::string")]
    pub entity: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Systemctl {
    #[serde(deserialize_with = "de::strings")]
    pub enable: Vec<String>,
    #[serde(deserialize_with = "de::strings")]
    pub disable: Vec<String>,
    #[serde(deserialize_with = "de::strings")]
    pub start: Vec<String>,
    #[serde(deserialize_with = "de::strings")]
    pub mask: Vec<String>,
    #[serde(deserialize_with = "de::list")]
    pub overrides: Vec<SystemctlOverride>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct SystemctlOverride {
    #[serde(deserialize_with = "de::string")]
    pub service: String,
    #[serde(deserialize_with = "de::string")]
    pub content: String,
    #[serde(deserialize_with = "de::opt_string")]
    pub name: Option<String>,
}
