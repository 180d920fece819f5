//! Links a patch's relocatable objects at their place in guest memory:
//! lays out their allocated sections, resolves symbols against the patch
//! itself and then the running kernel, and applies x86-64 relocations.
//!
//! Symbols follow the ELF rules a static linker follows: a local symbol
//! (a C `static`) is seen only by its own object; the objects' global
//! symbols share one namespace, where two strong definitions of one name are
//! refused by name and a weak one yields to a strong one; an undefined
//! reference is resolved against that namespace, then against the running
//! kernel. Sections keep their alignment: the layout is laid out from a base
//! aligned to the largest alignment any placed section asks for
//! ([`alignment`]).

use std::collections::HashMap;

use goblin::elf::section_header::{SHF_ALLOC, SHF_WRITE, SHT_NOBITS};
use goblin::elf::sym::{STB_GLOBAL, STB_LOCAL, STB_WEAK, STT_FILE, STT_SECTION};
use goblin::elf::Elf;

use crate::UpdateError;

/// Allocated sections a patch object carries that are metadata for the
/// kernel's own boot-time code patching or unwinding, not code or data to
/// place. Leaving them out keeps the code as the compiler wrote it:
/// `__fentry__` calls and return-thunk jumps stay calls to the running
/// kernel's functions (correct, if not the fastest), `lock` prefixes stay.
/// Without ORC data the kernel's unwinder cannot walk through patch code.
const SKIPPED: &[&str] = &[
    "__mcount_loc",
    "__patchable_function_entries",
    ".eh_frame",
    ".return_sites",
    ".retpoline_sites",
    ".call_sites",
    ".ibt_endbr_seal",
    ".smp_locks",
    ".orc_unwind",
    ".orc_unwind_ip",
    ".orc_header",
];

/// Sections whose code only works once the kernel has processed them
/// (exception fixups, jump labels, BUG/WARN entries, alternatives, static
/// calls, paravirt sites): a patch with them is refused rather than placed
/// without them.
const NEEDS_KERNEL: &[&str] = &[
    "__ex_table",
    "__jump_table",
    "__bug_table",
    ".altinstructions",
    ".altinstr_replacement",
    ".static_call_sites",
    ".parainstructions",
];

/// A linked patch: bytes to copy to `base`, and where its symbols landed.
#[derive(Debug, Clone)]
pub struct Linked {
    /// Guest-virtual address of the first byte.
    pub base: u64,
    /// The code and read-only data, relocated.
    pub bytes: Vec<u8>,
    /// Global (and weak) symbols the patch defines → address.
    pub globals: HashMap<String, u64>,
    /// The object whose definition of each global won.
    pub global_objects: HashMap<String, String>,
    /// Local symbols, by (object, name) → addresses (in symbol-table order).
    pub locals: HashMap<(String, String), Vec<u64>>,
}

impl Linked {
    /// Where the patch's symbol `name` landed: the one `object` defines
    /// (its local, or a global it defines), or, without `object`, the
    /// global of that name, else the only local of that name in any object.
    pub fn symbol(&self, object: Option<&str>, name: &str) -> Result<u64, String> {
        if let Some(obj) = object {
            if let Some(v) = self.locals.get(&(obj.to_owned(), name.to_owned())) {
                return match v.as_slice() {
                    [a] => Ok(*a),
                    _ => Err(format!(
                        "{obj} defines {} local symbols named {name}",
                        v.len()
                    )),
                };
            }
            return match (self.globals.get(name), self.global_objects.get(name)) {
                (Some(&a), Some(o)) if o == obj => Ok(a),
                (Some(_), Some(o)) => Err(format!("{name} is defined by {o}, not {obj}")),
                _ => Err(format!("{obj} defines no symbol {name}")),
            };
        }
        if let Some(&a) = self.globals.get(name) {
            return Ok(a);
        }
        let mut found = self
            .locals
            .iter()
            .filter(|((_, n), _)| n == name)
            .flat_map(|((o, _), v)| v.iter().map(move |a| (o, *a)));
        match (found.next(), found.next()) {
            (Some((_, a)), None) => Ok(a),
            (None, _) => Err(format!("the patch defines no symbol {name}")),
            (Some((o1, _)), Some((o2, _))) => Err(format!(
                "{name} is a local symbol of more than one object ({o1}, {o2}): name the object"
            )),
        }
    }
}

