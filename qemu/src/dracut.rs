//! Builds initramfs images with the distribution's own dracut (Debian 12: `dracut-core` 059):
//! a stock one (dracut's default module set, systemd as the initramfs PID 1) and one made with
//! the project's `99kairos-init` module (`-m kairos-init`, the small form recommended in
//! `dracut-module/README.md`).
//!
//! Nothing is installed into `/usr/lib/dracut`: dracut has no option for an extra module
//! directory, but it honours `$dracutbasedir`, so each build runs against a private copy of
//! `/usr/lib/dracut` (1.9 MB) whose `modules.d` holds the module script embedded in this tool
//! (and never a `99kairos-init` the host may have installed). The configuration is an empty
//! private `--conf`/`--confdir`, so the host's `/etc/dracut.conf.d` cannot change the images.
//!
//! dracut refuses a `--kmoddir` without `modules.dep`, which an unpacked kernel package lacks:
//! [`kmoddir`] keeps a hard-linked, depmod'ed copy of the kernel's module tree in the cache.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kairos_util::{IoError, IoResultExt, ToolError, run_tool};

use crate::apt::{self, AptError};
use crate::kernel::{self, Kernel};

/// The module's `module-setup.sh`, embedded so the tool installs the module it was built with.
pub const MODULE_SETUP: &str = include_str!("../../dracut-module/99kairos-init/module-setup.sh");
/// The module's name as dracut's `-m`/`--add` take it.
pub const MODULE_NAME: &str = "kairos-init";
/// Its directory under `modules.d` (the "99" orders it after 00systemd and 99base).
const MODULE_DIR: &str = "99kairos-init";
/// Where Debian's dracut keeps its functions and modules.
pub const SYSTEM_BASEDIR: &str = "/usr/lib/dracut";

/// What any build needs: dracut itself (`--no-install-recommends`), depmod for the kmoddir,
/// the compressor and cpio.
pub const PACKAGES: &[&str] = &["dracut-core", "kmod", "zstd", "cpio"];
/// What a Debian system has installed and the stock image is built from: without systemd and
/// udev, dracut silently falls back to its shell-based module set.
pub const STOCK_PACKAGES: &[&str] = &["systemd", "udev"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DracutKind {
    /// Debian's dracut with its default module set (`--no-hostonly`): systemd, udev, generic
    /// `root=` handling, every storage driver.
    Stock,
    /// `-m kairos-init`: only the kairos-init module (the binary as `/init` and the boot `.ko`s).
    KairosInit,
    /// `--add kairos-init`: dracut's default module set plus ours, whose `/init` wins.
    KairosInitAdd,
}

impl DracutKind {
    pub fn describe(self) -> &'static str {
        match self {
            DracutKind::Stock => "stock dracut",
            DracutKind::KairosInit => "dracut -m kairos-init",
            DracutKind::KairosInitAdd => "dracut --add kairos-init",
        }
    }

    /// Whether the image holds the kairos-init module (and so needs the binary).
    pub fn has_module(self) -> bool {
        self != DracutKind::Stock
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DracutReport {
    /// Size of the image written to `out`.
    pub size_bytes: u64,
    /// The dracut command line that made it (for logs and the README).
    pub command: String,
    /// The dracut modules it reports including, in order.
    pub modules: Vec<String>,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DracutError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("installing dracut: {0}")]
    Apt(AptError),
    #[error(transparent)]
    Command(#[from] ToolError),
    #[error("a kairos-init dracut image needs the static kairos-init binary; {} is not a file", path.display())]
    NoInitBinary { path: PathBuf },
    #[error("`{command}` succeeded but left no image at {}", path.display())]
    NoImage { command: String, path: PathBuf },
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<AptError> for DracutError {
    fn from(e: AptError) -> DracutError {
        DracutError::Apt(e)
    }
}

/// Runs a command to completion, its stdin closed; its stdout then stderr, or a
/// [`ToolError`] carrying the tail of its output.
fn run(cmd: &mut Command) -> Result<String, DracutError> {
    let out = run_tool(cmd.stdin(Stdio::null()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

fn remove_any(path: &Path) -> Result<(), DracutError> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => Ok(fs::remove_dir_all(path).at(path, "removing")?),
        Ok(_) => Ok(fs::remove_file(path).at(path, "removing")?),
        Err(_) => Ok(()),
    }
}

/// `<cache>/dracut-kmod/<version>`: the root that [`kmoddir`] fills.
pub fn kmod_root(kernel: &Kernel) -> PathBuf {
    kernel::default_cache_dir()
        .join("dracut-kmod")
        .join(&kernel.version)
}

/// A copy of the kernel's module tree with `modules.dep`, for dracut's `--kmoddir`: files
/// hard-linked (no extra space) from `kernel.modules_dir`, then `depmod -b`. Made once per
/// kernel version under the cache; returns `…/lib/modules/<version>`.
pub fn kmoddir(kernel: &Kernel) -> Result<PathBuf, DracutError> {
    let root = kmod_root(kernel);
    let dir = root.join("lib/modules").join(&kernel.version);
    if dir.join("modules.dep").is_file() {
        return Ok(dir);
    }
    apt::ensure_tool("depmod", "kmod")?;
    let parent = root.parent().unwrap_or(&root).to_path_buf();
    fs::create_dir_all(&parent).at(&parent, "creating")?;
    // Two processes (a test and the bench) must not build it at once.
    let lock_path = parent.join(format!(".{}.lock", kernel.version));
    let lock = File::create(&lock_path).at(&lock_path, "creating")?;
    lock.lock().at(&lock_path, "locking")?;
    if dir.join("modules.dep").is_file() {
        return Ok(dir);
    }
    // Built beside the final place and renamed: a half-made tree is never taken for done.
    let tmp = parent.join(format!("{}.tmp", kernel.version));
    remove_any(&tmp)?;
    let tmp_modules = tmp.join("lib/modules");
    fs::create_dir_all(&tmp_modules).at(&tmp_modules, "creating")?;
    run(Command::new("cp")
        .arg("-al")
        .arg(&kernel.modules_dir)
        .arg(tmp_modules.join(&kernel.version)))?;
    run(Command::new("depmod")
        .arg("-b")
        .arg(&tmp)
        .arg(&kernel.version))?;
    remove_any(&root)?;
    fs::rename(&tmp, &root).at(&root, "renaming into place")?;
    Ok(dir)
}

/// Makes `dest` a private dracut base directory: a copy of `system` (dracut's functions,
/// `dracut-install` and `modules.d`), without any kairos-init module found there, plus ours
/// when `with_module`. Returns `dest`.
pub fn prepare_basedir(system: &Path, dest: &Path, with_module: bool) -> Result<(), DracutError> {
    remove_any(dest)?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).at(parent, "creating")?;
    }
    // cp -a: dracut-install and the module scripts keep their modes; no symlinks back into
    // /usr/lib/dracut, which dracut-install could follow into the image.
    run(Command::new("cp").arg("-a").arg(system).arg(dest))?;
    let modules_d = dest.join("modules.d");
    for entry in fs::read_dir(&modules_d).at(&modules_d, "reading the directory")? {
        let entry = entry.at(&modules_d, "reading the directory")?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // A host-installed copy (any number prefix) must neither shadow ours nor leak into
        // the stock image.
        if name.len() > 2 && &name[2..] == MODULE_NAME {
            remove_any(&entry.path())?;
        }
    }
    if with_module {
        let dir = modules_d.join(MODULE_DIR);
        fs::create_dir_all(&dir).at(&dir, "creating")?;
        let script = dir.join("module-setup.sh");
        fs::write(&script, MODULE_SETUP).at(&script, "writing")?;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755))
            .at(&script, "setting permissions")?;
    }
    Ok(())
}

