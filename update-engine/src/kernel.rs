//! The guest kernel as seen from outside: its image read out of guest
//! memory through its own page tables, its symbols (the ELF it was booted
//! from, or the kallsyms tables inside it) and which build it is.
//!
//! Nothing here needs the guest's cooperation. The VM is paused only long
//! enough to read vCPU 0's paging registers and copy its top-level page
//! table; the image is read while the guest runs (kernel text and rodata do
//! not move), through that copy.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use symbol_db::btf::Btf;
use symbol_db::dwarf::TypeDb;
use symbol_db::kallsyms::{self, KallsymsLayout};
use symbol_db::{KernelIdentity, KernelImage, SymbolError, SymbolTable};

use vmm_core::guest::{AreaInfo, Guest, PauseToken, Paused, PhysMemory};
use vmm_core::memory::MemoryError;
use vmm_core::pagewalk::{self, PageSize, PagingState, WalkError};
use vmm_core::vm::VmError;
use vmm_core::write_control::{ProtectError, Protection};

use crate::klog::LogLayout;
use crate::linux::TaskLayout;

/// Where x86-64 Linux links `_text` (`__START_KERNEL`, with the default
/// CONFIG_PHYSICAL_START of 16 MiB); the test kernel links there too.
pub const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;

/// The kernel image window: `__START_KERNEL_map` up to the module area.
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
const KERNEL_MAP_END: u64 = 0xffff_ffff_c000_0000;

/// Errors finding out about the guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    /// Pausing or reading vCPU state failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest is not yet running with paging on.
    #[error("the guest kernel is not running with 4-level paging yet ({0}); try again once it has booted")]
    NotRunning(WalkError),
    /// Nothing is mapped in the kernel image window.
    #[error("no kernel image is mapped at {KERNEL_MAP:#x}..{KERNEL_MAP_END:#x} in the guest's page tables")]
    NoImage,
    /// A symbol source failed.
    #[error(transparent)]
    Symbols(#[from] SymbolError),
}

/// What is known about the running guest kernel.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// Where the symbols came from, for people.
    pub source: String,
    /// The symbols, at the addresses the running kernel uses.
    pub symbols: SymbolTable,
    /// Build-id and banner, read from guest memory.
    pub identity: KernelIdentity,
    /// The running `_text` (start of kernel text).
    pub text: u64,
    /// KASLR slide of the kernel's virtual base: running `_text` minus the
    /// link-time one.
    pub slide: i64,
    /// Guest-physical address of `_text`.
    pub text_gpa: u64,
    /// Where the kallsyms tables were, when they were the source.
    pub kallsyms: Option<KallsymsLayout>,
    /// How long finding this out took.
    pub timings: Timings,
    /// Linux: where its tasks are (from its BTF), so a live patch can check
    /// sleeping tasks' stacks; why not, otherwise.
    pub tasks: Result<TaskLayout, String>,
    /// Linux: where its CPU feature bits are, for a patch's alternatives;
    /// why not, otherwise.
    pub cpu_caps: Result<CpuCaps, String>,
    /// Where its log is (`lucos dmesg`), from its BTF or the DWARF of the
    /// ELF it was booted from; why not, otherwise.
    pub log: Result<LogLayout, String>,
    /// Where the kernel keeps its modules (Linux with BTF).
    pub modules: Result<crate::modules::ModuleLayout, String>,
    /// vCPU 0's paging mode (long mode: constant once read; a reboot ends
    /// the VMM), read on first use.
    pub mode: std::sync::OnceLock<PagingState>,
}

/// Where a Linux kernel keeps the CPU features it booted with and patched
/// its own alternatives for: `boot_cpu_data.x86_capability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuCaps {
    /// Address of the array (`u32` words, bit `n` of the whole array is
    /// feature `n`).
    pub addr: u64,
    /// Its length in 32-bit words (capability and bug words together).
    pub words: u64,
}

impl CpuCaps {
    /// Where this kernel's feature bits are, from its BTF and symbols.
    pub fn new(btf: &Btf, symbols: &SymbolTable) -> Result<Self, String> {
        let base = symbols
            .lookup("boot_cpu_data")
            .map_err(|e| e.to_string())?
            .addr;
        // In an anonymous union with an alignment member (Linux 6.1).
        let (offset, size) = btf
            .member_of("cpuinfo_x86", "x86_capability")
            .map_err(|e| e.to_string())?;
        Ok(Self {
            addr: base + offset,
            words: size / 4,
        })
    }

