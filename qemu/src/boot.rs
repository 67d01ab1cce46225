//! Boots disks (and optionally a kernel + initramfs) in QEMU with the serial console going to a
//! file, and watches that file for markers. The guest is killed when a marker shows up or the
//! timeout passes; either way the caller gets the log to assert on.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kairos_util::{IoError, IoResultExt};

use crate::apt::{self, AptError};

const QEMU: &str = "qemu-system-x86_64";
const POLL: Duration = Duration::from_millis(50);
/// After a marker, lines the guest prints right after it still belong in the log.
const MARKER_GRACE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct BootSpec {
    pub disks: Vec<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub memory_mb: u32,
    /// false: `-accel tcg`. KVM hangs nested guests on these machines.
    pub kvm: bool,
    pub serial_log: PathBuf,
    /// Stop as soon as any of these strings appears in the serial log.
    pub until: Vec<String>,
    pub timeout: Duration,
    pub extra_args: Vec<String>,
    /// Run QEMU inside this network namespace (`ip netns exec NS`), so a `-netdev tap` made
    /// there is reachable from the namespace only (tests with a private LAN).
    pub netns: Option<String>,
}

impl BootSpec {
    /// 512 MiB, TCG, 120 s, the serial log in `serial_log`; no disks, markers or kernel yet.
    pub fn new(serial_log: impl Into<PathBuf>) -> Self {
        BootSpec {
            disks: Vec::new(),
            kernel: None,
            initrd: None,
            append: None,
            memory_mb: 512,
            kvm: false,
            serial_log: serial_log.into(),
            until: Vec::new(),
            timeout: Duration::from_secs(120),
            extra_args: Vec::new(),
            netns: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootExit {
    /// QEMU exited by itself (guest poweroff, or reboot under -no-reboot); its exit code.
    Exited(Option<i32>),
    /// A marker appeared and QEMU was killed.
    MarkerSeen,
    /// The timeout passed and QEMU was killed.
    TimedOut,
}

#[derive(Debug, Clone)]
pub struct BootResult {
    /// The serial output with `\r` stripped.
    pub log: String,
    /// The first marker (in `until` order) found in the log, whichever way QEMU ended.
    pub matched: Option<String>,
    pub exit: BootExit,
    pub elapsed: Duration,
    /// QEMU's own stderr (warnings, "could not open disk image", …).
    pub qemu_stderr: String,
}

impl BootResult {
    /// The last `n` lines of the log, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Apt(#[from] AptError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("cannot start {QEMU}: {0}")]
    Spawn(std::io::Error),
    #[error("waiting for {QEMU}: {0}")]
    Wait(std::io::Error),
    #[error("{QEMU} failed before the guest printed anything (exit {code:?}): {stderr}")]
    QemuFailed { code: Option<i32>, stderr: String },
    #[error("boot needs a disk or a kernel")]
    NothingToBoot,
}

/// Kills QEMU when the run ends early (error, panic in the caller's thread), so no guest
/// outlives the test that started it.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// QEMU's option parser treats ',' as a separator; a literal comma is written as ",,".
fn escape_opt(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// `qcow2` for a `.qcow2` file, else `raw`: QEMU must be told, it refuses to guess for writes.
pub fn disk_format(disk: &Path) -> &'static str {
    if disk.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    }
}

/// The QEMU command line for `spec` (without the program name).
pub fn qemu_args(spec: &BootSpec) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    // i440fx: GRUB's biosdisk and the legacy ATA paths work on it.
    push(&["-machine", "pc", "-smp", "1", "-m"]);
    a.push(spec.memory_mb.to_string());
    if spec.kvm {
        a.extend(["-accel", "kvm", "-cpu", "host"].map(String::from));
    } else {
        a.extend(["-accel", "tcg"].map(String::from));
    }
    a.extend(
        [
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ]
        .map(String::from),
    );
    // A chardev (rather than `-serial file:`) so the path goes through the escaping parser.
    a.push("-chardev".into());
    a.push(format!(
        "file,id=kairos-serial,path={}",
        escape_opt(&spec.serial_log)
    ));
    a.extend(["-serial", "chardev:kairos-serial"].map(String::from));
    for disk in &spec.disks {
        // cache=unsafe: faster TCG boots; nothing on the host relies on guest flushes.
        a.push("-drive".into());
        a.push(format!(
            "file={},format={},if=virtio,cache=unsafe",
            escape_opt(disk),
            disk_format(disk)
        ));
    }
    if let Some(k) = &spec.kernel {
        a.push("-kernel".into());
        a.push(k.to_string_lossy().into_owned());
    }
    if let Some(i) = &spec.initrd {
        a.push("-initrd".into());
        a.push(i.to_string_lossy().into_owned());
    }
    if let Some(s) = &spec.append {
        a.push("-append".into());
        a.push(s.clone());
    }
    a.extend(spec.extra_args.iter().cloned());
    a
}

/// Runs QEMU until it exits, a marker appears, or the timeout passes.
pub fn run(spec: &BootSpec) -> Result<BootResult, BootError> {
    run_timed(spec).map(|(r, _)| r)
}

/// [`run`], and when each line of the serial log reached the host: element `i` is the time
/// since QEMU started at which the `i`-th `\n` of the log was first read. The log is polled
/// every 50 ms, so a line's time is at most one poll after the guest wrote it; the boot
/// benchmark (`bench --ready`) places the kernel's start on the host clock with it.
pub fn run_timed(spec: &BootSpec) -> Result<(BootResult, Vec<Duration>), BootError> {
    // A disk may also come as `-drive` in extra_args (USB, SD, SATA controllers).
    if spec.disks.is_empty()
        && spec.kernel.is_none()
        && !spec.extra_args.iter().any(|a| a == "-drive")
    {
        return Err(BootError::NothingToBoot);
    }
    apt::ensure_packages(&["qemu-system-x86"])?;
    for path in spec.disks.iter().chain(&spec.kernel).chain(&spec.initrd) {
        std::fs::metadata(path).at(path, "reading metadata")?;
    }
    if let Some(dir) = spec
        .serial_log
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).at(dir, "creating")?;
    }
    // Created before QEMU starts so polling can open it at once; truncated so no earlier
    // run's markers match.
    let mut log_file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&spec.serial_log)
        .at(&spec.serial_log, "creating")?;
    let stderr_path = stderr_path(&spec.serial_log);
    let stderr_file = File::create(&stderr_path).at(&stderr_path, "creating")?;

    let start = Instant::now();
    let mut cmd = match &spec.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, QEMU]);
            c
        }
        None => Command::new(QEMU),
    };
    let child = cmd
        .args(qemu_args(spec))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .spawn()
        .map_err(BootError::Spawn)?;
    let mut guard = ChildGuard(child);

    let mut raw: Vec<u8> = Vec::new();
    let mut scanned = 0usize;
    let longest = spec.until.iter().map(String::len).max().unwrap_or(0);
    let mut marker_at: Option<Instant> = None;
    let mut line_times: Vec<Duration> = Vec::new();
    let mut timed = 0usize;
    let mut stamp_new_lines = |raw: &[u8]| {
        let at = start.elapsed();
        let n = raw[timed..].iter().filter(|&&b| b == b'\n').count();
        line_times.extend(std::iter::repeat_n(at, n));
        timed = raw.len();
    };
    let exit = loop {
        read_more(&mut log_file, &mut raw).at(&spec.serial_log, "reading")?;
        stamp_new_lines(&raw);
        if let Some(status) = guard.0.try_wait().map_err(BootError::Wait)? {
            // Whatever QEMU wrote before exiting is in the file now.
            read_more(&mut log_file, &mut raw).at(&spec.serial_log, "reading")?;
            stamp_new_lines(&raw);
            break exit_of(status);
        }
        let now = Instant::now();
        if let Some(seen) = marker_at {
            if now.duration_since(seen) >= MARKER_GRACE {
                break BootExit::MarkerSeen;
            }
        } else if find_marker(&raw[scanned.saturating_sub(longest)..], &spec.until).is_some() {
            marker_at = Some(now);
        } else if now.duration_since(start) >= spec.timeout {
            break BootExit::TimedOut;
        }
        scanned = raw.len();
        std::thread::sleep(POLL);
    };
    drop(guard);
    let elapsed = start.elapsed();
    read_more(&mut log_file, &mut raw).at(&spec.serial_log, "reading")?;
    stamp_new_lines(&raw);

    let qemu_stderr = std::fs::read(&stderr_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if let BootExit::Exited(code) = exit
        && code != Some(0)
        && raw.is_empty()
    {
        return Err(BootError::QemuFailed {
            code,
            stderr: qemu_stderr,
        });
    }
    let log = String::from_utf8_lossy(&raw).replace('\r', "");
    let matched = find_marker(log.as_bytes(), &spec.until).map(str::to_string);
    Ok((
        BootResult {
            log,
            matched,
            exit,
            elapsed,
            qemu_stderr,
        },
        line_times,
    ))
}

