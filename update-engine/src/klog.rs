//! The guest kernel's log, read out of guest memory from outside: no agent
//! in the guest, and no pause.
//!
//! Linux 6.1 keeps its log in a `struct printk_ringbuffer` (the symbol
//! `prb` points at the one in use); the test kernel keeps one of the same
//! shape. Every offset and size here comes from the kernel's own type
//! information (BTF in a Linux image, the DWARF of an ELF the VM was booted
//! from), none is written into this file.
//!
//! # The format
//!
//! Two rings. The descriptor ring (`desc_ring`) has 2^`count_bits`
//! descriptors (`descs`) and as many `struct printk_info` (`infos`): the
//! record with id `i` is at index `i & (count - 1)` of both. A descriptor's
//! `state_var` holds the record's id in its low bits and its state in the
//! top two: 0 reserved (being written), 1 committed (written, may still be
//! extended), 2 finalized, 3 reusable (its text is gone). Ids run from
//! `tail_id` to `head_id`, wrapping at the id mask.
//!
//! The text ring (`text_data_ring`, 2^`size_bits` bytes at `data`) is
//! addressed by logical positions: index `lpos & (size - 1)`, wrap count
//! `lpos >> size_bits`. A descriptor's `text_blk_lpos` `{begin, next}` is
//! its block: the id of the descriptor, then the text (`printk_info.text_len`
//! bytes of it are the line). A block that did not fit before the end of the
//! ring lies at index 0 of the next wrap (`next` is one wrap ahead of
//! `begin`, and its length is `next`'s index). A `begin` with bit 0 set is a
//! record without text.
//!
//! # Reading while the guest writes
//!
//! The reader copies the descriptors, then the infos and the text, then the
//! descriptors again: a record is taken only if it was finalized in the
//! first copy and its `state_var` is the same in the second. A writer makes
//! a record reusable before it overwrites anything of it, so a record whose
//! state did not change was copied whole. Records overwritten before they
//! were read are counted, not guessed at (`lost`).

use std::sync::atomic::{fence, Ordering};

use symbol_db::btf::Btf;
use symbol_db::dwarf::TypeDb;
use symbol_db::SymbolTable;

use vmm_core::control::{DmesgInfo, LogRecord};
use vmm_core::guest::Guest;
use vmm_core::pagewalk::PagingState;

use crate::kernel as introspect;

/// Descriptor states, in the top two bits of `state_var`.
const STATE_RESERVED: u64 = 0;
const STATE_COMMITTED: u64 = 1;
const STATE_FINALIZED: u64 = 2;

/// Bounds on what a ring header may say before it is believed (Linux's
/// configured log is at most 2^25 bytes, with a descriptor per 2^5 of them;
/// `log_buf_len=` may ask for more).
const MAX_COUNT_BITS: u64 = 23;
const MAX_SIZE_BITS: u64 = 28;

/// Where an integer member is in its struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Byte offset.
    pub offset: u64,
    /// Size in bytes (1 to 8).
    pub size: u64,
}

impl Field {
    /// Its value in `bytes` (the struct), little-endian.
    fn get(&self, bytes: &[u8]) -> Option<u64> {
        let at = usize::try_from(self.offset).ok()?;
        let b = bytes.get(at..at + self.size as usize)?;
        let mut v = [0u8; 8];
        v[..b.len()].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    }

    fn end(&self) -> u64 {
        self.offset + self.size
    }
}

/// Where a bitfield is in its struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bits {
    /// Offset of its lowest bit from the start of the struct.
    pub bit: u64,
    /// Width in bits (1 to 56).
    pub width: u64,
}

impl Bits {
    fn get(&self, bytes: &[u8]) -> Option<u64> {
        let first = usize::try_from(self.bit / 8).ok()?;
        let shift = self.bit % 8;
        let n = (shift + self.width).div_ceil(8) as usize;
        let b = bytes.get(first..first + n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Some((u64::from_le_bytes(v) >> shift) & ((1 << self.width) - 1))
    }
}

/// Members of `struct printk_ringbuffer` the reader needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingFields {
    /// `desc_ring.count_bits`.
    pub count_bits: Field,
    /// `desc_ring.descs`.
    pub descs: Field,
    /// `desc_ring.infos`.
    pub infos: Field,
    /// `desc_ring.head_id`.
    pub head_id: Field,
    /// `desc_ring.tail_id`.
    pub tail_id: Field,
    /// `text_data_ring.size_bits`.
    pub size_bits: Field,
    /// `text_data_ring.data`.
    pub data: Field,
}

/// `struct prb_desc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescFields {
    /// `sizeof`.
    pub size: u64,
    /// `state_var`.
    pub state_var: Field,
    /// `text_blk_lpos.begin`.
    pub begin: Field,
    /// `text_blk_lpos.next`.
    pub next: Field,
}

/// `struct printk_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoFields {
    /// `sizeof`.
    pub size: u64,
    /// `seq`.
    pub seq: Field,
    /// `ts_nsec`.
    pub ts_nsec: Field,
    /// `text_len`.
    pub text_len: Field,
    /// `level` (a 3-bit field).
    pub level: Bits,
}

