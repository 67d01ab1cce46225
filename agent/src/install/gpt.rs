pub use kairos_init::gpt::*;
