//! UEFI boot for `install`: the ESP (partition 1, GPT name `efi`, vfat labelled COS_GRUB)
//! holds `EFI/BOOT/BOOTX64.EFI` (grub-mkimage, x86_64-efi) and a tiny `EFI/BOOT/grub.cfg`
//! that finds COS_STATE and loads its `/grub2/grub.cfg` (SPEC §1). The ESP is written with
//! mkfs.vfat and mtools, without mounting it (the running kernel may lack vfat).

use std::path::{Path, PathBuf};
use std::process::Command;

use kairos_init::labels;

use kairos_util::{IoResultExt, run_tool};

use super::InstallError;

/// Where GRUB's UEFI modules are (grub-efi-amd64-bin).
pub const GRUB_X86_64_EFI: &str = "/usr/lib/grub/x86_64-efi";
/// The ESP's size in MiB (64 MiB is enough clusters for FAT32 with 512-byte clusters).
pub const ESP_MIB: u64 = 64;
/// The GRUB prefix baked into BOOTX64.EFI: the ESP's own directory, holding grub.cfg.
pub const ESP_PREFIX: &str = "/EFI/BOOT";

/// Which boot code `install` writes (`--firmware`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Firmware {
    /// UEFI when the running system booted UEFI (/sys/firmware/efi), else BIOS.
    #[default]
    Auto,
    /// A bios_grub partition and GRUB in the MBR.
    Bios,
    /// An EFI system partition COS_GRUB with EFI/BOOT/BOOTX64.EFI.
    #[value(alias = "uefi")]
    Efi,
    /// Both: a bios_grub partition 1 and an ESP 2, so the same disk boots either way.
    Hybrid,
}

impl Firmware {
    /// `auto`, `bios`, `efi` (also `uefi`), as `--firmware` takes them.
    pub fn parse(s: &str) -> Option<Firmware> {
        <Firmware as clap::ValueEnum>::from_str(s, false).ok()
    }

    /// Bios or Efi: `Auto` follows how the running system booted.
    pub fn resolve(self, booted_efi: bool) -> Firmware {
        match self {
            Firmware::Auto if booted_efi => Firmware::Efi,
            Firmware::Auto => Firmware::Bios,
            f => f,
        }
    }

    /// The partitions in front of COS_OEM for this (resolved) firmware: (GPT name,
    /// filesystem label, MiB).
    pub fn boot_partitions(self) -> &'static [(&'static str, &'static str, u64)] {
        const BIOS: (&str, &str, u64) = ("bios", "", 1);
        const ESP: (&str, &str, u64) = ("efi", labels::GRUB, ESP_MIB);
        match self {
            Firmware::Efi => &[ESP],
            Firmware::Hybrid => &[BIOS, ESP],
            Firmware::Bios | Firmware::Auto => &[BIOS],
        }
    }

    /// Whether GRUB for BIOS (boot.img, core.img in the bios_grub partition) is written.
    pub fn has_bios(self) -> bool {
        matches!(self, Firmware::Bios | Firmware::Hybrid | Firmware::Auto)
    }

    /// Whether an ESP with BOOTX64.EFI is written.
    pub fn has_efi(self) -> bool {
        matches!(self, Firmware::Efi | Firmware::Hybrid)
    }
}

/// The ESP's grub.cfg: COS_STATE from the disk this GRUB was loaded from (any disk only when
/// that one has none), then its grub2/grub.cfg ([`kairos_init::grubcfg::esp_grub_cfg`]).
pub fn esp_grub_cfg() -> String {
    kairos_init::grubcfg::esp_grub_cfg()
}

/// The modules built into BOOTX64.EFI (the lists live next to the configs that need them,
/// `kairos_init::grubcfg`) present as `NAME.mod` in GRUB's x86_64-efi directory `dir`.
pub fn modules_in(dir: &Path) -> Vec<&'static str> {
    kairos_init::grubcfg::efi_modules_in(dir)
}

/// Whether `dir` looks like GRUB's x86_64-efi directory.
pub fn is_grub_efi_dir(dir: &Path) -> bool {
    dir.join("kernel.img").is_file() && dir.join("normal.mod").is_file()
}

/// The first of `names` found on $PATH (or /usr/sbin, /sbin).
pub fn find_tool(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// A program the ESP needs that is not on this system, and the Debian package with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{tool} ({package})")]
pub struct MissingTool {
    pub tool: &'static str,
    pub package: &'static str,
}

/// The programs that make an ESP without mounting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspTools {
    pub mkfs: PathBuf,
    pub mmd: PathBuf,
    pub mcopy: PathBuf,
}

/// The tools the ESP needs, checked before anything is written (the installer and
/// kairos-build's ISO both ask here).
pub fn tools() -> Result<EspTools, MissingTool> {
    let need =
        |names: &[&str], tool, package| find_tool(names).ok_or(MissingTool { tool, package });
    Ok(EspTools {
        mkfs: need(&["mkfs.vfat", "mkfs.fat"], "mkfs.vfat", "dosfstools")?,
        mmd: need(&["mmd"], "mmd", "mtools")?,
        mcopy: need(&["mcopy"], "mcopy", "mtools")?,
    })
}

