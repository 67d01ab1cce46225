//! Cloud-config loading and merging (agent/src/config.rs): the Go-template renderer over
//! the text (config/template.rs, plain and URL-escaped), parse (with and without the header
//! requirement), merge / merge_maps of two parsed documents, and the kernel command line
//! forms (has_header, kairos-init's cmdline::words, from_cmdline).
#![no_main]

use kairos_agent::config;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let facts = config::template::NodeFacts {
        machine_id: Ok("0123456789abcdef0123456789abcdef".into()),
        network: vec![("eth0".into(), "52:54:00:12:34:56".into())],
        ..Default::default()
    };
    let data = facts.context();
    if let Ok(r) = config::template::render(&text, &data) {
        // Text without an action comes back as it was.
        if !config::template::has_template(&text) {
            assert_eq!(r, text);
        }
    }
    let _ = config::template::render_with(&text, &data, Some(config::template::query_escape));
    // Two documents: the input split at the first NUL (or the input and itself).
    let (a, b) = text.split_once('\0').unwrap_or((&text, &text));
    let _ = config::has_header(a);
    let pa = config::parse("/oem/a.yaml", a, true);
    let pb = config::parse("/oem/b.yaml", b, false);
    if let (Ok(Some(sa)), Ok(Some(sb))) = (&pa, &pb) {
        let _ = sa.config.effective_stages();
        let _ = sa.config.k3s_enabled();
        let mut m = sa.raw.clone();
        config::merge_maps(&mut m, sb.raw.clone());
        // Merging a tree into itself twice is the same as once for maps and scalars.
        let mut v = Value::Object(sb.raw.clone());
        config::merge(&mut v, Value::Object(sa.raw.clone()));
        config::merge(&mut v, Value::Null);
        let _ = serde_json::to_string(&m);
    }
    let words: Vec<_> = kairos_init::cmdline::words(&text).collect();
    assert!(words.len() <= text.len());
    let mut errors = Vec::new();
    let (src, urls) = config::from_cmdline(&text, &mut errors);
    if let Some(s) = src {
        let _ = s.config.effective_stages();
    }
    let _ = (urls, errors.iter().map(|e| e.to_string()).count());
});
