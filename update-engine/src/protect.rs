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
//! Unprotected bytes of a protected page are always written (vmm-core does
//! that before the policy is asked).

use std::sync::RwLock;

use vmm_core::guest::PhysMemory;
use vmm_core::write_control::{Decision, TrappedWrite, WritePolicy, DATA_OWNER_PREFIX};

/// Owner of the kernel-text ranges.
pub const KERNEL_TEXT_OWNER: &str = "kernel-text";
/// Physical-address bits of CR3 (no PCID, no flags).
const CR3_ADDR: u64 = 0x000f_ffff_ffff_f000;

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

    /// Who may write kernel text now.
    pub fn writers(&self) -> Writers {
        self.writers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl WritePolicy for GuardPolicy {
    fn decide(&self, w: &TrappedWrite<'_>, _ram: &dyn PhysMemory) -> Decision {
        // Copies of data being tracked: written, then transferred
        // (`committed`), whoever writes; a patch's own variables: written.
        if w.touches.iter().all(|p| {
            p.owner.starts_with(DATA_OWNER_PREFIX)
                && (crate::data::is_own(&p.owner) || self.data.get(&p.owner).is_some())
        }) {
            return Decision::Allow;
        }
        if w.touches.iter().any(|p| p.owner != KERNEL_TEXT_OWNER) {
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
            if let Err(e) = self.data.transfer(&p.owner, from, to - from, mem) {
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
}
