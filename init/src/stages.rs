//! The cloud-config stages the initramfs runs (SPEC section 3): `rootfs` after /oem is mounted
//! and before the overlays, `initramfs` after every mount, both as
//! `kairos-agent run-stage NAME` chrooted into the image.
//!
//! The child gets its own mount namespace in which /proc, /sys, /dev and /run are bind-mounted
//! into /sysroot, so nothing has to be unmounted afterwards (the namespace dies with it) and
//! the moves of switch_root see the initramfs's mounts untouched. Files it writes (the
//! `/run/cos/*.env` layout, /etc in the overlay) land in the shared filesystems as usual.
//! Its output goes to the kernel log line by line; a stage that runs longer than its timeout
//! is killed with its whole process group.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::mount::{MountPropagationFlags, mount_bind_recursive, mount_change};
use rustix::process::{Pid, Signal, chdir, chroot, kill_process_group};
use rustix::thread::UnshareFlags;

use crate::sys::fsutil;
use crate::{info, warn};

/// The agent inside the image.
pub const AGENT: &str = "/usr/bin/kairos-agent";
/// What a stage may take before it is killed: a stage that hangs must not stop the boot.
pub const STAGE_TIMEOUT: Duration = Duration::from_secs(60);
const BINDS: &[&str] = &["/proc", "/sys", "/dev", "/run"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageOutcome {
    /// The image has no agent: nothing ran.
    Skipped,
    /// `run-stage` exited with this code (0 all steps ok, 1 a step failed, 2 an error).
    Exited(i32),
    /// Killed by a signal (its number).
    Signalled(i32),
    TimedOut,
    /// Could not start: why.
    Failed(String),
}

impl StageOutcome {
    pub fn ok(&self) -> bool {
        matches!(self, StageOutcome::Exited(0) | StageOutcome::Skipped)
    }
}

impl std::fmt::Display for StageOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageOutcome::Skipped => write!(f, "skipped (no {AGENT} in the image)"),
            StageOutcome::Exited(0) => write!(f, "ok"),
            StageOutcome::Exited(1) => write!(f, "some steps failed (exit 1)"),
            StageOutcome::Exited(c) => write!(f, "failed (exit {c})"),
            StageOutcome::Signalled(s) => write!(f, "killed by signal {s}"),
            StageOutcome::TimedOut => write!(f, "timed out"),
            StageOutcome::Failed(why) => write!(f, "could not run: {why}"),
        }
    }
}

/// A close-on-exec pipe (read end, write end).
fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {}", std::io::Error::from(e)))
}

/// The stage's output, read without blocking (no thread in the init) and logged line by line.
struct StageOutput {
    pipe: std::fs::File,
    prefix: String,
    partial: Vec<u8>,
    open: bool,
}

impl StageOutput {
    fn new(rd: OwnedFd, prefix: String) -> Self {
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        // F_GETFL/F_SETFL on a pipe we just made do not fail.
        if let Ok(fl) = fcntl_getfl(&rd) {
            let _ = fcntl_setfl(&rd, fl | OFlags::NONBLOCK);
        }
        StageOutput {
            pipe: std::fs::File::from(rd),
            prefix,
            partial: Vec::new(),
            open: true,
        }
    }

    /// Reads what is there now and logs every complete line.
    fn pump(&mut self) {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while self.open {
            match self.pipe.read(&mut buf) {
                Ok(0) => self.open = false,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break, // EAGAIN: nothing more for now
            }
            while let Some(at) = self.partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=at).collect();
                self.log(&line);
            }
            // A runaway line without newline is logged in pieces rather than held for ever.
            if self.partial.len() > 8192 {
                let line = std::mem::take(&mut self.partial);
                self.log(&line);
            }
        }
    }

    fn log(&self, line: &[u8]) {
        info!(
            "{}{}",
            self.prefix,
            String::from_utf8_lossy(line).trim_end()
        );
    }

    fn finish(&mut self) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.log(&line);
        }
    }
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("path {s:?} contains a NUL byte"))
}

/// Runs `kairos-agent run-stage NAME` chrooted into `root` (normally /sysroot), logging its
/// output to kmsg as `stage NAME: …`, for at most `timeout`.
pub fn run_stage(root: &Path, name: &str, timeout: Duration) -> StageOutcome {
    if !fsutil::executable_in_root(root, AGENT) {
        info!("stage {name}: no {AGENT} in the image, skipped");
        return StageOutcome::Skipped;
    }
    match spawn_and_wait(root, name, timeout) {
        Ok(o) => o,
        Err(e) => StageOutcome::Failed(e),
    }
}

