//! `docker save` / `skopeo copy … docker-archive:FILE` tarballs, the format upstream documents
//! for `local_file: true` bundles: `manifest.json` names the image config (`<hex>.json`, or
//! `blobs/sha256/<hex>` from Docker 25) and the layers (uncompressed tars); the config's
//! `rootfs.diff_ids` are the layers' sha256, so every byte is still checked before a layer is
//! unpacked. An archive that also has `index.json` (Docker 25 writes both) is read as an OCI
//! layout by `upgrade::fetch` instead.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};
use sha2::{Digest as _, Sha256};

use crate::upgrade::{UpgradeError, oci};

/// manifest.json and the config are small; larger ones are refused.
const MAX_DOCUMENT: u64 = 8 << 20;

/// What manifest.json and the config say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// sha256 of the config (the image ID): the record's digest.
    pub digest: String,
    /// Layer entry names, in order.
    pub layers: Vec<String>,
    /// `sha256:<hex>` of each uncompressed layer, in order.
    pub diff_ids: Vec<String>,
}

fn invalid(origin: &str, what: impl Into<String>) -> UpgradeError {
    UpgradeError::Invalid {
        origin: origin.into(),
        what: what.into(),
    }
}

fn open(path: &Path) -> Result<tar::Archive<Box<dyn Read>>, IoError> {
    let f = File::open(path).at(path, "opening")?;
    let mut r = BufReader::new(f);
    let gz = r.fill_buf().at(path, "reading")?.starts_with(&[0x1f, 0x8b]);
    let inner: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(r))
    } else {
        Box::new(r)
    };
    Ok(tar::Archive::new(inner))
}

fn name_of<R: Read>(e: &tar::Entry<'_, R>) -> Option<String> {
    let p = e.path().ok()?;
    Some(p.to_str()?.trim_start_matches("./").to_owned())
}

/// Whether `path` is a docker-archive rather than an OCI layout archive: manifest.json and no
/// index.json.
pub fn is_docker_archive(path: &Path) -> Result<bool, IoError> {
    let mut ar = open(path)?;
    let (mut manifest, mut index) = (false, false);
    for e in ar.entries().at(path, "reading the archive")? {
        let e = e.at(path, "reading the archive")?;
        match name_of(&e).as_deref() {
            Some("manifest.json") => manifest = true,
            Some("index.json") => index = true,
            _ => {}
        }
    }
    Ok(manifest && !index)
}

