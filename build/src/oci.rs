//! An OCI image of one root tree: one gzip layer, an OCI config and an image manifest,
//! written as an OCI image-layout archive (`ocifile:`) or pushed to a registry (`oci:`); both
//! are what `kairos-agent upgrade --source` and `kairos-build raw --source` read.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use kairos_agent::upgrade::fetch::Registry;
use kairos_agent::upgrade::oci::{hex, sha256_digest};
use kairos_agent::upgrade::source::ImageRef;
use sha2::{Digest, Sha256};

use kairos_util::{IoError, IoResultExt};

pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// gzip level: 3 is within a few per cent of 6's size at twice its speed on a rootfs.
const GZIP_LEVEL: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Registry(#[from] kairos_agent::upgrade::UpgradeError),
}

/// A written image: the layer and config as files in the work directory, the manifest.
#[derive(Debug, Clone)]
pub struct Image {
    pub layer: PathBuf,
    pub layer_digest: String,
    pub layer_size: u64,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    pub config: PathBuf,
    pub config_digest: String,
    pub config_size: u64,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
}

/// Passes writes through to `inner`, hashing and counting them.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Appends `dir`'s entries (sorted, so the layer depends only on the tree) under `rel`.
/// Symlinks are stored as links; sockets are skipped (they are runtime state).
fn append_tree<W: Write>(b: &mut tar::Builder<W>, root: &Path, dir: &Path) -> Result<(), OciError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .at(dir, "listing")?
        .collect::<Result<_, _>>()
        .at(dir, "listing")?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let ft = e.file_type().at(&path, "reading the type of")?;
        if ft.is_socket() {
            continue;
        }
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let special = ft.is_char_device() || ft.is_block_device() || ft.is_fifo();
        if special {
            // tar's own path for these names the entry by its host path (tar 0.4.46).
            append_special(b, &path, rel)?;
        } else {
            b.append_path_with_name(&path, rel)
                .at(&path, "adding to the layer")?;
        }
        if ft.is_dir() {
            append_tree(b, root, &path)?;
        }
    }
    Ok(())
}

/// A device node or fifo as a header-only entry named `rel`.
fn append_special<W: Write>(
    b: &mut tar::Builder<W>,
    path: &Path,
    rel: &Path,
) -> Result<(), OciError> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(path).at(path, "reading the metadata of")?;
    let ft = md.file_type();
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(&md, tar::HeaderMode::Complete);
    h.set_entry_type(if ft.is_char_device() {
        tar::EntryType::Char
    } else if ft.is_block_device() {
        tar::EntryType::Block
    } else {
        tar::EntryType::Fifo
    });
    h.set_size(0);
    let dev = md.rdev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    h.set_device_major(major).at(path, "adding to the layer")?;
    h.set_device_minor(minor).at(path, "adding to the layer")?;
    b.append_data(&mut h, rel, std::io::empty())
        .at(path, "adding to the layer")?;
    Ok(())
}

/// The image of `tree` for `arch` (an OCI architecture name), its blobs written to `work`.
/// `labels` go into the config (what `docker inspect` shows).
pub fn build(
    tree: &Path,
    work: &Path,
    arch: &str,
    labels: &[(String, String)],
) -> Result<Image, OciError> {
    std::fs::create_dir_all(work).at(work, "creating")?;
    let layer = work.join("layer.tar.gz");
    let file = File::create(&layer).at(&layer, "creating")?;
    let compressed = Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    let gz = flate2::write::GzEncoder::new(compressed, flate2::Compression::new(GZIP_LEVEL));
    let plain = Hashing {
        inner: gz,
        hash: Sha256::new(),
        bytes: 0,
    };
    let mut b = tar::Builder::new(plain);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    append_tree(&mut b, tree, tree)?;
    let plain = b.into_inner().at(&layer, "finishing the tar of")?;
    let diff_id = format!("sha256:{}", hex(&plain.hash.finalize()));
    let mut compressed = plain.inner.finish().at(&layer, "compressing")?;
    compressed.flush().at(&layer, "writing")?;
    let layer_digest = format!("sha256:{}", hex(&compressed.hash.finalize()));
    let layer_size = compressed.bytes;
    compressed
        .inner
        .into_inner()
        .map_err(|e| e.into_error())
        .at(&layer, "writing")?
        .sync_all()
        .at(&layer, "fsync")?;

    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let config_json = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Labels": labels },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created_by": "kairos-build image" }],
    });
    let config_bytes = config_json.to_string().into_bytes();
    let config = work.join("config.json");
    std::fs::write(&config, &config_bytes).at(&config, "writing")?;
    let config_digest = sha256_digest(&config_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": { "mediaType": MT_CONFIG, "digest": config_digest, "size": config_bytes.len() },
        "layers": [{ "mediaType": MT_LAYER, "digest": layer_digest, "size": layer_size }],
    })
    .to_string()
    .into_bytes();
    Ok(Image {
        layer,
        layer_digest,
        layer_size,
        diff_id,
        config,
        config_digest,
        config_size: config_bytes.len() as u64,
        manifest_digest: sha256_digest(&manifest),
        manifest,
    })
}

