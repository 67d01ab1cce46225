//! Whole-disk access for growing COS_PERSISTENT: size, positioned reads and writes, sync, and
//! the two ioctls that tell the kernel (BLKPG_RESIZE_PARTITION) and ext4 (EXT4_IOC_RESIZE_FS).
//! Regular files work too (size from their length), so the GPT writes can be tested on files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};

use super::blk::{self, BLKPG_ADD_PARTITION, BLKPG_RESIZE_PARTITION};

/// An open disk (or image file).
#[derive(Debug)]
pub struct Disk {
    pub path: PathBuf,
    file: File,
}

impl Disk {
    /// Opens read-only unless `write`: a boot with nothing to grow never opens the disk for
    /// writing (a write-protected card must still boot).
    pub fn open(path: &Path, write: bool) -> Result<Disk, IoError> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .at(path, if write { "open rw" } else { "open" })?;
        Ok(Disk {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn size_bytes(&self) -> Result<u64, IoError> {
        let meta = self.file.metadata().at(&self.path, "stat")?;
        if !meta.file_type().is_block_device() {
            return Ok(meta.len());
        }
        blk::size_bytes(&self.file).at(&self.path, "BLKGETSIZE64")
    }

    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.file
            .write_all_at(data, offset)
            .at(&self.path, format!("write at byte {offset}"))
    }

    /// fsync: the page cache written back and the device's cache flushed, so every write
    /// before it is on the medium before any write after it.
    pub fn sync(&self) -> Result<(), IoError> {
        self.file.sync_all().at(&self.path, "fsync")
    }

    /// Tells the kernel partition `number` now spans `length` bytes from byte `start` (the
    /// start must be the one it has): BLKPG_RESIZE_PARTITION, as `resizepart` does.
    pub fn resize_partition(&self, number: u32, start: u64, length: u64) -> Result<(), IoError> {
        self.blkpg(BLKPG_RESIZE_PARTITION, number, start, length)
            .at(&self.path, format!("BLKPG_RESIZE_PARTITION {number}"))
    }

    /// Adds partition `number` (`length` bytes from byte `start`) as `partx -a` does, for
    /// kernels without a GPT parser (this project's test hosts). One the kernel already has
    /// (EBUSY) is left as it is.
    pub fn add_partition(&self, number: u32, start: u64, length: u64) -> Result<(), IoError> {
        match self.blkpg(BLKPG_ADD_PARTITION, number, start, length) {
            Err(e) if e.raw_os_error() != Some(libc::EBUSY) => Err(IoError::new(
                &self.path,
                format!("BLKPG_ADD_PARTITION {number}"),
                e,
            )),
            _ => Ok(()),
        }
    }

    fn blkpg(&self, op: i32, number: u32, start: u64, length: u64) -> std::io::Result<()> {
        blk::blkpg(&self.file, op, number, start, length)
    }
}

/// Grows the mounted ext4 at `mountpoint` to `blocks` filesystem blocks, online:
/// EXT4_IOC_RESIZE_FS on its root directory (what resize2fs does for a mounted filesystem).
pub fn ext4_resize(mountpoint: &Path, blocks: u64) -> Result<(), IoError> {
    let dir = File::open(mountpoint).at(mountpoint, "open")?;
    blk::ext4_resize(&dir, blocks).at(mountpoint, format!("EXT4_IOC_RESIZE_FS to {blocks} blocks"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
