//! `kairos-agent upgrade list-releases`: the tags of the image repository upgrades come from,
//! newest first, as full references (`registry/repository:tag`) that `upgrade --source`
//! takes.
//!
//! The repository, first found of: `--image`; `upgrade.system.source` when it is a registry
//! image; the running image's `KAIROS_IMAGE_REPO` in /etc/kairos-release (upstream's
//! kairos-release field); the registry source of the last install or upgrade that wrote
//! active.img (the `.kairos-state` history). Upstream builds the repository from
//! kairos-release's flavor fields and a `--registry` (quay.io/kairos); a node of ours
//! upgrades from whatever repository it was given, so that is the one listed.
//!
//! The order: tags that are versions (`v1.2.3`, `1.2.3-rc1`, semver with an optional `v`)
//! newest first, a release before its pre-releases; then every other tag (`latest`, `main`,
//! a commit) by name. Tags come from the distribution API's tags list, page by page.

use std::cmp::Ordering;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

use super::source::{self, ImageRef, Source};
use super::{DEFAULT_KAIROS_STATE, Options, UpgradeError};
use crate::config::LoadOptions;
use crate::{AgentError, Ctx, Outcome, stages};

/// `kairos-agent upgrade`'s arguments: the upgrade's flags, or a subcommand.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UpgradeArgs {
    #[command(subcommand)]
    pub action: Option<UpgradeAction>,
    #[command(flatten)]
    pub options: Options,
}

#[derive(Debug, Subcommand)]
pub enum UpgradeAction {
    /// List the tags of the image repository upgrades come from, newest first (versions by
    /// semver, then the other tags by name), one full reference a line
    ListReleases(ListArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// The image repository: oci:REF, docker:REF or a bare REF (its tag is ignored)
    /// [default: upgrade.system.source, else KAIROS_IMAGE_REPO in /etc/kairos-release, else
    /// the last install or upgrade's registry source in the history]
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// terminal: one reference a line; json or yaml: a list of them
    #[arg(long, value_enum, default_value_t = Format::Terminal)]
    pub output: Format,
    /// The install/upgrade history, under --root
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KAIROS_STATE)]
    pub kairos_state: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Terminal,
    Json,
    Yaml,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleasesError {
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error(
        "no image repository to list: pass --image, or set upgrade.system.source to a registry \
         image ({tried})"
    )]
    NoRepository { tried: String },
    #[error("--image {given:?}: not a registry image (oci:REF, docker:REF or a bare REF)")]
    NotRegistry { given: String },
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// `upgrade` and its subcommands.
pub fn upgrade_cmd(
    ctx: &Ctx,
    args: &UpgradeArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, ReleasesError> {
    match &args.action {
        None => Ok(super::upgrade(ctx, &args.options, out, err)?),
        Some(UpgradeAction::ListReleases(a)) => list_releases(ctx, a, out, err),
    }
}

/// A tag read as a semantic version: MAJOR.MINOR.PATCH with an optional `v`, pre-release
/// identifiers after `-`, build metadata after `+` (ignored in the order, as semver says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    core: [u64; 3],
    pre: Vec<Ident>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ident {
    Num(u64),
    Text(String),
}

impl Ord for Ident {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Ident::Num(a), Ident::Num(b)) => a.cmp(b),
            // Numeric identifiers sort before alphanumeric ones.
            (Ident::Num(_), Ident::Text(_)) => Ordering::Less,
            (Ident::Text(_), Ident::Num(_)) => Ordering::Greater,
            (Ident::Text(a), Ident::Text(b)) => a.cmp(b),
        }
    }
}

