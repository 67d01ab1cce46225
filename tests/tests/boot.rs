//! QEMU boot tests of the early-boot path: a real Debian kernel, our initramfs, real GRUB,
//! real loop devices, overlayfs and squashfs. Every assertion reads the serial log.

use kairos_qemu::disk::ImageState;
use kairos_tests::*;

#[test]
fn grub_boots_active_read_only() {
    require_root();
    let d = disk("grub-active", |_| {});
    let r = boot_grub("grub-active", &d, &[DONE]);
    assert_active_read_only(&r, "initramfs stage");
}

#[test]
fn overlay_is_ephemeral_and_persistent_survives_reboot() {
    require_root();
    let d = disk("persist", |_| {});
    let first = boot_direct("persist-1", &d, ACTIVE, &[DONE]);
    assert_has(&first, "KAIROS-TEST: absent /etc/kairos-test-overlay");
    assert_has(&first, "KAIROS-TEST: absent /usr/local/kairos-test-persist");
    assert_has(&first, "KAIROS-TEST: wrote test files");
    let second = boot_direct("persist-2", &d, ACTIVE, &[DONE]);
    // /etc is a tmpfs overlay: gone. /usr/local is COS_PERSISTENT, /etc/ssh and /var/log are
    // persistent state paths bound from it: kept.
    assert_has(&second, "KAIROS-TEST: absent /etc/kairos-test-overlay");
    assert_has(
        &second,
        "KAIROS-TEST: present /usr/local/kairos-test-persist",
    );
    assert_has(&second, "KAIROS-TEST: present /etc/ssh/kairos-test-state");
    assert_has(&second, "KAIROS-TEST: present /var/log/kairos-test-state");
    assert_has(&second, "KAIROS-TEST: root=ro");
}

#[test]
fn missing_active_falls_back_to_passive_in_the_same_boot() {
    require_root();
    let d = disk("no-active", |s| s.active = ImageState::Missing);
    let r = boot_direct("no-active", &d, ACTIVE, &[DONE]);
    assert_has(
        &r,
        "skipping active image /cOS/active.img on LABEL=COS_STATE: /cOS/active.img does not exist",
    );
    assert_has(&r, "falling back to passive image /cOS/passive.img");
    assert_has(&r, "KAIROS-TEST: hello from image=passive");
    assert_has(&r, "KAIROS-TEST: mode=passive");
    assert_has(&r, "KAIROS-TEST: root=ro");
}

#[test]
fn broken_active_and_passive_fall_back_to_recovery_squashfs() {
    require_root();
    let d = disk("broken-ab", |s| {
        s.active = ImageState::Zeros;
        s.passive = ImageState::Truncated;
    });
    let r = boot_direct("broken-ab", &d, ACTIVE, &[DONE]);
    assert_has(
        &r,
        "skipping active image /cOS/active.img on LABEL=COS_STATE: /cOS/active.img holds no known filesystem",
    );
    assert_has(
        &r,
        "skipping passive image /cOS/passive.img on LABEL=COS_STATE:",
    );
    assert_has(&r, "KAIROS-TEST: hello from image=recovery");
    assert_has(&r, "KAIROS-TEST: mode=recovery");
    assert_has(&r, "KAIROS-TEST: mount / squashfs ro");
    assert_has(&r, "KAIROS-TEST: root=ro");
}

#[test]
fn nothing_bootable_says_why_on_the_console_and_reboots() {
    require_root();
    let d = disk("nothing", |s| {
        s.active = ImageState::Missing;
        s.passive = ImageState::Zeros;
        s.recovery = ImageState::Missing;
    });
    let r = boot_direct("nothing", &d, ACTIVE, &["reboot: Restarting system"]);
    assert_has(&r, "kairos-init: FATAL: no bootable image. Tried:");
    assert_has(
        &r,
        "active image /cOS/active.img on LABEL=COS_STATE: /cOS/active.img does not exist",
    );
    assert_has(&r, "rebooting in 2 s");
    assert_has(&r, "reboot: Restarting system");
    assert_lacks(&r, "Kernel panic");
    assert_lacks(&r, "KAIROS-TEST: hello");
}

