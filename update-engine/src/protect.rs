//! Write-control policy: what the guest may write on pages lucos protects.
//!
//! - A live patch's jumps (`patch:NAME`) and ranges protected by name
//!   (`user:NAME`) are never written by the guest: every write to them is
//!   refused and reported.
//! - Copies of data whose layout a patch changes (`data:P:S`, `.../old`)
//!   are written by anyone and kept coherent ([`crate::data`]); a patch's
//!   own new variables (`data:P/own`) are written by anyone.
//! - Kernel text integrity (`kernel-text`, opt-in, `lucos protect
//!   --kernel-text`): the kernel's own text patching is allowed, everything
//!   else refused. On Linux that patching (text_poke: ftrace, jump labels,
//!   static calls, kprobes, alternatives of late CPU features) writes only
//!   through its private address space `poking_mm`, so a write made with
//!   that address space's CR3 is the kernel's own; other kernels can name
//!   the functions allowed to write (`--allow-writer`), checked by the
//!   writing instruction's address.
//!
//! - A patched module's `state` (`watch:OWNER`, OWNER the owner of the
//!   patch's jumps in it) is written by anyone; a write that takes the
//!   module out of `live` (the guest unloads it: its memory is freed next)
//!   ends the protection of those jumps at once, and holds the writing vCPU
//!   while the patcher releases the ranges
//!   ([`crate::patcher::Patcher::on_module_event`]); the write that makes
//!   it `unformed` (just before its memory is freed) does the same for the
//!   watch itself. The modules list head (`watch:modules`) and the state and
//!   list node of a module being loaded (`watch:coming/...`) hold their
//!   vCPU too, for the patcher to act before the module's code can run.
//!
//! Unprotected bytes of a protected page are always written (vmm-core does
//! that before the policy is asked).

use std::sync::RwLock;

use vmm_core::guest::PhysMemory;
use vmm_core::write_control::{Decision, TrappedWrite, WritePolicy, DATA_OWNER_PREFIX};

/// Owner of the kernel-text ranges.
pub const KERNEL_TEXT_OWNER: &str = "kernel-text";
/// Physical-address bits of CR3 (no PCID, no flags).
const CR3_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Prefix of the owners of watches on patched modules' state.
pub const WATCH_PREFIX: &str = "watch:";
/// Owner of the watch on the kernel's `modules` list head: a module being
/// loaded is added there (while lucos holds a patch for a module not
/// loaded yet).
pub const LIST_WATCH: &str = "watch:modules";
/// Prefix of the owners of watches on the state of a module being loaded
/// that a held patch is for: `watch:coming/MODULE@ADDR`.
pub const COMING_PREFIX: &str = "watch:coming/";

/// What a watched write tells the patcher about the guest's modules. The
/// vCPU that wrote is held until the VMM releases it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleEvent {
    /// The modules list head's first node is now `node` (a module being
    /// loaded was added, or the first one removed).
    Listed {
        /// The held vCPU.
        vcpu: u8,
        /// The new first node.
        node: u64,
    },
    /// A module a held patch is for became `coming`: relocated, its
    /// alternatives and ftrace sites done, read-only, none of its code run.
    Coming {
        /// The held vCPU.
        vcpu: u8,
        /// The watch's owner (`watch:coming/MODULE@ADDR`).
        owner: String,
    },
    /// A patched module left `live`: the guest is unloading it (or its
    /// init failed), `state` 2; or it is about to be freed, `state` 3
    /// (`free_module` makes it `unformed` first).
    Going {
        /// The held vCPU.
        vcpu: u8,
        /// The owner of the patch's jumps in it.
        owner: String,
        /// The state written.
        state: u32,
    },
    /// A module being loaded that a held patch waits for left the list
    /// before it was `coming` (its load failed): its `list.prev` was
    /// poisoned.
    Dropped {
        /// The held vCPU.
        vcpu: u8,
        /// The watch's owner (`watch:coming/MODULE@ADDR`).
        owner: String,
    },
}

