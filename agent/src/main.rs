//! kairos-agent: the command line over the library's commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Parser, Subcommand};
use kairos_agent::{Ctx, DEFAULT_GRUBENV, Outcome, bootentry, daemon, markgood, stages, state};

#[derive(Parser)]
#[command(
    name = "kairos-agent",
    version,
    about = "Kairos userland agent: cloud-config stages, K3s supervision, P2P mesh, boot state, boot entries and boot assessment",
    after_help = "Exit status: 0 done, 1 mark-good refused (a health check failed) or a stage step failed, 2 error."
)]
struct Cli {
    /// Prefix for every path the agent reads or writes (a fake tree for tests)
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// The GRUB environment block (COS_OEM:/grubenv), under --root
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_GRUBENV)]
    grubenv: PathBuf,
    /// Pull from registries at private addresses (10/8, 172.16/12, 192.168/16, fd00::/8,
    /// link-local) over plain HTTP; without it only loopback registries are plain HTTP
    #[arg(long, global = true)]
    allow_insecure_registries: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the boot state as one line of JSON: mode, image, boot reason, counters,
    /// partitions, kairos-init's timeline
    State {
        /// Indented, several lines
        #[arg(long)]
        pretty: bool,
    },
    /// List the GRUB boot entries and counters (default), or change them
    Bootentry(BootentryArgs),
    /// Mark this boot good (reset the booted entry's tries) if the health checks pass:
    /// /run/kairos/boot-stage-ok exists and, when K3s is configured, /readyz says ok
    MarkGood {
        /// Entry that booted (cos, fallback, recovery, statereset) [default: from
        /// rd.kairos.boot_reason, else kairos_boot_entry, checked against /run/cos]
        #[arg(long, value_name = "ENTRY")]
        booted: Option<String>,
        /// Require K3s to be ready even without /etc/rancher/k3s/config.yaml
        #[arg(long)]
        k3s: bool,
        /// How long `k3s kubectl get --raw /readyz` may take
        #[arg(long, value_name = "SECS", default_value_t = markgood::DEFAULT_K3S_TIMEOUT.as_secs())]
        k3s_timeout: u64,
    },
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
    Daemon {
        /// Do not run the stages, reconcile included (systemd units run them)
        #[arg(long)]
        no_stages: bool,
        /// Seconds between runs of the reconcile stage (the first one after that long)
        #[arg(long, value_name = "SECS", default_value_t = 3600,
              value_parser = clap::value_parser!(u64).range(1..))]
        reconcile_interval: u64,
        /// Seconds to keep trying to mark the boot good before giving up
        #[arg(long, value_name = "SECS", default_value_t = 900)]
        health_timeout: u64,
    },
    /// P2P mesh: generate a network token, run a mesh node, pair by QR code
    P2p(kairos_agent::p2p::P2pArgs),
    /// Pair a node in install mode: decode its QR code (PNG) or take its token, and send it
    /// a config to install with
    Register(kairos_agent::p2p::RegisterArgs),
    /// Install to a whole disk: GPT (bios or efi, oem, recovery, state, persistent), ext4, active,
    /// passive and recovery images from the source, BIOS or UEFI GRUB; refuses a disk in use
    /// or too small
    Install(InstallArgs),
    /// Install to a whole disk with a cloud-config, as upstream's manual-install: the
    /// config's install.device, install.source, install.reboot and install.poweroff are the
    /// defaults of the flags; `auto` when nothing names a disk
    #[command(visible_alias = "m")]
    ManualInstall(ManualInstallArgs),
    /// Upgrade the system (or recovery) image: pull and verify the source, build
    /// COS_STATE:/cOS/transition.img, rotate active -> passive, arm the boot counters
    Upgrade(UpgradeArgs),
    /// Reset the node (recovery mode only): rebuild active and passive from the recovery
    /// image, wipe COS_PERSISTENT (unless kept), keep COS_OEM (unless reset), boot active next
    Reset(ResetArgs),
}

