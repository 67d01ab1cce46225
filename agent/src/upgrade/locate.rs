//! Where the upgrade writes: COS_STATE (or COS_RECOVERY for `--recovery`) mounted read-write.
//! An explicit directory is used as it is (tests, or an operator who mounted it). Otherwise
//! the partition kairos-init left mounted read-only at `/run/initramfs/cos-state` (or
//! `cos-recovery`) is remounted read-write for the upgrade and back to read-only afterwards;
//! failing that, the partition is found by its filesystem label and mounted under
//! `/run/kairos/`, and unmounted afterwards.

use std::io::Write;
use std::path::{Path, PathBuf};

use kairos_init::blockdev;
use rustix::mount::{MountFlags, UnmountFlags};

use kairos_util::IoResultExt;

use super::UpgradeError;
use crate::Ctx;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    State,
    Recovery,
}

impl Partition {
    pub fn label(self) -> &'static str {
        match self {
            Partition::State => kairos_init::labels::STATE,
            Partition::Recovery => kairos_init::labels::RECOVERY,
        }
    }

    /// Where kairos-init mounts it (read-only) when it booted an image from it.
    pub fn initramfs_mountpoint(self) -> &'static str {
        match self {
            Partition::State => "/run/initramfs/cos-state",
            Partition::Recovery => "/run/initramfs/cos-recovery",
        }
    }

    fn own_mountpoint(self) -> &'static str {
        match self {
            Partition::State => "/run/kairos/cos-state",
            Partition::Recovery => "/run/kairos/cos-recovery",
        }
    }
}

enum Undo {
    Nothing,
    RemountReadOnly,
    Unmount,
}

/// The partition's root directory, writable for as long as this lives.
pub struct Target {
    pub dir: PathBuf,
    undo: Undo,
}

impl Drop for Target {
    fn drop(&mut self) {
        match self.undo {
            Undo::Nothing => {}
            Undo::RemountReadOnly => {
                let _ = rustix::mount::mount_remount(&self.dir, MountFlags::RDONLY, "");
            }
            Undo::Unmount => {
                let _ = rustix::mount::unmount(&self.dir, UnmountFlags::empty());
            }
        }
    }
}

/// (mount point, options) of each line of a mounts table that has options, escapes decoded.
pub fn mount_options(text: &str) -> Vec<(String, String)> {
    kairos_init::mountinfo::parse_mounts_lines(text)
        .into_iter()
        .filter(|m| !m.options.is_empty())
        .map(|m| (m.mountpoint, m.options))
        .collect()
}

/// Whether the options of a mount include `ro`.
pub fn is_read_only(options: &str) -> bool {
    options.split(',').any(|o| o == "ro")
}

