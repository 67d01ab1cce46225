//! The pure half of reading an OCI image, shared by the registry, the `ocifile:` archive and
//! the OCI layout directory: blob descriptors, sha256 verification of bytes and streams (digest
//! *and* size), telling an index from a manifest, picking this machine's platform from an
//! index, and the size estimate SPEC §5 gives for an image before it is unpacked.

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

use super::UpgradeError;

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// What a registry is asked for when pulling by tag or digest.
pub const ACCEPTED_MANIFESTS: &[&str] = &[
    MT_OCI_MANIFEST,
    MT_OCI_INDEX,
    MT_DOCKER_MANIFEST,
    MT_DOCKER_LIST,
];

/// Manifests, indexes and configs are small; anything larger is refused before it is read.
pub const MAX_DOCUMENT_BYTES: u64 = 8 << 20;

/// How deep an index may point at further indexes.
const MAX_INDEX_DEPTH: usize = 4;

const MIB: u64 = 1 << 20;

/// A content descriptor reduced to what is checked: `sha256:<64 hex>`, the size in bytes and
/// the media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

impl Blob {
    /// The 64 hex digits (validated when the blob was made).
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

/// `sha256:` followed by 64 lower-case hex digits; the hex part, or None.
pub fn sha256_hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn blob_of(origin: &str, what: &str, d: &Descriptor) -> Result<Blob, UpgradeError> {
    let digest = d.digest().to_string();
    if sha256_hex_of(&digest).is_none() {
        return Err(UpgradeError::Invalid {
            origin: origin.into(),
            what: format!("{what} has digest {digest:?}: only sha256 digests are supported"),
        });
    }
    Ok(Blob {
        digest,
        size: d.size(),
        media_type: d.media_type().to_string(),
    })
}

/// Checks a stream against its descriptor as it passes: more bytes than the descriptor says
/// fail at once (a registry cannot make the agent download forever), and [`Verifier::finish`]
/// compares the digest and the final size.
pub struct Verifier<'a> {
    origin: &'a str,
    what: &'a str,
    blob: &'a Blob,
    hasher: Sha256,
    seen: u64,
}

impl<'a> Verifier<'a> {
    pub fn new(origin: &'a str, what: &'a str, blob: &'a Blob) -> Self {
        Verifier {
            origin,
            what,
            blob,
            hasher: Sha256::new(),
            seen: 0,
        }
    }

    fn size_error(&self, actual: u64) -> UpgradeError {
        UpgradeError::SizeMismatch {
            origin: self.origin.into(),
            what: self.what.into(),
            digest: self.blob.digest.clone(),
            expected: self.blob.size,
            actual,
        }
    }

    pub fn update(&mut self, chunk: &[u8]) -> Result<(), UpgradeError> {
        self.seen = self.seen.saturating_add(chunk.len() as u64);
        if self.seen > self.blob.size {
            return Err(self.size_error(self.seen));
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// The digest of what was seen so far, without consuming the verifier.
    pub fn digest_so_far(&self) -> String {
        format!("sha256:{}", hex(&self.hasher.clone().finalize()))
    }

    /// Whether the bytes seen so far are the whole blob, byte for byte.
    pub fn complete_and_correct(&self) -> bool {
        self.seen == self.blob.size && self.digest_so_far() == self.blob.digest
    }

    pub fn finish(self) -> Result<(), UpgradeError> {
        let actual = self.digest_so_far();
        if actual != self.blob.digest {
            return Err(UpgradeError::DigestMismatch {
                origin: self.origin.into(),
                what: self.what.into(),
                digest: self.blob.digest.clone(),
                actual,
            });
        }
        if self.seen != self.blob.size {
            return Err(self.size_error(self.seen));
        }
        Ok(())
    }
}

/// Whole bytes checked against their descriptor.
pub fn verify_bytes(
    origin: &str,
    what: &str,
    blob: &Blob,
    bytes: &[u8],
) -> Result<(), UpgradeError> {
    let mut v = Verifier::new(origin, what, blob);
    v.update(bytes)?;
    v.finish()
}

/// What a manifest-like document turned out to be.
#[derive(Debug)]
pub enum Document {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
}

/// An index or a manifest, told apart by `mediaType` (OCI or Docker) or, without one, by its
/// `manifests` / `layers` keys.
pub fn parse_document(origin: &str, what: &str, bytes: &[u8]) -> Result<Document, UpgradeError> {
    let invalid = |why: String| UpgradeError::Invalid {
        origin: origin.into(),
        what: format!("{what}: {why}"),
    };
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("not a JSON object".into()))?;
    if obj.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
        return Err(invalid(format!(
            "schemaVersion {} is not 2 (Docker schema 1 manifests are not supported)",
            obj.get("schemaVersion").unwrap_or(&serde_json::Value::Null)
        )));
    }
    let media_type = obj.get("mediaType").and_then(|m| m.as_str());
    let is_index = match media_type {
        Some(MT_OCI_INDEX | MT_DOCKER_LIST) => true,
        Some(MT_OCI_MANIFEST | MT_DOCKER_MANIFEST) => false,
        Some(other) => return Err(invalid(format!("unsupported media type {other:?}"))),
        None => obj.contains_key("manifests"),
    };
    if is_index {
        serde_json::from_value(v)
            .map(|i| Document::Index(Box::new(i)))
            .map_err(|e| invalid(format!("not an image index: {e}")))
    } else {
        serde_json::from_value(v)
            .map(|m| Document::Manifest(Box::new(m)))
            .map_err(|e| invalid(format!("not an image manifest: {e}")))
    }
}

