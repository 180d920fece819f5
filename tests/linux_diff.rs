//! `lucos build --diff` on the pinned Debian kernel source: a corpus of the
//! project's own diffs, each built from the source diff alone (no kernel
//! build) or refused with its reason; the built ones applied to a running
//! Debian guest (KASLR on, 2 vCPUs) in the emulated SVM host, each with a
//! LOADED check that fails before the patch, passes with it and fails again
//! after revert; no oops or warning in the guest's log throughout, until a
//! last patch makes two WARNs fire on purpose (each once, nothing else).

mod common;

use std::process::Command;
use std::time::Duration;

use common::diffs::{make_diff, once, source_tree, CMDLINE_FIX, HEADER_FIX};
use common::linux::{run_ok, run_scenario_with, Extras, PatchDirs};

/// `lucos build --diff`: Ok(its output) or Err(its error output).
fn build(d: &PatchDirs, tree: &str, name: &str, diff: &str) -> Result<String, String> {
    build_in(d, None, tree, name, diff)
}

/// [`build`] run in folder `cwd` (`tree` may then be relative to it).
fn build_in(
    d: &PatchDirs,
    cwd: Option<&std::path::Path>,
    tree: &str,
    name: &str,
    diff: &str,
) -> Result<String, String> {
    let p = d.dir.join(format!("{name}.patch"));
    std::fs::write(&p, diff).expect("diff file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lucos"));
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let out = cmd
        .args(["build", "--kernel"])
        .arg(&d.vmlinux)
        .arg("--diff")
        .arg(&p)
        .arg("--source")
        .arg(tree)
        .arg("--key")
        .arg(d.files.join("key"))
        .args(["--name", name, "-o"])
        .arg(d.files.join(format!("{name}.lup")))
        .output()
        .expect("run lucos build");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("exit {}: {text}", out.status.code().unwrap_or(-1)))
    }
}

/// A diff of fs/proc/loadavg.c: a new `static int lucos_reads;` and `tail`
/// (C statements) just before loadavg_proc_show returns.
fn loadavg_diff(tree: &str, tail: &str) -> String {
    make_diff(tree, "fs/proc/loadavg.c", |s| {
        let s = once(
            s,
            "static int loadavg_proc_show(",
            "static int lucos_reads;\n\nstatic int loadavg_proc_show(",
        );
        let end = "\t\tidr_get_cursor(&task_active_pid_ns(current)->idr) - 1);\n";
        once(
            &s,
            &format!("{end}\treturn 0;"),
            &format!("{end}{tail}\treturn 0;"),
        )
    })
}

