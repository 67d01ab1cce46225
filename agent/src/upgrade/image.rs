//! Building the image files: measuring a tree, sizing an ext4 image for it, `mkfs.ext4 -d`,
//! relabelling an image file, `mksquashfs` for recovery, and the non-recursive bind mount that
//! gives `dir:/` the root filesystem without /proc, /sys, /dev, /run and other mounts.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kairos_util::{IoResultExt, ToolError, run_tool};

use super::UpgradeError;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;

/// The journal, which a read-only image never uses, and the ext4 features GRUB 2.06 cannot
/// read (it loads the kernel from inside the image).
fn ext4_off() -> Vec<&'static str> {
    std::iter::once("has_journal")
        .chain(
            kairos_init::grubcfg::EXT4_FEATURES_GRUB_CANNOT_READ
                .iter()
                .copied(),
        )
        .collect()
}

/// What a tree holds, as an ext4 image will store it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measure {
    /// Data blocks: files and directories rounded up to 4 KiB, long symlinks one block.
    pub bytes: u64,
    /// Inodes (hard links counted once).
    pub inodes: u64,
}

/// Walks `root` without following symlinks or crossing into other filesystems.
pub fn measure(root: &Path) -> Result<Measure, UpgradeError> {
    let top = root.symlink_metadata().at(root, "measuring")?;
    let mut m = Measure::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let md = dir.symlink_metadata().at(&dir, "measuring")?;
        m.inodes += 1;
        m.bytes += md.len().div_ceil(BLOCK).max(1) * BLOCK;
        if md.dev() != top.dev() {
            continue;
        }
        for e in std::fs::read_dir(&dir).at(&dir, "measuring")? {
            let e = e.at(&dir, "measuring")?;
            let p = e.path();
            let md = p.symlink_metadata().at(&p, "measuring")?;
            let ft = md.file_type();
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            if md.nlink() > 1 && !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            m.inodes += 1;
            if ft.is_file() {
                m.bytes += md.len().div_ceil(BLOCK) * BLOCK;
            } else if ft.is_symlink() && md.len() >= 60 {
                m.bytes += BLOCK;
            }
        }
    }
    Ok(m)
}

/// Inodes for an image holding `m`: room for 10 % more files, at least 1024.
pub fn inode_count(m: Measure) -> u64 {
    (m.inodes + m.inodes / 10).max(1024)
}

/// The image size for `m`: data + inode tables, + 10 % and 16 MiB for ext4's own metadata
/// (group descriptors, bitmaps, extent blocks), in whole MiB. No journal, no reserved blocks.
pub fn image_size(m: Measure) -> u64 {
    let raw = m.bytes + inode_count(m) * INODE_SIZE;
    (raw + raw / 10 + 16 * MIB).div_ceil(MIB) * MIB
}

/// fsync of a file's data and metadata.
pub fn sync_file(p: &Path) -> Result<(), UpgradeError> {
    File::open(p).and_then(|f| f.sync_all()).at(p, "fsync")?;
    Ok(())
}

/// What mke2fs says when `-O` names a feature it does not know (e2fsprogs' misc/mke2fs.c).
const UNKNOWN_FEATURE: &str = "Invalid filesystem option set";

/// Whether a failed `mkfs.ext4` is worth retrying with fewer feature names: only when it
/// rejected the names (an older e2fsprogs), never for any other failure, whose message is the
/// one to report.
pub fn retry_without_features(failure: &UpgradeError) -> bool {
    matches!(failure, UpgradeError::Command(ToolError { output, .. }) if output.contains(UNKNOWN_FEATURE))
}

