//! `kairos-agent logs`: this boot's logs of kairos-init and of the agent in one place, one
//! section per source in boot order, each under a `==> … <==` header; a source that is not
//! there says why in its section and in the summary on stderr.
//!
//! The sources:
//! 1. kairos-init's kernel-log records (it logs to /dev/kmsg with the `kairos-init:` prefix,
//!    in the initramfs and as PID 1 of a minimal system; its stage hooks' output too), read
//!    from /dev/kmsg, which holds this boot's records only;
//! 2. kairos-init's step timeline, /run/kairos/boot-timeline.json, and what it booted,
//!    /run/kairos/boot-image (both on the /run tmpfs: this boot's);
//! 3. on a systemd image, the agent's units in the journal (`journalctl -b`);
//! 4. the agent's log files when an image keeps them: /run/kairos/kairos-agent.log (this
//!    boot), /var/log/kairos-agent.log and upstream's /var/log/kairos/*.log (these may hold
//!    earlier boots too: the last [`MAX_FILE_BYTES`] are shown).
//!
//! Under kairos-init as PID 1 (no journal) `kairos-agent daemon` keeps its own output in
//! /run/kairos/kairos-agent.log as well as on the console ([`capture_daemon_output`]); on a
//! systemd image the journal has it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;
use serde_json::Value;

use crate::{AgentError, Ctx, Outcome};

pub const KMSG: &str = "/dev/kmsg";
pub const TIMELINE: &str = crate::state::TIMELINE;
pub const BOOT_IMAGE: &str = crate::state::BOOT_IMAGE;
/// A file the agent's output may be captured in for this boot.
pub const RUN_LOG: &str = "/run/kairos/kairos-agent.log";
/// Where the daemon's output is rotated to past [`RUN_LOG_MAX`] bytes.
pub const RUN_LOG_OLD: &str = "/run/kairos/kairos-agent.log.1";
/// The captured log's size before it is rotated (it lives in RAM, on /run).
pub const RUN_LOG_MAX: u64 = 4 << 20;
/// Log files an image may keep across boots (ours, and upstream's directory).
pub const VAR_LOG: &str = "/var/log/kairos-agent.log";
pub const VAR_LOG_DIR: &str = "/var/log/kairos";
/// What is shown of a log file: its end.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Kernel-log prefixes of ours.
const PREFIXES: &[&str] = &["kairos-init:", "kairos-agent:"];

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The journalctl to ask on a systemd image (looked up in PATH)
    #[arg(long, value_name = "PATH", default_value = "journalctl")]
    pub journalctl: PathBuf,
}

/// One section: its header, and its lines or why it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub title: String,
    pub body: Result<String, String>,
}

/// kmsg records (`PRI,SEQ,USEC,FLAGS[,…];MESSAGE`, continuation lines start with a space)
/// whose message is ours, as dmesg prints them: `[seconds.micros] message`. Also the first
/// record's sequence number (non-zero: older records were overwritten).
pub fn kmsg_lines(raw: &str) -> (Vec<String>, Option<u64>) {
    let mut out = Vec::new();
    let mut first_seq = None;
    for line in raw.lines() {
        if line.starts_with(' ') {
            continue;
        }
        let Some((head, msg)) = line.split_once(';') else {
            continue;
        };
        let mut f = head.split(',');
        let (_pri, seq, usec) = (f.next(), f.next(), f.next());
        let Some(seq) = seq.and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        first_seq.get_or_insert(seq);
        if !PREFIXES.iter().any(|p| msg.starts_with(p)) {
            continue;
        }
        let usec = usec.and_then(|u| u.parse::<u64>().ok()).unwrap_or(0);
        out.push(format!(
            "[{:5}.{:06}] {msg}",
            usec / 1_000_000,
            usec % 1_000_000
        ));
    }
    (out, first_seq)
}

