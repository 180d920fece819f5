//! Write control on the bundled test kernel, side by side in one run:
//!
//! - a guest write to an ordinary page (a read-write slot: no trap);
//! - a guest write to a read-only slot, trapped and dropped at once: the
//!   floor, what KVM's exit and re-entry cost;
//! - a guest write to unprotected bytes of a protected page, trapped and
//!   allowed: lucos finds the writing instruction, checks it, and writes
//!   the bytes (goal: within 1.2x of the floor);
//! - a guest workload that does not write protected pages (syscalls and
//!   user work on 2 vCPUs), with and without its kernel text protected, as
//!   a ratio of progress (goal: 1.00);
//! - the same store loop on the old copy of tracked data (a live
//!   data-layout change of `atomic_page` applied by `lucos patch`): trapped,
//!   written and transferred to the new copy, by the derived transfer and
//!   by a C transfer function, interpreted by the VMM (the default) and run
//!   in its KVM sandbox (the issue's goal: within 1.5x of the bare trap).
//!
//! - the guest's throughput on tracked data: the test kernel's tasks
//!   updating its stats table unpatched, with a new layout tracking (every
//!   store trapped and transferred) and after it retired (native);
//! - that change's retirement: the scan of guest memory for pointers into
//!   the old copy (while the guest runs, then the pages written since in
//!   the pause) and the pause, beside a stop-the-world scan.
//!
//! `cargo bench --bench write_control` (LUCOS_BENCH_RUNS: windows per
//! figure, default 3; each window 1 s).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use symbol_db::SymbolTable;
use vmm_core::devices::SerialCapture;
use vmm_core::guest::Paused;
use vmm_core::write_control::Protection;
use vmm_core::Vm;

use common::bench::{median, runs};

const WINDOW: Duration = Duration::from_secs(1);

fn boot(vcpus: u8, cmdline: &str) -> (Arc<Vm>, Arc<SerialCapture>) {
    let t = common::boot(vcpus, cmdline);
    t.expect_serial("starting", 30);
    (Arc::new(t.vm), t.serial)
}

/// Guest-physical address of user/kernel virtual `va`, through vCPU 0.
fn gpa_of(vm: &Vm, va: u64) -> u64 {
    vm.pause().expect("pause");
    let t = vm.translate(0, va).expect("translate");
    vm.resume().expect("resume");
    t.gpa
}

fn protect(vm: &Vm, release: &[&str], add: &[Protection]) {
    let release: Vec<String> = release.iter().map(|s| s.to_string()).collect();
    Paused::new(vm)
        .expect("pause")
        .change_protection(&release, add)
        .expect("protect");
}

/// Events per second of `count` over one window.
fn rate(count: impl Fn() -> u64) -> f64 {
    let (c0, t0) = (count(), Instant::now());
    std::thread::sleep(WINDOW);
    let (c1, t1) = (count(), Instant::now());
    (c1.wrapping_sub(c0)) as f64 / (t1 - t0).as_secs_f64()
}

/// The store loop's page with a new layout: `count` stays, a member is added.
const PAGE_DERIVED: &str = r#"typedef unsigned long u64;
struct atomic_page {
	volatile u64 guard[8];
	volatile u64 count;
	u64 stores;
} __attribute__((aligned(4096)));
extern struct atomic_page atomic_page;
const char *lucos_version(void)
{
	return atomic_page.stores ? "bench" : "testkernel 1.0 (bench)";
}
"#;

/// The same with `count` renamed: carried by C transfer functions.
const PAGE_C: &str = r#"typedef unsigned long u64;
struct atomic_page {
	volatile u64 guard[8];
	volatile u64 hits;
} __attribute__((aligned(4096)));
struct atomic_page_v1 {
	volatile u64 guard[8];
	volatile u64 count;
} __attribute__((aligned(4096)));
extern struct atomic_page atomic_page;
const char *lucos_version(void)
{
	return atomic_page.hits ? "bench" : "testkernel 1.0 (bench)";
}
void lucos_to_new_atomic_page(const struct atomic_page_v1 *old, struct atomic_page *new)
{
	new->hits = old->count;
}
void lucos_to_old_atomic_page(const struct atomic_page *new, struct atomic_page_v1 *old)
{
	old->count = new->hits;
}
"#;

