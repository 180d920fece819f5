//! The patcher against an in-memory guest (no KVM): a kernel whose text is
//! two functions mapped through real 4-level page tables, a patch area,
//! and vCPUs whose state each pause is scripted. Stacking, replacing and
//! reverting byte for byte; a vCPU held in old code for some pauses; every
//! refusal leaving all of memory identical; nothing written to guest RAM
//! outside a pause; the patch state surviving a round trip.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use symbol_db::{KernelIdentity, Symbol, SymbolKind, SymbolTable};
use update_engine::kernel::{GuestKernel, Timings};
use update_engine::lup::{old_code_sha256, sha256_hex, Mode};
use update_engine::patcher::{PatchError, PatchState, Patcher, TEXT_RELAY_OWNER};
use update_engine::{FunctionPatch, Lup, Manifest, SigningKey, UpdateError};
use vmm_core::guest::{AreaInfo, Guest, PauseToken, PhysMemory, VcpuState};
use vmm_core::memory::MemoryError;
use vmm_core::pagewalk::PagingState;
use vmm_core::vm::VmError;
use vmm_core::write_control::{Access, ProtectError, Protection};

const RAM: usize = 8 << 20;
const PML4: u64 = 0x10_000;
const PDPT: u64 = 0x11_000;
const PD: u64 = 0x12_000;
/// Kernel text: 2 MiB at guest-physical 2 MiB, virtual 0xffffffff81000000.
const TEXT_GPA: u64 = 0x20_0000;
const TEXT: u64 = 0xffff_ffff_8100_0000;
const STACK_GPA: u64 = 0x40_0000;
const STACK: u64 = TEXT + (STACK_GPA - TEXT_GPA);
const AREA_GPA: u64 = 1 << 32;
const AREA_SIZE: u64 = 2 << 20;
/// The two functions, and their bytes: nop5 (the fentry site), mov eax, N; ret.
const ALPHA: u64 = TEXT + 0x100;
const BETA: u64 = TEXT + 0x200;
/// The kernel's exception-table search and its search of one table.
const SEARCH_TABLES: u64 = TEXT + 0x300;
const SEARCH_EXTABLE: u64 = TEXT + 0x400;
const FN_SIZE: u64 = 32;
/// Where the area gets mapped: the top 2 MiB of the kernel window.
const AREA_VA: u64 = 0xffff_ffff_bfe0_0000;
const PDE_AREA_AT: u64 = PD + 511 * 8;

fn function_bytes(n: u8) -> Vec<u8> {
    let mut b = vec![0xcc; FN_SIZE as usize];
    b[..11].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0xb8, n, 0, 0, 0, 0xc3]);
    b
}

/// What vCPU `v` shows in pause number `n` (1-based).
type Script = Box<dyn Fn(u8, u32) -> VcpuState + Send + Sync>;

struct Fake {
    ram: Mutex<Vec<u8>>,
    area: Mutex<Vec<u8>>,
    paused: AtomicBool,
    pauses: AtomicU32,
    /// RAM writes made while not paused.
    unpaused_writes: Mutex<Vec<u64>>,
    script: Mutex<Script>,
    /// Bytes the guest writes just before a later pause lands (as if it
    /// ran text_poke while the patcher was planning): pauses to let pass
    /// first, where, what.
    before_pause: Mutex<Option<(u32, u64, Vec<u8>)>>,
    /// Write control: the protected ranges.
    protected: Mutex<Vec<Protection>>,
    /// Write control refuses the next change (as KVM refusing a slot would).
    fail_protect: AtomicU32,
}

fn paging() -> PagingState {
    PagingState {
        cr0: 0x8000_0011,
        cr3: PML4,
        cr4: 0x20,
        efer: 0x500,
    }
}

fn user() -> VcpuState {
    VcpuState {
        rip: 0x40_1000,
        rsp: 0x7f_0000,
        cpl: 3,
        paging: paging(),
        gprs: [0; 16],
        tr_base: 0,
    }
}

fn kernel_at(rip: u64, rsp: u64) -> VcpuState {
    VcpuState {
        rip,
        rsp,
        cpl: 0,
        paging: paging(),
        gprs: [0; 16],
        tr_base: 0,
    }
}

