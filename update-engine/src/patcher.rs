//! Live patching the guest kernel from the VMM (LUCOS): the policy that
//! applies and reverts `.lup` patches, through [`Guest`] only.
//!
//! Applying is a pipeline of phases, each a function below:
//!
//! 1. **verify**: the file, its signature by a trusted key, its target
//!    build against the running kernel, the stack rules (name, dependencies);
//! 2. **resolve**: each old function in the running kernel (by name and
//!    object file), its bytes in guest memory against the patch's hash;
//! 3. **link**: the patch's objects against the patch itself and the
//!    running kernel's symbols, at the area's base to learn size and
//!    alignment, then at the run it is placed in;
//! 4. **place**: a free, aligned run of the patch area; where the area is
//!    mapped in the kernel's address space (read from the kernel's own page
//!    tables; planned, not written);
//! 5. **plan**: every checked write of the switch: the trampolines, the
//!    sites a `--replace` gives back, the page-directory entry that maps the
//!    area (first patch only); and the code nothing may be in;
//! 6. **switch**: the code copied into its free run (unreachable until a
//!    trampoline points there), then every write in one pause, after every
//!    check ([`crate::switch`]); on failure the run's old bytes come back;
//! 7. **commit**: the applied stack, the area's allocation.
//!
//! Nothing is written to guest RAM outside the switch's pause, and a
//! refused patch leaves all of guest memory, the patch area included, as it
//! was. Everything a revert needs ([`PatchState`]) is serializable.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_core::guest::Guest;
use vmm_core::pagewalk::{self, PagingState};
use vmm_core::region::PATCH_AREA_BYTES;
use vmm_core::vm::VmError;
use vmm_core::write_control::Protection;

use crate::area::{self, Mapping, Space};
use crate::kernel::{self, GuestKernel};
use crate::link::link_objects;
use crate::linux::TaskLayout;
use crate::lup::{old_code_sha256, sha256_hex, FunctionPatch, Mode};
use crate::safety::{Active, Leaving};
use crate::switch::{self, Plan, SwitchError, Switched, Write};
use crate::trampoline::{self, Site, TRAMPOLINE_LEN};
use crate::{Linked, Lup, UpdateError, VerifyingKey};

/// Longest wait between two scans of guest memory for pointers into an old
/// copy that one was found holding.
const MAX_SCAN_WAIT: Duration = Duration::from_secs(64);

/// Errors applying or reverting a patch. None leaves the guest changed.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// A patch-level check failed.
    #[error(transparent)]
    Update(#[from] UpdateError),
    /// Reading or writing the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Finding out about the guest kernel failed.
    #[error(transparent)]
    Kernel(#[from] kernel::IntrospectError),
    /// A vCPU or a sleeping task kept being in code the switch leaves behind.
    #[error("in each of {tries} pauses something was still in code the patch replaces, or pointed into data it changes (last: {who} {active}{}); nothing was changed, try again", crate::switch::also(others))]
    Busy {
        /// Who: `vCPU N`, or `task PID (COMM)` for a Linux task that is not running.
        who: String,
        /// What it was doing there.
        active: Active,
        /// Other sleeping tasks in that code in the last pause.
        others: Vec<String>,
        /// Pauses tried.
        tries: u32,
    },
    /// The guest's module list could not be read.
    #[error(transparent)]
    Modules(#[from] crate::modules::ModuleError),
    /// No room left.
    #[error("the patch area is full ({used} of {size} bytes in use; no free run of {need} bytes)")]
    AreaFull {
        /// Bytes used.
        used: u64,
        /// Area size.
        size: u64,
        /// Bytes this patch needs.
        need: u64,
    },
    /// The patch area could not be mapped into the guest kernel.
    #[error("cannot map the patch area into the guest kernel: {0}")]
    Map(String),
    /// Guest memory was not as expected when switching.
    #[error("the switch did not happen: {0}")]
    Switch(String),
    /// The switch was written in part and could not be undone (never seen).
    #[error("the switch was written only in part and could not be undone: {0}; the guest may run a mix of old and new code: revert by hand or restart it")]
    Torn(String),
    /// Guest memory could not be scanned for pointers into an old copy.
    #[error("scanning guest memory for pointers into an old copy: {0}")]
    Scan(String),
}

impl From<SwitchError> for PatchError {
    fn from(e: SwitchError) -> Self {
        match e {
            SwitchError::Busy {
                who,
                active,
                others,
                tries,
            } => PatchError::Busy {
                who,
                active,
                others,
                tries,
            },
            SwitchError::Guest(why) => PatchError::Switch(why),
            SwitchError::Torn(why) => PatchError::Torn(why),
            SwitchError::Vm(v) => PatchError::Vm(v),
        }
    }
}

/// One function switched by an applied patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchedFunction {
    /// Old function.
    pub function: String,
    /// Its entry (where the trampoline is).
    #[serde(with = "symbol_db::hex_u64")]
    pub old_addr: u64,
    /// The replacement's address in the patch area.
    #[serde(with = "symbol_db::hex_u64")]
    pub new_addr: u64,
    /// Size of the old function.
    pub old_size: u64,
    /// What the trampoline overwrote (restored by revert), as hex.
    #[serde(with = "hex5")]
    pub saved: [u8; 5],
    /// The module it is in; none for vmlinux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// A module an applied patch switched functions of, as it was loaded then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedModule {
    /// Its name.
    pub name: String,
    /// Its build-id.
    pub build_id: String,
    /// Its `struct module` when patched (the loaded instance).
    #[serde(with = "symbol_db::hex_u64")]
    pub addr: u64,
    /// Owner of the protections of its jumps (unique to this apply, see
    /// [`module_owner`]); `watch:` before it owns the watch on the
    /// module's state.
    pub owner: String,
    /// `applied`, or `gone` once the guest unloaded it (its sites went with
    /// its memory: nothing to revert there).
    pub status: ObjectStatus,
    /// The instance is being freed (it was made `unformed`): its watch is
    /// released, and a module of that name at the same address is another
    /// load.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freed: bool,
}

/// Where an applied patch stands in one object it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectStatus {
    /// Its functions are switched.
    Applied,
    /// The module was unloaded after the patch switched it.
    Gone,
}

/// An applied patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedPatch {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Patch version.
    pub version: u32,
    /// Patches it depends on.
    pub depends: Vec<String>,
    /// Functions switched.
    pub functions: Vec<SwitchedFunction>,
    /// Its code in the patch area.
    #[serde(with = "symbol_db::hex_u64")]
    pub code_addr: u64,
    /// Bytes of code.
    pub code_bytes: u64,
    /// The mode it was applied in.
    #[serde(default)]
    pub mode: Mode,
    /// Kernel objects it gave a new layout.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<AppliedData>,
    /// SHA-256 of its code and read-only data as placed (`code_len` bytes
    /// from `code_addr`), for `verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_sha256: Option<String>,
    /// Bytes hashed (its own writable data, after them, is not).
    #[serde(default)]
    pub code_len: u64,
    /// The modules it switched functions of (the rest are vmlinux's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<AppliedModule>,
    /// For a patch of modules: the `.lup` (hex), whose part for a module
    /// the guest unloads is held again, to patch it when it loads again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// This is the part of the `.lup` for this module only (`NAME@MODULE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    /// Its own variables, by name (a cumulative patch that replaces it
    /// takes over their values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variables: Vec<crate::link::Variable>,
    /// Runs of the patch area (offsets) of patches it replaced that hold
    /// the new copies of the data changes it carried over from them: given
    /// back with its own run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_runs: Vec<u64>,
}

/// A patch for a module not loaded yet, held until the guest loads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldPatch {
    /// Its name.
    pub name: String,
    /// Its description.
    #[serde(default)]
    pub description: String,
    /// Its version.
    pub version: u32,
    /// The module it waits for.
    pub module: String,
    /// Applied as the part of the `.lup` that covers this module only (a
    /// patch whose other objects were applied without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    /// The mode to apply it in.
    pub mode: Mode,
    /// The `.lup`, hex (carried to a new VMM process; not listed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lup: String,
    /// The `struct module` of the instance being loaded that it will be
    /// applied to (its state is watched), if one is loading.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex")]
    pub coming: Option<u64>,
    /// Why the last try to apply it failed (the module loaded without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

mod opt_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_some(&format!("{x:#x}")),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let v: Option<String> = Option::deserialize(d)?;
        v.map(|t| {
            u64::from_str_radix(t.trim_start_matches("0x"), 16).map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(t: &str) -> Option<Vec<u8>> {
    if t.len() % 2 != 0 {
        return None;
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect()
}

impl AppliedPatch {
    /// Whether the switched function `f` is in a module the guest unloaded.
    fn gone(&self, f: &SwitchedFunction) -> bool {
        f.module.as_ref().is_some_and(|m| {
            self.modules
                .iter()
                .any(|x| &x.name == m && x.status == ObjectStatus::Gone)
        })
    }
}

/// What [`Patcher::verify_applied`] finds: whether every applied patch is in effect
/// as it was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Applied patches checked.
    pub patches: usize,
    /// Their names, oldest first.
    #[serde(default)]
    pub applied: Vec<String>,
    /// Switched sites checked (each once, against the newest patch's jump).
    pub sites: usize,
    /// Bytes of patch code hashed.
    pub code_bytes: u64,
    /// What is not as it should be; empty when all is.
    pub problems: Vec<String>,
}

/// A data-layout change of an applied patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedData {
    /// The kernel object.
    pub symbol: String,
    /// Its struct type.
    pub type_name: String,
    /// Elements.
    pub count: u64,
    /// The old copy (guest-virtual).
    #[serde(with = "symbol_db::hex_u64")]
    pub old_addr: u64,
    /// The new copy (guest-virtual, in the patch area).
    #[serde(with = "symbol_db::hex_u64")]
    pub new_addr: u64,
    /// Bytes of the old and the new copy.
    pub old_bytes: u64,
    /// Bytes of the new copy.
    pub new_bytes: u64,
    /// Kernel functions still using the old copy.
    pub users_left: Vec<String>,
    /// Live figures (filled in by `list`).
    #[serde(default)]
    pub stats: crate::data::DataStats,
    /// The change (member by member), for the revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<crate::data::DataChange>,
    /// Guest-physical start of the old copy.
    #[serde(default, with = "symbol_db::hex_u64")]
    pub old_gpa: u64,
    /// Kernel data words pointing at the new copy while the patch is
    /// applied (at the old one before and after).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repointed: Vec<Repointed>,
    /// The owner of its copies' protections and tracking when it is not
    /// this patch's (`data:PATCH:SYMBOL`): a change a cumulative patch
    /// carried over from the patch that made it keeps that patch's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl AppliedData {
    /// The owner of this change of patch `patch`.
    pub fn owner_of(&self, patch: &str) -> String {
        self.owner
            .clone()
            .unwrap_or_else(|| crate::data::owner(patch, &self.symbol))
    }
}

/// A kernel data word a data change points at its new copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repointed {
    /// `HOLDER+OFFSET`.
    pub word: String,
    /// Guest-virtual address of the word.
    #[serde(with = "symbol_db::hex_u64")]
    pub addr: u64,
    /// Its guest-physical address.
    #[serde(with = "symbol_db::hex_u64")]
    pub gpa: u64,
    /// The pointer into the old copy.
    #[serde(with = "symbol_db::hex_u64")]
    pub old: u64,
    /// The pointer into the new copy.
    #[serde(with = "symbol_db::hex_u64")]
    pub new: u64,
}

/// `bytes` as space-separated hex.
fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `bytes` are one instruction (so nothing can stop inside them).
fn one_instruction(bytes: &[u8]) -> bool {
    let mut d = iced_x86::Decoder::with_ip(64, bytes, 0, iced_x86::DecoderOptions::NONE);
    let i = d.decode();
    !i.is_invalid() && i.len() == bytes.len()
}

/// What applying or reverting reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchReport {
    /// The patch.
    pub name: String,
    /// When the switch was allowed to happen.
    #[serde(default)]
    pub mode: Mode,
    /// Functions switched.
    pub functions: Vec<SwitchedFunction>,
    /// How long every vCPU was paused, in microseconds.
    pub pause_us: f64,
    /// Pauses it took (a vCPU or task in code being left makes it try again).
    pub tries: u32,
    /// Linux guests: tasks not running on a vCPU whose stacks were checked in
    /// the pause that switched; absent where the kernel gives no way to find
    /// them (no BTF), and then only vCPUs were checked.
    pub sleeping_tasks_checked: Option<usize>,
    /// Total time of the request, in microseconds.
    pub total_us: f64,
    /// Where the time of the pause that switched went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_phases: Option<switch::PausePhases>,
    /// Where the time before that pause went (an apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare_phases: Option<switch::PreparePhases>,
    /// A patch for a module not loaded yet: held, and applied when the
    /// guest loads this module (nothing was switched now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

/// The running kernel's text and its hash, to show a refused patch changed
/// nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextHash {
    /// `_stext`.
    #[serde(with = "symbol_db::hex_u64")]
    pub start: u64,
    /// `_etext`.
    #[serde(with = "symbol_db::hex_u64")]
    pub end: u64,
    /// SHA-256 of the bytes in guest memory.
    pub sha256: String,
}

/// Hashes the running kernel's text (`_stext`..`_etext`) in guest memory.
pub fn text_hash(g: &dyn Guest, kernel: &GuestKernel) -> Result<TextHash, PatchError> {
    text_hash_in(g, kernel, View::new(g, kernel)?.read)
}

fn text_hash_in(
    g: &dyn Guest,
    kernel: &GuestKernel,
    paging: PagingState,
) -> Result<TextHash, PatchError> {
    let find = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| kernel.symbols.all_named(n).first().map(|s| s.addr))
    };
    let (Some(start), Some(end)) = (find(&["_stext", "_text"]), find(&["_etext"])) else {
        return Err(PatchError::Map(
            "the kernel has no _stext/_etext symbols".into(),
        ));
    };
    let mut bytes = vec![0u8; end.saturating_sub(start) as usize];
    kernel::read_virt(g, paging, start, &mut bytes)?;
    Ok(TextHash {
        start,
        end,
        sha256: sha256_hex(&bytes),
    })
}

/// The kernel's own page tables and their hash, to show a refused patch
/// left them as they were.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TablesHash {
    /// Guest-physical address of the top-level table (`init_top_pgt`, or
    /// vCPU 0's CR3 where the kernel has no such symbol).
    #[serde(with = "symbol_db::hex_u64")]
    pub root: u64,
    /// Table pages hashed: the top-level one and every table below the
    /// kernel half of it.
    pub pages: usize,
    /// SHA-256 of those pages, in walk order.
    pub sha256: String,
}

/// Hashes the kernel's page tables: the top-level table and every
/// page-directory-pointer, page-directory and page table reachable from its
/// kernel half (the entries of every level, not the pages they map). Stable
/// only while the guest is paused: a running Linux maps and unmaps vmalloc
/// space (task stacks) all the time.
pub fn tables_hash(g: &dyn Guest, k: &GuestKernel) -> Result<TablesHash, PatchError> {
    tables_hash_in(g, &View::new(g, k)?)
}

fn tables_hash_in(g: &dyn Guest, view: &View) -> Result<TablesHash, PatchError> {
    use sha2::{Digest, Sha256};
    const MAX_PAGES: usize = 1 << 18;
    let root = view.tables.cr3 & 0x000f_ffff_ffff_f000;
    let mut hasher = Sha256::new();
    let mut pages = 0usize;
    // (table, level: 4 = PML4 .. 1 = PT, first index to follow)
    let mut todo = vec![(root, 4u8, 256usize)];
    let mut page = [0u8; 4096];
    while let Some((table, level, first)) = todo.pop() {
        pages += 1;
        if pages > MAX_PAGES {
            return Err(PatchError::Map(format!(
                "more than {MAX_PAGES} page-table pages below {root:#x}"
            )));
        }
        g.ram()
            .read_phys(table, &mut page)
            .map_err(|e| PatchError::Vm(VmError::Memory(e)))?;
        hasher.update(table.to_le_bytes());
        hasher.update(page);
        if level == 1 {
            continue;
        }
        for i in (first..512).rev() {
            let e = u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let large = level < 4 && e & (1 << 7) != 0;
            if e & 1 != 0 && !large {
                todo.push((e & 0x000f_ffff_ffff_f000, level - 1, 0));
            }
        }
    }
    Ok(TablesHash {
        root,
        pages,
        sha256: format!("{:x}", hasher.finalize()),
    })
}

/// What the `patches` request answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchList {
    /// Applied patches, oldest first.
    pub patches: Vec<AppliedPatch>,
    /// The running kernel's text and its hash (absent if it cannot be read).
    pub kernel_text: Option<TextHash>,
    /// The kernel's own page tables and their hash (only while paused).
    pub kernel_page_tables: Option<TablesHash>,
    /// How much of the patch area holds code.
    pub patch_area: AreaUsage,
    /// Write control: the guest-physical ranges the guest cannot write
    /// (each patch's jumps, `patch:NAME`; others' too).
    #[serde(default)]
    pub protected: Vec<Protection>,
    /// Patches waiting for their module to load (without their bytes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldPatch>,
    /// lucos's exception index, while a patch has exception-table entries
    /// ([`crate::extable`]): the hooked function and the patches it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception_index: Option<ExceptionIndex>,
    /// Code of patches replaced in immediate mode, kept while calls may be
    /// in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_code: Vec<KeptCode>,
}

/// What `list` shows of lucos's exception index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionIndex {
    /// The kernel function whose entry jumps to it.
    pub hooked: String,
    /// Its entry.
    #[serde(with = "symbol_db::hex_u64")]
    pub site: u64,
    /// Guest-virtual address of the index's page.
    #[serde(with = "symbol_db::hex_u64")]
    pub page: u64,
    /// The applied patches whose exception tables it holds (a reverted
    /// patch's code that may still run keeps its slot: `code at ADDR`).
    pub patches: Vec<String>,
}

/// Use of the patch area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaUsage {
    /// Bytes holding code.
    pub used_bytes: u64,
    /// Its size.
    pub size_bytes: u64,
}

