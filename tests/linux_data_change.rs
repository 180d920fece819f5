//! A live data-layout change in a running Debian cloud kernel (KASLR on, 2
//! vCPUs, in the emulated SVM host on PVM machines): `files_stat`, the
//! file-local `struct files_stat_struct` of fs/file_table.c, gains a member
//! (`nr_reads`) that the patched `proc_nr_files` maintains and shows as a
//! fourth field of /proc/sys/fs/file-nr. The old copy stays in use by
//! unpatched code (`get_max_files`) and through the sysctl table's pointers
//! (/proc/sys/fs/file-max reads and writes it), so lucos keeps the copies
//! coherent both ways while the guest reads file-nr in a loop on the other
//! vCPU: a value written to file-max (old copy) shows in file-nr (new
//! copy), and a value the patched code writes (a floor on max_files) shows
//! in file-max. That change never retires (kernel data points into the
//! object). A cumulative patch lays it out a third way (one more member)
//! in one switch, undoing the first change and making its own from the old
//! copy, while the guest goes on reading: the member both added goes on
//! counting. Revert brings the old layout back with the values kept.
//!
//! Then the same change once more, now with every function that uses the
//! object replaced and the sysctl table's pointers moved to the new copy
//! (`--repoint`): it retires while the guest goes on writing file-max (no
//! more traps, nothing transferred, the values written after retirement
//! show through both the repointed table and the patched reader), and its
//! revert after retirement brings the old layout back with the last value
//! written. Until then a module holds a pointer into `files_stat` in its
//! own memory (given at load): the change keeps tracking, held back by that
//! word, named, until the guest drops it.
//!
//! In a guest of its own, a layout change built from a source diff (`lucos
//! build --diff --data`): fs/dcache.c's file-local `dentry_stat` gains a
//! member and has one renamed, carried by C transfer functions the diff
//! adds.

mod common;

use std::process::Command;
use std::time::Duration;

use common::linux::{
    build_modules, build_patch, kbuild_dir, package_vmlinux, run_ok, run_scenario_with, Extras,
};

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// A module holding a pointer into kernel data in its own memory (a
/// module parameter: given at load, dropped by writing 0).
const HOLDPTR: &str = r#"#include <linux/module.h>
#include <linux/moduleparam.h>

static unsigned long addr;
module_param(addr, ulong, 0600);
MODULE_LICENSE("GPL");
"#;

/// The new layout and the new reader; `files_stat` and the per-CPU counter
/// `nr_files` are the kernel's (file-local symbols, resolved through
/// kallsyms).
const FSFIX: &str = r#"#include <linux/sysctl.h>
#include <linux/percpu_counter.h>

struct files_stat_struct {
	unsigned long nr_files;
	unsigned long nr_free_files;
	unsigned long max_files;
	unsigned long nr_reads;
};

extern struct files_stat_struct files_stat;
extern struct percpu_counter nr_files;

#define LUCOS_MIN_FILES 8192

int proc_nr_files(struct ctl_table *table, int write, void *buffer, size_t *lenp, loff_t *ppos)
{
	struct ctl_table t = *table;

	files_stat.nr_files = percpu_counter_read_positive(&nr_files);
	if (files_stat.max_files < LUCOS_MIN_FILES)
		files_stat.max_files = LUCOS_MIN_FILES;
	files_stat.nr_reads++;
	t.data = &files_stat;
	t.maxlen = sizeof(files_stat);
	return proc_doulongvec_minmax(&t, write, buffer, lenp, ppos);
}

/* The old layout, for the transfer functions. */
struct files_stat_struct_v1 {
	unsigned long nr_files;
	unsigned long nr_free_files;
	unsigned long max_files;
};

/* file-max is carried across by C (compiled with the kernel's flags, run
 * by the VMM on every trapped write to either copy). */
void lucos_to_new_files_stat(const struct files_stat_struct_v1 *old,
			     struct files_stat_struct *new)
{
	new->max_files = old->max_files;
}