impl Fake {
    fn new() -> Self {
        let mut ram = vec![0u8; RAM];
        let mut put = |gpa: u64, v: u64| {
            ram[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(PML4 + 511 * 8, PDPT | 3);
        put(PDPT + 510 * 8, PD | 3);
        // Text and a kernel stack page, 2 MiB pages, read-only text.
        put(PD + 8 * 8, TEXT_GPA | 0x81);
        put(PD + 9 * 8, STACK_GPA | 0x83);
        for (va, n) in [
            (ALPHA, 1),
            (BETA, 7),
            (SEARCH_TABLES, 3),
            (SEARCH_EXTABLE, 4),
        ] {
            let at = (TEXT_GPA + (va - TEXT)) as usize;
            ram[at..at + FN_SIZE as usize].copy_from_slice(&function_bytes(n));
        }
        Fake {
            ram: Mutex::new(ram),
            area: Mutex::new(vec![0u8; AREA_SIZE as usize]),
            paused: AtomicBool::new(false),
            pauses: AtomicU32::new(0),
            unpaused_writes: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(|_, _| user())),
            before_pause: Mutex::new(None),
            protected: Mutex::new(Vec::new()),
            fail_protect: AtomicU32::new(0),
        }
    }

    fn script(&self, s: impl Fn(u8, u32) -> VcpuState + Send + Sync + 'static) {
        *self.script.lock().expect("lock") = Box::new(s);
        self.pauses.store(0, Ordering::SeqCst);
    }

    /// The guest writes `bytes` at `gpa` just before the pause that follows
    /// the next `skip` pauses.
    fn arm_after_pauses(&self, skip: u32, gpa: u64, bytes: Vec<u8>) {
        *self.before_pause.lock().expect("lock") = Some((skip, gpa, bytes));
    }

    fn read(&self, va: u64, n: usize) -> Vec<u8> {
        let at = (TEXT_GPA + (va - TEXT)) as usize;
        self.ram.lock().expect("lock")[at..at + n].to_vec()
    }

    fn u64_at(&self, gpa: u64) -> u64 {
        let r = self.ram.lock().expect("lock");
        u64::from_le_bytes(r[gpa as usize..gpa as usize + 8].try_into().expect("8"))
    }

    /// SHA-256 of all of RAM and of the patch area.
    fn hash(&self) -> (String, String) {
        (
            sha256_hex(&self.ram.lock().expect("lock")),
            sha256_hex(&self.area.lock().expect("lock")),
        )
    }

    fn kernel(&self) -> GuestKernel {
        let sym = |name: &str, addr: u64, size: u64| Symbol {
            name: name.into(),
            addr,
            size,
            kind: SymbolKind::Function,
            ty: 't',
            global: false,
            file: Some("fake.c".into()),
            position: 0,
        };
        GuestKernel {
            source: "the fake guest".into(),
            symbols: SymbolTable::from_symbols(vec![
                sym("_stext", TEXT, 0),
                sym("alpha", ALPHA, FN_SIZE),
                sym("beta", BETA, FN_SIZE),
                sym("search_exception_tables", SEARCH_TABLES, FN_SIZE),
                sym("search_extable", SEARCH_EXTABLE, FN_SIZE),
                sym("_etext", TEXT + 0x1000, 0),
            ]),
            identity: identity("fake-build"),
            text: TEXT,
            slide: 0,
            text_gpa: TEXT_GPA,
            kallsyms: None,
            timings: Timings::default(),
            tasks: Err("not Linux".into()),
            cpu_caps: Err("not Linux".into()),
            log: Err("not Linux".into()),
            modules: Err("not Linux".into()),
            mode: Default::default(),
        }
    }
}

fn identity(id: &str) -> KernelIdentity {
    KernelIdentity {
        build_id: Some(id.into()),
        version: Some("fake kernel 1".into()),
    }
}

impl PhysMemory for Fake {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let r = self.ram.lock().expect("lock");
        let src = r
            .get(gpa as usize..gpa as usize + buf.len())
            .ok_or(MemoryError::OutOfRange {
                addr: gpa,
                len: buf.len(),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        if !self.paused.load(Ordering::SeqCst) {
            self.unpaused_writes.lock().expect("lock").push(gpa);
        }
        let mut r = self.ram.lock().expect("lock");
        let dst =
            r.get_mut(gpa as usize..gpa as usize + buf.len())
                .ok_or(MemoryError::OutOfRange {
                    addr: gpa,
                    len: buf.len(),
                })?;
        dst.copy_from_slice(buf);
        Ok(())
    }
}

impl Guest for Fake {
    fn ram(&self) -> &dyn PhysMemory {
        self
    }
    fn vcpu_count(&self) -> u8 {
        2
    }
    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
    fn pause_vcpus(&self) -> Result<Duration, VmError> {
        let mut armed = self.before_pause.lock().expect("lock");
        match armed.as_mut() {
            Some((0, gpa, bytes)) => {
                let mut r = self.ram.lock().expect("lock");
                r[*gpa as usize..*gpa as usize + bytes.len()].copy_from_slice(bytes);
                *armed = None;
            }
            Some((skip, _, _)) => *skip -= 1,
            None => {}
        }
        drop(armed);
        assert!(!self.paused.swap(true, Ordering::SeqCst), "paused twice");
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(Duration::from_micros(10))
    }
    fn resume_vcpus(&self) -> Result<(), VmError> {
        assert!(
            self.paused.swap(false, Ordering::SeqCst),
            "resumed a running guest"
        );
        Ok(())
    }
    fn vcpu_state(&self, _: &PauseToken, v: u8) -> Result<VcpuState, VmError> {
        assert!(self.is_paused(), "vCPU state read while running");
        let n = self.pauses.load(Ordering::SeqCst);
        Ok((self.script.lock().expect("lock"))(v, n))
    }
    fn area(&self) -> AreaInfo {
        AreaInfo {
            gpa: AREA_GPA,
            size: AREA_SIZE,
        }
    }
    fn area_write(&self, offset: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        let mut a = self.area.lock().expect("lock");
        a[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
    fn area_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let a = self.area.lock().expect("lock");
        buf.copy_from_slice(&a[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn change_protection(
        &self,
        _: &PauseToken,
        release: &[String],
        add: &[Protection],
    ) -> Result<(), ProtectError> {
        assert!(self.is_paused(), "protection changed while running");
        // Counting down: 1 fails this change, 2 the one after it.
        let n = self.fail_protect.load(Ordering::SeqCst);
        if n > 0 {
            self.fail_protect.store(n - 1, Ordering::SeqCst);
        }
        if n == 1 {
            return Err(ProtectError::Slots("slot 9 refused (test)".into()));
        }
        let mut p = self.protected.lock().expect("lock");
        p.retain(|r| !release.contains(&r.owner));
        p.extend(add.iter().cloned());
        Ok(())
    }
    fn protections(&self) -> Vec<Protection> {
        self.protected.lock().expect("lock").clone()
    }
    fn ram_ranges(&self) -> Vec<(u64, u64)> {
        vec![(0, self.ram.lock().expect("lock").len() as u64)]
    }
}

/// Patches built from C sources for the fake kernel, signed by one key.
struct Patches {
    dir: PathBuf,
    key: SigningKey,
}

impl Patches {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lucos-fake-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        Patches {
            dir,
            key: SigningKey::from_bytes(&[7u8; 32]),
        }
    }

    fn object(&self, name: &str, src: &str) -> Vec<u8> {
        let c = self.dir.join(format!("{name}.c"));
        let o = self.dir.join(format!("{name}.o"));
        std::fs::write(&c, src).expect("source");
        let st = Command::new("gcc")
            .args(["-c", "-O2", "-fno-pic", "-mcmodel=kernel", "-mno-red-zone"])
            .args([
                "-ffunction-sections",
                "-fno-asynchronous-unwind-tables",
                "-o",
            ])
            .arg(&o)
            .arg(&c)
            .status()
            .expect("gcc (scripts/setup.sh installs it)");
        assert!(st.success(), "gcc {name}.c");
        std::fs::read(&o).expect("object")
    }

    /// A patch `name` replacing `functions` (each: old name, its original
    /// return value, so its bytes are known) with `src`.
    fn build(&self, name: &str, src: &str, functions: &[(&str, u8)], depends: &[&str]) -> Lup {
        let obj = self.object(name, src);
        let functions = functions
            .iter()
            .map(|&(f, n)| FunctionPatch {
                old: f.into(),
                old_file: None,
                old_size: FN_SIZE,
                old_sha256: old_code_sha256(&function_bytes(n), &[], &[], 0).expect("hash"),
                old_masked: vec![],
                old_relocs: vec![],
                new: f.into(),
                new_object: Some(format!("{name}.o")),
                module: None,
            })
            .collect();
        Lup::new(
            Manifest {
                name: name.into(),
                description: format!("{name}, for the fake guest"),
                version: 1,
                target: identity("fake-build"),
                functions,
                depends: depends.iter().map(|d| (*d).to_owned()).collect(),
                objects: vec![format!("{name}.o")],
                mode: Mode::Consistent,
                data: vec![],
                modules: vec![],
            },
            vec![(format!("{name}.o"), obj)],
            Some(&self.key),
        )
    }

    /// [`Patches::build`], written as NAME.lup.
    fn file(&self, name: &str, src: &str, functions: &[(&str, u8)], depends: &[&str]) -> PathBuf {
        self.write(
            &self.build(name, src, functions, depends),
            &format!("{name}.lup"),
        )
    }

    fn write(&self, lup: &Lup, file: &str) -> PathBuf {
        let p = self.dir.join(file);
        std::fs::write(&p, lup.to_bytes()).expect("write .lup");
        p
    }

    fn patcher(&self) -> Patcher {
        Patcher::new(vec![self.key.verifying_key()])
    }
}

impl Drop for Patches {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fake guest, its kernel, a patcher, and patch "one" replacing alpha
/// (`return 2`), in a directory named `dir`.
fn alpha_patch(dir: &str) -> (Fake, Patches, GuestKernel, Patcher, PathBuf) {
    let (g, p) = (Fake::new(), Patches::new(dir));
    let k = g.kernel();
    let pt = p.patcher();
    let one = p.file(
        "one",
        "int alpha(void) { return 2; }\n",
        &[("alpha", 1)],
        &[],
    );
    (g, p, k, pt, one)
}

fn jmp(from: u64, to: u64) -> Vec<u8> {
    update_engine::jmp_rel32(from, to).expect("jmp").to_vec()
}

fn new_addr(r: &update_engine::patcher::PatchReport, f: &str) -> u64 {
    r.functions
        .iter()
        .find(|x| x.function == f)
        .unwrap_or_else(|| panic!("{f} not switched"))
        .new_addr
}

#[test]
fn stack_replace_and_revert_byte_for_byte_and_ram_written_only_in_pauses() {
    let (g, p) = (Fake::new(), Patches::new("stack"));
    let k = g.kernel();
    let mut pt = p.patcher();
    let original_ram = g.ram.lock().expect("lock").clone();
    let (orig_a, orig_b) = (g.read(ALPHA, 5), g.read(BETA, 5));

    let one = p.file(
        "one",
        "int alpha(void) { return 2; }\n",
        &[("alpha", 1)],
        &[],
    );
    let r1 = pt.apply(&g, &k, &one, false).expect("apply one");
    assert_eq!(r1.tries, 1);
    let a1 = new_addr(&r1, "alpha");
    // Write control: the jump's five bytes, owned by the patch.
    let alpha_gpa = TEXT_GPA + (ALPHA - TEXT);
    let beta_gpa = TEXT_GPA + (BETA - TEXT);
    // The patches' own ranges; the kernel text's relayed slot is kept
    // apart (from the first patch on, whatever is reverted).
    let relay = (TEXT_RELAY_OWNER.to_owned(), TEXT_GPA, 0x1000);
    let owned = |g: &Fake| -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = g
            .protections()
            .into_iter()
            .map(|p| (p.owner, p.gpa, p.len))
            .filter(|p| *p != relay)
            .collect();
        v.sort();
        v
    };
    let relayed = |g: &Fake| {
        g.protections()
            .iter()
            .filter(|p| p.owner == TEXT_RELAY_OWNER)
            .map(|p| (p.owner.clone(), p.gpa, p.len, p.access))
            .collect::<Vec<_>>()
    };
    assert_eq!(owned(&g), vec![("patch:one".into(), alpha_gpa, 5)]);
    assert_eq!(
        relayed(&g),
        vec![(relay.0.clone(), relay.1, relay.2, Access::Relayed)]
    );
    assert!((AREA_VA..AREA_VA + AREA_SIZE).contains(&a1), "{a1:#x}");
    assert_eq!(g.read(ALPHA, 5), jmp(ALPHA, a1));
    // The area is mapped, read-only, global, 2 MiB, by the first patch's switch.
    assert_eq!(
        g.u64_at(PDE_AREA_AT),
        AREA_GPA | update_engine::area::PDE_AREA
    );
    // The replacement's code is in the area: mov eax, 2; ret.
    let code = &g.area.lock().expect("lock")[(a1 - AREA_VA) as usize..][..16].to_vec();
    assert!(
        code.windows(6).any(|w| w == [0xb8, 2, 0, 0, 0, 0xc3]),
        "{code:02x?}"
    );

    // Stacked on top: alpha goes to two's code; one cannot be reverted under it.
    let two = p.file(
        "two",
        "int alpha(void) { return 3; }\n",
        &[("alpha", 1)],
        &["one"],
    );
    let r2 = pt.apply(&g, &k, &two, false).expect("apply two");
    let a2 = new_addr(&r2, "alpha");
    assert_eq!(
        owned(&g),
        vec![
            ("patch:one".into(), alpha_gpa, 5),
            ("patch:two".into(), alpha_gpa, 5)
        ]
    );
    assert_ne!(a1, a2);
    assert_eq!(g.read(ALPHA, 5), jmp(ALPHA, a2));
    let e = pt.revert(&g, &k, "one").expect_err("one is under two");
    assert!(e.to_string().contains("depends on 'one'"), "{e}");
    // Reverting two gives alpha back to one.
    pt.revert(&g, &k, "two").expect("revert two");
    assert_eq!(g.read(ALPHA, 5), jmp(ALPHA, a1));
    assert_eq!(owned(&g), vec![("patch:one".into(), alpha_gpa, 5)]);

    // A cumulative patch replaces the stack and covers beta too.
    let all = p.file(
        "all",
        "int alpha(void) { return 4; }\nint beta(void) { return 5; }\n",
        &[("alpha", 1), ("beta", 7)],
        &[],
    );
    let r3 = pt.apply(&g, &k, &all, true).expect("apply all --replace");
    assert_eq!(pt.applied().len(), 1);
    // The cumulative patch takes the protection over.
    assert_eq!(
        owned(&g),
        vec![
            ("patch:all".into(), alpha_gpa, 5),
            ("patch:all".into(), beta_gpa, 5)
        ]
    );
    assert_eq!(g.read(ALPHA, 5), jmp(ALPHA, new_addr(&r3, "alpha")));
    assert_eq!(g.read(BETA, 5), jmp(BETA, new_addr(&r3, "beta")));
    assert_eq!(pt.area_usage().used_bytes, pt.applied()[0].code_bytes);

    // Reverting it restores the original bytes; all RAM is as it was but
    // the area's page-directory entry (the mapping stays); no code in use.
    pt.revert(&g, &k, "all").expect("revert all");
    assert_eq!((g.read(ALPHA, 5), g.read(BETA, 5)), (orig_a, orig_b));
    assert!(owned(&g).is_empty(), "{:?}", owned(&g));
    assert_eq!(relayed(&g).len(), 1, "the text's relayed slot stays");
    let ram = g.ram.lock().expect("lock").clone();
    let differ: Vec<usize> = (0..RAM).filter(|&i| ram[i] != original_ram[i]).collect();
    assert!(
        differ
            .iter()
            .all(|&i| (PDE_AREA_AT as usize..PDE_AREA_AT as usize + 8).contains(&i)),
        "bytes changed outside the area's page-directory entry: {:x?}",
        &differ[..differ.len().min(16)]
    );
    assert_eq!(pt.area_usage().used_bytes, 0);
    assert!(
        g.unpaused_writes.lock().expect("lock").is_empty(),
        "guest RAM written while the guest ran: {:x?}",
        g.unpaused_writes.lock().expect("lock")
    );
    assert!(!g.is_paused(), "left paused");
}

#[test]
fn a_vcpu_held_in_old_code_delays_the_switch_until_it_leaves() {
    let (g, _p, k, mut pt, one) = alpha_patch("held");
    // vCPU 1 executes alpha in the first 3 pauses that look at it, then is
    // in user mode.
    let looks = AtomicU32::new(0);
    g.script(move |v, _| {
        if v == 1 && looks.fetch_add(1, Ordering::SeqCst) < 3 {
            kernel_at(ALPHA + 5, STACK + 0x1f00)
        } else {
            user()
        }
    });
    let r = pt.apply(&g, &k, &one, false).expect("apply");
    assert_eq!(r.tries, 4, "three pauses refused, the fourth switched");
    // Revert: vCPU 0 is inside a call into the patch's code for 2 pauses (a
    // return address into it on its stack), then elsewhere in the kernel.
    let ret = new_addr(&r, "alpha") + 3;
    {
        let mut ram = g.ram.lock().expect("lock");
        let at = (STACK_GPA + 0x1f08) as usize;
        ram[at..at + 8].copy_from_slice(&ret.to_le_bytes());
    }
    // vCPU 0's state is read once by the revert to learn the paging, then
    // once per switch pause.
    let looks = AtomicU32::new(0);
    g.script(move |v, _| {
        if v == 0 && (1..=2).contains(&looks.fetch_add(1, Ordering::SeqCst)) {
            kernel_at(TEXT + 0x800, STACK + 0x1f00)
        } else {
            user()
        }
    });
    let r = pt.revert(&g, &k, "one").expect("revert");
    assert_eq!(r.tries, 3);
    assert_eq!(g.read(ALPHA, 5), function_bytes(1)[..5].to_vec());
}

#[test]
fn every_refusal_leaves_all_of_memory_identical() {
    let (g, p) = (Fake::new(), Patches::new("refuse"));
    let k = g.kernel();
    let mut pt = p.patcher();
    let fix = p.build(
        "fix",
        "int alpha(void) { return 2; }\n",
        &[("alpha", 1)],
        &[],
    );
    let mut cases: Vec<(&str, PathBuf, &str)> = Vec::new();
    // Unsigned.
    let mut unsigned = p.build(
        "fix",
        "int alpha(void) { return 2; }\n",
        &[("alpha", 1)],
        &[],
    );
    unsigned.signature = None;
    cases.push((
        "unsigned",
        p.write(&unsigned, "unsigned.lup"),
        "is not signed",
    ));
    // Tampered: a byte of the signed file flipped.
    let mut bytes = fix.to_bytes();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x20;
    let tampered = p.dir.join("tampered.lup");
    std::fs::write(&tampered, bytes).expect("write");
    cases.push(("tampered", tampered, "signature does not verify"));
    // Another build.
    let mut other = fix.clone();
    other.manifest.target = identity("another-build");
    let other = Lup::new(other.manifest, other.objects, Some(&p.key));
    cases.push((
        "other build",
        p.write(&other, "other.lup"),
        "another kernel build",
    ));
    // Old bytes differ; a kernel symbol that does not exist; bigger than
    // the area; a dependency that is not applied.
    for (what, name, src, was, depends, why) in [
        ("bytes mismatch", "mism", "int alpha(void) { return 2; }\n", 9, &[][..], "alpha does not match"),
        (
            "unknown symbol",
            "unknown",
            "extern int no_such_kernel_function(void);\nint alpha(void) { return no_such_kernel_function(); }\n",
            1,
            &[],
            "no_such_kernel_function",
        ),
        (
            "area full",
            "big",
            "const char big[3 << 20] = { 1 };\nint alpha(void) { return big[12345]; }\n",
            1,
            &[],
            "the patch area is full",
        ),
        ("missing dependency", "dep", "int alpha(void) { return 2; }\n", 1, &["nothing"], "depends on 'nothing'"),
    ] {
        let lup = p.build(name, src, &[("alpha", was)], depends);
        cases.push((what, p.write(&lup, &format!("{name}.lup")), why));
    }

    let check = |pt: &mut Patcher, g: &Fake| {
        for (what, path, why) in &cases {
            let before = g.hash();
            let e = pt.apply(g, &k, path, false).expect_err(what);
            assert!(e.to_string().contains(why), "{what}: {e}");
            assert_eq!(g.hash(), before, "{what} changed guest memory");
            assert!(g.unpaused_writes.lock().expect("lock").is_empty(), "{what}");
            assert!(!g.is_paused(), "{what}: left paused");
        }
    };
    // Before any patch (the area not mapped yet) and on top of one.
    check(&mut pt, &g);
    pt.apply(&g, &k, &p.write(&fix, "fix.lup"), false)
        .expect("apply fix");
    let two = p.build("two", "int beta(void) { return 8; }\n", &[("beta", 7)], &[]);
    check(&mut pt, &g);
    // A vCPU that never leaves: refused after every try, memory identical,
    // the run of the area it would have used back as it was.
    g.script(|v, _| {
        if v == 0 {
            kernel_at(BETA + 5, STACK + 0x1f00)
        } else {
            user()
        }
    });
    let before = g.hash();
    let e = pt
        .apply(&g, &k, &p.write(&two, "two.lup"), false)
        .expect_err("busy");
    assert!(
        matches!(
            e,
            PatchError::Busy {
                tries: update_engine::switch::MAX_TRIES,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(g.hash(), before);
    // The stack's own rules.
    g.script(|_, _| user());
    let e = pt
        .apply(&g, &k, &p.write(&fix, "fix.lup"), false)
        .expect_err("twice");
    assert!(
        matches!(e, PatchError::Update(UpdateError::Stack(_))),
        "{e}"
    );
    assert_eq!(g.hash(), before);
    let e = pt.revert(&g, &k, "nothing").expect_err("not applied");
    assert!(
        e.to_string().contains("no applied patch named 'nothing'"),
        "{e}"
    );
    assert_eq!(g.hash(), before);
}

#[test]
fn a_site_changed_under_the_patcher_is_refused_and_nothing_is_written() {
    let (g, p) = (Fake::new(), Patches::new("changed"));
    let k = g.kernel();
    let mut pt = p.patcher();
    let both = p.build(
        "both",
        "int alpha(void) { return 2; }\nint beta(void) { return 3; }\n",
        &[("alpha", 1), ("beta", 7)],
        &[],
    );
    let path = p.write(&both, "both.lup");
    // The patcher has checked both functions; before its switch's pause
    // lands the guest rewrites beta's first bytes (as its own text_poke
    // would): the switch must write nothing, not switch alpha alone. The
    // pauses of an apply: one to read vCPU 0's paging, then the switch's.
    let beta_gpa = TEXT_GPA + (BETA - TEXT);
    let (ram0, area0) = g.hash();
    let poke = vec![0xe9, 1, 2, 3, 4];
    g.arm_after_pauses(1, beta_gpa, poke.clone());
    let e = pt.apply(&g, &k, &path, false).expect_err("beta changed");
    assert!(e.to_string().contains("beta changed under us"), "{e}");
    // Only the guest's own poke is there; alpha untouched, the area as it was.
    assert_eq!(g.read(BETA, 5), poke);
    assert_eq!(g.read(ALPHA, 5), function_bytes(1)[..5].to_vec());
    g.ram.lock().expect("lock")[beta_gpa as usize..beta_gpa as usize + 5]
        .copy_from_slice(&function_bytes(7)[..5]);
    assert_eq!(g.hash(), (ram0, area0));
}

#[test]
fn the_patch_state_survives_a_round_trip_and_a_new_patcher_reverts_from_it() {
    let (g, p) = (Fake::new(), Patches::new("state"));
    let k = g.kernel();
    let mut pt = p.patcher();
    let one = p.file(
        "one",
        "int alpha(void) { return 2; }\nint beta(void) { return 3; }\n",
        &[("alpha", 1), ("beta", 7)],
        &[],
    );
    pt.apply(&g, &k, &one, false).expect("apply");
    let json = serde_json::to_string(pt.state()).expect("serialize");
    let back: PatchState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(&back, pt.state());
    let mut fresh = Patcher::restore(vec![p.key.verifying_key()], back);
    fresh
        .revert(&g, &k, "one")
        .expect("revert by the new patcher");
    assert_eq!(g.read(ALPHA, 5), function_bytes(1)[..5].to_vec());
    assert_eq!(g.read(BETA, 5), function_bytes(7)[..5].to_vec());
    // A later patch reuses the mapping the state recorded (no second entry).
    let pde = g.u64_at(PDE_AREA_AT);
    fresh.apply(&g, &k, &one, false).expect("apply again");
    assert_eq!(g.u64_at(PDE_AREA_AT), pde);
    assert_eq!(g.u64_at(PD + 510 * 8), 0, "no second slot mapped");
}

#[test]
fn a_refused_protection_takes_the_switch_back() {
    let (g, _p, k, mut pt, one) = alpha_patch("protfail");
    let before = g.hash();
    // The relayed kernel text, in a pause of its own before the switch:
    // refused, nothing else is tried.
    g.fail_protect.store(1, Ordering::SeqCst);
    let e = pt
        .apply(&g, &k, &one, false)
        .expect_err("protection refused");
    assert!(e.to_string().contains("write control"), "{e}");
    assert_eq!(g.hash(), before, "guest memory changed");
    assert!(g.protections().is_empty(), "not even the text's relay");
    assert!(pt.applied().is_empty());
    // Write control fails after the switch's writes: they are undone, the
    // area's code and its page-directory entry too, and the relay made for
    // the patch is given back.
    g.fail_protect.store(2, Ordering::SeqCst);
    let e = pt
        .apply(&g, &k, &one, false)
        .expect_err("protection refused");
    assert!(e.to_string().contains("write control"), "{e}");
    assert_eq!(g.hash(), before, "guest memory changed");
    assert!(g.protections().is_empty(), "{:?}", g.protections());
    assert!(pt.applied().is_empty());
    assert!(!g.is_paused(), "left paused");
    // The same patch goes in once write control works.
    pt.apply(&g, &k, &one, false).expect("apply");
    assert_eq!(g.protections().len(), 2, "the jump and the text's relay");
}

#[test]
fn immediate_mode_switches_with_a_vcpu_in_old_code_but_never_inside_the_rewritten_bytes() {
    let (g, _p, k, mut pt, one) = alpha_patch("immediate");
    // vCPU 1 is inside alpha's body (past its first 5 bytes) in every pause,
    // with a return address into alpha on its stack too.
    {
        let mut ram = g.ram.lock().expect("lock");
        let at = (STACK_GPA + 0x1f08) as usize;
        ram[at..at + 8].copy_from_slice(&(ALPHA + 9).to_le_bytes());
    }
    g.script(|v, _| {
        if v == 1 {
            kernel_at(ALPHA + 7, STACK + 0x1f00)
        } else {
            user()
        }
    });
    // Consistent: refused after every try, naming the vCPU; nothing written.
    let before = g.hash();
    let e = pt.apply(&g, &k, &one, false).expect_err("consistent waits");
    assert!(e.to_string().contains("vCPU 1"), "{e}");
    assert_eq!(g.hash(), before);
    // Immediate: the first pause switches; the call in flight finishes in
    // alpha's old body, which is still there.
    let r = pt
        .apply_as(&g, &k, &one, false, Some(Mode::Immediate))
        .expect("immediate");
    assert_eq!((r.tries, r.mode), (1, Mode::Immediate));
    let a1 = new_addr(&r, "alpha");
    assert_eq!(g.read(ALPHA, 5), jmp(ALPHA, a1));
    assert_eq!(g.read(ALPHA + 5, 4), function_bytes(1)[5..9].to_vec());
    pt.revert(&g, &k, "one").expect("revert");
    // Sites are one instruction of 5 bytes (check_site refuses others), so
    // no vCPU can be stopped and no task preempted inside the bytes being
    // rewritten: an immediate switch looks at nothing, even with every vCPU
    // in the old function, and takes one pause.
    g.script(|_, _| kernel_at(ALPHA + 5, STACK + 0x1f00));
    let r = pt
        .apply_as(&g, &k, &one, false, Some(Mode::Immediate))
        .expect("immediate");
    assert_eq!(r.tries, 1);
}

#[test]
fn kernel_reads_go_through_vcpu0s_top_table_as_it_was_in_the_pause() {
    let fake = Fake::new();
    *fake.script.lock().expect("lock") = Box::new(|_, _| user());
    let (paging, pinned) = update_engine::kernel::pinned_paging(&fake).expect("paging");
    assert!(
        !fake.is_paused(),
        "the guest runs on while the image is read"
    );
    // The process vCPU 0 was in exits; its top-level table is freed and
    // reused: a walk through the guest's own memory now finds nothing.
    fake.ram.lock().expect("lock")[PML4 as usize..PML4 as usize + 4096].fill(0);
    let mut buf = [0u8; 11];
    assert!(update_engine::kernel::read_virt(&fake, paging, ALPHA, &mut buf).is_err());
    // Through the copy taken in the pause, the kernel's own lower tables
    // still map its text.
    update_engine::kernel::read_virt(&pinned, paging, ALPHA, &mut buf).expect("read");
    assert_eq!(buf.to_vec(), function_bytes(1)[..11].to_vec());
    // Writes go to the guest (the copy pins reads only).
    pinned.ram().write_phys(PML4 + 8, &[1]).expect("write");
    assert_eq!(fake.u64_at(PML4 + 8), 1);
}

/// A replacement with an access that may fault: an exception-table entry
/// for its `nop`, whose fixup is the instruction after it.
fn faulting(name: &str, ret: u8) -> String {
    format!(
        "int {name}(void) {{ asm volatile(\"1: nop\\n2:\\n.pushsection __ex_table,\\\"a\\\"\\n.long 1b - .\\n.long 2b - .\\n.long 0\\n.popsection\"); return {ret}; }}\n"
    )
}

#[test]
fn exception_tables_are_found_through_lucos_index_from_the_first_such_patch_to_the_last() {
    let (g, p) = (Fake::new(), Patches::new("extable"));
    let k = g.kernel();
    let mut pt = p.patcher();
    let one = p.file("one", &faulting("alpha", 2), &[("alpha", 1)], &[]);
    let two = p.file("two", &faulting("beta", 8), &[("beta", 7)], &[]);
    let plain = p.file(
        "plain",
        "int alpha(void) { return 2; }\n",
        &[("alpha", 1)],
        &[],
    );
    // A patch without entries leaves search_exception_tables alone.
    pt.apply(&g, &k, &plain, false).expect("apply plain");
    assert_eq!(g.read(SEARCH_TABLES, 5), function_bytes(3)[..5]);
    assert!(pt.state().extables.is_none());
    pt.revert(&g, &k, "plain").expect("revert plain");
    // RAM now: the patch area mapped (its page-directory entry stays).
    let original = g.hash();

    let r1 = pt.apply(&g, &k, &one, false).expect("apply one");
    let ix = pt.state().extables.clone().expect("the index");
    let page_va = AREA_VA + ix.offset;
    // search_exception_tables jumps to the stub, protected from the guest.
    assert_eq!(g.read(SEARCH_TABLES, 5), jmp(SEARCH_TABLES, page_va));
    assert!(g
        .protections()
        .iter()
        .any(|x| x.owner == "lucos:extable" && x.gpa == TEXT_GPA + 0x300 && x.len == 5));
    let page = |g: &Fake| {
        let a = g.area.lock().expect("lock");
        a[ix.offset as usize..ix.offset as usize + 4096].to_vec()
    };
    let word = |p: &[u8], at: usize| u64::from_le_bytes(p[at..at + 8].try_into().expect("8"));
    // The stub ends in jumps to search_extable and past the entry's nop.
    let pg = page(&g);
    let rel = |at: u64| {
        let o = (at - page_va) as usize;
        (at + 5).wrapping_add_signed(
            i32::from_le_bytes(pg[o + 1..o + 5].try_into().expect("4 or 8 bytes")).into(),
        )
    };
    assert_eq!((pg[36], rel(page_va + 36)), (0xe9, SEARCH_EXTABLE));
    assert_eq!((pg[49], rel(page_va + 49)), (0xe9, SEARCH_TABLES + 5));
    // Slot 0: patch one's code, its table of one entry (the nop in alpha's
    // replacement, the fixup right after it).
    let code = new_addr(&r1, "alpha");
    let (lo, hi, table, n) = (
        word(&pg, 128),
        word(&pg, 136),
        word(&pg, 144),
        word(&pg, 152),
    );
    assert!(lo <= code && code < hi, "{lo:#x}..{hi:#x} {code:#x}");
    assert_eq!((n, word(&pg, 120) & 0xffff_ffff), (1, 1));
    let area = g.area.lock().expect("lock").clone();
    let e = (table - AREA_VA) as usize;
    let insn = table.wrapping_add_signed(
        i32::from_le_bytes(area[e..e + 4].try_into().expect("4 or 8 bytes")).into(),
    );
    let fixup = (table + 4).wrapping_add_signed(
        i32::from_le_bytes(area[e + 4..e + 8].try_into().expect("4 or 8 bytes")).into(),
    );
    let off = (insn - AREA_VA) as usize;
    assert_eq!(area[off], 0x90, "the entry names the nop");
    assert_eq!(fixup, insn + 1);

    // A second patch takes slot 1; the hook stays as it is.
    pt.apply(&g, &k, &two, false).expect("apply two");
    let v = pt.verify_applied(&g, &k).expect("verify");
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert_eq!(v.sites, 3, "two jumps and the index's");
    // Something overwrote the hook (as a guest could not, write control
    // refusing it): verify names it.
    let hook_gpa = (TEXT_GPA + (SEARCH_TABLES - TEXT)) as usize;
    let saved: Vec<u8> = g.ram.lock().expect("lock")[hook_gpa..hook_gpa + 5].to_vec();
    g.ram.lock().expect("lock")[hook_gpa..hook_gpa + 5].copy_from_slice(&function_bytes(3)[..5]);
    let v = pt.verify_applied(&g, &k).expect("verify");
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("search_exception_tables")),
        "{:?}",
        v.problems
    );
    g.ram.lock().expect("lock")[hook_gpa..hook_gpa + 5].copy_from_slice(&saved);
    let x = pt.list(&g, Some(&k)).exception_index.expect("listed");
    assert_eq!(
        (x.hooked.as_str(), x.site, x.page, x.patches),
        (
            "search_exception_tables",
            SEARCH_TABLES,
            page_va,
            vec!["one".to_owned(), "two".to_owned()]
        )
    );
    let pg = page(&g);
    assert_eq!(word(&pg, 160 + 24), 1);
    assert_eq!(word(&pg, 120) & 0xffff_ffff, 2);
    // While the hook is there, a patch cannot replace the hooked function.
    let hooked = p.file(
        "hooked",
        "int search_exception_tables(void) { return 0; }\n",
        &[("search_exception_tables", 3)],
        &[],
    );
    let before = g.hash();
    let e = pt.apply(&g, &k, &hooked, false).expect_err("hooked");
    assert!(e.to_string().contains("exception index"), "{e}");
    assert_eq!(g.hash(), before, "a refusal changes nothing");

    // Reverting one frees its slot; reverting two, the last, takes the
    // jump back and gives the page back: memory as it was.
    pt.revert(&g, &k, "one").expect("revert one");
    let pg = page(&g);
    assert_eq!([word(&pg, 128), word(&pg, 136)], [0, 0]);
    assert_eq!(g.read(SEARCH_TABLES, 5), jmp(SEARCH_TABLES, page_va));
    pt.revert(&g, &k, "two").expect("revert two");
    assert!(pt.state().extables.is_none());
    assert!(pt.list(&g, Some(&k)).exception_index.is_none());
    assert_eq!(g.read(SEARCH_TABLES, 5), function_bytes(3)[..5]);
    assert!(!g.protections().iter().any(|x| x.owner == "lucos:extable"));
    assert_eq!(pt.area_usage().used_bytes, 0);
    assert_eq!(g.hash().0, original.0, "RAM as it was");
    assert!(g.unpaused_writes.lock().expect("lock").is_empty());

    // A kernel without search_exception_tables: refused, nothing changed.
    let mut bare = g.kernel();
    bare.symbols = SymbolTable::from_symbols(vec![Symbol {
        name: "alpha".into(),
        addr: ALPHA,
        size: FN_SIZE,
        kind: SymbolKind::Function,
        ty: 't',
        global: false,
        file: Some("fake.c".into()),
        position: 0,
    }]);
    let before = g.hash();
    let e = pt
        .apply(&g, &bare, &one, false)
        .expect_err("no search_exception_tables");
    assert!(e.to_string().contains("search_exception_tables"), "{e}");
    assert_eq!(g.hash(), before);
}
