//! Boot assessment through GRUB (issue 3), proven with real reboots: each test is one QEMU run
//! in which a guest reboot resets the machine, so every boot goes firmware -> GRUB (reading and
//! saving COS_OEM:/grubenv) -> kernel -> kairos-init -> the image's init, which fails on purpose
//! or marks the boot good with kairos-agent, driven by flag files on COS_OEM (see
//! `kairos_qemu::rootfs::INIT_SCRIPT`). Every assertion reads the serial log, cut into boots at
//! GRUB's `KAIROS-GRUB: start` line, or the grubenv read back from the disk image.
//!
//! `KAIROS_TEST_WITHOUT_AGENT=1` runs the GRUB side alone (no kairos-agent in the images).

use kairos_qemu::boot::BootExit;
use kairos_qemu::disk::part;
use kairos_tests::*;

/// Wall-clock budget per boot under TCG (one boot takes about 8 s).
const PER_BOOT: u64 = 60;

/// A layout that leaves COS_PERSISTENT unmounted, so the test image's own init writes nothing
/// there and any change to the partition's bytes would come from GRUB or the agent.
const NO_PERSISTENT_LAYOUT: &str = "VOLUMES=\"\"\nPERSISTENT_STATE_PATHS=\"\"\n";

fn flag(name: &str) -> (String, Vec<u8>) {
    (name.to_string(), Vec::new())
}

/// Good boots reboot this many times before the last one powers off.
fn reboots(n: u32) -> (String, Vec<u8>) {
    (
        "kairos-test-reboots".to_string(),
        n.to_string().into_bytes(),
    )
}

fn set(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

/// What each `kairos-agent ARGS` printed in a boot, in order (the init prefixes each line with
/// `KAIROS-TEST: ` and ends with `KAIROS-TEST: kairos-agent ARGS exit=N`).
fn agent_outputs(boot: &str, args: &str) -> Vec<String> {
    let lines: Vec<&str> = boot
        .lines()
        .filter_map(|l| l.find("KAIROS-TEST: ").map(|at| &l[at + 13..]))
        .collect();
    let end_prefix = format!("kairos-agent {args} exit=");
    let mut runs = Vec::new();
    let mut start = 0;
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("kairos-agent ") && l.contains(" exit=") {
            if l.starts_with(&end_prefix) {
                let mut out = lines[start..=i].join("\n");
                out.push('\n');
                runs.push(out);
            }
            start = i + 1;
        }
    }
    runs
}

/// The last run of `kairos-agent ARGS` in a boot.
fn agent_output(boot: &str, args: &str) -> Option<String> {
    agent_outputs(boot, args).pop()
}

fn assert_agent_said(boots: &[String], i: usize, args: &str, needle: &str) {
    let out = agent_output(&boots[i], args).unwrap_or_else(|| {
        panic!(
            "boot {i}: no `kairos-agent {args}` run; boot log:\n{}",
            boots[i]
        )
    });
    assert!(
        out.contains(needle),
        "boot {i}: `kairos-agent {args}` did not say {needle:?}:\n{out}"
    );
}

fn assert_agent_silent_on(boots: &[String], i: usize, args: &str, needle: &str) {
    let out = agent_output(&boots[i], args).unwrap_or_else(|| {
        panic!(
            "boot {i}: no `kairos-agent {args}` run; boot log:\n{}",
            boots[i]
        )
    });
    assert!(
        !out.contains(needle),
        "boot {i}: `kairos-agent {args}` unexpectedly said {needle:?}:\n{out}"
    );
}

fn assert_powered_off(r: &kairos_qemu::boot::BootResult) {
    assert!(
        matches!(r.exit, BootExit::Exited(_)),
        "the guest did not power off by itself ({:?}); tail:\n{}",
        r.exit,
        r.tail(30)
    );
}

fn figure(name: &str, r: &kairos_qemu::boot::BootResult, n: usize) {
    println!(
        "FIGURE {name}: {n} boots through GRUB in {:.1} s wall ({:.1} s per boot)",
        r.elapsed.as_secs_f64(),
        r.elapsed.as_secs_f64() / n as f64
    );
}

