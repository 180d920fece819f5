//! Live VMM upgrade of test-kernel VMs of 64 MiB, 256 MiB and 1 GiB on
//! /dev/kvm: guest downtime (the last vCPU out in the old process to the
//! new process's vCPUs started, as the VMMs measure it) and the longest
//! stall a guest task sees (its own TSC, read in a tight loop in user mode:
//! `mode=stall`), median and p99 over the upgrades, beside the published
//! figures of the references: Cloud Hypervisor's local migration (memory
//! fds over a Unix socket, ~50 ms for an idle 4 GiB VM), HyperFresh (KVM
//! hypervisor replaced by remapping guest memory, ~10 ms) and Firecracker's
//! snapshot restore (target <5 ms, measured 8-33 ms). Those are not rerun
//! here: none of them runs on this host's KVM (PVM) in this checkout.
//!
//! `cargo bench --bench upgrade` (LUCOS_BENCH_RUNS: upgrades per size,
//! default 30).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::bench::{median, p99};
use common::cli::{p, start, RunDir};
use serde_json::Value;

/// Each task's stall reports so far: (task, round, max cycles).
fn stalls(serial: &std::path::Path) -> Vec<(u64, u64, u64)> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let r = l.strip_prefix("[tk] task ")?;
            let (task, r) = r.split_once(" stall round ")?;
            let (round, r) = r.split_once(" max_cycles ")?;
            Some((
                task.parse().ok()?,
                round.parse().ok()?,
                r.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// Waits until every task has reported `rounds` rounds; the reports.
fn wait_rounds(serial: &std::path::Path, tasks: u64, rounds: u64) -> Vec<(u64, u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = stalls(serial);
        let done = (0..tasks).all(|t| s.iter().any(|&(k, r, _)| k == t && r >= rounds));
        if done {
            return s;
        }
        assert!(Instant::now() < deadline, "stall reports stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The floor of a handover that copies guest memory (a snapshot to a file
/// and back, as a VMM without shared memory would do): writing `bytes` of
/// touched memory into a fresh memfd once, milliseconds.
fn copy_floor_ms(bytes: usize) -> f64 {
    use std::io::Write;
    let src = vec![0x5au8; bytes];
    let mut f = vmm_core::memory::new_memfd(c"bench-copy", bytes as u64).expect("memfd");
    let t = Instant::now();
    f.write_all(&src).expect("copy");
    t.elapsed().as_secs_f64() * 1e3
}

struct Row {
    mem: &'static str,
    copy_ms: f64,
    downtime: Vec<f64>,
    stall: Vec<f64>,
    idle_stall: f64,
    total_ms: Vec<f64>,
    state_bytes: u64,
}

fn measure(mem: &'static str, runs: usize) -> Row {
    let dir = RunDir::new(&format!("bench-upgrade-{mem}"));
    let serial = dir.0.join("serial.log");
    // Reports every 2^20 TSC reads: several per second, so the round that
    // spans an upgrade is mostly the upgrade.
    start(
        &dir,
        "b",
        &[
            "--vcpus",
            "2",
            "--mem",
            mem,
            "--cmdline",
            "tasks=2 iters=0 mode=stall report=1048576",
            "--serial-log",
            p(&serial),
        ],
    );
    let base = wait_rounds(&serial, 2, 5);
    // Without an upgrade: the longest gap in rounds 2..5 (timer interrupts, host).
    let idle: Vec<u64> = base
        .iter()
        .filter(|&&(_, r, _)| (2..=5).contains(&r))
        .map(|&(_, _, c)| c)
        .collect();
    let bytes = match mem {
        "64M" => 64 << 20,
        "256M" => 256 << 20,
        _ => 1 << 30,
    };
    let mut row = Row {
        mem,
        copy_ms: copy_floor_ms(bytes),
        downtime: Vec::new(),
        stall: Vec::new(),
        idle_stall: 0.0,
        total_ms: Vec::new(),
        state_bytes: 0,
    };
    let mut khz = 0.0;
    for _ in 0..runs {
        // The round under way when the upgrade starts is the one that holds it.
        let before = stalls(&serial);
        let round = |t: u64| {
            before
                .iter()
                .filter(|&&(k, _, _)| k == t)
                .map(|&(_, r, _)| r)
                .max()
                .unwrap_or(0)
        };
        let (r0, r1) = (round(0), round(1));
        let out = dir.ok(&["upgrade", "--vm", "b", "--json"]);
        let up: Value = serde_json::from_str(&out).expect("upgrade json");
        row.downtime
            .push(up["downtime_us"].as_f64().expect("downtime"));
        row.total_ms.push(up["total_ms"].as_f64().expect("total"));
        row.state_bytes = up["state_bytes"].as_u64().unwrap_or(0);
        khz = up["tsc_khz"].as_f64().unwrap_or(khz);
        let after = wait_rounds(&serial, 2, r0.max(r1) + 2);
        let worst = after
            .iter()
            .filter(|&&(k, r, _)| (k == 0 && r == r0 + 1) || (k == 1 && r == r1 + 1))
            .map(|&(_, _, c)| c)
            .max()
            .unwrap_or(0);
        row.stall.push(worst as f64);
    }
    assert!(khz > 0.0, "KVM gave no TSC frequency");
    let us = |cycles: f64| cycles / khz * 1e3;
    row.stall = row.stall.iter().map(|&c| us(c)).collect();
    row.idle_stall = us(idle.iter().copied().max().unwrap_or(0) as f64);
    dir.ok(&["stop", "--vm", "b"]);
    row
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = std::env::var("LUCOS_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(30)
        .max(2);
    let rows: Vec<Row> = ["64M", "256M", "1G"]
        .into_iter()
        .map(|m| measure(m, runs))
        .collect();
    println!();
    println!(
        "live VMM upgrade, test kernel, 2 vCPUs busy, {runs} upgrades per size (PVM /dev/kvm, {} host cores)",
        std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(0)
    );
    println!(
        "{:<8} {:>14} {:>14} {:>16} {:>16} {:>14} {:>12} {:>12} {:>14}",
        "guest",
        "downtime med",
        "downtime p99",
        "task stall med",
        "task stall p99",
        "stall w/o upg.",
        "total med",
        "state bytes",
        "copy RAM once"
    );
    for r in &rows {
        println!(
            "{:<8} {:>11.0} µs {:>11.0} µs {:>13.0} µs {:>13.0} µs {:>11.0} µs {:>9.1} ms {:>12} {:>11.1} ms",
            r.mem,
            median(r.downtime.clone()),
            p99(r.downtime.clone()),
            median(r.stall.clone()),
            p99(r.stall.clone()),
            r.idle_stall,
            median(r.total_ms.clone()),
            r.state_bytes,
            r.copy_ms
        );
    }
    println!("copy RAM once: the floor of a handover that copies guest memory (measured here)");
    println!("reference (published, not rerun here):");
    println!("  Cloud Hypervisor local migration, idle 4 GiB VM      ~50 ms");
    println!("  HyperFresh (VEE 2019), KVM/QEMU hypervisor replaced  ~10 ms");
    println!("  Firecracker snapshot restore: target <5 ms, measured 8-33 ms");
    println!("  goal: <= 5 ms, flat in guest memory size (memory is never copied)");
}