#[derive(Args)]
#[command(group(ArgGroup::new("after").args(["reboot", "poweroff", "no_reboot"])))]
struct ResetArgs {
    /// dir:PATH or file:PATH (a squashfs or ext image) instead of COS_RECOVERY's
    /// cOS/recovery.squashfs or cOS/recovery.img (dir:/ is the running recovery root)
    #[arg(long, value_name = "SRC")]
    source: Option<String>,
    /// Keep COS_PERSISTENT's contents [default: reset.reset-persistent, else wipe]
    #[arg(long)]
    keep_persistent: bool,
    /// Wipe COS_OEM's contents too (the grubenv is rewritten) [default: reset.reset-oem, else
    /// keep]
    #[arg(long)]
    reset_oem: bool,
    /// Reboot when done (the default, unless reset.reboot: false or reset.poweroff: true)
    #[arg(long)]
    reboot: bool,
    /// Power off when done
    #[arg(long)]
    poweroff: bool,
    /// Neither reboot nor power off
    #[arg(long)]
    no_reboot: bool,
    /// Where COS_STATE is mounted [default: /run/initramfs/cos-state remounted read-write, or
    /// the partition labelled COS_STATE mounted under /run/kairos]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Where COS_RECOVERY is mounted [default: /run/initramfs/cos-recovery, or the partition
    /// labelled COS_RECOVERY]
    #[arg(long, value_name = "DIR")]
    recovery_dir: Option<PathBuf>,
    /// Where COS_PERSISTENT is mounted [default: the partition labelled COS_PERSISTENT;
    /// reformatted when not mounted]
    #[arg(long, value_name = "DIR")]
    persistent_dir: Option<PathBuf>,
    /// Where COS_OEM is mounted, for --reset-oem [default: /oem under --root]
    #[arg(long, value_name = "DIR")]
    oem_dir: Option<PathBuf>,
    /// The install/upgrade history to append to, under --root [default: COS_PERSISTENT's
    /// .kairos-state]
    #[arg(long, value_name = "PATH")]
    kairos_state: Option<PathBuf>,
    /// What booted, when /run/cos and /proc/cmdline do not say: active, passive, recovery
    #[arg(long, value_name = "IMAGE", value_parser = ["active", "passive", "recovery"])]
    booted: Option<String>,
}

#[derive(Args)]
struct InstallArgs {
    /// The whole disk to install to (everything on it is lost) [default: install.device]
    #[arg(long, value_name = "DEV")]
    device: Option<PathBuf>,
    /// As for upgrade: oci:REF, docker:REF, a bare REF, ocifile:PATH, dir:PATH, file:PATH
    /// [default: install.source, else dir:/, the running system's image]
    #[arg(long, value_name = "SRC")]
    source: Option<String>,
    /// A cloud-config to install as COS_OEM:/90_custom.yaml (mode 0600)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// GRUB's i386-pc directory [default: /usr/lib/grub/i386-pc, else the source's]
    #[arg(long, value_name = "DIR")]
    grub_dir: Option<PathBuf>,
    /// Boot code to install
    #[arg(long, value_enum, default_value_t)]
    firmware: kairos_agent::install::efi::Firmware,
}

#[derive(Args)]
struct ManualInstallArgs {
    /// The whole disk to install to (everything on it is lost), or `auto` [default: CONFIG's
    /// install.device, else this node's, else auto]
    #[arg(long, value_name = "DEV")]
    device: Option<PathBuf>,
    /// As for install [default: CONFIG's install.source, else this node's, else dir:/]
    #[arg(long, value_name = "SRC")]
    source: Option<String>,
    /// Reboot when done (also with install.reboot in CONFIG)
    #[arg(long)]
    reboot: bool,
    /// Power off when done (also with install.poweroff in CONFIG)
    #[arg(long)]
    poweroff: bool,
    /// Boot code to install
    #[arg(long, value_enum, default_value_t)]
    firmware: kairos_agent::install::efi::Firmware,
    /// The cloud-config to install with (COS_OEM:/90_custom.yaml, mode 0600)
    #[arg(value_name = "CONFIG")]
    config: PathBuf,
}

