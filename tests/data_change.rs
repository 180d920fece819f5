//! A live data-layout change on the test kernel on /dev/kvm (the LUCOS
//! idea): the stats table's `struct task_stat` gets a new layout (a member
//! added in the middle with a declared start value, one added at the end)
//! while tasks on 2 vCPUs keep updating it. The patched `stats_update`
//! uses the new copy; unpatched kernel code (`stats_read`, through `SYS_STAT_READ`) still reads
//! the old one. Every write to either copy is trapped and transferred, so
//! every report the guest prints checks, from both sides, that no update
//! was lost: the new code's result equals the task's own count (`lost=0`),
//! and the old copy read by old code holds exactly that many calls and
//! their sum. Revert brings the old layout back with every update kept;
//! apply and revert again, under load. Bad data declarations are refused
//! at build time with their cause.

mod common;

use std::path::PathBuf;

use common::cli::{kernel, p, text, RunDir};
use common::stats::{all_users, new_stats, NEW_LAYOUT};
use serde_json::Value;

struct Vm {
    dir: RunDir,
    serial: PathBuf,
}

impl Vm {
    fn start(name: &str) -> Self {
        Self::start_with(name, "tasks=2 iters=0 report=500")
    }

    fn start_with(name: &str, cmdline: &str) -> Self {
        common::require_kvm();
        let dir = RunDir::new(name);
        let serial = dir.0.join("serial.log");
        let vm = Vm { dir, serial };
        vm.ok(&["keygen", "-o", p(&vm.path("key"))]);
        let (serial, key) = (vm.serial.clone(), vm.path("key.pub"));
        common::cli::start(
            &vm.dir,
            "dc",
            &[
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
            ],
        );
        vm
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.0.join(f)
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.dir.lucos(args)
    }