const WORKLOAD: &str = r#"#!/bin/sh
# LOADED checks, over and over: 1 where the patch's behaviour shows.
state() {
  c=$(grep -c 'lucos.diff=1' /proc/cmdline)
  m=$(uname -m)
  v=$(grep -c 'lucos.version' /proc/version)
  h=$(grep -c 'LucosMark' /proc/softirqs)
  mi=$(grep -c '^Lucos: 1' /proc/meminfo)
  # oom_score_adj 123 written, with its tracepoint on (the event is read
  # and cleared each time).
  o=$(sh -c 'echo 123 > /proc/self/oom_score_adj; cat /proc/self/oom_score_adj')
  t=$(grep -o 'oom_score_adj=12[34]' $TR/trace | tr '\n' ,)
  echo > $TR/trace
  ls=$(ls -a /tmp | grep -c -e lucos-hidden -e lucos-shown)
  # /proc/PID/oom_adj written (its deprecation notice: the kernel's own
  # once-flag, set at the first state), then oom_score read: the patch's
  # pr_warn_once, a flag of its own beside the kernel's in fs/proc/base.o.
  sh -c 'echo 0 > /proc/self/oom_adj'
  os=$(grep -c lucos /proc/self/oom_score)
  ow=$(dmesg | grep -c 'lucos: oom_score read')
  od=$(dmesg | grep -c 'oom_adj is deprecated')
  or=$(dmesg | grep -c 'lucos: oom_score_adj 123 raised')
  lc=$(grep -c '^lucos reads' /proc/loadavg)
  lr=$(dmesg | grep -c 'lucos: read ')
  lw=$(dmesg | grep -c 'WARNING: .* at fs/proc/loadavg.c:')
  # /proc/uptime with a token of the patch's, and its pr_warn_ratelimited
  # naming the function (__func__: a numbered static of the patch's own).
  up=$(grep -c lucos /proc/uptime)
  ur=$(dmesg | grep -c 'lucos: uptime_proc_show read')
  # /proc/filesystems counts its reads under a new mutex (the patch's own
  # data, whose wait list points at itself).
  fs=$(grep -c '^lucos	reads [0-9]' /proc/filesystems)
  # A futex operation that faults in futex_wake_op (its exception-table
  # fixup: in patch code, found through lucos's exception index).
  fx=$(/files/futex_fault)
  w=$(dmesg | grep -e 'WARNING' -e 'BUG:' -e 'Oops' -e 'general protection' | grep -vc 'at fs/proc/loadavg.c:')
  echo "cmd=$c uname=$m version=$v header=$h meminfo=$mi oom=$o trace=$t. counter=$lc ls=$ls once=$os/$ow/$od oomw=$or uptime=$up/$ur fs=$fs futex=$fx warned=$lr/$lw warnings=$w"
}
TR=/sys/kernel/tracing
mount -t tracefs nodev $TR
touch /tmp/lucos-hidden /tmp/lucos-shown
# The tracepoint is switched on once, before any patch: switching it
# rewrites kernel text with int3 breakpoints, which the emulated host
# (no NRIPS) has been seen to mishandle around lucos's pauses.
EV=$TR/events/oom/oom_score_adj_update
echo 1 > $EV/enable
echo "@@D ready $(state)"
dmesg | grep -e 'WARNING' -e 'BUG:' -e 'Oops' -e 'general protection' | head -n 4 | sed 's/^/@@D boot /'

i=0
while :; do i=$((i + 1)); echo "@@D state $i $(state)"; sleep 0.3; done
"#;

const SCENARIO: &str = r#"
LOG=/tmp/d.serial
# wait_after LINE PATTERN: PATTERN in the log after its first LINE lines.
wait_after() {
  n=0
  until tail -n +"$1" $LOG | grep -q "$2"; do
    sleep 0.2; n=$((n + 1))
    # Still waiting (and alive): the guest's last line so far.
    [ $((n % 250)) -eq 0 ] && echo "@@SCN still waiting for $2: $(tail -n 1 $LOG)"
    if [ $n -gt 1500 ]; then echo "@@SCN timeout waiting for $2"; dump_vm d; $LUCOS resume --vm d >/dev/null 2>&1; tail -n 80 $LOG | sed 's/^/G| /'; return 1; fi
  done
}
up d $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "console=ttyS0 panic=-1 quiet" --trusted-key $FILES/key.pub || exit 1
wait_after 1 "@@D ready" || exit 1
grep "@@D ready" $LOG | sed 's/^/@@SCN before /'
grep "@@D boot" $LOG | sed 's/^/@@SCN /'
for p in cmdline uname version header meminfo oom counter hide once uptime fs futexop; do
  lucos_retry patch --vm d $FILES/$p.lup; echo "@@SCN apply $p rc=$rc tries=$tries $(one /tmp/o)"
done
at=$(wc -l < $LOG)
wait_after "$at" "cmd=1 uname=lucos version=1 header=1 meminfo=1 oom=124 trace=oom_score_adj=124,\. counter=1 ls=1 once=1/1/1 oomw=1 uptime=1/[1-9][0-9]* fs=1 futex=EACCES " && echo "@@SCN loaded"
$LUCOS list --vm d | sed 's/^/@@SCN list /'
for p in futexop fs uptime once hide counter oom meminfo header version uname cmdline; do
  lucos_retry revert --vm d $p; echo "@@SCN revert $p rc=$rc tries=$tries $(one /tmp/o)"
