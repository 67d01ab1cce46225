//! The checks that write nothing which `kairos-build raw` and `kairos-build iso` both make
//! before building: `--config` readable, `--out` writable where it points, the source resolved
//! (an OCI image pulled and unpacked into the work directory) with a root tree holding the
//! kernel and initramfs.

use std::io::Write;
use std::path::{Path, PathBuf};

use kairos_agent::Ctx;
use kairos_agent::install::{InstallError, SourceImage};
use kairos_agent::upgrade::image::{KERNEL_FILES, tree_file};
use kairos_util::{IoError, IoResultExt};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// "--config PATH: cannot read it: ERR; nothing was written".
    #[error("--config {0}; nothing was written")]
    Config(IoError),
    #[error(
        "{origin}: the image has no {what}; make it Kairos-ready with `kairos-build image` first; nothing was written"
    )]
    NotReady { origin: String, what: String },
    #[error("--out {}: {what}; nothing was written", path.display())]
    Out { path: PathBuf, what: String },
}

/// The `--config` file's bytes, when one is given.
pub fn read_config(config: Option<&Path>) -> Result<Option<Vec<u8>>, CheckError> {
    config
        .map(|c| {
            std::fs::read(c)
                .at(c, "cannot read it")
                .map_err(CheckError::Config)
        })
        .transpose()
}

/// `out` can be written: its directory exists and it is not a directory itself.
pub fn check_out(out: &Path) -> Result<(), CheckError> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(CheckError::Out {
            path: out.to_path_buf(),
            what: format!("{} is not a directory", dir.display()),
        });
    }
    if out.is_dir() {
        return Err(CheckError::Out {
            path: out.to_path_buf(),
            what: "is a directory".into(),
        });
    }
    Ok(())
}

/// A source ready to build from.
pub struct Ready {
    pub src: SourceImage,
    pub tree: PathBuf,
    /// [`KERNEL_FILES`], in that order, where they are in `tree` (symlinks resolved).
    pub kernel_files: Vec<PathBuf>,
}

/// `source` resolved (a remote image pulled and unpacked into `work`), its root tree, and the
/// files an upgrade requires too ([`KERNEL_FILES`]) found in it (symlinks followed inside the
/// tree: `tree_file`); `boots` says in the error what boots them.
pub fn ready_source<E>(
    ctx: &Ctx,
    source: &str,
    work: &Path,
    boots: &str,
    log: &mut dyn Write,
) -> Result<Ready, E>
where
    E: From<CheckError> + From<InstallError>,
{
    let mut src = SourceImage::resolve(ctx, source, work, log)?;
    if src.is_remote() {
        writeln!(log, "kairos-build: pulling {}", src.origin).ok();
        src.unpack_into(work, log)?;
    }
    let tree = src
        .tree()
        .map(Path::to_path_buf)
        .ok_or_else(|| CheckError::NotReady {
            origin: src.origin.clone(),
            what: "root tree".into(),
        })?;
    let mut kernel_files = Vec::new();
    for need in KERNEL_FILES {
        let p = tree_file(&tree, need).ok_or_else(|| CheckError::NotReady {
            origin: src.origin.clone(),
            what: format!("/{need} (the kernel and initramfs {boots})"),
        })?;
        kernel_files.push(p);
    }
    Ok(Ready {
        src,
        tree,
        kernel_files,
    })
}
