//! `kairos-agent analyze time|blame|plot`: where this boot's time went, in the manner of
//! `systemd-analyze`.
//!
//! The inputs, all on the /run tmpfs or the kernel's filesystems (this boot's):
//! - kairos-init's timeline, /run/kairos/boot-timeline.json: its steps (ms since the kernel
//!   started), its own start (`start_ms`: the kernel's share) and raw TSC samples at its start
//!   and at switch_root (`tsc_*`), from which the firmware+loader time is estimated;
//! - the agent daemon's timeline, /run/kairos/agent-timeline.json, written by [`Recorder`]:
//!   its start, the stages, config, bundles, K3s started, ready, the boot marked good;
//! - ACPI's Firmware Performance Data Table, /sys/firmware/acpi/fpdt/boot, when the firmware
//!   has one (UEFI machines): preferred over the TSC estimate;
//! - /proc/uptime, to say how long a boot that is not ready yet has been going.
//!
//! [`read`] gathers them under a root; everything else is pure: [`Inputs`] in, text or SVG
//! out.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use kairos_util::svg::{self, Band, Chart, Group, Row};
use kairos_util::{IoError, IoResultExt};
use serde::Deserialize;

use crate::{Ctx, Outcome};

pub const BOOT_TIMELINE: &str = crate::state::TIMELINE;
pub const AGENT_TIMELINE: &str = "/run/kairos/agent-timeline.json";
pub const UPTIME: &str = "/proc/uptime";
pub const FPDT: &str = "/sys/firmware/acpi/fpdt/boot";

/// The agent's steps that mark a moment rather than take time.
pub const AGENT_START: &str = "start";
pub const AGENT_READY: &str = "ready";
pub const AGENT_MARKED_GOOD: &str = "marked good";

/// The timelines are a few KiB; anything larger is not ours.
const MAX_BYTES: u64 = 1 << 20;
/// A firmware+loader figure beyond this is not believed (a TSC that was not reset).
const MAX_FIRMWARE_S: f64 = 600.0;

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum What {
    /// Firmware+loader, kernel, initramfs and userland times to the agent's ready, and the
    /// total ("Startup finished in ...")
    Time,
    /// kairos-init's and the agent's steps by duration, longest first
    Blame,
    /// The boot as an SVG timeline on stdout (`analyze plot > boot.svg`)
    Plot,
}

#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("{}: not found: this boot was not started by kairos-init (or /run is not this boot's)", path.display())]
    NoBootTimeline { path: PathBuf },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{}: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

/// One timed step; times in seconds since the kernel started.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub parent: Option<String>,
    pub start: f64,
    pub duration: f64,
}

impl Step {
    pub fn end(&self) -> f64 {
        self.start + self.duration
    }
}

/// TSC readings next to CLOCK_BOOTTIME (ms) at kairos-init's start and at switch_root.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TscSamples {
    pub start: u64,
    pub start_ms: f64,
    pub switch_root: u64,
    pub switch_root_ms: f64,
}

/// ACPI FPDT's boot record, ns since reset (0 when the firmware did not fill it in).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Fpdt {
    pub bootloader_launch_ns: u64,
    pub exitbootservice_end_ns: u64,
}

/// kairos-init's timeline.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InitTimeline {
    /// When kairos-init started (s); older timelines do not say.
    pub start: Option<f64>,
    pub steps: Vec<Step>,
    pub tsc: Option<TscSamples>,
}

/// Everything `analyze` works from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Inputs {
    pub init: InitTimeline,
    /// The agent's steps; None when it wrote no timeline (said in the output).
    pub agent: Option<Vec<Step>>,
    pub uptime: Option<f64>,
    pub fpdt: Option<Fpdt>,
}

/// How long firmware and boot loader took before the kernel's t=0, and how that is known.
#[derive(Debug, Clone, PartialEq)]
pub enum Firmware {
    Known { secs: f64, how: String },
    NotKnown(String),
}

