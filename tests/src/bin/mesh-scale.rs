//! Benchmark (not a test): the mesh at fleet size. For each N, N namespaces on one bridge,
//! each running a real `kairos-agent p2p run` with the stand-in K3s (tests/src/mesh.rs), and:
//! time to all roles assigned, time to a new leader after the leader is killed, time until
//! every (sampled) pair pings over `edgevpn0`, per-node RSS and CPU, mesh traffic per node
//! (eth0 bytes while idle: gossip, DHT, identify, mDNS), then churn: five rounds of killing
//! and restarting 20 % of the nodes, with the invariants checked every half second.
//!
//! `cargo run --release -p kairos-tests --bin mesh-scale -- --nodes 10,25,50` as root.
//! Namespaces are `kx-<tag>-<i>`, removed at the end and on error (Mesh's Drop).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kairos_tests::mesh::{Mesh, bench_agent, require_root};

/// How long any one phase may take before the run for this N is given up.
const LIMIT: Duration = Duration::from_secs(180);
/// Sampled ping pairs per node above `ALL_PAIRS_UP_TO` nodes.
const PAIRS_PER_NODE: usize = 2;
const ALL_PAIRS_UP_TO: usize = 10;
const CHURN_ROUNDS: usize = 5;
/// The idle window over which CPU and traffic are averaged.
const WINDOW: Duration = Duration::from_secs(10);

/// A small deterministic generator (xorshift64*), seeded per run: which nodes churn and which
/// pairs are pinged; the seed is printed so a run can be followed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `k` distinct values below `n`.
    fn pick(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + self.below(n - i);
            v.swap(i, j);
        }
        v.truncate(k.min(n));
        v.sort();
        v
    }
}

/// What the live nodes say right now, from their logs.
#[derive(Debug)]
struct View {
    /// leader → how many live nodes follow it (nodes that printed no state yet are absent).
    leaders: BTreeMap<String, usize>,
    /// Live nodes whose role is a server (master, master/…).
    masters: BTreeSet<String>,
    /// Live nodes with a role other than none.
    with_role: usize,
    /// VPN address → live nodes that came up with it.
    vpn: BTreeMap<String, Vec<usize>>,
    /// Live nodes that printed a state after `since` (their current run).
    reporting: usize,
    live: usize,
}

/// The view of the live nodes, each only from the log its current run wrote (`since[i]`).
fn view(mesh: &Mesh, live: &[bool], since: &[usize]) -> View {
    let mut v = View {
        leaders: BTreeMap::new(),
        masters: BTreeSet::new(),
        with_role: 0,
        vpn: BTreeMap::new(),
        reporting: 0,
        live: live.iter().filter(|l| **l).count(),
    };
    for (i, n) in mesh.nodes.iter().enumerate() {
        if !live[i] {
            continue;
        }
        let log = n.log();
        let Some(cur) = log.get(since[i]..) else {
            continue;
        };
        if let Some((leader, role)) = last_state(cur) {
            v.reporting += 1;
            *v.leaders.entry(leader).or_default() += 1;
            if role != "none" {
                v.with_role += 1;
            }
            if role.starts_with("master") {
                v.masters.insert(n.uuid());
            }
        }
        if let Some(ip) = last_vpn(cur) {
            v.vpn.entry(ip).or_default().push(i);
        }
    }
    v
}

fn last_state(log: &str) -> Option<(String, String)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("kairos-p2p: leader="))?;
    let mut leader = None;
    let mut role = None;
    for kv in line.split_whitespace() {
        if let Some(x) = kv.strip_prefix("leader=") {
            leader = Some(x.to_owned());
        }
        if let Some(x) = kv.strip_prefix("role=") {
            role = Some(x.to_owned());
        }
    }
    Some((leader?, role?))
}

fn last_vpn(log: &str) -> Option<String> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("kairos-p2p: vpn interface="))?;
    Some(line.split("address=").nth(1)?.split('/').next()?.to_owned())
}

/// Every live node has a role and follows one leader, which is a live node.
fn converged(mesh: &Mesh, v: &View, live: &[bool]) -> bool {
    let Some((leader, n)) = v.leaders.iter().next() else {
        return false;
    };
    v.leaders.len() == 1
        && *n == v.live
        && v.with_role == v.live
        && mesh
            .nodes
            .iter()
            .enumerate()
            .any(|(i, node)| live[i] && node.uuid() == *leader)
}

