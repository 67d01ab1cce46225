//! The target disk: is it a whole block device, how big, is any part of it in use (mounted or
//! swap), re-reading its partition table and waiting for the partition nodes.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kairos_init::sys::blk::{BLKPG_ADD_PARTITION, BLKPG_DEL_PARTITION, blkpg};

use kairos_init::labels;
use kairos_init::mountinfo::{self, parse_majmin};

use super::InstallError;
use crate::Ctx;

/// A whole disk and what sysfs says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// As given (e.g. /dev/vdb).
    pub path: PathBuf,
    /// The kernel's name (vdb, nvme0n1, loop3).
    pub name: String,
    pub size: u64,
    /// (major, minor) of the disk and of every partition it has now, with their names.
    pub nodes: Vec<(String, u32, u32)>,
}

/// A kernel name and a partition number → the partition's name (`vdb` 1 → `vdb1`,
/// `nvme0n1` 1 → `nvme0n1p1`, `loop3` 1 → `loop3p1`).
pub fn partition_name(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

/// What in `mountinfo` (/proc/self/mountinfo) and `swaps` (/proc/swaps) uses one of `nodes`
/// (name, major, minor): one description per use, empty when the disk is free.
pub fn uses(mountinfo: &str, swaps: &str, nodes: &[(String, u32, u32)]) -> Vec<String> {
    let by_name = |src: &str| {
        let base = src.rsplit('/').next().unwrap_or(src);
        src.starts_with("/dev/") && nodes.iter().any(|(n, _, _)| n == base)
    };
    // (device, first mount point, how many more): bind mounts repeat a device many times.
    let mut mounted: Vec<(String, String, usize)> = Vec::new();
    for m in mountinfo::parse(mountinfo) {
        let hit = m
            .device
            .and_then(|(ma, mi)| nodes.iter().find(|(_, a, b)| (*a, *b) == (ma, mi)))
            .map(|(n, _, _)| format!("/dev/{n}"))
            .or_else(|| by_name(&m.source).then(|| m.source.clone()));
        if let Some(dev) = hit {
            match mounted.iter_mut().find(|(d, _, _)| *d == dev) {
                Some(e) => e.2 += 1,
                None => mounted.push((dev, m.mountpoint, 0)),
            }
        }
    }
    let mut out: Vec<String> = mounted
        .into_iter()
        .map(|(dev, point, more)| match more {
            0 => format!("{dev} is mounted at {point}"),
            n => format!("{dev} is mounted at {point} and {n} more place(s)"),
        })
        .collect();
    for line in swaps.lines().skip(1) {
        if let Some(src) = line.split_ascii_whitespace().next()
            && by_name(src)
        {
            out.push(format!("{src} is in use as swap"));
        }
    }
    out
}

/// Opens `path` as a whole disk: a block device (or, with `allow_file`, a regular file:
/// tests), not a partition; with its size and current partitions from sysfs.
pub fn inspect(ctx: &Ctx, path: &Path, allow_file: bool) -> Result<Disk, InstallError> {
    let md = std::fs::metadata(path).map_err(|e| InstallError::Device {
        device: path.to_path_buf(),
        what: format!("cannot stat it: {e}"),
    })?;
    if md.file_type().is_file() && allow_file {
        return Ok(Disk {
            path: path.to_path_buf(),
            name: String::new(),
            size: md.len(),
            nodes: Vec::new(),
        });
    }
    if !md.file_type().is_block_device() {
        return Err(InstallError::Device {
            device: path.to_path_buf(),
            what: "not a block device".into(),
        });
    }
    let (ma, mi) = (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev()));
    let link = ctx.path(format!("/sys/dev/block/{ma}:{mi}"));
    let real = std::fs::canonicalize(&link).map_err(|e| InstallError::Device {
        device: path.to_path_buf(),
        what: format!("{}: {e}", link.display()),
    })?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if real.join("partition").exists() {
        return Err(InstallError::Device {
            device: path.to_path_buf(),
            what: format!("{name} is a partition; give the whole disk"),
        });
    }
    let sectors: u64 = std::fs::read_to_string(real.join("size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| InstallError::Device {
            device: path.to_path_buf(),
            what: format!("no size in {}", real.join("size").display()),
        })?;
    let mut nodes = vec![(name.clone(), ma, mi)];
    if let Ok(rd) = std::fs::read_dir(&real) {
        for e in rd.flatten() {
            let p = e.path();
            if !p.join("partition").exists() {
                continue;
            }
            if let Some((a, b)) = std::fs::read_to_string(p.join("dev"))
                .ok()
                .and_then(|s| parse_majmin(&s))
            {
                nodes.push((e.file_name().to_string_lossy().into_owned(), a, b));
            }
        }
    }
    Ok(Disk {
        path: path.to_path_buf(),
        name,
        size: sectors * 512,
        nodes,
    })
}

