//! The libp2p side: transports (TCP and QUIC, noise, yamux, a relay client for peers behind
//! NAT, with DCUtR hole punching), discovery (mDNS on the LAN, Kademlia with a rendezvous key
//! derived from the token elsewhere), the ledger topic on gossipsub, and raw streams for VPN
//! packets.

use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Multiaddr, StreamProtocol, Swarm, connection_limits, dcutr, gossipsub, identify, identity, kad,
    mdns, noise, relay, tcp, yamux,
};

use sha2::{Digest, Sha256};

use crate::keys;
use crate::token::Token;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("setting up the libp2p {what}: {msg}")]
    Build { what: &'static str, msg: String },
    #[error("listening on {addr}: {msg}")]
    Listen { addr: String, msg: String },
}

fn build_err(what: &'static str) -> impl Fn(String) -> NetError {
    move |msg| NetError::Build { what, msg }
}

/// Connections one peer may hold with us at once: TCP and QUIC, dialled from both sides at
/// the same moment, is four; more is a peer opening connections to tie up our resources.
pub const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Incoming connections still in their handshake, from everyone together.
pub const MAX_PENDING_INCOMING: u32 = 64;
/// Gossipsub mesh degree (libp2p's default is 6). Messages reach every node in a few hops on
/// a LAN; each node receives each message about this many times.
pub const MESH_N: usize = 4;
/// Bytes of SHA-256 that name a gossip message (what IHAVE/IWANT carry): libp2p's default
/// ID is the sender's peer ID and sequence number, some 70 bytes.
const MESSAGE_ID_LEN: usize = 16;
pub const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(60);

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// First, so a connection over the limits is refused before the others see it.
    pub limits: connection_limits::Behaviour,
    pub gossipsub: gossipsub::Behaviour,
    pub mdns: mdns::tokio::Behaviour,
    pub identify: identify::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub relay: relay::client::Behaviour,
    /// Circuit relay v2 server, on when `p2p.relay.server`.
    pub relay_server: Toggle<relay::Behaviour>,
    pub dcutr: dcutr::Behaviour,
    pub stream: libp2p_stream::Behaviour,
}

/// Names derived from the token: peers of another network (another token) use other names,
/// so they do not share a topic, and are disconnected after identify.
#[derive(Debug, Clone)]
pub struct Names {
    pub topic: gossipsub::IdentTopic,
    /// identify's protocol version: from the token's `mdns` name.
    pub protocol_version: String,
    pub vpn: StreamProtocol,
    pub kad: StreamProtocol,
}

impl Names {
    pub fn new(token: &Token, network_id: &str) -> Result<Names, NetError> {
        let proto = |s: String| {
            StreamProtocol::try_from_owned(s).map_err(|e| NetError::Build {
                what: "protocol name",
                msg: e.to_string(),
            })
        };
        Ok(Names {
            topic: gossipsub::IdentTopic::new(format!(
                "kairos/{}/{}",
                network_id,
                keys::name(&token.room, "room")
            )),
            protocol_version: format!("/kairos/{}", keys::name(&token.mdns, "mdns")),
            // 2: frames carry a virtio-net header (vpn.rs); a node of the first framing does
            // not negotiate this protocol, so the two never misread each other's frames.
            vpn: proto(format!("/kairos/vpn/{}/2", keys::name(&token.room, "vpn")))?,
            kad: proto(format!(
                "/kairos/kad/{}/1",
                keys::name(&token.rendezvous, "kad")
            ))?,
        })
    }
}

/// What a relay server allows. libp2p's defaults (2 minutes and 128 KiB per circuit, 16
/// circuits) suit a relay that only bridges the way to a hole punch; here the relay may carry a
/// site's gossip and VPN packets for good when the NATs defeat hole punching, so circuits get
/// no byte limit and last hours (peers dial again when one ends). Reservations stay rate
/// limited per peer and per IP (libp2p's defaults).
pub fn relay_server_config() -> relay::Config {
    relay::Config {
        max_reservations: 1024,
        max_circuits: 1024,
        max_circuits_per_peer: 64,
        max_circuit_duration: Duration::from_secs(12 * 3600),
        // 0: no limit (libp2p's copy loop checks `> 0`).
        max_circuit_bytes: 0,
        ..relay::Config::default()
    }
}

