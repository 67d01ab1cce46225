//! `kairos-agent reset` (SPEC §5; recovery mode only): rebuild COS_STATE's images from the
//! recovery image, wipe COS_PERSISTENT (unless kept), keep COS_OEM (unless reset), point the
//! next boot at active and reboot.
//!
//! The order, and what a failure at each point leaves:
//! 1. refuse unless booted in recovery (nothing read or written before this);
//! 2. COS_STATE is mounted read-write and its `cOS` directory locked; the reset is marked
//!    pending in the grubenv ([`mark_pending`]): `saved_entry=statereset`, the counters
//!    disarmed, `kairos_reset_pending` holding the policy. From here until step 8 every boot
//!    is GRUB's `statereset` entry (recovery with `kairos.reset`), where the agent's daemon
//!    runs the reset again unattended ([`auto_reset`]) with the recorded policy;
//! 3. `before-reset` runs; the new image is built completely as `transition.img` (from
//!    COS_RECOVERY's `recovery.squashfs`, loop-mounted read-only, or a copy of `recovery.img`;
//!    or an explicit `--source dir:`/`file:`), fsynced, then renamed over `active.img`, the
//!    directory fsynced and the journal checkpointed (GRUB reads it);
//! 4. `passive.img` is a copy of it (built as `transition.img`, relabelled COS_PASSIVE,
//!    fsynced, renamed); a missing `grub2/grub.cfg` is regenerated;
//! 5. COS_OEM is wiped when asked (`--reset-oem`, `reset.reset-oem`), its grubenv kept;
//! 6. COS_PERSISTENT is wiped (its contents when it is mounted, `mkfs.ext4` when not) unless
//!    `--keep-persistent` / `reset.reset-persistent: false`;
//! 7. `.kairos-state` on COS_PERSISTENT gets a line;
//! 8. the grubenv says "boot active": counters re-armed, `next_entry` and the pending mark
//!    dropped, `saved_entry=cos`; `after-reset` runs, sync, reboot (or power off, or nothing
//!    with `--no-reboot`).
//!
//! Until step 3's rename the installed images are untouched; recovery stays bootable
//! throughout (GRUB falls back to it when active and passive are unusable).
//!
//! `KAIROS_AGENT_CRASH_AT=<point>` (or `pause:<point>`) stops the reset at one of
//! [`CRASH_POINTS`], for the power-cut tests; the unattended reset of a `kairos.reset` boot
//! also reads it from [`CRASH_FILE`], as the daemon has no environment to pass it in.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use kairos_init::grubenv::{self, Counters, DEFAULT_MAX_TRIES, GrubEnv, var};
use kairos_util::{IoError, IoResultExt, run_tool};
use serde_json::{Map, Value};

use crate::config::{self, LoadOptions};
use crate::progress::Progress;
use crate::upgrade::rotate::{self, ACTIVE, Booted, PASSIVE, TRANSITION};
use crate::upgrade::source::{self, Source};
use crate::upgrade::{RemoveTree, UpgradeError, detect_booted, history_line, image, locate};
use crate::{AgentError, Ctx, Outcome, stages};

/// Extra room besides the image (directory blocks, the grub.cfg).
const SLACK: u64 = 4 << 20;

/// Where the recovery squashfs is mounted while the image is built.
const SOURCE_MOUNT: &str = "/run/kairos/reset-source";
/// Where COS_PERSISTENT is mounted when nothing has it mounted.
const PERSISTENT_MOUNT: &str = "/run/kairos/cos-persistent";

/// The grubenv variable that says a reset is under way, and with which policy
/// (`persistent=wipe|keep,oem=wipe|keep`).
pub const PENDING_VAR: &str = "kairos_reset_pending";

/// Where the unattended reset looks for a crash point when its environment has none.
pub const CRASH_FILE: &str = "/run/kairos/reset-crash-at";

/// Where `KAIROS_AGENT_CRASH_AT` can stop a reset, in order, with what is on disk then.
pub const CRASH_POINTS: &[(&str, &str)] = &[
    (
        "pending",
        "the grubenv says statereset (counters disarmed, kairos_reset_pending set); nothing else touched",
    ),
    (
        "transition-built",
        "transition.img built and fsynced; active.img and passive.img as before",
    ),
    (
        "active-replaced",
        "active.img is the new image, on disk; passive.img the old passive",
    ),
    (
        "passive-replaced",
        "passive.img is a copy of the new active, on disk",
    ),
    (
        "persistent-wiped",
        "COS_OEM and COS_PERSISTENT wiped as asked, the history line written; the grubenv still says statereset",
    ),
    (
        "done",
        "the grubenv says active (armed, pending mark dropped); after-reset not run, no reboot yet",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// A hook stage failed and the config says `strict: true`.
    #[error(transparent)]
    Hook(#[from] stages::HookFailed),
    #[error(
        "reset runs only from recovery mode; booted: {booted} (boot the \"recovery\" entry: `kairos-agent bootentry --select recovery` and reboot, or pass --booted recovery)"
    )]
    NotRecovery { booted: String },
    #[error(
        "{}: neither cOS/recovery.squashfs nor cOS/recovery.img: no recovery image to reset from (pass --source dir:/ to use the running recovery root)",
        dir.display()
    )]
    NoRecoveryImage { dir: PathBuf },
    #[error("source {given:?}: reset takes dir:PATH or file:PATH (a squashfs or ext image)")]
    BadSource { given: String },
    #[error("{}: {what}", path.display())]
    BadImage { path: PathBuf, what: String },
    #[error("{key}: {error}")]
    Configured {
        key: &'static str,
        error: Box<ResetError>,
    },
    #[error(transparent)]
    Io(#[from] kairos_util::IoError),
    #[error(transparent)]
    Command(#[from] kairos_util::ToolError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error(transparent)]
    Rotate(#[from] rotate::RotateError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(
        "{}={given:?}: not a reset crash point; expected one of {known} (optionally pause:POINT)",
        crate::upgrade::CRASH_ENV
    )]
    CrashPoint { given: String, known: String },
    /// A syscall, no path; the error is in the message, so not also the source.
    #[error("reset done, but {what} failed: {err}")]
    Reboot {
        what: &'static str,
        err: std::io::Error,
    },
}

impl From<grubenv::GrubEnvError> for ResetError {
    fn from(e: grubenv::GrubEnvError) -> Self {
        ResetError::Agent(e.into())
    }
}

impl From<grubenv::CounterError> for ResetError {
    fn from(e: grubenv::CounterError) -> Self {
        ResetError::Agent(e.into())
    }
}

