//! Filesystem type, label and UUID from superblocks, so the init finds COS_* partitions
//! without blkid or udev. Only the filesystems Kairos boots from are recognised.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use kairos_util::{IoError, IoResultExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext2,
    Ext3,
    Ext4,
    Squashfs,
    Vfat,
    Xfs,
    Iso9660,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext2 => "ext2",
            FsType::Ext3 => "ext3",
            FsType::Ext4 => "ext4",
            FsType::Squashfs => "squashfs",
            FsType::Vfat => "vfat",
            FsType::Xfs => "xfs",
            FsType::Iso9660 => "iso9660",
        }
    }

    /// The type to pass to mount(2): Debian builds ext2/ext3 support into the ext4 driver only.
    pub fn mount_type(self) -> &'static str {
        match self {
            FsType::Ext2 | FsType::Ext3 | FsType::Ext4 => "ext4",
            other => other.name(),
        }
    }

    /// The kernel module providing the filesystem.
    pub fn module(self) -> &'static str {
        module_for(self.mount_type())
    }
}

/// The kernel module providing the mount(2) type `mount_type`: `isofs` for iso9660, the
/// type's own name for the others this crate mounts (ext4, vfat, xfs, squashfs, overlay).
pub fn module_for(mount_type: &str) -> &str {
    match mount_type {
        "iso9660" => "isofs",
        other => other,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    pub fstype: FsType,
    pub label: Option<String>,
    pub uuid: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Enough for every probe: the iso9660 volume descriptors start at 32768.
pub const PROBE_LEN: usize = 64 * 1024;

fn bytes<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    buf.get(off..off.checked_add(N)?)?.try_into().ok()
}

fn le16(buf: &[u8], off: usize) -> Option<u16> {
    bytes(buf, off).map(u16::from_le_bytes)
}

fn le32(buf: &[u8], off: usize) -> Option<u32> {
    bytes(buf, off).map(u32::from_le_bytes)
}

fn be32(buf: &[u8], off: usize) -> Option<u32> {
    bytes(buf, off).map(u32::from_be_bytes)
}

/// A label field: cut at the first NUL, trailing `pad` bytes dropped; empty or non-UTF-8 is None.
fn label_field(raw: &[u8], pad: u8) -> Option<String> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let raw = raw.get(..end)?;
    let len = raw.iter().rposition(|&b| b != pad).map_or(0, |i| i + 1);
    let text = std::str::from_utf8(raw.get(..len)?).ok()?;
    (!text.is_empty()).then(|| text.to_string())
}

/// 16 raw bytes as 8-4-4-4-12 lower-case hex; all zeros means "no UUID".
fn uuid_field(raw: &[u8; 16]) -> Option<String> {
    if raw.iter().all(|&b| b == 0) {
        return None;
    }
    let mut out = String::with_capacity(36);
    for (i, b) in raw.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{b:02x}"));
    }
    Some(out)
}

const EXT_SB: usize = 1024;
const EXT_COMPAT_HAS_JOURNAL: u32 = 0x4;
const EXT_INCOMPAT_JOURNAL_DEV: u32 = 0x8;
/// What ext2/ext3 understand (filetype, recover, meta_bg); anything else needs ext4.
const EXT_INCOMPAT_EXT3: u32 = 0x2 | 0x4 | 0x10;
/// sparse_super, large_file, btree_dir; anything else (huge_file, gdt_csum, metadata_csum...)
/// needs ext4.
const EXT_RO_COMPAT_EXT3: u32 = 0x1 | 0x2 | 0x4;

fn probe_ext(buf: &[u8]) -> Option<FsInfo> {
    if le16(buf, EXT_SB + 56)? != 0xEF53 {
        return None;
    }
    // Block size is 1024 << s_log_block_size, at most 64 KiB.
    if le32(buf, EXT_SB + 24)? > 6 {
        return None;
    }
    let compat = le32(buf, EXT_SB + 0x5C)?;
    let incompat = le32(buf, EXT_SB + 0x60)?;
    let ro_compat = le32(buf, EXT_SB + 0x64)?;
    // An external journal carries the magic but is no mountable filesystem.
    if incompat & EXT_INCOMPAT_JOURNAL_DEV != 0 {
        return None;
    }
    let fstype = if incompat & !EXT_INCOMPAT_EXT3 != 0 || ro_compat & !EXT_RO_COMPAT_EXT3 != 0 {
        FsType::Ext4
    } else if compat & EXT_COMPAT_HAS_JOURNAL != 0 {
        FsType::Ext3
    } else {
        FsType::Ext2
    };
    Some(FsInfo {
        fstype,
        label: label_field(&bytes::<16>(buf, EXT_SB + 120)?, 0),
        uuid: uuid_field(&bytes(buf, EXT_SB + 104)?),
    })
}

