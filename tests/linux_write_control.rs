//! Write control on a running Debian cloud kernel (KASLR on, 2 vCPUs), in
//! the emulated SVM host on PVM machines: after a live patch of
//! `cmdline_proc_show`, a module loaded in the guest clears CR0.WP and
//! writes the function's original first bytes back over lucos's jump: the
//! write is refused, the guest runs on, /proc/cmdline stays patched, the
//! event is reported. The function tracer on `loadavg_proc_show`, on the
//! same 4 KiB page, works (the kernel's text_poke writes the rest of the
//! page). With `lucos protect --kernel-text`, the same module writing into
//! an unpatched function (`version_proc_show`) is refused too, while the
//! kernel's own text_poke (the tracer again) still works. Enabling the
//! tracer on the patched function itself leaves the patch and the guest
//! standing.

mod common;

use std::time::Duration;

use common::linux::{build_modules, build_patch, kbuild_dir, run_scenario_with, Extras, PatchDirs};

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

const CMDFIX: &str = r#"#include <linux/seq_file.h>
#include <linux/init.h>

int cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s lucos.patched=1\n", saved_command_line);
	return 0;
}
"#;

/// A module that writes `bytes` (hex) at kernel address `addr` with CR0.WP
/// cleared, as a rootkit would, then reports what the address holds. Its
/// init fails on purpose, so it can be loaded again.
const WPOKE: &str = r#"#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/irqflags.h>
#include <linux/string.h>
#include <asm/processor-flags.h>

static unsigned long addr;
module_param(addr, ulong, 0);
static char *bytes = "0f1f440000";
module_param(bytes, charp, 0);
MODULE_LICENSE("GPL");

static int __init wpoke_init(void)
{
	u8 buf[16];
	volatile u8 *p = (volatile u8 *)addr;
	int n = strlen(bytes) / 2, i;
	unsigned long cr0, flags;

	if (!addr || n > (int)sizeof(buf) || hex2bin(buf, bytes, n))
		return -EINVAL;
	local_irq_save(flags);
	asm volatile("mov %%cr0, %0" : "=r"(cr0));
	asm volatile("mov %0, %%cr0" : : "r"(cr0 & ~X86_CR0_WP) : "memory");
	for (i = 0; i < n; i++)
		p[i] = buf[i];
	asm volatile("mov %0, %%cr0" : : "r"(cr0) : "memory");
	local_irq_restore(flags);
	pr_info("wpoke: wrote %d bytes at %px, it holds %*phN\n", n, (void *)addr, n, (void *)addr);
	return -ENODEV;
}
module_init(wpoke_init);
"#;

const WORKLOAD: &str = r#"#!/bin/sh
T=/sys/kernel/tracing
mount -t tracefs nodev $T 2>/dev/null
addr_of() { grep " $1\$" /proc/kallsyms | head -n 1 | cut -d' ' -f1; }
CP=$(addr_of cmdline_proc_show); VP=$(addr_of version_proc_show); LP=$(addr_of loadavg_proc_show)
echo "@@WC addrs cmdline=$CP version=$VP loadavg=$LP same_page=$([ "${CP%???}" = "${LP%???}" ] && echo yes || echo no)"
# trace_on FUNC: the function tracer on FUNC alone; prints how many calls it saw.
trace_on() {
  echo "$1" > $T/set_ftrace_filter 2>/dev/null; r1=$?
  echo function > $T/current_tracer 2>/dev/null; r2=$?
  for i in 1 2 3; do cat /proc/loadavg > /dev/null; done
  hits=$(grep -c " $1" $T/trace 2>/dev/null)
  echo nop > $T/current_tracer 2>/dev/null; echo > $T/set_ftrace_filter 2>/dev/null; echo > $T/trace
  echo "filter_rc=$r1 tracer_rc=$r2 hits=$hits"
}
poke() { insmod /files/wpoke.ko addr=0x$1 bytes=$2 2>/dev/null; dmesg | grep 'wpoke:' | tail -n 1 | sed 's/.*wpoke: //'; }
if grep -q wc.pk /proc/cmdline; then
  # Booted with lucos run --protect-kernel: once the host says the kernel
  # text is protected, the module tries an unpatched function, the tracer runs.
  echo "@@PK ready"
  until grep -q lucos-step-2 /proc/uptime; do sleep 0.2; done
  echo "@@PK poke $(poke $VP 31c0c3)"
  echo "@@PK after-poke version=$(cut -c 1-13 /proc/version)"
  echo "@@PK ftrace $(trace_on loadavg_proc_show)"
  echo "@@PK done"
  while :; do sleep 1; done
