//! One I/O error for the workspace: the operation, the path it was on and the OS error, so a
//! message always says which file (youki's `WrappedIoError` is the model). Error enums hold it
//! as `#[error(transparent)] Io(#[from] IoError)`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// `{path}: {what}: {err}`. The OS error is printed here and not also returned by
/// `source()`, so an `anyhow` chain (`{:#}`) shows it once.
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}: {err}", path.display())]
pub struct IoError {
    pub path: PathBuf,
    /// What was being done, e.g. "reading", "fsync of the directory".
    pub what: Cow<'static, str>,
    pub err: std::io::Error,
}

impl IoError {
    pub fn new(
        path: impl Into<PathBuf>,
        what: impl Into<Cow<'static, str>>,
        err: std::io::Error,
    ) -> IoError {
        IoError {
            path: path.into(),
            what: what.into(),
            err,
        }
    }

    /// The OS error's kind, for callers that treat e.g. `NotFound` apart.
    pub fn kind(&self) -> std::io::ErrorKind {
        self.err.kind()
    }
}

/// For `map_err`: `what` failed on `path`.
pub fn io<E: Into<std::io::Error>>(
    path: &Path,
    what: impl Into<Cow<'static, str>>,
) -> impl FnOnce(E) -> IoError {
    let path = path.to_path_buf();
    let what = what.into();
    move |err| IoError {
        path,
        what,
        err: err.into(),
    }
}

/// `result.at(path, "reading")?` names the path and the operation of any I/O result
/// (`std::io::Error`, or rustix's `Errno`).
pub trait IoResultExt<T> {
    fn at(self, path: &Path, what: impl Into<Cow<'static, str>>) -> Result<T, IoError>;
}

impl<T, E: Into<std::io::Error>> IoResultExt<T> for Result<T, E> {
    fn at(self, path: &Path, what: impl Into<Cow<'static, str>>) -> Result<T, IoError> {
        self.map_err(io(path, what))
    }
}