fn spawn_and_wait(root: &Path, name: &str, timeout: Duration) -> Result<StageOutcome, String> {
    let root_s = root.to_str().ok_or("root path is not UTF-8")?;
    // Everything the child needs is allocated before fork: after it, only syscalls.
    let root_c = cstr(root_s)?;
    let slash = cstr("/")?;
    let binds: Vec<(CString, CString)> = BINDS
        .iter()
        .filter(|m| fsutil::path_kind(&root.join(&m[1..])) == crate::plan::PathKind::Dir)
        .map(|m| Ok((cstr(m)?, cstr(&format!("{root_s}{m}"))?)))
        .collect::<Result<_, String>>()?;
    let (rd, wr) = pipe()?;
    let wr2: OwnedFd = wr.try_clone().map_err(|e| format!("dup: {e}"))?;
    let mut cmd = Command::new(AGENT);
    cmd.args(["run-stage", name])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        // The agent may want to know it runs before switch_root.
        .env("KAIROS_INITRAMFS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(wr))
        .stderr(Stdio::from(wr2))
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // (rustix's raw syscalls, no libc state) on memory allocated before the fork: nothing
    // that allocates or takes a lock, so it is async-signal-safe. unshare(CLONE_NEWNS) in that
    // single-threaded child only gives it its own mount namespace.
    unsafe {
        cmd.pre_exec(move || {
            rustix::thread::unshare_unsafe(UnshareFlags::NEWNS)?;
            // Private, so the binds do not propagate back to the initramfs's namespace.
            mount_change(
                slash.as_c_str(),
                MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
            )?;
            for (src, dst) in &binds {
                mount_bind_recursive(src.as_c_str(), dst.as_c_str())?;
            }
            chroot(root_c.as_c_str())?;
            chdir(slash.as_c_str())?;
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{AGENT} run-stage {name} in {root_s}: {e}"))?;
    // Our copies of the write end are gone with `cmd`; EOF comes when the stage's are.
    drop(cmd);
    let mut out = StageOutput::new(rd, format!("stage {name}: "));
    let mut pause = Duration::from_millis(1);
    let outcome = loop {
        out.pump();
        match child.try_wait() {
            Ok(Some(st)) => {
                use std::os::unix::process::ExitStatusExt;
                break match (st.code(), st.signal()) {
                    (Some(c), _) => StageOutcome::Exited(c),
                    (None, Some(s)) => StageOutcome::Signalled(s),
                    _ => StageOutcome::Failed(format!("{st}")),
                };
            }
            Ok(None) => {}
            Err(e) => break StageOutcome::Failed(format!("wait: {e}")),
        }
        if start.elapsed() >= timeout {
            warn!(
                "stage {name}: still running after {} s, killing it",
                timeout.as_secs()
            );
            // The child's own process group (process_group(0) made it), grandchildren too.
            if let Some(pgid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
                let _ = kill_process_group(pgid, Signal::KILL);
            }
            let _ = child.wait();
            break StageOutcome::TimedOut;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    // What it wrote last; a grandchild left running may keep the pipe open, so no waiting
    // for EOF here.
    out.pump();
    out.finish();
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A root with a static busybox as /bin/sh and a fake agent. Needs root and
    /// busybox-static (the chroot and the namespace need both); without them the test fails
    /// saying so, it never passes.
    fn fake_root(agent: &str) -> tempfile::TempDir {
        assert!(
            rustix::process::geteuid().is_root(),
            "needs root (a chroot and a mount namespace)"
        );
        assert!(
            Path::new("/bin/busybox").exists(),
            "needs busybox-static (`kairos-qemu setup` installs it)"
        );
        let t = tempfile::tempdir().expect("test setup");
        for d in ["bin", "usr/bin", "proc", "sys", "dev", "run"] {
            std::fs::create_dir_all(t.path().join(d)).expect("test setup");
        }
        std::fs::copy("/bin/busybox", t.path().join("bin/busybox")).expect("test setup");
        for a in ["sh", "sleep", "ls", "cat"] {
            std::os::unix::fs::symlink("busybox", t.path().join("bin").join(a))
                .expect("test setup");
        }
        let a = t.path().join(AGENT.trim_start_matches('/'));
        std::fs::write(&a, agent).expect("test setup");
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o755)).expect("test setup");
        t
    }

    #[test]
    fn stage_runs_chrooted_with_api_filesystems() {
        // Exit 0 only when chrooted (no /usr/bin/kairos-agent-host marker), with /proc and
        // /dev bound in, and given the stage name.
        let script = "#!/bin/sh\n[ \"$1 $2\" = \"run-stage rootfs\" ] || exit 3\n[ -e /proc/self/status ] || exit 4\n[ -c /dev/null ] || exit 5\n[ \"$(cat /marker)\" = inside ] || exit 6\necho fine\n";
        let t = fake_root(script);
        std::fs::write(t.path().join("marker"), "inside").expect("test setup");
        assert_eq!(
            run_stage(t.path(), "rootfs", Duration::from_secs(20)),
            StageOutcome::Exited(0)
        );
        assert_eq!(
            run_stage(t.path(), "initramfs", Duration::from_secs(20)),
            StageOutcome::Exited(3)
        );
        // The binds lived in the child's namespace only.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("test setup");
        assert!(
            !mounts.contains(&t.path().display().to_string()),
            "{mounts}"
        );
    }

    #[test]
    fn stage_timeout_kills_the_group() {
        let t = fake_root("#!/bin/sh\nsleep 30 &\nsleep 30\n");
        let start = Instant::now();
        assert_eq!(
            run_stage(t.path(), "boot", Duration::from_millis(300)),
            StageOutcome::TimedOut
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn no_agent_is_skipped() {
        let t = tempfile::tempdir().expect("test setup");
        let o = run_stage(t.path(), "rootfs", Duration::from_secs(1));
        assert_eq!(o, StageOutcome::Skipped);
        assert!(o.ok());
        assert!(!StageOutcome::Exited(1).ok());
        assert_eq!(
            StageOutcome::Exited(1).to_string(),
            "some steps failed (exit 1)"
        );
    }
}
