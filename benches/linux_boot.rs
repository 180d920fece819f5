//! Linux guest boot: lucos against QEMU (`-machine microvm`), same kernel,
//! initramfs, vCPUs and memory, on the same KVM in the same run (inside the
//! emulated SVM host on PVM machines, directly on hardware KVM elsewhere).
//!
//! Prints, per VMM (median of the runs): wall time from starting the VMM to
//! the guest's /init, the guest kernel's own uptime at /init, and the VMM's
//! memory overhead: resident memory minus the guest RAM it has touched
//! (VmRSS - RssShmem, with guest RAM in a memfd for both VMMs), at /init.
//!
//! `cargo bench --bench linux_boot` (LUCOS_BENCH_RUNS sets the runs, default 3).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::bench::{median, number, runs};
use common::linux::{kernel_pkg, kernel_release, run_scenario_with, Extras};

fn main() {
    let runs = runs();
    // The guest idles until the scenario has measured it and stops it.
    let workload = "#!/bin/sh\nwhile :; do sleep 1; done\n";
    let cmdline = "console=ttyS0 reboot=k panic=-1 quiet";
    // measure NAME PID LOG: wait for /init, report times and memory, end the VMM.
    let scenario = format!(
        r#"
now() {{ cut -d' ' -f1 /proc/uptime; }}
measure() {{
  name=$1 pid=$2 log=$3 t0=$4
  n=0; while ! grep -q "@@GUEST up" $log 2>/dev/null; do sleep 0.02; n=$((n + 1)); [ $n -gt 6000 ] && break; done
  t1=$(now)
  rss=$(awk '/^VmRSS/ {{print $2}}' /proc/$pid/status)
  shm=$(awk '/^RssShmem/ {{print $2}}' /proc/$pid/status)
  up=$(grep -o "@@GUEST up uptime=[0-9.]*" $log | cut -d= -f2)
  echo "@@BENCH vmm=$name t0=$t0 t1=$t1 guest_uptime=$up rss_kib=$rss shmem_kib=$shm"
  kill $pid; wait $pid
}}
for i in $(seq 1 {runs}); do
  rm -f /tmp/l.log /tmp/q.log
  t0=$(now)
  $LUCOS run --vm b$i --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M \
     --cmdline "{cmdline}" --serial-log /tmp/l.log --quiet 2>/dev/null &
  measure lucos $! /tmp/l.log $t0
  t0=$(now)
  $QEMU -L /usr/share/qemu -M microvm,memory-backend=ram -object memory-backend-memfd,id=ram,size=256M \
     -enable-kvm -cpu host -smp 2 -m 256M -nodefaults -no-user-config -display none \
     -serial file:/tmp/q.log -kernel $GUEST_KERNEL -initrd $GUEST_INITRD \
     -append "{cmdline}" -no-reboot 2>/dev/null &
  measure qemu $! /tmp/q.log $t0
done
"#
    );
    let out = run_scenario_with(
        "bench",
        workload,
        &scenario,
        Duration::from_secs(300 + 120 * runs as u64),
        Extras {
            qemu: true,
            ..Extras::default()
        },
    );
    let mut rows: std::collections::BTreeMap<String, Vec<[f64; 3]>> = Default::default();
    for line in out.text.lines().filter(|l| l.contains("@@BENCH")) {
        let get = |k: &str| number(line, k).unwrap_or(f64::NAN);
        let vmm = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("vmm="))
            .unwrap_or("?")
            .to_owned();
        rows.entry(vmm).or_default().push([
            get("t1") - get("t0"),
            get("guest_uptime"),
            (get("rss_kib") - get("shmem_kib")) / 1024.0,
        ]);
    }
    assert!(
        rows.get("lucos").is_some_and(|r| r.len() == runs)
            && rows.get("qemu").is_some_and(|r| r.len() == runs),
        "missing measurements:\n{}",
        out.text
    );
    println!(
        "Linux {} boot to /init, 2 vCPUs, 256 MiB, busybox initramfs, {runs} runs each, on {}",
        kernel_release(&kernel_pkg()),
        out.where_
    );
    println!(
        "{:<8} {:>16} {:>22} {:>22}",
        "VMM", "wall to /init s", "guest uptime at /init", "VMM overhead RSS MiB"
    );
    let mut med = std::collections::BTreeMap::new();
    for (vmm, v) in &rows {
        let m = [0, 1, 2].map(|i| median(v.iter().map(|r| r[i]).collect()));
        println!("{vmm:<8} {:>16.2} {:>22.2} {:>22.1}", m[0], m[1], m[2]);
        med.insert(vmm.clone(), m);
    }
    let (l, q) = (med["lucos"], med["qemu"]);
    println!(
        "lucos/qemu: wall {:.2}x, guest uptime {:.2}x, overhead {:.2}x",
        l[0] / q[0],
        l[1] / q[1],
        l[2] / q[2]
    );
}
