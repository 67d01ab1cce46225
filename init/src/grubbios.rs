//! BIOS GRUB on a GPT disk without `grub-install`: the byte-level part shared by the test disk
//! builder (`kairos-qemu`, on an image file) and `kairos-agent install` (on a block device).
//! core.img (from `grub-mkimage`) goes into the BIOS boot partition with its blocklist patched
//! to point at itself; boot.img's code goes into the MBR, keeping the disk signature and the
//! (protective) partition table. Library-only: the init binary never links it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};

pub const SECTOR: u64 = 512;
/// Offsets in boot.img / diskboot.img (grub-core/boot/i386/pc/*.S).
pub const MBR_CODE_LEN: usize = 440;
pub const MBR_KERNEL_SECTOR: usize = 0x5c;
pub const MBR_DRIVE_CHECK: usize = 0x66;
/// The blocklist at the end of core.img's first sector (diskboot.img).
pub const BLOCKLIST: usize = 512 - 12;
const CORE_SEGMENT: u16 = 0x820;
/// GPT type GUID of a BIOS boot partition (21686148-6449-6E6F-744E-656564454649) as stored on disk.
pub const BIOS_BOOT_TYPE: [u8; 16] = *b"Hah!IdontNeedEFI";

/// What core.img needs besides [`crate::grubcfg::CFG_MODULES`] (i386-pc names): the BIOS
/// disk driver and the 16-bit Linux loader.
pub const BIOS_PLATFORM_MODULES: &[&str] = &["biosdisk", "linux16"];

/// The modules built into core.img, so grub.cfg works without reading any module from disk:
/// [`BIOS_PLATFORM_MODULES`] and the configs' [`crate::grubcfg::CFG_MODULES`] present as
/// `NAME.mod` in GRUB's i386-pc directory `dir`.
pub fn core_modules_in(dir: &Path) -> Vec<&'static str> {
    crate::grubcfg::modules_in(dir, &[BIOS_PLATFORM_MODULES, crate::grubcfg::CFG_MODULES])
}

#[derive(Debug, thiserror::Error)]
pub enum GrubBiosError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{}: {what}", path.display())]
    BadImage { path: PathBuf, what: String },
    #[error("{}: core.img needs {needed} sectors but the bios partition at sector {first} holds {available}", disk.display())]
    CoreTooLarge {
        disk: PathBuf,
        first: u64,
        needed: u64,
        available: u64,
    },
}

fn bad(path: &Path, what: impl Into<String>) -> GrubBiosError {
    GrubBiosError::BadImage {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn read_at(f: &mut File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, GrubBiosError> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut buf))
        .at(path, format!("reading {len} bytes at byte {offset}"))?;
    Ok(buf)
}

fn write_at(f: &mut File, path: &Path, offset: u64, data: &[u8]) -> Result<(), GrubBiosError> {
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.write_all(data))
        .at(
            path,
            format!("writing {} bytes at byte {offset}", data.len()),
        )?;
    Ok(())
}

/// Size in sectors of the BIOS boot partition starting at `first`, from the primary GPT.
pub fn bios_partition_sectors(f: &mut File, disk: &Path, first: u64) -> Result<u64, GrubBiosError> {
    let hdr = read_at(f, disk, SECTOR, SECTOR as usize)?;
    if &hdr[..8] != b"EFI PART" {
        return Err(bad(disk, "no GPT header at sector 1"));
    }
    let entries_lba = le_u64(&hdr, 72);
    let count = le_u32(&hdr, 80) as usize;
    let size = le_u32(&hdr, 84) as usize;
    if !(128..=4096).contains(&size) || count == 0 || count > 1024 {
        return Err(bad(
            disk,
            format!("implausible GPT entry table ({count} × {size} bytes)"),
        ));
    }
    let table_at = entries_lba
        .checked_mul(SECTOR)
        .ok_or_else(|| bad(disk, format!("GPT entry table at absurd LBA {entries_lba}")))?;
    let table = read_at(f, disk, table_at, count * size)?;
    for (i, e) in table.chunks_exact(size).enumerate() {
        if le_u64(e, 32) != first || e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        if e[..16] != BIOS_BOOT_TYPE {
            return Err(bad(
                disk,
                format!(
                    "partition {} at sector {first} is not of type BIOS boot (ef02)",
                    i + 1
                ),
            ));
        }
        let last = le_u64(e, 40);
        if last < first {
            return Err(bad(
                disk,
                format!("partition {} ends before it starts", i + 1),
            ));
        }
        return Ok(last - first + 1);
    }
    Err(bad(
        disk,
        format!("no GPT partition starts at sector {first}"),
    ))
}

