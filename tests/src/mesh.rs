//! Harness for the P2P mesh tests and benchmark: network namespaces on a bridge, one
//! `kairos-agent p2p run` per namespace with its own root directory (machine-id, hostname,
//! lease, a stand-in `k3s`). Everything it makes carries a per-run unique name and is torn
//! down by `Drop`, also when a test fails. No traffic leaves the machine: the bridge has no
//! address and no uplink.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Mesh tests need root for `ip netns` and TUN; say so instead of failing obscurely.
pub fn require_root() {
    if !rustix::process::geteuid().is_root() {
        panic!(
            "the mesh tests need root: they create network namespaces, a bridge and TUN interfaces (run as root, as CI does)"
        );
    }
}

/// Build kairos-agent once per test process (the tests of a binary share it).
/// The agent binary the nodes run (built once per test process).
pub use crate::build_agent;

/// The agent a bench runs: `KAIROS_BENCH_AGENT` (a binary built before, so a bench on a
/// shared tree measures one fixed build, e.g. old and new side by side), else `build_agent`.
pub fn bench_agent() -> Result<PathBuf> {
    match std::env::var_os("KAIROS_BENCH_AGENT") {
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                bail!("KAIROS_BENCH_AGENT={} is not a file", p.display());
            }
            Ok(p)
        }
        None => build_agent(),
    }
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The mesh forger (`agent/p2p/examples/mesh-forger.rs`): a token holder that publishes
/// forged ledger entries. Built like the agent (with `ci`, the whole workspace already built
/// by `cargo test` includes the examples).
pub fn build_forger() -> Result<PathBuf> {
    let profile = crate::test_profile();
    let root = crate::workspace_root();
    let mut cmd = crate::cargo_command();
    cmd.args(["build", "--profile", &profile]);
    if profile == "ci" {
        cmd.args(["--workspace", "--all-targets"]);
    } else {
        cmd.args(["-p", "kairos-p2p", "--example", "mesh-forger"]);
    }
    if !cmd.status().context("running cargo build")?.success() {
        bail!("cargo build of the mesh-forger example failed");
    }
    let bin = root
        .join("target/x86_64-unknown-linux-gnu")
        .join(&profile)
        .join("examples/mesh-forger");
    if !bin.is_file() {
        bail!("cargo build did not make {}", bin.display());
    }
    Ok(bin)
}

/// A node's stand-in for k3s: records its arguments and environment; as a server it writes a
/// node token and a kubeconfig (for https://127.0.0.1:6443) where real K3s does; then stays
/// up like K3s (the namespace teardown kills it).
pub fn stand_in_k3s(root: &Path, token: &str) -> String {
    format!(
        "#!/bin/sh\nR='{r}'\n{{ echo \"args: $*\"; echo \"K3S_URL=$K3S_URL\"; echo \"K3S_TOKEN=$K3S_TOKEN\"; }} > \"$R/k3s-$1.rec.tmp\"\nmv \"$R/k3s-$1.rec.tmp\" \"$R/k3s-$1.rec\"\nif [ \"$1\" = server ]; then mkdir -p \"$R/var/lib/rancher/k3s/server\" \"$R/etc/rancher/k3s\"; echo '{token}' > \"$R/var/lib/rancher/k3s/server/node-token\"; printf '{kubeconfig}' > \"$R/etc/rancher/k3s/k3s.yaml\"; fi\nexec sleep 3600\n",
        r = root.display(),
        kubeconfig = STAND_IN_KUBECONFIG.replace('\n', "\\n"),
    )
}

/// What the stand-in writes as a server's /etc/rancher/k3s/k3s.yaml (K3s' form, fake data).
pub const STAND_IN_KUBECONFIG: &str = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: c3RhbmQtaW4=\n    server: https://127.0.0.1:6443\n  name: default\ncontexts:\n- context:\n    cluster: default\n    user: default\n  name: default\ncurrent-context: default\nkind: Config\nusers:\n- name: default\n  user:\n    token: stand-in\n";

