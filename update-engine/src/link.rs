//! Links a patch's relocatable objects at their place in guest memory:
//! lays out their allocated sections, resolves symbols against the patch
//! itself and then the running kernel, and applies x86-64 relocations.

use std::collections::HashMap;

use goblin::elf::section_header::{SHF_ALLOC, SHF_WRITE, SHT_NOBITS};
use goblin::elf::sym::{STT_FILE, STT_SECTION};
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
    /// Defined (non-local and local) function and object symbols → address.
    pub symbols: HashMap<String, u64>,
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
    // Layout.
    let mut size = 0u64;
    for o in &mut objs {
        for (i, sh) in o.elf.section_headers.iter().enumerate() {
            let sname = o.elf.shdr_strtab.get_at(sh.sh_name).unwrap_or("");
            if sh.sh_flags & SHF_ALLOC as u64 == 0 || sh.sh_size == 0 || SKIPPED.contains(&sname) {
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
    // Symbols defined by the patch: globals first so any object can use them.
    let mut symbols = HashMap::new();
    for o in &objs {
        for s in o.elf.syms.iter() {
            let name = o.elf.strtab.get_at(s.st_name).unwrap_or("");
            if name.is_empty() || s.st_type() == STT_FILE || s.st_type() == STT_SECTION {
                continue;
            }
            if let Some(&sec) = o.placed.get(&s.st_shndx) {
                symbols.insert(name.to_owned(), sec + s.st_value);
            }
        }
    }
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
                    a + sym.st_value
                } else if sym.st_shndx == 0 {
                    match symbols.get(sname) {
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
        symbols,
    })
}
