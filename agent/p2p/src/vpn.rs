//! The VPN datapath: IPv4 packets read from the TUN interface go to the peer that leased the
//! destination address, over one long-lived libp2p stream per peer, as
//! `[len: u16 BE][virtio-net header][packet]` frames (`len` counts the packet); packets
//! arriving on streams are written to the TUN interface.
//!
//! The interface runs with offloads (IFF_VNET_HDR, TSO and checksum offload), as a VM's
//! virtio-net does: the kernel hands over a TCP send of up to 64 KiB as one packet with a
//! header saying how to cut it, and takes such packets back on the other node without
//! cutting them. Per MTU-sized packet the two agents spent 12 µs of CPU (TUN read, channel
//! hop, stream write, noise and yamux, stream read, TUN write; mesh-bench): with offloads that
//! cost is paid once per 64 KiB instead of once per 1.4 KiB. The header is the kernel's struct virtio_net_hdr,
//! in the host's byte order (little-endian on every target Kairos builds for).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, DeviceBuilder, VIRTIO_NET_HDR_LEN};

use crate::lease::Range;

/// MTU of the interface: below the 1500 of an Ethernet path; what flannel sees.
pub const MTU: u16 = 1420;
/// Packets queued per peer before new ones are dropped (as a full NIC queue would); with
/// offloads a packet is up to 64 KiB, so this bounds a peer's queue at 8 MiB.
const QUEUE: usize = 128;
/// The virtio-net header in front of every packet on the interface and on the wire.
const HDR: usize = VIRTIO_NET_HDR_LEN;
/// The largest IPv4 packet (what a TSO packet is bounded by, its total length being a u16).
const MAX_PACKET: usize = u16::MAX as usize;

/// VPN address → peer that owns it; the node rewrites it as leases and peers change.
pub type Routes = Arc<RwLock<HashMap<Ipv4Addr, PeerId>>>;

#[derive(Debug, thiserror::Error)]
pub enum VpnError {
    /// The error is in the message, so not also the source (no repeat in chains).
    #[error("creating TUN interface {name} with {addr}/{prefix}: {err}")]
    Create {
        name: String,
        addr: Ipv4Addr,
        prefix: u8,
        err: std::io::Error,
    },
}

pub fn create(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<Arc<AsyncDevice>, VpnError> {
    DeviceBuilder::new()
        .name(name)
        .ipv4(addr, prefix, None)
        .mtu(MTU)
        .offload(true)
        .build_async()
        .map(Arc::new)
        .map_err(|err| VpnError::Create {
            name: name.to_owned(),
            addr,
            prefix,
            err,
        })
}

/// Destination of an IPv4 packet; None for anything else (IPv6, runts).
pub fn ipv4_dst(pkt: &[u8]) -> Option<Ipv4Addr> {
    (pkt.len() >= 20 && pkt[0] >> 4 == 4).then(|| Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))
}

pub fn ipv4_src(pkt: &[u8]) -> Option<Ipv4Addr> {
    (pkt.len() >= 20 && pkt[0] >> 4 == 4).then(|| Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]))
}

/// Why a packet does not pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Not IPv4, or shorter than its header.
    NotIpv4,
    /// The destination is not a host of the VPN range: the VPN is no way to other networks
    /// (a node with IP forwarding on, as K3s sets it, would pass it on).
    OutsideVpn(Ipv4Addr),
    /// The source is not the address the sending peer leased.
    Spoofed { src: Ipv4Addr },
    /// No peer leased the destination.
    NoRoute(Ipv4Addr),
}

/// virtio_net_hdr flags a peer may send: NEEDS_CSUM (the checksum is to be finished, as the
/// sending kernel left it) and DATA_VALID.
const VNET_FLAGS: u8 = 0x01 | 0x02;
/// gso_type values of an IPv4 VPN: none, TCPv4, UDP (USO); the ECN bit (0x80) may be set.
const VNET_GSO_TYPES: [u8; 3] = [0, 1, 5];

