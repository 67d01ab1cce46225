//! The initramfs boot, start to switch_root. Every decision is made by `plan`; this module
//! gathers the inputs, performs the actions and says what happened.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kairos_util::{IoError, IoResultExt};
use rustix::mount::MountFlags;

use crate::blockdev::{self, BlockDev};
use crate::cmdline::{self, BootMode, BootRequest};
use crate::grow;
use crate::layout::{self, Layout};
use crate::modules::{self, ModuleIndex};
use crate::plan::{self, Action, Candidate, ImageStatus, Inventory, SYSROOT};
use crate::probe;
use crate::stages;
use crate::sys::fsutil;
use crate::sys::log;
use crate::sys::loopdev::{self, LoopError};
use crate::sys::mount::{self, MountError};
use crate::sys::tsc;
use crate::{debug, error, info, warn};

/// Modules a boot in `mode` needs whatever the hardware, loaded while the disks are probed:
/// images are loop-mounted with overlays on top; ext4 for the Kairos partitions and images;
/// squashfs only where the first image is one (recovery, live). Any other filesystem (a
/// fallback to the recovery squashfs, a live medium's isofs, vfat, xfs) is loaded right
/// before its mount, as is the filesystem of the image about to be loop-mounted.
pub fn base_modules(mode: BootMode) -> &'static [&'static str] {
    match mode {
        BootMode::Active | BootMode::Passive => &["loop", "ext4", "overlay"],
        BootMode::Recovery => &["loop", "ext4", "overlay", "squashfs"],
        // ext4 too: the live system's installer mounts the filesystems it makes, and no
        // modprobe is there to load it on demand.
        BootMode::Live => &["loop", "ext4", "overlay", "squashfs"],
    }
}
/// Modules loaded at once at most: finit_module's work (signature check, relocation, init)
/// is per module, but the kernel serialises parts of it.
const MAX_LOAD_THREADS: usize = 4;
/// How long the device wait must have seen no new module and no new block device before it
/// loads the drivers held back for IDE controllers ([`ModLoader::held`]).
const IDE_GRACE: Duration = Duration::from_millis(500);
/// async_probe (a parameter every module takes) lets slow device probes, such as an empty IDE
/// bus, run in the background while we load the rest and look for disks.
const LOAD_PARAMS: &str = "async_probe";
/// The programs kairos-init hands off to, in order, when rd.kairos.init names none (the
/// agent refuses an upgrade image without one of them).
pub const HANDOFF: &[&str] = &[
    "/sbin/init",
    "/usr/bin/kairos-agent",
    "/usr/sbin/kairos-agent",
];

/// Step timings, logged to kmsg as they happen and written to /run/kairos/boot-timeline.json:
/// the top-level steps, and inside them each device wait and each mount.
/// (name, parent step, start in ms since boot, duration in ms)
type Step = (String, Option<&'static str>, f64, f64);
static TIMELINE: std::sync::Mutex<Vec<Step>> = std::sync::Mutex::new(Vec::new());
/// kairos-init's start (ms since boot: the kernel's share of the boot) and the TSC then.
static START: std::sync::OnceLock<(f64, Option<tsc::Sample>)> = std::sync::OnceLock::new();
/// The top-level step running now: the parent of the module loads it triggers.
static CURRENT: std::sync::Mutex<&'static str> = std::sync::Mutex::new("");

fn uptime_ms() -> f64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
}

fn record(name: String, parent: Option<&'static str>, start: f64, dur: f64) {
    info!("step {name}: {dur:.1} ms");
    record_quiet(name, parent, start, dur);
}

/// Into the timeline only (each module load: their own log lines say it).
fn record_quiet(name: String, parent: Option<&'static str>, start: f64, dur: f64) {
    if let Ok(mut t) = TIMELINE.lock() {
        t.push((name, parent, start, dur));
    }
}

fn current_step() -> Option<&'static str> {
    CURRENT.lock().ok().map(|c| *c).filter(|c| !c.is_empty())
}

/// Time a top-level step.
fn step<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    let start = uptime_ms();
    if let Ok(mut c) = CURRENT.lock() {
        *c = name;
    }
    let out = f();
    record(name.to_string(), None, start, uptime_ms() - start);
    out
}

/// Time a part of a top-level step (a device wait, a mount). The system step's parts (some
/// thirty binds and overlays) are logged as details: in dmesg and the timeline, not on the
/// console.
fn substep<T>(parent: &'static str, name: String, f: impl FnOnce() -> T) -> T {
    let start = uptime_ms();
    let out = f();
    let dur = uptime_ms() - start;
    if parent == "system" {
        log::detail(&format!("step {name}: {dur:.1} ms"));
        record_quiet(name, Some(parent), start, dur);
    } else {
        record(name, Some(parent), start, dur);
    }
    out
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The steps, kairos-init's start, and the TSC at its start and at switch_root (`end`), raw.
fn timeline_json(end: Option<tsc::Sample>) -> String {
    let t = TIMELINE.lock().map(|t| t.clone()).unwrap_or_default();
    let mut s = String::from("{\"steps\":[");
    for (i, (name, parent, start, dur)) in t.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let parent = parent.map_or("null".to_string(), json_str);
        let _ = write!(
            s,
            "{sep}{{\"name\":{},\"parent\":{parent},\"start_ms\":{start:.1},\"duration_ms\":{dur:.1}}}",
            json_str(name)
        );
    }
    s.push(']');
    if let Some((start_ms, start_tsc)) = START.get() {
        let _ = write!(s, ",\"start_ms\":{start_ms:.1}");
        if let (Some(a), Some(b)) = (start_tsc, end) {
            let _ = write!(
                s,
                ",\"tsc_start\":{},\"tsc_start_ms\":{:.3},\"tsc_switch_root\":{},\"tsc_switch_root_ms\":{:.3}",
                a.tsc, a.boottime_ms, b.tsc, b.boottime_ms
            );
        }
    }
    s.push_str("}\n");
    s
}

