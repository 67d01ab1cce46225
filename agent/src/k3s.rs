//! K3s: the `k3s:` / `k3s-agent:` blocks become /etc/rancher/k3s/config.yaml, an env file
//! and a `k3s server|agent ARGS` process, supervised here (restart with capped exponential
//! back-off, output to syslog or stderr, SIGTERM then SIGKILL on stop).
//!
//! The mapping follows provider-kairos: `args` are appended to the defaults (replaced with
//! `replace_args`), `env` is merged over the defaults (replaced with `replace_env`), and the
//! joined argument string is split into words the way systemd splits an `ExecStart=` line.
//! Joining a cluster is K3s' own `K3S_URL`/`K3S_TOKEN` (or `--server`/`--token`, or
//! `server:`/`token:` in `config`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::Ctx;
use crate::config::{Config, K3sBlock, Kubevip};
use crate::kubevip::{self, KubevipError};
use crate::safe_fs::{FsError, write_atomic};
use crate::stages::env_value;

/// One list for every place that looks for K3s.
pub use crate::markgood::{K3S_BINARIES, K3S_CONFIG};

pub const CONFIG_HEADER: &str = "# kairos-agent: generated from the cloud-config's k3s block";

#[derive(Debug, thiserror::Error)]
pub enum K3sError {
    #[error("k3s is enabled but not installed (no {})", K3S_BINARIES.join(" or "))]
    NotInstalled,
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("starting the supervisor thread: {0}")]
    Thread(std::io::Error),
    #[error(
        "k3s-agent needs a server to join: set K3S_URL in env, --server in args or server in config"
    )]
    NoServer,
    #[error(
        "k3s-agent needs a token to join: set K3S_TOKEN (or K3S_TOKEN_FILE) in env, --token in args or token in config"
    )]
    NoToken,
    #[error("rendering {K3S_CONFIG}: {0}")]
    Render(String),
    #[error(transparent)]
    Kubevip(#[from] KubevipError),
}

/// The role type belongs to the config model (`k3s` or `k3s-agent`); its K3s details here.
pub use crate::config::Role;

impl Role {
    /// The k3s subcommand.
    pub fn subcommand(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }

    /// The env file, named after upstream's service (`k3s`, `k3s-agent`).
    pub fn env_file(self) -> &'static str {
        match self {
            Role::Server => "/etc/rancher/k3s/k3s.env",
            Role::Agent => "/etc/rancher/k3s/k3s-agent.env",
        }
    }
}

/// What to run: role, arguments after the subcommand, extra environment, config file keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub role: Role,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Keys of /etc/rancher/k3s/config.yaml (K3s' flag names without dashes).
    pub config: Map<String, Value>,
    /// A server's kube-vip (`kubevip:` enabled): its manifests are written with the files.
    pub kubevip: Option<Kubevip>,
}

impl Spec {
    /// From one block, over `default_args`/`default_env` (provider-kairos' mapping: the
    /// P2P role passes its `--flannel-iface` etc. here).
    pub fn from_block(
        role: Role,
        block: &K3sBlock,
        default_args: &[String],
        default_env: &BTreeMap<String, String>,
    ) -> Spec {
        let mut args: Vec<String> = if block.replace_args {
            block.args.clone()
        } else {
            let mut a = default_args.to_vec();
            if role == Role::Server && block.embedded_registry {
                a.push("--embedded-registry".into());
            }
            a.extend(block.args.iter().cloned());
            a
        };
        // Upstream joins the args with spaces into a unit's ExecStart=, which systemd splits.
        args = split_words(&args.join(" "));
        let env = if block.replace_env {
            block.env.clone()
        } else {
            let mut e = default_env.clone();
            e.extend(block.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            e
        };
        Spec {
            role,
            args,
            env,
            config: block.config.clone().unwrap_or_default(),
            kubevip: None,
        }
    }

    /// The enabled block of a configuration, if any. A server with `kubevip:` enabled also
    /// gets `--tls-san=<eip>` before the block's args and kube-vip's manifests (a bad
    /// `kubevip.eip` is refused by [`Spec::validate`]).
    pub fn from_config(cfg: &Config) -> Option<Spec> {
        let (role, block) = cfg.k3s_enabled()?;
        let kv = cfg.kubevip.as_ref();
        let server = role == Role::Server && kubevip::enabled(kv);
        let defaults = if server {
            kubevip::server_args(kv).unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut spec = Spec::from_block(role, block, &defaults, &BTreeMap::new());
        spec.kubevip = kv.filter(|_| server).cloned();
        Some(spec)
    }

    /// Arguments after the binary: `server ARGS` or `agent ARGS`.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.role.subcommand().to_owned())
            .chain(self.args.iter().cloned())
            .collect()
    }

    fn flag(&self, names: &[&str]) -> Option<String> {
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            for n in names {
                if a == n {
                    return it.next().cloned();
                }
                if let Some(v) = a.strip_prefix(n).and_then(|r| r.strip_prefix('=')) {
                    return Some(v.to_owned());
                }
            }
        }
        None
    }