/// Invariant breaches seen in a view: two masters, one VPN address on two live nodes.
fn breaches(v: &View) -> Vec<String> {
    let mut out = Vec::new();
    if v.masters.len() > 1 {
        out.push(format!("{} live masters: {:?}", v.masters.len(), v.masters));
    }
    for (ip, nodes) in &v.vpn {
        if nodes.len() > 1 {
            out.push(format!("VPN address {ip} on nodes {nodes:?}"));
        }
    }
    out
}

struct Row {
    n: usize,
    roles_s: f64,
    leader_s: f64,
    /// Time from start until every sampled pair pinged (pairs), or what failed.
    ping: String,
    rss_mean_mb: f64,
    rss_max_mb: f64,
    cpu_pct: f64,
    traffic_b_s: f64,
    churn: String,
}

/// eth0 rx + tx bytes of node `i`'s namespace.
fn eth0_bytes(mesh: &Mesh, i: usize) -> Option<u64> {
    let mut sum = 0;
    for what in ["rx_bytes", "tx_bytes"] {
        let p = format!("/sys/class/net/eth0/statistics/{what}");
        sum += mesh
            .exec(i, &["cat", &p])
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()?;
    }
    Some(sum)
}

/// Poll until `done` holds for the live nodes, checking the invariants on every look;
/// the time it took.
/// What the checks keep over a run: breaches, and every node that was ever a master.
#[derive(Default)]
struct Seen {
    bad: Vec<String>,
    masters: BTreeSet<String>,
}

