//! kairos-init: PID 1 of the Kairos initramfs, and PID 1 of a minimal installed system when an
//! image has it as `/sbin/init` (see `pid1::in_initramfs` for how the two are told apart). All
//! logic lives in the library; this file only makes sure that whatever happens, the machine
//! says why and reboots instead of panicking.

use std::time::Duration;

use kairos_init::sys::log;

fn emergency(reason: &str, delay: Duration) -> ! {
    log::fatal(&format!("{reason}\nrebooting in {} s", delay.as_secs()));
    std::thread::sleep(delay);
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    // reboot(2) only fails without CAP_SYS_BOOT; PID 1 must never exit (that panics the kernel).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() {
    if std::process::id() != 1 {
        eprintln!(
            "kairos-init {}: must run as PID 1 (of an initramfs, or of a system whose /sbin/init it is)",
            env!("CARGO_PKG_VERSION")
        );
        std::process::exit(2);
    }
    if !kairos_init::pid1::in_initramfs() {
        // The system's PID 1: a panic must not kill it either, but there is nothing to fall
        // back to, so the same report-and-reboot applies.
        std::panic::set_hook(Box::new(|info| {
            emergency(&format!("internal error: {info}"), Duration::from_secs(10))
        }));
        kairos_init::pid1::run();
    }
    // With panic=abort a panic would kill PID 1 and panic the kernel silently: report and reboot.
    std::panic::set_hook(Box::new(|info| {
        emergency(&format!("internal error: {info}"), Duration::from_secs(10))
    }));
    let failure = kairos_init::boot::run();
    if failure.debug_shell {
        log::fatal(&failure.reason.to_string());
        if let Err(e) = kairos_init::boot::debug_shell() {
            log::fatal(&e.to_string());
        }
    }
    emergency(&failure.reason.to_string(), failure.reboot_delay);
}
