//! lucos VMM core: a KVM virtual machine with guest RAM in a memfd, vCPU
//! threads that can be paused at any instruction, port-I/O devices, kernel
//! loading and a guest page-table walker.

pub mod arch;
pub mod control;
pub mod devices;
pub mod guest;
pub mod handoff;
pub mod insn;
pub mod loader;
pub mod memory;
pub mod pagewalk;
pub mod region;
pub mod sandbox;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod write_control;

pub use vcpu::ExitReason;
pub use vm::{Vm, VmConfig, VmError};
