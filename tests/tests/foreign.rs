//! The contract is SPEC.md's names, not our disk builder: an initramfs from `kairos-qemu
//! initramfs` must boot a Kairos-layout disk made by other tools. This one is made the way a
//! UEFI install lays it out (efi, oem, recovery, state, persistent), partitioned by sfdisk,
//! each filesystem written straight into the disk at its offset by mkfs, with ext2 images as
//! upstream builds them and a recovery.img (COS_SYSTEM) instead of a squashfs.

use std::path::{Path, PathBuf};
use std::process::Command;

use kairos_qemu::rootfs::{self, RootfsOptions};
use kairos_tests::*;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (start sector, sectors) of each partition, from `sfdisk -d`.
fn partitions(disk: &Path) -> Vec<(u64, u64)> {
    let out = Command::new("sfdisk")
        .arg("-d")
        .arg(disk)
        .output()
        .expect("sfdisk -d");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.trim_start().split(',').next()?.trim().parse().ok()
    };
    text.lines()
        .filter(|l| l.contains("start="))
        .filter_map(|l| Some((field(l, "start=")?, field(l, "size=")?)))
        .collect()
}

fn ext(label: &str, tree: Option<&Path>, disk: &Path, part: (u64, u64)) {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", label, "-E"])
        .arg(format!("offset={}", part.0 * 512));
    if let Some(t) = tree {
        cmd.arg("-d").arg(t);
    }
    cmd.arg(disk).arg(format!("{}k", part.1 / 2));
    run(&mut cmd);
}

fn foreign_disk() -> PathBuf {
    let work = work_dir().join("foreign.work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let opts = RootfsOptions {
        kernel: None,
        initrd: None,
        layout_file: None,
    };
    let tree = work.join("tree");
    rootfs::build_tree(&tree, "active", &opts).expect("rootfs tree");
    let state = work.join("state");
    let recovery = work.join("recovery");
    for d in [state.join("cOS"), recovery.join("cOS")] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let ext2 = |label: &str, out: &Path| {
        run(Command::new("mkfs.ext2")
            .args(["-q", "-F", "-L", label, "-d"])
            .arg(&tree)
            .arg(out)
            .arg("48M"));
    };
    ext2("COS_ACTIVE", &state.join("cOS/active.img"));
    rootfs::set_image_name(&tree, "passive").expect("rename");
    ext2("COS_PASSIVE", &state.join("cOS/passive.img"));
    rootfs::set_image_name(&tree, "recovery").expect("rename");
    ext2("COS_SYSTEM", &recovery.join("cOS/recovery.img"));

    let disk = work_dir().join("foreign.img");
    let _ = std::fs::remove_file(&disk);
    run(Command::new("truncate").args(["-s", "400M"]).arg(&disk));
    let table = "label: gpt\n\
        size=32MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"efi\"\n\
        size=32MiB, name=\"oem\"\n\
        size=80MiB, name=\"recovery\"\n\
        size=160MiB, name=\"state\"\n\
        name=\"persistent\"\n";
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(table.as_bytes())
        .expect("write table");
    assert!(child.wait().expect("sfdisk").success());
    let p = partitions(&disk);
    assert_eq!(p.len(), 5, "{p:?}");
    run(Command::new("mkfs.vfat")
        .args(["-n", "COS_GRUB", "--offset"])
        .arg(p[0].0.to_string())
        .arg(&disk)
        .arg((p[0].1 / 2).to_string()));
    ext("COS_OEM", None, &disk, p[1]);
    ext("COS_RECOVERY", Some(&recovery), &disk, p[2]);
    ext("COS_STATE", Some(&state), &disk, p[3]);
    ext("COS_PERSISTENT", None, &disk, p[4]);
    disk
}

#[test]
fn initramfs_boots_a_kairos_disk_made_by_other_tools() {
    require_root();
    artifacts();
    let d = foreign_disk();
    let r = boot_direct("foreign-active", &d, ACTIVE, &[DONE]);
    assert_has(&r, "KAIROS-TEST: hello from image=active");
    assert_has(&r, "KAIROS-TEST: root=ro");
    assert_has(&r, "KAIROS-TEST: mount /usr/local ext4 rw");
    assert_has(&r, "KAIROS-TEST: mount /oem ext4 rw");

    let r = boot_direct(
        "foreign-recovery",
        &d,
        "root=LABEL=COS_SYSTEM cos-img/filename=/cOS/recovery.img",
        &[DONE],
    );
    assert_has(&r, "starting: mode=recovery image=/cOS/recovery.img");
    assert_has(&r, "KAIROS-TEST: hello from image=recovery");
    assert_has(&r, "KAIROS-TEST: mode=recovery");
    assert_has(&r, "KAIROS-TEST: root=ro");
}
