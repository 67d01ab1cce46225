//! Bundles (upstream's `bundles:`, `install.bundles:` and `kairos-agent install-bundle`):
//! OCI images that add files or logic to an installed system without rebuilding its image.
//!
//! A target is `TYPE://REF`:
//! - `run://REF`: the image is unpacked into a work directory and its `run.sh` is run there
//!   (as upstream: working directory the unpacked image, `CONTAINERDIR` that directory,
//!   `BUNDLE_TARGET` the reference without its type); what it does is its own business.
//! - `container://REF` (also `docker://`): the image's files are put on the system.
//! - `package://REF` (also `luet://`): upstream installs a luet package from a luet
//!   repository; here the target is an OCI image whose files are put on the system like a
//!   container bundle (there is no luet: `repository` and `db_path` are not used).
//!
//! A target without a type is refused (upstream fails it too). REF is a registry reference, or
//! with `local_file: true` (or an absolute path, or `ocifile:PATH`) an image archive on this
//! machine (`docker save`, `skopeo copy … docker-archive:` or `oci-archive:`) or an OCI layout
//! directory; `dir:PATH` takes a directory as the image's content. Images come
//! through the upgrade's verified client (`upgrade::fetch`): every document and layer is
//! checked against its digest, registries follow `--allow-insecure-registries`, layers are
//! unpacked with `upgrade::layer`'s rules (no absolute names, no `..`, no symlinked parents).
//!
//! Files of container and package bundles must land in the persistent paths: /usr/local,
//! /oem and the persistent bind mounts kairos-init sets up (upstream's PERSISTENT_STATE_PATHS
//! and `install.bind_mounts`). Anything else would be written over the read-only image or
//! into a tmpfs and lost at the next boot; such a bundle is refused, naming the file, before
//! anything is written. Files are written with `safe_fs` (no symlink on the way followed
//! unless root's, each file replaced by a rename).
//!
//! When: `install.bundles` right after an install, into the new disk (as upstream, which
//! runs them with the disk's COS_PERSISTENT on /usr/local): container and package files go
//! straight to its COS_PERSISTENT (a `/var/lib/x` file into `.state/var-lib-x.bind`, where the
//! installed system's bind mount finds it) and COS_OEM; a run.sh runs in a mount namespace of
//! its own where those are mounted over this system's persistent paths, so what it writes to
//! /usr/local, /oem or /var/lib/extensions lands on the new disk. `bundles` on every boot of
//! an installed system, before K3s starts (the daemon). Each applied bundle's manifest digest
//! is recorded in /usr/local/.kairos/bundles: a bundle whose digest is recorded is not applied
//! again (a reboot does not re-run a `run.sh`); a changed digest (a moved tag) applies it
//! again. `fail_on_bundles_errors: true` makes a failed bundle fail the install or the daemon's
//! start; without it the failure is a warning.

pub mod dockerarchive;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kairos_util::{IoError, IoResultExt};
use sha2::{Digest as _, Sha256};

use crate::config::{self, Bundle};
use crate::safe_fs::{self, FsError};
use crate::upgrade::fetch::{self, Puller, Store};
use crate::upgrade::source::{self, Source, SourceError};
use crate::upgrade::{UpgradeError, layer, oci};
use crate::{Ctx, Outcome};

/// Applied bundles, one `DIGEST TARGET` line each (on COS_PERSISTENT).
pub const RECORD: &str = "/usr/local/.kairos/bundles";
/// Where images are unpacked (persistent: room for an image, unlike /tmp on a tmpfs).
pub const WORK: &str = "/usr/local/.kairos/bundle-work";
/// One bundle run at a time (the daemon's and `install-bundle`): the work directory and the
/// record are shared.
pub const LOCK: &str = "/run/kairos/bundles.lock";
/// How long a run waits for another one (pulling an image and a run.sh take a while).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);
/// The lines of a failed run.sh's output kept in the error.
const OUTPUT_LINES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Run,
    Container,
    Package,
}

impl Kind {
    fn files(self) -> bool {
        self != Kind::Run
    }
}

/// A parsed target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As written, type included: names the bundle in messages and in the record.
    pub given: String,
    pub kind: Kind,
    /// The part after `TYPE://` (upstream's BUNDLE_TARGET).
    pub reference: String,
    pub source: Source,
}

impl Target {
    /// A failed pull or unpack of this bundle's image.
    fn pull_error(&self, err: UpgradeError) -> BundleError {
        BundleError::Pull {
            target: self.given.clone(),
            err: Box::new(err),
        }
    }

