//! The switch: in one pause of every vCPU, check that nothing is in code the
//! switch leaves (every vCPU's RIP and live kernel stack; on Linux, every
//! sleeping task's saved stack too) and that every byte to be written holds
//! what the plan expects, then write them all, undoing the ones written if
//! one fails. Retried, with back-off, while something is in that code.

use std::time::{Duration, Instant};

use vmm_core::guest::{Guest, Paused};
use vmm_core::pagewalk::{self, PagingState};
use vmm_core::vm::VmError;
use vmm_core::write_control::Protection;

use crate::linux::{self, TaskLayout};
use crate::safety::{self, Active, Leaving};

/// Pauses tried before giving up while something keeps being in code that
/// the switch leaves.
pub const MAX_TRIES: u32 = 100;

/// One checked write of guest-physical memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// What is written, for messages.
    pub what: String,
    /// Where.
    pub gpa: u64,
    /// What must be there when the switch happens.
    pub expect: Vec<u8>,
    /// What is written.
    pub bytes: Vec<u8>,
}

/// One write to the patch area (VMM memory) in the switch's pause, checked
/// like a [`Write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaWrite {
    /// What is written, for messages.
    pub what: String,
    /// Offset in the area.
    pub offset: u64,
    /// What must be there.
    pub expect: Vec<u8>,
    /// What is written.
    pub bytes: Vec<u8>,
}

/// Everything one switch does.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The writes, all or none.
    pub writes: Vec<Write>,
    /// Code nothing may be in when they happen.
    pub leaving: Vec<Leaving>,
    /// Write control, in the same pause after the writes: owners whose
    /// protected ranges are released...
    pub release: Vec<String>,
    /// ...and ranges protected (the bytes the switch wrote).
    pub protect: Vec<Protection>,
    /// Data copies made first, in the same pause (a data-layout change:
    /// the new copy from the old at apply, the old from the new at revert).
    pub copies: Vec<DataCopy>,
    /// Values carried within the patch area in the same pause, after the
    /// copies: a replaced patch's variables into the cumulative patch's.
    pub carry: Vec<Carry>,
    /// Writes to the patch area, after the carried values (lucos's
    /// exception index: [`crate::extable`]).
    pub area_writes: Vec<AreaWrite>,
}

/// One variable's bytes carried from one place of the patch area to
/// another in the switch's pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carry {
    /// What it is, for messages.
    pub what: String,
    /// Offset of the value now.
    pub from: u64,
    /// Offset it goes to.
    pub to: u64,
    /// Bytes.
    pub len: u64,
}

/// Carries `carry`; what it overwrote is added to `undo`.
fn run_carry(guest: &dyn Guest, carry: &[Carry], undo: &mut Vec<CopyUndo>) -> Result<(), String> {
    for c in carry {
        let (mut value, mut before) = (vec![0u8; c.len as usize], vec![0u8; c.len as usize]);
        let read = guest
            .area_read(c.from, &mut value)
            .and_then(|()| guest.area_read(c.to, &mut before));
        if let Err(e) = read.and_then(|()| guest.area_write(c.to, &value)) {
            undo_copies(guest, undo);
            return Err(format!("carrying {}: {e}", c.what));
        }
        undo.push(CopyUndo {
            area: true,
            at: c.to,
            bytes: before,
        });
    }
    Ok(())
}

/// Makes `writes` in the patch area, each checked first; what they
/// overwrote is added to `undo`.
fn run_area_writes(
    guest: &dyn Guest,
    writes: &[AreaWrite],
    undo: &mut Vec<CopyUndo>,
) -> Result<(), String> {
    for w in writes {
        let mut now = vec![0u8; w.expect.len()];
        let r = guest
            .area_read(w.offset, &mut now)
            .map_err(|e| e.to_string());
        let r = r.and_then(|()| {
            if now == w.expect {
                guest
                    .area_write(w.offset, &w.bytes)
                    .map_err(|e| e.to_string())
            } else {
                Err("it changed under us".into())
            }
        });
        if let Err(e) = r {
            undo_copies(guest, undo);
            return Err(format!("writing {}: {e}", w.what));
        }
        undo.push(CopyUndo {
            area: true,
            at: w.offset,
            bytes: now,
        });
    }
    Ok(())
}