/// A text block (`struct prb_data_block`): the descriptor's id, then text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockFields {
    /// `id`.
    pub id: Field,
    /// Offset of `data`, the text.
    pub data: u64,
}

/// Where a kernel keeps its log and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLayout {
    /// Address of `prb`, the pointer to the ring buffer in use.
    pub prb: u64,
    /// Paging that maps the kernel for as long as it runs: its own
    /// top-level table where the symbols name it (`init_top_pgt`), else
    /// vCPU 0's when the kernel was inspected.
    pub paging: PagingState,
    /// Where the layout came from, for people.
    pub types: String,
    /// The ring buffer.
    pub ring: RingFields,
    /// A descriptor.
    pub desc: DescFields,
    /// A record's metadata.
    pub info: InfoFields,
    /// A text block.
    pub block: BlockFields,
}

/// Type information, from BTF or DWARF: what the layout asks of it.
trait Types {
    /// (offset, size) of `path` (`a.b.c`) in `struct name`.
    fn member(&self, name: &str, path: &str) -> Result<(u64, u64), String>;
    /// Offset of `path` in `struct name` (a member without a size too: a
    /// flexible array).
    fn offset(&self, name: &str, path: &str) -> Result<u64, String> {
        self.member(name, path).map(|(at, _)| at)
    }
    /// `sizeof(struct name)`.
    fn size(&self, name: &str) -> Result<u64, String>;
    /// (bit offset, width) of the direct member `member` of `struct name`.
    fn bits(&self, name: &str, member: &str) -> Result<(u64, u64), String>;
}

impl Types for Btf {
    fn member(&self, name: &str, path: &str) -> Result<(u64, u64), String> {
        self.member_of(name, path).map_err(|e| e.to_string())
    }
    fn size(&self, name: &str) -> Result<u64, String> {
        self.struct_layout(name)
            .map(|l| l.size)
            .map_err(|e| e.to_string())
    }
    fn bits(&self, name: &str, member: &str) -> Result<(u64, u64), String> {
        self.bits_of(name, member).map_err(|e| e.to_string())
    }
}

/// (offset, size) of `path` in `struct name`, composed member by member:
/// each step's type names the next struct.
fn dwarf_member(types: &TypeDb<'_>, name: &str, path: &str) -> Result<(u64, Option<u64>), String> {
    let (mut strukt, mut at) = (name.to_owned(), 0u64);
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let layout = types.struct_layout(&strukt).map_err(|e| e.to_string())?;
        let m = layout
            .members
            .iter()
            .find(|m| m.name == *part)
            .ok_or_else(|| format!("struct {strukt} has no member '{part}'"))?;
        at += m.offset;
        if i + 1 == parts.len() {
            return Ok((at, m.size));
        }
        strukt = m
            .type_name
            .strip_prefix("struct ")
            .ok_or_else(|| format!("{strukt}.{part} is a {}, not a struct", m.type_name))?
            .to_owned();
    }
    Err(format!("empty member path in struct {name}"))
}

impl Types for TypeDb<'_> {
    fn member(&self, name: &str, path: &str) -> Result<(u64, u64), String> {
        match dwarf_member(self, name, path)? {
            (at, Some(size)) => Ok((at, size)),
            (_, None) => Err(format!("{name}.{path} has no size in the DWARF")),
        }
    }
    fn offset(&self, name: &str, path: &str) -> Result<u64, String> {
        dwarf_member(self, name, path).map(|(at, _)| at)
    }
    fn size(&self, name: &str) -> Result<u64, String> {
        self.struct_layout(name)
            .map(|l| l.size)
            .map_err(|e| e.to_string())
    }
    fn bits(&self, name: &str, member: &str) -> Result<(u64, u64), String> {
        self.bits_of(name, member).map_err(|e| e.to_string())
    }
}

impl LogLayout {
    /// The layout of a kernel's log from its BTF (Linux).
    pub fn from_btf(btf: &Btf, symbols: &SymbolTable, paging: PagingState) -> Result<Self, String> {
        Self::new(btf, "BTF".into(), symbols, paging)
    }

    /// The layout of a kernel's log from the DWARF of the ELF it was booted
    /// from (`source` names it).
    pub fn from_dwarf(
        types: &TypeDb<'_>,
        source: &str,
        symbols: &SymbolTable,
        paging: PagingState,
    ) -> Result<Self, String> {
        Self::new(types, format!("DWARF of {source}"), symbols, paging)
    }

