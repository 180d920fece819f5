//! Write control: byte ranges of guest RAM the guest cannot write freely.
//!
//! A page that holds protected bytes leaves its ordinary read-write KVM slot
//! for a read-only one (slots are split and merged while every vCPU is
//! paused; the memory stays in the same memfd). The guest reads and executes
//! it natively; a write to it leaves `KVM_RUN` as `KVM_EXIT_MMIO` (at most 8
//! bytes, split at page ends). The vCPU thread hands it to [`WriteControl`]:
//! bytes outside every protected range are written by the VMM itself, byte
//! exact; a write that touches protected bytes goes to the installed
//! [`WritePolicy`], which allows it, refuses it (those bytes are dropped, the
//! guest continues after the instruction) or handles it itself.
//!
//! Locked read-modify-write instructions. KVM emulates a write to a
//! read-only slot: it reads the operand natively, computes, and exits with
//! the result; for a write, its registers (RIP, flags, outputs) are already
//! final when userspace sees the exit. Two vCPUs doing `lock inc` on the
//! same protected page can therefore both read 5 and both write 6. Every
//! write to a protected page is performed under that page's lock, and one
//! whose instruction is a read-modify-write (decoded at the vCPU's RIP) is
//! checked first: its result must be what the instruction computes from the
//! memory as it is *now*. If another vCPU's write came in between, the
//! write is dropped and the vCPU is rewound to the instruction (its
//! register outputs restored), so it executes it again on fresh memory.
//! Allowed writes are thus linearized per page and none is lost.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::guest::PhysMemory;
use crate::memory::{GuestRam, MemoryError};

/// Page granularity of write control (the second-level page size).
pub const PAGE: u64 = 4096;
/// Events kept for `lucos events` (older ones are dropped).
pub const EVENT_LOG_LEN: usize = 4096;
/// Rewinds of one vCPU in a row after which its write is committed anyway.
pub const MAX_REWINDS_IN_A_ROW: u64 = 100_000;

/// How the guest writes a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Every write to its pages exits to the VMM, which decides it.
    #[default]
    Trapped,
    /// Whole pages of the patch area the guest writes natively, without an
    /// exit (a read-write slot): a patch's own variables, a data copy whose
    /// change retired. The rest of the area stays read-only.
    Native,
    /// Guest RAM kept behind a read-only slot whose bytes the VMM writes
    /// exactly as the guest asks (no policy, no event; counted as allowed):
    /// trapped ranges on its pages then come and go without a change of
    /// memory slots. A slot change is the slow part of a protection change:
    /// KVM drops its second-level mappings of the slots it replaces, and
    /// the guest faults them back in.
    Relayed,
}

impl Access {
    /// Whether this is [`Access::Trapped`] (the default, left out of JSON).
    pub fn is_trapped(&self) -> bool {
        *self == Access::Trapped
    }
}

/// One protected byte range.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Protection {
    /// Who asked for it (`patch:NAME`, `user:NAME`, `kernel-text`): released by this name.
    pub owner: String,
    /// What the bytes are, for events (`lucos_version`, `.text`).
    pub label: String,
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Trapped (the default) or, for pages of the patch area, written
    /// natively.
    #[serde(default, skip_serializing_if = "Access::is_trapped")]
    pub access: Access,
}

impl Protection {
    fn end(&self) -> u64 {
        self.gpa + self.len
    }
    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }
}

/// Why a protection change was refused; nothing was changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtectError {
    /// A zero-length range.
    #[error("cannot protect {gpa:#x}+0: the range is empty")]
    Empty {
        /// Its start.
        gpa: u64,
    },
    /// Not all of the range is guest RAM.
    #[error("cannot protect {gpa:#x}+{len:#x}: not guest RAM (RAM is {ram})")]
    NotRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// The RAM ranges, for the message.
        ram: String,
    },
    /// The range overlaps the VMM's patch area (read-only to the guest already).
    #[error("cannot protect {gpa:#x}+{len:#x}: it overlaps the patch area at {area:#x}, which the guest can never write")]
    PatchArea {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// The patch area's base.
        area: u64,
    },
    /// A range opened to native writes that is not whole pages of the
    /// patch area.
    #[error(
        "cannot open {gpa:#x}+{len:#x} to native writes: only whole pages of the patch area can be"
    )]
    NotAreaPages {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A page that would be both trapped and written natively.
    #[error("page {page:#x} would be both trapped (owner {trapped}) and written natively (owner {native})")]
    Mixed {
        /// The page's guest-physical address.
        page: u64,
        /// Owner of a trapped range on it.
        trapped: String,
        /// Owner of the native one.
        native: String,
    },
    /// An owner name that is empty.
    #[error("a protection needs an owner name")]
    NoOwner,
    /// Changing the memory slots failed (KVM); the old layout is back.
    #[error("changing the memory slots failed: {0}")]
    Slots(String),
    /// Changing the memory slots failed and so did putting the old layout
    /// back: guest memory is not as write control believes. Never seen.
    #[error("changing the memory slots failed and the old layout could not be put back: {0}")]
    Torn(String),
    /// The guest is not paused.
    #[error("protection changes need every vCPU paused")]
    NotPaused,
}

/// One KVM memory slot of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotSpec {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset into the memfd behind it (RAM's, or the patch area's).
    pub file_offset: u64,
    /// Read-only to the guest (write control).
    pub readonly: bool,
}

/// The slot layout for `ram` with the page runs `readonly` (`[first, end)`
/// page numbers, sorted, not overlapping) read-only: each RAM range split
/// into runs of read-write and read-only pages, adjacent runs of one kind
/// merged. Its cost grows with the runs, not the pages.
pub fn slot_layout(ram: &[crate::memory::RamRange], readonly: &[(u64, u64)]) -> Vec<SlotSpec> {
    let mut out: Vec<SlotSpec> = Vec::new();
    for r in ram {
        let end = r.guest_addr + r.len;
        let mut at = r.guest_addr;
        let (first, last) = (r.guest_addr / PAGE, end.div_ceil(PAGE));
        let from = readonly.partition_point(|&(_, e)| e <= first);
        for &(a, b) in readonly[from..].iter().take_while(|&&(a, _)| a < last) {
            let (p, pend) = ((a * PAGE).max(r.guest_addr), (b * PAGE).min(end));
            if p > at {
                out.push(SlotSpec {
                    gpa: at,
                    len: p - at,
                    file_offset: r.file_offset + (at - r.guest_addr),
                    readonly: false,
                });
            }
            match out.last_mut() {
                Some(s) if s.readonly && s.gpa + s.len == p => s.len = pend - s.gpa,
                _ => out.push(SlotSpec {
                    gpa: p,
                    len: pend - p,
                    file_offset: r.file_offset + (p - r.guest_addr),
                    readonly: true,
                }),
            }
            at = pend;
        }
        if at < end {
            out.push(SlotSpec {
                gpa: at,
                len: end - at,
                file_offset: r.file_offset + (at - r.guest_addr),
                readonly: false,
            });
        }
    }
    out
}