/// What happens once the reset is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Reboot,
    PowerOff,
    Nothing,
}

/// `kairos-agent reset`'s options. Directories are literal paths (not under `--root`).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `dir:PATH` or `file:PATH` instead of COS_RECOVERY's image.
    pub source: Option<String>,
    /// Where COS_STATE is mounted; default: found and mounted read-write.
    pub state_dir: Option<PathBuf>,
    /// Where COS_RECOVERY is mounted; default: /run/initramfs/cos-recovery, else found.
    pub recovery_dir: Option<PathBuf>,
    /// Where COS_PERSISTENT is mounted; default: found by label (wiped by mkfs when unmounted).
    pub persistent_dir: Option<PathBuf>,
    /// Where COS_OEM is mounted (only for `reset_oem`); default: /oem under the root.
    pub oem_dir: Option<PathBuf>,
    /// `--keep-persistent` (true) or nothing (None: `reset.reset-persistent`, default wipe).
    pub keep_persistent: Option<bool>,
    /// `--reset-oem` (true) or nothing (None: `reset.reset-oem`, default keep).
    pub reset_oem: Option<bool>,
    /// The history file (a path inside the root); default: COS_PERSISTENT's `.kairos-state`.
    pub kairos_state: Option<PathBuf>,
    /// What booted; default from /run/cos and /proc/cmdline.
    pub booted: Option<Booted>,
    /// None: `reset.poweroff` / `reset.reboot`, default reboot.
    pub after: Option<After>,
    /// `KAIROS_AGENT_CRASH_AT`: a point of [`CRASH_POINTS`], or `pause:POINT`.
    pub crash_at: Option<String>,
}

/// The decisions a reset makes from its flags and the `reset:` block of the cloud-config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub wipe_persistent: bool,
    pub wipe_oem: bool,
    pub after: After,
}

/// A cloud-config boolean: true/false, or the strings "true"/"yes"/"1" and the rest.
fn config_bool(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Some(true),
            "false" | "no" | "off" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        _ => None,
    }
}

impl Policy {
    /// Flags win; then upstream's keys `reset.reset-persistent` (default true),
    /// `reset.reset-oem` (default false), `reset.poweroff`, `reset.reboot` (default reboot).
    pub fn resolve(opts: &Options, raw: &Map<String, Value>) -> Policy {
        let block = raw.get("reset").and_then(Value::as_object);
        let key = |k: &str| config_bool(block.and_then(|b| b.get(k)));
        let after = opts.after.unwrap_or(if key("poweroff") == Some(true) {
            After::PowerOff
        } else if key("reboot") == Some(false) {
            After::Nothing
        } else {
            After::Reboot
        });
        Policy {
            wipe_persistent: match opts.keep_persistent {
                Some(keep) => !keep,
                None => key("reset-persistent").unwrap_or(true),
            },
            wipe_oem: opts
                .reset_oem
                .unwrap_or_else(|| key("reset-oem").unwrap_or(false)),
            after,
        }
    }
}

impl Policy {
    /// The `kairos_reset_pending` value that records this policy for a re-run.
    pub fn pending_value(&self) -> String {
        let w = |b: bool| if b { "wipe" } else { "keep" };
        format!(
            "persistent={},oem={}",
            w(self.wipe_persistent),
            w(self.wipe_oem)
        )
    }

    /// [`Policy::resolve`], except that a pending reset's recorded choices win over the
    /// cloud-config (flags still win): a reset interrupted with `--keep-persistent` must not
    /// wipe COS_PERSISTENT when it is redone unattended. An unreadable record is ignored.
    pub fn resolve_pending(
        opts: &Options,
        raw: &Map<String, Value>,
        pending: Option<&str>,
    ) -> Policy {
        let mut p = Policy::resolve(opts, raw);
        for part in pending.unwrap_or_default().split(',') {
            let wipe = match part.split_once('=').map(|(_, v)| v) {
                Some("wipe") => true,
                Some("keep") => false,
                _ => continue,
            };
            if part.starts_with("persistent=") && opts.keep_persistent.is_none() {
                p.wipe_persistent = wipe;
            } else if part.starts_with("oem=") && opts.reset_oem.is_none() {
                p.wipe_oem = wipe;
            }
        }
        p
    }
}

/// The grubenv while a reset is under way: every boot is `statereset` (recovery with
/// `kairos.reset`, which redoes the reset) until [`next_boot_active`]. `saved_entry` is what
/// survives boots (`next_entry` is one-shot), and armed counters would win over it, so they go.
pub fn mark_pending(env: &mut GrubEnv, policy: &Policy) -> Result<(), ResetError> {
    grubenv::disarm(env);
    env.unset(var::NEXT_ENTRY);
    env.set(var::SAVED_ENTRY, "statereset")?;
    env.set(PENDING_VAR, &policy.pending_value())?;
    Ok(())
}

/// The grubenv after a reset: the next boot is active, on fresh counted tries (active and
/// passive are the same new image); a one-shot `next_entry` and a `saved_entry` other than
/// `cos` would send it elsewhere, so they go, and so does the pending mark.
pub fn next_boot_active(env: &mut GrubEnv) -> Result<(), ResetError> {
    let max = Counters::from_env(env).map_or(DEFAULT_MAX_TRIES, |c| c.max);
    grubenv::arm(env, max)?;
    env.unset(var::NEXT_ENTRY);
    env.unset(PENDING_VAR);
    if env.get(var::SAVED_ENTRY).is_some_and(|s| s != "cos") {
        env.set(var::SAVED_ENTRY, "cos")?;
    }
    Ok(())
}

/// Where the new image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A squashfs, mounted read-only and copied into a new ext4 image.
    Squashfs(PathBuf),
    /// An ext2/3/4 image, copied and relabelled.
    ExtImage(PathBuf),
    /// A directory tree (its own filesystem only).
    Tree(PathBuf),
}

impl ImageSource {
    fn path(&self) -> &Path {
        match self {
            ImageSource::Squashfs(p) | ImageSource::ExtImage(p) | ImageSource::Tree(p) => p,
        }
    }
}

/// COS_RECOVERY's image: `cOS/recovery.squashfs` first, then `cOS/recovery.img`.
pub fn recovery_image(recovery_root: &Path) -> Result<ImageSource, ResetError> {
    let cos = recovery_root.join("cOS");
    let squash = cos.join("recovery.squashfs");
    if squash.is_file() {
        return Ok(ImageSource::Squashfs(squash));
    }
    let img = cos.join("recovery.img");
    if img.is_file() {
        return Ok(ImageSource::ExtImage(img));
    }
    Err(ResetError::NoRecoveryImage {
        dir: recovery_root.to_path_buf(),
    })
}

