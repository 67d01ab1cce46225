//! `kairos-agent upgrade` (SPEC §5): a new system image from a registry (`oci:`/`docker:`/a
//! bare reference), an OCI archive or layout (`ocifile:`), a directory (`dir:`) or a raw
//! filesystem image (`file:`), built completely as `COS_STATE:/cOS/transition.img`, then
//! rotated in power-cut-safe order (rotate.rs) with GRUB's boot counters armed. `--recovery`
//! rebuilds `COS_RECOVERY:/cOS/recovery.squashfs` (or `recovery.img`) instead.
//!
//! The order, and what a failure or a power cut at each point leaves:
//! 0. the system lock is taken (one install, upgrade or reset at a time, lock.rs), and what
//!    booted is decided from the file holding the running root (slots.rs): unknown, refused;
//! 1. the target partition is mounted read-write, `before-upgrade` runs;
//! 2. the source is resolved (index → manifest → config, verified, in memory) and the space
//!    checked: a refusal here has written nothing;
//! 3. the layers are downloaded, every byte hashed as it streams: a registry's are applied in
//!    order into a staging directory while they download (pipeline.rs; a layer counts, and
//!    the next one is finished, only once its digest matched), an archive's are written to a
//!    work directory first; a digest or size mismatch names the blob and the source, and
//!    what was unpacked from it is removed;
//! 4. the layers are applied in order into the staging directory (an archive's); an image without
//!    /boot/vmlinuz, /boot/initrd or an init is refused; a leftover `transition.img` is removed,
//!    or, when it is the booted image (a rotation cut between its renames), moved to
//!    passive.img; `mkfs.ext4 -d` builds `transition.img` (sized from the content, no journal,
//!    GRUB-readable features), fsynced, removed again if the build fails; the work directory is
//!    removed;
//! 5. the counters are armed (cos and fallback get their tries; a pending one-shot
//!    `next_entry` is dropped, it would boot uncounted);
//! 6. rotate: active ↔ transition (atomic exchange), the old active relabelled COS_PASSIVE,
//!    then renamed over passive.img, the directory fsynced after each rename; when active.img
//!    is not what booted (booted from passive, an upgrade without a reboot since, a boot not
//!    marked good yet), only active.img is replaced;
//! 7. `.kairos-state` gets a line, `after-upgrade` runs.
//!
//! Up to step 4 the installed images are untouched; a stale work directory from an
//! interrupted run is removed by the next one, and a `transition.img` too unless it is the
//! image that booted.
//!
//! `KAIROS_AGENT_CRASH_AT=<point>` aborts the process at one of [`CRASH_POINTS`], for the
//! power-cut tests.

pub mod chroot;
pub mod fetch;
pub mod image;
pub mod layer;
pub mod locate;
pub mod oci;
pub mod pipeline;
pub mod releases;
pub mod rotate;
pub mod slots;
pub mod source;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use kairos_init::grubenv::{self, Counters, DEFAULT_MAX_TRIES, var};

use kairos_util::IoResultExt;

use crate::config::{self, LoadOptions};
use crate::progress::Progress;
use crate::{AgentError, Ctx, Outcome, stages};
use fetch::{Puller, Store};
use rotate::{ACTIVE, Booted, Event, PASSIVE, Step, TRANSITION};
use source::Source;

/// The environment variable naming a crash point.
pub const CRASH_ENV: &str = "KAIROS_AGENT_CRASH_AT";

/// Where `KAIROS_AGENT_CRASH_AT` can abort the agent, in the order they are passed, with
/// what is on disk at that moment.
pub const CRASH_POINTS: &[(&str, &str)] = &[
    (
        "pull",
        "every blob downloaded and verified (a registry's already applied into the staging directory as it streamed, an archive's in the work directory); no image built",
    ),
    (
        "unpack",
        "the layers applied into the staging directory; transition.img not built",
    ),
    (
        "before-rename-1",
        "transition.img complete and fsynced, counters armed; active.img and passive.img as before",
    ),
    (
        "after-rename-1-before-sync",
        "the first rename done (active ↔ transition exchanged, or transition → active), the directory not fsynced",
    ),
    (
        "between-renames",
        "the exchange on disk: active.img is the new image, passive.img the previous passive, transition.img the old active (still labelled COS_ACTIVE)",
    ),
    (
        "before-rename-2",
        "as between-renames, the old active relabelled COS_PASSIVE",
    ),
    (
        "after-rename-2-before-sync",
        "the old active renamed over passive.img, the directory not fsynced",
    ),
    (
        "done",
        "the rotation on disk; .kairos-state and after-upgrade not yet done",
    ),
];