    /// A file of this bundle that could not be read or written.
    fn io_error(&self, err: IoError) -> BundleError {
        BundleError::Io {
            target: self.given.clone(),
            err,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(
        "bundle {target:?}: no type: write run://, container:// (or docker://) or package:// (or luet://) before the image"
    )]
    NoScheme { target: String },
    #[error(
        "bundle {target:?}: unknown type {scheme:?} (expected run, container, docker, package or luet)"
    )]
    Scheme { target: String, scheme: String },
    #[error("bundle {target}: {err}")]
    Source { target: String, err: SourceError },
    #[error(
        "bundle {target}: a file: source is a filesystem image, not a bundle (use ocifile:PATH, dir:PATH or a registry reference)"
    )]
    FileSource { target: String },
    #[error("bundle {target}: {err}")]
    Pull {
        target: String,
        err: Box<UpgradeError>,
    },
    #[error(
        "bundle {target}: {path} would land outside the persistent paths ({allowed}){more}; nothing was installed"
    )]
    Outside {
        target: String,
        path: String,
        more: String,
        allowed: String,
    },
    #[error("bundle {target}: {path}: {what}; nothing was installed")]
    Unsupported {
        target: String,
        path: String,
        what: String,
    },
    #[error("bundle {target}: the image has no run.sh at its top (a run:// bundle needs one)")]
    NoRunScript { target: String },
    #[error("bundle {target}: run.sh failed ({status}){output}")]
    RunFailed {
        target: String,
        status: String,
        output: String,
    },
    #[error("bundle {target}: {err}")]
    Io { target: String, err: IoError },
    #[error("bundle {target}: {err}")]
    Fs { target: String, err: FsError },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Failed(Vec<BundleError>),
    #[error("writing the output: {0}")]
    Output(std::io::Error),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

/// `kairos-agent install-bundle`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallOptions {
    /// run://REF, container://REF (docker://) or package://REF (luet://); REF a registry
    /// reference, ocifile:PATH, dir:PATH, or with --local-file an image archive's path
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// The reference is an image archive (docker save, skopeo oci-archive) or OCI layout
    #[arg(long)]
    pub local_file: bool,
    /// Where a container or package bundle's files go (default /; each must land in a
    /// persistent path)
    #[arg(long, value_name = "DIR")]
    pub rootfs_path: Option<String>,
    /// Upstream's luet repository: not used (package:// targets are OCI images here)
    #[arg(long, value_name = "URL")]
    pub repository: Option<String>,
}

/// Parses `TYPE://REF` (upstream's scheme split, case-insensitive type).
pub fn parse_target(given: &str, local_file: bool) -> Result<Target, BundleError> {
    let t = given.trim();
    let Some((scheme, rest)) = t.split_once("://") else {
        return Err(BundleError::NoScheme {
            target: given.into(),
        });
    };
    let kind = match scheme.to_ascii_lowercase().as_str() {
        "run" => Kind::Run,
        "container" | "docker" => Kind::Container,
        "package" | "luet" => Kind::Package,
        other => {
            return Err(BundleError::Scheme {
                target: given.into(),
                scheme: other.into(),
            });
        }
    };
    let source = if local_file || rest.starts_with('/') {
        let p = PathBuf::from(rest);
        if !p.is_absolute() {
            return Err(BundleError::Source {
                target: t.into(),
                err: SourceError::RelativePath(rest.into()),
            });
        }
        Source::OciFile(p)
    } else {
        source::parse(rest).map_err(|err| BundleError::Source {
            target: t.into(),
            err,
        })?
    };
    if matches!(source, Source::File(_)) {
        return Err(BundleError::FileSource { target: t.into() });
    }
    Ok(Target {
        given: t.into(),
        kind,
        reference: rest.into(),
        source,
    })
}

// ---- where files land ----

/// Where a container or package bundle's files are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// The running system under this root: files go through its bind mounts.
    Running { root: PathBuf },
    /// A disk just installed: its COS_PERSISTENT and COS_OEM mounted at these directories.
    Installed { persistent: PathBuf, oem: PathBuf },
}