fi
echo "@@WC ready"
until grep -q lucos.patched /proc/cmdline; do sleep 0.2; done
echo "@@WC patched cmdline=$(cat /proc/cmdline)"
echo "@@WC poke1 $(poke $CP 0f1f440000)"
echo "@@WC after-poke1 cmdline=$(cat /proc/cmdline)"
echo "@@WC ftrace1 $(trace_on loadavg_proc_show)"
echo "@@WC step2-wait"
until grep -q lucos-step-2 /proc/uptime; do sleep 0.2; done
echo "@@WC poke2 $(poke $VP 31c0c3)"
echo "@@WC after-poke2 version=$(cut -c 1-13 /proc/version)"
echo "@@WC ftrace2 $(trace_on loadavg_proc_show)"
echo "@@WC ftrace-patched $(trace_on cmdline_proc_show) cmdline=$(cat /proc/cmdline)"
echo "@@WC warnings $(dmesg | grep -c -e 'WARNING' -e 'BUG' -e 'Oops')"
dmesg | grep -e 'WARNING' -e 'BUG' -e 'Oops' -e 'ftrace' | head -n 8 | sed 's/^/@@WC dmesg /'
echo "@@WC done"
while :; do sleep 1; echo "@@WC alive $(cut -c 1-13 /proc/version)"; done
"#;

const SCENARIO: &str = r#"
LOG=/tmp/wc.serial
wait_for() {
  n=0
  until grep -q "$1" ${2:-$LOG}; do
    sleep 0.2; n=$((n + 1))
    if [ $n -gt 1500 ]; then echo "@@SCN timeout waiting for $1"; sed 's/^/G| /' ${2:-$LOG} | tail -n 40; return 1; fi
  done
}
up wc $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "$CMDLINE" --trusted-key $FILES/key.pub || exit 1
wait_for "@@WC ready" || exit 1
$LUCOS patch --vm wc $FILES/cmdfix.lup > /tmp/o 2>&1; echo "@@SCN apply rc=$? $(tr '\n' ' ' < /tmp/o)"
wait_for "@@WC step2-wait" || exit 1
$LUCOS status --vm wc | grep 'write control' | sed 's/^/@@SCN before-text /'
$LUCOS protect --vm wc --kernel-text > /tmp/o 2>&1; echo "@@SCN protect rc=$? $(tr '\n' ' ' < /tmp/o)"
$LUCOS patch --vm wc $FILES/signal.lup > /tmp/o 2>&1; echo "@@SCN signal rc=$? $(tr '\n' ' ' < /tmp/o)"
wait_for "@@WC done" || exit 1
wait_for "@@WC alive" || exit 1
$LUCOS events --vm wc > /tmp/ev 2>&1
grep -m 3 'cmdline_proc_show+0x0' /tmp/ev | sed 's/^/@@SCN event-patch /'
grep -m 3 'kernel-text' /tmp/ev | sed 's/^/@@SCN event-text /'
$LUCOS status --vm wc | grep 'write control' | sed 's/^/@@SCN after /'
$LUCOS list --vm wc | sed 's/^/@@SCN list /'
grep "@@WC" $LOG | sed 's/^/G| /'
$LUCOS stop --vm wc >/dev/null
wait_vm wc 60
cat $LUCOS_RUN_DIR/wc.log | sed 's/^/V| /'
# lucos run --protect-kernel: protected once the kernel has made its text read-only.
PK=/tmp/pk.serial
up pk $PK --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "$CMDLINE wc.pk" --trusted-key $FILES/key.pub --protect-kernel || exit 1
n=0; until $LUCOS protect --vm pk | grep -q kernel-text; do sleep 0.5; n=$((n + 1)); [ $n -gt 600 ] && break; done
$LUCOS protect --vm pk | sed 's/^/@@SCN pk /'
$LUCOS patch --vm pk $FILES/signal.lup > /tmp/o 2>&1; echo "@@SCN pk signal rc=$? $(tr '\n' ' ' < /tmp/o)"
wait_for "@@PK done" $PK
grep "@@PK" $PK | sed 's/^/G| /'
$LUCOS events --vm pk > /tmp/ev 2>&1
grep -m 3 'kernel-text' /tmp/ev | sed 's/^/@@SCN pk-event /'
$LUCOS stop --vm pk >/dev/null
wait_vm pk 60
cat $LUCOS_RUN_DIR/pk.log | sed 's/^/V| /'
"#;