fn stderr_path(serial_log: &Path) -> PathBuf {
    let mut name = serial_log.as_os_str().to_owned();
    name.push(".qemu-stderr");
    PathBuf::from(name)
}

fn exit_of(status: ExitStatus) -> BootExit {
    BootExit::Exited(status.code())
}

fn read_more(file: &mut File, buf: &mut Vec<u8>) -> std::io::Result<()> {
    // The file only grows; reading from our last position picks up what QEMU appended.
    file.seek(SeekFrom::Start(buf.len() as u64))?;
    file.read_to_end(buf)?;
    Ok(())
}

/// The first marker in `markers` order that occurs in `hay`; `\r` in the log never splits a
/// marker because markers come from single `println`s inside the guest.
fn find_marker<'m>(hay: &[u8], markers: &'m [String]) -> Option<&'m str> {
    markers
        .iter()
        .find(|m| !m.is_empty() && hay.windows(m.len()).any(|w| w == m.as_bytes()))
        .map(String::as_str)
}

/// The printk timestamp (seconds since kernel start) of the first log line containing
/// `needle`, e.g. 1.234567 for `[    1.234567] kairos-init: switch_root`.
pub fn kmsg_time(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    line[open + 1..close].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmsg_time_parses_printk_prefix() {
        let log = "GRUB\n[    0.000000] Linux version 6.1\n[    1.543210] kairos-init: switch_root to /sysroot\n[    2.000000] kairos-init: switch_root again\n";
        assert_eq!(kmsg_time(log, "kairos-init: switch_root"), Some(1.54321));
        assert_eq!(kmsg_time(log, "GRUB"), None);
        assert_eq!(kmsg_time(log, "absent"), None);
    }

    #[test]
    fn args_escape_commas_and_pick_accel() {
        let mut spec = BootSpec::new("/tmp/a,b/serial.log");
        spec.disks.push("/tmp/d,1.img".into());
        let a = qemu_args(&spec);
        assert!(a.contains(&"file,id=kairos-serial,path=/tmp/a,,b/serial.log".to_string()));
        assert!(a.contains(&"file=/tmp/d,,1.img,format=raw,if=virtio,cache=unsafe".to_string()));
        spec.disks = vec!["/tmp/n.qcow2".into()];
        let q = qemu_args(&spec);
        assert!(q.contains(&"file=/tmp/n.qcow2,format=qcow2,if=virtio,cache=unsafe".to_string()));
        spec.disks = vec!["/tmp/d,1.img".into()];
        assert!(a.windows(2).any(|w| w == ["-accel", "tcg"]));
        spec.kvm = true;
        let a = qemu_args(&spec);
        assert!(a.windows(4).any(|w| w == ["-accel", "kvm", "-cpu", "host"]));
    }

    #[test]
    fn marker_search() {
        let markers = vec!["KAIROS-TEST: done".to_string(), "panic".to_string()];
        assert_eq!(
            find_marker(b"xx KAIROS-TEST: done\n", &markers),
            Some("KAIROS-TEST: done")
        );
        assert_eq!(find_marker(b"Kernel panic", &markers), Some("panic"));
        assert_eq!(find_marker(b"nothing", &markers), None);
        assert_eq!(find_marker(b"nothing", &[String::new()]), None);
    }

    /// Boots the cached kernel with no initramfs: it must panic on the missing root, which
    /// proves the QEMU plumbing (serial file, markers, kill) works.
    #[test]
    fn boots_kernel_to_root_panic() {
        let kernel = crate::kernel::cached(&crate::kernel::default_cache_dir().join("kernel"))
            .expect("needs the cached kernel: run `kairos-qemu kernel` (or `kairos-qemu setup`)");
        assert!(
            apt::is_installed("qemu-system-x86"),
            "needs qemu-system-x86 (`kairos-qemu setup` installs it)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spec = BootSpec::new(dir.path().join("serial.log"));
        spec.kernel = Some(kernel.vmlinuz);
        spec.append = Some("console=ttyS0 panic=-1".into());
        spec.until = vec![
            "VFS: Unable to mount root".into(),
            "end Kernel panic".into(),
        ];
        spec.timeout = Duration::from_secs(120);
        let r = run(&spec).expect("qemu runs");
        assert!(
            r.matched.is_some(),
            "no panic marker; tail:\n{}\nstderr: {}",
            r.tail(20),
            r.qemu_stderr
        );
        assert!(kmsg_time(&r.log, "Linux version").is_some());
        assert!(!r.log.contains('\r'));
    }
}
