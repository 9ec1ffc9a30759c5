//! Build script: compiles the Bacula File Daemon plugin shim (`c-shim/`) against our headers.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=include");
    println!("cargo:rerun-if-changed=c-shim");
}
