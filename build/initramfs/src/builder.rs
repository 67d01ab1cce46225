//! Builds the Kairos initramfs: a zstd-compressed newc cpio holding kairos-init as /init, the
//! device nodes the kernel needs before devtmpfs, and the closure of the modules a node needs
//! to reach its root disk. No shell, no udev, no kmod: kairos-init reads each `.ko` itself.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kairos_init::modules::{ModError, ModuleIndex};
use kairos_util::{IoError, IoResultExt};

use crate::Kernel;
use crate::cpio::{CpioError, CpioWriter};

/// zstd level: the image is built once and decompressed on every boot.
const ZSTD_LEVEL: i32 = 19;
/// 8 MiB window: the kernel's zstd decompressor rejects frames needing larger windows.
const ZSTD_WINDOW_LOG: u32 = 23;

#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// Becomes /init; must be statically linked (there is no libc in the archive).
    pub init_binary: PathBuf,
    pub kernel: Kernel,
    /// Module names or aliases; their dependency closure is included. Each is resolved on its
    /// own: one the tree lacks is listed in [`BuildReport::missing`], not an error.
    pub modules: Vec<String>,
    /// (host file, path in the archive); the host file's permission bits are kept.
    pub extra_files: Vec<(PathBuf, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    /// Size of the compressed image written to `out`.
    pub size_bytes: u64,
    /// Size of the cpio archive before compression.
    pub cpio_bytes: u64,
    /// Included modules in load order.
    pub modules: Vec<String>,
    /// Wanted names the kernel neither has as a module nor builds in, each with the reason
    /// when it is not simply absent (e.g. "xhci_pci (module xhci_pci depends on xhci_hcd, …)").
    pub missing: Vec<String>,
    /// Wanted names built into the kernel (nothing to include; listed for the record).
    pub builtin: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("scanning modules in {dir}: {err}")]
    Scan { dir: PathBuf, err: ModError },
    #[error("resolving modules {wanted:?} in {dir}: {err}")]
    Resolve {
        wanted: Vec<String>,
        dir: PathBuf,
        err: ModError,
    },
    #[error("module {name}: {path} is not under {dir}")]
    ModuleOutsideTree {
        name: String,
        path: PathBuf,
        dir: PathBuf,
    },
    #[error(
        "{path} is dynamically linked (has an ELF interpreter); the initramfs has no libc: build it with the static target"
    )]
    InitNotStatic { path: PathBuf },
    #[error("{path}: {err}")]
    Cpio { path: PathBuf, err: CpioError },
}

/// Writes the initramfs for `spec` to `out` (through a temporary file and a rename, so a
/// failed build never leaves a half-written image where a boot would pick it up).
pub fn build(spec: &InitramfsSpec, out: &Path) -> Result<BuildReport, InitramfsError> {
    let kernel = &spec.kernel;
    let dir = &kernel.modules_dir;
    let index = ModuleIndex::scan(dir).map_err(|source| InitramfsError::Scan {
        dir: dir.clone(),
        err: source,
    })?;
    let wanted: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
    let (modules, failed) = index.resolve_each(&wanted);
    let missing = failed
        .into_iter()
        .map(|(name, why)| match why {
            ModError::Unknown { .. } => name,
            other => format!("{name} ({other})"),
        })
        .collect();
    let builtin = wanted
        .iter()
        .filter(|w| index.is_builtin(w))
        .map(|w| (*w).to_string())
        .collect();

    let init = fs::read(&spec.init_binary).at(&spec.init_binary, "reading")?;
    if elf_has_interpreter(&init) {
        return Err(InitramfsError::InitNotStatic {
            path: spec.init_binary.clone(),
        });
    }

    let cpio_err = |err| InitramfsError::Cpio {
        path: out.to_path_buf(),
        err,
    };
    let mut w = CpioWriter::new(Vec::new());
    let mod_root = format!("lib/modules/{}", kernel.version);
    (|| -> Result<(), CpioError> {
        for d in ["dev", "proc", "sys", "run", "sysroot", "etc", &mod_root] {
            w.dir(d, 0o755)?;
        }
        w.dir("tmp", 0o1777)?;
        // The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.char_dev("dev/null", 0o666, 1, 3)?;
        w.file(
            "etc/initrd-release",
            0o644,
            b"NAME=kairos-init\nID=kairos-init\n",
        )?;
        w.file("init", 0o755, &init)
    })()
    .map_err(cpio_err)?;

    // kairos-init skips wanted built-ins with it; a tree without one (rare) just goes without.
    let builtin_list = dir.join("modules.builtin");
    match fs::read(&builtin_list) {
        Ok(data) => w
            .file(&format!("{mod_root}/modules.builtin"), 0o644, &data)
            .map_err(cpio_err)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(IoError::new(builtin_list, "reading", e).into()),
    }

    // Sorted by path: the archive's byte layout then depends only on the module set.
    let mut files: Vec<(String, PathBuf)> = Vec::with_capacity(modules.len());
    for name in &modules {
        let Some((path, _)) = index.get(name) else {
            return Err(InitramfsError::Resolve {
                wanted: spec.modules.clone(),
                dir: dir.clone(),
                err: ModError::Unknown { name: name.clone() },
            });
        };
        let rel = path
            .strip_prefix(dir)
            .map_err(|_| InitramfsError::ModuleOutsideTree {
                name: name.clone(),
                path: path.to_path_buf(),
                dir: dir.clone(),
            })?;
        files.push((
            format!("{mod_root}/{}", rel.to_string_lossy()),
            path.to_path_buf(),
        ));
    }
    files.sort();
    for (archive_path, host) in &files {
        let data = fs::read(host).at(host, "reading the module")?;
        w.file(archive_path, 0o644, &data).map_err(cpio_err)?;
    }

    for (host, archive_path) in &spec.extra_files {
        let data = fs::read(host).at(host, "reading")?;
        let mode = fs::metadata(host)
            .at(host, "reading the mode of")?
            .permissions()
            .mode();
        w.file(archive_path, mode & 0o7777, &data)
            .map_err(cpio_err)?;
    }
    let cpio = w.finish().map_err(cpio_err)?;

    let tmp = tmp_path(out);
    let written = compress(&cpio, &tmp);
    let size_bytes = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    fs::rename(&tmp, out).at(out, "renaming the finished image to")?;
    Ok(BuildReport {
        size_bytes,
        cpio_bytes: cpio.len() as u64,
        modules,
        missing,
        builtin,
    })
}

