//! Fetches Debian's amd64 kernel package and unpacks it without installing it, so tests get a
//! real distribution kernel and its modules tree. The result is cached per machine.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use kairos_util::{IoError, IoResultExt, ToolError, run_tool};

use crate::apt::{self, AptError};

/// The meta package whose dependency names the current versioned kernel package.
const META_PACKAGE: &str = "linux-image-amd64";

/// The unpacked package's kernel: `modules_dir` is `…/root/lib/modules/<version>`.
pub use kairos_initramfs::Kernel;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Command(#[from] ToolError),
    #[error("`apt-cache depends {META_PACKAGE}` names no linux-image-*-amd64 package")]
    NoKernelPackage,
    #[error("package {package}: {what} not found under {dir}")]
    Missing {
        package: String,
        what: &'static str,
        dir: PathBuf,
    },
    #[error(transparent)]
    Apt(#[from] AptError),
}

/// Where fetched artifacts live between runs: `$KAIROS_CACHE`, else
/// `$XDG_CACHE_HOME/kairos-qemu`, else `$HOME/.cache/kairos-qemu`.
pub fn default_cache_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("KAIROS_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("kairos-qemu");
    }
    if let Some(home) = var("HOME") {
        return PathBuf::from(home).join(".cache/kairos-qemu");
    }
    std::env::temp_dir().join("kairos-qemu-cache")
}

/// The kernel in `default_cache_dir()/kernel`, fetched on first use.
pub fn cached_or_fetch() -> Result<Kernel, KernelError> {
    fetch(&default_cache_dir().join("kernel"))
}

/// The kernel already unpacked in `out`, if a previous fetch completed there.
pub fn cached(out: &Path) -> Option<Kernel> {
    let version = fs::read_to_string(out.join("version")).ok()?;
    let version = version.trim();
    if version.is_empty() {
        return None;
    }
    let vmlinuz = out.join("vmlinuz");
    let modules_dir = find_modules_dir(&out.join("root"), version)?;
    vmlinuz.is_file().then(|| Kernel {
        version: version.to_string(),
        vmlinuz,
        modules_dir,
    })
}

/// Downloads and unpacks the current Debian kernel into `out` (`out/root` holds the package
/// tree, `out/vmlinuz` the kernel, `out/version` its release). Returns at once, without
/// network, when `out` already holds a complete fetch.
pub fn fetch(out: &Path) -> Result<Kernel, KernelError> {
    if let Some(k) = cached(out) {
        return Ok(k);
    }
    fs::create_dir_all(out).at(out, "creating")?;
    // Two test processes starting on a fresh machine would otherwise both unpack into `out`.
    let lock_path = out.join(".lock");
    let lock = File::create(&lock_path).at(&lock_path, "creating")?;
    lock.lock().at(&lock_path, "locking")?;
    // The other process may have finished while we waited.
    if let Some(k) = cached(out) {
        return Ok(k);
    }

    let package = resolve_package()?;
    let version = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();

    // Leftovers of an interrupted fetch: start clean rather than trust a partial tree.
    for stale in ["version", "vmlinuz"] {
        remove_if_exists(&out.join(stale))?;
    }
    let root = out.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).at(&root, "removing")?;
    }
    remove_debs(out, &package)?;

    run_tool(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(out),
    )?;
    let deb = find_deb(out, &package)?;
    run_tool(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    // The unpacked tree is what we cache; the .deb would only double the disk use.
    fs::remove_file(&deb).at(&deb, "removing")?;

    let boot_image = root.join("boot").join(format!("vmlinuz-{version}"));
    if !boot_image.is_file() {
        return Err(KernelError::Missing {
            package,
            what: "boot/vmlinuz-<version>",
            dir: root,
        });
    }
    let modules_dir = find_modules_dir(&root, &version).ok_or_else(|| KernelError::Missing {
        package: package.clone(),
        what: "lib/modules/<version>",
        dir: root.clone(),
    })?;
    let vmlinuz = out.join("vmlinuz");
    fs::copy(&boot_image, &vmlinuz)
        .at(&vmlinuz, format!("copying {} here", boot_image.display()))?;
    // Written last, through a rename: its presence marks the fetch complete.
    let tmp = out.join("version.tmp");
    fs::write(&tmp, format!("{version}\n")).at(&tmp, "writing")?;
    let version_path = out.join("version");
    fs::rename(&tmp, &version_path).at(&version_path, "renaming into place")?;
    Ok(Kernel {
        version,
        vmlinuz,
        modules_dir,
    })
}

/// The versioned package `linux-image-amd64` depends on, updating apt's lists if apt knows
/// nothing about it yet (a fresh container has empty lists).
fn resolve_package() -> Result<String, KernelError> {
    if let Some(p) = depends_line() {
        return Ok(p);
    }
    apt::update_once()?;
    depends_line().ok_or(KernelError::NoKernelPackage)
}

fn depends_line() -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["depends", META_PACKAGE])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_depends(&String::from_utf8_lossy(&out.stdout))
}

/// Picks `linux-image-<release>-amd64` out of `apt-cache depends` output.
fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64") && *p != META_PACKAGE)
        .map(str::to_string)
}

/// Debian bookworm ships modules under /lib; newer releases under /usr/lib.
fn find_modules_dir(root: &Path, version: &str) -> Option<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(version))
        .find(|d| d.is_dir())
}

/// `apt-get download` names the file `<package>_<version>_amd64.deb`, with the epoch's `:`
/// escaped; we only know the package name.
fn find_deb(dir: &Path, package: &str) -> Result<PathBuf, KernelError> {
    let prefix = format!("{package}_");
    let entries = fs::read_dir(dir).at(dir, "reading the directory")?;
    for entry in entries {
        let entry = entry.at(dir, "reading the directory")?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(entry.path());
        }
    }
    Err(KernelError::Missing {
        package: package.to_string(),
        what: "downloaded .deb",
        dir: dir.to_path_buf(),
    })
}

fn remove_debs(dir: &Path, package: &str) -> Result<(), KernelError> {
    while let Ok(deb) = find_deb(dir, package) {
        fs::remove_file(&deb).at(&deb, "removing")?;
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<(), KernelError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(IoError::new(path, "removing", e).into())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let none = "linux-image-amd64\n  Recommends: firmware-linux\n";
        assert_eq!(parse_depends(none), None);
    }

    #[test]
    fn cached_needs_every_piece() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path();
        assert!(cached(out).is_none());
        fs::write(out.join("version"), "6.1.0-1-amd64\n").expect("write");
        fs::write(out.join("vmlinuz"), b"x").expect("write");
        assert!(cached(out).is_none(), "modules dir missing");
        fs::create_dir_all(out.join("root/lib/modules/6.1.0-1-amd64")).expect("mkdir");
        let k = cached(out).expect("complete cache");
        assert_eq!(k.version, "6.1.0-1-amd64");
        assert_eq!(k.modules_dir, out.join("root/lib/modules/6.1.0-1-amd64"));
        // A complete cache is returned without touching the network.
        assert_eq!(fetch(out).expect("cached fetch"), k);
    }

    #[test]
    fn cache_dir_honours_kairos_cache() {
        // Only reads the environment; other tests do not change these variables.
        if let Some(dir) = std::env::var_os("KAIROS_CACHE").filter(|v| !v.is_empty()) {
            assert_eq!(default_cache_dir(), PathBuf::from(dir));
        } else {
            assert!(
                default_cache_dir().ends_with("kairos-qemu")
                    || default_cache_dir().ends_with("kairos-qemu-cache")
            );
        }
    }
}
