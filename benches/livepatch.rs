//! lucos live patching against Linux's own livepatch, in the same Debian 6.1
//! guest (2 vCPUs) in the same run, doing the same change: 1 and then 10
//! `/proc` show functions replaced by functions that print one fixed line.
//!
//! - lucos: `.lup` patches built by `lucos build --kbuild` against the pinned
//!   linux-headers, applied and reverted from outside by `lucos patch` and
//!   `lucos revert`. Figures from the VMM: the pause (every vCPU out of the
//!   guest) and the whole operation (request to reply: verify, link, place,
//!   pause and switch).
//! - Linux livepatch: modules with a `klp_patch` of the same functions, built
//!   by kbuild against the same headers, loaded in the guest with
//!   finit_module and timed there (guest-kernels/linux/bench/klptime.c):
//!   insmod (module load and `klp_enable_patch`, ftrace patching the sites)
//!   and until `/sys/kernel/livepatch/NAME/transition` reads 0 (every task
//!   switched); revert = writing 0 to `enabled` until the transition ends.
//! - For both: the longest stall a guest user task saw while spinning on
//!   CLOCK_MONOTONIC in a window around each operation, and the same in a
//!   window with nothing happening (the noise floor).
//!
//! Every operation is checked: the ten /proc files show the patched text
//! exactly when they should, or the benchmark fails.
//!
//! `cargo bench --bench livepatch` (LUCOS_BENCH_RUNS sets the runs, default 3).
//! With `LUCOS_BENCH_BASELINE=PATH` (another lucos binary, say the build
//! before a change), a second guest run by that binary gets the same lucos
//! rounds, and its figures are printed beside this build's: before and
//! after, in one run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::bench::{
    body, build_klptime, klp_module, lucos_source, median, number as get, runs, FUNCS,
};
use common::linux::{
    kbuild_dir, kernel_pkg, kernel_release, package_vmlinux, run_scenario_with, Extras,
};

/// A livepatch module replacing the same functions (the kernel's
/// samples/livepatch shape: a klp_patch of one klp_object, vmlinux).
fn klp_source(n: usize) -> String {
    let mut defs = String::new();
    for (f, file) in &FUNCS[..n] {
        defs += &format!(
            "static int lpb_{f}(struct seq_file *m, void *v)\n{}\n",
            body(file)
        );
    }
    let funcs: Vec<(&str, String)> = FUNCS[..n]
        .iter()
        .map(|(f, _)| (*f, format!("lpb_{f}")))
        .collect();
    klp_module(&defs, &funcs)
}

/// Builds the lucos patches into `files` and the modules and klptime into
/// `guest` (the guest's /files).
fn build_all(dir: &Path, files: &Path, guest: &Path) {
    let kbuild = kbuild_dir();
    let vmlinux = dir.join("vmlinux");
    std::fs::write(&vmlinux, package_vmlinux()).expect("vmlinux");
    let lucos = env!("CARGO_BIN_EXE_lucos");
    let key = files.join("key");
    common::linux::run_ok(Command::new(lucos).arg("keygen").arg("-o").arg(&key));
    let kmod = dir.join("kmod");
    std::fs::create_dir_all(&kmod).expect("kmod dir");
    for n in [1, 10] {
        let src = dir.join(format!("lpb{n}_src.c"));
        std::fs::write(&src, lucos_source(n)).expect("source");
        common::linux::run_ok(
            Command::new(lucos)
                .args(["build", "--kernel"])
                .arg(&vmlinux)
                .arg("--kbuild")
                .arg(&kbuild)
                .args(["--name", &format!("lpb{n}"), "--key"])
                .arg(&key)
                .arg("-o")
                .arg(files.join(format!("lpb{n}.lup")))
                .arg(&src),
        );
    }
    let (k1, k10) = (klp_source(1), klp_source(10));
    common::linux::build_modules(&kbuild, &kmod, &[("lpb1", &k1), ("lpb10", &k10)]);
    for n in [1, 10] {
        std::fs::copy(
            kmod.join(format!("lpb{n}.ko")),
            guest.join(format!("lpb{n}.ko")),
        )
        .expect("module");
    }
    build_klptime(guest);
}

