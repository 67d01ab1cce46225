//! The Kairos boot model: parsers and planning are pure and unit-tested; the modules that touch
//! the system (`sys`, `exec`) take root paths so they can be driven against temp dirs.

pub mod blockdev;
pub mod boot;
pub mod cmdline;
pub mod gpt;
pub mod grow;
pub mod grubbios;
pub mod grubcfg;
pub mod grubenv;
pub mod labels;
pub mod layout;
pub mod modules;
pub mod mountinfo;
pub mod pid1;
pub mod plan;
pub mod probe;
pub mod stages;
pub mod syntax;
pub mod sys;