#[derive(Args)]
struct UpgradeArgs {
    /// oci:REF, docker:REF or a bare REF (a registry image), ocifile:PATH (an OCI archive or
    /// layout), dir:PATH, file:PATH (an ext image) [default: upgrade.system.source, or
    /// upgrade.recovery-system.source with --recovery]
    #[arg(long, value_name = "SRC")]
    source: Option<String>,
    /// Rebuild COS_RECOVERY:/cOS/recovery.squashfs (or recovery.img) instead
    #[arg(long)]
    recovery: bool,
    /// Where COS_STATE is mounted [default: /run/initramfs/cos-state remounted read-write, or
    /// the partition labelled COS_STATE mounted under /run/kairos]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Where COS_RECOVERY is mounted, for --recovery [default: found like --state-dir]
    #[arg(long, value_name = "DIR")]
    recovery_dir: Option<PathBuf>,
    /// Where to download and unpack (a .kairos-upgrade directory is made in it) [default:
    /// /usr/local/.kairos when COS_PERSISTENT is mounted there, else the target partition]
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// The install/upgrade history to append to, under --root
    #[arg(long, value_name = "PATH", default_value = kairos_agent::upgrade::DEFAULT_KAIROS_STATE)]
    kairos_state: PathBuf,
    /// What booted, when /run/cos and /proc/cmdline do not say: active, passive, recovery
    #[arg(long, value_name = "IMAGE", value_parser = ["active", "passive", "recovery"])]
    booted: Option<String>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("action").args(["list", "select", "arm", "disarm", "repair"])))]
struct BootentryArgs {
    /// Show the entries, which is default and next, and the counters
    #[arg(long)]
    list: bool,
    /// Boot ID once on the next boot (one-shot next_entry): cos, fallback, recovery,
    /// statereset
    #[arg(long, value_name = "ID")]
    select: Option<String>,
    /// Arm boot assessment: active and passive each get N tries before GRUB falls back
    #[arg(long)]
    arm: bool,
    /// Tries for --arm, 1..9 [default: kairos_max_tries, else 3]
    #[arg(long, value_name = "N", requires = "arm",
          value_parser = clap::value_parser!(u8).range(1..=9))]
    tries: Option<u8>,
    /// Stop counting: GRUB boots next_entry / saved_entry again
    #[arg(long)]
    disarm: bool,
    /// Rewrite a missing or corrupt grubenv as a valid empty block
    #[arg(long)]
    repair: bool,
}