/// A virtio-net header from a peer is one the kernel would have produced for an IPv4 packet;
/// anything else (IPv6 segmentation, unknown flags, segmenting into 0-byte pieces) is
/// dropped before the kernel sees it.
pub fn vnet_ok(hdr: &[u8]) -> bool {
    let [flags, gso, _, _, size_lo, size_hi, ..] = *hdr else {
        return false;
    };
    let gso_size = u16::from_le_bytes([size_lo, size_hi]);
    flags & !VNET_FLAGS == 0
        && VNET_GSO_TYPES.contains(&(gso & 0x7f))
        && (gso & 0x7f == 0 || gso_size > 0)
}

/// A packet read from the TUN interface: the peer to send it to.
pub fn outbound_peer(
    pkt: &[u8],
    range: Range,
    routes: &HashMap<Ipv4Addr, PeerId>,
) -> Result<PeerId, Dropped> {
    let dst = ipv4_dst(pkt).ok_or(Dropped::NotIpv4)?;
    if !range.contains_host(dst) {
        return Err(Dropped::OutsideVpn(dst));
    }
    routes.get(&dst).copied().ok_or(Dropped::NoRoute(dst))
}

/// A packet received from `peer`: written to the TUN interface only if it is for the VPN
/// range and comes from the address `peer` leased.
pub fn inbound_ok(
    pkt: &[u8],
    peer: PeerId,
    range: Range,
    routes: &HashMap<Ipv4Addr, PeerId>,
) -> Result<(), Dropped> {
    let (Some(src), Some(dst)) = (ipv4_src(pkt), ipv4_dst(pkt)) else {
        return Err(Dropped::NotIpv4);
    };
    if !range.contains_host(dst) {
        return Err(Dropped::OutsideVpn(dst));
    }
    if routes.get(&src) != Some(&peer) {
        return Err(Dropped::Spoofed { src });
    }
    Ok(())
}

/// Start the datapath tasks; they live as long as the runtime.
pub fn spawn(
    dev: Arc<AsyncDevice>,
    range: Range,
    routes: Routes,
    mut control: libp2p_stream::Control,
    protocol: StreamProtocol,
) -> Result<(), String> {
    let incoming = control
        .accept(protocol.clone())
        .map_err(|e| format!("registering VPN protocol {protocol}: {e}"))?;
    tokio::spawn(inbound(dev.clone(), range, routes.clone(), incoming));
    tokio::spawn(outbound(dev, range, routes, control, protocol));
    Ok(())
}

/// A frame to send: `buf[..len]`. Large frames travel in the reader's full-size buffer
/// (handed back through the spare pool after the write), small ones in a copy of their size.
struct Frame {
    buf: Vec<u8>,
    len: usize,
}

/// Frames at least this long are written to the stream as they are (one yamux frame's worth:
/// copying them into a batch first would only add a copy); shorter ones are gathered.
const DIRECT: usize = 16 * 1024;
/// Full-size buffers kept for the reader, so a 64 KiB packet is not copied or allocated.
const SPARE: usize = 32;

async fn outbound(
    dev: Arc<AsyncDevice>,
    range: Range,
    routes: Routes,
    control: libp2p_stream::Control,
    protocol: StreamProtocol,
) {
    let mut queues: HashMap<PeerId, mpsc::Sender<Frame>> = HashMap::new();
    let (spare_tx, mut spare_rx) = mpsc::channel::<Vec<u8>>(SPARE);
    let full = || vec![0u8; 2 + HDR + MAX_PACKET];
    // Read after two bytes of room, so a frame is one contiguous slice: length, header, packet.
    let mut buf = full();
    loop {
        let n = match dev.recv(&mut buf[2..]).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("kairos-p2p: vpn: reading the TUN interface: {e}; datapath stopped");
                return;
            }
        };
        let Some(len) = n.checked_sub(HDR).and_then(|l| u16::try_from(l).ok()) else {
            continue;
        };
        buf[..2].copy_from_slice(&len.to_be_bytes());
        let pkt = &buf[2 + HDR..2 + n];
        let peer = match routes.read() {
            Ok(r) => outbound_peer(pkt, range, &r).ok(),
            Err(_) => None,
        };
        let Some(peer) = peer else { continue };
        let q = queues.entry(peer).or_insert_with(|| {
            start_sender(peer, control.clone(), protocol.clone(), spare_tx.clone())
        });
        if q.is_closed() {
            *q = start_sender(peer, control.clone(), protocol.clone(), spare_tx.clone());
        }
        let frame = if 2 + n >= DIRECT {
            let next = spare_rx.try_recv().unwrap_or_else(|_| full());
            Frame {
                buf: std::mem::replace(&mut buf, next),
                len: 2 + n,
            }
        } else {
            Frame {
                buf: buf[..2 + n].to_vec(),
                len: 2 + n,
            }
        };
        // A full queue drops the packet; TCP above retransmits.
        if let Err(mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f)) =
            q.try_send(frame)
            && f.buf.len() > DIRECT
        {
            let _ = spare_tx.try_send(f.buf);
        }
    }
}

