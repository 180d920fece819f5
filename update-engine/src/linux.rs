//! The tasks of a running Linux guest, read from outside while every vCPU is
//! paused: where each one that is not running on a CPU saved its kernel
//! stack pointer, so a live patch can check that no sleeping task is inside
//! a function it replaces (its return address on that task's stack).
//!
//! The layout comes from the kernel's own BTF (`task_struct.tasks`,
//! `.thread_group`, `.stack`, `.thread.sp`, `.pid`, `.comm`), the anchors from
//! its symbols (`init_task`, `__per_cpu_offset`, the per-CPU `current_task`).
//! The task list is walked forward only, as an RCU reader does: insertion and
//! removal keep every `next` pointer valid at every instruction, so a vCPU
//! paused in the middle of either cannot send the walk astray.

use symbol_db::btf::Btf;
use symbol_db::SymbolTable;

use vmm_core::guest::Guest;
use vmm_core::pagewalk::PagingState;

use crate::kernel as introspect;

/// Kernel stack size of an x86-64 task (THREAD_SIZE without KASAN).
pub const THREAD_SIZE: u64 = 16 << 10;
/// Upper bound on tasks walked (the list is cyclic; a bad read must not loop).
const MAX_TASKS: usize = 1 << 16;

/// Where things are in a Linux kernel's `task_struct`, and the anchors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLayout {
    /// Address of `init_top_pgt`, the kernel's own top-level page table
    /// (the walk reads through it: a vCPU's CR3 may belong to a process
    /// that has exited since).
    pub init_top_pgt: u64,
    /// Address of `init_task` (CPU 0's idle task, head of the task list).
    pub init_task: u64,
    /// Address of `__per_cpu_offset[]`.
    pub per_cpu_offset: u64,
    /// Per-CPU offset of `current_task`.
    pub current_task: u64,
    /// Offset of `task_struct.tasks` (the process list).
    pub tasks: u64,
    /// Offset of `task_struct.thread_group` (the threads of a process).
    pub thread_group: u64,
    /// Offset of `task_struct.stack`.
    pub stack: u64,
    /// Offset of `task_struct.thread.sp`: the stack pointer saved when the
    /// task was switched out.
    pub thread_sp: u64,
    /// Offset of `task_struct.pid`.
    pub pid: u64,
    /// Offset of `task_struct.comm`.
    pub comm: u64,
    /// Offset of `mm_struct.pgd` (the top-level page table of an address space).
    pub mm_pgd: u64,
}

impl TaskLayout {
    /// The layout of this kernel, from its BTF and symbols; an error says
    /// what is missing.
    pub fn new(btf: &Btf, symbols: &SymbolTable) -> Result<Self, String> {
        let sym = |n: &str| symbols.lookup(n).map(|s| s.addr).map_err(|e| e.to_string());
        let off = |p: &str| btf.offset_of("task_struct", p).map_err(|e| e.to_string());
        Ok(Self {
            init_top_pgt: sym("init_top_pgt")?,
            init_task: sym("init_task")?,
            per_cpu_offset: sym("__per_cpu_offset")?,
            current_task: sym("current_task")?,
            tasks: off("tasks")?,
            thread_group: off("thread_group")?,
            stack: off("stack")?,
            thread_sp: off("thread.sp")?,
            pid: off("pid")?,
            comm: off("comm")?,
            mm_pgd: btf
                .offset_of("mm_struct", "pgd")
                .map_err(|e| e.to_string())?,
        })
    }

    /// Paging through the kernel's own page table, `init_top_pgt`: the
    /// kernel image is physically contiguous, so its guest-physical address
    /// is that of `_text` (`text`, `text_gpa`) plus its offset. Other
    /// registers as in `paging`.
    pub fn paging(&self, paging: PagingState, text: u64, text_gpa: u64) -> PagingState {
        PagingState {
            cr3: self.init_top_pgt.wrapping_sub(text).wrapping_add(text_gpa),
            ..paging
        }
    }
}

/// A task that is not running: its saved kernel stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SleepingTask {
    /// Its pid (thread id).
    pub pid: i32,
    /// Its name.
    pub comm: String,
    /// Live part of its kernel stack: from the saved stack pointer to the
    /// end of the stack.
    pub from: u64,
    /// End of its kernel stack.
    pub end: u64,
}

impl std::fmt::Display for SleepingTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {} ({})", self.pid, self.comm)
    }
}

/// Guest-physical address of the top-level page table of the kernel's
/// text-patching address space (`poking_mm->pgd`): text_poke, and through
/// it ftrace, jump labels, static calls and kprobes, write kernel text only
/// through that temporary mapping, so a write with that CR3 is the kernel's
/// own text patching.
pub fn poking_pgd(
    vm: &dyn Guest,
    paging: PagingState,
    layout: &TaskLayout,
    symbols: &SymbolTable,
) -> Result<u64, String> {
    let var = symbols
        .lookup("poking_mm")
        .map_err(|e| format!("poking_mm: {e}"))?
        .addr;
    let mm = read_u64(vm, paging, var)?;
    if mm == 0 {
        return Err("poking_mm is not set up yet".into());
    }
    let pgd = read_u64(vm, paging, mm + layout.mm_pgd)?;
    let t = vmm_core::pagewalk::translate(vm.ram(), paging, pgd)
        .map_err(|e| format!("poking_mm->pgd {pgd:#x}: {e}"))?;
    Ok(t.gpa)
}

