//! Guest RAM backed by a memfd.
//!
//! The RAM is one memfd mapped `MAP_SHARED`, so another process (a new VMM
//! binary taking over a running guest) can map the same pages. Below 4 GiB
//! the 32-bit MMIO hole is left out: RAM beyond 3 GiB continues at 4 GiB.

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors creating or accessing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest RAM memfd")]
    Memfd(#[source] nix::Error),
    /// Mapping the memfd failed.
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// A guest-physical access fell outside RAM.
    #[error("guest-physical range {addr:#x}+{len:#x} is not RAM")]
    OutOfRange {
        /// First byte of the access.
        addr: u64,
        /// Length of the access.
        len: usize,
    },
}

/// One contiguous piece of guest RAM: where it sits in the guest and where in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRange {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the memfd.
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the 32-bit MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    if size <= MMIO_GAP_START {
        return vec![RamRange {
            guest_addr: 0,
            len: size,
            file_offset: 0,
        }];
    }
    vec![
        RamRange {
            guest_addr: 0,
            len: MMIO_GAP_START,
            file_offset: 0,
        },
        RamRange {
            guest_addr: MMIO_GAP_END,
            len: size - MMIO_GAP_START,
            file_offset: MMIO_GAP_START,
        },
    ]
}

/// A new zeroed memfd of `size` bytes named `name` (close-on-exec).
pub fn new_memfd(name: &std::ffi::CStr, size: u64) -> Result<File, MemoryError> {
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(MemoryError::Memfd)?;
    let memfd = File::from(fd);
    nix::unistd::ftruncate(&memfd, size as i64).map_err(MemoryError::Memfd)?;
    Ok(memfd)
}

/// Guest RAM.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    memfd: File,
    size: u64,
    ranges: Vec<RamRange>,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM in a new memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::from_memfd(new_memfd(c"lucos-guest-ram", size)?, size)
    }

    /// Maps an existing RAM memfd of `size` bytes (one handed over by another VMM process).
    pub fn from_memfd(memfd: File, size: u64) -> Result<Self, MemoryError> {
        let ranges = ram_ranges(size);
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let file = memfd.try_clone().map_err(|e| {
                MemoryError::Memfd(nix::Error::from_raw(
                    e.raw_os_error().unwrap_or(libc::EBADF),
                ))
            })?;
            regions.push((
                GuestAddress(r.guest_addr),
                r.len as usize,
                Some(FileOffset::new(file, r.file_offset)),
            ));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
        Ok(Self {
            mem,
            memfd,
            size,
            ranges,
        })
    }

    /// The vm-memory view, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM pieces and their memfd offsets.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// The memfd backing all RAM.
    pub fn memfd_raw(&self) -> i32 {
        self.memfd.as_raw_fd()
    }

    /// Reads `buf.len()` bytes at guest-physical `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len(),
            })
    }

    /// Writes `buf` at guest-physical `addr`.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len(),
            })
    }

    /// Reads a little-endian u64 at guest-physical `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Whether `[addr, addr+len)` is entirely RAM.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        self.mem.iter().any(|r| {
            let start = r.start_addr().raw_value();
            addr >= start
                && addr
                    .checked_add(len)
                    .is_some_and(|end| end <= start + r.len())
        })
    }

    /// The host address of guest-physical `gpa`, if it is RAM.
    pub fn host_addr(&self, gpa: u64) -> Option<u64> {
        self.slots()
            .into_iter()
            .find(|(g, len, _)| gpa >= *g && gpa < g + len)
            .map(|(g, _, host)| host + (gpa - g))
    }

    /// (guest address, size, host address) of each region, for KVM memory slots.
    pub fn slots(&self) -> Vec<(u64, u64, u64)> {
        self.mem
            .iter()
            .map(|r| {
                let host = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map(|p| p as u64)
                    .unwrap_or(0);
                (r.start_addr().raw_value(), r.len(), host)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                guest_addr: 0,
                len: 512 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_ram_skips_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len, MMIO_GAP_START);
        assert_eq!(r[1].guest_addr, 1 << 32);
        assert_eq!(r[1].len, (4 << 30) - MMIO_GAP_START);
        assert_eq!(r[1].file_offset, MMIO_GAP_START);
    }

    #[test]
    fn read_write_round_trip_and_bounds() {
        let ram = GuestRam::new(1 << 20).expect("ram");
        ram.write(0x1000, b"lucos").expect("write");
        let mut b = [0u8; 5];
        ram.read(0x1000, &mut b).expect("read");
        assert_eq!(&b, b"lucos");
        assert!(ram.write((1 << 20) - 2, b"abc").is_err());
        assert!(ram.contains(0, 1 << 20));
        assert!(!ram.contains(1, 1 << 20));
    }

    #[test]
    fn memfd_is_shared_with_a_second_mapping() {
        let ram = GuestRam::new(1 << 20).expect("ram");
        ram.write(0x2000, &[0xab]).expect("write");
        // SAFETY: dup of a valid, open fd; the result is owned by the File below.
        let fd = unsafe { libc::dup(ram.memfd_raw()) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a freshly duplicated descriptor nobody else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let other = GuestRam::from_memfd(file, 1 << 20).expect("second mapping");
        let mut b = [0u8; 1];
        other.read(0x2000, &mut b).expect("read");
        assert_eq!(b[0], 0xab);
    }
}
