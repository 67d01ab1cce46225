//! Go-template expressions in cloud-config text, as Kairos users write them:
//! `hostname: node-{{ trunc 4 .MachineID }}`, `{{ .Values.node.hostname }}`,
//! `{{ (index .Values.network 0).macaddress | upper }}`.
//!
//! Upstream (yip) renders a few fields with Go's text/template and Sprig: `hostname` with
//! `.MachineID`, `.UUID`, `.Random`, `.ProtectedID`; commands, file contents, entities,
//! environment values, `if` and `config_url` with `.Values` (zcalusic/sysinfo's tree plus
//! `Random` and `ProtectedID`). Here each source's whole text is rendered once before it is
//! parsed, with one context holding all of those names, so a rendered value still parses
//! as the type it stands for. YAML comment lines are left as they are.
//!
//! The subset: actions `{{ }}` (with `{{-`/`-}}` trimming and `{{/* */}}` comments),
//! pipelines, parentheses, field chains, string/number/bool literals, and the functions
//! upstream's documentation uses (see [`call`]). `if`, `range`, variables and anything else
//! is an error naming the line and the expression, as is an unknown field or function.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A value inside the renderer.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Str(String),
    Int(i64),
    Bool(bool),
    List(Vec<Val>),
    Map(BTreeMap<String, Val>),
    /// A value that could not be had (the text says why); using it is an error.
    Missing(String),
}

impl Val {
    fn map(entries: impl IntoIterator<Item = (&'static str, Val)>) -> Val {
        Val::Map(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    }

    fn empty(&self) -> bool {
        match self {
            Val::Str(s) => s.is_empty(),
            Val::Int(i) => *i == 0,
            Val::Bool(b) => !b,
            Val::List(l) => l.is_empty(),
            Val::Map(m) => m.is_empty(),
            Val::Missing(_) => true,
        }
    }

    /// As Go's fmt prints it.
    fn print(&self, out: &mut String) {
        match self {
            Val::Str(s) => out.push_str(s),
            Val::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Val::Bool(b) => {
                let _ = write!(out, "{b}");
            }
            Val::List(l) => {
                out.push('[');
                for (i, v) in l.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    v.print(out);
                }
                out.push(']');
            }
            Val::Map(m) => {
                out.push_str("map[");
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    out.push_str(k);
                    out.push(':');
                    v.print(out);
                }
                out.push(']');
            }
            Val::Missing(_) => {}
        }
    }

    fn text(&self) -> String {
        let mut s = String::new();
        self.print(&mut s);
        s
    }
}

/// A rendering error: the line (1-based) of the expression, the expression, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {{{{{expr}}}}}: {message}")]
pub struct TemplateError {
    pub line: usize,
    pub expr: String,
    pub message: String,
}

/// Whether `text` has anything to render.
pub fn has_template(text: &str) -> bool {
    text.contains("{{")
}

/// Render `text` with `data` (a map: `.MachineID`, `.Values`, ...).
pub fn render(text: &str, data: &Val) -> Result<String, TemplateError> {
    render_with(text, data, None)
}

