//! kairos-agent's commands, as functions over a root directory and two output streams so the
//! tests drive them on temp trees. main.rs only parses the command line.

pub mod analyze;
pub mod bootentry;
pub mod bundles;
pub mod cli;
pub mod config;
pub mod configcmd;
pub mod console;
pub mod daemon;
pub mod http;
pub mod install;
pub mod k3s;
pub mod kubevip;
pub mod lock;
pub mod logs;
pub mod markgood;
pub mod p2p;
pub mod progress;
pub mod query;
pub mod reset;
pub mod safe_fs;
pub mod sources;
pub mod stages;
pub mod state;
pub mod upgrade;
pub mod users;
pub mod version;

use std::io::Write;
use std::path::{Path, PathBuf};

use kairos_init::grubenv::{self, CounterError, GrubEnv, GrubEnvError};
use kairos_util::IoError;

pub const DEFAULT_GRUBENV: &str = "/oem/grubenv";

/// PATH for commands and K3s when the agent was started without one (by kairos-init).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// systemd units for images whose init is systemd: (file name, contents), to copy into
/// /etc/systemd/system and enable. See agent/systemd/README.md.
pub const UNITS: &[(&str, &str)] = &[
    (
        "kairos-agent-fs.service",
        include_str!("../systemd/kairos-agent-fs.service"),
    ),
    (
        "kairos-agent-boot.service",
        include_str!("../systemd/kairos-agent-boot.service"),
    ),
    (
        "kairos-agent-network.service",
        include_str!("../systemd/kairos-agent-network.service"),
    ),
    (
        "kairos-agent-reconcile.service",
        include_str!("../systemd/kairos-agent-reconcile.service"),
    ),
    (
        "kairos-agent-reconcile.timer",
        include_str!("../systemd/kairos-agent-reconcile.timer"),
    ),
    (
        "kairos-agent.service",
        include_str!("../systemd/kairos-agent.service"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    GrubEnv(#[from] GrubEnvError),
    #[error(transparent)]
    Counter(#[from] CounterError),
    #[error("unknown boot entry {0:?}: expected one of cos, fallback, recovery, statereset")]
    UnknownEntry(String),
    /// Writing to the command's own output streams (explicit: not every I/O error is one).
    #[error("writing the output: {0}")]
    Output(std::io::Error),
    #[error(transparent)]
    Io(#[from] IoError),
    /// The process could not set itself up (signal handler, a thread).
    #[error("{what}: {err}")]
    Setup {
        what: &'static str,
        err: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    /// A bundle failed with `fail_on_bundles_errors` set.
    #[error(transparent)]
    Bundles(#[from] bundles::BundleError),
}

/// How a command ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// A check said no (mark-good): exit non-zero, nothing was changed.
    Refused,
}

/// Where the agent looks: every fixed path lives under `root`.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub root: PathBuf,
    /// The grubenv path as seen inside `root`.
    pub grubenv: PathBuf,
    /// Stage commands run chrooted into `root` (the `*-chroot` stages, in a new image).
    pub chroot: bool,
}

impl Ctx {
    pub fn new(root: impl Into<PathBuf>, grubenv: impl Into<PathBuf>) -> Self {
        Ctx {
            root: root.into(),
            grubenv: grubenv.into(),
            chroot: false,
        }
    }

    /// `p` under the root; with root `/` the path as given, so relative paths stay relative.
    pub fn path(&self, p: impl AsRef<Path>) -> PathBuf {
        let p = p.as_ref();
        if self.root == Path::new("/") {
            return p.to_owned();
        }
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    pub fn grubenv_path(&self) -> PathBuf {
        self.path(&self.grubenv)
    }

    /// The first line of a small text file under the root, trimmed; None if absent or empty.
    pub fn read_line(&self, p: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.path(p)).ok()?;
        let line = text.lines().next()?.trim();
        (!line.is_empty()).then(|| line.to_owned())
    }

    /// `rd.kairos.boot_reason=` of the running kernel: `<entry>:<reason>` from GRUB.
    pub fn boot_reason(&self) -> Option<String> {
        let cmdline = std::fs::read_to_string(self.path("/proc/cmdline")).ok()?;
        kairos_init::cmdline::parse(&cmdline).0.boot_reason
    }

    /// The mode kairos-init booted, from its /run/cos sentinel.
    pub fn mode(&self) -> Option<&'static str> {
        // autoreset first: a reset boot is also a recovery boot.
        ["autoreset", "active", "passive", "recovery", "live"]
            .into_iter()
            .find(|m| self.path(format!("/run/cos/{m}_mode")).exists())
    }
}

/// `cmd.spawn()`, retried for up to a second while the binary is busy being written (an
/// upgrade replacing it, a test writing its stand-in): ETXTBSY is transient, not a failure.
pub fn spawn_retrying(cmd: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// The GRUB entry that boots a mode's image.
pub fn entry_for_mode(mode: &str) -> Option<&'static str> {
    Some(match mode {
        "active" => "cos",
        "passive" => "fallback",
        "recovery" => "recovery",
        "autoreset" => "statereset",
        _ => return None,
    })
}

pub fn check_entry(id: &str) -> Result<&'static str, AgentError> {
    grubenv::ENTRIES
        .iter()
        .copied()
        .find(|e| *e == id)
        .ok_or_else(|| AgentError::UnknownEntry(id.to_owned()))
}

/// The grubenv as GRUB sees it: its variables, or none when the file cannot be used.
pub struct LoadedEnv {
    pub path: PathBuf,
    pub env: GrubEnv,
    /// Why the file could not be used (missing, corrupt, unreadable).
    pub problem: Option<GrubEnvError>,
    /// The grubenv lock, for a read-modify-write ([`load_env_for_update`]).
    pub lock: Option<lock::Lock>,
}

/// For commands that only read: warn about an unusable file and go on with no variables,
/// which is what GRUB does with it.
pub fn load_env(ctx: &Ctx, err: &mut dyn Write) -> Result<LoadedEnv, AgentError> {
    let path = ctx.grubenv_path();
    match grubenv::read(&path) {
        Ok(env) => Ok(LoadedEnv {
            path,
            env,
            problem: None,
            lock: None,
        }),
        Err(e) => {
            writeln!(
                err,
                "kairos-agent: warning: {e}; GRUB ignores it and boots its default entry"
            )
            .map_err(AgentError::Output)?;
            Ok(LoadedEnv {
                path,
                env: GrubEnv::default(),
                problem: Some(e),
                lock: None,
            })
        }
    }
}

/// Whether [`repair`] may replace the file: a missing or corrupt block. Other I/O errors
/// (permissions, a dead disk) are not fixed by writing.
pub fn repairable(e: &GrubEnvError) -> bool {
    e.is_corrupt() || e.is_not_found()
}

/// Replace a missing or corrupt block with a valid empty one (assessment not armed: whether
/// it was armed is unknowable) and say so. Nothing to do when the block is valid.
pub fn repair(loaded: &mut LoadedEnv, out: &mut dyn Write) -> Result<(), AgentError> {
    let Some(problem) = loaded.problem.take() else {
        return Ok(());
    };
    if !repairable(&problem) {
        return Err(problem.into());
    }
    loaded.env = GrubEnv::default();
    grubenv::write(&loaded.path, &loaded.env)?;
    let what = if problem.is_not_found() {
        "created"
    } else {
        "rewrote"
    };
    writeln!(
        out,
        "kairos-agent: {what} {} as a valid empty environment block (boot assessment not armed)",
        loaded.path.display()
    )
    .map_err(AgentError::Output)?;
    Ok(())
}

/// For commands that change the block: the grubenv lock ([`lock::grubenv`]), [`load_env`],
/// then [`repair`]. The lock is held as long as the returned value lives, so the caller's
/// write lands on what it read, never over another writer's change made in between.
pub fn load_env_for_update(
    ctx: &Ctx,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<LoadedEnv, AgentError> {
    let held = lock::grubenv(ctx, &lock::this_command())?;
    let mut loaded = load_env(ctx, err)?;
    loaded.lock = Some(held);
    repair(&mut loaded, out)?;
    Ok(loaded)
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// A temp root with the usual directories and a context pointing at it.
    pub struct Tree {
        pub _dir: tempfile::TempDir,
        pub ctx: Ctx,
    }

    impl Tree {
        pub fn new() -> Tree {
            let dir = tempfile::tempdir().unwrap();
            for d in [
                "oem",
                "proc/self",
                "run/cos",
                "run/kairos",
                "sys/class/block",
                "dev",
            ] {
                std::fs::create_dir_all(dir.path().join(d)).unwrap();
            }
            let ctx = Ctx::new(dir.path(), DEFAULT_GRUBENV);
            Tree { _dir: dir, ctx }
        }

        pub fn file(&self, p: &str, content: impl AsRef<[u8]>) {
            let f = self.ctx.path(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, content).unwrap();
        }

        pub fn cmdline(&self, c: &str) {
            self.file("/proc/cmdline", format!("{c}\n"));
        }

        pub fn env(&self, pairs: &[(&str, &str)]) -> GrubEnv {
            let mut e = GrubEnv::default();
            for (k, v) in pairs {
                e.set(k, v).unwrap();
            }
            grubenv::write(&self.ctx.grubenv_path(), &e).unwrap();
            e
        }

        pub fn read_env(&self) -> GrubEnv {
            grubenv::read(&self.ctx.grubenv_path()).unwrap()
        }
    }

    /// Run a command and return (result, stdout, stderr).
    pub fn run<T>(f: impl FnOnce(&mut dyn Write, &mut dyn Write) -> T) -> (T, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = f(&mut out, &mut err);
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn paths_live_under_the_root() {
        let ctx = Ctx::new("/tmp/r", "/oem/grubenv");
        assert_eq!(ctx.grubenv_path(), Path::new("/tmp/r/oem/grubenv"));
        assert_eq!(ctx.path("/proc/cmdline"), Path::new("/tmp/r/proc/cmdline"));
        let real = Ctx::new("/", "grubenv");
        assert_eq!(real.grubenv_path(), Path::new("grubenv"));
        assert_eq!(real.path("/proc/cmdline"), Path::new("/proc/cmdline"));
    }

    #[test]
    fn mode_reason_and_entries() {
        let t = Tree::new();
        assert_eq!(t.ctx.mode(), None);
        assert_eq!(t.ctx.boot_reason(), None);
        t.file("/run/cos/passive_mode", "");
        t.cmdline("root=LABEL=COS_PASSIVE rd.kairos.boot_reason=fallback:cos-tries-exhausted");
        assert_eq!(t.ctx.mode(), Some("passive"));
        assert_eq!(
            t.ctx.boot_reason().as_deref(),
            Some("fallback:cos-tries-exhausted")
        );
        assert_eq!(entry_for_mode("passive"), Some("fallback"));
        assert_eq!(entry_for_mode("live"), None);
        assert_eq!(check_entry("recovery").unwrap(), "recovery");
        assert!(matches!(
            check_entry("bogus"),
            Err(AgentError::UnknownEntry(_))
        ));
    }

    #[test]
    fn repair_rewrites_only_missing_or_corrupt_blocks() {
        let t = Tree::new();
        // Missing: created.
        let (r, out, err) = run(|o, e| load_env_for_update(&t.ctx, o, e).map(|l| l.env));
        assert!(r.unwrap().is_empty());
        assert!(out.starts_with("kairos-agent: created "), "{out}");
        assert!(err.contains("No such file"), "{err}");
        // Valid: untouched, nothing said.
        t.env(&[("saved_entry", "fallback")]);
        let (r, out, err) = run(|o, e| load_env_for_update(&t.ctx, o, e).map(|l| l.env));
        assert_eq!(r.unwrap().get("saved_entry"), Some("fallback"));
        assert_eq!((out.as_str(), err.as_str()), ("", ""));
        // Garbage: rewritten empty.
        t.file("/oem/grubenv", vec![b'x'; 1024]);
        let (r, out, err) = run(|o, e| load_env_for_update(&t.ctx, o, e).map(|l| l.env));
        assert!(r.unwrap().is_empty());
        assert!(out.starts_with("kairos-agent: rewrote "), "{out}");
        assert!(
            err.contains("no \"# GRUB Environment Block\" header"),
            "{err}"
        );
        assert!(t.read_env().is_empty());
    }
}