/// Writes GRUB into the GPT disk `f` (a disk image file or a block device, named `disk` in
/// errors): `core` (core.img as grub-mkimage made it, prefix baked in) into the BIOS boot
/// partition starting at sector `first`, with its blocklist pointing there, and `boot` (boot.img)
/// into the MBR's code area, keeping the disk signature and the partition table. Fsyncs.
pub fn install(
    f: &mut File,
    disk: &Path,
    first: u64,
    boot: &[u8],
    mut core: Vec<u8>,
) -> Result<(), GrubBiosError> {
    let boot_path = Path::new("boot.img");
    if boot.len() != SECTOR as usize {
        return Err(bad(boot_path, "boot.img is not one sector"));
    }
    let core_path = Path::new("core.img");
    if core.len() < SECTOR as usize {
        return Err(bad(core_path, "grub-mkimage wrote less than one sector"));
    }
    let core_sectors = (core.len() as u64).div_ceil(SECTOR);
    // What diskboot.img expects in its last 12 bytes: grub-mkimage already put
    // the sector count there and the load segment; only the start is ours to set.
    let mkimage_len = u16::from_le_bytes([core[BLOCKLIST + 8], core[BLOCKLIST + 9]]);
    let segment = u16::from_le_bytes([core[BLOCKLIST + 10], core[BLOCKLIST + 11]]);
    if u64::from(mkimage_len) != core_sectors - 1 || segment != CORE_SEGMENT {
        return Err(bad(
            core_path,
            format!(
                "unexpected diskboot blocklist (count {mkimage_len}, segment {segment:#x}) for {core_sectors} sectors"
            ),
        ));
    }

    let available = bios_partition_sectors(f, disk, first)?;
    if core_sectors > available {
        return Err(GrubBiosError::CoreTooLarge {
            disk: disk.to_path_buf(),
            first,
            needed: core_sectors,
            available,
        });
    }

    core[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(first + 1).to_le_bytes());
    core[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&((core_sectors - 1) as u16).to_le_bytes());
    write_at(f, disk, first * SECTOR, &core)?;

    let mut mbr = read_at(f, disk, 0, SECTOR as usize)?;
    if mbr[510..] != [0x55, 0xaa] {
        return Err(bad(disk, "no protective MBR (write the GPT first)"));
    }
    // Boot code only: bytes 440.. hold the disk signature and the partition table.
    mbr[..MBR_CODE_LEN].copy_from_slice(&boot[..MBR_CODE_LEN]);
    mbr[MBR_KERNEL_SECTOR..MBR_KERNEL_SECTOR + 8].copy_from_slice(&first.to_le_bytes());
    // As grub-bios-setup does for hard disks: nop the jump that skips the
    // workaround for BIOSes passing a bogus boot drive in DL.
    if mbr[MBR_DRIVE_CHECK] == 0xeb {
        mbr[MBR_DRIVE_CHECK] = 0x90;
        mbr[MBR_DRIVE_CHECK + 1] = 0x90;
    }
    write_at(f, disk, 0, &mbr)?;
    f.sync_all().at(disk, "fsync")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal GPT: protective MBR, header at LBA 1, entries at LBA 2, one BIOS boot
    /// partition at 2048..4095 and a Linux one after it (CRCs are not checked here).
    fn fake_disk(path: &Path) -> File {
        let mut img = vec![0u8; 8 << 20];
        img[510] = 0x55;
        img[511] = 0xaa;
        img[446 + 4] = 0xee;
        let h = 512;
        img[h..h + 8].copy_from_slice(b"EFI PART");
        img[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        img[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        img[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = 1024;
        img[e..e + 16].copy_from_slice(&BIOS_BOOT_TYPE);
        img[e + 32..e + 40].copy_from_slice(&2048u64.to_le_bytes());
        img[e + 40..e + 48].copy_from_slice(&4095u64.to_le_bytes());
        let e = 1024 + 128;
        img[e..e + 16].copy_from_slice(&[0x11; 16]);
        img[e + 32..e + 40].copy_from_slice(&4096u64.to_le_bytes());
        img[e + 40..e + 48].copy_from_slice(&8191u64.to_le_bytes());
        std::fs::write(path, &img).expect("test setup");
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("test setup")
    }

    fn fake_core(sectors: usize) -> Vec<u8> {
        let mut core = vec![0x90u8; sectors * 512];
        core[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
        core[BLOCKLIST + 10..BLOCKLIST + 12].copy_from_slice(&CORE_SEGMENT.to_le_bytes());
        core
    }

    #[test]
    fn patches_mbr_and_blocklist() {
        let tmp = tempfile::tempdir().expect("test setup");
        let path = tmp.path().join("d.img");
        let mut f = fake_disk(&path);
        let before = std::fs::read(&path).expect("test setup");
        let mut boot = vec![0xaau8; 512];
        boot[MBR_DRIVE_CHECK] = 0xeb;
        install(&mut f, &path, 2048, &boot, fake_core(60)).expect("test setup");
        let after = std::fs::read(&path).expect("test setup");
        assert_eq!(after[..MBR_KERNEL_SECTOR], boot[..MBR_KERNEL_SECTOR]);
        assert_eq!(le_u64(&after, MBR_KERNEL_SECTOR), 2048);
        assert_eq!(after[MBR_DRIVE_CHECK..MBR_DRIVE_CHECK + 2], [0x90, 0x90]);
        assert_eq!(after[440..2048 * 512], before[440..2048 * 512]);
        let core = &after[2048 * 512..];
        assert_eq!(le_u64(core, BLOCKLIST), 2049);
        assert_eq!(
            u16::from_le_bytes([core[BLOCKLIST + 8], core[BLOCKLIST + 9]]),
            59
        );

        // Not a BIOS boot partition, too large a core, a bad boot.img: refused.
        let e = install(&mut f, &path, 4096, &boot, fake_core(4)).unwrap_err();
        assert!(e.to_string().contains("BIOS boot"), "{e}");
        let e = install(&mut f, &path, 2048, &boot, fake_core(3000)).unwrap_err();
        assert!(
            matches!(
                e,
                GrubBiosError::CoreTooLarge {
                    needed: 3000,
                    available: 2048,
                    ..
                }
            ),
            "{e}"
        );
        let e = install(&mut f, &path, 2048, &boot[..100], fake_core(4)).unwrap_err();
        assert!(e.to_string().contains("boot.img"), "{e}");
        let e = install(&mut f, &path, 1000, &boot, fake_core(4)).unwrap_err();
        assert!(e.to_string().contains("no GPT partition starts"), "{e}");
    }
}
