//! File-tree helpers for the boot: lstat kinds, copying image state into the persistent store
//! without overwriting it, and freeing the initramfs before switch_root.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};

use crate::syntax::PathKind;

/// Bounds the recursion in image-controlled trees: a deeper tree is left partly uncopied with
/// a warning rather than exhausting the init's stack.
const MAX_DEPTH: usize = 64;

pub fn path_kind(p: &Path) -> PathKind {
    match fs::symlink_metadata(p) {
        Err(_) => PathKind::Missing,
        Ok(m) if m.file_type().is_symlink() => PathKind::Symlink,
        Ok(m) if m.is_dir() => PathKind::Dir,
        Ok(_) => PathKind::File,
    }
}

/// The first component of `p` below `root` that is a symlink, with its target. A mount or
/// write through such a path would land wherever the image or the persistent store points it,
/// possibly outside `root` (the kernel resolves it in the initramfs, not in the new root).
/// Paths not under `root` and components that do not exist yet are not checked.
pub fn symlink_below(root: &Path, p: &Path) -> Option<(PathBuf, PathBuf)> {
    let rest = p.strip_prefix(root).ok()?;
    let mut cur = root.to_path_buf();
    for c in rest.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&cur).unwrap_or_default();
                return Some((cur, target));
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

pub fn mkdir_p(p: &Path) -> Result<(), IoError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(p)
        .at(p, "mkdir")
}

/// What `sync_missing` did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub copied: u64,
    pub kept: u64,
    pub errors: Vec<String>,
}

/// Copy every entry of `from` that `to` lacks, preserving mode, owner and mtime. Entries that
/// exist in `to` are never overwritten: they are the user's changes (upstream bug #3390).
pub fn sync_missing(from: &Path, to: &Path) -> SyncReport {
    let mut r = SyncReport::default();
    sync_dir(from, to, 0, &mut r);
    r
}

fn sync_dir(from: &Path, to: &Path, depth: usize, r: &mut SyncReport) {
    if depth > MAX_DEPTH {
        r.errors.push(format!(
            "{}: deeper than {MAX_DEPTH} levels, not copied",
            from.display()
        ));
        return;
    }
    let entries = match fs::read_dir(from) {
        Ok(e) => e,
        Err(e) => return r.errors.push(format!("read {}: {e}", from.display())),
    };
    for entry in entries.flatten() {
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let Ok(meta) = fs::symlink_metadata(&src) else {
            continue;
        };
        match fs::symlink_metadata(&dst) {
            Ok(dmeta) => {
                r.kept += 1;
                if meta.is_dir() && dmeta.is_dir() {
                    sync_dir(&src, &dst, depth + 1, r);
                }
            }
            Err(_) => match copy_entry(&src, &dst, &meta) {
                Ok(()) => {
                    r.copied += 1;
                    if meta.is_dir() {
                        sync_dir(&src, &dst, depth + 1, r);
                    }
                }
                Err(e) => r.errors.push(e.to_string()),
            },
        }
    }
}

fn copy_entry(src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<(), IoError> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src).at(src, "readlink")?;
        std::os::unix::fs::symlink(&target, dst).at(dst, "symlink")?;
    } else if ft.is_dir() {
        fs::DirBuilder::new()
            .mode(meta.mode() & 0o7777)
            .create(dst)
            .at(dst, "mkdir")?;
    } else if ft.is_file() {
        fs::copy(src, dst).at(dst, format!("copy from {}", src.display()))?;
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dst,
            rustix::fs::FileType::from_raw_mode(meta.mode()),
            rustix::fs::Mode::from_raw_mode(meta.mode() & 0o7777),
            meta.rdev(),
        )
        .at(dst, "mknod")?;
    } else {
        return Ok(()); // sockets are runtime state, not worth keeping
    }
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid())).at(dst, "chown")?;
    if !ft.is_symlink() {
        // chown clears setuid bits, so the mode goes last.
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .at(dst, "chmod")?;
    }
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec() as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec() as _,
        },
    };
    let _ = rustix::fs::utimensat(
        rustix::fs::CWD,
        dst,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    );
    Ok(())
}

/// Delete the initramfs contents below `root` without crossing into other filesystems (the
/// new root and the moved API mounts), so its memory is given back before switch_root.
pub fn free_initramfs(root: &Path, keep: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(root) else {
        return 0;
    };
    remove_same_dev(root, meta.dev(), keep, 0)
}

fn remove_same_dev(dir: &Path, dev: u64, keep: &Path, depth: usize) -> u64 {
    if depth > MAX_DEPTH {
        return 0;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut freed = 0;
    for entry in entries.flatten() {
        let p = entry.path();
        if p == keep {
            continue;
        }
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            freed += remove_same_dev(&p, dev, keep, depth + 1);
            let _ = fs::remove_dir(&p);
        } else {
            freed += m.len();
            let _ = fs::remove_file(&p);
        }
    }
    freed
}

