//! Block devices and their filesystems from sysfs and superblocks, because the initramfs has
//! no udev and therefore no /dev/disk/by-* links.

use std::cmp::Ordering;
use std::path::{Component, Path, PathBuf};

use crate::labels;
use crate::probe::{self, FsInfo};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name, e.g. "vda2".
    pub name: String,
    /// dev_root joined with DEVNAME.
    pub devnode: PathBuf,
    /// GPT partition name (PARTNAME= in the uevent file).
    pub partname: Option<String>,
    pub is_partition: bool,
    /// Kernel name of the whole disk: the parent in sysfs for a partition ("vda" for
    /// "vda2"), the device's own name otherwise.
    pub disk: String,
    pub size_bytes: u64,
    pub fs: Option<FsInfo>,
}

/// Orders names with their digit runs compared as numbers: vda < vda2 < vda10 < vdb.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let (nx, rx) = split_digits(x);
                let (ny, ry) = split_digits(y);
                // Same value however many leading zeros: longer significant run is bigger.
                let (sx, sy) = (trim_zeros(nx), trim_zeros(ny));
                let ord = sx.len().cmp(&sy.len()).then_with(|| sx.cmp(sy));
                if ord != Ordering::Equal {
                    return ord;
                }
                (x, y) = (rx, ry);
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(d);
                }
                (x, y) = (
                    x.get(1..).unwrap_or_default(),
                    y.get(1..).unwrap_or_default(),
                );
            }
        }
    }
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    s.split_at(n)
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().position(|&b| b != b'0').unwrap_or(s.len());
    s.get(n..).unwrap_or_default()
}

/// What a block device's sysfs uevent file says about it. This is where GPT partition names
/// come from: the kernel parses the partition table and reports each entry's name as PARTNAME.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uevent {
    /// DEVNAME, only when it stays inside dev_root (relative, no "..").
    pub devname: Option<String>,
    /// DEVTYPE=partition.
    pub is_partition: bool,
    /// PARTNAME: the GPT partition name.
    pub partname: Option<String>,
}

/// Parses the text of a sysfs uevent file. Pure; unknown keys and junk lines are ignored.
pub fn parse_uevent(uevent: &str) -> Uevent {
    Uevent {
        devname: uevent_value(uevent, "DEVNAME")
            .filter(|d| safe_devname(d))
            .map(str::to_string),
        is_partition: uevent_value(uevent, "DEVTYPE") == Some("partition"),
        partname: uevent_value(uevent, "PARTNAME").map(str::to_string),
    }
}

/// KEY=VALUE lines of a sysfs uevent file.
fn uevent_value<'a>(uevent: &'a str, key: &str) -> Option<&'a str> {
    uevent
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// DEVNAME must stay inside dev_root: relative, no "..".
fn safe_devname(devname: &str) -> bool {
    Path::new(devname)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
}

/// The block devices of sys_root/class/block, without probing. RAM disks, zram, empty loop
/// devices and other size-0 devices are left out. Sorted by natural name order.
pub fn list(sys_root: &Path, dev_root: &Path) -> Vec<BlockDev> {
    let class = sys_root.join("class/block");
    let Ok(entries) = std::fs::read_dir(&class) else {
        return Vec::new();
    };
    let mut devs = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with("ram") || name.starts_with("zram") {
            continue;
        }
        // The entries are symlinks into /sys/devices; reads through them follow the link.
        let dir = class.join(&name);
        let size_bytes = std::fs::read_to_string(dir.join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(0, |sectors| sectors.saturating_mul(512));
        // Covers loop devices with no backing file, empty CD trays and the like.
        if size_bytes == 0 {
            continue;
        }
        let uevent = parse_uevent(&std::fs::read_to_string(dir.join("uevent")).unwrap_or_default());
        let devnode = dev_root.join(uevent.devname.as_deref().unwrap_or(&name));
        let is_partition = dir.join("partition").exists() || uevent.is_partition;
        // A partition's sysfs directory sits inside its disk's: the link's parent directory
        // (the kernel's naming rule when there is no link to read).
        let disk = if is_partition {
            std::fs::read_link(&dir)
                .ok()
                .and_then(|l| Some(l.parent()?.file_name()?.to_str()?.to_string()))
                .unwrap_or_else(|| disk_of_partition_name(&name).to_string())
        } else {
            name.clone()
        };
        devs.push(BlockDev {
            devnode,
            partname: uevent.partname,
            is_partition,
            disk,
            size_bytes,
            fs: None,
            name,
        });
    }
    devs.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    devs
}

/// The disk a partition name belongs to by the kernel's naming: "vda4" -> "vda",
/// "nvme0n1p2" -> "nvme0n1", "mmcblk0p1" -> "mmcblk0".
fn disk_of_partition_name(name: &str) -> &str {
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
    match base.strip_suffix('p') {
        Some(d) if d.ends_with(|c: char| c.is_ascii_digit()) => d,
        _ => base,
    }
}