/// /dev/kmsg read to its end without blocking: each read(2) of the device returns one
/// record; EAGAIN means the end (a regular file, as in tests, ends at EOF).
fn read_kmsg(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                all.extend_from_slice(&buf[..n]);
                // One record a read: make sure each ends a line.
                if all.last() != Some(&b'\n') {
                    all.push(b'\n');
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // A record overwritten while reading: go on with the next one.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&all).into_owned())
}

fn kmsg_section(ctx: &Ctx) -> Section {
    let title = format!("kairos-init: kernel log of this boot ({KMSG})");
    let body = match read_kmsg(&ctx.path(KMSG)) {
        Err(e) => Err(format!("{KMSG} not readable: {e}")),
        Ok(raw) => {
            let (lines, first) = kmsg_lines(&raw);
            if lines.is_empty() {
                Err(format!(
                    "no kairos-init records in {KMSG} (not booted by kairos-init)"
                ))
            } else {
                let mut s = String::new();
                if let Some(n) = first.filter(|n| *n > 0) {
                    s.push_str(&format!(
                        "(the kernel log has wrapped: its first {n} records of this boot are gone)\n"
                    ));
                }
                for l in lines {
                    s.push_str(&l);
                    s.push('\n');
                }
                Ok(s)
            }
        }
    };
    Section { title, body }
}

/// The timeline as a table: start, duration, step (indented under its parent).
pub fn timeline_text(v: &Value) -> Result<String, String> {
    let steps = v["steps"]
        .as_array()
        .ok_or_else(|| "no \"steps\" list".to_string())?;
    let mut s = format!("{:>10} {:>10}  step\n", "start ms", "ms");
    for st in steps {
        let name = st["name"].as_str().unwrap_or("?");
        let indent = if st["parent"].is_string() { "  " } else { "" };
        let start = st["start_ms"].as_f64().unwrap_or(0.0);
        let dur = st["duration_ms"].as_f64().unwrap_or(0.0);
        s.push_str(&format!("{start:>10.1} {dur:>10.1}  {indent}{name}\n"));
    }
    Ok(s)
}

fn timeline_section(ctx: &Ctx) -> Section {
    let title = format!("kairos-init: boot timeline ({TIMELINE}, {BOOT_IMAGE})");
    let path = ctx.path(TIMELINE);
    let body = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{TIMELINE} does not exist (not booted by kairos-init)"
        )),
        Err(e) => Err(format!("{TIMELINE}: {e}")),
        Ok(text) => serde_json::from_str::<Value>(&text)
            .map_err(|e| format!("{TIMELINE}: {e}"))
            .and_then(|v| timeline_text(&v).map_err(|e| format!("{TIMELINE}: {e}")))
            .map(|mut s| {
                if let Some(img) = ctx.read_line(BOOT_IMAGE) {
                    s.push_str(&format!("booted: {img}\n"));
                }
                s
            }),
    };
    Section { title, body }
}

/// The agent's systemd units, from the ones the image installs.
fn agent_units() -> Vec<&'static str> {
    crate::UNITS
        .iter()
        .map(|(name, _)| *name)
        .filter(|n| n.ends_with(".service"))
        .collect()
}