/// One object copied between its layouts in the switch's pause.
#[derive(Debug, Clone)]
pub struct DataCopy {
    /// The change.
    pub change: crate::data::DataChange,
    /// Guest-physical start of the old copy (RAM).
    pub old_gpa: u64,
    /// Offset of the new copy in the patch area.
    pub new_offset: u64,
    /// Old→new (apply) or new→old (revert).
    pub to_new: bool,
    /// The patch's C transfer functions, run on each element after the
    /// derived transfer.
    pub c: Option<std::sync::Arc<crate::transfer::CRunner>>,
}

/// What a data copy overwrote, to put back if the switch fails after it.
struct CopyUndo {
    /// In the patch area (a new copy) or in RAM (an old copy).
    area: bool,
    at: u64,
    bytes: Vec<u8>,
}

/// Makes `copies`, element by element; returns what they overwrote.
fn run_copies(guest: &dyn Guest, copies: &[DataCopy]) -> Result<Vec<CopyUndo>, String> {
    let mut undo = Vec::new();
    for c in copies {
        let d = &c.change;
        let mut old = vec![0u8; d.old_bytes() as usize];
        let mut new = vec![0u8; d.new_bytes() as usize];
        let what = |e: vmm_core::memory::MemoryError| format!("copying {}: {e}", d.symbol);
        let read = guest
            .ram()
            .read_phys(c.old_gpa, &mut old)
            .and_then(|()| guest.area_read(c.new_offset, &mut new));
        if let Err(e) = read {
            // An earlier copy of this switch (a change undone first) goes
            // back too.
            undo_copies(guest, &undo);
            return Err(what(e));
        }
        let (os, ns) = (d.old_size as usize, d.new_size as usize);
        let before = if c.to_new { new.clone() } else { old.clone() };
        // Every element is computed before anything is written: a C
        // transfer that fails leaves both copies as they were.
        // Derived first, element by element; then the C functions over the
        // whole object in as few sandbox calls as fit.
        for (o, n) in old.chunks_mut(os).zip(new.chunks_mut(ns)) {
            if c.to_new {
                d.to_new(o, n);
            } else {
                d.to_old(n, o);
            }
        }
        let computed = match (&c.c, c.to_new) {
            (None, _) => Ok(()),
            (Some(r), true) => r.to_new_all(&old, &mut new),
            (Some(r), false) => r.to_old_all(&new, &mut old),
        };
        if let Err(e) = computed {
            undo_copies(guest, &undo);
            return Err(e);
        }
        let wrote = if c.to_new {
            guest.area_write(c.new_offset, &new)
        } else {
            guest.ram().write_phys(c.old_gpa, &old)
        };
        if let Err(e) = wrote {
            undo_copies(guest, &undo);
            return Err(what(e));
        }
        undo.push(CopyUndo {
            area: c.to_new,
            at: if c.to_new { c.new_offset } else { c.old_gpa },
            bytes: before,
        });
    }
    Ok(undo)
}

/// Puts back what data copies overwrote (best effort: memory the VMM
/// wrote a moment ago).
fn undo_copies(guest: &dyn Guest, undo: &[CopyUndo]) {
    for u in undo.iter().rev() {
        let r = if u.area {
            guest.area_write(u.at, &u.bytes)
        } else {
            guest.ram().write_phys(u.at, &u.bytes)
        };
        if let Err(e) = r {
            log::error!("undoing a data copy at {:#x}: {e}", u.at);
        }
    }
}

