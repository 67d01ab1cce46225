//! QEMU tests of userland (issue 4): kairos-agent applying cloud-configs from COS_OEM, the
//! K3s stand-in under the agent's supervision, kairos-init as the PID 1 of a busybox system
//! (and its clean shutdown), the cloud-config stages kairos-init runs before switch_root, and
//! the Debian 12 image with systemd. Every assertion reads the serial log; the in-image driver
//! (`kairos_tests::DRIVER`) prints what it sees as `KAIROS-T:` lines, then powers off.

use std::sync::OnceLock;

use kairos_qemu::boot::BootResult;
use kairos_tests::*;

const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKairosTestKeyKairosTestKeyKairosTestKey0 kairos@test";

/// Users, hostname, a file with mode and owner, a sysctl; plus the two stages kairos-init runs:
/// `rootfs` writes a layout file (with /opt as an extra RW path) that the planner must honour,
/// `initramfs` leaves a file in /etc that userland must see.
fn base_config() -> Vec<(&'static str, String)> {
    vec![
        (
            "10_user.yaml",
            format!(
                "#cloud-config\nhostname: kairos-agent-test\nusers:\n  - name: kairos\n    passwd: kairos\n    groups: [users]\n    ssh_authorized_keys:\n      - {SSH_KEY}\n"
            ),
        ),
        (
            "20_files.yaml",
            "#cloud-config\nstages:\n  boot:\n    - name: test file and sysctl\n      files:\n        - path: /etc/kairos-test/hello.txt\n          permissions: 0640\n          owner_string: kairos:kairos\n          content: |\n            hello from cloud-config\n      sysctl:\n        vm.swappiness: \"17\"\n"
                .to_string(),
        ),
        (
            "30_early.yaml",
            "#cloud-config\nstages:\n  rootfs:\n    - name: layout with /opt\n      directories:\n        - path: /run/cos\n          permissions: 0755\n      files:\n        - path: /run/cos/custom-layout.env\n          permissions: 0644\n          content: |\n            VOLUMES=\"LABEL=COS_PERSISTENT:/usr/local\"\n            OVERLAY=\"tmpfs:30%\"\n            RW_PATHS=\"/var /etc /srv /opt\"\n            PERSISTENT_STATE_PATHS=\"/home /root /etc/ssh /var/log /etc/rancher /var/lib/rancher\"\n  initramfs:\n    - name: mark from initramfs\n      commands:\n        - mkdir -p /etc/kairos-test && echo initramfs > /etc/kairos-test/from-initramfs-stage\n"
                .to_string(),
        ),
        (
            "kairos-test-extra.sh",
            format!("{EXTRA}{ANALYZE}{AGENT_RESTART}"),
        ),
    ]
}

/// The base scenario: what the stages left, and the mount table.
const EXTRA: &str = r#"say "initramfs-stage $(cat /etc/kairos-test/from-initramfs-stage 2>&1)"
say "mounts $(awk '{print $2":"$3}' /proc/mounts | tr '\n' ' ')"
"#;

/// `kairos-agent analyze` once the agent is ready: time and blame line by line, the plot's
/// size and text elements, and the plot itself (one `svg` line per line; the test puts it
/// together and renders it).
const ANALYZE: &str = r#"n=0; while [ ! -e /run/kairos/agent-ready ] && [ $n -lt 240 ]; do sleep 0.25; n=$((n+1)); done
kairos-agent analyze time 2>&1 | while IFS= read -r l; do say "analyze-time $l"; done
kairos-agent analyze blame 2>&1 | while IFS= read -r l; do say "analyze-blame $l"; done
kairos-agent analyze plot > /run/boot.svg 2>/run/boot.svg.err
say "analyze-plot exit $? bytes $(wc -c < /run/boot.svg) texts $(grep -c '</text>' /run/boot.svg) $(head -c 200 /run/boot.svg.err)"
while IFS= read -r l; do say "svg $l"; done < /run/boot.svg
"#;

/// Under kairos-init as PID 1 only: kill the agent daemon and wait for PID 1 to start a new one.
const AGENT_RESTART: &str = r#"if [ "$(cat /proc/1/comm)" = init ]; then
  old=$(pidof kairos-agent)
  kill -9 $old && say "agent killed $old"
  n=0; while { [ -z "$(pidof kairos-agent)" ] || [ "$(pidof kairos-agent)" = "$old" ]; } && [ $n -lt 40 ]; do sleep 0.25; n=$((n+1)); done
  say "agent-restarted $(pidof kairos-agent)"
