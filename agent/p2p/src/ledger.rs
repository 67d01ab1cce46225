//! The shared ledger: a key/value map every node holds a copy of, kept in sync over gossipsub.
//!
//! Every node re-announces the entries it owns on each tick with a time to live, so a node
//! that joins late learns everything within one tick and the entries of a node that left
//! expire by themselves. Conflicting writes to one key resolve by (stamp, owner): the newest
//! wins everywhere, whatever the arrival order.
//!
//! On the wire a message is `[version][window: u64 BE][nonce: 24][XChaCha20-Poly1305 ciphertext]`
//! with the header as associated data, keyed by the token's crypto key of that window. A
//! node without the token can neither read a message nor make one that others accept.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::keys;
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
}

/// What travels in one message: a batch of entries from one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub from: String,
    pub entries: Vec<(String, Entry)>,
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

/// The local copy of the ledger.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// key → (entry, expiry in local ms).
    entries: BTreeMap<String, (Entry, u64)>,
}

impl Ledger {
    /// Take an entry if it is newer than what we hold; true when the value changed.
    pub fn merge(&mut self, key: &str, entry: Entry, now_ms: u64) -> bool {
        let expires = now_ms.saturating_add(entry.ttl);
        match self.entries.get_mut(key) {
            Some((old, old_exp)) if *old_exp > now_ms => {
                let newer = (entry.stamp, &entry.owner) >= (old.stamp, &old.owner);
                if !newer {
                    return false;
                }
                let changed = old.value != entry.value;
                *old = entry;
                *old_exp = expires;
                changed
            }
            _ => {
                self.entries.insert(key.to_owned(), (entry, expires));
                true
            }
        }
    }

    pub fn get(&self, key: &str, now_ms: u64) -> Option<&Entry> {
        self.entries
            .get(key)
            .filter(|(_, exp)| *exp > now_ms)
            .map(|(e, _)| e)
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
            .filter(move |(_, (_, exp))| *exp > now_ms)
            .map(move |(k, (e, _))| (&k[prefix.len()..], e))
    }

    /// Forget expired entries; returns how many went.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, (_, exp)| *exp > now_ms);
        before - self.entries.len()
    }

    /// Apply an opened update; returns the keys whose value changed.
    pub fn apply(&mut self, update: Update, now_ms: u64) -> Vec<String> {
        let mut changed = Vec::new();
        for (k, e) in update.entries {
            if self.merge(&k, e, now_ms) {
                changed.push(k);
            }
        }
        changed
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
        }
    }

    const NOW: u64 = 1_800_000_000;

    fn update() -> Update {
        Update {
            from: "peerA".into(),
            entries: vec![("roles/u1".into(), entry("master", "peerA", 5, 1000))],
        }
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
        let changed = l.apply(update(), 300);
        assert_eq!(changed, vec!["roles/u1".to_string()]);
    }
}
