//! Deciding the boot: pure functions from (command line, what was probed, layout) to actions.
//!
//! Two steps, because the layout lives inside the image: `select` picks the image from the
//! fallback chain and an inventory of what exists; `plan_system` turns the chosen image's layout
//! into the mounts that make a writable, persistent system on top of a read-only root.

use std::collections::BTreeMap;

use crate::blockdev::{self, BlockDev};
use crate::cmdline::{BootMode, BootRequest};
use crate::labels;
use crate::layout::{self, Layout};
use crate::probe::FsType;
use crate::syntax::Overlay;
pub use crate::syntax::PathKind;

pub const SYSROOT: &str = "/sysroot";
pub const OVERLAY_DIR: &str = "/run/overlay";

/// One image the boot may use: which partition holds it and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub mode: BootMode,
    /// Device spec of the partition holding the image, e.g. `LABEL=COS_STATE`.
    pub source: String,
    /// Absolute path of the image file on that partition.
    pub image: String,
}

impl Candidate {
    fn new(mode: BootMode, label: &str, image: &str) -> Self {
        Candidate {
            mode,
            source: format!("LABEL={label}"),
            image: image.to_string(),
        }
    }

    /// Where the partition holding the image is mounted (read-only) in the initramfs.
    pub fn source_mountpoint(&self) -> &'static str {
        source_mountpoint(&self.source)
    }
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} image {} on {}",
            mode_name(self.mode),
            self.image,
            self.source
        )
    }
}

pub fn source_mountpoint(source: &str) -> &'static str {
    match source.strip_prefix("LABEL=") {
        Some(labels::STATE) => "/run/initramfs/cos-state",
        Some(labels::RECOVERY) => "/run/initramfs/cos-recovery",
        _ => "/run/initramfs/live",
    }
}

pub fn mode_name(mode: BootMode) -> &'static str {
    match mode {
        BootMode::Active => "active",
        BootMode::Passive => "passive",
        BootMode::Recovery => "recovery",
        BootMode::Live => "live",
    }
}

/// The recovery images, squashfs first (what Kairos installs by default).
fn recovery_chain() -> [Candidate; 2] {
    [
        Candidate::new(
            BootMode::Recovery,
            labels::RECOVERY,
            labels::RECOVERY_SQUASHFS,
        ),
        Candidate::new(BootMode::Recovery, labels::RECOVERY, labels::RECOVERY_IMG),
    ]
}

/// The fallback chain for a request: active -> passive -> recovery. Passive never falls back to
/// active: GRUB picks passive precisely because active failed.
pub fn candidates(req: &BootRequest) -> Vec<Candidate> {
    let mut out = Vec::new();
    match req.mode {
        BootMode::Active | BootMode::Passive => {
            let asked = req.image.clone().unwrap_or_else(|| {
                if req.mode == BootMode::Active {
                    labels::ACTIVE_IMG
                } else {
                    labels::PASSIVE_IMG
                }
                .to_string()
            });
            out.push(Candidate {
                mode: req.mode,
                source: format!("LABEL={}", labels::STATE),
                image: asked,
            });
            if req.mode == BootMode::Active {
                out.push(Candidate::new(
                    BootMode::Passive,
                    labels::STATE,
                    labels::PASSIVE_IMG,
                ));
            }
            out.extend(recovery_chain());
        }
        BootMode::Recovery => {
            // The command line names one recovery form; try it first, then the other.
            if let Some(live) = &req.live {
                out.push(Candidate {
                    mode: BootMode::Recovery,
                    source: live.device.clone(),
                    image: join_abs(&live.dir, &live.squashimg),
                });
            } else if let Some(img) = &req.image {
                out.push(Candidate::new(BootMode::Recovery, labels::RECOVERY, img));
            }
            out.extend(recovery_chain());
        }
        BootMode::Live => {
            if let Some(live) = &req.live {
                let device = match live.device.strip_prefix("CDLABEL=") {
                    Some(l) => format!("LABEL={l}"),
                    None => live.device.clone(),
                };
                out.push(Candidate {
                    mode: BootMode::Live,
                    source: device,
                    image: join_abs(&live.dir, &live.squashimg),
                });
            }
            out.extend(recovery_chain());
        }
    }
    let mut seen = Vec::new();
    out.retain(|c| {
        let key = (c.source.clone(), c.image.clone());
        if seen.contains(&key) {
            false
        } else {
            seen.push(key);
            true
        }
    });
    out
}

fn join_abs(dir: &str, file: &str) -> String {
    if file.starts_with('/') {
        return file.to_string();
    }
    let dir = dir.trim_end_matches('/');
    if dir.is_empty() {
        format!("/{file}")
    } else if dir.starts_with('/') {
        format!("{dir}/{file}")
    } else {
        format!("/{dir}/{file}")
    }
}

