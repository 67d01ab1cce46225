//! A GPT writer: pure functions from a partition list to the bytes of the protective MBR, the
//! primary header and entry table (LBA 0..34) and the backup table and header (the last 33
//! sectors). 512-byte sectors, 128 entries of 128 bytes, partitions aligned to 1 MiB.

pub const SECTOR: u64 = 512;
const ENTRIES: usize = 128;
const ENTRY_SIZE: usize = 128;
/// Sectors the entry table takes (128 × 128 bytes).
const TABLE_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;
/// First usable LBA: MBR, header, table.
pub const FIRST_USABLE: u64 = 2 + TABLE_SECTORS;
/// Partitions start on 1 MiB boundaries.
pub const ALIGN: u64 = 2048;

/// BIOS boot partition, 21686148-6449-6E6F-744E-656564454649.
pub const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
/// EFI System Partition, C12A7328-F81F-11D2-BA4B-00A0C93EC93B.
pub const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// Linux filesystem data, 0FC63DAF-8483-4772-8E79-3D69D8477DE4.
pub const LINUX_FS: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// GPT partition name (UTF-16LE on disk, at most 36 code units).
    pub name: String,
    /// Type GUID in its text form.
    pub type_guid: String,
    /// Unique partition GUID, mixed-endian on-disk bytes.
    pub guid: [u8; 16],
    pub first_lba: u64,
    pub last_lba: u64,
}

/// The bytes to write: `primary` at offset 0, `backup` at `backup_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    pub primary: Vec<u8>,
    pub backup: Vec<u8>,
    pub backup_offset: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GptError {
    #[error("GUID {0:?} is not of the form XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX")]
    Guid(String),
    #[error(
        "partition {name:?} ({first}..={last}) is outside the usable sectors {lo}..={hi} or overlaps another"
    )]
    Range {
        name: String,
        first: u64,
        last: u64,
        lo: u64,
        hi: u64,
    },
    #[error("partition name {0:?} is longer than 36 UTF-16 units")]
    Name(String),
    #[error("a disk of {0} sectors is too small for a GPT")]
    TooSmall(u64),
}

/// The on-disk (mixed-endian) bytes of a GUID in text form.
pub fn guid_bytes(text: &str) -> Result<[u8; 16], GptError> {
    let bad = || GptError::Guid(text.to_string());
    let parts: Vec<&str> = text.split('-').collect();
    if parts.len() != 5 || [8, 4, 4, 4, 12] != parts.iter().map(|p| p.len()).collect::<Vec<_>>()[..]
    {
        return Err(bad());
    }
    let hex: String = parts.concat();
    let mut raw = [0u8; 16];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    // The first three fields are little-endian on disk.
    raw[0..4].reverse();
    raw[4..6].reverse();
    raw[6..8].reverse();
    Ok(raw)
}

