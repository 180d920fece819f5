//! The patch area as the engine manages it: which of its bytes hold code
//! ([`Space`], first fit), and where it is mapped in the guest kernel's
//! address space ([`plan_mapping`]: a free 2 MiB slot of the kernel image
//! window, within ±2 GiB of kernel text, found by reading the kernel's own
//! page tables; the entry is written only in the switch's pause, as one of
//! its checked writes).

use serde::{Deserialize, Serialize};
use vmm_core::guest::{AreaInfo, PhysMemory};
use vmm_core::pagewalk::PagingState;

/// Alignment of code placed in the patch area (a cache line), at least.
pub const CODE_ALIGN: u64 = 64;

/// Which runs of the patch area are taken: first fit, aligned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// Area size.
    pub size: u64,
    /// Taken runs `(offset, len)`, sorted by offset, disjoint.
    taken: Vec<(u64, u64)>,
}

impl Space {
    /// An empty area of `size` bytes.
    pub fn new(size: u64) -> Self {
        Space {
            size,
            taken: Vec::new(),
        }
    }

    /// Offset of the first free run of `need` bytes aligned to `align`
    /// (and at least [`CODE_ALIGN`]).
    pub fn find(&self, need: u64, align: u64) -> Option<u64> {
        let align = align.max(CODE_ALIGN);
        let mut at = 0;
        for &(off, len) in &self.taken {
            if at + need <= off {
                return Some(at);
            }
            at = (off + len).div_ceil(align) * align;
        }
        (at + need <= self.size).then_some(at)
    }

    /// Marks `[off, off+len)` taken.
    pub fn take(&mut self, off: u64, len: u64) {
        let i = self.taken.partition_point(|&(o, _)| o < off);
        self.taken.insert(i, (off, len));
    }

    /// Frees the run taken at `off` (no-op if none starts there).
    pub fn release(&mut self, off: u64) {
        self.taken.retain(|&(o, _)| o != off);
    }

    /// Length of the run taken at `off`, if one starts there.
    pub fn len_of(&self, off: u64) -> Option<u64> {
        self.taken.iter().find(|&&(o, _)| o == off).map(|&(_, l)| l)
    }

    /// Bytes taken.
    pub fn in_use(&self) -> u64 {
        self.taken.iter().map(|&(_, len)| len).sum()
    }
}

/// PDE bits for a patch-area page: present, writable, 2 MiB, accessed and
/// dirty preset (the slot is read-only, so the CPU could not set them),
/// global; not user, executable. Writable so that the guest's writes to
/// copies of data a patch changes reach write control (the read-only KVM
/// slot): every other write to the area is refused there and reported.
pub const PDE_AREA: u64 = 1 | (1 << 1) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8);
const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Where the area will be mapped: the page-directory entry to write (it is
/// zero now) and the value it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Guest-virtual base of the area once mapped.
    pub va: u64,
    /// Guest-physical address of the page-directory entry.
    pub pde_gpa: u64,
    /// The entry's value.
    pub pde: u64,
}

/// Finds the highest free 2 MiB slot of the kernel image window in the
/// kernel's page tables `kernel` (its own top-level table, not a process's),
/// reading only.
pub fn plan_mapping(
    ram: &dyn PhysMemory,
    kernel: PagingState,
    area: AreaInfo,
) -> Result<Mapping, String> {
    let read = |gpa: u64| ram.read_u64_phys(gpa).map_err(|e| e.to_string());
    let pml4 = kernel.cr3 & ADDR_MASK;
    let mut va = 0xffff_ffff_bfe0_0000u64;
    while va >= 0xffff_ffff_8000_0000 {
        let l4 = read(pml4 + ((va >> 39) & 511) * 8)?;
        if l4 & PTE_P == 0 {
            return Err("the kernel window has no PML4 entry".into());
        }
        let l3 = read((l4 & ADDR_MASK) + ((va >> 30) & 511) * 8)?;
        if l3 & PTE_P == 0 || l3 & PTE_PS != 0 {
            return Err("the kernel window is not mapped through a page directory".into());
        }
        let pde_gpa = (l3 & ADDR_MASK) + ((va >> 21) & 511) * 8;
        if read(pde_gpa)? == 0 {
            return Ok(Mapping {
                va,
                pde_gpa,
                pde: area.gpa | PDE_AREA,
            });
        }
        va -= 2 << 20;
    }
    Err("no free 2 MiB slot in the kernel image window".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_is_first_fit_aligned_and_reused_after_release() {
        let mut s = Space::new(1024);
        assert_eq!(s.find(100, 1), Some(0));
        s.take(0, 100);
        assert_eq!(s.find(10, 1), Some(128));
        s.take(128, 300);
        assert_eq!(
            s.find(600, 1),
            None,
            "only 1024 - 448 = 576 left at the end"
        );
        assert_eq!(s.find(500, 1), Some(448));
        s.take(448, 500);
        assert_eq!(s.in_use(), 900);
        // Freeing the middle run makes room there again, first fit.
        s.release(128);
        assert_eq!(s.in_use(), 600);
        assert_eq!(s.find(200, 1), Some(128));
        assert_eq!(s.find(400, 1), None);
        s.release(0);
        assert_eq!(s.find(400, 1), Some(0));
        s.release(448);
        assert_eq!((s.in_use(), s.find(1024, 1)), (0, Some(0)));
        // Releasing where nothing starts changes nothing.
        s.take(64, 1);
        s.release(65);
        assert_eq!(s.in_use(), 1);
        // A patch whose sections need more than a cache line gets a run
        // aligned to that.
        assert_eq!(s.find(100, 256), Some(256));
        assert_eq!(s.find(100, 1), Some(128));
        assert_eq!(s.find(10, 256), Some(0));
    }
}