pub fn open(
    ctx: &Ctx,
    which: Partition,
    explicit: Option<&Path>,
    log: &mut dyn Write,
) -> Result<Target, UpgradeError> {
    if let Some(dir) = explicit {
        if !dir.is_dir() {
            return Err(UpgradeError::NotADirectory {
                dir: dir.to_path_buf(),
                label: which.label(),
            });
        }
        return Ok(Target {
            dir: dir.to_path_buf(),
            undo: Undo::Nothing,
        });
    }
    let mounts = std::fs::read_to_string(ctx.path("/proc/self/mounts")).unwrap_or_default();
    let initramfs = which.initramfs_mountpoint();
    // Under `--root /host` (a container with the host's / mounted there, as the
    // system-upgrade-controller runs its jobs) the host's mounts appear below the root.
    let under_root = ctx.path(initramfs);
    if let Some((_, opts)) = mount_options(&mounts)
        .into_iter()
        .rfind(|(p, _)| p == initramfs || Path::new(p) == under_root)
    {
        let dir = ctx.path(initramfs);
        if !is_read_only(&opts) {
            return Ok(Target {
                dir,
                undo: Undo::Nothing,
            });
        }
        rustix::mount::mount_remount(&dir, MountFlags::empty(), "")
            .at(&dir, "remounting read-write")?;
        let _ = writeln!(
            log,
            "kairos-agent: remounted {} read-write for the upgrade",
            dir.display()
        );
        return Ok(Target {
            dir,
            undo: Undo::RemountReadOnly,
        });
    }
    // Only the boot disk's partition, by kairos-init's rule: another disk's (a stick with an
    // old install) is never written to.
    let found = blockdev::scan_boot_disk(&ctx.root);
    for i in &found.ignored {
        let _ = writeln!(log, "kairos-agent: {i}");
    }
    let devs = found.devices;
    let dev = devs
        .iter()
        .find(|d| d.fs.as_ref().and_then(|f| f.label.as_deref()) == Some(which.label()))
        .ok_or_else(|| UpgradeError::NoPartition {
            label: which.label(),
            mountpoint: initramfs,
            flag: if which == Partition::State {
                "--state-dir"
            } else {
                "--recovery-dir"
            },
        })?;
    let fstype = dev
        .fs
        .as_ref()
        .map_or("ext4", |f| f.fstype.mount_type())
        .to_string();
    let dir = ctx.path(which.own_mountpoint());
    std::fs::create_dir_all(&dir).at(&dir, "creating the mount point")?;
    kairos_init::sys::mount::device(&dev.devnode, &dir, &fstype, false)?;
    let _ = writeln!(
        log,
        "kairos-agent: mounted {} ({}) read-write on {}",
        which.label(),
        dev.devnode.display(),
        dir.display()
    );
    Ok(Target {
        dir,
        undo: Undo::Unmount,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_options() {
        let t = "/dev/vda4 /run/initramfs/cos-state ext4 ro,relatime 0 0\n\
                 /dev/vda5 /usr/local ext4 rw,relatime 0 0\n\
                 /dev/x /mnt/a\\040b ext4 rw 0 0\n";
        let m = mount_options(t);
        assert_eq!(
            m[0],
            ("/run/initramfs/cos-state".into(), "ro,relatime".into())
        );
        assert_eq!(m[2].0, "/mnt/a b");
        assert!(is_read_only(&m[0].1));
        assert!(!is_read_only(&m[1].1));
        assert!(!is_read_only("rw,errors=remount-ro"));
    }

    #[test]
    fn an_explicit_directory_is_used_as_is() {
        let t = crate::testutil::Tree::new();
        let d = tempfile::tempdir().unwrap();
        let target = open(&t.ctx, Partition::State, Some(d.path()), &mut Vec::new()).unwrap();
        assert_eq!(target.dir, d.path());
        let e = open(
            &t.ctx,
            Partition::State,
            Some(&d.path().join("nope")),
            &mut Vec::new(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("not a directory"), "{e}");
        // Nothing mounted, no labelled partition: the error says what to pass.
        let e = open(&t.ctx, Partition::Recovery, None, &mut Vec::new())
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("no partition labelled COS_RECOVERY")
                && e.to_string().contains("--recovery-dir"),
            "{e}"
        );
    }

    #[test]
    fn under_a_root_the_hosts_mounts_are_found_below_it() {
        // `kairos-agent --root /host`: the container's mount table shows the host's
        // read-write COS_STATE at /host/run/initramfs/cos-state.
        let t = crate::testutil::Tree::new();
        let at = t.ctx.path("/run/initramfs/cos-state");
        std::fs::create_dir_all(&at).unwrap();
        t.file(
            "/proc/self/mounts",
            format!(
                "overlay / overlay rw 0 0\n/dev/vda4 {} ext4 rw,relatime 0 0\n",
                at.display()
            ),
        );
        let target = open(&t.ctx, Partition::State, None, &mut Vec::new()).unwrap();
        assert_eq!(target.dir, at);
        assert!(matches!(target.undo, Undo::Nothing));
    }
}
