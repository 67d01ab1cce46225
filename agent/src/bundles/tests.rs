use super::*;
use crate::testutil::{Tree, run};

/// One entry of a test image's layer.
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a str, u32),
    Link(&'a str, &'a str),
    /// A regular file whose name is written into the header as is (`..` included).
    RawName(&'a str),
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// A plain tar layer.
fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::Dir(n) => {
                let mut h = header(tar::EntryType::Directory, 0, 0o755);
                b.append_data(&mut h, n, &[][..]).unwrap();
            }
            E::File(n, text, mode) => {
                let mut h = header(tar::EntryType::Regular, text.len() as u64, *mode);
                b.append_data(&mut h, n, text.as_bytes()).unwrap();
            }
            E::Link(n, to) => {
                let mut h = header(tar::EntryType::Symlink, 0, 0o777);
                b.append_link(&mut h, n, to).unwrap();
            }
            E::RawName(n) => {
                let mut h = header(tar::EntryType::Regular, 1, 0o644);
                h.as_old_mut().name[..n.len()].copy_from_slice(n.as_bytes());
                h.set_cksum();
                b.append(&h, &b"x"[..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Writes an OCI image layout (one plain-tar layer) at `dir`; returns the manifest digest.
fn image(dir: &Path, entries: &[E]) -> String {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = oci::sha256_digest(bytes);
        fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
        (d, bytes.len())
    };
    let (ld, ls) = put(&layer(entries));
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [ld]},
    });
    let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::MT_OCI_MANIFEST,
        "config": {"mediaType": oci::MT_OCI_CONFIG, "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}],
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": oci::MT_OCI_MANIFEST, "digest": md, "size": ms}],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    md
}

fn loaded(yaml: &str) -> config::Loaded {
    let s = config::parse("test.yaml", yaml, false).unwrap().unwrap();
    config::Loaded {
        merged: s.config,
        ..Default::default()
    }
}

fn record(t: &Tree) -> Record {
    Record::read(&t.ctx.root, Path::new(RECORD)).unwrap()
}

#[test]
fn bundle_targets_parse_with_upstreams_types() {
    let t = parse_target(
        "run://quay.io/kairos/community-bundles:metallb_latest",
        false,
    )
    .unwrap();
    assert_eq!(t.kind, Kind::Run);
    assert_eq!(
        t.reference,
        "quay.io/kairos/community-bundles:metallb_latest"
    );
    assert!(matches!(&t.source, Source::Oci(r) if r.registry == "quay.io"));
    for (s, k) in [
        ("container://alpine", Kind::Container),
        ("docker://alpine", Kind::Container),
        ("package://utils/edgevpn", Kind::Package),
        ("luet://utils/edgevpn", Kind::Package),
        ("RUN://alpine", Kind::Run),
    ] {
        assert_eq!(parse_target(s, false).unwrap().kind, k, "{s}");
    }
    assert_eq!(
        parse_target("container:///home/kairos/b.tar", true)
            .unwrap()
            .source,
        Source::OciFile("/home/kairos/b.tar".into())
    );
    assert_eq!(
        parse_target("run://dir:/srv/b", false).unwrap().source,
        Source::Dir("/srv/b".into())
    );
    let e = parse_target("quay.io/kairos/x:1", false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"quay.io/kairos/x:1\": no type: write run://"),
        "{e}"
    );
    let e = parse_target("ftp://x/y", false).unwrap_err().to_string();
    assert!(e.contains("unknown type \"ftp\""), "{e}");
    let e = parse_target("run://file:/x.img", false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("run://file:/x.img") && e.contains("not a bundle"),
        "{e}"
    );
    let e = parse_target("run://Upper/Case", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("repository component"), "{e}");
    let e = parse_target("run://rel/b.tar", true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("absolute"), "{e}");
}

