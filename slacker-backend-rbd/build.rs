//! rbd-sys links librbd; the few librados calls this crate declares itself (cluster
//! connection, pool and namespace context) need librados too (apt librados-dev comes with
//! librbd-dev).
fn main() {
    println!("cargo:rustc-link-lib=rados");
}
