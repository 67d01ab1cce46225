//! Builds the Kairos initramfs: a zstd-compressed newc cpio holding kairos-init as /init, the
//! device nodes the kernel needs before devtmpfs, and the closure of the modules a node needs
//! to reach its root disk. No shell, no udev, no kmod: kairos-init reads each `.ko` itself.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kairos_init::modules::{ModError, ModuleIndex};

use crate::cpio::{CpioError, CpioWriter};
use crate::kernel::Kernel;

/// zstd level: the image is built once and decompressed on every boot.
const ZSTD_LEVEL: i32 = 19;
/// 8 MiB window: the kernel's zstd decompressor rejects frames needing larger windows.
const ZSTD_WINDOW_LOG: u32 = 23;

#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// Becomes /init; must be statically linked (there is no libc in the archive).
    pub init_binary: PathBuf,
    pub kernel: Kernel,
    /// Module names or aliases; their dependency closure is included.
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
}

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("scanning modules in {dir}: {source}")]
    Scan {
        dir: PathBuf,
        #[source]
        source: ModError,
    },
    #[error("resolving modules {wanted:?} in {dir}: {source}")]
    Resolve {
        wanted: Vec<String>,
        dir: PathBuf,
        #[source]
        source: ModError,
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
    #[error("{path}: {source}")]
    Cpio {
        path: PathBuf,
        #[source]
        source: CpioError,
    },
    #[error("compressing {path} with zstd: {source}")]
    Compress {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitramfsError + '_ {
    move |source| InitramfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The drivers for the disks and filesystems a Kairos node boots from, so one initramfs
/// serves virtio, SATA and NVMe machines. xfs (large) is left to `--module xfs`.
pub fn default_modules() -> Vec<String> {
    [
        // disks: virtio, virtio-scsi, SATA (AHCI and legacy PIIX), NVMe
        "virtio_blk",
        "virtio_pci",
        "virtio_scsi",
        "sd_mod",
        "ahci",
        "ata_piix",
        "nvme",
        // images: loop-mounted squashfs/ext4 with overlays
        "loop",
        "ext4",
        "overlay",
        "squashfs",
        // EFI system partition and its default code pages
        "vfat",
        "nls_cp437",
        "nls_iso8859_1",
        // vfat loads its iocharset at mount; Debian's default (FAT_DEFAULT_IOCHARSET) is "ascii"
        "nls_ascii",
        // ext4's `softdep pre: crypto-crc32c`, made explicit so both providers are present
        "crc32c_generic",
        "crc32c_intel",
    ]
    .map(String::from)
    .to_vec()
}

/// Writes the initramfs for `spec` to `out` (through a temporary file and a rename, so a
/// failed build never leaves a half-written image where a boot would pick it up).
pub fn build(spec: &InitramfsSpec, out: &Path) -> Result<BuildReport, InitramfsError> {
    let kernel = &spec.kernel;
    let dir = &kernel.modules_dir;
    let index = ModuleIndex::scan(dir).map_err(|source| InitramfsError::Scan {
        dir: dir.clone(),
        source,
    })?;
    let wanted: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
    let modules = index
        .resolve(&wanted)
        .map_err(|source| InitramfsError::Resolve {
            wanted: spec.modules.clone(),
            dir: dir.clone(),
            source,
        })?;

    let init = fs::read(&spec.init_binary).map_err(io(&spec.init_binary))?;
    if elf_has_interpreter(&init) {
        return Err(InitramfsError::InitNotStatic {
            path: spec.init_binary.clone(),
        });
    }

    let cpio_err = |source| InitramfsError::Cpio {
        path: out.to_path_buf(),
        source,
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

    let builtin = dir.join("modules.builtin");
    let data = fs::read(&builtin).map_err(io(&builtin))?;
    w.file(&format!("{mod_root}/modules.builtin"), 0o644, &data)
        .map_err(cpio_err)?;

    // Sorted by path: the archive's byte layout then depends only on the module set.
    let mut files: Vec<(String, PathBuf)> = Vec::with_capacity(modules.len());
    for name in &modules {
        let Some((path, _)) = index.get(name) else {
            return Err(InitramfsError::Resolve {
                wanted: spec.modules.clone(),
                dir: dir.clone(),
                source: ModError::Unknown { name: name.clone() },
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
        let data = fs::read(host).map_err(io(host))?;
        w.file(archive_path, 0o644, &data).map_err(cpio_err)?;
    }

    for (host, archive_path) in &spec.extra_files {
        let data = fs::read(host).map_err(io(host))?;
        let mode = fs::metadata(host).map_err(io(host))?.permissions().mode();
        w.file(archive_path, mode & 0o7777, &data)
            .map_err(cpio_err)?;
    }
    let cpio = w.finish().map_err(cpio_err)?;

    let tmp = tmp_path(out);
    let written = compress(&cpio, &tmp).map_err(|source| InitramfsError::Compress {
        path: tmp.clone(),
        source,
    });
    let size_bytes = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, out).map_err(io(out))?;
    Ok(BuildReport {
        size_bytes,
        cpio_bytes: cpio.len() as u64,
        modules,
    })
}

/// One zstd frame with a content checksum and a window the kernel's decompressor accepts.
fn compress(data: &[u8], path: &Path) -> std::io::Result<u64> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let file = fs::File::create(path)?;
    let mut enc = zstd::stream::Encoder::new(file, ZSTD_LEVEL)?;
    enc.include_checksum(true)?;
    enc.include_contentsize(true)?;
    enc.window_log(ZSTD_WINDOW_LOG)?;
    enc.long_distance_matching(false)?;
    enc.set_pledged_src_size(Some(data.len() as u64))?;
    enc.write_all(data)?;
    let file = enc.finish()?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
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
    fn builds_bootable_initramfs_from_cached_kernel() {
        let Some(kernel) =
            crate::kernel::cached(&crate::kernel::default_cache_dir().join("kernel"))
        else {
            eprintln!(
                "skipping builds_bootable_initramfs_from_cached_kernel: no cached kernel (run `kairos-qemu kernel`)"
            );
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        // A stand-in for kairos-init: the structure is under test, not the binary.
        let init = dir.path().join("init");
        fs::write(&init, vec![0x5a; 1 << 20]).expect("write init");
        let extra = dir.path().join("extra.conf");
        fs::write(&extra, "x=1\n").expect("write extra");
        let spec = InitramfsSpec {
            init_binary: init,
            kernel: kernel.clone(),
            modules: default_modules(),
            extra_files: vec![(extra, "etc/kairos/extra.conf".into())],
        };
        let out = dir.path().join("initramfs.img");
        let report = build(&spec, &out).expect("build");
        assert!(report.size_bytes < 3 << 20, "{} bytes", report.size_bytes);
        assert_eq!(report.size_bytes, fs::metadata(&out).expect("meta").len());

        let compressed = fs::read(&out).expect("read");
        let raw = zstd::stream::decode_all(compressed.as_slice()).expect("zstd");
        assert_eq!(raw.len() as u64, report.cpio_bytes);
        let entries = cpio::read_entries(&raw).expect("cpio");
        let find = |suffix: &str| entries.iter().find(|e| e.name.ends_with(suffix));
        let init = find("init").filter(|e| e.name == "init").expect("/init");
        assert!(init.is_file() && init.perm() == 0o755);
        let console = entries
            .iter()
            .find(|e| e.name == "dev/console")
            .expect("dev/console");
        assert!(console.is_char_dev());
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        let base = format!("lib/modules/{}/", kernel.version);
        for ko in [
            "/ext4.ko",
            "/jbd2.ko",
            "/virtio_blk.ko",
            "/loop.ko",
            "/squashfs.ko",
        ] {
            let e = find(ko).unwrap_or_else(|| panic!("{ko} missing"));
            assert!(e.name.starts_with(&base), "{}", e.name);
        }
        assert!(
            entries
                .iter()
                .any(|e| e.name == format!("{base}modules.builtin"))
        );
        assert!(entries.iter().any(|e| e.name == "etc/kairos/extra.conf"));
        assert!(report.modules.iter().any(|m| m == "ext4"));
        // Load order: a module's dependencies come before it.
        let pos = |m: &str| {
            report
                .modules
                .iter()
                .position(|x| x == m)
                .unwrap_or_else(|| panic!("{m} not in {:?}", report.modules))
        };
        assert!(pos("jbd2") < pos("ext4"));
        assert!(pos("virtio_ring") < pos("virtio_blk"));

        // The same inputs give the same bytes.
        let again = dir.path().join("again.img");
        build(&spec, &again).expect("rebuild");
        assert_eq!(fs::read(&again).expect("read"), compressed);
    }

    /// Boots the cached kernel with an initramfs whose /init is a busybox script that insmods
    /// the resolved modules in load order: proves the kernel accepts our zstd stream and cpio,
    /// and that the closure is complete and ordered.
    #[test]
    fn kernel_boots_it_and_loads_every_module() {
        let Some(kernel) =
            crate::kernel::cached(&crate::kernel::default_cache_dir().join("kernel"))
        else {
            eprintln!("skipping kernel_boots_it_and_loads_every_module: no cached kernel");
            return;
        };
        let busybox = Path::new("/bin/busybox");
        if !busybox.is_file() || !crate::apt::is_installed("qemu-system-x86") {
            eprintln!(
                "skipping kernel_boots_it_and_loads_every_module: needs busybox-static and qemu-system-x86"
            );
            return;
        }
        let index = ModuleIndex::scan(&kernel.modules_dir).expect("scan");
        let wanted = default_modules();
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let order = index.resolve(&wanted).expect("resolve");
        let list: String = order
            .iter()
            .map(|m| {
                let (path, _) = index.get(m).expect("resolved module is indexed");
                let rel = path.strip_prefix(&kernel.modules_dir).expect("under tree");
                format!("/lib/modules/{}/{}\n", kernel.version, rel.display())
            })
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let order_file = dir.path().join("order");
        fs::write(&order_file, list).expect("write");
        let init = dir.path().join("init");
        fs::write(
            &init,
            "#!/bin/busybox sh\n\
             /bin/busybox mkdir -p /sbin /usr/bin /usr/sbin\n\
             /bin/busybox --install -s\n\
             export PATH=/bin:/sbin\n\
             mount -t proc proc /proc\n\
             while read ko; do insmod $ko || echo \"KAIROS-TEST: insmod $ko failed\"; done < /etc/order\n\
             echo \"KAIROS-TEST: loaded $(wc -l < /proc/modules)\"\n\
             grep -q '^ext4 ' /proc/modules && echo 'KAIROS-TEST: ext4 live'\n\
             poweroff -f\n",
        )
        .expect("write init");
        let spec = InitramfsSpec {
            init_binary: init,
            kernel: kernel.clone(),
            modules: default_modules(),
            extra_files: vec![
                (busybox.to_path_buf(), "bin/busybox".into()),
                (order_file, "etc/order".into()),
            ],
        };
        let img = dir.path().join("initramfs.img");
        let report = build(&spec, &img).expect("build");
        assert_eq!(report.modules, order);

        let mut boot = crate::boot::BootSpec::new(dir.path().join("serial.log"));
        boot.kernel = Some(kernel.vmlinuz.clone());
        boot.initrd = Some(img);
        boot.append = Some("console=ttyS0 panic=-1".into());
        boot.timeout = std::time::Duration::from_secs(120);
        let r = crate::boot::run(&boot).expect("qemu");
        // CPU-feature modules answer ENODEV on TCG's qemu64 CPU (no SSE4.2/PCLMUL); the
        // generic crc32c/crct10dif they accelerate are in the closure too.
        let cpu_specific = |l: &str| l.contains("-intel.ko") || l.contains("-pclmul.ko");
        let failed: Vec<&str> = r
            .log
            .lines()
            .filter(|l| l.starts_with("KAIROS-TEST: insmod"))
            .collect();
        assert!(
            failed.iter().all(|l| cpu_specific(l)),
            "{failed:#?}\n{}",
            r.tail(30)
        );
        assert!(r.log.contains("KAIROS-TEST: ext4 live"), "{}", r.tail(30));
        let loaded = format!("KAIROS-TEST: loaded {}", order.len() - failed.len());
        assert!(r.log.contains(&loaded), "want `{loaded}`; {}", r.tail(30));
    }
}