/// The code of a patch a cumulative patch replaced in immediate mode, which
/// calls may still be in (the switch did not wait for them): its area run,
/// and the runs it held, kept until a background pause finds nothing in
/// it ([`Patcher::retire`]); then given back (a run holding a copy of a
/// change still carried over goes to the patch carrying it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptCode {
    /// The replaced patch.
    pub patch: String,
    /// Its code (guest-virtual).
    #[serde(with = "symbol_db::hex_u64")]
    pub code_addr: u64,
    /// Bytes of its run.
    pub code_bytes: u64,
    /// Offsets of the area runs it held for changes it carried over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_runs: Vec<u64>,
}

/// Everything the patcher knows of a VM's live patches: what a revert
/// needs, and what a new VMM process taking the guest over needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchState {
    /// Guest-virtual base of the patch area once mapped into the kernel.
    pub area_va: Option<u64>,
    /// Which bytes of the area hold code of applied patches (or of reverted
    /// ones that something may still run: see [`Patcher::revert`]).
    pub space: Space,
    /// Applied patches, oldest first.
    pub applied: Vec<AppliedPatch>,
    /// Patches held for modules not loaded yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldPatch>,
    /// lucos's exception index, while a patch has exception-table entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extables: Option<crate::extable::Index>,
    /// Code of replaced patches calls may still be in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_code: Vec<KeptCode>,
}

/// Per-VM live-patch policy and state.
#[derive(Debug)]
pub struct Patcher {
    trusted: Vec<VerifyingKey>,
    state: PatchState,
    /// Data changes being kept coherent (shared with the write policy).
    tracker: std::sync::Arc<crate::data::DataTracker>,
    /// Data changes whose old copy a word of guest memory pointed into at
    /// the last scan: when to scan again, and the wait after that.
    scan_backoff: std::collections::HashMap<String, (Instant, Duration)>,
    /// When to check the kept code of replaced patches again, and the wait
    /// after that (while something stays in it).
    kept_backoff: Option<(Instant, Duration)>,
}

/// How the engine sees the running kernel's address space for one
/// operation.
#[derive(Debug, Clone, Copy)]
struct View {
    /// For reading kernel text: the kernel's own page tables where it has
    /// them (vCPU 0's may belong to a process that exits, and frees them,
    /// while the guest runs on), else vCPU 0's.
    read: PagingState,
    /// The kernel's own page tables (`init_top_pgt` where the kernel has
    /// one; else vCPU 0's, as in the test kernel's single address space).
    tables: PagingState,
    /// Whether the guest is Linux, whose tasks can sleep inside kernel code.
    linux: bool,
    /// The kernel's text (`_stext`..`_etext`), guest-physical: start, length.
    text: Option<(u64, u64)>,
}

impl View {
    fn new(g: &dyn Guest, k: &GuestKernel) -> Result<Self, PatchError> {
        // Where the kernel has its own top-level table only vCPU 0's paging
        // mode is needed (walking whatever table vCPU 0 is on would cost
        // pinning it and, in user mode with page-table isolation, comparing
        // what its two halves map: milliseconds under emulation).
        let tables = match k.symbols.lookup("init_top_pgt") {
            Ok(s) => PagingState {
                cr3: s.addr.wrapping_sub(k.text).wrapping_add(k.text_gpa),
                ..match k.mode.get() {
                    Some(m) => *m,
                    None => {
                        let m = kernel::paging_mode(g)?;
                        // Long mode: what a Linux kernel runs in from
                        // early boot until it stops.
                        if m.four_level() {
                            let _ = k.mode.set(m);
                        }
                        m
                    }
                }
            },
            Err(_) => kernel::kernel_paging(g)?,
        };
        // The kernel's text, where it is one physically contiguous run.
        let sym = |n: &str| k.symbols.all_named(n).first().map(|s| s.addr);
        let gpa = |va: u64| pagewalk::translate(g.ram(), tables, va).ok().map(|t| t.gpa);
        let text = match (sym("_stext"), sym("_etext")) {
            (Some(s), Some(e)) if e > s => match (gpa(s), gpa(e - 1)) {
                (Some(a), Some(b)) if b.checked_sub(a) == Some(e - 1 - s) => Some((a, e - s)),
                _ => None,
            },
            _ => None,
        };
        Ok(View {
            read: tables,
            tables,
            linux: k.symbols.lookup("init_task").is_ok(),
            text,
        })
    }

    /// The task layout and the paging to walk tasks through, where the
    /// kernel's BTF gave one.
    fn tasks<'k>(&self, k: &'k GuestKernel) -> Option<(&'k TaskLayout, PagingState)> {
        k.tasks.as_ref().ok().map(|l| (l, self.tables))
    }

    /// Whether a switch that checked `tasks_checked` sleeping tasks saw
    /// everything that can be inside kernel code: on Linux its sleeping
    /// tasks too; on the test kernel, whose tasks never sleep in kernel
    /// mode, the vCPUs.
    fn all_checked(&self, tasks_checked: Option<usize>) -> bool {
        tasks_checked.is_some() || !self.linux
    }

    /// Whether a switch will see everything that can be inside kernel
    /// code (see [`View::all_checked`]), known before it.
    fn can_check(&self, k: &GuestKernel) -> bool {
        !self.linux || self.tasks(k).is_some()
    }
}

/// A module a patch replaces functions of, as loaded in the guest now.
struct LoadedModule {
    info: crate::modules::ModuleInfo,
    symbols: Vec<crate::modules::ModuleSymbol>,
    /// Owner of the protections of the patch's jumps in it.
    owner: String,
    /// Guest-physical address of its `state` (watched: see
    /// [`crate::protect`]).
    state_gpa: u64,
}

/// The modules `lup` targets, each found live in the guest with the build
/// the patch was made for.
fn loaded_modules(
    g: &dyn Guest,
    k: &GuestKernel,
    lup: &Lup,
    coming: Option<u64>,
) -> Result<Vec<LoadedModule>, PatchError> {
    let m = &lup.manifest;
    let mut out = Vec::new();
    if m.modules.is_empty() {
        return Ok(out);
    }
    let err = |module: &str, why: String| {
        PatchError::Update(UpdateError::Module {
            patch: m.name.clone(),
            module: module.to_owned(),
            why,
        })
    };
    // Owners unique to this apply: a watch that saw an earlier instance of
    // the module go must not release this one's protections.
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let layout = k.modules.as_ref().map_err(|why| {
        err(
            &m.modules[0].name,
            format!("cannot be found: lucos cannot read this kernel's modules ({why})"),
        )
    })?;
    let all =
        crate::modules::list(g, layout).map_err(|e| err(&m.modules[0].name, e.to_string()))?;
    for t in &m.modules {
        let Some(info) = all.iter().find(|x| x.name == t.name) else {
            return Err(err(
                &t.name,
                "is not loaded in the guest (it was a moment ago: unloaded meanwhile?)".into(),
            ));
        };
        let is_coming = coming == Some(info.addr) && info.state == "coming";
        if info.state != "live" && !is_coming {
            return Err(err(
                &t.name,
                format!("is {} (being loaded or unloaded): try again", info.state),
            ));
        }
        let mut info = info.clone();
        if info.build_id.is_none() {
            info.build_id = crate::modules::scan_build_id(g, layout, &info);
        }
        match &info.build_id {
            None => {
                return Err(err(
                    &t.name,
                    "has no build-id note in its memory: lucos cannot tell its build".into(),
                ))
            }
            Some(id) if *id != t.build_id => {
                return Err(err(
                    &t.name,
                    format!(
                        "is another build: build-id {id} in the guest, the patch is for {}",
                        t.build_id
                    ),
                ))
            }
            Some(_) => {}
        }
        let symbols =
            crate::modules::symbols(g, layout, &info).map_err(|e| err(&t.name, e.to_string()))?;
        let state_va = layout.state_addr(&info);
        let state_gpa = pagewalk::translate(g.ram(), layout.paging, state_va)
            .map_err(|e| err(&t.name, format!("its state at {state_va:#x}: {e}")))?
            .gpa;
        out.push(LoadedModule {
            info,
            symbols,
            owner: module_owner(&m.name, &t.name, &tag),
            state_gpa,
        });
    }
    Ok(out)
}

/// The symbols the loaded modules other than `mods` export: (name, address).
fn other_exports(g: &dyn Guest, k: &GuestKernel, mods: &[LoadedModule]) -> Vec<(String, u64)> {
    let Ok(layout) = k.modules.as_ref() else {
        return Vec::new();
    };
    let Ok(all) = crate::modules::list(g, layout) else {
        return Vec::new();
    };
    all.iter()
        .filter(|m| m.state == "live" && !mods.iter().any(|l| l.info.addr == m.addr))
        .filter_map(|m| crate::modules::symbols(g, layout, m).ok())
        .flatten()
        .filter(|s| s.kind.is_ascii_uppercase())
        .map(|s| (s.name, s.addr))
        .collect()
}

/// Owner of the protections of a patch's jumps in module `module`,
/// applied with `tag` (unique per apply).
pub fn module_owner(patch: &str, module: &str, tag: &str) -> String {
    format!("{}@{module}/{tag}", patch_owner(patch))
}

/// An old function, found and checked (phase 2).
struct Old<'m> {
    f: &'m FunctionPatch,
    site: Site,
}

/// The patch's code, linked at its run of the area (phases 3 and 4).
struct Placed {
    /// Offset of the run in the area.
    start: u64,
    /// Bytes.
    need: u64,
    /// The area's mapping, when this patch is the first (planned only).
    mapping: Option<Mapping>,
    linked: Linked,
    /// New copies of the patch's data changes, after its code.
    data: Vec<PlacedData>,
}

/// Where one data change's copies are.
struct PlacedData {
    /// Old copy, guest-virtual and guest-physical.
    old_va: u64,
    old_gpa: u64,
    /// New copy: offset in the area, guest-virtual.
    new_offset: u64,
    new_va: u64,
    /// Kernel data words moved to the new copy.
    repointed: Vec<Repointed>,
    /// A change a cumulative patch carries over from the patch it replaces
    /// (copies, tracking and pointers as they are): its owner.
    carried: Option<String>,
    /// The owner of its copies' protections and tracking.
    owner: String,
}

/// What a switch changes of lucos's exception index (see
/// [`crate::extable`]), committed once it happened.
struct ExtableChange {
    /// The index after the switch.
    next: Option<crate::extable::Index>,
    /// A page of the area it takes (a new index).
    take: Option<u64>,
    /// A page it gives back (the last slot went, nothing can be in it).
    release: Option<u64>,
}

/// One site the switch writes, with what the state keeps of it.
struct SiteWrite {
    function: String,
    addr: u64,
    new_addr: u64,
    old_size: u64,
    /// What must be there now.
    now: [u8; 5],
    /// What is written.
    bytes: [u8; 5],
    /// What a revert of this patch puts back.
    restore: [u8; 5],
    leaving: Vec<Leaving>,
    /// The module it is in; none for vmlinux.
    module: Option<String>,
    /// Owner of the protection of its jump.
    owner: String,
}

impl Patcher {
    /// State for a VM, trusting `trusted` signing keys.
    pub fn new(trusted: Vec<VerifyingKey>) -> Self {
        Self::restore(
            trusted,
            PatchState {
                area_va: None,
                space: Space::new(PATCH_AREA_BYTES),
                applied: Vec::new(),
                held: Vec::new(),
                extables: None,
                kept_code: Vec::new(),
            },
        )
    }

    /// A patcher that goes on from `state` (saved by [`Patcher::state`]).
    pub fn restore(trusted: Vec<VerifyingKey>, state: PatchState) -> Self {
        Patcher {
            trusted,
            state,
            tracker: Default::default(),
            scan_backoff: Default::default(),
            kept_backoff: None,
        }
    }

    /// Keeps the copies of data changes coherent through `tracker`: the one
    /// the VM's write policy transfers with ([`crate::protect::GuardPolicy::data`]).
    pub fn with_data_tracker(mut self, tracker: std::sync::Arc<crate::data::DataTracker>) -> Self {
        self.tracker = tracker;
        self
    }

    /// The keys whose patches it accepts.
    pub fn trusted(&self) -> &[VerifyingKey] {
        &self.trusted
    }

    /// Everything a revert needs.
    pub fn state(&self) -> &PatchState {
        &self.state
    }

    /// Applied patches, oldest first.
    pub fn applied(&self) -> &[AppliedPatch] {
        &self.state.applied
    }

    /// Bytes of the patch area holding code (applied, or kept after a
    /// revert that could not prove it unused), and the area's size.
    pub fn area_usage(&self) -> AreaUsage {
        AreaUsage {
            used_bytes: self.state.space.in_use(),
            size_bytes: self.state.space.size,
        }
    }

    /// What the `patches` request answers: the stack, the kernel's text
    /// and, while the guest is paused (a running one changes them all the
    /// time), its page tables, hashed as they are in guest memory now; the
    /// area.
    pub fn list(&self, g: &dyn Guest, k: Option<&GuestKernel>) -> PatchList {
        // One read of vCPU 0's paging (a pause when running) for both.
        let view = k.and_then(|k| View::new(g, k).ok().map(|v| (k, v)));
        let mut patches = self.state.applied.clone();
        for a in &mut patches {
            // The `.lup` kept to hold a module's part again (hundreds of
            // KB of hex) is the VMM's own state, not listed.
            a.source = None;
            for d in &mut a.data {
                d.stats = self.tracker.stats(&d.owner_of(&a.name)).unwrap_or_default();
            }
        }
        PatchList {
            patches,
            kernel_text: view.and_then(|(k, v)| text_hash_in(g, k, v.read).ok()),
            kernel_page_tables: view
                .filter(|_| g.is_paused())
                .and_then(|(_, v)| tables_hash_in(g, &v).ok()),
            patch_area: self.area_usage(),
            protected: g.protections(),
            held: self
                .state
                .held
                .iter()
                .map(|h| HeldPatch {
                    lup: String::new(),
                    ..h.clone()
                })
                .collect(),
            exception_index: self.state.extables.as_ref().map(|ix| ExceptionIndex {
                hooked: crate::extable::HOOKED.into(),
                site: ix.site,
                page: self.state.area_va.unwrap_or(0) + ix.offset,
                patches: ix
                    .slots
                    .iter()
                    .filter(|&&c| c != 0)
                    .map(|&c| {
                        self.state
                            .applied
                            .iter()
                            .find(|a| a.code_addr == c)
                            .map(|a| a.name.clone())
                            .or_else(|| {
                                let kc = self.state.kept_code.iter().find(|x| x.code_addr == c);
                                kc.map(|x| format!("{} (replaced, kept)", x.patch))
                            })
                            .unwrap_or_else(|| format!("code at {c:#x}"))
                    })
                    .collect(),
            }),
            kept_code: self.state.kept_code.clone(),
        }
    }

    /// Whether some data change could retire (the background check has
    /// work): tracked, not retired, no kernel function outside its patch
    /// using the old copy.
    pub fn may_retire(&self) -> bool {
        !self.state.kept_code.is_empty()
            || self.state.applied.iter().any(|a| {
                a.data.iter().any(|d| {
                    let owner = d.owner_of(&a.name);
                    d.users_left.is_empty()
                        && self.tracker.get(&owner).is_some()
                        && !self.tracker.is_retired(&owner)
                        && !self.tracker.failed(&owner)
                })
            })
    }

    /// Retires every data change that can, each in one short pause (one
    /// try; a busy one is left for the next call): no kernel function
    /// outside the patch uses the old copy, and no vCPU (on Linux no
    /// sleeping task either) is in the old code of the functions the patch
    /// replaced, so nothing can use the old copy again. The old copy's
    /// protection is released in that pause (its pages are ordinary memory
    /// again), and the new copy's pages are opened to the guest's writes
    /// (no more traps, nothing transferred). Returns
    /// the changes retired now, as `PATCH:SYMBOL`.
    pub fn retire(&mut self, g: &dyn Guest, k: &GuestKernel) -> Result<Vec<String>, PatchError> {
        // (One does not hold the other back.)
        let done = self.retire_data(g, k);
        self.release_kept_code(g, k);
        done
    }