    /// The server an agent joins (or an HA server joins): env, args, config file, in K3s'
    /// precedence (flags over env over file).
    pub fn server_url(&self) -> Option<String> {
        self.flag(&["--server", "-s"])
            .or_else(|| self.env.get("K3S_URL").cloned())
            .or_else(|| {
                self.config
                    .get("server")
                    .and_then(crate::config::de::scalar_string)
            })
            .filter(|s| !s.is_empty())
    }

    fn has_token(&self) -> bool {
        self.flag(&["--token", "-t", "--token-file"]).is_some()
            || ["K3S_TOKEN", "K3S_TOKEN_FILE"]
                .iter()
                .any(|k| self.env.get(*k).is_some_and(|v| !v.is_empty()))
            || ["token", "token-file"]
                .iter()
                .any(|k| self.config.contains_key(*k))
    }

    /// An agent cannot start without a server and a token; K3s would exit and be restarted
    /// for ever.
    pub fn validate(&self) -> Result<(), K3sError> {
        if let Some(k) = &self.kubevip {
            kubevip::eip(k)?;
        }
        if self.role == Role::Agent {
            if self.server_url().is_none() {
                return Err(K3sError::NoServer);
            }
            if !self.has_token() {
                return Err(K3sError::NoToken);
            }
        }
        Ok(())
    }

    /// /etc/rancher/k3s/config.yaml: our header, then the `config` keys.
    pub fn render_config(&self) -> Result<String, K3sError> {
        let mut text = format!("{CONFIG_HEADER}\n");
        if !self.config.is_empty() {
            let yaml = serde_saphyr::to_string(&Value::Object(self.config.clone()))
                .map_err(|e| K3sError::Render(e.to_string()))?;
            text.push_str(&yaml);
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        Ok(text)
    }

    /// The env file: `KEY=VALUE` lines, quoted where needed (systemd's EnvironmentFile and
    /// sh both read it).
    pub fn render_env(&self) -> String {
        self.env
            .iter()
            .map(|(k, v)| format!("{k}={}\n", env_value(v)))
            .collect()
    }
}

/// K3s flags whose value is a secret: join tokens, datastore credentials (the endpoint is a
/// DSN with a password), S3 keys for etcd snapshots, the VPN auth key. K3s' flag parser takes
/// one or two leading dashes.
const SECRET_FLAGS: &[&str] = &[
    "token",
    "t",
    "agent-token",
    "datastore-endpoint",
    "etcd-s3-access-key",
    "etcd-s3-secret-key",
    "etcd-s3-session-token",
    "vpn-auth",
];

fn secret_flag(word: &str) -> bool {
    let name = word
        .strip_prefix("--")
        .or_else(|| word.strip_prefix('-'))
        .unwrap_or("");
    SECRET_FLAGS.contains(&name)
}

/// Arguments as they may be logged: the values of [`SECRET_FLAGS`] replaced by `<redacted>`,
/// in both the `--token=X` and the `--token X` form.
pub fn redact_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for a in args {
        if std::mem::take(&mut hide_next) {
            out.push("<redacted>".to_owned());
            continue;
        }
        match a.split_once('=') {
            Some((flag, _)) if secret_flag(flag) => out.push(format!("{flag}=<redacted>")),
            _ => {
                hide_next = secret_flag(a);
                out.push(a.clone());
            }
        }
    }
    out
}

/// Split a command line into words as systemd does for `ExecStart=`: whitespace separates,
/// single and double quotes group, backslash escapes.
pub fn split_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (_, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The K3s binary under the root, first of [`K3S_BINARIES`] that exists.
pub fn find_binary(ctx: &Ctx) -> Option<PathBuf> {
    K3S_BINARIES
        .iter()
        .map(|b| ctx.path(b))
        .find(|p| p.is_file())
}

/// Whether [`write_files`] wrote config.yaml or left the user's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFile {
    Written,
    /// The file was written by someone else (a stage) and the block has no `config`.
    KeptExisting,
}

