//! Placeholder: the agent issue replaces this with cloud-config, stages, K3s and upgrades.
//! Today it only proves the hand-off: kairos-init can exec it as the fallback program.
fn main() {
    println!(
        "kairos-agent {}: placeholder, nothing to do yet",
        env!("CARGO_PKG_VERSION")
    );
}
