//! KVM's dirty log of guest RAM on the host's /dev/kvm (the pointer scan
//! of a data change's retirement scans again only the pages it names):
//! the pages the test kernel writes are in it, reading it clears it, a
//! slot change makes it unknown rather than wrong (once), what the VMM
//! writes for the guest on a read-only page is in it too, it is not
//! turned on twice, and it can be turned off.

use std::sync::Arc;
use std::time::Duration;

use vmm_core::devices::{SerialCapture, SerialSink};
use vmm_core::guest::{Guest, Paused};
use vmm_core::write_control::{Access, Protection};
use vmm_core::{Vm, VmConfig};

/// Guest-physical address of the test kernel's symbol `name` (its image is
/// mapped at 0xffffffff80000000 + its physical address).
fn gpa_of(name: &str) -> u64 {
    let elf = std::fs::read(env!("LUCOS_TESTKERNEL")).expect("test kernel");
    let elf = goblin::elf::Elf::parse(&elf).expect("ELF");
    let s = elf
        .syms
        .iter()
        .find(|s| elf.strtab.get_at(s.st_name) == Some(name))
        .unwrap_or_else(|| panic!("no {name}"));
    s.st_value - 0xffff_ffff_8000_0000
}

#[test]
fn the_dirty_log_names_the_pages_the_guest_wrote_and_only_them() {
    let serial = Arc::new(SerialCapture::default());
    let vm = Vm::create(VmConfig {
        kernel: env!("LUCOS_TESTKERNEL").into(),
        initrd: None,
        cmdline: "tasks=2 iters=0 report=50".into(),
        vcpus: 2,
        mem_bytes: 64 << 20,
        serial: SerialSink::new(false, None, Some(serial.clone())),
    })
    .expect("create VM");
    vm.start().expect("start");
    let report = |n: usize| {
        assert!(
            serial.wait_for_count("[tk] task", n, Duration::from_secs(60)),
            "{n} task reports not seen:\n{}",
            serial.text()
        )
    };
    report(2);
    // Off: nothing is known.
    assert_eq!(Guest::dirty_pages(&vm).expect("read"), None);
    Guest::set_dirty_log(&vm, true).expect("on");
    let seen = serial.text().matches("[tk] task").count();
    // The tasks update the stats table, and report, after the log started.
    report(seen + 4);
    let pages = Guest::dirty_pages(&vm)
        .expect("read")
        .expect("known while on");
    let table = gpa_of("stats_table") & !0xfff;
    assert!(pages.contains(&table), "{table:#x} not in {pages:x?}");
    let ram: u64 = vm.ram_ranges().iter().map(|r| r.1).sum();
    assert!(
        (pages.len() as u64) < ram / 4096 / 2,
        "{} of {} pages written",
        pages.len(),
        ram / 4096
    );
    // Paused, the guest writes nothing: a read after a read is empty.
    {
        let paused = Paused::new(&vm).expect("pause");
        let _ = Guest::dirty_pages(&vm).expect("read");
        assert_eq!(Guest::dirty_pages(&vm).expect("read"), Some(Vec::new()));
        // A slot change loses what KVM logged for the slots it replaced:
        // unknown, not empty. Protected: 8 bytes of the stats table's page
        // no task writes (task 7's last member; 2 tasks run), so the tasks'
        // updates of the table are trapped and written by the VMM.
        let unused = gpa_of("stats_table") + 8 * 32 - 8;
        assert_eq!(unused & !0xfff, table, "the table spans two pages");
        let p = Protection {
            owner: "test".into(),
            label: "a page".into(),
            gpa: unused,
            len: 8,
            access: Access::Trapped,
        };
        paused.change_protection(&[], &[p]).expect("protect");
        assert_eq!(Guest::dirty_pages(&vm).expect("read"), None);
        assert_eq!(Guest::dirty_pages(&vm).expect("read"), Some(Vec::new()));
        drop(paused);
    }
    // The table's page is a read-only slot now, which KVM does not log:
    // the VMM's writes for the guest are in the log all the same.
    let seen = serial.text().matches("[tk] task").count();
    report(seen + 4);
    let pages = Guest::dirty_pages(&vm).expect("read").expect("known");
    assert!(pages.contains(&table), "{table:#x} not in {pages:x?}");
    assert!(vm.write_control().stats().allowed > 0);
    {
        let paused = Paused::new(&vm).expect("pause");
        paused
            .change_protection(&["test".to_owned()], &[])
            .expect("release");
        drop(paused);
    }
    // On while on is refused (two readers would clear each other's log);
    // off, then on again: an empty log; then off.
    assert!(Guest::set_dirty_log(&vm, true).is_err());
    Guest::set_dirty_log(&vm, false).expect("off");
    Guest::set_dirty_log(&vm, true).expect("on again");
    let seen = serial.text().matches("[tk] task").count();
    report(seen + 2);
    let pages = Guest::dirty_pages(&vm).expect("read").expect("known");
    assert!(pages.contains(&table), "{table:#x} not in {pages:x?}");
    Guest::set_dirty_log(&vm, false).expect("off");
    assert_eq!(Guest::dirty_pages(&vm).expect("read"), None);
    report(serial.text().matches("[tk] task").count() + 2);
}
