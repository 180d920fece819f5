//! The sandbox on the real /dev/kvm: functions run on copies of two buffers,
//! return what they wrote, and a faulting or endless one fails with its
//! cause while the sandbox stays usable.

use std::time::Duration;

use vmm_core::sandbox::{self, Sandbox, SandboxError, CODE_VA};

/// `b[1] = a[0] + 1` (64-bit words).
const ADD_ONE: &[u8] = &[
    0x48, 0x8b, 0x07, // mov rax, [rdi]
    0x48, 0x83, 0xc0, 0x01, // add rax, 1
    0x48, 0x89, 0x46, 0x08, // mov [rsi+8], rax
    0xc3, // ret
];
/// Reads address 0.
const NULL_READ: &[u8] = &[0x31, 0xc0, 0x48, 0x8b, 0x00, 0xc3];
/// Never returns.
const ENDLESS: &[u8] = &[0xeb, 0xfe];

fn call_rel(at: u64, target: u64) -> [u8; 5] {
    let rel = target.wrapping_sub(at + 5) as i64 as i32;
    let mut c = [0xe8, 0, 0, 0, 0];
    c[1..].copy_from_slice(&rel.to_le_bytes());
    c
}

fn sandbox(pieces: &[&[u8]]) -> (Sandbox, Vec<u64>) {
    let mut code = Vec::new();
    let mut entries = Vec::new();
    for p in pieces {
        entries.push(CODE_VA + code.len() as u64);
        code.extend_from_slice(p);
        code.resize(code.len().div_ceil(16) * 16, 0xcc);
    }
    (
        Sandbox::new(&code).expect("a sandbox on /dev/kvm (this test needs KVM)"),
        entries,
    )
}

#[test]
fn a_function_runs_on_copies_and_returns_what_it_wrote() {
    let (mut sb, e) = sandbox(&[ADD_ONE]);
    let a = 41u64.to_le_bytes();
    let mut b = [7u8; 16];
    sb.call(e[0], &a, &mut b, sandbox::TIME_LIMIT)
        .expect("call");
    assert_eq!(&b[..8], &[7; 8], "bytes it did not write are kept");
    assert_eq!(u64::from_le_bytes(b[8..].try_into().expect("8")), 42);
    for i in 0..100u64 {
        let mut b = [0u8; 16];
        sb.call(e[0], &i.to_le_bytes(), &mut b, sandbox::TIME_LIMIT)
            .expect("call");
        assert_eq!(u64::from_le_bytes(b[8..].try_into().expect("8")), i + 1);
    }
}

#[test]
fn a_batch_runs_the_function_on_every_pair_of_elements_in_one_go() {
    let (mut sb, e) = sandbox(&[ADD_ONE]);
    // a: 100 words; b: 100 elements of 16 bytes.
    let a: Vec<u8> = (0..100u64).flat_map(|i| (i * 10).to_le_bytes()).collect();
    let mut b = vec![0xeeu8; 100 * 16];
    sb.call_each(e[0], (&a, 8), (&mut b, 16), sandbox::TIME_LIMIT)
        .expect("batch");
    for (i, el) in b.chunks(16).enumerate() {
        assert_eq!(&el[..8], &[0xee; 8], "element {i}: untouched half");
        assert_eq!(
            u64::from_le_bytes(el[8..].try_into().expect("8")),
            i as u64 * 10 + 1,
            "element {i}"
        );
    }
    // Mismatched sizes are refused.
    assert!(sb
        .call_each(e[0], (&a, 8), (&mut b[..16 * 99], 16), sandbox::TIME_LIMIT)
        .is_err());
}

#[test]
fn runtime_functions_are_there_for_compiled_code() {
    // memcpy(b, a, 16) through the sandbox's runtime.
    let mut code = vec![
        0x48, 0x89, 0xf8, // mov rax, rdi
        0x48, 0x89, 0xf7, // mov rdi, rsi
        0x48, 0x89, 0xc6, // mov rsi, rax
        0xba, 0x10, 0, 0, 0, // mov edx, 16
    ];
    let memcpy = sandbox::runtime_symbol("memcpy").expect("memcpy");
    code.extend_from_slice(&call_rel(CODE_VA + code.len() as u64, memcpy));
    code.push(0xc3);
    let (mut sb, e) = sandbox(&[&code]);
    let a: Vec<u8> = (1..=16).collect();
    let mut b = [0u8; 20];
    sb.call(e[0], &a, &mut b, sandbox::TIME_LIMIT)
        .expect("call");
    assert_eq!(&b[..16], &a[..]);
    assert_eq!(&b[16..], &[0; 4]);
}

