//! PID 1's signal mask: the signals it handles are blocked and taken synchronously with
//! sigtimedwait (no handlers, so no async-signal-safety to think about elsewhere), and the
//! children it starts get an empty mask back. rustix offers these calls only in its
//! experimental `runtime` module, meant for programs without a libc; this one has glibc, so
//! they go through libc.

use std::os::unix::process::CommandExt;
use std::time::Duration;

/// Signals blocked by [`block`], to be taken with [`Blocked::wait`].
pub struct Blocked(libc::sigset_t);

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain integers (all-zero is a valid value), and sigemptyset
    // initialises it before sigaddset touches it; an invalid signal number is EINVAL, not UB.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in sigs {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// Blocks `sigs` for this process (single-threaded: the mask is the process's).
pub fn block(sigs: &[i32]) -> Blocked {
    let set = sigset(sigs);
    // SAFETY: `set` is an initialised sigset_t that outlives the call; a null old set is
    // allowed. sigprocmask fails only for an invalid `how`, which SIG_BLOCK is not.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    Blocked(set)
}

impl Blocked {
    /// Waits up to `timeout` for one of the blocked signals; its number.
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the set and `ts` are valid for the call; a null siginfo is allowed.
        let r = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        (r > 0).then_some(r)
    }
}

/// Makes `cmd`'s child start with no signal blocked, whatever this process blocks (a
/// supervised child must see the SIGTERM of a shutdown).
pub fn unblock_all_in_child(cmd: &mut std::process::Command) {
    let empty = sigset(&[]);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // sigprocmask, which is async-signal-safe, with a set copied in before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
}
