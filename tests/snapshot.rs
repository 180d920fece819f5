//! Machine state saved from one KVM VM and loaded into another built over
//! the same guest memory (what `lucos upgrade` does across processes, here
//! within one): the test kernel's tasks go on where they were.

mod common;

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use std::sync::Arc;

use common::boot;
use vmm_core::devices::{SerialCapture, SerialSink};
use vmm_core::Vm;

fn dup(fd: i32) -> File {
    // SAFETY: `fd` is a memfd the VM keeps open while this runs; dup gives a
    // new descriptor this File owns.
    let new = unsafe { libc::dup(fd) };
    assert!(new >= 0, "dup: {}", std::io::Error::last_os_error());
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    File::from(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Hands `old`'s guest to a new VM and returns it, running.
fn hand_over(old: &Vm, serial: &Arc<SerialCapture>) -> Vm {
    old.pause_for_save().expect("pause");
    let st = old.save_machine().expect("save");
    let [ram, area] = old.memfds();
    let json = serde_json::to_vec(&st).expect("serialize");
    let st: vmm_core::snapshot::MachineState = serde_json::from_slice(&json).expect("parse");
    let new = Vm::adopt(
        old.ram().size(),
        dup(ram),
        dup(area),
        old.area_gpa(),
        old.vcpu_count(),
        SerialSink::new(false, None, Some(serial.clone())),
        old.cpuid_entries(),
    )
    .expect("adopt");
    new.load_machine(&st).expect("load");
    old.forget_serial_pending();
    old.stop();
    old.wait();
    new.start().expect("start");
    new
}

#[test]
fn a_guest_handed_from_vm_to_vm_200_times_keeps_its_tasks_timer_and_serial() {
    let mut t = boot(2, "tasks=2 iters=0 report=200");
    t.expect_serial("starting 2 tasks", 30);
    let jiffies = t.sym("jiffies");
    let mut last = [t.task_calls(0), t.task_calls(1)];
    let mut ticks = t.read_kernel_u64(jiffies);
    for i in 0..200 {
        let serial = t.serial.clone();
        let mut new = hand_over(&t.vm, &serial);
        std::mem::swap(&mut t.vm, &mut new);
        drop(new);
        // The tasks and the timer go on in the new VM.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = [t.task_calls(0), t.task_calls(1)];
            let j = t.read_kernel_u64(jiffies);
            assert!(now[0] >= last[0] && now[1] >= last[1], "went backwards");
            assert!(j >= ticks, "jiffies went backwards");
            if now[0] > last[0] && now[1] > last[1] && j > ticks {
                last = now;
                ticks = j;
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "handover {i}: no progress: tasks {now:?} (were {last:?}), jiffies {j} (was {ticks})\n{}",
                t.serial.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    t.assert_no_crash();
    let end = last[0].min(last[1]) / 200;
    assert!(
        t.serial
            .wait_for_count(" iter ", end as usize * 2 + 10, Duration::from_secs(60)),
        "report lines stopped:\n{}",
        t.serial.text()
    );
    // Serial output: every task's report lines in order, none lost or repeated.
    let text = t.serial.text();
    for task in 0..2 {
        let iters: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("[tk] task {task} cpu ")))
            .filter_map(|l| l.split(" iter ").nth(1))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect();
        assert!(iters.len() > 2, "task {task}: {iters:?}\n{text}");
        for (k, w) in iters.windows(2).enumerate() {
            assert_eq!(w[1], w[0] + 200, "task {task}, line {k}: {iters:?}");
        }
    }
    // Every update of the kernel's statistics made, none lost or made
    // twice: each report's count and sum are the task's own.
    for l in text.lines().filter(|l| l.contains(" stats calls=")) {
        let field = |k: &str| -> u64 {
            l.split(k)
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {l}"))
        };
        let (iter, calls, sum, lost) = (
            field(" iter "),
            field(" calls="),
            field(" sum="),
            field(" lost="),
        );
        assert_eq!((calls, lost), (iter, 0), "{l}");
        assert_eq!(sum, iter * (iter + 1) / 2, "{l}");
    }
}

#[test]
fn memory_smaller_than_the_state_says_is_refused_by_name() {
    common::require_kvm();
    let small = vmm_core::memory::new_memfd(c"small-ram", 16 << 20).expect("memfd");
    let area =
        vmm_core::memory::new_memfd(c"area", vmm_core::region::PATCH_AREA_BYTES).expect("memfd");
    let e = Vm::adopt(
        64 << 20,
        small,
        area,
        1 << 32,
        1,
        SerialSink::default(),
        &[],
    )
    .expect_err("16 MiB of RAM for a 64 MiB VM");
    assert!(
        e.to_string().contains("the RAM memfd holds 16777216 bytes"),
        "{e}"
    );
}