/// Is `prog` an executable file inside `root`, resolving symlinks as if `root` were `/`?
/// (Images' /sbin/init is usually an absolute symlink, e.g. to /bin/busybox.)
pub fn executable_in_root(root: &Path, prog: &str) -> bool {
    let Ok(dir) = rustix::fs::open(
        root,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    ) else {
        return false;
    };
    let Ok(fd) = rustix::fs::openat2(
        &dir,
        prog.trim_start_matches('/'),
        rustix::fs::OFlags::PATH,
        rustix::fs::Mode::empty(),
        rustix::fs::ResolveFlags::IN_ROOT,
    ) else {
        return false;
    };
    match rustix::fs::fstat(&fd) {
        Ok(st) => {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
                && st.st_mode & 0o111 != 0
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn symlinks_below_the_root_are_found() -> io::Result<()> {
        let t = tempfile::tempdir()?;
        let root = t.path().join("sysroot");
        fs::create_dir_all(root.join("var/lib"))?;
        fs::create_dir_all(root.join("usr/local/.state"))?;
        std::os::unix::fs::symlink("/", root.join("var/log"))?;
        std::os::unix::fs::symlink("/etc", root.join("usr/local/.state/etc-ssh.bind"))?;
        // The root itself may be reached through a symlink: only components below it count.
        std::os::unix::fs::symlink(&root, t.path().join("alias"))?;
        let found = |p: &str| symlink_below(&root, &root.join(p));
        assert_eq!(found("var/lib/x"), None);
        assert_eq!(found("missing/deeper"), None);
        assert_eq!(
            found("var/log"),
            Some((root.join("var/log"), PathBuf::from("/")))
        );
        assert_eq!(
            found("var/log/journal"),
            Some((root.join("var/log"), PathBuf::from("/")))
        );
        assert_eq!(
            found("usr/local/.state/etc-ssh.bind"),
            Some((
                root.join("usr/local/.state/etc-ssh.bind"),
                PathBuf::from("/etc")
            ))
        );
        assert_eq!(symlink_below(&root, Path::new("/run/elsewhere")), None);
        assert_eq!(symlink_below(&root, &root), None);
        Ok(())
    }

    #[test]
    fn sync_keeps_user_changes_and_copies_the_rest() {
        let t = tempfile::tempdir().expect("test setup");
        let img = t.path().join("img");
        let store = t.path().join("store");
        fs::create_dir_all(img.join("sub/deeper")).expect("test setup");
        fs::write(img.join("a.conf"), "image").expect("test setup");
        fs::write(img.join("sub/deeper/b"), "image-b").expect("test setup");
        std::os::unix::fs::symlink("/etc/passwd", img.join("link")).expect("test setup");
        fs::set_permissions(img.join("a.conf"), fs::Permissions::from_mode(0o600))
            .expect("test setup");
        fs::create_dir_all(store.join("sub")).expect("test setup");
        fs::write(store.join("sub/user"), "mine").expect("test setup");
        fs::write(store.join("a.conf"), "user-edit").expect("test setup");

        let r = sync_missing(&img, &store);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            fs::read_to_string(store.join("a.conf")).expect("test setup"),
            "user-edit"
        );
        assert_eq!(
            fs::read_to_string(store.join("sub/deeper/b")).expect("test setup"),
            "image-b"
        );
        assert_eq!(
            fs::read_to_string(store.join("sub/user")).expect("test setup"),
            "mine"
        );
        assert_eq!(
            fs::read_link(store.join("link")).expect("test setup"),
            Path::new("/etc/passwd")
        );
        // Second run copies nothing.
        let again = sync_missing(&img, &store);
        assert_eq!(again.copied, 0);
    }

    #[test]
    fn sync_preserves_mode() {
        let t = tempfile::tempdir().expect("test setup");
        let img = t.path().join("img");
        let store = t.path().join("store");
        fs::create_dir_all(&img).expect("test setup");
        fs::create_dir_all(&store).expect("test setup");
        fs::write(img.join("key"), "secret").expect("test setup");
        fs::set_permissions(img.join("key"), fs::Permissions::from_mode(0o600))
            .expect("test setup");
        sync_missing(&img, &store);
        assert_eq!(
            fs::metadata(store.join("key")).expect("test setup").mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn executable_resolves_absolute_symlinks_inside_root() {
        let t = tempfile::tempdir().expect("test setup");
        let root = t.path();
        fs::create_dir_all(root.join("bin")).expect("test setup");
        fs::create_dir_all(root.join("sbin")).expect("test setup");
        fs::write(root.join("bin/busybox"), "x").expect("test setup");
        fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755))
            .expect("test setup");
        std::os::unix::fs::symlink("/bin/busybox", root.join("sbin/init")).expect("test setup");
        fs::write(root.join("bin/noexec"), "x").expect("test setup");
        assert!(executable_in_root(root, "/sbin/init"));
        assert!(!executable_in_root(root, "/bin/noexec"));
        assert!(!executable_in_root(root, "/nope"));
        // A link escaping the root resolves inside it, where nothing is.
        std::os::unix::fs::symlink("../../../../bin/sh", root.join("sbin/escape"))
            .expect("test setup");
        assert!(!executable_in_root(root, "/sbin/escape") || root.join("bin/sh").exists());
    }

    #[test]
    fn path_kinds() {
        let t = tempfile::tempdir().expect("test setup");
        fs::write(t.path().join("f"), "").expect("test setup");
        std::os::unix::fs::symlink("f", t.path().join("l")).expect("test setup");
        assert_eq!(path_kind(t.path()), PathKind::Dir);
        assert_eq!(path_kind(&t.path().join("f")), PathKind::File);
        assert_eq!(path_kind(&t.path().join("l")), PathKind::Symlink);
        assert_eq!(path_kind(&t.path().join("x")), PathKind::Missing);
    }
}