/// Reads manifest.json (one image: the first) and its config, the config checked against the
/// digest its name carries.
pub fn resolve(path: &Path, origin: &str) -> Result<Resolved, UpgradeError> {
    let tar_err = |e: std::io::Error| invalid(origin, format!("not a readable tar archive: {e}"));
    let mut docs: HashMap<String, Vec<u8>> = HashMap::new();
    let mut ar = open(path)?;
    for e in ar.entries().map_err(tar_err)? {
        let mut e = e.map_err(tar_err)?;
        let Some(name) = name_of(&e) else { continue };
        let small = e.header().size().unwrap_or(u64::MAX) <= MAX_DOCUMENT;
        if small
            && (name == "manifest.json" || name.ends_with(".json") || name.starts_with("blobs/"))
        {
            let mut buf = Vec::new();
            e.read_to_end(&mut buf).map_err(tar_err)?;
            docs.insert(name, buf);
        }
    }
    let manifest = docs
        .get("manifest.json")
        .ok_or_else(|| invalid(origin, "no manifest.json and no index.json: not an image archive (docker save, or skopeo copy … docker-archive:/oci-archive:)"))?;
    let m: serde_json::Value = serde_json::from_slice(manifest)
        .map_err(|e| invalid(origin, format!("manifest.json is not JSON: {e}")))?;
    let first = m
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| invalid(origin, "manifest.json lists no image"))?;
    let config_name = first
        .get("Config")
        .and_then(|c| c.as_str())
        .ok_or_else(|| invalid(origin, "manifest.json: the image has no Config"))?
        .trim_start_matches("./")
        .to_owned();
    let layers: Vec<String> = first
        .get("Layers")
        .and_then(|l| l.as_array())
        .ok_or_else(|| invalid(origin, "manifest.json: the image has no Layers"))?
        .iter()
        .map(|l| {
            l.as_str()
                .map(|s| s.trim_start_matches("./").to_owned())
                .ok_or_else(|| invalid(origin, "manifest.json: a layer name is not a string"))
        })
        .collect::<Result<_, _>>()?;
    let config = docs.get(&config_name).ok_or_else(|| {
        invalid(
            origin,
            format!("the config {config_name} is not in the archive"),
        )
    })?;
    let digest = oci::sha256_digest(config);
    let named = config_name
        .trim_start_matches("blobs/sha256/")
        .trim_end_matches(".json");
    if oci::sha256_hex_of(&format!("sha256:{named}")).is_some()
        && digest != format!("sha256:{named}")
    {
        return Err(UpgradeError::DigestMismatch {
            origin: origin.into(),
            what: "config".into(),
            digest: format!("sha256:{named}"),
            actual: digest,
        });
    }
    let c: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| invalid(origin, format!("the config is not JSON: {e}")))?;
    let diff_ids: Vec<String> = c
        .pointer("/rootfs/diff_ids")
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != layers.len() || layers.is_empty() {
        return Err(invalid(
            origin,
            format!(
                "manifest.json lists {} layer(s), the config's rootfs.diff_ids {}",
                layers.len(),
                diff_ids.len()
            ),
        ));
    }
    Ok(Resolved {
        digest,
        layers,
        diff_ids,
    })
}

/// Copies the layers out of the archive into `dir` (`layer-<n>`), each checked against its
/// diff_id as it streams; returns them in order. A mismatching layer is deleted and named.
pub fn extract_layers(
    path: &Path,
    origin: &str,
    r: &Resolved,
    dir: &Path,
    log: &mut dyn Write,
) -> Result<Vec<PathBuf>, UpgradeError> {
    let tar_err = |e: std::io::Error| invalid(origin, format!("not a readable tar archive: {e}"));
    let n = r.layers.len();
    let mut out: Vec<Option<PathBuf>> = vec![None; n];
    let mut ar = open(path)?;
    for e in ar.entries().map_err(tar_err)? {
        let mut e = e.map_err(tar_err)?;
        let Some(name) = name_of(&e) else { continue };
        // The same layer may be listed more than once (Docker lists identical layers by one
        // name): one copy serves every place.
        let places: Vec<usize> = (0..n)
            .filter(|&i| r.layers[i] == name && out[i].is_none())
            .collect();
        let Some(&first) = places.first() else {
            continue;
        };
        let what = format!("layer {}/{n}", first + 1);
        let dest = dir.join(format!("layer-{}", first + 1));
        let _ = writeln!(log, "kairos-agent: {origin}: unpacking {what} {name}");
        let mut f = File::create(&dest).at(&dest, "creating")?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let k = e.read(&mut buf).map_err(tar_err)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            f.write_all(&buf[..k]).at(&dest, "writing")?;
        }
        let actual = format!("sha256:{}", oci::hex(&h.finalize()));
        for i in places {
            if actual != r.diff_ids[i] {
                let _ = std::fs::remove_file(&dest);
                return Err(UpgradeError::DigestMismatch {
                    origin: origin.into(),
                    what: format!("layer {}/{n}", i + 1),
                    digest: r.diff_ids[i].clone(),
                    actual,
                });
            }
            out[i] = Some(dest.clone());
        }
    }
    out.into_iter()
        .zip(&r.layers)
        .map(|(p, l)| p.ok_or_else(|| invalid(origin, format!("layer {l} is not in the archive"))))
        .collect()
}
