//! Whole-disk access for growing COS_PERSISTENT: size, positioned reads and writes, sync, and
//! the two ioctls that tell the kernel (BLKPG_RESIZE_PARTITION) and ext4 (EXT4_IOC_RESIZE_FS).
//! Regular files work too (size from their length), so the GPT writes can be tested on files.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// _IO(0x12, 105)
const BLKPG: libc::c_ulong = 0x1269;
pub const BLKPG_ADD_PARTITION: i32 = 1;
pub const BLKPG_DEL_PARTITION: i32 = 2;
pub const BLKPG_RESIZE_PARTITION: i32 = 3;
/// _IOW('f', 16, __u64)
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// `struct blkpg_partition` (linux/blkpg.h).
#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: i32,
    devname: [u8; 64],
    volname: [u8; 64],
}

/// `struct blkpg_ioctl_arg` (linux/blkpg.h).
#[repr(C)]
struct BlkpgArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut BlkpgPartition,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}: {source}")]
pub struct DiskError {
    pub path: PathBuf,
    pub what: String,
    pub source: std::io::Error,
}

fn err(path: &Path, what: impl Into<String>, source: std::io::Error) -> DiskError {
    DiskError {
        path: path.to_path_buf(),
        what: what.into(),
        source,
    }
}

/// An open disk (or image file).
#[derive(Debug)]
pub struct Disk {
    pub path: PathBuf,
    file: File,
}

impl Disk {
    /// Opens read-only unless `write`: a boot with nothing to grow never opens the disk for
    /// writing (a write-protected card must still boot).
    pub fn open(path: &Path, write: bool) -> Result<Disk, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| err(path, if write { "open rw" } else { "open" }, e))?;
        Ok(Disk {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn size_bytes(&self) -> Result<u64, DiskError> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| err(&self.path, "stat", e))?;
        if !meta.file_type().is_block_device() {
            return Ok(meta.len());
        }
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which outlives the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(err(
                &self.path,
                "BLKGETSIZE64",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(size)
    }

    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| err(&self.path, format!("write at byte {offset}"), e))
    }

    /// fsync: the page cache written back and the device's cache flushed, so every write
    /// before it is on the medium before any write after it.
    pub fn sync(&self) -> Result<(), DiskError> {
        self.file
            .sync_all()
            .map_err(|e| err(&self.path, "fsync", e))
    }

    /// Tells the kernel partition `number` now spans `length` bytes from byte `start` (the
    /// start must be the one it has): BLKPG_RESIZE_PARTITION, as `resizepart` does.
    pub fn resize_partition(&self, number: u32, start: u64, length: u64) -> Result<(), DiskError> {
        self.blkpg(BLKPG_RESIZE_PARTITION, number, start, length)
            .map_err(|e| err(&self.path, format!("BLKPG_RESIZE_PARTITION {number}"), e))
    }

    /// Adds partition `number` (`length` bytes from byte `start`) as `partx -a` does, for
    /// kernels without a GPT parser (this project's test hosts). One the kernel already has
    /// (EBUSY) is left as it is.
    pub fn add_partition(&self, number: u32, start: u64, length: u64) -> Result<(), DiskError> {
        match self.blkpg(BLKPG_ADD_PARTITION, number, start, length) {
            Err(e) if e.raw_os_error() != Some(libc::EBUSY) => {
                Err(err(&self.path, format!("BLKPG_ADD_PARTITION {number}"), e))
            }
            _ => Ok(()),
        }
    }

    fn blkpg(&self, op: i32, number: u32, start: u64, length: u64) -> std::io::Result<()> {
        blkpg(&self.file, op, number, start, length)
    }
}

/// One BLKPG call on the open whole disk `file`: `op` is one of the `BLKPG_*_PARTITION`
/// constants, for partition `number` of `length` bytes from byte `start` (ignored by delete).
/// The agent's installer adds and removes partitions with it too.
pub fn blkpg(file: &File, op: i32, number: u32, start: u64, length: u64) -> std::io::Result<()> {
    let invalid = |_| std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let mut p = BlkpgPartition {
        start: i64::try_from(start).map_err(invalid)?,
        length: i64::try_from(length).map_err(invalid)?,
        pno: i32::try_from(number).map_err(invalid)?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: &mut p,
    };
    // SAFETY: BLKPG reads a blkpg_ioctl_arg whose data points at a blkpg_partition of
    // datalen bytes; both live until the call returns.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKPG, &mut arg as *mut BlkpgArg) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Grows the mounted ext4 at `mountpoint` to `blocks` filesystem blocks, online:
/// EXT4_IOC_RESIZE_FS on its root directory (what resize2fs does for a mounted filesystem).
pub fn ext4_resize(mountpoint: &Path, blocks: u64) -> Result<(), DiskError> {
    let dir = File::open(mountpoint).map_err(|e| err(mountpoint, "open", e))?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) };
    if rc != 0 {
        return Err(err(
            mountpoint,
            format!("EXT4_IOC_RESIZE_FS to {blocks} blocks"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_and_structs_match_the_kernel_abi() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr.
        let ioc = |dir: u64, ty: u8, nr: u64, size: usize| {
            (dir << 30 | (size as u64) << 16 | u64::from(ty) << 8 | nr) as libc::c_ulong
        };
        assert_eq!(BLKGETSIZE64, ioc(2, 0x12, 114, 8));
        assert_eq!(BLKPG, ioc(0, 0x12, 105, 0));
        assert_eq!(EXT4_IOC_RESIZE_FS, ioc(1, b'f', 16, 8));
        assert_eq!(std::mem::size_of::<BlkpgPartition>(), 152);
        assert_eq!(std::mem::size_of::<BlkpgArg>(), 24);
    }

    #[test]
    fn a_file_reads_writes_and_knows_its_size() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("disk.img");
        std::fs::write(&p, vec![0u8; 4096]).expect("write");
        let d = Disk::open(&p, true).expect("open");
        assert_eq!(d.size_bytes().expect("size"), 4096);
        d.write_at(512, b"EFI PART").expect("write");
        d.sync().expect("sync");
        assert_eq!(d.read_at(512, 8).expect("read"), b"EFI PART");
        assert!(d.read_at(4090, 8).is_err());
        let ro = Disk::open(&p, false).expect("open ro");
        let e = ro.write_at(0, b"x").expect_err("read-only");
        assert!(e.to_string().contains("disk.img"), "{e}");
        let e = Disk::open(&tmp.path().join("missing"), false).expect_err("missing");
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