#[test]
fn files_go_to_the_persistent_paths_or_their_bind_directories() {
    let paths = persistent_paths(&["/data/".into(), "/x/../etc".into()]);
    assert!(paths.contains(&"/data".to_string()));
    assert!(!paths.iter().any(|p| p.contains("..")));
    let running = Dest::Running { root: "/r".into() };
    let inst = Dest::Installed {
        persistent: "/m/p".into(),
        oem: "/m/o".into(),
    };
    let at = |d: &Dest, p: &str| place(d, &paths, Path::new(p));
    assert_eq!(
        at(&running, "/var/lib/rancher/k3s/x.yaml"),
        Some(("/r".into(), "/var/lib/rancher/k3s/x.yaml".into()))
    );
    assert_eq!(
        at(&inst, "/usr/local/bin/tool"),
        Some(("/m/p".into(), "/bin/tool".into()))
    );
    assert_eq!(
        at(&inst, "/oem/90_x.yaml"),
        Some(("/m/o".into(), "/90_x.yaml".into()))
    );
    assert_eq!(
        at(&inst, "/etc/ssl/certs/ca.pem"),
        Some(("/m/p".into(), "/.state/etc-ssl-certs.bind/ca.pem".into()))
    );
    assert_eq!(
        at(&inst, "/data/a"),
        Some(("/m/p".into(), "/.state/data.bind/a".into()))
    );
    for outside in [
        "/usr/bin/x",
        "/etc/passwd",
        "/var/lib/other",
        "/usr/localx/y",
    ] {
        assert_eq!(at(&inst, outside), None, "{outside}");
        assert_eq!(at(&running, outside), None, "{outside}");
    }
    assert!(above_persistent(&paths, Path::new("/var/lib")));
    assert!(above_persistent(&paths, Path::new("/")));
    assert!(!above_persistent(&paths, Path::new("/usr/bin")));
}

#[test]
fn the_record_keeps_one_digest_per_target() {
    let mut r = Record::parse("# c\nsha256:aa run://a\n\nsha256:bb container://b:1\nbad\n");
    assert_eq!(r.applied.len(), 2);
    assert_eq!(r.applied["run://a"], "sha256:aa");
    r.applied.insert("run://a".into(), "sha256:cc".into());
    let again = Record::parse(&r.text());
    assert_eq!(again, r);
    assert!(r.text().starts_with("# kairos-agent: bundles applied"));
}

#[test]
fn a_container_bundle_puts_its_files_in_the_persistent_paths_once_per_digest() {
    let t = Tree::new();
    let img = tempfile::tempdir().unwrap();
    let digest = image(
        img.path(),
        &[
            E::Dir("usr/"),
            E::Dir("usr/local/"),
            E::Dir("usr/local/bin/"),
            E::File("usr/local/bin/tool", "#!/bin/sh\necho tool\n", 0o755),
            E::Link("usr/local/bin/tool2", "tool"),
            E::Dir("var/"),
            E::Dir("var/lib/"),
            E::File(
                "var/lib/rancher/k3s/server/manifests/x.yaml",
                "kind: X\n",
                0o600,
            ),
        ],
    );
    let target = format!("container://ocifile:{}", img.path().display());
    let l = loaded(&format!("bundles:\n- targets:\n  - {target}\n"));
    let (r, _, log) = run(|_, e| at_boot(&t.ctx, &l, e));
    r.unwrap();
    assert!(
        log.contains(&format!("bundle {target}: applied {digest} (")),
        "{log}"
    );
    let tool = t.ctx.path("/usr/local/bin/tool");
    assert_eq!(fs::read_to_string(&tool).unwrap(), "#!/bin/sh\necho tool\n");
    assert_eq!(fs::metadata(&tool).unwrap().mode() & 0o777, 0o755);
    assert_eq!(
        fs::read_link(t.ctx.path("/usr/local/bin/tool2")).unwrap(),
        Path::new("tool")
    );
    let m = t.ctx.path("/var/lib/rancher/k3s/server/manifests/x.yaml");
    assert_eq!(fs::read_to_string(&m).unwrap(), "kind: X\n");
    assert_eq!(fs::metadata(&m).unwrap().mode() & 0o777, 0o600);
    assert_eq!(record(&t).applied[&target], digest);
    assert!(!t.ctx.path(WORK).exists(), "the work directory is removed");
    // A reboot: recorded with this digest, not applied again.
    fs::remove_file(&tool).unwrap();
    let (r, _, log) = run(|_, e| at_boot(&t.ctx, &l, e));
    r.unwrap();
    assert!(log.contains("already applied; not applied again"), "{log}");
    assert!(!tool.exists());
}

