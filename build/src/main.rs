use std::process::ExitCode;

use clap::Parser;
use kairos_build::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut log = std::io::stderr();
    let r: anyhow::Result<()> = match cli.command {
        Command::Initramfs(a) => kairos_build::initramfs::run(&a),
        Command::Image(a) => kairos_build::image::run(&a, &mut log)
            .map(|r| println!("{}", kairos_build::image::summary(&r)))
            .map_err(Into::into),
        Command::Raw(a) => kairos_build::raw::run(&a, &mut log)
            .map(|r| println!("{}", kairos_build::raw::summary(&r)))
            .map_err(Into::into),
        Command::Iso(a) => kairos_build::iso::run(&a, &mut log)
            .map(|r| println!("{}", kairos_build::iso::summary(&r)))
            .map_err(Into::into),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kairos-build: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
