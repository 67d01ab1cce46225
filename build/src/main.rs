use std::process::ExitCode;

use clap::Parser;
use kairos_build::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r: anyhow::Result<()> = match cli.command {
        Command::Initramfs(a) => kairos_build::initramfs::run(&a),
        Command::Image(_) | Command::Raw(_) => Err(anyhow::anyhow!("not yet")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kairos-build: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
