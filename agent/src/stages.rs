//! Stages with yip semantics: `kairos-agent run-stage NAME` runs `NAME.before`, `NAME`,
//! `NAME.after`; within each, the sources in order (image files, then the node's in merge
//! order) and each source's steps in order. A failing step is logged with its stage, file and
//! name and the run goes on.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kairos_util::IoResultExt;

use crate::config::{self, Source};
use crate::safe_fs::{Owner, read_under, write_under};
use crate::{AgentError, Ctx, Outcome, users};

/// The step types (yip's schema) live with the config model; re-exported for callers.
pub use crate::config::schema::{
    Directory, Dns, Download, Entity, File, Id, Step, Systemctl, SystemctlOverride, User,
};

/// Written when the `boot` stage ran without a failed step; read by mark-good.
pub use crate::markgood::BOOT_STAGE_OK;

/// Stages the init and the agent run, in boot order.
pub const EARLY_STAGES: &[&str] = &["rootfs", "initramfs"];
/// Userland stages, in upstream's order (cos-setup-fs before sysinit, boot before getty,
/// network after network-online).
pub const USERLAND_STAGES: &[&str] = &["fs", "boot", "network"];

/// What one stage run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StageReport {
    pub ran: usize,
    pub skipped: usize,
    /// `stage: origin: step "name": what failed`, one per failed step.
    pub failures: Vec<String>,
}

impl StageReport {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

/// How a stage runs, from the config (see [`RunOptions::from_sources`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// `debug: true`: say which sources run, what each step's filters decided and which
    /// modules each step has.
    pub debug: bool,
}

impl RunOptions {
    pub fn from_sources(sources: &[Source]) -> Self {
        RunOptions {
            debug: flag(sources, "debug", |c| c.debug),
        }
    }
}

/// A top-level boolean as the merge decides it: the last source that sets it wins.
pub fn flag(sources: &[Source], key: &str, get: fn(&config::Config) -> bool) -> bool {
    sources
        .iter()
        .rev()
        .find(|s| s.raw.contains_key(key))
        .is_some_and(|s| get(&s.config))
}

/// Run `stage` (with `.before` and `.after`) over `sources`, with the config's options.
pub fn run(ctx: &Ctx, stage: &str, sources: &[Source], log: &mut dyn Write) -> StageReport {
    run_with(ctx, stage, sources, RunOptions::from_sources(sources), log)
}

/// Run `stage` (with `.before` and `.after`) over `sources`.
pub fn run_with(
    ctx: &Ctx,
    stage: &str,
    sources: &[Source],
    opts: RunOptions,
    log: &mut dyn Write,
) -> StageReport {
    let mut report = StageReport::default();
    let per_source: Vec<(String, BTreeMap<String, Vec<Step>>)> = sources
        .iter()
        .map(|s| {
            // yip's `name:` of a file shows next to its path.
            let shown = match s.config.name.as_deref().filter(|n| !n.is_empty()) {
                Some(n) => format!("{} ({n:?})", s.origin),
                None => s.origin.clone(),
            };
            (shown, s.config.effective_stages())
        })
        .collect();
    let facts = Facts::read(ctx);
    for sub in [
        format!("{stage}.before"),
        stage.to_owned(),
        format!("{stage}.after"),
    ] {
        for (origin, stages) in &per_source {
            let Some(steps) = stages.get(&sub) else {
                if opts.debug {
                    let _ = writeln!(log, "kairos-agent: debug: stage {sub}: {origin}: no steps");
                }
                continue;
            };
            for (i, step) in steps.iter().enumerate() {
                let name = step.name.clone().unwrap_or_else(|| format!("#{}", i + 1));
                let at = format!("stage {sub}: {origin}: step {name:?}");
                if opts.debug {
                    let _ = writeln!(
                        log,
                        "kairos-agent: debug: {at}: modules: {}",
                        modules(step).join(", ")
                    );
                }
                let result = match filters(&facts, step) {
                    Ok(None) => run_step(ctx, step, log),
                    Ok(Some(why)) => StepResult::Filtered(why),
                    Err(e) => StepResult::Done(vec![e]),
                };
                match result {
                    StepResult::Skipped => {
                        report.skipped += 1;
                        let _ = writeln!(log, "kairos-agent: {at}: skipped (if: condition false)");
                    }
                    StepResult::Filtered(why) => {
                        report.skipped += 1;
                        let _ = writeln!(log, "kairos-agent: {at}: skipped ({why})");
                    }
                    StepResult::Done(errors) if errors.is_empty() => {
                        report.ran += 1;
                        let _ = writeln!(log, "kairos-agent: {at}: done");
                    }
                    StepResult::Done(errors) => {
                        report.ran += 1;
                        let what = errors.join("; ");
                        let _ = writeln!(log, "kairos-agent: {at}: FAILED: {what}");
                        report.failures.push(format!("{at}: {what}"));
                    }
                }
            }
        }
    }
    report
}

/// What the step filters look at, read once per stage run.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    /// /etc/os-release's PRETTY_NAME and VERSION_ID (what yip's sysinfo calls the OS name
    /// and version).
    pub os_name: String,
    pub os_version: String,
    /// Go's name for the architecture, as yip compares it.
    pub arch: &'static str,
    pub systemd: bool,
    pub openrc: bool,
    /// The root the paths of `if_files` are under.
    pub root: Option<Ctx>,
}

impl Facts {
    fn exists(&self, p: &str) -> bool {
        match &self.root {
            Some(ctx) => ctx.path(p).exists(),
            None => Path::new(p).exists(),
        }
    }
}

impl Facts {
    pub fn read(ctx: &Ctx) -> Self {
        let text = ["/etc/os-release", "/usr/lib/os-release"]
            .iter()
            .find_map(|p| std::fs::read_to_string(ctx.path(p)).ok())
            .unwrap_or_default();
        let field = |k: &str| kairos_util::envfile::value(&text, k).unwrap_or_default();
        let any = |names: &[&str]| names.iter().any(|n| ctx.path(n).exists());
        Facts {
            os_name: field("PRETTY_NAME"),
            os_version: field("VERSION_ID"),
            arch: config::template::go_arch(std::env::consts::ARCH),
            systemd: any(&[
                "/sbin/systemctl",
                "/bin/systemctl",
                "/usr/sbin/systemctl",
                "/usr/bin/systemctl",
            ]),
            openrc: any(&[
                "/sbin/openrc",
                "/bin/openrc",
                "/usr/sbin/openrc",
                "/usr/bin/openrc",
            ]),
            root: Some(ctx.clone()),
        }
    }
}

/// yip's step conditionals: `Ok(Some(why))` skips the step, `Err` is a bad filter (a
/// failure of the step, named).
pub fn filters(f: &Facts, step: &Step) -> Result<Option<String>, String> {
    let regex = |key: &str, re: &str, value: &str, what: &str| -> Result<Option<String>, String> {
        let r = regex::Regex::new(re).map_err(|e| format!("{key}: {re:?} is not a regex: {e}"))?;
        if value.is_empty() {
            return Ok(Some(format!("{key} {re:?}: the {what} is unknown")));
        }
        Ok((!r.is_match(value)).then(|| format!("{key} {re:?} does not match {what} {value:?}")))
    };
    let checks = [
        ("only_os", &step.only_os, f.os_name.as_str(), "OS name"),
        (
            "only_os_version",
            &step.only_os_version,
            f.os_version.as_str(),
            "OS version",
        ),
        ("only_arch", &step.only_arch, f.arch, "architecture"),
    ];
    for (key, re, value, what) in checks {
        if let Some(re) = re.as_deref().filter(|r| !r.is_empty())
            && let Some(why) = regex(key, re, value, what)?
        {
            return Ok(Some(why));
        }
    }
    for (check, paths) in &step.if_files {
        let exists: Vec<bool> = paths.iter().map(|p| f.exists(p)).collect();
        let why = match check.as_str() {
            _ if paths.is_empty() => None,
            "all" => paths
                .iter()
                .zip(&exists)
                .find(|(_, e)| !**e)
                .map(|(p, _)| format!("if_files all: {p} does not exist")),
            "any" => (!exists.contains(&true))
                .then(|| format!("if_files any: none of {} exists", paths.join(", "))),
            "none" => paths
                .iter()
                .zip(&exists)
                .find(|(_, e)| **e)
                .map(|(p, _)| format!("if_files none: {p} exists")),
            other => {
                return Err(format!(
                    "if_files: {other:?} is not a check (any, all or none)"
                ));
            }
        };
        if why.is_some() {
            return Ok(why);
        }
    }
    if let Some(m) = step
        .only_service_manager
        .as_deref()
        .filter(|m| !m.is_empty())
    {
        let want = m.to_ascii_lowercase();
        let have = match want.as_str() {
            "systemd" => f.systemd,
            "openrc" => f.openrc,
            _ => {
                return Err(format!(
                    "only_service_manager {m:?}: not a service manager (systemd or openrc)"
                ));
            }
        };
        if f.systemd && f.openrc {
            return Ok(Some(format!(
                "only_service_manager {m:?}: the root has both systemd and openrc"
            )));
        }
        if !have {
            return Ok(Some(format!(
                "only_service_manager {m:?}: the service manager is not {want}"
            )));
        }
    }
    Ok(None)
}