impl PartialOrd for Ident {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core.cmp(&other.core).then_with(|| {
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                // A release is newer than its pre-releases.
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => self.pre.cmp(&other.pre),
            }
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Version {
    pub fn parse(tag: &str) -> Option<Version> {
        let t = tag.strip_prefix(['v', 'V']).unwrap_or(tag);
        let t = t.split_once('+').map_or(t, |(v, _)| v);
        let (core, pre) = match t.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (t, None),
        };
        let mut nums = [0u64; 3];
        let mut parts = core.split('.');
        for n in &mut nums {
            let p = parts.next()?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            *n = p.parse().ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        let pre = match pre {
            None => Vec::new(),
            Some(p) => p
                .split('.')
                .map(|i| {
                    if i.is_empty() {
                        None
                    } else if i.bytes().all(|b| b.is_ascii_digit()) {
                        i.parse().ok().map(Ident::Num)
                    } else {
                        Some(Ident::Text(i.to_string()))
                    }
                })
                .collect::<Option<Vec<_>>>()?,
        };
        Some(Version { core: nums, pre })
    }
}

/// Tags newest first: versions by semver (equal versions by tag, so `v1.0.0` and `1.0.0`
/// keep one order), then the others by name. Duplicates are dropped.
pub fn sort_tags(tags: &[String]) -> Vec<String> {
    let mut versions: Vec<(Version, &String)> = Vec::new();
    let mut others: Vec<&String> = Vec::new();
    for t in tags {
        match Version::parse(t) {
            Some(v) => versions.push((v, t)),
            None => others.push(t),
        }
    }
    versions.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(a.1)));
    others.sort();
    let mut out: Vec<String> = Vec::new();
    for t in versions.into_iter().map(|(_, t)| t).chain(others) {
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    out
}

/// The registry source of the newest history entry that wrote active.img.
pub fn history_source(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim().strip_prefix("- ")?).ok())
        .filter(|e| e["image"] == "active.img")
        .filter_map(|e| e["source"].as_str().map(str::to_string))
        .rfind(|s| matches!(source::parse(s), Ok(Source::Oci(_))))
}

/// Where the repository comes from, and the running image's reference when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub image: ImageRef,
    pub from: String,
    pub current: Option<String>,
}

/// Picks the repository (see the module's comment).
pub fn choose(
    ctx: &Ctx,
    args: &ListArgs,
    configured: Option<&str>,
) -> Result<Chosen, ReleasesError> {
    let release = std::fs::read_to_string(ctx.path("/etc/kairos-release")).unwrap_or_default();
    let running =
        kairos_util::envfile::value(&release, "KAIROS_IMAGE_REPO").filter(|v| !v.is_empty());
    let history_path = ctx.path(&args.kairos_state);
    let history = std::fs::read_to_string(&history_path)
        .ok()
        .and_then(|t| history_source(&t));
    let current = running.clone().or_else(|| history.clone());
    let oci = |s: &str| match source::parse(s) {
        Ok(Source::Oci(r)) => Some(r),
        _ => None,
    };
    if let Some(given) = &args.image {
        return match source::parse(given)? {
            Source::Oci(image) => Ok(Chosen {
                image,
                from: "--image".into(),
                current,
            }),
            _ => Err(ReleasesError::NotRegistry {
                given: given.clone(),
            }),
        };
    }
    let mut tried = Vec::new();
    match configured {
        Some(s) => match oci(s) {
            Some(image) => {
                return Ok(Chosen {
                    image,
                    from: "upgrade.system.source".into(),
                    current,
                });
            }
            None => tried.push(format!(
                "upgrade.system.source {s:?} is not a registry image"
            )),
        },
        None => tried.push("upgrade.system.source is not set".into()),
    }
    match running.as_deref().map(|r| (r, oci(r))) {
        Some((_, Some(image))) => {
            return Ok(Chosen {
                image,
                from: "KAIROS_IMAGE_REPO in /etc/kairos-release".into(),
                current,
            });
        }
        Some((r, None)) => tried.push(format!(
            "KAIROS_IMAGE_REPO {r:?} in /etc/kairos-release is not an image reference"
        )),
        None => tried.push("/etc/kairos-release has no KAIROS_IMAGE_REPO".into()),
    }
    match history.as_deref().and_then(oci) {
        Some(image) => Ok(Chosen {
            image,
            from: format!(
                "the last install or upgrade in {}",
                args.kairos_state.display()
            ),
            current,
        }),
        None => {
            tried.push(format!(
                "{} names no registry install or upgrade",
                args.kairos_state.display()
            ));
            Err(ReleasesError::NoRepository {
                tried: tried.join("; "),
            })
        }
    }
}