    /// As [`Self::ok`], trying again while lucos answers "busy" (exit 7:
    /// a vCPU was in the replaced code at every pause of the try; the
    /// documented answer is to try again). Here the guest's tasks run the
    /// patch's code nearly all the time, so one try can miss.
    fn ok_when_not_busy(&self, args: &[&str]) -> String {
        for _ in 0..9 {
            let o = self.run(args);
            if o.status.code() != Some(7) {
                assert!(
                    o.status.success(),
                    "lucos {args:?}: {}\n{}",
                    text(&o),
                    self.serial()
                );
                return String::from_utf8_lossy(&o.stdout).into_owned();
            }
        }
        self.ok(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "lucos {args:?}: {}\n{}",
            text(&o),
            self.serial()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// `lucos build` of `src` with `extra` arguments into NAME.lup.
    fn build(&self, name: &str, src: &str, extra: &[&str]) -> std::process::Output {
        let c = self.path(&format!("{name}.c"));
        std::fs::write(&c, src).expect("source");
        let (k, key, out) = (
            kernel(),
            self.path("key"),
            self.path(&format!("{name}.lup")),
        );
        let mut args = vec![
            "build",
            "--kernel",
            &k,
            "--key",
            p(&key),
            "--name",
            name,
            "-o",
            p(&out),
        ];
        args.extend_from_slice(extra);
        args.push(p(&c));
        self.run(&args)
    }

    /// stats2.lup: the stats table's new layout ([`new_stats`]), its
    /// added `generation` starting at 1.
    fn build_stats2(&self) {
        let o = self.build(
            "stats2",
            &new_stats(),
            &[
                "--data",
                "stats_table:task_stat",
                "--init",
                "stats_table.generation=1",
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
    }

    /// stats2b.lup: the next cumulative patch of [`Vm::build_stats2`]: the
    /// same change, and one more function ([`stats2b_source`]).
    fn build_stats2b(&self) {
        let args = [
            "--data",
            "stats_table:task_stat",
            "--init",
            "stats_table.generation=1",
        ];
        let o = self.build("stats2b", &stats2b_source(), &args);
        assert!(o.status.success(), "{}", text(&o));
    }

    /// Waits for `n` more stats reports of every task after `from` (a byte
    /// offset of the serial log), checking each: the task's count, the old
    /// copy's calls and sum as unpatched code reads them, nothing lost.
    /// Returns how many were checked.
    fn check_reports(&self, from: usize, n: usize) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let out = self.serial();
            let mut seen = [0usize; 2];
            let mut checked = 0;
            for l in out[from.min(out.len())..].lines() {
                let Some(r) = Report::parse(l) else { continue };
                assert_eq!(r.calls, r.iter, "old copy's calls differ: {l}\n{out}");
                assert_eq!(
                    r.sum,
                    r.iter * (r.iter + 1) / 2,
                    "old copy's sum differs: {l}\n{out}"
                );
                assert_eq!(r.lost, 0, "an update was lost: {l}\n{out}");
                // Even values are written by new code to `latest`, odd ones
                // by old code to `last_value`: the C transfer keeps them one.
                assert_eq!(r.last, r.iter, "old copy's last value differs: {l}\n{out}");
                seen[r.task as usize % 2] += 1;
                checked += 1;
            }
            if seen.iter().all(|&s| s >= n) {
                return checked;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} reports of every task not seen in 120 s:\n{out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn list(&self) -> Value {
        serde_json::from_str(&self.ok(&["list", "--vm", "dc", "--json"])).expect("json")
    }

    /// Guest writes write control has trapped so far.
    fn trapped(&self) -> u64 {
        let s: Value =
            serde_json::from_str(&self.ok(&["status", "--vm", "dc", "--json"])).expect("json");
        s["write_control"]["trapped"]
            .as_u64()
            .unwrap_or_else(|| panic!("no write_control.trapped in {s}"))
    }
}

/// One `[tk] task T cpu C iter I counter X stats calls=.. sum=.. lost=..` line.
struct Report {
    task: u64,
    iter: u64,
    calls: u64,
    sum: u64,
    last: u64,
    lost: u64,
}

impl Report {
    fn parse(l: &str) -> Option<Self> {
        let l = &l[l.find("[tk] task ")?..];
        let w: Vec<&str> = l.split_whitespace().collect();
        let val = |k: &str| -> Option<u64> {
            w.iter()
                .find_map(|x| x.strip_prefix(&format!("{k}=")))?
                .parse()
                .ok()
        };
        let after = |k: &str| -> Option<u64> {
            w.iter()
                .position(|x| *x == k)
                .and_then(|i| w.get(i + 1))?
                .parse()
                .ok()
        };
        Some(Report {
            task: after("task")?,
            iter: after("iter")?,
            calls: val("calls")?,
            sum: val("sum")?,
            last: val("last")?,
            lost: val("lost")?,
        })
    }
}

#[test]
fn stats_table_gets_a_new_layout_live_and_back_with_no_update_lost() {
    let vm = Vm::start("data-change");
    vm.check_reports(0, 2);
    vm.build_stats2();
    let shown = vm.ok(&["inspect", p(&vm.path("stats2.lup"))]);
    for what in [
        "stats_table",
        "lucos_to_new_stats_table / lucos_to_old_stats_table",
        "latest",
        "added (set by C)",
        "read by C",
        "converted",
    ] {
        assert!(shown.contains(what), "inspect shows {what}:\n{shown}");
    }

    for round in 0..3 {
        let at = vm.serial().len();
        let out = vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats2.lup"))]);
        assert!(out.contains("applied 'stats2'"), "{out}");
        let checked = vm.check_reports(at, 3);
        assert!(checked >= 6, "round {round}: {checked} reports");
        let l = vm.list();
        let d = &l["patches"][0]["data"][0];
        assert_eq!(d["symbol"], "stats_table", "{l}");
        assert_eq!(d["count"], 8, "{l}");
        assert_eq!(d["old_bytes"], 8 * 32, "{l}");
        assert_eq!(d["new_bytes"], 8 * 48, "{l}");
        assert_eq!(d["stats"]["state"], "tracking", "{l}");
        // The new code's writes reached the old copy through transfers.
        assert!(d["stats"]["transfers"].as_u64().unwrap_or(0) > 0, "{l}");
        assert_eq!(d["stats"]["failures"], 0, "{l}");
        // The compiled C functions were interpreted (no VM entry per
        // trapped write), after giving the KVM sandbox's results in the
        // dry run.
        assert_eq!(d["stats"]["c_engine"], "interpreter", "{l}");
        // Unpatched code that reads and writes the table keeps the old
        // copy in use.
        for f in ["stats_read", "stats_record"] {
            assert!(
                d["users_left"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|x| x == f)),
                "{f}: {l}"
            );
        }
        let prot = l["protected"].to_string();
        assert!(
            prot.contains("stats_table (old)") && prot.contains("stats_table (new)"),
            "{l}"
        );
        let text = vm.ok(&["list", "--vm", "dc"]);
        for what in [
            "data      stats_table (struct task_stat x 8): 256 -> 384 bytes",
            "tracking: ",
            " writes transferred in ",
            "old copy still used by ",
        ] {
            assert!(text.contains(what), "lucos list shows '{what}':\n{text}");
        }

        let at = vm.serial().len();
        let out = vm.ok(&["revert", "--vm", "dc", "stats2"]);
        assert!(out.contains("reverted 'stats2'"), "{out}");
        vm.check_reports(at, 3);
        let l = vm.list();
        assert_eq!(l["patches"].as_array().map(Vec::len), Some(0), "{l}");
        assert!(!l["protected"].to_string().contains("stats_table"), "{l}");
    }
    // The area holds nothing after the last revert: code and copy freed.
    assert_eq!(vm.list()["patch_area"]["used_bytes"], 0);

    // 100 more apply/revert cycles under load, back to back, every other
    // one in immediate mode (a call already inside the old stats_update
    // finishes there, on the old copy, while new calls use the new one);
    // every report printed meanwhile is checked.
    let at = vm.serial().len();
    for i in 0..100 {
        let mode = if i % 2 == 0 {
            "immediate"
        } else {
            "consistent"
        };
        vm.ok(&[
            "patch",
            "--vm",
            "dc",
            "--mode",
            mode,
            p(&vm.path("stats2.lup")),
        ]);
        vm.ok(&["revert", "--vm", "dc", "stats2"]);
    }
    let checked = vm.check_reports(at, 3);
    assert!(checked >= 6, "{checked} reports");
    assert_eq!(vm.list()["patch_area"]["used_bytes"], 0);
}

#[test]
fn c_transfers_that_fault_run_away_or_use_the_kernel_are_refused_and_change_nothing() {
    let vm = Vm::start("data-cbad");
    vm.check_reports(0, 1);
    let before = vm.list();
    for (name, body, why) in [
        (
            "cfault",
            "(void)old; new->latest = *(volatile u64 *)(new->sum | 16);",
            "faulted: #PF",
        ),
        (
            "crun",
            "(void)old; (void)new; for (;;) __asm__ volatile(\"\");",
            "ran past its time limit",
        ),
        (
            "ckernel",
            "(void)old; new->latest = stats_table[0].sum;",
            "(it uses stats_table)",
        ),
        (
            "cown",
            "static u64 seen; (void)old; new->latest = ++seen;",
            "a variable of the patch's own",
        ),
    ] {
        let src = new_stats().replace("new->latest = old->last_value;", body);
        let o = vm.build(name, &src, &["--data", "stats_table:task_stat"]);
        assert!(o.status.success(), "{}", text(&o));
        let o = vm.run(&["patch", "--vm", "dc", p(&vm.path(&format!("{name}.lup")))]);
        assert_eq!(o.status.code(), Some(6), "{name}: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("lucos_to_new_stats_table") && t.contains(why),
            "{name}: {t}"
        );
        let l = vm.list();
        assert_eq!(l["patches"], before["patches"], "{name}: {l}");
        assert_eq!(l["protected"], before["protected"], "{name}: {l}");
        assert_eq!(l["patch_area"], before["patch_area"], "{name}: {l}");
    }
    // The guest went on exactly.
    let at = vm.serial().len();
    vm.check_reports(at, 2);
    vm.check_reports(0, 2);
}

#[test]
fn a_change_whose_old_users_are_all_replaced_retires_and_reverts_exactly() {
    let vm = Vm::start("data-retire");
    vm.check_reports(0, 2);
    let o = vm.build("stats3", &all_users(), &["--data", "stats_table:task_stat"]);
    assert!(o.status.success(), "{}", text(&o));
    for _ in 0..2 {
        let at = vm.serial().len();
        vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats3.lup"))]);
        // The VMM retires it in the background once nothing runs old code.
        let l = vm.wait_retired();
        let d = &l["patches"][0]["data"][0];
        assert_eq!(d["users_left"].as_array().map(Vec::len), Some(0), "{l}");
        assert!(d["stats"]["retired_after_ms"].is_u64(), "{l}");
        let text = vm.ok(&["list", "--vm", "dc"]);
        assert!(text.contains(" ms after the apply: "), "{text}");
        assert!(
            text.contains("memory scanned for pointers into the old copy: ")
                && text.contains("(retirement pause "),
            "{text}"
        );
        let scan = &d["stats"]["scan"];
        assert!(scan["bytes"].as_u64() >= Some(64 << 20), "{l}");
        assert!(d["stats"]["retire_pause_us"].as_u64() > Some(0), "{l}");
        // The old copy is ordinary memory again; the new one's pages are
        // the guest's: written without an exit.
        let prot = l["protected"].to_string();
        assert!(!prot.contains("stats_table (old)"), "{l}");
        let new = l["protected"]
            .as_array()
            .and_then(|v| {
                v.iter()
                    .find(|p| p["label"] == "stats_table (new, retired)")
            })
            .unwrap_or_else(|| panic!("no retired new copy in {l}"));
        assert_eq!(new["access"], "native", "{l}");
        assert_eq!(new["len"].as_u64().map(|n| n % 4096), Some(0), "{l}");
        // Writes to the new copy are no longer transferred, nor trapped:
        // the tasks go on updating it through the patched code.
        let t0 = d["stats"]["transfers"].as_u64();
        let w0 = vm.trapped();
        vm.check_reports(vm.serial().len(), 2);
        assert_eq!(
            vm.list()["patches"][0]["data"][0]["stats"]["transfers"].as_u64(),
            t0
        );
        assert_eq!(vm.trapped(), w0, "writes to a retired copy trapped");
        vm.check_reports(at, 3);
        // Revert: the old copy, stale since the retirement, is written from
        // the new one in the revert's pause; old code goes on exactly.
        let at = vm.serial().len();
        vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats3"]);
        vm.check_reports(at, 3);
    }
    // A patch applied earlier whose code uses the table (through the old
    // layout) keeps using the old copy: the change then never retires.
    let early = "#include \"tk.h\"\nvoid *stats_addr(void)\n{\n\treturn &stats_table[0];\n}\n";
    let o = vm.build("early", early, &[]);
    assert!(o.status.success(), "{}", text(&o));
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("early.lup"))]);
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats3.lup"))]);
    let at = vm.serial().len();
    vm.check_reports(at, 3);
    let l = vm.list();
    let d = &l["patches"][1]["data"][0];
    assert_eq!(d["users_left"], serde_json::json!(["patch early"]), "{l}");
    assert_eq!(d["stats"]["state"], "tracking", "{l}");
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats3"]);
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "early"]);
    vm.check_reports(vm.serial().len(), 2);
}