/// Write config.yaml (0600) and the env file (0600). A config.yaml written by a stage is
/// kept when the block has no `config` of its own.
pub fn write_files(ctx: &Ctx, spec: &Spec) -> Result<ConfigFile, K3sError> {
    let cfg_path = ctx.path(K3S_CONFIG);
    let existing = std::fs::read_to_string(&cfg_path).ok();
    let kept = spec.config.is_empty()
        && existing
            .as_deref()
            .is_some_and(|t| !t.starts_with(CONFIG_HEADER));
    if !kept {
        write_atomic(&cfg_path, spec.render_config()?.as_bytes(), 0o600, None)?;
    }
    let env_file = spec.role.env_file();
    write_atomic(
        &ctx.path(env_file),
        spec.render_env().as_bytes(),
        0o600,
        None,
    )?;
    if let Some(k) = &spec.kubevip {
        kubevip::deploy(ctx, k, &crate::sources::fetch)?;
    }
    Ok(if kept {
        ConfigFile::KeptExisting
    } else {
        ConfigFile::Written
    })
}

/// Where the supervisor's own messages and K3s' output lines go.
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Clone)]
pub struct SupervisorOptions {
    /// First restart delay; doubled after each quick exit up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A run this long resets the back-off.
    pub stable_after: Duration,
    /// Between SIGTERM and SIGKILL on stop.
    pub grace: Duration,
    /// The agent's messages (default: stderr, `kairos-agent: ` prefixed).
    pub log: LogFn,
    /// K3s' output lines; None: syslog at /dev/log when present, else stderr prefixed `k3s: `.
    pub output: Option<LogFn>,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        SupervisorOptions {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
            grace: Duration::from_secs(20),
            log: Arc::new(|m| eprintln!("kairos-agent: {m}")),
            output: None,
        }
    }
}

#[derive(Default)]
struct State {
    child: Option<Child>,
    stopping: bool,
    starts: u32,
    exits: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking holder leaves consistent data (plain fields); keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A supervised K3s. Dropping it stops K3s.
pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    opts: SupervisorOptions,
    pub spec: Spec,
    pub binary: PathBuf,
}

impl Supervisor {
    /// Write the files and start supervising, with the default options.
    pub fn start(ctx: &Ctx, spec: Spec) -> Result<Supervisor, K3sError> {
        Supervisor::start_with(ctx, spec, SupervisorOptions::default())
    }