void lucos_to_old_files_stat(const struct files_stat_struct *new,
			     struct files_stat_struct_v1 *old)
{
	old->max_files = new->max_files;
}
"#;

/// With [`FSFIX`], the change with every user of the object replaced: the
/// two users it leaves, `get_max_files` and `alloc_empty_file` (their code
/// as in fs/file_table.c, compiled against the new layout).
const FSALL_USERS: &str = r#"
#include <linux/capability.h>
#include <linux/err.h>

struct file;
struct cred;
struct file *__alloc_file(int flags, const struct cred *cred);

unsigned long get_max_files(void)
{
	return files_stat.max_files;
}

struct file *alloc_empty_file(int flags, const struct cred *cred)
{
	static long old_max;
	struct file *f;

	if (percpu_counter_read_positive(&nr_files) >= files_stat.max_files &&
	    !capable(CAP_SYS_ADMIN)) {
		if (percpu_counter_sum_positive(&nr_files) >= files_stat.max_files)
			goto over;
	}
	f = __alloc_file(flags, cred);
	if (!IS_ERR(f))
		percpu_counter_inc(&nr_files);
	return f;
over:
	if (percpu_counter_read_positive(&nr_files) > old_max) {
		pr_info("VFS: file-max limit %lu reached\n", get_max_files());
		old_max = percpu_counter_read_positive(&nr_files);
	}
	return ERR_PTR(-ENFILE);
}
"#;

/// The C transfer functions the dentry_stat diff adds (before
/// `get_nr_dentry`): the renamed member, both ways.
const DENTRY_TRANSFER: &str = r#"struct dentry_stat_v1 {
	long nr_dentry, nr_unused, age_limit, want_pages, nr_negative, dummy;
};

void lucos_to_new_dentry_stat(const struct dentry_stat_v1 *old, struct dentry_stat_t *new)
{
	new->shown = old->dummy;
}

void lucos_to_old_dentry_stat(const struct dentry_stat_t *new, struct dentry_stat_v1 *old)
{
	old->dummy = new->shown;
}

static long get_nr_dentry(void)"#;