/// The protected ranges and the pages they cover.
#[derive(Debug, Default, Clone)]
struct Table {
    list: Vec<Protection>,
    /// Indices into `list` of the trapped ranges (what the policy decides).
    trapped: Vec<usize>,
    /// Runs of RAM pages in read-only slots, `[first, end)` page numbers,
    /// sorted and merged: the pages of trapped and relayed ranges. Kept as
    /// runs so that a large range (all of the kernel's text) costs one
    /// entry, in the pause that changes it and in every lookup.
    readonly: Vec<(u64, u64)>,
    /// Page number -> index into `list` of the native range on it (patch
    /// area pages the guest writes without an exit).
    native: BTreeMap<u64, usize>,
}

impl Table {
    fn new(list: Vec<Protection>) -> Self {
        let mut trapped = Vec::new();
        let mut runs = Vec::new();
        let mut native = BTreeMap::new();
        for (i, p) in list.iter().enumerate() {
            let (first, end) = (p.gpa / PAGE, p.end().div_ceil(PAGE));
            match p.access {
                Access::Trapped => {
                    trapped.push(i);
                    runs.push((first, end));
                }
                Access::Relayed => runs.push((first, end)),
                Access::Native => {
                    for page in first..end {
                        native.insert(page, i);
                    }
                }
            }
        }
        runs.sort_unstable();
        let mut readonly: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (a, b) in runs {
            match readonly.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => readonly.push((a, b)),
            }
        }
        Self {
            list,
            trapped,
            readonly,
            native,
        }
    }

    /// Whether `page` is in a read-only slot of RAM.
    fn is_readonly(&self, page: u64) -> bool {
        let i = self.readonly.partition_point(|&(_, e)| e <= page);
        self.readonly.get(i).is_some_and(|&(a, _)| a <= page)
    }

    /// Pages in read-only slots of RAM.
    fn readonly_pages(&self) -> u64 {
        self.readonly.iter().map(|(a, b)| b - a).sum()
    }

    /// The trapped ranges `[gpa, end)` touches.
    fn touching(&self, gpa: u64, end: u64) -> Vec<&Protection> {
        self.trapped
            .iter()
            .map(|&i| &self.list[i])
            .filter(|p| p.gpa < end && p.end() > gpa)
            .collect()
    }

    /// A page both trapped and native, if any: (page address, trapped
    /// owner, native owner).
    fn mixed(&self) -> Option<(u64, &str, &str)> {
        self.trapped.iter().find_map(|&t| {
            let p = &self.list[t];
            self.native
                .range(p.gpa / PAGE..p.end().div_ceil(PAGE))
                .next()
                .map(|(page, &n)| (page * PAGE, p.owner.as_str(), self.list[n].owner.as_str()))
        })
    }
}

/// The slot layout of the patch area at `gpa` (`size` bytes): read-only
/// but for the `native` pages (page numbers), adjacent pages of one kind
/// merged. `file_offset` is the offset into the area's memfd.
pub fn area_layout(gpa: u64, size: u64, native: &BTreeMap<u64, usize>) -> Vec<SlotSpec> {
    let mut out: Vec<SlotSpec> = Vec::new();
    let mut at = gpa;
    while at < gpa + size {
        let readonly = !native.contains_key(&(at / PAGE));
        match out.last_mut() {
            Some(s) if s.readonly == readonly => s.len += PAGE,
            _ => out.push(SlotSpec {
                gpa: at,
                len: PAGE,
                file_offset: at - gpa,
                readonly,
            }),
        }
        at += PAGE;
    }
    out
}

/// A guest write to a protected page, as the policy sees it.
#[derive(Debug)]
pub struct TrappedWrite<'a> {
    /// The vCPU that wrote.
    pub vcpu: u8,
    /// The writing instruction's address (guest-virtual); 0 when it could
    /// not be found.
    pub rip: u64,
    /// Privilege level of the writer.
    pub cpl: u8,
    /// The writer's CR3 (its address space), 0 if unknown.
    pub cr3: u64,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// The bytes.
    pub data: &'a [u8],
    /// The protected ranges the write touches (at least one).
    pub touches: Vec<&'a Protection>,
    /// For a write by an instruction that adds to memory (`add`, `sub`,
    /// `inc`, `dec`, `xadd`: [`crate::insn::Rmw::adds`]), what the bytes
    /// held just before it was committed; empty otherwise. (Set for
    /// [`WritePolicy::committed`].)
    pub before: Vec<u8>,
}

/// What the policy decided about a write that touches protected bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write every byte, as the guest asked.
    Allow,
    /// Drop the protected bytes (others are written); recorded as an event.
    Refuse,
    /// The policy did what the write calls for itself (a state-transfer
    /// handler); nothing more is written.
    Handled,
}

/// The policy above vmm-core that decides writes to protected bytes.
pub trait WritePolicy: Send + Sync {
    /// Decides `w`. Runs on the writing vCPU's thread with that page's lock
    /// and its owner's lock held.
    fn decide(&self, w: &TrappedWrite<'_>, ram: &dyn PhysMemory) -> Decision;

    /// Called after a write `decide` allowed is in memory, with the same
    /// locks still held: a state-transfer policy brings the other copy of
    /// the data up to date here, before the writing vCPU runs on.
    fn committed(&self, _w: &TrappedWrite<'_>, _mem: &dyn PhysMemory) {}

    /// Called after `committed`: whether the writing vCPU must be held (it
    /// parks, counted as paused, until the VMM releases it). A policy that
    /// says yes must see to it that something releases it.
    fn holds(&self, _w: &TrappedWrite<'_>, _mem: &dyn PhysMemory) -> bool {
        false
    }
}

/// Owners of protections in the patch area are named with this prefix:
/// copies of kernel data a patch changes the layout of (the only ranges of
/// the area the guest may write, through the policy).
pub const DATA_OWNER_PREFIX: &str = "data:";

/// Owner named in events for a write to the patch area outside any data
/// copy (its code, its free space): always refused.
pub const PATCH_AREA_OWNER: &str = "patch-area";

/// A refused write, as `lucos events` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteEvent {
    /// Sequence number (from 1, per VM).
    pub seq: u64,
    /// Milliseconds since write control was set up (VM creation).
    pub at_ms: u64,
    /// What happened: `refused`.
    pub kind: String,
    /// The vCPU.
    pub vcpu: u8,
    /// The writing instruction (guest-virtual); where the vCPU was, just
    /// past it, when it could not be found.
    pub rip: u64,
    /// Privilege level of the writer.
    pub cpl: u8,
    /// Guest-physical target.
    pub gpa: u64,
    /// The bytes the guest tried to write.
    pub bytes: Vec<u8>,
    /// Owner of the protection hit.
    pub owner: String,
    /// Its label and the offset into it: `lucos_version+0x1`.
    pub target: String,
}

/// Counters of trapped writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteStats {
    /// Guest writes to protected pages.
    pub trapped: u64,
    /// Written as asked (unprotected bytes, or allowed by the policy).
    pub allowed: u64,
    /// Refused (protected bytes dropped).
    pub refused: u64,
    /// Handled by the policy itself.
    pub handled: u64,
    /// Read-modify-writes rewound because another write came in between.
    pub rewound: u64,
    /// Nanoseconds spent deciding and performing trapped writes, in all.
    #[serde(default)]
    pub handle_ns: u64,
    /// Protected ranges now.
    pub ranges: u64,
    /// Read-only pages now.
    pub pages: u64,
    /// Memory slots now, RAM's and the patch area's (read-write and
    /// read-only).
    pub slots: u64,
}