    pub fn start_with(
        ctx: &Ctx,
        spec: Spec,
        opts: SupervisorOptions,
    ) -> Result<Supervisor, K3sError> {
        spec.validate()?;
        let binary = find_binary(ctx).ok_or(K3sError::NotInstalled)?;
        if write_files(ctx, &spec)? == ConfigFile::KeptExisting {
            (opts.log)(&format!(
                "{K3S_CONFIG} was written by a stage; kept as it is"
            ));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        let output = opts.output.clone().unwrap_or_else(|| default_output(ctx));
        let thread = {
            let (shared, spec, binary, opts) =
                (shared.clone(), spec.clone(), binary.clone(), opts.clone());
            std::thread::Builder::new()
                .name("k3s-supervisor".into())
                .spawn(move || supervise(&shared, &spec, &binary, &opts, &output))
                .map_err(K3sError::Thread)?
        };
        Ok(Supervisor {
            shared,
            thread: Some(thread),
            opts,
            spec,
            binary,
        })
    }

    /// How many times K3s was started so far.
    pub fn starts(&self) -> u32 {
        self.shared.lock().starts
    }

    /// The running K3s' pid.
    pub fn pid(&self) -> Option<u32> {
        self.shared.lock().child.as_ref().map(Child::id)
    }

    /// How each run ended so far (`exit status: 1`, `signal: 9 (SIGKILL)`).
    pub fn exits(&self) -> Vec<String> {
        self.shared.lock().exits.clone()
    }

    /// SIGTERM, then SIGKILL after the grace period; no restart afterwards.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let mut st = self.shared.lock();
        st.stopping = true;
        if let Some(c) = st.child.as_ref() {
            (self.opts.log)(&format!("stopping k3s (pid {}): SIGTERM", c.id()));
            signal(c, rustix::process::Signal::TERM);
        }
        self.shared.cv.notify_all();
        let deadline = Instant::now() + self.opts.grace;
        while st.child.is_some() {
            let now = Instant::now();
            if now >= deadline {
                if let Some(c) = st.child.as_mut() {
                    (self.opts.log)(&format!(
                        "k3s (pid {}) still running after {:?}: SIGKILL",
                        c.id(),
                        self.opts.grace
                    ));
                    let _ = c.kill();
                }
                break;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        drop(st);
        let _ = thread.join();
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn signal(c: &Child, sig: rustix::process::Signal) {
    // The child is not reaped while we hold it, so its pid cannot have been reused.
    if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn supervise(
    shared: &Shared,
    spec: &Spec,
    binary: &Path,
    opts: &SupervisorOptions,
    output: &LogFn,
) {
    let log = &opts.log;
    let mut backoff = opts.backoff_initial;
    loop {
        if shared.lock().stopping {
            return;
        }
        let started = Instant::now();
        match spawn(spec, binary, output) {
            Ok(child) => {
                let mut st = shared.lock();
                // The environment (K3S_TOKEN, ...) is never logged; the arguments redacted.
                log(&format!(
                    "started {} {} (pid {})",
                    binary.display(),
                    redact_args(&spec.argv()).join(" "),
                    child.id()
                ));
                st.child = Some(child);
                st.starts += 1;
                shared.cv.notify_all();
            }
            Err(e) => log(&format!("cannot start {}: {e}", binary.display())),
        }
        // Wait for it to exit; polled so a stop can signal it without racing the reaping.
        let mut st = shared.lock();
        while let Some(c) = st.child.as_mut() {
            match c.try_wait() {
                Ok(Some(status)) => {
                    let pid = c.id();
                    st.child = None;
                    st.exits.push(status.to_string());
                    if !st.stopping {
                        log(&format!("k3s (pid {pid}) exited: {status}"));
                    } else {
                        log(&format!("k3s (pid {pid}) stopped: {status}"));
                    }
                    shared.cv.notify_all();
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    log(&format!("waiting for k3s: {e}"));
                    st.child = None;
                    break;
                }
            }
            st = shared
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if st.stopping {
            return;
        }
        if started.elapsed() >= opts.stable_after {
            backoff = opts.backoff_initial;
        }
        log(&format!("restarting k3s in {:.1} s", backoff.as_secs_f64()));
        let until = Instant::now() + backoff;
        while !st.stopping {
            let now = Instant::now();
            if now >= until {
                break;
            }
            st = shared
                .cv
                .wait_timeout(st, until - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        drop(st);
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

fn spawn(spec: &Spec, binary: &Path, output: &LogFn) -> std::io::Result<Child> {
    let mut cmd = Command::new(binary);
    cmd.args(spec.argv())
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's ^C reaches the agent, which stops K3s itself.
        .process_group(0);
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", crate::DEFAULT_PATH);
    }
    let mut child = crate::spawn_retrying(&mut cmd)?;
    let pid = child.id();
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        child.stdout.take().map(|p| Box::new(p) as _),
        child.stderr.take().map(|p| Box::new(p) as _),
    ];
    for p in pipes.into_iter().flatten() {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(p).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line);
                output(&format!("[{pid}] {}", line.trim_end()));
            }
        });
    }
    Ok(child)
}

/// Syslog (RFC 3164 datagrams to /dev/log, facility daemon) when the socket is there, else
/// stderr with a `k3s: ` prefix.
fn default_output(ctx: &Ctx) -> LogFn {
    let dev_log = ctx.path("/dev/log");
    let sock = dev_log
        .exists()
        .then(|| {
            UnixDatagram::unbound()
                .and_then(|s| s.connect(&dev_log).map(|_| s))
                .ok()
        })
        .flatten();
    let sock = Mutex::new(sock);
    Arc::new(move |line: &str| {
        // "[pid] text": the pid goes into the syslog tag.
        let (pid, text) = line
            .strip_prefix('[')
            .and_then(|r| r.split_once("] "))
            .unwrap_or(("", line));
        let mut guard = sock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = guard.as_ref() {
            let msg = if pid.is_empty() {
                format!("<30>k3s: {text}")
            } else {
                format!("<30>k3s[{pid}]: {text}")
            };
            if s.send(msg.as_bytes()).is_ok() {
                return;
            }
            // The logger went away: stderr from now on.
            *guard = None;
        }
        eprintln!("k3s: {text}");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use std::os::unix::fs::PermissionsExt;

    fn cfg(yaml: &str) -> Config {
        crate::config::parse("t", yaml, false)
            .unwrap()
            .unwrap()
            .config
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn server_rendering() {
        let c = cfg(
            "k3s:\n  enabled: true\n  args: ['--disable traefik', '--node-label \"a=b c\"']\n  env: {K3S_RESOLV_CONF: '', HTTP_PROXY: 'http://p:3128'}\n  embedded_registry: true\n  config:\n    write-kubeconfig-mode: '0644'\n    tls-san: [node.lan]\n",
        );
        let s = Spec::from_config(&c).unwrap();
        assert_eq!(s.role, Role::Server);
        assert_eq!(
            s.argv(),
            [
                "server",
                "--embedded-registry",
                "--disable",
                "traefik",
                "--node-label",
                "a=b c"
            ]
        );
        assert_eq!(
            s.render_env(),
            "HTTP_PROXY=http://p:3128\nK3S_RESOLV_CONF=\"\"\n"
        );
        let t = Tree::new();
        assert_eq!(write_files(&t.ctx, &s).unwrap(), ConfigFile::Written);
        let p = t.ctx.path(K3S_CONFIG);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with(CONFIG_HEADER), "{text}");
        let back: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"write-kubeconfig-mode": "0644", "tls-san": ["node.lan"]})
        );
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&t.ctx.path("/etc/rancher/k3s/k3s.env")), 0o600);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn agent_joins_with_url_and_token() {
        let c = cfg(
            "k3s-agent:\n  enabled: true\n  env:\n    K3S_URL: https://10.0.2.15:6443\n    K3S_TOKEN: K10abc::server:xyz\n  args: [--node-name=w1]\n",
        );
        let s = Spec::from_config(&c).unwrap();
        assert_eq!(s.role, Role::Agent);
        assert_eq!(s.argv(), ["agent", "--node-name=w1"]);
        assert_eq!(s.server_url().as_deref(), Some("https://10.0.2.15:6443"));
        assert!(s.validate().is_ok());
        assert_eq!(
            s.render_env(),
            "K3S_TOKEN=K10abc::server:xyz\nK3S_URL=https://10.0.2.15:6443\n"
        );
        let t = Tree::new();
        write_files(&t.ctx, &s).unwrap();
        assert!(t.ctx.path("/etc/rancher/k3s/k3s-agent.env").exists());
        // Flags work too; without a server or token the agent is refused.
        let c =
            cfg("k3s-agent:\n  enabled: true\n  args: ['--server https://s:6443', --token=t]\n");
        assert_eq!(
            Spec::from_config(&c).unwrap().server_url().as_deref(),
            Some("https://s:6443")
        );
        let c = cfg("k3s-agent: {enabled: true}\n");
        assert!(matches!(
            Spec::from_config(&c).unwrap().validate(),
            Err(K3sError::NoServer)
        ));
        let c = cfg("k3s-agent: {enabled: true, env: {K3S_URL: 'https://s:6443'}}\n");
        assert!(matches!(
            Spec::from_config(&c).unwrap().validate(),
            Err(K3sError::NoToken)
        ));
        // The server block wins; a disabled block is nothing.
        let c = cfg("k3s: {enabled: true}\nk3s-agent: {enabled: true}\n");
        assert_eq!(Spec::from_config(&c).unwrap().role, Role::Server);
        assert!(Spec::from_config(&cfg("k3s: {enabled: false, args: [--x]}\n")).is_none());
    }

    #[test]
    fn replace_args_and_env() {
        let defaults = vec![
            "--flannel-iface=edgevpn0".to_owned(),
            "--with-node-id".to_owned(),
        ];
        let denv = BTreeMap::from([("K3S_URL".to_owned(), "https://m:6443".to_owned())]);
        let keep = cfg("k3s-agent: {enabled: true, args: [--x], env: {A: b}}\n")
            .k3s_agent
            .unwrap();
        let s = Spec::from_block(Role::Agent, &keep, &defaults, &denv);
        assert_eq!(
            s.args,
            ["--flannel-iface=edgevpn0", "--with-node-id", "--x"]
        );
        assert_eq!(s.env.len(), 2);
        let repl = cfg("k3s-agent: {enabled: true, args: [--x], env: {A: b}, replace_args: true, replace_env: true}\n").k3s_agent.unwrap();
        let s = Spec::from_block(Role::Agent, &repl, &defaults, &denv);
        assert_eq!(s.args, ["--x"]);
        assert_eq!(s.env, BTreeMap::from([("A".to_owned(), "b".to_owned())]));
    }

    #[test]
    fn k3s_server_with_kubevip_gets_tls_san_and_manifests() {
        let t = Tree::new();
        let c = cfg(
            "k3s: {enabled: true, args: [--disable=traefik]}\nkubevip: {eip: 192.168.1.50, interface: ens3}\n",
        );
        let s = Spec::from_config(&c).unwrap();
        assert_eq!(
            s.argv(),
            ["server", "--tls-san=192.168.1.50", "--disable=traefik"]
        );
        assert!(s.validate().is_ok());
        write_files(&t.ctx, &s).unwrap();
        let m = std::fs::read_to_string(t.ctx.path(kubevip::MANIFEST)).unwrap();
        assert!(
            m.contains("value: \"192.168.1.50\"") && m.contains("value: ens3"),
            "{m}"
        );
        assert!(t.ctx.path(kubevip::RBAC).is_file());
        // An agent (a worker) gets neither; a bad eip is refused before K3s starts.
        let t = Tree::new();
        let c = cfg(
            "k3s-agent: {enabled: true, env: {K3S_URL: 'https://s:6443', K3S_TOKEN: t}}\nkubevip: {eip: 192.168.1.50, interface: ens3}\n",
        );
        let s = Spec::from_config(&c).unwrap();
        assert_eq!(s.argv(), ["agent"]);
        write_files(&t.ctx, &s).unwrap();
        assert!(!t.ctx.path(kubevip::MANIFESTS_DIR).exists());
        let c = cfg("k3s: {enabled: true}\nkubevip: {enable: true, eip: not-an-ip}\n");
        let e = Spec::from_config(&c).unwrap().validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "kubevip.eip: \"not-an-ip\" is not an IP address"
        );
    }

    #[test]
    fn a_stage_written_config_is_kept() {
        let t = Tree::new();
        t.file(K3S_CONFIG, "token: mine\n");
        let s = Spec::from_config(&cfg("k3s: {enabled: true}\n")).unwrap();
        assert_eq!(write_files(&t.ctx, &s).unwrap(), ConfigFile::KeptExisting);
        assert_eq!(
            std::fs::read_to_string(t.ctx.path(K3S_CONFIG)).unwrap(),
            "token: mine\n"
        );
    }

    #[test]
    fn split_words_like_systemd() {
        assert_eq!(
            split_words(" a  'b c' \"d \\\" e\" f\\ g "),
            ["a", "b c", "d \" e", "f g"]
        );
        assert_eq!(split_words("''"), [""]);
        assert!(split_words("   ").is_empty());
    }

    #[test]
    fn secrets_in_args_are_redacted_for_the_log() {
        let args: Vec<String> = [
            "server",
            "--token=K10abc::server:s3cret",
            "--disable=traefik",
            "-t",
            "hunter2",
            "--agent-token",
            "agent-s3cret",
            "-token=single-dash",
            "--datastore-endpoint=postgres://k3s:pw@db:5432/k3s",
            "--etcd-s3-secret-key",
            "s3key",
            "--node-label",
            "token=not-a-flag",
            "--tls-san=t",
            "--token",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            redact_args(&args),
            [
                "server",
                "--token=<redacted>",
                "--disable=traefik",
                "-t",
                "<redacted>",
                "--agent-token",
                "<redacted>",
                "-token=<redacted>",
                "--datastore-endpoint=<redacted>",
                "--etcd-s3-secret-key",
                "<redacted>",
                "--node-label",
                "token=not-a-flag",
                "--tls-san=t",
                "--token",
            ]
        );
        // The supervisor's "started" line goes through it (the K3S_TOKEN env is not logged).
        let t = Tree::new();
        stand_in(&t, "exec sleep 30");
        let spec = Spec::from_config(&cfg(
            "k3s:\n  enabled: true\n  args: ['--token=K10abc::server:s3cret', '-t hunter2']\n  env: {K3S_TOKEN: envs3cret}\n",
        ))
        .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sup = Supervisor::start_with(&t.ctx, spec, quick(lines.clone())).unwrap();
        wait_for("the start", || sup.starts() >= 1);
        sup.stop();
        let lines = lines.lock().unwrap().join("\n");
        assert!(
            lines.contains("server --token=<redacted> -t <redacted> (pid"),
            "{lines}"
        );
        for secret in ["s3cret", "hunter2"] {
            assert!(!lines.contains(secret), "{secret} in the log:\n{lines}");
        }
    }

    fn stand_in(t: &Tree, script: &str) {
        let p = t.ctx.path("/usr/local/bin/k3s");
        t.file("/usr/local/bin/k3s", format!("#!/bin/sh\n{script}\n"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn quick(lines: Arc<Mutex<Vec<String>>>) -> SupervisorOptions {
        let (a, b) = (lines.clone(), lines);
        SupervisorOptions {
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            stable_after: Duration::from_secs(60),
            grace: Duration::from_secs(2),
            log: Arc::new(move |m| a.lock().unwrap().push(format!("agent: {m}"))),
            output: Some(Arc::new(move |m| {
                b.lock().unwrap().push(format!("k3s: {m}"))
            })),
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn supervisor_restarts_an_exiting_k3s_with_back_off() {
        let t = Tree::new();
        let rec = t.ctx.path("/record");
        stand_in(
            &t,
            &format!(
                "echo \"$* TOKEN=$K3S_TOKEN\" >> {}\necho hello from k3s\nexit 1",
                rec.display()
            ),
        );
        let spec = Spec::from_config(&cfg(
            "k3s:\n  enabled: true\n  args: [--disable=traefik]\n  env: {K3S_TOKEN: secret}\n",
        ))
        .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sup = Supervisor::start_with(&t.ctx, spec, quick(lines.clone())).unwrap();
        wait_for("three starts", || sup.starts() >= 3);
        sup.stop();
        let rec = std::fs::read_to_string(&rec).unwrap();
        assert!(rec.lines().count() >= 3, "{rec}");
        assert!(
            rec.lines()
                .all(|l| l == "server --disable=traefik TOKEN=secret"),
            "{rec}"
        );
        let lines = lines.lock().unwrap().join("\n");
        assert!(lines.contains("] hello from k3s"), "{lines}");
        assert!(lines.contains("exited: exit status: 1"), "{lines}");
        assert!(lines.contains("restarting k3s in 0.1 s"), "{lines}");
    }

    #[test]
    fn supervisor_stops_with_sigterm_then_sigkill() {
        let t = Tree::new();
        // Ignores SIGTERM: needs the SIGKILL.
        stand_in(&t, "trap '' TERM\nwhile :; do sleep 0.1; done");
        let spec = Spec::from_config(&cfg("k3s: {enabled: true}\n")).unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut opts = quick(lines.clone());
        opts.grace = Duration::from_millis(500);
        let sup = Supervisor::start_with(&t.ctx, spec, opts).unwrap();
        wait_for("a pid", || sup.pid().is_some());
        let pid = sup.pid().unwrap();
        let start = Instant::now();
        let exits = {
            let s = &sup;
            std::thread::sleep(Duration::from_millis(100));
            s.exits()
        };
        assert!(exits.is_empty());
        sup.stop();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
        );
        let lines = lines.lock().unwrap().join("\n");
        assert!(lines.contains(": SIGTERM"), "{lines}");
        assert!(lines.contains(": SIGKILL"), "{lines}");
        assert!(lines.contains("stopped: signal: 9"), "{lines}");
        // A well-behaved one ends on the SIGTERM and is not restarted.
        stand_in(&t, "trap 'exit 0' TERM\nwhile :; do sleep 0.1; done");
        let spec = Spec::from_config(&cfg("k3s: {enabled: true}\n")).unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sup = Supervisor::start_with(&t.ctx, spec, quick(lines.clone())).unwrap();
        wait_for("a pid", || sup.pid().is_some());
        sup.stop();
        let lines = lines.lock().unwrap().join("\n");
        assert!(!lines.contains("SIGKILL"), "{lines}");
        assert!(!lines.contains("restarting"), "{lines}");
    }

    #[test]
    fn not_installed_is_an_error() {
        let t = Tree::new();
        let spec = Spec::from_config(&cfg("k3s: {enabled: true}\n")).unwrap();
        assert!(matches!(
            Supervisor::start(&t.ctx, spec),
            Err(K3sError::NotInstalled)
        ));
    }
}