/// A random (version 4) GUID's on-disk bytes from 16 random bytes.
pub fn guid_from_random(mut r: [u8; 16]) -> [u8; 16] {
    // Version in the high nibble of the 3rd field (stored little-endian: byte 7), variant in byte 8.
    r[7] = (r[7] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    r
}

/// CRC-32 (IEEE, reflected), as the GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Last usable LBA of a disk of `sectors` sectors (backup table and header behind it).
pub fn last_usable(sectors: u64) -> u64 {
    sectors.saturating_sub(2 + TABLE_SECTORS)
}

fn header(
    sectors: u64,
    disk_guid: &[u8; 16],
    my_lba: u64,
    alt_lba: u64,
    table_lba: u64,
    table_crc: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; SECTOR as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
    h[40..48].copy_from_slice(&FIRST_USABLE.to_le_bytes());
    h[48..56].copy_from_slice(&last_usable(sectors).to_le_bytes());
    h[56..72].copy_from_slice(disk_guid);
    h[72..80].copy_from_slice(&table_lba.to_le_bytes());
    h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
    h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    h[88..92].copy_from_slice(&table_crc.to_le_bytes());
    let crc = crc32(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The GPT of a disk of `sectors` 512-byte sectors holding `parts` (in slot order: the first
/// is partition 1).
pub fn build(sectors: u64, disk_guid: [u8; 16], parts: &[Partition]) -> Result<Gpt, GptError> {
    if sectors < FIRST_USABLE * 2 + ALIGN {
        return Err(GptError::TooSmall(sectors));
    }
    let (lo, hi) = (FIRST_USABLE, last_usable(sectors));
    let mut table = vec![0u8; ENTRIES * ENTRY_SIZE];
    let mut prev_last = 0u64;
    for (i, p) in parts.iter().enumerate() {
        if p.first_lba < lo
            || p.last_lba > hi
            || p.last_lba < p.first_lba
            || (i > 0 && p.first_lba <= prev_last)
        {
            return Err(GptError::Range {
                name: p.name.clone(),
                first: p.first_lba,
                last: p.last_lba,
                lo,
                hi,
            });
        }
        prev_last = p.last_lba;
        let name: Vec<u16> = p.name.encode_utf16().collect();
        if name.len() > 36 {
            return Err(GptError::Name(p.name.clone()));
        }
        let e = &mut table[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
        e[0..16].copy_from_slice(&guid_bytes(&p.type_guid)?);
        e[16..32].copy_from_slice(&p.guid);
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        for (j, u) in name.iter().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
        }
    }
    let table_crc = crc32(&table);
    let last = sectors - 1;

    let mut mbr = vec![0u8; SECTOR as usize];
    // One protective partition of type 0xEE covering the disk (capped at 2^32-1 sectors).
    let pe = &mut mbr[446..462];
    pe[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    pe[4] = 0xee;
    pe[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    pe[8..12].copy_from_slice(&1u32.to_le_bytes());
    let len = u32::try_from(sectors - 1).unwrap_or(u32::MAX);
    pe[12..16].copy_from_slice(&len.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;

    let mut primary = mbr;
    primary.extend(header(sectors, &disk_guid, 1, last, 2, table_crc));
    primary.extend(&table);
    let backup_table_lba = last - TABLE_SECTORS;
    let mut backup = table;
    backup.extend(header(
        sectors,
        &disk_guid,
        last,
        1,
        backup_table_lba,
        table_crc,
    ));
    Ok(Gpt {
        primary,
        backup,
        backup_offset: backup_table_lba * SECTOR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn guids_and_crc() {
        assert_eq!(&guid_bytes(BIOS_BOOT).unwrap(), b"Hah!IdontNeedEFI");
        assert_eq!(guid_bytes(LINUX_FS).unwrap()[..4], [0xaf, 0x3d, 0xc6, 0x0f]);
        assert!(guid_bytes("nope").is_err());
        assert!(guid_bytes("0FC63DAF-8483-4772-8E79-3D69D8477DEX").is_err());
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let g = guid_from_random([0xff; 16]);
        assert_eq!(g[7] >> 4, 4);
        assert_eq!(g[8] >> 6, 2);
    }

    fn parts(sectors: u64) -> Vec<Partition> {
        parts_with(sectors, ("bios", BIOS_BOOT, 1))
    }

    fn parts_with(sectors: u64, first: (&str, &str, u64)) -> Vec<Partition> {
        let mut v = Vec::new();
        let mut at = ALIGN;
        for (i, (name, t, mib)) in [
            first,
            ("oem", LINUX_FS, 4),
            ("recovery", LINUX_FS, 4),
            ("state", LINUX_FS, 8),
        ]
        .into_iter()
        .enumerate()
        {
            v.push(Partition {
                name: name.into(),
                type_guid: t.into(),
                guid: guid_from_random([i as u8 + 1; 16]),
                first_lba: at,
                last_lba: at + mib * 2048 - 1,
            });
            at += mib * 2048;
        }
        v.push(Partition {
            name: "persistent".into(),
            type_guid: LINUX_FS.into(),
            guid: guid_from_random([9; 16]),
            first_lba: at,
            last_lba: last_usable(sectors),
        });
        v
    }

    #[test]
    fn layout_is_checked() {
        let sectors = 64 * 2048;
        let gpt = build(sectors, [7; 16], &parts(sectors)).unwrap();
        assert_eq!(gpt.primary.len(), 34 * 512);
        assert_eq!(gpt.backup.len(), 33 * 512);
        assert_eq!(gpt.backup_offset + gpt.backup.len() as u64, sectors * 512);
        assert_eq!(&gpt.primary[512..520], b"EFI PART");
        assert_eq!(&gpt.primary[1024..1040], b"Hah!IdontNeedEFI");
        let mut overlap = parts(sectors);
        overlap[2].first_lba = overlap[1].last_lba;
        assert!(matches!(
            build(sectors, [7; 16], &overlap),
            Err(GptError::Range { .. })
        ));
        let mut beyond = parts(sectors);
        beyond[4].last_lba = sectors - 1;
        assert!(matches!(
            build(sectors, [7; 16], &beyond),
            Err(GptError::Range { .. })
        ));
        assert_eq!(build(10, [0; 16], &[]), Err(GptError::TooSmall(10)));
    }

    /// What the reference tools say about the bytes, when they are installed.
    #[test]
    fn sgdisk_and_sfdisk_accept_it() {
        let sectors = 64 * 2048;
        let gpt = build(sectors, guid_from_random([3; 16]), &parts(sectors)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("disk.img");
        let mut data = vec![0u8; (sectors * SECTOR) as usize];
        data[..gpt.primary.len()].copy_from_slice(&gpt.primary);
        let at = gpt.backup_offset as usize;
        data[at..at + gpt.backup.len()].copy_from_slice(&gpt.backup);
        std::fs::write(&img, &data).unwrap();
        match Command::new("sgdisk").arg("-v").arg(&img).output() {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "{text}");
                assert!(text.contains("No problems found"), "{text}");
                let p = Command::new("sgdisk").arg("-p").arg(&img).output().unwrap();
                let p = String::from_utf8_lossy(&p.stdout);
                for n in ["bios", "oem", "recovery", "state", "persistent"] {
                    assert!(p.contains(n), "{p}");
                }
                assert!(p.contains("EF02"), "{p}");
            }
            Err(_) => eprintln!("skipping sgdisk: not installed"),
        }
        match Command::new("sfdisk").arg("--json").arg(&img).output() {
            Ok(out) if out.status.success() => {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let pt = &v["partitiontable"];
                assert_eq!(pt["label"], "gpt");
                let ps = pt["partitions"].as_array().unwrap();
                assert_eq!(ps.len(), 5);
                assert_eq!(ps[0]["start"], 2048);
                assert_eq!(ps[0]["type"], BIOS_BOOT);
                assert_eq!(ps[3]["name"], "state");
            }
            _ => eprintln!("skipping sfdisk: not installed"),
        }
    }

    /// The UEFI layout: `efi` (EF00, 64 MiB) first, state still partition 4.
    #[test]
    fn sgdisk_accepts_the_efi_layout() {
        let sectors = 128 * 2048;
        let gpt = build(
            sectors,
            guid_from_random([4; 16]),
            &parts_with(sectors, ("efi", EFI_SYSTEM, 64)),
        )
        .unwrap();
        assert_eq!(
            &gpt.primary[1024..1040],
            &guid_bytes(EFI_SYSTEM).unwrap()[..]
        );
        assert_eq!(
            &guid_bytes(EFI_SYSTEM).unwrap()[..4],
            &[0x28, 0x73, 0x2a, 0xc1]
        );
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("disk.img");
        let mut data = vec![0u8; (sectors * SECTOR) as usize];
        data[..gpt.primary.len()].copy_from_slice(&gpt.primary);
        let at = gpt.backup_offset as usize;
        data[at..at + gpt.backup.len()].copy_from_slice(&gpt.backup);
        std::fs::write(&img, &data).unwrap();
        match Command::new("sgdisk").arg("-v").arg(&img).output() {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("No problems found"), "{text}");
                let p = Command::new("sgdisk").arg("-p").arg(&img).output().unwrap();
                let p = String::from_utf8_lossy(&p.stdout);
                let rows: Vec<&str> = p
                    .lines()
                    .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
                    .collect();
                assert_eq!(rows.len(), 5, "{p}");
                assert!(rows[0].contains("EF00") && rows[0].contains("efi"), "{p}");
                assert!(rows[0].contains("64.0 MiB"), "{p}");
                assert!(rows[3].contains("state"), "{p}");
            }
            Err(_) => eprintln!("skipping sgdisk: not installed"),
        }
    }
}