impl BootentryArgs {
    fn action(self) -> bootentry::Action {
        if let Some(id) = self.select {
            bootentry::Action::Select(id)
        } else if self.arm {
            bootentry::Action::Arm(self.tries)
        } else if self.disarm {
            bootentry::Action::Disarm
        } else if self.repair {
            bootentry::Action::Repair
        } else {
            bootentry::Action::List
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    kairos_agent::upgrade::fetch::allow_insecure_registries(cli.allow_insecure_registries);
    let ctx = Ctx::new(cli.root, cli.grubenv);
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    Ok(match cli.command {
        Cmd::State { pretty } => state::state(&ctx, pretty, &mut out, &mut err).context("state")?,
        Cmd::Bootentry(args) => {
            bootentry::bootentry(&ctx, &args.action(), &mut out, &mut err).context("bootentry")?
        }
        Cmd::MarkGood {
            booted,
            k3s,
            k3s_timeout,
        } => {
            let opts = markgood::Options {
                booted,
                k3s,
                k3s_timeout: Duration::from_secs(k3s_timeout),
            };
            markgood::mark_good(&ctx, &opts, &mut out, &mut err).context("mark-good")?
        }
        Cmd::RunStage { stage } => {
            // Commands' output and the log share stderr; no lock held across them.
            drop((out, err));
            let mut log = std::io::stderr();
            stages::run_stage(&ctx, &stage, &mut log)
                .with_context(|| format!("run-stage {stage}"))?
                .0
        }
        Cmd::Daemon {
            no_stages,
            reconcile_interval,
            health_timeout,
        } => {
            // K3s' supervisor logs from its own threads: release the locks.
            drop((out, err));
            let opts = daemon::DaemonOptions {
                run_stages: !no_stages,
                reconcile_every: Duration::from_secs(reconcile_interval),
                health_timeout: Duration::from_secs(health_timeout),
                ..daemon::DaemonOptions::default()
            };
            daemon::daemon(&ctx, &opts, &mut std::io::stderr()).context("daemon")?
        }
        // The mesh logs from its runtime's threads: release the stdout/stderr locks first.
        Cmd::P2p(args) => {
            drop((out, err));
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            kairos_agent::p2p::p2p(&ctx, args, &mut out, &mut err).context("p2p")?
        }
        Cmd::Register(args) => {
            drop((out, err));
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            kairos_agent::p2p::register(&ctx, args, &mut out, &mut err).context("register")?
        }
        Cmd::Install(a) => {
            // Stage commands write to stderr too: no lock held across them.
            drop((out, err));
            let opts = kairos_agent::install::Options {
                device: a.device,
                source: a.source,
                config: a.config,
                grub_dir: a.grub_dir,
                firmware: a.firmware,
            };
            kairos_agent::install::install(
                &ctx,
                &opts,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            )
            .context("install")?
        }
        Cmd::ManualInstall(a) => {
            drop((out, err));
            let opts = kairos_agent::install::ManualOptions {
                config: a.config,
                device: a.device,
                source: a.source,
                reboot: a.reboot,
                poweroff: a.poweroff,
                firmware: a.firmware,
            };
            kairos_agent::install::manual_install(
                &ctx,
                &opts,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            )
            .context("manual-install")?
        }
        Cmd::Upgrade(a) => {
            use kairos_agent::upgrade::{self, rotate::Booted};
            // Stage commands write to stderr too: no lock held across them.
            drop((out, err));
            let opts = upgrade::Options {
                source: a.source,
                recovery: a.recovery,
                state_dir: a.state_dir,
                recovery_dir: a.recovery_dir,
                work_dir: a.work_dir,
                kairos_state: a.kairos_state,
                booted: a.booted.as_deref().map(|b| match b {
                    "passive" => Booted::Passive,
                    "recovery" => Booted::Recovery,
                    _ => Booted::Active,
                }),
                crash_at: std::env::var(upgrade::CRASH_ENV)
                    .ok()
                    .filter(|s| !s.is_empty()),
            };
            upgrade::upgrade(&ctx, &opts, &mut std::io::stdout(), &mut std::io::stderr())
                .context("upgrade")?
        }
        Cmd::Reset(a) => {
            use kairos_agent::reset::{self, After};
            use kairos_agent::upgrade::rotate::Booted;
            drop((out, err));
            let opts = reset::Options {
                source: a.source,
                state_dir: a.state_dir,
                recovery_dir: a.recovery_dir,
                persistent_dir: a.persistent_dir,
                oem_dir: a.oem_dir,
                keep_persistent: a.keep_persistent.then_some(true),
                reset_oem: a.reset_oem.then_some(true),
                kairos_state: a.kairos_state,
                booted: a.booted.as_deref().map(|b| match b {
                    "passive" => Booted::Passive,
                    "recovery" => Booted::Recovery,
                    _ => Booted::Active,
                }),
                after: if a.no_reboot {
                    Some(After::Nothing)
                } else if a.poweroff {
                    Some(After::PowerOff)
                } else if a.reboot {
                    Some(After::Reboot)
                } else {
                    None
                },
                crash_at: std::env::var(kairos_agent::upgrade::CRASH_ENV)
                    .ok()
                    .filter(|s| !s.is_empty()),
            };
            reset::reset(&ctx, &opts, &mut std::io::stdout(), &mut std::io::stderr())
                .context("reset")?
        }
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Refused) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kairos-agent: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
