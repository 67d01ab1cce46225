//! Writing as root under a root directory without being steered by symlinks.
//!
//! Every path is walked from the root one component at a time with `openat(O_NOFOLLOW)`, so
//! each directory is pinned by a descriptor once opened. A symlink met on the way is followed
//! only when root owns both the link and the directory holding it (an image's `/var/run` or
//! `/lib`): a user can only create links owned by themselves, and cannot move root's links
//! into a directory root does not own. Any other symlink is refused with an error naming it.
//! The last component of a written file is never followed: a new file is created under an
//! unpredictable name with `O_EXCL`, owned and moded through its descriptor, and renamed over
//! the old entry (a symlink there is replaced, its target untouched).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use kairos_util::{IoError, IoResultExt};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// New owner and group (None: unchanged).
pub type Owner = (Option<u32>, Option<u32>);

/// Symlinks followed in one walk before giving up, as the kernel's limit.
const MAX_LINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(
        "{path}: {at} is a symlink owned by uid {link_uid} in a directory owned by uid \
         {dir_uid}; not followed"
    )]
    Symlink {
        path: PathBuf,
        at: PathBuf,
        link_uid: u32,
        dir_uid: u32,
    },
    #[error("{path}: {at}: more than {MAX_LINKS} symlinks")]
    Loop { path: PathBuf, at: PathBuf },
    #[error("{path}: {at}: not a directory")]
    NotDir { path: PathBuf, at: PathBuf },
    #[error("{path}: not a regular file")]
    NotFile { path: PathBuf },
    #[error(transparent)]
    Io(#[from] IoError),
}

/// What the walk ends on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A directory, missing components created (0755, root's) when `create`.
    Dir { create: bool },
    /// An existing file, opened for reading.
    File,
}

fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Opens `path` (taken as inside `root`) by the rules above.
fn walk(root: &Path, path: &Path, want: Want) -> Result<OwnedFd, FsError> {
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let top = rustix::fs::open(root, dir_flags.difference(OFlags::NOFOLLOW), Mode::empty())
        .at(root, "opening the root")?;
    let mut stack = vec![top];
    // The walked path as seen inside the root, for messages.
    let mut at = PathBuf::from("/");
    let mut todo = components(path);
    let mut links = 0;
    let mut created = false;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
                at.pop();
            }
            continue;
        }
        let last = todo.is_empty();
        let Some(dir) = stack.last() else {
            break;
        };
        let flags = if last && want == Want::File {
            // NONBLOCK: a FIFO planted there must not hang the open.
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK
        } else {
            dir_flags
        };
        let here = at.join(&name);
        match rustix::fs::openat(dir, name.as_os_str(), flags, Mode::empty()) {
            Ok(fd) => {
                created = false;
                if last && want == Want::File {
                    return Ok(fd);
                }
                stack.push(fd);
                at = here;
            }
            Err(Errno::NOENT) if want == (Want::Dir { create: true }) && !created => {
                match rustix::fs::mkdirat(dir, name.as_os_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => {
                        return Err(IoError::new(&here, "creating the directory", e.into()).into());
                    }
                }
                // Once: a second ENOENT right after mkdir is an error, not a loop.
                created = true;
                todo.push_front(name);
            }
            Err(Errno::LOOP | Errno::NOTDIR) => {
                let st = rustix::fs::statat(dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .at(&here, "stat")?;
                if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
                    return Err(FsError::NotDir {
                        path: path.to_path_buf(),
                        at: here,
                    });
                }
                let dir_uid = rustix::fs::fstat(dir).at(&at, "stat")?.st_uid;
                if st.st_uid != 0 || dir_uid != 0 {
                    return Err(FsError::Symlink {
                        path: path.to_path_buf(),
                        at: here,
                        link_uid: st.st_uid,
                        dir_uid,
                    });
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(FsError::Loop {
                        path: path.to_path_buf(),
                        at: here,
                    });
                }
                let target = rustix::fs::readlinkat(dir, name.as_os_str(), Vec::new())
                    .at(&here, "readlink")?;
                let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    stack.truncate(1);
                    at = PathBuf::from("/");
                }
                for c in components(&target).into_iter().rev() {
                    todo.push_front(c);
                }
            }
            Err(e) => return Err(IoError::new(&here, "open", e.into()).into()),
        }
    }
    match want {
        Want::File => Err(FsError::NotFile {
            path: path.to_path_buf(),
        }),
        Want::Dir { .. } => stack.pop().ok_or_else(|| FsError::NotDir {
            path: path.to_path_buf(),
            at,
        }),
    }
}

