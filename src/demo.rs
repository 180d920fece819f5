//! `lucos demo`: boots the bundled test kernel on 2 vCPUs, pauses it while
//! its user tasks run and shows where each vCPU was stopped, then builds a
//! signed live patch for its `lucos_version` service, applies it while the
//! tasks call that service, shows the output change, reverts it, waits for
//! the original output to come back; then gives the stats table the tasks
//! update a new layout live (a member added, one widened, one renamed with a
//! C transfer function), checks every report the tasks print meanwhile (no
//! update lost, old and new code agreeing), reverts it, and stops the guest. The guest's tasks
//! run until the demo stops them: no step has to fit into a length of guest
//! work.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use symbol_db::SymbolTable;
use vmm_core::devices::{SerialCapture, SerialSink};
use vmm_core::{ExitReason, Vm, VmConfig};

use crate::error::{exit, CliError};

/// The test kernel built from guest-kernels/testkernel by build.rs.
pub static TEST_KERNEL: &[u8] = include_bytes!(env!("LUCOS_TESTKERNEL"));

/// Writes the bundled test kernel to `path`, or to a temporary file.
pub fn write_test_kernel(path: Option<PathBuf>) -> Result<PathBuf, CliError> {
    let path = path.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("lucos-testkernel-{}.elf", std::process::id()))
    });
    std::fs::write(&path, TEST_KERNEL)
        .map_err(|e| CliError::io(format!("cannot write {}", path.display()), e))?;
    Ok(path)
}

/// Runs the demo.
pub fn demo(kernel_out: Option<PathBuf>) -> Result<i32, CliError> {
    let keep = kernel_out.is_some();
    let kernel = write_test_kernel(kernel_out)?;
    let symbols = SymbolTable::from_elf_bytes(TEST_KERNEL, "testkernel")
        .map_err(|e| CliError::Other(e.to_string()))?;
    let capture = Arc::new(SerialCapture::default());
    println!("== lucos demo: booting the bundled test kernel (2 vCPUs, 64 MiB) ==");
    let vm = Vm::create(VmConfig {
        kernel: kernel.clone(),
        initrd: None,
        cmdline: "iters=0 report=1000".into(),
        vcpus: 2,
        mem_bytes: 64 << 20,
        serial: SerialSink::new(true, None, Some(capture.clone())),
    })?;
    vm.start()?;

    let step = |what: &str| CliError::Other(format!("demo: {what}"));
    let result = (|| -> Result<(), CliError> {
        if !capture.wait_for("iter 1000 ", Duration::from_secs(60)) {
            return Err(step("the guest's tasks did not report in 60 s"));
        }
        let took = vm.pause()?;
        println!(
            "== paused the running guest: all vCPUs out in {:.1} µs ==",
            took.as_secs_f64() * 1e6
        );
        for i in 0..vm.vcpu_count() {
            let r = vm.regs(i)?;
            let s = vm.sregs(i)?;
            let mode = if s.cs.selector & 3 == 3 {
                "user"
            } else {
                "kernel"
            };
            let place = symbols
                .symbolize(r.rip)
                .map(|(sym, off)| format!("{}+{off:#x}", sym.name))
                .unwrap_or_else(|| "?".into());
            let ip = vm
                .translate(i, r.rip)
                .map(|t| format!("{:#x}", t.gpa))
                .unwrap_or_default();
            println!(
                "   vCPU {i}: {mode:<6} rip={:#018x} ({place}, guest-physical {ip}) rsp={:#x} rflags={:#x}",
                r.rip, r.rsp, r.rflags
            );
        }
        vm.resume()?;
        println!("== resumed ==");
        live_patch(&vm, &kernel, &capture)
    })();
    if !keep {
        let _ = std::fs::remove_file(&kernel);
    }
    // The guest would run on: stop it, unless it ended by itself (a crash).
    let reason = vm.wait_timeout(Duration::ZERO).unwrap_or_else(|| {
        if result.is_ok() {
            println!("== the tasks run on, unpatched: stopping the guest ==");
        }
        vm.stop();
        vm.wait()
    });
    result?;
    println!("== guest ended: {reason} ==");
    Ok(match reason {
        ExitReason::Stopped => exit::OK,
        _ => exit::ERROR,
    })
}

