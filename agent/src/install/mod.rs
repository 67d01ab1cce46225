//! `kairos-agent install --device DEV`: partition, format and populate a disk the Kairos way
//! (SPEC §1), then make it bootable with BIOS or UEFI GRUB (`--firmware`, default: how this
//! system booted), without grub-install.
//!
//! 1. checks that write nothing: DEV is a whole block device, no part of it is mounted or used
//!    as swap, the source resolves and the disk is large enough for the layout it needs;
//! 2. `before-install` runs;
//! 3. a new GPT (gpt.rs): bios or efi, oem, recovery, state, persistent (the rest); the kernel
//!    re-reads it and the partition nodes appear;
//! 4. ext4 on each partition (COS_OEM, COS_RECOVERY, COS_STATE, COS_PERSISTENT), without the
//!    features GRUB 2.06 cannot read;
//! 5. COS_STATE:/cOS/active.img (COS_ACTIVE) built from the source, passive.img a copy
//!    relabelled COS_PASSIVE, COS_RECOVERY:/cOS/recovery.squashfs;
//! 6. COS_STATE:/grub2 (grub.cfg from `kairos_init::grubcfg`, the i386-pc modules),
//!    COS_OEM:/grubenv, the `--config` file as COS_OEM:/90_custom.yaml (0600),
//!    COS_PERSISTENT:/.kairos-state (the history `upgrade` appends to, at /usr/local);
//! 7. BIOS: core.img (grub-mkimage) into the bios partition and boot.img into the MBR
//!    (`kairos_init::grubbios`); UEFI: the ESP (efi.rs, x86_64-efi modules on COS_STATE
//!    instead of i386-pc); `after-install` runs.

pub mod device;
pub mod efi;
pub mod gpt;
pub mod plan;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kairos_init::grubbios::{self, GrubBiosError};
use kairos_init::grubcfg::{
    self, EXT4_FEATURES_GRUB_CANNOT_READ, GRUB_DIR, GrubCfgOptions, grub_cfg,
};
use kairos_init::grubenv::{self, DEFAULT_MAX_TRIES, GrubEnv, var};
use kairos_init::labels;
use kairos_util::{IoError, IoResultExt, run_tool};

use crate::config::{self, LoadOptions};
use crate::progress::Progress;
use crate::upgrade::rotate::Booted;
use crate::upgrade::source::{self, Source};
use crate::upgrade::{self, UpgradeError, fetch, image, layer, oci};
use crate::{Ctx, Outcome, stages};

const MIB: u64 = 1 << 20;
/// Where GRUB's BIOS images and modules are (grub-pc-bin).
pub const GRUB_I386_PC: &str = "/usr/lib/grub/i386-pc";
/// Where the new partitions are mounted while they are filled.
pub const MOUNT_BASE: &str = "/run/kairos/install";
/// The cloud-config's name on COS_OEM.
pub const CONFIG_NAME: &str = "90_custom.yaml";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A hook stage failed and the config says `strict: true`.
    #[error(transparent)]
    Hook(#[from] stages::HookFailed),
    #[error("{}: {what}; nothing was written", device.display())]
    Device { device: PathBuf, what: String },
    #[error("{}: {what}", device.display())]
    Partitions { device: PathBuf, what: String },
    #[error("{}: in use ({uses}); refusing to install, nothing was written", device.display())]
    InUse { device: PathBuf, uses: String },
    #[error(
        "{}: {size_mib} MiB is too small: this source needs at least {needed_mib} MiB ({parts} and the partition tables){}; nothing was written",
        device.display(),
        if *configured { ", with the sizes of install.partitions / install.extra-partitions" } else { "" }
    )]
    TooSmall {
        device: PathBuf,
        size_mib: u64,
        needed_mib: u64,
        /// `oem 64 + recovery 300 + …` MiB.
        parts: String,
        /// The cloud-config changed the layout.
        configured: bool,
    },
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(
        "no GRUB for UEFI: {}/kernel.img is neither on this system nor in the source (grub-efi-amd64-bin); nothing was written to {}",
        efi::GRUB_X86_64_EFI,
        device.display()
    )]
    NoGrubEfi { device: PathBuf },
    #[error("no device to install to: pass --device or set install.device in the cloud-config")]
    NoDevice,
    #[error(
        "install.device: auto found no disk to install to ({checked}){}; nothing was written",
        if *removable { "; removable and USB disks are only taken with install.allow-removable: true" } else { "" }
    )]
    NoAutoDevice { checked: String, removable: bool },
    #[error(
        "{} already holds a Kairos installation ({found}): not installing over it without install.force: true; nothing was written",
        device.display()
    )]
    HoldsKairos { device: PathBuf, found: String },
    #[error("{}: writing the partition table: {error}", device.display())]
    Gpt {
        device: PathBuf,
        error: gpt::GptError,
    },
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error(transparent)]
    Grub(#[from] GrubBiosError),
    #[error(transparent)]
    Io(#[from] kairos_util::IoError),
    #[error(transparent)]
    Command(#[from] kairos_util::ToolError),
    /// Attaching an image file to a loop device (the error names the file).
    #[error(transparent)]
    Loop(#[from] kairos_init::sys::loopdev::LoopError),
    /// Mounting a partition (the error names the device and the mount point).
    #[error(transparent)]
    Mount(#[from] kairos_init::sys::mount::MountError),
    /// Mounting an image file through its loop device: the mount error names only the loop
    /// device, this the file.
    #[error("{}: {err}", image.display())]
    MountImage {
        image: PathBuf,
        err: kairos_init::sys::mount::MountError,
    },
    #[error(
        "no GRUB for BIOS: {GRUB_I386_PC}/boot.img is neither on this system nor in the source (grub-pc-bin); nothing was written to {}",
        device.display()
    )]
    NoGrubBios { device: PathBuf },
    /// A program the ESP needs.
    #[error("{0} not found")]
    NoEspTool(efi::MissingTool),
    /// The partition plan lacks a partition the install fills (a bug in the plan).
    #[error("the layout has no {0} partition")]
    NoPartition(String),
    /// Fewer device nodes than planned partitions (a bug in the caller).
    #[error("no device node for {0}")]
    NoNode(String),
    /// The `--config` file or CONFIG (it names the file and the line).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{origin}: no #cloud-config header in its first lines; nothing was written")]
    NoHeader { origin: String },
    #[error("serializing the cloud-config: {0}")]
    Serialize(serde_json::Error),
    /// install.bundles into the new system.
    #[error(transparent)]
    Bundle(#[from] crate::bundles::BundleError),
    #[error("{what} after installing: reboot(2): {err}")]
    Reboot {
        what: &'static str,
        err: std::io::Error,
    },
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

/// `kairos-agent install`'s options; literal paths (not under `--root`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// The whole disk to install to (everything on it is lost) [default: install.device]
    #[arg(long, value_name = "DEV")]
    pub device: Option<PathBuf>,
    /// As for upgrade: oci:REF, docker:REF, a bare REF, ocifile:PATH, dir:PATH, file:PATH
    /// [default: install.source, else dir:/, the running system's image]
    #[arg(long, value_name = "SRC")]
    pub source: Option<String>,
    /// A cloud-config to install as COS_OEM:/90_custom.yaml (mode 0600)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// GRUB's i386-pc directory [default: /usr/lib/grub/i386-pc, else the source's]
    #[arg(long, value_name = "DIR")]
    pub grub_dir: Option<PathBuf>,
    /// Boot code to install
    #[arg(long, value_enum, default_value_t)]
    pub firmware: efi::Firmware,
    /// `device: auto` may take a removable or USB disk, as `install.allow-removable: true`
    /// allows (either is enough): for a caller whose config is not this node's (a pairing
    /// request). Not a flag.
    #[arg(skip)]
    pub allow_removable: bool,
}

/// Partition sizes in MiB and filesystems: SPEC §1's, or the cloud-config's
/// ([`Sizes::configured`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizes {
    /// The partitions in front of COS_OEM: bios (1 MiB), efi (64 MiB) or both.
    pub boot: u64,
    pub oem: u64,
    pub recovery: u64,
    pub state: u64,
    /// COS_PERSISTENT's size; 0: the rest of the disk.
    pub persistent: u64,
    /// The least the rest of the disk must leave for COS_PERSISTENT when it takes the rest.
    pub persistent_min: u64,
    pub fs: plan::KairosFs,
    /// `install.extra-partitions`, after persistent.
    pub extras: Vec<plan::Extra>,
    /// The cloud-config changed the layout.
    pub configured: bool,
}

impl Sizes {
    /// These sizes with `install.partitions` and `install.extra-partitions` of `install`
    /// applied, checked against what an image of `image` bytes needs.
    pub fn configured(
        mut self,
        install: &config::Install,
        image: u64,
    ) -> Result<Sizes, InstallError> {
        let img = image.div_ceil(MIB);
        // recovery.squashfs is at most as large as the image; state holds active, passive
        // and an upgrade's transition image, and GRUB's files.
        let c = plan::configure(install, img + 16, 3 * img + 64)?;
        if c.is_default() {
            return Ok(self);
        }
        self.oem = c.oem.unwrap_or(self.oem);
        self.recovery = c.recovery.unwrap_or(self.recovery);
        self.state = c.state.unwrap_or(self.state);
        self.persistent = c.persistent.unwrap_or(0);
        self.fs = c.fs;
        self.extras = c.extras;
        self.configured = true;
        Ok(self)
    }

    /// `oem 64 + recovery 300 + … MiB`, for errors.
    pub fn describe(&self) -> String {
        let mut v = vec![
            format!("oem {}", self.oem),
            format!("recovery {}", self.recovery),
            format!("state {}", self.state),
        ];
        v.push(match self.persistent {
            0 => format!("persistent at least {}", self.persistent_min),
            n => format!("persistent {n}"),
        });
        for e in &self.extras {
            v.push(match e.size {
                0 => format!("{} at least 1", e.name),
                n => format!("{} {n}", e.name),
            });
        }
        if self.boot > 0 {
            v.insert(0, format!("boot {}", self.boot));
        }
        format!("{} MiB", v.join(" + "))
    }
}

/// SPEC §1's sizes for a system image of `image` bytes (the recovery squashfs is at most as
/// large): recovery 2 × image + 200 MiB, state 3 × image (active, passive and an upgrade's
/// transition) + 1000 MiB; the boot partitions as the (resolved) `firmware` needs.
pub fn sizes(image: u64, firmware: efi::Firmware) -> Sizes {
    let img = image.div_ceil(MIB);
    Sizes {
        boot: firmware.boot_partitions().iter().map(|p| p.2).sum(),
        oem: 64,
        recovery: 2 * img + 200,
        state: 3 * img + 1000,
        persistent: 0,
        persistent_min: 64,
        fs: plan::KairosFs::default(),
        extras: Vec::new(),
        configured: false,
    }
}

/// MiB a disk needs for `s`: the partitions, 1 MiB in front (MBR, GPT, alignment) and 1 behind
/// (backup GPT).
pub fn needed_mib(s: &Sizes) -> u64 {
    let persistent = match s.persistent {
        0 => s.persistent_min,
        n => n,
    };
    let extras: u64 = s.extras.iter().map(|e| e.size.max(1)).sum();
    s.boot + s.oem + s.recovery + s.state + persistent + extras + 2
}

/// One partition of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The GPT partition name.
    pub name: String,
    /// The filesystem label ("" for none).
    pub label: String,
    /// The filesystem [`make_filesystems`] makes; None for the boot partitions (the ESP is
    /// efi.rs's) and an extra partition without `fs`.
    pub fs: Option<plan::Fs>,
    pub first: u64,
    pub last: u64,
}

/// The partitions for a disk of `size` bytes: the boot partitions `firmware` (resolved)
/// needs, then oem, recovery, state, persistent and the extra partitions; the one of size 0
/// (persistent unless configured otherwise) takes the rest. None when it is too small.
pub fn layout(size: u64, s: &Sizes, firmware: efi::Firmware) -> Option<Vec<Part>> {
    if size / MIB < needed_mib(s) {
        return None;
    }
    let per_mib = MIB / gpt::SECTOR;
    let last_usable = gpt::last_usable(size / gpt::SECTOR);
    // (name, label, fs, MiB; 0: the rest)
    let mut want: Vec<(String, String, Option<plan::Fs>, u64)> = firmware
        .boot_partitions()
        .iter()
        .map(|&(n, l, mib)| (n.to_string(), l.to_string(), None, mib))
        .collect();
    for (n, l, fs, mib) in [
        ("oem", labels::OEM, s.fs.oem, s.oem),
        ("recovery", labels::RECOVERY, s.fs.recovery, s.recovery),
        ("state", labels::STATE, s.fs.state, s.state),
        (
            "persistent",
            labels::PERSISTENT,
            s.fs.persistent,
            s.persistent,
        ),
    ] {
        want.push((n.into(), l.into(), Some(fs), mib));
    }
    for e in &s.extras {
        want.push((
            e.name.clone(),
            e.label.clone().unwrap_or_default(),
            e.fs,
            e.size,
        ));
    }
    let fixed: u64 = want.iter().map(|w| w.3 * per_mib).sum();
    let rest = (last_usable + 1).checked_sub(gpt::ALIGN + fixed)?;
    let count = want.len();
    let mut at = gpt::ALIGN;
    let mut out = Vec::with_capacity(count);
    for (i, (name, label, fs, mib)) in want.into_iter().enumerate() {
        let n = match mib {
            // The last partition ends at the backup GPT; one in the middle keeps the next
            // aligned.
            0 if i + 1 == count => last_usable + 1 - at,
            0 => rest / per_mib * per_mib,
            m => m * per_mib,
        };
        if n == 0 || at + n - 1 > last_usable {
            return None;
        }
        out.push(Part {
            name,
            label,
            fs,
            first: at,
            last: at + n - 1,
        });
        at += n;
    }
    Some(out)
}

/// The 1-based number of the partition named `name` in `parts`.
pub fn part_number(parts: &[Part], name: &str) -> Option<u32> {
    (1..)
        .zip(parts)
        .find(|(_, p)| p.name == name)
        .map(|(n, _)| n)
}

/// The GRUB prefix baked into core.img: COS_STATE's grub2 directory on the disk the BIOS
/// loaded GRUB from (partition 4, or 5 behind a hybrid disk's ESP).
pub fn grub_prefix(parts: &[Part]) -> String {
    grubcfg::grub_prefix(part_number(parts, "state").unwrap_or(4))
}

/// `fs` on a partition, labelled unless `label` is empty. ext2/3/4 without the features
/// GRUB 2.06 cannot read (an older mke2fs that does not know their names is retried without
/// them); `-T default`: 4 KiB blocks even on a small partition (mke2fs would pick 1 KiB below
/// 512 MiB), because a built disk's 64 MiB COS_PERSISTENT is grown to the device's size on
/// first boot.
fn mkfs_partition(dev: &Path, label: &str, fs: plan::Fs) -> Result<(), InstallError> {
    if fs == plan::Fs::Xfs {
        let mut c = Command::new("mkfs.xfs");
        c.args(["-q", "-f"]);
        if !label.is_empty() {
            c.args(["-L", label]);
        }
        run_tool(c.arg(dev))?;
        return Ok(());
    }
    let off = |features: &[&str]| {
        features
            .iter()
            .map(|f| format!("^{f}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let attempt = |off: Option<String>| {
        let mut c = Command::new("mkfs.ext4");
        c.args(["-q", "-F", "-t", fs.name(), "-T", "default"]);
        if !label.is_empty() {
            c.args(["-L", label]);
        }
        if let Some(o) = off {
            c.arg("-O").arg(o);
        }
        run_tool(c.arg(dev)).map(drop)
    };
    let all = EXT4_FEATURES_GRUB_CANNOT_READ;
    attempt(Some(off(all))).or_else(|first| {
        attempt(Some(off(&all[..1])))
            .or_else(|_| attempt(None))
            .map_err(|_| first)
    })?;
    Ok(())
}

/// Partitions mounted for the install, unmounted (in reverse) on drop.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = kairos_init::sys::mount::unmount(m, false);
            let _ = std::fs::remove_dir(m);
        }
    }
}

