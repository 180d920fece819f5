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
    /// Data, not code: an old copy nothing may hold a pointer into (in a
    /// register or on a stack), its first byte included.
    pub data: bool,
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
    /// A register or a stack word holds a pointer into data being left
    /// (code following a pointer to an old copy).
    Holding {
        /// The data.
        data: String,
        /// Which register, or where on the stack.
        place: String,
        /// The pointer.
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
            Self::Holding { data, place, value } => {
                write!(f, "holding a pointer into {data} ({value:#x} in {place})")
            }
        }
    }
}

/// Whether `rip` lies in code being left.
pub fn check_rip(rip: u64, leaving: &[Leaving]) -> Option<Active> {
    leaving
        .iter()
        .find(|l| !l.data && l.contains(rip))
        .map(|l| Active::Executing {
            function: l.function.clone(),
            rip,
        })
}

/// Whether any 8-byte word of `stack`, which starts at guest-virtual
/// `base`, points into code or data being left. For code a word equal to a
/// range's first byte is not counted: no call returns to a function's
/// entry, so that is a function pointer (a callback spilled to the stack),
/// not an activation. For data every byte counts.
pub fn check_stack(base: u64, stack: &[u8], leaving: &[Leaving]) -> Option<Active> {
    stack.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let value = u64::from_le_bytes(w.try_into().expect("8-byte chunk"));
        let at = base + 8 * i as u64;
        leaving
            .iter()
            .find(|l| l.contains(value) && (l.data || value != l.start))
            .map(|l| match l.data {
                true => Active::Holding {
                    data: l.function.clone(),
                    place: format!("its stack at {at:#x}"),
                    value,
                },
                false => Active::OnStack {
                    function: l.function.clone(),
                    at,
                    value,
                },
            })
    })
}

/// Names of the general-purpose registers in [`vmm_core::guest::VcpuState::gprs`]'s order.
pub const GPR_NAMES: [&str; 16] = [
    "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11", "R12", "R13",
    "R14", "R15",
];

/// Whether a general-purpose register holds a pointer into data being left.
pub fn check_regs(gprs: &[u64; 16], leaving: &[Leaving]) -> Option<Active> {
    gprs.iter().zip(GPR_NAMES).find_map(|(&value, reg)| {
        leaving
            .iter()
            .find(|l| l.data && l.contains(value))
            .map(|l| Active::Holding {
                data: l.function.clone(),
                place: reg.to_owned(),
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
                data: false,
            },
            Leaving {
                function: "g".into(),
                start: 0x2000,
                end: 0x2010,
                data: false,
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
    fn a_pointer_into_old_data_counts_in_a_register_or_on_a_stack_its_start_too() {
        let mut l = leaving();
        l.push(Leaving {
            function: "stats (old copy)".into(),
            start: 0x9000,
            end: 0x9018,
            data: true,
        });
        // RIP never "executes" data; a register pointing to its start holds it.
        assert_eq!(check_rip(0x9000, &l), None);
        let mut gprs = [0u64; 16];
        gprs[1] = 0x1008;
        assert_eq!(
            check_regs(&gprs, &l),
            None,
            "code in a register is no pointer into data"
        );
        gprs[12] = 0x9000;
        let a = check_regs(&gprs, &l).expect("held");
        assert!(
            a.to_string().contains("stats (old copy) (0x9000 in R12)"),
            "{a}"
        );
        let mut stack = vec![0u8; 32];
        stack[16..24].copy_from_slice(&0x9000u64.to_le_bytes());
        assert!(matches!(
            check_stack(0x8000, &stack, &l),
            Some(Active::Holding { place, .. }) if place == "its stack at 0x8010"
        ));
        stack[16..24].copy_from_slice(&0x9018u64.to_le_bytes());
        assert_eq!(check_stack(0x8000, &stack, &l), None, "one past the end");
    }

    #[test]
    fn live_stack_ends_at_the_aligned_top() {
        assert_eq!(live_stack(0x7ff9), (0x7ff8, 0x8000));
        assert_eq!(live_stack(0x4000), (0x4000, 0x8000));
        assert_eq!(live_stack(u64::MAX - 7), (!7, u64::MAX));
    }
}
