//! Ledger messages (agent/p2p/src/ledger.rs) under a fixed valid token. The first byte picks
//! the mode: raw bytes to `open`; a correctly sealed frame around fuzzed plaintext (so the
//! inner decoder is reached past the tag check); or a fuzzer-built Update that must survive
//! seal -> open.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use kairos_p2p::keys;
use kairos_p2p::lease::Range;
use kairos_p2p::ledger::{self, Admission, Entry, Ledger, Update};
use kairos_p2p::token::{Otp, OtpKey, Token};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_000;

fn token() -> Token {
    Token {
        otp: Otp {
            dht: OtpKey {
                interval: 360,
                key: "FUZZDHTKEYFUZZDHTKEYFUZZDHTKEY42".into(),
                length: 32,
            },
            crypto: OtpKey {
                interval: 9000,
                key: "FUZZCRYPTOKEYFUZZCRYPTOKEYFUZZ42".into(),
                length: 32,
            },
        },
        room: "fuzzroom".into(),
        rendezvous: "fuzzrendezvous".into(),
        mdns: "fuzzmdns".into(),
        max_message_size: 20 << 20,
    }
}

/// The frame `seal` makes, around arbitrary plaintext: version 1, window (BE), nonce, AEAD.
fn frame(token: &Token, plain: &[u8], nonce: [u8; 24]) -> Vec<u8> {
    let k = keys::current_crypto_key(token, NOW);
    let cipher = XChaCha20Poly1305::new((&k.key).into());
    let mut out = vec![1u8];
    out.extend_from_slice(&k.window.to_be_bytes());
    let header = out.clone();
    let ct = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: &header })
        .expect("encrypt");
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

#[derive(Debug, Arbitrary)]
struct FuzzEntry {
    key: String,
    value: String,
    owner: String,
    stamp: u64,
    ttl: u64,
    sig: String,
}

fn apply(update: Update) {
    let mut l = Ledger::default();
    let keys: Vec<String> = update.entries.iter().map(|(k, _)| k.clone()).collect();
    // The admission checks (signatures, owners, stamps, TTLs, leases, caps) see every entry.
    let ctx = Admission {
        now_ms: NOW * 1000,
        range: Range::parse("10.1.0.0/24").expect("a valid range"),
        settle_ms: 3000,
    };
    let from = update.from.clone();
    let _ = l.apply(update, &from, &ctx);
    for k in &keys {
        let _ = l.value(k, NOW * 1000);
    }
    let _ = l.expire(u64::MAX);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = token();
    match mode % 3 {
        0 => {
            if let Ok(u) = ledger::open(&token, rest, NOW) {
                apply(u);
            }
        }
        1 => {
            let m = frame(&token, rest, [7; 24]);
            if let Ok(u) = ledger::open(&token, &m, NOW) {
                apply(u);
            }
        }
        _ => {
            let mut u = Unstructured::new(rest);
            let (Ok(from), Ok(entries), Ok(digest), Ok(beat), Ok(want)) = (
                String::arbitrary(&mut u),
                Vec::<FuzzEntry>::arbitrary(&mut u),
                u64::arbitrary(&mut u),
                bool::arbitrary(&mut u),
                Vec::<String>::arbitrary(&mut u),
            ) else {
                return;
            };
            let update = Update {
                from,
                entries: entries
                    .into_iter()
                    .map(|e| {
                        (e.key, Entry { value: e.value, owner: e.owner, stamp: e.stamp, ttl: e.ttl, sig: e.sig })
                    })
                    .collect(),
                digest,
                beat,
                want,
            };
            if let Ok(m) = ledger::seal(&token, &update, NOW) {
                let back = ledger::open(&token, &m, NOW).expect("a sealed update must open");
                assert_eq!(back, update);
                apply(back);
            }
        }
    }
});
