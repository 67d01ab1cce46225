//! A mesh member at run time: one tokio task owning the swarm, ticking every announce
//! interval. Each tick announces this node's ledger entries (in full on change, else a
//! heartbeat), leases a VPN address, follows the leader, assigns roles when it is the
//! leader, and starts K3s for its role. The decisions themselves are the pure functions of
//! `roles` and `lease`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, dcutr, gossipsub, identify, kad, mdns, relay};
use serde::{Deserialize, Serialize};
use tun_rs::AsyncDevice;

use crate::config::{BadAddress, P2pConfig};
use crate::keys;
use crate::lease::{self, LeaseError, Range};
use crate::ledger::{self, Admission, Entry, Ledger, Refusal, Update};
use crate::net::{self, Behaviour, BehaviourEvent, Names, NetError};
use crate::roles::{self, Role};
use crate::token::Token;
use crate::vpn::{self, Routes, VpnError};
use kairos_util::time::{now_ms, rfc3339};
use kairos_util::{IoError, IoResultExt};

pub const NODE_TOKEN: &str = "var/lib/rancher/k3s/server/node-token";
pub const KUBECONFIG: &str = "etc/rancher/k3s/k3s.yaml";

/// What `register` sends to a node in install mode (SPEC.md section 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PairingData {
    #[serde(default)]
    pub device: String,
    /// The cloud-config text to install with.
    #[serde(default)]
    pub cc: String,
    #[serde(default)]
    pub reboot: bool,
    #[serde(default)]
    pub poweroff: bool,
}

pub enum Mode {
    /// A cluster node: announce, lease, roles, K3s.
    Node,
    /// `register`: publish pairing data, wait for a node's acknowledgement.
    Register(PairingData),
    /// install-mode: wait for pairing data, acknowledge it, hand it back.
    AwaitPairing,
}

#[derive(Debug)]
pub enum Outcome {
    Stopped,
    Registered { node: String },
    Paired(PairingData),
}

/// How K3s is started for a role; the agent supplies it (its K3s supervisor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K3sSpec {
    /// `k3s server` (true) or `k3s agent`.
    pub server: bool,
    /// Arguments after the subcommand.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub trait K3sStarter: Send {
    fn start(&mut self, spec: &K3sSpec) -> Result<(), String>;
}

/// K3s for a role: every node runs flannel over the VPN interface with its VPN address.
/// `join` is the primary server's URL and token (workers, HA servers). With an external
/// datastore (`p2p.auto.ha.external_db`) servers use it and the first one does not
/// `--cluster-init` (upstream's rule).
pub fn k3s_spec(
    role: Role,
    iface: &str,
    ip: Ipv4Addr,
    join: Option<(&str, &str)>,
    external_db: Option<&str>,
) -> K3sSpec {
    let mut args = vec![
        format!("--flannel-iface={iface}"),
        format!("--node-ip={ip}"),
    ];
    if role.is_server() {
        args.push(format!("--tls-san={ip}"));
        args.push(format!("--advertise-address={ip}"));
        if let Some(db) = external_db {
            args.push(format!("--datastore-endpoint={db}"));
        }
    }
    if role == Role::MasterClusterInit && external_db.is_none() {
        args.push("--cluster-init".into());
    }
    let mut env = Vec::new();
    if let Some((url, token)) = join {
        if role == Role::MasterHa {
            args.push(format!("--server={url}"));
        } else {
            env.push(("K3S_URL".into(), url.to_owned()));
        }
        env.push(("K3S_TOKEN".into(), token.to_owned()));
    }
    K3sSpec {
        server: role.is_server(),
        args,
        env,
    }
}

pub fn server_url(ip: &str) -> String {
    format!("https://{ip}:6443")
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Vpn(#[from] VpnError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("node identity: {0}")]
    Identity(IoError),
    #[error("node identity: {0} is empty")]
    EmptyIdentity(PathBuf),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Config(#[from] BadAddress),
}

pub struct Options {
    pub root: PathBuf,
    pub config: P2pConfig,
    pub token: Token,
    pub mode: Mode,
    pub k3s: Box<dyn K3sStarter>,
    /// Register / install-mode give up after this long.
    pub timeout: Option<Duration>,
}

/// One log line on stdout, timestamped (the form the tests and an operator read).
pub fn say(msg: &str) {
    println!("{} kairos-p2p: {msg}", rfc3339(now_ms()));
}

/// The node UUID from `<root>/etc/machine-id` and the hostname (`<root>/etc/hostname`, else
/// the kernel's).
pub fn node_uuid(root: &Path) -> Result<String, NodeError> {
    let read = |p: PathBuf| -> Result<String, NodeError> {
        let s = std::fs::read_to_string(&p)
            .at(&p, "reading")
            .map_err(NodeError::Identity)?;
        let s = s.trim().to_owned();
        if s.is_empty() {
            return Err(NodeError::EmptyIdentity(p));
        }
        Ok(s)
    };
    let machine_id = read(root.join("etc/machine-id"))?;
    let hostname = read(root.join("etc/hostname"))
        .or_else(|_| read(PathBuf::from("/proc/sys/kernel/hostname")))?;
    Ok(roles::node_uuid(&machine_id, &hostname))
}

pub fn run(opts: Options) -> Result<Outcome, NodeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)?;
    rt.block_on(run_async(opts))
}

struct Own {
    value: String,
    stamp: u64,
}

struct Node {
    root: PathBuf,
    cfg: P2pConfig,
    token: Token,
    names: Names,
    uuid: String,
    peer: String,
    /// The libp2p identity: signs this node's ledger entries.
    keypair: Keypair,
    announce: Duration,
    ledger: Ledger,
    own: BTreeMap<String, Own>,
    ticks: u64,
    range: Range,
    lease: Option<Ipv4Addr>,
    lease_ticks: u32,
    tun: Option<Arc<AsyncDevice>>,
    routes: Routes,
    control: libp2p_stream::Control,
    leader: Option<String>,
    /// How long the set of live nodes has been the same: the leader assigns roles only once it
    /// has settled (see `Settle`).
    settle: Settle,
    role: Option<Role>,
    shown: Option<(Option<String>, Option<Role>)>,
    k3s: Box<dyn K3sStarter>,
    k3s_started: bool,
    /// The published kubeconfig this worker last wrote.
    kubeconfig_written: Option<String>,
    dht_window: Option<u64>,
    pairing_ack: Option<(PairingData, u32)>,
    /// When a dropped message from each peer was last logged.
    drop_logged: HashMap<PeerId, u64>,
    /// When each refused (writer, key) was last logged.
    refusal_logged: HashMap<(String, String), u64>,
    /// `p2p.bootstrap`: dialled at start and again whenever not connected.
    boot: Vec<BootPeer>,
    /// Bootstrap peers that serve circuit relay v2, and this node's reservation on each.
    relays: HashMap<PeerId, RelaySlot>,
    /// When each mesh member was last dialled through the relays.
    relay_dialed: HashMap<PeerId, u64>,
    /// The digest of the full state last published, and on which tick: in between the node
    /// sends heartbeats (see `publish`).
    sent: Option<(u64, u64)>,
    /// A peer asked for this node's full state.
    full_asked: bool,
    /// Peers whose full state this node asks for in its next message.
    want: BTreeSet<String>,
    /// LAN peers mDNS found, with their addresses: dialled while this node has fewer than
    /// `LAN_PEERS` connections.
    lan: HashMap<PeerId, Vec<Multiaddr>>,
    /// Claims on this node's address it refused because its own had settled: (node,
    /// address, when), kept one TTL. They decide a clash as the ledger's claims do.
    rivals: Vec<(String, Ipv4Addr, u64)>,
}

