//! `kairos-agent validate FILE`: what the agent would make of one cloud-config file, without
//! applying it. Errors (the file would be skipped): no header, a template that does not
//! render, YAML or type errors (FILE:LINE:COL). Warnings (the file loads): unknown keys and
//! keys that are not supported, each with its line. Exit 0 when the file is valid (warnings
//! included), 1 when not.

use std::io::Write;
use std::path::Path;

use super::{HEADER_LINES, Renderer, has_header, keys, parse};
use crate::{AgentError, Ctx, Outcome};

/// What validating one text found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `ORIGIN[:LINE[:COL]]: message`, one per error.
    pub errors: Vec<String>,
    /// `ORIGIN[:LINE]: warning: message`.
    pub warnings: Vec<String>,
    /// Every accepted key path with its registry entry.
    pub accepted: Vec<(String, &'static keys::Key)>,
}

impl Report {
    pub fn valid(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Check `text` (named `origin`) as the loader would read it from /oem; templates are
/// rendered with `ctx`'s node facts.
pub fn check(ctx: &Ctx, origin: &str, text: &str) -> Report {
    let mut r = Report::default();
    if !has_header(text) {
        r.errors.push(format!(
            "{origin}: no #cloud-config header in its first {HEADER_LINES} lines: the agent would ignore this file"
        ));
        return r;
    }
    let rendered = match Renderer::new(ctx).render(origin, text) {
        Ok(t) => t,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    let source = match parse(origin, &rendered, true) {
        Ok(Some(s)) => s,
        Ok(None) => return r,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    let mut f = keys::Findings::default();
    f.check(origin, &source.raw);
    let at = |path: &str| match key_line(text, path) {
        Some(l) => format!("{origin}:{l}"),
        None => origin.to_owned(),
    };
    for (p, _) in &f.unknown {
        r.warnings.push(format!(
            "{}: warning: unknown key {p:?}: kept, not used",
            at(p)
        ));
    }
    for (p, why, _) in &f.unsupported {
        r.warnings.push(format!(
            "{}: warning: not supported: key {p:?}: {why}",
            at(p)
        ));
    }
    r.accepted = f.accepted;
    r
}

/// The line (1-based) where a dotted key path is written, found by indentation: each
/// segment below the previous one. `None` when it cannot be told (flow style, say).
pub fn key_line(text: &str, path: &str) -> Option<usize> {
    let mut from = 0;
    let mut indent: Option<usize> = None;
    let mut found = None;
    for seg in path.split('.') {
        let mut hit = None;
        for (i, line) in text.lines().enumerate().skip(from) {
            let body = line.trim_start();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let ind = line.len() - body.len();
            // Left the parent's block.
            if indent.is_some_and(|p| ind <= p) && !body.starts_with("- ") && i > from {
                break;
            }
            let key = body.trim_start_matches("- ").trim_start();
            let key_ind = line.len() - key.len();
            let named = [
                format!("{seg}:"),
                format!("\"{seg}\":"),
                format!("'{seg}':"),
            ]
            .iter()
            .any(|k| key.starts_with(k.as_str()));
            // Top-level keys start in column 0; the others below their parent.
            if named && indent.map_or(key_ind == 0, |p| key_ind > p) {
                hit = Some((i, key_ind));
                break;
            }
        }
        let (i, ind) = hit?;
        found = Some(i + 1);
        from = i + 1;
        indent = Some(ind);
    }
    found
}

/// `kairos-agent validate FILE`: the report on `out`, one line each, then a summary.
pub fn validate(ctx: &Ctx, file: &Path, out: &mut dyn Write) -> Result<Outcome, AgentError> {
    let origin = file.display().to_string();
    let report = match std::fs::read(file) {
        Ok(bytes) if bytes.len() as u64 > super::MAX_FILE_BYTES => Report {
            errors: vec![format!(
                "{origin}: more than {} bytes: the agent would not read it",
                super::MAX_FILE_BYTES
            )],
            ..Report::default()
        },
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => check(ctx, &origin, &text),
            Err(_) => Report {
                errors: vec![format!("{origin}: not UTF-8 text")],
                ..Report::default()
            },
        },
        Err(e) => Report {
            errors: vec![format!("{origin}: {e}")],
            ..Report::default()
        },
    };
    let w = |out: &mut dyn Write, l: &str| writeln!(out, "{l}").map_err(AgentError::Output);
    for e in &report.errors {
        w(out, e)?;
    }
    for warning in &report.warnings {
        w(out, warning)?;
    }
    if report.valid() {
        w(
            out,
            &format!("{origin}: valid ({} warning(s))", report.warnings.len()),
        )?;
        Ok(Outcome::Done)
    } else {
        w(
            out,
            &format!("{origin}: invalid ({} error(s))", report.errors.len()),
        )?;
        Ok(Outcome::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn key_lines_follow_indentation() {
        let t = "#cloud-config\ninstall:\n  device: /dev/vda\n  fancy: 1\nusers:\n- name: a\n  colour: red\nfancy: 2\n";
        assert_eq!(key_line(t, "install.fancy"), Some(4));
        assert_eq!(key_line(t, "users.colour"), Some(7));
        assert_eq!(key_line(t, "fancy"), Some(8));
        assert_eq!(key_line(t, "nothere"), None);
    }

    #[test]
    fn validate_reports_errors_with_line_and_column_and_warnings_with_lines() {
        let t = Tree::new();
        t.file(
            "/cfg/good.yaml",
            "#cloud-config\nhostname: h\nusers:\n- name: a\n  colour: red\nk0s:\n  enabled: true\n",
        );
        let mut out = Vec::new();
        let o = validate(&t.ctx, &t.ctx.path("/cfg/good.yaml"), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        let f = t.ctx.path("/cfg/good.yaml").display().to_string();
        assert_eq!(o, Outcome::Done, "{out}");
        assert_eq!(
            out,
            format!(
                "{f}:5: warning: unknown key \"users.colour\": kept, not used\n\
                 {f}:6: warning: not supported: key \"k0s\": k0s is not supported by this agent; use k3s\n\
                 {f}: valid (2 warning(s))\n"
            )
        );
        t.file(
            "/cfg/bad.yaml",
            "#cloud-config\nusers:\n- name: a\n  uid: [1]\n",
        );
        let mut out = Vec::new();
        let o = validate(&t.ctx, &t.ctx.path("/cfg/bad.yaml"), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(o, Outcome::Refused, "{out}");
        let f = t.ctx.path("/cfg/bad.yaml").display().to_string();
        assert!(out.starts_with(&format!("{f}:4:")), "{out}");
        assert!(
            out.ends_with(&format!("{f}: invalid (1 error(s))\n")),
            "{out}"
        );
        t.file("/cfg/nohead.yaml", "hostname: x\n");
        let mut out = Vec::new();
        let o = validate(&t.ctx, &t.ctx.path("/cfg/nohead.yaml"), &mut out).unwrap();
        assert_eq!(o, Outcome::Refused);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("no #cloud-config header")
        );
        t.file(
            "/cfg/tmpl.yaml",
            "#cloud-config\n\nhostname: n-{{ shout .MachineID }}\n",
        );
        let mut out = Vec::new();
        let o = validate(&t.ctx, &t.ctx.path("/cfg/tmpl.yaml"), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(o, Outcome::Refused);
        let f = t.ctx.path("/cfg/tmpl.yaml").display().to_string();
        assert!(
            out.starts_with(&format!(
                "{f}:3: {{{{shout .MachineID}}}}: unknown function \"shout\"\n"
            )),
            "{out}"
        );
        let mut out = Vec::new();
        let o = validate(&t.ctx, &t.ctx.path("/cfg/missing.yaml"), &mut out).unwrap();
        assert_eq!(o, Outcome::Refused);
    }
}