/// What `list_del_rcu` leaves in a removed node's `prev`.
pub const LIST_POISON2: u64 = 0xdead_0000_0000_0122;

impl ModuleEvent {
    /// The vCPU to release once the event is dealt with.
    pub fn vcpu(&self) -> u8 {
        match self {
            ModuleEvent::Listed { vcpu, .. }
            | ModuleEvent::Coming { vcpu, .. }
            | ModuleEvent::Going { vcpu, .. }
            | ModuleEvent::Dropped { vcpu, .. } => *vcpu,
        }
    }
}

/// Owner of the watch on the state of the module whose jumps `owner` owns.
pub fn watch_owner(owner: &str) -> String {
    format!("{WATCH_PREFIX}{owner}")
}

/// Who may write the kernel's text.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Writers {
    /// Guest-physical address of Linux's text-patching page table (`poking_mm->pgd`).
    pub poking_pgd: Option<u64>,
    /// Functions allowed to write: (name, start, end) guest-virtual.
    pub functions: Vec<(String, u64, u64)>,
}

/// The policy lucos installs in every VM.
#[derive(Debug, Default)]
pub struct GuardPolicy {
    writers: RwLock<Writers>,
    data: std::sync::Arc<crate::data::DataTracker>,
    /// Owners of jumps in modules the guest has begun to unload.
    released: RwLock<std::collections::HashSet<String>>,
    /// Module events whose vCPUs are held, for the VMM's watcher.
    events: std::sync::Mutex<std::collections::VecDeque<ModuleEvent>>,
    events_cv: std::sync::Condvar,
}

impl GuardPolicy {
    /// A policy that refuses every write to protected bytes until kernel
    /// text integrity names its writers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The data changes it keeps coherent (the patcher adds them).
    pub fn data(&self) -> std::sync::Arc<crate::data::DataTracker> {
        self.data.clone()
    }

    /// Sets who may write kernel text.
    pub fn set_writers(&self, w: Writers) {
        *self.writers.write().unwrap_or_else(|e| e.into_inner()) = w;
    }