fn journal_section(ctx: &Ctx, journalctl: &Path) -> Section {
    let units = agent_units();
    let title = format!("kairos-agent: journal of this boot ({})", units.join(", "));
    let body = if !ctx.path("/run/systemd/system").is_dir() {
        Err("not a systemd boot (no /run/systemd/system): no journal".into())
    } else {
        let mut cmd = Command::new(journalctl);
        cmd.args(["-b", "--no-pager", "-o", "short-monotonic"]);
        if ctx.root != Path::new("/") {
            cmd.arg("--root").arg(&ctx.root);
        }
        for u in &units {
            cmd.arg("-u").arg(u);
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        match crate::spawn_retrying(&mut cmd).and_then(|c| c.wait_with_output()) {
            Err(e) => Err(format!("{}: {e}", journalctl.display())),
            Ok(o) if !o.status.success() => Err(format!(
                "{} {}: {}",
                journalctl.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                if text.trim().is_empty() || text.trim() == "-- No entries --" {
                    Err("the journal has no entries of the agent's units this boot".into())
                } else {
                    Ok(text)
                }
            }
        }
    };
    Section { title, body }
}

/// The end of a file (at most [`MAX_FILE_BYTES`]), from a line start.
fn tail(path: &Path) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let skipped = len > MAX_FILE_BYTES;
    if skipped {
        f.seek(SeekFrom::Start(len - MAX_FILE_BYTES))?;
    }
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if skipped {
        let cut = text.find('\n').map_or(0, |i| i + 1);
        text = format!(
            "(… the first {} bytes are not shown)\n{}",
            len - MAX_FILE_BYTES + cut as u64,
            &text[cut..]
        );
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// The agent's log files that exist, in order: this boot's, then the ones kept across boots.
fn file_sections(ctx: &Ctx) -> Vec<Section> {
    let mut paths = vec![
        RUN_LOG_OLD.to_string(),
        RUN_LOG.to_string(),
        VAR_LOG.to_string(),
    ];
    if let Ok(rd) = std::fs::read_dir(ctx.path(VAR_LOG_DIR)) {
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".log"))
            .collect();
        names.sort();
        paths.extend(names.into_iter().map(|n| format!("{VAR_LOG_DIR}/{n}")));
    }
    paths
        .into_iter()
        .filter_map(|p| {
            let full = ctx.path(&p);
            if !full.is_file() {
                return None;
            }
            let what = if p.starts_with("/run/") {
                "this boot"
            } else {
                "may hold earlier boots too"
            };
            Some(Section {
                title: format!("kairos-agent: {p} ({what})"),
                body: tail(&full).map_err(|e| format!("{p}: {e}")),
            })
        })
        .collect()
}

/// Every section, in boot order.
pub fn collect(ctx: &Ctx, args: &LogsArgs) -> Vec<Section> {
    let mut v = vec![kmsg_section(ctx), timeline_section(ctx)];
    let journal = journal_section(ctx, &args.journalctl);
    let files = file_sections(ctx);
    let journal_found = journal.body.is_ok();
    v.push(journal);
    if files.is_empty() && !journal_found {
        v.push(Section {
            title: "kairos-agent: log files".into(),
            body: Err(format!(
                "none of {RUN_LOG}, {VAR_LOG}, {VAR_LOG_DIR}/*.log (under kairos-init as PID 1 \
                 `kairos-agent daemon` writes {RUN_LOG}: it has not run this boot)"
            )),
        });
    }
    v.extend(files);
    v
}

/// The sections as printed.
pub fn render(sections: &[Section]) -> String {
    let mut s = String::new();
    for (i, sec) in sections.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&format!("==> {} <==\n", sec.title));
        match &sec.body {
            Ok(b) => s.push_str(b),
            Err(why) => s.push_str(&format!("(not found: {why})\n")),
        }
    }
    s
}

pub fn logs(
    ctx: &Ctx,
    args: &LogsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    let sections = collect(ctx, args);
    write!(out, "{}", render(&sections)).map_err(AgentError::Output)?;
    let missing: Vec<&str> = sections
        .iter()
        .filter(|s| s.body.is_err())
        .map(|s| s.title.as_str())
        .collect();
    if !missing.is_empty() {
        writeln!(err, "kairos-agent: logs not found: {}", missing.join("; "))
            .map_err(AgentError::Output)?;
    }
    Ok(if missing.len() == sections.len() {
        Outcome::Refused
    } else {
        Outcome::Done
    })
}

/// Appends to a log file, moving it to `<path>.1` (replacing that) once it would pass `max`
/// bytes. Write errors are dropped: logging never stops the agent.
pub struct RotatingFile {
    path: PathBuf,
    max: u64,
    file: Option<std::fs::File>,
    written: u64,
}

impl RotatingFile {
    pub fn new(path: PathBuf, max: u64) -> RotatingFile {
        RotatingFile {
            path,
            max,
            file: None,
            written: 0,
        }
    }

    fn open(&mut self) -> Option<&mut std::fs::File> {
        if self.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            // The log may carry what a stage printed: root's only.
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
                .ok()?;
            self.written = f.metadata().map(|m| m.len()).unwrap_or(0);
            self.file = Some(f);
        }
        self.file.as_mut()
    }

    pub fn write(&mut self, data: &[u8]) {
        if self.file.is_none() {
            self.open();
        }
        if self.written > 0 && self.written + data.len() as u64 > self.max {
            self.file = None;
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&self.path, old);
        }
        if let Some(f) = self.open()
            && f.write_all(data).is_ok()
        {
            self.written += data.len() as u64;
        }
    }
}

