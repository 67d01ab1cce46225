//! `kairos-agent daemon`: the long-running userland service. Runs the userland stages
//! (unless systemd units do), supervises K3s when a block enables it, marks the boot good
//! once the boot stage succeeded and K3s is healthy, runs `reconcile` periodically, and on
//! SIGTERM/SIGINT stops K3s and exits 0.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use clap::builder::TypedValueParser as _;

use crate::k3s::{Spec, Supervisor, SupervisorOptions};
use crate::{AgentError, Ctx, Outcome, analyze, config, markgood, stages};

/// Written once the daemon is past start-up (see [`run`]).
pub const READY: &str = "/run/kairos/agent-ready";

/// `kairos-agent daemon`'s options; the command line sets the first three.
#[derive(Clone, clap::Args)]
pub struct DaemonOptions {
    /// Run fs, boot and network first, and reconcile periodically (off when systemd units
    /// run them).
    #[arg(long = "no-stages", action = clap::ArgAction::SetFalse,
          help = "Do not run the stages, reconcile included (systemd units run them)")]
    pub run_stages: bool,
    /// Seconds between runs of the reconcile stage (the first one after that long)
    #[arg(long = "reconcile-interval", value_name = "SECS", default_value = "3600",
          value_parser = clap::value_parser!(u64).range(1..).map(Duration::from_secs))]
    pub reconcile_every: Duration,
    /// How often to ask whether the boot can be marked good, and for how long.
    #[arg(skip = DaemonOptions::default().health_every)]
    pub health_every: Duration,
    /// Seconds to keep trying to mark the boot good before giving up
    #[arg(long, value_name = "SECS", default_value = "900", value_parser = clap::value_parser!(u64).map(Duration::from_secs))]
    pub health_timeout: Duration,
    /// How long one `k3s kubectl get --raw /readyz` may take.
    #[arg(skip = DaemonOptions::default().k3s_check_timeout)]
    pub k3s_check_timeout: Duration,
    #[arg(skip = DaemonOptions::default().k3s)]
    pub k3s: SupervisorOptions,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            run_stages: true,
            // Upstream's cos-setup-reconcile.timer: hourly.
            reconcile_every: Duration::from_secs(3600),
            health_every: Duration::from_secs(5),
            health_timeout: Duration::from_secs(15 * 60),
            k3s_check_timeout: Duration::from_secs(5),
            k3s: SupervisorOptions::default(),
        }
    }
}

/// What wakes the daemon up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT (the number), or a test asking to stop.
    Stop(i32),
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn daemon(ctx: &Ctx, opts: &DaemonOptions, log: &mut dyn Write) -> Result<Outcome, AgentError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let (tx, rx) = mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(|err| {
        AgentError::Setup {
            what: "installing the SIGTERM/SIGINT handler",
            err,
        }
    })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if tx.send(Event::Stop(s)).is_err() {
                    return;
                }
            }
        })
        .map_err(|err| AgentError::Setup {
            what: "starting the signal thread",
            err,
        })?;
    run(ctx, opts, &rx, log)
}

fn signal_name(s: i32) -> String {
    match s {
        signal_hook::consts::SIGTERM => "SIGTERM".into(),
        signal_hook::consts::SIGINT => "SIGINT".into(),
        0 => "a stop request".into(),
        n => format!("signal {n}"),
    }
}