/// [`list`] plus a superblock probe of each device node. A device that cannot be read (yet),
/// such as an empty CD tray, just has no filesystem.
pub fn scan(sys_root: &Path, dev_root: &Path) -> Vec<BlockDev> {
    let mut devs = list(sys_root, dev_root);
    for dev in &mut devs {
        dev.fs = probe::probe_path(&dev.devnode).ok().flatten();
    }
    devs
}

/// Poll (bounded) for block devices not in `known`; once some appear, wait until the list holds
/// still for a moment (a disk shows up before its partitions), then probe everything again.
/// None when nothing new came within `timeout`; else the scan and the new names.
pub fn wait_for_more(
    sys_root: &Path,
    dev_root: &Path,
    known: &[BlockDev],
    timeout: std::time::Duration,
) -> Option<(Vec<BlockDev>, Vec<String>)> {
    use std::time::{Duration, Instant};
    let names = |devs: &[BlockDev]| devs.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
    let known = names(known);
    let deadline = Instant::now() + timeout;
    let mut last = known.clone();
    let mut changed_at: Option<Instant> = None;
    loop {
        let now = names(&list(sys_root, dev_root));
        if now != last {
            last = now;
            changed_at = Some(Instant::now());
        } else if changed_at.is_some_and(|t| t.elapsed() >= Duration::from_millis(200)) {
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let added: Vec<String> = last.into_iter().filter(|n| !known.contains(n)).collect();
    if added.is_empty() {
        return None;
    }
    Some((scan(sys_root, dev_root), added))
}

/// The first of `matches`, and the others for the caller to log: partitions before whole-device
/// filesystems (Kairos disks are always partitioned; a stray stick formatted whole is not one),
/// then natural name order. Disk names themselves follow probe order, which virtio does not
/// keep stable across boots, so the partition rule is what keeps the installed disk winning.
fn first_of(mut matches: Vec<&BlockDev>) -> Option<(&BlockDev, Vec<&BlockDev>)> {
    matches.sort_by(|a, b| {
        b.is_partition
            .cmp(&a.is_partition)
            .then_with(|| natural_cmp(&a.name, &b.name))
    });
    let mut rest = matches.into_iter();
    let first = rest.next()?;
    Some((first, rest.collect()))
}

/// The device carrying `label`: filesystem label match first; else a partition whose GPT name
/// is labels::gpt_name_for(label), for partitions whose filesystem cannot be probed. When
/// several match, the first in natural name order wins and the others are returned so the
/// caller can log the duplicate.
pub fn find_by_label<'a>(
    devs: &'a [BlockDev],
    label: &str,
) -> Option<(&'a BlockDev, Vec<&'a BlockDev>)> {
    let by_fs: Vec<_> = devs
        .iter()
        .filter(|d| d.fs.as_ref().and_then(|f| f.label.as_deref()) == Some(label))
        .collect();
    if !by_fs.is_empty() {
        return first_of(by_fs);
    }
    let gpt = labels::gpt_name_for(label)?;
    first_of(
        devs.iter()
            .filter(|d| d.is_partition && d.partname.as_deref() == Some(gpt))
            .collect(),
    )
}

/// The first device (natural order) whose filesystem UUID is `uuid`, ignoring case.
pub fn find_by_uuid<'a>(devs: &'a [BlockDev], uuid: &str) -> Option<&'a BlockDev> {
    let matches = devs
        .iter()
        .filter(|d| {
            d.fs.as_ref()
                .and_then(|f| f.uuid.as_deref())
                .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
        })
        .collect();
    first_of(matches).map(|(d, _)| d)
}

fn find_by_partlabel<'a>(devs: &'a [BlockDev], name: &str) -> Option<&'a BlockDev> {
    let matches = devs
        .iter()
        .filter(|d| d.is_partition && d.partname.as_deref() == Some(name))
        .collect();
    first_of(matches).map(|(d, _)| d)
}

/// Resolves a root/mount spec: "LABEL=x", "UUID=x", "PARTLABEL=x" or "/dev/x". The udev link
/// forms /dev/disk/by-{label,uuid,partlabel}/x are understood too, since no udev made them.
pub fn find_spec<'a>(devs: &'a [BlockDev], spec: &str) -> Option<&'a BlockDev> {
    if let Some(label) = spec.strip_prefix("LABEL=") {
        return find_by_label(devs, label).map(|(d, _)| d);
    }
    if let Some(uuid) = spec.strip_prefix("UUID=") {
        return find_by_uuid(devs, uuid);
    }
    if let Some(name) = spec.strip_prefix("PARTLABEL=") {
        return find_by_partlabel(devs, name);
    }
    let rel = spec.strip_prefix("/dev/")?;
    if let Some(label) = rel.strip_prefix("disk/by-label/") {
        return find_by_label(devs, label).map(|(d, _)| d);
    }
    if let Some(uuid) = rel.strip_prefix("disk/by-uuid/") {
        return find_by_uuid(devs, uuid);
    }
    if let Some(name) = rel.strip_prefix("disk/by-partlabel/") {
        return find_by_partlabel(devs, name);
    }
    // The kernel name first; else DEVNAME, the tail of devnode (dev_root is unknown here).
    devs.iter().find(|d| d.name == rel).or_else(|| {
        devs.iter()
            .find(|d| safe_devname(rel) && d.devnode.ends_with(rel))
    })
}