#[test]
fn install_bundles_land_in_the_new_disks_persistent_partition() {
    let disk = tempfile::tempdir().unwrap();
    let (p, o) = (disk.path().join("persistent"), disk.path().join("oem"));
    fs::create_dir_all(&p).unwrap();
    fs::create_dir_all(&o).unwrap();
    let img = tempfile::tempdir().unwrap();
    let digest = image(
        img.path(),
        &[
            E::File("usr/local/bin/tool", "bin", 0o755),
            E::File("var/lib/extensions/x.raw", "ext", 0o644),
            E::File("oem/95_bundle.yaml", "#cloud-config\n", 0o600),
        ],
    );
    // This system's persistent paths (a stand-in for /): run.sh writes through them into the
    // new disk, in its own mount namespace.
    let sys = tempfile::tempdir().unwrap();
    for d in ["usr/local", "oem", "var/lib/extensions"] {
        fs::create_dir_all(sys.path().join(d)).unwrap();
    }
    let s = sys.path().display();
    let run_img = tempfile::tempdir().unwrap();
    image(
        run_img.path(),
        &[E::File(
            "run.sh",
            &format!(
                "#!/bin/sh\nset -e\necho sysext > {s}/var/lib/extensions/x.sysext.raw\necho l > {s}/usr/local/from-run\n"
            ),
            0o755,
        )],
    );
    let target = format!("package://ocifile:{}", img.path().display());
    let run_target = format!("run://ocifile:{}", run_img.path().display());
    // A second entry: an archive on this machine (local_file), its files under rootfs_path,
    // given by the install's --config file.
    let archive_img = tempfile::tempdir().unwrap();
    image(archive_img.path(), &[E::File("hello.txt", "hi", 0o644)]);
    let archive = disk.path().join("bundle.tar");
    assert!(
        Command::new("tar")
            .arg("-C")
            .arg(archive_img.path())
            .arg("-cf")
            .arg(&archive)
            .arg(".")
            .status()
            .unwrap()
            .success()
    );
    let local = format!("container://{}", archive.display());
    let cfg = disk.path().join("config.yaml");
    fs::write(
        &cfg,
        format!(
            "#cloud-config\ninstall:\n  bundles:\n  - targets: [\"{local}\"]\n    local_file: true\n    rootfs_path: /var/lib/rancher/k3s/server/static\n"
        ),
    )
    .unwrap();
    let l = loaded(&format!(
        "install:\n  bundles:\n  - targets:\n    - {target}\n    - {run_target}\n    repository: docker://quay.io/kairos/packages\n"
    ));
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (a mount namespace for run.sh)"
    );
    let (r, _, log) = run(|_, e| after_install_on(&l, Some(&cfg), &p, &o, sys.path(), e));
    r.unwrap();
    assert!(!log.contains("error"), "{log}");
    assert_eq!(
        fs::read_to_string(p.join(".state/var-lib-extensions.bind/x.sysext.raw")).unwrap(),
        "sysext\n"
    );
    assert_eq!(fs::read_to_string(p.join("from-run")).unwrap(), "l\n");
    // The mounts were run.sh's own: this system's directories are untouched.
    assert!(!sys.path().join("var/lib/extensions/x.sysext.raw").exists());
    assert!(!sys.path().join("usr/local/from-run").exists());
    assert_eq!(
        fs::read_to_string(p.join(".state/var-lib-rancher.bind/k3s/server/static/hello.txt"))
            .unwrap(),
        "hi"
    );
    assert_eq!(fs::read_to_string(p.join("bin/tool")).unwrap(), "bin");
    assert_eq!(
        fs::read_to_string(p.join(".state/var-lib-extensions.bind/x.raw")).unwrap(),
        "ext"
    );
    assert_eq!(
        fs::read_to_string(o.join("95_bundle.yaml")).unwrap(),
        "#cloud-config\n"
    );
    // Recorded on the new disk, at its /usr/local/.kairos/bundles.
    let rec = Record::read(&p, Path::new("/.kairos/bundles")).unwrap();
    assert_eq!(rec.applied[&target], digest);
    assert!(rec.applied.contains_key(&local));
    assert!(rec.applied.contains_key(&run_target));
    assert_eq!(rec.applied.len(), 3);
    assert!(!p.join(".kairos/bundle-work").exists());
}

