//! Applies OCI image layers (tar, optionally gzip- or zstd-compressed) onto a directory in
//! order, with the OCI whiteout rules: `.wh.NAME` deletes NAME from the lower layers,
//! `.wh..wh..opq` empties its directory of lower-layer content. Nothing is ever written outside
//! the target: absolute names and `..` are refused, and a parent that is a symlink is not
//! followed out of the tree (tar's `unpack_in` checks the canonical parent).
//!
//! Extended attributes from PAX headers (`SCHILY.xattr.*`) are kept for file capabilities
//! (`security.capability`, e.g. ping's cap_net_raw) and `user.*`; `mkfs.ext4 -d` copies them
//! into the image. Others (`security.selinux`, `trusted.*`) are not applied: labels belong to
//! the booted policy, and a staging filesystem may refuse them.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use kairos_util::{IoError, IoResultExt};

const WHITEOUT: &str = ".wh.";
/// Extended attributes applied from a layer: exact names, or prefixes ending in '.'.
const KEPT_XATTRS: &[&str] = &["security.capability", "user."];
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A file operation inside the target tree; `layer` is the layer's digest.
    #[error("layer {layer}: {err}")]
    Io { layer: String, err: IoError },
    #[error("layer {layer}: entry {name:?} would land outside the root")]
    Escapes { layer: String, name: String },
    /// The layer's byte stream (no file of its own). The error is in the message, so not
    /// also the source (no repeat in chains).
    #[error("layer {layer}: not a tar archive: {err}")]
    Tar { layer: String, err: std::io::Error },
}

/// What one layer did, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub entries: usize,
    pub whiteouts: usize,
    /// Extended attributes set.
    pub xattrs: usize,
    /// Extended attributes the staging filesystem refused (the entry itself is there).
    pub xattrs_refused: usize,
}

fn kept_xattr(name: &str) -> bool {
    KEPT_XATTRS
        .iter()
        .any(|k| name == *k || (k.ends_with('.') && name.starts_with(k)))
}

/// The kept extended attributes of an entry, from its PAX header.
fn xattrs_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<(String, Vec<u8>)> {
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return Vec::new();
    };
    exts.filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.key().ok()?.strip_prefix("SCHILY.xattr.")?;
            kept_xattr(name).then(|| (name.to_string(), e.value_bytes().to_vec()))
        })
        .collect()
}

/// A path inside the layer, checked: relative, no `..`, no root or prefix.
fn clean(name: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The first component of `rel` (relative to `root`) that is a symlink on disk. A whiteout, an
/// opaque marker or a replaced entry below such a component would act on whatever the link
/// points at, outside `root` if the layer made it point there.
fn symlink_in(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match cur.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => return Some(cur),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Empties `dir` except what this layer itself put there (`added`, relative to `root`).
fn clear_lower(root: &Path, dir: &Path, added: &HashSet<PathBuf>) -> Result<(), IoError> {
    let path = root.join(dir);
    let Ok(entries) = fs::read_dir(&path) else {
        return Ok(());
    };
    for e in entries {
        let e = e.at(&path, "listing (opaque directory)")?;
        let rel = dir.join(e.file_name());
        if added.contains(&rel) {
            if e.file_type().at(&e.path(), "reading the type")?.is_dir() {
                clear_lower(root, &rel, added)?;
            }
            continue;
        }
        let victim = root.join(&rel);
        remove_any(&victim).at(&victim, "removing (opaque directory)")?;
    }
    Ok(())
}

/// Decompresses by magic number: gzip, zstd, or a plain tar.
fn decompress<'a>(r: impl Read + 'a) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::new(r);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    })
}

