//! The guest kernel's log and clock read from outside, with no agent in the
//! guest: `lucos dmesg` of the test kernel (its printk ring, laid out like
//! Linux 6.1's) against what its serial port printed, through ring wraps,
//! `--since` and `--follow`; `alive` on a running and a paused VM; a live
//! patch that makes the kernel log a warning, classified as one.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cli::{build_test_patch, p, start, text, RunDir};
use update_engine::klog::problem;
use vmm_core::control::{AliveInfo, Client, DmesgInfo, ErrorCode, LogRecord, Request};

/// Limits on waiting for the guest: hang detectors, not speed limits.
const HANG_SECS: u64 = 120;

fn serial_lines(serial: &Path) -> Vec<String> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .split('\n')
        .map(str::to_owned)
        .collect()
}

/// Waits until the serial output has `n` complete lines.
fn wait_serial_lines(serial: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(HANG_SECS);
    loop {
        let lines = serial_lines(serial);
        // The last element is the line still being printed.
        if lines.len() > n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{n} lines not printed in {HANG_SECS} s; {} so far",
            lines.len() - 1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dmesg(dir: &RunDir, vm: &str, since: u64) -> DmesgInfo {
    let o = dir.lucos(&["dmesg", "--vm", vm, "--since", &since.to_string(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("dmesg JSON: {e}\n{}", text(&o)))
}

/// Every record is the serial line of the same number (every line the
/// test kernel prints is logged, the first as record 0), in order.
fn check_against_serial(info: &DmesgInfo, serial: &Path) {
    let last = info.records.last().expect("records").seq as usize;
    let lines = wait_serial_lines(serial, last + 1);
    let mut ts = 0;
    for (k, r) in info.records.iter().enumerate() {
        assert_eq!(r.text, lines[r.seq as usize], "record {}", r.seq);
        if k > 0 {
            assert_eq!(r.seq, info.records[k - 1].seq + 1, "consecutive");
        }
        assert!(r.ts_ns >= ts, "time goes forward: {r:?}");
        ts = r.ts_ns;
        assert_eq!(r.level, 6, "{r:?}");
        assert_eq!(problem(&r.text), None, "{r:?}");
    }
    assert_eq!(info.next, last as u64 + 1);
}

fn client(dir: &RunDir, vm: &str) -> Client {
    Client::connect(vm, &dir.0.join(format!("{vm}.sock"))).expect("connect")
}

#[test]
fn dmesg_reads_the_test_kernels_log_through_wraps_since_and_follow() {
    let dir = RunDir::new("dmesg");
    let serial = dir.0.join("serial.log");
    start(
        &dir,
        "dm",
        &[
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--cmdline",
            "tasks=2 iters=0 report=20",
            "--serial-log",
            p(&serial),
        ],
    );
    // The ring keeps 128 records: 250 lines wrap it.
    wait_serial_lines(&serial, 250);
    let t0 = Instant::now();
    let all = dmesg(&dir, "dm", 0);
    let took = t0.elapsed();
    let first = all.records.first().expect("records").seq;
    assert!(
        all.records.len() >= 100,
        "a full ring: {}",
        all.records.len()
    );
    assert!(first >= 100, "the ring wrapped: oldest kept is {first}");
    assert_eq!(all.lost, first, "everything before the oldest kept is lost");
    check_against_serial(&all, &serial);

    // From a record in the middle: only it and newer, or (if the ring
    // moved past it meanwhile) the loss counted.
    let mid = all.records[all.records.len() / 2].seq;
    let part = dmesg(&dir, "dm", mid);
    let from = part.records.first().expect("records").seq;
    assert!(part.records.iter().all(|r| r.seq >= mid));
    assert_eq!(from, mid + part.lost, "{} lost", part.lost);
    check_against_serial(&part, &serial);

    // From the end: only what came since.
    let serial_now = serial_lines(&serial).len();
    wait_serial_lines(&serial, serial_now + 10);
    let new = dmesg(&dir, "dm", part.next);
    assert!(!new.records.is_empty());
    assert_eq!(new.records[0].seq, part.next + new.lost);
    check_against_serial(&new, &serial);
    // Past the end: nothing, and where the log is.
    let ahead = dmesg(&dir, "dm", u64::MAX);
    assert!(ahead.records.is_empty() && ahead.lost == 0);
    assert!(ahead.next >= new.next, "{} < {}", ahead.next, new.next);

    // As text, like Linux's dmesg.
    let o = dir.lucos(&["dmesg", "--vm", "dm"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().last().expect("a line");
    let (stamp, rest) = line.split_once("] ").expect("[time] text");
    let stamp = stamp.strip_prefix('[').expect("[");
    let (secs, micros) = stamp.trim_start().split_once('.').expect("s.us");
    assert!(stamp.len() >= 12 && micros.len() == 6, "{line}");
    assert!(
        secs.bytes()
            .chain(micros.bytes())
            .all(|b| b.is_ascii_digit()),
        "{line}"
    );
    assert!(rest.starts_with("[tk] task "), "{line}");

    // Alive: the clock advances while the VM runs; paused, it does not,
    // and the answer says so; the log still reads (it is memory), unchanged.
    let mut c = client(&dir, "dm");
    let a: AliveInfo = c
        .call_as(&Request::Alive { timeout_ms: 10_000 })
        .expect("alive");
    assert_eq!(a.symbol, "jiffies");
    assert!(a.after > a.before, "{a:?}");
    let o = dir.lucos(&["pause", "--vm", "dm"]);
    assert!(o.status.success(), "{}", text(&o));
    let e = c
        .call_as::<AliveInfo>(&Request::Alive { timeout_ms: 300 })
        .expect_err("a paused guest's clock stands still");
    let vmm_core::control::ClientError::Remote(body) = e else {
        panic!("{e}")
    };
    assert_eq!(body.code, ErrorCode::Stalled);
    assert!(
        body.message.contains("jiffies did not advance in 300 ms")
            && body.message.contains("the VM is paused"),
        "{}",
        body.message
    );
    let o = dir.lucos(&["alive", "--vm", "dm", "--timeout", "200"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("did not advance in 200 ms"),
        "{}",
        text(&o)
    );
    let paused = dmesg(&dir, "dm", 0);
    assert_eq!(paused, dmesg(&dir, "dm", 0), "nothing moves while paused");
    check_against_serial(&paused, &serial);
    let o = dir.lucos(&["resume", "--vm", "dm"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = dir.lucos(&["alive", "--vm", "dm", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let a: AliveInfo = serde_json::from_slice(&o.stdout).expect("alive JSON");
    assert!(a.after > a.before);

    // --follow: new records as they come (one JSON object a line), until
    // the VM ends.
    let next = dmesg(&dir, "dm", u64::MAX).next;
    let mut follow = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["dmesg", "--vm", "dm", "--follow", "--json", "--since"])
        .arg(next.to_string())
        .env("LUCOS_RUN_DIR", &dir.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dmesg --follow");
    let (tx, rx) = mpsc::channel();
    let stdout = follow.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let r: LogRecord = serde_json::from_str(&line).expect("a record a line");
            if tx.send(r).is_err() {
                break;
            }
        }
    });
    let mut got: Vec<LogRecord> = Vec::new();
    while got.len() < 10 {
        got.push(
            rx.recv_timeout(Duration::from_secs(HANG_SECS))
                .expect("followed records"),
        );
    }
    assert!(got[0].seq >= next);
    assert!(got.windows(2).all(|w| w[1].seq > w[0].seq));
    let o = dir.lucos(&["stop", "--vm", "dm"]);
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(HANG_SECS);
    let status = loop {
        if let Some(s) = follow.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "dmesg --follow outlived its VM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "follow ends with its VM: {status:?}");
    drop(rx);
    reader.join().expect("reader");
    eprintln!(
        "dmesg of a full ring ({} records) took {took:?}",
        all.records.len()
    );
}

/// Stacked on nothing: `lucos_version` that logs a kernel warning (once, at
/// KERN_WARNING) the first time it runs, through the kernel's own kprintf.
const WARN_ONCE: &str = r#"#include "tk.h"
static int warned;
const char *lucos_version(void)
{
	if (!__atomic_load_n(&warned, __ATOMIC_RELAXED) && !__atomic_exchange_n(&warned, 1, __ATOMIC_RELAXED))
		kprintf(KERN_WARNING "WARNING: CPU: 0 PID: 1 at services.c:20 lucos_version+0x0/0x20\n");
	return "testkernel 1.0 (warned)";
}
"#;

#[test]
fn a_live_patch_that_makes_the_kernel_warn_shows_in_dmesg_as_a_warning() {
    let dir = RunDir::new("dmesg-warn");
    let d: PathBuf = dir.0.clone();
    let ok = |args: &[&str]| {
        let o = dir.lucos(args);
        assert!(o.status.success(), "lucos {args:?}: {}", text(&o));
    };
    ok(&["keygen", "-o", p(&d.join("key"))]);
    build_test_patch(&dir, &d, &d.join("key"), "warn", WARN_ONCE);
    let serial = d.join("serial.log");
    start(
        &dir,
        "dw",
        &[
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--cmdline",
            "tasks=2 iters=0 report=200",
            "--serial-log",
            p(&serial),
            "--trusted-key",
            p(&d.join("key.pub")),
        ],
    );
    common::cli::wait_lines(&serial, "version testkernel 1.0\n", 2, HANG_SECS);
    let before = dmesg(&dir, "dw", 0);
    assert!(before.records.iter().all(|r| problem(&r.text).is_none()));
    ok(&["patch", "--vm", "dw", p(&d.join("warn.lup"))]);
    // The next report calls the new code, which warns.
    let deadline = Instant::now() + Duration::from_secs(HANG_SECS);
    let mut since = before.next;
    let warning = loop {
        let info = dmesg(&dir, "dw", since);
        if let Some(r) = info.records.iter().find(|r| r.text.starts_with("WARNING")) {
            break r.clone();
        }
        since = info.next;
        assert!(Instant::now() < deadline, "no warning logged");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(problem(&warning.text), Some("warning"), "{warning:?}");
    assert_eq!(warning.level, 4, "KERN_WARNING: {warning:?}");
    let lines = wait_serial_lines(&serial, warning.seq as usize + 1);
    assert_eq!(lines[warning.seq as usize], warning.text, "as printed");
    common::cli::wait_lines(&serial, "(warned)\n", 2, HANG_SECS);
    let all = dmesg(&dir, "dw", 0);
    let warnings: Vec<_> = all
        .records
        .iter()
        .filter(|r| problem(&r.text).is_some())
        .collect();
    assert_eq!(warnings.len(), 1, "warned once: {warnings:?}");
}

/// The test kernel's log has Linux 6.1's x86-64 layout, as its DWARF says
/// (no VM needed): the reader takes every offset from there.
#[test]
fn the_test_kernels_log_layout_from_its_dwarf_is_linux_6_1s() {
    let data = std::fs::read(common::test_kernel()).expect("test kernel");
    let symbols = symbol_db::SymbolTable::from_elf_bytes(&data, "tk").expect("symbols");
    let types = symbol_db::dwarf::TypeDb::from_elf(&data, "tk").expect("DWARF");
    let paging = vmm_core::pagewalk::PagingState {
        cr0: 0,
        cr3: 0,
        cr4: 0,
        efer: 0,
    };
    let l =
        update_engine::klog::LogLayout::from_dwarf(&types, "tk", &symbols, paging).expect("layout");
    assert_eq!(l.prb, symbols.lookup("prb").expect("prb").addr);
    let f = |x: update_engine::klog::Field| (x.offset, x.size);
    let r = &l.ring;
    assert_eq!(
        [
            r.count_bits,
            r.descs,
            r.infos,
            r.head_id,
            r.tail_id,
            r.size_bits,
            r.data
        ]
        .map(f),
        [(0, 4), (8, 8), (16, 8), (24, 8), (32, 8), (48, 4), (56, 8)]
    );
    assert_eq!(l.desc.size, 24);
    assert_eq!(
        [l.desc.state_var, l.desc.begin, l.desc.next].map(f),
        [(0, 8), (8, 8), (16, 8)]
    );
    assert_eq!(l.info.size, 88);
    assert_eq!(
        [l.info.seq, l.info.ts_nsec, l.info.text_len].map(f),
        [(0, 8), (8, 8), (16, 2)]
    );
    assert_eq!((l.info.level.bit, l.info.level.width), (19 * 8 + 5, 3));
    assert_eq!((f(l.block.id), l.block.data), ((0, 8), 8));
}