/// The GOARCH name of the machine the agent was built for.
pub fn this_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "riscv64" => "riscv64",
        other => other,
    }
}

fn is_manifest_type(mt: &str) -> bool {
    matches!(
        mt,
        MT_OCI_MANIFEST | MT_OCI_INDEX | MT_DOCKER_MANIFEST | MT_DOCKER_LIST
    )
}

/// The entry of an index to follow for `linux/<arch>`: the first with that platform;
/// without any platform information (an OCI layout written by skopeo or `docker save`) the
/// only manifest listed. Attestations (`unknown/unknown`) are never chosen.
pub fn select_platform<'a>(
    origin: &str,
    index: &'a ImageIndex,
    arch: &str,
) -> Result<&'a Descriptor, UpgradeError> {
    let candidates: Vec<&Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| is_manifest_type(d.media_type().as_ref()))
        .collect();
    let matching = candidates.iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| p.os().to_string() == "linux" && p.architecture().to_string() == arch)
    });
    if let Some(d) = matching {
        return Ok(d);
    }
    let without: Vec<&&Descriptor> = candidates
        .iter()
        .filter(|d| d.platform().is_none())
        .collect();
    if let [only] = without.as_slice() {
        return Ok(only);
    }
    let listed: Vec<String> = candidates
        .iter()
        .map(|d| match d.platform() {
            Some(p) => format!("{}/{}", p.os(), p.architecture()),
            None => "no platform".into(),
        })
        .collect();
    Err(UpgradeError::Invalid {
        origin: origin.into(),
        what: format!(
            "the image index has no linux/{arch} image (it lists: {})",
            if listed.is_empty() {
                "nothing".to_string()
            } else {
                listed.join(", ")
            }
        ),
    })
}

/// Layer media types the agent unpacks (tar, gzip, zstd; OCI or Docker names). Foreign,
/// non-distributable and encrypted layers are refused.
pub fn layer_type_ok(mt: &str) -> bool {
    let known = mt.starts_with("application/vnd.oci.image.layer.v1.tar")
        || mt.starts_with("application/vnd.docker.image.rootfs.diff.tar");
    known && !mt.contains("nondistributable") && !mt.contains("encrypted")
}

/// A resolved image: the manifest that was chosen (its digest), its config and layers, all
/// descriptors from verified documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub manifest_digest: String,
    pub config: Blob,
    pub layers: Vec<Blob>,
    /// `os/architecture` from the config.
    pub platform: String,
}

