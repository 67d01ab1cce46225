//! `kairos-agent p2p …` and `kairos-agent register`: the command-line side of the mesh in
//! the kairos-p2p crate (SPEC.md sections 7 and 8).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use kairos_p2p::node::{self, K3sSpec, K3sStarter, Mode, Outcome as NodeOutcome, PairingData};
use kairos_p2p::{P2pConfig, Token, config, qr};

use crate::k3s::{self, Supervisor};
use crate::{Ctx, Outcome};

/// Where install-mode saves the pairing QR code, under the root.
pub const PAIRING_PNG: &str = "/run/kairos/pairing-qr.png";
/// Where the paired config lands for the installer, under the root.
pub const PAIRING_DIR: &str = "/run/kairos/pairing";

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{path}: no `p2p:` block")]
    NoBlock { path: PathBuf },
    #[error("p2p.network_token: {0}")]
    Token(#[from] kairos_p2p::token::TokenError),
    #[error(transparent)]
    Qr(#[from] qr::QrError),
    #[error(transparent)]
    Node(#[from] node::NodeError),
    #[error("reading the config to send, {path}: {source}")]
    ReadCc {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

#[derive(Args)]
pub struct P2pArgs {
    #[command(subcommand)]
    pub command: P2pCmd,
}

#[derive(Subcommand)]
pub enum P2pCmd {
    /// Print a new network_token (base64 YAML, edgevpn format)
    GenerateToken,
    /// Join the mesh as a cluster node: leader election, roles, VPN, K3s
    Run {
        /// Cloud-config file with the `p2p:` block [default: the last `p2p:` block in the
        /// cloud-config directories]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// install-mode: show the pairing token as a QR code (console and PNG), wait for
    /// `register`, acknowledge and leave the config for the installer
    Pair {
        /// Cloud-config file whose p2p.network_token to use [default: a new token]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Give up after this many seconds (0: wait forever)
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        timeout: u64,
    },
}

#[derive(Args)]
pub struct RegisterArgs {
    /// Cloud-config to send to the node
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Disk the node installs to
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: String,
    /// Reboot the node after installing
    #[arg(long)]
    pub reboot: bool,
    /// Power the node off after installing
    #[arg(long)]
    pub poweroff: bool,
    /// Give up after this many seconds without an acknowledgement
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
    /// A PNG with the node's QR code, or the token itself
    #[arg(value_name = "IMAGE_OR_TOKEN")]
    pub image_or_token: String,
}

/// K3s for the mesh, through the agent's K3s supervisor (restarts, config.yaml and env file
/// under /etc/rancher/k3s). The supervisors live as long as the mesh node: dropping one stops
/// its K3s.
struct AgentK3s {
    ctx: Ctx,
    running: Vec<Supervisor>,
}

impl K3sStarter for AgentK3s {
    fn start(&mut self, spec: &K3sSpec) -> Result<(), String> {
        self.running.push(start_k3s(&self.ctx, spec)?);
        Ok(())
    }
}

/// Start `k3s server|agent` for a mesh role under the supervisor.
pub fn start_k3s(ctx: &Ctx, spec: &K3sSpec) -> Result<Supervisor, String> {
    let spec = k3s::Spec {
        role: if spec.server {
            k3s::Role::Server
        } else {
            k3s::Role::Agent
        },
        args: spec.args.clone(),
        env: spec.env.iter().cloned().collect(),
        config: serde_json::Map::new(),
    };
    Supervisor::start(ctx, spec).map_err(|e| e.to_string())
}

fn load_config(ctx: &Ctx, path: Option<&Path>) -> Result<P2pConfig, P2pError> {
    match path {
        Some(p) => config::load_file(p)?.ok_or_else(|| P2pError::NoBlock { path: p.into() }),
        None => Ok(config::load_default(&ctx.root)?),
    }
}

pub fn p2p(
    ctx: &Ctx,
    args: P2pArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<Outcome, P2pError> {
    match args.command {
        P2pCmd::GenerateToken => {
            writeln!(out, "{}", Token::generate().encode())?;
        }
        P2pCmd::Run { config } => {
            let cfg = load_config(ctx, config.as_deref())?;
            let token = Token::decode(&cfg.network_token)?;
            node::run(node::Options {
                root: ctx.root.clone(),
                config: cfg,
                token,
                mode: Mode::Node,
                k3s: Box::new(AgentK3s {
                    ctx: ctx.clone(),
                    running: Vec::new(),
                }),
                timeout: None,
            })?;
        }
        P2pCmd::Pair { config, timeout } => {
            let (cfg, token) = match config {
                Some(p) => {
                    let cfg = load_config(ctx, Some(&p))?;
                    let token = Token::decode(&cfg.network_token)?;
                    (cfg, token)
                }
                None => (P2pConfig::default(), Token::generate()),
            };
            let text = token.encode();
            let png = ctx.path(PAIRING_PNG);
            qr::write_png(&text, &png)?;
            writeln!(out, "{}", qr::render_text(&text)?)?;
            writeln!(
                out,
                "kairos-p2p: scan this code or run `kairos-agent register {}` (QR saved to {})",
                png.display(),
                png.display()
            )?;
            out.flush()?;
            let outcome = node::run(node::Options {
                root: ctx.root.clone(),
                config: cfg,
                token,
                mode: Mode::AwaitPairing,
                k3s: Box::new(AgentK3s {
                    ctx: ctx.clone(),
                    running: Vec::new(),
                }),
                timeout: (timeout > 0).then(|| Duration::from_secs(timeout)),
            })?;
            if let NodeOutcome::Paired(data) = outcome {
                save_pairing(ctx, &data, out)?;
            }
        }
    }
    Ok(Outcome::Done)
}

/// Leave the received config and install request where the installer picks them up.
fn save_pairing(ctx: &Ctx, data: &PairingData, out: &mut dyn Write) -> Result<(), P2pError> {
    let dir = ctx.path(PAIRING_DIR);
    // The config may carry tokens and passwords: root only, like k3s's config.
    let write = |name: &str, content: &[u8]| -> Result<PathBuf, P2pError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let path = dir.join(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
            })
            .and_then(|mut f| {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                f.write_all(content)
            })
            .map_err(|source| P2pError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    };
    let cc = write("config.yaml", data.cc.as_bytes())?;
    let req = serde_json::to_vec_pretty(data).unwrap_or_default();
    write("request.json", &req)?;
    writeln!(
        out,
        "kairos-p2p: paired: config in {}, install device={} reboot={} poweroff={}",
        cc.display(),
        data.device,
        data.reboot,
        data.poweroff
    )?;
    Ok(())
}

/// The token from a QR code image, or the argument itself.
pub fn token_from_arg(arg: &str) -> Result<String, P2pError> {
    let p = Path::new(arg);
    if p.is_file() {
        Ok(qr::decode_png(p)?)
    } else {
        Ok(arg.to_owned())
    }
}

pub fn register(
    ctx: &Ctx,
    args: RegisterArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<Outcome, P2pError> {
    let token = Token::decode(&token_from_arg(&args.image_or_token)?)?;
    let cc = match &args.config {
        Some(p) => std::fs::read_to_string(p).map_err(|source| P2pError::ReadCc {
            path: p.clone(),
            source,
        })?,
        None => String::new(),
    };
    let data = PairingData {
        device: args.device,
        cc,
        reboot: args.reboot,
        poweroff: args.poweroff,
    };
    let outcome = node::run(node::Options {
        root: ctx.root.clone(),
        config: P2pConfig::default(),
        token,
        mode: Mode::Register(data),
        k3s: Box::new(AgentK3s {
            ctx: ctx.clone(),
            running: Vec::new(),
        }),
        timeout: Some(Duration::from_secs(args.timeout)),
    })?;
    if let NodeOutcome::Registered { node } = outcome {
        writeln!(out, "kairos-agent: registered with node {node}")?;
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_argument_or_qr_image() {
        let dir = tempfile::tempdir().unwrap();
        let t = Token::generate().encode();
        let png = dir.path().join("qr.png");
        qr::write_png(&t, &png).unwrap();
        assert_eq!(token_from_arg(png.to_str().unwrap()).unwrap(), t);
        assert_eq!(token_from_arg(&t).unwrap(), t);
    }

    #[test]
    fn k3s_stand_in_gets_role_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("usr/bin/k3s");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        let rec = dir.path().join("rec");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho \"$@ URL=$K3S_URL\" > {r}.tmp\nmv {r}.tmp {r}\nexec sleep 30\n",
                r = rec.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let spec = K3sSpec {
            server: false,
            args: vec!["--flannel-iface=edgevpn0".into()],
            env: vec![
                ("K3S_URL".into(), "https://10.1.0.2:6443".into()),
                ("K3S_TOKEN".into(), "t".into()),
            ],
        };
        let ctx = Ctx::new(dir.path(), crate::DEFAULT_GRUBENV);
        let sup = start_k3s(&ctx, &spec).unwrap();
        for _ in 0..250 {
            if rec.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        sup.stop();
        assert_eq!(
            std::fs::read_to_string(&rec).unwrap(),
            "agent --flannel-iface=edgevpn0 URL=https://10.1.0.2:6443\n"
        );
    }
}
