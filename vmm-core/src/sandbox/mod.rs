//! A sandbox for guest-kernel code the VMM itself runs: a second, tiny KVM
//! VM with one vCPU and no devices, in which a function compiled for the
//! guest's kernel (a patch's C state-transfer function) runs on copies of
//! two buffers.
//!
//! The guest is never involved: the function sees only its two buffers, its
//! own code and a stack, at kernel addresses (a 2 MiB window at
//! [`WINDOW_VA`], in the top 2 GiB like kernel code, so `-mcmodel=kernel`
//! code links there). It runs in user mode (CPL 3): it can use no
//! privileged instruction, and on a host whose KVM emulates guest kernel
//! mode (PVM) it runs natively. Interrupts are off and there is no
//! interrupt source. Every exception goes through the sandbox's own IDT to
//! a kernel-mode stub that reports it to the VMM; a function that runs
//! past its time limit is kicked out of `KVM_RUN` by a watchdog. Either way
//! the call fails with the cause named, and the sandbox is ready for the
//! next call: the buffers are copied back only after a normal return. A
//! call that returns leaves `KVM_RUN` through a store to the exit page,
//! which has no memory behind it (one MMIO exit, no kernel-mode code run).
//!
//! Layout of the window (virtual [`WINDOW_VA`] + offset = physical
//! `WINDOW_GPA` + offset, 4 KiB pages; the gaps are unmapped guards):
//!
//! | offset | what | mode |
//! |---|---|---|
//! | 0x0000 | GDT (kernel code 0x10, data 0x18; user data 0x2b, code 0x33; TSS 0x40) | kernel |
//! | 0x1000 | IDT, 32 interrupt gates, all on IST 1 | kernel |
//! | 0x2000 | exception stubs | kernel |
//! | 0x3000 | TSS | kernel |
//! | 0x4000 | the `%gs` page (zeros: a stack canary read works) | user, read-only |
//! | 0x5000 | the call trampoline, runtime functions | user, read-only |
//! | 0x6000 | the exit page (no memory behind it) | user |
//! | 0x7000 | the call: entry, count, element pointers and sizes | user, read-only |
//! | 0x8000..0x9000 | the IST stack (a stack overflow is reported, not a triple fault) | kernel |
//! | 0x10000..0x1f000 | stack (60 KiB; 28 KiB unmapped below it) | user |
//! | 0x20000 | first buffer (at most [`ARG_MAX`] bytes) | user |
//! | 0x61000 | second buffer | user |
//! | 0x100000 | code ([`CODE_VA`], at most [`CODE_MAX`] bytes) | user, read-only |
//! | 0x4000000.. | unmapped, past the window: [`poison_symbol`] addresses | |
//!
//! All of it is read-only to the function but its stack and the two
//! buffers: nothing a call does survives into the next one.

pub mod interp;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::gdt::{gdt_entry, kvm_segment_from_gdt};

/// Virtual address of the sandbox's window.
pub const WINDOW_VA: u64 = 0xffff_ffff_c000_0000;
const WINDOW_GPA: u64 = 0x20_0000;
const MEM_BYTES: usize = 4 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;

const GDT_OFF: u64 = 0;
const IDT_OFF: u64 = 0x1000;
const STUBS_OFF: u64 = 0x2000;
const TSS_OFF: u64 = 0x3000;
const GS_OFF: u64 = 0x4000;
/// The call trampoline: `entry(a + i*a_size, b + i*b_size)` for i < count
/// (a single call is a batch of one).
const BATCH_OFF: u64 = 0x5000;
const RUNTIME_OFF: u64 = 0x5100;
const RUNTIME_END: u64 = 0x6000;
/// A store to this page leaves `KVM_RUN` as an MMIO exit: the trampoline's
/// "the function returned".
const EXIT_OFF: u64 = 0x6000;
/// The physical address behind the exit page: past the sandbox's memory.
const EXIT_GPA: u64 = 0x4000_0000;
/// What the trampoline runs next, written by the VMM before each call:
/// entry, count, the two element pointers and sizes (64-bit words).
const CALL_OFF: u64 = 0x7000;
const IST_LO: u64 = 0x8000;
const IST_TOP: u64 = 0x9000;
const STACK_LO: u64 = 0x10000;
const STACK_TOP: u64 = 0x1f000;
const ARG0_OFF: u64 = 0x20000;
const ARG1_OFF: u64 = 0x61000;
/// Largest buffer a call takes.
pub const ARG_MAX: u64 = 0x40000;
const CODE_OFF: u64 = 0x10_0000;
/// Where the code a sandbox runs must be linked.
pub const CODE_VA: u64 = WINDOW_VA + CODE_OFF;
/// Largest code a sandbox takes.
pub const CODE_MAX: u64 = 0x10_0000;
/// Unmapped addresses standing for symbols the sandbox does not provide:
/// 64 KiB apart, past the window (the rest of its 1 GiB is unmapped), so
/// an access at an offset into one still names it.
const POISON_OFF: u64 = 0x400_0000;
const POISON_SLOT: u64 = 0x1_0000;
const POISON_SLOTS: u64 = (0x4000_0000 - POISON_OFF) / POISON_SLOT - 1;

