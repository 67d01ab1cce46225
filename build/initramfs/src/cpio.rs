//! The "newc" cpio format the kernel unpacks an initramfs from: a writer that produces
//! reproducible archives (mtime 0, uid/gid 0, inodes numbered in order) and a bounds-checked
//! reader for tests and fuzzing.
//!
//! Each entry is a 110-byte ASCII header ("070701" and thirteen 8-digit hex fields), the
//! NUL-terminated name padded so header+name is a multiple of 4, then the data padded to 4.

use std::collections::BTreeSet;
use std::io::Write;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

const MAGIC: &[u8; 6] = b"070701";
/// The "crc" variant has the same layout; its checksum field is not verified here.
const MAGIC_CRC: &[u8; 6] = b"070702";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The writer is any `Write` (no path here): the caller names the output it goes to.
    #[error("writing cpio archive: {0}")]
    Write(std::io::Error),
    #[error("cpio entry name {name:?}: {why}")]
    BadPath { name: String, why: &'static str },
    #[error("cpio entry {name:?}: {len} bytes is more than newc's 4 GiB limit")]
    TooLarge { name: String, len: usize },
    #[error("cpio archive at offset {offset}: {why}")]
    Malformed { offset: usize, why: &'static str },
}

/// Writes a newc archive. Parent directories an entry needs are written first, automatically:
/// the kernel's unpacker does not create them and silently drops entries whose parent is
/// missing.
pub struct CpioWriter<W: Write> {
    w: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(w: W) -> Self {
        CpioWriter {
            w,
            written: 0,
            // Inode 0 is reserved for the trailer by convention.
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// A directory; `mode` is the permission bits (e.g. 0o755). Writing one twice is a no-op.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        let name = normalise(path)?;
        self.parents(&name)?;
        if self.dirs.contains(&name) {
            return Ok(());
        }
        self.entry(&name, S_IFDIR | (mode & 0o7777), 2, (0, 0), &[])?;
        self.dirs.insert(name);
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        let name = normalise(path)?;
        self.parents(&name)?;
        self.entry(&name, S_IFREG | (mode & 0o7777), 1, (0, 0), data)
    }

    /// The link target is stored as the entry's data, as newc specifies.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let name = normalise(path)?;
        self.parents(&name)?;
        self.entry(&name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let name = normalise(path)?;
        self.parents(&name)?;
        self.entry(&name, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer, pads the archive to a multiple of 512 bytes and returns the writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        let header = header(0, 0, 0, 1, 0, (0, 0), TRAILER.len() + 1);
        self.put(header.as_bytes())?;
        self.put(TRAILER.as_bytes())?;
        self.put(&[0])?;
        self.pad(4)?;
        self.pad(512)?;
        self.w.flush().map_err(CpioError::Write)?;
        Ok(self.w)
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.written
    }

    fn parents(&mut self, name: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(i) = name[end..].find('/') {
            let parent = &name[..end + i];
            if !self.dirs.contains(parent) {
                self.entry(parent, S_IFDIR | 0o755, 2, (0, 0), &[])?;
                self.dirs.insert(parent.to_string());
            }
            end += i + 1;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            len: data.len(),
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let h = header(ino, mode, size, nlink, 0, rdev, name.len() + 1);
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad(4)?;
        self.put(data)?;
        self.pad(4)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.w.write_all(bytes).map_err(CpioError::Write)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self, align: u64) -> Result<(), CpioError> {
        let rem = self.written % align;
        if rem != 0 {
            let zeros = [0u8; 512];
            let n = (align - rem) as usize;
            self.put(&zeros[..n])?;
        }
        Ok(())
    }
}

fn header(
    ino: u32,
    mode: u32,
    size: u32,
    nlink: u32,
    mtime: u32,
    rdev: (u32, u32),
    namesize: usize,
) -> String {
    // uid, gid, devmajor, devminor and check are always 0.
    format!(
        "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{mtime:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{namesize:08X}{:08X}",
        0, 0, 0, 0, rdev.0, rdev.1, 0
    )
}

/// Archive names are relative ("dev/console"), as GNU cpio writes them; leading "/" and "./"
/// are dropped.
fn normalise(path: &str) -> Result<String, CpioError> {
    let bad = |why| CpioError::BadPath {
        name: path.to_string(),
        why,
    };
    let mut trimmed = path;
    loop {
        if let Some(rest) = trimmed.strip_prefix('/') {
            trimmed = rest;
        } else if let Some(rest) = trimmed.strip_prefix("./") {
            trimmed = rest;
        } else {
            break;
        }
    }
    let trimmed = trimmed.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(bad("empty"));
    }
    if trimmed.contains('\0') {
        return Err(bad("contains NUL"));
    }
    // Also as the first component: its parent directory entry would be named like the
    // trailer, and every reader (the kernel's too) stops there.
    if trimmed.split('/').next() == Some(TRAILER) {
        return Err(bad("reserved for the trailer"));
    }
    if trimmed
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("empty, '.' or '..' component"));
    }
    Ok(trimmed.to_string())
}

/// One archive member as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub ino: u32,
    /// File type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// File contents, or a symlink's target.
    pub data: Vec<u8>,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    pub fn is_char_dev(&self) -> bool {
        self.mode & S_IFMT == S_IFCHR
    }
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// Parses a newc archive up to its trailer. Never panics: every length from the archive is
/// checked against the buffer, and errors name the offset of the bad header.
pub fn read_entries(data: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut entries = Vec::new();
    let mut off = 0usize;
    loop {
        let bad = |why| CpioError::Malformed { offset: off, why };
        let h = data
            .get(off..)
            .and_then(|rest| rest.get(..HEADER_LEN))
            .ok_or_else(|| bad("truncated header (no trailer)"))?;
        if &h[..6] != MAGIC && &h[..6] != MAGIC_CRC {
            return Err(bad("bad magic (not newc 070701)"));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let hex = &h[6 + i * 8..6 + (i + 1) * 8];
            *f = parse_hex(hex).ok_or_else(|| bad("header field is not hex"))?;
        }
        let [
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            size,
            _,
            _,
            rmaj,
            rmin,
            namesize,
            _,
        ] = fields;
        let namesize = namesize as usize;
        if namesize == 0 {
            return Err(bad("zero name size"));
        }
        let name_start = off + HEADER_LEN;
        let name_bytes = name_start
            .checked_add(namesize)
            .and_then(|end| data.get(name_start..end))
            .ok_or_else(|| bad("name runs past the end"))?;
        let (nul, name_bytes) = name_bytes
            .split_last()
            .ok_or_else(|| bad("zero name size"))?;
        if *nul != 0 || name_bytes.contains(&0) {
            return Err(bad("name is not NUL-terminated"));
        }
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| bad("name is not UTF-8"))?
            .to_string();
        // The trailer's padding may be cut off; nothing after its name matters.
        if name == TRAILER {
            return Ok(entries);
        }
        let data_start = align4(name_start + namesize).ok_or_else(|| bad("offset overflow"))?;
        let data_end = data_start
            .checked_add(size as usize)
            .ok_or_else(|| bad("offset overflow"))?;
        let body = data
            .get(data_start..data_end)
            .ok_or_else(|| bad("data runs past the end"))?;
        entries.push(Entry {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev_major: rmaj,
            rdev_minor: rmin,
            data: body.to_vec(),
        });
        off = align4(data_end).ok_or_else(|| bad("offset overflow"))?;
    }
}

fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|v| v & !3)
}

fn parse_hex(bytes: &[u8]) -> Option<u32> {
    bytes.iter().try_fold(0u32, |acc, &b| {
        let digit = (b as char).to_digit(16)?;
        Some((acc << 4) | digit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/dev", 0o755).expect("dir");
        w.char_dev("/dev/console", 0o600, 5, 1).expect("chr");
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n")
            .expect("file");
        // Parents lib/ and lib/modules/ come for free.
        w.file("lib/modules/6.1/kernel/a.ko", 0o644, &[1, 2, 3, 4, 5])
            .expect("file");
        w.symlink("bin", "usr/bin").expect("symlink");
        w.file("empty", 0o600, b"").expect("file");
        w.finish().expect("finish")
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        assert_eq!(bytes.len() % 512, 0);
        let entries = read_entries(&bytes).expect("parse");
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/kernel",
                "lib/modules/6.1/kernel/a.ko",
                "bin",
                "empty"
            ]
        );
        let console = &entries[1];
        assert!(console.is_char_dev());
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        assert_eq!(console.perm(), 0o600);
        let init = &entries[2];
        assert!(init.is_file());
        assert_eq!(init.perm(), 0o755);
        assert_eq!(init.data, b"#!/bin/sh\necho hi\n");
        assert!(entries[3].is_dir());
        assert_eq!(entries[7].data, [1, 2, 3, 4, 5]);
        assert!(entries[8].is_symlink());
        assert_eq!(entries[8].data, b"usr/bin");
        let mut inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        inos.sort_unstable();
        inos.dedup();
        assert_eq!(inos.len(), entries.len(), "inode numbers are unique");
        assert!(
            entries
                .iter()
                .all(|e| e.mtime == 0 && e.uid == 0 && e.gid == 0)
        );
        // Reproducible: same input, same bytes.
        assert_eq!(bytes, sample());
    }

    #[test]
    fn rejects_bad_paths() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("a/../b", 0o644, b"").is_err());
        assert!(w.file("/", 0o644, b"").is_err());
        assert!(w.file("TRAILER!!!", 0o644, b"").is_err());
        assert!(w.file("a//b", 0o644, b"").is_err());
    }

    /// Found by the cpio fuzz target: "TRAILER!!!/x" made the writer emit a parent directory
    /// entry named "TRAILER!!!", so read_entries (and the kernel) stopped there and every
    /// later entry was lost.
    #[test]
    fn rejects_paths_under_a_trailer_named_dir() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/init", 0o755, b"ab").expect("file");
        let e = w.dir("TRAILER!!!/busin/\u{1}", 0o755).unwrap_err();
        assert!(
            matches!(&e, CpioError::BadPath { name, .. } if name == "TRAILER!!!/busin/\u{1}"),
            "{e}"
        );
        assert!(w.file("./TRAILER!!!/x", 0o644, b"").is_err());
        // Deeper down the name is harmless: the entry is "a/TRAILER!!!".
        w.file("a/TRAILER!!!/x", 0o644, b"x").expect("file");
        w.file("last", 0o644, b"").expect("file");
        let entries = read_entries(&w.finish().expect("finish")).expect("read");
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["init", "a", "a/TRAILER!!!", "a/TRAILER!!!/x", "last"]
        );
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        let trailer_end = bytes
            .windows(TRAILER.len())
            .position(|w| w == TRAILER.as_bytes())
            .expect("trailer")
            + TRAILER.len()
            + 1;
        for cut in 0..bytes.len() {
            let r = read_entries(&bytes[..cut]);
            if cut < trailer_end {
                // The offset is where the missing piece should start: at most the cut
                // rounded up to the next 4-byte boundary.
                match r {
                    Err(CpioError::Malformed { offset, .. }) => assert!(offset <= cut + 3),
                    other => panic!("cut at {cut}: {other:?}"),
                }
            } else {
                // Cuts inside the padding after the trailer leave a complete archive.
                assert_eq!(r.expect("complete").len(), 10);
            }
        }
        assert!(matches!(
            read_entries(b"070701zz"),
            Err(CpioError::Malformed { offset: 0, .. })
        ));
        let mut corrupt = bytes.clone();
        corrupt[0] = b'x';
        assert!(read_entries(&corrupt).is_err());
        // A huge size field must not overflow or allocate.
        let mut huge = bytes.clone();
        huge[54..62].copy_from_slice(b"FFFFFFFF");
        assert!(read_entries(&huge).is_err());
    }

    #[test]
    fn gnu_cpio_extracts_our_archive() {
        let have_cpio = std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            have_cpio,
            "needs GNU cpio (the cpio package; `kairos-qemu setup` installs it)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample()).expect("write");
        let out = dir.path().join("x");
        std::fs::create_dir(&out).expect("mkdir");
        let stdin = std::fs::File::open(&archive).expect("open");
        let result = std::process::Command::new("cpio")
            .args(["-idm", "--quiet", "--no-absolute-filenames"])
            .current_dir(&out)
            .stdin(stdin)
            .output()
            .expect("run cpio");
        assert!(
            result.status.success(),
            "cpio -idm failed: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        let init = std::fs::read(out.join("init")).expect("init extracted");
        assert_eq!(init, b"#!/bin/sh\necho hi\n");
        let ko = std::fs::read(out.join("lib/modules/6.1/kernel/a.ko")).expect("ko");
        assert_eq!(ko, [1, 2, 3, 4, 5]);
        let link = std::fs::read_link(out.join("bin")).expect("symlink");
        assert_eq!(link, std::path::Path::new("usr/bin"));
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(out.join("init")).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        // mknod needs root; as root the device node must be a char device.
        let console = std::fs::symlink_metadata(out.join("dev/console"));
        if let Ok(m) = console {
            assert!(m.file_type().is_char_device());
        }
        // The list mode must show every entry.
        let stdin = std::fs::File::open(&archive).expect("open");
        let list = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(stdin)
            .output()
            .expect("cpio -t");
        let listed = String::from_utf8_lossy(&list.stdout);
        assert_eq!(listed.lines().count(), 10, "{listed}");
    }
}
