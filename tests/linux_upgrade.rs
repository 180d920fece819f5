//! Live VMM upgrade of a running Debian 6.1 guest (2 vCPUs, KASLR on) in the
//! emulated SVM host: a live patch applied first, then `lucos upgrade` five
//! times while the guest's workload prints a numbered line every second.
//! Each upgrade hands the guest to a new process (`upgrades` counting up,
//! the old process gone); afterwards the patch is still listed and still in
//! effect (the guest's /proc/cmdline), the workload went on without a line
//! lost, repeated or out of order and with its clock never going back, the
//! guest kernel's log (read from guest memory) has nothing new that is a
//! kernel problem or a complaint about its clock, and its clock advances
//! (`lucos alive`). The patch then comes off in the last VMM. The downtimes
//! are printed, not judged.

mod common;

use std::time::Duration;

use common::linux::{
    build_patch, kbuild_dir, run_scenario_with, Extras, PatchDirs, ScenarioOutput,
};
use update_engine::patcher::PatchList;
use vmm_core::control::{AliveInfo, DmesgInfo, LogRecord, StatusInfo, UpgradeInfo};

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Upgrades in a row.
const UPGRADES: u64 = 5;

/// The patch linux_campaign rolls out: /proc/cmdline says it is patched.
const FIX: &str = r#"#include <linux/seq_file.h>
#include <linux/init.h>

int cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s lucos.patched=1\n", saved_command_line);
	return 0;
}
"#;

/// A numbered line every second with the guest's uptime and what its
/// /proc/cmdline says, until the scenario stops the VM.
const WORKLOAD: &str = r#"#!/bin/sh
i=0
while :; do
  i=$((i + 1))
  echo "@@CMD n=$i up=$(cut -d' ' -f1 /proc/uptime) $(cat /proc/cmdline)"
  sleep 1
done
"#;

/// Every wait is a hang detector (5 minutes), never a bet on speed.
const SCENARIO: &str = r#"
LOG=/tmp/lu.serial
# Lines of the serial log so far.
lines() { wc -l < $LOG; }
# The serial log from line N+1 on, without the console's carriage returns
# (lucos writes it a whole line at a time).
from() { tail -n +$(($1 + 1)) $LOG | tr -d '\r'; }
# seen N PATTERN COUNT: waits until COUNT lines after line N of the serial
# log match PATTERN.
seen() {
  n=0
  until [ "$(from $1 | grep -c "$2")" -ge "$3" ]; do
    sleep 0.2; n=$((n + 1))
    if [ $n -gt 1500 ]; then echo "@@SCN timeout waiting for $3 lines '$2' after line $1"; return 1; fi
  done
}
# The end of the VMM's log (the processes it was handed through all write it).
vmm_log() { tail -n ${1:-60} $LUCOS_RUN_DIR/lu.log | sed 's/^/V| /'; }
fail() { tail -n 40 $LOG | sed 's/^/G| /'; vmm_log; $LUCOS stop --vm lu >/dev/null 2>&1; exit 1; }
up lu $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "$CMDLINE" --trusted-key $FILES/key.pub || exit 1
seen 0 '^@@CMD n=' 1 || fail
L=$(lines)
$LUCOS patch --vm lu $FILES/fix.lup > /tmp/o 2>&1; echo "@@SCN apply rc=$? $(tr '\n' ' ' < /tmp/o)"
seen $L 'lucos.patched=1$' 2 || fail
# The guest's log before the first upgrade (behind the guest prefix: it is
# the guest's, it may say anything).
$LUCOS dmesg --vm lu --json > /tmp/d0 2>/tmp/e; echo "@@SCN dmesg before rc=$? $(cat /tmp/e)"
sed 's/^/G| @@DMESG before /' /tmp/d0
$LUCOS status --vm lu --json > /tmp/s 2>&1; echo "@@SCN status before rc=$? $(tr -d '\n' < /tmp/s)"
$LUCOS list --vm lu --json > /tmp/l 2>&1; echo "@@SCN list before rc=$? $(tr -d '\n' < /tmp/l)"
for i in $(seq 1 $UPGRADES); do
  # While the workload runs: a fresh line of it before each handover.
  L=$(lines); seen $L '^@@CMD n=' 1 || fail
  $LUCOS upgrade --vm lu --timeout 300 --json > /tmp/u$i 2>&1; echo "@@SCN upgrade $i rc=$? $(tr -d '\n' < /tmp/u$i)"
