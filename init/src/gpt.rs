//! GPT on 512-byte sectors, pure: the installer's writer (a partition list to the bytes of the
//! protective MBR, the primary header and entry table (LBA 0..34) and the backup table and
//! header (the last 33 sectors); 128 entries of 128 bytes, partitions aligned to 1 MiB), a reader
//! that checks a table as Linux does, and the planner that grows the last partition to the end
//! of a bigger disk as a sequence of power-cut-safe writes ([`plan_grow`]).

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
    crc32fast::hash(data)
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

/// Why a GPT header or entry array is not valid: the checks Linux makes (block/partitions/efi.c,
/// `is_gpt_valid`) before it uses a table, since a table Linux refuses does not boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GptInvalid {
    #[error("no GPT signature at LBA {lba}")]
    Signature { lba: u64 },
    #[error("GPT header at LBA {lba}: header size {size} is outside 92..=512")]
    HeaderSize { lba: u64, size: u32 },
    #[error("GPT header at LBA {lba}: CRC {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc {
        lba: u64,
        stored: u32,
        computed: u32,
    },
    #[error("GPT header at LBA {lba} says it is at LBA {my_lba}")]
    MyLba { lba: u64, my_lba: u64 },
    #[error(
        "GPT header at LBA {lba}: usable sectors {first}..={last} do not fit a disk whose last sector is {disk_last}"
    )]
    Usable {
        lba: u64,
        first: u64,
        last: u64,
        disk_last: u64,
    },
    #[error(
        "GPT header at LBA {lba}: {count} entries of {size} bytes is not a table this code reads"
    )]
    EntryLayout { lba: u64, count: u32, size: u32 },
    #[error(
        "GPT entry array at LBA {entries_lba}..+{sectors} lies beyond the disk's last sector {disk_last}"
    )]
    EntriesOutside {
        entries_lba: u64,
        sectors: u64,
        disk_last: u64,
    },
    #[error("GPT entry array at LBA {entries_lba}: CRC {stored:#010x}, computed {computed:#010x}")]
    EntriesCrc {
        entries_lba: u64,
        stored: u32,
        computed: u32,
    },
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// The fields of a GPT header this code reads and rewrites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The sector as read, so the bytes not interpreted here (disk GUID, reserved) survive.
    raw: Vec<u8>,
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub entries_crc: u32,
}

/// Entry arrays above 1 MiB are refused (Linux caps them at its largest kmalloc).
const MAX_ENTRY_BYTES: u64 = 1 << 20;

impl Header {
    /// Parses and checks the header in `sector`, read from `lba` of a disk of `disk_sectors`.
    pub fn parse(sector: &[u8], lba: u64, disk_sectors: u64) -> Result<Header, GptInvalid> {
        if sector.len() < SECTOR as usize || sector.get(0..8) != Some(b"EFI PART".as_slice()) {
            return Err(GptInvalid::Signature { lba });
        }
        let raw = sector[..SECTOR as usize].to_vec();
        let size = le32(&raw, 12);
        if !(92..=SECTOR as u32).contains(&size) {
            return Err(GptInvalid::HeaderSize { lba, size });
        }
        let stored = le32(&raw, 16);
        let mut copy = raw[..size as usize].to_vec();
        put32(&mut copy, 16, 0);
        let computed = crc32(&copy);
        if computed != stored {
            return Err(GptInvalid::HeaderCrc {
                lba,
                stored,
                computed,
            });
        }
        let h = Header {
            my_lba: le64(&raw, 24),
            alternate_lba: le64(&raw, 32),
            first_usable: le64(&raw, 40),
            last_usable: le64(&raw, 48),
            entries_lba: le64(&raw, 72),
            entry_count: le32(&raw, 80),
            entry_size: le32(&raw, 84),
            entries_crc: le32(&raw, 88),
            raw,
        };
        if h.my_lba != lba {
            return Err(GptInvalid::MyLba {
                lba,
                my_lba: h.my_lba,
            });
        }
        let disk_last = disk_sectors.saturating_sub(1);
        if h.first_usable > disk_last || h.last_usable > disk_last || h.last_usable < h.first_usable
        {
            return Err(GptInvalid::Usable {
                lba,
                first: h.first_usable,
                last: h.last_usable,
                disk_last,
            });
        }
        let bytes = u64::from(h.entry_count) * u64::from(h.entry_size);
        if h.entry_size != ENTRY_SIZE as u32 || h.entry_count == 0 || bytes > MAX_ENTRY_BYTES {
            return Err(GptInvalid::EntryLayout {
                lba,
                count: h.entry_count,
                size: h.entry_size,
            });
        }
        if h.entries_lba.saturating_add(h.entry_sectors()) > disk_sectors {
            return Err(GptInvalid::EntriesOutside {
                entries_lba: h.entries_lba,
                sectors: h.entry_sectors(),
                disk_last,
            });
        }
        Ok(h)
    }

