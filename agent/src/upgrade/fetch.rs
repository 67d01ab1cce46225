//! Getting an OCI image's blobs onto disk, verified: from a registry (oci-client on a
//! current-thread tokio runtime), from an OCI image-layout archive (`ocifile:`, the tar
//! `skopeo copy … oci-archive:` or `docker save` writes) or from an OCI layout directory.
//!
//! Each source first *resolves* the image (index → manifest → config, all small documents
//! held in memory and checked against their digests) without writing anything, so the space
//! check can run before the first byte lands on disk; then it *fetches* the layers into a
//! [`Store`], hashing and counting every byte as it streams: a blob whose sha256 or size is not
//! what its descriptor says is deleted and named in the error.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use kairos_util::{IoError, IoResultExt};

use super::UpgradeError;
use super::layer::Applied;
use super::oci::{self, Blob, MAX_DOCUMENT_BYTES, Resolved, Verifier};
use super::pipeline;
use super::source::ImageRef;
use crate::http::chain;

/// Small blobs kept in memory while an archive is scanned, in total.
const MAX_SMALL_BLOBS_BYTES: u64 = 64 << 20;

/// Verified blobs under a work directory, one file per digest (`<hex>`).
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Result<Store, UpgradeError> {
        std::fs::create_dir_all(dir).at(dir, "creating the blob directory")?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, b: &Blob) -> PathBuf {
        self.dir.join(b.hex())
    }

    /// Streams `r` into the store as `b`, verifying on the way; nothing is left behind on a
    /// mismatch.
    pub fn put(
        &self,
        origin: &str,
        what: &str,
        b: &Blob,
        r: &mut dyn Read,
    ) -> Result<PathBuf, UpgradeError> {
        let dest = self.path(b);
        let part = self.dir.join(format!("{}.part", b.hex()));
        let result = (|| {
            let mut f = File::create(&part).at(&part, "creating")?;
            let mut v = Verifier::new(origin, what, b);
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = r.read(&mut buf).map_err(|e| UpgradeError::Read {
                    origin: origin.into(),
                    what: format!("{what} {}", b.digest),
                    detail: e.to_string(),
                })?;
                if n == 0 {
                    break;
                }
                v.update(&buf[..n])?;
                f.write_all(&buf[..n]).at(&part, "writing")?;
            }
            v.finish()?;
            std::fs::rename(&part, &dest)
                .at(&dest, "renaming the blob to")
                .map_err(UpgradeError::from)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        result.map(|()| dest)
    }
}

/// Where the image comes from.
pub enum Puller {
    Registry(Box<Registry>),
    Archive(Archive),
    Layout(Layout),
}

impl Puller {
    /// The manifest, config and layer list, verified; nothing written.
    pub fn resolve(&mut self) -> Result<Resolved, UpgradeError> {
        match self {
            Puller::Registry(r) => r.resolve(),
            Puller::Archive(a) => a.resolve(),
            Puller::Layout(l) => l.resolve(),
        }
    }

    /// Every layer as a verified file, in manifest order.
    pub fn fetch_layers(
        &mut self,
        r: &Resolved,
        store: &Store,
        log: &mut dyn Write,
    ) -> Result<Vec<PathBuf>, UpgradeError> {
        match self {
            Puller::Registry(reg) => reg.fetch_layers(r, store, log),
            Puller::Archive(a) => a.fetch_layers(r, store, log),
            Puller::Layout(l) => l.fetch_layers(r, log),
        }
    }

    /// Whether fetching writes the layers into the store (a layout directory is read in place).
    pub fn copies_layers(&self) -> bool {
        !matches!(self, Puller::Layout(_))
    }

    /// Whether [`Puller::unpack_streamed`] applies the layers as they download (a registry).
    pub fn streams_layers(&self) -> bool {
        matches!(self, Puller::Registry(_))
    }

    /// A registry's layers downloaded, verified and applied onto `staging` in one pass (no
    /// blob written to disk); None for the other sources, which go through the store.
    pub fn unpack_streamed(
        &mut self,
        r: &Resolved,
        staging: &Path,
        log: &mut dyn Write,
    ) -> Option<Result<Vec<Applied>, UpgradeError>> {
        match self {
            Puller::Registry(reg) => Some(reg.unpack_streamed(r, staging, log)),
            Puller::Archive(_) | Puller::Layout(_) => None,
        }
    }
}

// ---- registry ----