/// Whether section `sname` (with header `sh`) is placed in the patch area.
fn is_placed(sname: &str, sh: &goblin::elf::SectionHeader) -> bool {
    sh.sh_flags & SHF_ALLOC as u64 != 0 && sh.sh_size != 0 && !SKIPPED.contains(&sname)
}

/// The alignment the base of `objects` must have: the largest any placed
/// section asks for (at least 1). Objects that do not parse give 1; [`link`]
/// reports them.
pub fn alignment(objects: &[(String, Vec<u8>)]) -> u64 {
    let mut a = 1u64;
    for (_, data) in objects {
        let Ok(elf) = Elf::parse(data) else { continue };
        for sh in &elf.section_headers {
            let sname = elf.shdr_strtab.get_at(sh.sh_name).unwrap_or("");
            if is_placed(sname, sh) {
                a = a.max(sh.sh_addralign.max(1));
            }
        }
    }
    a
}

struct Obj<'a> {
    name: &'a str,
    data: &'a [u8],
    elf: Elf<'a>,
    /// Section index → placed address.
    placed: HashMap<usize, u64>,
}

fn align(x: u64, a: u64) -> u64 {
    if a <= 1 {
        x
    } else {
        x.div_ceil(a) * a
    }
}

/// Links `objects` to run at `base`; `resolve` finds kernel symbols.
pub fn link(
    objects: &[(String, Vec<u8>)],
    base: u64,
    resolve: &dyn Fn(&str) -> Result<u64, String>,
) -> Result<Linked, UpdateError> {
    let mut objs = Vec::new();
    for (name, data) in objects {
        let bad = |why: String| UpdateError::BadObject {
            object: name.clone(),
            why,
        };
        let elf = Elf::parse(data).map_err(|e| bad(format!("not an ELF object: {e}")))?;
        if elf.header.e_type != goblin::elf::header::ET_REL
            || elf.header.e_machine != goblin::elf::header::EM_X86_64
        {
            return Err(bad("not an x86-64 relocatable object (.o)".into()));
        }
        objs.push(Obj {
            name,
            data,
            elf,
            placed: HashMap::new(),
        });
    }
    let need_align = alignment(objects);
    if base % need_align != 0 {
        return Err(UpdateError::BadObject {
            object: objects.first().map(|o| o.0.clone()).unwrap_or_default(),
            why: format!("placed at {base:#x}, which is not aligned to the {need_align} bytes a section needs"),
        });
    }
    // Layout.
    let mut size = 0u64;
    for o in &mut objs {
        for (i, sh) in o.elf.section_headers.iter().enumerate() {
            let sname = o.elf.shdr_strtab.get_at(sh.sh_name).unwrap_or("");
            if !is_placed(sname, sh) {
                continue;
            }
            if NEEDS_KERNEL.contains(&sname) {
                return Err(UpdateError::BadObject {
                    object: o.name.to_owned(),
                    why: format!(
                        "section {sname} needs the kernel to process it at load time \
                         (exception fixups, jump labels, BUG/WARN, alternatives, static calls), \
                         which lucos does not do yet: rewrite the replacement without it"
                    ),
                });
            }
            if sh.sh_flags & SHF_WRITE as u64 != 0 {
                return Err(UpdateError::BadObject {
                    object: o.name.to_owned(),
                    why: format!(
                        "section {sname} is writable data; patch code is placed read-only, so a \
                         patch may use kernel data through its symbols but not define its own"
                    ),
                });
            }
            size = align(size, sh.sh_addralign.max(1));
            o.placed.insert(i, base + size);
            size += sh.sh_size;
        }
    }
    let mut bytes = vec![0u8; size as usize];
    for o in &objs {
        for (&i, &addr) in &o.placed {
            let sh = &o.elf.section_headers[i];
            if sh.sh_type == SHT_NOBITS {
                continue;
            }
            let src = o
                .data
                .get(sh.sh_offset as usize..(sh.sh_offset + sh.sh_size) as usize)
                .ok_or_else(|| UpdateError::BadObject {
                    object: o.name.to_owned(),
                    why: "a section lies past the end of the file".into(),
                })?;
            let at = (addr - base) as usize;
            bytes[at..at + src.len()].copy_from_slice(src);
        }
    }
    // Symbols defined by the patch: locals stay with their object; globals
    // share one namespace (two strong definitions are an error, a weak one
    // yields to a strong one).
    let mut globals: HashMap<String, (u64, bool, &str)> = HashMap::new();
    let mut locals: HashMap<(String, String), Vec<u64>> = HashMap::new();
    for o in &objs {
        for s in o.elf.syms.iter() {
            let name = o.elf.strtab.get_at(s.st_name).unwrap_or("");
            if name.is_empty() || s.st_type() == STT_FILE || s.st_type() == STT_SECTION {
                continue;
            }
            let Some(&sec) = o.placed.get(&s.st_shndx) else {
                continue;
            };
            let addr = sec + s.st_value;
            match s.st_bind() {
                STB_LOCAL => locals
                    .entry((o.name.to_owned(), name.to_owned()))
                    .or_default()
                    .push(addr),
                STB_GLOBAL | STB_WEAK => {
                    let weak = s.st_bind() == STB_WEAK;
                    match globals.get(name) {
                        Some(&(_, false, first)) if !weak => {
                            return Err(UpdateError::BadObject {
                                object: o.name.to_owned(),
                                why: format!(
                                    "{name} is defined in both {first} and {}: a patch's \
                                     global symbols share one namespace (make one static)",
                                    o.name
                                ),
                            })
                        }
                        Some(&(_, false, _)) => {}
                        Some(&(_, true, _)) if weak => {}
                        _ => {
                            globals.insert(name.to_owned(), (addr, weak, o.name));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let global_objects: HashMap<String, String> = globals
        .iter()
        .map(|(k, v)| (k.clone(), v.2.to_owned()))
        .collect();
    let globals: HashMap<String, u64> = globals.into_iter().map(|(k, v)| (k, v.0)).collect();
    // Relocations.
    for o in &objs {
        for (rel_idx, relocs) in &o.elf.shdr_relocs {
            let target = o.elf.section_headers[*rel_idx].sh_info as usize;
            let Some(&sec_addr) = o.placed.get(&target) else {
                continue;
            };
            let sec_name = o
                .elf
                .shdr_strtab
                .get_at(o.elf.section_headers[target].sh_name)
                .unwrap_or("?");
            for r in relocs.iter() {
                let sym = o
                    .elf
                    .syms
                    .get(r.r_sym)
                    .ok_or_else(|| UpdateError::BadObject {
                        object: o.name.to_owned(),
                        why: format!("relocation names symbol {} past the table", r.r_sym),
                    })?;
                let sname = o.elf.strtab.get_at(sym.st_name).unwrap_or("");
                let s_addr = if sym.st_type() == STT_SECTION {
                    *o.placed
                        .get(&sym.st_shndx)
                        .ok_or_else(|| UpdateError::BadObject {
                            object: o.name.to_owned(),
                            why: format!(
                                "relocation in {sec_name} against a section that is not placed"
                            ),
                        })?
                } else if let Some(&a) = o.placed.get(&sym.st_shndx) {
                    // A global defined here may have yielded (weak) to
                    // another object's strong definition.
                    match sym.st_bind() {
                        STB_LOCAL => a + sym.st_value,
                        _ => globals.get(sname).copied().unwrap_or(a + sym.st_value),
                    }
                } else if sym.st_shndx == 0 {
                    match globals.get(sname) {
                        Some(&a) => a,
                        None => resolve(sname).map_err(|why| UpdateError::Symbol {
                            patch: o.name.to_owned(),
                            why,
                        })?,
                    }
                } else {
                    return Err(UpdateError::BadObject {
                        object: o.name.to_owned(),
                        why: format!("symbol {sname} is in a section that is not placed"),
                    });
                };
                let p = sec_addr + r.r_offset;
                let a = r.r_addend.unwrap_or(0);
                let at = (p - base) as usize;
                let s_a = (s_addr as i64).wrapping_add(a);
                let overflow = |value: i64, bits| UpdateError::RelocationOverflow {
                    object: o.name.to_owned(),
                    symbol: sname.to_owned(),
                    value,
                    bits,
                };
                use goblin::elf::reloc::*;
                let (field, len): ([u8; 8], usize) = match r.r_type {
                    R_X86_64_64 => (s_a.to_le_bytes(), 8),
                    R_X86_64_PC64 => (s_a.wrapping_sub(p as i64).to_le_bytes(), 8),
                    R_X86_64_PC32 | R_X86_64_PLT32 => {
                        let v = s_a.wrapping_sub(p as i64);
                        let v32 = i32::try_from(v).map_err(|_| overflow(v, 32))?;
                        ((v32 as i64).to_le_bytes(), 4)
                    }
                    R_X86_64_32S => {
                        let v32 = i32::try_from(s_a).map_err(|_| overflow(s_a, 32))?;
                        ((v32 as i64).to_le_bytes(), 4)
                    }
                    R_X86_64_32 => {
                        let v32 = u32::try_from(s_a).map_err(|_| overflow(s_a, 32))?;
                        ((v32 as u64).to_le_bytes(), 4)
                    }
                    other => {
                        return Err(UpdateError::UnsupportedRelocation {
                            object: o.name.to_owned(),
                            section: sec_name.to_owned(),
                            kind: r_to_str(other, goblin::elf::header::EM_X86_64).to_owned(),
                            number: other,
                        })
                    }
                };
                let dst = bytes
                    .get_mut(at..at + len)
                    .ok_or_else(|| UpdateError::BadObject {
                        object: o.name.to_owned(),
                        why: format!(
                            "relocation at {sec_name}+{:#x} past its section",
                            r.r_offset
                        ),
                    })?;
                dst.copy_from_slice(&field[..len]);
            }
        }
    }
    Ok(Linked {
        base,
        bytes,
        globals,
        global_objects,
        locals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    use std::path::PathBuf;
    use std::process::Command;

    /// Compiles C `sources` (name, text) with kernel-like flags into objects.
    fn objects(tag: &str, sources: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        let dir: PathBuf =
            std::env::temp_dir().join(format!("lucos-link-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let out = sources
            .iter()
            .map(|(name, src)| {
                let c = dir.join(format!("{name}.c"));
                let o = dir.join(format!("{name}.o"));
                std::fs::write(&c, src).expect("write source");
                let st = Command::new("gcc")
                    .args(["-c", "-O2", "-fno-pic", "-mcmodel=kernel", "-fno-inline"])
                    .args(["-ffunction-sections", "-fdata-sections", "-mno-red-zone"])
                    .args(["-fno-asynchronous-unwind-tables", "-o"])
                    .arg(&o)
                    .arg(&c)
                    .status()
                    .expect("gcc (scripts/setup.sh installs it)");
                assert!(st.success(), "gcc {name}.c");
                (format!("{name}.o"), std::fs::read(&o).expect("object"))
            })
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    const BASE: u64 = 0xffff_ffff_c000_0000;
    const KERNEL_HELPER: u64 = 0xffff_ffff_8123_4560;

    fn kernel(name: &str) -> Result<u64, String> {
        match name {
            "helper" => Ok(KERNEL_HELPER),
            _ => Err(format!("no kernel symbol {name}")),
        }
    }

    /// The targets of the calls and jumps in the function at `addr`.
    fn branch_targets(l: &Linked, addr: u64) -> Vec<u64> {
        let code = &l.bytes[(addr - l.base) as usize..];
        let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
        let mut out = Vec::new();
        for ins in &mut d {
            if matches!(ins.mnemonic(), Mnemonic::Call | Mnemonic::Jmp) {
                out.push(ins.near_branch_target());
            }
            if ins.mnemonic() == Mnemonic::Ret {
                break;
            }
        }
        out
    }

    #[test]
    fn namesake_statics_link_to_their_own_callers_and_never_satisfy_another_object() {
        let objs = objects(
            "statics",
            &[
                ("a", "static int helper(int x) { return x * 3 + 1; }\nint fa(int x) { return helper(x) + 7; }\n"),
                ("b", "static int helper(int x) { return x * 5 + 2; }\nint fb(int x) { return helper(x) + 9; }\n"),
                ("c", "extern int helper(int);\nint fc(int x) { return helper(x) + 11; }\n"),
            ],
        );
        let l = link(&objs, BASE, &kernel).expect("link");
        let a_helper = l.symbol(Some("a.o"), "helper").expect("a's helper");
        let b_helper = l.symbol(Some("b.o"), "helper").expect("b's helper");
        assert_ne!(a_helper, b_helper);
        let fa = l.symbol(None, "fa").expect("fa");
        let fb = l.symbol(None, "fb").expect("fb");
        let fc = l.symbol(None, "fc").expect("fc");
        assert!(
            branch_targets(&l, fa).contains(&a_helper),
            "fa calls a.o's helper"
        );
        assert!(
            branch_targets(&l, fb).contains(&b_helper),
            "fb calls b.o's helper"
        );
        // c.o's undefined helper is the kernel's, not a static of a.o or b.o.
        assert!(
            branch_targets(&l, fc).contains(&KERNEL_HELPER),
            "fc calls the kernel's helper"
        );
        let e = l.symbol(None, "helper").expect_err("ambiguous");
        assert!(e.contains("more than one object"), "{e}");
        assert!(l.symbol(Some("c.o"), "helper").is_err());
    }

    #[test]
    fn duplicate_globals_are_refused_by_name_and_a_weak_one_yields() {
        let objs = objects(
            "dups",
            &[
                ("a", "int twice(void) { return 1; }\n"),
                ("b", "int twice(void) { return 2; }\n"),
            ],
        );
        let e = link(&objs, BASE, &kernel).expect_err("two strong definitions");
        let msg = e.to_string();
        assert!(
            msg.contains("twice is defined in both a.o and b.o"),
            "{msg}"
        );

        let objs = objects(
            "weak",
            &[
                (
                    "a",
                    "__attribute__((weak)) int pick(void) { return 1; }\nint usea(void) { return pick() + 40; }\n",
                ),
                ("b", "int pick(void) { return 2; }\n"),
            ],
        );
        let l = link(&objs, BASE, &kernel).expect("link");
        let strong = l.symbol(None, "pick").expect("pick");
        let usea = l.symbol(None, "usea").expect("usea");
        assert!(
            branch_targets(&l, usea).contains(&strong),
            "a.o's call goes to b.o's strong pick"
        );
    }

    #[test]
    fn sections_keep_their_alignment() {
        let objs = objects(
            "align",
            &[(
                "a",
                "char first(void) { return 1; }\n\
                 const char table[256] __attribute__((aligned(512))) = { 1, 2, 3 };\n\
                 const char *get(void) { return table; }\n",
            )],
        );
        assert_eq!(alignment(&objs), 512);
        let e = link(&objs, BASE + 64, &kernel).expect_err("misaligned base");
        assert!(
            e.to_string().contains("not aligned to the 512 bytes"),
            "{e}"
        );
        let l = link(&objs, BASE + 1024, &kernel).expect("link");
        let t = l.symbol(None, "table").expect("table");
        assert_eq!(t % 512, 0, "table at {t:#x}");
        assert_eq!(&l.bytes[(t - l.base) as usize..][..3], &[1, 2, 3]);
    }
}
