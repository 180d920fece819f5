//! symbol-db: decoding the Debian guest kernel's kallsyms and answering
//! lookups.
//!
//! 1. Here, natively: kallsyms decoded from the pinned package's image
//!    (the same bytes the guest runs), and 100k lookups by name and by
//!    address on the result.
//! 2. In the same run, on a running Debian guest (inside the emulated SVM
//!    host on PVM machines): lucos reading the kernel out of guest memory and
//!    decoding it, side by side with the guest reading its own /proc/kallsyms.
//!    Both run under the same emulation, so they compare with each other, not
//!    with part 1.
//!
//! `cargo bench --bench symbols`

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::linux::{kernel_pkg, kernel_release, package_vmlinux, run_scenario_with, Extras};
use symbol_db::{kallsyms, KernelImage};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn native() {
    let data = package_vmlinux();
    let image = KernelImage::from_elf_bytes(&data, "vmlinux").expect("image");
    let mut decode = Vec::new();
    let mut table = None;
    for _ in 0..10 {
        let t = Instant::now();
        let k = kallsyms::decode(&image).expect("kallsyms");
        decode.push(t.elapsed().as_secs_f64() * 1e3);
        table = Some(k.table);
    }
    let table = table.expect("decoded");
    // Lookups spread over the table: unique names, and addresses inside symbols.
    let names: Vec<&str> = table
        .iter()
        .filter(|s| table.all_named(&s.name).len() == 1)
        .map(|s| s.name.as_str())
        .collect();
    let addrs: Vec<u64> = table
        .iter()
        .filter(|s| s.size > 1)
        .map(|s| s.addr + s.size / 2)
        .collect();
    const N: usize = 100_000;
    let step = |len: usize, i: usize| (i * 7919) % len;
    let t = Instant::now();
    for i in 0..N {
        black_box(table.lookup(names[step(names.len(), i)]).expect("name"));
    }
    let by_name = t.elapsed();
    let t = Instant::now();
    for i in 0..N {
        black_box(table.symbolize(addrs[step(addrs.len(), i)]).expect("addr"));
    }
    let by_addr = t.elapsed();
    println!(
        "symbol-db, native, Debian {} image ({} MiB), {} symbols:",
        kernel_release(&kernel_pkg()),
        image.bytes().len() >> 20,
        table.len()
    );
    println!(
        "  kallsyms decode (find tables + expand names), median of 10: {:8.1} ms",
        median(decode)
    );
    println!(
        "  100k lookups by name:    {:8.1} ms ({:.0} ns each)",
        by_name.as_secs_f64() * 1e3,
        by_name.as_nanos() as f64 / N as f64
    );
    println!(
        "  100k lookups by address: {:8.1} ms ({:.0} ns each)",
        by_addr.as_secs_f64() * 1e3,
        by_addr.as_nanos() as f64 / N as f64
    );
}

fn in_guest() {
    // The guest times 5 reads of its own /proc/kallsyms (uptime clock, 10 ms).
    let workload = r#"#!/bin/sh
t0=$(cut -d' ' -f1 /proc/uptime)
for i in 1 2 3 4 5; do cat /proc/kallsyms > /dev/null; done
t1=$(cut -d' ' -f1 /proc/uptime)
echo "@@PROC five_reads_s=$(echo "$t0 $t1" | awk '{print $2 - $1}') lines=$(wc -l < /proc/kallsyms)"
# Until the scenario stops the VM.
while :; do sleep 5; done
"#;
    let scenario = r#"
LOG=/tmp/g.log
$LUCOS run --vm g --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "console=ttyS0 panic=-1 quiet" --serial-log $LOG --quiet --detach >/dev/null
n=0; while ! grep -q "@@PROC" $LOG 2>/dev/null; do sleep 0.5; n=$((n + 1)); [ $n -gt 600 ] && break; done
$LUCOS symbols --vm g --json | tr -d '\n' | sed 's/^/@@LUCOS /'; echo
t0=$(cut -d' ' -f1 /proc/uptime)
for i in 1 2 3 4 5; do $LUCOS symbols --vm g --all > /dev/null; done
t1=$(cut -d' ' -f1 /proc/uptime)
echo "@@CLI five_all_s=$(echo "$t0 $t1" | awk '{print $2 - $1}')"
sed 's/^/G| /' $LOG
$LUCOS stop --vm g >/dev/null
"#;
    let out = run_scenario_with(
        "bench-symbols",
        workload,
        scenario,
        Duration::from_secs(900),
        Extras::default(),
    );
    let json = out
        .text
        .lines()
        .find_map(|l| l.split("@@LUCOS ").nth(1))
        .unwrap_or_else(|| panic!("no answer from lucos:\n{}", out.text));
    let v: serde_json::Value = serde_json::from_str(json).expect("json");
    let t = &v["timings"];
    let proc_s: f64 = out
        .value("@@PROC", "five_reads_s")
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    let cli_s: f64 = out
        .value("@@CLI", "five_all_s")
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    println!(
        "running Debian guest, 2 vCPUs, in {} (same run):",
        out.where_
    );
    println!(
        "  lucos, from outside: read kernel image from guest memory {:.1} ms ({} MiB), decode {:.1} ms, {} symbols",
        t["read_image_us"].as_f64().unwrap_or(f64::NAN) / 1e3,
        t["image_bytes"].as_u64().unwrap_or(0) >> 20,
        t["decode_us"].as_f64().unwrap_or(f64::NAN) / 1e3,
        v["count"]
    );
    println!(
        "  lucos symbols --all (CLI, socket, JSON, print), per call: {:.0} ms",
        cli_s / 5.0 * 1e3
    );
    println!(
        "  reference, the guest reading its own /proc/kallsyms, per read: {:.0} ms ({} lines)",
        proc_s / 5.0 * 1e3,
        out.value("@@PROC", "lines").unwrap_or_default()
    );
}

fn main() {
    native();
    in_guest();
}
