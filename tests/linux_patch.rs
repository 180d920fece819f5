//! Live patching a running Debian cloud kernel (KASLR on, 2 vCPUs): patches
//! built by `lucos build` with kbuild against the pinned linux-headers,
//! replacing `cmdline_proc_show` and `meminfo_proc_show`; the guest's
//! /proc/cmdline and /proc/meminfo change and come back on revert. Bad
//! patches are refused with the kernel text byte-identical, and so is a
//! patch of a function a guest task sleeps in (`devkmsg_read`, a reader
//! blocked on /dev/kmsg) until that task has left it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::linux::{
    build_patch, kbuild_dir, kernel_release, other_kernel_pkg, package_vmlinux, run_ok,
    run_scenario_with, vmlinux_of, Extras,
};

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// The replacements: both show what they are, from kernel data and kernel
/// functions the patch links against (saved_command_line, si_meminfo,
/// seq_printf) through the guest's kallsyms.
const FIX: &str = r#"#include <linux/seq_file.h>
#include <linux/init.h>
#include <linux/mm.h>

int cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s lucos.patched=1\n", saved_command_line);
	return 0;
}

int meminfo_proc_show(struct seq_file *m, void *v)
{
	struct sysinfo i;

	si_meminfo(&i);
	seq_printf(m, "MemTotal:       %8lu kB\n", i.totalram << (PAGE_SHIFT - 10));
	seq_printf(m, "MemFree:        %8lu kB\n", i.freeram << (PAGE_SHIFT - 10));
	seq_puts(m, "LucosPatched:          1\n");
	return 0;
}
"#;

/// `/dev/kmsg` reads fail with ENODATA: for the sleeping-task check, a
/// function a guest task sleeps in (a reader waiting for kernel messages).
const KMSGFIX: &str = r#"#include <linux/fs.h>
#include <linux/errno.h>

ssize_t devkmsg_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	return -ENODATA;
}
"#;

const UNKNOWN: &str = r#"#include <linux/seq_file.h>
extern int no_such_kernel_function(struct seq_file *m);
int cmdline_proc_show(struct seq_file *m, void *v)
{
	return no_such_kernel_function(m);
}
"#;

/// The guest prints what the two files say, and what reading /dev/kmsg
/// gives, twice a second. A reader stays blocked inside devkmsg_read (a
/// sleeping task in a function to patch) until the guest sees its command
/// line patched.
const WORKLOAD: &str = r#"#!/bin/sh
cat /dev/kmsg > /dev/null &
reader=$!
echo "@@KMSG reader pid=$reader"
# Until the scenario stops the VM.
while :; do
  echo "@@CMD $(cat /proc/cmdline)"
  echo "@@MEM lines=$(wc -l < /proc/meminfo) last=$(tail -n 1 /proc/meminfo | tr -s ' ')"
  echo "@@KMSG read $(dd if=/dev/kmsg bs=4096 count=1 2>&1 | head -n 1 | cut -c 1-60)"
  if [ -n "$reader" ] && grep -q lucos.patched /proc/cmdline; then
    kill $reader; wait $reader; reader=""; echo "@@KMSG reader gone"
  fi
  sleep 0.5
done
"#;

const SCENARIO: &str = r#"
LOG=/tmp/lx.serial
# The kernel text's and the kernel page tables' hashes, from `lucos list`.
hash_of() { $LUCOS list --vm lx --json | tr -d ' \n' | grep -o "\"$1\":{[^}]*}" | grep -o '"sha256":"[0-9a-f]*"' | cut -d'"' -f4 || true; }
sha() { hash_of kernel_text; }
tables() { hash_of kernel_page_tables; }
wait_for() {
  n=0
  until tail -n 4 $LOG | grep -q "$1"; do
    sleep 0.2; n=$((n + 1))
    if [ $n -gt 600 ]; then echo "@@SCN timeout waiting for $1"; return 1; fi
  done
  return 0
}
up lx $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "$CMDLINE" --trusted-key $FILES/key.pub || exit 1
wait_for "@@CMD" || { sed 's/^/G| /' $LOG; sed 's/^/V| /' $LUCOS_RUN_DIR/lx.log; exit 1; }
$LUCOS list --vm lx --json > /tmp/l 2>&1 || { echo "@@SCN list failed: $(cat /tmp/l)"; }
S0=$(sha); echo "@@SCN sha before $S0"
for p in unsigned tampered otherbuild mismatch unknown; do
  $LUCOS patch --vm lx $FILES/$p.lup > /tmp/o 2>&1; rc=$?
  echo "@@SCN refuse $p rc=$rc sha=$(sha) msg=$(tr '\n' ' ' < /tmp/o)"