/// Writes `img` as an OCI image-layout archive (tar of `oci-layout`, `index.json` naming it
/// `tag`, `blobs/sha256/…`) to `out`, through `out.partial` and a rename.
pub fn write_archive(img: &Image, tag: &str, out: &Path) -> Result<(), OciError> {
    let partial = {
        let mut s = out.as_os_str().to_owned();
        s.push(".partial");
        PathBuf::from(s)
    };
    let written = (|| -> Result<(), OciError> {
        let f = File::create(&partial).at(&partial, "creating")?;
        let mut b = tar::Builder::new(BufWriter::with_capacity(1 << 20, f));
        let mut add = |name: &str, data: &mut dyn std::io::Read, size: u64| {
            let mut h = tar::Header::new_ustar();
            h.set_size(size);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, data).at(&partial, "writing")
        };
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        add("oci-layout", &mut &layout[..], layout.len() as u64)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": MT_MANIFEST,
                "digest": img.manifest_digest,
                "size": img.manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        })
        .to_string();
        add("index.json", &mut index.as_bytes(), index.len() as u64)?;
        let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
        add(
            &blob(&img.manifest_digest),
            &mut img.manifest.as_slice(),
            img.manifest.len() as u64,
        )?;
        for (digest, path, size) in [
            (&img.config_digest, &img.config, img.config_size),
            (&img.layer_digest, &img.layer, img.layer_size),
        ] {
            let mut f = File::open(path).at(path, "opening")?;
            add(&blob(digest), &mut f, size)?;
        }
        let w = b.into_inner().at(&partial, "finishing")?;
        w.into_inner()
            .map_err(|e| e.into_error())
            .at(&partial, "writing")?
            .sync_all()
            .at(&partial, "fsync")?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).at(out, "renaming the archive to")?;
    Ok(())
}

/// Pushes `img` to the registry as `r` (blobs, then the manifest).
pub fn push(img: &Image, r: &ImageRef, origin: &str) -> Result<String, OciError> {
    let reg = Registry::new(r, origin)?;
    Ok(reg.push(
        &[
            (img.layer_digest.clone(), img.layer.clone()),
            (img.config_digest.clone(), img.config.clone()),
        ],
        &img.manifest,
        MT_MANIFEST,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_is_the_tree_and_the_digests_match_the_bytes() {
        let t = tempfile::tempdir().expect("tempdir");
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("etc/sub")).expect("mkdir");
        std::fs::write(tree.join("etc/sub/file"), "hello").expect("write");
        std::os::unix::fs::symlink("sub/file", tree.join("etc/link")).expect("link");
        // Special files keep their name in the tree (tar's own path names them by host path).
        rustix::fs::mknodat(
            rustix::fs::CWD,
            tree.join("etc/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let img = build(&tree, &t.path().join("work"), "amd64", &[]).expect("build");
        let layer = std::fs::read(&img.layer).expect("read layer");
        assert_eq!(sha256_digest(&layer), img.layer_digest);
        assert_eq!(layer.len() as u64, img.layer_size);
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&layer[..]), &mut plain)
            .expect("gunzip");
        assert_eq!(sha256_digest(&plain), img.diff_id);
        let mut names = Vec::new();
        let mut a = tar::Archive::new(&plain[..]);
        for e in a.entries().expect("entries") {
            let e = e.expect("entry");
            let name = e.path().expect("path").to_string_lossy().into_owned();
            if name == "etc/link" {
                assert_eq!(e.header().entry_type(), tar::EntryType::Symlink);
            }
            if name == "etc/fifo" {
                assert_eq!(e.header().entry_type(), tar::EntryType::Fifo);
            }
            names.push(name);
        }
        assert_eq!(
            names,
            ["etc", "etc/fifo", "etc/link", "etc/sub", "etc/sub/file"]
        );
        let config = std::fs::read(&img.config).expect("config");
        assert_eq!(sha256_digest(&config), img.config_digest);
        let m: serde_json::Value = serde_json::from_slice(&img.manifest).expect("manifest");
        assert_eq!(m["layers"][0]["digest"], img.layer_digest.as_str());
        assert_eq!(m["config"]["size"], config.len());
        // The archive: what `ocifile:` reads.
        let out = t.path().join("image.oci.tar");
        write_archive(&img, "v1", &out).expect("archive");
        let mut names = Vec::new();
        let f = File::open(&out).expect("open");
        for e in tar::Archive::new(f).entries().expect("entries") {
            names.push(
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string(),
            );
        }
        assert_eq!(names[..2], ["oci-layout", "index.json"]);
        assert!(names.contains(&format!("blobs/sha256/{}", &img.layer_digest[7..])));
        assert!(!t.path().join("image.oci.tar.partial").exists());
    }
}
