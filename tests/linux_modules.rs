//! The loaded modules of a running Debian 6.1 guest (KASLR on) in the
//! emulated SVM host, read by the VMM from guest memory with no agent:
//! `lucos modules` lists a module the guest loaded, with the state, version
//! and srcversion the guest's /sys shows, and its symbols at the addresses
//! the guest's own /proc/kallsyms gives; after the guest unloads it, it is
//! gone from the list.

mod common;

use std::time::Duration;

use common::linux::{build_modules, kbuild_dir, run_scenario_with, Extras, PatchDirs};
use update_engine::modules::ModulesInfo;

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// A module with a version, a function, a static function and a variable.
const LUCOSMOD: &str = r#"#include <linux/module.h>
#include <linux/kernel.h>

MODULE_LICENSE("GPL");
MODULE_VERSION("1.2.3");

int lucosmod_counter = 42;
EXPORT_SYMBOL(lucosmod_counter);

static noinline int lucosmod_helper(int x)
{
	return x * 3 + lucosmod_counter;
}

noinline int lucosmod_value(int x)
{
	return lucosmod_helper(x) + 1;
}
EXPORT_SYMBOL(lucosmod_value);

static int __init lucosmod_init(void)
{
	pr_info("lucosmod: loaded, value %d\n", lucosmod_value(1));
	return 0;
}

static void __exit lucosmod_exit(void)
{
	pr_info("lucosmod: unloaded\n");
}

module_init(lucosmod_init);
module_exit(lucosmod_exit);
"#;

/// Loads the module, says what the guest itself sees of it, waits for the
/// host's signal, unloads it and says so.
const WORKLOAD: &str = r#"#!/bin/sh
insmod /files/lucosmod.ko
echo "@@MOD text=$(cat /sys/module/lucosmod/sections/.text) version=$(cat /sys/module/lucosmod/version) srcversion=$(cat /sys/module/lucosmod/srcversion) state=$(cat /sys/module/lucosmod/initstate)"
grep -E ' (lucosmod_value|lucosmod_helper|lucosmod_counter)\b' /proc/kallsyms | sed 's/^/@@KSYM /'
echo "@@LOADED"
until grep -q lucos-step-2 /proc/uptime; do sleep 0.2; done
rmmod lucosmod
echo "@@UNLOADED $(grep -c lucosmod /proc/modules)"
while :; do sleep 1; done
"#;

const SCENARIO: &str = r#"
LOG=/tmp/lm.serial
seen() {
  n=0
  until grep -q "$1" $LOG; do
    sleep 0.2; n=$((n + 1))
    if [ $n -gt 1500 ]; then echo "@@SCN timeout waiting for '$1'"; return 1; fi
  done
}
fail() { tail -n 40 $LOG | sed 's/^/G| /'; $LUCOS stop --vm lm >/dev/null 2>&1; exit 1; }
up lm $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 256M --cmdline "$CMDLINE" --trusted-key $FILES/key.pub || exit 1
seen '^@@LOADED' || fail
$LUCOS modules --vm lm --json > /tmp/m1 2>&1; echo "@@SCN modules loaded rc=$? $(tr -d '\n' < /tmp/m1)"
$LUCOS modules --vm lm --symbols lucosmod --json > /tmp/m2 2>&1; echo "@@SCN symbols rc=$? $(tr -d '\n' < /tmp/m2)"
$LUCOS modules --vm lm --symbols nosuchmod > /tmp/m3 2>&1; echo "@@SCN nosuch rc=$? $(tr -d '\n' < /tmp/m3)"
$LUCOS modules --vm lm > /tmp/m4 2>&1; echo "@@SCN text rc=$?"; sed 's/^/@@TEXT /' /tmp/m4
$LUCOS patch --vm lm $FILES/signal.lup > /tmp/o 2>&1; echo "@@SCN signal rc=$? $(tr '\n' ' ' < /tmp/o)"
seen '^@@UNLOADED' || fail
$LUCOS modules --vm lm --json > /tmp/m5 2>&1; echo "@@SCN modules unloaded rc=$? $(tr -d '\n' < /tmp/m5)"
$LUCOS stop --vm lm >/dev/null
wait_vm lm 300
tr -d '\r' < $LOG | grep -e '^@@MOD' -e '^@@KSYM' -e '^@@UNLOADED' | sed 's/^/@@GUEST /'
"#;