done
# With the guest paused (its page tables change while it runs: vmalloc'd
# task stacks), the refusals leave the kernel's page tables identical too.
$LUCOS pause --vm lx >/dev/null
echo "@@SCN paused before sha=$(sha) tables=$(tables)"
for p in unsigned tampered otherbuild mismatch unknown; do
  $LUCOS patch --vm lx $FILES/$p.lup > /tmp/o 2>&1; rc=$?
  echo "@@SCN paused refuse $p rc=$rc sha=$(sha) tables=$(tables)"
done
$LUCOS resume --vm lx >/dev/null
# A task sleeps in devkmsg_read: refused, kernel text unchanged.
wait_for "@@KMSG read"
echo "@@SCN $(grep -o 'reader pid=[0-9]*' $LOG | head -n 1)"
$LUCOS patch --vm lx $FILES/kmsgfix.lup > /tmp/o 2>&1; rc=$?
echo "@@SCN busy rc=$rc sha=$(sha) msg=$(tr '\n' ' ' < /tmp/o)"
# The same patch in immediate mode: the sleeper stays in the old function,
# new reads take the new one at once; the revert then needs nothing to leave.
$LUCOS patch --vm lx --mode immediate $FILES/kmsgfix.lup > /tmp/o 2>&1; echo "@@SCN kmsg immediate rc=$? $(tr '\n' ' ' < /tmp/o)"
wait_for "No data available" && echo "@@SCN kmsg immediate seen patched reader_alive=$(grep -q '@@KMSG reader gone' $LOG && echo no || echo yes)" \
  || { tail -n 60 $LOG | sed 's/^/G| /'; sed 's/^/V| /' $LUCOS_RUN_DIR/lx.log; exit 1; }
$LUCOS revert --vm lx kmsgfix > /tmp/o 2>&1; echo "@@SCN kmsg immediate revert rc=$? $(tr '\n' ' ' < /tmp/o)"
sleep 1; wait_for "@@KMSG read [0-9]," && echo "@@SCN kmsg immediate seen reverted"
$LUCOS patch --vm lx $FILES/procfix.lup > /tmp/o 2>&1; echo "@@SCN apply rc=$? $(tr '\n' ' ' < /tmp/o)"
S1=$(sha); echo "@@SCN sha patched $S1"
wait_for "lucos.patched=1" && wait_for "LucosPatched" && echo "@@SCN seen patched"
# The guest ends the reader once it sees the patched command line.
n=0; until grep -q "@@KMSG reader gone" $LOG; do sleep 0.2; n=$((n + 1)); [ $n -gt 600 ] && break; done
$LUCOS patch --vm lx $FILES/kmsgfix.lup > /tmp/o 2>&1; echo "@@SCN kmsg apply rc=$? $(tr '\n' ' ' < /tmp/o)"
wait_for "No data available" && echo "@@SCN kmsg seen patched"
$LUCOS revert --vm lx kmsgfix > /tmp/o 2>&1; echo "@@SCN kmsg revert rc=$? $(tr '\n' ' ' < /tmp/o)"
sleep 1; wait_for "@@KMSG read [0-9],"  && echo "@@SCN kmsg seen reverted"
tail -n 6 $LOG | grep "@@" | sed 's/^/@@SCN while patched /'
$LUCOS list --vm lx | sed 's/^/@@SCN list /'
$LUCOS revert --vm lx procfix > /tmp/o 2>&1; echo "@@SCN revert rc=$? $(tr '\n' ' ' < /tmp/o)"
# Lines the guest printed from 1 s after the revert on.
sleep 1; n1=$(wc -l < $LOG); sleep 1.5
tail -n +$((n1 + 1)) $LOG | grep "@@" | sed 's/^/@@SCN after revert /'
echo "@@SCN sha after $(sha)"
$LUCOS list --vm lx | grep "patch area" | sed 's/^/@@SCN area after /'
$LUCOS status --vm lx | sed 's/^/@@SCN status /'
sed 's/^/G| /' $LOG | tail -n 20
$LUCOS stop --vm lx >/dev/null
"#;

