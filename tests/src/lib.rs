//! Shared harness for the QEMU boot tests: builds kairos-init, fetches the kernel, builds the
//! initramfs once per test process, builds disks per test and boots them.

pub mod diskimg;
pub mod hardening;
pub mod iso;
pub mod mesh;
pub mod registry;
pub mod sites;
pub mod tapnet;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kairos_qemu::boot::{BootResult, BootSpec};
use kairos_qemu::disk::DiskSpec;
use kairos_qemu::kernel::Kernel;

/// The command line GRUB passes for the active entry (SPEC.md section 2), used for direct
/// kernel boots that test kairos-init without GRUB in the way.
pub const BASE_CMDLINE: &str = "console=tty1 console=ttyS0,115200 net.ifnames=1 rd.cos.oemlabel=COS_OEM rd.cos.oemtimeout=2 panic=5 rd.emergency=reboot rd.shell=0 rd.kairos.rebootdelay=2";
pub const ACTIVE: &str = "root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img";
pub const PASSIVE: &str = "root=LABEL=COS_PASSIVE cos-img/filename=/cOS/passive.img";
pub const RECOVERY: &str =
    "root=live:LABEL=COS_RECOVERY rd.live.dir=/ rd.live.squashimg=/cOS/recovery.squashfs";
pub const DONE: &str = "KAIROS-TEST: done";

pub struct Artifacts {
    pub kernel: Kernel,
    pub init_binary: PathBuf,
    pub initramfs: PathBuf,
    pub work: PathBuf,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where tests put disks and logs: under target/, so `cargo clean` removes them.
/// `KAIROS_TEST_DIR` overrides it, so two runs on one machine do not share files.
pub fn work_dir() -> PathBuf {
    std::env::var_os("KAIROS_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/kairos-tests"))
}

/// Runs a host command that must succeed; panics with its status, stdout and stderr otherwise.
/// Returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Boot tests need root (loop devices in the guest are fine, but building disks with GRUB and
/// installing Debian packages is not). Without root the test fails and says why: a test that
/// cannot run must never pass.
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "QEMU boot tests need root (they install packages and build disks): run them as root"
    );
}

/// The cargo profile the binaries for test images are built with: `KAIROS_TEST_PROFILE`
/// (scripts/test sets `ci`, the profile it runs the tests with, so nothing is built twice),
/// else `release`.
pub fn test_profile() -> String {
    std::env::var("KAIROS_TEST_PROFILE")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "release".into())
}

