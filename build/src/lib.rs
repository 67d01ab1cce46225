//! `kairos-build`: the host-side artifact builder. It reuses the project's code: the
//! initramfs writer (`kairos-initramfs`), the agent's sources, layers and installer phases
//! (`kairos_agent::install`), the boot model of `kairos-init`.

pub mod cli;
pub mod image;
pub mod initramfs;
pub mod oci;
pub mod raw;

use std::path::{Path, PathBuf};

pub use kairos_agent::install::efi::find_tool;

#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error("{}: creating the work directory: {err}", dir.display())]
    Create { dir: PathBuf, err: std::io::Error },
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
            .map_err(|err| WorkError::Create {
                dir: parent.to_path_buf(),
                err,
            })?;
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
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let busy = kairos_init::pid1::parse_mountinfo(&mounts)
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