fn start_sender(
    peer: PeerId,
    mut control: libp2p_stream::Control,
    protocol: StreamProtocol,
    spare: mpsc::Sender<Vec<u8>>,
) -> mpsc::Sender<Frame> {
    let (tx, mut rx) = mpsc::channel::<Frame>(QUEUE);
    tokio::spawn(async move {
        let mut stream = match control.open_stream(peer, protocol).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kairos-p2p: vpn: opening a stream to {peer}: {e}");
                return;
            }
        };
        let mut small: Vec<u8> = Vec::with_capacity(2 * DIRECT);
        while let Some(frame) = rx.recv().await {
            let mut next = Some(frame);
            // Write everything queued, then flush once: fewer, larger yamux frames.
            while let Some(f) = next.take() {
                let bytes = &f.buf[..f.len];
                if bytes.len() >= DIRECT {
                    if !small.is_empty() && stream.write_all(&small).await.is_err() {
                        return;
                    }
                    small.clear();
                    if stream.write_all(bytes).await.is_err() {
                        return;
                    }
                    let _ = spare.try_send(f.buf);
                } else {
                    small.extend_from_slice(bytes);
                    if small.len() >= DIRECT {
                        if stream.write_all(&small).await.is_err() {
                            return;
                        }
                        small.clear();
                    }
                }
                next = rx.try_recv().ok();
            }
            if !small.is_empty() {
                if stream.write_all(&small).await.is_err() {
                    return;
                }
                small.clear();
            }
            if stream.flush().await.is_err() {
                return;
            }
        }
    });
    tx
}

