//! Booting the test kernel on /dev/kvm with 1 and 2 vCPUs.

mod common;

use std::time::Duration;

use common::boot;
use vmm_core::ExitReason;

fn run_to_completion(vcpus: u8, iters: u64) {
    let t = boot(vcpus, &format!("iters={iters} report=500"));
    let reason =
        t.vm.wait_timeout(Duration::from_secs(120))
            .unwrap_or_else(|| panic!("guest did not finish; output:\n{}", t.serial.text()));
    let out = t.serial.text();
    assert_eq!(
        reason,
        ExitReason::GuestExit { status: 0 },
        "output:\n{out}"
    );
    t.assert_no_crash();
    assert!(out.contains(&format!("cpus={vcpus} mem=64M")), "{out}");
    for cpu in 0..vcpus {
        assert!(out.contains(&format!("[tk] cpu {cpu} online")), "{out}");
        // Each task ran on its own CPU, made every call, and saw the timer tick.
        assert!(
            out.contains(&format!(
                "[tk] stat task={cpu} cpu={cpu} calls={iters} last={iters}"
            )),
            "{out}"
        );
        let ticks: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("[tk] cpu {cpu} ticks=")))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no tick count for cpu {cpu}:\n{out}"));
        assert!(ticks > 0, "cpu {cpu} saw no timer interrupts:\n{out}");
        assert!(
            out.contains(&format!("[tk] task {cpu} cpu {cpu} iter {iters} counter")),
            "{out}"
        );
    }
    // Every iteration of every task bumped the shared counter exactly once.
    let total = iters * u64::from(vcpus);
    assert!(
        out.contains(&format!("[tk] done tasks={vcpus} counter={total} ")),
        "{out}"
    );
    assert!(out.contains("version testkernel 1.0"), "{out}");
}

#[test]
fn boots_one_vcpu_and_runs_user_tasks() {
    run_to_completion(1, 1500);
}

#[test]
fn boots_two_vcpus_and_runs_user_tasks_on_both() {
    run_to_completion(2, 1500);
}

#[test]
fn stop_from_outside_ends_an_idle_guest() {
    // tasks=0: nothing ever finishes; the guest is stopped from outside instead.
    let t = boot(2, "tasks=0");
    t.expect_serial("starting 0 tasks", 30);
    t.vm.stop();
    assert_eq!(t.vm.wait(), ExitReason::Stopped);
}
