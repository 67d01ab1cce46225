//! `kairos-qemu`: fetch a kernel, build an initramfs and a Kairos disk, boot them in QEMU.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use kairos_initramfs::InitramfsSpec;
use kairos_qemu::apt;
use kairos_qemu::bench;
use kairos_qemu::boot::{self, BootExit, BootSpec};
use kairos_qemu::disk;
use kairos_qemu::initramfs;
use kairos_qemu::kernel::{self, Kernel};
use kairos_qemu::ready;

const DEFAULT_INIT: &str = "target/x86_64-unknown-linux-gnu/release/kairos-init";
const DEMO_MARKER: &str = "KAIROS-TEST: done";

#[derive(Parser)]
#[command(name = "kairos-qemu", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install every Debian package the project and its tests use (idempotent), and fetch the kernel.
    Setup,
    /// Download and unpack Debian's current amd64 kernel.
    Kernel {
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Build a zstd cpio initramfs with kairos-init and the boot modules.
    Initramfs(InitramfsArgs),
    /// Build a Kairos-layout GPT disk image with GRUB.
    Disk(DiskArgs),
    /// Boot disks (or a kernel) in QEMU and watch the serial log.
    Boot(BootArgs),
    /// Build everything into ./out/ and boot the disk through GRUB.
    Demo {
        /// Use KVM instead of TCG (hangs nested guests on some hosts).
        #[arg(long)]
        kvm: bool,
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        timeout: u64,
    },
    /// Boot benchmark: our initramfs vs dracut + kairos-init vs stock dracut, same disk and
    /// kernel; with --ready, power-on to a ready node through GRUB.
    Bench(BenchArgs),
    /// Build (once, cached) the Debian 12 systemd test root tree with debootstrap; prints its path.
    Debian {
        /// The tree with kmod, udev and Debian's kernel installed (a Kairos user's image).
        #[arg(long)]
        kernel: bool,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Boots per variant (interleaved a, b, c, a, b, c, ...).
    #[arg(long, default_value_t = 5, value_name = "N")]
    runs: usize,
    /// Use KVM instead of TCG.
    #[arg(long)]
    kvm: bool,
    /// Virtual CPUs per boot (QEMU's -smp; TCG runs each on its own host thread).
    #[arg(long, default_value_t = 1, value_name = "N")]
    smp: u32,
    /// Where the images, the disk and every serial log go (kept).
    #[arg(long, value_name = "DIR", default_value = "out/bench")]
    work: PathBuf,
    /// The static kairos-init (default: built with cargo in this workspace when stale).
    #[arg(long, value_name = "PATH")]
    init: Option<PathBuf>,
    /// Per-boot timeout.
    #[arg(long, default_value_t = 180, value_name = "SECS")]
    boot_timeout: u64,
    /// Power-on to a ready node instead (issue 17): the Debian image with kairos-agent and
    /// the K3s stand-in through GRUB, our initramfs vs stock dracut, to the agent's ready
    /// file and the boot marked good.
    #[arg(long)]
    ready: bool,
    /// Also draw the comparison as an SVG timeline here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// The kairos-agent put in the image (with --ready; default: built with cargo in this
    /// workspace, in the profile this tool was built with).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
}

#[derive(Args)]
struct InitramfsArgs {
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The kairos-init binary to use as /init.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_INIT)]
    init: PathBuf,
    /// An unpacked kernel from `kairos-qemu kernel` (default: the cache).
    #[arg(long, value_name = "DIR")]
    kernel_dir: Option<PathBuf>,
    /// A module (or alias) to add to the defaults, with its dependencies.
    #[arg(long = "module", value_name = "NAME")]
    modules: Vec<String>,
    /// `kairos-build initramfs`'s generic module set (USB, SD/MMC, CD-ROM, ...) instead of
    /// the harness's smaller one.
    #[arg(long)]
    generic: bool,
}

/// How to leave an image file on the disk, for fallback tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ImageState {
    Ok,
    Missing,
    Zeros,
    Truncated,
    CorruptSuperblock,
}

impl From<ImageState> for disk::ImageState {
    fn from(s: ImageState) -> Self {
        match s {
            ImageState::Ok => disk::ImageState::Ok,
            ImageState::Missing => disk::ImageState::Missing,
            ImageState::Zeros => disk::ImageState::Zeros,
            ImageState::Truncated => disk::ImageState::Truncated,
            ImageState::CorruptSuperblock => disk::ImageState::CorruptSuperblock,
        }
    }
}