/// What a switch took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Switched {
    /// From the pause request until the writes were done.
    pub pause: Duration,
    /// Where the time of that pause went.
    pub phases: PausePhases,
    /// Pauses it took.
    pub tries: u32,
    /// Sleeping tasks whose stacks were checked (None: none could be, so
    /// only vCPUs were).
    pub tasks_checked: Option<usize>,
}

/// Where the time of a switch's pause went, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PausePhases {
    /// Stopping every vCPU (the request until the last is out).
    pub stop_us: f64,
    /// Reading each vCPU's state and checking it (RIP, registers, stack).
    pub vcpus_us: f64,
    /// Walking the sleeping tasks and their stacks (Linux), and the pages
    /// written since a pointer scan scanned again (if the switch has one).
    pub tasks_us: f64,
    /// Data copies and carried variables.
    pub data_us: f64,
    /// Checking and writing the bytes.
    pub writes_us: f64,
    /// Write control: the protection change (and memory slots, if any).
    pub protection_us: f64,
}

/// Where the time of an apply went before its switch's pause, in
/// microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PreparePhases {
    /// Reading and parsing the `.lup`.
    pub read_us: f64,
    /// Checking its signature and target.
    pub verify_us: f64,
    /// Reading the guest's module list (patched modules, the patch's).
    pub modules_us: f64,
    /// Finding each replaced function in the running kernel and checking
    /// its bytes.
    pub resolve_us: f64,
    /// Linking and placing the new code in the patch area.
    pub place_us: f64,
    /// The switch's plan: jumps, sites, exception index, data copies and
    /// their transfer functions' dry run.
    pub plan_us: f64,
    /// A first patch of kernel text: relaying the text (its own pause).
    pub relay_us: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// Something stayed in code being left through every try.
    #[error("in each of {tries} pauses something was still in code the patch replaces, or pointed into data it changes (last: {who} {active}{}); nothing was changed, try again", also(others))]
    Busy {
        /// `vCPU N`, or `task PID (COMM)`.
        who: String,
        /// What it was doing there.
        active: Active,
        /// Other sleeping tasks in that code in the last pause.
        others: Vec<String>,
        /// Pauses tried.
        tries: u32,
    },
    /// Guest memory was not as the plan expects, or could not be read.
    #[error("{0}")]
    Guest(String),
    /// A write failed and undoing the ones before it failed too: guest
    /// memory holds part of the switch. Never seen; reported loudly.
    #[error("the switch was written only in part and could not be undone: {0}")]
    Torn(String),
    /// Pausing or reading a vCPU failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The other tasks found in code being left, for a message: at most 10
/// named.
pub fn also(others: &[String]) -> String {
    match others.len() {
        0 => String::new(),
        n => format!(
            "; {n} more task{} there too: {}{}",
            if n == 1 { "" } else { "s" },
            others
                .iter()
                .take(10)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", "),
            if n > 10 { ", ..." } else { "" }
        ),
    }
}

/// Why one paused attempt did not write (or, `Torn`, wrote in part).
enum Refused {
    Busy(String, Active, Vec<String>),
    Failed(String),
    Torn(String),
}

/// Runs `plan` in a pause of `guest` (or in the pause it is in already, then
/// without retries); `tasks`: a Linux kernel's task layout and its own page
/// tables, to check sleeping tasks.
pub fn switch(
    guest: &dyn Guest,
    tasks: Option<(&TaskLayout, PagingState)>,
    plan: &Plan,
) -> Result<Switched, SwitchError> {
    switch_tries(guest, tasks, plan, MAX_TRIES)
}

/// [`switch`] with at most `max_tries` pauses (at least one).
pub fn switch_tries(
    guest: &dyn Guest,
    tasks: Option<(&TaskLayout, PagingState)>,
    plan: &Plan,
    max_tries: u32,
) -> Result<Switched, SwitchError> {
    switch_checked(guest, tasks, plan, max_tries, &mut |_| Ok(None))
}