/// Go's url.QueryEscape: unreserved characters stay, a space is `+`, the rest `%XX`.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// [`render`], each value passed through `escape` before it is written.
pub fn render_with(
    text: &str,
    data: &Val,
    escape: Option<fn(&str) -> String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut line = 1;
    let mut line_start = true;
    while !rest.is_empty() {
        // A YAML comment line is copied as it is: a note about `{{ }}` is not an action.
        if line_start && rest.trim_start_matches([' ', '\t']).starts_with('#') {
            let end = rest.find('\n').map_or(rest.len(), |i| i + 1);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
            line += 1;
            continue;
        }
        let nl = rest.find('\n');
        let open = rest.find("{{");
        match (open, nl) {
            (Some(o), n) if n.is_none_or(|n| o < n) => {
                out.push_str(&rest[..o]);
                let after = &rest[o + 2..];
                let trim_left = after.starts_with("- ") || after.starts_with("-\t");
                if trim_left {
                    let kept = out.trim_end().len();
                    out.truncate(kept);
                }
                let Some(close) = after.find("}}") else {
                    return Err(TemplateError {
                        line,
                        expr: after.lines().next().unwrap_or("").trim().to_owned(),
                        message: "no closing }}".into(),
                    });
                };
                let mut inner = &after[..close];
                if trim_left {
                    inner = &inner[1..];
                }
                let trim_right = inner.ends_with(" -") || inner.ends_with("\t-");
                if trim_right {
                    inner = &inner[..inner.len() - 1];
                }
                let expr = inner.trim();
                let err = |message: String| TemplateError {
                    line,
                    expr: expr.to_owned(),
                    message,
                };
                if !(expr.starts_with("/*") && expr.ends_with("*/")) {
                    let v = eval_action(expr, data).map_err(err)?;
                    if let Val::Missing(why) = &v {
                        return Err(err(why.clone()));
                    }
                    match escape {
                        Some(f) => out.push_str(&f(&v.text())),
                        None => v.print(&mut out),
                    }
                }
                line += after[..close].matches('\n').count();
                rest = &after[close + 2..];
                if trim_right {
                    let t = rest.trim_start();
                    line += rest[..rest.len() - t.len()].matches('\n').count();
                    rest = t;
                }
                line_start = out.ends_with('\n') || out.is_empty();
            }
            (_, Some(n)) => {
                out.push_str(&rest[..=n]);
                rest = &rest[n + 1..];
                line += 1;
                line_start = true;
            }
            (_, None) => {
                out.push_str(rest);
                rest = "";
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Field(Vec<String>),
    Ident(String),
    Str(String),
    Int(i64),
    Pipe,
    Open,
    Close,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let fields = |i: &mut usize| -> Result<Vec<String>, String> {
        let mut f = Vec::new();
        while *i < b.len() && b[*i] == b'.' {
            *i += 1;
            let start = *i;
            while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'_') {
                *i += 1;
            }
            if start == *i {
                if f.is_empty() && (*i >= b.len() || !b[*i].is_ascii_graphic() || b[*i] == b')') {
                    // `.` alone: the data itself.
                    return Ok(f);
                }
                return Err(format!("a field name is missing after '.' in {s:?}"));
            }
            f.push(s[start..*i].to_owned());
        }
        Ok(f)
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'|' => {
                out.push(Tok::Pipe);
                i += 1;
            }
            b'(' => {
                out.push(Tok::Open);
                i += 1;
            }
            b')' => {
                out.push(Tok::Close);
                i += 1;
                // `(…).field`
                if i < b.len() && b[i] == b'.' {
                    out.push(Tok::Field(fields(&mut i)?));
                }
            }
            b'.' => out.push(Tok::Field(fields(&mut i)?)),
            b'"' => {
                i += 1;
                let mut v = String::new();
                loop {
                    let Some(&ch) = b.get(i) else {
                        return Err("unterminated string".into());
                    };
                    match ch {
                        b'"' => break,
                        b'\\' => {
                            let e = b.get(i + 1).copied().ok_or("unterminated string")?;
                            v.push(match e {
                                b'n' => '\n',
                                b't' => '\t',
                                b'\\' => '\\',
                                b'"' => '"',
                                other => {
                                    return Err(format!(
                                        "unknown escape \\{} in a string",
                                        other as char
                                    ));
                                }
                            });
                            i += 2;
                            continue;
                        }
                        _ => {}
                    }
                    let ch = s[i..].chars().next().ok_or("unterminated string")?;
                    v.push(ch);
                    i += ch.len_utf8();
                }
                i += 1;
                out.push(Tok::Str(v));
            }
            b'`' => {
                let end = s[i + 1..].find('`').ok_or("unterminated raw string")?;
                out.push(Tok::Str(s[i + 1..i + 1 + end].to_owned()));
                i += end + 2;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let n = s[start..i]
                    .parse()
                    .map_err(|_| format!("{:?} is not a number", &s[start..i]))?;
                out.push(Tok::Int(n));
            }
            b'$' => return Err("template variables ($) are not supported".into()),
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(Tok::Ident(s[start..i].to_owned()));
            }
            other => return Err(format!("unexpected {:?}", other as char)),
        }
    }
    Ok(out)
}