fn probe_squashfs(buf: &[u8]) -> Option<FsInfo> {
    // Little-endian "hsqs"; version 4 is the only one Linux still mounts.
    if buf.get(..4)? != b"hsqs" || le16(buf, 28)? != 4 {
        return None;
    }
    Some(FsInfo {
        fstype: FsType::Squashfs,
        label: None,
        uuid: None,
    })
}

fn probe_xfs(buf: &[u8]) -> Option<FsInfo> {
    if buf.get(..4)? != b"XFSB" {
        return None;
    }
    let block = be32(buf, 4)?;
    if !(512..=65536).contains(&block) || !block.is_power_of_two() {
        return None;
    }
    Some(FsInfo {
        fstype: FsType::Xfs,
        label: label_field(&bytes::<12>(buf, 108)?, 0),
        uuid: uuid_field(&bytes(buf, 32)?),
    })
}

fn probe_vfat(buf: &[u8]) -> Option<FsInfo> {
    // 0x55AA alone also marks every MBR, so the BPB must look sane and name itself FAT.
    if bytes::<2>(buf, 510)? != [0x55, 0xAA] || !matches!(buf.first()?, 0xEB | 0xE9) {
        return None;
    }
    let sector = le16(buf, 0x0B)?;
    let per_cluster = *buf.get(0x0D)?;
    let reserved = le16(buf, 0x0E)?;
    let fats = *buf.get(0x10)?;
    let media = *buf.get(0x15)?;
    let sane = (512..=4096).contains(&sector)
        && sector.is_power_of_two()
        && per_cluster.is_power_of_two()
        && reserved != 0
        && (1..=2).contains(&fats)
        && (media == 0xF0 || media >= 0xF8);
    if !sane {
        return None;
    }
    // FAT32 has no 16-bit FAT size and keeps its extended BPB further in.
    let fat32 = le16(buf, 0x16)? == 0 && le32(buf, 0x24)? != 0;
    let (ext, typ) = if fat32 {
        (0x42, "FAT32")
    } else {
        (0x26, "FAT")
    };
    let boot_sig = *buf.get(ext)?;
    if boot_sig != 0x29 || !buf.get(ext + 16..)?.starts_with(typ.as_bytes()) {
        return None;
    }
    let serial = le32(buf, ext + 1)?;
    let label = label_field(&bytes::<11>(buf, ext + 5)?, b' ').filter(|l| l != "NO NAME");
    Some(FsInfo {
        fstype: FsType::Vfat,
        label,
        uuid: Some(format!("{:04X}-{:04X}", serial >> 16, serial & 0xFFFF)),
    })
}

const ISO_SECTOR: usize = 2048;

fn probe_iso9660(buf: &[u8]) -> Option<FsInfo> {
    // Volume descriptors start at sector 16; the primary one is usually, not always, first.
    let mut off = 16 * ISO_SECTOR;
    loop {
        let desc = buf.get(off..off.checked_add(ISO_SECTOR)?)?;
        if desc.get(1..6)? != b"CD001" {
            return None;
        }
        match desc.first()? {
            1 => break,
            255 => return None,
            _ => off += ISO_SECTOR,
        }
    }
    let pvd = buf.get(off..)?;
    Some(FsInfo {
        fstype: FsType::Iso9660,
        label: label_field(pvd.get(40..72)?, b' '),
        uuid: iso_uuid(pvd.get(813..829)?),
    })
}

/// blkid's iso9660 UUID: the volume creation time "YYYYMMDDHHMMSScc" as
/// "YYYY-MM-DD-HH-MM-SS-cc" (what grub's `search --fs-uuid` also uses).
fn iso_uuid(date: &[u8]) -> Option<String> {
    if !date.iter().all(u8::is_ascii_digit) || date.iter().all(|&b| b == b'0') {
        return None;
    }
    let mut out = String::with_capacity(22);
    for (i, &b) in date.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10 | 12 | 14) {
            out.push('-');
        }
        out.push(char::from(b));
    }
    Some(out)
}

