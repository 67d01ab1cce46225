//! Cloud-config (SPEC §6): which files count, how they merge, and the typed model.
//!
//! Every source is parsed twice: once straight into the typed [`Config`] (so a type error
//! names its file and line) and once into a generic tree (to merge, and to keep unknown
//! keys). The stage runner uses the sources one by one (yip runs files in order); everything
//! else (k3s, install, p2p) reads the merged [`Loaded::merged`].
//!
//! The bottom layer of the agent: [`schema`] holds the types, [`de`] their loose decoding,
//! this module reads and merges the sources. It imports no other agent module; fetching a
//! `config_url` is handed in by the caller ([`load_with`]; the `sources` module passes
//! the HTTP client).

pub(crate) mod de;
pub mod keys;
pub mod schema;
pub mod template;
pub mod validate;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use kairos_util::IoError;

use crate::Ctx;
use de::kind;
pub use schema::*;

/// The first line of a cloud-config must (within the first [`HEADER_LINES`]) be one of these.
pub const HEADERS: &[&str] = &["#cloud-config", "#kairos-config", "#node-config"];
pub const HEADER_LINES: usize = 10;
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Read in this order; later wins in the merged config (SPEC §6). kairos-init scans the same
/// list to skip a stage no file names, hence one definition.
pub const DIRS: &[&str] = kairos_init::stages::NODE_CONFIG_DIRS;
/// The image's own yip files (upstream's /system/oem): run before the user's, no header
/// needed, stages only (they are the image's, not the node's configuration).
pub const SYSTEM_DIR: &str = kairos_init::stages::SYSTEM_CONFIG_DIR;
/// How many `config_url` hops are followed (a URL's config may name another).
pub const MAX_URL_DEPTH: usize = 4;
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file that could not be read (its path as seen inside the root).
    #[error(transparent)]
    Read(IoError),
    #[error("{path}: more than {MAX_FILE_BYTES} bytes, not read")]
    TooLarge { path: String },
    #[error("{path}:{line}:{column}: {message}")]
    Yaml {
        path: String,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("config_url {url}: {message}")]
    Fetch { url: String, message: String },
    /// A Go-template expression that could not be rendered.
    #[error("{path}:{}: {{{{{}}}}}: {}", .error.line, .error.expr, .error.message)]
    Template {
        path: String,
        error: template::TemplateError,
    },
}

impl ConfigError {
    /// The file, URL or "kernel command line" the error is about.
    pub fn origin(&self) -> &str {
        match self {
            ConfigError::Read(e) => e.path.to_str().unwrap_or_default(),
            ConfigError::TooLarge { path }
            | ConfigError::Yaml { path, .. }
            | ConfigError::Invalid { path, .. }
            | ConfigError::Template { path, .. } => path,
            ConfigError::Fetch { url, .. } => url,
        }
    }
}

/// One file, URL or the command line, parsed.
#[derive(Debug, Clone)]
pub struct Source {
    /// Path (as seen inside the root), URL, or `kernel command line`.
    pub origin: String,
    pub config: Config,
    /// The generic tree, unknown keys included.
    pub raw: Map<String, Value>,
    /// The tree as written, before its templates were rendered (only when the text had
    /// templates and parses without rendering): what an install copies, so the installed
    /// node renders them with its own facts on each boot.
    pub as_written: Option<Map<String, Value>>,
}

/// Everything found, in merge order, and the merged result.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Image yip files first (stages only), then the node's sources in merge order.
    pub sources: Vec<Source>,
    pub merged: Config,
    /// The merged tree, unknown keys included.
    pub raw: Map<String, Value>,
    /// The merged tree with each source as written (templates not rendered); see
    /// [`Source::as_written`].
    pub raw_as_written: Map<String, Value>,
    /// Sources that were skipped (each names its file and, for YAML, its line).
    pub errors: Vec<ConfigError>,
    /// Unknown keys and other things worth saying that changed nothing.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Fetch `config_url`s (off for the early stages: there is no network in the initramfs).
    pub fetch: bool,
    pub fetch_timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            fetch: true,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

impl Config {
    /// The stages of this source as yip runs them: the cloud-init keys become steps first
    /// (`users`, `ssh_authorized_keys`, `write_files`, `runcmd` → `boot`; `hostname` →
    /// `initramfs`, SPEC §6), then the file's own `stages:`.
    pub fn effective_stages(&self) -> BTreeMap<String, Vec<Step>> {
        let mut out: BTreeMap<String, Vec<Step>> = BTreeMap::new();
        let mut boot = Vec::new();
        // Users get their own step before the files: within one step upstream writes files
        // before users, and a write_files entry owned by a new user would fail.
        let mut users = BTreeMap::new();
        let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for u in &self.users {
            let Some(name) = u.name.clone().filter(|n| !n.is_empty()) else {
                continue;
            };
            users.insert(name.clone(), u.clone());
            let k = keys.entry(name).or_default();
            k.extend(self.ssh_authorized_keys.iter().cloned());
        }
        if self.users.is_empty() && !self.ssh_authorized_keys.is_empty() {
            keys.insert("root".into(), self.ssh_authorized_keys.clone());
        }
        keys.retain(|_, v| !v.is_empty());
        if !users.is_empty() || !keys.is_empty() {
            boot.push(Step {
                name: Some("cloud-init users".into()),
                users,
                authorized_keys: keys,
                ..Step::default()
            });
        }
        if !self.write_files.is_empty() || !self.runcmd.is_empty() {
            boot.push(Step {
                name: Some("cloud-init".into()),
                files: self.write_files.clone(),
                commands: self.runcmd.clone(),
                ..Step::default()
            });
        }
        if !boot.is_empty() {
            out.insert("boot".into(), boot);
        }
        if let Some(h) = self.hostname.as_ref().filter(|h| !h.is_empty()) {
            out.insert(
                "initramfs".into(),
                vec![Step {
                    name: Some("cloud-init hostname".into()),
                    hostname: Some(h.clone()),
                    ..Step::default()
                }],
            );
        }
        for (stage, steps) in &self.stages {
            out.entry(stage.clone())
                .or_default()
                .extend(steps.iter().cloned());
        }
        out
    }

