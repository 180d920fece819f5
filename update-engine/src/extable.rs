//! lucos's exception index: how the running Linux kernel finds the
//! exception-table entries of patch code.
//!
//! An instruction that may fault on purpose (a futex operation on user
//! memory, `load_unaligned_zeropad` in path lookup, `get_kernel_nofault`)
//! has an entry in `__ex_table` naming its fixup; on a fault the kernel
//! looks the faulting address up with `search_exception_tables()`, which
//! knows vmlinux, modules and BPF programs only. kpatch's patches are
//! modules and get this for free; lucos's code is not, so lucos makes the
//! lookup know it, from outside, the way it switches any function:
//!
//! - each patch's entries are linked into one table of its own, sorted
//!   ([`crate::link::ExTable`]);
//! - a page of the patch area holds a short stub and a list of slots, one
//!   per patch with a table: its code range, its table, the entry count;
//! - `search_exception_tables`' entry (its fentry nop) jumps to the stub,
//!   which looks for the address in the slots and, on a hit, tail-calls
//!   the kernel's own `search_extable(table, count, addr)` (the bsearch the
//!   kernel uses for modules); otherwise it goes on into the original
//!   function past its first instruction.
//!
//! The stub calls nothing and keeps nothing: it clobbers only registers the
//! C calling convention leaves to a callee (rax, rcx, rdx, rsi, rdi). The
//! page and the jump are written in the pause of the switch that needs
//! them, a slot comes and goes with its patch's code, and the jump is taken
//! back when the last slot goes.

use serde::{Deserialize, Serialize};

use crate::link::ExTable;

/// The kernel function whose entry jumps to the stub.
pub const HOOKED: &str = "search_exception_tables";
/// The kernel's search of one sorted table.
pub const SEARCH: &str = "search_extable";
/// Write-control owner of the jump at [`HOOKED`]'s entry.
pub const OWNER: &str = "lucos:extable";
/// Bytes of the index: one page of the patch area.
pub const BLOCK_BYTES: u64 = 4096;
/// Where the stub ends.
pub const STUB_BYTES: u64 = 64;
/// Offset of the slot count (the highest slot used, plus one).
const COUNT_AT: usize = 120;
/// Offset of the first slot.
const SLOTS_AT: usize = 128;
/// Bytes of one slot: code start, code end, table, entries (u64 each).
const SLOT_BYTES: usize = 32;
/// Slots in the page.
pub const SLOTS: usize = (BLOCK_BYTES as usize - SLOTS_AT) / SLOT_BYTES;

/// The index as the patcher keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Offset of its page in the patch area.
    pub offset: u64,
    /// [`HOOKED`]'s entry, guest-virtual and guest-physical.
    #[serde(with = "symbol_db::hex_u64")]
    pub site: u64,
    #[serde(with = "symbol_db::hex_u64")]
    pub site_gpa: u64,
    /// The code address of the patch each slot serves (0: free).
    pub slots: Vec<u64>,
}

impl Index {
    /// A new index in the page at `offset`.
    pub fn new(offset: u64, site: u64, site_gpa: u64) -> Self {
        Index {
            offset,
            site,
            site_gpa,
            slots: vec![0; SLOTS],
        }
    }

    /// Whether no slot is in use.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|&s| s == 0)
    }
}

/// `jmp rel32` at `at` (the address of the byte after the opcode's field
/// is `at + 5`) to `to`.
fn rel32(at: u64, to: u64) -> Result<[u8; 4], String> {
    let d = to.wrapping_sub(at + 5) as i64;
    i32::try_from(d)
        .map(i32::to_le_bytes)
        .map_err(|_| format!("{to:#x} is more than 2 GiB from {at:#x}"))
}

/// The page of a new index at guest-virtual `va`: the stub, no slot in
/// use. `search_extable` is the kernel's search of one table; the stub
/// goes on at `original` (the hooked function past its first instruction)
/// for any address the slots do not cover.
pub fn page(va: u64, search_extable: u64, original: u64) -> Result<Vec<u8>, String> {
    let mut s = Vec::with_capacity(BLOCK_BYTES as usize);
    // lea rax, [rip + slots]
    s.extend([0x48, 0x8d, 0x05]);
    s.extend(((SLOTS_AT - 7) as i32).to_le_bytes());
    // mov ecx, [rax - 8]        (the count)
    s.extend([0x8b, 0x48, 0xf8]);
    // loop (10): test ecx, ecx; je original
    s.extend([0x85, 0xc9, 0x74, 49 - 14]);
    // cmp rdi, [rax + 8]; jae next        (the end first, then the start)
    s.extend([0x48, 0x3b, 0x78, 0x08, 0x73, 41 - 20]);
    // cmp rdi, [rax]; jb next
    s.extend([0x48, 0x3b, 0x38, 0x72, 41 - 25]);
    // mov rdx, rdi; mov rsi, [rax + 24]; mov rdi, [rax + 16]
    s.extend([
        0x48, 0x89, 0xfa, 0x48, 0x8b, 0x70, 0x18, 0x48, 0x8b, 0x78, 0x10,
    ]);
    // jmp search_extable
    s.push(0xe9);
    s.extend(rel32(va + 36, search_extable)?);
    // next (41): add rax, 32; dec ecx; jmp loop
    s.extend([
        0x48,
        0x83,
        0xc0,
        SLOT_BYTES as u8,
        0xff,
        0xc9,
        0xeb,
        (10i8 - 49) as u8,
    ]);
    // original (49): jmp original
    s.push(0xe9);
    s.extend(rel32(va + 49, original)?);
    debug_assert_eq!(s.len(), 54);
    s.resize(BLOCK_BYTES as usize, 0);
    Ok(s)
}