/// Applies one layer onto `root`. `layer` names it in errors (its digest).
pub fn apply(root: &Path, layer: &str, data: impl Read) -> Result<Applied, LayerError> {
    let in_layer = |err: IoError| LayerError::Io {
        layer: layer.to_string(),
        err,
    };
    let tar_err = |err| LayerError::Tar {
        layer: layer.to_string(),
        err,
    };
    let mut ar = tar::Archive::new(decompress(data).map_err(tar_err)?);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    let mut added = HashSet::new();
    let mut opaque = Vec::new();
    let mut done = Applied::default();
    for entry in ar.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let raw = entry.path().map_err(tar_err)?.into_owned();
        let Some(rel) = clean(&raw) else {
            return Err(LayerError::Escapes {
                layer: layer.into(),
                name: raw.display().to_string(),
            });
        };
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            continue; // the root itself
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if symlink_in(root, &parent).is_some() {
            return Err(LayerError::Escapes {
                layer: layer.into(),
                name: raw.display().to_string(),
            });
        }
        if name == OPAQUE {
            opaque.push(parent);
            done.whiteouts += 1;
            continue;
        }
        if let Some(target) = name.strip_prefix(WHITEOUT) {
            let victim = root.join(&parent).join(target);
            remove_any(&victim)
                .at(&victim, "removing (whiteout)")
                .map_err(in_layer)?;
            done.whiteouts += 1;
            continue;
        }
        let dest = root.join(&rel);
        // A directory cannot be overwritten by a file (or the reverse) in place.
        if let Ok(m) = dest.symlink_metadata()
            && (m.is_dir() != entry.header().entry_type().is_dir())
        {
            remove_any(&dest)
                .at(&dest, "removing (replaced by another type)")
                .map_err(in_layer)?;
        }
        let xattrs = xattrs_of(&mut entry);
        let unpacked = entry
            .unpack_in(root)
            .at(&dest, "unpacking")
            .map_err(in_layer)?;
        if !unpacked {
            return Err(LayerError::Escapes {
                layer: layer.into(),
                name: raw.display().to_string(),
            });
        }
        for (name, value) in &xattrs {
            match rustix::fs::lsetxattr(
                &dest,
                name.as_str(),
                value,
                rustix::fs::XattrFlags::empty(),
            ) {
                Ok(()) => done.xattrs += 1,
                Err(_) => done.xattrs_refused += 1,
            }
        }
        let mut p = rel.as_path();
        added.insert(p.to_path_buf());
        while let Some(parent) = p.parent().filter(|x| !x.as_os_str().is_empty()) {
            added.insert(parent.to_path_buf());
            p = parent;
        }
        done.entries += 1;
    }
    for dir in opaque {
        // Checked again: a later entry of this layer may have made the directory a symlink.
        if symlink_in(root, &dir).is_some() {
            return Err(LayerError::Escapes {
                layer: layer.into(),
                name: dir.join(OPAQUE).display().to_string(),
            });
        }
        clear_lower(root, &dir, &added).map_err(in_layer)?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with (name, Some(content)) files and (name, None) directories.
    fn tar_of(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match content {
                Some(c) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(c.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, name, c.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, name, std::io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn read(root: &Path, p: &str) -> Option<String> {
        fs::read_to_string(root.join(p)).ok()
    }

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_dirs() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let l1 = tar_of(&[
            ("etc", None),
            ("etc/os-release", Some("v1")),
            ("etc/old", Some("x")),
            ("opt", None),
            ("opt/a", Some("a")),
            ("opt/b", Some("b")),
        ]);
        apply(r, "l1", &l1[..]).unwrap();
        let l2 = tar_of(&[
            ("etc/os-release", Some("v2")),
            ("etc/.wh.old", Some("")),
            ("opt/c", Some("c")),
            ("opt/.wh..wh..opq", Some("")),
        ]);
        // gzip-compressed, as registries serve layers.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &l2).unwrap();
        let done = apply(r, "l2", &gz.finish().unwrap()[..]).unwrap();
        assert_eq!(
            done,
            Applied {
                entries: 2,
                whiteouts: 2,
                ..Applied::default()
            }
        );
        assert_eq!(read(r, "etc/os-release").as_deref(), Some("v2"));
        assert_eq!(read(r, "etc/old"), None);
        // The opaque marker came after opt/c in the tar: this layer's file survives it.
        assert_eq!(read(r, "opt/c").as_deref(), Some("c"));
        assert_eq!(read(r, "opt/a"), None);
        assert_eq!(read(r, "opt/b"), None);
    }

    #[test]
    fn file_capabilities_and_user_xattrs_are_kept() {
        let t = tempfile::tempdir().unwrap();
        let probe = t.path().join("probe");
        fs::write(&probe, "").unwrap();
        // ext4 and tmpfs (Linux 6.6+) have user xattrs: without them this fails, not skips.
        rustix::fs::lsetxattr(&probe, "user.probe", b"1", rustix::fs::XattrFlags::empty())
            .unwrap_or_else(|e| {
                panic!("no user xattrs on the temp dir {}: {e}", t.path().display())
            });
        // cap_net_raw+ep as a VFS_CAP_REVISION_2 value.
        let mut cap = Vec::new();
        cap.extend_from_slice(&0x0200_0001u32.to_le_bytes());
        cap.extend_from_slice(&(1u32 << 13).to_le_bytes());
        cap.extend_from_slice(&[0u8; 12]);
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.security.capability", cap.as_slice()),
            ("SCHILY.xattr.user.origin", b"layer".as_slice()),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y".as_slice()),
        ])
        .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(4);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "ping", &b"ELF!"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let done = apply(t.path(), "l1", &layer[..]).unwrap();
        assert_eq!(done.entries, 1);
        let ping = t.path().join("ping");
        let mut buf = [0u8; 64];
        let n = rustix::fs::lgetxattr(&ping, "user.origin", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"layer");
        assert!(rustix::fs::lgetxattr(&ping, "trusted.overlay.opaque", &mut buf[..]).is_err());
        if rustix::process::geteuid().is_root() {
            assert_eq!((done.xattrs, done.xattrs_refused), (2, 0));
            let n = rustix::fs::lgetxattr(&ping, "security.capability", &mut buf[..]).unwrap();
            assert_eq!(&buf[..n], cap.as_slice());
        }
        assert!(kept_xattr("user.x") && kept_xattr("security.capability"));
        assert!(!kept_xattr("security.selinux") && !kept_xattr("user"));
    }

    #[test]
    fn a_file_replaces_a_directory() {
        let t = tempfile::tempdir().unwrap();
        apply(
            t.path(),
            "l1",
            &tar_of(&[("x", None), ("x/y", Some("1"))])[..],
        )
        .unwrap();
        apply(t.path(), "l2", &tar_of(&[("x", Some("file"))])[..]).unwrap();
        assert_eq!(read(t.path(), "x").as_deref(), Some("file"));
    }

    #[test]
    fn escaping_names_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        // A symlink in the tree that points outside: writing through it must fail.
        std::os::unix::fs::symlink(outside.path(), t.path().join("link")).unwrap();
        let e = apply(t.path(), "evil", &tar_of(&[("link/pwned", Some("x"))])[..]).unwrap_err();
        assert!(e.to_string().contains("layer evil"), "{e}");
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none());
        assert!(clean(Path::new("../x")).is_none());
        assert!(clean(Path::new("/etc/x")).is_none());
        assert_eq!(clean(Path::new("./a/./b")), Some(PathBuf::from("a/b")));
    }

    /// Found while fuzzing: whiteouts and opaque markers below a symlink the same layer made
    /// deleted outside the root. Each is now refused and the outside is untouched.
    #[test]
    fn whiteouts_through_a_symlink_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "keep").unwrap();
        let target = outside.path().to_str().unwrap().to_string();
        let cases: [&[(&str, &str)]; 4] = [
            &[("x", "L"), ("x/.wh.victim", "")],
            &[("x", "L"), ("x/.wh..wh..opq", "")],
            &[("x/.wh..wh..opq", ""), ("x", "L")],
            &[("x", "L"), ("x/victim/y", "file")],
        ];
        for entries in cases {
            let root = tempfile::tempdir().unwrap();
            let mut b = tar::Builder::new(Vec::new());
            for (name, what) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(0);
                if *what == "L" {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    h.set_mode(0o777);
                    b.append_link(&mut h, name, &target).unwrap();
                } else {
                    h.set_size(what.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, name, what.as_bytes()).unwrap();
                }
            }
            let data = b.into_inner().unwrap();
            let r = apply(root.path(), "sha256:test", data.as_slice());
            assert!(
                matches!(r, Err(LayerError::Escapes { .. })),
                "{entries:?}: {r:?}"
            );
            assert_eq!(
                std::fs::read_to_string(outside.path().join("victim")).unwrap(),
                "keep",
                "{entries:?}"
            );
        }
    }

    #[test]
    fn garbage_is_not_a_layer() {
        let t = tempfile::tempdir().unwrap();
        let e = apply(t.path(), "sha256:abc", &[0x1fu8, 0x8b, 0, 1, 2, 3][..]).unwrap_err();
        assert!(e.to_string().contains("layer sha256:abc"), "{e}");
    }
}