fn eval_action(expr: &str, data: &Val) -> Result<Val, String> {
    let toks = lex(expr)?;
    if let Some(Tok::Ident(k)) = toks.first()
        && matches!(
            k.as_str(),
            "if" | "else"
                | "end"
                | "range"
                | "with"
                | "define"
                | "template"
                | "block"
                | "break"
                | "continue"
        )
    {
        return Err(format!(
            "{{{{{k}}}}} actions are not supported by this agent (only expressions and pipelines)"
        ));
    }
    let mut p = Parser { toks, pos: 0, data };
    let v = p.pipeline()?;
    if p.pos < p.toks.len() {
        return Err("unexpected text after the expression".into());
    }
    Ok(v)
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    data: &'a Val,
}

impl Parser<'_> {
    fn pipeline(&mut self) -> Result<Val, String> {
        let mut v = self.command(None)?;
        while self.toks.get(self.pos) == Some(&Tok::Pipe) {
            self.pos += 1;
            v = self.command(Some(v))?;
        }
        Ok(v)
    }

    /// One command: an operand, or a function and its arguments (`piped` comes last).
    fn command(&mut self, piped: Option<Val>) -> Result<Val, String> {
        match self.toks.get(self.pos).cloned() {
            Some(Tok::Ident(name)) if name != "true" && name != "false" && name != "nil" => {
                // As Go's parser: an unknown function is an error before any argument.
                if !FUNCTIONS.contains(&name.as_str()) {
                    return Err(format!("unknown function {name:?}"));
                }
                self.pos += 1;
                let mut args = Vec::new();
                while let Some(t) = self.toks.get(self.pos) {
                    if matches!(t, Tok::Pipe | Tok::Close) {
                        break;
                    }
                    args.push(self.operand()?);
                }
                args.extend(piped);
                call(&name, args)
            }
            Some(_) => {
                let v = self.operand()?;
                if piped.is_some() {
                    return Err("only a function can take a piped value".into());
                }
                if let Some(t) = self.toks.get(self.pos)
                    && !matches!(t, Tok::Pipe | Tok::Close)
                {
                    return Err(
                        "a value cannot take arguments (is a function name missing?)".into(),
                    );
                }
                Ok(v)
            }
            None => Err("empty expression".into()),
        }
    }

    fn operand(&mut self) -> Result<Val, String> {
        let t = self.toks.get(self.pos).cloned().ok_or("missing operand")?;
        self.pos += 1;
        match t {
            Tok::Field(path) => field(self.data, &path),
            Tok::Str(s) => Ok(Val::Str(s)),
            Tok::Int(i) => Ok(Val::Int(i)),
            Tok::Ident(i) if i == "true" => Ok(Val::Bool(true)),
            Tok::Ident(i) if i == "false" => Ok(Val::Bool(false)),
            Tok::Ident(i) => Err(format!(
                "function {i:?} used as an argument: put it in parentheses"
            )),
            Tok::Open => {
                let v = self.pipeline()?;
                if self.toks.get(self.pos) != Some(&Tok::Close) {
                    return Err("missing )".into());
                }
                self.pos += 1;
                match self.toks.get(self.pos).cloned() {
                    Some(Tok::Field(path))
                        if self.pos > 0 && self.toks.get(self.pos - 1) == Some(&Tok::Close) =>
                    {
                        self.pos += 1;
                        field(&v, &path)
                    }
                    _ => Ok(v),
                }
            }
            Tok::Pipe | Tok::Close => Err("unexpected | or )".into()),
        }
    }
}

fn field(data: &Val, path: &[String]) -> Result<Val, String> {
    let mut v = data;
    for (i, name) in path.iter().enumerate() {
        let shown = || format!(".{}", path[..=i].join("."));
        match v {
            Val::Map(m) => {
                v = m
                    .get(name)
                    .ok_or_else(|| format!("unknown field {}", shown()))?;
            }
            Val::Missing(why) => return Err(why.clone()),
            _ => return Err(format!("{} : not a map, it has no fields", shown())),
        }
    }
    if let Val::Missing(why) = v {
        return Err(why.clone());
    }
    Ok(v.clone())
}

