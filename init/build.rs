// The init ships alone in the initramfs: strip its symbols at link time. (Cargo's profile
// `strip` setting reaches rustc only as strip=debuginfo for this static target.)
fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--strip-all");
}
