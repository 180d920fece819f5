//! An interpreter for the code the sandbox runs: the same function, linked
//! for the same window, run instruction by instruction by the VMM with no
//! VM entry. A trapped write whose transfer is a C function then costs
//! what the interpreted instructions cost (microseconds) instead of a
//! second `KVM_RUN` (as much as the trap itself on a host whose KVM
//! emulates kernel mode).
//!
//! It is as confined as the KVM sandbox: the function reaches only what the
//! sandbox maps (its code and constants read-only, the `%gs` page as zeros,
//! a 60 KiB stack, the two element buffers), every other address faults
//! with the exception the sandbox would report (`#PF` with its address, a
//! kernel symbol's poison address named), privileged instructions are not
//! run, and a call is bounded by a number of instructions (deterministic,
//! unlike a wall-clock limit).
//!
//! What it runs is decided before it runs: [`Program::new`] decodes every
//! instruction reachable from the entries (direct branches and calls;
//! calls of the sandbox's runtime functions are carried out by the
//! interpreter) and refuses the code if any is one it does not carry out:
//! an indirect branch, a privileged, floating-point or vector instruction,
//! one with a 16-bit stack or a 32-bit address. Such code runs in the KVM
//! sandbox instead. The integer instruction set GCC emits for kernel C is
//! covered; flags are computed where the architecture defines them.
//!
//! Where it differs from the KVM sandbox, in what compiled C cannot see or
//! does not do: the flags `popfq` may set besides the arithmetic ones and
//! DF (AC, ID, NT; the trap flag is ignored), reads of the sandbox's own
//! user pages (the trampoline, the runtime, the call page: a fault here),
//! reads past the last element of a buffer (a fault here, stale bytes
//! there), and the flags at entry (undefined for a called function).
//! Where CPUs differ, it does what the Intel machines it was compared on
//! do: a 32-bit register shifted by a masked count of 0 has its upper half
//! cleared, and read-only memory shifted by 0 faults; a failed `cmpxchg`
//! leaves a 32-bit register destination whole.

use std::collections::HashMap;

use iced_x86::{ConditionCode, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use super::{
    runtime_layout, SandboxError, ARG0_OFF, ARG1_OFF, BATCH_OFF, CODE_VA, EXCEPTIONS, GS_OFF,
    STACK_LO, STACK_TOP, WINDOW_VA,
};

/// The return address of the outermost call: where the KVM sandbox's
/// trampoline is; `ret` to it ends the element.
const RETURN: u64 = WINDOW_VA + BATCH_OFF;

/// The default limit of one element's instructions (about as long as the
/// KVM sandbox's time limit, interpreted).
pub const INSTRUCTION_LIMIT: u64 = 20_000_000;

/// The sandbox's runtime functions, carried out by the interpreter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    /// `__fentry__`, the return thunk: a `ret`.
    Ret,
    Memcpy,
    Memset,
    Memmove,
}

fn runtime_at(addr: u64) -> Option<Runtime> {
    runtime_layout().into_iter().find_map(|(names, off, _)| {
        (WINDOW_VA + off == addr).then(|| match names[0] {
            "memcpy" => Some(Runtime::Memcpy),
            "memset" => Some(Runtime::Memset),
            "memmove" => Some(Runtime::Memmove),
            "__fentry__" => Some(Runtime::Ret),
            // The retpoline thunks: indirect branches.
            _ => None,
        })?
    })
}

/// Whether `addr` is in the sandbox's own code (trampoline, runtime).
fn in_runtime_code(addr: u64) -> bool {
    (WINDOW_VA + BATCH_OFF..WINDOW_VA + BATCH_OFF + 0x1000).contains(&addr)
}

/// The `nth` `rep` string instruction of the runtime function at `entry`:
/// where a fault in it is reported (memmove: 0 backward, 1 forward).
fn runtime_rep(entry: u64, nth: usize) -> u64 {
    runtime_layout()
        .into_iter()
        .find(|(_, off, _)| WINDOW_VA + off == entry)
        .and_then(|(_, off, code)| {
            let mut d = Decoder::with_ip(64, &code, WINDOW_VA + off, DecoderOptions::NONE);
            d.iter()
                .filter(|i| i.has_rep_prefix())
                .nth(nth)
                .map(|i| i.ip())
        })
        .unwrap_or(entry)
}

/// Code the interpreter can run, decoded once.
#[derive(Debug)]
pub struct Program {
    /// The code, padded to whole pages with zeros (as the sandbox maps it).
    code: Vec<u8>,
    decoded: HashMap<u64, Instruction>,
    runtime: HashMap<u64, Runtime>,
    stack: Vec<u8>,
    a: Vec<u8>,
    b: Vec<u8>,
}

fn code_end(code: &[u8]) -> u64 {
    CODE_VA + code.len() as u64
}

