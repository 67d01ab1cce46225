//! Dotted-path queries into a JSON tree, for `config get KEY` and `state get KEY` (upstream
//! runs a jq expression `.KEY`; the paths scripts use are plain dotted paths, sometimes with
//! list indices: `k3s.enabled`, `users.0.name`, `users[0].name`, `.install.device`).
//!
//! A scalar prints bare (a string without quotes, so `$(kairos-agent config get hostname)`
//! is the hostname), a map or a list prints as YAML.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("key {key:?}: empty path segment (a path is like install.device or users.0.name)")]
    EmptySegment { key: String },
    #[error("key {key:?}: {segment:?} is not a list index (a number in [...])")]
    BadIndex { key: String, segment: String },
    /// The key is not there; `at` is the longest prefix that exists ("" for the top).
    #[error("{}", absent_message(key, at, why))]
    Absent {
        key: String,
        at: String,
        why: String,
    },
}

fn absent_message(key: &str, at: &str, why: &str) -> String {
    if at.is_empty() {
        format!("key {key:?} not found: {why}")
    } else {
        format!("key {key:?} not found: {at} {why}")
    }
}

/// One step of a path: a map key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Splits `a.b[0].c` / `a.b.0.c` / `.a.b` into steps. A purely numeric dotted segment is a
/// key for a map and an index for a list (decided while walking).
fn parse(key: &str) -> Result<Vec<Step>, QueryError> {
    let trimmed = key.strip_prefix('.').unwrap_or(key);
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    for seg in trimmed.split('.') {
        let (name, mut rest) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if name.is_empty() && rest.is_empty() {
            return Err(QueryError::EmptySegment { key: key.into() });
        }
        if !name.is_empty() {
            steps.push(Step::Key(name.into()));
        }
        while !rest.is_empty() {
            let bad = || QueryError::BadIndex {
                key: key.into(),
                segment: seg.into(),
            };
            let inner = rest.strip_prefix('[').ok_or_else(bad)?;
            let close = inner.find(']').ok_or_else(bad)?;
            let n: usize = inner[..close].parse().map_err(|_| bad())?;
            steps.push(Step::Index(n));
            rest = &inner[close + 1..];
        }
    }
    Ok(steps)
}

/// The value at `key` in `root`.
pub fn lookup<'a>(root: &'a Value, key: &str) -> Result<&'a Value, QueryError> {
    let steps = parse(key)?;
    let mut cur = root;
    let mut at = String::new();
    let absent = |at: &str, why: String| QueryError::Absent {
        key: key.into(),
        at: at.into(),
        why,
    };
    for s in steps {
        let (next, shown) = match (&s, cur) {
            (Step::Key(k), Value::Object(m)) => match m.get(k) {
                Some(v) => (v, k.clone()),
                None if at.is_empty() => return Err(absent(&at, format!("no {k:?} at the top"))),
                None => return Err(absent(&at, format!("has no {k:?}"))),
            },
            (Step::Key(k), Value::Array(a)) => match k.parse::<usize>() {
                Ok(i) => match a.get(i) {
                    Some(v) => (v, format!("[{i}]")),
                    None => return Err(absent(&at, format!("has {} items, no [{i}]", a.len()))),
                },
                Err(_) => return Err(absent(&at, format!("is a list, not a map with {k:?}"))),
            },
            (Step::Index(i), Value::Array(a)) => match a.get(*i) {
                Some(v) => (v, format!("[{i}]")),
                None => return Err(absent(&at, format!("has {} items, no [{i}]", a.len()))),
            },
            (Step::Index(i), _) => {
                return Err(absent(&at, format!("is not a list (no [{i}])")));
            }
            (Step::Key(k), other) => {
                let what = match other {
                    Value::Null => "null",
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string",
                    _ => "a value",
                };
                return Err(absent(&at, format!("is {what}, not a map with {k:?}")));
            }
        };
        if shown.starts_with('[') || at.is_empty() {
            at.push_str(&shown);
        } else {
            at.push('.');
            at.push_str(&shown);
        }
        cur = next;
    }
    Ok(cur)
}

