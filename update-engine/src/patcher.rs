//! Live patching the guest kernel from the VMM (LUCOS): verify a `.lup`,
//! link its code into the patch area, and switch every function it replaces
//! with 5-byte trampolines written in one pause of every vCPU.
//!
//! The patch area is guest memory the VMM owns: a KVM memory slot outside
//! the guest's RAM map (no e820 or boot-info entry), registered read-only, so
//! the guest cannot write patch code even through a mapping it makes itself;
//! it is mapped into the kernel's address space with 2 MiB pages in a free
//! slot of the kernel image window (within ±2 GiB of kernel text), present,
//! global, executable, not writable. Any failed check leaves guest memory as
//! it was: nothing is written before every check has passed, and the writes
//! made in the pause are undone if a later one fails.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_core::pagewalk::{self, PagingState};
use vmm_core::region::PATCH_AREA_BYTES;
use vmm_core::vm::{Vm, VmError};

use crate::kernel::{self as introspect, GuestKernel};
use crate::linux::{self as tasks, TaskLayout};
use crate::lup::{old_code_sha256, sha256_hex};
use crate::safety::{self, Active, Leaving};
use crate::trampoline::{self, Site, TRAMPOLINE_LEN};
use crate::{link, Lup, UpdateError, VerifyingKey};
/// Pauses tried before giving up while a vCPU keeps running code that the
/// switch leaves behind.
const MAX_TRIES: u32 = 100;

/// Errors applying or reverting a patch.
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
    Kernel(#[from] introspect::IntrospectError),
    /// A vCPU or a sleeping task kept being in code the switch leaves behind.
    #[error("in each of {tries} pauses something was still in code the patch replaces (last: {who} {active}); nothing was changed, try again")]
    Busy {
        /// Who: `vCPU N`, or `task PID (COMM)` for a Linux task that is not running.
        who: String,
        /// What it was doing there.
        active: Active,
        /// Pauses tried.
        tries: u32,
    },
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
}

/// One function switched by an applied patch.
#[derive(Debug, Clone, Serialize)]
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
    /// What the trampoline overwrote (restored by revert).
    #[serde(skip)]
    pub saved: [u8; 5],
}

/// An applied patch.
#[derive(Debug, Clone, Serialize)]
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
}

/// What applying or reverting reports.
#[derive(Debug, Clone, Serialize)]
pub struct PatchReport {
    /// The patch.
    pub name: String,
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
}

/// The running kernel's text and its hash, to show a refused patch changed
/// nothing.
#[derive(Debug, Clone, Serialize)]
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
pub fn text_hash(vm: &Vm, kernel: &GuestKernel) -> Result<TextHash, PatchError> {
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
    let paging = introspect::kernel_paging(vm)?;
    let mut bytes = vec![0u8; end.saturating_sub(start) as usize];
    introspect::read_virt(vm, paging, start, &mut bytes)?;
    Ok(TextHash {
        start,
        end,
        sha256: sha256_hex(&bytes),
    })
}

/// Alignment of code placed in the patch area (a cache line).
const CODE_ALIGN: u64 = 64;

/// Which runs of the patch area are taken: first fit, [`CODE_ALIGN`]ed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Space {
    size: u64,
    /// Taken runs `(offset, len)`, sorted by offset, disjoint.
    taken: Vec<(u64, u64)>,
}

impl Space {
    fn new(size: u64) -> Self {
        Space {
            size,
            taken: Vec::new(),
        }
    }

    /// Offset of the first free run of `need` bytes aligned to `align`
    /// (and at least [`CODE_ALIGN`]).
    fn find(&self, need: u64, align: u64) -> Option<u64> {
        let align = align.max(CODE_ALIGN);
        let mut at = 0;
        for &(off, len) in &self.taken {
            if at + need <= off {
                return Some(at);
            }
            at = (off + len).div_ceil(align) * align;
        }
        (at + need <= self.size).then_some(at)
    }

    fn take(&mut self, off: u64, len: u64) {
        let i = self.taken.partition_point(|&(o, _)| o < off);
        self.taken.insert(i, (off, len));
    }

    /// Frees the run taken at `off` (no-op if none starts there).
    fn release(&mut self, off: u64) {
        self.taken.retain(|&(o, _)| o != off);
    }

    fn in_use(&self) -> u64 {
        self.taken.iter().map(|&(_, len)| len).sum()
    }
}

