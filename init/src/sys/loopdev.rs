//! Loop devices through the kernel's ioctls directly (every loopdev crate needs libclang).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

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
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(LoopError::GetFree {
                ctl: ctl_path,
                source: std::io::Error::last_os_error(),
            });
        }
        let path = dev_root.join(format!("loop{n}"));
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| LoopError::Open {
                path: path.clone(),
                source,
            })?;
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR | if readonly { LO_FLAGS_READ_ONLY } else { 0 },
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        let name = file.as_os_str().as_encoded_bytes();
        let n = name.len().min(63);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        let cfg = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // SAFETY: cfg is a fully initialised loop_config that outlives the call.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if rc == 0 {
            return Ok(LoopDevice { path, _dev: dev });
        }
        let err = std::io::Error::last_os_error();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_struct_matches_kernel_abi() {
        // include/uapi/linux/loop.h: loop_info64 is 232 bytes, loop_config 304.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
