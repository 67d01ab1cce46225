//! The corpus of cloud-configs shaped like upstream's documentation examples
//! (tests/fixtures/kairos-docs/): each validates, each key in it is in the registry, and each
//! registry entry either names a test that exists or is refused out loud when loaded. A key
//! accepted without a test or a not-supported text fails here.

use std::path::{Path, PathBuf};

use kairos_agent::Ctx;
use kairos_agent::config::keys::{KEYS, Support};
use kairos_agent::config::{LoadOptions, validate};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate lives in the workspace")
        .to_owned()
}

fn fixtures() -> Vec<PathBuf> {
    let dir = repo().join("tests/fixtures/kairos-docs");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

/// Every `fn NAME(` in the Rust sources under agent/, init/, build/ and tests/.
fn test_fns() -> std::collections::BTreeSet<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name();
            if name == "target" || name.to_string_lossy().starts_with('.') {
                continue;
            }
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    for d in ["agent", "init", "build", "tests"] {
        walk(&repo().join(d), &mut files);
    }
    let mut names = std::collections::BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for (i, _) in text.match_indices("fn ") {
            let rest = &text[i + 3..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if rest[end..].starts_with('(') || rest[end..].starts_with('<') {
                names.insert(rest[..end].to_owned());
            }
        }
    }
    names
}

/// A root with a machine id (the fixtures use `.MachineID`) and nothing else.
fn root() -> (tempfile::TempDir, Ctx) {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::create_dir_all(dir.path().join("etc")).expect("etc");
    std::fs::create_dir_all(dir.path().join("oem")).expect("oem");
    std::fs::write(
        dir.path().join("etc/machine-id"),
        "c0ffee00112233445566778899aabbcc\n",
    )
    .expect("machine-id");
    let ctx = Ctx::new(dir.path(), "/oem/grubenv");
    (dir, ctx)
}

#[test]
fn every_registry_entry_names_a_test_that_exists_or_says_why_not() {
    let fns = test_fns();
    let mut bad = Vec::new();
    for k in KEYS {
        match k.support {
            Support::Shown(t) if !fns.contains(t) => bad.push(format!(
                "{}: no fn {t}( under agent/ init/ build/ tests/",
                k.path
            )),
            Support::Unsupported(why) if why.trim().is_empty() => {
                bad.push(format!("{}: an empty not-supported text", k.path))
            }
            _ => {}
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_kairos_docs_corpus_validates_and_every_key_is_shown_or_refused() {
    let files = fixtures();
    assert!(files.len() >= 15, "the corpus has {} files", files.len());
    let fns = test_fns();
    let (_dir, ctx) = root();
    let mut problems = Vec::new();
    let mut seen = 0;
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            text.lines().take(6).any(|l| l.contains("docs/")),
            "{name}: name the upstream docs page it covers in a comment"
        );
        let r = validate::check(&ctx, &name, &text);
        problems.extend(r.errors.iter().map(|e| format!("error: {e}")));
        problems.extend(
            r.warnings
                .iter()
                .filter(|w| w.contains("unknown key"))
                .map(|w| format!("not in the registry: {w}")),
        );
        // Loaded as the agent loads it (from /oem), each refused key is said by name.
        let oem = ctx.path("/oem").join(&name);
        std::fs::write(&oem, &text).expect("writing the fixture into the root");
        let loaded = kairos_agent::sources::load(
            &ctx,
            &LoadOptions {
                fetch: false,
                ..LoadOptions::default()
            },
        );
        std::fs::remove_file(&oem).expect("removing the fixture");
        for (path, key) in &r.accepted {
            seen += 1;
            match key.support {
                Support::Shown(t) if !fns.contains(t) => problems.push(format!(
                    "{name}: {path} points at {t}, which is no fn in the repository"
                )),
                Support::Shown(_) => {}
                Support::Unsupported(why) => {
                    let said = format!("not supported: key {path:?} (in /oem/{name}): {why}");
                    if !loaded.warnings.contains(&said) {
                        problems.push(format!(
                            "{name}: loading it does not say {said:?}; it said {:?}",
                            loaded.warnings
                        ));
                    }
                }
            }
        }
    }
    assert!(seen > 100, "only {seen} key paths in the corpus");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `kairos-agent validate FILE` through the binary: every fixture is valid (exit 0, the
/// refused keys still printed); a broken file exits 1 naming its line and column.
#[test]
fn validate_through_the_binary_exits_0_for_the_corpus_and_1_for_errors() {
    let (dir, _ctx) = root();
    let run = |file: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kairos-agent"))
            .arg("--root")
            .arg(dir.path())
            .arg("validate")
            .arg(file)
            .output()
            .expect("running kairos-agent")
    };
    let k0s = repo().join("tests/fixtures/kairos-docs/19-k0s.yaml");
    let o = run(&k0s);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains(
            ":5: warning: not supported: key \"k0s\": k0s is not supported by this agent; use k3s\n"
        ),
        "{out}"
    );
    assert!(
        out.ends_with("19-k0s.yaml: valid (1 warning(s))\n"),
        "{out}"
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "#cloud-config\nk3s:\n  enabled: [yes\n").expect("writing");
    let o = run(&bad);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let first = out.lines().next().unwrap_or_default();
    let prefix = format!("{}:", bad.display());
    let loc: Vec<&str> = first
        .strip_prefix(&prefix)
        .unwrap_or_default()
        .splitn(3, ':')
        .collect();
    assert!(
        loc.len() == 3 && loc[0].parse::<u32>().is_ok() && loc[1].parse::<u32>().is_ok(),
        "FILE:LINE:COL expected: {out}"
    );
    assert!(out.ends_with("bad.yaml: invalid (1 error(s))\n"), "{out}");
    for f in fixtures() {
        let o = run(&f);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&o.stdout)
        );
    }
}
