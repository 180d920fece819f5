//! Guest page-table walker: guest virtual to guest physical through a vCPU's
//! paging state (4-level paging with 4 KiB, 2 MiB and 1 GiB pages).

use crate::guest::PhysMemory;

const PTE_P: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_U: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Paging state of a vCPU, from its special registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingState {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

impl PagingState {
    /// Whether this is the paging [`translate`] walks: 4-level long mode.
    pub fn four_level(&self) -> bool {
        self.cr0 & CR0_PG != 0
            && self.cr4 & CR4_PAE != 0
            && self.efer & EFER_LMA != 0
            && self.cr4 & CR4_LA57 == 0
    }
}

impl From<&kvm_bindings::kvm_sregs> for PagingState {
    fn from(s: &kvm_bindings::kvm_sregs) -> Self {
        Self {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        }
    }
}

/// Size of the page a translation went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PageSize {
    /// 4 KiB.
    #[serde(rename = "4k")]
    Size4K,
    /// 2 MiB.
    #[serde(rename = "2m")]
    Size2M,
    /// 1 GiB.
    #[serde(rename = "1g")]
    Size1G,
}

impl PageSize {
    /// Bytes in a page of this size.
    pub fn bytes(self) -> u64 {
        match self {
            Self::Size4K => 4 << 10,
            Self::Size2M => 2 << 20,
            Self::Size1G => 1 << 30,
        }
    }
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// The size of the mapping page.
    pub page_size: PageSize,
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible at every level.
    pub user: bool,
    /// Execute-disabled at some level.
    pub no_execute: bool,
}

/// Why a translation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WalkError {
    /// CR0.PG is clear.
    #[error("paging is disabled on this vCPU")]
    PagingDisabled,
    /// Not 4-level long-mode paging.
    #[error("unsupported paging mode (only 4-level long-mode paging is walked)")]
    UnsupportedMode,
    /// The address is not canonical.
    #[error("{0:#x} is not a canonical address")]
    NonCanonical(u64),
    /// An entry on the path is not present.
    #[error("{gva:#x} is not mapped: {level} entry {index} not present (entry {entry:#x})")]
    NotPresent {
        /// The address looked up.
        gva: u64,
        /// The level whose entry is missing ("PML4", "PDPT", "PD", "PT").
        level: &'static str,
        /// Index in that table.
        index: u64,
        /// The entry's raw value.
        entry: u64,
    },
    /// A table lies outside guest RAM.
    #[error("{level} table for {gva:#x} at guest-physical {table:#x} is not in RAM")]
    TableOutsideRam {
        /// The address looked up.
        gva: u64,
        /// The level of the table.
        level: &'static str,
        /// Guest-physical address of the table.
        table: u64,
    },
}