fn until(
    mesh: &Mesh,
    what: &str,
    live: &[bool],
    since: &[usize],
    seen: &mut Seen,
    mut done: impl FnMut(&View) -> bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        let v = view(mesh, live, since);
        seen.masters.extend(v.masters.iter().cloned());
        let bad = &mut seen.bad;
        for b in breaches(&v) {
            if !bad.contains(&b) {
                eprintln!("mesh-scale: INVARIANT BROKEN ({what}): {b}");
                bad.push(b);
            }
        }
        if done(&v) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > LIMIT {
            bail!("timed out after {LIMIT:?} waiting for {what}: {v:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn run(agent: &std::path::Path, label: &str, n: usize, rng: &mut Rng) -> Result<Row> {
    eprintln!("mesh-scale: {n} nodes: setting up namespaces");
    let mut mesh = Mesh::with_prefix(agent, "kx", label, n)?;
    let mut live = vec![true; n];
    let mut since = vec![0usize; n];
    let mut seen = Seen::default();
    mesh.start_all()?;
    let t0 = mesh.started;

    // Roles: one leader followed by all, every node with a role.
    until(&mesh, "all roles", &live, &since, &mut seen, |v| {
        converged(&mesh, v, &live)
    })?;
    let roles_s = t0.elapsed().as_secs_f64();
    eprintln!("mesh-scale: {n} nodes: all roles assigned after {roles_s:.1} s");

    // VPN: every node up with an address; every (sampled) pair pings.
    until(&mesh, "VPN addresses", &live, &since, &mut seen, |v| {
        v.vpn.values().map(Vec::len).sum::<usize>() == n
    })?;
    let vpn_up = t0.elapsed();
    let ips: Vec<String> = mesh
        .nodes
        .iter()
        .map(|x| x.vpn_ip().context("VPN address"))
        .collect::<Result<_>>()?;
    let pairs: Vec<(usize, usize)> = if n <= ALL_PAIRS_UP_TO {
        (0..n)
            .flat_map(|a| (0..n).filter(move |b| *b != a).map(move |b| (a, b)))
            .collect()
    } else {
        (0..n)
            .flat_map(|a| {
                let mut out = Vec::new();
                while out.len() < PAIRS_PER_NODE {
                    let b = rng.below(n);
                    if b != a && !out.contains(&(a, b)) {
                        out.push((a, b));
                    }
                }
                out
            })
            .collect()
    };
    // Idle figures: CPU and eth0 traffic over a window, RSS at its end.
    let before: Vec<(f64, Option<u64>)> = (0..n)
        .map(|i| {
            (
                mesh.nodes[i].usage().map(|u| u.0).unwrap_or(0.0),
                eth0_bytes(&mesh, i),
            )
        })
        .collect();
    let w0 = Instant::now();
    std::thread::sleep(WINDOW);
    let mut cpu = 0.0;
    let mut traffic = 0.0;
    let mut rss = Vec::new();
    for (i, (c0, b0)) in before.iter().enumerate() {
        let (c1, r) = mesh.nodes[i].usage().context("agent gone from /proc")?;
        cpu += c1 - c0;
        rss.push(r as f64 / 1e6);
        if let (Some(b0), Some(b1)) = (b0, eth0_bytes(&mesh, i)) {
            traffic += (b1 - b0) as f64;
        }
    }
    let secs = w0.elapsed().as_secs_f64();
    let cpu_pct = cpu / secs / n as f64 * 100.0;
    let traffic_b_s = traffic / secs / n as f64;
    let rss_mean_mb = rss.iter().sum::<f64>() / n as f64;
    let rss_max_mb = rss.iter().cloned().fold(0.0, f64::max);

    // Pings: every pair retried until it answers; given up after `LIMIT` (the figure then
    // says how many answered).
    let mut left = pairs.clone();
    let p0 = Instant::now();
    while !left.is_empty() && p0.elapsed() < LIMIT {
        let mut still = Vec::new();
        for (a, b) in left {
            if p0.elapsed() > LIMIT
                || mesh
                    .exec(
                        a,
                        &["ping", "-c", "1", "-W", "1", "-I", "edgevpn0", &ips[b]],
                    )
                    .is_err()
            {
                still.push((a, b));
            }
        }
        left = still;
    }
    let ping = if left.is_empty() {
        // From the start, leaving out the idle window measured in between.
        format!(
            "{:.1} s ({})",
            vpn_up.as_secs_f64() + p0.elapsed().as_secs_f64(),
            pairs.len()
        )
    } else {
        format!(
            "{} of {} pairs failed for {} s",
            left.len(),
            pairs.len(),
            LIMIT.as_secs()
        )
    };
    eprintln!("mesh-scale: {n} nodes: pings over edgevpn0: {ping}");

    // Failover: kill the leader; the others agree on another one.
    let leader = view(&mesh, &live, &since)
        .leaders
        .keys()
        .next()
        .cloned()
        .context("no leader")?;
    let li = (0..n)
        .find(|i| mesh.nodes[*i].uuid() == leader)
        .context("the leader is none of the nodes")?;
    mesh.stop(li);
    live[li] = false;
    let leader_s = until(&mesh, "a new leader", &live, &since, &mut seen, |v| {
        v.leaders.len() == 1 && !v.leaders.contains_key(&leader) && converged(&mesh, v, &live)
    })?
    .as_secs_f64();
    eprintln!("mesh-scale: {n} nodes: new leader {leader_s:.1} s after the leader was killed");
    since[li] = mesh.nodes[li].log().len();
    mesh.start(li)?;
    live[li] = true;
    until(
        &mesh,
        "the old leader back",
        &live,
        &since,
        &mut seen,
        |v| v.reporting == n && converged(&mesh, v, &live),
    )?;

    // Churn: kill 20 % at random, wait for the rest to converge, restart them, wait for all.
    let k = (n / 5).max(1);
    let mut churn_times = Vec::new();
    for round in 1..=CHURN_ROUNDS {
        let victims = rng.pick(n, k);
        for &i in &victims {
            mesh.stop(i);
            live[i] = false;
        }
        let down = until(
            &mesh,
            "the rest after a kill",
            &live,
            &since,
            &mut seen,
            |v| converged(&mesh, v, &live),
        )?;
        for &i in &victims {
            since[i] = mesh.nodes[i].log().len();
            mesh.start(i)?;
            live[i] = true;
        }
        let up = until(
            &mesh,
            "all after a restart",
            &live,
            &since,
            &mut seen,
            |v| {
                v.reporting == n
                    && v.vpn.values().map(Vec::len).sum::<usize>() == n
                    && converged(&mesh, v, &live)
            },
        )?;
        eprintln!(
            "mesh-scale: {n} nodes: churn round {round}: killed {victims:?}; rest converged in {:.1} s, all back in {:.1} s",
            down.as_secs_f64(),
            up.as_secs_f64()
        );
        churn_times.push(down.max(up).as_secs_f64());
    }
    let worst = churn_times.iter().cloned().fold(0.0, f64::max);
    // Roles are not taken back, but a master gone longer than its TTL loses its entry: the
    // count says whether the master moved to another node over the run.
    let churn = if seen.bad.is_empty() {
        format!(
            "held ({CHURN_ROUNDS}×{k} nodes, converged ≤ {worst:.1} s, {} node(s) were master)",
            seen.masters.len()
        )
    } else {
        format!("BROKEN: {}", seen.bad.join("; "))
    };
    Ok(Row {
        n,
        roles_s,
        leader_s,
        ping,
        rss_mean_mb,
        rss_max_mb,
        cpu_pct,
        traffic_b_s,
        churn,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut sizes = vec![10, 25, 50];
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nodes" => {
                sizes = it
                    .next()
                    .context("--nodes needs a list, e.g. 10,25,50")?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().context("--nodes: not a number"))
                    .collect::<Result<_>>()?;
            }
            other => bail!("unknown argument {other} (usage: mesh-scale [--nodes 10,25,50])"),
        }
    }
    if sizes.iter().any(|n| *n < 2 || *n > 250) {
        bail!("--nodes: each N must be 2..=250 (one /24 for the LAN)");
    }
    require_root();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let _neigh = NeighLimits::raise(largest)?;
    let agent = bench_agent()?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("mesh-scale: seed {seed}");
    let mut rng = Rng(seed);
    let mut rows = Vec::new();
    for (idx, n) in sizes.iter().enumerate() {
        let label = format!("{}", (b'a' + (idx % 26) as u8) as char);
        let load0 = loadavg();
        match run(&agent, &label, *n, &mut rng) {
            Ok(r) => rows.push((r, load0)),
            Err(e) => {
                eprintln!("mesh-scale: {n} nodes: {e:#}");
                println!(
                    "BENCH mesh-scale N={n}: did not complete: {}",
                    first_line(&e)
                );
            }
        }
    }
    println!(
        "BENCH mesh-scale (announce_interval 1 s; load at start of each N)\n| N | all roles | new leader | ping over edgevpn0 (pairs) | RSS per node mean / max | CPU per node | mesh traffic per node | churn invariants | load |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (r, load) in &rows {
        println!(
            "| {} | {:.1} s | {:.1} s | {} | {:.1} / {:.1} MB | {:.1} % | {:.1} kB/s | {} | {} |",
            r.n,
            r.roles_s,
            r.leader_s,
            r.ping,
            r.rss_mean_mb,
            r.rss_max_mb,
            r.cpu_pct,
            r.traffic_b_s / 1e3,
            r.churn,
            load
        );
    }
    if rows.len() < sizes.len() {
        bail!("not every N completed (see above)");
    }
    Ok(())
}