#[derive(Debug, Default)]
struct Counters {
    trapped: AtomicU64,
    allowed: AtomicU64,
    refused: AtomicU64,
    handled: AtomicU64,
    rewound: AtomicU64,
    handle_ns: AtomicU64,
}

#[derive(Debug, Default)]
struct EventLog {
    next: u64,
    events: VecDeque<WriteEvent>,
}

/// Write control's counters and event log, carried to another VMM process.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteCarry {
    /// trapped, allowed, refused, handled, rewound, handle_ns.
    pub counts: [u64; 6],
    /// The next event's sequence number.
    pub next_event: u64,
    /// The events kept.
    pub events: Vec<WriteEvent>,
}

/// What the vCPU thread must do after a trapped write was dealt with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Continue the guest.
    Done,
    /// Set the vCPU's registers to these and continue (a rewound instruction).
    Rewind(kvm_bindings::kvm_regs),
    /// The write is done; the vCPU stays parked until the VMM releases it
    /// ([`crate::vcpu::RunControl::release`]): the policy asked to act on
    /// what it wrote before the guest goes on.
    Hold,
}

/// Write control of one VM's RAM.
pub struct WriteControl {
    ram: Arc<GuestRam>,
    table: RwLock<Arc<Table>>,
    policy: RwLock<Option<Arc<dyn WritePolicy>>>,
    page_locks: Vec<Mutex<()>>,
    counters: Counters,
    /// Rewinds in a row per vCPU: a bound, so a misjudged instruction
    /// cannot hold a vCPU forever.
    rewinds_in_a_row: Vec<AtomicU64>,
    events: Mutex<EventLog>,
    /// The slot layout in KVM now: (slot id, spec).
    slots: Mutex<Vec<(u32, SlotSpec)>>,
    start: Instant,
    area: (u64, u64),
    /// The patch area's memory, when the VM has one (tests may not).
    area_mem: Option<Arc<crate::region::VmmRegion>>,
    /// Writes to one owner's ranges are serialized on its lock (after the
    /// page's): the two copies of tracked data are on different pages.
    owner_locks: Vec<Mutex<()>>,
    /// Measurement floor (benchmarks): trapped writes are counted and
    /// dropped, nothing decoded or decided.
    bare: std::sync::atomic::AtomicBool,
    /// Whether any page is read-only now (the vCPU loop's cheap test).
    trapping: std::sync::atomic::AtomicBool,
    /// KVM's dirty log is on for RAM's read-write slots.
    dirty_log: std::sync::atomic::AtomicBool,
    /// A slot changed while the dirty log was on: KVM lost what it had
    /// logged for the slots it replaced, so the next read cannot say which
    /// pages were written.
    dirty_lost: std::sync::atomic::AtomicBool,
    /// RAM pages written by the VMM for the guest (trapped writes it made,
    /// transfers) while the dirty log is on: KVM logs only the guest's own.
    vmm_written: Mutex<Vec<u64>>,
}

impl std::fmt::Debug for WriteControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteControl")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Something that installs KVM memory slots (the VM; a recorder in tests).
pub trait SlotSink {
    /// Sets slot `id` to `spec` (`None`: deletes it).
    fn set_slot(&self, id: u32, spec: Option<&SlotSpec>) -> Result<(), String>;
}

impl WriteControl {
    /// Write control over `ram`, whose slots are `slots` now; `area` is the
    /// patch area (base, size), which is never RAM.
    pub fn new(ram: Arc<GuestRam>, slots: Vec<(u32, SlotSpec)>, area: (u64, u64)) -> Self {
        Self {
            ram,
            table: RwLock::new(Arc::new(Table::default())),
            policy: RwLock::new(None),
            page_locks: (0..64).map(|_| Mutex::new(())).collect(),
            counters: Counters::default(),
            rewinds_in_a_row: (0..=u8::MAX).map(|_| AtomicU64::new(0)).collect(),
            events: Mutex::new(EventLog {
                next: 1,
                events: VecDeque::new(),
            }),
            slots: Mutex::new(slots),
            start: Instant::now(),
            area,
            area_mem: None,
            owner_locks: (0..16).map(|_| Mutex::new(())).collect(),
            bare: std::sync::atomic::AtomicBool::new(false),
            trapping: std::sync::atomic::AtomicBool::new(false),
            dirty_log: std::sync::atomic::AtomicBool::new(false),
            dirty_lost: std::sync::atomic::AtomicBool::new(false),
            vmm_written: Mutex::new(Vec::new()),
        }
    }

    /// Whether slot `s` is to carry KVM's dirty log now (the [`SlotSink`]
    /// sets the flag on the slots it installs).
    pub fn logs(&self, s: &SlotSpec) -> bool {
        self.dirty_log.load(Ordering::Relaxed) && self.logged(s)
    }

