//! Thin wrappers over mount(2) whose errors say what was being mounted where.

use std::path::Path;

use kairos_util::{IoError, IoResultExt};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

/// A mount: what (source, filesystem type, options) on which target. Operations on the
/// target alone (umount, propagation) fail with an [`IoError`].
#[derive(Debug, thiserror::Error)]
#[error("mount {what} on {target}: {err}")]
pub struct MountError {
    pub what: String,
    pub target: String,
    /// Printed, not returned by `source()` (as [`IoError`] does).
    pub err: std::io::Error,
}

fn err(what: impl Into<String>, target: &Path, e: rustix::io::Errno) -> MountError {
    MountError {
        what: what.into(),
        target: target.display().to_string(),
        err: e.into(),
    }
}

pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> Result<(), MountError> {
    let data = std::ffi::CString::new(data).map_err(|_| MountError {
        what: format!("{source} ({fstype})"),
        target: target.display().to_string(),
        err: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    rustix::mount::mount(source, target, fstype, flags, Some(data.as_c_str())).map_err(|e| {
        err(
            format!(
                "{source} ({fstype}{}{})",
                if data.is_empty() { "" } else { ", " },
                data.to_string_lossy()
            ),
            target,
            e,
        )
    })
}

pub fn device(dev: &Path, target: &Path, fstype: &str, readonly: bool) -> Result<(), MountError> {
    let flags = if readonly {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    rustix::mount::mount(dev, target, fstype, flags, None).map_err(|e| {
        err(
            format!(
                "{} ({fstype}, {})",
                dev.display(),
                if readonly { "ro" } else { "rw" }
            ),
            target,
            e,
        )
    })
}

pub fn tmpfs(target: &Path, size: &str, mode: &str) -> Result<(), MountError> {
    let data = format!("size={size},mode={mode}");
    mount(
        "tmpfs",
        target,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        &data,
    )
}

pub fn bind(source: &Path, target: &Path) -> Result<(), MountError> {
    rustix::mount::mount_bind(source, target)
        .map_err(|e| err(format!("bind {}", source.display()), target, e))
}

pub fn move_mount(source: &Path, target: &Path) -> Result<(), MountError> {
    rustix::mount::mount_move(source, target)
        .map_err(|e| err(format!("move {}", source.display()), target, e))
}

pub fn make_private(target: &Path) -> Result<(), IoError> {
    rustix::mount::mount_change(
        target,
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .at(target, "make-rprivate")
}

pub fn unmount(target: &Path, lazy: bool) -> Result<(), IoError> {
    let flags = if lazy {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    rustix::mount::unmount(target, flags).at(target, "umount")
}
