//! The shared ledger: a key/value map every node holds a copy of, kept in sync over gossipsub.
//!
//! Every node announces the entries it owns with a time to live: in full when they change
//! (and every 30 ticks, and when a peer asks), else each tick a heartbeat naming their
//! digest, which keeps the entries of that full state alive on the nodes that hold it. A node
//! that hears a digest it does not hold (it joined late, or missed a change) asks for the full
//! state in its next message; the entries of a node that left expire by themselves. Conflicting writes to one key resolve by (stamp, owner): the newest
//! wins everywhere, whatever the arrival order.
//!
//! Every entry is signed by its writer's libp2p key (the key behind its peer ID), and a node
//! takes an entry from another only after [`Ledger::admit`]'s checks: the signature, the
//! writer is the sender, the stamp is not ahead of local time by more than [`MAX_SKEW_MS`],
//! the TTL is at most [`MAX_TTL_MS`], the writer may write that key (per-node keys only from
//! that node, role assignments only from the leader, `k3s/*` only from the primary server),
//! and the ledger is below its caps ([`MAX_ENTRIES`], [`MAX_PER_OWNER`]).
//!
//! On the wire a message is `[version][window: u64 BE][nonce: 24][XChaCha20-Poly1305 ciphertext]`
//! with the header as associated data, keyed by the token's crypto key of that window. A
//! node without the token can neither read a message nor make one that others accept.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};

use crate::keys;
use crate::lease::Range;
use crate::roles::{self, Role};
use crate::token::Token;

const VERSION: u8 = 1;
const HEADER: usize = 1 + 8;
const NONCE: usize = 24;
const TAG: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub value: String,
    /// Peer ID of the writer.
    pub owner: String,
    /// Writer's clock when written, ms since the epoch: orders conflicting writes.
    pub stamp: u64,
    /// Lifetime from when it was received, ms.
    pub ttl: u64,
    /// The writer's signature (base64) over key, value, owner, stamp and ttl; see [`sign`].
    #[serde(default)]
    pub sig: String,
}

/// How far ahead of local time a stamp may be: clock skew between nodes. A stamp further in
/// the future would win every later write to its key. Stamps may be old: a value keeps the
/// stamp of when it was written for as long as its writer re-announces it.
pub const MAX_SKEW_MS: u64 = 60_000;
/// The longest TTL taken from a peer (honest nodes send 3 announce intervals): nothing a
/// peer writes outlives it by more than this.
pub const MAX_TTL_MS: u64 = 15 * 60_000;
/// Live entries held in total, and per writer (the leader writes one role per node).
pub const MAX_ENTRIES: usize = 8192;
pub const MAX_PER_OWNER: usize = 1024;

const SIG_DOMAIN: &[u8] = b"kairos-ledger-entry/1\0";

/// What is signed: a domain tag, then key, value and owner each with a 4-byte length, then
/// stamp and ttl, all big-endian; the key is in it so an entry cannot be moved to another key.
pub fn signing_bytes(key: &str, value: &str, owner: &str, stamp: u64, ttl: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(SIG_DOMAIN.len() + key.len() + value.len() + owner.len() + 28);
    b.extend_from_slice(SIG_DOMAIN);
    for part in [key, value, owner] {
        b.extend_from_slice(&(part.len() as u32).to_be_bytes());
        b.extend_from_slice(part.as_bytes());
    }
    b.extend_from_slice(&stamp.to_be_bytes());
    b.extend_from_slice(&ttl.to_be_bytes());
    b
}

/// An entry written by `keypair`'s node (owner: its peer ID), signed.
pub fn sign(keypair: &Keypair, key: &str, value: String, stamp: u64, ttl: u64) -> Entry {
    let owner = keypair.public().to_peer_id().to_string();
    // Signing with an ed25519 key does not fail; an empty signature would be refused anyway.
    let sig = keypair
        .sign(&signing_bytes(key, &value, &owner, stamp, ttl))
        .map(|s| base64::engine::general_purpose::STANDARD.encode(s))
        .unwrap_or_default();
    Entry {
        value,
        owner,
        stamp,
        ttl,
        sig,
    }
}

/// The public key inside a peer ID (ed25519 peer IDs carry it inline).
fn owner_key(owner: &str) -> Option<PublicKey> {
    let peer: PeerId = owner.parse().ok()?;
    let mh = peer.as_ref();
    // Code 0 is the identity multihash: the digest is the protobuf-encoded public key.
    if mh.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(mh.digest()).ok()
}

/// Whether `entry` under `key` carries a valid signature of its owner.
pub fn verify(key: &str, entry: &Entry) -> bool {
    let Some(pk) = owner_key(&entry.owner) else {
        return false;
    };
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(&entry.sig) else {
        return false;
    };
    pk.verify(
        &signing_bytes(key, &entry.value, &entry.owner, entry.stamp, entry.ttl),
        &sig,
    )
}