/// dracut's arguments for `kind` (without the program name).
pub fn dracut_args(
    kind: DracutKind,
    kernel: &Kernel,
    kmoddir: &Path,
    conf: &Path,
    confdir: &Path,
    out: &Path,
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![
        "--conf".into(),
        conf.into(),
        "--confdir".into(),
        confdir.into(),
    ];
    a.extend(["--no-hostonly", "--force", "--zstd", "--kver"].map(Into::into));
    a.push(kernel.version.clone().into());
    a.push("--kmoddir".into());
    a.push(kmoddir.into());
    match kind {
        DracutKind::Stock => {}
        DracutKind::KairosInit => a.extend(["-m".into(), MODULE_NAME.into()]),
        DracutKind::KairosInitAdd => a.extend(["--add".into(), MODULE_NAME.into()]),
    }
    a.push(out.into());
    a
}

/// dracut's "*** Including module: NAME ***" lines, in order.
pub fn included_modules(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("*** Including module: ")? + "*** Including module: ".len()..];
            Some(rest.trim_end().trim_end_matches("***").trim().to_string())
        })
        .filter(|m| !m.is_empty())
        .collect()
}

/// Builds a dracut initramfs of `kind` for `kernel` at `out` (replaced). `init_bin` is the
/// static kairos-init for [`DracutKind::KairosInit`] (passed as `KAIROS_INIT_BIN`); the stock
/// image ignores it. Needs root (dracut creates device nodes).
pub fn build(
    kind: DracutKind,
    kernel: &Kernel,
    init_bin: Option<&Path>,
    out: &Path,
) -> Result<DracutReport, DracutError> {
    let mut packages = PACKAGES.to_vec();
    if kind != DracutKind::KairosInit {
        packages.extend_from_slice(STOCK_PACKAGES);
    }
    apt::ensure_packages(&packages)?;
    let init_bin = match (kind, init_bin) {
        (k, Some(p)) if k.has_module() && p.is_file() => Some(p),
        (k, p) if k.has_module() => {
            return Err(DracutError::NoInitBinary {
                path: p.map(Path::to_path_buf).unwrap_or_default(),
            });
        }
        _ => None,
    };
    let kmod = kmoddir(kernel)?;

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).at(parent, "creating")?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "initrd".into());
    let scratch = parent.join(format!(".{name}.dracut.{}", std::process::id()));
    let result = build_in(kind, kernel, init_bin, &kmod, &scratch, out);
    let _ = remove_any(&scratch);
    result
}

