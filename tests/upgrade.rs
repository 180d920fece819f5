//! Live VMM upgrade of test-kernel VMs on /dev/kvm, through the `lucos`
//! binary: 100 handovers in a row under load with a patch and a protected
//! range; new binaries that exit, cannot read the state, or hang leave the
//! guest running in the old VMM.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cli::{build_test_patch, p, start, text, wait_lines, RunDir, FIX};
use serde_json::Value;

const REPORT: u64 = 500;

fn json(dir: &RunDir, args: &[&str]) -> Value {
    serde_json::from_str(&dir.ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn status(dir: &RunDir) -> Value {
    json(dir, &["status", "--vm", "up", "--json"])
}

fn start_vm(dir: &RunDir, serial: &Path, key: &Path) {
    let cmdline = format!("tasks=2 iters=0 report={REPORT}");
    start(
        dir,
        "up",
        &[
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--cmdline",
            &cmdline,
            "--serial-log",
            p(serial),
            "--trusted-key",
            p(key),
        ],
    );
}

/// Each task's report lines: (iter, counter, calls, sum, lost), in the
/// order printed.
fn reports(serial: &str, task: u64) -> Vec<(u64, u64, u64, u64, u64)> {
    let prefix = format!("[tk] task {task} cpu ");
    serial
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|l| {
            let field = |k: &str| -> u64 {
                l.split(k)
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {k} in '{l}'"))
            };
            (
                field(" iter "),
                field(" counter "),
                field(" calls="),
                field(" sum="),
                field(" lost="),
            )
        })
        .collect()
}

/// Waits until the write-control counter `key` exceeds `than`.
fn wait_counter(dir: &RunDir, key: &str, than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = status(dir)["write_control"][key].as_u64().expect(key);
        if n > than {
            return n;
        }
        assert!(Instant::now() < deadline, "{key} stayed at {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_vm_upgraded_100_times_under_load_keeps_its_tasks_timer_serial_patch_and_protection() {
    let dir = RunDir::new("upgrade");
    let serial = dir.0.join("serial.log");
    dir.ok(&["keygen", "-o", p(&dir.0.join("key"))]);
    start_vm(&dir, &serial, &dir.0.join("key.pub"));
    wait_lines(&serial, "version testkernel 1.0\n", 2, 60);

    // Before: a patch, and a range the guest writes all the time protected
    // (the kernel's note of each task's iteration, written at every call and
    // read only when a task exits: its writes are refused from now on).
    let fix = build_test_patch(&dir, &dir.0, &dir.0.join("key"), "fix", FIX);
    dir.ok(&["patch", "--vm", "up", p(&fix)]);
    wait_lines(&serial, "(live-patched)\n", 2, 60);
    dir.ok(&["protect", "--vm", "up", "--name", "guard", "task_iters"]);
    let refused = wait_counter(&dir, "refused", 0);
    let first_pid = status(&dir)["pid"].as_u64().expect("pid");

    let mut pids = vec![first_pid];
    let mut downtimes = Vec::new();
    // Descriptors of a VMM: none may be carried into the next one's next.
    let fds = |pid: u64| {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|t| t.display().to_string())
            .collect();
        names.sort();
        names
    };
    let mut fds_after_two = Vec::new();
    for i in 1..=100u64 {
        let up = json(&dir, &["upgrade", "--vm", "up", "--json"]);
        assert_eq!(up["upgrades"], i, "{up}");
        assert_eq!(up["old_pid"], *pids.last().expect("pid"), "{up}");
        let pid = up["new_pid"].as_u64().expect("new_pid");
        assert!(!pids.contains(&pid), "a new process each time: {up}");
        pids.push(pid);
        downtimes.push(up["downtime_us"].as_f64().expect("downtime"));
        if i == 2 {
            fds_after_two = (0..10)
                .map(|_| {
                    std::thread::sleep(Duration::from_millis(20));
                    fds(pid)
                })
                .min_by_key(Vec::len)
                .expect("samples");
        }
        if i % 25 == 0 {
            // The guest runs in the new process: its tasks report.
            wait_lines(&serial, "(live-patched)\n", 2, 60);
        }
    }
    let s = status(&dir);
    assert_eq!(s["pid"], *pids.last().expect("pid"), "{s}");
    // (A control connection being closed can linger for a moment: a leak
    // is for good.)
    let mut now = fds(*pids.last().expect("pid"));
    for _ in 0..100 {
        if now.len() <= fds_after_two.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        now = fds(*pids.last().expect("pid"));
    }
    assert_eq!(
        now.len(),
        fds_after_two.len(),
        "descriptors after 2 upgrades: {fds_after_two:#?}\nafter 100: {now:#?}"
    );
    assert_eq!(s["upgrades"], 100, "{s}");
    assert!(
        s["vmm_version"]
            .as_str()
            .expect("version")
            .starts_with("lucos "),
        "{s}"
    );
    // The old processes are gone.
    for &pid in &pids[..pids.len() - 1] {
        let alive = Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "VMM {pid} did not exit after handing over");
    }
    downtimes.sort_by(f64::total_cmp);
    eprintln!(
        "100 upgrades: downtime median {:.0} µs, max {:.0} µs",
        downtimes[50], downtimes[99]
    );

    // The timer ticks on, the guest kernel's clock advances.
    dir.ok(&["alive", "--vm", "up"]);
    // The patch is in effect (the text is what it should be) and reverts.
    assert_eq!(dir.patches("up"), ["fix"]);
    wait_lines(&serial, "(live-patched)\n", 2, 60);
    // The protected range is still protected: its writes are still refused
    // by the VMM that runs the guest now.
    let prot = json(&dir, &["protect", "--vm", "up", "--json"]);
    assert!(
        prot["ranges"]
            .as_array()
            .expect("ranges")
            .iter()
            .any(|r| r["owner"] == "user:guard"),
        "{prot}"
    );
    let now = wait_counter(&dir, "refused", refused);
    wait_counter(&dir, "refused", now);
    dir.ok(&["revert", "--vm", "up", "fix"]);
    wait_lines(&serial, "version testkernel 1.0\n", 2, 60);

    // Serial output went on: every task's lines in order, none lost or
    // repeated, the service counter never going back.
    dir.ok(&["stop", "--vm", "up"]);
    std::thread::sleep(Duration::from_millis(300));
    let out = std::fs::read_to_string(&serial).expect("serial");
    assert!(
        !out.contains("EXCEPTION") && !out.contains("PANIC"),
        "{out}"
    );
    for task in 0..2 {
        let r = reports(&out, task);
        assert!(r.len() > 10, "task {task}: {} lines", r.len());
        for w in r.windows(2) {
            assert_eq!(w[1].0, w[0].0 + REPORT, "task {task}: {w:?}");
            assert!(w[1].1 >= w[0].1, "task {task}: counter back {w:?}");
        }
        // Every kernel service call made once: the kernel's count and sum
        // of the task's calls are the task's own.
        for &(iter, _, calls, sum, lost) in &r {
            assert_eq!((calls, lost), (iter, 0), "task {task} at {iter}:\n{out}");
            assert_eq!(sum, iter * (iter + 1) / 2, "task {task} at {iter}");
        }
    }
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, format!("#!/bin/sh\n{body}\n")).expect("script");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    f
}

