//! The commands scripts call, through the built binary on a temp root: `config show`,
//! `config get`, `state get`, `version`, `logs` and `upgrade list-releases` (against a small
//! in-test registry serving the distribution API's tags list), and `config get` / `state get`
//! used from a shell script.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

mod common;
use common::*;

fn write(root: &Path, p: &str, content: &str) {
    let f = root.join(p.trim_start_matches('/'));
    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    std::fs::write(f, content).unwrap();
}

/// A node: a cloud-config in /oem and one in /usr/local/cloud-config, booted active.
fn node() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    for sub in [
        "oem",
        "proc",
        "run/cos",
        "run/kairos",
        "sys/class/block",
        "dev",
    ] {
        std::fs::create_dir_all(r.join(sub)).unwrap();
    }
    write(
        r,
        "/oem/90_custom.yaml",
        "#cloud-config\nhostname: edge-node\nk3s:\n  enabled: true\n  args:\n  - --disable=traefik\nusers:\n- name: kairos\n  groups: [admin]\n",
    );
    write(
        r,
        "/usr/local/cloud-config/10_base.yaml",
        "#cloud-config\nhostname: base\ninstall:\n  device: /dev/vda\n",
    );
    write(r, "/run/cos/active_mode", "");
    write(
        r,
        "/proc/cmdline",
        "root=LABEL=COS_ACTIVE rd.kairos.boot_reason=cos:default\n",
    );
    write(r, "/etc/machine-id", "0123456789abcdef0123456789abcdef\n");
    write(r, "/proc/sys/kernel/hostname", "edge-1\n");
    d
}

#[test]
fn help_lists_the_new_commands() {
    let o = Command::new(BIN).arg("--help").output().unwrap();
    let (code, out, _) = text(&o);
    assert_eq!(code, 0);
    for w in ["config", "version", "logs", "state", "upgrade"] {
        assert!(out.contains(w), "{w} missing in\n{out}");
    }
    let o = Command::new(BIN)
        .args(["upgrade", "--help"])
        .output()
        .unwrap();
    let (code, out, _) = text(&o);
    assert_eq!(code, 0);
    for w in ["list-releases", "--source", "--recovery"] {
        assert!(out.contains(w), "{w} missing in\n{out}");
    }
}

#[test]
fn config_show_and_get() {
    let d = node();
    let r = d.path();
    let (code, out, _) = text(&agent(r, &["config", "show"]));
    assert_eq!(code, 0);
    assert!(out.starts_with("#cloud-config\n"), "{out}");
    let back: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    assert_eq!(back["install"]["device"], "/dev/vda");
    assert_eq!(back["k3s"]["enabled"], true);
    // `config` alone is `config show`.
    let (_, out2, _) = text(&agent(r, &["config"]));
    assert_eq!(out, out2);
    let (code, out, _) = text(&agent(r, &["config", "get", "k3s.enabled"]));
    assert_eq!((code, out.as_str()), (0, "true\n"));
    let (code, out, _) = text(&agent(r, &["config", "get", "users[0].groups"]));
    assert_eq!((code, out.as_str()), (0, "- admin\n"));
    let (code, out, _) = text(&agent(r, &["config", "get", "install"]));
    assert_eq!((code, out.as_str()), (0, "device: /dev/vda\n"));
    let (code, out, err) = text(&agent(r, &["config", "get", "k3s.token"]));
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.contains("key \"k3s.token\" not found: k3s has no \"token\""),
        "{err}"
    );
    let (code, _, err) = text(&agent(r, &["config", "get", "users[x]"]));
    assert_eq!(code, 1, "a malformed key is never found: {err}");
    assert!(err.contains("\"users[x]\""), "{err}");
}

#[test]
fn state_get_and_state_as_before() {
    let d = node();
    let r = d.path();
    let (code, out, _) = text(&agent(r, &["state", "get", "boot"]));
    assert_eq!((code, out.as_str()), (0, "active_boot\n"));
    let (code, out, _) = text(&agent(r, &["state", "get", "boot_reason"]));
    assert_eq!((code, out.as_str()), (0, "cos:default\n"));
    let (code, out, _) = text(&agent(r, &["state", "get", "oem.found"]));
    assert_eq!((code, out.as_str()), (0, "false\n"));
    let (code, out, _) = text(&agent(r, &["state", "get", "uuid"]));
    assert_eq!(
        (code, out.as_str()),
        (0, "0123456789abcdef0123456789abcdef-edge-1\n")
    );
    let (code, out, err) = text(&agent(r, &["state", "get", "no.such"]));
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("key \"no.such\" not found"), "{err}");
    // `state` and `state --pretty` print the whole object as before.
    let (code, out, _) = text(&agent(r, &["state"]));
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mode"], "active");
    let (_, out, _) = text(&agent(r, &["state", "--pretty"]));
    assert!(out.lines().count() > 5);
}