/// Identifies the filesystem whose first bytes are `buf` (may be shorter than PROBE_LEN).
pub fn probe_bytes(buf: &[u8]) -> Option<FsInfo> {
    probe_squashfs(buf)
        .or_else(|| probe_xfs(buf))
        .or_else(|| probe_ext(buf))
        .or_else(|| probe_iso9660(buf))
        .or_else(|| probe_vfat(buf))
}

/// Reads up to PROBE_LEN bytes of a device or image file and probes them.
pub fn probe_path(path: &Path) -> Result<Option<FsInfo>, ProbeError> {
    let file = File::open(path).at(path, "opening to probe")?;
    let mut buf = Vec::with_capacity(PROBE_LEN);
    // take + read_to_end retries short reads and EINTR, and stops at EOF for small files.
    file.take(PROBE_LEN as u64)
        .read_to_end(&mut buf)
        .at(path, "probing")?;
    Ok(probe_bytes(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs a mkfs-like tool; a test without it fails with the reason (`kairos-qemu setup`
    /// installs them all).
    fn run(tool: &str, args: &[&str]) {
        let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
            panic!("{tool} not available ({e}): `kairos-qemu setup` installs it")
        });
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Cross-checks against util-linux blkid.
    fn check_blkid(path: &Path, info: &FsInfo) {
        let out = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("blkid (util-linux) not available: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        assert_eq!(field("TYPE").as_deref(), Some(info.fstype.name()), "{text}");
        assert_eq!(field("LABEL"), info.label, "{text}");
        assert_eq!(field("UUID"), info.uuid, "{text}");
    }

    fn probe_made(path: &Path) -> FsInfo {
        let info = probe_path(path)
            .expect("test setup")
            .expect("filesystem recognised");
        check_blkid(path, &info);
        // Every prefix of a real image probes without panicking.
        let whole = std::fs::read(path).expect("test setup");
        let head = &whole[..whole.len().min(PROBE_LEN)];
        for len in (0..head.len())
            .step_by(61)
            .chain([1024, 1080, 1082, 1136, 1160, 32769, 32808])
        {
            let _ = probe_bytes(&head[..len.min(head.len())]);
        }
        info
    }

    const UUID: &str = "6c1a7e3b-8f1d-4b52-9d0e-2a4f5c6b7d8e";

    #[test]
    fn ext_family() {
        let dir = tempfile::tempdir().expect("test setup");
        for (tool, label, want) in [
            ("mkfs.ext4", "COS_STATE", FsType::Ext4),
            ("mkfs.ext3", "COS_OEM", FsType::Ext3),
            ("mkfs.ext2", "COS_ACTIVE", FsType::Ext2),
        ] {
            let f = dir.path().join(format!("{tool}.img"));
            let f_s = f.to_str().expect("test setup");
            run(tool, &["-q", "-F", "-L", label, "-U", UUID, f_s, "4M"]);
            let info = probe_made(&f);
            assert_eq!(info.fstype, want, "{tool}");
            assert_eq!(info.label.as_deref(), Some(label));
            assert_eq!(info.uuid.as_deref(), Some(UUID));
            assert_eq!(info.fstype.mount_type(), "ext4");
            assert_eq!(info.fstype.module(), "ext4");
        }
        // No label, and a 16-byte label that fills the field.
        let f = dir.path().join("nolabel.img");
        run(
            "mkfs.ext4",
            &["-q", "-F", f.to_str().expect("test setup"), "4M"],
        );
        let info = probe_made(&f);
        assert_eq!(info.label, None);
        assert_eq!(info.uuid.as_ref().map(String::len), Some(36));
        let f = dir.path().join("long.img");
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                "ABCDEFGHIJKLMNOP",
                f.to_str().expect("test setup"),
                "4M",
            ],
        );
        assert_eq!(probe_made(&f).label.as_deref(), Some("ABCDEFGHIJKLMNOP"));
    }

    #[test]
    fn ext_features_decide_the_variant() {
        let mut sb = vec![0u8; 2048];
        sb[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[1024 + 120..1024 + 123].copy_from_slice(b"X\xffY");
        let set = |sb: &mut Vec<u8>, off: usize, v: u32| {
            sb[1024 + off..1024 + off + 4].copy_from_slice(&v.to_le_bytes())
        };
        let info = probe_bytes(&sb).expect("test setup");
        assert_eq!(
            (info.fstype, info.label, info.uuid),
            (FsType::Ext2, None, None)
        );
        set(&mut sb, 0x5C, 0x4);
        assert_eq!(probe_bytes(&sb).expect("test setup").fstype, FsType::Ext3);
        set(&mut sb, 0x60, 0x40); // extents
        assert_eq!(probe_bytes(&sb).expect("test setup").fstype, FsType::Ext4);
        set(&mut sb, 0x60, 0x2);
        set(&mut sb, 0x64, 0x400); // metadata_csum
        assert_eq!(probe_bytes(&sb).expect("test setup").fstype, FsType::Ext4);
        set(&mut sb, 0x64, 0);
        set(&mut sb, 0x60, 0x8); // external journal device
        assert_eq!(probe_bytes(&sb), None);
        // Truncated inside the superblock.
        assert_eq!(probe_bytes(&sb[..1100]), None);
    }

    #[test]
    fn vfat_fat16_and_fat32() {
        let dir = tempfile::tempdir().expect("test setup");
        let f16 = dir.path().join("fat16.img");
        run(
            "mkfs.vfat",
            &[
                "-n",
                "COS_GRUB",
                "-i",
                "1234ABCD",
                "-C",
                f16.to_str().expect("test setup"),
                "4096",
            ],
        );
        let info = probe_made(&f16);
        assert_eq!(info.fstype, FsType::Vfat);
        assert_eq!(info.label.as_deref(), Some("COS_GRUB"));
        assert_eq!(info.uuid.as_deref(), Some("1234-ABCD"));
        assert_eq!(
            (info.fstype.mount_type(), info.fstype.module()),
            ("vfat", "vfat")
        );

        let f32 = dir.path().join("fat32.img");
        run(
            "mkfs.vfat",
            &[
                "-F",
                "32",
                "-n",
                "EFI",
                "-i",
                "0000BEEF",
                "-C",
                f32.to_str().expect("test setup"),
                "65536",
            ],
        );
        let info = probe_made(&f32);
        assert_eq!(info.fstype, FsType::Vfat);
        assert_eq!(info.label.as_deref(), Some("EFI"));
        assert_eq!(info.uuid.as_deref(), Some("0000-BEEF"));

        let plain = dir.path().join("nolabel.img");
        run(
            "mkfs.vfat",
            &["-C", plain.to_str().expect("test setup"), "4096"],
        );
        assert_eq!(probe_made(&plain).label, None);

        let lower = dir.path().join("lower.img");
        run(
            "mkfs.vfat",
            &[
                "-n",
                "cos_low",
                "-C",
                lower.to_str().expect("test setup"),
                "4096",
            ],
        );
        let label = probe_made(&lower).label.expect("test setup");
        assert!(label.eq_ignore_ascii_case("cos_low"), "{label}");
    }

    #[test]
    fn partition_table_is_not_vfat() {
        let dir = tempfile::tempdir().expect("test setup");
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk)
            .expect("test setup")
            .set_len(8 << 20)
            .expect("test setup");
        run(
            "sgdisk",
            &["-n1:0:+1M", "-c1:efi", disk.to_str().expect("test setup")],
        );
        assert_eq!(probe_path(&disk).expect("test setup"), None);
        // An MBR with boot code and 0x55AA but no BPB.
        let mut mbr = vec![0u8; 4096];
        mbr[0..3].copy_from_slice(&[0xEB, 0x63, 0x90]);
        mbr[510..512].copy_from_slice(&[0x55, 0xAA]);
        assert_eq!(probe_bytes(&mbr), None);
    }

    #[test]
    fn xfs() {
        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("xfs.img");
        // Sparse: mkfs.xfs wants at least 300 MiB.
        std::fs::File::create(&f)
            .expect("test setup")
            .set_len(320 << 20)
            .expect("test setup");
        run(
            "mkfs.xfs",
            &[
                "-q",
                "-f",
                "-L",
                "COS_X",
                "-m",
                &format!("uuid={UUID}"),
                f.to_str().expect("test setup"),
            ],
        );
        let info = probe_made(&f);
        assert_eq!(info.fstype, FsType::Xfs);
        assert_eq!(info.label.as_deref(), Some("COS_X"));
        assert_eq!(info.uuid.as_deref(), Some(UUID));
        assert_eq!(info.fstype.module(), "xfs");
    }

    #[test]
    fn squashfs() {
        let dir = tempfile::tempdir().expect("test setup");
        let src = dir.path().join("root");
        std::fs::create_dir_all(src.join("etc")).expect("test setup");
        std::fs::write(src.join("etc/os-release"), "ID=kairos\n").expect("test setup");
        let f = dir.path().join("r.squashfs");
        run(
            "mksquashfs",
            &[
                src.to_str().expect("test setup"),
                f.to_str().expect("test setup"),
                "-quiet",
                "-noappend",
            ],
        );
        let info = probe_made(&f);
        assert_eq!(
            info,
            FsInfo {
                fstype: FsType::Squashfs,
                label: None,
                uuid: None
            }
        );
        assert_eq!(info.fstype.mount_type(), "squashfs");
    }

    #[test]
    fn iso9660() {
        let dir = tempfile::tempdir().expect("test setup");
        let src = dir.path().join("root");
        std::fs::create_dir_all(&src).expect("test setup");
        std::fs::write(src.join("hello"), "hi").expect("test setup");
        let f = dir.path().join("live.iso");
        let args = [
            "-as",
            "mkisofs",
            "-quiet",
            "-V",
            "COS_LIVE",
            "-o",
            f.to_str().expect("test setup"),
            src.to_str().expect("test setup"),
        ];
        run("xorriso", &args);
        let info = probe_made(&f);
        assert_eq!(info.fstype, FsType::Iso9660);
        assert_eq!(info.label.as_deref(), Some("COS_LIVE"));
        assert_eq!(
            (info.fstype.mount_type(), info.fstype.module()),
            ("iso9660", "isofs")
        );
    }

    #[test]
    fn iso9660_descriptor_walk() {
        let mut buf = vec![0u8; PROBE_LEN];
        let sd = |buf: &mut Vec<u8>, sector: usize, kind: u8| {
            let o = sector * ISO_SECTOR;
            buf[o] = kind;
            buf[o + 1..o + 6].copy_from_slice(b"CD001");
        };
        // Boot record first, primary descriptor second.
        sd(&mut buf, 16, 0);
        sd(&mut buf, 17, 1);
        let pvd = 17 * ISO_SECTOR;
        buf[pvd + 40..pvd + 72].copy_from_slice(&[b' '; 32]);
        buf[pvd + 40..pvd + 44].copy_from_slice(b"LIVE");
        buf[pvd + 813..pvd + 829].copy_from_slice(b"2024010203040500");
        let info = probe_bytes(&buf).expect("test setup");
        assert_eq!(info.label.as_deref(), Some("LIVE"));
        assert_eq!(info.uuid.as_deref(), Some("2024-01-02-03-04-05-00"));
        // Terminator before any primary descriptor, or no room for it.
        sd(&mut buf, 17, 255);
        assert_eq!(probe_bytes(&buf), None);
        sd(&mut buf, 17, 1);
        assert_eq!(probe_bytes(&buf[..pvd + 100]), None);
    }

    #[test]
    fn junk_is_nothing() {
        assert_eq!(probe_bytes(&[]), None);
        assert_eq!(probe_bytes(&vec![0u8; PROBE_LEN]), None);
        assert_eq!(probe_bytes(&vec![0xFFu8; PROBE_LEN]), None);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..50 {
            let buf: Vec<u8> = (0..PROBE_LEN)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert_eq!(probe_bytes(&buf), None);
            for len in [3, 511, 1024, 1081, 1100, 4096, 32770] {
                assert_eq!(probe_bytes(&buf[..len]), None);
            }
        }
        // Magic alone with truncated rest.
        assert_eq!(probe_bytes(b"hsqs"), None);
        assert_eq!(probe_bytes(b"XFSB\0\0\x10\0"), None);
    }

    #[test]
    fn probe_path_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("test setup");
        let missing = dir.path().join("vdz9");
        let e = probe_path(&missing).unwrap_err();
        assert!(e.to_string().contains("vdz9"), "{e}");
        let small = dir.path().join("small");
        std::fs::write(&small, b"tiny").expect("test setup");
        assert_eq!(probe_path(&small).expect("test setup"), None);
    }
}
