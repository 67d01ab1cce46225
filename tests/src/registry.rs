//! A local OCI registry for the upgrade tests: Debian's `docker-registry` (the CNCF
//! distribution registry) on 127.0.0.1 with filesystem storage in a temp dir, stopped on drop.
//! Images are made from a rootfs directory (one gzip layer, an OCI config and manifest) and
//! pushed with the plain distribution API (POST + PUT for blobs, PUT for the manifest); the
//! same image can be written as an OCI image-layout archive for `ocifile:`. For the
//! digest-mismatch tests a stored blob can be corrupted in place.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest as _, Sha256};

pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::from("sha256:");
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// An image: its layers, config and manifest, and their digests.
pub struct Image {
    pub layers: Vec<Vec<u8>>,
    pub layer_digests: Vec<String>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    pub config_digest: String,
    pub manifest_digest: String,
}

impl Image {
    /// The (first) layer's digest.
    pub fn layer_digest(&self) -> &str {
        &self.layer_digests[0]
    }

    /// Every blob the manifest names, with its digest.
    pub fn blobs(&self) -> Vec<(&str, &[u8])> {
        self.layer_digests
            .iter()
            .zip(&self.layers)
            .map(|(d, l)| (d.as_str(), l.as_slice()))
            .chain([(self.config_digest.as_str(), self.config.as_slice())])
            .collect()
    }
}

/// A gzip-compressed tar of `dir` (ownership, modes and mtimes as on disk; files named
/// `.wh.X` are OCI whiteouts) and the sha256 of the uncompressed tar (the diff id).
pub fn layer_of(dir: &Path) -> Result<(Vec<u8>, String)> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)
        .with_context(|| format!("tar of {}", dir.display()))?;
    let tar = tar.into_inner()?;
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    Ok((gz.finish()?, diff_id))
}

/// One gzip layer per directory (applied in order), an OCI config for `arch` and an OCI
/// manifest.
pub fn image_from_layers(dirs: &[&Path], arch: &str) -> Result<Image> {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for d in dirs {
        let (l, id) = layer_of(d)?;
        layers.push(l);
        diff_ids.push(id);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let layer_digests: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let config_digest = sha256(&config);
    let descs: Vec<serde_json::Value> = layer_digests
        .iter()
        .zip(&layers)
        .map(|(d, l)| serde_json::json!({"mediaType": MT_LAYER, "digest": d, "size": l.len()}))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))?;
    Ok(Image {
        manifest_digest: sha256(&manifest),
        layers,
        layer_digests,
        config,
        manifest,
        config_digest,
    })
}

/// One layer holding `rootfs`, for linux/amd64.
pub fn image_from_rootfs(rootfs: &Path) -> Result<Image> {
    image_from_layers(&[rootfs], "amd64")
}

/// An OCI image index over `(image, os/arch)` pairs.
pub fn index_of(images: &[(&Image, &str)]) -> Result<Vec<u8>> {
    let manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|(img, platform)| {
            let (os, arch) = platform.split_once('/').unwrap_or(("linux", platform));
            serde_json::json!({
                "mediaType": MT_MANIFEST,
                "digest": img.manifest_digest,
                "size": img.manifest.len(),
                "platform": {"os": os, "architecture": arch},
            })
        })
        .collect();
    Ok(serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": manifests,
    }))?)
}

fn layout_index(img: &Image) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": img.manifest_digest,
            "size": img.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    }))?)
}

/// Writes `img` as an OCI image-layout tar (what `skopeo copy … oci-archive:out` makes):
/// `oci-layout`, `index.json` (one manifest, no platform, a ref-name annotation) and
/// `blobs/sha256/<hex>`.
pub fn write_oci_archive(img: &Image, out: &Path) -> Result<()> {
    let index = layout_index(img)?;
    let f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(f);
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data)?;
        Ok(())
    };
    // Blobs first, index.json last, as skopeo writes them: the reader may not rely on order.
    for (d, bytes) in img
        .blobs()
        .into_iter()
        .chain([(img.manifest_digest.as_str(), img.manifest.as_slice())])
    {
        add(
            &format!("blobs/sha256/{}", d.trim_start_matches("sha256:")),
            bytes,
        )?;
    }
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    tar.into_inner()?.sync_all()?;
    Ok(())
}

