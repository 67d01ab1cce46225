//! `kairos-agent reset` on temp directories (issue 6 item 3): COS_STATE with an old active and
//! passive, COS_RECOVERY holding a `recovery.squashfs` (or `recovery.img`), COS_PERSISTENT
//! with user data, COS_OEM (the root's /oem) with the grubenv and the cloud-config. A reset
//! rebuilds both images from recovery, wipes persistent (unless kept), keeps OEM and points the
//! next boot at active; outside recovery mode it refuses and changes nothing.

use super::*;

const RECOVERY: &str = "recovery-v1";

struct ResetFixture {
    fx: Fixture,
    recovery: PathBuf,
    persistent: PathBuf,
}

impl ResetFixture {
    /// `squashfs`: the recovery image as `recovery.squashfs`, else as `recovery.img` (ext4,
    /// COS_SYSTEM).
    fn new(squashfs: bool) -> ResetFixture {
        let fx = Fixture::new();
        let d = fx.dir.path();
        let tree = d.join("trees/recovery");
        rootfs(&tree, RECOVERY);
        let recovery = d.join("recovery");
        std::fs::create_dir_all(recovery.join("cOS")).unwrap();
        if squashfs {
            run_ok(
                Command::new("mksquashfs")
                    .arg(&tree)
                    .arg(recovery.join("cOS/recovery.squashfs"))
                    .args(["-noappend", "-no-progress", "-quiet"]),
            );
        } else {
            ext4_image(
                &tree,
                &recovery.join("cOS/recovery.img"),
                "COS_SYSTEM",
                "8M",
            );
        }
        let persistent = d.join("persistent");
        std::fs::create_dir_all(persistent.join(".state/etc-ssh.bind")).unwrap();
        std::fs::write(persistent.join(".state/etc-ssh.bind/key"), "secret").unwrap();
        std::fs::write(
            persistent.join(".kairos-state"),
            "- {\"action\":\"install\"}\n",
        )
        .unwrap();
        let marks = d.join("marks");
        std::fs::write(
            fx.root.join("oem/reset-hooks.yaml"),
            format!(
                "#cloud-config\nstages:\n  before-reset:\n    - commands:\n        - touch {m}/before-reset\n  after-reset:\n    - commands:\n        - touch {m}/after-reset\n",
                m = marks.display()
            ),
        )
        .unwrap();
        ResetFixture {
            fx,
            recovery,
            persistent,
        }
    }

    fn reset(&self, args: &[&str]) -> Output {
        self.reset_crashing(args, None)
    }

    /// `reset` with `KAIROS_AGENT_CRASH_AT=crash_at` (or none).
    fn reset_crashing(&self, args: &[&str], crash_at: Option<&str>) -> Output {
        let mut cmd = Command::new(agent());
        match crash_at {
            Some(p) => cmd.env("KAIROS_AGENT_CRASH_AT", p),
            None => cmd.env_remove("KAIROS_AGENT_CRASH_AT"),
        };
        cmd.arg("--root")
            .arg(&self.fx.root)
            .args(["reset", "--state-dir"])
            .arg(&self.fx.state)
            .arg("--recovery-dir")
            .arg(&self.recovery)
            .arg("--persistent-dir")
            .arg(&self.persistent)
            .arg("--no-reboot")
            .args(args);
        let out = cmd.output().expect("running kairos-agent reset");
        eprintln!(
            "--- kairos-agent reset {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Everything a reset may touch, as bytes: images, grubenv, OEM and persistent files.
    fn snapshot(&self) -> Vec<(PathBuf, String)> {
        let mut all = Vec::new();
        for dir in [&self.fx.state, &self.persistent, &self.fx.root] {
            let mut stack = vec![dir.clone()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        stack.push(p);
                    } else {
                        all.push((p.clone(), hash(&p)));
                    }
                }
            }
        }
        all.sort();
        all
    }