/// The lines (or document) `list-releases` prints for these sorted references.
pub fn render(refs: &[String], format: Format) -> String {
    match format {
        Format::Terminal => refs.iter().map(|r| format!("{r}\n")).collect(),
        Format::Json => {
            let mut s = serde_json::to_string(refs).unwrap_or_else(|_| "[]".into());
            s.push('\n');
            s
        }
        Format::Yaml if refs.is_empty() => "[]\n".into(),
        Format::Yaml => crate::query::yaml(&serde_json::json!(refs)),
    }
}

pub fn list_releases(
    ctx: &Ctx,
    args: &ListArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, ReleasesError> {
    let loaded = crate::sources::load(ctx, &LoadOptions::default());
    stages::report_load(&loaded, err).map_err(AgentError::Output)?;
    let configured = loaded
        .merged
        .upgrade
        .as_ref()
        .and_then(|u| u.system.as_ref())
        .and_then(|s| s.source.clone());
    let chosen = choose(ctx, args, configured.as_deref())?;
    let repo = format!("{}/{}", chosen.image.registry, chosen.image.repository);
    let say = |err: &mut dyn Write, s: String| writeln!(err, "{s}").map_err(AgentError::Output);
    say(
        err,
        format!("kairos-agent: repository {repo} (from {})", chosen.from),
    )?;
    if let Some(c) = &chosen.current {
        say(err, format!("kairos-agent: current image {c}"))?;
    }
    let registry = super::fetch::Registry::new(&chosen.image, &repo)?;
    let tags = registry.tags()?;
    let refs: Vec<String> = sort_tags(&tags)
        .into_iter()
        .map(|t| format!("{repo}:{t}"))
        .collect();
    if refs.is_empty() {
        say(err, format!("kairos-agent: {repo} has no tags"))?;
    }
    write!(out, "{}", render(&refs, args.output)).map_err(AgentError::Output)?;
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap_or_else(|| panic!("{s} is a version"))
    }

    #[test]
    fn versions_parse_and_order_as_semver() {
        assert_eq!(v("v1.2.3"), v("1.2.3"));
        assert_eq!(v("1.2.3+build.5"), v("1.2.3"));
        for s in [
            "latest",
            "1.2",
            "v1",
            "1.2.3.4",
            "a1.2.3",
            "1.2.x",
            "1.2.3-",
            "1.2.3-a..b",
            "",
        ] {
            assert_eq!(Version::parse(s), None, "{s}");
        }
        // semver.org's own example order, then numbers compared as numbers.
        let chain = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.9.0",
            "1.10.0",
            "2.0.0",
        ];
        for w in chain.windows(2) {
            assert!(v(w[0]) < v(w[1]), "{} < {}", w[0], w[1]);
        }
    }

    #[test]
    fn tags_sort_newest_first_with_other_tags_last() {
        let tags: Vec<String> = [
            "latest",
            "v0.57.0-rc1",
            "v0.9.0",
            "v0.57.0",
            "main",
            "v0.57.0-rc2",
            "v0.10.1",
            "v0.57.0-alpha2",
            "1.0.0",
            "sha-abc123",
            "v0.57.0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            sort_tags(&tags),
            [
                "1.0.0",
                "v0.57.0",
                "v0.57.0-rc2",
                "v0.57.0-rc1",
                "v0.57.0-alpha2",
                "v0.10.1",
                "v0.9.0",
                "latest",
                "main",
                "sha-abc123"
            ]
        );
    }

    #[test]
    fn output_formats() {
        let refs = vec!["r/x:v2".to_string(), "r/x:v1".to_string()];
        assert_eq!(render(&refs, Format::Terminal), "r/x:v2\nr/x:v1\n");
        assert_eq!(render(&refs, Format::Json), "[\"r/x:v2\",\"r/x:v1\"]\n");
        let y = render(&refs, Format::Yaml);
        let back: Vec<String> = serde_saphyr::from_str(&y).unwrap();
        assert_eq!(back, refs, "{y}");
        assert_eq!(render(&[], Format::Terminal), "");
        assert_eq!(render(&[], Format::Json), "[]\n");
        assert_eq!(render(&[], Format::Yaml), "[]\n");
    }

    fn list_args(image: Option<&str>) -> ListArgs {
        ListArgs {
            image: image.map(str::to_string),
            output: Format::Terminal,
            kairos_state: DEFAULT_KAIROS_STATE.into(),
        }
    }

    #[test]
    fn the_repository_comes_from_the_flag_the_config_the_release_file_or_the_history() {
        let t = Tree::new();
        let a = list_args(None);
        // Nothing at all: every place tried is named.
        let e = choose(&t.ctx, &a, None).unwrap_err().to_string();
        assert!(e.contains("upgrade.system.source is not set"), "{e}");
        assert!(
            e.contains("/etc/kairos-release has no KAIROS_IMAGE_REPO"),
            "{e}"
        );
        assert!(
            e.contains("/usr/local/.kairos-state names no registry"),
            "{e}"
        );
        // The history: the newest registry source that wrote active.img.
        t.file(
            DEFAULT_KAIROS_STATE,
            concat!(
                "- {\"action\":\"install\",\"source\":\"oci:reg.example/os/node:v1\",\"image\":\"active.img\"}\n",
                "- {\"action\":\"upgrade\",\"source\":\"oci:reg.example/os/recovery:v1\",\"image\":\"recovery.squashfs\"}\n",
                "- {\"action\":\"upgrade\",\"source\":\"dir:/tmp/x\",\"image\":\"active.img\"}\n",
                "not json\n",
            ),
        );
        let c = choose(&t.ctx, &a, None).unwrap();
        assert_eq!(c.image.registry, "reg.example");
        assert_eq!(c.image.repository, "os/node");
        assert!(c.from.contains(".kairos-state"), "{}", c.from);
        assert_eq!(c.current.as_deref(), Some("oci:reg.example/os/node:v1"));
        // kairos-release wins over the history, and is the current image.
        t.file(
            "/etc/kairos-release",
            "KAIROS_VERSION=\"v1\"\nKAIROS_IMAGE_REPO=\"quay.io/kairos/debian:v1.2.0\"\n",
        );
        let c = choose(&t.ctx, &a, None).unwrap();
        assert_eq!(
            (c.image.registry.as_str(), c.image.repository.as_str()),
            ("quay.io", "kairos/debian")
        );
        assert_eq!(c.current.as_deref(), Some("quay.io/kairos/debian:v1.2.0"));
        // The configured source wins over both; a non-registry source is passed over.
        let c = choose(&t.ctx, &a, Some("docker:localhost:5000/os/custom:v3")).unwrap();
        assert_eq!(c.image.registry, "localhost:5000");
        assert_eq!(c.from, "upgrade.system.source");
        let c = choose(&t.ctx, &a, Some("dir:/srv/root")).unwrap();
        assert_eq!(c.image.repository, "kairos/debian");
        // The flag wins over everything; a flag that is not a registry image is refused.
        let c = choose(&t.ctx, &list_args(Some("10.0.0.1:5000/a/b")), Some("x/y:1")).unwrap();
        assert_eq!(
            (c.image.registry.as_str(), c.from.as_str()),
            ("10.0.0.1:5000", "--image")
        );
        let e = choose(&t.ctx, &list_args(Some("file:/x.img")), None).unwrap_err();
        assert!(matches!(e, ReleasesError::NotRegistry { .. }), "{e}");
    }
}
