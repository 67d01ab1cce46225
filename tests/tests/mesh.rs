//! The P2P mesh (issue 5) on this machine: nodes in network namespaces on a bridge, each with
//! only the network token, elect a leader, take roles, start a stand-in K3s against the
//! master, lease VPN addresses and ping each other over `edgevpn0`, keep their lease across a
//! restart, and elect a new leader when the leader disappears. Needs root.

use std::path::Path;
use std::time::{Duration, Instant};

use kairos_tests::diskimg::Mounted;
use kairos_tests::mesh::{Mesh, build_agent, build_forger, require_root};
use kairos_tests::run_ok;

#[test]
fn three_nodes_roles_k3s_vpn_restart_and_failover() {
    require_root();
    let agent = build_agent().expect("building kairos-agent");
    let mut mesh = Mesh::new(&agent, "m", 3).expect("setting up namespaces");
    mesh.start_all().expect("starting the nodes");

    // 1. Roles: one leader everyone agrees on, exactly one master, the others workers.
    let roles = mesh
        .wait("all roles assigned", Duration::from_secs(90), |m| {
            let states: Vec<(String, String)> =
                m.nodes.iter().map(|n| n.state()).collect::<Option<_>>()?;
            let leader = &states[0].0;
            (states.iter().all(|(l, r)| l == leader && r != "none")).then_some(states)
        })
        .unwrap();
    let figure = mesh.started.elapsed();
    println!(
        "FIGURE mesh: all roles assigned in {:.1} s",
        figure.as_secs_f64()
    );
    let leader = roles[0].0.clone();
    assert!(
        mesh.nodes.iter().any(|n| n.uuid() == leader),
        "leader {leader} is one of the nodes"
    );
    let masters: Vec<usize> = (0..3).filter(|i| roles[*i].1 == "master").collect();
    assert_eq!(
        masters.len(),
        1,
        "exactly one master: {roles:?}\n{}",
        mesh.logs()
    );
    let master = masters[0];
    assert!(
        (0..3)
            .filter(|i| *i != master)
            .all(|i| roles[i].1 == "worker"),
        "{roles:?}"
    );

    // 2. VPN: distinct addresses on every node.
    let ips: Vec<String> = mesh
        .wait("VPN addresses", Duration::from_secs(30), |m| {
            m.nodes
                .iter()
                .map(|n| n.vpn_ip())
                .collect::<Option<Vec<_>>>()
        })
        .unwrap();
    let mut uniq = ips.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 3, "distinct VPN addresses: {ips:?}");
    for ip in &ips {
        assert!(ip.starts_with("10.1.0."), "{ip} in 10.1.0.0/24");
    }

    // 3. K3s: the master's stand-in ran as a server on the VPN; the workers' as agents
    //    against its VPN address with its node token.
    let master_url = format!("https://{}:6443", ips[master]);
    let master_token = format!("K10token-of-node{master}::server:s3cret");
    let server = mesh
        .wait("the master's k3s server", Duration::from_secs(30), |m| {
            m.nodes[master].record("server")
        })
        .unwrap();
    assert!(server.contains("--flannel-iface=edgevpn0"), "{server}");
    assert!(
        server.contains(&format!("--node-ip={}", ips[master])),
        "{server}"
    );
    for w in (0..3).filter(|i| *i != master) {
        let rec = mesh
            .wait("a worker's k3s agent", Duration::from_secs(30), |m| {
                m.nodes[w].record("agent")
            })
            .unwrap();
        assert!(rec.contains(&format!("K3S_URL={master_url}")), "{rec}");
        assert!(rec.contains(&format!("K3S_TOKEN={master_token}")), "{rec}");
        assert!(rec.contains("--flannel-iface=edgevpn0"), "{rec}");
        assert!(rec.contains(&format!("--node-ip={}", ips[w])), "{rec}");
        assert!(
            mesh.nodes[w].record("server").is_none(),
            "a worker runs no server"
        );
    }

    // 4. Ping between every pair over edgevpn0.
    let t_ping = Instant::now();
    for a in 0..3 {
        for (b, ip) in ips.iter().enumerate() {
            if a == b {
                continue;
            }
            mesh.wait(
                &format!("ping node{a} -> {ip}"),
                Duration::from_secs(20),
                |m| {
                    m.exec(a, &["ping", "-c", "1", "-W", "1", "-I", "edgevpn0", ip])
                        .ok()
                },
            )
            .unwrap();
        }
    }
    println!(
        "FIGURE mesh: 6 pings over edgevpn0 in {:.1} s",
        t_ping.elapsed().as_secs_f64()
    );

    // 5. A restarted node keeps its lease (the file and the address it comes up with).
    let r = (0..3)
        .find(|i| mesh.nodes[*i].uuid() != leader)
        .unwrap_or(0);
    let lease_file = mesh.nodes[r].root.join("usr/local/.kairos/lease");
    let before = std::fs::read_to_string(&lease_file).expect("lease file written");
    assert_eq!(before.trim(), ips[r]);
    mesh.stop(r);
    let log_len = mesh.nodes[r].log().len();
    mesh.start(r).unwrap();
    let again = mesh
        .wait(
            "the restarted node's VPN address",
            Duration::from_secs(30),
            |m| {
                let log = m.nodes[r].log();
                log.get(log_len..)?
                    .contains("vpn interface=")
                    .then(|| m.nodes[r].vpn_ip())?
            },
        )
        .unwrap();
    assert_eq!(again, ips[r], "same lease after restart");
    mesh.wait("ping to the restarted node", Duration::from_secs(20), |m| {
        let other = (r + 1) % 3;
        m.exec(other, &["ping", "-c", "1", "-W", "1", &ips[r]]).ok()
    })
    .unwrap();

    // 6. The leader's namespace goes away: the others agree on a new leader, in bounded time.
    let li = (0..3).find(|i| mesh.nodes[*i].uuid() == leader).unwrap();
    let t0 = Instant::now();
    mesh.delete_node(li);
    let rest: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let new_leader = mesh
        .wait("a new leader", Duration::from_secs(30), |m| {
            let s: Vec<String> = rest
                .iter()
                .map(|i| m.nodes[*i].state().map(|s| s.0))
                .collect::<Option<_>>()?;
            (s[0] == s[1] && s[0] != leader).then(|| s[0].clone())
        })
        .unwrap();
    let took = t0.elapsed();
    println!(
        "FIGURE mesh: new leader elected {:.1} s after the leader's namespace was deleted",
        took.as_secs_f64()
    );
    assert!(rest.iter().any(|i| mesh.nodes[*i].uuid() == new_leader));
    assert!(took < Duration::from_secs(15), "failover took {took:?}");
}