/// Connections a node makes to LAN peers by itself (others dial it too, so it holds about
/// twice this many). It used to dial every peer mDNS found: at 50 nodes 49 connections
/// each, with their buffers, identify exchanges and gossip control traffic. The ledger reaches
/// everyone through gossipsub's mesh; VPN streams dial the peer they need on demand.
pub const LAN_PEERS: usize = 6;
/// A full state goes out at least this often (ticks), besides on change and on request.
pub const FULL_EVERY: u64 = 30;

struct BootPeer {
    /// Without the `/p2p/…` suffix: the relay address is built from it.
    addr: Multiaddr,
    /// From the configured address, else learned when the first connection comes up.
    peer: Option<PeerId>,
    /// The dial under way, if any.
    pending: Option<ConnectionId>,
    /// When a failed dial was last logged (once a minute while it stays down).
    fail_logged: u64,
}

struct RelaySlot {
    /// The relay's address (the bootstrap address it was reached on).
    addr: Multiaddr,
    /// The `…/p2p-circuit` listener that holds the reservation.
    listener: Option<ListenerId>,
    reserved: bool,
}

/// The relay a relayed address goes through: the peer ID before `/p2p-circuit`.
fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => last = Some(id),
            Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

/// How a connection runs, for the log: `direct` or `relayed via <relay>`, and its address.
/// `relay_at` names the relay of a circuit address without the relay's peer ID (the listening
/// side's local address).
pub fn path_of(
    endpoint: &ConnectedPoint,
    relay_at: impl Fn(&Multiaddr) -> Option<PeerId>,
) -> (String, Multiaddr) {
    let (addr, circuit) = match endpoint {
        ConnectedPoint::Dialer { address, .. } => (address.clone(), address.clone()),
        ConnectedPoint::Listener {
            local_addr,
            send_back_addr,
        } => (send_back_addr.clone(), local_addr.clone()),
    };
    if endpoint.is_relayed() {
        let via = relay_of(&circuit)
            .or_else(|| {
                let base: Multiaddr = circuit
                    .iter()
                    .take_while(|p| *p != Protocol::P2pCircuit)
                    .collect();
                relay_at(&base)
            })
            .map(|r| r.to_string())
            .unwrap_or_else(|| "a relay".into());
        (format!("relayed via {via}"), circuit)
    } else {
        ("direct".into(), addr)
    }
}

/// A bootstrap address split into the address to dial and its peer ID, when given.
fn split_peer(addr: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut a = addr.clone();
    match a.pop() {
        Some(Protocol::P2p(id)) => (a, Some(id)),
        Some(p) => {
            a.push(p);
            (a, None)
        }
        None => (a, None),
    }
}

async fn run_async(opts: Options) -> Result<Outcome, NodeError> {
    let Options {
        root,
        config,
        token,
        mode,
        k3s,
        timeout,
    } = opts;
    let announce = match mode {
        Mode::Node => Duration::from_secs(config.announce_interval.max(1)),
        // Pairing is interactive (someone holds a phone or a laptop): tick every second.
        _ => Duration::from_secs(1),
    };
    let names = Names::new(&token, &config.network_id)?;
    // Heartbeat no slower than the announcements, so fast test meshes form fast.
    let heartbeat = announce.min(Duration::from_secs(1));
    let keypair = Keypair::generate_ed25519();
    let boot: Vec<BootPeer> = config
        .bootstrap_addrs()?
        .iter()
        .map(|a| {
            let (addr, peer) = split_peer(a);
            BootPeer {
                addr,
                peer,
                pending: None,
                fail_logged: 0,
            }
        })
        .collect();
    let mut swarm = net::build_swarm(&keypair, &token, &names, heartbeat, config.relay.server)?;
    net::listen(&mut swarm, config.listen_port)?;
    if let Err(e) = swarm.behaviour_mut().gossipsub.subscribe(&names.topic) {
        return Err(NetError::Build {
            what: "ledger topic",
            msg: e.to_string(),
        }
        .into());
    }
    let uuid = match mode {
        Mode::Node => node_uuid(&root)?,
        // A registering client is no cluster node; it still needs a name in the log.
        _ => format!("client-{}", swarm.local_peer_id()),
    };
    let peer = swarm.local_peer_id().to_string();
    let range = Range::parse(&config.vpn.range())?;
    let control = swarm.behaviour().stream.new_control();
    let mut node = Node {
        lease: if matches!(mode, Mode::Node) {
            lease::load(&root)
        } else {
            None
        },
        root,
        names,
        uuid,
        peer,
        keypair,
        announce,
        ledger: Ledger::default(),
        own: BTreeMap::new(),
        ticks: 0,
        range,
        lease_ticks: 0,
        tun: None,
        routes: Arc::new(RwLock::new(HashMap::new())),
        control,
        leader: None,
        settle: Settle::default(),
        role: None,
        shown: None,
        k3s,
        k3s_started: false,
        kubeconfig_written: None,
        dht_window: None,
        pairing_ack: None,
        drop_logged: HashMap::new(),
        refusal_logged: HashMap::new(),
        boot,
        relays: HashMap::new(),
        relay_dialed: HashMap::new(),
        sent: None,
        full_asked: false,
        want: BTreeSet::new(),
        lan: HashMap::new(),
        rivals: Vec::new(),
        cfg: config,
        token,
    };
    say(&format!("node uuid={} peer={}", node.uuid, node.peer));
    if node.cfg.disable_dht {
        say("dht: off (p2p.disable_dht): peers are found by mDNS and p2p.bootstrap only");
    }
    if node.cfg.relay.server {
        say("relay: serving circuit relay v2 (p2p.relay.server)");
    }
    node.dial_bootstrap(&mut swarm, now_ms());
    if let Mode::Register(data) = &mode {
        let json = serde_json::to_string(data).unwrap_or_default();
        node.set_own("pairing/data", json);
    }
    let mut tick = tokio::time::interval(announce);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(NodeError::Runtime)?;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(out) = node.tick(&mut swarm, &mode)? {
                    return Ok(out);
                }
                if let Some(d) = deadline && tokio::time::Instant::now() >= d {
                    return Err(NodeError::Timeout(match mode {
                        Mode::Register(_) => "no node acknowledged the pairing data in time (is the node in install mode, with the same token?)".into(),
                        _ => "timed out waiting on the mesh".into(),
                    }));
                }
            }
            ev = swarm.select_next_some() => node.on_event(&mut swarm, ev),
            _ = tokio::signal::ctrl_c() => return Ok(Outcome::Stopped),
            _ = term.recv() => return Ok(Outcome::Stopped),
        }
    }
}