#[test]
fn a_bundle_with_a_file_outside_the_persistent_paths_is_refused() {
    let t = Tree::new();
    let img = tempfile::tempdir().unwrap();
    image(
        img.path(),
        &[
            E::File("usr/local/bin/ok", "ok", 0o755),
            E::File("usr/bin/evil", "evil", 0o755),
            E::File("etc/passwd", "root::0:0::/:/bin/sh\n", 0o644),
        ],
    );
    let target = format!("container://ocifile:{}", img.path().display());
    let l = loaded(&format!(
        "fail_on_bundles_errors: true\nbundles:\n- targets: [\"{target}\"]\n"
    ));
    let (r, _, _) = run(|_, e| at_boot(&t.ctx, &l, e));
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains(&format!("bundle {target}: "))
            && e.contains("would land outside the persistent paths")
            && e.contains(
                "/etc/passwd would land outside the persistent paths (/usr/local, /oem, /etc/cni, "
            )
            && e.contains("(and 2 more entries outside)")
            && e.contains("nothing was installed"),
        "{e}"
    );
    assert!(
        e.contains("/etc/passwd") || e.contains("/usr/bin/evil"),
        "{e}"
    );
    assert!(!t.ctx.path("/usr/local/bin/ok").exists(), "nothing written");
    assert!(!t.ctx.path("/usr/bin/evil").exists());
    assert!(record(&t).applied.is_empty());
    let l = loaded(&format!(
        "fail_on_bundles_errors: true\nbundles:\n- targets: [\"{target}\"]\n  rootfs_path: /usr/local/../\n"
    ));
    let e = run(|_, e| at_boot(&t.ctx, &l, e))
        .0
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/usr/local/../: rootfs_path must not contain `..`"),
        "{e}"
    );
    // rootfs_path moves everything: a bundle for / is fine under /usr/local.
    let l = loaded(&format!(
        "bundles:\n- targets: [\"{target}\"]\n  rootfs_path: /usr/local/sysroot\n"
    ));
    let (r, _, log) = run(|_, e| at_boot(&t.ctx, &l, e));
    r.unwrap();
    assert!(log.contains("applied"), "{log}");
    assert_eq!(
        fs::read_to_string(t.ctx.path("/usr/local/sysroot/usr/bin/evil")).unwrap(),
        "evil"
    );
}

#[test]
fn a_layer_entry_escaping_the_tree_is_refused() {
    let t = Tree::new();
    let img = tempfile::tempdir().unwrap();
    image(img.path(), &[E::RawName("../../escaped")]);
    let target = format!("run://ocifile:{}", img.path().display());
    let e = install_bundle(
        &t.ctx,
        &InstallOptions {
            target: target.clone(),
            local_file: false,
            rootfs_path: None,
            repository: None,
        },
        &mut Vec::new(),
        &mut Vec::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("bundle {target}: "))
            && e.contains("\"../../escaped\" would land outside the root"),
        "{e}"
    );
    assert!(!t.ctx.path(WORK).exists());
}

