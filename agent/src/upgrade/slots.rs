//! Which of `cOS/{active,passive,transition}.img` holds the running system, and what an
//! upgrade does with the three files so that the image that booted is never deleted.
//!
//! The running system's identity is the filesystem UUID of its root: kairos-init loop-mounts
//! the image at `/` read-only, so the root device in `/proc/self/mounts` is a loop device
//! whose ext4 superblock carries the UUID of the file it was attached from. A rename or a
//! relabel keeps the UUID; `mkfs.ext4` gives every new image a fresh one. Comparing it with
//! the UUID in each file's superblock (read without mounting) says which file booted, whatever
//! the names say after an interrupted rotation or an upgrade without a reboot.
//!
//! [`decide`] is the pure part: the three files and what booted → what to do with a leftover
//! `transition.img` and which renames follow.

use std::path::Path;

use super::rotate::{ACTIVE, Booted, PASSIVE, Step, TRANSITION};
use crate::Ctx;

/// One of the image files, by its role in `cOS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Active,
    Passive,
    Transition,
}

impl Slot {
    pub fn file(self) -> &'static str {
        match self {
            Slot::Active => ACTIVE,
            Slot::Passive => PASSIVE,
            Slot::Transition => TRANSITION,
        }
    }
}

/// An image file that exists: the UUID in its ext superblock, None when it has none (a
/// half-written image, another filesystem).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Found {
    pub uuid: Option<String>,
}

/// The three files as found in `cOS`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Files {
    pub active: Option<Found>,
    pub passive: Option<Found>,
    pub transition: Option<Found>,
}

impl Files {
    fn get(&self, s: Slot) -> Option<&Found> {
        match s {
            Slot::Active => self.active.as_ref(),
            Slot::Passive => self.passive.as_ref(),
            Slot::Transition => self.transition.as_ref(),
        }
    }

    /// Reads each file's superblock.
    pub fn read(cos: &Path) -> Files {
        let found = |name: &str| {
            let p = cos.join(name);
            p.is_file().then(|| Found { uuid: ext_uuid(&p) })
        };
        Files {
            active: found(ACTIVE),
            passive: found(PASSIVE),
            transition: found(TRANSITION),
        }
    }
}

/// What booted, as known to the upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Boot {
    /// The mode (--booted, the /run/cos sentinel, the command line); None when nothing says.
    pub mode: Option<Booted>,
    /// The running root's filesystem UUID; None when the root is not a loop-mounted ext image.
    pub root_uuid: Option<String>,
    /// `boot_assessment_tentative=yes`: this boot is a counted try not yet marked good.
    pub tentative: bool,
}

/// What to do with a `transition.img` found before the new one is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// None there.
    Nothing,
    /// Never booted (an interrupted build, or a new image not yet rotated in): removed.
    Remove,
    /// The image that booted, left there by a cut between the two renames of a rotation: the
    /// rotation is finished (relabelled COS_PASSIVE, renamed over passive.img).
    FinishRotation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What booted, for the history.
    pub booted: Booted,
    pub leftover: Leftover,
    pub steps: Vec<Step>,
    /// Why, for the log.
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "cannot tell what booted: no /run/cos sentinel, no COS_ label on the kernel command line, and the root filesystem is none of the images in cOS; refusing to guess which image to keep (pass --booted active, passive or recovery)"
    )]
    UnknownBoot,
    #[error(
        "{TRANSITION} is left by an interrupted upgrade and the running root is not a loop-mounted image, so whether it is the image that booted (a rotation cut between its renames) cannot be told; refusing to delete it. Look at it (e2label, debugfs) and remove it or rename it over {PASSIVE}"
    )]
    AmbiguousTransition,
}