fn read_u64(vm: &dyn Guest, paging: PagingState, va: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    introspect::read_virt(vm, paging, va, &mut b).map_err(|e| format!("reading {va:#x}: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

/// Reads guest-virtual memory through one set of page tables, keeping the
/// last page it translated: task structs are in the direct map (2 MiB or
/// 1 GiB pages), so walking hundreds of tasks takes a handful of page-table
/// walks instead of several per task. Valid while the guest is paused.
struct Reader<'a> {
    vm: &'a dyn Guest,
    paging: PagingState,
    /// (virtual base, size, guest-physical base) of the last page.
    last: std::cell::Cell<Option<(u64, u64, u64)>>,
}

impl<'a> Reader<'a> {
    fn new(vm: &'a dyn Guest, paging: PagingState) -> Self {
        Reader {
            vm,
            paging,
            last: Default::default(),
        }
    }

    fn read(&self, mut va: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut done = 0;
        while done < buf.len() {
            let (base, size, gpa) = match self.last.get() {
                Some(c) if va >= c.0 && va - c.0 < c.1 => c,
                _ => {
                    let t = vmm_core::pagewalk::translate(self.vm.ram(), self.paging, va)
                        .map_err(|e| format!("reading {va:#x}: {e}"))?;
                    let size = t.page_size.bytes();
                    let base = va & !(size - 1);
                    let c = (base, size, t.gpa - (va - base));
                    self.last.set(Some(c));
                    c
                }
            };
            let n = ((base + size - va) as usize).min(buf.len() - done);
            self.vm
                .ram()
                .read_phys(gpa + (va - base), &mut buf[done..done + n])
                .map_err(|e| format!("reading {va:#x}: {e}"))?;
            done += n;
            va += n as u64;
        }
        Ok(())
    }

    fn u64(&self, va: u64) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Every task not current on one of the `cpus` CPUs, with its stack; the
/// VM must be paused, `paging` the kernel's own ([`TaskLayout::paging`]).
/// The current ones are the vCPUs' business: their live stacks are found
/// from their registers.
pub fn sleeping_tasks(
    vm: &dyn Guest,
    paging: PagingState,
    layout: &TaskLayout,
    cpus: u8,
) -> Result<Vec<SleepingTask>, String> {
    let r = Reader::new(vm, paging);
    let current = current_tasks(&r, layout, cpus)?;
    let mut out = Vec::new();
    each_task(&r, layout, |t| {
        if !current.contains(&t) {
            if let Some(s) = sleeping(&r, layout, t)? {
                out.push(s);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// The kernel stack (its lowest address; [`THREAD_SIZE`] bytes) of every
/// task, running ones included; the VM must be paused.
pub fn task_stacks(
    vm: &dyn Guest,
    paging: PagingState,
    layout: &TaskLayout,
) -> Result<Vec<u64>, String> {
    let r = Reader::new(vm, paging);
    let mut out = Vec::new();
    each_task(&r, layout, |t| {
        match r.u64(t + layout.stack)? {
            0 => {}
            stack => out.push(stack),
        }
        Ok(())
    })?;
    Ok(out)
}

/// The kernel stack (lowest address) of the task current on each of the
/// `cpus` CPUs (`None`: it has none); the VM must be paused.
pub fn current_stacks(
    vm: &dyn Guest,
    paging: PagingState,
    layout: &TaskLayout,
    cpus: u8,
) -> Result<Vec<Option<u64>>, String> {
    let r = Reader::new(vm, paging);
    current_tasks(&r, layout, cpus)?
        .into_iter()
        .map(|t| Ok(Some(r.u64(t + layout.stack)?).filter(|&s| s != 0)))
        .collect()
}

/// The task (`task_struct` address) current on each of the `cpus` CPUs.
fn current_tasks(r: &Reader<'_>, layout: &TaskLayout, cpus: u8) -> Result<Vec<u64>, String> {
    (0..u64::from(cpus))
        .map(|cpu| {
            let base = r.u64(layout.per_cpu_offset + 8 * cpu)?;
            r.u64(base.wrapping_add(layout.current_task))
        })
        .collect()
}

/// Calls `f` on every task (its `task_struct` address): each process from
/// `init_task` round the process list, each of its threads round its
/// thread group.
fn each_task(
    r: &Reader<'_>,
    layout: &TaskLayout,
    mut f: impl FnMut(u64) -> Result<(), String>,
) -> Result<(), String> {
    let mut seen = 0usize;
    let mut leader = layout.init_task;
    loop {
        // The threads of this process, from its leader round its ring.
        let mut t = leader;
        loop {
            seen += 1;
            if seen > MAX_TASKS {
                return Err(format!(
                    "the task list did not close after {MAX_TASKS} tasks"
                ));
            }
            f(t)?;
            t = r
                .u64(t + layout.thread_group)?
                .wrapping_sub(layout.thread_group);
            if t == leader {
                break;
            }
        }
        leader = r.u64(leader + layout.tasks)?.wrapping_sub(layout.tasks);
        if leader == layout.init_task {
            return Ok(());
        }
    }
}

/// Task `t`'s saved stack, or None if it has none (it has exited).
fn sleeping(r: &Reader<'_>, layout: &TaskLayout, t: u64) -> Result<Option<SleepingTask>, String> {
    let stack = r.u64(t + layout.stack)?;
    if stack == 0 {
        return Ok(None);
    }
    let end = stack + THREAD_SIZE;
    let sp = r.u64(t + layout.thread_sp)?;
    let mut pid = [0u8; 4];
    let mut comm = [0u8; 16];
    r.read(t + layout.pid, &mut pid)?;
    r.read(t + layout.comm, &mut comm)?;
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    Ok(Some(SleepingTask {
        pid: i32::from_le_bytes(pid),
        comm: String::from_utf8_lossy(&comm[..len]).into_owned(),
        // A saved pointer outside the stack (never seen) means the whole
        // stack is checked: conservative, never unsafe.
        from: if (stack..end).contains(&sp) {
            sp & !7
        } else {
            stack
        },
        end,
    }))
}
