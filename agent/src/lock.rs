//! One writer at a time. Two `flock`s on files under /run/kairos (a tmpfs: a lock never
//! outlives the boot, and a holder that dies releases it with its last descriptor):
//!
//! - the grubenv lock, held across every read-modify-write of the grubenv (bootentry,
//!   mark-good, upgrade's arming, repair), so no writer replaces the block with a copy read
//!   before another writer's change. Holds are short (read, change, write); a second writer
//!   waits a few seconds for it, then is refused;
//! - the system lock, held for a whole install, upgrade (system or recovery) or reset: they
//!   share the work directory, the bind mount and the partitions. A second one is refused at
//!   once.
//!
//! The holder writes what it is (`upgrade (pid 123)`) into the lock file, so a refusal names it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kairos_util::{IoError, IoResultExt};

use crate::Ctx;

pub const GRUBENV_LOCK: &str = "/run/kairos/grubenv.lock";
pub const SYSTEM_LOCK: &str = "/run/kairos/system.lock";

/// How long any acquirer waits for a holder that has not named itself (see [`acquire`]).
pub const UNNAMED_GRACE: Duration = Duration::from_millis(500);

/// How long a grubenv writer waits for another one (whose hold is a read and a write).
pub const GRUBENV_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(
        "{me} refused: {holder} holds {} ({what}); try again when it is done",
        path.display()
    )]
    Busy {
        me: String,
        holder: String,
        path: PathBuf,
        what: &'static str,
    },
}

/// A held lock: released when dropped.
#[derive(Debug)]
pub struct Lock {
    file: File,
    pub path: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        // The description goes first, so a late reader never names a finished holder.
        let _ = self.file.set_len(0);
    }
}

/// `path` locked exclusively for `me` (a command name), waiting up to `wait` for the holder;
/// `what` says what the lock guards, for the refusal.
pub fn acquire(
    path: &Path,
    me: &str,
    what: &'static str,
    wait: Duration,
) -> Result<Lock, LockError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir, "creating the lock directory")?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .at(path, "opening the lock file")?;
    let start = Instant::now();
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => break,
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file
                    .rewind()
                    .and_then(|()| (&mut file).take(256).read_to_string(&mut holder).map(drop));
                let holder = holder.trim();
                // An empty description: the holder has released it (Drop empties it first) or
                // has not written it yet. The lock can outlive its holder's descriptor for a
                // moment: a child forked by any thread of that process keeps the open file
                // description until its exec closes it. So a nameless holder gets a short
                // grace even when `wait` is zero.
                let grace = if holder.is_empty() {
                    UNNAMED_GRACE
                } else {
                    Duration::ZERO
                };
                if start.elapsed() < wait.max(grace) {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                return Err(LockError::Busy {
                    me: me.to_owned(),
                    holder: if holder.is_empty() {
                        "another kairos-agent".into()
                    } else {
                        holder.to_owned()
                    },
                    path: path.to_path_buf(),
                    what,
                });
            }
            Err(e) => return Err(IoError::new(path, "locking", e.into()).into()),
        }
    }
    let desc = format!("{me} (pid {})\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(desc.as_bytes()))
        .at(path, "writing the holder")?;
    Ok(Lock {
        file,
        path: path.to_path_buf(),
    })
}

/// This process's command line without the program's directory (`kairos-agent bootentry
/// --select recovery`), shortened: what a refusal names as the holder.
pub fn this_command() -> String {
    let mut args = std::env::args();
    let prog = args
        .next()
        .map(|p| {
            Path::new(&p)
                .file_name()
                .map_or(p.clone(), |n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "kairos-agent".into());
    let mut s = std::iter::once(prog)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ");
    if s.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The system lock (install, upgrade, reset): refused at once when held.
pub fn system(ctx: &Ctx, me: &str) -> Result<Lock, LockError> {
    acquire(
        &ctx.path(SYSTEM_LOCK),
        me,
        "one install, upgrade or reset at a time",
        Duration::ZERO,
    )
}

/// The grubenv lock, for one read-modify-write of the block.
pub fn grubenv(ctx: &Ctx, me: &str) -> Result<Lock, LockError> {
    acquire(
        &ctx.path(GRUBENV_LOCK),
        me,
        "the grubenv is being changed",
        GRUBENV_WAIT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_by_name_and_the_lock_comes_back() {
        let t = crate::testutil::Tree::new();
        let held = system(&t.ctx, "upgrade").expect("first lock");
        let e = system(&t.ctx, "reset")
            .expect_err("second lock")
            .to_string();
        let me = format!("upgrade (pid {})", std::process::id());
        assert!(e.starts_with("reset refused: ") && e.contains(&me), "{e}");
        assert!(e.contains("system.lock"), "{e}");
        // The grubenv lock is another lock.
        let g = grubenv(&t.ctx, "bootentry --select").expect("grubenv lock");
        drop(held);
        drop(system(&t.ctx, "reset").expect("free again"));
        // A waiter gets the lock once the holder lets go within its wait.
        let path = t.ctx.path(GRUBENV_LOCK);
        let waiter = std::thread::spawn(move || {
            acquire(&path, "mark-good", "x", Duration::from_secs(5)).map(drop)
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(g);
        waiter.join().expect("thread").expect("lock after waiting");
    }

    #[test]
    fn a_released_lock_still_held_by_a_forked_child_is_waited_for_briefly() {
        let t = crate::testutil::Tree::new();
        drop(system(&t.ctx, "upgrade").expect("first lock"));
        // What a child forked mid-hold keeps until its exec: the same lock on another
        // descriptor, with the (emptied) description of a holder that let go.
        let path = t.ctx.path(SYSTEM_LOCK);
        let inherited = File::open(&path).expect("open");
        rustix::fs::flock(&inherited, rustix::fs::FlockOperation::LockExclusive).expect("flock");
        let child = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(inherited);
        });
        drop(system(&t.ctx, "install").expect("lock once the child lets go"));
        child.join().expect("thread");
        // A named holder is still refused at once.
        let held = system(&t.ctx, "upgrade").expect("lock");
        let t0 = Instant::now();
        assert!(system(&t.ctx, "reset").is_err());
        assert!(t0.elapsed() < UNNAMED_GRACE, "{:?}", t0.elapsed());
        drop(held);
    }
}
