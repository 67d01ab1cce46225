//! Code that touches the running system. Kept apart from the pure model so the model is
//! testable anywhere; these helpers take paths so privileged tests can point them at temp dirs.

pub mod blk;
pub mod confine;
pub mod disk;
pub mod fsutil;
pub mod journal;
pub mod log;
pub mod loopdev;
pub mod mount;
pub mod signal;
pub mod tsc;
