//! The Kairos P2P mesh (SPEC.md section 7 and 8): nodes that share one `network_token` find
//! each other, keep an encrypted ledger, elect a leader, get roles and VPN addresses, and pair
//! by QR code.
//!
//! The pure parts (token, key schedule, ledger, roles, leases, QR) are separate modules with
//! unit tests; `node`, `net` and `vpn` are the runtime on libp2p, tokio and a TUN device.

pub mod config;
pub mod keys;
pub mod lease;
pub mod ledger;
pub mod net;
pub mod node;
pub mod qr;
pub mod roles;
pub mod token;
pub mod vpn;

pub use config::P2pConfig;
pub use token::Token;