/// The I/O port an exception stub writes (the vector in AL).
const FAULT_PORT: u16 = 0xf1;

/// Selectors of the sandbox's GDT: the kernel's (the exception stubs) and
/// the user's (the function), in Linux's layout, which PVM requires of
/// user mode.
const SEL_KCODE: u16 = 0x10;
const SEL_UDATA: u16 = 0x2b;
const SEL_UCODE: u16 = 0x33;
const SEL_TSS: u16 = 0x40;
/// Access and flag bits: 64-bit code, kernel (0x9b) and user (0xfb);
/// data, kernel (0x93) and user (0xf3).
const SANDBOX_GDT: [u64; 8] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    0,
    gdt_entry(0xc0f3, 0, 0xfffff),
    gdt_entry(0xa0fb, 0, 0xfffff),
    0,
];

/// The default time limit of one call.
pub const TIME_LIMIT: Duration = Duration::from_millis(50);

/// Why a sandbox could not be made or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A KVM call failed.
    #[error("sandbox: {what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Memory for the sandbox.
    #[error("sandbox memory: {0}")]
    Memory(String),
    /// The code or a buffer does not fit.
    #[error("{0}")]
    TooBig(String),
    /// The function raised an exception.
    #[error("faulted: {name} (vector {vector}) at {rip:#x}{}", fault_detail(*.vector, *.address, *.error_code))]
    Fault {
        /// Exception vector.
        vector: u8,
        /// Its mnemonic (#PF, #GP, ...).
        name: &'static str,
        /// Where it happened.
        rip: u64,
        /// The address a page fault was for.
        address: u64,
        /// The error code, for the vectors that push one.
        error_code: Option<u64>,
    },
    /// The function ran past its time limit.
    #[error("ran past its time limit of {} ms (an endless loop?)", .0.as_millis())]
    RanAway(Duration),
    /// The sandbox's vCPU stopped in a way no function should make it.
    #[error("stopped: {0}")]
    Exit(String),
}

fn fault_detail(vector: u8, address: u64, error_code: Option<u64>) -> String {
    let mut s = String::new();
    if vector == 14 {
        s += &format!(", address {address:#x}");
        if poison_index(address).is_some() {
            s += " (a kernel symbol: a transfer function can use only its two arguments)";
        }
    }
    if let Some(e) = error_code {
        s += &format!(", error code {e:#x}");
    }
    s
}

const POISON_VA: u64 = WINDOW_VA + POISON_OFF;

/// The address standing for the `index`th symbol the sandbox does not
/// provide: unmapped, so using it faults and the fault names it.
pub fn poison_symbol(index: u64) -> Option<u64> {
    (index < POISON_SLOTS).then(|| POISON_VA + index * POISON_SLOT)
}

/// Which poison symbol `address` is, if any.
pub fn poison_index(address: u64) -> Option<u64> {
    (POISON_VA..POISON_VA + POISON_SLOTS * POISON_SLOT)
        .contains(&address)
        .then(|| (address - POISON_VA) / POISON_SLOT)
}

const EXCEPTIONS: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "?", "#TS", "#NP", "#SS", "#GP",
    "#PF", "?", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "?", "?", "?", "?", "?", "?", "#HV",
    "#VC", "#SX", "?",
];