/// The guest: livepatch rounds first (it drives them itself), a window with
/// nothing happening, then one stall-meter window per lucos operation, each
/// announced with `@@ROUND K go` for the scenario to act in.
fn workload(runs: usize) -> String {
    let files: Vec<&str> = FUNCS.iter().map(|(_, f)| *f).collect();
    // The stall meter's window around an operation lasts until the guest
    // sees the operation's effect (the last of its n functions answers, or
    // no longer answers, "lucos-bench"), and 2 s more: it never has to
    // guess how long the host will take.
    format!(
        r#"#!/bin/sh
F=/files
seen() {{ n=0; for f in {files}; do grep -qx "lucos-bench $f" /proc/$f && n=$((n + 1)); done; echo $n; }}
last() {{ [ $1 = 1 ] && echo {first} || echo {tenth}; }}
# window N present|absent: spin until /proc/$(last N) does or does not say so.
window() {{ f=$(last $1); $F/klptime spin 2000 /proc/$f "lucos-bench $f" $2; }}
echo "@@B start seen=$(seen)"
# A guest run by the baseline lucos does only the lucos rounds.
SYS=lucos; grep -q lucos.bench=baseline /proc/cmdline && SYS=baseline
[ $SYS = lucos ] && for r in $(seq 1 {runs}); do
  for n in 1 10; do
    window $n present > /tmp/gap & sp=$!
    sleep 0.5; $F/klptime load $F/lpb$n.ko lpb$n > /tmp/op 2>&1 || kill $sp
    wait $sp; echo "@@B sys=klp op=apply n=$n seen=$(seen) $(cat /tmp/op) $(cat /tmp/gap)"
    window $n absent > /tmp/gap & sp=$!
    sleep 0.5; $F/klptime unload lpb$n > /tmp/op 2>&1 || kill $sp
    wait $sp; echo "@@B sys=klp op=revert n=$n seen=$(seen) $(cat /tmp/op) $(cat /tmp/gap)"
  done
done
[ $SYS = lucos ] && for r in $(seq 1 {runs}); do
  $F/klptime spin 5000 > /tmp/gap; echo "@@B sys=idle op=none n=0 seen=$(seen) $(cat /tmp/gap)"
done
k=0
for r in $(seq 1 {runs}); do
  for n in 1 10; do
    for op in apply revert; do
      k=$((k + 1))
      if [ $op = apply ]; then want=present; else want=absent; fi
      window $n $want > /tmp/gap & sp=$!
      echo "@@ROUND $k go"
      wait $sp; echo "@@B sys=$SYS op=$op n=$n seen=$(seen) $(cat /tmp/gap)"
    done
  done
done
echo "@@B end"
"#,
        files = files.join(" "),
        first = FUNCS[0].1,
        tenth = FUNCS[9].1,
    )
}

/// The emulated host (or this host): runs the guest, and at each round the
/// lucos operation, printing the VMM's figures.
fn scenario(runs: usize) -> String {
    format!(
        r#"
LOG=/tmp/b.serial
await() {{
  w=0
  until grep -q "$1" $LOG; do
    sleep 0.05; w=$((w + 1))
    if [ $w -gt 12000 ]; then echo "@@SCN timeout waiting for $1"; sed 's/^/G| /' $LOG; return 1; fi
  done
}}
# pause_us=.. total_us=.. tries=.. from the JSON reply in /tmp/o, or what it said.
figures() {{
  tr -d ' \n' < /tmp/o | grep -o '"\(pause_us\|total_us\|tries\)":[0-9.]*' | sed 's/"//g; s/:/=/' | tr '\n' ' '
  grep -q '"pause_us"' /tmp/o || tr '\n' ' ' < /tmp/o
}}
# rounds VMM SYS CMDLINE_EXTRA: a guest run by VMM, and its lucos rounds.
rounds() {{
  V=$1 S=$2
  rm -f $LOG
  $V run --vm b --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M \
    --cmdline "console=ttyS0 panic=-1 quiet $3" --serial-log $LOG --trusted-key $FILES/key.pub --quiet --detach
  k=0
  for r in $(seq 1 {runs}); do
    for n in 1 10; do
      k=$((k + 1)); await "@@ROUND $k go" || exit 1
      $V patch --vm b --json $FILES/lpb$n.lup > /tmp/o 2>&1
      echo "@@SCN sys=$S op=apply n=$n $(figures)"
      grep -q '"pause_us"' /tmp/o || exit 1
      k=$((k + 1)); await "@@ROUND $k go" || exit 1
      $V revert --vm b --json lpb$n > /tmp/o 2>&1
      echo "@@SCN sys=$S op=revert n=$n $(figures)"
      grep -q '"pause_us"' /tmp/o || exit 1
    done
  done
  await "@@B end"
  grep "@@B" $LOG
  grep -i "livepatch\|taint" $LOG | sed 's/^/G| /'
  $V stop --vm b >/dev/null 2>&1 || true
  n=0; while $V status --vm b >/dev/null 2>&1; do sleep 0.5; n=$((n + 1)); [ $n -gt 120 ] && break; done
}}
rounds $LUCOS lucos ""
[ -n "$LUCOS_BASELINE" ] && rounds $LUCOS_BASELINE baseline lucos.bench=baseline
"#
    )
}

