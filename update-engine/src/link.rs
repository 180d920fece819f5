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
//!
//! Alternatives (`.altinstructions`) are applied here, as the kernel's
//! module loader would: each site whose CPU feature the running kernel has
//! (or lacks, for a `NOT` entry) gets its replacement, relocated for the
//! site's own address and padded with NOPs, in table order, so a later entry
//! for the same site wins as in `apply_alternatives`.

use std::collections::HashMap;

use goblin::elf::section_header::{SHF_ALLOC, SHF_WRITE, SHT_NOBITS};
use goblin::elf::sym::{STB_GLOBAL, STB_LOCAL, STB_WEAK, STT_FILE, STT_SECTION};
use goblin::elf::Elf;

use crate::UpdateError;

/// Allocated sections a patch object carries that are metadata for the
/// kernel's own boot-time code patching or unwinding, not code or data to
/// place. Leaving them out keeps the code as the compiler wrote it:
/// `__fentry__` calls and return-thunk jumps stay calls to the running
/// kernel's functions (correct, if not the fastest), `lock` prefixes stay,
/// static calls stay calls to their trampoline (`__SCT__*`, which the kernel
/// keeps pointing at the current target), paravirt sites stay indirect
/// calls through `pv_ops`. Without ORC data the kernel's unwinder cannot
/// walk through patch code.
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
    ".static_call_sites",
    ".parainstructions",
    ALT_TABLE,
    ALT_REPLACEMENT,
];

/// Alignment and granularity of the patch's own writable data: a page. The
/// guest writes those pages natively (write control opens them), so they
/// hold nothing else: no code, no other patch's data.
pub const WRITABLE_ALIGN: u64 = 4096;

/// Whether writable section `name` can be a patch's own data: ordinary
/// variables (`.data`, `.bss`, GCC's per-variable `.data.NAME`/`.bss.NAME`,
/// the kernel's `.data.once`, `.data..read_mostly`, cache-aligned ones). Not
/// per-CPU variables (addressed through %gs relative to the per-CPU area),
/// `__ro_after_init` ones, or sections the kernel itself walks (`__dyndbg`,
/// `__param`, tracepoints...).
pub fn is_own_data_section(name: &str) -> bool {
    (name == ".data" || name == ".bss" || name.starts_with(".data.") || name.starts_with(".bss."))
        && !name.contains("percpu")
        && !name.contains("..ro_after_init")
        && !name.contains("..page_aligned")
}

/// The alternatives table: applied at link time ([`link_with`]), not
/// placed, like the replacements it points into.
pub const ALT_TABLE: &str = ".altinstructions";
/// The replacements the alternatives table points into.
pub const ALT_REPLACEMENT: &str = ".altinstr_replacement";
/// Size of one `struct alt_instr` (Linux 6.1: two `s32` offsets, `u16`
/// feature with the `NOT` flag in bit 15, two `u8` lengths).
pub const ALT_ENTRY: usize = 12;
const ALT_FLAG_NOT: u16 = 1 << 15;

/// Sections whose code only works once the kernel has processed them
/// (jump labels, BUG/WARN entries): a patch with them is refused rather
/// than placed without them.
const NEEDS_KERNEL: &[&str] = &["__jump_table", "__bug_table"];

/// The exception table: entries for the patch's own instructions that may
/// fault, placed together after the rest of the read-only data and sorted,
/// so the kernel can search them as one table (see [`crate::extable`]).
pub const EX_TABLE: &str = "__ex_table";
/// Size of one `struct exception_table_entry` (x86-64 Linux: three `s32`,
/// the instruction and the fixup relative to themselves, and the data).
pub const EX_ENTRY: usize = 12;

/// A patch's exception table, as linked: sorted by instruction address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExTable {
    /// Guest-virtual address of the first entry.
    pub addr: u64,
    /// Entries.
    pub count: u64,
}

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
    /// The patch's own writable data (new variables): (address, length),
    /// after its code; the guest may write there.
    pub writable: Vec<(u64, u64)>,
    /// The named variables in that data.
    pub variables: Vec<Variable>,
    /// Its exception table, if its code has one.
    pub extable: Option<ExTable>,
}

