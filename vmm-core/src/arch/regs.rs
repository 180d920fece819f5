//! The 64-bit entry state of a vCPU: general registers, special registers
//! (long mode, boot GDT, boot page tables) and FPU.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT, GDT_CODE32, GDT_CODE64, GDT_DATA, GDT_TSS};
use super::layout::{
    BOOT_GDT_MAX, BOOT_GDT_START, BOOT_IDT_START, KERNEL_MAP_BASE, PDPT_HIGH_START, PDPT_LOW_START,
    PD_START, PML4_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 2;
const PTE_PS: u64 = 0x80;

/// Error writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the boot {what} into guest memory")]
pub struct BootSetupError {
    what: &'static str,
    #[source]
    source: vm_memory::GuestMemoryError,
}

fn write_u64(
    mem: &GuestMemoryMmap,
    addr: u64,
    val: u64,
    what: &'static str,
) -> Result<(), BootSetupError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootSetupError { what, source })
}

/// Writes the boot GDT and an empty IDT.
pub fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<(), BootSetupError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write_u64(mem, BOOT_GDT_START + (i as u64) * 8, *entry, "GDT")?;
    }
    write_u64(mem, BOOT_IDT_START, 0, "IDT")
}

/// Writes the boot page tables: the first 1 GiB identity-mapped and mapped
/// again at 0xffff_ffff_8000_0000 (where the kernel map of Linux and of the
/// test kernel lives), with 2 MiB pages.
pub fn write_boot_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootSetupError> {
    let high_pml4 = (KERNEL_MAP_BASE >> 39) & 511;
    let high_pdpt = (KERNEL_MAP_BASE >> 30) & 511;
    write_u64(
        mem,
        PML4_START,
        PDPT_LOW_START | PTE_PRESENT | PTE_WRITE,
        "PML4",
    )?;
    write_u64(
        mem,
        PML4_START + high_pml4 * 8,
        PDPT_HIGH_START | PTE_PRESENT | PTE_WRITE,
        "PML4",
    )?;
    write_u64(
        mem,
        PDPT_LOW_START,
        PD_START | PTE_PRESENT | PTE_WRITE,
        "PDPT",
    )?;
    write_u64(
        mem,
        PDPT_HIGH_START + high_pdpt * 8,
        PD_START | PTE_PRESENT | PTE_WRITE,
        "PDPT",
    )?;
    for i in 0..512u64 {
        write_u64(
            mem,
            PD_START + i * 8,
            (i << 21) | PTE_PRESENT | PTE_WRITE | PTE_PS,
            "PD",
        )?;
    }
    Ok(())
}

/// Special registers for 64-bit entry on the boot GDT and page tables.
pub fn long_mode_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment_from_gdt(BOOT_GDT[GDT_CODE64 as usize], GDT_CODE64);
    let mut sregs = flat_segments(sregs, code);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Special registers for the PVH entry: 32-bit protected mode, flat
/// segments, paging off (the Xen PVH boot ABI Linux implements).
pub fn protected_mode_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment_from_gdt(BOOT_GDT[GDT_CODE32 as usize], GDT_CODE32);
    let mut sregs = flat_segments(sregs, code);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

fn flat_segments(mut sregs: kvm_sregs, code: kvm_bindings::kvm_segment) -> kvm_sregs {
    let data = kvm_segment_from_gdt(BOOT_GDT[GDT_DATA as usize], GDT_DATA);
    let tss = kvm_segment_from_gdt(BOOT_GDT[GDT_TSS as usize], GDT_TSS);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of::<u64>() * BOOT_GDT_MAX) as u16 - 1;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = std::mem::size_of::<u64>() as u16 - 1;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs
}

/// General registers at entry: `rip`, interrupts off, and the argument
/// registers of the boot protocols (test kernel: RDI = vCPU index, RSI = boot
/// info; Linux 64-bit: RSI = zero page; PVH: RBX = start info).
pub fn entry_regs(rip: u64, rdi: u64, rsi: u64, rbx: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip,
        rdi,
        rsi,
        rbx,
        ..Default::default()
    }
}

/// FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_map_low_and_high() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory");
        write_boot_page_tables(&mem).expect("page tables");
        let pml4_511: u64 = mem
            .read_obj(GuestAddress(PML4_START + 511 * 8))
            .expect("read");
        assert_eq!(pml4_511 & !0xfff, PDPT_HIGH_START);
        let pdpt_510: u64 = mem
            .read_obj(GuestAddress(PDPT_HIGH_START + 510 * 8))
            .expect("read");
        assert_eq!(pdpt_510 & !0xfff, PD_START);
        let pd_8: u64 = mem.read_obj(GuestAddress(PD_START + 8 * 8)).expect("read");
        assert_eq!(pd_8, (8 << 21) | 0x83);
    }
}
