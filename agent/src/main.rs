//! kairos-agent: the command line over the library's commands. Each command's flags are
//! derived on its own options struct; this file only names the subcommands and dispatches.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kairos_agent::{Outcome, bootentry, cli, daemon, install, markgood, p2p, stages, state};
use kairos_agent::{analyze, configcmd, logs, reset, upgrade, version};

#[derive(Parser)]
#[command(
    name = "kairos-agent",
    version,
    about = "Kairos userland agent: cloud-config stages, K3s supervision, P2P mesh, boot state, boot entries and boot assessment",
    after_help = "Exit status: 0 done, 1 mark-good refused (a health check failed) or a stage step failed, 2 error."
)]
struct Cli {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the boot state as one line of JSON: mode, image, boot reason, counters,
    /// partitions, kairos-init's timeline; `state get KEY` prints one value
    State(state::StateArgs),
    /// Print the merged cloud-config as YAML (`config show`, the default) or one value of it
    /// (`config get KEY`, exit 1 when absent)
    Config(configcmd::ConfigArgs),
    /// Print the version; --long adds the git commit, build date and Rust compiler
    Version(version::VersionArgs),
    /// Print this boot's logs of kairos-init and the agent in one place, one section per
    /// source, and say which sources were not found
    Logs(logs::LogsArgs),
    /// Where this boot's time went, as systemd-analyze: `time` (firmware+loader, kernel,
    /// initramfs, userland to ready), `blame` (steps by duration), `plot` (an SVG timeline)
    Analyze(analyze::AnalyzeArgs),
    /// Check a cloud-config file as the agent would read it: errors (no header, a template
    /// that does not render, YAML or type errors with line and column) exit 1; unknown and
    /// not-supported keys are warnings (exit 0)
    Validate {
        /// The file
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
    },
    /// List the GRUB boot entries and counters (default), or change them
    Bootentry(bootentry::Args),
    /// Mark this boot good (reset the booted entry's tries) if the health checks pass:
    /// /run/kairos/boot-stage-ok exists and, when K3s is configured, /readyz says ok
    MarkGood(markgood::Options),
    /// Run one cloud-config stage (NAME.before, NAME, NAME.after): rootfs, initramfs, fs,
    /// boot, network, reconcile, before-install, after-upgrade-chroot, ... Exit 1 when a step
    /// failed (every step still ran)
    RunStage {
        /// The stage
        #[arg(value_name = "NAME")]
        stage: String,
    },
    /// The userland service: run the fs, boot and network stages, supervise K3s, mark the
    /// boot good once healthy, reconcile periodically; SIGTERM/SIGINT stop it (exit 0)
    Daemon(daemon::DaemonOptions),
    /// P2P mesh: generate a network token, run a mesh node, pair by QR code
    P2p(p2p::P2pArgs),
    /// Pair a node in install mode: decode its QR code (PNG) or take its token, and send it
    /// a config to install with
    Register(p2p::RegisterArgs),
    /// Install to a whole disk: GPT (bios or efi, oem, recovery, state, persistent), ext4, active,
    /// passive and recovery images from the source, BIOS or UEFI GRUB; refuses a disk in use
    /// or too small
    Install(install::Options),
    /// Install to a whole disk with a cloud-config, as upstream's manual-install: the
    /// config's install.device, install.source, install.reboot and install.poweroff are the
    /// defaults of the flags; `auto` when nothing names a disk
    #[command(visible_alias = "m")]
    ManualInstall(install::ManualOptions),
    /// Upgrade the system (or recovery) image: pull and verify the source, build
    /// COS_STATE:/cOS/transition.img, rotate active -> passive, arm the boot counters;
    /// `upgrade list-releases` lists the image repository's tags, newest first
    Upgrade(upgrade::releases::UpgradeArgs),
    /// Install a bundle now (upstream's install-bundle): run://REF runs the image's run.sh,
    /// container://REF and package://REF put its files in the persistent paths
    InstallBundle(kairos_agent::bundles::InstallOptions),
    /// Reset the node (recovery mode only): rebuild active and passive from the recovery
    /// image, wipe COS_PERSISTENT (unless kept), keep COS_OEM (unless reset), boot active next
    Reset(cli::ResetArgs),
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let ctx = cli.global.ctx();
    // Unlocked streams: stages, K3s' supervisor and the mesh log from their own threads.
    let (out, err) = (&mut std::io::stdout(), &mut std::io::stderr());
    Ok(match cli.command {
        Cmd::State(a) => state::state_cmd(&ctx, &a, out, err).context("state")?,
        Cmd::Config(a) => configcmd::config(&ctx, &a, out, err).context("config")?,
        Cmd::Version(a) => version::version(&a, out).context("version")?,
        Cmd::Logs(a) => logs::logs(&ctx, &a, out, err).context("logs")?,
        Cmd::Analyze(a) => analyze::analyze(&ctx, &a, out).context("analyze")?,
        Cmd::Validate { file } => kairos_agent::config::validate::validate(&ctx, &file, out)
            .with_context(|| format!("validate {}", file.display()))?,
        Cmd::Bootentry(a) => {
            bootentry::bootentry(&ctx, &a.action(), out, err).context("bootentry")?
        }
        Cmd::MarkGood(o) => markgood::mark_good(&ctx, &o, out, err).context("mark-good")?,
        Cmd::RunStage { stage } => {
            stages::run_stage(&ctx, &stage, err)
                .with_context(|| format!("run-stage {stage}"))?
                .0
        }
        Cmd::Daemon(o) => {
            // Under an init without a journal, also into /run/kairos for `logs`; put back
            // (and the copy finished) when the daemon returns.
            let _capture = logs::capture_daemon_output(&ctx);
            daemon::daemon(&ctx, &o, err).context("daemon")?
        }
        Cmd::P2p(a) => p2p::p2p(&ctx, a, out, err).context("p2p")?,
        Cmd::Register(a) => p2p::register(&ctx, a, out, err).context("register")?,
        Cmd::Install(o) => install::install(&ctx, &o, out, err).context("install")?,
        Cmd::ManualInstall(o) => {
            install::manual_install(&ctx, &o, out, err).context("manual-install")?
        }
        Cmd::Upgrade(a) => upgrade::releases::upgrade_cmd(&ctx, &a, out, err).context("upgrade")?,
        Cmd::InstallBundle(o) => {
            kairos_agent::bundles::install_bundle(&ctx, &o, out, err).context("install-bundle")?
        }
        Cmd::Reset(a) => reset::reset(&ctx, &a.options(), out, err).context("reset")?,
    })
}

fn main() -> ExitCode {
    cli::exit_code(run(Cli::parse()))
}
