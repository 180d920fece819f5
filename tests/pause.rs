//! Pausing the test kernel anywhere: under load on every vCPU, in user mode,
//! in kernel mode with interrupts off, and halted; registers while paused.

mod common;

use std::time::Duration;

use common::{boot, TestVm};

const USER_BASE: u64 = 0x40_0000;

fn progress(t: &TestVm, tasks: u64) -> Vec<u64> {
    (0..tasks).map(|i| t.task_calls(i)).collect()
}

#[test]
fn pause_resume_1000_times_under_load_on_two_vcpus() {
    let t = boot(2, "iters=0 report=0 work=200");
    t.expect_serial("starting 2 tasks", 30);
    let start = progress(&t, 2);
    let mut frozen_checked = 0;
    for i in 0..1000 {
        t.vm.pause().unwrap_or_else(|e| panic!("pause {i}: {e}"));
        assert!(t.vm.is_paused());
        if i % 100 == 0 {
            // While paused, nothing in the guest moves.
            let a = progress(&t, 2);
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(a, progress(&t, 2), "guest made progress while paused");
            frozen_checked += 1;
        }
        t.vm.resume().unwrap_or_else(|e| panic!("resume {i}: {e}"));
        // Let the guest run a little between pauses.
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(frozen_checked, 10);
    // The tasks kept going through all of it, and keep going after.
    let mid = progress(&t, 2);
    std::thread::sleep(Duration::from_millis(300));
    let end = progress(&t, 2);
    for task in 0..2 {
        assert!(
            mid[task] > start[task],
            "task {task} made no progress during the pauses"
        );
        assert!(
            end[task] > mid[task],
            "task {task} stopped after the pauses"
        );
    }
    t.assert_no_crash();
    assert!(
        t.vm.control().exit_reason().is_none(),
        "VM ended: {:?}",
        t.vm.control().exit_reason()
    );
}

/// Pauses repeatedly until `want` holds for some vCPU's (regs, sregs); returns them.
fn pause_until(
    t: &TestVm,
    tries: usize,
    want: impl Fn(&kvm_bindings::kvm_regs, &kvm_bindings::kvm_sregs) -> bool,
) -> (u8, kvm_bindings::kvm_regs, kvm_bindings::kvm_sregs) {
    for _ in 0..tries {
        t.vm.pause().expect("pause");
        for v in 0..t.vm.vcpu_count() {
            let r = t.vm.regs(v).expect("regs");
            let s = t.vm.sregs(v).expect("sregs");
            if want(&r, &s) {
                return (v, r, s);
            }
        }
        t.vm.resume().expect("resume");
        std::thread::sleep(Duration::from_micros(500));
    }
    panic!(
        "no vCPU reached the wanted state in {tries} pauses:\n{}",
        t.serial.text()
    );
}

#[test]
fn registers_while_paused_in_user_mode() {
    let t = boot(2, "iters=0 mode=user report=0 work=100000");
    t.expect_serial("starting 2 tasks", 30);
    let user_main = t.symbols.lookup("user_main").expect("user_main");
    let (v, r, s) = pause_until(&t, 500, |_, s| s.cs.selector & 3 == 3);
    assert_eq!(s.cs.selector, 0x33, "64-bit user code segment");
    assert!(
        user_main.contains(r.rip),
        "vCPU {v} paused in user mode at {:#x}, outside user_main {:#x}+{:#x}",
        r.rip,
        user_main.addr,
        user_main.size
    );
    // A task's stack is the 16 KiB below its top (0x800000 for task 0, guard pages between);
    // at user_main's first instruction RSP equals the top.
    assert!(
        r.rsp <= 0x80_0000 && r.rsp > 0x70_0000,
        "user stack: {:#x}",
        r.rsp
    );
    assert_ne!(r.rflags & 0x200, 0, "interrupts are on in user mode");
    // The walker agrees with the kernel's user mapping of that RIP.
    let tr = t.vm.translate(v, r.rip).expect("translate user rip");
    assert_eq!(tr.gpa, 0x180_0000 + (r.rip - USER_BASE));
    assert!(tr.user);
    t.vm.resume().expect("resume");
    t.assert_no_crash();
}

#[test]
fn registers_while_paused_in_kernel_mode_with_interrupts_off() {
    // Each iteration spins in the kernel with interrupts off (SYS_SPIN_CLI).
    let t = boot(2, "iters=0 mode=spin spin=20000 report=0 work=0");
    t.expect_serial("starting 2 tasks", 30);
    // Catch a vCPU inside the service, which runs with interrupts off.
    let service = t.symbols.lookup("syscall_dispatch").expect("sym").clone();
    let (v, r, s) = pause_until(&t, 500, |r, s| {
        s.cs.selector & 3 == 0 && service.contains(r.rip)
    });
    assert_eq!(s.cs.selector, 0x10, "kernel code segment");
    assert_eq!(
        r.rflags & 0x200,
        0,
        "vCPU {v} in the service with interrupts on"
    );
    assert!(!t.vm.translate(v, r.rip).expect("kernel rip maps").user);
    assert!(r.rsp >= t.sym("boot_stacks") && r.rsp < t.sym("boot_stacks") + 8 * 16384);
    t.vm.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(100));
    t.assert_no_crash();
}

#[test]
fn halted_vcpu_pauses_and_register_writes_stick() {
    // One task on two vCPUs: vCPU 1 sits in the idle loop (sti; hlt).
    let t = boot(2, "tasks=1 iters=0 report=0");
    t.expect_serial("starting 1 tasks", 30);
    std::thread::sleep(Duration::from_millis(50));
    let idle = t.symbols.lookup("cpu_idle").expect("cpu_idle").clone();
    let (v, r, s) = pause_until(&t, 200, |r, s| {
        s.cs.selector & 3 == 0 && idle.contains(r.rip)
    });
    assert_eq!(v, 1, "only vCPU 1 is idle");
    assert_eq!(s.cs.selector, 0x10);
    assert_ne!(
        r.rflags & 0x200,
        0,
        "halted with interrupts on, waiting for the timer"
    );
    // Write a register the idle loop never touches; it survives running.
    let mut regs = t.vm.regs(1).expect("regs");
    regs.r15 = 0x1ce_c0de;
    t.vm.set_regs(1, &regs).expect("set_regs");
    assert_eq!(t.vm.regs(1).expect("regs").r15, 0x1ce_c0de);
    t.vm.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(50));
    t.vm.pause().expect("pause");
    assert_eq!(t.vm.regs(1).expect("regs").r15, 0x1ce_c0de);
    t.vm.resume().expect("resume");
    t.assert_no_crash();
}

#[test]
fn pause_state_errors() {
    let t = boot(1, "iters=0 report=0");
    t.expect_serial("starting 1 tasks", 30);
    assert!(
        t.vm.regs(0).is_err(),
        "registers must not be readable while running"
    );
    assert!(t.vm.resume().is_err(), "resume of a running VM");
    t.vm.pause().expect("pause");
    assert!(t.vm.pause().is_err(), "double pause");
    assert!(t.vm.regs(7).is_err(), "no vCPU 7");
    t.vm.resume().expect("resume");
}
