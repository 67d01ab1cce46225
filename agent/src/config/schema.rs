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
    #[serde(deserialize_with = "de::stages")]
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
    #[serde(deserialize_with = "de::opt_string")]
    pub config_url: Option<String>,
    #[serde(deserialize_with = "de::opt_string")]
    pub name: Option<String>,
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
    pub partitions: Option<Value>,
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
    #[serde(rename = "extra-partitions")]
    pub extra_partitions: Option<Value>,
    /// Install over a disk that already holds a Kairos installation (a COS_STATE or
    /// COS_PERSISTENT on it); without it `install.auto` refuses such a disk.
    #[serde(deserialize_with = "de::boolean")]
    pub force: bool,
    /// Let `install.device: auto` pick a removable or USB-attached disk (ours; upstream has
    /// no such key). An explicit `install.device` path is always allowed.
    #[serde(rename = "allow-removable", deserialize_with = "de::boolean")]
    pub allow_removable: bool,
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
    #[serde(deserialize_with = "de::list")]
    pub files: Vec<File>,
    #[serde(deserialize_with = "de::list")]
    pub directories: Vec<Directory>,
    #[serde(deserialize_with = "de::commands")]
    pub commands: Vec<String>,
    #[serde(deserialize_with = "de::users_map")]
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

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct File {
    #[serde(deserialize_with = "de::string")]
    pub path: String,
    #[serde(deserialize_with = "de::string")]
    pub content: String,
    #[serde(deserialize_with = "de::mode")]
    pub permissions: Option<u32>,
    #[serde(deserialize_with = "de::id")]
    pub owner: Option<Id>,
    #[serde(deserialize_with = "de::id")]
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
    #[serde(deserialize_with = "de::id")]
    pub owner: Option<Id>,
    #[serde(deserialize_with = "de::id")]
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
    #[serde(deserialize_with = "de::id")]
    pub owner: Option<Id>,
    #[serde(deserialize_with = "de::id")]
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
