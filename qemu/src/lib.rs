//! Everything a QEMU boot of a Kairos disk needs, built rootless where possible.

pub mod apt;
pub mod bench;
pub mod boot;
pub mod debian;
pub mod disk;
pub mod dracut;
pub mod grub;
pub mod initramfs;
pub mod kernel;
pub mod ready;
pub mod rootfs;

/// Every Debian package the project's builds and tests need: QEMU, GRUB, the tools that make
/// filesystems (the probe tests use all of them), `file` for the static-binary check.
pub const ALL_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    // qemu-img: `kairos-build raw --format qcow2`.
    "qemu-utils",
    "busybox-static",
    "gdisk",
    "fdisk",
    "grub-pc-bin",
    "grub-common",
    "squashfs-tools",
    "e2fsprogs",
    "dosfstools",
    "xfsprogs",
    "xorriso",
    "cpio",
    "zstd",
    "file",
    "debootstrap",
    "debian-archive-keyring",
    // The local OCI registry the upgrade tests pull from (tests/src/registry.rs).
    "docker-registry",
    // UEFI install: the firmware QEMU boots, GRUB for x86_64-efi, the ESP's tools.
    "ovmf",
    "grub-efi-amd64-bin",
    "mtools",
    // rsvg-convert: the tests render `analyze plot` and the bench's SVG to PNG.
    "librsvg2-bin",
    // nft: the NAT routers of the mesh test across sites (tests/src/sites.rs).
    "nftables",
];
