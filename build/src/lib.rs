//! `kairos-build`: the host-side artifact builder. It reuses the project's code: the
//! initramfs writer (`kairos-initramfs`), the agent's sources, layers and installer phases
//! (`kairos_agent::install`), the boot model of `kairos-init`.

pub mod checks;
pub mod cli;
pub mod image;
pub mod initramfs;
pub mod iso;
pub mod oci;
pub mod raw;

use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};

pub use kairos_agent::install::efi::find_tool;

/// A program kairos-build puts into images (kairos-init, kairos-agent) that it cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("{flag} {err}")]
    Unreadable { flag: &'static str, err: IoError },
    #[error("{flag} {}: not a regular file", path.display())]
    NotAFile { flag: &'static str, path: PathBuf },
    #[error(
        "{name} not found: not given with {flag}, not next to {exe_dir}, not in PATH (build it with `cargo build --release -p {name}`)"
    )]
    NotFound {
        name: &'static str,
        flag: &'static str,
        exe_dir: String,
    },
}

/// Program `name`: `explicit` (given with `flag`) when there is one, else next to the running
/// program (how releases ship them together), else the first in PATH.
pub fn find_program(
    name: &'static str,
    flag: &'static str,
    explicit: Option<&Path>,
) -> Result<PathBuf, ProgramError> {
    if let Some(p) = explicit {
        return match std::fs::metadata(p) {
            Ok(m) if m.is_file() => Ok(p.to_path_buf()),
            Ok(_) => Err(ProgramError::NotAFile {
                flag,
                path: p.to_path_buf(),
            }),
            Err(err) => Err(ProgramError::Unreadable {
                flag,
                err: IoError::new(p, "cannot read it", err),
            }),
        };
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let path = std::env::var_os("PATH").unwrap_or_default();
    exe_dir
        .iter()
        .cloned()
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ProgramError::NotFound {
            name,
            flag,
            exe_dir: exe_dir.map_or_else(|| "this program".into(), |d| d.display().to_string()),
        })
}

#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    /// In the parent directory: "{parent}: creating the work directory: {err}".
    #[error(transparent)]
    Create(IoError),
}

/// A work directory (under `--work-dir`, else /var/tmp, which is on disk where /tmp may be a
/// small tmpfs), removed on drop — unless something is still mounted inside it: removing
/// then would reach through a bind mount into the user's source tree.
pub struct WorkDir(Option<tempfile::TempDir>);

impl WorkDir {
    pub fn new(parent: Option<&Path>, what: &str) -> Result<WorkDir, WorkError> {
        let parent = parent.unwrap_or(Path::new("/var/tmp"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("kairos-build-{what}-"))
            .tempdir_in(parent)
            .at(parent, "creating the work directory")
            .map_err(WorkError::Create)?;
        Ok(WorkDir(Some(dir)))
    }

    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        // An unreadable table (no /proc) counts as nothing mounted, as before.
        let busy = kairos_init::mountinfo::read()
            .unwrap_or_default()
            .into_iter()
            .map(|m| PathBuf::from(m.mountpoint))
            .find(|m| m.starts_with(dir.path()));
        if let Some(m) = busy {
            eprintln!(
                "kairos-build: warning: {} is still mounted; leaving {} in place",
                m.display(),
                dir.path().display()
            );
            let _ = dir.keep();
        }
    }
}
