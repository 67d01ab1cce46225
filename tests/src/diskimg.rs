//! Reading test disk images on the host: GPT partitions by name (`sgdisk -p`) and partitions
//! or image files loop-mounted on a temp dir (read-only without journal replay, so reading
//! changes nothing; or read-write to plant a file), unmounted on drop. The one mount guard of
//! the test crates.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The number of the GPT partition named `name` (`sgdisk -p`'s last column).
pub fn part_by_name(disk: &Path, name: &str) -> u32 {
    let out = Command::new("sgdisk")
        .arg("-p")
        .arg(disk)
        .output()
        .expect("sgdisk");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    table
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let n: u32 = w.first()?.parse().ok()?;
            (w.len() >= 7 && w.last() == Some(&name)).then_some(n)
        })
        .next()
        .unwrap_or_else(|| panic!("{}: no partition named {name}:\n{table}", disk.display()))
}

/// A loop-mounted image or partition, or a block device, on a temp dir: unmounted on drop (or
/// by [`Mounted::unmount`], which fails the test if umount(8) does) and the dir removed.
pub struct Mounted {
    dir: tempfile::TempDir,
    /// Cleared by `unmount`, so drop does not unmount again.
    mounted: bool,
}

impl Mounted {
    /// `what` (a file, or the byte range `(offset, size)` of it) loop-mounted.
    pub fn new(what: &Path, range: Option<(u64, u64)>, rw: bool) -> Mounted {
        let mut opts = String::from(if rw { "rw,loop" } else { "ro,noload,loop" });
        if let Some((offset, size)) = range {
            opts.push_str(&format!(",offset={offset},sizelimit={size}"));
        }
        Mounted::mount(what, &opts)
    }

    /// Block device `dev` (e.g. a partition of an attached loop device), read-only.
    pub fn device(dev: &Path) -> Mounted {
        Mounted::mount(dev, "ro")
    }

    fn mount(what: &Path, opts: &str) -> Mounted {
        let dir = tempfile::tempdir().expect("temp dir");
        let st = Command::new("mount")
            .args(["-o", opts])
            .arg(what)
            .arg(dir.path())
            .status()
            .expect("mount(8)");
        assert!(st.success(), "mounting {} ({opts})", what.display());
        Mounted { dir, mounted: true }
    }

    /// Partition `n` of `disk`, read-only.
    pub fn part(disk: &Path, n: u32) -> Mounted {
        Mounted::new(disk, Some(partition_range(disk, n)), false)
    }

    /// Partition `n` of `disk`, read-write.
    pub fn part_rw(disk: &Path, n: u32) -> Mounted {
        Mounted::new(disk, Some(partition_range(disk, n)), true)
    }

    /// Unmounts now; a failing umount(8) fails the test.
    pub fn unmount(mut self) {
        let st = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .expect("umount(8)");
        assert!(st.success(), "unmounting {}", self.dir.path().display());
        self.mounted = false;
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `rel` with symlinks resolved inside the mount (an absolute target means the mount's /).
    pub fn resolve(&self, rel: &str) -> PathBuf {
        let mut p = self.path(rel);
        for _ in 0..8 {
            match std::fs::read_link(&p) {
                Ok(t) if t.is_absolute() => {
                    p = self.path(t.to_string_lossy().trim_start_matches('/'))
                }
                Ok(t) => p = p.parent().expect("parent").join(t),
                Err(_) => break,
            }
        }
        p
    }
}

fn partition_range(disk: &Path, n: u32) -> (u64, u64) {
    kairos_qemu::disk::partition_bytes(disk, n)
        .unwrap_or_else(|e| panic!("{}: partition {n}: {e}", disk.display()))
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.dir.path()).status();
        }
    }
}