/// Whether `--allow-insecure-registries` was given (set once by the command line).
static ALLOW_INSECURE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--allow-insecure-registries`: registries at private addresses may be reached over plain
/// HTTP too. A process-wide switch so every pull (install, upgrade) sees it.
pub fn allow_insecure_registries(on: bool) {
    ALLOW_INSECURE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Registries reached over plain HTTP: localhost and loopback; with `allow_private` (the
/// option above) also RFC 1918, IPv6 unique-local and link-local addresses, as upstream's
/// `--allow-insecure-registries`. Everything else is HTTPS, so a registry on the network
/// cannot be impersonated by whoever answers for its address.
pub fn plain_http(registry: &str, allow_private: bool) -> bool {
    let host = if let Some(v6) = registry.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            a.is_loopback() || (allow_private && (a.is_private() || a.is_link_local()))
        }
        Ok(std::net::IpAddr::V6(a)) => {
            a.is_loopback() || (allow_private && (a.is_unique_local() || a.is_unicast_link_local()))
        }
        Err(_) => false,
    }
}

/// The first of these environment variables that is set and not empty.
fn env_any(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

pub struct Registry {
    rt: tokio::runtime::Runtime,
    client: Client,
    reference: Reference,
    origin: String,
    auth: RegistryAuth,
    /// Said with every error when the registry would have been plain HTTP with the option.
    hint: &'static str,
}

impl Registry {
    pub fn new(r: &ImageRef, origin: &str) -> Result<Registry, UpgradeError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| UpgradeError::Registry {
                origin: origin.into(),
                what: "starting the HTTP runtime".into(),
                detail: e.to_string(),
            })?;
        let insecure = ALLOW_INSECURE.load(std::sync::atomic::Ordering::Relaxed);
        let protocol = if plain_http(&r.registry, insecure) {
            ClientProtocol::HttpsExcept(vec![r.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        // Not Client::new: it falls back to reqwest's default client, which panics when the
        // system has no CA certificates (found on a minimal image); say so instead.
        let client = Client::try_from(ClientConfig {
            protocol,
            connect_timeout: Some(Duration::from_secs(20)),
            read_timeout: Some(Duration::from_secs(60)),
            platform_resolver: None,
            https_proxy: env_any(&["HTTPS_PROXY", "https_proxy"]),
            http_proxy: env_any(&["HTTP_PROXY", "http_proxy"]),
            no_proxy: env_any(&["NO_PROXY", "no_proxy"]),
            ..ClientConfig::default()
        })
        .map_err(|e| UpgradeError::Registry {
            origin: origin.into(),
            what: "setting up the HTTP client (TLS needs the system's CA certificates, \
                   /etc/ssl/certs/ca-certificates.crt or SSL_CERT_FILE)"
                .into(),
            detail: chain(&e),
        })?;
        let reference = match &r.digest {
            Some(d) => Reference::with_digest(r.registry.clone(), r.repository.clone(), d.clone()),
            None => Reference::with_tag(r.registry.clone(), r.repository.clone(), r.tag.clone()),
        };
        Ok(Registry {
            rt,
            client,
            reference,
            origin: origin.into(),
            auth: RegistryAuth::Anonymous,
            hint: if plain_http(&r.registry, true) && !plain_http(&r.registry, insecure) {
                " (tried HTTPS: a registry at a private address over plain HTTP needs \
                 --allow-insecure-registries)"
            } else {
                ""
            },
        })
    }

    fn error(&self, what: &str, e: OciDistributionError) -> UpgradeError {
        if let OciDistributionError::DigestError(
            oci_client::errors::DigestError::VerificationError { expected, actual },
        ) = &e
        {
            return UpgradeError::DigestMismatch {
                origin: self.origin.clone(),
                what: what.into(),
                digest: expected.clone(),
                actual: actual.clone(),
            };
        }
        UpgradeError::Registry {
            origin: self.origin.clone(),
            what: format!("{what} ({})", self.reference.whole()),
            detail: format!("{}{}", chain(&e), self.hint),
        }
    }

    /// Uploads `blobs` (digest, file; the ones the registry has already are skipped by it)
    /// and then `manifest` (of media type `media_type`) under this reference, as
    /// `kairos-build image --out oci:` does. Returns the manifest's URL.
    pub fn push(
        &self,
        blobs: &[(String, PathBuf)],
        manifest: &[u8],
        media_type: &str,
    ) -> Result<String, UpgradeError> {
        let content_type =
            http::HeaderValue::from_str(media_type).map_err(|e| UpgradeError::Registry {
                origin: self.origin.clone(),
                what: format!("media type {media_type:?}"),
                detail: e.to_string(),
            })?;
        self.rt.block_on(async {
            self.client
                .auth(
                    &self.reference,
                    &self.auth,
                    oci_client::RegistryOperation::Push,
                )
                .await
                .map_err(|e| self.error("authenticating to push", e))?;
            for (digest, path) in blobs {
                let data = std::fs::read(path).at(path, "reading the blob")?;
                self.client
                    .push_blob(&self.reference, data, digest)
                    .await
                    .map_err(|e| self.error(&format!("pushing blob {digest}"), e))?;
            }
            self.client
                .push_manifest_raw(&self.reference, manifest.to_vec(), content_type)
                .await
                .map_err(|e| self.error("pushing the manifest", e))
        })
    }

    /// The repository's tags (the distribution API's tags list, page after page, for
    /// `upgrade list-releases`), in the registry's order.
    pub fn tags(&self) -> Result<Vec<String>, UpgradeError> {
        // Asked per page; registries may send fewer (a cap of their own) or ignore it.
        const PAGE: usize = 1000;
        // Enough for any repository of OS images; stops a registry that never ends.
        const MAX_TAGS: usize = 100_000;
        let mut all: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        let mut last: Option<String> = None;
        loop {
            let page = self
                .rt
                .block_on(self.client.list_tags(
                    &self.reference,
                    &self.auth,
                    Some(PAGE),
                    last.as_deref(),
                ))
                .map_err(|e| self.error("listing the tags", e))?;
            let next = page.tags.last().cloned();
            let before = all.len();
            for t in page.tags {
                if seen.insert(t.clone()) {
                    all.push(t);
                }
            }
            // Done on an empty page, or when a page brought nothing new (a registry that
            // ignores `last` sends the same page again).
            if all.len() == before || next.is_none() || all.len() >= MAX_TAGS {
                break;
            }
            last = next;
        }
        Ok(all)
    }

    fn manifest(&self, reference: &Reference, what: &str) -> Result<Vec<u8>, UpgradeError> {
        let (bytes, _) = self
            .rt
            .block_on(
                self.client
                    .pull_manifest_raw(reference, &self.auth, oci::ACCEPTED_MANIFESTS),
            )
            .map_err(|e| self.error(&format!("fetching the {what}"), e))?;
        Ok(bytes.to_vec())
    }

    /// Streams one blob through `sink`, verified against `b` as it arrives.
    fn stream(
        &self,
        what: &str,
        b: &Blob,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), UpgradeError>,
    ) -> Result<(), UpgradeError> {
        let desc = OciDescriptor {
            media_type: b.media_type.clone(),
            digest: b.digest.clone(),
            size: i64::try_from(b.size).unwrap_or(i64::MAX),
            ..OciDescriptor::default()
        };
        let origin = self.origin.as_str();
        self.rt.block_on(async {
            let mut s = self
                .client
                .pull_blob_stream(&self.reference, &desc)
                .await
                .map_err(|e| self.error(&format!("fetching {what} {}", b.digest), e))?;
            let mut v = Verifier::new(origin, what, b);
            while let Some(chunk) = s.next().await {
                match chunk {
                    Ok(c) => {
                        v.update(&c)?;
                        sink(&c)?;
                    }
                    // oci-client's own check ends the stream with an error: say it our way.
                    Err(e) if v.complete_and_correct() => {
                        return Err(UpgradeError::Registry {
                            origin: origin.into(),
                            what: format!("fetching {what} {}", b.digest),
                            detail: chain(&e),
                        });
                    }
                    Err(e) => {
                        return Err(
                            if e.kind() == std::io::ErrorKind::InvalidData
                                || e.to_string().contains("digest")
                            {
                                // The bytes are all here and wrong: the digest error names them.
                                UpgradeError::DigestMismatch {
                                    origin: origin.into(),
                                    what: what.into(),
                                    digest: b.digest.clone(),
                                    actual: v.digest_so_far(),
                                }
                            } else {
                                UpgradeError::Registry {
                                    origin: origin.into(),
                                    what: format!("fetching {what} {}", b.digest),
                                    detail: chain(&e),
                                }
                            },
                        );
                    }
                }
            }
            v.finish()
        })
    }

    fn resolve(&mut self) -> Result<Resolved, UpgradeError> {
        let top = self.manifest(&self.reference, "manifest")?;
        let digest = oci::sha256_digest(&top);
        if let Some(pinned) = self.reference.digest()
            && pinned != digest
        {
            return Err(UpgradeError::DigestMismatch {
                origin: self.origin.clone(),
                what: "manifest".into(),
                digest: pinned.to_string(),
                actual: digest,
            });
        }
        let origin = self.origin.clone();
        let this = &*self;
        oci::resolve(
            &origin,
            &top,
            Some(digest),
            oci::this_arch(),
            &mut |b, what| {
                if what.starts_with("manifest") {
                    let r = this.reference.clone_with_digest(b.digest.clone());
                    this.manifest(&r, what)
                } else {
                    let mut buf = Vec::new();
                    this.stream(what, b, &mut |c| {
                        buf.extend_from_slice(c);
                        Ok(())
                    })?;
                    Ok(buf)
                }
            },
        )
    }

    fn unpack_streamed(
        &mut self,
        r: &Resolved,
        staging: &Path,
        log: &mut dyn Write,
    ) -> Result<Vec<Applied>, UpgradeError> {
        let n = r.layers.len();
        pipeline::unpack_streamed(&r.layers, staging, &mut |i, b, sink| {
            let what = format!("layer {}/{n}", i + 1);
            let _ = writeln!(
                log,
                "kairos-agent: pulling {what} {} ({} bytes), unpacking as it streams",
                b.digest, b.size
            );
            self.stream(&what, b, sink)
        })
    }

    fn fetch_layers(
        &mut self,
        r: &Resolved,
        store: &Store,
        log: &mut dyn Write,
    ) -> Result<Vec<PathBuf>, UpgradeError> {
        let mut out = Vec::new();
        for (i, b) in r.layers.iter().enumerate() {
            let what = format!("layer {}/{}", i + 1, r.layers.len());
            let _ = writeln!(
                log,
                "kairos-agent: pulling {what} {} ({} bytes)",
                b.digest, b.size
            );
            let dest = store.path(b);
            let part = dest.with_extension("part");
            let mut f = File::create(&part).at(&part, "creating")?;
            let res = self.stream(&what, b, &mut |c| {
                f.write_all(c)
                    .at(&part, "writing")
                    .map_err(UpgradeError::from)
            });
            if let Err(e) = res {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
            std::fs::rename(&part, &dest).at(&dest, "renaming the blob to")?;
            out.push(dest);
        }
        Ok(out)
    }
}

// ---- OCI layout: archive and directory ----

/// `blobs/sha256/<hex>` → the hex; `index.json` → None (checked by the caller); anything else
/// is not part of the layout.
fn layout_blob_hex(name: &Path) -> Option<String> {
    let s = name.to_str()?;
    let s = s.trim_start_matches("./");
    let hex = s.strip_prefix("blobs/sha256/")?;
    oci::sha256_hex_of(&format!("sha256:{hex}")).map(str::to_owned)
}

fn is_index_json(name: &Path) -> bool {
    name.to_str()
        .is_some_and(|s| s.trim_start_matches("./") == "index.json")
}

/// Opens an archive, gunzipping it when it starts with the gzip magic.
fn open_tar(path: &Path, origin: &str) -> Result<tar::Archive<Box<dyn Read>>, UpgradeError> {
    let f = File::open(path).map_err(|e| not_found_or(path, origin, e))?;
    let mut r = BufReader::new(f);
    let gz = {
        use std::io::BufRead;
        let head = r.fill_buf().at(path, "reading")?;
        head.starts_with(&[0x1f, 0x8b])
    };
    let inner: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(r))
    } else {
        Box::new(r)
    };
    Ok(tar::Archive::new(inner))
}

fn not_found_or(path: &Path, origin: &str, e: std::io::Error) -> UpgradeError {
    if e.kind() == std::io::ErrorKind::NotFound {
        UpgradeError::NotFound {
            origin: origin.into(),
            path: path.to_path_buf(),
        }
    } else {
        UpgradeError::Io(IoError::new(path.to_path_buf(), "opening", e))
    }
}

fn tar_err(origin: &str, e: std::io::Error) -> UpgradeError {
    UpgradeError::Invalid {
        origin: origin.into(),
        what: format!("not a readable tar archive: {e}"),
    }
}

fn read_bounded(r: &mut dyn Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    r.take(limit + 1).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= limit).then_some(buf))
}

/// An OCI image-layout tar (`ocifile:`): read twice, first for the documents, then for the
/// layers the chosen manifest lists.
pub struct Archive {
    path: PathBuf,
    origin: String,
    small: HashMap<String, Vec<u8>>,
}

impl Archive {
    pub fn new(path: &Path, origin: &str) -> Archive {
        Archive {
            path: path.to_path_buf(),
            origin: origin.into(),
            small: HashMap::new(),
        }
    }

    fn resolve(&mut self) -> Result<Resolved, UpgradeError> {
        let origin = self.origin.clone();
        let mut ar = open_tar(&self.path, &origin)?;
        let mut index = None;
        let mut kept = 0u64;
        for entry in ar.entries().map_err(|e| tar_err(&origin, e))? {
            let mut entry = entry.map_err(|e| tar_err(&origin, e))?;
            let name = entry.path().map_err(|e| tar_err(&origin, e))?.into_owned();
            if is_index_json(&name) {
                index = Some(
                    read_bounded(&mut entry, MAX_DOCUMENT_BYTES)
                        .map_err(|e| tar_err(&origin, e))?
                        .ok_or_else(|| UpgradeError::Invalid {
                            origin: origin.clone(),
                            what: "index.json is larger than 8 MiB".into(),
                        })?,
                );
            } else if let Some(hex) = layout_blob_hex(&name) {
                let size = entry.header().size().unwrap_or(u64::MAX);
                if size <= MAX_DOCUMENT_BYTES && kept + size <= MAX_SMALL_BLOBS_BYTES {
                    let mut buf = Vec::new();
                    entry
                        .read_to_end(&mut buf)
                        .map_err(|e| tar_err(&origin, e))?;
                    kept += buf.len() as u64;
                    self.small.insert(hex, buf);
                }
            }
        }
        let index = index.ok_or_else(|| UpgradeError::Invalid {
            origin: origin.clone(),
            what: "no index.json: not an OCI image layout archive (skopeo copy … oci-archive:FILE writes one)".into(),
        })?;
        let small = &self.small;
        oci::resolve(&origin, &index, None, oci::this_arch(), &mut |b, what| {
            small
                .get(b.hex())
                .cloned()
                .ok_or_else(|| UpgradeError::Invalid {
                    origin: origin.clone(),
                    what: format!("{what} is not in the archive"),
                })
        })
    }

    fn fetch_layers(
        &mut self,
        r: &Resolved,
        store: &Store,
        log: &mut dyn Write,
    ) -> Result<Vec<PathBuf>, UpgradeError> {
        let origin = self.origin.clone();
        let what_of = |hex: &str| {
            r.layers
                .iter()
                .position(|l| l.hex() == hex)
                .map(|i| (format!("layer {}/{}", i + 1, r.layers.len()), &r.layers[i]))
        };
        let mut have: HashSet<String> = HashSet::new();
        // Layers small enough to have been kept by the first pass.
        for l in &r.layers {
            if let Some(bytes) = self.small.get(l.hex())
                && !have.contains(l.hex())
            {
                let what = what_of(l.hex()).map_or_else(String::new, |(w, _)| w);
                store.put(&origin, &what, l, &mut &bytes[..])?;
                have.insert(l.hex().to_owned());
            }
        }
        if have.len()
            < r.layers
                .iter()
                .map(|l| l.hex())
                .collect::<HashSet<_>>()
                .len()
        {
            let mut ar = open_tar(&self.path, &origin)?;
            for entry in ar.entries().map_err(|e| tar_err(&origin, e))? {
                let mut entry = entry.map_err(|e| tar_err(&origin, e))?;
                let name = entry.path().map_err(|e| tar_err(&origin, e))?.into_owned();
                let Some(hex) = layout_blob_hex(&name) else {
                    continue;
                };
                let Some((what, blob)) = what_of(&hex) else {
                    continue;
                };
                if have.contains(&hex) {
                    continue;
                }
                let _ = writeln!(
                    log,
                    "kairos-agent: unpacking {what} {} ({} bytes) from the archive",
                    blob.digest, blob.size
                );
                store.put(&origin, &what, blob, &mut entry)?;
                have.insert(hex);
            }
        }
        r.layers
            .iter()
            .map(|l| {
                if have.contains(l.hex()) {
                    Ok(store.path(l))
                } else {
                    Err(UpgradeError::Invalid {
                        origin: origin.clone(),
                        what: format!("layer {} is not in the archive", l.digest),
                    })
                }
            })
            .collect()
    }
}

/// An OCI image layout directory (`ocifile:DIR`): blobs are verified where they are.
pub struct Layout {
    dir: PathBuf,
    origin: String,
}

impl Layout {
    pub fn new(dir: &Path, origin: &str) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            origin: origin.into(),
        }
    }

    fn blob_path(&self, b: &Blob) -> PathBuf {
        self.dir.join("blobs/sha256").join(b.hex())
    }

    fn read_doc(&self, path: &Path, what: &str) -> Result<Vec<u8>, UpgradeError> {
        let mut f = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                UpgradeError::Invalid {
                    origin: self.origin.clone(),
                    what: format!("{what}: {} does not exist", path.display()),
                }
            } else {
                IoError::new(path, "opening", e).into()
            }
        })?;
        read_bounded(&mut f, MAX_DOCUMENT_BYTES)
            .at(path, "reading")?
            .ok_or_else(|| UpgradeError::Invalid {
                origin: self.origin.clone(),
                what: format!("{what} is larger than 8 MiB"),
            })
    }

    fn resolve(&mut self) -> Result<Resolved, UpgradeError> {
        let index = self.read_doc(&self.dir.join("index.json"), "index.json")?;
        let this = &*self;
        oci::resolve(
            &self.origin,
            &index,
            None,
            oci::this_arch(),
            &mut |b, what| this.read_doc(&this.blob_path(b), what),
        )
    }

    fn fetch_layers(
        &mut self,
        r: &Resolved,
        log: &mut dyn Write,
    ) -> Result<Vec<PathBuf>, UpgradeError> {
        let mut out = Vec::new();
        for (i, b) in r.layers.iter().enumerate() {
            let what = format!("layer {}/{}", i + 1, r.layers.len());
            let path = self.blob_path(b);
            let _ = writeln!(log, "kairos-agent: verifying {what} {}", b.digest);
            let mut f = File::open(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    UpgradeError::Invalid {
                        origin: self.origin.clone(),
                        what: format!("{what} {} is not in the layout", b.digest),
                    }
                } else {
                    IoError::new(&path, "opening", e).into()
                }
            })?;
            let mut v = Verifier::new(&self.origin, &what, b);
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = f.read(&mut buf).at(&path, "reading")?;
                if n == 0 {
                    break;
                }
                v.update(&buf[..n])?;
            }
            v.finish()?;
            out.push(path);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_unless_allowed() {
        for r in [
            "localhost:5000",
            "localhost",
            "127.0.0.1:5000",
            "[::1]:5000",
            "reg.localhost:1",
        ] {
            assert!(plain_http(r, false), "{r}");
            assert!(plain_http(r, true), "{r}");
        }
        // Private addresses: HTTPS unless --allow-insecure-registries.
        for r in [
            "10.0.2.2:5000",
            "10.1.2.3",
            "192.168.1.1:443",
            "172.20.0.1:80",
            "169.254.1.1:5000",
            "[fd00::1]:5000",
            "[fe80::1]:5000",
        ] {
            assert!(!plain_http(r, false), "{r}");
            assert!(plain_http(r, true), "{r}");
        }
        for r in [
            "docker.io",
            "quay.io",
            "8.8.8.8:5000",
            "172.32.0.1",
            "[2001:db8::1]:5000",
        ] {
            assert!(!plain_http(r, false), "{r}");
            assert!(!plain_http(r, true), "{r}");
        }
    }

    #[test]
    fn layout_names() {
        let hex = "a".repeat(64);
        assert_eq!(
            layout_blob_hex(Path::new(&format!("./blobs/sha256/{hex}"))),
            Some(hex.clone())
        );
        assert_eq!(layout_blob_hex(Path::new("blobs/sha256/../../etc")), None);
        assert_eq!(layout_blob_hex(Path::new("blobs/sha512/aa")), None);
        assert!(is_index_json(Path::new("./index.json")));
        assert!(!is_index_json(Path::new("x/index.json")));
    }

    #[test]
    fn the_store_keeps_only_verified_blobs() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::new(&t.path().join("blobs")).unwrap();
        let good = b"layer bytes";
        let b = Blob {
            digest: oci::sha256_digest(good),
            size: good.len() as u64,
            media_type: oci::MT_OCI_LAYER_GZIP.into(),
        };
        let p = s.put("src", "layer 1/1", &b, &mut &good[..]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), good);
        std::fs::remove_file(&p).unwrap();
        let e = s
            .put("src", "layer 1/1", &b, &mut &b"layer bytez"[..])
            .unwrap_err();
        assert!(matches!(e, UpgradeError::DigestMismatch { .. }), "{e}");
        assert!(
            std::fs::read_dir(t.path().join("blobs"))
                .unwrap()
                .next()
                .is_none()
        );
    }
}
