//! symbol-db on the test kernel: symbols of the running VM against the ELF
//! as binutils reads it, struct layouts against the offsets the kernel
//! prints itself, build identity, duplicates, and bad input.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::cli::{kernel, start, text, RunDir};

fn tool(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (binutils, installed by scripts/setup.sh): {e}"));
    assert!(o.status.success(), "{cmd} {args:?} failed");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn running_test_kernel_symbols_agree_with_its_elf_as_nm_reads_it() {
    let dir = RunDir::new("syms");
    start(
        &dir,
        "s1",
        &[
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--cmdline",
            "tasks=2 iters=0",
        ],
    );
    let o = dir.lucos(&["symbols", "--vm", "s1", "--all"]);
    assert!(o.status.success(), "{}", text(&o));
    let ours: BTreeSet<(u64, String, String)> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                u64::from_str_radix(f[0], 16).expect("hex"),
                f[1].to_owned(),
                f[2].to_owned(),
            )
        })
        .collect();
    // Every function and object symbol nm lists, with the same address and type.
    let nm = tool("nm", &["--defined-only", &kernel()]);
    let mut checked = 0;
    for l in nm.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (addr, ty, name) = (f[0], f[1], f[2]);
        if !"tTdDbBrR".contains(ty) {
            continue;
        }
        let key = (
            u64::from_str_radix(addr, 16).expect("hex"),
            ty.to_owned(),
            name.to_owned(),
        );
        assert!(ours.contains(&key), "nm has {l}, lucos does not");
        checked += 1;
    }
    assert!(checked > 60, "only {checked} symbols compared");

    // Identity: build-id as readelf reads it from the file, banner from memory.
    let o = dir.lucos(&["symbols", "--vm", "s1", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let notes = tool("readelf", &["-n", &kernel()]);
    let build_id = notes
        .lines()
        .find_map(|l| l.split("Build ID: ").nth(1))
        .expect("readelf shows a build-id")
        .trim();
    assert_eq!(v["identity"]["build_id"], build_id);
    assert_eq!(
        v["identity"]["version"],
        "lucos test kernel version 1.0 #1 SMP"
    );
    assert_eq!(v["slide"], 0);
    assert_eq!(v["text_gpa"], "0x1000000");

    // Lookups: by name, duplicates told apart by object file or position,
    // by address (symbol + offset).
    let o = dir.lucos(&[
        "symbols",
        "--vm",
        "s1",
        "--json",
        "lucos_version",
        "mix@console.c",
        "mix@services.c",
        "mix#1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let a = &v["answers"];
    assert_eq!(a[1]["symbol"]["file"], "console.c");
    assert_eq!(a[2]["symbol"]["file"], "services.c");
    // mix#1 is the namesake at position 1, whichever file that is.
    let second = if a[1]["symbol"]["position"] == 1 {
        &a[1]
    } else {
        &a[2]
    };
    assert_eq!(second["symbol"]["position"], 1, "{v}");
    assert_eq!(a[3]["symbol"]["addr"], second["symbol"]["addr"]);
    assert_ne!(a[1]["symbol"]["addr"], a[2]["symbol"]["addr"]);
    let addr = u64::from_str_radix(
        a[0]["symbol"]["addr"]
            .as_str()
            .expect("addr")
            .trim_start_matches("0x"),
        16,
    )
    .expect("hex");
    let o = dir.lucos(&["symbols", "--vm", "s1", &format!("{:#x}", addr + 4)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("= lucos_version+0x4/"),
        "{}",
        text(&o)
    );

    // Ambiguous and missing names: clear errors, exit 1.
    let o = dir.lucos(&["symbols", "--vm", "s1", "mix"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o)
            .contains("'mix' is ambiguous: 2 symbols have that name (in console.c, services.c)"),
        "{}",
        text(&o)
    );
    let o = dir.lucos(&["symbols", "--vm", "s1", "not_a_symbol"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("no symbol named 'not_a_symbol'"),
        "{}",
        text(&o)
    );

    // A System.map of this build is accepted; one of another build (every
    // address moved, as after a rebuild) and an ELF with another build-id
    // are refused with exit code 5.
    let tmp = dir.0.join("maps");
    std::fs::create_dir_all(&tmp).expect("tmp");
    let good = tmp.join("System.map");
    std::fs::write(&good, tool("nm", &["-n", &kernel()])).expect("map");
    let o = dir.lucos(&[
        "symbols",
        "--vm",
        "s1",
        "--map",
        good.to_str().expect("utf8"),
        "stats_update",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let moved: String = tool("nm", &["-n", &kernel()])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let a = u64::from_str_radix(f[0], 16).expect("hex");
            let a = if a >= 0xffff_ffff_8100_1000 {
                a + 0x40
            } else {
                a
            };
            format!("{a:016x} {} {}\n", f[1], f[2])
        })
        .collect();
    let bad = tmp.join("Other.map");
    std::fs::write(&bad, moved).expect("map");
    let o = dir.lucos(&[
        "symbols",
        "--vm",
        "s1",
        "--map",
        bad.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("is for another kernel build than the running one"),
        "{}",
        text(&o)
    );
    let other_elf = tmp.join("other.elf");
    assert!(Command::new("objcopy")
        .args(["--update-section"])
        .arg(format!(".notes={}", write_fake_note(&tmp).display()))
        .arg(kernel())
        .arg(&other_elf)
        .status()
        .expect("objcopy")
        .success());
    let o = dir.lucos(&[
        "symbols",
        "--vm",
        "s1",
        "--map",
        other_elf.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("build-id"), "{}", text(&o));

    let o = dir.lucos(&["symbols", "--vm", "nosuchvm", "x"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

/// A GNU build-id note with another id.
fn write_fake_note(dir: &std::path::Path) -> std::path::PathBuf {
    let mut n = Vec::new();
    n.extend_from_slice(&4u32.to_le_bytes());
    n.extend_from_slice(&20u32.to_le_bytes());
    n.extend_from_slice(&3u32.to_le_bytes());
    n.extend_from_slice(b"GNU\0");
    n.extend_from_slice(&[0xab; 20]);
    let p = dir.join("note.bin");
    std::fs::write(&p, n).expect("note");
    p
}

#[test]
fn struct_layouts_agree_with_the_offsets_the_kernel_prints() {
    let vm = common::boot(1, "selftest tasks=1 iters=1");
    vm.expect_serial("[tk] layout boot_info", 10);
    let serial = vm.serial.text();
    for name in ["task_stat", "boot_info"] {
        let line = serial
            .lines()
            .find(|l| l.starts_with(&format!("[tk] layout {name} ")))
            .expect("layout line");
        let printed: Vec<(String, u64)> = line
            .split_whitespace()
            .skip(3)
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("k=v");
                (k.to_owned(), v.parse().expect("number"))
            })
            .collect();
        let o = Command::new(env!("CARGO_BIN_EXE_lucos"))
            .args(["types", "--kernel", &kernel(), "--json", name])
            .output()
            .expect("lucos types");
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let layout = &v[0];
        assert_eq!(layout["size"], printed[0].1, "{name}: {line}");
        let members = layout["members"].as_array().expect("members");
        assert_eq!(members.len(), printed.len() - 1, "{name}: {line}");
        for (m, (field, offset)) in members.iter().zip(&printed[1..]) {
            assert_eq!(m["name"], field.as_str(), "{name}: {line}");
            assert_eq!(m["offset"], *offset, "{name}.{field}: {line}");
        }
    }
}

#[test]
fn bad_kernel_files_are_clear_errors() {
    let dir = RunDir::new("symbad");
    let tmp = &dir.0;
    let k = std::fs::read(kernel()).expect("kernel");
    let cut = tmp.join("truncated.elf");
    std::fs::write(&cut, &k[..k.len() / 3]).expect("write");
    let o = dir.lucos(&[
        "symbols",
        "--kernel",
        cut.to_str().expect("utf8"),
        "lucos_version",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("is not a usable ELF file"),
        "{}",
        text(&o)
    );

    let stripped = tmp.join("nodebug.elf");
    assert!(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(kernel())
        .arg(&stripped)
        .status()
        .expect("objcopy")
        .success());
    let o = dir.lucos(&[
        "types",
        "--kernel",
        stripped.to_str().expect("utf8"),
        "task_stat",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("has no DWARF debug info"), "{}", text(&o));
    // Symbols still work without DWARF.
    let o = dir.lucos(&[
        "symbols",
        "--kernel",
        stripped.to_str().expect("utf8"),
        "stats_update",
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let o = dir.lucos(&["types", "--kernel", &kernel(), "no_such_struct"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("no struct named 'no_such_struct'"),
        "{}",
        text(&o)
    );

    let garbage = tmp.join("garbage");
    std::fs::write(&garbage, b"\x7fELF\x02\x01\x01 this is not really an ELF").expect("write");
    let o = dir.lucos(&["symbols", "--kernel", garbage.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let map = tmp.join("broken.map");
    std::fs::write(&map, "ffffffff81000000 T _text\nnot a map line\n").expect("write");
    let o = dir.lucos(&["symbols", "--kernel", map.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("broken.map:2: not a System.map line"),
        "{}",
        text(&o)
    );
    let o = dir.lucos(&["symbols", "--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("cannot read /nonexistent/vmlinux"),
        "{}",
        text(&o)
    );
}

/// The Debian kernel's BTF (read from its stripped vmlinux) against the
/// offsets its own build computed: include/generated/asm-offsets.h of the
/// pinned linux-headers package (`offsetof(struct task_struct, thread.sp)`
/// and the rest). `lucos types` reads the same BTF for a stripped image.
#[test]
fn debian_kernel_btf_offsets_agree_with_its_asm_offsets() {
    let vmlinux = common::linux::package_vmlinux();
    let btf = symbol_db::btf::Btf::from_elf(&vmlinux, "vmlinux").expect("BTF of vmlinux");
    assert!(btf.len() > 50_000, "{} types", btf.len());
    let offsets = std::fs::read_to_string(
        common::linux::kbuild_dir().join("include/generated/asm-offsets.h"),
    )
    .expect("asm-offsets.h");
    let mut checked = Vec::new();
    for line in offsets.lines() {
        // #define NAME VALUE /* offsetof(struct S, a.b) */
        let Some((head, tail)) = line.split_once("/* offsetof(struct ") else {
            continue;
        };
        let value: u64 = head
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .expect("value");
        let (strukt, path) = tail
            .trim_end_matches(" */")
            .trim_end_matches(')')
            .split_once(", ")
            .expect("struct, member");
        match btf.offset_of(strukt, path) {
            Ok(got) => {
                assert_eq!(got, value, "offsetof(struct {strukt}, {path})");
                checked.push(format!("{strukt}.{path}"));
            }
            // Structs the build never emitted debug info for are not in BTF.
            Err(symbol_db::SymbolError::NoType(_)) => {}
            Err(e) => panic!("{strukt}.{path}: {e}"),
        }
    }
    assert!(
        checked.iter().any(|c| c == "task_struct.thread.sp") && checked.len() >= 40,
        "{checked:?}"
    );
    // The layout `lucos types` shows for a stripped image comes from there.
    let dir = RunDir::new("btf");
    let path = dir.0.join("vmlinux");
    std::fs::write(&path, &vmlinux).expect("write");
    let o = dir.lucos(&[
        "types",
        "--kernel",
        path.to_str().expect("utf8"),
        "--json",
        "task_struct",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let syms = symbol_db::SymbolTable::from_kernel_elf(&vmlinux, "vmlinux").expect("kallsyms");
    // sizeof(struct task_struct) is the size of init_task.
    assert_eq!(
        v[0]["size"],
        syms.lookup("init_task").expect("init_task").size
    );
    assert_eq!(v[0]["unit"], "BTF");
}

/// Structs within structs, arrays of them, a union and an array of two
/// dimensions, as GCC lays them out.
const NESTED: &str = "struct inner { int a; long b; };
struct range { struct inner lo[2]; union { int u; char c[8]; } x; };
struct outer { int n; struct range r; struct inner *p; int m[2][3]; };
struct outer obj;
";

#[test]
fn nested_layouts_read_alike_from_dwarf_and_btf_and_differ_when_an_inner_struct_changes() {
    let dir = RunDir::new("shapes");
    // One source, compiled with DWARF and with BTF (GCC's -gbtf).
    let object = |name: &str, src: &str, flag: &str| -> Vec<u8> {
        let c = dir.0.join(format!("{name}.c"));
        let o = dir.0.join(format!("{name}.o"));
        std::fs::write(&c, src).expect("source");
        let out = Command::new("gcc-12")
            .args(["-c", flag, "-o"])
            .arg(&o)
            .arg(&c)
            .output()
            .expect("gcc-12 (installed by scripts/setup.sh)");
        assert!(out.status.success(), "{}", text(&out));
        std::fs::read(&o).expect("object")
    };
    let dw = object("dw", NESTED, "-g");
    let bt = object("bt", NESTED, "-gbtf");
    let from_dwarf = symbol_db::dwarf::TypeDb::from_elf(&dw, "dw.o")
        .expect("DWARF")
        .struct_layout("outer")
        .expect("outer");
    let from_btf = symbol_db::btf::Btf::from_elf(&bt, "bt.o")
        .expect("BTF")
        .struct_layout("outer")
        .expect("outer");
    let whole = |l: &symbol_db::dwarf::StructLayout| -> Vec<String> {
        l.members
            .iter()
            .map(|m| {
                format!(
                    "{}@{}:{:?} {} {:?}",
                    m.name, m.offset, m.size, m.type_name, m.shape
                )
            })
            .collect()
    };
    assert_eq!(whole(&from_dwarf), whole(&from_btf));
    assert_eq!(
        whole(&from_dwarf),
        [
            "n@0:Some(4) int None",
            "r@8:Some(40) struct range Some(\"{lo@0:32[2]{a@0:4,b@8:8},x@32:8{u@0:4,c@0:8}}\")",
            "p@48:Some(8) struct inner * None",
            "m@56:Some(24) int[6] None",
        ]
    );
    // Bitfields (placed from DWARF 4's storage units and DWARF 5's bit
    // offsets alike) and a flexible array, held by value.
    let tail = "struct bits { unsigned char c; unsigned a:3, b:12, d:17; };
struct tail { int n; int v[]; };
struct outer2 { int n; struct bits f; struct tail t; };
struct outer2 obj2;
";
    let btf2 = symbol_db::btf::Btf::from_elf(&object("bt2", tail, "-gbtf"), "bt2.o")
        .expect("BTF")
        .struct_layout("outer2")
        .expect("outer2");
    for flag in ["-gdwarf-4", "-gdwarf-5"] {
        let dw2 = symbol_db::dwarf::TypeDb::from_elf(&object("dw2", tail, flag), "dw2.o")
            .expect("DWARF")
            .struct_layout("outer2")
            .expect("outer2");
        assert_eq!(whole(&dw2), whole(&btf2), "{flag}");
    }
    assert_eq!(
        btf2.members[1].shape.as_deref(),
        Some("{c@0:1,a@1:4,b@1:4,d@4:4}")
    );
    assert_eq!(btf2.members[2].shape.as_deref(), Some("{n@0:4,v@4:0}"));
    // The inner struct's members swapped: same names, sizes and type
    // names at the top, another shape.
    let swapped = NESTED.replace("int a; long b;", "long b; int a;");
    let changed = symbol_db::dwarf::TypeDb::from_elf(&object("sw", &swapped, "-g"), "sw.o")
        .expect("DWARF")
        .struct_layout("outer")
        .expect("outer");
    assert_eq!(
        changed.members[1].type_name,
        from_dwarf.members[1].type_name
    );
    assert_eq!(changed.members[1].size, from_dwarf.members[1].size);
    assert_ne!(changed.members[1].shape, from_dwarf.members[1].shape);
}
