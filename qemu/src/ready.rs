//! `kairos-qemu bench --ready` (issue 17): power-on to a ready node, side by side. The Debian
//! 12 systemd image ([`crate::debian`]) with kairos-agent, its units and the K3s stand-in
//! ([`crate::rootfs::K3S_STANDIN`] as `/usr/bin/k3s`, K3s enabled by a COS_OEM config) on one
//! Kairos disk, booted through SeaBIOS and GRUB, timed from QEMU's start to the agent's ready
//! file (`kairos-agent: milestone ready`) and to the boot marked good with the stand-in K3s
//! (`kairos-agent: milestone marked good`), in two variants:
//!
//! 1. our initramfs (kairos-init): GRUB's `cos` entry, as an installed node boots;
//! 2. a stock Debian dracut initramfs (systemd in the initramfs, [`crate::dracut`]) booting the
//!    same image the generic way: the active image file is also attached as its own virtio
//!    disk (a filesystem labelled COS_ACTIVE), and COS_STATE's `grubcustom` (which grub.cfg
//!    sources after its entries) adds an entry `bench-stock` when GRUB finds that label on a
//!    disk and makes it the default: kernel and initrd from the filesystem's `/boot` (the
//!    dracut image is `/boot/initrd-dracut` inside the same image), `root=LABEL=COS_ACTIVE
//!    rw`. The Kairos disk stays attached in this variant too: the agent needs COS_OEM (its
//!    config, the grubenv mark-good writes), which nothing but kairos-init mounts, so the
//!    image carries a unit that mounts it on /oem when /oem is no mount point yet (a no-op
//!    under kairos-init). `rw` because the image has no fstab to remount / read-write from and
//!    the agent writes K3s' configuration under /etc (kairos-init gives /etc an overlay).
//!
//! Every boot runs with `-snapshot`: the disks are as built at each power-on, whatever the
//! previous boot wrote (mark-good's grubenv, COS_PERSISTENT). GRUB's menu timeout is 0.
//!
//! Where the time goes, per phase: firmware+GRUB is host-measured, the kernel's start on the
//! host clock ([`kernel_start`]: serial lines timestamped as they reach the host); every
//! later mark is a kernel timestamp on the serial console: the kernel running `/init`, the
//! hand-off to the image (`kairos-init: switch_root`, systemd's `Switching root.` with
//! `systemd.log_target=kmsg`), and the agent's own milestone lines in /dev/kmsg.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kairos_util::IoResultExt;
use kairos_util::svg::{self, Band, Chart, Group, Row};

use crate::bench::{self, BenchError, median, thousands};
use crate::boot::{self, BootSpec};
use crate::debian;
use crate::disk::{self, ImageState};
use crate::dracut::{self, DracutKind};
use crate::grub::BASE_CMDLINE;
use crate::kernel::Kernel;

/// The kernel line when it hands over to the initramfs (both variants have one).
pub const RUN_INIT: &str = "Run /init as init process";
/// kairos-agent's kmsg milestones (agent/src/daemon.rs).
pub const AGENT_START: &str = "kairos-agent: milestone start";
pub const AGENT_READY: &str = "kairos-agent: milestone ready";
pub const AGENT_MARKED: &str = "kairos-agent: milestone marked good";
/// On every entry's command line: systemd's log in kmsg (kernel timestamps), userspace kmsg
/// writes never rate-limited.
pub const BENCH_CMDLINE: &str = "systemd.log_target=kmsg systemd.log_level=info printk.devkmsg=on";
/// The stock variant's entry id in `grubcustom`.
pub const STOCK_ENTRY: &str = "bench-stock";
/// The stock dracut image inside the active image.
pub const STOCK_INITRD: &str = "/boot/initrd-dracut";
/// K3s on, so the daemon starts the stand-in and mark-good waits for its `/readyz`.
pub const OEM_CONFIG: &str = "#cloud-config\nk3s:\n  enabled: true\n";
/// Mounts COS_OEM on /oem when the initramfs did not (the stock variant); util-linux's mount
/// finds the label by probing, the image has no udev.
pub const OEM_UNIT: &str = "[Unit]
Description=COS_OEM on /oem when the initramfs did not mount it (bench --ready, stock dracut)
DefaultDependencies=no
ConditionPathIsMountPoint=!/oem
After=local-fs-pre.target
Before=local-fs.target kairos-agent-fs.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mount LABEL=COS_OEM /oem

[Install]
WantedBy=local-fs.target
";
pub const OEM_UNIT_NAME: &str = "kairos-bench-oem.service";

