//! `kairos-build`: the host-side artifact builder. It reuses the project's code: the
//! initramfs writer (`kairos-initramfs`), the agent's sources, layers and installer phases
//! (`kairos_agent::install`), the boot model of `kairos-init`.

pub mod cli;
pub mod initramfs;