/// A good boot of active under assessment marks it good: the counter GRUB counted down is
/// reset to kairos_max_tries, so the next boot is active again, counted from the top.
#[test]
fn good_boot_of_active_resets_its_counter_and_active_boots_next() {
    require_root();
    let agent = agent();
    let with_agent = agent.is_some();
    let d = disk("ga-good", |s| {
        s.grubenv = armed(3);
        s.agent = agent;
        s.oem_files.push(reboots(1));
    });
    let r = boot_grub_rebooting("ga-good", &d, 2 * PER_BOOT);
    let b = boots(&r.log);
    assert_eq!(b.len(), 2, "expected 2 boots; log tail:\n{}", r.tail(40));
    for i in 0..2 {
        assert_boot_has(&b, i, "KAIROS-GRUB: chose cos:counted-try");
        assert_boot_has(&b, i, "KAIROS-GRUB: entry=cos reason=counted-try");
        assert_boot_has(
            &b,
            i,
            "starting: mode=active image=/cOS/active.img reason=cos:counted-try",
        );
        assert_boot_has(&b, i, "KAIROS-TEST: hello from image=active");
        assert_boot_has(&b, i, DONE);
    }
    assert_boot_has(&b, 0, "KAIROS-GRUB: tries cos=2 fallback=3 tentative=yes");
    assert_boot_has(&b, 0, "KAIROS-TEST: rebooting, 0 more after this");
    assert_powered_off(&r);
    let env = grubenv_on_disk(&d);
    assert_eq!(env.len(), 1024);
    assert!(grub_editenv_accepts(&env));
    assert_eq!(
        grubenv_get(&env, "kairos_boot_entry").as_deref(),
        Some("cos")
    );
    if with_agent {
        for i in 0..2 {
            assert_agent_said(
                &b,
                i,
                "mark-good",
                "kairos-agent: boot marked good (entry=cos, tries reset to 3)",
            );
            assert_boot_has(&b, i, "KAIROS-TEST: kairos-agent mark-good exit=0");
        }
        // GRUB counted down from the reset value again (3 -> 2), not on from 2.
        assert_boot_has(&b, 1, "KAIROS-GRUB: tries cos=2 fallback=3 tentative=yes");
        assert_eq!(grubenv_get(&env, "kairos_tries_cos").as_deref(), Some("3"));
        assert_ne!(
            grubenv_get(&env, "boot_assessment_tentative").as_deref(),
            Some("yes"),
            "tentative not cleared"
        );
    } else {
        assert_boot_has(&b, 1, "KAIROS-GRUB: tries cos=1 fallback=3 tentative=yes");
    }
    figure("good boot, then active again", &r, b.len());
}