impl Node {
    fn ttl(&self) -> u64 {
        // Three missed announcements and a node is gone; never above what peers accept.
        (3 * self.announce.as_millis() as u64).min(ledger::MAX_TTL_MS)
    }

    /// This node's entry for `key`, signed.
    fn own_entry(&self, key: &str, o: &Own, ttl: u64) -> Entry {
        ledger::sign(&self.keypair, key, o.value.clone(), o.stamp, ttl)
    }

    fn admission(&self, now: u64) -> Admission {
        Admission {
            now_ms: now,
            range: self.range,
            // A lease is settled after its node's TTL: by then every live node has seen it.
            settle_ms: self.ttl(),
        }
    }

    /// Log a refused entry, once a minute per writer and key: a peer must not be able to
    /// flood the log.
    fn log_refusal(&mut self, from: &str, key: &str, why: &Refusal, now: u64) {
        if self.refusal_logged.len() > 4096 {
            self.refusal_logged.clear();
        }
        let last = self
            .refusal_logged
            .entry((from.to_owned(), key.to_owned()))
            .or_insert(0);
        if now.saturating_sub(*last) >= 60_000 {
            *last = now;
            say(&format!("ledger: ignored {key} from {from}: {why}"));
        }
    }

    /// Set an entry this node owns; the stamp only moves when the value does, so a stale
    /// re-announcement never beats a newer write by someone else.
    fn set_own(&mut self, key: &str, value: String) {
        match self.own.get_mut(key) {
            Some(o) if o.value == value => {}
            _ => {
                self.own.insert(
                    key.to_owned(),
                    Own {
                        value,
                        stamp: now_ms(),
                    },
                );
            }
        }
    }

    fn tick(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        mode: &Mode,
    ) -> Result<Option<Outcome>, NodeError> {
        self.ticks += 1;
        let now = now_ms();
        self.ledger.expire(now);
        self.dial_bootstrap(swarm, now);
        self.reserve(swarm);
        self.dial_through_relays(swarm, now);
        self.discover(swarm);
        let mut outcome = None;
        match mode {
            Mode::Node => self.node_tick(now)?,
            Mode::Register(_) => {
                let acks: Vec<String> = self
                    .ledger
                    .prefix("pairing/", now)
                    .filter(|(k, e)| *k != "data" && e.value == "ok")
                    .map(|(k, _)| k.to_owned())
                    .collect();
                if let Some(node) = acks.into_iter().next() {
                    say(&format!("pairing data acknowledged by node {node}"));
                    outcome = Some(Outcome::Registered { node });
                }
            }
            Mode::AwaitPairing => {
                if let Some((data, n)) = &mut self.pairing_ack {
                    // Keep announcing the acknowledgement a couple of ticks so it arrives.
                    *n += 1;
                    if *n >= 3 {
                        outcome = Some(Outcome::Paired(data.clone()));
                    }
                } else if let Some(v) = self.ledger.value("pairing/data", now) {
                    match serde_json::from_str::<PairingData>(v) {
                        Ok(d) => {
                            say(&format!(
                                "pairing data received: device={} reboot={} poweroff={} config={} bytes",
                                d.device,
                                d.reboot,
                                d.poweroff,
                                d.cc.len()
                            ));
                            let key = format!("pairing/{}", self.peer);
                            self.set_own(&key, "ok".into());
                            self.pairing_ack = Some((d, 0));
                        }
                        Err(e) => say(&format!("ignoring malformed pairing/data: {e}")),
                    }
                }
            }
        }
        self.dial_lan(swarm);
        self.publish(swarm, now, !matches!(mode, Mode::Node));
        Ok(outcome)
    }

    fn node_tick(&mut self, now: u64) -> Result<(), NodeError> {
        self.set_own(&format!("nodes/{}", self.uuid), self.peer.clone());
        // Our own entries count at once; gossipsub does not hand us our own messages.
        self.merge_own(now);
        let live: Vec<String> = self
            .ledger
            .prefix("nodes/", now)
            .map(|(k, _)| k.to_owned())
            .collect();
        if self.cfg.vpn.create {
            self.vpn_tick(now, &live)?;
        }
        self.leader = roles::leader(&live).map(str::to_owned);
        let settled = self.settle.observe(&live);
        let (fixed, auto) = role_source(&self.cfg);
        if auto && self.leader.as_deref() == Some(self.uuid.as_str()) {
            // Until the view has settled the leader keeps what it announced and assigns nothing.
            if settled {
                let current: BTreeMap<String, Role> = self
                    .ledger
                    .prefix("roles/", now)
                    .filter_map(|(k, e)| Role::parse(&e.value).map(|r| (k.to_owned(), r)))
                    .collect();
                let assigned =
                    roles::assign(&live, &current, self.cfg.minimum_nodes, self.cfg.ha());
                let keep: Vec<String> = assigned.keys().map(|u| format!("roles/{u}")).collect();
                self.own
                    .retain(|k, _| !k.starts_with("roles/") || keep.contains(k));
                for (u, r) in assigned {
                    let key = format!("roles/{u}");
                    // Once a node announces the role it was given, the leader's copy is not
                    // needed: dropping it keeps the leader's state from growing with the fleet.
                    let confirmed = u != self.uuid
                        && self
                            .ledger
                            .get(&key, now)
                            .is_some_and(|e| e.owner != self.peer && e.value == r.as_str());
                    if confirmed {
                        self.own.remove(&key);
                    } else {
                        self.set_own(&key, r.as_str().into());
                    }
                }
                self.merge_own(now);
            }
        } else {
            // A former leader stops re-announcing the others' assignments.
            let mine = format!("roles/{}", self.uuid);
            self.own
                .retain(|k, _| !k.starts_with("roles/") || *k == mine);
        }
        if self.role.is_none() {
            self.role = fixed.or_else(|| {
                self.ledger
                    .value(&format!("roles/{}", self.uuid), now)
                    .and_then(Role::parse)
            });
        }
        // Every node announces its own role once it has one, so assignments outlive the
        // leader that made them (a new leader must not hand out a second master).
        if let Some(r) = self.role {
            self.set_own(&format!("roles/{}", self.uuid), r.as_str().into());
            self.merge_own(now);
        }
        let state = (self.leader.clone(), self.role);
        if self.shown.as_ref() != Some(&state) {
            say(&format!(
                "leader={} role={}",
                state.0.as_deref().unwrap_or("none"),
                state.1.map(Role::as_str).unwrap_or("none")
            ));
            self.shown = Some(state);
        }
        self.k3s_tick(now);
        Ok(())
    }