fi
"#;

fn refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(p, c)| (*p, c.as_str())).collect()
}

fn value(r: &BootResult, key: &str) -> String {
    driver_value(&r.log, key).unwrap_or_else(|| {
        panic!(
            "no `KAIROS-T: {key}` line; driver said:\n{:#?}",
            driver_lines(&r.log)
        )
    })
}

/// What every image must show after the base config.
fn assert_base_config_applied(r: &BootResult) {
    assert_has(r, DRIVER_DONE);
    assert_has(r, "KAIROS-T: boot-stage-ok");
    assert_eq!(value(r, "hostname"), "kairos-agent-test");
    let passwd = value(r, "passwd");
    assert!(passwd.starts_with("kairos:x:"), "{passwd}");
    assert!(passwd.contains(":/home/kairos:"), "{passwd}");
    assert_eq!(value(r, "shadow"), "1");
    assert_eq!(value(r, "keys"), format!("600 kairos:kairos {SSH_KEY}|"));
    let file = value(r, "file");
    assert!(
        file.starts_with("640 ") && file.contains(" kairos:kairos hello from cloud-config|"),
        "{file}"
    );
    assert_eq!(value(r, "sysctl"), "vm.swappiness=17");
    // The rootfs stage's layout file was read (it ran before the overlays) and honoured.
    assert_has(r, "layout from /run/cos/custom-layout.env");
    assert!(
        value(r, "mounts").contains(" /opt:overlay "),
        "{}",
        value(r, "mounts")
    );
    // The initramfs stage ran chrooted in the final tree.
    assert_eq!(value(r, "initramfs-stage"), "initramfs");
    assert_has(r, "kairos-init: step stage rootfs: ");
    assert_has(r, "kairos-init: step stage initramfs: ");
}

fn pid1_base_boot() -> &'static BootResult {
    static BOOT: OnceLock<BootResult> = OnceLock::new();
    BOOT.get_or_init(|| {
        let cfg = base_config();
        let d = pid1_disk("pid1-config", &refs(&cfg), |_| {});
        boot_until_off("pid1-config", &d, 180)
    })
}

#[test]
fn pid1_busybox_applies_cloud_config() {
    require_root();
    let r = pid1_base_boot();
    assert_has(
        r,
        "kairos-init: kairos-init 0.1.0 running as the system's PID 1",
    );
    assert_has(r, "kairos-init: started /usr/bin/kairos-agent daemon");
    assert_eq!(value(r, "pid1"), "init");
    // Supervision: the killed agent is reported and started again after the back-off.
    let killed = value(r, "agent killed");
    assert_has(
        r,
        &format!("kairos-init: /usr/bin/kairos-agent (pid {killed}) killed by signal 9"),
    );
    assert_has(r, "kairos-init: restarting /usr/bin/kairos-agent in 1 s");
    let again = value(r, "agent-restarted");
    assert!(
        !again.is_empty() && again != killed,
        "agent not restarted: {again:?}"
    );
    assert_base_config_applied(r);
    // The driver's SIGUSR2 made PID 1 stop everything, unmount and power off.
    assert_has(r, "kairos-init: SIGUSR2: powering off");
    assert_has(r, "kairos-init: unmounted /usr/local");
    assert_has(r, "reboot: Power down");
    let t = kairos_qemu::boot::kmsg_time(&r.log, "kairos-init: started /usr/bin/kairos-agent")
        .unwrap_or(0.0);
    println!(
        "FIGURE busybox + kairos-init PID 1: agent started at {t:.2} s guest time; run {:.1} s wall",
        r.elapsed.as_secs_f64()
    );
}