/// `mkfs.ext4 -d tree` into a new sparse file `img` of `size` bytes labelled `label`, then
/// fsync. An e2fsprogs that does not know the GRUB-unfriendly features is retried without
/// naming them. On failure `img` is removed.
pub fn mkfs_ext4(
    tree: &Path,
    img: &Path,
    size: u64,
    inodes: u64,
    label: &str,
) -> Result<(), UpgradeError> {
    let create = || -> Result<(), UpgradeError> {
        let f = File::create(img).at(img, "creating")?;
        f.set_len(size).at(img, "sizing")?;
        Ok(())
    };
    let attempt = |features: &[&str]| {
        create()?;
        let mut cmd = Command::new("mkfs.ext4");
        cmd.args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-L")
            .arg(label)
            .arg("-O")
            .arg(
                features
                    .iter()
                    .map(|f| format!("^{f}"))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .arg("-d")
            .arg(tree)
            .arg(img);
        run_tool(&mut cmd)?;
        Ok(())
    };
    let off = ext4_off();
    let built = match attempt(&off) {
        // An older mke2fs rejects feature names it does not know; the journal it knows.
        Err(first) if retry_without_features(&first) => attempt(&off[..1]).map_err(|_| first),
        other => other,
    }
    .and_then(|()| sync_file(img));
    if built.is_err() {
        let _ = std::fs::remove_file(img);
    }
    built
}

/// The files GRUB boots from inside an image: the kernel and the initramfs.
pub const KERNEL_FILES: &[&str] = &["boot/vmlinuz", "boot/initrd"];

/// Whether the image tree has `rel` (a file, or a symlink that resolves inside the tree).
pub fn tree_has(tree: &Path, rel: &str) -> bool {
    tree_file(tree, rel).is_some()
}

/// The regular file `rel` of the image `tree`, following symlinks inside the tree (an absolute
/// link target is taken relative to the tree, as in the image it belongs to); None when it
/// leads nowhere, loops, or climbs out of the tree with `..`.
pub fn tree_file(tree: &Path, rel: &str) -> Option<PathBuf> {
    let mut p = tree.join(rel.trim_start_matches('/'));
    for _ in 0..16 {
        let m = std::fs::symlink_metadata(&p).ok()?;
        if !m.file_type().is_symlink() {
            // The host resolved the directories on the way (a symlinked `/boot` is followed
            // as the host sees it): the file must really be inside the tree.
            let inside = std::fs::canonicalize(&p)
                .ok()
                .zip(std::fs::canonicalize(tree).ok())
                .is_some_and(|(f, t)| f.starts_with(t));
            return (m.is_file() && inside).then_some(p);
        }
        let target = std::fs::read_link(&p).ok()?;
        p = if target.is_absolute() {
            tree.join(target.strip_prefix("/").ok()?)
        } else {
            p.parent()?.join(target)
        };
        // `..` may not climb out of the tree (onto the host's files).
        let mut depth = 0i32;
        for c in p.strip_prefix(tree).ok()?.components() {
            match c {
                std::path::Component::ParentDir => depth -= 1,
                std::path::Component::Normal(_) => depth += 1,
                _ => {}
            }
            if depth < 0 {
                return None;
            }
        }
    }
    None
}

/// What a system image tree lacks to boot: `/boot/vmlinuz`, `/boot/initrd` (GRUB loads them
/// from the image), an init kairos-init can hand off to (its default list).
pub fn missing_boot_files(tree: &Path) -> Vec<String> {
    let mut missing: Vec<String> = KERNEL_FILES
        .iter()
        .filter(|f| !tree_has(tree, f))
        .map(|f| format!("/{f}"))
        .collect();
    let handoff = kairos_init::boot::HANDOFF;
    if !handoff
        .iter()
        .any(|p| kairos_init::sys::fsutil::executable_in_root(tree, p))
    {
        missing.push(format!("init (an executable {})", handoff.join(" or ")));
    }
    missing
}

/// A filesystem image mounted read-only through a loop device, to look into; unmounted on
/// drop.
pub struct MountedImage {
    pub target: PathBuf,
}

impl MountedImage {
    pub fn new(img: &Path, target: &Path) -> Result<MountedImage, UpgradeError> {
        let bad = |what: String| UpgradeError::BadImage {
            path: img.to_path_buf(),
            what,
        };
        let fs = kairos_init::probe::probe_path(img)
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("no filesystem to look into".into()))?;
        // One left by a crashed run: detach it first.
        let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
        std::fs::create_dir_all(target).at(target, "creating the mount point")?;
        let m = MountedImage {
            target: target.to_path_buf(),
        };
        let lo = kairos_init::sys::loopdev::attach(Path::new("/dev"), img, true)
            .map_err(|e| bad(format!("attaching a loop device: {e}")))?;
        kairos_init::sys::mount::device(&lo.path, target, fs.fstype.mount_type(), true).map_err(
            |e| {
                bad(format!(
                    "mounting it read-only on {}: {e}",
                    target.display()
                ))
            },
        )?;
        Ok(m)
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.target, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(&self.target);
    }
}

/// Sets the filesystem label of the ext2/3/4 image file `img`.
pub fn relabel(img: &Path, label: &str) -> Result<(), UpgradeError> {
    if run_tool(Command::new("e2label").arg(img).arg(label)).is_err() {
        run_tool(Command::new("tune2fs").arg("-L").arg(label).arg(img))?;
    }
    sync_file(img)
}

