//! The command line, as the library's input (each subcommand's struct is what its module
//! takes), in coreos-installer's way.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "kairos-build",
    version,
    about = "Turns an OS image into Kairos artifacts: a generic initramfs, a Kairos-ready image, raw/qcow2 disks, a live ISO"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// A generic initramfs (kairos-init as /init, the modules any machine may need to reach its
    /// root) for the kernel installed in a root tree.
    Initramfs(InitramfsArgs),
    /// Makes a plain OS image Kairos-ready (agent, kernel + initrd at /boot, units or
    /// kairos-init as /sbin/init, release fields).
    Image(ImageArgs),
    /// A ready-to-boot disk image with the same GPT, labels, images and GRUB as
    /// `kairos-agent install`.
    Raw(RawArgs),
    /// A live installer ISO (squashfs root, kernel, initrd, GRUB for BIOS and UEFI, the
    /// config): one hybrid file for a CD or a USB stick.
    Iso(IsoArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct InitramfsArgs {
    /// The root tree holding the kernel (`/boot/vmlinuz-VER`, `/lib/modules/VER`).
    #[arg(long)]
    pub root: PathBuf,
    /// Where the initramfs is written (through a temporary file and a rename).
    #[arg(long)]
    pub out: PathBuf,
    /// The kernel version, when the tree has more than one.
    #[arg(long)]
    pub kver: Option<String>,
    /// kairos-init (static); default: next to this program, then `kairos-init` in PATH.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Extra modules (names or aliases) beyond the generic set; repeatable.
    #[arg(long = "module")]
    pub modules: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ImageArgs {
    /// The OS image: `dir:PATH`, `oci:REF` (or a bare reference), `ocifile:PATH`, as the
    /// agent's `upgrade --source` takes them.
    #[arg(long)]
    pub source: String,
    /// `oci:REF` (pushed to the registry), `ocifile:PATH` (an OCI archive) or `dir:PATH`.
    #[arg(long)]
    pub out: String,
    /// The kernel version to use when the image has more than one.
    #[arg(long)]
    pub kver: Option<String>,
    /// kairos-init (static); default: next to this program, then in PATH.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// kairos-agent (static); default: next to this program, then in PATH.
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Where unpacking and staging happen (needs about twice the image's size); default a
    /// temporary directory under /var/tmp.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RawFirmware {
    /// A bios_grub partition and GRUB in the MBR.
    Bios,
    /// An EFI system partition with EFI/BOOT/BOOTX64.EFI.
    Efi,
    /// Both on one disk: the same file boots under BIOS and UEFI.
    Hybrid,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RawArgs {
    /// A Kairos-ready image (see `image`): `dir:`, `oci:`, `ocifile:`.
    #[arg(long)]
    pub source: String,
    /// The disk image file.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "raw")]
    pub format: Format,
    #[arg(long, value_enum, default_value = "hybrid")]
    pub firmware: RawFirmware,
    /// A cloud-config written to COS_OEM (mode 0600).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The disk's size (bytes, or with K, M, G, T suffixes, powers of 1024); default: what
    /// the images need.
    #[arg(long)]
    pub size: Option<String>,
    /// Where unpacking happens; default a temporary directory under /var/tmp.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct IsoArgs {
    /// A Kairos-ready image (see `image`): `dir:`, `oci:`, `ocifile:`.
    #[arg(long)]
    pub source: String,
    /// The ISO file (written as OUT.partial, then renamed).
    #[arg(long)]
    pub out: PathBuf,
    /// A cloud-config put on the medium as /config.yaml (mode 0600), which the live system's
    /// agent reads from /run/initramfs/live.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The ISO's volume id, which the live entries boot with `root=live:CDLABEL=`: up to 32
    /// characters of A-Z, 0-9 and _.
    #[arg(long, default_value = "COS_LIVE")]
    pub label: String,
    /// Added to every GRUB entry's kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Seconds GRUB shows its menu before booting the live entry.
    #[arg(long, default_value_t = 5)]
    pub grub_timeout: u32,
    /// Where unpacking and the ISO tree go (about twice the image's size); default a
    /// temporary directory under /var/tmp.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}
