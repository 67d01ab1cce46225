//! `kairos-agent run-stage` and `kairos-agent daemon` as kairos-init and systemd call them:
//! exit codes, the boot marker, and SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn agent(root: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kairos-agent"));
    c.arg("--root").arg(root);
    c
}

fn write(root: &Path, p: &str, text: &str) {
    let f = root.join(p.trim_start_matches('/'));
    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    std::fs::write(f, text).unwrap();
}

#[test]
fn run_stage_exit_codes_and_boot_marker() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    write(root, "/proc/cmdline", "root=LABEL=COS_ACTIVE\n");
    write(
        root,
        "/oem/10_ok.yaml",
        "#cloud-config\nstages:\n  boot:\n  - name: ok\n    files:\n    - path: /etc/motd\n      content: hi\n",
    );
    write(
        root,
        "/oem/20_bad.yaml",
        "#cloud-config\nstages:\n  boot:\n  - name: x\n    commands: [\n",
    );
    let o = agent(root).args(["run-stage", "boot"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("kairos-agent: error: /oem/20_bad.yaml:5:"),
        "{err}"
    );
    assert!(root.join("run/kairos/boot-stage-ok").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/motd")).unwrap(),
        "hi"
    );
    write(
        root,
        "/oem/30_fails.yaml",
        "#cloud-config\nstages:\n  boot:\n  - name: fails\n    commands: ['exit 4']\n  - name: after\n    commands: ['touch after']\n",
    );
    // A failed step is logged and every step runs; as upstream, run-stage fails (exit 1)
    // only with strict: true. The boot marker needs every step to have gone well.
    let o = agent(root).args(["run-stage", "boot"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("kairos-agent: stage boot: /oem/30_fails.yaml: step \"fails\": FAILED: commands: `exit 4`: exit status: 4"), "{err}");
    assert!(root.join("after").exists());
    assert!(!root.join("run/kairos/boot-stage-ok").exists());
    write(root, "/oem/40_strict.yaml", "#cloud-config\nstrict: true\n");
    let o = agent(root).args(["run-stage", "boot"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!root.join("run/kairos/boot-stage-ok").exists());
    std::fs::remove_file(root.join("oem/40_strict.yaml")).unwrap();
    // An unknown stage has no steps: nothing to fail.
    let o = agent(root)
        .args(["run-stage", "nothing-here"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn daemon_supervises_k3s_and_stops_on_sigterm() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    write(root, "/proc/cmdline", "root=LABEL=COS_ACTIVE\n");
    write(
        root,
        "/oem/90.yaml",
        "#cloud-config\nk3s-agent:\n  enabled: true\n  env:\n    K3S_URL: https://10.0.2.2:6443\n    K3S_TOKEN: tok\n",
    );
    let rec = root.join("k3s-args");
    write(
        root,
        "/usr/local/bin/k3s",
        &format!(
            "#!/bin/sh\n[ \"$1\" = kubectl ] && exit 1\necho \"$* $K3S_URL $K3S_TOKEN\" > {}\nexec sleep 60\n",
            rec.display()
        ),
    );
    std::fs::set_permissions(
        root.join("usr/local/bin/k3s"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let mut child = agent(root)
        .args(["daemon", "--no-stages"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while !rec.exists() {
        assert!(Instant::now() < end, "k3s stand-in not started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let start = Instant::now();
    let out = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "daemon did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(out.code(), Some(0), "{err}");
    assert_eq!(
        std::fs::read_to_string(&rec).unwrap(),
        "agent https://10.0.2.2:6443 tok\n"
    );
    assert!(err.contains("kairos-agent: SIGTERM: stopping"), "{err}");
    assert!(err.contains("stopped: signal: 15"), "{err}");
    let env = std::fs::read_to_string(root.join("etc/rancher/k3s/k3s-agent.env")).unwrap();
    assert_eq!(env, "K3S_TOKEN=tok\nK3S_URL=https://10.0.2.2:6443\n");
}
