//! `lucos demo`: boots the bundled test kernel on 2 vCPUs, pauses it while
//! its user tasks run and shows where each vCPU was stopped, then builds a
//! signed live patch for its `lucos_version` service, applies it while the
//! tasks call that service, shows the output change, reverts it, waits for
//! the original output to come back, and stops the guest. The guest's tasks
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
    let mut vm = Vm::create(VmConfig {
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
        key: Some(key_file),
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
        out: lup.clone(),
        sources: vec![src],
    })?;
    let guest = update_engine::kernel::inspect(vm, kernel)
        .map_err(|e| CliError::Other(crate::error::chain(&e)))?;
    let mut patcher = Patcher::new(vec![key.verifying_key()]);
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
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
