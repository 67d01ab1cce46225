//! Test tool, not an example to follow: a mesh member that holds the network token and
//! forges ledger entries, for the namespace test `token_holder_forgeries_are_ignored`
//! (tests/tests/mesh.rs). It joins like a node (mDNS, gossipsub), reads the ledger to learn
//! the honest nodes, announces itself properly (`nodes/<its uuid>`, a UUID chosen so it is
//! never the leader), and every second publishes, signed with its own key:
//!
//! - `roles/<its uuid>` with a permanent TTL,
//! - `pairing/<its peer>` with a stamp a year ahead,
//! - `vpn/lease/<its uuid>` = the primary server's VPN address (settled long ago),
//! - `vpn/lease/<another node>` and `roles/<another node>` (not its own keys),
//! - `k3s/url` and `k3s/token` (it is not the primary),
//! - `k3s/master-ip` claiming the primary's peer ID as owner.
//!
//! Usage: `mesh-forger CONFIG` inside a namespace; prints
//! `FORGER peer=P uuid=U victim=V forged_ip=A` once it forges (A: the address it puts in
//! forged leases and URLs, one no honest node holds), then runs until killed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use kairos_p2p::ledger::{self, Entry, Ledger, Update};
use kairos_p2p::net::{self, BehaviourEvent, Names};
use kairos_p2p::roles::{self, Role};
use kairos_p2p::{Token, config};
use kairos_util::time::now_ms;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, gossipsub, mdns};

fn main() -> Result<()> {
    let path: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: mesh-forger CONFIG")?
        .into();
    let cfg = config::load_file(&path)?.context("no p2p block")?;
    let token = Token::decode(&cfg.network_token)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(token, &cfg.network_id))
}

async fn run(token: Token, network_id: &str) -> Result<()> {
    let keypair = Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id().to_string();
    let names = Names::new(&token, network_id)?;
    let mut swarm = net::build_swarm(&keypair, &token, &names, Duration::from_secs(1), false)?;
    net::listen(&mut swarm, 0)?;
    if let Err(e) = swarm.behaviour_mut().gossipsub.subscribe(&names.topic) {
        bail!("subscribing: {e}");
    }
    // What the honest nodes say, taken without checks.
    let mut seen = Ledger::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut announced = false;
    let mut want: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = now_ms();
                let Some(update) = forge(&keypair, &me, &seen, now) else {
                    // Ask for the full state of the peers only heard in heartbeats.
                    if !want.is_empty() {
                        let beat = Update::beat(me.clone(), 0, std::mem::take(&mut want));
                        let msg = ledger::seal(&token, &beat, now / 1000)?;
                        let _ = swarm.behaviour_mut().gossipsub.publish(names.topic.clone(), msg);
                    }
                    continue;
                };
                if !announced {
                    let victim = update.entries.iter().find_map(|(k, _)| k.strip_prefix("roles/").filter(|u| !u.starts_with("forger-")));
                    let uuid = update.entries.iter().find_map(|(k, _)| k.strip_prefix("nodes/"));
                    let ip = update.entries.iter().find(|(k, _)| k == "k3s/master-ip").map(|(_, e)| e.value.as_str());
                    println!("FORGER peer={me} uuid={} victim={} forged_ip={}", uuid.unwrap_or(""), victim.unwrap_or(""), ip.unwrap_or(""));
                    announced = true;
                }
                let msg = ledger::seal(&token, &update, now / 1000)?;
                let _ = swarm.behaviour_mut().gossipsub.publish(names.topic.clone(), msg);
            }
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                    let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                    for (p, a) in list {
                        by_peer.entry(p).or_default().push(a);
                    }
                    for (p, addrs) in by_peer {
                        if !swarm.is_connected(&p) {
                            let _ = swarm.dial(
                                libp2p::swarm::dial_opts::DialOpts::peer_id(p).addresses(addrs).build(),
                            );
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                })) => {
                    let now = now_ms();
                    if let Ok(u) = ledger::open(&token, &message.data, now / 1000) {
                        // Honest nodes send their full state on change and heartbeats between.
                        if u.beat {
                            if !seen.refresh(&u.from, u.digest, now) && !want.contains(&u.from) {
                                want.push(u.from.clone());
                            }
                        } else {
                            seen.record_full(&u.from, &u.entries, now);
                            for (k, e) in u.entries {
                                seen.merge(&k, e, now);
                            }
                        }
                    }
                    let _ = swarm.behaviour_mut().gossipsub.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        gossipsub::MessageAcceptance::Accept,
                    );
                }
                _ => {}
            },
        }
    }
}

/// The forged update, once the honest mesh is complete (a primary with its lease and its
/// k3s/url, and another node with a role); None before.
fn forge(keypair: &Keypair, me: &str, seen: &Ledger, now: u64) -> Option<Update> {
    let live: Vec<String> = seen
        .prefix("nodes/", now)
        .map(|(u, _)| u.to_owned())
        .collect();
    let role = |u: &str| seen.value(&format!("roles/{u}"), now).and_then(Role::parse);
    let primary = live
        .iter()
        .find(|u| role(u).is_some_and(Role::is_primary))?;
    let victim = live.iter().find(|u| *u != primary && role(u).is_some())?;
    let lease_key = format!("vpn/lease/{primary}");
    let primary_ip = seen.value(&lease_key, now)?;
    // The primary's address must look settled to the honest nodes (held for their 3 s TTL):
    // it has been for this long here, and they saw it no later.
    seen.since(&lease_key, now).filter(|s| now >= s + 4000)?;
    let primary_peer = seen.peer_of(primary, now)?;
    seen.value("k3s/url", now)?;
    // A UUID whose hash is below every honest node's: never the leader.
    let floor = live.iter().map(|u| roles::fnv32a(u)).min()?;
    let uuid = (0..)
        .map(|i| format!("forger-{i}"))
        .find(|u| roles::fnv32a(u) < floor)?;
    let leased: Vec<&str> = seen
        .prefix("vpn/lease/", now)
        .map(|(_, e)| e.value.as_str())
        .collect();
    let forged_ip = (200..254)
        .map(|i| format!("10.1.0.{i}"))
        .find(|ip| !leased.contains(&ip.as_str()))?;
    let forged_ip = forged_ip.as_str();
    let ttl = 3000;
    let s = |k: &str, v: &str, stamp: u64, ttl: u64| {
        (k.to_owned(), ledger::sign(keypair, k, v.into(), stamp, ttl))
    };
    let year = 365 * 24 * 3_600_000;
    let mut not_mine: Entry = ledger::sign(keypair, "k3s/master-ip", forged_ip.into(), now, ttl);
    not_mine.owner = primary_peer.to_owned();
    Some(Update::full(
        me.to_owned(),
        vec![
            s(&format!("nodes/{uuid}"), me, now, ttl),
            s(&format!("roles/{uuid}"), "worker", now, u64::MAX),
            s(&format!("pairing/{me}"), "ok", now + year, ttl),
            s(&format!("vpn/lease/{uuid}"), primary_ip, now, ttl),
            s(&format!("vpn/lease/{victim}"), forged_ip, now, ttl),
            s(&format!("roles/{victim}"), "master", now, ttl),
            s("k3s/url", &format!("https://{forged_ip}:6443"), now, ttl),
            s("k3s/token", "K10forged::server:forged", now, ttl),
            ("k3s/master-ip".to_owned(), not_mine),
        ],
        Vec::new(),
    ))
}