/// The modules a step uses, in the order they run (for `debug: true`).
fn modules(step: &Step) -> Vec<&'static str> {
    let mut m = Vec::new();
    let mut add = |on: bool, name: &'static str| {
        if on {
            m.push(name);
        }
    };
    add(step.if_.is_some(), "if");
    add(step.dns.is_some(), "dns");
    add(!step.downloads.is_empty(), "downloads");
    add(!step.ensure_entities.is_empty(), "ensure_entities");
    add(!step.directories.is_empty(), "directories");
    add(!step.files.is_empty(), "files");
    add(!step.commands.is_empty(), "commands");
    add(!step.delete_entities.is_empty(), "delete_entities");
    add(step.hostname.is_some(), "hostname");
    add(!step.sysctl.is_empty(), "sysctl");
    add(!step.users.is_empty(), "users");
    add(!step.authorized_keys.is_empty(), "authorized_keys");
    add(!step.modules.is_empty(), "modules");
    add(!step.timesyncd.is_empty(), "timesyncd");
    add(step.systemctl.is_some(), "systemctl");
    add(!step.environment.is_empty(), "environment");
    if m.is_empty() {
        m.push("none");
    }
    m
}

/// `kairos-agent run-stage NAME`: load the config, run the stage, say how it went. Every
/// step runs; failed ones are logged, and with `strict: true` make it `Refused` (exit 1).
/// The boot stage's marker (mark-good's condition) is written only when nothing failed.
pub fn run_stage(
    ctx: &Ctx,
    stage: &str,
    log: &mut dyn Write,
) -> Result<(Outcome, StageReport), AgentError> {
    let opts = config::LoadOptions {
        // No network before switch_root; the fs stage runs before it is up too.
        fetch: !matches!(stage, "rootfs" | "initramfs" | "fs"),
        ..config::LoadOptions::default()
    };
    let loaded = crate::sources::load(ctx, &opts);
    report_load(&loaded, log).map_err(AgentError::Output)?;
    let run_opts = RunOptions {
        debug: loaded.merged.debug,
    };
    if run_opts.debug {
        for s in &loaded.sources {
            writeln!(log, "kairos-agent: debug: source {}", s.origin)
                .map_err(AgentError::Output)?;
        }
    }
    let mut report = run_with(ctx, stage, &loaded.sources, run_opts, log);
    // strict: a source skipped as malformed fails the stage as a failed step does (upstream
    // counts both as the stage's errors).
    if loaded.merged.strict {
        for e in &loaded.errors {
            report.failures.push(format!(
                "stage {stage}: strict: {e}; this source was skipped"
            ));
        }
    }
    writeln!(
        log,
        "kairos-agent: stage {stage}: {} steps ran, {} skipped, {} failed",
        report.ran,
        report.skipped,
        report.failures.len()
    )
    .map_err(AgentError::Output)?;
    if stage == "boot" {
        let marker = ctx.path(BOOT_STAGE_OK);
        if report.ok() {
            if let Some(dir) = marker.parent() {
                std::fs::create_dir_all(dir).at(dir, "creating the directory")?;
            }
            std::fs::write(&marker, "").at(&marker, "writing")?;
        } else if marker.exists() {
            std::fs::remove_file(&marker).at(&marker, "removing")?;
        }
    }
    let outcome = run_stage_outcome(report.ok(), loaded.merged.strict);
    if outcome == Outcome::Done && !report.ok() {
        writeln!(
            log,
            "kairos-agent: stage {stage}: the failures are ignored (exit 0, as upstream); strict: true makes them fail run-stage"
        )
        .map_err(AgentError::Output)?;
    }
    Ok((outcome, report))
}

/// run-stage's exit as upstream decides it: every step gets its chance and failures are
/// logged, but only `strict: true` makes them fail the command (exit 1).
fn run_stage_outcome(all_ok: bool, strict: bool) -> Outcome {
    if all_ok || !strict {
        Outcome::Done
    } else {
        Outcome::Refused
    }
}

/// A hook stage of install, upgrade or reset did not go well and `strict: true` is set.
#[derive(Debug, thiserror::Error)]
#[error("stage {stage}: {} failed and strict is set, so {command} stops: {}", failures.len(), failures.join("; "))]
pub struct HookFailed {
    pub stage: String,
    pub command: &'static str,
    pub failures: Vec<String>,
}

/// Run a hook stage of `command` (install, upgrade, reset): failed steps are a warning and
/// the command goes on, unless the config says `strict: true` (upstream's rule), when they
/// (and sources skipped as malformed) stop it.
pub fn hook(
    ctx: &Ctx,
    loaded: &config::Loaded,
    stage: &str,
    command: &'static str,
    log: &mut dyn Write,
) -> Result<StageReport, HookFailed> {
    let opts = RunOptions {
        debug: loaded.merged.debug,
    };
    hook_with(
        ctx,
        &loaded.sources,
        opts,
        strictness(loaded).as_deref(),
        stage,
        command,
        log,
    )
}

/// The `strict` argument of [`hook_with`] and [`judge`] for a loaded config: `Some(the
/// skipped sources' errors)` when it says `strict: true`.
pub fn strictness(loaded: &config::Loaded) -> Option<Vec<String>> {
    loaded.merged.strict.then(|| skipped(loaded))
}

/// [`strictness`] decided over `sources` (install adds its `--config` file to the loaded
/// ones): the last source that sets `strict` decides.
pub fn strictness_over(sources: &[Source], loaded: &config::Loaded) -> Option<Vec<String>> {
    flag(sources, "strict", |c| c.strict).then(|| skipped(loaded))
}

/// The sources the load skipped (malformed), as strict counts them.
fn skipped(loaded: &config::Loaded) -> Vec<String> {
    loaded.errors.iter().map(|e| e.to_string()).collect()
}

/// [`hook`] over a given list of sources (install adds its `--config` file): `strict` is
/// `Some(the skipped sources' errors)` when the config says `strict: true`.
pub fn hook_with(
    ctx: &Ctx,
    sources: &[Source],
    opts: RunOptions,
    strict: Option<&[String]>,
    stage: &str,
    command: &'static str,
    log: &mut dyn Write,
) -> Result<StageReport, HookFailed> {
    let report = run_with(ctx, stage, sources, opts, log);
    judge(report, strict, stage, command, log)
}

/// How a hook stage's `report` ends `command`, as [`hook_with`] decides: with `strict`
/// (`Some(the skipped sources' errors)`) any failure, a skipped source included, is a
/// [`HookFailed`]; without, failed steps are a warning and the command goes on. Also for the
/// `*-chroot` stages, which run inside the new image ([`crate::upgrade::chroot::hook`]).
pub fn judge(
    mut report: StageReport,
    strict: Option<&[String]>,
    stage: &str,
    command: &'static str,
    log: &mut dyn Write,
) -> Result<StageReport, HookFailed> {
    match strict {
        Some(skipped) => {
            report
                .failures
                .extend(skipped.iter().map(|e| format!("strict: {e}")));
            if !report.ok() {
                return Err(HookFailed {
                    stage: stage.to_owned(),
                    command,
                    failures: report.failures,
                });
            }
        }
        None if !report.ok() => {
            let _ = writeln!(
                log,
                "kairos-agent: warning: stage {stage}: {} step(s) failed; the {command} goes on (strict: true would stop it)",
                report.failures.len()
            );
        }
        None => {}
    }
    Ok(report)
}

/// Say which files were skipped and why, and the unknown keys.
pub fn report_load(loaded: &config::Loaded, log: &mut dyn Write) -> std::io::Result<()> {
    for e in &loaded.errors {
        writeln!(
            log,
            "kairos-agent: error: {e}; this source is skipped, the others apply"
        )?;
    }
    for w in &loaded.warnings {
        writeln!(log, "kairos-agent: warning: {w}")?;
    }
    Ok(())
}

enum StepResult {
    Skipped,
    /// A step filter (only_os, ...) said no: why.
    Filtered(String),
    Done(Vec<String>),
}