/// The daemon over an event channel (tests send [`Event::Stop`] instead of signals).
pub fn run(
    ctx: &Ctx,
    opts: &DaemonOptions,
    events: &Receiver<Event>,
    log: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    writeln!(
        log,
        "kairos-agent: daemon {} starting",
        env!("CARGO_PKG_VERSION")
    )
    .map_err(AgentError::Output)?;
    kmsg_milestone(ctx, "start");
    // A restarted daemon is not ready until it is past start-up again.
    let _ = std::fs::remove_file(ctx.path(READY));
    // Its steps on the boot clock, for `kairos-agent analyze`.
    let mut timeline = analyze::Recorder::start(ctx.path(analyze::AGENT_TIMELINE));
    // 1. The userland stages, unless systemd units run them; a stop request ends it here.
    if opts.run_stages && !timeline.step("stages", || run_userland_stages(ctx, events, log))? {
        return Ok(Outcome::Done);
    }
    // 2. The merged configuration.
    let loaded = timeline.step("config", || load_config(ctx, opts, log))?;
    // 3. Live and reset boots: install.auto, the install screen or pairing, kairos.reset.
    let _pairing = timeline.step("install/reset", || install_or_reset(ctx, &loaded, log))?;
    // 4. K3s, or the mesh that starts it.
    // A live boot is the installer, not the node: its config's K3s and mesh are for the
    // installed system (upstream starts neither off live media), and it has no boot entry
    // of its own to mark good.
    let live = ctx.mode() == Some("live");
    // Bundles not applied yet (upstream: on first boot, before Kubernetes); a failure stops
    // the daemon only with fail_on_bundles_errors.
    timeline.step("bundles", || crate::bundles::at_boot(ctx, &loaded, log))?;
    let mut work = timeline.step("k3s/mesh start", || {
        Workloads::start(ctx, opts, &loaded, live, log)
    })?;
    // 5. Ready for whoever waits on the agent.
    write_ready(ctx, log)?;
    timeline.moment(analyze::AGENT_READY);
    kmsg_milestone(ctx, "ready");
    // 6. Mark the boot good, reconcile periodically, until a stop request.
    serve(ctx, opts, events, &mut work, live, timeline, log)
}

/// Runs fs, boot and network in order; false when a stop request came in between.
fn run_userland_stages(
    ctx: &Ctx,
    events: &Receiver<Event>,
    log: &mut dyn Write,
) -> Result<bool, AgentError> {
    for stage in stages::USERLAND_STAGES {
        if let Ok(Event::Stop(s)) = events.try_recv() {
            writeln!(
                log,
                "kairos-agent: {} before stage {stage}: exiting",
                signal_name(s)
            )
            .map_err(AgentError::Output)?;
            return Ok(false);
        }
        match stages::run_stage(ctx, stage, log) {
            Ok(_) => {}
            Err(e) => writeln!(log, "kairos-agent: error: stage {stage}: {e}")
                .map_err(AgentError::Output)?,
        }
    }
    Ok(true)
}

fn load_config(
    ctx: &Ctx,
    opts: &DaemonOptions,
    log: &mut dyn Write,
) -> Result<config::Loaded, AgentError> {
    let loaded = crate::sources::load(ctx, &config::LoadOptions::default());
    if !opts.run_stages {
        // run-stage already reported the files; only say what matters for K3s here.
        for e in loaded.errors.iter().filter(|e| e.origin().contains("://")) {
            writeln!(log, "kairos-agent: warning: {e}").map_err(AgentError::Output)?;
        }
        // Keys that are refused are said on every start, whoever ran the stages.
        for w in loaded
            .warnings
            .iter()
            .filter(|w| w.starts_with("not supported:"))
        {
            writeln!(log, "kairos-agent: warning: {w}").map_err(AgentError::Output)?;
        }
    }
    Ok(loaded)
}

/// install.auto on a live boot, else the live install screen (or pairing); a `kairos.reset`
/// boot's reset. Returns the pairing thread, if one runs.
fn install_or_reset(
    ctx: &Ctx,
    loaded: &config::Loaded,
    log: &mut dyn Write,
) -> Result<Option<std::thread::JoinHandle<()>>, AgentError> {
    // A live boot with install.auto installs (and usually reboots) before anything else starts.
    let auto = crate::install::auto_install(ctx, loaded, &mut std::io::stdout(), log);
    if let Some(r) = &auto {
        // A refusal or failure was said already, on the log and the console.
        if r.is_ok() {
            writeln!(log, "kairos-agent: install.auto finished").map_err(AgentError::Output)?;
        }
    }
    // A live boot that did not install: the install screen on the console, and with
    // install-mode (or nodepair.enable) and no install.auto, upstream's QR pairing in the
    // background (nothing else runs on a live boot: no K3s, no mesh without a token).
    let pairing = if ctx.mode() == Some("live") && !auto.as_ref().is_some_and(|r| r.is_ok()) {
        live_install_screen(ctx, auto.is_some(), log)?
    } else {
        None
    };
    // A `kairos.reset` boot (GRUB's statereset entry, chosen by hand or by a pending reset)
    // resets the node and reboots; a failure leaves recovery running for a person to look.
    if let Some(Err(e)) = crate::reset::auto_reset(ctx, &mut std::io::stdout(), log) {
        writeln!(log, "kairos-agent: error: reset: {e}").map_err(AgentError::Output)?;
    }
    Ok(pairing)
}