/// A node with a forged token — the same room, rendezvous and mDNS names, so it is on the
/// same gossipsub topic and connected, but another crypto key — learns nothing from the
/// ledger and cannot write to it: the others drop its messages with a log line and carry on.
#[test]
fn wrong_token_node_learns_nothing_and_counts_for_nothing() {
    require_root();
    let agent = build_agent().expect("building kairos-agent");
    let mut mesh = Mesh::new(&agent, "w", 3).expect("setting up namespaces");
    // Node 2's token: the mesh's with the crypto key swapped (the second `key:` line).
    let forged = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo '{}' | base64 -d | awk '/key:/ {{ n++; if (n == 2) {{ print \"    key: forgedforgedforgedforgedforgedforgedforged1\"; next }} }} {{ print }}' | base64 -w0",
            mesh.token
        ))
        .output()
        .expect("forging a token");
    let forged = String::from_utf8_lossy(&forged.stdout).trim().to_owned();
    assert!(!forged.is_empty() && forged != mesh.token);
    let cfg = mesh.nodes[2].root.join("config.yaml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&mesh.token, &forged);
    std::fs::write(&cfg, text).unwrap();
    mesh.start_all().unwrap();
    let states = mesh
        .wait("roles in the two-node mesh", Duration::from_secs(90), |m| {
            let s: Vec<(String, String)> = m.nodes[..2]
                .iter()
                .map(|n| n.state())
                .collect::<Option<_>>()?;
            (s[0].0 == s[1].0 && s.iter().all(|(_, r)| r != "none")).then_some(s)
        })
        .unwrap();
    // Give the stranger a few more announce rounds to (not) learn anything.
    std::thread::sleep(Duration::from_secs(4));
    let stranger = mesh.nodes[2].uuid();
    assert_ne!(states[0].0, stranger);
    let log2 = mesh.nodes[2].log();
    for n in &mesh.nodes[..2] {
        assert!(
            !log2.contains(&n.uuid()),
            "the stranger learnt a node UUID:\n{log2}"
        );
        assert!(
            !n.log().contains(&stranger),
            "a node saw the stranger:\n{}",
            n.log()
        );
    }
    // Each side dropped the other's messages, saying why.
    for n in &mesh.nodes {
        let log = n.log();
        assert!(
            log.contains("ledger: dropped a message from")
                && log.contains("does not authenticate with this network's key"),
            "no drop logged by {}:\n{log}",
            n.ns
        );
    }
    // Alone in its own network it is its own leader and never gets a role (minimum 2).
    assert_eq!(
        mesh.nodes[2].state(),
        Some((stranger.clone(), "none".into()))
    );
    assert!(mesh.nodes[2].record("server").is_none() && mesh.nodes[2].record("agent").is_none());
}

