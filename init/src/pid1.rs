//! kairos-init as PID 1 of the installed system (an image whose `/sbin/init` is kairos-init):
//! mounts what userland needs, reaps zombies, runs and supervises `kairos-agent daemon`, and
//! shuts the machine down cleanly when asked.
//!
//! Which mode the binary runs in is decided by [`in_initramfs`]: the kernel's initramfs root is
//! a ramfs or tmpfs (and dracut images carry `/etc/initrd-release`); an installed image is
//! mounted from a block or loop device. So the same binary is the initramfs `/init` and, after
//! switch_root execs `/sbin/init`, the system's PID 1.
//!
//! Signals to PID 1 (the busybox convention, so the image's `poweroff`, `reboot` and `halt`
//! applets work unchanged; tini and rsinit read them the same way):
//!
//! | signal | action |
//! | --- | --- |
//! | SIGUSR2, SIGPWR | power off |
//! | SIGTERM | reboot (busybox `reboot` sends it) |
//! | SIGINT | reboot (the kernel sends it on ctrl-alt-del once we set `CAD_OFF`) |
//! | SIGUSR1 | halt |
//!
//! Shutdown: SIGTERM to every process, a grace period while reaping, SIGKILL to what is left,
//! sync, unmount in reverse mount order (children before parents), remount read-only what
//! cannot be unmounted, then reboot(2).

use std::path::Path;
use std::time::{Duration, Instant};

use rustix::mount::MountFlags;
use rustix::process::{Pid, Signal, WaitOptions, kill_process_group, wait};

use crate::sys::{fsutil, log, mount, signal};
use crate::{error, info, warn};

/// The supervised program and its arguments.
pub const AGENT: &str = "/usr/bin/kairos-agent";
pub const AGENT_ARGS: &[&str] = &["daemon"];
/// How long processes get between SIGTERM and SIGKILL at shutdown. The agent stops K3s in this
/// time; ten seconds is what systemd gives a unit's stop per default too... halved, because
/// an edge node on a UPS has little to spare.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// ramfs and tmpfs `statfs` magic numbers: what the kernel's rootfs (the initramfs) is.
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    PowerOff,
    Reboot,
    Halt,
}

impl Shutdown {
    pub fn verb(self) -> &'static str {
        match self {
            Shutdown::PowerOff => "powering off",
            Shutdown::Reboot => "rebooting",
            Shutdown::Halt => "halting",
        }
    }
}

/// The signal map of the module documentation.
pub fn action_for_signal(sig: i32) -> Option<Shutdown> {
    match sig {
        libc::SIGUSR2 | libc::SIGPWR => Some(Shutdown::PowerOff),
        libc::SIGTERM | libc::SIGINT => Some(Shutdown::Reboot),
        libc::SIGUSR1 => Some(Shutdown::Halt),
        _ => None,
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPWR => "SIGPWR",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// True when `/` is the kernel's initramfs (ramfs/tmpfs) or a dracut initrd says so.
pub fn in_initramfs() -> bool {
    if Path::new("/etc/initrd-release").exists() {
        return true;
    }
    match rustix::fs::statfs("/") {
        Ok(st) => {
            // f_type is i64 here but a narrower or unsigned type on other architectures.
            #[allow(clippy::unnecessary_cast)]
            let magic = st.f_type as i64;
            magic == RAMFS_MAGIC || magic == TMPFS_MAGIC
        }
        // Cannot tell: the initramfs path is the one that works with nothing mounted.
        Err(_) => true,
    }
}

/// Restart delay for the supervised agent: doubles from 1 s up to 60 s while it keeps dying
/// quickly; a run longer than a minute counts as healthy and starts over at 1 s.
pub fn next_backoff(prev: Option<Duration>, ran: Duration) -> Duration {
    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);
    if ran >= Duration::from_secs(60) {
        return MIN;
    }
    match prev {
        None => MIN,
        Some(p) => (p * 2).clamp(MIN, MAX),
    }
}

use crate::mountinfo::{self, MountEntry};

/// Kernel filesystems with nothing to flush, and which the shutdown itself still needs
/// (/dev/kmsg for the log, /proc for mountinfo).
fn is_api(mountpoint: &str) -> bool {
    ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| mountpoint == *p || mountpoint.starts_with(&format!("{p}/")))
}