/// Builds binary `name` of this workspace (static, as the images need) with `profile`.
/// `whole`: as `cargo build --workspace --all-targets`, whose feature unification is the one
/// `cargo test --workspace` used, so under scripts/test nothing is compiled again (a lone
/// `-p NAME` unifies features differently and rebuilds ring, libp2p and the agent).
/// Variables `cargo test` gives a test process about its own package. A cargo started from a
/// test must not inherit them: build scripts such as ring's ask to be rerun when
/// `CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR` or `OUT_DIR` change, so that cargo would rebuild ring
/// and everything above it (the agent, libp2p: 3 min of a clean run's boot suite) although
/// `scripts/test` had just built them.
pub fn is_test_package_env(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// `cargo` (the one running the tests) in the workspace root, without the test process's
/// package variables ([`is_test_package_env`]).
pub fn cargo_command() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(is_test_package_env) {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn cargo_build_with(name: &str, profile: &str, whole: bool) -> Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = cargo_command();
    cmd.args(["build", "--profile", profile]);
    if whole {
        cmd.args(["--workspace", "--all-targets"]);
    } else {
        cmd.args(["-p", name, "--bin", name]);
    }
    let status = cmd
        .status()
        .with_context(|| format!("running cargo build for {name}"))?;
    if !status.success() {
        bail!("cargo build for {name} failed");
    }
    let bin = root
        .join("target/x86_64-unknown-linux-gnu")
        .join(profile)
        .join(name);
    if !bin.is_file() {
        bail!("cargo build did not make {}", bin.display());
    }
    Ok(bin)
}

/// [`cargo_build_with`] the [`test_profile`]: with `ci` the whole workspace (already built
/// by `cargo test`), with another profile just `name` (a developer's `--release` run should
/// not fat-LTO every test binary).
pub fn cargo_build_bin(name: &str) -> Result<PathBuf> {
    let profile = test_profile();
    let whole = profile == "ci";
    cargo_build_with(name, &profile, whole)
}

/// kairos-init always as it ships (`release`: LTO, size-first): its size is under test, and
/// it is small to build.
pub fn build_init() -> Result<PathBuf> {
    cargo_build_with("kairos-init", "release", false)
}

static ARTIFACTS: OnceLock<Result<Artifacts, String>> = OnceLock::new();

pub fn artifacts() -> &'static Artifacts {
    let r = ARTIFACTS.get_or_init(|| {
        let build = || -> Result<Artifacts> {
            let work = work_dir();
            std::fs::create_dir_all(&work)
                .with_context(|| format!("creating {}", work.display()))?;
            let init_binary = build_init()?;
            let kernel = kairos_qemu::kernel::cached_or_fetch()?;
            let initramfs = work.join("initramfs.img");
            let spec = kairos_initramfs::InitramfsSpec {
                init_binary: init_binary.clone(),
                kernel: kernel.clone(),
                modules: kairos_qemu::initramfs::default_modules(),
                extra_files: Vec::new(),
            };
            kairos_initramfs::build(&spec, &initramfs)?;
            Ok(Artifacts {
                kernel,
                init_binary,
                initramfs,
                work,
            })
        };
        build().map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(a) => a,
        Err(e) => panic!("building the boot artifacts failed: {e}"),
    }
}

/// A disk for one test, built from the shared kernel and initramfs.
pub fn disk(name: &str, tweak: impl FnOnce(&mut DiskSpec)) -> PathBuf {
    let a = artifacts();
    let out = a.work.join(format!("{name}.img"));
    let mut spec = kairos_qemu::disk::demo_spec(&out, &a.kernel, &a.initramfs);
    spec.grub_timeout = 0;
    spec.work_dir = Some(a.work.join(format!("{name}.work")));
    tweak(&mut spec);
    if let Err(e) = kairos_qemu::disk::build(&spec) {
        panic!("building disk {name}: {e}");
    }
    out
}

pub(crate) fn boot(name: &str, spec: BootSpec) -> BootResult {
    match kairos_qemu::boot::run(&spec) {
        Ok(r) => {
            println!(
                "---- serial log of {name} ({:.1} s) ----\n{}",
                r.elapsed.as_secs_f64(),
                r.log
            );
            r
        }
        Err(e) => panic!("booting {name}: {e}"),
    }
}

pub(crate) fn spec(disks: &[&Path], log: PathBuf, until: &[&str], timeout: u64) -> BootSpec {
    BootSpec {
        disks: disks.iter().map(|d| d.to_path_buf()).collect(),
        kernel: None,
        initrd: None,
        append: None,
        memory_mb: 512,
        kvm: std::env::var_os("KAIROS_KVM").is_some(),
        serial_log: log,
        until: until.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(timeout),
        extra_args: Vec::new(),
        netns: None,
    }
}

/// Firmware -> GRUB -> kernel -> kairos-init -> image, as a real node boots.
pub fn boot_grub(name: &str, disk: &Path, until: &[&str]) -> BootResult {
    let a = artifacts();
    boot(
        name,
        spec(&[disk], a.work.join(format!("{name}.log")), until, 240),
    )
}

/// The same kernel and initramfs, started by QEMU with an explicit command line: tests
/// kairos-init's own choices (fallback, bad parameters) independent of GRUB's.
pub fn boot_direct(name: &str, disk: &Path, cmdline: &str, until: &[&str]) -> BootResult {
    let a = artifacts();
    let mut s = spec(&[disk], a.work.join(format!("{name}.log")), until, 180);
    s.kernel = Some(a.kernel.vmlinuz.clone());
    s.initrd = Some(a.initramfs.clone());
    s.append = Some(format!("{BASE_CMDLINE} {cmdline}"));
    boot(name, s)
}

/// Lines a test looks for, with a readable failure that quotes the log.
pub fn assert_has(r: &BootResult, needle: &str) {
    assert!(r.log.contains(needle), "serial log lacks {needle:?}");
}

pub fn assert_lacks(r: &BootResult, needle: &str) {
    assert!(
        !r.log.contains(needle),
        "serial log unexpectedly has {needle:?}"
    );
}

/// How the test disk is attached: the same initramfs must find it on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// An AHCI (SATA) controller with the disk as its first port.
    Sata,
    Nvme,
    /// USB storage (bulk-only) behind an xHCI controller; SeaBIOS boots from it.
    Usb,
    /// The `pc` machine's own PIIX IDE controller (the legacy interface kairos-init holds
    /// back while it looks for the disk on the others).
    Ide,
    /// An SD card behind an SDHCI PCI controller. QEMU wants the image 1, 2 or 4 GiB
    /// ([`grow_for_sd`]); no firmware here boots from it: direct kernel boots only.
    Sd,
}