/// A node with the network token forges ledger entries (issue 15, item 8): the two honest
/// nodes ignore each forged entry with a log line saying why, and keep their leader, roles,
/// VPN addresses, K3s join data and routes. The forger (agent/p2p/examples/mesh-forger.rs)
/// writes another node's role and lease, the primary server's VPN address as its own lease,
/// `k3s/url` and `k3s/token`, an entry claiming another node as its owner, a permanent TTL
/// and a stamp a year ahead.
#[test]
fn token_holder_forgeries_are_ignored() {
    require_root();
    let agent = build_agent().expect("building kairos-agent");
    let forger = build_forger().expect("building the mesh forger");
    let mut mesh = Mesh::new(&agent, "f", 3).expect("setting up namespaces");
    mesh.started = Instant::now();
    mesh.start(0).unwrap();
    mesh.start(1).unwrap();
    let roles = mesh
        .wait("roles in the two-node mesh", Duration::from_secs(60), |m| {
            let s: Vec<(String, String)> = m.nodes[..2]
                .iter()
                .map(|n| n.state())
                .collect::<Option<_>>()?;
            (s[0].0 == s[1].0 && s.iter().all(|(_, r)| r != "none")).then_some(s)
        })
        .unwrap();
    let master = (0..2).find(|i| roles[*i].1 == "master").expect("a master");
    let worker = 1 - master;
    let ips: Vec<String> = mesh
        .wait("VPN addresses", Duration::from_secs(30), |m| {
            m.nodes[..2].iter().map(|n| n.vpn_ip()).collect()
        })
        .unwrap();
    let joined = mesh
        .wait("the worker's k3s agent", Duration::from_secs(30), |m| {
            m.nodes[worker].record("agent")
        })
        .unwrap();

    mesh.start_program(2, &forger).unwrap();
    let line = mesh
        .wait("the forger at work", Duration::from_secs(30), |m| {
            let log = m.nodes[2].log();
            log.lines()
                .find(|l| l.starts_with("FORGER "))
                .map(str::to_owned)
        })
        .unwrap();
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_default()
            .to_owned()
    };
    let (fpeer, fuuid, victim) = (field("peer="), field("uuid="), field("victim="));
    let forged_ip = field("forged_ip=");
    assert!(
        forged_ip.starts_with("10.1.0.") && !ips.contains(&forged_ip),
        "{line}"
    );
    assert_eq!(victim, mesh.nodes[worker].uuid(), "{line}");
    // Each forgery, and the reason the honest nodes give for ignoring it.
    let expected = [
        (
            format!("roles/{fuuid}"),
            "ttl of 18446744073709551615 ms exceeds the cap",
        ),
        (format!("pairing/{fpeer}"), "ms ahead of local time"),
        (format!("vpn/lease/{fuuid}"), "is leased by node"),
        (format!("vpn/lease/{victim}"), "that node's own key"),
        (format!("roles/{victim}"), "only the leader"),
        ("k3s/url".into(), "only from the primary server"),
        ("k3s/token".into(), "only from the primary server"),
        ("k3s/master-ip".into(), "is not the peer that sent it"),
    ];
    let t0 = Instant::now();
    for n in 0..2 {
        mesh.wait(
            &format!("node{n} ignoring every forged entry"),
            Duration::from_secs(20),
            |m| {
                let log = m.nodes[n].log();
                expected
                    .iter()
                    .all(|(k, why)| {
                        log.lines().any(|l| {
                            l.contains(&format!("ledger: ignored {k} from {fpeer}: "))
                                && l.contains(why)
                        })
                    })
                    .then_some(())
            },
        )
        .unwrap();
    }
    // A few more rounds of forgeries before looking at the honest nodes' state.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(t0.elapsed()));
    for n in 0..2 {
        let node = &mesh.nodes[n];
        let log = node.log();
        assert_eq!(node.state(), Some(roles[n].clone()), "{log}");
        assert_eq!(node.vpn_ip().as_deref(), Some(ips[n].as_str()), "{log}");
        for forged in [forged_ip.as_str(), "K10forged", "also claimed", "clashes"] {
            assert!(!log.contains(forged), "node{n} took {forged:?}:\n{log}");
        }
        // Each refusal is logged once (a minute), not on every forged message.
        let k3s_url = format!("ledger: ignored k3s/url from {fpeer}");
        assert_eq!(log.matches(&k3s_url).count(), 1, "{log}");
    }
    assert_eq!(mesh.nodes[worker].record("agent"), Some(joined));
    // The forger's own node announcement is fine: it is a member, so it gets a role.
    assert!(
        mesh.nodes[master]
            .log()
            .contains(&format!("roles/{fuuid} = worker"))
            || mesh.nodes[worker]
                .log()
                .contains(&format!("roles/{fuuid} = worker")),
        "{}",
        mesh.logs()
    );
    // Traffic to the master's address still reaches the master over the VPN.
    mesh.wait("ping worker -> master", Duration::from_secs(10), |m| {
        m.exec(
            worker,
            &["ping", "-c", "1", "-W", "1", "-I", "edgevpn0", &ips[master]],
        )
        .ok()
    })
    .unwrap();
    println!(
        "FIGURE mesh: forgeries ignored, whole test {:.1} s",
        mesh.started.elapsed().as_secs_f64()
    );
}