    /// The data changes of [`Patcher::retire`].
    fn retire_data(&mut self, g: &dyn Guest, k: &GuestKernel) -> Result<Vec<String>, PatchError> {
        let mut done = Vec::new();
        for a in &self.state.applied {
            for d in &a.data {
                let owner = d.owner_of(&a.name);
                // A failed transfer left the copies apart: the old one must
                // not be dropped as if it held nothing the new one lacks.
                if !d.users_left.is_empty()
                    || self.tracker.get(&owner).is_none()
                    || self.tracker.is_retired(&owner)
                    || self.tracker.failed(&owner)
                {
                    continue;
                }
                if k.symbols.lookup("init_task").is_ok() && k.tasks.is_err() {
                    // A Linux kernel whose sleeping tasks cannot be checked:
                    // never retire (and never pause to find that out).
                    continue;
                }
                let view = View::new(g, k)?;
                let page = crate::link::WRITABLE_ALIGN;
                let offset = d.new_addr - self.state.area_va.unwrap_or(0);
                // The new copy's pages become the guest's (no more traps).
                // A copy placed by an older lucos may share a page with
                // code: it stays trapped (its writes allowed, not
                // transferred).
                let (release, protect) = if offset % page == 0 {
                    (
                        vec![crate::data::old_owner(&owner), owner.clone()],
                        vec![Protection {
                            owner: owner.clone(),
                            label: format!("{} (new, retired)", d.symbol),
                            gpa: g.area().gpa + offset,
                            len: d.new_bytes.div_ceil(page) * page,
                            access: vmm_core::write_control::Access::Native,
                        }],
                    )
                } else {
                    (vec![crate::data::old_owner(&owner)], Vec::new())
                };
                // Nothing may be in the old code, nor hold a pointer into the
                // old copy (generic code that followed a repointed word).
                let old_copy = Leaving {
                    function: format!("{} (old copy)", d.symbol),
                    start: d.old_addr,
                    end: d.old_addr + d.old_bytes,
                    data: true,
                };
                let plan = Plan {
                    leaving: a
                        .functions
                        .iter()
                        .map(|f| Leaving {
                            function: format!("{} (old code)", f.function),
                            start: f.old_addr,
                            end: f.old_addr + f.old_size,
                            data: false,
                        })
                        .chain([old_copy])
                        // Code of replaced patches calls may still be in
                        // uses the old copy as it did.
                        .chain(self.kept_leaving())
                        .collect(),
                    release,
                    protect,
                    ..Plan::default()
                };
                // Memory is scanned only so often (see below).
                if self
                    .scan_backoff
                    .get(&owner)
                    .is_some_and(|(at, _)| Instant::now() < *at)
                {
                    continue;
                }
                // First, in a pause of its own, whether anything is still
                // in the old code or holds the old copy in a register or on
                // its stack: memory is scanned only when nothing is.
                let first = Plan {
                    leaving: plan.leaving.clone(),
                    ..Plan::default()
                };
                let busy = |e: SwitchError| match e {
                    SwitchError::Busy {
                        who,
                        active,
                        others,
                        ..
                    } => Ok(format!("{who} {active}{}", switch::also(&others))),
                    e => Err(PatchError::from(e)),
                };
                if let Err(e) = switch::switch_tries(g, view.tasks(k), &first, 1) {
                    self.tracker.waiting(&owner, busy(e)?);
                    continue;
                }
                // Pointers the kernel saved at run time: scanned for while
                // the guest runs, then in the retirement's pause the pages
                // written since ([`crate::pointers`]).
                let (targets, skip) = crate::pointers::targets(
                    g,
                    k,
                    view.tables,
                    view.text,
                    (d.old_addr, d.old_addr + d.old_bytes),
                    &format!("{} (old copy)", d.symbol),
                )
                .map_err(PatchError::Scan)?;
                let mut scan = crate::pointers::PointerScan::start(g, targets, skip)
                    .map_err(PatchError::Scan)?;
                let mut memory = crate::pointers::check(
                    &mut scan,
                    k,
                    view.tables,
                    view.tasks(k).map(|(l, _)| l),
                );
                let result = switch::switch_checked(g, view.tasks(k), &plan, 1, &mut memory);
                drop(memory);
                log::info!(
                    "{}: {} MiB of guest memory scanned for pointers into the old copy in {:.1} ms \
                     while the guest ran; in the pause: {}",
                    d.symbol,
                    scan.scanned.0 >> 20,
                    scan.scanned.1.as_secs_f64() * 1e3,
                    match scan.rescanned {
                        None => "not reached (something was in the old code)".to_owned(),
                        Some(None) => "all of it again (a slot changed)".to_owned(),
                        Some(Some(n)) => format!("{n} pages written since, again"),
                    }
                );
                self.tracker.scanned(
                    &owner,
                    crate::data::ScanStats {
                        bytes: scan.scanned.0,
                        running_us: scan.scanned.1.as_micros() as u64,
                        pause_pages: scan.rescanned.flatten().map(|n| n as u64),
                    },
                );
                drop(scan);
                match result {
                    Ok(switched) => {
                        self.scan_backoff.remove(&owner);
                        self.tracker
                            .retire(&owner, switched.pause.as_micros().max(1) as u64);
                        done.push(format!("{}:{}", a.name, d.symbol));
                    }
                    Err(e) => {
                        let in_memory = matches!(&e, SwitchError::Busy { who, .. } if who == crate::pointers::MEMORY);
                        self.tracker.waiting(&owner, busy(e)?);
                        // The next try scans all of memory again: not
                        // before 2 s; a pointer found in memory is seldom
                        // dropped soon, so after one the wait doubles each
                        // time, up to about a minute.
                        let wait = match self.scan_backoff.get(&owner) {
                            Some((_, w)) if in_memory => (*w * 2).min(MAX_SCAN_WAIT),
                            _ => Duration::from_secs(2),
                        };
                        self.scan_backoff
                            .insert(owner.clone(), (Instant::now() + wait, wait));
                    }
                }
            }
        }
        Ok(done)
    }