/// The persistent paths of an installed system: /usr/local, /oem, kairos-init's persistent
/// bind mounts and the config's `install.bind_mounts`; deepest first.
pub fn persistent_paths(extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = ["/usr/local", "/oem"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(
        kairos_init::layout::KAIROS_PERSISTENT_STATE_PATHS
            .iter()
            .map(|s| s.to_string()),
    );
    for e in extra {
        let e = format!("/{}", e.trim().trim_matches('/'));
        if e != "/" && !e.split('/').any(|c| c == "..") {
            v.push(e);
        }
    }
    v.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    v.dedup();
    v
}

/// [`persistent_paths`] of the running system under `ctx`: when its mount table is readable,
/// only those mounted (a path its layout does not bind-mount is a tmpfs or the read-only
/// image, and what a bundle put there would be gone at the next boot while recorded as
/// applied).
pub fn running_paths(ctx: &Ctx, extra: &[String]) -> Vec<String> {
    let mut paths = persistent_paths(extra);
    if let Ok(text) = fs::read_to_string(ctx.path("/proc/self/mountinfo")) {
        let mounts = kairos_init::mountinfo::parse(&text);
        paths.retain(|p| kairos_init::mountinfo::mounted_at(&mounts, p).is_some());
    }
    paths
}

/// Where the system path `abs` is written: (a directory, the path inside it). None when it is
/// in no persistent path.
pub fn place(dest: &Dest, paths: &[String], abs: &Path) -> Option<(PathBuf, PathBuf)> {
    let p = paths.iter().find(|p| abs.starts_with(p.as_str()))?;
    let below = abs.strip_prefix(p.as_str()).ok()?;
    Some(match dest {
        Dest::Running { root } => (root.clone(), abs.to_path_buf()),
        Dest::Installed { persistent, oem } => match p.as_str() {
            "/usr/local" => (persistent.clone(), Path::new("/").join(below)),
            "/oem" => (oem.clone(), Path::new("/").join(below)),
            _ => (
                persistent.clone(),
                Path::new("/.state")
                    .join(format!("{}.bind", kairos_init::layout::flatten(p)))
                    .join(below),
            ),
        },
    })
}

/// Whether `abs` is a directory above some persistent path (/, /etc, /var/lib): walked
/// through, never written.
fn above_persistent(paths: &[String], abs: &Path) -> bool {
    paths
        .iter()
        .any(|p| Path::new(p).starts_with(abs) && Path::new(p) != abs)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink(PathBuf),
}

/// One entry of a bundle's tree and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// In the unpacked tree.
    pub from: PathBuf,
    /// The system path it stands for.
    pub system: PathBuf,
    pub root: PathBuf,
    pub at: PathBuf,
    pub kind: EntryKind,
    pub mode: u32,
    pub owner: (u32, u32),
}

/// Every entry of `tree` (parents first) with its place, or the refusal naming the first
/// entry outside the persistent paths (and how many more there are). Writes nothing.
pub fn plan(
    target: &str,
    tree: &Path,
    rootfs: &Path,
    dest: &Dest,
    paths: &[String],
) -> Result<Vec<Planned>, BundleError> {
    let io = |err| BundleError::Io {
        target: target.into(),
        err,
    };
    if rootfs
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(BundleError::Unsupported {
            target: target.into(),
            path: rootfs.display().to_string(),
            what: "rootfs_path must not contain `..`".into(),
        });
    }
    let mut out = Vec::new();
    // Files first in the refusal: a directory outside is named only when it holds none.
    let mut outside: Vec<String> = Vec::new();
    let mut outside_dirs: Vec<String> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let from = tree.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&from)
            .at(&from, "listing")
            .map_err(io)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .at(&from, "listing")
            .map_err(io)?;
        names.sort();
        // Depth-first, parents before children, in name order.
        for name in names.into_iter().rev() {
            let rel = rel.join(&name);
            let from = tree.join(&rel);
            let meta = fs::symlink_metadata(&from).at(&from, "stat").map_err(io)?;
            let system = rootfs.join(&rel);
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                EntryKind::Dir
            } else if ft.is_file() {
                EntryKind::File
            } else if ft.is_symlink() {
                EntryKind::Symlink(
                    fs::read_link(&from)
                        .at(&from, "reading the link")
                        .map_err(io)?,
                )
            } else {
                return Err(BundleError::Unsupported {
                    target: target.into(),
                    path: system.display().to_string(),
                    what: "not a file, directory or symlink (devices and FIFOs are not installed)"
                        .into(),
                });
            };
            if kind == EntryKind::Dir {
                stack.push(rel.clone());
            }
            match place(dest, paths, &system) {
                Some((root, at)) => out.push(Planned {
                    from,
                    system,
                    root,
                    at,
                    kind,
                    mode: meta.mode() & 0o7777,
                    owner: (meta.uid(), meta.gid()),
                }),
                None if kind == EntryKind::Dir && above_persistent(paths, &system) => {}
                None if kind == EntryKind::Dir => outside_dirs.push(system.display().to_string()),
                None => outside.push(system.display().to_string()),
            }
        }
    }
    outside.append(&mut outside_dirs);
    if let Some(first) = outside.first() {
        return Err(BundleError::Outside {
            target: target.into(),
            path: first.clone(),
            more: match outside.len() {
                1 => String::new(),
                n => format!(" (and {} more entries outside)", n - 1),
            },
            allowed: allowed_text(paths),
        });
    }
    // A directory is listed before anything in it (the walk pushes it, then lists it).
    Ok(out)
}