fn run_step(ctx: &Ctx, step: &Step, log: &mut dyn Write) -> StepResult {
    if let Some(cond) = step.if_.as_deref().filter(|c| !c.trim().is_empty()) {
        match shell(ctx, cond) {
            Ok(o) if o.success => {}
            Ok(_) => return StepResult::Skipped,
            Err(e) => return StepResult::Done(vec![format!("if: {e}")]),
        }
    }
    let mut errs = Vec::new();
    let mut note = |module: &str, r: Result<(), String>| {
        if let Err(e) = r {
            errs.push(format!("{module}: {e}"));
        }
    };
    // Upstream's module order (kairos-agent's cloudinit plugin list).
    if let Some(d) = &step.dns {
        note("dns", write_dns(ctx, d));
    }
    for d in &step.downloads {
        note("downloads", download(ctx, d));
    }
    for e in &step.ensure_entities {
        note("ensure_entities", users::ensure_entity(ctx, e));
    }
    for d in &step.directories {
        note("directories", make_directory(ctx, d));
    }
    for f in &step.files {
        note("files", write_file(ctx, f));
    }
    for c in &step.commands {
        note("commands", run_command(ctx, c, log));
    }
    for e in &step.delete_entities {
        note("delete_entities", users::delete_entity(ctx, e));
    }
    if let Some(h) = step.hostname.as_deref().filter(|h| !h.is_empty()) {
        note("hostname", set_hostname(ctx, h));
    }
    for (k, v) in &step.sysctl {
        note("sysctl", set_sysctl(ctx, k, v));
    }
    for (name, u) in &step.users {
        note("users", users::ensure_user(ctx, name, u));
    }
    for (name, keys) in &step.authorized_keys {
        note("authorized_keys", users::add_keys(ctx, name, keys));
    }
    for m in &step.modules {
        note("modules", load_module(ctx, m));
    }
    if !step.timesyncd.is_empty() {
        note("timesyncd", write_timesyncd(ctx, &step.timesyncd));
    }
    if let Some(s) = &step.systemctl {
        note("systemctl", systemctl(ctx, s, log));
    }
    if !step.environment.is_empty() {
        let file = step
            .environment_file
            .as_deref()
            .unwrap_or("/etc/environment");
        note(
            "environment",
            write_environment(ctx, file, &step.environment),
        );
    }
    StepResult::Done(errs)
}

pub(crate) struct ShellOutput {
    pub success: bool,
    pub status: String,
    pub output: String,
}

/// `/bin/sh -c cmd` in the root directory, output captured.
pub(crate) fn shell(ctx: &Ctx, cmd: &str) -> Result<ShellOutput, String> {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .current_dir(&ctx.root)
        .stdin(Stdio::null());
    if ctx.chroot {
        // The image's /bin/sh, in the image (install/chroot.rs).
        kairos_init::sys::confine::confine(&mut c, &[], Some(&ctx.root))
            .map_err(|e| e.to_string())?;
    }
    if std::env::var_os("PATH").is_none() {
        c.env("PATH", crate::DEFAULT_PATH);
    }
    let o = c.output().map_err(|e| format!("cannot run /bin/sh: {e}"))?;
    let mut output = String::from_utf8_lossy(&o.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&o.stderr));
    Ok(ShellOutput {
        success: o.status.success(),
        status: o.status.to_string(),
        output,
    })
}

fn run_command(ctx: &Ctx, cmd: &str, log: &mut dyn Write) -> Result<(), String> {
    let o = shell(ctx, cmd)?;
    for line in o.output.lines() {
        let _ = writeln!(log, "kairos-agent:   | {line}");
    }
    if o.success {
        return Ok(());
    }
    let last = o.output.lines().last().unwrap_or("").trim();
    let first = cmd.lines().next().unwrap_or(cmd);
    Err(if last.is_empty() {
        format!("`{first}`: {}", o.status)
    } else {
        format!("`{first}`: {}: {last}", o.status)
    })
}

/// Owner and group ids for a file: numbers as they are, names looked up in the root's
/// /etc/passwd and /etc/group (never through libc: the binary is static).
fn resolve_owner(
    ctx: &Ctx,
    owner: &Option<Id>,
    group: &Option<Id>,
    owner_string: &Option<String>,
) -> Result<Option<Owner>, String> {
    let (mut uid, mut gid) = (None, None);
    if let Some(s) = owner_string.as_deref().filter(|s| !s.is_empty()) {
        let (u, g) = s.split_once(':').map_or((s, None), |(u, g)| (u, Some(g)));
        let (n, primary) = users::lookup_user(ctx, u)?;
        uid = Some(n);
        gid = Some(match g {
            Some(g) => users::lookup_group(ctx, g)?,
            None => primary,
        });
    }
    match owner {
        Some(Id::Num(n)) => uid = Some(*n),
        // cloud-init's `owner: user:group` arrives here.
        Some(Id::Name(s)) => {
            let (u, g) = s
                .split_once(':')
                .map_or((s.as_str(), None), |(u, g)| (u, Some(g)));
            uid = Some(users::lookup_user(ctx, u)?.0);
            if let Some(g) = g {
                gid = Some(users::lookup_group(ctx, g)?);
            }
        }
        None => {}
    }
    match group {
        Some(Id::Num(n)) => gid = Some(*n),
        Some(Id::Name(g)) => gid = Some(users::lookup_group(ctx, g)?),
        None => {}
    }
    Ok((uid.is_some() || gid.is_some()).then_some((uid, gid)))
}

fn decode(content: &str, encoding: Option<&str>) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let enc = encoding.unwrap_or("").trim().to_ascii_lowercase();
    let parts: Vec<&str> = enc.split('+').filter(|s| !s.is_empty()).collect();
    let b64 = parts.iter().any(|p| matches!(*p, "b64" | "base64"));
    let gz = parts.iter().any(|p| matches!(*p, "gz" | "gzip"));
    if let Some(other) = parts
        .iter()
        .find(|p| !matches!(**p, "b64" | "base64" | "gz" | "gzip" | "text/plain"))
    {
        return Err(format!("unknown encoding {other:?}"));
    }
    let mut bytes = content.as_bytes().to_vec();
    if b64 {
        let clean: String = content.chars().filter(|c| !c.is_whitespace()).collect();
        bytes = base64::engine::general_purpose::STANDARD
            .decode(clean.as_bytes())
            .map_err(|e| format!("base64: {e}"))?;
    }
    if gz {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .take(64 << 20)
            .read_to_end(&mut out)
            .map_err(|e| format!("gzip: {e}"))?;
        bytes = out;
    }
    Ok(bytes)
}

fn check_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("no path".into());
    }
    if !p.starts_with('/') {
        return Err(format!("{p}: not an absolute path"));
    }
    Ok(())
}

fn write_file(ctx: &Ctx, f: &File) -> Result<(), String> {
    check_path(&f.path)?;
    let bytes =
        decode(&f.content, f.encoding.as_deref()).map_err(|e| format!("{}: {e}", f.path))?;
    let ids = resolve_owner(ctx, &f.owner, &f.group, &f.owner_string)
        .map_err(|e| format!("{}: {e}", f.path))?;
    let mode = f.permissions.unwrap_or(0o644);
    if f.append {
        let mut all = read_under(ctx, &f.path)?;
        all.extend_from_slice(&bytes);
        return write_under(ctx, &f.path, &all, mode, ids);
    }
    write_under(ctx, &f.path, &bytes, mode, ids)
}

fn make_directory(ctx: &Ctx, d: &Directory) -> Result<(), String> {
    check_path(&d.path)?;
    let ids =
        resolve_owner(ctx, &d.owner, &d.group, &None).map_err(|e| format!("{}: {e}", d.path))?;
    crate::safe_fs::make_dir(
        &ctx.root,
        Path::new(&d.path),
        d.permissions.unwrap_or(0o755),
        ids,
    )
    .map_err(|e| e.to_string())
}

/// `sha256:` as given (hex, optionally `sha256:`-prefixed), lower case; an error when it is
/// not 64 hex digits.
fn wanted_sha256(s: &str) -> Result<String, String> {
    let hex = s.trim();
    let hex = hex
        .strip_prefix("sha256:")
        .unwrap_or(hex)
        .to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("sha256 {s:?}: not 64 hex digits"));
    }
    Ok(hex)
}

fn download(ctx: &Ctx, d: &Download) -> Result<(), String> {
    check_path(&d.path)?;
    let wanted = d
        .sha256
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .map(wanted_sha256)
        .transpose()
        .map_err(|e| format!("{}: {e}", d.url))?;
    let timeout = Duration::from_secs(d.timeout.filter(|t| *t > 0).unwrap_or(60).into());
    let body =
        crate::http::get(&d.url, timeout, 256 << 20).map_err(|e| format!("{}: {e}", d.url))?;
    if let Some(wanted) = wanted {
        use sha2::Digest;
        let got: String = sha2::Sha256::digest(&body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != wanted {
            return Err(format!(
                "{}: sha256 is {got}, expected {wanted}; {} not written",
                d.url, d.path
            ));
        }
    }
    let ids = resolve_owner(ctx, &d.owner, &d.group, &d.owner_string)?;
    let mut p = d.path.clone();
    // A directory target gets the URL's last path segment, as upstream.
    if crate::safe_fs::is_dir(&ctx.root, Path::new(&p)) {
        let name = d
            .url
            .split(['?', '#'])
            .next()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty() && *n != "..")
            .unwrap_or("download");
        p = format!("{}/{name}", p.trim_end_matches('/'));
    }
    write_under(ctx, &p, &body, d.permissions.unwrap_or(0o644), ids)
}

