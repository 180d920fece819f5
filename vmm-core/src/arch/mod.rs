//! x86-64 architecture support: guest physical layout, descriptor tables, boot
//! page tables, CPUID, MSRs and the 64-bit entry state of each vCPU.

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
