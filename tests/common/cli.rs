//! Driving the `lucos` binary from tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A private run directory (`LUCOS_RUN_DIR`) whose VMs are stopped on drop.
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// A fresh directory for test `name`.
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("lucos-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("run dir");
        Self(d)
    }

    /// Runs `lucos ARGS` with this run directory.
    pub fn lucos(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_lucos"))
            .args(args)
            .env("LUCOS_RUN_DIR", &self.0)
            .output()
            .expect("run lucos")
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Never leave a VMM behind: stop whatever is still listed.
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = n.strip_suffix(".sock") {
                    let _ = self.lucos(&["stop", "--vm", id]);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RunDir {
    /// `lucos ARGS`, which must succeed: its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.lucos(args);
        assert!(o.status.success(), "lucos {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The names of the patches applied to VM `vm`, oldest first.
    pub fn patches(&self, vm: &str) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["list", "--vm", vm, "--json"])).expect("list --json");
        v["patches"]
            .as_array()
            .expect("patches")
            .iter()
            .map(|p| p["name"].as_str().expect("name").to_owned())
            .collect()
    }
}

/// `dir/NAME.lup`: a test-kernel patch built from the C source `src`,
/// signed with `key` (from `lucos keygen`).
pub fn build_test_patch(run: &RunDir, dir: &Path, key: &Path, name: &str, src: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).expect("patch source");
    let out = dir.join(format!("{name}.lup"));
    let k = kernel();
    run.ok(&[
        "build",
        "--kernel",
        &k,
        "--key",
        p(key),
        "--name",
        name,
        "-o",
        p(&out),
        p(&c),
    ]);
    out
}

/// Exit status and output, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The test kernel's path.
pub fn kernel() -> String {
    super::test_kernel().display().to_string()
}

/// `lucos run --detach` of the test kernel as `id`.
pub fn start(dir: &RunDir, id: &str, extra: &[&str]) {
    super::require_kvm();
    let k = kernel();
    let mut args = vec!["run", "--vm", id, "--kernel", &k, "--detach", "--quiet"];
    args.extend_from_slice(extra);
    let o = dir.lucos(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("VM {id} running")),
        "{}",
        text(&o)
    );
}

/// The test kernel's `lucos_version` with another string: the live patch
/// most tests apply.
pub const FIX: &str = r#"#include "tk.h"
const char *lucos_version(void)
{
	return "testkernel 1.0 (live-patched)";
}
"#;

/// A path as the `&str` a command line takes.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

/// Waits until `needle` occurs in `file` `n` more times than now; `secs`
/// is a hang detector, not a speed limit.
pub fn wait_lines(file: &Path, needle: &str, n: usize, secs: u64) {
    let read = || std::fs::read_to_string(file).unwrap_or_default();
    let base = read().matches(needle).count();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while read().matches(needle).count() < base + n {
        assert!(
            Instant::now() < deadline,
            "'{needle}' not seen {n} more times in {secs} s:\n{}",
            read()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