/// What the daemon runs for the node: K3s under its supervisor, or the mesh node.
struct Workloads {
    k3s: Option<Supervisor>,
    mesh: Option<MeshNode>,
    /// Whether mark-good waits for K3s (configured, by the blocks or through the mesh).
    k3s_wanted: bool,
}

impl Workloads {
    fn start(
        ctx: &Ctx,
        opts: &DaemonOptions,
        loaded: &config::Loaded,
        live: bool,
        log: &mut dyn Write,
    ) -> Result<Workloads, AgentError> {
        // With a mesh token the P2P node picks the role and starts K3s itself (as upstream's
        // provider); the blocks then only carry its args.
        let mesh = loaded
            .merged
            .p2p
            .as_ref()
            .and_then(|p| p.network_token.as_deref())
            .is_some_and(|t| !t.is_empty());
        let wants_k3s = Spec::from_config(&loaded.merged).is_some();
        if live && (mesh || wants_k3s) {
            writeln!(
                log,
                "kairos-agent: live boot: not starting {} (the config's, for the installed system)",
                if mesh { "the mesh" } else { "K3s" }
            )
            .map_err(AgentError::Output)?;
        }
        let mesh = mesh && !live;
        let mut work = Workloads {
            k3s: None,
            mesh: None,
            k3s_wanted: false,
        };
        if mesh {
            writeln!(
                log,
                "kairos-agent: p2p network_token set: joining the mesh (`kairos-agent p2p run`), which starts K3s"
            ).map_err(AgentError::Output)?;
            work.mesh = Some(MeshNode::start(ctx));
        }
        work.k3s_wanted = match Spec::from_config(&loaded.merged).filter(|_| !live) {
            Some(_) if mesh => true,
            Some(spec) => {
                match Supervisor::start_with(ctx, spec, opts.k3s.clone()) {
                    Ok(s) => work.k3s = Some(s),
                    Err(e) => writeln!(log, "kairos-agent: error: k3s: {e}")
                        .map_err(AgentError::Output)?,
                }
                true
            }
            None => false,
        };
        Ok(work)
    }

    fn stop(&mut self) {
        if let Some(k) = self.k3s.take() {
            k.stop();
        }
        if let Some(m) = self.mesh.take() {
            m.stop();
        }
    }
}

/// Readiness for whoever waits on the agent (scripts, tests): config applied, install.auto
/// decided, K3s or the mesh started. Holds the pid, as a pidfile would.
fn write_ready(ctx: &Ctx, log: &mut dyn Write) -> Result<(), AgentError> {
    let ready = ctx.path(READY);
    if let Err(e) = ready
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::write(&ready, format!("{}\n", std::process::id())))
    {
        writeln!(log, "kairos-agent: warning: {}: {e}", ready.display())
            .map_err(AgentError::Output)?;
    }
    Ok(())
}

/// `kairos-agent: milestone WHAT` in the kernel log: the daemon's start, readiness and the
/// boot marked good on the kernel's clock, next to kairos-init's lines (`dmesg`, the serial
/// console; `kairos-qemu bench --ready` times the boot by them). Best effort: without a
/// writable /dev/kmsg under the root (unit tests, containers) nothing is written.
fn kmsg_milestone(ctx: &Ctx, what: &str) {
    if let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .write(true)
        .open(ctx.path("/dev/kmsg"))
    {
        // <5>: notice, above the default console level, so the console shows it.
        let _ = kmsg.write_all(format!("<5>kairos-agent: milestone {what}\n").as_bytes());
    }
}

/// Marking the boot good: retried every `health_every` until it is, or `health_timeout`.
struct Marking {
    /// None once done or given up.
    deadline: Option<Instant>,
    next: Instant,
    /// The last refusal said, so a repeated one is not said again.
    last_refusal: String,
    /// Where the boot marked good is recorded.
    timeline: analyze::Recorder,
}

