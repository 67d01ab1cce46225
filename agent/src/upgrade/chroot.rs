//! The `*-chroot` stages (`after-install-chroot`, `after-upgrade-chroot`,
//! `after-reset-chroot`): run, as upstream does, chrooted into the new system image before it
//! is finished, so what their steps write is inside the image that boots. The image file is
//! mounted read-write through a loop device with /dev, /proc and /sys bound in; everything is
//! unmounted (and the image synced) before [`run_in_image`] returns.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{UpgradeError, image};
use crate::Ctx;
use crate::config::Source;
use crate::stages::{self, StageReport};

/// Whether any source has a step for `stage` (or its `.before`/`.after`).
pub fn has_stage(sources: &[Source], stage: &str) -> bool {
    let subs = [
        format!("{stage}.before"),
        stage.to_string(),
        format!("{stage}.after"),
    ];
    sources.iter().any(|s| {
        let st = s.config.effective_stages();
        subs.iter()
            .any(|k| st.get(k).is_some_and(|v| !v.is_empty()))
    })
}

/// Mounts made for a chroot, undone in reverse on drop (also after an error).
struct Undo(Vec<PathBuf>);

impl Drop for Undo {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            if rustix::mount::unmount(m, rustix::mount::UnmountFlags::empty()).is_err() {
                let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
}

/// Runs `stage` over `sources` chrooted into the ext image file `img`, mounted at `point`.
/// Nothing is mounted when no source has the stage (None). A failing step is in the report
/// (the caller warns and goes on, as for the other hooks); an image that cannot be mounted
/// is an error.
pub fn run_in_image(
    img: &Path,
    point: &Path,
    stage: &str,
    sources: &[Source],
    log: &mut dyn Write,
) -> Result<Option<StageReport>, UpgradeError> {
    if !has_stage(sources, stage) {
        return Ok(None);
    }
    let bad = |what: String| UpgradeError::BadImage {
        path: img.to_path_buf(),
        what,
    };
    let _ = rustix::mount::unmount(point, rustix::mount::UnmountFlags::DETACH);
    std::fs::create_dir_all(point).map_err(|e| bad(format!("{}: {e}", point.display())))?;
    let report = {
        let lo = kairos_init::sys::loopdev::attach(Path::new("/dev"), img, false)
            .map_err(|e| bad(format!("attaching a loop device: {e}")))?;
        kairos_init::sys::mount::device(&lo.path, point, "ext4", false).map_err(|e| {
            bad(format!(
                "mounting it read-write on {}: {e}",
                point.display()
            ))
        })?;
        let mut undo = Undo(vec![point.to_path_buf()]);
        for d in ["/dev", "/proc", "/sys"] {
            let to = point.join(&d[1..]);
            // Only where the image has the directory: the chroot stage must not change the
            // image's tree by itself.
            if to.is_dir() && rustix::mount::mount_bind(d, &to).is_ok() {
                undo.0.push(to);
            }
        }
        let _ = writeln!(
            log,
            "kairos-agent: stage {stage}: chrooted into {}",
            img.display()
        );
        let mut ctx = Ctx::new(point, "/oem/grubenv");
        ctx.chroot = true;
        let report = stages::run(&ctx, stage, sources, log);
        drop(undo);
        drop(lo);
        report
    };
    let _ = std::fs::remove_dir(point);
    image::sync_file(img)?;
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chroot_stages_are_found_in_any_source() {
        let src = |text: &str| {
            crate::config::parse("t.yaml", text, false)
                .expect("parses")
                .expect("config")
        };
        let a = src("stages:\n  boot:\n    - commands: [true]\n");
        let b = src("stages:\n  after-install-chroot.after:\n    - commands: [true]\n");
        assert!(!has_stage(std::slice::from_ref(&a), "after-install-chroot"));
        assert!(has_stage(&[a.clone(), b], "after-install-chroot"));
        // Nothing to run: nothing mounted, no image needed.
        let r = run_in_image(
            Path::new("/nonexistent.img"),
            Path::new("/nonexistent-point"),
            "after-upgrade-chroot",
            &[a],
            &mut Vec::new(),
        )
        .expect("no stage, no error");
        assert!(r.is_none());
    }

    /// Needs root (a loop device, mounts, chroot) and a static busybox as the image's shell.
    #[test]
    fn a_chroot_stage_writes_inside_the_image_not_the_host() {
        let t = tempfile::tempdir().expect("tempdir");
        let tree = t.path().join("tree");
        for d in ["bin", "etc", "dev", "proc", "sys"] {
            std::fs::create_dir_all(tree.join(d)).expect("mkdir");
        }
        std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
            .expect("a static /bin/busybox on the test host");
        std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).expect("symlink");
        let img = t.path().join("active.img");
        image::mkfs_ext4(&tree, &img, 32 << 20, 256, "COS_ACTIVE").expect("mkfs");
        let cfg = crate::config::parse(
            "90_custom.yaml",
            "stages:\n  after-install-chroot:\n    - name: marker\n      commands:\n        - /bin/busybox echo \"in $(/bin/busybox ls /proc | /bin/busybox grep -cx self)\" > /etc/chroot-marker\n      files:\n        - path: /etc/from-files\n          content: written by a files step\n",
            false,
        )
        .expect("parses")
        .expect("config");
        let mut log = Vec::new();
        let r = run_in_image(
            &img,
            &t.path().join("mnt"),
            "after-install-chroot",
            &[cfg],
            &mut log,
        )
        .expect("mounted")
        .expect("ran");
        let log = String::from_utf8_lossy(&log);
        assert!(r.ok(), "{r:?}\n{log}");
        assert!(
            !Path::new("/etc/chroot-marker").exists(),
            "written on the host"
        );
        assert!(!t.path().join("mnt").exists(), "mount point left");
        let m = image::MountedImage::new(&img, &t.path().join("ro")).expect("mount ro");
        assert_eq!(
            std::fs::read_to_string(m.target.join("etc/chroot-marker")).expect("marker"),
            "in 1\n",
            "the command ran in the image with /proc bound in"
        );
        assert_eq!(
            std::fs::read_to_string(m.target.join("etc/from-files")).expect("files step"),
            "written by a files step"
        );
    }
}
