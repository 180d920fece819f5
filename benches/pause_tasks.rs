//! How lucos's guest pause for applying a live patch grows with the number
//! of tasks in a Linux guest, in immediate and in consistent mode, side by
//! side in one run: the Debian 6.1 guest (2 vCPUs) in the emulated SVM host
//! gets 0, then 300, then 1000 extra sleeping processes, and at each step the
//! same 1- and 10-function patches (the `/proc` show functions of the
//! livepatch benchmark) are applied and reverted in both modes.
//!
//! Consistent mode walks every sleeping task's stack in the pause (none may
//! be in the code being left); immediate mode checks nothing, since nothing
//! can be inside a one-instruction site, so its pause should stay flat.
//!
//! `cargo bench --bench pause_tasks` (LUCOS_BENCH_RUNS: applies per figure,
//! default 3).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::bench::{
    lucos_source, median, number as get, runs, step_signal_source, SCENARIO_HELPERS,
};
use common::linux::{build_patch, kbuild_dir, run_scenario_with, Extras, PatchDirs};

const TASKS: [usize; 3] = [0, 300, 1000];

/// The guest: grows its process count in steps, announcing each; a step
/// lasts until the host says it is done, by a live patch that makes
/// /proc/sys/kernel/domainname read `step-done-T`.
fn workload() -> String {
    let steps: Vec<String> = TASKS.iter().map(|t| t.to_string()).collect();
    format!(
        r#"#!/bin/sh
n=0
for want in {steps}; do
  while [ $n -lt $want ]; do sleep 100000 & n=$((n + 1)); done
  echo "@@PHASE tasks=$want processes=$(ls /proc | grep -c '^[0-9]')"
  until grep -q "step-done-$want" /proc/sys/kernel/domainname; do sleep 0.2; done
done
echo "@@PHASE end"
"#,
        steps = steps.join(" ")
    )
}

fn scenario(runs: usize) -> String {
    let steps: Vec<String> = TASKS.iter().map(|t| t.to_string()).collect();
    format!(
        r#"
LOG=/tmp/b.serial
{helpers}
start_vm 512M
for t in {steps}; do
  await "@@PHASE tasks=$t " || exit 1
  grep "@@PHASE tasks=$t " $LOG | sed 's/^/@@SCN /'
  for r in $(seq 1 {runs}); do
    for n in 1 10; do
      for mode in immediate consistent; do
        $LUCOS patch --vm b --json --mode $mode $FILES/lpb$n.lup > /tmp/o 2>&1
        echo "@@SCN step tasks=$t n=$n mode=$mode $(figures)"
        $LUCOS revert --vm b lpb$n > /dev/null 2>&1 || echo "@@SCN revert failed"
      done
    done
  done
  c=$(grep -c "@@PHASE" $LOG)
  $LUCOS patch --vm b $FILES/step$t.lup > /tmp/o 2>&1 || echo "@@SCN step patch failed: $(cat /tmp/o)"
  w=0; until [ $(grep -c "@@PHASE" $LOG) -gt $c ]; do sleep 0.1; w=$((w + 1)); [ $w -gt 6000 ] && break; done
  $LUCOS revert --vm b step$t > /dev/null 2>&1
done
await "@@PHASE end"
$LUCOS stop --vm b >/dev/null 2>&1 || true
"#,
        steps = steps.join(" "),
        helpers = SCENARIO_HELPERS,
    )
}

fn main() {
    let runs = runs();
    let d = PatchDirs::new("bench-tasks");
    let kbuild = kbuild_dir();
    build_patch(&d.files, &kbuild, &d.vmlinux, "lpb1", &lucos_source(1), &[]);
    build_patch(
        &d.files,
        &kbuild,
        &d.vmlinux,
        "lpb10",
        &lucos_source(10),
        &[],
    );
    for t in TASKS {
        let src = step_signal_source(&t.to_string());
        build_patch(
            &d.files,
            &kbuild,
            &d.vmlinux,
            &format!("step{t}"),
            &src,
            &[],
        );
    }
    let out = run_scenario_with(
        "bench-tasks",
        &workload(),
        &scenario(runs),
        Duration::from_secs(900 + 120 * runs as u64),
        Extras {
            files: Some(d.files.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&d.dir);
    // (tasks, n, mode) -> pause µs samples, tasks walked.
    let mut rows: BTreeMap<(usize, u32, String), (Vec<f64>, f64)> = BTreeMap::new();
    let mut processes: BTreeMap<usize, f64> = BTreeMap::new();
    for line in out.text.lines() {
        if let Some(at) = line.find("@@PHASE tasks=") {
            let l = &line[at..];
            if let (Some(t), Some(p)) = (get(l, "tasks"), get(l, "processes")) {
                processes.insert(t as usize, p);
            }
        }
        let Some(at) = line.find("@@SCN step ") else {
            continue;
        };
        let l = &line[at..];
        let mode = l
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mode="))
            .unwrap_or("?")
            .to_owned();
        let (Some(t), Some(n), Some(pause)) = (get(l, "tasks"), get(l, "n"), get(l, "pause_us"))
        else {
            panic!("a patch did not apply: {l}\n{}", out.text);
        };
        let e = rows.entry((t as usize, n as u32, mode)).or_default();
        e.0.push(pause);
        e.1 = get(l, "sleeping_tasks_checked").unwrap_or(f64::NAN);
    }
    println!(
        "lucos guest pause per apply against the guest's tasks: Debian 6.1, 2 vCPUs, in the emulated SVM host; medians of {runs}"
    );
    println!("| extra sleeping processes (all processes) | functions | immediate: pause | immediate: tasks walked | consistent: pause | consistent: tasks walked |");
    println!("|---|---|---|---|---|---|");
    for t in TASKS {
        for n in [1u32, 10] {
            let get_row = |mode: &str| {
                rows.get(&(t, n, mode.to_owned()))
                    .cloned()
                    .unwrap_or_else(|| {
                        panic!(
                            "no {mode} figures for {t} tasks, {n} functions:\n{}",
                            out.text
                        )
                    })
            };
            let (imm, imm_t) = get_row("immediate");
            let (con, con_t) = get_row("consistent");
            println!(
                "| {t} ({}) | {n} | {:.2} ms | {imm_t:.0} | {:.2} ms | {con_t:.0} |",
                processes.get(&t).copied().unwrap_or(f64::NAN),
                median(imm) / 1e3,
                median(con) / 1e3
            );
        }
    }
}