    /// The K3s block that is enabled: `k3s` (server) wins over `k3s-agent`, as upstream.
    pub fn k3s_enabled(&self) -> Option<(Role, &K3sBlock)> {
        if let Some(b) = self.k3s.as_ref().filter(|b| b.enabled) {
            return Some((Role::Server, b));
        }
        self.k3s_agent
            .as_ref()
            .filter(|b| b.enabled)
            .map(|b| (Role::Agent, b))
    }
}

/// Whether `text` carries a cloud-config header within its first lines.
pub fn has_header(text: &str) -> bool {
    text.lines()
        .take(HEADER_LINES)
        .any(|l| HEADERS.iter().any(|h| l.trim_end().starts_with(h)))
}

fn yaml_options() -> serde_saphyr::Options {
    // The option structs are non-exhaustive: start from the defaults and tighten.
    let mut budget = serde_saphyr::Budget::default();
    // Configs are small: a tight budget stops alias bombs and deep nesting early.
    budget.max_depth = 64;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_events = 200_000;
    budget.max_nodes = 100_000;
    budget.max_total_scalar_bytes = 4 * MAX_FILE_BYTES as usize;
    budget.max_documents = 1;
    let mut aliases = serde_saphyr::options::AliasLimits::default();
    aliases.max_total_replayed_events = 100_000;
    aliases.max_replay_stack_depth = 16;
    aliases.max_alias_expansions_per_anchor = 1_000;
    let mut o = serde_saphyr::Options::default();
    o.budget = Some(budget);
    o.alias_limits = aliases;
    // `permissions: 0644` means octal to every Kairos user (YAML 1.1, Go's yaml); kept as
    // a string, the typed model reads it as octal.
    o.leading_zero_numbers_as_strings = true;
    o.with_snippet = false;
    o
}

fn yaml_error(origin: &str, e: &serde_saphyr::Error) -> ConfigError {
    let message = e.without_snippet().to_string();
    // The message may end with its own "at line X column Y"; the prefix says it already.
    let message = match message.find(" at line ") {
        Some(i) if e.location().is_some() => message[..i].to_owned(),
        _ => message,
    };
    match e.location() {
        Some(l) => ConfigError::Yaml {
            path: origin.to_owned(),
            line: l.line(),
            column: l.column(),
            message,
        },
        None => ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        },
    }
}

/// Parse one document. `Ok(None)`: no header where one is required.
pub fn parse(
    origin: &str,
    text: &str,
    require_header: bool,
) -> Result<Option<Source>, ConfigError> {
    if require_header && !has_header(text) {
        return Ok(None);
    }
    let raw: Option<Value> = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| yaml_error(origin, &e))?;
    let raw = match raw {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                message: format!(
                    "expected a mapping at the top level, found {}",
                    kind(&other)
                ),
            });
        }
    };
    let config = if raw.is_empty() {
        Config::default()
    } else {
        let typed: Option<Config> = serde_saphyr::from_str_with_options(text, yaml_options())
            .map_err(|e| yaml_error(origin, &e))?;
        typed.unwrap_or_default()
    };
    Ok(Some(Source {
        origin: origin.to_owned(),
        config,
        raw,
        as_written: None,
    }))
}

/// The template context, read from the root the first time a source needs it.
pub struct Renderer<'a> {
    ctx: &'a Ctx,
    data: Option<template::Val>,
}

impl<'a> Renderer<'a> {
    pub fn new(ctx: &'a Ctx) -> Self {
        Renderer { ctx, data: None }
    }

    /// `text` with its `{{ }}` expressions rendered (as it is when it has none).
    pub fn render(&mut self, origin: &str, text: &str) -> Result<String, ConfigError> {
        self.render_escaped(origin, text, None)
    }

    /// A URL from the command line: each rendered value is URL-encoded (as upstream).
    pub fn render_url(&mut self, origin: &str, url: &str) -> Result<String, ConfigError> {
        self.render_escaped(origin, url, Some(template::query_escape))
    }

    fn render_escaped(
        &mut self,
        origin: &str,
        text: &str,
        escape: Option<fn(&str) -> String>,
    ) -> Result<String, ConfigError> {
        if !template::has_template(text) {
            return Ok(text.to_owned());
        }
        let ctx = self.ctx;
        let data = self.data.get_or_insert_with(|| node_facts(ctx).context());
        template::render_with(text, data, escape).map_err(|error| ConfigError::Template {
            path: origin.to_owned(),
            error,
        })
    }
}

/// [`parse`] after rendering the text's templates (only a text that counts: one with its
/// header where a header is required).
pub fn parse_rendered(
    origin: &str,
    text: &str,
    require_header: bool,
    r: &mut Renderer,
) -> Result<Option<Source>, ConfigError> {
    if require_header && !has_header(text) {
        return Ok(None);
    }
    let rendered = r.render(origin, text)?;
    let mut source = parse(origin, &rendered, require_header)?;
    if let Some(s) = source.as_mut().filter(|_| rendered != text) {
        // An unrendered text that is not YAML (a `{{` opening a plain value) is kept rendered.
        if let Ok(Some(Value::Object(m))) =
            serde_saphyr::from_str_with_options::<Option<Value>>(text, yaml_options())
        {
            s.as_written = Some(m);
        }
    }
    Ok(source)
}