#[test]
fn a_run_bundle_runs_its_script_once_per_digest() {
    let t = Tree::new();
    let out = t.ctx.path("/ran");
    let script = format!(
        "#!/bin/sh\nset -e\necho \"$BUNDLE_TARGET|$(pwd)|$CONTAINERDIR|$(cat assets/a)\" >> {}\necho done\n",
        out.display()
    );
    let img = tempfile::tempdir().unwrap();
    let d1 = image(
        img.path(),
        &[
            E::File("run.sh", &script, 0o644),
            E::File("assets/a", "v1", 0o644),
        ],
    );
    let reference = format!("ocifile:{}", img.path().display());
    let target = format!("run://{reference}");
    let l = loaded(&format!("bundles:\n- targets:\n  - {target}\n"));
    let (r, _, log) = run(|_, e| at_boot(&t.ctx, &l, e));
    r.unwrap();
    assert!(
        log.contains(&format!("bundle {target}: run.sh: done")),
        "{log}"
    );
    let ran = fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = ran.lines().collect();
    assert_eq!(lines.len(), 1, "{ran}");
    let f: Vec<&str> = lines[0].split('|').collect();
    assert_eq!(
        f[0], reference,
        "BUNDLE_TARGET is the reference without its type"
    );
    assert_eq!(f[1], f[2], "run in CONTAINERDIR");
    assert!(
        f[1].starts_with(&t.ctx.path(WORK).display().to_string()),
        "{}",
        f[1]
    );
    assert_eq!(f[3], "v1");
    assert_eq!(record(&t).applied[&target], d1);
    // A reboot does not run it again.
    run(|_, e| at_boot(&t.ctx, &l, e)).0.unwrap();
    assert_eq!(fs::read_to_string(&out).unwrap().lines().count(), 1);
    // The source unreachable on a later boot: what was applied stays, said, even with
    // fail_on_bundles_errors.
    let moved = img.path().with_extension("away");
    fs::rename(img.path(), &moved).unwrap();
    let strict = loaded(&format!(
        "fail_on_bundles_errors: true\nbundles:\n- targets:\n  - {target}\n"
    ));
    let (r, _, log) = run(|_, e| at_boot(&t.ctx, &strict, e));
    r.unwrap();
    assert!(
        log.contains(&format!(
            "{d1} was applied before, kept (checked again on the next boot)"
        )) && log.contains("does not exist"),
        "{log}"
    );
    fs::rename(&moved, img.path()).unwrap();
    // A new image under the same name (a moved tag): applied again.
    fs::remove_dir_all(img.path()).unwrap();
    let d2 = image(
        img.path(),
        &[
            E::File("run.sh", &script, 0o644),
            E::File("assets/a", "v2", 0o644),
        ],
    );
    assert_ne!(d1, d2);
    run(|_, e| at_boot(&t.ctx, &l, e)).0.unwrap();
    let ran = fs::read_to_string(&out).unwrap();
    assert_eq!(ran.lines().count(), 2);
    assert!(ran.ends_with("|v2\n"), "{ran}");
    assert_eq!(record(&t).applied[&target], d2);
    // Not on a recovery boot.
    t.file("/run/cos/recovery_mode", "");
    let l2 = loaded("bundles:\n- targets: [\"run://dir:/nonexistent\"]\n");
    let (r, _, log) = run(|_, e| at_boot(&t.ctx, &l2, e));
    assert!(r.is_ok() && log.is_empty(), "{log}");
}