/// The mount points to unmount at shutdown, in order: every mount after all mounts stacked on
/// or under it (children first, the later of two siblings first), leaving out `/` and the
/// kernel API filesystems. Mounts whose parent is not in the table (moved from the
/// initramfs, or the root's own parent) are treated as children of the root.
pub fn unmount_order(entries: &[MountEntry]) -> Vec<String> {
    let root = entries.iter().find(|e| e.mountpoint == "/").map(|e| e.id);
    let known = |id: u32| entries.iter().any(|e| e.id == id);
    // Children by parent, in mountinfo (mount) order.
    let children = |id: Option<u32>| -> Vec<usize> {
        entries
            .iter()
            .enumerate()
            .filter(|(_, e)| Some(e.id) != root)
            .filter(|(_, e)| match id {
                Some(p) => e.parent == p && e.parent != e.id,
                None => !known(e.parent),
            })
            .map(|(i, _)| i)
            .collect()
    };
    let mut out = Vec::new();
    let mut visited = vec![false; entries.len()];
    // Iterative post-order, so a deep or looping table cannot blow PID 1's stack.
    fn walk(
        entries: &[MountEntry],
        start: Vec<usize>,
        children: &dyn Fn(Option<u32>) -> Vec<usize>,
        visited: &mut [bool],
        out: &mut Vec<String>,
    ) {
        // (index, expanded)
        let mut stack: Vec<(usize, bool)> = start.into_iter().map(|i| (i, false)).collect();
        while let Some((i, expanded)) = stack.pop() {
            if expanded {
                out.push(entries[i].mountpoint.clone());
                continue;
            }
            if visited[i] {
                continue;
            }
            visited[i] = true;
            stack.push((i, true));
            // Pushed in mount order, so popped latest-first.
            for c in children(Some(entries[i].id)) {
                if !visited[c] {
                    stack.push((c, false));
                }
            }
        }
    }
    let mut top = children(None);
    if let Some(r) = root {
        top.extend(children(Some(r)));
    }
    top.sort();
    top.dedup();
    walk(entries, top, &children, &mut visited, &mut out);
    out.retain(|m| m != "/" && !is_api(m));
    out
}

// ---- the running system ----

const HANDLED: &[i32] = &[
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGPWR,
    libc::SIGHUP,
];

/// Reaps every exited child; returns (pid, wait status) of each.
fn reap() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    // Until none is left (ECHILD) or none has exited yet (None). `wait` is waitpid(-1): any
    // child; rustix's waitpid(None) is waitpid(0), only children in our process group, which
    // misses a daemon that called setsid().
    while let Ok(Some((pid, status))) = wait(WaitOptions::NOHANG) {
        out.push((pid.as_raw_nonzero().get(), status.as_raw()));
    }
    out
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("ended (wait status {status:#x})")
    }
}

/// The mounts userland expects, made only where nothing is mounted yet (after switch_root
/// /dev, /proc, /sys and /run are already there, moved from the initramfs).
fn system_mounts() {
    if !Path::new("/proc/self").exists() {
        let _ = fsutil::mkdir_p(Path::new("/proc"));
        if let Err(e) = mount::mount(
            "proc",
            Path::new("/proc"),
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            "",
        ) {
            eprintln!("kairos-init: {e}");
        }
    }
    let mounted: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| {
            mountinfo::parse(&t)
                .into_iter()
                .map(|e| e.mountpoint)
                .collect()
        })
        .unwrap_or_default();
    let nsnd = MountFlags::NOSUID | MountFlags::NODEV;
    let table: [(&str, &str, &str, MountFlags, &str); 7] = [
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            "mode=0755",
        ),
        ("sysfs", "/sys", "sysfs", nsnd | MountFlags::NOEXEC, ""),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            "gid=5,mode=0620,ptmxmode=0666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", nsnd, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nsnd, "mode=0755,size=20%"),
        ("tmpfs", "/tmp", "tmpfs", nsnd, "mode=1777,size=50%"),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nsnd | MountFlags::NOEXEC,
            "",
        ),
    ];
    for (src, target, fstype, flags, data) in table {
        if mounted.iter().any(|m| m == target) {
            continue;
        }
        // Only where the image has the directory (or can get it): / is read-only in Kairos.
        if fsutil::mkdir_p(Path::new(target)).is_err() {
            warn!("{target} does not exist and cannot be created: not mounting {fstype} there");
            continue;
        }
        match mount::mount(src, Path::new(target), fstype, flags, data) {
            Ok(()) => info!("mounted {fstype} at {target}"),
            Err(e) => warn!("{e}"),
        }
    }
}

struct Supervised {
    pid: Option<i32>,
    started: Instant,
    backoff: Option<Duration>,
    next_start: Option<Instant>,
    missing_logged: bool,
}