    fn new(
        types: &dyn Types,
        source: String,
        symbols: &SymbolTable,
        paging: PagingState,
    ) -> Result<Self, String> {
        let prb = symbols
            .lookup("prb")
            .map_err(|e| format!("the kernel log's anchor: {e}"))?
            .addr;
        let field = |s: &str, p: &str| -> Result<Field, String> {
            let (offset, size) = types.member(s, p)?;
            if !(1..=8).contains(&size) {
                return Err(format!("{s}.{p} is {size} bytes, not an integer"));
            }
            Ok(Field { offset, size })
        };
        let rb = "printk_ringbuffer";
        let ring = RingFields {
            count_bits: field(rb, "desc_ring.count_bits")?,
            descs: field(rb, "desc_ring.descs")?,
            infos: field(rb, "desc_ring.infos")?,
            head_id: field(rb, "desc_ring.head_id")?,
            tail_id: field(rb, "desc_ring.tail_id")?,
            size_bits: field(rb, "text_data_ring.size_bits")?,
            data: field(rb, "text_data_ring.data")?,
        };
        let desc = DescFields {
            size: types.size("prb_desc")?,
            state_var: field("prb_desc", "state_var")?,
            begin: field("prb_desc", "text_blk_lpos.begin")?,
            next: field("prb_desc", "text_blk_lpos.next")?,
        };
        if desc.state_var.size < 2 {
            return Err("prb_desc.state_var has no room for an id and a state".into());
        }
        let (bit, width) = types.bits("printk_info", "level")?;
        let info = InfoFields {
            size: types.size("printk_info")?,
            seq: field("printk_info", "seq")?,
            ts_nsec: field("printk_info", "ts_nsec")?,
            text_len: field("printk_info", "text_len")?,
            level: Bits { bit, width },
        };
        if !(1..=8).contains(&width) {
            return Err(format!("printk_info.level is {width} bits wide"));
        }
        // A text block starts with an unsigned long, the descriptor's id;
        // a kernel whose types lack the block's struct has it as wide as an
        // lpos (also an unsigned long).
        let block = match (
            field("prb_data_block", "id"),
            types.offset("prb_data_block", "data"),
        ) {
            (Ok(id), Ok(data)) => BlockFields { id, data },
            _ => BlockFields {
                id: Field {
                    offset: 0,
                    size: desc.begin.size,
                },
                data: desc.begin.size,
            },
        };
        Ok(Self {
            prb,
            paging,
            types: source,
            ring,
            desc,
            info,
            block,
        })
    }

    /// Bits of a descriptor id (the rest of `state_var` is its state).
    fn id_bits(&self) -> u32 {
        (self.desc.state_var.size * 8 - 2) as u32
    }
}

/// Guest kernel memory by virtual address, as the reader sees it.
pub trait KernelMemory {
    /// Reads `buf.len()` bytes at kernel virtual address `va`.
    fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// A running guest's kernel memory, through the layout's paging.
struct GuestMemory<'a> {
    vm: &'a dyn Guest,
    paging: PagingState,
}

impl KernelMemory for GuestMemory<'_> {
    fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
        introspect::read_virt(self.vm, self.paging, va, buf).map_err(|e| e.to_string())
    }
}

/// Errors reading the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Guest memory could not be read.
    #[error("reading the kernel log's {what} at {addr:#x}: {why}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// Why it failed.
        why: String,
    },
    /// The ring's header is not one this reader believes.
    #[error("the kernel log ring at {addr:#x} is not usable: {why}")]
    Ring {
        /// The ring buffer's address.
        addr: u64,
        /// What is wrong with it.
        why: String,
    },
}

/// The records of the running guest's log from sequence number `since` on.
pub fn read_guest(vm: &dyn Guest, layout: &LogLayout, since: u64) -> Result<DmesgInfo, LogError> {
    let mem = GuestMemory {
        vm,
        paging: layout.paging,
    };
    read(&mem, layout, since)
}