/// The phases, in boot order; their durations add up to the ready time, plus the last one.
pub const PHASES: [&str; 6] = [
    "firmware+GRUB",
    "kernel",
    "initramfs",
    "systemd to agent",
    "agent to ready",
    "ready to mark-good",
];
/// The SVG class of each phase (kairos_util::svg's colours).
const PHASE_CLASSES: [&str; 6] = [
    "firmware",
    "kernel",
    "initramfs",
    "userland",
    "agent",
    "ready",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyVariant {
    Ours,
    Stock,
}

impl ReadyVariant {
    pub const ALL: [ReadyVariant; 2] = [ReadyVariant::Ours, ReadyVariant::Stock];

    pub fn tag(self) -> &'static str {
        match self {
            ReadyVariant::Ours => "1",
            ReadyVariant::Stock => "2",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            ReadyVariant::Ours => "kairos-init initramfs",
            ReadyVariant::Stock => "stock dracut (systemd)",
        }
    }

    pub fn switch_root_needle(self) -> &'static str {
        match self {
            ReadyVariant::Ours => "kairos-init: switch_root",
            ReadyVariant::Stock => "systemd[1]: Switching root.",
        }
    }
}

/// COS_STATE's `grubcustom`: the stock entry, the default when GRUB sees a filesystem
/// labelled COS_ACTIVE on some disk (only the stock variant attaches one).
pub fn grubcustom() -> String {
    format!(
        r#"# kairos-qemu bench --ready, variant (2): the image's own filesystem on a disk of its own,
# booted the generic way with the stock dracut initramfs.
set bench_root=
search --no-floppy --label --set=bench_root COS_ACTIVE
if [ -n "${{bench_root}}" ]; then
  export bench_root
  menuentry "Debian, stock dracut" --id {STOCK_ENTRY} {{
    echo "KAIROS-GRUB: entry={STOCK_ENTRY} root=${{bench_root}}"
    linux (${{bench_root}})/boot/vmlinuz {BASE_CMDLINE} {BENCH_CMDLINE} root=LABEL=COS_ACTIVE rw rd.kairos.boot_reason=${{kairos_boot_entry}}:${{kairos_boot_reason}}
    initrd (${{bench_root}}){STOCK_INITRD}
  }}
  set default={STOCK_ENTRY}
fi
"#
    )
}

#[derive(Debug, Clone)]
pub struct ReadySpec {
    pub runs: usize,
    pub kvm: bool,
    /// Virtual CPUs (`-smp`).
    pub smp: u32,
    pub work: PathBuf,
    pub init_binary: PathBuf,
    pub agent_binary: PathBuf,
    /// The agent's systemd units (`agent/systemd`).
    pub units_dir: PathBuf,
    pub kernel: Kernel,
    pub boot_timeout: Duration,
}

/// One boot: seconds since QEMU started, and each phase's duration.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadySample {
    pub ready: f64,
    pub marked_good: f64,
    /// One per [`PHASES`].
    pub phases: [f64; 6],
}

#[derive(Debug, Clone)]
pub struct ReadyVariantResult {
    pub variant: ReadyVariant,
    pub initramfs_bytes: u64,
    pub samples: Vec<ReadySample>,
}

impl ReadyVariantResult {
    pub fn ready(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.ready).collect()
    }
    pub fn marked_good(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.marked_good).collect()
    }
    pub fn phase(&self, i: usize) -> Vec<f64> {
        self.samples.iter().map(|s| s.phases[i]).collect()
    }
}

#[derive(Debug, Clone)]
pub struct ReadyReport {
    pub variants: Vec<ReadyVariantResult>,
    pub kernel_version: String,
    pub kvm: bool,
    pub smp: u32,
    pub runs: usize,
    pub build_time: Duration,
    pub boot_time: Duration,
    pub logs: PathBuf,
}

/// The printk timestamp a line starts with (`[    1.234567] …`).
pub fn line_ktime(line: &str) -> Option<f64> {
    let rest = line.strip_prefix('[')?;
    let close = rest.find(']')?;
    rest[..close].trim().parse().ok()
}

/// The kernel's start on the host clock (seconds since QEMU started): each kernel-timestamped
/// line reached the host at `times[i]`, no sooner than the kernel's start plus its timestamp,
/// so the smallest `arrival - timestamp` is the closest bound. Lines buffered before the
/// serial console registered arrive late and do not lower it; the ones printed after come
/// within one poll of the host's reader.
pub fn kernel_start(log: &str, times: &[Duration]) -> Option<f64> {
    log.lines()
        .zip(times)
        .filter_map(|(line, at)| Some(at.as_secs_f64() - line_ktime(line)?))
        .min_by(f64::total_cmp)
}

