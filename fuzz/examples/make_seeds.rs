//! Writes the seeds that need the crates themselves: a sealed ledger message under the
//! ledger target's fixed token, and a cpio archive from the qemu crate's writer.
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds -- fuzz/seeds`
//! (token and filesystem seeds come from the real tools; see scripts/fuzz).

use std::path::PathBuf;

use kairos_p2p::ledger::{self, Entry, Update};
use kairos_p2p::token::{Otp, OtpKey, Token};

// Keep in step with fuzz_targets/ledger.rs.
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

fn main() {
    let seeds = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    let update = Update {
        from: "12D3KooWQ7p9zfLJvqPLm7Yd6VGxH1kLcyTzpDpxw1Lq7Eb1kAbc".into(),
        entries: vec![
            (
                "roles/12D3KooWQ7p9zfLJvqPLm7Yd6VGxH1kLcyTzpDpxw1Lq7Eb1kAbc".into(),
                Entry {
                    value: "master".into(),
                    owner: "12D3KooWQ7p9zfLJvqPLm7Yd6VGxH1kLcyTzpDpxw1Lq7Eb1kAbc".into(),
                    stamp: NOW * 1000,
                    ttl: 60_000,
                },
            ),
            (
                "vpn/10.1.0.2".into(),
                Entry {
                    value: "12D3KooWQ7p9zfLJvqPLm7Yd6VGxH1kLcyTzpDpxw1Lq7Eb1kAbc".into(),
                    owner: "12D3KooWQ7p9zfLJvqPLm7Yd6VGxH1kLcyTzpDpxw1Lq7Eb1kAbc".into(),
                    stamp: NOW * 1000 + 1,
                    ttl: 120_000,
                },
            ),
        ],
    };
    let sealed = ledger::seal(&token(), &update, NOW).expect("seal");
    // Mode byte 0: raw message to open.
    let mut raw = vec![0u8];
    raw.extend_from_slice(&sealed);
    std::fs::write(seeds.join("ledger/sealed"), raw).unwrap();
    // Mode byte 1: plaintext the target seals itself.
    let mut plain = vec![1u8];
    plain.extend_from_slice(&serde_json::to_vec(&update).unwrap());
    std::fs::write(seeds.join("ledger/plaintext"), plain).unwrap();

    let mut w = kairos_initramfs::cpio::CpioWriter::new(Vec::new());
    w.dir("/dev", 0o755).unwrap();
    w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
    w.file("/init", 0o755, b"#!/bin/sh\nexec /sbin/init\n").unwrap();
    w.file("usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko", 0o644, b"\x7fELF")
        .unwrap();
    w.symlink("/sbin/init", "../init").unwrap();
    let mut cpio = vec![0u8];
    cpio.extend_from_slice(&w.finish().unwrap());
    std::fs::write(seeds.join("cpio/qemu-writer"), cpio).unwrap();
    println!("seeds written under {}", seeds.display());
}