/// `--source`: `dir:PATH`, or `file:PATH` holding a squashfs or an ext image.
fn explicit_source(given: &str) -> Result<ImageSource, ResetError> {
    use kairos_init::probe::FsType;
    match source::parse(given)? {
        Source::Dir(p) if p.is_dir() => Ok(ImageSource::Tree(p)),
        Source::File(p) => {
            let fs = kairos_init::probe::probe_path(&p)
                .map_err(|e| ResetError::BadImage {
                    path: p.clone(),
                    what: e.to_string(),
                })?
                .map(|f| f.fstype);
            match fs {
                Some(FsType::Squashfs) => Ok(ImageSource::Squashfs(p)),
                Some(FsType::Ext2 | FsType::Ext3 | FsType::Ext4) => Ok(ImageSource::ExtImage(p)),
                other => Err(ResetError::BadImage {
                    path: p,
                    what: format!(
                        "holds {}, expected a squashfs or an ext2/3/4 image",
                        other.map_or("no known filesystem", |f| f.name())
                    ),
                }),
            }
        }
        Source::Dir(p) => Err(ResetError::BadImage {
            path: p,
            what: "not a directory".into(),
        }),
        _ => Err(ResetError::BadSource {
            given: given.into(),
        }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), ResetError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .at(dir, "fsync of the directory")?;
    Ok(())
}

/// Removes everything in `dir` (not `dir` itself) that is on `dir`'s filesystem; entries
/// that are other mounts are left alone and returned.
pub fn wipe_contents(dir: &Path) -> Result<Vec<PathBuf>, ResetError> {
    wipe_contents_except(dir, &[])
}

/// [`wipe_contents`], leaving the paths in `keep` (COS_OEM's grubenv, which holds the
/// pending mark until the reset is done).
pub fn wipe_contents_except(dir: &Path, keep: &[PathBuf]) -> Result<Vec<PathBuf>, ResetError> {
    use std::os::unix::fs::MetadataExt;
    let top = dir.symlink_metadata().at(dir, "reading")?.dev();
    let mut skipped = Vec::new();
    for e in std::fs::read_dir(dir).at(dir, "listing")? {
        let p = e.at(dir, "listing")?.path();
        if keep.contains(&p) {
            continue;
        }
        let md = p.symlink_metadata().at(&p, "reading")?;
        if md.is_dir() {
            if md.dev() != top {
                skipped.push(p);
                continue;
            }
            std::fs::remove_dir_all(&p).at(&p, "removing")?;
        } else {
            std::fs::remove_file(&p).at(&p, "removing")?;
        }
    }
    sync_dir(dir)?;
    Ok(skipped)
}

/// Unmounts (detached) and removes a mount point on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The squashfs's tree: loop-mounted read-only at `mount_point`, or, when that fails,
/// unpacked with `unsquashfs` into `scratch`.
enum SquashTree {
    Mounted(Mounted),
    Unpacked(RemoveTree),
}

impl SquashTree {
    fn dir(&self) -> &Path {
        match self {
            SquashTree::Mounted(m) => &m.0,
            SquashTree::Unpacked(t) => &t.0,
        }
    }
}

fn open_squashfs(
    file: &Path,
    mount_point: &Path,
    scratch: &Path,
    log: &mut dyn Write,
) -> Result<SquashTree, ResetError> {
    let mounted = (|| -> Result<Mounted, String> {
        let _ = rustix::mount::unmount(mount_point, rustix::mount::UnmountFlags::DETACH);
        std::fs::create_dir_all(mount_point).map_err(|e| e.to_string())?;
        let guard = Mounted(mount_point.to_path_buf());
        let lo = kairos_init::sys::loopdev::attach(Path::new("/dev"), file, true)
            .map_err(|e| e.to_string())?;
        kairos_init::sys::mount::device(&lo.path, mount_point, "squashfs", true)
            .map_err(|e| e.to_string())?;
        Ok(guard)
    })();
    match mounted {
        Ok(m) => Ok(SquashTree::Mounted(m)),
        Err(e) => {
            writeln!(
                log,
                "kairos-agent: warning: mounting {}: {e}; unpacking it with unsquashfs instead",
                file.display()
            )
            .map_err(AgentError::Output)?;
            let _ = std::fs::remove_dir_all(scratch);
            let guard = RemoveTree(scratch.to_path_buf());
            run_tool(
                Command::new("unsquashfs")
                    .args(["-q", "-n", "-d"])
                    .arg(scratch)
                    .arg(file),
            )?;
            Ok(SquashTree::Unpacked(guard))
        }
    }
}

/// Builds `cos/transition.img` (label COS_ACTIVE) from `src`, fsynced. Refuses when the
/// filesystem cannot hold it even after dropping `passive.img` (which the reset replaces).
fn build_transition(
    ctx: &Ctx,
    src: &ImageSource,
    cos: &Path,
    log: &mut dyn Write,
) -> Result<(), ResetError> {
    let transition = cos.join(TRANSITION);
    rotate::remove_stale_transition(cos)?;
    let make_room = |needed: u64, log: &mut dyn Write| -> Result<(), ResetError> {
        if rotate::check_space(cos, needed).is_err() && cos.join(PASSIVE).exists() {
            writeln!(
                log,
                "kairos-agent: removing {PASSIVE} first to make room (it is rebuilt from the new image)"
            ).map_err(AgentError::Output)?;
            std::fs::remove_file(cos.join(PASSIVE)).at(&cos.join(PASSIVE), "removing")?;
            sync_dir(cos)?;
        }
        rotate::check_space(cos, needed)?;
        Ok(())
    };
    let from_tree = |tree: &Path, log: &mut dyn Write| -> Result<(), ResetError> {
        let m = image::measure(tree)?;
        let size = image::image_size(m);
        make_room(size + SLACK, log)?;
        writeln!(
            log,
            "kairos-agent: building {} ({} MiB for {} MiB in {} inodes) from {}",
            transition.display(),
            size >> 20,
            m.bytes >> 20,
            m.inodes,
            src.path().display()
        )
        .map_err(AgentError::Output)?;
        image::mkfs_ext4(tree, &transition, size, image::inode_count(m), "COS_ACTIVE")?;
        Ok(())
    };
    match src {
        ImageSource::Squashfs(f) => {
            let tree = open_squashfs(
                f,
                &ctx.path(SOURCE_MOUNT),
                &cos.join(".kairos-reset-rootfs"),
                log,
            )?;
            from_tree(tree.dir(), log)?;
        }
        ImageSource::Tree(p) => {
            // The directory's own filesystem: `dir:/` without /proc, /sys, the overlays.
            let mp = ctx.path(SOURCE_MOUNT);
            match image::BindMount::new(p, &mp) {
                Ok(b) => from_tree(&b.target.clone(), log)?,
                Err(e) => {
                    writeln!(
                        log,
                        "kairos-agent: warning: {e}; reading {} directly",
                        p.display()
                    )
                    .map_err(AgentError::Output)?;
                    from_tree(p, log)?;
                }
            }
        }
        ImageSource::ExtImage(f) => {
            let size = std::fs::metadata(f).at(f, "reading")?.len();
            make_room(size + SLACK, log)?;
            writeln!(
                log,
                "kairos-agent: copying {} to {}",
                f.display(),
                transition.display()
            )
            .map_err(AgentError::Output)?;
            std::fs::copy(f, &transition).at(&transition, "copying the image to")?;
            image::relabel(&transition, "COS_ACTIVE")?;
        }
    }
    image::sync_file(&transition)?;
    Ok(())
}

/// `active.img` → a copy `passive.img` labelled COS_PASSIVE, built aside and renamed in.
fn copy_to_passive(cos: &Path) -> Result<(), ResetError> {
    let active = cos.join(ACTIVE);
    let transition = cos.join(TRANSITION);
    let size = std::fs::metadata(&active).at(&active, "reading")?.len();
    let reclaim = std::fs::metadata(cos.join(PASSIVE)).map_or(0, |m| m.len());
    rotate::check_space(cos, (size + SLACK).saturating_sub(reclaim))?;
    std::fs::copy(&active, &transition).at(&transition, "copying the active image to")?;
    image::relabel(&transition, "COS_PASSIVE")?;
    image::sync_file(&transition)?;
    let passive = cos.join(PASSIVE);
    std::fs::rename(&transition, &passive).at(&passive, "renaming the copy to")?;
    sync_dir(cos)?;
    // GRUB reads COS_STATE without replaying its journal.
    kairos_init::sys::journal::checkpoint(cos).map_err(|e| {
        ResetError::Io(IoError::new(
            e.path,
            "checkpointing the ext4 journal (so GRUB sees the new passive.img)",
            e.err,
        ))
    })?;
    Ok(())
}

/// COS_PERSISTENT for the wipe and the history: a directory, and whether we mounted it.
struct Persistent {
    dir: PathBuf,
    _mounted: Option<Mounted>,
}

/// The device labelled COS_PERSISTENT and where it is mounted now, if anywhere.
fn find_persistent(ctx: &Ctx) -> Option<(PathBuf, Option<PathBuf>)> {
    // Only the boot disk's, by kairos-init's rule: another disk's COS_PERSISTENT is never wiped.
    let devs = kairos_init::blockdev::scan_boot_disk(&ctx.root).devices;
    let dev = devs.iter().find(|d| {
        d.fs.as_ref().and_then(|f| f.label.as_deref()) == Some(kairos_init::labels::PERSISTENT)
    })?;
    let mounts = std::fs::read_to_string(ctx.path("/proc/self/mounts")).unwrap_or_default();
    let canon = std::fs::canonicalize(&dev.devnode).unwrap_or_else(|_| dev.devnode.clone());
    let at = kairos_init::mountinfo::parse_mounts(&mounts)
        .into_iter()
        .filter(|(source, _)| {
            let s = Path::new(source);
            s == dev.devnode || std::fs::canonicalize(s).is_ok_and(|c| c == canon)
        })
        .map(|(_, target)| ctx.path(target))
        .next();
    Some((dev.devnode.clone(), at))
}

/// Wipes COS_PERSISTENT when `wipe`, and returns it (mounted) for the history line.
fn handle_persistent(
    ctx: &Ctx,
    opts: &Options,
    wipe: bool,
    log: &mut dyn Write,
) -> Result<Option<Persistent>, ResetError> {
    if let Some(dir) = &opts.persistent_dir {
        if wipe {
            wipe_reporting(dir, log)?;
        }
        return Ok(Some(Persistent {
            dir: dir.clone(),
            _mounted: None,
        }));
    }
    let Some((dev, mounted_at)) = find_persistent(ctx) else {
        writeln!(
            log,
            "kairos-agent: warning: no partition labelled COS_PERSISTENT: nothing to {}",
            if wipe { "wipe" } else { "keep" }
        )
        .map_err(AgentError::Output)?;
        return Ok(None);
    };
    if let Some(dir) = mounted_at {
        if wipe {
            wipe_reporting(&dir, log)?;
        }
        return Ok(Some(Persistent {
            dir,
            _mounted: None,
        }));
    }
    if wipe {
        run_tool(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", kairos_init::labels::PERSISTENT])
                .arg(&dev),
        )?;
        writeln!(
            log,
            "kairos-agent: wiped COS_PERSISTENT: new ext4 filesystem on {}",
            dev.display()
        )
        .map_err(AgentError::Output)?;
    }
    let mp = ctx.path(PERSISTENT_MOUNT);
    std::fs::create_dir_all(&mp).at(&mp, "creating the mount point")?;
    let guard = Mounted(mp.clone());
    kairos_init::sys::mount::device(&dev, &mp, "ext4", false).map_err(|e| {
        ResetError::Io(IoError::new(
            dev.clone(),
            format!("mounting on {}", mp.display()),
            e.err,
        ))
    })?;
    Ok(Some(Persistent {
        dir: mp,
        _mounted: Some(guard),
    }))
}

fn wipe_reporting(dir: &Path, log: &mut dyn Write) -> Result<(), ResetError> {
    wipe_reporting_except(dir, &[], log)
}

fn wipe_reporting_except(
    dir: &Path,
    keep: &[PathBuf],
    log: &mut dyn Write,
) -> Result<(), ResetError> {
    let skipped = wipe_contents_except(dir, keep)?;
    writeln!(
        log,
        "kairos-agent: wiped the contents of {}{}",
        dir.display(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(
                " (left other mounts: {})",
                skipped
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    )
    .map_err(AgentError::Output)?;
    Ok(())
}

/// A hook stage: failed steps are a warning, or with `strict: true` stop the reset.
fn run_hook(
    ctx: &Ctx,
    loaded: &config::Loaded,
    stage: &str,
    log: &mut dyn Write,
) -> Result<(), ResetError> {
    stages::hook(ctx, loaded, stage, "reset", log)?;
    Ok(())
}

fn append_history(path: &Path, line: &str, log: &mut dyn Write) {
    let r = (|| -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(line.as_bytes())?;
        f.sync_all()
    })();
    let _ = match r {
        Ok(()) => writeln!(
            log,
            "kairos-agent: recorded the reset in {}",
            path.display()
        ),
        Err(e) => writeln!(
            log,
            "kairos-agent: warning: {}: {e}; the reset is not recorded",
            path.display()
        ),
    };
}

/// The running recovery's COS_RECOVERY: as given, as kairos-init mounted it (read-only is
/// enough), or found by label.
fn open_recovery(
    ctx: &Ctx,
    explicit: Option<&Path>,
    log: &mut dyn Write,
) -> Result<locate::Target, ResetError> {
    if explicit.is_none() {
        let mounts = std::fs::read_to_string(ctx.path("/proc/self/mounts")).unwrap_or_default();
        let mp = locate::Partition::Recovery.initramfs_mountpoint();
        if locate::mount_options(&mounts).iter().any(|(p, _)| p == mp) {
            return Ok(locate::open(
                ctx,
                locate::Partition::Recovery,
                Some(&ctx.path(mp)),
                log,
            )?);
        }
    }
    Ok(locate::open(
        ctx,
        locate::Partition::Recovery,
        explicit,
        log,
    )?)
}

/// The crash point named (optionally `pause:POINT`), checked against [`CRASH_POINTS`].
pub fn check_crash_point(given: &str) -> Result<(), ResetError> {
    let point = given
        .strip_prefix(crate::upgrade::PAUSE_PREFIX)
        .unwrap_or(given);
    if CRASH_POINTS.iter().any(|(n, _)| *n == point) {
        return Ok(());
    }
    Err(ResetError::CrashPoint {
        given: given.into(),
        known: CRASH_POINTS
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Aborts (or, for `pause:POINT`, stops for good, saying so) at `point` when asked to.
fn crash(opts: &Options, point: &str, log: &mut dyn Write) {
    debug_assert!(CRASH_POINTS.iter().any(|(n, _)| *n == point), "{point}");
    let env = crate::upgrade::CRASH_ENV;
    let Some(given) = opts.crash_at.as_deref() else {
        return;
    };
    if given == point {
        let _ = writeln!(log, "kairos-agent: reset: {env}={point}: aborting here");
        let _ = log.flush();
        std::process::abort();
    }
    if given.strip_prefix(crate::upgrade::PAUSE_PREFIX) == Some(point) {
        let _ = writeln!(log, "kairos-agent: reset: {env}=pause:{point}: paused here");
        let _ = log.flush();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// The boot-time reset: booted through GRUB's `statereset` entry (`kairos.reset` on the
/// command line: kairos-init's `autoreset` mode), the daemon resets the node unattended and
/// reboots, with the policy a pending reset recorded, else the cloud-config's. None on any
/// other boot.
pub fn auto_reset(
    ctx: &Ctx,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Option<Result<Outcome, ResetError>> {
    if ctx.mode() != Some("autoreset") {
        return None;
    }
    let crash_at = std::env::var(crate::upgrade::CRASH_ENV)
        .ok()
        .or_else(|| std::fs::read_to_string(ctx.path(CRASH_FILE)).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let _ = writeln!(
        log,
        "kairos-agent: booted with kairos.reset: resetting the node unattended"
    );
    let opts = Options {
        booted: Some(Booted::Recovery),
        crash_at,
        ..Options::default()
    };
    Some(reset(ctx, &opts, out, log))
}

pub fn reset(
    ctx: &Ctx,
    opts: &Options,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<Outcome, ResetError> {
    // 1. Refuse unless booted in recovery; then the source, so a missing recovery image
    // refuses before anything is written.
    check_recovery(ctx, opts)?;
    let loaded = crate::sources::load(ctx, &LoadOptions::default());
    stages::report_load(&loaded, log).map_err(AgentError::Output)?;
    let source = resolve_source(ctx, opts, &loaded.raw, log)?;
    let origin = source.origin.as_str();
    // One install, upgrade or reset at a time (lock.rs); taken after the checks above, so a
    // refused reset leaves no trace, not even the lock file.
    let _system = crate::lock::system(ctx, "reset").map_err(AgentError::from)?;

    // 2. COS_STATE mounted and locked, the reset pending in the grubenv.
    let mut p = Progress::new("reset", 4);
    p.step(&format!("opening {}", kairos_init::labels::STATE), log);
    let state = lock_state(ctx, opts, log)?;
    let (policy, grubenv_path) = mark_reset_pending(ctx, opts, &loaded, origin, out, log)?;
    crash(opts, "pending", log);

    // 3. and 4. active.img from the source, passive.img a copy, grub.cfg if missing.
    run_hook(ctx, &loaded, "before-reset", log)?;
    p.step(&format!("building active.img from {origin}"), log);
    let size = rebuild_images(ctx, opts, &loaded, &source.image, origin, state, log)?;

    // 5. COS_OEM.
    if policy.wipe_oem {
        p.add_step();
        p.step(&format!("wiping {}", kairos_init::labels::OEM), log);
        let oem = opts.oem_dir.clone().unwrap_or_else(|| ctx.path("/oem"));
        // The grubenv holds the pending mark until the very end.
        let keep = [grubenv_path.clone(), grubenv::tmp_path(&grubenv_path)];
        wipe_reporting_except(&oem, &keep, log)?;
    }

    // 6. and 7. COS_PERSISTENT and its history line.
    p.step(
        &format!(
            "{} {}, recording the reset",
            if policy.wipe_persistent {
                "wiping"
            } else {
                "keeping"
            },
            kairos_init::labels::PERSISTENT
        ),
        log,
    );
    reset_persistent(ctx, opts, policy.wipe_persistent, origin, size, log)?;
    crash(opts, "persistent-wiped", log);

    // 8. The grubenv says "boot active"; after-reset, then reboot as asked.
    p.step("setting the next boot to active.img", log);
    drop(p);
    finish(ctx, opts, &loaded, &policy, origin, out, log)
}

/// Step 1: reset runs only from recovery mode.
fn check_recovery(ctx: &Ctx, opts: &Options) -> Result<(), ResetError> {
    if let Some(c) = &opts.crash_at {
        check_crash_point(c)?;
    }
    let booted = opts.booted.or_else(|| detect_booted(ctx));
    if booted != Some(Booted::Recovery) {
        return Err(ResetError::NotRecovery {
            booted: match booted {
                Some(Booted::Active) => "active".into(),
                Some(Booted::Passive) => "passive".into(),
                _ => "unknown (no /run/cos sentinel, no COS_ label on the command line)".into(),
            },
        });
    }
    Ok(())
}

/// The image a reset rebuilds from, with what it is said to come from, and COS_RECOVERY's
/// mount when the image is on it (held until the reset is done).
struct ResetSource {
    image: ImageSource,
    origin: String,
    _recovery: Option<locate::Target>,
}

/// `reset.system.source` of the cloud-config (upstream's key for what a reset installs).
pub fn configured_source(raw: &Map<String, Value>) -> Option<String> {
    raw.get("reset")?
        .get("system")?
        .get("source")?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Step 1: `--source`, else the cloud-config's `reset.system.source`, else COS_RECOVERY's
/// recovery image.
fn resolve_source(
    ctx: &Ctx,
    opts: &Options,
    raw: &Map<String, Value>,
    log: &mut dyn Write,
) -> Result<ResetSource, ResetError> {
    let configured = configured_source(raw);
    Ok(match (&opts.source, configured) {
        (Some(given), _) => ResetSource {
            image: explicit_source(given)?,
            origin: given.trim().to_string(),
            _recovery: None,
        },
        (None, Some(given)) => ResetSource {
            image: explicit_source(&given).map_err(|e| ResetError::Configured {
                key: "reset.system.source",
                error: Box::new(e),
            })?,
            origin: given,
            _recovery: None,
        },
        (None, None) => {
            let recovery = open_recovery(ctx, opts.recovery_dir.as_deref(), log)?;
            let image = recovery_image(&recovery.dir)?;
            ResetSource {
                origin: format!("recovery:{}", image.path().display()),
                image,
                _recovery: Some(recovery),
            }
        }
    })
}

/// COS_STATE mounted read-write with its `cOS` directory locked (flock) while it is held;
/// dropped, the lock goes first, then the mount (fields drop in order).
struct LockedState {
    _lock: File,
    target: locate::Target,
    cos: PathBuf,
}

/// Step 2: COS_STATE mounted and `cOS` locked.
fn lock_state(ctx: &Ctx, opts: &Options, log: &mut dyn Write) -> Result<LockedState, ResetError> {
    let target = locate::open(
        ctx,
        locate::Partition::State,
        opts.state_dir.as_deref(),
        log,
    )?;
    let cos = target.dir.join("cOS");
    std::fs::create_dir_all(&cos).at(&cos, "creating")?;
    let lock = File::open(&cos).at(&cos, "opening")?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |e| {
            ResetError::Io(IoError::new(
                cos.clone(),
                "locking (is an upgrade or another reset running?)",
                e.into(),
            ))
        },
    )?;
    Ok(LockedState {
        target,
        cos,
        _lock: lock,
    })
}

/// Step 2: the reset marked pending before anything is touched (from here a cut boots
/// statereset, which redoes it, with the choices recorded here). Returns the policy and the
/// grubenv's path.
fn mark_reset_pending(
    ctx: &Ctx,
    opts: &Options,
    loaded: &config::Loaded,
    origin: &str,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<(Policy, PathBuf), ResetError> {
    let mut l = crate::load_env_for_update(ctx, out, log)?;
    let pending = l.env.get(PENDING_VAR).map(str::to_owned);
    let policy = Policy::resolve_pending(opts, &loaded.raw, pending.as_deref());
    writeln!(
        log,
        "kairos-agent: resetting from {origin}: COS_PERSISTENT {}, COS_OEM {}{}",
        if policy.wipe_persistent {
            "wiped"
        } else {
            "kept"
        },
        if policy.wipe_oem { "wiped" } else { "kept" },
        if pending.is_some() {
            " (redoing an interrupted reset, with its choices)"
        } else {
            ""
        }
    )
    .map_err(AgentError::Output)?;
    mark_pending(&mut l.env, &policy)?;
    grubenv::write(&l.path, &l.env)?;
    writeln!(
        log,
        "kairos-agent: reset pending in {}: every boot is statereset until it is done",
        l.path.display()
    )
    .map_err(AgentError::Output)?;
    Ok((policy, l.path.clone()))
}

/// Steps 3 and 4: active.img rebuilt from `src` through transition.img, passive.img a copy
/// of it, a missing grub.cfg regenerated; COS_STATE unlocked and released after. Returns
/// active.img's size.
fn rebuild_images(
    ctx: &Ctx,
    opts: &Options,
    loaded: &config::Loaded,
    src: &ImageSource,
    origin: &str,
    state: LockedState,
    log: &mut dyn Write,
) -> Result<u64, ResetError> {
    let cos = &state.cos;
    build_transition(ctx, src, cos, log)?;
    // after-reset-chroot, in the new image before it becomes active. Failed with strict:
    // transition.img is removed, active.img untouched, the reset still pending.
    crate::upgrade::chroot::hook::<ResetError>(
        &cos.join(TRANSITION),
        &ctx.path("/run/kairos/reset-chroot"),
        "after-reset-chroot",
        &loaded.sources,
        crate::stages::strictness(loaded).as_deref(),
        "reset",
        log,
    )?;
    crash(opts, "transition-built", log);
    rotate::execute(cos, &[rotate::Step::ReplaceActive])?;
    writeln!(log, "kairos-agent: {ACTIVE} rebuilt from {origin}").map_err(AgentError::Output)?;
    crash(opts, "active-replaced", log);
    copy_to_passive(cos)?;
    writeln!(log, "kairos-agent: {PASSIVE} is a copy of it (COS_PASSIVE)")
        .map_err(AgentError::Output)?;
    crash(opts, "passive-replaced", log);
    let size = std::fs::metadata(cos.join(ACTIVE)).map_or(0, |m| m.len());
    ensure_grub_cfg(&state.target.dir, log)?;
    Ok(size)
}

/// Step 4: grub.cfg regenerated on COS_STATE when neither grub2/ nor grub/ holds one.
fn ensure_grub_cfg(state_dir: &Path, log: &mut dyn Write) -> Result<(), ResetError> {
    if ["grub2/grub.cfg", "grub/grub.cfg"]
        .iter()
        .any(|p| state_dir.join(p).is_file())
    {
        return Ok(());
    }
    let grub2 = state_dir.join(kairos_init::grubcfg::GRUB_DIR);
    let cfg = grub2.join("grub.cfg");
    std::fs::create_dir_all(&grub2).at(&grub2, "creating")?;
    std::fs::write(
        &cfg,
        kairos_init::grubcfg::grub_cfg(&kairos_init::grubcfg::GrubCfgOptions::default()),
    )
    .at(&cfg, "writing")?;
    image::sync_file(&cfg)?;
    writeln!(log, "kairos-agent: wrote the missing {}", cfg.display())
        .map_err(AgentError::Output)?;
    Ok(())
}

/// Steps 6 and 7: COS_PERSISTENT wiped (or kept), then `.kairos-state` (there, or at
/// `--kairos-state`) gets the reset's line.
fn reset_persistent(
    ctx: &Ctx,
    opts: &Options,
    wipe: bool,
    origin: &str,
    size: u64,
    log: &mut dyn Write,
) -> Result<(), ResetError> {
    let persistent = handle_persistent(ctx, opts, wipe, log)?;
    let history = match (&opts.kairos_state, &persistent) {
        (Some(p), _) => Some(ctx.path(p)),
        (None, Some(p)) => Some(p.dir.join(".kairos-state")),
        (None, None) => None,
    };
    if let Some(h) = history {
        let line = history_line(
            &kairos_util::time::rfc3339(kairos_util::time::now_ms()),
            "reset",
            origin,
            None,
            Booted::Recovery,
            ACTIVE,
            size,
        );
        append_history(&h, &line, log);
    }
    Ok(())
}

/// Step 8: the grubenv says "boot active" (counters re-armed, next_entry and the pending
/// mark dropped); `after-reset`, sync, then reboot, power off or nothing.
fn finish(
    ctx: &Ctx,
    opts: &Options,
    loaded: &config::Loaded,
    policy: &Policy,
    origin: &str,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<Outcome, ResetError> {
    let mut l = crate::load_env_for_update(ctx, out, log)?;
    next_boot_active(&mut l.env)?;
    grubenv::write(&l.path, &l.env)?;
    writeln!(
        log,
        "kairos-agent: next boot: active ({}: counters re-armed, next_entry and the pending mark cleared)",
        l.path.display()
    ).map_err(AgentError::Output)?;
    crash(opts, "done", log);

    run_hook(ctx, loaded, "after-reset", log)?;
    rustix::fs::sync();
    let what = match policy.after {
        After::Reboot => "rebooting into active",
        After::PowerOff => "powering off",
        After::Nothing => "reboot to use it",
    };
    writeln!(out, "kairos-agent: reset done from {origin}; {what}").map_err(AgentError::Output)?;
    let _ = out.flush();
    let _ = log.flush();
    let cmd = match policy.after {
        After::Reboot => rustix::system::RebootCommand::Restart,
        After::PowerOff => rustix::system::RebootCommand::PowerOff,
        After::Nothing => return Ok(Outcome::Done),
    };
    rustix::system::reboot(cmd).map_err(|e| ResetError::Reboot {
        what: "reboot(2)",
        err: e.into(),
    })?;
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Tree;

    fn raw(yaml: &str) -> Map<String, Value> {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn flags_win_over_the_reset_block() {
        let none = Options::default();
        let p = Policy::resolve(&none, &Map::new());
        assert_eq!(
            p,
            Policy {
                wipe_persistent: true,
                wipe_oem: false,
                after: After::Reboot
            }
        );
        let cfg =
            raw("reset:\n  reset-persistent: false\n  reset-oem: \"true\"\n  poweroff: true\n");
        let p = Policy::resolve(&none, &cfg);
        assert_eq!(
            p,
            Policy {
                wipe_persistent: false,
                wipe_oem: true,
                after: After::PowerOff
            }
        );
        let flags = Options {
            keep_persistent: Some(false),
            reset_oem: Some(false),
            after: Some(After::Nothing),
            ..Options::default()
        };
        let p = Policy::resolve(&flags, &cfg);
        assert!(p.wipe_persistent && !p.wipe_oem && p.after == After::Nothing);
        let p = Policy::resolve(&none, &raw("reset:\n  reboot: false\n"));
        assert_eq!(p.after, After::Nothing);
        // Garbage values fall back to the defaults.
        let p = Policy::resolve(&none, &raw("reset:\n  reset-persistent: maybe\n"));
        assert!(p.wipe_persistent);
    }

    #[test]
    fn the_next_boot_is_active_on_fresh_tries() {
        let mut env = GrubEnv::default();
        for (k, v) in [
            ("next_entry", "recovery"),
            ("saved_entry", "recovery"),
            ("enable_boot_assessment", "yes"),
            ("kairos_tries_cos", "0"),
            ("kairos_tries_fallback", "0"),
            ("kairos_max_tries", "5"),
            ("boot_assessment_tentative", "yes"),
        ] {
            env.set(k, v).unwrap();
        }
        assert_eq!(grubenv::grub_choice(&env).entry, "recovery");
        next_boot_active(&mut env).unwrap();
        let c = grubenv::grub_choice(&env);
        assert_eq!((c.entry.as_str(), c.reason), ("cos", "counted-try"));
        assert_eq!(env.get("kairos_tries_cos"), Some("5"));
        assert_eq!(env.get("kairos_tries_fallback"), Some("5"));
        assert_eq!(env.get("saved_entry"), Some("cos"));
        assert_eq!(env.get("next_entry"), None);
        assert_eq!(env.get("boot_assessment_tentative"), None);
        // Empty block: armed with the default tries, no saved_entry invented.
        let mut env = GrubEnv::default();
        next_boot_active(&mut env).unwrap();
        assert_eq!(grubenv::grub_choice(&env).entry, "cos");
        assert_eq!(env.get("saved_entry"), None);
    }

    #[test]
    fn a_pending_reset_boots_statereset_and_keeps_its_choices() {
        let mut env = GrubEnv::default();
        for (k, v) in [
            ("next_entry", "recovery"),
            ("saved_entry", "cos"),
            ("enable_boot_assessment", "yes"),
            ("kairos_tries_cos", "2"),
            ("kairos_tries_fallback", "3"),
            ("kairos_max_tries", "4"),
        ] {
            env.set(k, v).unwrap();
        }
        let keep = Policy::resolve(
            &Options {
                keep_persistent: Some(true),
                ..Options::default()
            },
            &Map::new(),
        );
        mark_pending(&mut env, &keep).unwrap();
        let c = grubenv::grub_choice(&env);
        assert_eq!((c.entry.as_str(), c.reason), ("statereset", "saved_entry"));
        // Still statereset after GRUB booted it once (saved_entry is not one-shot).
        grubenv::grub_boot(&mut env);
        assert_eq!(grubenv::grub_choice(&env).entry, "statereset");
        let pending = env.get(PENDING_VAR).map(str::to_owned);
        assert_eq!(pending.as_deref(), Some("persistent=keep,oem=keep"));
        // The unattended re-run has no flags: the record wins over the cloud-config...
        let cfg = raw("reset:\n  reset-persistent: true\n  reset-oem: true\n");
        let p = Policy::resolve_pending(&Options::default(), &cfg, pending.as_deref());
        assert!(!p.wipe_persistent && !p.wipe_oem);
        // ...flags win over the record, and garbage in it is ignored.
        let wipe = Options {
            keep_persistent: Some(false),
            ..Options::default()
        };
        assert!(Policy::resolve_pending(&wipe, &cfg, pending.as_deref()).wipe_persistent);
        let p = Policy::resolve_pending(&Options::default(), &cfg, Some("persistent=maybe,x"));
        assert!(p.wipe_persistent && p.wipe_oem);
        // Done: active on fresh tries (the configured maximum), the mark gone.
        next_boot_active(&mut env).unwrap();
        let c = grubenv::grub_choice(&env);
        assert_eq!((c.entry.as_str(), c.reason), ("cos", "counted-try"));
        assert_eq!(env.get("kairos_tries_cos"), Some("4"));
        assert_eq!(env.get(PENDING_VAR), None);
    }

    #[test]
    fn crash_points_are_checked() {
        for (p, _) in CRASH_POINTS {
            check_crash_point(p).unwrap();
            check_crash_point(&format!("pause:{p}")).unwrap();
        }
        let e = check_crash_point("between-renames")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("KAIROS_AGENT_CRASH_AT") && e.contains("active-replaced"),
            "{e}"
        );
    }

    #[test]
    fn the_oem_wipe_keeps_the_grubenv() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::write(p.join("grubenv"), "x").unwrap();
        std::fs::write(p.join("99_user.yaml"), "x").unwrap();
        wipe_contents_except(p, &[p.join("grubenv"), p.join("grubenv.tmp")]).unwrap();
        let left: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["grubenv"]);
    }

    #[test]
    fn the_recovery_image_is_found_or_named() {
        let d = tempfile::tempdir().unwrap();
        let e = recovery_image(d.path()).unwrap_err().to_string();
        assert!(
            e.contains(&d.path().display().to_string()) && e.contains("--source dir:/"),
            "{e}"
        );
        std::fs::create_dir_all(d.path().join("cOS")).unwrap();
        std::fs::write(d.path().join("cOS/recovery.img"), "x").unwrap();
        assert_eq!(
            recovery_image(d.path()).unwrap(),
            ImageSource::ExtImage(d.path().join("cOS/recovery.img"))
        );
        std::fs::write(d.path().join("cOS/recovery.squashfs"), "x").unwrap();
        assert_eq!(
            recovery_image(d.path()).unwrap(),
            ImageSource::Squashfs(d.path().join("cOS/recovery.squashfs"))
        );
        assert!(matches!(
            explicit_source("oci:x/y:z"),
            Err(ResetError::BadSource { .. })
        ));
        assert!(matches!(
            explicit_source(&format!("dir:{}", d.path().display())),
            Ok(ImageSource::Tree(_))
        ));
        let e = explicit_source(&format!(
            "file:{}",
            d.path().join("cOS/recovery.img").display()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("expected a squashfs or an ext2/3/4 image"),
            "{e}"
        );
    }

    #[test]
    fn wiping_removes_contents_not_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("a/b/c")).unwrap();
        std::fs::write(p.join("a/b/c/f"), "x").unwrap();
        std::fs::write(p.join(".kairos-state"), "- {}\n").unwrap();
        std::os::unix::fs::symlink("/etc", p.join("link")).unwrap();
        assert!(wipe_contents(p).unwrap().is_empty());
        assert!(p.is_dir());
        assert_eq!(std::fs::read_dir(p).unwrap().count(), 0);
        assert!(
            Path::new("/etc").exists(),
            "a symlink is removed, not followed"
        );
        let e = wipe_contents(&p.join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn outside_recovery_it_refuses_before_touching_anything() {
        let t = Tree::new();
        t.cmdline("root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img");
        let state = tempfile::tempdir().unwrap();
        let opts = Options {
            state_dir: Some(state.path().to_path_buf()),
            after: Some(After::Nothing),
            ..Options::default()
        };
        let (r, out, _) = crate::testutil::run(|o, e| reset(&t.ctx, &opts, o, e));
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("booted: active") && e.contains("recovery"),
            "{e}"
        );
        assert_eq!(out, "");
        assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
        assert!(!t.ctx.grubenv_path().exists());
        // Nothing says what booted: refused too.
        let t = Tree::new();
        let (r, _, _) = crate::testutil::run(|o, e| reset(&t.ctx, &opts, o, e));
        assert!(matches!(r, Err(ResetError::NotRecovery { .. })));
    }

    #[test]
    fn reset_system_source_is_the_source_when_no_flag_names_one() {
        let t = Tree::new();
        let tree = t.ctx.path("/srv/image");
        std::fs::create_dir_all(&tree).unwrap();
        let raw = |text: &str| {
            crate::config::parse("t.yaml", text, false)
                .unwrap()
                .unwrap()
                .raw
        };
        let cfg = raw(&format!(
            "reset:\n  system:\n    source: dir:{}\n",
            tree.display()
        ));
        assert_eq!(
            configured_source(&cfg),
            Some(format!("dir:{}", tree.display()))
        );
        let opts = Options::default();
        let got = resolve_source(&t.ctx, &opts, &cfg, &mut Vec::new()).unwrap();
        assert_eq!(got.origin, format!("dir:{}", tree.display()));
        assert!(matches!(got.image, ImageSource::Tree(ref p) if *p == tree));
        // --source wins.
        let flag = Options {
            source: Some("dir:/".into()),
            ..Options::default()
        };
        let got = resolve_source(&t.ctx, &flag, &cfg, &mut Vec::new()).unwrap();
        assert_eq!(got.origin, "dir:/");
        // A bad configured source names the key.
        let bad = raw("reset:\n  system:\n    source: dir:/nonexistent-reset-source\n");
        let e = resolve_source(&t.ctx, &opts, &bad, &mut Vec::new())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("reset.system.source: /nonexistent-reset-source: not a directory"),
            "{e}"
        );
        assert_eq!(configured_source(&raw("reset:\n  reboot: true\n")), None);
    }
}
