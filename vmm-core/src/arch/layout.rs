//! Guest physical memory layout used by lucos on x86-64.
//!
//! ```text
//! 0x0000_0500  boot GDT (5 entries), 0x540 empty boot IDT
//! 0x0000_6000  PVH start info, its module list and memory map
//! 0x0000_7000  boot info for the test kernel (struct boot_info)
//! 0x0000_9000  boot PML4, 0xa000 PDPT (low), 0xb000 PDPT (high), 0xc000 PD
//! 0x0002_0000  kernel command line (up to 4 KiB)
//! 0x0010_0000  start of high memory (kernel images load at their ELF p_paddr)
//! 0xc000_0000  32-bit MMIO hole up to 4 GiB (LAPIC, IOAPIC); RAM above it
//!              continues at 4 GiB
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT.
pub const BOOT_GDT_MAX: usize = 5;
/// Empty boot IDT (interrupts stay off until the guest loads its own).
pub const BOOT_IDT_START: u64 = 0x540;
/// PVH `hvm_start_info`, followed by its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// The test kernel's `struct boot_info`.
pub const BOOT_INFO_START: u64 = 0x7000;
/// Boot page tables: PML4.
pub const PML4_START: u64 = 0x9000;
/// Boot page tables: PDPT for the identity map.
pub const PDPT_LOW_START: u64 = 0xa000;
/// Boot page tables: PDPT for the kernel map at 0xffff_ffff_8000_0000.
pub const PDPT_HIGH_START: u64 = 0xb000;
/// Boot page tables: one PD of 2 MiB pages shared by both maps (first 1 GiB).
pub const PD_START: u64 = 0xc000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Lowest address a kernel may be loaded at.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole; RAM continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Virtual base of the kernel map (Linux `__START_KERNEL_map`).
pub const KERNEL_MAP_BASE: u64 = 0xffff_ffff_8000_0000;
/// The smallest guest RAM lucos accepts.
pub const MIN_MEM_BYTES: u64 = 16 << 20;
