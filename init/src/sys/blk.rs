//! The block-device and filesystem ioctls of the workspace, as safe functions: loop devices
//! (LOOP_CTL_GET_FREE, LOOP_CONFIGURE), a device's size (BLKGETSIZE64), its partitions
//! (BLKPG, BLKRRPART), ext4 (online resize, journal checkpoint) and freeze/thaw.
//!
//! Each `unsafe` call here pairs an opcode with the argument type the kernel reads or writes
//! for it. The opcodes and the loop structs are the kernel's own (linux-raw-sys, generated
//! from the uapi headers of every architecture); `struct blkpg_*` is written out here because
//! linux-raw-sys does not carry it.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use linux_raw_sys::ioctl as uapi;
use linux_raw_sys::loop_device::{self as lo, loop_config, loop_info64};
use rustix::ioctl::{Getter, NoArg, Opcode, Setter, Updater, ioctl};

// Opcode is the kernel's `unsigned int` on the raw-syscall backend; the casts keep the build
// working on rustix's libc backend too.
const BLKGETSIZE64: Opcode = uapi::BLKGETSIZE64 as Opcode;
const BLKPG: Opcode = uapi::BLKPG as Opcode;
const BLKRRPART: Opcode = uapi::BLKRRPART as Opcode;
const EXT4_IOC_RESIZE_FS: Opcode = uapi::EXT4_IOC_RESIZE_FS as Opcode;
const EXT4_IOC_CHECKPOINT: Opcode = uapi::EXT4_IOC_CHECKPOINT as Opcode;
const FIFREEZE: Opcode = uapi::FIFREEZE as Opcode;
const FITHAW: Opcode = uapi::FITHAW as Opcode;
const LOOP_CONFIGURE: Opcode = lo::LOOP_CONFIGURE as Opcode;
const LOOP_CTL_GET_FREE: Opcode = lo::LOOP_CTL_GET_FREE as Opcode;

pub const BLKPG_ADD_PARTITION: i32 = 1;
pub const BLKPG_DEL_PARTITION: i32 = 2;
pub const BLKPG_RESIZE_PARTITION: i32 = 3;

/// `LO_FLAGS_READ_ONLY` for [`loop_configure`].
pub const LO_FLAGS_READ_ONLY: u32 = lo::LO_FLAGS_READ_ONLY as u32;
/// `LO_FLAGS_AUTOCLEAR` for [`loop_configure`]: the device detaches when its last user
/// closes it.
pub const LO_FLAGS_AUTOCLEAR: u32 = lo::LO_FLAGS_AUTOCLEAR as u32;

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

/// The size in bytes of the block device open as `dev` (BLKGETSIZE64).
pub fn size_bytes(dev: impl AsFd) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 (declared _IOR(0x12, 114, size_t)) writes one u64 (put_u64 in
    // block/ioctl.c, whatever size_t is) into the Getter's own u64 buffer.
    Ok(unsafe { ioctl(dev, Getter::<BLKGETSIZE64, u64>::new()) }?)
}

/// One BLKPG call on the open whole disk `dev`: `op` is one of the `BLKPG_*_PARTITION`
/// constants, for partition `number` of `length` bytes from byte `start` (ignored by delete).
pub fn blkpg(dev: impl AsFd, op: i32, number: u32, start: u64, length: u64) -> io::Result<()> {
    let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let mut p = BlkpgPartition {
        start: i64::try_from(start).map_err(invalid)?,
        length: i64::try_from(length).map_err(invalid)?,
        pno: i32::try_from(number).map_err(invalid)?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: &mut p,
    };
    // SAFETY: BLKPG reads a blkpg_ioctl_arg (the Setter's copy of `arg`) whose `data` points
    // at `p`, a blkpg_partition of `datalen` bytes that lives until the call returns. Every
    // op reads that same struct; one the kernel does not know is EINVAL.
    Ok(unsafe { ioctl(dev, Setter::<BLKPG, BlkpgArg>::new(arg)) }?)
}

/// BLKRRPART: the kernel re-reads the partition table of the whole disk `dev`. EINVAL when
/// the device does not scan partitions at all.
pub fn reread_partitions(dev: impl AsFd) -> io::Result<()> {
    // SAFETY: BLKRRPART is _IO(0x12, 95): it takes no argument.
    Ok(unsafe { ioctl(dev, NoArg::<BLKRRPART>::new()) }?)
}

/// EXT4_IOC_RESIZE_FS on `dir`, a directory of a mounted ext4 (its root): grows the
/// filesystem online to `blocks` filesystem blocks, as resize2fs does.
pub fn ext4_resize(dir: impl AsFd, blocks: u64) -> io::Result<()> {
    // SAFETY: EXT4_IOC_RESIZE_FS is _IOW('f', 16, __u64) and reads one u64, the Setter's own
    // copy of `blocks`, during the call.
    Ok(unsafe { ioctl(dir, Setter::<EXT4_IOC_RESIZE_FS, u64>::new(blocks)) }?)
}

