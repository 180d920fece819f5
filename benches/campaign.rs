//! A campaign over 50 test-kernel VMs on /dev/kvm with zero soak: VMs per
//! second and the time each VM was paused, side by side with the reference
//! an operator has without campaigns: `lucos patch` in a shell loop, one VM
//! after the other (no health checks, no journal).
//!
//! Campaigns are measured with all health checks (alive, log, patch) at
//! concurrency 1 and 8, and with none at concurrency 1 (the journal's and
//! the control round trips' own cost). Between runs a revert campaign
//! takes the patch off again.
//!
//! `cargo bench --bench campaign` (LUCOS_BENCH_VMS: VMs, default 50).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::bench::{median, p99};
use common::cli::{build_test_patch, p, start, text, RunDir, FIX};
use serde_json::Value;

/// Runs the campaign of a plan with `body` after its patch; (seconds, per-VM pause µs).
fn campaign(
    dir: &RunDir,
    d: &Path,
    name: &str,
    fix: &Path,
    action: &str,
    body: &str,
) -> (f64, Vec<f64>) {
    let plan = d.join(format!("{name}.toml"));
    std::fs::write(
        &plan,
        format!(
            "[[patch]]\nfile = \"{}\"\naction = \"{action}\"\n[targets]\nvms = [\"vm*\"]\n{body}",
            fix.display()
        ),
    )
    .expect("plan");
    let t = Instant::now();
    let out = dir.ok(&["campaign", "run", "--json", p(&plan)]);
    let secs = t.elapsed().as_secs_f64();
    let r: Value = serde_json::from_str(&out).expect("report");
    assert_eq!(r["outcome"], "done", "{r:#}");
    let pauses = r["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| v["paused_us"].as_f64().expect("paused_us"))
        .collect();
    (secs, pauses)
}

fn main() {
    let n: usize = std::env::var("LUCOS_BENCH_VMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let dir = RunDir::new("bench-campaign");
    let d = dir.0.join("work");
    std::fs::create_dir_all(&d).expect("work dir");
    dir.ok(&["keygen", "-o", p(&d.join("key"))]);
    let fix = build_test_patch(&dir, &d, &d.join("key"), "fix", FIX);
    let key = d.join("key.pub");
    let t = Instant::now();
    for i in 0..n {
        start(
            &dir,
            &format!("vm{i:02}"),
            &[
                "--trusted-key",
                p(&key),
                "--mem",
                "32M",
                "--cmdline",
                "tasks=1 iters=0 mode=user report=20000",
            ],
        );
    }
    eprintln!("{n} VMs started in {:.1} s", t.elapsed().as_secs_f64());
    let ids: Vec<String> = (0..n).map(|i| format!("vm{i:02}")).collect();

    let mut rows: Vec<(String, f64, Vec<f64>)> = Vec::new();
    // The reference: lucos patch in a shell loop.
    let script = format!(
        "for vm in {}; do {} patch --vm $vm --json {} | grep -o '\"pause_us\": *[0-9.]*' || exit 1; done",
        ids.join(" "),
        env!("CARGO_BIN_EXE_lucos"),
        fix.display()
    );
    let t = Instant::now();
    let o = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("LUCOS_RUN_DIR", &dir.0)
        .output()
        .expect("shell loop");
    let secs = t.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", text(&o));
    let pauses: Vec<f64> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.rsplit(':').next()?.trim().parse().ok())
        .collect();
    assert_eq!(pauses.len(), n);
    rows.push((
        "shell loop of `lucos patch` (no checks)".into(),
        secs,
        pauses,
    ));
    let none = "[health]\nalive = false\nlog = false\npatch = false\n";
    let revert = |tag: &str| {
        campaign(&dir, &d, &format!("revert-{tag}"), &fix, "revert", none);
    };
    revert("0");
    let (s, v) = campaign(&dir, &d, "plain", &fix, "apply", none);
    rows.push(("campaign, no checks, 1 at a time".into(), s, v));
    revert("1");
    let (s, v) = campaign(&dir, &d, "checked", &fix, "apply", "");
    rows.push(("campaign, alive+log+patch, 1 at a time".into(), s, v));
    revert("2");
    let (s, v) = campaign(
        &dir,
        &d,
        "parallel",
        &fix,
        "apply",
        "[[wave]]\nsize = \"rest\"\nconcurrency = 8\n",
    );
    rows.push(("campaign, alive+log+patch, 8 at a time".into(), s, v));

    println!();
    println!(
        "campaign over {n} test-kernel VMs (PVM /dev/kvm, {} host cores), zero soak",
        std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(0)
    );
    println!(
        "{:<44} {:>9} {:>8} {:>14} {:>14}",
        "how", "total s", "VMs/s", "pause med µs", "pause p99 µs"
    );
    for (how, secs, pauses) in rows {
        println!(
            "{:<44} {:>9.2} {:>8.2} {:>14.1} {:>14.1}",
            how,
            secs,
            n as f64 / secs,
            median(pauses.clone()),
            p99(pauses)
        );
    }
}
