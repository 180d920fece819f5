//! A paused VM's machine state: saved by one VMM process, loaded by
//! another that built a VM over the same guest memory (`lucos upgrade`).
//!
//! Guest memory is never copied: RAM and the patch area are memfds that the
//! new process maps. What moves is what KVM keeps (per vCPU: MP state,
//! registers, special registers, XSAVE with the FPU, XCRs, debug registers,
//! LAPIC, MSRs, pending events, TSC; per VM: kvmclock, PIC, IOAPIC, PIT) and
//! what the devices keep (COM1's registers, its unread input and the
//! guest's partial output line). The orderings are KVM's documented ones,
//! as rust-vmm users (Firecracker, Cloud Hypervisor) apply them: special
//! registers before the LAPIC (APIC base), MSRs after the LAPIC with the
//! TSC before the TSC deadline, events last; the VM's clock and interrupt
//! controllers before any vCPU.
//!
//! The TSC: where KVM offers the vCPU TSC offset attribute
//! (`KVM_VCPU_TSC_CTRL`, Linux 5.16+), the new vCPUs get the old ones'
//! offsets from the host TSC, so the guest's TSC runs on through the
//! handover, the same on every vCPU, and kvmclock is set with
//! `KVM_CLOCK_REALTIME` so that it runs on too. Elsewhere the TSC MSR is
//! written back and both clocks resume from where they were paused.
//!
//! The format is versioned ([`FORMAT`]); see docs/upgrade.md.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_device_attr, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::devices::SerialRegs;

use crate::vm::{Vm, VmError};
/// One CPUID entry as KVM takes it (serializable).
pub use kvm_bindings::kvm_cpuid_entry2 as CpuidEntry;

/// The machine-state format this build writes.
pub const FORMAT: u32 = 1;
/// The oldest machine-state format this build reads.
pub const OLDEST_FORMAT: u32 = 1;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe1,
    kvm_device_attr
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_GET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe2,
    kvm_device_attr
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_HAS_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe3,
    kvm_device_attr
);

/// One vCPU as KVM keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// Index (and APIC ID).
    pub index: u8,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, APIC base, EFER.
    pub sregs: kvm_sregs,
    /// FPU, SSE, AVX... (the legacy FPU state is part of it).
    pub xsave: kvm_xsave,
    /// Extended control registers, where KVM has them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers (its timer included).
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's index list that could be read: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exception, interrupt, NMI, SMI; interrupt shadow.
    pub events: kvm_vcpu_events,
    /// TSC frequency, where KVM tells it.
    pub tsc_khz: Option<u32>,
    /// Offset of the guest's TSC from the host's, where KVM tells it.
    pub tsc_offset: Option<u64>,
}

/// Everything KVM and the devices keep of a paused VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// The master PIC.
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// COM1.
    pub serial: SerialRegs,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

fn tsc_attr(value: &mut u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
        addr: value as *mut u64 as u64,
    }
}

/// Whether the vCPU has the TSC offset attribute (KVM_VCPU_TSC_CTRL).
fn has_tsc_offset(fd: &VcpuFd) -> bool {
    let mut value = 0u64;
    let attr = tsc_attr(&mut value);
    // SAFETY: KVM_HAS_DEVICE_ATTR only reads `attr`.
    unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_HAS_DEVICE_ATTR(), &attr) == 0 }
}

/// The vCPU's TSC offset, where KVM has the attribute.
fn tsc_offset(fd: &VcpuFd) -> Option<u64> {
    if !has_tsc_offset(fd) {
        return None;
    }
    let mut value = 0u64;
    let attr = tsc_attr(&mut value);
    // SAFETY: KVM_GET_DEVICE_ATTR reads `attr` and writes one u64 at
    // `attr.addr`, which points at `value`, alive until the call returns.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_GET_DEVICE_ATTR(), &attr) };
    (rc == 0).then_some(value)
}