/// The persistent paths for a refusal: the first few in name order and how many there are.
fn allowed_text(paths: &[String]) -> String {
    let mut v: Vec<&str> = paths.iter().map(String::as_str).collect();
    v.sort_unstable();
    // The two a bundle most often means first.
    v.sort_by_key(|p| match *p {
        "/usr/local" => 0,
        "/oem" => 1,
        _ => 2,
    });
    match v.len() {
        0 => "none are mounted".into(),
        n if n <= 6 => v.join(", "),
        n => format!("{}, ... {n} in all", v[..6].join(", ")),
    }
}

/// Writes the planned entries. Existing directories keep their mode and owner.
pub fn install_files(target: &str, planned: &[Planned]) -> Result<usize, BundleError> {
    let fs_err = |err| BundleError::Fs {
        target: target.into(),
        err,
    };
    let io = |err| BundleError::Io {
        target: target.into(),
        err,
    };
    for p in planned {
        let ids = Some((Some(p.owner.0), Some(p.owner.1)));
        match &p.kind {
            EntryKind::Dir => {
                if !safe_fs::is_dir(&p.root, &p.at) {
                    safe_fs::make_dir(&p.root, &p.at, p.mode, ids).map_err(fs_err)?;
                }
            }
            EntryKind::File => {
                let bytes = fs::read(&p.from).at(&p.from, "reading").map_err(io)?;
                safe_fs::write(&p.root, &p.at, &bytes, p.mode, ids).map_err(fs_err)?;
            }
            EntryKind::Symlink(to) => {
                let parent = p.at.parent().unwrap_or(Path::new("/"));
                // The walk to the parent refuses foreign symlinks on the way.
                if !safe_fs::is_dir(&p.root, parent) {
                    safe_fs::make_dir(&p.root, parent, 0o755, None).map_err(fs_err)?;
                }
                let link = p.root.join(p.at.strip_prefix("/").unwrap_or(&p.at));
                match fs::symlink_metadata(&link) {
                    Ok(m) if m.is_dir() => {
                        return Err(BundleError::Unsupported {
                            target: target.into(),
                            path: p.system.display().to_string(),
                            what: "a symlink in the bundle where the system has a directory".into(),
                        });
                    }
                    Ok(_) => fs::remove_file(&link)
                        .at(&link, "removing (replaced by the bundle's symlink)")
                        .map_err(io)?,
                    Err(_) => {}
                }
                std::os::unix::fs::symlink(to, &link)
                    .at(&link, "creating the symlink")
                    .map_err(io)?;
                let _ = std::os::unix::fs::lchown(&link, Some(p.owner.0), Some(p.owner.1));
            }
        }
    }
    Ok(planned.len())
}

// ---- fetching ----

/// What fetching found.
pub enum Fetched {
    /// The recorded digest is the image's: nothing was downloaded.
    Unchanged(String),
    /// Unpacked into this directory.
    Tree { tree: PathBuf, digest: String },
}

/// sha256 over a directory's entries (names, types, modes, contents): a `dir:` bundle's
/// "digest", so an unchanged directory is not applied again.
pub fn tree_digest(dir: &Path) -> Result<String, IoError> {
    let mut h = Sha256::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&here)
            .at(&here, "listing")?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .at(&here, "listing")?;
        names.sort();
        for name in names {
            let rel = rel.join(name);
            let p = dir.join(&rel);
            let m = fs::symlink_metadata(&p).at(&p, "stat")?;
            h.update(rel.as_os_str().as_encoded_bytes());
            h.update([0]);
            h.update(m.mode().to_le_bytes());
            if m.is_dir() {
                stack.push(rel);
            } else if m.file_type().is_symlink() {
                h.update(
                    fs::read_link(&p)
                        .at(&p, "reading the link")?
                        .as_os_str()
                        .as_encoded_bytes(),
                );
            } else if m.is_file() {
                h.update(fs::read(&p).at(&p, "reading")?);
            }
            h.update([0]);
        }
    }
    Ok(format!("sha256:{}", oci::hex(&h.finalize())))
}