/// A filesystem image mounted read-only through a loop device (`file:` sources).
struct ImageMount(PathBuf);

impl Drop for ImageMount {
    fn drop(&mut self) {
        let _ = kairos_init::sys::mount::unmount(&self.0, false);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The source, resolved; the tree is there (dir, file) or comes later (OCI).
enum Resolved {
    Tree {
        tree: PathBuf,
        _bind: Option<image::BindMount>,
        _mount: Option<ImageMount>,
        image_file: Option<PathBuf>,
        /// The squashfs file the tree is (a live or recovery system installing itself):
        /// COS_RECOVERY's image is a copy of it instead of the same tree compressed again.
        squashfs: Option<PathBuf>,
    },
    Oci {
        puller: Box<fetch::Puller>,
        resolved: oci::Resolved,
    },
}

fn resolve(
    ctx: &Ctx,
    src: &Source,
    origin: &str,
    scratch: &Path,
    log: &mut dyn Write,
) -> Result<(Resolved, u64, Option<String>), InstallError> {
    let missing = |p: &Path| {
        InstallError::Upgrade(UpgradeError::NotFound {
            origin: origin.into(),
            path: p.to_path_buf(),
        })
    };
    match src {
        Source::Dir(p) => {
            if !p.is_dir() {
                return Err(missing(p));
            }
            // Non-recursive: `dir:/` is the image without /proc, /sys, /dev, /run, /oem,
            // /usr/local or the overlays.
            let point = scratch.join("install-source");
            let bind = image::BindMount::or_warn(p, &point, log);
            let tree = bind
                .as_ref()
                .map_or_else(|| p.clone(), |b| b.target.clone());
            let m = image::measure(&tree)?;
            // Only the bind of `/` is exactly the root filesystem's contents.
            let squashfs = (bind.is_some() && *p == ctx.path("/"))
                .then(|| running_root_squashfs(ctx))
                .flatten();
            Ok((
                Resolved::Tree {
                    tree,
                    _bind: bind,
                    _mount: None,
                    image_file: None,
                    squashfs,
                },
                image::image_size(m),
                None,
            ))
        }
        Source::File(p) => {
            if !p.is_file() {
                return Err(missing(p));
            }
            let size = std::fs::metadata(p).at(p, "reading")?.len();
            let point = scratch.join("install-image");
            std::fs::create_dir_all(&point).at(&point, "creating")?;
            let lo = kairos_init::sys::loopdev::attach(&ctx.path("/dev"), p, true)?;
            kairos_init::sys::mount::device(&lo.path, &point, "ext4", true).map_err(|err| {
                InstallError::MountImage {
                    image: p.to_path_buf(),
                    err,
                }
            })?;
            Ok((
                Resolved::Tree {
                    tree: point.clone(),
                    _bind: None,
                    _mount: Some(ImageMount(point)),
                    image_file: Some(p.clone()),
                    squashfs: None,
                },
                size,
                None,
            ))
        }
        Source::Oci(r) => {
            let puller = fetch::Puller::Registry(Box::new(fetch::Registry::new(r, origin)?));
            resolve_oci(puller, origin, log)
        }
        Source::OciFile(p) if p.is_dir() => resolve_oci(
            fetch::Puller::Layout(fetch::Layout::new(p, origin)),
            origin,
            log,
        ),
        Source::OciFile(p) => {
            if !p.exists() {
                return Err(missing(p));
            }
            resolve_oci(
                fetch::Puller::Archive(fetch::Archive::new(p, origin)),
                origin,
                log,
            )
        }
    }
}

fn resolve_oci(
    mut puller: fetch::Puller,
    origin: &str,
    log: &mut dyn Write,
) -> Result<(Resolved, u64, Option<String>), InstallError> {
    let resolved = puller.resolve()?;
    let compressed = resolved.compressed_bytes();
    writeln!(
        log,
        "kairos-agent: {origin}: manifest {} ({}), {} layer(s), {compressed} bytes compressed",
        resolved.manifest_digest,
        resolved.platform,
        resolved.layers.len()
    )
    .map_err(InstallError::Output)?;
    let digest = Some(resolved.manifest_digest.clone());
    Ok((
        Resolved::Oci {
            puller: Box::new(puller),
            resolved,
        },
        oci::estimate_unpacked(compressed),
        digest,
    ))
}

/// Downloads (verified) and applies the layers into `work/rootfs`.
fn unpack_oci(
    puller: &mut fetch::Puller,
    resolved: &oci::Resolved,
    work: &Path,
    log: &mut dyn Write,
) -> Result<PathBuf, InstallError> {
    let store = fetch::Store::new(&work.join("blobs"))?;
    let layers = puller.fetch_layers(resolved, &store, log)?;
    let staging = work.join("rootfs");
    std::fs::create_dir_all(&staging).at(&staging, "creating")?;
    for (blob, path) in resolved.layers.iter().zip(&layers) {
        let f = File::open(path).at(path, "opening")?;
        layer::apply(&staging, &blob.digest, f).map_err(UpgradeError::from)?;
        if puller.copies_layers() {
            std::fs::remove_file(path).at(path, "removing")?;
        }
    }
    Ok(staging)
}

/// A hook stage: failed steps are a warning, or with `strict: true` (in any of `sources`,
/// the last one saying wins) stop the install, as do sources skipped as malformed.
fn run_hook(
    ctx: &Ctx,
    loaded: &config::Loaded,
    sources: &[config::Source],
    stage: &str,
    log: &mut dyn Write,
) -> Result<(), InstallError> {
    let opts = stages::RunOptions::from_sources(sources);
    stages::hook_with(
        ctx,
        sources,
        opts,
        stages::strictness_over(sources, loaded).as_deref(),
        stage,
        "install",
        log,
    )?;
    Ok(())
}

/// Copies GRUB's modules and lists for `platform` (i386-pc, x86_64-efi) to
/// `prefix_dir/PLATFORM`, as grub-install does.
fn copy_grub_modules(
    grub_dir: &Path,
    prefix_dir: &Path,
    platform: &str,
) -> Result<(), InstallError> {
    let dst = prefix_dir.join(platform);
    std::fs::create_dir_all(&dst).at(&dst, "creating")?;
    for e in std::fs::read_dir(grub_dir).at(grub_dir, "listing")? {
        let e = e.at(grub_dir, "listing")?;
        let name = e.file_name();
        let keep = Path::new(&name)
            .extension()
            .is_some_and(|x| x == "mod" || x == "lst");
        if keep {
            let to = dst.join(&name);
            std::fs::copy(e.path(), &to).at(&to, "copying GRUB module to")?;
        }
    }
    Ok(())
}

/// core.img for `prefix` from `grub-mkimage`, written next to `scratch`.
fn make_core(grub_dir: &Path, prefix: &str, scratch: &Path) -> Result<Vec<u8>, InstallError> {
    let out = scratch.join("core.img");
    run_tool(
        Command::new("grub-mkimage")
            .args(["-O", "i386-pc", "-d"])
            .arg(grub_dir)
            .arg("-o")
            .arg(&out)
            .args(["-p", prefix])
            .args(grubbios::core_modules_in(grub_dir)),
    )?;
    let core = std::fs::read(&out).at(&out, "reading")?;
    let _ = std::fs::remove_file(&out);
    Ok(core)
}

/// 16 random bytes (for GUIDs), from /dev/urandom, else from the clock and the pid.
fn random16(ctx: &Ctx) -> [u8; 16] {
    use std::io::Read;
    let mut b = [0u8; 16];
    if File::open(ctx.path("/dev/urandom"))
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return b;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let x = t ^ (u128::from(std::process::id()) << 64);
    x.to_le_bytes()
}

/// Writes the GPT for `parts` to the open disk, zeroing the rest of the first MiB (old
/// boot code and tables) first.
fn write_gpt(
    ctx: &Ctx,
    f: &mut File,
    disk: &device::Disk,
    parts: &[Part],
) -> Result<(), InstallError> {
    let sectors = disk.size / gpt::SECTOR;
    let gparts: Vec<gpt::Partition> = parts
        .iter()
        .map(|p| gpt::Partition {
            name: p.name.clone(),
            type_guid: match p.name.as_str() {
                "bios" => gpt::BIOS_BOOT,
                "efi" => gpt::EFI_SYSTEM,
                _ => gpt::LINUX_FS,
            }
            .into(),
            guid: gpt::guid_from_random(random16(ctx)),
            first_lba: p.first,
            last_lba: p.last,
        })
        .collect();
    let g = gpt::build(sectors, gpt::guid_from_random(random16(ctx)), &gparts).map_err(|e| {
        InstallError::Gpt {
            device: disk.path.clone(),
            error: e,
        }
    })?;
    let d = &disk.path;
    let mut head = vec![0u8; MIB as usize];
    head[..g.primary.len()].copy_from_slice(&g.primary);
    f.seek(SeekFrom::Start(0)).at(d, "seeking")?;
    f.write_all(&head).at(d, "writing the primary GPT to")?;
    f.seek(SeekFrom::Start(g.backup_offset)).at(d, "seeking")?;
    f.write_all(&g.backup).at(d, "writing the backup GPT to")?;
    f.sync_all().at(d, "fsync")?;
    Ok(())
}

/// The source of an install, resolved: a tree on disk (`dir:`, `file:`, or an OCI image
/// unpacked to a work directory), or an OCI image that is pulled onto COS_STATE later.
pub struct SourceImage {
    /// The source as given (`oci:…`, `dir:…`), for logs and the history.
    pub origin: String,
    resolved: Resolved,
    /// Bytes the system image needs: exact for a tree, estimated for an OCI image not yet
    /// unpacked.
    pub image_size: u64,
    /// The OCI manifest digest, for the history.
    pub digest: Option<String>,
}

impl SourceImage {
    /// Parses `given` (the forms of `upgrade --source`) and resolves it: a directory is
    /// bound (non-recursively), an image file loop-mounted, both under `scratch`; an OCI
    /// manifest fetched.
    pub fn resolve(
        ctx: &Ctx,
        given: &str,
        scratch: &Path,
        log: &mut dyn Write,
    ) -> Result<Self, InstallError> {
        let origin = given.trim().to_string();
        let src = source::parse(given)?;
        let (resolved, image_size, digest) = resolve(ctx, &src, &origin, scratch, log)?;
        Ok(SourceImage {
            origin,
            resolved,
            image_size,
            digest,
        })
    }

    /// The root tree when it is on disk already (not for an OCI image not yet unpacked).
    pub fn tree(&self) -> Option<&Path> {
        match &self.resolved {
            Resolved::Tree { tree, .. } => Some(tree),
            Resolved::Oci { .. } => None,
        }
    }

    /// Whether the image still has to be pulled (an OCI image not unpacked yet).
    pub fn is_remote(&self) -> bool {
        matches!(self.resolved, Resolved::Oci { .. })
    }

    /// Pulls and unpacks an OCI image into `work/rootfs` now (a builder has room for it on
    /// the host), so the size is exact; a tree is left as it is. `work` is the caller's to
    /// remove.
    pub fn unpack_into(&mut self, work: &Path, log: &mut dyn Write) -> Result<(), InstallError> {
        if let Resolved::Oci { puller, resolved } = &mut self.resolved {
            let tree = unpack_oci(puller, resolved, work, log)?;
            self.image_size = image::image_size(image::measure(&tree)?);
            self.resolved = Resolved::Tree {
                tree,
                _bind: None,
                _mount: None,
                image_file: None,
                squashfs: None,
            };
        }
        Ok(())
    }
}

/// The squashfs file the running root is, when `/` is a loop device over one (a live system
/// from its medium's rootfs.squashfs, or recovery): the root device as the upgrade finds it
/// (`slots::root_device`), then the loop
/// device's `backing_file` under `ctx`'s root, checked by its magic.
fn running_root_squashfs(ctx: &Ctx) -> Option<PathBuf> {
    use std::io::Read;
    let mounts = std::fs::read_to_string(ctx.path("/proc/self/mounts")).ok()?;
    let dev = crate::upgrade::slots::root_device(&mounts)?;
    let name = dev.strip_prefix("/dev/")?;
    if !name.starts_with("loop") || name.contains('/') {
        return None;
    }
    let backing =
        std::fs::read_to_string(ctx.path(format!("/sys/block/{name}/loop/backing_file"))).ok()?;
    let file = ctx.path(backing.trim_end_matches('\n'));
    let mut magic = [0u8; 4];
    File::open(&file).ok()?.read_exact(&mut magic).ok()?;
    (&magic == b"hsqs").then_some(file)
}

/// GRUB's files for the boot code an install writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootCode {
    /// Resolved: Bios, Efi or Hybrid.
    pub firmware: efi::Firmware,
    /// GRUB's i386-pc directory (boot.img, the modules) when BIOS boot code is written.
    pub bios: Option<PathBuf>,
    /// GRUB's x86_64-efi directory when an ESP is written.
    pub efi: Option<PathBuf>,
}

/// Finds GRUB for `firmware` (resolved) on this system, else in the source's tree, and the
/// ESP's tools; errors name `device`, to which nothing was written. `bios_dir` overrides
/// the i386-pc directory (`--grub-dir`).
pub fn find_boot_code(
    ctx: &Ctx,
    firmware: efi::Firmware,
    bios_dir: Option<&Path>,
    src: &SourceImage,
    device: &Path,
) -> Result<BootCode, InstallError> {
    let in_source = |dir: &str, ok: &dyn Fn(&Path) -> bool| {
        src.tree()
            .map(|t| t.join(dir.trim_start_matches('/')))
            .filter(|d| ok(d))
    };
    let efi = if firmware.has_efi() {
        let dir = Some(ctx.path(efi::GRUB_X86_64_EFI))
            .filter(|d| efi::is_grub_efi_dir(d))
            .or_else(|| in_source(efi::GRUB_X86_64_EFI, &efi::is_grub_efi_dir))
            .ok_or_else(|| InstallError::NoGrubEfi {
                device: device.to_path_buf(),
            })?;
        efi::tools().map_err(|t| InstallError::Device {
            device: device.to_path_buf(),
            what: format!("UEFI boot code needs {t}, which is not on this system"),
        })?;
        Some(dir)
    } else {
        None
    };
    let has_boot_img = |d: &Path| d.join("boot.img").is_file();
    let bios = if firmware.has_bios() {
        Some(
            bios_dir
                .map(Path::to_path_buf)
                .or_else(|| Some(ctx.path(GRUB_I386_PC)).filter(|d| has_boot_img(d)))
                .or_else(|| in_source(GRUB_I386_PC, &has_boot_img))
                .ok_or_else(|| InstallError::NoGrubBios {
                    device: device.to_path_buf(),
                })?,
        )
    } else {
        None
    };
    Ok(BootCode {
        firmware,
        bios,
        efi,
    })
}

/// Phase: the partition table on `disk`, and the kernel told about it (BLKRRPART, or BLKPG
/// on a kernel without a GPT parser). Returns the partitions' device nodes, in order.
pub fn write_partitions(
    ctx: &Ctx,
    disk: &device::Disk,
    parts: &[Part],
    log: &mut dyn Write,
) -> Result<Vec<PathBuf>, InstallError> {
    // O_EXCL: the kernel refuses a device something holds open.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
        .open(&disk.path)
        .map_err(|e| InstallError::Device {
            device: disk.path.clone(),
            what: format!("cannot open it exclusively: {e}"),
        })?;
    write_gpt(ctx, &mut f, disk, parts)?;
    let add: Vec<(u32, u64, u64)> = (1..)
        .zip(parts)
        .map(|(n, p)| {
            (
                n,
                p.first * gpt::SECTOR,
                (p.last - p.first + 1) * gpt::SECTOR,
            )
        })
        .collect();
    if device::publish(ctx, &f, disk, &add)? {
        writeln!(
            log,
            "install: the kernel did not read the new GPT of {}; added its partitions (BLKPG)",
            disk.path.display()
        )
        .map_err(InstallError::Output)?;
    }
    // mkfs opens the partitions exclusively, which an exclusive opener of the disk prevents.
    drop(f);
    (1..=parts.len() as u32)
        .map(|n| device::wait_partition(ctx, disk, n, Duration::from_secs(10)))
        .collect()
}

/// The filesystems of an install, mounted read-write until dropped (unmounted in reverse).
pub struct Targets {
    _mounts: Mounts,
    pub oem: PathBuf,
    pub recovery: PathBuf,
    pub state: PathBuf,
    pub persistent: PathBuf,
}

/// Phase: the filesystems: oem, recovery, state and persistent (ext4 unless
/// `install.partitions` says otherwise), each mounted at `base/<GPT name>`, and the extra
/// partitions that have an `fs` (not mounted).
pub fn make_filesystems(
    parts: &[Part],
    nodes: &[PathBuf],
    base: &Path,
) -> Result<Targets, InstallError> {
    for (i, p) in parts.iter().enumerate() {
        let Some(fs) = p.fs else { continue };
        let node = nodes
            .get(i)
            .ok_or_else(|| InstallError::NoNode(p.name.clone()))?;
        mkfs_partition(node, &p.label, fs)?;
    }
    mount_targets(parts, nodes, base)
}

/// Mounts oem, recovery, state and persistent of `parts` (made already) read-write at
/// `base/<GPT name>`.
fn mount_targets(parts: &[Part], nodes: &[PathBuf], base: &Path) -> Result<Targets, InstallError> {
    let mut mounts = Mounts(Vec::new());
    let mut dir_of = |want: &str| -> Result<PathBuf, InstallError> {
        let i = parts
            .iter()
            .position(|p| p.name == want)
            .ok_or_else(|| InstallError::NoPartition(want.to_string()))?;
        let p = &parts[i];
        let node = nodes
            .get(i)
            .ok_or_else(|| InstallError::NoNode(want.to_string()))?;
        let point = base.join(want);
        std::fs::create_dir_all(&point).at(&point, "creating")?;
        let fstype =
            p.fs.map_or("ext4", |f| if f == plan::Fs::Xfs { "xfs" } else { "ext4" });
        kairos_init::sys::mount::device(node, &point, fstype, false)?;
        mounts.0.push(point.clone());
        Ok(point)
    };
    let oem = dir_of("oem")?;
    let recovery = dir_of("recovery")?;
    let state = dir_of("state")?;
    let persistent = dir_of("persistent")?;
    Ok(Targets {
        _mounts: mounts,
        oem,
        recovery,
        state,
        persistent,
    })
}

/// Phase: COS_STATE:/cOS/active.img (COS_ACTIVE) from the source, passive.img a copy
/// relabelled COS_PASSIVE, COS_RECOVERY:/cOS/recovery.squashfs. An OCI image not unpacked
/// yet is pulled onto COS_STATE first. Returns active.img's size.
pub fn deploy_images(
    src: &mut SourceImage,
    t: &Targets,
    p: &mut Progress,
    log: &mut dyn Write,
) -> Result<u64, InstallError> {
    deploy_images_with(src, t, p, log, &mut |_, _| Ok(()))
}

/// [`deploy_images`], calling `active_built` with active.img (built, before passive.img is
/// copied from it): the `after-install-chroot` stage.
pub fn deploy_images_with(
    src: &mut SourceImage,
    t: &Targets,
    p: &mut Progress,
    log: &mut dyn Write,
    active_built: &mut dyn FnMut(&Path, &mut dyn Write) -> Result<(), InstallError>,
) -> Result<u64, InstallError> {
    let state_cos = t.state.join("cOS");
    let rec_cos = t.recovery.join("cOS");
    for d in [&state_cos, &rec_cos] {
        std::fs::create_dir_all(d).at(d, "creating")?;
    }
    let work = t.state.join(".kairos-install");
    let (tree, image_file, squashfs) = match &mut src.resolved {
        Resolved::Tree {
            tree,
            image_file,
            squashfs,
            ..
        } => (tree.clone(), image_file.clone(), squashfs.clone()),
        Resolved::Oci { puller, resolved } => {
            p.step(&format!("pulling {}", src.origin), log);
            (unpack_oci(puller, resolved, &work, log)?, None, None)
        }
    };
    let active = state_cos.join("active.img");
    p.step("building active.img", log);
    match &image_file {
        Some(file) => {
            std::fs::copy(file, &active).at(&active, "copying the image to")?;
            image::relabel(&active, labels::ACTIVE)?;
        }
        None => {
            let m = image::measure(&tree)?;
            image::mkfs_ext4(
                &tree,
                &active,
                image::image_size(m),
                image::inode_count(m),
                labels::ACTIVE,
            )?;
        }
    }
    active_built(&active, log)?;
    p.step("copying passive.img", log);
    let passive = state_cos.join("passive.img");
    std::fs::copy(&active, &passive).at(&passive, "copying active.img to")?;
    image::relabel(&passive, labels::PASSIVE)?;
    let recovery = rec_cos.join("recovery.squashfs");
    match &squashfs {
        Some(file) => {
            p.step("copying recovery.squashfs", log);
            writeln!(
                log,
                "install: recovery.squashfs is a copy of {}, the squashfs this system runs from",
                file.display()
            )
            .map_err(InstallError::Output)?;
            std::fs::copy(file, &recovery).at(&recovery, "copying the root squashfs to")?;
            File::open(&recovery)
                .and_then(|f| f.sync_all())
                .at(&recovery, "syncing")?;
        }
        None => {
            p.step("building recovery.squashfs", log);
            image::mksquashfs(&tree, &recovery)?;
        }
    }
    let missing = reset_tools_missing(&tree);
    if !missing.is_empty() {
        writeln!(
            log,
            "install: warning: the image has no {} (e2fsprogs): booted from its recovery copy, `kairos-agent reset` and the statereset entry cannot rebuild the system",
            missing.join(", ")
        ).map_err(InstallError::Output)?;
    }
    if work.exists() {
        std::fs::remove_dir_all(&work).at(&work, "removing")?;
    }
    Ok(std::fs::metadata(&active).map(|m| m.len()).unwrap_or(0))
}

/// What `reset` runs in recovery (the recovery image is a copy of the installed one) that
/// `tree` lacks: `mkfs.ext4` (or `mke2fs`) builds the new images, `e2label` (or `tune2fs`)
/// labels passive. Looked for in the image's sbin and bin directories.
pub fn reset_tools_missing(tree: &Path) -> Vec<&'static str> {
    let has = |names: &[&str]| {
        [
            "usr/local/sbin",
            "usr/local/bin",
            "usr/sbin",
            "usr/bin",
            "sbin",
            "bin",
        ]
        .iter()
        .any(|d| {
            names
                .iter()
                .any(|n| std::fs::symlink_metadata(tree.join(d).join(n)).is_ok())
        })
    };
    let mut missing = Vec::new();
    if !has(&["mkfs.ext4", "mke2fs"]) {
        missing.push("mkfs.ext4");
    }
    if !has(&["e2label", "tune2fs"]) {
        missing.push("e2label");
    }
    missing
}

