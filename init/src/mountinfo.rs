//! THE mount-table parser of the workspace: `/proc/self/mountinfo` (and the shorter
//! `/proc/self/mounts`), with the kernel's octal escapes decoded. Pure but for [`read`].

use std::path::Path;

use kairos_util::{IoError, IoResultExt};

/// Where the kernel shows the calling process's mount table.
pub const PATH: &str = "/proc/self/mountinfo";

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub parent: u32,
    /// The `major:minor` of the mounted filesystem's device; `None` when the field is garbled.
    pub device: Option<(u32, u32)>,
    /// The directory of the filesystem mounted here (not "/" for bind mounts of a subdirectory).
    pub root: String,
    pub mountpoint: String,
    pub fstype: String,
    pub source: String,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `major:minor` as the mount table and sysfs write it.
pub fn parse_majmin(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Parses /proc/self/mountinfo; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if sep < 6 || f.len() < sep + 3 {
            continue;
        }
        let (Ok(id), Ok(parent)) = (f[0].parse(), f[1].parse()) else {
            continue;
        };
        out.push(MountEntry {
            id,
            parent,
            device: parse_majmin(f[2]),
            root: unescape(f[3]),
            mountpoint: unescape(f[4]),
            fstype: f[sep + 1].to_string(),
            source: unescape(f[sep + 2]),
        });
    }
    out
}

/// The mount table at `path` (a mountinfo file: [`PATH`], or one under a test root).
pub fn read_from(path: &Path) -> Result<Vec<MountEntry>, IoError> {
    let text = std::fs::read_to_string(path).at(path, "reading")?;
    Ok(parse(&text))
}

/// This process's mount table.
pub fn read() -> Result<Vec<MountEntry>, IoError> {
    read_from(Path::new(PATH))
}

/// What is visible at `point`: the last entry mounted there (later mounts hide earlier ones).
pub fn mounted_at<'a>(entries: &'a [MountEntry], point: &str) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|m| m.mountpoint == point)
}

/// The entries whose device is `major:minor`, in mount order.
pub fn on_device(entries: &[MountEntry], dev: (u32, u32)) -> impl Iterator<Item = &MountEntry> {
    entries.iter().filter(move |m| m.device == Some(dev))
}

/// One line of /proc/self/mounts (the fstab-like table), escapes decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountsLine {
    pub source: String,
    pub mountpoint: String,
    /// Empty on a line too short to have it.
    pub fstype: String,
    /// The mount's options (`ro,relatime`); empty on a line too short to have them.
    pub options: String,
}

/// Each /proc/self/mounts line; lines with fewer than two fields are skipped.
pub fn parse_mounts_lines(text: &str) -> Vec<MountsLine> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let (source, mountpoint) = (unescape(f.next()?), unescape(f.next()?));
            let mut next = || f.next().map(unescape).unwrap_or_default();
            let fstype = next();
            Some(MountsLine {
                source,
                mountpoint,
                fstype,
                options: next(),
            })
        })
        .collect()
}

/// (source, mount point) of each /proc/self/mounts line, as [`parse_mounts_lines`].
pub fn parse_mounts(text: &str) -> Vec<(String, String)> {
    parse_mounts_lines(text)
        .into_iter()
        .map(|m| (m.source, m.mountpoint))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape("a\\040b\\011c\\134"), "a b\tc\\");
        assert_eq!(unescape("trail\\04"), "trail\\04");
    }

    #[test]
    fn mounts_lines_carry_type_and_options() {
        let t = "/dev/vda4 /run/initramfs/cos-state ext4 ro,relatime 0 0\n\
                 short\n\
                 /dev/x /mnt/a\\040b\n\
                 overlay /usr overlay rw,lowerdir=/a\\040b 0 0\n";
        let m = parse_mounts_lines(t);
        assert_eq!(
            m[0],
            MountsLine {
                source: "/dev/vda4".into(),
                mountpoint: "/run/initramfs/cos-state".into(),
                fstype: "ext4".into(),
                options: "ro,relatime".into(),
            }
        );
        // A short line is skipped whole, so the fields of the next line stay together.
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[1].mountpoint.as_str(), m[1].options.as_str()),
            ("/mnt/a b", "")
        );
        assert_eq!(
            (m[2].fstype.as_str(), m[2].options.as_str()),
            ("overlay", "rw,lowerdir=/a b")
        );
        assert_eq!(parse_mounts(t)[1], ("/dev/x".into(), "/mnt/a b".into()));
    }
}
