//! `network_token` (SPEC.md section 7): base64 of a YAML document
//! `otp: {dht: {interval, key, length}, crypto: {interval, key, length}}, room, rendezvous,
//! mdns, max_message_size`, the same shape edgevpn writes, so tokens move between the two.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use serde::{Deserialize, Serialize};

/// Upper bound of one ledger message, as edgevpn's default (20 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 20 << 20;
/// Random key strings as long as edgevpn's.
const KEY_LEN: usize = 43;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub otp: Otp,
    pub room: String,
    pub rendezvous: String,
    pub mdns: String,
    pub max_message_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Otp {
    pub dht: OtpKey,
    pub crypto: OtpKey,
}

/// One time-based key: `key` is the shared secret, `interval` the window in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtpKey {
    pub interval: u64,
    pub key: String,
    pub length: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("network_token is empty")]
    Empty,
    #[error("network_token is not base64: {0}")]
    Base64(String),
    #[error("network_token does not decode to UTF-8 text")]
    Utf8,
    #[error(
        "network_token is not the expected YAML (otp, room, rendezvous, mdns, max_message_size): {0}"
    )]
    Yaml(String),
    #[error("network_token field `{field}` {why}")]
    Invalid {
        field: &'static str,
        why: &'static str,
    },
}

impl Token {
    /// A new token with fresh random keys and names (`kairos-agent p2p generate-token`).
    pub fn generate() -> Token {
        Token {
            otp: Otp {
                // The DHT rendezvous key rotates often (a stranger cannot camp on it for
                // long); the crypto key every 2.5 h like edgevpn's defaults.
                dht: OtpKey {
                    interval: 360,
                    key: random_string(KEY_LEN),
                    length: KEY_LEN as u32,
                },
                crypto: OtpKey {
                    interval: 9000,
                    key: random_string(KEY_LEN),
                    length: KEY_LEN as u32,
                },
            },
            room: random_string(KEY_LEN),
            rendezvous: random_string(KEY_LEN),
            mdns: random_string(KEY_LEN),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// The base64 text that goes into `p2p.network_token`.
    pub fn encode(&self) -> String {
        // Serializing plain strings and integers cannot fail; fall back to JSON (also YAML)
        // rather than panic if the serializer ever disagrees.
        let yaml = serde_saphyr::to_string(self)
            .unwrap_or_else(|_| serde_json::to_string(self).unwrap_or_default());
        STANDARD.encode(yaml)
    }

    /// Decode and check a token. Whitespace (a token pasted across lines) is ignored, and
    /// the URL-safe and unpadded base64 alphabets are accepted too.
    pub fn decode(text: &str) -> Result<Token, TokenError> {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        if compact.is_empty() {
            return Err(TokenError::Empty);
        }
        let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|e| e.decode(&compact).ok())
            .ok_or_else(|| {
                TokenError::Base64(
                    STANDARD
                        .decode(&compact)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                )
            })?;
        let yaml = String::from_utf8(bytes).map_err(|_| TokenError::Utf8)?;
        let token: Token =
            serde_saphyr::from_str(&yaml).map_err(|e| TokenError::Yaml(e.to_string()))?;
        token.check()?;
        Ok(token)
    }

    fn check(&self) -> Result<(), TokenError> {
        let invalid = |field, why| Err(TokenError::Invalid { field, why });
        for (field, k) in [("otp.dht", &self.otp.dht), ("otp.crypto", &self.otp.crypto)] {
            if k.key.is_empty() {
                return invalid(field, "has an empty key");
            }
            if k.interval == 0 {
                return invalid(field, "has interval 0");
            }
        }
        if self.room.is_empty() {
            return invalid("room", "is empty");
        }
        if self.rendezvous.is_empty() {
            return invalid("rendezvous", "is empty");
        }
        if self.mdns.is_empty() {
            return invalid("mdns", "is empty");
        }
        if self.max_message_size < 1024 {
            return invalid("max_message_size", "is below 1024 bytes");
        }
        Ok(())
    }
}

fn random_string(n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; n];
    OsRng.fill_bytes(&mut bytes);
    // 256 % 62 != 0 biases a few letters by <1%: irrelevant for 43 characters of secret.
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fresh_keys() {
        let t = Token::generate();
        let text = t.encode();
        assert_eq!(Token::decode(&text).unwrap(), t);
        // Pasted with line breaks, unpadded, URL-safe: still the same token.
        let wrapped: String = text
            .as_bytes()
            .chunks(20)
            .map(|c| format!("{}\n", String::from_utf8_lossy(c)))
            .collect();
        assert_eq!(Token::decode(&wrapped).unwrap(), t);
        assert_eq!(Token::decode(text.trim_end_matches('=')).unwrap(), t);
        let other = Token::generate();
        assert_ne!(other.otp.crypto.key, t.otp.crypto.key);
        assert_eq!(t.otp.crypto.key.len(), KEY_LEN);
    }

    #[test]
    fn reads_an_edgevpn_style_token() {
        let yaml = "otp:\n  dht:\n    interval: 9000\n    key: AAAA\n    length: 6\n  crypto:\n    interval: 9000\n    key: BBBB\n    length: 6\nroom: r\nrendezvous: z\nmdns: m\nmax_message_size: 20971520\n";
        let t = Token::decode(&STANDARD.encode(yaml)).unwrap();
        assert_eq!(t.otp.crypto.key, "BBBB");
        assert_eq!(t.max_message_size, 20 << 20);
    }

    #[test]
    fn clear_errors() {
        assert_eq!(Token::decode("  \n"), Err(TokenError::Empty));
        assert!(matches!(
            Token::decode("!!!not base64"),
            Err(TokenError::Base64(_))
        ));
        assert_eq!(
            Token::decode(&STANDARD.encode([0xff, 0xfe])),
            Err(TokenError::Utf8)
        );
        let e = Token::decode(&STANDARD.encode("room: x\n")).unwrap_err();
        assert!(matches!(e, TokenError::Yaml(_)), "{e}");
        assert!(e.to_string().contains("otp"), "{e}");
        let mut t = Token::generate();
        t.otp.crypto.interval = 0;
        assert_eq!(
            Token::decode(&t.encode()),
            Err(TokenError::Invalid {
                field: "otp.crypto",
                why: "has interval 0"
            })
        );
        let mut t = Token::generate();
        t.room.clear();
        assert!(
            Token::decode(&t.encode())
                .unwrap_err()
                .to_string()
                .contains("`room` is empty")
        );
    }
}