/// Phase: GRUB's files on COS_STATE (grub.cfg and the modules of each platform written),
/// COS_OEM:/grubenv, `config` as COS_OEM:/90_custom.yaml (0600), and `history` as
/// COS_PERSISTENT:/.kairos-state.
pub fn write_boot_files(
    t: &Targets,
    boot: &BootCode,
    config: Option<&Path>,
    history: &str,
) -> Result<(), InstallError> {
    let grub2 = t.state.join(GRUB_DIR);
    std::fs::create_dir_all(&grub2).at(&grub2, "creating")?;
    let cfg = grub2.join("grub.cfg");
    std::fs::write(&cfg, grub_cfg(&GrubCfgOptions::default())).at(&cfg, "writing")?;
    if let Some(d) = &boot.bios {
        copy_grub_modules(d, &grub2, "i386-pc")?;
    }
    if let Some(d) = &boot.efi {
        copy_grub_modules(d, &grub2, "x86_64-efi")?;
    }
    let mut env = GrubEnv::default();
    env.set(var::MAX_TRIES, &DEFAULT_MAX_TRIES.to_string())
        .map_err(UpgradeError::from)?;
    grubenv::write(&t.oem.join("grubenv"), &env).map_err(UpgradeError::from)?;
    if let Some(c) = config {
        let text = std::fs::read(c).at(c, "reading the config")?;
        let to = t.oem.join(CONFIG_NAME);
        write_private(&to, &text).at(&to, "writing")?;
    }
    let hist = t.persistent.join(".kairos-state");
    std::fs::write(&hist, history).at(&hist, "writing")?;
    Ok(())
}