/// Where kairos-init mounts the live medium (SPEC: live paths); it stays mounted after
/// switch_root because the squashfs root is read through it.
pub const LIVE_MOUNT: &str = "/run/initramfs/live";

/// The labels that mark a disk as holding a Kairos installation.
pub const INSTALLED_LABELS: &[&str] = &[labels::STATE, labels::PERSISTENT];

/// A whole disk as `install.device: auto` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The kernel's name (vda, sda, nvme0n1).
    pub name: String,
    pub size: u64,
    /// Why it is never a target: it holds the live system, or something uses it. None when
    /// free.
    pub busy: Option<String>,
    /// `removable` (sysfs says so) or `USB-attached`; None for a fixed disk.
    pub removable: Option<&'static str>,
    /// The Kairos labels on it, as `COS_STATE on /dev/vda4`.
    pub kairos: Vec<String>,
}

impl Candidate {
    /// One line for a log: `vdb 8192 MiB (removable)`.
    pub fn describe(&self) -> String {
        let mut why: Vec<String> = Vec::new();
        if let Some(b) = &self.busy {
            why.push(b.clone());
        }
        if let Some(r) = self.removable {
            why.push(r.into());
        }
        if !self.kairos.is_empty() {
            why.push(format!("Kairos: {}", self.kairos.join(", ")));
        }
        if self.size == 0 {
            why.push("no size".into());
        }
        let mut line = format!("{} {} MiB", self.name, self.size >> 20);
        if !why.is_empty() {
            line.push_str(&format!(" ({})", why.join("; ")));
        }
        line
    }
}

/// What `install.device: auto` may take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AutoPolicy {
    /// Removable and USB-attached disks too (`install.allow-removable`).
    pub removable: bool,
    /// A disk holding a Kairos installation too (`install.force`, or a person running
    /// `kairos-agent install` by hand).
    pub kairos: bool,
}

/// The outcome of [`choose_auto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoChoice<'a> {
    Disk(&'a Candidate),
    /// A disk `auto` could take already holds Kairos, and the policy does not allow that:
    /// nothing is chosen at all, so a live medium left in an installed node never installs a
    /// second system next to the first.
    HoldsKairos(&'a Candidate),
    Nothing,
}

/// The largest disk (ties: first by name) that is not busy (in use, the live medium) and,
/// unless `policy` allows them, not removable or USB-attached. Without `policy.kairos`, any
/// such disk holding Kairos refuses the whole choice ([`AutoChoice::HoldsKairos`]).
pub fn choose_auto(disks: &[Candidate], policy: AutoPolicy) -> AutoChoice<'_> {
    let eligible = || {
        disks.iter().filter(move |d| {
            d.busy.is_none() && d.size > 0 && (policy.removable || d.removable.is_none())
        })
    };
    if !policy.kairos
        && let Some(k) = eligible().find(|d| !d.kairos.is_empty())
    {
        return AutoChoice::HoldsKairos(k);
    }
    eligible()
        .max_by(|a, b| a.size.cmp(&b.size).then(b.name.cmp(&a.name)))
        .map_or(AutoChoice::Nothing, AutoChoice::Disk)
}

