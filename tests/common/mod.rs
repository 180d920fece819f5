//! Shared helpers for the integration tests: boot the bundled test kernel
//! in-process on /dev/kvm, and read its symbols.
#![allow(dead_code)]

pub mod bench;
pub mod cli;
pub mod diffs;
pub mod linux;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use symbol_db::SymbolTable;
use vmm_core::devices::{SerialCapture, SerialSink};
use vmm_core::{Vm, VmConfig};

/// The test kernel built by build.rs.
pub fn test_kernel() -> PathBuf {
    PathBuf::from(env!("LUCOS_TESTKERNEL"))
}

/// Fails loudly when the host has no usable /dev/kvm: these tests must not pass by skipping.
pub fn require_kvm() {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = f {
        panic!(
            "this test needs /dev/kvm (read-write) and cannot run without it: {e}. \
             It is not skipped on purpose: a host without KVM cannot show that lucos works."
        );
    }
}

/// A booted test-kernel VM with its serial output captured.
pub struct TestVm {
    pub vm: Vm,
    pub serial: Arc<SerialCapture>,
    pub symbols: SymbolTable,
}

/// Boots the test kernel with `vcpus` vCPUs and `cmdline`.
pub fn boot(vcpus: u8, cmdline: &str) -> TestVm {
    require_kvm();
    let serial = Arc::new(SerialCapture::default());
    let vm = Vm::create(VmConfig {
        kernel: test_kernel(),
        initrd: None,
        cmdline: cmdline.into(),
        vcpus,
        mem_bytes: 64 << 20,
        serial: SerialSink::new(false, None, Some(serial.clone())),
    })
    .expect("create VM");
    vm.start().expect("start VM");
    let symbols = SymbolTable::from_elf_file(&test_kernel()).expect("test kernel symbols");
    TestVm {
        vm,
        serial,
        symbols,
    }
}

impl TestVm {
    /// Waits for `needle` in the serial output, or panics showing the output.
    pub fn expect_serial(&self, needle: &str, secs: u64) {
        if !self.serial.wait_for(needle, Duration::from_secs(secs)) {
            panic!(
                "'{needle}' not seen in {secs} s; serial output:\n{}",
                self.serial.text()
            );
        }
    }

    /// Address of a global symbol.
    pub fn sym(&self, name: &str) -> u64 {
        self.symbols.lookup(name).expect("symbol").addr
    }

    /// Reads a u64 at a kernel-map virtual address (0xffffffff80000000 + physical).
    pub fn read_kernel_u64(&self, va: u64) -> u64 {
        self.vm
            .ram()
            .read_u64(va - 0xffff_ffff_8000_0000)
            .expect("read guest memory")
    }

    /// `calls` of stats_table[task] (struct task_stat: u32 id, u32 cpu, u32 calls, ...).
    pub fn task_calls(&self, task: u64) -> u64 {
        self.read_kernel_u64(self.sym("stats_table") + task * 32 + 8) & 0xffff_ffff
    }

    /// The serial output must show no fault or panic.
    pub fn assert_no_crash(&self) {
        let out = self.serial.text();
        assert!(
            !out.contains("EXCEPTION") && !out.contains("PANIC"),
            "guest crashed:\n{out}"
        );
    }
}

/// File offset of virtual address `va` in an ELF image, from its program headers.
pub fn file_offset_of_vaddr(elf: &[u8], va: u64) -> usize {
    file_offset(elf, va, |p| p.p_vaddr)
}

/// File offset of physical (load) address `pa` in an ELF image.
pub fn file_offset_of_paddr(elf: &[u8], pa: u64) -> usize {
    file_offset(elf, pa, |p| p.p_paddr)
}

fn file_offset(elf: &[u8], addr: u64, base: fn(&goblin::elf::ProgramHeader) -> u64) -> usize {
    let parsed = goblin::elf::Elf::parse(elf).expect("ELF");
    let ph = parsed
        .program_headers
        .iter()
        .find(|p| {
            p.p_type == goblin::elf::program_header::PT_LOAD
                && addr >= base(p)
                && addr < base(p) + p.p_filesz
        })
        .expect("segment holding the address");
    (ph.p_offset + (addr - base(ph))) as usize
}

/// Writes to `out` the test kernel with another build-id (its `.notes`
/// replaced): the same code, another build.
pub fn kernel_of_another_build(out: &std::path::Path) {
    let mut note = Vec::new();
    for w in [4u32, 20, 3] {
        note.extend_from_slice(&w.to_le_bytes());
    }
    note.extend_from_slice(b"GNU\0");
    note.extend_from_slice(&[0x5a; 20]);
    let note_file = out.with_extension("note");
    std::fs::write(&note_file, note).expect("note");
    let ok = std::process::Command::new("objcopy")
        .arg(format!("--update-section=.notes={}", note_file.display()))
        .arg(test_kernel())
        .arg(out)
        .status()
        .expect("objcopy")
        .success();
    assert!(ok, "objcopy of the test kernel");
}

/// Writes to `out` the test kernel with one byte of `function` (at
/// `offset` into it) flipped: a kernel whose old bytes differ.
pub fn kernel_with_altered(out: &std::path::Path, function: &str, offset: u64) {
    let mut k = std::fs::read(test_kernel()).expect("kernel");
    let syms = SymbolTable::from_elf_bytes(&k, "k").expect("syms");
    let f = syms.lookup(function).expect("symbol");
    let off = file_offset_of_vaddr(&k, f.addr + offset);
    k[off] ^= 0xff;
    std::fs::write(out, &k).expect("write");
}
