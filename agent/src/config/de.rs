//! Serde helpers: Kairos values arrive loosely typed (`"true"` from the command line,
//! `0644` as a string, one string where a list is expected), so the typed model accepts
//! what upstream's Go decoding accepts.

use std::collections::BTreeMap;

use serde::de::Error;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

pub fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(opt_string(d)?.unwrap_or_default())
}

pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => scalar_string(&v)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected a string, found {}", kind(&v)))),
    }
}

pub fn parse_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Some(true),
            "false" | "no" | "off" | "0" | "" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        _ => None,
    }
}

pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => parse_bool(&v)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected true or false, found {v}"))),
    }
}

pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(opt_bool(d)?.unwrap_or(false))
}

pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => scalar_string(&v)
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected a number, found {v}"))),
    }
}

/// A list of strings; one scalar counts as a list of one.
pub fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|v| {
                scalar_string(v).ok_or_else(|| {
                    D::Error::custom(format!("expected a list of strings, found {}", kind(v)))
                })
            })
            .collect(),
        v => scalar_string(&v).map(|s| vec![s]).ok_or_else(|| {
            D::Error::custom(format!("expected a list of strings, found {}", kind(&v)))
        }),
    }
}

/// Groups: a list, or one comma-separated string (cloud-init).
pub fn groups<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(strings(d)?
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

/// Commands: strings, or argv lists (cloud-init `runcmd`), quoted into one shell line.
pub fn commands<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let items = match Value::deserialize(d)? {
        Value::Null => return Ok(Vec::new()),
        Value::Array(items) => items,
        v => vec![v],
    };
    items
        .iter()
        .map(|v| match v {
            Value::Array(argv) => argv
                .iter()
                .map(|a| scalar_string(a).map(|s| shell_quote(&s)))
                .collect::<Option<Vec<_>>>()
                .map(|w| w.join(" "))
                .ok_or_else(|| D::Error::custom("expected a command line or a list of words")),
            v => scalar_string(v)
                .ok_or_else(|| D::Error::custom(format!("expected a command, found {}", kind(v)))),
        })
        .collect()
}

pub fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(BTreeMap::new()),
        Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| match v {
                Value::Null => Ok((k, String::new())),
                v => scalar_string(&v).map(|s| (k.clone(), s)).ok_or_else(|| {
                    D::Error::custom(format!("{k}: expected a string, found {}", kind(&v)))
                }),
            })
            .collect(),
        // `env: ["A=1", "B=2"]`, the form `install.env` uses upstream.
        Value::Array(items) => items
            .iter()
            .map(|v| {
                let s = scalar_string(v).unwrap_or_default();
                s.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| D::Error::custom(format!("expected KEY=VALUE, found {s:?}")))
            })
            .collect(),
        v => Err(D::Error::custom(format!(
            "expected a mapping, found {}",
            kind(&v)
        ))),
    }
}

pub fn opt<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

pub fn list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// A mapping whose null values are the default (`stages: {boot: null}`, `users: {bob: null}`).
pub fn map_defaults<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<BTreeMap<String, T>, D::Error> {
    let m = Option::<BTreeMap<String, Option<T>>>::deserialize(d)?.unwrap_or_default();
    Ok(m.into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect())
}

pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What a value is, for messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// A file mode: a number as it is, a string as octal.
pub fn mode<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n <= 0o7777)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("permissions {n}: out of range"))),
        // A string is octal (`"0644"`, and `0644` which the reader keeps as a string).
        Value::String(s) => {
            let t = s.trim();
            let t = t.strip_prefix("0o").unwrap_or(t);
            u32::from_str_radix(t, 8)
                .ok()
                .filter(|n| *n <= 0o7777)
                .map(Some)
                .ok_or_else(|| D::Error::custom(format!("permissions {s:?}: not an octal mode")))
        }
        v => Err(D::Error::custom(format!(
            "permissions: expected a mode, found {v}"
        ))),
    }
}

pub fn keys_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    struct Keys(#[serde(deserialize_with = "strings")] Vec<String>);
    let m = Option::<BTreeMap<String, Keys>>::deserialize(d)?.unwrap_or_default();
    Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
}