/// The Kairos labels that are only ever taken from the boot disk: a disk that is not the one
/// the machine booted from (a USB stick, a second disk with an old install) must not supply
/// the images, the OEM cloud-config, the persistent data or GRUB's partition.
pub const BOOT_DISK_LABELS: &[&str] = &[
    labels::STATE,
    labels::RECOVERY,
    labels::OEM,
    labels::PERSISTENT,
    labels::GRUB,
];

/// Where kairos-init records the boot disk's kernel name (one line); /run moves into the
/// system at switch_root, so the agent reads it there.
pub const BOOT_DISK_FILE: &str = "/run/kairos/boot-disk";

/// The label among `wanted` that `d` carries: its filesystem label, else the label its GPT
/// partition name stands for (a partition whose filesystem could not be probed).
pub fn carried_label<'l>(d: &BlockDev, wanted: &[&'l str]) -> Option<&'l str> {
    let fs_label = d.fs.as_ref().and_then(|f| f.label.as_deref());
    if let Some(l) = wanted.iter().find(|l| Some(**l) == fs_label) {
        return Some(l);
    }
    let part = d.partname.as_deref().filter(|_| d.is_partition)?;
    wanted
        .iter()
        .copied()
        .find(|l| labels::gpt_name_for(l) == Some(part))
}

/// How the boot disk was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootDiskRule {
    /// The disk of the COS_STATE whose filesystem UUID GRUB passed (`rd.kairos.state_uuid`).
    StateUuid,
    /// No (matching) `rd.kairos.state_uuid`: the disk of the first COS_STATE
    /// ([`find_by_label`]: partitions first, then natural name order).
    FirstState,
    /// The disk kairos-init recorded in [`BOOT_DISK_FILE`] (the agent's side).
    Recorded,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDisk {
    /// Kernel name of the whole disk, e.g. "sda".
    pub disk: String,
    pub rule: BootDiskRule,
}

/// The boot disk: the disk of the filesystem with `state_uuid` when given and present, else
/// that of the first COS_STATE. None when there is no COS_STATE at all (a live medium).
pub fn choose_boot_disk(devs: &[BlockDev], state_uuid: Option<&str>) -> Option<BootDisk> {
    if let Some(d) = state_uuid.and_then(|u| find_by_uuid(devs, u)) {
        return Some(BootDisk {
            disk: d.disk.clone(),
            rule: BootDiskRule::StateUuid,
        });
    }
    let (state, _) = find_by_label(devs, labels::STATE)?;
    Some(BootDisk {
        disk: state.disk.clone(),
        rule: BootDiskRule::FirstState,
    })
}

/// A device left out because it carries a Kairos label but is not on the boot disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub devnode: PathBuf,
    pub label: String,
    /// The boot disk's device node.
    pub boot_disk: PathBuf,
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ignoring {} (label {}): not on the boot disk {}",
            self.devnode.display(),
            self.label,
            self.boot_disk.display()
        )
    }
}

/// Splits `devs` into those that may be used (on `disk`, or carrying none of `wanted`) and
/// the others, which the caller logs. Order is kept.
pub fn restrict_to_disk(
    devs: Vec<BlockDev>,
    disk: &str,
    wanted: &[&str],
) -> (Vec<BlockDev>, Vec<Ignored>) {
    let boot_disk = devs.iter().find(|d| d.name == disk).map_or_else(
        || PathBuf::from(format!("/dev/{disk}")),
        |d| d.devnode.clone(),
    );
    let mut keep = Vec::with_capacity(devs.len());
    let mut ignored = Vec::new();
    for d in devs {
        match carried_label(&d, wanted) {
            Some(label) if d.disk != disk => ignored.push(Ignored {
                devnode: d.devnode.clone(),
                label: label.to_string(),
                boot_disk: boot_disk.clone(),
            }),
            _ => keep.push(d),
        }
    }
    (keep, ignored)
}

/// What the agent may use: the devices of `root`/sys and `root`/dev restricted to the boot
/// disk, chosen by the rule kairos-init used: the disk it recorded in [`BOOT_DISK_FILE`], else
/// the disk of the COS_STATE named by `rd.kairos.state_uuid` in /proc/cmdline (a dracut boot
/// through our GRUB), else that of the first COS_STATE. Never another disk.
pub struct BootScan {
    pub devices: Vec<BlockDev>,
    pub boot_disk: Option<BootDisk>,
    pub ignored: Vec<Ignored>,
}

