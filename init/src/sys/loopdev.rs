//! Loop devices through the kernel's ioctls directly (every loopdev crate needs libclang).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::blk::{self, LO_FLAGS_AUTOCLEAR, LO_FLAGS_READ_ONLY};

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no free loop device from {ctl}: {source}")]
    GetFree {
        ctl: PathBuf,
        source: std::io::Error,
    },
    #[error("attaching {file} to {dev}: {source}")]
    Configure {
        file: PathBuf,
        dev: PathBuf,
        source: std::io::Error,
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
        .map_err(|source| LoopError::Open {
            path: ctl_path.clone(),
            source,
        })?;
    let backing = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(file)
        .map_err(|source| LoopError::Open {
            path: file.to_path_buf(),
            source,
        })?;
    let mut last = None;
    // Another process can take the free device between GET_FREE and CONFIGURE: retry.
    for _ in 0..8 {
        let n = blk::loop_get_free(&ctl).map_err(|source| LoopError::GetFree {
            ctl: ctl_path.clone(),
            source,
        })?;
        let path = dev_root.join(format!("loop{n}"));
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| LoopError::Open {
                path: path.clone(),
                source,
            })?;
        let flags = LO_FLAGS_AUTOCLEAR | if readonly { LO_FLAGS_READ_ONLY } else { 0 };
        let name = file.as_os_str().as_encoded_bytes();
        let Err(err) = blk::loop_configure(&dev, &backing, flags, name) else {
            return Ok(LoopDevice { path, _dev: dev });
        };
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(LoopError::Configure {
                file: file.to_path_buf(),
                dev: path,
                source: err,
            });
        }
        last = Some((path, err));
    }
    let (dev, source) = last.unwrap_or_else(|| {
        (
            dev_root.join("loop?"),
            std::io::Error::from_raw_os_error(libc::EBUSY),
        )
    });
    Err(LoopError::Configure {
        file: file.to_path_buf(),
        dev,
        source,
    })
}
