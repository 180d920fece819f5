//! Fail-closed on real KVM: with the test kernel paused, every kind of
//! refused patch leaves all of guest RAM and the patch area byte-identical
//! (not only kernel text), and the one good patch does change them, so the
//! hash would see a refused one that wrote anything.

mod common;

use std::path::PathBuf;

use common::cli::{kernel, p, text, RunDir, FIX};
use update_engine::lup::sha256_hex;
use update_engine::patcher::{PatchError, Patcher};
use vmm_core::guest::Guest;

/// SHA-256 of every byte of guest RAM, and of the patch area.
fn memory_hash(vm: &vmm_core::Vm) -> (String, String) {
    let ram = vm.ram();
    let mut all = Vec::with_capacity(ram.size() as usize);
    for r in ram.ranges() {
        let mut buf = vec![0u8; r.len as usize];
        ram.read(r.guest_addr, &mut buf).expect("read RAM");
        all.extend_from_slice(&buf);
    }
    let area = vm.area();
    let mut a = vec![0u8; area.size as usize];
    vm.area_read(0, &mut a).expect("read area");
    (sha256_hex(&all), sha256_hex(&a))
}

#[test]
fn every_refused_patch_leaves_all_of_guest_ram_and_the_patch_area_identical() {
    let t = common::boot(2, "tasks=2 iters=0 report=100");
    let dir = RunDir::new("failclosed");
    let d = dir.0.clone();
    let ok = |args: &[&str]| {
        let o = dir.lucos(args);
        assert!(o.status.success(), "lucos {args:?}: {}", text(&o));
    };
    ok(&["keygen", "-o", p(&d.join("key"))]);
    ok(&["keygen", "-o", p(&d.join("other"))]);
    let build = |name: &str, src: &str, kernel_file: &str, key: Option<&str>| -> PathBuf {
        let c = d.join(format!("{name}.c"));
        std::fs::write(&c, src).expect("source");
        let out = d.join(format!("{name}.lup"));
        let mut args = vec![
            "build",
            "--kernel",
            kernel_file,
            "--name",
            name,
            "-o",
            p(&out),
        ];
        match key {
            Some(k) => args.extend(["--key", k]),
            None => args.push("--unsigned"),
        }
        args.push(p(&c));
        let o = dir.lucos(&args);
        assert!(o.status.success(), "build {name}: {}", text(&o));
        out
    };
    let key = d.join("key");
    let key = Some(p(&key));
    let fix = build("fix", FIX, &kernel(), key);
    let mut cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "unsigned",
            build("unsigned", FIX, &kernel(), None),
            "is not signed",
        ),
        (
            "untrusted key",
            build("untrusted", FIX, &kernel(), Some(p(&d.join("other")))),
            "signature does not verify",
        ),
    ];
    let mut bytes = std::fs::read(&fix).expect("lup");
    let at = bytes.len() - 200;
    bytes[at] ^= 0x55;
    std::fs::write(d.join("tampered.lup"), &bytes).expect("write");
    cases.push((
        "tampered",
        d.join("tampered.lup"),
        "signature does not verify",
    ));
    // Another build: the same kernel with another build-id note.
    let other = d.join("other-build.elf");
    common::kernel_of_another_build(&other);
    cases.push((
        "other build",
        build("otherbuild", FIX, p(&other), key),
        "is for another kernel build",
    ));
    // Old bytes differ: built against a kernel whose lucos_version was altered.
    common::kernel_with_altered(&d.join("altered.elf"), "lucos_version", 8);
    cases.push((
        "bytes mismatch",
        build("mismatch", FIX, p(&d.join("altered.elf")), key),
        "lucos_version does not match",
    ));
    cases.push((
        "unknown symbol",
        build(
            "unknown",
            "#include \"tk.h\"\nextern const char *no_such_kernel_function(void);\nconst char *lucos_version(void) { return no_such_kernel_function(); }\n",
            &kernel(),
            key,
        ),
        "no symbol named 'no_such_kernel_function'",
    ));
    cases.push((
        "area full",
        build(
            "big",
            "#include \"tk.h\"\nconst char big[3 << 20] = { 1 };\nconst char *lucos_version(void) { return &big[12345]; }\n",
            &kernel(),
            key,
        ),
        "the patch area is full",
    ));

    let vm = &t.vm;
    let guest = update_engine::kernel::inspect(vm, &common::test_kernel()).expect("inspect");
    let trusted = update_engine::lup::read_key_hex(&d.join("key.pub")).expect("key.pub");
    let trusted = update_engine::VerifyingKey::from_bytes(&trusted).expect("public key");
    let mut patcher = Patcher::new(vec![trusted]);
    let round = |patcher: &mut Patcher, when: &str| {
        vm.pause().expect("pause");
        let before = memory_hash(vm);
        for (what, path, why) in &cases {
            let e: PatchError = patcher.apply(vm, &guest, path, false).expect_err(what);
            assert!(e.to_string().contains(why), "{when}, {what}: {e}");
            assert_eq!(
                memory_hash(vm),
                before,
                "{when}: the refused {what} patch changed guest memory"
            );
        }
        vm.resume().expect("resume");
    };
    // With nothing applied yet (the patch area not even mapped), then with
    // a patch applied.
    round(&mut patcher, "first");
    vm.pause().expect("pause");
    let before = memory_hash(vm);
    patcher
        .apply(vm, &guest, &fix, false)
        .expect("the good patch");
    let after = memory_hash(vm);
    assert_ne!(
        before.0, after.0,
        "the good patch changed RAM (trampoline, mapping)"
    );
    assert_ne!(before.1, after.1, "the good patch placed code");
    vm.resume().expect("resume");
    round(&mut patcher, "on top of a patch");
    // And the stack's own refusals.
    vm.pause().expect("pause");
    let before = memory_hash(vm);
    let e = patcher.apply(vm, &guest, &fix, false).expect_err("twice");
    assert!(e.to_string().contains("already applied"), "{e}");
    let e = patcher
        .revert(vm, &guest, "nothing")
        .expect_err("not applied");
    assert!(
        e.to_string().contains("no applied patch named 'nothing'"),
        "{e}"
    );
    assert_eq!(memory_hash(vm), before);
    vm.resume().expect("resume");
}