done
# The workload goes on, patched, in the last VMM.
L=$(lines)
seen $L '^@@CMD n=.*lucos.patched=1$' 3 || fail
from $L | grep '^@@CMD n=' | head -n 3 | sed 's/^/@@SCN after upgrades /'
$LUCOS status --vm lu --json > /tmp/s 2>&1; echo "@@SCN status after rc=$? $(tr -d '\n' < /tmp/s)"
$LUCOS list --vm lu --json > /tmp/l 2>&1; echo "@@SCN list after rc=$? $(tr -d '\n' < /tmp/l)"
$LUCOS alive --vm lu --timeout 60000 --json > /tmp/a 2>&1; echo "@@SCN alive rc=$? $(tr -d '\n' < /tmp/a)"
$LUCOS dmesg --vm lu --json > /tmp/d1 2>/tmp/e; echo "@@SCN dmesg after rc=$? $(cat /tmp/e)"
sed 's/^/G| @@DMESG after /' /tmp/d1
# The VMMs that handed the guest on have exited (a zombie has too).
for p in $(cat /tmp/u* | grep -o '"old_pid": *[0-9]*' | grep -o '[0-9]*$'); do
  n=0
  while [ -d /proc/$p ] && [ "$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null)" != Z ]; do
    sleep 0.2; n=$((n + 1)); [ $n -gt 1500 ] && break
  done
  [ -d /proc/$p ] && [ "$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null)" != Z ] && echo "@@SCN old $p alive" || echo "@@SCN old $p gone"
done
L=$(lines)
$LUCOS revert --vm lu fix > /tmp/o 2>&1; rc=$?; echo "@@SCN revert rc=$rc $(tr '\n' ' ' < /tmp/o)"
[ $rc = 0 ] && seen $L "^@@CMD n=[0-9]* up=[0-9.]* $CMDLINE\$" 2 && echo "@@SCN seen reverted"
$LUCOS stop --vm lu >/dev/null
wait_vm lu 300
echo "@@SCN end $(grep -o 'ended: .*' $LUCOS_RUN_DIR/lu.log | tail -n 1)"
sed 's/^/G| /' $LOG
vmm_log 100
"#;

/// The JSON after `@@SCN {what} rc=0 `, or a failure showing the output.
fn answer(out: &ScenarioOutput, what: &str) -> String {
    let line = out.line(&format!("@@SCN {what} rc="));
    line.strip_prefix(&format!("@@SCN {what} rc=0 "))
        .unwrap_or_else(|| panic!("{line}\n{}{}", out.vm_ends(), out.text))
        .to_owned()
}

fn parse<T: serde::de::DeserializeOwned>(out: &ScenarioOutput, what: &str) -> T {
    let json = answer(out, what);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{what}: {e}: {json}"))
}

/// The `lucos dmesg --json` the scenario printed behind `G| @@DMESG {tag} `.
fn dmesg(out: &ScenarioOutput, tag: &str) -> DmesgInfo {
    let rc = out.line(&format!("@@SCN dmesg {tag} "));
    assert!(rc.contains(" rc=0"), "{rc}\n{}", out.text);
    let prefix = format!("G| @@DMESG {tag} ");
    let json: String = out
        .text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("dmesg {tag}: {e}\n{json}"))
}

/// Whether a log line is the guest kernel complaining about its clock: its
/// clocksource watchdog or timekeeping (skew, a clocksource marked unstable
/// or switched away from), the TSC (unstable, warping between CPUs, its
/// ADJUST MSR differing) or sched_clock marked unstable.
fn clock_complaint(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("clocksource")
        || t.contains("timekeeping")
        || t.contains("unstable")
        || t.contains("sched_clock")
        || t.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == "tsc")
}