    /// Whether the running kernel has feature `bit`, read from guest memory
    /// through `paging`.
    pub fn has(&self, vm: &dyn Guest, paging: PagingState, bit: u16) -> Result<bool, String> {
        let word = u64::from(bit / 32);
        if word >= self.words {
            return Err(format!(
                "feature bit {bit} is past the running kernel's {} capability words",
                self.words
            ));
        }
        let mut b = [0u8; 4];
        read_virt(vm, paging, self.addr + word * 4, &mut b).map_err(|e| e.to_string())?;
        Ok(u32::from_le_bytes(b) & (1 << (bit % 32)) != 0)
    }
}

/// One answer of a `symbols` request: the symbol, or why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SymbolAnswer {
    /// Found.
    Found(symbol_db::Answer),
    /// Not found, or ambiguous.
    Failed {
        /// The query.
        query: String,
        /// Why.
        error: String,
    },
}

/// What `symbols` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SymbolsInfo {
    /// Where the symbols came from.
    pub source: String,
    /// Build-id and banner read from guest memory.
    pub identity: symbol_db::KernelIdentity,
    /// The running `_text`.
    #[serde(with = "symbol_db::hex_u64")]
    pub text: u64,
    /// Guest-physical address of `_text`.
    #[serde(with = "symbol_db::hex_u64")]
    pub text_gpa: u64,
    /// KASLR slide of the virtual base, in bytes.
    pub slide: i64,
    /// Number of symbols.
    pub count: usize,
    /// Where the kallsyms tables were (kallsyms source only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kallsyms: Option<symbol_db::kallsyms::KallsymsLayout>,
    /// How long inspecting the kernel took (once; later requests reuse it).
    pub timings: Timings,
    /// Answers to the queries, in order.
    pub answers: Vec<SymbolAnswer>,
    /// Every symbol, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symbols: Option<Vec<symbol_db::Symbol>>,
}

/// Time spent inspecting the guest kernel, in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// Reading the kernel image out of guest memory (page walks and copies).
    pub read_image_us: u64,
    /// Finding and decoding the symbol tables.
    pub decode_us: u64,
    /// Bytes of image read.
    pub image_bytes: u64,
}

/// vCPU 0's paging registers, pausing the VM for the read if it runs.
pub fn kernel_paging(vm: &dyn Guest) -> Result<PagingState, IntrospectError> {
    Ok(pinned_paging(vm)?.0)
}

/// vCPU 0's paging registers as they are, read in a pause: the paging mode
/// (CR0, CR4, EFER), for walks through another top-level table (the
/// kernel's own, where it has one). Cheaper than [`kernel_paging`], which
/// also pins vCPU 0's tables and compares what they map.
pub fn paging_mode(vm: &dyn Guest) -> Result<PagingState, IntrospectError> {
    let paused = Paused::new(vm)?;
    let state = paused.vcpu(0);
    paused.resume()?;
    Ok(state?.paging)
}

/// vCPU 0's paging registers and its top-level tables as they were in the
/// same pause (see [`PinnedTables`]).
pub fn pinned_paging(vm: &dyn Guest) -> Result<(PagingState, PinnedTables<'_>), IntrospectError> {
    let paused = Paused::new(vm)?;
    let state = paused.vcpu(0);
    let pinned = state
        .as_ref()
        .ok()
        .map(|s| PinnedTables::new(vm, &paused, s.paging));
    paused.resume()?;
    let paging = state?.paging;
    let pinned = pinned.expect("made when the state was read");
    let vm: &dyn Guest = &pinned;
    // With page-table isolation a vCPU in user mode runs on the user copy of
    // the top-level table, the kernel's plus 4 KiB, which maps almost none of
    // the kernel image: use the kernel's when it maps more of the window.
    if paging.cr3 & 0x1000 != 0 {
        let kernel = PagingState {
            cr3: paging.cr3 & !0x1000,
            ..paging
        };
        let mapped = |p: PagingState| -> u64 {
            mapped_runs(vm, p, KERNEL_MAP, KERNEL_MAP_END)
                .iter()
                .map(|r| r.2)
                .sum()
        };
        if mapped(kernel) > mapped(paging) {
            return Ok((kernel, pinned));
        }
    }
    Ok((paging, pinned))
}

/// Mask of a top-level table's address in CR3 (bits 12..51; the low bits
/// are PCID or flags).
const CR3_TABLE: u64 = 0x000f_ffff_ffff_f000;