impl Marking {
    /// One attempt when due.
    fn tick(
        &mut self,
        ctx: &Ctx,
        opts: &DaemonOptions,
        k3s_wanted: bool,
        now: Instant,
        log: &mut dyn Write,
    ) -> Result<(), AgentError> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        if now < self.next {
            return Ok(());
        }
        match try_mark_good(ctx, k3s_wanted, opts.k3s_check_timeout) {
            Ok((Outcome::Done, said)) => {
                write!(log, "{said}").map_err(AgentError::Output)?;
                self.timeline.moment(analyze::AGENT_MARKED_GOOD);
                kmsg_milestone(ctx, "marked good");
                self.deadline = None;
            }
            Ok((Outcome::Refused, said)) => {
                if said != self.last_refusal {
                    write!(log, "{said}").map_err(AgentError::Output)?;
                    self.last_refusal = said;
                }
                if Instant::now() >= deadline {
                    writeln!(
                        log,
                        "kairos-agent: boot not marked good after {} s; giving up (GRUB keeps counting tries)",
                        opts.health_timeout.as_secs()
                    ).map_err(AgentError::Output)?;
                    self.deadline = None;
                }
            }
            Err(e) => {
                writeln!(log, "kairos-agent: error: mark-good: {e}").map_err(AgentError::Output)?;
                self.deadline = None;
            }
        }
        self.next = Instant::now() + opts.health_every;
        Ok(())
    }
}

/// The reconcile stage on its own thread, unless the previous run is still going.
fn reconcile(
    ctx: &Ctx,
    reconciling: &Arc<AtomicBool>,
    log: &mut dyn Write,
) -> Result<(), AgentError> {
    if reconciling.swap(true, Ordering::SeqCst) {
        writeln!(
            log,
            "kairos-agent: reconcile still running; skipped this round"
        )
        .map_err(AgentError::Output)?;
        return Ok(());
    }
    let (ctx, flag) = (ctx.clone(), reconciling.clone());
    std::thread::spawn(move || {
        let mut err = std::io::stderr();
        if let Err(e) = stages::run_stage(&ctx, "reconcile", &mut err) {
            eprintln!("kairos-agent: error: stage reconcile: {e}");
        }
        flag.store(false, Ordering::SeqCst);
    });
    Ok(())
}

/// The daemon's loop: mark-good attempts and reconcile runs on their timers, until a stop
/// request stops the workloads.
fn serve(
    ctx: &Ctx,
    opts: &DaemonOptions,
    events: &Receiver<Event>,
    work: &mut Workloads,
    live: bool,
    timeline: analyze::Recorder,
    log: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    let mut marking = Marking {
        deadline: (!live).then(|| Instant::now() + opts.health_timeout),
        next: Instant::now(),
        last_refusal: String::new(),
        timeline,
    };
    let mut next_reconcile = Instant::now() + opts.reconcile_every;
    let reconciling = Arc::new(AtomicBool::new(false));
    loop {
        let now = Instant::now();
        marking.tick(ctx, opts, work.k3s_wanted, now, log)?;
        // With --no-stages the reconcile timer unit runs it.
        if opts.run_stages && now >= next_reconcile {
            next_reconcile = now + opts.reconcile_every;
            reconcile(ctx, &reconciling, log)?;
        }
        let mut wake = if opts.run_stages {
            next_reconcile
        } else {
            now + opts.reconcile_every
        };
        if marking.deadline.is_some() {
            wake = wake.min(marking.next);
        }
        match events.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(Event::Stop(s)) => {
                writeln!(log, "kairos-agent: {}: stopping", signal_name(s))
                    .map_err(AgentError::Output)?;
                work.stop();
                writeln!(log, "kairos-agent: daemon stopped").map_err(AgentError::Output)?;
                return Ok(Outcome::Done);
            }
            Err(RecvTimeoutError::Timeout) => {}
            // Nobody can send any more: wait on timers only.
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(wake.saturating_duration_since(Instant::now()));
            }
        }
    }
}

/// The live console without an install: the pairing thread when the kernel command line
/// asks for install mode and install.auto did not run (`auto_ran`), else the install screen
/// alone.
fn live_install_screen(
    ctx: &Ctx,
    auto_ran: bool,
    log: &mut dyn Write,
) -> Result<Option<std::thread::JoinHandle<()>>, AgentError> {
    let cmdline = std::fs::read_to_string(ctx.path("/proc/cmdline")).unwrap_or_default();
    if !auto_ran && crate::p2p::install_mode_requested(&cmdline) {
        match crate::p2p::start_live_pairing(ctx) {
            Ok(h) => return Ok(Some(h)),
            Err(e) => writeln!(
                log,
                "kairos-agent: error: install mode: pairing thread: {e}"
            )
            .map_err(AgentError::Output)?,
        }
    }
    let disks = crate::install::device::seen_disks(ctx);
    crate::console::show(ctx, &crate::p2p::install_screen(&disks, None));
    Ok(None)
}

