//! The pieces every kairos crate shares and none owns: the I/O error that names its path
//! ([`io`]), a failed external tool ([`tool`]), UTC timestamps ([`time`]) and a Gantt-style
//! SVG timeline ([`svg`]). No dependencies beyond `thiserror`, so kairos-init links it at no
//! cost.

pub mod envfile;
pub mod io;
pub mod svg;
pub mod time;
pub mod tool;

pub use io::{IoError, IoResultExt};
pub use tool::{ToolError, run_tool};