/// Per trapped-and-transferred write, µs (medians of `n` windows): a VM
/// run by the `lucos` binary with 1 vCPU storing to `atomic_page.count`,
/// the layout change `src` applied.
fn tracked_store(n: usize, name: &str, src: &str, engine: Option<&str>) -> (f64, u64) {
    use common::cli::{p, text, RunDir};
    let dir = RunDir::new(&format!("bench-{name}"));
    let ok = |args: &[&str]| {
        let o = dir.lucos(args);
        assert!(o.status.success(), "lucos {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let key = dir.0.join("key");
    ok(&["keygen", "-o", p(&key)]);
    let c = dir.0.join(format!("{name}.c"));
    std::fs::write(&c, src).expect("source");
    let lup = dir.0.join(format!("{name}.lup"));
    let k = common::cli::kernel();
    ok(&[
        "build",
        "--kernel",
        &k,
        "--key",
        p(&key),
        "--name",
        name,
        "--data",
        "atomic_page:atomic_page",
        "-o",
        p(&lup),
        p(&c),
    ]);
    let pubkey = dir.0.join("key.pub");
    // The VMM's C transfer engine (its default when unset).
    match engine {
        Some(e) => std::env::set_var("LUCOS_TRANSFER_ENGINE", e),
        None => std::env::remove_var("LUCOS_TRANSFER_ENGINE"),
    }
    common::cli::start(
        &dir,
        "wb",
        &[
            "--vcpus",
            "1",
            "--cmdline",
            "tasks=1 mode=wbench",
            "--trusted-key",
            p(&pubkey),
        ],
    );
    ok(&["patch", "--vm", "wb", p(&lup)]);
    let transfers = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&["list", "--vm", "wb", "--json"])).expect("json");
        v["patches"][0]["data"][0]["stats"]["transfers"]
            .as_u64()
            .expect("transfers")
    };
    let mut per = Vec::new();
    for _ in 0..n {
        per.push(1e6 / rate(transfers));
    }
    let total = transfers();
    ok(&["revert", "--vm", "wb", name]);
    ok(&["stop", "--vm", "wb"]);
    (median(per), total)
}

/// The highest `iter` of each of the test kernel's 2 tasks in its report
/// lines so far (`[tk] task T cpu C iter I ...`).
fn iters(serial: &std::path::Path) -> [u64; 2] {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let mut it = [0u64; 2];
    for l in text.lines() {
        let Some(at) = l.find("[tk] task ") else {
            continue;
        };
        let w: Vec<&str> = l[at..].split_whitespace().collect();
        let after = |k: &str| -> Option<u64> {
            w.iter()
                .position(|x| *x == k)
                .and_then(|i| w.get(i + 1))?
                .parse()
                .ok()
        };
        if let (Some(t), Some(i)) = (after("task"), after("iter")) {
            if let Some(slot) = it.get_mut(t as usize) {
                *slot = (*slot).max(i);
            }
        }
    }
    it
}