done
at=$(wc -l < $LOG)
wait_after "$at" "cmd=0 uname=x86_64 version=0 header=0 meminfo=0 oom=123 trace=oom_score_adj=123,\. counter=0 ls=2 once=0/1/1 oomw=1 uptime=0/[0-9]* fs=0 futex=EFAULT " && echo "@@SCN reverted"
at=$(wc -l < $LOG)
wait_after "$at" "@@D state" && echo "@@SCN last $(grep '@@D state' $LOG | tail -n 1)"
# Last, on purpose: WARNs in patch code fire, each once.
lucos_retry patch --vm d $FILES/warn.lup; echo "@@SCN apply warn rc=$rc tries=$tries $(one /tmp/o)"
at=$(wc -l < $LOG)
wait_after "$at" "warned=1/2 " && echo "@@SCN warned"
at=$(wc -l < $LOG)
wait_after "$at" "@@D state" && at=$(wc -l < $LOG) && wait_after "$at" "@@D state" && echo "@@SCN after-warn $(grep '@@D state' $LOG | tail -n 1)"
lucos_retry revert --vm d warn; echo "@@SCN revert warn rc=$rc tries=$tries $(one /tmp/o)"
$LUCOS stop --vm d >/dev/null
wait_vm d 60
"#;

#[test]
fn linux_patches_built_from_source_diffs_apply_live_and_bad_diffs_are_refused_with_reasons() {
    let tree = source_tree();
    let d = PatchDirs::new("diff");

    // Built: a /proc function's output (a static function, a new string).
    let cmdline = CMDLINE_FIX(&tree);
    let out = build(&d, &tree, "cmdline", &cmdline).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: cmdline_proc_show"), "{out}");
    assert!(out.contains("build 1 object(s) patched"), "{out}");
    // Built: a system call (uname reports machine "lucos"): a large file,
    // static helpers of it called from the new code by their kernel symbols.
    let uname = make_diff(&tree, "kernel/sys.c", |s| {
        once(
            s,
            "\tif (override_architecture(name))\n\t\treturn -EFAULT;\n\treturn 0;\n}\n\n#ifdef __ARCH_WANT_SYS_OLD_UNAME",
            "\tif (override_architecture(name))\n\t\treturn -EFAULT;\n\tif (copy_to_user(name->machine, \"lucos\", 6))\n\t\treturn -EFAULT;\n\treturn 0;\n}\n\n#ifdef __ARCH_WANT_SYS_OLD_UNAME",
        )
    });
    let out = build(&d, &tree, "uname", &uname).unwrap_or_else(|e| panic!("{e}"));
    // __do_sys_newuname has no patchable entry (no __fentry__ call): it is
    // placed, and its callers, the syscall entries, are switched.
    assert!(
        out.contains("2 functions: __x64_sys_newuname, __ia32_sys_newuname"),
        "{out}"
    );
    assert!(
        out.contains("places __do_sys_newuname (changed, without a patchable entry"),
        "{out}"
    );
    // Built: a new function, called by the changed one.
    let version = make_diff(&tree, "fs/proc/version.c", |s| {
        let s = once(
            s,
            "static int version_proc_show(",
            "static noinline void lucos_mark(struct seq_file *m)\n{\n\tseq_puts(m, \"lucos.version \");\n}\n\nstatic int version_proc_show(",
        );
        once(
            &s,
            "{\n\tseq_printf(m, linux_proc_banner,",
            "{\n\tlucos_mark(m);\n\tseq_printf(m, linux_proc_banner,",
        )
    });
    let out = build(&d, &tree, "version", &version).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: version_proc_show"), "{out}");

    // Built: a header change (a new inline in fs/proc/internal.h, used by
    // /proc/softirqs): every object including the header is built twice,
    // only the one whose code changed is in the patch.
    let header = HEADER_FIX(&tree);
    let out = build(&d, &tree, "header", &header).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: show_softirqs"), "{out}");
    assert!(
        out.contains("find what includes fs/proc/internal.h"),
        "{out}"
    );

    // Built: a function with alternatives (meminfo_proc_show: a
    // static_cpu_has for 5-level paging, ALWAYS and LA57 entries on one
    // site), applied by lucos's linker for the guest's CPU.
    let meminfo = make_diff(&tree, "fs/proc/meminfo.c", |s| {
        once(
            s,
            "\tarch_report_meminfo(m);\n",
            "\tarch_report_meminfo(m);\n\tseq_puts(m, \"Lucos: 1\\n\");\n",
        )
    });
    let out = build(&d, &tree, "meminfo", &meminfo).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: meminfo_proc_show"), "{out}");
    // Built: a function with a tracepoint (a static key, and a static call
    // behind it): __set_oom_adj (a GCC .isra clone) stores 124 for 123. The
    // guest has the tracepoint on: the patched code must read the key and
    // trace the value it stores.
    let oom = make_diff(&tree, "fs/proc/base.c", |s| {
        once(
            s,
            "\ttask->signal->oom_score_adj = oom_adj;\n",
            "\tif (oom_adj == 123) {\n\t\tpr_warn_once(\"lucos: oom_score_adj 123 raised\\n\");\n\t\toom_adj = 124;\n\t}\n\ttask->signal->oom_score_adj = oom_adj;\n",
        )
    });
    let out = build(&d, &tree, "oom", &oom).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: __set_oom_adj.isra.0"), "{out}");
    // The same from a relative --source: kbuild still takes lucos's headers
    // for the patch code (a relative tree once kept the kernel's jump
    // labels, and the patch was refused).
    let tree_path = std::path::Path::new(&tree);
    let leaf = tree_path
        .file_name()
        .expect("tree's name")
        .to_string_lossy();
    let out = build_in(&d, tree_path.parent(), &format!("./{leaf}"), "oomrel", &oom)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: __set_oom_adj.isra.0"), "{out}");

    // Built: a new variable, and a WARN that does not fire (no
    // __bug_table: patch-include/asm/bug.h): /proc/loadavg counts its reads
    // in a variable of the patch and shows the count from the second read.
    let counter = loadavg_diff(
        &tree,
        "\tif (++lucos_reads > 1)\n\t\tseq_printf(m, \"lucos reads %d\\n\", lucos_reads);\n\tWARN_ON_ONCE(lucos_reads < 0);\n",
    );
    let out = build(&d, &tree, "counter", &counter).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: loadavg_proc_show"), "{out}");
    // Built, applied last on purpose: WARNs that fire, once each
    // (WARN_ONCE with a message at the second read, WARN_ON_ONCE at the
    // third), their once-flags variables of the patch.
    let warn = loadavg_diff(
        &tree,
        "\tlucos_reads++;\n\tWARN_ONCE(lucos_reads >= 2, \"lucos: read %d\\n\", lucos_reads);\n\tWARN_ON_ONCE(lucos_reads >= 3);\n",
    );
    let out = build(&d, &tree, "warn", &warn).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: loadavg_proc_show"), "{out}");

    // Built: a function with inline user-memory accesses (filldir64, in
    // user_access_begin() with unsafe_put_user(): __ex_table entries in the
    // kernel's build, calls of the kernel's __put_user helpers in the
    // patch's): getdents64 leaves out entries named "lucos-hidden".
    let hide = make_diff(&tree, "fs/readdir.c", |s| {
        once(
            s,
            "\t\tsizeof(u64));\n\tint prev_reclen;\n\n\tbuf->error = verify_dirent_name(name, namlen);\n\tif (unlikely(buf->error))\n\t\treturn false;\n",
            "\t\tsizeof(u64));\n\tint prev_reclen;\n\n\tbuf->error = verify_dirent_name(name, namlen);\n\tif (unlikely(buf->error))\n\t\treturn false;\n\tif (namlen == 12 && !memcmp(name, \"lucos-hidden\", 12))\n\t\treturn true;\n",
        )
    });
    let out = build(&d, &tree, "hide", &hide).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: filldir64"), "{out}");

    // Built: a function with an access that may fault on purpose
    // (futex_wake_op's atomic operation on user memory: an exception-table
    // entry and its fixup, carried with the patch and made known to the
    // kernel through lucos's exception index; and a ratelimit state of the
    // kernel's, passed by its absolute address): a FUTEX_WAKE_OP on a
    // read-only page gives EACCES instead of EFAULT.
    let futexop = make_diff(&tree, "kernel/futex/waitwake.c", |s| {
        once(
            s,
            "\t\t\tret = fault_in_user_writeable(uaddr2);\n\t\t\tif (ret)\n\t\t\t\treturn ret;\n",
            "\t\t\tret = fault_in_user_writeable(uaddr2);\n\t\t\tif (ret)\n\t\t\t\treturn ret == -EFAULT ? -EACCES : ret;\n",
        )
    });
    let out = build(&d, &tree, "futexop", &futexop).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: futex_wake_op"), "{out}");
    assert!(out.contains("carries 8 exception-table entries"), "{out}");

    // Built: a pr_warn_once added to an object that has one already
    // (fs/proc/base.c's oom_adj notice): the new once-flag is a numbered
    // static (`__already_done.N`, in `.data.once`) only the changed function
    // uses, so it is the patch's own; the kernel's stays the kernel's (the
    // notice it guards printed once, before the patch, and not again).
    let oncediff = make_diff(&tree, "fs/proc/base.c", |s| {
        once(
            s,
            "\tseq_printf(m, \"%lu\\n\", points);\n",
            "\tpr_warn_once(\"lucos: oom_score read\\n\");\n\tseq_printf(m, \"%lu lucos\\n\", points);\n",
        )
    });
    let out = build(&d, &tree, "once", &oncediff).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: proc_oom_score"), "{out}");

    // Built: a pr_warn_ratelimited, whose ratelimit state is the patch's
    // own and whose `__func__.N` (the function's name, passed to
    // ___ratelimit and printed) is a numbered read-only static the
    // kernel has namesakes of everywhere: the patch takes its own copy.
    let uptime = make_diff(&tree, "fs/proc/uptime.c", |s| {
        once(
            s,
            "\tseq_printf(m, \"%lu.%02lu %lu.%02lu\\n\",",
            "\tpr_warn_ratelimited(\"lucos: %s read\\n\", __func__);\n\tseq_printf(m, \"%lu.%02lu %lu.%02lu lucos\\n\",",
        )
    });
    let out = build(&d, &tree, "uptime", &uptime).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: uptime_proc_show"), "{out}");
    assert!(out.contains("places .rodata.__func__."), "{out}");
    // Built: a new mutex and counter, the patch's own data; the mutex's
    // wait list is initialized to point at itself (relocated to the
    // patch's copy).
    let fs = make_diff(&tree, "fs/filesystems.c", |s| {
        let s = once(
            s,
            "static int filesystems_proc_show(struct seq_file *m, void *v)\n{\n\tstruct file_system_type * tmp;\n",
            "static DEFINE_MUTEX(lucos_fs_lock);\nstatic unsigned long lucos_fs_reads;\n\nstatic int filesystems_proc_show(struct seq_file *m, void *v)\n{\n\tstruct file_system_type * tmp;\n\tunsigned long n;\n\n\tmutex_lock(&lucos_fs_lock);\n\tn = ++lucos_fs_reads;\n\tmutex_unlock(&lucos_fs_lock);\n",
        );
        once(
            &s,
            "\tread_unlock(&file_systems_lock);\n\treturn 0;\n}\n\nstatic int __init proc_filesystems_init",
            "\tread_unlock(&file_systems_lock);\n\tseq_printf(m, \"lucos\\treads %lu\\n\", n);\n\treturn 0;\n}\n\nstatic int __init proc_filesystems_init",
        )
    });
    let out = build(&d, &tree, "fs", &fs).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("1 function: filesystems_proc_show"), "{out}");
    assert!(out.contains("places .data.lucos_fs_lock"), "{out}");

    // Built, not applied (the guest has no ext4 nor a futex user to show
    // them): a fix near the top of fs/ext4/super.c moves the lines that the
    // quota functions below it pass to ext4's error and journal helpers;
    // those are left alone, only ext4_statfs is replaced.
    let ext4 = make_diff(&tree, "fs/ext4/super.c", |s| {
        once(
            s,
            "\tbuf->f_ffree = percpu_counter_sum_positive(&sbi->s_freeinodes_counter);\n",
            "\tbuf->f_ffree = percpu_counter_sum_positive(&sbi->s_freeinodes_counter);\n\tif (buf->f_ffree > buf->f_files)\n\t\tbuf->f_ffree = buf->f_files;\n",
        )
    });
    let out = build(&d, &tree, "ext4", &ext4).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("(1 function: ext4_statfs)"), "{out}");
    assert!(
        out.contains("leaves ext4_write_dquot (only line numbers moved)"),
        "{out}"
    );
    // ...and get_futex_key's GCC clone get_object_id.part.0, whose only
    // caller compiles otherwise with lucos's headers (a WARN), is copied
    // into the patch rather than called with a convention not shown.
    let futex = make_diff(&tree, "kernel/futex/core.c", |s| {
        let s = once(
            s,
            "\tif (unlikely((address % sizeof(u32)) != 0))\n\t\treturn -EINVAL;\n",
            "\tif (unlikely((address % sizeof(u32)) != 0)) {\n\t\tatomic_inc(&lucos_misaligned);\n\t\treturn -EINVAL;\n\t}\n",
        );
        once(
            &s,
            "int get_futex_key(u32 __user *uaddr,",
            "static atomic_t lucos_misaligned;\n\nint get_futex_key(u32 __user *uaddr,",
        )
    });
    let out = build(&d, &tree, "futex", &futex).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("(1 function: get_futex_key)"), "{out}");
    assert!(
        out.contains("places get_object_id.part.0 (a GCC clone changed code calls"),
        "{out}"
    );

    // Refused, each with its reason.
    let refused = |name: &str, diff: &str, why: &str| {
        let e = build(&d, &tree, name, diff).expect_err(name);
        // A change lucos cannot carry: exit 6; bad input: 2.
        let code = if ["stale", "empty"].contains(&name) {
            2
        } else {
            6
        };
        assert!(e.starts_with(&format!("exit {code}:")), "{name}: {e}");
        assert!(e.contains(why), "{name}: expected '{why}' in:\n{e}");
        assert!(
            !d.files.join(format!("{name}.lup")).exists(),
            "{name}: a refused build wrote a patch"
        );
    };
    refused(
        "noop",
        &make_diff(&tree, "fs/proc/cmdline.c", |s| {
            once(
                s,
                "\tseq_putc(m, '\\n');",
                "\t/* a newline */\n\tseq_putc(m, '\\n');",
            )
        }),
        "no functional change",
    );
    refused(
        "init",
        &make_diff(&tree, "fs/proc/cmdline.c", |s| {
            once(
                s,
                "proc_create_single(\"cmdline\", 0, NULL",
                "proc_create_single(\"cmdline2\", 0, NULL",
            )
        }),
        "__init/__exit code",
    );
    refused(
        "asm",
        &make_diff(&tree, "arch/x86/lib/memcpy_64.S", |s| {
            format!("{s}\n/* lucos */\n")
        }),
        "only C sources and headers can be live-patched",
    );
    refused(
        "stale",
        &cmdline.replace("seq_putc(m, '\\n');", "seq_putc(m, '\\r');"),
        "does not apply",
    );
    refused("empty", "not a diff\n", "changes no file");
    // The tree of another build than the kernel's (its banner names another
    // release): exit 5, nothing built.
    let mut image = std::fs::read(&d.vmlinux).expect("vmlinux");
    let release = String::from_utf8_lossy(&image)
        .split("Linux version ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .expect("banner")
        .to_owned();
    let other_release = release.replacen("6.1.0-", "6.1.0-9", 1);
    let needle = format!("Linux version {release} ");
    let mut at = 0;
    while let Some(i) = image[at..]
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
    {
        // Same length: drop one character of the flavour.
        let with = format!("Linux version {} ", &other_release[..release.len()]);
        image[at + i..at + i + needle.len()].copy_from_slice(with.as_bytes());
        at += i + needle.len();
    }
    let mut wrong = Command::new(env!("CARGO_BIN_EXE_lucos"));
    let other_vmlinux = d.dir.join("other.vmlinux");
    std::fs::write(&other_vmlinux, image).expect("other vmlinux");
    let p = d.dir.join("wrongtree.patch");
    std::fs::write(&p, &cmdline).expect("diff");
    let out = wrong
        .args(["build", "--unsigned", "--kernel"])
        .arg(&other_vmlinux)
        .arg("--diff")
        .arg(&p)
        .arg("--source")
        .arg(&tree)
        .args(["--name", "wrongtree", "-o"])
        .arg(d.files.join("wrongtree.lup"))
        .output()
        .expect("lucos build");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("is a tree of release"), "{err}");
    refused(
        "module",
        &make_diff(&tree, "drivers/block/loop.c", |s| {
            once(
                s,
                "\"Maximum number of loop devices\"",
                "\"Maximum number of loop devices (lucos)\"",
            )
        }),
        "is not built into the running kernel",
    );
    refused(
        "forced",
        &make_diff(&tree, "include/linux/kconfig.h", |s| {
            format!("{s}\n/* lucos */\n")
        }),
        "includes into every object",
    );
    // The LOADED check's program, for the guest.
    run_ok(
        Command::new("cc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(d.guest.join("futex_fault"))
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/guest-kernels/linux/checks/futex_fault.c"
            )),
    );
    let out = run_scenario_with(
        "diff",
        WORKLOAD,
        SCENARIO,
        Duration::from_secs(900),
        Extras {
            files: Some(d.files.clone()),
            guest_files: Some(d.guest.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&d.dir);
    let before = out.line("@@SCN before ");
    assert!(
        before.contains(
            "cmd=0 uname=x86_64 version=0 header=0 meminfo=0 oom=123 trace=oom_score_adj=123,. counter=0 ls=2 once=0/0/1 oomw=0 uptime=0/0 fs=0 futex=EFAULT warned=0/0 "
        ),
        "a LOADED check passed before its patch: {before}\n{}",
        out.text
    );
    for p in [
        "cmdline", "uname", "version", "header", "meminfo", "oom", "counter", "hide", "once",
        "uptime", "fs", "futexop", "warn",
    ] {
        let a = out.line(&format!("@@SCN apply {p} "));
        assert!(a.contains("rc=0"), "{a}\n{}", out.text);
        let r = out.line(&format!("@@SCN revert {p} "));
        assert!(r.contains("rc=0"), "{r}\n{}", out.text);
    }
    out.expect("@@SCN loaded");
    // lucos's exception index, listed with the patch it serves.
    let index = out.line("@@SCN list exception index ");
    assert!(
        index.contains("search_exception_tables") && index.contains("futexop"),
        "{index}\n{}",
        out.text
    );
    out.expect("@@SCN reverted");
    // The guest's own log: no oops or warning through the whole run (none
    // beyond what its boot logged, shown as "@@SCN @@D boot").
    let warnings = |l: &str| l.rsplit("warnings=").next().unwrap_or("").trim().to_owned();
    let last = out.line("@@SCN last ");
    assert_eq!(warnings(&last), warnings(&before), "{last}\n{}", out.text);
    assert!(last.contains("warned=0/0 "), "{last}\n{}", out.text);
    // The WARN phase: the message once, two WARNINGs at loadavg.c, still
    // so a few reads later, and no other warning or oops.
    out.expect("@@SCN warned");
    let after = out.line("@@SCN after-warn ");
    assert!(after.contains("warned=1/2 "), "{after}\n{}", out.text);
    assert_eq!(warnings(&after), warnings(&before), "{after}\n{}", out.text);
}