/// Copies `from` to `console` and `file` as it arrives, until end of file.
pub fn copy_tee(from: &mut dyn Read, console: &mut dyn Write, file: &mut RotatingFile) {
    let mut buf = vec![0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let _ = console.write_all(&buf[..n]);
                let _ = console.flush();
                file.write(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The daemon's stdout and stderr going through a pipe (see [`capture_daemon_output`]);
/// dropping it puts them back and lets the copy finish.
pub struct Capture {
    saved_out: std::os::fd::OwnedFd,
    saved_err: std::os::fd::OwnedFd,
    done: std::sync::mpsc::Receiver<()>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = std::io::stdout().flush();
        let _ = rustix::stdio::dup2_stdout(&self.saved_out);
        let _ = rustix::stdio::dup2_stderr(&self.saved_err);
        // The copy ends when the last writer is gone; a child still holding the pipe (a
        // process a stage left running) must not hold up the exit.
        let _ = self
            .done
            .recv_timeout(std::time::Duration::from_millis(500));
    }
}

/// When `kairos-agent daemon` is started by an init that keeps no journal (kairos-init as
/// PID 1: parent 1, no JOURNAL_STREAM), everything the process and its children write to
/// stdout and stderr is copied to where it went (the console) and to [`RUN_LOG`], so
/// `kairos-agent logs` finds it. None (nothing changed) otherwise, or when the pipe cannot
/// be set up.
pub fn capture_daemon_output(ctx: &Ctx) -> Option<Capture> {
    let by_init = rustix::process::getppid().is_some_and(|p| p.as_raw_nonzero().get() == 1);
    if ctx.root != Path::new("/")
        || std::env::var_os("JOURNAL_STREAM").is_some()
        || !by_init
        || !ctx.path("/run/kairos").is_dir()
    {
        return None;
    }
    capture_output_to(ctx.path(RUN_LOG), RUN_LOG_MAX)
}

/// The mechanism of [`capture_daemon_output`]: this process's stdout and stderr (and so its
/// children's) copied to where they went and to `path`, until the [`Capture`] is dropped.
pub fn capture_output_to(path: PathBuf, max: u64) -> Option<Capture> {
    use std::os::fd::AsFd;
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).ok()?;
    let saved_out = rustix::io::fcntl_dupfd_cloexec(std::io::stdout().as_fd(), 0).ok()?;
    let saved_err = rustix::io::fcntl_dupfd_cloexec(std::io::stderr().as_fd(), 0).ok()?;
    let console = rustix::io::fcntl_dupfd_cloexec(&saved_err, 0).ok()?;
    let (tx, done) = std::sync::mpsc::channel();
    let mut file = RotatingFile::new(path, max);
    std::thread::Builder::new()
        .name("log-copy".into())
        .spawn(move || {
            let mut from = std::fs::File::from(read);
            let mut console = std::fs::File::from(console);
            copy_tee(&mut from, &mut console, &mut file);
            let _ = tx.send(());
        })
        .ok()?;
    let _ = std::io::stdout().flush();
    let capture = Capture {
        saved_out,
        saved_err,
        done,
    };
    if rustix::stdio::dup2_stdout(&write).is_err() || rustix::stdio::dup2_stderr(&write).is_err() {
        // Dropping `capture` puts back whichever was changed.
        return None;
    }
    Some(capture)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    const KMSG_TEXT: &str = "6,0,0,-;Linux version 6.1.0\n\
        6,412,1531418,-;kairos-init: kairos-init 0.1.0 starting: mode=active\n \
        SUBSYSTEM=x\n\
        4,413,2034938,-;kairos-init: step modules: 500.4 ms\n\
        6,414,2100000,-;EXT4-fs (vda4): mounted\n\
        6,415,2212576,c;kairos-init: switch_root to /sysroot\n\
        3,416,12000001,-;kairos-agent: error: stage boot: 1 step failed\n\
        garbage without a separator\n";

    #[test]
    fn kmsg_records_of_ours_print_like_dmesg() {
        let (lines, first) = kmsg_lines(KMSG_TEXT);
        assert_eq!(first, Some(0));
        assert_eq!(
            lines,
            [
                "[    1.531418] kairos-init: kairos-init 0.1.0 starting: mode=active",
                "[    2.034938] kairos-init: step modules: 500.4 ms",
                "[    2.212576] kairos-init: switch_root to /sysroot",
                "[   12.000001] kairos-agent: error: stage boot: 1 step failed",
            ]
        );
        let (_, first) = kmsg_lines("6,900,1,-;kairos-init: late\n");
        assert_eq!(first, Some(900));
    }

    fn args() -> LogsArgs {
        LogsArgs {
            journalctl: "/nonexistent/journalctl".into(),
        }
    }

    #[test]
    fn nothing_found_says_so_for_every_source() {
        let t = Tree::new();
        let (r, out, err) = run(|o, e| logs(&t.ctx, &args(), o, e));
        assert_eq!(r.unwrap(), Outcome::Refused);
        assert!(out.contains("==> kairos-init: kernel log of this boot (/dev/kmsg) <==\n(not found: /dev/kmsg not readable: "), "{out}");
        assert!(out.contains("(not found: /run/kairos/boot-timeline.json does not exist (not booted by kairos-init))"), "{out}");
        assert!(
            out.contains("(not found: not a systemd boot (no /run/systemd/system): no journal)"),
            "{out}"
        );
        assert!(out.contains("it has not run this boot"), "{out}");
        assert!(
            err.starts_with("kairos-agent: logs not found: kairos-init: kernel log"),
            "{err}"
        );
    }

    #[test]
    fn a_kairos_init_boot_with_an_agent_log_file() {
        let t = Tree::new();
        t.file(KMSG, KMSG_TEXT);
        t.file(
            TIMELINE,
            r#"{"steps":[{"name":"modules","parent":null,"start_ms":1.0,"duration_ms":500.4},{"name":"insmod ext4","parent":"modules","start_ms":2.0,"duration_ms":140.0}]}"#,
        );
        t.file(
            BOOT_IMAGE,
            "active image /cOS/active.img on LABEL=COS_STATE\n",
        );
        t.file(RUN_LOG, "kairos-agent: stage boot: 3 steps ran\n");
        t.file("/var/log/kairos/agent-provider.log", "older\n");
        t.file("/var/log/kairos/notes.txt", "not a log\n");
        let (r, out, err) = run(|o, e| logs(&t.ctx, &args(), o, e));
        assert_eq!(r.unwrap(), Outcome::Done);
        let expected = "\
==> kairos-init: kernel log of this boot (/dev/kmsg) <==
[    1.531418] kairos-init: kairos-init 0.1.0 starting: mode=active
[    2.034938] kairos-init: step modules: 500.4 ms
[    2.212576] kairos-init: switch_root to /sysroot
[   12.000001] kairos-agent: error: stage boot: 1 step failed

==> kairos-init: boot timeline (/run/kairos/boot-timeline.json, /run/kairos/boot-image) <==
  start ms         ms  step
       1.0      500.4  modules
       2.0      140.0    insmod ext4
booted: active image /cOS/active.img on LABEL=COS_STATE
";
        assert!(out.starts_with(expected), "{out}");
        assert!(out.contains("==> kairos-agent: /run/kairos/kairos-agent.log (this boot) <==\nkairos-agent: stage boot: 3 steps ran\n"), "{out}");
        assert!(out.contains("==> kairos-agent: /var/log/kairos/agent-provider.log (may hold earlier boots too) <==\nolder\n"), "{out}");
        assert!(!out.contains("notes.txt"), "{out}");
        assert!(!out.contains("has not run this boot"), "{out}");
        // Only the journal is missing (not a systemd boot).
        assert_eq!(
            err,
            "kairos-agent: logs not found: kairos-agent: journal of this boot (kairos-agent-fs.service, kairos-agent-boot.service, kairos-agent-network.service, kairos-agent-reconcile.service, kairos-agent.service)\n"
        );
    }

    #[test]
    fn a_systemd_boot_asks_the_journal_for_the_agent_units() {
        use std::os::unix::fs::PermissionsExt;
        let t = Tree::new();
        std::fs::create_dir_all(t.ctx.path("/run/systemd/system")).unwrap();
        // A stand-in journalctl that echoes its arguments.
        let bin = t.ctx.path("/bin/journalctl");
        t.file(
            "/bin/journalctl",
            "#!/bin/sh\necho \"[    5.000000] host kairos-agent[42]: args: $*\"\n",
        );
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let a = LogsArgs { journalctl: bin };
        let sections = collect(&t.ctx, &a);
        let j = sections
            .iter()
            .find(|s| s.title.starts_with("kairos-agent: journal"))
            .unwrap();
        let body = j.body.as_ref().unwrap();
        assert!(
            body.contains(&format!(
                "args: -b --no-pager -o short-monotonic --root {} -u kairos-agent-fs.service",
                t.ctx.root.display()
            )),
            "{body}"
        );
        assert!(
            body.trim_end().ends_with("-u kairos-agent.service"),
            "{body}"
        );
        // The journal found: no "console only" section.
        assert!(!render(&sections).contains("has not run this boot"));
        // A failing journalctl is reported, not fatal.
        t.file(
            "/bin/journalctl",
            "#!/bin/sh\necho 'No journal files were found.' >&2\nexit 1\n",
        );
        let sections = collect(&t.ctx, &a);
        let j = &sections[2];
        assert!(
            j.body
                .as_ref()
                .unwrap_err()
                .contains("No journal files were found."),
            "{j:?}"
        );
    }

    #[test]
    fn long_files_show_their_end_from_a_line_start() {
        let t = Tree::new();
        let line = "x".repeat(99) + "\n";
        let text = line.repeat((MAX_FILE_BYTES / 100 + 50) as usize) + "last line\n";
        t.file(VAR_LOG, &text);
        let s = tail(&t.ctx.path(VAR_LOG)).unwrap();
        assert!(s.starts_with("(… the first "), "{}", &s[..80]);
        assert!(s.ends_with("last line\n"));
        let body_lines: Vec<&str> = s.lines().skip(1).collect();
        assert!(
            body_lines[..body_lines.len() - 1]
                .iter()
                .all(|l| l.len() == 99)
        );
    }

    #[test]
    fn the_copy_reaches_the_console_and_a_rotating_file() {
        let t = Tree::new();
        let path = t.ctx.path(RUN_LOG);
        // A previous run's lines stay: the file is appended to.
        t.file(RUN_LOG, "kairos-agent: first run\n");
        let mut file = RotatingFile::new(path.clone(), 64);
        let mut console = Vec::new();
        let input = "kairos-agent: stage fs: 1 steps ran\nkairos-agent: K3s started\n";
        copy_tee(&mut input.as_bytes(), &mut console, &mut file);
        assert_eq!(String::from_utf8(console).unwrap(), input);
        // 24 + 62 bytes would pass 64: the old content moved to .1 first.
        assert_eq!(
            std::fs::read_to_string(t.ctx.path(RUN_LOG_OLD)).unwrap(),
            "kairos-agent: first run\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), input);
        // `logs` shows both, the older first.
        let sections = collect(&t.ctx, &args());
        let titles: Vec<&str> = sections.iter().map(|s| s.title.as_str()).collect();
        assert_eq!(
            &titles[3..],
            [
                "kairos-agent: /run/kairos/kairos-agent.log.1 (this boot)",
                "kairos-agent: /run/kairos/kairos-agent.log (this boot)"
            ]
        );
        // A new file is root's only: the log may carry what a stage printed.
        std::fs::remove_file(&path).unwrap();
        let mut file = RotatingFile::new(path.clone(), 64);
        file.write(b"x\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn no_capture_outside_an_init_without_a_journal() {
        // A test runs under cargo, not as init's child, and on a temp root.
        let t = Tree::new();
        assert!(capture_daemon_output(&t.ctx).is_none());
    }
}