/// A copy of `vmlinux` changed by `f`.
fn altered(dir: &Path, vmlinux: &[u8], name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut v = vmlinux.to_vec();
    f(&mut v);
    let p = dir.join(name);
    std::fs::write(&p, v).expect("write");
    p
}

#[test]
fn linux_proc_functions_live_patched_and_reverted_bad_patches_refused() {
    let kbuild = kbuild_dir();
    let dir = std::env::temp_dir().join(format!("lucos-patchfiles-{}", std::process::id()));
    let files = dir.join("files");
    std::fs::create_dir_all(&files).expect("dir");
    let vm = package_vmlinux();
    let vmlinux = altered(&dir, &vm, "vmlinux", |_| {});
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_lucos"))
            .args(["keygen", "-o"])
            .arg(files.join("key")),
    );
    let b = |name: &str, src: &str, extra: &[&str], kernel: &Path| {
        build_patch(&files, &kbuild, kernel, name, src, extra)
    };
    b("procfix", FIX, &[], &vmlinux);
    b("unsigned", FIX, &["--unsigned"], &vmlinux);
    b("unknown", UNKNOWN, &[], &vmlinux);
    b("kmsgfix", KMSGFIX, &[], &vmlinux);
    // Tampered: a byte of the signed file flipped.
    let mut t = std::fs::read(files.join("procfix.lup")).expect("lup");
    let at = t.len() - 300;
    t[at] ^= 0x40;
    std::fs::write(files.join("tampered.lup"), t).expect("write");
    // Another build: another known Debian build's kernel while the archive
    // still has one (a real "patch built for another kernel"), else the same
    // image with another build-id.
    let syms = symbol_db::SymbolTable::from_kernel_elf(&vm, "vmlinux").expect("kallsyms");
    let other = match other_kernel_pkg() {
        Some(pkg) => {
            eprintln!("otherbuild: built against {}", kernel_release(&pkg));
            altered(&dir, &vmlinux_of(&pkg), "other.vmlinux", |_| {})
        }
        None => {
            eprintln!(
                "otherbuild: no other known build to be had; the image with another build-id"
            );
            let id = symbol_db::KernelIdentity::from_elf(&vm, "vmlinux").expect("identity");
            let build_id = hex_bytes(id.build_id.as_deref().expect("build-id"));
            altered(&dir, &vm, "other.vmlinux", |v| {
                let at = find(v, &build_id).expect("build-id bytes in the image");
                v[at..at + build_id.len()].fill(0x5a);
            })
        }
    };
    b("otherbuild", FIX, &[], &other);
    // Old bytes differ: cmdline_proc_show altered past its ftrace site.
    let f = syms.lookup("cmdline_proc_show").expect("symbol");
    let off = common::file_offset_of_vaddr(&vm, f.addr + 12);
    let mism = altered(&dir, &vm, "mismatch.vmlinux", |v| v[off] ^= 0xff);
    b("mismatch", FIX, &[], &mism);

    let out = run_scenario_with(
        "patch",
        WORKLOAD,
        &format!("CMDLINE=\"{CMDLINE}\"\n{SCENARIO}"),
        Duration::from_secs(600),
        Extras {
            files: Some(files.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    let line = |prefix: &str| out.line(prefix);
    let sha0 = line("@@SCN sha before ")["@@SCN sha before ".len()..].to_owned();
    assert_eq!(sha0.len(), 64, "{}", out.text);
    for (p, rc, why) in [
        ("unsigned", 6, "is not signed"),
        ("tampered", 6, "signature does not verify"),
        ("otherbuild", 5, "is for another kernel build"),
        ("mismatch", 6, "cmdline_proc_show does not match"),
        ("unknown", 6, "no symbol named 'no_such_kernel_function'"),
    ] {
        let l = line(&format!("@@SCN refuse {p} "));
        assert!(l.contains(&format!("rc={rc} ")), "{l}");
        assert!(l.contains(why), "expected '{why}': {l}");
        assert!(l.contains(&format!("sha={sha0} ")), "text changed: {l}");
    }
    // Paused: the refusals leave the kernel's page tables as they were too.
    let before = line("@@SCN paused before ");
    let field = |l: &str, k: &str| -> String {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_owned()
    };
    let tables0 = field(&before, "tables");
    assert_eq!(tables0.len(), 64, "no page-table hash: {before}");
    assert_eq!(field(&before, "sha"), sha0, "{before}");
    for (p, rc) in [
        ("unsigned", 6),
        ("tampered", 6),
        ("otherbuild", 5),
        ("mismatch", 6),
        ("unknown", 6),
    ] {
        let l = line(&format!("@@SCN paused refuse {p} "));
        assert_eq!(field(&l, "rc"), rc.to_string(), "{l}");
        assert_eq!(field(&l, "sha"), sha0, "text changed: {l}");
        assert_eq!(field(&l, "tables"), tables0, "page tables changed: {l}");
    }
    // A sleeping task inside devkmsg_read holds its patch back, by name.
    let busy = line("@@SCN busy ");
    assert!(busy.contains("rc=7 "), "{busy}\n{}", out.text);
    assert!(
        busy.contains(&format!("sha={sha0} ")),
        "text changed: {busy}"
    );
    let reader = out
        .value("@@SCN reader", "pid")
        .unwrap_or_else(|| panic!("no reader pid:\n{}", out.text));
    assert!(
        busy.contains(&format!(
            "task {reader} (cat) inside a call to devkmsg_read"
        )),
        "{busy}"
    );
    // Immediate mode: the same patch switches at once with the reader
    // asleep in the old function, which goes on running it.
    let imm = line("@@SCN kmsg immediate rc=");
    assert!(
        imm.contains("rc=0") && imm.contains("immediate"),
        "{imm}\n{}",
        out.text
    );
    out.expect("@@SCN kmsg immediate seen patched reader_alive=yes");
    assert!(
        line("@@SCN kmsg immediate revert ").contains("rc=0"),
        "{}",
        out.text
    );
    out.expect("@@SCN kmsg immediate seen reverted");
    let apply = line("@@SCN apply ");
    assert!(apply.contains("rc=0"), "{}", out.text);
    assert!(
        apply.contains("2 functions switched in one pause"),
        "{apply}"
    );
    assert_ne!(
        line("@@SCN sha patched "),
        format!("@@SCN sha patched {sha0}")
    );
    out.expect("@@SCN seen patched");
    let cmd = format!("@@CMD {CMDLINE} lucos.patched=1");
    assert!(out.text.lines().any(|l| l.ends_with(&cmd)), "{}", out.text);
    out.expect("@@MEM lines=3 last=LucosPatched: 1");
    assert!(apply.contains("sleeping tasks checked"), "{apply}");
    // Once the reader is gone the same patch goes in, and comes out again.
    let kmsg = line("@@SCN kmsg apply ");
    assert!(kmsg.contains("rc=0"), "{kmsg}\n{}", out.text);
    out.expect("@@SCN kmsg seen patched");
    assert!(line("@@SCN kmsg revert ").contains("rc=0"), "{}", out.text);
    out.expect("@@SCN kmsg seen reverted");
    assert!(line("@@SCN revert ").contains("rc=0"), "{}", out.text);
    // After the revert the guest reads the kernel's own files again.
    let after: Vec<&str> = out
        .text
        .lines()
        .filter(|l| l.starts_with("@@SCN after revert "))
        .collect();
    assert!(
        after
            .iter()
            .any(|l| l.ends_with(&format!("@@CMD {CMDLINE}"))),
        "{}",
        out.text
    );
    assert!(
        after
            .iter()
            .all(|l| !l.contains("patched") && !l.contains("Lucos")),
        "{after:?}"
    );
    assert_eq!(line("@@SCN sha after "), format!("@@SCN sha after {sha0}"));
    // Sleeping tasks were checked at each revert, so both patches' code was freed.
    assert_eq!(
        line("@@SCN area after "),
        "@@SCN area after patch area  0 of 2097152 bytes in use"
    );
    assert!(line("@@SCN status ").contains("running"), "{}", out.text);
    eprintln!("{busy}\n{apply}\n{}", line("@@SCN revert "));
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len() / 2)
        .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Two functions: `/dev/kmsg` reads fail with ENODATA, and /proc/version
/// says it is patched.
const TWOFIX: &str = r#"#include <linux/fs.h>
#include <linux/errno.h>
#include <linux/seq_file.h>

ssize_t devkmsg_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	return -ENODATA;
}

int version_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-immediate\n");
	return 0;
}
"#;