fn int(v: &Val, f: &str) -> Result<i64, String> {
    match v {
        Val::Int(i) => Ok(*i),
        Val::Str(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{f}: {s:?} is not a number")),
        other => Err(format!("{f}: {} is not a number", other.text())),
    }
}

const FUNCTIONS: &[&str] = &[
    "upper",
    "lower",
    "trim",
    "quote",
    "trimPrefix",
    "trimSuffix",
    "replace",
    "trunc",
    "substr",
    "default",
    "required",
    "len",
    "index",
];

/// The functions: Go's `index` and `len`, and Sprig's string functions upstream's
/// documentation uses.
fn call(name: &str, args: Vec<Val>) -> Result<Val, String> {
    let n = args.len();
    let want = |k: usize| -> Result<(), String> {
        if n == k {
            Ok(())
        } else {
            Err(format!("{name} takes {k} argument(s), got {n}"))
        }
    };
    let s = |i: usize| args[i].text();
    Ok(match name {
        "upper" => {
            want(1)?;
            Val::Str(s(0).to_uppercase())
        }
        "lower" => {
            want(1)?;
            Val::Str(s(0).to_lowercase())
        }
        "trim" => {
            want(1)?;
            Val::Str(s(0).trim().to_owned())
        }
        "quote" => {
            want(1)?;
            Val::Str(format!("{:?}", s(0)))
        }
        "trimPrefix" => {
            want(2)?;
            let v = s(1);
            Val::Str(v.strip_prefix(&s(0)).unwrap_or(&v).to_owned())
        }
        "trimSuffix" => {
            want(2)?;
            let v = s(1);
            Val::Str(v.strip_suffix(&s(0)).unwrap_or(&v).to_owned())
        }
        "replace" => {
            want(3)?;
            Val::Str(s(2).replace(&s(0), &s(1)))
        }
        // Sprig: a negative count keeps the end.
        "trunc" => {
            want(2)?;
            let k = int(&args[0], name)?;
            let chars: Vec<char> = s(1).chars().collect();
            let len = chars.len() as i64;
            let kept: String = if k >= 0 {
                chars[..k.min(len) as usize].iter().collect()
            } else {
                chars[(len + k).max(0) as usize..].iter().collect()
            };
            Val::Str(kept)
        }
        "substr" => {
            want(3)?;
            let chars: Vec<char> = s(2).chars().collect();
            let len = chars.len() as i64;
            let start = int(&args[0], name)?.clamp(0, len) as usize;
            let end = int(&args[1], name)?;
            let end = if end < 0 { len } else { end.min(len) } as usize;
            Val::Str(chars[start..end.max(start)].iter().collect())
        }
        "default" => {
            if n == 1 {
                // `x | default` with nothing piped: Sprig gives the default.
                return Ok(args[0].clone());
            }
            want(2)?;
            if args[1].empty() {
                args[0].clone()
            } else {
                args[1].clone()
            }
        }
        "required" => {
            want(2)?;
            if args[1].empty() {
                return Err(format!("required: {}", s(0)));
            }
            args[1].clone()
        }
        "len" => {
            want(1)?;
            Val::Int(match &args[0] {
                Val::Str(t) => t.chars().count() as i64,
                Val::List(l) => l.len() as i64,
                Val::Map(m) => m.len() as i64,
                other => return Err(format!("len of {}", other.text())),
            })
        }
        "index" => {
            if n < 2 {
                return Err(format!(
                    "index takes a collection and keys, got {n} argument(s)"
                ));
            }
            let mut v = args[0].clone();
            for k in &args[1..] {
                v = match (&v, k) {
                    (Val::List(l), k) => {
                        let i = int(k, name)?;
                        l.get(usize::try_from(i).unwrap_or(usize::MAX))
                            .cloned()
                            .ok_or_else(|| {
                                format!("index {i} out of range (the list has {})", l.len())
                            })?
                    }
                    (Val::Map(m), k) => m
                        .get(&k.text())
                        .cloned()
                        .ok_or_else(|| format!("index: no key {:?}", k.text()))?,
                    (other, _) => return Err(format!("index of {}", other.text())),
                };
            }
            v
        }
        _ => return Err(format!("unknown function {name:?}")),
    })
}

/// Go's name for a Rust architecture (what yip's templates and `only_arch` compare).
pub fn go_arch(rust: &'static str) -> &'static str {
    match rust {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The node facts the context is made of (read from a root by the loader).
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// /etc/machine-id, or why there is none.
    pub machine_id: Result<String, String>,
    pub hostname: String,
    /// /etc/os-release: PRETTY_NAME, ID, VERSION_ID, VERSION.
    pub os_name: String,
    pub os_vendor: String,
    pub os_version: String,
    pub os_release: String,
    /// Go's name (amd64, arm64).
    pub architecture: String,
    /// SMBIOS: product_uuid, product_serial, product_name, sys_vendor.
    pub product_uuid: String,
    pub product_serial: String,
    pub product_name: String,
    pub product_vendor: String,
    /// Physical interfaces: (name, MAC address), in name order.
    pub network: Vec<(String, String)>,
    /// 32 characters of [0-9a-z] and a UUID v4, drawn once per load.
    pub random: String,
    pub uuid: String,
}

impl Default for NodeFacts {
    fn default() -> Self {
        NodeFacts {
            machine_id: Err("no machine id".into()),
            hostname: String::new(),
            os_name: String::new(),
            os_vendor: String::new(),
            os_version: String::new(),
            os_release: String::new(),
            architecture: String::new(),
            product_uuid: String::new(),
            product_serial: String::new(),
            product_name: String::new(),
            product_vendor: String::new(),
            network: Vec::new(),
            random: String::new(),
            uuid: String::new(),
        }
    }
}

/// yip's ProtectedID: HMAC-SHA256 of the app id "yip", keyed with the machine id, in hex
/// (denisbrodbeck/machineid's ProtectedID).
pub fn protected_id(machine_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut key = [0u8; 64];
    let id = machine_id.as_bytes();
    if id.len() > 64 {
        key[..32].copy_from_slice(&Sha256::digest(id));
    } else {
        key[..id.len()].copy_from_slice(id);
    }
    let pad = |b: u8| key.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    inner.update(b"yip");
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    outer
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl NodeFacts {
    /// The template context: `.MachineID`, `.UUID`, `.Random`, `.ProtectedID` (yip's
    /// hostname names) and `.Values` (sysinfo's tree as yip exposes it, plus `Random` and
    /// `ProtectedID`).
    pub fn context(&self) -> Val {
        let s = |v: &str| Val::Str(v.to_owned());
        let (mid, pid) = match &self.machine_id {
            Ok(id) => (s(id), s(&protected_id(id))),
            Err(why) => (Val::Missing(why.clone()), Val::Missing(why.clone())),
        };
        let network = Val::List(
            self.network
                .iter()
                .map(|(n, mac)| Val::map([("name", s(n)), ("macaddress", s(mac))]))
                .collect(),
        );
        let values = Val::map([
            (
                "node",
                Val::map([("hostname", s(&self.hostname)), ("machineid", mid.clone())]),
            ),
            (
                "os",
                Val::map([
                    ("name", s(&self.os_name)),
                    ("vendor", s(&self.os_vendor)),
                    ("version", s(&self.os_version)),
                    ("release", s(&self.os_release)),
                    ("architecture", s(&self.architecture)),
                ]),
            ),
            (
                "product",
                Val::map([
                    ("uuid", s(&self.product_uuid)),
                    ("serial", s(&self.product_serial)),
                    ("name", s(&self.product_name)),
                    ("vendor", s(&self.product_vendor)),
                ]),
            ),
            ("network", network),
            ("Random", s(&self.random)),
            ("ProtectedID", pid.clone()),
        ]);
        Val::map([
            ("MachineID", mid),
            ("UUID", s(&self.uuid)),
            ("Random", s(&self.random)),
            ("ProtectedID", pid),
            ("Values", values),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Val {
        NodeFacts {
            machine_id: Ok("abcdef0123456789abcdef0123456789".into()),
            hostname: "box".into(),
            os_name: "Kairos Linux 3".into(),
            architecture: "amd64".into(),
            product_uuid: "4C4C4544-0042".into(),
            network: vec![("eth0".into(), "52:54:00:12:34:56".into())],
            random: "r".repeat(32),
            uuid: "u-u-i-d".into(),
            ..NodeFacts::default()
        }
        .context()
    }

    fn r(t: &str) -> Result<String, TemplateError> {
        render(t, &ctx())
    }

    #[test]
    fn upstreams_documented_expressions_render() {
        assert_eq!(
            r("hostname: node-{{ trunc 4 .MachineID }}\n").unwrap(),
            "hostname: node-abcd\n"
        );
        assert_eq!(r("{{.Values.node.hostname}}").unwrap(), "box");
        assert_eq!(
            r("{{ (index .Values.network 0).macaddress }}").unwrap(),
            "52:54:00:12:34:56"
        );
        assert_eq!(
            r("{{ .Values.product.uuid | lower }}").unwrap(),
            "4c4c4544-0042"
        );
        assert_eq!(
            r("{{ required \"uuid is required\" .Values.product.uuid }}").unwrap(),
            "4C4C4544-0042"
        );
        assert_eq!(r("{{ trunc 4 .Random }}").unwrap(), "rrrr");
        assert_eq!(r("{{ .Values.os.architecture }}").unwrap(), "amd64");
        assert_eq!(
            r("{{ .ProtectedID }}").unwrap(),
            protected_id("abcdef0123456789abcdef0123456789")
        );
        assert_eq!(r("{{ .Values.ProtectedID }}").unwrap().len(), 64);
        assert_eq!(
            r("a {{- \" b \" -}} c").unwrap(),
            "a b c",
            "trim markers eat the spaces around"
        );
        assert_eq!(
            r("{{ .Values.os.vendor | default \"linux\" | upper }}").unwrap(),
            "LINUX"
        );
        assert_eq!(
            r("{{ replace \"-\" \"\" .UUID | trunc -3 }}").unwrap(),
            "uid"
        );
        assert_eq!(r("{{/* a note */}}x").unwrap(), "x");
        assert_eq!(
            r("# {{ not rendered }}\nx: 1\n").unwrap(),
            "# {{ not rendered }}\nx: 1\n"
        );
        assert_eq!(
            r("plain text, no action\n").unwrap(),
            "plain text, no action\n"
        );
    }

    #[test]
    fn errors_name_the_line_and_the_expression() {
        let e = r("a: 1\nb: {{ .Nope }}\n").unwrap_err();
        assert_eq!((e.line, e.expr.as_str()), (2, ".Nope"));
        assert!(e.message.contains("unknown field .Nope"), "{e}");
        let e = r("a: 1\n\nc: {{ shout .MachineID }}\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(
            e.to_string(),
            "line 3: {{shout .MachineID}}: unknown function \"shout\""
        );
        let e = r("{{ if .MachineID }}x{{ end }}").unwrap_err();
        assert!(e.message.contains("not supported"), "{e}");
        let e = r("{{ .Values.cpu.cores }}").unwrap_err();
        assert!(e.message.contains("unknown field .Values.cpu"), "{e}");
        let e = r("{{ required \"need a serial\" .Values.product.serial }}").unwrap_err();
        assert!(e.message.contains("need a serial"), "{e}");
        let e = r("x: {{ .MachineID ").unwrap_err();
        assert!(e.message.contains("no closing"), "{e}");
        let e = r("{{ index .Values.network 3 }}").unwrap_err();
        assert!(e.message.contains("out of range"), "{e}");
        // No machine id: the error says why, only when it is used.
        let none = NodeFacts {
            machine_id: Err("/etc/machine-id: No such file or directory".into()),
            ..NodeFacts::default()
        }
        .context();
        assert_eq!(render("{{ .Values.os.name }}", &none).unwrap(), "");
        let e = render("h: {{ trunc 4 .MachineID }}", &none).unwrap_err();
        assert!(e.message.contains("/etc/machine-id"), "{e}");
    }

    #[test]
    fn protected_id_is_hmac_sha256() {
        // `printf yip | openssl dgst -sha256 -hmac 0123`
        assert_eq!(
            protected_id("0123"),
            "0dbb94c0c3b958a6ab6e0b49fc1d5aa24d2921ebf9059a933bfd365322d2772c"
        );
    }
}
