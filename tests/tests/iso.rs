//! The live installer ISO (issue 14): `kairos-build iso` from the busybox image tree, booted
//! by the firmware and GRUB from the medium (no `-kernel`) as a CD-ROM and as a USB stick,
//! under SeaBIOS and OVMF, to a running live system: kairos-init in live mode, the squashfs
//! read-only with tmpfs overlays, `/run/cos/live_mode`, the medium's config.yaml read by the
//! agent, which runs the stages (the test driver is started by that config).
//!
//! The ISO is built once per test process and shared. Run as root:
//! `cargo test --release -p kairos-tests --test iso`.

use std::path::PathBuf;
use std::sync::OnceLock;

use kairos_qemu::boot::BootExit;
use kairos_tests::iso::{Firmware, Medium, build_iso, live_boot_spec, live_source_tree};
use kairos_tests::{DRIVER_DONE, can_run, driver_lines, driver_value};

/// The medium's config.yaml: the driver's start, and a file that shows it was applied.
const CONFIG: &str = "#cloud-config\nstages:\n  boot:\n    - name: iso test\n      files:\n        - path: /etc/kairos-test/hello.txt\n          permissions: 0644\n          content: applied from the ISO's config.yaml\n  network:\n    - name: start the test driver\n      commands:\n        - setsid /usr/libexec/kairos-test-driver </dev/null >/dev/console 2>&1 &\n";

/// What the driver prints on the live system (sourced from the image's /oem, which a live
/// boot leaves unmounted).
const SCENARIO: &str = r#"
say "live_mode $([ -e /run/cos/live_mode ] && echo yes || echo no)"
say "medium $(grep ' /run/initramfs/live ' /proc/mounts | cut -d' ' -f1,3,4)"
say "medium-config $(stat -c '%a %U' /run/initramfs/live/config.yaml 2>&1)"
say "root $(grep ' / ' /proc/mounts | tail -n1 | cut -d' ' -f3,4)"
say "etc $(grep ' /etc ' /proc/mounts | cut -d' ' -f3)"
say "disk-mounts $(grep '^/dev/[vsn][drv]' /proc/mounts | grep -vc ' /run/initramfs/live ')"
say "firmware $([ -d /sys/firmware/efi ] && echo efi || echo bios)"
"#;

/// The image's own layout, as a Kairos image ships it (SPEC §3): a live boot must ignore its
/// COS_PERSISTENT volume.
const LAYOUT: &str = "VOLUMES=\"LABEL=COS_PERSISTENT:/usr/local\"\nOVERLAY=\"tmpfs:25%\"\nRW_PATHS=\"/var /etc /srv\"\nPERSISTENT_STATE_PATHS=\"/etc/ssh /home /root /var/log\"\n";

fn iso() -> PathBuf {
    static ISO: OnceLock<PathBuf> = OnceLock::new();
    ISO.get_or_init(|| {
        let tree = live_source_tree("iso-live", |s| {
            s.image_files.push((
                "/oem/kairos-test-extra.sh".into(),
                SCENARIO.as_bytes().to_vec(),
                0o644,
            ));
            s.layout_file = Some(LAYOUT.into());
        });
        let iso = build_iso("iso-live", &tree, Some(CONFIG), &["--grub-timeout", "0"]);
        let _ = std::fs::remove_dir_all(&tree);
        iso
    })
    .clone()
}

fn live_boot(medium: Medium, firmware: Firmware) {
    if !can_run() {
        return;
    }
    let iso = iso();
    let name = format!("iso-{medium:?}-{}", firmware.name()).to_lowercase();
    let spec = live_boot_spec(&name, &iso, medium, firmware, &[], &[], 400);
    let r = kairos_qemu::boot::run(&spec).unwrap_or_else(|e| panic!("booting {name}: {e}"));
    println!(
        "---- serial log of {name} ({:.1} s) ----\n{}",
        r.elapsed.as_secs_f64(),
        r.log
    );
    let lines = driver_lines(&r.log);
    assert!(
        r.log.contains("KAIROS-GRUB: entry=live"),
        "GRUB from the medium did not boot the live entry"
    );
    assert!(r.log.contains("starting: mode=live"), "not a live boot");
    assert!(
        lines.iter().any(|l| l == "driver done"),
        "the live system did not run the driver: {:?}",
        r.exit
    );
    let v = |k: &str| driver_value(&r.log, k).unwrap_or_default();
    assert_eq!(v("live_mode"), "yes");
    assert!(v("medium").contains("iso9660 ro"), "{}", v("medium"));
    assert_eq!(v("medium-config"), "600 root");
    assert!(v("root").starts_with("squashfs ro"), "{}", v("root"));
    assert_eq!(v("etc"), "overlay");
    assert_eq!(v("disk-mounts"), "0");
    let fw = match firmware {
        Firmware::SeaBios => "bios",
        Firmware::Ovmf => "efi",
    };
    assert_eq!(v("firmware"), fw);
    assert!(v("state").contains("\"mode\":\"live\""), "{}", v("state"));
    assert!(
        lines.iter().any(|l| l == "boot-stage-ok"),
        "the agent's boot stage did not finish"
    );
    assert!(
        r.log
            .contains("the layout's VOLUMES (LABEL=COS_PERSISTENT:/usr/local) are not mounted"),
        "the live boot did not say why COS_PERSISTENT is left alone"
    );
    assert!(
        matches!(r.exit, BootExit::Exited(_)),
        "the live system did not power off: {:?}",
        r.exit
    );
    let up = v("uptime");
    println!(
        "FIGURE iso live boot {medium:?} {}: power-on to power-off {:.1} s wall (driver done at guest uptime {up} s)",
        firmware.name(),
        r.elapsed.as_secs_f64()
    );
    assert!(r.log.contains(DRIVER_DONE));
}

#[test]
fn live_boots_from_cd_under_seabios() {
    live_boot(Medium::Cd, Firmware::SeaBios);
}

#[test]
fn live_boots_from_cd_under_ovmf() {
    live_boot(Medium::Cd, Firmware::Ovmf);
}

#[test]
fn live_boots_from_usb_under_seabios() {
    live_boot(Medium::Usb, Firmware::SeaBios);
}

#[test]
fn live_boots_from_usb_under_ovmf() {
    live_boot(Medium::Usb, Firmware::Ovmf);
}
