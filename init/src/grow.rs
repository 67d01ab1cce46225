//! First boot of a disk image written to a bigger device: COS_PERSISTENT grows to the end of it.
//!
//! Pure: where a partition's disk is (sysfs, with the root injected), whether an ext4 should
//! grow and to how many blocks; the GPT side is [`gpt::plan_grow`]. [`persistent`] executes
//! them: GPT writes with a sync after each phase, BLKPG_RESIZE_PARTITION, then the online ext4
//! resize on a private mount. Every step is repeated on the next boot if a cut stopped it.

use std::path::{Path, PathBuf};

use crate::blockdev::{self, BlockDev};
use crate::cmdline::PausePoint;
use crate::gpt::{self, GrowError, Resized, SECTOR};
use crate::sys::disk::{self, Disk};
use crate::sys::{fsutil, log, mount};
use crate::{debug, info, warn};
use kairos_util::{IoError, IoResultExt};

const MIB: u64 = 1 << 20;

/// A partition and the disk it is on, as sysfs tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartOnDisk {
    /// Kernel name of the disk ("vda").
    pub disk: String,
    /// dev_root joined with the disk's DEVNAME.
    pub disk_dev: PathBuf,
    /// The partition number (`partition` in sysfs), which is its GPT slot.
    pub number: u32,
    /// First sector and length in 512-byte sectors, as the kernel has them now.
    pub start: u64,
    pub sectors: u64,
    /// The disk's logical sector size: GPT LBAs are in these units.
    pub logical_block_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: {value:?} is not a number")]
    Number { path: PathBuf, value: String },
    #[error("{path}: no parent disk directory")]
    NoDisk { path: PathBuf },
}

fn read_num(path: &Path) -> Result<u64, LocateError> {
    let text = std::fs::read_to_string(path).at(path, "reading")?;
    text.trim().parse().map_err(|_| LocateError::Number {
        path: path.to_path_buf(),
        value: text.trim().to_string(),
    })
}

/// The disk of partition `part` (a kernel name such as "vda5"): `<sys>/class/block/<part>` links
/// to `…/block/<disk>/<part>`, whose parent directory is the disk. None when `part` is a whole
/// device (no `partition` file).
pub fn locate(
    sys_root: &Path,
    dev_root: &Path,
    part: &str,
) -> Result<Option<PartOnDisk>, LocateError> {
    let dir = sys_root.join("class/block").join(part);
    if !dir.join("partition").exists() {
        return Ok(None);
    }
    let number = read_num(&dir.join("partition"))?;
    let start = read_num(&dir.join("start"))?;
    let sectors = read_num(&dir.join("size"))?;
    let real = std::fs::canonicalize(&dir).at(&dir, "resolving")?;
    let parent = real
        .parent()
        .filter(|p| p.join("dev").exists() || p.join("size").exists())
        .ok_or_else(|| LocateError::NoDisk { path: real.clone() })?;
    let disk = parent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| LocateError::NoDisk { path: real.clone() })?;
    let uevent = std::fs::read_to_string(parent.join("uevent")).unwrap_or_default();
    let devname = blockdev::parse_uevent(&uevent)
        .devname
        .unwrap_or(disk.clone());
    // Absent on old kernels and in test trees: 512 is what they all used.
    let logical_block_size = read_num(&parent.join("queue/logical_block_size")).unwrap_or(512);
    Ok(Some(PartOnDisk {
        disk_dev: dev_root.join(devname),
        disk,
        number: u32::try_from(number).unwrap_or(u32::MAX),
        start,
        sectors,
        logical_block_size,
    }))
}

/// What the online resize needs to know of an ext2/3/4 superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4 {
    pub block_size: u64,
    pub blocks: u64,
    blocks_per_group: u64,
    first_data_block: u64,
    inode_table_blocks: u64,
    reserved_gdt_blocks: u64,
    desc_size: u64,
    cluster_ratio: u64,
    is_64bit: bool,
}