/// A variable of a patch's own writable data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Variable {
    /// The patch object that defines it.
    pub object: String,
    /// Its symbol.
    pub name: String,
    /// Guest-virtual address.
    #[serde(with = "symbol_db::hex_u64")]
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
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
                if sh.sh_flags & SHF_WRITE as u64 != 0 {
                    a = a.max(WRITABLE_ALIGN);
                }
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

impl Obj<'_> {
    fn bad(&self, why: String) -> UpdateError {
        UpdateError::BadObject {
            object: self.name.to_owned(),
            why,
        }
    }

    fn section_name(&self, i: usize) -> &str {
        self.elf
            .section_headers
            .get(i)
            .and_then(|sh| self.elf.shdr_strtab.get_at(sh.sh_name))
            .unwrap_or("?")
    }

    /// The section named `name`, if the object has one.
    fn section(&self, name: &str) -> Option<usize> {
        (0..self.elf.section_headers.len()).find(|&i| self.section_name(i) == name)
    }

    /// The bytes of section `i` in the file.
    fn section_bytes(&self, i: usize) -> Result<&[u8], UpdateError> {
        let sh = &self.elf.section_headers[i];
        self.data
            .get(sh.sh_offset as usize..(sh.sh_offset + sh.sh_size) as usize)
            .ok_or_else(|| self.bad("a section lies past the end of the file".into()))
    }

    /// The relocations that apply to section `i`.
    fn relocations_of(&self, i: usize) -> Vec<goblin::elf::Reloc> {
        self.elf
            .shdr_relocs
            .iter()
            .filter(|(r, _)| self.elf.section_headers[*r].sh_info as usize == i)
            .flat_map(|(_, rs)| rs.iter())
            .collect()
    }

    /// The address the symbol `r_sym` of a relocation in `sec_name` stands
    /// for, and its name.
    fn symbol_address(
        &self,
        r_sym: usize,
        globals: &HashMap<String, u64>,
        resolve: &dyn Fn(&str) -> Result<u64, String>,
        sec_name: &str,
    ) -> Result<(u64, &str), UpdateError> {
        let sym =
            self.elf.syms.get(r_sym).ok_or_else(|| {
                self.bad(format!("relocation names symbol {r_sym} past the table"))
            })?;
        let sname = self.elf.strtab.get_at(sym.st_name).unwrap_or("");
        let addr = if sym.st_type() == STT_SECTION {
            *self.placed.get(&sym.st_shndx).ok_or_else(|| {
                self.bad(format!(
                    "relocation in {sec_name} against a section that is not placed"
                ))
            })?
        } else if let Some(&a) = self.placed.get(&sym.st_shndx) {
            // A global defined here may have yielded (weak) to another
            // object's strong definition.
            match sym.st_bind() {
                STB_LOCAL => a + sym.st_value,
                _ => globals.get(sname).copied().unwrap_or(a + sym.st_value),
            }
        } else if sym.st_shndx == 0 {
            match globals.get(sname) {
                Some(&a) => a,
                None => resolve(sname).map_err(|why| UpdateError::Symbol {
                    patch: self.name.to_owned(),
                    why,
                })?,
            }
        } else {
            return Err(self.bad(format!("symbol {sname} is in a section that is not placed")));
        };
        Ok((addr, sname))
    }

    /// Writes the value of a relocation of type `r_type` (symbol plus
    /// addend `s_a`, place `p`) at `bytes[at..]`.
    #[allow(clippy::too_many_arguments)]
    fn relocate(
        &self,
        bytes: &mut [u8],
        at: usize,
        r_type: u32,
        s_a: i64,
        p: u64,
        sname: &str,
        sec_name: &str,
        r_offset: u64,
    ) -> Result<(), UpdateError> {
        let overflow = |value: i64, bits| UpdateError::RelocationOverflow {
            object: self.name.to_owned(),
            symbol: sname.to_owned(),
            value,
            bits,
        };
        use goblin::elf::reloc::*;
        let (field, len): ([u8; 8], usize) = match r_type {
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
                    object: self.name.to_owned(),
                    section: sec_name.to_owned(),
                    kind: r_to_str(other, goblin::elf::header::EM_X86_64).to_owned(),
                    number: other,
                })
            }
        };
        let dst = bytes.get_mut(at..at + len).ok_or_else(|| {
            self.bad(format!(
                "relocation at {sec_name}+{r_offset:#x} past its section"
            ))
        })?;
        dst.copy_from_slice(&field[..len]);
        Ok(())
    }

    /// Applies the object's alternatives to its placed code in `bytes`
    /// (which starts at `base`), as Linux's `apply_alternatives` does for a
    /// module: an entry whose feature test passes copies its replacement over
    /// the site, relocated for the site's address, and pads the rest of the
    /// site with NOPs; entries are taken in table order.
    fn apply_alternatives(
        &self,
        bytes: &mut [u8],
        base: u64,
        globals: &HashMap<String, u64>,
        resolve: &dyn Fn(&str) -> Result<u64, String>,
        cpu_has: &dyn Fn(u16) -> Result<bool, String>,
    ) -> Result<(), UpdateError> {
        let Some(table) = self.section(ALT_TABLE) else {
            return Ok(());
        };
        let entries = self.section_bytes(table)?;
        if entries.len() % ALT_ENTRY != 0 {
            return Err(self.bad(format!(
                "{ALT_TABLE} is {} bytes, not a whole number of {ALT_ENTRY}-byte entries",
                entries.len()
            )));
        }
        let repl = self.section(ALT_REPLACEMENT);
        let repl_bytes = match repl {
            Some(i) => self.section_bytes(i)?,
            None => &[],
        };
        let repl_relocs = repl.map(|i| self.relocations_of(i)).unwrap_or_default();
        let table_relocs = self.relocations_of(table);
        // What field `at` of the table points at: (symbol's section, offset).
        let field = |at: u64| -> Result<(usize, u64), UpdateError> {
            let r = table_relocs
                .iter()
                .find(|r| r.r_offset == at)
                .ok_or_else(|| self.bad(format!("{ALT_TABLE}+{at:#x} has no relocation")))?;
            let sym = self
                .elf
                .syms
                .get(r.r_sym)
                .ok_or_else(|| self.bad(format!("{ALT_TABLE}+{at:#x}: no such symbol")))?;
            let off = sym.st_value as i64 + r.r_addend.unwrap_or(0);
            Ok((sym.st_shndx, off as u64))
        };
        for (n, e) in entries.chunks_exact(ALT_ENTRY).enumerate() {
            let at = (n * ALT_ENTRY) as u64;
            let cpuid = u16::from_le_bytes([e[8], e[9]]);
            let (instrlen, repllen) = (e[10] as usize, e[11] as usize);
            let (site_sec, site_off) = field(at)?;
            let Some(&site_sec_addr) = self.placed.get(&site_sec) else {
                continue; // an alternative in code the patch does not place
            };
            let site = site_sec_addr + site_off;
            let feature = cpuid & !ALT_FLAG_NOT;
            let has = cpu_has(feature).map_err(|why| {
                self.bad(format!(
                    "its code has alternatives (CPU feature {}*32+{}), and {why}",
                    feature >> 5,
                    feature & 31
                ))
            })?;
            if has == (cpuid & ALT_FLAG_NOT != 0) {
                continue;
            }
            let (repl_sec, repl_off) = field(at + 4)?;
            if Some(repl_sec) != repl {
                return Err(self.bad(format!(
                    "{ALT_TABLE} entry {n} points outside {ALT_REPLACEMENT}"
                )));
            }
            let end = site_sec_addr + self.elf.section_headers[site_sec].sh_size;
            let src = repl_bytes
                .get(repl_off as usize..repl_off as usize + repllen)
                .filter(|_| repllen <= instrlen && site + instrlen as u64 <= end)
                .ok_or_else(|| {
                    self.bad(format!(
                        "{ALT_TABLE} entry {n}: a {repllen}-byte replacement at \
                         {ALT_REPLACEMENT}+{repl_off:#x} for a {instrlen}-byte site does not fit"
                    ))
                })?;
            let at_site = (site - base) as usize;
            bytes[at_site..at_site + repllen].copy_from_slice(src);
            bytes[at_site + repllen..at_site + instrlen].fill(0x90);
            for r in &repl_relocs {
                if r.r_offset < repl_off || r.r_offset >= repl_off + repllen as u64 {
                    continue;
                }
                let width = if matches!(
                    r.r_type,
                    goblin::elf::reloc::R_X86_64_64 | goblin::elf::reloc::R_X86_64_PC64
                ) {
                    8
                } else {
                    4
                };
                if r.r_offset + width > repl_off + repllen as u64 {
                    return Err(self.bad(format!(
                        "a relocation at {ALT_REPLACEMENT}+{:#x} reaches past its replacement",
                        r.r_offset
                    )));
                }
                let (s_addr, sname) =
                    self.symbol_address(r.r_sym, globals, resolve, ALT_REPLACEMENT)?;
                let p = site + (r.r_offset - repl_off);
                let s_a = (s_addr as i64).wrapping_add(r.r_addend.unwrap_or(0));
                self.relocate(
                    bytes,
                    (p - base) as usize,
                    r.r_type,
                    s_a,
                    p,
                    sname,
                    ALT_REPLACEMENT,
                    r.r_offset,
                )?;
            }
        }
        Ok(())
    }
}

