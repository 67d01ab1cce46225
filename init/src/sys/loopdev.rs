//! Loop devices through the kernel's ioctls directly (every loopdev crate needs libclang).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};

use super::blk::{self, LO_FLAGS_AUTOCLEAR, LO_FLAGS_READ_ONLY};

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// Opening the control device, the backing file or a loop device, or no free device.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The backing file and the loop device it was to be attached to.
    #[error("attaching {file} to {dev}: {err}")]
    Configure {
        file: PathBuf,
        dev: PathBuf,
        err: std::io::Error,
    },
}

/// An attached loop device. AUTOCLEAR detaches it once the last user goes away, so keep this
/// alive until the filesystem on it is mounted (the mount then holds it), then drop it.
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    _dev: File,
}

pub fn attach(dev_root: &Path, file: &Path, readonly: bool) -> Result<LoopDevice, LoopError> {
    let ctl_path = dev_root.join("loop-control");
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ctl_path)
        .at(&ctl_path, "opening")?;
    let backing = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(file)
        .at(file, "opening")?;
    let mut last = None;
    // Another process can take the free device between GET_FREE and CONFIGURE: retry.
    for _ in 0..8 {
        let n = blk::loop_get_free(&ctl).at(&ctl_path, "no free loop device")?;
        let path = dev_root.join(format!("loop{n}"));
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .at(&path, "opening")?;
        let flags = LO_FLAGS_AUTOCLEAR | if readonly { LO_FLAGS_READ_ONLY } else { 0 };
        let name = file.as_os_str().as_encoded_bytes();
        let Err(err) = blk::loop_configure(&dev, &backing, flags, name) else {
            return Ok(LoopDevice { path, _dev: dev });
        };
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(LoopError::Configure {
                file: file.to_path_buf(),
                dev: path,
                err,
            });
        }
        last = Some((path, err));
    }
    let (dev, err) = last.unwrap_or_else(|| {
        (
            dev_root.join("loop?"),
            std::io::Error::from_raw_os_error(libc::EBUSY),
        )
    });
    Err(LoopError::Configure {
        file: file.to_path_buf(),
        dev,
        err,
    })
}