/// Per-VM live-patch state.
#[derive(Debug)]
pub struct Patcher {
    /// Guest-virtual base of the area once mapped.
    va: Option<u64>,
    /// Which bytes of the area hold code of applied patches (or of reverted
    /// ones that something may still run: see [`Patcher::revert`]).
    space: Space,
    trusted: Vec<VerifyingKey>,
    applied: Vec<AppliedPatch>,
    /// Linux: where to find the guest's tasks, and the kernel's own paging
    /// to read them through, so sleeping ones are checked too.
    tasks: Option<(TaskLayout, PagingState)>,
    /// Whether the guest is Linux, whose tasks can sleep inside kernel code.
    linux: bool,
}

/// PDE bits for a patch-area page: present, 2 MiB, accessed and dirty preset
/// (the slot is read-only, so the CPU could not set them), global; not
/// writable, not user, executable.
const PDE_AREA: u64 = 1 | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8);
const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

impl Patcher {
    /// State for a VM, trusting `trusted` signing keys.
    pub fn new(trusted: Vec<VerifyingKey>) -> Self {
        Patcher {
            va: None,
            space: Space::new(PATCH_AREA_BYTES),
            trusted,
            applied: Vec::new(),
            tasks: None,
            linux: false,
        }
    }

    /// Applied patches, oldest first.
    pub fn applied(&self) -> &[AppliedPatch] {
        &self.applied
    }

    /// Maps the patch area into the kernel window in the highest free 2 MiB
    /// slot, once.
    fn map_area(&mut self, vm: &Vm, paging: PagingState) -> Result<u64, PatchError> {
        if let Some(va) = self.va {
            return Ok(va);
        }
        let ram = vm.ram();
        let read = |gpa: u64| {
            ram.read_u64(gpa)
                .map_err(|e| PatchError::Map(e.to_string()))
        };
        let pml4 = paging.cr3 & ADDR_MASK;
        let mut va = 0xffff_ffff_bfe0_0000u64;
        while va >= 0xffff_ffff_8000_0000 {
            let l4 = read(pml4 + ((va >> 39) & 511) * 8)?;
            if l4 & PTE_P == 0 {
                return Err(PatchError::Map(
                    "the kernel window has no PML4 entry".into(),
                ));
            }
            let l3 = read((l4 & ADDR_MASK) + ((va >> 30) & 511) * 8)?;
            if l3 & PTE_P == 0 || l3 & PTE_PS != 0 {
                return Err(PatchError::Map(
                    "the kernel window is not mapped through a page directory".into(),
                ));
            }
            let pde_at = (l3 & ADDR_MASK) + ((va >> 21) & 511) * 8;
            if read(pde_at)? == 0 {
                ram.write(pde_at, &(vm.patch_area().gpa | PDE_AREA).to_le_bytes())
                    .map_err(|e| PatchError::Map(e.to_string()))?;
                self.va = Some(va);
                return Ok(va);
            }
            va -= 2 << 20;
        }
        Err(PatchError::Map(
            "no free 2 MiB slot in the kernel image window".into(),
        ))
    }