pub struct Node {
    pub ns: String,
    pub root: PathBuf,
    pub lan_ip: String,
    pub child: Option<Child>,
    pub alive: bool,
}

impl Node {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("agent.log")).unwrap_or_default()
    }

    /// The last `leader=… role=…` line: (leader, role).
    pub fn state(&self) -> Option<(String, String)> {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("kairos-p2p: leader="))?;
        let rest = line.split("kairos-p2p: ").nth(1)?;
        let mut leader = None;
        let mut role = None;
        for kv in rest.split_whitespace() {
            if let Some(v) = kv.strip_prefix("leader=") {
                leader = Some(v.to_owned());
            }
            if let Some(v) = kv.strip_prefix("role=") {
                role = Some(v.to_owned());
            }
        }
        Some((leader?, role?))
    }

    /// The VPN address from the last `vpn interface=… address=A/P` line.
    pub fn vpn_ip(&self) -> Option<String> {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("kairos-p2p: vpn interface="))?;
        let addr = line.split("address=").nth(1)?;
        Some(addr.split('/').next()?.to_owned())
    }

    pub fn uuid(&self) -> String {
        let id = std::fs::read_to_string(self.root.join("etc/machine-id")).unwrap_or_default();
        let host = std::fs::read_to_string(self.root.join("etc/hostname")).unwrap_or_default();
        format!("{}-{}", id.trim(), host.trim())
    }

    pub fn record(&self, which: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(format!("k3s-{which}.rec"))).ok()
    }

    /// The agent's process ID (`ip netns exec` execs the agent, so it is the child's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's (user + system CPU seconds, resident set in bytes) from /proc.
    pub fn usage(&self) -> Option<(f64, u64)> {
        proc_usage(self.pid()?)
    }
}

/// (user + system CPU seconds, RSS bytes) of `pid` from /proc/PID/stat and status.
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the ")" here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ: 100 on every Linux architecture this runs on (the ABI fixes it for x86).
    let hz = 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ticks as f64 / hz, rss_kb * 1024))
}

pub struct Mesh {
    pub agent: PathBuf,
    /// Namespace names are `<ns_prefix>-<tag>-<i>`.
    pub ns_prefix: String,
    pub tag: String,
    pub bridge: String,
    pub dir: PathBuf,
    pub token: String,
    pub nodes: Vec<Node>,
    pub started: Instant,
}

impl Mesh {
    /// `n` namespaces on a fresh bridge, each with a root dir and config; nothing started.
    pub fn new(agent: &Path, label: &str, n: usize) -> Result<Mesh> {
        Mesh::with_prefix(agent, "kairos-mesh", label, n)
    }

    /// As `new`, the namespaces named `<ns_prefix>-<tag>-<i>` (a bench's own prefix).
    pub fn with_prefix(agent: &Path, ns_prefix: &str, label: &str, n: usize) -> Result<Mesh> {
        kairos_qemu::apt::ensure_tool("ping", "iputils-ping").context("installing ping")?;
        // Interface names are limited to 15 characters: keep the tag short.
        let tag = format!("{}{}", label, std::process::id() % 100_000);
        let dir = crate::work_dir().join(format!("mesh-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let token = sh(&[
            agent.to_str().unwrap_or("kairos-agent"),
            "p2p",
            "generate-token",
        ])?
        .trim()
        .to_owned();
        let mut mesh = Mesh {
            agent: agent.to_owned(),
            ns_prefix: ns_prefix.to_owned(),
            bridge: format!("kb{tag}"),
            tag,
            dir,
            token,
            nodes: Vec::new(),
            started: Instant::now(),
        };
        sh(&["ip", "link", "add", &mesh.bridge, "type", "bridge"])?;
        sh(&["ip", "link", "set", &mesh.bridge, "up"])?;
        for i in 0..n {
            mesh.add_node(i)?;
        }
        Ok(mesh)
    }