/// Phase: the boot code: the ESP (UEFI) and/or boot.img in the MBR with core.img in the
/// bios_grub partition (BIOS); then the disk is synced.
pub fn write_boot_code(
    disk: &device::Disk,
    parts: &[Part],
    nodes: &[PathBuf],
    boot: &BootCode,
    t: &Targets,
) -> Result<(), InstallError> {
    if let Some(d) = &boot.efi {
        let n = part_number(parts, "efi").ok_or_else(|| InstallError::NoPartition("efi".into()))?;
        let node = nodes
            .get(n as usize - 1)
            .ok_or_else(|| InstallError::NoNode("the ESP".into()))?;
        efi::write_esp(node, d, &t.state.join(".kairos-efi"))?;
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk.path)
        .at(&disk.path, "opening")?;
    if let Some(d) = &boot.bios {
        let n =
            part_number(parts, "bios").ok_or_else(|| InstallError::NoPartition("bios".into()))?;
        let boot_img = d.join("boot.img");
        let code = std::fs::read(&boot_img).at(&boot_img, "reading")?;
        let core = make_core(d, &grub_prefix(parts), &t.state)?;
        grubbios::install(&mut f, &disk.path, parts[n as usize - 1].first, &code, core)?;
    }
    f.sync_all().at(&disk.path, "fsync")?;
    Ok(())
}

/// Phase: everything on the filesystems written out, and them unmounted.
pub fn finish(t: Targets, disk: &device::Disk) -> Result<(), InstallError> {
    rustix::fs::sync();
    drop(t);
    File::open(&disk.path)
        .and_then(|f| f.sync_all())
        .at(&disk.path, "fsync")?;
    Ok(())
}

/// `install.no-format`: the disk's partitions as they are, by their filesystem labels
/// (COS_OEM, COS_RECOVERY, COS_STATE, COS_PERSISTENT, the ESP's COS_GRUB) and the bios_grub
/// partition's GPT name; one [`Part`] per partition number (a gap is a nameless entry) with
/// its node. Refused, naming the key, when one the install needs is missing. Reads only.
pub fn existing_layout(
    ctx: &Ctx,
    disk: &device::Disk,
    firmware: efi::Firmware,
) -> Result<(Vec<Part>, Vec<PathBuf>), InstallError> {
    use std::os::unix::fs::FileExt;
    let refuse = |what: String| plan::PlanError {
        key: "install.no-format".into(),
        what: format!("{}: {what}", disk.path.display()),
    };
    let f = File::open(&disk.path).at(&disk.path, "opening")?;
    let mut read = |off: u64, len: usize| -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off)?;
        Ok(b)
    };
    let table = gpt::read_primary(disk.size / gpt::SECTOR, &mut read)
        .map_err(|e| refuse(format!("no partition table to use ({e})")))?;
    let slots = table.partitions();
    let mut parts = Vec::new();
    let mut nodes = Vec::new();
    let max = slots.iter().map(|s| s.number).max().unwrap_or(0);
    for n in 1..=max {
        let Some(slot) = slots.iter().find(|s| s.number == n) else {
            parts.push(Part {
                name: String::new(),
                label: String::new(),
                fs: None,
                first: 0,
                last: 0,
            });
            nodes.push(PathBuf::new());
            continue;
        };
        let node = device::wait_partition(ctx, disk, n, Duration::from_secs(5))?;
        let probe = kairos_init::probe::probe_path(&node).ok().flatten();
        let label = probe
            .as_ref()
            .and_then(|p| p.label.clone())
            .unwrap_or_default();
        let fs = probe.and_then(|p| plan::Fs::parse(p.fstype.name()));
        let name = match label.as_str() {
            l if l == labels::OEM => "oem".to_string(),
            l if l == labels::RECOVERY => "recovery".to_string(),
            l if l == labels::STATE => "state".to_string(),
            l if l == labels::PERSISTENT => "persistent".to_string(),
            l if l == labels::GRUB => "efi".to_string(),
            _ if matches!(
                slot.name.to_ascii_lowercase().as_str(),
                "bios" | "bios_grub"
            ) =>
            {
                "bios".to_string()
            }
            _ => slot.name.clone(),
        };
        parts.push(Part {
            name,
            label,
            fs,
            first: slot.first_lba,
            last: slot.last_lba,
        });
        nodes.push(node);
    }
    let mut need = vec![
        ("oem", labels::OEM),
        ("recovery", labels::RECOVERY),
        ("state", labels::STATE),
        ("persistent", labels::PERSISTENT),
    ];
    if firmware.has_bios() {
        need.push(("bios", "a GPT name bios"));
    }
    if firmware.has_efi() {
        need.push(("efi", labels::GRUB));
    }
    let missing: Vec<&str> = need
        .iter()
        .filter(|(n, _)| part_number(&parts, n).is_none())
        .map(|(_, l)| *l)
        .collect();
    if !missing.is_empty() {
        return Err(refuse(format!(
            "no partition with {}: it uses the disk's partitions as they are and makes none; nothing was written",
            missing.join(", ")
        ))
        .into());
    }
    for p in parts
        .iter()
        .filter(|p| p.label.starts_with("COS_") && p.name != "efi")
    {
        if p.fs.is_none() {
            return Err(refuse(format!(
                "{} is not ext2/3/4 or xfs; nothing was written",
                p.label
            ))
            .into());
        }
    }
    Ok((parts, nodes))
}

/// `install.no-format` over a deployment (COS_STATE:/cOS/active.img there) needs
/// `install.force`, as upstream.
pub fn refuse_deployment(t: &Targets, force: bool, disk: &Path) -> Result<(), InstallError> {
    let active = t.state.join("cOS/active.img");
    if active.exists() && !force {
        return Err(InstallError::HoldsKairos {
            device: disk.to_path_buf(),
            found: "install.no-format: COS_STATE:/cOS/active.img exists".to_string(),
        });
    }
    Ok(())
}

