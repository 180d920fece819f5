//! A KVM virtual machine: creation, boot, vCPU threads, pause/resume/stop,
//! and access to a paused guest's registers and memory.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_regs, kvm_sregs, kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{acpi, cpuid, layout, mptable, msr, regs};
use crate::devices::{PioBus, SerialSink, COM1_IRQ};
use crate::loader::{self, LoadError};
use crate::memory::{GuestRam, MemoryError};
use crate::pagewalk::{self, PagingState, Translation, WalkError};
use crate::vcpu::{self, ExitReason, PauseError, RunControl, Vcpu};
use crate::write_control::{ProtectError, Protection, SlotSink, SlotSpec, WriteControl};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 64;
/// How long a pause may take before it is abandoned.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to boot and how.
#[derive(Debug)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Where serial output goes.
    pub serial: SerialSink,
}

/// Errors creating or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM capability lucos needs is missing.
    #[error("this host's KVM lacks {0}, which lucos needs")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Bad vCPU count.
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    BadVcpuCount(u8),
    /// Too little RAM.
    #[error("guest memory of {0} bytes is too small; lucos needs at least {min} MiB", min = layout::MIN_MEM_BYTES >> 20)]
    TooLittleMemory(u64),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Boot structures.
    #[error(transparent)]
    Boot(#[from] regs::BootSetupError),
    /// Pause/resume.
    #[error(transparent)]
    Pause(#[from] PauseError),
    /// A vCPU index out of range.
    #[error("no vCPU {0}")]
    NoSuchVcpu(u8),
    /// The VM must be paused for this.
    #[error("the VM must be paused to access vCPU state")]
    NotPaused,
    /// A page-table walk failed.
    #[error(transparent)]
    Walk(#[from] WalkError),
    /// A stock Linux kernel on a PVM host.
    #[error(
        "this host's KVM is PVM (kvm_pvm): guest kernel mode is emulated and cannot run a stock \
         Linux kernel; run Linux guests on a host with VT-x/AMD-V, or inside the emulated \
         hardware-virtualization host (guest-kernels/linux/README.md)"
    )]
    LinuxNeedsHardwareVirt,
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] crate::arch::mptable::MpTableError),
    /// Thread creation failed.
    #[error("cannot start vCPU thread")]
    Thread(#[source] std::io::Error),
    /// KVM refused an MSR of a saved state.
    #[error("KVM refused MSR {0:#x} of the saved state")]
    MsrRefused(u32),
    /// No pause found every vCPU where its state can be saved whole.
    #[error("no pause in {n} tries found every vCPU where its state can be saved whole (a vCPU kept stopping just after a software interrupt)", n = .0)]
    NoSafePoint(u32),
    /// A saved state that does not fit this VM.
    #[error("the saved machine state does not fit: {0}")]
    StateMismatch(String),
    /// Installing the kick signal failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// KVM's dirty log could not be turned on or off, or read.
    #[error("KVM's dirty log of guest RAM: {0}")]
    DirtyLog(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A running (or ready to run) VM.
#[derive(Debug)]
pub struct Vm {
    pub(crate) kvm: Kvm,
    pub(crate) vm_fd: VmFd,
    ram: Arc<GuestRam>,
    pub(crate) bus: Arc<PioBus>,
    pub(crate) vcpus: Vec<Arc<Vcpu>>,
    ctl: Arc<RunControl>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    started_at: std::sync::OnceLock<Instant>,
    /// Guest uptime in earlier VMM processes (`lucos upgrade`), ms.
    uptime_before: std::sync::atomic::AtomicU64,
    pub(crate) entry: u64,
    patch_area: Arc<crate::region::VmmRegion>,
    write_control: Arc<WriteControl>,
    /// COM1's interrupt (a second handle on the bus's).
    pub(crate) serial_irq: EventFd,
    /// The CPUID each vCPU was given.
    pub(crate) cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
}

impl Vm {
    /// Creates the VM, loads the kernel and sets every vCPU up to enter it.
    pub fn create(cfg: VmConfig) -> Result<Self, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::BadVcpuCount(cfg.vcpus));
        }
        if cfg.mem_bytes < layout::MIN_MEM_BYTES {
            return Err(VmError::TooLittleMemory(cfg.mem_bytes));
        }
        // Check the image before touching KVM, so bad input fails fast and plainly.
        let kind = check_bootable(&cfg.kernel, cfg.mem_bytes)?;
        let flavor = host_kvm_flavor();
        let ram = GuestRam::new(cfg.mem_bytes)?;
        let area = crate::region::VmmRegion::patch_area(ram_end(&ram))?;
        let mut vm = Self::shell(ram, area, cfg.vcpus, cfg.serial, None)?;
        let ram = vm.ram.clone();
        loader::write_cmdline(&ram, &cfg.cmdline)?;
        let (kernel, boot) = match kind {
            loader::KernelKind::Elf => {
                let kernel = loader::load_elf(&ram, &cfg.kernel, cfg.initrd.as_deref())?;
                let flags = if flavor == KvmFlavor::Pvm {
                    loader::BOOT_FLAG_NO_SYSCALL
                } else {
                    0
                };
                loader::write_boot_info(&ram, cfg.vcpus, cfg.cmdline.len(), flags)?;
                // Test-kernel protocol: every vCPU enters at once, RSI = boot info.
                let boot = BootSpec {
                    entry: kernel.entry,
                    rsi: layout::BOOT_INFO_START,
                    rbx: 0,
                    start_aps: true,
                    protected_mode: false,
                };
                (kernel, boot)
            }
            loader::KernelKind::BzImage => {
                mptable::write(&ram, cfg.vcpus)?;
                let rsdp = acpi::write(&ram, cfg.vcpus)?;
                let kernel = loader::load_bzimage(
                    &ram,
                    &cfg.kernel,
                    cfg.initrd.as_deref(),
                    &cfg.cmdline,
                    Some(rsdp),
                )?;
                // Linux 64-bit boot protocol: RSI = zero page; the kernel wakes
                // the other vCPUs itself with INIT/SIPI.
                let boot = BootSpec {
                    entry: kernel.entry,
                    rsi: loader::ZERO_PAGE_START,
                    rbx: 0,
                    start_aps: false,
                    protected_mode: false,
                };
                (kernel, boot)
            }
            loader::KernelKind::Pvh(entry) => {
                mptable::write(&ram, cfg.vcpus)?;
                let rsdp = acpi::write(&ram, cfg.vcpus)?;
                let kernel =
                    loader::load_pvh(&ram, &cfg.kernel, entry, cfg.initrd.as_deref(), rsdp)?;
                // PVH: 32-bit protected mode, paging off, RBX = start info.
                let boot = BootSpec {
                    entry: kernel.entry,
                    rsi: 0,
                    rbx: layout::PVH_INFO_START,
                    start_aps: false,
                    protected_mode: true,
                };
                (kernel, boot)
            }
        };
        regs::write_boot_gdt(ram.memory())?;
        regs::write_boot_page_tables(ram.memory())?;

        for v in &vm.vcpus {
            configure_vcpu(&v.lock(), v.index, &boot)?;
        }
        vm.entry = kernel.entry;
        Ok(vm)
    }

    /// A VM over existing guest memory (`ram`, `area`) with `vcpus` vCPUs
    /// created but not set up: what [`Vm::create`] builds on, and what a
    /// VMM process taking a running guest over loads its state into
    /// ([`Vm::load_machine`](crate::snapshot)).
    pub(crate) fn shell(
        ram: GuestRam,
        area: crate::region::VmmRegion,
        vcpu_count: u8,
        serial: SerialSink,
        cpuids: Option<&[Vec<kvm_bindings::kvm_cpuid_entry2>]>,
    ) -> Result<Self, VmError> {
        if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
            return Err(VmError::BadVcpuCount(vcpu_count));
        }
        vcpu::install_kick_handler().map_err(VmError::Signal)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if let Err(e) = vm_fd.set_tss_address(0xfffb_d000) {
            // Needed on Intel only; other KVM flavours may refuse it.
            log::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let ram = Arc::new(ram);
        let mut ram_slots = Vec::new();
        for (slot, (guest, size, host)) in ram.slots().into_iter().enumerate() {
            ram_slots.push((
                slot as u32,
                SlotSpec {
                    gpa: guest,
                    len: size,
                    file_offset: ram.ranges()[slot].file_offset,
                    readonly: false,
                },
            ));
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: guest,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: `host` is the start of a live mapping of `size` bytes owned by `ram`,
            // which the Vm keeps alive for as long as `vm_fd` exists.
            unsafe { vm_fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        // The live-patch area: VMM-owned, outside the guest's RAM map,
        // read-only to the guest.
        let patch_area = Arc::new(area);
        // SAFETY: the region is a live mapping owned by `patch_area`, which
        // the Vm keeps for as long as `vm_fd` exists.
        unsafe { vm_fd.set_user_memory_region(patch_area.kvm_region()) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (read-only patch area)"))?;

        let write_control = Arc::new(
            WriteControl::new(ram.clone(), ram_slots, (patch_area.gpa, patch_area.size))
                .with_area(patch_area.clone()),
        );

        let irq =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| VmError::Kvm {
                what: "eventfd",
                source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
        vm_fd
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial_irq = irq.try_clone().map_err(|e| VmError::Kvm {
            what: "eventfd",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        let bus = Arc::new(PioBus::new(irq, serial));

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let sync_regs = kvm.check_extension(Cap::SyncRegs);
        if cpuids.is_some_and(|c| c.len() != usize::from(vcpu_count)) {
            return Err(VmError::StateMismatch(format!(
                "CPUID given for {} vCPUs, the VM has {vcpu_count}",
                cpuids.map(<[_]>::len).unwrap_or(0)
            )));
        }
        let mut vcpus = Vec::with_capacity(vcpu_count as usize);
        let mut used = Vec::with_capacity(vcpu_count as usize);
        for i in 0..vcpu_count {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            // A VM taken over from another VMM process keeps the CPU its
            // guest saw (that binary's CPUID policy may differ from ours).
            let cpuid = match cpuids {
                Some(c) => CpuId::from_entries(&c[usize::from(i)]).map_err(|_| {
                    VmError::StateMismatch(format!("vCPU {i}: too many CPUID entries"))
                })?,
                None => {
                    let mut c = supported.clone();
                    cpuid::set_vcpu_topology(&mut c, i, vcpu_count);
                    c
                }
            };
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            used.push(cpuid.as_slice().to_vec());
            vcpus.push(Arc::new(Vcpu {
                index: i,
                fd: std::sync::Mutex::new(fd),
                sync_regs,
            }));
        }
        Ok(Self {
            kvm,
            vm_fd,
            ram,
            bus,
            ctl: Arc::new(RunControl::new(vcpus.len())),
            vcpus,
            threads: Default::default(),
            started_at: Default::default(),
            uptime_before: Default::default(),
            entry: 0,
            patch_area,
            write_control,
            serial_irq,
            cpuids: used,
        })
    }

    /// Starts every vCPU thread.
    pub fn start(&self) -> Result<(), VmError> {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for v in &self.vcpus {
            let (v2, ctl, bus) = (v.clone(), self.ctl.clone(), self.bus.clone());
            let wc = self.write_control.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{}", v.index))
                .spawn(move || vcpu::vcpu_thread(v2, ctl, bus, wc))
                .map_err(VmError::Thread)?;
            threads.push(t);
        }
        let _ = self.started_at.set(Instant::now());
        Ok(())
    }

    fn join_threads(&self) {
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Pauses every vCPU; returns how long it took for all to leave guest mode.
    pub fn pause(&self) -> Result<Duration, VmError> {
        Ok(self.ctl.pause(PAUSE_TIMEOUT)?)
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), VmError> {
        Ok(self.ctl.resume()?)
    }

    /// Asks the VM to stop (returns at once; see [`Vm::wait`]).
    pub fn stop(&self) {
        self.ctl.stop(ExitReason::Stopped);
    }

    /// Waits for the VM to end and joins its vCPU threads.
    pub fn wait(&self) -> ExitReason {
        let reason = self.ctl.wait_stopped(None);
        self.join_threads();
        reason.unwrap_or(ExitReason::Stopped)
    }

    /// Waits up to `timeout` for the VM to end by itself.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let reason = self.ctl.wait_stopped(Some(timeout))?;
        self.join_threads();
        Some(reason)
    }

    /// The shared run control (for the control server).
    pub fn control(&self) -> Arc<RunControl> {
        self.ctl.clone()
    }

    /// Whether every vCPU is paused.
    pub fn is_paused(&self) -> bool {
        self.ctl.is_paused()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpus.len() as u8
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The VM fd (for memory-slot changes by later layers).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Kernel entry point.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// Time since the vCPUs were started.
    pub fn uptime(&self) -> Duration {
        let before = Duration::from_millis(
            self.uptime_before
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        before
            + self
                .started_at
                .get()
                .map(|t| t.elapsed())
                .unwrap_or_default()
    }

    /// Counts `before` of guest uptime spent in earlier VMM processes.
    pub fn carry_uptime(&self, before: Duration) {
        self.uptime_before.store(
            before.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The VMM-owned memory live patches are placed in.
    pub fn patch_area(&self) -> &crate::region::VmmRegion {
        &self.patch_area
    }

    /// Write control of guest RAM (protected ranges, trapped-write counters, events).
    pub fn write_control(&self) -> &Arc<WriteControl> {
        &self.write_control
    }

    /// Turns KVM's dirty log of guest RAM's read-write slots on or off
    /// (on: an empty log).
    pub fn set_dirty_log(&self, on: bool) -> Result<(), VmError> {
        self.write_control
            .set_dirty_log(self, on)
            .map_err(VmError::DirtyLog)
    }

    /// The RAM pages the guest wrote since the dirty log was turned on or
    /// last read ([`WriteControl::dirty_pages`]).
    pub fn dirty_pages(&self) -> Result<Option<Vec<u64>>, VmError> {
        self.write_control
            .dirty_pages(&|slot, len| {
                self.vm_fd
                    .get_dirty_log(slot, len as usize)
                    .map_err(|e| format!("KVM_GET_DIRTY_LOG of slot {slot}: {e}"))
            })
            .map_err(VmError::DirtyLog)
    }

    /// Runs `f` on vCPU `index`'s fd. The VM must be paused.
    pub fn with_vcpu<T>(
        &self,
        index: u8,
        f: impl FnOnce(&mut VcpuFd) -> Result<T, kvm_ioctls::Error>,
        what: &'static str,
    ) -> Result<T, VmError> {
        let v = self
            .vcpus
            .get(index as usize)
            .ok_or(VmError::NoSuchVcpu(index))?;
        if !self.ctl.is_paused() {
            return Err(VmError::NotPaused);
        }
        let mut fd = v.lock();
        f(&mut fd).map_err(kvm_err(what))
    }

    /// General registers of a paused vCPU.
    pub fn regs(&self, index: u8) -> Result<kvm_regs, VmError> {
        self.with_vcpu(index, |fd| fd.get_regs(), "KVM_GET_REGS")
    }

    /// Sets the general registers of a paused vCPU.
    pub fn set_regs(&self, index: u8, r: &kvm_regs) -> Result<(), VmError> {
        self.with_vcpu(index, |fd| fd.set_regs(r), "KVM_SET_REGS")
    }

    /// Special registers of a paused vCPU.
    pub fn sregs(&self, index: u8) -> Result<kvm_sregs, VmError> {
        self.with_vcpu(index, |fd| fd.get_sregs(), "KVM_GET_SREGS")
    }

    /// Sets the special registers of a paused vCPU.
    pub fn set_sregs(&self, index: u8, s: &kvm_sregs) -> Result<(), VmError> {
        self.with_vcpu(index, |fd| fd.set_sregs(s), "KVM_SET_SREGS")
    }

    /// Translates a guest-virtual address through paused vCPU `index`'s page tables.
    pub fn translate(&self, index: u8, gva: u64) -> Result<Translation, VmError> {
        let s = self.sregs(index)?;
        Ok(pagewalk::translate(
            self.ram.as_ref(),
            PagingState::from(&s),
            gva,
        )?)
    }
}

impl crate::guest::Guest for Vm {
    fn ram(&self) -> &dyn crate::guest::PhysMemory {
        self.ram.as_ref()
    }

    fn vcpu_count(&self) -> u8 {
        Vm::vcpu_count(self)
    }

    fn is_paused(&self) -> bool {
        Vm::is_paused(self)
    }

    fn pause_vcpus(&self) -> Result<Duration, VmError> {
        self.pause()
    }

    fn resume_vcpus(&self) -> Result<(), VmError> {
        self.resume()
    }

    fn vcpu_state(
        &self,
        _paused: &crate::guest::PauseToken,
        v: u8,
    ) -> Result<crate::guest::VcpuState, VmError> {
        let r = self.regs(v)?;
        let s = self.sregs(v)?;
        Ok(crate::guest::VcpuState {
            rip: r.rip,
            rsp: r.rsp,
            cpl: (s.cs.selector & 3) as u8,
            paging: PagingState::from(&s),
            gprs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            tr_base: s.tr.base,
        })
    }

    fn area(&self) -> crate::guest::AreaInfo {
        crate::guest::AreaInfo {
            gpa: self.patch_area.gpa,
            size: self.patch_area.size,
        }
    }

    fn area_write(&self, offset: u64, bytes: &[u8]) -> Result<(), crate::memory::MemoryError> {
        self.patch_area.write(offset, bytes)
    }

    fn area_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), crate::memory::MemoryError> {
        self.patch_area.read(offset, buf)
    }

    fn change_protection(
        &self,
        _paused: &crate::guest::PauseToken,
        release: &[String],
        add: &[Protection],
    ) -> Result<(), ProtectError> {
        if !self.is_paused() {
            return Err(ProtectError::NotPaused);
        }
        self.write_control.change(self, release, add)
    }

    fn protections(&self) -> Vec<Protection> {
        self.write_control.protections()
    }

    fn ram_ranges(&self) -> Vec<(u64, u64)> {
        self.ram
            .ranges()
            .iter()
            .map(|r| (r.guest_addr, r.len))
            .collect()
    }

    fn set_dirty_log(&self, on: bool) -> Result<(), VmError> {
        Vm::set_dirty_log(self, on)
    }

    fn dirty_pages(&self) -> Result<Option<Vec<u64>>, VmError> {
        Vm::dirty_pages(self)
    }
}

impl SlotSink for Vm {
    fn set_slot(&self, id: u32, spec: Option<&SlotSpec>) -> Result<(), String> {
        let region = match spec {
            None => kvm_userspace_memory_region {
                slot: id,
                ..Default::default()
            },
            Some(s) => {
                // Whole in RAM or whole in the patch area.
                let area = &self.patch_area;
                let host = if self.ram.contains(s.gpa, s.len) {
                    self.ram.host_addr(s.gpa)
                } else if s.gpa >= area.gpa && s.gpa.saturating_add(s.len) <= area.gpa + area.size {
                    area.host_addr(s.gpa)
                } else {
                    None
                }
                .ok_or_else(|| format!("{:#x}+{:#x} is not guest memory", s.gpa, s.len))?;
                let log = self.write_control.logs(s);
                kvm_userspace_memory_region {
                    slot: id,
                    flags: if s.readonly {
                        kvm_bindings::KVM_MEM_READONLY
                    } else if log {
                        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                    } else {
                        0
                    },
                    guest_phys_addr: s.gpa,
                    memory_size: s.len,
                    userspace_addr: host,
                }
            }
        };
        // SAFETY: a deletion (size 0), or a slot over `len` bytes of RAM or
        // of the patch area, mapped at `host` by `self.ram` or
        // `self.patch_area`, which live as long as the VM fd.
        unsafe { self.vm_fd.set_user_memory_region(region) }.map_err(|e| e.to_string())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let running = !self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if running {
            self.ctl.stop(ExitReason::Stopped);
            self.join_threads();
        }
    }
}

/// Where a VM's RAM ends (guest-physical), above which its patch area lies.
fn ram_end(ram: &GuestRam) -> u64 {
    ram.ranges()
        .iter()
        .map(|r| r.guest_addr + r.len)
        .max()
        .unwrap_or(0)
}

/// Checks that the kernel at `path` can boot in `mem_bytes` of RAM on this
/// host, without touching KVM: image format, size, and host capability.
pub fn check_bootable(
    path: &std::path::Path,
    mem_bytes: u64,
) -> Result<loader::KernelKind, VmError> {
    let kind = loader::check_kernel(path, mem_bytes)?;
    let linux = matches!(
        kind,
        loader::KernelKind::BzImage | loader::KernelKind::Pvh(_)
    );
    if linux && host_kvm_flavor() == KvmFlavor::Pvm {
        return Err(VmError::LinuxNeedsHardwareVirt);
    }
    Ok(kind)
}

/// Which kind of KVM the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmFlavor {
    /// KVM on VT-x or AMD-V: guest kernel code runs natively.
    Hardware,
    /// PVM (`kvm_pvm`): guest user mode runs natively, guest kernel mode is
    /// emulated, and SYSCALL from guest user mode does not reach guest CPL0.
    Pvm,
}

/// Detects the host's KVM flavour from the loaded modules.
pub fn host_kvm_flavor() -> KvmFlavor {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        KvmFlavor::Pvm
    } else {
        KvmFlavor::Hardware
    }
}

/// How vCPUs enter the kernel.
#[derive(Debug, Clone, Copy)]
struct BootSpec {
    entry: u64,
    rsi: u64,
    rbx: u64,
    /// Enter in 32-bit protected mode without paging (PVH) instead of long mode.
    protected_mode: bool,
    /// Start the application processors at `entry` too (else they wait for INIT/SIPI).
    start_aps: bool,
}

/// Local APIC LVT LINT0/LINT1 offsets and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets LINT0 to ExtINT and LINT1 to NMI (virtual-wire mode), as firmware does.
fn set_lint(fd: &VcpuFd) -> Result<(), VmError> {
    let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = lapic.regs[off + i] as u8;
        }
        let reg = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, v) in reg.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *v as _;
        }
    }
    fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

fn configure_vcpu(fd: &VcpuFd, index: u8, boot: &BootSpec) -> Result<(), VmError> {
    let msrs = msr::to_msrs(&msr::boot_msr_entries()).map_err(|_| VmError::Kvm {
        what: "building boot MSRs",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != msrs.as_slice().len() {
        log::debug!(
            "vCPU {index}: KVM took {n} of {} boot MSRs",
            msrs.as_slice().len()
        );
    }
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let sregs = if boot.protected_mode {
        regs::protected_mode_sregs(sregs)
    } else {
        regs::long_mode_sregs(sregs)
    };
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    fd.set_regs(&regs::entry_regs(
        boot.entry,
        u64::from(index),
        boot.rsi,
        boot.rbx,
    ))
    .map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_fpu(&regs::entry_fpu())
        .map_err(kvm_err("KVM_SET_FPU"))?;
    set_lint(fd)?;
    if index > 0 && boot.start_aps {
        // Application processors start in the same 64-bit state as the boot
        // processor instead of waiting for INIT/SIPI.
        fd.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}