/// Stats-table updates per second by the test kernel's 2 tasks on 2 vCPUs
/// (each iteration of theirs updates its element through `stats_update`,
/// 7 stores): unpatched; with the table's new layout tracked (stats2:
/// unpatched readers keep the old copy in use, so every store of the
/// patched `stats_update` to the new copy is trapped and transferred); and
/// retired (stats3: every user replaced, the new copy written natively).
/// Medians of `n` windows each.
fn tracked_throughput(n: usize) -> (f64, f64, f64, u64, Retirement) {
    use common::cli::{p, text, RunDir};
    use common::stats::{all_users, new_stats};
    let dir = RunDir::new("bench-throughput");
    let ok = |args: &[&str]| {
        let o = dir.lucos(args);
        assert!(o.status.success(), "lucos {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let key = dir.0.join("key");
    ok(&["keygen", "-o", p(&key)]);
    let k = common::cli::kernel();
    for (name, src, init) in [
        ("stats2", new_stats(), Some("stats_table.generation=1")),
        ("stats3", all_users(), None),
    ] {
        let c = dir.0.join(format!("{name}.c"));
        std::fs::write(&c, src).expect("source");
        let lup = dir.0.join(format!("{name}.lup"));
        let mut args = vec![
            "build",
            "--kernel",
            &k,
            "--key",
            p(&key),
            "--name",
            name,
            "--data",
            "stats_table:task_stat",
            "-o",
            p(&lup),
        ];
        if let Some(i) = init {
            args.extend(["--init", i]);
        }
        args.push(p(&c));
        ok(&args);
    }
    let serial = dir.0.join("serial.log");
    let pubkey = dir.0.join("key.pub");
    std::env::remove_var("LUCOS_TRANSFER_ENGINE");
    common::cli::start(
        &dir,
        "tp",
        &[
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--cmdline",
            "tasks=2 iters=0 report=20",
            "--serial-log",
            p(&serial),
            "--trusted-key",
            p(&pubkey),
        ],
    );
    let updates = || -> f64 {
        let (a, t0) = (iters(&serial), Instant::now());
        std::thread::sleep(WINDOW * 2);
        let (b, t1) = (iters(&serial), Instant::now());
        (b[0] - a[0] + b[1] - a[1]) as f64 / (t1 - t0).as_secs_f64()
    };
    let list = || -> serde_json::Value {
        serde_json::from_str(&ok(&["list", "--vm", "tp", "--json"])).expect("json")
    };
    // Until both tasks report.
    let deadline = Instant::now() + Duration::from_secs(60);
    while iters(&serial).contains(&0) {
        assert!(Instant::now() < deadline, "no reports from both tasks");
        std::thread::sleep(Duration::from_millis(100));
    }
    let plain: Vec<f64> = (0..n).map(|_| updates()).collect();
    ok(&["patch", "--vm", "tp", p(&dir.0.join("stats2.lup"))]);
    let tracking: Vec<f64> = (0..n).map(|_| updates()).collect();
    let l = list();
    let d = &l["patches"][0]["data"][0]["stats"];
    assert_eq!(d["state"], "tracking", "{l}");
    let transfers = d["transfers"].as_u64().unwrap_or(0);
    // Reverted once nothing runs the patch's code.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir
        .lucos(&["revert", "--vm", "tp", "stats2"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "stats2 not reverted in 60 s");
    }
    ok(&["patch", "--vm", "tp", p(&dir.0.join("stats3.lup"))]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let retirement = loop {
        let l = list();
        let d = &l["patches"][0]["data"][0]["stats"];
        if d["state"] == "retired" {
            break Retirement {
                scanned_mib: d["scan"]["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                running_ms: d["scan"]["running_us"].as_u64().unwrap_or(0) as f64 / 1e3,
                pause_pages: d["scan"]["pause_pages"].as_u64(),
                pause_ms: d["retire_pause_us"].as_u64().unwrap_or(0) as f64 / 1e3,
            };
        }
        assert!(Instant::now() < deadline, "stats3 did not retire in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let retired: Vec<f64> = (0..n).map(|_| updates()).collect();
    ok(&["stop", "--vm", "tp"]);
    (
        median(plain),
        median(tracking),
        median(retired),
        transfers,
        retirement,
    )
}

/// A data change's retirement as `lucos list` reports it: the scan of
/// guest memory for pointers into the old copy, and the pause.
struct Retirement {
    scanned_mib: f64,
    running_ms: f64,
    pause_pages: Option<u64>,
    pause_ms: f64,
}

fn main() {
    let n = runs();
    let flavor = vmm_core::vm::host_kvm_flavor();
    let syms = SymbolTable::from_elf_file(std::path::Path::new(env!("LUCOS_TESTKERNEL")))
        .expect("symbols");
    let sym = |s: &str| syms.lookup(s).expect("symbol").addr;

    // 1 vCPU storing 8 bytes in a loop at atomic_page.count.
    let (vm, serial) = boot(1, "tasks=1 mode=wbench");
    let page = gpa_of(&vm, sym("atomic_page"));
    let count = page + 64;
    let wc = vm.write_control().clone();
    let ram = vm.ram().clone();
    let (mut plain, mut floor, mut allowed) = (Vec::new(), Vec::new(), Vec::new());
    let mut handler = Vec::new();
    let guard = Protection {
        owner: "bench".into(),
        label: "guard".into(),
        gpa: page,
        len: 64,
        access: vmm_core::write_control::Access::Trapped,
    };
    for _ in 0..n {
        plain.push(1e9 / rate(|| ram.read_u64(count).expect("read")));
        protect(&vm, &[], std::slice::from_ref(&guard));
        wc.set_bare(true);
        floor.push(1e9 / rate(|| wc.stats().trapped));
        wc.set_bare(false);
        let before = wc.stats();
        allowed.push(1e9 / rate(|| wc.stats().allowed));
        let after = wc.stats();
        handler.push(
            (after.handle_ns - before.handle_ns) as f64 / (after.allowed - before.allowed) as f64,
        );
        protect(&vm, &["bench"], &[]);
    }
    let s = wc.stats();
    assert!(!serial.text().contains("PANIC"), "{}", serial.text());
    vm.stop();
    let (plain, floor, allowed) = (median(plain), median(floor), median(allowed));
    let handler = median(handler);

    // 2 tasks doing syscalls and user work; kernel text protected or not.
    let (vm, serial) = boot(2, "tasks=2 iters=0 report=0");
    let progress = sym("user_progress");
    let at = gpa_of(&vm, progress);
    let ram = vm.ram().clone();
    let done = || ram.read_u64(at).expect("read") + ram.read_u64(at + 8).expect("read");
    let (stext, etext) = (sym("_stext"), sym("_etext"));
    let text = Protection {
        owner: "kernel-text".into(),
        label: ".text".into(),
        gpa: gpa_of(&vm, stext),
        len: etext - stext,
        access: vmm_core::write_control::Access::Trapped,
    };
    let (mut open, mut guarded) = (Vec::new(), Vec::new());
    for _ in 0..n {
        open.push(rate(done));
        protect(&vm, &[], std::slice::from_ref(&text));
        guarded.push(rate(done));
        protect(&vm, &["kernel-text"], &[]);
    }
    let traps = vm.write_control().stats().trapped;
    assert!(!serial.text().contains("PANIC"), "{}", serial.text());
    vm.stop();
    let (open, guarded) = (median(open), median(guarded));
    let (derived, derived_n) = tracked_store(n, "pagederived", PAGE_DERIVED, None);
    let (in_c, c_n) = tracked_store(n, "pagec", PAGE_C, None);
    let (in_kvm, kvm_n) = tracked_store(n, "pagekvm", PAGE_C, Some("sandbox"));
    let (unpatched, tracking, retired, tracked_n, retirement) = tracked_throughput(n);

    println!(
        "lucos write control, host KVM {flavor:?}, test kernel; medians of {n} windows of {WINDOW:?}"
    );
    println!("| guest write of 8 bytes (1 vCPU, a loop of stores) | per write | vs the floor |");
    println!("|---|---|---|");
    println!(
        "| ordinary page (read-write slot, no trap) | {:.2} ns | {:.5}x |",
        plain,
        plain / floor
    );
    println!(
        "| read-only slot, trapped and dropped (the floor: KVM exit and re-entry) | {:.2} µs | 1.00x |",
        floor / 1e3
    );
    println!(
        "| protected page, unprotected bytes: trapped, decoded, checked, written by lucos | {:.2} µs | {:.2}x |",
        allowed / 1e3,
        allowed / floor
    );
    println!(
        "| tracked data, old copy: trapped, written, member transferred to the new copy (derived) | {:.2} µs | {:.2}x |",
        derived,
        derived * 1e3 / floor
    );
    println!(
        "| tracked data, old copy: trapped, written, transferred by a C function (interpreted, the default) | {:.2} µs | {:.2}x |",
        in_c,
        in_c * 1e3 / floor
    );
    println!(
        "| the same, the C function run in the KVM sandbox (LUCOS_TRANSFER_ENGINE=sandbox) | {:.2} µs | {:.2}x |",
        in_kvm,
        in_kvm * 1e3 / floor
    );
    println!(
        "(tracked data: the VM run by the lucos binary, {derived_n}, {c_n} and {kvm_n} transfers over the runs; the issue's goal for a transferred write is 1.5x the floor)"
    );
    println!(
        "(lucos's own part of an allowed write: {:.2} µs; over the run: {} trapped, {} allowed, {} rewound)",
        handler / 1e3,
        s.trapped,
        s.allowed,
        s.rewound
    );
    println!(
        "| the test kernel's 2 tasks updating the stats table (2 vCPUs) | updates/s | vs unpatched |"
    );
    println!("|---|---|---|");
    println!("| unpatched | {unpatched:.0} | 1.00x |");
    println!(
        "| new layout, tracking: every store of the patched code trapped and transferred (C function) | {tracking:.0} | {:.3}x |",
        tracking / unpatched
    );
    println!(
        "| new layout, retired: the new copy written natively | {retired:.0} | {:.3}x |",
        retired / unpatched
    );
    println!("({tracked_n} transfers while tracking)");
    println!(
        "| retiring that change (64 MiB guest): scan of guest memory for pointers into the old copy | guest pause |"
    );
    println!("|---|---|");
    println!(
        "| lucos: {:.0} MiB scanned while the guest ran ({:.1} ms, KVM's dirty log on), {} pages written since scanned again in the pause | {:.2} ms |",
        retirement.scanned_mib,
        retirement.running_ms,
        retirement.pause_pages.map_or("all".into(), |n| n.to_string()),
        retirement.pause_ms
    );
    println!(
        "| the same scan stop-the-world (all of it in the pause) | at least {:.1} ms |",
        retirement.running_ms
    );
    println!(
        "| workload not writing protected pages (2 vCPUs, syscalls + user work) | iterations/s |"
    );
    println!("|---|---|");
    println!("| kernel text not protected | {open:.0} |");
    println!("| kernel text protected | {guarded:.0} |");
    println!(
        "| ratio protected / not | {:.3} ({traps} writes trapped meanwhile) |",
        guarded / open
    );
}
