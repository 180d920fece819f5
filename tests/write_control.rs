//! Write control on the test kernel on /dev/kvm: a live patch's jump cannot
//! be overwritten by the guest (refused, counted, reported with its
//! writer) while the rest of its page stays writable; revert gives the page
//! back as ordinary memory in the slot layout of before; atomic increments
//! by two vCPUs on a protected page stay exact; bad ranges are refused
//! without changing anything; a patch's own variables are written natively
//! while its code stays read-only.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cli::{kernel, p, text, RunDir, FIX};
use serde_json::Value;
use symbol_db::SymbolTable;

struct Vm {
    dir: RunDir,
    serial: PathBuf,
}

impl Vm {
    /// The test kernel as VM `wc` on 2 vCPUs with `cmdline`, trusting `key.pub`.
    fn start(name: &str, cmdline: &str) -> Self {
        Self::start_with(name, cmdline, &[])
    }

    /// [`Vm::start`] with more `lucos run` arguments.
    fn start_with(name: &str, cmdline: &str, extra: &[&str]) -> Self {
        common::require_kvm();
        let dir = RunDir::new(name);
        let serial = dir.0.join("serial.log");
        let vm = Vm { dir, serial };
        vm.ok(&["keygen", "-o", p(&vm.path("key"))]);
        let (serial, key) = (vm.serial.clone(), vm.path("key.pub"));
        let mut args = vec![
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--cmdline",
            cmdline,
            "--serial-log",
            p(&serial),
            "--trusted-key",
            p(&key),
        ];
        args.extend_from_slice(extra);
        common::cli::start(&vm.dir, "wc", &args);
        vm
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.0.join(f)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.dir.lucos(args);
        assert!(
            o.status.success(),
            "lucos {args:?}: {}\n{}",
            text(&o),
            self.serial()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("json")
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until `needle` occurs `n` more times than now.
    fn wait_lines(&self, needle: &str, n: usize, secs: u64) {
        common::cli::wait_lines(&self.serial, needle, n, secs);
    }

    /// Waits for `n` more atomic rounds, failing at once on a lost count.
    fn wait_rounds(&self, n: usize, secs: u64) {
        let base = self.serial().matches(" exact count ").count();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let out = self.serial();
            assert!(!out.contains("LOST"), "an increment was lost:\n{out}");
            if out.matches(" exact count ").count() >= base + n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} rounds not done in {secs} s:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Builds `source` as patch `name` (`NAME.lup`), signed by the trusted
    /// key.
    fn build(&self, name: &str, source: &str) -> PathBuf {
        let src = self.path(&format!("{name}.c"));
        std::fs::write(&src, source).expect("patch source");
        let (k, key, out) = (
            kernel(),
            self.path("key"),
            self.path(&format!("{name}.lup")),
        );
        self.ok(&[
            "build",
            "--kernel",
            &k,
            "--key",
            p(&key),
            "--name",
            name,
            "-o",
            p(&out),
            p(&src),
        ]);
        out
    }

    /// Builds the fix of lucos_version, signed by the trusted key, and applies it.
    fn patch_fix(&self) {
        let out = self.build("fix", FIX);
        self.ok(&["patch", "--vm", "wc", p(&out)]);
    }

    /// [`Vm::patch_fix`], then `reports` patched version lines, none of
    /// them (after the first few, in flight at the switch) unpatched.
    fn patch_fix_and_see_it_stay(&self, reports: usize) {
        self.patch_fix();
        let at_patch = self.serial().len();
        self.wait_lines("version testkernel 1.0 (live-patched)\n", reports, 60);
        let out = self.serial();
        assert!(
            !out[at_patch..]
                .lines()
                .skip(4)
                .any(|l| l.ends_with("version testkernel 1.0")),
            "the guest undid the patch:\n{out}"
        );
    }

    fn stats(&self) -> Value {
        self.json(&["status", "--vm", "wc", "--json"])["write_control"].clone()
    }

    fn protected(&self) -> Value {
        self.json(&["protect", "--vm", "wc", "--json"])
    }
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn a_patched_entry_cannot_be_overwritten_by_the_guest_and_the_rest_of_its_page_can() {
    // Both tasks call a kernel service that writes lucos_version's first 8
    // bytes back as built (undoing any patch) and another word on the same
    // text page, which it reads back, over and over.
    let vm = Vm::start("wc-patch", "tasks=2 iters=0 mode=poke report=200");
    vm.wait_lines("version testkernel 1.0\n", 4, 60);
    let syms = SymbolTable::from_elf_file(Path::new(&kernel())).expect("symbols");
    let entry = syms.lookup("lucos_version").expect("lucos_version").addr;
    let scratch = syms.lookup("text_scratch").expect("text_scratch").addr;
    assert_eq!(
        entry >> 12,
        scratch >> 12,
        "the test needs both on one page"
    );
    let elf = std::fs::read(kernel()).expect("kernel");
    let off = common::file_offset_of_vaddr(&elf, entry);
    let built: Vec<u64> = elf[off..off + 8].iter().map(|b| u64::from(*b)).collect();

    let before = vm.protected();
    assert_eq!(
        before["ranges"].as_array().map(Vec::len),
        Some(0),
        "{before}"
    );
    let s0 = vm.stats();
    assert_eq!((count(&s0, "pages"), count(&s0, "trapped")), (0, 0), "{s0}");

    // The patched behaviour stays while the guest keeps trying to undo it.
    vm.patch_fix_and_see_it_stay(10);
    assert!(!vm.serial().contains("MISMATCH"), "{}", vm.serial());

    let s1 = vm.stats();
    assert!(count(&s1, "refused") > 0, "{s1}");
    assert!(
        count(&s1, "allowed") > 0,
        "writes elsewhere on the page: {s1}"
    );
    // The jump, and the kernel text behind a read-only slot whose writes
    // are relayed (kept from the first patch of kernel text on).
    let prot = vm.protected();
    assert_eq!(count(&s1, "ranges"), 2, "{s1}");
    let ranges = prot["ranges"].as_array().expect("ranges");
    let by = |owner: &str| {
        ranges
            .iter()
            .find(|r| r["owner"] == owner)
            .unwrap_or_else(|| panic!("no range of {owner}: {prot}"))
    };
    let r = by("patch:fix");
    assert_eq!(r["label"], "lucos_version", "{prot}");
    assert_eq!(r["len"], 5, "{prot}");
    let relay = by("lucos:text");
    assert_eq!(relay["access"], "relayed", "{prot}");
    let text_pages = relay["len"].as_u64().expect("len").div_ceil(4096);
    assert!(count(&s1, "pages") >= text_pages, "{s1}");

    // The event names the writer, the target and the bytes it tried.
    let ev = vm.json(&["events", "--vm", "wc", "--json"]);
    let e = &ev["events"][0];
    assert_eq!(e["kind"], "refused", "{ev}");
    assert_eq!(e["target"], "lucos_version+0x0", "{ev}");
    assert_eq!(e["owner"], "patch:fix", "{ev}");
    assert_eq!(e["cpl"], 0, "{ev}");
    assert!(
        e["writer"]
            .as_str()
            .is_some_and(|w| w.starts_with("text_poke_service+")),
        "{ev}"
    );
    let bytes: Vec<u64> = e["bytes"]
        .as_array()
        .expect("bytes")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(bytes, built, "the bytes the guest tried to write back");
    let listed = vm.ok(&["list", "--vm", "wc"]);
    assert!(
        listed.contains("write control: 1 ranges (5 bytes)"),
        "{listed}"
    );
    let text_events = vm.ok(&["events", "--vm", "wc"]);
    assert!(
        text_events.contains("refused") && text_events.contains("(text_poke_service+"),
        "{text_events}"
    );

    // Revert: the kernel's writes go through again (relayed), the slots
    // stay; a patch and its revert change no slot any more.
    vm.ok(&["revert", "--vm", "wc", "fix"]);
    vm.wait_lines("version testkernel 1.0\n", 4, 60);
    let after = vm.protected();
    assert_eq!(after["ranges"].as_array().map(Vec::len), Some(1), "{after}");
    assert_eq!(after["slots"], prot["slots"], "{after}");
    let r0 = count(&vm.stats(), "refused");
    vm.wait_lines("version testkernel 1.0\n", 4, 60);
    assert_eq!(
        count(&vm.stats(), "refused"),
        r0,
        "a write refused after revert"
    );
    vm.patch_fix_and_see_it_stay(2);
    assert_eq!(vm.protected()["slots"], prot["slots"]);
    vm.ok(&["revert", "--vm", "wc", "fix"]);
    assert_eq!(vm.protected()["slots"], prot["slots"]);
    // Given back: ordinary memory again, the slots as they were.
    vm.ok(&["unprotect", "--vm", "wc", "lucos:text"]);
    let back = vm.protected();
    assert_eq!(back["ranges"], before["ranges"], "{back}");
    assert_eq!(back["slots"], before["slots"], "{back}");
    let s2 = vm.stats();
    vm.wait_lines("version testkernel 1.0\n", 4, 60);
    let s3 = vm.stats();
    assert_eq!(
        count(&s3, "trapped"),
        count(&s2, "trapped"),
        "no traps after revert"
    );
    assert!(!vm.serial().contains("MISMATCH"), "{}", vm.serial());
    assert!(!vm.serial().contains("EXCEPTION"), "{}", vm.serial());
}

#[test]
fn atomic_increments_of_two_vcpus_on_a_protected_page_stay_exact() {
    // Rounds of 100000 `lock incq` per task; task 0 checks the count after each.
    let n = 100_000u64;
    let vm = Vm::start("wc-atomic", &format!("tasks=2 mode=atomic atomic_n={n}"));
    vm.wait_rounds(2, 60);
    // The page's first 64 bytes protected: the counter after them traps.
    let prot = vm.json(&[
        "protect",
        "--vm",
        "wc",
        "--name",
        "guard",
        "--len",
        "64",
        "--json",
        "atomic_page",
    ]);
    assert_eq!(prot["ranges"][0]["label"], "atomic_page", "{prot}");
    // The round under way may have begun unprotected; the next ones are
    // trapped throughout.
    vm.wait_rounds(2, 900);
    let s = vm.stats();
    assert!(
        count(&s, "allowed") >= 2 * n,
        "a whole round of increments trapped: {s}"
    );
    assert_eq!(count(&s, "refused"), 0, "{s}");
    eprintln!("write control after two trapped rounds: {s}");
    let out = vm.serial();
    assert!(!out.contains("LOST"), "an increment was lost:\n{out}");
    vm.ok(&["unprotect", "--vm", "wc", "guard"]);
    vm.wait_rounds(2, 60);
    assert!(!vm.serial().contains("LOST"), "{}", vm.serial());
}

#[test]
fn protecting_a_bad_range_is_refused_and_changes_nothing() {
    let vm = Vm::start("wc-bad", "tasks=2 iters=0 report=200");
    vm.wait_lines("version testkernel 1.0\n", 2, 60);
    let before = vm.protected();
    for (args, why) in [
        (
            vec!["--gpa", "0x3fff000", "--len", "0x2000"],
            "not guest RAM",
        ),
        (vec!["--gpa", "0x100000000", "--len", "16"], "patch area"),
        (vec!["--gpa", "0x1000", "--len", "0"], "empty"),
        (vec!["--gpa", "0x1000"], "needs a length"),
        (vec!["no_such_symbol"], "no_such_symbol"),
    ] {
        let mut a = vec!["protect", "--vm", "wc", "--name", "x"];
        a.extend(args.iter());
        let o = vm.dir.lucos(&a);
        let t = text(&o);
        assert!(!o.status.success(), "{a:?} accepted: {t}");
        assert!(t.contains(why), "{a:?}: {t}");
        assert_eq!(vm.protected(), before, "{a:?} changed something");
    }
    let o = vm.dir.lucos(&["unprotect", "--vm", "wc", "nothing"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no range protected"), "{}", text(&o));
    // A name is protected once.
    vm.ok(&[
        "protect", "--vm", "wc", "--name", "x", "--gpa", "0x2000", "--len", "8",
    ]);
    let o = vm.dir.lucos(&[
        "protect", "--vm", "wc", "--name", "x", "--gpa", "0x3000", "--len", "8",
    ]);
    assert!(text(&o).contains("already"), "{}", text(&o));
    vm.ok(&["unprotect", "--vm", "wc", "x"]);
    assert_eq!(vm.protected(), before);
    vm.wait_lines("version testkernel 1.0\n", 2, 60);
}

/// `lucos_version` with a variable of the patch's own, written at every call.
const COUNTED: &str = r#"#include "tk.h"
static u64 calls;
const char *lucos_version(void)
{
	u64 n = __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);

	if (n % 8 == 0)
		kprintf("[own] %lu calls\n", n);
	return "testkernel 1.0 (counted)";
}
"#;

/// The counts in `text`'s `TAG N calls` lines.
fn own_counts(text: &str, tag: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split(tag).nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn a_patchs_own_variables_are_written_without_a_trap_and_its_code_stays_read_only() {
    let vm = Vm::start("wc-own", "tasks=2 iters=0 report=50");
    vm.wait_lines("version testkernel 1.0\n", 2, 60);
    let before = vm.protected();
    let out = vm.build("counted", COUNTED);
    vm.ok(&["patch", "--vm", "wc", p(&out)]);
    // Its variable: whole pages of the patch area, written natively; the
    // area's only read-write slot, the rest of it (the code) read-only.
    let prot = vm.protected();
    let own: Vec<&Value> = prot["ranges"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|r| r["owner"] == "data:counted/own")
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(own.len(), 1, "{prot}");
    assert_eq!(own[0]["access"], "native", "{prot}");
    let (gpa, len) = (count(own[0], "gpa"), count(own[0], "len"));
    assert!(gpa % 4096 == 0 && len % 4096 == 0 && len > 0, "{prot}");
    let ram_end = before["slots"]
        .as_array()
        .and_then(|v| {
            v.iter()
                .map(|s| count(s, "gpa") + count(s, "len"))
                .filter(|&e| e < gpa)
                .max()
        })
        .expect("RAM slots");
    let area: Vec<&Value> = prot["slots"]
        .as_array()
        .map(|v| v.iter().filter(|s| count(s, "gpa") > ram_end).collect())
        .unwrap_or_default();
    let writable: Vec<(u64, u64)> = area
        .iter()
        .filter(|s| s["readonly"] == false)
        .map(|s| (count(s, "gpa"), count(s, "len")))
        .collect();
    assert_eq!(writable, vec![(gpa, len)], "{prot}");
    assert!(area.len() >= 2, "the code's page stays read-only: {prot}");
    // Both vCPUs count through it, with no write trapped: every count
    // printed once (two vCPUs may print out of order).
    let trapped = count(&vm.stats(), "trapped");
    let mark = vm.serial().len();
    vm.wait_lines("[own] ", 6, 60);
    let out = vm.serial();
    let mut counts = own_counts(&out[mark..], "[own] ");
    assert!(counts.len() >= 6, "{out}");
    let printed = counts.len();
    counts.sort_unstable();
    counts.dedup();
    assert!(
        counts.len() == printed && counts.iter().all(|n| n % 8 == 0),
        "own counter: {counts:?}"
    );
    assert_eq!(count(&vm.stats(), "trapped"), trapped, "writes trapped");
    // Handed to a new VMM process: the same slots, the count goes on.
    vm.ok(&["upgrade", "--vm", "wc"]);
    let again = vm.protected();
    assert_eq!(again["slots"], prot["slots"], "{again}");
    let last = *counts.last().expect("counts");
    let mark = vm.serial().len();
    vm.wait_lines("[own] ", 2, 60);
    let later = own_counts(&vm.serial()[mark..], "[own] ");
    assert!(later.iter().all(|&n| n > last), "{later:?} after {last}");
    assert_eq!(count(&vm.stats(), "trapped"), trapped, "writes trapped");
    // A cumulative patch that replaces it, with the same variable: the
    // count goes on from where it was (carried in the switch's pause).
    let later_max = later.iter().copied().max().unwrap_or(last);
    let out2 = vm.build("counted2", &COUNTED.replace("[own]", "[own2]"));
    vm.ok(&["patch", "--vm", "wc", "--replace", p(&out2)]);
    let mark = vm.serial().len();
    vm.wait_lines("[own2] ", 2, 60);
    let carried = own_counts(&vm.serial()[mark..], "[own2] ");
    assert!(
        carried.iter().all(|&n| n > later_max),
        "the count restarted: {carried:?} after {later_max}"
    );
    let names: Vec<String> = vm.protected()["ranges"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|r| r["owner"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        names.contains(&"data:counted2/own".to_owned())
            && !names.iter().any(|n| n == "data:counted/own"),
        "{names:?}"
    );
    // Revert: the area read-only as before (and the text's relayed slot
    // given back).
    vm.ok(&["revert", "--vm", "wc", "counted2"]);
    vm.ok(&["unprotect", "--vm", "wc", "lucos:text"]);
    let back = vm.protected();
    assert_eq!(back["ranges"], before["ranges"], "{back}");
    assert_eq!(back["slots"], before["slots"], "{back}");
}

#[test]
fn kernel_text_integrity_refuses_all_writers_but_the_kernels_own_and_never_a_patch() {
    let vm = Vm::start("wc-text", "tasks=2 iters=0 mode=poke report=200");
    vm.wait_lines("version testkernel 1.0\n", 4, 60);
    let before = vm.protected();
    // Kernel text protected, no writer allowed: the kernel's writes to its
    // own text page are refused, so what it reads back differs.
    let prot = vm.json(&["protect", "--vm", "wc", "--kernel-text", "--json"]);
    assert_eq!(prot["ranges"][0]["owner"], "kernel-text", "{prot}");
    assert_eq!(prot["ranges"][0]["label"], ".text", "{prot}");
    vm.wait_lines("poke MISMATCH", 2, 60);
    let ev = vm.json(&["events", "--vm", "wc", "--json"]);
    let e = &ev["events"][0];
    assert_eq!(e["owner"], "kernel-text", "{ev}");
    assert!(
        e["target"]
            .as_str()
            .is_some_and(|t| t.starts_with(".text+0x")),
        "{ev}"
    );
    // The kernel's text patcher named: its writes go through again.
    vm.ok(&["unprotect", "--vm", "wc", "kernel-text"]);
    vm.ok(&[
        "protect",
        "--vm",
        "wc",
        "--kernel-text",
        "--allow-writer",
        "text_poke_service",
    ]);
    let mark = vm.serial().len();
    vm.wait_lines("version testkernel 1.0\n", 6, 60);
    let out = vm.serial();
    assert!(
        !out[mark..].lines().skip(2).any(|l| l.contains("MISMATCH")),
        "an allowed writer was refused:\n{out}"
    );
    // A patch's jump stays refused to that writer too.
    vm.patch_fix_and_see_it_stay(8);
    let since = count(&ev, "next") - 1;
    let later = vm.json(&[
        "events",
        "--vm",
        "wc",
        "--json",
        "--since",
        &since.to_string(),
    ]);
    let owners: Vec<&str> = later["events"]
        .as_array()
        .map(|v| v.iter().filter_map(|e| e["owner"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        owners.contains(&"patch:fix"),
        "owners of later events: {owners:?}"
    );
    vm.ok(&["revert", "--vm", "wc", "fix"]);
    vm.ok(&["unprotect", "--vm", "wc", "kernel-text"]);
    vm.ok(&["unprotect", "--vm", "wc", "lucos:text"]);
    let back = vm.protected();
    assert_eq!(back["ranges"], before["ranges"], "{back}");
    assert_eq!(back["slots"], before["slots"], "{back}");
}

#[test]
fn run_protect_kernel_protects_the_text_once_tasks_run() {
    let vm = Vm::start_with(
        "wc-boot",
        "tasks=2 iters=0 mode=poke report=200",
        &["--protect-kernel"],
    );
    // Once a vCPU has run in user mode the text is protected; the kernel's
    // own writes to its text page are refused from then on.
    vm.wait_lines("poke MISMATCH", 2, 60);
    let prot = vm.protected();
    assert_eq!(prot["ranges"][0]["owner"], "kernel-text", "{prot}");
    let log = std::fs::read_to_string(vm.path("wc.log")).unwrap_or_default();
    assert!(log.contains("kernel text integrity on"), "{log}");
}