/// The guest as vCPU 0 saw it in one pause: its top-level page table(s)
/// copied in that pause, read from the copy, everything else from the
/// guest. vCPU 0 may be on the page tables of a short-lived process; the
/// process can exit and its top-level table be freed and reused while the
/// image is read (the guest runs on), and a walk through it would then find
/// nothing, or something else. The kernel's half of every process's table
/// points to the kernel's own lower-level tables, which live as long as the
/// kernel, so walks through the copy stay right.
pub struct PinnedTables<'a> {
    guest: &'a dyn Guest,
    /// (guest-physical address, copy) of each table.
    tables: Vec<(u64, Box<[u8; 4096]>)>,
}

impl std::fmt::Debug for PinnedTables<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at: Vec<String> = self.tables.iter().map(|t| format!("{:#x}", t.0)).collect();
        f.debug_struct("PinnedTables").field("tables", &at).finish()
    }
}

impl<'a> PinnedTables<'a> {
    /// Copies the top-level table `paging` names and, with page-table
    /// isolation, the kernel's beside it (the guest must be paused).
    fn new(guest: &'a dyn Guest, _paused: &Paused, paging: PagingState) -> Self {
        let user = paging.cr3 & CR3_TABLE;
        let mut tables = Vec::new();
        let mut at = vec![user];
        if user & 0x1000 != 0 {
            at.push(user & !0x1000);
        }
        for gpa in at {
            let mut t = Box::new([0u8; 4096]);
            // A table that is not RAM: nothing to pin (the walk will say so).
            if guest.ram().read_phys(gpa, &mut t[..]).is_ok() {
                tables.push((gpa, t));
            }
        }
        PinnedTables { guest, tables }
    }
}

impl PhysMemory for PinnedTables<'_> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.guest.ram().read_phys(gpa, buf)?;
        let end = gpa + buf.len() as u64;
        for (at, table) in &self.tables {
            let (lo, hi) = (gpa.max(*at), end.min(at + 4096));
            if lo < hi {
                buf[(lo - gpa) as usize..(hi - gpa) as usize]
                    .copy_from_slice(&table[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        Ok(())
    }

    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.guest.ram().write_phys(gpa, buf)
    }
}

impl Guest for PinnedTables<'_> {
    fn ram(&self) -> &dyn PhysMemory {
        self
    }
    fn vcpu_count(&self) -> u8 {
        self.guest.vcpu_count()
    }
    fn is_paused(&self) -> bool {
        self.guest.is_paused()
    }
    fn pause_vcpus(&self) -> Result<std::time::Duration, VmError> {
        self.guest.pause_vcpus()
    }
    fn resume_vcpus(&self) -> Result<(), VmError> {
        self.guest.resume_vcpus()
    }
    fn vcpu_state(
        &self,
        paused: &PauseToken,
        v: u8,
    ) -> Result<vmm_core::guest::VcpuState, VmError> {
        self.guest.vcpu_state(paused, v)
    }
    fn area(&self) -> AreaInfo {
        self.guest.area()
    }
    fn area_write(&self, offset: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        self.guest.area_write(offset, bytes)
    }
    fn area_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.guest.area_read(offset, buf)
    }
    fn change_protection(
        &self,
        paused: &PauseToken,
        release: &[String],
        add: &[Protection],
    ) -> Result<(), ProtectError> {
        self.guest.change_protection(paused, release, add)
    }
    fn protections(&self) -> Vec<Protection> {
        self.guest.protections()
    }
    fn ram_ranges(&self) -> Vec<(u64, u64)> {
        self.guest.ram_ranges()
    }
    fn set_dirty_log(&self, on: bool) -> Result<(), VmError> {
        self.guest.set_dirty_log(on)
    }
    fn dirty_pages(&self) -> Result<Option<Vec<u64>>, VmError> {
        self.guest.dirty_pages()
    }
}

/// Reads `buf.len()` bytes at guest-virtual `gva`.
pub fn read_virt(
    vm: &dyn Guest,
    paging: PagingState,
    mut gva: u64,
    buf: &mut [u8],
) -> Result<(), IntrospectError> {
    let mut done = 0;
    while done < buf.len() {
        let t = pagewalk::translate(vm.ram(), paging, gva).map_err(VmError::Walk)?;
        let page = t.page_size.bytes();
        let n = ((page - (gva & (page - 1))) as usize).min(buf.len() - done);
        vm.ram()
            .read_phys(t.gpa, &mut buf[done..done + n])
            .map_err(VmError::Memory)?;
        done += n;
        gva += n as u64;
    }
    Ok(())
}