    /// Bytes of the entry array (count × size).
    pub fn entry_bytes(&self) -> usize {
        self.entry_count as usize * self.entry_size as usize
    }

    /// Sectors the entry array takes.
    pub fn entry_sectors(&self) -> u64 {
        (self.entry_bytes() as u64).div_ceil(SECTOR)
    }

    /// The header's sector with the current field values and a fresh CRC.
    pub fn to_sector(&self) -> Vec<u8> {
        let mut s = self.raw.clone();
        put64(&mut s, 24, self.my_lba);
        put64(&mut s, 32, self.alternate_lba);
        put64(&mut s, 40, self.first_usable);
        put64(&mut s, 48, self.last_usable);
        put64(&mut s, 72, self.entries_lba);
        put32(&mut s, 80, self.entry_count);
        put32(&mut s, 84, self.entry_size);
        put32(&mut s, 88, self.entries_crc);
        put32(&mut s, 16, 0);
        let size = (le32(&s, 12) as usize).clamp(92, SECTOR as usize);
        let crc = crc32(&s[..size]);
        put32(&mut s, 16, crc);
        s
    }
}

/// A header with its entry array, both checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub header: Header,
    /// `entry_count × entry_size` bytes.
    pub entries: Vec<u8>,
}

/// A used slot of the entry array (non-zero type GUID); `number` counts from 1 as Linux does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub number: u32,
    pub first_lba: u64,
    pub last_lba: u64,
    pub name: String,
}

impl Table {
    pub fn partitions(&self) -> Vec<Slot> {
        self.entries
            .chunks_exact(ENTRY_SIZE)
            .enumerate()
            .filter(|(_, e)| e[0..16].iter().any(|&b| b != 0))
            .map(|(i, e)| {
                let units: Vec<u16> = e[56..128]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&u| u != 0)
                    .collect();
                Slot {
                    number: i as u32 + 1,
                    first_lba: le64(e, 32),
                    last_lba: le64(e, 40),
                    name: String::from_utf16_lossy(&units),
                }
            })
            .collect()
    }
}

/// Reads `len` bytes at byte `offset` of the disk.
pub type ReadAt<'a> = dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>> + 'a;

/// Why the last partition is not grown (or the table could not be read).
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("reading {len} bytes at byte {offset}: {err}")]
    Read {
        offset: u64,
        len: usize,
        err: std::io::Error,
    },
    /// Printed, not returned by `source()` (the workspace's convention, as `IoError`).
    #[error("the primary GPT is not valid: {0}")]
    Invalid(GptInvalid),
    #[error("partition {number} is not in the GPT")]
    NoSuchPartition { number: u32 },
    #[error(
        "partition {number} is not the last one: partition {last} ({name:?}) ends at sector {last_lba}"
    )]
    NotLast {
        number: u32,
        last: u32,
        name: String,
        last_lba: u64,
    },
    #[error("the GPT reaches sector {alternate} but the disk has only {sectors} sectors")]
    DiskSmaller { alternate: u64, sectors: u64 },
    #[error("the GPT entry array is at LBA {entries_lba}, not 2 or 34: left where it is")]
    EntriesElsewhere { entries_lba: u64 },
    #[error(
        "sectors {first}..={last}, where the new entries are staged, are in use (data, or a partition starts there)"
    )]
    StagingInUse { first: u64, last: u64 },
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<GptInvalid> for GrowError {
    fn from(e: GptInvalid) -> GrowError {
        GrowError::Invalid(e)
    }
}

fn read_exact(read: &mut ReadAt<'_>, offset: u64, len: usize) -> Result<Vec<u8>, GrowError> {
    match read(offset, len) {
        Ok(b) if b.len() == len => Ok(b),
        Ok(b) => Err(GrowError::Read {
            offset,
            len,
            err: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("got {} bytes", b.len()),
            ),
        }),
        Err(err) => Err(GrowError::Read { offset, len, err }),
    }
}

/// The header at `lba` and its entry array, checked as Linux checks them.
pub fn read_table(lba: u64, disk_sectors: u64, read: &mut ReadAt<'_>) -> Result<Table, GrowError> {
    let sector = read_exact(read, lba * SECTOR, SECTOR as usize)?;
    let header = Header::parse(&sector, lba, disk_sectors)?;
    let entries = read_exact(read, header.entries_lba * SECTOR, header.entry_bytes())?;
    let computed = crc32(&entries);
    if computed != header.entries_crc {
        return Err(GptInvalid::EntriesCrc {
            entries_lba: header.entries_lba,
            stored: header.entries_crc,
            computed,
        }
        .into());
    }
    Ok(Table { header, entries })
}

/// The primary table (LBA 1), which Linux and GRUB boot from.
pub fn read_primary(disk_sectors: u64, read: &mut ReadAt<'_>) -> Result<Table, GrowError> {
    read_table(1, disk_sectors, read)
}