/// Also, on two CPUs with the agent in the image and one config with an `initramfs` stage
/// only, the timeline (/run/kairos/boot-timeline.json) shows the `rootfs` stage skipped without
/// running the agent, the `initramfs` stage run, and modules loaded two at once (child processes);
/// squashfs, which an active boot does not mount, is not loaded.
#[test]
fn missing_persistent_partition_boots_on_tmpfs_with_a_warning() {
    require_root();
    let agent = agent_userland();
    let d = disk("no-persistent", |s| {
        s.persistent = false;
        s.agent = Some(agent);
        s.oem_files.push((
            "90_initramfs.yaml".into(),
            b"#cloud-config\nstages:\n  initramfs:\n    - commands:\n        - echo ran > /run/kairos-test-initramfs-stage\n"
                .to_vec(),
        ));
        s.oem_files.push((
            "kairos-test-hook.sh".into(),
            b"echo \"KAIROS-TEST: initramfs stage $(cat /run/kairos-test-initramfs-stage)\"\necho \"KAIROS-TEST: timeline $(cat /run/kairos/boot-timeline.json)\"\n"
                .to_vec(),
        ));
    });
    let a = artifacts();
    let mut s = kairos_qemu::boot::BootSpec::new(a.work.join("no-persistent.log"));
    s.disks = vec![d.clone()];
    s.kernel = Some(a.kernel.vmlinuz.clone());
    s.initrd = Some(a.initramfs.clone());
    s.append = Some(format!("{BASE_CMDLINE} {ACTIVE}"));
    s.kvm = std::env::var_os("KAIROS_KVM").is_some();
    s.until = vec![DONE.to_string()];
    s.timeout = std::time::Duration::from_secs(180);
    s.extra_args = vec!["-smp".into(), "2".into()];
    let r = kairos_qemu::boot::run(&s).unwrap_or_else(|e| panic!("booting no-persistent: {e}"));
    println!("---- serial log of no-persistent ----\n{}", r.log);
    assert_has(
        &r,
        "COS_PERSISTENT not found: /usr/local and the persistent state paths are tmpfs",
    );
    assert_has(&r, "KAIROS-TEST: hello from image=active");
    assert_has(&r, "KAIROS-TEST: mount /usr/local tmpfs rw");
    assert_has(&r, "KAIROS-TEST: wrote test files");

    assert_has(
        &r,
        "kairos-init: stage rootfs: skipped (no config names it: scanned 1 files)",
    );
    assert_has(
        &r,
        "kairos-init: stage initramfs: running it: /oem/90_initramfs.yaml names the stage",
    );
    assert_has(&r, "KAIROS-TEST: initramfs stage ran");
    assert_lacks(&r, "kairos-init: loaded module squashfs");
    let line = r
        .log
        .lines()
        .find_map(|l| l.split("KAIROS-TEST: timeline ").nth(1))
        .expect("the hook printed the timeline");
    let t: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("timeline is not JSON ({e}): {line}"));
    let steps = t["steps"].as_array().expect("timeline steps");
    let child = |parent: &str, prefix: &str| {
        steps.iter().any(|x| {
            x["parent"] == parent && x["name"].as_str().is_some_and(|n| n.starts_with(prefix))
        })
    };
    assert!(
        child(
            "stage rootfs",
            "skipped: no config names it (1 files scanned)"
        ),
        "{t:#}"
    );
    assert!(
        child(
            "stage initramfs",
            "config scan: /oem/90_initramfs.yaml names the stage"
        ),
        "{t:#}"
    );
    // The modules step's rounds ran on both CPUs, and two loads overlapped in time.
    let rounds: Vec<&str> = steps
        .iter()
        .filter(|x| x["parent"] == "modules")
        .filter_map(|x| x["name"].as_str())
        .filter(|n| n.starts_with("load round "))
        .collect();
    assert!(
        rounds.iter().any(|n| n.ends_with(", at most 2 at once")),
        "{rounds:?}"
    );
    let loads: Vec<(f64, f64)> = steps
        .iter()
        .filter(|x| x["name"].as_str().is_some_and(|n| n.starts_with("insmod ")))
        .filter_map(|x| {
            let start = x["start_ms"].as_f64()?;
            Some((start, start + x["duration_ms"].as_f64()?))
        })
        .collect();
    let overlap = loads
        .iter()
        .enumerate()
        .any(|(i, a)| loads[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1));
    assert!(overlap, "no two module loads overlapped: {loads:?}");
}

#[test]
fn garbage_on_the_command_line_gives_named_warnings_and_still_boots() {
    require_root();
    let d = disk("garbage", |_| {});
    let garbage = concat!(
        "rd.kairos.timeout=abc rd.cos.oemtimeout=-1 rd.cos.overlay=bogus:1 cos-img/filename=relative.img ",
        "rd.kairos.init=sbin/init rd.cos.mount=LABEL=X rd.kairos.rebootdelay=99999999999999999999 ",
        "=== ==x x== \"unterminated quote ",
    );
    // The kernel itself takes the first unknown `=`-less words as init arguments; keep the
    // active parameters first so the garbage cannot swallow them.
    let r = boot_direct("garbage", &d, &format!("{ACTIVE} {garbage}"), &[DONE]);
    for p in [
        "rd.kairos.timeout",
        "rd.cos.oemtimeout",
        "rd.cos.overlay",
        "cos-img/filename",
        "rd.kairos.init",
        "rd.cos.mount",
    ] {
        assert_has(&r, &format!("kairos-init: kernel parameter `{p}`"));
    }
    assert_has(&r, "KAIROS-TEST: hello from image=active");
    assert_has(&r, "KAIROS-TEST: root=ro");
}

#[test]
fn recovery_entry_boots_the_squashfs() {
    require_root();
    let d = disk("recovery", |_| {});
    let r = boot_direct("recovery", &d, RECOVERY, &[DONE]);
    assert_has(&r, "starting: mode=recovery");
    assert_has(&r, "KAIROS-TEST: hello from image=recovery");
    assert_has(&r, "KAIROS-TEST: mode=recovery");
    assert_has(&r, "KAIROS-TEST: mount / squashfs ro");
    // Recovery has overlays only: /usr/local is not COS_PERSISTENT there.
    assert_lacks(&r, "KAIROS-TEST: mount /usr/local ext4");
}