/// Writes `img` as an OCI image-layout directory (`skopeo copy … oci:DIR`).
pub fn write_oci_layout(img: &Image, dir: &Path) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    for (d, bytes) in img
        .blobs()
        .into_iter()
        .chain([(img.manifest_digest.as_str(), img.manifest.as_slice())])
    {
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes)?;
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(dir.join("index.json"), layout_index(img)?)?;
    Ok(())
}

/// A running `docker-registry serve`.
pub struct Registry {
    child: Child,
    pub addr: String,
    dir: tempfile::TempDir,
}

/// A port nothing listens on right now (bound and released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`, for the registry's API.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    ctype: Option<&str>,
    body: &[u8],
) -> Result<Response> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(c) = ctype {
        req.push_str(&format!("Content-Type: {c}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("HTTP response without a header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("HTTP response without a status")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    // Chunked bodies only come with errors here; keep them readable enough for messages.
    if body.len() > 4096 {
        body.truncate(4096);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

impl Registry {
    /// Installs docker-registry if needed and starts it on a free 127.0.0.1 port.
    pub fn start() -> Result<Registry> {
        kairos_qemu::apt::ensure_packages(&["docker-registry"])
            .context("installing docker-registry")?;
        let dir = tempfile::Builder::new()
            .prefix("kairos-registry-")
            .tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("storage").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BINARY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {REGISTRY_BINARY}"))?;
        let mut r = Registry { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(resp) = http(&r.addr, "GET", "/v2/", None, b"")
                && resp.status == 200
            {
                return Ok(r);
            }
            if let Ok(Some(st)) = r.child.try_wait() {
                bail!(
                    "docker-registry exited ({st}) before answering:\n{}",
                    r.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry did not answer /v2/ within 30 s:\n{}",
                    r.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `docker-registry` process, e.g. for a watcher that outlives a `static` Registry
    /// (statics are never dropped).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir holding the config, the log and the storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The registry's storage directory (filesystem driver).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn push_blob(&self, repo: &str, digest: &str, data: &[u8]) -> Result<()> {
        let r = http(
            &self.addr,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            None,
            b"",
        )?;
        if r.status != 202 {
            bail!(
                "starting a blob upload: HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        let loc = r.header("Location").context("upload without Location")?;
        // The location may be absolute (http://host/v2/...) or a path.
        let path = match loc.find("/v2/") {
            Some(i) => &loc[i..],
            None => loc,
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let r = http(
            &self.addr,
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            Some("application/octet-stream"),
            data,
        )?;
        if r.status != 201 {
            bail!(
                "uploading {digest}: HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        Ok(())
    }

    fn put_manifest(&self, repo: &str, reference: &str, ctype: &str, body: &[u8]) -> Result<()> {
        let r = http(
            &self.addr,
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            Some(ctype),
            body,
        )?;
        if r.status != 201 {
            bail!(
                "pushing the manifest {repo}:{reference}: HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        Ok(())
    }

    /// Pushes `img` as `repo:tag`.
    pub fn push(&self, repo: &str, tag: &str, img: &Image) -> Result<()> {
        for (d, bytes) in img.blobs() {
            self.push_blob(repo, d, bytes)?;
        }
        self.put_manifest(repo, tag, MT_MANIFEST, &img.manifest)
    }

    /// Pushes each image by digest and an index over them as `repo:tag`.
    pub fn push_index(&self, repo: &str, tag: &str, images: &[(&Image, &str)]) -> Result<String> {
        for (img, _) in images {
            for (d, bytes) in img.blobs() {
                self.push_blob(repo, d, bytes)?;
            }
            self.put_manifest(repo, &img.manifest_digest, MT_MANIFEST, &img.manifest)?;
        }
        let index = index_of(images)?;
        self.put_manifest(repo, tag, MT_INDEX, &index)?;
        Ok(sha256(&index))
    }

    /// Builds an image from `rootfs` and pushes it; the reference to pull it by is
    /// `oci:<addr>/<repo>:<tag>`.
    pub fn push_rootfs(&self, repo: &str, tag: &str, rootfs: &Path) -> Result<Image> {
        let img = image_from_rootfs(rootfs)?;
        self.push(repo, tag, &img)?;
        Ok(img)
    }

    /// The file the filesystem driver keeps a blob in.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Flips one byte in the middle of a stored blob (same size, wrong content): the registry
    /// serves it as it is.
    pub fn corrupt_blob(&self, digest: &str) -> Result<()> {
        let p = self.blob_path(digest);
        let mut data = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let i = data.len() / 2;
        data[i] ^= 0xff;
        std::fs::write(&p, data)?;
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
