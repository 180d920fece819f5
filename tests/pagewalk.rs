//! The guest page-table walker against the test kernel's own page tables:
//! the mappings the kernel reports it made, and the ELF image's layout.

mod common;

use common::boot;
use vmm_core::pagewalk::{PageSize, WalkError};
use vmm_core::VmError;

fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("bad hex '{s}'"))
}

#[test]
fn walker_agrees_with_the_kernels_own_mappings() {
    let t = boot(2, "selftest iters=0 report=0");
    t.expect_serial("starting 2 tasks", 30);
    let out = t.serial.text();
    t.vm.pause().expect("pause");

    let mut checked = 0;
    for line in out.lines().filter_map(|l| l.strip_prefix("[tk] map ")) {
        // "<what> va=<hex> pa=<hex> size=<4k|2m|1g>"
        let f: Vec<&str> = line.split_whitespace().collect();
        let va = parse_hex(f[1].trim_start_matches("va="));
        let pa = parse_hex(f[2].trim_start_matches("pa="));
        let size = match f[3].trim_start_matches("size=") {
            "4k" => PageSize::Size4K,
            "2m" => PageSize::Size2M,
            "1g" => PageSize::Size1G,
            other => panic!("bad size {other}"),
        };
        for vcpu in 0..2 {
            let tr =
                t.vm.translate(vcpu, va)
                    .unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(tr.gpa, pa, "{line} via vCPU {vcpu}");
            assert_eq!(tr.page_size, size, "{line}");
            assert_eq!(tr.user, f[0].starts_with("user"), "{line}");
        }
        checked += 1;
    }
    assert_eq!(checked, 5, "expected 5 mapping lines in:\n{out}");

    let mut unmapped = 0;
    for line in out.lines().filter_map(|l| l.strip_prefix("[tk] unmapped ")) {
        let va = parse_hex(line.split("va=").nth(1).expect("va"));
        match t.vm.translate(0, va) {
            Err(VmError::Walk(WalkError::NotPresent { gva, .. })) => assert_eq!(gva, va),
            other => panic!("{line}: expected not-present, got {other:?}"),
        }
        unmapped += 1;
    }
    assert_eq!(unmapped, 3);

    // Independently of what the kernel prints: every kernel symbol translates to
    // its ELF load address (virtual - 0xffffffff80000000), and the walker's
    // reading of guest RAM there matches the ELF file's bytes.
    let elf = std::fs::read(common::test_kernel()).expect("kernel");
    for name in [
        "lucos_version",
        "counter_next",
        "stats_update",
        "kmain",
        "syscall_dispatch",
    ] {
        let sym = t.symbols.lookup(name).expect("symbol");
        let tr = t.vm.translate(1, sym.addr).expect("translate");
        assert_eq!(tr.gpa, sym.addr - 0xffff_ffff_8000_0000, "{name}");
        assert!(!tr.user && !tr.no_execute, "{name} is kernel code");
        let mut guest = [0u8; 16];
        t.vm.ram().read(tr.gpa, &mut guest).expect("read");
        let file_off = common::file_offset_of_paddr(&elf, tr.gpa);
        assert_eq!(&guest, &elf[file_off..file_off + 16], "{name} bytes");
        // Compiled like Linux: a 5-byte nop at entry.
        assert_eq!(
            &guest[..5],
            &[0x0f, 0x1f, 0x44, 0x00, 0x00],
            "{name} has no fentry nop"
        );
    }
    let progress = t.symbols.lookup("user_progress").expect("user_progress");
    let tr =
        t.vm.translate(0, progress.addr)
            .expect("translate user data");
    assert_eq!(tr.gpa, 0x180_0000 + (progress.addr - 0x40_0000));
    assert!(tr.user && tr.writable && tr.no_execute);
    t.vm.resume().expect("resume");
}