async fn inbound(
    dev: Arc<AsyncDevice>,
    range: Range,
    routes: Routes,
    mut incoming: libp2p_stream::IncomingStreams,
) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let dev = dev.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            // Read straight from the stream: a read buffer in between would copy every 64 KiB
            // packet once more.
            let mut len = [0u8; 2];
            let mut buf = vec![0u8; HDR + MAX_PACKET];
            loop {
                if stream.read_exact(&mut len).await.is_err() {
                    return;
                }
                let n = HDR + u16::from_be_bytes(len) as usize;
                if stream.read_exact(&mut buf[..n]).await.is_err() {
                    return;
                }
                let (hdr, pkt) = buf[..n].split_at(HDR);
                // A peer can neither inject traffic in another node's name nor use this node
                // as a router to other networks, nor hand the kernel a header it would not
                // make itself.
                let ok = vnet_ok(hdr)
                    && match routes.read() {
                        Ok(r) => inbound_ok(pkt, peer, range, &r).is_ok(),
                        Err(_) => false,
                    };
                if !ok {
                    continue;
                }
                if let Err(e) = dev.send(&buf[..n]).await {
                    eprintln!("kairos-p2p: vpn: writing to the TUN interface: {e}");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_headers_the_kernel_makes_for_ipv4_pass() {
        assert_eq!(HDR, 10, "struct virtio_net_hdr without num_buffers");
        let hdr = |flags: u8, gso: u8, size: u16| {
            let s = size.to_le_bytes();
            [flags, gso, 0, 0, s[0], s[1], 0, 0, 0, 0]
        };
        assert!(vnet_ok(&hdr(0, 0, 0)), "a plain packet");
        assert!(
            vnet_ok(&hdr(1, 1, 1368)),
            "TCPv4 segmentation, checksum to finish"
        );
        assert!(vnet_ok(&hdr(1, 0x81, 1368)), "with ECN");
        assert!(vnet_ok(&hdr(1, 5, 1392)), "UDP segmentation");
        assert!(!vnet_ok(&hdr(0, 4, 1368)), "TCPv6 on an IPv4 VPN");
        assert!(!vnet_ok(&hdr(0, 3, 1368)), "UFO");
        assert!(!vnet_ok(&hdr(1, 1, 0)), "segments of 0 bytes");
        assert!(!vnet_ok(&hdr(4, 0, 0)), "unknown flag");
        assert!(!vnet_ok(&[0u8; 4]), "short");
    }

    #[test]
    fn parses_ipv4_headers() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[10, 1, 0, 1]);
        p[16..20].copy_from_slice(&[10, 1, 0, 2]);
        assert_eq!(ipv4_dst(&p), Some(Ipv4Addr::new(10, 1, 0, 2)));
        assert_eq!(ipv4_src(&p), Some(Ipv4Addr::new(10, 1, 0, 1)));
        p[0] = 0x60;
        assert_eq!(ipv4_dst(&p), None);
        assert_eq!(ipv4_dst(&p[..10]), None);
    }

    fn packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn packets_stay_inside_the_vpn_and_carry_their_senders_address() {
        let range = Range::parse("10.1.0.0/24").expect("range");
        let (a, b) = (PeerId::random(), PeerId::random());
        let routes = HashMap::from([
            (Ipv4Addr::new(10, 1, 0, 1), a),
            (Ipv4Addr::new(10, 1, 0, 2), b),
        ]);
        let me = [10, 1, 0, 3];
        // Inbound from a: its own address to us passes.
        assert_eq!(
            inbound_ok(&packet([10, 1, 0, 1], me), a, range, &routes),
            Ok(())
        );
        // To the internet, the LAN, the range's broadcast: dropped, not forwarded.
        for dst in [
            [8, 8, 8, 8],
            [192, 168, 1, 1],
            [10, 1, 0, 255],
            [10, 1, 1, 3],
        ] {
            assert_eq!(
                inbound_ok(&packet([10, 1, 0, 1], dst), a, range, &routes),
                Err(Dropped::OutsideVpn(Ipv4Addr::from(dst)))
            );
        }
        // b's address, an unleased one, a foreign one, all sent by a: spoofed.
        for src in [[10, 1, 0, 2], [10, 1, 0, 9], [192, 168, 1, 1]] {
            assert_eq!(
                inbound_ok(&packet(src, me), a, range, &routes),
                Err(Dropped::Spoofed {
                    src: Ipv4Addr::from(src)
                })
            );
        }
        let mut v6 = packet([10, 1, 0, 1], me);
        v6[0] = 0x60;
        assert_eq!(inbound_ok(&v6, a, range, &routes), Err(Dropped::NotIpv4));
        // Outbound: to a leased address goes to its peer; outside the range goes nowhere,
        // even if a route for it were there.
        assert_eq!(
            outbound_peer(&packet(me, [10, 1, 0, 2]), range, &routes),
            Ok(b)
        );
        let mut bad = routes.clone();
        bad.insert(Ipv4Addr::new(8, 8, 8, 8), a);
        assert_eq!(
            outbound_peer(&packet(me, [8, 8, 8, 8]), range, &bad),
            Err(Dropped::OutsideVpn(Ipv4Addr::new(8, 8, 8, 8)))
        );
        assert_eq!(
            outbound_peer(&packet(me, [10, 1, 0, 7]), range, &routes),
            Err(Dropped::NoRoute(Ipv4Addr::new(10, 1, 0, 7)))
        );
    }
}