/// Where the primary entry array normally is.
pub const HOME_LBA: u64 = 2;
/// Where the new entries wait while the primary header is switched to them: right behind the
/// home copy, in the gap before the first partition (Kairos and sgdisk start it at LBA 2048).
pub const STAGING_LBA: u64 = 2 + TABLE_SECTORS;

/// Phase names; the executor syncs the disk after each phase.
pub const PHASE_STAGE: &str = "stage";
pub const PHASE_SWITCH: &str = "switch";
pub const PHASE_HOME_ENTRIES: &str = "home-entries";
pub const PHASE_HOME: &str = "home";
pub const PHASE_CLEAR: &str = "clear";
pub const PHASE_MBR: &str = "mbr";

/// Whole sectors to write at `lba`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub lba: u64,
    pub data: Vec<u8>,
}

/// Writes that may reach the disk in any order; the disk is synced before the next phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    pub name: &'static str,
    pub writes: Vec<Write>,
}

/// The partition entry the plan changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    pub number: u32,
    pub first_lba: u64,
    pub old_last_lba: u64,
    pub new_last_lba: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrowPlan {
    pub phases: Vec<Phase>,
    /// Set when this plan grows the partition (None: it finishes an interrupted grow, or only
    /// tidies up).
    pub resized: Option<Resized>,
    /// The disk size the GPT was made for (its backup header's LBA + 1).
    pub old_disk_sectors: u64,
}

/// `data` padded with zeros to whole sectors.
fn sectors_of(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(
        (data.len() as u64).div_ceil(SECTOR) as usize * SECTOR as usize,
        0,
    );
    v
}

/// True when every sector of `area` is zero or equal to the same sector of one of `copies`:
/// free, or holding (part of) a copy of an entry array this code put there.
fn only_copies(area: &[u8], copies: &[&[u8]]) -> bool {
    area.chunks(SECTOR as usize).enumerate().all(|(i, s)| {
        let at = i * SECTOR as usize;
        s.iter().all(|&b| b == 0)
            || copies
                .iter()
                .any(|c| c.get(at..at + s.len()).is_some_and(|c| c == s))
    })
}

/// The protective MBR in `mbr` made to cover a disk of `sectors`, when it is a plain protective
/// MBR (one 0xEE record from LBA 1, the others empty) that covers less. Hybrid MBRs are left.
fn fixed_pmbr(mbr: &[u8], sectors: u64) -> Option<Vec<u8>> {
    if mbr.get(510..512) != Some([0x55, 0xaa].as_slice()) {
        return None;
    }
    let rec = |i: usize| mbr.get(446 + 16 * i..462 + 16 * i);
    let ee = (0..4).find(|&i| rec(i).is_some_and(|r| r[4] == 0xee))?;
    let others_empty = (0..4)
        .filter(|&i| i != ee)
        .all(|i| rec(i).is_some_and(|r| r.iter().all(|&b| b == 0)));
    let r = rec(ee)?;
    let want = u32::try_from(sectors - 1).unwrap_or(u32::MAX);
    if !others_empty || le32(r, 8) != 1 || le32(r, 12) >= want {
        return None;
    }
    let mut out = mbr[..SECTOR as usize].to_vec();
    put32(&mut out, 446 + 16 * ee + 12, want);
    Some(out)
}

