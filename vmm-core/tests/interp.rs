//! The interpreter against the KVM sandbox on the real /dev/kvm: the same
//! code, the same inputs, the same results. Random integer programs (every
//! instruction kind the interpreter carries out, on every operand size,
//! each instruction's defined flags recorded), the sandbox's own fault
//! cases, and what the interpreter refuses to run.

mod interp_common;

use iced_x86::code_asm::*;
use interp_common::*;
use vmm_core::sandbox::interp::{Program, INSTRUCTION_LIMIT};
use vmm_core::sandbox::{self, Sandbox, SandboxError, CODE_VA};

/// Slots of `b`: 12 registers, one flags word per instruction, scratch
/// words, then the 12 registers after each instruction.
const FLAGS_AT: u64 = 12 * 8;
const OPS: u64 = 40;
const SCRATCH_AT: u64 = FLAGS_AT + OPS * 8;
const TRACE_AT: u64 = SCRATCH_AT + 64;
const B_SIZE: usize = (TRACE_AT + OPS * 12 * 8) as usize;

/// Appends one random instruction (or a short guarded group); returns the
/// flags it defines.
fn random_op(a: &mut CodeAssembler, rng: &mut Rng) -> Result<u64, IcedError> {
    let i = rng.below(12) as usize;
    let j = rng.below(12) as usize;
    let size = rng.pick(&[8, 4, 2, 1]);
    let imm = rng.next() as i32 >> rng.below(31);
    macro_rules! alu2 {
        ($op:ident) => {
            match size {
                8 => a.$op(R64[i], R64[j])?,
                4 => a.$op(R32[i], R32[j])?,
                2 => a.$op(R16[i], R16[j])?,
                _ => a.$op(R8[i], R8[j])?,
            }
        };
    }
    macro_rules! alu_imm {
        ($op:ident) => {
            match size {
                8 => a.$op(R64[i], imm)?,
                4 => a.$op(R32[i], imm)?,
                2 => a.$op(R16[i], imm as i16 as i32)?,
                _ => a.$op(R8[i], imm as i8 as i32)?,
            }
        };
    }
    macro_rules! alu1 {
        ($op:ident) => {
            match size {
                8 => a.$op(R64[i])?,
                4 => a.$op(R32[i])?,
                2 => a.$op(R16[i])?,
                _ => a.$op(R8[i])?,
            }
        };
    }
    let bits = size as u32 * 8;
    Ok(match rng.below(30) {
        0 => {
            alu2!(add);
            ARITH
        }
        1 => {
            alu2!(adc);
            ARITH
        }
        2 => {
            alu2!(sub);
            ARITH
        }
        3 => {
            alu2!(sbb);
            ARITH
        }
        4 => {
            alu2!(cmp);
            ARITH
        }
        5 => {
            match rng.below(3) {
                0 => alu2!(and),
                1 => alu2!(or),
                _ => alu2!(xor),
            }
            ARITH
        }
        6 => {
            alu2!(test);
            ARITH
        }
        7 => {
            match rng.below(4) {
                0 => alu_imm!(add),
                1 => alu_imm!(sub),
                2 => alu_imm!(and),
                _ => alu_imm!(xor),
            }
            ARITH
        }
        8 => {
            if rng.below(2) == 0 {
                alu1!(inc)
            } else {
                alu1!(dec)
            }
            ARITH
        }
        9 => {
            alu1!(neg);
            ARITH
        }
        10 => {
            alu1!(not);
            u64::MAX
        }
        11 | 12 => {
            // Shifts and rotates by an immediate or by cl.
            // Not a 32-bit register by a masked count of 0: whether that
            // clears its upper half is the CPU's (Intel does).
            let raw = rng.below(64) as u32;
            let raw = if size == 4 && raw & 31 == 0 {
                raw | 1
            } else {
                raw
            };
            let count = raw & if size == 8 { 63 } else { 31 };
            let by_cl = rng.below(2) == 0 && i != 2;
            let kind = rng.below(5);
            if by_cl {
                a.mov(ecx, raw)?;
            }
            macro_rules! sh {
                ($op:ident) => {
                    match (size, by_cl) {
                        (8, false) => a.$op(R64[i], raw)?,
                        (4, false) => a.$op(R32[i], raw)?,
                        (2, false) => a.$op(R16[i], raw)?,
                        (_, false) => a.$op(R8[i], raw)?,
                        (8, true) => a.$op(R64[i], cl)?,
                        (4, true) => a.$op(R32[i], cl)?,
                        (2, true) => a.$op(R16[i], cl)?,
                        (_, true) => a.$op(R8[i], cl)?,
                    }
                };
            }
            match kind {
                0 => sh!(shl),
                1 => sh!(shr),
                2 => sh!(sar),
                3 => sh!(rol),
                _ => sh!(ror),
            }
            let rotate = kind >= 3;
            match count {
                0 => u64::MAX,
                1 if rotate => u64::MAX,
                1 => ARITH,
                _ if rotate => CF | PF | ZF | SF,
                c if c <= bits => CF | PF | ZF | SF,
                _ => PF | ZF | SF,
            }
        }
        13 => {
            match size {
                8 => a.imul_2(R64[i], R64[j])?,
                4 => a.imul_2(R32[i], R32[j])?,
                _ => a.imul_3(R32[i], R32[j], imm)?,
            }
            CF | OF
        }
        14 => {
            // One-operand multiply: rdx:rax.
            let s = if i == 0 || i == 3 { 4 } else { i };
            match (size, rng.below(2)) {
                (8, 0) => a.mul(R64[s])?,
                (8, _) => a.imul(R64[s])?,
                (4, 0) => a.mul(R32[s])?,
                (4, _) => a.imul(R32[s])?,
                (2, 0) => a.mul(R16[s])?,
                (2, _) => a.imul(R16[s])?,
                (_, 0) => a.mul(R8[s])?,
                _ => a.imul(R8[s])?,
            }
            CF | OF
        }
        15 => {
            // Division that cannot fault: unsigned, rdx cleared, divisor
            // made nonzero.
            let s = if i == 0 || i == 3 { 4 } else { i };
            a.xor(edx, edx)?;
            a.or(R64[s], 1)?;
            if size == 8 {
                a.div(R64[s])?;
            } else {
                a.div(R32[s])?;
            }
            0
        }
        16 => {
            match size {
                8 => a.movzx(R64[i], R16[j])?,
                4 => a.movzx(R32[i], R8[j])?,
                2 => a.movsx(R64[i], R8[j])?,
                _ => a.movsxd(R64[i], R32[j])?,
            }
            u64::MAX
        }
        17 => {
            let scale = rng.pick(&[1, 2, 4, 8]);
            let disp = imm;
            if size == 4 {
                a.lea(R32[i], qword_ptr(R64[j] + R64[(j + 1) % 12] * scale + disp))?;
            } else {
                a.lea(R64[i], qword_ptr(R64[j] + R64[(j + 1) % 12] * scale + disp))?;
            }
            u64::MAX
        }
        18 => {
            // A condition into a register, and a conditional move.
            match rng.below(6) {
                0 => a.setb(R8[i])?,
                1 => a.setle(R8[i])?,
                2 => a.seto(R8[i])?,
                3 => a.setp(R8[i])?,
                4 => a.sets(R8[i])?,
                _ => a.seta(R8[i])?,
            }
            match (size, rng.below(4)) {
                (8, 0) => a.cmovg(R64[i], R64[j])?,
                (8, _) => a.cmovbe(R64[i], R64[j])?,
                (4, 0) => a.cmovl(R32[i], R32[j])?,
                (4, _) => a.cmovne(R32[i], R32[j])?,
                (_, 0) => a.cmove(R16[i], R16[j])?,
                _ => a.cmovae(R16[i], R16[j])?,
            }
            u64::MAX
        }
        19 => {
            if size == 8 {
                a.bswap(R64[i])?
            } else {
                a.bswap(R32[i])?
            }
            u64::MAX
        }
        20 => {
            match (size, rng.below(2)) {
                (8, 0) => a.bsf(R64[i], R64[j])?,
                (8, _) => a.bsr(R64[i], R64[j])?,
                (_, 0) => a.bsf(R32[i], R32[j])?,
                _ => a.bsr(R32[i], R32[j])?,
            }
            ZF
        }
        21 => match rng.below(3) {
            0 => {
                a.tzcnt(R64[i], R64[j])?;
                CF | ZF
            }
            1 => {
                a.lzcnt(R32[i], R32[j])?;
                CF | ZF
            }
            _ => {
                a.popcnt(R64[i], R64[j])?;
                ARITH
            }
        },
        22 => {
            match (size, rng.below(4)) {
                (8, 0) => a.bt(R64[i], R64[j])?,
                (8, 1) => a.bts(R64[i], imm & 63)?,
                (8, 2) => a.btr(R64[i], R64[j])?,
                (8, _) => a.btc(R64[i], imm & 63)?,
                (_, 0) => a.bt(R32[i], R32[j])?,
                (_, 1) => a.bts(R32[i], R32[j])?,
                (_, 2) => a.btr(R32[i], imm & 31)?,
                _ => a.btc(R32[i], R32[j])?,
            }
            // (ZF: Intel leaves it, AMD calls it undefined.)
            CF
        }
        23 => {
            match size {
                8 => a.xchg(R64[i], R64[j])?,
                4 => a.xadd(R32[i], R32[j])?,
                2 => a.xadd(R16[i], R16[j])?,
                _ => a.xchg(R8[i], R8[j])?,
            }
            if size == 4 || size == 2 {
                ARITH
            } else {
                u64::MAX
            }
        }
        24 => {
            let s = if i == 0 { 1 } else { i };
            match size {
                8 => a.cmpxchg(R64[s], R64[j])?,
                // (Not a 32-bit register: whether a failed compare writes
                // it back, clearing its upper half, is the CPU's.)
                4 => a.cmpxchg(R64[s], R64[j])?,
                2 => a.cmpxchg(R16[s], R16[j])?,
                _ => a.cmpxchg(R8[s], R8[j])?,
            }
            ARITH
        }
        25 => {
            // Memory operands: the scratch words of `b` past the flags.
            let at = SCRATCH_AT as i32 + (rng.below(6) * 8) as i32;
            match size {
                8 => a.add(qword_ptr(rsi + at), R64[i])?,
                4 => a.sub(R32[i], dword_ptr(rsi + at))?,
                2 => a.xor(word_ptr(rsi + at + 1), R16[i])?,
                _ => a.mov(R8[i], byte_ptr(rsi + at + 3))?,
            }
            if size == 1 {
                u64::MAX
            } else {
                ARITH
            }
        }
        26 => {
            a.push(R64[i])?;
            a.push(imm)?;
            a.pop(R64[j])?;
            a.pop(R64[(j + 5) % 12])?;
            u64::MAX
        }
        27 => {
            match rng.below(4) {
                0 => a.cqo()?,
                1 => a.cdq()?,
                2 => a.cdqe()?,
                _ => a.cwde()?,
            }
            u64::MAX
        }
        28 => {
            // Signed division that cannot fault: dividend sign-extended
            // from a 32-bit value, divisor with bit 8 set.
            let s = if i == 0 || i == 3 { 4 } else { i };
            a.movsxd(rax, eax)?;
            a.cqo()?;
            a.or(R64[s], 0x100)?;
            a.idiv(R64[s])?;
            0
        }
        _ => {
            // A short branch on a flag.
            let mut skip = a.create_label();
            match rng.below(4) {
                0 => a.jl(skip)?,
                1 => a.jbe(skip)?,
                2 => a.jns(skip)?,
                _ => a.jnp(skip)?,
            }
            a.add(R64[i], 0x1234)?;
            a.set_label(&mut skip)?;
            a.nop()?;
            u64::MAX
        }
    })
}