/// The mapped pages of `[start, end)`: (virtual address, guest-physical, length).
fn mapped_runs(vm: &dyn Guest, paging: PagingState, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
    let mut runs = Vec::new();
    let mut va = start;
    while va < end && va != u64::MAX {
        match pagewalk::translate(vm.ram(), paging, va) {
            Ok(t) => {
                let page = t.page_size.bytes();
                let len = page - (va & (page - 1));
                runs.push((va, t.gpa, len.min(end - va)));
                va = va.saturating_add(len);
            }
            // Skip the rest of whatever level was missing, at least 4 KiB.
            Err(WalkError::NotPresent { level, .. }) => {
                let step: u64 = match level {
                    "PML4" => 512 << 30,
                    "PDPT" => 1 << 30,
                    "PD" => PageSize::Size2M.bytes(),
                    _ => PageSize::Size4K.bytes(),
                };
                va = (va & !(step - 1)).saturating_add(step);
            }
            Err(_) => va = va.saturating_add(PageSize::Size4K.bytes()),
        }
    }
    runs
}

/// Reads the kernel image out of guest memory: every page mapped in the
/// kernel window from the first mapped one, unmapped holes as zeros.
pub fn read_kernel_image(
    vm: &dyn Guest,
    paging: PagingState,
) -> Result<KernelImage, IntrospectError> {
    read_image_range(vm, paging, KERNEL_MAP, KERNEL_MAP_END)
}

fn read_image_range(
    vm: &dyn Guest,
    paging: PagingState,
    start: u64,
    end: u64,
) -> Result<KernelImage, IntrospectError> {
    // The patch area, once a patch mapped it into the kernel window (at
    // its top), is the VMM's memory, not the kernel image, and not RAM: a
    // view of the kernel built after a patch (in a VMM that took the guest
    // over) must leave it out.
    let area = vm.area();
    let runs: Vec<_> = mapped_runs(vm, paging, start, end)
        .into_iter()
        .filter(|&(_, gpa, len)| gpa + len <= area.gpa || gpa >= area.gpa + area.size)
        .collect();
    let (first, last) = match (runs.first(), runs.last()) {
        (Some(f), Some(l)) => (f.0, l.0 + l.2),
        _ => return Err(IntrospectError::NoImage),
    };
    let mut bytes = vec![0u8; (last - first) as usize];
    for (va, gpa, len) in runs {
        let at = (va - first) as usize;
        vm.ram()
            .read_phys(gpa, &mut bytes[at..at + len as usize])
            .map_err(VmError::Memory)?;
    }
    Ok(KernelImage::new(first, bytes))
}

/// Finds out what kernel the guest runs. `boot_kernel` is the file it was
/// booted from: an ELF with a symbol table (the test kernel, a vmlinux with
/// symbols) is the source, checked against the build-id in memory;
/// otherwise the kallsyms tables in guest memory are decoded.
pub fn inspect(vm: &dyn Guest, boot_kernel: &Path) -> Result<GuestKernel, IntrospectError> {
    // The image is read while the guest runs on, through vCPU 0's top-level
    // table as copied in the pause (PinnedTables: the process vCPU 0 was in
    // may exit meanwhile). A walk that still fails gets a fresh look.
    let mut tries = 0;
    loop {
        tries += 1;
        match inspect_once(vm, boot_kernel) {
            Err(IntrospectError::Vm(VmError::Walk(e))) if tries < 3 => {
                log::debug!("inspecting the guest kernel: {e}; again with vCPU 0's tables now");
            }
            other => return other,
        }
    }
}