/// Sets the vCPU's TSC offset.
fn set_tsc_offset(fd: &VcpuFd, mut value: u64) -> Result<(), VmError> {
    let attr = tsc_attr(&mut value);
    // SAFETY: KVM_SET_DEVICE_ATTR reads `attr` and one u64 at `attr.addr`,
    // which points at `value`, alive until the call returns.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &attr) };
    if rc != 0 {
        return Err(VmError::Kvm {
            what: "KVM_SET_DEVICE_ATTR (TSC offset)",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

/// Reads every MSR in `indices` that KVM will read, in batches; one it
/// refuses is left out (and logged).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VmError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VmError::Kvm {
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < batch.len() {
            log::debug!("MSR {:#x} cannot be read; not carried over", batch[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok(out)
}

/// Writes `msrs`, the TSC first and the TSC deadline last (without the
/// TSC when `skip_tsc`: its offset is set instead); one KVM refuses is
/// named in the error.
fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)], skip_tsc: bool) -> Result<(), VmError> {
    let rank = |i: u32| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    };
    let mut sorted: Vec<(u32, u64)> = msrs
        .iter()
        .copied()
        .filter(|&(i, _)| !(skip_tsc && i == MSR_IA32_TSC))
        .collect();
    sorted.sort_by_key(|&(i, _)| rank(i));
    for batch in sorted.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|_| VmError::Kvm {
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let n = fd.set_msrs(&list).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n < batch.len() {
            return Err(VmError::MsrRefused(batch[n].0));
        }
    }
    Ok(())
}

/// How long [`Vm::pause_for_save`] keeps trying to find every vCPU where
/// its state can be saved whole.
pub const SAFE_POINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Vm {
    /// Whether paused vCPU `v` may have a software exception (INT3, INTO,
    /// INT n, INT1) raised and not yet delivered. KVM does not report
    /// those in the vCPU events: its ABI relies on RIP still pointing at
    /// the instruction, which then runs again. PVM (guest user mode
    /// native) has RIP past it already when the vCPU stops there, so a
    /// state saved at that point would lose the exception: on the test
    /// kernel, a whole kernel service call. Decided from the bytes before
    /// RIP in user mode; a false positive only costs a retry.
    fn soft_exception_may_be_pending(&self, v: u8) -> Result<bool, VmError> {
        let s = self.sregs(v)?;
        if s.cs.selector & 3 != 3 {
            return Ok(false);
        }
        let rip = self.regs(v)?.rip;
        let byte = |va: u64| -> Option<u8> {
            let t = self.translate(v, va).ok()?;
            let mut b = [0u8; 1];
            crate::guest::PhysMemory::read_phys(self.ram().as_ref(), t.gpa, &mut b).ok()?;
            Some(b[0])
        };
        let last = byte(rip.wrapping_sub(1));
        let before = byte(rip.wrapping_sub(2));
        Ok(matches!(last, Some(0xcc | 0xce | 0xf1)) || before == Some(0xcd))
    }

    /// Pauses the VM where its state can be saved whole: on a PVM host,
    /// tries again (resuming for a moment) while a vCPU may have a
    /// software exception pending (see `soft_exception_may_be_pending`).
    /// Returns the last pause's duration and how many pauses it took.
    pub fn pause_for_save(&self) -> Result<(std::time::Duration, u32), VmError> {
        let pvm = crate::vm::host_kvm_flavor() == crate::vm::KvmFlavor::Pvm;
        let deadline = std::time::Instant::now() + SAFE_POINT_TIMEOUT;
        let mut tries = 0;
        loop {
            tries += 1;
            let took = self.pause()?;
            if !pvm {
                return Ok((took, tries));
            }
            let mut safe = true;
            for v in 0..self.vcpu_count() {
                match self.soft_exception_may_be_pending(v) {
                    Ok(false) => {}
                    Ok(true) => {
                        safe = false;
                        break;
                    }
                    Err(e) => {
                        // Never leave the guest paused behind an error.
                        let _ = self.resume();
                        return Err(e);
                    }
                }
            }
            if safe {
                return Ok((took, tries));
            }
            self.resume()?;
            if std::time::Instant::now() >= deadline {
                return Err(VmError::NoSafePoint(tries));
            }
            std::thread::sleep(std::time::Duration::from_micros(
                50 + u64::from(tries % 7) * 30,
            ));
        }
    }

    /// The machine state of this VM, which must be paused (a vCPU that
    /// stopped in the middle of an I/O exit has completed it before parking).
    pub fn save_machine(&self) -> Result<MachineState, VmError> {
        if !self.is_paused() {
            return Err(VmError::NotPaused);
        }
        let vm = &self.vm_fd;
        let clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        let mut pic_master = chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER);
        let mut pic_slave = chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE);
        let mut ioapic = chip(kvm_bindings::KVM_IRQCHIP_IOAPIC);
        for c in [&mut pic_master, &mut pic_slave, &mut ioapic] {
            vm.get_irqchip(c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        }
        let pit = vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
        // KVM_GET_XSAVE gives the first 4 KiB; a guest allowed more (AMX
        // tiles, KVM_CAP_XSAVE2) would lose the rest.
        let xsave_size = self.kvm.check_extension_int(kvm_ioctls::Cap::Xsave2);
        if xsave_size > 4096 {
            return Err(VmError::StateMismatch(format!(
                "the guest's XSAVE state is {xsave_size} bytes; lucos carries 4096"
            )));
        }
        let index_list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let fd = v.lock();
            vcpus.push(VcpuState {
                index: v.index,
                mp_state: fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
                regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
                sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
                xsave: fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
                xcrs: fd.get_xcrs().ok(),
                debug_regs: fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
                lapic: fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
                msrs: read_msrs(&fd, index_list.as_slice())?,
                events: fd
                    .get_vcpu_events()
                    .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
                tsc_khz: fd.get_tsc_khz().ok(),
                tsc_offset: tsc_offset(&fd),
            });
        }
        Ok(MachineState {
            vcpus,
            clock,
            pic_master,
            pic_slave,
            ioapic,
            pit,
            serial: self.bus.serial_regs(),
        })
    }

    /// Loads `st` (saved by [`Vm::save_machine`] of a VM over the same
    /// memory) into this VM, whose vCPUs have not run yet.
    pub fn load_machine(&self, st: &MachineState) -> Result<(), VmError> {
        if st.vcpus.len() != self.vcpus.len() {
            return Err(VmError::StateMismatch(format!(
                "the state has {} vCPUs, this VM {}",
                st.vcpus.len(),
                self.vcpus.len()
            )));
        }
        let carry_tsc = st.vcpus.iter().all(|v| v.tsc_offset.is_some())
            && self.vcpus.iter().all(|v| has_tsc_offset(&v.lock()));
        let vm = &self.vm_fd;
        vm.set_pit2(&st.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        let mut clock = st.clock;
        clock.flags &= if carry_tsc {
            kvm_bindings::KVM_CLOCK_REALTIME
        } else {
            0
        };
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        for c in [&st.pic_master, &st.pic_slave, &st.ioapic] {
            vm.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        for (v, s) in self.vcpus.iter().zip(&st.vcpus) {
            if v.index != s.index {
                return Err(VmError::StateMismatch(format!(
                    "vCPU {} found where vCPU {} was expected",
                    s.index, v.index
                )));
            }
            let fd = v.lock();
            fd.set_mp_state(s.mp_state)
                .map_err(kvm_err("KVM_SET_MP_STATE"))?;
            fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
            fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            // SAFETY: `s.xsave` is a whole kvm_xsave as KVM_GET_XSAVE gave
            // it (4 KiB, no trailing dynamic part).
            unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
            if let Some(x) = &s.xcrs {
                fd.set_xcrs(x).map_err(kvm_err("KVM_SET_XCRS"))?;
            }
            fd.set_debug_regs(&s.debug_regs)
                .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
            fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
            if let Some(khz) = s.tsc_khz {
                if fd.get_tsc_khz().ok() != Some(khz) {
                    fd.set_tsc_khz(khz).map_err(kvm_err("KVM_SET_TSC_KHZ"))?;
                }
            }
            // The TSC offset before the MSRs: the TSC deadline is then
            // written against the TSC as it runs on.
            if carry_tsc {
                set_tsc_offset(&fd, s.tsc_offset.unwrap_or_default())?;
            }
            write_msrs(&fd, &s.msrs, carry_tsc)?;
            fd.set_vcpu_events(&s.events)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
            // Tell a kvmclock guest it was stopped (its watchdogs discount
            // the gap); a guest without kvmclock refuses, which is fine.
            let _ = fd.kvmclock_ctrl();
        }
        let irq = self.serial_irq.try_clone().map_err(|e| VmError::Kvm {
            what: "eventfd",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        self.bus
            .restore_serial(&st.serial, irq)
            .map_err(|e| VmError::StateMismatch(format!("COM1: {e}")))?;
        Ok(())
    }

    /// A VM over memory another VMM process handed over: RAM of
    /// `mem_bytes` in `ram`, the patch area in `area` at `area_gpa`, and
    /// `vcpus` vCPUs with the CPUID the old VM's had, to be loaded with
    /// [`Vm::load_machine`] and started.
    pub fn adopt(
        mem_bytes: u64,
        ram: std::fs::File,
        area: std::fs::File,
        area_gpa: u64,
        vcpus: u8,
        serial: crate::devices::SerialSink,
        cpuids: &[Vec<kvm_bindings::kvm_cpuid_entry2>],
    ) -> Result<Self, VmError> {
        let need = crate::memory::ram_ranges(mem_bytes)
            .iter()
            .map(|r| r.file_offset + r.len)
            .max()
            .unwrap_or(0);
        for (f, what, want) in [
            (&ram, "RAM", need),
            (&area, "patch area", crate::region::PATCH_AREA_BYTES),
        ] {
            let have = f.metadata().map(|m| m.len()).unwrap_or(0);
            if have < want {
                return Err(VmError::StateMismatch(format!(
                    "the {what} memfd holds {have} bytes, {want} are needed"
                )));
            }
        }
        let ram = crate::memory::GuestRam::from_memfd(ram, mem_bytes)?;
        let area = crate::region::VmmRegion::from_memfd(area, area_gpa)?;
        Self::shell(ram, area, vcpus, serial, Some(cpuids))
    }

    /// The CPUID each vCPU was given (for a VMM process taking it over).
    pub fn cpuid_entries(&self) -> &[Vec<kvm_bindings::kvm_cpuid_entry2>] {
        &self.cpuids
    }

    /// The guest-physical base of the patch area.
    pub fn area_gpa(&self) -> u64 {
        self.patch_area().gpa
    }

    /// The memfds of RAM and the patch area (to hand to another process).
    pub fn memfds(&self) -> [i32; 2] {
        [self.ram().memfd_raw(), self.patch_area().memfd_raw()]
    }

    /// Drops COM1's partial output line: the process the guest was handed
    /// to passes it on.
    pub fn forget_serial_pending(&self) {
        self.bus.forget_pending_output();
    }
}
