//! The `p2p:` block of the cloud-config (SPEC.md section 6), with upstream's keys and
//! defaults, plus a few of ours (marked) that upstream leaves to environment variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::Deserialize;

use crate::roles::Ha;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct P2pConfig {
    pub network_token: String,
    pub network_id: String,
    /// `auto` (or empty): the leader decides; `master` / `worker` / `none` fixed.
    pub role: String,
    pub dns: bool,
    pub vpn: Vpn,
    pub minimum_nodes: usize,
    pub disable_dht: bool,
    pub auto: Auto,
    /// Ours: seconds between announcements (upstream: about 20).
    pub announce_interval: u64,
    /// Ours: TCP/UDP port to listen on, 0 for any.
    pub listen_port: u16,
    /// Ours: libp2p multiaddrs of peers to dial at start (and again whenever the connection
    /// drops) and to seed Kademlia with; a trailing `/p2p/<peer id>` is optional. Upstream
    /// takes these from `EDGEVPNBOOTSTRAPPEERS`, honoured here in `vpn.env` too.
    pub bootstrap: Vec<String>,
    pub relay: Relay,
}

impl Default for P2pConfig {
    fn default() -> Self {
        P2pConfig {
            network_token: String::new(),
            network_id: "kairos".into(),
            role: String::new(),
            dns: false,
            vpn: Vpn::default(),
            minimum_nodes: 2,
            disable_dht: false,
            auto: Auto::default(),
            announce_interval: 20,
            listen_port: 0,
            bootstrap: Vec::new(),
            relay: Relay::default(),
        }
    }
}

/// Ours: `p2p.relay`. Upstream's nearest is `EDGEVPNAUTORELAY` (relay when reachable, decided
/// by libp2p's AutoNAT); here a node serves only when told to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Relay {
    /// Serve libp2p circuit relay v2: peers behind NAT reserve a slot here and are reached
    /// through it. For a node others can dial (a public address).
    pub server: bool,
}

/// A `p2p.bootstrap` entry that is no dialable libp2p address.
#[derive(Debug, thiserror::Error)]
#[error("{key}: `{value}` is not a dialable libp2p multiaddr: {msg}")]
pub struct BadAddress {
    pub key: &'static str,
    pub value: String,
    pub msg: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Vpn {
    pub create: bool,
    #[serde(rename = "use")]
    pub use_vpn: bool,
    pub env: BTreeMap<String, String>,
    /// Ours: interface name (upstream: `IFACE` in env, which is honoured too).
    pub interface: Option<String>,
    /// Ours: address range to lease from.
    pub range: Option<String>,
}

impl Default for Vpn {
    fn default() -> Self {
        Vpn {
            create: true,
            use_vpn: true,
            env: BTreeMap::new(),
            interface: None,
            range: None,
        }
    }
}

impl Vpn {
    pub fn interface(&self) -> String {
        self.interface
            .clone()
            .or_else(|| self.env.get("IFACE").cloned())
            .unwrap_or_else(|| "edgevpn0".into())
    }