/// One random function: registers from `a`, `OPS` instructions (each
/// one's defined flags and the registers after it stored), registers to
/// `b`. Its instructions' labels are pushed to `ops`.
fn random_function(
    a: &mut CodeAssembler,
    rng: &mut Rng,
    ops: &mut Vec<CodeLabel>,
) -> Result<(), IcedError> {
    a.push(rbx)?;
    a.push(rbp)?;
    a.push(r12)?;
    a.push(r13)?;
    a.push(r14)?;
    a.push(r15)?;
    for (k, r) in R64.iter().enumerate() {
        a.mov(*r, qword_ptr(rdi + (k * 8) as i32))?;
    }
    for n in 0..OPS {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        ops.push(l);
        let defined = random_op(a, rng)?;
        for (k, r) in R64.iter().enumerate() {
            a.mov(
                qword_ptr(rsi + (TRACE_AT + (n * 12 + k as u64) * 8) as i32),
                *r,
            )?;
        }
        a.pushfq()?;
        a.pop(r15)?;
        a.mov(rdi, defined & ARITH)?;
        a.and(r15, rdi)?;
        a.mov(qword_ptr(rsi + (FLAGS_AT + n * 8) as i32), r15)?;
    }
    for (k, r) in R64.iter().enumerate() {
        a.mov(qword_ptr(rsi + (k * 8) as i32), *r)?;
    }
    a.pop(r15)?;
    a.pop(r14)?;
    a.pop(r13)?;
    a.pop(r12)?;
    a.pop(rbp)?;
    a.pop(rbx)?;
    a.ret()?;
    Ok(())
}