    /// Turns KVM's dirty log on RAM's read-write slots (and the patch
    /// area's) on or off: each is installed again through `sink` (a change
    /// of flags only, which KVM allows on a live slot). Turning it on
    /// starts an empty log; it is refused while the log is on.
    pub fn set_dirty_log(&self, sink: &dyn SlotSink, on: bool) -> Result<(), String> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if on && self.dirty_log.load(Ordering::SeqCst) {
            // Two readers would clear each other's log.
            return Err("it is on already (another scan is using it)".into());
        }
        let was = self.dirty_log.swap(on, Ordering::SeqCst);
        // Pairs with the fence in `Mem::write_phys`: a write the VMM makes
        // for the guest is either noted or seen by whoever reads guest
        // memory after this.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.dirty_lost.store(false, Ordering::Relaxed);
        self.vmm_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        if was == on {
            return Ok(());
        }
        for (id, s) in slots.iter().filter(|(_, s)| self.logged(s)) {
            if let Err(e) = sink.set_slot(*id, Some(s)) {
                // Whatever slots changed, what they logged is unknown.
                self.dirty_lost.store(true, Ordering::Relaxed);
                return Err(format!("slot {id} at {:#x}: {e}", s.gpa));
            }
        }
        Ok(())
    }

    /// Whether slot `s` carries the dirty log when it is on: read-write
    /// guest RAM, and the pages of the patch area the guest writes natively.
    fn logged(&self, s: &SlotSpec) -> bool {
        !s.readonly && (self.ram.contains(s.gpa, s.len) || self.in_area(s.gpa))
    }

    /// The RAM pages (guest-physical addresses) the guest wrote since the
    /// dirty log was turned on or last read, `read(slot id, bytes)` giving
    /// a slot's KVM bitmap (read and cleared), with the pages the VMM
    /// wrote for it (trapped writes to read-only slots it made, transfers
    /// to tracked copies); `None` when that cannot be known (the log is
    /// off, or a slot changed since: then the log starts again from this
    /// read).
    pub fn dirty_pages(
        &self,
        read: &dyn Fn(u32, u64) -> Result<Vec<u64>, String>,
    ) -> Result<Option<Vec<u64>>, String> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if !self.dirty_log.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let lost = self.dirty_lost.swap(false, Ordering::Relaxed);
        let mut pages = Vec::new();
        for (id, s) in slots.iter().filter(|(_, s)| self.logged(s)) {
            let bitmap = read(*id, s.len)?;
            if lost {
                // Read only to clear it: from now on the log holds again.
                continue;
            }
            for (w, bits) in bitmap.iter().enumerate() {
                let mut b = *bits;
                while b != 0 {
                    let i = w as u64 * 64 + u64::from(b.trailing_zeros());
                    b &= b - 1;
                    if i * PAGE < s.len {
                        pages.push(s.gpa + i * PAGE);
                    }
                }
            }
        }
        pages.append(&mut self.vmm_written.lock().unwrap_or_else(|e| e.into_inner()));
        if lost {
            return Ok(None);
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(Some(pages))
    }

    /// The RAM under control.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Gives write control the patch area's memory, so that writes to
    /// data copies placed there can be decided and made.
    /// The area is installed as one read-only slot
    /// ([`crate::region::PATCH_AREA_SLOT`]); pages opened to native writes
    /// ([`Access::Native`]) get read-write slots of their own.
    pub fn with_area(mut self, area: Arc<crate::region::VmmRegion>) -> Self {
        self.slots
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .push((
                crate::region::PATCH_AREA_SLOT,
                SlotSpec {
                    gpa: area.gpa,
                    len: area.size,
                    file_offset: 0,
                    readonly: true,
                },
            ));
        self.area = (area.gpa, area.size);
        self.area_mem = Some(area);
        self
    }

    /// Whether `gpa` lies in the patch area.
    pub fn in_area(&self, gpa: u64) -> bool {
        gpa >= self.area.0 && gpa < self.area.0 + self.area.1
    }

    /// RAM and the patch area, as one guest-physical memory; its writes
    /// are noted while the dirty log is on.
    fn mem(&self) -> Mem<'_> {
        Mem {
            ram: &self.ram,
            area: self.area_mem.as_deref(),
            logging: &self.dirty_log,
            written: &self.vmm_written,
        }
    }

    /// Benchmarks only: with `bare`, a trapped write is counted and dropped
    /// at once (no decode, no policy, no write): the cost of the read-only
    /// slot's trap itself, the floor an emulated write is compared with.
    pub fn set_bare(&self, bare: bool) {
        self.bare.store(bare, Ordering::Relaxed);
    }

    /// Installs the policy that decides writes to protected bytes (without
    /// one, every such write is refused).
    pub fn set_policy(&self, policy: Arc<dyn WritePolicy>) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(policy);
    }

    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The protected ranges now.
    pub fn protections(&self) -> Vec<Protection> {
        self.table().list.clone()
    }

    /// The slot layout now: RAM's, then the patch area's (sorted by address).
    pub fn slot_layout(&self) -> Vec<SlotSpec> {
        let mut v: Vec<SlotSpec> = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, s)| *s)
            .collect();
        v.sort_by_key(|s| s.gpa);
        v
    }

    /// Checks one range before it is protected.
    pub fn check(&self, p: &Protection) -> Result<(), ProtectError> {
        if p.owner.is_empty() {
            return Err(ProtectError::NoOwner);
        }
        if p.len == 0 {
            return Err(ProtectError::Empty { gpa: p.gpa });
        }
        let (abase, asize) = self.area;
        if p.access == Access::Native {
            let whole_pages = p.gpa % PAGE == 0 && p.len % PAGE == 0;
            let in_area = p.gpa >= abase && p.gpa.saturating_add(p.len) <= abase + asize;
            if !whole_pages || !in_area || self.area_mem.is_none() {
                return Err(ProtectError::NotAreaPages {
                    gpa: p.gpa,
                    len: p.len,
                });
            }
            return Ok(());
        }
        let data_copy = p.owner.starts_with(DATA_OWNER_PREFIX)
            && p.gpa >= abase
            && p.gpa.saturating_add(p.len) <= abase + asize;
        if data_copy {
            return Ok(());
        }
        if p.gpa < abase + asize && p.gpa.saturating_add(p.len) > abase {
            return Err(ProtectError::PatchArea {
                gpa: p.gpa,
                len: p.len,
                area: abase,
            });
        }
        if !self.ram.contains(p.gpa, p.len) {
            let ram = self
                .ram
                .ranges()
                .iter()
                .map(|r| format!("{:#x}..{:#x}", r.guest_addr, r.guest_addr + r.len))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ProtectError::NotRam {
                gpa: p.gpa,
                len: p.len,
                ram,
            });
        }
        Ok(())
    }

    /// Releases every range of the owners in `release`, then protects `add`,
    /// moving pages between read-write and read-only slots through `sink`.
    /// Every vCPU must be paused. All or nothing: on a refused range nothing
    /// changes; if KVM refuses a slot change, the old layout is put back.
    pub fn change(
        &self,
        sink: &dyn SlotSink,
        release: &[String],
        add: &[Protection],
    ) -> Result<(), ProtectError> {
        for p in add {
            self.check(p)?;
        }
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<Protection> = table
            .list
            .iter()
            .filter(|p| !release.contains(&p.owner))
            .cloned()
            .collect();
        list.extend(add.iter().cloned());
        let next = Table::new(list);
        if let Some((page, trapped, native)) = next.mixed() {
            return Err(ProtectError::Mixed {
                page,
                trapped: trapped.to_owned(),
                native: native.to_owned(),
            });
        }
        let mut layout = slot_layout(self.ram.ranges(), &next.readonly);
        if self.area_mem.is_some() {
            layout.extend(area_layout(self.area.0, self.area.1, &next.native));
        }
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let old = slots.clone();
        if self.dirty_log.load(Ordering::Relaxed) {
            // Slots replaced start with an empty log.
            self.dirty_lost.store(true, Ordering::Relaxed);
        }
        match apply_layout(sink, &old, &layout) {
            Ok(now) => {
                *slots = now;
                self.trapping
                    .store(!next.readonly.is_empty(), Ordering::Relaxed);
                *table = Arc::new(next);
                Ok(())
            }
            Err((now, why)) => {
                // Put the old layout back (best effort; it was accepted before).
                let old_specs: Vec<SlotSpec> = old.iter().map(|(_, s)| *s).collect();
                match apply_layout(sink, &now, &old_specs) {
                    Ok(back) => {
                        *slots = back;
                        Err(ProtectError::Slots(why))
                    }
                    Err((back, e2)) => {
                        log::error!("restoring the memory slots failed too: {e2}");
                        *slots = back;
                        Err(ProtectError::Torn(format!("{why}; restoring: {e2}")))
                    }
                }
            }
        }
    }

    /// Whether trapped writes need the writer's registers now: some page is
    /// protected (and the benchmark floor is off).
    pub fn trapping(&self) -> bool {
        self.trapping.load(Ordering::Relaxed) && !self.bare.load(Ordering::Relaxed)
    }

    /// Whether `gpa` is on a protected page (the vCPU exit path's test).
    pub fn is_protected_page(&self, gpa: u64) -> bool {
        self.table().is_readonly(gpa / PAGE)
    }

    /// The counters and the layout's size.
    pub fn stats(&self) -> WriteStats {
        let t = self.table();
        let c = &self.counters;
        WriteStats {
            trapped: c.trapped.load(Ordering::Relaxed),
            allowed: c.allowed.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            handled: c.handled.load(Ordering::Relaxed),
            rewound: c.rewound.load(Ordering::Relaxed),
            handle_ns: c.handle_ns.load(Ordering::Relaxed),
            ranges: t.list.len() as u64,
            pages: t.readonly_pages(),
            slots: self.slots.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
        }
    }

    /// The counters and the events after sequence number `since`, for
    /// another VMM process.
    pub fn carried(&self, since: u64) -> WriteCarry {
        let c = &self.counters;
        let log = self.events.lock().unwrap_or_else(|e| e.into_inner());
        WriteCarry {
            counts: [
                c.trapped.load(Ordering::Relaxed),
                c.allowed.load(Ordering::Relaxed),
                c.refused.load(Ordering::Relaxed),
                c.handled.load(Ordering::Relaxed),
                c.rewound.load(Ordering::Relaxed),
                c.handle_ns.load(Ordering::Relaxed),
            ],
            next_event: log.next,
            events: log
                .events
                .iter()
                .filter(|e| e.seq > since)
                .cloned()
                .collect(),
        }
    }

    /// Takes over another VMM process's counters and event log.
    pub fn carry_on(&self, w: &WriteCarry) {
        let c = &self.counters;
        for (a, v) in [
            &c.trapped,
            &c.allowed,
            &c.refused,
            &c.handled,
            &c.rewound,
            &c.handle_ns,
        ]
        .into_iter()
        .zip(w.counts)
        {
            a.store(v, Ordering::Relaxed);
        }
        let mut log = self.events.lock().unwrap_or_else(|e| e.into_inner());
        log.next = w.next_event;
        log.events.extend(w.events.iter().cloned());
        while log.events.len() > EVENT_LOG_LEN {
            log.events.pop_front();
        }
    }

    /// Events after sequence number `since`, and the next sequence number.
    pub fn events_since(&self, since: u64) -> (Vec<WriteEvent>, u64) {
        let log = self.events.lock().unwrap_or_else(|e| e.into_inner());
        (
            log.events
                .iter()
                .filter(|e| e.seq > since)
                .cloned()
                .collect(),
            log.next,
        )
    }

    fn record(&self, mut e: WriteEvent) {
        let mut log = self.events.lock().unwrap_or_else(|e| e.into_inner());
        e.seq = log.next;
        e.at_ms = self.start.elapsed().as_millis() as u64;
        log.next += 1;
        log.events.push_back(e);
        while log.events.len() > EVENT_LOG_LEN {
            log.events.pop_front();
        }
    }

    /// Deals with one trapped guest write of `data` at `gpa` by vCPU `vcpu`,
    /// whose registers `cpu` reads (and sets, to rewind).
    pub fn on_write(&self, vcpu: u8, cpu: &dyn WriterCpu, gpa: u64, data: &[u8]) -> Outcome {
        let t0 = Instant::now();
        let out = self.decide_and_write(vcpu, cpu, gpa, data);
        self.counters
            .handle_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    fn decide_and_write(&self, vcpu: u8, cpu: &dyn WriterCpu, gpa: u64, data: &[u8]) -> Outcome {
        self.counters.trapped.fetch_add(1, Ordering::Relaxed);
        if self.bare.load(Ordering::Relaxed) {
            return Outcome::Done;
        }
        let table = self.table();
        let page = gpa / PAGE;
        let _page_lock = self.page_locks[(page % self.page_locks.len() as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let end = gpa + data.len() as u64;
        let touches = table.touching(gpa, end);
        // Then the owners' locks: writes to both copies of tracked data
        // (different pages) are serialized on them. Owners `A` and `A/part`
        // share one. A write spanning several owners takes all of theirs,
        // in index order (no two writers wait on each other).
        let mut lock_ids: Vec<usize> = touches
            .iter()
            .map(|p| {
                let group = p.owner.split('/').next().unwrap_or_default();
                let h = group.bytes().fold(0usize, |h, b| {
                    h.wrapping_mul(31).wrapping_add(usize::from(b))
                });
                h % self.owner_locks.len()
            })
            .collect();
        lock_ids.sort_unstable();
        lock_ids.dedup();
        let _owner_locks: Vec<_> = lock_ids
            .iter()
            .map(|&i| {
                self.owner_locks[i]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
            })
            .collect();
        let mem = self.mem();
        // The writing instruction may be patch code: read it from RAM and
        // the patch area alike.
        let cpu = &WithMem { cpu, mem: &mem };
        let writer = crate::insn::find_writer(cpu, gpa, data.len());
        // Unknown writer: no address the policy could allow by (events show
        // where the vCPU was, just past it), and its privilege level from CS.
        let (rip, event_rip, cpl) = match &writer {
            Some(w) => (w.start, w.start, w.cpl),
            None => (
                0,
                cpu.rip_after().unwrap_or(0),
                cpu.sregs().map(|s| (s.cs.selector & 3) as u8).unwrap_or(3),
            ),
        };
        let mut trapped = TrappedWrite {
            vcpu,
            rip,
            cpl,
            // Only a policy reads it (the fast path for unprotected bytes
            // must not fetch the special registers).
            cr3: if touches.is_empty() {
                0
            } else {
                cpu.sregs().map(|s| s.cr3).unwrap_or(0)
            },
            gpa,
            data,
            touches: touches.clone(),
            before: Vec::new(),
        };
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let decision = if touches.is_empty() {
            // The patch area is written only where a policy allows it.
            if self.in_area(gpa) {
                Decision::Refuse
            } else {
                Decision::Allow
            }
        } else {
            match &policy {
                Some(p) => p.decide(&trapped, &mem),
                None => Decision::Refuse,
            }
        };
        match decision {
            Decision::Handled => {
                self.counters.handled.fetch_add(1, Ordering::Relaxed);
                Outcome::Done
            }
            Decision::Allow => {
                // A read-modify-write whose read went stale runs again.
                if let Some(w) = &writer {
                    let mut now = [0u8; 16];
                    let now = &mut now[..data.len()];
                    if mem.read_phys(gpa, now).is_ok() {
                        match crate::insn::verdict(w, now, data) {
                            crate::insn::Verdict::Commit => {}
                            crate::insn::Verdict::Drop => {
                                self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                                return Outcome::Done;
                            }
                            crate::insn::Verdict::Rewind(regs) => {
                                let row = &self.rewinds_in_a_row[vcpu as usize];
                                if row.fetch_add(1, Ordering::Relaxed) < MAX_REWINDS_IN_A_ROW {
                                    self.counters.rewound.fetch_add(1, Ordering::Relaxed);
                                    return Outcome::Rewind(regs);
                                }
                                log::warn!(
                                    "vCPU {vcpu}: the write at {gpa:#x} by {:#x} was rewound {MAX_REWINDS_IN_A_ROW} times in a row; committing it",
                                    w.start
                                );
                            }
                        }
                        self.rewinds_in_a_row[vcpu as usize].store(0, Ordering::Relaxed);
                        if w.rmw.adds() {
                            trapped.before = now.to_vec();
                        }
                    }
                }
                let mut out = Outcome::Done;
                if let Err(e) = mem.write_phys(gpa, data) {
                    log::warn!("vCPU {vcpu}: allowed write at {gpa:#x} failed: {e}");
                } else if let (Some(p), false) = (&policy, touches.is_empty()) {
                    p.committed(&trapped, &mem);
                    if p.holds(&trapped, &mem) {
                        out = Outcome::Hold;
                    }
                }
                self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                out
            }
            Decision::Refuse => {
                // Byte by byte: what is not protected is still written
                // (never in the patch area).
                for (i, b) in data.iter().enumerate() {
                    let at = gpa + i as u64;
                    if !touches.iter().any(|p| p.contains(at)) && !self.in_area(at) {
                        let _ = mem.write_phys(at, std::slice::from_ref(b));
                    }
                }
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                // The most specific range hit names it (a patch's jump
                // inside protected kernel text: the patch).
                let (owner, target) = match touches.iter().copied().min_by_key(|p| p.len) {
                    Some(hit) => (
                        hit.owner.clone(),
                        format!("{}+{:#x}", hit.label, gpa.max(hit.gpa) - hit.gpa),
                    ),
                    None => (
                        PATCH_AREA_OWNER.to_owned(),
                        format!("patch area+{:#x}", gpa - self.area.0),
                    ),
                };
                self.record(WriteEvent {
                    seq: 0,
                    at_ms: 0,
                    kind: "refused".into(),
                    vcpu,
                    rip: event_rip,
                    cpl,
                    gpa,
                    bytes: data.to_vec(),
                    owner,
                    target,
                });
                Outcome::Done
            }
        }
    }
}

/// A writer whose instructions are read from RAM and the patch area.
struct WithMem<'a> {
    cpu: &'a dyn WriterCpu,
    mem: &'a dyn PhysMemory,
}

impl WriterCpu for WithMem<'_> {
    fn regs(&self) -> Option<kvm_bindings::kvm_regs> {
        self.cpu.regs()
    }
    fn sregs(&self) -> Option<kvm_bindings::kvm_sregs> {
        self.cpu.sregs()
    }
    fn memory(&self) -> &dyn PhysMemory {
        self.mem
    }
    fn rip_after(&self) -> Option<u64> {
        self.cpu.rip_after()
    }
}