/// One boot's figures from its serial log and line arrival times; Err names the mark missing.
pub fn parse_sample(
    variant: ReadyVariant,
    log: &str,
    times: &[Duration],
) -> Result<ReadySample, &'static str> {
    let k0 = kernel_start(log, times).ok_or("a kernel-timestamped line")?;
    let at = |needle: &'static str| boot::kmsg_time(log, needle).ok_or(needle);
    let run_init = at(RUN_INIT)?;
    let switch_root = at(variant.switch_root_needle())?;
    let start = at(AGENT_START)?;
    let ready = at(AGENT_READY)?;
    let marked = at(AGENT_MARKED)?;
    Ok(ReadySample {
        ready: k0 + ready,
        marked_good: k0 + marked,
        phases: [
            k0,
            run_init,
            switch_root - run_init,
            start - switch_root,
            ready - start,
            marked - ready,
        ],
    })
}

fn spread(values: &[f64]) -> String {
    let min = values.iter().copied().min_by(f64::total_cmp);
    let max = values.iter().copied().max_by(f64::total_cmp);
    match (min, max) {
        (Some(a), Some(b)) => format!("{a:.2}-{b:.2}"),
        _ => "-".into(),
    }
}

fn fmt_median(values: &[f64]) -> String {
    median(values).map_or("-".into(), |m| format!("{m:.2}"))
}

impl ReadyReport {
    fn get(&self, v: ReadyVariant) -> Option<&ReadyVariantResult> {
        self.variants.iter().find(|r| r.variant == v)
    }

    /// Stock median ready time / ours.
    pub fn ratio(&self) -> Option<f64> {
        let stock = median(&self.get(ReadyVariant::Stock)?.ready())?;
        let ours = median(&self.get(ReadyVariant::Ours)?.ready())?;
        Some(stock / ours)
    }

    /// The table, the per-phase medians and, last, `ready ratio vs stock dracut: X.XXx`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "power-on to ready: Debian 12 + systemd + kairos-agent + K3s stand-in through SeaBIOS and GRUB; kernel {}, {}, -smp {}, {} boot(s) per variant, interleaved; s since QEMU start",
            self.kernel_version,
            if self.kvm { "KVM" } else { "TCG" },
            self.smp,
            self.runs
        );
        let _ = writeln!(
            s,
            "{:<28} {:>12} {:>8} {:>12} {:>10} {:>12}",
            "variant", "initramfs B", "ready", "min-max", "mark-good", "min-max"
        );
        for r in &self.variants {
            let _ = writeln!(
                s,
                "{:<28} {:>12} {:>8} {:>12} {:>10} {:>12}",
                format!("({}) {}", r.variant.tag(), r.variant.label()),
                thousands(r.initramfs_bytes),
                fmt_median(&r.ready()),
                spread(&r.ready()),
                fmt_median(&r.marked_good()),
                spread(&r.marked_good()),
            );
        }
        let _ = writeln!(
            s,
            "where the time goes (median s per phase; firmware+GRUB on the host clock, the rest kernel timestamps):"
        );
        let mut head = format!("{:<28}", "variant");
        for p in PHASES {
            let _ = write!(head, " {p:>18}");
        }
        let _ = writeln!(s, "{head}");
        for r in &self.variants {
            let mut line = format!(
                "{:<28}",
                format!("({}) {}", r.variant.tag(), r.variant.label())
            );
            for i in 0..PHASES.len() {
                let _ = write!(line, " {:>18}", fmt_median(&r.phase(i)));
            }
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(
            s,
            "build {:.0} s, boots {:.0} s; serial logs in {}",
            self.build_time.as_secs_f64(),
            self.boot_time.as_secs_f64(),
            self.logs.display()
        );
        let _ = write!(
            s,
            "ready ratio vs stock dracut: {:.2}x",
            self.ratio().unwrap_or(f64::NAN)
        );
        s
    }

    /// The comparison as an SVG timeline: one group per variant, one bar per phase (medians,
    /// laid end to end from QEMU's start), the ready and marked-good medians in the heading.
    pub fn svg(&self) -> String {
        let groups = self
            .variants
            .iter()
            .map(|r| {
                let mut t = 0.0;
                let rows = PHASES
                    .iter()
                    .zip(PHASE_CLASSES)
                    .enumerate()
                    .map(|(i, (p, class))| {
                        let d = median(&r.phase(i)).unwrap_or(0.0);
                        let row = Row::new(*p, t, t + d, class);
                        t += d;
                        row
                    })
                    .collect();
                Group::titled(
                    format!(
                        "({}) {}: ready {} s, marked good {} s",
                        r.variant.tag(),
                        r.variant.label(),
                        fmt_median(&r.ready()),
                        fmt_median(&r.marked_good())
                    ),
                    rows,
                )
            })
            .collect();
        let bands = self
            .get(ReadyVariant::Ours)
            .and_then(|r| median(&r.ready()))
            .map(|m| vec![Band::new("ours ready", 0.0, m, "ours")])
            .unwrap_or_default();
        svg::render(&Chart {
            title: format!(
                "Power-on to ready node ({} boot(s) each, {}, -smp {}): ready ratio vs stock dracut {:.2}x",
                self.runs,
                if self.kvm { "KVM" } else { "TCG" },
                self.smp,
                self.ratio().unwrap_or(f64::NAN)
            ),
            bands,
            groups,
        })
    }
}

