//! What `kairos-agent`'s command line needs beyond the option structs the commands derive
//! their flags on: reset's flags (three of them make one choice), the global options, and
//! how an outcome becomes the exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Args};

use crate::reset::{self, After};
use crate::upgrade::{self, rotate::Booted};
use crate::{Ctx, DEFAULT_GRUBENV, Outcome};

/// The options every subcommand takes.
#[derive(Debug, Args)]
pub struct Global {
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
}

impl Global {
    /// The context the command runs in; sets the process-wide registry rule on the way.
    pub fn ctx(self) -> Ctx {
        upgrade::fetch::allow_insecure_registries(self.allow_insecure_registries);
        Ctx::new(self.root, self.grubenv)
    }
}

/// `kairos-agent reset`'s flags.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("after").args(["reboot", "poweroff", "no_reboot"])))]
pub struct ResetArgs {
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
    #[arg(long, value_name = "IMAGE", value_enum)]
    booted: Option<Booted>,
}

impl ResetArgs {
    /// The reset's options: an absent flag leaves the choice to the `reset:` block.
    pub fn options(self) -> reset::Options {
        reset::Options {
            source: self.source,
            state_dir: self.state_dir,
            recovery_dir: self.recovery_dir,
            persistent_dir: self.persistent_dir,
            oem_dir: self.oem_dir,
            keep_persistent: self.keep_persistent.then_some(true),
            reset_oem: self.reset_oem.then_some(true),
            kairos_state: self.kairos_state,
            booted: self.booted,
            after: if self.no_reboot {
                Some(After::Nothing)
            } else if self.poweroff {
                Some(After::PowerOff)
            } else if self.reboot {
                Some(After::Reboot)
            } else {
                None
            },
            crash_at: std::env::var(upgrade::CRASH_ENV)
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }
}

/// The exit status: 0 done, 1 refused (a check said no, a step failed), 2 an error, said
/// on stderr with its causes.
pub fn exit_code(result: anyhow::Result<Outcome>) -> ExitCode {
    match result {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Refused) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kairos-agent: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