/// Vectors for which the CPU pushes an error code.
fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Runtime functions compiled kernel code may call, by name, with their
/// machine code (kernel objects call `__fentry__` at entry, return through
/// the return thunk, branch indirectly through retpoline thunks, and the
/// compiler emits `memcpy`/`memset`/`memmove` for struct copies).
fn runtime() -> Vec<(Vec<&'static str>, Vec<u8>)> {
    let mut r: Vec<(Vec<&'static str>, Vec<u8>)> = vec![
        (
            vec!["__fentry__", "__x86_return_thunk", "mcount"],
            vec![0xc3],
        ),
        (
            vec!["memcpy", "__memcpy"],
            // mov rax,rdi; mov rcx,rdx; rep movsb; ret
            vec![0x48, 0x89, 0xf8, 0x48, 0x89, 0xd1, 0xf3, 0xa4, 0xc3],
        ),
        (
            vec!["memset", "__memset"],
            // mov r9,rdi; mov eax,esi; mov rcx,rdx; rep stosb; mov rax,r9; ret
            vec![
                0x49, 0x89, 0xf9, 0x89, 0xf0, 0x48, 0x89, 0xd1, 0xf3, 0xaa, 0x4c, 0x89, 0xc8, 0xc3,
            ],
        ),
        (
            vec!["memmove", "__memmove"],
            // mov rax,rdi; mov rcx,rdx; cmp rdi,rsi; jbe fwd;
            // lea rsi,[rsi+rdx-1]; lea rdi,[rdi+rdx-1]; std; rep movsb; cld; ret;
            // fwd: rep movsb; ret
            vec![
                0x48, 0x89, 0xf8, 0x48, 0x89, 0xd1, 0x48, 0x39, 0xf7, 0x76, 0x0f, 0x48, 0x8d, 0x74,
                0x16, 0xff, 0x48, 0x8d, 0x7c, 0x17, 0xff, 0xfd, 0xf3, 0xa4, 0xfc, 0xc3, 0xf3, 0xa4,
                0xc3,
            ],
        ),
    ];
    const REGS: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    for (i, reg) in REGS.iter().enumerate() {
        let name: &'static str = match *reg {
            "rax" => "__x86_indirect_thunk_rax",
            "rcx" => "__x86_indirect_thunk_rcx",
            "rdx" => "__x86_indirect_thunk_rdx",
            "rbx" => "__x86_indirect_thunk_rbx",
            "rsp" => "__x86_indirect_thunk_rsp",
            "rbp" => "__x86_indirect_thunk_rbp",
            "rsi" => "__x86_indirect_thunk_rsi",
            "rdi" => "__x86_indirect_thunk_rdi",
            "r8" => "__x86_indirect_thunk_r8",
            "r9" => "__x86_indirect_thunk_r9",
            "r10" => "__x86_indirect_thunk_r10",
            "r11" => "__x86_indirect_thunk_r11",
            "r12" => "__x86_indirect_thunk_r12",
            "r13" => "__x86_indirect_thunk_r13",
            "r14" => "__x86_indirect_thunk_r14",
            _ => "__x86_indirect_thunk_r15",
        };
        // jmp *%reg
        let modrm = 0xe0 | (i as u8 & 7);
        let code = if i < 8 {
            vec![0xff, modrm]
        } else {
            vec![0x41, 0xff, modrm]
        };
        r.push((vec![name], code));
    }
    r
}

/// The call trampoline, at [`BATCH_OFF`]: runs `entry(a_i, b_i)` for the
/// call at [`CALL_OFF`], then leaves `KVM_RUN` through the exit page and,
/// entered again, starts on the next call. A call sets no register: it
/// writes the call and runs the vCPU.
fn trampoline() -> Result<Vec<u8>, SandboxError> {
    use iced_x86::code_asm::{
        al, byte_ptr, qword_ptr, r12, r13, r14, r15, rbp, rbx, rdi, rsi, rsp, CodeAssembler,
    };
    let asm =
        |e: iced_x86::IcedError| SandboxError::Exit(format!("assembling the trampoline: {e}"));
    let word = |i: u64| qword_ptr(WINDOW_VA + CALL_OFF + i * 8);
    let mut a = CodeAssembler::new(64).map_err(asm)?;
    let mut start = a.create_label();
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut start).map_err(asm)?;
    a.mov(rsp, (WINDOW_VA + STACK_TOP) as i64).map_err(asm)?;
    // Flags as at a kernel function's entry (DF clear, no trap flag).
    a.push(2).map_err(asm)?;
    a.popfq().map_err(asm)?;
    for (i, reg) in [rbp, rbx, r12, r13, r14, r15].into_iter().enumerate() {
        a.mov(reg, word(i as u64)).map_err(asm)?;
    }
    // rbp = entry, rbx = count, r12/r13 = the element pointers, r14/r15 =
    // their sizes (callee-saved: they survive each call).
    a.set_label(&mut next).map_err(asm)?;
    a.test(rbx, rbx).map_err(asm)?;
    a.jz(done).map_err(asm)?;
    a.mov(rdi, r12).map_err(asm)?;
    a.mov(rsi, r13).map_err(asm)?;
    a.call(rbp).map_err(asm)?;
    a.add(r12, r14).map_err(asm)?;
    a.add(r13, r15).map_err(asm)?;
    a.dec(rbx).map_err(asm)?;
    a.jmp(next).map_err(asm)?;
    a.set_label(&mut done).map_err(asm)?;
    a.mov(byte_ptr(WINDOW_VA + EXIT_OFF), al).map_err(asm)?;
    a.jmp(start).map_err(asm)?;
    let code = a.assemble(WINDOW_VA + BATCH_OFF).map_err(asm)?;
    if code.len() as u64 > RUNTIME_OFF - BATCH_OFF {
        return Err(SandboxError::Exit("the trampoline outgrew its room".into()));
    }
    Ok(code)
}

