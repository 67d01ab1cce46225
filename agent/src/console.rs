//! Messages a person at the machine must see: on /dev/console as well as on the log stream.
//! Under kairos-init the agent's stderr already is the console, so it is written once; under
//! systemd stderr goes to the journal, so the console gets its own copy.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsFd;

use crate::Ctx;

/// The console device, under the root.
pub const CONSOLE: &str = "/dev/console";

/// (rdev, ino, dev) of an open descriptor or a path: the same character device opened twice
/// compares equal on rdev; a regular file (tests) on inode.
fn identity(md: &std::fs::Metadata) -> (u64, u64, u64) {
    if md.file_type().is_char_device() {
        (md.rdev(), 0, 0)
    } else {
        (0, md.ino(), md.dev())
    }
}

fn same_file(fd: impl AsFd, md: &std::fs::Metadata) -> bool {
    fd.as_fd()
        .try_clone_to_owned()
        .ok()
        .map(File::from)
        .and_then(|f| f.metadata().ok())
        .is_some_and(|m| identity(&m) == identity(md))
}

/// The console to write to, unless it is missing or is where `also` (stderr or stdout)
/// already goes.
fn open(ctx: &Ctx, also: impl AsFd) -> Option<File> {
    let path = ctx.path(CONSOLE);
    let md = std::fs::metadata(&path).ok()?;
    if same_file(also, &md) {
        return None;
    }
    OpenOptions::new()
        // Append: a file standing in for the console (tests) keeps every line.
        .append(true)
        // Never become the console's controlling process; never block the daemon on a serial
        // line held by flow control (as kairos-init opens its consoles).
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&path)
        .ok()
}

/// `text` (one or more lines) to `log` and to the console unless stderr is the console.
pub fn say(ctx: &Ctx, log: &mut dyn Write, text: &str) {
    let text = text.trim_end_matches('\n');
    let _ = writeln!(log, "{text}");
    let _ = log.flush();
    if let Some(mut c) = open(ctx, std::io::stderr()) {
        let _ = writeln!(c, "{text}");
    }
}

/// `text` to stdout and to the console unless stdout is the console (the pairing screen:
/// what a person reads, not a log line).
pub fn show(ctx: &Ctx, text: &str) {
    let text = text.trim_end_matches('\n');
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
    drop(out);
    if let Some(mut c) = open(ctx, std::io::stdout()) {
        let _ = writeln!(c, "{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_gets_a_copy_unless_it_is_the_stream() {
        let t = crate::testutil::Tree::new();
        t.file(CONSOLE, "");
        let mut log = Vec::new();
        say(&t.ctx, &mut log, "kairos-agent: hello\n");
        assert_eq!(
            String::from_utf8(log).expect("utf8"),
            "kairos-agent: hello\n"
        );
        let console = t.ctx.path(CONSOLE);
        assert_eq!(
            std::fs::read_to_string(&console).expect("console"),
            "kairos-agent: hello\n"
        );
        // The "stream" is the console itself: not written twice.
        let f = File::open(&console).expect("open");
        assert!(open(&t.ctx, &f).is_none());
        // No console: only the log.
        std::fs::remove_file(&console).expect("rm");
        say(&t.ctx, &mut Vec::new(), "x");
        assert!(!console.exists());
    }
}