    fn add_node(&mut self, i: usize) -> Result<()> {
        let ns = format!("{}-{}-{i}", self.ns_prefix, self.tag);
        let host_if = format!("kv{}{i}", self.tag);
        let lan_ip = format!("10.231.0.{}", i + 1);
        sh(&["ip", "netns", "add", &ns])?;
        // Pushed into the vector at once so Drop removes it even if the rest fails.
        let root = self.dir.join(format!("node{i}"));
        self.nodes.push(Node {
            ns: ns.clone(),
            root: root.clone(),
            lan_ip: lan_ip.clone(),
            child: None,
            alive: true,
        });
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        sh(&["ip", "link", "set", &host_if, "master", &self.bridge])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{lan_ip}/24"),
            "dev",
            "eth0",
        ])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        // mDNS multicast needs a route; only multicast, so nothing else has a way out.
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "224.0.0.0/4",
            "dev",
            "eth0",
        ])?;
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::create_dir_all(root.join("usr/bin"))?;
        std::fs::write(
            root.join("etc/machine-id"),
            format!("{:032x}\n", rand_u128(i)),
        )?;
        std::fs::write(root.join("etc/hostname"), format!("node{i}\n"))?;
        let k3s = root.join("usr/bin/k3s");
        std::fs::write(
            &k3s,
            stand_in_k3s(&root, &format!("K10token-of-node{i}::server:s3cret")),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&k3s, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(
            root.join("config.yaml"),
            format!(
                "#cloud-config\np2p:\n  network_token: {}\n  announce_interval: 1\n",
                self.token
            ),
        )?;
        Ok(())
    }

    pub fn start(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.root.join("agent.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(&self.agent)
            .arg("--root")
            .arg(&node.root)
            .args(["p2p", "run", "--config"])
            .arg(node.root.join("config.yaml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting kairos-agent p2p run")?;
        node.child = Some(child);
        Ok(())
    }

    /// Run `program CONFIG` in node `i`'s namespace instead of the agent, its output in the
    /// node's log (`Node::log`).
    pub fn start_program(&mut self, i: usize, program: &Path) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.root.join("agent.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(program)
            .arg(node.root.join("config.yaml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        node.child = Some(child);
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        self.started = Instant::now();
        for i in 0..self.nodes.len() {
            self.start(i)?;
        }
        Ok(())
    }

    /// Stop a node's agent (SIGTERM, then SIGKILL) and everything else in its namespace.
    pub fn stop(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut c) = node.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_ns_pids(&node.ns);
    }

    /// The node disappears: its processes die and its namespace (with the veth) goes.
    pub fn delete_node(&mut self, i: usize) {
        self.stop(i);
        let node = &mut self.nodes[i];
        let _ = sh(&["ip", "netns", "del", &node.ns]);
        node.alive = false;
    }

    pub fn exec(&self, i: usize, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", &self.nodes[i].ns];
        v.extend_from_slice(args);
        sh(&v)
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("===== {} ({})\n{}", n.ns, n.uuid(), n.log()))
            .collect()
    }

    /// Poll `f` until it returns Some or `limit` passes.
    pub fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&Mesh) -> Option<T>,
    ) -> Result<T> {
        let t0 = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if t0.elapsed() > limit {
                bail!(
                    "timed out after {limit:?} waiting for {what}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn kill_ns_pids(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            // A node deleted by the test has nothing left to remove.
            if !self.nodes[i].alive {
                continue;
            }
            self.stop(i);
            let _ = Command::new("ip")
                .args(["netns", "del", &self.nodes[i].ns])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

/// A machine-id that differs per node and per run, without a random crate.
fn rand_u128(i: usize) -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut x =
        t ^ ((std::process::id() as u128) << 64) ^ ((i as u128 + 1) * 0x9e37_79b9_7f4a_7c15);
    // xorshift to spread the bits
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}