fn align(x: u64, a: u64) -> u64 {
    if a <= 1 {
        x
    } else {
        x.div_ceil(a) * a
    }
}

/// Links `objects` to run at `base`; `resolve` finds kernel symbols. A
/// patch with alternatives needs [`link_with`].
pub fn link(
    objects: &[(String, Vec<u8>)],
    base: u64,
    resolve: &dyn Fn(&str) -> Result<u64, String>,
) -> Result<Linked, UpdateError> {
    link_with(objects, base, resolve, &|_| {
        Err("the running kernel's CPU features are not known here".into())
    })
}

/// Links `objects` to run at `base`; `resolve` finds kernel symbols,
/// `cpu_has` tells whether the running kernel has a CPU feature (a bit
/// number of its `boot_cpu_data.x86_capability`, as `X86_FEATURE_*` are
/// numbered), for the patch's alternatives.
pub fn link_with(
    objects: &[(String, Vec<u8>)],
    base: u64,
    resolve: &dyn Fn(&str) -> Result<u64, String>,
    cpu_has: &dyn Fn(u16) -> Result<bool, String>,
) -> Result<Linked, UpdateError> {
    link_objects(objects, base, &|_, s| resolve(s), cpu_has)
}

/// [`link_with`], where what an undefined symbol stands for depends on the
/// object that refers to it: `resolve(object, symbol)` (a patch object
/// linked against a module finds the module's symbols first).
pub fn link_objects(
    objects: &[(String, Vec<u8>)],
    base: u64,
    resolve: &dyn Fn(&str, &str) -> Result<u64, String>,
    cpu_has: &dyn Fn(u16) -> Result<bool, String>,
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
    // Layout: code and read-only data first, then the patch's own writable
    // data (its new variables), together after them.
    // The exception tables of all objects come together after the
    // read-only data: one table.
    let mut size = 0u64;
    let mut writable = Vec::new();
    let mut ex_range = None;
    let mut ex_first = None;
    for (pass_writable, pass_ex) in [(false, false), (false, true), (true, false)] {
        let before = size;
        if pass_writable {
            size = align(size, WRITABLE_ALIGN);
        }
        let start = size;
        for o in &mut objs {
            for (i, sh) in o.elf.section_headers.iter().enumerate() {
                let sname = o.elf.shdr_strtab.get_at(sh.sh_name).unwrap_or("");
                if !is_placed(sname, sh) {
                    continue;
                }
                if (sname == EX_TABLE) != pass_ex {
                    continue;
                }
                if pass_ex
                    && (sh.sh_size % EX_ENTRY as u64 != 0 || sh.sh_flags & SHF_WRITE as u64 != 0)
                {
                    return Err(UpdateError::BadObject {
                        object: o.name.to_owned(),
                        why: format!(
                            "{EX_TABLE} is not read-only {EX_ENTRY}-byte entries \
                             ({} bytes)",
                            sh.sh_size
                        ),
                    });
                }
                if NEEDS_KERNEL.contains(&sname) {
                    return Err(UpdateError::BadObject {
                        object: o.name.to_owned(),
                        why: format!(
                            "section {sname} needs the kernel to process it at load time \
                             (exception fixups, jump labels, BUG/WARN), which lucos does not \
                             do: rewrite the replacement without it"
                        ),
                    });
                }
                let writable = sh.sh_flags & SHF_WRITE as u64 != 0;
                if writable && !is_own_data_section(sname) {
                    return Err(UpdateError::BadObject {
                        object: o.name.to_owned(),
                        why: format!(
                            "section {sname} is writable data a patch cannot own (per-CPU, \
                             read-only after init, or a table the kernel walks)"
                        ),
                    });
                }
                if writable != pass_writable {
                    continue;
                }
                if pass_ex && ex_first.is_some() && align(size, sh.sh_addralign.max(1)) != size {
                    return Err(o.bad(format!(
                        "its {EX_TABLE} is aligned to {} bytes: the objects' tables would not \
                         make one table",
                        sh.sh_addralign
                    )));
                }
                size = align(size, sh.sh_addralign.max(1));
                if pass_ex && ex_first.is_none() {
                    ex_first = Some(size);
                }
                o.placed.insert(i, base + size);
                size += sh.sh_size;
            }
        }
        if let (true, Some(first)) = (pass_ex, ex_first) {
            ex_range = Some((first, size));
        }
        if pass_writable {
            if size > start {
                size = align(size, WRITABLE_ALIGN);
                writable.push((base + start, size - start));
            } else {
                size = before; // no writable data: no padding for it
            }
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
    let mut variables = Vec::new();
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
            let in_writable = o
                .elf
                .section_headers
                .get(s.st_shndx)
                .is_some_and(|h| h.sh_flags & SHF_WRITE as u64 != 0);
            if in_writable && s.st_type() == goblin::elf::sym::STT_OBJECT && s.st_size > 0 {
                variables.push(Variable {
                    object: o.name.to_owned(),
                    name: name.to_owned(),
                    addr,
                    size: s.st_size,
                });
            }
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
            let sec_name = o.section_name(target);
            let resolve = |s: &str| resolve(o.name, s);
            for r in relocs.iter() {
                let (s_addr, sname) = o.symbol_address(r.r_sym, &globals, &resolve, sec_name)?;
                let p = sec_addr + r.r_offset;
                let at = (p - base) as usize;
                let s_a = (s_addr as i64).wrapping_add(r.r_addend.unwrap_or(0));
                o.relocate(
                    &mut bytes, at, r.r_type, s_a, p, sname, sec_name, r.r_offset,
                )?;
            }
        }
    }
    for o in &objs {
        let resolve = |s: &str| resolve(o.name, s);
        o.apply_alternatives(&mut bytes, base, &globals, &resolve, cpu_has)?;
    }
    let extable = match ex_range {
        Some((start, end)) => Some(sort_extable(&mut bytes, base, start, end, &objs)?),
        None => None,
    };
    Ok(Linked {
        base,
        bytes,
        globals,
        global_objects,
        locals,
        writable,
        variables,
        extable,
    })
}