/// Resolves the image (verified, nothing written); when its digest is `recorded`, stops
/// there; else downloads (verified) and unpacks it into `work/rootfs`.
pub fn fetch_tree(
    t: &Target,
    work: &Path,
    recorded: Option<&str>,
    log: &mut dyn Write,
) -> Result<Fetched, BundleError> {
    let (pull, io) = (|e| t.pull_error(e), |e| t.io_error(e));
    // The reference names the source in its errors, after the bundle's own name.
    let origin = t.reference.as_str();
    let mut puller = match &t.source {
        Source::Oci(r) => {
            Puller::Registry(Box::new(fetch::Registry::new(r, origin).map_err(pull)?))
        }
        Source::OciFile(p) if p.is_dir() => Puller::Layout(fetch::Layout::new(p, origin)),
        Source::OciFile(p) => {
            if !p.exists() {
                return Err(pull(UpgradeError::NotFound {
                    origin: origin.into(),
                    path: p.clone(),
                }));
            }
            if dockerarchive::is_docker_archive(p).map_err(io)? {
                return fetch_docker_archive(t, p, work, recorded, log);
            }
            Puller::Archive(fetch::Archive::new(p, origin))
        }
        Source::Dir(p) => {
            if !p.is_dir() {
                return Err(pull(UpgradeError::NotFound {
                    origin: origin.into(),
                    path: p.clone(),
                }));
            }
            let digest = tree_digest(p).map_err(io)?;
            if recorded == Some(digest.as_str()) {
                return Ok(Fetched::Unchanged(digest));
            }
            let tree = fresh(work).map_err(io)?.join("rootfs");
            fs::create_dir_all(&tree)
                .at(&tree, "creating")
                .map_err(io)?;
            // cp -a keeps modes, owners and symlinks as they are; run.sh may write next to
            // itself, never into the given directory.
            kairos_util::run_tool(
                Command::new("cp")
                    .arg("-a")
                    .arg("--")
                    .arg(p.join("."))
                    .arg(&tree),
            )
            .map_err(|e| pull(e.into()))?;
            return Ok(Fetched::Tree { tree, digest });
        }
        Source::File(_) => {
            return Err(BundleError::FileSource {
                target: t.given.clone(),
            });
        }
    };
    let resolved = puller.resolve().map_err(pull)?;
    if recorded == Some(resolved.manifest_digest.as_str()) {
        return Ok(Fetched::Unchanged(resolved.manifest_digest));
    }
    let _ = writeln!(
        log,
        "kairos-agent: bundle {origin}: manifest {} ({}), {} layer(s), {} bytes",
        resolved.manifest_digest,
        resolved.platform,
        resolved.layers.len(),
        resolved.compressed_bytes()
    );
    let work = fresh(work).map_err(io)?;
    let store = Store::new(&work.join("blobs")).map_err(pull)?;
    let layers = puller.fetch_layers(&resolved, &store, log).map_err(pull)?;
    let tree = work.join("rootfs");
    fs::create_dir_all(&tree)
        .at(&tree, "creating")
        .map_err(io)?;
    for (blob, path) in resolved.layers.iter().zip(&layers) {
        let f = fs::File::open(path).at(path, "opening").map_err(io)?;
        layer::apply(&tree, &blob.digest, f).map_err(|e| pull(e.into()))?;
        if puller.copies_layers() {
            fs::remove_file(path).at(path, "removing").map_err(io)?;
        }
    }
    Ok(Fetched::Tree {
        tree,
        digest: resolved.manifest_digest,
    })
}

/// [`fetch_tree`] for a `docker save` archive (see dockerarchive.rs).
fn fetch_docker_archive(
    t: &Target,
    p: &Path,
    work: &Path,
    recorded: Option<&str>,
    log: &mut dyn Write,
) -> Result<Fetched, BundleError> {
    let (pull, io) = (|e| t.pull_error(e), |e| t.io_error(e));
    let r = dockerarchive::resolve(p, &t.reference).map_err(pull)?;
    if recorded == Some(r.digest.as_str()) {
        return Ok(Fetched::Unchanged(r.digest));
    }
    let work = fresh(work).map_err(io)?;
    let blobs = work.join("blobs");
    fs::create_dir_all(&blobs)
        .at(&blobs, "creating")
        .map_err(io)?;
    let layers = dockerarchive::extract_layers(p, &t.reference, &r, &blobs, log).map_err(pull)?;
    let tree = work.join("rootfs");
    fs::create_dir_all(&tree)
        .at(&tree, "creating")
        .map_err(io)?;
    for (path, id) in layers.iter().zip(&r.diff_ids) {
        let f = fs::File::open(path).at(path, "opening").map_err(io)?;
        layer::apply(&tree, id, f).map_err(|e| pull(e.into()))?;
    }
    Ok(Fetched::Tree {
        tree,
        digest: r.digest,
    })
}

/// `work`, emptied (a leftover from an interrupted run is removed).
fn fresh(work: &Path) -> Result<PathBuf, IoError> {
    if work.exists() {
        fs::remove_dir_all(work).at(work, "removing the old work directory")?;
    }
    fs::create_dir_all(work).at(work, "creating")?;
    Ok(work.to_path_buf())
}

// ---- run.sh ----