/// The file holding the running system, if any.
fn running(files: &Files, boot: &Boot) -> Result<Option<Slot>, PlanError> {
    let all = [Slot::Active, Slot::Passive, Slot::Transition];
    if let Some(u) = &boot.root_uuid {
        let matching: Vec<Slot> = all
            .into_iter()
            .filter(|s| files.get(*s).and_then(|f| f.uuid.as_deref()) == Some(u.as_str()))
            .collect();
        // Identical copies (install writes passive as a copy of active): the mode's own file.
        let by_mode = match boot.mode {
            Some(Booted::Active) => Some(Slot::Active),
            Some(Booted::Passive) => Some(Slot::Passive),
            _ => None,
        };
        return Ok(match by_mode.filter(|m| matching.contains(m)) {
            Some(m) => Some(m),
            None => matching.first().copied(),
        });
    }
    match boot.mode {
        Some(Booted::Active) => {
            // An exchange only ever happens booted from active, and leaves the booted image
            // in transition.img: a complete image there could be it.
            if files.transition.as_ref().is_some_and(|t| t.uuid.is_some()) {
                return Err(PlanError::AmbiguousTransition);
            }
            Ok(files.active.as_ref().map(|_| Slot::Active))
        }
        Some(Booted::Passive) => Ok(files.passive.as_ref().map(|_| Slot::Passive)),
        Some(Booted::Recovery) => Ok(None),
        None => Err(PlanError::UnknownBoot),
    }
}

/// The plan for a system upgrade.
pub fn decide(files: &Files, boot: &Boot) -> Result<Plan, PlanError> {
    let mut slot = running(files, boot)?;
    let booted = match (boot.mode, slot) {
        (Some(m), _) => m,
        (None, Some(Slot::Passive)) => Booted::Passive,
        (None, Some(_)) => Booted::Active,
        (None, None) => return Err(PlanError::UnknownBoot),
    };
    let mut why = vec![match (&boot.root_uuid, slot) {
        (Some(u), Some(s)) => format!("the running root (UUID {u}) is {}", s.file()),
        (Some(u), None) => format!("the running root (UUID {u}) is none of the images"),
        (None, _) => "the running root is not a loop-mounted image: going by the boot mode".into(),
    }];
    let leftover = match (&files.transition, slot) {
        (None, _) => Leftover::Nothing,
        (Some(_), Some(Slot::Transition)) => {
            why.push(format!(
                "{TRANSITION} is the image that booted (a rotation was cut between its renames): finishing it, {TRANSITION} becomes {PASSIVE}"
            ));
            slot = Some(Slot::Passive);
            Leftover::FinishRotation
        }
        (Some(_), _) => {
            why.push(format!(
                "{TRANSITION} left by an interrupted upgrade never booted: removed"
            ));
            Leftover::Remove
        }
    };
    let have_active = files.active.is_some();
    let steps = match slot {
        _ if !have_active => {
            why.push(format!("no {ACTIVE}: the new image becomes {ACTIVE}"));
            vec![Step::ReplaceActive]
        }
        Some(Slot::Passive) => {
            if boot.mode == Some(Booted::Active) {
                why.push(format!(
                    "{ACTIVE} is not the image that booted (an upgrade without a reboot since): only {ACTIVE} is replaced, {PASSIVE} (what booted) is kept"
                ));
            } else {
                why.push(format!("booted from {PASSIVE}: only {ACTIVE} is replaced"));
            }
            vec![Step::ReplaceActive]
        }
        Some(Slot::Active) if boot.tentative => {
            why.push(format!(
                "this boot of {ACTIVE} is not marked good yet (boot_assessment_tentative=yes): {PASSIVE}, the last image that proved itself, is kept and only {ACTIVE} is replaced"
            ));
            vec![Step::ReplaceActive]
        }
        Some(Slot::Active) => {
            why.push(format!("booted from {ACTIVE}: it becomes {PASSIVE}"));
            vec![Step::Exchange, Step::OldActiveToPassive]
        }
        // Recovery, or a root that is none of these files: the old active becomes passive
        // (neither is running; the active is the newer one).
        Some(Slot::Transition) | None => {
            why.push(format!(
                "the running system is none of the images in cOS: the old {ACTIVE} becomes {PASSIVE}"
            ));
            vec![Step::Exchange, Step::OldActiveToPassive]
        }
    };
    Ok(Plan {
        booted,
        leftover,
        steps,
        why: why.join("; "),
    })
}