    fn merge_own(&mut self, now: u64) {
        let ttl = self.ttl();
        let entries: Vec<(String, Entry)> = self
            .own
            .iter()
            .map(|(k, o)| (k.clone(), self.own_entry(k, o, ttl)))
            .collect();
        for (k, e) in entries {
            self.ledger.merge(&k, e, now);
        }
    }

    fn vpn_tick(&mut self, now: u64, live: &[String]) -> Result<(), NodeError> {
        let leases: BTreeMap<String, Ipv4Addr> = self
            .ledger
            .prefix("vpn/lease/", now)
            .filter_map(|(u, e)| Some((u.to_owned(), e.value.parse().ok()?)))
            .collect();
        let ttl = self.ttl();
        self.rivals
            .retain(|(_, _, at)| now.saturating_sub(*at) <= ttl);
        // Everyone else's claims: the ledger's, and those this node refused.
        let mut others = leases.clone();
        others.remove(&self.uuid);
        for (u, ip, _) in &self.rivals {
            others.entry(u.clone()).or_insert(*ip);
        }
        if let Some(mine) = self.lease
            && self.lease_ticks > 0
            && lease::must_yield(
                &self.uuid,
                mine,
                leases
                    .iter()
                    .map(|(u, a)| (u.as_str(), *a))
                    .chain(self.rivals.iter().map(|(u, a, _)| (u.as_str(), *a))),
            )
        {
            if let Some(dev) = &self.tun {
                // Up already: move the interface to a free address (a node that kept a
                // clashing address until restart left two nodes on one address at 50 nodes).
                let ip = lease::choose(self.range, &self.uuid, &others, None)?;
                let iface = self.cfg.vpn.interface();
                match dev.set_network_address(ip, self.range.prefix, None) {
                    Ok(()) => {
                        lease::store(&self.root, ip)?;
                        self.lease = Some(ip);
                        self.lease_ticks = 0;
                        let k3s = if self.k3s_started {
                            "; K3s keeps the old --node-ip until restart"
                        } else {
                            ""
                        };
                        say(&format!(
                            "vpn interface={iface} address={ip}/{} (re-addressed: {mine} is also claimed by a node with a smaller UUID{k3s})",
                            self.range.prefix
                        ));
                    }
                    Err(e) => say(&format!(
                        "vpn: address {mine} is also claimed by a node with a smaller UUID; re-addressing {iface} to {ip} failed: {e}; trying again next tick"
                    )),
                }
            } else {
                say(&format!(
                    "vpn: address {mine} clashes with another node; choosing again"
                ));
                self.lease = None;
                self.lease_ticks = 0;
            }
        }
        // Without a remembered lease wait one tick, so the ledger has the others' leases.
        if self.lease.is_none() && self.ticks >= 2 {
            let ip = lease::choose(self.range, &self.uuid, &others, None)?;
            self.lease = Some(ip);
            self.lease_ticks = 0;
        }
        let Some(ip) = self.lease else { return Ok(()) };
        self.set_own(&format!("vpn/lease/{}", self.uuid), ip.to_string());
        self.merge_own(now);
        self.lease_ticks += 1;
        // Claimed on the previous tick and nobody objected: bring the interface up. Only once
        // the live set has stayed the same for `SETTLE_TICKS` too: with dozens of nodes
        // starting together two of them often hash to one address, and a node that has not
        // yet heard every other node's claim must not commit to its own (mesh-scale saw two
        // such pairs at 50 nodes under load).
        if self.tun.is_none() && self.lease_ticks >= 2 && self.settle.same_for >= SETTLE_TICKS {
            lease::store(&self.root, ip)?;
            let iface = self.cfg.vpn.interface();
            let dev = vpn::create(&iface, ip, self.range.prefix)?;
            vpn::spawn(
                dev.clone(),
                self.range,
                self.routes.clone(),
                self.control.clone(),
                self.names.vpn.clone(),
            )
            .map_err(|msg| NetError::Build {
                what: "VPN stream protocol",
                msg,
            })?;
            self.tun = Some(dev);
            say(&format!(
                "vpn interface={iface} address={ip}/{}",
                self.range.prefix
            ));
        }
        // Routes: every live node's leased address → its peer ID. Should two nodes claim one
        // address, it goes to the claim this node has seen longest (then the smaller UUID,
        // as `lease::must_yield`), never to whichever comes last.
        let mut best: HashMap<Ipv4Addr, (u64, &str, PeerId)> = HashMap::new();
        for u in live {
            let (Some(ip), Some(peer)) = (leases.get(u), self.ledger.peer_of(u, now)) else {
                continue;
            };
            let since = self
                .ledger
                .since(&format!("vpn/lease/{u}"), now)
                .unwrap_or(u64::MAX);
            if let Ok(p) = peer.parse::<PeerId>()
                && u != &self.uuid
                && self.range.contains_host(*ip)
            {
                let cand = (since, u.as_str(), p);
                let e = best.entry(*ip).or_insert(cand);
                if (cand.0, cand.1) < (e.0, e.1) {
                    *e = cand;
                }
            }
        }
        let routes: HashMap<Ipv4Addr, PeerId> =
            best.into_iter().map(|(ip, (_, _, p))| (ip, p)).collect();
        if let Ok(mut r) = self.routes.write() {
            *r = routes;
        }
        Ok(())
    }