/// The boot's phases in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Phases {
    pub firmware: Firmware,
    /// Kernel start to kairos-init's start.
    pub kernel: f64,
    /// kairos-init's start to the end of switch_root.
    pub initramfs: f64,
    /// When switch_root ended (s since the kernel started).
    pub switch_root_end: f64,
    /// The agent daemon's start, its ready and the boot marked good (s since kernel start).
    pub agent_start: Option<f64>,
    pub ready: Option<f64>,
    pub marked_good: Option<f64>,
}

// ---- reading ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct RawStep {
    name: String,
    #[serde(default)]
    parent: Option<String>,
    start_ms: f64,
    duration_ms: f64,
}

#[derive(Deserialize)]
struct RawTimeline {
    steps: Vec<RawStep>,
    #[serde(default)]
    start_ms: Option<f64>,
    #[serde(default)]
    tsc_start: Option<u64>,
    #[serde(default)]
    tsc_start_ms: Option<f64>,
    #[serde(default)]
    tsc_switch_root: Option<u64>,
    #[serde(default)]
    tsc_switch_root_ms: Option<f64>,
}

fn steps(raw: Vec<RawStep>) -> Vec<Step> {
    raw.into_iter()
        .map(|s| Step {
            name: s.name,
            parent: s.parent,
            start: s.start_ms / 1000.0,
            duration: s.duration_ms.max(0.0) / 1000.0,
        })
        .collect()
}

fn parse_timeline(path: &Path, text: &str) -> Result<RawTimeline, AnalyzeError> {
    serde_json::from_str(text).map_err(|e| AnalyzeError::Parse {
        path: path.to_owned(),
        msg: e.to_string(),
    })
}

/// kairos-init's timeline from its JSON (`path` names it in errors).
pub fn parse_init_timeline(path: &Path, text: &str) -> Result<InitTimeline, AnalyzeError> {
    let raw = parse_timeline(path, text)?;
    let tsc = match (
        raw.tsc_start,
        raw.tsc_start_ms,
        raw.tsc_switch_root,
        raw.tsc_switch_root_ms,
    ) {
        (Some(start), Some(start_ms), Some(switch_root), Some(switch_root_ms)) => {
            Some(TscSamples {
                start,
                start_ms,
                switch_root,
                switch_root_ms,
            })
        }
        _ => None,
    };
    Ok(InitTimeline {
        start: raw.start_ms.map(|ms| ms / 1000.0),
        steps: steps(raw.steps),
        tsc,
    })
}

/// The agent's timeline from its JSON.
pub fn parse_agent_timeline(path: &Path, text: &str) -> Result<Vec<Step>, AnalyzeError> {
    Ok(steps(parse_timeline(path, text)?.steps))
}

/// A small file under the root; None when it does not exist.
fn read_small(path: &Path) -> Result<Option<String>, AnalyzeError> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.at(path, "opening")?,
    };
    let mut text = String::new();
    file.take(MAX_BYTES)
        .read_to_string(&mut text)
        .at(path, "reading")?;
    Ok(Some(text))
}

/// FPDT's boot record from its sysfs directory; None without one or when it is empty.
fn read_fpdt(dir: &Path) -> Option<Fpdt> {
    let get = |name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let f = Fpdt {
        bootloader_launch_ns: get("bootloader_launch_ns").unwrap_or(0),
        exitbootservice_end_ns: get("exitbootservice_end_ns")?,
    };
    (f.exitbootservice_end_ns > 0).then_some(f)
}

/// The inputs under `root` (`/` on a node). kairos-init's timeline must be there; the
/// others may be missing.
pub fn read(root: &Path) -> Result<Inputs, AnalyzeError> {
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    let boot = under(BOOT_TIMELINE);
    let text = read_small(&boot)?.ok_or(AnalyzeError::NoBootTimeline { path: boot.clone() })?;
    let init = parse_init_timeline(&boot, &text)?;
    let agent_path = under(AGENT_TIMELINE);
    let agent = match read_small(&agent_path)? {
        None => None,
        Some(text) => Some(parse_agent_timeline(&agent_path, &text)?),
    };
    let uptime = read_small(&under(UPTIME))?.and_then(|t| {
        t.split_whitespace()
            .next()
            .and_then(|s| s.parse::<f64>().ok())
    });
    Ok(Inputs {
        init,
        agent,
        uptime,
        fpdt: read_fpdt(&under(FPDT)),
    })
}