/// The kernel's IPv4 neighbour (ARP) table is one table for every namespace, its hard limit
/// `gc_thresh3` (1024 by default) shared by all: N namespaces hold up to N − 1 LAN neighbours
/// each, and as many `edgevpn0` ones, about 2·N² in all. At 50 nodes it overflowed ("neighbor
/// table overflow!" in dmesg): new connections failed with "No route to host" and `ping` on
/// `edgevpn0` with ENOBUFS. Raised for the run, put back after.
struct NeighLimits {
    old: Vec<(String, String)>,
}

const NEIGH: &str = "/proc/sys/net/ipv4/neigh/default";

impl NeighLimits {
    fn raise(n: usize) -> Result<NeighLimits> {
        let want = 4 * n * n;
        let mut old = Vec::new();
        for (name, v) in [
            ("gc_thresh1", want / 4),
            ("gc_thresh2", want / 2),
            ("gc_thresh3", want),
        ] {
            let path = format!("{NEIGH}/{name}");
            let cur = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {path}"))?
                .trim()
                .to_owned();
            if cur.parse::<usize>().unwrap_or(0) >= v {
                continue;
            }
            std::fs::write(&path, v.to_string()).with_context(|| format!("writing {path}"))?;
            eprintln!(
                "mesh-scale: {path} {cur} -> {v} for the run (ARP table shared by all namespaces)"
            );
            old.push((path, cur));
        }
        Ok(NeighLimits { old })
    }
}

impl Drop for NeighLimits {
    fn drop(&mut self) {
        for (path, v) in &self.old {
            let _ = std::fs::write(path, v);
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or("").to_owned()
}