/// The runtime laid out from [`RUNTIME_OFF`]: (names, offset, code).
fn runtime_layout() -> Vec<(Vec<&'static str>, u64, Vec<u8>)> {
    let mut at = RUNTIME_OFF;
    runtime()
        .into_iter()
        .map(|(names, code)| {
            let here = at;
            at += (code.len() as u64).div_ceil(16) * 16;
            (names, here, code)
        })
        .collect()
}

/// Where the sandbox provides runtime function `name`, if it does.
pub fn runtime_symbol(name: &str) -> Option<u64> {
    runtime_layout()
        .into_iter()
        .find(|(names, _, _)| names.contains(&name))
        .map(|(_, off, _)| WINDOW_VA + off)
}

/// How many element pairs two buffers of a call hold: the same number of
/// `a_size` and `b_size` bytes, within [`ARG_MAX`].
fn elements(
    (a, a_size): (&[u8], usize),
    (b, b_size): (&[u8], usize),
) -> Result<usize, SandboxError> {
    let count = a.len().checked_div(a_size).unwrap_or(0);
    if a_size == 0 || b_size == 0 || a.len() != count * a_size || b.len() != count * b_size {
        return Err(SandboxError::TooBig(format!(
            "{} and {} bytes are not {count} elements of {a_size} and {b_size}",
            a.len(),
            b.len()
        )));
    }
    if a.len() as u64 > ARG_MAX || b.len() as u64 > ARG_MAX {
        return Err(SandboxError::TooBig(format!(
            "buffers of {} and {} bytes; a sandbox call takes at most {ARG_MAX} each",
            a.len(),
            b.len()
        )));
    }
    Ok(count)
}

/// Disarmed, or armed until a deadline for one thread.
#[derive(Debug, Default)]
struct Watch {
    armed: Option<(Instant, libc::pthread_t)>,
    /// When the watchdog thread looks next (`None`: it sleeps until woken).
    wakes_at: Option<Instant>,
    fired: bool,
    quit: bool,
}

#[derive(Debug, Default)]
struct Watchdog {
    state: Mutex<Watch>,
    cv: Condvar,
}