// ---- the phases --------------------------------------------------------------------------

/// Firmware+loader: FPDT when present, else the TSC estimate, else not known (and why).
pub fn firmware(inputs: &Inputs) -> Firmware {
    if let Some(f) = inputs.fpdt {
        let secs = f.exitbootservice_end_ns as f64 / 1e9;
        let how = if f.bootloader_launch_ns > 0 && f.bootloader_launch_ns < f.exitbootservice_end_ns
        {
            format!(
                "ACPI FPDT: firmware {}, loader {}",
                svg::duration(f.bootloader_launch_ns as f64 / 1e9),
                svg::duration((f.exitbootservice_end_ns - f.bootloader_launch_ns) as f64 / 1e9)
            )
        } else {
            "ACPI FPDT".into()
        };
        return Firmware::Known { secs, how };
    }
    let Some(t) = inputs.init.tsc else {
        return Firmware::NotKnown(
            "no TSC samples in the timeline (not x86_64, or an older kairos-init)".into(),
        );
    };
    let dt_ms = t.switch_root_ms - t.start_ms;
    if t.switch_root <= t.start || dt_ms <= 0.0 {
        return Firmware::NotKnown("the TSC did not advance between kairos-init's samples".into());
    }
    let per_ms = (t.switch_root - t.start) as f64 / dt_ms;
    // 1 MHz to 20 GHz: anything else is not a TSC counting time.
    if !(1e3..=2e7).contains(&per_ms) {
        return Firmware::NotKnown(format!("implausible TSC rate {:.3} GHz", per_ms / 1e6));
    }
    let secs = t.start as f64 / per_ms / 1000.0 - t.start_ms / 1000.0;
    if !(0.0..=MAX_FIRMWARE_S).contains(&secs) {
        return Firmware::NotKnown(format!(
            "the TSC estimate ({secs:.3}s) is implausible: the counter was not counting from power-on"
        ));
    }
    Firmware::Known {
        secs,
        how: format!(
            "estimated from the TSC ({:.3} GHz, counting from power-on)",
            per_ms / 1e6
        ),
    }
}

fn agent_point(inputs: &Inputs, name: &str) -> Option<f64> {
    inputs
        .agent
        .as_ref()?
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.start)
}

pub fn phases(inputs: &Inputs) -> Phases {
    let steps = &inputs.init.steps;
    let first = steps.iter().map(|s| s.start).fold(f64::INFINITY, f64::min);
    let init_start = inputs
        .init
        .start
        .unwrap_or(if first.is_finite() { first } else { 0.0 });
    let switch_root_end = steps
        .iter()
        .rev()
        .find(|s| s.name == "switch_root" && s.parent.is_none())
        .map(Step::end)
        .unwrap_or_else(|| steps.iter().map(Step::end).fold(init_start, f64::max));
    Phases {
        firmware: firmware(inputs),
        kernel: init_start,
        initramfs: switch_root_end - init_start,
        switch_root_end,
        agent_start: agent_point(inputs, AGENT_START),
        ready: agent_point(inputs, AGENT_READY),
        marked_good: agent_point(inputs, AGENT_MARKED_GOOD),
    }
}

// ---- the outputs -------------------------------------------------------------------------

use svg::duration as d;