/// Kernel names that are never install targets.
fn not_a_target(name: &str) -> bool {
    ["loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A block device in sysfs: (name, major, minor, GPT partition name).
type SysNode = (String, u32, u32, Option<String>);

/// A whole disk under `sys`/block: its size, whether removable or on a USB bus, and its own
/// and its partitions' numbers.
struct SysDisk {
    name: String,
    size: u64,
    removable: Option<&'static str>,
    nodes: Vec<SysNode>,
}

/// `sys`/block/NAME: whole disks (loop devices included: they can back the live medium).
fn sys_disks(sys: &Path) -> Vec<SysDisk> {
    let block = sys.join("block");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&block) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dir = block.join(&name);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let size = read(&dir.join("size"))
            .trim()
            .parse::<u64>()
            .map_or(0, |s| s.saturating_mul(512));
        let Some((ma, mi)) = parse_majmin(&read(&dir.join("dev"))) else {
            continue;
        };
        // A USB stick or disk: its sysfs path runs through a USB bus (…/usb2/2-1/…).
        let usb = std::fs::read_link(&dir).is_ok_and(|l| {
            l.components().any(|c| {
                c.as_os_str().to_str().is_some_and(|c| {
                    c.strip_prefix("usb")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                })
            })
        });
        let removable = if read(&dir.join("removable")).trim() == "1" {
            Some("removable")
        } else if usb {
            Some("USB-attached")
        } else {
            None
        };
        let mut nodes = vec![(name.clone(), ma, mi, None)];
        if let Ok(parts) = std::fs::read_dir(&dir) {
            for p in parts.flatten() {
                let pdir = p.path();
                if !pdir.join("partition").exists() {
                    continue;
                }
                if let Some((a, b)) = parse_majmin(&read(&pdir.join("dev"))) {
                    let partname =
                        kairos_init::blockdev::parse_uevent(&read(&pdir.join("uevent"))).partname;
                    nodes.push((p.file_name().to_string_lossy().into_owned(), a, b, partname));
                }
            }
        }
        nodes.sort();
        out.push(SysDisk {
            name,
            size,
            removable,
            nodes,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The disk owning device `majmin` (the disk itself or one of its partitions).
fn owner(disks: &[SysDisk], majmin: (u32, u32)) -> Option<&SysDisk> {
    disks
        .iter()
        .find(|d| d.nodes.iter().any(|n| (n.1, n.2) == majmin))
}

/// The disks a loop device `name` ultimately reads from: the device of the filesystem
/// holding its backing file (`sys`/block/NAME/loop/backing_file), following loops of loops.
fn loop_backing_disk<'a>(sys: &Path, disks: &'a [SysDisk], name: &str) -> Option<&'a SysDisk> {
    use std::os::unix::fs::MetadataExt;
    let mut name = name.to_string();
    for _ in 0..8 {
        let file = std::fs::read_to_string(sys.join("block").join(&name).join("loop/backing_file"))
            .ok()?;
        let dev = std::fs::metadata(file.trim_end_matches('\n')).ok()?.dev();
        let d = owner(disks, (rustix::fs::major(dev), rustix::fs::minor(dev)))?;
        if !d.name.starts_with("loop") {
            return Some(d);
        }
        name = d.name.clone();
    }
    None
}

/// The whole disks under `ctx`'s /sys/block that could be install targets, with why each
/// cannot be (busy: the live medium, mounted, swap, backing a loop device), whether it is
/// removable, and the Kairos labels on it (read from the superblocks under `ctx`'s /dev, or
/// the GPT names: no udev needed). `mountinfo` and `swaps` are the texts of
/// /proc/self/mountinfo and /proc/swaps.
pub fn candidates(ctx: &Ctx, mountinfo: &str, swaps: &str) -> Vec<Candidate> {
    let sys = ctx.path("/sys");
    let disks = sys_disks(&sys);
    // The live medium: what is mounted at /run/initramfs/live, through a loop device when
    // the medium is an image file.
    let table = mountinfo::parse(mountinfo);
    let live = mountinfo::mounted_at(&table, LIVE_MOUNT).and_then(|m| {
        let (mm, src) = (m.device?, m.source.clone());
        let d = owner(&disks, mm)?;
        let d = if d.name.starts_with("loop") {
            loop_backing_disk(&sys, &disks, &d.name)?
        } else {
            d
        };
        Some((d.name.clone(), src))
    });
    // Disks whose filesystems back a loop device (the live squashfs is one).
    let mut backing: Vec<(String, String)> = Vec::new();
    for l in disks.iter().filter(|d| d.name.starts_with("loop")) {
        if let Some(d) = loop_backing_disk(&sys, &disks, &l.name) {
            backing.push((d.name.clone(), l.name.clone()));
        }
    }
    let mut out = Vec::new();
    for d in disks.iter().filter(|d| !not_a_target(&d.name)) {
        let nodes: Vec<(String, u32, u32)> =
            d.nodes.iter().map(|n| (n.0.clone(), n.1, n.2)).collect();
        let mut busy: Vec<String> = Vec::new();
        if let Some((_, src)) = live.as_ref().filter(|(n, _)| *n == d.name) {
            busy.push(format!(
                "it holds the live system ({src} is mounted at {LIVE_MOUNT})"
            ));
        } else {
            busy.extend(uses(mountinfo, swaps, &nodes));
        }
        let loops: Vec<&str> = backing
            .iter()
            .filter(|(disk, _)| *disk == d.name)
            .map(|(_, l)| l.as_str())
            .collect();
        if !loops.is_empty() {
            busy.push(format!("it backs {}", loops.join(", ")));
        }
        out.push(Candidate {
            name: d.name.clone(),
            size: d.size,
            busy: (!busy.is_empty()).then(|| busy.join("; ")),
            removable: d.removable,
            kairos: kairos_labels(ctx, &d.nodes),
        });
    }
    out
}

/// `COS_STATE on /dev/vda4`, … for the nodes (disk and partitions) carrying one of
/// [`INSTALLED_LABELS`]: a filesystem label read from the superblock, else the GPT name.
fn kairos_labels(ctx: &Ctx, nodes: &[SysNode]) -> Vec<String> {
    use kairos_init::blockdev::{BlockDev, carried_label};
    nodes
        .iter()
        .enumerate()
        .filter_map(|(i, (name, _, _, partname))| {
            let devnode = ctx.path(format!("/dev/{name}"));
            let dev = BlockDev {
                name: name.clone(),
                fs: kairos_init::probe::probe_path(&devnode).ok().flatten(),
                devnode,
                partname: partname.clone(),
                is_partition: i > 0,
                disk: nodes[0].0.clone(),
                size_bytes: 0,
            };
            carried_label(&dev, INSTALLED_LABELS).map(|l| format!("{l} on /dev/{name}"))
        })
        .collect()
}

/// The Kairos labels on `disk` (see [`candidates`]); empty for a disk without them or a
/// regular file.
pub fn installed_labels(ctx: &Ctx, disk: &Disk) -> Vec<String> {
    if disk.name.is_empty() {
        return Vec::new();
    }
    let sys = ctx.path("/sys");
    sys_disks(&sys)
        .into_iter()
        .find(|d| d.name == disk.name)
        .map(|d| kairos_labels(ctx, &d.nodes))
        .unwrap_or_default()
}

/// The texts of /proc/self/mountinfo and /proc/swaps under the root and, when the root is
/// not `/`, this process's own too: a --root pointing elsewhere never hides the running
/// system's disks.
fn mount_tables(ctx: &Ctx) -> (String, String) {
    let mut mountinfo =
        std::fs::read_to_string(ctx.path("/proc/self/mountinfo")).unwrap_or_default();
    let mut swaps = std::fs::read_to_string(ctx.path("/proc/swaps")).unwrap_or_default();
    if ctx.root != Path::new("/") {
        for (text, file) in [
            (&mut mountinfo, "/proc/self/mountinfo"),
            (&mut swaps, "/proc/swaps"),
        ] {
            text.push('\n');
            text.push_str(&std::fs::read_to_string(file).unwrap_or_default());
        }
    }
    (mountinfo, swaps)
}

/// [`candidates`] of this system, for a screen listing the disks.
pub fn seen_disks(ctx: &Ctx) -> Vec<Candidate> {
    let (mountinfo, swaps) = mount_tables(ctx);
    candidates(ctx, &mountinfo, &swaps)
}

/// `install.device: auto`: [`choose_auto`] over [`candidates`]. Never the live medium or a
/// disk in use; removable and USB disks only with `policy.removable`; a disk holding Kairos
/// only with `policy.kairos` (else [`InstallError::HoldsKairos`] names it).
pub fn pick_auto(ctx: &Ctx, policy: AutoPolicy) -> Result<(PathBuf, Candidate), InstallError> {
    let (mountinfo, swaps) = mount_tables(ctx);
    let seen = candidates(ctx, &mountinfo, &swaps);
    match choose_auto(&seen, policy) {
        AutoChoice::Disk(d) => Ok((PathBuf::from(format!("/dev/{}", d.name)), d.clone())),
        AutoChoice::HoldsKairos(d) => Err(InstallError::HoldsKairos {
            device: PathBuf::from(format!("/dev/{}", d.name)),
            found: d.kairos.join(", "),
        }),
        AutoChoice::Nothing => Err(InstallError::NoAutoDevice {
            checked: if seen.is_empty() {
                "no disks under /sys/block".into()
            } else {
                seen.iter()
                    .map(Candidate::describe)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            removable: !policy.removable && seen.iter().any(|d| d.removable.is_some()),
        }),
    }
}

/// Refuses a disk any part of which is mounted or used as swap.
pub fn check_unused(ctx: &Ctx, disk: &Disk) -> Result<(), InstallError> {
    let (mountinfo, swaps) = mount_tables(ctx);
    let u = uses(&mountinfo, &swaps, &disk.nodes);
    if u.is_empty() {
        return Ok(());
    }
    Err(InstallError::InUse {
        device: disk.path.clone(),
        uses: u.join("; "),
    })
}

/// BLKRRPART: the kernel re-reads the partition table (`blockdev --rereadpt` as a fallback).
/// Ok(false) when the device does not scan partitions at all (EINVAL: a loop device attached
/// without LO_FLAGS_PARTSCAN).
fn reread(f: &File, disk: &Path) -> Result<bool, InstallError> {
    let r = kairos_init::sys::blk::reread_partitions(f);
    match &r {
        Ok(()) => return Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
        Err(_) => {}
    }
    let out = std::process::Command::new("blockdev")
        .arg("--rereadpt")
        .arg(disk)
        .output();
    match (r, out) {
        (_, Ok(o)) if o.status.success() => Ok(true),
        (Err(e), _) => Err(InstallError::Partitions {
            device: disk.to_path_buf(),
            what: format!("re-reading the partition table (BLKRRPART): {e}"),
        }),
        (Ok(()), _) => Ok(true),
    }
}

/// Adds partitions `(number, first byte, length in bytes)` to `disk` with BLKPG, as
/// `partx -a` does: for kernels that cannot parse the GPT just written (built without
/// CONFIG_EFI_PARTITION), so BLKRRPART left the disk without partitions. Ones the kernel
/// already has (EBUSY) are skipped.
pub fn add_partitions(
    f: &File,
    disk: &Path,
    parts: &[(u32, u64, u64)],
) -> Result<(), InstallError> {
    for &(pno, start, length) in parts {
        match blkpg(f, BLKPG_ADD_PARTITION, pno, start, length) {
            Err(e) if e.raw_os_error() != Some(libc::EBUSY) => {
                return Err(InstallError::Partitions {
                    device: disk.to_path_buf(),
                    what: format!("adding partition {pno} (BLKPG_ADD_PARTITION): {e}"),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes partitions `numbers` of `disk` from the kernel's view (`partx -d`), so a loop
/// device detaches without leaving them behind; ones it does not have (ENXIO) are skipped.
pub fn remove_partitions(f: &File, disk: &Path, numbers: &[u32]) -> Result<(), InstallError> {
    for &pno in numbers {
        match blkpg(f, BLKPG_DEL_PARTITION, pno, 0, 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENXIO) => {
                return Err(InstallError::Partitions {
                    device: disk.to_path_buf(),
                    what: format!("removing partition {pno} (BLKPG_DEL_PARTITION): {e}"),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// The kernel learns the partitions just written to `disk` (held open as `f`): BLKRRPART,
/// and when partition 1 is not in sysfs within 3 s (a kernel without a GPT parser),
/// BLKPG for each of `parts` (number, first byte, length). True when BLKPG was needed.
pub fn publish(
    ctx: &Ctx,
    f: &File,
    disk: &Disk,
    parts: &[(u32, u64, u64)],
) -> Result<bool, InstallError> {
    if !reread(f, &disk.path)? {
        add_partitions(f, &disk.path, parts)?;
        return Ok(true);
    }
    let sys = sys_dev(ctx, disk, 1);
    let start = Instant::now();
    while !sys.exists() {
        if start.elapsed() > Duration::from_secs(3) {
            add_partitions(f, &disk.path, parts)?;
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(false)
}

/// sysfs's `dev` file of partition `n` of `disk`.
fn sys_dev(ctx: &Ctx, disk: &Disk, n: u32) -> PathBuf {
    ctx.path(format!(
        "/sys/class/block/{}/{}/dev",
        disk.name,
        partition_name(&disk.name, n)
    ))
}

/// Waits up to `timeout` for partition `n` of `disk` in sysfs and returns its /dev node,
/// creating the node when devtmpfs did not.
pub fn wait_partition(
    ctx: &Ctx,
    disk: &Disk,
    n: u32,
    timeout: Duration,
) -> Result<PathBuf, InstallError> {
    let name = partition_name(&disk.name, n);
    let sys = sys_dev(ctx, disk, n);
    let node = ctx.path(format!("/dev/{name}"));
    let start = Instant::now();
    loop {
        if let Some((a, b)) = std::fs::read_to_string(&sys)
            .ok()
            .and_then(|s| parse_majmin(&s))
        {
            let is_it = std::fs::metadata(&node).is_ok_and(|m| {
                m.file_type().is_block_device()
                    && (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev())) == (a, b)
            });
            if is_it {
                return Ok(node);
            }
            if start.elapsed() > Duration::from_secs(2) {
                let _ = std::fs::remove_file(&node);
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &node,
                    rustix::fs::FileType::BlockDevice,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(a, b),
                )
                .map_err(|e| InstallError::Partitions {
                    device: node.clone(),
                    what: format!("creating the node: {}", std::io::Error::from(e)),
                })?;
                return Ok(node);
            }
        }
        if start.elapsed() > timeout {
            return Err(InstallError::Partitions {
                device: disk.path.clone(),
                what: format!(
                    "partition {name} did not appear in {} within {} s",
                    sys.display(),
                    timeout.as_secs()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fake sysfs and /dev trees for the tests of `install.device: auto` here and in mod.rs.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    /// A fake /sys and /dev under a temp root.
    pub struct Fake {
        pub t: crate::testutil::Tree,
    }

    impl Fake {
        pub fn new() -> Fake {
            Fake {
                t: crate::testutil::Tree::new(),
            }
        }

        /// /sys/block/NAME, a symlink into /sys/devices/`bus`/… as the kernel makes it.
        pub fn disk(&self, bus: &str, name: &str, mm: (u32, u32), gib: u64, removable: bool) {
            let dir = format!("/sys/devices/{bus}/block/{name}");
            self.t
                .file(&format!("{dir}/size"), format!("{}\n", (gib << 30) / 512));
            self.t
                .file(&format!("{dir}/dev"), format!("{}:{}\n", mm.0, mm.1));
            self.t.file(
                &format!("{dir}/removable"),
                if removable { "1\n" } else { "0\n" },
            );
            let link = self.t.ctx.path(format!("/sys/block/{name}"));
            std::fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
            std::os::unix::fs::symlink(format!("../devices/{bus}/block/{name}"), &link)
                .expect("symlink");
        }

        pub fn part(&self, bus: &str, disk: &str, n: u32, mm: (u32, u32), gpt: &str) {
            let p = partition_name(disk, n);
            let dir = format!("/sys/devices/{bus}/block/{disk}/{p}");
            self.t.file(&format!("{dir}/partition"), format!("{n}\n"));
            self.t
                .file(&format!("{dir}/dev"), format!("{}:{}\n", mm.0, mm.1));
            self.t.file(
                &format!("{dir}/uevent"),
                format!(
                    "MAJOR={}\nDEVNAME={p}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={gpt}\n",
                    mm.0
                ),
            );
        }

        /// /dev/NAME as a file with an ext4 superblock labelled `label`.
        pub fn ext4(&self, name: &str, label: &str) {
            let mut sb = vec![0u8; 4096];
            sb[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
            sb[1024 + 120..1024 + 120 + label.len()].copy_from_slice(label.as_bytes());
            self.t.file(&format!("/dev/{name}"), sb);
        }

        pub fn find<'a>(&self, c: &'a [Candidate], name: &str) -> &'a Candidate {
            c.iter().find(|d| d.name == name).expect("candidate")
        }
    }

    pub const PCI: &str = "pci0000:00/0000:00:04.0/virtio1";
    pub const USB: &str = "pci0000:00/0000:00:05.0/usb3/3-1/3-1:1.0/host2/target2:0:0/2:0:0:0";
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime - ext4 /dev/loop0 ro
25 22 253:4 / /run/initramfs/cos-state ro,relatime shared:5 - ext4 /dev/vda4 ro
26 22 253:2 / /oem rw,relatime - ext4 /dev/vda2 rw
27 22 8:17 / /mnt/with\\040space rw - ext4 /dev/sdb1 rw
28 22 0:30 / /tmp rw - tmpfs tmpfs rw
29 22 253:2 /x /etc/x rw - ext4 /dev/vda2 rw
30 22 253:2 /y /etc/y rw - ext4 /dev/vda2 rw
";

    fn nodes(disk: &str, major: u32, n: u32) -> Vec<(String, u32, u32)> {
        (0..=n)
            .map(|i| {
                let name = if i == 0 {
                    disk.to_string()
                } else {
                    partition_name(disk, i)
                };
                (name, major, i)
            })
            .collect()
    }

    #[test]
    fn partition_names() {
        assert_eq!(partition_name("vdb", 4), "vdb4");
        assert_eq!(partition_name("nvme0n1", 1), "nvme0n1p1");
        assert_eq!(partition_name("loop3", 2), "loop3p2");
        assert_eq!(partition_name("mmcblk0", 5), "mmcblk0p5");
    }

    #[test]
    fn mounted_partitions_and_swap_are_found() {
        let swaps = "Filename Type Size Used Priority\n/dev/vdb5 partition 1024 0 -2\n";
        // vda: two partitions mounted, by major:minor.
        let u = uses(MOUNTINFO, "", &nodes("vda", 253, 5));
        assert_eq!(
            u,
            [
                "/dev/vda4 is mounted at /run/initramfs/cos-state",
                "/dev/vda2 is mounted at /oem and 2 more place(s)"
            ]
        );
        // vdb (a different major here): only its swap.
        assert_eq!(
            uses(MOUNTINFO, swaps, &nodes("vdb", 254, 5)),
            ["/dev/vdb5 is in use as swap"]
        );
        // sdb1 by name even when the numbers differ; the mount point unescaped.
        assert_eq!(
            uses(MOUNTINFO, "", &[("sdb1".into(), 1, 1)]),
            ["/dev/sdb1 is mounted at /mnt/with space"]
        );
        // Free disk, garbage lines.
        assert!(uses(MOUNTINFO, swaps, &nodes("vdc", 252, 3)).is_empty());
        assert!(uses("garbage\n1 2\n", "x\n", &nodes("vdc", 252, 3)).is_empty());
    }

    #[test]
    fn not_a_block_device_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("disk.img");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let ctx = Ctx::new("/", crate::DEFAULT_GRUBENV);
        let e = inspect(&ctx, &f, false).unwrap_err().to_string();
        assert!(
            e.contains("disk.img") && e.contains("not a block device"),
            "{e}"
        );
        assert_eq!(inspect(&ctx, &f, true).unwrap().size, 4096);
        let e = inspect(&ctx, &t.path().join("nope"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope") && e.contains("cannot stat"), "{e}");
    }

    fn cand(name: &str, gib: u64) -> Candidate {
        Candidate {
            name: name.into(),
            size: gib << 30,
            busy: None,
            removable: None,
            kairos: Vec::new(),
        }
    }

    #[test]
    fn auto_picks_the_largest_free_fixed_disk() {
        let all = AutoPolicy {
            removable: true,
            kairos: true,
        };
        let busy = Candidate {
            busy: Some("it holds the live system".into()),
            ..cand("vda", 8)
        };
        let disks = [busy, cand("vdb", 3), cand("vdc", 2)];
        assert_eq!(
            choose_auto(&disks, AutoPolicy::default()),
            AutoChoice::Disk(&disks[1])
        );
        // Busy is never taken, whatever the policy.
        assert_eq!(choose_auto(&disks[..1], all), AutoChoice::Nothing);
        // Ties: first by name; no size: never.
        let tie = [cand("vdc", 2), cand("vdb", 2), cand("vdd", 0)];
        assert_eq!(choose_auto(&tie, all), AutoChoice::Disk(&tie[1]));
        assert_eq!(choose_auto(&tie[2..], all), AutoChoice::Nothing);
        assert!(not_a_target("loop0") && not_a_target("sr0") && !not_a_target("nvme0n1"));
    }

    #[test]
    fn auto_skips_removable_disks_unless_allowed() {
        let usb = Candidate {
            removable: Some("USB-attached"),
            ..cand("sda", 64)
        };
        let disks = [usb, cand("vdb", 8)];
        assert_eq!(
            choose_auto(&disks, AutoPolicy::default()),
            AutoChoice::Disk(&disks[1])
        );
        let allow = AutoPolicy {
            removable: true,
            kairos: false,
        };
        assert_eq!(choose_auto(&disks, allow), AutoChoice::Disk(&disks[0]));
        assert_eq!(
            choose_auto(&disks[..1], AutoPolicy::default()),
            AutoChoice::Nothing
        );
    }

    #[test]
    fn auto_refuses_when_a_disk_it_could_take_holds_kairos() {
        let installed = Candidate {
            kairos: vec!["COS_STATE on /dev/vda4".into()],
            ..cand("vda", 8)
        };
        // A blank disk next to an installed one: no second system without force.
        let disks = [installed, cand("vdb", 16)];
        assert_eq!(
            choose_auto(&disks, AutoPolicy::default()),
            AutoChoice::HoldsKairos(&disks[0])
        );
        let force = AutoPolicy {
            removable: false,
            kairos: true,
        };
        assert_eq!(choose_auto(&disks, force), AutoChoice::Disk(&disks[1]));
        assert_eq!(choose_auto(&disks[..1], force), AutoChoice::Disk(&disks[0]));
        // A removable Kairos stick that auto would not take anyway does not block.
        let stick = Candidate {
            removable: Some("removable"),
            kairos: vec!["COS_PERSISTENT on /dev/sdb5".into()],
            ..cand("sdb", 32)
        };
        let disks = [stick, cand("vdb", 8)];
        assert_eq!(
            choose_auto(&disks, AutoPolicy::default()),
            AutoChoice::Disk(&disks[1])
        );
    }

    #[test]
    fn candidates_from_a_fake_sysfs_tree() {
        let f = Fake::new();
        // The live ISO written to a USB stick, mounted whole; QEMU's usb-storage says
        // removable=0, the bus says USB.
        f.disk(USB, "sda", (8, 0), 1, false);
        // A blank disk, an installed one (labels from superblocks and from GPT names), a
        // removable card reader, a CD drive and a loop device.
        f.disk(PCI, "vdb", (252, 16), 8, false);
        f.disk(PCI, "vdc", (252, 32), 16, false);
        f.part(PCI, "vdc", 1, (252, 33), "bios");
        f.part(PCI, "vdc", 4, (252, 36), "state");
        f.part(PCI, "vdc", 5, (252, 37), "persistent");
        f.ext4("vdc5", "COS_PERSISTENT");
        f.ext4("vdc4", "something-else");
        f.disk(PCI, "sdb", (8, 16), 32, true);
        f.disk(PCI, "sr0", (11, 0), 1, true);
        f.disk("virtual", "loop0", (7, 0), 1, false);
        let mountinfo = "\
22 1 0:21 / / rw - overlay overlay rw
30 22 8:0 / /run/initramfs/live ro - iso9660 /dev/sda ro
31 22 7:0 / /run/rootfsbase ro - squashfs /dev/loop0 ro
";
        let c = candidates(&f.t.ctx, mountinfo, "");
        let names: Vec<&str> = c.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sda", "sdb", "vdb", "vdc"]);
        let sda = f.find(&c, "sda");
        assert_eq!(
            sda.busy.as_deref(),
            Some("it holds the live system (/dev/sda is mounted at /run/initramfs/live)")
        );
        assert_eq!(sda.removable, Some("USB-attached"));
        assert_eq!(f.find(&c, "sdb").removable, Some("removable"));
        let vdc = f.find(&c, "vdc");
        // vdc5 by its superblock; vdc4 by its GPT name `state`, whatever its filesystem
        // says (an unreadable COS_STATE still marks an installation).
        assert_eq!(
            vdc.kairos,
            ["COS_STATE on /dev/vdc4", "COS_PERSISTENT on /dev/vdc5"]
        );
        assert_eq!(vdc.busy, None);
        assert!(f.find(&c, "vdb").kairos.is_empty());
        assert_eq!(
            choose_auto(&c, AutoPolicy::default()),
            AutoChoice::HoldsKairos(vdc)
        );
        let force = AutoPolicy {
            removable: false,
            kairos: true,
        };
        assert_eq!(choose_auto(&c, force), AutoChoice::Disk(vdc));
        let all = AutoPolicy {
            removable: true,
            kairos: true,
        };
        assert_eq!(choose_auto(&c, all), AutoChoice::Disk(f.find(&c, "sdb")));
        assert!(
            vdc.describe()
                == "vdc 16384 MiB (Kairos: COS_STATE on /dev/vdc4, COS_PERSISTENT on /dev/vdc5)",
            "{}",
            vdc.describe()
        );
    }

    #[test]
    fn a_partition_or_a_loop_file_as_live_medium_marks_its_disk() {
        use std::os::unix::fs::MetadataExt;
        let f = Fake::new();
        f.disk(PCI, "vda", (252, 0), 8, false);
        f.part(PCI, "vda", 1, (252, 1), "ISO");
        f.disk(PCI, "vdb", (252, 16), 8, false);
        let mountinfo = "30 22 252:1 / /run/initramfs/live ro - iso9660 /dev/vda1 ro\n";
        let c = candidates(&f.t.ctx, mountinfo, "");
        assert!(
            f.find(&c, "vda")
                .busy
                .as_deref()
                .is_some_and(|b| b.starts_with("it holds the live system (/dev/vda1")),
            "{c:?}"
        );
        assert_eq!(
            choose_auto(&c, AutoPolicy::default()),
            AutoChoice::Disk(f.find(&c, "vdb"))
        );
        // The ISO as a file on some disk, attached to loop3 and mounted from there: the disk
        // holding the file is the one the filesystem of the backing file lives on. Make the
        // fake vdz that device.
        let g = Fake::new();
        let iso = g.t.ctx.path("/images/live.iso");
        g.t.file("/images/live.iso", "iso");
        let dev = std::fs::metadata(&iso).expect("stat").dev();
        let (ma, mi) = (rustix::fs::major(dev), rustix::fs::minor(dev));
        g.disk(PCI, "vdz", (ma, mi), 4, false);
        g.disk("virtual", "loop3", (7, 3), 1, false);
        g.t.file(
            "/sys/devices/virtual/block/loop3/loop/backing_file",
            format!("{}\n", iso.display()),
        );
        g.disk(PCI, "vdy", (252, 48), 2, false);
        let mountinfo = "30 22 7:3 / /run/initramfs/live ro - iso9660 /dev/loop3 ro\n";
        let c = candidates(&g.t.ctx, mountinfo, "");
        let vdz = g.find(&c, "vdz");
        assert_eq!(
            vdz.busy.as_deref(),
            Some(
                "it holds the live system (/dev/loop3 is mounted at /run/initramfs/live); it backs loop3"
            )
        );
        assert_eq!(
            choose_auto(&c, AutoPolicy::default()),
            AutoChoice::Disk(g.find(&c, "vdy"))
        );
        // Not the live medium, only backing a loop device: busy all the same.
        let c = candidates(&g.t.ctx, "", "");
        assert_eq!(g.find(&c, "vdz").busy.as_deref(), Some("it backs loop3"));
    }

    #[test]
    fn no_disk_says_what_it_saw() {
        let f = Fake::new();
        f.disk(USB, "sda", (8, 0), 16, false);
        let e = match pick_auto(&f.t.ctx, AutoPolicy::default()) {
            Err(e) => e.to_string(),
            Ok(p) => panic!("picked {p:?}"),
        };
        assert!(
            e.contains("sda 16384 MiB (USB-attached)")
                && e.contains("install.allow-removable: true")
                && e.ends_with("nothing was written"),
            "{e}"
        );
    }
}