/// What a user's script does with the two commands.
#[test]
fn config_get_and_state_get_from_a_shell_script() {
    let d = node();
    let script = r#"
set -e
host=$("$AGENT" --root "$T" config get hostname)
dev=$("$AGENT" --root "$T" config get install.device)
boot=$("$AGENT" --root "$T" state get boot)
if [ "$("$AGENT" --root "$T" config get k3s.enabled)" = true ]; then role=server; else role=none; fi
if "$AGENT" --root "$T" config get k3s.token >/dev/null 2>&1; then token=set; else token=unset; fi
echo "host=$host dev=$dev boot=$boot role=$role token=$token"
"#;
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("AGENT", BIN)
        .env("T", d.path())
        .output()
        .unwrap();
    let (code, out, err) = text(&o);
    assert_eq!(code, 0, "{err}");
    // The hostname is /oem's: read last, it wins over /usr/local/cloud-config's.
    assert!(
        out.trim_end()
            .ends_with("host=edge-node dev=/dev/vda boot=active_boot role=server token=unset"),
        "{out}"
    );
}

#[test]
fn version_short_long_and_flag() {
    let d = node();
    let (code, out, _) = text(&agent(d.path(), &["version"]));
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{}\n", env!("CARGO_PKG_VERSION")).as_str())
    );
    let (code, out, _) = text(&agent(d.path(), &["version", "--long"]));
    assert_eq!(code, 0);
    let keys: Vec<&str> = out.lines().map(|l| l.split_once(": ").unwrap().0).collect();
    assert_eq!(keys, ["version", "commit", "build_date", "rust"], "{out}");
    assert!(out.contains("rust: rustc "), "{out}");
    let (_, short, _) = text(&agent(d.path(), &["version", "-l"]));
    assert_eq!(short, out);
    let o = Command::new(BIN).arg("--version").output().unwrap();
    let (code, out, _) = text(&o);
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            format!("kairos-agent {}\n", env!("CARGO_PKG_VERSION")).as_str()
        )
    );
}

#[test]
fn logs_of_a_kairos_init_boot() {
    let d = node();
    let r = d.path();
    write(
        r,
        "/dev/kmsg",
        "6,0,0,-;Linux version 6.1.0\n6,7,1531418,-;kairos-init: kairos-init 0.1.0 starting: mode=active\n6,8,1600000,-;random: crng init done\n",
    );
    write(
        r,
        "/run/kairos/boot-timeline.json",
        r#"{"steps":[{"name":"modules","parent":null,"start_ms":1.0,"duration_ms":500.4}]}"#,
    );
    write(
        r,
        "/run/kairos/kairos-agent.log",
        "kairos-agent: stage boot: 2 steps ran, 0 skipped, 0 failed\n",
    );
    let (code, out, err) = text(&agent(r, &["logs", "--journalctl", "/nonexistent"]));
    assert_eq!(code, 0, "{err}");
    let headers: Vec<&str> = out.lines().filter(|l| l.starts_with("==> ")).collect();
    assert_eq!(
        headers,
        [
            "==> kairos-init: kernel log of this boot (/dev/kmsg) <==",
            "==> kairos-init: boot timeline (/run/kairos/boot-timeline.json, /run/kairos/boot-image) <==",
            "==> kairos-agent: journal of this boot (kairos-agent-fs.service, kairos-agent-boot.service, kairos-agent-network.service, kairos-agent-reconcile.service, kairos-agent.service) <==",
            "==> kairos-agent: /run/kairos/kairos-agent.log (this boot) <==",
        ],
        "{out}"
    );
    assert!(
        out.contains("[    1.531418] kairos-init: kairos-init 0.1.0 starting: mode=active\n"),
        "{out}"
    );
    assert!(!out.contains("crng"), "only our records: {out}");
    assert!(out.contains("500.4  modules"), "{out}");
    assert!(out.contains("stage boot: 2 steps ran"), "{out}");
    assert!(
        err.contains("logs not found: kairos-agent: journal of this boot"),
        "{err}"
    );
    // An empty root: every section says why, exit 1.
    let e = tempfile::tempdir().unwrap();
    let (code, out, _) = text(&agent(e.path(), &["logs"]));
    assert_eq!(code, 1);
    assert_eq!(out.matches("(not found: ").count(), 4, "{out}");
}

/// A registry of the distribution API's tags list: pages of at most `cap` tags, sorted, after
/// `last`; every request's path is recorded.
struct TagsRegistry {
    addr: String,
    requests: Arc<Mutex<Vec<String>>>,
}

fn tags_registry(repo: &'static str, tags: &[&str], cap: usize) -> TagsRegistry {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut sorted: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
    sorted.sort();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            // Headers, to the empty line.
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                    break;
                }
            }
            let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
            seen.lock().unwrap().push(path.clone());
            let (p, query) = path.split_once('?').unwrap_or((&path, ""));
            let (status, body) = if p == "/v2/" {
                ("200 OK", "{}".to_string())
            } else if p == format!("/v2/{repo}/tags/list") {
                let last = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("last="))
                    .map(str::to_string);
                let page: Vec<&String> = sorted
                    .iter()
                    .filter(|t| last.as_ref().is_none_or(|l| *t > l))
                    .take(cap)
                    .collect();
                (
                    "200 OK",
                    serde_json::json!({"name": repo, "tags": page}).to_string(),
                )
            } else {
                (
                    "404 Not Found",
                    r#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#
                        .to_string(),
                )
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.flush();
            let mut rest = Vec::new();
            let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(10)));
            let _ = s.read_to_end(&mut rest);
        }
    });
    TagsRegistry { addr, requests }
}

