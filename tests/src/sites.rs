//! Two NATed sites and a public network between them, for the mesh test across sites: node 0
//! sits on the public bridge (the bootstrap/relay node), node 1 behind router A, node 2 behind
//! router B. Each router namespace masquerades its site's addresses (nftables) onto the public
//! bridge; nothing routes into a site, and multicast (mDNS) does not cross the routers. The
//! nodes, their roots and logs are `mesh::Mesh`'s; this adds the routers and the site bridges
//! and moves nodes 1 and 2 onto them. Namespaces are `ks-<tag>-…`, removed by `Drop`.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::mesh::Mesh;
use crate::run_ok;

/// The bootstrap/relay node's address on the public bridge, and its port.
pub const RELAY_IP: &str = "10.240.0.1";
pub const RELAY_PORT: u16 = 4001;

pub struct Sites {
    pub mesh: Mesh,
    routers: Vec<String>,
    bridges: Vec<String>,
}

fn ip(args: &[&str]) -> String {
    run_ok(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> String {
    run_ok(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

impl Sites {
    /// The topology with three nodes (not started): node 0 public, serving relay and listening
    /// on `RELAY_PORT`; nodes 1 and 2, one per site, with the relay as their bootstrap peer.
    pub fn new(agent: &Path) -> Result<Sites> {
        kairos_qemu::apt::ensure_tool("nft", "nftables")
            .context("the sites' NAT routers need nft (Debian package nftables)")?;
        let mesh = Mesh::with_prefix(agent, "ks", "s", 3)?;
        let mut s = Sites {
            mesh,
            routers: Vec::new(),
            bridges: Vec::new(),
        };
        s.readdress(0, &format!("{RELAY_IP}/24"), None);
        for (k, site) in ["a", "b"].into_iter().enumerate() {
            let tag = s.mesh.tag.clone();
            let bridge = format!("{}{site}", s.mesh.bridge);
            ip(&["link", "add", &bridge, "type", "bridge"]);
            s.bridges.push(bridge.clone());
            ip(&["link", "set", &bridge, "up"]);
            let r = format!("ks-{tag}-r{site}");
            ip(&["netns", "add", &r]);
            s.routers.push(r.clone());
            // eth0: the router's public side; eth1: the site's gateway.
            let public = format!("10.240.0.{}/24", 2 + k);
            let inside = format!("192.168.{}.1", 1 + k);
            for (host_if, ns_if, br, addr) in [
                (
                    format!("kr{tag}{site}"),
                    "eth0",
                    s.mesh.bridge.clone(),
                    public,
                ),
                (
                    format!("ki{tag}{site}"),
                    "eth1",
                    bridge.clone(),
                    format!("{inside}/24"),
                ),
            ] {
                ip(&[
                    "link", "add", &host_if, "type", "veth", "peer", "name", ns_if, "netns", &r,
                ]);
                ip(&["link", "set", &host_if, "master", &br]);
                ip(&["link", "set", &host_if, "up"]);
                ip(&["-n", &r, "addr", "add", &addr, "dev", ns_if]);
                ip(&["-n", &r, "link", "set", ns_if, "up"]);
            }
            ip(&["-n", &r, "link", "set", "lo", "up"]);
            in_ns(&r, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
            in_ns(&r, &["nft", "add table ip nat"]);
            in_ns(
                &r,
                &[
                    "nft",
                    "add chain ip nat post { type nat hook postrouting priority srcnat ; }",
                ],
            );
            in_ns(
                &r,
                &["nft", "add rule ip nat post oifname \"eth0\" masquerade"],
            );
            // Node k+1 leaves the public bridge for its site's.
            let n = k + 1;
            let node_if = format!("kv{tag}{n}");
            ip(&["link", "set", &node_if, "nomaster"]);
            ip(&["link", "set", &node_if, "master", &bridge]);
            s.readdress(n, &format!("192.168.{}.2/24", 1 + k), Some(&inside));
        }
        let relay_cfg = format!("  listen_port: {RELAY_PORT}\n  relay:\n    server: true\n");
        s.append_config(0, &relay_cfg)?;
        let boot = format!(
            "  bootstrap:\n    - /ip4/{RELAY_IP}/tcp/{RELAY_PORT}\n    - /ip4/{RELAY_IP}/udp/{RELAY_PORT}/quic-v1\n"
        );
        for n in [1, 2] {
            s.append_config(n, &boot)?;
        }
        Ok(s)
    }

    /// Node `i`'s eth0 gets `addr` (and a default route via `gateway`) instead of the mesh's.
    fn readdress(&self, i: usize, addr: &str, gateway: Option<&str>) {
        let ns = &self.mesh.nodes[i].ns;
        ip(&["-n", ns, "addr", "flush", "dev", "eth0"]);
        ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
        // mDNS within the node's own bridge, as on the mesh's LAN.
        ip(&["-n", ns, "route", "replace", "224.0.0.0/4", "dev", "eth0"]);
        if let Some(gw) = gateway {
            ip(&["-n", ns, "route", "add", "default", "via", gw]);
        }
    }

    /// More keys under the node's `p2p:` block (the mesh writes it last in config.yaml).
    fn append_config(&self, i: usize, keys: &str) -> Result<()> {
        let path = self.mesh.nodes[i].root.join("config.yaml");
        let mut text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.push_str(keys);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for r in &self.routers {
            let _ = Command::new("ip").args(["netns", "del", r]).status();
        }
        for b in &self.bridges {
            let _ = Command::new("ip")
                .args(["link", "del", b])
                .stderr(Stdio::null())
                .status();
        }
    }
}
