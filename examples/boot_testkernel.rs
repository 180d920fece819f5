//! Boots the bundled test kernel in-process and prints its serial output.
//!
//! `cargo run --example boot_testkernel -- [VCPUS] [CMDLINE]`

use std::sync::Arc;
use std::time::Duration;

use vmm_core::devices::{SerialCapture, SerialSink};
use vmm_core::{Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let vcpus: u8 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let cmdline = args
        .next()
        .unwrap_or_else(|| "iters=2000 report=500".into());
    let capture = Arc::new(SerialCapture::default());
    let vm = Vm::create(VmConfig {
        kernel: env!("LUCOS_TESTKERNEL").into(),
        initrd: None,
        cmdline,
        vcpus,
        mem_bytes: 64 << 20,
        serial: SerialSink::new(true, None, Some(capture)),
    })?;
    vm.start()?;
    match vm.wait_timeout(Duration::from_secs(60)) {
        Some(reason) => println!("VM ended: {reason}"),
        None => {
            println!("timeout; stopping");
            vm.stop();
            vm.wait();
        }
    }
    Ok(())
}
