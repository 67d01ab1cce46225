//! The target disk: is it a whole block device, how big, is any part of it in use (mounted or
//! swap), re-reading its partition table and waiting for the partition nodes.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kairos_init::sys::disk::{BLKPG_ADD_PARTITION, BLKPG_DEL_PARTITION, blkpg};

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

fn parse_majmin(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A mount table path with its octal escapes (`\040` for a space) decoded.
fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|x| (b'0'..=b'7').contains(x)));
        match oct.map(|d| d.iter().fold(0u32, |n, x| n * 8 + u32::from(x - b'0'))) {
            Some(v) if v < 256 => {
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (Some(majmin), Some(point)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let source = f.get(dash + 2).copied().unwrap_or("");
        let hit = parse_majmin(majmin)
            .and_then(|(ma, mi)| nodes.iter().find(|(_, a, b)| (*a, *b) == (ma, mi)))
            .map(|(n, _, _)| format!("/dev/{n}"))
            .or_else(|| by_name(source).then(|| source.to_string()));
        if let Some(dev) = hit {
            match mounted.iter_mut().find(|(d, _, _)| *d == dev) {
                Some(m) => m.2 += 1,
                None => mounted.push((dev, unescape(point), 0)),
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

/// Of (name, size, in use) whole disks, the largest one not in use (ties: first by name).
pub fn choose_auto(disks: &[(String, u64, bool)]) -> Option<&str> {
    disks
        .iter()
        .filter(|(_, size, used)| !used && *size > 0)
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(n, _, _)| n.as_str())
}

/// Kernel names that are never install targets.
fn not_a_target(name: &str) -> bool {
    ["loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// `install.device: auto`: the largest whole disk under /sys/block with nothing mounted or
/// swapped on it (so never the disk or media this system runs from).
pub fn pick_auto(ctx: &Ctx) -> Result<PathBuf, InstallError> {
    let mut seen = Vec::new();
    if let Ok(rd) = std::fs::read_dir(ctx.path("/sys/block")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if not_a_target(&name) {
                continue;
            }
            let dev = ctx.path(format!("/dev/{name}"));
            match inspect(ctx, &dev, false) {
                Ok(d) => {
                    let used = check_unused(ctx, &d).is_err();
                    seen.push((name, d.size, used));
                }
                Err(_) => seen.push((name, 0, true)),
            }
        }
    }
    seen.sort();
    match choose_auto(&seen) {
        Some(n) => Ok(PathBuf::from(format!("/dev/{n}"))),
        None => Err(InstallError::NoAutoDevice {
            checked: if seen.is_empty() {
                "no disks under /sys/block".into()
            } else {
                seen.iter()
                    .map(|(n, size, used)| {
                        format!(
                            "{n} {} MiB{}",
                            size >> 20,
                            if *used { " in use" } else { "" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }),
    }
}

/// Refuses a disk any part of which is mounted or used as swap.
pub fn check_unused(ctx: &Ctx, disk: &Disk) -> Result<(), InstallError> {
    let mut mountinfo =
        std::fs::read_to_string(ctx.path("/proc/self/mountinfo")).unwrap_or_default();
    let mut swaps = std::fs::read_to_string(ctx.path("/proc/swaps")).unwrap_or_default();
    // The device path is literal, not under --root: what this process itself sees mounted
    // counts too, so a --root pointing elsewhere can never hide the running system's disk.
    if ctx.root != Path::new("/") {
        for (text, file) in [
            (&mut mountinfo, "/proc/self/mountinfo"),
            (&mut swaps, "/proc/swaps"),
        ] {
            text.push('\n');
            text.push_str(&std::fs::read_to_string(file).unwrap_or_default());
        }
    }
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
/// BLKRRPART (else `blockdev --rereadpt`). Ok(false) when the device does not scan
/// partitions at all (EINVAL: a loop device attached without LO_FLAGS_PARTSCAN).
fn reread(f: &File, disk: &Path) -> Result<bool, InstallError> {
    const BLKRRPART: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0x12, 95);
    // SAFETY: BLKRRPART takes no argument.
    let r = unsafe { rustix::ioctl::ioctl(f, rustix::ioctl::NoArg::<BLKRRPART>::new()) };
    match r {
        Ok(()) => return Ok(true),
        Err(rustix::io::Errno::INVAL) => return Ok(false),
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
            what: format!(
                "re-reading the partition table (BLKRRPART): {}",
                std::io::Error::from(e)
            ),
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn auto_picks_the_largest_unused_disk() {
        let d = |n: &str, gib: u64, used: bool| (n.to_string(), gib << 30, used);
        assert_eq!(
            choose_auto(&[d("vda", 8, true), d("vdb", 3, false), d("vdc", 2, false)]),
            Some("vdb")
        );
        assert_eq!(choose_auto(&[d("vda", 8, true)]), None);
        assert_eq!(
            choose_auto(&[d("vdb", 2, false), d("vdc", 2, false)]),
            Some("vdb")
        );
        assert_eq!(choose_auto(&[d("vdb", 0, false)]), None);
        assert!(not_a_target("loop0") && not_a_target("sr0") && !not_a_target("nvme0n1"));
    }
}