fn read_bytes(
    mem: &dyn KernelMemory,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<Vec<u8>, LogError> {
    let mut b = vec![0u8; len as usize];
    mem.read(addr, &mut b)
        .map_err(|why| LogError::Read { what, addr, why })?;
    Ok(b)
}

/// A copy of the ring: descriptors before and after the rest.
#[derive(Debug, Clone)]
struct Snapshot {
    count_bits: u64,
    size_bits: u64,
    head_id: u64,
    tail_id: u64,
    descs: Vec<u8>,
    infos: Vec<u8>,
    text: Vec<u8>,
    descs_after: Vec<u8>,
}

/// The records of the log in `mem` from sequence number `since` on.
pub fn read(mem: &dyn KernelMemory, layout: &LogLayout, since: u64) -> Result<DmesgInfo, LogError> {
    let mut p = [0u8; 8];
    mem.read(layout.prb, &mut p).map_err(|why| LogError::Read {
        what: "anchor (prb)",
        addr: layout.prb,
        why,
    })?;
    let rb = u64::from_le_bytes(p);
    let r = &layout.ring;
    let header_len = [
        r.count_bits,
        r.descs,
        r.infos,
        r.head_id,
        r.tail_id,
        r.size_bits,
        r.data,
    ]
    .iter()
    .map(Field::end)
    .max()
    .unwrap_or(0);
    let header = read_bytes(mem, "ring buffer", rb, header_len)?;
    let get = |f: Field| f.get(&header).unwrap_or(0);
    let bad = |why: String| LogError::Ring { addr: rb, why };
    let (count_bits, size_bits) = (get(r.count_bits), get(r.size_bits));
    if count_bits > MAX_COUNT_BITS || !(3..=MAX_SIZE_BITS).contains(&size_bits) {
        return Err(bad(format!(
            "2^{count_bits} descriptors and 2^{size_bits} bytes of text"
        )));
    }
    let count = 1u64 << count_bits;
    let descs_at = get(r.descs);
    let descs = read_bytes(mem, "descriptors", descs_at, count * layout.desc.size)?;
    // Each copy below is of memory the guest may be writing: keep them in
    // this order (x86 does not reorder loads; this keeps the compiler so).
    fence(Ordering::Acquire);
    let infos = read_bytes(mem, "record infos", get(r.infos), count * layout.info.size)?;
    let text = read_bytes(mem, "text", get(r.data), 1 << size_bits)?;
    fence(Ordering::Acquire);
    let descs_after = read_bytes(mem, "descriptors", descs_at, count * layout.desc.size)?;
    Ok(decode(
        layout,
        &Snapshot {
            count_bits,
            size_bits,
            head_id: get(r.head_id),
            tail_id: get(r.tail_id),
            descs,
            infos,
            text,
            descs_after,
        },
        since,
    ))
}

/// The records of a copied ring from `since` on.
fn decode(layout: &LogLayout, s: &Snapshot, since: u64) -> DmesgInfo {
    let id_bits = layout.id_bits();
    let id_mask = (1u64 << id_bits) - 1;
    let count = 1u64 << s.count_bits;
    let (dsize, isize) = (layout.desc.size as usize, layout.info.size as usize);
    let (head, tail) = (s.head_id & id_mask, s.tail_id & id_mask);
    // At most the ring's count, the newest ones.
    let span = (head.wrapping_sub(tail) & id_mask) + 1;
    let first = if span > count {
        head.wrapping_sub(count - 1) & id_mask
    } else {
        tail
    };
    let (mut records, mut expected, mut lost) = (Vec::new(), since, 0u64);
    // The newest sequence number seen, taken or not.
    let mut newest: Option<u64> = None;
    for k in 0..span.min(count) {
        let id = first.wrapping_add(k) & id_mask;
        let slot = (id & (count - 1)) as usize;
        let (Some(desc), Some(after), Some(info)) = (
            s.descs.get(slot * dsize..(slot + 1) * dsize),
            s.descs_after.get(slot * dsize..(slot + 1) * dsize),
            s.infos.get(slot * isize..(slot + 1) * isize),
        ) else {
            break;
        };
        let f = &layout.desc;
        let sv = f.state_var.get(desc).unwrap_or(0);
        let (sv_id, state) = (sv & id_mask, sv >> id_bits);
        if sv_id != id {
            // An older id: a writer has taken this id but not yet its slot,
            // so nothing from here on is complete. A newer one: the record
            // was overwritten since the ids were read.
            if id.wrapping_sub(sv_id) & id_mask < 1 << (id_bits - 1) {
                break;
            }
            continue;
        }
        // Where the log is, even from a record that cannot be taken (so
        // that `next` never falls back to 0 while the ring holds records).
        // (Not a reusable one: the ring's initial descriptor is one, with
        // no real sequence number.)
        if state == STATE_COMMITTED || state == STATE_FINALIZED {
            if let Some(seq) = layout.info.seq.get(info) {
                newest = Some(newest.map_or(seq, |n| n.max(seq)));
            }
        }
        match state {
            STATE_RESERVED | STATE_COMMITTED => break,
            STATE_FINALIZED => {}
            _ => continue, // reusable: its text is gone
        }
        // Changed while the rest was copied: overwritten (or about to be).
        if f.state_var.get(after) != Some(sv) {
            continue;
        }
        let i = &layout.info;
        let Some(seq) = i.seq.get(info) else { break };
        newest = Some(newest.map_or(seq, |n| n.max(seq)));
        if seq < expected {
            continue;
        }
        let Some(text) = block_text(layout, s, desc, id) else {
            log::debug!("kernel log: record {seq} (id {id:#x}) has a bad text block; skipped");
            continue;
        };
        let len = (i.text_len.get(info).unwrap_or(0) as usize).min(text.len());
        lost += seq - expected;
        expected = seq + 1;
        records.push(LogRecord {
            seq,
            ts_ns: i.ts_nsec.get(info).unwrap_or(0),
            level: i.level.get(info).unwrap_or(0) as u8,
            text: String::from_utf8_lossy(&text[..len]).into_owned(),
        });
    }
    // Asked from past the newest record: nothing, and where the log is.
    let next = match (records.is_empty(), newest) {
        (true, Some(n)) => since.min(n + 1),
        // Nothing readable: an empty log starts at 0; else stay put.
        (true, None) if since == u64::MAX => 0,
        (true, None) => since,
        (false, _) => expected,
    };
    DmesgInfo {
        records,
        next,
        lost,
    }
}

/// The text of the finalized record `id` with descriptor `desc` (empty
/// for a record without text), or None if its block makes no sense.
fn block_text<'a>(layout: &LogLayout, s: &'a Snapshot, desc: &[u8], id: u64) -> Option<&'a [u8]> {
    let begin = layout.desc.begin.get(desc)?;
    let next = layout.desc.next.get(desc)?;
    if begin & 1 != 0 {
        return Some(&[]);
    }
    let size = 1u64 << s.size_bits;
    let wrap = |lpos: u64| lpos >> s.size_bits;
    let index = |lpos: u64| lpos & (size - 1);
    let (at, len) = if wrap(begin) == wrap(next) && begin < next {
        (index(begin), next - begin)
    } else if wrap(begin.wrapping_add(size)) == wrap(next) {
        // Did not fit before the end: at the start of the next wrap.
        (0, index(next))
    } else {
        return None;
    };
    let b = &layout.block;
    if at + len > size || len < b.data {
        return None;
    }
    let block = s.text.get(at as usize..(at + len) as usize)?;
    let id_mask = (1u64 << layout.id_bits()) - 1;
    if b.id.get(block)? & id_mask != id {
        return None;
    }
    block.get(b.data as usize..)
}

