//! The VPN datapath: IPv4 packets read from the TUN interface go to the peer that leased the
//! destination address, over one long-lived libp2p stream per peer, as `[len: u16 BE][packet]`
//! frames; packets arriving on streams are written to the TUN interface.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use futures::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, DeviceBuilder};

/// MTU of the interface: below the 1500 of an Ethernet path; what flannel sees.
pub const MTU: u16 = 1420;
/// Packets queued per peer before new ones are dropped (as a full NIC queue would).
const QUEUE: usize = 1024;

/// VPN address → peer that owns it; the node rewrites it as leases and peers change.
pub type Routes = Arc<RwLock<HashMap<Ipv4Addr, PeerId>>>;

#[derive(Debug, thiserror::Error)]
pub enum VpnError {
    #[error("creating TUN interface {name} with {addr}/{prefix}: {source}")]
    Create {
        name: String,
        addr: Ipv4Addr,
        prefix: u8,
        source: std::io::Error,
    },
}

pub fn create(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<Arc<AsyncDevice>, VpnError> {
    DeviceBuilder::new()
        .name(name)
        .ipv4(addr, prefix, None)
        .mtu(MTU)
        .build_async()
        .map(Arc::new)
        .map_err(|source| VpnError::Create {
            name: name.to_owned(),
            addr,
            prefix,
            source,
        })
}

/// Destination of an IPv4 packet; None for anything else (IPv6, runts).
pub fn ipv4_dst(pkt: &[u8]) -> Option<Ipv4Addr> {
    (pkt.len() >= 20 && pkt[0] >> 4 == 4).then(|| Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))
}

pub fn ipv4_src(pkt: &[u8]) -> Option<Ipv4Addr> {
    (pkt.len() >= 20 && pkt[0] >> 4 == 4).then(|| Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]))
}

/// Start the datapath tasks; they live as long as the runtime.
pub fn spawn(
    dev: Arc<AsyncDevice>,
    routes: Routes,
    mut control: libp2p_stream::Control,
    protocol: StreamProtocol,
) -> Result<(), String> {
    let incoming = control
        .accept(protocol.clone())
        .map_err(|e| format!("registering VPN protocol {protocol}: {e}"))?;
    tokio::spawn(inbound(dev.clone(), routes.clone(), incoming));
    tokio::spawn(outbound(dev, routes, control, protocol));
    Ok(())
}

async fn outbound(
    dev: Arc<AsyncDevice>,
    routes: Routes,
    control: libp2p_stream::Control,
    protocol: StreamProtocol,
) {
    let mut queues: HashMap<PeerId, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match dev.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("kairos-p2p: vpn: reading the TUN interface: {e}; datapath stopped");
                return;
            }
        };
        let pkt = &buf[..n];
        let Some(dst) = ipv4_dst(pkt) else { continue };
        let peer = match routes.read() {
            Ok(r) => r.get(&dst).copied(),
            Err(_) => None,
        };
        let Some(peer) = peer else { continue };
        let q = queues
            .entry(peer)
            .or_insert_with(|| start_sender(peer, control.clone(), protocol.clone()));
        if q.is_closed() {
            *q = start_sender(peer, control.clone(), protocol.clone());
        }
        // A full queue drops the packet; TCP above retransmits.
        let _ = q.try_send(pkt.to_vec());
    }
}

fn start_sender(
    peer: PeerId,
    mut control: libp2p_stream::Control,
    protocol: StreamProtocol,
) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    tokio::spawn(async move {
        let stream = match control.open_stream(peer, protocol).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kairos-p2p: vpn: opening a stream to {peer}: {e}");
                return;
            }
        };
        let mut w = BufWriter::with_capacity(64 * 1024, stream);
        while let Some(pkt) = rx.recv().await {
            let mut batch = Some(pkt);
            // Write everything queued, then flush once: fewer, larger yamux frames.
            while let Some(p) = batch.take() {
                let len = (p.len() as u16).to_be_bytes();
                if w.write_all(&len).await.is_err() || w.write_all(&p).await.is_err() {
                    return;
                }
                batch = rx.try_recv().ok();
            }
            if w.flush().await.is_err() {
                return;
            }
        }
    });
    tx
}

async fn inbound(
    dev: Arc<AsyncDevice>,
    routes: Routes,
    mut incoming: libp2p_stream::IncomingStreams,
) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let dev = dev.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            let mut len = [0u8; 2];
            let mut buf = vec![0u8; 65536];
            loop {
                if stream.read_exact(&mut len).await.is_err() {
                    return;
                }
                let n = u16::from_be_bytes(len) as usize;
                if stream.read_exact(&mut buf[..n]).await.is_err() {
                    return;
                }
                let pkt = &buf[..n];
                // Only accept packets whose source the sending peer leased: a peer cannot
                // inject traffic in another node's name.
                let owner = ipv4_src(pkt).and_then(|s| routes.read().ok()?.get(&s).copied());
                if owner != Some(peer) {
                    continue;
                }
                if let Err(e) = dev.send(pkt).await {
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
}
