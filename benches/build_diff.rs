//! `lucos build --diff` beside a full kernel build, in one run, on this
//! machine: what kpatch-build and klp-build do first (build the whole
//! kernel; kpatch-build then builds it again patched).
//!
//! - cold: nothing prepared (the source package's `.deb` only, as after a
//!   download): fetch-source.sh unpacks and prepares a tree, then the build.
//! - warm: the tree prepared and the object built before (the usual case:
//!   a second fix for the same kernel).
//! - header: a header change (fs/proc/internal.h: 24 objects, each twice).
//! - reference: `make -jN vmlinux` of the same source and config in a fresh
//!   output tree, once.
//!
//! `cargo bench --bench build_diff` (LUCOS_BENCH_RUNS: warm runs, default 3).
//! The full build takes long (tens of minutes on 2 cores).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::bench::{median, runs};
use common::diffs::{source_tree, CMDLINE_FIX, HEADER_FIX};
use common::linux::package_vmlinux;

/// Runs `lucos build --diff` and returns its wall time in seconds.
fn lucos_build(vmlinux: &Path, tree: &Path, diff: &str, dir: &Path, name: &str) -> f64 {
    let p = dir.join(format!("{name}.patch"));
    std::fs::write(&p, diff).expect("diff");
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["build", "--unsigned", "--kernel"])
        .arg(vmlinux)
        .arg("--diff")
        .arg(&p)
        .arg("--source")
        .arg(tree)
        .args(["--name", name, "-o"])
        .arg(dir.join(format!("{name}.lup")))
        .output()
        .expect("lucos build");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "lucos build --diff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().expect(what);
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tree = PathBuf::from(source_tree());
    let dir = std::env::temp_dir().join(format!("lucos-bench-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let vmlinux = dir.join("vmlinux");
    std::fs::write(&vmlinux, package_vmlinux()).expect("vmlinux");
    let cmdline = CMDLINE_FIX(tree.to_str().expect("path"));
    let header = HEADER_FIX(tree.to_str().expect("path"));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    // Cold: a cache holding only the packages (hard links to the cached
    // ones), so fetch-source.sh unpacks and prepares from scratch.
    let assets = repo.join("target/lucos-assets");
    let cold_cache = dir.join("cache");
    std::fs::create_dir_all(&cold_cache).expect("cache");
    for e in std::fs::read_dir(&assets).expect("assets").flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".deb") || n.ends_with(".deb.sha256") || n.starts_with("linux-image-") {
            let to = cold_cache.join(&n);
            if e.path().is_dir() {
                // The unpacked kernel (its config): fetch-kernel.sh's work.
                run(
                    Command::new("cp").arg("-al").arg(e.path()).arg(&to),
                    "cp -al",
                );
            } else {
                std::fs::hard_link(e.path(), &to)
                    .or_else(|_| std::fs::copy(e.path(), &to).map(|_| ()))
                    .expect("link a package");
            }
        }
    }
    let t = Instant::now();
    let out = Command::new(repo.join("guest-kernels/linux/fetch-source.sh"))
        .arg(&cold_cache)
        .output()
        .expect("fetch-source.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prepare = t.elapsed().as_secs_f64();
    let cold_tree = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let cold_build = lucos_build(&vmlinux, &cold_tree, &cmdline, &dir, "cold");
    let cold = prepare + cold_build;
    eprintln!("build_diff: cold {cold:.1} s (fetch-source.sh {prepare:.1} s)");

    // Warm and header, in the tree the suite uses.
    lucos_build(&vmlinux, &tree, &cmdline, &dir, "first");
    let warm: Vec<f64> = (0..runs())
        .map(|i| lucos_build(&vmlinux, &tree, &cmdline, &dir, &format!("warm{i}")))
        .collect();
    let hdr = lucos_build(&vmlinux, &tree, &header, &dir, "header");
    eprintln!("build_diff: warm {warm:.1?} s, header change {hdr:.1} s");

    // The reference: the whole kernel, once, same source and config.
    let full_out = dir.join("full");
    std::fs::create_dir_all(&full_out).expect("dir");
    std::fs::copy(cold_tree.join(".config"), full_out.join(".config")).expect("config");
    let src = std::fs::canonicalize(cold_tree.join("source")).expect("source");
    let kmake = |target: &str| {
        let mut c = Command::new("make");
        c.arg("-s")
            .arg(format!("-j{cores}"))
            .arg("-C")
            .arg(&src)
            .arg(format!("O={}", full_out.display()))
            .args(["CC=gcc-12", "HOSTCC=gcc-12"])
            .arg(target);
        c
    };
    // Debian builds BTF with pahole; without pahole here the reference is
    // built without it (a little less work than Debian's build).
    let pahole = Command::new("pahole").arg("--version").output().is_ok();
    if !pahole {
        run(
            Command::new(src.join("scripts/config"))
                .arg("--file")
                .arg(full_out.join(".config"))
                .args(["--disable", "DEBUG_INFO_BTF"]),
            "scripts/config",
        );
    }
    run(&mut kmake("olddefconfig"), "make olddefconfig");
    eprintln!("build_diff: building the whole kernel once ({cores} cores) for the reference…");
    let t = Instant::now();
    run(&mut kmake("vmlinux"), "make vmlinux");
    let full = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "lucos build --diff vs. building the kernel (Debian 6.1 cloud config, {cores} cores{})",
        if pahole {
            ""
        } else {
            "; reference without BTF: no pahole"
        }
    );
    println!("{:<46} {:>10} {:>12}", "", "seconds", "full/this");
    let row = |what: &str, s: f64| println!("{what:<46} {s:>10.1} {:>11.0}x", full / s);
    row("lucos, one C file, cold (unpack + prepare)", cold);
    println!("{:<46} {:>10.1}", "  of which fetch-source.sh", prepare);
    row("lucos, one C file, warm (median)", median(warm));
    row("lucos, header change (24 objects twice)", hdr);
    println!(
        "{:<46} {:>10.1} {:>12}",
        "make vmlinux (what kpatch-build does twice)", full, "1x"
    );
}
