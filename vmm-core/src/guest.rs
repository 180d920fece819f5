//! The guest as the policy above vmm-core sees it (habit 4 of
//! shared/STYLE.md): guest-physical memory, the VMM-owned patch area, and
//! pausing every vCPU, with the vCPUs' registers readable only through the
//! pause guard. [`crate::Vm`] implements it on KVM; update-engine's unit
//! tests implement it in memory, so the engine's logic is tested without a
//! VM and runs against KVM unchanged.

use std::time::Duration;

use crate::memory::{GuestRam, MemoryError};
use crate::pagewalk::PagingState;
use crate::vm::VmError;
use crate::write_control::{ProtectError, Protection};

/// Guest-physical memory.
pub trait PhysMemory {
    /// Reads `buf.len()` bytes at `gpa`.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Writes `buf` at `gpa`.
    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError>;
    /// Reads a little-endian u64 at `gpa`.
    fn read_u64_phys(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl PhysMemory for GuestRam {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.read(gpa, buf)
    }
    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.write(gpa, buf)
    }
}

/// What the engine needs of a paused vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuState {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Current privilege level (CS.RPL): 0 kernel, 3 user.
    pub cpl: u8,
    /// Its paging registers.
    pub paging: PagingState,
    /// General-purpose registers: RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP,
    /// R8 to R15 (what code running there holds, pointers included).
    pub gprs: [u64; 16],
    /// Base (linear address) of its task-state segment: where the stack
    /// its next entry into the kernel starts from is (`RSP0`).
    pub tr_base: u64,
}

/// Where the VMM-owned patch area is: guest-physical, outside RAM,
/// read-only to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AreaInfo {
    /// Guest-physical base (2 MiB aligned).
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Proof that every vCPU is paused: only [`Paused`] makes one, so vCPU
/// state can be read only through a pause guard.
#[derive(Debug)]
pub struct PauseToken(());

/// A guest: its memory, its patch area, and its vCPUs to pause.
pub trait Guest: Send + Sync {
    /// Guest RAM.
    fn ram(&self) -> &dyn PhysMemory;
    /// Number of vCPUs.
    fn vcpu_count(&self) -> u8;
    /// Whether every vCPU is paused (by anyone).
    fn is_paused(&self) -> bool;
    /// Pauses every vCPU; how long until all were out. Use [`Paused::new`].
    fn pause_vcpus(&self) -> Result<Duration, VmError>;
    /// Resumes them. Use [`Paused`], which resumes on drop.
    fn resume_vcpus(&self) -> Result<(), VmError>;
    /// State of paused vCPU `v`.
    fn vcpu_state(&self, paused: &PauseToken, v: u8) -> Result<VcpuState, VmError>;
    /// The patch area.
    fn area(&self) -> AreaInfo;
    /// Writes `bytes` at `offset` of the patch area.
    fn area_write(&self, offset: u64, bytes: &[u8]) -> Result<(), MemoryError>;
    /// Reads the patch area at `offset`.
    fn area_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Write control: releases the ranges of the owners in `release` and
    /// protects `add`, all or nothing. Use [`Paused::change_protection`].
    fn change_protection(
        &self,
        paused: &PauseToken,
        release: &[String],
        add: &[Protection],
    ) -> Result<(), ProtectError>;
    /// The protected ranges now.
    fn protections(&self) -> Vec<Protection>;
    /// Guest RAM: (guest-physical start, length) of each range.
    fn ram_ranges(&self) -> Vec<(u64, u64)>;
    /// Turns logging of the RAM pages the guest writes on (an empty log)
    /// or off. A guest that cannot log says every page was written
    /// ([`Guest::dirty_pages`]).
    fn set_dirty_log(&self, on: bool) -> Result<(), VmError> {
        let _ = on;
        Ok(())
    }
    /// The RAM pages (guest-physical, page-aligned) the guest wrote since
    /// the log was turned on or last read; `None` when that is not known:
    /// every page must be taken as written.
    fn dirty_pages(&self) -> Result<Option<Vec<u64>>, VmError> {
        Ok(None)
    }
}

