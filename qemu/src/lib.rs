//! Everything a QEMU boot of a Kairos disk needs, built rootless where possible.

pub mod apt;
pub mod boot;
pub mod cpio;
pub mod disk;
pub mod grub;
pub mod initramfs;
pub mod kernel;
pub mod rootfs;