/// Kinds of kernel problem [`problem`] tells apart.
pub const PROBLEMS: &[&str] = &[
    "oops",
    "bug",
    "warning",
    "soft lockup",
    "hard lockup",
    "rcu stall",
    "hung task",
    "panic",
    "general protection fault",
    "exception",
];

/// Whether a line of the kernel's log reports a kernel problem, and which
/// ([`PROBLEMS`]): oops, BUG, WARNING, soft and hard lockups, RCU stalls,
/// hung tasks, panics, general protection faults, and the test kernel's own
/// `[tk] PANIC` and `[tk] EXCEPTION`. A user process's fault (`traps: ...
/// general protection fault ...`) and lines that merely contain a word
/// (`RETBleed: WARNING: ...`) are not.
pub fn problem(text: &str) -> Option<&'static str> {
    let t = text.trim_start();
    if t.starts_with("[tk] PANIC") {
        return Some("panic");
    }
    if t.starts_with("[tk] EXCEPTION") {
        return Some("exception");
    }
    if t.contains("BUG: soft lockup") {
        return Some("soft lockup");
    }
    if t.contains("hard LOCKUP") {
        return Some("hard lockup");
    }
    if t.contains("rcu: INFO: ") && t.contains("detected stall") {
        return Some("rcu stall");
    }
    if t.starts_with("INFO: task ") && t.contains(" blocked for more than ") {
        return Some("hung task");
    }
    if t.starts_with("Kernel panic") {
        return Some("panic");
    }
    if t.starts_with("general protection fault") {
        return Some("general protection fault");
    }
    if t.starts_with("BUG: ") || t.starts_with("kernel BUG at ") {
        return Some("bug");
    }
    if t.starts_with("WARNING: CPU: ") || t.starts_with("WARNING: possible ") {
        return Some("warning");
    }
    if t.starts_with("Oops") || die_line(t) {
        return Some("oops");
    }
    None
}