/// `analyze time`.
pub fn time_text(inputs: &Inputs) -> String {
    let p = phases(inputs);
    let mut parts = Vec::new();
    let fw = match &p.firmware {
        Firmware::Known { secs, .. } => {
            parts.push(format!("{} (firmware+loader)", d(*secs)));
            *secs
        }
        Firmware::NotKnown(_) => 0.0,
    };
    parts.push(format!("{} (kernel)", d(p.kernel)));
    parts.push(format!("{} (initramfs)", d(p.initramfs)));
    let mut out = String::new();
    let since = if matches!(p.firmware, Firmware::Known { .. }) {
        ""
    } else {
        " from the kernel's start"
    };
    match p.ready {
        Some(ready) => {
            parts.push(format!("{} (userland)", d(ready - p.switch_root_end)));
            out += &format!(
                "Startup finished in {} = {}{since}\n",
                parts.join(" + "),
                d(fw + ready)
            );
            let to_agent = p
                .agent_start
                .map(|a| format!("{} to the agent's start, ", d(a - p.switch_root_end)))
                .unwrap_or_default();
            out += &format!(
                "userland: {to_agent}{} from there to the agent's ready\n",
                d(ready - p.agent_start.unwrap_or(p.switch_root_end))
            );
        }
        None => {
            out += &format!(
                "Startup to switch_root took {} = {}{since}\n",
                parts.join(" + "),
                d(fw + p.switch_root_end)
            );
            let why = match &inputs.agent {
                None => format!("{AGENT_TIMELINE} does not exist (no kairos-agent daemon yet)"),
                Some(_) => format!("no \"{AGENT_READY}\" step in {AGENT_TIMELINE} yet"),
            };
            let up = inputs
                .uptime
                .map(|u| format!("; up {}", d(u)))
                .unwrap_or_default();
            out += &format!("userland: not ready: {why}{up}\n");
        }
    }
    if let Some(g) = p.marked_good {
        out += &format!("boot marked good {} after the kernel's start\n", d(g));
    }
    match &p.firmware {
        Firmware::Known { how, .. } => out += &format!("firmware+loader: {how}\n"),
        Firmware::NotKnown(why) => out += &format!("firmware+loader: not known: {why}\n"),
    }
    out
}

/// Every timed step as (who, name, step); the agent's moments (no duration) left out.
fn timed(inputs: &Inputs) -> Vec<(&'static str, String, &Step)> {
    let init = inputs.init.steps.iter().map(|s| {
        let name = match &s.parent {
            Some(p) => format!("{p}/{}", s.name),
            None => s.name.clone(),
        };
        ("kairos-init", name, s)
    });
    let agent = inputs
        .agent
        .iter()
        .flatten()
        .filter(|s| ![AGENT_START, AGENT_READY, AGENT_MARKED_GOOD].contains(&s.name.as_str()))
        .map(|s| ("kairos-agent", s.name.clone(), s));
    init.chain(agent).collect()
}

/// `analyze blame`: the steps by duration, longest first (ties in boot order), with the
/// phases between them (kernel, switch_root to the agent's start).
pub fn blame_text(inputs: &Inputs) -> String {
    let p = phases(inputs);
    let mut rows: Vec<(f64, f64, String)> = timed(inputs)
        .into_iter()
        .map(|(who, name, s)| (s.duration, s.start, format!("{who}: {name}")))
        .collect();
    rows.push((p.kernel, 0.0, "kernel: to kairos-init's start".into()));
    if let Some(a) = p.agent_start {
        rows.push((
            a - p.switch_root_end,
            p.switch_root_end,
            "userland: switch_root to the agent's start".into(),
        ));
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.total_cmp(&b.1)));
    rows.iter()
        .map(|(dur, _, name)| format!("{:>9} {name}\n", d(*dur)))
        .collect()
}