impl Resolved {
    /// Sum of the (compressed) layer sizes.
    pub fn compressed_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// Returns a blob's bytes (`what` names it in errors); [`resolve`] verifies them.
pub type FetchFn<'a> = dyn FnMut(&Blob, &str) -> Result<Vec<u8>, UpgradeError> + 'a;

/// Follows `top` (the document a tag names, or an OCI layout's `index.json`) down to one image
/// manifest and its config. `top_digest` is the digest of `top` when it is itself a manifest
/// (None for index.json, which is not content-addressed). `fetch` returns a blob's bytes,
/// which are verified here against the descriptor that named them.
pub fn resolve(
    origin: &str,
    top: &[u8],
    top_digest: Option<String>,
    arch: &str,
    fetch: &mut FetchFn<'_>,
) -> Result<Resolved, UpgradeError> {
    let mut doc = top.to_vec();
    let mut digest = top_digest;
    let mut what = if digest.is_some() {
        "manifest".to_string()
    } else {
        "index.json".to_string()
    };
    for _ in 0..MAX_INDEX_DEPTH {
        match parse_document(origin, &what, &doc)? {
            Document::Index(index) => {
                let d = select_platform(origin, &index, arch)?;
                let blob = blob_of(origin, "manifest", d)?;
                if blob.size > MAX_DOCUMENT_BYTES {
                    return Err(UpgradeError::Invalid {
                        origin: origin.into(),
                        what: format!("manifest {} is {} bytes", blob.digest, blob.size),
                    });
                }
                what = format!("manifest {}", blob.digest);
                doc = fetch(&blob, &what)?;
                verify_bytes(origin, "manifest", &blob, &doc)?;
                digest = Some(blob.digest);
            }
            Document::Manifest(m) => {
                let manifest_digest = digest.unwrap_or_else(|| sha256_digest(&doc));
                let config = blob_of(origin, "config", m.config())?;
                if config.size > MAX_DOCUMENT_BYTES {
                    return Err(UpgradeError::Invalid {
                        origin: origin.into(),
                        what: format!("config {} is {} bytes", config.digest, config.size),
                    });
                }
                let mut layers = Vec::with_capacity(m.layers().len());
                for (i, l) in m.layers().iter().enumerate() {
                    let b = blob_of(origin, &format!("layer {}", i + 1), l)?;
                    if !layer_type_ok(&b.media_type) {
                        return Err(UpgradeError::Invalid {
                            origin: origin.into(),
                            what: format!(
                                "layer {} has media type {:?}, which the agent does not unpack",
                                b.digest, b.media_type
                            ),
                        });
                    }
                    layers.push(b);
                }
                if layers.is_empty() {
                    return Err(UpgradeError::Invalid {
                        origin: origin.into(),
                        what: format!("manifest {manifest_digest} has no layers"),
                    });
                }
                let cfg_what = format!("config {}", config.digest);
                let cfg = fetch(&config, &cfg_what)?;
                verify_bytes(origin, "config", &config, &cfg)?;
                let platform = config_platform(origin, &cfg)?;
                return Ok(Resolved {
                    manifest_digest,
                    config,
                    layers,
                    platform,
                });
            }
        }
    }
    Err(UpgradeError::Invalid {
        origin: origin.into(),
        what: format!("image indexes nested more than {MAX_INDEX_DEPTH} deep"),
    })
}

/// `os/architecture` of an image config (JSON); an image for another OS is refused.
fn config_platform(origin: &str, cfg: &[u8]) -> Result<String, UpgradeError> {
    let v: serde_json::Value = serde_json::from_slice(cfg).map_err(|e| UpgradeError::Invalid {
        origin: origin.into(),
        what: format!("the image config is not JSON: {e}"),
    })?;
    let os = v.get("os").and_then(|s| s.as_str()).unwrap_or("linux");
    let arch = v
        .get("architecture")
        .and_then(|s| s.as_str())
        .unwrap_or("unknown");
    if os != "linux" {
        return Err(UpgradeError::Invalid {
            origin: origin.into(),
            what: format!("the image is for {os}/{arch}, not linux"),
        });
    }
    Ok(format!("{os}/{arch}"))
}

/// SPEC §5: upstream sizes an image from a registry at 2.5 × the compressed layers + 100 MiB.
/// Used before anything is downloaded; the image itself is sized from what was unpacked.
pub fn estimate_unpacked(compressed: u64) -> u64 {
    (compressed.saturating_mul(5) / 2).saturating_add(100 * MIB)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn blob(bytes: &[u8]) -> Blob {
        Blob {
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
            media_type: MT_OCI_LAYER_GZIP.into(),
        }
    }

    #[test]
    fn digests_and_sizes_are_checked() {
        let b = blob(b"hello");
        assert_eq!(
            b.digest,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        verify_bytes("src", "layer", &b, b"hello").unwrap();
        let e = verify_bytes("src", "layer", &b, b"hellO").unwrap_err();
        assert!(matches!(e, UpgradeError::DigestMismatch { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&b.digest) && msg.contains("src"), "{msg}");
        // Too long fails during the stream, before the hash is even looked at.
        let mut v = Verifier::new("src", "layer", &b);
        v.update(b"hel").unwrap();
        assert!(!v.complete_and_correct());
        let e = v.update(b"lo!").unwrap_err();
        assert!(
            matches!(e, UpgradeError::SizeMismatch { actual: 6, .. }),
            "{e}"
        );
        // Too short.
        let mut v = Verifier::new("src", "layer", &b);
        v.update(b"hell").unwrap();
        assert!(matches!(
            v.finish(),
            Err(UpgradeError::DigestMismatch { .. })
        ));
        assert!(sha256_hex_of(&b.digest).is_some());
        assert!(sha256_hex_of("sha256:ABC").is_none());
        assert!(sha256_hex_of("sha512:00").is_none());
        assert!(sha256_hex_of(&format!("sha256:{}", "A".repeat(64))).is_none());
    }

    fn desc(mt: &str, bytes: &[u8], platform: Option<(&str, &str)>) -> serde_json::Value {
        let mut d = serde_json::json!({
            "mediaType": mt, "digest": sha256_digest(bytes), "size": bytes.len(),
        });
        if let Some((os, arch)) = platform {
            d["platform"] = serde_json::json!({"os": os, "architecture": arch});
        }
        d
    }

    struct Image {
        manifest: Vec<u8>,
        blobs: HashMap<String, Vec<u8>>,
    }

    fn image(arch: &str, layers: &[&[u8]]) -> Image {
        let config = serde_json::to_vec(&serde_json::json!({
            "os": "linux", "architecture": arch, "rootfs": {"type": "layers", "diff_ids": []}
        }))
        .unwrap();
        let mut blobs = HashMap::new();
        blobs.insert(sha256_digest(&config), config.clone());
        let ls: Vec<_> = layers
            .iter()
            .map(|l| {
                blobs.insert(sha256_digest(l), l.to_vec());
                desc(MT_OCI_LAYER_GZIP, l, None)
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
            "config": desc(MT_OCI_CONFIG, &config, None), "layers": ls,
        }))
        .unwrap();
        blobs.insert(sha256_digest(&manifest), manifest.clone());
        Image { manifest, blobs }
    }

    fn fetcher(
        blobs: &HashMap<String, Vec<u8>>,
    ) -> impl FnMut(&Blob, &str) -> Result<Vec<u8>, UpgradeError> + '_ {
        move |b, _| Ok(blobs.get(&b.digest).cloned().unwrap_or_default())
    }

    #[test]
    fn a_manifest_resolves_to_its_layers() {
        let img = image("amd64", &[b"l1", b"l2"]);
        let r = resolve(
            "oci:x",
            &img.manifest,
            Some(sha256_digest(&img.manifest)),
            "amd64",
            &mut fetcher(&img.blobs),
        )
        .unwrap();
        assert_eq!(r.layers.len(), 2);
        assert_eq!(r.layers[0].digest, sha256_digest(b"l1"));
        assert_eq!(r.compressed_bytes(), 4);
        assert_eq!(r.platform, "linux/amd64");
        assert_eq!(r.manifest_digest, sha256_digest(&img.manifest));
    }

    #[test]
    fn an_index_picks_this_platform_and_verifies_the_manifest() {
        let amd = image("amd64", &[b"amd"]);
        let arm = image("arm64", &[b"arm"]);
        let mut blobs = amd.blobs.clone();
        blobs.extend(arm.blobs.clone());
        let attest = b"{}";
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MT_OCI_INDEX,
            "manifests": [
                desc(MT_OCI_MANIFEST, &arm.manifest, Some(("linux", "arm64"))),
                desc(MT_OCI_MANIFEST, attest, Some(("unknown", "unknown"))),
                desc(MT_OCI_MANIFEST, &amd.manifest, Some(("linux", "amd64"))),
            ],
        }))
        .unwrap();
        let r = resolve(
            "src",
            &index,
            Some(sha256_digest(&index)),
            "amd64",
            &mut fetcher(&blobs),
        )
        .unwrap();
        assert_eq!(r.manifest_digest, sha256_digest(&amd.manifest));
        assert_eq!(r.layers[0].digest, sha256_digest(b"amd"));
        let r = resolve("src", &index, None, "arm64", &mut fetcher(&blobs)).unwrap();
        assert_eq!(r.layers[0].digest, sha256_digest(b"arm"));
        let e = resolve("src", &index, None, "riscv64", &mut fetcher(&blobs)).unwrap_err();
        assert!(
            e.to_string().contains(
                "no linux/riscv64 image (it lists: linux/arm64, unknown/unknown, linux/amd64)"
            ),
            "{e}"
        );
        // A registry (or archive) handing out other bytes for the manifest is caught.
        let mut bad = blobs.clone();
        bad.insert(
            sha256_digest(&amd.manifest),
            b"{\"schemaVersion\":2}".to_vec(),
        );
        let e = resolve("src", &index, None, "amd64", &mut fetcher(&bad)).unwrap_err();
        assert!(
            matches!(&e, UpgradeError::DigestMismatch { digest, .. } if *digest == sha256_digest(&amd.manifest)),
            "{e}"
        );
    }

    #[test]
    fn a_layout_index_without_platforms_has_one_image() {
        let img = image("amd64", &[b"only"]);
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [desc(MT_OCI_MANIFEST, &img.manifest, None)],
        }))
        .unwrap();
        let r = resolve(
            "ocifile:/x.tar",
            &index,
            None,
            "amd64",
            &mut fetcher(&img.blobs),
        )
        .unwrap();
        assert_eq!(r.layers.len(), 1);
        let two = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [desc(MT_OCI_MANIFEST, &img.manifest, None), desc(MT_OCI_MANIFEST, b"x", None)],
        }))
        .unwrap();
        let e = resolve("src", &two, None, "amd64", &mut fetcher(&img.blobs)).unwrap_err();
        assert!(e.to_string().contains("no platform, no platform"), "{e}");
    }

    #[test]
    fn bad_documents_and_configs_and_layers_are_named() {
        let cases: &[(&[u8], &str)] = &[
            (b"nope", "not JSON"),
            (b"[]", "not a JSON object"),
            (b"{\"schemaVersion\":1}", "schemaVersion 1 is not 2"),
            (
                b"{\"schemaVersion\":2,\"mediaType\":\"text/plain\"}",
                "unsupported media type",
            ),
            (
                b"{\"schemaVersion\":2,\"layers\":[]}",
                "not an image manifest",
            ),
        ];
        for (doc, want) in cases {
            let e = resolve("src", doc, None, "amd64", &mut |_, _| Ok(Vec::new())).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        // A Windows image, a foreign layer.
        let config = br#"{"os":"windows","architecture":"amd64"}"#;
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "config": desc(MT_OCI_CONFIG, config, None),
            "layers": [desc(MT_OCI_LAYER_GZIP, b"l", None)],
        }))
        .unwrap();
        let e = resolve("src", &m, None, "amd64", &mut |_, _| Ok(config.to_vec())).unwrap_err();
        assert!(e.to_string().contains("windows/amd64, not linux"), "{e}");
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "config": desc(MT_OCI_CONFIG, config, None),
            "layers": [desc("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", b"l", None)],
        }))
        .unwrap();
        let e = resolve("src", &m, None, "amd64", &mut |_, _| Ok(config.to_vec())).unwrap_err();
        assert!(e.to_string().contains("does not unpack"), "{e}");
        assert!(layer_type_ok(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
        assert!(layer_type_ok("application/vnd.oci.image.layer.v1.tar+zstd"));
        assert!(!layer_type_ok(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        ));
    }

    #[test]
    fn the_estimate_follows_upstream() {
        assert_eq!(estimate_unpacked(0), 100 * MIB);
        assert_eq!(estimate_unpacked(2 * MIB), 105 * MIB);
        assert_eq!(estimate_unpacked(u64::MAX), u64::MAX / 2 + 100 * MIB);
        assert_eq!(this_arch(), "amd64");
    }
}
