//! The binary as the image's init and the QEMU tests call it: arguments, exit codes and the
//! stable output lines.

use std::path::Path;
use std::process::Command;

use kairos_init::grubenv::{self, GrubEnv};

mod common;
use common::*;

fn tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for sub in ["oem", "proc", "run/cos", "run/kairos"] {
        std::fs::create_dir_all(d.path().join(sub)).unwrap();
    }
    d
}

fn env_at(root: &Path) -> GrubEnv {
    grubenv::read(&root.join("oem/grubenv")).unwrap()
}

#[test]
fn help_lists_the_commands() {
    let o = Command::new(env!("CARGO_BIN_EXE_kairos-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let (code, out, _) = text(&o);
    assert_eq!(code, 0);
    for w in ["state", "bootentry", "mark-good", "--root", "--grubenv"] {
        assert!(out.contains(w), "{w} missing in\n{out}");
    }
}

#[test]
fn a_whole_counted_boot_cycle() {
    let d = tree();
    let root = d.path();
    let (code, out, _) = text(&agent(root, &["bootentry", "--arm", "--tries", "2"]));
    assert_eq!(code, 0);
    assert!(out.contains("kairos-agent: created "), "{out}");
    assert!(out.contains("cos and fallback get 2 tries each"), "{out}");
    // GRUB's first try of cos.
    let mut e = env_at(root);
    assert_eq!(grubenv::grub_boot(&mut e).to_string(), "cos:counted-try");
    grubenv::write(&root.join("oem/grubenv"), &e).unwrap();
    std::fs::write(
        root.join("proc/cmdline"),
        "root=LABEL=COS_ACTIVE rd.kairos.boot_reason=cos:counted-try\n",
    )
    .unwrap();
    std::fs::write(root.join("run/cos/active_mode"), "").unwrap();
    // Userland not healthy yet: refused, exit 1, nothing changed.
    let (code, out, _) = text(&agent(root, &["mark-good"]));
    assert_eq!(
        (code, out.as_str()),
        (
            1,
            "kairos-agent: not marking good: boot stage has not succeeded (no /run/kairos/boot-stage-ok)\n"
        )
    );
    assert_eq!(env_at(root), e);
    let (code, out, _) = text(&agent(root, &["state"]));
    assert_eq!(code, 0);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["boot_reason"], "cos:counted-try");
    assert_eq!(s["boot_good"], false);
    assert_eq!(s["grubenv"]["tries_cos"], 1);
    // Healthy: marked good.
    std::fs::write(root.join("run/kairos/boot-stage-ok"), "").unwrap();
    let (code, out, _) = text(&agent(root, &["mark-good"]));
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            "kairos-agent: boot marked good (entry=cos, tries reset to 2)\n"
        )
    );
    let (_, out, _) = text(&agent(root, &["state"]));
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["boot_good"], true);
    assert_eq!(s["grubenv"]["tries_cos"], 2);
    let (code, out, _) = text(&agent(root, &["bootentry"]));
    assert_eq!(code, 0);
    assert!(out.contains("next boot: cos (counted-try)"), "{out}");
}

#[test]
fn options_go_anywhere_and_grubenv_is_under_root() {
    let d = tree();
    let o = Command::new(env!("CARGO_BIN_EXE_kairos-agent"))
        .args([
            "bootentry",
            "--select",
            "fallback",
            "--grubenv",
            "/oem/other",
        ])
        .arg("--root")
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(text(&o).0, 0, "{:?}", text(&o));
    let e = grubenv::read(&d.path().join("oem/other")).unwrap();
    assert_eq!(e.get("next_entry"), Some("fallback"));
}

#[test]
fn usage_and_entry_errors_exit_2() {
    let d = tree();
    let root = d.path();
    for args in [
        &["bootentry", "--select", "cos", "--arm"][..],
        &["bootentry", "--tries", "3"],
        &["bootentry", "--arm", "--tries", "10"],
        &["bootentry", "--arm", "--tries", "0"],
        &["nosuch"],
    ] {
        let (code, _, err) = text(&agent(root, args));
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    let (code, out, err) = text(&agent(root, &["bootentry", "--select", "bogus"]));
    assert_eq!((code, out.as_str()), (2, ""));
    assert_eq!(
        err,
        "kairos-agent: error: bootentry: unknown boot entry \"bogus\": expected one of cos, fallback, recovery, statereset\n"
    );
    assert!(!root.join("oem/grubenv").exists());
}

#[test]
fn garbage_grubenv_reported_then_repaired() {
    let d = tree();
    let root = d.path();
    let junk: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(root.join("oem/grubenv"), &junk).unwrap();
    let (code, out, err) = text(&agent(root, &["state"]));
    assert_eq!(code, 0);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        s["grubenv_error"]
            .as_str()
            .unwrap()
            .ends_with("no \"# GRUB Environment Block\" header")
    );
    assert!(err.starts_with("kairos-agent: warning: "), "{err}");
    assert_eq!(std::fs::read(root.join("oem/grubenv")).unwrap(), junk);
    let (code, out, _) = text(&agent(root, &["bootentry", "--repair"]));
    assert_eq!(code, 0);
    assert!(out.starts_with("kairos-agent: rewrote "), "{out}");
    assert!(env_at(root).is_empty());
    let (_, out, _) = text(&agent(root, &["bootentry", "--repair"]));
    assert!(out.ends_with("nothing to repair\n"), "{out}");
}
