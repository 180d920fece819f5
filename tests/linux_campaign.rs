//! A campaign over two Debian 6.1 guests (KASLR, labels) in the emulated
//! SVM host, health-checked from outside through each guest's own kernel
//! log (its printk ring buffer read from guest memory) and clock: a fix
//! rolled out in two waves; then a patch whose code fires a kernel WARNING
//! is caught in the canary by the log check and rolled back, no other guest
//! touched; then a revert campaign takes the fix off everywhere.

mod common;

use std::time::Duration;

use common::linux::{build_patch, kbuild_dir, run_scenario_with, Extras, PatchDirs};
use serde_json::Value;

const FIX: &str = r#"#include <linux/seq_file.h>
#include <linux/init.h>

int cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s lucos.campaign=1\n", saved_command_line);
	return 0;
}
"#;

/// Stacked on FIX: also fires a WARNING (once) in the guest kernel.
const WARN: &str = r#"#include <linux/seq_file.h>
#include <linux/init.h>
#include <linux/bug.h>

int cmdline_proc_show(struct seq_file *m, void *v)
{
	WARN_ONCE(1, "lucos campaign: this patch warns\n");
	seq_printf(m, "%s lucos.warn=1\n", saved_command_line);
	return 0;
}
"#;

const WORKLOAD: &str = r#"#!/bin/sh
while :; do
  echo "@@CMD $(cat /proc/cmdline)"
  sleep 1
done
"#;

const SCENARIO: &str = r#"
CMDLINE="console=ttyS0 panic=-1 quiet"
for i in 1 2; do
  up lc$i /tmp/lc$i.serial --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 1 --mem 256M \
    --cmdline "$CMDLINE" --trusted-key $FILES/key.pub --label fleet=linux || exit 1
done
$LUCOS dmesg --vm lc1 > /tmp/dmesg 2>&1; echo "@@SCN dmesg rc=$? lines=$(wc -l < /tmp/dmesg)"
grep -m 1 "Linux version" /tmp/dmesg | sed 's/^/@@SCN banner /'
# A health command that waits for the guest to show the patched file.
seen() {
  cat <<EOF
n=0; until tail -n 3 /tmp/\$LUCOS_VM.serial | grep -q '$1'; do sleep 0.2; n=\$((n+1)); [ \$n -gt 900 ] && exit 1; done; exit 0
EOF
}
# ...and one that waits for two whole lines without it (the last line may
# be still being written).
unseen() {
  cat <<EOF
n=0; until tail -n 3 /tmp/\$LUCOS_VM.serial | head -n 2 > /tmp/\$LUCOS_VM.last && [ \$(grep -c '^@@CMD' /tmp/\$LUCOS_VM.last) = 2 ] && ! grep -q '$1' /tmp/\$LUCOS_VM.last; do sleep 0.2; n=\$((n+1)); [ \$n -gt 900 ] && exit 1; done; exit 0
EOF
}
plan() {
  cat > /tmp/$1.toml <<EOF
[[patch]]
file = "$FILES/$2.lup"
action = "$3"
[targets]
labels = { fleet = "linux" }
[[wave]]
size = 1
soak = "1s"
[[wave]]
size = "rest"
concurrency = 2
[health]
command = "$($5 "$4")"
timeout = "5m"
EOF
}
campaign() {
  $LUCOS campaign run --json /tmp/$1.toml > /tmp/$1.json 2> /tmp/$1.err; rc=$?
  echo "@@SCN $1 rc=$rc"
  echo "@@JSON $1 $(tr -d '\n' < /tmp/$1.json)"
  sed "s/^/@@SCN $1 progress /" /tmp/$1.err
}
plan fix fix apply "lucos.campaign=1" seen; campaign fix
plan warn warn apply "lucos.warn=1" seen; campaign warn
for i in 1 2; do echo "@@SCN after-warn lc$i patches=$($LUCOS list --vm lc$i --json | tr -d ' \n' | grep -o '"name":"[a-z]*"' | cut -d'"' -f4 | tr '\n' ,)"; done
$LUCOS dmesg --vm lc1 > /tmp/dmesg1
grep "WARNING: CPU:" /tmp/dmesg1 | tail -n 1 | sed 's/^/@@SCN lc1 warning /'
echo "@@SCN lc1 message count=$(grep -c 'lucos campaign: this patch warns' /tmp/dmesg1)"
for i in 2; do echo "@@SCN lc$i message count=$($LUCOS dmesg --vm lc$i | grep -c 'lucos campaign: this patch warns')"; done
plan unfix fix revert "lucos.campaign=1" unseen; campaign unfix
for i in 1 2; do echo "@@SCN after-revert lc$i patches=$($LUCOS list --vm lc$i --json | tr -d ' \n' | grep -o '"name":"[a-z]*"' | cut -d'"' -f4 | tr '\n' ,)"; done
for i in 1 2; do $LUCOS stop --vm lc$i >/dev/null; done
"#;