#[test]
fn faults_and_endless_loops_fail_with_their_cause_and_the_sandbox_goes_on() {
    let poison = sandbox::poison_symbol(2).expect("slot");
    let mut via_symbol = call_rel(CODE_VA + 48, poison).to_vec();
    via_symbol.push(0xc3);
    let (mut sb, e) = sandbox(&[ADD_ONE, NULL_READ, ENDLESS, &via_symbol]);
    assert_eq!(e[3], CODE_VA + 48);
    let mut b = [0u8; 16];
    let err = sb
        .call(e[1], &[0; 8], &mut b, sandbox::TIME_LIMIT)
        .expect_err("a null read faults");
    match &err {
        SandboxError::Fault {
            vector,
            address,
            rip,
            ..
        } => {
            assert_eq!((*vector, *address), (14, 0), "{err}");
            assert_eq!(*rip, e[1] + 2, "{err}");
        }
        other => panic!("not a fault: {other}"),
    }
    assert!(err.to_string().contains("#PF"), "{err}");

    let err = sb
        .call(e[3], &[0; 8], &mut b, sandbox::TIME_LIMIT)
        .expect_err("a kernel symbol faults");
    assert!(err.to_string().contains("kernel symbol"), "{err}");

    let limit = Duration::from_millis(100);
    let err = sb
        .call(e[2], &[0; 8], &mut b, limit)
        .expect_err("an endless loop is stopped");
    assert!(matches!(err, SandboxError::RanAway(_)), "{err}");
    assert!(err.to_string().contains("time limit of 100 ms"), "{err}");
    assert_eq!(b, [0; 16], "a failed call returns nothing");

    // Still usable.
    sb.call(e[0], &5u64.to_le_bytes(), &mut b, sandbox::TIME_LIMIT)
        .expect("call after failures");
    assert_eq!(u64::from_le_bytes(b[8..].try_into().expect("8")), 6);
}

#[test]
fn a_stack_overflow_or_a_write_to_code_is_a_reported_fault_and_changes_nothing() {
    // sub rsp, 0x20000; mov [rsp], rax: far below the stack (unmapped).
    const DEEP: &[u8] = &[
        0x48, 0x81, 0xec, 0x00, 0x00, 0x02, 0x00, 0x48, 0x89, 0x04, 0x24, 0xc3,
    ];
    // mov rsp, 0; push rax: no stack at all (the fault is delivered on
    // the sandbox's own exception stack, not a triple fault).
    const NO_STACK: &[u8] = &[0x31, 0xe4, 0x50, 0xc3];
    // mov byte [rip-7], 0xc3: a write into its own code.
    const SELF_WRITE: &[u8] = &[0xc6, 0x05, 0xf9, 0xff, 0xff, 0xff, 0xc3, 0xc3];
    let (mut sb, e) = sandbox(&[ADD_ONE, DEEP, NO_STACK, SELF_WRITE]);
    let mut b = [0u8; 16];
    for (i, what) in [(1, "deep stack"), (2, "no stack"), (3, "write to code")] {
        let err = sb
            .call(e[i], &[0; 8], &mut b, sandbox::TIME_LIMIT)
            .expect_err(what);
        assert!(
            matches!(err, SandboxError::Fault { vector: 14, .. }),
            "{what}: {err}"
        );
        // The sandbox goes on, its code as it was.
        sb.call(e[0], &7u64.to_le_bytes(), &mut b, sandbox::TIME_LIMIT)
            .unwrap_or_else(|e| panic!("after {what}: {e}"));
        assert_eq!(u64::from_le_bytes(b[8..].try_into().expect("8")), 8);
    }
}

#[test]
fn the_function_runs_in_user_mode_privileged_instructions_fault() {
    // mov rax, cr3 / cli / hlt: each a #GP in user mode, none in kernel mode.
    const CR3: &[u8] = &[0x0f, 0x20, 0xd8, 0xc3];
    const CLI: &[u8] = &[0xfa, 0xc3];
    const HLT: &[u8] = &[0xf4, 0xc3];
    let (mut sb, e) = sandbox(&[ADD_ONE, CR3, CLI, HLT]);
    let mut b = [0u8; 16];
    for i in 1..=3 {
        let err = sb
            .call(e[i], &[0; 8], &mut b, sandbox::TIME_LIMIT)
            .expect_err("a privileged instruction faults");
        match err {
            SandboxError::Fault { vector, rip, .. } => {
                assert_eq!((vector, rip), (13, e[i]), "piece {i}")
            }
            other => panic!("piece {i}: not a fault: {other}"),
        }
        sb.call(e[0], &1u64.to_le_bytes(), &mut b, sandbox::TIME_LIMIT)
            .expect("the sandbox goes on");
        assert_eq!(u64::from_le_bytes(b[8..].try_into().expect("8")), 2);
    }
}

#[test]
fn oversized_buffers_and_entries_outside_the_code_are_refused() {
    let (mut sb, e) = sandbox(&[ADD_ONE]);
    let big = vec![0u8; sandbox::ARG_MAX as usize + 1];
    let mut b = [0u8; 16];
    assert!(matches!(
        sb.call(e[0], &big, &mut b, sandbox::TIME_LIMIT),
        Err(SandboxError::TooBig(_))
    ));
    assert!(sb
        .call(CODE_VA + 0x10000, &[0; 8], &mut b, sandbox::TIME_LIMIT)
        .is_err());
}