#[test]
fn linux_guest_cannot_undo_a_patch_or_write_protected_kernel_text_and_its_text_poke_still_works() {
    let kbuild = kbuild_dir();
    let PatchDirs {
        dir,
        files,
        guest,
        kmod,
        vmlinux,
    } = PatchDirs::new("wcfiles");
    build_patch(&files, &kbuild, &vmlinux, "cmdfix", CMDFIX, &[]);
    build_patch(
        &files,
        &kbuild,
        &vmlinux,
        "signal",
        common::linux::SIGNAL,
        &[],
    );
    build_modules(&kbuild, &kmod, &[("wpoke", WPOKE)]);
    std::fs::copy(kmod.join("wpoke.ko"), guest.join("wpoke.ko")).expect("module");

    let out = run_scenario_with(
        "wc",
        WORKLOAD,
        &format!("CMDLINE=\"{CMDLINE}\"\n{SCENARIO}"),
        Duration::from_secs(900),
        Extras {
            files: Some(files.clone()),
            guest_files: Some(guest.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    let line = |prefix: &str| -> String {
        out.text
            .lines()
            .find_map(|l| l.find(prefix).map(|i| l[i..].to_owned()))
            .unwrap_or_else(|| panic!("no '{prefix}' line:\n{}", out.text))
    };
    assert!(
        line("@@WC addrs ").contains("same_page=yes"),
        "{}",
        out.text
    );
    assert!(line("@@SCN apply ").contains("rc=0"), "{}", out.text);
    // The module's write over the patched entry: refused, the guest runs
    // on, the patch stays, the event names the target.
    let poke1 = line("@@WC poke1 ");
    assert!(poke1.contains("wrote 5 bytes"), "{}", out.text);
    assert!(
        !poke1.ends_with("0f1f440000"),
        "the write went through: {poke1}"
    );
    assert!(
        line("@@WC after-poke1 ").contains("lucos.patched=1"),
        "{}",
        out.text
    );
    let ev = line("@@SCN event-patch ");
    assert!(
        ev.contains("refused") && ev.contains("(patch:cmdfix)"),
        "{ev}"
    );
    // ftrace on another function of the page: the kernel's text_poke writes
    // the unprotected bytes.
    let f1 = line("@@WC ftrace1 ");
    assert!(f1.contains("filter_rc=0 tracer_rc=0"), "{f1}\n{}", out.text);
    assert!(!f1.contains("hits=0"), "no calls traced: {f1}");
    // Kernel text integrity: the module's write into an unpatched function
    // is refused; /proc/version still works; the tracer still works.
    assert!(line("@@SCN protect ").contains("rc=0"), "{}", out.text);
    assert!(line("@@SCN signal ").contains("rc=0"), "{}", out.text);
    let poke2 = line("@@WC poke2 ");
    assert!(poke2.contains("wrote 3 bytes"), "{}", out.text);
    assert!(
        !poke2.ends_with("31c0c3"),
        "the write went through: {poke2}"
    );
    assert!(
        line("@@WC after-poke2 ").contains("version=Linux version"),
        "{}",
        out.text
    );
    let evt = line("@@SCN event-text ");
    assert!(
        evt.contains("refused") && evt.contains("(kernel-text)"),
        "{evt}"
    );
    let f2 = line("@@WC ftrace2 ");
    assert!(f2.contains("filter_rc=0 tracer_rc=0"), "{f2}\n{}", out.text);
    assert!(
        !f2.contains("hits=0"),
        "no calls traced under protection: {f2}"
    );
    // The tracer on the patched function: the patch stays, the guest runs on.
    let fp = line("@@WC ftrace-patched ");
    assert!(fp.contains("lucos.patched=1"), "{fp}");
    out.expect("@@WC done");
    out.expect("@@WC alive Linux version");
    out.expect("lucos: VM wc ended: stopped");
    // lucos run --protect-kernel: the same, from boot on.
    assert!(
        out.text
            .lines()
            .any(|l| l.starts_with("@@SCN pk ") && l.contains("kernel-text")),
        "--protect-kernel did not protect:\n{}",
        out.text
    );
    out.expect("lucos: kernel text integrity on");
    assert!(line("@@SCN pk signal ").contains("rc=0"), "{}", out.text);
    let pk = line("@@PK poke ");
    assert!(
        pk.contains("wrote 3 bytes") && !pk.ends_with("31c0c3"),
        "{pk}"
    );
    assert!(
        line("@@PK after-poke ").contains("version=Linux version"),
        "{}",
        out.text
    );
    let pkf = line("@@PK ftrace ");
    assert!(
        pkf.contains("tracer_rc=0") && !pkf.contains("hits=0"),
        "{pkf}"
    );
    assert!(
        line("@@SCN pk-event ").contains("(kernel-text)"),
        "{}",
        out.text
    );
    out.expect("lucos: VM pk ended: stopped");
    for l in out.text.lines().filter(|l| l.contains("@@WC dmesg ")) {
        eprintln!("{l}");
    }
    eprintln!(
        "{poke1}\n{poke2}\n{f1}\n{f2}\n{fp}\n{}\n{}\n{}",
        line("@@WC warnings "),
        line("@@SCN before-text "),
        line("@@SCN after ")
    );
}