    /// Applies the `.lup` at `path` to the running kernel `kernel`; with
    /// `replace`, it replaces every applied patch (a cumulative patch).
    pub fn apply(
        &mut self,
        vm: &Vm,
        kernel: &GuestKernel,
        path: &Path,
        replace: bool,
    ) -> Result<PatchReport, PatchError> {
        let t0 = Instant::now();
        let name = path.display().to_string();
        let lup = Lup::read(path)?;
        lup.verify(&self.trusted, &name)?;
        lup.check_target(&kernel.identity)?;
        let m = &lup.manifest;
        let stack_err = |s: String| PatchError::Update(UpdateError::Stack(s));
        if !replace && self.applied.iter().any(|a| a.name == m.name) {
            return Err(stack_err(format!(
                "a patch named '{}' is already applied",
                m.name
            )));
        }
        let remaining: Vec<&AppliedPatch> = if replace {
            vec![]
        } else {
            self.applied.iter().collect()
        };
        for d in &m.depends {
            if !remaining.iter().any(|a| &a.name == d) {
                return Err(stack_err(format!(
                    "patch '{}' depends on '{d}', which is not applied",
                    m.name
                )));
            }
        }
        let paging = introspect::kernel_paging(vm)?;
        self.linux = kernel.symbols.lookup("init_task").is_ok();
        self.tasks = kernel.tasks.clone().ok().map(|l| {
            let p = l.paging(paging, kernel.text, kernel.text_gpa);
            (l, p)
        });
        // Old functions: resolve, read, check bytes against the manifest.
        let mut olds = Vec::new();
        for f in &m.functions {
            let sym = match &f.old_file {
                Some(file) => kernel.symbols.lookup_in(&f.old, file),
                None => kernel.symbols.lookup(&f.old),
            }
            .map_err(|e| UpdateError::Symbol {
                patch: m.name.clone(),
                why: e.to_string(),
            })?;
            let mut code = vec![0u8; f.old_size as usize];
            introspect::read_virt(vm, paging, sym.addr, &mut code)?;
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
            let got = old_code_sha256(&code, &f.old_masked, &f.old_relocs, kernel.slide as u64)
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
            olds.push((f, site));
        }
        // New code: link at the area's base to learn its size (the layout
        // does not depend on the base), then at the first free run it fits.
        let va = self.map_area(vm, paging)?;
        let resolve = |s: &str| -> Result<u64, String> {
            kernel
                .symbols
                .lookup(s)
                .map(|x| x.addr)
                .map_err(|e| format!("the patch needs {s}: {e}"))
        };
        let at_base = link(&lup.objects, va, &resolve)?;
        let need = at_base.bytes.len() as u64;
        let align = crate::link::alignment(&lup.objects);
        let start = self.space.find(need, align).ok_or(PatchError::AreaFull {
            used: self.space.in_use(),
            size: self.space.size,
            need,
        })?;
        let linked = if start == 0 {
            at_base
        } else {
            link(&lup.objects, va + start, &resolve)?
        };
        let base = va + start;
        let area = vm.patch_area();
        let mut plan = Vec::new();
        for (f, site) in &olds {
            let new_addr = linked
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
            let current = self.current_bytes_before(site.addr, site.saved);
            plan.push(Write {
                function: f.old.clone(),
                site: Site {
                    addr: site.addr,
                    saved: current,
                },
                new_addr,
                old_size: f.old_size,
                leaving: self.leaving(&f.old, site.addr, f.old_size),
                bytes: jmp,
                // Reverting this patch puts back what it overwrote; a
                // cumulative one replaces the whole stack, so the original.
                restore: if replace { site.saved } else { current },
            });
        }
        // With --replace, sites of applied patches that the new one does not
        // cover go back to their original bytes in the same pause.
        if replace {
            for a in &self.applied {
                for sf in &a.functions {
                    if !plan.iter().any(|w| w.site.addr == sf.old_addr) {
                        let orig = self.original_bytes(sf.old_addr).unwrap_or(sf.saved);
                        plan.push(Write {
                            function: sf.function.clone(),
                            site: Site {
                                addr: sf.old_addr,
                                saved: self.current_bytes_before(sf.old_addr, orig),
                            },
                            new_addr: 0,
                            old_size: sf.old_size,
                            leaving: self.leaving(&sf.function, sf.old_addr, sf.old_size),
                            bytes: orig,
                            restore: orig,
                        });
                    }
                }
            }
        }
        // Code first: it is unreachable until a trampoline points at it.
        area.write(start, &linked.bytes)
            .map_err(|e| PatchError::Map(format!("patch area write: {e}")))?;
        let (pause, tries, tasks_checked) =
            switch(vm, paging, self.tasks.as_ref().map(|(l, p)| (l, *p)), &plan)?;
        self.space.take(start, need);
        if replace && self.all_checked(tasks_checked) {
            // The code of every replaced patch was left in this switch: no
            // vCPU or task is in it, and nothing jumps there any more.
            for a in &self.applied {
                self.space.release(a.code_addr - va);
            }
        }
        let functions: Vec<SwitchedFunction> = plan
            .iter()
            .filter(|w| w.new_addr != 0)
            .map(|w| SwitchedFunction {
                function: w.function.clone(),
                old_addr: w.site.addr,
                new_addr: w.new_addr,
                old_size: w.old_size,
                saved: w.restore,
            })
            .collect();
        if replace {
            self.applied.clear();
        }
        self.applied.push(AppliedPatch {
            name: m.name.clone(),
            description: m.description.clone(),
            version: m.version,
            depends: m.depends.clone(),
            functions: functions.clone(),
            code_addr: base,
            code_bytes: need,
        });
        Ok(PatchReport {
            name: m.name.clone(),
            functions,
            pause_us: pause.as_secs_f64() * 1e6,
            tries,
            sleeping_tasks_checked: tasks_checked,
            total_us: t0.elapsed().as_secs_f64() * 1e6,
        })
    }

