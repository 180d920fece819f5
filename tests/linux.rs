//! Real Linux guests (the pinned Debian cloud kernel) under lucos on real KVM:
//! directly on a host with VT-x/AMD-V, in the emulated SVM host elsewhere.

mod common;

use std::time::Duration;

use common::linux::{kernel_pkg, kernel_release, run_scenario, run_scenario_with, Extras};

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
    let release = kernel_release(&kernel_pkg());
    out.expect(&format!("@@WORK answer=42 cpus=1 kernel={release}"));
    out.expect(&format!("@@WORK answer=42 cpus=2 kernel={release}"));
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
    // The guest counts until the scenario stops it, printing its running sum
    // every 5000 steps; the host pauses and resumes it 100 times meanwhile,
    // then waits for the guest to count on, and only then stops it. Nothing
    // the host does has to fit into a length of guest work.
    let workload = r#"#!/bin/sh
i=0; sum=0
while :; do
  i=$((i + 1)); sum=$((sum + i))
  [ $((i % 5000)) -eq 0 ] && echo "@@TICK i=$i sum=$sum"
done
"#;
    let scenario = format!(
        r#"
LOG=/tmp/serial.log
ticks() {{ grep -c @@TICK $LOG; }}
# wait_ticks N: until the guest has printed N ticks (or it is gone).
wait_ticks() {{
  until [ "$(ticks)" -ge $1 ]; do
    $LUCOS status --vm busy >/dev/null 2>&1 || return 1
    sleep 0.2
  done
}}
up busy $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "{CMDLINE}"
rc=$?; echo "@@SCN started rc=$rc"; [ $rc = 0 ] || exit 1
wait_ticks 1
ok=0; bad=0; before=$(ticks); t0=$(cut -d' ' -f1 /proc/uptime)
for k in $(seq 1 100); do
  if $LUCOS pause --vm busy >/dev/null && $LUCOS resume --vm busy >/dev/null; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
done
after=$(ticks)
state=$($LUCOS status --vm busy --json | grep -o '"pauses": [0-9]*')
echo "@@SCN cycles ok=$ok bad=$bad ticks_before=$before ticks_after=$after from=$t0 to=$(cut -d' ' -f1 /proc/uptime) $state"
# The guest counts on after the last resume.
wait_ticks $((after + 3)) && echo "@@SCN counting on ticks=$(ticks)"
$LUCOS stop --vm busy >/dev/null
wait_vm busy 300
# The stop may cut the guest's last line short: only whole lines.
head -n "$(wc -l < $LOG)" $LOG | sed 's/^/G| /'
echo
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
    // The pauses happened while the guest counted (it had started before
    // the first and went on after the last), and never upset its count.
    let ticks = |key: &str| -> u64 {
        out.value("@@SCN cycles", key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}:\n{}", out.text))
    };
    assert!(ticks("ticks_before") >= 1, "{}", out.text);
    out.expect("@@SCN counting on");
    let mut seen = 0u64;
    for l in out.text.lines().filter(|l| l.starts_with("G| @@TICK ")) {
        let field = |k: &str| -> u64 {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad tick line '{l}'"))
        };
        let (i, sum) = (field("i"), field("sum"));
        seen += 1;
        assert_eq!(
            i,
            seen * 5000,
            "a tick lost or repeated: '{l}'\n{}",
            out.text
        );
        assert_eq!(sum, i * (i + 1) / 2, "the guest's count went wrong: '{l}'");
    }
    assert!(seen >= ticks("ticks_after") + 2, "{}", out.text);
    out.expect("lucos: VM busy ended: stopped");
}
