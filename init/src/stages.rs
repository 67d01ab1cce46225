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

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group};

use crate::sys::confine::confine;
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
    /// `run-stage` exited with this code (0 done: failed steps are only logged unless the
    /// config says `strict: true`, then 1; 2 an error).
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
    let root_s = root.display();
    let binds: Vec<(PathBuf, PathBuf)> = BINDS
        .iter()
        .filter(|m| fsutil::path_kind(&root.join(&m[1..])) == crate::plan::PathKind::Dir)
        .map(|m| (PathBuf::from(m), root.join(&m[1..])))
        .collect();
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
    // The binds are private to the child: nothing propagates back to the initramfs.
    confine(&mut cmd, &binds, Some(root)).map_err(|e| e.to_string())?;
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

/// Where the agent reads stage files (its config loader, `kairos-agent run-stage`): the
/// image's own yip files, read without a header.
pub const SYSTEM_CONFIG_DIR: &str = "/system/oem";
/// The node's cloud-config directories, in merge order (SPEC §6). The agent's loader reads
/// this very list, so the scan below cannot miss a directory it reads.
pub const NODE_CONFIG_DIRS: &[&str] = &[
    "/run/initramfs/live",
    "/etc/kairos",
    "/usr/local/cloud-config",
    "/oem",
];
/// The agent skips bigger files; the scan reads no more than that (plus one byte).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Whether `kairos-agent run-stage NAME` would do anything, decided from the files and the
/// command line it reads without parsing YAML: a stage is skipped only when no file can name
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageNeed {
    /// No config names the stage: it would run no step. `files`: the config files scanned.
    Skip { files: usize },
    /// It may have steps: why (the first file or parameter that may name it).
    Run(String),
}

/// Which of the stage's names a text may hold, or why it cannot be ruled out. A stage key is
/// `NAME`, `NAME.before` or `NAME.after`, all of which contain `NAME` as written, unless YAML
/// spells it with escapes (`\x`, `\u`, `\U` or an escaped line break in double quotes) or as
/// a `!!binary` scalar; `hostname:` becomes an `initramfs` step; a template (`{{`) or
/// `cloud-init-paths` (more directories) can add anything.
fn text_may_name(text: &str, stage: &str) -> Option<&'static str> {
    if text.contains(stage) {
        return Some("names the stage");
    }
    if stage == "initramfs" && text.contains("hostname") {
        return Some("sets hostname (an initramfs step)");
    }
    if text.contains("{{") {
        return Some("has a template");
    }
    if text.contains("cloud-init-paths") {
        return Some("has cloud-init-paths");
    }
    if text.contains("!!binary") {
        return Some("has a !!binary scalar");
    }
    let b = text.as_bytes();
    let escaped = b
        .windows(2)
        .any(|w| w[0] == b'\\' && matches!(w[1], b'x' | b'u' | b'U' | b'\n' | b'\r'));
    escaped.then_some("has a YAML escape")
}

/// The command line's part: `config_url` (and upstream's `cos.setup`) may fetch anything;
/// `kairos.config=` may set `stages` or `hostname`; upstream's yip also takes `stages.…` words.
fn cmdline_may_name(cmdline: &str, stage: &str) -> Option<String> {
    for w in crate::cmdline::words(cmdline) {
        if w == "--" {
            break;
        }
        let key = w.split_once('=').map_or(&*w, |(k, _)| k);
        let why = match key {
            "config_url" | "kairos.config_url" | "cos.setup" => Some("may fetch a config"),
            "kairos.config" => {
                text_may_name(&w, stage).or(w.contains("stages").then_some("may set stages"))
            }
            k if k.starts_with("stages.") => Some("sets stages"),
            _ => None,
        };
        if let Some(why) = why {
            return Some(format!("kernel parameter {key} {why}"));
        }
    }
    None
}

/// Where the stage sees `dir`: under `run` for /run (the stage binds the initramfs's /run),
/// else under `image`.
fn config_dir(image: &Path, run: &Path, dir: &str) -> (PathBuf, PathBuf) {
    match dir.strip_prefix("/run/") {
        Some(rest) => (run.to_path_buf(), run.join(rest)),
        None => (image.to_path_buf(), image.join(dir.trim_start_matches('/'))),
    }
}

