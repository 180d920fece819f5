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

/// What a cache holds after 9.9.0-1's kernel was fetched: the checked
/// .deb, its check, the unpacked tree.
const WHOLE_9_9_0_1: [&str; 3] = [
    "linux-image-9.9.0-1-cloud-amd64-9.9.1-1",
    "linux-image-9.9.0-1-cloud-amd64-unsigned_9.9.1-1_amd64.deb",
    "linux-image-9.9.0-1-cloud-amd64-unsigned_9.9.1-1_amd64.deb.sha256",
];

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

/// A stub archive: packages made here, served by an `apt-get` (and an
/// `apt-cache` that knows nothing) put first on PATH, and a versions.env of
/// three known builds: 9.9.0-3 (its kbuild not served), 9.9.0-2 and
/// 9.9.0-1 (complete; no source package served for any, which no fetcher
/// needs yet). `index` claims each package's sha256 as made; a package
/// corrupted afterwards is served with the wrong bytes.
struct StubArchive {
    dir: PathBuf,
    repo: PathBuf,
    bin: PathBuf,
    versions: PathBuf,
}

impl StubArchive {
    fn new(tag: &str) -> Self {
        let dir = empty_cache(&format!("stub-{tag}"));
        let (repo, bin) = (dir.join("repo"), dir.join("bin"));
        std::fs::create_dir_all(&repo).expect("repo");
        std::fs::create_dir_all(&bin).expect("bin");
        let mut lines = String::new();
        for (abi, ver, kbuild_served) in [
            ("9.9.0-3", "9.9.3-1", false),
            ("9.9.0-2", "9.9.2-1", true),
            ("9.9.0-1", "9.9.1-1", true),
        ] {
            let pkgs = [
                (
                    "image",
                    format!("linux-image-{abi}-cloud-amd64-unsigned"),
                    "amd64",
                    true,
                ),
                (
                    "headers",
                    format!("linux-headers-{abi}-cloud-amd64"),
                    "amd64",
                    true,
                ),
                (
                    "headers",
                    format!("linux-headers-{abi}-common"),
                    "all",
                    true,
                ),
                (
                    "headers",
                    "linux-kbuild-9.9".to_owned(),
                    "amd64",
                    kbuild_served,
                ),
                ("source", "linux-source-9.9".to_owned(), "all", false),
            ];
            for (role, pkg, arch, served) in pkgs {
                let deb = Self::make_deb(&dir, abi, ver, role, &pkg, arch);
                let sum = sha256(&deb);
                lines.push_str(&format!("{abi} {ver} {role} {pkg} {arch} {sum}\n"));
                if served {
                    let name = format!("{pkg}_{ver}_{arch}.deb");
                    std::fs::copy(&deb, repo.join(&name)).expect("copy");
                    let size = std::fs::metadata(&deb).expect("meta").len();
                    let mut index = std::fs::read_to_string(repo.join("index")).unwrap_or_default();
                    index.push_str(&format!(
                        "{pkg}={ver} 'file:{name}' {name} {size} SHA256:{sum}\n"
                    ));
                    std::fs::write(repo.join("index"), index).expect("index");
                }
            }
        }
        let versions = dir.join("versions.env");
        std::fs::write(
            &versions,
            format!("KERNEL_FLAVOUR=cloud-amd64\nKNOWN_BUILDS='\n{lines}'\n"),
        )
        .expect("versions");
        let apt_get = format!(
            r#"#!/bin/bash
repo={repo}
case "$1" in
  update) exit 0 ;;
  download)
    shift
    if [ "$1" = --print-uris ]; then
      shift; rc=0
      for pv in "$@"; do
        l=$(grep "^$pv " $repo/index) && echo "${{l#* }}" || {{ echo "E: $pv not found" >&2; rc=100; }}
      done
      exit $rc
    fi
    [ "$1" = -q ] && shift
    l=$(grep "^$1 " $repo/index) || exit 100
    name=$(echo "$l" | cut -d' ' -f3)
    cp "$repo/$name" . ;;
esac
"#,
            repo = repo.display()
        );
        for (tool, text) in [
            ("apt-get", apt_get.as_str()),
            ("apt-cache", "#!/bin/sh\nexit 100\n"),
        ] {
            let f = bin.join(tool);
            std::fs::write(&f, text).expect("write");
            let mut perm = std::fs::metadata(&f).expect("meta").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
            std::fs::set_permissions(&f, perm).expect("chmod");
        }
        StubArchive {
            dir,
            repo,
            bin,
            versions,
        }
    }

    /// A tiny .deb; an image holds boot/vmlinuz-ABI-cloud-amd64.
    fn make_deb(dir: &Path, abi: &str, ver: &str, role: &str, pkg: &str, arch: &str) -> PathBuf {
        let root = dir.join(format!("build-{pkg}-{ver}"));
        std::fs::create_dir_all(root.join("DEBIAN")).expect("dir");
        std::fs::write(
            root.join("DEBIAN/control"),
            format!(
                "Package: {pkg}\nVersion: {ver}\nArchitecture: {arch}\nMaintainer: lucos tests <t@localhost>\nDescription: stub\n"
            ),
        )
        .expect("control");
        let file = match role {
            "image" => format!("boot/vmlinuz-{abi}-cloud-amd64"),
            _ => format!("usr/share/doc/{pkg}/stub"),
        };
        std::fs::create_dir_all(root.join(&file).parent().expect("parent")).expect("dir");
        std::fs::write(root.join(&file), format!("{pkg} {ver}\n")).expect("payload");
        let deb = dir.join(format!("{pkg}_{ver}_{arch}.deb"));
        let o = Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(&root)
            .arg(&deb)
            .output()
            .expect("dpkg-deb");
        assert!(o.status.success(), "dpkg-deb: {}", text(&o));
        deb
    }

    fn run(&self, script: &str, args: &[&str], cache: &Path, skip: Option<&str>) -> Output {
        let mut c = Command::new(self::script(script));
        c.args(args)
            .arg(cache)
            .env("LUCOS_VERSIONS_ENV", &self.versions)
            .env("TMPDIR", &self.dir)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env_remove("LUCOS_SKIP_BUILDS")
            // The stub serves no source package: the kernel and headers
            // decide here.
            .env("LUCOS_NEEDED_ROLES", "image headers");
        if let Some(s) = skip {
            c.env("LUCOS_SKIP_BUILDS", s);
        }
        c.output().expect("run the fetcher")
    }
}

