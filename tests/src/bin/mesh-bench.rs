//! Benchmark (not a test): TCP throughput between two mesh nodes over the VPN (`edgevpn0`,
//! libp2p streams) next to the plain veth link between the same two namespaces, in one run.
//!
//! `cargo run --release -p kairos-tests --bin mesh-bench [-- SECONDS]` as root. The binary is
//! its own sender and receiver (`--recv PORT`, `--send ADDR:PORT SECS`) inside the namespaces.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kairos_tests::mesh::{Mesh, bench_agent, require_root};

const PORT: u16 = 5201;

/// Accept one connection, count bytes until it closes, print `RECV <bytes> <secs>`.
fn recv(port: u16) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port)).context("binding the receiver")?;
    println!("READY");
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let t0 = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    println!("RECV {total} {:.3}", t0.elapsed().as_secs_f64());
    Ok(())
}

fn send(addr: &str, secs: u64) -> Result<()> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let buf = vec![0x5au8; 128 * 1024];
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        s.write_all(&buf)?;
    }
    Ok(())
}

/// One direction's figures.
struct Run {
    mb_s: f64,
    /// Packets the sender's interface handed on (for the TUN: reads by the agent), per s.
    pkts_s: f64,
    bytes_per_pkt: f64,
    /// CPU seconds both agents spent, per packet (µs); 0 for the veth.
    agent_us_per_pkt: f64,
}

/// `tx_packets` and `tx_bytes` of `iface` in node `i`'s namespace (with GSO, a packet is
/// what the stack handed the device in one go, up to 64 KiB).
fn tx_counters(mesh: &Mesh, i: usize, iface: &str) -> Result<(u64, u64)> {
    let read = |what: &str| -> Result<u64> {
        let path = format!("/sys/class/net/{iface}/statistics/{what}");
        Ok(mesh.exec(i, &["cat", &path])?.trim().parse()?)
    };
    Ok((read("tx_packets")?, read("tx_bytes")?))
}

fn agents_cpu(mesh: &Mesh) -> f64 {
    mesh.nodes
        .iter()
        .filter_map(|n| n.usage())
        .map(|(cpu, _)| cpu)
        .sum()
}

/// Run a receiver in node 1's namespace and a sender in node 0's, towards `addr` over
/// `iface`.
fn measure(mesh: &Mesh, addr: &str, iface: &str, secs: u64) -> Result<Run> {
    let (p0, b0) = tx_counters(mesh, 0, iface)?;
    let cpu0 = agents_cpu(mesh);
    let t0 = Instant::now();
    let me = std::env::current_exe()?;
    let me = me.to_str().context("non-UTF-8 executable path")?;
    let mut rx = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &mesh.nodes[1].ns,
            me,
            "--recv",
            &PORT.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = rx.stdout.take().context("receiver stdout")?;
    let mut ready = [0u8; 6];
    out.read_exact(&mut ready)?;
    mesh.exec(
        0,
        &[me, "--send", &format!("{addr}:{PORT}"), &secs.to_string()],
    )?;
    let mut rest = String::new();
    out.read_to_string(&mut rest)?;
    rx.wait()?;
    let line = rest
        .lines()
        .find(|l| l.starts_with("RECV"))
        .context("receiver result")?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let bytes: f64 = f.get(1).context("bytes")?.parse()?;
    let t: f64 = f.get(2).context("secs")?.parse()?;
    let wall = t0.elapsed().as_secs_f64();
    let (p1, b1) = tx_counters(mesh, 0, iface)?;
    let cpu = agents_cpu(mesh) - cpu0;
    let pkts = (p1 - p0).max(1) as f64;
    Ok(Run {
        mb_s: bytes / t / 1e6,
        pkts_s: pkts / wall,
        bytes_per_pkt: (b1 - b0) as f64 / pkts,
        agent_us_per_pkt: if iface == "eth0" {
            0.0
        } else {
            cpu / pkts * 1e6
        },
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--recv") => return recv(args.get(2).context("port")?.parse()?),
        Some("--send") => {
            return send(
                args.get(2).context("addr")?,
                args.get(3).context("secs")?.parse()?,
            );
        }
        _ => {}
    }
    let secs: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    require_root();
    let agent = bench_agent()?;
    let mut mesh = Mesh::with_prefix(&agent, "kx", "b", 2)?;
    mesh.start_all()?;
    let ips: Vec<String> = mesh.wait("VPN addresses", Duration::from_secs(60), |m| {
        m.nodes
            .iter()
            .map(|n| n.vpn_ip())
            .collect::<Option<Vec<_>>>()
    })?;
    mesh.wait("ping over the VPN", Duration::from_secs(30), |m| {
        m.exec(0, &["ping", "-c", "1", "-W", "1", &ips[1]]).ok()
    })?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let veth = measure(&mesh, &mesh.nodes[1].lan_ip.clone(), "eth0", secs)?;
    let vpn = measure(&mesh, &ips[1], "edgevpn0", secs)?;
    if vpn.mb_s <= 0.0 {
        bail!("no throughput over the VPN");
    }
    println!(
        "BENCH mesh throughput ({secs} s TCP each, same run, load {}): veth {:.1} MB/s, VPN over libp2p {:.1} MB/s ({:.1}% of veth)",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        veth.mb_s,
        vpn.mb_s,
        vpn.mb_s / veth.mb_s * 100.0
    );
    for (name, r) in [("veth", &veth), ("VPN", &vpn)] {
        println!(
            "BENCH mesh {name} per packet: {:.0} packets/s, {:.0} bytes/packet, {:.2} µs/packet{}",
            r.pkts_s,
            r.bytes_per_pkt,
            1e6 / r.pkts_s,
            if r.agent_us_per_pkt > 0.0 {
                format!(
                    ", agents' CPU {:.2} µs/packet (sender and receiver together)",
                    r.agent_us_per_pkt
                )
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