/// What stopped the boot, or one of its actions; each says the path, device or parameter.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error("no bootable image")]
    NoBootableImage,
    /// The image mounted but holds none of the programs to hand off to.
    #[error("{image} has no init to hand off to ({HANDOFF:?} and rd.kairos.init)")]
    NoInit { image: String },
    #[error("no program to hand off to in {chosen} (tried rd.kairos.init and {HANDOFF:?})")]
    NoHandoff { chosen: String },
    /// `path` leads through `link` (a symlink to `to`); paths are shown without /sysroot.
    #[error("refusing {path}: {link} is a symlink (to {}); it could lead outside the root", to.display())]
    Symlink {
        path: String,
        link: String,
        to: PathBuf,
    },
    #[error("chroot: {0}")]
    Chroot(rustix::io::Errno),
    #[error("switch_root: {0}")]
    SwitchRoot(Box<BootError>),
    #[error("rd.kairos.debug: no shell in this initramfs (looked for {})", SHELLS.join(", "))]
    NoShell,
}

/// Why the boot stopped, and how long to show it before rebooting.
pub struct Failure {
    pub reason: BootError,
    pub reboot_delay: Duration,
    /// `rd.kairos.debug` (or `rd.cos.debug`) was given: offer a shell before rebooting.
    pub debug_shell: bool,
}

/// Shells an initramfs may carry (dracut's always has one); tried in order.
pub const SHELLS: &[&str] = &["/bin/sh", "/usr/bin/sh", "/bin/bash", "/bin/busybox"];

/// Under `rd.kairos.debug` only: run the initramfs's shell on the console and wait for it to
/// exit. Without that parameter no shell is ever started, whatever the initramfs holds, so a
/// failed boot cannot be turned into a root prompt by someone at the console.
pub fn debug_shell() -> Result<(), BootError> {
    let Some(&sh) = SHELLS
        .iter()
        .find(|p| fsutil::executable_in_root(Path::new("/"), p))
    else {
        return Err(BootError::NoShell);
    };
    let console = |_| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .at(Path::new("/dev/console"), "rd.kairos.debug: opening")
    };
    let mut cmd = std::process::Command::new(sh);
    if sh.ends_with("busybox") {
        cmd.arg("sh");
    }
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("PS1", "kairos-debug# ")
        .stdin(console(0)?)
        .stdout(console(1)?)
        .stderr(console(2)?);
    warn!("rd.kairos.debug: starting {sh} on the console; the machine reboots when it exits");
    let status = cmd
        .status()
        .at(Path::new(sh), "rd.kairos.debug: starting")?;
    info!("rd.kairos.debug: {sh} exited ({status})");
    Ok(())
}

/// The whole boot. Returns only on failure to hand off; the caller then goes to emergency.
pub fn run() -> Failure {
    let _ = START.set((uptime_ms(), tsc::sample()));
    early_mounts();
    log::init_kmsg();
    let raw = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (req, warnings) = cmdline::parse(&raw);
    log::set_consoles(&req.consoles, req.debug);
    info!(
        "kairos-init {} starting: mode={} image={} reason={}",
        env!("CARGO_PKG_VERSION"),
        plan::mode_name(req.mode),
        req.image.as_deref().unwrap_or("-"),
        req.boot_reason.as_deref().unwrap_or("-")
    );
    for w in &warnings {
        warn!("{w}");
    }
    let reason = match boot(&req) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    Failure {
        reason,
        reboot_delay: req.reboot_delay,
        debug_shell: req.debug,
    }
}

/// The steps of the boot, in order: the root image, then the rest of the system, then the
/// hand-off.
fn boot(req: &BootRequest) -> Result<std::convert::Infallible, BootError> {
    let (chosen, devices, mut loader) = find_root(req)?;
    mount_the_rest(req, &chosen, devices, &mut loader);
    hand_off(req, &chosen)
}

/// Modules, devices, and the root image chosen and mounted at /sysroot (SPEC §2's fallback
/// chain); returns it with the devices seen and the module loader for the later steps.
fn find_root(
    req: &BootRequest,
) -> Result<(Candidate, Vec<BlockDev>, Option<ModLoader>), BootError> {
    let mut loader = step("modules", || {
        let mut l = ModLoader::new();
        if let Some(l) = l.as_mut() {
            // Device drivers first: their (asynchronous) probes find the disks while the
            // filesystem modules load.
            // An IDE controller's drivers wait: the disks are looked for on the others first.
            l.hold_ide = req.mode != BootMode::Live;
            l.round();
            // No second walk: the bus drivers just loaded probe asynchronously, so the disks
            // they find show up during the device wait, which walks again.
            l.load(
                base_modules(req.mode)
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            );
        }
        l
    });
    let cands = plan::candidates(req);
    let (devices, first_found) = step("devices", || wait_for_devices(req, &cands, &mut loader));
    let mut devices = on_boot_disk(req, devices, true);
    for d in &devices {
        if let Some(fs) = &d.fs {
            debug!(
                "device {} {} label={:?} gpt={:?}",
                d.devnode.display(),
                fs.fstype.name(),
                fs.label,
                d.partname
            );
        }
    }
    warn_duplicate_labels(&devices);
    let chosen = step("root", || {
        mount_root(req, &cands, &mut devices, first_found, &mut loader)
    });
    let chosen = chosen.ok_or(BootError::NoBootableImage)?;
    Ok((chosen, devices, loader))
}