/// Whether `kairos-agent run-stage stage` chrooted into `image` (with the initramfs's `run`
/// as its /run) could run a step, from the `.yaml`/`.yml` files of every directory the agent
/// reads and from `cmdline`. Conservative: anything the scan cannot rule out (a symlink,
/// unreadable, oversized or non-UTF-8 file, a template, an escape, `cloud-init-paths`, a
/// config URL) means run.
pub fn stage_need(image: &Path, run: &Path, cmdline: &str, stage: &str) -> StageNeed {
    if let Some(why) = cmdline_may_name(cmdline, stage) {
        return StageNeed::Run(why);
    }
    let mut files = 0;
    for dir in std::iter::once(&SYSTEM_CONFIG_DIR).chain(NODE_CONFIG_DIRS) {
        let (root, path) = config_dir(image, run, dir);
        // Resolved from outside the chroot, a symlink could point anywhere.
        if let Some((link, _)) = fsutil::symlink_below(&root, &path) {
            return StageNeed::Run(format!("{} is a symlink", link.display()));
        }
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => continue,
            Err(e) => return StageNeed::Run(format!("{dir}: {e}")),
        };
        let mut names = Vec::new();
        for e in entries {
            match e {
                Ok(e) => names.push(e.file_name()),
                Err(e) => return StageNeed::Run(format!("{dir}: {e}")),
            }
        }
        names.sort();
        for name in names {
            let n = name.to_string_lossy();
            if !(n.ends_with(".yaml") || n.ends_with(".yml")) {
                continue;
            }
            let shown = format!("{dir}/{n}");
            let p = path.join(&name);
            match fsutil::path_kind(&p) {
                crate::plan::PathKind::File => {}
                crate::plan::PathKind::Symlink => {
                    return StageNeed::Run(format!("{shown} is a symlink"));
                }
                // The agent reads regular files only.
                _ => continue,
            }
            files += 1;
            let text = match read_config(&p) {
                Ok(t) => t,
                Err(why) => return StageNeed::Run(format!("{shown}: {why}")),
            };
            if let Some(why) = text_may_name(&text, stage) {
                return StageNeed::Run(format!("{shown} {why}"));
            }
        }
    }
    StageNeed::Skip { files }
}