/// Active fails on every boot (its init reboots before marking good): GRUB gives it exactly
/// N = 2 counted tries, then boots passive, and says why all the way to `kairos-agent state`.
#[test]
fn failing_active_falls_back_to_passive_after_exactly_n_tries() {
    require_root();
    let agent = agent();
    let with_agent = agent.is_some();
    let d = disk("ga-fail-active", |s| {
        s.grubenv = armed(2);
        s.agent = agent;
        s.oem_files.push(flag("kairos-test-fail-active"));
    });
    let r = boot_grub_rebooting("ga-fail-active", &d, 3 * PER_BOOT);
    let b = boots(&r.log);
    assert_eq!(b.len(), 3, "expected 3 boots; log tail:\n{}", r.tail(40));
    assert_eq!(
        r.log.matches("KAIROS-TEST: failing on purpose").count(),
        2,
        "active must get exactly 2 tries"
    );
    for (i, left) in [(0, 1), (1, 0)] {
        assert_boot_has(&b, i, "KAIROS-GRUB: chose cos:counted-try");
        assert_boot_has(
            &b,
            i,
            &format!("KAIROS-GRUB: tries cos={left} fallback=2 tentative=yes"),
        );
        assert_boot_has(&b, i, "reason=cos:counted-try");
        assert_boot_has(&b, i, "KAIROS-TEST: hello from image=active");
        assert_boot_has(&b, i, "KAIROS-TEST: failing on purpose");
        assert_boot_lacks(&b, i, DONE);
        assert_boot_lacks(&b, i, "kairos-agent mark-good");
    }
    assert_boot_has(&b, 2, "KAIROS-GRUB: chose fallback:cos-tries-exhausted");
    assert_boot_has(&b, 2, "KAIROS-GRUB: tries cos=0 fallback=1 tentative=yes");
    assert_boot_has(
        &b,
        2,
        "KAIROS-GRUB: entry=fallback reason=cos-tries-exhausted",
    );
    assert_boot_has(
        &b,
        2,
        "starting: mode=passive image=/cOS/passive.img reason=fallback:cos-tries-exhausted",
    );
    assert_boot_has(&b, 2, "KAIROS-TEST: hello from image=passive");
    assert_boot_has(&b, 2, "KAIROS-TEST: mode=passive");
    assert_boot_has(&b, 2, DONE);
    assert_powered_off(&r);
    let env = grubenv_on_disk(&d);
    assert_eq!(grubenv_get(&env, "kairos_tries_cos").as_deref(), Some("0"));
    assert_eq!(
        grubenv_get(&env, "kairos_boot_reason").as_deref(),
        Some("cos-tries-exhausted")
    );
    if with_agent {
        assert_agent_said(&b, 2, "state", "fallback:cos-tries-exhausted");
        assert_agent_said(
            &b,
            2,
            "mark-good",
            "kairos-agent: boot marked good (entry=fallback, tries reset to 2)",
        );
        // Only the booted entry's counter is reset: active stays spent.
        assert_eq!(
            grubenv_get(&env, "kairos_tries_fallback").as_deref(),
            Some("2")
        );
    } else {
        assert_eq!(
            grubenv_get(&env, "kairos_tries_fallback").as_deref(),
            Some("1")
        );
    }
    figure("active failing, passive after 2 tries", &r, b.len());
}

/// Active and passive both fail: once both have spent their tries GRUB boots recovery.
#[test]
fn failing_active_and_passive_boot_recovery() {
    require_root();
    let agent = agent();
    let with_agent = agent.is_some();
    let d = disk("ga-fail-both", |s| {
        s.grubenv = armed(1);
        s.agent = agent;
        s.oem_files.push(flag("kairos-test-fail-active"));
        s.oem_files.push(flag("kairos-test-fail-passive"));
    });
    let r = boot_grub_rebooting("ga-fail-both", &d, 3 * PER_BOOT);
    let b = boots(&r.log);
    assert_eq!(b.len(), 3, "expected 3 boots; log tail:\n{}", r.tail(40));
    assert_boot_has(&b, 0, "KAIROS-GRUB: chose cos:counted-try");
    assert_boot_has(&b, 0, "KAIROS-TEST: hello from image=active");
    assert_boot_has(&b, 0, "KAIROS-TEST: failing on purpose");
    assert_boot_has(&b, 1, "KAIROS-GRUB: chose fallback:cos-tries-exhausted");
    assert_boot_has(&b, 1, "KAIROS-GRUB: tries cos=0 fallback=0 tentative=yes");
    assert_boot_has(&b, 1, "KAIROS-TEST: hello from image=passive");
    assert_boot_has(&b, 1, "KAIROS-TEST: failing on purpose");
    assert_boot_has(&b, 2, "KAIROS-GRUB: chose recovery:all-tries-exhausted");
    assert_boot_has(
        &b,
        2,
        "KAIROS-GRUB: entry=recovery reason=all-tries-exhausted",
    );
    assert_boot_has(&b, 2, "reason=recovery:all-tries-exhausted");
    assert_boot_has(&b, 2, "starting: mode=recovery");
    assert_boot_has(&b, 2, "KAIROS-TEST: hello from image=recovery");
    assert_boot_has(&b, 2, "KAIROS-TEST: mode=recovery");
    assert_boot_has(&b, 2, "KAIROS-TEST: mount / squashfs ro");
    assert_boot_has(&b, 2, DONE);
    assert_powered_off(&r);
    let env = grubenv_on_disk(&d);
    assert_eq!(grubenv_get(&env, "kairos_tries_cos").as_deref(), Some("0"));
    assert_eq!(
        grubenv_get(&env, "kairos_tries_fallback").as_deref(),
        Some("0")
    );
    assert_eq!(
        grubenv_get(&env, "kairos_boot_entry").as_deref(),
        Some("recovery")
    );
    if with_agent {
        assert_agent_said(&b, 2, "state", "all-tries-exhausted");
    }
    figure("active and passive failing, recovery", &r, b.len());
}