/// A loop device on a sparse file, detached (and the file removed) on drop.
struct LoopDisk(String, std::path::PathBuf);

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// QR pairing: a node in install mode saves its token as a PNG QR code; `register` with that
/// PNG, run in another namespace, delivers a config and a device; the node acknowledges and
/// installs to that device (a loop device here) from the config's install.source, with the
/// config on COS_OEM.
#[test]
fn qr_pairing_delivers_the_config() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    require_root();
    let agent = build_agent().expect("building kairos-agent");
    let mesh = Mesh::new(&agent, "q", 2).expect("setting up namespaces");
    let node = &mesh.nodes[0];

    // The target: a sparse 4 GiB disk.
    let img = mesh.dir.join("disk.img");
    run_ok(
        std::process::Command::new("truncate")
            .args(["-s", "4G"])
            .arg(&img),
    );
    let dev = run_ok(
        std::process::Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(&img),
    )
    .trim()
    .to_owned();
    let _disk = LoopDisk(dev.clone(), img.clone());
    // What the installer reads under --root: the block devices in sysfs and /dev, this
    // process's mounts and swaps (no /sys/firmware/efi: a BIOS install).
    for (link, to) in [
        ("dev", "/dev"),
        ("sys/block", "/sys/block"),
        ("sys/class/block", "/sys/class/block"),
        ("sys/dev/block", "/sys/dev/block"),
        ("proc/self", "/proc/self"),
        ("proc/swaps", "/proc/swaps"),
    ] {
        let l = node.root.join(link);
        std::fs::create_dir_all(l.parent().unwrap()).unwrap();
        symlink(to, &l).unwrap();
    }
    // A small source tree carrying BIOS GRUB, as an image does.
    let src = mesh.dir.join("source");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("usr/lib/grub")).unwrap();
    std::fs::write(src.join("etc/os-release"), "ID=kairos-paired-test\n").unwrap();
    run_ok(
        std::process::Command::new("cp")
            .args(["-a", "/usr/lib/grub/i386-pc"])
            .arg(src.join("usr/lib/grub/")),
    );

    let log = std::fs::File::create(node.root.join("pair.log")).unwrap();
    let mut pair = std::process::Command::new("ip")
        .args(["netns", "exec", &node.ns])
        .arg(&agent)
        .arg("--root")
        .arg(&node.root)
        // The request asks for a reboot; this is the test machine.
        .args(["p2p", "pair", "--timeout", "120", "--no-reboot"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let png = node.root.join("run/kairos/pairing-qr.png");
    let pair_log = node.root.join("pair.log");
    let waited = mesh.wait("the QR code", Duration::from_secs(20), |_| {
        let shown = std::fs::read_to_string(&pair_log).unwrap_or_default();
        (png.exists() && shown.contains("scan this code")).then_some(())
    });
    if let Err(e) = waited {
        let _ = pair.kill();
        panic!("{e}");
    }
    // The console shows the code with block characters, and the PNG decodes to the token.
    let shown = std::fs::read_to_string(node.root.join("pair.log")).unwrap_or_default();
    assert!(shown.contains('█') || shown.contains('▀'), "{shown}");
    let cc = format!(
        "#cloud-config\nhostname: paired-node\ninstall:\n  source: dir:{}\n",
        src.display()
    );
    let cc_path = mesh.dir.join("cc.yaml");
    std::fs::write(&cc_path, &cc).unwrap();
    let reg = mesh.exec(
        1,
        &[
            agent.to_str().unwrap(),
            "--root",
            mesh.nodes[1].root.to_str().unwrap(),
            "register",
            "--config",
            cc_path.to_str().unwrap(),
            "--device",
            &dev,
            "--reboot",
            "--timeout",
            "90",
            png.to_str().unwrap(),
        ],
    );
    let t_install = Instant::now();
    let status = pair.wait().unwrap();
    let pair_log = std::fs::read_to_string(node.root.join("pair.log")).unwrap_or_default();
    let reg = reg.unwrap_or_else(|e| panic!("register failed: {e}\nnode:\n{pair_log}"));
    assert!(reg.contains("registered with node"), "{reg}");
    assert!(status.success(), "pair exited {status}:\n{pair_log}");
    for l in pair_log.lines().filter(|l| {
        l.starts_with("kairos-agent:")
            || l.starts_with("install:")
            || l.starts_with("kairos-p2p: paired")
    }) {
        println!("pair: {l}");
    }
    println!(
        "FIGURE pairing: pair finished installing {:.1} s after register was acknowledged",
        t_install.elapsed().as_secs_f64()
    );
    let got = std::fs::read_to_string(node.root.join("run/kairos/pairing/config.yaml")).unwrap();
    assert_eq!(got, cc);
    let req = std::fs::read_to_string(node.root.join("run/kairos/pairing/request.json")).unwrap();
    assert!(
        req.contains(&format!("\"device\": \"{dev}\"")) && req.contains("\"reboot\": true"),
        "{req}"
    );
    // The pair log says what it did.
    for want in [
        format!(
            "kairos-agent: pairing: installing to {dev} from dir:{}",
            src.display()
        ),
        format!("kairos-agent: pairing: installed to {dev}"),
        "--no-reboot: not rebooting".to_owned(),
    ] {
        assert!(pair_log.contains(&want), "no {want:?} in:\n{pair_log}");
    }

    // The disk has the Kairos partitions.
    let labels: Vec<String> = (2..=5)
        .map(|n| {
            run_ok(
                std::process::Command::new("blkid")
                    .args(["-p", "-s", "LABEL", "-o", "value"])
                    .arg(format!("{dev}p{n}")),
            )
            .trim()
            .to_owned()
        })
        .collect();
    assert_eq!(
        labels,
        ["COS_OEM", "COS_RECOVERY", "COS_STATE", "COS_PERSISTENT"],
        "{pair_log}"
    );
    // COS_OEM holds the paired config, root only.
    let oem = Mounted::device(Path::new(&format!("{dev}p2")));
    let custom = oem.path("90_custom.yaml");
    let on_oem = std::fs::read_to_string(&custom).unwrap();
    assert!(on_oem.contains("hostname: paired-node"), "{on_oem}");
    assert_eq!(on_oem, cc);
    let mode = std::fs::metadata(&custom).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}: mode {mode:o}", custom.display());
    assert!(oem.path("grubenv").is_file());
}

