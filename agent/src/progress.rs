//! The numbered steps of install, upgrade and reset as they happen: an indicatif bar redrawn
//! in place when stderr is a terminal, else one plain `<command>: <step>` line each (what
//! logs and tests read; written by hand so they stay exactly these lines).

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    /// The plain lines' prefix: `install`, `upgrade`, `reset`.
    who: &'static str,
    n: usize,
    total: usize,
    bar: Option<ProgressBar>,
}

impl Drop for Progress {
    /// Leaves the bar's last state on its line, also when the command stops with an error.
    fn drop(&mut self) {
        if let Some(bar) = &self.bar
            && self.n > 0
        {
            bar.abandon();
        }
    }
}

impl Progress {
    /// `total` steps of `who`, drawn as a bar when stderr is a terminal.
    pub fn new(who: &'static str, total: usize) -> Progress {
        if std::io::stderr().is_terminal() {
            Progress::bar(who, total)
        } else {
            Progress::plain(who, total)
        }
    }

    /// Plain lines into the log whatever stderr is.
    pub fn plain(who: &'static str, total: usize) -> Progress {
        Progress {
            who,
            n: 0,
            total,
            bar: None,
        }
    }

    fn bar(who: &'static str, total: usize) -> Progress {
        let style = ProgressStyle::with_template("[{bar:20}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#-");
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
            .with_style(style);
        Progress {
            who,
            n: 0,
            total,
            bar: Some(bar),
        }
    }

    /// One step more than planned (a download before the image is built).
    pub fn add_step(&mut self) {
        self.total += 1;
        if let Some(bar) = &self.bar {
            bar.set_length(self.total as u64);
        }
    }

    /// The next step begins.
    pub fn step(&mut self, what: &str, log: &mut dyn Write) {
        self.n += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.n as u64);
                bar.set_message(what.to_string());
            }
            None => {
                let _ = writeln!(log, "{}: {what}", self.who);
                let _ = log.flush();
            }
        }
    }

    /// A detail the plain log gets and the bar leaves out.
    pub fn note(&self, what: &str, log: &mut dyn Write) {
        if self.bar.is_none() {
            let _ = writeln!(log, "{}: {what}", self.who);
        }
    }

    /// (steps begun, steps planned).
    #[cfg(test)]
    fn position(&self) -> (usize, usize) {
        (self.n, self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_terminal_each_step_and_note_is_one_plain_line() {
        let mut log = Vec::new();
        let mut p = Progress::plain("upgrade", 2);
        p.step("resolving the source oci:x", &mut log);
        p.note("a detail", &mut log);
        p.add_step();
        p.step("pulling 3 layer(s)", &mut log);
        p.step("building transition.img", &mut log);
        assert_eq!(p.position(), (3, 3));
        assert_eq!(
            String::from_utf8(log).expect("utf-8"),
            "upgrade: resolving the source oci:x\nupgrade: a detail\nupgrade: pulling 3 layer(s)\nupgrade: building transition.img\n"
        );
    }

    #[test]
    fn a_bar_writes_nothing_into_the_log() {
        let mut log = Vec::new();
        let mut p = Progress::bar("install", 1);
        p.step("checking /dev/x", &mut log);
        p.note("a detail", &mut log);
        assert_eq!(p.position(), (1, 1));
        assert!(log.is_empty(), "{}", String::from_utf8_lossy(&log));
    }
}
