//! Activeness safety: a switch may happen only while no vCPU is running code
//! the switch leaves behind.
//!
//! Writing the trampolines of a multi-function patch in one pause is not
//! enough for the functions to switch as one: a vCPU paused in the middle of
//! an old function (or with an old function's return address on its stack)
//! would finish that call in old code and make its next calls in new code.
//! Like kpatch's stack check under `stop_machine`, the VMM refuses such a
//! pause and tries another: for every vCPU in kernel mode it checks the
//! instruction pointer and every 8-byte word of the live part of its kernel
//! stack (RSP up to the end of the stack) against the code being left. The
//! stack scan is conservative: any word that points into that code counts,
//! whether it is a return address or not, so it can only cause a retry,
//! never miss a frame on the scanned stack.

use serde::Serialize;

/// Kernel stacks are scanned from RSP up to the next multiple of this size:
/// Linux's `THREAD_SIZE` and `IRQ_STACK_SIZE` on x86-64 (16 KiB, aligned to
/// their size), and the test kernel's stacks.
pub const STACK_BYTES: u64 = 16 << 10;

/// Code that a switch stops using: an old function's body, or the code of
/// an applied patch that a revert or a stacked patch replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaving {
    /// What the code is, for messages.
    pub function: String,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Leaving {
    fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }
}

/// Why a vCPU is still in code being left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Active {
    /// Its instruction pointer is inside the code.
    Executing {
        /// The function.
        function: String,
        /// The instruction pointer.
        rip: u64,
    },
    /// A word on its kernel stack points into the code (a call into it has
    /// not returned yet).
    OnStack {
        /// The function.
        function: String,
        /// Where on the stack.
        at: u64,
        /// The word.
        value: u64,
    },
}

impl std::fmt::Display for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Executing { function, rip } => write!(f, "executing {function} (RIP {rip:#x})"),
            Self::OnStack {
                function,
                at,
                value,
            } => write!(
                f,
                "inside a call to {function} (return address {value:#x} on its stack at {at:#x})"
            ),
        }
    }
}

/// Whether `rip` lies in code being left.
pub fn check_rip(rip: u64, leaving: &[Leaving]) -> Option<Active> {
    leaving
        .iter()
        .find(|l| l.contains(rip))
        .map(|l| Active::Executing {
            function: l.function.clone(),
            rip,
        })
}

/// Whether any 8-byte word of `stack`, which starts at guest-virtual
/// `base`, points into code being left. A word equal to a range's first byte
/// is not counted: no call returns to a function's entry, so that is a
/// function pointer (a callback spilled to the stack), not an activation.
pub fn check_stack(base: u64, stack: &[u8], leaving: &[Leaving]) -> Option<Active> {
    stack.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let value = u64::from_le_bytes(w.try_into().expect("8-byte chunk"));
        leaving
            .iter()
            .find(|l| l.contains(value) && value != l.start)
            .map(|l| Active::OnStack {
                function: l.function.clone(),
                at: base + 8 * i as u64,
                value,
            })
    })
}

/// The live part of the stack RSP points into: `[rsp rounded down to 8,
/// end of its STACK_BYTES-aligned stack)`.
pub fn live_stack(rsp: u64) -> (u64, u64) {
    let start = rsp & !7;
    let end = (rsp & !(STACK_BYTES - 1)).saturating_add(STACK_BYTES);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaving() -> Vec<Leaving> {
        vec![
            Leaving {
                function: "f".into(),
                start: 0x1000,
                end: 0x1040,
            },
            Leaving {
                function: "g".into(),
                start: 0x2000,
                end: 0x2010,
            },
        ]
    }

    #[test]
    fn rip_in_a_body_is_active_and_the_end_is_not() {
        let l = leaving();
        assert!(check_rip(0x1000, &l).is_some());
        assert!(matches!(
            check_rip(0x200f, &l),
            Some(Active::Executing { function, .. }) if function == "g"
        ));
        assert_eq!(check_rip(0x1040, &l), None);
        assert_eq!(check_rip(0xfff, &l), None);
    }

    #[test]
    fn a_return_address_anywhere_on_the_stack_is_found() {
        let l = leaving();
        let mut stack = vec![0u8; 64];
        assert_eq!(check_stack(0x8000, &stack, &l), None);
        // A function pointer (the entry) is no activation.
        stack[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(check_stack(0x8000, &stack, &l), None);
        stack[40..48].copy_from_slice(&0x2008u64.to_le_bytes());
        let a = check_stack(0x8000, &stack, &l).expect("active");
        assert_eq!(
            a,
            Active::OnStack {
                function: "g".into(),
                at: 0x8028,
                value: 0x2008
            }
        );
        assert!(a.to_string().contains("inside a call to g"), "{a}");
    }

    #[test]
    fn live_stack_ends_at_the_aligned_top() {
        assert_eq!(live_stack(0x7ff9), (0x7ff8, 0x8000));
        assert_eq!(live_stack(0x4000), (0x4000, 0x8000));
        assert_eq!(live_stack(u64::MAX - 7), (!7, u64::MAX));
    }
}
