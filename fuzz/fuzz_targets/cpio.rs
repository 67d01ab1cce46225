//! newc cpio (build/initramfs/src/cpio.rs): read_entries on raw bytes, and a writer round trip: an
//! archive built from fuzzer-chosen entries must read back as exactly those entries.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kairos_initramfs::cpio::{CpioWriter, read_entries};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    Dir(String, u32),
    File(String, u32, Vec<u8>),
    Symlink(String, String),
    CharDev(String, u32, u32, u32),
}

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// The archive name the writer stores for `path` (leading "/" and "./" and trailing "/"
/// dropped), when it accepts it.
fn archive_name(path: &str) -> String {
    let mut t = path;
    loop {
        if let Some(r) = t.strip_prefix('/') {
            t = r;
        } else if let Some(r) = t.strip_prefix("./") {
            t = r;
        } else {
            break;
        }
    }
    t.trim_end_matches('/').to_owned()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Raw bytes: must never panic; what parses, parses consistently.
        if let Ok(entries) = read_entries(rest) {
            for e in &entries {
                let _ = (e.is_dir(), e.is_file(), e.is_symlink(), e.is_char_dev(), e.perm());
            }
        }
        return;
    }
    let mut u = Unstructured::new(rest);
    let Ok(ops) = Vec::<Op>::arbitrary(&mut u) else {
        return;
    };
    let mut w = CpioWriter::new(Vec::new());
    // (name, mode, data, rdev) of every non-directory entry the writer accepted, in order.
    let mut expected = Vec::new();
    let mut dirs = Vec::new();
    for op in &ops {
        match op {
            Op::Dir(p, m) => {
                if w.dir(p, *m).is_ok() {
                    dirs.push(archive_name(p));
                }
            }
            Op::File(p, m, d) => {
                if w.file(p, *m, d).is_ok() {
                    expected.push((archive_name(p), S_IFREG | (m & 0o7777), d.clone(), (0, 0)));
                }
            }
            Op::Symlink(p, t) => {
                if w.symlink(p, t).is_ok() {
                    expected.push((archive_name(p), S_IFLNK | 0o777, t.as_bytes().to_vec(), (0, 0)));
                }
            }
            Op::CharDev(p, m, maj, min) => {
                if w.char_dev(p, *m, *maj, *min).is_ok() {
                    expected.push((archive_name(p), S_IFCHR | (m & 0o7777), Vec::new(), (*maj, *min)));
                }
            }
        }
    }
    let archive = w.finish().expect("writing to a Vec cannot fail");
    assert_eq!(archive.len() % 512, 0, "archive not padded to 512");
    let entries = read_entries(&archive).expect("the writer's own archive must read back");
    let got: Vec<_> = entries
        .iter()
        .filter(|e| e.mode & S_IFMT != S_IFDIR)
        .map(|e| (e.name.clone(), e.mode, e.data.clone(), (e.rdev_major, e.rdev_minor)))
        .collect();
    assert_eq!(got, expected);
    // Every directory asked for is there, and every entry's parents come before it.
    let mut seen = std::collections::HashSet::new();
    for e in &entries {
        if let Some((parent, _)) = e.name.rsplit_once('/') {
            assert!(seen.contains(parent), "{:?} written before its parent", e.name);
        }
        if e.mode & S_IFMT == S_IFDIR {
            seen.insert(e.name.clone());
        }
    }
    for d in &dirs {
        assert!(seen.contains(d), "directory {d:?} missing");
    }
    let _ = S_IFREG;
});