/// Plans growing partition `number` to the end of a disk of `sectors` 512-byte sectors, from what
/// `read` returns. None when there is nothing to do.
///
/// Power-cut safety: Linux and GRUB use only the primary table, so the primary header and the
/// entry array it names must agree after every sector that reaches the disk. A sector write is
/// atomic and the header is one sector; the entry array is 32. So the new entries never
/// overwrite the array the header names: they are written elsewhere (the staging area at LBA
/// 34, then home at LBA 2), and only a later, synced one-sector header write switches to them.
///
/// 1. `stage`: new entries at LBA 34 and the new backup (entries + header) at the disk's end;
/// 2. `switch`: the primary header: entries at 34, first usable LBA 66, new last usable and
///    alternate LBA — the atomic switch to the grown table;
/// 3. `home-entries`: the same entries at LBA 2; 4. `home`: the header naming LBA 2 again;
/// 5. `clear`: the staging area zeroed; 6. `mbr`: the protective MBR covers the whole disk.
///
/// Every state a cut can leave is one this function plans from again: before the switch it
/// starts over (the staging area then holds only zeros or pieces of the entries); after it the
/// GPT already spans the disk and only steps 3..6 are left.
pub fn plan_grow(
    sectors: u64,
    number: u32,
    read: &mut ReadAt<'_>,
) -> Result<Option<GrowPlan>, GrowError> {
    let t = read_primary(sectors, read)?;
    let h = &t.header;
    let n = h.entry_sectors();
    let alt = sectors.saturating_sub(1);
    if h.alternate_lba > alt {
        return Err(GrowError::DiskSmaller {
            alternate: h.alternate_lba,
            sectors,
        });
    }
    let parts = t.partitions();
    // Staged by an interrupted run of this code (or left there on purpose: either way the home
    // slot is free, since the usable area starts behind the staged array).
    let is_staged = |h: &Header| h.entries_lba == STAGING_LBA && h.first_usable >= STAGING_LBA + n;
    let home_first_usable = |h: &Header| {
        if h.first_usable == STAGING_LBA + n {
            HOME_LBA + n
        } else {
            h.first_usable
        }
    };
    let staging_free = parts.iter().all(|p| p.first_lba >= STAGING_LBA + n);
    let mut header = h.clone();
    let mut entries = sectors_of(&t.entries);
    let mut phases = Vec::new();
    let mut resized = None;
    let mut staging_ours = false;

    if h.alternate_lba < alt {
        let me = parts
            .iter()
            .find(|p| p.number == number)
            .ok_or(GrowError::NoSuchPartition { number })?;
        if let Some(last) = parts.iter().max_by_key(|p| p.last_lba)
            && last.number != number
        {
            return Err(GrowError::NotLast {
                number,
                last: last.number,
                name: last.name.clone(),
                last_lba: last.last_lba,
            });
        }
        let new_last = alt.saturating_sub(n + 1);
        if new_last <= me.last_lba {
            return Err(GrowError::DiskSmaller {
                alternate: h.alternate_lba,
                sectors,
            });
        }
        let stage = if h.entries_lba == HOME_LBA {
            STAGING_LBA
        } else if is_staged(h) {
            HOME_LBA
        } else {
            return Err(GrowError::EntriesElsewhere {
                entries_lba: h.entries_lba,
            });
        };
        let at = (number as usize - 1) * ENTRY_SIZE;
        put64(&mut entries, at + 40, new_last);
        let table = &entries[..h.entry_bytes()];
        if stage == STAGING_LBA {
            let area = read_exact(read, STAGING_LBA * SECTOR, (n * SECTOR) as usize)?;
            let current = sectors_of(&t.entries);
            if !staging_free || !only_copies(&area, &[&entries, &current]) {
                return Err(GrowError::StagingInUse {
                    first: STAGING_LBA,
                    last: STAGING_LBA + n - 1,
                });
            }
        }
        header.alternate_lba = alt;
        header.last_usable = new_last;
        header.entries_crc = crc32(table);
        let final_first_usable = home_first_usable(h);
        let mut backup = header.clone();
        backup.my_lba = alt;
        backup.alternate_lba = 1;
        backup.entries_lba = alt - n;
        backup.first_usable = final_first_usable;
        phases.push(Phase {
            name: PHASE_STAGE,
            writes: vec![
                Write {
                    lba: stage,
                    data: entries.clone(),
                },
                Write {
                    lba: alt - n,
                    data: entries.clone(),
                },
                Write {
                    lba: alt,
                    data: backup.to_sector(),
                },
            ],
        });
        header.entries_lba = stage;
        header.first_usable = if stage == STAGING_LBA {
            final_first_usable.max(STAGING_LBA + n)
        } else {
            final_first_usable
        };
        phases.push(Phase {
            name: PHASE_SWITCH,
            writes: vec![Write {
                lba: 1,
                data: header.to_sector(),
            }],
        });
        resized = Some(Resized {
            number,
            first_lba: me.first_lba,
            old_last_lba: me.last_lba,
            new_last_lba: new_last,
        });
        staging_ours = true;
    }

    if is_staged(&header) {
        phases.push(Phase {
            name: PHASE_HOME_ENTRIES,
            writes: vec![Write {
                lba: HOME_LBA,
                data: entries.clone(),
            }],
        });
        header.first_usable = home_first_usable(&header);
        header.entries_lba = HOME_LBA;
        phases.push(Phase {
            name: PHASE_HOME,
            writes: vec![Write {
                lba: 1,
                data: header.to_sector(),
            }],
        });
        staging_ours = true;
    }

    // A copy of the entries left in the staging area (a cut during `clear`) is tidied away;
    // anything else there is someone's data and stays.
    if header.entries_lba == HOME_LBA && staging_free {
        let clear = staging_ours || {
            let area = read_exact(read, STAGING_LBA * SECTOR, (n * SECTOR) as usize)?;
            area.iter().any(|&b| b != 0) && only_copies(&area, &[&entries])
        };
        if clear {
            phases.push(Phase {
                name: PHASE_CLEAR,
                writes: vec![Write {
                    lba: STAGING_LBA,
                    data: vec![0; (n * SECTOR) as usize],
                }],
            });
        }
    }

    if header.alternate_lba == alt {
        let mbr = read_exact(read, 0, SECTOR as usize)?;
        if let Some(data) = fixed_pmbr(&mbr, sectors) {
            phases.push(Phase {
                name: PHASE_MBR,
                writes: vec![Write { lba: 0, data }],
            });
        }
    }

    Ok((!phases.is_empty()).then(|| GrowPlan {
        phases,
        resized,
        old_disk_sectors: h.alternate_lba + 1,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn guids_and_crc() {
        assert_eq!(
            &guid_bytes(BIOS_BOOT).expect("a valid GUID constant"),
            b"Hah!IdontNeedEFI"
        );
        assert_eq!(
            guid_bytes(LINUX_FS).expect("a valid GUID constant")[..4],
            [0xaf, 0x3d, 0xc6, 0x0f]
        );
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
        let gpt = build(sectors, [7; 16], &parts(sectors)).expect("building the test GPT");
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
        let gpt = build(sectors, guid_from_random([3; 16]), &parts(sectors))
            .expect("building the test GPT");
        let tmp = tempfile::tempdir().expect("temp dir");
        let img = tmp.path().join("disk.img");
        let mut data = vec![0u8; (sectors * SECTOR) as usize];
        data[..gpt.primary.len()].copy_from_slice(&gpt.primary);
        let at = gpt.backup_offset as usize;
        data[at..at + gpt.backup.len()].copy_from_slice(&gpt.backup);
        std::fs::write(&img, &data).expect("writing the test image");
        match Command::new("sgdisk").arg("-v").arg(&img).output() {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "{text}");
                assert!(text.contains("No problems found"), "{text}");
                let p = Command::new("sgdisk")
                    .arg("-p")
                    .arg(&img)
                    .output()
                    .expect("running sgdisk");
                let p = String::from_utf8_lossy(&p.stdout);
                for n in ["bios", "oem", "recovery", "state", "persistent"] {
                    assert!(p.contains(n), "{p}");
                }
                assert!(p.contains("EF02"), "{p}");
            }
            Err(e) => panic!(
                "sgdisk: {e} (`kairos-qemu setup` installs gdisk): a test that cannot run fails, it never passes"
            ),
        }
        // sfdisk's dump format (no JSON parser in the init's dev-dependencies).
        match Command::new("sfdisk").arg("--dump").arg(&img).output() {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("label: gpt"), "{text}");
                let rows: Vec<&str> = text.lines().filter(|l| l.contains("start=")).collect();
                assert_eq!(rows.len(), 5, "{text}");
                assert!(rows[0].contains("start=        2048"), "{text}");
                assert!(rows[0].contains(&format!("type={BIOS_BOOT}")), "{text}");
                assert!(rows[3].contains("name=\"state\""), "{text}");
            }
            other => panic!(
                "sfdisk --dump: {other:?} (`kairos-qemu setup` installs fdisk): a test that cannot run fails, it never passes"
            ),
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
        .expect("building the test GPT");
        assert_eq!(
            &gpt.primary[1024..1040],
            &guid_bytes(EFI_SYSTEM).expect("a valid GUID constant")[..]
        );
        assert_eq!(
            &guid_bytes(EFI_SYSTEM).expect("a valid GUID constant")[..4],
            &[0x28, 0x73, 0x2a, 0xc1]
        );
        let tmp = tempfile::tempdir().expect("temp dir");
        let img = tmp.path().join("disk.img");
        let mut data = vec![0u8; (sectors * SECTOR) as usize];
        data[..gpt.primary.len()].copy_from_slice(&gpt.primary);
        let at = gpt.backup_offset as usize;
        data[at..at + gpt.backup.len()].copy_from_slice(&gpt.backup);
        std::fs::write(&img, &data).expect("writing the test image");
        match Command::new("sgdisk").arg("-v").arg(&img).output() {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("No problems found"), "{text}");
                let p = Command::new("sgdisk")
                    .arg("-p")
                    .arg(&img)
                    .output()
                    .expect("running sgdisk");
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
            Err(e) => panic!(
                "sgdisk: {e} (`kairos-qemu setup` installs gdisk): a test that cannot run fails, it never passes"
            ),
        }
    }
}

