//! Live patches of kernel modules in a running Debian 6.1 guest (KASLR on,
//! 2 vCPUs) in the emulated SVM host, with Debian's own `binfmt_misc.ko`
//! from the kernel package: `bm_status_read` (a static function reading the
//! module's static `enabled`) is replaced from a C source built with
//! `lucos build --module`, and /proc/sys/fs/binfmt_misc/status shows it.
//!
//! - Held: the patch is given before the guest loads the module, the VMM
//!   is upgraded (the held patch and the watches go to the new process);
//!   when the guest loads the module, it is patched before any of its code
//!   runs (its first read already shows the patch).
//! - Reverted, then applied while the module is loaded and in use.
//! - Unloaded and loaded again: the patch (of that module only) is applied
//!   again at the load.
//! - A patch spanning vmlinux (/proc/cmdline) and the module switches both
//!   in one pause; after an unload and reload its part in the old module
//!   is gone (lucos let go of the freed memory before the guest reused it:
//!   the loader's writes went through) and the module's part is applied
//!   again at the load, as `span@binfmt_misc`; vmlinux's stays throughout.
//! - The spanning patch given while the module is not loaded: vmlinux's
//!   part is applied at once, the module's is held and applied at its load;
//!   one revert takes both.
//! - A patch for another build of a loaded module is refused; one held for
//!   a module that never loads is dropped by revert.

mod common;

use std::time::Duration;

use common::linux::{
    build_modules, build_patch, guest_said, kbuild_dir, kernel_pkg, kernel_release,
    run_scenario_with, scn_answer, Extras, PatchDirs, SIGNAL,
};

const CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4";

/// The replacement: the same status, marked. `enabled` is the module's own
/// static variable, found in its symbol table at apply time.
const BMFIX: &str = r#"#include <linux/fs.h>
#include <linux/string.h>
#include <linux/uaccess.h>

extern int enabled;

ssize_t bm_status_read(struct file *file, char __user *buf, size_t nbytes,
		       loff_t *ppos)
{
	char *s = enabled ? "enabled live-patched\n" : "disabled live-patched\n";

	return simple_read_from_buffer(buf, nbytes, ppos, s, strlen(s));
}
"#;

/// A module of the test's own, built twice with different code: the guest
/// loads the first build, a patch is made against the second.
fn lucosmod(value: u32) -> String {
    format!(
        r#"#include <linux/module.h>
MODULE_LICENSE("GPL");
noinline int lucosmod_value(int x) {{ return x * {value}; }}
EXPORT_SYMBOL(lucosmod_value);
static int __init lucosmod_init(void) {{ return lucosmod_value(1) ? 0 : -EINVAL; }}
module_init(lucosmod_init);
"#
    )
}

const LUCOSFIX: &str = r#"int lucosmod_value(int x) { return x * 1000; }
"#;

/// A replacement for a function of `dummy.ko`, which the guest never loads.
const DUMMYFIX: &str = r#"#include <linux/netdevice.h>
netdev_tx_t dummy_xmit(struct sk_buff *skb, struct net_device *dev)
{
	dev_kfree_skb(skb);
	return NETDEV_TX_OK;
}
"#;

/// Linux's /proc/cmdline, marked: the vmlinux part of the spanning patch.
const CMDFIX: &str = r#"#include <linux/seq_file.h>
#include <linux/init.h>

int cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s lucos.patched=1\n", saved_command_line);
	return 0;
}
"#;