#[derive(Args)]
struct DiskArgs {
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[arg(long, value_name = "FILE")]
    initramfs: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    kernel_dir: Option<PathBuf>,
    /// Leave out the COS_PERSISTENT partition.
    #[arg(long)]
    no_persistent: bool,
    #[arg(long, value_enum, default_value_t = ImageState::Ok)]
    active: ImageState,
    #[arg(long, value_enum, default_value_t = ImageState::Ok)]
    passive: ImageState,
    #[arg(long, value_enum, default_value_t = ImageState::Ok)]
    recovery: ImageState,
}

#[derive(Args)]
struct BootArgs {
    /// Disk images, attached as virtio disks in order.
    #[arg(value_name = "FILE")]
    disks: Vec<PathBuf>,
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    #[arg(long, value_name = "CMDLINE")]
    append: Option<String>,
    #[arg(long, value_name = "FILE", default_value = "serial.log")]
    serial_log: PathBuf,
    /// Stop when this string appears on the serial console (repeatable).
    #[arg(long = "until", value_name = "MARKER")]
    until: Vec<String>,
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    timeout: u64,
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    memory: u32,
    #[arg(long)]
    kvm: bool,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kairos-qemu: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Setup => {
            apt::ensure_packages(kairos_qemu::ALL_PACKAGES)
                .context("installing Debian packages")?;
            let k = kernel::cached_or_fetch().context("fetching the kernel")?;
            println!(
                "packages ok; kernel {} in {}",
                k.version,
                k.modules_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kernel { out } => {
            let out = out.unwrap_or_else(|| kernel::default_cache_dir().join("kernel"));
            let k = kernel::fetch(&out).context("fetching the kernel")?;
            println!("kernel {}", k.version);
            println!("vmlinuz {}", k.vmlinuz.display());
            println!("modules {}", k.modules_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Initramfs(args) => {
            let k = load_kernel(args.kernel_dir.as_deref())?;
            build_initramfs(&args.init, k, &args.modules, args.generic, &args.out)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Disk(args) => {
            build_disk(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Boot(args) => boot_cmd(args),
        Cmd::Demo { kvm, timeout } => demo(kvm, Duration::from_secs(timeout)),
        Cmd::Bench(args) => bench_cmd(args),
        Cmd::Debian { kernel: false } => {
            let tree =
                kairos_qemu::debian::cached_or_build().context("building the Debian tree")?;
            println!("{}", tree.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Debian { kernel: true } => {
            let t = kairos_qemu::debian::cached_or_build_with_kernel()
                .context("building the Debian tree with its kernel")?;
            println!(
                "{} (kernel {}, {} bytes)",
                t.tree.display(),
                t.kver,
                t.bytes
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The kernel in `dir` (must already be fetched there), or the cached one, fetched if needed.
fn load_kernel(dir: Option<&Path>) -> Result<Kernel> {
    match dir {
        Some(d) => kernel::cached(d).with_context(|| {
            format!(
                "{}: no unpacked kernel (run `kairos-qemu kernel --out {}`)",
                d.display(),
                d.display()
            )
        }),
        None => kernel::cached_or_fetch().context("fetching the kernel"),
    }
}

fn build_initramfs(
    init: &Path,
    k: Kernel,
    extra: &[String],
    generic: bool,
    out: &Path,
) -> Result<()> {
    let mut modules = if generic {
        kairos_initramfs::generic_modules()
    } else {
        initramfs::default_modules()
    };
    for m in extra {
        if !modules.contains(m) {
            modules.push(m.clone());
        }
    }
    let spec = InitramfsSpec {
        init_binary: init.to_path_buf(),
        kernel: k,
        modules,
        extra_files: Vec::new(),
    };
    let report = kairos_initramfs::build(&spec, out)
        .with_context(|| format!("building the initramfs {}", out.display()))?;
    println!(
        "{}: {} bytes ({:.2} MiB; cpio {:.2} MiB), {} modules: {}",
        out.display(),
        report.size_bytes,
        report.size_bytes as f64 / 1048576.0,
        report.cpio_bytes as f64 / 1048576.0,
        report.modules.len(),
        report.modules.join(" ")
    );
    if !report.missing.is_empty() {
        println!(
            "missing (not in this kernel's tree): {}",
            report.missing.join(", ")
        );
    }
    Ok(())
}

/// Turns the `disk` arguments into the disk builder's spec.
fn disk_spec_from_args(args: &DiskArgs) -> Result<disk::DiskSpec> {
    let initramfs = args.initramfs.clone().with_context(
        || "--initramfs FILE is required (build one with `kairos-qemu initramfs --out FILE`)",
    )?;
    if !initramfs.is_file() {
        bail!("{}: no such initramfs", initramfs.display());
    }
    let k = load_kernel(args.kernel_dir.as_deref())?;
    let mut spec = disk::demo_spec(&args.out, k, initramfs);
    spec.persistent = !args.no_persistent;
    spec.active = args.active.into();
    spec.passive = args.passive.into();
    spec.recovery = args.recovery.into();
    Ok(spec)
}

fn build_disk(args: &DiskArgs) -> Result<()> {
    let spec = disk_spec_from_args(args)?;
    let report =
        disk::build(&spec).with_context(|| format!("building the disk {}", args.out.display()))?;
    println!(
        "{}: {} bytes ({} MiB)",
        args.out.display(),
        report.size_bytes,
        report.size_bytes >> 20
    );
    for (num, name, label, first, sectors) in &report.partitions {
        println!(
            "  {num}  {name:<12} {label:<16} first sector {first:>8}  {:>6} MiB",
            (sectors * 512) >> 20
        );
    }
    Ok(())
}

fn boot_cmd(args: BootArgs) -> Result<ExitCode> {
    let spec = BootSpec {
        disks: args.disks,
        kernel: args.kernel,
        initrd: args.initrd,
        append: args.append,
        memory_mb: args.memory,
        kvm: args.kvm,
        serial_log: args.serial_log,
        until: args.until,
        timeout: Duration::from_secs(args.timeout),
        extra_args: Vec::new(),
        netns: None,
    };
    let r = boot::run(&spec).context("running QEMU")?;
    println!("{}", r.tail(40));
    println!("--");
    println!(
        "{:?} after {:.1} s; marker: {}; serial log: {}",
        r.exit,
        r.elapsed.as_secs_f64(),
        r.matched.as_deref().unwrap_or("none"),
        spec.serial_log.display()
    );
    if !r.qemu_stderr.trim().is_empty() {
        eprintln!("qemu stderr:\n{}", r.qemu_stderr.trim_end());
    }
    Ok(if r.exit == BootExit::TimedOut {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn demo(kvm: bool, timeout: Duration) -> Result<ExitCode> {
    let workspace = workspace_root();
    let init = ensure_init_built(&workspace)?;
    let k = kernel::cached_or_fetch().context("fetching the kernel")?;
    let out = PathBuf::from("out");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let initrd = out.join("initramfs.img");
    build_initramfs(&init, k, &[], false, &initrd)?;
    let disk = out.join("disk.img");
    build_disk(&DiskArgs {
        out: disk.clone(),
        initramfs: Some(initrd),
        kernel_dir: None,
        no_persistent: false,
        active: ImageState::Ok,
        passive: ImageState::Ok,
        recovery: ImageState::Ok,
    })?;

    let mut spec = BootSpec::new(out.join("serial.log"));
    spec.disks.push(disk);
    spec.kvm = kvm;
    spec.until.push(DEMO_MARKER.to_string());
    spec.timeout = timeout;
    let r = boot::run(&spec).context("running QEMU")?;
    for line in r
        .log
        .lines()
        .filter(|l| l.contains("kairos-init:") || l.contains("KAIROS-TEST:"))
    {
        println!("{line}");
    }
    match boot::kmsg_time(&r.log, "kairos-init: switch_root") {
        Some(t) => println!("initramfs stage: {t:.3} s (kernel start → switch_root)"),
        None => println!("initramfs stage: no `kairos-init: switch_root` line in the log"),
    }
    println!(
        "{:?} after {:.1} s wall; serial log: {}",
        r.exit,
        r.elapsed.as_secs_f64(),
        spec.serial_log.display()
    );
    if r.matched.is_none() {
        eprintln!("marker `{DEMO_MARKER}` not seen; log tail:\n{}", r.tail(30));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_cmd(args: BenchArgs) -> Result<ExitCode> {
    let start = std::time::Instant::now();
    let init = match &args.init {
        Some(p) => p.clone(),
        None => ensure_init_built(&workspace_root())?,
    };
    if args.ready {
        return ready_cmd(args, init, start);
    }
    if args.agent.is_some() {
        bail!("--agent goes with --ready");
    }
    let spec = bench::BenchSpec {
        runs: args.runs,
        kvm: args.kvm,
        smp: args.smp.max(1),
        work: args.work,
        init_binary: init,
        kernel: kernel::cached_or_fetch().context("fetching the kernel")?,
        boot_timeout: Duration::from_secs(args.boot_timeout),
    };
    let report =
        bench::run(&spec, &mut |line| println!("{line}")).context("running the benchmark")?;
    if let Some(svg) = &args.svg {
        std::fs::write(svg, report.svg()).with_context(|| format!("writing {}", svg.display()))?;
        println!("SVG: {}", svg.display());
    }
    println!(
        "bench wall time {:.0} s; serial logs in {}",
        start.elapsed().as_secs_f64(),
        spec.work.join("logs").display()
    );
    println!("{}", report.render());
    Ok(ExitCode::SUCCESS)
}

/// `bench --ready`: power-on to a ready node, our initramfs vs stock dracut.
fn ready_cmd(args: BenchArgs, init: PathBuf, start: std::time::Instant) -> Result<ExitCode> {
    let workspace = workspace_root();
    let agent = match args.agent {
        Some(p) => p,
        None => build_agent(&workspace)?,
    };
    let spec = ready::ReadySpec {
        runs: args.runs,
        kvm: args.kvm,
        smp: args.smp,
        work: args.work,
        init_binary: init,
        agent_binary: agent,
        units_dir: workspace.join("agent/systemd"),
        kernel: kernel::cached_or_fetch().context("fetching the kernel")?,
        boot_timeout: Duration::from_secs(args.boot_timeout),
    };
    let report =
        ready::run(&spec, &mut |line| println!("{line}")).context("running the ready benchmark")?;
    if let Some(svg) = &args.svg {
        std::fs::write(svg, report.svg()).with_context(|| format!("writing {}", svg.display()))?;
        println!("SVG: {}", svg.display());
    }
    println!("bench wall time {:.0} s", start.elapsed().as_secs_f64());
    println!("{}", report.render());
    Ok(ExitCode::SUCCESS)
}

/// kairos-agent built with cargo in the profile this tool was built with (the directory it
/// runs from, e.g. `release` or `ci`; `release` when that is not a cargo profile directory).
fn build_agent(workspace: &Path) -> Result<PathBuf> {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let profile = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.file_name()?.to_string_lossy().into_owned()))
        .map(|p| if p == "debug" { "dev".to_string() } else { p })
        .filter(|p| p != "deps")
        .unwrap_or_else(|| "release".into());
    println!("building kairos-agent (cargo build --profile {profile} -p kairos-agent)");
    let status = Command::new("cargo")
        .args([
            "build",
            "--profile",
            &profile,
            "-p",
            "kairos-agent",
            "--bin",
            "kairos-agent",
        ])
        .current_dir(workspace)
        .status()
        .context("running cargo build for kairos-agent")?;
    if !status.success() {
        bail!("cargo build --profile {profile} -p kairos-agent failed ({status})");
    }
    let binary = target_dir
        .join("x86_64-unknown-linux-gnu")
        .join(&profile)
        .join("kairos-agent");
    if !binary.is_file() {
        bail!("{} missing after the build", binary.display());
    }
    Ok(binary)
}

/// The workspace this tool was built from: the demo builds kairos-init there.
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The release kairos-init, rebuilt with cargo when missing or older than its sources.
fn ensure_init_built(workspace: &Path) -> Result<PathBuf> {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let binary = target_dir.join("x86_64-unknown-linux-gnu/release/kairos-init");
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
    let newest_source = newest_mtime(&workspace.join("init/src"))
        .max(newest_mtime(&workspace.join("init/Cargo.toml")));
    let stale = match (built, newest_source) {
        (None, _) => true,
        (Some(b), Some(s)) => s > b,
        (Some(_), None) => false,
    };
    if stale {
        println!("building kairos-init (cargo build --release -p kairos-init)");
        let status = Command::new("cargo")
            .args(["build", "--release", "-p", "kairos-init"])
            .current_dir(workspace)
            .status()
            .context("running cargo build for kairos-init")?;
        if !status.success() {
            bail!("cargo build --release -p kairos-init failed ({status})");
        }
    }
    if !binary.is_file() {
        bail!("{} missing after the build", binary.display());
    }
    Ok(binary)
}

/// The latest modification time of a file or anything below a directory.
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let own = meta.modified().ok();
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .chain(own)
        .max()
}