fn inputs(rng: &mut Rng) -> Vec<u8> {
    (0..12)
        .flat_map(|_| {
            let v = match rng.below(5) {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << rng.below(64),
                3 => rng.below(256),
                _ => rng.next(),
            };
            v.to_le_bytes()
        })
        .collect()
}

#[test]
fn random_integer_programs_give_the_sandboxs_results_bit_for_bit() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (code, entries, op_ips) = assemble(200, &mut rng, random_function);
    let mut sb = Sandbox::new(&code).expect("a sandbox on /dev/kvm (this test needs KVM)");
    let mut prog = Program::new(&code, &entries).expect("the interpreter takes every instruction");
    let mut compared = 0;
    for (f, &entry) in entries.iter().enumerate() {
        for round in 0..5 {
            let a_in = inputs(&mut rng);
            let init: Vec<u8> = (0..B_SIZE).map(|_| rng.next() as u8).collect();
            let mut want = init.clone();
            sb.call(entry, &a_in, &mut want, sandbox::TIME_LIMIT)
                .unwrap_or_else(|e| panic!("function {f} round {round} in the sandbox: {e}"));
            let mut got = init.clone();
            prog.call_each(
                entry,
                (&a_in, a_in.len()),
                (&mut got, B_SIZE),
                INSTRUCTION_LIMIT,
            )
            .unwrap_or_else(|e| panic!("function {f} round {round} interpreted: {e}"));
            if got != want {
                let word = |b: &[u8], k: usize| {
                    u64::from_le_bytes(b[k * 8..k * 8 + 8].try_into().expect("8"))
                };
                // The first instruction whose registers or flags differ.
                let order = (0..OPS).flat_map(|n| {
                    (0..12)
                        .map(move |r| (TRACE_AT / 8 + n * 12 + r) as usize)
                        .chain(std::iter::once((FLAGS_AT / 8 + n) as usize))
                });
                let k = order
                    .chain(0..B_SIZE / 8)
                    .find(|&k| word(&got, k) != word(&want, k))
                    .expect("a differing word");
                let k = k as u64;
                let op = if k >= TRACE_AT / 8 {
                    Some((k - TRACE_AT / 8) / 12)
                } else if (FLAGS_AT / 8..SCRATCH_AT / 8).contains(&k) {
                    Some(k - FLAGS_AT / 8)
                } else {
                    None
                };
                let what = match op {
                    Some(n) => {
                        let i = f * OPS as usize + n as usize;
                        let codes = instructions_of(&code, &op_ips, i);
                        format!("slot {k}, instruction {n}: {codes:?}")
                    }
                    None => format!("slot {k}"),
                };
                let k = k as usize;
                panic!(
                    "function {f} round {round}: {what}: interpreted {:#x}, sandbox {:#x}\ninput {:x?}",
                    word(&got, k),
                    word(&want, k),
                    a_in
                );
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 1000);
}

/// Code of one or more functions, each 16-byte aligned (as in the
/// sandbox's own tests).
fn pieces(ps: &[&[u8]]) -> (Vec<u8>, Vec<u64>) {
    let mut code = Vec::new();
    let mut entries = Vec::new();
    for p in ps {
        entries.push(CODE_VA + code.len() as u64);
        code.extend_from_slice(p);
        code.resize(code.len().div_ceil(16) * 16, 0xcc);
    }
    (code, entries)
}

fn fault_of(e: SandboxError) -> (u8, u64, u64) {
    match e {
        SandboxError::Fault {
            vector,
            rip,
            address,
            ..
        } => (vector, rip, address),
        other => panic!("not a fault: {other}"),
    }
}

#[test]
fn faults_are_the_sandboxs_vector_place_and_address() {
    let poison = sandbox::poison_symbol(1).expect("slot");
    let call_rel = |at: u64, target: u64| {
        let rel = target.wrapping_sub(at + 5) as i64 as i32;
        let mut c = vec![0xe8];
        c.extend_from_slice(&rel.to_le_bytes());
        c.push(0xc3);
        c
    };
    let via_symbol = call_rel(CODE_VA, poison);
    let ps: Vec<&[u8]> = vec![
        &via_symbol,                           // a kernel symbol
        &[0x31, 0xc0, 0x48, 0x8b, 0x00, 0xc3], // read address 0
        &[
            0x48, 0x83, 0xec, 0x10, 0x48, 0x89, 0x04, 0x24, 0x48, 0x81, 0xec, 0, 0, 2, 0, 0x50,
            0xc3,
        ], // a push far below the stack
        &[0xc6, 0x05, 0xf9, 0xff, 0xff, 0xff, 0xc3, 0xc3], // a write to its own code
        &[0xcc],                               // int3
        &[0x0f, 0x0b],                         // ud2
        &[0x31, 0xc9, 0x48, 0xf7, 0xf1, 0xc3], // divide by zero
        &[
            0x48, 0xb8, 0, 0, 0, 0, 0, 0x80, 0, 0, 0x48, 0x8b, 0x00, 0xc3,
        ], // a non-canonical read
        &[0x48, 0x8b, 0x46, 0x40, 0xc3],       // past the end of b (16 bytes)
    ];
    let (code, entries) = pieces(&ps);
    let mut sb = Sandbox::new(&code).expect("a sandbox on /dev/kvm (this test needs KVM)");
    let mut prog = Program::new(&code, &entries).expect("decodes");
    for (k, &e) in entries.iter().enumerate() {
        let mut b1 = [0u8; 16];
        let mut b2 = [0u8; 16];
        // Past the end of `b` the sandbox has memory (its buffers are
        // larger than an element): the interpreter stops there.
        if k == 8 {
            let got = fault_of(
                prog.call_each(e, (&[0; 8], 8), (&mut b2, 16), INSTRUCTION_LIMIT)
                    .expect_err("faults interpreted"),
            );
            assert_eq!(got, (14, e, WINDOW_B + 0x40), "piece {k}");
            continue;
        }
        let want = fault_of(
            sb.call(e, &[0; 8], &mut b1, sandbox::TIME_LIMIT)
                .expect_err("faults in the sandbox"),
        );
        let got = fault_of(
            prog.call_each(e, (&[0; 8], 8), (&mut b2, 16), INSTRUCTION_LIMIT)
                .expect_err("faults interpreted"),
        );
        assert_eq!(got, want, "piece {k}: (vector, rip, address)");
    }
}

const WINDOW_B: u64 = sandbox::WINDOW_VA + 0x61000;

#[test]
fn an_endless_loop_stops_at_the_instruction_limit_and_the_program_goes_on() {
    let (code, e) = pieces(&[&[0xeb, 0xfe], &[0x48, 0x8b, 0x07, 0x48, 0x89, 0x06, 0xc3]]);
    let mut prog = Program::new(&code, &e).expect("decodes");
    let mut b = [0u8; 8];
    let err = prog
        .call_each(e[0], (&[0; 8], 8), (&mut b, 8), 10_000)
        .expect_err("stops");
    assert!(
        err.to_string().contains("limit of 10000 instructions"),
        "{err}"
    );
    prog.call_each(e[1], (&7u64.to_le_bytes(), 8), (&mut b, 8), 10_000)
        .expect("goes on");
    assert_eq!(u64::from_le_bytes(b), 7);
}

#[test]
fn code_the_interpreter_does_not_carry_out_is_refused_naming_the_instruction() {
    for (bytes, what) in [
        (&[0xff, 0xe0][..], "indirect branch"),         // jmp rax
        (&[0x0f, 0x20, 0xd8, 0xc3][..], "at 0x"),       // mov rax, cr3
        (&[0x66, 0x0f, 0xef, 0xc0, 0xc3][..], "at 0x"), // pxor xmm0, xmm0
    ] {
        let (code, e) = pieces(&[bytes]);
        let err = Program::new(&code, &e).expect_err("refused");
        assert!(err.contains(what), "{err}");
    }
}