/// RAM and the patch area as one guest-physical memory.
struct Mem<'a> {
    ram: &'a GuestRam,
    area: Option<&'a crate::region::VmmRegion>,
    /// Whether the dirty log is on, and where the pages it writes are
    /// noted then.
    logging: &'a std::sync::atomic::AtomicBool,
    written: &'a Mutex<Vec<u64>>,
}

impl PhysMemory for Mem<'_> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        match self.area {
            Some(a) if gpa >= a.gpa && gpa < a.gpa + a.size => a.read(gpa - a.gpa, buf),
            _ => self.ram.read(gpa, buf),
        }
    }
    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let r = match self.area {
            Some(a) if gpa >= a.gpa && gpa < a.gpa + a.size => a.write(gpa - a.gpa, buf),
            _ => self.ram.write(gpa, buf),
        };
        // The write first, then the flag (the fence pairs with the one in
        // `WriteControl::set_dirty_log`): a scan that turned the log on
        // either finds the page noted or reads what was written.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.logging.load(Ordering::SeqCst) {
            let end = gpa + (buf.len() as u64).max(1);
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend((gpa & !(PAGE - 1)..end).step_by(PAGE as usize));
        }
        r
    }
}

/// The writing vCPU's state, as the trap handler needs it.
pub trait WriterCpu {
    /// General registers (after the writing instruction).
    fn regs(&self) -> Option<kvm_bindings::kvm_regs>;
    /// Special registers.
    fn sregs(&self) -> Option<kvm_bindings::kvm_sregs>;
    /// Guest memory, to read the instruction.
    fn memory(&self) -> &dyn PhysMemory;
    /// RIP after the writing instruction.
    fn rip_after(&self) -> Option<u64> {
        self.regs().map(|r| r.rip)
    }
}

