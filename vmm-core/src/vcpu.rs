//! vCPU threads and the pause machinery.
//!
//! Each vCPU runs `KVM_RUN` on its own thread. A pause sets the shared request
//! to [`Request::Pause`] and kicks every vCPU thread with a real-time signal;
//! the signal handler sets `immediate_exit` in that vCPU's `kvm_run`, so the
//! vCPU leaves `KVM_RUN` whether it was running guest code (user or kernel
//! mode), halted, spinning with interrupts off, or about to enter. A vCPU
//! parks only after any pending I/O exit has been completed inside KVM, so
//! its registers are consistent while paused.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

use crate::devices::{GuestRequest, PioBus};
use crate::guest::PhysMemory;
use crate::memory::GuestRam;
use crate::write_control::{Outcome, WriteControl, WriterCpu};

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest wrote `status` to the debug-exit port.
    GuestExit {
        /// The byte the guest wrote.
        status: u8,
    },
    /// The guest reset the machine (i8042 or KVM system event).
    Reset,
    /// The guest powered off (KVM system event).
    PowerOff,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
    },
    /// Stopped on request (`lucos stop`, a signal, or the owner dropping the VM).
    Stopped,
    /// KVM reported an error the VMM cannot continue from.
    Error {
        /// The vCPU that saw it.
        vcpu: u8,
        /// What happened.
        message: String,
    },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestExit { status } => write!(f, "guest exited with status {status}"),
            Self::Reset => write!(f, "guest reset the machine"),
            Self::PowerOff => write!(f, "guest powered off"),
            Self::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            Self::Stopped => write!(f, "stopped"),
            Self::Error { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
        }
    }
}

/// What the VMM wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Run guest code.
    Run,
    /// Leave KVM_RUN and park.
    Pause,
    /// Leave KVM_RUN and end the thread.
    Stop,
}

#[derive(Debug)]
struct CtlState {
    request: Request,
    /// vCPU threads parked at the pause point.
    parked: usize,
    /// vCPU threads started and not yet ended.
    live: usize,
    exit: Option<ExitReason>,
    /// The guest went to another VMM process: the vCPUs stay parked until
    /// they end, and nothing pauses or resumes them any more.
    handed_over: bool,
    /// Per vCPU: released from a hold (a release may come before the hold
    /// parks).
    released: Vec<bool>,
    /// vCPUs held now.
    held: usize,
}

/// State shared by the VMM and its vCPU threads.
#[derive(Debug)]
pub struct RunControl {
    state: Mutex<CtlState>,
    cv: Condvar,
    threads: Vec<AtomicU64>,
}

/// The real-time signal used to kick vCPUs out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// This thread's vCPU `kvm_run` page, for the kick signal handler.
    static KVM_RUN_PAGE: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PAGE.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by this thread to its own vCPU's kvm_run mapping,
            // which stays mapped until the thread clears it, before the VcpuFd can go away.
            let field = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
            // SAFETY: `field` points into that live mapping; a volatile byte store is
            // async-signal-safe.
            unsafe { std::ptr::write_volatile(field, 1) };
        }
    });
}

/// Points this thread's kick target at `page` (another `kvm_run` this
/// thread is about to run, such as the sandbox's) and returns the previous
/// target, to be put back with the same call.
pub(crate) fn swap_kick_page(page: *mut kvm_run) -> *mut kvm_run {
    KVM_RUN_PAGE.with(|p| p.replace(page))
}

/// Installs the kick signal handler (idempotent).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| e.errno())
    })
    .map_err(vmm_sys_util::errno::Error::new)
}

