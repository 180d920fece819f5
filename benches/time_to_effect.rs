//! Time until a patch takes effect in a busy Linux guest, side by side in one
//! run: lucos immediate, lucos consistent and Linux's own livepatch, the same
//! two-function change (`devkmsg_read` fails with ENODATA, /proc/version
//! says `lucos-busy`) in the same Debian 6.1 guest (2 vCPUs, in the emulated
//! SVM host). The guest is busy: 4 tasks read /proc/version in a loop, and 24
//! sleep inside `devkmsg_read`.
//!
//! - lucos immediate: request to reply (`total_us`; the patch is in effect
//!   when the reply comes), and the pause.
//! - lucos consistent: it waits for a pause with no task in the replaced
//!   code, bounded (100 pauses), then refuses: never in effect here.
//! - livepatch: insmod until its transition is done (klptime, at most 60 s).
//!   Livepatch logs to the kernel log, which wakes the readers of
//!   /dev/kmsg; they return to user mode and are switched there, so here
//!   they do not hold its transition back for long.
//!
//! Then, in the same guest, the same three ways for sleepers that nothing
//! wakes: 24 tasks asleep in `pause()` (`__x64_sys_pause`, replaced by the
//! same loop) while 4 tasks read /proc/uptime (`uptime_proc_show` says
//! `lucos-quiet`). Livepatch's transition can only switch them when its
//! fake signals (after 15 s of retries) wake them.
//!
//! `cargo bench --bench time_to_effect` (LUCOS_BENCH_RUNS: lucos immediate
//! applies, default 3).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::bench::{
    build_klptime, klp_module, median, number as get, runs, step_signal_source, SCENARIO_HELPERS,
};
use common::linux::{build_modules, build_patch, kbuild_dir, run_scenario_with, Extras, PatchDirs};

const DEFS: &str = r#"#include <linux/fs.h>
#include <linux/errno.h>

static ssize_t lpb_devkmsg_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	return -ENODATA;
}

static int lpb_version_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-busy\n");
	return 0;
}
"#;

/// The second change: the sleepers' `pause()` (the same loop) and the
/// /proc/uptime reader.
const QUIET_DEFS: &str = r#"#include <linux/sched/signal.h>
#include <linux/errno.h>

static long lpq___x64_sys_pause(const struct pt_regs *regs)
{
	while (!signal_pending(current)) {
		__set_current_state(TASK_INTERRUPTIBLE);
		schedule();
	}
	return -ERESTARTNOHAND;
}

static int lpq_uptime_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-quiet\n");
	return 0;
}
"#;

fn quiet_source() -> String {
    format!(
        "#include <linux/seq_file.h>\n{}",
        QUIET_DEFS
            .replace("static long lpq_", "long ")
            .replace("static int lpq_", "int ")
    )
}

/// The lucos patch: the same functions under the kernel's names.
fn lucos_source() -> String {
    format!(
        "#include <linux/seq_file.h>\n{}",
        DEFS.replace("static ssize_t lpb_", "ssize_t ")
            .replace("static int lpb_", "int ")
    )
}