    fn assert_reset(&self, out: &Output) {
        let fx = &self.fx;
        assert!(out.status.success(), "reset failed: {}", out.status);
        for (img, l) in [("active.img", "COS_ACTIVE"), ("passive.img", "COS_PASSIVE")] {
            assert_eq!(marker(&fx.cos(img)), RECOVERY, "{img}");
            assert_eq!(label(&fx.cos(img)), l);
            assert!(fsck_clean(&fx.cos(img)), "{img} not clean");
            assert_bootable(&fx.cos(img), l);
        }
        assert!(!fx.cos("transition.img").exists());
        assert!(
            fx.state.join("grub2/grub.cfg").is_file(),
            "grub.cfg not regenerated"
        );
        let env = fx.env();
        let next = grubenv::grub_choice(&env);
        assert_eq!(next.entry, "cos", "{env:?}");
        assert_eq!(env.get("next_entry"), None);
        assert_eq!(env.get("saved_entry"), Some("cos"));
        assert_eq!(env.get("kairos_tries_cos"), Some("3"));
        // OEM kept: the cloud-configs are still there.
        assert!(fx.root.join("oem/hooks.yaml").is_file());
        assert!(fx.mark("before-reset") && fx.mark("after-reset"));
        let h = std::fs::read_to_string(self.persistent.join(".kairos-state")).unwrap();
        let line = h.lines().last().unwrap_or_default();
        assert!(line.contains("\"action\":\"reset\""), "{h}");
        assert!(line.contains("\"booted\":\"recovery\""), "{h}");
    }
}

#[test]
fn reset_from_the_recovery_squashfs_wipes_persistent_and_keeps_oem() {
    need_root();
    let r = ResetFixture::new(true);
    let out = r.reset(&["--booted", "recovery"]);
    r.assert_reset(&out);
    // Persistent wiped: only the new history line is left.
    let left: Vec<_> = std::fs::read_dir(&r.persistent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [".kairos-state"], "persistent not wiped");
    let h = std::fs::read_to_string(r.persistent.join(".kairos-state")).unwrap();
    assert_eq!(h.lines().count(), 1, "{h}");
    assert!(h.contains("recovery.squashfs"), "{h}");
}

#[test]
fn reset_keeps_persistent_when_asked_and_takes_a_recovery_img() {
    need_root();
    let r = ResetFixture::new(false);
    // Detected from the command line this time, no override.
    std::fs::write(
        r.fx.root.join("proc/cmdline"),
        "root=LABEL=COS_SYSTEM cos-img/filename=/cOS/recovery.img\n",
    )
    .unwrap();
    let out = r.reset(&["--keep-persistent"]);
    r.assert_reset(&out);
    assert_eq!(
        std::fs::read_to_string(r.persistent.join(".state/etc-ssh.bind/key")).unwrap(),
        "secret"
    );
    let h = std::fs::read_to_string(r.persistent.join(".kairos-state")).unwrap();
    assert_eq!(h.lines().count(), 2, "history appended: {h}");
    assert!(h.contains("recovery.img"), "{h}");
}