/// `p2p.auto.ha` with kube-vip and the user's K3s blocks (issue 19): five nodes, HA with two
/// extra masters. The leader makes one master/clusterinit, two master/ha and two workers; the
/// clusterinit stand-in runs `server --cluster-init`, the HA ones `server
/// --server=https://<clusterinit VPN IP>:6443` with its token, the workers `agent` with
/// K3S_URL/K3S_TOKEN; every server has `--tls-san=<kubevip.eip>` and kube-vip's manifest,
/// each node its own `k3s.args` / `k3s-agent.args` after the mesh's; workers hold the
/// kubeconfig the clusterinit master published (server URL its VPN address, mode 0600).
#[test]
fn ha_masters_and_workers_get_roles_user_args_kubevip_and_kubeconfig() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let agent = build_agent().expect("building kairos-agent");
    let mut mesh = Mesh::new(&agent, "h", 5).expect("setting up namespaces");
    let eip = "10.231.0.100";
    for (i, n) in mesh.nodes.iter().enumerate() {
        std::fs::write(
            n.root.join("config.yaml"),
            format!(
                "#cloud-config\np2p:\n  network_token: {}\n  network_id: hacluster\n  disable_dht: true\n  listen_port: 4001\n  vpn: {{interface: kvpn0, range: 10.77.0.0/24}}\n  announce_interval: 1\n  minimum_nodes: 5\n  auto:\n    ha:\n      enable: true\n      master_nodes: 2\nk3s:\n  args: ['--disable=traefik --node-label=server-of=node{i}']\n  env: {{HTTP_PROXY: 'http://proxy:3128'}}\nk3s-agent:\n  args: [--node-label=agent-of=node{i}]\nkubevip:\n  eip: {eip}\n  interface: eth0\n",
                mesh.token
            ),
        )
        .unwrap();
    }
    mesh.start_all().unwrap();
    let roles = mesh
        .wait("all five roles", Duration::from_secs(90), |m| {
            let s: Vec<(String, String)> =
                m.nodes.iter().map(|n| n.state()).collect::<Option<_>>()?;
            (s.iter().all(|(l, r)| *l == s[0].0 && r != "none")).then_some(s)
        })
        .unwrap();
    println!(
        "FIGURE mesh: HA roles for five nodes in {:.1} s",
        mesh.started.elapsed().as_secs_f64()
    );
    let with = |r: &str| -> Vec<usize> { (0..5).filter(|i| roles[*i].1 == r).collect() };
    let (ci, ha, workers) = (
        with("master/clusterinit"),
        with("master/ha"),
        with("worker"),
    );
    assert!(
        ci.len() == 1 && ha.len() == 2 && workers.len() == 2,
        "{roles:?}\n{}",
        mesh.logs()
    );
    let ci = ci[0];
    let ips: Vec<String> = mesh
        .wait("VPN addresses", Duration::from_secs(30), |m| {
            m.nodes.iter().map(|n| n.vpn_ip()).collect()
        })
        .unwrap();
    // The mesh's own keys: the VPN range and interface, the network id (the ledger topic),
    // the listen port, no DHT.
    for (i, ip) in ips.iter().enumerate() {
        let log = mesh.nodes[i].log();
        assert!(ip.starts_with("10.77.0."), "{ip}");
        for want in [
            format!("vpn interface=kvpn0 address={ip}/24"),
            format!("listening on /ip4/{}/tcp/4001", mesh.nodes[i].lan_ip),
            "dht: off (p2p.disable_dht)".into(),
        ] {
            assert!(log.contains(&want), "node{i}: no {want:?}:\n{log}");
        }
        assert!(
            log.contains("ledger: vpn/lease/"),
            "node{i} heard nothing on the hacluster topic:\n{log}"
        );
    }
    let url = format!("https://{}:6443", ips[ci]);
    let token = format!("K10token-of-node{ci}::server:s3cret");
    let tls_san = format!("--tls-san={eip}");
    let manifest = |i: usize| {
        std::fs::read_to_string(
            mesh.nodes[i]
                .root
                .join("var/lib/rancher/k3s/server/manifests/kubevip.yaml"),
        )
        .ok()
    };

    // The clusterinit master: a new cluster, kube-vip's SAN, its own args after the mesh's.
    let rec = mesh
        .wait("the clusterinit server", Duration::from_secs(30), |m| {
            m.nodes[ci].record("server")
        })
        .unwrap();
    let args = rec.lines().next().unwrap_or_default();
    let tail =
        format!("--cluster-init {tls_san} --disable=traefik --node-label=server-of=node{ci}");
    assert!(
        args.starts_with("args: server --flannel-iface=kvpn0") && args.ends_with(&tail),
        "{rec}"
    );
    assert!(!args.contains("--server"), "{rec}");
    // The HA masters join it with its token.
    for &h in &ha {
        let rec = mesh
            .wait("an HA server", Duration::from_secs(30), |m| {
                m.nodes[h].record("server")
            })
            .unwrap();
        let args = rec.lines().next().unwrap_or_default();
        let tail =
            format!("--server={url} {tls_san} --disable=traefik --node-label=server-of=node{h}");
        assert!(args.ends_with(&tail), "{rec}");
        assert!(!args.contains("--cluster-init"), "{rec}");
        assert!(rec.contains(&format!("K3S_TOKEN={token}\n")), "{rec}");
        assert!(mesh.nodes[h].record("agent").is_none());
    }
    // Every master has kube-vip's manifest for the EIP on eth0, and its RBAC.
    for &m in ha.iter().chain([&ci]) {
        let y = manifest(m).unwrap_or_else(|| panic!("no kube-vip manifest on node{m}"));
        assert!(
            y.contains(&format!("value: \"{eip}\"")) && y.contains("value: eth0"),
            "{y}"
        );
        assert!(
            mesh.nodes[m]
                .root
                .join("var/lib/rancher/k3s/server/manifests/kubevipmanifest.yaml")
                .is_file()
        );
    }
    // The workers: agents against the clusterinit master, their k3s-agent args, no
    // kube-vip; they hold the kubeconfig it published.
    for &w in &workers {
        let rec = mesh
            .wait("a worker's agent", Duration::from_secs(30), |m| {
                m.nodes[w].record("agent")
            })
            .unwrap();
        let args = rec.lines().next().unwrap_or_default();
        assert!(
            args.starts_with("args: agent --flannel-iface=kvpn0")
                && args.ends_with(&format!(" --node-label=agent-of=node{w}")),
            "{rec}"
        );
        assert!(!args.contains(eip), "{rec}");
        assert!(rec.contains(&format!("K3S_URL={url}\n")), "{rec}");
        assert!(rec.contains(&format!("K3S_TOKEN={token}\n")), "{rec}");
        assert!(mesh.nodes[w].record("server").is_none());
        assert!(manifest(w).is_none(), "kube-vip on worker node{w}");
        let kc_path = mesh.nodes[w].root.join("etc/rancher/k3s/k3s.yaml");
        let kc = mesh
            .wait("the published kubeconfig", Duration::from_secs(30), |_| {
                std::fs::read_to_string(&kc_path).ok()
            })
            .unwrap();
        assert_eq!(
            kc,
            kairos_tests::mesh::STAND_IN_KUBECONFIG.replace("https://127.0.0.1:6443", &url),
            "node{w}"
        );
        let mode = std::fs::metadata(&kc_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    println!(
        "FIGURE mesh: HA cluster of five formed, whole test {:.1} s",
        mesh.started.elapsed().as_secs_f64()
    );
}

/// This node's libp2p peer ID, from its `node uuid=… peer=…` line.
fn peer_id(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("kairos-p2p: node uuid="))?;
    Some(line.split("peer=").nth(1)?.trim().to_owned())
}