/// The mesh node, `kairos-agent p2p run`, as a child of the daemon: restarted with back-off
/// (1 s doubling to 60 s) when it exits, stopped with SIGTERM when the daemon stops. A child
/// rather than a thread so its async runtime and TUN device live and die apart from the
/// daemon's K3s health checks.
struct MeshNode {
    stop: Arc<AtomicBool>,
    pid: Arc<std::sync::Mutex<Option<u32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MeshNode {
    fn start(ctx: &Ctx) -> MeshNode {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(std::sync::Mutex::new(None));
        let exe = std::env::current_exe().unwrap_or_else(|_| "/usr/bin/kairos-agent".into());
        let (root, grubenv) = (ctx.root.clone(), ctx.grubenv.clone());
        let (stop2, pid2) = (stop.clone(), pid.clone());
        let thread = std::thread::spawn(move || {
            let mut backoff = Duration::from_secs(1);
            while !stop2.load(Ordering::SeqCst) {
                let mut cmd = std::process::Command::new(&exe);
                cmd.arg("--root")
                    .arg(&root)
                    .arg("--grubenv")
                    .arg(&grubenv)
                    .args(["p2p", "run"]);
                let started = Instant::now();
                match crate::spawn_retrying(&mut cmd) {
                    Ok(mut child) => {
                        if let Ok(mut p) = pid2.lock() {
                            *p = Some(child.id());
                        }
                        let status = child.wait();
                        if let Ok(mut p) = pid2.lock() {
                            *p = None;
                        }
                        if stop2.load(Ordering::SeqCst) {
                            break;
                        }
                        match status {
                            Ok(s) => eprintln!("kairos-agent: p2p node exited ({s})"),
                            Err(e) => eprintln!("kairos-agent: p2p node: waiting: {e}"),
                        }
                    }
                    Err(e) => eprintln!("kairos-agent: p2p node: {}: {e}", exe.display()),
                }
                // A node that ran a while was healthy: start the back-off over.
                if started.elapsed() > Duration::from_secs(300) {
                    backoff = Duration::from_secs(1);
                }
                eprintln!(
                    "kairos-agent: restarting the p2p node in {} s",
                    backoff.as_secs()
                );
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop2.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        });
        MeshNode {
            stop,
            pid,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(p) = self.pid.lock()
            && let Some(pid) = *p
            && let Some(pid) = rustix::process::Pid::from_raw(pid as i32)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One mark-good attempt; its output as text.
fn try_mark_good(ctx: &Ctx, k3s: bool, timeout: Duration) -> Result<(Outcome, String), AgentError> {
    let opts = markgood::Options {
        booted: None,
        k3s,
        k3s_timeout: timeout,
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let r = markgood::mark_good(ctx, &opts, &mut out, &mut err)?;
    out.extend_from_slice(&err);
    Ok((r, String::from_utf8_lossy(&out).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_start_says_the_refused_keys_without_running_stages() {
        let t = crate::testutil::Tree::new();
        t.file("/oem/10.yaml", "#cloud-config\nk0s:\n  enabled: true\n");
        let opts = DaemonOptions {
            run_stages: false,
            ..DaemonOptions::default()
        };
        let mut log = Vec::new();
        load_config(&t.ctx, &opts, &mut log).unwrap();
        assert_eq!(
            String::from_utf8(log).unwrap(),
            "kairos-agent: warning: not supported: key \"k0s\" (in /oem/10.yaml): k0s is not supported by this agent; use k3s\n"
        );
    }

    #[test]
    fn units_run_the_agents_commands() {
        let names: Vec<&str> = crate::UNITS.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "kairos-agent-fs.service",
                "kairos-agent-boot.service",
                "kairos-agent-network.service",
                "kairos-agent-reconcile.service",
                "kairos-agent-reconcile.timer",
                "kairos-agent.service"
            ]
        );
        let exec = |name: &str| {
            let (_, text) = crate::UNITS.iter().find(|(n, _)| *n == name).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("ExecStart="))
                .unwrap()
                .to_owned()
        };
        for stage in ["fs", "boot", "network", "reconcile"] {
            assert_eq!(
                exec(&format!("kairos-agent-{stage}.service")),
                format!("/usr/bin/kairos-agent run-stage {stage}")
            );
        }
        assert_eq!(
            exec("kairos-agent.service"),
            "/usr/bin/kairos-agent daemon --no-stages"
        );
    }
    use crate::testutil::*;
    use kairos_init::grubenv;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    /// `/usr/bin/k3s` in the tree: `script`, executable.
    fn fake_k3s(t: &Tree, script: &str) {
        t.file("/usr/bin/k3s", script);
        std::fs::set_permissions(
            t.ctx.path("/usr/bin/k3s"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }

    /// The daemon on its own thread; joined, its outcome and log.
    fn spawn_daemon(
        ctx: &Ctx,
        opts: DaemonOptions,
        rx: mpsc::Receiver<Event>,
    ) -> std::thread::JoinHandle<(Outcome, String)> {
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let mut log = Vec::new();
            let r = super::run(&ctx, &opts, &rx, &mut log);
            (r.unwrap(), String::from_utf8(log).unwrap())
        })
    }

    #[test]
    fn a_live_boot_without_install_shows_the_install_screen() {
        let t = Tree::new();
        t.cmdline("root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.live.squashimg=rootfs.squashfs");
        t.file("/run/cos/live_mode", "");
        t.file("/dev/console", "");
        // The installed system's K3s: not started off live media.
        let root = t.ctx.root.display().to_string();
        t.file("/oem/90_k3s.yaml", "#cloud-config\nk3s:\n  enabled: true\n");
        fake_k3s(
            &t,
            &format!("#!/bin/sh\necho \"$*\" > {root}/started\nexec sleep 30\n"),
        );
        let opts = DaemonOptions {
            run_stages: false,
            health_timeout: Duration::from_millis(100),
            ..DaemonOptions::default()
        };
        let (tx, rx) = mpsc::channel();
        let h = spawn_daemon(&t.ctx, opts, rx);
        let end = Instant::now() + Duration::from_secs(10);
        while !t.ctx.path(READY).exists() {
            assert!(Instant::now() < end, "daemon not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        tx.send(Event::Stop(0)).unwrap();
        let (outcome, log) = h.join().unwrap();
        assert_eq!(outcome, Outcome::Done);
        assert!(
            log.contains(
                "kairos-agent: live boot: not starting K3s (the config's, for the installed system)"
            ),
            "{log}"
        );
        assert!(!log.contains("marking good"), "{log}");
        assert!(!t.ctx.path("/started").exists());
        let console = std::fs::read_to_string(t.ctx.path("/dev/console")).unwrap();
        assert!(console.contains(crate::p2p::SCREEN_TITLE), "{console}");
        assert!(
            console.contains("  kairos-agent manual-install --device /dev/XXX CONFIG\n"),
            "{console}"
        );
        // No install-mode on the command line: no pairing code.
        assert!(!console.contains("register"), "{console}");
    }

    #[test]
    fn the_daemon_applies_bundles_before_k3s_and_fails_on_them_only_when_told() {
        let t = Tree::new();
        t.file("/run/cos/active_mode", "");
        let root = t.ctx.root.display().to_string();
        let bundle = tempfile::tempdir().unwrap();
        let script = bundle.path().join("run.sh");
        std::fs::write(&script, format!("#!/bin/sh\ntouch {root}/bundle-ran\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let target = format!("run://dir:{}", bundle.path().display());
        t.file(
            "/oem/90_node.yaml",
            format!("#cloud-config\nk3s:\n  enabled: true\nbundles:\n- targets: [\"{target}\"]\n"),
        );
        // K3s says whether the bundle had run when it was started.
        fake_k3s(
            &t,
            &format!(
                "#!/bin/sh\n[ \"$1\" = kubectl ] && exit 1\n[ -e {root}/bundle-ran ] && echo after-bundle > {root}/started\nexec sleep 30\n"
            ),
        );
        let opts = DaemonOptions {
            run_stages: false,
            health_timeout: Duration::from_millis(100),
            ..DaemonOptions::default()
        };
        let (tx, rx) = mpsc::channel();
        let h = spawn_daemon(&t.ctx, opts.clone(), rx);
        let end = Instant::now() + Duration::from_secs(10);
        while !t.ctx.path("/started").exists() {
            assert!(Instant::now() < end, "K3s not started");
            std::thread::sleep(Duration::from_millis(20));
        }
        tx.send(Event::Stop(0)).unwrap();
        let (_, log) = h.join().unwrap();
        assert!(
            log.contains(&format!("bundle {target}: applied sha256:")),
            "{log}"
        );
        assert_eq!(
            std::fs::read_to_string(t.ctx.path("/started")).unwrap(),
            "after-bundle\n"
        );
        // A failing bundle with fail_on_bundles_errors: the daemon stops before K3s.
        std::fs::remove_file(t.ctx.path("/started")).unwrap();
        std::fs::write(&script, "#!/bin/sh\nexit 4\n").unwrap();
        t.file(
            "/oem/95_fail.yaml",
            "#cloud-config\nfail_on_bundles_errors: true\n",
        );
        let (_tx, rx) = mpsc::channel();
        let mut log = Vec::new();
        let e = super::run(&t.ctx, &opts, &rx, &mut log).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("bundle {target}: run.sh failed (exit status 4)")),
            "{e}"
        );
        assert!(!t.ctx.path("/started").exists());
    }

    #[test]
    fn stages_k3s_mark_good_and_stop() {
        let t = Tree::new();
        t.cmdline("root=LABEL=COS_ACTIVE rd.kairos.boot_reason=cos:counted-try");
        t.file("/run/cos/active_mode", "");
        let mut e = t.env(&[]);
        grubenv::arm(&mut e, 3).unwrap();
        grubenv::grub_boot(&mut e);
        grubenv::write(&t.ctx.grubenv_path(), &e).unwrap();
        let root = t.ctx.root.display().to_string();
        t.file(
            "/oem/90_node.yaml",
            format!(
                "#cloud-config\nk3s:\n  enabled: true\n  args: [--disable=traefik]\nstages:\n  fs:\n  - commands: [echo fs >> {root}/stages]\n  boot:\n  - commands: [echo boot >> {root}/stages]\n  network:\n  - commands: [echo network >> {root}/stages]\n  reconcile:\n  - commands: [echo reconcile >> {root}/stages]\n"
            ),
        );
        // Ready only once the server has started.
        fake_k3s(
            &t,
            &format!(
                "#!/bin/sh\nif [ \"$1\" = kubectl ]; then [ -e {root}/started ] && echo ok; exit 0; fi\necho \"$*\" > {root}/started\nexec sleep 30\n"
            ),
        );
        let k3s_lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let kl = k3s_lines.clone();
        let opts = DaemonOptions {
            run_stages: true,
            reconcile_every: Duration::from_millis(300),
            health_every: Duration::from_millis(100),
            health_timeout: Duration::from_secs(20),
            k3s_check_timeout: Duration::from_secs(5),
            k3s: SupervisorOptions {
                grace: Duration::from_secs(2),
                log: Arc::new(move |m| kl.lock().unwrap().push(m.to_owned())),
                ..SupervisorOptions::default()
            },
        };
        let (tx, rx) = mpsc::channel();
        let h = spawn_daemon(&t.ctx, opts, rx);
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let c = grubenv::Counters::from_env(&t.read_env()).unwrap();
            let reconciled = std::fs::read_to_string(t.ctx.path("/stages"))
                .unwrap_or_default()
                .contains("reconcile");
            if c.tries_cos == 3 && reconciled {
                break;
            }
            assert!(Instant::now() < end, "not marked good / reconciled in time");
            std::thread::sleep(Duration::from_millis(50));
        }
        tx.send(Event::Stop(signal_hook::consts::SIGTERM)).unwrap();
        let (outcome, log) = h.join().unwrap();
        assert_eq!(outcome, Outcome::Done);
        let stages = std::fs::read_to_string(t.ctx.path("/stages")).unwrap();
        assert!(
            stages.starts_with("fs\nboot\nnetwork\nreconcile\n"),
            "{stages}"
        );
        assert!(t.ctx.path(crate::markgood::BOOT_STAGE_OK).exists());
        let pid = std::fs::read_to_string(t.ctx.path(READY)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        assert_eq!(
            std::fs::read_to_string(t.ctx.path("/started")).unwrap(),
            "server --disable=traefik\n"
        );
        assert!(
            log.contains("kairos-agent: boot marked good (entry=cos, tries reset to 3)"),
            "{log}"
        );
        assert!(log.contains("kairos-agent: SIGTERM: stopping"), "{log}");
        assert!(log.ends_with("kairos-agent: daemon stopped\n"), "{log}");
        let kl = k3s_lines.lock().unwrap().join("\n");
        assert!(kl.contains("stopping k3s (pid"), "{kl}");
        assert!(kl.contains("stopped: signal: 15"), "{kl}");
    }
}