/// Why an entry from a peer was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("its owner {owner} is not the peer that sent it")]
    NotSender { owner: String },
    #[error("its signature does not verify for owner {owner}")]
    Signature { owner: String },
    #[error("its ttl of {ttl} ms exceeds the cap of {MAX_TTL_MS} ms")]
    Ttl { ttl: u64 },
    #[error("its stamp {stamp} is more than {MAX_SKEW_MS} ms ahead of local time {now}")]
    FutureStamp { stamp: u64, now: u64 },
    #[error("a nodes/ entry must name its writer, not {value}")]
    NodeValue { value: String },
    #[error("that node is already announced by peer {holder}")]
    UuidTaken { holder: String },
    #[error("this peer already announces node {uuid}")]
    OneNodePerPeer { uuid: String },
    #[error("it is that node's own key and the writer is not that node's peer ({peer})")]
    NotThatNode { peer: String },
    #[error("only the leader ({leader}) assigns other nodes' roles")]
    NotLeader { leader: String },
    #[error("node {holder} already holds the primary server role")]
    SecondPrimary { holder: String },
    #[error("k3s/ keys come only from the primary server, and the writer is not it")]
    NotPrimary,
    #[error("address {ip} is leased by node {holder}")]
    AddressTaken { ip: Ipv4Addr, holder: String },
    #[error("invalid value {value:?}: {why}")]
    BadValue { value: String, why: &'static str },
    #[error("no such key in the mesh's ledger")]
    UnknownKey,
    #[error("the ledger is full ({what})")]
    Full { what: &'static str },
}

/// What [`Ledger::admit`] needs from the node besides the ledger itself.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub now_ms: u64,
    /// The VPN range: leases outside it are refused.
    pub range: Range,
    /// A lease held this long is settled: another node's claim on its address is refused.
    /// Shorter claims clash and resolve by UUID (`lease::must_yield`).
    pub settle_ms: u64,
}

/// What travels in one message: a batch of entries from one peer (its full state), or a
/// heartbeat: no entries, only the digest of that state, which refreshes the TTL of the
/// entries a receiver holds from the sender's last full state when the digests agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub from: String,
    pub entries: Vec<(String, Entry)>,
    /// [`digest`] of the sender's entries.
    #[serde(default)]
    pub digest: u64,
    #[serde(default)]
    pub beat: bool,
    /// Peers whose full state the sender asks for: their heartbeats named a digest it does
    /// not hold (it joined late, or missed a change).
    #[serde(default)]
    pub want: Vec<String>,
}

impl Update {
    /// The full state of `from`: `entries` in key order, as a node holds its own.
    pub fn full(from: String, entries: Vec<(String, Entry)>, want: Vec<String>) -> Update {
        let digest = digest(
            entries
                .iter()
                .map(|(k, e)| (k.as_str(), e.value.as_str(), e.stamp)),
        );
        Update {
            from,
            entries,
            digest,
            beat: false,
            want,
        }
    }

    pub fn beat(from: String, digest: u64, want: Vec<String>) -> Update {
        Update {
            from,
            entries: Vec::new(),
            digest,
            beat: true,
            want,
        }
    }
}

/// What names a node's full state: SHA-256 over each key, value and stamp (with lengths),
/// the first 8 bytes. The TTL and signature are left out: they do not change what is held.
pub fn digest<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str, u64)>) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (k, value, stamp) in entries {
        for part in [k, value] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.update(stamp.to_be_bytes());
    }
    let out = h.finalize();
    let mut d = [0u8; 8];
    d.copy_from_slice(&out[..8]);
    u64::from_be_bytes(d)
}

/// A peer's last full state as received: its digest and keys, refreshed by its heartbeats.
#[derive(Debug, Clone)]
struct Announced {
    digest: u64,
    keys: Vec<String>,
    /// Local ms of its last full state or heartbeat.
    heard: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("ledger message of {size} bytes exceeds max_message_size {max}")]
    Oversized { size: usize, max: u64 },
    #[error("ledger message of {0} bytes is too short to be one")]
    TooShort(usize),
    #[error("ledger message has unknown version {0}")]
    Version(u8),
    #[error("ledger message from key window {window} is not current (now {now}); dropped")]
    StaleWindow { window: u64, now: u64 },
    #[error(
        "ledger message does not authenticate with this network's key (wrong token or corrupt)"
    )]
    Auth,
    #[error("ledger message authenticated but its content is malformed: {0}")]
    Malformed(String),
    #[error("ledger update of {size} bytes would exceed max_message_size {max}")]
    TooBig { size: usize, max: u64 },
}

