//! The executor's system calls against the real kernel: loop devices, ext4, squashfs and
//! overlayfs, each test in its own private mount namespace so nothing leaks onto the host.
//! Needs root; skips with a message otherwise.

use std::fs;
use std::path::Path;
use std::process::Command;

use kairos_init::probe::{self, FsType};
use kairos_init::sys::{fsutil, loopdev, mount};

/// unshare(CLONE_NEWNS) affects only the calling thread, which is the test's own thread.
fn private_namespace() -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP: privileged tests need root");
        return false;
    }
    // SAFETY: NEWNS only gives this thread its own mount table (and fs struct); no memory or
    // file descriptors are shared differently afterwards.
    if let Err(e) = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) } {
        eprintln!("SKIP: unshare(CLONE_NEWNS): {e}");
        return false;
    }
    mount::make_private(Path::new("/")).expect("make / rprivate");
    true
}

fn tool(cmd: &mut Command) -> bool {
    match cmd.output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("SKIP: {cmd:?}: {e}");
            false
        }
    }
}

#[test]
fn loop_mounted_image_is_read_only_and_overlay_makes_it_writable() {
    if !private_namespace() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/os-release"), "NAME=test\n").unwrap();
    let img = t.path().join("active.img");
    if !tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "COS_ACTIVE", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("8M"),
    ) {
        return;
    }
    let info = probe::probe_path(&img).unwrap().unwrap();
    assert_eq!(info.fstype, FsType::Ext4);
    assert_eq!(info.label.as_deref(), Some("COS_ACTIVE"));

    let root = t.path().join("sysroot");
    fs::create_dir_all(&root).unwrap();
    let lo = loopdev::attach(Path::new("/dev"), &img, true).expect("attach loop");
    mount::device(&lo.path, &root, info.fstype.mount_type(), true).expect("mount image");
    drop(lo);
    // Read-only twice over: the loop device and the mount. Root cannot write either.
    let err = fs::write(root.join("etc/new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    let ovl = t.path().join("overlay");
    fs::create_dir_all(&ovl).unwrap();
    mount::tmpfs(&ovl, "16m", "0755").expect("tmpfs");
    let upper = ovl.join("etc/.overlay/upper");
    let work = ovl.join("etc/.overlay/work");
    fsutil::mkdir_p(&upper).unwrap();
    fsutil::mkdir_p(&work).unwrap();
    let etc = root.join("etc");
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        etc.display(),
        upper.display(),
        work.display()
    );
    mount::mount(
        "overlay",
        &etc,
        "overlay",
        rustix::mount::MountFlags::empty(),
        &data,
    )
    .expect("overlay");
    fs::write(etc.join("new"), "x").expect("write through the overlay");
    assert_eq!(
        fs::read_to_string(etc.join("os-release")).unwrap(),
        "NAME=test\n"
    );
    assert!(
        upper.join("new").exists(),
        "the write landed in the tmpfs upper dir"
    );

    mount::unmount(&etc, false).unwrap();
    mount::unmount(&root, false).unwrap();
}

#[test]
fn squashfs_recovery_image_mounts_through_a_loop_device() {
    if !private_namespace() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir_all(tree.join("sbin")).unwrap();
    fs::write(tree.join("sbin/init"), "#!/bin/sh\n").unwrap();
    let img = t.path().join("recovery.squashfs");
    if !tool(Command::new("mksquashfs").arg(&tree).arg(&img).args([
        "-noappend",
        "-quiet",
        "-comp",
        "xz",
    ])) {
        return;
    }
    assert_eq!(
        probe::probe_path(&img).unwrap().map(|i| i.fstype),
        Some(FsType::Squashfs)
    );
    let root = t.path().join("sysroot");
    fs::create_dir_all(&root).unwrap();
    let lo = loopdev::attach(Path::new("/dev"), &img, true).expect("attach loop");
    mount::device(&lo.path, &root, "squashfs", true).expect("mount squashfs");
    drop(lo);
    assert!(root.join("sbin/init").exists());
    mount::unmount(&root, false).unwrap();
}

#[test]
fn loop_device_is_released_after_unmount() {
    if !private_namespace() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("x.img");
    if !tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .arg("4M"),
    ) {
        return;
    }
    let root = t.path().join("m");
    fs::create_dir_all(&root).unwrap();
    let lo = loopdev::attach(Path::new("/dev"), &img, true).unwrap();
    let name = lo.path.file_name().unwrap().to_string_lossy().into_owned();
    mount::device(&lo.path, &root, "ext4", true).unwrap();
    drop(lo);
    mount::unmount(&root, false).unwrap();
    // AUTOCLEAR: the fallback path unmounts a failed image and must not leak its loop device.
    let backing = Path::new("/sys/block")
        .join(&name)
        .join("loop/backing_file");
    for _ in 0..50 {
        if !backing.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{name} still attached after unmount");
}

#[test]
fn attaching_a_missing_file_names_it() {
    let err = loopdev::attach(
        Path::new("/dev"),
        Path::new("/nonexistent/active.img"),
        true,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/active.img") || msg.contains("loop-control"),
        "{msg}"
    );
}