fn set_owner_mode(
    fd: impl AsFd,
    path: &Path,
    mode: u32,
    ids: Option<Owner>,
) -> Result<(), FsError> {
    // Owner first: chown clears set-id bits that the mode may ask for.
    if let Some((u, g)) = ids {
        std::os::unix::fs::fchown(&fd, u, g).at(path, "chown")?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777)).at(path, "chmod")?;
    Ok(())
}

/// The directory `path` under `root`, created with its parents when missing, then given
/// `mode` and owner through its descriptor.
pub fn make_dir(root: &Path, path: &Path, mode: u32, ids: Option<Owner>) -> Result<(), FsError> {
    let fd = walk(root, path, Want::Dir { create: true })?;
    set_owner_mode(&fd, path, mode, ids)
}

/// Whether `path` under `root` is a directory reached by the rules above.
pub fn is_dir(root: &Path, path: &Path) -> bool {
    walk(root, path, Want::Dir { create: false }).is_ok()
}

/// The content of regular file `path` under `root` (at most `max` bytes read), `None` when
/// it does not exist.
pub fn read(root: &Path, path: &Path, max: u64) -> Result<Option<Vec<u8>>, FsError> {
    let fd = match walk(root, path, Want::File) {
        Ok(fd) => fd,
        Err(FsError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let st = rustix::fs::fstat(&fd).at(path, "stat")?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(FsError::NotFile {
            path: path.to_path_buf(),
        });
    }
    let mut buf = Vec::new();
    File::from(fd)
        .take(max)
        .read_to_end(&mut buf)
        .at(path, "read")?;
    Ok(Some(buf))
}

/// Mode and owner of the entry `path` under `root`, its last component not followed;
/// `None` when missing or not a regular file.
pub fn file_meta(root: &Path, path: &Path) -> Result<Option<(u32, u32, u32)>, FsError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(None);
    };
    let dir = match walk(root, parent, Want::Dir { create: false }) {
        Ok(d) => d,
        Err(FsError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
            Ok(Some((st.st_mode & 0o7777, st.st_uid, st.st_gid)))
        }
        Ok(_) | Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(IoError::new(path, "stat", e.into()).into()),
    }
}

/// A name nobody can guess ahead of us (std's per-process random hash keys and a counter).
fn unpredictable() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

/// Replaces `path` under `root` with `bytes` by a rename (never half a file), with `mode`
/// and owner. Missing parent directories are created.
pub fn write(
    root: &Path,
    path: &Path,
    bytes: &[u8],
    mode: u32,
    ids: Option<Owner>,
) -> Result<(), FsError> {
    let name = path.file_name().ok_or_else(|| FsError::NotFile {
        path: path.to_path_buf(),
    })?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    let dir = walk(root, parent, Want::Dir { create: true })?;
    let mut tries = 0;
    let (fd, tmp) = loop {
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".{:016x}.kairos-tmp", unpredictable()));
        match rustix::fs::openat(
            &dir,
            tmp.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => break (fd, tmp),
            Err(Errno::EXIST) if tries < 8 => tries += 1,
            Err(e) => return Err(IoError::new(path, "creating a temporary file", e.into()).into()),
        }
    };
    let mut f = File::from(fd);
    let r = (|| -> Result<(), FsError> {
        f.write_all(bytes).at(path, "write")?;
        set_owner_mode(&f, path, mode, ids)?;
        rustix::fs::renameat(&dir, tmp.as_os_str(), &dir, name).at(path, "rename")?;
        Ok(())
    })();
    if r.is_err() {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_os_str(), AtFlags::empty());
    }
    r
}

// The callers' forms: errors as text for a step's or K3s' failure message.

/// Write `bytes` to `p` (a path on this system) by a rename: never half a file, a symlink
/// at `p` replaced rather than its target, no symlink on the way followed unless root's
/// (see the module's text).
pub(crate) fn write_atomic(
    p: &Path,
    bytes: &[u8],
    mode: u32,
    ids: Option<Owner>,
) -> Result<(), FsError> {
    let root = if p.is_absolute() { "/" } else { "." };
    write(Path::new(root), p, bytes, mode, ids)
}

