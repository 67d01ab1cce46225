//! `kairos-agent install-bundle` through the built binary on a temp root, pulling from a real
//! registry: Debian's `docker-registry` (installed by `kairos-qemu setup`) on a free loopback
//! port, the images pushed with the agent's own client (`upgrade::fetch::Registry::push`).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kairos_agent::upgrade::{fetch, oci, source};

const BIN: &str = env!("CARGO_BIN_EXE_kairos-agent");
const REGISTRY: &str = "/usr/bin/docker-registry";

/// A running registry, killed and reaped on drop.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> Registry {
    assert!(
        Path::new(REGISTRY).exists(),
        "{REGISTRY} is missing: `kairos-qemu setup` installs it (Debian's docker-registry)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        ),
    )
    .unwrap();
    let child = Command::new(REGISTRY)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let r = Registry {
        child,
        addr,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&r.addr).is_err() {
        assert!(Instant::now() < deadline, "the registry did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    r
}

/// One plain-tar layer of (name, content, mode) files; pushed as `repo:tag`. Returns the
/// manifest digest.
fn push(reg: &Registry, repo_tag: &str, files: &[(&str, &str, u32)]) -> String {
    let work = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, text, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(text.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, name, text.as_bytes()).unwrap();
    }
    let layer = b.into_inner().unwrap();
    let ld = oci::sha256_digest(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci::this_arch(), "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [ld]},
    }))
    .unwrap();
    let cd = oci::sha256_digest(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::MT_OCI_MANIFEST,
        "config": {"mediaType": oci::MT_OCI_CONFIG, "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
    }))
    .unwrap();
    let (lp, cp) = (work.path().join("layer"), work.path().join("config"));
    std::fs::write(&lp, &layer).unwrap();
    std::fs::write(&cp, &config).unwrap();
    let given = format!("{}/{repo_tag}", reg.addr);
    let r = source::parse_ref(&given, &given).unwrap();
    fetch::Registry::new(&r, &given)
        .unwrap()
        .push(&[(ld, lp), (cd, cp)], &manifest, oci::MT_OCI_MANIFEST)
        .unwrap();
    oci::sha256_digest(&manifest)
}

fn agent(root: &Path, args: &[&str]) -> (i32, String, String) {
    let o: Output = Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn install_bundle_pulls_run_and_container_bundles_from_a_registry() {
    let reg = start_registry();
    let root = tempfile::tempdir().unwrap();
    let marker = root.path().join("ran");
    let script = format!(
        "#!/bin/sh\necho \"$BUNDLE_TARGET $(cat payload)\" > {}\necho installed\n",
        marker.display()
    );
    let run_digest = push(
        &reg,
        "bundles/hello:1",
        &[("run.sh", &script, 0o755), ("payload", "p1", 0o644)],
    );
    let files_digest = push(
        &reg,
        "bundles/files:1",
        &[("usr/local/bin/hello", "#!/bin/sh\necho hi\n", 0o755)],
    );
    let bad_digest = push(&reg, "bundles/bad:1", &[("usr/sbin/evil", "x", 0o755)]);
    assert_ne!(run_digest, bad_digest);

    // run://: run.sh runs in the unpacked image with upstream's BUNDLE_TARGET.
    let run_ref = format!("{}/bundles/hello:1", reg.addr);
    let (code, out, err) = agent(
        root.path(),
        &["install-bundle", &format!("run://{run_ref}")],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        format!("{run_ref} p1\n")
    );
    assert!(
        out.contains(&format!("bundle run://{run_ref}: applied {run_digest}")),
        "{out}"
    );
    assert!(err.contains("run.sh: installed"), "{err}");

    // container://: the files land in /usr/local under --root.
    let files = format!("container://{}/bundles/files:1", reg.addr);
    let (code, out, err) = agent(root.path(), &["install-bundle", &files]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(root.path().join("usr/local/bin/hello")).unwrap(),
        "#!/bin/sh\necho hi\n"
    );
    let record = std::fs::read_to_string(root.path().join("usr/local/.kairos/bundles")).unwrap();
    assert!(
        record.contains(&format!("{run_digest} run://{run_ref}\n")),
        "{record}"
    );
    assert!(
        record.contains(&format!("{files_digest} {files}\n")),
        "{record}"
    );

    // A file outside the persistent paths: refused by name, exit 2, nothing written.
    let bad = format!("package://{}/bundles/bad:1", reg.addr);
    let (code, out, err) = agent(root.path(), &["install-bundle", &bad]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!(
            "bundle {bad}: /usr/sbin/evil would land outside the persistent paths"
        )),
        "{err}"
    );
    assert!(!root.path().join("usr/sbin/evil").exists());

    // A tag the registry does not have: the registry's answer, named.
    let missing = format!("run://{}/bundles/nope:1", reg.addr);
    let (code, _, err) = agent(root.path(), &["install-bundle", &missing]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("bundle {missing}: ")), "{err}");
}