/// Encrypt and authenticate an update for the network of `token`, at time `unix_secs`.
pub fn seal(token: &Token, update: &Update, unix_secs: u64) -> Result<Vec<u8>, MessageError> {
    let plain = serde_json::to_vec(update).map_err(|e| MessageError::Malformed(e.to_string()))?;
    let size = HEADER + NONCE + plain.len() + TAG;
    if size as u64 > token.max_message_size {
        return Err(MessageError::TooBig {
            size,
            max: token.max_message_size,
        });
    }
    let k = keys::current_crypto_key(token, unix_secs);
    let cipher = XChaCha20Poly1305::new((&k.key).into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let mut out = Vec::with_capacity(size);
    out.push(VERSION);
    out.extend_from_slice(&k.window.to_be_bytes());
    let header = out.clone();
    let ct = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: &plain,
                aad: &header,
            },
        )
        .map_err(|_| MessageError::Auth)?;
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Check size, window and tag, then parse. Every failure is a reason to drop the message.
pub fn open(token: &Token, msg: &[u8], unix_secs: u64) -> Result<Update, MessageError> {
    if msg.len() as u64 > token.max_message_size {
        return Err(MessageError::Oversized {
            size: msg.len(),
            max: token.max_message_size,
        });
    }
    if msg.len() < HEADER + NONCE + TAG {
        return Err(MessageError::TooShort(msg.len()));
    }
    if msg[0] != VERSION {
        return Err(MessageError::Version(msg[0]));
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&msg[1..HEADER]);
    let window = u64::from_be_bytes(w);
    if !keys::window_accepted(token, window, unix_secs) {
        return Err(MessageError::StaleWindow {
            window,
            now: keys::window(unix_secs, token.otp.crypto.interval),
        });
    }
    let k = keys::crypto_key(token, window);
    let cipher = XChaCha20Poly1305::new((&k.key).into());
    let nonce = XNonce::from_slice(&msg[HEADER..HEADER + NONCE]);
    let plain = cipher
        .decrypt(
            nonce,
            Payload {
                msg: &msg[HEADER + NONCE..],
                aad: &msg[..HEADER],
            },
        )
        .map_err(|_| MessageError::Auth)?;
    serde_json::from_slice(&plain).map_err(|e| MessageError::Malformed(e.to_string()))
}

#[derive(Debug, Clone)]
struct Slot {
    entry: Entry,
    /// Expiry in local ms.
    expires: u64,
    /// Local ms since when this key holds this value from this owner.
    since: u64,
}

/// The local copy of the ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    entries: BTreeMap<String, Slot>,
    /// Per peer ID, what its heartbeats refresh.
    announced: BTreeMap<String, Announced>,
    /// Caps on new keys from peers: [`MAX_ENTRIES`], [`MAX_PER_OWNER`] (smaller in tests).
    pub max_entries: usize,
    pub max_per_owner: usize,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            entries: BTreeMap::new(),
            announced: BTreeMap::new(),
            max_entries: MAX_ENTRIES,
            max_per_owner: MAX_PER_OWNER,
        }
    }
}

impl Ledger {
    /// Take an entry if it is newer than what we hold; true when the value changed. No
    /// checks: for this node's own entries; a peer's go through [`Ledger::admit`].
    pub fn merge(&mut self, key: &str, entry: Entry, now_ms: u64) -> bool {
        let expires = now_ms.saturating_add(entry.ttl);
        match self.entries.get_mut(key) {
            Some(old) if old.expires > now_ms => {
                let newer = (entry.stamp, &entry.owner) >= (old.entry.stamp, &old.entry.owner);
                if !newer {
                    return false;
                }
                let changed = old.entry.value != entry.value;
                if changed || old.entry.owner != entry.owner {
                    old.since = now_ms;
                }
                old.entry = entry;
                old.expires = expires;
                changed
            }
            _ => {
                self.entries.insert(
                    key.to_owned(),
                    Slot {
                        entry,
                        expires,
                        since: now_ms,
                    },
                );
                true
            }
        }
    }

    /// Check a peer's entry (see the module text) and merge it; Ok(true) when the value
    /// changed. `from` is the peer that sent it (gossipsub's authenticated source).
    pub fn admit(
        &mut self,
        key: &str,
        entry: Entry,
        from: &str,
        ctx: &Admission,
    ) -> Result<bool, Refusal> {
        let now = ctx.now_ms;
        if entry.owner != from {
            return Err(Refusal::NotSender { owner: entry.owner });
        }
        if !verify(key, &entry) {
            return Err(Refusal::Signature { owner: entry.owner });
        }
        if entry.ttl > MAX_TTL_MS {
            return Err(Refusal::Ttl { ttl: entry.ttl });
        }
        if entry.stamp > now.saturating_add(MAX_SKEW_MS) {
            return Err(Refusal::FutureStamp {
                stamp: entry.stamp,
                now,
            });
        }
        self.check_writer(key, &entry, ctx)?;
        if self.get(key, now).is_none() {
            let live = self.entries.values().filter(|s| s.expires > now);
            let (mut total, mut mine) = (0, 0);
            for s in live {
                total += 1;
                mine += usize::from(s.entry.owner == entry.owner);
            }
            if total >= self.max_entries {
                return Err(Refusal::Full {
                    what: "MAX_ENTRIES live entries",
                });
            }
            if mine >= self.max_per_owner {
                return Err(Refusal::Full {
                    what: "MAX_PER_OWNER entries of this writer",
                });
            }
        }
        Ok(self.merge(key, entry, now))
    }

    /// The peer ID a live node UUID announced (`nodes/<uuid>`).
    pub fn peer_of(&self, uuid: &str, now_ms: u64) -> Option<&str> {
        self.value(&format!("nodes/{uuid}"), now_ms)
    }