#[test]
fn list_releases_newest_first_across_pages() {
    let reg = tags_registry(
        "kairos/node",
        &[
            "v1.0.0",
            "latest",
            "v1.10.0",
            "v1.2.0",
            "v1.10.0-rc1",
            "main",
            "v0.9.9",
            "v2.0.0-alpha.1",
        ],
        3,
    );
    let d = node();
    let r = d.path();
    write(
        r,
        "/oem/95_upgrade.yaml",
        &format!(
            "#cloud-config\nupgrade:\n  system:\n    source: oci:{}/kairos/node:v1.2.0\n",
            reg.addr
        ),
    );
    write(
        r,
        "/etc/kairos-release",
        &format!("KAIROS_IMAGE_REPO=\"{}/kairos/node:v1.2.0\"\n", reg.addr),
    );
    let (code, out, err) = text(&agent(r, &["upgrade", "list-releases"]));
    assert_eq!(code, 0, "{err}");
    let repo = format!("{}/kairos/node", reg.addr);
    let expected: Vec<String> = [
        "v2.0.0-alpha.1",
        "v1.10.0",
        "v1.10.0-rc1",
        "v1.2.0",
        "v1.0.0",
        "v0.9.9",
        "latest",
        "main",
    ]
    .iter()
    .map(|t| format!("{repo}:{t}"))
    .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "{err}");
    assert!(
        err.contains(&format!(
            "kairos-agent: repository {repo} (from upgrade.system.source)"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("kairos-agent: current image {repo}:v1.2.0")),
        "{err}"
    );
    // Three pages of 3 and the empty fourth one.
    let tag_requests: Vec<String> = reg
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.contains("/tags/list"))
        .cloned()
        .collect();
    assert_eq!(tag_requests.len(), 4, "{tag_requests:?}");
    assert!(tag_requests[1].contains("last="), "{tag_requests:?}");
    // JSON output, and --image naming another repository (unknown to the registry: named).
    let (code, out, _) = text(&agent(r, &["upgrade", "list-releases", "--output", "json"]));
    assert_eq!(code, 0);
    let v: Vec<String> = serde_json::from_str(&out).unwrap();
    assert_eq!(v, expected);
    let other = format!("{}/kairos/other", reg.addr);
    let (code, _, err) = text(&agent(r, &["upgrade", "list-releases", "--image", &other]));
    assert_eq!(code, 2);
    assert!(err.contains("listing the tags"), "{err}");
    assert!(err.contains("kairos/other"), "{err}");
}

#[test]
fn list_releases_without_a_repository_says_where_it_looked() {
    let d = node();
    let (code, _, err) = text(&agent(d.path(), &["upgrade", "list-releases"]));
    assert_eq!(code, 2);
    assert!(err.contains("no image repository to list"), "{err}");
    assert!(err.contains("KAIROS_IMAGE_REPO"), "{err}");
    // The upgrade's own flags are not the subcommand's.
    let (code, _, err) = text(&agent(
        d.path(),
        &["upgrade", "--source", "dir:/x", "list-releases"],
    ));
    assert_eq!(code, 2, "{err}");
}

/// The daemon's output capture (used under kairos-init as PID 1), in a child process of
/// this test binary: what the process and a child it starts print reaches both the
/// original streams and the file, and the streams are back once the capture is dropped.
#[test]
fn captured_output_reaches_the_console_and_the_file() {
    if let Some(path) = std::env::var_os("KAIROS_TEST_CAPTURE_TO") {
        let c = kairos_agent::logs::capture_output_to(path.into(), 1 << 20);
        assert!(c.is_some(), "the capture could not be set up");
        println!("stdout line");
        eprintln!("stderr line");
        Command::new("sh")
            .args(["-c", "echo child line; echo child error >&2"])
            .status()
            .unwrap();
        drop(c);
        eprintln!("after the capture");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("agent.log");
    let o = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "captured_output_reaches_the_console_and_the_file",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KAIROS_TEST_CAPTURE_TO", &file)
        .output()
        .unwrap();
    let (code, out, err) = text(&o);
    assert_eq!(code, 0, "{out}{err}");
    // Both streams go through the one pipe to the original stderr while captured.
    for l in ["stdout line", "stderr line", "child line", "child error"] {
        assert!(err.contains(l), "{l} not on the console: {out}{err}");
    }
    assert!(err.contains("after the capture"), "{err}");
    let logged = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = logged.lines().collect();
    assert_eq!(
        lines,
        ["stdout line", "stderr line", "child line", "child error"],
        "{logged}"
    );
}