/// What else holds a switch back, asked first in its pause (before the
/// vCPUs and tasks are checked): who and what, or `None`.
pub type PauseCheck<'c> = dyn FnMut(&Paused<'_>) -> Result<Option<(String, Active)>, String> + 'c;

/// [`switch_tries`] with one more check in each pause.
pub fn switch_checked(
    guest: &dyn Guest,
    tasks: Option<(&TaskLayout, PagingState)>,
    plan: &Plan,
    max_tries: u32,
    check: &mut PauseCheck<'_>,
) -> Result<Switched, SwitchError> {
    let max_tries = max_tries.max(1);
    let mut leaving = plan.leaving.clone();
    leaving.sort_by_key(|l| (l.start, l.end));
    leaving.dedup_by_key(|l| (l.start, l.end));
    for tries in 1..=max_tries {
        let t = Instant::now();
        let paused = Paused::new(guest)?;
        let mut phases = PausePhases {
            stop_us: us(t.elapsed()),
            ..PausePhases::default()
        };
        let result = switch_paused(&paused, tasks, plan, &leaving, &mut phases, check);
        let took = t.elapsed();
        let was_paused = paused.was_paused();
        let resumed = paused.resume();
        match result {
            // The writes are in: the switch happened, whatever resuming
            // says (a VM being stopped cannot be resumed).
            Ok(tasks_checked) => {
                if let Err(e) = resumed {
                    log::warn!("the switch is done, but resuming the guest failed: {e}");
                }
                return Ok(Switched {
                    pause: took,
                    phases,
                    tries,
                    tasks_checked,
                });
            }
            Err(Refused::Torn(why)) => return Err(SwitchError::Torn(why)),
            Err(refused) => {
                // Nothing was written; the guest must run again before
                // anything else.
                resumed?;
                match refused {
                    Refused::Busy(..) if tries < max_tries && !was_paused => {
                        std::thread::sleep(Duration::from_micros(200 * u64::from(tries)));
                    }
                    Refused::Busy(who, active, others) => {
                        return Err(SwitchError::Busy {
                            who,
                            active,
                            others,
                            tries,
                        })
                    }
                    Refused::Failed(why) | Refused::Torn(why) => {
                        return Err(SwitchError::Guest(why))
                    }
                }
            }
        }
    }
    unreachable!("the last try returns")
}