    /// The leader's UUID over the live `nodes/` entries.
    pub fn leader(&self, now_ms: u64) -> Option<String> {
        let live: Vec<&str> = self.prefix("nodes/", now_ms).map(|(u, _)| u).collect();
        roles::leader(&live).map(str::to_owned)
    }

    /// Local ms since when `key` holds its current value from its current writer.
    pub fn since(&self, key: &str, now_ms: u64) -> Option<u64> {
        self.entries
            .get(key)
            .filter(|s| s.expires > now_ms)
            .map(|s| s.since)
    }

    /// Who may write what. Node UUIDs are bound to a peer by `nodes/<uuid>` (first writer
    /// while its entry lives, one node per peer); a node's own keys follow that binding.
    fn check_writer(&self, key: &str, e: &Entry, ctx: &Admission) -> Result<(), Refusal> {
        let now = ctx.now_ms;
        let node_peer = |u: &str| self.peer_of(u, now);
        let not_that_node = |u: &str| Refusal::NotThatNode {
            peer: node_peer(u).unwrap_or("unknown").to_owned(),
        };
        if let Some(u) = key.strip_prefix("nodes/") {
            if e.value != e.owner {
                return Err(Refusal::NodeValue {
                    value: e.value.clone(),
                });
            }
            if let Some(holder) = node_peer(u).filter(|p| *p != e.owner) {
                return Err(Refusal::UuidTaken {
                    holder: holder.to_owned(),
                });
            }
            if let Some((other, _)) = self
                .prefix("nodes/", now)
                .find(|(k, x)| *k != u && x.owner == e.owner)
            {
                return Err(Refusal::OneNodePerPeer {
                    uuid: other.to_owned(),
                });
            }
            Ok(())
        } else if let Some(u) = key.strip_prefix("vpn/lease/") {
            if node_peer(u) != Some(e.owner.as_str()) {
                return Err(not_that_node(u));
            }
            let ip: Ipv4Addr = e.value.parse().map_err(|_| Refusal::BadValue {
                value: e.value.clone(),
                why: "not an IPv4 address",
            })?;
            if !ctx.range.contains_host(ip) {
                return Err(Refusal::BadValue {
                    value: e.value.clone(),
                    why: "outside the VPN range",
                });
            }
            let settled = self
                .prefix("vpn/lease/", now)
                .find(|(k, x)| *k != u && x.value == e.value)
                .filter(|(k, _)| {
                    self.since(&format!("vpn/lease/{k}"), now)
                        .is_some_and(|s| now.saturating_sub(s) >= ctx.settle_ms)
                });
            if let Some((holder, _)) = settled {
                return Err(Refusal::AddressTaken {
                    ip,
                    holder: holder.to_owned(),
                });
            }
            Ok(())
        } else if let Some(u) = key.strip_prefix("roles/") {
            let role = Role::parse(&e.value).ok_or_else(|| Refusal::BadValue {
                value: e.value.clone(),
                why: "not a role",
            })?;
            let leader_peer = self
                .leader(now)
                .and_then(|l| node_peer(&l).map(str::to_owned));
            // A node announces its own role; other nodes' roles come from the leader.
            if node_peer(u) != Some(e.owner.as_str())
                && leader_peer.as_deref() != Some(e.owner.as_str())
            {
                return Err(Refusal::NotLeader {
                    leader: leader_peer.unwrap_or_else(|| "unknown".into()),
                });
            }
            if role.is_primary()
                && let Some((holder, _)) = self
                    .prefix("roles/", now)
                    .find(|(k, x)| *k != u && Role::parse(&x.value).is_some_and(Role::is_primary))
            {
                return Err(Refusal::SecondPrimary {
                    holder: holder.to_owned(),
                });
            }
            Ok(())
        } else if key.starts_with("k3s/") {
            // The join URL and token come from the node that runs the primary server.
            let primary = self.prefix("roles/", now).any(|(u, x)| {
                Role::parse(&x.value).is_some_and(Role::is_primary)
                    && node_peer(u) == Some(e.owner.as_str())
            });
            if primary {
                Ok(())
            } else {
                Err(Refusal::NotPrimary)
            }
        } else if let Some(p) = key.strip_prefix("pairing/") {
            // `pairing/data` is the registering client's; `pairing/<peer>` an acknowledgement.
            if p == "data" || p == e.owner {
                Ok(())
            } else {
                Err(Refusal::NotThatNode { peer: p.to_owned() })
            }
        } else {
            Err(Refusal::UnknownKey)
        }
    }

    pub fn get(&self, key: &str, now_ms: u64) -> Option<&Entry> {
        self.entries
            .get(key)
            .filter(|s| s.expires > now_ms)
            .map(|s| &s.entry)
    }

    pub fn value(&self, key: &str, now_ms: u64) -> Option<&str> {
        self.get(key, now_ms).map(|e| e.value.as_str())
    }