#[test]
fn reset_outside_recovery_mode_changes_nothing() {
    need_root();
    let r = ResetFixture::new(true);
    std::fs::write(
        r.fx.root.join("proc/cmdline"),
        "root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img\n",
    )
    .unwrap();
    let before = r.snapshot();
    for args in [&[][..], &["--booted", "active"], &["--booted", "passive"]] {
        let out = r.reset(args);
        assert_eq!(out.status.code(), Some(2), "expected a refusal");
        let e = stderr(&out);
        assert!(e.contains("reset runs only from recovery mode"), "{e}");
        assert_eq!(r.snapshot(), before, "a refused reset changed files");
        assert!(!r.fx.mark("before-reset"));
    }
    // A missing recovery image refuses too, before anything is written.
    std::fs::remove_file(r.recovery.join("cOS/recovery.squashfs")).unwrap();
    let before = r.snapshot();
    let out = r.reset(&["--booted", "recovery"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no recovery image"),
        "{}",
        stderr(&out)
    );
    assert_eq!(r.snapshot(), before);
}

/// The reset's crash points (`kairos_agent::reset::CRASH_POINTS`), in order.
const RESET_CUTS: &[&str] = &[
    "pending",
    "transition-built",
    "active-replaced",
    "passive-replaced",
    "persistent-wiped",
    "done",
];

/// A crash (the agent aborted by `KAIROS_AGENT_CRASH_AT`) at every step of a reset started
/// with `--keep-persistent`: until the last step GRUB's next boot is `statereset` (recovery
/// with `kairos.reset`, where the daemon redoes the reset), and a re-run with no flags, as the
/// unattended one is, finishes it with the interrupted run's choice (persistent kept). After
/// `done` the next boot is active. Before the pending mark, a crash after the new active.img
/// left GRUB booting it with the old COS_PERSISTENT.
#[test]
fn reset_crashed_at_each_step_stays_pending_and_a_rerun_finishes_it() {
    need_root();
    for cut in RESET_CUTS {
        let r = ResetFixture::new(true);
        let out = r.reset_crashing(&["--booted", "recovery", "--keep-persistent"], Some(cut));
        assert_eq!(
            out.status.signal(),
            Some(libc_sigabrt()),
            "{cut}: expected the agent to abort"
        );
        assert!(
            stderr(&out).contains(&format!("KAIROS_AGENT_CRASH_AT={cut}: aborting here")),
            "{cut}: {}",
            stderr(&out)
        );
        let env = r.fx.env();
        let next = grubenv::grub_choice(&env);
        if *cut == "done" {
            assert_eq!(
                (next.entry.as_str(), next.reason),
                ("cos", "counted-try"),
                "{cut}: {env:?}"
            );
            assert_eq!(env.get("kairos_reset_pending"), None);
            assert_eq!(marker(&r.fx.cos("active.img")), RECOVERY);
            continue;
        }
        assert_eq!(
            (next.entry.as_str(), next.reason),
            ("statereset", "saved_entry"),
            "{cut}: GRUB would not redo the reset: {env:?}"
        );
        assert_eq!(
            env.get("kairos_reset_pending"),
            Some("persistent=keep,oem=keep")
        );
        // The unattended re-run: no flags.
        let out = r.reset(&["--booted", "recovery"]);
        r.assert_reset(&out);
        assert!(
            stderr(&out).contains("redoing an interrupted reset"),
            "{}",
            stderr(&out)
        );
        assert_eq!(r.fx.env().get("kairos_reset_pending"), None);
        assert_eq!(
            std::fs::read_to_string(r.persistent.join(".state/etc-ssh.bind/key")).unwrap(),
            "secret",
            "{cut}: the re-run did not keep COS_PERSISTENT as the interrupted run was asked"
        );
        println!("crash at {cut}: GRUB boots statereset; the re-run finished the reset");
    }
}

/// The guest's part (sourced by the test driver): in recovery, `kairos-agent reset`, which
/// reboots (QEMU ends under -no-reboot); in active, what the reset left.
const VM_SCENARIO: &str = r#"
if [ -f /run/cos/recovery_mode ]; then
  say "reset-booted recovery"
  kairos-agent reset >/dev/console 2>&1
  say "reset-exit $?"
else
  say "reset-mode $(kairos-agent state | sed -n 's/.*"mode":"\([a-z]*\)".*/\1/p')"
  say "reset-next $(kairos-agent bootentry --list | grep '^next boot')"
  say "reset-persistent $(ls -A /usr/local | tr '\n' ' ')"
  say "reset-history $(grep -c '"action":"reset"' /usr/local/.kairos-state)"
fi
"#;

/// A real disk: GRUB boots recovery (one-shot next_entry), the agent resets the node and
/// reboots; the next boot is active, COS_PERSISTENT fresh with the reset in its history.
#[test]
fn vm_reset_from_recovery_boots_active_with_a_fresh_persistent() {
    kairos_tests::require_root();
    let d = kairos_tests::pid1_disk("reset", &[("kairos-test-extra.sh", VM_SCENARIO)], |s| {
        s.recovery = kairos_qemu::disk::ImageState::Ok;
        s.passive = kairos_qemu::disk::ImageState::Ok;
        s.grubenv
            .push(("next_entry".to_string(), "recovery".to_string()));
        s.persistent_files
            .push(("user-data.txt".to_string(), b"precious".to_vec()));
        for t in [
            "/sbin/mke2fs",
            "/sbin/mkfs.ext4",
            "/sbin/e2label",
            "/sbin/tune2fs",
        ] {
            s.host_tools.push(t.to_string());
        }
    });
    let first = kairos_tests::boot_until_off("reset-1", &d, 300);
    let log = &first.log;
    assert!(
        log.contains("KAIROS-T: reset-booted recovery"),
        "{}",
        first.tail(60)
    );
    assert!(
        log.contains("kairos-agent: reset done from recovery:"),
        "{}",
        first.tail(60)
    );
    assert!(
        !log.contains("KAIROS-T: reset-exit"),
        "reset returned instead of rebooting"
    );
    let second = kairos_tests::boot_until_off("reset-2", &d, 300);
    let value = |k: &str| {
        kairos_tests::driver_value(&second.log, k)
            .unwrap_or_else(|| panic!("no {k} line:\n{}", second.tail(60)))
    };
    assert_eq!(value("reset-mode"), "active");
    assert!(
        value("reset-next").contains("cos"),
        "{}",
        value("reset-next")
    );
    let persistent = value("reset-persistent");
    assert!(
        !persistent.contains("user-data.txt"),
        "not wiped: {persistent}"
    );
    assert_eq!(value("reset-history"), "1");
}

/// The guest's part of the power-cut test: in a `kairos.reset` boot the daemon resets the
/// node unattended (pausing where the boot stage below told it to, until QEMU is killed), so
/// the driver only waits; in active it reports what the reset left.
const VM_CUT_SCENARIO: &str = r#"
if [ -f /run/cos/autoreset_mode ]; then
  say "autoreset-boot"
  sleep 3600
else
  say "reset-mode $(kairos-agent state | sed -n 's/.*"mode":"\([a-z]*\)".*/\1/p')"
  say "reset-persistent $(ls -A /usr/local | tr '\n' ' ')"
  say "reset-oem $(ls /oem | tr '\n' ' ')"
fi
"#;

/// A boot-stage command (runs before the daemon's unattended reset): in a `kairos.reset` boot,
/// the next crash point from /oem/kt-cuts (a counter on COS_OEM, which the reset keeps) for
/// the reset to pause at.
const VM_CUT_PICKER: &str = "#cloud-config\nstages:\n  boot:\n    - name: pick the reset's crash point\n      commands:\n        - sh /oem/kt-cut.sh\n";
const VM_CUT_SCRIPT: &str = r#"[ -f /run/cos/autoreset_mode ] || exit 0
n=$(cat /oem/kt-cut-n 2>/dev/null || echo 0)
p=$(sed -n "$((n+1))p" /oem/kt-cuts)
echo $((n+1)) > /oem/kt-cut-n
sync
mkdir -p /run/kairos
[ -n "$p" ] && echo "pause:$p" > /run/kairos/reset-crash-at
echo "KAIROS-T: reset-cut-point ${p:-none}" > /dev/console
"#;

/// Issue 15 item 5: power cuts (QEMU killed) at every crash point of a reset. GRUB starts in
/// the statereset entry (as a person picking "state reset" would); after each cut the next
/// boot must be statereset again, where the daemon redoes the reset, until the cut after the
/// last step, after which active boots with an empty COS_PERSISTENT and COS_OEM kept. Before
/// the pending mark the first cut after the new active.img booted it with the old
/// COS_PERSISTENT, and nothing ran the reset of a `kairos.reset` boot.
#[test]
fn vm_power_cut_at_each_reset_step_then_the_reset_completes() {
    kairos_tests::require_root();
    let oem = [
        ("kairos-test-extra.sh", VM_CUT_SCENARIO),
        ("kt-cut.yaml", VM_CUT_PICKER),
        ("kt-cut.sh", VM_CUT_SCRIPT),
    ];
    let cuts = RESET_CUTS.join("\n") + "\n";
    let d = kairos_tests::pid1_disk("reset-cut", &oem, |s| {
        s.recovery = kairos_qemu::disk::ImageState::Ok;
        s.passive = kairos_qemu::disk::ImageState::Ok;
        s.grubenv
            .push(("next_entry".to_string(), "statereset".to_string()));
        s.persistent_files
            .push(("user-data.txt".to_string(), b"precious".to_vec()));
        s.oem_files.push(("kt-cuts".to_string(), cuts.into_bytes()));
        for t in [
            "/sbin/mke2fs",
            "/sbin/mkfs.ext4",
            "/sbin/e2label",
            "/sbin/tune2fs",
        ] {
            s.host_tools.push(t.to_string());
        }
    });
    let a = kairos_tests::artifacts();
    // The boots only (the disk and the binaries are built by then).
    let started = std::time::Instant::now();
    for cut in RESET_CUTS {
        let name = format!("reset-cut-{cut}");
        let mut s = kairos_qemu::boot::BootSpec::new(a.work.join(format!("{name}.log")));
        s.disks = vec![d.clone()];
        s.memory_mb = 768;
        s.until = vec!["paused here".to_string()];
        s.timeout = std::time::Duration::from_secs(400);
        let r = kairos_qemu::boot::run(&s).unwrap_or_else(|e| panic!("booting {name}: {e}"));
        println!(
            "---- serial log of {name} ({:.1} s) ----\n{}",
            r.elapsed.as_secs_f64(),
            r.log
        );
        assert!(
            r.log
                .contains("kairos-agent: booted with kairos.reset: resetting the node unattended"),
            "before the cut at {cut}: not a statereset boot redoing the reset:\n{}",
            r.tail(60)
        );
        assert!(
            r.log
                .contains(&format!("KAIROS_AGENT_CRASH_AT=pause:{cut}: paused here")),
            "the reset never reached {cut}:\n{}",
            r.tail(60)
        );
        println!(
            "power cut at {cut} ({:.0} s so far)",
            started.elapsed().as_secs_f64()
        );
    }
    // The cut after the last step: the next boot is active, the reset complete.
    let last = kairos_tests::boot_until_off("reset-cut-final", &d, 300);
    let value = |k: &str| {
        kairos_tests::driver_value(&last.log, k)
            .unwrap_or_else(|| panic!("no {k} line:\n{}", last.tail(60)))
    };
    assert_eq!(value("reset-mode"), "active");
    let persistent = value("reset-persistent");
    assert!(
        !persistent.contains("user-data.txt"),
        "COS_PERSISTENT not wiped: {persistent}"
    );
    let oem = value("reset-oem");
    assert!(oem.contains("kt-cuts"), "COS_OEM not kept: {oem}");
    println!(
        "vm_power_cut_at_each_reset_step_then_the_reset_completes: {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// Issue 19: `reset.system.source` is what a reset installs when no flag names a source, and
/// the after-reset-chroot stage writes into the new image before it becomes active (passive
/// is its copy).
#[test]
fn reset_system_source_and_after_reset_chroot() {
    need_root();
    let r = ResetFixture::new(true);
    std::fs::write(
        r.fx.root.join("oem/92_reset.yaml"),
        format!(
            "#cloud-config\nreset:\n  system:\n    source: dir:{}\nstages:\n  after-reset-chroot:\n    - name: into the new image\n      files:\n        - path: /etc/kt-reset-chroot\n          content: written before the image became active\n",
            r.fx.new_rootfs.display()
        ),
    )
    .unwrap();
    let out = r.reset(&["--booted", "recovery"]);
    assert!(out.status.success(), "reset failed: {}", out.status);
    for img in ["active.img", "passive.img"] {
        assert_eq!(
            marker(&r.fx.cos(img)),
            NEW,
            "{img}: not from reset.system.source"
        );
        let got = run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg("cat /etc/kt-reset-chroot")
                .arg(r.fx.cos(img)),
        );
        assert_eq!(
            got.trim(),
            "written before the image became active",
            "{img}"
        );
        assert!(fsck_clean(&r.fx.cos(img)), "{img} not clean");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "reset done from dir:{}",
            r.fx.new_rootfs.display()
        )),
        "{stdout}"
    );
}
