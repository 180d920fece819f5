//! Segment descriptors for the boot GDT and their KVM segment form.

use kvm_bindings::kvm_segment;

/// Builds a GDT entry from flags (G, D/B, L, AVL in the top nibble of a
/// 16-bit field together with the access byte), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 32-bit code (0x08, PVH entry), 64-bit code (0x10,
/// Linux's `__BOOT_CS`), data (0x18, `__BOOT_DS`), TSS placeholder (0x20).
pub const BOOT_GDT: [u64; 5] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// Index of the 32-bit code segment.
pub const GDT_CODE32: u8 = 1;
/// Index of the 64-bit code segment.
pub const GDT_CODE64: u8 = 2;
/// Index of the data segment.
pub const GDT_DATA: u8 = 3;
/// Index of the TSS.
pub const GDT_TSS: u8 = 4;

/// Decodes GDT entry `index` of `table` into the form KVM_SET_SREGS takes.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // A limit in 4 KiB units is expanded, as the CPU does when it loads the descriptor.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_decodes_as_long_mode() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[GDT_CODE64 as usize], GDT_CODE64);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(
            (seg.l, seg.db, seg.present, seg.dpl, seg.s),
            (1, 0, 1, 0, 1)
        );
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn data_segment_decodes() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[GDT_DATA as usize], GDT_DATA);
        assert_eq!(seg.selector, 0x18);
        assert_eq!((seg.l, seg.db, seg.type_), (0, 1, 3));
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn entry_encoding_matches_linux_constants() {
        // Linux's GDT_ENTRY_INIT(0xa09b, 0, 0xfffff) for __KERNEL_CS.
        assert_eq!(BOOT_GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x00cf_9300_0000_ffff);
        // A 32-bit flat code segment for the PVH entry.
        let code32 = kvm_segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!((code32.l, code32.db, code32.type_), (0, 1, 0xb));
    }
}