    /// Live entries under a prefix, with the prefix removed from the keys.
    pub fn prefix<'a>(
        &'a self,
        prefix: &'a str,
        now_ms: u64,
    ) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        self.entries
            .range(prefix.to_owned()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .filter(move |(_, s)| s.expires > now_ms)
            .map(move |(k, s)| (&k[prefix.len()..], &s.entry))
    }

    /// Forget expired entries; returns how many went.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, s| s.expires > now_ms);
        // A peer silent for longer than any TTL it may send has nothing left to refresh.
        self.announced
            .retain(|_, a| now_ms.saturating_sub(a.heard) <= MAX_TTL_MS);
        before - self.entries.len()
    }

    /// Note `from`'s full state (its entries as sent, in order): its heartbeats with this
    /// digest refresh these keys.
    pub fn record_full(&mut self, from: &str, entries: &[(String, Entry)], now_ms: u64) {
        if self.announced.len() >= self.max_entries && !self.announced.contains_key(from) {
            return;
        }
        self.announced.insert(
            from.to_owned(),
            Announced {
                digest: digest(
                    entries
                        .iter()
                        .map(|(k, e)| (k.as_str(), e.value.as_str(), e.stamp)),
                ),
                keys: entries.iter().map(|(k, _)| k.clone()).collect(),
                heard: now_ms,
            },
        );
    }

    /// A heartbeat from `from` naming `digest`: the entries of its last full state that this
    /// ledger still holds from it live another TTL. False when this ledger does not hold that
    /// state (none yet, or another digest): then nothing is refreshed and the caller asks for it.
    pub fn refresh(&mut self, from: &str, digest: u64, now_ms: u64) -> bool {
        let Some(a) = self.announced.get_mut(from) else {
            return false;
        };
        if a.digest != digest {
            return false;
        }
        a.heard = now_ms;
        for k in &a.keys {
            if let Some(s) = self.entries.get_mut(k)
                && s.entry.owner == from
                && s.expires > now_ms
            {
                s.expires = now_ms.saturating_add(s.entry.ttl);
            }
        }
        true
    }

    /// Apply an opened full state from peer `from` (a heartbeat goes to [`Ledger::refresh`]):
    /// node announcements first, then roles, then the rest (the later checks read the
    /// earlier keys). Returns the keys whose value changed and the entries refused, with why.
    pub fn apply(
        &mut self,
        update: Update,
        from: &str,
        ctx: &Admission,
    ) -> (Vec<String>, Vec<(String, Refusal)>) {
        self.record_full(from, &update.entries, ctx.now_ms);
        let mut entries = update.entries;
        let rank = |k: &str| {
            if k.starts_with("nodes/") {
                0
            } else if k.starts_with("roles/") {
                1
            } else {
                2
            }
        };
        entries.sort_by_key(|(k, _)| rank(k));
        let mut changed = Vec::new();
        let mut refused = Vec::new();
        for (k, e) in entries {
            match self.admit(&k, e, from, ctx) {
                Ok(true) => changed.push(k),
                Ok(false) => {}
                Err(r) => refused.push((k, r)),
            }
        }
        if !refused.is_empty() {
            // Heartbeats must not stand for a state this ledger did not take whole: the
            // sender's next heartbeat then asks for its full state again (a refused lease
            // may be taken once the address is free).
            self.announced.remove(from);
        }
        (changed, refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &str, owner: &str, stamp: u64, ttl: u64) -> Entry {
        Entry {
            value: value.into(),
            owner: owner.into(),
            stamp,
            ttl,
            sig: String::new(),
        }
    }

    const NOW: u64 = 1_800_000_000;

    fn update() -> Update {
        Update::full(
            "peerA".into(),
            vec![("roles/u1".into(), entry("master", "peerA", 5, 1000))],
            vec!["peerB".into()],
        )
    }

    #[test]
    fn heartbeats_refresh_the_last_full_state_only() {
        let mut l = Ledger::default();
        let ttl = 3000;
        let a = vec![
            ("nodes/u1".to_owned(), entry("peerA", "peerA", 5, ttl)),
            ("roles/u2".to_owned(), entry("worker", "peerA", 6, ttl)),
        ];
        for (k, e) in &a {
            l.merge(k, e.clone(), NOW);
        }
        // No full state from peerA recorded yet: a heartbeat refreshes nothing.
        let d = Update::full("peerA".into(), a.clone(), Vec::new()).digest;
        assert!(!l.refresh("peerA", d, NOW + 1000));
        l.record_full("peerA", &a, NOW);
        // Another digest (peerA changed since): nothing refreshed, the caller asks.
        assert!(!l.refresh("peerA", d ^ 1, NOW + 2000));
        assert!(l.refresh("peerA", d, NOW + 2000));
        assert_eq!(l.value("nodes/u1", NOW + 4500), Some("peerA"));
        // A key someone newer took over is not kept alive in peerA's name.
        l.merge("roles/u2", entry("worker", "peerB", 9, ttl), NOW + 2500);
        assert!(l.refresh("peerA", d, NOW + 4000));
        assert_eq!(
            l.get("roles/u2", NOW + 5000).map(|e| e.owner.as_str()),
            Some("peerB")
        );
        assert_eq!(l.get("roles/u2", NOW + 5600), None);
        // Without heartbeats the entries expire as before; a late one does not revive them.
        assert_eq!(l.value("nodes/u1", NOW + 7500), None);
        l.expire(NOW + 7500);
        assert!(l.refresh("peerA", d, NOW + 7600));
        assert_eq!(l.value("nodes/u1", NOW + 7600), None);
        // The digest covers key, value and stamp, in order.
        let mut b = a.clone();
        b[1].1.stamp += 1;
        assert_ne!(
            digest(
                b.iter()
                    .map(|(k, e)| (k.as_str(), e.value.as_str(), e.stamp))
            ),
            d
        );
        b[1].1.stamp -= 1;
        b[1].1.ttl += 1;
        assert_eq!(
            digest(
                b.iter()
                    .map(|(k, e)| (k.as_str(), e.value.as_str(), e.stamp))
            ),
            d
        );
    }

    #[test]
    fn seal_open_round_trip() {
        let t = Token::generate();
        let msg = seal(&t, &update(), NOW).unwrap();
        assert_eq!(open(&t, &msg, NOW).unwrap(), update());
        // Still readable in the next window, not in the one after.
        let iv = t.otp.crypto.interval;
        let next_start = (NOW / iv + 1) * iv;
        assert!(open(&t, &msg, next_start).is_ok());
        assert!(matches!(
            open(&t, &msg, next_start + iv),
            Err(MessageError::StaleWindow { .. })
        ));
        // Plain text never appears on the wire.
        assert!(!msg.windows(6).any(|w| w == b"master"));
    }

    #[test]
    fn wrong_token_cannot_read_or_forge() {
        let ours = Token::generate();
        let mut theirs = Token::generate();
        // Even with the same intervals and names, another crypto key reads nothing.
        theirs.otp.crypto.interval = ours.otp.crypto.interval;
        let msg = seal(&ours, &update(), NOW).unwrap();
        assert_eq!(open(&theirs, &msg, NOW), Err(MessageError::Auth));
        let forged = seal(&theirs, &update(), NOW).unwrap();
        assert_eq!(open(&ours, &forged, NOW), Err(MessageError::Auth));
        // Any flipped bit (header, nonce or ciphertext) fails authentication.
        for i in [1, 9, 20, msg.len() - 1] {
            let mut bad = msg.clone();
            bad[i] ^= 1;
            assert!(open(&ours, &bad, NOW).is_err(), "byte {i}");
        }
    }

    #[test]
    fn oversized_short_and_junk_are_refused() {
        let mut t = Token::generate();
        t.max_message_size = 2048;
        assert!(matches!(
            open(&t, &vec![1u8; 4096], NOW),
            Err(MessageError::Oversized {
                size: 4096,
                max: 2048
            })
        ));
        assert_eq!(open(&t, &[1, 2, 3], NOW), Err(MessageError::TooShort(3)));
        assert_eq!(open(&t, &[9u8; 64], NOW), Err(MessageError::Version(9)));
        let mut big = update();
        big.entries[0].1.value = "x".repeat(4096);
        assert!(matches!(
            seal(&t, &big, NOW),
            Err(MessageError::TooBig { .. })
        ));
    }

    #[test]
    fn newest_write_wins_and_entries_expire() {
        let mut l = Ledger::default();
        assert!(l.merge("k", entry("a", "p1", 10, 100), 0));
        assert!(
            !l.merge("k", entry("old", "p2", 9, 100), 0),
            "older stamp loses"
        );
        assert!(l.merge("k", entry("b", "p2", 11, 100), 0));
        assert!(
            !l.merge("k", entry("b", "p2", 12, 100), 50),
            "same value: no change"
        );
        assert_eq!(l.value("k", 60), Some("b"));
        // Refreshed at 50 with ttl 100: alive until 150.
        assert_eq!(l.value("k", 149), Some("b"));
        assert_eq!(l.value("k", 150), None);
        // An expired entry is replaced by anything, even an older stamp.
        assert!(l.merge("k", entry("c", "p1", 1, 100), 200));
        l.merge("nodes/a", entry("1", "p", 1, 10), 200);
        l.merge("nodes/b", entry("2", "p", 1, 1000), 200);
        l.merge("nodez", entry("3", "p", 1, 1000), 200);
        let live: Vec<_> = l
            .prefix("nodes/", 250)
            .map(|(k, e)| (k, e.value.as_str()))
            .collect();
        assert_eq!(live, vec![("b", "2")]);
        assert_eq!(l.expire(250), 1);
    }

    const T: u64 = 1_800_000_000_000;

    /// A node of the test mesh: its key, peer ID and UUID.
    struct N {
        key: Keypair,
        peer: String,
        uuid: String,
    }

    fn node(uuid: &str) -> N {
        let key = Keypair::generate_ed25519();
        N {
            peer: key.public().to_peer_id().to_string(),
            key,
            uuid: uuid.into(),
        }
    }

    impl N {
        fn e(&self, key: &str, value: &str) -> Entry {
            sign(&self.key, key, value.into(), T, 60_000)
        }
        fn put(&self, l: &mut Ledger, key: &str, value: &str, now: u64) -> Result<bool, Refusal> {
            l.admit(key, self.e(key, value), &self.peer, &ctx(now))
        }
        fn announce(&self, l: &mut Ledger, now: u64) {
            let k = format!("nodes/{}", self.uuid);
            self.put(l, &k, &self.peer.clone(), now)
                .expect("own node entry");
        }
    }

    fn ctx(now: u64) -> Admission {
        Admission {
            now_ms: now,
            range: Range::parse("10.1.0.0/24").expect("range"),
            settle_ms: 3000,
        }
    }

    #[test]
    fn entries_are_signed_and_bound_to_their_writer() {
        let (a, f) = (node("a"), node("f"));
        let e = a.e("nodes/a", &a.peer);
        assert!(verify("nodes/a", &e));
        // Moved to another key, another value, another stamp or TTL: no longer valid.
        assert!(!verify("nodes/b", &e));
        for bad in [
            Entry {
                value: "x".into(),
                ..e.clone()
            },
            Entry {
                stamp: e.stamp + 1,
                ..e.clone()
            },
            Entry {
                ttl: u64::MAX,
                ..e.clone()
            },
            Entry {
                sig: String::new(),
                ..e.clone()
            },
        ] {
            assert!(!verify("nodes/a", &bad), "{bad:?}");
        }
        let mut l = Ledger::default();
        // The forger sends a's valid entry (a replay) or one claiming a as owner.
        assert_eq!(
            l.admit("nodes/a", e.clone(), &f.peer, &ctx(T)),
            Err(Refusal::NotSender {
                owner: a.peer.clone()
            })
        );
        let mut forged = f.e("nodes/a", &a.peer);
        forged.owner = a.peer.clone();
        assert_eq!(
            l.admit("nodes/a", forged, &a.peer, &ctx(T)),
            Err(Refusal::Signature {
                owner: a.peer.clone()
            })
        );
        assert_eq!(l.admit("nodes/a", e, &a.peer, &ctx(T)), Ok(true));
        // Not a peer ID at all.
        let mut junk = entry("x", "not-a-peer", T, 10);
        junk.sig = "AAAA".into();
        assert!(matches!(
            l.admit("pairing/data", junk, "not-a-peer", &ctx(T)),
            Err(Refusal::Signature { .. })
        ));
    }

    #[test]
    fn stamps_ttls_and_the_ledger_size_are_bounded() {
        let a = node("a");
        let mut l = Ledger::default();
        let k = "pairing/data";
        let forever = sign(&a.key, k, "v".into(), T, u64::MAX);
        assert_eq!(
            l.admit(k, forever, &a.peer, &ctx(T)),
            Err(Refusal::Ttl { ttl: u64::MAX })
        );
        let year = 365 * 24 * 3_600_000;
        let future = sign(&a.key, k, "v".into(), T + year, 3000);
        assert_eq!(
            l.admit(k, future, &a.peer, &ctx(T)),
            Err(Refusal::FutureStamp {
                stamp: T + year,
                now: T
            })
        );
        // Skew within the bound, an old stamp, and the longest TTL are fine.
        let skew = sign(&a.key, k, "v".into(), T + MAX_SKEW_MS, MAX_TTL_MS);
        assert_eq!(l.admit(k, skew, &a.peer, &ctx(T)), Ok(true));
        let ack = format!("pairing/{}", a.peer);
        let old = sign(&a.key, &ack, "ok".into(), 1, 3000);
        assert_eq!(l.admit(&ack, old, &a.peer, &ctx(T)), Ok(true));

        // Caps: per writer, then in total; updating a held key is always fine; expired
        // entries make room again.
        let mut l = Ledger {
            max_entries: 4,
            max_per_owner: 2,
            ..Ledger::default()
        };
        let b = node("b");
        a.announce(&mut l, T);
        let ack = format!("pairing/{}", a.peer);
        assert_eq!(a.put(&mut l, &ack, "ok", T), Ok(true));
        assert_eq!(
            a.put(&mut l, "pairing/data", "x", T),
            Err(Refusal::Full {
                what: "MAX_PER_OWNER entries of this writer"
            })
        );
        assert_eq!(a.put(&mut l, &ack, "ok2", T), Ok(true));
        b.announce(&mut l, T);
        assert_eq!(b.put(&mut l, "pairing/data", "x", T), Ok(true));
        let c = node("c");
        assert_eq!(
            c.put(&mut l, "nodes/c", &c.peer.clone(), T),
            Err(Refusal::Full {
                what: "MAX_ENTRIES live entries"
            })
        );
        assert_eq!(l.expire(T + 60_000), 4);
        c.announce(&mut l, T + 60_000);
    }

    #[test]
    fn per_node_keys_from_that_node_roles_from_the_leader_k3s_from_the_primary() {
        // Three nodes; the forger f is not the leader (leader: highest UUID hash).
        let mut ns: Vec<N> = ["node-a", "node-b", "node-c"].map(node).into();
        let uuids: Vec<String> = ns.iter().map(|n| n.uuid.clone()).collect();
        let leader_uuid = roles::leader(&uuids).expect("a leader").to_owned();
        let li = ns
            .iter()
            .position(|n| n.uuid == leader_uuid)
            .expect("leader");
        let l_node = ns.remove(li);
        let f = ns.pop().expect("forger");
        let v = ns.pop().expect("victim");
        let mut l = Ledger::default();
        // The first update of the leader: its node, its own role and the k3s join data,
        // in one message (k3s/ sorts first on the wire; apply takes nodes and roles first).
        let lk = |k: &str, v: &str| (k.to_owned(), l_node.e(k, v));
        let first = Update::full(
            l_node.peer.clone(),
            vec![
                lk("k3s/url", "https://10.1.0.5:6443"),
                lk(&format!("nodes/{}", l_node.uuid), &l_node.peer),
                lk(&format!("roles/{}", l_node.uuid), "master"),
                lk(&format!("vpn/lease/{}", l_node.uuid), "10.1.0.5"),
            ],
            Vec::new(),
        );
        let (changed, refused) = l.apply(first, &l_node.peer, &ctx(T));
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(changed.len(), 4);
        v.announce(&mut l, T);
        f.announce(&mut l, T);
        assert_eq!(l.leader(T), Some(l_node.uuid.clone()));
        let now = T + 5000;
        let vk = |k: &str| format!("{k}/{}", v.uuid);

        // nodes/: the victim's UUID, a second UUID, a value naming someone else.
        assert_eq!(
            f.put(&mut l, &vk("nodes"), &f.peer.clone(), now),
            Err(Refusal::UuidTaken {
                holder: v.peer.clone()
            })
        );
        assert_eq!(
            f.put(&mut l, "nodes/second", &f.peer.clone(), now),
            Err(Refusal::OneNodePerPeer {
                uuid: f.uuid.clone()
            })
        );
        assert!(matches!(
            f.put(&mut l, &format!("nodes/{}", f.uuid), &v.peer.clone(), now),
            Err(Refusal::NodeValue { .. })
        ));
        // Leases: another node's key, a settled address, outside the range.
        assert_eq!(
            f.put(&mut l, &vk("vpn/lease"), "10.1.0.9", now),
            Err(Refusal::NotThatNode {
                peer: v.peer.clone()
            })
        );
        let fl = format!("vpn/lease/{}", f.uuid);
        assert_eq!(
            f.put(&mut l, &fl, "10.1.0.5", now),
            Err(Refusal::AddressTaken {
                ip: Ipv4Addr::new(10, 1, 0, 5),
                holder: l_node.uuid.clone()
            })
        );
        assert!(matches!(
            f.put(&mut l, &fl, "192.168.1.1", now),
            Err(Refusal::BadValue { .. })
        ));
        // Two fresh claims on one address both stand (lease::must_yield settles them).
        assert_eq!(f.put(&mut l, &fl, "10.1.0.7", now), Ok(true));
        assert_eq!(
            v.put(&mut l, &vk("vpn/lease"), "10.1.0.7", now + 1000),
            Ok(true)
        );
        // Roles: only the leader assigns others; a node announces its own; one primary.
        assert!(matches!(
            f.put(&mut l, &vk("roles"), "master", now),
            Err(Refusal::NotLeader { .. })
        ));
        assert_eq!(l_node.put(&mut l, &vk("roles"), "worker", now), Ok(true));
        let fr = format!("roles/{}", f.uuid);
        assert_eq!(
            f.put(&mut l, &fr, "master", now),
            Err(Refusal::SecondPrimary {
                holder: l_node.uuid.clone()
            })
        );
        assert!(matches!(
            f.put(&mut l, &fr, "boss", now),
            Err(Refusal::BadValue { .. })
        ));
        assert_eq!(f.put(&mut l, &fr, "worker", now), Ok(true));
        // k3s/: only from the primary server's node.
        for k in ["k3s/url", "k3s/token"] {
            assert_eq!(f.put(&mut l, k, "forged", now), Err(Refusal::NotPrimary));
        }
        assert_eq!(l_node.put(&mut l, "k3s/token", "K10real", now), Ok(true));
        assert_eq!(l.value("k3s/url", now), Some("https://10.1.0.5:6443"));
        // Pairing acknowledgements name their writer; unknown keys are refused.
        let ack = format!("pairing/{}", v.peer);
        assert!(matches!(
            f.put(&mut l, &ack, "ok", now),
            Err(Refusal::NotThatNode { .. })
        ));
        assert_eq!(f.put(&mut l, "evil/x", "1", now), Err(Refusal::UnknownKey));

        // The victim restarts with a new peer ID: its UUID is free again once the old
        // announcement has expired (60 s TTL here), not before.
        let v2 = N {
            key: Keypair::generate_ed25519(),
            peer: String::new(),
            uuid: v.uuid.clone(),
        };
        let v2 = N {
            peer: v2.key.public().to_peer_id().to_string(),
            ..v2
        };
        assert!(matches!(
            v2.put(&mut l, &vk("nodes"), &v2.peer.clone(), T + 30_000),
            Err(Refusal::UuidTaken { .. })
        ));
        l.expire(T + 60_000);
        assert_eq!(
            v2.put(&mut l, &vk("nodes"), &v2.peer.clone(), T + 60_000),
            Ok(true)
        );
    }
}