/// `mksquashfs tree out` (xz: GRUB's squash4 reads it), then fsync.
pub fn mksquashfs(tree: &Path, out: &Path) -> Result<(), UpgradeError> {
    let _ = std::fs::remove_file(out);
    run_tool(Command::new("mksquashfs").arg(tree).arg(out).args([
        "-comp",
        "xz",
        "-noappend",
        "-no-progress",
    ]))?;
    sync_file(out)
}

/// A non-recursive bind mount of a directory: its own filesystem only, nothing mounted below
/// it. Unmounted (detached) on drop.
pub struct BindMount {
    pub target: PathBuf,
}

impl BindMount {
    pub fn new(source: &Path, target: &Path) -> Result<BindMount, UpgradeError> {
        // One left mounted by a crashed upgrade: detach it (never delete through it).
        if rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH).is_ok() {
            let _ = std::fs::remove_dir(target);
        }
        std::fs::create_dir_all(target).at(target, "creating the mount point")?;
        rustix::mount::mount_bind(source, target)
            .at(target, format!("bind-mounting {} on", source.display()))?;
        Ok(BindMount {
            target: target.to_path_buf(),
        })
    }
}

impl BindMount {
    /// [`BindMount::new`], or None with a warning: the caller then reads `source` itself
    /// (mounts below it included).
    pub fn or_warn(source: &Path, target: &Path, log: &mut dyn std::io::Write) -> Option<Self> {
        match BindMount::new(source, target) {
            Ok(b) => Some(b),
            Err(e) => {
                let _ = writeln!(
                    log,
                    "kairos-agent: warning: {e}; reading {} directly (mounts below it are included)",
                    source.display()
                );
                None
            }
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        // remove_dir, not remove_dir_all: if the unmount failed, the source stays intact.
        let _ = rustix::mount::unmount(&self.target, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(&self.target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_check_follows_symlinks_inside_the_tree() {
        let t = tempfile::tempdir().expect("tempdir");
        let boot = t.path().join("boot");
        std::fs::create_dir_all(&boot).expect("mkdir");
        assert!(!tree_has(t.path(), "boot/vmlinuz"));
        std::fs::write(boot.join("vmlinuz-6.1"), "k").expect("write");
        std::os::unix::fs::symlink("vmlinuz-6.1", boot.join("vmlinuz")).expect("link");
        assert!(tree_has(t.path(), "boot/vmlinuz"));
        // Absolute links resolve inside the tree, not on the host.
        std::os::unix::fs::symlink("/boot/vmlinuz-6.1", boot.join("abs")).expect("link");
        assert!(tree_has(t.path(), "/boot/abs"));
        std::os::unix::fs::symlink("/etc/hostname-not-in-tree", boot.join("host")).expect("link");
        assert!(!tree_has(t.path(), "boot/host"));
        std::os::unix::fs::symlink("loop", boot.join("loop")).expect("link");
        assert!(!tree_has(t.path(), "boot/loop"));
        // `..` never climbs out of the tree onto the host's files.
        std::os::unix::fs::symlink("../../etc/passwd", boot.join("out")).expect("link");
        assert!(!tree_has(t.path(), "boot/out"));
        // Nor does a symlinked directory on the way lead out (the host follows it).
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("vmlinuz"), "host").expect("write");
        std::os::unix::fs::symlink(outside.path(), t.path().join("hostboot")).expect("link");
        assert!(!tree_has(t.path(), "hostboot/vmlinuz"));
        assert!(!tree_has(t.path(), "boot"));
        assert_eq!(
            tree_file(t.path(), "boot/vmlinuz"),
            Some(boot.join("vmlinuz-6.1"))
        );
    }

    #[test]
    fn a_tree_is_measured_in_blocks_and_inodes() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("etc/sub")).unwrap();
        std::fs::write(r.join("etc/a"), vec![1u8; 5000]).unwrap();
        std::fs::write(r.join("etc/empty"), b"").unwrap();
        std::fs::hard_link(r.join("etc/a"), r.join("etc/a-link")).unwrap();
        std::os::unix::fs::symlink("short", r.join("s")).unwrap();
        std::os::unix::fs::symlink("x".repeat(80), r.join("long")).unwrap();
        let m = measure(r).unwrap();
        // root, etc, etc/sub, a (once), empty, two symlinks.
        assert_eq!(m.inodes, 7);
        // a: 2 blocks; the long symlink: 1; three directories: at least 1 each.
        assert!(m.bytes >= 6 * BLOCK, "{m:?}");
        assert_eq!(m.bytes % BLOCK, 0);
        assert!(measure(&r.join("nope")).is_err());
    }

    #[test]
    fn image_sizes_leave_room_for_metadata() {
        let m = Measure {
            bytes: 100 * MIB,
            inodes: 10_000,
        };
        assert_eq!(inode_count(m), 11_000);
        let s = image_size(m);
        assert_eq!(s % MIB, 0);
        assert!(s >= 100 * MIB + 11_000 * 256 + 16 * MIB, "{s}");
        assert!(s < 140 * MIB, "{s}");
        assert_eq!(inode_count(Measure::default()), 1024);
        assert_eq!(image_size(Measure::default()), 17 * MIB);
    }

    #[test]
    fn mkfs_and_relabel_an_image_file() {
        if let Err(e) = Command::new("mkfs.ext4").arg("-V").output() {
            panic!(
                "mkfs.ext4: {e} (`kairos-qemu setup` installs e2fsprogs): a test that cannot run fails"
            );
        }
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/marker"), "v2").unwrap();
        let m = measure(&tree).unwrap();
        let img = t.path().join("x.img");
        mkfs_ext4(&tree, &img, image_size(m), inode_count(m), "COS_ACTIVE").unwrap();
        let fs = kairos_init::probe::probe_path(&img).unwrap().unwrap();
        assert_eq!(fs.label.as_deref(), Some("COS_ACTIVE"));
        relabel(&img, "COS_PASSIVE").unwrap();
        let fs = kairos_init::probe::probe_path(&img).unwrap().unwrap();
        assert_eq!(fs.label.as_deref(), Some("COS_PASSIVE"));
        let e = relabel(&t.path().join("missing.img"), "X").unwrap_err();
        assert!(e.to_string().contains("tune2fs"), "{e}");
    }

    #[test]
    fn a_failed_mkfs_says_why_and_leaves_no_image() {
        let t = tempfile::tempdir().expect("tempdir");
        let img = t.path().join("transition.img");
        // A tree that does not exist: mke2fs fails for a reason other than feature names.
        let e = mkfs_ext4(
            &t.path().join("no-tree"),
            &img,
            32 << 20,
            1024,
            "COS_ACTIVE",
        )
        .expect_err("mkfs of a missing tree");
        assert!(!retry_without_features(&e), "{e}");
        // The first attempt's error, with every feature it turned off.
        assert!(
            e.to_string()
                .contains("^has_journal,^metadata_csum_seed,^orphan_file"),
            "{e}"
        );
        assert!(!img.exists(), "a failed build left {}", img.display());
        // Only mke2fs' complaint about a feature name is retried.
        let older = UpgradeError::Command(kairos_util::ToolError {
            command: "mkfs.ext4".into(),
            status: "exit status: 1".into(),
            output: "Invalid filesystem option set: ^has_journal,^metadata_csum_seed,^orphan_file"
                .into(),
        });
        assert!(retry_without_features(&older));
    }

    #[test]
    fn an_image_tree_needs_a_kernel_an_initrd_and_an_init() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        assert_eq!(
            missing_boot_files(r),
            [
                "/boot/vmlinuz",
                "/boot/initrd",
                "init (an executable /sbin/init or /usr/bin/kairos-agent or /usr/sbin/kairos-agent)"
            ]
        );
        std::fs::create_dir_all(r.join("boot")).expect("mkdir");
        std::fs::create_dir_all(r.join("bin")).expect("mkdir");
        std::fs::create_dir_all(r.join("sbin")).expect("mkdir");
        std::fs::write(r.join("boot/vmlinuz-6.1"), "k").expect("write");
        std::os::unix::fs::symlink("vmlinuz-6.1", r.join("boot/vmlinuz")).expect("link");
        std::fs::write(r.join("boot/initrd"), "i").expect("write");
        // An init that is not executable does not count; an absolute link inside the tree does.
        std::fs::write(r.join("bin/busybox"), "b").expect("write");
        std::os::unix::fs::symlink("/bin/busybox", r.join("sbin/init")).expect("link");
        assert_eq!(missing_boot_files(r).len(), 1);
        std::fs::set_permissions(
            r.join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        assert!(missing_boot_files(r).is_empty());
        // tree_has follows links inside the tree only.
        std::os::unix::fs::symlink("/etc/hostname-not-in-tree", r.join("boot/host")).expect("link");
        assert!(!tree_has(r, "boot/host"));
    }
}