/// `analyze plot`: the phases as bands, one row per step.
pub fn plot_svg(inputs: &Inputs) -> String {
    let p = phases(inputs);
    let mut bands = Vec::new();
    let mut phase_rows = Vec::new();
    if let Firmware::Known { secs, .. } = p.firmware {
        bands.push(Band::new("firmware+loader", -secs, 0.0, "firmware"));
        phase_rows.push(Row::new("firmware+loader", -secs, 0.0, "firmware"));
    }
    bands.push(Band::new("kernel", 0.0, p.kernel, "kernel"));
    phase_rows.push(Row::new("kernel", 0.0, p.kernel, "kernel"));
    bands.push(Band::new(
        "initramfs",
        p.kernel,
        p.switch_root_end,
        "initramfs",
    ));
    phase_rows.push(Row::new(
        "initramfs (kairos-init)",
        p.kernel,
        p.switch_root_end,
        "initramfs",
    ));
    let agent_end = inputs
        .agent
        .iter()
        .flatten()
        .map(Step::end)
        .fold(p.switch_root_end, f64::max);
    let userland_end = p.ready.unwrap_or(agent_end);
    if userland_end > p.switch_root_end {
        let label = if p.ready.is_some() {
            "userland to ready"
        } else {
            "userland (not ready)"
        };
        bands.push(Band::new(
            label,
            p.switch_root_end,
            userland_end,
            "userland",
        ));
        phase_rows.push(Row::new(label, p.switch_root_end, userland_end, "userland"));
    }
    // In start order: kairos-init records a step when it ends, so after its parts.
    let mut init_steps: Vec<&Step> = inputs.init.steps.iter().collect();
    init_steps.sort_by(|a, b| {
        a.start
            .total_cmp(&b.start)
            .then(a.parent.is_some().cmp(&b.parent.is_some()))
    });
    let init_rows = init_steps
        .into_iter()
        .map(|s| {
            let (label, class) = match &s.parent {
                Some(parent) => (format!("{parent}: {}", s.name), "initramfs"),
                None => (s.name.clone(), "init"),
            };
            Row::new(label, s.start, s.end(), class)
        })
        .collect();
    let mut groups = vec![
        Group::titled("phases", phase_rows),
        Group::titled("kairos-init", init_rows),
    ];
    if let Some(agent) = &inputs.agent {
        let mut rows = Vec::new();
        if let Some(a) = p.agent_start {
            rows.push(Row::new(
                "switch_root to the agent's start",
                p.switch_root_end,
                a,
                "userland",
            ));
        }
        rows.extend(agent.iter().map(|s| {
            let moment = [AGENT_START, AGENT_READY, AGENT_MARKED_GOOD].contains(&s.name.as_str());
            Row::new(
                s.name.clone(),
                s.start,
                s.end(),
                if moment { "ready" } else { "agent" },
            )
        }));
        groups.push(Group::titled("kairos-agent", rows));
    }
    let title = time_text(inputs)
        .lines()
        .next()
        .unwrap_or("kairos boot")
        .to_owned();
    svg::render(&Chart {
        title,
        bands,
        groups,
    })
}

/// `kairos-agent analyze WHAT`.
pub fn analyze(
    ctx: &Ctx,
    args: &AnalyzeArgs,
    out: &mut dyn Write,
) -> Result<Outcome, AnalyzeError> {
    let inputs = read(&ctx.root)?;
    let text = match args.what {
        What::Time => time_text(&inputs),
        What::Blame => blame_text(&inputs),
        What::Plot => plot_svg(&inputs),
    };
    out.write_all(text.as_bytes())
        .map_err(AnalyzeError::Output)?;
    Ok(Outcome::Done)
}

// ---- the agent's own timeline ------------------------------------------------------------

/// Seconds since the kernel started (CLOCK_BOOTTIME, as /proc/uptime).
pub fn boottime() -> f64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The daemon's steps, rewritten to [`AGENT_TIMELINE`] (under the root) after each one in
/// kairos-init's format, so `analyze` sees them while the boot goes on. Writing is best
/// effort: a timeline that cannot be written must not stop the node.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    steps: Vec<Step>,
}

impl Recorder {
    /// A new timeline at `path`, with the [`AGENT_START`] moment recorded now.
    pub fn start(path: PathBuf) -> Recorder {
        let mut r = Recorder {
            path,
            steps: Vec::new(),
        };
        r.moment(AGENT_START);
        r
    }

    /// Times `f` as step `name`.
    pub fn step<T>(&mut self, name: &str, f: impl FnOnce() -> T) -> T {
        let start = boottime();
        let out = f();
        self.push(name, start, boottime() - start);
        out
    }

    /// A moment (no duration): ready, marked good.
    pub fn moment(&mut self, name: &str) {
        self.push(name, boottime(), 0.0);
    }

    fn push(&mut self, name: &str, start: f64, duration: f64) {
        self.steps.push(Step {
            name: name.to_owned(),
            parent: None,
            start,
            duration,
        });
        let _ = self.write();
    }