/// Sets slot `i` of `page` (a copy of the index's page) to serve code
/// `[start, end)` with `table`, or frees it (`None`); keeps the count.
pub fn set_slot(page: &mut [u8], i: usize, slot: Option<(u64, u64, ExTable)>) {
    let (a, b, t, n) = match slot {
        Some((start, end, t)) => (start, end, t.addr, t.count),
        None => (0, 0, 0, 0),
    };
    let at = SLOTS_AT + i * SLOT_BYTES;
    for (k, v) in [a, b, t, n].into_iter().enumerate() {
        page[at + 8 * k..at + 8 * k + 8].copy_from_slice(&v.to_le_bytes());
    }
    let count = u32::from_le_bytes(page[COUNT_AT..COUNT_AT + 4].try_into().expect("4"));
    if slot.is_some() && (count as usize) < i + 1 {
        page[COUNT_AT..COUNT_AT + 4].copy_from_slice(&((i + 1) as u32).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Instruction};

    fn decode(bytes: &[u8], ip: u64) -> Vec<Instruction> {
        let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        let mut v = Vec::new();
        while d.can_decode() && d.position() < 54 {
            v.push(d.decode());
        }
        v
    }

    #[test]
    fn the_stub_searches_the_slots_and_goes_on_into_the_original() {
        let va = 0xffff_ffff_c100_0000;
        let (search, original) = (0xffff_ffff_8123_4560, 0xffff_ffff_8100_1005);
        let p = page(va, search, original).expect("page");
        assert_eq!(p.len(), BLOCK_BYTES as usize);
        let text: Vec<String> = decode(&p, va)
            .iter()
            .map(|i| {
                let mut f = iced_x86::GasFormatter::new();
                let mut s = String::new();
                iced_x86::Formatter::format(&mut f, i, &mut s);
                s
            })
            .collect();
        assert_eq!(
            text,
            [
                format!("lea 0x{:X},%rax", va + SLOTS_AT as u64),
                "mov -8(%rax),%ecx".into(),
                "test %ecx,%ecx".into(),
                format!("je 0x{:X}", va + 49),
                "cmp 8(%rax),%rdi".into(),
                format!("jae 0x{:X}", va + 41),
                "cmp (%rax),%rdi".into(),
                format!("jb 0x{:X}", va + 41),
                "mov %rdi,%rdx".into(),
                "mov 0x18(%rax),%rsi".into(),
                "mov 0x10(%rax),%rdi".into(),
                format!("jmp 0x{search:X}"),
                "add $0x20,%rax".into(),
                "dec %ecx".into(),
                format!("jmp 0x{:X}", va + 10),
                format!("jmp 0x{original:X}"),
            ]
        );
        // The count sits right before the slots: `mov -8(%rax)`.
        assert_eq!(COUNT_AT + 8, SLOTS_AT);
        assert!((STUB_BYTES as usize) <= COUNT_AT && 54 <= STUB_BYTES as usize);
    }

    #[test]
    fn slots_are_code_range_table_and_count_and_the_count_only_grows() {
        let mut p = page(
            0xffff_ffff_c100_0000,
            0xffff_ffff_8100_0000,
            0xffff_ffff_8100_0005,
        )
        .expect("page");
        let t = ExTable {
            addr: 0x3000,
            count: 7,
        };
        set_slot(&mut p, 2, Some((0x1000, 0x2000, t)));
        let word = |p: &[u8], at: usize| {
            u64::from_le_bytes(p[at..at + 8].try_into().expect("4 or 8 bytes"))
        };
        let at = SLOTS_AT + 2 * SLOT_BYTES;
        assert_eq!(
            [
                word(&p, at),
                word(&p, at + 8),
                word(&p, at + 16),
                word(&p, at + 24)
            ],
            [0x1000, 0x2000, 0x3000, 7]
        );
        assert_eq!(word(&p, COUNT_AT), 3);
        set_slot(&mut p, 0, Some((0x5000, 0x6000, t)));
        set_slot(&mut p, 2, None);
        assert_eq!(
            word(&p, COUNT_AT),
            3,
            "a freed slot matches nothing; the count stays"
        );
        assert_eq!([word(&p, at), word(&p, at + 8)], [0, 0]);
        assert_eq!(SLOTS, 124);
    }
}
