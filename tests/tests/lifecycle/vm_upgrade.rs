//! `kairos-agent upgrade` inside a booted VM (issue 6): from the local registry over the
//! guest's network, from an `ocifile:` archive with no network device at all, and cut off by
//! killing QEMU (a power cut: the guest's unwritten pages are lost) at the steps the issue
//! names. The images are the busybox test image with kairos-init as PID 1, the agent and the
//! in-VM driver; `/etc/kairos-version` says v1 in the installed images and v2 in the pushed
//! one, which is the installed active image with that one file changed. The guest gets
//! mkfs.ext4/e2label/tune2fs from the host (`DiskSpec::host_tools`), as a real image has
//! e2fsprogs, and the host's CA bundle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kairos_qemu::boot::{BootResult, BootSpec};
use kairos_qemu::disk::ImageState;
use kairos_tests::diskimg::Mounted;
use kairos_tests::hardening::{persistent_snapshot, seed_files};
use kairos_tests::registry::{self, Registry};
use kairos_tests::*;

const OLD: &str = "v1";
const NEW: &str = "v2";
const VERSION_FILE: &str = "/etc/kairos-version";
/// What the agent prints when `KAIROS_AGENT_CRASH_AT=pause:POINT` stops it.
const PAUSED: &str = "paused here";
/// The steps the issue names, as the agent's crash points. `pull` is the end of the pull
/// (every blob downloaded, nothing unpacked), `unpack` the end of unpacking.
const CUTS: &[&str] = &[
    "pull",
    "unpack",
    "between-renames",
    "after-rename-2-before-sync",
];

/// The network modules the image needs for a virtio NIC (the initramfs has disk drivers only).
fn net_modules() -> Vec<(String, Vec<u8>, u32)> {
    let dir = &artifacts().kernel.modules_dir;
    [
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
    ]
    .iter()
    .map(|rel| {
        let p = dir.join(rel);
        let name = p.file_name().expect("module name").to_string_lossy();
        let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (format!("/lib/modules/kt/{name}"), data, 0o644)
    })
    .collect()
}

/// The guest's side: bring up the NIC (slirp: the host is 10.0.2.2) and run the upgrade,
/// output straight to the console so a pause line reaches the serial log at once.
const NET_UP: &str =
    "for m in failover net_failover virtio_net; do insmod /lib/modules/kt/$m.ko; done
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
say \"net $(ip -4 addr show eth0 | grep -c 10.0.2.15)\"";

/// The driver extra: step 0 upgrades (from `source`, `crash_at` in the environment), step 1
/// (when `select_fallback`) arms a one-shot boot of the passive entry; every boot says its
/// version. The step counter lives on COS_PERSISTENT (/usr/local) and is synced before the
/// upgrade, so a power cut cannot roll it back.
fn scenario(source: &str, crash_at: Option<&str>, network: bool, select_fallback: bool) -> String {
    let env = crash_at.map_or(String::new(), |p| format!("KAIROS_AGENT_CRASH_AT={p} "));
    let net = if network { NET_UP } else { "" };
    let step1 = if select_fallback {
        "kairos-agent bootentry --select fallback >/dev/console 2>&1; say \"selected fallback $?\""
    } else {
        ":"
    };
    format!(
        r#"say "version $(cat {VERSION_FILE})"
m=/usr/local/kt-step
step=$(cat $m 2>/dev/null || echo 0)
say "step $step"
case $step in
0)
  echo 1 > $m; sync
  {net}
  {env}kairos-agent upgrade --allow-insecure-registries --source {source} --work-dir /tmp >/dev/console 2>&1
  say "upgrade-exit $?"
  ;;
1)
  echo 2 > $m; sync
  {step1}
  ;;
esac
"#
    )
}

fn vm_disk(name: &str, extra: &str, oem_files: Vec<(String, Vec<u8>)>) -> PathBuf {
    let oem = [("kairos-test-extra.sh", extra)];
    pid1_disk(name, &oem, |s| {
        s.passive = ImageState::Ok;
        s.image_files
            .push((VERSION_FILE.into(), format!("{OLD}\n").into_bytes(), 0o644));
        s.image_files.extend(net_modules());
        s.host_tools = [
            "/sbin/mkfs.ext4",
            "/sbin/e2label",
            "/sbin/tune2fs",
            "/etc/mke2fs.conf",
            // A real image has CA certificates; the HTTP client refuses to start without.
            "/etc/ssl/certs/ca-certificates.crt",
        ]
        .map(String::from)
        .to_vec();
        s.persistent_files = seed_files();
        // The agent checks for its conservative estimate (2.5x the compressed layers + 100
        // MiB) before pulling; the test disk's COS_STATE is otherwise sized to the byte.
        s.state_extra_mb = 128;
        s.oem_files.extend(oem_files);
    })
}

