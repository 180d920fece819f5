//! The instruction behind a trapped write, found and judged.
//!
//! When a write to a read-only slot reaches userspace, KVM's emulator has
//! already finished the instruction: RIP points after it and its register
//! outputs are written. To name the writer and to keep read-modify-writes
//! exact, the instruction is found again: the bytes before RIP are decoded
//! (iced-x86) at each length from 1 to 15, and a candidate counts only if it
//! ends exactly at RIP, writes an explicit memory operand of the trapped
//! size, and that operand's address (computed from the registers, which such
//! an instruction leaves as they were for addressing) translates to the
//! trapped guest-physical address. If the candidates differ in what they
//! do (a byte of the previous instruction read as a REX prefix, a shorter
//! tail of another operand size), the writer is unknown; if they agree, the
//! shortest LOCK-prefixed one (or the shortest) is taken.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::kvm_regs;

use crate::pagewalk::{self, PagingState};
use crate::write_control::WriterCpu;

/// What a read-modify-write does to its memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rmw {
    /// A plain store (or an instruction lucos does not check): committed as is.
    Store,
    /// `m = f(m, src)`, register outputs only flags.
    Op(Mnemonic, u64),
    /// `xchg m, reg`: reg gets the old value.
    Xchg(Register),
    /// `xadd m, reg`: reg gets the old value, m the sum.
    Xadd(Register),
    /// `cmpxchg m, reg` (accumulator compared).
    Cmpxchg,
    /// `cmpxchg8b m` (EDX:EAX compared).
    Cmpxchg8b,
}

impl Rmw {
    /// Whether it adds to (or subtracts from) its memory operand: `add`,
    /// `sub`, `inc`, `dec`, `xadd`. What such a write means is the
    /// difference it made, whatever the value it read.
    pub fn adds(&self) -> bool {
        matches!(
            self,
            Rmw::Op(
                Mnemonic::Add | Mnemonic::Sub | Mnemonic::Inc | Mnemonic::Dec,
                _
            ) | Rmw::Xadd(_)
        )
    }
}

/// The instruction that made a trapped write.
#[derive(Debug, Clone)]
pub struct Writer {
    /// Its first byte (guest-virtual).
    pub start: u64,
    /// Privilege level it ran at.
    pub cpl: u8,
    /// Its effect on memory.
    pub rmw: Rmw,
    /// The vCPU's registers after it.
    pub regs: kvm_regs,
    /// Whether it has a LOCK prefix.
    pub locked: bool,
}

/// What to do with a write, given memory as it is now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Write it.
    Commit,
    /// Do not write it; the instruction's outcome stands as it is (a failed
    /// compare-exchange: it read a value that was there, and wrote nothing new).
    Drop,
    /// Do not write it; set these registers, so the instruction runs again.
    Rewind(kvm_regs),
}

fn reg_value(r: &kvm_regs, reg: Register) -> Option<u64> {
    let full = reg.full_register();
    let v = match full {
        Register::RAX => r.rax,
        Register::RBX => r.rbx,
        Register::RCX => r.rcx,
        Register::RDX => r.rdx,
        Register::RSI => r.rsi,
        Register::RDI => r.rdi,
        Register::RSP => r.rsp,
        Register::RBP => r.rbp,
        Register::R8 => r.r8,
        Register::R9 => r.r9,
        Register::R10 => r.r10,
        Register::R11 => r.r11,
        Register::R12 => r.r12,
        Register::R13 => r.r13,
        Register::R14 => r.r14,
        Register::R15 => r.r15,
        Register::RIP => r.rip,
        _ => return None,
    };
    // AH, BH, CH, DH are bits 8..16.
    if matches!(
        reg,
        Register::AH | Register::BH | Register::CH | Register::DH
    ) {
        return Some((v >> 8) & 0xff);
    }
    Some(v & size_mask(reg.size()))
}

fn set_reg(r: &mut kvm_regs, reg: Register, value: u64) -> bool {
    let full = reg.full_register();
    let slot = match full {
        Register::RAX => &mut r.rax,
        Register::RBX => &mut r.rbx,
        Register::RCX => &mut r.rcx,
        Register::RDX => &mut r.rdx,
        Register::RSI => &mut r.rsi,
        Register::RDI => &mut r.rdi,
        Register::RSP => &mut r.rsp,
        Register::RBP => &mut r.rbp,
        Register::R8 => &mut r.r8,
        Register::R9 => &mut r.r9,
        Register::R10 => &mut r.r10,
        Register::R11 => &mut r.r11,
        Register::R12 => &mut r.r12,
        Register::R13 => &mut r.r13,
        Register::R14 => &mut r.r14,
        Register::R15 => &mut r.r15,
        _ => return false,
    };
    if matches!(
        reg,
        Register::AH | Register::BH | Register::CH | Register::DH
    ) {
        *slot = (*slot & !0xff00) | ((value & 0xff) << 8);
    } else {
        let m = size_mask(reg.size());
        *slot = (*slot & !m) | (value & m);
    }
    true
}