/// What the templates can name, from the root (machine id, os-release, SMBIOS, network
/// interfaces) and the kernel's random source.
pub fn node_facts(ctx: &Ctx) -> template::NodeFacts {
    let line = |p: &str| ctx.read_line(p).unwrap_or_default();
    let machine_id = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| ctx.read_line(p))
        .ok_or_else(|| {
            "no machine id: /etc/machine-id (and /var/lib/dbus/machine-id) missing or empty"
                .to_owned()
        });
    let os = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(ctx.path(p)).ok())
        .unwrap_or_default();
    let field = |k: &str| kairos_util::envfile::value(&os, k).unwrap_or_default();
    let mut hostname = line("/etc/hostname");
    if hostname.is_empty() && ctx.root == Path::new("/") {
        hostname = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
    }
    // Physical interfaces only (a `device` link), as sysinfo lists them.
    let mut network = Vec::new();
    if let Ok(dir) = std::fs::read_dir(ctx.path("/sys/class/net")) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !e.path().join("device").exists() {
                continue;
            }
            let mac = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
            network.push((name, mac.trim().to_owned()));
        }
    }
    network.sort();
    let mut rnd = [0u8; 48];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut rnd));
    const LETTERS: &[u8] = b"1234567890abcdefghijklmnopqrstuvwxyz";
    let random: String = rnd[..32]
        .iter()
        .map(|b| LETTERS[*b as usize % LETTERS.len()] as char)
        .collect();
    let mut u = [0u8; 16];
    u.copy_from_slice(&rnd[32..]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    template::NodeFacts {
        machine_id,
        hostname,
        os_name: field("PRETTY_NAME"),
        os_vendor: field("ID"),
        os_version: field("VERSION_ID"),
        os_release: field("VERSION"),
        architecture: template::go_arch(std::env::consts::ARCH).to_owned(),
        product_uuid: line("/sys/class/dmi/id/product_uuid"),
        product_serial: line("/sys/class/dmi/id/product_serial"),
        product_name: line("/sys/class/dmi/id/product_name"),
        product_vendor: line("/sys/class/dmi/id/sys_vendor"),
        network,
        random,
        uuid,
    }
}

/// Merge `b` into `a` (b wins): maps merge per key, lists of maps concatenate, other lists
/// union (a's order, then b's new items), scalars are replaced; a null in `b` changes
/// nothing.
pub fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (_, Value::Null) => {}
        (Value::Object(am), Value::Object(bm)) => merge_maps(am, bm),
        (Value::Array(aa), Value::Array(ba)) => {
            let maps = aa.iter().chain(ba.iter()).all(Value::is_object);
            for item in ba {
                if maps || !aa.contains(&item) {
                    aa.push(item);
                }
            }
        }
        (a, b) => *a = b,
    }
}

pub fn merge_maps(a: &mut Map<String, Value>, b: Map<String, Value>) {
    for (k, v) in b {
        match a.get_mut(&k) {
            Some(slot) => merge(slot, v),
            None => {
                if !v.is_null() {
                    a.insert(k, v);
                }
            }
        }
    }
}

/// Fetches a `config_url`'s body: (URL, deadline, size cap) → bytes or why not.
pub type Fetch<'a> = &'a dyn Fn(&str, Duration, u64) -> Result<Vec<u8>, String>;