/// Formats the ESP `dev` (FAT32, COS_GRUB) and writes EFI/BOOT/{BOOTX64.EFI,grub.cfg},
/// built in `scratch`.
pub fn write_esp(dev: &Path, grub_dir: &Path, scratch: &Path) -> Result<(), InstallError> {
    let EspTools { mkfs, mmd, mcopy } = tools().map_err(InstallError::NoEspTool)?;
    run_tool(
        Command::new(&mkfs)
            .args(["-F", "32", "-n", labels::GRUB])
            .arg(dev),
    )?;
    std::fs::create_dir_all(scratch).at(scratch, "creating")?;
    let efi = scratch.join("BOOTX64.EFI");
    run_tool(
        Command::new("grub-mkimage")
            .args(["-O", "x86_64-efi", "-d"])
            .arg(grub_dir)
            .arg("-o")
            .arg(&efi)
            .args(["-p", ESP_PREFIX])
            .args(modules_in(grub_dir)),
    )?;
    let cfg = scratch.join("grub.cfg");
    std::fs::write(&cfg, esp_grub_cfg()).at(&cfg, "writing")?;
    let mut mm = Command::new(&mmd);
    mm.env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(dev)
        .args(["::/EFI", "::/EFI/BOOT"]);
    run_tool(&mut mm)?;
    let mut mc = Command::new(&mcopy);
    mc.env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(dev)
        .arg(&efi)
        .arg(&cfg)
        .arg(format!("::{ESP_PREFIX}/"));
    run_tool(&mut mc)?;
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_esp_config_loads_cos_state_s() {
        let c = esp_grub_cfg();
        assert!(
            c.contains("for kairos_part in (${kairos_disk},*); do\n"),
            "{c}"
        );
        assert!(c.ends_with("set prefix=($root)/grub2\nconfigfile ($root)/grub2/grub.cfg\n"));
    }

    #[test]
    fn modules_cover_the_configs() {
        use kairos_init::grubcfg::{CFG_MODULES, EFI_PLATFORM_MODULES};
        let modules: Vec<&str> = EFI_PLATFORM_MODULES
            .iter()
            .chain(CFG_MODULES)
            .copied()
            .collect();
        for m in [
            "part_gpt",
            "fat",
            "ext2",
            "search_label",
            "normal",
            "configfile",
            "linux",
            "loopback",
            "serial",
            "terminfo",
            "efi_gop",
            "loadenv",
            "regexp",
            "probe",
        ] {
            assert!(modules.contains(&m), "{m}");
        }
        // No BIOS-only modules.
        for m in ["biosdisk", "linux16"] {
            assert!(!modules.contains(&m), "{m}");
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("fat.mod"), "").unwrap();
        std::fs::write(t.path().join("ext2.mod"), "").unwrap();
        assert_eq!(modules_in(t.path()), ["fat", "ext2"]);
        assert!(!is_grub_efi_dir(t.path()));
    }

    /// The ESP as written to a 64 MiB image, read back with mtools, when the tools are here.
    #[test]
    fn writes_an_esp_that_mtools_reads_back() {
        let grub = Path::new(GRUB_X86_64_EFI);
        if !is_grub_efi_dir(grub) || tools().is_err() || find_tool(&["mdir", "mtype"]).is_none() {
            panic!(
                "GRUB x86_64-efi, dosfstools or mtools not installed (`kairos-qemu setup` installs it): a test that cannot run fails, it never passes"
            );
        }
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("esp.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(ESP_MIB << 20)
            .unwrap();
        write_esp(&img, grub, &t.path().join("scratch")).unwrap();
        assert!(!t.path().join("scratch").exists());
        let out = Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&img)
            .arg("::/EFI/BOOT/grub.cfg")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), esp_grub_cfg());
        let out = Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-b", "-i"])
            .arg(&img)
            .arg("::/EFI/BOOT")
            .output()
            .unwrap();
        let dir = String::from_utf8_lossy(&out.stdout);
        assert!(dir.contains("BOOTX64.EFI"), "{dir}");
        let label = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "LABEL"])
            .arg(&img)
            .output();
        if let Ok(l) = label {
            assert_eq!(String::from_utf8_lossy(&l.stdout).trim(), "COS_GRUB");
        }
    }

    #[test]
    fn firmware_choice() {
        assert_eq!(Firmware::parse("auto"), Some(Firmware::Auto));
        assert_eq!(Firmware::parse("efi"), Some(Firmware::Efi));
        assert_eq!(Firmware::parse("bios"), Some(Firmware::Bios));
        assert_eq!(Firmware::parse("coreboot"), None);
        assert_eq!(Firmware::Auto.resolve(true), Firmware::Efi);
        assert_eq!(Firmware::Auto.resolve(false), Firmware::Bios);
        assert_eq!(Firmware::Bios.resolve(true), Firmware::Bios);
        assert_eq!(Firmware::Efi.resolve(false), Firmware::Efi);
        assert_eq!(Firmware::parse("hybrid"), Some(Firmware::Hybrid));
        assert_eq!(Firmware::Hybrid.resolve(false), Firmware::Hybrid);
        assert_eq!(Firmware::Efi.boot_partitions(), [("efi", "COS_GRUB", 64)]);
        assert_eq!(Firmware::Bios.boot_partitions(), [("bios", "", 1)]);
        assert_eq!(
            Firmware::Hybrid.boot_partitions(),
            [("bios", "", 1), ("efi", "COS_GRUB", 64)]
        );
        assert!(Firmware::Hybrid.has_bios() && Firmware::Hybrid.has_efi());
        assert!(!Firmware::Efi.has_bios() && !Firmware::Bios.has_efi());
    }
}