/// The 8-byte-aligned words of guest RAM in `spans` (guest-physical
/// `[start, end)`) whose value lies in one of `values` (`[start, end)`):
/// (address, value), in address order. A scan for pointers into an object.
/// Where a range's values share their high bytes (an object's addresses
/// do), those bytes are searched for with `memchr`'s vectorized substring
/// search and only the words they are found in are read whole.
pub fn find_words(
    ram: &dyn PhysMemory,
    spans: &[(u64, u64)],
    values: &[(u64, u64)],
) -> Result<Vec<(u64, u64)>, MemoryError> {
    const CHUNK: usize = 64 << 10;
    let values: Vec<(u64, u64)> = values.iter().copied().filter(|(a, b)| a < b).collect();
    // Per range: how many high bytes every value in it shares, and them.
    let needles: Vec<(usize, Vec<u8>)> = values
        .iter()
        .map(|&(a, b)| {
            let (lo, hi) = (a.to_le_bytes(), (b - 1).to_le_bytes());
            let fixed = (0..8).rev().take_while(|&i| lo[i] == hi[i]).count();
            (fixed, lo[8 - fixed..].to_vec())
        })
        .collect();
    let mut out = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for &(start, end) in spans {
        let mut at = start.next_multiple_of(8);
        while at + 8 <= end {
            let n = ((end - at) as usize).min(CHUNK) & !7;
            let chunk = &mut buf[..n];
            ram.read_phys(at, chunk)?;
            let word =
                |i: usize| u64::from_le_bytes(chunk[i..i + 8].try_into().unwrap_or_default());
            for (&(a, b), (fixed, needle)) in values.iter().zip(&needles) {
                if *fixed >= 3 {
                    // Every occurrence, overlapping ones too: an unaligned
                    // one must not hide an aligned one it overlaps.
                    let finder = memchr::memmem::Finder::new(needle);
                    let mut from = 0;
                    while let Some(i) = finder.find(&chunk[from..]) {
                        let p = from + i;
                        from = p + 1;
                        let Some(w) = p.checked_sub(8 - fixed) else {
                            continue;
                        };
                        let v = word(w);
                        if w % 8 == 0 && v >= a && v < b {
                            out.push((at + w as u64, v));
                        }
                    }
                } else {
                    for w in (0..n).step_by(8) {
                        let v = word(w);
                        if v >= a && v < b {
                            out.push((at + w as u64, v));
                        }
                    }
                }
            }
            at += n as u64;
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Every vCPU paused, for as long as this lives: vCPU state is readable
/// through it; dropping it resumes the guest (unless the guest was paused
/// already when it was made: then it stays paused, as whoever paused it
/// expects).
pub struct Paused<'a> {
    guest: &'a dyn Guest,
    token: PauseToken,
    resume: bool,
    took: Duration,
}

impl std::fmt::Debug for Paused<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paused")
            .field("resume", &self.resume)
            .field("took", &self.took)
            .finish()
    }
}

impl<'a> Paused<'a> {
    /// Pauses `guest`, unless it is paused already.
    pub fn new(guest: &'a dyn Guest) -> Result<Self, VmError> {
        let (resume, took) = if guest.is_paused() {
            (false, Duration::ZERO)
        } else {
            (true, guest.pause_vcpus()?)
        };
        Ok(Self {
            guest,
            token: PauseToken(()),
            resume,
            took,
        })
    }

    /// How long pausing took (zero if it was paused already).
    pub fn took(&self) -> Duration {
        self.took
    }

    /// Whether the guest was paused before this guard (and stays so).
    pub fn was_paused(&self) -> bool {
        !self.resume
    }

    /// State of vCPU `v`.
    pub fn vcpu(&self, v: u8) -> Result<VcpuState, VmError> {
        self.guest.vcpu_state(&self.token, v)
    }