impl Supervised {
    fn start(&mut self) {
        self.next_start = None;
        if !fsutil::executable_in_root(Path::new("/"), AGENT) {
            if !self.missing_logged {
                warn!("{AGENT} not found: nothing to supervise (signals still shut down)");
                self.missing_logged = true;
            }
            return;
        }
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(AGENT);
        // PID 1 blocks the signals it waits for; the child must not inherit that mask (it
        // would never see the SIGTERM of a shutdown).
        signal::unblock_all_in_child(&mut cmd);
        let res = cmd
            .args(AGENT_ARGS)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("TERM", "linux")
            .stdin(std::process::Stdio::null())
            // Its own group: a ctrl-c on the console's session does not reach it.
            .process_group(0)
            .spawn();
        match res {
            Ok(child) => {
                let pid = child.id() as i32;
                info!("started {AGENT} {} (pid {pid})", AGENT_ARGS.join(" "));
                // The child is reaped by `reap` (waitpid(-1)), not through this handle.
                drop(child);
                self.pid = Some(pid);
                self.started = Instant::now();
            }
            Err(e) => {
                error!("cannot start {AGENT}: {e}");
                self.schedule(Duration::ZERO);
            }
        }
    }

    fn schedule(&mut self, ran: Duration) {
        let d = next_backoff(self.backoff, ran);
        self.backoff = Some(d);
        self.next_start = Some(Instant::now() + d);
        info!("restarting {AGENT} in {} s", d.as_secs());
    }

    fn exited(&mut self, pid: i32, status: i32) {
        if self.pid != Some(pid) {
            return;
        }
        self.pid = None;
        let ran = self.started.elapsed();
        warn!(
            "{AGENT} (pid {pid}) {} after {:.1} s",
            describe_status(status),
            ran.as_secs_f64()
        );
        self.schedule(ran);
    }
}

/// PID 1 of the installed system. Never returns.
pub fn run() -> ! {
    system_mounts();
    log::init_kmsg();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (req, _) = crate::cmdline::parse(&cmdline);
    log::set_consoles(&req.consoles, req.debug);
    info!(
        "kairos-init {} running as the system's PID 1",
        env!("CARGO_PKG_VERSION")
    );
    // ctrl-alt-del becomes SIGINT to us instead of an immediate reboot without unmounting.
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::CadOff) {
        warn!("reboot(CAD_OFF): {e}");
    }
    let blocked = signal::block(HANDLED);
    let _ = std::env::set_current_dir("/");
    let mut agent = Supervised {
        pid: None,
        started: Instant::now(),
        backoff: None,
        next_start: None,
        missing_logged: false,
    };
    agent.start();
    loop {
        let wait = agent
            .next_start
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        let sig = blocked.wait(wait);
        for (pid, status) in reap() {
            agent.exited(pid, status);
        }
        if let Some(sig) = sig
            && let Some(action) = action_for_signal(sig)
        {
            info!("{}: {}", signal_name(sig), action.verb());
            shutdown(action);
        }
        if agent.pid.is_none() && agent.next_start.is_some_and(|t| Instant::now() >= t) {
            agent.start();
        }
    }
}