impl RunControl {
    /// Control for `vcpus` vCPUs, initially running.
    pub fn new(vcpus: usize) -> Self {
        Self {
            state: Mutex::new(CtlState {
                request: Request::Run,
                parked: 0,
                live: 0,
                exit: None,
                handed_over: false,
                released: vec![false; vcpus],
                held: 0,
            }),
            cv: Condvar::new(),
            threads: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick_all(&self) {
        for t in &self.threads {
            let tid = t.load(Ordering::Acquire);
            if tid != 0 {
                // SAFETY: `tid` is the pthread_t of a vCPU thread that stored it at start and
                // clears it (under the control lock's ordering) before it exits.
                let rc = unsafe { libc::pthread_kill(tid as libc::pthread_t, kick_signal()) };
                if rc != 0 && rc != libc::ESRCH {
                    log::warn!("cannot kick vCPU thread: errno {rc}");
                }
            }
        }
    }

    /// Asks every vCPU to leave guest mode and waits until all have parked,
    /// or until `timeout`. Returns the time it took.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, PauseError> {
        let start = Instant::now();
        let mut st = self.lock();
        if st.handed_over {
            return Err(PauseError::NotRunning);
        }
        match st.request {
            Request::Stop => return Err(PauseError::NotRunning),
            Request::Pause => return Err(PauseError::AlreadyPaused),
            Request::Run => {}
        }
        if st.live == 0 {
            return Err(PauseError::NotRunning);
        }
        st.request = Request::Pause;
        self.kick_all();
        while st.parked < st.live {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                // Give up cleanly: let the parked ones run again.
                st.request = Request::Run;
                self.cv.notify_all();
                return Err(PauseError::Timeout(timeout));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if st.request != Request::Pause {
                return Err(PauseError::NotRunning);
            }
        }
        Ok(start.elapsed())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), PauseError> {
        let mut st = self.lock();
        if st.handed_over {
            return Err(PauseError::NotRunning);
        }
        match st.request {
            Request::Pause => {
                st.request = Request::Run;
                self.cv.notify_all();
                Ok(())
            }
            Request::Run => Err(PauseError::NotPaused),
            Request::Stop => Err(PauseError::NotRunning),
        }
    }

    /// Whether every live vCPU is parked.
    pub fn is_paused(&self) -> bool {
        let st = self.lock();
        !st.handed_over && st.request == Request::Pause && st.parked == st.live && st.live > 0
    }

    /// Marks a paused VM as handed to another VMM process (`true`; or
    /// takes it back, `false`, when the handover did not happen): while
    /// marked, its parked vCPUs can be stopped but never paused, resumed
    /// or used. Refused (false) unless paused, or while stopping.
    pub fn set_handed_over(&self, on: bool) -> bool {
        let mut st = self.lock();
        if on && (st.request != Request::Pause || st.parked != st.live) {
            return false;
        }
        st.handed_over = on;
        true
    }

    /// Ends the VM with `reason` (the first reason recorded wins).
    pub fn stop(&self, reason: ExitReason) {
        let mut st = self.lock();
        if st.exit.is_none() {
            st.exit = Some(reason);
        }
        st.request = Request::Stop;
        self.cv.notify_all();
        self.kick_all();
    }

    /// The exit reason, once the VM has ended or begun to.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.lock().request == Request::Stop
    }

    /// Waits until every vCPU thread has ended, or `timeout` passes.
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        while st.live > 0 || st.exit.is_none() {
            match deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    st = self
                        .cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        st.exit.clone()
    }

    fn thread_started(&self, index: usize) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads[index].store(me as u64, Ordering::Release);
        self.lock().live += 1;
    }

    fn thread_ended(&self, index: usize) {
        let mut st = self.lock();
        self.threads[index].store(0, Ordering::Release);
        st.live -= 1;
        self.cv.notify_all();
    }

    /// Releases vCPU `index` from a hold (see [`Outcome::Hold`]); it runs
    /// again unless the VM is paused. A release before the vCPU parked
    /// lets its hold pass at once.
    pub fn release(&self, index: usize) {
        let mut st = self.lock();
        if let Some(r) = st.released.get_mut(index) {
            *r = true;
        }
        self.cv.notify_all();
    }

    /// vCPUs held now.
    pub fn held(&self) -> usize {
        self.lock().held
    }

    /// Called by vCPU thread `index` whose trapped write asked for a hold:
    /// parks (counted as paused) until released, then while a pause is
    /// requested; returns false when the thread must end.
    fn hold(&self, index: usize, before_park: impl FnOnce()) -> bool {
        let mut st = self.lock();
        before_park();
        st.parked += 1;
        st.held += 1;
        self.cv.notify_all();
        while !st.released[index] && st.request != Request::Stop {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.released[index] = false;
        st.held -= 1;
        // Released: now only a pause keeps it parked.
        while st.request == Request::Pause {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
        st.request != Request::Stop
    }

    /// Called by a vCPU thread between KVM_RUN calls. Parks while a pause is
    /// requested; returns false when the thread must end.
    fn checkpoint(&self, before_park: impl FnOnce()) -> bool {
        let mut st = self.lock();
        if st.request == Request::Pause {
            before_park();
            st.parked += 1;
            self.cv.notify_all();
            while st.request == Request::Pause {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.parked -= 1;
        }
        st.request != Request::Stop
    }
}

/// Errors from pause and resume.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    /// The VM is already paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// The VM is not paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// The VM has stopped or is stopping.
    #[error("the VM is not running")]
    NotRunning,
    /// Not every vCPU left guest mode in time.
    #[error("vCPUs did not stop within {0:?}")]
    Timeout(Duration),
}

/// One vCPU: its KVM fd, used by its thread while running and by the VMM while paused.
#[derive(Debug)]
pub struct Vcpu {
    /// vCPU index (also its APIC ID).
    pub index: u8,
    /// The KVM vCPU. Its thread holds the lock only while in KVM_RUN and handling an
    /// exit, never while parked, so a paused vCPU's fd is free for the VMM.
    pub fd: Mutex<VcpuFd>,
    /// KVM copies registers into `kvm_run` at exits on request
    /// (KVM_CAP_SYNC_REGS): trapped writes then read them without an ioctl.
    pub sync_regs: bool,
}

impl Vcpu {
    /// Locks the vCPU fd.
    pub fn lock(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn run_error(index: u8, message: String) -> ExitReason {
    ExitReason::Error {
        vcpu: index,
        message,
    }
}

/// The body of a vCPU thread.
pub fn vcpu_thread(vcpu: Arc<Vcpu>, ctl: Arc<RunControl>, bus: Arc<PioBus>, wc: Arc<WriteControl>) {
    let index = vcpu.index;
    {
        let mut fd = vcpu.lock();
        let page: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN_PAGE.with(|p| p.set(page));
    }
    ctl.thread_started(index as usize);
    // A panic must not leave a dead vCPU the VMM waits for forever: it ends
    // the VM with an error naming it.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_loop(&vcpu, &ctl, &bus, &wc)
    }));
    if let Err(panic) = result {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        ctl.stop(run_error(index, format!("vCPU thread panicked: {what}")));
    }
    bus.flush();
    KVM_RUN_PAGE.with(|p| p.set(std::ptr::null_mut()));
    ctl.thread_ended(index as usize);
}