/// GRUB boot until the guest powers off, the agent pauses, or `timeout_s`.
fn boot_vm(name: &str, disk: &Path, network: bool, timeout_s: u64) -> BootResult {
    let a = artifacts();
    let mut s = BootSpec::new(a.work.join(format!("{name}.log")));
    s.disks = vec![disk.to_path_buf()];
    s.memory_mb = 768;
    s.kvm = std::env::var_os("KAIROS_KVM").is_some();
    s.until = vec![PAUSED.to_string()];
    s.timeout = std::time::Duration::from_secs(timeout_s);
    if network {
        s.extra_args = ["-nic", "user,model=virtio-net-pci"]
            .map(String::from)
            .to_vec();
    }
    let r = kairos_qemu::boot::run(&s).unwrap_or_else(|e| panic!("booting {name}: {e}"));
    println!(
        "---- serial log of {name} ({:.1} s) ----\n{}",
        r.elapsed.as_secs_f64(),
        r.log
    );
    r
}

fn said(r: &BootResult, key: &str) -> String {
    driver_value(&r.log, key).unwrap_or_else(|| panic!("the driver did not say {key:?}"))
}

fn state_of(r: &BootResult) -> serde_json::Value {
    let raw = said(r, "state");
    serde_json::from_str(raw.trim()).unwrap_or_else(|e| panic!("state is not JSON ({e}): {raw}"))
}

/// The installed active image's tree with `/etc/kairos-version` = v2: read from the disk on
/// the host (COS_STATE out of the GPT, active.img out of COS_STATE, both mounted read-only).
fn new_rootfs(disk: &Path, out: &Path) {
    let state = Mounted::part(disk, kairos_qemu::disk::part::STATE);
    let active = Mounted::new(&state.path("cOS/active.img"), None, false);
    std::fs::create_dir_all(out).expect("tree dir");
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", active.root().display()))
        .arg(out)
        .status()
        .expect("cp");
    drop(active);
    drop(state);
    assert!(st.success(), "copying the active image's tree");
    let _ = std::fs::remove_dir_all(out.join("lost+found"));
    std::fs::write(
        out.join(VERSION_FILE.trim_start_matches('/')),
        format!("{NEW}\n"),
    )
    .expect("version file");
}

/// The seeded user files on COS_PERSISTENT, unchanged: the agent and the scenario may add
/// files (history, step counter) but must not touch what was there.
fn assert_user_data_intact(before: &BTreeMap<String, String>, disk: &Path, when: &str) {
    let after = persistent_snapshot(disk);
    let seeded: Vec<&String> = before.keys().filter(|p| p.contains("important")).collect();
    assert!(!seeded.is_empty(), "no seeded files in {before:#?}");
    for p in seeded {
        assert_eq!(
            after.get(p),
            before.get(p),
            "{when}: COS_PERSISTENT:{p} changed"
        );
    }
}

fn version_and_mode(r: &BootResult) -> (String, String) {
    let v = said(r, "version").trim().to_string();
    let s = state_of(r);
    (v, s["mode"].as_str().unwrap_or("?").to_string())
}

#[test]
fn vm_upgrade_from_the_registry_then_active_is_new_and_passive_old() {
    require_root();
    let reg = Registry::start().expect("registry");
    let port = reg.addr.rsplit(':').next().expect("port").to_string();
    let source = format!("oci:10.0.2.2:{port}/kairos/os:{NEW}");
    let d = vm_disk("u-reg", &scenario(&source, None, true, true), Vec::new());
    let before = persistent_snapshot(&d);
    let t = tempfile::tempdir().expect("temp dir");
    let tree = t.path().join("rootfs");
    new_rootfs(&d, &tree);
    let img = reg.push_rootfs("kairos/os", NEW, &tree).expect("push");

    let r1 = boot_vm("u-reg-1", &d, true, 400);
    assert_has(&r1, DRIVER_DONE);
    assert_eq!(said(&r1, "net").trim(), "1", "the guest has no address");
    assert_eq!(said(&r1, "upgrade-exit").trim(), "0", "the upgrade failed");
    assert_eq!(version_and_mode(&r1), (OLD.into(), "active".into()));
    assert_has(&r1, &img.manifest_digest);

    // Next boot: the new image as active; it arms the passive entry for the boot after.
    let r2 = boot_vm("u-reg-2", &d, false, 300);
    assert_has(&r2, DRIVER_DONE);
    assert_eq!(version_and_mode(&r2), (NEW.into(), "active".into()));
    assert_eq!(said(&r2, "selected fallback").trim(), "0");
    let history = state_of(&r2).to_string();
    println!("state after the upgrade: {history}");

    // And the one after: passive holds the previous image.
    let r3 = boot_vm("u-reg-3", &d, false, 300);
    assert_has(&r3, DRIVER_DONE);
    assert_eq!(version_and_mode(&r3), (OLD.into(), "passive".into()));
    assert_user_data_intact(&before, &d, "after the upgrade");
}

