//! The key schedule. Like a TOTP, every key is derived from a shared secret and the number of
//! the current time window (`unix time / interval`), so a key that leaks expires with its
//! window. Unlike a TOTP we keep the whole HMAC-SHA256 output (32 bytes) rather than a few
//! decimal digits: it is a cipher key, not something a person types.
//!
//! A message sealed near the end of a window may arrive in the next one, so receivers accept
//! the current and the previous window.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::token::{OtpKey, Token};

type HmacSha256 = Hmac<Sha256>;

/// A derived 256-bit key and the window it belongs to.
#[derive(Clone, PartialEq, Eq)]
pub struct WindowKey {
    pub window: u64,
    pub key: [u8; 32],
}

impl std::fmt::Debug for WindowKey {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WindowKey {{ window: {} }}", self.window)
    }
}

/// Window number of `unix_secs` for an interval; interval 0 (rejected by Token::decode)
/// counts as 1 s so this never divides by zero.
pub fn window(unix_secs: u64, interval: u64) -> u64 {
    unix_secs / interval.max(1)
}

/// HMAC-SHA256(secret, purpose || window as 8 big-endian bytes).
pub fn derive(secret: &str, purpose: &str, window: u64) -> [u8; 32] {
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC accepts keys of any length; this arm is unreachable in practice.
        Err(_) => return Sha256::digest(secret.as_bytes()).into(),
    };
    mac.update(purpose.as_bytes());
    mac.update(&window.to_be_bytes());
    mac.finalize().into_bytes().into()
}

fn key_for(otp: &OtpKey, purpose: &str, window: u64) -> WindowKey {
    WindowKey {
        window,
        key: derive(&otp.key, purpose, window),
    }
}

/// The ledger key of a given window.
pub fn crypto_key(token: &Token, window: u64) -> WindowKey {
    key_for(&token.otp.crypto, "kairos-ledger", window)
}

/// The key to seal with now.
pub fn current_crypto_key(token: &Token, unix_secs: u64) -> WindowKey {
    crypto_key(token, window(unix_secs, token.otp.crypto.interval))
}

/// Whether a message of `msg_window` may be opened at `unix_secs`: current or previous.
pub fn window_accepted(token: &Token, msg_window: u64, unix_secs: u64) -> bool {
    let now = window(unix_secs, token.otp.crypto.interval);
    msg_window == now || msg_window.checked_add(1) == Some(now)
}

/// The DHT rendezvous key for the current window: peers advertise themselves as providers of
/// it, and only holders of the token can compute it.
pub fn dht_rendezvous(token: &Token, unix_secs: u64) -> Vec<u8> {
    let w = window(unix_secs, token.otp.dht.interval);
    let mut k = derive(&token.otp.dht.key, &token.rendezvous, w).to_vec();
    k.truncate(20);
    k
}

/// A short stable name derived from a token field: the gossipsub topic (from `room`), the
/// identify protocol version (from `mdns`), the VPN stream protocol. Hashed so the secret
/// strings themselves never appear on the wire.
pub fn name(field: &str, purpose: &str) -> String {
    let digest = Sha256::digest(format!("{purpose}\0{field}").as_bytes());
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_rotate_and_the_previous_one_is_accepted() {
        let t = Token::generate();
        let iv = t.otp.crypto.interval;
        let start = 1_800_000_000 / iv * iv;
        let k1 = current_crypto_key(&t, start);
        assert_eq!(k1, current_crypto_key(&t, start + iv - 1), "same window");
        let k2 = current_crypto_key(&t, start + iv);
        assert_ne!(k1.key, k2.key, "next window, new key");
        assert_eq!(k2.window, k1.window + 1);
        // At start + iv: current (k2) and previous (k1) are accepted, older is not.
        assert!(window_accepted(&t, k2.window, start + iv));
        assert!(window_accepted(&t, k1.window, start + iv));
        assert!(!window_accepted(&t, k1.window - 1, start + iv));
        // A message from the future (clock skew beyond one window) is refused too.
        assert!(!window_accepted(&t, k2.window + 1, start + iv));
        // Another token, same window: another key.
        let other = Token::generate();
        assert_ne!(current_crypto_key(&other, start).key, k1.key);
        assert_eq!(
            format!("{k1:?}"),
            format!("WindowKey {{ window: {} }}", k1.window)
        );
    }

    #[test]
    fn names_are_stable_and_distinct() {
        assert_eq!(name("room", "topic"), name("room", "topic"));
        assert_ne!(name("room", "topic"), name("room", "vpn"));
        assert_eq!(name("x", "y").len(), 24);
        let t = Token::generate();
        assert_eq!(dht_rendezvous(&t, 100), dht_rendezvous(&t, 101));
        assert_eq!(dht_rendezvous(&t, 100).len(), 20);
    }
}