/// Read every source under `ctx`'s root, in Kairos order, and merge them; `config_url`s
/// are fetched with `fetch` (when `opts.fetch` allows).
pub fn load_with(ctx: &Ctx, opts: &LoadOptions, fetch: Fetch) -> Loaded {
    let mut l = Loaded::default();
    let mut r = Renderer::new(ctx);
    let mut system = Vec::new();
    for (path, text) in read_dir_files(ctx, SYSTEM_DIR, &mut l.errors) {
        match parse_rendered(&path, &text, false, &mut r) {
            Ok(Some(s)) => system.push(s),
            Ok(None) => {}
            Err(e) => l.errors.push(e),
        }
    }
    let mut node = Vec::new();
    for dir in DIRS {
        for (path, text) in read_dir_files(ctx, dir, &mut l.errors) {
            match parse_rendered(&path, &text, true, &mut r) {
                Ok(Some(s)) => node.push(s),
                Ok(None) => l.warnings.push(format!(
                    "{path}: no #cloud-config header in its first {HEADER_LINES} lines; ignored"
                )),
                Err(e) => l.errors.push(e),
            }
        }
    }
    // cloud-init-paths: more directories of stage files (yip files: no header needed), run
    // after the node's own and not merged into its config (upstream's run-stage paths).
    let mut extra = Vec::new();
    let mut dirs_done: Vec<String> = DIRS
        .iter()
        .chain([&SYSTEM_DIR])
        .map(|d| d.to_string())
        .collect();
    let wanted: Vec<String> = node
        .iter()
        .flat_map(|s| s.config.cloud_init_paths.iter().cloned())
        .collect();
    for dir in wanted {
        let dir = dir.trim_end_matches('/').to_owned();
        if dirs_done.contains(&dir) || dir.is_empty() {
            continue;
        }
        if !dir.starts_with('/') {
            l.warnings.push(format!(
                "cloud-init-paths: {dir:?} is not an absolute path; not read"
            ));
            continue;
        }
        for (path, text) in read_dir_files(ctx, &dir, &mut l.errors) {
            match parse_rendered(&path, &text, false, &mut r) {
                Ok(Some(s)) => extra.push(s),
                Ok(None) => {}
                Err(e) => l.errors.push(e),
            }
        }
        dirs_done.push(dir);
    }
    let cmdline = std::fs::read_to_string(ctx.path("/proc/cmdline")).unwrap_or_default();
    let (cmd_source, urls) = from_cmdline(&cmdline, &mut l.errors);
    if let Some(s) = cmd_source {
        node.push(s);
    }
    // Templated URLs (upstream renders config_url before fetching it), values URL-encoded.
    let mut rendered_urls = Vec::new();
    for u in urls {
        match r.render_url(CMDLINE_ORIGIN, &u) {
            Ok(u) => rendered_urls.push(u),
            Err(e) => l.errors.push(e),
        }
    }
    let urls = rendered_urls;
    // config_url: the command line's, then any named by a config (recursively).
    let mut pending: Vec<(String, usize)> = urls.into_iter().map(|u| (u, 0)).collect();
    for s in &node {
        if let Some(u) = &s.config.config_url {
            pending.push((u.clone(), 0));
        }
    }
    let mut seen = Vec::new();
    while !pending.is_empty() {
        let (url, depth) = pending.remove(0);
        if seen.contains(&url) || url.is_empty() {
            continue;
        }
        seen.push(url.clone());
        if !opts.fetch {
            l.warnings
                .push(format!("config_url {url}: not fetched in this stage"));
            continue;
        }
        match fetch_config(&url, opts.fetch_timeout, fetch, &mut r) {
            Ok(Some(s)) => {
                if let Some(next) = &s.config.config_url {
                    if depth + 1 < MAX_URL_DEPTH {
                        pending.push((next.clone(), depth + 1));
                    } else {
                        l.warnings.push(format!(
                            "config_url {next}: more than {MAX_URL_DEPTH} nested config_url; not fetched"
                        ));
                    }
                }
                node.push(s);
            }
            Ok(None) => l.warnings.push(format!(
                "config_url {url}: no #cloud-config header in its first {HEADER_LINES} lines; ignored"
            )),
            Err(e) => l.errors.push(e),
        }
    }
    let mut raw = Value::Object(Map::new());
    for s in &node {
        merge(&mut raw, Value::Object(s.raw.clone()));
    }
    let raw = match raw {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let mut as_written = Value::Object(Map::new());
    for s in &node {
        let tree = s.as_written.as_ref().unwrap_or(&s.raw);
        merge(&mut as_written, Value::Object(tree.clone()));
    }
    if let Value::Object(m) = as_written {
        l.raw_as_written = m;
    }
    // Every key of every source against the registry: unknown ones and the ones that are
    // not supported are said on each load.
    let mut findings = keys::Findings::default();
    for s in system.iter().chain(node.iter()).chain(extra.iter()) {
        findings.check(&s.origin, &s.raw);
    }
    l.warnings.extend(findings.warnings());
    l.merged = match serde_json::from_value::<Config>(Value::Object(raw.clone())) {
        Ok(c) => c,
        Err(e) => {
            // Each source was valid alone; only a scalar/list clash across sources gets here.
            l.errors.push(ConfigError::Invalid {
                path: "merged configuration".into(),
                message: format!("{e}; using the last valid source's settings"),
            });
            node.last().map(|s| s.config.clone()).unwrap_or_default()
        }
    };
    l.raw = raw;
    l.sources = system;
    l.sources.extend(node);
    l.sources.extend(extra);
    l
}

/// The `.yaml`/`.yml` files of one directory, in lexical order, with their text. Errors
/// (unreadable, too large, not UTF-8) are recorded and the file skipped.
fn read_dir_files(ctx: &Ctx, dir: &str, errors: &mut Vec<ConfigError>) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(ctx.path(dir)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let shown = format!("{}/{n}", dir.trim_end_matches('/'));
        let full = ctx.path(&shown);
        if !full.is_file() {
            continue;
        }
        match read_limited(&full) {
            Ok(Some(text)) => out.push((shown, text)),
            Ok(None) => errors.push(ConfigError::TooLarge { path: shown }),
            Err(err) => errors.push(ConfigError::Read(IoError::new(shown, "reading", err))),
        }
    }
    out
}

/// The file as text, `None` when larger than [`MAX_FILE_BYTES`].
fn read_limited(p: &Path) -> std::io::Result<Option<String>> {
    let f = std::fs::File::open(p)?;
    let mut buf = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Ok(None);
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
}

pub const CMDLINE_ORIGIN: &str = "kernel command line";

/// `kairos.config=KEY=VAL` (dot paths; values are strings, as upstream) and the config URLs.
pub fn from_cmdline(cmdline: &str, errors: &mut Vec<ConfigError>) -> (Option<Source>, Vec<String>) {
    let mut tree = Map::new();
    let mut urls = Vec::new();
    for w in kairos_init::cmdline::words(cmdline) {
        if w == "--" {
            break;
        }
        if let Some(u) = w
            .strip_prefix("kairos.config_url=")
            .or_else(|| w.strip_prefix("config_url="))
        {
            urls.push(u.to_owned());
        } else if let Some(kv) = w.strip_prefix("kairos.config=") {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
            let path: Vec<&str> = k.split('.').collect();
            if path.iter().any(|p| p.is_empty()) {
                errors.push(ConfigError::Invalid {
                    path: CMDLINE_ORIGIN.into(),
                    message: format!("kairos.config={kv}: empty key segment; ignored"),
                });
                continue;
            }
            set_path(&mut tree, &path, Value::String(v.to_owned()));
        }
    }
    if tree.is_empty() {
        return (None, urls);
    }
    match serde_json::from_value::<Config>(Value::Object(tree.clone())) {
        Ok(config) => (
            Some(Source {
                origin: CMDLINE_ORIGIN.into(),
                config,
                raw: tree,
                as_written: None,
            }),
            urls,
        ),
        Err(e) => {
            errors.push(ConfigError::Invalid {
                path: CMDLINE_ORIGIN.into(),
                message: format!("kairos.config: {e}; ignored"),
            });
            (None, urls)
        }
    }
}

