//! Builds the bundled test kernel (guest-kernels/testkernel) with gcc and
//! make, so `lucos demo` and the tests always run the kernel built from the
//! sources in this tree. No prebuilt guest binary is committed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from("guest-kernels/testkernel");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("testkernel");
    for entry in std::fs::read_dir(&src).expect("guest-kernels/testkernel exists") {
        let p = entry.expect("readable directory").path();
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-changed={}", src.join("include").display());
    let status = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("O={}", out.display()))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("building the test kernel failed ({s}); see the make output above"),
        Err(e) => panic!("cannot run make to build the test kernel: {e} (install make and gcc: scripts/setup.sh)"),
    }
    let flags = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg("print-patch-cflags")
        .output()
        .expect("make print-patch-cflags");
    let flags = String::from_utf8_lossy(&flags.stdout).trim().to_owned();
    println!("cargo:rustc-env=LUCOS_TESTKERNEL_PATCH_CFLAGS={flags}");
    let elf = out.join("testkernel.elf");
    println!("cargo:rustc-env=LUCOS_TESTKERNEL={}", elf.display());
}
