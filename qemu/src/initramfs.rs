//! The harness's initramfs: the writer and the generic list live in `kairos-initramfs`
//! (shared with `kairos-build initramfs`); this keeps the smaller module list the test and
//! bench boots use, and the tests that boot the writer's output on the cached kernel.

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
    ]
    .into_iter()
    .chain(kairos_initramfs::FILESYSTEMS.iter().copied())
    .map(String::from)
    .collect()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use kairos_init::modules::ModuleIndex;
    use kairos_initramfs::{InitramfsSpec, build, cpio};

    use super::*;

    /// A test that cannot run fails with the reason; it never passes without having run.
    const NO_KERNEL: &str =
        "needs the cached Debian kernel: run `kairos-qemu kernel` (or `kairos-qemu setup`)";

    #[test]
    fn builds_bootable_initramfs_from_cached_kernel() {
        let kernel = crate::kernel::cached(&crate::kernel::default_cache_dir().join("kernel"))
            .expect(NO_KERNEL);
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
        assert!(report.missing.is_empty(), "{:?}", report.missing);
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

    /// The generic list against Debian's kernel: what it lacks is known, and the USB and MMC
    /// storage stacks are in.
    #[test]
    fn generic_list_on_the_debian_kernel() {
        let kernel = crate::kernel::cached(&crate::kernel::default_cache_dir().join("kernel"))
            .expect(NO_KERNEL);
        let dir = tempfile::tempdir().expect("tempdir");
        let init = dir.path().join("init");
        fs::write(&init, vec![0x5a; 1 << 20]).expect("write init");
        let spec = InitramfsSpec {
            init_binary: init,
            kernel,
            modules: kairos_initramfs::generic_modules(),
            extra_files: Vec::new(),
        };
        let report = build(&spec, &dir.path().join("generic.img")).expect("build");
        println!(
            "generic: {} bytes, {} modules, missing {:?}, built in {:?}",
            report.size_bytes,
            report.modules.len(),
            report.missing,
            report.builtin
        );
        // Debian 6.1 builds neither (no CONFIG_PATA_ACPI; sdhci-pltfm is for ARM SoCs).
        assert!(
            report
                .missing
                .iter()
                .all(|m| m == "pata_acpi" || m == "sdhci_pltfm"),
            "{:?}",
            report.missing
        );
        for m in [
            "xhci_pci",
            "xhci_hcd",
            "ehci_pci",
            "uhci_hcd",
            "usb_storage",
            "uas",
            "sd_mod",
            "mmc_block",
            "sdhci_pci",
            "sr_mod",
            "isofs",
            "ext4",
        ] {
            assert!(
                report.modules.iter().any(|x| x == m),
                "{m} not in {:?}",
                report.modules
            );
        }
        assert!(report.size_bytes < 4 << 20, "{} bytes", report.size_bytes);
    }

    /// Boots the cached kernel with an initramfs whose /init is a busybox script that insmods
    /// the resolved modules in load order: proves the kernel accepts our zstd stream and cpio,
    /// and that the closure is complete and ordered.
    #[test]
    fn kernel_boots_it_and_loads_every_module() {
        let kernel = crate::kernel::cached(&crate::kernel::default_cache_dir().join("kernel"))
            .expect(NO_KERNEL);
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.is_file() && crate::apt::is_installed("qemu-system-x86"),
            "needs busybox-static and qemu-system-x86 (`kairos-qemu setup` installs them)"
        );
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