    /// The next module event, waiting up to `timeout` for one. Its vCPU is
    /// held until released: every event must be dealt with.
    pub fn next_module_event(&self, timeout: std::time::Duration) -> Option<ModuleEvent> {
        let q = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let (mut q, _) = self
            .events_cv
            .wait_timeout_while(q, timeout, |q| q.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        q.pop_front()
    }

    /// Who may write kernel text now.
    pub fn writers(&self) -> Writers {
        self.writers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl GuardPolicy {
    /// Notes a write to a watched module state: the module leaving `live`
    /// releases the jumps of the watch's owner.
    fn watch(
        &self,
        w: &TrappedWrite<'_>,
        p: &vmm_core::write_control::Protection,
        ram: &dyn PhysMemory,
    ) {
        let mut state = [0u8; 4];
        if ram.read_phys(p.gpa, &mut state).is_err() {
            return;
        }
        for (i, b) in state.iter_mut().enumerate() {
            let at = p.gpa + i as u64;
            if at >= w.gpa && at < w.gpa + w.data.len() as u64 {
                *b = w.data[(at - w.gpa) as usize];
            }
        }
        if u32::from_le_bytes(state) != 0 {
            let owner = &p.owner[WATCH_PREFIX.len()..];
            let mut r = self.released.write().unwrap_or_else(|e| e.into_inner());
            if r.insert(owner.to_owned()) {
                log::info!(
                    "vCPU {}: {} is being unloaded; its patched jumps are the guest's again",
                    w.vcpu,
                    p.label.trim_end_matches(" state")
                );
            }
        }
    }
}

impl WritePolicy for GuardPolicy {
    fn decide(&self, w: &TrappedWrite<'_>, ram: &dyn PhysMemory) -> Decision {
        for p in w.touches.iter().filter(|p| {
            p.owner.starts_with(WATCH_PREFIX)
                && p.owner != LIST_WATCH
                && !p.owner.starts_with(COMING_PREFIX)
        }) {
            self.watch(w, p, ram);
        }
        // Watches, and jumps in modules being unloaded: written.
        let touches: Vec<_> = {
            let r = self.released.read().unwrap_or_else(|e| e.into_inner());
            w.touches
                .iter()
                .filter(|p| !p.owner.starts_with(WATCH_PREFIX) && !r.contains(&p.owner))
                .collect()
        };
        if touches.is_empty() {
            return Decision::Allow;
        }
        // Copies of data being tracked: written, then transferred
        // (`committed`), whoever writes; a patch's own variables: written.
        if touches.iter().all(|p| {
            p.owner.starts_with(DATA_OWNER_PREFIX)
                && (crate::data::is_own(&p.owner) || self.data.get(&p.owner).is_some())
        }) {
            return Decision::Allow;
        }
        if touches.iter().any(|p| p.owner != KERNEL_TEXT_OWNER) {
            return Decision::Refuse;
        }
        let a = self.writers.read().unwrap_or_else(|e| e.into_inner());
        let own_mapping = a
            .poking_pgd
            .is_some_and(|pgd| w.cr3 != 0 && w.cr3 & CR3_ADDR == pgd);
        let own_function = w.rip != 0
            && a.functions
                .iter()
                .any(|(_, start, end)| w.rip >= *start && w.rip < *end);
        if w.cpl == 0 && (own_mapping || own_function) {
            Decision::Allow
        } else {
            Decision::Refuse
        }
    }

    fn holds(&self, w: &TrappedWrite<'_>, mem: &dyn PhysMemory) -> bool {
        let mut events = Vec::new();
        for p in w
            .touches
            .iter()
            .filter(|p| p.owner.starts_with(WATCH_PREFIX))
        {
            let mut v = [0u8; 8];
            let n = (p.len as usize).min(8);
            if mem.read_phys(p.gpa, &mut v[..n]).is_err() {
                continue;
            }
            let value = u64::from_le_bytes(v);
            let vcpu = w.vcpu;
            if p.owner == LIST_WATCH {
                // Only a write of the head's `next` (the first 8 bytes).
                if w.gpa < p.gpa + 8 {
                    events.push(ModuleEvent::Listed { vcpu, node: value });
                }
            } else if p.owner.starts_with(COMING_PREFIX) {
                // Its state (4 bytes) becoming `coming`, or its list node's
                // `prev` (8 bytes) poisoned by its removal.
                if p.len == 4 && value == 1 {
                    events.push(ModuleEvent::Coming {
                        vcpu,
                        owner: p.owner.clone(),
                    });
                } else if p.len == 8 && value == LIST_POISON2 {
                    events.push(ModuleEvent::Dropped {
                        vcpu,
                        owner: p.owner.clone(),
                    });
                }
            } else if value != 0 {
                events.push(ModuleEvent::Going {
                    vcpu,
                    owner: p.owner[WATCH_PREFIX.len()..].to_owned(),
                    state: value as u32,
                });
            }
        }
        // One event per hold: the first says what the watcher looks at.
        let Some(e) = events.into_iter().next() else {
            return false;
        };
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(e);
        self.events_cv.notify_all();
        true
    }

    fn committed(&self, w: &TrappedWrite<'_>, mem: &dyn PhysMemory) {
        let mut done: Vec<&str> = Vec::new();
        for p in &w.touches {
            if !p.owner.starts_with(DATA_OWNER_PREFIX)
                || crate::data::is_own(&p.owner)
                || done.contains(&p.owner.as_str())
            {
                continue;
            }
            done.push(&p.owner);
            let (from, to) = (
                w.gpa.max(p.gpa),
                (w.gpa + w.data.len() as u64).min(p.gpa + p.len),
            );
            // What an adding instruction added, for the range it wrote.
            let before = (!w.before.is_empty()).then(|| {
                let at = (from - w.gpa) as usize;
                &w.before[at..at + (to - from) as usize]
            });
            if let Err(e) = self.data.transfer(&p.owner, from, to - from, before, mem) {
                log::error!("vCPU {}: transferring a write of {}: {e}", w.vcpu, p.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_core::write_control::Protection;

    fn prot(owner: &str) -> Protection {
        Protection {
            owner: owner.into(),
            label: "x".into(),
            gpa: 0x1000,
            len: 16,
            access: vmm_core::write_control::Access::Trapped,
        }
    }

    struct NoRam;
    impl PhysMemory for NoRam {
        fn read_phys(&self, _: u64, _: &mut [u8]) -> Result<(), vmm_core::memory::MemoryError> {
            Ok(())
        }
        fn write_phys(&self, _: u64, _: &[u8]) -> Result<(), vmm_core::memory::MemoryError> {
            Ok(())
        }
    }

    fn write<'a>(touches: Vec<&'a Protection>, rip: u64, cpl: u8, cr3: u64) -> TrappedWrite<'a> {
        TrappedWrite {
            vcpu: 0,
            rip,
            cpl,
            cr3,
            gpa: 0x1000,
            data: &[0x90],
            touches,
            before: Vec::new(),
        }
    }

    #[test]
    fn patches_are_never_written_and_kernel_text_only_by_its_own_patcher() {
        let pol = GuardPolicy::new();
        let (patch, text) = (prot("patch:fix"), prot(KERNEL_TEXT_OWNER));
        // Nobody is allowed yet.
        assert_eq!(
            pol.decide(&write(vec![&text], 0x10, 0, 0x5000), &NoRam),
            Decision::Refuse
        );
        pol.set_writers(Writers {
            poking_pgd: Some(0x5000),
            functions: vec![("poke".into(), 0x100, 0x200)],
        });
        // The poking address space (any PCID bits) or the named function, in kernel mode.
        assert_eq!(
            pol.decide(&write(vec![&text], 0x10, 0, 0x5003), &NoRam),
            Decision::Allow
        );
        assert_eq!(
            pol.decide(&write(vec![&text], 0x150, 0, 0x9000), &NoRam),
            Decision::Allow
        );
        assert_eq!(
            pol.decide(&write(vec![&text], 0x10, 0, 0x9000), &NoRam),
            Decision::Refuse
        );
        assert_eq!(
            pol.decide(&write(vec![&text], 0x150, 3, 0x9000), &NoRam),
            Decision::Refuse
        );
        // A patch's jump: never, whoever writes.
        assert_eq!(
            pol.decide(&write(vec![&text, &patch], 0x150, 0, 0x5000), &NoRam),
            Decision::Refuse
        );
        assert_eq!(
            pol.decide(&write(vec![&patch], 0x150, 0, 0x5000), &NoRam),
            Decision::Refuse
        );
    }

    /// RAM of one page at 0x1000, for the watches' values.
    struct Page(std::sync::Mutex<Vec<u8>>);
    impl PhysMemory for Page {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), vmm_core::memory::MemoryError> {
            let m = self.0.lock().expect("page");
            let at = (gpa - 0x1000) as usize;
            buf.copy_from_slice(&m[at..at + buf.len()]);
            Ok(())
        }
        fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), vmm_core::memory::MemoryError> {
            let mut m = self.0.lock().expect("page");
            let at = (gpa - 0x1000) as usize;
            m[at..at + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }

    /// What write control does with an allowed write: into RAM, then
    /// `committed`, then `holds`.
    fn allowed(
        pol: &GuardPolicy,
        ram: &Page,
        touches: Vec<&Protection>,
        gpa: u64,
        data: &[u8],
    ) -> (Decision, bool) {
        let w = TrappedWrite {
            vcpu: 1,
            rip: 0x10,
            cpl: 0,
            cr3: 0,
            gpa,
            data,
            touches,
            before: Vec::new(),
        };
        let d = pol.decide(&w, ram);
        if d != Decision::Allow {
            return (d, false);
        }
        ram.write_phys(gpa, data).expect("write");
        pol.committed(&w, ram);
        (d, pol.holds(&w, ram))
    }

    fn at(owner: &str, gpa: u64, len: u64) -> Protection {
        Protection {
            owner: owner.into(),
            label: "module m state".into(),
            gpa,
            len,
            access: vmm_core::write_control::Access::Trapped,
        }
    }

    #[test]
    fn module_watches_are_written_and_hold_their_vcpu_for_the_events_that_matter() {
        let pol = GuardPolicy::new();
        let ram = Page(std::sync::Mutex::new(vec![0u8; 4096]));
        let owner = "patch:fix@m/1";
        let jump = at(owner, 0x1100, 5);
        let state = at(&watch_owner(owner), 0x1200, 4);
        let list = at(LIST_WATCH, 0x1300, 8);
        let coming = at(&format!("{COMING_PREFIX}m@ffffffffc0001000"), 0x1400, 4);
        let none = std::time::Duration::ZERO;

        // The module's jump: refused while it is live.
        assert_eq!(
            allowed(&pol, &ram, vec![&jump], 0x1100, &[0x90]).0,
            Decision::Refuse
        );
        // COMING -> LIVE: written, no event.
        assert_eq!(
            allowed(&pol, &ram, vec![&state], 0x1200, &0u32.to_le_bytes()),
            (Decision::Allow, false)
        );
        assert_eq!(pol.next_module_event(none), None);
        // LIVE -> GOING: written, the vCPU held, the jump the guest's again.
        assert_eq!(
            allowed(&pol, &ram, vec![&state], 0x1200, &2u32.to_le_bytes()),
            (Decision::Allow, true)
        );
        assert_eq!(
            pol.next_module_event(none),
            Some(ModuleEvent::Going {
                vcpu: 1,
                owner: owner.into(),
                state: 2
            })
        );
        assert_eq!(
            allowed(&pol, &ram, vec![&jump], 0x1100, &[0x90]).0,
            Decision::Allow
        );
        // Another apply's jumps in a reloaded module are protected again.
        let again = at("patch:fix@m/2", 0x1100, 5);
        assert_eq!(
            allowed(&pol, &ram, vec![&again], 0x1100, &[0x90]).0,
            Decision::Refuse
        );

        // The list head's next: every write is an event; its prev is not.
        let node = 0xffff_ffff_c000_1008u64;
        assert_eq!(
            allowed(&pol, &ram, vec![&list], 0x1300, &node.to_le_bytes()),
            (Decision::Allow, true)
        );
        assert_eq!(
            pol.next_module_event(none),
            Some(ModuleEvent::Listed { vcpu: 1, node })
        );
        // A module being loaded: only its state becoming `coming` (1) holds.
        assert_eq!(
            allowed(&pol, &ram, vec![&coming], 0x1400, &3u32.to_le_bytes()),
            (Decision::Allow, false)
        );
        assert_eq!(
            allowed(&pol, &ram, vec![&coming], 0x1400, &1u32.to_le_bytes()),
            (Decision::Allow, true)
        );
        assert_eq!(
            pol.next_module_event(none),
            Some(ModuleEvent::Coming {
                vcpu: 1,
                owner: coming.owner.clone()
            })
        );
        // A byte write of the state: the rest of it from RAM.
        assert_eq!(
            allowed(&pol, &ram, vec![&coming], 0x1401, &[0]),
            (Decision::Allow, true)
        );
        assert!(pol.next_module_event(none).is_some());
        // Its list node removed before it was coming (a failed load).
        let prev = at(&coming.owner, 0x1408, 8);
        assert_eq!(
            allowed(&pol, &ram, vec![&prev], 0x1408, &LIST_POISON2.to_le_bytes()),
            (Decision::Allow, true)
        );
        assert_eq!(
            pol.next_module_event(none),
            Some(ModuleEvent::Dropped {
                vcpu: 1,
                owner: coming.owner.clone()
            })
        );
        assert_eq!(pol.next_module_event(none), None);
    }
}