/// Runs `tree/run.sh` in `tree` with upstream's environment; its output goes to `log`.
/// With `binds` (source, mount point), run.sh runs in a mount namespace of its own where each
/// source is bind-mounted on its mount point (the install's: the new disk's COS_PERSISTENT on
/// /usr/local and its bind directories on the persistent paths); nothing leaks out of it.
pub fn run_script(
    t: &Target,
    tree: &Path,
    binds: &[(PathBuf, PathBuf)],
    log: &mut dyn Write,
) -> Result<(), BundleError> {
    let script = tree.join("run.sh");
    match fs::symlink_metadata(&script) {
        Ok(m) if m.is_file() => {}
        _ => {
            return Err(BundleError::NoRunScript {
                target: t.given.clone(),
            });
        }
    }
    fs::set_permissions(&script, fs::Permissions::from_mode(0o700))
        .at(&script, "chmod")
        .map_err(|err| BundleError::Io {
            target: t.given.clone(),
            err,
        })?;
    let mut cmd = Command::new("./run.sh");
    cmd.current_dir(tree)
        .env("CONTAINERDIR", tree)
        .env("BUNDLE_TARGET", &t.reference)
        .stdin(Stdio::null());
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", crate::DEFAULT_PATH);
    }
    if !binds.is_empty() {
        namespaced(&mut cmd, binds).map_err(|err| BundleError::Io {
            target: t.given.clone(),
            err,
        })?;
    }
    let _ = writeln!(log, "kairos-agent: bundle {}: running run.sh", t.given);
    let out = crate::spawn_retrying(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))
        .and_then(|c| c.wait_with_output())
        .at(&script, "running")
        .map_err(|err| BundleError::Io {
            target: t.given.clone(),
            err,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines() {
        let _ = writeln!(log, "kairos-agent: bundle {}: run.sh: {line}", t.given);
    }
    if out.status.success() {
        return Ok(());
    }
    use std::os::unix::process::ExitStatusExt;
    let status = match (out.status.code(), out.status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => out.status.to_string(),
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(OUTPUT_LINES)..].join("\n");
    Err(BundleError::RunFailed {
        target: t.given.clone(),
        status,
        output: if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        },
    })
}

/// Makes `cmd` start in a private mount namespace with `binds` mounted.
fn namespaced(cmd: &mut Command, binds: &[(PathBuf, PathBuf)]) -> Result<(), IoError> {
    kairos_init::sys::confine::confine(cmd, binds, None).map_err(|e| {
        IoError::new(
            &e.0,
            "bind-mounting for run.sh",
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })
}

/// run.sh's mounts at install (upstream runs install bundles with the new disk's
/// COS_PERSISTENT on /usr/local and COS_OEM on /oem): those two, and each persistent path
/// that exists on this system onto its bind directory on the new disk (created), shallow
/// first. The bind directories are where the installed system's kairos-init finds them.
/// `on_system`: where each of `paths` is on this system.
pub fn install_binds(
    persistent: &Path,
    oem: &Path,
    paths: &[String],
    on_system: &[String],
) -> Result<Vec<(PathBuf, PathBuf)>, IoError> {
    let mut v: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut by_depth: Vec<(&String, &String)> = paths.iter().zip(on_system).collect();
    by_depth.sort_by_key(|(p, _)| (p.matches('/').count(), p.as_str()));
    for (p, here) in by_depth {
        let dst = PathBuf::from(here);
        if !dst.is_dir() {
            continue;
        }
        let src = match p.as_str() {
            "/usr/local" => persistent.to_path_buf(),
            "/oem" => oem.to_path_buf(),
            _ => {
                let d = persistent
                    .join(".state")
                    .join(format!("{}.bind", kairos_init::layout::flatten(p)));
                fs::create_dir_all(&d).at(&d, "creating")?;
                d
            }
        };
        v.push((src, dst));
    }
    Ok(v)
}

// ---- the record ----

/// The applied bundles: target → manifest digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub applied: BTreeMap<String, String>,
}

impl Record {
    pub fn parse(text: &str) -> Record {
        let applied = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .map(|(d, t)| (t.trim().to_string(), d.to_string()))
            .collect();
        Record { applied }
    }

    pub fn text(&self) -> String {
        let mut s = String::from(
            "# kairos-agent: bundles applied (manifest digest, target); delete a line to apply \
             that bundle again at the next boot\n",
        );
        for (t, d) in &self.applied {
            s.push_str(&format!("{d} {t}\n"));
        }
        s
    }

    /// The record file `path` under `root`; empty when missing.
    pub fn read(root: &Path, path: &Path) -> Result<Record, FsError> {
        let bytes = safe_fs::read(root, path, 1 << 20)?.unwrap_or_default();
        Ok(Record::parse(&String::from_utf8_lossy(&bytes)))
    }