fn build_in(
    kind: DracutKind,
    kernel: &Kernel,
    init_bin: Option<&Path>,
    kmod: &Path,
    scratch: &Path,
    out: &Path,
) -> Result<DracutReport, DracutError> {
    let basedir = scratch.join("dracut");
    prepare_basedir(Path::new(SYSTEM_BASEDIR), &basedir, kind.has_module())?;
    let conf = scratch.join("dracut.conf");
    fs::write(&conf, b"").at(&conf, "writing")?;
    let confdir = scratch.join("dracut.conf.d");
    fs::create_dir_all(&confdir).at(&confdir, "creating")?;
    let tmpdir = scratch.join("tmp");
    fs::create_dir_all(&tmpdir).at(&tmpdir, "creating")?;
    remove_any(out)?;

    let mut cmd = Command::new("dracut");
    cmd.args(dracut_args(kind, kernel, kmod, &conf, &confdir, out))
        .arg("--tmpdir")
        .arg(&tmpdir)
        .env("dracutbasedir", &basedir)
        .env_remove("KAIROS_INIT_BIN");
    if let Some(bin) = init_bin {
        cmd.env("KAIROS_INIT_BIN", bin);
    }
    let command = format!(
        "dracutbasedir={} {}",
        basedir.display(),
        apt::describe(&cmd)
    );
    let start = Instant::now();
    let output = run(&mut cmd)?;
    let elapsed = start.elapsed();
    let size_bytes = match fs::metadata(out) {
        Ok(m) if m.len() > 0 => m.len(),
        _ => {
            return Err(DracutError::NoImage {
                command,
                path: out.to_path_buf(),
            });
        }
    };
    Ok(DracutReport {
        size_bytes,
        command,
        modules: included_modules(&output),
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_kernel() -> Kernel {
        Kernel {
            version: "6.1.0-99-amd64".into(),
            vmlinuz: "/k/vmlinuz".into(),
            modules_dir: "/k/root/lib/modules/6.1.0-99-amd64".into(),
        }
    }

    #[test]
    fn embedded_module_is_the_repository_one() {
        assert!(MODULE_SETUP.starts_with("#!/bin/bash"));
        for f in ["check()", "depends()", "installkernel()", "install()"] {
            assert!(MODULE_SETUP.contains(f), "module-setup.sh lacks {f}");
        }
    }

    #[test]
    fn args_for_each_kind() {
        let k = fake_kernel();
        let s = |kind| {
            dracut_args(
                kind,
                &k,
                Path::new("/km"),
                Path::new("/c"),
                Path::new("/cd"),
                Path::new("/o.img"),
            )
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
        };
        assert_eq!(
            s(DracutKind::Stock),
            "--conf /c --confdir /cd --no-hostonly --force --zstd --kver 6.1.0-99-amd64 --kmoddir /km /o.img"
        );
        assert_eq!(
            s(DracutKind::KairosInit),
            "--conf /c --confdir /cd --no-hostonly --force --zstd --kver 6.1.0-99-amd64 --kmoddir /km -m kairos-init /o.img"
        );
        assert_eq!(
            s(DracutKind::KairosInitAdd),
            "--conf /c --confdir /cd --no-hostonly --force --zstd --kver 6.1.0-99-amd64 --kmoddir /km --add kairos-init /o.img"
        );
    }

    #[test]
    fn parses_included_modules() {
        let out = "dracut: Executing: /usr/bin/dracut -m kairos-init\n\
                   dracut: *** Including module: systemd ***\n\
                   dracut: *** Including module: kairos-init ***\n\
                   dracut: *** Including modules done ***\n";
        assert_eq!(included_modules(out), ["systemd", "kairos-init"]);
        assert!(included_modules("nothing\n").is_empty());
    }

    #[test]
    fn basedir_replaces_a_host_module_with_ours() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let system = tmp.path().join("system");
        for m in ["00systemd", "99base", "99kairos-init", "90kairos-init"] {
            fs::create_dir_all(system.join("modules.d").join(m)).expect("mkdir");
            fs::write(system.join("modules.d").join(m).join("module-setup.sh"), m).expect("w");
        }
        fs::write(system.join("dracut-init.sh"), "x").expect("write");
        let dest = tmp.path().join("base");
        prepare_basedir(&system, &dest, false).expect("stock basedir");
        let names = |d: &Path| {
            let mut v: Vec<String> = fs::read_dir(d.join("modules.d"))
                .expect("read")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&dest), ["00systemd", "99base"]);
        assert!(dest.join("dracut-init.sh").is_file());
        prepare_basedir(&system, &dest, true).expect("kairos basedir");
        assert_eq!(names(&dest), ["00systemd", "99base", "99kairos-init"]);
        let script = dest.join("modules.d/99kairos-init/module-setup.sh");
        assert_eq!(fs::read_to_string(&script).expect("read"), MODULE_SETUP);
        let mode = fs::metadata(&script).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        // The system tree is untouched.
        assert!(system.join("modules.d/99kairos-init").is_dir());
    }
}
