//! Real Linux guests (the pinned Debian cloud kernel) under lucos on real KVM:
//! directly on a host with VT-x/AMD-V, in the emulated SVM host elsewhere.

mod common;

use std::time::Duration;

use common::linux::{run_scenario, run_scenario_with, Extras};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

#[test]
fn linux_boots_runs_a_command_and_powers_off_on_1_and_2_vcpus_and_reboots_and_boots_pvh() {
    let workload = r#"#!/bin/sh
echo "@@WORK answer=$((6 * 7)) cpus=$(grep -c ^processor /proc/cpuinfo) kernel=$(uname -r)"
grep -q lucos.reboot /proc/cmdline && reboot -f
exit 0
"#;
    // 1 vCPU without KASLR, 2 vCPUs with it.
    let scenario = format!(
        r#"
boot one 240 --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 1 --mem 256M --cmdline "{CMDLINE} nokaslr"
boot two 240 --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "{CMDLINE}"
boot three 240 --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 1 --mem 256M --cmdline "{CMDLINE} lucos.reboot"
boot four 240 --kernel $GUEST_VMLINUX --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "{CMDLINE}"
"#
    );
    let out = run_scenario_with(
        "boot",
        workload,
        &scenario,
        Duration::from_secs(600),
        Extras {
            qemu: false,
            vmlinux: true,
            ..Extras::default()
        },
    );
    out.expect("@@WORK answer=42 cpus=1 kernel=6.1.0-56-cloud-amd64");
    out.expect("@@WORK answer=42 cpus=2 kernel=6.1.0-56-cloud-amd64");
    assert_eq!(
        out.text.matches("@@WORK answer=42 cpus=2").count(),
        2,
        "bzImage and vmlinux (PVH) on 2 vCPUs: {}",
        out.text
    );
    assert_eq!(
        out.text.matches("@@GUEST done rc=0").count(),
        3,
        "{}",
        out.text
    );
    out.expect("@@SCN one end=ended: guest powered off");
    out.expect("@@SCN two end=ended: guest powered off");
    // A guest reboot ends the VMM cleanly too.
    out.expect("@@SCN three end=ended: guest reset the machine");
    // The same kernel as an ELF vmlinux, through its PVH entry point.
    out.expect("@@SCN four end=ended: guest powered off");
}

#[test]
fn linux_guest_survives_100_pause_resume_cycles() {
    // The guest counts in a loop long enough to outlast the 100 cycles (each
    // cycle is two lucos processes, slow inside the emulated host).
    let workload = r#"#!/bin/sh
i=0; sum=0
while [ $i -lt 300000 ]; do
  i=$((i + 1)); sum=$((sum + i))
  [ $((i % 25000)) -eq 0 ] && echo "@@TICK i=$i"
done
echo "@@WORK loop done i=$i sum=$sum"
"#;
    let scenario = format!(
        r#"
LOG=/tmp/serial.log
up busy $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "{CMDLINE}"
rc=$?; echo "@@SCN started rc=$rc"; [ $rc = 0 ] || exit 1
ok=0; bad=0; t0=$(cut -d' ' -f1 /proc/uptime)
for k in $(seq 1 100); do
  if $LUCOS pause --vm busy >/dev/null && $LUCOS resume --vm busy >/dev/null; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
done
state=$($LUCOS status --vm busy --json | grep -o '"pauses": [0-9]*')
echo "@@SCN cycles ok=$ok bad=$bad ticks_before_end=$(grep -c @@TICK $LOG) from=$t0 to=$(cut -d' ' -f1 /proc/uptime) $state"
wait_vm busy 300
sed 's/^/G| /' $LOG
cat $LUCOS_RUN_DIR/busy.log
"#
    );
    let out = run_scenario("pause", workload, &scenario, Duration::from_secs(900));
    assert_eq!(
        out.value("@@SCN started", "rc").as_deref(),
        Some("0"),
        "{}",
        out.text
    );
    assert_eq!(
        out.value("@@SCN cycles", "ok").as_deref(),
        Some("100"),
        "{}",
        out.text
    );
    assert_eq!(
        out.value("@@SCN cycles", "bad").as_deref(),
        Some("0"),
        "{}",
        out.text
    );
    out.expect("\"pauses\": 100");
    out.expect("@@WORK loop done i=300000 sum=45000150000");
    // The pauses happened while the loop ran, not after it.
    let ticks: u32 = out
        .value("@@SCN cycles", "ticks_before_end")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tick count:\n{}", out.text));
    assert!(
        ticks < 12,
        "the loop ended before the pauses did:\n{}",
        out.text
    );
    out.expect("@@GUEST done rc=0");
    out.expect("lucos: VM busy ended: guest powered off");
}
