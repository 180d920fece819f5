//! symbol-db's reading of kernel module files, against binutils: Debian's
//! own modules from the pinned kernel package. A function's masked ranges
//! hold exactly its relocated fields (as `readelf -r` lists them) and its
//! ftrace call site; the build-id and modinfo are those `readelf -n` and
//! the `.modinfo` strings give.

mod common;

use std::process::Command;

use common::linux::{kernel_pkg, kernel_release};
use symbol_db::module::ModuleObject;

fn readelf(args: &[&str], file: &std::path::Path) -> String {
    let o = Command::new("readelf")
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("readelf (binutils, installed by scripts/setup.sh): {e}"));
    assert!(o.status.success(), "readelf {args:?} failed");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// (offset, width) of every relocation `readelf -rW` lists for `section`.
fn relocations(file: &std::path::Path, section: &str) -> Vec<(u64, u64)> {
    let text = readelf(&["-rW"], file);
    let mut out = Vec::new();
    let mut inside = false;
    for l in text.lines() {
        if l.starts_with("Relocation section") {
            inside = l.contains(&format!("'.rela{section}'"));
            continue;
        }
        let mut w = l.split_whitespace();
        let (Some(off), Some(_info), Some(ty)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        let Ok(off) = u64::from_str_radix(off, 16) else {
            continue;
        };
        if inside {
            out.push((off, if ty == "R_X86_64_64" { 8 } else { 4 }));
        }
    }
    out
}

#[test]
fn debian_module_files_are_read_as_binutils_reads_them() {
    let pkg = kernel_pkg();
    let release = kernel_release(&pkg);
    let ko = pkg.join(format!("lib/modules/{release}/kernel/fs/binfmt_misc.ko"));
    let m = ModuleObject::from_file(&ko).expect("binfmt_misc.ko parses");
    assert_eq!(m.name, "binfmt_misc");
    assert!(
        m.vermagic.as_deref().unwrap_or("").starts_with(&release),
        "{:?}",
        m.vermagic
    );
    let notes = readelf(&["-n"], &ko);
    let id = m.build_id.as_deref().expect("a build-id");
    assert!(notes.contains(&format!("Build ID: {id}")), "{id}\n{notes}");

    // bm_status_read: every relocated field masked, and the fentry call.
    let f = match m.functions_named("bm_status_read").as_slice() {
        [f] => (*f).clone(),
        other => panic!("bm_status_read: {other:?}"),
    };
    assert_eq!(f.section_name, ".text");
    let masked = m.masked(&f);
    let code = m.code(&f).expect("its bytes");
    assert_eq!(code.len() as u64, f.size);
    let covered = |at: u64, len: u64| {
        (at..at + len).all(|b| {
            masked
                .iter()
                .any(|&(o, l)| b >= f.offset + u64::from(o) && b < f.offset + u64::from(o + l))
        })
    };
    let relocs: Vec<(u64, u64)> = relocations(&ko, ".text")
        .into_iter()
        .filter(|&(o, _)| o >= f.offset && o < f.offset + f.size)
        .collect();
    assert!(relocs.len() >= 5, "{relocs:?}");
    for &(o, w) in &relocs {
        assert!(covered(o, w), "relocation at {o:#x} not masked: {masked:?}");
    }
    // The entry is `call __fentry__` in the file (ftrace makes it a nop).
    assert_eq!(code[..5], [0xe8, 0, 0, 0, 0], "{code:02x?}");
    assert!(masked.contains(&(0, 5)), "{masked:?}");
    // Nothing else: the bytes between the masks are the file's.
    let masked_bytes: u32 = masked.iter().map(|&(_, l)| l).sum();
    assert!(
        u64::from(masked_bytes) < f.size / 2,
        "{masked_bytes} of {} bytes masked: {masked:?}",
        f.size
    );

    // A module with alternatives and jump labels: each site lies inside the
    // module's text and is masked in its function.
    let nfsd = pkg.join(format!("lib/modules/{release}/kernel/fs/nfsd/nfsd.ko"));
    let k = ModuleObject::from_file(&nfsd).expect("nfsd.ko parses");
    for table in [
        "__mcount_loc",
        ".altinstructions",
        "__jump_table",
        ".return_sites",
    ] {
        assert!(
            k.tables.iter().any(|(t, n)| t == table && *n > 0),
            "no {table} sites: {:?}",
            k.tables
        );
    }
    for f in &k.functions {
        for (o, l) in k.masked(f) {
            assert!(u64::from(o + l) <= f.size, "{}: {o}+{l}", f.name);
        }
    }

    // Not a module: refused, naming why.
    let e = ModuleObject::parse(b"\x7fELF", "junk.ko").expect_err("junk");
    assert!(e.to_string().contains("junk.ko"), "{e}");
}

#[test]
fn namesake_statics_of_a_module_are_told_apart_by_the_code_that_refers_to_them() {
    // Two objects with a `static int once` each, linked into one module
    // (`ld -r`, as kbuild links a module's objects).
    let dir = std::env::temp_dir().join(format!("lucos-namesakes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let srcs = [
        ("a", "static int once; int fa(void) { return ++once; }\n"),
        ("b", "static int once; int fb(void) { return once += 2; }\n"),
    ];
    for (n, src) in srcs {
        std::fs::write(dir.join(format!("{n}.c")), src).expect("source");
        let st = Command::new("gcc")
            .args(["-c", "-O2", "-fno-pic", "-mcmodel=kernel", "-o"])
            .arg(dir.join(format!("{n}.o")))
            .arg(dir.join(format!("{n}.c")))
            .status()
            .expect("gcc");
        assert!(st.success());
    }
    let ko = dir.join("m.ko");
    let st = Command::new("ld")
        .arg("-r")
        .arg(dir.join("a.o"))
        .arg(dir.join("b.o"))
        .arg("-o")
        .arg(&ko)
        .status()
        .expect("ld");
    assert!(st.success());
    let m = ModuleObject::from_file(&ko).expect("parses");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(m.defines("once"), 2);
    // Each function's load of its own `once`: a PC-relative field whose
    // target (the section's symbol plus the addend, -4 for the field)
    // lands on the static, the first or the second in address order.
    for (f, want) in [("fa", 0), ("fb", 1)] {
        let func = m.functions_named(f)[0].clone();
        let hits: Vec<Option<usize>> = (func.offset..func.offset + func.size)
            .filter_map(|at| m.reference_at(func.section, at))
            .map(|(sec, v)| m.namesake_position("once", sec, v.wrapping_add(4)))
            .collect();
        assert!(!hits.is_empty(), "{f} refers to nothing");
        assert!(hits.iter().all(|h| *h == Some(want)), "{f}: {hits:?}");
    }
    // An offset where no namesake is: none.
    let func = m.functions_named("fa")[0].clone();
    let (sec, v) = (func.offset..func.offset + func.size)
        .find_map(|at| m.reference_at(func.section, at))
        .expect("a reference");
    assert_eq!(
        m.namesake_position("once", sec, v.wrapping_add(4) + 1),
        None
    );
}