fn write_dns(ctx: &Ctx, d: &Dns) -> Result<(), String> {
    let path = d.path.as_deref().unwrap_or("/etc/resolv.conf");
    check_path(path)?;
    let mut text = String::from("# written by kairos-agent (dns step)\n");
    for n in &d.nameservers {
        text.push_str(&format!("nameserver {n}\n"));
    }
    if !d.search.is_empty() {
        text.push_str(&format!("search {}\n", d.search.join(" ")));
    }
    if !d.options.is_empty() {
        text.push_str(&format!("options {}\n", d.options.join(" ")));
    }
    write_under(ctx, path, text.as_bytes(), 0o644, None)
}

fn set_hostname(ctx: &Ctx, name: &str) -> Result<(), String> {
    let name = name.trim();
    if name.len() > 64 || name.contains(['/', ' ', '\n']) {
        return Err(format!("{name:?}: not a valid host name"));
    }
    write_under(
        ctx,
        "/etc/hostname",
        format!("{name}\n").as_bytes(),
        0o644,
        None,
    )?;
    // /etc/hosts: so the name resolves locally (Debian's 127.0.1.1 convention).
    let hosts = String::from_utf8_lossy(&read_under(ctx, "/etc/hosts")?).into_owned();
    let known = hosts.lines().any(|l| {
        let l = l.split('#').next().unwrap_or("");
        l.split_whitespace().skip(1).any(|w| w == name)
    });
    if !known {
        let mut text = hosts;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("127.0.1.1\t{name}\n"));
        write_under(ctx, "/etc/hosts", text.as_bytes(), 0o644, None)?;
    }
    if ctx.root == Path::new("/") {
        rustix::system::sethostname(name.as_bytes()).map_err(|e| format!("sethostname: {e}"))?;
    }
    Ok(())
}

fn set_sysctl(ctx: &Ctx, key: &str, value: &str) -> Result<(), String> {
    let rel = if key.contains('/') {
        key.trim_start_matches('/').to_owned()
    } else {
        key.replace('.', "/")
    };
    if rel.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(format!("{key}: not a sysctl key"));
    }
    let p = ctx.path(format!("/proc/sys/{rel}"));
    // /proc/sys entries exist or the key is unknown to the kernel: never create one.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .map_err(|e| format!("{key}: {e}"))?;
    f.write_all(format!("{value}\n").as_bytes())
        .map_err(|e| format!("{key}={value}: {e}"))
}

const MODPROBE: &[&str] = &[
    "/sbin/modprobe",
    "/usr/sbin/modprobe",
    "/bin/modprobe",
    "/usr/bin/modprobe",
];

fn load_module(ctx: &Ctx, name: &str) -> Result<(), String> {
    use kairos_init::modules::{self, LoadOutcome, ModuleIndex};
    if let Some(mp) = MODPROBE.iter().map(|m| ctx.path(m)).find(|p| p.is_file()) {
        let o = Command::new(&mp)
            .arg(name)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", mp.display()))?;
        if o.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&o.stderr);
        return Err(format!("modprobe {name}: {}: {}", o.status, said.trim()));
    }
    // No modprobe (a minimal image): kairos-init's own loader, finit_module by path.
    if ctx.root != Path::new("/") {
        return Err(format!("{name}: no modprobe under {}", ctx.root.display()));
    }
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    let dir = PathBuf::from(format!("/lib/modules/{release}"));
    let index = ModuleIndex::scan(&dir).map_err(|e| e.to_string())?;
    let order = index.resolve(&[name]).map_err(|e| e.to_string())?;
    let loaded = modules::loaded(Path::new("/sys"));
    for m in order {
        if loaded.contains(&m) {
            continue;
        }
        let Some((path, _)) = index.get(&m) else {
            continue;
        };
        match modules::load(&m, path, "").map_err(|e| e.to_string())? {
            LoadOutcome::Loaded | LoadOutcome::AlreadyLoaded => {}
        }
    }
    Ok(())
}

fn write_timesyncd(ctx: &Ctx, kv: &BTreeMap<String, String>) -> Result<(), String> {
    let mut text = String::from("# written by kairos-agent (timesyncd step)\n[Time]\n");
    for (k, v) in kv {
        text.push_str(&format!("{k}={v}\n"));
    }
    write_under(
        ctx,
        "/etc/systemd/timesyncd.conf",
        text.as_bytes(),
        0o644,
        None,
    )
}

