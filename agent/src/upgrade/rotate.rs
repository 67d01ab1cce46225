//! The A/B rotation in `COS_STATE:/cOS` once `transition.img` is complete and synced
//! (SPEC §5), ordered so that a power cut at any point leaves a bootable pair:
//!
//! 1. `active.img` and `transition.img` swap names atomically (`RENAME_EXCHANGE`), so there is
//!    never a moment without an `active.img` (upstream renames active away first, leaving a
//!    window with none);
//! 2. the old active, now `transition.img`, replaces `passive.img` (one atomic rename);
//! 3. the directory is fsynced after each rename.
//!
//! Cut before 1: the old pair, plus a stale `transition.img` that the next upgrade removes.
//! Cut between 1 and 2: the new active (on counted tries) and the *previous* passive, both
//! bootable; `transition.img` is then the old active, the image that booted, and the next
//! upgrade finishes the rotation with it instead of deleting it (slots.rs). Booted from passive, the passive is never touched: the new image only replaces
//! `active.img`.

use std::fs::File;
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};
use rustix::fs::{CWD, RenameFlags};

pub const ACTIVE: &str = "active.img";
pub const PASSIVE: &str = "passive.img";
pub const TRANSITION: &str = "transition.img";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Booted {
    Active,
    Passive,
    Recovery,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// active.img ↔ transition.img, atomically.
    Exchange,
    /// transition.img (the old active) → passive.img, replacing it.
    OldActiveToPassive,
    /// transition.img → active.img, replacing it (booted from passive).
    ReplaceActive,
}

/// The renames for an upgrade of the system image booted as `booted`.
pub fn plan(booted: Booted, have_active: bool) -> Vec<Step> {
    match (booted, have_active) {
        (Booted::Passive, _) | (_, false) => vec![Step::ReplaceActive],
        (Booted::Active | Booted::Recovery, true) => {
            vec![Step::Exchange, Step::OldActiveToPassive]
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Io(#[from] kairos_util::IoError),
    #[error("{}: {TRANSITION} is missing: build it before rotating", dir.display())]
    NoTransition { dir: PathBuf },
    #[error(
        "{}: not enough space for the new image: {needed} bytes ({} MiB) needed, {available} bytes ({} MiB) available",
        dir.display(),
        needed.div_ceil(1 << 20),
        available >> 20
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
}

/// fsync, then the journal checkpointed: GRUB, which ignores the journal, must find the
/// image a rename put in place (else it boots the old image's kernel with the new rootfs).
fn sync_dir(dir: &Path) -> Result<(), RotateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .at(dir, "fsync of the directory")?;
    kairos_init::sys::journal::checkpoint(dir).map_err(|e| {
        RotateError::Io(IoError::new(
            e.path,
            "checkpointing the ext4 journal (so GRUB sees the rename)",
            e.err,
        ))
    })?;
    Ok(())
}

/// Where [`execute_with`] is between renames, for the caller's hook (numbered from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    BeforeRename(usize),
    /// The rename is done, the directory not yet fsynced.
    AfterRenameBeforeSync(usize),
    /// The rename is on disk.
    Synced(usize),
}

/// Performs `steps` in `dir` (COS_STATE's `/cOS`, mounted read-write), fsyncing the directory
/// after each rename so the order on disk is the order here.
pub fn execute(dir: &Path, steps: &[Step]) -> Result<(), RotateError> {
    execute_with(dir, steps, &mut |_| Ok::<(), RotateError>(()))
}

/// [`execute`], calling `hook` around each rename (crash points, the relabel between renames).
pub fn execute_with<E: From<RotateError>>(
    dir: &Path,
    steps: &[Step],
    hook: &mut dyn FnMut(Event) -> Result<(), E>,
) -> Result<(), E> {
    let transition = dir.join(TRANSITION);
    if !transition.is_file() {
        return Err(RotateError::NoTransition {
            dir: dir.to_path_buf(),
        }
        .into());
    }
    File::open(&transition)
        .and_then(|f| f.sync_all())
        .at(&transition, "fsync")
        .map_err(RotateError::from)?;
    sync_dir(dir)?;
    let active = dir.join(ACTIVE);
    let passive = dir.join(PASSIVE);
    for (i, step) in steps.iter().enumerate() {
        let n = i + 1;
        hook(Event::BeforeRename(n))?;
        match step {
            Step::Exchange => {
                rustix::fs::renameat_with(CWD, &transition, CWD, &active, RenameFlags::EXCHANGE)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))
                    .at(&active, "exchanging with transition.img")
                    .map_err(RotateError::from)?
            }
            Step::OldActiveToPassive => std::fs::rename(&transition, &passive)
                .at(&passive, "renaming the old active to")
                .map_err(RotateError::from)?,
            Step::ReplaceActive => std::fs::rename(&transition, &active)
                .at(&active, "renaming transition.img to")
                .map_err(RotateError::from)?,
        }
        hook(Event::AfterRenameBeforeSync(n))?;
        sync_dir(dir)?;
        hook(Event::Synced(n))?;
    }
    Ok(())
}

