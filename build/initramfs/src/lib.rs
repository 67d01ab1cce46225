//! The initramfs writer shared by `kairos-build initramfs` and the test harness
//! (`kairos-qemu initramfs`): a newc cpio (cpio.rs) with kairos-init as /init and the closure
//! of the modules a machine needs to reach its root, compressed with zstd.

pub mod builder;
pub mod cpio;
#[doc(hidden)]
pub mod testing;

pub use builder::{BuildReport, InitramfsError, InitramfsSpec, build};

use std::path::PathBuf;

/// A kernel and its modules tree, wherever it was found (the harness's unpacked Debian
/// package, or a root tree given to `kairos-build`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The kernel release, e.g. "6.1.0-57-amd64".
    pub version: String,
    pub vmlinuz: PathBuf,
    /// `…/lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

/// Every driver a real machine may need to reach its root, and the filesystems of a Kairos
/// disk, live ISO and ESP: one initramfs for any x86 machine, as a distribution's generic
/// (not host-only) initramfs. kairos-init loads only what matches a present device, so the
/// unused ones cost archive bytes, not boot time. Names are Debian 6.1's; a kernel that lacks
/// some (or builds them in) is fine: the build lists them.
pub fn generic_modules() -> Vec<String> {
    [
        // SATA (AHCI) and legacy ATA (PIIX, the generic and ACPI PATA drivers)
        "ahci",
        "ata_piix",
        "ata_generic",
        "pata_acpi",
        // NVMe
        "nvme",
        // virtio disks and their PCI transport
        "virtio_blk",
        "virtio_scsi",
        "virtio_pci",
        // SCSI disks (SATA, USB, virtio-scsi) and CD-ROMs
        "sd_mod",
        "sr_mod",
        "cdrom",
        // USB host controllers and USB storage (bulk-only and UAS)
        "xhci_pci",
        "xhci_hcd",
        "ehci_pci",
        "ehci_hcd",
        "ohci_pci",
        "ohci_hcd",
        "uhci_hcd",
        "usb_storage",
        "uas",
        // SD cards and eMMC
        "mmc_block",
        "sdhci",
        "sdhci_pci",
        "sdhci_acpi",
        "sdhci_pltfm",
        // ISO 9660 live media
        "isofs",
    ]
    .into_iter()
    .chain(FILESYSTEMS.iter().copied())
    .map(String::from)
    .collect()
}

/// What every Kairos initramfs needs beyond the disk drivers: loop-mounted ext4 images and the
/// squashfs recovery with overlays, the ESP's vfat and the code pages it loads at mount
/// (Debian's FAT_DEFAULT_IOCHARSET is "ascii"), and both providers of ext4's
/// `softdep pre: crypto-crc32c`. Shared by [`generic_modules`] and the test harness's list.
pub const FILESYSTEMS: &[&str] = &[
    "loop",
    "ext4",
    "squashfs",
    "overlay",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_ascii",
    "crc32c_generic",
    "crc32c_intel",
];