/// Whether the interpreter carries out `ins` (its operands included).
fn supported(ins: &Instruction) -> Result<(), String> {
    use Mnemonic::*;
    let ok = matches!(
        ins.mnemonic(),
        Mov | Movzx
            | Movsx
            | Movsxd
            | Lea
            | Xchg
            | Push
            | Pop
            | Leave
            | Cbw
            | Cwde
            | Cdqe
            | Cwd
            | Cdq
            | Cqo
            | Bswap
            | Nop
            | Endbr64
            | Lfence
            | Mfence
            | Sfence
            | Pause
            | Prefetchnta
            | Prefetcht0
            | Prefetcht1
            | Prefetcht2
            | Prefetchw
            | Int3
            | Ud2
            | Add
            | Adc
            | Sub
            | Sbb
            | Cmp
            | And
            | Or
            | Xor
            | Test
            | Neg
            | Not
            | Inc
            | Dec
            | Imul
            | Mul
            | Div
            | Idiv
            | Shl
            | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Bt
            | Bts
            | Btr
            | Btc
            | Bsf
            | Bsr
            | Tzcnt
            | Lzcnt
            | Popcnt
            | Xadd
            | Cmpxchg
            | Cld
            | Std
            | Pushfq
            | Popfq
            | Jmp
            | Call
            | Ret
    ) || ins.is_jcc_short_or_near()
        || is_setcc(ins)
        || is_cmovcc(ins)
        || string_op(ins).is_some();
    if !ok {
        return Err(format!("{:?}", ins.mnemonic()));
    }
    if ins.is_jmp_near_indirect() || ins.is_call_near_indirect() {
        return Err("an indirect branch".into());
    }
    if ins.is_jmp_far() || ins.is_call_far() || ins.is_jmp_far_indirect() {
        return Err("a far branch".into());
    }
    if matches!(ins.mnemonic(), Mnemonic::Push | Mnemonic::Pop)
        && ins.stack_pointer_increment().abs() != 8
    {
        return Err("a 16-bit push or pop".into());
    }
    for n in 0..ins.op_count() {
        match ins.op_kind(n) {
            OpKind::Register => {
                let r = ins.op_register(n);
                if !r.is_gpr() {
                    return Err(format!("register {r:?}"));
                }
            }
            OpKind::Memory => {
                if ins.memory_base() != Register::RIP
                    && (ins.memory_base().size() == 4 || ins.memory_index().size() == 4)
                {
                    return Err("a 32-bit address".into());
                }
                if !matches!(
                    ins.memory_segment(),
                    Register::DS | Register::SS | Register::ES | Register::CS | Register::GS
                ) {
                    return Err(format!("segment {:?}", ins.memory_segment()));
                }
            }
            k if crate::insn::is_immediate(k) => {}
            OpKind::NearBranch64
            | OpKind::MemorySegRSI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESRDI => {}
            k => return Err(format!("operand kind {k:?}")),
        }
    }
    Ok(())
}

fn is_setcc(ins: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(
        ins.mnemonic(),
        Seta | Setae
            | Setb
            | Setbe
            | Sete
            | Setg
            | Setge
            | Setl
            | Setle
            | Setne
            | Setno
            | Setnp
            | Setns
            | Seto
            | Setp
            | Sets
    )
}

fn is_cmovcc(ins: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(
        ins.mnemonic(),
        Cmova
            | Cmovae
            | Cmovb
            | Cmovbe
            | Cmove
            | Cmovg
            | Cmovge
            | Cmovl
            | Cmovle
            | Cmovne
            | Cmovno
            | Cmovnp
            | Cmovns
            | Cmovo
            | Cmovp
            | Cmovs
    )
}

/// A string instruction's kind (`movs` or `stos`) and element size.
fn string_op(ins: &Instruction) -> Option<(bool, usize)> {
    use Mnemonic::*;
    let (movs, size) = match ins.mnemonic() {
        Movsb => (true, 1),
        Movsw => (true, 2),
        Movsd if ins.op0_kind() == OpKind::MemoryESRDI => (true, 4),
        Movsq => (true, 8),
        Stosb => (false, 1),
        Stosw => (false, 2),
        Stosd => (false, 4),
        Stosq => (false, 8),
        _ => return None,
    };
    Some((movs, size))
}

impl Program {
    /// Decodes everything reachable from `entries` in `code` (linked at
    /// [`CODE_VA`]); an error names the first instruction the interpreter
    /// does not carry out, and where.
    pub fn new(code: &[u8], entries: &[u64]) -> Result<Self, String> {
        let mut padded = code.to_vec();
        padded.resize(code.len().div_ceil(0x1000) * 0x1000, 0);
        let runtime: HashMap<u64, Runtime> = runtime_layout()
            .into_iter()
            .filter_map(|(_, off, _)| runtime_at(WINDOW_VA + off).map(|r| (WINDOW_VA + off, r)))
            .collect();
        let end = code_end(code);
        let mut decoded = HashMap::new();
        let mut work: Vec<u64> = entries.to_vec();
        while let Some(ip) = work.pop() {
            if decoded.contains_key(&ip) {
                continue;
            }
            if !(CODE_VA..end).contains(&ip) {
                return Err(format!("a branch to {ip:#x}, outside the code"));
            }
            let off = (ip - CODE_VA) as usize;
            let mut d = Decoder::with_ip(64, &code[off..], ip, DecoderOptions::NONE);
            let ins = d.decode();
            if ins.is_invalid() {
                return Err(format!("undecodable bytes at {ip:#x}"));
            }
            supported(&ins).map_err(|what| format!("{what} at {ip:#x}"))?;
            if (ins.is_call_near() || ins.is_jmp_short_or_near() || ins.is_jcc_short_or_near())
                && !(CODE_VA..end).contains(&ins.near_branch_target())
                && !runtime.contains_key(&ins.near_branch_target())
                && in_runtime_code(ins.near_branch_target())
            {
                return Err(format!(
                    "an indirect branch (a branch to the sandbox's {:#x}, a retpoline thunk) at {ip:#x}",
                    ins.near_branch_target()
                ));
            }
            decoded.insert(ip, ins);
            let inside = |t: u64| (CODE_VA..end).contains(&t);
            let m = ins.mnemonic();
            if ins.is_jcc_short_or_near() {
                work.extend([ins.near_branch_target(), ins.next_ip()]);
            } else if m == Mnemonic::Jmp {
                if inside(ins.near_branch_target()) {
                    work.push(ins.near_branch_target());
                }
            } else if m == Mnemonic::Call {
                if inside(ins.near_branch_target()) {
                    work.push(ins.near_branch_target());
                }
                work.push(ins.next_ip());
            } else if !matches!(m, Mnemonic::Ret | Mnemonic::Int3 | Mnemonic::Ud2) {
                work.push(ins.next_ip());
            }
        }
        Ok(Program {
            code: padded,
            decoded,
            runtime,
            stack: vec![0; (STACK_TOP - STACK_LO) as usize],
            a: Vec::new(),
            b: Vec::new(),
        })
    }