/// Installed slots: (KVM slot id, what it maps).
type Slots = Vec<(u32, SlotSpec)>;

/// Moves KVM from slots `old` to the layout `new`: deletes the slots that
/// change, then creates the new ones (slots may not overlap). On failure,
/// returns what is installed now with the reason.
fn apply_layout(
    sink: &dyn SlotSink,
    old: &[(u32, SlotSpec)],
    new: &[SlotSpec],
) -> Result<Slots, (Slots, String)> {
    let mut now: Vec<(u32, SlotSpec)> = Vec::new();
    let mut gone = Vec::new();
    for (id, s) in old {
        if new.contains(s) {
            now.push((*id, *s));
        } else {
            gone.push((*id, *s));
        }
    }
    for (i, (id, s)) in gone.iter().enumerate() {
        if let Err(e) = sink.set_slot(*id, None) {
            // The ones not yet deleted are still there.
            now.extend(gone[i..].iter().copied());
            return Err((now, format!("deleting slot {id} at {:#x}: {e}", s.gpa)));
        }
    }
    let mut free: Vec<u32> = gone.iter().map(|(id, _)| *id).collect();
    free.sort_unstable();
    free.reverse();
    for s in new {
        if now.iter().any(|(_, n)| n == s) {
            continue;
        }
        let id = match free.pop() {
            Some(id) => id,
            None => next_free_id(&now),
        };
        if let Err(e) = sink.set_slot(id, Some(s)) {
            return Err((
                now,
                format!("creating slot {id} at {:#x}+{:#x}: {e}", s.gpa, s.len),
            ));
        }
        now.push((id, *s));
    }
    now.sort_by_key(|(_, s)| s.gpa);
    Ok(now)
}