/// Translates `gva` through the page tables described by `paging`.
pub fn translate(
    ram: &(impl PhysMemory + ?Sized),
    paging: PagingState,
    gva: u64,
) -> Result<Translation, WalkError> {
    if paging.cr0 & CR0_PG == 0 {
        return Err(WalkError::PagingDisabled);
    }
    if paging.cr4 & CR4_PAE == 0 || paging.efer & EFER_LMA == 0 || paging.cr4 & CR4_LA57 != 0 {
        return Err(WalkError::UnsupportedMode);
    }
    let top = (gva as i64) >> 47;
    if top != 0 && top != -1 {
        return Err(WalkError::NonCanonical(gva));
    }

    const LEVELS: [(&str, u32); 4] = [("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12)];
    let mut table = paging.cr3 & ADDR_MASK;
    let (mut writable, mut user, mut no_execute) = (true, true, false);
    for (depth, (level, shift)) in LEVELS.iter().enumerate() {
        let index = (gva >> shift) & 511;
        let entry = ram
            .read_u64_phys(table + index * 8)
            .map_err(|_| WalkError::TableOutsideRam { gva, level, table })?;
        if entry & PTE_P == 0 {
            return Err(WalkError::NotPresent {
                gva,
                level,
                index,
                entry,
            });
        }
        writable &= entry & PTE_W != 0;
        user &= entry & PTE_U != 0;
        no_execute |= entry & PTE_NX != 0;
        let page_size = match depth {
            1 if entry & PTE_PS != 0 => Some(PageSize::Size1G),
            2 if entry & PTE_PS != 0 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size4K),
            _ => None,
        };
        if let Some(page_size) = page_size {
            let size = page_size.bytes();
            let base = entry & ADDR_MASK & !(size - 1);
            return Ok(Translation {
                gpa: base | (gva & (size - 1)),
                page_size,
                writable,
                user,
                no_execute,
            });
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("the PT level always returns")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    fn paging(cr3: u64) -> PagingState {
        PagingState {
            cr0: CR0_PG | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
        }
    }

    /// Builds tables by hand: 4 KiB page at 0x400000 -> 0x123000, a 2 MiB page at
    /// 0xffffffff80000000 -> 0, a 1 GiB page at 0xffff888000000000 -> 0.
    fn setup() -> GuestRam {
        let ram = GuestRam::new(4 << 20).expect("ram");
        let w = |a: u64, v: u64| ram.write(a, &v.to_le_bytes()).expect("write");
        let (pml4, pdpt0, pd0, pt0) = (0x1000, 0x2000, 0x3000, 0x4000);
        let (pdpt_hi, pd_hi, pdpt_dm) = (0x5000, 0x6000, 0x7000);
        w(pml4, pdpt0 | 7);
        w(pdpt0, pd0 | 7);
        w(pd0 + 2 * 8, pt0 | 7);
        w(pt0, 0x123000 | 5 | PTE_NX);
        w(pml4 + 511 * 8, pdpt_hi | 3);
        w(pdpt_hi + 510 * 8, pd_hi | 3);
        w(pd_hi, PTE_PS | 3);
        w(pml4 + 273 * 8, pdpt_dm | 3);
        w(pdpt_dm, PTE_PS | 3);
        ram
    }

    #[test]
    fn walks_all_page_sizes() {
        let ram = setup();
        let t = translate(&ram, paging(0x1000), 0x400abc).expect("4k");
        assert_eq!(t.gpa, 0x123abc);
        assert_eq!(t.page_size, PageSize::Size4K);
        assert!(t.user && !t.writable && t.no_execute);
        let t = translate(&ram, paging(0x1000), 0xffff_ffff_8012_3456).expect("2m");
        assert_eq!((t.gpa, t.page_size), (0x12_3456, PageSize::Size2M));
        assert!(!t.user && t.writable);
        let t = translate(&ram, paging(0x1000), 0xffff_8880_0abc_def0).expect("1g");
        assert_eq!((t.gpa, t.page_size), (0x0abc_def0, PageSize::Size1G));
    }

    #[test]
    fn clear_errors() {
        let ram = setup();
        assert!(matches!(
            translate(&ram, paging(0x1000), 0x401000),
            Err(WalkError::NotPresent {
                level: "PT",
                index: 1,
                ..
            })
        ));
        assert!(matches!(
            translate(&ram, paging(0x1000), 0x1000_0000_0000),
            Err(WalkError::NotPresent { level: "PML4", .. })
        ));
        assert_eq!(
            translate(&ram, paging(0x1000), 0x0000_8000_0000_0000),
            Err(WalkError::NonCanonical(0x0000_8000_0000_0000))
        );
        let mut p = paging(0x1000);
        p.cr0 = 1;
        assert_eq!(translate(&ram, p, 0), Err(WalkError::PagingDisabled));
        assert!(matches!(
            translate(&ram, paging(0x1000_0000), 0x400000),
            Err(WalkError::TableOutsideRam { level: "PML4", .. })
        ));
    }
}