#[test]
fn a_failing_run_sh_names_the_bundle_and_its_exit_status() {
    let t = Tree::new();
    let img = tempfile::tempdir().unwrap();
    image(
        img.path(),
        &[E::File(
            "run.sh",
            "#!/bin/sh\necho boom >&2\nexit 3\n",
            0o755,
        )],
    );
    let target = format!("run://ocifile:{}", img.path().display());
    // Without fail_on_bundles_errors: said, and the boot goes on.
    let l = loaded(&format!("bundles:\n- targets: [\"{target}\"]\n"));
    let (r, _, log) = run(|_, e| at_boot(&t.ctx, &l, e));
    r.unwrap();
    assert!(
        log.contains(&format!(
            "kairos-agent: error: bundle {target}: run.sh failed (exit status 3): boom"
        )),
        "{log}"
    );
    assert!(
        log.contains("1 bundle(s) failed; going on (fail_on_bundles_errors is not set)"),
        "{log}"
    );
    assert!(
        record(&t).applied.is_empty(),
        "a failed bundle is not recorded"
    );
    assert!(!t.ctx.path(WORK).exists(), "the unpacked image is removed");
    // With it: the error.
    let l = loaded(&format!(
        "fail_on_bundles_errors: true\nbundles:\n- targets: [\"{target}\"]\n"
    ));
    let (r, _, _) = run(|_, e| at_boot(&t.ctx, &l, e));
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "bundle {target}: run.sh failed (exit status 3): boom"
        )),
        "{e}"
    );
    // No run.sh at all.
    let img2 = tempfile::tempdir().unwrap();
    image(img2.path(), &[E::File("other", "x", 0o644)]);
    let target2 = format!("run://ocifile:{}", img2.path().display());
    let l = loaded(&format!(
        "fail_on_bundles_errors: true\nbundles:\n- targets: [\"{target2}\"]\n"
    ));
    let e = run(|_, e| at_boot(&t.ctx, &l, e))
        .0
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("bundle {target2}: the image has no run.sh")),
        "{e}"
    );
}

#[test]
fn install_bundle_applies_a_directory_bundle_now_under_the_root() {
    let t = Tree::new();
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("usr/local/share")).unwrap();
    fs::write(src.path().join("usr/local/share/a.txt"), "a").unwrap();
    let opts = InstallOptions {
        target: format!("docker://dir:{}", src.path().display()),
        local_file: false,
        rootfs_path: None,
        repository: Some("docker://quay.io/kairos/packages".into()),
    };
    let (r, out, log) = run(|o, e| install_bundle(&t.ctx, &opts, o, e));
    assert!(matches!(r, Ok(Outcome::Done)), "{r:?}");
    assert!(out.contains(": applied sha256:"), "{out}");
    assert!(log.contains("--repository is luet's and not used"), "{log}");
    assert_eq!(
        fs::read_to_string(t.ctx.path("/usr/local/share/a.txt")).unwrap(),
        "a"
    );
    assert!(
        src.path().join("usr/local/share/a.txt").exists(),
        "the source is untouched"
    );
    // install-bundle applies again even when recorded (the same digest).
    fs::remove_file(t.ctx.path("/usr/local/share/a.txt")).unwrap();
    let (r, out, _) = run(|o, e| install_bundle(&t.ctx, &opts, o, e));
    r.unwrap();
    assert!(out.contains(": applied sha256:"), "{out}");
    assert!(t.ctx.path("/usr/local/share/a.txt").exists());
    // A target without a type.
    let bad = InstallOptions {
        target: "quay.io/x/y:1".into(),
        ..opts
    };
    let e = install_bundle(&t.ctx, &bad, &mut Vec::new(), &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("no type"), "{e}");
}

/// A `docker save` archive at `out`: manifest.json, `<hex>.json` config, `<hex>/layer.tar`
/// (listed twice when `twice`, as Docker does for identical layers). `tamper` changes the
/// layer after its diff_id was taken. Returns the config's digest.
fn docker_save(out: &Path, entries: &[E], twice: bool, tamper: bool) -> String {
    let mut l = layer(entries);
    let diff_id = oci::sha256_digest(&l);
    if tamper {
        let last = l.len() - 1;
        l[last] ^= 1;
    }
    let ids = if twice {
        vec![diff_id.clone(), diff_id.clone()]
    } else {
        vec![diff_id.clone()]
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": ids},
    }))
    .unwrap();
    let cd = oci::sha256_digest(&config);
    let chex = cd.trim_start_matches("sha256:");
    let lname = format!("{}/layer.tar", diff_id.trim_start_matches("sha256:"));
    let layers = if twice {
        vec![lname.clone(), lname.clone()]
    } else {
        vec![lname.clone()]
    };
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": format!("{chex}.json"), "RepoTags": ["bundle:1"], "Layers": layers}
    ]))
    .unwrap();
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    for (name, data) in [
        (lname.as_str(), l.as_slice()),
        (&format!("{chex}.json"), config.as_slice()),
        ("manifest.json", manifest.as_slice()),
    ] {
        let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
        b.append_data(&mut h, name, data).unwrap();
    }
    b.into_inner().unwrap();
    cd
}

