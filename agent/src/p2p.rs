//! `kairos-agent p2p …` and `kairos-agent register`: the command-line side of the mesh in
//! the kairos-p2p crate (SPEC.md sections 7 and 8).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use kairos_p2p::node::{self, K3sSpec, K3sStarter, Mode, Outcome as NodeOutcome, PairingData};
use kairos_p2p::{P2pConfig, Token, config, qr};

use kairos_util::{IoError, IoResultExt};

use crate::config::{self as cloud_config, LoadOptions};
use crate::install::{self, InstallError};
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
    Token(kairos_p2p::token::TokenError),
    #[error(transparent)]
    Qr(#[from] qr::QrError),
    /// The error is in the message, so not also the source (no repeat in chains).
    #[error("{path}: neither a PNG nor a text file with a QR code or a token: {error}")]
    QrText { path: PathBuf, error: qr::QrError },
    #[error(transparent)]
    Io(#[from] IoError),
    /// The image-or-token argument, said as `reading PATH: error` (what the user typed first).
    #[error("reading {}: {}", .0.path.display(), .0.err)]
    ReadArg(IoError),
    #[error(transparent)]
    Node(#[from] node::NodeError),
    #[error("the paired config, saved as {path}: no #cloud-config header in its first lines")]
    NoHeader { path: PathBuf },
    /// The error names the file (the saved copy of the paired config); it is in the
    /// message, so not also the source (no repeat in chains).
    #[error("the paired config: {error}")]
    PairedConfig { error: crate::config::ConfigError },
    /// The node's cloud-config for the mesh's K3s (the error names the file and line).
    #[error(transparent)]
    CloudConfig(crate::config::ConfigError),
    #[error("merging the paired config into {path}: {message}")]
    Merge { path: PathBuf, message: String },
    #[error("installing to {device} as the pairing asked: {error}")]
    Install {
        device: String,
        error: Box<InstallError>,
    },
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<kairos_p2p::token::TokenError> for P2pError {
    fn from(e: kairos_p2p::token::TokenError) -> P2pError {
        P2pError::Token(e)
    }
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
    /// `register`, acknowledge, merge the received config into this node's and install with
    /// it (to the requested device, else install.device), then reboot or power off if asked
    Pair {
        /// Cloud-config file whose p2p.network_token to use [default: a new token]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Give up after this many seconds (0: wait forever)
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        timeout: u64,
        /// Only save the received config and request (under /run/kairos/pairing); do not
        /// install
        #[arg(long)]
        no_install: bool,
        /// Neither reboot nor power off after installing, whatever the request or
        /// install.reboot / install.poweroff say
        #[arg(long)]
        no_reboot: bool,
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
    /// The node's QR code as a PNG, or as a text file holding the console's block-character
    /// drawing (a serial log), or the token itself
    #[arg(value_name = "QR_OR_TOKEN")]
    pub image_or_token: String,
}

/// K3s for the mesh, through the agent's K3s supervisor (restarts, config.yaml and env file
/// under /etc/rancher/k3s). The supervisors live as long as the mesh node: dropping one stops
/// its K3s. `cloud` is the node's cloud-config: its `k3s`/`k3s-agent` blocks and `kubevip`.
struct AgentK3s {
    ctx: Ctx,
    cloud: cloud_config::Config,
    running: Vec<Supervisor>,
}

impl AgentK3s {
    fn new(ctx: &Ctx, cloud: cloud_config::Config) -> Box<AgentK3s> {
        Box::new(AgentK3s {
            ctx: ctx.clone(),
            cloud,
            running: Vec::new(),
        })
    }
}

impl K3sStarter for AgentK3s {
    fn start(&mut self, spec: &K3sSpec) -> Result<(), String> {
        self.running
            .push(start_k3s(&self.ctx, &mesh_k3s_spec(spec, &self.cloud))?);
        Ok(())
    }
}

/// What K3s runs with for a mesh role, as provider-kairos builds it: the role's arguments
/// and environment (VPN interface and address, join URL and token, `--cluster-init` /
/// `--server`), a server's `--tls-san=<eip>` when `kubevip` is enabled, then the user's
/// block — `k3s` for servers, `k3s-agent` for workers, whether or not `enabled` is set —
/// appended (`args`), merged over (`env`) or replacing them (`replace_args`/`replace_env`),
/// with its `config` for config.yaml. A server with kubevip also writes its manifests.
pub fn mesh_k3s_spec(spec: &K3sSpec, cloud: &cloud_config::Config) -> k3s::Spec {
    let (role, block) = if spec.server {
        (k3s::Role::Server, cloud.k3s.clone())
    } else {
        (k3s::Role::Agent, cloud.k3s_agent.clone())
    };
    let kv = cloud.kubevip.as_ref();
    let vip = spec.server && crate::kubevip::enabled(kv);
    let mut defaults = spec.args.clone();
    if vip {
        defaults.extend(crate::kubevip::server_args(kv).unwrap_or_default());
    }
    let env = spec.env.iter().cloned().collect();
    let mut out = k3s::Spec::from_block(role, &block.unwrap_or_default(), &defaults, &env);
    out.kubevip = kv.filter(|_| vip).cloned();
    out
}

/// Start K3s under the supervisor.
pub fn start_k3s(ctx: &Ctx, spec: &k3s::Spec) -> Result<Supervisor, String> {
    Supervisor::start(ctx, spec.clone()).map_err(|e| e.to_string())
}

/// The node's cloud-config for the mesh's K3s: the `--config` file alone, else every
/// source merged (as the daemon reads it).
fn load_cloud(ctx: &Ctx, path: Option<&Path>) -> Result<cloud_config::Config, P2pError> {
    let Some(p) = path else {
        return Ok(crate::sources::load(ctx, &LoadOptions::default()).merged);
    };
    let text = std::fs::read_to_string(p).at(p, "reading")?;
    let parsed = cloud_config::parse(&p.display().to_string(), &text, false)
        .map_err(P2pError::CloudConfig)?;
    Ok(parsed.map(|s| s.config).unwrap_or_default())
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
    err: &mut dyn Write,
) -> Result<Outcome, P2pError> {
    match args.command {
        P2pCmd::GenerateToken => {
            writeln!(out, "{}", Token::generate().encode()).map_err(P2pError::Output)?;
        }
        P2pCmd::Run { config } => {
            let cfg = load_config(ctx, config.as_deref())?;
            let token = Token::decode(&cfg.network_token)?;
            let cloud = load_cloud(ctx, config.as_deref())?;
            node::run(node::Options {
                root: ctx.root.clone(),
                config: cfg,
                token,
                mode: Mode::Node,
                k3s: AgentK3s::new(ctx, cloud),
                timeout: None,
            })?;
        }
        P2pCmd::Pair {
            config,
            timeout,
            no_install,
            no_reboot,
        } => {
            let (cfg, token) = match config {
                Some(p) => {
                    let cfg = load_config(ctx, Some(&p))?;
                    let token = Token::decode(&cfg.network_token)?;
                    (cfg, token)
                }
                None => (P2pConfig::default(), Token::generate()),
            };
            let drawn = show_token(ctx, &token.encode())?;
            let disks = crate::install::device::seen_disks(ctx);
            writeln!(out, "{}", install_screen(&disks, Some(&drawn))).map_err(P2pError::Output)?;
            out.flush().map_err(P2pError::Output)?;
            let outcome = node::run(node::Options {
                root: ctx.root.clone(),
                config: cfg,
                token,
                mode: Mode::AwaitPairing,
                k3s: AgentK3s::new(ctx, cloud_config::Config::default()),
                timeout: (timeout > 0).then(|| Duration::from_secs(timeout)),
            })?;
            if let NodeOutcome::Paired(data) = outcome {
                let saved = save_pairing(ctx, &data, out)?;
                if no_install {
                    writeln!(out, "kairos-p2p: --no-install: not installing")
                        .map_err(P2pError::Output)?;
                } else {
                    return install_paired(ctx, &data, &saved, no_reboot, out, err);
                }
            }
        }
    }
    Ok(Outcome::Done)
}

/// Where the pairing QR code is also saved as text (the console's drawing), under the root:
/// `register` reads it as well as the PNG.
pub const PAIRING_TXT: &str = "/run/kairos/pairing-qr.txt";

/// Upstream's install mode asked for on the kernel command line: `install-mode`, or
/// `nodepair.enable` (bare or `=1`/`=true`/`=yes`).
pub fn install_mode_requested(cmdline: &str) -> bool {
    kairos_init::cmdline::words(cmdline).any(|w| match &*w {
        "install-mode" | "nodepair.enable" => true,
        w => w
            .strip_prefix("nodepair.enable=")
            .is_some_and(|v| matches!(v, "1" | "true" | "yes" | "on")),
    })
}

/// The first line of the live console's install screen.
pub const SCREEN_TITLE: &str = "Kairos live system: not installed";
/// The line the pairing screen ends with, once the node listens.
pub const WAITING: &str =
    "kairos-agent: install mode: waiting for `kairos-agent register` from this network";

/// The live console's install screen: how to install by hand, the disks seen, and with `qr`
/// (the pairing token drawn by [`qr::render_text`]) how to send a config by QR code.
pub fn install_screen(disks: &[crate::install::device::Candidate], qr: Option<&str>) -> String {
    let rule = "=".repeat(72);
    let mut s = format!(
        "{rule}\n{SCREEN_TITLE}\n\
         To install by hand (everything on the disk is lost):\n\
         \x20 kairos-agent install --device /dev/XXX [--config FILE]\n\
         \x20 kairos-agent manual-install --device /dev/XXX CONFIG\n\
         Disks:\n"
    );
    if disks.is_empty() {
        s.push_str("  (none found under /sys/block)\n");
    }
    for d in disks {
        s.push_str(&format!("  /dev/{}\n", d.describe()));
    }
    if let Some(qr) = qr {
        s.push_str(&format!(
            "To install with a config sent from another machine on this network, run there:\n\
             \x20 kairos-agent register [--config FILE] [--device /dev/XXX] [--reboot|--poweroff] <token|qr.png|qr.txt>\n\
             with the pairing token of this QR code (scan this code, or save this screen as qr.txt;\n\
             also in {PAIRING_PNG} and {PAIRING_TXT}):\n{qr}\n"
        ));
    }
    s.push_str(&rule);
    s
}

/// Saves the token's QR code (PNG and text, root only) and returns the drawing.
fn show_token(ctx: &Ctx, token: &str) -> Result<String, P2pError> {
    qr::write_png(token, &ctx.path(PAIRING_PNG))?;
    let drawn = qr::render_text(token)?;
    let txt = ctx.path(PAIRING_TXT);
    install::write_private(&txt, format!("{drawn}\n").as_bytes()).at(&txt, "writing")?;
    Ok(drawn)
}

/// Upstream's install mode on a live boot (the daemon's part): the install screen with a
/// fresh token's QR code on the console, then wait for `register` and install with what it
/// sends (as `p2p pair` does), rebooting or powering off as asked. A failed pairing or
/// install is said on the console and starts over with a new token. Runs in its own thread
/// so the daemon goes on; SIGTERM ends it.
pub fn start_live_pairing(ctx: &Ctx) -> std::io::Result<std::thread::JoinHandle<()>> {
    let ctx = ctx.clone();
    std::thread::Builder::new()
        .name("pairing".into())
        .spawn(move || live_pairing(&ctx))
}

fn live_pairing(ctx: &Ctx) {
    use crate::console;
    let mut err = std::io::stderr();
    let mut backoff = Duration::from_secs(5);
    loop {
        let token = Token::generate();
        let disks = install::device::seen_disks(ctx);
        let drawn = match show_token(ctx, &token.encode()) {
            Ok(d) => d,
            Err(e) => {
                console::say(ctx, &mut err, &format!("kairos-agent: install mode: {e}"));
                console::show(ctx, &install_screen(&disks, None));
                return;
            }
        };
        console::show(ctx, &install_screen(&disks, Some(&drawn)));
        console::say(ctx, &mut err, WAITING);
        let outcome = node::run(node::Options {
            root: ctx.root.clone(),
            config: P2pConfig::default(),
            token,
            mode: Mode::AwaitPairing,
            k3s: AgentK3s::new(ctx, cloud_config::Config::default()),
            timeout: None,
        });
        let failed = match outcome {
            Ok(NodeOutcome::Paired(data)) => {
                console::say(
                    ctx,
                    &mut err,
                    &format!(
                        "kairos-agent: install mode: paired; installing (device {})",
                        if data.device.trim().is_empty() {
                            "from the config"
                        } else {
                            data.device.trim()
                        }
                    ),
                );
                let mut out = std::io::stdout();
                let r = save_pairing(ctx, &data, &mut out).and_then(|saved| {
                    install_paired(ctx, &data, &saved, false, &mut out, &mut err)
                });
                match r {
                    // Installed, and neither reboot nor poweroff asked: the live system stays.
                    Ok(_) => {
                        console::say(
                            ctx,
                            &mut err,
                            "kairos-agent: install mode: installed; reboot to use the new system",
                        );
                        return;
                    }
                    Err(e) => e.to_string(),
                }
            }
            Ok(_) => return,
            Err(e) => e.to_string(),
        };
        console::say(
            ctx,
            &mut err,
            &format!(
                "kairos-agent: install mode: {failed}; a new pairing code follows in {} s",
                backoff.as_secs()
            ),
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// What the pairing makes the installer do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairedInstall {
    /// `--device`: the request's, else install.device, else `auto` if either said so.
    pub device: Option<String>,
    /// `--source`: install.source from the merged config.
    pub source: Option<String>,
    pub reboot: bool,
    pub poweroff: bool,
    /// install.allow-removable of the merged config, for `auto`.
    pub allow_removable: bool,
}

/// The request's device unless it is empty or `auto` (register's default), then the merged
/// config's install.device; `auto` only when nothing names a disk. Reboot/poweroff: the
/// request's or install.reboot / install.poweroff.
pub fn paired_install(data: &PairingData, merged: &cloud_config::Config) -> PairedInstall {
    let inst = merged.install.clone().unwrap_or_default();
    let named = |d: &str| !d.trim().is_empty() && d.trim() != "auto";
    let from_config = inst.device.as_deref().unwrap_or("");
    let device = if named(&data.device) {
        Some(data.device.trim().to_owned())
    } else if named(from_config) {
        Some(from_config.trim().to_owned())
    } else if data.device.trim() == "auto" || from_config.trim() == "auto" {
        Some("auto".to_owned())
    } else {
        None
    };
    PairedInstall {
        device,
        source: inst.source.filter(|s| !s.trim().is_empty()),
        reboot: data.reboot || inst.reboot,
        poweroff: data.poweroff || inst.poweroff,
        allow_removable: inst.allow_removable,
    }
}

/// The node's own cloud-config merged with the paired one (the paired one wins), as the
/// text for COS_OEM, and its typed form. With nothing of the node's to merge, the paired
/// text as sent. None when neither has anything.
fn merge_paired(
    ctx: &Ctx,
    cc: &str,
    saved: &Path,
    log: &mut dyn Write,
) -> Result<Option<(String, cloud_config::Config)>, P2pError> {
    let origin = saved.display().to_string();
    let paired = if cc.trim().is_empty() {
        None
    } else {
        Some(
            cloud_config::parse(&origin, cc, true)
                .map_err(|error| P2pError::PairedConfig { error })?
                .ok_or_else(|| P2pError::NoHeader {
                    path: saved.to_path_buf(),
                })?,
        )
    };
    let own = crate::sources::load(
        ctx,
        &LoadOptions {
            fetch: false,
            ..LoadOptions::default()
        },
    );
    for e in &own.errors {
        writeln!(log, "kairos-agent: pairing: warning: {e}; skipped").map_err(P2pError::Output)?;
    }
    if own.raw.is_empty() {
        return Ok(paired.map(|p| (cc.to_owned(), p.config)));
    }
    let sources: Vec<&str> = own
        .sources
        .iter()
        .filter(|s| !s.raw.is_empty())
        .map(|s| s.origin.as_str())
        .collect();
    let mut raw = own.raw;
    // What is installed keeps the node's templates unrendered (it renders them each boot).
    let mut as_written = own.raw_as_written;
    if let Some(p) = paired {
        cloud_config::merge_maps(&mut raw, p.raw.clone());
        cloud_config::merge_maps(&mut as_written, p.raw);
    }
    let merged: cloud_config::Config =
        serde_json::from_value(serde_json::Value::Object(raw.clone())).map_err(|e| {
            P2pError::Merge {
                path: saved.to_path_buf(),
                message: format!("the result is not a valid cloud-config: {e}"),
            }
        })?;
    let text = install::cloud_config_text(&as_written).map_err(|e| P2pError::Merge {
        path: saved.to_path_buf(),
        message: e.to_string(),
    })?;
    writeln!(
        log,
        "kairos-agent: pairing: merged the paired config over this node's ({})",
        sources.join(", ")
    )
    .map_err(P2pError::Output)?;
    Ok(Some((text, merged)))
}

/// Upstream's install-mode after pairing: merge the received config, install with it (it
/// becomes COS_OEM:/90_custom.yaml), then reboot or power off as asked.
fn install_paired(
    ctx: &Ctx,
    data: &PairingData,
    saved: &Path,
    no_reboot: bool,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<Outcome, P2pError> {
    let merged = merge_paired(ctx, &data.cc, saved, log)?;
    let none = cloud_config::Config::default();
    let plan = paired_install(data, merged.as_ref().map_or(&none, |m| &m.1));
    let config = match &merged {
        Some((text, _)) => Some(write_private(
            &ctx.path(PAIRING_DIR),
            "install.yaml",
            text.as_bytes(),
        )?),
        None => None,
    };
    // `auto` with the merged config's install.allow-removable (install() would read only this
    // node's); a person sent the request, so a disk holding Kairos may be taken, as by hand.
    let mut plan = plan;
    if let Some(dev) = plan.device.take() {
        let resolved = install::resolve_device(ctx, PathBuf::from(&dev), plan.allow_removable, log);
        let picked = match resolved {
            Ok(p) => p,
            Err(InstallError::Output(e)) => return Err(P2pError::Output(e)),
            Err(error) => {
                return Err(P2pError::Install {
                    device: dev,
                    error: Box::new(error),
                });
            }
        };
        plan.device = Some(picked.display().to_string());
    }
    let device = plan.device.clone().unwrap_or_else(|| "(none)".into());
    writeln!(
        log,
        "kairos-agent: pairing: installing to {device} from {} with config {}",
        plan.source.as_deref().unwrap_or("the default source"),
        config
            .as_ref()
            .map_or_else(|| "(none)".into(), |c| c.display().to_string())
    )
    .map_err(P2pError::Output)?;
    let opts = install::Options {
        device: plan.device.as_ref().map(PathBuf::from),
        source: plan.source.clone(),
        config: config.clone(),
        ..install::Options::default()
    };
    let finish = install::Finish {
        reboot: plan.reboot,
        poweroff: plan.poweroff,
        hold: no_reboot,
    };
    install::install_then(ctx, &opts, "pairing", finish, out, log).map_err(|error| {
        P2pError::Install {
            device,
            error: Box::new(error),
        }
    })
}

/// Writes `dir/name` for root only (see [`install::write_private`]).
fn write_private(dir: &Path, name: &str, content: &[u8]) -> Result<PathBuf, P2pError> {
    let path = dir.join(name);
    install::write_private(&path, content).at(&path, "writing")?;
    Ok(path)
}

/// Leave the received config and install request under /run/kairos/pairing; returns the
/// config's path.
fn save_pairing(ctx: &Ctx, data: &PairingData, out: &mut dyn Write) -> Result<PathBuf, P2pError> {
    let dir = ctx.path(PAIRING_DIR);
    let cc = write_private(&dir, "config.yaml", data.cc.as_bytes())?;
    let req = serde_json::to_vec_pretty(data).unwrap_or_default();
    write_private(&dir, "request.json", &req)?;
    writeln!(
        out,
        "kairos-p2p: paired: config in {}, install device={} reboot={} poweroff={}",
        cc.display(),
        data.device,
        data.reboot,
        data.poweroff
    )
    .map_err(P2pError::Output)?;
    Ok(cc)
}

/// The token from `register`'s argument: a PNG with the QR code; else a text file with the
/// code drawn in block characters (a saved console or serial log, see
/// [`qr::decode_text`]) or with just the token in it; else the argument itself.
pub fn token_from_arg(arg: &str) -> Result<String, P2pError> {
    const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
    let p = Path::new(arg);
    if !p.is_file() {
        // A token is base64 (`/` included, never `./` or a leading `/`): a path that is not
        // there is a mistyped path, not a token.
        if arg.starts_with('/')
            || arg.starts_with("./")
            || arg.ends_with(".png")
            || arg.ends_with(".txt")
        {
            let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
            return Err(P2pError::ReadArg(IoError::new(p, "reading", missing)));
        }
        return Ok(arg.to_owned());
    }
    let bytes = std::fs::read(p)
        .at(p, "reading")
        .map_err(P2pError::ReadArg)?;
    if bytes.starts_with(PNG_MAGIC) {
        return Ok(qr::decode_png(p)?);
    }
    let text = String::from_utf8_lossy(&bytes);
    match qr::decode_text(&text) {
        Ok(t) => Ok(t),
        // A file holding only the token.
        Err(qr::QrError::NoTextCode) if text.split_whitespace().count() == 1 => {
            Ok(text.trim().to_owned())
        }
        Err(error) => Err(P2pError::QrText {
            path: p.to_path_buf(),
            error,
        }),
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
        Some(p) => std::fs::read_to_string(p).at(p, "reading the config to send")?,
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
        k3s: AgentK3s::new(ctx, cloud_config::Config::default()),
        timeout: Some(Duration::from_secs(args.timeout)),
    })?;
    if let NodeOutcome::Registered { node } = outcome {
        writeln!(out, "kairos-agent: registered with node {node}").map_err(P2pError::Output)?;
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_mode_from_the_command_line() {
        let base = "root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.cos.disable cdroot";
        assert!(!install_mode_requested(base));
        assert!(install_mode_requested(&format!("{base} install-mode")));
        assert!(install_mode_requested(&format!("nodepair.enable {base}")));
        assert!(install_mode_requested("nodepair.enable=true"));
        assert!(!install_mode_requested("nodepair.enable=0 xinstall-mode"));
    }

    #[test]
    fn the_install_screen_says_how_to_install_and_holds_the_code() {
        use crate::install::device::Candidate;
        let disks = [
            Candidate {
                name: "vda".into(),
                size: 8 << 30,
                busy: None,
                removable: None,
                kairos: Vec::new(),
            },
            Candidate {
                name: "sda".into(),
                size: 1 << 30,
                busy: Some(
                    "it holds the live system (/dev/sda is mounted at /run/initramfs/live)".into(),
                ),
                removable: Some("USB-attached"),
                kairos: Vec::new(),
            },
        ];
        let t = Token::generate().encode();
        let drawn = qr::render_text(&t).unwrap();
        let s = install_screen(&disks, Some(&drawn));
        for want in [
            SCREEN_TITLE,
            "  kairos-agent install --device /dev/XXX [--config FILE]\n",
            "  kairos-agent manual-install --device /dev/XXX CONFIG\n",
            "  /dev/vda 8192 MiB\n",
            "  /dev/sda 1024 MiB (it holds the live system (/dev/sda is mounted at /run/initramfs/live); USB-attached)\n",
            "  kairos-agent register [--config FILE] [--device /dev/XXX] [--reboot|--poweroff] <token|qr.png|qr.txt>\n",
            "scan this code",
        ] {
            assert!(s.contains(want), "{want:?} not in\n{s}");
        }
        // The screen as the console shows it is what `register` reads.
        assert_eq!(qr::decode_text(&s).unwrap(), t);
        let plain = install_screen(&disks, None);
        assert!(
            !plain.contains("register") && plain.contains(SCREEN_TITLE),
            "{plain}"
        );
    }

    #[test]
    fn token_argument_or_qr_image() {
        let dir = tempfile::tempdir().unwrap();
        let t = Token::generate().encode();
        let png = dir.path().join("qr.png");
        qr::write_png(&t, &png).unwrap();
        assert_eq!(token_from_arg(png.to_str().unwrap()).unwrap(), t);
        assert_eq!(token_from_arg(&t).unwrap(), t);
        // A serial log with the console QR in it; a file with only the token; a text file
        // with neither.
        let log = dir.path().join("serial.log");
        std::fs::write(
            &log,
            format!(
                "boot...\r\n{}\r\nkairos-agent register ...\r\n",
                qr::render_text(&t).unwrap().replace('\n', "\r\n")
            ),
        )
        .unwrap();
        assert_eq!(token_from_arg(log.to_str().unwrap()).unwrap(), t);
        let plain = dir.path().join("token.txt");
        std::fs::write(&plain, format!("{t}\n")).unwrap();
        assert_eq!(token_from_arg(plain.to_str().unwrap()).unwrap(), t);
        let e = token_from_arg("/nonexistent/qr.txt")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("reading /nonexistent/qr.txt: "), "{e}");
        let junk = dir.path().join("junk.txt");
        std::fs::write(&junk, "no code\nin here\n").unwrap();
        let e = token_from_arg(junk.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{}: neither", junk.display())),
            "{e}"
        );
    }

    fn request(device: &str, reboot: bool) -> PairingData {
        PairingData {
            device: device.into(),
            cc: String::new(),
            reboot,
            poweroff: false,
        }
    }

    fn typed(text: &str) -> cloud_config::Config {
        cloud_config::parse("t", text, true)
            .unwrap()
            .unwrap()
            .config
    }

    #[test]
    fn the_request_device_wins_then_install_device_then_auto() {
        let cfg = typed(
            "#cloud-config\ninstall:\n  device: /dev/sdb\n  source: dir:/x\n  poweroff: true\n",
        );
        let p = paired_install(&request("/dev/vda", true), &cfg);
        assert_eq!(p.device.as_deref(), Some("/dev/vda"));
        assert_eq!(p.source.as_deref(), Some("dir:/x"));
        assert!(p.reboot && p.poweroff);
        // register's default `auto` does not override a device the config names.
        let p = paired_install(&request("auto", false), &cfg);
        assert_eq!(p.device.as_deref(), Some("/dev/sdb"));
        assert!(!p.reboot);
        let none = cloud_config::Config::default();
        let p = paired_install(&request("auto", false), &none);
        assert_eq!(p.device.as_deref(), Some("auto"));
        assert_eq!(p.source, None);
        assert_eq!(paired_install(&request("", false), &none).device, None);
        assert!(!paired_install(&request("auto", false), &none).allow_removable);
        let usb = typed("#cloud-config\ninstall:\n  allow-removable: true\n");
        assert!(paired_install(&request("auto", false), &usb).allow_removable);
    }

    #[test]
    fn paired_config_is_merged_over_the_nodes_own() {
        let t = crate::testutil::Tree::new();
        let saved = t.ctx.path("/run/kairos/pairing/config.yaml");
        let cc = "#cloud-config\nhostname: paired-node\ninstall:\n  device: /dev/vdb\n";
        // Nothing of the node's: the paired text as sent.
        let (text, cfg, log) = {
            let mut log = Vec::new();
            let (text, cfg) = merge_paired(&t.ctx, cc, &saved, &mut log).unwrap().unwrap();
            (text, cfg, String::from_utf8(log).unwrap())
        };
        assert_eq!(text, cc);
        assert_eq!(cfg.install.unwrap().device.as_deref(), Some("/dev/vdb"));
        assert!(log.is_empty(), "{log}");
        // The node's own config: merged, the paired one wins.
        t.file(
            "/oem/10_node.yaml",
            "#cloud-config\nhostname: live\ninstall:\n  device: /dev/vda\n  source: dir:/img\nusers:\n- name: kairos\n",
        );
        let mut log = Vec::new();
        let (text, cfg) = merge_paired(&t.ctx, cc, &saved, &mut log).unwrap().unwrap();
        let log = String::from_utf8(log).unwrap();
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        let again = typed(&text);
        assert_eq!(again, cfg);
        assert_eq!(cfg.hostname.as_deref(), Some("paired-node"));
        let inst = cfg.install.unwrap();
        assert_eq!(inst.device.as_deref(), Some("/dev/vdb"));
        assert_eq!(inst.source.as_deref(), Some("dir:/img"));
        assert_eq!(cfg.users.len(), 1);
        assert!(
            log.contains("merged the paired config over this node's (/oem/10_node.yaml)"),
            "{log}"
        );
        // A config without a header, or broken YAML: an error naming the saved file.
        let e = merge_paired(&t.ctx, "hostname: x\n", &saved, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains(&saved.display().to_string()), "{e}");
        let e = merge_paired(
            &t.ctx,
            "#cloud-config\nhostname: [\n",
            &saved,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains(&saved.display().to_string()), "{e}");
    }

    #[test]
    fn mesh_k3s_merges_the_users_blocks_and_kubevip() {
        let cloud = typed(
            "#cloud-config\nk3s:\n  args: ['--disable traefik']\n  env: {HTTP_PROXY: 'http://p:3128'}\n  config: {write-kubeconfig-mode: '0644'}\nk3s-agent:\n  args: [--node-label=tier=edge]\n  env: {K3S_TOKEN: mine}\nkubevip: {eip: 10.5.0.100, interface: eth0}\n",
        );
        let server = K3sSpec {
            server: true,
            args: vec!["--flannel-iface=edgevpn0".into(), "--cluster-init".into()],
            env: Vec::new(),
        };
        let s = mesh_k3s_spec(&server, &cloud);
        assert_eq!(
            s.argv(),
            [
                "server",
                "--flannel-iface=edgevpn0",
                "--cluster-init",
                "--tls-san=10.5.0.100",
                "--disable",
                "traefik"
            ]
        );
        assert_eq!(s.env["HTTP_PROXY"], "http://p:3128");
        assert_eq!(s.config["write-kubeconfig-mode"], "0644");
        assert_eq!(
            s.kubevip.as_ref().and_then(|k| k.eip.as_deref()),
            Some("10.5.0.100")
        );
        // A worker: k3s-agent's args; its env wins over the mesh's; no kube-vip.
        let worker = K3sSpec {
            server: false,
            args: vec!["--flannel-iface=edgevpn0".into()],
            env: vec![
                ("K3S_URL".into(), "https://10.1.0.2:6443".into()),
                ("K3S_TOKEN".into(), "K10mesh".into()),
            ],
        };
        let w = mesh_k3s_spec(&worker, &cloud);
        assert_eq!(
            w.argv(),
            [
                "agent",
                "--flannel-iface=edgevpn0",
                "--node-label=tier=edge"
            ]
        );
        assert_eq!(w.env["K3S_TOKEN"], "mine");
        assert_eq!(w.env["K3S_URL"], "https://10.1.0.2:6443");
        assert!(w.kubevip.is_none());
        // replace_args: the user's alone (upstream's rule).
        let repl = typed("#cloud-config\nk3s-agent: {args: [--x], replace_args: true}\n");
        assert_eq!(mesh_k3s_spec(&worker, &repl).argv(), ["agent", "--x"]);
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
        let sup = start_k3s(
            &ctx,
            &mesh_k3s_spec(&spec, &cloud_config::Config::default()),
        )
        .unwrap();
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