    pub fn range(&self) -> String {
        self.range
            .clone()
            .unwrap_or_else(|| crate::lease::DEFAULT_RANGE.into())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Auto {
    pub enable: bool,
    pub ha: HaConfig,
}

impl Default for Auto {
    fn default() -> Self {
        Auto {
            enable: true,
            ha: HaConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HaConfig {
    /// Unset: on when `master_nodes` is given (upstream's rule).
    pub enable: Option<bool>,
    /// Servers besides the cluster-init one.
    pub master_nodes: Option<usize>,
    /// A K3s datastore (`--datastore-endpoint`) instead of embedded etcd: no `--cluster-init`.
    pub external_db: String,
}

impl P2pConfig {
    pub fn ha(&self) -> Ha {
        let h = &self.auto.ha;
        Ha {
            enable: h.enable.unwrap_or(h.master_nodes.is_some()),
            master_nodes: h.master_nodes.unwrap_or(0),
        }
    }

    /// `p2p.bootstrap` and upstream's `EDGEVPNBOOTSTRAPPEERS` (comma-separated, in
    /// `vpn.env`), parsed. Only IP addresses: this build has no DNS transport.
    pub fn bootstrap_addrs(&self) -> Result<Vec<Multiaddr>, BadAddress> {
        let env = self
            .vpn
            .env
            .get("EDGEVPNBOOTSTRAPPEERS")
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()));
        let listed = self.bootstrap.iter().map(|s| ("p2p.bootstrap", s.trim()));
        let from_env = env
            .into_iter()
            .flatten()
            .map(|s| ("p2p.vpn.env.EDGEVPNBOOTSTRAPPEERS", s));
        let mut out: Vec<Multiaddr> = Vec::new();
        for (key, value) in listed.chain(from_env) {
            let bad = |msg: String| BadAddress {
                key,
                value: value.to_owned(),
                msg,
            };
            let addr: Multiaddr = value
                .parse()
                .map_err(|e: libp2p::multiaddr::Error| bad(e.to_string()))?;
            let mut it = addr.iter();
            match it.next() {
                Some(Protocol::Ip4(_) | Protocol::Ip6(_)) => {}
                Some(
                    Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_),
                ) => {
                    return Err(bad(
                        "needs an IP address (no DNS resolution in the mesh)".into()
                    ));
                }
                _ => return Err(bad("must start with /ip4/ or /ip6/".into())),
            }
            let transport_ok = match it.next() {
                Some(Protocol::Tcp(_)) => true,
                Some(Protocol::Udp(_)) => matches!(it.next(), Some(Protocol::QuicV1)),
                _ => false,
            };
            if !transport_ok {
                return Err(bad(
                    "needs /tcp/<port> or /udp/<port>/quic-v1 after the address".into(),
                ));
            }
            match it.next() {
                None | Some(Protocol::P2p(_)) if it.next().is_none() => {}
                _ => return Err(bad("only /p2p/<peer id> may follow the port".into())),
            }
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        Ok(out)
    }

    /// `auto.ha.external_db`, when set.
    pub fn external_db(&self) -> Option<&str> {
        Some(self.auto.ha.external_db.trim()).filter(|d| !d.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: the `p2p:` block is not valid: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("{path}: {err}")]
    Address { path: PathBuf, err: BadAddress },
    #[error("no `p2p:` block with a network_token in {0}")]
    Missing(String),
}

#[derive(Deserialize, Default)]
struct Doc {
    #[serde(default)]
    p2p: Option<P2pConfig>,
}

/// The `p2p:` block of one cloud-config text; None when it has none.
pub fn parse(text: &str, path: &Path) -> Result<Option<P2pConfig>, ConfigError> {
    let doc: Doc = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        msg: e.to_string(),
    })?;
    if let Some(c) = &doc.p2p {
        c.bootstrap_addrs().map_err(|err| ConfigError::Address {
            path: path.to_owned(),
            err,
        })?;
    }
    Ok(doc.p2p)
}

pub fn load_file(path: &Path) -> Result<Option<P2pConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).at(path, "reading")?;
    parse(&text, path)
}

/// Without `--config`: the last `p2p:` block in the cloud-config directories in merge order
/// (SPEC.md section 6). A stop-gap until the agent's merged cloud-config is handed over; it
/// takes the whole block from the file that wins rather than merging keys.
pub fn load_default(root: &Path) -> Result<P2pConfig, ConfigError> {
    let dirs = [
        "run/initramfs/live",
        "etc/kairos",
        "usr/local/cloud-config",
        "oem",
    ];
    let mut found = None;
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(root.join(d)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        for f in files {
            // A broken file elsewhere in /oem is not this command's business: skip it.
            if let Ok(Some(c)) = load_file(&f)
                && !c.network_token.is_empty()
            {
                found = Some(c);
            }
        }
    }
    found.ok_or_else(|| ConfigError::Missing(format!("{}/{{{}}}", root.display(), dirs.join(","))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_upstream_keys_and_defaults() {
        let text = "#cloud-config\nhostname: x\nstages:\n  boot:\n    - commands: [true]\np2p:\n  network_token: abc\n  minimum_nodes: 3\n  vpn:\n    env:\n      IFACE: vpn7\n  auto:\n    ha:\n      enable: true\n      master_nodes: 2\n";
        let c = parse(text, Path::new("t.yaml")).unwrap().unwrap();
        assert_eq!(c.network_token, "abc");
        assert_eq!(c.minimum_nodes, 3);
        assert_eq!(c.vpn.interface(), "vpn7");
        assert!(c.vpn.create && c.auto.enable);
        assert_eq!(
            c.ha(),
            Ha {
                enable: true,
                master_nodes: 2
            }
        );
        assert_eq!(c.network_id, "kairos");
        assert_eq!(c.vpn.range(), "10.1.0.0/24");
        assert!(
            parse("#cloud-config\nhostname: x\n", Path::new("t"))
                .unwrap()
                .is_none()
        );
        // master_nodes alone turns HA on; enable: false keeps it off.
        let ha = |t: &str| parse(t, Path::new("t")).unwrap().unwrap().ha();
        assert_eq!(
            ha("p2p:\n  auto:\n    ha:\n      master_nodes: 2\n"),
            Ha {
                enable: true,
                master_nodes: 2
            }
        );
        assert!(!ha("p2p:\n  auto:\n    ha:\n      enable: false\n      master_nodes: 2\n").enable);
        assert!(!ha("p2p: {}\n").enable);
        assert_eq!(c.external_db(), None);
        let e = parse("p2p:\n  minimum_nodes: lots\n", Path::new("bad.yaml")).unwrap_err();
        assert!(e.to_string().contains("bad.yaml"), "{e}");
    }

    #[test]
    fn bootstrap_and_relay_keys() {
        let text = "p2p:\n  network_token: abc\n  bootstrap:\n    - /ip4/10.240.0.1/tcp/4001\n    - /ip4/10.240.0.1/udp/4001/quic-v1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA\n  relay:\n    server: true\n  vpn:\n    env:\n      EDGEVPNBOOTSTRAPPEERS: \"/ip6/::1/tcp/5, /ip4/10.240.0.1/tcp/4001\"\n";
        let c = parse(text, Path::new("t.yaml")).unwrap().unwrap();
        assert!(c.relay.server);
        let addrs: Vec<String> = c
            .bootstrap_addrs()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        // The env list adds to the key; a repeated address counts once.
        assert_eq!(
            addrs,
            [
                "/ip4/10.240.0.1/tcp/4001",
                "/ip4/10.240.0.1/udp/4001/quic-v1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA",
                "/ip6/::1/tcp/5"
            ]
        );
        let d = parse("p2p:\n  network_token: abc\n", Path::new("t"))
            .unwrap()
            .unwrap();
        assert!(!d.relay.server && d.bootstrap_addrs().unwrap().is_empty());
        // Each bad entry: the file, the key and the value in the error.
        for (yaml, key, value) in [
            (
                "  bootstrap: [\"10.0.0.1:4001\"]\n",
                "p2p.bootstrap",
                "10.0.0.1:4001",
            ),
            (
                "  bootstrap: [/dns4/relay.example/tcp/4001]\n",
                "p2p.bootstrap",
                "/dns4/relay.example/tcp/4001",
            ),
            (
                "  bootstrap: [/ip4/10.0.0.1]\n",
                "p2p.bootstrap",
                "/ip4/10.0.0.1",
            ),
            (
                "  bootstrap: [/ip4/10.0.0.1/udp/4001]\n",
                "p2p.bootstrap",
                "/ip4/10.0.0.1/udp/4001",
            ),
            (
                "  bootstrap: [/ip4/10.0.0.1/tcp/4001/ws]\n",
                "p2p.bootstrap",
                "/ip4/10.0.0.1/tcp/4001/ws",
            ),
            (
                "  bootstrap: [/ip4/10.0.0.1/tcp/1/p2p/notapeer]\n",
                "p2p.bootstrap",
                "/ip4/10.0.0.1/tcp/1/p2p/notapeer",
            ),
            (
                "  vpn:\n    env:\n      EDGEVPNBOOTSTRAPPEERS: /ip4/1.2.3.4/tcp/x\n",
                "p2p.vpn.env.EDGEVPNBOOTSTRAPPEERS",
                "/ip4/1.2.3.4/tcp/x",
            ),
        ] {
            let e = parse(&format!("p2p:\n{yaml}"), Path::new("bad.yaml")).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("bad.yaml")
                    && msg.contains(key)
                    && msg.contains(&format!("`{value}`")),
                "{msg}"
            );
        }
        let e = parse("p2p:\n  relay:\n    server: maybe\n", Path::new("r.yaml")).unwrap_err();
        assert!(e.to_string().contains("r.yaml"), "{e}");
    }

    #[test]
    fn default_search_takes_the_last_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("oem")).unwrap();
        std::fs::create_dir_all(dir.path().join("etc/kairos")).unwrap();
        std::fs::write(
            dir.path().join("etc/kairos/a.yaml"),
            "p2p:\n  network_token: one\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("oem/90.yaml"),
            "p2p:\n  network_token: two\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("oem/91.yaml"), "p2p: [broken\n").unwrap();
        assert_eq!(load_default(dir.path()).unwrap().network_token, "two");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_default(empty.path()),
            Err(ConfigError::Missing(_))
        ));
    }
}
