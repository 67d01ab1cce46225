//! `kairos-agent config show` and `config get KEY`: the node's merged cloud-config (every
//! file, the kernel command line and the `config_url`s, merged in Kairos order, unknown keys
//! kept) as YAML, or one value of it for scripts. As upstream, `config` alone is `show`.

use std::io::Write;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::config::LoadOptions;
use crate::{AgentError, Ctx, Outcome, query, stages};

/// `kairos-agent config`'s arguments.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub action: Option<ConfigAction>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the merged cloud-config as YAML (the default)
    Show,
    /// Print one value of the merged cloud-config: a scalar bare, a map or list as YAML;
    /// exit 1 when the key is absent. KEY is a dotted path: k3s.enabled, install.device,
    /// users.0.name (or users[0].name)
    #[command(visible_alias = "g")]
    Get {
        #[arg(value_name = "KEY")]
        key: String,
    },
}

/// The merged tree as the agent sees it; load problems are said on `err`.
fn merged(ctx: &Ctx, err: &mut dyn Write) -> Result<Value, AgentError> {
    let loaded = crate::sources::load(ctx, &LoadOptions::default());
    stages::report_load(&loaded, err).map_err(AgentError::Output)?;
    Ok(Value::Object(loaded.raw))
}

pub fn config(
    ctx: &Ctx,
    args: &ConfigArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    let tree = merged(ctx, err)?;
    match &args.action {
        None | Some(ConfigAction::Show) => {
            write!(out, "{}", show(&tree)).map_err(AgentError::Output)?;
            Ok(Outcome::Done)
        }
        Some(ConfigAction::Get { key }) => get(&tree, key, "the merged configuration", out, err),
    }
}

/// The whole tree with the header that makes it a cloud-config file again.
pub fn show(tree: &Value) -> String {
    match tree {
        Value::Object(m) if m.is_empty() => "#cloud-config\n{}\n".into(),
        _ => format!("#cloud-config\n{}", query::yaml(tree)),
    }
}

/// `get KEY` over `tree`: the value on `out`, or (exit 1) why not on `err`. Shared by
/// `state get`.
pub fn get(
    tree: &Value,
    key: &str,
    what: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    match query::lookup(tree, key) {
        Ok(v) => {
            write!(out, "{}", query::render(v)).map_err(AgentError::Output)?;
            Ok(Outcome::Done)
        }
        Err(e) => {
            writeln!(err, "kairos-agent: {e} (in {what})").map_err(AgentError::Output)?;
            Ok(Outcome::Refused)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn args(action: Option<ConfigAction>) -> ConfigArgs {
        ConfigArgs { action }
    }

    fn get_args(key: &str) -> ConfigArgs {
        args(Some(ConfigAction::Get { key: key.into() }))
    }

    #[test]
    fn show_prints_the_merged_tree_with_unknown_keys() {
        let t = Tree::new();
        t.file(
            "/oem/90_a.yaml",
            "#cloud-config\nhostname: first\nk3s:\n  enabled: true\nmy_own_key: kept\n",
        );
        t.file(
            "/usr/local/cloud-config/10_b.yaml",
            "#cloud-config\nhostname: base\ninstall:\n  device: /dev/vda\n",
        );
        let (r, out, err) = run(|o, e| config(&t.ctx, &args(None), o, e));
        assert_eq!(r.unwrap(), Outcome::Done);
        assert!(out.starts_with("#cloud-config\n"), "{out}");
        let back: Value = serde_saphyr::from_str(&out).unwrap();
        // /oem is read after /usr/local/cloud-config: its hostname wins.
        assert_eq!(back["hostname"], "first");
        assert_eq!(back["install"]["device"], "/dev/vda");
        assert_eq!(back["k3s"]["enabled"], true);
        assert_eq!(back["my_own_key"], "kept");
        assert!(
            err.contains("my_own_key"),
            "the unknown key is warned about: {err}"
        );
        // `config show` is the same as `config`.
        let (_, out2, _) = run(|o, e| config(&t.ctx, &args(Some(ConfigAction::Show)), o, e));
        assert_eq!(out, out2);
    }

    #[test]
    fn show_of_nothing_is_an_empty_config() {
        let t = Tree::new();
        let (r, out, _) = run(|o, e| config(&t.ctx, &args(None), o, e));
        assert_eq!(r.unwrap(), Outcome::Done);
        assert_eq!(out, "#cloud-config\n{}\n");
    }

    #[test]
    fn get_prints_scalars_bare_blocks_as_yaml_and_refuses_absent_keys() {
        let t = Tree::new();
        t.file(
            "/oem/90_a.yaml",
            "#cloud-config\nhostname: node-7\nk3s:\n  enabled: true\n  args:\n  - --disable=traefik\nusers:\n- name: kairos\n",
        );
        t.cmdline("kairos.config=install.device=/dev/sdb");
        let get = |k: &str| run(|o, e| config(&t.ctx, &get_args(k), o, e));
        let (r, out, _) = get("hostname");
        assert_eq!((r.unwrap(), out.as_str()), (Outcome::Done, "node-7\n"));
        let (_, out, _) = get("k3s.enabled");
        assert_eq!(out, "true\n");
        let (_, out, _) = get("users[0].name");
        assert_eq!(out, "kairos\n");
        let (_, out, _) = get("install.device");
        assert_eq!(out, "/dev/sdb\n", "the command line's kairos.config counts");
        let (_, out, _) = get("k3s");
        let back: Value = serde_saphyr::from_str(&out).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"enabled": true, "args": ["--disable=traefik"]})
        );
        let (r, out, err) = get("k3s.token");
        assert_eq!(r.unwrap(), Outcome::Refused);
        assert_eq!(out, "");
        // The last line (the loader's own warnings, if any, come first).
        assert!(
            err.ends_with(
                "kairos-agent: key \"k3s.token\" not found: k3s has no \"token\" (in the merged configuration)\n"
            ),
            "{err}"
        );
    }
}