    /// Runs `entry(a_i, b_i)` for every element pair, as
    /// [`super::Sandbox::call_each`] does, each element within `limit`
    /// instructions; on success all of `b` is written back, on a failure
    /// none of it.
    pub fn call_each(
        &mut self,
        entry: u64,
        (a, a_size): (&[u8], usize),
        (b, b_size): (&mut [u8], usize),
        limit: u64,
    ) -> Result<(), SandboxError> {
        let count = super::elements((a, a_size), (&*b, b_size))?;
        if !self.decoded.contains_key(&entry) {
            return Err(SandboxError::Exit(format!(
                "entry {entry:#x} is not one the interpreter decoded"
            )));
        }
        self.a.clear();
        self.a.extend_from_slice(a);
        self.b.clear();
        self.b.extend_from_slice(b);
        for i in 0..count {
            let mut cpu = Cpu {
                r: [0; 16],
                rip: entry,
                f: Flags::default(),
                mem: Mem {
                    code: &self.code,
                    stack: &mut self.stack,
                    a: &mut self.a,
                    b: &mut self.b,
                },
                runtime: &self.runtime,
            };
            cpu.r[RSP] = STACK_TOP + WINDOW_VA - 8;
            cpu.mem.write(cpu.r[RSP], 8, RETURN, Seg::Ss)?;
            cpu.r[RDI] = WINDOW_VA + ARG0_OFF + (i * a_size) as u64;
            cpu.r[RSI] = WINDOW_VA + ARG1_OFF + (i * b_size) as u64;
            cpu.run(&self.decoded, limit)?;
        }
        b.copy_from_slice(&self.b);
        Ok(())
    }
}

const RAX: usize = 0;
const RCX: usize = 1;
const RDX: usize = 2;
const RSP: usize = 4;
const RBP: usize = 5;
const RSI: usize = 6;
const RDI: usize = 7;

#[derive(Debug, Default, Clone, Copy)]
struct Flags {
    cf: bool,
    pf: bool,
    zf: bool,
    sf: bool,
    of: bool,
    df: bool,
}

/// Which segment an access goes through (for the fault a bad address
/// raises, and `%gs`'s base).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    Ds,
    Ss,
    Gs,
}

struct Mem<'a> {
    code: &'a [u8],
    stack: &'a mut [u8],
    a: &'a mut [u8],
    b: &'a mut [u8],
}

const GS_PAGE: [u8; 0x1000] = [0; 0x1000];

fn canonical(addr: u64) -> bool {
    ((addr as i64) << 16 >> 16) as u64 == addr
}

fn page_fault(addr: u64, write: bool, present: bool, rip: u64) -> SandboxError {
    SandboxError::Fault {
        vector: 14,
        name: EXCEPTIONS[14],
        rip,
        address: addr,
        error_code: Some(u64::from(present) | u64::from(write) << 1 | 4),
    }
}

fn exception(vector: u8, rip: u64, error_code: Option<u64>) -> SandboxError {
    SandboxError::Fault {
        vector,
        name: EXCEPTIONS[vector as usize],
        rip,
        address: 0,
        error_code,
    }
}

impl Mem<'_> {
    /// The bytes at `addr..addr + len` (`write`: writable ones), or the
    /// fault the sandbox would take (`rip` filled in by the caller).
    fn bytes(
        &mut self,
        addr: u64,
        len: usize,
        write: bool,
        seg: Seg,
    ) -> Result<&mut [u8], SandboxError> {
        if len == 0 {
            return Ok(&mut []);
        }
        let addr = if seg == Seg::Gs {
            addr.wrapping_add(WINDOW_VA + GS_OFF)
        } else {
            addr
        };
        if !canonical(addr) || !canonical(addr.wrapping_add(len as u64).wrapping_sub(1)) {
            let v = if seg == Seg::Ss { 12 } else { 13 };
            return Err(exception(v, 0, Some(0)));
        }
        let within = |base: u64, size: usize| -> Option<usize> {
            let off = addr.wrapping_sub(base);
            (off < size as u64 && off + len as u64 <= size as u64).then_some(off as usize)
        };
        let stack_base = WINDOW_VA + STACK_LO;
        if let Some(o) = within(stack_base, self.stack.len()) {
            return Ok(&mut self.stack[o..o + len]);
        }
        if let Some(o) = within(WINDOW_VA + ARG0_OFF, self.a.len()) {
            return Ok(&mut self.a[o..o + len]);
        }
        if let Some(o) = within(WINDOW_VA + ARG1_OFF, self.b.len()) {
            return Ok(&mut self.b[o..o + len]);
        }
        // The first page of the access that is not there (or not
        // writable) faults, at its first byte the access covers.
        let (stack, a, b, code) = (
            self.stack.len(),
            self.a.len(),
            self.b.len(),
            self.code.len(),
        );
        let ok = |x: u64, n: u64| {
            let inside = |base: u64, size: usize| {
                let off = x.wrapping_sub(base);
                off < size as u64 && off + n <= size as u64
            };
            let rw = inside(WINDOW_VA + STACK_LO, stack)
                || inside(WINDOW_VA + ARG0_OFF, a)
                || inside(WINDOW_VA + ARG1_OFF, b);
            let ro = inside(CODE_VA, code) || inside(WINDOW_VA + GS_OFF, GS_PAGE.len());
            (rw || (!write && ro), ro)
        };
        let end = addr.wrapping_add(len as u64);
        let mut x = addr;
        loop {
            let next = ((x | 0xfff) + 1).min(end);
            let (fine, read_only) = ok(x, next - x);
            if !fine || next == end {
                return Err(page_fault(x, write, read_only, 0));
            }
            x = next;
        }
    }

    fn read_bytes(&mut self, addr: u64, len: usize, seg: Seg) -> Result<&[u8], SandboxError> {
        if len == 0 {
            return Ok(&[]);
        }
        let a = if seg == Seg::Gs {
            addr.wrapping_add(WINDOW_VA + GS_OFF)
        } else {
            addr
        };
        let off = a.wrapping_sub(CODE_VA);
        if off < self.code.len() as u64 && off + len as u64 <= self.code.len() as u64 {
            return Ok(&self.code[off as usize..off as usize + len]);
        }
        let off = a.wrapping_sub(WINDOW_VA + GS_OFF);
        if off < 0x1000 && off + len as u64 <= 0x1000 {
            return Ok(&GS_PAGE[off as usize..off as usize + len]);
        }
        Ok(&*self.bytes(addr, len, false, seg)?)
    }

    fn read(&mut self, addr: u64, size: usize, seg: Seg) -> Result<u64, SandboxError> {
        let b = self.read_bytes(addr, size, seg)?;
        let mut w = [0u8; 8];
        w[..size].copy_from_slice(b);
        Ok(u64::from_le_bytes(w))
    }

    fn write(&mut self, addr: u64, size: usize, value: u64, seg: Seg) -> Result<(), SandboxError> {
        self.bytes(addr, size, true, seg)?
            .copy_from_slice(&value.to_le_bytes()[..size]);
        Ok(())
    }
}

