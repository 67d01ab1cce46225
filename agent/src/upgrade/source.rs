//! Upgrade and install sources (SPEC §5): `oci:REF`, `docker:REF`, a bare reference (OCI),
//! `dir:PATH`, `file:PATH` and `ocifile:PATH`, parsed into a typed [`Source`] with image
//! references normalised the way registries expect (docker.io, `library/`, `:latest`).

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An image in a registry.
    Oci(ImageRef),
    /// A directory tree to copy (`dir:/` is "the running system", as the upgrade controller uses).
    Dir(PathBuf),
    /// A raw filesystem image to copy as is.
    File(PathBuf),
    /// An OCI image archive (`oci-archive` tar or an OCI layout directory), for air-gapped nodes.
    OciFile(PathBuf),
}

/// A normalised registry reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// `sha256:<64 hex>`; when given, the pulled manifest must have this digest.
    pub digest: Option<String>,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repository, self.tag)?;
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    #[error("source {0:?} is empty")]
    Empty(String),
    #[error(
        "source {given:?}: unknown scheme {scheme:?} (expected oci:, docker:, dir:, file:, ocifile: or a bare image reference)"
    )]
    Scheme { given: String, scheme: String },
    #[error("source {given:?}: {what}")]
    Reference { given: String, what: String },
    #[error("source {0:?}: the path must be absolute")]
    RelativePath(String),
}

pub const DEFAULT_REGISTRY: &str = "docker.io";

/// Parses `--source` or `upgrade.system.source`.
pub fn parse(s: &str) -> Result<Source, SourceError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SourceError::Empty(s.into()));
    }
    // Only the known schemes are schemes: `localhost:5000/x` and `name:tag` are references.
    let known = ["oci", "docker", "dir", "file", "ocifile"];
    let (scheme, rest) = match t.split_once(':') {
        Some((scheme, rest)) if known.contains(&scheme) => (Some(scheme), rest),
        Some((scheme, rest)) if rest.starts_with("//") => (Some(scheme), rest),
        _ => (None, t),
    };
    let path = |p: &str| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(SourceError::RelativePath(s.into()))
        }
    };
    match scheme {
        None => Ok(Source::Oci(parse_ref(s, rest)?)),
        Some("oci" | "docker") => Ok(Source::Oci(parse_ref(s, rest)?)),
        Some("dir") => path(rest).map(Source::Dir),
        Some("file") => path(rest).map(Source::File),
        Some("ocifile") => path(rest).map(Source::OciFile),
        Some(other) => Err(SourceError::Scheme {
            given: s.into(),
            scheme: other.into(),
        }),
    }
}

fn bad(source: &str, what: impl Into<String>) -> SourceError {
    SourceError::Reference {
        given: source.into(),
        what: what.into(),
    }
}

/// `[registry/]repository[:tag][@sha256:hex]`, as the distribution spec defines them.
pub fn parse_ref(source: &str, r: &str) -> Result<ImageRef, SourceError> {
    if r.is_empty() {
        return Err(bad(source, "no image reference"));
    }
    let (name_tag, digest) = match r.split_once('@') {
        Some((n, d)) => {
            let hex = d
                .strip_prefix("sha256:")
                .ok_or_else(|| bad(source, format!("digest {d:?} is not sha256:<hex>")))?;
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(bad(
                    source,
                    format!("digest {d:?} is not 64 lower-case hex digits"),
                ));
            }
            (n, Some(d.to_string()))
        }
        None => (r, None),
    };
    // The tag is after the last ':' that follows the last '/', so a registry port stays.
    let slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[slash..].rfind(':') {
        Some(i) => (&name_tag[..slash + i], Some(&name_tag[slash + i + 1..])),
        None => (name_tag, None),
    };
    let tag = tag.unwrap_or("latest");
    if tag.is_empty()
        || tag.len() > 128
        || !tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        || !tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(bad(source, format!("tag {tag:?} is not valid")));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    let registry = if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost")
    {
        parts.remove(0).to_string()
    } else {
        DEFAULT_REGISTRY.to_string()
    };
    for p in &parts {
        let ok = !p.is_empty()
            && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if !ok {
            return Err(bad(
                source,
                format!("repository component {p:?} must be lower-case letters, digits and . _ -"),
            ));
        }
    }
    let mut repository = parts.join("/");
    if registry == DEFAULT_REGISTRY && parts.len() == 1 {
        repository = format!("library/{repository}");
    }
    Ok(ImageRef {
        registry,
        repository,
        tag: tag.to_string(),
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oci(s: &str) -> ImageRef {
        match parse(s) {
            Ok(Source::Oci(r)) => r,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn references_are_normalised() {
        assert_eq!(oci("alpine").to_string(), "docker.io/library/alpine:latest");
        assert_eq!(
            oci("oci:alpine:3.20").to_string(),
            "docker.io/library/alpine:3.20"
        );
        assert_eq!(
            oci("docker:quay.io/kairos/ubuntu:24.04-core").to_string(),
            "quay.io/kairos/ubuntu:24.04-core"
        );
        let r = oci("localhost:5000/kairos/os");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_str()),
            ("localhost:5000", "kairos/os", "latest")
        );
        let r = oci("oci:127.0.0.1:5000/os:v2");
        assert_eq!(r.to_string(), "127.0.0.1:5000/os:v2");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = oci(&format!("registry.local/os:v1@{d}"));
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
    }

    #[test]
    fn paths_and_schemes() {
        assert_eq!(parse("dir:/").unwrap(), Source::Dir("/".into()));
        assert_eq!(
            parse("file:/x/active.img").unwrap(),
            Source::File("/x/active.img".into())
        );
        assert_eq!(
            parse("ocifile:/a/b.tar").unwrap(),
            Source::OciFile("/a/b.tar".into())
        );
        assert_eq!(
            parse("dir:relative"),
            Err(SourceError::RelativePath("dir:relative".into()))
        );
        assert!(matches!(
            parse("ftp://x/y"),
            Err(SourceError::Scheme { .. })
        ));
        assert!(matches!(parse("  "), Err(SourceError::Empty(_))));
    }

    #[test]
    fn bad_references_name_the_problem() {
        for (s, what) in [
            ("oci:Upper/case", "repository component"),
            ("oci:os:", "tag"),
            ("oci:os:-bad", "tag"),
            ("oci:os@sha256:abc", "64 lower-case hex"),
            ("oci:os@md5:abc", "sha256"),
            ("oci:a//b", "repository component"),
            ("oci:", "no image reference"),
        ] {
            let e = parse(s).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains(s), "{s}: {e}");
        }
    }
}
