//! Harness pieces of the hardening tests (issue 8): what COS_PERSISTENT holds, read back from
//! the disk image on the host, and boots with extra disks or another initramfs.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kairos_qemu::boot::BootResult;

use crate::diskimg::Mounted;
use crate::{BASE_CMDLINE, artifacts};

/// GPT slot of COS_PERSISTENT on the test disks (qemu/src/disk.rs).
pub const PERSISTENT_PART: u32 = kairos_qemu::disk::part::PERSISTENT;

/// Every entry of a disk's COS_PERSISTENT: relative path -> "kind mode uid:gid content-hash"
/// (symlinks: their target). Read through a read-only, no-journal-replay loop mount, so reading
/// changes nothing.
pub fn persistent_snapshot(disk: &Path) -> BTreeMap<String, String> {
    let mnt = Mounted::part(disk, PERSISTENT_PART);
    let mut out = BTreeMap::new();
    walk(mnt.root(), mnt.root(), &mut out);
    mnt.unmount();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let rel = p
            .strip_prefix(root)
            .map(|r| r.display().to_string())
            .unwrap_or_default();
        if rel == "lost+found" {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let owner = format!("{:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid());
        let desc = if m.file_type().is_symlink() {
            let t = std::fs::read_link(&p).unwrap_or_default();
            format!("link {owner} -> {}", t.display())
        } else if m.is_dir() {
            walk(root, &p, out);
            format!("dir {owner}")
        } else {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            format!("file {owner} {} {:016x}", data.len(), fnv64(&data))
        };
        out.insert(rel, desc);
    }
}

fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// COS_PERSISTENT after a boot holds everything it held before, unchanged. The only thing a
/// boot may add is an empty directory: the bind store of a persistent state path.
pub fn assert_persistent_untouched(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) {
    for (path, was) in before {
        match after.get(path) {
            Some(now) => assert_eq!(now, was, "COS_PERSISTENT:{path} changed"),
            None => panic!("COS_PERSISTENT:{path} is gone (was {was})"),
        }
    }
    for (path, now) in after {
        if !before.contains_key(path) {
            assert!(
                now.starts_with("dir "),
                "COS_PERSISTENT:{path} appeared: {now}"
            );
        }
    }
    println!(
        "COS_PERSISTENT intact: {} entries before, {} after",
        before.len(),
        after.len()
    );
}

/// User data seeded on COS_PERSISTENT before the first boot, for the untouched checks.
pub fn seed_files() -> Vec<(String, Vec<u8>)> {
    let big: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    vec![
        ("important/data.bin".into(), big),
        (
            ".state/etc-ssh.bind/ssh_host_ed25519_key".into(),
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nkairos-test\n".to_vec(),
        ),
        ("kairos-user-notes.txt".into(), b"keep me\n".to_vec()),
    ]
}

/// A direct kernel boot (like `boot_direct`) with more disks after the test disk.
pub fn boot_direct_disks(name: &str, disks: &[&Path], cmdline: &str, until: &[&str]) -> BootResult {
    boot_direct_with(name, disks, &artifacts().initramfs, cmdline, until)
}

/// A direct kernel boot with a given initramfs.
pub fn boot_direct_with(
    name: &str,
    disks: &[&Path],
    initramfs: &Path,
    cmdline: &str,
    until: &[&str],
) -> BootResult {
    let a = artifacts();
    let mut s = crate::spec(disks, a.work.join(format!("{name}.log")), until, 180);
    s.kernel = Some(a.kernel.vmlinuz.clone());
    s.initrd = Some(initramfs.to_path_buf());
    s.append = Some(format!("{BASE_CMDLINE} {cmdline}"));
    crate::boot(name, s)
}

/// A raw disk (no partition table) holding one empty ext4 filesystem labelled `label`.
pub fn labelled_disk(name: &str, label: &str) -> PathBuf {
    let out = artifacts().work.join(format!("{name}.img"));
    let _ = std::fs::remove_file(&out);
    let f = std::fs::File::create(&out).expect("disk file");
    f.set_len(32 << 20).expect("disk size");
    drop(f);
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label])
        .arg(&out)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 -L {label} {}", out.display());
    out
}

/// The test initramfs plus busybox at /bin/busybox and /bin/sh, as a dracut-built initramfs
/// would carry a shell.
pub fn initramfs_with_shell() -> PathBuf {
    let a = artifacts();
    let out = a.work.join("initramfs-with-shell.img");
    let spec = kairos_initramfs::InitramfsSpec {
        init_binary: a.init_binary.clone(),
        kernel: a.kernel.clone(),
        modules: kairos_qemu::initramfs::default_modules(),
        extra_files: vec![
            ("/bin/busybox".into(), "bin/busybox".into()),
            ("/bin/busybox".into(), "bin/sh".into()),
        ],
    };
    kairos_initramfs::build(&spec, &out)
        .unwrap_or_else(|e| panic!("building {}: {e}", out.display()));
    out
}