#[test]
fn state_json_matches_the_boot() {
    require_root();
    let r = pid1_base_boot();
    let raw = value(r, "state");
    let s: serde_json::Value = serde_json::from_str(raw.trim())
        .unwrap_or_else(|e| panic!("state is not JSON ({e}): {raw}"));
    assert_eq!(s["mode"], "active", "{s:#}");
    assert!(
        s["image"]
            .as_str()
            .is_some_and(|i| i.contains("/cOS/active.img")),
        "{s:#}"
    );
    // Partitions: the labels the disk has, mounted where this boot's mount table says.
    let parts = s["partitions"].as_array().expect("partitions array");
    let mounts_of = |label: &str| -> Vec<String> {
        parts
            .iter()
            .find(|p| p["label"] == label)
            .unwrap_or_else(|| panic!("no {label} in {s:#}"))["mountpoints"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(mounts_of("COS_PERSISTENT").contains(&"/usr/local".to_string()));
    assert!(mounts_of("COS_OEM").contains(&"/oem".to_string()));
    assert!(mounts_of("COS_ACTIVE").contains(&"/".to_string()));
    // The timeline is this boot's: every top-level step kairos-init logged, same durations.
    let steps = s["timeline"]["steps"].as_array().expect("timeline steps");
    for name in [
        "modules",
        "root",
        "oem",
        "stage rootfs",
        "layout",
        "system",
        "stage initramfs",
        "switch_root",
    ] {
        let st = steps
            .iter()
            .find(|x| x["name"] == name && x["parent"].is_null())
            .unwrap_or_else(|| panic!("timeline lacks step {name}: {s:#}"));
        let dur = st["duration_ms"].as_f64().expect("duration");
        assert_has(r, &format!("kairos-init: step {name}: {dur:.1} ms"));
    }
}

/// The driver's lines starting with `key ` (their rest), in order.
fn values(r: &BootResult, key: &str) -> Vec<String> {
    let k = format!("{key} ");
    driver_lines(&r.log)
        .into_iter()
        .filter_map(|l| l.strip_prefix(&k).map(str::to_string))
        .collect()
}

/// Parses `analyze blame`'s `DURATION WHO: STEP` duration back to seconds.
fn blame_secs(line: &str) -> f64 {
    let d = line.split_whitespace().next().unwrap_or_default();
    match d.strip_suffix("ms") {
        Some(ms) => ms.parse::<f64>().map(|v| v / 1000.0),
        None => d.trim_end_matches('s').parse::<f64>(),
    }
    .unwrap_or_else(|e| panic!("blame line {line:?}: {e}"))
}

#[test]
fn analyze_time_blame_and_plot_on_the_booted_node() {
    require_root();
    let r = pid1_base_boot();
    let time = values(r, "analyze-time");
    println!("analyze time:\n{}", time.join("\n"));
    let first = time.first().map(String::as_str).unwrap_or_default();
    assert!(first.starts_with("Startup finished in "), "{time:#?}");
    for phase in ["(kernel) + ", "(initramfs) + ", "(userland) = "] {
        assert!(first.contains(phase), "{phase} in {first}");
    }
    assert!(
        time.iter().any(|l| l.starts_with("firmware+loader: ")),
        "{time:#?}"
    );
    assert!(
        time.iter().any(|l| l.contains("to the agent's start")),
        "{time:#?}"
    );
    let blame = values(r, "analyze-blame");
    println!("analyze blame:\n{}", blame.join("\n"));
    for step in [
        "kairos-init: modules",
        "kairos-init: switch_root",
        "kairos-agent: stages",
        "kairos-agent: config",
        "kernel: to kairos-init's start",
    ] {
        assert!(
            blame.iter().any(|l| l.ends_with(step)),
            "{step} in {blame:#?}"
        );
    }
    let secs: Vec<f64> = blame.iter().map(|l| blame_secs(l)).collect();
    assert!(secs.windows(2).all(|w| w[0] >= w[1]), "{blame:#?}");
    let plot = value(r, "analyze-plot");
    assert!(plot.starts_with("exit 0 bytes "), "{plot}");
    // The plot as printed, put together and rendered.
    let svg = values(r, "svg").join("\n") + "\n";
    for label in [
        "modules",
        "root",
        "switch_root",
        "stages",
        "config",
        "ready",
        "kernel",
        "initramfs (kairos-init)",
    ] {
        assert!(
            svg.contains(&format!(">{label}</text>")),
            "{label} in {svg}"
        );
    }
    let dir = work_dir();
    let (svg_path, png_path) = (dir.join("analyze-boot.svg"), dir.join("analyze-boot.png"));
    std::fs::write(&svg_path, &svg).unwrap();
    let out = std::process::Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png_path)
        .arg(&svg_path)
        .output()
        .unwrap_or_else(|e| panic!("rsvg-convert ({e}): install librsvg2-bin"));
    assert!(
        out.status.success(),
        "rsvg-convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&png_path).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let width = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
    assert!(width >= 1000, "{width}");
    println!(
        "FIGURE analyze plot: {} ({} bytes)",
        png_path.display(),
        png.len()
    );
}

#[test]
fn debian_systemd_applies_cloud_config() {
    require_root();
    let cfg = base_config();
    let d = debian_disk("debian-config", &refs(&cfg), |_| {});
    let r = boot_until_off("debian-config", &d, 300);
    assert_eq!(value(&r, "pid1"), "systemd");
    assert_base_config_applied(&r);
    println!(
        "FIGURE Debian 12 + systemd: driver done after {:.1} s wall",
        r.elapsed.as_secs_f64()
    );
}

/// The scenario of the k3s tests: wait for the first start, kill it, wait for the restart.
const K3S_SCENARIO: &str = r#"d=/run/k3s-standin
n=0; while [ "$(cat $d/starts 2>/dev/null)" != 1 ] && [ $n -lt 120 ]; do sleep 0.25; n=$((n+1)); done
say "k3s-argv $(tr '\n' '|' < $d/argv)"
say "k3s-config $(tr '\n' '|' < $d/config.yaml 2>/dev/null)"
say "k3s-env-url $(grep '^K3S_URL=' $d/env)"
say "k3s-env-token $(grep '^K3S_TOKEN=' $d/env)"
say "k3s-readyz $(k3s kubectl get --raw /readyz)"
kill -9 "$(cat $d/pid)" && say "k3s killed"
n=0; while [ "$(cat $d/starts 2>/dev/null)" != 2 ] && [ $n -lt 160 ]; do sleep 0.25; n=$((n+1)); done
say "k3s-starts $(cat $d/starts)"
say "k3s-alive $(kill -0 "$(cat $d/pid)" 2>/dev/null && echo yes || echo no)"
"#;

#[test]
fn k3s_server_is_supervised_with_the_configured_args() {
    require_root();
    let cfg = "#cloud-config\nk3s:\n  enabled: true\n  args:\n    - --disable=traefik\n    - --node-label kairos.io/test=yes\n  env:\n    K3S_KAIROS_TEST: \"1\"\n";
    let d = pid1_disk(
        "k3s-server",
        &[("40_k3s.yaml", cfg), ("kairos-test-extra.sh", K3S_SCENARIO)],
        |_| {},
    );
    let r = boot_until_off("k3s-server", &d, 180);
    assert_has(&r, DRIVER_DONE);
    // Exactly what a real k3s gets: the subcommand, then the args split as systemd would.
    assert_eq!(
        value(&r, "k3s-argv"),
        "server|--disable=traefik|--node-label|kairos.io/test=yes|"
    );
    assert_has(&r, "KAIROS-K3S: start n=1 ");
    assert_has(&r, "KAIROS-K3S: env K3S_KAIROS_TEST=1");
    let config = value(&r, "k3s-config");
    assert!(config.starts_with("# kairos-agent"), "{config}");
    assert_eq!(value(&r, "k3s-readyz"), "ok");
    assert_has(&r, "KAIROS-T: k3s killed");
    // The agent restarted it, with the same arguments.
    assert_eq!(value(&r, "k3s-starts"), "2");
    assert_eq!(value(&r, "k3s-alive"), "yes");
    assert_has(&r, "KAIROS-K3S: start n=2 ");
    let second = r
        .log
        .split("KAIROS-K3S: start n=2 ")
        .nth(1)
        .unwrap_or_default();
    assert!(second.contains("KAIROS-K3S: arg kairos.io/test=yes"));
}

#[test]
fn k3s_agent_joins_with_server_url_and_token() {
    require_root();
    let cfg = "#cloud-config\nk3s-agent:\n  enabled: true\n  args:\n    - --node-name=edge-1\n  env:\n    K3S_URL: https://10.1.0.1:6443\n    K3S_TOKEN: kairos-test-token\n";
    // This boot ends with SIGINT to PID 1, what the kernel sends on ctrl-alt-del: a reboot
    // (which ends QEMU under -no-reboot) after the same clean shutdown.
    let d = pid1_disk(
        "k3s-agent",
        &[
            ("40_k3s.yaml", cfg),
            ("kairos-test-extra.sh", K3S_SCENARIO),
            ("kairos-test-signal", "INT"),
        ],
        |_| {},
    );
    let r = boot_until_off("k3s-agent", &d, 180);
    assert_has(&r, "kairos-init: SIGINT: rebooting");
    assert_has(&r, "kairos-init: unmounted /usr/local");
    assert_has(&r, "reboot: Restarting system");
    assert_has(&r, DRIVER_DONE);
    assert_eq!(value(&r, "k3s-argv"), "agent|--node-name=edge-1|");
    assert_has(&r, "KAIROS-K3S: start n=1 pid=");
    assert_has(&r, " mode=agent ");
    assert_eq!(value(&r, "k3s-env-url"), "K3S_URL=https://10.1.0.1:6443");
    assert_eq!(value(&r, "k3s-env-token"), "K3S_TOKEN=kairos-test-token");
    assert_eq!(value(&r, "k3s-starts"), "2");
}

#[test]
fn poweroff_signal_unmounts_persistent_cleanly() {
    require_root();
    // Written right before the driver's SIGUSR2, never synced by the scenario: only PID 1's
    // shutdown (sync, unmount) gets it to the disk.
    let scenario = "if [ -f /usr/local/kairos-test-token ]; then say \"token $(cat /usr/local/kairos-test-token)\"; fi\necho \"token-$(cat /proc/sys/kernel/random/uuid)\" > /usr/local/kairos-test-token\nsay \"wrote $(cat /usr/local/kairos-test-token)\"\n";
    let d = pid1_disk("poweroff", &[("kairos-test-extra.sh", scenario)], |_| {});
    let first = boot_until_off("poweroff-1", &d, 180);
    assert_has(&first, "kairos-init: SIGUSR2: powering off");
    assert_has(&first, "kairos-init: unmounted /usr/local");
    assert_has(&first, "reboot: Power down");
    let token = value(&first, "wrote");
    // On the disk, between the boots: COS_PERSISTENT is clean, no journal to replay.
    let part = d.with_extension("persistent-part");
    std::fs::write(&part, partition(&d, kairos_qemu::disk::part::PERSISTENT)).expect("write part");
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(&part)
        .output()
        .expect("dumpe2fs");
    let _ = std::fs::remove_file(&part);
    let head = String::from_utf8_lossy(&out.stdout);
    assert!(head.contains("Filesystem state:         clean"), "{head}");
    let features = head
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default();
    assert!(!features.contains("needs_recovery"), "{features}");

    let second = boot_until_off("poweroff-2", &d, 180);
    assert_eq!(value(&second, "token"), token);
    assert_lacks(&second, "recovery complete");
    assert_lacks(&second, "orphan cleanup");
    assert_has(&second, DRIVER_DONE);
}

#[test]
fn malformed_yaml_is_reported_and_the_rest_applied() {
    require_root();
    let good = "#cloud-config\nstages:\n  boot:\n    - name: good file\n      files:\n        - path: /etc/kairos-test/hello.txt\n          permissions: 0644\n          content: still applied\n      sysctl:\n        vm.swappiness: \"23\"\n";
    // Line 4 has a mapping where a sequence entry is open: a YAML syntax error.
    let broken = "#cloud-config\nstages:\n  boot:\n    - name: [unclosed\n      files: {\n";
    let d = pid1_disk(
        "bad-yaml",
        &[("10_good.yaml", good), ("50_broken.yaml", broken)],
        |_| {},
    );
    let r = boot_until_off("bad-yaml", &d, 180);
    assert_has(&r, DRIVER_DONE);
    assert_has(&r, "/oem/50_broken.yaml:");
    let line = r
        .log
        .lines()
        .find(|l| l.contains("/oem/50_broken.yaml:"))
        .unwrap_or_default();
    let after = line
        .split("/oem/50_broken.yaml:")
        .nth(1)
        .unwrap_or_default();
    let n: u32 = after
        .split(':')
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no line number in {line:?}"));
    assert!((4..=6).contains(&n), "{line}");
    assert_eq!(value(&r, "sysctl"), "vm.swappiness=23");
    assert!(
        value(&r, "file").contains("root:root still applied"),
        "{}",
        value(&r, "file")
    );
}