impl Watchdog {
    /// Kicks the armed thread out of `KVM_RUN` once its deadline passes,
    /// and again every millisecond until it is disarmed (a kick that lands
    /// just before `KVM_RUN` is otherwise lost). Arming and disarming wake
    /// it only when it would otherwise look too late: calls in a row cost
    /// no thread switch.
    fn run(&self) {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if w.quit {
                return;
            }
            let now = Instant::now();
            let wait = match w.armed {
                None => None,
                Some((deadline, tid)) if now >= deadline => {
                    w.fired = true;
                    // SAFETY: `tid` is a thread that armed the watchdog and
                    // disarms it before it ends; the kick signal's handler is
                    // installed before any sandbox runs.
                    unsafe { libc::pthread_kill(tid, crate::vcpu::kick_signal()) };
                    Some(Duration::from_millis(1))
                }
                Some((deadline, _)) => Some(deadline - now),
            };
            w.wakes_at = wait.map(|d| now + d);
            w = match wait {
                None => self.cv.wait(w).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    self.cv
                        .wait_timeout(w, d)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn arm(&self, limit: Duration) {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: pthread_self has no preconditions.
        let tid = unsafe { libc::pthread_self() };
        let deadline = Instant::now() + limit;
        w.armed = Some((deadline, tid));
        w.fired = false;
        if w.wakes_at.is_none_or(|t| t > deadline) {
            self.cv.notify_all();
        }
    }

    /// Disarms; whether it fired. The watchdog finds it disarmed when it
    /// next looks.
    fn disarm(&self) -> bool {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        w.armed = None;
        w.fired
    }

    fn fired(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).fired
    }
}

/// While a call runs: the watchdog armed and this thread's kick target on
/// the sandbox's `kvm_run`; undone on drop, whatever happens.
struct Armed {
    watchdog: Arc<Watchdog>,
    page: *mut kvm_bindings::kvm_run,
    previous: *mut kvm_bindings::kvm_run,
    kicked_for_guest: std::cell::Cell<bool>,
}

impl Armed {
    fn new(watchdog: Arc<Watchdog>, page: *mut kvm_bindings::kvm_run, limit: Duration) -> Self {
        let previous = crate::vcpu::swap_kick_page(page);
        watchdog.arm(limit);
        Armed {
            watchdog,
            page,
            previous,
            kicked_for_guest: std::cell::Cell::new(false),
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.watchdog.disarm();
        // SAFETY: `page` is the sandbox vCPU's kvm_run mapping, alive for as
        // long as the Sandbox whose call made this guard.
        let own = unsafe { std::ptr::addr_of_mut!((*self.page).immediate_exit) };
        // SAFETY: `own` points into that live mapping.
        unsafe { std::ptr::write_volatile(own, 0) };
        crate::vcpu::swap_kick_page(self.previous);
        if self.kicked_for_guest.get() && !self.previous.is_null() {
            // SAFETY: `previous` is this thread's own vCPU kvm_run mapping (set
            // by its vCPU loop, which outlives this call).
            let field = unsafe { std::ptr::addr_of_mut!((*self.previous).immediate_exit) };
            // SAFETY: `field` points into that live mapping; a volatile byte
            // store is what the kick handler itself does.
            unsafe { std::ptr::write_volatile(field, 1) };
        }
    }
}

/// A sandbox holding one linked piece of code.
#[derive(Debug)]
pub struct Sandbox {
    // Field order: the vCPU and VM go before the memory they map.
    vcpu: VcpuFd,
    _vm: VmFd,
    mem: GuestMemoryMmap,
    code_len: u64,
    /// The entry state, put back after a call that did not return.
    sregs: kvm_bindings::kvm_sregs,
    /// Whether the vCPU is where a call starts (after the last call's
    /// exit: the trampoline's jump back to its start).
    at_start: bool,
    watchdog: Arc<Watchdog>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SandboxError {
    move |source| SandboxError::Kvm { what, source }
}

impl Sandbox {
    /// A sandbox running `code`, linked to run at [`CODE_VA`].
    pub fn new(code: &[u8]) -> Result<Self, SandboxError> {
        if code.len() as u64 > CODE_MAX {
            return Err(SandboxError::TooBig(format!(
                "{} bytes of code; a sandbox takes at most {CODE_MAX}",
                code.len()
            )));
        }
        crate::vcpu::install_kick_handler()
            .map_err(|e| SandboxError::Exit(format!("installing the kick signal handler: {e}")))?;
        let kvm_fd = Kvm::new().map_err(kvm("opening /dev/kvm"))?;
        let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        if let Err(e) = vm.set_tss_address(0xfffb_d000) {
            log::debug!("sandbox KVM_SET_TSS_ADDR: {e}");
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES)])
            .map_err(|e| SandboxError::Memory(e.to_string()))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| SandboxError::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_BYTES as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of MEM_BYTES owned by
        // `mem`, which the Sandbox drops only after the VM and vCPU.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
        let cpuid = kvm_fd
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        let watchdog = Arc::new(Watchdog::default());
        let w = watchdog.clone();
        let watcher = std::thread::Builder::new()
            .name("sandbox-watchdog".into())
            .spawn(move || w.run())
            .map_err(|e| SandboxError::Exit(format!("starting the watchdog: {e}")))?;
        let mut sb = Sandbox {
            vcpu,
            _vm: vm,
            mem,
            code_len: code.len() as u64,
            sregs: Default::default(),
            at_start: false,
            watchdog,
            watcher: Some(watcher),
        };
        sb.build(code)?;
        Ok(sb)
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), SandboxError> {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| SandboxError::Memory(e.to_string()))
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), SandboxError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| SandboxError::Memory(e.to_string()))
    }

    fn build(&mut self, code: &[u8]) -> Result<(), SandboxError> {
        const P: u64 = 1; // present
        const W: u64 = 2; // writable
        const U: u64 = 4; // user
        let va = |off: u64| WINDOW_VA + off;
        // Page tables: the window's 2 MiB through one PT of 4 KiB pages;
        // what the function may touch is marked user in its PTE.
        self.write(PML4 + 511 * 8, &(PDPT | P | W | U).to_le_bytes())?;
        self.write(PDPT + 511 * 8, &(PD | P | W | U).to_le_bytes())?;
        self.write(PD, &(PT | P | W | U).to_le_bytes())?;
        let code_end = CODE_OFF + self.code_len.div_ceil(0x1000) * 0x1000;
        for page in 0..512u64 {
            let off = page * 0x1000;
            let pte = if off < GS_OFF || (IST_LO..IST_TOP).contains(&off) {
                // Kernel only: tables, stubs, the exception stack.
                let w = if off >= IST_LO { W } else { 0 };
                (WINDOW_GPA + off) | P | w
            } else if off == EXIT_OFF {
                EXIT_GPA | P | W | U
            } else if (STACK_LO..STACK_TOP).contains(&off)
                || (ARG0_OFF..ARG0_OFF + ARG_MAX).contains(&off)
                || (ARG1_OFF..ARG1_OFF + ARG_MAX).contains(&off)
            {
                (WINDOW_GPA + off) | P | W | U
            } else if off < RUNTIME_END || off == CALL_OFF || (CODE_OFF..code_end).contains(&off) {
                (WINDOW_GPA + off) | P | U
            } else {
                0
            };
            self.write(PT + page * 8, &pte.to_le_bytes())?;
        }
        // GDT (the TSS's 16-byte descriptor after the segments) and IDT.
        for (i, e) in SANDBOX_GDT.iter().enumerate() {
            self.write(WINDOW_GPA + GDT_OFF + i as u64 * 8, &e.to_le_bytes())?;
        }
        let tss = va(TSS_OFF);
        let tss_lo = gdt_entry(0x0089, tss as u32, 0x67) | ((tss >> 24) & 0xff) << 56;
        let tss_desc = [tss_lo, tss >> 32];
        for (i, e) in tss_desc.iter().enumerate() {
            let at = u64::from(SEL_TSS) + i as u64 * 8;
            self.write(WINDOW_GPA + GDT_OFF + at, &e.to_le_bytes())?;
        }
        for v in 0..32u64 {
            let handler = va(STUBS_OFF + v * 16);
            let mut gate = [0u8; 16];
            gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
            gate[2..4].copy_from_slice(&SEL_KCODE.to_le_bytes());
            // Every exception on the IST stack: a bad RSP still reports.
            gate[4] = 1;
            // Present, 64-bit interrupt gate; DPL 0 but for #BP, so that
            // `int3` is a #BP on every host (not a #GP through the gate).
            gate[5] = if v == 3 { 0xee } else { 0x8e };
            gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
            gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
            self.write(WINDOW_GPA + IDT_OFF + v * 16, &gate)?;
            // mov al, v; mov dx, FAULT_PORT; out dx, al; hlt; jmp $
            let [lo, hi] = FAULT_PORT.to_le_bytes();
            let stub = [0xb0, v as u8, 0x66, 0xba, lo, hi, 0xee, 0xf4, 0xeb, 0xfe];
            self.write(WINDOW_GPA + STUBS_OFF + v * 16, &stub)?;
        }
        self.write(WINDOW_GPA + BATCH_OFF, &trampoline()?)?;
        for (_, off, bytes) in runtime_layout() {
            self.write(WINDOW_GPA + off, &bytes)?;
        }
        // 64-bit TSS: RSP0 at offset 4, IST 1 at 0x24.
        self.write(WINDOW_GPA + TSS_OFF + 4, &va(IST_TOP).to_le_bytes())?;
        self.write(WINDOW_GPA + TSS_OFF + 0x24, &va(IST_TOP).to_le_bytes())?;
        self.write(WINDOW_GPA + CODE_OFF, code)?;

        let mut s = self.vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let segment = |sel: u16| {
            let mut seg =
                kvm_segment_from_gdt(SANDBOX_GDT[usize::from(sel >> 3)], (sel >> 3) as u8);
            seg.selector = sel;
            seg
        };
        let data = segment(SEL_UDATA);
        s.cs = segment(SEL_UCODE);
        s.ds = data;
        s.es = data;
        s.ss = data;
        s.fs = data;
        s.gs = data;
        s.gs.base = va(GS_OFF);
        s.tr = kvm_segment_from_gdt(tss_lo, (SEL_TSS >> 3) as u8);
        s.tr.base = tss;
        s.tr.type_ = 0xb; // busy
        s.gdt.base = va(GDT_OFF);
        s.gdt.limit = (u64::from(SEL_TSS) + 16 - 1) as u16;
        s.idt.base = va(IDT_OFF);
        s.idt.limit = 32 * 16 - 1;
        s.cr0 = 1 | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31); // PE ET NE WP PG
        s.cr3 = PML4;
        s.cr4 = 1 << 5; // PAE
        s.efer = (1 << 8) | (1 << 10); // LME LMA
        self.vcpu.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))?;
        self.sregs = s;
        Ok(())
    }

    /// Puts the vCPU at the trampoline's start in user mode, as after
    /// [`Sandbox::new`] (after a call that faulted or ran away).
    fn restart(&mut self) -> Result<(), SandboxError> {
        self.vcpu
            .set_sregs(&self.sregs)
            .map_err(kvm("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: WINDOW_VA + BATCH_OFF,
            rsp: WINDOW_VA + STACK_TOP,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        self.at_start = true;
        Ok(())
    }

    /// Runs the function at `entry` as `entry(a, b)` with `a` and `b`
    /// copies of the two buffers, at most `limit` long; on a normal return
    /// the function's `b` is copied back (`a` never is).
    pub fn call(
        &mut self,
        entry: u64,
        a: &[u8],
        b: &mut [u8],
        limit: Duration,
    ) -> Result<(), SandboxError> {
        let (a_size, b_size) = (a.len(), b.len());
        self.call_each(entry, (a, a_size), (b, b_size), limit)
    }

    /// Runs `entry` on `count` pairs of elements in one go (one `KVM_RUN`):
    /// `entry(a_i, b_i)` with `a_i` the `i`th `a_size` bytes of `a`, `b_i`
    /// likewise in `b`; at most `limit` for all of them. On a normal return
    /// all of `b` is copied back; on a failure none of it.
    pub fn call_each(
        &mut self,
        entry: u64,
        (a, a_size): (&[u8], usize),
        (b, b_size): (&mut [u8], usize),
        limit: Duration,
    ) -> Result<(), SandboxError> {
        let count = elements((a, a_size), (&*b, b_size))?;
        if !(CODE_VA..CODE_VA + self.code_len).contains(&entry) {
            return Err(SandboxError::Exit(format!(
                "entry {entry:#x} is outside the sandbox's code"
            )));
        }
        self.write(WINDOW_GPA + ARG0_OFF, a)?;
        self.write(WINDOW_GPA + ARG1_OFF, b)?;
        let call: Vec<u8> = [
            entry,
            count as u64,
            WINDOW_VA + ARG0_OFF,
            WINDOW_VA + ARG1_OFF,
            a_size as u64,
            b_size as u64,
        ]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
        self.write(WINDOW_GPA + CALL_OFF, &call)?;
        if !self.at_start {
            self.restart()?;
        }
        if let Err(e) = self.run(limit) {
            self.at_start = false;
            return Err(e);
        }
        self.read(WINDOW_GPA + ARG1_OFF, b)
    }

    /// Runs the vCPU until the trampoline or a stub reports, or the watchdog
    /// fires.
    fn run(&mut self, limit: Duration) -> Result<(), SandboxError> {
        let page: *mut kvm_bindings::kvm_run = self.vcpu.get_kvm_run();
        let guard = Armed::new(self.watchdog.clone(), page, limit);
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::MmioWrite(EXIT_GPA, _)) => return Ok(()),
                Ok(VcpuExit::IoOut(FAULT_PORT, data)) => {
                    let vector = data.first().copied().unwrap_or(0xff);
                    return Err(self.fault(vector));
                }
                Ok(exit) => return Err(SandboxError::Exit(format!("{exit:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    if self.watchdog.fired() {
                        return Err(SandboxError::RanAway(limit));
                    }
                    // A kick meant for the guest vCPU this thread runs.
                    guard.kicked_for_guest.set(true);
                }
                Err(e) => {
                    return Err(SandboxError::Kvm {
                        what: "KVM_RUN",
                        source: e,
                    })
                }
            }
        }
    }

    fn fault(&self, vector: u8) -> SandboxError {
        let name = EXCEPTIONS.get(vector as usize).copied().unwrap_or("?");
        let (mut rip, mut error_code, mut address) = (0, None, 0);
        if let Ok(r) = self.vcpu.get_regs() {
            let mut frame = [0u8; 16];
            let off = r.rsp.wrapping_sub(WINDOW_VA);
            // Every exception is taken on the IST stack.
            if (IST_LO..IST_TOP - 16).contains(&off)
                && self.read(WINDOW_GPA + off, &mut frame).is_ok()
            {
                let w0 = u64::from_le_bytes(frame[..8].try_into().unwrap_or_default());
                let w1 = u64::from_le_bytes(frame[8..].try_into().unwrap_or_default());
                if has_error_code(vector) {
                    (error_code, rip) = (Some(w0), w1);
                } else {
                    rip = w0;
                }
            }
        }
        if vector == 14 {
            address = self.vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
        }
        SandboxError::Fault {
            vector,
            name,
            rip,
            address,
            error_code,
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        {
            let mut w = self
                .watchdog
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            w.quit = true;
            self.watchdog.cv.notify_all();
        }
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_code_decodes_as_intended() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic};
        for (names, _, code) in runtime_layout() {
            let mut d = Decoder::with_ip(64, &code, 0, DecoderOptions::NONE);
            let m: Vec<Mnemonic> = d.iter().map(|i| i.mnemonic()).collect();
            assert!(!m.contains(&Mnemonic::INVALID), "{names:?}: {m:?}");
            let last = *m.last().unwrap_or(&Mnemonic::INVALID);
            assert!(
                last == Mnemonic::Ret || last == Mnemonic::Jmp,
                "{names:?} ends in {last:?}"
            );
        }
        let mm = runtime_layout()
            .into_iter()
            .find(|(n, _, _)| n.contains(&"memmove"))
            .map(|(_, _, c)| c)
            .unwrap_or_default();
        let mut d = Decoder::with_ip(64, &mm, 0, DecoderOptions::NONE);
        let i: Vec<iced_x86::Instruction> = d.iter().collect();
        assert_eq!(i[3].mnemonic(), Mnemonic::Jbe);
        assert_eq!(i[3].near_branch_target(), 0x1a, "to the forward copy");
        assert_eq!(i[9].mnemonic(), Mnemonic::Ret);
        for (k, reg) in [(4, iced_x86::Register::RSI), (5, iced_x86::Register::RDI)] {
            assert_eq!(i[k].mnemonic(), Mnemonic::Lea);
            assert_eq!(i[k].op0_register(), reg);
            assert_eq!(i[k].memory_base(), reg);
            assert_eq!(i[k].memory_index(), iced_x86::Register::RDX);
            assert_eq!(i[k].memory_displacement64(), u64::MAX);
        }
    }

    #[test]
    fn the_trampoline_reads_its_call_and_leaves_through_the_exit_page() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
        let code = trampoline().expect("assembles");
        let mut d = Decoder::with_ip(64, &code, WINDOW_VA + BATCH_OFF, DecoderOptions::NONE);
        let ins: Vec<iced_x86::Instruction> = d.iter().collect();
        assert!(ins.iter().all(|i| i.mnemonic() != Mnemonic::INVALID));
        // The six words of the call, absolute (not RIP-relative).
        let loads: Vec<(Register, u64)> = ins
            .iter()
            .filter(|i| i.op_count() == 2 && i.op1_kind() == OpKind::Memory)
            .map(|i| {
                assert_eq!(i.memory_base(), Register::None, "{:?}", i.code());
                (i.op0_register(), i.memory_displacement64())
            })
            .collect();
        let words: Vec<u64> = (0..6).map(|k| WINDOW_VA + CALL_OFF + k * 8).collect();
        assert_eq!(
            loads,
            [
                Register::RBP,
                Register::RBX,
                Register::R12,
                Register::R13,
                Register::R14,
                Register::R15
            ]
            .into_iter()
            .zip(words)
            .collect::<Vec<_>>()
        );
        let exit = ins
            .iter()
            .find(|i| i.op0_kind() == OpKind::Memory)
            .expect("the store to the exit page");
        assert_eq!(exit.memory_displacement64(), WINDOW_VA + EXIT_OFF);
        assert_eq!(exit.memory_base(), Register::None);
        let last = ins.last().expect("code");
        assert_eq!(last.mnemonic(), Mnemonic::Jmp);
        assert_eq!(
            last.near_branch_target(),
            WINDOW_VA + BATCH_OFF,
            "back to its start"
        );
        assert!(code.len() as u64 <= RUNTIME_OFF - BATCH_OFF);
    }

    #[test]
    fn symbols_have_addresses_in_the_window() {
        let m = runtime_symbol("memcpy").expect("memcpy");
        assert!((WINDOW_VA + RUNTIME_OFF..WINDOW_VA + RUNTIME_END).contains(&m));
        assert_eq!(runtime_symbol("memcpy"), runtime_symbol("__memcpy"));
        assert!(runtime_symbol("printk").is_none());
        let p = poison_symbol(3).expect("slot");
        assert_eq!(poison_index(p), Some(3));
        assert_eq!(poison_index(CODE_VA), None);
    }
}