impl Bus {
    /// QEMU's arguments for the disk (drive `d0`) on this bus.
    pub fn qemu_args(self, disk: &Path) -> Vec<String> {
        let drive = format!(
            "file={},format=raw,if=none,id=d0,cache=unsafe",
            disk.display()
        );
        let devices: &[&str] = match self {
            Bus::Sata => &["ahci,id=ahci", "ide-hd,drive=d0,bus=ahci.0"],
            Bus::Nvme => &["nvme,drive=d0,serial=kairos0"],
            Bus::Usb => &[
                "qemu-xhci,id=xhci",
                "usb-storage,bus=xhci.0,drive=d0,bootindex=0",
            ],
            Bus::Sd => &["sdhci-pci", "sd-card,drive=d0"],
            Bus::Ide => &["ide-hd,drive=d0,bus=ide.0"],
        };
        let mut args = vec!["-drive".to_string(), drive];
        for d in devices {
            args.extend(["-device".to_string(), d.to_string()]);
        }
        args
    }
}

/// Makes a test disk a size QEMU's `sd-card` accepts (the next of 1, 2, 4 GiB), moving the
/// GPT's backup header to the new end.
pub fn grow_for_sd(disk: &Path) {
    let len = std::fs::metadata(disk)
        .unwrap_or_else(|e| panic!("{}: {e}", disk.display()))
        .len();
    let Some(size) = [1u64 << 30, 2 << 30, 4 << 30]
        .into_iter()
        .find(|s| *s >= len)
    else {
        panic!(
            "{}: {len} bytes is more than an SD image's 4 GiB",
            disk.display()
        );
    };
    std::fs::File::options()
        .write(true)
        .open(disk)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("growing {}: {e}", disk.display()));
    let out = Command::new("sgdisk")
        .arg("-e")
        .arg(disk)
        .output()
        .unwrap_or_else(|e| panic!("running sgdisk: {e}"));
    assert!(
        out.status.success(),
        "sgdisk -e {}: {}",
        disk.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

static GENERIC_INITRAMFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The generic initramfs (`kairos-build initramfs`'s module set: USB, SD/MMC, CD-ROM, ...) for
/// the test kernel, built once per test process. The other tests use the harness's smaller
/// set, which boots QEMU's default machine slightly faster.
pub fn generic_initramfs() -> &'static Path {
    let r = GENERIC_INITRAMFS.get_or_init(|| {
        let a = artifacts();
        let out = a.work.join("initramfs-generic.img");
        let spec = kairos_initramfs::InitramfsSpec {
            init_binary: a.init_binary.clone(),
            kernel: a.kernel.clone(),
            modules: kairos_initramfs::generic_modules(),
            extra_files: Vec::new(),
        };
        match kairos_initramfs::build(&spec, &out) {
            Ok(report) => {
                println!(
                    "generic initramfs: {} bytes, {} modules; missing: {}",
                    report.size_bytes,
                    report.modules.len(),
                    report.missing.join(", ")
                );
                Ok(out)
            }
            Err(e) => Err(format!("{}: {e}", out.display())),
        }
    });
    match r {
        Ok(p) => p,
        Err(e) => panic!("building the generic initramfs failed: {e}"),
    }
}

/// Like `boot_direct`, with the disk on a SATA or NVMe controller instead of virtio.
pub fn boot_direct_on(
    name: &str,
    disk: &Path,
    bus: Bus,
    cmdline: &str,
    until: &[&str],
) -> BootResult {
    let a = artifacts();
    boot_on(name, disk, bus, Some((&a.initramfs, cmdline)), until)
}

/// The disk alone on `bus`: through the firmware and GRUB when `direct` is None, else QEMU
/// starts the test kernel with that initramfs and command line (after [`BASE_CMDLINE`]).
pub fn boot_on(
    name: &str,
    disk: &Path,
    bus: Bus,
    direct: Option<(&Path, &str)>,
    until: &[&str],
) -> BootResult {
    let a = artifacts();
    let timeout = if direct.is_some() { 180 } else { 240 };
    let mut s = spec(&[], a.work.join(format!("{name}.log")), until, timeout);
    if let Some((initrd, cmdline)) = direct {
        s.kernel = Some(a.kernel.vmlinuz.clone());
        s.initrd = Some(initrd.to_path_buf());
        s.append = Some(format!("{BASE_CMDLINE} {cmdline}"));
    }
    s.extra_args = bus.qemu_args(disk);
    boot(name, s)
}

// ---- Boot assessment through GRUB (issue 3) ----

/// Builds kairos-agent (static, release) like [`build_init`] builds kairos-init, once per
/// test process.
pub fn build_agent() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_agent_now().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_agent_now() -> Result<PathBuf> {
    cargo_build_bin("kairos-agent")
}

/// What boot.rs's grub_boots_active_read_only asserts: active booted read-only with its
/// overlays and mounts, the timeline lines, and the peak RSS; prints the stage figure.
pub fn assert_active_read_only(r: &BootResult, what: &str) {
    assert_has(r, "kairos-init: kairos-init");
    assert_has(r, "starting: mode=active image=/cOS/active.img reason=cos");
    assert_has(r, "kairos-init: switch_root to /sysroot");
    assert_has(r, "KAIROS-TEST: hello from image=active pid=1");
    assert_has(r, "KAIROS-TEST: mode=active");
    assert_has(r, "KAIROS-TEST: root=ro");
    assert_has(r, "KAIROS-TEST: mount / ext4 ro");
    assert_has(r, "KAIROS-TEST: mount /etc overlay rw");
    assert_has(r, "KAIROS-TEST: mount /oem ext4 rw");
    assert_has(r, "KAIROS-TEST: mount /usr/local ext4 rw");
    assert_has(r, DONE);
    // The timeline: top-level steps, each mount, and switch_root itself.
    assert_has(r, "kairos-init: step modules: ");
    assert_has(r, "kairos-init: step loop-mount /cOS/active.img: ");
    // The system step's binds are details (dmesg, not the console) and in the timeline.
    assert_has(r, "kairos-init: step system: ");
    assert_has(
        r,
        "KAIROS-TEST: boot-timeline.json has bind /sysroot/etc/ssh",
    );
    assert_has(r, "kairos-init: step switch_root: ");
    assert_has(r, "; peak RSS ");
    let t = kairos_qemu::boot::kmsg_time(&r.log, "kairos-init: switch_root")
        .expect("switch_root timestamp");
    let start = kairos_qemu::boot::kmsg_time(&r.log, "kairos-init: kairos-init")
        .expect("init start timestamp");
    println!(
        "FIGURE {what}: kernel start -> switch_root {t:.3} s (kairos-init ran {:.3} s)",
        t - start
    );
}

static AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The kairos-agent binary for the test images, built once per test process. Panics when it
/// does not build or lacks the boot-assessment commands (`mark-good`, `bootentry`), unless
/// `KAIROS_TEST_WITHOUT_AGENT` is set: then None, and the tests check only the GRUB side.
pub fn agent() -> Option<PathBuf> {
    if std::env::var_os("KAIROS_TEST_WITHOUT_AGENT").is_some() {
        eprintln!("KAIROS_TEST_WITHOUT_AGENT: images get no kairos-agent, agent checks skipped");
        return None;
    }
    let r = AGENT.get_or_init(|| {
        let path = build_agent().map_err(|e| format!("{e:#}"))?;
        let out = Command::new(&path)
            .arg("--help")
            .output()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let help = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !(help.contains("mark-good") && help.contains("bootentry")) {
            return Err(format!(
                "{} has no mark-good/bootentry commands yet:\n{help}",
                path.display()
            ));
        }
        Ok(path)
    });
    match r {
        Ok(p) => Some(p.clone()),
        Err(e) => panic!("kairos-agent: {e}"),
    }
}

/// Like [`boot_grub`], but a guest reboot resets the machine (firmware, GRUB, kernel again)
/// instead of ending QEMU: the run goes on until the guest powers off, the kernel panics, or
/// `timeout_s` passes. Split the log with [`boots`].
pub fn boot_grub_rebooting(name: &str, disk: &Path, timeout_s: u64) -> BootResult {
    let a = artifacts();
    let mut s = spec(
        &[disk],
        a.work.join(format!("{name}.log")),
        &["end Kernel panic"],
        timeout_s,
    );
    // Parsed after -no-reboot, so it wins: a reboot is a reset, as on a real machine.
    s.extra_args = vec!["-action".into(), "reboot=reset".into()];
    boot(name, s)
}

/// GRUB's first line on each boot (grub.cfg echoes it right after setting up the console).
pub const GRUB_START: &str = "KAIROS-GRUB: start";

/// The serial log cut into boots, each starting at GRUB's `KAIROS-GRUB: start` line.
pub fn boots(log: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in log.lines() {
        // The line follows GRUB's clear-screen escape sequence.
        let line = match line.find(GRUB_START) {
            Some(at) => {
                out.push(String::new());
                &line[at..]
            }
            None => line,
        };
        if let Some(cur) = out.last_mut() {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    out
}

/// Asserts that boot `i` of `boots` has `needle`, quoting that boot on failure.
pub fn assert_boot_has(boots: &[String], i: usize, needle: &str) {
    let b = boots
        .get(i)
        .unwrap_or_else(|| panic!("no boot {i}: only {} boots", boots.len()));
    assert!(
        b.contains(needle),
        "boot {i} lacks {needle:?}; that boot's log:\n{b}"
    );
}

pub fn assert_boot_lacks(boots: &[String], i: usize, needle: &str) {
    let b = &boots[i];
    assert!(
        !b.contains(needle),
        "boot {i} unexpectedly has {needle:?}; that boot's log:\n{b}"
    );
}

/// The bytes of partition `n` of a disk built by `kairos_qemu::disk::build`.
pub fn partition(disk: &Path, n: u32) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let (at, len) = kairos_qemu::disk::partition_bytes(disk, n)
        .unwrap_or_else(|e| panic!("partition {n} of {}: {e}", disk.display()));
    let mut f = std::fs::File::open(disk).expect("open disk");
    let mut buf = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut buf).expect("read partition");
    buf
}

/// A fingerprint of partition `n`'s bytes, to show nothing wrote to it.
pub fn partition_hash(disk: &Path, n: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    partition(disk, n).hash(&mut h);
    h.finish()
}

/// COS_OEM:/grubenv as it is on the disk image now (read with debugfs from the partition's bytes).
pub fn grubenv_on_disk(disk: &Path) -> Vec<u8> {
    let img = disk.with_extension("oem-part");
    std::fs::write(&img, partition(disk, kairos_qemu::disk::part::OEM)).expect("write oem part");
    let out = Command::new("debugfs")
        .args(["-R", "cat /grubenv"])
        .arg(&img)
        .output()
        .expect("debugfs");
    let _ = std::fs::remove_file(&img);
    assert!(out.status.success(), "debugfs cat /grubenv failed");
    out.stdout
}

/// The `name=value` lines of a grubenv block.
pub fn grubenv_vars(block: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(block)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The value of `name` in a grubenv block, if set.
pub fn grubenv_get(block: &[u8], name: &str) -> Option<String> {
    grubenv_vars(block)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// Whether GRUB's own tool accepts the block: `grub-editenv FILE list` succeeds on it.
pub fn grub_editenv_accepts(block: &[u8]) -> bool {
    let dir = work_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("grubenv-check.{:?}", std::thread::current().id()));
    std::fs::write(&path, block).expect("write grubenv copy");
    let ok = Command::new("grub-editenv")
        .arg(&path)
        .arg("list")
        .output()
        .is_ok_and(|o| o.status.success());
    let _ = std::fs::remove_file(&path);
    ok
}

/// Grubenv presets for [`kairos_qemu::disk::DiskSpec::grubenv`]: assessment armed with
/// `tries` for active and passive, as `kairos-agent bootentry --arm --tries N` leaves it.
pub fn armed(tries: u32) -> Vec<(String, String)> {
    let n = tries.to_string();
    [
        ("enable_boot_assessment", "yes"),
        ("kairos_tries_cos", &n),
        ("kairos_tries_fallback", &n),
        ("kairos_max_tries", &n),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

// ---- Userland: kairos-agent, kairos-init as the system's PID 1, the Debian image (issue 4) ----

/// Lines of the test driver; [`driver_lines`] collects them.
pub const T: &str = "KAIROS-T: ";
/// The driver's last line before it asks PID 1 to power off.
pub const DRIVER_DONE: &str = "KAIROS-T: driver done";

/// The test driver, `/usr/libexec/kairos-test-driver` in the agent test images. Started in
/// the background by a `network` stage command (so only once the agent ran the stages), it
/// runs once per boot, waits for `/run/kairos/boot-stage-ok`, prints what the tests check as `KAIROS-T:` lines,
/// sources `/oem/kairos-test-extra.sh` (a test's own scenario) when present, and powers off:
/// SIGUSR2 to PID 1 when that is kairos-init (or the signal named in `/oem/kairos-test-signal`),
/// `systemctl poweroff` under systemd. It never
/// syncs: flushing at shutdown is PID 1's job, and a test checks it.
pub const DRIVER: &str = r#"#!/bin/sh
# Once per boot, even when a restarted agent runs the network stage again.
mkdir /run/kairos-test-driver 2>/dev/null || exit 0
say() { echo "KAIROS-T: $*"; }
n=0
while [ ! -e /run/kairos/boot-stage-ok ] && [ $n -lt 240 ]; do sleep 0.25; n=$((n+1)); done
if [ -e /run/kairos/boot-stage-ok ]; then say "boot-stage-ok"; else say "no boot-stage-ok after 60 s"; fi
say "uptime $(cut -d' ' -f1 /proc/uptime)"
say "pid1 $(cat /proc/1/comm)"
say "hostname $(hostname)"
say "passwd $(grep '^kairos:' /etc/passwd)"
say "shadow $(grep -c '^kairos:' /etc/shadow)"
say "group $(grep '^kairos:' /etc/group)"
k=/home/kairos/.ssh/authorized_keys
[ -f $k ] && say "keys $(stat -c '%a %U:%G' $k) $(cat $k | tr '\n' '|')"
f=/etc/kairos-test/hello.txt
[ -f $f ] && say "file $(stat -c '%a %u:%g %U:%G' $f) $(cat $f | tr '\n' '|')"
say "sysctl vm.swappiness=$(cat /proc/sys/vm/swappiness)"
say "state $(kairos-agent state 2>&1 | tr '\n' ' ')"
if [ -f /oem/kairos-test-extra.sh ]; then . /oem/kairos-test-extra.sh; fi
say "driver done"
sig=$(cat /oem/kairos-test-signal 2>/dev/null)
if [ -d /run/systemd/system ]; then systemctl poweroff; else kill -"${sig:-USR2}" 1; fi
"#;

/// COS_OEM file that starts the driver (file name sorts last, so the other configs come first).
pub fn driver_oem_file() -> (String, Vec<u8>) {
    (
        "99_kairos_test_driver.yaml".into(),
        b"#cloud-config\nstages:\n  network:\n    - name: start the test driver\n      commands:\n        - setsid /usr/libexec/kairos-test-driver </dev/null >/dev/console 2>&1 &\n"
            .to_vec(),
    )
}

/// The `KAIROS-T:` lines of a log, prefix stripped (anywhere in a line: console output of
/// several processes interleaves).
pub fn driver_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.find(T).map(|at| l[at + T.len()..].to_string()))
        .collect()
}

/// The driver line starting with `key ` (its rest), if any.
pub fn driver_value(log: &str, key: &str) -> Option<String> {
    let k = format!("{key} ");
    driver_lines(log)
        .into_iter()
        .find_map(|l| l.strip_prefix(&k).map(str::to_string))
}

static AGENT_USERLAND: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// kairos-agent with the userland commands (`run-stage`, `daemon`, `state`); panics otherwise.
pub fn agent_userland() -> PathBuf {
    let r = AGENT_USERLAND.get_or_init(|| {
        let path = build_agent().map_err(|e| format!("{e:#}"))?;
        let out = Command::new(&path)
            .arg("--help")
            .output()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        for cmd in ["run-stage", "daemon", "state"] {
            if !help.contains(cmd) {
                return Err(format!(
                    "{} has no `{cmd}` command:\n{help}",
                    path.display()
                ));
            }
        }
        Ok(path)
    });
    match r {
        Ok(p) => p.clone(),
        Err(e) => panic!("kairos-agent: {e}"),
    }
}

/// A disk whose image is busybox with kairos-init as `/sbin/init` (the system's PID 1),
/// kairos-agent, the k3s stand-in and the driver; `oem` files (plus the driver's start) on
/// COS_OEM. Only the active image is built: these tests are about userland, not fallback.
pub fn pid1_disk(name: &str, oem: &[(&str, &str)], tweak: impl FnOnce(&mut DiskSpec)) -> PathBuf {
    let a = artifacts();
    let agent = agent_userland();
    disk(name, |s| {
        s.init = Some(a.init_binary.clone());
        agent_image(s, agent, oem);
        tweak(s);
    })
}

fn agent_image(s: &mut DiskSpec, agent: PathBuf, oem: &[(&str, &str)]) {
    s.agent = Some(agent);
    s.k3s_standin = true;
    s.passive = kairos_qemu::disk::ImageState::Missing;
    s.recovery = kairos_qemu::disk::ImageState::Missing;
    s.image_files.push((
        "/usr/libexec/kairos-test-driver".into(),
        DRIVER.as_bytes().to_vec(),
        0o755,
    ));
    for (p, data) in oem {
        s.oem_files.push((p.to_string(), data.as_bytes().to_vec()));
    }
    s.oem_files.push(driver_oem_file());
}

/// The agent's systemd units (`agent/systemd/*.service|*.timer`, the files behind
/// `kairos_agent::UNITS`).
pub fn agent_units() -> Vec<(String, String)> {
    let dir = workspace_root().join("agent/systemd");
    let mut out = Vec::new();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".service") || name.ends_with(".timer") {
            let text = std::fs::read_to_string(e.path())
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            out.push((name, text));
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no units in {}", dir.display());
    out
}

/// A disk with the Debian 12 image (systemd as init; the agent and its units enabled; the k3s
/// stand-in; the driver). The cached debootstrap tree is copied per disk.
pub fn debian_disk(name: &str, oem: &[(&str, &str)], tweak: impl FnOnce(&mut DiskSpec)) -> PathBuf {
    let a = artifacts();
    let agent = agent_userland();
    let base = kairos_qemu::debian::cached_or_build()
        .unwrap_or_else(|e| panic!("building the Debian tree: {e}"));
    let tree = a.work.join(format!("{name}.tree"));
    kairos_qemu::debian::copy_tree(&base, &tree)
        .unwrap_or_else(|e| panic!("copying the Debian tree: {e}"));
    for (unit, text) in agent_units() {
        kairos_qemu::debian::install_unit(&tree, &unit, &text)
            .unwrap_or_else(|e| panic!("installing {unit}: {e}"));
    }
    let out = disk(name, |s| {
        s.tree = Some(tree.clone());
        agent_image(s, agent, oem);
        tweak(s);
    });
    let _ = std::fs::remove_dir_all(&tree);
    out
}

/// GRUB boot of an agent test disk, until the guest powers off (or `timeout_s`).
pub fn boot_until_off(name: &str, disk: &Path, timeout_s: u64) -> BootResult {
    let a = artifacts();
    let mut s = spec(&[disk], a.work.join(format!("{name}.log")), &[], timeout_s);
    s.memory_mb = 768;
    boot(name, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cargo_started_from_a_test_loses_the_test_packages_variables() {
        for k in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_MANIFEST_DIR",
            "CARGO_BIN_EXE_mesh-bench",
            "OUT_DIR",
            "CARGO_TARGET_TMPDIR",
        ] {
            assert!(is_test_package_env(k), "{k}");
        }
        // What configures cargo itself stays.
        for k in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_PROFILE_CI_LTO",
            "RUSTC_WORKSPACE_WRAPPER",
            "CLIPPY_ARGS",
        ] {
            assert!(!is_test_package_env(k), "{k}");
        }
        // cargo test runs this very test with CARGO_PKG_NAME set; the command drops it.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let cmd = cargo_command();
        assert!(
            cmd.get_envs()
                .any(|(k, v)| k == "CARGO_PKG_NAME" && v.is_none()),
            "{:?}",
            cmd.get_envs().collect::<Vec<_>>()
        );
    }
}