    /// Gives back the code of patches replaced in immediate mode that no
    /// vCPU or task is in any more ([`KeptCode`]), each after one short
    /// pause that finds nothing in it (its exception-table slot goes in
    /// that pause, and the protection of its own variables); a busy one is
    /// left for a later call (after 1 s, doubling while something stays in
    /// it, up to about a minute). Failures are logged, not returned.
    fn release_kept_code(&mut self, g: &dyn Guest, k: &GuestKernel) {
        if self.state.kept_code.is_empty()
            || self.kept_backoff.is_some_and(|(at, _)| Instant::now() < at)
            || (k.symbols.lookup("init_task").is_ok() && k.tasks.is_err())
        {
            return;
        }
        let view = match View::new(g, k) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("checking the code of replaced patches: {e}");
                return;
            }
        };
        let va = self.state.area_va.unwrap_or(0);
        let mut busy = false;
        let mut i = 0;
        while i < self.state.kept_code.len() {
            let kc = self.state.kept_code[i].clone();
            let mut plan = Plan {
                leaving: vec![kept_leaving(&kc)],
                release: vec![kept_own_owner(kc.code_addr)],
                ..Plan::default()
            };
            let tried = self
                .extable_plan(g, k, &view, None, &[kc.code_addr], &mut plan)
                .and_then(|ex| Ok((switch::switch_tries(g, view.tasks(k), &plan, 1)?, ex)));
            match tried {
                Ok((s, ex)) => {
                    self.commit_extable(ex);
                    if view.all_checked(s.tasks_checked) {
                        self.state.kept_code.remove(i);
                        give_back_runs(&mut self.state, &kc, va);
                        log::info!(
                            "code of replaced patch {} given back: nothing is in it",
                            kc.patch
                        );
                        continue;
                    }
                }
                Err(PatchError::Busy { .. }) => busy = true,
                Err(e) => {
                    busy = true;
                    log::warn!("checking the code of replaced patch {}: {e}", kc.patch);
                }
            }
            i += 1;
        }
        self.kept_backoff = busy.then(|| {
            let wait = self
                .kept_backoff
                .map_or(Duration::from_secs(1), |(_, w)| (w * 2).min(MAX_SCAN_WAIT));
            (Instant::now() + wait, wait)
        });
    }

    /// The code of replaced patches kept, as code a switch must find
    /// nothing in (one that frees what it uses, or gives it back).
    fn kept_leaving(&self) -> Vec<Leaving> {
        self.state.kept_code.iter().map(kept_leaving).collect()
    }

    /// Makes `plan` a switch that finds nothing in the kept code and
    /// releases its variables' pages ([`Self::give_back_kept`] after it).
    fn wait_for_kept(&self, plan: &mut Plan) {
        plan.leaving.extend(self.kept_leaving());
        let kept = self.state.kept_code.iter();
        plan.release
            .extend(kept.map(|c| kept_own_owner(c.code_addr)));
    }

    /// After a switch that found nothing in any kept code (it waited for
    /// [`Self::kept_leaving`], its exception-table slots freed and the
    /// protections of its variables released in it): every kept run given
    /// back, or to the applied patch whose carried copy it holds.
    fn give_back_kept(&mut self) {
        let va = self.state.area_va.unwrap_or(0);
        for kc in std::mem::take(&mut self.state.kept_code) {
            give_back_runs(&mut self.state, &kc, va);
        }
        self.kept_backoff = None;
    }

    /// Applies the `.lup` at `path` to the running kernel `k`; with
    /// `replace`, it replaces every applied patch (a cumulative patch).
    pub fn apply(
        &mut self,
        g: &dyn Guest,
        k: &GuestKernel,
        path: &Path,
        replace: bool,
    ) -> Result<PatchReport, PatchError> {
        self.apply_as(g, k, path, replace, None)
    }

    /// [`Patcher::apply`] in `mode`, or the patch's own mode when `None`.
    pub fn apply_as(
        &mut self,
        g: &dyn Guest,
        k: &GuestKernel,
        path: &Path,
        replace: bool,
        mode: Option<Mode>,
    ) -> Result<PatchReport, PatchError> {
        let t0 = Instant::now();
        let mut pre = switch::PreparePhases::default();
        let mut lap = Instant::now();
        let mut took = || {
            let us = lap.elapsed().as_secs_f64() * 1e6;
            lap = Instant::now();
            us
        };
        if let Err(e) = self.reconcile_modules(g, k) {
            log::warn!("checking patched modules: {e}");
        }
        pre.modules_us += took();
        let what = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| UpdateError::Io {
            what: format!("cannot read {what}"),
            source,
        })?;
        let parsed = Lup::parse(&bytes, &what)?;
        pre.read_us += took();
        let lup = self.verify(parsed, &what, k, replace)?;
        pre.verify_us += took();
        let missing = self.missing_modules(g, k, &lup, replace)?;
        pre.modules_us += took();
        if missing.is_empty() {
            return self.apply_lup(g, k, &lup, &bytes, (replace, mode), None, None, (t0, pre));
        }
        let m = &lup.manifest;
        let name = m.name.clone();
        let mode = mode.unwrap_or(m.mode);
        let vmlinux = m.functions.iter().any(|f| f.module.is_none());
        let present: Vec<String> = m
            .modules
            .iter()
            .map(|t| t.name.clone())
            .filter(|t| !missing.contains(t))
            .collect();
        // A patch of one module that is not loaded is held whole; a patch
        // of other objects too is applied without the missing modules, and
        // each one's part is held (`NAME@MODULE`) until it loads.
        let whole = !vmlinux && present.is_empty() && missing.len() == 1;
        if whole && !m.depends.is_empty() {
            return Err(UpdateError::Stack(format!(
                "patch '{name}' depends on {} and its module {} is not loaded: a held patch \
                 cannot depend on others (load the module first)",
                m.depends.join(", "),
                missing[0]
            ))
            .into());
        }
        // The missing modules' parts are held, and the list watched, first:
        // a module the guest loads from now on is seen whatever the rest does.
        let held_names: Vec<String> = missing
            .iter()
            .map(|module| {
                if whole {
                    name.clone()
                } else {
                    format!("{name}@{module}")
                }
            })
            .collect();
        for (module, held) in missing.iter().zip(&held_names) {
            self.state.held.push(HeldPatch {
                name: held.clone(),
                description: m.description.clone(),
                version: m.version,
                module: module.clone(),
                part: (!whole).then(|| module.clone()),
                mode,
                lup: to_hex(&bytes),
                coming: None,
                last_error: None,
            });
        }
        let unhold = |p: &mut Self| {
            p.state.held.retain(|h| !held_names.contains(&h.name));
            if let Err(e) = p.sync_watches(g, k) {
                log::warn!("patch {name}: {e}");
            }
        };
        if let Err(e) = self.sync_watches(g, k) {
            unhold(self);
            return Err(e);
        }
        // A module that came in before the watch did.
        match self.catch_up(g, k) {
            Ok(said) => said.iter().for_each(|x| log::info!("{x}")),
            Err(e) => log::warn!("looking for held patches' modules: {e}"),
        }
        let mut report = if whole {
            PatchReport {
                name: name.clone(),
                mode,
                functions: Vec::new(),
                pause_us: 0.0,
                tries: 0,
                sleeping_tasks_checked: None,
                total_us: 0.0,
                pause_phases: None,
                prepare_phases: Some(pre),
                waiting_for: None,
            }
        } else {
            let now = lup.part(&name, &present, true);
            match self.apply_lup(
                g,
                k,
                &now,
                &bytes,
                (replace, Some(mode)),
                None,
                None,
                (t0, pre),
            ) {
                Ok(r) => r,
                Err(e) => {
                    // Nothing of it stays: its held parts go (a part that
                    // the catch-up applied meanwhile is reverted).
                    for held in &held_names {
                        if self.state.applied.iter().any(|a| &a.name == held) {
                            if let Err(e) = self.revert_one(g, k, held) {
                                log::warn!("patch {name}: taking back {held}: {e}");
                            }
                        }
                    }
                    unhold(self);
                    return Err(e);
                }
            }
        };
        report.waiting_for = Some(missing.join(", "));
        report.total_us = t0.elapsed().as_secs_f64() * 1e6;
        Ok(report)
    }

    /// Applies the verified `lup` (whose file is `bytes`; `part` when `lup`
    /// is that file's part for one module); `coming` is the `struct module`
    /// of a module being loaded it may be applied to.
    #[allow(clippy::too_many_arguments)]
    fn apply_lup(
        &mut self,
        g: &dyn Guest,
        k: &GuestKernel,
        lup: &Lup,
        bytes: &[u8],
        (replace, mode): (bool, Option<Mode>),
        part: Option<&str>,
        coming: Option<u64>,
        (t0, mut pre): (Instant, switch::PreparePhases),
    ) -> Result<PatchReport, PatchError> {
        let mode = mode.unwrap_or(lup.manifest.mode);
        let mut lap = Instant::now();
        let mut took = || {
            let us = lap.elapsed().as_secs_f64() * 1e6;
            lap = Instant::now();
            us
        };
        let view = View::new(g, k)?;
        let mods = loaded_modules(g, k, lup, coming)?;
        pre.modules_us += took();
        let olds = self.resolve(g, k, &view, lup, &mods)?;
        pre.resolve_us += took();
        let placed = self.place(g, k, &view, lup, (&mods, replace))?;
        pre.place_us += took();
        let (mut plan, sites) = self.plan(g, &view, lup, &olds, &placed, (replace, mode, &mods))?;
        // The patch's exception table, known to the kernel through lucos's
        // index; a cumulative patch's predecessors give theirs back where
        // their code is released (as `commit_apply` decides).
        // (In immediate mode, the code of the replaced patches whose data
        // changes it undoes: the switch waits for that to be left.)
        // The kept code of patches replaced before goes too when this
        // switch waits for it (see `plan`).
        let undone = self.undone_changes(&lup.manifest, replace);
        let frees_kept = replace && (mode == Mode::Consistent || !undone.is_empty());
        let freeing: Vec<u64> = if replace && view.can_check(k) {
            self.state
                .applied
                .iter()
                .filter(|a| {
                    mode == Mode::Consistent || undone.iter().any(|(u, _)| u.name == a.name)
                })
                .map(|a| a.code_addr)
                .chain(
                    self.state
                        .kept_code
                        .iter()
                        .filter(|_| frees_kept)
                        .map(|c| c.code_addr),
                )
                .collect()
        } else {
            Vec::new()
        };
        let adding = placed.linked.extable.is_some().then_some(&placed);
        let ex = self.extable_plan(g, k, &view, adding, &freeing, &mut plan)?;
        // C transfer functions: linked for the sandbox and run over the
        // object as it is now, before any pause.
        let runners = self.c_runners(g, lup, &placed)?;
        // (A change undone first has its own, set by the plan.)
        for copy in plan.copies.iter_mut().filter(|c| c.to_new) {
            copy.c = runners
                .iter()
                .find(|(s, _)| *s == copy.change.symbol)
                .and_then(|(_, r)| r.clone());
        }
        // Tracked before the pause that protects the copies: the policy
        // transfers from the first trapped write on.
        let area_gpa = g.area().gpa;
        let owners: Vec<String> = lup
            .manifest
            .data
            .iter()
            .zip(&placed.data)
            .zip(runners)
            .filter(|((_, p), _)| p.carried.is_none())
            .map(|((d, p), (_, runner))| {
                let owner = p.owner.clone();
                self.tracker.add(
                    crate::data::Tracked::new(
                        owner.clone(),
                        d.clone(),
                        p.old_gpa,
                        area_gpa + p.new_offset,
                    )
                    .with_c(runner, &lup.objects),
                );
                owner
            })
            .collect();
        // From the first patch of kernel text on, all of the text stays in
        // a read-only slot whose writes are relayed as the guest makes them
        // (the kernel's own text patching): later jumps are protected and
        // released without a change of memory slots, which would cost their
        // pauses and then the guest (KVM rebuilds its second-level mappings
        // of the slots it replaces). That first change of slots (12-22 ms
        // in the emulated host) has a short pause of its own before the
        // switch, which it need not be atomic with (the relay passes the
        // guest's writes on as it makes them); a refused switch takes it
        // back.
        pre.plan_us += took();
        let vmlinux_site = sites.iter().any(|s| s.module.is_none() && s.new_addr != 0);
        let relay: Vec<Protection> = match view.text {
            Some((gpa, len))
                if vmlinux_site && !g.protections().iter().any(|p| p.owner == TEXT_RELAY_OWNER) =>
            {
                vec![Protection {
                    owner: TEXT_RELAY_OWNER.into(),
                    label: "kernel text (relayed)".into(),
                    gpa,
                    len,
                    access: vmm_core::write_control::Access::Relayed,
                }]
            }
            _ => Vec::new(),
        };
        if !relay.is_empty() {
            if let Err(e) = change_protection(g, &[], &relay) {
                for o in &owners {
                    self.tracker.remove(o);
                }
                return Err(match e {
                    PatchError::Switch(why) => PatchError::Switch(format!(
                        "write control: relaying the kernel text: {why}"
                    )),
                    other => other,
                });
            }
        }
        pre.relay_us += took();
        // The new copies of the changes it undoes go: nothing may hold a
        // pointer into one, saved in memory at run time (as at a revert),
        // but what goes with them (their patch's run, the words moved back).
        let area = g.area();
        let area_va = self.state.area_va.unwrap_or(0);
        let in_area = |at: u64, n: u64| {
            let gpa = area.gpa + at.wrapping_sub(area_va);
            (gpa, gpa + n)
        };
        let mut targets = Vec::new();
        let mut skip: Vec<(u64, u64)> = view.text.map(|(a, n)| (a, a + n)).into_iter().collect();
        let mut undone_owners = Vec::new();
        // Runs that a replaced patch holds for changes it carried over and
        // that hold no copy still carried: they go whole.
        let kept: Vec<u64> = placed
            .data
            .iter()
            .filter(|p| p.carried.is_some())
            .map(|p| p.new_va)
            .collect();
        for a in self.state.applied.iter().filter(|_| replace) {
            for &run in &a.held_runs {
                let Some(len) = self.state.space.len_of(run) else {
                    continue;
                };
                let (start, end) = (area_va + run, area_va + run + len);
                if !kept.iter().any(|&at| at >= start && at < end) {
                    skip.push(in_area(start, len));
                }
            }
        }
        // Kept code the switch waits for, and its runs, go too (but a
        // copy still carried over that one holds).
        for c in self.state.kept_code.iter().filter(|_| frees_kept) {
            let runs = std::iter::once((c.code_addr, c.code_bytes)).chain(
                c.held_runs
                    .iter()
                    .filter_map(|&r| Some((area_va + r, self.state.space.len_of(r)?))),
            );
            for (start, len) in runs {
                if !kept.iter().any(|&at| at >= start && at < start + len) {
                    skip.push(in_area(start, len));
                }
            }
        }
        for &(a, d) in &undone {
            targets.push((
                d.new_addr,
                d.new_addr + d.new_bytes,
                format!("{} (new copy of patch {})", d.symbol, a.name),
            ));
            // Its patch's code and read-only data go with it; its variables
            // (a cumulative patch may carry their values over) and any copy
            // carried over stay, and are scanned.
            skip.push(in_area(d.new_addr, d.new_bytes));
            skip.push(in_area(a.code_addr, a.code_len.min(a.code_bytes)));
            skip.extend(d.repointed.iter().map(|r| (r.gpa, r.gpa + 8)));
            undone_owners.push(d.owner_of(&a.name));
        }
        let scan = (!targets.is_empty()).then_some((targets, skip));
        let switched = match self.switch_code(g, k, &view, &placed, &plan, scan) {
            Ok(s) => s,
            Err(e) => {
                for o in &owners {
                    self.tracker.remove(o);
                }
                // All or nothing: the relay made for this patch goes too.
                if !relay.is_empty() {
                    if let Err(r) = change_protection(g, &[TEXT_RELAY_OWNER.to_owned()], &[]) {
                        log::error!("giving back the kernel text's relay: {r}");
                    }
                }
                return Err(e);
            }
        };
        // Patches applied earlier whose code uses a changed object keep
        // using its old copy: the change must not retire under them.
        // (A cumulative patch replaces them all.)
        let earlier: Vec<Vec<String>> = placed
            .data
            .iter()
            .zip(&lup.manifest.data)
            .map(|(p, d)| {
                if replace {
                    Vec::new()
                } else {
                    self.patches_using(g, (p.old_va, p.old_va + d.old_bytes()), d.old_size)
                }
            })
            .collect();
        // The undone changes are no longer tracked.
        for o in &undone_owners {
            self.tracker.remove(o);
            self.scan_backoff.remove(o);
        }
        // Kept code the switch found nothing in goes, once the new patch
        // is committed (a run holding a copy it carries goes to it).
        let waited = if frees_kept && view.all_checked(switched.tasks_checked) {
            std::mem::take(&mut self.state.kept_code)
        } else {
            Vec::new()
        };
        let name = lup.manifest.name.clone();
        let mut report = self.commit_apply(lup, placed, sites, switched, &view, replace, mode, t0);
        let va = self.state.area_va.unwrap_or(0);
        for kc in &waited {
            give_back_runs(&mut self.state, kc, va);
        }
        report.prepare_phases = Some(pre);
        self.commit_extable(ex);
        let m = &lup.manifest;
        if let Some(a) = self.state.applied.iter_mut().find(|a| a.name == name) {
            a.source = (!m.modules.is_empty()).then(|| to_hex(bytes));
            a.part = part.map(str::to_owned);
            a.modules = mods
                .iter()
                .map(|m| AppliedModule {
                    name: m.info.name.clone(),
                    build_id: m.info.build_id.clone().unwrap_or_default(),
                    addr: m.info.addr,
                    owner: m.owner.clone(),
                    status: ObjectStatus::Applied,
                    freed: false,
                })
                .collect();
        }
        if let Some(a) = self.state.applied.iter_mut().find(|a| a.name == name) {
            for (d, users) in a.data.iter_mut().zip(earlier) {
                d.users_left.extend(users);
                // (A `.lup` from before lucos looked for exports.)
                if let Some(u) = crate::data::exported_user(&k.symbols, &d.symbol) {
                    if !d.users_left.contains(&u) {
                        d.users_left.push(u);
                    }
                }
            }
        }
        Ok(report)
    }

    /// For each data change a cumulative patch declares (`m.data`), the
    /// applied change it carries over as it is (its owner, and the change
    /// as applied), if any: the same declaration, unless that change has
    /// retired and the cumulative patch leaves kernel code using the old
    /// layout (the old copy is no longer kept: the change is made anew).
    fn carried_changes(
        &self,
        m: &crate::lup::Manifest,
        replace: bool,
    ) -> Vec<Option<(String, &AppliedData)>> {
        m.data
            .iter()
            .map(|n| {
                if !replace {
                    return None;
                }
                let (a, d) =
                    self.state.applied.iter().find_map(|a| {
                        a.data.iter().find(|x| x.symbol == n.symbol).map(|x| (a, x))
                    })?;
                let same = d.change.as_ref().is_some_and(|c| differs(c, n).is_none());
                let owner = d.owner_of(&a.name);
                let retired_under_users =
                    self.tracker.is_retired(&owner) && !n.users_left.is_empty();
                (same && !retired_under_users).then_some((owner, d))
            })
            .collect()
    }

    /// The data changes of the patches a cumulative patch (`m`) replaces
    /// that it does not carry over (see [`Self::carried_changes`]), with
    /// the patch that made each: undone in its switch, the old copy made
    /// again from the new one, which goes; a change it declares otherwise
    /// is then made anew from the old copy.
    fn undone_changes(
        &self,
        m: &crate::lup::Manifest,
        replace: bool,
    ) -> Vec<(&AppliedPatch, &AppliedData)> {
        if !replace {
            return Vec::new();
        }
        let carried = self.carried_changes(m, true);
        self.state
            .applied
            .iter()
            .flat_map(|a| a.data.iter().map(move |d| (a, d)))
            .filter(|(a, d)| {
                let owner = d.owner_of(&a.name);
                !carried.iter().flatten().any(|(o, _)| *o == owner)
            })
            .collect()
    }

    /// Applied patches whose code refers to `[start, end)`, as `patch NAME`.
    fn patches_using(&self, g: &dyn Guest, (start, end): (u64, u64), elem: u64) -> Vec<String> {
        let Some(va) = self.state.area_va else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for a in &self.state.applied {
            let mut code = vec![0u8; a.code_bytes as usize];
            if g.area_read(a.code_addr - va, &mut code).is_err() {
                continue;
            }
            let image = symbol_db::KernelImage::new(a.code_addr, code);
            let f = [(a.name.clone(), a.code_addr, a.code_bytes)];
            // Its code, or its read-only data (a table holding `&obj`).
            if !crate::data::users_of(&image, &f, (start, end), elem).is_empty()
                || !crate::data::data_pointers(&image, &[], start, end).is_empty()
            {
                out.push(format!("patch {}", a.name));
            }
        }
        out
    }

    /// The C transfer functions of `lup`'s data changes (symbol, runner),
    /// each tried in both directions on every element of its object as it
    /// is now: one that faults or runs away is refused before any pause.
    /// An object holding a pointer into itself is refused too.
    #[allow(clippy::type_complexity)]
    fn c_runners(
        &self,
        g: &dyn Guest,
        lup: &Lup,
        placed: &Placed,
    ) -> Result<Vec<(String, Option<std::sync::Arc<crate::transfer::CRunner>>)>, PatchError> {
        let refused = |why: String| PatchError::Update(UpdateError::Data(why));
        let mut out = Vec::new();
        for (d, p) in lup.manifest.data.iter().zip(&placed.data) {
            // A change carried over keeps the functions it was applied with.
            if p.carried.is_some() {
                out.push((d.symbol.clone(), None));
                continue;
            }
            let mut old = vec![0u8; d.old_bytes() as usize];
            g.ram()
                .read_phys(p.old_gpa, &mut old)
                .map_err(|e| refused(format!("reading {}: {e}", d.symbol)))?;
            // (Words the kernel set at run time; its initial ones were
            // checked by `lucos build`.)
            d.check_self_pointers(&old, p.old_va).map_err(refused)?;
            let Some(r) = crate::transfer::CRunner::new(d, &lup.objects).map_err(refused)? else {
                out.push((d.symbol.clone(), None));
                continue;
            };
            r.dry_run(d, &old).map_err(refused)?;
            out.push((d.symbol.clone(), Some(std::sync::Arc::new(r))));
        }
        Ok(out)
    }

    /// Phase 1: the file, its signature, its target, the stack rules.
    fn verify(
        &self,
        lup: Lup,
        what: &str,
        k: &GuestKernel,
        replace: bool,
    ) -> Result<Lup, PatchError> {
        lup.verify(&self.trusted, what)?;
        lup.check_target(&k.identity)?;
        let m = &lup.manifest;
        let stack_err = |s: String| PatchError::Update(UpdateError::Stack(s));
        if !replace && self.state.applied.iter().any(|a| a.name == m.name) {
            return Err(stack_err(format!(
                "a patch named '{}' is already applied",
                m.name
            )));
        }
        if let Some(h) = self.state.held.iter().find(|h| h.name == m.name) {
            return Err(stack_err(format!(
                "a patch named '{}' is already held for module {}",
                m.name, h.module
            )));
        }
        if replace
            && (!m.modules.is_empty()
                || !self.state.held.is_empty()
                || self.state.applied.iter().any(|a| !a.modules.is_empty()))
        {
            return Err(stack_err(format!(
                "patch '{}': a cumulative (--replace) patch cannot yet cover modules or replace \
                 patches of modules (applied or held); revert those first",
                m.name
            )));
        }
        // A cumulative patch carries each data change of the patches it
        // replaces over as it is (its copies, their tracking, the pointers
        // moved to the new copy) when it declares the same change; one it
        // declares otherwise, or not at all, is undone in its switch (the
        // old layout made again from the new copy) and, if declared, made
        // anew from there: both need the change as it was applied.
        if replace {
            let carried = self.carried_changes(m, true);
            for a in &self.state.applied {
                for d in &a.data {
                    let Some(change) = &d.change else {
                        return Err(stack_err(format!(
                            "patch '{}' changed {} but this lucos does not know how (restored \
                             state): it cannot be carried over or undone; revert '{}' first",
                            a.name, d.symbol, a.name
                        )));
                    };
                    let owner = d.owner_of(&a.name);
                    let kept = carried.iter().flatten().any(|(o, _)| *o == owner);
                    if !kept && change.c.is_some() && self.tracker.c_runner(&owner).is_none() {
                        return Err(stack_err(format!(
                            "patch '{}' changed {} with C transfer functions this VMM does not \
                             hold (restored state): it cannot be undone; revert '{}' first",
                            a.name, d.symbol, a.name
                        )));
                    }
                }
            }
        }
        for (i, d) in m.data.iter().enumerate() {
            if m.data[..i].iter().any(|x| x.symbol == d.symbol) {
                return Err(stack_err(format!(
                    "patch '{}' changes {} twice",
                    m.name, d.symbol
                )));
            }
        }
        for d in &m.data {
            if let Some(a) = self
                .state
                .applied
                .iter()
                .find(|a| !replace && a.data.iter().any(|x| x.symbol == d.symbol))
            {
                return Err(stack_err(format!(
                    "{} already has a new layout from patch '{}': revert it first, or give \
                     this layout in a cumulative patch (--replace), which undoes that change \
                     and makes its own in one switch",
                    d.symbol, a.name
                )));
            }
        }
        for d in &m.depends {
            if replace || !self.state.applied.iter().any(|a| &a.name == d) {
                return Err(stack_err(format!(
                    "patch '{}' depends on '{d}', which is not applied",
                    m.name
                )));
            }
        }
        Ok(lup)
    }

    /// Phase 2: each old function in the running kernel, its bytes checked.
    fn resolve<'m>(
        &self,
        g: &dyn Guest,
        k: &GuestKernel,
        view: &View,
        lup: &'m Lup,
        mods: &[LoadedModule],
    ) -> Result<Vec<Old<'m>>, PatchError> {
        let m = &lup.manifest;
        let mut olds = Vec::new();
        for f in &m.functions {
            if let Some(module) = &f.module {
                olds.push(self.resolve_in_module(g, view, lup, f, module, mods)?);
                continue;
            }
            let sym = match &f.old_file {
                Some(file) => k.symbols.lookup_in(&f.old, file),
                None => k.symbols.reference(&f.old),
            }
            .map_err(|e| UpdateError::Symbol {
                patch: m.name.clone(),
                why: e.to_string(),
            })?;
            if self
                .state
                .extables
                .as_ref()
                .is_some_and(|ix| ix.site == sym.addr)
            {
                return Err(UpdateError::UnsafeSite {
                    function: f.old.clone(),
                    addr: sym.addr,
                    why: format!(
                        "its entry jumps to lucos's exception index ({}), which the applied \
                         patches with exception-table entries need",
                        crate::extable::OWNER
                    ),
                }
                .into());
            }
            let mut code = vec![0u8; f.old_size as usize];
            kernel::read_virt(g, view.read, sym.addr, &mut code)?;
            // A site we already patched: compare the original bytes.
            if let Some(original) = self.original_bytes(sym.addr) {
                code[..TRAMPOLINE_LEN].copy_from_slice(&original);
            }
            let mismatch = |why: String| UpdateError::OldBytesMismatch {
                patch: m.name.clone(),
                function: f.old.clone(),
                why,
            };
            if sym.size != 0 && sym.size != f.old_size {
                return Err(mismatch(format!(
                    "it is {} bytes in the running kernel, {} in the patch's target",
                    sym.size, f.old_size
                ))
                .into());
            }
            // KASLR moved the kernel by `slide`; the patch's hash is of the
            // file, with the sites the kernel rewrites itself masked.
            let got = old_code_sha256(&code, &f.old_masked, &f.old_relocs, k.slide as u64)
                .map_err(|why| {
                    mismatch(format!("the patch's description of it is wrong: {why}"))
                })?;
            if got != f.old_sha256 {
                return Err(mismatch(
                    "its bytes in guest memory differ from the build the patch was made for".into(),
                )
                .into());
            }
            let site = trampoline::check_site(&f.old, sym.addr, &code)?;
            olds.push(Old { f, site });
        }
        Ok(olds)
    }

    /// Phase 2 for a function of a module: found in the module's own symbol
    /// table, its bytes checked with every relocated field and every site
    /// the kernel rewrites masked (the patch recorded them from the `.ko`).
    fn resolve_in_module<'m>(
        &self,
        g: &dyn Guest,
        view: &View,
        lup: &'m Lup,
        f: &'m FunctionPatch,
        module: &str,
        mods: &[LoadedModule],
    ) -> Result<Old<'m>, PatchError> {
        let name = &lup.manifest.name;
        let loaded = mods.iter().find(|l| l.info.name == module).ok_or_else(|| {
            UpdateError::Stack(format!("patch '{name}': module {module} not found"))
        })?;
        let sym = crate::modules::symbol_named(&loaded.symbols, module, &f.old).map_err(|why| {
            UpdateError::Symbol {
                patch: name.clone(),
                why,
            }
        })?;
        let mismatch = |why: String| UpdateError::OldBytesMismatch {
            patch: name.clone(),
            function: format!("{}@{module}", f.old),
            why,
        };
        if !matches!(sym.kind, 't' | 'T') {
            return Err(
                mismatch(format!("it is not code in the module (type {})", sym.kind)).into(),
            );
        }
        // Only the module's core text: init code is freed after the load.
        let core = loaded.info.base..loaded.info.base + loaded.info.text_size;
        if !core.contains(&sym.addr) || !core.contains(&(sym.addr + f.old_size.max(1) - 1)) {
            return Err(mismatch(format!(
                "it lies outside the module's core text ({:#x}..{:#x}): init code, freed once \
                 the module is loaded, is never patched",
                core.start, core.end
            ))
            .into());
        }
        if sym.size != 0 && sym.size != f.old_size {
            return Err(mismatch(format!(
                "it is {} bytes in the loaded module, {} in the patch's target",
                sym.size, f.old_size
            ))
            .into());
        }
        let mut code = vec![0u8; f.old_size as usize];
        kernel::read_virt(g, view.read, sym.addr, &mut code)?;
        if let Some(original) = self.original_bytes(sym.addr) {
            code[..TRAMPOLINE_LEN].copy_from_slice(&original);
        }
        let got = old_code_sha256(&code, &f.old_masked, &f.old_relocs, 0)
            .map_err(|why| mismatch(format!("the patch's description of it is wrong: {why}")))?;
        if got != f.old_sha256 {
            return Err(mismatch(
                "its bytes in guest memory differ from the module build the patch was made for"
                    .into(),
            )
            .into());
        }
        let site = trampoline::check_site(&f.old, sym.addr, &code)?;
        Ok(Old { f, site })
    }

    /// Phases 3 and 4: link at the area's base to learn the size (the layout
    /// does not depend on the base), find a free aligned run, link there.
    fn place(
        &self,
        g: &dyn Guest,
        k: &GuestKernel,
        view: &View,
        lup: &Lup,
        (mods, replace): (&[LoadedModule], bool),
    ) -> Result<Placed, PatchError> {
        let (mapping, va) = match self.state.area_va {
            Some(va) => (None, va),
            None => {
                let m =
                    area::plan_mapping(g.ram(), view.tables, g.area()).map_err(PatchError::Map)?;
                (Some(m), m.va)
            }
        };
        let changes = &lup.manifest.data;
        // New copies of changed data follow the code, each on pages of its
        // own (trapped while tracked, written natively once retired); the
        // new code refers to them instead of the old objects.
        let page = crate::link::WRITABLE_ALIGN;
        // A cumulative patch links against the new copies of the changes
        // it carries over (their owner and place as applied).
        let carried = self.carried_changes(&lup.manifest, replace);
        let mut data_off = Vec::new();
        let mut data_need = 0;
        for (d, c) in changes.iter().zip(&carried) {
            data_off.push(data_need);
            if c.is_none() {
                data_need += d.new_bytes().div_ceil(page) * page;
            }
        }
        // (A cumulative patch replaces every patch: what it does not
        // declare is undone in its switch.)
        let changed_by: Vec<(String, String)> = self
            .state
            .applied
            .iter()
            .filter(|_| !replace)
            .flat_map(|a| a.data.iter().map(|d| (d.symbol.clone(), a.name.clone())))
            .collect();
        // Exported symbols of the other loaded modules, read once if a
        // module's patch object needs one.
        let others: std::cell::OnceCell<Vec<(String, u64)>> = std::cell::OnceCell::new();
        let exported = |s: &str| -> Option<u64> {
            let all = others.get_or_init(|| other_exports(g, k, mods));
            all.iter().find(|(n, _)| n == s).map(|&(_, a)| a)
        };
        let resolve_with = |data_base: u64| {
            let changed_by = &changed_by;
            let data_off = &data_off;
            let carried = &carried;
            let exported = &exported;
            move |object: &str, s: &str| -> Result<u64, String> {
                // An object linked against a module: the module's own
                // symbols first (its statics too), then the kernel's, then
                // what other modules export.
                if let Some(t) = lup.manifest.module_of_object(object) {
                    if let Some(l) = mods.iter().find(|l| l.info.name == t.name) {
                        // `NAME#N`: the N-th of the module's symbols of that
                        // name in address order (lucos build found which).
                        if let Some((name, n)) = symbol_db::split_reference(s) {
                            let mut all: Vec<u64> = l
                                .symbols
                                .iter()
                                .filter(|x| x.name == name)
                                .map(|x| x.addr)
                                .collect();
                            all.sort_unstable();
                            return all.get(n).copied().ok_or_else(|| {
                                format!(
                                    "the patch needs {s}, but module {} has {} symbols named {name}",
                                    t.name,
                                    all.len()
                                )
                            });
                        }
                        let mut named = l.symbols.iter().filter(|x| x.name == s);
                        match (named.next(), named.next()) {
                            (Some(x), None) => return Ok(x.addr),
                            (Some(_), Some(_)) => {
                                return Err(format!(
                                    "the patch needs {s}, which module {} has more than once",
                                    t.name
                                ))
                            }
                            (None, _) => {}
                        }
                        if let Ok(x) = k.symbols.reference(s) {
                            return Ok(x.addr);
                        }
                        return exported(s).ok_or_else(|| {
                            format!(
                                "the patch needs {s}: neither module {}, the kernel nor another \
                                 loaded module has it",
                                t.name
                            )
                        });
                    }
                }
                if let Some(i) = changes.iter().position(|d| d.symbol == s) {
                    if let Some((_, applied)) = &carried[i] {
                        return Ok(applied.new_addr);
                    }
                    return Ok(data_base + data_off[i]);
                }
                if let Some(a) = changed_by.iter().find(|(sym, _)| sym == s) {
                    return Err(format!(
                        "the patch uses {s}, whose layout patch '{}' changed: build it against \
                         that layout into a patch that replaces it",
                        a.1
                    ));
                }
                k.symbols
                    .reference(s)
                    .map(|x| x.addr)
                    .map_err(|e| format!("the patch needs {s}: {e}"))
            }
        };
        // Alternatives are applied for the features the kernel has now (its
        // boot_cpu_data), as the kernel does for a module it loads.
        let cpu_has = |bit: u16| -> Result<bool, String> {
            match &k.cpu_caps {
                Ok(caps) => caps.has(g, view.read, bit),
                Err(why) => Err(format!(
                    "the running kernel's CPU features are not known: {why}"
                )),
            }
        };
        let at_base = link_objects(&lup.objects, va, &resolve_with(va), &cpu_has)?;
        let code = (at_base.bytes.len() as u64).div_ceil(page) * page;
        let (need, align) = if changes.is_empty() {
            (
                at_base.bytes.len() as u64,
                crate::link::alignment(&lup.objects),
            )
        } else {
            (
                code + data_need,
                crate::link::alignment(&lup.objects).max(page),
            )
        };
        let space = &self.state.space;
        let start = space.find(need, align).ok_or(PatchError::AreaFull {
            used: space.in_use(),
            size: space.size,
            need,
        })?;
        let linked = if start == 0 && changes.is_empty() {
            at_base
        } else {
            link_objects(
                &lup.objects,
                va + start,
                &resolve_with(va + start + code),
                &cpu_has,
            )?
        };
        let mut data = Vec::new();
        for ((d, off), c) in changes.iter().zip(&data_off).zip(&carried) {
            if let Some((owner, applied)) = c {
                data.push(PlacedData {
                    old_va: applied.old_addr,
                    old_gpa: applied.old_gpa,
                    new_offset: applied.new_addr - va,
                    new_va: applied.new_addr,
                    repointed: applied.repointed.clone(),
                    carried: Some(owner.clone()),
                    owner: owner.clone(),
                });
                continue;
            }
            let sym = match &d.symbol_file {
                Some(file) => k.symbols.lookup_in(&d.symbol, file),
                None => k.symbols.lookup(&d.symbol),
            }
            .map_err(|e| UpdateError::Symbol {
                patch: lup.manifest.name.clone(),
                why: e.to_string(),
            })?;
            let gpa_of = |va: u64| {
                pagewalk::translate(g.ram(), view.read, va)
                    .map(|t| t.gpa)
                    .map_err(|e| PatchError::Map(format!("{} at {va:#x}: {e}", d.symbol)))
            };
            // Sizes from kallsyms reach the next symbol (padding included).
            let fits = if k.symbols.sizes_estimated() {
                sym.size >= d.old_bytes() && sym.size < d.old_bytes() + d.old_size
            } else {
                sym.size == d.old_bytes()
            };
            if sym.size != 0 && !fits {
                return Err(PatchError::Map(format!(
                    "{} is {} bytes in the running kernel, the patch expects {} ({} x {})",
                    d.symbol,
                    sym.size,
                    d.old_bytes(),
                    d.count,
                    d.old_size
                )));
            }
            let old_gpa = gpa_of(sym.addr)?;
            // Every page, and the last byte: one contiguous guest-physical run.
            let end = sym.addr + d.old_bytes();
            let mut at = (sym.addr | 0xfff) + 1;
            while at <= end {
                let probe = at.min(end - 1);
                if gpa_of(probe)? != old_gpa + (probe - sym.addr) {
                    return Err(PatchError::Map(format!(
                        "{} is not contiguous in guest-physical memory: lucos cannot track it",
                        d.symbol
                    )));
                }
                if at == end {
                    break;
                }
                at += 0x1000;
            }
            let last = end - 1;
            if gpa_of(last)? != old_gpa + d.old_bytes() - 1 {
                return Err(PatchError::Map(format!(
                    "{} is not contiguous in guest-physical memory: lucos cannot track it",
                    d.symbol
                )));
            }
            let new_va = va + start + code + off;
            let mut repointed = Vec::new();
            for p in &d.repoint {
                let holder = match &p.holder_file {
                    Some(file) => k.symbols.lookup_in(&p.holder, file),
                    None => k.symbols.lookup(&p.holder),
                }
                .map_err(|e| UpdateError::Symbol {
                    patch: lup.manifest.name.clone(),
                    why: format!("{p} (points into {}): {e}", d.symbol),
                })?;
                let addr = holder.addr + p.offset;
                if addr % 8 != 0 || (holder.size != 0 && p.offset + 8 > holder.size) {
                    return Err(PatchError::Map(format!(
                        "{p} (points into {}) is not an aligned word inside {} ({} bytes)",
                        d.symbol, p.holder, holder.size
                    )));
                }
                let to = d.map_offset(p.target).ok_or_else(|| {
                    PatchError::Map(format!(
                        "{p}: byte {:#x} of {} has no new place",
                        p.target, d.symbol
                    ))
                })?;
                repointed.push(Repointed {
                    word: p.to_string(),
                    addr,
                    gpa: gpa_of(addr)?,
                    old: sym.addr + p.target,
                    new: new_va + to,
                });
            }
            // Its own owner, unless a change it replaces (of a patch of
            // the same name) still holds that one until the switch.
            let base = crate::data::owner(&lup.manifest.name, &d.symbol);
            let taken = |o: &str| {
                self.state
                    .applied
                    .iter()
                    .any(|a| a.data.iter().any(|x| x.owner_of(&a.name) == o))
            };
            let mut owner = base.clone();
            for n in 2.. {
                if !taken(&owner) {
                    break;
                }
                owner = format!("{base}#{n}");
            }
            data.push(PlacedData {
                old_va: sym.addr,
                old_gpa,
                new_offset: start + code + off,
                new_va,
                repointed,
                carried: None,
                owner,
            });
        }
        Ok(Placed {
            start,
            need,
            mapping,
            linked,
            data,
        })
    }

    /// Phase 5: every write of the switch, checked against what must be
    /// there, and the code nothing may be in.
    fn plan(
        &self,
        g: &dyn Guest,
        view: &View,
        lup: &Lup,
        olds: &[Old<'_>],
        placed: &Placed,
        (replace, mode, mods): (bool, Mode, &[LoadedModule]),
    ) -> Result<(Plan, Vec<SiteWrite>), PatchError> {
        // What nothing may be in when the switch happens: the code being left
        // (consistent), or only the bytes being rewritten (immediate).
        // Nothing can be *inside* bytes that are one instruction (the
        // ftrace nop, a `call __fentry__`, an earlier patch's jump): no
        // vCPU stops and no task is preempted or returns there, so an
        // immediate switch of such sites checks nothing, and its pause does
        // not grow with the guest's tasks.
        let leaving = |function: &str, addr: u64, size: u64, now: &[u8]| match mode {
            Mode::Consistent => self.leaving(function, addr, size),
            Mode::Immediate if one_instruction(now) => Vec::new(),
            Mode::Immediate => vec![Leaving {
                function: format!("{function} (the bytes being rewritten)"),
                start: addr + 1,
                end: addr + TRAMPOLINE_LEN as u64,
                data: false,
            }],
        };
        let m = &lup.manifest;
        let mut sites = Vec::new();
        for Old { f, site } in olds {
            let new_addr = placed
                .linked
                .symbol(f.new_object.as_deref(), &f.new)
                .map_err(|why| UpdateError::BadObject {
                    object: m.objects.join(","),
                    why: format!("the replacement for {}: {why}", f.old),
                })?;
            let jmp = trampoline::jmp_rel32(site.addr, new_addr).map_err(|why| {
                UpdateError::UnsafeSite {
                    function: f.old.clone(),
                    addr: site.addr,
                    why,
                }
            })?;
            let now = self.current_bytes(site.addr, site.saved);
            sites.push(SiteWrite {
                function: f.old.clone(),
                addr: site.addr,
                new_addr,
                old_size: f.old_size,
                now,
                bytes: jmp,
                // Reverting this patch puts back what it overwrote; a
                // cumulative one replaces the whole stack, so the original.
                restore: if replace { site.saved } else { now },
                leaving: leaving(&f.old, site.addr, f.old_size, &now),
                module: f.module.clone(),
                owner: f
                    .module
                    .as_ref()
                    .and_then(|mn| mods.iter().find(|l| &l.info.name == mn))
                    .map(|l| l.owner.clone())
                    .unwrap_or_else(|| patch_owner(&m.name)),
            });
        }
        // With --replace, sites of applied patches that the new one does not
        // cover go back to their original bytes in the same pause.
        if replace {
            for a in &self.state.applied {
                for sf in &a.functions {
                    // A site that went with its module is not there to write.
                    if a.gone(sf) {
                        continue;
                    }
                    if !sites.iter().any(|w| w.addr == sf.old_addr) {
                        let orig = self.original_bytes(sf.old_addr).unwrap_or(sf.saved);
                        let now = self.current_bytes(sf.old_addr, orig);
                        sites.push(SiteWrite {
                            function: sf.function.clone(),
                            addr: sf.old_addr,
                            new_addr: 0,
                            old_size: sf.old_size,
                            now,
                            bytes: orig,
                            restore: orig,
                            leaving: leaving(&sf.function, sf.old_addr, sf.old_size, &now),
                            module: sf.module.clone(),
                            owner: patch_owner(&a.name),
                        });
                    }
                }
            }
        }
        let mut plan = site_plan(g, view, &sites)?;
        // Write control: the jumps this patch writes are protected from the
        // guest; a cumulative patch takes over from the ones it replaces.
        plan.protect = site_protections(&plan, &sites);
        // Each patched module's state is watched: when the guest unloads
        // it, its jumps' protections no longer hold (the memory is freed).
        // In the pause the state must still be what it was checked as: a
        // module that began to unload since is not patched (its unload
        // would not be seen).
        for l in mods {
            let state: u32 = if l.info.state == "coming" { 1 } else { 0 };
            plan.writes.push(Write {
                what: format!("module {}'s state (still {})", l.info.name, l.info.state),
                gpa: l.state_gpa,
                expect: state.to_le_bytes().to_vec(),
                bytes: state.to_le_bytes().to_vec(),
            });
            plan.protect.push(Protection {
                owner: crate::protect::watch_owner(&l.owner),
                label: format!("module {} state", l.info.name),
                gpa: l.state_gpa,
                len: 4,
                access: vmm_core::write_control::Access::Trapped,
            });
        }
        // Data changes of replaced patches that a cumulative patch does not
        // carry over are undone first, as a revert does: the old copy from
        // the new one (which goes), their protections released, the kernel
        // words moved to the new copy back (or on to the cumulative
        // patch's). Nothing may be left in the code of the patch that made
        // one (it uses the new copy) or hold a pointer into that copy.
        let area_gpa = g.area().gpa;
        let va = self.state.area_va.unwrap_or(0);
        let undone = self.undone_changes(m, replace);
        for &(a, d) in &undone {
            let owner = d.owner_of(&a.name);
            let change = d.change.clone().ok_or_else(|| {
                UpdateError::Stack(format!("patch '{}' changed {} unknown", a.name, d.symbol))
            })?;
            plan.copies.push(switch::DataCopy {
                change,
                old_gpa: d.old_gpa,
                new_offset: d.new_addr - va,
                to_new: false,
                c: self.tracker.c_runner(&owner),
            });
            plan.release.push(crate::data::old_owner(&owner));
            plan.release.push(owner);
            plan.leaving.push(Leaving {
                function: format!("patch {} (it uses {}'s new copy)", a.name, d.symbol),
                start: a.code_addr,
                end: a.code_addr + a.code_bytes,
                data: false,
            });
            plan.leaving.push(Leaving {
                function: format!("{} (new copy of patch {})", d.symbol, a.name),
                start: d.new_addr,
                end: d.new_addr + d.new_bytes,
                data: true,
            });
            let again = m
                .data
                .iter()
                .zip(&placed.data)
                .filter(|(_, p)| p.old_gpa == d.old_gpa && p.carried.is_none())
                .flat_map(|(_, p)| &p.repointed)
                .collect::<Vec<_>>();
            for r in &d.repointed {
                if !again.iter().any(|x| x.gpa == r.gpa) {
                    plan.writes.push(Write {
                        what: format!("{} (points into {}'s new copy)", r.word, d.symbol),
                        gpa: r.gpa,
                        expect: r.new.to_le_bytes().to_vec(),
                        bytes: r.old.to_le_bytes().to_vec(),
                    });
                }
            }
        }
        // Data changes: in the same pause the new copies are made from the
        // old ones, and both are protected (their writes are transferred).
        for (d, p) in m.data.iter().zip(&placed.data) {
            // A change carried over is already copied, protected and
            // tracked.
            if p.carried.is_some() {
                continue;
            }
            let owner = p.owner.clone();
            plan.copies.push(switch::DataCopy {
                change: d.clone(),
                old_gpa: p.old_gpa,
                new_offset: p.new_offset,
                to_new: true,
                c: None,
            });
            plan.protect.push(Protection {
                owner: crate::data::old_owner(&owner),
                label: format!("{} (old)", d.symbol),
                gpa: p.old_gpa,
                len: d.old_bytes(),
                access: vmm_core::write_control::Access::Trapped,
            });
            plan.protect.push(Protection {
                owner,
                label: format!("{} (new)", d.symbol),
                gpa: area_gpa + p.new_offset,
                len: d.new_bytes(),
                access: vmm_core::write_control::Access::Trapped,
            });
        }
        // Kernel data pointing into a changed object moves to the new copy
        // in the same pause (checked to still point where it did).
        for (d, p) in m.data.iter().zip(&placed.data) {
            if p.carried.is_some() {
                continue;
            }
            for r in &p.repointed {
                // A word an undone change had moved points into its new
                // copy until this switch.
                let now = undone
                    .iter()
                    .filter(|(_, u)| u.old_gpa == p.old_gpa)
                    .flat_map(|(_, u)| &u.repointed)
                    .find(|x| x.gpa == r.gpa)
                    .map_or(r.old, |x| x.new);
                plan.writes.push(Write {
                    what: format!("{} (points into {})", r.word, d.symbol),
                    gpa: r.gpa,
                    expect: now.to_le_bytes().to_vec(),
                    bytes: r.new.to_le_bytes().to_vec(),
                });
            }
        }
        // A member an undone change had added that the cumulative patch
        // adds too (same name, size and kind) keeps its value: carried
        // from the undone change's new copy after the copies are made
        // (instead of its initial value, or what C functions derive from
        // the old layout, which lacks it).
        for (d, p) in m.data.iter().zip(&placed.data) {
            if p.carried.is_some() {
                continue;
            }
            // (The same object: the same place, the same elements.)
            let same = |u: &AppliedData| u.old_gpa == p.old_gpa && u.count == d.count;
            for &(a, u) in undone.iter().filter(|(_, u)| same(u)) {
                let Some(was) = &u.change else { continue };
                plan.carry
                    .extend(crate::data::added_in_both(was, d).into_iter().flat_map(
                        |(name, from, to)| {
                            (0..d.count).map(move |i| switch::Carry {
                                what: format!(
                                    "{}[{i}].{name} (added by patch '{}')",
                                    d.symbol, a.name
                                ),
                                from: u.new_addr - va + i * was.new_size + u64::from(from.offset),
                                to: p.new_offset + i * d.new_size + u64::from(to.offset),
                                len: u64::from(to.size),
                            })
                        },
                    ));
            }
        }
        // The patch's own variables: whole pages the guest writes natively
        // (read-write slots in the otherwise read-only area), opened in the
        // switch's pause, before any jump can reach the code using them.
        for &(addr, len) in &placed.linked.writable {
            plan.protect.push(Protection {
                owner: crate::data::own_owner(&m.name),
                label: format!("{} (its own data)", m.name),
                gpa: area_gpa + placed.start + (addr - placed.linked.base),
                len,
                access: vmm_core::write_control::Access::Native,
            });
        }
        if replace {
            plan.release
                .extend(self.state.applied.iter().flat_map(owners_of));
            plan.carry
                .extend(self.carried_variables(&placed.linked.variables));
            // Code of patches replaced earlier in immediate mode: a switch
            // that waits for the replaced code (consistent, or undoing a
            // change whose copy that code may use) waits for it too, and
            // gives it back.
            if mode == Mode::Consistent || !undone.is_empty() {
                self.wait_for_kept(&mut plan);
            }
            if mode != Mode::Consistent {
                // Replaced patches this one does not wait for (no change of
                // theirs undone) keep their variables' pages writable (calls
                // may still be in their code) under an owner of their own
                // until their code is given back.
                let protections = g.protections();
                let waited = |a: &AppliedPatch| undone.iter().any(|(u, _)| u.name == a.name);
                for a in self.state.applied.iter().filter(|a| !waited(a)) {
                    let own = crate::data::own_owner(&a.name);
                    for p in protections.iter().filter(|p| p.owner == own) {
                        plan.protect.push(Protection {
                            owner: kept_own_owner(a.code_addr),
                            ..p.clone()
                        });
                    }
                }
            }
        }
        if let Some(map) = placed.mapping {
            plan.writes.insert(
                0,
                Write {
                    what: "the patch area's page-directory entry".into(),
                    gpa: map.pde_gpa,
                    expect: 0u64.to_le_bytes().to_vec(),
                    bytes: map.pde.to_le_bytes().to_vec(),
                },
            );
        }
        Ok((plan, sites))
    }

    /// What a cumulative patch takes over from the patches it replaces: each
    /// variable of its own with the same object, name and size as one of
    /// theirs, its value copied in the switch's pause (a counter goes on, a
    /// once-flag stays set). GCC's numbered statics (`__already_done.3`) are
    /// left out: their numbers need not name the same variable in two
    /// builds.
    fn carried_variables(&self, new: &[crate::link::Variable]) -> Vec<switch::Carry> {
        let Some(va) = self.state.area_va else {
            return Vec::new();
        };
        let numbered = |n: &str| {
            n.rsplit_once('.')
                .is_some_and(|(_, d)| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        };
        let olds: Vec<(&AppliedPatch, &crate::link::Variable)> = self
            .state
            .applied
            .iter()
            .flat_map(|a| a.variables.iter().map(move |x| (a, x)))
            .collect();
        let mut out = Vec::new();
        for v in new.iter().filter(|v| !numbered(&v.name)) {
            // Same object, name and size; or, objects named otherwise (a
            // hand-written patch's source file renamed), the one variable
            // of that name and size on both sides.
            let same = |x: &crate::link::Variable| x.name == v.name && x.size == v.size;
            let old = olds
                .iter()
                .find(|(_, x)| x.object == v.object && same(x))
                .or_else(|| {
                    let mut it = olds.iter().filter(|(_, x)| same(x));
                    match (it.next(), it.next(), new.iter().filter(|y| same(y)).count()) {
                        (Some(one), None, 1) => Some(one),
                        _ => None,
                    }
                });
            if let Some(&(a, x)) = old {
                out.push(switch::Carry {
                    what: format!("{} of patch '{}'", v.name, a.name),
                    from: x.addr - va,
                    to: v.addr - va,
                    len: v.size,
                });
            }
        }
        out
    }

    /// Phase 6: the code into its run, then the switch; on failure the run
    /// gets its old bytes back.
    fn switch_code(
        &self,
        g: &dyn Guest,
        k: &GuestKernel,
        view: &View,
        placed: &Placed,
        plan: &Plan,
        scan: Option<(Vec<crate::pointers::Target>, crate::pointers::Spans)>,
    ) -> Result<Switched, PatchError> {
        let area_err =
            |e: vmm_core::memory::MemoryError| PatchError::Map(format!("patch area: {e}"));
        // Memory scanned for pointers into data that goes (while the guest
        // runs, before anything is written), then again in each pause.
        let mut scan = match scan {
            Some((targets, skip)) => Some(
                crate::pointers::PointerScan::start(g, targets, skip).map_err(PatchError::Scan)?,
            ),
            None => None,
        };
        let mut before = vec![0u8; placed.need as usize];
        g.area_read(placed.start, &mut before).map_err(area_err)?;
        g.area_write(placed.start, &placed.linked.bytes)
            .map_err(area_err)?;
        let result = match scan.as_mut() {
            None => switch::switch(g, view.tasks(k), plan),
            Some(scan) => {
                let tasks = view.tasks(k).map(|(l, _)| l);
                let mut memory = crate::pointers::check(scan, k, view.tables, tasks);
                switch::switch_checked(g, view.tasks(k), plan, switch::MAX_TRIES, &mut memory)
            }
        };
        match result {
            Ok(s) => Ok(s),
            // Some new bytes may point into the code: leave it there.
            Err(e @ SwitchError::Torn(_)) => Err(e.into()),
            Err(e) => {
                if let Err(w) = g.area_write(placed.start, &before) {
                    log::error!("restoring the patch area after a refused switch: {w}");
                }
                Err(e.into())
            }
        }
    }

    /// Phase 7: the new state.
    #[allow(clippy::too_many_arguments)]
    fn commit_apply(
        &mut self,
        lup: &Lup,
        placed: Placed,
        sites: Vec<SiteWrite>,
        switched: Switched,
        view: &View,
        replace: bool,
        mode: Mode,
        t0: Instant,
    ) -> PatchReport {
        let m = &lup.manifest;
        let st = &mut self.state;
        if let Some(map) = placed.mapping {
            st.area_va = Some(map.va);
        }
        let va = st.area_va.unwrap_or(placed.linked.base - placed.start);
        st.space.take(placed.start, placed.need);
        // In immediate mode calls may still run in replaced patches' code,
        // but in the code of one whose data changes this patch undid: the
        // switch waited for that to be left (its new copies went).
        let mut held_runs = Vec::new();
        let mut kept_code = Vec::new();
        if replace && view.all_checked(switched.tasks_checked) {
            // The code of such a replaced patch was left in this switch: no
            // vCPU or task is in it, and nothing jumps there any more. The
            // run of one whose data changes are carried over holds their
            // new copies: it stays taken, given back with this patch's.
            let carried: Vec<&String> = placed.data.iter().flat_map(|p| &p.carried).collect();
            for a in &st.applied {
                let kept = |d: &AppliedData| carried.contains(&&d.owner_of(&a.name));
                let undid = a.data.iter().any(|d| !kept(d));
                if mode != Mode::Consistent && !undid {
                    // Calls may still be in it: given back later.
                    kept_code.push(KeptCode {
                        patch: a.name.clone(),
                        code_addr: a.code_addr,
                        code_bytes: a.code_bytes,
                        held_runs: a.held_runs.clone(),
                    });
                    continue;
                }
                if !a.data.iter().any(kept) {
                    st.space.release(a.code_addr - va);
                    for &run in &a.held_runs {
                        st.space.release(run);
                    }
                } else {
                    held_runs.push(a.code_addr - va);
                    held_runs.extend(&a.held_runs);
                }
            }
        }
        let functions: Vec<SwitchedFunction> = sites
            .iter()
            .filter(|w| w.new_addr != 0)
            .map(|w| SwitchedFunction {
                function: w.function.clone(),
                old_addr: w.addr,
                new_addr: w.new_addr,
                old_size: w.old_size,
                saved: w.restore,
                module: w.module.clone(),
            })
            .collect();
        if replace {
            st.applied.clear();
        }
        st.kept_code.extend(kept_code);
        let code_len = placed
            .linked
            .writable
            .iter()
            .map(|&(at, _)| at.saturating_sub(placed.linked.base) as usize)
            .min()
            .unwrap_or(placed.linked.bytes.len())
            .min(placed.linked.bytes.len());
        st.applied.push(AppliedPatch {
            name: m.name.clone(),
            description: m.description.clone(),
            version: m.version,
            depends: m.depends.clone(),
            functions: functions.clone(),
            code_addr: placed.linked.base,
            code_bytes: placed.need,
            code_sha256: Some(sha256_hex(&placed.linked.bytes[..code_len])),
            code_len: code_len as u64,
            modules: Vec::new(),
            source: None,
            part: None,
            variables: placed.linked.variables.clone(),
            held_runs,
            mode,
            data: m
                .data
                .iter()
                .zip(&placed.data)
                .map(|(d, p)| AppliedData {
                    symbol: d.symbol.clone(),
                    type_name: d.type_name.clone(),
                    count: d.count,
                    old_addr: p.old_va,
                    new_addr: p.new_va,
                    old_bytes: d.old_bytes(),
                    new_bytes: d.new_bytes(),
                    users_left: d.users_left.clone(),
                    stats: Default::default(),
                    change: Some(d.clone()),
                    old_gpa: p.old_gpa,
                    repointed: p.repointed.clone(),
                    owner: p.carried.clone().or_else(|| {
                        (p.owner != crate::data::owner(&m.name, &d.symbol)).then(|| p.owner.clone())
                    }),
                })
                .collect(),
        });
        PatchReport {
            name: m.name.clone(),
            mode,
            functions,
            pause_us: switched.pause.as_secs_f64() * 1e6,
            tries: switched.tries,
            sleeping_tasks_checked: switched.tasks_checked,
            total_us: t0.elapsed().as_secs_f64() * 1e6,
            pause_phases: Some(switched.phases),
            prepare_phases: None,
            waiting_for: None,
        }
    }

    /// Adds to `plan` what lucos's exception index needs: a slot for the
    /// placed patch `adding` (its code and its table), placing the index
    /// beside its run and hooking
    /// [`crate::extable::HOOKED`] if this is the first; the slots of the
    /// patches whose code starts at `freeing` cleared; the hook taken back
    /// with the last slot. The whole page is written in the pause.
    fn extable_plan(
        &self,
        g: &dyn Guest,
        k: &GuestKernel,
        view: &View,
        adding: Option<&Placed>,
        freeing: &[u64],
        plan: &mut Plan,
    ) -> Result<Option<ExtableChange>, PatchError> {
        use crate::extable::{self, Index, BLOCK_BYTES, HOOKED, OWNER, SEARCH};
        let cur = self.state.extables.as_ref();
        let frees = cur.is_some_and(|ix| ix.slots.iter().any(|s| *s != 0 && freeing.contains(s)));
        if adding.is_none() && !frees {
            return Ok(None);
        }
        let refuse = |why: String| -> PatchError {
            UpdateError::UnsafeSite {
                function: HOOKED.into(),
                addr: k.symbols.lookup(HOOKED).map_or(0, |s| s.addr),
                why: format!("the patch has exception-table entries, and {why}"),
            }
            .into()
        };
        let area_err =
            |e: vmm_core::memory::MemoryError| PatchError::Map(format!("patch area: {e}"));
        let mut take = None;
        let (mut ix, mut page, expect) = match cur {
            Some(ix) => {
                let mut now = vec![0u8; BLOCK_BYTES as usize];
                g.area_read(ix.offset, &mut now).map_err(area_err)?;
                (ix.clone(), now.clone(), now)
            }
            None => {
                let run = adding.expect("adding: checked above");
                let lookup = |n: &str| {
                    k.symbols.lookup(n).map(|s| s.addr).map_err(|e| {
                        refuse(format!(
                            "lucos makes them known to the kernel through {HOOKED} and \
                             {SEARCH}: {e}"
                        ))
                    })
                };
                let (hooked, search) = (lookup(HOOKED)?, lookup(SEARCH)?);
                // Its entry is the one-instruction fentry nop: nothing can
                // be inside the bytes the jump replaces.
                let mut entry = [0u8; TRAMPOLINE_LEN];
                kernel::read_virt(g, view.read, hooked, &mut entry)?;
                if entry != trampoline::FENTRY_NOP {
                    return Err(refuse(format!(
                        "{HOOKED} does not start with the fentry nop ({}: traced, or replaced \
                         by a patch), so lucos cannot hook it",
                        hex_bytes(&entry)
                    )));
                }
                let site_gpa = pagewalk::translate(g.ram(), view.tables, hooked)
                    .map_err(VmError::Walk)?
                    .gpa;
                // A page of its own, beside the patch's run.
                let mut space = self.state.space.clone();
                space.take(run.start, run.need);
                let offset = space
                    .find(BLOCK_BYTES, BLOCK_BYTES)
                    .ok_or(PatchError::AreaFull {
                        used: space.in_use(),
                        size: space.size,
                        need: BLOCK_BYTES,
                    })?;
                let va = run.linked.base - run.start + offset;
                let page = extable::page(va, search, hooked + TRAMPOLINE_LEN as u64)
                    .map_err(|why| refuse(format!("its index cannot reach the kernel: {why}")))?;
                let jmp = trampoline::jmp_rel32(hooked, va).map_err(&refuse)?;
                plan.writes.push(Write {
                    what: format!("{HOOKED} (lucos's exception index)"),
                    gpa: site_gpa,
                    expect: entry.to_vec(),
                    bytes: jmp.to_vec(),
                });
                plan.protect.push(Protection {
                    owner: OWNER.into(),
                    label: format!("{HOOKED} (lucos's exception index)"),
                    gpa: site_gpa,
                    len: TRAMPOLINE_LEN as u64,
                    access: vmm_core::write_control::Access::Trapped,
                });
                let mut now = vec![0u8; BLOCK_BYTES as usize];
                g.area_read(offset, &mut now).map_err(area_err)?;
                take = Some(offset);
                (Index::new(offset, hooked, site_gpa), page, now)
            }
        };
        for (i, s) in ix.slots.iter_mut().enumerate() {
            if *s != 0 && freeing.contains(s) {
                extable::set_slot(&mut page, i, None);
                *s = 0;
            }
        }
        if let Some(run) = adding {
            let l = &run.linked;
            let (start, end) = (l.base, l.base + l.bytes.len() as u64);
            let table = l.extable.expect("adding: a table");
            let i = ix.slots.iter().position(|&s| s == 0).ok_or_else(|| {
                refuse(format!(
                    "lucos's exception index is full ({} patches with entries applied)",
                    ix.slots.len()
                ))
            })?;
            extable::set_slot(&mut page, i, Some((start, end, table)));
            ix.slots[i] = start;
        }
        let mut release = None;
        let next = if ix.is_empty() {
            // The last slot went: the hook goes, in a pause where nothing is
            // inside the stub (nor returns into it: it calls nothing). The
            // entry must still hold the jump lucos wrote.
            let va = self.state.area_va.unwrap_or(0) + ix.offset;
            let jmp = trampoline::jmp_rel32(ix.site, va).map_err(&refuse)?;
            plan.writes.push(Write {
                what: format!("{HOOKED} (lucos's exception index)"),
                gpa: ix.site_gpa,
                expect: jmp.to_vec(),
                bytes: trampoline::FENTRY_NOP.to_vec(),
            });
            plan.release.push(OWNER.into());
            plan.leaving.push(Leaving {
                function: "lucos's exception index".into(),
                start: va,
                end: va + extable::STUB_BYTES,
                data: false,
            });
            if view.can_check(k) {
                release = Some(ix.offset);
            }
            None
        } else {
            plan.area_writes.push(switch::AreaWrite {
                what: "lucos's exception index".into(),
                offset: ix.offset,
                expect,
                bytes: page,
            });
            Some(ix)
        };
        Ok(Some(ExtableChange {
            next,
            take,
            release,
        }))
    }

    /// Commits what a switch changed of the exception index.
    fn commit_extable(&mut self, ex: Option<ExtableChange>) {
        let Some(ex) = ex else { return };
        if let Some(off) = ex.take {
            self.state.space.take(off, crate::extable::BLOCK_BYTES);
        }
        if let Some(off) = ex.release {
            self.state.space.release(off);
        }
        self.state.extables = ex.next;
    }

    /// Code a vCPU must not be in when the site of `function` is switched:
    /// its own body, and the code of every applied patch that switched it
    /// (a stacked or cumulative patch leaves those behind too).
    fn leaving(&self, function: &str, addr: u64, size: u64) -> Vec<Leaving> {
        let mut v = vec![Leaving {
            function: function.to_owned(),
            start: addr,
            end: addr + size.max(TRAMPOLINE_LEN as u64),
            data: false,
        }];
        for a in &self.state.applied {
            if a.functions.iter().any(|f| f.old_addr == addr && !a.gone(f)) {
                v.push(Leaving {
                    function: format!("{function} of patch {}", a.name),
                    start: a.code_addr,
                    end: a.code_addr + a.code_bytes,
                    data: false,
                });
            }
        }
        v
    }

    /// The modules `lup` covers that are not loaded in the guest (their
    /// parts are held).
    fn missing_modules(
        &self,
        g: &dyn Guest,
        k: &GuestKernel,
        lup: &Lup,
        replace: bool,
    ) -> Result<Vec<String>, PatchError> {
        let m = &lup.manifest;
        if m.modules.is_empty() {
            return Ok(Vec::new());
        }
        let Ok(layout) = k.modules.as_ref() else {
            return Ok(Vec::new());
        };
        let all = crate::modules::list(g, layout)?;
        let missing: Vec<String> = m
            .modules
            .iter()
            .filter(|t| !all.iter().any(|x| x.name == t.name))
            .map(|t| t.name.clone())
            .collect();
        if replace && !missing.is_empty() {
            return Err(UpdateError::Stack(format!(
                "patch '{}': module {} is not loaded; a cumulative (--replace) patch is not held \
                 for a module loaded later",
                m.name,
                missing.join(", ")
            ))
            .into());
        }
        Ok(missing)
    }

    /// Whether the modules list head must be watched: a patch is held, or
    /// one will be held again once its unloaded module is gone.
    fn wants_list_watch(&self) -> bool {
        !self.state.held.is_empty()
            || self.state.applied.iter().any(|a| {
                a.source.is_some()
                    && a.modules.iter().any(|m| {
                        m.status == ObjectStatus::Gone && !self.part_exists(&a.name, &m.name)
                    })
            })
    }

    /// Whether `patch`'s part for `module` is held or applied, or `patch`
    /// itself is held.
    fn part_exists(&self, patch: &str, module: &str) -> bool {
        let part = format!("{patch}@{module}");
        self.state
            .held
            .iter()
            .any(|h| h.name == part || h.name == patch)
            || self.state.applied.iter().any(|a| a.name == part)
    }

    /// The list watch to add or release so it is there exactly when
    /// [`Patcher::wants_list_watch`].
    fn list_watch_change(
        &self,
        g: &dyn Guest,
        k: &GuestKernel,
    ) -> Result<(Vec<String>, Vec<Protection>), PatchError> {
        let want = self.wants_list_watch();
        let have = g
            .protections()
            .iter()
            .any(|p| p.owner == crate::protect::LIST_WATCH);
        if want == have {
            return Ok((Vec::new(), Vec::new()));
        }
        if !want {
            return Ok((vec![crate::protect::LIST_WATCH.to_owned()], Vec::new()));
        }
        let layout = k
            .modules
            .as_ref()
            .map_err(|why| PatchError::Map(format!("the guest's modules list: {why}")))?;
        let head = pagewalk::translate(g.ram(), layout.paging, layout.head())
            .map_err(VmError::Walk)?
            .gpa;
        Ok((
            Vec::new(),
            vec![Protection {
                owner: crate::protect::LIST_WATCH.to_owned(),
                label: "the kernel's modules list".into(),
                gpa: head,
                len: 8,
                access: vmm_core::write_control::Access::Trapped,
            }],
        ))
    }

    /// Adds or releases the list watch, in one short pause if anything
    /// changes.
    fn sync_watches(&mut self, g: &dyn Guest, k: &GuestKernel) -> Result<(), PatchError> {
        let (release, add) = self.list_watch_change(g, k)?;
        change_protection(g, &release, &add)
    }

    /// Deals with what a watched write told of the guest's modules (its
    /// vCPU is held meanwhile: the caller releases it after): a module
    /// being loaded that a held patch is for gets its state watched; one
    /// that became `coming` is patched before any of its code runs; a
    /// patched one being unloaded loses its part of the patch (held again
    /// for its next load when the patch covers that module only). Returns
    /// what happened, for the log.
    pub fn on_module_event(
        &mut self,
        g: &dyn Guest,
        k: &GuestKernel,
        ev: &crate::protect::ModuleEvent,
    ) -> Result<Vec<String>, PatchError> {
        use crate::protect::{watch_owner, ModuleEvent, COMING_PREFIX};
        let layout = k
            .modules
            .as_ref()
            .map_err(|why| PatchError::Map(format!("the guest's modules list: {why}")))?
            .clone();
        let mut said = Vec::new();
        let (mut release, mut add) = (Vec::new(), Vec::new());
        match ev {
            ModuleEvent::Going { owner, state, .. } => {
                // Every patch of that instance (each watches the same state).
                let instance = self
                    .state
                    .applied
                    .iter()
                    .flat_map(|a| &a.modules)
                    .find(|m| &m.owner == owner)
                    .map(|m| (m.name.clone(), m.addr));
                let Some((name, addr)) = instance else {
                    // A watch the state does not know: let it go.
                    release.push(watch_owner(owner));
                    change_protection(g, &release, &[])?;
                    return Ok(said);
                };
                for a in &mut self.state.applied {
                    for m in a
                        .modules
                        .iter_mut()
                        .filter(|m| m.name == name && m.addr == addr)
                    {
                        if m.status == ObjectStatus::Applied {
                            m.status = ObjectStatus::Gone;
                            release.push(m.owner.clone());
                            said.push(format!(
                                "module {name} is being unloaded: patch {}'s part in it is gone",
                                a.name
                            ));
                        }
                        // About to be freed: the watch goes too (the page is
                        // the guest's again), and the instance is gone for good.
                        if *state == 3 && !m.freed {
                            m.freed = true;
                            release.push(watch_owner(&m.owner));
                        }
                    }
                }
                if *state == 3 {
                    let all = crate::modules::list(g, &layout)?;
                    let (s, r) = self.rehold_gone(&all);
                    said.extend(s);
                    release.extend(r);
                }
            }
            ModuleEvent::Dropped { owner, .. } => {
                release.push(owner.clone());
                let addr = owner
                    .rsplit_once('@')
                    .and_then(|(_, a)| u64::from_str_radix(a, 16).ok());
                for h in &mut self.state.held {
                    if h.coming.is_some() && h.coming == addr {
                        h.coming = None;
                        said.push(format!(
                            "module {} left the list before it was coming (its load failed)",
                            h.module
                        ));
                    }
                }
            }
            ModuleEvent::Listed { node, .. } => {
                // The new node first: a list walk can fail on a module
                // being freed, and this one must not be missed.
                let new = crate::modules::module_at_node(g, &layout, *node)?;
                let all = crate::modules::list(g, &layout).unwrap_or_default();
                let (s, r) = self.rehold_gone(&all);
                said.extend(s);
                release.extend(r);
                // Loads that failed before `coming`: their watch goes.
                for h in &mut self.state.held {
                    if let Some(addr) = h.coming {
                        if !all.iter().any(|x| x.addr == addr && x.name == h.module) {
                            release.push(format!("{COMING_PREFIX}{}@{addr:x}", h.module));
                            h.coming = None;
                        }
                    }
                }
                if let Some(m) = new {
                    let waiting = self
                        .state
                        .held
                        .iter()
                        .any(|h| h.module == m.name && h.coming.is_none());
                    if waiting && m.state == "unformed" {
                        add.extend(Self::coming_watches(g, &layout, &m)?);
                        for h in self.state.held.iter_mut().filter(|h| h.module == m.name) {
                            h.coming = Some(m.addr);
                        }
                        said.push(format!(
                            "module {} is being loaded at {:#x}: watching for it to be coming",
                            m.name, m.addr
                        ));
                    }
                }
            }
            ModuleEvent::Coming { owner, .. } => {
                release.push(owner.clone());
                let (name, addr) = owner[COMING_PREFIX.len()..]
                    .rsplit_once('@')
                    .and_then(|(n, a)| Some((n.to_owned(), u64::from_str_radix(a, 16).ok()?)))
                    .unwrap_or_default();
                let due: Vec<HeldPatch> = self
                    .state
                    .held
                    .iter()
                    .filter(|h| h.module == name && h.coming == Some(addr))
                    .cloned()
                    .collect();
                // The watch first: the apply pauses the guest on its own.
                change_protection(g, &release, &[])?;
                release.clear();
                for h in due {
                    match self.apply_held(g, k, &h, Some(addr)) {
                        Ok(r) => {
                            self.state.held.retain(|x| x.name != h.name);
                            said.push(format!(
                                "module {name} is coming: patch {} applied before any of its code \
                                 ran ({} functions, pause {:.0} µs)",
                                h.name,
                                r.functions.len(),
                                r.pause_us
                            ));
                        }
                        Err(e) => {
                            let why = e.to_string();
                            if let Some(x) = self.state.held.iter_mut().find(|x| x.name == h.name) {
                                x.coming = None;
                                x.last_error = Some(why.clone());
                            }
                            said.push(format!(
                                "module {name} is coming, but patch {} could not be applied \
                                 (the module runs without it): {why}",
                                h.name
                            ));
                        }
                    }
                }
            }
        }
        release.extend(self.stale_owners(g));
        let (r, a) = self.list_watch_change(g, k)?;
        release.extend(r);
        add.extend(a);
        release.sort();
        release.dedup();
        change_protection(g, &release, &add)?;
        Ok(said)
    }

    /// Applies held patch `h` to its module, loaded or (`coming`, its
    /// `struct module`) being loaded; on success it is held no more.
    fn apply_held(
        &mut self,
        g: &dyn Guest,
        k: &GuestKernel,
        h: &HeldPatch,
        coming: Option<u64>,
    ) -> Result<PatchReport, PatchError> {
        let t0 = Instant::now();
        let bytes = from_hex(&h.lup)
            .ok_or_else(|| PatchError::Switch("a held patch's bytes are damaged".into()))?;
        let whole = Lup::parse(&bytes, &h.name)?;
        let lup = match &h.part {
            Some(m) => whole.part(&h.name, std::slice::from_ref(m), false),
            None => whole,
        };
        let r = self.apply_lup(
            g,
            k,
            &lup,
            &bytes,
            (false, Some(h.mode)),
            h.part.as_deref(),
            coming,
            (t0, switch::PreparePhases::default()),
        )?;
        self.state.held.retain(|x| x.name != h.name);
        Ok(r)
    }

    /// The watches on a module being loaded (`unformed`): its state, for the
    /// moment it is `coming`, and its list node's `prev`, poisoned if its
    /// load fails first.
    fn coming_watches(
        g: &dyn Guest,
        layout: &crate::modules::ModuleLayout,
        m: &crate::modules::ModuleInfo,
    ) -> Result<Vec<Protection>, PatchError> {
        let gpa = |va: u64| {
            pagewalk::translate(g.ram(), layout.paging, va)
                .map(|t| t.gpa)
                .map_err(VmError::Walk)
        };
        let owner = format!("{}{}@{:x}", crate::protect::COMING_PREFIX, m.name, m.addr);
        Ok(vec![
            Protection {
                owner: owner.clone(),
                label: format!("module {} state (loading)", m.name),
                gpa: gpa(layout.state_addr(m))?,
                len: 4,
                access: vmm_core::write_control::Access::Trapped,
            },
            Protection {
                owner,
                label: format!("module {} list node (loading)", m.name),
                gpa: gpa(layout.list_prev_addr(m))?,
                len: 8,
                access: vmm_core::write_control::Access::Trapped,
            },
        ])
    }

    /// Held patches whose module appeared between the read of the list and
    /// the start of its watch: one being loaded gets its watches now, one
    /// loaded is patched now. Returns what happened.
    fn catch_up(&mut self, g: &dyn Guest, k: &GuestKernel) -> Result<Vec<String>, PatchError> {
        let Ok(layout) = k.modules.as_ref() else {
            return Ok(Vec::new());
        };
        let layout = layout.clone();
        let all = crate::modules::list(g, &layout)?;
        let mut said = Vec::new();
        let mut add: Vec<Protection> = Vec::new();
        let waiting: Vec<HeldPatch> = self
            .state
            .held
            .iter()
            .filter(|h| h.coming.is_none())
            .cloned()
            .collect();
        for h in waiting {
            let Some(m) = all.iter().find(|x| x.name == h.module) else {
                continue;
            };
            match m.state.as_str() {
                "unformed" => {
                    if !add
                        .iter()
                        .any(|p| p.owner.ends_with(&format!("@{:x}", m.addr)))
                    {
                        add.extend(Self::coming_watches(g, &layout, m)?);
                    }
                    if let Some(x) = self.state.held.iter_mut().find(|x| x.name == h.name) {
                        x.coming = Some(m.addr);
                    }
                }
                state @ ("live" | "coming") => {
                    let coming = (state == "coming").then_some(m.addr);
                    match self.apply_held(g, k, &h, coming) {
                        Ok(_) => said.push(format!(
                            "module {} loaded as patch {} was held: applied now",
                            h.module, h.name
                        )),
                        Err(e) => said.push(format!(
                            "module {} loaded as patch {} was held, and it could not be \
                             applied: {e}",
                            h.module, h.name
                        )),
                    }
                }
                _ => {}
            }
        }
        change_protection(g, &[], &add)?;
        Ok(said)
    }

    /// Patches of one module whose module is gone from the guest's list
    /// (`all`, as it is now) are held again for its next load; their code
    /// is freed. Returns what happened.
    fn rehold_gone(&mut self, all: &[crate::modules::ModuleInfo]) -> (Vec<String>, Vec<String>) {
        let mut said = Vec::new();
        let mut release = Vec::new();
        let va = self.state.area_va;
        // Freed (made `unformed`), or out of the list: a module of that
        // name at that address now is another load.
        let absent = |m: &AppliedModule| {
            m.status == ObjectStatus::Gone
                && (m.freed || !all.iter().any(|x| x.addr == m.addr && x.name == m.name))
        };
        let mut i = 0;
        while i < self.state.applied.len() {
            let a = &self.state.applied[i];
            let Some(source) = a.source.clone() else {
                i += 1;
                continue;
            };
            let dependents = self
                .state
                .applied
                .iter()
                .any(|b| b.depends.contains(&a.name));
            let only_module =
                a.functions.iter().all(|f| f.module.is_some()) && a.modules.len() == 1;
            if only_module && absent(&a.modules[0]) && !dependents {
                // Gone whole: held again as it was, its code freed and
                // whatever it still protects (its own data) released.
                let a = self.state.applied.remove(i);
                if let Some(va) = va {
                    self.state.space.release(a.code_addr - va);
                }
                release.extend(owners_of(&a));
                let module = a.modules[0].name.clone();
                said.push(format!(
                    "module {module} is gone: patch {} is held for its next load",
                    a.name
                ));
                self.state.held.push(HeldPatch {
                    name: a.name,
                    description: a.description,
                    version: a.version,
                    module,
                    part: a.part,
                    mode: a.mode,
                    lup: source,
                    coming: None,
                    last_error: None,
                });
                continue;
            }
            // A patch of other objects too: the gone module's part is held.
            let gone: Vec<String> = a
                .modules
                .iter()
                .filter(|m| absent(m) && !self.part_exists(&a.name, &m.name))
                .map(|m| m.name.clone())
                .collect();
            let (name, description, version, mode) =
                (a.name.clone(), a.description.clone(), a.version, a.mode);
            for module in gone {
                said.push(format!(
                    "module {module} is gone: patch {name}'s part for it is held for its next \
                     load ({name}@{module})"
                ));
                self.state.held.push(HeldPatch {
                    name: format!("{name}@{module}"),
                    description: description.clone(),
                    version,
                    module: module.clone(),
                    part: Some(module),
                    mode,
                    lup: source.clone(),
                    coming: None,
                    last_error: None,
                });
            }
            i += 1;
        }
        (said, release)
    }

    /// Owners of protections that should be gone and are not (a release
    /// that failed): the jumps of gone module parts, the watches of freed
    /// instances.
    fn stale_owners(&self, g: &dyn Guest) -> Vec<String> {
        let present = g.protections();
        let has = |o: &str| present.iter().any(|p| p.owner == o);
        let mut out = Vec::new();
        for m in self.state.applied.iter().flat_map(|a| &a.modules) {
            if m.status == ObjectStatus::Gone && has(&m.owner) {
                out.push(m.owner.clone());
            }
            let w = crate::protect::watch_owner(&m.owner);
            if m.freed && has(&w) {
                out.push(w);
            }
        }
        out
    }

    /// Notices the modules the guest unloaded since a patch switched their
    /// functions: a module no longer in the kernel's list at the address it
    /// was patched at, or one there that no longer holds the patch's jumps
    /// (unloaded and loaded again). Their part of each patch is `gone`: the
    /// protections of its jumps are released (in one short pause) and
    /// nothing is written there again. Returns `PATCH@MODULE` per part that
    /// went.
    pub fn reconcile_modules(
        &mut self,
        g: &dyn Guest,
        k: &GuestKernel,
    ) -> Result<Vec<String>, PatchError> {
        let watched =
            |a: &AppliedPatch| a.modules.iter().any(|m| m.status == ObjectStatus::Applied);
        if !self.state.applied.iter().any(watched) && !self.wants_list_watch() {
            return Ok(Vec::new());
        }
        let Ok(layout) = k.modules.as_ref() else {
            return Ok(Vec::new());
        };
        let all = crate::modules::list(g, layout)?;
        let view = View::new(g, k)?;
        let mut gone = Vec::new();
        for (i, a) in self.state.applied.iter().enumerate() {
            for m in a
                .modules
                .iter()
                .filter(|m| m.status == ObjectStatus::Applied)
            {
                let present = all.iter().any(|x| {
                    x.addr == m.addr
                        && x.name == m.name
                        && matches!(x.state.as_str(), "live" | "coming" | "going")
                });
                let holds = present
                    && a.functions
                        .iter()
                        .filter(|f| f.module.as_deref() == Some(m.name.as_str()))
                        .all(|f| {
                            let mut have = [0u8; 5];
                            kernel::read_virt(g, view.read, f.old_addr, &mut have).is_ok()
                                && have == self.current_bytes(f.old_addr, f.saved)
                        });
                if !holds {
                    gone.push((i, m.name.clone()));
                }
            }
        }
        let mut owners: Vec<String> = gone
            .iter()
            .filter_map(|(i, m)| self.state.applied[*i].modules.iter().find(|x| &x.name == m))
            .flat_map(|m| [m.owner.clone(), crate::protect::watch_owner(&m.owner)])
            .collect();
        let mut out = Vec::new();
        for (i, name) in gone {
            let a = &mut self.state.applied[i];
            if let Some(m) = a.modules.iter_mut().find(|m| m.name == name) {
                m.status = ObjectStatus::Gone;
            }
            log::info!(
                "patch {}: module {name} was unloaded; its part of the patch is gone",
                a.name
            );
            out.push(format!("{}@{name}", a.name));
        }
        // A patch of one module whose module is gone waits for its next load.
        let (said, release) = self.rehold_gone(&all);
        for why in said {
            log::info!("{why}");
        }
        owners.extend(release);
        owners.extend(self.stale_owners(g));
        let (release, add) = self.list_watch_change(g, k)?;
        owners.extend(release);
        owners.sort();
        owners.dedup();
        change_protection(g, &owners, &add)?;
        Ok(out)
    }

    /// Checks, while the guest runs, that every applied patch is in effect
    /// as it was applied: each switched site holds the jump of the newest
    /// patch that switched it, and each patch's code and read-only data
    /// hash as they did when placed.
    pub fn verify_applied(
        &self,
        g: &dyn Guest,
        k: &GuestKernel,
    ) -> Result<VerifyReport, PatchError> {
        let view = View::new(g, k)?;
        let mut problems = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let (mut sites, mut code_bytes) = (0, 0);
        // Newest first: a site is blamed on the patch whose jump it must hold.
        for a in self.state.applied.iter().rev() {
            for f in &a.functions {
                if a.gone(f) || !seen.insert(f.old_addr) {
                    continue;
                }
                sites += 1;
                let want = self.current_bytes(f.old_addr, f.saved);
                let mut have = [0u8; 5];
                kernel::read_virt(g, view.read, f.old_addr, &mut have)?;
                if have != want {
                    problems.push(format!(
                        "{} at {:#x} holds {}, not {} (patch {})",
                        f.function,
                        f.old_addr,
                        hex_bytes(&have),
                        hex_bytes(&want),
                        a.name
                    ));
                }
            }
            let (Some(sum), Some(va)) = (&a.code_sha256, self.state.area_va) else {
                continue;
            };
            let mut code = vec![0u8; a.code_len as usize];
            g.area_read(a.code_addr - va, &mut code)
                .map_err(|e| PatchError::Vm(VmError::Memory(e)))?;
            code_bytes += a.code_len;
            if sha256_hex(&code) != *sum {
                problems.push(format!(
                    "the code of patch {} at {:#x} is not what was placed ({} bytes hash differently)",
                    a.name, a.code_addr, a.code_len
                ));
            }
        }
        // lucos's exception index: the hooked entry still jumps to it.
        if let (Some(ix), Some(va)) = (&self.state.extables, self.state.area_va) {
            sites += 1;
            let page = va + ix.offset;
            let mut have = [0u8; 5];
            kernel::read_virt(g, view.read, ix.site, &mut have)?;
            if trampoline::jmp_rel32(ix.site, page).ok() != Some(have) {
                problems.push(format!(
                    "{} at {:#x} holds {}, not the jump to lucos's exception index at {page:#x}",
                    crate::extable::HOOKED,
                    ix.site,
                    hex_bytes(&have)
                ));
            }
        }
        Ok(VerifyReport {
            patches: self.state.applied.len(),
            applied: self.state.applied.iter().map(|a| a.name.clone()).collect(),
            sites,
            code_bytes,
            problems,
        })
    }

    /// What the bytes at `addr` are now: the jmp of the newest applied patch
    /// that switched it, else `original`.
    fn current_bytes(&self, addr: u64, original: [u8; 5]) -> [u8; 5] {
        self.state
            .applied
            .iter()
            .rev()
            .find_map(|a| {
                a.functions
                    .iter()
                    .find(|f| f.old_addr == addr && !a.gone(f))
                    .and_then(|f| trampoline::jmp_rel32(addr, f.new_addr).ok())
            })
            .unwrap_or(original)
    }

    /// The original (unpatched) bytes of a site some applied patch switched.
    fn original_bytes(&self, addr: u64) -> Option<[u8; 5]> {
        self.state
            .applied
            .iter()
            .find_map(|a| {
                a.functions
                    .iter()
                    .find(|f| f.old_addr == addr && !a.gone(f))
            })
            .map(|f| f.saved)
    }

    /// Reverts the applied patch `name` with its parts for modules
    /// (`NAME@MODULE`), or drops the held one. The trampolines go back to
    /// what they overwrote, in one pause per patch.
    pub fn revert(
        &mut self,
        g: &dyn Guest,
        k: &GuestKernel,
        name: &str,
    ) -> Result<PatchReport, PatchError> {
        // Modules unloaded meanwhile first (a patch of one may be held again).
        if let Err(e) = self.reconcile_modules(g, k) {
            log::warn!("checking patched modules: {e}");
        }
        // Its parts for modules (`NAME@MODULE`) go with it: the applied ones
        // reverted first, each in its own pause; the held ones dropped.
        let prefix = format!("{name}@");
        let is_part = |n: &str, part: &Option<String>| {
            part.as_deref()
                .is_some_and(|m| n.strip_prefix(&prefix) == Some(m))
        };
        let parts: Vec<String> = self
            .state
            .applied
            .iter()
            .filter(|a| is_part(&a.name, &a.part))
            .map(|a| a.name.clone())
            .chain(
                self.state
                    .held
                    .iter()
                    .filter(|h| is_part(&h.name, &h.part))
                    .map(|h| h.name.clone()),
            )
            .collect();
        let whole = self.state.applied.iter().any(|a| a.name == name)
            || self.state.held.iter().any(|h| h.name == name);
        let mut last = None;
        for p in &parts {
            last = Some(self.revert_one(g, k, p)?);
        }
        let r = match (whole, last) {
            (false, Some(r)) => Ok(r),
            _ => self.revert_one(g, k, name),
        };
        // The list watch goes with the last patch that needed it.
        if let Err(e) = self.sync_watches(g, k) {
            log::warn!("after reverting {name}: {e}");
        }
        r
    }

    /// Reverts the applied patch `name`, or drops the held one.
    fn revert_one(
        &mut self,
        g: &dyn Guest,
        k: &GuestKernel,
        name: &str,
    ) -> Result<PatchReport, PatchError> {
        let t0 = Instant::now();
        let stack_err = |s: String| PatchError::Update(UpdateError::Stack(s));
        if let Some(i) = self.state.held.iter().position(|h| h.name == name) {
            let h = self.state.held.remove(i);
            let mut release = Vec::new();
            if let Some(addr) = h.coming {
                if !self.state.held.iter().any(|x| x.coming == Some(addr)) {
                    release.push(format!(
                        "{}{}@{addr:x}",
                        crate::protect::COMING_PREFIX,
                        h.module
                    ));
                }
            }
            let (r, a) = self.list_watch_change(g, k)?;
            release.extend(r);
            change_protection(g, &release, &a)?;
            return Ok(PatchReport {
                name: h.name,
                mode: h.mode,
                functions: Vec::new(),
                pause_us: 0.0,
                tries: 0,
                sleeping_tasks_checked: None,
                total_us: t0.elapsed().as_secs_f64() * 1e6,
                pause_phases: None,
                prepare_phases: None,
                waiting_for: Some(h.module),
            });
        }

        let applied = &self.state.applied;
        let idx = applied
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| stack_err(format!("no applied patch named '{name}'")))?;
        if let Some(d) = applied[idx + 1..]
            .iter()
            .find(|a| a.depends.iter().any(|d| d == name))
        {
            return Err(stack_err(format!(
                "patch '{}' depends on '{name}'; revert it first",
                d.name
            )));
        }
        let target = &applied[idx];
        for f in target.functions.iter().filter(|f| !target.gone(f)) {
            if let Some(later) = applied[idx + 1..].iter().find(|a| {
                a.functions
                    .iter()
                    .any(|g| g.old_addr == f.old_addr && !a.gone(g))
            }) {
                return Err(stack_err(format!(
                    "{} is switched again by the later patch '{}'; revert that first",
                    f.function, later.name
                )));
            }
        }
        let view = View::new(g, k)?;
        // What runs after the revert is the original function or an earlier
        // patch's replacement; what is left is this patch's code.
        let code = Leaving {
            function: format!("patch {}", target.name),
            start: target.code_addr,
            end: target.code_addr + target.code_bytes,
            data: false,
        };
        // Sites of a module the guest unloaded went with its memory.
        let sites: Vec<SiteWrite> = target
            .functions
            .iter()
            .filter(|f| !target.gone(f))
            .map(|f| SiteWrite {
                function: f.function.clone(),
                addr: f.old_addr,
                new_addr: 0,
                old_size: f.old_size,
                now: trampoline::jmp_rel32(f.old_addr, f.new_addr).unwrap_or(f.saved),
                bytes: f.saved,
                restore: f.saved,
                leaving: vec![code.clone()],
                module: f.module.clone(),
                owner: patch_owner(name),
            })
            .collect();
        let mut plan = site_plan(g, &view, &sites)?;
        plan.release = owners_of(target);
        // Code of patches replaced in immediate mode may still use the new
        // copies this revert frees (carried over from them): the revert
        // waits for it to be left too, and gives it back.
        let with_kept = !target.data.is_empty() && !self.state.kept_code.is_empty();
        if with_kept {
            self.wait_for_kept(&mut plan);
        }
        // Data changes go back to their old layout in the same pause: the
        // old copies from the new ones, then neither is tracked.
        let area = g.area();
        for d in &target.data {
            let change = d.change.clone().ok_or_else(|| {
                stack_err(format!(
                    "patch '{name}' changed {} but this lucos does not know how (restored state)",
                    d.symbol
                ))
            })?;
            let va = self.state.area_va.unwrap_or(0);
            let owner = d.owner_of(name);
            let c = self.tracker.c_runner(&owner);
            if change.c.is_some() && c.is_none() {
                return Err(stack_err(format!(
                    "patch '{name}' changed {} with C transfer functions this VMM does not \
                     hold (restored state)",
                    d.symbol
                )));
            }
            plan.copies.push(switch::DataCopy {
                change,
                old_gpa: d.old_gpa,
                new_offset: d.new_addr - va,
                to_new: false,
                c,
            });
            plan.release.push(crate::data::old_owner(&owner));
            plan.release.push(owner);
            debug_assert!(d.new_addr - va < area.size);
            // Kernel data moved to the new copy points at the old one again.
            for r in &d.repointed {
                plan.writes.push(Write {
                    what: format!("{} (points into {}'s new copy)", r.word, d.symbol),
                    gpa: r.gpa,
                    expect: r.new.to_le_bytes().to_vec(),
                    bytes: r.old.to_le_bytes().to_vec(),
                });
            }
        }
        // Its exception table goes from lucos's index in the same pause,
        // where nothing can be left in its code (as the release below).
        let freeing = if view.can_check(k) {
            let kept = self.state.kept_code.iter().filter(|_| with_kept);
            std::iter::once(target.code_addr)
                .chain(kept.map(|c| c.code_addr))
                .collect()
        } else {
            Vec::new()
        };
        let ex = self.extable_plan(g, k, &view, None, &freeing, &mut plan)?;
        // The new copies go: nothing may hold a pointer into them, in a
        // register, on a live stack or (saved at run time) anywhere in
        // memory, but the kernel words the revert moves back.
        let mut targets = Vec::new();
        let mut skip: Vec<(u64, u64)> = view.text.map(|(a, n)| (a, a + n)).into_iter().collect();
        // What goes with the patch (its code, its copies) may point into
        // its copies.
        let area_va = self.state.area_va.unwrap_or(0);
        let in_area = |va: u64, n: u64| {
            let gpa = area.gpa + va.wrapping_sub(area_va);
            (gpa, gpa + n)
        };
        skip.push(in_area(target.code_addr, target.code_bytes));
        // So do the runs it holds for changes it carried over (the code of
        // the patches that made them, and their copies).
        for &run in &target.held_runs {
            if let Some(len) = self.state.space.len_of(run) {
                skip.push(in_area(area_va + run, len));
            }
        }
        // And kept code it waits for (given back with it).
        for c in self.state.kept_code.iter().filter(|_| with_kept) {
            skip.push(in_area(c.code_addr, c.code_bytes));
            for &run in &c.held_runs {
                if let Some(len) = self.state.space.len_of(run) {
                    skip.push(in_area(area_va + run, len));
                }
            }
        }
        for d in &target.data {
            let (a, b) = (d.new_addr, d.new_addr + d.new_bytes);
            skip.push(in_area(a, d.new_bytes));
            targets.push((a, b, format!("{} (new copy)", d.symbol)));
            plan.leaving.push(Leaving {
                function: format!("{} (new copy)", d.symbol),
                start: a,
                end: b,
                data: true,
            });
            skip.extend(d.repointed.iter().map(|r| (r.gpa, r.gpa + 8)));
        }
        let switched = if targets.is_empty() {
            switch::switch(g, view.tasks(k), &plan)?
        } else {
            let mut scan =
                crate::pointers::PointerScan::start(g, targets, skip).map_err(PatchError::Scan)?;
            let mut memory =
                crate::pointers::check(&mut scan, k, view.tables, view.tasks(k).map(|(l, _)| l));
            switch::switch_checked(g, view.tasks(k), &plan, switch::MAX_TRIES, &mut memory)?
        };
        self.commit_extable(ex);
        let st = &mut self.state;
        let removed = st.applied.remove(idx);
        for d in &removed.data {
            self.tracker.remove(&d.owner_of(name));
            self.scan_backoff.remove(&d.owner_of(name));
        }
        // Its code was left in the switch: nothing is in it, nothing jumps
        // there. Where sleeping tasks could not be checked (a Linux kernel
        // without BTF) one may still return into it: the bytes stay. The
        // runs it held for copies carried over go with it.
        if view.all_checked(switched.tasks_checked) {
            if let Some(va) = st.area_va {
                st.space.release(removed.code_addr - va);
                for &run in &removed.held_runs {
                    st.space.release(run);
                }
            }
            if with_kept {
                self.give_back_kept();
            }
        }
        Ok(PatchReport {
            name: removed.name,
            // A revert always waits until nothing is in the patch's code.
            mode: Mode::Consistent,
            functions: removed.functions,
            pause_us: switched.pause.as_secs_f64() * 1e6,
            tries: switched.tries,
            sleeping_tasks_checked: switched.tasks_checked,
            total_us: t0.elapsed().as_secs_f64() * 1e6,
            pause_phases: Some(switched.phases),
            prepare_phases: None,
            waiting_for: None,
        })
    }
}