/// Extra room an upgrade needs besides the image (`.kairos-state`, directory blocks).
const SLACK: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// A hook stage failed and the config says `strict: true`.
    #[error(transparent)]
    Hook(#[from] stages::HookFailed),
    #[error("no upgrade source: pass --source or set {key} in the cloud-config")]
    NoSource { key: &'static str },
    #[error("{origin}: {} does not exist", path.display())]
    NotFound { origin: String, path: PathBuf },
    #[error("{origin}: {what}")]
    Invalid { origin: String, what: String },
    #[error(
        "{origin}: {what} {digest}: the content's sha256 is {actual}; refusing the image (the installed images are untouched)"
    )]
    DigestMismatch {
        origin: String,
        what: String,
        digest: String,
        actual: String,
    },
    #[error(
        "{origin}: {what} {digest}: {actual} bytes where the descriptor says {expected}; refusing the image (the installed images are untouched)"
    )]
    SizeMismatch {
        origin: String,
        what: String,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("{origin}: registry: {what}: {detail}")]
    Registry {
        origin: String,
        what: String,
        detail: String,
    },
    #[error("{origin}: reading {what}: {detail}")]
    Read {
        origin: String,
        what: String,
        detail: String,
    },
    #[error(transparent)]
    Io(#[from] kairos_util::IoError),
    #[error(transparent)]
    Command(#[from] kairos_util::ToolError),
    #[error("{}: {what}", path.display())]
    BadImage { path: PathBuf, what: String },
    #[error(transparent)]
    Layer(#[from] layer::LayerError),
    #[error(transparent)]
    Rotate(#[from] rotate::RotateError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// `--state-dir` / `--recovery-dir` given, but not a directory.
    #[error("{}: not a directory (expected where {label} is mounted)", dir.display())]
    NotADirectory { dir: PathBuf, label: &'static str },
    /// No target partition on the boot disk, and none mounted where kairos-init mounts it.
    #[error("no partition labelled {label} (and nothing mounted at {mountpoint}); pass {flag}")]
    NoPartition {
        label: &'static str,
        mountpoint: &'static str,
        /// The option that names a mounted one instead.
        flag: &'static str,
    },
    /// Mounting the target partition (the error names the device and the mount point).
    #[error(transparent)]
    Mount(#[from] kairos_init::sys::mount::MountError),
    #[error("{}: no cOS directory: not a {label} partition", dir.display())]
    NoCos { dir: PathBuf, label: &'static str },
    /// The cOS directory's lock is held.
    #[error("{}: {err}; is another upgrade running?", cos.display())]
    Busy { cos: PathBuf, err: std::io::Error },
    #[error("upgraded, but reboot(2) failed: {0}")]
    Reboot(std::io::Error),
    /// Reading a `file:` image's superblock (the error names the file).
    #[error(transparent)]
    Probe(#[from] kairos_init::probe::ProbeError),
    #[error("{CRASH_ENV}={given:?} is not a crash point (known: {known})")]
    CrashPoint { given: String, known: String },
    #[error(transparent)]
    Plan(#[from] slots::PlanError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(
        "{origin}: the new image has no {missing}: it could not boot; refusing it before anything is rotated (the installed images are untouched)"
    )]
    NotBootable { origin: String, missing: String },
}

impl From<kairos_init::grubenv::GrubEnvError> for UpgradeError {
    fn from(e: kairos_init::grubenv::GrubEnvError) -> Self {
        UpgradeError::Agent(e.into())
    }
}

impl From<kairos_init::grubenv::CounterError> for UpgradeError {
    fn from(e: kairos_init::grubenv::CounterError) -> Self {
        UpgradeError::Agent(e.into())
    }
}

/// `kairos-agent upgrade`'s options. Paths are literal (not under `--root`) except
/// `kairos_state`, which is a path inside the root like every other fixed path.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// oci:REF, docker:REF or a bare REF (a registry image), ocifile:PATH (an OCI archive or
    /// layout), dir:PATH, file:PATH (an ext image) [default: upgrade.system.source, or
    /// upgrade.recovery-system.source with --recovery]
    #[arg(long, value_name = "SRC")]
    pub source: Option<String>,
    /// Rebuild COS_RECOVERY:/cOS/recovery.squashfs (or recovery.img) instead
    #[arg(long)]
    pub recovery: bool,
    /// Where COS_STATE is mounted [default: /run/initramfs/cos-state remounted read-write, or
    /// the partition labelled COS_STATE mounted under /run/kairos]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where COS_RECOVERY is mounted, for --recovery [default: found like --state-dir]
    #[arg(long, value_name = "DIR")]
    pub recovery_dir: Option<PathBuf>,
    /// Where to download and unpack (a .kairos-upgrade directory is made in it) [default:
    /// /usr/local/.kairos when COS_PERSISTENT is mounted there, else the target partition]
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// The install/upgrade history to append to, under --root
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KAIROS_STATE)]
    pub kairos_state: PathBuf,
    /// What booted, when /run/cos and /proc/cmdline do not say: active, passive, recovery
    #[arg(long, value_name = "IMAGE", value_enum)]
    pub booted: Option<Booted>,
    /// `KAIROS_AGENT_CRASH_AT` (tests only, never a flag).
    #[arg(skip = std::env::var(CRASH_ENV).ok().filter(|s| !s.is_empty()))]
    pub crash_at: Option<String>,
}

pub const DEFAULT_KAIROS_STATE: &str = "/usr/local/.kairos-state";

/// `KAIROS_AGENT_CRASH_AT=pause:POINT` stops at POINT instead of aborting, saying so on
/// stderr: a test harness then cuts the power of the whole VM at exactly that step.
pub const PAUSE_PREFIX: &str = "pause:";

/// The crash point named (optionally `pause:POINT`), checked against [`CRASH_POINTS`].
pub fn check_crash_point(given: &str) -> Result<(), UpgradeError> {
    let point = given.strip_prefix(PAUSE_PREFIX).unwrap_or(given);
    if CRASH_POINTS.iter().any(|(n, _)| *n == point) {
        return Ok(());
    }
    Err(UpgradeError::CrashPoint {
        given: given.into(),
        known: CRASH_POINTS
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The crash points an upgrade passes, in order, for these renames.
pub fn points_for(steps: &[Step], recovery: bool) -> Vec<String> {
    let mut p = vec!["pull".to_string(), "unpack".to_string()];
    let renames = if recovery { 1 } else { steps.len() };
    for n in 1..=renames {
        p.push(format!("before-rename-{n}"));
        p.push(format!("after-rename-{n}-before-sync"));
        if n == 1 && renames == 2 {
            p.push("between-renames".into());
        }
    }
    p.push("done".into());
    p
}

/// What booted, from the boot-mode sentinel kairos-init writes, else from the kernel command
/// line by SPEC §2's substrings.
pub fn detect_booted(ctx: &Ctx) -> Option<Booted> {
    match ctx.mode() {
        Some("active") => return Some(Booted::Active),
        Some("passive") => return Some(Booted::Passive),
        Some("recovery" | "autoreset") => return Some(Booted::Recovery),
        _ => {}
    }
    let cmdline = std::fs::read_to_string(ctx.path("/proc/cmdline")).ok()?;
    booted_from_cmdline(&cmdline)
}

/// The slot kairos-init booted, by its own derivation of the mode (SPEC §2's markers); a live
/// system (or no marker) booted no slot.
pub fn booted_from_cmdline(cmdline: &str) -> Option<Booted> {
    use kairos_init::cmdline::BootMode;
    match kairos_init::cmdline::boot_mode(cmdline)? {
        BootMode::Active => Some(Booted::Active),
        BootMode::Passive => Some(Booted::Passive),
        BootMode::Recovery => Some(Booted::Recovery),
        BootMode::Live => None,
    }
}

fn booted_name(b: Booted) -> &'static str {
    match b {
        Booted::Active => "active",
        Booted::Passive => "passive",
        Booted::Recovery => "recovery",
    }
}

/// Peak bytes on the target filesystem and on the work filesystem: `image` for the new image,
/// `blobs` downloaded, `staging` unpacked. Blobs are deleted as their layer is applied and the
/// staging tree only after the image is built, so on one filesystem the peak is
/// staging + max(blobs, image).
pub fn space_needed(image: u64, blobs: u64, staging: u64, same_fs: bool) -> (u64, u64) {
    let work = blobs.saturating_add(staging);
    if same_fs {
        (
            staging
                .saturating_add(blobs.max(image))
                .saturating_add(SLACK),
            0,
        )
    } else {
        (image.saturating_add(SLACK), work)
    }
}

/// One line of the YAML history (a sequence of flow mappings, one per line).
pub fn history_line(
    date: &str,
    action: &str,
    origin: &str,
    digest: Option<&str>,
    booted: Booted,
    image: &str,
    size: u64,
) -> String {
    let entry = serde_json::json!({
        "date": date,
        "action": action,
        "source": origin,
        "digest": digest,
        "booted": booted_name(booted),
        "image": image,
        "size": size,
    });
    format!("- {entry}\n")
}

fn crash(opts: &Options, point: &str, log: &mut dyn Write) {
    debug_assert!(CRASH_POINTS.iter().any(|(n, _)| *n == point), "{point}");
    if opts.crash_at.as_deref() == Some(point) {
        let _ = writeln!(log, "kairos-agent: {CRASH_ENV}={point}: aborting here");
        let _ = log.flush();
        std::process::abort();
    }
    if opts
        .crash_at
        .as_deref()
        .and_then(|c| c.strip_prefix(PAUSE_PREFIX))
        == Some(point)
    {
        let _ = writeln!(log, "kairos-agent: {CRASH_ENV}=pause:{point}: paused here");
        let _ = log.flush();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

fn device_of(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| m.dev())
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn sync_dir(dir: &Path) -> Result<(), UpgradeError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .at(dir, "fsync of the directory")?;
    Ok(())
}

/// The work directory's parent when not given: COS_PERSISTENT if it is mounted at /usr/local
/// (the largest partition), else the target partition.
fn default_work_base(ctx: &Ctx, target: &Path) -> PathBuf {
    let mounts = std::fs::read_to_string(ctx.path("/proc/self/mounts")).unwrap_or_default();
    let persistent = locate::mount_options(&mounts)
        .iter()
        .any(|(p, o)| p == "/usr/local" && !locate::is_read_only(o));
    if persistent {
        ctx.path("/usr/local/.kairos")
    } else {
        target.to_path_buf()
    }
}

/// Removes a directory tree when dropped, however the operation ends (not on abort): the
/// upgrade's work directory, reset's unpacked recovery tree.
pub(crate) struct RemoveTree(pub(crate) PathBuf);

impl Drop for RemoveTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The new image's content, ready to be written.
enum Content {
    /// A tree for mkfs / mksquashfs (staging, or a bind mount of `dir:`).
    Tree(PathBuf),
    /// A filesystem image to copy (`file:`).
    File(PathBuf),
}

struct Prepared {
    content: Content,
    digest: Option<String>,
    _bind: Option<image::BindMount>,
}

fn check_space(dir: &Path, needed: u64, reclaimable: u64) -> Result<(), UpgradeError> {
    rotate::check_space(dir, needed.saturating_sub(reclaimable)).map_err(UpgradeError::from)
}

/// A hook stage: failed steps are a warning, or with `strict: true` stop the upgrade.
fn run_hook(
    ctx: &Ctx,
    loaded: &config::Loaded,
    stage: &str,
    log: &mut dyn Write,
) -> Result<(), UpgradeError> {
    stages::hook(ctx, loaded, stage, "upgrade", log)?;
    Ok(())
}

pub fn upgrade(
    ctx: &Ctx,
    opts: &Options,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<Outcome, UpgradeError> {
    if let Some(c) = &opts.crash_at {
        check_crash_point(c)?;
    }
    // 0. One install, upgrade or reset at a time: they share the work directory, the bind
    // mount and the partitions (an upgrade and an upgrade --recovery too).
    let _system = crate::lock::system(
        ctx,
        if opts.recovery {
            "upgrade --recovery"
        } else {
            "upgrade"
        },
    )?;
    let loaded = crate::sources::load(ctx, &LoadOptions::default());
    stages::report_load(&loaded, log).map_err(AgentError::Output)?;
    let given = source_given(opts, &loaded)?;
    let src = source::parse(&given)?;
    let origin = given.trim().to_string();
    let mode = opts.booted.or_else(|| detect_booted(ctx));

    // 1. The target partition, mounted read-write, its cOS directory locked.
    let mut p = Progress::new("upgrade", 5);
    p.step(
        &format!(
            "opening {}",
            if opts.recovery {
                kairos_init::labels::RECOVERY
            } else {
                kairos_init::labels::STATE
            }
        ),
        log,
    );
    let target = open_target(ctx, opts, log)?;
    let cos = target.cos.clone();
    // 0. What booted, decided before anything is written.
    let (plan, booted) = decide_slots(ctx, opts, &cos, mode, &origin, log)?;
    run_hook(ctx, &loaded, "before-upgrade", log)?;

    // 2.-4. The source resolved, the space checked, the layers downloaded and applied; the
    // new image built completely next to the ones it replaces.
    let (new_name, final_name, label) = new_image_names(opts, &cos);
    let new_path = cos.join(new_name);
    // What the space check may count as freed: the leftover transition.img, or passive.img
    // when the leftover is the booted image that replaces it.
    let reclaimable = match plan.as_ref().map(|p| p.leftover) {
        Some(slots::Leftover::FinishRotation) => file_size(&cos.join(PASSIVE)),
        _ => file_size(&new_path),
    };
    let work_base = opts
        .work_dir
        .clone()
        .unwrap_or_else(|| default_work_base(ctx, &target.dir));
    let work_path = work_base.join(".kairos-upgrade");
    let same_fs = device_of(&work_base).is_some() && device_of(&work_base) == device_of(&cos);
    let work_guard = RemoveTree(work_path.clone());
    p.step(&format!("resolving the source {origin}"), log);
    let prepared = prepare(
        &src,
        &origin,
        opts,
        &cos,
        &work_base,
        &work_path,
        same_fs,
        reclaimable,
        &mut p,
        log,
    )?;
    // An image that cannot boot is refused before anything is touched.
    check_bootable(
        &prepared.content,
        &origin,
        &work_path.with_extension("check"),
    )?;
    p.step(&format!("building {new_name}"), log);
    clear_leftover(plan.as_ref(), &cos, &new_path, log)?;
    build_new(&prepared.content, &new_path, &cos, label, log)?;
    // after-upgrade-chroot in the new image before it is rotated in (an ext image; a
    // recovery squashfs cannot be written to). Failed with strict: the new image is removed
    // and nothing rotated.
    if label.is_some() {
        chroot::hook::<UpgradeError>(
            &new_path,
            &ctx.path("/run/kairos/upgrade-chroot"),
            "after-upgrade-chroot",
            &loaded.sources,
            stages::strictness(&loaded).as_deref(),
            "upgrade",
            log,
        )?;
    } else if chroot::has_stage(&loaded.sources, "after-upgrade-chroot") {
        writeln!(
            log,
            "kairos-agent: warning: stage after-upgrade-chroot not run: the new recovery.squashfs is read-only"
        )
        .map_err(AgentError::Output)?;
    }
    let digest = prepared.digest.clone();
    drop(prepared);
    drop(work_guard);
    let size = file_size(&new_path);

    // 5. and 6. The counters armed and the images rotated (or the new recovery renamed in).
    if opts.recovery {
        p.step(&format!("renaming {new_name} to {final_name}"), log);
    } else {
        p.step("arming the boot counters, rotating the images", log);
    }
    let image_name = if opts.recovery {
        put_recovery(opts, &cos, &new_path, final_name, log)?;
        final_name.to_string()
    } else {
        let steps = plan.map(|p| p.steps).unwrap_or_default();
        rotate_system(ctx, opts, &cos, &new_path, &steps, out, log)?;
        ACTIVE.to_string()
    };
    crash(opts, "done", log);

    // 7. The history line, after-upgrade.
    p.step("recording the upgrade in .kairos-state", log);
    let line = history_line(
        &kairos_util::time::rfc3339(kairos_util::time::now_ms()),
        if opts.recovery {
            "upgrade-recovery"
        } else {
            "upgrade"
        },
        &origin,
        digest.as_deref(),
        booted,
        &image_name,
        size,
    );
    append_history(ctx, &opts.kairos_state, &line, log);
    drop(p);

    run_hook(ctx, &loaded, "after-upgrade", log)?;
    drop(target);
    let after = after_upgrade(loaded.merged.upgrade.as_ref());
    writeln!(
        out,
        "kairos-agent: upgraded {} from {origin}; {}",
        if opts.recovery {
            "recovery"
        } else {
            "the active image"
        },
        match after {
            AfterUpgrade::Nothing => "reboot to use it",
            AfterUpgrade::Reboot => "rebooting (upgrade.reboot)",
            AfterUpgrade::PowerOff => "powering off (upgrade.poweroff)",
        }
    )
    .map_err(AgentError::Output)?;
    let cmd = match after {
        AfterUpgrade::Nothing => return Ok(Outcome::Done),
        AfterUpgrade::Reboot => rustix::system::RebootCommand::Restart,
        AfterUpgrade::PowerOff => rustix::system::RebootCommand::PowerOff,
    };
    let _ = out.flush();
    let _ = log.flush();
    rustix::fs::sync();
    // Only the real system reboots: a run under another root (tests, --root) says so.
    if ctx.root != Path::new("/") {
        writeln!(
            log,
            "kairos-agent: not rebooting: the root is {}, not /",
            ctx.root.display()
        )
        .map_err(AgentError::Output)?;
        return Ok(Outcome::Done);
    }
    rustix::system::reboot(cmd).map_err(|e| UpgradeError::Reboot(e.into()))?;
    Ok(Outcome::Done)
}

/// What follows a successful upgrade, as upstream: `upgrade.poweroff` wins over
/// `upgrade.reboot`; neither: nothing (the next reboot uses the new image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterUpgrade {
    Nothing,
    Reboot,
    PowerOff,
}

pub fn after_upgrade(u: Option<&config::Upgrade>) -> AfterUpgrade {
    match u {
        Some(u) if u.poweroff => AfterUpgrade::PowerOff,
        Some(u) if u.reboot => AfterUpgrade::Reboot,
        _ => AfterUpgrade::Nothing,
    }
}

/// `--source`, else the cloud-config's `upgrade.system.source` (or
/// `upgrade.recovery-system.source` with `--recovery`).
fn source_given(opts: &Options, loaded: &config::Loaded) -> Result<String, UpgradeError> {
    let (key, configured) = match &loaded.merged.upgrade {
        Some(u) if opts.recovery => (
            "upgrade.recovery-system.source",
            u.recovery_system.as_ref().and_then(|s| s.source.clone()),
        ),
        Some(u) => (
            "upgrade.system.source",
            u.system.as_ref().and_then(|s| s.source.clone()),
        ),
        None if opts.recovery => ("upgrade.recovery-system.source", None),
        None => ("upgrade.system.source", None),
    };
    opts.source
        .clone()
        .or(configured)
        .ok_or(UpgradeError::NoSource { key })
}

/// The partition an upgrade writes to, mounted, with its `cOS` directory locked while held.
/// Dropped in field order: the mount's undo first, then the lock, as upgrade() always did
/// (an unmount then meets the lock's open directory: EBUSY, ignored).
struct OpenTarget {
    target: locate::Target,
    _lock: File,
    cos: PathBuf,
}

impl std::ops::Deref for OpenTarget {
    type Target = locate::Target;
    fn deref(&self) -> &locate::Target {
        &self.target
    }
}

/// Step 1: COS_STATE (COS_RECOVERY with `--recovery`) mounted read-write; one upgrade at a
/// time: an exclusive lock on the cOS directory itself (nothing written).
fn open_target(ctx: &Ctx, opts: &Options, log: &mut dyn Write) -> Result<OpenTarget, UpgradeError> {
    let (which, explicit) = if opts.recovery {
        (locate::Partition::Recovery, opts.recovery_dir.as_deref())
    } else {
        (locate::Partition::State, opts.state_dir.as_deref())
    };
    let target = locate::open(ctx, which, explicit, log)?;
    let cos = target.dir.join("cOS");
    if !cos.is_dir() {
        return Err(UpgradeError::NoCos {
            dir: target.dir.clone(),
            label: which.label(),
        });
    }
    let lock = File::open(&cos).at(&cos, "opening")?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |e| UpgradeError::Busy {
            cos: cos.clone(),
            err: e.into(),
        },
    )?;
    Ok(OpenTarget {
        target,
        _lock: lock,
        cos,
    })
}

/// Step 0: which file holds the running system decides what is kept (slots.rs); decided
/// before anything is written. A recovery upgrade touches none of them (no plan). Says what
/// is upgraded and why.
fn decide_slots(
    ctx: &Ctx,
    opts: &Options,
    cos: &Path,
    mode: Option<Booted>,
    origin: &str,
    log: &mut dyn Write,
) -> Result<(Option<slots::Plan>, Booted), UpgradeError> {
    let plan = if opts.recovery {
        None
    } else {
        let boot = slots::Boot {
            mode,
            root_uuid: slots::running_root_uuid(ctx),
            tentative: grubenv::read(&ctx.grubenv_path())
                .ok()
                .and_then(|env| Counters::from_env(&env).ok())
                .is_some_and(|c| c.armed && c.tentative),
        };
        Some(slots::decide(&slots::Files::read(cos), &boot)?)
    };
    let booted = match (&plan, mode) {
        (Some(p), _) => p.booted,
        (None, Some(m)) => m,
        (None, None) => {
            writeln!(
                log,
                "kairos-agent: cannot tell what booted (no /run/cos sentinel, no COS_ label on the command line); a recovery upgrade does not depend on it: recorded as active"
            ).map_err(AgentError::Output)?;
            Booted::Active
        }
    };
    writeln!(
        log,
        "kairos-agent: upgrading {} from {origin} (booted: {})",
        if opts.recovery {
            "recovery"
        } else {
            "the system"
        },
        booted_name(booted)
    )
    .map_err(AgentError::Output)?;
    if let Some(p) = &plan {
        writeln!(log, "kairos-agent: {}", p.why).map_err(AgentError::Output)?;
    }
    Ok((plan, booted))
}

/// (the new image's name while built, its final name, its ext4 label or None for a
/// squashfs). A transition image or new recovery left by an interrupted upgrade is never
/// booted.
fn new_image_names(
    opts: &Options,
    cos: &Path,
) -> (&'static str, &'static str, Option<&'static str>) {
    if opts.recovery {
        if cos.join("recovery.img").exists() && !cos.join("recovery.squashfs").exists() {
            ("recovery.img.new", "recovery.img", Some("COS_SYSTEM"))
        } else {
            ("recovery.squashfs.new", "recovery.squashfs", None)
        }
    } else {
        (TRANSITION, ACTIVE, Some("COS_ACTIVE"))
    }
}

/// Step 4: a leftover transition.img removed, or moved to passive.img when it is the image
/// that booted (the booted image is never deleted, slots.rs).
fn clear_leftover(
    plan: Option<&slots::Plan>,
    cos: &Path,
    new_path: &Path,
    log: &mut dyn Write,
) -> Result<(), UpgradeError> {
    match plan.map(|p| p.leftover) {
        Some(slots::Leftover::FinishRotation) => {
            image::relabel(new_path, "COS_PASSIVE")?;
            rotate::execute(cos, &[Step::OldActiveToPassive])?;
            writeln!(
                log,
                "kairos-agent: finished the interrupted rotation: {TRANSITION} (the image that booted) is now {PASSIVE}"
            ).map_err(AgentError::Output)?;
        }
        _ if new_path.exists() => {
            std::fs::remove_file(new_path).at(new_path, "removing the stale")?;
            sync_dir(cos)?;
            writeln!(
                log,
                "kairos-agent: removed {} left by an interrupted upgrade (never booted)",
                new_path.display()
            )
            .map_err(AgentError::Output)?;
        }
        _ => {}
    }
    Ok(())
}

/// Step 4: the new image built completely, next to the ones it replaces; a failed build
/// leaves nothing behind.
fn build_new(
    content: &Content,
    new_path: &Path,
    cos: &Path,
    label: Option<&str>,
    log: &mut dyn Write,
) -> Result<(), UpgradeError> {
    let built = build(content, new_path, cos, label, log);
    if built.is_err() {
        let _ = std::fs::remove_file(new_path);
        return built;
    }
    writeln!(log, "kairos-agent: built {}, fsynced", new_path.display())
        .map_err(AgentError::Output)?;
    Ok(())
}

/// Step 6 of `--recovery`: the new recovery image renamed over the old one.
fn put_recovery(
    opts: &Options,
    cos: &Path,
    new_path: &Path,
    final_name: &str,
    log: &mut dyn Write,
) -> Result<(), UpgradeError> {
    let final_path = cos.join(final_name);
    crash(opts, "before-rename-1", log);
    std::fs::rename(new_path, &final_path).at(&final_path, "renaming the new image to")?;
    crash(opts, "after-rename-1-before-sync", log);
    sync_dir(cos)
}

/// Steps 5 and 6: the counters armed, then `steps` rotated (rotate.rs), the crash points
/// between the renames. The old active must be an ext image to be relabelled COS_PASSIVE:
/// else nothing is rotated and the new image removed.
fn rotate_system(
    ctx: &Ctx,
    opts: &Options,
    cos: &Path,
    new_path: &Path,
    steps: &[Step],
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<(), UpgradeError> {
    if steps.contains(&Step::OldActiveToPassive) {
        let a = cos.join(ACTIVE);
        let fs = kairos_init::probe::probe_path(&a).ok().flatten();
        if !fs.as_ref().is_some_and(|f| {
            matches!(
                f.fstype,
                kairos_init::probe::FsType::Ext2
                    | kairos_init::probe::FsType::Ext3
                    | kairos_init::probe::FsType::Ext4
            )
        }) {
            let _ = std::fs::remove_file(new_path);
            return Err(UpgradeError::BadImage {
                path: a,
                what: "not an ext2/3/4 image: it cannot be relabelled COS_PASSIVE; nothing was rotated".into(),
            });
        }
    }
    arm(ctx, out, log)?;
    let two = steps.len() == 2;
    rotate::execute_with(cos, steps, &mut |e| -> Result<(), UpgradeError> {
        match e {
            Event::BeforeRename(n) => crash(opts, &format!("before-rename-{n}"), log),
            Event::AfterRenameBeforeSync(n) => {
                crash(opts, &format!("after-rename-{n}-before-sync"), log)
            }
            Event::Synced(1) if two => {
                crash(opts, "between-renames", log);
                image::relabel(&cos.join(TRANSITION), "COS_PASSIVE")?;
            }
            Event::Synced(_) => {}
        }
        Ok(())
    })?;
    let what = match steps {
        [Step::ReplaceActive] => {
            format!("{ACTIVE} replaced; {PASSIVE} (what booted, or missing) untouched")
        }
        _ => format!("the old {ACTIVE} is now {PASSIVE} (COS_PASSIVE)"),
    };
    writeln!(log, "kairos-agent: rotated: {what}").map_err(AgentError::Output)?;
    Ok(())
}

/// Step 4: the new image, complete and fsynced, at `new_path` (ext4 labelled `label`, or a
/// squashfs when `label` is None).
fn build(
    content: &Content,
    new_path: &Path,
    cos: &Path,
    label: Option<&str>,
    log: &mut dyn Write,
) -> Result<(), UpgradeError> {
    match content {
        Content::Tree(tree) => {
            let m = image::measure(tree)?;
            if label.is_some() {
                let size = image::image_size(m);
                check_space(cos, size + SLACK, 0)?;
                writeln!(
                    log,
                    "kairos-agent: building {} ({} MiB for {} MiB in {} inodes)",
                    new_path.display(),
                    size >> 20,
                    m.bytes >> 20,
                    m.inodes
                )
                .map_err(AgentError::Output)?;
                image::mkfs_ext4(
                    tree,
                    new_path,
                    size,
                    image::inode_count(m),
                    label.unwrap_or("COS_ACTIVE"),
                )?;
            } else {
                check_space(cos, m.bytes + SLACK, 0)?;
                writeln!(log, "kairos-agent: building {}", new_path.display())
                    .map_err(AgentError::Output)?;
                image::mksquashfs(tree, new_path)?;
            }
        }
        Content::File(f) => {
            writeln!(
                log,
                "kairos-agent: copying {} to {}",
                f.display(),
                new_path.display()
            )
            .map_err(AgentError::Output)?;
            std::fs::copy(f, new_path).at(new_path, "copying the image to")?;
            if let Some(l) = label {
                image::relabel(new_path, l)?;
            }
            image::sync_file(new_path)?;
        }
    }
    Ok(())
}

/// Refuses an image without a kernel, an initramfs or an init: GRUB and kairos-init would
/// fail on it after the rotation. A `file:` image is looked into through a read-only mount.
fn check_bootable(content: &Content, origin: &str, mount_point: &Path) -> Result<(), UpgradeError> {
    let missing = match content {
        Content::Tree(t) => image::missing_boot_files(t),
        Content::File(f) => {
            let m = image::MountedImage::new(f, mount_point)?;
            image::missing_boot_files(&m.target)
        }
    };
    if missing.is_empty() {
        return Ok(());
    }
    Err(UpgradeError::NotBootable {
        origin: origin.into(),
        missing: missing.join(", "),
    })
}

/// Steps 1–3 for each kind of source: resolve, check the space, fetch (verified), unpack.
#[allow(clippy::too_many_arguments)]
fn prepare(
    src: &Source,
    origin: &str,
    opts: &Options,
    cos: &Path,
    work_base: &Path,
    work: &Path,
    same_fs: bool,
    reclaimable: u64,
    p: &mut Progress,
    log: &mut dyn Write,
) -> Result<Prepared, UpgradeError> {
    let mut puller = match src {
        Source::Oci(r) => Puller::Registry(Box::new(fetch::Registry::new(r, origin)?)),
        Source::OciFile(p) if p.is_dir() => Puller::Layout(fetch::Layout::new(p, origin)),
        Source::OciFile(p) => {
            if !p.exists() {
                return Err(UpgradeError::NotFound {
                    origin: origin.into(),
                    path: p.clone(),
                });
            }
            Puller::Archive(fetch::Archive::new(p, origin))
        }
        Source::Dir(p) => return prepare_dir(p, origin, opts, cos, work, reclaimable, log),
        Source::File(p) => return prepare_file(p, origin, opts, cos, reclaimable, log),
    };
    let resolved = puller.resolve()?;
    let compressed = resolved.compressed_bytes();
    writeln!(
        log,
        "kairos-agent: {origin}: manifest {} ({}), {} layer(s), {compressed} bytes compressed",
        resolved.manifest_digest,
        resolved.platform,
        resolved.layers.len()
    )
    .map_err(AgentError::Output)?;
    p.add_step();
    p.step(
        &format!("pulling and unpacking {} layer(s)", resolved.layers.len()),
        log,
    );
    let estimate = oci::estimate_unpacked(compressed);
    // A registry's layers are unpacked as they stream: no blob lands on disk.
    let blobs = if puller.copies_layers() && !puller.streams_layers() {
        compressed
    } else {
        0
    };
    let (on_target, on_work) = space_needed(estimate, blobs, estimate, same_fs);
    check_space(cos, on_target, reclaimable)?;
    if on_work > 0 {
        std::fs::create_dir_all(work_base).at(work_base, "creating")?;
        check_space(work_base, on_work, 0)?;
    }
    // Only now is anything written: the work directory (a stale one is from a crash).
    if work.exists() {
        std::fs::remove_dir_all(work).at(work, "removing the stale work directory")?;
    }
    let staging = work.join("rootfs");
    let applied = match puller.unpack_streamed(&resolved, &staging, log) {
        Some(done) => {
            let done = done?;
            crash(opts, "pull", log);
            done
        }
        None => {
            let store = Store::new(&work.join("blobs"))?;
            let layers = puller.fetch_layers(&resolved, &store, log)?;
            crash(opts, "pull", log);
            std::fs::create_dir_all(&staging).at(&staging, "creating")?;
            let mut applied = Vec::new();
            for (blob, path) in resolved.layers.iter().zip(&layers) {
                let f = File::open(path).at(path, "opening")?;
                applied.push(layer::apply(&staging, &blob.digest, f)?);
                if puller.copies_layers() {
                    std::fs::remove_file(path).at(path, "removing")?;
                }
            }
            applied
        }
    };
    for (i, (blob, done)) in resolved.layers.iter().zip(&applied).enumerate() {
        writeln!(
            log,
            "kairos-agent: applied layer {}/{} {}: {} entries, {} whiteouts, {} xattrs{}",
            i + 1,
            applied.len(),
            blob.digest,
            done.entries,
            done.whiteouts,
            done.xattrs,
            if done.xattrs_refused > 0 {
                format!(
                    " ({} refused by the staging filesystem)",
                    done.xattrs_refused
                )
            } else {
                String::new()
            }
        )
        .map_err(AgentError::Output)?;
    }
    crash(opts, "unpack", log);
    Ok(Prepared {
        content: Content::Tree(staging),
        digest: Some(resolved.manifest_digest),
        _bind: None,
    })
}

/// `dir:PATH`: the directory's own filesystem (a non-recursive bind mount, so `dir:/` leaves
/// out /proc, /sys, /dev, /run and anything else mounted), read directly by mkfs.
fn prepare_dir(
    p: &Path,
    origin: &str,
    opts: &Options,
    cos: &Path,
    work: &Path,
    reclaimable: u64,
    log: &mut dyn Write,
) -> Result<Prepared, UpgradeError> {
    if !p.is_dir() {
        return Err(UpgradeError::NotFound {
            origin: origin.into(),
            path: p.to_path_buf(),
        });
    }
    let m = image::measure(p)?;
    check_space(cos, image::image_size(m) + SLACK, reclaimable)?;
    if work.exists() {
        std::fs::remove_dir_all(work).at(work, "removing the stale work directory")?;
    }
    // The mount point is beside the work directory, never inside it: the work directory is
    // removed recursively, and a bind mount left behind would take the source with it.
    let mount_point = work.with_extension("source");
    let bind = image::BindMount::or_warn(p, &mount_point, log);
    crash(opts, "pull", log);
    crash(opts, "unpack", log);
    let tree = bind
        .as_ref()
        .map_or_else(|| p.to_path_buf(), |b| b.target.clone());
    Ok(Prepared {
        content: Content::Tree(tree),
        digest: None,
        _bind: bind,
    })
}

/// `file:PATH`: a filesystem image copied as it is (ext2/3/4 for the system; squashfs or ext
/// for recovery).
fn prepare_file(
    p: &Path,
    origin: &str,
    opts: &Options,
    cos: &Path,
    reclaimable: u64,
    log: &mut dyn Write,
) -> Result<Prepared, UpgradeError> {
    use kairos_init::probe::FsType;
    if !p.is_file() {
        return Err(UpgradeError::NotFound {
            origin: origin.into(),
            path: p.to_path_buf(),
        });
    }
    let fs = kairos_init::probe::probe_path(p)?.map(|f| f.fstype);
    let ext = matches!(fs, Some(FsType::Ext2 | FsType::Ext3 | FsType::Ext4));
    let squash = fs == Some(FsType::Squashfs);
    let recovery_img = opts.recovery
        && cos.join("recovery.img").exists()
        && !cos.join("recovery.squashfs").exists();
    let ok = if !opts.recovery || recovery_img {
        ext
    } else {
        squash
    };
    if !ok {
        return Err(UpgradeError::Invalid {
            origin: origin.into(),
            what: format!(
                "holds {}, expected {}",
                fs.map_or("no known filesystem", |f| f.name()),
                if opts.recovery && !recovery_img {
                    "a squashfs (recovery.squashfs)"
                } else {
                    "an ext2/3/4 filesystem image"
                }
            ),
        });
    }
    check_space(cos, file_size(p) + SLACK, reclaimable)?;
    crash(opts, "pull", log);
    crash(opts, "unpack", log);
    Ok(Prepared {
        content: Content::File(p.to_path_buf()),
        digest: None,
        _bind: None,
    })
}

/// Step 4: cos and fallback get their tries (`kairos_max_tries`, else 3); a one-shot
/// `next_entry` would boot uncounted first, so it goes.
fn arm(ctx: &Ctx, out: &mut dyn Write, log: &mut dyn Write) -> Result<(), UpgradeError> {
    let mut l = crate::load_env_for_update(ctx, out, log)?;
    let n = Counters::from_env(&l.env).map_or(DEFAULT_MAX_TRIES, |c| c.max);
    grubenv::arm(&mut l.env, n)?;
    if let Some(next) = l.env.get(var::NEXT_ENTRY).map(str::to_owned) {
        l.env.unset(var::NEXT_ENTRY);
        writeln!(
            log,
            "kairos-agent: dropped next_entry={next}: the new image boots on counted tries"
        )
        .map_err(AgentError::Output)?;
    }
    grubenv::write(&l.path, &l.env)?;
    writeln!(
        log,
        "kairos-agent: boot assessment armed in {}: cos and fallback get {n} tries each",
        l.path.display()
    )
    .map_err(AgentError::Output)?;
    Ok(())
}

/// Step 6: one line appended to `.kairos-state` and fsynced. The upgrade is done by now: a
/// history that cannot be written is a warning.
fn append_history(ctx: &Ctx, file: &Path, line: &str, log: &mut dyn Write) {
    let path = ctx.path(file);
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        f.write_all(line.as_bytes())?;
        f.sync_all()
    })();
    let _ = match r {
        Ok(()) => writeln!(
            log,
            "kairos-agent: recorded the upgrade in {}",
            path.display()
        ),
        Err(e) => writeln!(
            log,
            "kairos-agent: warning: {}: {e}; the upgrade is not recorded",
            path.display()
        ),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_points_are_known_and_ordered() {
        let two = rotate::plan(Booted::Active, true);
        let p = points_for(&two, false);
        assert_eq!(
            p,
            [
                "pull",
                "unpack",
                "before-rename-1",
                "after-rename-1-before-sync",
                "between-renames",
                "before-rename-2",
                "after-rename-2-before-sync",
                "done"
            ]
        );
        // Every point an upgrade can pass is documented, and the list has nothing else.
        let names: Vec<&str> = CRASH_POINTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(p, names);
        for steps in [
            rotate::plan(Booted::Passive, true),
            rotate::plan(Booted::Active, false),
        ] {
            for point in points_for(&steps, false) {
                check_crash_point(&point).unwrap();
            }
        }
        assert_eq!(
            points_for(&two, true),
            [
                "pull",
                "unpack",
                "before-rename-1",
                "after-rename-1-before-sync",
                "done"
            ]
        );
        check_crash_point("pause:between-renames").unwrap();
        assert!(check_crash_point("pause:between").is_err());
        let e = check_crash_point("between").unwrap_err().to_string();
        assert!(
            e.contains("KAIROS_AGENT_CRASH_AT=\"between\"") && e.contains("between-renames"),
            "{e}"
        );
    }

    #[test]
    fn upgrade_sources_and_what_follows_come_from_the_upgrade_block() {
        let loaded = |yaml: &str| {
            let src = config::parse("t.yaml", yaml, false).unwrap().unwrap();
            config::Loaded {
                merged: src.config.clone(),
                ..config::Loaded::default()
            }
        };
        let l = loaded(
            "upgrade:\n  system:\n    source: oci:reg/os:v2\n  recovery-system:\n    source: oci:reg/recovery:v2\n  reboot: true\n",
        );
        let opts = Options::default();
        assert_eq!(source_given(&opts, &l).unwrap(), "oci:reg/os:v2");
        let rec = Options {
            recovery: true,
            ..Options::default()
        };
        assert_eq!(source_given(&rec, &l).unwrap(), "oci:reg/recovery:v2");
        let flag = Options {
            source: Some("dir:/new".into()),
            ..Options::default()
        };
        assert_eq!(source_given(&flag, &l).unwrap(), "dir:/new");
        assert_eq!(
            after_upgrade(l.merged.upgrade.as_ref()),
            AfterUpgrade::Reboot
        );
        let l = loaded("upgrade:\n  reboot: true\n  poweroff: true\n");
        assert_eq!(
            after_upgrade(l.merged.upgrade.as_ref()),
            AfterUpgrade::PowerOff
        );
        assert!(
            source_given(&rec, &l)
                .unwrap_err()
                .to_string()
                .contains("upgrade.recovery-system.source")
        );
        assert_eq!(after_upgrade(None), AfterUpgrade::Nothing);
    }

    #[test]
    fn booted_from_the_command_line() {
        let b = |c| booted_from_cmdline(c);
        assert_eq!(
            b("root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img"),
            Some(Booted::Active)
        );
        assert_eq!(b("root=LABEL=COS_PASSIVE"), Some(Booted::Passive));
        assert_eq!(
            b("root=live:LABEL=COS_RECOVERY rd.live.dir=/"),
            Some(Booted::Recovery)
        );
        assert_eq!(
            b("root=LABEL=COS_SYSTEM kairos.reset"),
            Some(Booted::Recovery)
        );
        assert_eq!(b("root=/dev/sda1 quiet"), None);
        let t = crate::testutil::Tree::new();
        t.cmdline("root=LABEL=COS_ACTIVE");
        assert_eq!(detect_booted(&t.ctx), Some(Booted::Active));
        t.file("/run/cos/passive_mode", "");
        assert_eq!(detect_booted(&t.ctx), Some(Booted::Passive));
    }

    #[test]
    fn space_on_one_or_two_filesystems() {
        // Apart: the target holds the image, the work directory blobs + staging.
        assert_eq!(space_needed(100, 40, 90, false), (100 + SLACK, 130));
        // Together: staging stays while either the blobs or the image exist.
        assert_eq!(space_needed(100, 40, 90, true), (190 + SLACK, 0));
        assert_eq!(space_needed(10, 40, 90, true), (130 + SLACK, 0));
        assert_eq!(space_needed(u64::MAX, 1, 1, true).0, u64::MAX);
    }

    #[test]
    fn the_history_is_a_yaml_sequence() {
        let mut text = String::new();
        for (i, origin) in ["oci:127.0.0.1:5000/os:v2", "dir:/weird \"path\"\n"]
            .iter()
            .enumerate()
        {
            text.push_str(&history_line(
                "2026-12-02T15:00:00.000Z",
                "upgrade",
                origin,
                (i == 0).then_some("sha256:abc"),
                Booted::Passive,
                "active.img",
                42,
            ));
        }
        assert_eq!(text.lines().count(), 2);
        let v: Vec<serde_json::Value> = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(v[0]["source"], "oci:127.0.0.1:5000/os:v2");
        assert_eq!(v[0]["digest"], "sha256:abc");
        assert_eq!(v[0]["booted"], "passive");
        assert_eq!(v[1]["source"], "dir:/weird \"path\"\n");
        assert_eq!(v[1]["digest"], serde_json::Value::Null);
        assert_eq!(v[1]["size"], 42);
    }
}