    /// Whether a switch that checked `tasks_checked` sleeping tasks saw
    /// everything that can be inside kernel code: on Linux its sleeping
    /// tasks too; on the test kernel, whose tasks never sleep in kernel
    /// mode, the vCPUs.
    fn all_checked(&self, tasks_checked: Option<usize>) -> bool {
        tasks_checked.is_some() || !self.linux
    }

    /// Bytes of the patch area holding code (applied, or kept after a
    /// revert that could not prove it unused), and the area's size.
    pub fn area_usage(&self) -> (u64, u64) {
        (self.space.in_use(), self.space.size)
    }

    /// Code a vCPU must not be in when the site of `function` is switched:
    /// its own body, and the code of every applied patch that switched it
    /// (a stacked or cumulative patch leaves those behind too).
    fn leaving(&self, function: &str, addr: u64, size: u64) -> Vec<Leaving> {
        let mut v = vec![Leaving {
            function: function.to_owned(),
            start: addr,
            end: addr + size.max(TRAMPOLINE_LEN as u64),
        }];
        for a in &self.applied {
            if a.functions.iter().any(|f| f.old_addr == addr) {
                v.push(Leaving {
                    function: format!("{function} of patch {}", a.name),
                    start: a.code_addr,
                    end: a.code_addr + a.code_bytes,
                });
            }
        }
        v
    }

    /// What the bytes at `addr` were before the newest applied patch that
    /// switched it (for stacking: a new patch over it saves that patch's jmp).
    fn current_bytes_before(&self, addr: u64, original: [u8; 5]) -> [u8; 5] {
        self.applied
            .iter()
            .rev()
            .find_map(|a| {
                a.functions
                    .iter()
                    .find(|f| f.old_addr == addr)
                    .and_then(|f| trampoline::jmp_rel32(addr, f.new_addr).ok())
            })
            .unwrap_or(original)
    }

    /// The original (unpatched) bytes of a site some applied patch switched.
    fn original_bytes(&self, addr: u64) -> Option<[u8; 5]> {
        self.applied
            .iter()
            .find_map(|a| a.functions.iter().find(|f| f.old_addr == addr))
            .map(|f| f.saved)
    }

    /// Reverts the applied patch `name`: its trampolines go back to what
    /// they overwrote, in one pause.
    pub fn revert(&mut self, vm: &Vm, name: &str) -> Result<PatchReport, PatchError> {
        let t0 = Instant::now();
        let stack_err = |s: String| PatchError::Update(UpdateError::Stack(s));
        let idx = self
            .applied
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| stack_err(format!("no applied patch named '{name}'")))?;
        if let Some(d) = self.applied[idx + 1..]
            .iter()
            .find(|a| a.depends.iter().any(|d| d == name))
        {
            return Err(stack_err(format!(
                "patch '{}' depends on '{name}'; revert it first",
                d.name
            )));
        }
        let target = &self.applied[idx];
        for f in &target.functions {
            if let Some(later) = self.applied[idx + 1..]
                .iter()
                .find(|a| a.functions.iter().any(|g| g.old_addr == f.old_addr))
            {
                return Err(stack_err(format!(
                    "{} is switched again by the later patch '{}'; revert that first",
                    f.function, later.name
                )));
            }
        }
        let paging = introspect::kernel_paging(vm)?;
        // What runs after the revert is the original function or an earlier
        // patch's replacement; what is left is this patch's code.
        let code = Leaving {
            function: format!("patch {}", target.name),
            start: target.code_addr,
            end: target.code_addr + target.code_bytes,
        };
        let plan: Vec<Write> = target
            .functions
            .iter()
            .map(|f| Write {
                function: f.function.clone(),
                site: Site {
                    addr: f.old_addr,
                    saved: trampoline::jmp_rel32(f.old_addr, f.new_addr).unwrap_or(f.saved),
                },
                new_addr: 0,
                old_size: f.old_size,
                leaving: vec![code.clone()],
                bytes: f.saved,
                restore: f.saved,
            })
            .collect();
        let (pause, tries, tasks_checked) =
            switch(vm, paging, self.tasks.as_ref().map(|(l, p)| (l, *p)), &plan)?;
        let removed = self.applied.remove(idx);
        // Its code was left in the switch: nothing is in it, nothing jumps
        // there. Where sleeping tasks could not be checked (a Linux kernel
        // without BTF) one may still return into it: the bytes stay.
        if self.all_checked(tasks_checked) {
            if let Some(va) = self.va {
                self.space.release(removed.code_addr - va);
            }
        }
        Ok(PatchReport {
            name: removed.name,
            functions: removed.functions,
            pause_us: pause.as_secs_f64() * 1e6,
            tries,
            sleeping_tasks_checked: tasks_checked,
            total_us: t0.elapsed().as_secs_f64() * 1e6,
        })
    }
}