/// `kairos-agent bootentry --select fallback` is one-shot: passive boots once (next_entry wins
/// over the counters and is not counted), then active again.
#[test]
fn select_fallback_boots_passive_once_then_active_again() {
    require_root();
    let agent = agent();
    let with_agent = agent.is_some();
    let d = disk("ga-select", |s| {
        s.grubenv = armed(3);
        if with_agent {
            s.oem_files.push(flag("kairos-test-select-fallback"));
            s.oem_files.push(reboots(2));
        } else {
            // What `bootentry --select fallback` leaves in the block.
            s.grubenv.push(set("next_entry", "fallback"));
            s.oem_files.push(reboots(1));
        }
        s.agent = agent;
    });
    let n = if with_agent { 3 } else { 2 };
    let r = boot_grub_rebooting("ga-select", &d, n as u64 * PER_BOOT);
    let b = boots(&r.log);
    assert_eq!(b.len(), n, "expected {n} boots; log tail:\n{}", r.tail(40));
    let passive = n - 2;
    if with_agent {
        assert_boot_has(&b, 0, "KAIROS-GRUB: chose cos:counted-try");
        assert_boot_has(&b, 0, "KAIROS-TEST: hello from image=active");
        assert_boot_has(
            &b,
            0,
            "KAIROS-TEST: kairos-agent bootentry --select fallback exit=0",
        );
    }
    assert_boot_has(&b, passive, "KAIROS-GRUB: chose fallback:next_entry");
    assert_boot_has(&b, passive, "KAIROS-GRUB: entry=fallback reason=next_entry");
    assert_boot_has(
        &b,
        passive,
        "starting: mode=passive image=/cOS/passive.img reason=fallback:next_entry",
    );
    assert_boot_has(&b, passive, "KAIROS-TEST: hello from image=passive");
    // Not a counted try: active's counter is where the previous boot left it (reset to 3 by
    // mark-good, or never counted).
    assert_boot_has(&b, passive, "KAIROS-GRUB: tries cos=3 fallback=3");
    assert_boot_has(&b, passive + 1, "KAIROS-GRUB: chose cos:counted-try");
    assert_boot_has(&b, passive + 1, "reason=cos:counted-try");
    assert_boot_has(&b, passive + 1, "KAIROS-TEST: hello from image=active");
    assert_boot_has(&b, passive + 1, DONE);
    assert_powered_off(&r);
    let env = grubenv_on_disk(&d);
    assert_eq!(grubenv_get(&env, "next_entry").unwrap_or_default(), "");
    assert_eq!(
        grubenv_get(&env, "kairos_boot_entry").as_deref(),
        Some("cos")
    );
    figure("select fallback once", &r, b.len());
}

