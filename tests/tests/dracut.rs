//! The dracut module (issue 7): Debian's own dracut, given the `99kairos-init` module, builds an
//! initramfs that boots a Kairos disk through GRUB exactly as the project's own initramfs does.
//!
//! The image is built with the small form recommended in `dracut-module/README.md`:
//! `dracut --no-hostonly -m kairos-init --zstd …` (only the kairos-init module; `-m` is the
//! exact module list, so nothing else dracut would pick by default from the build host gets in).
//! `kairos_qemu::dracut::build` runs it against a private copy of `/usr/lib/dracut` holding the
//! module, with `KAIROS_INIT_BIN` pointing at the freshly built static kairos-init.

use std::process::Command;

use kairos_qemu::dracut::{self, DracutKind};
use kairos_tests::*;

/// Boots the disk with `img` as its initramfs through GRUB: the assertions of boot.rs's
/// grub_boots_active_read_only, plus the timeline lines.
fn boots_active_read_only(name: &str, img: &std::path::Path, what: &str) {
    let d = disk(name, |s| s.initramfs = img.to_path_buf());
    let r = boot_grub(name, &d, &[DONE]);
    assert_active_read_only(&r, &format!("{what} initramfs stage"));
}

#[test]
fn dracut_initramfs_boots_active_read_only() {
    require_root();
    let a = artifacts();
    let img = a.work.join("initramfs-dracut-kairos.img");
    let report = dracut::build(
        DracutKind::KairosInit,
        &a.kernel,
        Some(&a.init_binary),
        &img,
    )
    .unwrap_or_else(|e| panic!("building {} with dracut: {e}", img.display()));
    println!(
        "FIGURE dracut -m kairos-init initramfs: {} bytes in {:.1} s ({}); modules: {}",
        report.size_bytes,
        report.elapsed.as_secs_f64(),
        report.command,
        report.modules.join(" ")
    );
    assert_eq!(report.modules, ["kairos-init"], "{}", report.command);
    // Small, as measured for the module's README (2.04 MB): not a default-set image.
    assert!(
        report.size_bytes < 4 << 20,
        "{} is {} bytes",
        img.display(),
        report.size_bytes
    );
    // It really is dracut's image, with kairos-init as /init.
    let listing = Command::new("lsinitrd")
        .arg(&img)
        .output()
        .expect("running lsinitrd");
    assert!(
        listing.status.success(),
        "lsinitrd {} failed",
        img.display()
    );
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("dracut modules:"), "{listing}");
    let init_size = std::fs::metadata(&a.init_binary)
        .expect("kairos-init binary")
        .len()
        .to_string();
    assert!(
        listing
            .lines()
            .any(|l| l.ends_with(" init") && l.contains(&format!(" {init_size} "))),
        "/init is not the {init_size}-byte kairos-init:\n{listing}"
    );
    boots_active_read_only("dracut-active", &img, "dracut -m kairos-init");
}

/// The literal form: `dracut --no-hostonly --add kairos-init` over dracut's default
/// module set (systemd, udev, …): a big image, but kairos-init is its /init and it boots the
/// same way.
#[test]
fn dracut_add_form_boots_active_read_only() {
    require_root();
    let a = artifacts();
    let img = a.work.join("initramfs-dracut-add.img");
    let report = dracut::build(
        DracutKind::KairosInitAdd,
        &a.kernel,
        Some(&a.init_binary),
        &img,
    )
    .unwrap_or_else(|e| panic!("building {} with dracut: {e}", img.display()));
    println!(
        "FIGURE dracut --add kairos-init initramfs: {} bytes in {:.1} s; modules: {}",
        report.size_bytes,
        report.elapsed.as_secs_f64(),
        report.modules.join(" ")
    );
    assert!(
        report.modules.len() > 5 && report.modules.iter().any(|m| m == "systemd"),
        "not the default set: {:?}",
        report.modules
    );
    assert!(report.modules.iter().any(|m| m == "kairos-init"));
    boots_active_read_only("dracut-add", &img, "dracut --add kairos-init");
}