fn inspect_once(vm: &dyn Guest, boot_kernel: &Path) -> Result<GuestKernel, IntrospectError> {
    let (paging, pinned) = pinned_paging(vm)?;
    let vm: &dyn Guest = &pinned;
    if let Err(e) = pagewalk::translate(vm.ram(), paging, KERNEL_MAP) {
        if matches!(e, WalkError::PagingDisabled | WalkError::UnsupportedMode) {
            return Err(IntrospectError::NotRunning(e));
        }
    }
    let file = std::fs::read(boot_kernel).ok();
    let name = boot_kernel.display().to_string();
    if let Some(data) = file.as_deref().filter(|d| d.starts_with(b"\x7fELF")) {
        if let Ok(symbols) = SymbolTable::from_elf_bytes(data, &name) {
            let file_image = KernelImage::from_elf_bytes(data, &name)?;
            let base = file_image.base();
            let end = base + file_image.bytes().len() as u64;
            let image = read_image_range(vm, paging, base & !0xfff, end)?;
            let identity = KernelIdentity::from_image(&image, &symbols);
            identity.check_same(&KernelIdentity::from_elf(data, &name)?, &name)?;
            let text = text_of(&symbols).unwrap_or(base);
            let btf = kernel_btf(&image, &symbols);
            let (tasks, cpu_caps) = linux_layouts(&btf, &symbols);
            let mut g = finish(
                vm,
                paging,
                format!("ELF symbols of {name}"),
                symbols,
                identity,
                text,
                None,
            )?;
            g.log = log_layout(&btf, Some((data, &name)), &g, paging);
            g.modules = module_layout(&btf, &g, paging);
            return Ok(GuestKernel {
                tasks,
                cpu_caps,
                ..g
            });
        }
    }
    let t0 = Instant::now();
    let image = read_kernel_image(vm, paging)?;
    let t1 = Instant::now();
    let k = kallsyms::decode(&image)?;
    let timings = Timings {
        read_image_us: (t1 - t0).as_micros() as u64,
        decode_us: t1.elapsed().as_micros() as u64,
        image_bytes: image.bytes().len() as u64,
    };
    let identity = KernelIdentity::from_image(&image, &k.table);
    let text = text_of(&k.table).unwrap_or(image.base());
    let btf = kernel_btf(&image, &k.table);
    let (tasks, cpu_caps) = linux_layouts(&btf, &k.table);
    let mut g = finish(
        vm,
        paging,
        "kallsyms in guest memory".into(),
        k.table,
        identity,
        text,
        Some(k.layout),
    )?;
    g.log = log_layout(&btf, None, &g, paging);
    g.modules = module_layout(&btf, &g, paging);
    Ok(GuestKernel {
        timings,
        tasks,
        cpu_caps,
        ..g
    })
}

fn text_of(symbols: &SymbolTable) -> Option<u64> {
    ["_text", "_stext", "__kernel_start"]
        .iter()
        .find_map(|n| symbols.all_named(n).first().map(|s| s.addr))
}

fn finish(
    vm: &dyn Guest,
    paging: PagingState,
    source: String,
    symbols: SymbolTable,
    identity: KernelIdentity,
    text: u64,
    kallsyms: Option<KallsymsLayout>,
) -> Result<GuestKernel, IntrospectError> {
    let text_gpa = pagewalk::translate(vm.ram(), paging, text)
        .map_err(VmError::Walk)?
        .gpa;
    Ok(GuestKernel {
        source,
        symbols,
        identity,
        text,
        slide: text.wrapping_sub(LINK_TEXT) as i64,
        text_gpa,
        kallsyms,
        timings: Timings::default(),
        tasks: Err("not looked for".into()),
        cpu_caps: Err("not looked for".into()),
        log: Err("not looked for".into()),
        modules: Err("not looked for".into()),
        mode: Default::default(),
    })
}

/// The BTF in a Linux kernel's image.
fn kernel_btf(image: &KernelImage, symbols: &SymbolTable) -> Result<Btf, String> {
    let (Ok(start), Ok(stop)) = (symbols.lookup("__start_BTF"), symbols.lookup("__stop_BTF"))
    else {
        return Err("the kernel has no BTF (CONFIG_DEBUG_INFO_BTF)".to_owned());
    };
    let bytes = image
        .read(start.addr, stop.addr.saturating_sub(start.addr) as usize)
        .ok_or("the kernel's BTF is not in its mapped image")?;
    Btf::parse(bytes).map_err(|e| e.to_string())
}

/// The task layout and CPU features of a Linux kernel, from its BTF.
fn linux_layouts(
    btf: &Result<Btf, String>,
    symbols: &SymbolTable,
) -> (Result<TaskLayout, String>, Result<CpuCaps, String>) {
    match btf {
        Ok(btf) => (TaskLayout::new(btf, symbols), CpuCaps::new(btf, symbols)),
        Err(e) => (Err(e.clone()), Err(e.clone())),
    }
}