/// SPEC section 3: /oem, then the rootfs stage (which may write /run/cos/*.env), then the
/// layout is read and the overlays, volumes and binds are mounted, then the initramfs stage.
fn mount_the_rest(
    req: &BootRequest,
    chosen: &Candidate,
    mut devices: Vec<BlockDev>,
    loader: &mut Option<ModLoader>,
) {
    // OEM may come late (rd.cos.oemtimeout); give it that long, but only when it is missing.
    if chosen.mode != BootMode::Live && blockdev::find_by_label(&devices, &req.oem_label).is_none()
    {
        if let Some(l) = loader.as_mut() {
            l.release_ide(&format!("{} is not on the boot disk yet", req.oem_label));
        }
        devices = step("oem-wait", || {
            wait_for_label(req, &req.oem_label, req.oem_timeout).unwrap_or(devices)
        });
    }
    let oem_fstab = step("oem", || mount_oem(req, chosen.mode, &devices, loader));
    step("stage rootfs", || run_stage("stage rootfs", "rootfs"));
    let layout = step("layout", || read_layout(chosen.mode));
    // A first boot on a bigger disk grows COS_PERSISTENT before it is mounted (recovery does
    // not mount it, so it does not grow it either).
    if let (BootMode::Active | BootMode::Passive, Some((p, _))) = (
        chosen.mode,
        blockdev::find_by_label(&devices, crate::labels::PERSISTENT),
    ) {
        let mnt = Path::new("/run/kairos/grow");
        step("grow", || {
            grow::persistent(Path::new("/sys"), Path::new("/dev"), mnt, p, req.pause)
        });
    }
    step("system", || {
        mount_system(req, chosen.mode, &layout, &devices, &oem_fstab, loader)
    });
    step("stage initramfs", || {
        run_stage("stage initramfs", "initramfs")
    });
}

/// Unmount the sources not taken, record the chosen image and switch_root into it.
fn hand_off(req: &BootRequest, chosen: &Candidate) -> Result<std::convert::Infallible, BootError> {
    unmount_unused_sources(chosen);
    let Some(prog) = handoff_program(req) else {
        return Err(BootError::NoHandoff {
            chosen: chosen.to_string(),
        });
    };
    let _ = fsutil::mkdir_p(Path::new("/run/kairos"));
    let _ = std::fs::write("/run/kairos/boot-image", format!("{chosen}\n"));
    info!("switch_root to {} ({chosen}), exec {prog}", SYSROOT);
    switch_root(&prog).map_err(|e| BootError::SwitchRoot(Box::new(e)))
}

/// The API filesystems. devtmpfs first, so /dev/kmsg exists for the log.
fn early_mounts() {
    let mounts: [(&str, &str, &str, MountFlags, &str); 4] = [
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            "mode=0755",
        ),
        (
            "proc",
            "/proc",
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            "",
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            "",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=0755,size=50%",
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = fsutil::mkdir_p(Path::new(target));
        // EBUSY: already mounted (a dracut hook or a second run), which is fine.
        if let Err(e) = mount::mount(src, Path::new(target), fstype, flags, data)
            && e.err.raw_os_error() != Some(libc::EBUSY)
        {
            eprintln!("kairos-init: {e}");
        }
    }
}

/// Loads modules for the base set and for every device that shows up, incrementally: each
/// call walks the modaliases again, because loading a bus driver (virtio_pci) makes new
/// devices (virtio disks) appear whose drivers are only known on the next walk.
struct ModLoader {
    index: ModuleIndex,
    tried: BTreeSet<String>,
    rounds: u32,
    /// How many modules of a round load at once (1: in order, in this process).
    threads: usize,
    /// Hold back the drivers of PCI IDE controllers ([`modules::is_ide_controller`]): QEMU's
    /// `pc` machine has one for its CD-ROM whatever bus the disks are on, and its drivers
    /// (scsi_mod, libata, ata_piix) plus the probe of its buses cost ~0.3 s of a one-CPU TCG
    /// boot. They are loaded when the root is not found once the other controllers have
    /// settled ([`IDE_GRACE`] without a new module or block device), or before any later wait
    /// for disks; once the root is found they are left to the booted system's udev. Never on
    /// a live boot (its medium is often a CD).
    hold_ide: bool,
    /// The modules held back so far (names from the index).
    held: BTreeSet<String>,
    /// The devices whose modalias was read (a walk reads only new ones).
    seen: BTreeSet<PathBuf>,
}

impl ModLoader {
    fn new() -> Option<ModLoader> {
        let kver = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        let dir = PathBuf::from(format!("/lib/modules/{kver}"));
        let start = uptime_ms();
        let scanned = ModuleIndex::scan(&dir);
        if let Ok(index) = &scanned {
            record_quiet(
                format!("module index: {} modules", index.names().count()),
                current_step(),
                start,
                uptime_ms() - start,
            );
        }
        match scanned {
            Ok(mut index) => {
                // CPU-specific modules (crc32c_intel for ext4's crc32c) only where they run.
                if let Ok(cpu) = std::fs::read_to_string("/sys/devices/system/cpu/modalias") {
                    index.set_cpu(&cpu);
                }
                Some(ModLoader {
                    index,
                    tried: modules::loaded(Path::new("/sys")),
                    rounds: 0,
                    hold_ide: false,
                    held: BTreeSet::new(),
                    seen: BTreeSet::new(),
                    // The CPUs this process may run on (std's available_parallelism would also
                    // read cgroup quotas: more code in a size-checked binary, and no cgroups here).
                    threads: rustix::thread::sched_getaffinity(None)
                        .map_or(1, |set| set.count() as usize)
                        .clamp(1, MAX_LOAD_THREADS),
                })
            }
            Err(e) => {
                warn!("no modules for kernel {kver}: {e}; relying on built-in drivers");
                None
            }
        }
    }

    /// One walk: load what the present devices need. Returns how many modules were newly
    /// tried.
    fn round(&mut self) -> usize {
        let mut wanted = Vec::new();
        let start = uptime_ms();
        let aliases = modules::device_modaliases(Path::new("/sys"), &mut self.seen);
        for alias in &aliases {
            if self.hold_ide && modules::is_ide_controller(alias) {
                self.held.extend(self.index.lookup(alias));
            } else {
                wanted.extend(self.index.lookup(alias));
            }
        }
        record_quiet(
            format!("modalias walk: {} new devices", aliases.len()),
            current_step(),
            start,
            uptime_ms() - start,
        );
        self.load(wanted)
    }