/// One try, every vCPU paused: nothing is written unless every check passes.
fn switch_paused(
    paused: &Paused<'_>,
    tasks: Option<(&TaskLayout, PagingState)>,
    plan: &Plan,
    leaving: &[Leaving],
    phases: &mut PausePhases,
    check: &mut PauseCheck<'_>,
) -> Result<Option<usize>, Refused> {
    let guest = paused.guest();
    let mut t = Instant::now();
    let lap = |t: &mut Instant| {
        let d = us(t.elapsed());
        *t = Instant::now();
        d
    };
    // Nothing any vCPU or task could be in (an immediate switch of
    // one-instruction sites): nothing to walk.
    let mut checked = None;
    if leaving.is_empty() && tasks.is_some() {
        checked = Some(0);
    }
    let tasks = tasks.filter(|_| !leaving.is_empty());
    // The current tasks' stacks, read only if a vCPU needs them.
    let current = std::cell::OnceCell::new();
    let task_stack = |v: u8| -> Result<Option<u64>, String> {
        let Some((layout, paging)) = tasks else {
            return Ok(None);
        };
        let stacks = match current.get() {
            Some(c) => c,
            None => {
                let c = linux::current_stacks(guest, paging, layout, guest.vcpu_count())
                    .map_err(|e| format!("reading the guest's current tasks: {e}"))?;
                current.get_or_init(|| c)
            }
        };
        Ok(stacks.get(usize::from(v)).copied().flatten())
    };
    // Memory first: a word saved in memory seldom goes soon, and is the
    // cause to name when every pause also finds a vCPU passing through.
    if let Some((who, a)) = check(paused).map_err(Refused::Failed)? {
        return Err(Refused::Busy(who, a, Vec::new()));
    }
    let memory_us = lap(&mut t);
    for v in (0..guest.vcpu_count()).filter(|_| !leaving.is_empty()) {
        if let Some(a) = vcpu_active(paused, v, leaving, &task_stack).map_err(Refused::Failed)? {
            return Err(Refused::Busy(format!("vCPU {v}"), a, Vec::new()));
        }
    }
    phases.vcpus_us = lap(&mut t);
    if let Some((layout, paging)) = tasks {
        let sleeping = linux::sleeping_tasks(guest, paging, layout, guest.vcpu_count())
            .map_err(|e| Refused::Failed(format!("walking the guest's tasks: {e}")))?;
        // Every sleeper in code being left is named, not just the first.
        let mut busy: Option<(String, Active)> = None;
        let mut others = Vec::new();
        for t in &sleeping {
            if let Some(a) =
                stack_active(guest, paging, t.from, t.end, leaving).map_err(Refused::Failed)?
            {
                match busy {
                    None => busy = Some((t.to_string(), a)),
                    Some(_) => others.push(t.to_string()),
                }
            }
        }
        if let Some((who, a)) = busy {
            return Err(Refused::Busy(who, a, others));
        }
        checked = Some(sleeping.len());
    }
    phases.tasks_us = lap(&mut t) + memory_us;
    let mut copied = run_copies(guest, &plan.copies).map_err(Refused::Failed)?;
    run_carry(guest, &plan.carry, &mut copied).map_err(Refused::Failed)?;
    run_area_writes(guest, &plan.area_writes, &mut copied).map_err(Refused::Failed)?;
    phases.data_us = lap(&mut t);
    if let Err(e) = check_and_write(guest, &plan.writes) {
        undo_copies(guest, &copied);
        return Err(e);
    }
    phases.writes_us = lap(&mut t);
    if !plan.release.is_empty() || !plan.protect.is_empty() {
        if let Err(e) = paused.change_protection(&plan.release, &plan.protect) {
            // Nothing of the protection changed (unless KVM could not even
            // put the old slots back): take the writes back too.
            let why = format!("write control: {e}");
            let torn = matches!(e, vmm_core::write_control::ProtectError::Torn(_));
            undo_copies(guest, &copied);
            return Err(match undo(guest, &plan.writes) {
                Ok(()) if !torn => Refused::Failed(why),
                Ok(()) => Refused::Torn(why),
                Err(u) => Refused::Torn(why + &u),
            });
        }
    }
    phases.protection_us = lap(&mut t);
    Ok(checked)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Puts back what `writes` overwrote, last first; what failed, if any.
fn undo(guest: &dyn Guest, writes: &[Write]) -> Result<(), String> {
    let mut why = String::new();
    for u in writes.iter().rev() {
        if let Err(e) = guest.ram().write_phys(u.gpa, &u.expect) {
            why.push_str(&format!(
                "; and undoing {} failed too ({e}): guest memory at {:#x} holds the new bytes",
                u.what, u.gpa
            ));
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why)
    }
}

/// Whether paused vCPU `v` is in kernel code being left, or holds a pointer
/// into data being left: its RIP or registers, or a word on the live part
/// of its kernel stack (read through its own page tables).
/// A vCPU in user mode has no kernel call in progress. `task_stack`: on
/// Linux, the kernel stack of the task current on vCPU `v`: when the vCPU
/// is on another stack (an interrupt's), the task it interrupted has its
/// frames, and the interrupted instruction pointer, on that one, which is
/// checked whole (its dead part too: conservative).
fn vcpu_active(
    paused: &Paused<'_>,
    v: u8,
    leaving: &[Leaving],
    task_stack: &dyn Fn(u8) -> Result<Option<u64>, String>,
) -> Result<Option<Active>, String> {
    let s = paused.vcpu(v).map_err(|e| e.to_string())?;
    if s.cpl != 0 {
        return Ok(None);
    }
    if let Some(a) =
        safety::check_rip(s.rip, leaving).or_else(|| safety::check_regs(&s.gprs, leaving))
    {
        return Ok(Some(a));
    }
    let (from, end) = safety::live_stack(s.rsp);
    if let Some(a) = stack_active(paused.guest(), s.paging, from, end, leaving)? {
        return Ok(Some(a));
    }
    match task_stack(v)? {
        Some(base) if !(base..base + linux::THREAD_SIZE).contains(&s.rsp) => stack_active(
            paused.guest(),
            s.paging,
            base,
            base + linux::THREAD_SIZE,
            leaving,
        ),
        _ => Ok(None),
    }
}

/// Whether a word of the stack `[from, end)` is a return address into code
/// being left, reading up to `end` or the first unmapped page.
fn stack_active(
    guest: &dyn Guest,
    paging: PagingState,
    from: u64,
    end: u64,
    leaving: &[Leaving],
) -> Result<Option<Active>, String> {
    let mut at = from;
    let mut buf = [0u8; 4096];
    while at < end {
        let Ok(t) = pagewalk::translate(guest.ram(), paging, at) else {
            break;
        };
        let page_end = (at | (t.page_size.bytes() - 1)).saturating_add(1);
        let n = (page_end.min(end) - at).min(buf.len() as u64) as usize;
        guest
            .ram()
            .read_phys(t.gpa, &mut buf[..n])
            .map_err(|e| e.to_string())?;
        if let Some(a) = safety::check_stack(at, &buf[..n], leaving) {
            return Ok(Some(a));
        }
        at += n as u64;
    }
    Ok(None)
}

/// Checks every write's expected bytes, then writes them all; if one write
/// fails, the ones done are undone (`Failed`), or, if undoing fails too,
/// the switch is `Torn`.
fn check_and_write(guest: &dyn Guest, writes: &[Write]) -> Result<(), Refused> {
    let ram = guest.ram();
    for w in writes {
        let mut now = vec![0u8; w.expect.len()];
        ram.read_phys(w.gpa, &mut now)
            .map_err(|e| Refused::Failed(e.to_string()))?;
        if now != w.expect {
            return Err(Refused::Failed(format!(
                "{} changed under us: {:02x?}, expected {:02x?}",
                w.what, now, w.expect
            )));
        }
    }
    for (i, w) in writes.iter().enumerate() {
        if let Err(e) = ram.write_phys(w.gpa, &w.bytes) {
            let why = format!("writing {}: {e}", w.what);
            return Err(match undo(guest, &writes[..i]) {
                Ok(()) => Refused::Failed(why),
                Err(u) => Refused::Torn(why + &u),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_core::guest::PhysMemory;
    use vmm_core::guest::{AreaInfo, PauseToken, VcpuState};
    use vmm_core::memory::MemoryError;
    use vmm_core::write_control::{ProtectError, Protection};

    /// Code being left, and a return address into it.
    const CODE: (u64, u64) = (0xffff_ffff_c000_0000, 0xffff_ffff_c000_0100);
    const RET: u64 = CODE.0 + 0x10;
    /// A task's kernel stack, and an interrupt stack (16 KiB each).
    const TASK: u64 = 0x8000;
    const IRQ: u64 = 0x1_0000;

    /// 2 MiB of RAM mapped 1:1 by one large page; one vCPU, as scripted.
    struct Machine {
        ram: Mutex<Vec<u8>>,
        vcpu: Mutex<VcpuState>,
    }

    fn paging() -> PagingState {
        PagingState {
            cr0: 0x8000_0011,
            cr3: 0x1000,
            cr4: 0x20,
            efer: 0x500,
        }
    }

    impl Machine {
        fn new(rsp: u64, cpl: u8) -> Self {
            let m = Machine {
                ram: Mutex::new(vec![0; 2 << 20]),
                vcpu: Mutex::new(VcpuState {
                    rip: 0xffff_ffff_8100_0000,
                    rsp,
                    cpl,
                    paging: paging(),
                    gprs: [0; 16],
                    tr_base: 0,
                }),
            };
            m.put(0x1000, 0x2000 | 3);
            m.put(0x2000, 0x3000 | 3);
            m.put(0x3000, 0x83);
            m
        }
        fn put(&self, gpa: u64, v: u64) {
            let mut r = self.ram.lock().expect("lock");
            r[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn active(&self, task_stack: Option<u64>) -> Option<Active> {
            let leaving = [Leaving {
                function: "old".into(),
                start: CODE.0,
                end: CODE.1,
                data: false,
            }];
            let paused = Paused::new(self).expect("pause");
            vcpu_active(&paused, 0, &leaving, &|_| Ok(task_stack)).expect("check")
        }
    }

    impl PhysMemory for Machine {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let r = self.ram.lock().expect("lock");
            buf.copy_from_slice(&r[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        }
        fn write_phys(&self, _: u64, _: &[u8]) -> Result<(), MemoryError> {
            unreachable!()
        }
    }

    impl Guest for Machine {
        fn ram(&self) -> &dyn PhysMemory {
            self
        }
        fn vcpu_count(&self) -> u8 {
            1
        }
        fn is_paused(&self) -> bool {
            false
        }
        fn pause_vcpus(&self) -> Result<Duration, VmError> {
            Ok(Duration::ZERO)
        }
        fn resume_vcpus(&self) -> Result<(), VmError> {
            Ok(())
        }
        fn vcpu_state(&self, _: &PauseToken, _: u8) -> Result<VcpuState, VmError> {
            Ok(*self.vcpu.lock().expect("lock"))
        }
        fn area(&self) -> AreaInfo {
            AreaInfo { gpa: 0, size: 0 }
        }
        fn area_write(&self, _: u64, _: &[u8]) -> Result<(), MemoryError> {
            unreachable!()
        }
        fn area_read(&self, _: u64, _: &mut [u8]) -> Result<(), MemoryError> {
            unreachable!()
        }
        fn change_protection(
            &self,
            _: &PauseToken,
            _: &[String],
            _: &[Protection],
        ) -> Result<(), ProtectError> {
            unreachable!()
        }
        fn protections(&self) -> Vec<Protection> {
            Vec::new()
        }
        fn ram_ranges(&self) -> Vec<(u64, u64)> {
            vec![(0, 2 << 20)]
        }
    }

    #[test]
    fn a_vcpu_on_an_interrupt_stack_has_the_task_it_interrupted_checked_whole() {
        // Paused on an interrupt's stack, nothing of the old code there;
        // the task it interrupted has a return address into it on its own.
        let m = Machine::new(IRQ + 0x3f00, 0);
        m.put(TASK + 0x2000, RET);
        assert!(
            matches!(m.active(Some(TASK)), Some(Active::OnStack { at, value, .. }) if at == TASK + 0x2000 && value == RET),
            "{:?}",
            m.active(Some(TASK))
        );
        // Without its task known (not Linux), only the vCPU's own stack.
        assert_eq!(m.active(None), None);
        // On the task's own stack: its live part only (the word below RSP
        // is dead), and the stack is not read again whole.
        let m = Machine::new(TASK + 0x3000, 0);
        m.put(TASK + 0x2000, RET);
        assert_eq!(m.active(Some(TASK)), None);
        m.put(TASK + 0x3800, RET);
        assert!(m.active(Some(TASK)).is_some());
        // In user mode nothing of the kernel's is in progress.
        let m = Machine::new(IRQ + 0x3f00, 3);
        m.put(TASK + 0x2000, RET);
        assert_eq!(m.active(Some(TASK)), None);
    }
}
