//! The executor's system calls against the real kernel: loop devices, ext4, squashfs and
//! overlayfs, each test in its own private mount namespace so nothing leaks onto the host.
//! Needs root; without it each test fails and says so.

use std::fs;
use std::path::Path;
use std::process::Command;

use kairos_init::probe::{self, FsType};
use kairos_init::sys::{fsutil, loopdev, mount};

/// unshare(CLONE_NEWNS) affects only the calling thread, which is the test's own thread.
fn private_namespace() {
    // A test that cannot run fails with the reason; it never passes silently.
    assert!(
        rustix::process::geteuid().is_root(),
        "privileged tests need root: run them as root"
    );
    // SAFETY: NEWNS only gives this thread its own mount table (and fs struct); no memory or
    // file descriptors are shared differently afterwards.
    if let Err(e) = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) } {
        panic!("unshare(CLONE_NEWNS): {e}: the privileged tests need their own mount namespace");
    }
    mount::make_private(Path::new("/")).expect("make / rprivate");
}

fn tool(cmd: &mut Command) -> bool {
    match cmd.output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("{cmd:?}: {e} (`kairos-qemu setup` installs the tools these tests use)"),
    }
}

#[test]
fn loop_mounted_image_is_read_only_and_overlay_makes_it_writable() {
    private_namespace();
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
    private_namespace();
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
    private_namespace();
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

/// A loop device attached with partition scanning (`losetup -P`), detached on drop.
struct PartLoop(String);

impl Drop for PartLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// The first boot of an image `dd`ed to a bigger disk, on a real kernel: a 32 MiB Kairos-style
/// disk (bios, oem, persistent with an ext4 holding a file) in a 96 MiB loop device. The GPT
/// moves to the end, the kernel learns the new partition size, the mounted ext4 grows online,
/// the file is still there, sgdisk finds no problem, and a second boot does nothing.
#[test]
fn first_boot_grows_cos_persistent_to_the_end_of_a_bigger_disk() {
    use kairos_init::blockdev::BlockDev;
    use kairos_init::{gpt, grow, sys::disk::Disk};
    private_namespace();
    let t = tempfile::tempdir().unwrap();
    let made_for = 32 * 2048u64;
    let parts = [
        ("bios", gpt::BIOS_BOOT, 2048u64, 4095u64),
        ("oem", gpt::LINUX_FS, 4096, 6143),
    ];
    let mut table: Vec<gpt::Partition> = parts
        .iter()
        .enumerate()
        .map(|(i, &(name, t, first, last))| gpt::Partition {
            name: name.into(),
            type_guid: t.into(),
            guid: gpt::guid_from_random([i as u8 + 1; 16]),
            first_lba: first,
            last_lba: last,
        })
        .collect();
    let (first, last) = (6144, gpt::last_usable(made_for));
    table.push(gpt::Partition {
        name: "persistent".into(),
        type_guid: gpt::LINUX_FS.into(),
        guid: gpt::guid_from_random([9; 16]),
        first_lba: first,
        last_lba: last,
    });
    let g = gpt::build(made_for, gpt::guid_from_random([7; 16]), &table).unwrap();
    let tree = t.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("kept"), "user data\n").unwrap();
    let part_img = t.path().join("persistent.img");
    let kib = (last + 1 - first) * 512 / 1024;
    if !tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "COS_PERSISTENT", "-d"])
            .arg(&tree)
            .arg(&part_img)
            .arg(format!("{kib}k")),
    ) {
        return;
    }
    let mut img = vec![0u8; (made_for * 512) as usize];
    img[..g.primary.len()].copy_from_slice(&g.primary);
    let at = g.backup_offset as usize;
    img[at..at + g.backup.len()].copy_from_slice(&g.backup);
    let fs_bytes = fs::read(&part_img).unwrap();
    let at = (first * 512) as usize;
    img[at..at + fs_bytes.len()].copy_from_slice(&fs_bytes);
    // dd onto a bigger device: the rest of it is whatever was there (zeros here).
    img.resize(96 << 20, 0);
    let disk_img = t.path().join("disk.img");
    fs::write(&disk_img, &img).unwrap();

    let out = Command::new("losetup")
        .args(["-f", "--show", "-P"])
        .arg(&disk_img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let _guard = PartLoop(dev.clone());
    let name = dev.trim_start_matches("/dev/").to_string();
    // This host's kernel has no GPT parser: add the partitions as partx -a would.
    let disk = Disk::open(Path::new(&dev), false).unwrap();
    for (n, p) in table.iter().enumerate() {
        let len = (p.last_lba - p.first_lba + 1) * 512;
        disk.add_partition(n as u32 + 1, p.first_lba * 512, len)
            .unwrap();
    }
    let pname = format!("{name}p3");
    let pdev = Path::new("/dev").join(&pname);
    let sys = Path::new("/sys/class/block").join(&pname);
    for _ in 0..100 {
        if pdev.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(pdev.exists(), "{} did not appear", pdev.display());
    let size = |p: &Path| -> u64 {
        fs::read_to_string(p.join("size"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(size(&sys), last - first + 1);

    let bd = BlockDev {
        name: pname.clone(),
        devnode: pdev.clone(),
        partname: Some("persistent".into()),
        is_partition: true,
        disk: String::new(),
        size_bytes: (last - first + 1) * 512,
        fs: None,
    };
    let mnt = t.path().join("grow");
    let o = grow::persistent(Path::new("/sys"), Path::new("/dev"), &mnt, &bd, None);
    let sectors = 96 * 2048u64;
    assert!(o.gpt_written && o.kernel_told, "{o:?}");
    let r = o.resized.expect("resized");
    assert_eq!(
        (r.first_lba, r.old_last_lba, r.new_last_lba),
        (first, last, sectors - 34)
    );
    assert_eq!(size(&sys), sectors - 34 - first + 1);
    // EXT4_IOC_RESIZE_FS needs CAP_SYS_RESOURCE (bit 24), which PID 1 has but a container may not.
    let cap_eff = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if cap_eff & (1 << 24) == 0 {
        eprintln!("SKIP the filesystem grow: no CAP_SYS_RESOURCE here");
        assert_eq!(o.fs, None);
    } else {
        let (old, new) = o.fs.expect("filesystem grown");
        assert_eq!(old, kib * 1024);
        assert!(
            new > 90 << 20 && new <= (sectors - 34 - first + 1) * 512,
            "{old} -> {new}"
        );
    }

    // The data survived, the kernel's view and the GPT agree, and nothing is left to do.
    mount::device(&pdev, &mnt, "ext4", true).unwrap();
    assert_eq!(fs::read_to_string(mnt.join("kept")).unwrap(), "user data\n");
    mount::unmount(&mnt, false).unwrap();
    let again = grow::persistent(Path::new("/sys"), Path::new("/dev"), &mnt, &bd, None);
    assert_eq!(again, grow::Outcome::default());
    let t2 = gpt::read_primary(sectors, &mut |o, l| disk.read_at(o, l)).unwrap();
    assert_eq!(t2.header.alternate_lba, sectors - 1);
    drop(disk);
    if let Ok(v) = Command::new("sgdisk").arg("-v").arg(&disk_img).output() {
        let text = String::from_utf8_lossy(&v.stdout);
        assert!(text.contains("No problems found"), "{text}");
    }
    if let Ok(v) = Command::new("e2fsck").args(["-fn"]).arg(&pdev).output() {
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    }
}