fn run_loop(vcpu: &Vcpu, ctl: &RunControl, bus: &PioBus, wc: &WriteControl) {
    let index = vcpu.index;
    // A kick may have been sent before this thread registered: honour any request now.
    let mut needs_completion = false;
    let mut synced = false;
    loop {
        let mut deferred = None;
        let mut held = false;
        let keep_going = ctl.checkpoint(|| {
            if needs_completion {
                (deferred, held) = complete_io(vcpu, index, bus, wc, synced);
                needs_completion = false;
            }
        });
        if let Some(reason) = deferred {
            ctl.stop(reason);
        }
        if !keep_going {
            break;
        }
        // A write completed for the pause that asked for a hold.
        if held && !ctl.hold(index as usize, || {}) {
            break;
        }
        let mut fd = vcpu.lock();
        // While write control traps writes, have KVM hand the registers
        // over at every exit (an ioctl for each costs ~5 µs on PVM).
        let want_sync = vcpu.sync_regs && wc.trapping();
        if want_sync != synced {
            for r in [SyncReg::Register, SyncReg::SystemRegister] {
                if want_sync {
                    fd.set_sync_valid_reg(r);
                } else {
                    fd.clear_sync_valid_reg(r);
                }
            }
            synced = want_sync;
        }
        let s = step(index, &mut fd, bus, wc, synced);
        needs_completion = s.needs_completion;
        drop(fd);
        if let Some(reason) = s.outcome {
            ctl.stop(reason);
        }
        let mut held = s.held;
        while held {
            // The write is complete in KVM before the thread parks, as for
            // a pause (completing it may trap another watched write).
            let mut deferred = None;
            let mut again = false;
            let keep_going = ctl.hold(index as usize, || {
                if needs_completion {
                    (deferred, again) = complete_io(vcpu, index, bus, wc, synced);
                    needs_completion = false;
                }
            });
            if let Some(reason) = deferred {
                ctl.stop(reason);
            }
            if !keep_going {
                return;
            }
            held = again;
        }
    }
}

/// Completes a pending I/O or MMIO exit inside KVM (re-entry with
/// immediate_exit set), so the registers are consistent while parked. A
/// write KVM split in parts comes back as one more exit per part: each is
/// handled, none dropped. Returns why the VM must end, if it must, and
/// whether one of those writes asked for a hold.
fn complete_io(
    vcpu: &Vcpu,
    index: u8,
    bus: &PioBus,
    wc: &WriteControl,
    synced: bool,
) -> (Option<ExitReason>, bool) {
    let mut deferred = None;
    let mut held = false;
    let mut fd = vcpu.lock();
    fd.set_kvm_immediate_exit(1);
    for _ in 0..16 {
        let s = step(index, &mut fd, bus, wc, synced);
        if deferred.is_none() {
            deferred = s.outcome;
        }
        held |= s.held;
        if !s.needs_completion {
            break;
        }
    }
    fd.set_kvm_immediate_exit(0);
    (deferred, held)
}