/// A line of the form `WHAT: 0000 [#1] ...`: how x86 Linux reports a fatal
/// exception in the kernel (`invalid opcode`, `stack segment`, `Oops`, ...).
fn die_line(t: &str) -> bool {
    t.match_indices(": ").any(|(i, _)| {
        let rest = &t[i + 2..];
        let (Some(code), Some(after)) = (rest.get(..4), rest.get(4..)) else {
            return false;
        };
        code.bytes().all(|b| b.is_ascii_hexdigit())
            && after.strip_prefix(" [#").is_some_and(|n| {
                let digits = n.bytes().take_while(u8::is_ascii_digit).count();
                digits > 0 && n[digits..].starts_with(']')
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    const COUNT_BITS: u64 = 3; // 8 descriptors
    const SIZE_BITS: u64 = 7; // 128 bytes of text
    const ID_MASK: u64 = (1 << 62) - 1;

    /// Addresses of the synthetic ring's parts.
    const PRB: u64 = 0x1000;
    const RB: u64 = 0x2000;
    const DESCS: u64 = 0x3000;
    const INFOS: u64 = 0x4000;
    const TEXT: u64 = 0x5000;

    /// Linux 6.1's layout on x86-64, as its BTF gives it.
    fn layout() -> LogLayout {
        let f = |offset, size| Field { offset, size };
        LogLayout {
            prb: PRB,
            paging: PagingState {
                cr0: 0,
                cr3: 0,
                cr4: 0,
                efer: 0,
            },
            types: "test".into(),
            ring: RingFields {
                count_bits: f(0, 4),
                descs: f(8, 8),
                infos: f(16, 8),
                head_id: f(24, 8),
                tail_id: f(32, 8),
                size_bits: f(48, 4),
                data: f(56, 8),
            },
            desc: DescFields {
                size: 24,
                state_var: f(0, 8),
                begin: f(8, 8),
                next: f(16, 8),
            },
            info: InfoFields {
                size: 88,
                seq: f(0, 8),
                ts_nsec: f(8, 8),
                text_len: f(16, 2),
                level: Bits { bit: 157, width: 3 },
            },
            block: BlockFields {
                id: f(0, 8),
                data: 8,
            },
        }
    }

    /// A ring written the way the format says, in a Vec: a minimal writer.
    struct Ring {
        mem: Vec<u8>,
        head_id: u64,
        tail_id: u64,
        head_lpos: u64,
        tail_lpos: u64,
        seq: u64,
    }

    impl Ring {
        fn new() -> Self {
            let mut r = Self {
                mem: vec![0; 0x6000],
                // Ids just below the 62-bit wrap, positions below the 64-bit one.
                head_id: ID_MASK - 3,
                tail_id: ID_MASK - 3,
                head_lpos: 0u64.wrapping_sub(2 << SIZE_BITS),
                tail_lpos: 0u64.wrapping_sub(2 << SIZE_BITS),
                seq: 0,
            };
            r.put(PRB, 8, RB);
            r.put(RB, 4, COUNT_BITS);
            r.put(RB + 8, 8, DESCS);
            r.put(RB + 16, 8, INFOS);
            r.put(RB + 48, 4, SIZE_BITS);
            r.put(RB + 56, 8, TEXT);
            // The placeholder the empty log points at: reusable, no text.
            let d = DESCS + (r.head_id & 7) * 24;
            r.put(d, 8, r.head_id | 3 << 62);
            r.put(d + 8, 8, 1);
            r.put(d + 16, 8, 1);
            r.header();
            r
        }

        fn put(&mut self, at: u64, size: usize, v: u64) {
            self.mem[at as usize..at as usize + size].copy_from_slice(&v.to_le_bytes()[..size]);
        }

        fn get(&self, at: u64) -> u64 {
            u64::from_le_bytes(
                self.mem[at as usize..at as usize + 8]
                    .try_into()
                    .expect("8"),
            )
        }

        fn header(&mut self) {
            self.put(RB + 24, 8, self.head_id);
            self.put(RB + 32, 8, self.tail_id);
        }

        fn desc(id: u64) -> u64 {
            DESCS + (id & 7) * 24
        }

        /// Makes record `id` reusable.
        fn retire(&mut self, id: u64) {
            self.put(Self::desc(id), 8, id | 3 << 62);
        }

        /// Appends `text` (empty: a record without text) at `level`.
        fn log(&mut self, level: u8, text: &str) {
            let size = 1u64 << SIZE_BITS;
            let id = (self.head_id + 1) & ID_MASK;
            if (id.wrapping_sub(self.tail_id) & ID_MASK) >= 8 {
                let old = self.tail_id;
                let d = Self::desc(old);
                if self.get(d + 8) & 1 == 0 {
                    self.push_tail(self.get(d + 16));
                }
                self.retire(old);
                self.tail_id = (old + 1) & ID_MASK;
            }
            let (mut begin, mut next) = (1u64, 1u64);
            if !text.is_empty() {
                let bsize = (8 + text.len() as u64).div_ceil(8) * 8;
                begin = self.head_lpos;
                next = begin.wrapping_add(bsize);
                if begin >> SIZE_BITS != next >> SIZE_BITS {
                    next = (next & !(size - 1)).wrapping_add(bsize);
                }
                self.push_tail(next.wrapping_sub(size));
                let at = TEXT + (begin & (size - 1));
                self.put(at, 8, id);
                let data = if begin >> SIZE_BITS != next >> SIZE_BITS {
                    self.put(TEXT, 8, id);
                    TEXT + 8
                } else {
                    at + 8
                };
                self.mem[data as usize..data as usize + text.len()]
                    .copy_from_slice(text.as_bytes());
                self.head_lpos = next;
            }
            let d = Self::desc(id);
            self.put(d, 8, id | 2 << 62);
            self.put(d + 8, 8, begin);
            self.put(d + 16, 8, next);
            let info = INFOS + (id & 7) * 88;
            self.put(info, 8, self.seq);
            self.put(info + 8, 8, 1_000_000 * self.seq);
            self.put(info + 16, 2, text.len() as u64);
            self.put(info + 19, 1, u64::from(level) << 5);
            self.seq += 1;
            self.head_id = id;
            self.header();
        }

        fn push_tail(&mut self, lpos: u64) {
            let size = 1u64 << SIZE_BITS;
            while (lpos.wrapping_sub(self.tail_lpos) as i64) > 0 {
                let id = self.get(TEXT + (self.tail_lpos & (size - 1)));
                self.retire(id);
                self.tail_lpos = self.get(Self::desc(id) + 16);
            }
        }
    }

    /// Memory that can change under the reader: `hook` runs after the
    /// `after`-th read.
    struct Mem<'a> {
        ring: RefCell<Vec<u8>>,
        reads: Cell<usize>,
        after: usize,
        hook: &'a dyn Fn(&mut Vec<u8>),
    }

    impl KernelMemory for Mem<'_> {
        fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
            let m = self.ring.borrow();
            let src = m
                .get(va as usize..va as usize + buf.len())
                .ok_or_else(|| format!("{va:#x} is not mapped"))?;
            buf.copy_from_slice(src);
            drop(m);
            self.reads.set(self.reads.get() + 1);
            if self.reads.get() == self.after {
                (self.hook)(&mut self.ring.borrow_mut());
            }
            Ok(())
        }
    }

    fn read_ring(ring: &Ring, since: u64) -> DmesgInfo {
        let mem = Mem {
            ring: RefCell::new(ring.mem.clone()),
            reads: Cell::new(0),
            after: 0,
            hook: &|_| {},
        };
        read(&mem, &layout(), since).expect("read")
    }

    fn texts(info: &DmesgInfo) -> Vec<(u64, &str)> {
        info.records
            .iter()
            .map(|r| (r.seq, r.text.as_str()))
            .collect()
    }

    #[test]
    fn records_in_order_with_levels_and_times() {
        let mut r = Ring::new();
        r.log(6, "Linux version 6.1.0-28-cloud-amd64");
        r.log(4, "WARNING: CPU: 1 PID: 7 at kernel/x.c:1 f+0x0/0x10");
        let info = read_ring(&r, 0);
        assert_eq!(
            texts(&info),
            [
                (0, "Linux version 6.1.0-28-cloud-amd64"),
                (1, "WARNING: CPU: 1 PID: 7 at kernel/x.c:1 f+0x0/0x10")
            ]
        );
        assert_eq!(
            info.records.iter().map(|r| r.level).collect::<Vec<_>>(),
            [6, 4]
        );
        assert_eq!(info.records[1].ts_ns, 1_000_000);
        assert_eq!((info.next, info.lost), (2, 0));
        // From an earlier answer's next: only what came since.
        r.log(6, "third");
        let info = read_ring(&r, 2);
        assert_eq!(texts(&info), [(2, "third")]);
        assert_eq!((info.next, info.lost), (3, 0));
        // Nothing new.
        let info = read_ring(&r, 3);
        assert!(info.records.is_empty());
        assert_eq!((info.next, info.lost), (3, 0));
        // From past the end (u64::MAX): nothing, and where the log is now.
        let info = read_ring(&r, u64::MAX);
        assert!(info.records.is_empty());
        assert_eq!((info.next, info.lost), (3, 0));
    }

    #[test]
    fn an_empty_log_and_a_record_without_text() {
        let mut r = Ring::new();
        let info = read_ring(&r, 0);
        assert!(info.records.is_empty());
        assert_eq!((info.next, info.lost), (0, 0));
        assert_eq!(read_ring(&r, u64::MAX).next, 0);
        r.log(6, "");
        r.log(6, "after the empty line");
        let info = read_ring(&r, 0);
        assert_eq!(texts(&info), [(0, ""), (1, "after the empty line")]);
    }

    #[test]
    fn wrapped_rings_keep_the_newest_and_count_the_lost() {
        let mut r = Ring::new();
        // 40 lines: the 8 descriptors wrap five times, the ids wrap past the
        // 62-bit mask, the 128-byte text ring wraps (blocks put at index 0)
        // and its positions wrap past 2^64.
        let line = |n: u64| format!("line {n} {}", "x".repeat((n % 5) as usize * 4));
        for n in 0..40 {
            r.log(6, &line(n));
        }
        assert!(r.head_id < 40, "the ids wrapped");
        assert!(r.head_lpos < 1 << 12, "the positions wrapped");
        let info = read_ring(&r, 0);
        let first = info.records[0].seq;
        assert!(first > 30, "only the newest are kept: {:?}", texts(&info));
        for (k, rec) in info.records.iter().enumerate() {
            assert_eq!(rec.seq, first + k as u64);
            assert_eq!(rec.text, line(rec.seq));
        }
        assert_eq!(info.next, 40);
        assert_eq!(
            info.lost, first,
            "everything before the oldest kept is lost"
        );
        // Asked from a record still there: nothing lost.
        let info = read_ring(&r, 38);
        assert_eq!(texts(&info).len(), 2);
        assert_eq!(info.lost, 0);
    }

    #[test]
    fn a_block_that_wrapped_lies_at_index_0() {
        let mut r = Ring::new();
        // 3 blocks of 40 bytes fill 120 of 128: the 4th does not fit.
        for n in 0..4 {
            r.log(6, &format!("block {n} {}", "y".repeat(24)));
        }
        let d = Ring::desc(r.head_id);
        let (begin, next) = (r.get(d + 8), r.get(d + 16));
        assert_eq!(next >> SIZE_BITS, (begin >> SIZE_BITS).wrapping_add(1));
        assert_eq!(next & 127, 40, "at index 0 of the next wrap");
        let info = read_ring(&r, 0);
        assert_eq!(
            info.records.last().expect("records").text,
            format!("block 3 {}", "y".repeat(24))
        );
    }

    #[test]
    fn a_record_overwritten_while_it_is_copied_is_dropped() {
        let mut r = Ring::new();
        for n in 0..6 {
            r.log(6, &format!("r{n}"));
        }
        // After the first copy of the descriptors (prb, header, descs), a
        // writer makes the two oldest records reusable and writes over
        // their text, as a wrapping ring does.
        let (first, second) = ((r.tail_id + 1) & ID_MASK, (r.tail_id + 2) & ID_MASK);
        let hook = move |m: &mut Vec<u8>| {
            for id in [first, second] {
                let d = Ring::desc(id) as usize;
                m[d..d + 8].copy_from_slice(&(id | 3 << 62).to_le_bytes());
                let lpos = |at: usize| u64::from_le_bytes(m[at..at + 8].try_into().expect("8"));
                let (begin, next) = (lpos(d + 8) & 127, lpos(d + 16) & 127);
                let t = TEXT as usize;
                m[t + begin as usize..t + next as usize].fill(b'#');
            }
        };
        let mem = Mem {
            ring: RefCell::new(r.mem.clone()),
            reads: Cell::new(0),
            after: 3,
            hook: &hook,
        };
        let info = read(&mem, &layout(), 0).expect("read");
        assert_eq!(
            texts(&info),
            [(2, "r2"), (3, "r3"), (4, "r4"), (5, "r5")],
            "nothing of the overwritten records comes back"
        );
        assert_eq!(info.lost, 2, "the dropped records are lost");
        assert_eq!(info.next, 6);
        // Without the change the same read returns all six.
        assert_eq!(read_ring(&r, 0).records.len(), 6);
    }

    #[test]
    fn a_record_being_written_ends_the_read() {
        let mut r = Ring::new();
        r.log(6, "done");
        r.log(6, "half");
        // The last record back to reserved, as while its writer is at it.
        let d = Ring::desc(r.head_id);
        r.put(d, 8, r.head_id);
        let info = read_ring(&r, 0);
        assert_eq!(texts(&info), [(0, "done")]);
        assert_eq!(info.next, 1, "asked again, it comes once it is finalized");
        // A head id whose slot still holds the old record: also not yet.
        let mut r = Ring::new();
        r.log(6, "done");
        r.head_id = (r.head_id + 1) & ID_MASK;
        let older = r.head_id.wrapping_sub(8) & ID_MASK;
        r.put(Ring::desc(r.head_id), 8, older | 3 << 62);
        r.header();
        assert_eq!(texts(&read_ring(&r, 0)), [(0, "done")]);
    }

    #[test]
    fn a_ring_that_makes_no_sense_is_an_error() {
        let mut r = Ring::new();
        r.put(RB + 48, 4, 63);
        let mem = Mem {
            ring: RefCell::new(r.mem.clone()),
            reads: Cell::new(0),
            after: 0,
            hook: &|_| {},
        };
        let e = read(&mem, &layout(), 0).expect_err("bad ring");
        assert!(e.to_string().contains("2^63 bytes"), "{e}");
        r.put(PRB, 8, 0xdead_0000);
        let mem = Mem {
            ring: RefCell::new(r.mem.clone()),
            reads: Cell::new(0),
            after: 0,
            hook: &|_| {},
        };
        let e = read(&mem, &layout(), 0).expect_err("unmapped");
        assert!(e.to_string().contains("not mapped"), "{e}");
    }

    #[test]
    fn bitfields_read_across_bytes() {
        let level = Bits { bit: 157, width: 3 };
        let mut info = vec![0u8; 88];
        info[19] = 0b1010_0000 | 0b1_1111; // level 5, flags all set
        assert_eq!(level.get(&info), Some(5));
        let across = Bits { bit: 6, width: 4 };
        assert_eq!(across.get(&[0b1100_0000, 0b0000_0010]), Some(0b1011));
    }

    #[test]
    fn problems_in_real_linux_lines() {
        let cases = [
            ("WARNING: CPU: 1 PID: 245 at kernel/sched/core.c:3027 set_task_cpu+0x1b5/0x1c0", Some("warning")),
            ("WARNING: possible circular locking dependency detected", Some("warning")),
            ("BUG: kernel NULL pointer dereference, address: 0000000000000008", Some("bug")),
            ("BUG: unable to handle page fault for address: ffffc90000a3f000", Some("bug")),
            ("kernel BUG at mm/slub.c:4405!", Some("bug")),
            ("Oops: 0002 [#1] PREEMPT SMP NOPTI", Some("oops")),
            ("invalid opcode: 0000 [#1] PREEMPT SMP PTI", Some("oops")),
            ("general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI", Some("general protection fault")),
            ("watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [swapper/0:1]", Some("soft lockup")),
            ("NMI watchdog: Watchdog detected hard LOCKUP on cpu 1", Some("hard lockup")),
            ("rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", Some("rcu stall")),
            ("rcu: INFO: rcu_sched self-detected stall on CPU", Some("rcu stall")),
            ("INFO: task kworker/0:1:12 blocked for more than 120 seconds.", Some("hung task")),
            ("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009", Some("panic")),
            ("[tk] PANIC: unexpected exception", Some("panic")),
            ("[tk] EXCEPTION vector=14 error=2 rip=ffffffff81001234 cs=10 rsp=0 cr2=0", Some("exception")),
            // Not problems of the kernel.
            ("Linux version 6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)", None),
            ("traps: a.out[412] general protection fault ip:401136 sp:7ffd5e1c1f40 error:0 in a.out[401000+1000]", None),
            ("RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed attacks, data leaks possible!", None),
            ("rcu: Hierarchical RCU implementation.", None),
            ("NMI watchdog: Perf NMI watchdog permanently disabled", None),
            ("printk: console [ttyS0] enabled", None),
            ("[tk] task 0 cpu 0 iter 1000 counter 2000 stats calls=1000 sum=500500 last=1000 lost=0 version testkernel 1.0", None),
        ];
        for (line, want) in cases {
            assert_eq!(problem(line), want, "{line}");
            if let Some(k) = want {
                assert!(PROBLEMS.contains(&k), "{k}");
            }
        }
    }
}