/// The switch's writes of `sites`: each site's guest-physical address (kernel
/// text is not writable through the guest's mapping; the VMM writes RAM
/// directly), found through the kernel's page tables before the pause.
fn site_plan(g: &dyn Guest, view: &View, sites: &[SiteWrite]) -> Result<Plan, PatchError> {
    let mut plan = Plan::default();
    for w in sites {
        let t = pagewalk::translate(g.ram(), view.tables, w.addr).map_err(VmError::Walk)?;
        let end = pagewalk::translate(g.ram(), view.tables, w.addr + 4).map_err(VmError::Walk)?;
        if end.gpa != t.gpa + 4 {
            return Err(UpdateError::UnsafeSite {
                function: w.function.clone(),
                addr: w.addr,
                why: "its first 5 bytes cross into a non-contiguous page".into(),
            }
            .into());
        }
        plan.writes.push(Write {
            what: w.function.clone(),
            gpa: t.gpa,
            expect: w.now.to_vec(),
            bytes: w.bytes.to_vec(),
        });
        plan.leaving.extend(w.leaving.iter().cloned());
    }
    Ok(plan)
}

/// The write-control owner name of patch `name`.
pub fn patch_owner(name: &str) -> String {
    format!("patch:{name}")
}

/// Releases `release` and protects `add` in one short pause (nothing when
/// both are empty).
/// Why `new` is not the same change as the applied `old` (the same object,
/// layouts, member transfers, C transfer functions and moved pointers), if
/// it is not; which kernel functions each leaves using the old copy may
/// differ.
fn differs(old: &crate::data::DataChange, new: &crate::data::DataChange) -> Option<String> {
    let what = if old.symbol_file != new.symbol_file || old.count != new.count {
        "another object"
    } else if old.type_name != new.type_name || old.old_size != new.old_size {
        "another old layout"
    } else if old.new_size != new.new_size || old.members != new.members {
        "another new layout or member transfer"
    } else if old.c.as_ref().map(|c| (&c.to_new, &c.to_old))
        != new.c.as_ref().map(|c| (&c.to_new, &c.to_old))
    {
        // (Their code is not compared: the change keeps the functions it
        // was applied with.)
        "other C transfer functions"
    } else if old.repoint != new.repoint {
        "other pointers moved to the new copy"
    } else {
        return None;
    };
    Some(what.to_owned())
}