fn systemctl(ctx: &Ctx, s: &Systemctl, log: &mut dyn Write) -> Result<(), String> {
    let mut errs = Vec::new();
    for o in &s.overrides {
        let name = o
            .name
            .clone()
            .unwrap_or_else(|| "override-kairos.conf".into());
        let name = if name.ends_with(".conf") {
            name
        } else {
            format!("{name}.conf")
        };
        let svc = if o.service.contains('.') {
            o.service.clone()
        } else {
            format!("{}.service", o.service)
        };
        let p = format!("/etc/systemd/system/{svc}.d/{name}");
        if let Err(e) = write_under(ctx, &p, o.content.as_bytes(), 0o644, None) {
            errs.push(e);
        }
    }
    let on_root = ctx.root == Path::new("/");
    for (verb, units) in [
        ("enable", &s.enable),
        ("disable", &s.disable),
        ("mask", &s.mask),
        ("start", &s.start),
    ] {
        for u in units {
            // Off the running system only the unit files can change.
            if !on_root && verb == "start" {
                continue;
            }
            let root_arg = if on_root {
                String::new()
            } else {
                format!(
                    "--root={} ",
                    config::de::shell_quote(&ctx.root.to_string_lossy())
                )
            };
            let cmd = format!("systemctl {root_arg}{verb} {}", config::de::shell_quote(u));
            if let Err(e) = run_command(ctx, &cmd, log) {
                errs.push(e);
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// Set KEY=VALUE lines in an environment file, keeping its other lines.
fn write_environment(ctx: &Ctx, file: &str, vars: &BTreeMap<String, String>) -> Result<(), String> {
    check_path(file)?;
    let old = String::from_utf8_lossy(&read_under(ctx, file)?).into_owned();
    let mut lines: Vec<String> = Vec::new();
    let mut done = Vec::new();
    for l in old.lines() {
        let key = l
            .split_once('=')
            .map(|(k, _)| k.trim().trim_start_matches("export ").trim());
        match key.and_then(|k| vars.get_key_value(k)) {
            Some((k, v)) => {
                lines.push(format!("{k}={}", env_value(v)));
                done.push(k.clone());
            }
            None => lines.push(l.to_owned()),
        }
    }
    for (k, v) in vars {
        if !done.contains(k) {
            lines.push(format!("{k}={}", env_value(v)));
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    write_under(ctx, file, text.as_bytes(), 0o644, None)
}

/// A value for a KEY=VALUE file read by pam_env, systemd and sh: quoted when it needs it.
pub(crate) fn env_value(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:,+@%=".contains(c))
    {
        return v.to_owned();
    }
    format!(
        "\"{}\"",
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('$', "\\$")
            .replace('`', "\\`")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn source(origin: &str, yaml: &str) -> Source {
        config::parse(origin, yaml, false).unwrap().unwrap()
    }

    fn go(t: &Tree, stage: &str, sources: &[Source]) -> (StageReport, String) {
        let mut log = Vec::new();
        let r = super::run(&t.ctx, stage, sources, &mut log);
        (r, String::from_utf8(log).unwrap())
    }

    fn read(t: &Tree, p: &str) -> String {
        std::fs::read_to_string(t.ctx.path(p)).unwrap()
    }

    fn mode(t: &Tree, p: &str) -> u32 {
        std::fs::metadata(t.ctx.path(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    fn base_users(t: &Tree) {
        t.file(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nkairos:x:1000:1000::/home/kairos:/bin/bash\n",
        );
        t.file("/etc/shadow", "root:*:19000:0:99999:7:::\n");
        t.file("/etc/group", "root:x:0:\nadmin:x:27:\nkairos:x:1000:\n");
    }

    #[test]
    fn before_stage_after_and_file_order_and_if() {
        let t = Tree::new();
        let a = source(
            "/oem/a.yaml",
            "stages:\n  boot.after:\n  - commands: [echo a-after >> order]\n  boot:\n  - commands: [echo a >> order]\n  - name: never\n    if: '[ -e /nonexistent-kairos ]'\n    commands: [echo never >> order]\n",
        );
        let b = source(
            "/oem/b.yaml",
            "stages:\n  boot.before:\n  - commands: [echo b-before >> order]\n  boot:\n  - commands: [echo b >> order]\n  network:\n  - commands: [echo net >> order]\n",
        );
        let (r, log) = go(&t, "boot", &[a, b]);
        assert_eq!(read(&t, "/order"), "b-before\na\nb\na-after\n");
        assert_eq!((r.ran, r.skipped, r.failures.len()), (4, 1, 0), "{log}");
        assert!(
            log.contains("kairos-agent: stage boot: /oem/a.yaml: step \"never\": skipped"),
            "{log}"
        );
    }

    #[test]
    fn a_failing_step_is_named_and_the_rest_still_runs() {
        let t = Tree::new();
        let a = source(
            "/oem/10.yaml",
            "stages:\n  boot:\n  - name: breaks\n    commands: ['echo oops >&2; exit 3', echo still >> ran]\n  - commands: [echo next >> ran]\n",
        );
        let (r, log) = go(&t, "boot", &[a]);
        assert_eq!(read(&t, "/ran"), "still\nnext\n");
        assert_eq!(r.failures.len(), 1);
        assert_eq!(
            r.failures[0],
            "stage boot: /oem/10.yaml: step \"breaks\": commands: `echo oops >&2; exit 3`: exit status: 3: oops"
        );
        assert!(log.contains("step \"breaks\": FAILED"), "{log}");
    }

    #[test]
    fn files_directories_and_encodings() {
        let t = Tree::new();
        base_users(&t);
        let s = source(
            "/oem/f.yaml",
            "stages:\n  fs:\n  - directories:\n    - path: /var/lib/thing\n      permissions: 0700\n      owner: 1000\n      group: 1000\n    files:\n    - path: /etc/plain\n      content: hello\n    - path: /etc/secret\n      content: aGVsbG8=\n      encoding: b64\n      permissions: 0600\n      owner_string: kairos\n    - path: /etc/zipped\n      content: H4sIAAAAAAAAA8tIzcnJBwCGphA2BQAAAA==\n      encoding: gz+b64\n    - path: /etc/plain\n      content: ' more'\n      append: true\n    - path: relative\n      content: x\n",
        );
        let (r, log) = go(&t, "fs", &[s]);
        assert_eq!(r.failures.len(), 1, "{log}");
        assert!(
            r.failures[0].contains("files: relative: not an absolute path"),
            "{:?}",
            r.failures
        );
        assert_eq!(read(&t, "/etc/plain"), "hello more");
        assert_eq!(mode(&t, "/etc/plain"), 0o644);
        assert_eq!(read(&t, "/etc/secret"), "hello");
        assert_eq!(mode(&t, "/etc/secret"), 0o600);
        let m = std::fs::metadata(t.ctx.path("/etc/secret")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000));
        assert_eq!(read(&t, "/etc/zipped"), "hello");
        assert_eq!(mode(&t, "/var/lib/thing"), 0o700);
        assert_eq!(
            std::fs::metadata(t.ctx.path("/var/lib/thing"))
                .unwrap()
                .uid(),
            1000
        );
    }

    #[test]
    fn users_groups_keys_and_passwords() {
        let t = Tree::new();
        base_users(&t);
        let s = source(
            "/oem/u.yaml",
            "#cloud-config\nusers:\n- name: alice\n  passwd: secret\n  groups: [admin, newgroup]\n  shell: /bin/bash\n  ssh_authorized_keys: [ssh-ed25519 AAAA alice@x]\n- name: kairos\n  passwd: $6$salt$hash\nssh_authorized_keys: [ssh-ed25519 BBBB shared]\nstages:\n  boot:\n  - users:\n      svc: {system: true, no_create_home: true}\n    authorized_keys:\n      root: [ssh-rsa CCCC root]\n",
        );
        let (r, log) = go(&t, "boot", &[s]);
        assert!(r.ok(), "{log}");
        let passwd = read(&t, "/etc/passwd");
        assert!(
            passwd.contains("alice:x:1001:1001::/home/alice:/bin/bash\n"),
            "{passwd}"
        );
        assert!(
            passwd.contains("svc:x:999:999::/home/svc:/bin/sh\n"),
            "{passwd}"
        );
        let group = read(&t, "/etc/group");
        assert!(group.contains("admin:x:27:alice\n"), "{group}");
        assert!(group.contains("alice:x:1001:\n"), "{group}");
        assert!(group.contains("newgroup:x:1002:alice\n"), "{group}");
        let shadow = read(&t, "/etc/shadow");
        let alice = shadow.lines().find(|l| l.starts_with("alice:")).unwrap();
        assert!(alice.starts_with("alice:$6$"), "{alice}");
        assert!(shadow.contains("kairos:$6$salt$hash:"), "{shadow}");
        assert!(shadow.lines().any(|l| l.starts_with("svc:!:")), "{shadow}");
        assert_eq!(
            mode(&t, "/etc/shadow"),
            0o644,
            "an existing file keeps its mode"
        );
        let keys = read(&t, "/home/alice/.ssh/authorized_keys");
        assert_eq!(keys, "ssh-ed25519 AAAA alice@x\nssh-ed25519 BBBB shared\n");
        assert_eq!(mode(&t, "/home/alice/.ssh/authorized_keys"), 0o600);
        assert_eq!(mode(&t, "/home/alice/.ssh"), 0o700);
        let m = std::fs::metadata(t.ctx.path("/home/alice/.ssh/authorized_keys")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1001, 1001));
        assert_eq!(
            read(&t, "/root/.ssh/authorized_keys"),
            "ssh-rsa CCCC root\n"
        );
        assert!(!t.ctx.path("/home/svc").exists());
        // Again: nothing duplicated.
        let s2 = source(
            "/oem/u.yaml",
            "users:\n- name: alice\n  ssh_authorized_keys: [ssh-ed25519 AAAA alice@x]\n  groups: admin\n",
        );
        let (r, _) = go(&t, "boot", &[s2]);
        assert!(r.ok());
        assert_eq!(
            read(&t, "/etc/passwd")
                .lines()
                .filter(|l| l.starts_with("alice:"))
                .count(),
            1
        );
        assert_eq!(read(&t, "/etc/group"), group);
        assert_eq!(read(&t, "/home/alice/.ssh/authorized_keys"), keys);
    }

    #[test]
    fn password_hashes_verify() {
        let h = users::password_hash("kairos").unwrap();
        assert!(h.starts_with("$6$"), "{h}");
        use sha_crypt::{PasswordVerifier, ShaCrypt};
        let parsed = sha_crypt::PasswordHash::new(&h).unwrap();
        assert!(
            ShaCrypt::default()
                .verify_password(b"kairos", &parsed)
                .is_ok()
        );
        assert_eq!(users::password_hash("$6$x$y").unwrap(), "$6$x$y");
        assert_eq!(users::password_hash("!").unwrap(), "!");
    }

    #[test]
    fn hostname_environment_sysctl_dns_timesyncd() {
        let t = Tree::new();
        t.file("/proc/sys/vm/swappiness", "60\n");
        t.file("/proc/sys/net/ipv4/ip_forward", "0\n");
        t.file("/etc/hosts", "127.0.0.1 localhost\n");
        t.file("/etc/environment", "LANG=C\nFOO=old\n");
        std::os::unix::fs::symlink(
            "/run/systemd/resolve/resolv.conf",
            t.ctx.path("/etc/resolv.conf"),
        )
        .unwrap();
        let s = source(
            "/oem/h.yaml",
            "stages:\n  boot:\n  - hostname: node-1\n    environment: {FOO: new, BAR: 'two words'}\n    systctl: {vm.swappiness: '10'}\n  - sysctl:\n      net.ipv4.ip_forward: 1\n      kernel.nope: 1\n    dns:\n      nameservers: [10.0.2.3, 1.1.1.1]\n      search: [lan]\n      options: [ndots:2]\n    timesyncd: {NTP: pool.ntp.org}\n    environment_file: /etc/k3s.env\n    environment: {K: v}\n",
        );
        let (r, log) = go(&t, "boot", &[s]);
        assert_eq!(read(&t, "/etc/hostname"), "node-1\n");
        assert_eq!(
            read(&t, "/etc/hosts"),
            "127.0.0.1 localhost\n127.0.1.1\tnode-1\n"
        );
        assert_eq!(
            read(&t, "/etc/environment"),
            "LANG=C\nFOO=new\nBAR=\"two words\"\n"
        );
        assert_eq!(read(&t, "/etc/k3s.env"), "K=v\n");
        assert_eq!(read(&t, "/proc/sys/vm/swappiness"), "10\n");
        assert_eq!(read(&t, "/proc/sys/net/ipv4/ip_forward"), "1\n");
        assert_eq!(r.failures.len(), 1, "{log}");
        assert!(
            r.failures[0].contains("sysctl: kernel.nope: No such file"),
            "{:?}",
            r.failures
        );
        let resolv = t.ctx.path("/etc/resolv.conf");
        assert!(
            !std::fs::symlink_metadata(&resolv)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            read(&t, "/etc/resolv.conf"),
            "# written by kairos-agent (dns step)\nnameserver 10.0.2.3\nnameserver 1.1.1.1\nsearch lan\noptions ndots:2\n"
        );
        assert!(read(&t, "/etc/systemd/timesyncd.conf").contains("[Time]\nNTP=pool.ntp.org\n"));
    }

    #[test]
    fn modules_use_the_roots_modprobe() {
        let t = Tree::new();
        t.file(
            "/sbin/modprobe",
            format!(
                "#!/bin/sh\necho \"$@\" >> {}/modprobed\n[ \"$1\" != bad ]\n",
                t.ctx.root.display()
            ),
        );
        std::fs::set_permissions(
            t.ctx.path("/sbin/modprobe"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let s = source(
            "/oem/m.yaml",
            "stages:\n  boot:\n  - modules: [br_netfilter, bad, overlay]\n",
        );
        let (r, _) = go(&t, "boot", &[s]);
        assert_eq!(read(&t, "/modprobed"), "br_netfilter\nbad\noverlay\n");
        assert_eq!(r.failures.len(), 1);
        assert!(
            r.failures[0].contains("modules: modprobe bad: exit status: 1"),
            "{:?}",
            r.failures
        );
    }

    #[test]
    fn entities_are_ensured_and_deleted() {
        let t = Tree::new();
        base_users(&t);
        let s = source(
            "/oem/e.yaml",
            "stages:\n  boot:\n  - ensure_entities:\n    - path: /etc/passwd\n      entity: |\n        kind: user\n        username: foo\n        password: x\n        uid: 1500\n        gid: 100\n        info: Foo\n        homedir: /home/foo\n        shell: /bin/sh\n    - path: /etc/group\n      entity: |\n        kind: group\n        group_name: foos\n        password: x\n        gid: 1500\n        users: foo,kairos\n    delete_entities:\n    - path: /etc/passwd\n      entity: |\n        kind: user\n        username: kairos\n",
        );
        let (r, log) = go(&t, "boot", &[s]);
        assert!(r.ok(), "{log}");
        assert_eq!(
            read(&t, "/etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nfoo:x:1500:100:Foo:/home/foo:/bin/sh\n"
        );
        assert!(read(&t, "/etc/group").ends_with("foos:x:1500:foo,kairos\n"));
    }

    #[test]
    fn run_stage_boot_writes_the_marker_only_without_failures() {
        let t = Tree::new();
        t.file(
            "/oem/90.yaml",
            "#cloud-config\nstages:\n  boot:\n  - commands: ['true']\n",
        );
        let mut log = Vec::new();
        let (o, r) = run_stage(&t.ctx, "boot", &mut log).unwrap();
        assert_eq!((o, r.ran), (Outcome::Done, 1));
        assert!(t.ctx.path(BOOT_STAGE_OK).exists());
        t.file(
            "/oem/95.yaml",
            "#cloud-config\nstages:\n  boot:\n  - commands: ['false']\n",
        );
        t.file("/oem/50_bad.yaml", "#cloud-config\nstages: [\n");
        let mut log = Vec::new();
        let (o, r) = run_stage(&t.ctx, "boot", &mut log).unwrap();
        let log = String::from_utf8(log).unwrap();
        // Without strict a failed step does not fail run-stage (upstream), but the boot
        // marker, mark-good's condition, is not written.
        assert_eq!((o, r.ran, r.failures.len()), (Outcome::Done, 2, 1));
        assert!(!t.ctx.path(BOOT_STAGE_OK).exists());
        assert!(
            log.contains("kairos-agent: error: /oem/50_bad.yaml:"),
            "{log}"
        );
        assert!(
            log.contains("kairos-agent: stage boot: 2 steps ran, 0 skipped, 1 failed\nkairos-agent: stage boot: the failures are ignored (exit 0, as upstream); strict: true makes them fail run-stage\n"),
            "{log}"
        );
        t.file("/oem/99.yaml", "#cloud-config\nstrict: true\n");
        let mut log = Vec::new();
        let (o, r) = run_stage(&t.ctx, "boot", &mut log).unwrap();
        let log = String::from_utf8(log).unwrap();
        // strict: the failed step and the skipped file.
        assert_eq!((o, r.failures.len()), (Outcome::Refused, 2), "{log}");
        assert!(!log.contains("the failures are ignored"), "{log}");
    }

    #[test]
    fn run_stage_fails_only_under_strict() {
        assert_eq!(run_stage_outcome(true, false), Outcome::Done);
        assert_eq!(run_stage_outcome(true, true), Outcome::Done);
        assert_eq!(run_stage_outcome(false, false), Outcome::Done);
        assert_eq!(run_stage_outcome(false, true), Outcome::Refused);
    }

    /// A symlink at `link` (inside the tree) to `target` (a host path), owned by `uid` as if
    /// that user had planted it.
    fn plant(t: &Tree, link: &str, target: &Path, uid: u32) {
        let l = t.ctx.path(link);
        std::os::unix::fs::symlink(target, &l).expect("planting a symlink");
        std::os::unix::fs::lchown(&l, Some(uid), Some(uid)).expect("lchown (needs root)");
    }

    /// (mode, uid, content or directory listing) of a host path, to show it untouched.
    fn snapshot(p: &Path) -> (u32, u32, Vec<String>) {
        let m = std::fs::symlink_metadata(p).expect("victim exists");
        let content = if m.is_dir() {
            let mut v: Vec<String> = std::fs::read_dir(p)
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        } else {
            vec![std::fs::read_to_string(p).expect("read")]
        };
        (m.mode() & 0o7777, m.uid(), content)
    }

    /// A one-route plain HTTP server answering `body` to every request.
    fn serve(body: &'static [u8]) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("address").port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(body);
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    #[test]
    fn symlinks_planted_by_a_user_are_not_followed() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (chown, lchown)"
        );
        let t = Tree::new();
        base_users(&t);
        t.file(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nkairos:x:1000:1000::/home/kairos:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n",
        );
        // Root's things a user would like to own: a file and a directory.
        t.file("/etc/victim", "secret\n");
        let victim = t.ctx.path("/etc/victim");
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let vdir = t.ctx.path("/victimdir");
        std::fs::create_dir(&vdir).expect("mkdir");
        std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for (home, uid) in [("/home/kairos", 1000), ("/home/bob", 1001)] {
            std::fs::create_dir_all(t.ctx.path(home)).expect("mkdir home");
            std::os::unix::fs::chown(t.ctx.path(home), Some(uid), Some(uid)).expect("chown");
        }
        let bob_ssh = t.ctx.path("/home/bob/.ssh");
        std::fs::create_dir(&bob_ssh).expect("mkdir");
        std::os::unix::fs::chown(&bob_ssh, Some(1001), Some(1001)).expect("chown");
        // kairos: ~/.ssh is a link to root's directory; bob: authorized_keys is a link to
        // root's file; kairos also points a directory, a subdirectory, a download target and
        // the old fixed temporary name of a file at root's things.
        plant(&t, "/home/kairos/.ssh", &vdir, 1000);
        plant(&t, "/home/bob/.ssh/authorized_keys", &victim, 1001);
        plant(&t, "/home/kairos/data", &vdir, 1000);
        plant(&t, "/home/kairos/etc", &t.ctx.path("/etc"), 1000);
        plant(&t, "/home/kairos/.notes.kairos-tmp", &victim, 1000);
        plant(&t, "/home/kairos/dl", &vdir, 1000);
        let (victim0, vdir0) = (snapshot(&victim), snapshot(&vdir));
        let url = serve(b"downloaded\n");
        let s = source(
            "/oem/s.yaml",
            &format!(
                "stages:\n  boot:\n  - name: keys\n    authorized_keys:\n      kairos: [ssh-ed25519 KKKK k]\n      bob: [ssh-ed25519 BBBB b]\n  - name: dirs\n    directories:\n    - {{path: /home/kairos/data, permissions: 0777, owner: 1000}}\n  - name: files\n    files:\n    - {{path: /home/kairos/etc/planted.conf, content: x, owner: 1000}}\n  - name: tmpname\n    files:\n    - {{path: /home/kairos/notes, content: mine, owner: 1000, permissions: 0644}}\n  - name: dl\n    downloads:\n    - {{path: /home/kairos/dl, url: '{url}/blob.bin', owner: 1000}}\n"
            ),
        );
        let (r, log) = go(&t, "boot", &[s]);
        // Root's file and directory are as they were: mode, owner, content.
        assert_eq!(snapshot(&victim), victim0, "{log}");
        assert_eq!(snapshot(&vdir), vdir0, "{log}");
        assert!(!t.ctx.path("/etc/planted.conf").exists(), "{log}");
        // Each refused step names the link.
        let failed = r.failures.join("\n");
        for (step, at) in [
            ("keys", "/home/kairos/.ssh is a symlink owned by uid 1000"),
            (
                "keys",
                "/home/bob/.ssh/authorized_keys is a symlink owned by uid 1001",
            ),
            ("dirs", "/home/kairos/data is a symlink owned by uid 1000"),
            ("files", "/home/kairos/etc is a symlink owned by uid 1000"),
        ] {
            assert!(
                r.failures
                    .iter()
                    .any(|f| f.contains(&format!("step \"{step}\"")) && f.contains(at)),
                "{step}: {at}\n{failed}"
            );
        }
        assert_eq!(r.failures.len(), 3, "{failed}");
        // bob's link is left as it was, not replaced by a file holding root's secret.
        assert!(
            std::fs::symlink_metadata(t.ctx.path("/home/bob/.ssh/authorized_keys"))
                .expect("still there")
                .file_type()
                .is_symlink()
        );
        // A file whose old temporary name was planted is written all the same, as the user's.
        assert_eq!(read(&t, "/home/kairos/notes"), "mine");
        let m = std::fs::metadata(t.ctx.path("/home/kairos/notes")).expect("notes");
        assert_eq!((m.uid(), m.mode() & 0o7777), (1000, 0o644));
        // A download onto a planted directory link replaces the link with the file.
        let dl = t.ctx.path("/home/kairos/dl");
        assert!(
            std::fs::symlink_metadata(&dl).expect("dl").is_file(),
            "{log}"
        );
        assert_eq!(read(&t, "/home/kairos/dl"), "downloaded\n");
    }

    #[test]
    fn a_download_with_the_wrong_sha256_is_not_written() {
        let t = Tree::new();
        base_users(&t);
        let url = serve(b"payload\n");
        use sha2::Digest;
        let right: String = sha2::Sha256::digest(b"payload\n")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let wrong = "0".repeat(64);
        let s = source(
            "/oem/d.yaml",
            &format!(
                "stages:\n  boot:\n  - name: good\n    downloads:\n    - {{path: /etc/good.bin, url: '{url}/p', sha256: 'sha256:{}', permissions: 0600, owner_string: kairos, group: 27, timeout: 5}}\n  - name: bad\n    downloads:\n    - {{path: /etc/bad.bin, url: '{url}/p', sha256: '{wrong}'}}\n  - name: malformed\n    downloads:\n    - {{path: /etc/odd.bin, url: '{url}/p', sha256: xyz}}\n",
                right.to_uppercase()
            ),
        );
        let (r, log) = go(&t, "boot", &[s]);
        assert_eq!(read(&t, "/etc/good.bin"), "payload\n", "{log}");
        let m = std::fs::metadata(t.ctx.path("/etc/good.bin")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, 1000, 27));
        assert!(!t.ctx.path("/etc/bad.bin").exists(), "{log}");
        assert!(!t.ctx.path("/etc/odd.bin").exists(), "{log}");
        assert_eq!(r.failures.len(), 2, "{log}");
        assert!(
            r.failures[0].contains(&format!(
                "step \"bad\": downloads: {url}/p: sha256 is {right}, expected {wrong}; /etc/bad.bin not written"
            )),
            "{}",
            r.failures[0]
        );
        assert!(
            r.failures[1].contains("sha256 \"xyz\": not 64 hex digits"),
            "{}",
            r.failures[1]
        );
    }

    fn run_logged(t: &Tree, stage: &str) -> (Outcome, StageReport, String) {
        let mut log = Vec::new();
        let (o, r) = run_stage(&t.ctx, stage, &mut log).unwrap();
        (o, r, String::from_utf8(log).unwrap())
    }

    #[test]
    fn a_files_name_shows_in_the_stage_log() {
        let t = Tree::new();
        t.file(
            "/oem/10.yaml",
            "#cloud-config\nname: Tune the box\nstages:\n  boot:\n  - name: one\n    commands: ['true']\n",
        );
        let (_, _, log) = run_logged(&t, "boot");
        assert!(
            log.contains("stage boot: /oem/10.yaml (\"Tune the box\"): step \"one\": done"),
            "{log}"
        );
    }

    #[test]
    fn strict_fails_hooks_and_counts_skipped_sources() {
        let t = Tree::new();
        t.file(
            "/oem/10.yaml",
            "#cloud-config\nstages:\n  before-install:\n  - name: breaks\n    commands: ['exit 4', 'echo still >> ran']\n  boot:\n  - commands: ['true']\n",
        );
        t.file("/oem/20_bad.yaml", "#cloud-config\nstages: [\n");
        let load = |t: &Tree| {
            crate::sources::load(
                &t.ctx,
                &config::LoadOptions {
                    fetch: false,
                    ..config::LoadOptions::default()
                },
            )
        };
        // Not strict: the hook's failure is a warning and the command goes on; run-stage
        // does not count the skipped file as a failure.
        let mut log = Vec::new();
        let r = hook(&t.ctx, &load(&t), "before-install", "install", &mut log).unwrap();
        let text = String::from_utf8(log).unwrap();
        assert_eq!(r.failures.len(), 1);
        assert!(
            text.contains("warning: stage before-install: 1 step(s) failed; the install goes on"),
            "{text}"
        );
        assert_eq!(read(&t, "/ran"), "still\n", "the step's other commands ran");
        let (o, r, _) = run_logged(&t, "boot");
        assert_eq!((o, r.failures.len()), (Outcome::Done, 0));
        // strict: the hook stops the command (every step still ran, as upstream), and the
        // skipped file fails the stage.
        t.file("/oem/30.yaml", "#cloud-config\nstrict: true\n");
        let mut log = Vec::new();
        let e = hook(&t.ctx, &load(&t), "before-install", "install", &mut log).unwrap_err();
        assert_eq!(read(&t, "/ran"), "still\nstill\n");
        assert_eq!(e.failures.len(), 2, "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("stage before-install: 2 failed and strict is set, so install stops: stage before-install: /oem/10.yaml: step \"breaks\": commands: `exit 4`: exit status: 4; strict: /oem/20_bad.yaml:"),
            "{msg}"
        );
        let (o, r, log) = run_logged(&t, "boot");
        assert_eq!(o, Outcome::Refused, "{log}");
        assert_eq!(r.failures.len(), 1);
        assert!(
            r.failures[0].starts_with("stage boot: strict: /oem/20_bad.yaml:"),
            "{:?}",
            r.failures
        );
        assert!(!t.ctx.path(BOOT_STAGE_OK).exists());
    }

    #[test]
    fn debug_logs_sources_filters_and_modules() {
        let t = Tree::new();
        t.file(
            "/oem/10.yaml",
            "#cloud-config\nstages:\n  boot:\n  - name: files\n    files: [{path: /etc/a, content: x}]\n    commands: ['true']\n  - name: never\n    only_service_manager: openrc\n",
        );
        let (_, _, quiet) = run_logged(&t, "boot");
        assert!(!quiet.contains("debug:"), "{quiet}");
        t.file("/oem/20.yaml", "#cloud-config\ndebug: true\n");
        let (_, r, log) = run_logged(&t, "boot");
        assert_eq!((r.ran, r.skipped), (1, 1), "{log}");
        for line in [
            "kairos-agent: debug: source /oem/10.yaml\n",
            "kairos-agent: debug: source /oem/20.yaml\n",
            "kairos-agent: debug: stage boot.before: /oem/10.yaml: no steps\n",
            "kairos-agent: debug: stage boot: /oem/10.yaml: step \"files\": modules: files, commands\n",
            "kairos-agent: debug: stage boot: /oem/10.yaml: step \"never\": modules: none\n",
            "kairos-agent: stage boot: /oem/10.yaml: step \"never\": skipped (only_service_manager \"openrc\": the service manager is not openrc)\n",
        ] {
            assert!(log.contains(line), "{line}\n{log}");
        }
        // A later file turns it off again (the merge's rule).
        t.file("/oem/30.yaml", "#cloud-config\ndebug: false\n");
        let (_, _, log) = run_logged(&t, "boot");
        assert!(!log.contains("debug:"), "{log}");
    }

    #[test]
    fn only_os_version_arch_and_service_manager_filter_steps() {
        let t = Tree::new();
        t.file(
            "/etc/os-release",
            "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.19.1\nPRETTY_NAME=\"Alpine Linux v3.19\"\n",
        );
        t.file("/usr/bin/openrc", "");
        let arch = config::template::go_arch(std::env::consts::ARCH);
        let s = source(
            "/oem/f.yaml",
            &format!(
                "stages:\n  boot:\n  - {{name: alpine, only_os: Alpine, commands: [echo alpine >> ran]}}\n  - {{name: ubuntu, only_os: '^Ubuntu', commands: [echo ubuntu >> ran]}}\n  - {{name: v319, only_os_version: '^3\\.19', commands: [echo v319 >> ran]}}\n  - {{name: v4, only_os_version: '^4', commands: [echo v4 >> ran]}}\n  - {{name: arch, only_arch: '^{arch}$', commands: [echo arch >> ran]}}\n  - {{name: s390, only_arch: s390x, commands: [echo s390 >> ran]}}\n  - {{name: openrc, only_service_manager: OpenRC, commands: [echo openrc >> ran]}}\n  - {{name: systemd, only_service_manager: systemd, commands: [echo systemd >> ran]}}\n  - {{name: badre, only_os: '(', commands: [echo badre >> ran]}}\n  - {{name: runit, only_service_manager: runit, commands: [echo runit >> ran]}}\n  - {{name: files-all, if_files: {{all: [/etc/os-release, /usr/bin/openrc]}}, commands: [echo files-all >> ran]}}\n  - {{name: files-any, if_files: {{any: [/nope, /etc/os-release]}}, commands: [echo files-any >> ran]}}\n  - {{name: files-none, if_files: {{none: [/etc/os-release]}}, commands: [echo files-none >> ran]}}\n  - {{name: files-all2, if_files: {{all: [/etc/os-release, /nope]}}, commands: [echo files-all2 >> ran]}}\n  - {{name: files-odd, if_files: {{some: [/etc]}}, commands: [echo files-odd >> ran]}}\n"
            ),
        );
        let (r, log) = go(&t, "boot", std::slice::from_ref(&s));
        assert_eq!(
            read(&t, "/ran"),
            "alpine\nv319\narch\nopenrc\nfiles-all\nfiles-any\n",
            "{log}"
        );
        assert_eq!((r.ran, r.skipped, r.failures.len()), (9, 6, 3), "{log}");
        assert!(
            log.contains("step \"files-none\": skipped (if_files none: /etc/os-release exists)"),
            "{log}"
        );
        assert!(
            log.contains("step \"files-all2\": skipped (if_files all: /nope does not exist)"),
            "{log}"
        );
        assert!(
            r.failures[2].contains(
                "step \"files-odd\": if_files: \"some\" is not a check (any, all or none)"
            ),
            "{:?}",
            r.failures
        );
        for line in [
            "step \"ubuntu\": skipped (only_os \"^Ubuntu\" does not match OS name \"Alpine Linux v3.19\")",
            "step \"v4\": skipped (only_os_version \"^4\" does not match OS version \"3.19.1\")",
            "step \"s390\": skipped (only_arch \"s390x\" does not match architecture",
            "step \"systemd\": skipped (only_service_manager \"systemd\": the service manager is not systemd)",
        ] {
            assert!(log.contains(line), "{line}\n{log}");
        }
        assert!(
            r.failures[0].contains("step \"badre\": only_os: \"(\" is not a regex"),
            "{:?}",
            r.failures
        );
        assert!(
            r.failures[1].contains(
                "only_service_manager \"runit\": not a service manager (systemd or openrc)"
            ),
            "{:?}",
            r.failures
        );
        // Both managers present: yip cannot tell, so the step is skipped.
        t.file("/bin/systemctl", "");
        let (_, log) = go(&t, "boot", &[s]);
        assert!(log.contains("step \"openrc\": skipped (only_service_manager \"OpenRC\": the root has both systemd and openrc)"), "{log}");
    }

    #[test]
    fn user_fields_uid_home_gecos_and_primary_group() {
        let t = Tree::new();
        base_users(&t);
        let s = source(
            "/oem/u.yaml",
            "#cloud-config\nusers:\n- name: ops\n  uid: 2001\n  gecos: Operations\n  homedir: /srv/ops\n  primary_group: admin\n- name: lone\n  uid: 2002\n  no_user_group: true\n  no-create-home: true\nstages:\n  boot:\n  - users:\n      svc:\n        uid: 2003\n        primary-group: kairos\n        homedir: /var/lib/svc\n",
        );
        let (r, log) = go(&t, "boot", &[s]);
        assert!(r.ok(), "{log}");
        let passwd = read(&t, "/etc/passwd");
        assert!(
            passwd.contains("ops:x:2001:27:Operations:/srv/ops:/bin/sh\n"),
            "{passwd}"
        );
        assert!(
            passwd.contains("lone:x:2002:100::/home/lone:/bin/sh\n"),
            "{passwd}"
        );
        assert!(
            passwd.contains("svc:x:2003:1000::/var/lib/svc:/bin/sh\n"),
            "{passwd}"
        );
        assert!(
            !read(&t, "/etc/group").contains("ops:"),
            "primary_group: no group of its own"
        );
        let m = std::fs::metadata(t.ctx.path("/srv/ops")).unwrap();
        assert_eq!((m.uid(), m.gid()), (2001, 27));
        assert!(!t.ctx.path("/home/lone").exists());
    }

    #[test]
    fn cloud_init_write_files_runcmd_and_keys_take_effect() {
        let t = Tree::new();
        base_users(&t);
        t.file("/etc/motd", "hello\n");
        t.file(
            "/oem/c.yaml",
            "#cloud-config\nssh_authorized_keys: [ssh-ed25519 AAAA root@x]\nwrite_files:\n- path: /etc/app.conf\n  content: 'a=1'\n  permissions: '0640'\n  owner: kairos:kairos\n- path: /etc/blob\n  content: aGk=\n  encoding: b64\n  owner_string: kairos\n  group: admin\n- path: /etc/motd\n  content: \"more\\n\"\n  append: true\nruncmd:\n- echo first >> ran\n- [sh, -c, 'echo second >> ran']\n",
        );
        let (o, r, log) = run_logged(&t, "boot");
        assert_eq!((o, r.failures.len()), (Outcome::Done, 0), "{log}");
        assert_eq!(read(&t, "/etc/app.conf"), "a=1");
        let m = std::fs::metadata(t.ctx.path("/etc/app.conf")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 1000, 1000));
        assert_eq!(read(&t, "/etc/blob"), "hi");
        let m = std::fs::metadata(t.ctx.path("/etc/blob")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 27));
        assert_eq!(read(&t, "/etc/motd"), "hello\nmore\n");
        assert_eq!(read(&t, "/ran"), "first\nsecond\n");
        assert_eq!(
            read(&t, "/root/.ssh/authorized_keys"),
            "ssh-ed25519 AAAA root@x\n"
        );
    }

    #[test]
    fn systemctl_overrides_are_drop_ins_and_verbs_call_systemctl() {
        let t = Tree::new();
        let s = source(
            "/oem/s.yaml",
            "stages:\n  boot:\n  - systemctl:\n      overrides:\n      - service: k3s\n        name: limits\n        content: \"[Service]\\nLimitNOFILE=4096\\n\"\n      - service: sshd.socket\n        content: \"[Socket]\\n\"\n      enable: [foo.service]\n      disable: [bar.service]\n      mask: [baz.service]\n      start: [qux.service]\n",
        );
        let (r, log) = go(&t, "boot", &[s]);
        assert_eq!(
            read(&t, "/etc/systemd/system/k3s.service.d/limits.conf"),
            "[Service]\nLimitNOFILE=4096\n"
        );
        assert_eq!(
            read(&t, "/etc/systemd/system/sshd.socket.d/override-kairos.conf"),
            "[Socket]\n"
        );
        // The verbs run `systemctl --root=ROOT VERB UNIT` off the running system (start
        // only on it). Enabling a unit the root does not have fails, naming the command, with
        // or without systemctl on this host; masking works when systemctl is there.
        let root = config::de::shell_quote(&t.ctx.root.to_string_lossy());
        let failed = r.failures.join("\n");
        assert!(
            failed.contains(&format!("`systemctl --root={root} enable foo.service`")),
            "{failed}\n{log}"
        );
        let masked = std::fs::symlink_metadata(t.ctx.path("/etc/systemd/system/baz.service"))
            .is_ok_and(|m| m.file_type().is_symlink());
        assert!(
            masked || failed.contains(&format!("`systemctl --root={root} mask baz.service`")),
            "{failed}\n{log}"
        );
        assert!(
            !r.failures.iter().any(|f| f.contains("qux.service")),
            "{:?}",
            r.failures
        );
    }
}
