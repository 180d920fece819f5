//! Guest memory the VMM owns: a region outside the guest's RAM map (no e820
//! or boot-info entry), in a memfd of its own, registered with KVM as a
//! read-only slot. The guest can read and execute it through a mapping; it
//! writes only the pages write control opens to it (a patch's own
//! variables), never code; the VMM writes it directly. Live-patch code
//! lives here.
//!
//! Like RAM, it is in a memfd, so it can be handed to another VMM process
//! with the rest of the guest's memory.

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::memory::MemoryError;

/// Size of the patch area (one 2 MiB page).
pub const PATCH_AREA_BYTES: u64 = 2 << 20;
/// KVM memory slot of the patch area.
pub const PATCH_AREA_SLOT: u32 = 8;

/// A VMM-owned, guest-read-only region of guest-physical memory.
#[derive(Debug)]
pub struct VmmRegion {
    mem: GuestMemoryMmap,
    memfd: File,
    /// Guest-physical base (2 MiB aligned, above RAM and 4 GiB).
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

impl VmmRegion {
    /// The patch area of a VM whose RAM ends at `ram_end` (guest-physical).
    pub fn patch_area(ram_end: u64) -> Result<Self, MemoryError> {
        let gpa = ram_end.max(1 << 32).div_ceil(2 << 20) * (2 << 20);
        let memfd = crate::memory::new_memfd(c"lucos-patch-area", PATCH_AREA_BYTES)?;
        Self::from_memfd(memfd, gpa)
    }

    /// The patch area in `memfd` (one handed over by another VMM process),
    /// at guest-physical `gpa`.
    pub fn from_memfd(memfd: File, gpa: u64) -> Result<Self, MemoryError> {
        let file = memfd.try_clone().map_err(|e| {
            MemoryError::Memfd(nix::Error::from_raw(
                e.raw_os_error().unwrap_or(libc::EBADF),
            ))
        })?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(gpa),
            PATCH_AREA_BYTES as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(MemoryError::Map)?;
        Ok(Self {
            mem,
            memfd,
            gpa,
            size: PATCH_AREA_BYTES,
        })
    }

    /// The host address of guest-physical `gpa`, if it lies in the region.
    pub fn host_addr(&self, gpa: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.gpa).filter(|&o| o < self.size)?;
        self.mem
            .iter()
            .next()
            .and_then(|r| r.get_host_address(vm_memory::MemoryRegionAddress(off)).ok())
            .map(|p| p as u64)
    }

    /// The KVM slot: read-only for the guest. (Write control splits it
    /// where pages are opened to native writes.)
    pub fn kvm_region(&self) -> kvm_bindings::kvm_userspace_memory_region {
        let host = self.host_addr(self.gpa).unwrap_or(0);
        kvm_bindings::kvm_userspace_memory_region {
            slot: PATCH_AREA_SLOT,
            flags: kvm_bindings::KVM_MEM_READONLY,
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: host,
        }
    }

    /// Writes `bytes` at `offset` into the region.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        let at = self.at(offset, bytes.len())?;
        self.mem
            .write_slice(bytes, at)
            .map_err(|_| self.out_of_range(offset, bytes.len()))
    }

    /// Reads `buf.len()` bytes at `offset` of the region.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let at = self.at(offset, buf.len())?;
        self.mem
            .read_slice(buf, at)
            .map_err(|_| self.out_of_range(offset, buf.len()))
    }

    /// The guest address of `[offset, offset+len)`, if it lies in the region.
    fn at(&self, offset: u64, len: usize) -> Result<GuestAddress, MemoryError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(GuestAddress(self.gpa + offset)),
            _ => Err(self.out_of_range(offset, len)),
        }
    }

    fn out_of_range(&self, offset: u64, len: usize) -> MemoryError {
        MemoryError::OutOfRange {
            addr: self.gpa.saturating_add(offset),
            len,
        }
    }

    /// The memfd backing the region.
    pub fn memfd_raw(&self) -> i32 {
        self.memfd.as_raw_fd()
    }
}