/// What one `KVM_RUN` and its exit came to.
struct Step {
    /// The VM must end.
    outcome: Option<ExitReason>,
    /// An I/O or MMIO exit KVM completes at the next entry.
    needs_completion: bool,
    /// A trapped write asked for the vCPU to be held.
    held: bool,
}

/// Runs the vCPU once and handles its exit: port and MMIO devices, trapped
/// writes to write-controlled pages (rewinding through the synced registers
/// when `synced`), errors.
fn step(index: u8, fd: &mut VcpuFd, bus: &PioBus, wc: &WriteControl, synced: bool) -> Step {
    let mut internal_error = false;
    let mut needs_completion = false;
    let mut trapped: Option<(u64, [u8; 8], usize)> = None;
    let mut held = false;
    let mut outcome = match fd.run() {
        Ok(exit) => {
            internal_error = matches!(exit, VcpuExit::InternalError);
            needs_completion = matches!(
                exit,
                VcpuExit::IoIn(..)
                    | VcpuExit::IoOut(..)
                    | VcpuExit::MmioRead(..)
                    | VcpuExit::MmioWrite(..)
            );
            match exit {
                // A write to a write-controlled page of RAM, or to the patch
                // area (refused unless it is a copy of data being tracked).
                VcpuExit::MmioWrite(addr, data)
                    if wc.is_protected_page(addr) || wc.in_area(addr) =>
                {
                    let mut b = [0u8; 8];
                    let n = data.len().min(8);
                    b[..n].copy_from_slice(&data[..n]);
                    trapped = Some((addr, b, n));
                    None
                }
                exit => handle_exit(index, exit, bus),
            }
        }
        Err(e) if e.errno() == libc::EINTR => {
            fd.set_kvm_immediate_exit(0);
            None
        }
        Err(e) if e.errno() == libc::EAGAIN => None,
        Err(e) => Some(run_error(index, format!("KVM_RUN failed: {e}"))),
    };
    if let Some((gpa, data, n)) = trapped {
        let synced_regs = synced.then(|| fd.sync_regs());
        let cpu = FdCpu::new(fd, wc.ram(), synced_regs.as_ref());
        let out = wc.on_write(index, &cpu, gpa, &data[..n]);
        held = out == Outcome::Hold;
        if let Outcome::Rewind(regs) = out {
            if synced {
                // KVM loads them at the next entry.
                fd.sync_regs_mut().regs = regs;
                fd.set_sync_dirty_reg(SyncReg::Register);
            } else if let Err(e) = fd.set_regs(&regs) {
                outcome = Some(run_error(
                    index,
                    format!("rewinding a trapped write failed: {e}"),
                ));
            }
        }
    }
    if internal_error {
        let run = fd.get_kvm_run();
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
        // kvm_run union is the one KVM filled in.
        let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
        let why = if sub == 1 {
            " (instruction emulation failed)"
        } else {
            ""
        };
        outcome = Some(run_error(
            index,
            format!("KVM internal error, suberror {sub}{why}"),
        ));
    }
    if let Some(ExitReason::TripleFault { .. }) = outcome {
        // What a developer needs to find the fault: where the vCPU was.
        log_crash_state(index, fd);
    }
    Step {
        outcome,
        needs_completion,
        held,
    }
}

/// Logs the registers of a vCPU that triple-faulted. On Intel KVM keeps
/// the state at the shutdown (RIP is where the last fault was raised or
/// delivered); on AMD it resets the vCPU at the SHUTDOWN intercept, so the
/// registers are the reset values (RIP 0xfff0, CS 0xf000), said as such.
fn log_crash_state(index: u8, fd: &kvm_ioctls::VcpuFd) {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => log::error!(
            "vCPU {index} triple fault: its registers read back in their reset state (KVM on AMD \
             resets a vCPU at a shutdown), so where it faulted is not known"
        ),
        (Ok(r), Ok(s)) => log::error!(
            "vCPU {index} triple fault: rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}+{:#x} gs_base={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
            s.idt.base, s.idt.limit, s.gs.base, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        ),
        (r, s) => log::error!(
            "vCPU {index} triple fault; registers unreadable: {:?} {:?}",
            r.err(),
            s.err()
        ),
    }
}