/// Where the kernel `g` keeps its modules, from its BTF, read through its
/// own top-level page table (as its log).
fn module_layout(
    btf: &Result<Btf, String>,
    g: &GuestKernel,
    paging: PagingState,
) -> Result<crate::modules::ModuleLayout, String> {
    let own = match g.symbols.lookup("init_top_pgt") {
        Ok(s) => PagingState {
            cr3: s.addr.wrapping_sub(g.text).wrapping_add(g.text_gpa),
            ..paging
        },
        Err(_) => paging,
    };
    match btf {
        Ok(btf) => crate::modules::ModuleLayout::from_btf(btf, &g.symbols, own),
        Err(e) => Err(e.clone()),
    }
}

/// Where the kernel `g` keeps its log: from its BTF, else from the DWARF of
/// `elf` (the image it was booted from, and its name). It is read through
/// the kernel's own top-level page table where the symbols name it
/// (`init_top_pgt`; a vCPU's may belong to a process that exits), else
/// through `paging` (vCPU 0's now).
fn log_layout(
    btf: &Result<Btf, String>,
    elf: Option<(&[u8], &str)>,
    g: &GuestKernel,
    paging: PagingState,
) -> Result<LogLayout, String> {
    let own = match g.symbols.lookup("init_top_pgt") {
        Ok(s) => PagingState {
            cr3: s.addr.wrapping_sub(g.text).wrapping_add(g.text_gpa),
            ..paging
        },
        Err(_) => paging,
    };
    let btf_err = match btf {
        Ok(btf) => return LogLayout::from_btf(btf, &g.symbols, own),
        Err(e) => e,
    };
    let Some((data, name)) = elf else {
        return Err(btf_err.clone());
    };
    let types = TypeDb::from_elf(data, name)
        .map_err(|e| format!("neither BTF ({btf_err}) nor DWARF ({e})"))?;
    LogLayout::from_dwarf(&types, name, &g.symbols, own)
}

impl GuestKernel {
    /// Uses the file at `path` (a vmlinux or System.map of this very build)
    /// as the symbol source instead, after checking it is this build: an
    /// ELF by build-id and banner, a System.map by every uniquely named
    /// symbol's address (after the KASLR slide) against the running
    /// kernel's.
    pub fn with_file_source(&self, path: &Path) -> Result<GuestKernel, IntrospectError> {
        let name = path.display().to_string();
        let data = symbol_db::read_file(path)?;
        let file_symbols = SymbolTable::from_file(path)?;
        let file_text = text_of(&file_symbols).unwrap_or(LINK_TEXT);
        let shift = self.text.wrapping_sub(file_text);
        if data.starts_with(b"\x7fELF") {
            self.identity
                .check_same(&KernelIdentity::from_elf(&data, &name)?, &name)?;
        }
        let mut compared = 0usize;
        let mut differ = Vec::new();
        for s in file_symbols.iter() {
            let (&[ours], &[theirs]) = (
                self.symbols.all_named(&s.name).as_slice(),
                file_symbols.all_named(&s.name).as_slice(),
            ) else {
                continue;
            };
            // Absolute (per-CPU) symbols do not move with the slide.
            let want = if ours.ty.eq_ignore_ascii_case(&'a') {
                theirs.addr
            } else {
                theirs.addr.wrapping_add(shift)
            };
            compared += 1;
            if ours.addr != want {
                differ.push(format!(
                    "{} at {:#x}, running kernel {:#x}",
                    s.name, want, ours.addr
                ));
            }
        }
        if compared == 0 || !differ.is_empty() {
            return Err(SymbolError::Mismatch {
                source_name: name,
                why: if compared == 0 {
                    "no symbol in common with the running kernel".into()
                } else {
                    format!(
                        "{} of {compared} symbols are elsewhere (first: {})",
                        differ.len(),
                        differ[0]
                    )
                },
            }
            .into());
        }
        let moved = file_symbols
            .iter()
            .map(|s| {
                let mut s = s.clone();
                if !s.ty.eq_ignore_ascii_case(&'a') {
                    s.addr = s.addr.wrapping_add(shift);
                }
                s
            })
            .collect();
        Ok(GuestKernel {
            source: format!(
                "{name} (checked against the running kernel: {compared} symbols agree)"
            ),
            symbols: SymbolTable::from_symbols(moved),
            identity: self.identity.clone(),
            text: self.text,
            slide: self.slide,
            text_gpa: self.text_gpa,
            kallsyms: self.kallsyms,
            timings: self.timings,
            tasks: self.tasks.clone(),
            cpu_caps: self.cpu_caps.clone(),
            log: self.log.clone(),
            modules: self.modules.clone(),
            mode: Default::default(),
        })
    }
}