impl Ext4 {
    /// From the 1024 superblock bytes (found at byte 1024 of the partition).
    pub fn parse(sb: &[u8]) -> Option<Ext4> {
        let u16_at = |o: usize| {
            Some(u64::from(u16::from_le_bytes(
                sb.get(o..o + 2)?.try_into().ok()?,
            )))
        };
        let u32_at = |o: usize| {
            Some(u64::from(u32::from_le_bytes(
                sb.get(o..o + 4)?.try_into().ok()?,
            )))
        };
        if u16_at(0x38)? != 0xef53 {
            return None;
        }
        let log_block = u32_at(0x18)?;
        let log_cluster = u32_at(0x1c)?;
        if log_block > 6 {
            return None;
        }
        let block_size = 1024u64 << log_block;
        let incompat = u32_at(0x60)?;
        let ro_compat = u32_at(0x64)?;
        let is_64bit = incompat & 0x80 != 0;
        let hi = if is_64bit { u32_at(0x150)? } else { 0 };
        let inode_size = if u32_at(0x4c)? == 0 {
            128
        } else {
            u16_at(0x58)?
        };
        let desc_size = if is_64bit { u16_at(0xfe)?.max(32) } else { 32 };
        let bigalloc = ro_compat & 0x200 != 0;
        let blocks_per_group = u32_at(0x20)?;
        if blocks_per_group == 0 {
            return None;
        }
        Some(Ext4 {
            block_size,
            blocks: hi << 32 | u32_at(0x04)?,
            blocks_per_group,
            first_data_block: u32_at(0x14)?,
            inode_table_blocks: (u32_at(0x28)? * inode_size).div_ceil(block_size),
            reserved_gdt_blocks: u16_at(0xce)?,
            desc_size,
            cluster_ratio: if bigalloc && log_cluster >= log_block {
                1 << (log_cluster - log_block).min(30)
            } else {
                1
            },
            is_64bit,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block_size)
    }

    /// The block count to grow to in a partition of `part_bytes`, or None when the gap is no
    /// bigger than a last block group's metadata: the kernel drops a last group too small to
    /// hold it, so such a gap stays and must not trigger a grow on every boot.
    pub fn grow_target(&self, part_bytes: u64) -> Option<u64> {
        let mut new = part_bytes / self.block_size;
        if !self.is_64bit {
            new = new.min(u64::from(u32::MAX));
        }
        let groups = new
            .saturating_sub(self.first_data_block)
            .div_ceil(self.blocks_per_group);
        let gdt = (groups * self.desc_size).div_ceil(self.block_size);
        // ext4_resize_fs: superblock + descriptors + reserved GDT + two bitmaps + inode table
        // + 2 + a cluster, plus a little.
        let slack = 1
            + gdt
            + self.reserved_gdt_blocks
            + 2
            + self.inode_table_blocks
            + 2
            + self.cluster_ratio
            + 8;
        (new > self.blocks.saturating_add(slack)).then_some(new)
    }
}

/// What a call of [`persistent`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The GPT was written (grown, or an interrupted grow finished).
    pub gpt_written: bool,
    /// The partition entry this boot grew.
    pub resized: Option<Resized>,
    /// The kernel was told a new partition size.
    pub kernel_told: bool,
    /// Filesystem bytes before and after, when it was grown.
    pub fs: Option<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum GrowFailure {
    #[error(transparent)]
    Locate(#[from] LocateError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{device}: {err}")]
    Gpt { device: PathBuf, err: GrowError },
    #[error(transparent)]
    Mount(#[from] mount::MountError),
    #[error("{device}: {what}")]
    Other { device: PathBuf, what: String },
}

/// Stops here for good when `rd.kairos.pause` names this point, so a harness can cut power.
fn pause_at(point: PausePoint, pause: Option<PausePoint>) {
    if pause != Some(point) {
        return;
    }
    log::announce(&format!("paused at {} (rd.kairos.pause)", point.name()));
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

fn mib(bytes: u64) -> u64 {
    bytes / MIB
}

/// Grows COS_PERSISTENT (`dev`) and its filesystem to the end of its disk, logging what it does;
/// a reason not to is logged and the boot goes on. `mnt` is an empty directory for the private
/// mount the online resize needs.
pub fn persistent(
    sys_root: &Path,
    dev_root: &Path,
    mnt: &Path,
    dev: &BlockDev,
    pause: Option<PausePoint>,
) -> Outcome {
    let mut out = Outcome::default();
    if let Err(e) = grow_gpt(sys_root, dev_root, dev, pause, &mut out) {
        warn!("COS_PERSISTENT {} not grown: {e}", dev.devnode.display());
    }
    if out.gpt_written || out.kernel_told {
        pause_at(PausePoint::GrowGpt, pause);
    }
    match grow_fs(sys_root, dev_root, mnt, dev) {
        Ok(Some((old, new))) => {
            info!(
                "grew the filesystem on COS_PERSISTENT from {} MiB to {} MiB",
                mib(old),
                mib(new)
            );
            out.fs = Some((old, new));
        }
        Ok(None) => {}
        Err(e) => warn!(
            "the filesystem on COS_PERSISTENT {} not grown: {e}",
            dev.devnode.display()
        ),
    }
    out
}

fn grow_gpt(
    sys_root: &Path,
    dev_root: &Path,
    dev: &BlockDev,
    pause: Option<PausePoint>,
    out: &mut Outcome,
) -> Result<(), GrowFailure> {
    let Some(loc) = locate(sys_root, dev_root, &dev.name)? else {
        debug!(
            "COS_PERSISTENT {} is a whole device: nothing to grow",
            dev.name
        );
        return Ok(());
    };
    if loc.logical_block_size != SECTOR {
        info!(
            "COS_PERSISTENT {} not grown: {} has {}-byte sectors, the image's GPT 512",
            dev.devnode.display(),
            loc.disk,
            loc.logical_block_size
        );
        return Ok(());
    }
    let gpt_err = |err| GrowFailure::Gpt {
        device: loc.disk_dev.clone(),
        err,
    };
    let ro = Disk::open(&loc.disk_dev, false)?;
    let sectors = ro.size_bytes()? / SECTOR;
    let planned = gpt::plan_grow(sectors, loc.number, &mut |o, l| ro.read_at(o, l));
    match planned {
        Err(e @ GrowError::NotLast { .. }) => {
            info!("COS_PERSISTENT {} not grown: {e}", dev.devnode.display());
        }
        Err(e) => return Err(gpt_err(e)),
        Ok(None) => debug!(
            "COS_PERSISTENT {}: the GPT already spans {}",
            dev.devnode.display(),
            loc.disk_dev.display()
        ),
        Ok(Some(plan)) => {
            let rw = Disk::open(&loc.disk_dev, true)?;
            apply(&rw, &plan, &mut |phase| {
                if phase == gpt::PHASE_STAGE {
                    pause_at(PausePoint::GrowEntries, pause);
                }
            })?;
            out.gpt_written = true;
            out.resized = plan.resized;
            match plan.resized {
                Some(r) => info!(
                    "grew COS_PERSISTENT {} from {} MiB to {} MiB (GPT moved to the end of the {} MiB disk)",
                    dev.devnode.display(),
                    mib((r.old_last_lba - r.first_lba + 1) * SECTOR),
                    mib((r.new_last_lba - r.first_lba + 1) * SECTOR),
                    mib(sectors * SECTOR)
                ),
                None => info!(
                    "finished an interrupted GPT grow on {} ({})",
                    loc.disk_dev.display(),
                    plan.phases
                        .iter()
                        .map(|p| p.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    }
    // The kernel's idea of the partition, from the table now on disk: grown here, or by a boot
    // cut short before it told the kernel on a kernel that does not re-read the table itself.
    let t = gpt::read_primary(sectors, &mut |o, l| ro.read_at(o, l)).map_err(gpt_err)?;
    let Some(slot) = t.partitions().into_iter().find(|s| s.number == loc.number) else {
        return Ok(());
    };
    let len = slot.last_lba + 1 - slot.first_lba;
    if slot.first_lba != loc.start {
        return Err(GrowFailure::Other {
            device: loc.disk_dev.clone(),
            what: format!(
                "the kernel has partition {} at sector {}, the GPT at {}: not resized",
                loc.number, loc.start, slot.first_lba
            ),
        });
    }
    if len > loc.sectors {
        ro.resize_partition(loc.number, slot.first_lba * SECTOR, len * SECTOR)?;
        out.kernel_told = true;
        info!(
            "the kernel now has {} at {} MiB",
            dev.devnode.display(),
            mib(len * SECTOR)
        );
    }
    Ok(())
}

/// The plan's phases in order, each synced before the next; `after` runs after each sync.
pub fn apply(
    disk: &Disk,
    plan: &gpt::GrowPlan,
    after: &mut dyn FnMut(&str),
) -> Result<(), IoError> {
    for phase in &plan.phases {
        for w in &phase.writes {
            disk.write_at(w.lba * SECTOR, &w.data)?;
        }
        disk.sync()?;
        after(phase.name);
    }
    Ok(())
}

/// Grows the filesystem to fill the partition when it is smaller by more than a block group's
/// metadata. Returns the sizes before and after.
fn grow_fs(
    sys_root: &Path,
    dev_root: &Path,
    mnt: &Path,
    dev: &BlockDev,
) -> Result<Option<(u64, u64)>, GrowFailure> {
    let part_bytes = match locate(sys_root, dev_root, &dev.name)? {
        Some(loc) => loc.sectors * SECTOR,
        None => return Ok(None),
    };
    let read_sb = || -> Result<Option<Ext4>, GrowFailure> {
        let d = Disk::open(&dev.devnode, false)?;
        let sb = d
            .read_at(1024, 1024)
            .at(&dev.devnode, "reading the superblock")?;
        Ok(Ext4::parse(&sb))
    };
    let Some(fs) = read_sb()? else {
        debug!("{}: not ext2/3/4, not grown", dev.devnode.display());
        return Ok(None);
    };
    let Some(blocks) = fs.grow_target(part_bytes) else {
        return Ok(None);
    };
    fsutil::mkdir_p(mnt).map_err(|e| GrowFailure::Other {
        device: dev.devnode.clone(),
        what: e.to_string(),
    })?;
    mount::device(&dev.devnode, mnt, "ext4", false)?;
    let resized = disk::ext4_resize(mnt, blocks);
    let unmounted = mount::unmount(mnt, false);
    resized?;
    unmounted?;
    let new = read_sb()?.map_or(0, |f| f.bytes());
    Ok(Some((fs.bytes(), new)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// vda with partitions 1..=5 under a PCI device, linked from class/block, as sysfs has it.
    fn sysfs(root: &Path) {
        let disk = root.join("devices/pci0000:00/0000:00:04.0/virtio1/block/vda");
        fs::create_dir_all(disk.join("queue")).expect("setup");
        fs::write(disk.join("dev"), "254:0\n").expect("setup");
        fs::write(disk.join("size"), "33554432\n").expect("setup");
        fs::write(
            disk.join("uevent"),
            "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
        )
        .expect("setup");
        fs::write(disk.join("queue/logical_block_size"), "512\n").expect("setup");
        fs::create_dir_all(root.join("class/block")).expect("setup");
        symlink(
            "../../devices/pci0000:00/0000:00:04.0/virtio1/block/vda",
            root.join("class/block/vda"),
        )
        .expect("setup");
        for n in 1..=5u64 {
            let p = disk.join(format!("vda{n}"));
            fs::create_dir_all(&p).expect("setup");
            fs::write(p.join("partition"), format!("{n}\n")).expect("setup");
            fs::write(p.join("start"), format!("{}\n", n * 2048)).expect("setup");
            fs::write(p.join("size"), "2048\n").expect("setup");
            fs::write(p.join("dev"), format!("254:{n}\n")).expect("setup");
            symlink(
                format!("../../devices/pci0000:00/0000:00:04.0/virtio1/block/vda/vda{n}"),
                root.join(format!("class/block/vda{n}")),
            )
            .expect("setup");
        }
    }

    #[test]
    fn locate_finds_the_disk_of_a_partition() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sys = tmp.path().join("sys");
        sysfs(&sys);
        let dev = Path::new("/dev");
        let p = locate(&sys, dev, "vda5")
            .expect("locate")
            .expect("a partition");
        assert_eq!(
            p,
            PartOnDisk {
                disk: "vda".into(),
                disk_dev: PathBuf::from("/dev/vda"),
                number: 5,
                start: 5 * 2048,
                sectors: 2048,
                logical_block_size: 512,
            }
        );
        // The whole disk has no parent disk; a missing name is an error naming the path.
        assert_eq!(locate(&sys, dev, "vda").expect("locate"), None);
        assert_eq!(locate(&sys, dev, "vdz9").expect("locate"), None);
        fs::write(sys.join("class/block/vda3/start"), "x\n").expect("setup");
        let e = locate(&sys, dev, "vda3").expect_err("bad start");
        assert!(e.to_string().contains("vda3/start"), "{e}");
    }

    /// A superblock as mkfs.ext4 writes it: 4 KiB blocks, 64bit, 8192 inodes of 256 bytes a
    /// group, 1024 reserved GDT blocks.
    fn superblock(blocks: u64) -> Vec<u8> {
        let mut sb = vec![0u8; 1024];
        sb[0x04..0x08].copy_from_slice(&(blocks as u32).to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        sb[0x1c..0x20].copy_from_slice(&2u32.to_le_bytes());
        sb[0x20..0x24].copy_from_slice(&32768u32.to_le_bytes());
        sb[0x28..0x2c].copy_from_slice(&8192u32.to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        sb[0x4c..0x50].copy_from_slice(&1u32.to_le_bytes());
        sb[0x58..0x5a].copy_from_slice(&256u16.to_le_bytes());
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        sb[0xce..0xd0].copy_from_slice(&1024u16.to_le_bytes());
        sb[0xfe..0x100].copy_from_slice(&64u16.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&((blocks >> 32) as u32).to_le_bytes());
        sb
    }

    #[test]
    fn ext4_grows_only_past_a_last_groups_metadata() {
        let fs = Ext4::parse(&superblock(262_144)).expect("ext4");
        assert_eq!(fs.block_size, 4096);
        assert_eq!(fs.bytes(), 1024 * MIB);
        assert_eq!(fs.grow_target(1024 * MIB), None);
        // A few MiB more: the metadata of a new group (2 MiB of inode table + 4 MiB of
        // reserved GDT) would not fit, the kernel would keep the size; no grow.
        assert_eq!(fs.grow_target(1024 * MIB + 5 * MIB), None);
        assert_eq!(fs.grow_target(13312 * MIB), Some(13312 * 256));
        assert_eq!(fs.grow_target(13312 * MIB + 4095), Some(13312 * 256));
        // Over 16 TiB: only a 64bit filesystem can take it all.
        let big = 20u64 << 40;
        assert_eq!(fs.grow_target(big), Some(big / 4096));
        let mut sb = superblock(262_144);
        sb[0x60] = 0;
        let small = Ext4::parse(&sb).expect("ext4");
        assert_eq!(small.grow_target(big), Some(u64::from(u32::MAX)));
        assert_eq!(Ext4::parse(&[0u8; 1024]), None);
        assert_eq!(Ext4::parse(&[0u8; 10]), None);
    }

    #[test]
    fn apply_writes_each_phase_then_syncs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("disk.img");
        let plan = gpt::GrowPlan {
            phases: vec![
                gpt::Phase {
                    name: "one",
                    writes: vec![gpt::Write {
                        lba: 1,
                        data: vec![1; 512],
                    }],
                },
                gpt::Phase {
                    name: "two",
                    writes: vec![gpt::Write {
                        lba: 3,
                        data: vec![2; 1024],
                    }],
                },
            ],
            resized: None,
            old_disk_sectors: 8,
        };
        fs::write(&path, vec![0u8; 8 * 512]).expect("setup");
        let d = Disk::open(&path, true).expect("open");
        let mut seen = Vec::new();
        apply(&d, &plan, &mut |p| seen.push(p.to_string())).expect("apply");
        assert_eq!(seen, ["one", "two"]);
        let img = fs::read(&path).expect("read");
        assert!(img[512..1024].iter().all(|&b| b == 1));
        assert!(img[1536..2560].iter().all(|&b| b == 2));
        assert!(img[1024..1536].iter().all(|&b| b == 0));
    }
}