/// How a value prints: a scalar bare on one line, a map or list as YAML (several lines).
pub fn render(v: &Value) -> String {
    match v {
        Value::Null => "null\n".into(),
        Value::Bool(b) => format!("{b}\n"),
        Value::Number(n) => format!("{n}\n"),
        Value::String(s) => format!("{s}\n"),
        Value::Array(_) | Value::Object(_) => yaml(v),
    }
}

/// A tree as YAML (serde-saphyr's serializer), ending in one newline.
pub fn yaml(v: &Value) -> String {
    let mut s = match serde_saphyr::to_string(v) {
        Ok(s) => s,
        // serde_json values always serialize; keep JSON as the fallback rather than panic.
        Err(_) => serde_json::to_string_pretty(v).unwrap_or_default(),
    };
    while s.ends_with("\n\n") {
        s.pop();
    }
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tree() -> Value {
        json!({
            "hostname": "node-1",
            "k3s": {"enabled": true, "args": ["--disable", "traefik"]},
            "users": [{"name": "kairos", "groups": ["admin"]}],
            "install": {"device": "/dev/vda", "size": 40},
            "empty": null,
            "1": "numeric key"
        })
    }

    #[test]
    fn paths_reach_scalars_maps_and_list_items() {
        let t = tree();
        assert_eq!(lookup(&t, "hostname").unwrap(), "node-1");
        assert_eq!(lookup(&t, ".hostname").unwrap(), "node-1");
        assert_eq!(lookup(&t, "k3s.enabled").unwrap(), true);
        assert_eq!(lookup(&t, "users.0.name").unwrap(), "kairos");
        assert_eq!(lookup(&t, "users[0].name").unwrap(), "kairos");
        assert_eq!(lookup(&t, "users[0].groups[0]").unwrap(), "admin");
        assert_eq!(lookup(&t, "k3s.args.1").unwrap(), "traefik");
        assert_eq!(lookup(&t, "1").unwrap(), "numeric key");
        assert_eq!(lookup(&t, "").unwrap(), &t);
        assert_eq!(lookup(&t, ".").unwrap(), &t);
        assert_eq!(lookup(&t, "empty").unwrap(), &Value::Null);
    }

    #[test]
    fn absent_keys_say_where_the_path_stopped() {
        let t = tree();
        let e = |k| lookup(&t, k).unwrap_err().to_string();
        assert_eq!(e("nope"), r#"key "nope" not found: no "nope" at the top"#);
        assert_eq!(
            e("k3s.token"),
            r#"key "k3s.token" not found: k3s has no "token""#
        );
        assert_eq!(
            e("users.3.name"),
            r#"key "users.3.name" not found: users has 1 items, no [3]"#
        );
        assert_eq!(
            e("hostname.x"),
            r#"key "hostname.x" not found: hostname is a string, not a map with "x""#
        );
        assert_eq!(
            e("install[0]"),
            r#"key "install[0]" not found: install is not a list (no [0])"#
        );
        assert_eq!(
            e("users.first"),
            r#"key "users.first" not found: users is a list, not a map with "first""#
        );
        assert!(matches!(
            lookup(&t, "a..b"),
            Err(QueryError::EmptySegment { .. })
        ));
        assert!(matches!(
            lookup(&t, "users[x]"),
            Err(QueryError::BadIndex { .. })
        ));
        assert!(matches!(
            lookup(&t, "users[0"),
            Err(QueryError::BadIndex { .. })
        ));
    }

    #[test]
    fn scalars_print_bare_and_trees_as_yaml() {
        let t = tree();
        assert_eq!(render(lookup(&t, "hostname").unwrap()), "node-1\n");
        assert_eq!(render(lookup(&t, "k3s.enabled").unwrap()), "true\n");
        assert_eq!(render(lookup(&t, "install.size").unwrap()), "40\n");
        assert_eq!(render(&Value::Null), "null\n");
        let k3s = render(lookup(&t, "k3s").unwrap());
        let back: Value = serde_saphyr::from_str(&k3s).unwrap();
        assert_eq!(back, t["k3s"], "{k3s}");
        assert!(k3s.contains("enabled: true"), "{k3s}");
        let users = render(lookup(&t, "users").unwrap());
        assert!(users.starts_with("- "), "{users}");
        assert!(users.ends_with('\n') && !users.ends_with("\n\n"));
    }
}
