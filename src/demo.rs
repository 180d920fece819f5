//! `lucos demo`: boots the bundled test kernel on 2 vCPUs, pauses it while
//! its user tasks run, shows where each vCPU was stopped, and lets it finish.

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
        cmdline: "iters=4000 report=1000".into(),
        vcpus: 2,
        mem_bytes: 64 << 20,
        serial: SerialSink::new(true, None, Some(capture.clone())),
    })?;
    vm.start()?;
    if !keep {
        let _ = std::fs::remove_file(&kernel);
    }

    if capture.wait_for("iter 1000 ", Duration::from_secs(30)) {
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
    }

    let reason = vm
        .wait_timeout(Duration::from_secs(120))
        .unwrap_or_else(|| {
            vm.stop();
            vm.wait()
        });
    println!("== guest finished: {reason} ==");
    Ok(match reason {
        ExitReason::GuestExit { status: 0 } => exit::OK,
        _ => exit::ERROR,
    })
}
