//! The boot benchmark (issue 7): one Kairos disk and one kernel, booted N times each,
//! interleaved, with three initramfs images:
//!
//! - (a) the project's own initramfs (`kairos-qemu initramfs`);
//! - (b) dracut with the kairos-init module (`-m kairos-init`);
//! - (c) a stock Debian dracut initramfs (systemd in the initramfs) booting the same active
//!   image the generic way: the image file (`active.img`, the very file inside COS_STATE) is
//!   attached as its own virtio disk next to the Kairos disk and booted with
//!   `root=LABEL=COS_ACTIVE ro`.
//!
//! Every boot is a direct kernel boot (`-kernel`/`-initrd`/`-append`), so GRUB is not in the
//! figures, and every figure is a printk timestamp from the serial log (seconds since the kernel
//! started): `kairos-init: switch_root` for (a) and (b), systemd's `Switching root.` for (c)
//! (booted with `systemd.log_target=kmsg` so its log carries kernel timestamps). The image's
//! own init prints `KAIROS-TEST: uptime=` first, a second figure that does not depend on what
//! each initramfs logs.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kairos_initramfs::{InitramfsError, InitramfsSpec};
use kairos_util::{IoError, IoResultExt, svg};

use crate::boot::{self, BootError, BootSpec};
use crate::disk::{self, DiskError};
use crate::dracut::{self, DracutError, DracutKind};
use crate::initramfs;
use crate::kernel::Kernel;

/// The same for every variant: one serial console, no interactive shells, reboot (which ends
/// QEMU, `-no-reboot`) on failure; systemd's log into kmsg so it gets kernel timestamps (the
/// kairos-init images ignore the systemd options, and kairos-init turns devkmsg rate limiting
/// off itself).
pub const COMMON_CMDLINE: &str = "console=ttyS0,115200 panic=5 rd.shell=0 rd.emergency=reboot systemd.log_target=kmsg systemd.log_level=info printk.devkmsg=on";
/// GRUB's active entry, for the kairos-init images.
pub const KAIROS_ROOT: &str =
    "root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img rd.cos.oemlabel=COS_OEM";
/// The generic way: the image is a filesystem labelled COS_ACTIVE on its own disk.
pub const STOCK_ROOT: &str = "root=LABEL=COS_ACTIVE ro";
/// The image's init prints this first (`/proc/uptime`), then the hello line.
pub const UPTIME_PREFIX: &str = "KAIROS-TEST: uptime=";
pub const HELLO: &str = "KAIROS-TEST: hello from image=";
const HELLO_ACTIVE: &str = "KAIROS-TEST: hello from image=active";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Ours,
    DracutKairos,
    DracutStock,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::Ours, Variant::DracutKairos, Variant::DracutStock];

    pub fn tag(self) -> &'static str {
        match self {
            Variant::Ours => "a",
            Variant::DracutKairos => "b",
            Variant::DracutStock => "c",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Variant::Ours => "kairos-qemu initramfs",
            Variant::DracutKairos => "dracut -m kairos-init",
            Variant::DracutStock => "stock dracut (systemd)",
        }
    }

    /// The kmsg line that marks the hand-off to the image.
    pub fn switch_root_needle(self) -> &'static str {
        match self {
            Variant::Ours | Variant::DracutKairos => "kairos-init: switch_root",
            Variant::DracutStock => "systemd[1]: Switching root.",
        }
    }

    /// (what, kmsg needle) in boot order: where the time goes, for the breakdown.
    pub fn milestones(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Variant::Ours | Variant::DracutKairos => &[
                ("initramfs unpacked", "Freeing initrd memory"),
                ("kernel runs /init", "Run /init as init process"),
                ("kairos-init logging", "kairos-init: kairos-init "),
                ("modules loaded", "kairos-init: step modules:"),
                ("devices found", "kairos-init: step devices:"),
                ("image mounted", "kairos-init: step root:"),
                ("switch_root", "kairos-init: switch_root"),
            ],
            Variant::DracutStock => &[
                ("initramfs unpacked", "Freeing initrd memory"),
                ("kernel runs /init", "Run /init as init process"),
                ("systemd logging", "systemd[1]: systemd "),
                ("units loaded", "systemd[1]: Queued start job"),
                ("udevd started", "systemd[1]: Started systemd-udevd.service"),
                (
                    "root device",
                    "systemd[1]: Reached target initrd-root-device.target",
                ),
                (
                    "fsck done",
                    "systemd[1]: Finished systemd-fsck-root.service",
                ),
                (
                    "root mounted",
                    "systemd[1]: Reached target initrd-root-fs.target",
                ),
                ("switch_root", "systemd[1]: Switching root."),
            ],
        }
    }

    pub fn cmdline(self) -> String {
        let root = match self {
            Variant::Ours | Variant::DracutKairos => KAIROS_ROOT,
            Variant::DracutStock => STOCK_ROOT,
        };
        format!("{COMMON_CMDLINE} {root}")
    }
}