/// Whether an operand is an immediate (of any size or extension).
pub(crate) fn is_immediate(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

fn size_mask(bytes: usize) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * bytes)) - 1
    }
}

fn le(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    let n = b.len().min(8);
    x[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(x)
}

/// Up to 15 bytes just before `rip_after`, read through `paging`; fewer if
/// the page before is not mapped.
fn bytes_before(cpu: &dyn WriterCpu, paging: PagingState, rip_after: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(15);
    let from = rip_after.saturating_sub(15);
    let mut at = from;
    while at < rip_after {
        let page_end = (at | 0xfff) + 1;
        let n = (page_end.min(rip_after) - at) as usize;
        match pagewalk::translate(cpu.memory(), paging, at) {
            Ok(t) => {
                let mut b = vec![0u8; n];
                if cpu.memory().read_phys(t.gpa, &mut b).is_err() {
                    out.clear();
                } else {
                    out.extend_from_slice(&b);
                }
            }
            // Only a tail of whole readable bytes is useful.
            Err(_) => out.clear(),
        }
        at += n as u64;
    }
    out
}

/// Finds the instruction that wrote `len` bytes at `gpa`, from the writing
/// vCPU's state; None if it cannot be found unambiguously (the write is
/// then committed as a plain store).
pub fn find_writer(cpu: &dyn WriterCpu, gpa: u64, len: usize) -> Option<Writer> {
    let regs = cpu.regs()?;
    let sregs = cpu.sregs()?;
    if sregs.cs.l != 1 {
        return None; // only 64-bit code is decoded
    }
    let paging = PagingState::from(&sregs);
    let cpl = (sregs.cs.selector & 3) as u8;
    let bytes = bytes_before(cpu, paging, regs.rip);
    // Every reading of the bytes that ends at RIP and writes an explicit
    // memory operand at the trapped address, whatever its size.
    let mut found: Vec<(Instruction, u64, u64)> = Vec::new();
    for k in 1..=bytes.len() {
        let start = regs.rip - k as u64;
        let code = &bytes[bytes.len() - k..];
        let mut d = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
        let ins = d.decode();
        if ins.is_invalid() || ins.len() != k || ins.op_count() == 0 {
            continue;
        }
        if ins.op0_kind() != OpKind::Memory {
            continue;
        }
        let Some(ea) = ins.virtual_address(0, 0, |reg, _, _| match reg {
            Register::FS => Some(sregs.fs.base),
            Register::GS => Some(sregs.gs.base),
            Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
            r => reg_value(&regs, r),
        }) else {
            continue;
        };
        match pagewalk::translate(cpu.memory(), paging, ea) {
            Ok(t) if t.gpa == gpa => found.push((ins, start, ea)),
            _ => {}
        }
    }
    // A reading with a wider operand that crosses the page here could have
    // made this write as the first part of a split one: the writer is then
    // unknown. Readings of the trapped size must agree (a byte of the
    // instruction before, read as a REX prefix, can change a register): if
    // they do not, the writer is unknown too, better a plain store than
    // re-running the wrong instruction. Readings that agree differ only in
    // prefixes that change nothing here (LOCK aside): the shortest is taken,
    // a locked one preferred.
    let split = found.iter().any(|(i, _, ea)| {
        let (size, off) = (i.memory_size().size() as u64, ea & 0xfff);
        size > len as u64 && off + size > 0x1000 && 0x1000 - off == len as u64
    });
    let same: Vec<&(Instruction, u64, u64)> = found
        .iter()
        .filter(|(i, _, _)| i.memory_size().size() == len)
        .collect();
    let key = |i: &Instruction| {
        let ops: Vec<(OpKind, Register, u64)> = (0..i.op_count())
            .map(|n| {
                let imm = match i.op_kind(n) {
                    OpKind::Register | OpKind::Memory => 0,
                    _ => i.immediate(n),
                };
                (i.op_kind(n), i.op_register(n), imm)
            })
            .collect();
        (
            i.mnemonic(),
            i.memory_base(),
            i.memory_index(),
            i.memory_displacement64(),
            ops,
        )
    };
    let first = same.first()?;
    if split || same.iter().any(|(i, _, _)| key(i) != key(&first.0)) {
        return None;
    }
    let locked = same.iter().any(|(i, _, _)| i.has_lock_prefix());
    let (ins, start, _) = same
        .iter()
        .filter(|(i, _, _)| i.has_lock_prefix() == locked)
        .min_by_key(|(i, _, _)| i.len())
        .copied()
        .copied()?;
    let src = |i: u32| -> Option<u64> {
        match ins.op_kind(i) {
            OpKind::Register => reg_value(&regs, ins.op_register(i)),
            k if is_immediate(k) => Some(ins.immediate(i)),
            _ => None,
        }
    };
    let rmw = match ins.mnemonic() {
        m @ (Mnemonic::Add
        | Mnemonic::Sub
        | Mnemonic::And
        | Mnemonic::Or
        | Mnemonic::Xor
        | Mnemonic::Bts
        | Mnemonic::Btr
        | Mnemonic::Btc) => match src(1) {
            Some(v) => Rmw::Op(m, v),
            None => Rmw::Store,
        },
        m @ (Mnemonic::Inc | Mnemonic::Dec | Mnemonic::Neg | Mnemonic::Not) => Rmw::Op(m, 0),
        Mnemonic::Xchg if ins.op1_kind() == OpKind::Register => Rmw::Xchg(ins.op1_register()),
        Mnemonic::Xadd if ins.op1_kind() == OpKind::Register => Rmw::Xadd(ins.op1_register()),
        Mnemonic::Cmpxchg => Rmw::Cmpxchg,
        Mnemonic::Cmpxchg8b => Rmw::Cmpxchg8b,
        _ => Rmw::Store,
    };
    Some(Writer {
        start,
        cpl,
        rmw,
        regs,
        locked: ins.has_lock_prefix(),
    })
}

/// Judges the write `data` of `w` against memory `now` (same length).
pub fn verdict(w: &Writer, now: &[u8], data: &[u8]) -> Verdict {
    let size = data.len();
    let mask = size_mask(size);
    let bits = (size * 8) as u64;
    let m = le(now);
    let wv = le(data);
    let mut rewind = w.regs;
    rewind.rip = w.start;
    let expect = match w.rmw {
        Rmw::Store => return Verdict::Commit,
        Rmw::Op(op, src) => match op {
            Mnemonic::Add => m.wrapping_add(src),
            Mnemonic::Sub => m.wrapping_sub(src),
            Mnemonic::And => m & src,
            Mnemonic::Or => m | src,
            Mnemonic::Xor => m ^ src,
            Mnemonic::Inc => m.wrapping_add(1),
            Mnemonic::Dec => m.wrapping_sub(1),
            Mnemonic::Neg => m.wrapping_neg(),
            Mnemonic::Not => !m,
            Mnemonic::Bts => m | (1 << (src & (bits - 1))),
            Mnemonic::Btr => m & !(1 << (src & (bits - 1))),
            Mnemonic::Btc => m ^ (1 << (src & (bits - 1))),
            _ => return Verdict::Commit,
        },
        Rmw::Xchg(reg) | Rmw::Xadd(reg) => {
            // The register holds the value the instruction read.
            let Some(read) = reg_value(&w.regs, reg) else {
                return Verdict::Commit;
            };
            if m & mask == read & mask {
                return Verdict::Commit;
            }
            // Its value before: what xchg wrote; for xadd, the sum minus the old value.
            let before = match w.rmw {
                Rmw::Xadd(_) => wv.wrapping_sub(read),
                _ => wv,
            };
            if !set_reg(&mut rewind, reg, before) {
                return Verdict::Commit;
            }
            return Verdict::Rewind(rewind);
        }
        Rmw::Cmpxchg | Rmw::Cmpxchg8b => {
            const ZF: u64 = 1 << 6;
            if w.regs.rflags & ZF == 0 {
                return Verdict::Drop;
            }
            let acc = if w.rmw == Rmw::Cmpxchg8b {
                (w.regs.rdx << 32) | (w.regs.rax & 0xffff_ffff)
            } else {
                w.regs.rax
            };
            if m & mask == acc & mask {
                return Verdict::Commit;
            }
            return Verdict::Rewind(rewind);
        }
    };
    if expect & mask == wv & mask {
        Verdict::Commit
    } else {
        Verdict::Rewind(rewind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(rmw: Rmw, regs: kvm_regs) -> Writer {
        Writer {
            start: 0x1000,
            cpl: 3,
            rmw,
            regs: kvm_regs {
                rip: 0x1004,
                ..regs
            },
            locked: true,
        }
    }

    #[test]
    fn increments_commit_when_fresh_and_rewind_when_stale() {
        let w = writer(Rmw::Op(Mnemonic::Inc, 0), kvm_regs::default());
        assert_eq!(
            verdict(&w, &5u64.to_le_bytes(), &6u64.to_le_bytes()),
            Verdict::Commit
        );
        match verdict(&w, &6u64.to_le_bytes(), &6u64.to_le_bytes()) {
            Verdict::Rewind(r) => assert_eq!(r.rip, 0x1000),
            v => panic!("{v:?}"),
        }
        // 4-byte operand wraps in its size.
        assert_eq!(
            verdict(&w, &u32::MAX.to_le_bytes(), &0u32.to_le_bytes()),
            Verdict::Commit
        );
        let a = writer(Rmw::Op(Mnemonic::Or, 0x10), kvm_regs::default());
        assert_eq!(verdict(&a, &[0x01], &[0x11]), Verdict::Commit);
        assert!(matches!(verdict(&a, &[0x03], &[0x11]), Verdict::Rewind(_)));
    }

    #[test]
    fn xadd_restores_its_register_to_run_again() {
        // xadd [m], ecx: ecx was 3, read 10, wrote 13; memory is 11 now.
        let regs = kvm_regs {
            rcx: 10,
            ..Default::default()
        };
        let w = writer(Rmw::Xadd(Register::ECX), regs);
        assert_eq!(
            verdict(&w, &10u32.to_le_bytes(), &13u32.to_le_bytes()),
            Verdict::Commit
        );
        match verdict(&w, &11u32.to_le_bytes(), &13u32.to_le_bytes()) {
            Verdict::Rewind(r) => assert_eq!((r.rip, r.rcx), (0x1000, 3)),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn cmpxchg_fails_without_writing_and_succeeds_only_on_fresh_memory() {
        let ok = writer(
            Rmw::Cmpxchg,
            kvm_regs {
                rax: 7,
                rflags: 1 << 6,
                ..Default::default()
            },
        );
        assert_eq!(
            verdict(&ok, &7u64.to_le_bytes(), &9u64.to_le_bytes()),
            Verdict::Commit
        );
        assert!(matches!(
            verdict(&ok, &8u64.to_le_bytes(), &9u64.to_le_bytes()),
            Verdict::Rewind(_)
        ));
        let failed = writer(
            Rmw::Cmpxchg,
            kvm_regs {
                rax: 8,
                rflags: 0,
                ..Default::default()
            },
        );
        assert_eq!(
            verdict(&failed, &9u64.to_le_bytes(), &8u64.to_le_bytes()),
            Verdict::Drop
        );
    }

    /// Guest RAM whose page tables map 0xffffffff80000000 to 0 with one
    /// 2 MiB page (tables at 0x1000..0x4000), and a vCPU in 64-bit kernel mode.
    struct Cpu {
        ram: crate::memory::GuestRam,
        regs: kvm_regs,
    }

    impl WriterCpu for Cpu {
        fn regs(&self) -> Option<kvm_regs> {
            Some(self.regs)
        }
        fn sregs(&self) -> Option<kvm_bindings::kvm_sregs> {
            let mut s = kvm_bindings::kvm_sregs::default();
            s.cs.l = 1;
            s.cs.selector = 0x10;
            s.cr0 = 0x8000_0011;
            s.cr3 = 0x1000;
            s.cr4 = 0x20;
            s.efer = 0x500;
            Some(s)
        }
        fn memory(&self) -> &dyn crate::guest::PhysMemory {
            &self.ram
        }
    }

    const BASE: u64 = 0xffff_ffff_8000_0000;
    const CODE: u64 = 0x10_0000;
    const DATA: u64 = 0x18_0000;

    /// `code` placed at CODE after some nops; the vCPU's RIP just past it.
    fn cpu(code: &[u8], regs: kvm_regs) -> Cpu {
        let ram = crate::memory::GuestRam::new(4 << 20).expect("ram");
        let w = |a: u64, v: u64| ram.write(a, &v.to_le_bytes()).expect("write");
        w(0x1000 + 511 * 8, 0x2000 | 3);
        w(0x2000 + 510 * 8, 0x3000 | 3);
        w(0x3000, 0x83);
        ram.write(CODE - 16, &[0x90; 16]).expect("nops");
        ram.write(CODE, code).expect("code");
        let rip = BASE + CODE + code.len() as u64;
        Cpu {
            ram,
            regs: kvm_regs { rip, ..regs },
        }
    }

    #[test]
    fn finds_the_writing_instruction_before_rip() {
        // lock inc qword [rax]
        let c = cpu(
            &[0xf0, 0x48, 0xff, 0x00],
            kvm_regs {
                rax: BASE + DATA,
                ..Default::default()
            },
        );
        let w = find_writer(&c, DATA, 8).expect("found");
        assert_eq!((w.start, w.locked, w.cpl), (BASE + CODE, true, 0));
        assert_eq!(w.rmw, Rmw::Op(Mnemonic::Inc, 0));
        // Not the address it wrote: nothing found (committed as a plain store).
        assert!(find_writer(&c, DATA + 8, 8).is_none());
        // The size picks among readings: as a 4-byte write these bytes end
        // in `inc dword [rax]` (ff 00), two bytes in.
        let w = find_writer(&c, DATA, 4).expect("found");
        assert_eq!((w.start, w.locked), (BASE + CODE + 2, false));
        // ... unless the 8-byte reading crosses a page there: a 4-byte write
        // may be its first part, and the writer is unknown.
        let c = cpu(
            &[0xf0, 0x48, 0xff, 0x00],
            kvm_regs {
                rax: BASE + DATA + 0xffc,
                ..Default::default()
            },
        );
        assert!(find_writer(&c, DATA + 0xffc, 4).is_none());
        // A byte of the instruction before that reads as a REX prefix changes
        // the register of `xchg [rdi], eax` (87 07 vs 44 87 07): no writer.
        let c = cpu(
            &[0x44, 0x87, 0x07],
            kvm_regs {
                rdi: BASE + DATA,
                ..Default::default()
            },
        );
        assert!(find_writer(&c, DATA, 4).is_none());
        // One that changes nothing (a CS prefix) leaves the shortest reading.
        let c = cpu(
            &[0x2e, 0xf0, 0x48, 0xff, 0x00],
            kvm_regs {
                rax: BASE + DATA,
                ..Default::default()
            },
        );
        let w = find_writer(&c, DATA, 8).expect("found");
        assert_eq!((w.start, w.locked), (BASE + CODE + 1, true));
        // mov [rip+disp32], rax: RIP-relative, a plain store.
        let disp = (DATA as i64 - (CODE as i64 + 7)) as i32;
        let mut mov = vec![0x48, 0x89, 0x05];
        mov.extend_from_slice(&disp.to_le_bytes());
        let c = cpu(&mov, kvm_regs::default());
        let w = find_writer(&c, DATA, 8).expect("found");
        assert_eq!((w.start, w.rmw, w.locked), (BASE + CODE, Rmw::Store, false));
        // lock xadd [rax], ecx: its register and operand size.
        let c = cpu(
            &[0xf0, 0x0f, 0xc1, 0x08],
            kvm_regs {
                rax: BASE + DATA,
                ..Default::default()
            },
        );
        let w = find_writer(&c, DATA, 4).expect("found");
        assert_eq!(w.rmw, Rmw::Xadd(Register::ECX));
        // lock cmpxchg [rdi+8], rsi
        let c = cpu(
            &[0xf0, 0x48, 0x0f, 0xb1, 0x77, 0x08],
            kvm_regs {
                rdi: BASE + DATA - 8,
                ..Default::default()
            },
        );
        assert_eq!(find_writer(&c, DATA, 8).expect("found").rmw, Rmw::Cmpxchg);
    }

    #[test]
    fn registers_by_size() {
        let mut r = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            ..Default::default()
        };
        assert_eq!(reg_value(&r, Register::AH), Some(0x77));
        assert_eq!(reg_value(&r, Register::AX), Some(0x7788));
        assert!(set_reg(&mut r, Register::AL, 0xff));
        assert_eq!(r.rax, 0x1122_3344_5566_77ff);
        assert!(set_reg(&mut r, Register::AH, 0x01));
        assert_eq!(r.rax, 0x1122_3344_5566_01ff);
    }
}