/// [`write_atomic`] for `path` inside the context's root.
pub(crate) fn write_under(
    ctx: &crate::Ctx,
    path: &str,
    bytes: &[u8],
    mode: u32,
    ids: Option<Owner>,
) -> Result<(), String> {
    write(&ctx.root, Path::new(path), bytes, mode, ids).map_err(|e| e.to_string())
}

/// The text of `path` inside the context's root, empty when missing; a symlink planted by
/// someone else is an error, not followed.
pub(crate) fn read_under(ctx: &crate::Ctx, path: &str) -> Result<Vec<u8>, String> {
    read(&ctx.root, Path::new(path), 256 << 20)
        .map(Option::unwrap_or_default)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn roots_links_are_followed_inside_the_root_and_others_refused() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (lchown)"
        );
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path();
        std::fs::create_dir_all(root.join("run")).expect("mkdir");
        std::fs::create_dir_all(root.join("var")).expect("mkdir");
        std::fs::create_dir_all(root.join("usr/lib")).expect("mkdir");
        // An image's links, root's: absolute ones resolve inside the root, not on the host.
        std::os::unix::fs::symlink("/run", root.join("var/run")).expect("symlink");
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).expect("symlink");
        write(root, Path::new("/var/run/a/x"), b"1", 0o600, None).expect("through /var/run");
        assert_eq!(std::fs::read(root.join("run/a/x")).expect("read"), b"1");
        write(
            root,
            Path::new("/lib/y"),
            b"2",
            0o644,
            Some((Some(5), Some(6))),
        )
        .expect("lib");
        let m = std::fs::metadata(root.join("usr/lib/y")).expect("y");
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o644, 5, 6));
        // `..` stops at the root.
        write(root, Path::new("/../../z"), b"3", 0o644, None).expect("z");
        assert_eq!(std::fs::read(root.join("z")).expect("read"), b"3");
        assert_eq!(read(root, Path::new("/nope/z"), 10).expect("read"), None);
        assert_eq!(
            read(root, Path::new("/lib/y"), 10).expect("read"),
            Some(b"2".to_vec())
        );
        // A user's link, or root's link in a user's directory: refused, named.
        std::fs::create_dir(root.join("home")).expect("mkdir");
        std::os::unix::fs::chown(root.join("home"), Some(1000), Some(1000)).expect("chown");
        std::os::unix::fs::symlink("/run", root.join("home/rootlink")).expect("symlink");
        std::os::unix::fs::symlink("/run", root.join("home/userlink")).expect("symlink");
        std::os::unix::fs::lchown(root.join("home/userlink"), Some(1000), None).expect("lchown");
        for link in ["/home/rootlink", "/home/userlink"] {
            let e = make_dir(root, &Path::new(link).join("d"), 0o777, None).expect_err(link);
            assert!(
                e.to_string()
                    .contains(&format!("{link} is a symlink owned by uid ")),
                "{e}"
            );
            let e = read(root, Path::new(link), 10).expect_err(link);
            assert!(matches!(e, FsError::Symlink { .. }), "{e}");
        }
        assert_eq!(names(&root.join("run")), ["a"]);
        assert_eq!(
            std::fs::metadata(root.join("run")).expect("run").mode() & 0o7777,
            0o755
        );
        // The last component of a written file is replaced, whoever's link it was.
        write(root, Path::new("/home/userlink"), b"4", 0o600, None).expect("replace");
        assert!(
            std::fs::symlink_metadata(root.join("home/userlink"))
                .expect("f")
                .is_file()
        );
        assert_eq!(
            file_meta(root, Path::new("/home/userlink")).expect("meta"),
            Some((0o600, 0, 0))
        );
        assert_eq!(
            file_meta(root, Path::new("/home/rootlink")).expect("meta"),
            None
        );
        // No temporary file is left behind.
        assert_eq!(names(&root.join("home")), ["rootlink", "userlink"]);
        // A regular file in the middle of a path.
        let e = make_dir(root, Path::new("/z/sub"), 0o755, None).expect_err("file in the way");
        assert!(matches!(e, FsError::NotDir { .. }), "{e}");
    }
}