#[cfg(test)]
mod grow_tests {
    use super::*;
    use std::process::Command;

    const MIB: u64 = 2048;

    /// A Kairos layout (sizes in MiB, the last partition `persistent` fills the disk) made for
    /// a disk of `made_for` sectors, in an image of `sectors` sectors (as `dd` leaves it).
    fn image(first: &[(&str, &str, u64)], made_for: u64, sectors: u64) -> Vec<u8> {
        let mut parts = Vec::new();
        let mut at = ALIGN;
        for (i, &(name, t, mib)) in first.iter().enumerate() {
            parts.push(Partition {
                name: name.into(),
                type_guid: t.into(),
                guid: guid_from_random([i as u8 + 1; 16]),
                first_lba: at,
                last_lba: at + mib * MIB - 1,
            });
            at += mib * MIB;
        }
        parts.push(Partition {
            name: "persistent".into(),
            type_guid: LINUX_FS.into(),
            guid: guid_from_random([9; 16]),
            first_lba: at,
            last_lba: last_usable(made_for),
        });
        let gpt = build(made_for, guid_from_random([5; 16]), &parts).expect("test layout");
        let mut img = vec![0u8; (sectors * SECTOR) as usize];
        img[..gpt.primary.len()].copy_from_slice(&gpt.primary);
        let at = gpt.backup_offset as usize;
        img[at..at + gpt.backup.len()].copy_from_slice(&gpt.backup);
        img
    }