impl Drop for StubArchive {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sha256(path: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&o.stdout)[..64].to_owned()
}

#[test]
fn the_first_known_build_to_be_had_is_used_and_the_next_one_when_it_is_gone() {
    let a = StubArchive::new("fallback");
    let cache = a.dir.join("cache");
    // 9.9.0-3 lacks its kbuild: passed over, loudly; 9.9.0-2 is chosen even
    // though no source package is served (no fetcher needs one yet).
    let o = a.run("fetch-kernel.sh", &["--which"], &cache, None);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        value(&String::from_utf8_lossy(&o.stdout), "KERNEL_ABI"),
        "9.9.0-2",
        "{}",
        text(&o)
    );
    let said = text(&o);
    assert!(
        said.contains("9.9.0-3 (9.9.3-1): not to be had: linux-kbuild-9.9=9.9.3-1"),
        "{said}"
    );
    assert!(entries(&cache).is_empty(), "--which fetches nothing");
    // 9.9.0-2 gone too: 9.9.0-1 is fetched, checked and unpacked.
    let o = a.run("fetch-kernel.sh", &[], &cache, Some("9.9.0-2"));
    assert!(o.status.success(), "{}", text(&o));
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let env = std::fs::read_to_string(dir.join("lucos-build.env")).expect("lucos-build.env");
    assert_eq!(value(&env, "KERNEL_ABI"), "9.9.0-1");
    assert_eq!(value(&env, "KERNEL_VERSION"), "9.9.1-1");
    assert_eq!(value(&env, "KERNEL_RELEASE"), "9.9.0-1-cloud-amd64");
    assert!(dir.join("boot/vmlinuz-9.9.0-1-cloud-amd64").is_file());
    assert!(dir.join(".complete").is_file());
    let said = text(&o);
    assert!(
        said.contains("9.9.0-2: skipped (LUCOS_SKIP_BUILDS test hook)"),
        "{said}"
    );
    assert!(
        said.contains("using Debian kernel build 9.9.0-1-cloud-amd64 (9.9.1-1)"),
        "{said}"
    );
    // Only whole things in the cache: the checked .deb, its check, the tree.
    let mut got = entries(&cache);
    got.sort();
    assert_eq!(got, WHOLE_9_9_0_1);
}

#[test]
fn a_package_served_with_other_bytes_than_pinned_is_refused_and_nothing_is_left() {
    let a = StubArchive::new("corrupt");
    let cache = a.dir.join("cache");
    // The archive's index says the pinned sha256, the file it sends differs.
    let deb = a
        .repo
        .join("linux-image-9.9.0-2-cloud-amd64-unsigned_9.9.2-1_amd64.deb");
    let mut bytes = std::fs::read(&deb).expect("deb");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&deb, bytes).expect("corrupt");
    let o = a.run("fetch-kernel.sh", &[], &cache, None);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("sha256 mismatch for linux-image-9.9.0-2"),
        "{}",
        text(&o)
    );
    assert!(entries(&cache).is_empty(), "left {:?}", entries(&cache));
}

#[test]
fn with_no_known_build_to_be_had_the_fetch_fails_naming_what_is_missing_and_writes_nothing() {
    let cache = empty_cache("none");
    for name in ["fetch-kernel.sh", "fetch-headers.sh", "fetch-source.sh"] {
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

#[test]
fn fetchers_run_at_once_into_one_cache_take_turns() {
    let a = StubArchive::new("together");
    let cache = a.dir.join("cache");
    std::fs::create_dir_all(&cache).expect("cache");
    // Four at once (tests side by side, a set-up beside a test): each gets
    // the same whole tree; the cache holds only whole things, no lock file.
    let outs: Vec<Output> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| a.run("fetch-kernel.sh", &[], &cache, Some("9.9.0-2"))))
            .collect();
        runs.into_iter().map(|r| r.join().expect("run")).collect()
    });
    for o in &outs {
        assert!(o.status.success(), "{}", text(o));
        assert_eq!(outs[0].stdout, o.stdout, "{}", text(o));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&outs[0].stdout).trim());
    assert!(dir.join(".complete").is_file());
    let mut got = entries(&cache);
    got.sort();
    assert_eq!(got, WHOLE_9_9_0_1);
}