#[test]
fn vm_upgrade_air_gapped_from_an_ocifile_archive() {
    require_root();
    let t = tempfile::tempdir().expect("temp dir");
    // The archive is made from the disk it goes on, so build the disk twice: once to read the
    // image from, once with the archive on COS_OEM.
    let probe = vm_disk("u-gap-src", "", Vec::new());
    let tree = t.path().join("rootfs");
    new_rootfs(&probe, &tree);
    let _ = std::fs::remove_file(&probe);
    let img = registry::image_from_rootfs(&tree).expect("image");
    let archive = t.path().join("os.tar");
    registry::write_oci_archive(&img, &archive).expect("archive");
    let bytes = std::fs::read(&archive).expect("archive");
    println!("OCI archive: {} bytes", bytes.len());
    let source = "ocifile:/oem/kt-os.tar";
    let d = vm_disk(
        "u-gap",
        &scenario(source, None, false, false),
        vec![("kt-os.tar".into(), bytes)],
    );
    // No NIC at all: QEMU runs with `-nic none`.
    let r1 = boot_vm("u-gap-1", &d, false, 400);
    assert_has(&r1, DRIVER_DONE);
    assert_lacks(&r1, "virtio_net");
    assert_eq!(said(&r1, "upgrade-exit").trim(), "0", "the upgrade failed");
    assert_has(&r1, &img.manifest_digest);
    let r2 = boot_vm("u-gap-2", &d, false, 300);
    assert_has(&r2, DRIVER_DONE);
    assert_eq!(version_and_mode(&r2), (NEW.into(), "active".into()));
}

/// Power cuts: QEMU is killed the moment the agent reaches each step (it pauses there and
/// says so); the next boot must reach an image (old or new) and the user data must be intact.
#[test]
fn vm_power_cut_at_each_upgrade_step_leaves_a_bootable_system() {
    require_root();
    let reg = Registry::start().expect("registry");
    let port = reg.addr.rsplit(':').next().expect("port").to_string();
    let source = format!("oci:10.0.2.2:{port}/kairos/os:{NEW}");
    let work = artifacts().work.join("u-cut");
    std::fs::create_dir_all(&work).expect("work dir");
    let mut pushed = false;
    let mut results = Vec::new();
    for cut in CUTS {
        let extra = scenario(&source, Some(&format!("pause:{cut}")), true, false);
        let d = vm_disk(&format!("u-cut-{cut}"), &extra, Vec::new());
        if !pushed {
            let tree = work.join("rootfs");
            let _ = std::fs::remove_dir_all(&tree);
            new_rootfs(&d, &tree);
            reg.push_rootfs("kairos/os", NEW, &tree).expect("push");
            pushed = true;
        }
        let before = persistent_snapshot(&d);
        let r1 = boot_vm(&format!("u-cut-{cut}-1"), &d, true, 400);
        assert!(
            r1.log.contains(&format!("pause:{cut}: {PAUSED}")),
            "the agent never reached {cut}"
        );
        assert_lacks(&r1, DRIVER_DONE);
        assert_user_data_intact(&before, &d, &format!("right after the cut at {cut}"));
        let r2 = boot_vm(&format!("u-cut-{cut}-2"), &d, false, 300);
        assert_has(&r2, DRIVER_DONE);
        let (v, mode) = version_and_mode(&r2);
        assert!(
            (v == OLD || v == NEW) && (mode == "active" || mode == "passive"),
            "cut at {cut}: booted {v} from {mode}"
        );
        assert_user_data_intact(&before, &d, &format!("after the boot that followed {cut}"));
        println!("power cut at {cut}: the next boot ran {v} from {mode}; user data intact");
        results.push(format!("{cut}: {v} from {mode}"));
        let _ = std::fs::remove_file(&d);
    }
    println!("every cut point tried, all survived: {results:#?}");
    assert_eq!(results.len(), CUTS.len());
}