#[test]
fn a_cumulative_patch_carries_a_data_change_over_and_its_revert_restores_the_old_layout() {
    let vm = Vm::start("data-replace");
    vm.check_reports(0, 2);
    vm.build_stats2();
    // The next cumulative patch: the same change, and one more function.
    let v2 = stats2b_source();
    vm.build_stats2b();
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats2.lup"))]);
    vm.check_reports(vm.serial().len(), 2);
    let l = vm.list();
    let d = &l["patches"][0]["data"][0];
    let (new_addr, t0) = (d["new_addr"].clone(), d["stats"]["transfers"].as_u64());
    let protected = l["protected"].clone();

    // The cumulative patch takes the change over as it is: the same new
    // copy, still tracked under the owner it was applied with, its
    // transfers going on; the new function in effect.
    let at = vm.serial().len();
    let out = vm.ok(&[
        "patch",
        "--vm",
        "dc",
        "--replace",
        p(&vm.path("stats2b.lup")),
    ]);
    assert!(out.contains("replaced every patch with 'stats2b'"), "{out}");
    vm.check_reports(at, 3);
    assert!(
        vm.serial()[at..].contains("(cumulative)"),
        "the cumulative patch's function is not in effect:\n{}",
        &vm.serial()[at..]
    );
    let l = vm.list();
    assert_eq!(l["patches"].as_array().map(Vec::len), Some(1), "{l}");
    let d = &l["patches"][0]["data"][0];
    assert_eq!(l["patches"][0]["name"], "stats2b", "{l}");
    assert_eq!(d["symbol"], "stats_table", "{l}");
    assert_eq!(d["new_addr"], new_addr, "the new copy moved: {l}");
    assert_eq!(d["owner"], "data:stats2:stats_table", "{l}");
    assert_eq!(d["stats"]["state"], "tracking", "{l}");
    assert_eq!(d["stats"]["failures"], 0, "{l}");
    assert!(d["stats"]["transfers"].as_u64() > t0, "{l}");
    let copies = |l: &Value| -> Vec<Value> {
        l["protected"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter(|p| {
                        p["label"]
                            .as_str()
                            .is_some_and(|s| s.contains("stats_table"))
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        copies(&l),
        copies(&serde_json::json!({ "protected": protected })),
        "{l}"
    );
    assert_eq!(copies(&l).len(), 2, "{l}");
    let shown = vm.ok(&["list", "--vm", "dc"]);
    assert!(shown.contains("carried over"), "{shown}");
    // A lucos that reads only the handover format of before carried changes
    // is refused the VM; a new process takes it over with the owner kept.
    let older = vm.path("older-lucos");
    std::fs::write(
        &older,
        format!(
            "#!/bin/sh\nLUCOS_HANDOFF_READS=2 exec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_lucos")
        ),
    )
    .expect("script");
    let exec = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(&older, exec).expect("chmod");
    let o = vm.run(&["upgrade", "--vm", "dc", "--binary", p(&older)]);
    assert!(
        !o.status.success(),
        "an older lucos took the VM: {}",
        text(&o)
    );
    assert!(text(&o).contains("format 3"), "{}", text(&o));
    upgrade(&vm);
    let l = vm.list();
    assert_eq!(
        l["patches"][0]["data"][0]["owner"], "data:stats2:stats_table",
        "{l}"
    );
    vm.check_reports(vm.serial().len(), 2);

    // Its revert brings the old layout back with every update kept.
    let at = vm.serial().len();
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats2b"]);
    vm.check_reports(at, 3);
    let l = vm.list();
    assert_eq!(l["patches"].as_array().map(Vec::len), Some(0), "{l}");
    assert!(!l["protected"].to_string().contains("stats_table"), "{l}");
    // And again from the start: nothing was left behind.
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats2.lup"))]);
    vm.ok(&[
        "patch",
        "--vm",
        "dc",
        "--replace",
        p(&vm.path("stats2b.lup")),
    ]);
    let at = vm.serial().len();
    vm.check_reports(at, 2);
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats2b"]);
    vm.check_reports(vm.serial().len(), 2);

    // A retired change is carried over too, by a patch that replaces every
    // user it did; one that brings an old user back makes it anew (the old
    // copy from the new one, tracked again).
    let data = ["--data", "stats_table:task_stat"];
    let o = vm.build("stats3", &all_users(), &data);
    assert!(o.status.success(), "{}", text(&o));
    let more = &v2[new_stats().len()..];
    let o = vm.build("stats3b", &format!("{}{more}", all_users()), &data);
    assert!(o.status.success(), "{}", text(&o));
    let o = vm.build("stats3c", &new_stats(), &data);
    assert!(o.status.success(), "{}", text(&o));
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats3.lup"))]);
    vm.wait_retired();
    // The old copy went stale when the change retired: the old user brought
    // back (unpatched stats_read, which the reports read through) sees every
    // update only if it was made again from the new copy.
    let at = vm.serial().len();
    vm.ok_when_not_busy(&[
        "patch",
        "--vm",
        "dc",
        "--replace",
        p(&vm.path("stats3c.lup")),
    ]);
    vm.check_reports(at, 3);
    let l = vm.list();
    let d = &l["patches"][0]["data"][0];
    assert_eq!(l["patches"][0]["name"], "stats3c", "{l}");
    assert_eq!(d["owner"], Value::Null, "{l}");
    assert_eq!(d["stats"]["state"], "tracking", "{l}");
    assert!(
        d["users_left"]
            .as_array()
            .is_some_and(|u| u.iter().any(|x| x == "stats_read")),
        "{l}"
    );
    let at = vm.serial().len();
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats3c"]);
    vm.check_reports(at, 3);
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats3.lup"))]);
    vm.wait_retired();
    let at = vm.serial().len();
    vm.ok(&[
        "patch",
        "--vm",
        "dc",
        "--replace",
        p(&vm.path("stats3b.lup")),
    ]);
    vm.check_reports(at, 3);
    assert!(vm.serial()[at..].contains("(cumulative)"));
    let l = vm.list();
    let d = &l["patches"][0]["data"][0];
    assert_eq!(d["owner"], "data:stats3:stats_table", "{l}");
    assert_eq!(d["stats"]["state"], "retired", "{l}");
    let at = vm.serial().len();
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats3b"]);
    vm.check_reports(at, 3);
    assert_eq!(vm.list()["patches"].as_array().map(Vec::len), Some(0));
}

/// The stats table's third layout ([`new_stats`] and one more member), and
/// `lucos_version` saying whether `generation`, which [`new_stats`] added
/// and this patch adds too but leaves alone, kept what the code it
/// replaces wrote there (2) rather than its initial value here (7).
fn third_layout() -> String {
    format!(
        "{}\nconst char *lucos_version(void)\n{{\n\treturn stats_table[0].generation == 2 ? \
         \"testkernel layout3 generation kept\" : \"testkernel layout3 generation lost\";\n}}\n",
        new_stats()
            .replace(
                "\tu64 max_value;\n};",
                "\tu64 max_value;\n\tu64 min_value;\n};"
            )
            .replace(
                "\ts->generation = 2;\n",
                "\tif (!s->min_value || value < s->min_value)\n\t\ts->min_value = value;\n"
            )
    )
}

#[test]
fn a_cumulative_patch_lays_a_changed_object_out_again_or_drops_the_change_with_no_update_lost() {
    let vm = Vm::start("data-relayout");
    vm.check_reports(0, 2);
    vm.build_stats2();
    let third = [
        "--data",
        "stats_table:task_stat",
        "--init",
        "stats_table.generation=7",
    ];
    let o = vm.build("stats4", &third_layout(), &third);
    assert!(o.status.success(), "{}", text(&o));
    let plain = "#include \"tk.h\"\nconst char *lucos_version(void)\n{\n\treturn \"x\";\n}\n";
    let o = vm.build("nodata", plain, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let copies = |l: &Value| -> Vec<String> {
        let mut v: Vec<String> = l["protected"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|p| p["label"].as_str())
                    .filter(|s| s.contains("stats_table"))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };

    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats2.lup"))]);
    vm.check_reports(vm.serial().len(), 2);
    let l = vm.list();
    let mut before = l["patches"][0]["data"][0]["new_addr"].clone();
    // Stacked, another layout of the same object is refused, pointing to
    // the cumulative patch; nothing changes.
    let o = vm.run(&["patch", "--vm", "dc", p(&vm.path("stats4.lup"))]);
    assert!(!o.status.success(), "stacked: {}", text(&o));
    assert!(
        text(&o).contains("stats_table already has a new layout from patch 'stats2'")
            && text(&o).contains("--replace"),
        "{}",
        text(&o)
    );
    let after = vm.list();
    assert_eq!(after["protected"], l["protected"], "{after}");
    assert_eq!(after["patch_area"], l["patch_area"], "{after}");
    assert_eq!(
        after["patches"].as_array().map(Vec::len),
        Some(1),
        "{after}"
    );

    // Another layout in one switch: stats2's change undone (the old copy
    // from its new one), stats4's made from there, while old code
    // (stats_record, stats_read) and new code keep updating the table:
    // every report after it checks that no update was lost.
    for round in 0..2 {
        let at = vm.serial().len();
        let out = vm.ok_when_not_busy(&[
            "patch",
            "--vm",
            "dc",
            "--replace",
            p(&vm.path("stats4.lup")),
        ]);
        assert!(out.contains("replaced every patch with 'stats4'"), "{out}");
        vm.check_reports(at, 3);
        let since = &vm.serial()[at..];
        assert!(
            since.contains("layout3 generation kept") && !since.contains("generation lost"),
            "round {round}: {since}"
        );
        let l = vm.list();
        assert_eq!(l["patches"].as_array().map(Vec::len), Some(1), "{l}");
        assert_eq!(l["patches"][0]["name"], "stats4", "{l}");
        let d = &l["patches"][0]["data"][0];
        assert_ne!(d["new_addr"], before, "the same new copy: {l}");
        assert_eq!(d["new_bytes"], 8 * 56, "{l}");
        assert_eq!(d["stats"]["state"], "tracking", "{l}");
        assert_eq!(d["stats"]["failures"], 0, "{l}");
        // Its own owner; a patch of the same name that it replaced held
        // the first one until the switch.
        let owner = if round == 0 {
            "data:stats4:stats_table"
        } else {
            "data:stats4:stats_table#2"
        };
        assert_eq!(
            d["owner"].as_str().unwrap_or("data:stats4:stats_table"),
            owner,
            "{l}"
        );
        assert_eq!(
            copies(&l),
            ["stats_table (new)", "stats_table (old)"],
            "stats2's protections left behind: {l}"
        );
        before = d["new_addr"].clone();
        // Round 2 replaces stats4 by a patch of the same name whose change
        // differs (another initial value): made anew again.
        let o = vm.build(
            "stats4",
            &third_layout(),
            &[
                "--data",
                "stats_table:task_stat",
                "--init",
                "stats_table.generation=9",
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
    }

    // A cumulative patch without the change drops it: the old layout back
    // in its switch with every update kept, nothing of it left.
    let at = vm.serial().len();
    vm.ok_when_not_busy(&[
        "patch",
        "--vm",
        "dc",
        "--replace",
        p(&vm.path("nodata.lup")),
    ]);
    vm.check_reports(at, 3);
    assert!(
        vm.serial()[at..].contains("version x"),
        "{}",
        &vm.serial()[at..]
    );
    let l = vm.list();
    assert_eq!(l["patches"][0]["name"], "nodata", "{l}");
    assert!(l["patches"][0]["data"].is_null(), "{l}");
    assert!(copies(&l).is_empty(), "{l}");
    vm.ok(&["revert", "--vm", "dc", "nodata"]);
    vm.check_reports(vm.serial().len(), 2);
    let used = |l: &Value| l["patch_area"]["used_bytes"].as_u64();
    assert_eq!(used(&vm.list()), Some(0), "area left taken");

    // A change carried over (its copy in the run of the patch that made
    // it, held by the cumulative patch) undone by the next cumulative
    // patch: exact, and both runs given back.
    vm.build_stats2b();
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats2.lup"))]);
    vm.ok_when_not_busy(&[
        "patch",
        "--vm",
        "dc",
        "--replace",
        p(&vm.path("stats2b.lup")),
    ]);
    let l = vm.list();
    assert_eq!(
        l["patches"][0]["data"][0]["owner"], "data:stats2:stats_table",
        "{l}"
    );
    let at = vm.serial().len();
    vm.ok_when_not_busy(&[
        "patch",
        "--vm",
        "dc",
        "--replace",
        p(&vm.path("stats4.lup")),
    ]);
    vm.check_reports(at, 3);
    assert!(vm.serial()[at..].contains("layout3 generation kept"));
    let l = vm.list();
    assert_eq!(l["patches"][0]["data"][0]["stats"]["failures"], 0, "{l}");
    let at = vm.serial().len();
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats4"]);
    vm.check_reports(at, 3);
    assert_eq!(used(&vm.list()), Some(0), "area left taken");
}

#[test]
fn code_of_patches_replaced_in_immediate_mode_is_given_back_once_nothing_is_in_it() {
    let vm = Vm::start("data-kept-code");
    vm.check_reports(0, 1);
    // With a variable of its own, written at every call (its pages stay
    // writable while the code is kept).
    let version = |s: &str| {
        format!(
            "#include \"tk.h\"\nstatic unsigned long calls;\nconst char *lucos_version(void)\n{{\n\tcalls++;\n\treturn calls ? \"{s}\" : \"\";\n}}\n"
        )
    };
    for (name, src) in [("one", version("one")), ("two", version("two"))] {
        let o = vm.build(name, &src, &[]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let used = |l: &Value| l["patch_area"]["used_bytes"].as_u64().expect("used");
    let kept = |l: &Value| l["kept_code"].as_array().map_or(0, Vec::len);
    // Waits for the background check to give the kept code back.
    let given_back = || -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let l = vm.list();
            if kept(&l) == 0 {
                return l;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still kept after 60 s: {l}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("one.lup"))]);
    let alone = used(&vm.list());
    // Immediate: the switch does not wait for calls in `one`'s code, which
    // stays taken, listed, until a background pause finds nothing in it.
    let replace_immediate = |name: &str| {
        vm.ok(&[
            "patch",
            "--vm",
            "dc",
            "--replace",
            "--mode",
            "immediate",
            p(&vm.path(&format!("{name}.lup"))),
        ])
    };
    replace_immediate("two");
    let l = vm.list();
    if kept(&l) == 1 {
        assert_eq!(l["kept_code"][0]["patch"], "one", "{l}");
        assert!(used(&l) > alone, "{l}");
        assert!(l["protected"].to_string().contains("kept@"), "{l}");
    }
    let l = given_back();
    assert_eq!(used(&l), alone, "{l}");
    assert!(!l["protected"].to_string().contains("kept@"), "{l}");
    let own = |l: &Value| l["protected"].to_string().matches("/own").count();
    assert_eq!(own(&l), 1, "{l}");
    vm.check_reports(vm.serial().len(), 1);
    assert!(vm.serial().contains("version two"));
    vm.ok(&["revert", "--vm", "dc", "two"]);
    assert_eq!(used(&vm.list()), 0);
    // A consistent cumulative patch waits for the kept code too, and gives
    // it back in its switch if the background check has not yet.
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("one.lup"))]);
    replace_immediate("two");
    vm.ok(&["patch", "--vm", "dc", "--replace", p(&vm.path("one.lup"))]);
    let l = vm.list();
    assert_eq!(kept(&l), 0, "{l}");
    assert_eq!(used(&l), alone, "{l}");
    vm.ok(&["revert", "--vm", "dc", "one"]);
    assert_eq!(used(&vm.list()), 0);

    // A change carried over in immediate mode: the run holding its copy
    // goes, once its code is left, to the patch carrying it, and with it
    // at its revert.
    vm.build_stats2();
    vm.build_stats2b();
    // Reverted at once, before or after the kept code went: the revert
    // frees the copy that code uses, so it waits for it and gives it back.
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats2.lup"))]);
    replace_immediate("stats2b");
    let at = vm.serial().len();
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats2b"]);
    let l = vm.list();
    assert_eq!(kept(&l), 0, "{l}");
    assert_eq!(used(&l), 0, "{l}");
    vm.check_reports(at, 2);
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats2.lup"))]);
    let stats2_run = vm.list()["patches"][0]["code_addr"].clone();
    replace_immediate("stats2b");
    let l = given_back();
    let a = &l["patches"][0];
    assert_eq!(a["name"], "stats2b", "{l}");
    assert_eq!(a["held_runs"].as_array().map(Vec::len), Some(1), "{l}");
    assert_eq!(a["data"][0]["stats"]["state"], "tracking", "{l}");
    let at = vm.serial().len();
    vm.check_reports(at, 2);
    let l = vm.list();
    assert_ne!(l["patches"][0]["code_addr"], stats2_run, "{l}");
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats2b"]);
    vm.check_reports(vm.serial().len(), 2);
    assert_eq!(used(&vm.list()), 0, "area left taken");
}

#[test]
fn data_changes_lucos_cannot_derive_are_refused_at_build_time() {
    let vm = Vm::start("data-bad");
    let refused = |src: &str, extra: &[&str], why: &str| {
        let o = vm.build("bad", src, extra);
        assert!(!o.status.success(), "built: {}", text(&o));
        assert!(text(&o).contains(why), "expected '{why}' in: {}", text(&o));
        assert!(!vm.path("bad.lup").exists(), "a refused build left a file");
    };
    refused(
        NEW_LAYOUT,
        &["--data", "no_such_table:task_stat"],
        "no_such_table",
    );
    refused(
        NEW_LAYOUT,
        &["--data", "stats_table:no_such_struct"],
        "no_such_struct",
    );
    refused(
        &NEW_LAYOUT.replace("u64 calls;", "unsigned short calls;"),
        &["--data", "stats_table:task_stat"],
        "calls narrows",
    );
    refused(
        &NEW_LAYOUT
            .replace("u64 sum;", "void *sum;")
            .replace("s->sum += value;", ""),
        &["--data", "stats_table:task_stat"],
        "sum changes type",
    );
    refused(
        NEW_LAYOUT,
        &[
            "--data",
            "stats_table:task_stat",
            "--init",
            "stats_table.calls=3",
        ],
        "calls is in the old layout",
    );
    refused(NEW_LAYOUT, &["--data", "stats_table"], "SYMBOL:STRUCT");
    // An added list head would start as zero bytes, no empty list; an
    // added lock may (zero is unlocked).
    let list = "struct list_head { struct list_head *next, *prev; };\nstruct waiters { u32 n; struct list_head head; };\n";
    let with_member = |decl: &str, member: &str| {
        NEW_LAYOUT
            .replace("struct task_stat {", &format!("{decl}struct task_stat {{"))
            .replace(
                "\tu64 max_value;\n};",
                &format!("\tu64 max_value;\n\t{member};\n}};"),
            )
    };
    refused(
        &with_member(list, "struct waiters queue"),
        &["--data", "stats_table:task_stat"],
        "adds member queue (struct waiters) holding a list_head (struct list_head)",
    );
    // The kernel's accessor hands out the old table: code of the new
    // layout must not take it.
    refused(
        &NEW_LAYOUT
            .replace(
                "extern struct task_stat stats_table[MAX_TASKS];",
                "extern struct task_stat stats_table[MAX_TASKS];\nstruct task_stat *stats_addr(void);",
            )
            .replacen(
                "s = &stats_table[task];",
                "s = &stats_table[task];\n\tstats_addr()[task].latest = value;",
                1,
            ),
        &["--data", "stats_table:task_stat"],
        "calls stats_addr, which it does not replace, and takes a struct task_stat * from it",
    );
    let o = vm.build(
        "lock",
        &with_member(
            "typedef struct spinlock { u32 val; } spinlock_t;\n",
            "spinlock_t lock",
        ),
        &["--data", "stats_table:task_stat"],
    );
    assert!(o.status.success(), "an added lock: {}", text(&o));
    // A C transfer needs both directions.
    refused(
        &new_stats().replace("lucos_to_old_stats_table", "other_name"),
        &["--data", "stats_table:task_stat"],
        "but not lucos_to_old_stats_table",
    );
    // Declared, the narrowing is accepted.
    let o = vm.build(
        "narrow",
        &NEW_LAYOUT.replace("u64 calls;", "unsigned short calls;"),
        &[
            "--data",
            "stats_table:task_stat",
            "--narrow",
            "stats_table.calls",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
}

/// The counter's new layout (`ops` moves, two members join it) and the new
/// `ops_add`; `ops_tally` stays old code on the old copy.
const OPS_PATCH: &str = r#"typedef unsigned long u64;

struct op_count {
	u64 generation;
	u64 ops;
	u64 adds;
};

extern struct op_count op_count;

u64 ops_add(u64 n)
{
	u64 i;

	for (i = 0; i < n; i++)
		__atomic_add_fetch(&op_count.ops, 1, __ATOMIC_RELAXED);
	if (n)
		op_count.adds++;
	return __atomic_load_n(&op_count.ops, __ATOMIC_RELAXED);
}
"#;

/// `[tk] ops round R exact|LOST ...` lines after byte `from`.
fn ops_rounds(serial: &str, from: usize) -> Vec<String> {
    serial[from.min(serial.len())..]
        .lines()
        .filter(|l| l.contains("[tk] ops round "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_counter_incremented_atomically_by_old_and_new_code_on_two_vcpus_stays_exact() {
    // Each round: 2 tasks x 10000 locked increments, half through ops_add,
    // half through ops_tally; task 0 checks the total through both.
    const PER_ROUND: u64 = 2 * 10_000;
    let vm = Vm::start_with("data-ops", "tasks=2 mode=ops atomic_n=10000");
    let wait_rounds = |from: usize, n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
        loop {
            let out = vm.serial();
            let rounds = ops_rounds(&out, from);
            for l in &rounds {
                assert!(l.contains(" exact "), "an increment was lost: {l}\n{out}");
            }
            if rounds.len() >= n {
                return rounds.len();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} rounds not seen in 900 s:\n{out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    wait_rounds(0, 1);
    let o = vm.build("ops2", OPS_PATCH, &["--data", "op_count:op_count"]);
    assert!(o.status.success(), "{}", text(&o));
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("ops2.lup"))]);
    let t0 = std::time::Instant::now();
    let at = vm.serial().len();
    // A million increments while both copies are tracked (the round in
    // progress at the apply is not counted).
    let rounds = 1_000_000u64.div_ceil(PER_ROUND) as usize + 1;
    wait_rounds(at, rounds);
    let tracked = t0.elapsed();
    let l = vm.list();
    let d = &l["patches"][0]["data"][0];
    assert_eq!(d["stats"]["state"], "tracking", "{l}");
    let transfers = d["stats"]["transfers"].as_u64().unwrap_or(0);
    assert!(transfers >= 1_000_000, "{transfers} transfers: {l}");
    eprintln!(
        "{rounds} rounds ({} increments) tracked in {tracked:?}: {transfers} transfers",
        rounds as u64 * PER_ROUND
    );
    let at = vm.serial().len();
    vm.ok(&["revert", "--vm", "dc", "ops2"]);
    wait_rounds(at, 2);
}

/// The `upgrade` of VM `dc`'s VMM: the new process's pid.
fn upgrade(vm: &Vm) -> u64 {
    let out = vm.ok(&["upgrade", "--vm", "dc", "--json"]);
    let v: Value = serde_json::from_str(&out).expect("upgrade json");
    v["new_pid"].as_u64().expect("new_pid")
}

#[test]
fn tracked_data_changes_stay_coherent_through_vmm_upgrades_and_retire_after_one() {
    let vm = Vm::start("data-upgrade");
    vm.check_reports(0, 2);
    // A change that old code keeps using: tracked for as long as it is
    // applied; every write to either copy transferred, in whichever VMM
    // process runs the guest.
    vm.build_stats2();
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats2.lup"))]);
    vm.check_reports(vm.serial().len(), 2);
    let mut transfers = 0;
    for _ in 0..10 {
        upgrade(&vm);
        let at = vm.serial().len();
        vm.check_reports(at, 3);
        let l = vm.list();
        let d = &l["patches"][0]["data"][0];
        assert_eq!(d["stats"]["state"], "tracking", "{l}");
        assert_eq!(d["stats"]["failures"], 0, "{l}");
        // The counters go on from the old process's.
        let t = d["stats"]["transfers"].as_u64().expect("transfers");
        assert!(t > transfers, "{t} <= {transfers}: {l}");
        transfers = t;
        let prot = l["protected"].to_string();
        assert!(
            prot.contains("stats_table (old)") && prot.contains("stats_table (new)"),
            "{l}"
        );
    }
    let at = vm.serial().len();
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats2"]);
    vm.check_reports(at, 3);

    // A change that retires once nothing runs old code: handed over while
    // still tracked (the VMM retires in the background, about once a
    // second; an upgrade right after the apply comes first, else try
    // again), it retires in the new process.
    let o = vm.build("stats3", &all_users(), &["--data", "stats_table:task_stat"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut handed_while_tracked = None;
    for _ in 0..10 {
        vm.ok(&["patch", "--vm", "dc", p(&vm.path("stats3.lup"))]);
        let pid = upgrade(&vm);
        let l = vm.list();
        if l["patches"][0]["data"][0]["stats"]["state"] == "tracking" {
            handed_while_tracked = Some(pid);
            break;
        }
        vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats3"]);
    }
    let pid = handed_while_tracked.expect("never handed over while tracked in 10 tries");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let l = vm.list();
        if l["patches"][0]["data"][0]["stats"]["state"] == "retired" {
            assert_eq!(
                l["patches"][0]["data"][0]["users_left"]
                    .as_array()
                    .map(Vec::len),
                Some(0),
                "{l}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not retired in 60 s after an upgrade: {l}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status: Value =
        serde_json::from_str(&vm.ok(&["status", "--vm", "dc", "--json"])).expect("status json");
    assert_eq!(
        status["pid"], pid,
        "retired by the process the VM was handed to"
    );
    let at = vm.serial().len();
    vm.check_reports(at, 3);
    // And it reverts exactly from the new process after one more upgrade.
    upgrade(&vm);
    let at = vm.serial().len();
    vm.ok_when_not_busy(&["revert", "--vm", "dc", "stats3"]);
    vm.check_reports(at, 3);
}

/// mode=ctl's object with a member added in front (`max` and `used` move),
/// and its one user by name, which now also counts charges in the added
/// member. The ctl table's pointers are not in the patch: generic code.
const LIMITS2: &str = r#"typedef unsigned long u64;

struct tk_limits {
	u64 charges;
	u64 max;
	u64 used;
};

extern struct tk_limits tk_limits;

u64 limits_charge(u64 n)
{
	__atomic_add_fetch(&tk_limits.charges, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&tk_limits.used, n, __ATOMIC_RELAXED);
	return __atomic_load_n(&tk_limits.max, __ATOMIC_RELAXED);
}
"#;

impl Vm {
    /// Waits for `n` more `[tk] ctl round` reports after byte `from` of the
    /// serial log, each `ok`: the limit set through the ctl table's pointer
    /// is the one the charge was made against, and `used` read through the
    /// table holds every charge counted.
    fn check_ctl(&self, from: usize, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let out = self.serial();
            let rounds: Vec<&str> = out[from.min(out.len())..]
                .lines()
                .filter(|l| l.starts_with("[tk] ctl round "))
                .collect();
            if let Some(bad) = rounds.iter().find(|l| !l.contains(" ok ")) {
                panic!("{bad}\n{out}");
            }
            if rounds.len() >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} ctl reports not seen in 120 s:\n{out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// `lucos list` once the first patch's data change has retired (60 s
    /// at most).
    fn wait_retired(&self) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let l = self.list();
            if l["patches"][0]["data"][0]["stats"]["state"] == "retired" {
                return l;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not retired in 60 s: {l}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn inspect(&self, name: &str) -> String {
        self.ok(&["inspect", p(&self.path(&format!("{name}.lup")))])
    }
}

#[test]
fn kernel_pointers_into_a_changed_object_move_to_the_new_copy_and_it_retires() {
    let vm = Vm::start_with("data-repoint", "tasks=2 iters=0 report=200 mode=ctl");
    vm.check_ctl(0, 2);
    // Without --repoint the ctl table's pointers keep the old copy in use.
    let o = vm.build("limits1", LIMITS2, &["--data", "tk_limits:tk_limits"]);
    assert!(o.status.success(), "{}", text(&o));
    let shown = vm.inspect("limits1");
    assert!(
        shown.contains("still used by data tk_ctls+0x8, data tk_ctls+0x18"),
        "{shown}"
    );
    let o = vm.build(
        "limits2",
        LIMITS2,
        &["--data", "tk_limits:tk_limits", "--repoint", "tk_limits"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let shown = vm.inspect("limits2");
    assert!(!shown.contains("still used by"), "{shown}");
    // `&tk_limits.max` is `&tk_limits`: it follows `max` to its new place.
    for r in [
        "repoint   tk_ctls+0x8: tk_limits+0x0 -> new copy +0x8",
        "repoint   tk_ctls+0x18: tk_limits+0x8 -> new copy +0x10",
    ] {
        assert!(shown.contains(r), "{r}:\n{shown}");
    }
    for round in 0..2 {
        let at = vm.serial().len();
        vm.ok(&["patch", "--vm", "dc", p(&vm.path("limits2.lup"))]);
        let l = vm.wait_retired();
        let d = &l["patches"][0]["data"][0];
        assert_eq!(d["repointed"].as_array().map(Vec::len), Some(2), "{l}");
        // Generic code now reaches the new copy through the moved pointers
        // and the patched charge reads `max` there: every report agrees,
        // with nothing trapped any more.
        let w0 = vm.trapped();
        vm.check_ctl(vm.serial().len(), 3);
        assert_eq!(
            vm.trapped(),
            w0,
            "writes to a retired copy trapped (round {round})"
        );
        vm.check_ctl(at, 3);
        // Revert after retirement: the old copy from the new one, the
        // pointers back; the tasks go on exactly.
        let at = vm.serial().len();
        vm.ok_when_not_busy(&["revert", "--vm", "dc", "limits2"]);
        vm.check_ctl(at, 3);
    }
}

#[test]
fn pointers_saved_in_memory_at_run_time_hold_a_change_back_until_they_are_gone() {
    // The kernel copied its ctl table at boot (ctl_copied): generic code
    // reaches tk_limits through pointers that are in no image, only in
    // memory. --repoint moves the image's; lucos finds these by scanning.
    let vm = Vm::start_with(
        "data-saved",
        "tasks=2 iters=0 report=200 mode=ctl ctl_copied",
    );
    vm.check_ctl(0, 2);
    let o = vm.build(
        "limits2",
        LIMITS2,
        &["--data", "tk_limits:tk_limits", "--repoint", "tk_limits"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!vm.inspect("limits2").contains("still used by"));
    for round in 0..2 {
        let at = vm.serial().len();
        vm.ok(&["patch", "--vm", "dc", p(&vm.path("limits2.lup"))]);
        // The change stays tracking, held back by the copied table's words
        // (named), and coherent: set through the old copy's pointers, the
        // limit is the one the new code charges against.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let l = loop {
            let l = vm.list();
            let d = &l["patches"][0]["data"][0]["stats"];
            assert_eq!(
                d["state"], "tracking",
                "retired under a saved pointer (round {round}): {l}"
            );
            if d["waiting"]
                .as_str()
                .is_some_and(|w| w.contains("tk_ctls_rt+0x8"))
            {
                break l;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not held back by memory: {l}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let waiting = l["patches"][0]["data"][0]["stats"]["waiting"].to_string();
        assert!(
            waiting.contains("memory holding a pointer into tk_limits (old copy)"),
            "{waiting}"
        );
        vm.check_ctl(at, 3);
        assert_eq!(
            vm.list()["patches"][0]["data"][0]["stats"]["state"],
            "tracking"
        );
        if round == 0 {
            // Reverted while tracking: exact.
            let at = vm.serial().len();
            vm.ok_when_not_busy(&["revert", "--vm", "dc", "limits2"]);
            vm.check_ctl(at, 3);
        }
    }
    // A patch has the kernel register its table again, from the image's
    // words lucos moved: the saved pointers go, and the change retires.
    let refresh = "#include \"tk.h\"\nu64 tk_ctl_refresh_due(void)\n{\n\treturn 1;\n}\n";
    let o = vm.build("refresh", refresh, &[]);
    assert!(o.status.success(), "{}", text(&o));
    vm.ok(&["patch", "--vm", "dc", p(&vm.path("refresh.lup"))]);
    vm.wait_retired();
    let w0 = vm.trapped();
    vm.check_ctl(vm.serial().len(), 3);
    assert_eq!(vm.trapped(), w0, "writes to a retired copy trapped");
    // Now the copied table points into the new copy, which a revert would
    // free: refused, naming the words, with nothing changed.
    // (Memory is checked first in each pause: the saved words are named
    // even though a vCPU is in the patch's code in nearly every pause.)
    let before = vm.list();
    let refused = |args: &[&str]| {
        let o = vm.run(args);
        assert!(!o.status.success(), "{args:?} done: {}", text(&o));
        o
    };
    let o = refused(&["revert", "--vm", "dc", "limits2"]);
    assert!(
        text(&o).contains("memory holding a pointer into tk_limits (new copy)")
            && text(&o).contains("tk_ctls_rt+0x"),
        "{}",
        text(&o)
    );
    assert_eq!(vm.list(), before, "a refused revert changed the VM's state");
    // So is a cumulative patch without the change (it would undo it).
    let o = vm.build("refresh2", refresh, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = refused(&[
        "patch",
        "--vm",
        "dc",
        "--replace",
        p(&vm.path("refresh2.lup")),
    ]);
    assert!(
        text(&o).contains("memory holding a pointer into tk_limits (new copy of patch limits2)")
            && text(&o).contains("tk_ctls_rt+0x"),
        "{}",
        text(&o)
    );
    assert_eq!(vm.list(), before, "a refused patch changed the VM's state");
    vm.check_ctl(vm.serial().len(), 2);
}

#[test]
fn a_repointed_word_the_kernel_changed_refuses_the_patch_and_changes_nothing() {
    // The kernel re-aimed tk_ctls[0] at boot: the image's value the patch
    // expects is not there.
    let vm = Vm::start_with(
        "data-repoint-moved",
        "tasks=2 iters=0 report=200 mode=ctl ctl_moved",
    );
    let o = vm.build(
        "limits2",
        LIMITS2,
        &["--data", "tk_limits:tk_limits", "--repoint", "tk_limits"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let before = vm.list();
    let o = vm.run(&["patch", "--vm", "dc", p(&vm.path("limits2.lup"))]);
    assert!(!o.status.success(), "applied: {}", text(&o));
    assert!(
        text(&o).contains("tk_ctls+0x8 (points into tk_limits) changed under us"),
        "{}",
        text(&o)
    );
    assert_eq!(vm.list(), before, "a refused patch changed the VM's state");
    // A name given to --repoint that the patch does not change.
    let o = vm.build(
        "bad",
        LIMITS2,
        &["--data", "tk_limits:tk_limits", "--repoint", "stats_table"],
    );
    assert!(
        !o.status.success() && text(&o).contains("--repoint stats_table"),
        "{}",
        text(&o)
    );
}

/// The next cumulative patch's source: [`new_stats`] and one more function
/// (`lucos_version` says "(cumulative)").
fn stats2b_source() -> String {
    format!(
        "{}\nconst char *lucos_version(void)\n{{\n\treturn \"testkernel 1.0 (cumulative)\";\n}}\n",
        new_stats()
    )
}