const WORKLOAD: &str = r#"#!/bin/sh
B=/proc/sys/fs/binfmt_misc
st() { cat $B/status; }
load() {
  insmod /files/binfmt_misc.ko || echo "@@BM insmod failed"
  mount -t binfmt_misc none $B || echo "@@BM mount failed"
  # Exercise it: each read opens, reads and closes its file.
  i=0; while [ $i -lt 100 ]; do st >/dev/null; i=$((i + 1)); done
}
unload() { umount $B; rmmod binfmt_misc; }
insmod /files/lucosmod.ko || echo "@@BM lucosmod failed"
echo "@@BM ready"
until grep -q lucos-step-2 /proc/uptime; do sleep 0.1; done
load
echo "@@BM loaded $(st)"
until ! st | grep -q live-patched; do sleep 0.1; done
echo "@@BM reverted $(st)"
until st | grep -q live-patched; do sleep 0.1; done
echo "@@BM patched $(st)"
unload
echo "@@BM unloaded $(grep -c binfmt_misc /proc/modules)"
load
echo "@@BM reloaded $(st)"
until grep -q lucos.patched=1 /proc/cmdline; do sleep 0.1; done
echo "@@BM spanning $(st) cmdline=$(grep -c lucos.patched=1 /proc/cmdline)"
unload
load
echo "@@BM reloaded2 $(st) cmdline=$(grep -c lucos.patched=1 /proc/cmdline)"
until ! grep -q lucos.patched=1 /proc/cmdline; do sleep 0.1; done
echo "@@BM done $(st)"
unload
echo "@@BM unloaded3 $(grep -c binfmt_misc /proc/modules)"
until grep -q lucos.patched=1 /proc/cmdline; do sleep 0.1; done
load
echo "@@BM partial $(st) cmdline=$(grep -c lucos.patched=1 /proc/cmdline)"
until ! grep -q lucos.patched=1 /proc/cmdline; do sleep 0.1; done
echo "@@BM final $(st)"
while :; do sleep 1; done
"#;

const SCENARIO: &str = r#"
LOG=/tmp/mp.serial
fail() {
  $LUCOS events --vm mp 2>&1 | tail -n 20 | sed 's/^/@@EVENTS /'
  tail -n 60 $LOG | sed 's/^/G| /'; $LUCOS stop --vm mp >/dev/null 2>&1; exit 1;
}
export LUCOS_LOG=info
up mp $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "$CMDLINE" --trusted-key $FILES/key.pub || exit 1
seen $LOG '^@@BM ready' || fail
$LUCOS symbols --vm mp lucosmod_value@lucosmod --json > /tmp/o 2>&1; echo "@@SCN symbols rc=$? $(one /tmp/o)"
$LUCOS patch --vm mp $FILES/otherbuild.lup > /tmp/o 2>&1; echo "@@SCN otherbuild rc=$? $(one /tmp/o)"
$LUCOS patch --vm mp $FILES/dummyfix.lup --json > /tmp/o 2>&1; echo "@@SCN dummyheld rc=$? $(one /tmp/o)"
$LUCOS patch --vm mp $FILES/bmfix.lup --json > /tmp/o 2>&1; echo "@@SCN held rc=$? $(one /tmp/o)"
$LUCOS list --vm mp --json > /tmp/o 2>&1; echo "@@SCN list0 rc=$? $(one /tmp/o)"
$LUCOS upgrade --vm mp --json > /tmp/o 2>&1; echo "@@SCN upgrade rc=$? $(one /tmp/o)"
$LUCOS patch --vm mp $FILES/go.lup > /tmp/o 2>&1; echo "@@SCN go rc=$? $(one /tmp/o)"
seen $LOG '^@@BM loaded' || fail
$LUCOS list --vm mp --json > /tmp/o 2>&1; echo "@@SCN list1 rc=$? $(one /tmp/o)"
$LUCOS revert --vm mp bmfix > /tmp/o 2>&1; echo "@@SCN revert1 rc=$? $(one /tmp/o)"
seen $LOG '^@@BM reverted' || fail
$LUCOS patch --vm mp $FILES/bmfix.lup --json > /tmp/o 2>&1; echo "@@SCN live rc=$? $(one /tmp/o)"
seen $LOG '^@@BM reloaded' || fail
$LUCOS list --vm mp --json > /tmp/o 2>&1; echo "@@SCN list2 rc=$? $(one /tmp/o)"
$LUCOS revert --vm mp bmfix > /tmp/o 2>&1; echo "@@SCN revert2 rc=$? $(one /tmp/o)"
$LUCOS patch --vm mp $FILES/span.lup --json > /tmp/o 2>&1; echo "@@SCN span rc=$? $(one /tmp/o)"
seen $LOG '^@@BM reloaded2' || fail
$LUCOS list --vm mp --json > /tmp/o 2>&1; echo "@@SCN list3 rc=$? $(one /tmp/o)"
$LUCOS list --vm mp > /tmp/o 2>&1; echo "@@SCN listtext rc=$?"; sed 's/^/@@LIST /' /tmp/o
$LUCOS revert --vm mp span > /tmp/o 2>&1; echo "@@SCN revert3 rc=$? $(one /tmp/o)"
seen $LOG '^@@BM done' || fail
seen $LOG '^@@BM unloaded3' || fail
$LUCOS patch --vm mp $FILES/span.lup --json > /tmp/o 2>&1; echo "@@SCN partial rc=$? $(one /tmp/o)"
seen $LOG '^@@BM partial' || fail
$LUCOS list --vm mp --json > /tmp/o 2>&1; echo "@@SCN listp rc=$? $(one /tmp/o)"
$LUCOS revert --vm mp span > /tmp/o 2>&1; echo "@@SCN revertp rc=$? $(one /tmp/o)"
seen $LOG '^@@BM final' || fail
$LUCOS revert --vm mp dummyfix > /tmp/o 2>&1; echo "@@SCN drop rc=$? $(one /tmp/o)"
$LUCOS list --vm mp --json > /tmp/o 2>&1; echo "@@SCN list4 rc=$? $(one /tmp/o)"
$LUCOS stop --vm mp >/dev/null
wait_vm mp 300
grep -a 'lucos' $LUCOS_RUN_DIR/mp.log | sed 's/^/@@VMLOG /'
tr -d '\r' < $LOG | grep -e '^@@BM' | sed 's/^/@@GUEST /'
"#;