const WORKLOAD: &str = r#"#!/bin/sh
F=/files
for i in 1 2 3 4; do (while :; do cat /proc/version > /dev/null; done) & done
readers=""
for i in $(seq 1 24); do cat /dev/kmsg > /dev/null 2>&1 & readers="$readers $!"; done
asleep() { for p in $readers; do cat /proc/$p/wchan; echo; done | grep -c devkmsg_read; }
n=0; until [ "$(asleep)" -eq 24 ] || [ $n -gt 600 ]; do sleep 0.1; n=$((n + 1)); done
echo "@@BUSY ready asleep=$(asleep)"
until grep -q step-done-lucos /proc/sys/kernel/domainname; do sleep 0.2; done
echo "@@BUSY livepatch asleep=$(asleep)"
$F/klptime load $F/busy.ko busy > /tmp/op 2>&1
echo "@@BUSY klp $(tr '\n' ' ' < /tmp/op) seen=$(head -c 10 /proc/version)"
echo "@@BUSY end"
for i in 1 2 3 4; do (while :; do cat /proc/uptime > /dev/null; done) & done
sleepers=""
for i in $(seq 1 24); do $F/klptime pause & sleepers="$sleepers $!"; done
paused() { for p in $sleepers; do cat /proc/$p/wchan; echo; done | grep -c sys_pause; }
n=0; until [ "$(paused)" -eq 24 ] || [ $n -gt 600 ]; do sleep 0.1; n=$((n + 1)); done
echo "@@QUIET ready asleep=$(paused)"
until grep -q step-done-quiet /proc/sys/kernel/domainname; do sleep 0.2; done
echo "@@QUIET livepatch asleep=$(paused)"
$F/klptime load $F/quiet.ko quiet > /tmp/op 2>&1
echo "@@QUIET klp $(tr '\n' ' ' < /tmp/op) seen=$(head -c 11 /proc/uptime)"
echo "@@QUIET end"
"#;

fn scenario(runs: usize) -> String {
    format!(
        r#"
LOG=/tmp/b.serial
{helpers}
start_vm 256M
await "@@BUSY ready" || exit 1
grep "@@BUSY ready" $LOG | sed 's/^/@@SCN /'
# measure CASE NAME: NAME.lup applied in immediate mode {runs} times (each
# reverted), then once in consistent mode.
measure() {{
  for r in $(seq 1 {runs}); do
    $LUCOS patch --vm b --json --mode immediate $FILES/$2.lup > /tmp/o 2>&1
    echo "@@SCN $1=immediate $(figures)"
    $LUCOS revert --vm b $2 > /dev/null 2>&1 || echo "@@SCN revert failed"
  done
  t0=$(cut -d' ' -f1 /proc/uptime)
  $LUCOS patch --vm b --json --mode consistent $FILES/$2.lup > /tmp/o 2>&1; rc=$?
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "@@SCN $1=consistent rc=$rc wall_us=$(awk "BEGIN {{ print ($t1 - $t0) * 1000000 }}") $(tr '\n' ' ' < /tmp/o | cut -c 1-200)"
}}
measure sys busy
$LUCOS patch --vm b $FILES/go.lup > /dev/null 2>&1 || echo "@@SCN go patch failed"
await "@@BUSY end" || exit 1
grep "@@BUSY" $LOG | sed 's/^/@@SCN /'
await "@@QUIET ready" || exit 1
measure quiet quiet
$LUCOS patch --vm b $FILES/go2.lup > /dev/null 2>&1 || echo "@@SCN go2 patch failed"
await "@@QUIET end" || exit 1
grep "@@QUIET" $LOG | sed 's/^/@@SCN /'
$LUCOS stop --vm b >/dev/null 2>&1 || true
"#,
        helpers = SCENARIO_HELPERS
    )
}