    const BIOS: &[(&str, &str, u64)] = &[
        ("bios", BIOS_BOOT, 1),
        ("oem", LINUX_FS, 1),
        ("recovery", LINUX_FS, 1),
        ("state", LINUX_FS, 2),
    ];
    const HYBRID: &[(&str, &str, u64)] = &[
        ("bios", BIOS_BOOT, 1),
        ("efi", EFI_SYSTEM, 1),
        ("oem", LINUX_FS, 1),
        ("recovery", LINUX_FS, 1),
        ("state", LINUX_FS, 2),
    ];

    fn reader(img: &[u8]) -> impl FnMut(u64, usize) -> std::io::Result<Vec<u8>> + '_ {
        move |off, len| {
            let off = off as usize;
            img.get(off..off + len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
        }
    }

    fn plan(img: &[u8], number: u32) -> Result<Option<GrowPlan>, GrowError> {
        let sectors = img.len() as u64 / SECTOR;
        plan_grow(sectors, number, &mut reader(img))
    }

    fn primary(img: &[u8]) -> Table {
        read_primary(img.len() as u64 / SECTOR, &mut reader(img)).expect("valid primary GPT")
    }

    /// Every sector a phase writes, in the order the plan lists them.
    fn sectors(phase: &Phase) -> Vec<(u64, &[u8])> {
        phase
            .writes
            .iter()
            .flat_map(|w| {
                w.data
                    .chunks(SECTOR as usize)
                    .enumerate()
                    .map(move |(i, s)| (w.lba + i as u64, s))
            })
            .collect()
    }

    fn put(img: &mut [u8], lba: u64, s: &[u8]) {
        let at = (lba * SECTOR) as usize;
        img[at..at + s.len()].copy_from_slice(s);
    }

    fn apply(img: &mut [u8], plan: &GrowPlan) {
        for p in &plan.phases {
            for (lba, s) in sectors(p) {
                put(img, lba, s);
            }
        }
    }

    /// Runs the planner until it has nothing left to do; at most twice (a finished plan must
    /// leave nothing behind).
    fn finish(img: &mut [u8], number: u32) {
        if let Some(p) = plan(img, number).expect("plan") {
            apply(img, &p);
        }
        assert_eq!(
            plan(img, number).expect("plan"),
            None,
            "work left after a full plan"
        );
    }

    #[test]
    fn grows_the_last_partition_and_moves_the_backup_to_the_end() {
        for (layout, number) in [(BIOS, 5), (HYBRID, 6)] {
            let (made, size) = (8 * MIB, 12 * MIB);
            let mut img = image(layout, made, size);
            let before = primary(&img);
            let p = plan(&img, number).expect("plan").expect("work to do");
            let names: Vec<&str> = p.phases.iter().map(|p| p.name).collect();
            assert_eq!(
                names,
                [
                    PHASE_STAGE,
                    PHASE_SWITCH,
                    PHASE_HOME_ENTRIES,
                    PHASE_HOME,
                    PHASE_CLEAR,
                    PHASE_MBR
                ]
            );
            let r = p.resized.expect("resized");
            assert_eq!(r.number, number);
            assert_eq!(r.old_last_lba, made - 34);
            assert_eq!(r.new_last_lba, size - 34);
            assert_eq!(p.old_disk_sectors, made);
            // The switch and the two header writes are single sectors: the atomic steps.
            for ph in &p.phases {
                if [PHASE_SWITCH, PHASE_HOME, PHASE_MBR].contains(&ph.name) {
                    assert_eq!(sectors(ph).len(), 1, "{}", ph.name);
                }
            }
            apply(&mut img, &p);
            let after = primary(&img);
            assert_eq!(after.header.entries_lba, 2);
            assert_eq!(after.header.first_usable, 34);
            assert_eq!(after.header.last_usable, size - 34);
            assert_eq!(after.header.alternate_lba, size - 1);
            let (b, a) = (before.partitions(), after.partitions());
            assert_eq!(a.len(), number as usize);
            assert_eq!(a[..a.len() - 1], b[..b.len() - 1]);
            assert_eq!(
                a.last().map(|s| (s.first_lba, s.last_lba)),
                Some((b[a.len() - 1].first_lba, size - 34))
            );
            assert_eq!(a.last().map(|s| s.name.as_str()), Some("persistent"));
            let backup = read_table(size - 1, size, &mut reader(&img)).expect("valid backup");
            assert_eq!(backup.header.alternate_lba, 1);
            assert_eq!(backup.header.entries_lba, size - 33);
            assert_eq!(backup.entries, after.entries);
            assert!(
                img[(34 * SECTOR) as usize..(66 * SECTOR) as usize]
                    .iter()
                    .all(|&b| b == 0)
            );
            assert_eq!(le32(&img, 446 + 12), (size - 1) as u32);
            assert_eq!(plan(&img, number).expect("plan"), None);
            sgdisk_verify(&img);
        }
    }