#[test]
fn linux_module_functions_are_patched_live_spanning_vmlinux_and_forgotten_when_unloaded() {
    let kbuild = kbuild_dir();
    let pkg = kernel_pkg();
    let ko = |rel: &str| pkg.join(format!("lib/modules/{}/kernel/{rel}", kernel_release(&pkg)));
    let binfmt = ko("fs/binfmt_misc.ko");
    let dummy = ko("drivers/net/dummy.ko");
    let PatchDirs {
        dir,
        files,
        guest: guest_dir,
        kmod,
        vmlinux,
    } = PatchDirs::new("module-patch");
    std::fs::copy(&binfmt, guest_dir.join("binfmt_misc.ko")).expect("binfmt_misc.ko");
    // Two builds of the test's module: the guest loads v1.
    let (v1, v2) = (kmod.join("v1"), kmod.join("v2"));
    for (d, value) in [(&v1, 3), (&v2, 5)] {
        std::fs::create_dir_all(d).expect("module dir");
        build_modules(&kbuild, d, &[("lucosmod", &lucosmod(value))]);
    }
    std::fs::copy(v1.join("lucosmod.ko"), guest_dir.join("lucosmod.ko")).expect("lucosmod.ko");

    let module = |ko: &std::path::Path| ["--module".to_owned(), ko.display().to_string()];
    let bm = module(&binfmt);
    let bm: Vec<&str> = bm.iter().map(String::as_str).collect();
    build_patch(&files, &kbuild, &vmlinux, "bmfix", BMFIX, &bm);
    let other = module(&v2.join("lucosmod.ko"));
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    build_patch(&files, &kbuild, &vmlinux, "otherbuild", LUCOSFIX, &other);
    let d = module(&dummy);
    let d: Vec<&str> = d.iter().map(String::as_str).collect();
    build_patch(&files, &kbuild, &vmlinux, "dummyfix", DUMMYFIX, &d);
    // The host's signal to the guest that it may load binfmt_misc.
    build_patch(&files, &kbuild, &vmlinux, "go", SIGNAL, &[]);
    // One patch, two objects: vmlinux's cmdline_proc_show and the module's
    // bm_status_read.
    let bm_src = files.join("bmfix_src.c");
    let mut span = bm.clone();
    span.push(bm_src.to_str().expect("path"));
    build_patch(&files, &kbuild, &vmlinux, "span", CMDFIX, &span);

    let out = run_scenario_with(
        "mp",
        WORKLOAD,
        &format!("CMDLINE=\"{CMDLINE}\"\n{SCENARIO}"),
        Duration::from_secs(1200),
        Extras {
            files: Some(files.clone()),
            guest_files: Some(guest_dir.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    let text = &out.text;
    // What the VMM said of the modules (seen with --nocapture).
    for l in text
        .lines()
        .filter(|l| l.contains("@@VMLOG") || l.contains("@@GUEST"))
    {
        eprintln!("{l}");
    }

    let json = |what: &str, rc: &str| -> serde_json::Value {
        serde_json::from_str(scn_answer(text, what, rc))
            .unwrap_or_else(|e| panic!("{what}: {e}\n{text}"))
    };

    // Module symbols by NAME@MODULE.
    let syms = json("symbols", "0");
    assert_eq!(syms["answers"][0]["symbol"]["file"], "lucosmod", "{syms}");
    assert_eq!(syms["answers"][0]["symbol"]["type"], "T", "{syms}");

    // Another build of a loaded module: refused, naming both build-ids.
    let otherbuild = scn_answer(text, "otherbuild", "6");
    assert!(
        otherbuild.contains("module lucosmod is another build"),
        "{otherbuild}"
    );

    // Patches for modules not loaded: held.
    assert_eq!(json("dummyheld", "0")["waiting_for"], "dummy");
    let held = json("held", "0");
    assert_eq!(held["waiting_for"], "binfmt_misc", "{held}");
    assert_eq!(
        held["functions"].as_array().map(Vec::len),
        Some(0),
        "{held}"
    );
    let list0 = json("list0", "0");
    assert_eq!(
        list0["patches"].as_array().map(Vec::len),
        Some(0),
        "{list0}"
    );
    let names: Vec<&str> = list0["held"]
        .as_array()
        .expect("held")
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, ["dummyfix", "bmfix"], "{list0}");
    let protected = list0["protected"].as_array().expect("protected");
    assert!(
        protected.iter().any(|r| r["owner"] == "watch:modules"),
        "the modules list is not watched: {list0}"
    );

    // Handed to a new VMM process (format 2: held patches and watches go
    // with the guest), which then sees the load.
    scn_answer(text, "upgrade", "0");
    // Loaded later: patched before any of its code ran.
    scn_answer(text, "go", "0");
    assert_eq!(
        guest_said(text, "@@BM", "loaded"),
        "enabled live-patched",
        "{text}"
    );
    let list1 = json("list1", "0");
    let p = &list1["patches"]
        .as_array()
        .expect("patches")
        .iter()
        .find(|p| p["name"] == "bmfix")
        .unwrap_or_else(|| panic!("bmfix not applied at load: {list1}"))
        .clone();
    assert_eq!(p["modules"][0]["name"], "binfmt_misc", "{p}");
    assert_eq!(p["modules"][0]["status"], "applied", "{p}");
    assert_eq!(p["functions"][0]["module"], "binfmt_misc", "{p}");
    let owner = p["modules"][0]["owner"].as_str().expect("owner");
    assert!(
        list1["protected"]
            .as_array()
            .expect("protected")
            .iter()
            .any(|r| r["owner"] == owner),
        "the jump is not protected: {list1}"
    );
    assert_eq!(list1["held"].as_array().map(Vec::len), Some(1), "{list1}");
    // By the new process: the held patch and the list watch went with the guest.
    let taken = text.find("taken over by pid").expect("no handover logged");
    let applied = text
        .find("patch bmfix applied before any of its code")
        .expect("the load was not seen");
    assert!(taken < applied, "applied before the handover: {text}");

    // Reverted, then applied while loaded and in use.
    scn_answer(text, "revert1", "0");
    assert_eq!(guest_said(text, "@@BM", "reverted"), "enabled", "{text}");
    assert_eq!(
        json("live", "0")["functions"][0]["function"],
        "bm_status_read"
    );
    assert_eq!(
        guest_said(text, "@@BM", "patched"),
        "enabled live-patched",
        "{text}"
    );

    // Unloaded and loaded again: patched again at load (the patch covers
    // that module only).
    assert_eq!(guest_said(text, "@@BM", "unloaded"), "0", "{text}");
    assert_eq!(
        guest_said(text, "@@BM", "reloaded"),
        "enabled live-patched",
        "{text}"
    );
    let list2 = json("list2", "0");
    let p = list2["patches"]
        .as_array()
        .expect("patches")
        .iter()
        .find(|p| p["name"] == "bmfix")
        .unwrap_or_else(|| panic!("bmfix not applied at reload: {list2}"));
    assert_eq!(p["modules"][0]["status"], "applied", "{p}");
    scn_answer(text, "revert2", "0");

    // Spanning vmlinux and the module: both in one switch.
    let span = json("span", "0");
    let fns: Vec<&str> = span["functions"]
        .as_array()
        .expect("functions")
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    assert!(
        fns.contains(&"cmdline_proc_show") && fns.contains(&"bm_status_read"),
        "{span}"
    );
    assert_eq!(
        guest_said(text, "@@BM", "spanning"),
        "enabled live-patched cmdline=1",
        "{text}"
    );
    // Unloaded and loaded again: the patch's part in the old module is gone
    // (its protections with it: the loader's writes over the old jump went
    // through), vmlinux's stays, and the module's part is applied again at
    // the load as a patch of its own, span@binfmt_misc.
    assert_eq!(
        guest_said(text, "@@BM", "reloaded2"),
        "enabled live-patched cmdline=1",
        "{text}"
    );
    let list3 = json("list3", "0");
    let patches = list3["patches"].as_array().expect("patches");
    let p = patches
        .iter()
        .find(|p| p["name"] == "span")
        .unwrap_or_else(|| panic!("span: {list3}"));
    assert_eq!(p["modules"][0]["status"], "gone", "{p}");
    let owner = p["modules"][0]["owner"].as_str().expect("owner");
    assert!(
        list3["protected"]
            .as_array()
            .expect("protected")
            .iter()
            .all(|r| !r["owner"].as_str().unwrap_or("").ends_with(owner)),
        "the gone module's ranges are still protected: {list3}"
    );
    let part = patches
        .iter()
        .find(|p| p["name"] == "span@binfmt_misc")
        .unwrap_or_else(|| panic!("span's part not applied at the reload: {list3}"));
    assert_eq!(part["modules"][0]["status"], "applied", "{part}");
    assert!(
        text.contains("@@LIST   objects   vmlinux applied, binfmt_misc gone (unloaded)"),
        "{text}"
    );
    scn_answer(text, "revert3", "0");
    assert_eq!(guest_said(text, "@@BM", "done"), "enabled", "{text}");

    // Spanning, with the module not loaded: vmlinux's part now, the
    // module's held (span@binfmt_misc) and applied when it loads; one revert
    // takes both.
    assert_eq!(guest_said(text, "@@BM", "unloaded3"), "0", "{text}");
    let partial = json("partial", "0");
    assert_eq!(partial["waiting_for"], "binfmt_misc", "{partial}");
    assert_eq!(
        partial["functions"][0]["function"], "cmdline_proc_show",
        "{partial}"
    );
    assert_eq!(
        partial["functions"].as_array().map(Vec::len),
        Some(1),
        "{partial}"
    );
    assert_eq!(
        guest_said(text, "@@BM", "partial"),
        "enabled live-patched cmdline=1",
        "{text}"
    );
    let listp = json("listp", "0");
    let names: Vec<&str> = listp["patches"]
        .as_array()
        .expect("patches")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        names.contains(&"span") && names.contains(&"span@binfmt_misc"),
        "{listp}"
    );
    // The `.lup` the VMM keeps to hold a part again is not listed (it
    // made this answer 300 KB, and the emulated host's own console
    // messages once landed inside it).
    assert!(
        listp["patches"]
            .as_array()
            .is_some_and(|v| v.iter().all(|p| p.get("source").is_none())),
        "a .lup in the list"
    );
    scn_answer(text, "revertp", "0");
    assert_eq!(guest_said(text, "@@BM", "final"), "enabled", "{text}");

    // The held patch whose module never loaded is dropped by revert.
    assert!(
        scn_answer(text, "drop", "0").contains("dropped 'dummyfix'"),
        "{text}"
    );
    let list4 = json("list4", "0");
    let left: Vec<&str> = list4["patches"]
        .as_array()
        .expect("patches")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(left, ["go"], "{list4}");
    assert!(list4.get("held").is_none(), "{list4}");
    assert!(
        list4["protected"]
            .as_array()
            .expect("protected")
            .iter()
            .all(|r| {
                let owner = r["owner"].as_str().unwrap_or("");
                owner.starts_with("patch:go") || owner == "lucos:text"
            }),
        "watches left behind: {list4}"
    );
}