/// Refuses before anything is written when `dir`'s filesystem cannot hold `needed` more bytes.
pub fn check_space(dir: &Path, needed: u64) -> Result<(), RotateError> {
    let st = rustix::fs::statvfs(dir)
        .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))
        .at(dir, "statvfs")?;
    let available = st.f_bavail.saturating_mul(st.f_frsize);
    if available < needed {
        return Err(RotateError::NoSpace {
            dir: dir.to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

/// Deletes a `transition.img` left by an interrupted upgrade or reset. For reset only: booted
/// from recovery it is never the running image, and a reset rebuilds both slots. An upgrade
/// decides with slots.rs, since after a cut between the renames it is the booted image.
pub fn remove_stale_transition(dir: &Path) -> Result<bool, RotateError> {
    let t = dir.join(TRANSITION);
    match std::fs::remove_file(&t) {
        Ok(()) => sync_dir(dir).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(IoError::new(&t, "removing a stale transition image", e).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (n, c) in files {
            fs::write(d.path().join(n), c).unwrap();
        }
        d
    }

    fn read(d: &Path, n: &str) -> Option<String> {
        fs::read_to_string(d.join(n)).ok()
    }

    #[test]
    fn from_active_the_old_active_becomes_passive() {
        let d = dir_with(&[(ACTIVE, "v1"), (PASSIVE, "v0"), (TRANSITION, "v2")]);
        let steps = plan(Booted::Active, true);
        assert_eq!(steps, [Step::Exchange, Step::OldActiveToPassive]);
        // The state a power cut after the first step leaves: both images bootable.
        execute(d.path(), &steps[..1]).unwrap();
        assert_eq!(read(d.path(), ACTIVE).as_deref(), Some("v2"));
        assert_eq!(read(d.path(), PASSIVE).as_deref(), Some("v0"));
        assert_eq!(read(d.path(), TRANSITION).as_deref(), Some("v1"));
        execute(d.path(), &steps[1..]).unwrap();
        assert_eq!(read(d.path(), ACTIVE).as_deref(), Some("v2"));
        assert_eq!(read(d.path(), PASSIVE).as_deref(), Some("v1"));
        assert_eq!(read(d.path(), TRANSITION), None);
    }

    #[test]
    fn from_passive_the_passive_is_untouched() {
        let d = dir_with(&[(ACTIVE, "bad"), (PASSIVE, "good"), (TRANSITION, "v2")]);
        let steps = plan(Booted::Passive, true);
        execute(d.path(), &steps).unwrap();
        assert_eq!(read(d.path(), ACTIVE).as_deref(), Some("v2"));
        assert_eq!(read(d.path(), PASSIVE).as_deref(), Some("good"));
    }

    #[test]
    fn without_an_active_image_the_new_one_becomes_active() {
        let d = dir_with(&[(PASSIVE, "v0"), (TRANSITION, "v2")]);
        execute(d.path(), &plan(Booted::Recovery, false)).unwrap();
        assert_eq!(read(d.path(), ACTIVE).as_deref(), Some("v2"));
        assert_eq!(read(d.path(), PASSIVE).as_deref(), Some("v0"));
    }

    #[test]
    fn refusals_name_the_directory_and_touch_nothing() {
        let d = dir_with(&[(ACTIVE, "v1")]);
        let e = execute(d.path(), &plan(Booted::Active, true)).unwrap_err();
        assert!(e.to_string().contains("transition.img is missing"), "{e}");
        assert_eq!(read(d.path(), ACTIVE).as_deref(), Some("v1"));
        let e = check_space(d.path(), u64::MAX).unwrap_err().to_string();
        assert!(
            e.contains("MiB) needed") && e.contains(&d.path().display().to_string()),
            "{e}"
        );
        check_space(d.path(), 1).unwrap();
    }

    #[test]
    fn the_hook_sees_every_rename_and_can_stop_between_them() {
        let d = dir_with(&[(ACTIVE, "v1"), (PASSIVE, "v0"), (TRANSITION, "v2")]);
        let mut seen = Vec::new();
        let r = execute_with(d.path(), &plan(Booted::Active, true), &mut |e| {
            seen.push(e);
            if e == Event::Synced(1) {
                return Err(RotateError::NoTransition {
                    dir: PathBuf::from("stop"),
                });
            }
            Ok(())
        });
        assert!(r.is_err());
        assert_eq!(
            seen,
            [
                Event::BeforeRename(1),
                Event::AfterRenameBeforeSync(1),
                Event::Synced(1)
            ]
        );
        // Stopped between the renames: new active, previous passive, old active aside.
        assert_eq!(read(d.path(), ACTIVE).as_deref(), Some("v2"));
        assert_eq!(read(d.path(), PASSIVE).as_deref(), Some("v0"));
        assert_eq!(read(d.path(), TRANSITION).as_deref(), Some("v1"));
    }

    #[test]
    fn stale_transition_is_removed_once() {
        let d = dir_with(&[(TRANSITION, "half")]);
        assert!(remove_stale_transition(d.path()).unwrap());
        assert!(!remove_stale_transition(d.path()).unwrap());
    }
}