pub fn scan_boot_disk(root: &Path) -> BootScan {
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    let devs = scan(&under("/sys"), &under("/dev"));
    let recorded = std::fs::read_to_string(under(BOOT_DISK_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains('/'));
    let boot_disk = match recorded {
        Some(disk) => Some(BootDisk {
            disk,
            rule: BootDiskRule::Recorded,
        }),
        None => {
            let cmdline = std::fs::read_to_string(under("/proc/cmdline")).unwrap_or_default();
            let (req, _) = crate::cmdline::parse(&cmdline);
            choose_boot_disk(&devs, req.state_uuid.as_deref())
        }
    };
    let Some(bd) = boot_disk else {
        return BootScan {
            devices: devs,
            boot_disk: None,
            ignored: Vec::new(),
        };
    };
    let (devices, ignored) = restrict_to_disk(devs, &bd.disk, BOOT_DISK_LABELS);
    BootScan {
        devices,
        boot_disk: Some(bd),
        ignored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::FsType;
    use std::fs;
    use std::os::unix::fs::symlink;

    struct Tree {
        _tmp: tempfile::TempDir,
        sys: PathBuf,
        dev: PathBuf,
    }

    fn tree() -> Tree {
        let tmp = tempfile::tempdir().expect("test setup");
        let sys = tmp.path().join("sys");
        let dev = tmp.path().join("dev");
        fs::create_dir_all(sys.join("class/block")).expect("test setup");
        fs::create_dir_all(&dev).expect("test setup");
        Tree {
            _tmp: tmp,
            sys,
            dev,
        }
    }

    impl Tree {
        /// A device dir under sys/devices with a class/block symlink to it, as sysfs has.
        fn add(&self, parent: Option<&str>, name: &str, sectors: u64, uevent: &str) {
            let rel = match parent {
                Some(p) => format!("devices/pci0000:00/virtio1/block/{p}/{name}"),
                None => format!("devices/pci0000:00/virtio1/block/{name}"),
            };
            let dir = self.sys.join(&rel);
            fs::create_dir_all(&dir).expect("test setup");
            fs::write(dir.join("size"), format!("{sectors}\n")).expect("test setup");
            fs::write(dir.join("uevent"), uevent).expect("test setup");
            if parent.is_some() {
                fs::write(dir.join("partition"), "1\n").expect("test setup");
            }
            symlink(
                format!("../../{rel}"),
                self.sys.join("class/block").join(name),
            )
            .expect("test setup");
        }

        fn part(&self, n: u32, partname: &str) {
            self.part_of("vda", n, partname);
        }

        fn part_of(&self, disk: &str, n: u32, partname: &str) {
            let name = format!("{disk}{n}");
            let uevent = format!(
                "MAJOR=254\nMINOR={n}\nDEVNAME={name}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={partname}\n"
            );
            self.add(Some(disk), &name, 8192, &uevent);
        }
    }

    /// A minimal ext2 superblock image (enough for probe) with a label and UUID byte.
    fn ext2_image(path: &Path, label: &str, uuid_byte: u8) {
        let mut img = vec![0u8; 4096];
        img[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        img[1024 + 104..1024 + 120].copy_from_slice(&[uuid_byte; 16]);
        img[1024 + 120..1024 + 120 + label.len()].copy_from_slice(label.as_bytes());
        fs::write(path, img).expect("test setup");
    }

    fn mkfs(tool: &str, args: &[&str]) -> bool {
        match std::process::Command::new(tool).args(args).output() {
            Ok(o) => o.status.success(),
            Err(_) => {
                println!("skipping {tool}: not installed");
                false
            }
        }
    }

    /// vda (whole disk) with vda1..vda10, plus devices list() must leave out.
    fn kairos_disk() -> Tree {
        let t = tree();
        t.add(
            None,
            "vda",
            1 << 21,
            "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
        );
        for (n, pn) in [
            (1, "bios"),
            (2, "efi"),
            (3, "oem"),
            (4, "recovery"),
            (5, "state"),
            (6, "persistent"),
            (7, "spare7"),
            (8, "spare8"),
            (9, "spare9"),
            (10, "spare10"),
        ] {
            t.part(n, pn);
        }
        t.add(None, "ram0", 8192, "DEVNAME=ram0\n");
        t.add(None, "zram0", 8192, "DEVNAME=zram0\n");
        t.add(None, "loop0", 0, "DEVNAME=loop0\n");
        t.add(None, "loop1", 2048, "DEVNAME=loop1\n");
        t.add(None, "sr0", 0, "DEVNAME=sr0\n");
        t
    }

    #[test]
    fn partition_names_give_their_disk() {
        for (part, disk) in [
            ("vda4", "vda"),
            ("sda10", "sda"),
            ("nvme0n1p2", "nvme0n1"),
            ("mmcblk0p1", "mmcblk0"),
            ("loop0p3", "loop0"),
        ] {
            assert_eq!(disk_of_partition_name(part), disk);
        }
    }

    #[test]
    fn natural_order() {
        let mut v = [
            "vda10",
            "vda2",
            "vdb",
            "vda",
            "vda1",
            "nvme0n1p10",
            "nvme0n1p9",
            "sda02",
            "sda1",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "nvme0n1p9",
                "nvme0n1p10",
                "sda1",
                "sda02",
                "vda",
                "vda1",
                "vda2",
                "vda10",
                "vdb"
            ]
        );
        assert_eq!(natural_cmp("a007", "a7"), Ordering::Less); // equal value: plain order decides
        assert_eq!(natural_cmp("x", "x"), Ordering::Equal);
        assert_eq!(
            natural_cmp("99999999999999999999999", "100000000000000000000000"),
            Ordering::Less
        );
    }

    #[test]
    fn list_reads_sysfs_without_probing() {
        let t = kairos_disk();
        let devs = list(&t.sys, &t.dev);
        let names: Vec<_> = devs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "loop1", "vda", "vda1", "vda2", "vda3", "vda4", "vda5", "vda6", "vda7", "vda8",
                "vda9", "vda10"
            ]
        );
        let vda = &devs[1];
        assert!(!vda.is_partition);
        assert_eq!(vda.partname, None);
        assert_eq!(vda.size_bytes, 1 << 30);
        assert_eq!(vda.devnode, t.dev.join("vda"));
        let vda5 = &devs[6];
        assert!(vda5.is_partition);
        assert_eq!(vda5.partname.as_deref(), Some("state"));
        assert_eq!(vda5.size_bytes, 8192 * 512);
        assert!(devs.iter().all(|d| d.fs.is_none()));
        assert!(list(&t.sys.join("nope"), &t.dev).is_empty());
    }

    #[test]
    fn devname_from_uevent_stays_in_dev_root() {
        let t = tree();
        t.add(None, "dm-0", 100, "DEVNAME=mapper/root\n");
        t.add(None, "evil", 100, "DEVNAME=../../etc/passwd\n");
        t.add(None, "bare", 100, "");
        let devs = list(&t.sys, &t.dev);
        let node = |n: &str| {
            devs.iter()
                .find(|d| d.name == n)
                .expect("test setup")
                .devnode
                .clone()
        };
        assert_eq!(node("dm-0"), t.dev.join("mapper/root"));
        assert_eq!(node("evil"), t.dev.join("evil"));
        assert_eq!(node("bare"), t.dev.join("bare"));
        assert_eq!(
            find_spec(&devs, "/dev/mapper/root")
                .expect("test setup")
                .name,
            "dm-0"
        );
        assert_eq!(
            find_spec(&devs, "/dev/dm-0").expect("test setup").name,
            "dm-0"
        );
        assert!(find_spec(&devs, "/dev/../dev/bare").is_none());
    }

    #[test]
    fn scan_probes_and_finds_labels() {
        let t = kairos_disk();
        let d = |n: &str| t.dev.join(n);
        // Real filesystems where the tools exist, synthetic superblocks otherwise.
        if !mkfs(
            "mkfs.vfat",
            &[
                "-n",
                "COS_GRUB",
                "-C",
                d("vda2").to_str().expect("test setup"),
                "2048",
            ],
        ) {
            ext2_image(&d("vda2"), "COS_GRUB", 2);
        }
        if !mkfs(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                "COS_STATE",
                d("vda5").to_str().expect("test setup"),
                "4M",
            ],
        ) {
            ext2_image(&d("vda5"), "COS_STATE", 5);
        }
        ext2_image(&d("vda3"), "COS_OEM", 3);
        ext2_image(&d("vda4"), "COS_RECOVERY", 4);
        // vda6 (persistent) is unreadable garbage: found by its GPT name only.
        fs::write(d("vda6"), vec![0x5a; 8192]).expect("test setup");
        // A duplicate COS_OEM that sorts after vda3 naturally, before it lexically.
        ext2_image(&d("vda10"), "COS_OEM", 10);
        ext2_image(&d("loop1"), "COS_ACTIVE", 0xab);
        // vda, vda1, vda7..vda9 have no node at all (probe error): fs None, not fatal.

        let devs = scan(&t.sys, &t.dev);
        assert_eq!(devs.len(), 12);
        let fs_of = |n: &str| {
            devs.iter()
                .find(|x| x.name == n)
                .expect("test setup")
                .fs
                .clone()
        };
        assert_eq!(fs_of("vda1"), None);
        assert_eq!(fs_of("vda6"), None);
        assert_eq!(
            fs_of("vda5").expect("test setup").label.as_deref(),
            Some("COS_STATE")
        );

        let (state, others) = find_by_label(&devs, labels::STATE).expect("test setup");
        assert_eq!((state.name.as_str(), others.len()), ("vda5", 0));
        assert_eq!(state.devnode, d("vda5"));
        let (grub, _) = find_by_label(&devs, labels::GRUB).expect("test setup");
        assert_eq!(grub.name, "vda2");
        assert!(matches!(
            grub.fs.as_ref().expect("test setup").fstype,
            FsType::Vfat | FsType::Ext2
        ));

        let (oem, dups) = find_by_label(&devs, labels::OEM).expect("test setup");
        assert_eq!(oem.name, "vda3");
        assert_eq!(
            dups.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["vda10"]
        );

        let (pers, dups) = find_by_label(&devs, labels::PERSISTENT).expect("test setup");
        assert_eq!((pers.name.as_str(), dups.len()), ("vda6", 0));

        let (active, _) = find_by_label(&devs, labels::ACTIVE).expect("test setup");
        assert_eq!(active.name, "loop1");
        assert!(find_by_label(&devs, labels::PASSIVE).is_none());
        assert!(find_by_label(&devs, "NOPE").is_none());

        // Order of the input slice does not matter.
        let mut rev = devs.clone();
        rev.reverse();
        let (oem, dups) = find_by_label(&rev, labels::OEM).expect("test setup");
        assert_eq!(
            (oem.name.as_str(), dups[0].name.as_str()),
            ("vda3", "vda10")
        );

        let uuid = "abababab-abab-abab-abab-abababababab";
        assert_eq!(find_by_uuid(&devs, uuid).expect("test setup").name, "loop1");
        assert_eq!(
            find_by_uuid(&devs, &uuid.to_uppercase())
                .expect("test setup")
                .name,
            "loop1"
        );
        assert!(find_by_uuid(&devs, "00000000-0000-0000-0000-000000000001").is_none());

        let spec = |s: &str| find_spec(&devs, s).map(|d| d.name.as_str());
        assert_eq!(spec("LABEL=COS_STATE"), Some("vda5"));
        assert_eq!(spec("LABEL=COS_PERSISTENT"), Some("vda6"));
        assert_eq!(
            spec(&format!("UUID={}", uuid.to_uppercase())),
            Some("loop1")
        );
        assert_eq!(spec("PARTLABEL=recovery"), Some("vda4"));
        assert_eq!(spec("PARTLABEL=nope"), None);
        assert_eq!(spec("/dev/vda10"), Some("vda10"));
        assert_eq!(spec("/dev/vda11"), None);
        assert_eq!(spec("/dev/disk/by-label/COS_OEM"), Some("vda3"));
        assert_eq!(spec(&format!("/dev/disk/by-uuid/{uuid}")), Some("loop1"));
        assert_eq!(spec("/dev/disk/by-partlabel/state"), Some("vda5"));
        assert_eq!(spec("vda5"), None);
        assert_eq!(spec("LABEL="), None);
    }

    #[test]
    fn a_partition_beats_a_whole_device_with_the_same_label() {
        let dev = |name: &str, part: bool| BlockDev {
            name: name.into(),
            devnode: PathBuf::from(format!("/dev/{name}")),
            partname: None,
            is_partition: part,
            disk: name.trim_end_matches(|c: char| c.is_ascii_digit()).into(),
            size_bytes: 1 << 20,
            fs: Some(FsInfo {
                fstype: probe::FsType::Ext4,
                label: Some(labels::STATE.into()),
                uuid: None,
            }),
        };
        // vda is a stray whole-disk filesystem that sorts first by name.
        let devs = [dev("vda", false), dev("vdc4", true), dev("vdb4", true)];
        let (first, dups) = find_by_label(&devs, labels::STATE).expect("found");
        assert_eq!(first.name, "vdb4");
        assert_eq!(
            dups.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["vdc4", "vda"]
        );
    }

    /// Issue 14: an ISO written to a USB stick. xorriso's hybrid image has the ISO 9660
    /// volume on the whole disk and a GPT whose partitions (the gaps, the EFI image) carry no
    /// such label: the whole disk is the medium. An image made with a partition offset has a
    /// second superblock in partition 1: then that one, and only one device either way.
    #[test]
    fn a_live_stick_is_found_on_its_whole_disk() {
        let dev = |name: &str, part: bool, fs: Option<(probe::FsType, Option<&str>)>| BlockDev {
            name: name.into(),
            devnode: PathBuf::from(format!("/dev/{name}")),
            partname: None,
            is_partition: part,
            disk: "sda".into(),
            size_bytes: 1 << 20,
            fs: fs.map(|(fstype, label)| FsInfo {
                fstype,
                label: label.map(str::to_string),
                uuid: None,
            }),
        };
        let iso = Some((probe::FsType::Iso9660, Some("COS_LIVE")));
        let mut devs = vec![
            dev("sda", false, iso),
            dev("sda1", true, None),
            dev("sda2", true, Some((probe::FsType::Vfat, None))),
            dev("sda3", true, None),
            dev("vda", false, None),
        ];
        let (first, dups) = find_by_label(&devs, "COS_LIVE").expect("found");
        assert_eq!((first.name.as_str(), dups.len()), ("sda", 0));
        assert_eq!(
            find_spec(&devs, "LABEL=COS_LIVE").map(|d| d.name.as_str()),
            Some("sda")
        );
        devs[1].fs = iso.map(|(t, l)| FsInfo {
            fstype: t,
            label: l.map(str::to_string),
            uuid: None,
        });
        assert_eq!(
            find_spec(&devs, "LABEL=COS_LIVE").map(|d| d.name.as_str()),
            Some("sda1")
        );
    }

    /// Issue 15 item 2: a stray disk (sda) carrying COS_STATE, COS_OEM and COS_PERSISTENT
    /// sorts before the Kairos disk GRUB booted from (vda). Only vda's partitions are used;
    /// the stray's are named for the log; unlabelled devices elsewhere stay.
    #[test]
    fn only_the_boot_disk_supplies_kairos_partitions() {
        let t = tree();
        let disk = |n: &str| format!("MAJOR=8\nMINOR=0\nDEVNAME={n}\nDEVTYPE=disk\n");
        t.add(None, "sda", 1 << 20, &disk("sda"));
        t.add(None, "vda", 1 << 20, &disk("vda"));
        t.add(None, "vdb", 1 << 20, &disk("vdb"));
        let d = |n: &str| t.dev.join(n);
        for (n, pn, label) in [
            (2, "oem", "COS_OEM"),
            (4, "state", "COS_STATE"),
            (5, "persistent", "COS_PERSISTENT"),
        ] {
            t.part_of("sda", n, pn);
            ext2_image(&d(&format!("sda{n}")), label, 0x50 + n as u8);
            t.part_of("vda", n, pn);
            ext2_image(&d(&format!("vda{n}")), label, 0x10 + n as u8);
        }
        // vda3: recovery found by its GPT name only; sda3 likewise, and must go too.
        t.part_of("vda", 3, "recovery");
        t.part_of("sda", 3, "recovery");
        // A data disk with no Kairos label is none of this rule's business.
        t.part_of("vdb", 1, "data");
        ext2_image(&d("vdb1"), "DATA", 0x77);
        let devs = scan(&t.sys, &t.dev);
        let disk_of = |n: &str| {
            devs.iter()
                .find(|x| x.name == n)
                .expect("listed")
                .disk
                .clone()
        };
        assert_eq!(disk_of("sda4"), "sda");
        assert_eq!(disk_of("vda3"), "vda");
        assert_eq!(disk_of("vdb"), "vdb");

        // The old rule took every label from the stray disk that sorts first.
        let (state, _) = find_by_label(&devs, labels::STATE).expect("COS_STATE");
        assert_eq!(state.name, "sda4");

        // GRUB named vda4's filesystem: vda is the boot disk.
        let vda4_uuid = "14141414-1414-1414-1414-141414141414";
        let bd = choose_boot_disk(&devs, Some(vda4_uuid)).expect("boot disk");
        assert_eq!(
            bd,
            BootDisk {
                disk: "vda".into(),
                rule: BootDiskRule::StateUuid
            }
        );
        let (kept, ignored) = restrict_to_disk(devs.clone(), &bd.disk, BOOT_DISK_LABELS);
        for label in [
            labels::STATE,
            labels::OEM,
            labels::PERSISTENT,
            labels::RECOVERY,
        ] {
            let (dev, dups) = find_by_label(&kept, label).expect(label);
            assert_eq!(dev.disk, "vda", "{label}");
            assert!(dups.is_empty(), "{label}");
        }
        assert!(kept.iter().any(|x| x.name == "vdb1") && kept.iter().any(|x| x.name == "sda"));
        let msgs: Vec<String> = ignored.iter().map(|i| i.to_string()).collect();
        let dev = t.dev.display();
        assert_eq!(
            msgs,
            [2, 3, 4, 5].map(|n| {
                let l = ["COS_OEM", "COS_RECOVERY", "COS_STATE", "COS_PERSISTENT"][n - 2];
                format!("ignoring {dev}/sda{n} (label {l}): not on the boot disk {dev}/vda")
            })
        );

        // No (or an unknown) UUID: the disk of the first COS_STATE, as before.
        for uuid in [None, Some("00000000-0000-0000-0000-000000000009")] {
            let bd = choose_boot_disk(&devs, uuid).expect("boot disk");
            assert_eq!(
                bd,
                BootDisk {
                    disk: "sda".into(),
                    rule: BootDiskRule::FirstState
                }
            );
        }
        // No COS_STATE anywhere (a live medium): no boot disk.
        let none: Vec<BlockDev> = devs.iter().filter(|x| x.disk == "vdb").cloned().collect();
        assert_eq!(choose_boot_disk(&none, None), None);
    }

    /// The agent's side: the disk kairos-init recorded wins, else GRUB's parameter in
    /// /proc/cmdline, else the first COS_STATE; only that disk's partitions come back.
    #[test]
    fn the_agent_scans_the_recorded_boot_disk() {
        let tmp = tempfile::tempdir().expect("test setup");
        let root = tmp.path();
        let t = Tree {
            sys: root.join("sys"),
            dev: root.join("dev"),
            _tmp: tempfile::tempdir().expect("test setup"),
        };
        fs::create_dir_all(t.sys.join("class/block")).expect("test setup");
        fs::create_dir_all(&t.dev).expect("test setup");
        for disk in ["sda", "vda"] {
            t.add(
                None,
                disk,
                1 << 20,
                &format!("DEVNAME={disk}\nDEVTYPE=disk\n"),
            );
            t.part_of(disk, 5, "persistent");
            t.part_of(disk, 4, "state");
        }
        ext2_image(&t.dev.join("sda4"), "COS_STATE", 0xaa);
        ext2_image(&t.dev.join("vda4"), "COS_STATE", 0xbb);
        let persistent = |s: &BootScan| {
            find_by_label(&s.devices, labels::PERSISTENT)
                .map(|(d, dups)| (d.name.clone(), dups.len()))
        };
        // Nothing recorded, nothing on the command line: the first COS_STATE's disk.
        let s = scan_boot_disk(root);
        assert_eq!(s.boot_disk.as_ref().map(|b| b.disk.as_str()), Some("sda"));
        assert_eq!(persistent(&s), Some(("sda5".into(), 0)));
        // GRUB's parameter (a dracut boot): vda.
        fs::create_dir_all(root.join("proc")).expect("test setup");
        fs::write(
            root.join("proc/cmdline"),
            "root=LABEL=COS_ACTIVE rd.kairos.state_uuid=BBBBBBBB-BBBB-BBBB-BBBB-BBBBBBBBBBBB\n",
        )
        .expect("test setup");
        let s = scan_boot_disk(root);
        assert_eq!(
            s.boot_disk.clone().map(|b| (b.disk, b.rule)),
            Some(("vda".into(), BootDiskRule::StateUuid))
        );
        assert_eq!(persistent(&s), Some(("vda5".into(), 0)));
        assert_eq!(s.ignored.len(), 2);
        // What kairos-init recorded wins over both.
        fs::create_dir_all(root.join("run/kairos")).expect("test setup");
        fs::write(root.join("run/kairos/boot-disk"), "sda\n").expect("test setup");
        let s = scan_boot_disk(root);
        assert_eq!(
            s.boot_disk.clone().map(|b| (b.disk, b.rule)),
            Some(("sda".into(), BootDiskRule::Recorded))
        );
        assert_eq!(persistent(&s), Some(("sda5".into(), 0)));
        assert_eq!(
            s.ignored
                .iter()
                .map(|i| i.label.as_str())
                .collect::<Vec<_>>(),
            ["COS_STATE", "COS_PERSISTENT"]
        );
    }

    #[test]
    fn gpt_fallback_only_for_partitions_and_known_labels() {
        let t = tree();
        // A whole disk claiming PARTNAME must not count; neither must an unknown label.
        t.add(None, "vdb", 100, "DEVNAME=vdb\nPARTNAME=state\n");
        t.part(5, "state");
        t.part(15, "state");
        let devs = scan(&t.sys, &t.dev);
        let (first, dups) = find_by_label(&devs, labels::STATE).expect("test setup");
        assert_eq!(first.name, "vda5");
        assert_eq!(
            dups.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["vda15"]
        );
        assert!(find_by_label(&devs, "state").is_none());
    }

    #[test]
    fn parse_uevent_reads_partname_and_ignores_junk() {
        let u = parse_uevent(
            "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=oem \n",
        );
        assert_eq!(
            u,
            Uevent {
                devname: Some("vda2".into()),
                is_partition: true,
                partname: Some("oem".into()),
            }
        );
        // No "=", empty values, keys that only share a prefix, DEVNAME climbing out of /dev.
        let u = parse_uevent("PARTNAME\nPARTNAMEX=a\nPARTNAME=\nDEVNAME=../sda\n\u{0}=\n");
        assert_eq!(u, Uevent::default());
        assert_eq!(parse_uevent(""), Uevent::default());
    }

    #[test]
    fn wait_for_more_sees_a_late_disk_and_its_partitions() {
        let t = tree();
        let whole = "MAJOR=254\nMINOR=32\nDEVNAME=vdc\nDEVTYPE=disk\n";
        t.add(None, "vdc", 8192, whole);
        let known = list(&t.sys, &t.dev);
        let short = std::time::Duration::from_millis(300);
        assert!(wait_for_more(&t.sys, &t.dev, &known, short).is_none());
        let (devs, added) = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                t.add(
                    None,
                    "vda",
                    65536,
                    "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
                );
                // The partition follows the disk: a poll in between sees the disk alone.
                t.part(4, "state");
            });
            wait_for_more(&t.sys, &t.dev, &known, std::time::Duration::from_secs(5))
                .expect("the late disk is seen")
        });
        assert_eq!(added, ["vda", "vda4"]);
        assert_eq!(devs.len(), 3);
    }
}