/// Sorts the linked exception table at `start..end` of `bytes` (which
/// starts at `base`) by instruction address, as the kernel sorts its own
/// at boot, re-encoding each entry's offsets for its new place. Every
/// instruction and fixup must be in the patch's code.
fn sort_extable(
    bytes: &mut [u8],
    base: u64,
    start: u64,
    end: u64,
    objs: &[Obj<'_>],
) -> Result<ExTable, UpdateError> {
    let bad = |why: String| UpdateError::BadObject {
        object: objs.iter().map(|o| o.name).collect::<Vec<_>>().join(","),
        why,
    };
    let field = |b: &[u8], at: usize| i32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let code_end = base + start;
    let mut entries = Vec::new();
    for (n, e) in bytes[start as usize..end as usize]
        .chunks_exact(EX_ENTRY)
        .enumerate()
    {
        let at = base + start + (n * EX_ENTRY) as u64;
        let insn = at.wrapping_add_signed(field(e, 0).into());
        let fixup = (at + 4).wrapping_add_signed(field(e, 4).into());
        for (what, a) in [("instruction", insn), ("fixup", fixup)] {
            if !(base..code_end).contains(&a) {
                return Err(bad(format!(
                    "{EX_TABLE} entry {n}: its {what} ({a:#x}) is not in the patch's code"
                )));
            }
        }
        entries.push((insn, fixup, field(e, 8)));
    }
    entries.sort_by_key(|e| e.0);
    for (n, (insn, fixup, data)) in entries.iter().enumerate() {
        let at = base + start + (n * EX_ENTRY) as u64;
        let off = (start as usize) + n * EX_ENTRY;
        // Within one patch: the differences fit in 32 bits.
        let rel = |to: u64, from: u64| (to.wrapping_sub(from) as i64) as i32;
        bytes[off..off + 4].copy_from_slice(&rel(*insn, at).to_le_bytes());
        bytes[off + 4..off + 8].copy_from_slice(&rel(*fixup, at + 4).to_le_bytes());
        bytes[off + 8..off + 12].copy_from_slice(&data.to_le_bytes());
    }
    Ok(ExTable {
        addr: base + start,
        count: entries.len() as u64,
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

    /// A function whose `movl $1` has an alternative `movl $2; call helper`
    /// for CPU feature `feature` (with bit 15 the `NOT` flag), laid out as
    /// Linux's ALTERNATIVE macro lays it out.
    fn alternative_object(tag: &str, feature: u16) -> Vec<(String, Vec<u8>)> {
        let src = format!(
            "int feat(void) {{\n int r;\n asm volatile(\"661:\\n\\tmovl $1, %0\\n662:\\n\"\n\
             \".skip -(((665f-664f)-(662b-661b)) > 0) * ((665f-664f)-(662b-661b)),0x90\\n663:\\n\"\n\
             \".pushsection .altinstructions,\\\"a\\\"\\n\"\n\
             \" .long 661b - .\\n .long 664f - .\\n .word {feature}\\n .byte 663b-661b\\n .byte 665f-664f\\n\"\n\
             \".popsection\\n.pushsection .altinstr_replacement,\\\"ax\\\"\\n\"\n\
             \"664:\\n\\tmovl $2, %0\\n\\tcall helper\\n665:\\n.popsection\\n\" : \"=a\"(r));\n return r;\n}}\n"
        );
        objects(tag, &[("alt", &src)])
    }

    /// The first instructions of the function at `addr`.
    fn first(l: &Linked, addr: u64, n: usize) -> Vec<iced_x86::Instruction> {
        let code = &l.bytes[(addr - l.base) as usize..];
        Decoder::with_ip(64, code, addr, DecoderOptions::NONE)
            .into_iter()
            .take(n)
            .collect()
    }

    #[test]
    fn alternatives_are_applied_for_the_running_kernels_cpu_features() {
        let objs = alternative_object("alt", 5);
        // The feature is there: the replacement, its call relocated for
        // where it now is.
        let l = link_with(&objs, BASE, &kernel, &|f| Ok(f == 5)).expect("link");
        let f = l.symbol(None, "feat").expect("feat");
        let ins = first(&l, f, 2);
        assert_eq!(ins[0].mnemonic(), Mnemonic::Mov);
        assert_eq!(ins[0].immediate32(), 2, "{ins:?}");
        assert_eq!(ins[1].mnemonic(), Mnemonic::Call);
        assert_eq!(ins[1].near_branch_target(), KERNEL_HELPER);
        // Not there: the original, padded with NOPs; no call.
        let l = link_with(&objs, BASE, &kernel, &|_| Ok(false)).expect("link");
        let ins = first(&l, l.symbol(None, "feat").expect("feat"), 2);
        assert_eq!(ins[0].immediate32(), 1, "{ins:?}");
        assert_eq!(ins[1].mnemonic(), Mnemonic::Nop);
        // A NOT entry: replaced when the feature is missing.
        let objs = alternative_object("altnot", 5 | ALT_FLAG_NOT);
        let l = link_with(&objs, BASE, &kernel, &|_| Ok(false)).expect("link");
        let ins = first(&l, l.symbol(None, "feat").expect("feat"), 1);
        assert_eq!(ins[0].immediate32(), 2, "{ins:?}");
        // Features that cannot be told: refused, saying why.
        let e = link(&objs, BASE, &kernel).expect_err("features unknown");
        assert!(
            e.to_string().contains("alternatives (CPU feature 0*32+5)"),
            "{e}"
        );
    }

    #[test]
    fn an_exception_table_is_sorted_by_instruction_and_reencoded_for_its_new_places() {
        // Code at 0x1000..0x1100 (base 0x1000), a table of three entries
        // at 0x1100 in the order the objects gave them.
        let base = 0x1000u64;
        let mut bytes = vec![0u8; 0x100 + 3 * EX_ENTRY];
        let put = |b: &mut Vec<u8>, n: usize, insn: u64, fixup: u64, data: i32| {
            let at = base + 0x100 + (n * EX_ENTRY) as u64;
            let o = 0x100 + n * EX_ENTRY;
            b[o..o + 4].copy_from_slice(&((insn as i64 - at as i64) as i32).to_le_bytes());
            b[o + 4..o + 8]
                .copy_from_slice(&((fixup as i64 - (at + 4) as i64) as i32).to_le_bytes());
            b[o + 8..o + 12].copy_from_slice(&data.to_le_bytes());
        };
        put(&mut bytes, 0, 0x1080, 0x1084, 1);
        put(&mut bytes, 1, 0x1010, 0x1014, 2);
        put(&mut bytes, 2, 0x1040, 0x10f0, 3);
        let t = sort_extable(&mut bytes, base, 0x100, 0x100 + 3 * EX_ENTRY as u64, &[])
            .expect("sorted");
        assert_eq!(
            t,
            ExTable {
                addr: 0x1100,
                count: 3
            }
        );
        let read = |n: usize| {
            let at = 0x1100 + (n * EX_ENTRY) as u64;
            let o = 0x100 + n * EX_ENTRY;
            let f = |k: usize| {
                i32::from_le_bytes(bytes[o + k..o + k + 4].try_into().expect("4 or 8 bytes"))
            };
            (
                at.wrapping_add_signed(f(0).into()),
                (at + 4).wrapping_add_signed(f(4).into()),
                f(8),
            )
        };
        assert_eq!(
            [read(0), read(1), read(2)],
            [
                (0x1010, 0x1014, 2),
                (0x1040, 0x10f0, 3),
                (0x1080, 0x1084, 1)
            ]
        );
        // An entry for an instruction outside the patch's code is refused.
        put(&mut bytes, 0, 0x2000, 0x1004, 1);
        let e = sort_extable(&mut bytes, base, 0x100, 0x100 + 3 * EX_ENTRY as u64, &[])
            .expect_err("outside");
        assert!(e.to_string().contains("not in the patch's code"), "{e}");
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