/// A workload line: (n, uptime in seconds, the rest: /proc/cmdline).
fn workload_line(l: &str) -> Option<(u64, f64, &str)> {
    let rest = l.trim_end_matches('\r').strip_prefix("@@CMD n=")?;
    let (n, rest) = rest.split_once(" up=")?;
    let (up, cmdline) = rest.split_once(' ')?;
    Some((n.parse().ok()?, up.parse().ok()?, cmdline))
}

#[test]
fn linux_guest_handed_to_a_new_vmm_five_times_keeps_its_patch_workload_clock_and_log() {
    let kbuild = kbuild_dir();
    let d = PatchDirs::new("upgrade");
    build_patch(&d.files, &kbuild, &d.vmlinux, "fix", FIX, &[]);
    let scenario = format!("CMDLINE=\"{CMDLINE}\"\nUPGRADES={UPGRADES}\n{SCENARIO}");
    let out = run_scenario_with(
        "upgrade",
        WORKLOAD,
        &scenario,
        Duration::from_secs(2400),
        Extras {
            files: Some(d.files.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&d.dir);
    let text = &out.text;
    let apply = out.line("@@SCN apply ");
    assert!(apply.contains("rc=0 "), "{apply}\n{}{text}", out.vm_ends());

    // Before: the first VMM, never upgraded.
    let before: StatusInfo = parse(&out, "status before");
    assert_eq!(before.upgrades, 0, "{before:?}");
    assert!(before.vmm_version.starts_with("lucos "), "{before:?}");

    // Each upgrade: from the VMM that had the guest to a new process.
    let mut pids = vec![before.pid];
    let mut ups = Vec::new();
    for i in 1..=UPGRADES {
        let up: UpgradeInfo = parse(&out, &format!("upgrade {i}"));
        assert_eq!(up.upgrades, i, "{up:?}");
        assert_eq!(up.old_pid, *pids.last().expect("pid"), "{up:?}");
        assert!(
            !pids.contains(&up.new_pid),
            "a new process each time: {up:?}"
        );
        pids.push(up.new_pid);
        eprintln!(
            "upgrade {i}: pid {} -> {}, downtime {:.0} µs (pause {:.0} µs), {} bytes of state \
             sent paused, {:.0} ms in all",
            up.old_pid, up.new_pid, up.downtime_us, up.pause_us, up.state_bytes, up.total_ms
        );
        ups.push(up);
    }
    let mut downtimes: Vec<f64> = ups.iter().map(|u| u.downtime_us).collect();
    downtimes.sort_by(f64::total_cmp);
    eprintln!(
        "{UPGRADES} upgrades of a Debian guest in the emulated SVM host: downtime min {:.0} µs, \
         median {:.0} µs, max {:.0} µs",
        downtimes[0],
        downtimes[downtimes.len() / 2],
        downtimes[downtimes.len() - 1]
    );
    for &pid in &pids[..pids.len() - 1] {
        out.expect(&format!("@@SCN old {pid} gone\n"));
    }

    // After: the last process runs the guest.
    let after: StatusInfo = parse(&out, "status after");
    assert_eq!(after.pid, *pids.last().expect("pid"), "{after:?}");
    assert_eq!(after.upgrades, UPGRADES, "{after:?}");
    assert_eq!(after.state, "running", "{after:?}");
    assert!(after.vmm_version.starts_with("lucos "), "{after:?}");
    // The guest kernel's clock advances (read by the last VMM from guest
    // memory).
    let alive: AliveInfo = parse(&out, "alive");
    assert!(alive.after > alive.before, "{alive:?}");
    // The patch is still applied, the kernel text (with the patch's jump
    // in it) as it was, read by the new VMM from the guest's memory...
    let list0: PatchList = parse(&out, "list before");
    let list: PatchList = parse(&out, "list after");
    let names: Vec<&str> = list.patches.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["fix"], "{list:?}");
    assert_eq!(list.patches, list0.patches);
    let text0 = list0
        .kernel_text
        .expect("the kernel text before the upgrades");
    let text1 = list
        .kernel_text
        .unwrap_or_else(|| panic!("the last VMM cannot read the guest kernel's text:\n{text}"));
    assert_eq!(
        (text1.start, text1.end, &text1.sha256),
        (text0.start, text0.end, &text0.sha256),
        "the kernel text changed over the upgrades"
    );
    // ...and in effect: the workload's lines after the last upgrade.
    let patched = format!("{CMDLINE} lucos.patched=1");
    let fresh: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("@@SCN after upgrades "))
        .collect();
    assert_eq!(fresh.len(), 3, "{text}");
    for l in &fresh {
        let (_, _, cmdline) = workload_line(l).unwrap_or_else(|| panic!("'{l}'"));
        assert_eq!(cmdline, patched, "{l}");
    }

    // The workload ran through it all: every line once, in order, the
    // guest's uptime never going back.
    let work: Vec<(u64, f64, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("G| "))
        .filter(|l| l.starts_with("@@CMD "))
        .map(|l| workload_line(l).unwrap_or_else(|| panic!("a broken workload line: '{l}'")))
        .collect();
    let numbers: Vec<u64> = work.iter().map(|w| w.0).collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(
        numbers, expected,
        "workload lines lost, repeated or out of order"
    );
    assert!(
        work.windows(2).all(|w| w[1].1 > w[0].1),
        "the guest's uptime went back: {:?}",
        work.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>()
    );
    let last_fresh = workload_line(fresh[2]).expect("line").0;
    assert!(
        numbers.iter().any(|&n| n > last_fresh),
        "no workload line after the checks: {numbers:?}"
    );
    assert!(
        work.last().expect("lines").1 < 86_400.0,
        "implausible guest uptime: {:?}",
        work.last()
    );

    // The guest kernel's log: what was there before is unchanged, and
    // nothing since the first upgrade is a problem or a clock complaint.
    let log0 = dmesg(&out, "before");
    let log1 = dmesg(&out, "after");
    let first = log1.records.first().expect("records").seq;
    assert!(
        first <= log0.next,
        "records since the first upgrade lost from the log (it starts at {first}, not at or \
         before {})",
        log0.next
    );
    for r in &log0.records {
        if let Some(same) = log1.records.iter().find(|x| x.seq == r.seq) {
            assert_eq!(same, r, "a log record changed");
        }
    }
    let new: Vec<&LogRecord> = log1.records.iter().filter(|r| r.seq >= log0.next).collect();
    let bad: Vec<(&str, &LogRecord)> = new
        .iter()
        .filter_map(|r| {
            update_engine::klog::problem(&r.text)
                .or_else(|| clock_complaint(&r.text).then_some("clock"))
                .map(|k| (k, *r))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "the guest kernel logged problems since the first upgrade: {bad:#?}\nall new records: \
         {new:#?}"
    );
    // For the reader: what the guest logged before (the emulated CPU's
    // known XSAVE boot warning, say) and since.
    for r in log0
        .records
        .iter()
        .filter(|r| update_engine::klog::problem(&r.text).is_some())
    {
        eprintln!("before the upgrades (boot): [{}] {}", r.seq, r.text);
    }
    eprintln!(
        "guest log: {} records before the first upgrade, {} since",
        log0.next,
        new.len()
    );
    for r in &new {
        eprintln!("  since: [{}] {}", r.seq, r.text);
    }
    let ups_ms: Vec<String> = ups.iter().map(|u| format!("{:.0}", u.total_ms)).collect();
    eprintln!(
        "upgrade times (ms, request to new VMM running): {}",
        ups_ms.join(", ")
    );

    // The patch came off in the last VMM, and the guest shows it.
    let revert = out.line("@@SCN revert ");
    assert!(revert.contains("rc=0 "), "{revert}\n{text}");
    out.expect("@@SCN seen reverted");
    out.expect("@@SCN end ended: stopped");
}