/// Across sites (issue 18): two sites, each behind its own NAT router (nftables masquerade),
/// and a public network between them with the bootstrap/relay node (`p2p.relay.server`). No
/// mDNS crosses the routers and nothing routes into a site, so the site nodes find each other
/// only through `p2p.bootstrap`: they reserve a slot on the relay, gossip through it, get roles,
/// and reach each other's VPN address over a relayed connection (DCUtR may then make it direct;
/// the log says which).
#[test]
fn sites_behind_nat_form_a_cluster_through_the_bootstrap_relay() {
    use kairos_tests::sites::Sites;
    require_root();
    let agent = build_agent().expect("building kairos-agent");
    let mut sites = Sites::new(&agent).expect("setting up the sites");
    // The sites really are cut off: no route from site A to site B's LAN.
    assert!(
        sites
            .mesh
            .exec(1, &["ping", "-c", "1", "-W", "1", "192.168.2.2"])
            .is_err(),
        "site A must not reach site B's LAN directly"
    );
    sites.mesh.start_all().expect("starting the nodes");
    let mesh = &sites.mesh;

    // 1. Roles across both sites, one leader all agree on, one master.
    let roles = mesh
        .wait("all roles assigned", Duration::from_secs(30), |m| {
            let states: Vec<(String, String)> =
                m.nodes.iter().map(|n| n.state()).collect::<Option<_>>()?;
            let leader = &states[0].0;
            (states.iter().all(|(l, r)| l == leader && r != "none")).then_some(states)
        })
        .unwrap();
    println!(
        "FIGURE sites: all roles assigned across two NATed sites in {:.1} s",
        mesh.started.elapsed().as_secs_f64()
    );
    assert_eq!(
        roles.iter().filter(|(_, r)| r == "master").count(),
        1,
        "{roles:?}"
    );
    let peers: Vec<String> = mesh
        .nodes
        .iter()
        .map(|n| peer_id(&n.log()).expect("every node logs its peer ID"))
        .collect();
    let relay_log = mesh.nodes[0].log();
    for n in [1, 2] {
        let log = mesh.nodes[n].log();
        assert!(
            log.contains(&format!("bootstrap: connected to {}", peers[0])),
            "node{n} dialled the bootstrap peer\n{log}"
        );
        assert!(
            log.contains(&format!("relay: reservation accepted by {}", peers[0])),
            "node{n} holds a reservation on the relay\n{log}"
        );
        assert!(
            relay_log.contains(&format!("relay server: reservation for {}", peers[n])),
            "{relay_log}"
        );
    }

    // 2. VPN between the sites: each site node pings the other's edgevpn0 address.
    let ips: Vec<String> = mesh
        .wait("VPN addresses", Duration::from_secs(15), |m| {
            m.nodes.iter().map(|n| n.vpn_ip()).collect::<Option<_>>()
        })
        .unwrap();
    let t_ping = Instant::now();
    for (a, b) in [(1, 2), (2, 1)] {
        mesh.wait(
            &format!("ping node{a} -> node{b} ({}) over edgevpn0", ips[b]),
            Duration::from_secs(20),
            |m| {
                m.exec(
                    a,
                    &["ping", "-c", "1", "-W", "1", "-I", "edgevpn0", &ips[b]],
                )
                .ok()
            },
        )
        .unwrap();
    }
    println!(
        "FIGURE sites: pings across the sites over edgevpn0 in {:.1} s",
        t_ping.elapsed().as_secs_f64()
    );

    // 3. The log says how the site nodes reach each other: the first connection between them
    //    is relayed through the bootstrap node (there is no other way across the NATs); a
    //    direct one only after a successful hole punch (DCUtR), whose outcome is logged too.
    let relayed = |a: usize, b: usize| {
        mesh.nodes[a]
            .log()
            .contains(&format!("peer {}: relayed via {}", peers[b], peers[0]))
    };
    assert!(
        relayed(1, 2) && relayed(2, 1),
        "a relayed connection between the sites, logged as such on both sides\n{}",
        mesh.logs()
    );
    assert!(
        relay_log.contains(&format!("relay server: circuit {}", peers[1]))
            || relay_log.contains(&format!("relay server: circuit {}", peers[2])),
        "the relay carried a circuit\n{relay_log}"
    );
    // DCUtR's attempts end in a log line either way (success, or failure after its retries).
    let outcome = mesh.wait("a hole punch outcome", Duration::from_secs(12), |m| {
        [1, 2].into_iter().find_map(|n| {
            let other = &peers[3 - n];
            m.nodes[n].log().lines().find_map(|l| {
                (l.contains(&format!("peer {other}: hole punch"))).then(|| l.to_owned())
            })
        })
    });
    let punched = [1, 2].into_iter().any(|n| {
        mesh.nodes[n]
            .log()
            .contains(&format!("peer {}: hole punch succeeded", peers[3 - n]))
    });
    let direct = [1, 2].into_iter().any(|n| {
        mesh.nodes[n]
            .log()
            .contains(&format!("peer {}: direct connection", peers[3 - n]))
    });
    assert!(
        !direct || punched,
        "a direct connection across the NATs without a hole punch\n{}",
        mesh.logs()
    );
    let log1 = mesh.nodes[1].log();
    let path_lines: Vec<&str> = log1
        .lines()
        .filter(|l| l.contains(&format!("peer {}:", peers[2])))
        .collect();
    println!(
        "FIGURE sites: path between the sites: {}; DCUtR: {}\n{}",
        if direct {
            "direct after the hole punch"
        } else {
            "relayed"
        },
        match &outcome {
            Ok(l) => l.split("kairos-p2p: ").nth(1).unwrap_or(l).to_owned(),
            Err(_) => "no outcome logged within 12 s".to_owned(),
        },
        path_lines.join("\n")
    );
}