fn main() {
    let runs = runs();
    let d = PatchDirs::new("bench-effect");
    let kbuild = kbuild_dir();
    build_patch(&d.files, &kbuild, &d.vmlinux, "busy", &lucos_source(), &[]);
    build_patch(
        &d.files,
        &kbuild,
        &d.vmlinux,
        "go",
        &step_signal_source("lucos"),
        &[],
    );
    build_patch(&d.files, &kbuild, &d.vmlinux, "quiet", &quiet_source(), &[]);
    build_patch(
        &d.files,
        &kbuild,
        &d.vmlinux,
        "go2",
        &step_signal_source("quiet"),
        &[],
    );
    let module = klp_module(
        DEFS,
        &[
            ("devkmsg_read", "lpb_devkmsg_read".into()),
            ("version_proc_show", "lpb_version_proc_show".into()),
        ],
    );
    let quiet = klp_module(
        QUIET_DEFS,
        &[
            ("__x64_sys_pause", "lpq___x64_sys_pause".into()),
            ("uptime_proc_show", "lpq_uptime_proc_show".into()),
        ],
    );
    build_modules(&kbuild, &d.kmod, &[("busy", &module), ("quiet", &quiet)]);
    for m in ["busy.ko", "quiet.ko"] {
        std::fs::copy(d.kmod.join(m), d.guest.join(m)).expect("module");
    }
    build_klptime(&d.guest);
    let out = run_scenario_with(
        "bench-effect",
        WORKLOAD,
        &scenario(runs),
        Duration::from_secs(900),
        Extras {
            files: Some(d.files.clone()),
            guest_files: Some(d.guest.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&d.dir);
    let lines = |prefix: &str| -> Vec<String> {
        out.text
            .lines()
            .filter_map(|l| l.find(prefix).map(|i| l[i..].to_owned()))
            .collect()
    };
    for (case, tag, sleep_site, seen) in [
        (
            "sys",
            "BUSY",
            "devkmsg_read (woken by livepatch's own log messages)",
            "lucos-busy",
        ),
        (
            "quiet",
            "QUIET",
            "pause() (woken by nothing but a signal)",
            "lucos-quiet",
        ),
    ] {
        let imm = lines(&format!("@@SCN {case}=immediate "));
        assert_eq!(imm.len(), runs, "{}", out.text);
        let total: Vec<f64> = imm.iter().filter_map(|l| get(l, "total_us")).collect();
        let pause: Vec<f64> = imm.iter().filter_map(|l| get(l, "pause_us")).collect();
        assert_eq!(
            total.len(),
            runs,
            "every immediate apply worked:\n{}",
            out.text
        );
        let (total, pause) = (median(total), median(pause));
        let con = lines(&format!("@@SCN {case}=consistent "))
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no consistent line:\n{}", out.text));
        let klp = lines(&format!("@@SCN @@{tag} klp "))
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no livepatch line:\n{}", out.text));
        let asleep = out
            .value(&format!("@@SCN @@{tag} ready"), "asleep")
            .unwrap_or_default();
        let klp_us = get(&klp, "total_us");
        assert!(
            klp_us.is_none() || klp.contains(&format!("seen={seen}")),
            "livepatch done but not in effect: {klp}"
        );
        println!(
            "time until a two-function patch takes effect in a busy Debian 6.1 guest (2 vCPUs, 4 tasks calling it, {asleep} asleep in {sleep_site}), emulated SVM host; lucos immediate: median of {runs}"
        );
        println!("| system | time until in effect | note |");
        println!("|---|---|---|");
        // Where lucos's time went before the pause (medians).
        let phases: Vec<String> = [
            ("read", "read_us"),
            ("signature", "verify_us"),
            ("modules", "modules_us"),
            ("resolve", "resolve_us"),
            ("place", "place_us"),
            ("plan", "plan_us"),
            ("relay", "relay_us"),
        ]
        .iter()
        .map(|(what, key)| {
            let v: Vec<f64> = imm.iter().filter_map(|l| get(l, key)).collect();
            format!("{what} {:.1}", median(v) / 1e3)
        })
        .collect();
        println!(
            "| lucos immediate | {:.1} ms | guest paused {:.2} ms; before it (ms): {} |",
            total / 1e3,
            pause / 1e3,
            phases.join(", ")
        );
        if con.contains("rc=0") {
            println!(
                "| lucos consistent | {:.1} ms | applied |",
                get(&con, "wall_us").unwrap_or(f64::NAN) / 1e3
            );
        } else {
            println!(
                "| lucos consistent | never | refused after {:.1} s (100 pauses with tasks asleep in the code) |",
                get(&con, "wall_us").unwrap_or(f64::NAN) / 1e6
            );
        }
        match klp_us {
            Some(us) => println!(
                "| Linux livepatch | {:.1} ms | insmod until transition done; {:.0}x lucos immediate |",
                us / 1e3,
                us / total
            ),
            None => println!(
                "| Linux livepatch | not within 60 s | over {:.0}x lucos immediate; {klp} |",
                60e6 / total
            ),
        }
        println!();
    }
}