/// One 5-byte write at a site: `site.saved` is what must be there now.
struct Write {
    function: String,
    site: Site,
    new_addr: u64,
    old_size: u64,
    /// Code no vCPU may be in when this site is written.
    leaving: Vec<Leaving>,
    bytes: [u8; 5],
    restore: [u8; 5],
}

/// Why a paused switch did not happen.
enum Refused {
    /// A vCPU or a sleeping task is in code being left: try another pause.
    Busy(String, Active),
    /// Guest memory is not as expected: give up.
    Failed(String),
}

/// Pauses every vCPU (unless already paused), checks no vCPU is in code the
/// switch leaves (see [`update_engine::safety`]) and every site holds what
/// the plan expects, writes all sites, and resumes. Retries the pause a
/// bounded number of times while a vCPU is in that code. Returns the pause
/// time, the tries and how many sleeping tasks were checked (Linux).
fn switch(
    vm: &Vm,
    paging: PagingState,
    tasks: Option<(&TaskLayout, PagingState)>,
    plan: &[Write],
) -> Result<(Duration, u32, Option<usize>), PatchError> {
    // Where each site is in guest-physical memory (kernel text is not
    // writable through the guest's mapping; the VMM writes RAM directly).
    let mut gpas = Vec::new();
    for w in plan {
        let t = pagewalk::translate(vm.ram(), paging, w.site.addr).map_err(VmError::Walk)?;
        let end = pagewalk::translate(vm.ram(), paging, w.site.addr + 4).map_err(VmError::Walk)?;
        if end.gpa != t.gpa + 4 {
            return Err(UpdateError::UnsafeSite {
                function: w.function.clone(),
                addr: w.site.addr,
                why: "its first 5 bytes cross into a non-contiguous page".into(),
            }
            .into());
        }
        gpas.push(t.gpa);
    }
    // Everything the switch leaves, once (a stacked patch's code region is
    // named by each of its functions), not inside every pause.
    let mut leaving: Vec<Leaving> = plan.iter().flat_map(|w| w.leaving.clone()).collect();
    leaving.sort_by_key(|l| (l.start, l.end));
    leaving.dedup_by_key(|l| (l.start, l.end));
    let was_paused = vm.is_paused();
    for tries in 1..=MAX_TRIES {
        let t = Instant::now();
        if !was_paused {
            vm.pause()?;
        }
        let result = switch_paused(vm, tasks, plan, &gpas, &leaving);
        let took = t.elapsed();
        if !was_paused {
            vm.resume()?;
        }
        match result {
            Ok(checked) => return Ok((took, tries, checked)),
            Err(Refused::Busy(_, _)) if tries < MAX_TRIES && !was_paused => {
                std::thread::sleep(Duration::from_micros(200 * tries as u64));
            }
            Err(Refused::Busy(who, active)) => return Err(PatchError::Busy { who, active, tries }),
            Err(Refused::Failed(why)) => return Err(PatchError::Map(why)),
        }
    }
    Err(PatchError::Map("no pause succeeded".into()))
}

/// The writes, with every vCPU paused; nothing is written unless every
/// check passes: no vCPU, and (on Linux) no task that is not running, is in
/// code the switch leaves.
fn switch_paused(
    vm: &Vm,
    tasks: Option<(&TaskLayout, PagingState)>,
    plan: &[Write],
    gpas: &[u64],
    leaving: &[Leaving],
) -> Result<Option<usize>, Refused> {
    for v in 0..vm.vcpu_count() {
        if let Some(a) = vcpu_active(vm, v, leaving).map_err(Refused::Failed)? {
            return Err(Refused::Busy(format!("vCPU {v}"), a));
        }
    }
    let mut checked = None;
    if let Some((layout, paging)) = tasks {
        let sleeping = tasks::sleeping_tasks(vm, paging, layout, vm.vcpu_count())
            .map_err(|e| Refused::Failed(format!("walking the guest's tasks: {e}")))?;
        for t in &sleeping {
            if let Some(a) =
                stack_active(vm, paging, t.from, t.end, leaving).map_err(Refused::Failed)?
            {
                return Err(Refused::Busy(t.to_string(), a));
            }
        }
        checked = Some(sleeping.len());
    }
    check_and_write(vm, plan, gpas).map_err(Refused::Failed)?;
    Ok(checked)
}

