//! The `lucos` command line end to end: run --detach, list, status, pause,
//! resume, regs, stop, and every kind of bad input.

mod common;

use common::cli::{kernel, start, text, RunDir};

use std::path::Path;
use std::time::{Duration, Instant};

fn status_json(dir: &RunDir, id: &str) -> serde_json::Value {
    let o = dir.lucos(&["status", "--vm", id, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).expect("status JSON")
}

fn wait_gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() {
        assert!(Instant::now() < deadline, "{} still there", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_detached_then_drive_it() {
    let dir = RunDir::new("drive");
    start(
        &dir,
        "web1",
        &[
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--cmdline",
            "iters=0 report=0",
        ],
    );
    let sock = dir.0.join("web1.sock");
    let mode = std::fs::metadata(&sock).expect("socket").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let s = status_json(&dir, "web1");
    assert_eq!(s["id"], "web1");
    assert_eq!(s["state"], "running");
    assert_eq!(s["vcpus"], 2);
    assert_eq!(s["mem_bytes"], 64 << 20);

    let o = dir.lucos(&["list", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list JSON");
    assert_eq!(list[0]["id"], "web1");
    let o = dir.lucos(&["list"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("web1"),
        "{}",
        text(&o)
    );

    let o = dir.lucos(&["regs", "--vm", "web1"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "regs of a running VM: {}",
        text(&o)
    );

    let o = dir.lucos(&["pause", "--vm", "web1", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).expect("pause JSON");
    assert!(p["pause_us"].as_f64().expect("pause_us") > 0.0);
    assert_eq!(status_json(&dir, "web1")["state"], "paused");
    assert_eq!(status_json(&dir, "web1")["pauses"], 1);

    let o = dir.lucos(&["pause", "--vm", "web1"]);
    assert_eq!(o.status.code(), Some(4), "double pause: {}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already paused"),
        "{}",
        text(&o)
    );

    let o = dir.lucos(&["regs", "--vm", "web1", "--vcpu", "1", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("regs JSON");
    assert_eq!(r["vcpu"], 1);
    assert!(r["regs"]["rip"].as_u64().expect("rip") != 0);

    let o = dir.lucos(&["resume", "--vm", "web1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(status_json(&dir, "web1")["state"], "running");

    // A second VM with the same id is refused while the first runs.
    let k = kernel();
    let o = dir.lucos(&["run", "--vm", "web1", "--kernel", &k, "--quiet"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("VM 'web1' is already running"),
        "{}",
        text(&o)
    );

    let o = dir.lucos(&["stop", "--vm", "web1"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_gone(&sock);
    let o = dir.lucos(&["status", "--vm", "web1"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

#[test]
fn guest_exit_status_becomes_the_exit_code() {
    common::require_kvm();
    let dir = RunDir::new("exit");
    let k = kernel();
    let log = dir.0.join("serial.log");
    let o = dir.lucos(&[
        "run",
        "--vm",
        "short",
        "--kernel",
        &k,
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--cmdline",
        "iters=300 report=100",
        "--serial-log",
        log.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("[tk] done tasks=2 counter=600"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read_to_string(&log).expect("serial log"), stdout);
    assert!(String::from_utf8_lossy(&o.stderr).contains("guest exited with status 0"));
    assert!(!dir.0.join("short.sock").exists(), "socket left behind");
}

#[test]
fn stale_socket_of_a_dead_vmm() {
    let dir = RunDir::new("stale");
    let sock = dir.0.join("ghost.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    let o = dir.lucos(&["status", "--vm", "ghost"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stale socket"),
        "{}",
        text(&o)
    );
    let o = dir.lucos(&["list"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("dead"),
        "{}",
        text(&o)
    );
    // Starting the VM again clears the stale socket.
    start(&dir, "ghost", &["--mem", "64M", "--cmdline", "iters=0"]);
    assert_eq!(status_json(&dir, "ghost")["state"], "running");
    assert!(dir.lucos(&["stop", "--vm", "ghost"]).status.success());
    wait_gone(&sock);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = RunDir::new("bad");
    let k = kernel();
    let junk = dir.0.join("junk.bin");
    std::fs::write(&junk, b"this is not a kernel").expect("write");
    let junk = junk.display().to_string();
    let mut bz = vec![0u8; 0x300];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let bzimage = dir.0.join("bzImage");
    std::fs::write(&bzimage, bz).expect("write");
    let bzimage = bzimage.display().to_string();

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["run", "--vm", "a", "--kernel", "/nonexistent/kernel"],
            1,
            "cannot read kernel image /nonexistent/kernel",
        ),
        (
            vec!["run", "--vm", "a", "--kernel", &junk],
            1,
            "is not an x86-64 ELF kernel image",
        ),
        (
            vec!["run", "--vm", "a", "--kernel", &bzimage],
            1,
            "without a 64-bit entry point",
        ),
        (
            vec!["run", "--vm", "a", "--kernel", &k, "--mem", "8M"],
            1,
            "guest memory too small",
        ),
        (
            vec!["run", "--vm", "a", "--kernel", &k, "--mem", "20M"],
            1,
            "give it at least",
        ),
        (
            vec!["run", "--vm", "a", "--kernel", &k, "--mem", "lots"],
            2,
            "bad memory size",
        ),
        (
            vec!["run", "--vm", "a", "--kernel", &k, "--vcpus", "0"],
            2,
            "--vcpus must be between",
        ),
        (
            vec!["run", "--vm", "../x", "--kernel", &k],
            2,
            "invalid VM id",
        ),
        (
            vec!["status", "--vm", "nosuchvm"],
            3,
            "no VM named 'nosuchvm' is running",
        ),
        (
            vec!["pause", "--vm", "nosuchvm"],
            3,
            "no VM named 'nosuchvm'",
        ),
        (
            vec!["stop", "--vm", "nosuchvm"],
            3,
            "no VM named 'nosuchvm'",
        ),
    ];
    for (args, code, msg) in cases {
        let o = dir.lucos(&args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(msg),
            "{args:?}: wanted '{msg}' in {}",
            text(&o)
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {}", text(&o));
    }
    // A bzImage with a 64-bit entry point: on PVM it is refused at once, with the reason.
    let mut bz = vec![0u8; 0x1000];
    bz[0x1f1] = 1; // setup_sects
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x211] = 1; // LOADED_HIGH
    bz[0x236] = 1; // XLF_KERNEL_64
    let linux = dir.0.join("linux-bzImage");
    std::fs::write(&linux, bz).expect("write");
    let o = dir.lucos(&[
        "run",
        "--vm",
        "a",
        "--kernel",
        linux.to_str().expect("utf8"),
        "--mem",
        "256M",
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    if vmm_core::vm::host_kvm_flavor() == vmm_core::vm::KvmFlavor::Pvm {
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("KVM is PVM"),
            "{}",
            text(&o)
        );
    }

    // None of the refused runs left a socket behind.
    assert!(!dir.0.join("a.sock").exists());
}
