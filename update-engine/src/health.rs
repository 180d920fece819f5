//! Whether the guest kernel is alive, seen from outside with no agent in
//! the guest and no pause: its clock advances. The clock is the kernel's
//! tick count (`jiffies_64` on Linux, else `jiffies`), read out of guest
//! memory by symbol until it changes.
//!
//! A tickless Linux kernel whose CPUs are all idle advances its jiffies
//! only when one of them wakes (a timer, an interrupt): give it seconds,
//! not milliseconds.

use std::time::{Duration, Instant};

use vmm_core::control::AliveInfo;
use vmm_core::guest::Guest;

use crate::kernel::GuestKernel;

/// The clock symbols looked for, in order.
pub const CLOCK_SYMBOLS: [&str; 2] = ["jiffies_64", "jiffies"];

/// How often the clock is read while waiting.
const POLL: Duration = Duration::from_millis(2);

/// Errors of the liveness check.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The kernel has no clock symbol.
    #[error("the guest kernel has no clock symbol ({})", CLOCK_SYMBOLS.join(", "))]
    NoClock,
    /// The clock is not in the kernel image, where it can be read.
    #[error("{symbol} at {addr:#x} is outside the kernel image")]
    NotInImage {
        /// The symbol.
        symbol: String,
        /// Its address.
        addr: u64,
    },
    /// Reading guest memory failed.
    #[error("reading {symbol} at guest-physical {gpa:#x}: {why}")]
    Read {
        /// The symbol.
        symbol: String,
        /// Where.
        gpa: u64,
        /// Why.
        why: String,
    },
    /// The clock did not move.
    #[error("the guest kernel's clock {symbol} did not advance in {timeout_ms} ms (it stayed at {value})")]
    Stalled {
        /// The symbol.
        symbol: String,
        /// How long it was watched.
        timeout_ms: u64,
        /// The value it kept.
        value: u64,
    },
}

/// Where the kernel's clock is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clock {
    /// Its symbol.
    pub symbol: String,
    /// Its guest-physical address: the kernel image is physically
    /// contiguous, so that of `_text` plus its offset.
    pub gpa: u64,
}

impl Clock {
    /// The clock of `kernel`.
    pub fn of(kernel: &GuestKernel) -> Result<Self, HealthError> {
        let s = CLOCK_SYMBOLS
            .iter()
            .find_map(|n| kernel.symbols.lookup(n).ok())
            .ok_or(HealthError::NoClock)?;
        let end = kernel.symbols.lookup("_end").map_or(u64::MAX, |e| e.addr);
        if s.addr < kernel.text || s.addr + 8 > end {
            return Err(HealthError::NotInImage {
                symbol: s.name.clone(),
                addr: s.addr,
            });
        }
        Ok(Self {
            symbol: s.name.clone(),
            gpa: s.addr - kernel.text + kernel.text_gpa,
        })
    }

    /// Its value now.
    pub fn read(&self, vm: &dyn Guest) -> Result<u64, HealthError> {
        vm.ram()
            .read_u64_phys(self.gpa)
            .map_err(|e| HealthError::Read {
                symbol: self.symbol.clone(),
                gpa: self.gpa,
                why: e.to_string(),
            })
    }
}

/// Waits up to `timeout` for the guest kernel's clock to advance, reading
/// it every few milliseconds while the guest runs.
pub fn wait_alive(
    vm: &dyn Guest,
    kernel: &GuestKernel,
    timeout: Duration,
) -> Result<AliveInfo, HealthError> {
    let clock = Clock::of(kernel)?;
    let t0 = Instant::now();
    let before = clock.read(vm)?;
    loop {
        let now = clock.read(vm)?;
        if now != before {
            return Ok(AliveInfo {
                symbol: clock.symbol,
                before,
                after: now,
                waited_ms: t0.elapsed().as_millis() as u64,
            });
        }
        if t0.elapsed() >= timeout {
            return Err(HealthError::Stalled {
                symbol: clock.symbol,
                timeout_ms: timeout.as_millis() as u64,
                value: before,
            });
        }
        std::thread::sleep(POLL);
    }
}