#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// Boots per variant (interleaved a, b, c, a, b, c, …).
    pub runs: usize,
    pub kvm: bool,
    /// Virtual CPUs of every boot (QEMU's `-smp`; TCG runs them on as many host threads).
    pub smp: u32,
    /// Images, disk and serial logs go here (kept for inspection).
    pub work: PathBuf,
    /// The static kairos-init.
    pub init_binary: PathBuf,
    pub kernel: Kernel,
    /// Per boot.
    pub boot_timeout: Duration,
}

/// One boot's figures, in seconds since the kernel started.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub switch_root: f64,
    /// The image init's `uptime=` line, when its init prints one.
    pub image_init: Option<f64>,
    /// kairos-init's `peak RSS N KiB` (its VmHWM before exec).
    pub peak_rss_kib: Option<u64>,
    /// One entry per [`Variant::milestones`].
    pub milestones: Vec<Option<f64>>,
    pub wall: Duration,
    pub log: PathBuf,
}

#[derive(Debug, Clone)]
pub struct VariantResult {
    pub variant: Variant,
    pub initramfs: PathBuf,
    pub size_bytes: u64,
    pub samples: Vec<Sample>,
}

impl VariantResult {
    pub fn switch_root(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.switch_root).collect()
    }
    pub fn image_init(&self) -> Vec<f64> {
        self.samples.iter().filter_map(|s| s.image_init).collect()
    }
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub variants: Vec<VariantResult>,
    pub init_binary_bytes: u64,
    pub kernel_version: String,
    pub kvm: bool,
    pub runs: usize,
    /// dracut modules in the stock image.
    pub stock_modules: Vec<String>,
    pub build_time: Duration,
    pub boot_time: Duration,
    /// Boots done again because the kernel hung before it ran /init (see [`hung_before_init`]).
    pub retried: Vec<String>,
}

/// Whether a failed boot's serial log shows the kernel never ran the initramfs: under
/// multi-threaded TCG (`--smp 2`) the guest kernel has been seen to hang in its own early
/// set-up, before any initramfs is involved. Such a boot is done again, once, and said so;
/// any failure after /init started stays an error.
pub fn hung_before_init(log: &str) -> bool {
    !log.contains("Run /init as init process")
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("building our initramfs {}: {err}", path.display())]
    Initramfs {
        path: PathBuf,
        err: Box<InitramfsError>,
    },
    #[error("building {} with dracut: {err}", path.display())]
    Dracut {
        path: PathBuf,
        err: Box<DracutError>,
    },
    #[error("the Debian image: {0}")]
    Debian(crate::debian::DebianError),
    #[error("building the disk {}: {err}", path.display())]
    Disk { path: PathBuf, err: Box<DiskError> },
    #[error(
        "the disk builder left no active image at {} (its work dir layout changed?)",
        path.display()
    )]
    NoActiveImage { path: PathBuf },
    #[error("booting ({tag}) run {run}: {err}")]
    Boot {
        tag: &'static str,
        run: usize,
        err: Box<BootError>,
    },
    #[error("({tag}) run {run}: the serial log {} lacks {what:?}; its tail:\n{tail}", log.display())]
    Missing {
        tag: &'static str,
        run: usize,
        what: &'static str,
        log: PathBuf,
        tail: String,
    },
    #[error("--runs must be at least 1")]
    NoRuns,
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<crate::debian::DebianError> for BenchError {
    fn from(e: crate::debian::DebianError) -> BenchError {
        BenchError::Debian(e)
    }
}

