//! Install and upgrade building blocks (issue 6, in progress): the source references and the
//! power-cut-safe A/B rotation. The OCI pull, image build and the commands come next.

pub mod rotate;
pub mod source;