struct Cpu<'a, 'm> {
    r: [u64; 16],
    rip: u64,
    f: Flags,
    mem: Mem<'m>,
    runtime: &'a HashMap<u64, Runtime>,
}

fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

fn msb(v: u64, size: usize) -> bool {
    (v >> (size * 8 - 1)) & 1 == 1
}

fn sext(v: u64, size: usize) -> u64 {
    let shift = 64 - size * 8;
    (((v << shift) as i64) >> shift) as u64
}

/// Fills in the RIP of a fault raised below the instruction level (a
/// fetch fault carries its own).
fn at(rip: u64) -> impl Fn(SandboxError) -> SandboxError {
    move |e| match e {
        SandboxError::Fault {
            vector,
            name,
            rip: 0,
            address,
            error_code,
        } => SandboxError::Fault {
            vector,
            name,
            rip,
            address,
            error_code,
        },
        e => e,
    }
}

impl Cpu<'_, '_> {
    fn reg(&self, r: Register) -> u64 {
        let full = r.full_register();
        let i = full as usize - Register::RAX as usize;
        if matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) {
            return (self.r[i] >> 8) & 0xff;
        }
        self.r[i] & mask(r.size())
    }

    fn set_reg(&mut self, r: Register, v: u64) {
        let full = r.full_register();
        let i = full as usize - Register::RAX as usize;
        match r.size() {
            8 => self.r[i] = v,
            4 => self.r[i] = v & 0xffff_ffff,
            2 => self.r[i] = (self.r[i] & !0xffff) | (v & 0xffff),
            _ if matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) => {
                self.r[i] = (self.r[i] & !0xff00) | ((v & 0xff) << 8)
            }
            _ => self.r[i] = (self.r[i] & !0xff) | (v & 0xff),
        }
    }

    fn seg(ins: &Instruction) -> Seg {
        match ins.memory_segment() {
            Register::GS => Seg::Gs,
            Register::SS => Seg::Ss,
            _ => Seg::Ds,
        }
    }

    fn ea(&self, ins: &Instruction) -> u64 {
        if ins.memory_base() == Register::RIP {
            return ins.memory_displacement64();
        }
        let mut a = ins.memory_displacement64();
        if ins.memory_base() != Register::None {
            a = a.wrapping_add(self.reg(ins.memory_base()));
        }
        if ins.memory_index() != Register::None {
            a = a.wrapping_add(
                self.reg(ins.memory_index())
                    .wrapping_mul(u64::from(ins.memory_index_scale())),
            );
        }
        a
    }

    fn size(ins: &Instruction, n: u32) -> usize {
        match ins.op_kind(n) {
            OpKind::Register => ins.op_register(n).size(),
            OpKind::Memory => ins.memory_size().size(),
            // An immediate takes the size of the operand it goes with.
            _ if n > 0 => Self::size(ins, 0),
            _ => 8,
        }
    }

    fn read(&mut self, ins: &Instruction, n: u32) -> Result<u64, SandboxError> {
        Ok(match ins.op_kind(n) {
            OpKind::Register => self.reg(ins.op_register(n)),
            OpKind::Memory => {
                let size = ins.memory_size().size();
                let seg = Self::seg(ins);
                self.mem.read(self.ea(ins), size, seg)?
            }
            _ => ins.immediate(n) & mask(Self::size(ins, 0)),
        })
    }

    fn write(&mut self, ins: &Instruction, n: u32, v: u64) -> Result<(), SandboxError> {
        match ins.op_kind(n) {
            OpKind::Register => self.set_reg(ins.op_register(n), v),
            _ => {
                let size = ins.memory_size().size();
                let seg = Self::seg(ins);
                self.mem.write(self.ea(ins), size, v & mask(size), seg)?
            }
        }
        Ok(())
    }

    fn push(&mut self, v: u64) -> Result<(), SandboxError> {
        let sp = self.r[RSP].wrapping_sub(8);
        self.mem.write(sp, 8, v, Seg::Ss)?;
        self.r[RSP] = sp;
        Ok(())
    }

    fn pop(&mut self) -> Result<u64, SandboxError> {
        let v = self.mem.read(self.r[RSP], 8, Seg::Ss)?;
        self.r[RSP] = self.r[RSP].wrapping_add(8);
        Ok(v)
    }

    fn szp(&mut self, r: u64, size: usize) {
        let r = r & mask(size);
        self.f.zf = r == 0;
        self.f.sf = msb(r, size);
        self.f.pf = (r as u8).count_ones() % 2 == 0;
    }

    fn add(&mut self, a: u64, b: u64, carry: bool, size: usize) -> u64 {
        let m = mask(size);
        let full = u128::from(a & m) + u128::from(b & m) + u128::from(carry);
        let r = full as u64 & m;
        self.f.cf = full > u128::from(m);
        self.f.of = msb(a, size) == msb(b, size) && msb(r, size) != msb(a, size);
        self.szp(r, size);
        r
    }

    fn sub(&mut self, a: u64, b: u64, borrow: bool, size: usize) -> u64 {
        let m = mask(size);
        let r = (a.wrapping_sub(b).wrapping_sub(u64::from(borrow))) & m;
        self.f.cf = u128::from(a & m) < u128::from(b & m) + u128::from(borrow);
        self.f.of = msb(a, size) != msb(b, size) && msb(r, size) != msb(a, size);
        self.szp(r, size);
        r
    }

    fn logic(&mut self, r: u64, size: usize) -> u64 {
        self.f.cf = false;
        self.f.of = false;
        self.szp(r, size);
        r & mask(size)
    }

    fn cond(&self, cc: ConditionCode) -> bool {
        let f = self.f;
        match cc {
            ConditionCode::o => f.of,
            ConditionCode::no => !f.of,
            ConditionCode::b => f.cf,
            ConditionCode::ae => !f.cf,
            ConditionCode::e => f.zf,
            ConditionCode::ne => !f.zf,
            ConditionCode::be => f.cf || f.zf,
            ConditionCode::a => !f.cf && !f.zf,
            ConditionCode::s => f.sf,
            ConditionCode::ns => !f.sf,
            ConditionCode::p => f.pf,
            ConditionCode::np => !f.pf,
            ConditionCode::l => f.sf != f.of,
            ConditionCode::ge => f.sf == f.of,
            ConditionCode::le => f.zf || f.sf != f.of,
            ConditionCode::g => !f.zf && f.sf == f.of,
            ConditionCode::None => true,
        }
    }

    /// A branch to `target` outside the decoded code: a runtime function,
    /// or the fetch fault the sandbox would take.
    fn outside(&mut self, target: u64, call: bool) -> Result<bool, SandboxError> {
        let Some(&rt) = self.runtime.get(&target) else {
            let present = (CODE_VA..CODE_VA + self.mem.code.len() as u64).contains(&target);
            let mut e = page_fault(target, false, present, target);
            if let SandboxError::Fault { error_code, .. } = &mut e {
                *error_code = error_code.map(|c| c | 0x10);
            }
            return Err(e);
        };
        let (dst, src, n) = (self.r[RDI], self.r[RSI], self.r[RDX] as usize);
        let nn = n as u64;
        match rt {
            Runtime::Ret => {}
            Runtime::Memcpy => {
                self.copy_forward(dst, src, n)
                    .map_err(at(runtime_rep(target, 0)))?;
                self.r[RSI] = src.wrapping_add(nn);
                self.r[RDI] = dst.wrapping_add(nn);
            }
            Runtime::Memset => {
                let v = self.r[RSI] as u8;
                self.mem
                    .bytes(dst, n, true, Seg::Ds)
                    .map_err(at(runtime_rep(target, 0)))?
                    .fill(v);
                self.r[9] = dst;
                self.r[RDI] = dst.wrapping_add(nn);
            }
            Runtime::Memmove => {
                let backward = dst > src;
                let copied = match self.mem.read_bytes(src, n, Seg::Ds) {
                    Ok(b) => {
                        let bytes = b.to_vec();
                        self.mem
                            .bytes(dst, n, true, Seg::Ds)
                            .map(|d| d.copy_from_slice(&bytes))
                    }
                    Err(e) => Err(e),
                };
                if copied.is_err() {
                    // Where the sandbox's byte loop stops.
                    let rip = runtime_rep(target, usize::from(!backward));
                    for k in 0..nn {
                        let k = if backward { nn - 1 - k } else { k };
                        let v = self
                            .mem
                            .read(src.wrapping_add(k), 1, Seg::Ds)
                            .map_err(at(rip))?;
                        self.mem
                            .write(dst.wrapping_add(k), 1, v, Seg::Ds)
                            .map_err(at(rip))?;
                    }
                }
                self.sub(dst, src, false, 8);
                if backward {
                    self.r[RSI] = src.wrapping_sub(1);
                    self.r[RDI] = dst.wrapping_sub(1);
                } else {
                    self.r[RSI] = src.wrapping_add(nn);
                    self.r[RDI] = dst.wrapping_add(nn);
                }
            }
        }
        if rt != Runtime::Ret {
            self.r[RAX] = dst;
            self.r[RCX] = 0;
        }
        // A tail call (`jmp`) returns for the caller.
        Ok(!call)
    }

    /// `n` bytes from `src` to `dst`, forward a byte at a time as `rep
    /// movsb` does (an overlapping copy to a higher address repeats what
    /// it copied).
    fn copy_forward(&mut self, dst: u64, src: u64, n: usize) -> Result<(), SandboxError> {
        if n == 0 {
            return Ok(());
        }
        let bulk = (dst <= src || dst >= src.wrapping_add(n as u64))
            && match self.mem.read_bytes(src, n, Seg::Ds) {
                Ok(b) => {
                    let bytes = b.to_vec();
                    self.mem
                        .bytes(dst, n, true, Seg::Ds)
                        .map(|d| d.copy_from_slice(&bytes))
                        .is_ok()
                }
                Err(_) => false,
            };
        if !bulk {
            for k in 0..n as u64 {
                let v = self.mem.read(src.wrapping_add(k), 1, Seg::Ds)?;
                self.mem.write(dst.wrapping_add(k), 1, v, Seg::Ds)?;
            }
        }
        Ok(())
    }

    /// Runs until the outermost `ret`; `limit` instructions at most.
    fn run(&mut self, code: &HashMap<u64, Instruction>, limit: u64) -> Result<(), SandboxError> {
        let mut left = limit;
        loop {
            if left == 0 {
                return Err(SandboxError::Exit(format!(
                    "ran past its limit of {limit} instructions (an endless loop?)"
                )));
            }
            left -= 1;
            let rip = self.rip;
            let Some(ins) = code.get(&rip) else {
                let present = (CODE_VA..CODE_VA + self.mem.code.len() as u64).contains(&rip);
                if present {
                    return Err(SandboxError::Exit(format!(
                        "reached {rip:#x}, an instruction the interpreter did not decode"
                    )));
                }
                return Err(SandboxError::Fault {
                    vector: 14,
                    name: EXCEPTIONS[14],
                    rip,
                    address: rip,
                    error_code: Some(0x14),
                });
            };
            self.rip = ins.next_ip();
            match self.step(ins, &mut left) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(at(rip)(e)),
            }
        }
    }

    /// One instruction; whether the outermost function returned.
    fn step(&mut self, ins: &Instruction, left: &mut u64) -> Result<bool, SandboxError> {
        use Mnemonic::*;
        let m = ins.mnemonic();
        if let Some((movs, size)) = string_op(ins) {
            let rep = ins.has_rep_prefix() || ins.has_repe_prefix();
            let step = if self.f.df {
                (size as u64).wrapping_neg()
            } else {
                size as u64
            };
            // Forward, whole: one copy or fill, charged per element; not
            // for a copy to less than an element past its source (element
            // by element differs from byte by byte), nor when it faults (the
            // element loop finds where it stops).
            let count = self.r[RCX];
            let (dst, src) = (self.r[RDI], self.r[RSI]);
            let d = dst.wrapping_sub(src);
            if rep && !self.f.df && count > 1 && !(movs && d > 0 && d < size as u64) {
                if count > *left {
                    return Err(SandboxError::Exit(
                        "ran past its instruction limit in a string instruction".into(),
                    ));
                }
                let n = usize::try_from(count.saturating_mul(size as u64))
                    .map_err(|_| exception(13, 0, Some(0)))?;
                let fine = self.mem.bytes(dst, n, true, Seg::Ds).is_ok()
                    && (!movs || self.mem.read_bytes(src, n, Seg::Ds).is_ok());
                if fine {
                    if movs {
                        self.copy_forward(dst, src, n)?;
                        self.r[RSI] = src.wrapping_add(n as u64);
                    } else {
                        let v = self.r[RAX].to_le_bytes();
                        let out = self.mem.bytes(dst, n, true, Seg::Ds)?;
                        for (k, b) in out.iter_mut().enumerate() {
                            *b = v[k % size];
                        }
                    }
                    self.r[RDI] = dst.wrapping_add(n as u64);
                    self.r[RCX] = 0;
                    *left -= count;
                    return Ok(false);
                }
            }
            loop {
                if rep {
                    if self.r[RCX] == 0 {
                        break;
                    }
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        return Err(SandboxError::Exit(
                            "ran past its instruction limit in a string instruction".into(),
                        ));
                    }
                }
                let v = if movs {
                    self.mem.read(self.r[RSI], size, Seg::Ds)?
                } else {
                    self.r[RAX] & mask(size)
                };
                self.mem.write(self.r[RDI], size, v, Seg::Ds)?;
                if movs {
                    self.r[RSI] = self.r[RSI].wrapping_add(step);
                }
                self.r[RDI] = self.r[RDI].wrapping_add(step);
                if !rep {
                    break;
                }
                self.r[RCX] -= 1;
            }
            return Ok(false);
        }
        if ins.is_jcc_short_or_near() {
            if self.cond(ins.condition_code()) {
                self.rip = ins.near_branch_target();
            }
            return Ok(false);
        }
        if is_setcc(ins) {
            let v = u64::from(self.cond(ins.condition_code()));
            self.write(ins, 0, v)?;
            return Ok(false);
        }
        if is_cmovcc(ins) {
            // The source is read (and may fault) whatever the condition.
            let src = self.read(ins, 1)?;
            let v = if self.cond(ins.condition_code()) {
                src
            } else {
                self.read(ins, 0)?
            };
            self.write(ins, 0, v)?;
            return Ok(false);
        }
        let size = if ins.op_count() > 0 {
            Self::size(ins, 0)
        } else {
            8
        };
        match m {
            Nop | Endbr64 | Lfence | Mfence | Sfence | Pause | Prefetchnta | Prefetcht0
            | Prefetcht1 | Prefetcht2 | Prefetchw => {}
            // A trap: reported after the instruction.
            Int3 => return Err(exception(3, ins.next_ip(), None)),
            Ud2 => return Err(exception(6, 0, None)),
            // (A register or memory source is read zero-extended.)
            Mov | Movzx => {
                let v = self.read(ins, 1)?;
                self.write(ins, 0, v)?;
            }
            Movsx | Movsxd => {
                let v = sext(self.read(ins, 1)?, Self::size(ins, 1));
                self.write(ins, 0, v & mask(size))?;
            }
            Lea => {
                let v = self.ea(ins) & mask(size);
                self.write(ins, 0, v)?;
            }
            Xchg => {
                let (a, b) = (self.read(ins, 0)?, self.read(ins, 1)?);
                self.write(ins, 0, b)?;
                self.write(ins, 1, a)?;
            }
            Push => {
                let v = match ins.op0_kind() {
                    OpKind::Register | OpKind::Memory => self.read(ins, 0)?,
                    _ => ins.immediate(0),
                };
                self.push(v)?;
            }
            Pop => {
                let v = self.pop()?;
                self.write(ins, 0, v)?;
            }
            Leave => {
                self.r[RSP] = self.r[RBP];
                self.r[RBP] = self.pop()?;
            }
            Cbw => self.set_reg(Register::AX, sext(self.r[RAX], 1)),
            Cwde => self.set_reg(Register::EAX, sext(self.r[RAX], 2)),
            Cdqe => self.r[RAX] = sext(self.r[RAX], 4),
            Cwd => self.set_reg(Register::DX, if msb(self.r[RAX], 2) { 0xffff } else { 0 }),
            Cdq => self.set_reg(
                Register::EDX,
                if msb(self.r[RAX], 4) { 0xffff_ffff } else { 0 },
            ),
            Cqo => self.r[RDX] = if msb(self.r[RAX], 8) { u64::MAX } else { 0 },
            Bswap => {
                let v = self.read(ins, 0)?;
                let r = if size == 8 {
                    v.swap_bytes()
                } else {
                    u64::from((v as u32).swap_bytes())
                };
                self.write(ins, 0, r)?;
            }
            Add | Adc | Sub | Sbb | Cmp | And | Or | Xor | Test => {
                let (a, b) = (self.read(ins, 0)?, self.read(ins, 1)?);
                let cf = self.f.cf;
                let r = match m {
                    Add => self.add(a, b, false, size),
                    Adc => self.add(a, b, cf, size),
                    Sub | Cmp => self.sub(a, b, false, size),
                    Sbb => self.sub(a, b, cf, size),
                    And | Test => self.logic(a & b, size),
                    Or => self.logic(a | b, size),
                    _ => self.logic(a ^ b, size),
                };
                if !matches!(m, Cmp | Test) {
                    self.write(ins, 0, r)?;
                }
            }
            Inc | Dec => {
                let a = self.read(ins, 0)?;
                let cf = self.f.cf;
                let r = if m == Inc {
                    self.add(a, 1, false, size)
                } else {
                    self.sub(a, 1, false, size)
                };
                self.f.cf = cf;
                self.write(ins, 0, r)?;
            }
            Neg => {
                let a = self.read(ins, 0)?;
                let r = self.sub(0, a, false, size);
                self.write(ins, 0, r)?;
            }
            Not => {
                let a = self.read(ins, 0)?;
                self.write(ins, 0, !a & mask(size))?;
            }
            Imul if ins.op_count() > 1 => {
                let (a, b) = if ins.op_count() == 2 {
                    (self.read(ins, 0)?, self.read(ins, 1)?)
                } else {
                    (self.read(ins, 1)?, ins.immediate(2))
                };
                let full = i128::from(sext(a, size) as i64) * i128::from(sext(b, size) as i64);
                let r = full as u64 & mask(size);
                let over = i128::from(sext(r, size) as i64) != full;
                self.f.cf = over;
                self.f.of = over;
                self.szp(r, size);
                self.write(ins, 0, r)?;
            }
            Imul | Mul => {
                let src = self.read(ins, 0)?;
                let acc = self.r[RAX] & mask(size);
                let bits = size * 8;
                let (lo, hi, over) = if m == Mul {
                    let p = u128::from(acc) * u128::from(src);
                    let lo = p as u64 & mask(size);
                    let hi = (p >> bits) as u64 & mask(size);
                    (lo, hi, hi != 0)
                } else {
                    let p = i128::from(sext(acc, size) as i64) * i128::from(sext(src, size) as i64);
                    let lo = p as u64 & mask(size);
                    let hi = (p >> bits) as u64 & mask(size);
                    (lo, hi, i128::from(sext(lo, size) as i64) != p)
                };
                self.f.cf = over;
                self.f.of = over;
                self.szp(lo, size);
                if size == 1 {
                    self.set_reg(Register::AX, lo | (hi << 8));
                } else {
                    self.set_reg(acc_reg(size, false), lo);
                    self.set_reg(acc_reg(size, true), hi);
                }
            }
            Div | Idiv => {
                let src = self.read(ins, 0)?;
                let bits = size * 8;
                let (lo, hi) = if size == 1 {
                    (self.r[RAX] & 0xff, (self.r[RAX] >> 8) & 0xff)
                } else {
                    (self.r[RAX] & mask(size), self.r[RDX] & mask(size))
                };
                let de = || exception(0, 0, None);
                let (q, r) = if m == Div {
                    if src == 0 {
                        return Err(de());
                    }
                    let n = (u128::from(hi) << bits) | u128::from(lo);
                    let q = n / u128::from(src);
                    if q > u128::from(mask(size)) {
                        return Err(de());
                    }
                    (q as u64, (n % u128::from(src)) as u64)
                } else {
                    let d = i128::from(sext(src, size) as i64);
                    if d == 0 {
                        return Err(de());
                    }
                    let n = (((u128::from(hi) << bits) | u128::from(lo)) << (128 - 2 * bits))
                        as i128
                        >> (128 - 2 * bits);
                    let q = n.checked_div(d).ok_or_else(de)?;
                    let lim = 1i128 << (bits - 1);
                    if q >= lim || q < -lim {
                        return Err(de());
                    }
                    (q as u64 & mask(size), (n % d) as u64 & mask(size))
                };
                if size == 1 {
                    self.set_reg(Register::AX, q | (r << 8));
                } else {
                    self.set_reg(acc_reg(size, false), q);
                    self.set_reg(acc_reg(size, true), r);
                }
            }
            Shl | Sal | Shr | Sar | Rol | Ror => {
                let v = self.read(ins, 0)?;
                let raw = self.read(ins, 1)?;
                let count = (raw & if size == 8 { 63 } else { 31 }) as u32;
                if count == 0 {
                    // No change, but the operand is still written: a 32-bit
                    // register's upper half cleared, a read-only memory
                    // operand faulting.
                    self.write(ins, 0, v)?;
                    return Ok(false);
                }
                let bits = (size * 8) as u32;
                let r = match m {
                    Shl | Sal => {
                        let r = if count >= bits {
                            0
                        } else {
                            (v << count) & mask(size)
                        };
                        self.f.cf = count <= bits && (v >> (bits - count)) & 1 == 1;
                        self.f.of = msb(r, size) != self.f.cf;
                        self.szp(r, size);
                        r
                    }
                    Shr => {
                        let r = if count >= bits { 0 } else { v >> count };
                        self.f.cf = count <= bits && (v >> (count - 1)) & 1 == 1;
                        self.f.of = msb(v, size);
                        self.szp(r, size);
                        r
                    }
                    Sar => {
                        let s = sext(v, size) as i64;
                        let r = (s >> count.min(63)) as u64 & mask(size);
                        self.f.cf = (s >> (count - 1).min(63)) & 1 == 1;
                        self.f.of = false;
                        self.szp(r, size);
                        r
                    }
                    Rol => {
                        let c = count % bits;
                        let r = if c == 0 {
                            v
                        } else {
                            ((v << c) | (v >> (bits - c))) & mask(size)
                        };
                        self.f.cf = r & 1 == 1;
                        self.f.of = msb(r, size) != self.f.cf;
                        r
                    }
                    _ => {
                        let c = count % bits;
                        let r = if c == 0 {
                            v
                        } else {
                            ((v >> c) | (v << (bits - c))) & mask(size)
                        };
                        self.f.cf = msb(r, size);
                        self.f.of = msb(r, size) != ((r >> (bits - 2)) & 1 == 1);
                        r
                    }
                };
                self.write(ins, 0, r)?;
            }
            Bt | Bts | Btr | Btc => {
                let bits = (size * 8) as u64;
                let off = self.read(ins, 1)?;
                let (v, addr) =
                    if ins.op0_kind() == OpKind::Memory && ins.op1_kind() == OpKind::Register {
                        // A bit string: the offset may reach past the operand.
                        let s = sext(off, size) as i64;
                        let addr = self
                            .ea(ins)
                            .wrapping_add((s.div_euclid(bits as i64) * size as i64) as u64);
                        (self.mem.read(addr, size, Self::seg(ins))?, Some(addr))
                    } else {
                        (self.read(ins, 0)?, None)
                    };
                let bit = off % bits;
                self.f.cf = (v >> bit) & 1 == 1;
                let r = match m {
                    Bts => v | (1 << bit),
                    Btr => v & !(1 << bit),
                    Btc => v ^ (1 << bit),
                    _ => return Ok(false),
                };
                match addr {
                    Some(a) => self.mem.write(a, size, r, Self::seg(ins))?,
                    None => self.write(ins, 0, r)?,
                }
            }
            Bsf | Bsr => {
                let v = self.read(ins, 1)?;
                self.f.zf = v == 0;
                if v != 0 {
                    let r = if m == Bsf {
                        v.trailing_zeros()
                    } else {
                        63 - v.leading_zeros()
                    };
                    self.write(ins, 0, u64::from(r))?;
                }
            }
            Tzcnt | Lzcnt | Popcnt => {
                let v = self.read(ins, 1)?;
                let bits = (size * 8) as u32;
                let r = match m {
                    Tzcnt => v.trailing_zeros().min(bits),
                    Lzcnt => v.leading_zeros() - (64 - bits),
                    _ => v.count_ones(),
                };
                self.f = Flags {
                    df: self.f.df,
                    ..Flags::default()
                };
                if m == Popcnt {
                    self.f.zf = v == 0;
                } else {
                    self.f.cf = v == 0;
                    self.f.zf = r == 0;
                }
                self.write(ins, 0, u64::from(r))?;
            }
            Xadd => {
                let (d, s) = (self.read(ins, 0)?, self.read(ins, 1)?);
                let r = self.add(d, s, false, size);
                self.write(ins, 1, d)?;
                self.write(ins, 0, r)?;
            }
            Cmpxchg => {
                let d = self.read(ins, 0)?;
                let acc = self.r[RAX] & mask(size);
                self.sub(acc, d, false, size);
                if self.f.zf {
                    let s = self.read(ins, 1)?;
                    self.write(ins, 0, s)?;
                } else {
                    // A memory destination is written back (a fault on a
                    // read-only one is taken either way); a register one is
                    // left as it is, upper half included (as the hardware
                    // the KVM sandbox runs on does).
                    if ins.op0_kind() == OpKind::Memory {
                        self.write(ins, 0, d)?;
                    }
                    self.set_reg(acc_reg(size, false), d);
                }
            }
            Pushfq => {
                let f = self.f;
                let v = 2
                    | u64::from(f.cf)
                    | u64::from(f.pf) << 2
                    | u64::from(f.zf) << 6
                    | u64::from(f.sf) << 7
                    | u64::from(f.df) << 10
                    | u64::from(f.of) << 11;
                self.push(v)?;
            }
            Popfq => {
                // What user mode can change of the flags kept.
                let v = self.pop()?;
                let bit = |n: u32| (v >> n) & 1 == 1;
                self.f = Flags {
                    cf: bit(0),
                    pf: bit(2),
                    zf: bit(6),
                    sf: bit(7),
                    df: bit(10),
                    of: bit(11),
                };
            }
            Cld => self.f.df = false,
            Std => self.f.df = true,
            Jmp => {
                let t = ins.near_branch_target();
                if (CODE_VA..code_end(self.mem.code)).contains(&t) {
                    self.rip = t;
                } else if self.outside(t, false)? {
                    return self.ret(0);
                }
            }
            Call => {
                let t = ins.near_branch_target();
                if (CODE_VA..code_end(self.mem.code)).contains(&t) {
                    self.push(ins.next_ip())?;
                    self.rip = t;
                } else {
                    // The sandbox's call pushes the return address (a full
                    // stack faults here) and the function returns.
                    self.push(ins.next_ip())?;
                    self.outside(t, true)?;
                    self.r[RSP] = self.r[RSP].wrapping_add(8);
                }
            }
            Ret => {
                let extra = if ins.op_count() > 0 {
                    ins.immediate(0)
                } else {
                    0
                };
                return self.ret(extra);
            }
            other => {
                return Err(SandboxError::Exit(format!(
                    "the interpreter does not carry out {other:?}"
                )))
            }
        }
        Ok(false)
    }

    fn ret(&mut self, extra: u64) -> Result<bool, SandboxError> {
        let to = self.mem.read(self.r[RSP], 8, Seg::Ss)?;
        if !canonical(to) {
            // #GP at the ret itself, nothing popped.
            return Err(exception(13, 0, Some(0)));
        }
        self.r[RSP] = self.r[RSP].wrapping_add(8);
        self.r[RSP] = self.r[RSP].wrapping_add(extra);
        if to == RETURN {
            return Ok(true);
        }
        self.rip = to;
        Ok(false)
    }
}

/// The accumulator (`rax` part) or its extension (`rdx` part) of a size.
fn acc_reg(size: usize, high: bool) -> Register {
    match (size, high) {
        (1, false) => Register::AL,
        (1, true) => Register::AH,
        (2, false) => Register::AX,
        (2, true) => Register::DX,
        (4, false) => Register::EAX,
        (4, true) => Register::EDX,
        (_, false) => Register::RAX,
        (_, true) => Register::RDX,
    }
}