/// The JSON after `@@SCN {what} rc=0 `.
fn answer(text: &str, what: &str) -> ModulesInfo {
    let prefix = format!("@@SCN {what} rc=0 ");
    let json = text
        .lines()
        .find_map(|l| l.find(&prefix).map(|i| &l[i + prefix.len()..]))
        .unwrap_or_else(|| panic!("no '{prefix}' line:\n{text}"));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{what}: {e}: {json}"))
}

/// `key=value` of the guest's `@@MOD` line.
fn guest_says(text: &str, key: &str) -> String {
    let line = text
        .lines()
        .find_map(|l| l.split("@@GUEST @@MOD ").nth(1))
        .unwrap_or_else(|| panic!("no @@MOD line:\n{text}"));
    line.split(' ')
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in '{line}'"))
        .trim()
        .to_owned()
}

#[test]
fn linux_modules_are_listed_from_guest_memory_with_their_symbols_and_go_when_unloaded() {
    let kbuild = kbuild_dir();
    let PatchDirs {
        dir,
        files,
        guest,
        kmod,
        vmlinux,
    } = PatchDirs::new("modules");
    common::linux::build_patch(
        &files,
        &kbuild,
        &vmlinux,
        "signal",
        common::linux::SIGNAL,
        &[],
    );
    build_modules(&kbuild, &kmod, &[("lucosmod", LUCOSMOD)]);
    std::fs::copy(kmod.join("lucosmod.ko"), guest.join("lucosmod.ko")).expect("module");
    let out = run_scenario_with(
        "lm",
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
    let text = &out.text;

    let loaded = answer(text, "modules loaded");
    let m = loaded
        .modules
        .iter()
        .find(|m| m.name == "lucosmod")
        .unwrap_or_else(|| panic!("lucosmod not listed: {loaded:?}\n{text}"));
    assert_eq!(m.state, "live", "{m:?}");
    assert_eq!(
        m.version.as_deref(),
        Some(guest_says(text, "version").as_str())
    );
    assert_eq!(
        m.srcversion.as_deref(),
        Some(guest_says(text, "srcversion").as_str())
    );
    // Its text lies in its core memory, where the guest says it is.
    let text_addr = u64::from_str_radix(guest_says(text, "text").trim_start_matches("0x"), 16)
        .expect("a hex .text address");
    assert!(
        text_addr >= m.base && text_addr < m.base + m.text_size,
        "{text_addr:#x} not in {:#x}+{:#x}",
        m.base,
        m.text_size
    );
    assert!(m.ro_size >= m.text_size && m.size >= m.ro_size, "{m:?}");

    // Its symbols, where the guest's own /proc/kallsyms puts them.
    let syms = answer(text, "symbols").symbols.expect("symbols asked for");
    let ksyms: Vec<(u64, String)> = text
        .lines()
        .filter_map(|l| l.split("@@GUEST @@KSYM ").nth(1))
        .map(|l| {
            let mut w = l.split_whitespace();
            let addr = u64::from_str_radix(w.next().expect("address"), 16).expect("hex");
            let name = w.nth(1).expect("name").to_owned();
            (addr, name)
        })
        .collect();
    for name in ["lucosmod_value", "lucosmod_helper", "lucosmod_counter"] {
        let (addr, _) = ksyms
            .iter()
            .find(|(_, n)| n == name)
            .unwrap_or_else(|| panic!("the guest's kallsyms has no {name}:\n{text}"));
        let s = syms
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("lucos found no {name}: {syms:?}"));
        assert_eq!(s.addr, *addr, "{name}: {s:?}");
    }
    let kind = |name: &str| syms.iter().find(|s| s.name == name).map(|s| s.kind);
    let guest_kind = |name: &str| {
        text.lines()
            .filter_map(|l| l.split("@@GUEST @@KSYM ").nth(1))
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|t| t.chars().next())
    };
    for name in ["lucosmod_value", "lucosmod_helper", "lucosmod_counter"] {
        assert_eq!(kind(name), guest_kind(name), "{name}: {syms:?}");
    }

    // Other modules of the kernel package the guest loaded, if any, are
    // listed too; a module that is not loaded is an error naming it.
    let nosuch = text
        .lines()
        .find(|l| l.contains("@@SCN nosuch rc="))
        .expect("nosuch line");
    assert!(
        !nosuch.contains("rc=0") && nosuch.contains("no module named 'nosuchmod' is loaded"),
        "{nosuch}"
    );
    assert!(text.contains("@@TEXT lucosmod "), "{text}");

    // Unloaded: gone.
    assert!(text.contains("@@GUEST @@UNLOADED 0"), "{text}");
    let after = answer(text, "modules unloaded");
    assert!(
        after.modules.iter().all(|m| m.name != "lucosmod"),
        "{after:?}"
    );
}