    fn k3s_tick(&mut self, now: u64) {
        let (Some(role), Some(ip)) = (self.role, self.lease) else {
            return;
        };
        if self.tun.is_none() {
            return;
        }
        let iface = self.cfg.vpn.interface();
        if !self.k3s_started {
            let join = (
                self.ledger.value("k3s/url", now).map(str::to_owned),
                self.ledger.value("k3s/token", now).map(str::to_owned),
            );
            let db = self.cfg.external_db();
            let spec = match (role.is_primary(), &join) {
                (true, _) => k3s_spec(role, &iface, ip, None, db),
                (false, (Some(url), Some(token))) => {
                    k3s_spec(role, &iface, ip, Some((url, token)), db)
                }
                // Workers and HA servers wait for the primary's token and URL.
                _ => return,
            };
            let what = if spec.server { "server" } else { "agent" };
            let target = join.0.clone().unwrap_or_else(|| "new cluster".into());
            match self.k3s.start(&spec) {
                Ok(()) => {
                    say(&format!("k3s {what} started ({target}) role={role}"));
                    self.k3s_started = true;
                }
                Err(e) => say(&format!(
                    "k3s {what} did not start: {e}; retrying next tick"
                )),
            }
        }
        if role == Role::Worker {
            self.write_kubeconfig(now);
        }
        if self.k3s_started && role.is_primary() {
            // Publish what joiners need once K3s has written it.
            let token = std::fs::read_to_string(self.root.join(NODE_TOKEN))
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty());
            if let Some(t) = token {
                if !self.own.contains_key("k3s/token") {
                    say(&format!(
                        "publishing k3s token and url {}",
                        server_url(&ip.to_string())
                    ));
                }
                self.set_own("k3s/token", t);
                self.set_own("k3s/url", server_url(&ip.to_string()));
                self.set_own("k3s/master-ip", ip.to_string());
            }
            if let Ok(kc) = std::fs::read_to_string(self.root.join(KUBECONFIG)) {
                let kc = kc.replace("https://127.0.0.1:6443", &server_url(&ip.to_string()));
                self.set_own("k3s/kubeconfig", kc);
            }
            self.merge_own(now);
        }
    }

    /// A worker keeps the kubeconfig the primary server published (its server URL already
    /// the primary's VPN address) where K3s' own is, /etc/rancher/k3s/k3s.yaml (0600), so
    /// `k3s kubectl` works on every node; rewritten when the published one changes.
    fn write_kubeconfig(&mut self, now: u64) {
        let Some(kc) = self.ledger.value("k3s/kubeconfig", now) else {
            return;
        };
        if self.kubeconfig_written.as_deref() == Some(kc) {
            return;
        }
        let kc = kc.to_owned();
        let path = self.root.join(KUBECONFIG);
        match write_private(&path, kc.as_bytes()) {
            Ok(()) => {
                let server = kc
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("server:"))
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                say(&format!(
                    "wrote the published kubeconfig to /{KUBECONFIG} (server {server})"
                ));
                self.kubeconfig_written = Some(kc);
            }
            Err(e) => say(&format!("kubeconfig: {e}; retrying next tick")),
        }
    }

    /// The relay this node reached at `addr`.
    fn relay_at(&self, addr: &Multiaddr) -> Option<PeerId> {
        self.relays
            .iter()
            .find(|(_, s)| s.addr == *addr)
            .map(|(r, _)| *r)
    }

    /// Dial every bootstrap peer this node is not connected to (nor dialling).
    fn dial_bootstrap(&mut self, swarm: &mut Swarm<Behaviour>, now: u64) {
        for b in &mut self.boot {
            if b.pending.is_some() || b.peer.is_some_and(|p| swarm.is_connected(&p)) {
                continue;
            }
            let opts = match b.peer {
                Some(p) => DialOpts::peer_id(p)
                    .addresses(vec![b.addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None => DialOpts::unknown_peer_id().address(b.addr.clone()).build(),
            };
            let id = opts.connection_id();
            match swarm.dial(opts) {
                Ok(()) => b.pending = Some(id),
                Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                Err(e) => {
                    if now.saturating_sub(b.fail_logged) >= 60_000 {
                        b.fail_logged = now;
                        say(&format!("bootstrap: cannot dial {}: {e}", b.addr));
                    }
                }
            }
        }
    }

    /// A new connection: a bootstrap peer's goes into Kademlia, which then bootstraps.
    fn on_connected(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
        // The dial of a bootstrap entry, else (a connection it did not dial) the entry of that peer.
        let i = self
            .boot
            .iter()
            .position(|b| b.pending == Some(id))
            .or_else(|| {
                self.boot
                    .iter()
                    .position(|b| b.peer == Some(peer) && endpoint.is_dialer())
            });
        let Some(b) = i.and_then(|i| self.boot.get_mut(i)) else {
            return;
        };
        b.pending = None;
        if b.peer.is_none() {
            b.peer = Some(peer);
        }
        if b.peer != Some(peer) {
            say(&format!(
                "bootstrap: {} answered as {peer}, not the configured peer ID",
                b.addr
            ));
            return;
        }
        say(&format!("bootstrap: connected to {peer} at {}", b.addr));
        if !self.cfg.disable_dht {
            let addr = b.addr.clone();
            let kad = &mut swarm.behaviour_mut().kad;
            kad.add_address(&peer, addr);
            // Fails only with no known peers; there is one now.
            let _ = kad.bootstrap();
        }
    }

    /// Ask every connected relay without a reservation of ours for one: listening on
    /// `<relay>/p2p-circuit` makes the relay client request it.
    fn reserve(&mut self, swarm: &mut Swarm<Behaviour>) {
        for (r, slot) in &mut self.relays {
            if slot.listener.is_some() || !swarm.is_connected(r) {
                continue;
            }
            let addr = slot
                .addr
                .clone()
                .with(Protocol::P2p(*r))
                .with(Protocol::P2pCircuit);
            match swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    slot.listener = Some(id);
                    say(&format!("relay: asking {r} for a reservation ({addr})"));
                }
                Err(e) => say(&format!("relay: cannot listen on {addr}: {e}")),
            }
        }
    }

    /// Mesh members (from the ledger) this node has no connection to are dialled through the
    /// relays, besides any direct address Kademlia or identify know: across NATs the relayed
    /// address is the one that works, and DCUtR then tries to make it direct.
    fn dial_through_relays(&mut self, swarm: &mut Swarm<Behaviour>, now: u64) {
        let relays: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(r, _)| swarm.is_connected(r))
            .map(|(r, s)| (*r, s.addr.clone()))
            .collect();
        if relays.is_empty() {
            return;
        }
        let me = *swarm.local_peer_id();
        let peers: Vec<PeerId> = self
            .ledger
            .prefix("nodes/", now)
            .filter_map(|(_, e)| e.value.parse::<PeerId>().ok())
            .filter(|p| *p != me && !swarm.is_connected(p) && !self.relays.contains_key(p))
            .collect();
        for p in peers {
            let last = self.relay_dialed.entry(p).or_insert(0);
            // A circuit needs the other side's reservation: try again, but not every instant.
            if now.saturating_sub(*last) < 3_000 {
                continue;
            }
            *last = now;
            let addrs = relays
                .iter()
                .map(|(r, a)| {
                    a.clone()
                        .with(Protocol::P2p(*r))
                        .with(Protocol::P2pCircuit)
                        .with(Protocol::P2p(p))
                })
                .collect();
            let opts = DialOpts::peer_id(p)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
                // Not held back by a dial under way: Kademlia dials the peer's NATed addresses
                // when it learns them, and such a dial hangs until it times out.
                .condition(PeerCondition::Disconnected)
                .build();
            // Failures (the peer has no reservation yet) show up as a connection error and
            // are tried again in a few seconds.
            let _ = swarm.dial(opts);
        }
        if self.relay_dialed.len() > 4096 {
            self.relay_dialed.clear();
        }
    }

    /// Dial LAN peers (mDNS) while this node holds fewer than `LAN_PEERS` connections. The
    /// map's order differs per process, so nodes pick different peers: a random graph.
    fn dial_lan(&mut self, swarm: &mut Swarm<Behaviour>) {
        let mut have = swarm.connected_peers().count();
        if have >= LAN_PEERS {
            return;
        }
        for (p, addrs) in &self.lan {
            if have >= LAN_PEERS {
                break;
            }
            if swarm.is_connected(p) {
                continue;
            }
            let opts = DialOpts::peer_id(*p)
                .addresses(addrs.clone())
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            // A dial under way counts: the next tick looks again.
            match swarm.dial(opts) {
                Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => have += 1,
                Err(_) => {}
            }
        }
    }

    /// The DHT rendezvous: provide the token's current key, look for other providers.
    fn discover(&mut self, swarm: &mut Swarm<Behaviour>) {
        if self.cfg.disable_dht {
            return;
        }
        let secs = now_ms() / 1000;
        let w = keys::window(secs, self.token.otp.dht.interval);
        let key = kad::RecordKey::new(&keys::dht_rendezvous(&self.token, secs));
        let kad = &mut swarm.behaviour_mut().kad;
        if self.dht_window != Some(w) {
            // Fails only when the local store is full: nothing to do then.
            let _ = kad.start_providing(key.clone());
            self.dht_window = Some(w);
        }
        let connected = swarm.connected_peers().next().is_some();
        if dht_due(self.ticks, connected, !self.boot.is_empty()) {
            let kad = &mut swarm.behaviour_mut().kad;
            let _ = kad.bootstrap();
            kad.get_providers(key);
        }
    }

    /// This tick's message: the full state (every entry this node owns, signed) when it
    /// changed, when a peer asked for it, every `FULL_EVERY` ticks, and always when
    /// `always_full` (pairing); else a heartbeat naming the state's digest, which keeps the
    /// entries alive on the peers that hold that state. Sending every entry every second made
    /// the leader's message grow with the fleet (one role per node) and every node's message
    /// carry signatures nobody needed again.
    fn publish(&mut self, swarm: &mut Swarm<Behaviour>, now: u64, always_full: bool) {
        if self.own.is_empty() {
            return;
        }
        let digest = ledger::digest(
            self.own
                .iter()
                .map(|(k, o)| (k.as_str(), o.value.as_str(), o.stamp)),
        );
        let want: Vec<String> = std::mem::take(&mut self.want).into_iter().collect();
        let full = full_due(always_full, self.sent, digest, self.full_asked, self.ticks);
        let update = if full {
            let ttl = self.ttl();
            let entries = self
                .own
                .iter()
                .map(|(k, o)| (k.clone(), self.own_entry(k, o, ttl)))
                .collect();
            Update::full(self.peer.clone(), entries, want)
        } else {
            Update::beat(self.peer.clone(), digest, want)
        };
        match ledger::seal(&self.token, &update, now / 1000) {
            Ok(msg) => {
                // No peers yet is normal at start; the next tick sends the full state again.
                let sent = swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.names.topic.clone(), msg);
                if full && sent.is_ok() {
                    self.sent = Some((digest, self.ticks));
                    self.full_asked = false;
                }
            }
            Err(e) => say(&format!("ledger: not sending this node's entries: {e}")),
        }
    }

    fn on_event(&mut self, swarm: &mut Swarm<Behaviour>, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                say(&format!("listening on {address}"));
                // A relay must tell the peers that reserve a slot where it is (libp2p refuses
                // reservations without addresses, and advertises the relay protocol only with
                // one): a relay is run where its own addresses are the reachable ones.
                let loopback = address.iter().any(|p| match p {
                    Protocol::Ip4(ip) => ip.is_loopback(),
                    Protocol::Ip6(ip) => ip.is_loopback(),
                    _ => false,
                });
                if self.cfg.relay.server && !loopback && relay_of(&address).is_none() {
                    swarm.add_external_address(address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let (path, addr) = path_of(&endpoint, |a| self.relay_at(a));
                let side = if endpoint.is_dialer() { "out" } else { "in" };
                say(&format!(
                    "peer {peer_id}: {path} connection ({side} {addr}), {num_established} open"
                ));
                self.on_connected(swarm, peer_id, connection_id, &endpoint);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                endpoint,
                num_established,
                cause,
                ..
            } => {
                let (path, _) = path_of(&endpoint, |a| self.relay_at(a));
                let why = cause.map(|c| format!(": {c}")).unwrap_or_default();
                say(&format!(
                    "peer {peer_id}: {path} connection closed{why}, {num_established} left"
                ));
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                let now = now_ms();
                if let Some(b) = self
                    .boot
                    .iter_mut()
                    .find(|b| b.pending == Some(connection_id))
                {
                    b.pending = None;
                    if now.saturating_sub(b.fail_logged) >= 60_000 {
                        b.fail_logged = now;
                        say(&format!(
                            "bootstrap: dialling {} failed: {error}; trying again every tick",
                            b.addr
                        ));
                    }
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                for (r, slot) in &mut self.relays {
                    if slot.listener == Some(listener_id) {
                        slot.listener = None;
                        slot.reserved = false;
                        let why = match reason {
                            Ok(()) => "closed".to_owned(),
                            Err(ref e) => e.to_string(),
                        };
                        say(&format!(
                            "relay: reservation on {r} ended ({why}); asking again next tick"
                        ));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    ..
                },
            )) => {
                if let Some(slot) = self.relays.get_mut(&relay_peer_id) {
                    slot.reserved = true;
                    if !renewal {
                        say(&format!(
                            "relay: reservation accepted by {relay_peer_id}: reachable at {}/p2p/{relay_peer_id}/p2p-circuit/p2p/{}",
                            slot.addr, self.peer
                        ));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayServer(ev)) => match ev {
                relay::Event::ReservationReqAccepted {
                    src_peer_id,
                    renewed: false,
                } => say(&format!("relay server: reservation for {src_peer_id}")),
                relay::Event::ReservationReqDenied {
                    src_peer_id,
                    status,
                } => say(&format!(
                    "relay server: reservation for {src_peer_id} denied: {status:?}"
                )),
                relay::Event::CircuitReqAccepted {
                    src_peer_id,
                    dst_peer_id,
                } => say(&format!(
                    "relay server: circuit {src_peer_id} -> {dst_peer_id}"
                )),
                relay::Event::CircuitReqDenied {
                    src_peer_id,
                    dst_peer_id,
                    status,
                } => say(&format!(
                    "relay server: circuit {src_peer_id} -> {dst_peer_id} denied: {status:?}"
                )),
                _ => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => say(&format!(
                    "peer {remote_peer_id}: hole punch succeeded (dcutr): the relayed connection is upgraded to a direct one"
                )),
                Err(e) => say(&format!(
                    "peer {remote_peer_id}: hole punch failed (dcutr): {e}; the path stays relayed"
                )),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (p, a) in list {
                    swarm.behaviour_mut().kad.add_address(&p, a.clone());
                    let addrs = self.lan.entry(p).or_default();
                    if !addrs.contains(&a) && addrs.len() < 8 {
                        addrs.push(a);
                    }
                }
                self.dial_lan(swarm);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(list))) => {
                for (p, a) in list {
                    if let Some(addrs) = self.lan.get_mut(&p) {
                        addrs.retain(|x| *x != a);
                        if addrs.is_empty() {
                            self.lan.remove(&p);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocol_version != self.names.protocol_version {
                    // Another network (or not Kairos) on the same LAN: no business with us.
                    let _ = swarm.disconnect_peer_id(peer_id);
                } else {
                    for a in info.listen_addrs {
                        swarm.behaviour_mut().kad.add_address(&peer_id, a);
                    }
                    // A bootstrap peer that serves circuit relay v2: reserve a slot on it.
                    if info.protocols.contains(&relay::HOP_PROTOCOL_NAME)
                        && !self.relays.contains_key(&peer_id)
                        && let Some(b) = self.boot.iter().find(|b| b.peer == Some(peer_id))
                    {
                        say(&format!(
                            "relay: bootstrap peer {peer_id} serves circuit relay v2"
                        ));
                        self.relays.insert(
                            peer_id,
                            RelaySlot {
                                addr: b.addr.clone(),
                                listener: None,
                                reserved: false,
                            },
                        );
                        self.reserve(swarm);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let now = now_ms();
                let verdict = match ledger::open(&self.token, &message.data, now / 1000) {
                    Ok(u) if message.source.map(|s| s.to_string()) == Some(u.from.clone()) => {
                        let from = u.from.clone();
                        if u.want.contains(&self.peer) {
                            self.full_asked = true;
                        }
                        let ctx = self.admission(now);
                        let (changed, refused) = if u.beat {
                            // A heartbeat naming a state this node does not hold: ask for it.
                            if !self.ledger.refresh(&from, u.digest, now)
                                && self.want.len() < ledger::MAX_PER_OWNER
                            {
                                self.want.insert(from.clone());
                            }
                            (Vec::new(), Vec::new())
                        } else {
                            self.want.remove(&from);
                            self.ledger.apply(u, &from, &ctx)
                        };
                        for (k, why) in &refused {
                            if let Refusal::AddressTaken { ip, holder } = why
                                && *holder == self.uuid
                                && let Some(u) = k.strip_prefix("vpn/lease/")
                                && self.rivals.len() < ledger::MAX_PER_OWNER
                            {
                                self.rivals.retain(|(x, _, _)| x != u);
                                self.rivals.push((u.to_owned(), *ip, now));
                            }
                            self.log_refusal(&from, k, why, now);
                        }
                        // What decides roles and the K3s join, as it changes.
                        for k in changed {
                            if k == "k3s/url"
                                || k.starts_with("roles/")
                                || k.starts_with("vpn/lease/")
                            {
                                let v = self.ledger.value(&k, now).unwrap_or("");
                                say(&format!("ledger: {k} = {v} (from {from})"));
                            }
                        }
                        // The message is authentic (token and sender): pass it on even if
                        // this node refused entries in it; every node checks for itself.
                        gossipsub::MessageAcceptance::Accept
                    }
                    Ok(u) => {
                        say(&format!(
                            "ledger: dropped a message from {propagation_source}: it claims to be from {} but was published by {:?}",
                            u.from, message.source
                        ));
                        gossipsub::MessageAcceptance::Reject
                    }
                    Err(e) => {
                        // Once a minute per peer: a peer without the token must not be able
                        // to flood the log.
                        let last = self.drop_logged.entry(propagation_source).or_insert(0);
                        if now.saturating_sub(*last) >= 60_000 {
                            *last = now;
                            say(&format!(
                                "ledger: dropped a message from {propagation_source}: {e}"
                            ));
                        }
                        gossipsub::MessageAcceptance::Reject
                    }
                };
                swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, verdict);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result:
                    kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                        providers,
                        ..
                    })),
                ..
            })) => {
                for p in providers {
                    if p != *swarm.local_peer_id() && !swarm.is_connected(&p) {
                        let _ = swarm.dial(p);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Where this node's role comes from: `p2p.role` fixed (`master`, `worker`, …; the first
/// member of the tuple), else the leader's assignment when `p2p.auto.enable` (the second:
/// whether this node takes part in assigning). `none`, or auto off without a fixed role:
/// no role, no K3s.
pub fn role_source(cfg: &P2pConfig) -> (Option<Role>, bool) {
    let fixed = Role::parse(cfg.role.trim());
    let auto = fixed.is_none() && cfg.auto.enable && cfg.role.trim() != "none";
    (fixed, auto)
}

/// Write `bytes` to `path` for root only (0600, by a rename: never half a file).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir, "creating")?;
    }
    let tmp = path.with_extension("kairos-tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .at(&tmp, "creating")?;
    f.write_all(bytes).at(&tmp, "writing")?;
    std::fs::rename(&tmp, path).at(path, "renaming into place")
}

/// Whether this tick bootstraps Kademlia and looks up the rendezvous providers: every 5 ticks
/// during the first minute and while the node has no peer, then every 300. Each bootstrap
/// and lookup asks (and dials) up to 20 peers; every 5 s on every node that was a steady
/// stream of queries into a fleet whose members mDNS and the mesh had long found.
/// With `p2p.bootstrap` peers the first minute is frequent too (other sites are found
/// through the DHT); a node on a LAN finds its peers by mDNS.
pub fn dht_due(tick: u64, connected: bool, bootstrap: bool) -> bool {
    let every = if !connected || (bootstrap && tick <= 60) {
        5
    } else {
        300
    };
    tick % every == 1
}

/// Whether this tick sends the full state (see `Node::publish`): `sent` is the digest and
/// tick of the last full state sent.
pub fn full_due(
    always: bool,
    sent: Option<(u64, u64)>,
    digest: u64,
    asked: bool,
    tick: u64,
) -> bool {
    match sent {
        _ if always || asked => true,
        None => true,
        Some((d, at)) => d != digest || tick.saturating_sub(at) >= FULL_EVERY,
    }
}

/// Ticks the live set must stay unchanged before a leader assigns roles. Nodes that start
/// together can each see only part of the mesh for a tick or two; a node that then counts
/// itself leader on that partial view would make itself master next to another such node,
/// and roles are never taken back. Two announce intervals of an unchanged view costs that much
/// time once, at formation, and removes the race.
const SETTLE_TICKS: u32 = 2;

#[derive(Default)]
struct Settle {
    last: Vec<String>,
    same_for: u32,
}

impl Settle {
    /// Records this tick's live set; true once it has been the same for `SETTLE_TICKS` ticks.
    fn observe(&mut self, live: &[String]) -> bool {
        if self.last.as_slice() == live {
            self.same_for = self.same_for.saturating_add(1);
        } else {
            self.last = live.to_vec();
            self.same_for = 0;
        }
        self.same_for >= SETTLE_TICKS
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn roles_wait_until_the_live_set_has_settled() {
        let mut s = super::Settle::default();
        let a = vec!["n0".to_owned(), "n2".to_owned()];
        let b = vec!["n0".to_owned(), "n1".to_owned(), "n2".to_owned()];
        assert!(!s.observe(&a), "first sight of a partial view");
        assert!(!s.observe(&b), "a node appeared: start over");
        assert!(!s.observe(&b));
        assert!(s.observe(&b), "unchanged for two ticks");
        assert!(!s.observe(&a), "a node left: start over");
    }

    use super::*;

    #[test]
    fn dht_lookups_are_often_at_first_then_minutes_apart() {
        let due = |c: bool, b: bool| {
            (1..=1000u64)
                .filter(|t| dht_due(*t, c, b))
                .collect::<Vec<_>>()
        };
        // With bootstrap peers: every 5 ticks for a minute, then every 300.
        let boot = due(true, true);
        assert_eq!(&boot[..4], &[1, 6, 11, 16]);
        assert!(boot.contains(&56) && !boot.contains(&61));
        assert_eq!(&boot[12..], &[301, 601, 901]);
        // On a LAN once connected: minutes apart from the start.
        assert_eq!(due(true, false), vec![1, 301, 601, 901]);
        // Alone, it keeps looking every 5 ticks.
        assert_eq!(due(false, false).len(), 200);
        assert_eq!(due(false, true).len(), 200);
    }

    #[test]
    fn full_state_on_change_request_and_every_30_ticks_else_heartbeats() {
        assert!(full_due(false, None, 7, false, 1), "nothing sent yet");
        assert!(!full_due(false, Some((7, 1)), 7, false, 2));
        assert!(full_due(false, Some((7, 1)), 8, false, 2), "changed");
        assert!(full_due(false, Some((7, 1)), 7, true, 2), "asked");
        assert!(!full_due(false, Some((7, 1)), 7, false, 30));
        assert!(full_due(false, Some((7, 1)), 7, false, 31), "30 ticks on");
        assert!(full_due(true, Some((7, 1)), 7, false, 2), "pairing: always");
    }

    #[test]
    fn k3s_specs_per_role() {
        let ip = Ipv4Addr::new(10, 1, 0, 3);
        let m = k3s_spec(Role::Master, "edgevpn0", ip, None, None);
        assert!(m.server);
        assert!(m.args.contains(&"--flannel-iface=edgevpn0".to_string()));
        assert!(m.args.contains(&"--node-ip=10.1.0.3".to_string()));
        assert!(m.env.is_empty());
        let url = server_url("10.1.0.9");
        let w = k3s_spec(Role::Worker, "edgevpn0", ip, Some((&url, "TOK")), None);
        assert!(!w.server);
        assert!(
            w.env
                .contains(&("K3S_URL".into(), "https://10.1.0.9:6443".into()))
        );
        assert!(w.env.contains(&("K3S_TOKEN".into(), "TOK".into())));
        let c = k3s_spec(Role::MasterClusterInit, "edgevpn0", ip, None, None);
        assert!(c.args.contains(&"--cluster-init".to_string()));
        let h = k3s_spec(Role::MasterHa, "edgevpn0", ip, Some((&url, "TOK")), None);
        assert!(
            h.server
                && h.args
                    .contains(&"--server=https://10.1.0.9:6443".to_string())
        );
        assert!(h.env.contains(&("K3S_TOKEN".into(), "TOK".into())));
        // An external datastore: every server uses it, nobody runs --cluster-init.
        let db = Some("postgres://k3s:pw@db:5432/k3s");
        let c = k3s_spec(Role::MasterClusterInit, "edgevpn0", ip, None, db);
        assert!(!c.args.contains(&"--cluster-init".to_string()));
        assert!(
            c.args
                .contains(&"--datastore-endpoint=postgres://k3s:pw@db:5432/k3s".to_string())
        );
        let w = k3s_spec(Role::Worker, "edgevpn0", ip, Some((&url, "TOK")), db);
        assert!(!w.args.iter().any(|a| a.starts_with("--datastore")));
    }

    #[test]
    fn p2p_role_and_auto_enable_decide_the_role_source() {
        let cfg = |role: &str, auto: bool| {
            let mut c = P2pConfig {
                role: role.into(),
                ..P2pConfig::default()
            };
            c.auto.enable = auto;
            role_source(&c)
        };
        assert_eq!(cfg("", true), (None, true));
        assert_eq!(cfg("auto", true), (None, true));
        assert_eq!(cfg("master", true), (Some(Role::Master), false));
        assert_eq!(cfg(" worker ", true), (Some(Role::Worker), false));
        assert_eq!(cfg("none", true), (None, false));
        assert_eq!(cfg("", false), (None, false));
    }

    #[test]
    fn connection_paths_and_bootstrap_addresses() {
        let r: PeerId = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
            .parse()
            .unwrap();
        let b = PeerId::random();
        let relayed: Multiaddr = format!("/ip4/10.240.0.1/tcp/4001/p2p/{r}/p2p-circuit/p2p/{b}")
            .parse()
            .unwrap();
        let dialer = ConnectedPoint::Dialer {
            address: relayed.clone(),
            role_override: libp2p::core::Endpoint::Dialer,
            port_use: libp2p::core::transport::PortUse::New,
        };
        assert_eq!(
            path_of(&dialer, |_| None),
            (format!("relayed via {r}"), relayed)
        );
        let listener = ConnectedPoint::Listener {
            local_addr: format!("/ip4/10.240.0.1/tcp/4001/p2p/{r}/p2p-circuit")
                .parse()
                .unwrap(),
            send_back_addr: format!("/p2p/{b}").parse().unwrap(),
        };
        assert_eq!(path_of(&listener, |_| None).0, format!("relayed via {r}"));
        // The listening side's local address as libp2p reports it: without the relay's ID.
        let listener = ConnectedPoint::Listener {
            local_addr: "/ip4/10.240.0.1/tcp/4001/p2p-circuit".parse().unwrap(),
            send_back_addr: format!("/p2p/{b}").parse().unwrap(),
        };
        assert_eq!(path_of(&listener, |_| None).0, "relayed via a relay");
        let at = |a: &Multiaddr| (a.to_string() == "/ip4/10.240.0.1/tcp/4001").then_some(r);
        assert_eq!(path_of(&listener, at).0, format!("relayed via {r}"));
        let direct: Multiaddr = "/ip4/10.240.0.2/udp/4001/quic-v1".parse().unwrap();
        let d = ConnectedPoint::Listener {
            local_addr: "/ip4/10.240.0.1/udp/4001/quic-v1".parse().unwrap(),
            send_back_addr: direct.clone(),
        };
        assert_eq!(path_of(&d, |_| None), ("direct".to_owned(), direct.clone()));
        assert_eq!(split_peer(&direct), (direct.clone(), None));
        let with_id = direct.clone().with(Protocol::P2p(r));
        assert_eq!(split_peer(&with_id), (direct, Some(r)));
    }

    #[test]
    fn uuid_from_root() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(node_uuid(dir.path()), Err(NodeError::Identity(_))));
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/machine-id"), "abc\n").unwrap();
        std::fs::write(dir.path().join("etc/hostname"), "node1\n").unwrap();
        assert_eq!(node_uuid(dir.path()).unwrap(), "abc-node1");
    }
}