/// 24 readers asleep in `devkmsg_read`. Once the guest sees the patched
/// reader (its own read fails with ENODATA), it wakes them with a message:
/// each finishes that read in the old function and exits on its next read
/// (new function, ENODATA). Then it reports how many exited and whether the
/// kernel logged anything bad.
const SLEEPERS: &str = r#"#!/bin/sh
bad='Oops|WARNING|BUG|Call Trace|general protection'
echo "@@DMESG before=$(dmesg | grep -cE "$bad")"
dmesg | grep -E "$bad" | head -n 5 | sed 's/^/@@DMESG before: /'
readers=""
for i in $(seq 1 24); do cat /dev/kmsg > /dev/null 2>/tmp/r$i.err & readers="$readers $!"; done
echo "@@KMSG readers=$(echo $readers | wc -w)"
# Until every reader sleeps in devkmsg_read (a slow machine takes a while).
asleep() { for p in $readers; do cat /proc/$p/wchan; echo; done | grep -c devkmsg_read; }
n=0; until [ "$(asleep)" -eq 24 ] || [ $n -gt 600 ]; do sleep 0.1; n=$((n + 1)); done
echo "@@KMSG asleep=$(asleep)"
woken=""
while :; do
  r=$(dd if=/dev/kmsg bs=4096 count=1 2>&1 | head -n 1 | cut -c 1-60)
  echo "@@KMSG read $r"
  echo "@@VER $(head -c 40 /proc/version)"
  case "$r" in *"No data available"*)
    if [ -z "$woken" ]; then
      woken=1
      echo "lucos wake" > /dev/kmsg
      n=0; for p in $readers; do wait $p; n=$((n + 1)); done
      echo "@@KMSG readers exited=$n nodata=$(cat /tmp/r*.err | grep -c 'No data available')"
      echo "@@DMESG bad=$(dmesg | grep -cE "$bad")"
      dmesg | grep -E "$bad" | head -n 10 | sed 's/^/@@DMESG line: /'
    fi;;
  esac
  sleep 0.5