/// The UUID in an ext2/3/4 superblock (file or device), None otherwise.
pub fn ext_uuid(p: &Path) -> Option<String> {
    use kairos_init::probe::FsType;
    let fs = kairos_init::probe::probe_path(p).ok().flatten()?;
    matches!(fs.fstype, FsType::Ext2 | FsType::Ext3 | FsType::Ext4)
        .then_some(fs.uuid)
        .flatten()
}

/// The device mounted at `/` in `mounts` (`/proc/self/mounts`, read by the agent's one
/// mount-table parser, `kairos_init::mountinfo`): the last entry wins, as later mounts hide
/// earlier ones.
pub fn root_device(mounts: &str) -> Option<String> {
    kairos_init::mountinfo::parse_mounts(mounts)
        .into_iter()
        .filter(|(_, mnt)| mnt == "/")
        .map(|(dev, _)| dev)
        .next_back()
}

/// The running root's UUID when it is a loop device (what kairos-init mounts), read from the
/// device's superblock.
pub fn running_root_uuid(ctx: &Ctx) -> Option<String> {
    let mounts = std::fs::read_to_string(ctx.path("/proc/self/mounts")).ok()?;
    let dev = root_device(&mounts)?;
    if !dev.starts_with("/dev/loop") {
        return None;
    }
    ext_uuid(&ctx.path(&dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(u: &str) -> Option<Found> {
        Some(Found {
            uuid: (!u.is_empty()).then(|| u.to_string()),
        })
    }

    fn files(a: &str, p: &str, t: Option<&str>) -> Files {
        Files {
            active: f(a),
            passive: f(p),
            transition: t.and_then(f),
        }
    }

    fn boot(mode: Option<Booted>, uuid: Option<&str>) -> Boot {
        Boot {
            mode,
            root_uuid: uuid.map(str::to_string),
            tentative: false,
        }
    }

    const EX: [Step; 2] = [Step::Exchange, Step::OldActiveToPassive];

    #[test]
    fn booted_from_active_the_active_becomes_passive() {
        let p = decide(
            &files("A", "P", None),
            &boot(Some(Booted::Active), Some("A")),
        )
        .unwrap();
        assert_eq!(
            (p.leftover, p.steps.as_slice()),
            (Leftover::Nothing, &EX[..])
        );
        // A never-booted transition.img from an interrupted build goes first.
        let p = decide(
            &files("A", "P", Some("N")),
            &boot(Some(Booted::Active), Some("A")),
        )
        .unwrap();
        assert_eq!(
            (p.leftover, p.steps.as_slice()),
            (Leftover::Remove, &EX[..])
        );
        // A half-written one (no superblock) too, even when nothing identifies the root.
        let p = decide(
            &files("A", "P", Some("")),
            &boot(Some(Booted::Active), None),
        )
        .unwrap();
        assert_eq!(
            (p.leftover, p.steps.as_slice()),
            (Leftover::Remove, &EX[..])
        );
    }

    #[test]
    fn a_rotation_cut_between_its_renames_is_finished_not_deleted() {
        // The exchange done: active.img the new image, transition.img the one that booted.
        let p = decide(
            &files("N", "P", Some("A")),
            &boot(Some(Booted::Active), Some("A")),
        )
        .unwrap();
        assert_eq!(p.leftover, Leftover::FinishRotation);
        // Then the booted image is passive: the new build only replaces active.img.
        assert_eq!(p.steps, [Step::ReplaceActive]);
        assert_eq!(p.booted, Booted::Active);
        assert!(p.why.contains("cut between"), "{}", p.why);
        assert!(
            p.why
                .starts_with("the running root (UUID A) is transition.img"),
            "{}",
            p.why
        );
        // Without the root's identity the two cases look the same: refused, nothing deleted.
        assert_eq!(
            decide(
                &files("N", "P", Some("A")),
                &boot(Some(Booted::Active), None)
            ),
            Err(PlanError::AmbiguousTransition)
        );
    }

    #[test]
    fn after_an_upgrade_without_a_reboot_the_booted_image_stays() {
        // The first upgrade made active.img N1, passive.img the booted A.
        let p = decide(
            &files("N1", "A", None),
            &boot(Some(Booted::Active), Some("A")),
        )
        .unwrap();
        assert_eq!(p.steps, [Step::ReplaceActive]);
        assert!(p.why.contains("without a reboot"), "{}", p.why);
        // Booted from passive likewise, whatever the UUIDs.
        for uuid in [Some("P"), None] {
            let p = decide(&files("A", "P", None), &boot(Some(Booted::Passive), uuid)).unwrap();
            assert_eq!(p.steps, [Step::ReplaceActive]);
        }
        // A stale transition.img booted from passive never booted.
        let p = decide(
            &files("A", "P", Some("N")),
            &boot(Some(Booted::Passive), None),
        )
        .unwrap();
        assert_eq!(p.leftover, Leftover::Remove);
    }

    #[test]
    fn a_tentative_boot_keeps_the_passive_that_proved_itself() {
        let mut b = boot(Some(Booted::Active), Some("N1"));
        b.tentative = true;
        let p = decide(&files("N1", "A", None), &b).unwrap();
        assert_eq!(p.steps, [Step::ReplaceActive]);
        assert!(p.why.contains("not marked good"), "{}", p.why);
    }

    #[test]
    fn identical_copies_follow_the_mode() {
        // install writes passive.img as a copy of active.img: same UUID in both.
        let p = decide(
            &files("A", "A", None),
            &boot(Some(Booted::Passive), Some("A")),
        )
        .unwrap();
        assert_eq!(p.steps, [Step::ReplaceActive]);
        let p = decide(
            &files("A", "A", None),
            &boot(Some(Booted::Active), Some("A")),
        )
        .unwrap();
        assert_eq!(p.steps, EX);
    }

    #[test]
    fn an_unknown_mode_is_decided_by_the_root_or_refused() {
        let p = decide(&files("A", "P", None), &boot(None, Some("P"))).unwrap();
        assert_eq!(
            (p.booted, p.steps.as_slice()),
            (Booted::Passive, &[Step::ReplaceActive][..])
        );
        let p = decide(&files("A", "P", None), &boot(None, Some("A"))).unwrap();
        assert_eq!((p.booted, p.steps.as_slice()), (Booted::Active, &EX[..]));
        for uuid in [None, Some("elsewhere")] {
            assert_eq!(
                decide(&files("A", "P", None), &boot(None, uuid)),
                Err(PlanError::UnknownBoot)
            );
        }
    }

    #[test]
    fn from_recovery_or_without_an_active_image() {
        let p = decide(
            &files("A", "P", Some("N")),
            &boot(Some(Booted::Recovery), Some("R")),
        )
        .unwrap();
        assert_eq!(
            (p.leftover, p.steps.as_slice()),
            (Leftover::Remove, &EX[..])
        );
        let none = Files {
            passive: f("P"),
            ..Files::default()
        };
        let p = decide(&none, &boot(Some(Booted::Recovery), None)).unwrap();
        assert_eq!(p.steps, [Step::ReplaceActive]);
    }

    #[test]
    fn the_root_device_is_the_last_mount_on_slash() {
        let m =
            "rootfs / rootfs rw 0 0\n/dev/loop0 / ext4 ro,relatime 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(root_device(m).as_deref(), Some("/dev/loop0"));
        assert_eq!(root_device("proc /proc proc rw 0 0\n"), None);
        let t = crate::testutil::Tree::new();
        assert_eq!(running_root_uuid(&t.ctx), None);
        t.file("/proc/self/mounts", "/dev/sda2 / ext4 rw 0 0\n");
        assert_eq!(running_root_uuid(&t.ctx), None);
    }
}