const DEMO_FIX: &str = r#"#include "tk.h"
/* The replacement: same signature, new behaviour. */
const char *lucos_version(void)
{
	return "testkernel 1.0 + live patch 'demo-fix'";
}
"#;

/// Builds, applies and reverts a live patch of `lucos_version` while the
/// guest's tasks call it.
fn live_patch(vm: &Vm, kernel: &std::path::Path, capture: &SerialCapture) -> Result<(), CliError> {
    use update_engine::lup::key_hex;
    use update_engine::patcher::Patcher;
    use update_engine::SigningKey;

    let dir = std::env::temp_dir().join(format!("lucos-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::io("cannot create a temporary directory".into(), e))?;
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let key_file = dir.join("demo.key");
    let src = dir.join("fix.c");
    let lup = dir.join("demo-fix.lup");
    let write = |p: &std::path::Path, s: &str| {
        std::fs::write(p, s).map_err(|e| CliError::io(format!("cannot write {}", p.display()), e))
    };
    write(&key_file, &key_hex(&key.to_bytes()))?;
    write(&src, DEMO_FIX)?;
    println!(
        "== building a signed live patch for lucos_version (fix.c, gcc with the kernel's flags) =="
    );
    crate::patch::build(crate::patch::BuildArgs {
        kernel: kernel.to_path_buf(),
        kbuild: None,
        key: Some(key_file.clone()),
        unsigned: false,
        name: "demo-fix".into(),
        description: "a new version string".into(),
        version: 1,
        depends: vec![],
        mode: update_engine::lup::Mode::Consistent,
        functions: vec![],
        data: vec![],
        init: vec![],
        narrow: vec![],
        repoint: vec![],
        diff: None,
        source: None,
        json: false,
        modules: Vec::new(),
        out: lup.clone(),
        sources: vec![src],
    })?;
    let guest = update_engine::kernel::inspect(vm, kernel)
        .map_err(|e| CliError::Other(crate::error::chain(&e)))?;
    // Write control decides trapped writes and transfers tracked data.
    let policy = Arc::new(update_engine::protect::GuardPolicy::new());
    vm.write_control().set_policy(policy.clone());
    let mut patcher = Patcher::new(vec![key.verifying_key()]).with_data_tracker(policy.data());
    let fail = |e: update_engine::patcher::PatchError| CliError::Other(crate::error::chain(&e));
    let r = patcher.apply(vm, &guest, &lup, false).map_err(fail)?;
    println!(
        "== applied 'demo-fix' while the tasks ran: {} function switched in one pause of {:.1} µs ==",
        r.functions.len(),
        r.pause_us
    );
    let patched = "version testkernel 1.0 + live patch 'demo-fix'\n";
    let at = capture.text().matches(patched).count();
    if !capture.wait_for_count(patched, at + 2, Duration::from_secs(60)) {
        return Err(CliError::Other(
            "demo: the tasks did not report the patched version in 60 s".into(),
        ));
    }
    let r = patcher.revert(vm, &guest, "demo-fix").map_err(fail)?;
    println!(
        "== reverted 'demo-fix' in one pause of {:.1} µs: the original code runs again ==",
        r.pause_us
    );
    let original = "version testkernel 1.0\n";
    let at = capture.text().matches(original).count();
    if !capture.wait_for_count(original, at + 2, Duration::from_secs(60)) {
        return Err(CliError::Other(
            "demo: the tasks did not report the original version in 60 s".into(),
        ));
    }

    // A data-layout change, live.
    let src = dir.join("stats2.c");
    let lup = dir.join("stats2.lup");
    write(&src, DEMO_STATS)?;
    println!(
        "== building 'stats2': struct task_stat gets a new layout (generation added in the middle, calls widened to 64 bits, last_value renamed latest by a C transfer function) =="
    );
    crate::patch::build(crate::patch::BuildArgs {
        kernel: kernel.to_path_buf(),
        kbuild: None,
        key: Some(key_file),
        unsigned: false,
        name: "stats2".into(),
        description: "a new layout of the stats table".into(),
        version: 1,
        depends: vec![],
        mode: update_engine::lup::Mode::Consistent,
        functions: vec![],
        data: vec!["stats_table:task_stat".into()],
        init: vec!["stats_table.generation=1".into()],
        narrow: vec![],
        repoint: vec![],
        diff: None,
        source: None,
        json: false,
        modules: Vec::new(),
        out: lup.clone(),
        sources: vec![src],
    })?;
    let from = capture.text().len();
    let r = patcher.apply(vm, &guest, &lup, false).map_err(fail)?;
    println!(
        "== applied 'stats2' while the tasks update the table: new copy made and both copies guarded in one pause of {:.1} µs ==",
        r.pause_us
    );
    let checked = check_stats(capture, from, 3)?;
    println!(
        "== {checked} reports checked while old code (stats_record, stats_read) uses the old copy and new code (stats_update) the new one: calls, sum and last value exact every time, no update lost; {} writes transferred between the copies ==",
        patcher_transfers(&policy, "stats_table")
    );
    let from = capture.text().len();
    let r = patcher.revert(vm, &guest, "stats2").map_err(fail)?;
    println!(
        "== reverted 'stats2' in one pause of {:.1} µs: the old layout is back with every update kept ==",
        r.pause_us
    );
    let checked = check_stats(capture, from, 2)?;
    println!("== {checked} more reports checked after the revert: exact ==");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Transfers so far of the demo's data change.
fn patcher_transfers(policy: &update_engine::protect::GuardPolicy, symbol: &str) -> u64 {
    policy
        .data()
        .stats(&update_engine::data::owner("stats2", symbol))
        .map(|s| s.transfers)
        .unwrap_or(0)
}

/// Waits for `n` stats reports of each task after byte `from` of the
/// serial output and checks every one: the old copy's calls equal the
/// task's count, its sum the series, its last value the one just written,
/// and no writer's count was ever off. Returns how many were checked.
fn check_stats(capture: &SerialCapture, from: usize, n: usize) -> Result<usize, CliError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let text = capture.text();
        let (mut seen, mut checked) = ([0usize; 2], 0);
        for l in text[from.min(text.len())..].lines() {
            let Some(at) = l.find("[tk] task ") else {
                continue;
            };
            let w: Vec<&str> = l[at..].split_whitespace().collect();
            let after = |k: &str| {
                w.iter()
                    .position(|x| *x == k)
                    .and_then(|i| w.get(i + 1))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let val = |k: &str| {
                w.iter()
                    .find_map(|x| x.strip_prefix(&format!("{k}=")))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let (Some(task), Some(iter), Some(calls), Some(sum), Some(last), Some(lost)) = (
                after("task"),
                after("iter"),
                val("calls"),
                val("sum"),
                val("last"),
                val("lost"),
            ) else {
                continue;
            };
            if calls != iter || sum != iter * (iter + 1) / 2 || last != iter || lost != 0 {
                return Err(CliError::Other(format!(
                    "demo: a report is not exact (an update lost): {l}"
                )));
            }
            seen[task as usize % 2] += 1;
            checked += 1;
        }
        if seen.iter().all(|&s| s >= n) {
            return Ok(checked);
        }
        if std::time::Instant::now() > deadline {
            return Err(CliError::Other(
                "demo: the tasks did not report in 120 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The stats table's new layout, the new writer, and the C transfer of the
/// renamed member.
const DEMO_STATS: &str = r#"typedef unsigned int u32;
typedef unsigned long u64;
#define MAX_TASKS 8

struct task_stat {
	u32 id;
	u32 cpu;
	u64 generation;
	u64 calls;
	u64 latest;
	u64 sum;
};

extern struct task_stat stats_table[MAX_TASKS];

u64 stats_update(u32 task, u32 cpu, u64 value)
{
	struct task_stat *s;

	if (task >= MAX_TASKS)
		return 0;
	s = &stats_table[task];
	s->id = task;
	s->cpu = cpu;
	s->calls++;
	s->latest = value;
	s->sum += value;
	s->generation = 2;
	return s->calls;
}

/* The old layout, and the transfer lucos cannot derive (a renamed member). */
struct task_stat_v1 {
	u32 id;
	u32 cpu;
	u32 calls;
	u64 last_value;
	u64 sum;
};

void lucos_to_new_stats_table(const struct task_stat_v1 *old, struct task_stat *new)
{
	new->latest = old->last_value;
}

void lucos_to_old_stats_table(const struct task_stat *new, struct task_stat_v1 *old)
{
	old->last_value = new->latest;
}
"#;