/// The value of the image init's `KAIROS-TEST: uptime=<secs>` line.
pub fn parse_uptime(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(UPTIME_PREFIX))?;
    let rest = &line[line.find(UPTIME_PREFIX)? + UPTIME_PREFIX.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// N from kairos-init's `…; peak RSS N KiB; exec …` line.
pub fn parse_peak_rss(log: &str) -> Option<u64> {
    const KEY: &str = "peak RSS ";
    let line = log.lines().find(|l| l.contains(KEY))?;
    let rest = &line[line.find(KEY)? + KEY.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The median (mean of the middle two for an even count); None for no values.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn min_max(values: &[f64]) -> Option<(f64, f64)> {
    let min = values.iter().copied().min_by(f64::total_cmp)?;
    let max = values.iter().copied().max_by(f64::total_cmp)?;
    Some((min, max))
}

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Our initramfs (kairos-init and the default modules) at WORK/initramfs-kairos.img, as both
/// benches boot it.
pub(crate) fn build_ours(
    work: &Path,
    init_binary: &Path,
    kernel: &Kernel,
) -> Result<(PathBuf, kairos_initramfs::BuildReport), BenchError> {
    let ours = work.join("initramfs-kairos.img");
    let report = kairos_initramfs::build(
        &InitramfsSpec {
            init_binary: init_binary.to_path_buf(),
            kernel: kernel.clone(),
            modules: initramfs::default_modules(),
            extra_files: Vec::new(),
        },
        &ours,
    )
    .map_err(|source| BenchError::Initramfs {
        path: ours.clone(),
        err: Box::new(source),
    })?;
    Ok((ours, report))
}

/// Builds everything (our initramfs, the two dracut images, the disk, the standalone active
/// image) and boots each variant `runs` times, interleaved. `progress` gets one line per step.
pub fn run(spec: &BenchSpec, progress: &mut dyn FnMut(&str)) -> Result<BenchReport, BenchError> {
    if spec.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    let build_start = Instant::now();
    fs::create_dir_all(&spec.work).at(&spec.work, "creating")?;

    let (ours, report) = build_ours(&spec.work, &spec.init_binary, &spec.kernel)?;
    progress(&format!(
        "(a) {}: {} bytes",
        ours.display(),
        thousands(report.size_bytes)
    ));

    let mut dracut_images = Vec::new();
    let mut stock_modules = Vec::new();
    for (kind, name) in [
        (DracutKind::KairosInit, "initramfs-dracut-kairos.img"),
        (DracutKind::Stock, "initramfs-dracut-stock.img"),
    ] {
        let out = spec.work.join(name);
        let r =
            dracut::build(kind, &spec.kernel, Some(&spec.init_binary), &out).map_err(|source| {
                BenchError::Dracut {
                    path: out.clone(),
                    err: Box::new(source),
                }
            })?;
        progress(&format!(
            "({}) {}: {} bytes in {:.1} s; {}",
            if kind == DracutKind::Stock { "c" } else { "b" },
            out.display(),
            thousands(r.size_bytes),
            r.elapsed.as_secs_f64(),
            r.command
        ));
        if kind == DracutKind::Stock {
            stock_modules = r.modules;
        }
        dracut_images.push((out, r.size_bytes));
    }

    // The disk (its images carry our initramfs as /boot/initrd; unused here: every boot is a
    // direct kernel boot), built with a kept work dir so its active.img can be reused as is.
    let disk_path = spec.work.join("disk.img");
    let disk_work = spec.work.join("disk.work");
    let mut dspec = disk::demo_spec(&disk_path, &spec.kernel, &ours);
    dspec.work_dir = Some(disk_work.clone());
    disk::build(&dspec).map_err(|source| BenchError::Disk {
        path: disk_path.clone(),
        err: Box::new(source),
    })?;
    let built_active = disk_work.join("state/cOS/active.img");
    if !built_active.is_file() {
        return Err(BenchError::NoActiveImage { path: built_active });
    }
    let active = spec.work.join("active.img");
    fs::copy(&built_active, &active)
        .at(&active, format!("copying {} here", built_active.display()))?;
    progress(&format!(
        "disk {} and its active image {} (attached as a second disk for (c))",
        disk_path.display(),
        active.display()
    ));
    let build_time = build_start.elapsed();

    let mut variants: Vec<VariantResult> = vec![
        VariantResult {
            variant: Variant::Ours,
            initramfs: ours,
            size_bytes: report.size_bytes,
            samples: Vec::new(),
        },
        VariantResult {
            variant: Variant::DracutKairos,
            initramfs: dracut_images[0].0.clone(),
            size_bytes: dracut_images[0].1,
            samples: Vec::new(),
        },
        VariantResult {
            variant: Variant::DracutStock,
            initramfs: dracut_images[1].0.clone(),
            size_bytes: dracut_images[1].1,
            samples: Vec::new(),
        },
    ];

    let logs = spec.work.join("logs");
    fs::create_dir_all(&logs).at(&logs, "creating")?;
    let boot_start = Instant::now();
    progress(&format!("{} vCPU(s) per boot (-smp)", spec.smp));
    let mut retried = Vec::new();
    for run in 1..=spec.runs {
        for v in variants.iter_mut() {
            let sample = match boot_once(spec, v, &disk_path, &active, &logs, run) {
                Err(BenchError::Missing { tag, run, log, .. })
                    if fs::read_to_string(&log).is_ok_and(|l| hung_before_init(&l)) =>
                {
                    let kept = log.with_extension("hung.log");
                    fs::rename(&log, &kept).at(&log, "keeping the hung boot's log")?;
                    let note = format!(
                        "({tag}) run {run}: the kernel hung before it ran /init (log {}); booted again",
                        kept.display()
                    );
                    progress(&note);
                    retried.push(note);
                    boot_once(spec, v, &disk_path, &active, &logs, run)?
                }
                other => other?,
            };
            progress(&format!(
                "run {run}/{} ({}) {:<24} switch_root {:.3} s, image init {}, wall {:.1} s",
                spec.runs,
                v.variant.tag(),
                v.variant.label(),
                sample.switch_root,
                sample
                    .image_init
                    .map_or("-".to_string(), |t| format!("{t:.2} s")),
                sample.wall.as_secs_f64()
            ));
            v.samples.push(sample);
        }
    }
    Ok(BenchReport {
        variants,
        init_binary_bytes: fs::metadata(&spec.init_binary)
            .at(&spec.init_binary, "reading metadata")?
            .len(),
        kernel_version: spec.kernel.version.clone(),
        kvm: spec.kvm,
        runs: spec.runs,
        stock_modules,
        build_time,
        boot_time: boot_start.elapsed(),
        retried,
    })
}

fn boot_once(
    spec: &BenchSpec,
    v: &VariantResult,
    disk: &Path,
    active: &Path,
    logs: &Path,
    run: usize,
) -> Result<Sample, BenchError> {
    let tag = v.variant.tag();
    let log_path = logs.join(format!("{tag}-{run}.log"));
    let mut bs = BootSpec::new(&log_path);
    bs.disks.push(disk.to_path_buf());
    if v.variant == Variant::DracutStock {
        bs.disks.push(active.to_path_buf());
    }
    bs.kernel = Some(spec.kernel.vmlinuz.clone());
    bs.initrd = Some(v.initramfs.clone());
    bs.append = Some(v.variant.cmdline());
    bs.kvm = spec.kvm;
    if spec.smp > 1 {
        // A later -smp overrides the harness's `-smp 1`.
        bs.extra_args
            .extend(["-smp".to_string(), spec.smp.to_string()]);
    }
    bs.until = vec![HELLO.to_string()];
    bs.timeout = spec.boot_timeout;
    let r = boot::run(&bs).map_err(|source| BenchError::Boot {
        tag,
        run,
        err: Box::new(source),
    })?;
    let missing = |what: &'static str| BenchError::Missing {
        tag,
        run,
        what,
        log: log_path.clone(),
        tail: r.tail(25),
    };
    let switch_root = boot::kmsg_time(&r.log, v.variant.switch_root_needle())
        .ok_or_else(|| missing(v.variant.switch_root_needle()))?;
    if !r.log.contains(HELLO_ACTIVE) {
        return Err(missing(HELLO_ACTIVE));
    }
    Ok(Sample {
        switch_root,
        image_init: parse_uptime(&r.log),
        peak_rss_kib: parse_peak_rss(&r.log),
        milestones: v
            .variant
            .milestones()
            .iter()
            .map(|(_, needle)| boot::kmsg_time(&r.log, needle))
            .collect(),
        wall: r.elapsed,
        log: log_path,
    })
}

impl BenchReport {
    fn get(&self, v: Variant) -> Option<&VariantResult> {
        self.variants.iter().find(|r| r.variant == v)
    }

    /// (size ratio, switch_root ratio) of stock dracut (c) to `v`.
    pub fn ratios(&self, v: Variant) -> Option<(f64, f64)> {
        let stock = self.get(Variant::DracutStock)?;
        let this = self.get(v)?;
        let size = stock.size_bytes as f64 / this.size_bytes as f64;
        let sr = median(&stock.switch_root())? / median(&this.switch_root())?;
        Some((size, sr))
    }

    /// The breakdown as an SVG (`bench --svg FILE`): one group of bars per variant, a bar per
    /// milestone from the one before it (0 for the first) to its median kernel timestamp, and
    /// the switch_root median and spread in the group's heading.
    pub fn svg(&self) -> String {
        let groups = self
            .variants
            .iter()
            .map(|r| {
                let class = match r.variant {
                    Variant::Ours => "ours",
                    Variant::DracutKairos => "init",
                    Variant::DracutStock => "stock",
                };
                let mut prev = 0.0_f64;
                let rows = r
                    .variant
                    .milestones()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (what, _))| {
                        let v: Vec<f64> = r
                            .samples
                            .iter()
                            .filter_map(|x| x.milestones.get(i).copied().flatten())
                            .collect();
                        let at = median(&v)?;
                        let row = svg::Row::new(*what, prev.min(at), at, class);
                        prev = at;
                        Some(row)
                    })
                    .collect();
                let sr = r.switch_root();
                let heading = format!(
                    "({}) {}: switch_root {}{}",
                    r.variant.tag(),
                    r.variant.label(),
                    median(&sr).map_or("-".into(), |m| format!("{m:.3} s")),
                    min_max(&sr).map_or(String::new(), |(a, b)| format!(" ({a:.3}-{b:.3})")),
                );
                svg::Group::titled(heading, rows)
            })
            .collect();
        let (_, sr) = self.ratios(Variant::Ours).unwrap_or((f64::NAN, f64::NAN));
        svg::render(&svg::Chart {
            title: format!(
                "initramfs to switch_root, median kernel timestamps of {} boot(s) per variant ({}, kernel {}): switch_root {sr:.1}x sooner than stock dracut",
                self.runs,
                if self.kvm { "KVM" } else { "TCG" },
                self.kernel_version
            ),
            bands: Vec::new(),
            groups,
        })
    }

    /// The table, the breakdown and, last, `ratios vs stock dracut: size Xx, switch_root Yx`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "kernel {}, {}, {} boot(s) per variant, interleaved; times are kernel timestamps (s since kernel start)",
            self.kernel_version,
            if self.kvm { "KVM" } else { "TCG" },
            self.runs
        );
        let _ = writeln!(
            s,
            "{:<28} {:>12} {:>12} {:>15} {:>12} {:>12} {:>12}",
            "variant",
            "initramfs B",
            "switch_root",
            "min-max",
            "image init",
            "size vs (c)",
            "s_r vs (c)"
        );
        for r in &self.variants {
            let sr = r.switch_root();
            let ii = r.image_init();
            let (size_ratio, sr_ratio) = self.ratios(r.variant).unwrap_or((f64::NAN, f64::NAN));
            let _ = writeln!(
                s,
                "{:<28} {:>12} {:>12} {:>15} {:>12} {:>12} {:>12}",
                format!("({}) {}", r.variant.tag(), r.variant.label()),
                thousands(r.size_bytes),
                median(&sr).map_or("-".into(), |m| format!("{m:.3}")),
                min_max(&sr).map_or("-".into(), |(a, b)| format!("{a:.3}-{b:.3}")),
                median(&ii).map_or("-".into(), |m| format!("{m:.3}")),
                format!("{size_ratio:.1}x"),
                format!("{sr_ratio:.1}x"),
            );
        }
        let rss: Vec<u64> = self
            .variants
            .iter()
            .flat_map(|r| r.samples.iter().filter_map(|x| x.peak_rss_kib))
            .collect();
        let _ = writeln!(
            s,
            "kairos-init: static binary {} bytes; peak RSS {} KiB (median of {} boots of (a) and (b), max {})",
            thousands(self.init_binary_bytes),
            median(&rss.iter().map(|&x| x as f64).collect::<Vec<_>>())
                .map_or("-".into(), |m| format!("{m:.0}")),
            rss.len(),
            rss.iter().max().map_or("-".into(), |m| m.to_string())
        );
        let _ = writeln!(s, "where the time goes (median kernel timestamp, s):");
        for r in &self.variants {
            let parts: Vec<String> = r
                .variant
                .milestones()
                .iter()
                .enumerate()
                .map(|(i, (what, _))| {
                    let v: Vec<f64> = r
                        .samples
                        .iter()
                        .filter_map(|x| x.milestones.get(i).copied().flatten())
                        .collect();
                    format!(
                        "{what} {}",
                        median(&v).map_or("-".into(), |m| format!("{m:.3}"))
                    )
                })
                .collect();
            let _ = writeln!(s, "  ({}) {}", r.variant.tag(), parts.join(", "));
        }
        if !self.stock_modules.is_empty() {
            let _ = writeln!(
                s,
                "(c) dracut modules ({}): {}",
                self.stock_modules.len(),
                self.stock_modules.join(" ")
            );
        }
        let _ = writeln!(
            s,
            "build {:.0} s, boots {:.0} s",
            self.build_time.as_secs_f64(),
            self.boot_time.as_secs_f64()
        );
        for r in &self.retried {
            let _ = writeln!(s, "retried: {r}");
        }
        let (size, sr) = self.ratios(Variant::Ours).unwrap_or((f64::NAN, f64::NAN));
        let _ = write!(
            s,
            "ratios vs stock dracut: size {size:.1}x, switch_root {sr:.1}x"
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_image_init_and_rss_lines() {
        let log = "[    2.2] kairos-init: freed 7000 KiB of initramfs; peak RSS 2968 KiB; exec /sbin/init\nKAIROS-TEST: uptime=2.31\nKAIROS-TEST: hello from image=active pid=1\n";
        assert_eq!(parse_uptime(log), Some(2.31));
        assert_eq!(parse_peak_rss(log), Some(2968));
        assert_eq!(parse_uptime("KAIROS-TEST: hello\n"), None);
        assert_eq!(parse_uptime("KAIROS-TEST: uptime=\n"), None);
        assert_eq!(parse_peak_rss("peak RSS lots KiB"), None);
    }

    #[test]
    fn median_and_thousands() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(33_326_073), "33,326,073");
    }

    #[test]
    fn stock_switch_root_line_has_a_kernel_timestamp() {
        let log = "[    9.726423] systemd[1]: Switching root.\n";
        let needle = Variant::DracutStock.switch_root_needle();
        assert_eq!(boot::kmsg_time(log, needle), Some(9.726423));
    }

    fn sample(sr: f64, rss: Option<u64>) -> Sample {
        Sample {
            switch_root: sr,
            image_init: Some(sr + 0.1),
            peak_rss_kib: rss,
            milestones: vec![Some(1.0)],
            wall: Duration::from_secs(3),
            log: PathBuf::from("x.log"),
        }
    }

    fn report() -> BenchReport {
        let vr = |variant, size, srs: &[f64], rss| VariantResult {
            variant,
            initramfs: PathBuf::from("i.img"),
            size_bytes: size,
            samples: srs.iter().map(|&x| sample(x, rss)).collect(),
        };
        BenchReport {
            variants: vec![
                vr(Variant::Ours, 1_700_000, &[2.0, 2.2, 2.1], Some(3000)),
                vr(
                    Variant::DracutKairos,
                    2_000_000,
                    &[2.1, 2.1, 2.3],
                    Some(3100),
                ),
                vr(Variant::DracutStock, 34_000_000, &[9.0, 9.45, 10.0], None),
            ],
            init_binary_bytes: 1_390_272,
            kernel_version: "6.1.0-56-amd64".into(),
            kvm: false,
            runs: 3,
            stock_modules: vec!["systemd".into(), "base".into()],
            build_time: Duration::from_secs(60),
            boot_time: Duration::from_secs(100),
            retried: vec![
                "(a) run 2: the kernel hung before it ran /init (log a-2.hung.log); booted again"
                    .into(),
            ],
        }
    }

    #[test]
    fn only_a_boot_that_never_ran_init_counts_as_a_kernel_hang() {
        assert!(hung_before_init(
            "[    1.098108] NET: Registered PF_INET protocol family\n"
        ));
        assert!(!hung_before_init(
            "[    1.762665] Run /init as init process\n[    1.813368] kairos-init: starting\n"
        ));
    }

    #[test]
    fn svg_has_a_group_per_variant_and_a_bar_per_milestone() {
        let mut report = report();
        for r in &mut report.variants {
            let n = r.variant.milestones().len();
            for s in &mut r.samples {
                s.milestones = (0..n).map(|i| Some(0.5 + i as f64 * 0.25)).collect();
            }
        }
        // A milestone no boot logged is left out, not drawn at 0.
        report.variants[0]
            .samples
            .iter_mut()
            .for_each(|s| s.milestones[2] = None);
        let out = report.svg();
        for r in &report.variants {
            let heading = format!("({}) {}: switch_root ", r.variant.tag(), r.variant.label());
            assert!(
                out.contains(&format!(">{}", svg::escape(&heading))),
                "{heading}: {out}"
            );
            for (what, _) in r.variant.milestones() {
                assert!(out.contains(&format!(">{what}</text>")), "{what}: {out}");
            }
        }
        let bars: usize = report
            .variants
            .iter()
            .map(|r| r.variant.milestones().len())
            .sum();
        assert_eq!(out.matches("class=\"bar ").count(), bars - 1, "{out}");
        assert!(
            out.contains("switch_root 4.5x sooner than stock dracut"),
            "{out}"
        );
    }

    #[test]
    fn renders_table_and_last_line() {
        let report = report();
        let text = report.render();
        let last = text.lines().last().expect("lines");
        assert_eq!(last, "ratios vs stock dracut: size 20.0x, switch_root 4.5x");
        assert!(text.contains("1,390,272"), "{text}");
        assert!(
            text.contains("\nretried: (a) run 2: the kernel hung before it ran /init"),
            "{text}"
        );
        assert!(
            text.contains("peak RSS 3050 KiB (median of 6 boots"),
            "{text}"
        );
        assert!(text.contains("2.000-2.200"), "{text}");
        assert!(
            text.contains("(c) dracut modules (2): systemd base"),
            "{text}"
        );
        assert!(!text.ends_with('\n'));
    }
}