    pub fn write(&self, root: &Path, path: &Path) -> Result<(), FsError> {
        safe_fs::write(root, path, self.text().as_bytes(), 0o600, None)
    }
}

// ---- applying ----

/// Where one run applies bundles.
pub struct Applier {
    pub dest: Dest,
    pub paths: Vec<String>,
    /// The record file: (directory, path inside it).
    pub record: (PathBuf, PathBuf),
    pub work: PathBuf,
    /// Apply even when the recorded digest is the image's (install-bundle).
    pub force: bool,
    /// run.sh's mounts (see [`run_script`]); empty: it runs in this system as it is.
    pub binds: Vec<(PathBuf, PathBuf)>,
}

/// How one bundle went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Applied { digest: String, files: usize },
    Unchanged(String),
}

impl Applier {
    /// Applies one target; the record is updated when it was applied.
    pub fn apply(
        &self,
        t: &Target,
        rootfs_path: Option<&str>,
        log: &mut dyn Write,
    ) -> Result<Done, BundleError> {
        let fs_err = |err| BundleError::Fs {
            target: t.given.clone(),
            err,
        };
        let mut record = Record::read(&self.record.0, &self.record.1).map_err(fs_err)?;
        let recorded = (!self.force)
            .then(|| record.applied.get(&t.given).map(String::as_str))
            .flatten();
        let fetched = match (fetch_tree(t, &self.work, recorded, log), recorded) {
            // Applied before and the source unreachable now (a registry down at boot): what
            // was applied stays, the check is for the next run.
            (Err(e @ BundleError::Pull { .. }), Some(d)) => {
                let _ = writeln!(
                    log,
                    "kairos-agent: warning: {e}; {d} was applied before, kept (checked again on the next boot)"
                );
                Ok(Fetched::Unchanged(d.to_owned()))
            }
            (r, _) => r,
        };
        let result = fetched.and_then(|f| match f {
            Fetched::Unchanged(d) => Ok(Done::Unchanged(d)),
            Fetched::Tree { tree, digest } => {
                let files = if t.kind.files() {
                    let rootfs = Path::new("/").join(rootfs_path.unwrap_or("/"));
                    let planned = plan(&t.given, &tree, &rootfs, &self.dest, &self.paths)?;
                    install_files(&t.given, &planned)?
                } else {
                    run_script(t, &tree, &self.binds, log)?;
                    0
                };
                Ok(Done::Applied { digest, files })
            }
        });
        // Whatever happened, the unpacked image goes.
        let _ = fs::remove_dir_all(&self.work);
        let done = result?;
        if let Done::Applied { digest, .. } = &done {
            record.applied.insert(t.given.clone(), digest.clone());
            record
                .write(&self.record.0, &self.record.1)
                .map_err(fs_err)?;
        }
        Ok(done)
    }

    /// Applies every target of `bundles`; each failure is said on `log` and returned.
    pub fn apply_all(&self, bundles: &[Bundle], log: &mut dyn Write) -> Vec<BundleError> {
        let mut errors = Vec::new();
        for b in bundles {
            for given in &b.targets {
                let r = parse_target(given, b.local_file)
                    .and_then(|t| self.apply(&t, b.rootfs_path.as_deref(), log));
                match r {
                    Ok(done) => say(log, given, &done),
                    Err(e) => {
                        let _ = writeln!(log, "kairos-agent: error: {e}");
                        errors.push(e);
                    }
                }
            }
        }
        errors
    }
}

fn say(log: &mut dyn Write, given: &str, done: &Done) {
    let _ = match done {
        Done::Applied { digest, files } if *files > 0 => writeln!(
            log,
            "kairos-agent: bundle {given}: applied {digest} ({files} entries)"
        ),
        Done::Applied { digest, .. } => {
            writeln!(log, "kairos-agent: bundle {given}: applied {digest}")
        }
        Done::Unchanged(d) => writeln!(
            log,
            "kairos-agent: bundle {given}: {d} already applied; not applied again"
        ),
    };
}

/// The outcome of a batch: with `fail_on_bundles_errors`, its errors; else they were warnings.
fn finish(errors: Vec<BundleError>, fail: bool, log: &mut dyn Write) -> Result<(), BundleError> {
    if errors.is_empty() {
        return Ok(());
    }
    if fail {
        return Err(BundleError::Failed(errors));
    }
    let _ = writeln!(
        log,
        "kairos-agent: warning: {} bundle(s) failed; going on (fail_on_bundles_errors is not set)",
        errors.len()
    );
    Ok(())
}