    /// The JSON, written next to the file and renamed over it (never seen half-written).
    fn write(&self) -> std::io::Result<()> {
        let steps: Vec<serde_json::Value> = self
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "parent": null,
                    "start_ms": (s.start * 1e4).round() / 10.0,
                    "duration_ms": (s.duration * 1e4).round() / 10.0,
                })
            })
            .collect();
        let text = serde_json::json!({ "steps": steps }).to_string() + "\n";
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INIT: &str = r#"{"steps":[
        {"name":"modules","parent":null,"start_ms":1210.0,"duration_ms":500.0},
        {"name":"wait /dev/vda","parent":"devices","start_ms":1712.0,"duration_ms":80.0},
        {"name":"devices","parent":null,"start_ms":1710.0,"duration_ms":94.0},
        {"name":"root & <friends>","parent":null,"start_ms":1804.0,"duration_ms":33.0},
        {"name":"switch_root","parent":null,"start_ms":1840.0,"duration_ms":10.0}],
        "start_ms":1200.0,
        "tsc_start":5400000000,"tsc_start_ms":1200.0,
        "tsc_switch_root":7200000000,"tsc_switch_root_ms":1800.0}"#;
    const AGENT: &str = r#"{"steps":[
        {"name":"start","parent":null,"start_ms":2850.0,"duration_ms":0.0},
        {"name":"stages","parent":null,"start_ms":2850.0,"duration_ms":700.0},
        {"name":"config","parent":null,"start_ms":3550.0,"duration_ms":50.0},
        {"name":"workloads","parent":null,"start_ms":3600.0,"duration_ms":1200.0},
        {"name":"ready","parent":null,"start_ms":4850.0,"duration_ms":0.0},
        {"name":"marked good","parent":null,"start_ms":6000.0,"duration_ms":0.0}]}"#;

    fn root(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (p, text) in files {
            let path = dir.path().join(p.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    fn full() -> tempfile::TempDir {
        root(&[
            (BOOT_TIMELINE, INIT),
            (AGENT_TIMELINE, AGENT),
            (UPTIME, "61.50 100.00\n"),
        ])
    }

    #[test]
    fn time_adds_up_the_phases() {
        let dir = full();
        let inputs = read(dir.path()).unwrap();
        assert_eq!(inputs.uptime, Some(61.5));
        // TSC: 1.8e9 ticks in 600 ms = 3 GHz; 5.4e9 ticks at start = 1.8 s, less 1.2 s.
        assert_eq!(
            time_text(&inputs),
            "Startup finished in 600ms (firmware+loader) + 1.200s (kernel) + 650ms (initramfs) + 3.000s (userland) = 5.450s\n\
             userland: 1.000s to the agent's start, 2.000s from there to the agent's ready\n\
             boot marked good 6.000s after the kernel's start\n\
             firmware+loader: estimated from the TSC (3.000 GHz, counting from power-on)\n"
        );
    }

    #[test]
    fn fpdt_is_preferred_over_the_tsc() {
        let dir = full();
        let fpdt = dir.path().join(FPDT.trim_start_matches('/'));
        std::fs::create_dir_all(&fpdt).unwrap();
        std::fs::write(fpdt.join("bootloader_launch_ns"), "2000000000\n").unwrap();
        std::fs::write(fpdt.join("exitbootservice_end_ns"), "2500000000\n").unwrap();
        let t = time_text(&read(dir.path()).unwrap());
        assert!(
            t.starts_with("Startup finished in 2.500s (firmware+loader) + 1.200s (kernel)"),
            "{t}"
        );
        assert!(
            t.contains("firmware+loader: ACPI FPDT: firmware 2.000s, loader 500ms"),
            "{t}"
        );
    }

    #[test]
    fn implausible_or_missing_tsc_is_not_known() {
        let mut inputs = read(full().path()).unwrap();
        // The counter was reset after power-on: the start reading is too small.
        inputs.init.tsc = Some(TscSamples {
            start: 1_000_000,
            start_ms: 1200.0,
            switch_root: 1_801_000_000,
            switch_root_ms: 1800.0,
        });
        let t = time_text(&inputs);
        assert!(t.starts_with("Startup finished in 1.200s (kernel) + 650ms (initramfs) + 3.000s (userland) = 4.850s from the kernel's start\n"), "{t}");
        assert!(
            t.contains("firmware+loader: not known: the TSC estimate"),
            "{t}"
        );
        inputs.init.tsc = None;
        let t = time_text(&inputs);
        assert!(
            t.contains("firmware+loader: not known: no TSC samples"),
            "{t}"
        );
        assert!(!t.contains("(firmware+loader)"), "{t}");
    }

    #[test]
    fn not_ready_says_why_and_how_long_up() {
        let dir = root(&[(BOOT_TIMELINE, INIT), (UPTIME, "9.25 1.0\n")]);
        let t = time_text(&read(dir.path()).unwrap());
        assert!(
            t.starts_with("Startup to switch_root took 600ms (firmware+loader) + 1.200s (kernel) + 650ms (initramfs) = 2.450s\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "userland: not ready: /run/kairos/agent-timeline.json does not exist (no kairos-agent daemon yet); up 9.250s"
            ),
            "{t}"
        );
    }

    #[test]
    fn blame_is_longest_first() {
        let b = blame_text(&read(full().path()).unwrap());
        let lines: Vec<&str> = b.lines().collect();
        assert_eq!(
            lines,
            [
                "   1.200s kernel: to kairos-init's start",
                "   1.200s kairos-agent: workloads",
                "   1.000s userland: switch_root to the agent's start",
                "    700ms kairos-agent: stages",
                "    500ms kairos-init: modules",
                "     94ms kairos-init: devices",
                "     80ms kairos-init: devices/wait /dev/vda",
                "     50ms kairos-agent: config",
                "     33ms kairos-init: root & <friends>",
                "     10ms kairos-init: switch_root",
            ],
            "{b}"
        );
    }

    #[test]
    fn plot_has_every_step_and_phase() {
        let inputs = read(full().path()).unwrap();
        let s = plot_svg(&inputs);
        for label in [
            "modules",
            "devices",
            "devices: wait /dev/vda",
            "root &amp; &lt;friends&gt;",
            "switch_root",
            "stages",
            "config",
            "workloads",
            "ready",
            "marked good",
            "firmware+loader",
            "kernel",
            "initramfs",
            "userland to ready",
            "switch_root to the agent&apos;s start",
        ] {
            assert!(s.contains(&format!(">{label}</text>")), "{label} in {s}");
        }
        assert!(
            s.contains(">Startup finished in 600ms (firmware+loader)"),
            "{s}"
        );
        // A parent step comes before its parts.
        let at = |l: &str| s.find(&format!(">{l}</text>")).unwrap();
        assert!(at("devices") < at("devices: wait /dev/vda"), "{s}");
    }

    #[test]
    fn missing_and_bad_files_name_the_path() {
        let dir = root(&[]);
        let e = read(dir.path()).unwrap_err().to_string();
        let want = dir.path().join("run/kairos/boot-timeline.json");
        assert!(e.contains(&want.display().to_string()), "{e}");
        assert!(e.contains("not found"), "{e}");

        let dir = root(&[(BOOT_TIMELINE, INIT), (AGENT_TIMELINE, "{oops")]);
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("agent-timeline.json: "), "{e}");
        let dir = root(&[(BOOT_TIMELINE, r#"{"no":"steps"}"#)]);
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("boot-timeline.json: missing field `steps`"),
            "{e}"
        );
    }

    #[test]
    fn older_timeline_without_start_uses_the_first_step() {
        let dir = root(&[(
            BOOT_TIMELINE,
            r#"{"steps":[{"name":"modules","parent":null,"start_ms":900.0,"duration_ms":100.0}]}"#,
        )]);
        let p = phases(&read(dir.path()).unwrap());
        assert_eq!(p.kernel, 0.9);
        assert_eq!(p.switch_root_end, 1.0);
        assert!(matches!(p.firmware, Firmware::NotKnown(_)));
    }

    #[test]
    fn recorder_writes_what_analyze_reads() {
        let dir = root(&[]);
        let path = dir.path().join("run/kairos/agent-timeline.json");
        let mut r = Recorder::start(path.clone());
        let x = r.step("config", || 7);
        assert_eq!(x, 7);
        r.moment(AGENT_READY);
        let steps = parse_agent_timeline(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [AGENT_START, "config", AGENT_READY]);
        assert!(steps[0].start > 0.0 && steps[2].start >= steps[0].start);
        assert!(!path.with_extension("json.tmp").exists());
    }
}