/// `oem 64 MiB (ext4), …, persistent 2000 MiB (ext4), data 100 MiB (xfs, DATA)`: the
/// layout for the log.
pub fn describe_layout(parts: &[Part]) -> String {
    parts
        .iter()
        .filter(|p| !matches!(p.name.as_str(), "bios" | "efi" | ""))
        .map(|p| {
            let mib = (p.last - p.first + 1) * gpt::SECTOR / MIB;
            let fs = p.fs.map_or("not formatted", |f| f.name());
            if p.label.is_empty() || p.label.starts_with("COS_") {
                format!("{} {mib} MiB ({fs})", p.name)
            } else {
                format!("{} {mib} MiB ({fs}, {})", p.name, p.label)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the checks found: the disk, the resolved source, the boot code and the layout.
struct Checked {
    disk: device::Disk,
    src: SourceImage,
    firmware: efi::Firmware,
    sizes: Sizes,
    parts: Vec<Part>,
    boot: BootCode,
    /// COS_OEM:/grubenv with `install.grub_options`.
    grubenv: GrubEnv,
    /// `install.no-format`: the existing partitions' nodes (nothing is partitioned).
    existing: Option<Vec<PathBuf>>,
    /// COS_OEM:/100_user_custom_mounts.yaml, for `install.bind_mounts` / `ephemeral_mounts`.
    custom_mounts: Option<String>,
}

/// COS_OEM:/grubenv of a new install: boot assessment's tries, and `install.grub_options`
/// as upstream writes them (`extra_cmdline`, `extra_active_cmdline`, `extra_passive_cmdline`,
/// `extra_recovery_cmdline`, `default_menu_entry`, … which grub.cfg reads). Boot assessment's
/// own variables are refused, as are values a grubenv cannot hold.
pub fn install_grubenv(
    options: &std::collections::BTreeMap<String, String>,
    entry_name: Option<&str>,
) -> Result<GrubEnv, InstallError> {
    let mut env = GrubEnv::default();
    env.set(var::MAX_TRIES, &DEFAULT_MAX_TRIES.to_string())
        .map_err(UpgradeError::from)?;
    // `install.grub-entry-name`: the entries' title (grub.cfg's default_menu_entry), unless
    // grub_options names one.
    if let Some(name) = entry_name.map(str::trim).filter(|n| !n.is_empty()) {
        if name.contains('\n') {
            return Err(plan::PlanError {
                key: "install.grub-entry-name".into(),
                what: "a grubenv value cannot hold a line break".into(),
            }
            .into());
        }
        env.set("default_menu_entry", name)
            .map_err(UpgradeError::from)?;
    }
    for (k, v) in options {
        let key = format!("install.grub_options.{k}");
        let bad = |what: String| plan::PlanError {
            key: key.clone(),
            what,
        };
        if k.starts_with("kairos_") || k == var::TENTATIVE {
            return Err(bad("boot assessment's own variable; not settable".into()).into());
        }
        if v.contains('\n') {
            return Err(bad("a grubenv value cannot hold a line break".into()).into());
        }
        env.set(k, v).map_err(|e| bad(e.to_string()))?;
    }
    // The grubenv is one 1024-byte block.
    env.to_block(Path::new("COS_OEM:/grubenv"))
        .map_err(|e| plan::PlanError {
            key: "install.grub_options".into(),
            what: e.to_string(),
        })?;
    Ok(env)
}

/// The file upstream writes for `install.bind_mounts` and `install.ephemeral_mounts`
/// (COS_OEM:/100_user_custom_mounts.yaml): a `rootfs` step writing them to
/// /run/cos/custom-layout.env as CUSTOM_BIND_MOUNTS / CUSTOM_EPHEMERAL_MOUNTS, which
/// kairos-init reads. None when both are empty. Paths must be absolute, without spaces (the
/// lists are space-separated).
pub fn custom_mounts_config(install: &config::Install) -> Result<Option<String>, InstallError> {
    if install.bind_mounts.is_empty() && install.ephemeral_mounts.is_empty() {
        return Ok(None);
    }
    let list = |key: &str, paths: &[String]| -> Result<String, InstallError> {
        for (i, p) in paths.iter().enumerate() {
            if !p.starts_with('/')
                || p.chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '\\')
            {
                return Err(plan::PlanError {
                    key: format!("install.{key}[{i}]"),
                    what: format!("{p:?}: an absolute path without spaces or quotes"),
                }
                .into());
            }
        }
        Ok(paths.join(" "))
    };
    let bind = list("bind_mounts", &install.bind_mounts)?;
    let ephemeral = list("ephemeral_mounts", &install.ephemeral_mounts)?;
    Ok(Some(format!(
        "#cloud-config\n# Written by kairos-agent install from install.bind_mounts and install.ephemeral_mounts.\nstages:\n  rootfs:\n    - name: user_custom_mounts\n      environment_file: /run/cos/custom-layout.env\n      environment:\n        CUSTOM_BIND_MOUNTS: \"{bind}\"\n        CUSTOM_EPHEMERAL_MOUNTS: \"{ephemeral}\"\n"
    )))
}

/// Its name on COS_OEM (upstream's).
pub const CUSTOM_MOUNTS_NAME: &str = "100_user_custom_mounts.yaml";

/// Phase 1, which writes nothing: `dev` is a whole disk nothing uses, the `--config` file
/// exists, the source resolves, the disk holds the layout it needs and GRUB is there for the
/// firmware.
fn check(
    ctx: &Ctx,
    opts: &Options,
    configured: &config::Install,
    dev: &Path,
    p: &mut Progress,
    log: &mut dyn Write,
) -> Result<Checked, InstallError> {
    p.step(&format!("checking {}", dev.display()), log);
    let disk = device::inspect(ctx, dev, false)?;
    device::check_unused(ctx, &disk)?;
    if let Some(c) = &opts.config
        && !c.is_file()
    {
        return Err(InstallError::Io(IoError::new(
            c.clone(),
            "reading the --config file",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )));
    }
    let given = opts
        .source
        .clone()
        .or(configured.source.clone())
        .unwrap_or_else(|| "dir:/".into());
    p.step(&format!("resolving the source {}", given.trim()), log);
    let src = SourceImage::resolve(ctx, &given, &ctx.path("/run/kairos"), log)?;
    if src.is_remote() {
        p.add_step();
    }
    let booted_efi = ctx.path("/sys/firmware/efi").exists();
    let firmware = opts.firmware.resolve(booted_efi);
    let s = sizes(src.image_size, firmware).configured(configured, src.image_size)?;
    let (parts, existing) = if configured.no_format {
        let (parts, nodes) = existing_layout(ctx, &disk, firmware)?;
        (parts, Some(nodes))
    } else {
        let parts = layout(disk.size, &s, firmware).ok_or_else(|| InstallError::TooSmall {
            device: disk.path.clone(),
            size_mib: disk.size / MIB,
            needed_mib: needed_mib(&s),
            parts: s.describe(),
            configured: s.configured,
        })?;
        (parts, None)
    };
    match firmware {
        efi::Firmware::Efi => writeln!(
            log,
            "install: firmware: UEFI ({}): an EFI system partition and GRUB x86_64-efi",
            if opts.firmware == efi::Firmware::Efi {
                "--firmware efi"
            } else {
                "this system booted UEFI"
            }
        )
        .map_err(InstallError::Output)?,
        efi::Firmware::Hybrid => writeln!(
            log,
            "install: firmware: BIOS and UEFI (a bios_grub partition and an ESP)"
        )
        .map_err(InstallError::Output)?,
        _ => writeln!(log, "install: firmware: BIOS").map_err(InstallError::Output)?,
    }
    let boot = find_boot_code(ctx, firmware, opts.grub_dir.as_deref(), &src, &disk.path)?;
    let grubenv = install_grubenv(
        &configured.grub_options,
        configured.grub_entry_name.as_deref(),
    )?;
    let custom_mounts = custom_mounts_config(configured)?;
    p.note(
        &format!(
            "{}: {} MiB; image {} MiB; {}",
            disk.path.display(),
            disk.size / MIB,
            src.image_size.div_ceil(MIB),
            describe_layout(&parts)
        ),
        log,
    );
    Ok(Checked {
        disk,
        src,
        firmware,
        sizes: s,
        parts,
        boot,
        grubenv,
        existing,
        custom_mounts,
    })
}

/// `kairos-agent install`: the phases of the module's doc, in order; nothing is written to
/// the disk before [`write_partitions`].
pub fn install(
    ctx: &Ctx,
    opts: &Options,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<Outcome, InstallError> {
    // One install, upgrade or reset at a time (lock.rs).
    let _system = crate::lock::system(ctx, "install").map_err(UpgradeError::from)?;
    let loaded = crate::sources::load(ctx, &LoadOptions::default());
    stages::report_load(&loaded, log).map_err(InstallError::Output)?;
    let (configured, sources) = install_config(ctx, opts, &loaded)?;
    let dev = match &opts.device {
        Some(d) => d.clone(),
        None => configured
            .device
            .as_deref()
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .ok_or(InstallError::NoDevice)?,
    };
    // Run by hand, a disk holding Kairos may be taken (install.auto decides before:
    // `auto_target`).
    let dev = resolve_device(
        ctx,
        dev,
        opts.allow_removable || configured.allow_removable,
        log,
    )?;
    let mut p = Progress::new("install", 8);

    // 1. Checks that write nothing.
    let Checked {
        disk,
        mut src,
        firmware,
        sizes: s,
        parts,
        boot,
        grubenv,
        existing,
        custom_mounts,
    } = check(ctx, opts, &configured, &dev, &mut p, log)?;

    // 2.
    run_hook(ctx, &loaded, &sources, "before-install", log)?;

    // 3. and 4. The partition table and the filesystems, mounted under /run/kairos/install;
    // with install.no-format the disk's own, mounted as they are.
    let (nodes, targets) = match existing {
        Some(nodes) => {
            p.step("using the disk's partitions (install.no-format)", log);
            p.step("mounting the filesystems", log);
            let targets = mount_targets(&parts, &nodes, &ctx.path(MOUNT_BASE))?;
            refuse_deployment(&targets, configured.force, &disk.path)?;
            (nodes, targets)
        }
        None => {
            p.step("writing the partition table", log);
            let nodes = write_partitions(ctx, &disk, &parts, log)?;
            p.step("making the filesystems", log);
            let targets = make_filesystems(&parts, &nodes, &ctx.path(MOUNT_BASE))?;
            (nodes, targets)
        }
    };

    // 5. The images; after-install-chroot in active.img before passive.img is its copy.
    let chroot_point = ctx.path("/run/kairos/install-chroot");
    // strict as run_hook decides it: a failed step stops the install (active.img removed).
    let strict = stages::strictness_over(&sources, &loaded);
    let size = deploy_images_with(&mut src, &targets, &mut p, log, &mut |img, log| {
        crate::upgrade::chroot::hook(
            img,
            &chroot_point,
            "after-install-chroot",
            &sources,
            strict.as_deref(),
            "install",
            log,
        )
    })?;

    // 6. GRUB's files, the environment, the config, the history.
    p.step("installing GRUB", log);
    let booted = upgrade::detect_booted(ctx).unwrap_or(Booted::Active);
    let line = upgrade::history_line(
        &kairos_util::time::rfc3339(kairos_util::time::now_ms()),
        "install",
        &src.origin,
        src.digest.as_deref(),
        booted,
        "active.img",
        size,
    );
    write_boot_files(&targets, &boot, opts.config.as_deref(), &line)?;
    write_oem_extras(&targets, &grubenv, custom_mounts.as_deref())?;
    // install.bundles into the new persistent paths (crate::bundles).
    crate::bundles::after_install(
        &loaded,
        opts.config.as_deref(),
        &targets.persistent,
        &targets.oem,
        log,
    )?;

    // 7. Boot code (BIOS: boot.img and core.img; UEFI: the ESP), then everything to disk.
    write_boot_code(&disk, &parts, &nodes, &boot, &targets)?;
    let origin = src.origin.clone();
    drop(src);
    finish(targets, &disk)?;
    drop(p);
    run_hook(ctx, &loaded, &sources, "after-install", log)?;
    writeln!(
        out,
        "kairos-agent: installed {} to {} ({} MiB: {}, oem, recovery, state {} MiB, persistent)",
        origin,
        disk.path.display(),
        disk.size / MIB,
        parts
            .iter()
            .take(firmware.boot_partitions().len())
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        s.state
    )
    .map_err(InstallError::Output)?;
    Ok(Outcome::Done)
}

/// The install block and the stages of an install: the `--config` file's (its install keys,
/// with this node's `install.device` and `install.source` when it names none) when given,
/// else this node's. The stages: this node's sources, then the `--config` file (unless it is
/// install.auto's copy of this node's merged config).
fn install_config(
    ctx: &Ctx,
    opts: &Options,
    loaded: &config::Loaded,
) -> Result<(config::Install, Vec<config::Source>), InstallError> {
    let node = loaded.merged.install.clone().unwrap_or_default();
    let mut sources = loaded.sources.clone();
    let Some(c) = opts.config.as_deref().filter(|c| c.is_file()) else {
        return Ok((node, sources));
    };
    let text = std::fs::read_to_string(c).at(c, "reading the --config file")?;
    let origin = c.display().to_string();
    let Some(given) =
        // Templates ({{ .MachineID }}, ...) rendered as the loader renders the node's files.
        config::parse_rendered(&origin, &text, false, &mut config::Renderer::new(ctx))?
    else {
        return Ok((node, sources));
    };
    let mut install = given.config.install.clone().unwrap_or_else(|| node.clone());
    if install.device.is_none() {
        install.device = node.device.clone();
    }
    if install.source.is_none() {
        install.source = node.source.clone();
    }
    if c != ctx.path(AUTO_CONFIG) {
        sources.push(given);
    }
    Ok((install, sources))
}

/// install.auto's copy of the merged cloud-config, installed as COS_OEM:/90_custom.yaml.
const AUTO_CONFIG: &str = "/run/kairos/auto-install.yaml";

/// Phase: COS_OEM:/grubenv with `install.grub_options`, and the custom mounts file.
pub fn write_oem_extras(
    t: &Targets,
    grubenv: &GrubEnv,
    custom_mounts: Option<&str>,
) -> Result<(), InstallError> {
    grubenv::write(&t.oem.join("grubenv"), grubenv).map_err(UpgradeError::from)?;
    if let Some(text) = custom_mounts {
        let to = t.oem.join(CUSTOM_MOUNTS_NAME);
        write_private(&to, text.as_bytes()).at(&to, "writing")?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o400))
            .at(&to, "setting the mode of")?;
    }
    Ok(())
}

/// `install.auto: true` on a live boot (upstream installs from live media only, so an
/// installed system booting with the same config does not install itself again): install to
/// `install.device` ([`auto_target`]) with the merged cloud-config copied to COS_OEM, then
/// reboot or power off as `install.reboot` / `install.poweroff` say. A refusal or failure is
/// said on the console too; nothing reboots then and the live system stays up.
/// None when nothing is to be done here.
pub fn auto_install(
    ctx: &Ctx,
    loaded: &config::Loaded,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Option<Result<Outcome, InstallError>> {
    let wanted = loaded.merged.install.as_ref().filter(|i| i.auto)?;
    if ctx.mode() != Some("live") {
        let _ = writeln!(
            log,
            "kairos-agent: install.auto ignored: booted {} (auto-install runs from live media only)",
            ctx.mode().unwrap_or("unknown")
        );
        return None;
    }
    let finish = Finish::from_config(wanted);
    let r = (|| {
        let target = auto_target(ctx, wanted, log)?;
        let conf = ctx.path(AUTO_CONFIG);
        let text = cloud_config_text(&loaded.raw_as_written).map_err(InstallError::Serialize)?;
        write_private(&conf, text.as_bytes()).at(&conf, "writing")?;
        crate::console::say(
            ctx,
            log,
            &format!(
                "kairos-agent: install.auto: installing to {}",
                target.display()
            ),
        );
        let opts = Options {
            device: Some(target),
            config: Some(conf),
            ..Options::default()
        };
        install_then(ctx, &opts, "install.auto", finish, out, log)
    })();
    if let Err(e) = &r {
        crate::console::say(
            ctx,
            log,
            &format!("kairos-agent: install.auto: {e}; the live system stays up"),
        );
    }
    Some(r)
}

/// The one decision of `--device auto` as a person asks for it (install, manual-install, a
/// pairing request): `dev` itself unless it is `auto`; else, as upstream, the largest whole
/// disk nothing uses ([`device::pick_auto`]): never the live medium, removable and USB disks
/// only with `removable`; a disk holding Kairos may be taken (the log says it is replaced),
/// unlike install.auto's [`auto_target`].
pub fn resolve_device(
    ctx: &Ctx,
    dev: PathBuf,
    removable: bool,
    log: &mut dyn Write,
) -> Result<PathBuf, InstallError> {
    if dev.as_os_str() != "auto" {
        return Ok(dev);
    }
    let policy = device::AutoPolicy {
        removable,
        kairos: true,
    };
    let (picked, seen) = device::pick_auto(ctx, policy)?;
    writeln!(log, "install: device auto: {}", picked.display()).map_err(InstallError::Output)?;
    if !seen.kairos.is_empty() {
        writeln!(
            log,
            "install: {} holds a Kairos installation ({}); it is replaced",
            picked.display(),
            seen.kairos.join(", ")
        )
        .map_err(InstallError::Output)?;
    }
    Ok(picked)
}

/// The disk `install.auto` installs to: `install.device`, or for `auto` (also when it is
/// unset, as upstream: the live ISO's install entry passes only `install.auto=true`) the
/// pick of [`device::pick_auto`] (never the live medium; removable and USB disks only with
/// `install.allow-removable`). Without `install.force`, a disk that already holds a Kairos
/// installation (a COS_STATE or COS_PERSISTENT on it) is refused
/// ([`InstallError::HoldsKairos`]), before anything is written.
pub fn auto_target(
    ctx: &Ctx,
    wanted: &config::Install,
    log: &mut dyn Write,
) -> Result<PathBuf, InstallError> {
    let dev = match wanted.device.as_deref().map(str::trim) {
        Some(d) if !d.is_empty() => d,
        // install.no-format installs onto the partitions of a named disk: no guessing.
        _ if wanted.no_format => return Err(InstallError::NoDevice),
        _ => "auto",
    };
    let (path, found) = if dev == "auto" {
        let policy = device::AutoPolicy {
            removable: wanted.allow_removable,
            kairos: wanted.force,
        };
        let (path, seen) = device::pick_auto(ctx, policy)?;
        writeln!(log, "install: device auto: {}", path.display()).map_err(InstallError::Output)?;
        (path, seen.kairos)
    } else {
        let path = PathBuf::from(dev);
        let disk = device::inspect(ctx, &path, false)?;
        let found = device::installed_labels(ctx, &disk);
        (path, found)
    };
    // install.no-format needs the COS_ partitions; install() refuses a deployment on them
    // without install.force.
    if found.is_empty() || wanted.no_format {
        return Ok(path);
    }
    if !wanted.force {
        return Err(InstallError::HoldsKairos {
            device: path,
            found: found.join(", "),
        });
    }
    writeln!(
        log,
        "kairos-agent: install.auto: install.force: true: installing over the Kairos installation on {} ({})",
        path.display(),
        found.join(", ")
    ).map_err(InstallError::Output)?;
    Ok(path)
}

/// `kairos-agent manual-install CONFIG`'s options (upstream's flags: --device, --source,
/// --reboot, --poweroff).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ManualOptions {
    /// The cloud-config to install with (COS_OEM:/90_custom.yaml, mode 0600)
    #[arg(value_name = "CONFIG")]
    pub config: PathBuf,
    /// The whole disk to install to (everything on it is lost), or `auto` [default: CONFIG's
    /// install.device, else this node's, else auto]
    #[arg(long, value_name = "DEV")]
    pub device: Option<PathBuf>,
    /// As for install [default: CONFIG's install.source, else this node's, else dir:/]
    #[arg(long, value_name = "SRC")]
    pub source: Option<String>,
    /// Reboot when done (also with install.reboot in CONFIG)
    #[arg(long)]
    pub reboot: bool,
    /// Power off when done (also with install.poweroff in CONFIG)
    #[arg(long)]
    pub poweroff: bool,
    /// Boot code to install
    #[arg(long, value_enum, default_value_t)]
    pub firmware: efi::Firmware,
}

/// Upstream's `manual-install`: [`install`] with CONFIG as the cloud-config, its
/// `install.device` / `install.source` / `install.reboot` / `install.poweroff` as defaults
/// for the flags, `auto` when nothing names a disk (removable and USB disks with CONFIG's or
/// this node's `install.allow-removable`); then reboot or power off.
pub fn manual_install(
    ctx: &Ctx,
    opts: &ManualOptions,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<Outcome, InstallError> {
    let c = &opts.config;
    let text = std::fs::read_to_string(c).at(c, "reading the config")?;
    let origin = c.display().to_string();
    let parsed = config::parse_rendered(&origin, &text, true, &mut config::Renderer::new(ctx))?
        .ok_or_else(|| InstallError::NoHeader {
            origin: origin.clone(),
        })?;
    let given = parsed.config.install.unwrap_or_default();
    let node = crate::sources::load(ctx, &LoadOptions::default())
        .merged
        .install
        .unwrap_or_default();
    let named = |d: &Option<String>| {
        d.as_deref()
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    };
    let device = opts
        .device
        .clone()
        .or_else(|| named(&given.device))
        .or_else(|| named(&node.device))
        .unwrap_or_else(|| PathBuf::from("auto"));
    let allow_removable = given.allow_removable || node.allow_removable;
    let device = resolve_device(ctx, device, allow_removable, log)?;
    let install_opts = Options {
        device: Some(device),
        source: opts
            .source
            .clone()
            .or(given.source)
            .filter(|s| !s.trim().is_empty()),
        config: Some(c.clone()),
        grub_dir: None,
        firmware: opts.firmware,
        allow_removable,
    };
    let finish = Finish {
        reboot: opts.reboot || given.reboot,
        poweroff: opts.poweroff || given.poweroff,
        hold: false,
    };
    install_then(ctx, &install_opts, "manual-install", finish, out, log)
}

/// A merged cloud-config as text for a file: JSON is YAML, the header makes it a cloud-config.
pub fn cloud_config_text(
    raw: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, serde_json::Error> {
    Ok(format!(
        "#cloud-config\n{}\n",
        serde_json::to_string_pretty(raw)?
    ))
}

/// Writes `path` for root only (the file 0600, a directory it has to create 0700): install
/// configs carry tokens and passwords, like k3s's config.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

/// What follows a finished unattended install (install.auto, pairing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Finish {
    pub reboot: bool,
    pub poweroff: bool,
    /// Neither, whatever was asked (`--no-reboot`).
    pub hold: bool,
}

impl Finish {
    /// `install.reboot` / `install.poweroff`.
    pub fn from_config(i: &config::Install) -> Finish {
        Finish {
            reboot: i.reboot,
            poweroff: i.poweroff,
            hold: false,
        }
    }

    /// What reboot(2) is asked for: power off wins over reboot; none when held.
    pub fn command(self) -> Option<rustix::system::RebootCommand> {
        if self.hold {
            None
        } else if self.poweroff {
            Some(rustix::system::RebootCommand::PowerOff)
        } else if self.reboot {
            Some(rustix::system::RebootCommand::Restart)
        } else {
            None
        }
    }
}

/// [`install`], then power off or reboot as `finish` says; `who` names the caller in the log.
pub fn install_then(
    ctx: &Ctx,
    opts: &Options,
    who: &str,
    finish: Finish,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<Outcome, InstallError> {
    let done = install(ctx, opts, out, log)?;
    if !matches!(done, Outcome::Done) {
        return Ok(done);
    }
    writeln!(
        log,
        "kairos-agent: {who}: installed to {}",
        opts.device.as_deref().map_or_else(
            || "install.device's disk".into(),
            |d| d.display().to_string()
        )
    )
    .map_err(InstallError::Output)?;
    let (what, cmd) = if finish.poweroff {
        ("powering off", rustix::system::RebootCommand::PowerOff)
    } else if finish.reboot {
        ("rebooting", rustix::system::RebootCommand::Restart)
    } else {
        writeln!(
            log,
            "kairos-agent: {who}: done; reboot to use the new system"
        )
        .map_err(InstallError::Output)?;
        return Ok(Outcome::Done);
    };
    if finish.hold {
        writeln!(
            log,
            "kairos-agent: {who}: done; {} was asked for, but --no-reboot: not {what}",
            if finish.poweroff {
                "poweroff"
            } else {
                "reboot"
            },
        )
        .map_err(InstallError::Output)?;
        return Ok(Outcome::Done);
    }
    writeln!(log, "kairos-agent: {who}: done; {what}").map_err(InstallError::Output)?;
    log.flush().map_err(InstallError::Output)?;
    rustix::fs::sync();
    rustix::system::reboot(cmd).map_err(|e| InstallError::Reboot {
        what,
        err: e.into(),
    })?;
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_roots_squashfs_is_found_through_its_loop_device() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        let ctx = Ctx::new(r, "/oem/grubenv");
        let put = |rel: &str, data: &[u8]| {
            let p = r.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, data).expect("write");
        };
        put("run/initramfs/live/rootfs.squashfs", b"hsqs and the rest");
        put(
            "sys/block/loop0/loop/backing_file",
            b"/run/initramfs/live/rootfs.squashfs\n",
        );
        put(
            "proc/self/mounts",
            b"rootfs / rootfs rw 0 0\n/dev/loop0 / squashfs ro 0 0\n/dev/sr0 /run/initramfs/live iso9660 ro 0 0\n",
        );
        assert_eq!(
            running_root_squashfs(&ctx),
            Some(r.join("run/initramfs/live/rootfs.squashfs"))
        );
        // An ext4 image on a loop device (active, passive) is not one.
        put(
            "run/initramfs/live/rootfs.squashfs",
            b"\x53\xef not squashfs",
        );
        assert_eq!(running_root_squashfs(&ctx), None);
        // Nor a root on a disk partition.
        put("proc/self/mounts", b"/dev/vda2 / ext4 rw 0 0\n");
        assert_eq!(running_root_squashfs(&ctx), None);
    }

    #[test]
    fn sizes_follow_the_spec() {
        let s = sizes(100 * MIB + 1, efi::Firmware::Bios);
        assert_eq!(
            s,
            Sizes {
                boot: 1,
                oem: 64,
                recovery: 2 * 101 + 200,
                state: 3 * 101 + 1000,
                persistent: 0,
                persistent_min: 64,
                fs: plan::KairosFs::default(),
                extras: Vec::new(),
                configured: false,
            }
        );
        assert_eq!(needed_mib(&s), 1 + 64 + 402 + 1303 + 64 + 2);
    }

    #[test]
    fn layout_is_aligned_and_fills_the_disk() {
        let s = sizes(50 * MIB, efi::Firmware::Bios);
        let need = needed_mib(&s);
        let bios = efi::Firmware::Bios;
        assert!(layout((need - 1) * MIB, &s, bios).is_none());
        let size = 4096 * MIB;
        let l = layout(size, &s, bios).unwrap();
        let names: Vec<&str> = l.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["bios", "oem", "recovery", "state", "persistent"]);
        assert_eq!((l[0].first, l[0].last), (2048, 4095));
        for w in l.windows(2) {
            assert_eq!(w[0].last + 1, w[1].first);
            assert_eq!(w[1].first % 2048, 0);
        }
        assert_eq!(l[3].last - l[3].first + 1, s.state * 2048);
        assert_eq!(l[4].last, size / 512 - 34);
        // Exactly the minimum fits, and the GPT accepts it.
        let l = layout(need * MIB, &s, bios).unwrap();
        assert!(l[4].last - l[4].first + 1 >= s.persistent_min * 2048);
        let parts: Vec<gpt::Partition> = l
            .iter()
            .map(|p| gpt::Partition {
                name: p.name.clone(),
                type_guid: gpt::LINUX_FS.into(),
                guid: [1; 16],
                first_lba: p.first,
                last_lba: p.last,
            })
            .collect();
        gpt::build(need * MIB / 512, [2; 16], &parts).unwrap();
    }

    #[test]
    fn the_efi_layout_starts_with_a_64_mib_esp() {
        let s = sizes(50 * MIB, efi::Firmware::Efi);
        assert_eq!(
            needed_mib(&s),
            needed_mib(&sizes(50 * MIB, efi::Firmware::Bios)) + 63
        );
        let size = 4096 * MIB;
        let l = layout(size, &s, efi::Firmware::Efi).unwrap();
        let names: Vec<&str> = l.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["efi", "oem", "recovery", "state", "persistent"]);
        assert_eq!(l[0].label, "COS_GRUB");
        assert_eq!((l[0].first, l[0].last), (2048, 2048 + 64 * 2048 - 1));
        assert_eq!(l[3].label, labels::STATE);
        for w in l.windows(2) {
            assert_eq!(w[0].last + 1, w[1].first);
        }
        assert!(layout((needed_mib(&s) - 1) * MIB, &s, efi::Firmware::Efi).is_none());
    }

    #[test]
    fn the_hybrid_layout_has_both_boot_partitions_and_state_is_5() {
        let fw = efi::Firmware::Hybrid;
        let s = sizes(50 * MIB, fw);
        assert_eq!(s.boot, 65);
        let l = layout(4096 * MIB, &s, fw).unwrap();
        let names: Vec<&str> = l.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["bios", "efi", "oem", "recovery", "state", "persistent"]
        );
        assert_eq!((l[0].first, l[0].last), (2048, 4095));
        assert_eq!((l[1].first, l[1].last), (4096, 4096 + 64 * 2048 - 1));
        assert_eq!(part_number(&l, "state"), Some(5));
        assert_eq!(grub_prefix(&l), "(hd0,gpt5)/grub2");
        let bios = layout(
            4096 * MIB,
            &sizes(50 * MIB, efi::Firmware::Bios),
            efi::Firmware::Bios,
        )
        .unwrap();
        assert_eq!(grub_prefix(&bios), "(hd0,gpt4)/grub2");
        assert!(layout((needed_mib(&s) - 1) * MIB, &s, fw).is_none());
    }

    fn install_block(yaml: &str) -> config::Install {
        let text: String = yaml.lines().map(|l| format!("  {l}\n")).collect();
        config::parse("t.yaml", &format!("install:\n{text}"), false)
            .expect("parses")
            .expect("config")
            .config
            .install
            .expect("install")
    }

    #[test]
    fn install_grub_options_go_to_the_oem_grubenv_that_grub_cfg_reads() {
        let i = install_block(
            "grub_options:\n  extra_cmdline: console=ttyS1 kt.a=1\n  extra_active_cmdline: kt.active=1\n  extra_passive_cmdline: kt.passive=1\n  extra_recovery_cmdline: kt.rec=1\n  default_menu_entry: My OS\n",
        );
        let env = install_grubenv(&i.grub_options, None).expect("env");
        assert_eq!(env.get(var::MAX_TRIES), Some("3"));
        assert_eq!(env.get("extra_cmdline"), Some("console=ttyS1 kt.a=1"));
        assert_eq!(env.get("default_menu_entry"), Some("My OS"));
        // Every variable upstream documents is one grub.cfg uses.
        let cfg = grub_cfg(&GrubCfgOptions::default());
        for (k, _) in env.iter().filter(|(k, _)| *k != var::MAX_TRIES) {
            assert!(
                cfg.contains(&format!("${{{k}}}")),
                "grub.cfg does not read {k}"
            );
        }
        // Written where grub.cfg loads it from: COS_OEM:/grubenv.
        let t = tempfile::tempdir().expect("tempdir");
        let targets = Targets {
            _mounts: Mounts(Vec::new()),
            oem: t.path().to_path_buf(),
            recovery: t.path().join("r"),
            state: t.path().join("s"),
            persistent: t.path().join("p"),
        };
        write_oem_extras(&targets, &env, None).expect("write");
        let back = grubenv::read(&t.path().join("grubenv")).expect("read");
        assert_eq!(back.get("extra_active_cmdline"), Some("kt.active=1"));
        assert!(cfg.contains("(${oem})/grubenv"));
        // Boot assessment's own variables and values a grubenv cannot hold are refused.
        for (yaml, key) in [
            (
                "grub_options:\n  kairos_tries_cos: 0\n",
                "install.grub_options.kairos_tries_cos",
            ),
            (
                "grub_options:\n  bad name: x\n",
                "install.grub_options.bad name",
            ),
            (
                "grub_options:\n  extra_cmdline: \"a\\nb\"\n",
                "install.grub_options.extra_cmdline",
            ),
        ] {
            let e = install_grubenv(&install_block(yaml).grub_options, None)
                .expect_err(yaml)
                .to_string();
            assert!(e.starts_with(&format!("{key}: ")), "{e}");
        }
        let big = format!("grub_options:\n  extra_cmdline: {}\n", "x".repeat(1100));
        let e = install_grubenv(&install_block(&big).grub_options, None)
            .expect_err("too big")
            .to_string();
        assert!(e.starts_with("install.grub_options: "), "{e}");
        // install.grub-entry-name titles the entries, unless grub_options names a title.
        let i = install_block("grub-entry-name: Edge OS\n");
        let env = install_grubenv(&i.grub_options, i.grub_entry_name.as_deref()).expect("env");
        assert_eq!(env.get("default_menu_entry"), Some("Edge OS"));
        assert!(cfg.contains("set menu_title=\"${default_menu_entry}\""));
        let i =
            install_block("grub-entry-name: Edge OS\ngrub_options:\n  default_menu_entry: Mine\n");
        let env = install_grubenv(&i.grub_options, i.grub_entry_name.as_deref()).expect("env");
        assert_eq!(env.get("default_menu_entry"), Some("Mine"));
    }

    #[test]
    fn install_reboot_and_poweroff_decide_what_follows_the_install() {
        use rustix::system::RebootCommand as C;
        let f = |yaml: &str| Finish::from_config(&install_block(yaml)).command();
        assert_eq!(f("reboot: true\n"), Some(C::Restart));
        assert_eq!(f("poweroff: true\n"), Some(C::PowerOff));
        assert_eq!(f("reboot: true\npoweroff: true\n"), Some(C::PowerOff));
        assert_eq!(f("auto: true\n"), None);
        let held = Finish {
            hold: true,
            ..Finish::from_config(&install_block("reboot: true\n"))
        };
        assert_eq!(held.command(), None);
    }

    #[test]
    fn install_bind_and_ephemeral_mounts_reach_the_layout_kairos_init_reads() {
        let i = install_block(
            "bind_mounts:\n  - /var/lib/data\n  - /opt/app\nephemeral_mounts: [/var/cache/tmp]\n",
        );
        let text = custom_mounts_config(&i).expect("ok").expect("a file");
        // The file on COS_OEM is a cloud-config whose rootfs step writes the layout file.
        let t = crate::testutil::Tree::new();
        let src = config::parse(CUSTOM_MOUNTS_NAME, &text, true)
            .expect("parses")
            .expect("has the header");
        let report = stages::run(&t.ctx, "rootfs", &[src], &mut Vec::new());
        assert!(report.ok() && report.ran == 1, "{report:?}");
        let env_path = t.ctx.path("/run/cos/custom-layout.env");
        let vars = kairos_init::layout::read_env(&env_path).expect("layout file");
        let (layout, warnings) = kairos_init::layout::Layout::apply(
            kairos_init::layout::Layout::kairos_default(),
            &[(env_path, vars)],
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(layout.custom_bind_mounts, ["/var/lib/data", "/opt/app"]);
        assert_eq!(layout.custom_ephemeral_mounts, ["/var/cache/tmp"]);
        assert_eq!(
            custom_mounts_config(&config::Install::default()).expect("ok"),
            None
        );
        let e = custom_mounts_config(&install_block("bind_mounts: [relative/path]\n"))
            .expect_err("refused")
            .to_string();
        assert!(
            e.starts_with("install.bind_mounts[0]: \"relative/path\""),
            "{e}"
        );
        let e = custom_mounts_config(&install_block("ephemeral_mounts: [/ok, \"/a b\"]\n"))
            .expect_err("refused")
            .to_string();
        assert!(e.starts_with("install.ephemeral_mounts[1]"), "{e}");
    }

    #[test]
    fn configured_partitions_make_the_layout() {
        let fw = efi::Firmware::Bios;
        let i = install_block(
            "partitions:\n  oem: {size: 96}\n  state: {size: 1500}\n  persistent: {size: 0, fs: xfs}\nextra-partitions:\n  - {name: kt_extra, size: 128, fs: ext4, label: KT_EXTRA}\n  - {name: raw, size: 8}\n",
        );
        let s = sizes(100 * MIB, fw).configured(&i, 100 * MIB).expect("ok");
        assert!(s.configured);
        let size = 4096 * MIB;
        let l = layout(size, &s, fw).expect("fits");
        let names: Vec<&str> = l.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bios",
                "oem",
                "recovery",
                "state",
                "persistent",
                "kt_extra",
                "raw"
            ]
        );
        let mib = |p: &Part| (p.last - p.first + 1) / 2048;
        assert_eq!(mib(&l[1]), 96);
        assert_eq!(mib(&l[3]), 1500);
        assert_eq!(mib(&l[5]), 128);
        assert_eq!(mib(&l[6]), 8);
        assert_eq!(l[4].fs, Some(plan::Fs::Xfs));
        assert_eq!(
            (l[5].label.as_str(), l[5].fs),
            ("KT_EXTRA", Some(plan::Fs::Ext4))
        );
        assert_eq!((l[6].label.as_str(), l[6].fs), ("", None));
        // Persistent takes the rest; the extras keep their alignment and the last one ends at
        // the backup GPT's edge at most.
        for w in l.windows(2) {
            assert_eq!(w[0].last + 1, w[1].first);
            assert_eq!(w[1].first % 2048, 0);
        }
        assert!(l[6].last <= size / 512 - 34);
        assert_eq!(
            mib(&l[4]),
            4096 - 1 - 1 - 96 - s.recovery - 1500 - 128 - 8 - 1
        );
        // An extra partition takes the rest when persistent has a size: it is last.
        let i = install_block(
            "partitions:\n  persistent: {size: 500}\nextra-partitions:\n  - {name: big, size: 0, fs: ext4}\n",
        );
        let s = sizes(100 * MIB, fw).configured(&i, 100 * MIB).expect("ok");
        let l = layout(size, &s, fw).expect("fits");
        assert_eq!(mib(&l[4]), 500);
        assert_eq!(l[5].last, size / 512 - 34);
        // More than the disk: refused before anything is written, naming the keys.
        let i = install_block("partitions:\n  state: {size: 4000}\n");
        let s = sizes(100 * MIB, fw).configured(&i, 100 * MIB).expect("ok");
        assert!(layout(size, &s, fw).is_none());
        let e = InstallError::TooSmall {
            device: "/dev/vdb".into(),
            size_mib: 4096,
            needed_mib: needed_mib(&s),
            parts: s.describe(),
            configured: s.configured,
        }
        .to_string();
        assert!(
            e.contains("state 4000 + persistent at least 64 MiB")
                && e.contains("with the sizes of install.partitions / install.extra-partitions"),
            "{e}"
        );
        // The state partition must hold active, passive and an upgrade's transition image.
        let e = sizes(100 * MIB, fw)
            .configured(
                &install_block("partitions:\n  state: {size: 300}\n"),
                100 * MIB,
            )
            .expect_err("too small")
            .to_string();
        assert!(
            e.starts_with("install.partitions.state.size: 300 MiB is less than the 364 MiB"),
            "{e}"
        );
    }

    /// Needs root and loop devices, like kairos-build raw (which runs the same phases).
    #[test]
    fn no_format_uses_the_labelled_partitions_and_needs_force_over_an_installation() {
        let t = tempfile::tempdir().expect("tempdir");
        let file = t.path().join("disk.img");
        File::create(&file)
            .and_then(|f| f.set_len(200 * MIB))
            .expect("disk file");
        let lo = kairos_init::sys::loopdev::attach(Path::new("/dev"), &file, false)
            .expect("a loop device (root)");
        let ctx = Ctx::new("/", "/oem/grubenv");
        let disk = device::inspect(&ctx, &lo.path, false).expect("inspect");
        let fw = efi::Firmware::Bios;
        let mut s = sizes(MIB, fw);
        (s.oem, s.recovery, s.state, s.persistent_min) = (16, 16, 32, 16);
        let parts = layout(disk.size, &s, fw).expect("fits");
        let result = (|| {
            let nodes = write_partitions(&ctx, &disk, &parts, &mut Vec::new())?;
            drop(make_filesystems(&parts, &nodes, &t.path().join("made"))?);
            // What install.no-format finds: the same partitions, by their labels.
            let (found, nodes) = existing_layout(&ctx, &disk, fw)?;
            let names: Vec<&str> = found.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["bios", "oem", "recovery", "state", "persistent"]);
            assert_eq!(found[3].label, labels::STATE);
            assert_eq!(found[3].fs, Some(plan::Fs::Ext4));
            assert_eq!(
                (found[3].first, found[3].last),
                (parts[3].first, parts[3].last)
            );
            // UEFI boot code needs an ESP the disk does not have: refused, naming the key.
            let e = existing_layout(&ctx, &disk, efi::Firmware::Efi)
                .expect_err("no ESP")
                .to_string();
            assert!(
                e.starts_with(&format!(
                    "install.no-format: {}: no partition with COS_GRUB",
                    disk.path.display()
                )),
                "{e}"
            );
            // Mounted as they are; a deployment on them needs install.force.
            let targets = mount_targets(&found, &nodes, &t.path().join("used"))?;
            assert!(refuse_deployment(&targets, false, &disk.path).is_ok());
            std::fs::create_dir_all(targets.state.join("cOS")).expect("mkdir");
            std::fs::write(targets.state.join("cOS/active.img"), "old").expect("write");
            let e = refuse_deployment(&targets, false, &disk.path)
                .expect_err("a deployment")
                .to_string();
            assert!(
                e.contains("install.no-format: COS_STATE:/cOS/active.img exists")
                    && e.contains("without install.force: true"),
                "{e}"
            );
            assert!(refuse_deployment(&targets, true, &disk.path).is_ok());
            drop(targets);
            Ok::<(), InstallError>(())
        })();
        let numbers: Vec<u32> = (1..=parts.len() as u32).collect();
        if let Ok(f) = File::open(&lo.path) {
            let _ = device::remove_partitions(&f, &lo.path, &numbers);
        }
        drop(lo);
        result.expect("the phases");
    }

    #[test]
    fn an_image_without_what_reset_needs_is_named() {
        let t = tempfile::tempdir().expect("temp dir");
        assert_eq!(reset_tools_missing(t.path()), ["mkfs.ext4", "e2label"]);
        // Symlinks count whatever they point at (absolute links point into the image).
        std::fs::create_dir_all(t.path().join("sbin")).expect("mkdir");
        std::os::unix::fs::symlink("/sbin/mke2fs", t.path().join("sbin/mkfs.ext4"))
            .expect("symlink");
        assert_eq!(reset_tools_missing(t.path()), ["e2label"]);
        std::fs::create_dir_all(t.path().join("usr/sbin")).expect("mkdir");
        std::fs::write(t.path().join("usr/sbin/tune2fs"), "").expect("write");
        assert!(reset_tools_missing(t.path()).is_empty());
    }

    #[test]
    fn the_no_grub_efi_refusal_names_the_directory_and_the_device() {
        let e = InstallError::NoGrubEfi {
            device: "/dev/vdb".into(),
        }
        .to_string();
        assert!(
            e.starts_with("no GRUB for UEFI: /usr/lib/grub/x86_64-efi/kernel.img")
                && e.contains("nothing was written to /dev/vdb"),
            "{e}"
        );
    }

    #[test]
    fn refusals_name_the_device_and_write_nothing() {
        let t = crate::testutil::Tree::new();
        let img = t.ctx.path("/disk.img");
        std::fs::write(&img, vec![7u8; 8192]).unwrap();
        let opts = Options {
            device: Some(img.clone()),
            ..Options::default()
        };
        let (r, _, _) = crate::testutil::run(|o, e| install(&t.ctx, &opts, o, e));
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("disk.img")
                && e.contains("not a block device")
                && e.contains("nothing was written"),
            "{e}"
        );
        assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; 8192]);
        let (r, _, _) = crate::testutil::run(|o, e| install(&t.ctx, &Options::default(), o, e));
        assert!(matches!(r, Err(InstallError::NoDevice)), "{r:?}");
        // install.device from the cloud-config when --device is not given.
        t.file(
            "/oem/90_custom.yaml",
            "#cloud-config\ninstall:\n  device: /nonexistent-disk\n",
        );
        let (r, _, _) = crate::testutil::run(|o, e| install(&t.ctx, &Options::default(), o, e));
        let e = r.unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent-disk: cannot stat it"), "{e}");
        let e = InstallError::TooSmall {
            device: "/dev/vdb".into(),
            size_mib: 100,
            needed_mib: 1500,
            parts: "oem 64 + recovery 300 + state 1100 + persistent at least 64 MiB".into(),
            configured: false,
        }
        .to_string();
        assert!(
            e.starts_with("/dev/vdb: 100 MiB is too small: this source needs at least 1500 MiB"),
            "{e}"
        );
    }

    #[test]
    fn auto_install_runs_on_live_boots_only() {
        let t = tempfile::tempdir().expect("temp dir");
        let ctx = Ctx::new(t.path(), "/oem/grubenv");
        let put = |rel: &str, text: &str| {
            let p = ctx.path(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("dir");
            std::fs::write(p, text).expect("write");
        };
        let (mut out, mut log) = (Vec::new(), Vec::new());
        // No install.auto: nothing to do, whatever the mode.
        put("/run/cos/live_mode", "");
        let loaded = crate::sources::load(&ctx, &LoadOptions::default());
        assert!(auto_install(&ctx, &loaded, &mut out, &mut log).is_none());
        // install.auto on an installed system: ignored, and said so.
        put(
            "/oem/90_install.yaml",
            "#cloud-config\ninstall:\n  auto: true\n  device: /dev/nothing-here\n",
        );
        std::fs::remove_file(ctx.path("/run/cos/live_mode")).expect("rm");
        put("/run/cos/active_mode", "");
        let loaded = crate::sources::load(&ctx, &LoadOptions::default());
        assert!(auto_install(&ctx, &loaded, &mut out, &mut log).is_none());
        assert!(String::from_utf8_lossy(&log).contains("install.auto ignored: booted active"));
        // Live: it installs, here to a device that does not exist: a named error, on the
        // console too, before anything is written.
        std::fs::remove_file(ctx.path("/run/cos/active_mode")).expect("rm");
        put("/run/cos/live_mode", "");
        put("/dev/console", "");
        let loaded = crate::sources::load(&ctx, &LoadOptions::default());
        let e = auto_install(&ctx, &loaded, &mut out, &mut log)
            .expect("live + auto installs")
            .expect_err("no such device");
        assert!(e.to_string().contains("/dev/nothing-here"), "{e}");
        let console = std::fs::read_to_string(ctx.path("/dev/console")).expect("console");
        assert!(
            console.starts_with("kairos-agent: install.auto: /dev/nothing-here: cannot stat it")
                && console.ends_with("; the live system stays up\n"),
            "{console}"
        );
        assert!(!ctx.path("/run/kairos/auto-install.yaml").exists());
    }

    /// A fake machine booted live: an installed disk `testdisk` (a name no test host has:
    /// `auto` returns /dev paths outside the fake root) with install.auto and device auto.
    fn installed_machine(force: bool) -> device::fake::Fake {
        use device::fake::{Fake, PCI};
        let f = Fake::new();
        f.disk(PCI, "testdisk", (240, 0), 8, false);
        f.part(PCI, "testdisk", 4, (240, 4), "state");
        f.ext4("testdisk5", "COS_PERSISTENT");
        f.part(PCI, "testdisk", 5, (240, 5), "persistent");
        f.t.file("/run/cos/live_mode", "");
        f.t.file("/dev/console", "");
        f.t.file(
            "/run/initramfs/live/config.yaml",
            format!(
                "#cloud-config\ninstall:\n  auto: true\n  device: auto\n  poweroff: true\n  force: {force}\n"
            ),
        );
        f
    }

    #[test]
    fn auto_install_refuses_a_disk_holding_kairos_and_says_so() {
        let f = installed_machine(false);
        let ctx = &f.t.ctx;
        let loaded = crate::sources::load(ctx, &LoadOptions::default());
        let (r, _, log) =
            crate::testutil::run(|o, e| auto_install(ctx, &loaded, o, e).expect("auto"));
        let e = r.expect_err("refused");
        assert!(matches!(e, InstallError::HoldsKairos { .. }), "{e:?}");
        let want = "kairos-agent: install.auto: /dev/testdisk already holds a Kairos installation (COS_STATE on /dev/testdisk4, COS_PERSISTENT on /dev/testdisk5): not installing over it without install.force: true; nothing was written; the live system stays up\n";
        assert_eq!(
            std::fs::read_to_string(ctx.path("/dev/console")).expect("console"),
            want
        );
        assert!(log.ends_with(want), "{log}");
        assert!(!ctx.path("/run/kairos/auto-install.yaml").exists());
    }

    #[test]
    fn the_iso_install_entry_alone_picks_the_disk_as_device_auto() {
        use device::fake::{Fake, PCI};
        let f = Fake::new();
        f.disk(PCI, "testdisk", (240, 0), 8, false);
        f.t.file("/run/cos/live_mode", "");
        f.t.file("/dev/console", "");
        // No config anywhere: only what the ISO's "install" menu entry puts on the command line.
        f.t.file(
            "/proc/cmdline",
            format!(
                "root=live:CDLABEL=COS_LIVE {}\n",
                kairos_init::grubcfg::LIVE_INSTALL_ARGS
            ),
        );
        let ctx = &f.t.ctx;
        let loaded = crate::sources::load(ctx, &LoadOptions::default());
        let wanted = loaded
            .merged
            .install
            .clone()
            .expect("install block from the command line");
        assert!(wanted.auto && wanted.device.is_none(), "{wanted:?}");
        let (r, _, log) = crate::testutil::run(|_, e| auto_target(ctx, &wanted, e));
        assert_eq!(r.expect("picked"), PathBuf::from("/dev/testdisk"), "{log}");
        assert!(log.contains("install: device auto: /dev/testdisk"), "{log}");
        // install.no-format names its disk: nothing is guessed.
        let named = config::Install {
            no_format: true,
            ..wanted
        };
        let (r, _, _) = crate::testutil::run(|_, e| auto_target(ctx, &named, e));
        assert!(matches!(r, Err(InstallError::NoDevice)), "{r:?}");
    }

    #[test]
    fn an_explicit_install_device_holding_kairos_is_refused_too() {
        let f = installed_machine(false);
        let ctx = &f.t.ctx;
        // A block node for the fake disk (mknod: needs root, as the install tests do) and
        // the sysfs link inspect() follows from its numbers.
        let node = ctx.path("/dev/testdisk");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &node,
            rustix::fs::FileType::BlockDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::makedev(240, 0),
        )
        .expect("mknod of a block device node: this test needs root");
        let link = ctx.path("/sys/dev/block/240:0");
        std::fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(
            format!("../../devices/{}/block/testdisk", device::fake::PCI),
            &link,
        )
        .expect("symlink");
        f.t.file(
            "/run/initramfs/live/config.yaml",
            format!(
                "#cloud-config\ninstall:\n  auto: true\n  device: {}\n",
                node.display()
            ),
        );
        let loaded = crate::sources::load(ctx, &LoadOptions::default());
        let (r, _, _) =
            crate::testutil::run(|o, e| auto_install(ctx, &loaded, o, e).expect("auto"));
        let e = r.expect_err("refused").to_string();
        assert_eq!(
            e,
            format!(
                "{} already holds a Kairos installation (COS_STATE on /dev/testdisk4, COS_PERSISTENT on /dev/testdisk5): not installing over it without install.force: true; nothing was written",
                node.display()
            )
        );
        assert!(!ctx.path("/run/kairos/auto-install.yaml").exists());
    }

    #[test]
    fn manual_install_takes_its_defaults_from_the_config() {
        let f = installed_machine(false);
        let ctx = &f.t.ctx;
        let cfg = ctx.path("/tmp/config.yaml");
        let run = |text: &str, device: Option<&str>| {
            std::fs::create_dir_all(cfg.parent().expect("parent")).expect("mkdir");
            std::fs::write(&cfg, text).expect("write");
            let opts = ManualOptions {
                config: cfg.clone(),
                device: device.map(PathBuf::from),
                ..ManualOptions::default()
            };
            let (r, _, log) = crate::testutil::run(|o, e| manual_install(ctx, &opts, o, e));
            (r.expect_err("no real disk").to_string(), log)
        };
        // CONFIG's install.device.
        let (e, _) = run(
            "#cloud-config\ninstall:\n  device: /nonexistent-disk\n",
            None,
        );
        assert!(e.starts_with("/nonexistent-disk: cannot stat it"), "{e}");
        // --device wins.
        let (e, _) = run(
            "#cloud-config\ninstall:\n  device: /nonexistent-disk\n",
            Some("/other-disk"),
        );
        assert!(e.starts_with("/other-disk: cannot stat it"), "{e}");
        // Nothing names a disk: auto, which a person may point at a Kairos disk (the live
        // config's install.device: auto here is this node's).
        let (e, log) = run("#cloud-config\nhostname: x\n", None);
        assert!(e.starts_with("/dev/testdisk: cannot stat it"), "{e}");
        assert!(
            log.contains("install: /dev/testdisk holds a Kairos installation (COS_STATE on /dev/testdisk4, COS_PERSISTENT on /dev/testdisk5); it is replaced"),
            "{log}"
        );
        let (e, _) = run("hostname: x\n", None);
        assert!(e.contains("no #cloud-config header"), "{e}");
    }

    #[test]
    fn manual_install_renders_the_configs_templates() {
        let f = installed_machine(false);
        let ctx = &f.t.ctx;
        f.t.file("/etc/machine-id", "beef0123456789abcdef0123456789ab\n");
        let cfg = ctx.path("/tmp/config.yaml");
        let run = |text: &str| {
            std::fs::create_dir_all(cfg.parent().expect("parent")).expect("mkdir");
            std::fs::write(&cfg, text).expect("write");
            let opts = ManualOptions {
                config: cfg.clone(),
                ..ManualOptions::default()
            };
            let (r, _, _) = crate::testutil::run(|o, e| manual_install(ctx, &opts, o, e));
            r.expect_err("no real disk").to_string()
        };
        let e = run("#cloud-config\ninstall:\n  device: /nonexistent-{{ trunc 4 .MachineID }}\n");
        assert!(e.starts_with("/nonexistent-beef: cannot stat it"), "{e}");
        let e = run("#cloud-config\n\ninstall:\n  device: /x-{{ .Nope }}\n");
        assert_eq!(
            e,
            format!("{}:4: {{{{.Nope}}}}: unknown field .Nope", cfg.display())
        );
    }

    #[test]
    fn install_force_takes_the_disk_holding_kairos() {
        let f = installed_machine(true);
        let ctx = &f.t.ctx;
        let loaded = crate::sources::load(ctx, &LoadOptions::default());
        let (r, _, log) =
            crate::testutil::run(|o, e| auto_install(ctx, &loaded, o, e).expect("auto"));
        // It goes on to install: here the fake disk has no /dev node, so it stops at the
        // first check; the config it would copy to COS_OEM is kept 0600.
        let e = r.expect_err("no node").to_string();
        assert!(e.starts_with("/dev/testdisk: cannot stat it"), "{e}");
        assert!(
            log.contains("install.force: true: installing over the Kairos installation on /dev/testdisk (COS_STATE on /dev/testdisk4, COS_PERSISTENT on /dev/testdisk5)"),
            "{log}"
        );
        let conf = ctx.path("/run/kairos/auto-install.yaml");
        let mode = std::fs::metadata(&conf)
            .expect("config written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            std::fs::read_to_string(&conf)
                .expect("read")
                .contains("\"force\": true")
        );
    }
}