/// Reads file-nr in a loop on one side; on the other, prints file-nr and
/// file-max, and once file-nr has the new field, writes file-max both ways
/// and reports what each view says. After that change's revert (3 fields),
/// once file-nr has 4 fields again (the second change) it writes a new
/// file-max at every step and reports both views; when the fields are 3
/// again (reverted), the last value it wrote and what file-max says.
const WORKLOAD: &str = r#"#!/bin/sh
(while :; do cat /proc/sys/fs/file-nr > /dev/null; done) &
addr=$(grep ' files_stat$' /proc/kallsyms | cut -d' ' -f1)
insmod /files/holdptr.ko addr=0x$addr && echo "@@HOLD addr=$addr"
step=0; k=0; v=0; dropped=0
while :; do
  if [ $dropped = 0 ] && grep -q step-done-drop /proc/sys/kernel/domainname; then
    echo 0 > /sys/module/holdptr/parameters/addr; dropped=1
    echo "@@DROPPED $(cat /sys/module/holdptr/parameters/addr)"
  fi
  fnr=$(tr -s ' \t' ' ' < /proc/sys/fs/file-nr); max=$(cat /proc/sys/fs/file-max)
  echo "@@FNR $fnr MAX $max"
  set -- $fnr
  if [ $# -eq 4 ] && [ $step = 0 ]; then
    step=1
    echo 424242 > /proc/sys/fs/file-max
    set -- $(cat /proc/sys/fs/file-nr)
    echo "@@OLD2NEW file_max=$(cat /proc/sys/fs/file-max) file_nr_max=$3 fields=$#"
    echo 100 > /proc/sys/fs/file-max
    a=$(cat /proc/sys/fs/file-max)
    set -- $(cat /proc/sys/fs/file-nr)
    echo "@@NEW2OLD read_back=$a file_nr_max=$3 file_max=$(cat /proc/sys/fs/file-max)"
    r1=$4; set -- $(cat /proc/sys/fs/file-nr)
    echo "@@READS first=$r1 then=$4"
  elif [ $# -eq 3 ] && [ $step = 1 ]; then
    step=2
  elif [ $# -eq 4 ] && [ $step -ge 2 ]; then
    step=3; k=$((k + 1)); v=$((300000 + k))
    echo $v > /proc/sys/fs/file-max
    set -- $(cat /proc/sys/fs/file-nr)
    echo "@@ALL k=$k wrote=$v file_nr_max=$3 file_max=$(cat /proc/sys/fs/file-max) fields=$#"
  elif [ $# -eq 3 ] && [ $step = 3 ]; then
    step=4
    echo "@@REVERTED last=$v file_max=$max file_nr_max=$3"
  fi
  sleep 0.3
done
"#;

const SCENARIO: &str = r#"
LOG=/tmp/lx.serial
# gone ID: true (after showing why) if the VM is not running any more.
gone() {
  $LUCOS status --vm $1 >/dev/null 2>&1 && return 1
  echo "@@SCN $1 gone"; tail -n 60 $LUCOS_RUN_DIR/$1.log | sed 's/^/V| /'; tail -n 40 $LOG | sed 's/^/G| /'
}
# stuck WHAT: what lucos's process and the guest were doing when WHAT
# did not come (a hang shows here, not as a silent emulated host).
stuck() {
  echo "@@SCN stuck: $1"; dump_vm lx; tail -n 80 $LUCOS_RUN_DIR/lx.log | sed 's/^/V| /'
  tail -n 20 $LOG | sed 's/^/G| /'
}
wait_log() { seen $LOG "$1" || { stuck "$1"; return 1; }; }
# bounded ARGS: `lucos ARGS` into /tmp/o, its exit code in $rc; one that
# has not returned after 120 s is stopped and shown.
bounded() {
  timeout 120 $LUCOS "$@" > /tmp/o 2>&1; rc=$?
  if [ $rc = 124 ] || [ $rc = 143 ]; then stuck "lucos $*"; fi
}
# list: `lucos list --json` on one line into /tmp/l (bounded: a VMM that
# does not answer is shown).
list() {
  timeout 60 $LUCOS list --vm lx --json > /tmp/l.json 2>&1 || stuck "lucos list"
  tr -d '\n ' < /tmp/l.json > /tmp/l
}
T0=$(date +%s)
# (The prelude's heartbeat tells a frozen host from a lucos command that
# does not return: those are bounded here, and shown.)
up lx $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "$CMDLINE" --trusted-key $FILES/key.pub || exit 1
wait_log "@@FNR" || exit 1
echo "@@SCN time up $(($(date +%s) - T0)) s"
grep "@@HOLD" $LOG | sed 's/^/@@SCN /'
bounded patch --vm lx --json $FILES/fsfix.lup; echo "@@SCN apply rc=$rc $(tr -d '\n ' < /tmp/o)"
echo "@@SCN time apply $(($(date +%s) - T0)) s"
wait_log "@@READS" && grep -E "@@OLD2NEW|@@NEW2OLD|@@READS" $LOG | sed 's/^/@@SCN /'
sleep 1
echo "@@SCN list $($LUCOS list --vm lx --json | tr -d '\n ')"
grep "@@FNR" $LOG | tail -n 1 | sed 's/^/@@SCN before replace /'
bounded patch --vm lx --replace --json $FILES/fsfix2.lup; echo "@@SCN replace rc=$rc $(tr -d '\n ' < /tmp/o)"
n0=$(wc -l < $LOG); seen_after $LOG $n0 "@@FNR" 2
tail -n +$((n0 + 1)) $LOG | grep "@@FNR" | tail -n 1 | sed 's/^/@@SCN after replace /'
echo "@@SCN list replaced $($LUCOS list --vm lx --json | tr -d '\n ')"
bounded revert --vm lx fsfix2; echo "@@SCN revert rc=$rc $(tr '\n' ' ' < /tmp/o)"
echo "@@SCN time revert $(($(date +%s) - T0)) s"
n1=$(wc -l < $LOG); seen_after $LOG $n1 "@@FNR" 2
tail -n +$((n1 + 1)) $LOG | grep "@@FNR" | tail -n 1 | sed 's/^/@@SCN after revert /'
echo "@@SCN list after $($LUCOS list --vm lx --json | tr -d '\n ')"
bounded patch --vm lx --json $FILES/fsall.lup; echo "@@SCN apply2 rc=$rc $(tr -d '\n ' < /tmp/o)"
i=0
while :; do
  list
  grep -q 'memoryholdingapointerintofiles_stat' /tmp/l && break
  gone lx && break
  grep -q '"state":"retired"' /tmp/l && break
  i=$((i + 1)); [ $i -gt 600 ] && { stuck "held"; break; }
  [ $((i % 20)) -eq 0 ] && echo "@@SCN still waiting for held ($((i / 2)) s)"
  sleep 0.5
done
echo "@@SCN held $(cat /tmp/l)"
echo "@@SCN time held $(($(date +%s) - T0)) s"
bounded patch --vm lx $FILES/drop.lup; echo "@@SCN drop rc=$rc $(tr '\n' ' ' < /tmp/o)"
wait_log "@@DROPPED" && grep "@@DROPPED" $LOG | sed 's/^/@@SCN /'
i=0
while :; do
  list
  grep -q '"state":"retired"' /tmp/l && break
  gone lx && break
  i=$((i + 1)); [ $i -gt 600 ] && { stuck "retired"; break; }
  [ $((i % 20)) -eq 0 ] && echo "@@SCN still waiting for retirement ($((i / 2)) s)"
  sleep 0.5
done
echo "@@SCN retired $(cat /tmp/l)"
echo "@@SCN time retired $(($(date +%s) - T0)) s"
$LUCOS status --vm lx | grep -o "writes trapped [0-9]*" | sed 's/^/@@SCN at retirement /'
n3=$(wc -l < $LOG); j=0
until tail -n +$((n3 + 1)) $LOG | grep -q "@@ALL.*fields=4"; do
  sleep 0.2; j=$((j + 1)); [ $j -gt 900 ] && { stuck "@@ALL after retirement"; break; }
  [ $((j % 100)) -eq 0 ] && echo "@@SCN still waiting for @@ALL ($((j / 5)) s)"
done
tail -n +$((n3 + 1)) $LOG | grep "@@ALL.*fields=4" | head -n 1 | sed 's/^/@@SCN after retire /'
echo "@@SCN list retired $($LUCOS list --vm lx --json | tr -d '\n ')"
$LUCOS status --vm lx | grep -o "writes trapped [0-9]*" | sed 's/^/@@SCN later /'
timeout 90 $LUCOS revert --vm lx fsall > /tmp/o 2>&1; rc=$?; echo "@@SCN revert2 rc=$rc $(tr '\n' ' ' < /tmp/o)"
if [ $rc = 124 ] || [ $rc = 143 ]; then stuck "revert2"; fi
echo "@@SCN time revert2 $(($(date +%s) - T0)) s"
wait_log "@@REVERTED" && grep "@@REVERTED" $LOG | sed 's/^/@@SCN /'
$LUCOS status --vm lx | sed 's/^/@@SCN status /'
$LUCOS stop --vm lx >/dev/null
"#;

#[test]
fn linux_files_stat_gets_a_new_member_live_kept_coherent_both_ways_and_reverted() {
    let kbuild = kbuild_dir();
    let dir = std::env::temp_dir().join(format!("lucos-ldata-{}", std::process::id()));
    let files = dir.join("files");
    std::fs::create_dir_all(&files).expect("dir");
    let vmlinux = dir.join("vmlinux");
    std::fs::write(&vmlinux, package_vmlinux()).expect("vmlinux");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_lucos"))
            .args(["keygen", "-o"])
            .arg(files.join("key")),
    );
    build_patch(
        &files,
        &kbuild,
        &vmlinux,
        "fsfix",
        FSFIX,
        &["--data", "files_stat:files_stat_struct"],
    );
    // A third layout (one more member), by a cumulative patch: it undoes
    // fsfix's change and makes its own in one switch; `nr_reads`, added by
    // both, keeps counting from where fsfix's code left it (not from this
    // patch's start value).
    build_patch(
        &files,
        &kbuild,
        &vmlinux,
        "fsfix2",
        &FSFIX
            .replace(
                "\tunsigned long nr_reads;\n};",
                "\tunsigned long nr_reads;\n\tunsigned long nr_writes;\n};",
            )
            .replace(
                "\tfiles_stat.nr_reads++;\n",
                "\tfiles_stat.nr_reads++;\n\tif (write)\n\t\tfiles_stat.nr_writes++;\n",
            ),
        &[
            "--data",
            "files_stat:files_stat_struct",
            "--init",
            "files_stat.nr_reads=1000000000",
        ],
    );
    build_patch(
        &files,
        &kbuild,
        &vmlinux,
        "fsall",
        &format!("{FSFIX}{FSALL_USERS}"),
        &[
            "--data",
            "files_stat:files_stat_struct",
            "--repoint",
            "files_stat",
        ],
    );
    // Retirement on hold: a module holds a pointer into files_stat in its
    // memory, given at load from /proc/kallsyms (as a driver that saved
    // one would), until a patch signals the guest to drop it.
    build_patch(
        &files,
        &kbuild,
        &vmlinux,
        "drop",
        &common::bench::step_signal_source("drop"),
        &[],
    );
    let (kmod, guest) = (dir.join("kmod"), dir.join("guest"));
    for d in [&kmod, &guest] {
        std::fs::create_dir_all(d).expect("dir");
    }
    build_modules(&kbuild, &kmod, &[("holdptr", HOLDPTR)]);
    std::fs::copy(kmod.join("holdptr.ko"), guest.join("holdptr.ko")).expect("module");
    let inspect = |name: &str| {
        let shown = Command::new(env!("CARGO_BIN_EXE_lucos"))
            .arg("inspect")
            .arg(files.join(format!("{name}.lup")))
            .output()
            .expect("inspect");
        String::from_utf8_lossy(&shown.stdout).into_owned()
    };
    // Every user replaced, both pointers of the sysctl table moved: none
    // left (`file-nr`'s .data to the start, `file-max`'s to max_files).
    let all = inspect("fsall");
    assert!(!all.contains("still used by"), "{all}");
    for what in [
        "repoint   fs_stat_sysctls+0x8: files_stat+0x0 -> new copy +0x0",
        "repoint   fs_stat_sysctls+0x48: files_stat+0x10 -> new copy +0x10",
    ] {
        assert!(all.contains(what), "inspect shows {what}:\n{all}");
    }
    let shown = inspect("fsfix");
    for what in [
        "files_stat (struct files_stat_struct x 1): 24 -> 32 bytes each",
        "nr_reads",
        "get_max_files",
        "data fs_stat_sysctls+",
        "by C",
        "lucos_to_new_files_stat / lucos_to_old_files_stat",
    ] {
        assert!(shown.contains(what), "inspect shows {what}:\n{shown}");
    }
    let out = run_scenario_with(
        "ldata",
        WORKLOAD,
        &format!("CMDLINE=\"{CMDLINE}\"\n{SCENARIO}"),
        Duration::from_secs(600),
        Extras {
            files: Some(files.clone()),
            guest_files: Some(guest.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    let line = |prefix: &str| out.line(prefix);
    let apply = line("@@SCN apply ");
    assert!(apply.contains("rc=0 "), "{apply}\n{}", out.text);
    // Old copy written (file-max, through the sysctl table): the new copy
    // has it at once.
    let o2n = line("@@SCN @@OLD2NEW ");
    assert!(
        o2n.contains("file_max=424242 file_nr_max=424242 fields=4"),
        "{o2n}"
    );
    // 100 written to file-max (old copy); new code raises max_files to its
    // floor in the new copy (the reader on the other vCPU may do it before
    // this one reads): the old copy has that value too, which only a
    // transfer from the new copy can have put there.
    let n2o = line("@@SCN @@NEW2OLD ");
    assert!(n2o.contains("file_nr_max=8192 file_max=8192"), "{n2o}");
    let first: u64 = out
        .value("@@SCN @@READS", "first")
        .and_then(|v| v.parse().ok())
        .expect("reads");
    let then: u64 = out
        .value("@@SCN @@READS", "then")
        .and_then(|v| v.parse().ok())
        .expect("reads");
    assert!(first > 0 && then > first, "the new member counts reads");
    // Tracking, with writes transferred; it never retires (kernel data and
    // unpatched code use the old copy).
    let l = line("@@SCN list {");
    let v: serde_json::Value = serde_json::from_str(&l["@@SCN list ".len()..]).expect("list json");
    let d = &v["patches"][0]["data"][0];
    assert_eq!(d["symbol"], "files_stat", "{l}");
    assert_eq!(d["stats"]["state"], "tracking", "{l}");
    assert!(d["stats"]["transfers"].as_u64().unwrap_or(0) > 0, "{l}");
    assert_eq!(d["stats"]["failures"], 0, "{l}");
    // file-max went across both ways through the C functions, compiled
    // for the Debian kernel and interpreted by the VMM.
    assert_eq!(d["stats"]["c_engine"], "interpreter", "{l}");
    let users = d["users_left"].to_string();
    assert!(
        users.contains("get_max_files") && users.contains("fs_stat_sysctls+"),
        "{l}"
    );
    // Laid out a third way by a cumulative patch while the guest reads
    // file-nr on one vCPU: the reads fsfix counted go on being counted.
    assert!(line("@@SCN replace ").contains("rc=0 "), "{}", out.text);
    let reads = |prefix: &str| -> u64 {
        let l = line(prefix);
        l.split("@@FNR ")
            .nth(1)
            .and_then(|s| s.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no fourth field: {l}"))
    };
    let (before, after) = (
        reads("@@SCN before replace "),
        reads("@@SCN after replace "),
    );
    assert!(
        after >= before && after < 1_000_000_000,
        "nr_reads {before} before the replace, {after} after"
    );
    let replaced = line("@@SCN list replaced ");
    let v: serde_json::Value =
        serde_json::from_str(&replaced["@@SCN list replaced ".len()..]).expect("list json");
    let d = &v["patches"][0]["data"][0];
    assert_eq!(v["patches"][0]["name"], "fsfix2", "{replaced}");
    assert_eq!(d["new_bytes"], 40, "{replaced}");
    assert_eq!(d["stats"]["state"], "tracking", "{replaced}");
    assert_eq!(d["stats"]["failures"], 0, "{replaced}");
    // Revert: the old layout (3 fields), the value kept.
    assert!(line("@@SCN revert ").contains("rc=0 "), "{}", out.text);
    let after = line("@@SCN after revert ");
    let fields: Vec<&str> = after
        .split("@@FNR ")
        .nth(1)
        .and_then(|s| s.split(" MAX ").next())
        .map(|s| s.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(fields.len(), 3, "{after}");
    assert!(after.ends_with("MAX 8192"), "{after}");
    let l = line("@@SCN list after ");
    assert!(!l.contains("files_stat"), "{l}");

    // The second change retires: no user of the old copy is left, and no
    // register or stack holds a pointer into it.
    assert!(line("@@SCN apply2 ").contains("rc=0 "), "{}", out.text);
    let json = |prefix: &str| -> serde_json::Value {
        let l = line(prefix);
        serde_json::from_str(&l[prefix.len()..]).unwrap_or_else(|e| panic!("{e}: {l}"))
    };
    // Held back by the module's word (tracking, named), until the guest
    // dropped it; then it retired.
    assert!(
        line("@@SCN @@HOLD ").contains("addr=ffffffff"),
        "{}",
        out.text
    );
    let held = line("@@SCN held ");
    assert!(
        held.contains("memoryholdingapointerintofiles_stat(oldcopy)")
            && held.contains("\"state\":\"tracking\""),
        "{held}"
    );
    assert!(line("@@SCN drop ").contains("rc=0 "), "{}", out.text);
    assert!(
        line("@@SCN @@DROPPED ").ends_with("@@DROPPED 0"),
        "{}",
        out.text
    );
    let retired = json("@@SCN retired ");
    let d = &retired["patches"][0]["data"][0];
    assert_eq!(d["stats"]["state"], "retired", "{retired}");
    assert_eq!(
        d["repointed"].as_array().map(Vec::len),
        Some(2),
        "{retired}"
    );
    // After retirement file-max writes go to the new copy through the
    // repointed table, and the patched reader shows them: one copy.
    let after = line("@@SCN after retire ");
    let wrote = out.value("@@SCN after retire", "wrote").expect("wrote");
    assert!(
        after.contains(&format!("file_nr_max={wrote} file_max={wrote} fields=4")),
        "{after}"
    );
    // Nothing trapped or transferred since it retired, though the guest
    // wrote the new copy (file-max, and the reader's counters at every read).
    let later = json("@@SCN list retired ");
    let d2 = &later["patches"][0]["data"][0];
    assert_eq!(d2["stats"]["state"], "retired", "{later}");
    assert_eq!(d2["stats"]["transfers"], d["stats"]["transfers"], "{later}");
    let traps = |prefix: &str| line(prefix).rsplit(' ').next().map(str::to_owned);
    assert_eq!(
        traps("@@SCN at retirement writes trapped"),
        traps("@@SCN later writes trapped"),
        "{}",
        out.text
    );
    // Reverted after retirement: the old layout, with the last value the
    // guest wrote into the new copy.
    assert!(line("@@SCN revert2 ").contains("rc=0 "), "{}", out.text);
    let last = out.value("@@SCN @@REVERTED", "last").expect("last");
    let r = line("@@SCN @@REVERTED ");
    assert!(
        r.contains(&format!("file_max={last} file_nr_max={last}")),
        "{r}"
    );
    assert!(line("@@SCN status ").contains("running"), "{}", out.text);
}

/// Reads /proc/sys/fs/dentry-state every 0.3 s.
const DS_WORKLOAD: &str = r#"#!/bin/sh
while :; do
  echo "@@DS $(tr -s ' \t' ' ' < /proc/sys/fs/dentry-state)"
  sleep 0.3
done
"#;

const DS_SCENARIO: &str = r#"
LOG=/tmp/lx.serial
up lx $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "$CMDLINE" --trusted-key $FILES/key.pub || exit 1
seen $LOG "@@DS" || exit 1
$LUCOS patch --vm lx --json $FILES/dfix.lup > /tmp/o 2>&1; echo "@@SCN dfix rc=$? $(tr -d '\n ' < /tmp/o)"
n0=$(wc -l < $LOG); seen_after $LOG $n0 "@@DS" 3
tail -n +$((n0 + 1)) $LOG | grep "@@DS" | tail -n 2 | sed 's/^/@@SCN dfix applied /'
echo "@@SCN dfix list $($LUCOS list --vm lx --json | tr -d '\n ')"
$LUCOS revert --vm lx dfix > /tmp/o 2>&1; echo "@@SCN dfix revert rc=$? $(tr '\n' ' ' < /tmp/o)"
n0=$(wc -l < $LOG); seen_after $LOG $n0 "@@DS" 3
tail -n +$((n0 + 1)) $LOG | grep "@@DS" | tail -n 2 | sed 's/^/@@SCN dfix reverted /'
$LUCOS stop --vm lx >/dev/null
"#;

#[test]
fn linux_a_layout_change_built_from_a_source_diff_applies_live_and_reverts() {
    let d = common::linux::PatchDirs::new("ldiffdata");
    let (dir, files, vmlinux) = (&d.dir, &d.files, &d.vmlinux);
    // From a source diff: fs/dcache.c's file-local dentry_stat gains a
    // member the patched proc_nr_dentry counts reads in and shows as the
    // sixth field of /proc/sys/fs/dentry-state, which the diff renames
    // (`dummy` -> `shown`), carried across by C transfer functions the diff
    // adds to the same file.
    let tree = common::diffs::source_tree();
    let diff = common::diffs::make_diff(&tree, "fs/dcache.c", |s| {
        let s = common::diffs::once(
            s,
            "\tlong dummy;\t\t/* Reserved for future use */\n};",
            "\tlong shown;\t\t/* was dummy */\n\tlong nr_reads;\n};",
        );
        let s = common::diffs::once(
            &s,
            "\tdentry_stat.nr_negative = get_nr_dentry_negative();\n",
            "\tdentry_stat.nr_negative = get_nr_dentry_negative();\n\tdentry_stat.nr_reads++;\n\tdentry_stat.shown = dentry_stat.nr_reads;\n",
        );
        // `nr_reads` starts at 1000 (the diff's initializer, which
        // lucos build takes as its start value): a count shown above that
        // is the new copy's.
        let s = common::diffs::once(
            &s,
            "\t.age_limit = 45,\n};",
            "\t.age_limit = 45,\n\t.nr_reads = 1000,\n};",
        );
        common::diffs::once(&s, "static long get_nr_dentry(void)", DENTRY_TRANSFER)
    });
    let diff_file = dir.join("dfix.patch");
    std::fs::write(&diff_file, diff).expect("diff");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_lucos"))
            .args(["build", "--kernel"])
            .arg(vmlinux)
            .arg("--diff")
            .arg(&diff_file)
            .arg("--source")
            .arg(&tree)
            .args(["--data", "dentry_stat:dentry_stat_t", "--key"])
            .arg(files.join("key"))
            .args(["--name", "dfix", "-o"])
            .arg(files.join("dfix.lup")),
    );
    let out = run_scenario_with(
        "ldiffdata",
        DS_WORKLOAD,
        &format!("CMDLINE=\"{CMDLINE}\"\n{DS_SCENARIO}"),
        Duration::from_secs(600),
        Extras {
            files: Some(files.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(dir);
    let line = |prefix: &str| out.line(prefix);
    // The change from the diff: the new member counts reads (the sixth
    // field grows) while unpatched users keep the old copy (the sysctl
    // table's pointer); reverted, the old layout shows the last count.
    assert!(line("@@SCN dfix rc=").contains("rc=0 "), "{}", out.text);
    let sixth = |l: &str| -> u64 {
        l.split("@@DS ")
            .nth(1)
            .and_then(|s| s.split_whitespace().nth(5))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sixth field: {l}"))
    };
    let lines = |prefix: &str| -> Vec<u64> {
        out.text
            .lines()
            .filter(|l| l.contains(prefix))
            .map(sixth)
            .collect()
    };
    let applied = lines("@@SCN dfix applied ");
    assert!(
        applied.len() == 2 && applied[0] > 1000 && applied[1] > applied[0],
        "{applied:?}\n{}",
        out.text
    );
    let l = line("@@SCN dfix list ");
    let v: serde_json::Value =
        serde_json::from_str(&l["@@SCN dfix list ".len()..]).expect("list json");
    let d = &v["patches"][0]["data"][0];
    assert_eq!(d["symbol"], "dentry_stat", "{l}");
    assert_eq!(d["stats"]["state"], "tracking", "{l}");
    assert_eq!(d["new_bytes"], 56, "{l}");
    assert!(
        d["users_left"].to_string().contains("fs_dcache_sysctls"),
        "{l}"
    );
    assert_eq!(
        d["change"]["c"]["to_new"], "lucos_to_new_dentry_stat",
        "{l}"
    );
    assert_eq!(d["stats"]["failures"], 0, "{l}");
    assert!(line("@@SCN dfix revert ").contains("rc=0 "), "{}", out.text);
    let reverted = lines("@@SCN dfix reverted ");
    assert!(
        reverted.len() == 2 && reverted[0] == reverted[1] && reverted[0] >= applied[1],
        "{reverted:?} after {applied:?}\n{}",
        out.text
    );
}
