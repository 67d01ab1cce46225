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

/// A `*-chroot` stage of `command` (install, upgrade, reset) in the new image `img`, judged
/// as the other hooks are ([`stages::judge`]): failed steps are a warning and the command
/// goes on, unless `strict` (`Some(the skipped sources' errors)`, see
/// [`stages::strictness`]), when they stop it. When the stage fails or cannot run, `img` is
/// removed: an image the stage did not finish must not be rotated in or booted.
pub fn hook<E>(
    img: &Path,
    point: &Path,
    stage: &str,
    sources: &[Source],
    strict: Option<&[String]>,
    command: &'static str,
    log: &mut dyn Write,
) -> Result<(), E>
where
    E: From<UpgradeError> + From<stages::HookFailed>,
{
    let judged = match run_in_image(img, point, stage, sources, log) {
        // No step for the stage still fails it under strict when sources were skipped, as
        // the other hooks do.
        Ok(report) => stages::judge(report.unwrap_or_default(), strict, stage, command, log)
            .map(drop)
            .map_err(E::from),
        Err(e) => Err(E::from(e)),
    };
    if judged.is_err() {
        match std::fs::remove_file(img) {
            Ok(()) => {
                let _ = writeln!(
                    log,
                    "kairos-agent: stage {stage} failed: {} removed",
                    img.display()
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                let _ = writeln!(
                    log,
                    "kairos-agent: warning: removing {}: {e}",
                    img.display()
                );
            }
        }
    }
    judged
}

/// Runs `stage` over `sources` chrooted into the ext image file `img`, mounted at `point`.
/// Nothing is mounted when no source has the stage (None). A failing step is in the report
/// (see [`hook`] for what it does to the command); an image that cannot be mounted is an
/// error.
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

    fn parse(text: &str) -> Source {
        crate::config::parse("90_custom.yaml", text, false)
            .expect("parses")
            .expect("config")
    }

    /// An ext image in `dir` whose shell is a static busybox. Needs root (the chroot tests
    /// attach a loop device, mount and chroot), and says so.
    fn busybox_image(dir: &Path) -> PathBuf {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root: it attaches a loop device, mounts and chroots"
        );
        let tree = dir.join("tree");
        for d in ["bin", "etc", "dev", "proc", "sys"] {
            std::fs::create_dir_all(tree.join(d)).expect("mkdir");
        }
        std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
            .expect("a static /bin/busybox on the test host");
        std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).expect("symlink");
        let img = dir.join("active.img");
        image::mkfs_ext4(&tree, &img, 32 << 20, 256, "COS_ACTIVE").expect("mkfs");
        img
    }

    #[test]
    fn strict_with_skipped_sources_fails_a_chroot_stage_that_has_no_step() {
        // As the other hooks: a source skipped as malformed fails the stage under strict,
        // steps or not (nothing is mounted for no step, so no root needed).
        let a = parse("stages:\n  boot:\n    - commands: [true]\n");
        let skipped = ["/oem/20_bad.yaml:3:1: did not find expected node content".to_string()];
        let e = hook::<UpgradeError>(
            Path::new("/nonexistent.img"),
            Path::new("/nonexistent-point"),
            "after-upgrade-chroot",
            std::slice::from_ref(&a),
            Some(&skipped[..]),
            "upgrade",
            &mut Vec::new(),
        )
        .expect_err("strict counts the skipped source");
        assert_eq!(
            e.to_string(),
            "stage after-upgrade-chroot: 1 failed and strict is set, so upgrade stops: strict: /oem/20_bad.yaml:3:1: did not find expected node content"
        );
        assert!(matches!(e, UpgradeError::Hook(_)), "{e:?}");
        hook::<UpgradeError>(
            Path::new("/nonexistent.img"),
            Path::new("/nonexistent-point"),
            "after-upgrade-chroot",
            &[a],
            None,
            "upgrade",
            &mut Vec::new(),
        )
        .expect("not strict: nothing to run, nothing failed");
    }

    /// Needs root: a failing step in the chroot is a warning without strict (the image is
    /// kept, every step ran) and with strict stops the command, in hook_with's words, and
    /// removes the image.
    #[test]
    fn a_failing_chroot_step_warns_or_under_strict_fails_and_removes_the_image() {
        let t = tempfile::tempdir().expect("tempdir");
        let img = busybox_image(t.path());
        let cfg = parse(
            "stages:\n  after-upgrade-chroot:\n    - name: breaks\n      commands: ['exit 3']\n    - name: goes-on\n      commands: ['/bin/busybox echo ran > /etc/second']\n",
        );
        let point = t.path().join("mnt");
        let mut log = Vec::new();
        hook::<UpgradeError>(
            &img,
            &point,
            "after-upgrade-chroot",
            std::slice::from_ref(&cfg),
            None,
            "upgrade",
            &mut log,
        )
        .expect("not strict: the upgrade goes on");
        let text = String::from_utf8_lossy(&log);
        assert!(
            text.contains("kairos-agent: warning: stage after-upgrade-chroot: 1 step(s) failed; the upgrade goes on (strict: true would stop it)"),
            "{text}"
        );
        assert!(img.exists(), "kept without strict");
        {
            let m = image::MountedImage::new(&img, &t.path().join("ro")).expect("mount ro");
            assert_eq!(
                std::fs::read_to_string(m.target.join("etc/second")).expect("second step"),
                "ran\n"
            );
        }
        let mut log = Vec::new();
        let e = hook::<UpgradeError>(
            &img,
            &point,
            "after-upgrade-chroot",
            &[cfg],
            Some(&[]),
            "upgrade",
            &mut log,
        )
        .expect_err("strict: the upgrade stops");
        let text = String::from_utf8_lossy(&log);
        assert!(matches!(e, UpgradeError::Hook(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "stage after-upgrade-chroot: 1 failed and strict is set, so upgrade stops: stage after-upgrade-chroot: 90_custom.yaml: step \"breaks\": commands: `exit 3`: exit status: 3"
        );
        assert!(!img.exists(), "the failed image is removed\n{text}");
        assert!(
            text.contains(&format!(
                "kairos-agent: stage after-upgrade-chroot failed: {} removed",
                img.display()
            )),
            "{text}"
        );
        assert!(!point.exists(), "mount point left");
    }

    /// Needs root (a loop device, mounts, chroot) and a static busybox as the image's shell.
    #[test]
    fn a_chroot_stage_writes_inside_the_image_not_the_host() {
        let t = tempfile::tempdir().expect("tempdir");
        let img = busybox_image(t.path());
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