fn report(out: &common::linux::ScenarioOutput, name: &str) -> Value {
    let line = out.line(&format!("@@JSON {name} "));
    let json = &line[format!("@@JSON {name} ").len()..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{name} report: {e}\n{}", out.text))
}

#[test]
fn linux_campaign_waves_log_checks_catch_a_warning_and_roll_back() {
    let kbuild = kbuild_dir();
    let d = PatchDirs::new("campaign");
    build_patch(&d.files, &kbuild, &d.vmlinux, "fix", FIX, &[]);
    build_patch(&d.files, &kbuild, &d.vmlinux, "warn", WARN, &[]);
    let out = run_scenario_with(
        "campaign",
        WORKLOAD,
        SCENARIO,
        Duration::from_secs(1500),
        Extras {
            files: Some(d.files.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&d.dir);
    // `lucos dmesg` of a real Linux guest: its own boot log.
    out.expect("@@SCN dmesg rc=0");
    assert!(out.line("@@SCN banner ").contains("Linux version 6.1"));

    let fix = report(&out, "fix");
    assert_eq!(fix["outcome"], "done", "{fix:#}\n{}", out.text);
    let sizes: Vec<usize> = fix["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| w["vms"].as_array().expect("vms").len())
        .collect();
    assert_eq!(sizes, [1, 1]);
    for v in fix["vms"].as_array().expect("vms") {
        assert_eq!(v["result"], "patched", "{v:#}");
        let checks: Vec<(&str, bool)> = v["health"]
            .as_array()
            .expect("health")
            .iter()
            .map(|c| (c["check"].as_str().expect("check"), c["ok"] == true))
            .collect();
        assert_eq!(
            checks,
            [
                ("alive", true),
                ("log", true),
                ("patch", true),
                ("command", true)
            ],
            "{v:#}"
        );
    }

    out.expect("@@SCN warn rc=8");
    let warn = report(&out, "warn");
    assert_eq!(warn["outcome"], "failed", "{warn:#}");
    let failure = warn["failure"].as_str().expect("failure");
    assert!(
        failure.contains("wave 1") && failure.contains("health check log failed"),
        "{failure}"
    );
    assert!(failure.contains("WARNING"), "{failure}");
    let vms = warn["vms"].as_array().expect("vms");
    assert_eq!(vms[0]["result"], "rolled-back", "{warn:#}");
    assert!(
        vms[1..].iter().all(|v| v["result"] == "pending"),
        "{warn:#}"
    );
    // The canary lost the warning patch, kept the fix; the others never
    // saw it.
    for i in 1..=2 {
        out.expect(&format!("@@SCN after-warn lc{i} patches=fix,\n"));
    }
    // Linux's own report of it (the address is in lucos's patch area,
    // which the guest's kallsyms does not name).
    let warning = out.line("@@SCN lc1 warning ");
    assert!(
        warning.contains("WARNING: CPU: 0 PID:") && !warning.contains("xstate"),
        "{warning}"
    );
    out.expect("@@SCN lc1 message count=1\n");
    // The other guests never ran the warning patch.
    out.expect("@@SCN lc2 message count=0\n");

    let unfix = report(&out, "unfix");
    assert_eq!(unfix["outcome"], "done", "{unfix:#}");
    for i in 1..=2 {
        out.expect(&format!("@@SCN after-revert lc{i} patches=\n"));
    }
}