fn handle_exit(index: u8, exit: VcpuExit<'_>, bus: &PioBus) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoOut(port, data) => match bus.pio_write(port, data)? {
            GuestRequest::Exit(status) => Some(ExitReason::GuestExit { status }),
            GuestRequest::Reset => Some(ExitReason::Reset),
            GuestRequest::PowerOff => Some(ExitReason::PowerOff),
        },
        VcpuExit::IoIn(port, data) => {
            bus.pio_read(port, data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            log::debug!("vCPU {index}: MMIO read of unclaimed {addr:#x}");
            data.fill(0xff);
            None
        }
        VcpuExit::MmioWrite(addr, _) => {
            log::debug!("vCPU {index}: MMIO write to unclaimed {addr:#x}");
            None
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        VcpuExit::Hlt => Some(run_error(
            index,
            "halted without an in-kernel irqchip".into(),
        )),
        VcpuExit::Shutdown => Some(ExitReason::TripleFault { vcpu: index }),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::PowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
            other => Some(run_error(index, format!("system event {other}"))),
        },
        // The caller reads the suberror from kvm_run and replaces this message.
        VcpuExit::InternalError => Some(run_error(index, "KVM internal error".into())),
        VcpuExit::FailEntry(reason, cpu) => Some(run_error(
            index,
            format!("VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"),
        )),
        other => Some(run_error(index, format!("unhandled exit {other:?}"))),
    }
}

/// A vCPU that made a trapped write: its registers as KVM synced them at
/// the exit, else read (at most once) by ioctl.
struct FdCpu<'a> {
    fd: &'a VcpuFd,
    ram: &'a GuestRam,
    regs: std::cell::OnceCell<Option<kvm_bindings::kvm_regs>>,
    sregs: std::cell::OnceCell<Option<kvm_bindings::kvm_sregs>>,
}

impl<'a> FdCpu<'a> {
    fn new(
        fd: &'a VcpuFd,
        ram: &'a GuestRam,
        synced: Option<&kvm_bindings::kvm_sync_regs>,
    ) -> Self {
        let (regs, sregs) = (std::cell::OnceCell::new(), std::cell::OnceCell::new());
        if let Some(s) = synced {
            let _ = regs.set(Some(s.regs));
            let _ = sregs.set(Some(s.sregs));
        }
        Self {
            fd,
            ram,
            regs,
            sregs,
        }
    }
}

impl WriterCpu for FdCpu<'_> {
    fn regs(&self) -> Option<kvm_bindings::kvm_regs> {
        *self.regs.get_or_init(|| self.fd.get_regs().ok())
    }
    fn sregs(&self) -> Option<kvm_bindings::kvm_sregs> {
        *self.sregs.get_or_init(|| self.fd.get_sregs().ok())
    }
    fn memory(&self) -> &dyn PhysMemory {
        self.ram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until `f` holds (the held thread gets there on its own time).
    fn until(f: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(30), "never happened");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_held_vcpu_counts_as_paused_and_runs_only_once_released() {
        // A pause kicks vCPU threads with this signal.
        install_kick_handler().expect("kick handler");
        let ctl = Arc::new(RunControl::new(1));
        let (tx, rx) = std::sync::mpsc::channel();
        let c = ctl.clone();
        let t = std::thread::spawn(move || {
            c.thread_started(0);
            let mut parked_once = false;
            let go_on = c.hold(0, || parked_once = true);
            tx.send((go_on, parked_once)).expect("send");
            // A release that comes first lets the next hold pass at once.
            rx_wait(&c);
            let again = c.hold(0, || {});
            c.thread_ended(0);
            again
        });
        until(|| ctl.held() == 1);
        // A pause finds it parked already; resuming does not release it.
        ctl.pause(Duration::from_secs(30)).expect("pause");
        assert!(ctl.is_paused());
        ctl.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ctl.held(), 1);
        assert!(rx.try_recv().is_err(), "ran on before its release");
        ctl.release(0);
        let (go_on, parked_once) = rx.recv().expect("released");
        assert!(go_on && parked_once);
        ctl.release(0);
        assert!(t.join().expect("thread"), "released before its hold");
    }

    fn rx_wait(c: &RunControl) {
        until(|| c.lock().released[0]);
    }

    #[test]
    fn stopping_ends_a_held_vcpu() {
        let ctl = Arc::new(RunControl::new(2));
        let c = ctl.clone();
        let t = std::thread::spawn(move || {
            c.thread_started(1);
            let go_on = c.hold(1, || {});
            c.thread_ended(1);
            go_on
        });
        until(|| ctl.held() == 1);
        ctl.stop(ExitReason::Stopped);
        assert!(!t.join().expect("thread"));
        assert_eq!(ctl.held(), 0);
    }
}