#[test]
fn new_binaries_that_exit_cannot_read_the_state_or_hang_leave_the_guest_in_the_old_vmm() {
    let dir = RunDir::new("upgrade-bad");
    let serial = dir.0.join("serial.log");
    dir.ok(&["keygen", "-o", p(&dir.0.join("key"))]);
    start_vm(&dir, &serial, &dir.0.join("key.pub"));
    wait_lines(&serial, "version testkernel 1.0\n", 2, 60);
    let pid = status(&dir)["pid"].clone();
    let lucos = env!("CARGO_BIN_EXE_lucos");
    let cases = [
        (script(&dir.0, "exits", "exit 3"), "10", "exited at start"),
        (
            script(
                &dir.0,
                "old-format",
                &format!("LUCOS_HANDOFF_READS=0 exec {lucos} \"$@\""),
            ),
            "10",
            "cannot read handover format 1",
        ),
        (
            script(&dir.0, "hangs", "exec sleep 600"),
            "2",
            "did not answer at start in time",
        ),
        (dir.0.join("missing"), "10", "cannot start"),
    ];
    for (binary, timeout, why) in &cases {
        let o = dir.lucos(&[
            "upgrade",
            "--vm",
            "up",
            "--binary",
            p(binary),
            "--timeout",
            timeout,
        ]);
        let t = text(&o);
        if !binary.exists() {
            // Refused by the client before the VMM sees it.
            assert_eq!(o.status.code(), Some(1), "{t}");
            assert!(t.contains("cannot find"), "{t}");
            continue;
        }
        assert_eq!(o.status.code(), Some(10), "{binary:?}: {t}");
        assert!(t.contains(why), "{binary:?}: '{why}' not in: {t}");
        assert!(t.contains("the guest runs on in this VMM"), "{t}");
        // Same VMM, guest running on.
        let s = status(&dir);
        assert_eq!(s["pid"], pid, "{s}");
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(s["upgrades"], 0, "{s}");
        wait_lines(&serial, "version testkernel 1.0\n", 2, 60);
    }
    // And a good binary still takes over.
    let up = json(&dir, &["upgrade", "--vm", "up", "--json"]);
    assert_eq!(up["upgrades"], 1, "{up}");
    wait_lines(&serial, "version testkernel 1.0\n", 2, 60);
    let o = dir.lucos(&["upgrade", "--vm", "ghost"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}