    /// Releases the protected ranges of the owners in `release` and
    /// protects `add` (write control), all or nothing.
    pub fn change_protection(
        &self,
        release: &[String],
        add: &[Protection],
    ) -> Result<(), ProtectError> {
        self.guest.change_protection(&self.token, release, add)
    }

    /// The guest.
    pub fn guest(&self) -> &'a dyn Guest {
        self.guest
    }

    /// Resumes now, reporting a failure (dropping resumes too, silently).
    pub fn resume(mut self) -> Result<(), VmError> {
        if std::mem::take(&mut self.resume) {
            self.guest.resume_vcpus()?;
        }
        Ok(())
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if self.resume {
            if let Err(e) = self.guest.resume_vcpus() {
                log::error!("resuming the guest failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_in_a_range_are_found_where_aligned() {
        let ram = GuestRam::new(64 << 20).expect("RAM");
        let spans: Vec<(u64, u64)> = ram
            .ranges()
            .iter()
            .map(|r| (r.guest_addr, r.guest_addr + r.len))
            .collect();
        for (gpa, v) in [
            (0x1000u64, 0xffff_ffff_8100_4ce0u64),
            (0x2008, 0xffff_ffff_8100_4cef),
            (0x3004, 0xffff_ffff_8100_4ce8), // not 8-byte aligned
            (0x4000, 0xffff_ffff_8100_4cf0), // just past the range
            (0x5000, 0xffff_8880_0100_4ce0),
            (0x3ff_fff8, 0xffff_ffff_8100_4ce1), // the last word of RAM
        ] {
            ram.write_phys(gpa, &v.to_le_bytes()).expect("write");
        }
        let ranges = [
            (0xffff_ffff_8100_4ce0, 0xffff_ffff_8100_4cf0),
            (0xffff_8880_0100_4ce0, 0xffff_8880_0100_4cf0),
            (1, 0), // empty
        ];
        assert_eq!(
            find_words(&ram, &spans, &ranges).expect("scan"),
            vec![
                (0x1000, 0xffff_ffff_8100_4ce0),
                (0x2008, 0xffff_ffff_8100_4cef),
                (0x5000, 0xffff_8880_0100_4ce0),
                (0x3ff_fff8, 0xffff_ffff_8100_4ce1),
            ]
        );
        // Only inside the spans.
        assert_eq!(
            find_words(&ram, &[(0x1008, 0x5000)], &ranges).expect("scan"),
            vec![(0x2008, 0xffff_ffff_8100_4cef)]
        );
        // A needle whose start repeats its end: the unaligned occurrence
        // (0xffff8123ff000000's high bytes) overlaps the aligned one.
        ram.write_phys(0x6000, &0xffff_8123_ff00_0000u64.to_le_bytes())
            .expect("write");
        ram.write_phys(0x6008, &0xffff_ffff_8123_ffffu64.to_le_bytes())
            .expect("write");
        assert_eq!(
            find_words(
                &ram,
                &[(0x6000, 0x7000)],
                &[(0xffff_ffff_8123_ff00, 0xffff_ffff_8124_0000)]
            )
            .expect("scan"),
            vec![(0x6008, 0xffff_ffff_8123_ffff)]
        );
        // A word at the end of one 64 KiB chunk and one at the start of
        // the next.
        ram.write_phys(0x1_fff8, &0xffff_ffff_8100_4ce2u64.to_le_bytes())
            .expect("write");
        ram.write_phys(0x2_0000, &0xffff_ffff_8100_4ce3u64.to_le_bytes())
            .expect("write");
        assert_eq!(
            find_words(&ram, &[(0x1_0000, 0x3_0000)], &ranges[..1]).expect("scan"),
            vec![
                (0x1_fff8, 0xffff_ffff_8100_4ce2),
                (0x2_0000, 0xffff_ffff_8100_4ce3)
            ]
        );
        // A range whose values share few high bytes: every word read.
        let wide = find_words(&ram, &spans, &[(0xffff_0000_0000_0000, u64::MAX)]).expect("scan");
        assert_eq!(wide.len(), 9, "{wide:x?}");
    }
}
