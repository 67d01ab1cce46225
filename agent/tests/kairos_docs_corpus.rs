//! The corpus of cloud-configs shaped like upstream's documentation examples
//! (tests/fixtures/kairos-docs/): each validates, each key in it is in the registry, and each
//! registry entry either names a test that exists or is refused out loud when loaded. A key
//! accepted without a test or a not-supported text fails here.

use std::path::{Path, PathBuf};

use kairos_agent::Ctx;
use kairos_agent::config::keys::{KEYS, Lookup, Support, lookup};
use kairos_agent::config::{Config, LoadOptions, validate};
use serde_json::{Value, json};

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

/// Every test function (`fn NAME(` with `#[test]` or another test attribute, such as
/// `#[tokio::test]`, among the attributes right above it) in the Rust sources under agent/,
/// init/, build/ and tests/.
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
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            if let Some(name) = fn_name(line)
                && is_test(&lines[..n])
            {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// The name of the function a line declares (`fn NAME(` or `fn NAME<`), if any.
fn fn_name(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.starts_with("//") {
        return None;
    }
    let (i, _) = t
        .match_indices("fn ")
        .find(|(i, _)| *i == 0 || t[..*i].ends_with(' '))?;
    let rest = &t[i + 3..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    (end > 0 && (rest[end..].starts_with('(') || rest[end..].starts_with('<')))
        .then(|| &rest[..end])
}

/// Whether the item whose `fn` line follows `before` carries a test attribute: the lines
/// right above it that are attributes, comments or a multi-line attribute's inside (up to
/// the previous item's end or a blank line) hold `#[test]` or a `#[...::test]`.
fn is_test(before: &[&str]) -> bool {
    for l in before.iter().rev().take(12) {
        let t = l.trim();
        if t.starts_with("//") {
            continue;
        }
        if t.is_empty() || t.ends_with('}') || t.ends_with(';') || t.ends_with('{') {
            return false;
        }
        if t == "#[test]"
            || t.starts_with("#[test]")
            || (t.starts_with("#[") && t.contains("::test"))
        {
            return true;
        }
    }
    false
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
                "{}: no #[test] fn {t}( under agent/ init/ build/ tests/",
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
fn the_test_guard_tells_tests_from_other_fns() {
    let lines = [
        "    /// Says why.",
        "    #[test]",
        "    #[ignore = \"slow\"]",
        "    fn a_test() {",
        "    }",
        "    fn helper() -> u8 {",
        "    #[tokio::test]",
        "    async fn an_async_test() {",
    ];
    assert_eq!(fn_name(lines[3]), Some("a_test"));
    assert_eq!(fn_name(lines[7]), Some("an_async_test"));
    assert_eq!(fn_name("    // fn commented_out() {"), None);
    assert!(is_test(&lines[..3]));
    assert!(!is_test(&lines[..5]), "helper() follows a closed item");
    assert!(is_test(&lines[..7]));
    let fns = test_fns();
    assert!(fns.contains("every_registry_entry_names_a_test_that_exists_or_says_why_not"));
    assert!(!fns.contains("test_fns"), "a helper is no test");
    assert!(!fns.contains("fn_name"), "a helper is no test");
}

/// Every field of the typed config (agent/src/config/schema.rs), under the name a user
/// writes (serde renames and aliases included), resolves to a registry entry: a field added
/// to the schema without one fails here. The field names come from the types themselves: the
/// default Config serialised, each empty Option, list and map then filled with `{}`, `[{}]`
/// or one entry and kept when the real deserialiser accepts it, until nothing grows.
#[test]
fn every_typed_config_field_has_a_registry_entry() {
    let mut tree = serde_json::to_value(Config::default()).expect("Config serialises");
    let mut tried = std::collections::BTreeSet::new();
    loop {
        let mut grown = false;
        for hole in holes(&tree, "", &mut Vec::new()) {
            if !tried.insert(hole.clone()) {
                continue;
            }
            for fill in [
                json!({}),
                json!([{}]),
                json!({"x": {}}),
                json!({"x": [{}]}),
                json!({"x": ""}),
            ] {
                let mut t = tree.clone();
                let Some(slot) = t.pointer_mut(&hole) else {
                    break;
                };
                *slot = fill;
                let Ok(c) = serde_json::from_value::<Config>(t) else {
                    continue;
                };
                let back = serde_json::to_value(c).expect("Config serialises");
                if paths(&back).len() > paths(&tree).len() {
                    tree = back;
                    grown = true;
                    break;
                }
            }
        }
        if !grown {
            break;
        }
    }
    let all = paths(&tree);
    // The types reach this far; fewer means the filling stopped working.
    for p in [
        "stages.x.users.x.primary_group",
        "stages.x.systemctl.overrides.service",
        "install.partitions.oem.size",
        "install.extra-partitions.fs",
        "p2p.auto.ha.master_nodes",
        "k3s-agent.env",
        "kubevip.eip",
    ] {
        assert!(all.contains_key(p), "{p} not reached: {:?}", all.keys());
    }
    let mut bad = Vec::new();
    for (path, leaf) in &all {
        let segs: Vec<&str> = path.split('.').collect();
        match lookup(&segs) {
            Lookup::Unknown => bad.push(format!("{path}: a schema field with no registry entry")),
            Lookup::Parent if *leaf => bad.push(format!(
                "{path}: a schema field only its sub-keys are registered for"
            )),
            _ => {}
        }
    }
    // Aliases: each struct with one is found in the tree by its field names, and the alias
    // at the same place must resolve too.
    let structs = schema_structs();
    let mut matched = std::collections::BTreeSet::new();
    for (path, fields) in objects(&tree, "") {
        for (name, declared) in &structs {
            let names: std::collections::BTreeSet<&str> =
                declared.iter().map(|(n, _)| n.as_str()).collect();
            if names != fields.iter().map(String::as_str).collect() {
                continue;
            }
            matched.insert(name.clone());
            for alias in declared.iter().flat_map(|(_, a)| a) {
                let full = if path.is_empty() {
                    alias.clone()
                } else {
                    format!("{path}.{alias}")
                };
                let segs: Vec<&str> = full.split('.').collect();
                if matches!(lookup(&segs), Lookup::Unknown) {
                    bad.push(format!(
                        "{full}: a serde alias ({name}) with no registry entry"
                    ));
                }
            }
        }
    }
    for (name, declared) in &structs {
        if declared.iter().any(|(_, a)| !a.is_empty()) && !matched.contains(name) {
            bad.push(format!(
                "schema.rs: {name} has aliases but was not found in the config tree"
            ));
        }
    }
    assert!(
        structs
            .iter()
            .filter(|(_, d)| d.iter().any(|(_, a)| !a.is_empty()))
            .count()
            >= 3,
        "schema.rs parsing found too few aliases: {structs:?}"
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// JSON pointers to the null values, empty lists and empty maps of `v` that may still be
/// filled: not below a free-form (`.**`) or not-supported registry entry, not too deep.
fn holes(v: &Value, ptr: &str, dotted: &mut Vec<String>) -> Vec<String> {
    let stop = |dotted: &[String]| {
        let segs: Vec<&str> = dotted.iter().map(String::as_str).collect();
        dotted.len() > 8
            || matches!(lookup(&segs), Lookup::Key(k)
                if k.path.ends_with(".**") || matches!(k.support, Support::Unsupported(_)))
    };
    let mut out = Vec::new();
    match v {
        Value::Null => out.push(ptr.to_owned()),
        Value::Array(a) if a.is_empty() => out.push(ptr.to_owned()),
        Value::Object(m) if m.is_empty() => out.push(ptr.to_owned()),
        Value::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                out.extend(holes(item, &format!("{ptr}/{i}"), dotted));
            }
        }
        Value::Object(m) => {
            for (k, item) in m {
                dotted.push(k.clone());
                if !stop(dotted) {
                    out.extend(holes(item, &format!("{ptr}/{k}"), dotted));
                }
                dotted.pop();
            }
        }
        _ => {}
    }
    out
}

/// Every key path of `v` (list items transparent), with whether it is a leaf (no keys below).
fn paths(v: &Value) -> std::collections::BTreeMap<String, bool> {
    fn go(v: &Value, at: &str, out: &mut std::collections::BTreeMap<String, bool>) {
        match v {
            Value::Object(m) => {
                for (k, item) in m {
                    let p = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    let before = out.len();
                    go(item, &p, out);
                    let leaf = out.len() == before;
                    out.entry(p).and_modify(|l| *l &= leaf).or_insert(leaf);
                }
            }
            Value::Array(a) => a.iter().for_each(|i| go(i, at, out)),
            _ => {}
        }
    }
    let mut out = std::collections::BTreeMap::new();
    go(v, "", &mut out);
    out
}

/// Every map of `v` with its dotted path and keys.
fn objects(v: &Value, at: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    match v {
        Value::Object(m) => {
            out.push((at.to_owned(), m.keys().cloned().collect()));
            for (k, item) in m {
                let p = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                out.extend(objects(item, &p));
            }
        }
        Value::Array(a) => a.iter().for_each(|i| out.extend(objects(i, at))),
        _ => {}
    }
    out
}

/// A struct of schema.rs: its name, and each field's serialised name with its serde aliases.
type SchemaStruct = (String, Vec<(String, Vec<String>)>);

/// schema.rs's structs: each field's serialised name (`rename` or the field's own) and its
/// serde aliases.
fn schema_structs() -> Vec<SchemaStruct> {
    let file = repo().join("agent/src/config/schema.rs");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let quoted = |attrs: &str, key: &str| -> Vec<String> {
        let pat = format!("{key} = \"");
        attrs
            .match_indices(&pat)
            .filter(|(i, _)| !attrs[..*i].ends_with('_'))
            .filter_map(|(i, _)| {
                let rest = &attrs[i + pat.len()..];
                rest.find('"').map(|e| rest[..e].to_owned())
            })
            .collect()
    };
    let mut out = Vec::new();
    let mut current: Option<SchemaStruct> = None;
    let mut attrs = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if rest.trim_end().ends_with('{') {
                current = Some((name, Vec::new()));
                attrs.clear();
            }
            continue;
        }
        if line.starts_with('}') {
            out.extend(current.take());
            continue;
        }
        let Some((_, fields)) = current.as_mut() else {
            continue;
        };
        let t = line.trim();
        if t.starts_with("//") {
            continue;
        }
        if let Some(rest) = t.strip_prefix("pub ")
            && let Some((field, _)) = rest.split_once(':')
        {
            let serialised = quoted(&attrs, "rename")
                .into_iter()
                .next()
                .unwrap_or_else(|| field.trim().to_owned());
            fields.push((serialised, quoted(&attrs, "alias")));
            attrs.clear();
        } else {
            attrs.push_str(t);
        }
    }
    out
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
                    "{name}: {path} points at {t}, which is no #[test] fn in the repository"
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