/// The swarm with `keypair` as the node's identity: the same key signs its ledger entries.
/// `relay_server`: serve circuit relay v2 (`p2p.relay.server`).
pub fn build_swarm(
    keypair: &identity::Keypair,
    token: &Token,
    names: &Names,
    heartbeat: Duration,
    relay_server: bool,
) -> Result<Swarm<Behaviour>, NetError> {
    let max = usize::try_from(token.max_message_size).unwrap_or(usize::MAX);
    let names = names.clone();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| build_err("TCP transport")(e.to_string()))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| build_err("relay client")(e.to_string()))?
        .with_behaviour(|key: &identity::Keypair, relay| {
            let peer = key.public().to_peer_id();
            let gs_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(heartbeat)
                .max_transmit_size(max)
                // Fleet-sized meshes (mesh-scale): a node's own message goes to its mesh peers
                // only, not to every connected peer (flood publish), so each node receives a
                // message about MESH_N times instead of once per connection; a smaller mesh
                // and gossip to few non-mesh peers, with short message IDs, keep the
                // IHAVE/IWANT control traffic flat in N.
                .flood_publish(false)
                .mesh_n(MESH_N)
                .mesh_n_low(MESH_N - 1)
                .mesh_n_high(2 * MESH_N)
                .mesh_outbound_min(MESH_N / 2)
                .gossip_lazy(3)
                .gossip_factor(0.1)
                .history_gossip(2)
                .message_id_fn(|m: &gossipsub::Message| {
                    // The payload is sealed with a random nonce: its hash names it uniquely.
                    let h = Sha256::digest(&m.data);
                    gossipsub::MessageId::new(&h[..MESSAGE_ID_LEN])
                })
                // We check every message (size, key, tag) before it is passed on, so junk
                // from a peer without the token goes no further than its first hop.
                .validate_messages()
                .validation_mode(gossipsub::ValidationMode::Strict)
                .build()
                .map_err(|e| e.to_string())?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gs_config,
            )
            .map_err(|e| e.to_string())?;
            let mdns = mdns::tokio::Behaviour::new(
                mdns::Config {
                    // A node that boots probes at once (libp2p starts at 0.5 s and doubles
                    // until the first answer), so it finds its LAN peers in seconds whatever
                    // this is. Every node answers every query to the multicast group, so the
                    // answers every node parses grow as N² per interval: keep it long.
                    query_interval: MDNS_QUERY_INTERVAL,
                    ..Default::default()
                },
                peer,
            )?;
            let identify = identify::Behaviour::new(
                identify::Config::new(names.protocol_version.clone(), key.public())
                    .with_agent_version(format!("kairos-p2p/{}", env!("CARGO_PKG_VERSION"))),
            );
            let mut kad_config = kad::Config::new(names.kad.clone());
            // The node bootstraps Kademlia itself (`Node::discover`): often until it has
            // peers, minutes apart after.
            kad_config.set_periodic_bootstrap_interval(None);
            let mut kad =
                kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_config);
            kad.set_mode(Some(kad::Mode::Server));
            let limits = connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                    .with_max_pending_incoming(Some(MAX_PENDING_INCOMING)),
            );
            Ok(Behaviour {
                limits,
                gossipsub,
                mdns,
                identify,
                kad,
                relay,
                relay_server: Toggle::from(
                    relay_server.then(|| relay::Behaviour::new(peer, relay_server_config())),
                ),
                dcutr: dcutr::Behaviour::new(peer),
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| build_err("behaviours")(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    Ok(swarm)
}

/// Listen on every address (TCP and QUIC, IPv4) on `port` (0: any).
pub fn listen(swarm: &mut Swarm<Behaviour>, port: u16) -> Result<(), NetError> {
    for addr in [
        format!("/ip4/0.0.0.0/tcp/{port}"),
        format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
    ] {
        let ma: Multiaddr =
            addr.parse()
                .map_err(|e: libp2p::multiaddr::Error| NetError::Listen {
                    addr: addr.clone(),
                    msg: e.to_string(),
                })?;
        swarm.listen_on(ma).map_err(|e| NetError::Listen {
            addr: addr.clone(),
            msg: e.to_string(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_id_separates_the_ledger_topic() {
        let t = Token::generate();
        let a = Names::new(&t, "kairos").unwrap();
        let b = Names::new(&t, "hacluster").unwrap();
        assert_ne!(a.topic.hash(), b.topic.hash());
        assert!(b.topic.to_string().starts_with("kairos/hacluster/"));
        // The same id and token: the same names on every node.
        assert_eq!(
            Names::new(&t, "kairos").unwrap().topic.hash(),
            a.topic.hash()
        );
    }
}