/// One zstd frame with a content checksum and a window the kernel's decompressor accepts.
fn compress(data: &[u8], path: &Path) -> Result<u64, IoError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).at(dir, "creating the directory")?;
    }
    let file = fs::File::create(path).at(path, "creating")?;
    let zstd = || -> std::io::Result<fs::File> {
        let mut enc = zstd::stream::Encoder::new(file, ZSTD_LEVEL)?;
        enc.include_checksum(true)?;
        enc.include_contentsize(true)?;
        enc.window_log(ZSTD_WINDOW_LOG)?;
        enc.long_distance_matching(false)?;
        enc.set_pledged_src_size(Some(data.len() as u64))?;
        enc.write_all(data)?;
        enc.finish()
    };
    let file = zstd().at(path, "compressing with zstd")?;
    file.sync_all().at(path, "fsync")?;
    Ok(file.metadata().at(path, "reading the size")?.len())
}

fn tmp_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Whether `data` is an ELF64 little-endian file with a PT_INTERP program header (i.e. needs
/// a dynamic loader). Anything unparseable counts as "no": a script or test stub is allowed.
fn elf_has_interpreter(data: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if data.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..phnum as usize).any(|i| {
        let off = phoff.saturating_add(i.saturating_mul(phentsize as usize));
        data.get(off..off.saturating_add(4))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            == Some(PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio;

    #[test]
    fn elf_interpreter_detection() {
        assert!(!elf_has_interpreter(b"#!/bin/sh\n"));
        assert!(!elf_has_interpreter(b"\x7fELF\x02\x01"));
        // The shell is dynamically linked on Debian.
        if let Ok(sh) = fs::read("/bin/sh") {
            assert!(elf_has_interpreter(&sh));
        }
        // This test binary is built with crt-static.
        if let Ok(me) = std::env::current_exe().and_then(fs::read)
            && cfg!(target_feature = "crt-static")
        {
            assert!(!elf_has_interpreter(&me));
        }
    }

    #[test]
    fn lists_missing_and_builtin_and_packs_the_closure_of_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mods = dir.path().join("lib/modules/9.9.9-test");
        crate::testing::fake_tree(
            &mods,
            &[
                (
                    "kernel/drivers/usb/storage/usb-storage.ko",
                    "usb_storage",
                    &["usbcore"],
                ),
                ("kernel/drivers/usb/core/usbcore.ko", "usbcore", &[]),
                (
                    "kernel/drivers/usb/host/xhci-pci.ko",
                    "xhci_pci",
                    &["xhci_hcd"],
                ),
            ],
            &["kernel/drivers/block/loop.ko"],
        )
        .expect("fake tree");
        let init = dir.path().join("init");
        fs::write(&init, b"#!/bin/sh\n").expect("init");
        let spec = InitramfsSpec {
            init_binary: init,
            kernel: Kernel {
                version: "9.9.9-test".into(),
                vmlinuz: dir.path().join("vmlinuz"),
                modules_dir: mods,
            },
            modules: ["xhci_pci", "usb-storage", "loop", "pata_acpi"]
                .map(String::from)
                .to_vec(),
            extra_files: Vec::new(),
        };
        let out = dir.path().join("initrd.img");
        let report = build(&spec, &out).expect("build");
        assert_eq!(report.modules, ["usbcore", "usb_storage"]);
        assert_eq!(report.builtin, ["loop"]);
        assert_eq!(report.missing.len(), 2, "{:?}", report.missing);
        assert!(
            report.missing[0].starts_with("xhci_pci (") && report.missing[0].contains("xhci_hcd"),
            "{:?}",
            report.missing
        );
        assert_eq!(report.missing[1], "pata_acpi");

        let raw = zstd::stream::decode_all(fs::read(&out).expect("read").as_slice()).expect("zstd");
        let names: Vec<String> = cpio::read_entries(&raw)
            .expect("cpio")
            .into_iter()
            .map(|e| e.name)
            .collect();
        let base = "lib/modules/9.9.9-test/";
        for want in [
            "init",
            "dev/console",
            "lib/modules/9.9.9-test/modules.builtin",
            "lib/modules/9.9.9-test/kernel/drivers/usb/core/usbcore.ko",
            "lib/modules/9.9.9-test/kernel/drivers/usb/storage/usb-storage.ko",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with(base) && n.ends_with("xhci-pci.ko"))
        );
    }
}