    /// `sgdisk -v` on the grown image, when sgdisk is installed.
    fn sgdisk_verify(img: &[u8]) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("disk.img");
        std::fs::write(&path, img).expect("write image");
        match Command::new("sgdisk").arg("-v").arg(&path).output() {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("No problems found"), "{text}");
            }
            Err(e) => panic!(
                "sgdisk: {e} (`kairos-qemu setup` installs gdisk): a test that cannot run fails, it never passes"
            ),
        }
    }

    /// A deterministic xorshift, for the random cut sets.
    fn rng(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// The power cut, everywhere: for every phase, with all earlier phases synced, any subset
    /// of its sectors may have reached the disk (writes between two syncs land in any order;
    /// each sector is atomic). Checked: every prefix of the phase's sectors in order, every
    /// prefix in reverse order, and random subsets. After each cut the primary GPT must be
    /// valid (header and entry CRCs) with the partitions as before or as after, and the planner
    /// run on the cut disk must finish the job to exactly the disk an uncut run leaves.
    #[test]
    fn a_power_cut_after_any_write_leaves_a_valid_primary_and_resumes() {
        for (layout, number) in [(BIOS, 5), (HYBRID, 6)] {
            let size = 12 * MIB;
            let start = image(layout, 8 * MIB, size);
            let p = plan(&start, number).expect("plan").expect("work to do");
            let mut done = start.clone();
            apply(&mut done, &p);
            let before = primary(&start).partitions();
            let after = primary(&done).partitions();
            assert_ne!(before, after);
            let mut next = rng(0x9e37_79b9_7f4a_7c15);
            let mut synced = start.clone();
            let mut cuts = 0;
            for phase in &p.phases {
                let secs = sectors(phase);
                let mut sets: Vec<Vec<usize>> = Vec::new();
                for k in 0..=secs.len() {
                    sets.push((0..k).collect());
                    sets.push((secs.len() - k..secs.len()).collect());
                }
                for _ in 0..48 {
                    sets.push((0..secs.len()).filter(|_| next() & 1 == 1).collect());
                }
                for set in sets {
                    let mut img = synced.clone();
                    for &i in &set {
                        put(&mut img, secs[i].0, secs[i].1);
                    }
                    let now = primary(&img).partitions();
                    assert!(
                        now == before || now == after,
                        "{}: cut after sectors {set:?}: partitions {now:?}",
                        phase.name
                    );
                    finish(&mut img, number);
                    assert!(
                        img == done,
                        "{}: resuming after {set:?} differs",
                        phase.name
                    );
                    cuts += 1;
                }
                for (lba, s) in secs {
                    put(&mut synced, lba, s);
                }
            }
            assert_eq!(synced, done);
            assert!(cuts > 300, "{cuts}");
        }
    }

    /// The brief's form of the cut: the plan's writes applied 0..k, for every k.
    #[test]
    fn a_cut_after_each_whole_write_resumes() {
        let size = 12 * MIB;
        let start = image(BIOS, 8 * MIB, size);
        let p = plan(&start, 5).expect("plan").expect("work to do");
        let writes: Vec<&Write> = p.phases.iter().flat_map(|p| &p.writes).collect();
        let mut done = start.clone();
        apply(&mut done, &p);
        for k in 0..=writes.len() {
            let mut img = start.clone();
            for w in &writes[..k] {
                put(&mut img, w.lba, &w.data);
            }
            primary(&img);
            finish(&mut img, 5);
            assert!(img == done, "cut after {k} writes");
        }
    }

    #[test]
    fn a_staged_disk_copied_to_a_bigger_one_grows_again() {
        let start = image(BIOS, 8 * MIB, 12 * MIB);
        let p = plan(&start, 5).expect("plan").expect("work to do");
        let mut img = start.clone();
        for ph in p.phases.iter().take(2) {
            for (lba, s) in sectors(ph) {
                put(&mut img, lba, s);
            }
        }
        assert_eq!(primary(&img).header.entries_lba, STAGING_LBA);
        img.resize((16 * MIB * SECTOR) as usize, 0);
        let p = plan(&img, 5).expect("plan").expect("work to do");
        assert_eq!(p.phases[0].writes[0].lba, HOME_LBA);
        apply(&mut img, &p);
        let t = primary(&img);
        assert_eq!(t.header.entries_lba, HOME_LBA);
        assert_eq!(t.header.first_usable, 34);
        assert_eq!(t.partitions()[4].last_lba, 16 * MIB - 34);
        assert_eq!(plan(&img, 5).expect("plan"), None);
        sgdisk_verify(&img);
    }

    #[test]
    fn what_is_left_alone() {
        // Already at full size: nothing, not even a read beyond the tables.
        let img = image(BIOS, 8 * MIB, 8 * MIB);
        assert_eq!(plan(&img, 5).expect("plan"), None);
        // Something after persistent.
        let mut parts = image(BIOS, 8 * MIB, 12 * MIB);
        let mut t = primary(&parts);
        let last = t.header.last_usable;
        put64(&mut t.entries, 4 * ENTRY_SIZE + 40, last - 2048);
        let extra = 5 * ENTRY_SIZE;
        t.entries[extra..extra + 16].copy_from_slice(&guid_bytes(LINUX_FS).expect("guid"));
        put64(&mut t.entries, extra + 32, last - 2047);
        put64(&mut t.entries, extra + 40, last);
        t.entries[extra + 56] = b'x';
        t.header.entries_crc = crc32(&t.entries);
        put(&mut parts, 1, &t.header.to_sector());
        put(&mut parts, 2, &t.entries);
        assert!(matches!(
            plan(&parts, 5),
            Err(GrowError::NotLast { number: 5, last: 6, ref name, .. }) if name == "x"
        ));
        assert!(matches!(
            plan(&parts, 9),
            Err(GrowError::NoSuchPartition { number: 9 })
        ));
        // Data where the entries would be staged (a board's boot loader at LBA 64).
        let mut busy = image(BIOS, 8 * MIB, 12 * MIB);
        put(&mut busy, 64, &[0xaa; 512]);
        assert!(matches!(
            plan(&busy, 5),
            Err(GrowError::StagingInUse {
                first: 34,
                last: 65
            })
        ));
        // A disk smaller than its GPT, and a broken primary header.
        let mut small = image(BIOS, 8 * MIB, 8 * MIB);
        small.truncate((6 * MIB * SECTOR) as usize);
        assert!(matches!(
            plan(&small, 5),
            Err(GrowError::Invalid(_)) | Err(GrowError::DiskSmaller { .. })
        ));
        let mut bad = image(BIOS, 8 * MIB, 12 * MIB);
        bad[512 + 40] ^= 1;
        assert!(matches!(
            plan(&bad, 5),
            Err(GrowError::Invalid(GptInvalid::HeaderCrc { lba: 1, .. }))
        ));
        let mut bad = image(BIOS, 8 * MIB, 12 * MIB);
        bad[1024 + 200] ^= 1;
        assert!(matches!(
            plan(&bad, 5),
            Err(GrowError::Invalid(GptInvalid::EntriesCrc {
                entries_lba: 2,
                ..
            }))
        ));
    }

    #[test]
    fn header_checks_follow_linux() {
        let img = image(BIOS, 8 * MIB, 8 * MIB);
        let s = &img[512..1024];
        let h = Header::parse(s, 1, 8 * MIB).expect("valid");
        assert_eq!(h.to_sector(), s);
        assert!(matches!(
            Header::parse(s, 2, 8 * MIB),
            Err(GptInvalid::MyLba { lba: 2, my_lba: 1 })
        ));
        // last_usable beyond the disk (a GPT made for a bigger disk).
        assert!(matches!(
            Header::parse(s, 1, 4 * MIB),
            Err(GptInvalid::Usable { .. })
        ));
        assert!(matches!(
            Header::parse(&[0; 512], 1, 8 * MIB),
            Err(GptInvalid::Signature { lba: 1 })
        ));
        let mut odd = h.clone();
        odd.entry_size = 256;
        assert!(matches!(
            Header::parse(&odd.to_sector(), 1, 8 * MIB),
            Err(GptInvalid::EntryLayout { size: 256, .. })
        ));
    }

    /// A table written by sgdisk (another writer's byte layout) grows the same way.
    #[test]
    fn grows_an_sgdisk_table() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("disk.img");
        std::fs::write(&path, vec![0u8; (8 * MIB * SECTOR) as usize]).expect("write");
        let made = Command::new("sgdisk")
            .args([
                "-a",
                "2048",
                "-n1:0:+1M",
                "-t1:ef02",
                "-c1:bios",
                "-n2:0:+1M",
                "-c2:oem",
            ])
            .args([
                "-n3:0:+1M",
                "-c3:recovery",
                "-n4:0:+2M",
                "-c4:state",
                "-n5:0:0",
                "-c5:persistent",
            ])
            .arg(&path)
            .output();
        match made {
            Ok(o) if o.status.success() => {}
            other => panic!(
                "sgdisk: {other:?} (`kairos-qemu setup` installs gdisk): a test that cannot run fails, it never passes"
            ),
        }
        let mut img = std::fs::read(&path).expect("read");
        img.resize((12 * MIB * SECTOR) as usize, 0);
        finish(&mut img, 5);
        assert_eq!(primary(&img).partitions()[4].last_lba, 12 * MIB - 34);
        sgdisk_verify(&img);
    }
}