done
"#;

const SLEEPERS_SCENARIO: &str = r#"
LOG=/tmp/lx.serial
wait_log() {
  n=0
  until grep -q "$1" $LOG; do
    sleep 0.2; n=$((n + 1))
    if [ $n -gt 900 ]; then echo "@@SCN timeout waiting for $1"; return 1; fi
  done
}
up lx $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "$CMDLINE" --trusted-key $FILES/key.pub || exit 1
wait_log "@@KMSG asleep=" || exit 1
grep "@@KMSG asleep=" $LOG | sed 's/^/@@SCN /'
# Consistent mode: every try finds the sleepers; refused, by name.
$LUCOS patch --vm lx $FILES/twofix.lup > /tmp/o 2>&1; echo "@@SCN consistent rc=$? $(tr '\n' ' ' < /tmp/o)"
# Immediate mode: one pause, the sleepers left where they are.
$LUCOS patch --vm lx --mode immediate --json $FILES/twofix.lup > /tmp/o 2>&1; echo "@@SCN immediate rc=$? $(tr -d '\n ' < /tmp/o)"
wait_log "@@VER lucos-immediate" && echo "@@SCN version patched"
wait_log "@@DMESG bad=" && sleep 0.5 && grep -E "@@KMSG readers exited|@@DMESG" $LOG | sed 's/^/@@SCN /'
$LUCOS revert --vm lx twofix > /tmp/o 2>&1; echo "@@SCN revert rc=$? $(tr '\n' ' ' < /tmp/o)"
n1=$(wc -l < $LOG); sleep 1.5
tail -n +$((n1 + 1)) $LOG | grep "@@VER" | tail -n 1 | sed 's/^/@@SCN after revert /'
$LUCOS status --vm lx | sed 's/^/@@SCN status /'
$LUCOS stop --vm lx >/dev/null
"#;