    /// Loads the modules held back for IDE controllers, saying why; from then on they load
    /// like any other. Returns how many were newly tried.
    fn release_ide(&mut self, why: &str) -> usize {
        self.hold_ide = false;
        let held: Vec<String> = std::mem::take(&mut self.held)
            .into_iter()
            .filter(|m| !self.tried.contains(&modules::normalize(m)))
            .collect();
        if held.is_empty() {
            return 0;
        }
        info!(
            "loading the IDE controller drivers held back ({}): {why}",
            held.join(" ")
        );
        self.load(held)
    }

    /// The module for a filesystem about to be mounted (`iso9660` from a live medium, `vfat`,
    /// `xfs`): the kernel cannot load it by itself, there is no modprobe in the initramfs.
    /// Nothing to do when it is loaded, built in or was tried already.
    fn filesystem(&mut self, mount_type: &str) {
        let name = probe::module_for(mount_type);
        if self.tried.contains(&modules::normalize(name)) || self.index.is_builtin(name) {
            return;
        }
        if self.index.lookup(name).is_empty() {
            // Tried once: the mount that follows says whether the kernel had it after all.
            self.tried.insert(modules::normalize(name));
            warn!("no module {name} in this initramfs for a {mount_type} filesystem");
            return;
        }
        self.load(vec![name.to_string()]);
    }

    /// Loads `wanted` (names or aliases) and their dependencies, each module once.
    fn load(&mut self, mut wanted: Vec<String>) -> usize {
        wanted.retain(|m| !self.tried.contains(&modules::normalize(m)));
        wanted.sort();
        wanted.dedup();
        if wanted.is_empty() {
            return 0;
        }
        let refs: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let order = match self.index.resolve(&refs) {
            Ok(o) => o,
            Err(e) => {
                warn!("module dependencies: {e}; loading what resolves");
                refs.iter()
                    .filter_map(|m| self.index.resolve(&[m]).ok())
                    .flatten()
                    .collect()
            }
        };
        let round = self.rounds;
        self.rounds += 1;
        // Each module once: those of earlier rounds are loaded (or failed) already.
        let order: Vec<String> = order
            .into_iter()
            .filter(|m| self.tried.insert(m.clone()))
            .collect();
        let n = order.len();
        if n == 0 {
            return 0;
        }
        let parent = current_step();
        let start = uptime_ms();
        let slots = self.threads.min(n);
        let most = if slots > 1 {
            self.load_concurrently(&order, slots, round, parent)
        } else {
            for name in &order {
                let t0 = uptime_ms();
                let res = self
                    .index
                    .get(name)
                    .map(|(path, _)| modules::load(name, path, LOAD_PARAMS));
                self.loaded(name, res, round, parent, t0);
            }
            1
        };
        record(
            format!("load round {round}: {n} modules, at most {most} at once"),
            parent,
            start,
            uptime_ms() - start,
        );
        n
    }

    /// `order`'s modules, each in a child process as soon as its dependencies are loaded, at
    /// most `slots` at a time. Returns how many ran at once at most.
    fn load_concurrently(
        &self,
        order: &[String],
        slots: usize,
        round: u32,
        parent: Option<&'static str>,
    ) -> usize {
        let mut sched = modules::Schedule::new(&self.index.load_graph(order));
        // (child, module's index in order, start)
        let mut running: Vec<(rustix::process::Pid, usize, f64)> = Vec::new();
        let mut most = 0;
        loop {
            while running.len() < slots
                && let Some(i) = sched.start()
            {
                let name = &order[i];
                let Some((path, _)) = self.index.get(name) else {
                    sched.done(i);
                    continue;
                };
                let t0 = uptime_ms();
                match modules::spawn_load(name, path, LOAD_PARAMS) {
                    Ok(pid) => running.push((pid, i, t0)),
                    // No child (out of memory?): load it here and now.
                    Err(_) => {
                        let res = modules::load(name, path, LOAD_PARAMS);
                        self.loaded(name, Some(res), round, parent, t0);
                        sched.done(i);
                    }
                }
            }
            most = most.max(running.len());
            if running.is_empty() {
                return most.max(1);
            }
            // Any child: kairos-init has no other one while modules load.
            let (pid, status) = match rustix::process::wait(rustix::process::WaitOptions::empty()) {
                Ok(Some(child)) => child,
                // A signal came first: the children still run.
                Err(rustix::io::Errno::INTR) => continue,
                // ECHILD: the children are gone without a status; count them as done.
                Ok(None) | Err(_) => {
                    for (_, i, t0) in running.drain(..) {
                        let name = &order[i];
                        warn!("module {name}: its loader vanished");
                        self.loaded(name, None, round, parent, t0);
                        sched.done(i);
                    }
                    continue;
                }
            };
            if let Some(at) = running.iter().position(|(p, _, _)| *p == pid) {
                let (_, i, t0) = running.swap_remove(at);
                let name = &order[i];
                let res = self
                    .index
                    .get(name)
                    .map(|(path, _)| modules::spawn_outcome(name, path, status));
                self.loaded(name, res, round, parent, t0);
                sched.done(i);
            }
        }
    }

    /// Logs and records one module load that started at `t0`.
    fn loaded(
        &self,
        name: &str,
        res: Option<Result<modules::LoadOutcome, modules::ModError>>,
        round: u32,
        parent: Option<&'static str>,
        t0: f64,
    ) {
        let ms = uptime_ms() - t0;
        record_quiet(format!("insmod {name}"), parent, t0, ms);
        match res {
            Some(Ok(modules::LoadOutcome::Loaded)) => {
                info!("loaded module {name} (round {round}, {ms:.1} ms)")
            }
            Some(Ok(modules::LoadOutcome::AlreadyLoaded)) | None => {}
            // Optional drivers fail routinely (crc32c_intel on a CPU without SSE4.2).
            Some(Err(e)) => warn!("{e}"),
        }
    }
}