fn change_protection(
    g: &dyn Guest,
    release: &[String],
    add: &[Protection],
) -> Result<(), PatchError> {
    if release.is_empty() && add.is_empty() {
        return Ok(());
    }
    let paused = vmm_core::guest::Paused::new(g)?;
    paused
        .change_protection(release, add)
        .map_err(|e| PatchError::Switch(e.to_string()))
}

/// The kept code `kc` as code a switch must find nothing in.
fn kept_leaving(kc: &KeptCode) -> Leaving {
    Leaving {
        function: format!("patch {} (replaced, kept)", kc.patch),
        start: kc.code_addr,
        end: kc.code_addr + kc.code_bytes,
        data: false,
    }
}

/// The owner of the own variables' pages of the replaced patch whose kept
/// code is at `code_addr` (writable while calls may be in it).
fn kept_own_owner(code_addr: u64) -> String {
    format!(
        "{}kept@{code_addr:x}/own",
        vmm_core::write_control::DATA_OWNER_PREFIX
    )
}

/// The runs of kept code `kc` given back: a run holding the new copy of a
/// data change an applied patch carries goes to that patch (given back
/// with it), the others are free again.
fn give_back_runs(st: &mut PatchState, kc: &KeptCode, va: u64) {
    for run in std::iter::once(kc.code_addr - va).chain(kc.held_runs.iter().copied()) {
        let len = st.space.len_of(run).unwrap_or(0);
        let (start, end) = (va + run, va + run + len);
        let carrier = st.applied.iter_mut().find(|a| {
            a.data
                .iter()
                .any(|d| d.new_addr >= start && d.new_addr < end)
        });
        match carrier {
            Some(a) => a.held_runs.push(run),
            None => st.space.release(run),
        }
    }
}