/// Whether paused vCPU `v` is in kernel code being left: its RIP, or a word
/// on the live part of its kernel stack (read through its own page tables).
/// A vCPU in user mode has no kernel call in progress.
fn vcpu_active(vm: &Vm, v: u8, leaving: &[Leaving]) -> Result<Option<Active>, String> {
    let regs = vm.regs(v).map_err(|e| e.to_string())?;
    let sregs = vm.sregs(v).map_err(|e| e.to_string())?;
    if sregs.cs.selector & 3 != 0 {
        return Ok(None);
    }
    if let Some(a) = safety::check_rip(regs.rip, leaving) {
        return Ok(Some(a));
    }
    let (from, end) = safety::live_stack(regs.rsp);
    stack_active(vm, PagingState::from(&sregs), from, end, leaving)
}

/// Whether a word of the stack `[from, end)` is a return address into code
/// being left, reading up to `end` or the first unmapped page.
fn stack_active(
    vm: &Vm,
    paging: PagingState,
    from: u64,
    end: u64,
    leaving: &[Leaving],
) -> Result<Option<Active>, String> {
    let mut at = from;
    let mut buf = [0u8; 4096];
    while at < end {
        let Ok(t) = pagewalk::translate(vm.ram(), paging, at) else {
            break;
        };
        let page_end = (at | (t.page_size.bytes() - 1)).saturating_add(1);
        let n = (page_end.min(end) - at).min(buf.len() as u64) as usize;
        vm.ram()
            .read(t.gpa, &mut buf[..n])
            .map_err(|e| e.to_string())?;
        if let Some(a) = safety::check_stack(at, &buf[..n], leaving) {
            return Ok(Some(a));
        }
        at += n as u64;
    }
    Ok(None)
}

fn check_and_write(vm: &Vm, plan: &[Write], gpas: &[u64]) -> Result<(), String> {
    let ram = vm.ram();
    for (w, &gpa) in plan.iter().zip(gpas) {
        let mut now = [0u8; 5];
        ram.read(gpa, &mut now).map_err(|e| e.to_string())?;
        if now != w.site.saved {
            return Err(format!(
                "{} changed under us: {:02x?}, expected {:02x?}",
                w.function, now, w.site.saved
            ));
        }
    }
    for (i, (w, &gpa)) in plan.iter().zip(gpas).enumerate() {
        if let Err(e) = ram.write(gpa, &w.bytes) {
            // Undo what was written: all or nothing.
            for (u, &g) in plan[..i].iter().zip(gpas) {
                let _ = ram.write(g, &u.site.saved);
            }
            return Err(e.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_is_first_fit_aligned_and_reused_after_release() {
        let mut s = Space::new(1024);
        assert_eq!(s.find(100, 1), Some(0));
        s.take(0, 100);
        assert_eq!(s.find(10, 1), Some(128));
        s.take(128, 300);
        assert_eq!(
            s.find(600, 1),
            None,
            "only 1024 - 448 = 576 left at the end"
        );
        assert_eq!(s.find(500, 1), Some(448));
        s.take(448, 500);
        assert_eq!(s.in_use(), 900);
        // Freeing the middle run makes room there again, first fit.
        s.release(128);
        assert_eq!(s.in_use(), 600);
        assert_eq!(s.find(200, 1), Some(128));
        assert_eq!(s.find(400, 1), None);
        s.release(0);
        assert_eq!(s.find(400, 1), Some(0));
        s.release(448);
        assert_eq!((s.in_use(), s.find(1024, 1)), (0, Some(0)));
        // Releasing where nothing starts changes nothing.
        s.take(64, 1);
        s.release(65);
        assert_eq!(s.in_use(), 1);
        // A patch whose sections need more than a cache line gets a run
        // aligned to that.
        assert_eq!(s.find(100, 256), Some(256));
        assert_eq!(s.find(100, 1), Some(128));
        assert_eq!(s.find(10, 256), Some(0));
    }
}
