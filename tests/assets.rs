//! The Linux-guest assets survive Debian's archive moving on: the fetchers
//! take the first known build (guest-kernels/linux/versions.env) whose every
//! package is still to be had, fall back to the next one when it is not, and
//! fail naming what is missing when none is, leaving the cache empty.
//!
//! These ask the real archive (apt's signed indices), as the suite's set-up
//! does; builds are made unavailable with the `LUCOS_SKIP_BUILDS` test hook.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guest-kernels/linux")
        .join(name)
}

/// An empty asset cache of this test's own.
fn empty_cache(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lucos-assets-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("cache dir");
    d
}

fn run(name: &str, args: &[&str], cache: &Path, skip: Option<&str>) -> Output {
    let mut c = Command::new(script(name));
    c.args(args).arg(cache).env_remove("LUCOS_SKIP_BUILDS");
    if let Some(s) = skip {
        c.env("LUCOS_SKIP_BUILDS", s);
    }
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `KEY=value` of lucos-build.env lines.
fn value(env: &str, key: &str) -> String {
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in:\n{env}"))
        .to_owned()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("cache dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// The ABIs versions.env lists, in order.
fn known_abis() -> Vec<String> {
    let env = std::fs::read_to_string(script("versions.env")).expect("versions.env");
    let mut abis: Vec<String> = Vec::new();
    for l in env.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.len() == 6 && w[0].starts_with("6.") && !abis.iter().any(|a| a == w[0]) {
            abis.push(w[0].to_owned());
        }
    }
    abis
}

#[test]
fn the_first_known_build_still_served_is_used_and_the_next_one_when_it_is_gone() {
    let cache = empty_cache("fallback");
    let first = run("fetch-kernel.sh", &["--which"], &cache, None);
    assert!(first.status.success(), "{}", text(&first));
    let first_env = String::from_utf8_lossy(&first.stdout).into_owned();
    let a = value(&first_env, "KERNEL_ABI");
    assert!(known_abis().contains(&a), "{a} is not a known build");
    assert!(
        text(&first).contains(&format!("using Debian kernel build {a}-cloud-amd64")),
        "the choice is said: {}",
        text(&first)
    );
    assert!(entries(&cache).is_empty(), "--which fetches nothing");

    // The chosen build gone from the archive: the next one still served is
    // fetched for real, and said to be.
    let o = run("fetch-kernel.sh", &[], &cache, Some(&a));
    assert!(
        o.status.success(),
        "with {a} gone, no other known build is to be had: record one that the archive \
         serves (guest-kernels/linux/record-build.sh):\n{}",
        text(&o)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let env = std::fs::read_to_string(dir.join("lucos-build.env")).expect("lucos-build.env");
    let b = value(&env, "KERNEL_ABI");
    assert_ne!(a, b, "{}", text(&o));
    let release = value(&env, "KERNEL_RELEASE");
    assert_eq!(release, format!("{b}-cloud-amd64"));
    assert!(dir.join(format!("boot/vmlinuz-{release}")).is_file());
    assert!(dir.join(".complete").is_file());
    let said = text(&o);
    assert!(
        said.contains("passed over") && said.contains(&format!("{a}: skipped")),
        "{said}"
    );
    assert!(
        said.contains(&format!("using Debian kernel build {release}")),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn with_no_known_build_to_be_had_the_fetch_fails_naming_what_is_missing_and_writes_nothing() {
    let cache = empty_cache("none");
    for name in ["fetch-kernel.sh", "fetch-headers.sh"] {
        let o = run(name, &[], &cache, Some("all"));
        assert!(!o.status.success(), "{name}: {}", text(&o));
        let t = text(&o);
        for needle in [
            "no known Debian kernel build can be fetched completely",
            "skipped (LUCOS_SKIP_BUILDS test hook)",
            "The archive offers now:",
            "record-build.sh",
        ] {
            assert!(t.contains(needle), "{name}: '{needle}' missing:\n{t}");
        }
        for abi in known_abis() {
            assert!(t.contains(&abi), "{name}: {abi} not named:\n{t}");
        }
        assert!(
            entries(&cache).is_empty(),
            "{name} left {:?} in the cache",
            entries(&cache)
        );
    }
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn record_build_prints_the_pinned_lines_of_a_build_the_archive_serves() {
    let cache = empty_cache("record");
    let first = run("fetch-kernel.sh", &["--which"], &cache, None);
    assert!(first.status.success(), "{}", text(&first));
    let abi = value(&String::from_utf8_lossy(&first.stdout), "KERNEL_ABI");
    let o = Command::new(script("record-build.sh"))
        .arg(&abi)
        .output()
        .expect("record-build.sh");
    assert!(o.status.success(), "{}", text(&o));
    let recorded: Vec<Vec<String>> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let env = std::fs::read_to_string(script("versions.env")).expect("versions.env");
    let pinned: Vec<Vec<String>> = env
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|w| w.len() == 6 && w[0] == abi)
        .collect();
    assert_eq!(
        recorded, pinned,
        "record-build.sh {abi} against versions.env"
    );
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn the_demo_set_up_fetches_no_linux_assets_and_installs_no_qemu() {
    let cache = empty_cache("demo");
    // A machine with nothing installed (dpkg-query knows no package), and an
    // apt-get that only records what it is asked: the demo's set-up must ask
    // for gcc, make and binutils, without recommends, and nothing else.
    let bin = cache.with_extension("bin");
    std::fs::create_dir_all(&bin).expect("dir");
    let log = cache.with_extension("apt.log");
    for (tool, rc) in [("apt-get", 0), ("dpkg-query", 1)] {
        let f = bin.join(tool);
        std::fs::write(
            &f,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> {}\nexit {rc}\n",
                log.display()
            ),
        )
        .expect("write");
        let mut perm = std::fs::metadata(&f).expect("meta").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&f, perm).expect("chmod");
    }
    let sudo = bin.join("sudo");
    std::fs::write(&sudo, "#!/bin/sh\nexec \"$@\"\n").expect("write");
    let mut perm = std::fs::metadata(&sudo).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&sudo, perm).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup.sh"))
        .arg("demo")
        .env("PATH", path)
        .env("LUCOS_ASSETS", &cache)
        .output()
        .expect("setup.sh demo");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        entries(&cache).is_empty(),
        "the demo's set-up fetched {:?}",
        entries(&cache)
    );
    let asked = std::fs::read_to_string(&log).unwrap_or_default();
    let installs: Vec<&str> = asked
        .lines()
        .filter(|l| l.starts_with("apt-get") && l.contains(" install "))
        .collect();
    assert_eq!(installs.len(), 1, "{asked}");
    assert!(installs[0].contains("--no-install-recommends"), "{asked}");
    let mut pkgs: Vec<&str> = installs[0]
        .split_whitespace()
        .skip_while(|w| *w != "install")
        .skip(1)
        .filter(|w| !w.starts_with('-'))
        .collect();
    pkgs.sort_unstable();
    assert_eq!(pkgs, ["binutils", "gcc", "make"], "{asked}");
    assert!(!text(&o).contains("qemu"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&bin);
    let _ = std::fs::remove_file(&log);
}