/// Every owner of protections an applied patch holds.
fn owners_of(a: &AppliedPatch) -> Vec<String> {
    let mut v = vec![patch_owner(&a.name), crate::data::own_owner(&a.name)];
    for m in &a.modules {
        v.push(m.owner.clone());
        v.push(crate::protect::watch_owner(&m.owner));
    }
    v
}

/// The protections of the jumps in `plan` (one write per site, in order)
/// that switch to new code; sites given back to their original bytes stay
/// ordinary memory.
fn site_protections(plan: &Plan, sites: &[SiteWrite]) -> Vec<Protection> {
    plan.writes
        .iter()
        .zip(sites)
        .filter(|(_, s)| s.new_addr != 0)
        .map(|(w, s)| Protection {
            owner: s.owner.clone(),
            label: s.function.clone(),
            gpa: w.gpa,
            len: w.bytes.len() as u64,
            access: vmm_core::write_control::Access::Trapped,
        })
        .collect()
}

/// Owner of the kernel text's relayed read-only slot (kept from the first
/// patch of kernel text on, whatever is reverted).
pub const TEXT_RELAY_OWNER: &str = "lucos:text";

/// `[u8; 5]` as a hex string.
mod hex5 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8; 5], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&b.iter().map(|x| format!("{x:02x}")).collect::<String>())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 5], D::Error> {
        let s = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("'{s}' is not 5 bytes of hex"));
        if s.len() != 10 {
            return Err(bad());
        }
        let mut out = [0u8; 5];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(out)
    }
}