/// The agent's units: every `*.service` / `*.timer` in `dir`.
fn read_units(dir: &Path) -> Result<Vec<(String, String)>, BenchError> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).at(dir, "listing")? {
        let e = e.at(dir, "listing")?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".service") || name.ends_with(".timer") {
            let path = e.path();
            out.push((name, fs::read_to_string(&path).at(&path, "reading")?));
        }
    }
    out.sort();
    Ok(out)
}

/// Builds both initramfs images, the image and the disk, then boots each variant `runs` times,
/// interleaved. `progress` gets one line per step.
pub fn run(spec: &ReadySpec, progress: &mut dyn FnMut(&str)) -> Result<ReadyReport, BenchError> {
    if spec.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    let build_start = Instant::now();
    fs::create_dir_all(&spec.work).at(&spec.work, "creating")?;

    let (ours, ours_report) = bench::build_ours(&spec.work, &spec.init_binary, &spec.kernel)?;
    progress(&format!(
        "(1) {}: {} bytes",
        ours.display(),
        thousands(ours_report.size_bytes)
    ));
    let stock = spec.work.join("initramfs-dracut-stock.img");
    let stock_report =
        dracut::build(DracutKind::Stock, &spec.kernel, None, &stock).map_err(|source| {
            BenchError::Dracut {
                path: stock.clone(),
                err: Box::new(source),
            }
        })?;
    progress(&format!(
        "(2) {}: {} bytes in {:.1} s",
        stock.display(),
        thousands(stock_report.size_bytes),
        stock_report.elapsed.as_secs_f64()
    ));

    let base = debian::cached_or_build()?;
    let tree = spec.work.join("debian.tree");
    debian::copy_tree(&base, &tree)?;
    for (unit, text) in read_units(&spec.units_dir)? {
        debian::install_unit(&tree, &unit, &text)?;
    }
    debian::install_unit(&tree, OEM_UNIT_NAME, OEM_UNIT)?;
    let stock_bytes = fs::read(&stock).at(&stock, "reading")?;

    let disk_path = spec.work.join("disk.img");
    let disk_work = spec.work.join("disk.work");
    let mut dspec = disk::demo_spec(&disk_path, &spec.kernel, &ours);
    dspec.work_dir = Some(disk_work.clone());
    dspec.tree = Some(tree.clone());
    dspec.agent = Some(spec.agent_binary.clone());
    dspec.k3s_standin = true;
    dspec.passive = ImageState::Missing;
    dspec.recovery = ImageState::Missing;
    dspec
        .image_files
        .push((STOCK_INITRD.into(), stock_bytes, 0o644));
    dspec
        .oem_files
        .push(("90_bench.yaml".into(), OEM_CONFIG.as_bytes().to_vec()));
    dspec
        .state_files
        .push(("grubcustom".into(), grubcustom().into_bytes()));
    dspec.grub_timeout = 0;
    dspec.extra_cmdline = BENCH_CMDLINE.into();
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
    let _ = fs::remove_dir_all(&tree);
    progress(&format!(
        "disk {} and its active image {} (attached as a second disk for (2))",
        disk_path.display(),
        active.display()
    ));
    let build_time = build_start.elapsed();

    let mut variants = vec![
        ReadyVariantResult {
            variant: ReadyVariant::Ours,
            initramfs_bytes: ours_report.size_bytes,
            samples: Vec::new(),
        },
        ReadyVariantResult {
            variant: ReadyVariant::Stock,
            initramfs_bytes: stock_report.size_bytes,
            samples: Vec::new(),
        },
    ];
    let logs = spec.work.join("logs-ready");
    fs::create_dir_all(&logs).at(&logs, "creating")?;
    let boot_start = Instant::now();
    for run in 1..=spec.runs {
        for v in variants.iter_mut() {
            let tag = v.variant.tag();
            let log = logs.join(format!("{tag}-{run}.log"));
            let mut bs = BootSpec::new(&log);
            bs.disks.push(disk_path.clone());
            if v.variant == ReadyVariant::Stock {
                bs.disks.push(active.clone());
            }
            bs.memory_mb = 768;
            bs.kvm = spec.kvm;
            bs.until = vec![AGENT_MARKED.into(), "Kernel panic".into()];
            bs.timeout = spec.boot_timeout;
            // -smp after the harness's own `-smp 1`: QEMU takes the last one.
            bs.extra_args = vec!["-snapshot".into(), "-smp".into(), spec.smp.to_string()];
            let (r, times) = boot::run_timed(&bs).map_err(|source| BenchError::Boot {
                tag,
                run,
                err: Box::new(source),
            })?;
            let sample =
                parse_sample(v.variant, &r.log, &times).map_err(|what| BenchError::Missing {
                    tag,
                    run,
                    what,
                    log: log.clone(),
                    tail: r.tail(30),
                })?;
            progress(&format!(
                "run {run}/{} ({tag}) {:<24} ready {:.2} s, marked good {:.2} s, wall {:.1} s",
                spec.runs,
                v.variant.label(),
                sample.ready,
                sample.marked_good,
                r.elapsed.as_secs_f64()
            ));
            v.samples.push(sample);
        }
    }
    Ok(ReadyReport {
        variants,
        kernel_version: spec.kernel.version.clone(),
        kvm: spec.kvm,
        smp: spec.smp,
        runs: spec.runs,
        build_time,
        boot_time: boot_start.elapsed(),
        logs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A serial log: GRUB lines, kernel lines buffered before the console came up (they
    /// arrive late), then lines as printed; arrival times per line.
    fn log_and_times(v: ReadyVariant) -> (String, Vec<Duration>) {
        let lines: Vec<(&str, f64)> = vec![
            ("KAIROS-GRUB: start", 1.0),
            ("KAIROS-GRUB: entry=cos reason=", 1.2),
            ("[    0.000000] Linux version 6.1.0", 4.9),
            ("[    0.400000] console [ttyS0] enabled", 4.9),
            ("[    0.900000] Freeing initrd memory", 5.0),
            ("[    1.000000] Run /init as init process", 5.0),
            (
                match v {
                    ReadyVariant::Ours => "[    1.500000] kairos-init: switch_root to /sysroot",
                    ReadyVariant::Stock => "[    1.500000] systemd[1]: Switching root.",
                },
                5.55,
            ),
            ("[    3.000000] kairos-agent: milestone start", 7.03),
            (
                "[    3.250000] kairos-agent[301]: kairos-agent: daemon 0.1 starting",
                7.5,
            ),
            ("[    3.500000] kairos-agent: milestone ready", 7.6),
            ("[    3.600000] kairos-agent: milestone marked good", 7.64),
            ("unterminated", 9.0),
        ];
        let log = lines.iter().map(|(l, _)| *l).collect::<Vec<_>>().join("\n");
        let times = lines[..lines.len() - 1]
            .iter()
            .map(|(_, t)| Duration::from_secs_f64(*t))
            .collect();
        (log, times)
    }

    #[test]
    fn kernel_start_is_the_tightest_arrival_bound() {
        let (log, times) = log_and_times(ReadyVariant::Ours);
        let k0 = kernel_start(&log, &times).unwrap();
        assert!((k0 - 4.0).abs() < 1e-9, "{k0}");
        assert_eq!(line_ktime("[   12.5] x"), Some(12.5));
        assert_eq!(line_ktime("x [1.0]"), None);
        assert_eq!(line_ktime("[ abc] x"), None);
        assert_eq!(
            kernel_start("KAIROS-GRUB: start\n", &[Duration::ZERO]),
            None
        );
        // Fewer arrival times than lines: the untimed lines are not used.
        assert_eq!(
            kernel_start("[ 1.0] a\n[ 0.5] b", &[Duration::from_secs(3)]),
            Some(2.0)
        );
    }

    #[test]
    fn phases_add_up_to_ready() {
        for v in ReadyVariant::ALL {
            let (log, times) = log_and_times(v);
            let s = parse_sample(v, &log, &times).unwrap();
            let want = [4.0, 1.0, 0.5, 1.5, 0.5, 0.1];
            for (got, want) in s.phases.iter().zip(want) {
                assert!((got - want).abs() < 1e-9, "{v:?} {:?}", s.phases);
            }
            assert!((s.ready - 7.5).abs() < 1e-9);
            assert!((s.marked_good - 7.6).abs() < 1e-9);
            assert!((s.phases[..5].iter().sum::<f64>() - s.ready).abs() < 1e-9);
        }
        // The other variant's hand-off line is no substitute.
        let (log, times) = log_and_times(ReadyVariant::Ours);
        assert_eq!(
            parse_sample(ReadyVariant::Stock, &log, &times),
            Err("systemd[1]: Switching root.")
        );
        let cut = log.replace("milestone marked good", "x");
        assert_eq!(
            parse_sample(ReadyVariant::Ours, &cut, &times),
            Err(AGENT_MARKED)
        );
    }

    fn report() -> ReadyReport {
        let sample = |ready: f64, fw: f64| ReadySample {
            ready,
            marked_good: ready + 0.2,
            phases: [fw, 1.0, 0.5, ready - fw - 2.0, 0.5, 0.2],
        };
        ReadyReport {
            variants: vec![
                ReadyVariantResult {
                    variant: ReadyVariant::Ours,
                    initramfs_bytes: 1_700_000,
                    samples: vec![sample(10.0, 4.0), sample(11.0, 4.2), sample(10.5, 4.1)],
                },
                ReadyVariantResult {
                    variant: ReadyVariant::Stock,
                    initramfs_bytes: 34_000_000,
                    samples: vec![sample(16.0, 5.0), sample(14.0, 5.2), sample(15.75, 5.1)],
                },
            ],
            kernel_version: "6.1.0-56-amd64".into(),
            kvm: false,
            smp: 2,
            runs: 3,
            build_time: Duration::from_secs(90),
            boot_time: Duration::from_secs(100),
            logs: PathBuf::from("out/bench/logs-ready"),
        }
    }

    #[test]
    fn renders_table_phases_and_last_line() {
        let text = report().render();
        let last = text.lines().last().unwrap();
        assert_eq!(last, "ready ratio vs stock dracut: 1.50x");
        assert!(text.contains("-smp 2, 3 boot(s)"), "{text}");
        assert!(text.contains("10.00-11.00"), "{text}");
        assert!(text.contains("14.00-16.00"), "{text}");
        assert!(text.contains("34,000,000"), "{text}");
        for p in PHASES {
            assert!(text.contains(p), "{p}: {text}");
        }
        let ours = text
            .lines()
            .filter(|l| l.starts_with("(1) kairos-init initramfs"))
            .nth(1)
            .unwrap();
        // Medians per phase: firmware 4.10, kernel 1.00, …, systemd to agent 4.40.
        assert!(ours.contains("4.10") && ours.contains("4.40"), "{ours}");
        assert!(!text.ends_with('\n'));
    }

    #[test]
    fn svg_draws_every_phase_of_both_variants() {
        let out = report().svg();
        assert!(out.starts_with("<svg") || out.starts_with("<?xml"), "{out}");
        for p in PHASES {
            assert_eq!(
                out.matches(&format!(">{}<", svg::escape(p))).count(),
                2,
                "{p}"
            );
        }
        assert!(out.contains("ready ratio vs stock dracut 1.50x"));
        assert!(out.contains("(2) stock dracut (systemd): ready 15.75 s"));
    }

    #[test]
    fn grubcustom_adds_the_stock_entry_only_when_the_label_is_there() {
        let g = grubcustom();
        assert!(g.contains("search --no-floppy --label --set=bench_root COS_ACTIVE"));
        assert!(g.contains(&format!("--id {STOCK_ENTRY}")));
        assert!(g.contains("root=LABEL=COS_ACTIVE rw"));
        assert!(g.contains(&format!("initrd (${{bench_root}}){STOCK_INITRD}")));
        assert!(g.contains(BENCH_CMDLINE));
        // The default is set inside the `if`, after the entry.
        let entry = g.find("menuentry").unwrap();
        let default = g.find(&format!("set default={STOCK_ENTRY}")).unwrap();
        assert!(default > entry && default < g.rfind("fi").unwrap());
    }
}