#[test]
fn linux_immediate_mode_switches_in_one_pause_with_dozens_of_tasks_asleep_in_the_old_code() {
    let kbuild = kbuild_dir();
    let dir = std::env::temp_dir().join(format!("lucos-sleepers-{}", std::process::id()));
    let files = dir.join("files");
    std::fs::create_dir_all(&files).expect("dir");
    let vm = package_vmlinux();
    let vmlinux = altered(&dir, &vm, "vmlinux", |_| {});
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_lucos"))
            .args(["keygen", "-o"])
            .arg(files.join("key")),
    );
    build_patch(&files, &kbuild, &vmlinux, "twofix", TWOFIX, &[]);
    let out = run_scenario_with(
        "sleepers",
        SLEEPERS,
        &format!("CMDLINE=\"{CMDLINE}\"\n{SLEEPERS_SCENARIO}"),
        Duration::from_secs(600),
        Extras {
            files: Some(files.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    let line = |prefix: &str| out.line(prefix);
    assert_eq!(
        out.value("@@SCN @@KMSG asleep", "asleep").as_deref(),
        Some("24"),
        "{}",
        out.text
    );
    // Consistent: refused after its tries, naming the sleepers.
    let c = line("@@SCN consistent ");
    assert!(c.contains("rc=7 "), "{c}\n{}", out.text);
    assert!(
        c.contains("(cat) inside a call to devkmsg_read") && c.contains("more tasks there too"),
        "{c}"
    );
    let others: usize = c
        .split("; ")
        .find_map(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(others >= 23, "the other sleepers are counted: {c}");
    // Immediate: in effect after one pause, both functions.
    let i = line("@@SCN immediate ");
    assert!(i.contains("rc=0 "), "{i}\n{}", out.text);
    let r: serde_json::Value =
        serde_json::from_str(&i[i.find('{').unwrap_or(0)..]).expect("the report as JSON");
    assert_eq!(r["tries"], 1, "one pause: {i}");
    assert_eq!(r["mode"], "immediate", "{i}");
    let switched: Vec<&str> = r["functions"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f["function"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(switched, ["devkmsg_read", "version_proc_show"], "{i}");
    // One-instruction sites: nothing to look for inside them, so no task
    // was walked and the pause does not grow with the guest's tasks.
    assert_eq!(r["sleeping_tasks_checked"], 0, "{i}");
    eprintln!(
        "immediate apply with 24 sleepers: pause {} µs",
        r["pause_us"]
    );
    out.expect("@@SCN version patched");
    // The sleepers woke in the old function, finished that read, and left
    // on their next one (new function); the kernel logged nothing bad.
    let e = line("@@SCN @@KMSG readers exited=");
    assert!(e.contains("exited=24 nodata=24"), "{e}\n{}", out.text);
    // Nothing new in the kernel log (the boot's own warnings, from the
    // emulated CPU, were there before).
    let before = out.value("@@SCN @@DMESG", "before");
    assert!(before.is_some(), "{}", out.text);
    assert_eq!(out.value("@@SCN @@DMESG", "bad"), before, "{}", out.text);
    assert!(line("@@SCN revert ").contains("rc=0 "), "{}", out.text);
    let after = line("@@SCN after revert ");
    assert!(after.contains("@@VER Linux version"), "{after}");
    assert!(line("@@SCN status ").contains("running"), "{}", out.text);
}