fn set_path(m: &mut Map<String, Value>, path: &[&str], v: Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        m.insert((*first).to_owned(), v);
        return;
    }
    let slot = m
        .entry((*first).to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    if let Value::Object(inner) = slot {
        set_path(inner, rest, v);
    }
}

fn fetch_config(
    url: &str,
    timeout: Duration,
    fetch: Fetch,
    r: &mut Renderer,
) -> Result<Option<Source>, ConfigError> {
    let body = fetch(url, timeout, MAX_FILE_BYTES).map_err(|message| ConfigError::Fetch {
        url: url.to_owned(),
        message,
    })?;
    let text = String::from_utf8(body).map_err(|_| ConfigError::Fetch {
        url: url.to_owned(),
        message: "not UTF-8 text".into(),
    })?;
    parse_rendered(url, &text, true, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::load;
    use crate::testutil::*;

    fn src(t: &Tree, path: &str, text: &str) {
        t.file(path, text);
    }

    fn no_fetch() -> LoadOptions {
        LoadOptions {
            fetch: false,
            ..LoadOptions::default()
        }
    }

    #[test]
    fn header_is_required_within_ten_lines() {
        assert!(has_header("#cloud-config\nfoo: 1\n"));
        assert!(has_header("# a comment\n\n#kairos-config\n"));
        assert!(has_header("#node-config"));
        let late = format!("{}#cloud-config\n", "x: 1\n".repeat(10));
        assert!(!has_header(&late));
        assert!(!has_header("hostname: x\n"));
        assert!(parse("f.yaml", "hostname: x\n", true).unwrap().is_none());
        assert!(parse("f.yaml", "hostname: x\n", false).unwrap().is_some());
    }

    #[test]
    fn garbage_never_panics() {
        let good = "#cloud-config\nhostname: h\nusers:\n- name: a\n  groups: [x, y]\nstages:\n  boot:\n  - files:\n    - path: /a\n      permissions: 0600\n      content: |\n        text\n    commands: [\"echo 'q'\"]\nk3s: {enabled: true, args: [--x], env: {A: 1}}\n";
        for cut in 0..good.len() {
            if good.is_char_boundary(cut) {
                let _ = parse("p", &good[..cut], true);
            }
        }
        // Byte flips from a fixed-seed generator: each result is Ok or a located error.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut b = good.as_bytes().to_vec();
            for _ in 0..4 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (seed >> 33) as usize % b.len();
                let set = b"{}[]:-&*!|>'\"#%@ \n\tax0";
                b[i] = set[(seed >> 20) as usize % set.len()];
            }
            if let Ok(text) = std::str::from_utf8(&b) {
                let _ = parse("p", text, true);
            }
        }
        let mut e = Vec::new();
        let _ = from_cmdline(
            "kairos.config= kairos.config==x kairos.config=a..b=1 \"unterminated",
            &mut e,
        );
        assert_eq!(e.len(), 3, "{e:?}");
    }

    #[test]
    fn merge_order_and_list_rules() {
        let t = Tree::new();
        src(
            &t,
            "/run/initramfs/live/a.yaml",
            "#cloud-config\nhostname: live\nk3s:\n  args: [--a]\n",
        );
        src(&t, "/etc/kairos/b.yaml", "#cloud-config\nhostname: etc\n");
        src(
            &t,
            "/usr/local/cloud-config/c.yml",
            "#cloud-config\nhostname: persistent\nk3s:\n  args: [--b, --a]\n",
        );
        src(
            &t,
            "/oem/20_b.yaml",
            "#cloud-config\nhostname: oem20\nusers:\n- name: two\n",
        );
        src(
            &t,
            "/oem/10_a.yaml",
            "#cloud-config\nhostname: oem10\nusers:\n- name: one\n",
        );
        src(&t, "/oem/notes.txt", "#cloud-config\nhostname: ignored\n");
        src(&t, "/oem/99_noheader.yaml", "hostname: ignored\n");
        t.cmdline("root=LABEL=COS_ACTIVE kairos.config=k3s.enabled=true \"kairos.config=install.device=/dev/vda\"");
        let l = load(&t.ctx, &no_fetch());
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        let origins: Vec<&str> = l.sources.iter().map(|s| s.origin.as_str()).collect();
        assert_eq!(
            origins,
            [
                "/run/initramfs/live/a.yaml",
                "/etc/kairos/b.yaml",
                "/usr/local/cloud-config/c.yml",
                "/oem/10_a.yaml",
                "/oem/20_b.yaml",
                CMDLINE_ORIGIN
            ]
        );
        let m = &l.merged;
        assert_eq!(m.hostname.as_deref(), Some("oem20"));
        // Lists of scalars union, lists of maps concatenate.
        assert_eq!(m.k3s.as_ref().unwrap().args, ["--a", "--b"]);
        let names: Vec<_> = m.users.iter().map(|u| u.name.clone().unwrap()).collect();
        assert_eq!(names, ["one", "two"]);
        // The command line wins and its strings become typed values.
        assert!(m.k3s.as_ref().unwrap().enabled);
        assert_eq!(
            m.install.as_ref().unwrap().device.as_deref(),
            Some("/dev/vda")
        );
        assert!(
            l.warnings
                .iter()
                .any(|w| w.contains("99_noheader.yaml: no #cloud-config header")),
            "{:?}",
            l.warnings
        );
    }

    #[test]
    fn malformed_file_names_file_and_line_and_others_apply() {
        let t = Tree::new();
        src(&t, "/oem/10_good.yaml", "#cloud-config\nhostname: good\n");
        src(
            &t,
            "/oem/20_bad.yaml",
            "#cloud-config\nusers:\n  - name: x\n    groups: [a, b\nhostname: bad\n",
        );
        src(
            &t,
            "/oem/30_typed.yaml",
            "#cloud-config\n\nk3s:\n  enabled: maybe\n",
        );
        src(
            &t,
            "/oem/40_good.yaml",
            "#cloud-config\nk3s-agent:\n  enabled: true\n",
        );
        let l = load(&t.ctx, &no_fetch());
        assert_eq!(l.errors.len(), 2, "{:?}", l.errors);
        let e0 = l.errors[0].to_string();
        assert!(e0.starts_with("/oem/20_bad.yaml:"), "{e0}");
        assert!(
            matches!(l.errors[0], ConfigError::Yaml { line: 4..=5, .. }),
            "{e0}"
        );
        let e1 = l.errors[1].to_string();
        assert!(
            matches!(l.errors[1], ConfigError::Yaml { line: 4, .. }),
            "{e1}"
        );
        assert!(e1.starts_with("/oem/30_typed.yaml:4:"), "{e1}");
        assert_eq!(l.merged.hostname.as_deref(), Some("good"));
        assert!(l.merged.k3s_agent.unwrap().enabled);
        assert_eq!(l.sources.len(), 2);
    }

    #[test]
    fn unknown_keys_are_kept_and_warned_about() {
        let t = Tree::new();
        src(
            &t,
            "/oem/a.yaml",
            "#cloud-config\nfancy: {x: 1}\ndebug: true\nhostname: h\n",
        );
        let l = load(&t.ctx, &no_fetch());
        assert!(l.errors.is_empty());
        assert_eq!(l.raw["fancy"], serde_json::json!({"x": 1}));
        assert_eq!(
            l.warnings,
            ["unknown key \"fancy\" (in /oem/a.yaml): kept, not used"]
        );
    }

    #[test]
    fn yaml_bombs_and_deep_nesting_are_refused() {
        let mut bomb = String::from("#cloud-config\na: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..12 {
            let prev = if i == 0 {
                "a".to_owned()
            } else {
                format!("l{}", i - 1)
            };
            bomb.push_str(&format!("l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let e = parse("/oem/bomb.yaml", &bomb, true).unwrap_err();
        assert!(e.to_string().starts_with("/oem/bomb.yaml"), "{e}");
        let deep = format!("#cloud-config\nx: {}{}\n", "[".repeat(500), "]".repeat(500));
        let e = parse("/oem/deep.yaml", &deep, true).unwrap_err();
        assert!(e.to_string().starts_with("/oem/deep.yaml"), "{e}");
    }

    #[test]
    fn octal_permissions_and_loose_types() {
        let s = parse(
            "f",
            "#cloud-config\nstages:\n  boot:\n  - files:\n    - path: /a\n      permissions: 0600\n      owner: 1000\n    - path: /b\n      permissions: 420\n    - path: /c\n      permissions: \"0755\"\nk3s:\n  enabled: \"true\"\n  env: {A: 1, B: yes}\n  args: --one\n",
            true,
        )
        .unwrap()
        .unwrap();
        let files = &s.config.stages["boot"][0].files;
        assert_eq!(files[0].permissions, Some(0o600));
        assert_eq!(files[0].owner, Some(Id::Num(1000)));
        assert_eq!(files[1].permissions, Some(0o644));
        assert_eq!(files[2].permissions, Some(0o755));
        let k = s.config.k3s.unwrap();
        assert!(k.enabled);
        assert_eq!(k.args, ["--one"]);
        assert_eq!(k.env["A"], "1");
        assert_eq!(k.env["B"], "true");
    }

    #[test]
    fn cloud_init_keys_become_steps() {
        let s = parse(
            "/oem/c.yaml",
            "#cloud-config\nhostname: node1\nusers:\n- name: kairos\n  passwd: kairos\n  groups: [admin]\nssh_authorized_keys: [ssh-ed25519 AAA me]\nwrite_files:\n- path: /etc/x\n  content: hi\n  permissions: '0600'\n  owner: kairos:kairos\nruncmd:\n- echo one\n- [echo, two words]\nstages:\n  boot:\n  - name: mine\n    commands: [true]\n",
            true,
        )
        .unwrap()
        .unwrap();
        let st = s.config.effective_stages();
        let boot: Vec<_> = st["boot"].iter().map(|s| s.name.clone().unwrap()).collect();
        assert_eq!(boot, ["cloud-init users", "cloud-init", "mine"]);
        assert_eq!(
            st["boot"][0].authorized_keys["kairos"],
            ["ssh-ed25519 AAA me"]
        );
        assert_eq!(st["boot"][1].commands, ["echo one", "echo 'two words'"]);
        assert_eq!(st["initramfs"][0].hostname.as_deref(), Some("node1"));
        // Keys without users go to root.
        let s = parse("f", "#cloud-config\nssh_authorized_keys: [k1]\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(
            s.config.effective_stages()["boot"][0].authorized_keys["root"],
            ["k1"]
        );
    }

    #[test]
    fn config_url_is_fetched_and_an_unreachable_one_is_a_warning() {
        use std::io::{Read as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let body = "#cloud-config\nhostname: fromurl\nconfig_url: http://127.0.0.1:9/next\n";
            let (mut s, _) = l.accept().unwrap();
            // The whole request, then the answer.
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        });
        let t = Tree::new();
        src(&t, "/oem/a.yaml", "#cloud-config\nhostname: oem\n");
        t.cmdline(&format!("config_url=http://127.0.0.1:{port}/c.yaml"));
        let opts = LoadOptions {
            fetch: true,
            fetch_timeout: Duration::from_secs(3),
        };
        let start = std::time::Instant::now();
        let l = load(&t.ctx, &opts);
        assert!(start.elapsed() < Duration::from_secs(8));
        assert_eq!(
            l.merged.hostname.as_deref(),
            Some("fromurl"),
            "{:?}",
            l.errors
        );
        // The nested URL points at a closed port: an error for that URL only.
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        assert!(
            l.errors[0]
                .to_string()
                .starts_with("config_url http://127.0.0.1:9/next: "),
            "{}",
            l.errors[0]
        );
    }

    #[test]
    fn unknown_nested_and_unsupported_keys_are_warned_on_every_load() {
        let t = Tree::new();
        src(
            &t,
            "/oem/10.yaml",
            "#cloud-config\nusers:\n- name: a\n  colour: red\nwrite_files:\n- path: /x\n  mode: '0600'\nstages:\n  boot:\n  - name: s\n    frobnicate: 1\n    files:\n    - path: /y\n      colour: blue\nk0s:\n  enabled: true\ngrowpart:\n  devices: ['/']\n",
        );
        src(
            &t,
            "/oem/20.yaml",
            "#cloud-config\nk0s: {enabled: false}\nfancy: 1\n",
        );
        let expected = [
            "unknown key \"users.colour\" (in /oem/10.yaml): kept, not used",
            "unknown key \"write_files.mode\" (in /oem/10.yaml): kept, not used",
            "unknown key \"stages.boot.frobnicate\" (in /oem/10.yaml): kept, not used",
            "unknown key \"stages.boot.files.colour\" (in /oem/10.yaml): kept, not used",
            "unknown key \"fancy\" (in /oem/20.yaml): kept, not used",
            "not supported: key \"growpart\" (in /oem/10.yaml): partitions are not grown at boot; install sizes COS_PERSISTENT to fill the disk (install.partitions sets the sizes)",
            "not supported: key \"k0s\" (in /oem/10.yaml, /oem/20.yaml): k0s is not supported by this agent; use k3s",
        ];
        for _ in 0..2 {
            let l = load(&t.ctx, &no_fetch());
            assert!(l.errors.is_empty(), "{:?}", l.errors);
            let mut got = l.warnings.clone();
            got.sort();
            let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
            want.sort();
            assert_eq!(got, want);
            // Kept in the raw tree.
            assert_eq!(l.raw["users"][0]["colour"], "red");
        }
        // run-stage says them too.
        let mut log = Vec::new();
        crate::stages::run_stage(&t.ctx, "fs", &mut log).unwrap();
        let log = String::from_utf8(log).unwrap();
        assert!(
            log.contains("kairos-agent: warning: not supported: key \"k0s\" (in /oem/10.yaml, /oem/20.yaml): "),
            "{log}"
        );
        assert!(
            log.contains("kairos-agent: warning: unknown key \"stages.boot.frobnicate\""),
            "{log}"
        );
    }

    #[test]
    fn registry_lookup_rules() {
        use keys::{Lookup, Support, lookup};
        let key = |p: &[&str]| match lookup(p) {
            Lookup::Key(k) => Some(k.path),
            _ => None,
        };
        assert_eq!(
            key(&["stages", "boot", "files", "path"]),
            Some("stages.*.files.path")
        );
        assert_eq!(key(&["k0s"]), Some("k0s.**"));
        assert_eq!(key(&["k0s", "args", "x"]), Some("k0s.**"));
        assert_eq!(lookup(&["stages", "boot"]), Lookup::Parent);
        assert_eq!(lookup(&["stages", "boot", "nope"]), Lookup::Unknown);
        assert!(matches!(
            lookup(&["stages", "x", "environment", "ANY_NAME"]),
            Lookup::Key(k) if k.support == Support::Shown("hostname_environment_sysctl_dns_timesyncd")
        ));
        // No path is listed twice.
        let mut paths: Vec<&str> = keys::KEYS.iter().map(|k| k.path).collect();
        paths.sort();
        let n = paths.len();
        paths.dedup();
        assert_eq!(paths.len(), n, "a key is listed twice");
    }

    #[test]
    fn an_install_copies_the_templates_as_written() {
        let t = Tree::new();
        t.file("/etc/machine-id", "5f3a9c0e1b2d4f6a8c0e2b4d6f8a0c1e\n");
        src(
            &t,
            "/oem/10.yaml",
            "#cloud-config\nhostname: \"node-{{ trunc 4 .MachineID }}\"\n",
        );
        // A template opening a plain value is no YAML before rendering: kept rendered.
        src(
            &t,
            "/oem/20.yaml",
            "#cloud-config\nwrite_files:\n- path: /etc/a\n  permissions: {{ \"0600\" }}\n",
        );
        let l = load(&t.ctx, &no_fetch());
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.merged.hostname.as_deref(), Some("node-5f3a"));
        assert_eq!(l.raw["hostname"], "node-5f3a");
        assert_eq!(
            l.raw_as_written["hostname"],
            "node-{{ trunc 4 .MachineID }}"
        );
        assert_eq!(l.raw_as_written["write_files"], l.raw["write_files"]);
        assert_eq!(l.raw["write_files"][0]["permissions"], "0600");
    }

    #[test]
    fn templates_render_per_source_before_parsing() {
        let t = Tree::new();
        t.file("/etc/machine-id", "5f3a9c0e1b2d4f6a8c0e2b4d6f8a0c1e\n");
        t.file("/etc/hostname", "oldname\n");
        src(
            &t,
            "/oem/10.yaml",
            "#cloud-config\n# {{ a comment is not rendered }}\nhostname: node-{{ trunc 4 .MachineID }}\nwrite_files:\n- path: /etc/who\n  content: \"{{ .Values.node.hostname | upper }}\"\n  permissions: {{ \"0600\" }}\n",
        );
        src(
            &t,
            "/oem/20_bad.yaml",
            "#cloud-config\nusers:\n- name: {{ shout .MachineID }}\n",
        );
        let l = load(&t.ctx, &no_fetch());
        assert_eq!(l.merged.hostname.as_deref(), Some("node-5f3a"));
        assert_eq!(l.merged.write_files[0].content, "OLDNAME");
        // Rendered before parsing: the value is still an octal mode.
        assert_eq!(l.merged.write_files[0].permissions, Some(0o600));
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        assert_eq!(
            l.errors[0].to_string(),
            "/oem/20_bad.yaml:3: {{shout .MachineID}}: unknown function \"shout\""
        );
        assert!(l.merged.users.is_empty(), "the bad file is skipped");
        // The initramfs stage sets it.
        let mut log = Vec::new();
        crate::stages::run_stage(&t.ctx, "initramfs", &mut log).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.ctx.path("/etc/hostname")).unwrap(),
            "node-5f3a\n"
        );
        // Without a machine id the file that needs one is skipped, saying why.
        std::fs::remove_file(t.ctx.path("/etc/machine-id")).unwrap();
        let l = load(&t.ctx, &no_fetch());
        let e = l.errors[0].to_string();
        assert!(
            e.starts_with("/oem/10.yaml:3: {{trunc 4 .MachineID}}: no machine id: /etc/machine-id"),
            "{e}"
        );
        // A templated command-line config_url: values are URL-encoded.
        let mut r = Renderer::new(&t.ctx);
        assert_eq!(
            r.render_url(
                CMDLINE_ORIGIN,
                "http://d/r?h={{ .Values.node.hostname }} x&os={{ \"a b&c\" }}"
            )
            .unwrap(),
            "http://d/r?h=node-5f3a x&os=a+b%26c"
        );
    }

    #[test]
    fn cloud_init_paths_add_stage_files() {
        let t = Tree::new();
        src(
            &t,
            "/oem/10.yaml",
            "#cloud-config\ncloud-init-paths: [/custom/, relative, /oem]\nhostname: mine\n",
        );
        // No header needed there; their stages run, their other keys do not merge.
        t.file(
            "/custom/a.yaml",
            "hostname: theirs\nstages:\n  boot:\n  - commands: [echo custom >> ran]\n",
        );
        t.file(
            "/custom/notes.txt",
            "stages: {boot: [{commands: [echo no >> ran]}]}\n",
        );
        let l = load(&t.ctx, &no_fetch());
        let origins: Vec<&str> = l.sources.iter().map(|s| s.origin.as_str()).collect();
        assert_eq!(origins, ["/oem/10.yaml", "/custom/a.yaml"]);
        assert_eq!(l.merged.hostname.as_deref(), Some("mine"));
        assert_eq!(
            l.warnings,
            ["cloud-init-paths: \"relative\" is not an absolute path; not read"]
        );
        let mut log = Vec::new();
        crate::stages::run_stage(&t.ctx, "boot", &mut log).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.ctx.path("/ran")).unwrap(),
            "custom\n"
        );
    }

    #[test]
    fn node_facts_come_from_the_root() {
        let t = Tree::new();
        t.file("/etc/machine-id", "0123abcd\n");
        t.file("/etc/hostname", "shelf-1\n");
        t.file(
            "/etc/os-release",
            "ID=\"debian\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        );
        t.file("/sys/class/dmi/id/product_uuid", "4c4c4544-0031\n");
        t.file("/sys/class/dmi/id/product_serial", "SN-77\n");
        t.file("/sys/class/net/eth0/address", "52:54:00:aa:bb:cc\n");
        // A physical interface has a device; a virtual one (veth9) has none.
        t.file("/sys/class/net/eth0/device/.keep", "");
        t.file("/sys/class/net/veth9/address", "02:00:00:00:00:09\n");
        let f = node_facts(&t.ctx);
        assert_eq!(f.machine_id.as_deref(), Ok("0123abcd"));
        assert_eq!(f.hostname, "shelf-1");
        assert_eq!(
            (
                f.os_name.as_str(),
                f.os_vendor.as_str(),
                f.os_version.as_str()
            ),
            ("Debian GNU/Linux 12 (bookworm)", "debian", "12")
        );
        assert_eq!(f.product_uuid, "4c4c4544-0031");
        assert_eq!(f.product_serial, "SN-77");
        assert_eq!(
            f.network,
            [("eth0".to_owned(), "52:54:00:aa:bb:cc".to_owned())]
        );
        assert_eq!(f.random.len(), 32);
        assert!(
            f.random
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        );
        assert_eq!(f.uuid.len(), 36);
        assert_eq!(&f.uuid[14..15], "4", "a version 4 UUID");
    }
}