/// Wait (bounded, polling) until the first candidate's partition shows up; later candidates'
/// partitions are not waited for, since they would only matter after the first is gone.
/// Also says whether it showed up (false: the whole rd.kairos.timeout has been spent).
fn wait_for_devices(
    req: &BootRequest,
    cands: &[Candidate],
    loader: &mut Option<ModLoader>,
) -> (Vec<BlockDev>, bool) {
    let first = cands.first().map(|c| c.source.clone()).unwrap_or_default();
    // The COS_STATE GRUB booted from names the boot disk: wait for it too, or a stray disk
    // probed first would be taken for the boot disk.
    let state = req
        .state_uuid
        .as_ref()
        .filter(|_| req.mode != BootMode::Live)
        .map(|u| format!("UUID={u}"));
    let deadline = Instant::now() + req.timeout;
    let mut pause = Duration::from_millis(5);
    let mut logged = false;
    // Since when no module was loaded and no block device appeared: the other controllers'
    // disks have settled (an AHCI link takes ~0.5 s to come up under TCG).
    let mut quiet_since = Instant::now();
    let mut known = 0;
    loop {
        if let Some(l) = loader.as_mut() {
            if l.hold_ide && quiet_since.elapsed() >= IDE_GRACE {
                l.release_ide(&format!(
                    "{first} not found, and no new device for {} ms",
                    IDE_GRACE.as_millis()
                ));
            }
            if l.round() > 0 {
                quiet_since = Instant::now();
            }
        }
        let devs = blockdev::scan(Path::new("/sys"), Path::new("/dev"));
        let state_found = state
            .as_ref()
            .is_none_or(|s| blockdev::find_spec(&devs, s).is_some());
        if state_found && blockdev::find_spec(&devs, &first).is_some() {
            return (settle(devs), true);
        }
        if devs.len() > known {
            known = devs.len();
            quiet_since = Instant::now();
        }
        if Instant::now() >= deadline {
            warn!(
                "{first} did not appear within {} s (rd.kairos.timeout); going on with {} block devices",
                req.timeout.as_secs(),
                devs.len()
            );
            return (devs, false);
        }
        if !logged && pause >= Duration::from_millis(100) {
            info!("waiting up to {} s for {first}", req.timeout.as_secs());
            logged = true;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The block devices once their number holds for [`SETTLE`]: the kernel adds a disk's
/// partitions one by one, so a scan that found COS_STATE may have run before the disk's last
/// partition (COS_PERSISTENT) was there; a boot then took /usr/local for missing. At most
/// ten looks.
fn settle(mut devs: Vec<BlockDev>) -> Vec<BlockDev> {
    for _ in 0..10 {
        std::thread::sleep(SETTLE);
        let again = blockdev::scan(Path::new("/sys"), Path::new("/dev"));
        if again.len() == devs.len() {
            return again;
        }
        devs = again;
    }
    devs
}

/// See [`settle`].
const SETTLE: Duration = Duration::from_millis(20);

fn wait_for_more_disks(known: &[BlockDev], timeout: Duration) -> Option<Vec<BlockDev>> {
    info!(
        "waiting up to {} s for more disks before falling back",
        timeout.as_secs()
    );
    let (devs, added) =
        blockdev::wait_for_more(Path::new("/sys"), Path::new("/dev"), known, timeout)?;
    info!("more disks appeared: {added:?}; looking again");
    Some(devs)
}

fn wait_for_label(req: &BootRequest, label: &str, timeout: Duration) -> Option<Vec<BlockDev>> {
    info!("waiting up to {} s for {label}", timeout.as_secs());
    let deadline = Instant::now() + timeout;
    loop {
        // Only the boot disk's partition ends the wait: another disk's would be ignored.
        let devs = on_boot_disk(
            req,
            blockdev::scan(Path::new("/sys"), Path::new("/dev")),
            false,
        );
        if blockdev::find_by_label(&devs, label).is_some() {
            return Some(on_boot_disk(req, devs, true));
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keeps the Kairos partitions of the boot disk only (see [`blockdev::choose_boot_disk`]):
/// the disk of the COS_STATE GRUB named in `rd.kairos.state_uuid`, else (direct kernel boots,
/// other boot loaders) the disk of the first COS_STATE. Every other device carrying a Kairos
/// label is left out and, with `say`, logged; the choice is recorded for the agent. A live
/// boot takes its medium from the command line and is left alone.
fn on_boot_disk(req: &BootRequest, devs: Vec<BlockDev>, say: bool) -> Vec<BlockDev> {
    if req.mode == BootMode::Live {
        return devs;
    }
    let Some(bd) = blockdev::choose_boot_disk(&devs, req.state_uuid.as_deref()) else {
        return devs;
    };
    let mut wanted = blockdev::BOOT_DISK_LABELS.to_vec();
    if !wanted.contains(&req.oem_label.as_str()) {
        wanted.push(&req.oem_label);
    }
    let (keep, ignored) = blockdev::restrict_to_disk(devs, &bd.disk, &wanted);
    if say {
        let how = match (bd.rule, &req.state_uuid) {
            (blockdev::BootDiskRule::StateUuid, Some(u)) => {
                format!("holds COS_STATE {u} (rd.kairos.state_uuid)")
            }
            (_, Some(u)) => {
                format!("rd.kairos.state_uuid={u} is on no device: the disk of the first COS_STATE")
            }
            (_, None) => "no rd.kairos.state_uuid: the disk of the first COS_STATE".to_string(),
        };
        if bd.rule == blockdev::BootDiskRule::StateUuid {
            info!("boot disk /dev/{}: {how}", bd.disk);
        } else {
            warn!("boot disk /dev/{}: {how}", bd.disk);
        }
        for i in &ignored {
            warn!("{i}");
        }
        let _ = fsutil::mkdir_p(Path::new("/run/kairos"));
        if let Err(e) = std::fs::write(blockdev::BOOT_DISK_FILE, format!("{}\n", bd.disk)) {
            warn!("{}: {e}", blockdev::BOOT_DISK_FILE);
        }
    }
    keep
}

/// Two filesystems with one Kairos label: the choice (first in natural device order, see
/// blockdev::find_by_label) is the same on every boot; say which one it is.
fn warn_duplicate_labels(devices: &[BlockDev]) {
    use crate::labels;
    for label in [
        labels::STATE,
        labels::RECOVERY,
        labels::OEM,
        labels::PERSISTENT,
    ] {
        if let Some((dev, dups)) = blockdev::find_by_label(devices, label)
            && !dups.is_empty()
        {
            let others: Vec<String> = dups
                .iter()
                .map(|d| d.devnode.display().to_string())
                .collect();
            warn!(
                "label {label} is on several devices: using {}, ignoring {}",
                dev.devnode.display(),
                others.join(", ")
            );
        }
    }
}

/// Fill the inventory: for each candidate, find and mount its partition (read-only, once) and
/// look at the image file.
fn inspect(
    c: &Candidate,
    devices: &[BlockDev],
    mounted: &mut Vec<String>,
    loader: &mut Option<ModLoader>,
) -> ImageStatus {
    let mnt = c.source_mountpoint();
    if !mounted.iter().any(|s| s == &c.source) {
        let Some(dev) = blockdev::find_spec(devices, &c.source) else {
            return ImageStatus::NoSource(format!("partition {} not found", c.source));
        };
        let fstype = dev.fs.as_ref().map_or("ext4", |f| f.fstype.mount_type());
        if let Err(e) = fsutil::mkdir_p(Path::new(mnt)) {
            return ImageStatus::NoSource(e.to_string());
        }
        if let Some(l) = loader.as_mut() {
            l.filesystem(fstype);
        }
        let devnode = &dev.devnode;
        let res = substep("root", format!("mount {} at {mnt}", c.source), || {
            mount::device(devnode, Path::new(mnt), fstype, true)
        });
        if let Err(e) = res {
            return ImageStatus::NoSource(e.to_string());
        }
        info!(
            "mounted {} ({}) read-only at {mnt}",
            c.source,
            dev.devnode.display()
        );
        mounted.push(c.source.clone());
    }
    let file = PathBuf::from(format!("{mnt}{}", c.image));
    match probe::probe_path(&file) {
        Ok(Some(fs)) => ImageStatus::Fs(fs.fstype),
        Ok(None) => ImageStatus::Unrecognized,
        Err(_) if !file.exists() => ImageStatus::Missing,
        Err(e) => ImageStatus::Failed(e.to_string()),
    }
}

/// How long a fallback caused by a missing partition or image waits for more disks first.
const LATE_DISKS: Duration = Duration::from_secs(3);

/// Choose, loop-mount and check the root image, falling back along the chain.
///
/// The device wait ends as soon as *a* filesystem with the first label shows up, and disks
/// are probed in parallel: a stray disk carrying the label can be seen before the real
/// Kairos disk is. So before falling back for want of a partition or an image (only when the
/// wait did not already time out), give late disks [`LATE_DISKS`]; if any appear, look again.
fn mount_root(
    req: &BootRequest,
    cands: &[Candidate],
    devices: &mut Vec<BlockDev>,
    may_wait: bool,
    loader: &mut Option<ModLoader>,
) -> Option<Candidate> {
    let mut inv = Inventory::default();
    let mut mounted_sources: Vec<String> = Vec::new();
    let mut reported = 0;
    let mut waited = !may_wait;
    loop {
        for c in cands {
            if inv.get(c).is_none() {
                let status = inspect(c, devices, &mut mounted_sources, loader);
                inv.set(c, status);
            }
        }
        let sel = plan::select(cands, &inv);
        let falling_back = sel.chosen.as_ref().map(|(c, _)| c) != cands.first();
        if falling_back
            && !waited
            && sel
                .skipped
                .iter()
                .any(|(c, _)| inv.get(c).is_some_and(ImageStatus::may_be_late))
        {
            waited = true;
            if let Some(l) = loader.as_mut() {
                l.release_ide("falling back: the first image's source may be on one");
            }
            if let Some(more) = wait_for_more_disks(devices, LATE_DISKS) {
                // Unmount what the first look mounted: a better device may now own the label.
                for s in mounted_sources.drain(..) {
                    let _ = mount::unmount(Path::new(plan::source_mountpoint(&s)), false);
                }
                *devices = on_boot_disk(req, more, true);
                warn_duplicate_labels(devices);
                inv = Inventory::default();
                reported = 0;
                continue;
            }
        }
        for (c, why) in sel.skipped.iter().skip(reported) {
            warn!("skipping {c}: {why}");
        }
        reported = sel.skipped.len();
        let Some((c, fstype)) = sel.chosen else {
            let mut msg = String::from("no bootable image. Tried:");
            for (c, why) in &sel.skipped {
                let _ = write!(msg, "\n  {c}: {why}");
            }
            log::fatal(&msg);
            return None;
        };
        if reported > 0 {
            warn!("falling back to {c}");
        }
        // The image's filesystem (squashfs on a fallback to recovery) may not be loaded yet.
        if let Some(l) = loader.as_mut() {
            l.filesystem(fstype.mount_type());
        }
        match substep("root", format!("loop-mount {}", c.image), || {
            mount_image(req, &c, fstype)
        }) {
            Ok(()) => {
                info!("mounted {c} ({}) at {SYSROOT}", fstype.name());
                return Some(c);
            }
            Err(why) => {
                inv.set(&c, ImageStatus::Failed(why.to_string()));
            }
        }
    }
}

fn mount_image(req: &BootRequest, c: &Candidate, fstype: probe::FsType) -> Result<(), BootError> {
    let file = PathBuf::from(format!("{}{}", c.source_mountpoint(), c.image));
    let ro = !req.debugrw;
    let sysroot = Path::new(SYSROOT);
    fsutil::mkdir_p(sysroot)?;
    let lo = loopdev::attach(Path::new("/dev"), &file, ro)?;
    mount::device(&lo.path, sysroot, fstype.mount_type(), ro)?;
    drop(lo); // the mount holds the device now; AUTOCLEAR frees it on umount
    // An image that mounts but cannot start is no better than a missing one.
    if handoff_program(req).is_none() {
        let _ = mount::unmount(sysroot, false);
        return Err(BootError::NoInit {
            image: c.image.clone(),
        });
    }
    let _ = std::fs::write("/run/kairos-root-fs", fstype.name());
    Ok(())
}

fn handoff_program(req: &BootRequest) -> Option<String> {
    let root = Path::new(SYSROOT);
    if let Some(p) = &req.init {
        if fsutil::executable_in_root(root, p) {
            return Some(p.clone());
        }
        warn!("rd.kairos.init={p} is not an executable in the image; trying the defaults");
    }
    HANDOFF
        .iter()
        .find(|p| fsutil::executable_in_root(root, p))
        .map(|p| p.to_string())
}

/// Layout files, in SPEC order: the image's own, then those the rootfs stage wrote to /run/cos.
fn read_layout(mode: BootMode) -> Layout {
    let files = [
        format!("{SYSROOT}/etc/cos/cos-layout.env"),
        "/run/cos/cos-layout.env".into(),
        "/run/cos/extra-layout.env".into(),
        "/run/cos/custom-layout.env".into(),
    ];
    let mut parsed = Vec::new();
    for f in files {
        let p = PathBuf::from(&f);
        // Bounded, no symlinks, regular files only (layout::read_env).
        match layout::read_env(&p) {
            Ok(kv) => {
                info!("layout from {f}");
                parsed.push((p, kv));
            }
            Err(layout::LayoutError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("{e}; file ignored"),
        }
    }
    let base = if mode == BootMode::Recovery || mode == BootMode::Live {
        Layout::recovery_default()
    } else if parsed.is_empty() {
        Layout::kairos_default()
    } else {
        Layout::immucore_default()
    };
    let (layout, warnings) = Layout::apply(base, &parsed);
    for w in warnings {
        warn!("{w}");
    }
    layout
}

/// COS_OEM at /sysroot/oem, ahead of the rest so the rootfs stage can read the cloud-config
/// there. Returns the fstab line for it (empty when it was not mounted).
fn mount_oem(
    req: &BootRequest,
    mode: BootMode,
    devices: &[BlockDev],
    loader: &mut Option<ModLoader>,
) -> String {
    let mut fstab = String::new();
    match plan::plan_oem(req, mode, devices) {
        Ok(Some(a)) => {
            filesystem_module(&a, loader);
            if let Err(e) = substep("oem", describe(&a), || execute(&a, &mut fstab)) {
                warn!("{e}");
            }
        }
        Ok(None) => {}
        Err(w) => warn!("{w}"),
    }
    fstab
}

/// A cloud-config stage of the image, chrooted into /sysroot, unless no config file or kernel
/// parameter can give it a step (an agent exec costs 0.3 s and more under TCG). Its failure
/// is logged and the boot goes on: a broken config must not make the node unbootable.
fn run_stage(step_name: &'static str, name: &str) {
    let root = Path::new(SYSROOT);
    if fsutil::executable_in_root(root, stages::AGENT) {
        let start = uptime_ms();
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let need = stages::stage_need(root, Path::new("/run"), &cmdline, name);
        let dur = uptime_ms() - start;
        match need {
            stages::StageNeed::Skip { files } => {
                info!("stage {name}: skipped (no config names it: scanned {files} files)");
                record_quiet(
                    format!("skipped: no config names it ({files} files scanned)"),
                    Some(step_name),
                    start,
                    dur,
                );
                return;
            }
            stages::StageNeed::Run(why) => {
                info!("stage {name}: running it: {why}");
                record_quiet(format!("config scan: {why}"), Some(step_name), start, dur);
            }
        }
    }
    let outcome = stages::run_stage(root, name, stages::STAGE_TIMEOUT);
    match &outcome {
        stages::StageOutcome::Skipped => {}
        o if o.ok() => info!("stage {name}: {o}"),
        o => warn!("stage {name}: {o}; going on with the boot"),
    }
}

fn mount_system(
    req: &BootRequest,
    mode: BootMode,
    layout: &Layout,
    devices: &[BlockDev],
    oem_fstab: &str,
    loader: &mut Option<ModLoader>,
) {
    let kind = |p: &str| fsutil::path_kind(Path::new(&format!("{SYSROOT}{p}")));
    let sp = plan::plan_system(&plan::SystemInputs {
        req,
        mode,
        layout,
        devices,
        image_path: &kind,
        oem_mounted: true,
    });
    for w in &sp.warnings {
        warn!("{w}");
    }
    let mut failed = vec![false; sp.steps.len()];
    let mut fstab = String::from("# written by kairos-init\n");
    fstab.push_str(oem_fstab);
    for (i, step) in sp.steps.iter().enumerate() {
        if step
            .after
            .is_some_and(|a| failed.get(a).copied().unwrap_or(true))
        {
            failed[i] = true;
            continue;
        }
        filesystem_module(&step.action, loader);
        let res = match &step.action {
            Action::Mkdir { .. } | Action::WriteFile { .. } => execute(&step.action, &mut fstab),
            a => substep("system", describe(a), || execute(a, &mut fstab)),
        };
        match res {
            Ok(()) => debug!("{:?}", step.action),
            Err(e) => {
                failed[i] = true;
                if step.required {
                    error!("{e}")
                } else {
                    warn!("{e}")
                }
            }
        }
    }
    if let Err(e) = std::fs::write(format!("{SYSROOT}/etc/fstab"), fstab) {
        debug!("{SYSROOT}/etc/fstab not written: {e}");
    }
}

/// Before a device mount: its filesystem's module.
fn filesystem_module(a: &Action, loader: &mut Option<ModLoader>) {
    if let (Action::Device { fstype, .. }, Some(l)) = (a, loader.as_mut()) {
        l.filesystem(fstype);
    }
}

fn describe(a: &Action) -> String {
    match a {
        Action::Tmpfs { target, .. } => format!("tmpfs {target}"),
        Action::Device { device, target, .. } => format!("mount {device} at {target}"),
        Action::Overlay { target, .. } => format!("overlay {target}"),
        Action::Bind { target, .. } => format!("bind {target}"),
        Action::SyncMissing { to, .. } => format!("sync {to}"),
        Action::Mkdir { path } | Action::WriteFile { path, .. } => path.clone(),
    }
}

fn strip(p: &str) -> &str {
    match p.strip_prefix(SYSROOT) {
        Some("") => "/",
        Some(rest) => rest,
        None => p,
    }
}

/// The paths under /sysroot an action creates, writes or mounts on.
fn written_paths(a: &Action) -> Vec<&str> {
    match a {
        Action::Mkdir { path } | Action::WriteFile { path, .. } => vec![path],
        Action::Tmpfs { target, .. } | Action::Device { target, .. } => vec![target],
        Action::Overlay {
            upper,
            work,
            target,
            ..
        } => vec![upper, work, target],
        Action::Bind { source, target } => vec![source, target],
        Action::SyncMissing { from, to } => vec![from, to],
    }
}

fn execute(a: &Action, fstab: &mut String) -> Result<(), BootError> {
    // A symlink in the image or on COS_PERSISTENT must not redirect a mount or a copy outside
    // the new root: the kernel would resolve it against the initramfs.
    for p in written_paths(a) {
        if let Some((link, to)) = fsutil::symlink_below(Path::new(SYSROOT), Path::new(p)) {
            return Err(BootError::Symlink {
                path: strip(p).to_string(),
                link: strip(&link.to_string_lossy()).to_string(),
                to,
            });
        }
    }
    match a {
        Action::Mkdir { path } => Ok(fsutil::mkdir_p(Path::new(path))?),
        Action::Tmpfs { target, size } => {
            fsutil::mkdir_p(Path::new(target))?;
            mount::tmpfs(Path::new(target), size, "0755")?;
            let _ = writeln!(
                fstab,
                "tmpfs {} tmpfs defaults,size={size} 0 0",
                strip(target)
            );
            Ok(())
        }
        Action::Device {
            device,
            target,
            fstype,
            readonly,
        } => {
            mount::device(Path::new(device), Path::new(target), fstype, *readonly)?;
            info!(
                "mounted {device} at {target} ({})",
                if *readonly { "ro" } else { "rw" }
            );
            let _ = writeln!(
                fstab,
                "{device} {} {fstype} {} 0 0",
                strip(target),
                if *readonly { "ro" } else { "rw" }
            );
            Ok(())
        }
        Action::Overlay {
            lower,
            upper,
            work,
            target,
        } => {
            let data = format!("lowerdir={lower},upperdir={upper},workdir={work}");
            mount::mount(
                "overlay",
                Path::new(target),
                "overlay",
                MountFlags::empty(),
                &data,
            )?;
            let _ = writeln!(fstab, "overlay {} overlay {data} 0 0", strip(target));
            Ok(())
        }
        Action::Bind { source, target } => {
            mount::bind(Path::new(source), Path::new(target))?;
            let _ = writeln!(
                fstab,
                "{} {} none defaults,bind 0 0",
                strip(source),
                strip(target)
            );
            Ok(())
        }
        Action::SyncMissing { from, to } => {
            let r = fsutil::sync_missing(Path::new(from), Path::new(to));
            if r.copied > 0 {
                info!(
                    "{from} -> {to}: copied {} new entries, kept {}",
                    r.copied, r.kept
                );
            }
            for e in r.errors.iter().take(5) {
                warn!("{e}");
            }
            Ok(())
        }
        Action::WriteFile { path, contents } => {
            Ok(std::fs::write(path, contents).at(Path::new(path), "write")?)
        }
    }
}

/// The partitions mounted only to look for images the boot did not take.
fn unmount_unused_sources(chosen: &Candidate) {
    for mnt in [
        "/run/initramfs/cos-state",
        "/run/initramfs/cos-recovery",
        "/run/initramfs/live",
    ] {
        if mnt != chosen.source_mountpoint() {
            let _ = mount::unmount(Path::new(mnt), false);
        }
    }
}

fn switch_root(prog: &str) -> Result<std::convert::Infallible, BootError> {
    let start = uptime_ms();
    let new = Path::new(SYSROOT);
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = PathBuf::from(format!("{SYSROOT}{m}"));
        if fsutil::path_kind(&target) != plan::PathKind::Dir {
            warn!(
                "{} missing in the image: {m} is detached instead of moved",
                target.display()
            );
            let _ = mount::unmount(Path::new(m), true);
            continue;
        }
        mount::move_mount(Path::new(m), &target)?;
    }
    let chdir = |dir: &'static str| std::env::set_current_dir(dir).at(Path::new(dir), "chdir");
    chdir(SYSROOT)?;
    let freed = fsutil::free_initramfs(Path::new("/"), new);
    mount::move_mount(new, Path::new("/"))?;
    rustix::process::chroot(".").map_err(BootError::Chroot)?;
    chdir("/")?;
    record("switch_root".into(), None, start, uptime_ms() - start);
    // /run is the image's /run now; userland and `kairos-agent state` read the timeline there.
    let _ = std::fs::write(
        "/run/kairos/boot-timeline.json",
        timeline_json(tsc::sample()),
    );
    info!(
        "freed {} KiB of initramfs; peak RSS {} KiB; exec {prog}",
        freed / 1024,
        peak_rss_kib()
    );
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(prog).exec();
    Err(IoError::new(prog, "exec", err).into())
}

/// VmHWM of this process, for the size-first claim: how much memory the init itself needed.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_modules_mount_what_each_boot_mode_needs() {
        for mode in [
            BootMode::Active,
            BootMode::Passive,
            BootMode::Recovery,
            BootMode::Live,
        ] {
            let m = base_modules(mode);
            // ext4 also on live boots: the live installer mounts the ext4s it makes and the
            // initramfs has no modprobe to load it later.
            for want in ["loop", "ext4", "overlay"] {
                assert!(m.contains(&want), "{mode:?}: {want} missing from {m:?}");
            }
            let squash = matches!(mode, BootMode::Recovery | BootMode::Live);
            assert_eq!(m.contains(&"squashfs"), squash, "{mode:?}: {m:?}");
        }
    }
}
