//! What the interpreter's differential tests share: a deterministic
//! generator, the registers random code works on, the flags the
//! architecture defines, and assembling many random functions into one
//! piece of code both engines run.

#![allow(dead_code)]

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use vmm_core::sandbox::CODE_VA;

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub const CF: u64 = 1;
pub const PF: u64 = 4;
pub const ZF: u64 = 0x40;
pub const SF: u64 = 0x80;
pub const DF: u64 = 0x400;
pub const OF: u64 = 0x800;
pub const ARITH: u64 = CF | PF | ZF | SF | OF;

/// Registers the random code works on (not rsp, rdi, rsi, r15).
pub const R64: [AsmRegister64; 12] = [rax, rbx, rcx, rdx, rbp, r8, r9, r10, r11, r12, r13, r14];
pub const R32: [AsmRegister32; 12] = [
    eax, ebx, ecx, edx, ebp, r8d, r9d, r10d, r11d, r12d, r13d, r14d,
];
pub const R16: [AsmRegister16; 12] = [ax, bx, cx, dx, bp, r8w, r9w, r10w, r11w, r12w, r13w, r14w];
pub const R8: [AsmRegister8; 12] = [al, bl, cl, dl, bpl, r8b, r9b, r10b, r11b, r12b, r13b, r14b];

/// `n` functions from `gen` (each given the labels of its instructions
/// to push), assembled at [`CODE_VA`]: the code, each function's entry,
/// and the address of every label pushed (in order).
pub fn assemble(
    n: usize,
    rng: &mut Rng,
    gen: impl Fn(&mut CodeAssembler, &mut Rng, &mut Vec<CodeLabel>) -> Result<(), IcedError>,
) -> (Vec<u8>, Vec<u64>, Vec<u64>) {
    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut labels = Vec::new();
    let mut ops = Vec::new();
    for _ in 0..n {
        let mut l = a.create_label();
        a.set_label(&mut l).expect("label");
        labels.push(l);
        gen(&mut a, rng, &mut ops).expect("assembles");
        a.int3().expect("pad");
    }
    let result = a
        .assemble_options(CODE_VA, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .expect("assembles");
    let ip = |l: &CodeLabel| result.label_ip(l).expect("label ip");
    let entries = labels.iter().map(ip).collect();
    let op_ips = ops.iter().map(ip).collect();
    (result.inner.code_buffer.clone(), entries, op_ips)
}

/// The instructions of random op `i` (between its label and the next),
/// for a failure's message.
pub fn instructions_of(code: &[u8], op_ips: &[u64], i: usize) -> Vec<iced_x86::Code> {
    let start = op_ips[i];
    let end = op_ips.get(i + 1).copied().unwrap_or(start + 64);
    let off = (start - CODE_VA) as usize;
    let bytes = &code[off..((end - CODE_VA) as usize).min(code.len())];
    let mut d = iced_x86::Decoder::with_ip(64, bytes, start, iced_x86::DecoderOptions::NONE);
    d.iter().map(|i| i.code()).collect()
}
