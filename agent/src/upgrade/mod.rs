//! Install and upgrade building blocks (issue 6, in progress): the source references and the
//! power-cut-safe A/B rotation, OCI layers applied with whiteouts. The registry pull, the image
//! build and the commands come next.

pub mod layer;
pub mod rotate;
pub mod source;