/// Boots a disk whose COS_OEM:/grubenv is `block`, twice: GRUB must boot a default entry
/// whatever the block holds; the agent reports the corruption and `bootentry --repair`
/// rewrites a valid block, which the second boot and the disk image show. COS_PERSISTENT
/// (left unmounted by the layout) keeps every byte.
fn corrupt_grubenv(name: &str, block: Vec<u8>, grub_rejects: bool) {
    let agent = agent();
    let with_agent = agent.is_some();
    let d = disk(name, |s| {
        s.layout_file = Some(NO_PERSISTENT_LAYOUT.into());
        s.agent = agent;
        s.oem_files.push(("grubenv".into(), block.clone()));
        s.oem_files.push(flag("kairos-test-repair"));
        s.oem_files.push(reboots(1));
    });
    let persistent_before = partition_hash(&d, part::PERSISTENT);
    let r = boot_grub_rebooting(name, &d, 2 * PER_BOOT);
    let b = boots(&r.log);
    assert_eq!(b.len(), 2, "expected 2 boots; log tail:\n{}", r.tail(40));
    let invalid = "KAIROS-GRUB: invalid (hd0,gpt2)/grubenv: not using it";
    if grub_rejects {
        assert_boot_has(&b, 0, invalid);
    } else {
        assert_boot_lacks(&b, 0, invalid);
    }
    for i in 0..2 {
        assert_boot_has(&b, i, "KAIROS-GRUB: chose cos:default");
        assert_boot_has(&b, i, "KAIROS-GRUB: entry=cos reason=default");
        assert_boot_has(
            &b,
            i,
            "starting: mode=active image=/cOS/active.img reason=cos:default",
        );
        assert_boot_has(&b, i, "KAIROS-TEST: hello from image=active");
        assert_boot_lacks(&b, i, "KAIROS-TEST: mount /usr/local ext4");
        assert_boot_has(&b, i, DONE);
    }
    assert_powered_off(&r);
    let env = grubenv_on_disk(&d);
    if with_agent {
        // The first `state` of boot 0 ran before anything rewrote the block.
        let first_state = agent_outputs(&b[0], "state");
        assert!(
            first_state
                .first()
                .is_some_and(|o| o.contains("grubenv_error")),
            "boot 0: the first `kairos-agent state` did not report grubenv_error: {first_state:?}"
        );
        assert_boot_has(&b, 0, "KAIROS-TEST: kairos-agent bootentry --repair exit=0");
        assert_agent_silent_on(&b, 1, "state", "grubenv_error");
        assert_boot_lacks(&b, 1, invalid);
        assert_boot_lacks(&b, 1, "error: invalid environment block");
        assert_eq!(env.len(), 1024, "repaired block is not 1024 bytes");
        assert!(
            grub_editenv_accepts(&env),
            "grub-editenv rejects the repaired block"
        );
        // GRUB loaded and saved the repaired block on the second boot.
        assert_eq!(
            grubenv_get(&env, "kairos_boot_entry").as_deref(),
            Some("cos")
        );
        assert_eq!(
            grubenv_get(&env, "kairos_boot_reason").as_deref(),
            Some("default")
        );
    } else if grub_rejects {
        assert_eq!(env, block, "GRUB wrote to a block it could not load");
    }
    assert_eq!(
        partition_hash(&d, part::PERSISTENT),
        persistent_before,
        "COS_PERSISTENT changed"
    );
    figure(name, &r, b.len());
}

#[test]
fn garbage_grubenv_boots_default_and_is_rewritten() {
    require_root();
    let mut block = vec![0u8; 1024];
    let mut x: u32 = 0x9e37_79b9;
    for byte in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *byte = x as u8;
    }
    corrupt_grubenv("ga-garbage", block, true);
}

/// Cut to 512 bytes after its header: GRUB still reads (and saves into) what is left, but a
/// block that is not 1024 bytes is malformed to the agent, which rewrites it whole.
#[test]
fn truncated_grubenv_boots_default_and_is_rewritten() {
    require_root();
    let path = work_dir().join("ga-truncated.grubenv");
    kairos_qemu::disk::write_grubenv(&path, &[]).expect("grub-editenv");
    let mut block = std::fs::read(&path).expect("grubenv");
    block.truncate(512);
    corrupt_grubenv("ga-truncated", block, false);
}