/// The driver extra of the GRUB-visibility test: each boot says which `/boot` GRUB loaded
/// (the initrd's size, as the kernel frees it), which rootfs it mounted (the version file) and
/// why GRUB chose the entry; step 0 upgrades (the new image has different kernel and initrd
/// files), step 1 arms a one-shot boot of the fallback entry. Each command is followed a
/// second later by a power cut with no sync (sysrq `b`: an immediate reset), so only what
/// the agent made final before it returned survives the way GRUB reads it.
const CUT_AFTER_SUCCESS: &str = r#"say "version $(cat /etc/kairos-version)"
say "initrd $(dmesg | sed -n 's/.*Freeing initrd memory: \([0-9]*\)K.*/\1/p' | head -n1)"
say "reason $(tr ' ' '\n' < /proc/cmdline | sed -n 's/^rd.kairos.boot_reason=//p')"
m=/usr/local/kt-step
step=$(cat $m 2>/dev/null || echo 0)
say "step $step"
case $step in
0)
  echo 1 > $m; sync
  kairos-agent upgrade --source ocifile:/oem/kt-os.tar --work-dir /tmp >/dev/console 2>&1
  say "upgrade-exit $?"
  sleep 1; echo b > /proc/sysrq-trigger; sleep 30
  ;;
1)
  echo 2 > $m; sync
  kairos-agent bootentry --select fallback >/dev/console 2>&1
  say "selected fallback $?"
  sleep 1; echo b > /proc/sysrq-trigger; sleep 30
  ;;
esac
"#;

/// Bytes appended to the new image's `/boot/initrd` (zeros: the kernel skips them as
/// padding between archives) so the kernel reports a different initrd size.
const INITRD_GROWTH: usize = 2 << 20;

/// Issue 15 item 3: COS_OEM and COS_STATE are journaled ext4 and GRUB does not replay the
/// journal. A power cut one second after `upgrade` (new kernel and initrd files) and after
/// `bootentry --select fallback` returned: GRUB must boot what the agent reported, and the
/// `/boot` it loaded must come from the image kairos-init mounts as the root. Before the
/// journal checkpoint the grubenv written before the cut existed only in the journal: GRUB
/// booted active uncounted after the upgrade and active instead of fallback after the select.
#[test]
fn vm_power_cut_a_second_after_success_grub_kernel_and_root_agree() {
    require_root();
    let t = tempfile::tempdir().expect("temp dir");
    let probe = vm_disk("u-final-src", "", Vec::new());
    let tree = t.path().join("rootfs");
    new_rootfs(&probe, &tree);
    let _ = std::fs::remove_file(&probe);
    for (f, extra) in [("boot/vmlinuz", 4096), ("boot/initrd", INITRD_GROWTH)] {
        let p = tree.join(f);
        let mut bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        bytes.resize(bytes.len() + extra, 0);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let img = registry::image_from_rootfs(&tree).expect("image");
    let archive = t.path().join("os.tar");
    registry::write_oci_archive(&img, &archive).expect("archive");
    let bytes = std::fs::read(&archive).expect("archive");
    let d = vm_disk(
        "u-final",
        CUT_AFTER_SUCCESS,
        vec![("kt-os.tar".into(), bytes)],
    );
    let started = std::time::Instant::now();
    let initrd_k = |r: &BootResult| -> u64 {
        said(r, "initrd")
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("initrd size: {e}"))
    };

    let r1 = boot_vm("u-final-1", &d, false, 400);
    assert_eq!(said(&r1, "step").trim(), "0");
    assert_eq!(said(&r1, "upgrade-exit").trim(), "0", "the upgrade failed");
    assert_lacks(&r1, DRIVER_DONE);
    let old_k = initrd_k(&r1);

    // After the cut: the armed counters (a counted try of cos), the new image's /boot and the
    // new image as the root.
    let r2 = boot_vm("u-final-2", &d, false, 300);
    assert_eq!(said(&r2, "step").trim(), "1");
    let (v2, k2) = (said(&r2, "version").trim().to_string(), initrd_k(&r2));
    println!("after the upgrade and the cut: rootfs {v2}, initrd {k2} KiB (old {old_k} KiB)");
    assert_eq!(
        said(&r2, "reason").trim(),
        "cos:counted-try",
        "GRUB did not see the armed counters"
    );
    assert_eq!(v2, NEW, "GRUB booted the old image");
    assert!(
        k2 >= old_k + (INITRD_GROWTH as u64 >> 10) - 4,
        "the kernel and initrd came from the old image ({k2} KiB), the root from the new one"
    );
    assert_eq!(said(&r2, "selected fallback").trim(), "0");

    // After the second cut: the one-shot fallback, i.e. the old image, whole.
    let r3 = boot_vm("u-final-3", &d, false, 300);
    assert_has(&r3, DRIVER_DONE);
    let (v3, k3) = (said(&r3, "version").trim().to_string(), initrd_k(&r3));
    println!("after the select and the cut: rootfs {v3}, initrd {k3} KiB");
    assert_eq!(
        said(&r3, "reason").trim(),
        "fallback:next_entry",
        "GRUB did not see the selection"
    );
    assert_eq!((v3.as_str(), k3), (OLD, old_k), "kernel and root disagree");
    let (_, mode) = version_and_mode(&r3);
    assert_eq!(mode, "passive");
    println!(
        "vm_power_cut_a_second_after_success: {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