/// Signals every process but us, then waits (reaping) until none is left or `grace` passes.
/// Returns true when all are gone.
fn stop_all(sig: Signal, grace: Duration) -> bool {
    // kill(-1): every process we may signal except PID 1 itself.
    let _ = kill_process_group(Pid::INIT, sig);
    let _ = kill_process_group(Pid::INIT, Signal::CONT);
    let deadline = Instant::now() + grace;
    loop {
        let _ = reap();
        // ECHILD: no children left (orphans are reparented to us, so this covers all).
        if wait(WaitOptions::NOHANG).is_err() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `pid (name)` of every user process but us, to say what ignored SIGTERM.
fn survivors() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Kernel threads have an empty command line.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pid == "1" || cmdline.is_empty() {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        out.push(format!("{pid} ({})", comm.trim()));
    }
    out
}

fn shutdown(action: Shutdown) -> ! {
    if !stop_all(Signal::TERM, STOP_GRACE) {
        warn!(
            "processes still running {} s after SIGTERM: sending SIGKILL",
            STOP_GRACE.as_secs()
        );
        warn!("still running: {}", survivors().join(", "));
        stop_all(Signal::KILL, Duration::from_secs(2));
    }
    rustix::fs::sync();
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in unmount_order(&mountinfo::parse(&table)) {
        match mount::unmount(Path::new(&m), false) {
            Ok(()) => info!("unmounted {m}"),
            Err(e) => {
                // Busy (the loop device of / keeps its partition open): at least make it
                // read-only, which flushes it and leaves the filesystem clean.
                let ro = rustix::mount::mount_remount(m.as_str(), MountFlags::RDONLY, "");
                match ro {
                    Ok(()) => info!("{m} busy ({}): remounted read-only", e.err),
                    Err(e2) => warn!("{e}; remount read-only: {e2}"),
                }
            }
        }
    }
    if let Err(e) = rustix::mount::mount_remount("/", MountFlags::RDONLY, "") {
        warn!("remount / read-only: {e}");
    }
    rustix::fs::sync();
    info!("{}", action.verb());
    let cmd = match action {
        Shutdown::PowerOff => rustix::system::RebootCommand::PowerOff,
        Shutdown::Reboot => rustix::system::RebootCommand::Restart,
        Shutdown::Halt => rustix::system::RebootCommand::Halt,
    };
    if let Err(e) = rustix::system::reboot(cmd) {
        log::fatal(&format!("reboot(2): {e}"));
    }
    // PID 1 must not exit: that panics the kernel.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_map_follows_busybox() {
        assert_eq!(action_for_signal(libc::SIGUSR2), Some(Shutdown::PowerOff));
        assert_eq!(action_for_signal(libc::SIGPWR), Some(Shutdown::PowerOff));
        assert_eq!(action_for_signal(libc::SIGTERM), Some(Shutdown::Reboot));
        assert_eq!(action_for_signal(libc::SIGINT), Some(Shutdown::Reboot));
        assert_eq!(action_for_signal(libc::SIGUSR1), Some(Shutdown::Halt));
        assert_eq!(action_for_signal(libc::SIGCHLD), None);
        assert_eq!(action_for_signal(libc::SIGHUP), None);
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let s = Duration::from_secs;
        assert_eq!(next_backoff(None, s(0)), s(1));
        assert_eq!(next_backoff(Some(s(1)), s(0)), s(2));
        assert_eq!(next_backoff(Some(s(32)), s(5)), s(60));
        assert_eq!(next_backoff(Some(s(60)), s(5)), s(60));
        assert_eq!(next_backoff(Some(s(60)), s(61)), s(1));
    }

    /// What a Kairos node's table looks like after switch_root: /dev /proc /sys /run moved
    /// from the initramfs (their parent id is not in the table), overlays, persistent binds.
    const KAIROS: &str = "\
20 1 7:0 / / ro,relatime - ext4 /dev/loop0 ro
2 0 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw,mode=755
3 0 0:20 / /proc rw,nosuid,nodev,noexec - proc proc rw
4 0 0:21 / /sys rw,nosuid,nodev,noexec - sysfs sysfs rw
5 0 0:22 / /run rw,nosuid,nodev - tmpfs tmpfs rw,mode=755
19 5 254:4 / /run/initramfs/cos-state ro,relatime - ext4 /dev/vda4 ro
21 5 0:30 / /run/overlay rw - tmpfs tmpfs rw,size=25%
22 20 0:31 / /etc rw - overlay overlay rw,lowerdir=/sysroot/etc
23 20 0:32 / /var rw - overlay overlay rw,lowerdir=/sysroot/var
24 20 254:2 / /oem rw,relatime - ext4 /dev/vda2 rw
25 20 254:5 / /usr/local rw,relatime - ext4 /dev/vda5 rw
26 22 254:5 /.state/etc-ssh.bind /etc/ssh rw,relatime - ext4 /dev/vda5 rw
27 23 254:5 /.state/var-log.bind /var/log rw,relatime - ext4 /dev/vda5 rw
28 2 0:33 / /dev/pts rw - devpts devpts rw
29 20 0:34 / /tmp rw - tmpfs tmpfs rw
30 22 0:35 / /etc/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn unmount_order_children_first_latest_first() {
        let e = mountinfo::parse(KAIROS);
        assert_eq!(e.len(), 16);
        assert_eq!(e[15].mountpoint, "/etc/with space");
        let order = unmount_order(&e);
        assert_eq!(
            order,
            [
                "/tmp",
                "/usr/local",
                "/oem",
                "/var/log",
                "/var",
                "/etc/with space",
                "/etc/ssh",
                "/etc",
                "/run/overlay",
                "/run/initramfs/cos-state",
                "/run",
            ]
        );
        let pos = |m: &str| order.iter().position(|x| x == m).expect("test setup");
        // Every child before its parent.
        for x in &e {
            if let Some(p) = e.iter().find(|p| p.id == x.parent)
                && order.contains(&x.mountpoint)
                && order.contains(&p.mountpoint)
            {
                assert!(pos(&x.mountpoint) < pos(&p.mountpoint), "{x:?}");
            }
        }
    }

    #[test]
    fn unmount_order_survives_garbage_and_loops() {
        assert!(unmount_order(&mountinfo::parse("garbage\n1 2 3\n\n")).is_empty());
        // A parent loop (not possible in a real table) must still terminate.
        let looped = "10 11 0:1 / /a rw - tmpfs t rw\n11 10 0:2 / /a/b rw - tmpfs t rw\n";
        let order = unmount_order(&mountinfo::parse(looped));
        assert!(order.len() <= 2);
        // Stacked mounts on one path: the later one first.
        let stacked = "1 0 0:1 / / rw - ext4 a rw\n5 1 0:2 / /m rw - tmpfs x rw\n6 5 0:3 / /m rw - tmpfs y rw\n";
        let e = mountinfo::parse(stacked);
        assert_eq!(unmount_order(&e), ["/m", "/m"]);
    }
}