/// What the executor found for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageStatus {
    /// The partition holding it was not found (or could not be mounted: the reason).
    NoSource(String),
    Missing,
    /// The file exists but carries no filesystem we know (zeros, garbage, truncated header).
    Unrecognized,
    Fs(FsType),
    /// Mounting it (or checking it once mounted) failed: the reason.
    Failed(String),
}

impl ImageStatus {
    /// Whether a disk probed late could change this: the partition or the file was not there.
    pub fn may_be_late(&self) -> bool {
        matches!(self, ImageStatus::NoSource(_) | ImageStatus::Missing)
    }
}

/// Everything known about the candidates: keyed by (source, image).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub images: BTreeMap<(String, String), ImageStatus>,
}

impl Inventory {
    pub fn set(&mut self, c: &Candidate, status: ImageStatus) {
        self.images
            .insert((c.source.clone(), c.image.clone()), status);
    }
    pub fn get(&self, c: &Candidate) -> Option<&ImageStatus> {
        self.images.get(&(c.source.clone(), c.image.clone()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub chosen: Option<(Candidate, FsType)>,
    /// Candidates passed over before the chosen one, with the reason, in chain order.
    pub skipped: Vec<(Candidate, String)>,
}

/// Pick the first candidate in the chain whose image is present with a known filesystem.
pub fn select(cands: &[Candidate], inv: &Inventory) -> Selection {
    let mut skipped = Vec::new();
    for c in cands {
        let reason = match inv.get(c) {
            Some(ImageStatus::Fs(fs)) => {
                return Selection {
                    chosen: Some((c.clone(), *fs)),
                    skipped,
                };
            }
            None => "not probed".to_string(),
            Some(ImageStatus::NoSource(why)) => why.clone(),
            Some(ImageStatus::Missing) => format!("{} does not exist", c.image),
            Some(ImageStatus::Unrecognized) => {
                format!("{} holds no known filesystem (corrupt or zeroed?)", c.image)
            }
            Some(ImageStatus::Failed(why)) => why.clone(),
        };
        skipped.push((c.clone(), reason));
    }
    Selection {
        chosen: None,
        skipped,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Mkdir {
        path: String,
    },
    Tmpfs {
        target: String,
        size: String,
    },
    /// Mount a block device found by probing.
    Device {
        device: String,
        target: String,
        fstype: String,
        readonly: bool,
    },
    Overlay {
        lower: String,
        upper: String,
        work: String,
        target: String,
    },
    Bind {
        source: String,
        target: String,
    },
    /// Copy what the image has under `from` into `to`, never overwriting what `to` already has.
    SyncMissing {
        from: String,
        to: String,
    },
    WriteFile {
        path: String,
        contents: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    /// A required step failing fails the boot of this image; an optional one is a warning.
    pub required: bool,
    /// Steps skipped when this named earlier step failed (e.g. the bind after its mkdir).
    pub after: Option<usize>,
}

pub struct SystemInputs<'a> {
    pub req: &'a BootRequest,
    pub mode: BootMode,
    pub layout: &'a Layout,
    pub devices: &'a [BlockDev],
    /// lstat of a path inside the image, given without the /sysroot prefix.
    pub image_path: &'a dyn Fn(&str) -> PathKind,
    /// COS_OEM is already at /sysroot/oem (`plan_oem` ran before the rootfs stage).
    pub oem_mounted: bool,
}

#[derive(Debug, Default)]
pub struct SystemPlan {
    pub steps: Vec<Step>,
    pub warnings: Vec<String>,
}

impl SystemPlan {
    fn push(&mut self, action: Action, required: bool) -> usize {
        self.steps.push(Step {
            action,
            required,
            after: None,
        });
        self.steps.len() - 1
    }
    fn push_after(&mut self, action: Action, after: usize) -> usize {
        self.steps.push(Step {
            action,
            required: false,
            after: Some(after),
        });
        self.steps.len() - 1
    }
}

fn sysroot(p: &str) -> String {
    format!("{SYSROOT}{p}")
}

/// COS_OEM read-write at /sysroot/oem (SPEC section 3, step 3): allowed to be missing (a warning),
/// never on live media (None). Planned apart from `plan_system` because the `rootfs` stage
/// runs between this mount and the overlays, and may change the layout they are planned from.
pub fn plan_oem(
    req: &BootRequest,
    mode: BootMode,
    devices: &[BlockDev],
) -> Result<Option<Action>, String> {
    if mode == BootMode::Live {
        return Ok(None);
    }
    match blockdev::find_by_label(devices, &req.oem_label) {
        Some((dev, _)) => {
            let fstype = dev.fs.as_ref().map_or("ext4", |f| f.fstype.mount_type());
            Ok(Some(Action::Device {
                device: dev.devnode.display().to_string(),
                target: sysroot("/oem"),
                fstype: fstype.into(),
                readonly: false,
            }))
        }
        None => Err(format!(
            "OEM partition {} not found: /oem stays empty",
            req.oem_label
        )),
    }
}

/// The mounts that turn the read-only image at /sysroot into the running system, in order:
/// overlays on the RW paths, /oem, volumes (COS_PERSISTENT at /usr/local), persistent state
/// binds, the boot-mode sentinel.
///
/// A live boot writes to no disk of the machine: the medium may be booted next to an installed
/// disk, whose COS_PERSISTENT the image's layout file names. So on live media the layout's
/// VOLUMES and persistent state paths are left out, an overlay device becomes tmpfs, and a
/// volume from the command line (`rd.cos.mount`) is mounted read-only.
pub fn plan_system(inp: &SystemInputs<'_>) -> SystemPlan {
    let mut plan = SystemPlan::default();
    plan_overlay_store(&mut plan, inp);
    plan_rw_overlays(&mut plan, inp);
    // COS_OEM is mounted ahead of the rest when the rootfs stage needs it (see `plan_oem`).
    if !inp.oem_mounted {
        match plan_oem(inp.req, inp.mode, inp.devices) {
            Ok(Some(a)) => {
                plan.push(a, false);
            }
            Ok(None) => {}
            Err(w) => plan.warnings.push(w),
        }
    }
    let state = plan_volumes(&mut plan, inp);
    plan_persistent(&mut plan, inp, state);
    plan_sentinel(&mut plan, inp);
    plan
}

/// Overlay backing store at [`OVERLAY_DIR`]: the command line wins over the layout file; a
/// live boot and a missing device fall back to tmpfs:25%.
fn plan_overlay_store(plan: &mut SystemPlan, inp: &SystemInputs<'_>) {
    let layout = inp.layout;
    let live = inp.mode == BootMode::Live;
    let mut overlay = inp
        .req
        .overlay
        .clone()
        .unwrap_or_else(|| layout.overlay.clone());
    if let (true, Overlay::Device { spec }) = (live, &overlay) {
        plan.warnings.push(format!(
            "live boot: overlay device {spec} not used (a live system writes to no disk): tmpfs:25% instead"
        ));
        overlay = Overlay::Tmpfs { size: "25%".into() };
    }
    match &overlay {
        Overlay::Tmpfs { size } => {
            plan.push(
                Action::Tmpfs {
                    target: OVERLAY_DIR.into(),
                    size: size.clone(),
                },
                true,
            );
        }
        Overlay::Device { spec } => match blockdev::find_spec(inp.devices, spec) {
            Some(dev) => {
                let fstype = dev.fs.as_ref().map_or("ext4", |f| f.fstype.mount_type());
                plan.push(
                    Action::Device {
                        device: dev.devnode.display().to_string(),
                        target: OVERLAY_DIR.into(),
                        fstype: fstype.into(),
                        readonly: false,
                    },
                    true,
                );
            }
            None => {
                plan.warnings.push(format!(
                    "overlay device {spec} not found: using tmpfs:25% instead"
                ));
                plan.push(
                    Action::Tmpfs {
                        target: OVERLAY_DIR.into(),
                        size: "25%".into(),
                    },
                    true,
                );
            }
        },
    }
}

/// An overlay on each RW path (and custom ephemeral mount) the image has as a directory.
fn plan_rw_overlays(plan: &mut SystemPlan, inp: &SystemInputs<'_>) {
    let layout = inp.layout;
    let mut rw: Vec<String> = layout.rw_paths.clone();
    rw.extend(layout.custom_ephemeral_mounts.iter().cloned());
    let mut done_rw = Vec::new();
    for p in rw {
        let Ok(p) = layout::clean_path(&p) else {
            continue;
        };
        if done_rw.contains(&p) {
            continue;
        }
        match (inp.image_path)(&p) {
            PathKind::Dir => {}
            PathKind::Missing => continue, // upstream: only paths the image has get an overlay
            kind => {
                plan.warnings.push(format!(
                    "RW path {p} is a {kind:?} in the image, not a directory: no overlay"
                ));
                continue;
            }
        }
        let base = format!("{OVERLAY_DIR}/{}/.overlay", layout::flatten(&p));
        let upper = format!("{base}/upper");
        let work = format!("{base}/work");
        plan.push(
            Action::Mkdir {
                path: upper.clone(),
            },
            true,
        );
        plan.push(Action::Mkdir { path: work.clone() }, true);
        plan.push(
            Action::Overlay {
                lower: sysroot(&p),
                upper,
                work,
                target: sysroot(&p),
            },
            true,
        );
        done_rw.push(p);
    }
}

/// Where the persistent state paths go, as [`plan_volumes`] left it: the target directory,
/// and whether a mounted volume (or its tmpfs stand-in) holds it.
struct StateTarget {
    target: String,
    ok: bool,
}

/// The layout's VOLUMES (none on a live boot) and the command line's extra mounts; only
/// COS_PERSISTENT is writable.
fn plan_volumes(plan: &mut SystemPlan, inp: &SystemInputs<'_>) -> StateTarget {
    let layout = inp.layout;
    let live = inp.mode == BootMode::Live;
    let mut volumes: Vec<(String, String)> = layout
        .volumes
        .iter()
        .map(|v| (v.spec.clone(), v.mountpoint.clone()))
        .collect();
    if live && !volumes.is_empty() {
        let named: Vec<String> = volumes.iter().map(|(s, m)| format!("{s}:{m}")).collect();
        plan.warnings.push(format!(
            "live boot: the layout's VOLUMES ({}) are not mounted: a live system writes to no disk",
            named.join(" ")
        ));
        volumes.clear();
    }
    volumes.extend(inp.req.extra_mounts.iter().cloned());
    let persistent_spec = format!("LABEL={}", labels::PERSISTENT);
    let mut state_ok = layout.persistent_state_paths.is_empty();
    let state_target = layout::clean_path(&layout.persistent_state_target)
        .unwrap_or_else(|_| "/usr/local/.state".into());
    for (spec, mnt) in volumes {
        let Ok(mnt) = layout::clean_path(&mnt) else {
            plan.warnings.push(format!(
                "volume {spec}: mountpoint {mnt:?} is not a clean absolute path: skipped"
            ));
            continue;
        };
        // On live media even COS_PERSISTENT (named on the command line) is read-only.
        let persistent = spec == persistent_spec && !live;
        match blockdev::find_spec(inp.devices, &spec) {
            Some(dev) => {
                let fstype = dev.fs.as_ref().map_or("ext4", |f| f.fstype.mount_type());
                plan.push(
                    Action::Device {
                        device: dev.devnode.display().to_string(),
                        target: sysroot(&mnt),
                        fstype: fstype.into(),
                        // Only the persistent partition is writable (SPEC section 3, step 6).
                        readonly: !persistent,
                    },
                    false,
                );
                if persistent && state_target.starts_with(&mnt) {
                    state_ok = true;
                }
            }
            None if persistent => {
                plan.warnings.push(format!(
                    "{} not found: {mnt} and the persistent state paths are tmpfs, nothing will survive a reboot",
                    labels::PERSISTENT
                ));
                plan.push(
                    Action::Tmpfs {
                        target: sysroot(&mnt),
                        size: "25%".into(),
                    },
                    false,
                );
                state_ok = state_target.starts_with(&mnt);
            }
            None => plan
                .warnings
                .push(format!("volume {spec} not found: {mnt} not mounted")),
        }
    }
    StateTarget {
        target: state_target,
        ok: state_ok,
    }
}

/// The persistent state paths (none on a live boot), shallow first: each gets a `<p>.bind`
/// store under the state target, filled from the image, and is bound from it.
fn plan_persistent(plan: &mut SystemPlan, inp: &SystemInputs<'_>, state: StateTarget) {
    let layout = inp.layout;
    let live = inp.mode == BootMode::Live;
    let StateTarget {
        target: state_target,
        ok: state_ok,
    } = state;
    let mut persist: Vec<String> = layout.persistent_state_paths.clone();
    persist.extend(layout.custom_bind_mounts.iter().cloned());
    if live && !persist.is_empty() {
        plan.warnings.push(format!(
            "live boot: {} persistent state paths not bound: nothing of a live system persists",
            persist.len()
        ));
        persist.clear();
    }
    let persist = layout::sort_persistent(&persist);
    if !persist.is_empty() && !state_ok {
        plan.warnings.push(format!(
            "persistent state target {state_target} is on no mounted volume: state paths would land in an overlay; using tmpfs"
        ));
        plan.push(
            Action::Tmpfs {
                target: sysroot(&state_target),
                size: "10%".into(),
            },
            false,
        );
    }
    for p in persist {
        let Ok(p) = layout::clean_path(&p) else {
            continue;
        };
        let store = sysroot(&format!("{state_target}/{}.bind", layout::flatten(&p)));
        let mk = plan.push(
            Action::Mkdir {
                path: store.clone(),
            },
            false,
        );
        let prev = match (inp.image_path)(&p) {
            PathKind::Dir => plan.push_after(
                Action::SyncMissing {
                    from: sysroot(&p),
                    to: store.clone(),
                },
                mk,
            ),
            // Upstream bug #292/#942: a path the image lacks must still work, so create it.
            PathKind::Missing => plan.push_after(Action::Mkdir { path: sysroot(&p) }, mk),
            kind => {
                // A symlink could point anywhere (outside the root); a file cannot take a dir bind.
                plan.warnings.push(format!(
                    "persistent path {p} is a {kind:?} in the image: not bound"
                ));
                continue;
            }
        };
        plan.push_after(
            Action::Bind {
                source: store,
                target: sysroot(&p),
            },
            prev,
        );
    }
}

/// `/run/cos/<mode>_mode`, the sentinel the image's services read.
fn plan_sentinel(plan: &mut SystemPlan, inp: &SystemInputs<'_>) {
    plan.push(
        Action::Mkdir {
            path: "/run/cos".into(),
        },
        true,
    );
    plan.push(
        Action::WriteFile {
            path: format!("/run/cos/{}_mode", sentinel_name(inp.mode, inp.req.reset)),
            contents: "1".into(),
        },
        true,
    );
}

fn sentinel_name(mode: BootMode, reset: bool) -> &'static str {
    if reset { "autoreset" } else { mode_name(mode) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline;
    use crate::probe::FsInfo;
    use std::path::PathBuf;

    fn dev(name: &str, label: &str) -> BlockDev {
        BlockDev {
            name: name.into(),
            devnode: PathBuf::from(format!("/dev/{name}")),
            partname: None,
            is_partition: true,
            disk: "vda".into(),
            size_bytes: 1 << 20,
            fs: Some(FsInfo {
                fstype: FsType::Ext4,
                label: Some(label.into()),
                uuid: None,
            }),
        }
    }

    const ACTIVE_CMDLINE: &str =
        "console=tty1 root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img panic=5";
    const PASSIVE_CMDLINE: &str = "root=LABEL=COS_PASSIVE cos-img/filename=/cOS/passive.img";
    const RECOVERY_CMDLINE: &str =
        "root=live:LABEL=COS_RECOVERY rd.live.dir=/ rd.live.squashimg=/cOS/recovery.squashfs";

    fn req(line: &str) -> BootRequest {
        cmdline::parse(line).0
    }

    #[test]
    fn chains_follow_the_mode() {
        let names = |line: &str| {
            candidates(&req(line))
                .iter()
                .map(|c| c.image.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(ACTIVE_CMDLINE),
            [
                "/cOS/active.img",
                "/cOS/passive.img",
                "/cOS/recovery.squashfs",
                "/cOS/recovery.img"
            ]
        );
        assert_eq!(
            names(PASSIVE_CMDLINE),
            [
                "/cOS/passive.img",
                "/cOS/recovery.squashfs",
                "/cOS/recovery.img"
            ]
        );
        assert_eq!(
            names(RECOVERY_CMDLINE),
            ["/cOS/recovery.squashfs", "/cOS/recovery.img"]
        );
        assert_eq!(
            names("root=LABEL=COS_SYSTEM cos-img/filename=/cOS/recovery.img"),
            ["/cOS/recovery.img", "/cOS/recovery.squashfs"]
        );
        // An empty command line still boots active, with the whole chain.
        assert_eq!(names("").len(), 4);
        let c = &candidates(&req(ACTIVE_CMDLINE))[0];
        assert_eq!(c.source, "LABEL=COS_STATE");
        assert_eq!(c.source_mountpoint(), "/run/initramfs/cos-state");
        assert_eq!(
            candidates(&req(RECOVERY_CMDLINE))[0].source_mountpoint(),
            "/run/initramfs/cos-recovery"
        );
    }

    /// Every combination of present / missing / corrupt / unmountable for the four images and
    /// the two partitions: the first usable image in the chain wins, and every one passed over
    /// is reported with a reason.
    #[test]
    fn select_every_combination() {
        let statuses = |state_ok: bool, rec_ok: bool, s: u32| {
            let pick = |n: u32| match n {
                0 => ImageStatus::Fs(FsType::Ext4),
                1 => ImageStatus::Missing,
                2 => ImageStatus::Unrecognized,
                _ => ImageStatus::Failed("mount failed".into()),
            };
            let src = |ok: bool, st: ImageStatus| {
                if ok {
                    st
                } else {
                    ImageStatus::NoSource("partition not found".into())
                }
            };
            [
                src(state_ok, pick(s % 4)),
                src(state_ok, pick(s / 4 % 4)),
                src(rec_ok, pick(s / 16 % 4)),
                src(rec_ok, pick(s / 64 % 4)),
            ]
        };
        for line in [ACTIVE_CMDLINE, PASSIVE_CMDLINE, RECOVERY_CMDLINE] {
            let cands = candidates(&req(line));
            for state_ok in [true, false] {
                for rec_ok in [true, false] {
                    for s in 0..256 {
                        let st = statuses(state_ok, rec_ok, s);
                        let mut inv = Inventory::default();
                        for c in &cands {
                            let idx = match c.image.as_str() {
                                "/cOS/active.img" => 0,
                                "/cOS/passive.img" => 1,
                                "/cOS/recovery.squashfs" => 2,
                                _ => 3,
                            };
                            inv.set(c, st[idx].clone());
                        }
                        let sel = select(&cands, &inv);
                        let expect = cands
                            .iter()
                            .position(|c| matches!(inv.get(c), Some(ImageStatus::Fs(_))));
                        match (expect, &sel.chosen) {
                            (Some(i), Some((c, FsType::Ext4))) => {
                                assert_eq!(c, &cands[i]);
                                assert_eq!(sel.skipped.len(), i);
                            }
                            (None, None) => assert_eq!(sel.skipped.len(), cands.len()),
                            other => panic!("{line} {state_ok} {rec_ok} {s}: {other:?}"),
                        }
                        assert!(sel.skipped.iter().all(|(_, why)| !why.is_empty()));
                    }
                }
            }
        }
    }

    #[test]
    fn select_reasons_name_the_image() {
        let cands = candidates(&req(ACTIVE_CMDLINE));
        let mut inv = Inventory::default();
        inv.set(&cands[0], ImageStatus::Missing);
        inv.set(&cands[1], ImageStatus::Unrecognized);
        inv.set(&cands[2], ImageStatus::Fs(FsType::Squashfs));
        let sel = select(&cands, &inv);
        assert_eq!(
            sel.chosen.as_ref().map(|(c, _)| c.mode),
            Some(BootMode::Recovery)
        );
        assert!(sel.skipped[0].1.contains("/cOS/active.img does not exist"));
        assert!(
            sel.skipped[1]
                .1
                .contains("/cOS/passive.img holds no known filesystem")
        );
    }

    fn image_with(paths: &'static [&'static str]) -> impl Fn(&str) -> PathKind {
        move |p: &str| {
            if paths.contains(&p) {
                PathKind::Dir
            } else {
                PathKind::Missing
            }
        }
    }

    fn all_devices() -> Vec<BlockDev> {
        vec![
            dev("vda2", "COS_OEM"),
            dev("vda3", "COS_RECOVERY"),
            dev("vda4", "COS_STATE"),
            dev("vda5", "COS_PERSISTENT"),
        ]
    }

    fn plan(
        line: &str,
        layout: &Layout,
        devices: &[BlockDev],
        f: &dyn Fn(&str) -> PathKind,
    ) -> SystemPlan {
        let r = req(line);
        plan_system(&SystemInputs {
            req: &r,
            mode: r.mode,
            layout,
            devices,
            image_path: f,
            oem_mounted: false,
        })
    }

    /// The plan's actions, in order.
    fn actions(p: &SystemPlan) -> Vec<&Action> {
        p.steps.iter().map(|s| &s.action).collect()
    }

    /// The tmpfs under the overlays, of `size`.
    fn overlay_tmpfs(size: &str) -> Action {
        Action::Tmpfs {
            target: "/run/overlay".into(),
            size: size.into(),
        }
    }

    #[test]
    fn oem_is_planned_apart_for_the_rootfs_stage() {
        let r = req(ACTIVE_CMDLINE);
        let oem = Action::Device {
            device: "/dev/vda2".into(),
            target: "/sysroot/oem".into(),
            fstype: "ext4".into(),
            readonly: false,
        };
        assert_eq!(plan_oem(&r, r.mode, &all_devices()), Ok(Some(oem.clone())));
        assert_eq!(plan_oem(&r, BootMode::Live, &all_devices()), Ok(None));
        let e = plan_oem(&r, r.mode, &[dev("vda5", "COS_PERSISTENT")]).unwrap_err();
        assert!(e.contains("OEM partition COS_OEM not found"), "{e}");
        // Already mounted before the rootfs stage: plan_system leaves it out, and says nothing.
        let f = image_with(&["/etc"]);
        let p = plan_system(&SystemInputs {
            req: &r,
            mode: r.mode,
            layout: &Layout::kairos_default(),
            devices: &[dev("vda5", "COS_PERSISTENT")],
            image_path: &f,
            oem_mounted: true,
        });
        assert!(!p.steps.iter().any(|s| s.action == oem));
        assert!(!p.warnings.iter().any(|w| w.contains("OEM")));
        let p = plan(
            ACTIVE_CMDLINE,
            &Layout::kairos_default(),
            &all_devices(),
            &f,
        );
        assert!(p.steps.iter().any(|s| s.action == oem));
    }

    #[test]
    fn default_layout_plan() {
        let f = image_with(&[
            "/etc", "/var", "/srv", "/etc/ssh", "/home", "/root", "/var/log",
        ]);
        let p = plan(
            ACTIVE_CMDLINE,
            &Layout::kairos_default(),
            &all_devices(),
            &f,
        );
        let acts = actions(&p);
        assert_eq!(acts[0], &overlay_tmpfs("25%"));
        let overlays: Vec<&str> = acts
            .iter()
            .filter_map(|a| {
                if let Action::Overlay { target, .. } = a {
                    Some(target.as_str())
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(overlays, ["/sysroot/var", "/sysroot/etc", "/sysroot/srv"]);
        assert!(acts.contains(&&Action::Overlay {
            lower: "/sysroot/etc".into(),
            upper: "/run/overlay/etc/.overlay/upper".into(),
            work: "/run/overlay/etc/.overlay/work".into(),
            target: "/sysroot/etc".into()
        }));
        let pos = |want: &Action| acts.iter().position(|a| *a == want).expect("test setup");
        let oem = pos(&Action::Device {
            device: "/dev/vda2".into(),
            target: "/sysroot/oem".into(),
            fstype: "ext4".into(),
            readonly: false,
        });
        let persistent = pos(&Action::Device {
            device: "/dev/vda5".into(),
            target: "/sysroot/usr/local".into(),
            fstype: "ext4".into(),
            readonly: false,
        });
        let ssh_sync = pos(&Action::SyncMissing {
            from: "/sysroot/etc/ssh".into(),
            to: "/sysroot/usr/local/.state/etc-ssh.bind".into(),
        });
        let ssh_bind = pos(&Action::Bind {
            source: "/sysroot/usr/local/.state/etc-ssh.bind".into(),
            target: "/sysroot/etc/ssh".into(),
        });
        assert!(oem < persistent && persistent < ssh_sync && ssh_sync < ssh_bind);
        // A persistent path the image lacks is created, not skipped.
        assert!(acts.contains(&&Action::Mkdir {
            path: "/sysroot/var/lib/rancher".into()
        }));
        // Shallow paths are bound before deeper ones.
        let home = pos(&Action::Bind {
            source: "/sysroot/usr/local/.state/home.bind".into(),
            target: "/sysroot/home".into(),
        });
        let varlog = pos(&Action::Bind {
            source: "/sysroot/usr/local/.state/var-log.bind".into(),
            target: "/sysroot/var/log".into(),
        });
        assert!(home < varlog);
        assert_eq!(
            acts.last(),
            Some(&&Action::WriteFile {
                path: "/run/cos/active_mode".into(),
                contents: "1".into()
            })
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn missing_partitions_degrade_with_warnings() {
        let f = image_with(&["/etc", "/var", "/srv"]);
        let devices = vec![dev("vda4", "COS_STATE")];
        let p = plan(ACTIVE_CMDLINE, &Layout::kairos_default(), &devices, &f);
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("COS_PERSISTENT not found")),
            "{:?}",
            p.warnings
        );
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("OEM partition COS_OEM not found"))
        );
        assert!(p.steps.iter().any(|s| s.action
            == Action::Tmpfs {
                target: "/sysroot/usr/local".into(),
                size: "25%".into()
            }));
        // The state paths still get bound, onto the tmpfs.
        assert!(p.steps.iter().any(
            |s| matches!(&s.action, Action::Bind { target, .. } if target == "/sysroot/etc/ssh")
        ));
    }

    #[test]
    fn recovery_uses_overlays_only() {
        let f = image_with(&["/etc", "/var", "/srv"]);
        let r = req(RECOVERY_CMDLINE);
        let l = Layout::recovery_default();
        let p = plan_system(&SystemInputs {
            req: &r,
            mode: r.mode,
            layout: &l,
            devices: &all_devices(),
            image_path: &f,
            oem_mounted: false,
        });
        assert!(
            !p.steps
                .iter()
                .any(|s| matches!(&s.action, Action::Bind { .. }))
        );
        assert!(!p.steps.iter().any(
            |s| matches!(&s.action, Action::Device { target, .. } if target == "/sysroot/usr/local")
        ));
        assert!(p.steps.iter().any(|s| s.action
            == Action::WriteFile {
                path: "/run/cos/recovery_mode".into(),
                contents: "1".into()
            }));
    }

    #[test]
    fn symlinked_persistent_path_is_not_bound() {
        let f = |p: &str| match p {
            "/etc" | "/var" => PathKind::Dir,
            "/etc/ssh" => PathKind::Symlink,
            _ => PathKind::Missing,
        };
        let p = plan(
            ACTIVE_CMDLINE,
            &Layout::kairos_default(),
            &all_devices(),
            &f,
        );
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("/etc/ssh is a Symlink"))
        );
        assert!(!p.steps.iter().any(
            |s| matches!(&s.action, Action::Bind { target, .. } if target == "/sysroot/etc/ssh")
        ));
    }

    #[test]
    fn cmdline_overlay_wins_and_reset_sentinel() {
        let f = image_with(&["/etc"]);
        let p = plan(
            &format!("{RECOVERY_CMDLINE} kairos.reset rd.cos.overlay=tmpfs:1g"),
            &Layout::recovery_default(),
            &all_devices(),
            &f,
        );
        assert_eq!(p.steps[0].action, overlay_tmpfs("1g"));
        assert!(p.steps.iter().any(|s| s.action
            == Action::WriteFile {
                path: "/run/cos/autoreset_mode".into(),
                contents: "1".into()
            }));
    }
    /// Issue 14: a Kairos image's layout names COS_PERSISTENT; booted live next to an
    /// installed disk it must not mount that disk (read-write, or at all).
    #[test]
    fn live_boots_mount_no_disk_of_the_machine() {
        const LIVE: &str = "root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.live.squashimg=rootfs.squashfs rd.cos.disable";
        let f = image_with(&["/etc", "/var", "/srv", "/etc/ssh", "/home"]);
        let mut devices = all_devices();
        devices.push(dev("vdb1", "DATA"));
        // The layout of a Kairos image (SPEC section 3), with a device overlay on top.
        let (layout, w) = Layout::apply(
            Layout::recovery_default(),
            &[(
                PathBuf::from("/sysroot/etc/cos/cos-layout.env"),
                vec![
                    ("VOLUMES".into(), "LABEL=COS_PERSISTENT:/usr/local".into()),
                    ("OVERLAY".into(), "LABEL=COS_PERSISTENT".into()),
                    (
                        "PERSISTENT_STATE_PATHS".into(),
                        "/etc/ssh /home /var/lib/rancher".into(),
                    ),
                    ("CUSTOM_BIND_MOUNTS".into(), "/var/lib/extra".into()),
                ],
            )],
        );
        assert!(w.is_empty(), "{w:?}");
        let p = plan(LIVE, &layout, &devices, &f);
        let acts = actions(&p);
        assert_eq!(acts[0], &overlay_tmpfs("25%"));
        assert!(
            !acts.iter().any(|a| matches!(
                a,
                Action::Device { .. } | Action::Bind { .. } | Action::SyncMissing { .. }
            )),
            "{acts:#?}"
        );
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Overlay { target, .. } if target == "/sysroot/etc"))
        );
        assert_eq!(
            acts.last(),
            Some(&&Action::WriteFile {
                path: "/run/cos/live_mode".into(),
                contents: "1".into()
            })
        );
        for want in [
            "live boot: overlay device LABEL=COS_PERSISTENT not used",
            "live boot: the layout's VOLUMES (LABEL=COS_PERSISTENT:/usr/local) are not mounted",
            "live boot: 4 persistent state paths not bound",
        ] {
            assert!(
                p.warnings.iter().any(|w| w.starts_with(want)),
                "{want}: {:?}",
                p.warnings
            );
        }
        // A mount asked for on the command line happens, read-only, COS_PERSISTENT included.
        let p = plan(
            &format!(
                "{LIVE} rd.cos.mount=LABEL=DATA:/data rd.cos.mount=LABEL=COS_PERSISTENT:/usr/local"
            ),
            &layout,
            &devices,
            &f,
        );
        let ro: Vec<(&str, bool)> = p
            .steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Device {
                    target, readonly, ..
                } => Some((target.as_str(), *readonly)),
                _ => None,
            })
            .collect();
        assert_eq!(ro, [("/sysroot/data", true), ("/sysroot/usr/local", true)]);
        // The same layout on an installed system still mounts COS_PERSISTENT read-write.
        let p = plan(ACTIVE_CMDLINE, &layout, &devices, &f);
        assert!(p.steps.iter().any(|s| s.action
            == Action::Device {
                device: "/dev/vda5".into(),
                target: "/sysroot/usr/local".into(),
                fstype: "ext4".into(),
                readonly: false,
            }));
    }
}