/// The lowest slot id not in use, never the patch area's.
fn next_free_id(used: &[(u32, SlotSpec)]) -> u32 {
    (0..)
        .filter(|id| *id != crate::region::PATCH_AREA_SLOT)
        .find(|id| !used.iter().any(|(u, _)| u == id))
        .unwrap_or(u32::MAX)
}

impl From<MemoryError> for ProtectError {
    fn from(e: MemoryError) -> Self {
        ProtectError::Slots(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RamRange;

    fn pages(list: &[u64]) -> Vec<(u64, u64)> {
        Table::new(list.iter().map(|&p| prot("t", p * PAGE, 1)).collect()).readonly
    }

    #[test]
    fn layout_splits_and_merges() {
        let ram = [RamRange {
            guest_addr: 0,
            len: 16 * PAGE,
            file_offset: 0,
        }];
        assert_eq!(slot_layout(&ram, &[]).len(), 1);
        let l = slot_layout(&ram, &pages(&[3, 4, 9]));
        let kinds: Vec<(u64, u64, bool)> = l
            .iter()
            .map(|s| (s.gpa / PAGE, s.len / PAGE, s.readonly))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, 3, false),
                (3, 2, true),
                (5, 4, false),
                (9, 1, true),
                (10, 6, false)
            ]
        );
        assert!(l.iter().all(|s| s.file_offset == s.gpa));
        // Edges: first and last page.
        let l = slot_layout(&ram, &pages(&[0, 15]));
        assert_eq!(l.len(), 3);
        assert!(l[0].readonly && l[2].readonly && !l[1].readonly);
    }

    #[derive(Default)]
    struct Recorder(Mutex<BTreeMap<u32, SlotSpec>>, Mutex<u32>);
    impl SlotSink for Recorder {
        fn set_slot(&self, id: u32, spec: Option<&SlotSpec>) -> Result<(), String> {
            let mut calls = self.1.lock().expect("lock");
            *calls += 1;
            let mut m = self.0.lock().expect("lock");
            match spec {
                Some(s) => {
                    if m.values()
                        .any(|o| o.gpa < s.gpa + s.len && s.gpa < o.gpa + o.len)
                    {
                        return Err("overlap".into());
                    }
                    if m.insert(id, *s).is_some() {
                        return Err("slot in use".into());
                    }
                }
                None => {
                    m.remove(&id).ok_or("no such slot")?;
                }
            }
            Ok(())
        }
    }

    fn wc() -> (WriteControl, Recorder) {
        let ram = Arc::new(GuestRam::new(1 << 20).expect("ram"));
        let spec = SlotSpec {
            gpa: 0,
            len: 1 << 20,
            file_offset: 0,
            readonly: false,
        };
        let rec = Recorder::default();
        rec.0.lock().expect("lock").insert(0, spec);
        (
            WriteControl::new(ram, vec![(0, spec)], (1 << 32, 2 << 20)),
            rec,
        )
    }

    fn prot(owner: &str, gpa: u64, len: u64) -> Protection {
        Protection {
            owner: owner.into(),
            label: "x".into(),
            gpa,
            len,
            access: Access::Trapped,
        }
    }

    #[test]
    fn protect_and_release_restore_the_layout() {
        let (w, rec) = wc();
        let before = w.slot_layout();
        w.change(&rec, &[], &[prot("a", 0x3000, 5), prot("b", 0x3ffe, 4)])
            .expect("protect");
        assert_eq!(w.stats().pages, 2);
        let ro: Vec<_> = w.slot_layout().into_iter().filter(|s| s.readonly).collect();
        assert_eq!(
            ro,
            vec![SlotSpec {
                gpa: 0x3000,
                len: 0x2000,
                file_offset: 0x3000,
                readonly: true
            }]
        );
        assert!(w.is_protected_page(0x3fff) && w.is_protected_page(0x4000));
        assert!(!w.is_protected_page(0x5000));
        w.change(&rec, &["b".into()], &[]).expect("release b");
        assert_eq!(w.stats().pages, 1);
        w.change(&rec, &["a".into()], &[]).expect("release a");
        assert_eq!(w.slot_layout(), before);
        let m = rec.0.lock().expect("lock");
        assert_eq!(m.values().copied().collect::<Vec<_>>(), before);
    }

    fn native(owner: &str, gpa: u64, len: u64) -> Protection {
        Protection {
            access: Access::Native,
            ..prot(owner, gpa, len)
        }
    }

    #[test]
    fn native_pages_of_the_area_get_read_write_slots() {
        let (w, rec) = wc();
        let area = Arc::new(crate::region::VmmRegion::patch_area(1 << 20).expect("area"));
        let a = area.gpa;
        rec.0.lock().expect("lock").insert(
            crate::region::PATCH_AREA_SLOT,
            SlotSpec {
                gpa: a,
                len: area.size,
                file_offset: 0,
                readonly: true,
            },
        );
        let w = w.with_area(area.clone());
        let before = w.slot_layout();
        assert_eq!(before.len(), 2);
        // A trapped data copy on page 3, native pages 1-2 and 5.
        w.change(
            &rec,
            &[],
            &[
                prot("data:p:x", a + 3 * PAGE + 8, 16),
                native("data:p/own", a + PAGE, 2 * PAGE),
                native("data:q/own", a + 5 * PAGE, PAGE),
            ],
        )
        .expect("open");
        let area_slots: Vec<(u64, u64, bool)> = w
            .slot_layout()
            .into_iter()
            .filter(|s| s.gpa >= a)
            .map(|s| ((s.gpa - a) / PAGE, s.len / PAGE, s.readonly))
            .collect();
        assert_eq!(
            area_slots,
            vec![
                (0, 1, true),
                (1, 2, false),
                (3, 2, true),
                (5, 1, false),
                (6, 506, true)
            ]
        );
        assert!(w
            .slot_layout()
            .iter()
            .filter(|s| s.gpa >= a)
            .all(|s| s.file_offset == s.gpa - a));
        // What KVM holds is that layout.
        let mut held: Vec<SlotSpec> = rec.0.lock().expect("lock").values().copied().collect();
        held.sort_by_key(|s| s.gpa);
        assert_eq!(held, w.slot_layout());
        // Only the trapped page traps.
        assert!(w.is_protected_page(a + 3 * PAGE));
        assert!(!w.is_protected_page(a + PAGE));
        // Refused, nothing changed: not whole pages, not the area, a page
        // both trapped and native.
        let now = w.slot_layout();
        for (p, what) in [
            (native("n", a + 7 * PAGE + 8, PAGE), "whole pages"),
            (native("n", a + 7 * PAGE, 100), "whole pages"),
            (native("n", 0x3000, PAGE), "whole pages"),
            (native("n", a + 3 * PAGE, PAGE), "both trapped"),
        ] {
            let e = w.change(&rec, &[], &[p]).expect_err(what);
            assert!(e.to_string().contains(what), "{e}");
        }
        assert_eq!(w.slot_layout(), now);
        // A copy retires: its trapped range goes, the same owner's pages
        // become native in the same change.
        w.change(
            &rec,
            &["data:p:x".into()],
            &[native("data:p:x", a + 3 * PAGE, PAGE)],
        )
        .expect("retire");
        assert!(!w.is_protected_page(a + 3 * PAGE));
        w.change(
            &rec,
            &["data:p:x".into(), "data:p/own".into(), "data:q/own".into()],
            &[],
        )
        .expect("release");
        assert_eq!(w.slot_layout(), before);
        let mut held: Vec<SlotSpec> = rec.0.lock().expect("lock").values().copied().collect();
        held.sort_by_key(|s| s.gpa);
        assert_eq!(held, before);
    }

    #[test]
    fn bad_ranges_change_nothing() {
        let (w, rec) = wc();
        let before = w.slot_layout();
        for (p, what) in [
            (prot("a", 0x1000, 0), "empty"),
            (prot("a", (1 << 20) - 2, 4), "not guest RAM"),
            (prot("a", (1 << 32) + 16, 4), "patch area"),
            (prot("", 0x1000, 4), "owner"),
        ] {
            let e = w
                .change(&rec, &[], &[prot("ok", 0x2000, 1), p])
                .expect_err(what);
            assert!(e.to_string().contains(what), "{e}");
        }
        assert_eq!(w.slot_layout(), before);
        assert_eq!(w.stats().ranges, 0);
    }

    struct NoCpu(Arc<GuestRam>);
    impl WriterCpu for NoCpu {
        fn regs(&self) -> Option<kvm_bindings::kvm_regs> {
            None
        }
        fn sregs(&self) -> Option<kvm_bindings::kvm_sregs> {
            None
        }
        fn memory(&self) -> &dyn PhysMemory {
            self.0.as_ref()
        }
    }

    #[test]
    fn refused_writes_keep_protected_bytes_and_write_the_rest() {
        let (w, rec) = wc();
        w.ram
            .write(0x3000, &[1, 2, 3, 4, 5, 6, 7, 8])
            .expect("seed");
        w.change(&rec, &[], &[prot("patch:fix", 0x3002, 2)])
            .expect("protect");
        let cpu = NoCpu(w.ram.clone());
        // Touches protected bytes 2..4: refused (no policy), others written.
        assert_eq!(w.on_write(0, &cpu, 0x3000, &[9; 8]), Outcome::Done);
        let mut b = [0u8; 8];
        w.ram.read(0x3000, &mut b).expect("read");
        assert_eq!(b, [9, 9, 3, 4, 9, 9, 9, 9]);
        // Elsewhere on the page: written.
        w.on_write(1, &cpu, 0x3800, &[0xaa; 4]);
        let mut c = [0u8; 4];
        w.ram.read(0x3800, &mut c).expect("read");
        assert_eq!(c, [0xaa; 4]);
        let s = w.stats();
        assert_eq!((s.trapped, s.allowed, s.refused), (2, 1, 1));
        let (ev, next) = w.events_since(0);
        assert_eq!(next, 2);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].target, "x+0x0");
        assert_eq!(ev[0].owner, "patch:fix");
        assert_eq!(ev[0].bytes, vec![9; 8]);
    }

    #[test]
    fn ranges_on_relayed_pages_come_and_go_without_a_slot_change() {
        let (w, rec) = wc();
        let relay = Protection {
            access: Access::Relayed,
            ..prot("text", 0x3000, 3 * PAGE)
        };
        w.change(&rec, &[], &[relay]).expect("relay");
        let layout = w.slot_layout();
        assert_eq!(w.stats().pages, 3);
        assert!(w.is_protected_page(0x5fff) && !w.is_protected_page(0x6000));
        let calls = *rec.1.lock().expect("lock");
        // A trapped range on a relayed page, and its release: the same slots,
        // no call to KVM.
        w.change(&rec, &[], &[prot("patch:fix", 0x4002, 5)])
            .expect("protect");
        assert_eq!(w.slot_layout(), layout);
        w.ram.write(0x4000, &[1; 8]).expect("seed");
        let cpu = NoCpu(w.ram.clone());
        // Relayed bytes are written as asked, with no policy; trapped ones
        // on the same page still go to the policy (none here: refused).
        w.on_write(0, &cpu, 0x3008, &[7; 8]);
        w.on_write(0, &cpu, 0x4000, &[9; 8]);
        let (mut a, mut b) = ([0u8; 8], [0u8; 8]);
        w.ram.read(0x3008, &mut a).expect("read");
        w.ram.read(0x4000, &mut b).expect("read");
        assert_eq!((a, b), ([7; 8], [9, 9, 1, 1, 1, 1, 1, 9]));
        let s = w.stats();
        assert_eq!((s.trapped, s.allowed, s.refused), (2, 1, 1));
        assert_eq!(w.events_since(0).0.len(), 1, "relayed writes are no events");
        w.change(&rec, &["patch:fix".into()], &[]).expect("release");
        assert_eq!(w.slot_layout(), layout);
        assert_eq!(*rec.1.lock().expect("lock"), calls);
        // Releasing the relay merges the slots back.
        w.change(&rec, &["text".into()], &[])
            .expect("release relay");
        assert_eq!(w.slot_layout().len(), 1);
    }
}
