//! Logging for PID 1: every line to /dev/kmsg with the `kairos-init:` prefix (so it lands in
//! dmesg with a timestamp), fatal lines also straight to every `console=` device.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

struct Sink {
    kmsg: Option<File>,
    consoles: Vec<String>,
    debug: bool,
}

static SINK: Mutex<Sink> = Mutex::new(Sink {
    kmsg: None,
    consoles: Vec::new(),
    debug: false,
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error = 3,
    Warn = 4,
    Info = 6,
    Debug = 7,
}

/// Opens /dev/kmsg (after devtmpfs is mounted). Without it, lines go to stderr, which is the
/// console PID 1 was given.
pub fn init_kmsg() {
    // Unlimited userspace kmsg: the default ratelimit would drop most of our boot log.
    let _ = std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n");
    if let Ok(mut s) = SINK.lock() {
        s.kmsg = OpenOptions::new().write(true).open("/dev/kmsg").ok();
    }
}

pub fn set_consoles(consoles: &[String], debug: bool) {
    if let Ok(mut s) = SINK.lock() {
        s.consoles = consoles.to_vec();
        s.debug = debug;
    }
}

pub fn write(level: Level, msg: &str) {
    let Ok(mut s) = SINK.lock() else { return };
    if level == Level::Debug && !s.debug {
        return;
    }
    to_kmsg(&mut s, level as u8, msg);
}

/// kmsg takes one record per write; long messages are split so none is truncated. Without
/// kmsg, lines go to stderr.
fn to_kmsg(s: &mut Sink, prio: u8, msg: &str) {
    for line in msg.lines() {
        let rec = format!("<{prio}>kairos-init: {line}\n");
        let ok = match s.kmsg.as_mut() {
            Some(k) => k.write_all(rec.as_bytes()).is_ok(),
            None => false,
        };
        if !ok {
            let _ = std::io::stderr().write_all(&rec.as_bytes()[3..]);
        }
    }
}

/// A detail line (each bind of the system step): into the kernel log at debug priority, so
/// it is in dmesg but not on the consoles at the default console log level; with
/// `rd.kairos.debug` it is an info line like the others.
pub fn detail(msg: &str) {
    let Ok(mut s) = SINK.lock() else { return };
    let prio = if s.debug { Level::Info } else { Level::Debug };
    to_kmsg(&mut s, prio as u8, msg);
}

/// A fatal message goes to the kernel log and to every console the user asked for, so a node
/// with a monitor on tty1 and a serial line both show why it is not booting.
pub fn fatal(msg: &str) {
    write(Level::Error, msg);
    to_consoles("FATAL: ", msg);
}

/// An info line that also goes to every console (a test hook's pause must show on the serial
/// log whatever the kernel's console log level).
pub fn announce(msg: &str) {
    write(Level::Info, msg);
    to_consoles("", msg);
}

fn to_consoles(prefix: &str, msg: &str) {
    let consoles = SINK.lock().map(|s| s.consoles.clone()).unwrap_or_default();
    let mut targets: Vec<String> = consoles.iter().map(|c| format!("/dev/{c}")).collect();
    targets.push("/dev/console".into());
    targets.dedup();
    for t in targets {
        if let Ok(mut f) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&t)
        {
            let _ = writeln!(
                f,
                "\r\nkairos-init: {prefix}{}\r",
                msg.replace('\n', "\r\nkairos-init: ")
            );
        }
    }
}

#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::sys::log::write($crate::sys::log::Level::Info, &format!($($t)*)) } }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::sys::log::write($crate::sys::log::Level::Warn, &format!($($t)*)) } }
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::sys::log::write($crate::sys::log::Level::Error, &format!($($t)*)) } }
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::sys::log::write($crate::sys::log::Level::Debug, &format!($($t)*)) } }