/// The boot: `bundles` (and `install.bundles`' run:// ones, kept for the first boot) not yet
/// applied with their current digest, on an installed system (not live, recovery or reset).
pub fn at_boot(ctx: &Ctx, loaded: &config::Loaded, log: &mut dyn Write) -> Result<(), BundleError> {
    if matches!(ctx.mode(), Some("live" | "recovery" | "autoreset")) {
        return Ok(());
    }
    let c = &loaded.merged;
    if c.bundles.is_empty() {
        return Ok(());
    }
    let install = c.install.clone().unwrap_or_default();
    let _held = crate::lock::acquire(
        &ctx.path(LOCK),
        "kairos-agent daemon (bundles)",
        "one bundle run at a time",
        LOCK_WAIT,
    )?;
    let a = Applier {
        dest: Dest::Running {
            root: ctx.root.clone(),
        },
        paths: running_paths(ctx, &install.bind_mounts),
        record: (ctx.root.clone(), PathBuf::from(RECORD)),
        work: ctx.path(WORK),
        force: false,
        binds: Vec::new(),
    };
    let errors = a.apply_all(&c.bundles, log);
    finish(errors, c.fail_on_bundles_errors, log)
}

/// Right after an install: `install.bundles` of this node's config and of the install's
/// `--config` file, into the new disk's COS_PERSISTENT and COS_OEM (mounted at `persistent`
/// and `oem`), recorded there: container and package files placed directly, run.sh run with
/// those mounted over this system's persistent paths ([`install_binds`]).
pub fn after_install(
    loaded: &config::Loaded,
    config_file: Option<&Path>,
    persistent: &Path,
    oem: &Path,
    log: &mut dyn Write,
) -> Result<(), BundleError> {
    after_install_on(loaded, config_file, persistent, oem, Path::new("/"), log)
}

/// [`after_install`] with this system's persistent paths under `system` (tests).
pub fn after_install_on(
    loaded: &config::Loaded,
    config_file: Option<&Path>,
    persistent: &Path,
    oem: &Path,
    system: &Path,
    log: &mut dyn Write,
) -> Result<(), BundleError> {
    let mut install = loaded.merged.install.clone().unwrap_or_default();
    let mut fail = loaded.merged.fail_on_bundles_errors;
    if let Some(f) = config_file
        && let Ok(text) = fs::read_to_string(f)
        && let Ok(Some(s)) = config::parse(&f.display().to_string(), &text, false)
    {
        fail |= s.config.fail_on_bundles_errors;
        if let Some(i) = s.config.install {
            install.bundles.extend(i.bundles);
            install.bind_mounts.extend(i.bind_mounts);
        }
    }
    if install.bundles.is_empty() {
        return Ok(());
    }
    let paths = persistent_paths(&install.bind_mounts);
    let under: Vec<String> = paths
        .iter()
        .map(|p| system.join(p.trim_start_matches('/')).display().to_string())
        .collect();
    let binds = install_binds(persistent, oem, &paths, &under).map_err(|err| BundleError::Io {
        target: "install.bundles".into(),
        err,
    })?;
    let a = Applier {
        dest: Dest::Installed {
            persistent: persistent.to_path_buf(),
            oem: oem.to_path_buf(),
        },
        paths,
        record: (
            persistent.to_path_buf(),
            Path::new("/").join(RECORD.strip_prefix("/usr/local/").unwrap_or(RECORD)),
        ),
        work: persistent.join(WORK.strip_prefix("/usr/local/").unwrap_or(WORK)),
        force: false,
        binds,
    };
    let errors = a.apply_all(&install.bundles, log);
    finish(errors, fail, log)
}

/// `kairos-agent install-bundle TARGET`: applied now on this system (under `--root`), even
/// when recorded already; the record is updated.
pub fn install_bundle(
    ctx: &Ctx,
    opts: &InstallOptions,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<Outcome, BundleError> {
    if opts.repository.is_some() {
        writeln!(
            log,
            "kairos-agent: warning: --repository is luet's and not used (package:// targets \
             are OCI images here)"
        )
        .map_err(BundleError::Output)?;
    }
    let t = parse_target(&opts.target, opts.local_file)?;
    let _held = crate::lock::acquire(
        &ctx.path(LOCK),
        &crate::lock::this_command(),
        "one bundle run at a time",
        LOCK_WAIT,
    )?;
    let loaded = crate::sources::load(ctx, &config::LoadOptions::default());
    let binds = loaded
        .merged
        .install
        .map(|i| i.bind_mounts)
        .unwrap_or_default();
    let a = Applier {
        dest: Dest::Running {
            root: ctx.root.clone(),
        },
        paths: running_paths(ctx, &binds),
        record: (ctx.root.clone(), PathBuf::from(RECORD)),
        work: ctx.path(WORK),
        force: true,
        binds: Vec::new(),
    };
    let done = a.apply(&t, opts.rootfs_path.as_deref(), log)?;
    say(out, &t.given, &done);
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests;