/// EXT4_IOC_CHECKPOINT with no flags on a file of a mounted ext4: its journal is written back
/// to the home locations (no discard or zeroing). Linux ≥ 5.13; ENODEV without a journal.
pub fn ext4_checkpoint(file: impl AsFd) -> io::Result<()> {
    // SAFETY: EXT4_IOC_CHECKPOINT is _IOW('f', 43, __u32) and reads one u32 of flags, the
    // Setter's own copy, during the call.
    Ok(unsafe { ioctl(file, Setter::<EXT4_IOC_CHECKPOINT, u32>::new(0)) }?)
}

/// FIFREEZE on a file of a mounted filesystem: flushes it and blocks every writer until
/// [`thaw`].
pub fn freeze(file: impl AsFd) -> io::Result<()> {
    freeze_or_thaw(file, false)
}

/// FITHAW: undoes [`freeze`].
pub fn thaw(file: impl AsFd) -> io::Result<()> {
    freeze_or_thaw(file, true)
}

fn freeze_or_thaw(file: impl AsFd, thaw: bool) -> io::Result<()> {
    // The kernel ignores the int argument; it is passed as the headers declare it.
    let mut unused: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW are _IOWR('X', 119/120, int); `unused` is an int that
    // outlives the call.
    Ok(unsafe {
        if thaw {
            ioctl(file, Updater::<FITHAW, libc::c_int>::new(&mut unused))
        } else {
            ioctl(file, Updater::<FIFREEZE, libc::c_int>::new(&mut unused))
        }
    }?)
}

/// LOOP_CTL_GET_FREE on /dev/loop-control: the number of a free loop device (created if
/// need be).
pub fn loop_get_free(ctl: impl AsFd) -> io::Result<u32> {
    // The device number is the ioctl's return value, which rustix's ioctl patterns drop.
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number or -1 with errno.
    let n = unsafe { libc::ioctl(ctl.as_fd().as_raw_fd(), LOOP_CTL_GET_FREE as _) };
    u32::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// LOOP_CONFIGURE: attaches `backing` to the free loop device `dev` with `flags`
/// (`LO_FLAGS_*`), recording `file_name` (cut to 63 bytes) as its backing file's name.
/// EBUSY when another process took the device first.
pub fn loop_configure(
    dev: impl AsFd,
    backing: impl AsFd,
    flags: u32,
    file_name: &[u8],
) -> io::Result<()> {
    let mut info = loop_info64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: flags,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    let n = file_name.len().min(info.lo_file_name.len() - 1);
    info.lo_file_name[..n].copy_from_slice(&file_name[..n]);
    let cfg = loop_config {
        fd: u32::try_from(backing.as_fd().as_raw_fd())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        block_size: 0,
        info,
        __reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one loop_config (the kernel's layout from linux-raw-sys),
    // the Setter's own fully initialised copy of `cfg`, during the call; `backing` stays open
    // until it returns (the kernel takes its own reference to the file).
    Ok(unsafe { ioctl(dev, Setter::<LOOP_CONFIGURE, loop_config>::new(cfg)) }?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_and_structs_match_the_kernel_abi() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr.
        let ioc = |dir: u64, ty: u8, nr: u64, size: usize| {
            (dir << 30 | (size as u64) << 16 | u64::from(ty) << 8 | nr) as Opcode
        };
        assert_eq!(BLKGETSIZE64, ioc(2, 0x12, 114, 8));
        assert_eq!(BLKPG, ioc(0, 0x12, 105, 0));
        assert_eq!(EXT4_IOC_RESIZE_FS, ioc(1, b'f', 16, 8));
        assert_eq!(std::mem::size_of::<BlkpgPartition>(), 152);
        assert_eq!(std::mem::size_of::<BlkpgArg>(), 24);
    }

    #[test]
    fn config_struct_matches_kernel_abi() {
        // include/uapi/linux/loop.h: loop_info64 is 232 bytes, loop_config 304.
        assert_eq!(std::mem::size_of::<loop_info64>(), 232);
        assert_eq!(std::mem::size_of::<loop_config>(), 304);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        let ioc = |dir: u64, ty: u8, nr: u64, size: usize| {
            (dir << 30 | (size as u64) << 16 | u64::from(ty) << 8 | nr) as Opcode
        };
        assert_eq!(EXT4_IOC_CHECKPOINT, ioc(1, b'f', 43, 4));
        assert_eq!(FIFREEZE, ioc(3, b'X', 119, 4));
        assert_eq!(FITHAW, ioc(3, b'X', 120, 4));
        // The values linux/ext4.h and linux/fs.h expand to on x86_64.
        assert_eq!(
            [EXT4_IOC_CHECKPOINT, FIFREEZE, FITHAW],
            [0x4004_662b, 0xc004_5877, 0xc004_5878]
        );
    }
}