#[test]
fn a_docker_save_archive_is_a_local_bundle_checked_against_its_diff_ids() {
    let t = Tree::new();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("bundle.tar");
    let digest = docker_save(
        &archive,
        &[E::File("usr/local/share/from-docker.txt", "d", 0o644)],
        true,
        false,
    );
    let target = format!("container://{}", archive.display());
    let l = loaded(&format!(
        "fail_on_bundles_errors: true\nbundles:\n- targets: [\"{target}\"]\n  local_file: true\n"
    ));
    let (r, _, log) = run(|_, e| at_boot(&t.ctx, &l, e));
    r.unwrap();
    assert!(log.contains(&format!("applied {digest}")), "{log}");
    assert_eq!(
        fs::read_to_string(t.ctx.path("/usr/local/share/from-docker.txt")).unwrap(),
        "d"
    );
    assert_eq!(record(&t).applied[&target], digest);
    // A layer that is not what the config's diff_ids say: refused, named, nothing applied.
    let bad = dir.path().join("bad.tar");
    docker_save(
        &bad,
        &[E::File("usr/local/share/bad.txt", "b", 0o644)],
        false,
        true,
    );
    let target = format!("container://{}", bad.display());
    let l = loaded(&format!(
        "fail_on_bundles_errors: true\nbundles:\n- targets: [\"{target}\"]\n  local_file: true\n"
    ));
    let e = run(|_, e| at_boot(&t.ctx, &l, e))
        .0
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "bundle {target}: {}: layer 1/1 sha256:",
            bad.display()
        )) && e.contains("refusing the image"),
        "{e}"
    );
    assert!(!t.ctx.path("/usr/local/share/bad.txt").exists());
}

#[test]
fn on_a_booted_system_only_the_mounted_persistent_paths_take_files() {
    let t = Tree::new();
    // /usr/local (COS_PERSISTENT) and the /etc/ssh bind are mounted; /var/lib/rancher is not.
    t.file(
        "/proc/self/mountinfo",
        "22 1 8:4 / / ro,relatime - ext4 /dev/loop0 ro\n\
         30 22 8:5 / /usr/local rw,relatime - ext4 /dev/sda5 rw\n\
         31 22 8:5 /.state/etc-ssh.bind /etc/ssh rw,relatime - ext4 /dev/sda5 rw\n",
    );
    let paths = running_paths(&t.ctx, &[]);
    assert_eq!(paths, ["/usr/local", "/etc/ssh"]);
    let img = tempfile::tempdir().unwrap();
    image(
        img.path(),
        &[
            E::File(
                "etc/ssh/sshd_config.d/10-bundle.conf",
                "X11Forwarding no\n",
                0o644,
            ),
            E::File("var/lib/rancher/k3s/x.yaml", "x", 0o644),
        ],
    );
    let target = format!("container://ocifile:{}", img.path().display());
    let opts = InstallOptions {
        target: target.clone(),
        local_file: false,
        rootfs_path: None,
        repository: None,
    };
    let e = install_bundle(&t.ctx, &opts, &mut Vec::new(), &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/var/lib/rancher/k3s/x.yaml would land outside the persistent paths (/usr/local, /etc/ssh)"),
        "{e}"
    );
    assert!(!t.ctx.path("/etc/ssh/sshd_config.d/10-bundle.conf").exists());
}