fn read_config(p: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(p).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("more than {MAX_CONFIG_BYTES} bytes"));
    }
    String::from_utf8(buf).map_err(|_| "not UTF-8".to_string())
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

    /// A root with `files` (path, text) and the cmdline `/proc/cmdline` would give.
    fn config_root(files: &[(&str, &str)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("test setup");
        for (p, text) in files {
            let full = t.path().join(p.trim_start_matches('/'));
            std::fs::create_dir_all(full.parent().expect("test setup")).expect("test setup");
            std::fs::write(full, text).expect("test setup");
        }
        t
    }

    fn need(t: &tempfile::TempDir, cmdline: &str, stage: &str) -> StageNeed {
        // The image and /run under one temp dir: /run/initramfs/live is at run/initramfs/live.
        stage_need(t.path(), &t.path().join("run"), cmdline, stage)
    }

    fn runs(n: StageNeed) -> String {
        match n {
            StageNeed::Run(why) => why,
            StageNeed::Skip { files } => panic!("skipped ({files} files)"),
        }
    }

    #[test]
    fn no_config_skips_both_stages() {
        let t = config_root(&[]);
        assert_eq!(need(&t, "", "rootfs"), StageNeed::Skip { files: 0 });
        assert_eq!(need(&t, "", "initramfs"), StageNeed::Skip { files: 0 });
        // Files that are not .yaml/.yml, and directories, are not the agent's.
        let t = config_root(&[
            ("/oem/kairos-test-hook.sh", "echo rootfs initramfs"),
            ("/oem/notes.txt", "stages: {rootfs: []}"),
            ("/oem/dir.yaml/x", "rootfs"),
        ]);
        assert_eq!(need(&t, "", "rootfs"), StageNeed::Skip { files: 0 });
        // The live boot's default squashfs name on the command line is no config.
        let live = "root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.live.squashimg=rootfs.squashfs";
        assert_eq!(need(&t, live, "rootfs"), StageNeed::Skip { files: 0 });
    }

    #[test]
    fn a_stage_named_in_a_file_runs_and_only_that_one() {
        let t = config_root(&[
            (
                "/oem/10.yaml",
                "#cloud-config\nstages:\n  initramfs:\n  - commands: [true]\n",
            ),
            (
                "/usr/local/cloud-config/20.yml",
                "#cloud-config\nstages:\n  boot:\n  - commands: ['echo x']\n",
            ),
            ("/etc/kairos/30.yaml", "#cloud-config\nusers: [{name: a}]\n"),
        ]);
        assert_eq!(need(&t, "", "rootfs"), StageNeed::Skip { files: 3 });
        assert_eq!(
            runs(need(&t, "", "initramfs")),
            "/oem/10.yaml names the stage"
        );
        // .before/.after, the image's /system/oem and the live medium count too.
        let t = config_root(&[(
            "/system/oem/00.yaml",
            "stages:\n  rootfs.after:\n  - commands: [true]\n",
        )]);
        assert_eq!(
            runs(need(&t, "", "rootfs")),
            "/system/oem/00.yaml names the stage"
        );
        assert_eq!(need(&t, "", "initramfs"), StageNeed::Skip { files: 1 });
        let t = config_root(&[("/run/initramfs/live/c.yaml", "stages: {rootfs.before: []}")]);
        assert!(runs(need(&t, "", "rootfs")).starts_with("/run/initramfs/live/c.yaml"));
    }

    #[test]
    fn hostname_templates_escapes_and_paths_cannot_be_ruled_out() {
        for (text, stage, why) in [
            (
                "#cloud-config\nhostname: n1\n",
                "initramfs",
                "sets hostname",
            ),
            (
                "#cloud-config\nstages: {\"{{ .X }}\": []}\n",
                "rootfs",
                "has a template",
            ),
            (
                "stages: {\"r\\x6Fotfs\": []}\n",
                "rootfs",
                "has a YAML escape",
            ),
            (
                "stages: {\"root\\\n  fs\": []}\n",
                "rootfs",
                "has a YAML escape",
            ),
            (
                "stages: {\"init\\u0072amfs\": []}\n",
                "initramfs",
                "has a YAML escape",
            ),
            ("cloud-init-paths: [/x]\n", "rootfs", "has cloud-init-paths"),
            (
                "stages: {? !!binary cm9vdGZz : []}\n",
                "rootfs",
                "has a !!binary",
            ),
        ] {
            let t = config_root(&[("/oem/a.yaml", text)]);
            let got = runs(need(&t, "", stage));
            assert!(
                got.starts_with("/oem/a.yaml ") && got.contains(why),
                "{text}: {got}"
            );
        }
        // hostname is an initramfs step only.
        let t = config_root(&[("/oem/a.yaml", "#cloud-config\nhostname: n1\n")]);
        assert_eq!(need(&t, "", "rootfs"), StageNeed::Skip { files: 1 });
    }

    #[test]
    fn odd_files_and_parameters_mean_run() {
        // Not UTF-8, too large, a symlink (resolved outside the chroot it could be anything).
        let t = config_root(&[]);
        std::fs::create_dir_all(t.path().join("oem")).expect("test setup");
        std::fs::write(t.path().join("oem/a.yaml"), b"\xff\xfe").expect("test setup");
        assert!(runs(need(&t, "", "rootfs")).contains("not UTF-8"));
        let big = "x".repeat((MAX_CONFIG_BYTES + 1) as usize);
        let t = config_root(&[("/oem/big.yaml", big.as_str())]);
        assert!(runs(need(&t, "", "rootfs")).contains("more than"));
        let t = config_root(&[]);
        std::fs::create_dir_all(t.path().join("oem")).expect("test setup");
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("oem/l.yaml")).expect("test setup");
        assert_eq!(runs(need(&t, "", "rootfs")), "/oem/l.yaml is a symlink");
        let t = config_root(&[("/elsewhere/a.yaml", "")]);
        std::fs::create_dir_all(t.path().join("etc")).expect("test setup");
        std::os::unix::fs::symlink("/elsewhere", t.path().join("etc/kairos")).expect("test setup");
        assert!(runs(need(&t, "", "rootfs")).ends_with("etc/kairos is a symlink"));
        // The command line.
        let t = config_root(&[]);
        for (cmdline, why) in [
            (
                "config_url=http://x/c.yaml",
                "kernel parameter config_url may fetch",
            ),
            (
                "kairos.config_url=http://x",
                "kernel parameter kairos.config_url may fetch",
            ),
            ("cos.setup=http://x", "kernel parameter cos.setup may fetch"),
            (
                "kairos.config=stages.rootfs=x",
                "kernel parameter kairos.config names the stage",
            ),
            (
                "\"kairos.config=install.device=/dev/vda\" stages.rootfs[0].commands[0]=true",
                "kernel parameter stages.rootfs[0].commands[0] sets stages",
            ),
        ] {
            assert!(
                runs(need(&t, cmdline, "rootfs")).starts_with(why),
                "{cmdline}"
            );
        }
        assert!(runs(need(&t, "kairos.config=hostname=n", "initramfs")).contains("hostname"));
        assert_eq!(
            need(&t, "kairos.config=install.device=/dev/vda", "rootfs"),
            StageNeed::Skip { files: 0 }
        );
        // After `--` the words are init's arguments, not kernel parameters.
        assert_eq!(
            need(&t, "quiet -- config_url=http://x", "rootfs"),
            StageNeed::Skip { files: 0 }
        );
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