fn main() {
    let runs = runs();
    let baseline = std::env::var_os("LUCOS_BENCH_BASELINE").map(std::path::PathBuf::from);
    let dir = std::env::temp_dir().join(format!("lucos-bench-livepatch-{}", std::process::id()));
    let (files, guest) = (dir.join("files"), dir.join("guest"));
    std::fs::create_dir_all(&files).expect("dir");
    std::fs::create_dir_all(&guest).expect("dir");
    build_all(&dir, &files, &guest);
    let out = run_scenario_with(
        "bench-livepatch",
        &workload(runs),
        &scenario(runs),
        Duration::from_secs(600 + 240 * runs as u64),
        Extras {
            files: Some(files),
            guest_files: Some(guest),
            baseline: baseline.clone(),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&dir);

    // (system, op, n) -> [figure name -> samples].
    let mut rows: BTreeMap<(String, String, u32), BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    let mut add = |line: &str, keys: &[&'static str]| {
        let key = (
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("sys="))
                .unwrap_or("?")
                .to_owned(),
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("op="))
                .unwrap_or("?")
                .to_owned(),
            get(line, "n").unwrap_or(-1.0) as u32,
        );
        let row = rows.entry(key).or_default();
        for k in keys {
            if let Some(v) = get(line, k) {
                row.entry(k).or_default().push(v);
            }
        }
    };
    for line in out.text.lines() {
        let Some(at) = line.find("@@B sys=").or_else(|| line.find("@@SCN sys=")) else {
            continue;
        };
        let line = &line[at..];
        // Each operation must have done what it says.
        if line.starts_with("@@B") {
            let n = get(line, "n").unwrap_or(-1.0);
            let expect = if line.contains("op=apply") { n } else { 0.0 };
            assert_eq!(
                get(line, "seen"),
                Some(expect),
                "the guest's /proc files do not show what they should after: {line}\n{}",
                out.text
            );
        }
        add(
            line,
            &[
                "pause_us",
                "total_us",
                "tries",
                "insmod_us",
                "max_gap_us",
                "rmmod_done_us",
            ],
        );
    }
    let want = |sys: &str, op: &str, n: u32, k: &str| -> f64 {
        let v = rows
            .get(&(sys.to_owned(), op.to_owned(), n))
            .and_then(|r| r.get(k))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            v.len(),
            runs,
            "{sys} {op} n={n}: {k} measured {} times, not {runs}:\n{}",
            v.len(),
            out.text
        );
        median(v)
    };
    let ms = |us: f64| us / 1e3;
    println!(
        "Live patching Linux {} (2 vCPUs, 256 MiB), lucos against Linux livepatch, \
         same guest, same run, {runs} runs each (medians), on {}",
        kernel_release(&kernel_pkg()),
        out.where_
    );
    println!(
        "{:<6} {:<7} | {:>10} {:>10} {:>11} {:>5} | {:>11} {:>12} {:>11}",
        "funcs",
        "op",
        "lucos",
        "lucos",
        "lucos task",
        "tries",
        "livepatch",
        "livepatch",
        "klp task"
    );
    println!(
        "{:<6} {:<7} | {:>10} {:>10} {:>11} {:>5} | {:>11} {:>12} {:>11}",
        "", "", "pause ms", "total ms", "stall ms", "", "insmod ms", "total ms", "stall ms"
    );
    for n in [1, 10] {
        for op in ["apply", "revert"] {
            println!(
                "{n:<6} {op:<7} | {:>10.3} {:>10.2} {:>11.2} {:>5} | {:>11} {:>12.2} {:>11.2}",
                ms(want("lucos", op, n, "pause_us")),
                ms(want("lucos", op, n, "total_us")),
                ms(want("lucos", op, n, "max_gap_us")),
                want("lucos", op, n, "tries"),
                if op == "apply" {
                    format!("{:.2}", ms(want("klp", op, n, "insmod_us")))
                } else {
                    "-".into()
                },
                ms(want("klp", op, n, "total_us")),
                ms(want("klp", op, n, "max_gap_us")),
            );
        }
    }
    if let Some(b) = &baseline {
        println!(
            "lucos before and after: the baseline {} and this build, same .lup files, one guest \
             each, same emulated host, medians of {runs}",
            b.display()
        );
        println!(
            "{:<6} {:<7} | {:>14} {:>14} | {:>14} {:>14} | {:>12}",
            "funcs",
            "op",
            "before pause",
            "after pause",
            "before total",
            "after total",
            "after/before"
        );
        for n in [1, 10] {
            for op in ["apply", "revert"] {
                let (bt, at) = (
                    want("baseline", op, n, "total_us"),
                    want("lucos", op, n, "total_us"),
                );
                println!(
                    "{n:<6} {op:<7} | {:>11.3} ms {:>11.3} ms | {:>11.2} ms {:>11.2} ms | {:>11.2}x",
                    ms(want("baseline", op, n, "pause_us")),
                    ms(want("lucos", op, n, "pause_us")),
                    ms(bt),
                    ms(at),
                    at / bt
                );
            }
        }
    }
    let idle = rows
        .get(&("idle".to_owned(), "none".to_owned(), 0))
        .and_then(|r| r.get("max_gap_us"))
        .cloned()
        .unwrap_or_default();
    println!(
        "noise floor: longest stall of the same task in a window with nothing happening: {:.2} ms \
         (median), {:.2} ms (max)",
        ms(want("idle", "none", 0, "max_gap_us")),
        ms(idle.iter().cloned().fold(0.0, f64::max))
    );
    println!(
        "pause: every vCPU out of the guest (lucos; livepatch has none). total: lucos from request to \
         reply in the VMM; livepatch from finit_module (or writing enabled=0) until the transition \
         reads 0. task stall: the longest gap a spinning guest task saw in a window around the operation."
    );
}