#[test]
fn static_init_and_small_initramfs() {
    require_root();
    let a = artifacts();
    let out = std::process::Command::new("file")
        .arg(&a.init_binary)
        .output()
        .expect("file(1)");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        text.contains("statically linked") || text.contains("static-pie linked"),
        "{text}"
    );
    let init = std::fs::metadata(&a.init_binary)
        .expect("kairos-init")
        .len();
    let initrd = std::fs::metadata(&a.initramfs).expect("initramfs").len();
    println!("FIGURE kairos-init {init} bytes, initramfs {initrd} bytes");
    // 1.52 MB since the first-boot grow of COS_PERSISTENT (GPT planner, ext4 superblock).
    assert!(init < 1_600_000, "kairos-init is {init} bytes");
    assert!(initrd < 3_000_000, "initramfs is {initrd} bytes");
}

/// One initramfs for every disk controller: the drivers come from matching sysfs modaliases
/// against the modules' aliases, not from a list per machine. The `pc` machine's IDE
/// controller is always there: its drivers are held back while the disk is looked for on the
/// others, not loaded at all when it is found there (SATA, NVMe), and loaded after the grace
/// when the disk is on it.
#[test]
fn same_initramfs_boots_from_sata_nvme_and_ide() {
    require_root();
    let d = disk("buses", |_| {});
    for (bus, driver, dev) in [
        (Bus::Sata, "ahci", "/dev/sda4"),
        (Bus::Nvme, "nvme", "/dev/nvme0n1p4"),
        (Bus::Ide, "ata_piix", "/dev/sda4"),
    ] {
        let name = format!("bus-{driver}");
        let r = boot_direct_on(&name, &d, bus, ACTIVE, &[DONE]);
        assert_has(&r, &format!("kairos-init: loaded module {driver} "));
        if bus == Bus::Ide {
            assert_has(
                &r,
                "kairos-init: loading the IDE controller drivers held back (",
            );
            assert_has(&r, " not found, and no new device for 500 ms");
        } else {
            assert_lacks(&r, "kairos-init: loaded module ata_piix ");
        }
        assert_has(&r, &format!("mounted LABEL=COS_STATE ({dev}) read-only"));
        assert_has(&r, "KAIROS-TEST: hello from image=active");
        assert_has(&r, "KAIROS-TEST: root=ro");
    }
}

/// The generic initramfs (kairos-build's module set) finds its root on USB storage behind an
/// xHCI controller, with the whole chain of a real node: SeaBIOS boots GRUB from the USB disk,
/// GRUB the kernel. kairos-init loads xhci_pci for the controller, usb_storage for the device
/// that enumerates after it, sd_mod for the SCSI disk usb_storage then creates.
#[test]
fn generic_initramfs_boots_from_usb_through_grub() {
    require_root();
    let initrd = generic_initramfs();
    let d = disk("usb", |s| s.initramfs = initrd.to_path_buf());
    let hello = "KAIROS-TEST: hello from image=active";
    let r = boot_on("usb", &d, Bus::Usb, None, &[hello]);
    assert_has(&r, "starting: mode=active image=/cOS/active.img reason=cos");
    for m in ["xhci_pci", "usb_storage", "sd_mod"] {
        assert_has(&r, &format!("kairos-init: loaded module {m} "));
    }
    assert_has(&r, "mounted LABEL=COS_STATE (/dev/sda4) read-only");
    assert_has(&r, hello);
    figure(&r, "USB (xhci, through GRUB)");
}

/// The same on an SD card behind sdhci-pci (kernel and initramfs given to QEMU: no firmware
/// here reads SD): sdhci_pci for the controller, mmc_block for the card it finds.
#[test]
fn generic_initramfs_boots_from_sd() {
    require_root();
    let initrd = generic_initramfs();
    let d = disk("sd", |_| {});
    grow_for_sd(&d);
    let hello = "KAIROS-TEST: hello from image=active";
    let r = boot_on("sd", &d, Bus::Sd, Some((initrd, ACTIVE)), &[hello]);
    for m in ["sdhci_pci", "mmc_block"] {
        assert_has(&r, &format!("kairos-init: loaded module {m} "));
    }
    assert_has(&r, "mounted LABEL=COS_STATE (/dev/mmcblk0p4) read-only");
    assert_has(&r, hello);
    figure(&r, "SD (sdhci-pci, direct kernel)");
}

/// Wall time and the kernel's timestamps of the init's start and switch_root.
fn figure(r: &kairos_qemu::boot::BootResult, what: &str) {
    let ts = |needle| kairos_qemu::boot::kmsg_time(&r.log, needle).unwrap_or(f64::NAN);
    println!(
        "FIGURE {what}: wall {:.1} s; kernel start -> kairos-init {:.3} s -> switch_root {:.3} s",
        r.elapsed.as_secs_f64(),
        ts("kairos-init: kairos-init"),
        ts("kairos-init: switch_root")
    );
}
