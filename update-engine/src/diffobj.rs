//! Turns two builds of one kernel object file, as it is and as a source diff
//! changes it (both with `-ffunction-sections -fdata-sections`), into a
//! patch object: the functions the diff changed or added, what they need
//! that the running kernel lacks (string literals, anonymous read-only data,
//! functions the kernel inlined away, variables the diff adds: the patch's
//! own writable data), and every other reference left
//! undefined, to be resolved against the running kernel by name (with its
//! position among namesakes for a `static`).
//!
//! A function is changed when its bytes or its relocations differ, each
//! relocation compared by what it points at (a symbol by name, a string
//! literal by its text, other anonymous data by section and offset), so a
//! string that moved within `.rodata.str1.1` is no change and an inlined
//! helper that changed makes its callers changed. What lucos cannot carry
//! is refused by name: code the kernel runs once (`__init`, `__exit`),
//! changed initial values of existing data, existing data the kernel has
//! no symbol for, and code
//! that needs the kernel to process a table at load time (exception
//! fixups, BUG/WARN entries, jump labels). Alternatives go with their
//! function (the entries and replacements, applied by lucos's linker for the
//! running kernel's CPU); paravirt and static-call sites stay calls through
//! `pv_ops` and the static-call trampolines, which are always right.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use object::elf::{SHF_MERGE, SHF_STRINGS, SHF_WRITE};
use object::read::{
    Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionIndex, SymbolIndex,
};
use object::write;
use object::{RelocationFlags, SectionFlags, SectionKind, SymbolKind, SymbolScope};

/// Sections that hold entries the kernel processes at boot or load for the
/// code they point into; a function with an entry in one is refused.
const KERNEL_TABLES: &[(&str, &str)] = &[
    ("__bug_table", "BUG/WARN entries"),
    ("__jump_table", "jump labels (static keys)"),
    ("__tracepoints_ptrs", "tracepoints"),
];

/// The alternatives table, its replacements, and the out-of-line code of
/// `static_cpu_has` (reached only from alternative sites that the kernel,
/// and lucos's linker, always rewrite: `ALTERNATIVE_TERNARY` with
/// `X86_FEATURE_ALWAYS`).
use crate::link::{ALT_REPLACEMENT, ALT_TABLE, EX_ENTRY, EX_TABLE};
const ALT_AUX: &str = ".altinstr_aux";
/// Size of one `struct alt_instr` (Linux 6.1).
const ALT_ENTRY: u64 = crate::link::ALT_ENTRY as u64;

/// Whether object `obj` has jump-label, BUG/WARN or exception-table
/// entries: the sites `lucos build --diff` compiles differently for patch
/// code (guest-kernels/linux/patch-include/).
pub fn has_rewritten_tables(obj: &[u8]) -> bool {
    object::File::parse(obj).is_ok_and(|f| {
        f.sections().any(|s| {
            matches!(s.name(), Ok("__jump_table" | "__bug_table" | "__ex_table")) && s.size() > 0
        })
    })
}

/// Offset of `lineno` in Linux's `struct _ddebug` (after four pointers:
/// modname, function, filename, format) and its bits (`lineno:18`).
const DYNDBG_LINENO: usize = 32;
const DYNDBG_LINENO_MASK: u32 = (1 << 18) - 1;

/// Whether `name` is a function GCC cloned with a calling convention of its
/// own choosing (parameters dropped or split, constants propagated, part of
/// a function split out).
fn is_clone(name: &str) -> bool {
    [".isra.", ".constprop.", ".part."]
        .iter()
        .any(|c| name.contains(c))
}

/// Checks, for an object built twice (`plain`: with the kernel's headers,
/// the kernel's own code; `rewritten`: with lucos's headers for patch code,
/// which compile static branches, WARN and user accesses differently), that
/// what the patch `diff` replaces or calls in the running kernel means the
/// same in both: every local function it names is one the kernel's build
/// has, and every GCC clone has the same calling convention in both (some
/// caller of it, or without callers the clone itself, is the same code in
/// both builds, and GCC gives a clone one convention in a build).
pub fn check_clone_conventions(
    name: &str,
    plain: &[u8],
    rewritten: &[u8],
    diff: &ObjectDiff,
) -> Result<(), String> {
    match unproven_clones(name, plain, rewritten, diff)?.first() {
        None => Ok(()),
        Some((clone, callers)) => Err(clone_unproven(clone, callers)),
    }
}

/// Why a call of GCC clone `clone` (callers in the kernel's build:
/// `callers`) cannot be shown to match the running kernel.
pub fn clone_unproven(clone: &str, callers: &[String]) -> String {
    format!(
        "{clone} is a GCC clone (its calling convention is GCC's choice in each build), and no \
         caller of it ({}) compiles the same for patch code (lucos's headers: static branches, \
         WARN, user accesses) as in the kernel's build: lucos cannot show that the patch calls \
         it as the running kernel does",
        if callers.is_empty() {
            "none but its address".to_owned()
        } else {
            callers.join(", ")
        }
    )
}

/// The GCC clones the patch `diff` calls in the running kernel whose calling
/// convention there cannot be shown to be the one patch code uses, each
/// with its callers in the kernel's build (none: only its address is
/// taken); see
/// [`check_clone_conventions`]. An error for a local function that is one
/// of its own only in the build for patch code.
pub fn unproven_clones(
    name: &str,
    plain: &[u8],
    rewritten: &[u8],
    diff: &ObjectDiff,
) -> Result<Vec<(String, Vec<String>)>, String> {
    let a = Obj::parse(name, plain)?;
    let b = Obj::parse(name, rewritten)?;
    let (a_alts, b_alts) = (a.alternatives()?, b.alternatives()?);
    let mut involved: BTreeSet<String> = diff.references.keys().cloned().collect();
    if !diff.object.is_empty() {
        object::File::parse(&*diff.object).map_err(|e| e.to_string())?;
        for n in undefined_symbols(&diff.object) {
            involved.insert(n.split('#').next().unwrap_or(&n).to_owned());
        }
    }
    let same = |f: &str| -> Result<bool, String> {
        match (a.funcs.get(f), b.funcs.get(f)) {
            (Some(&(s1, o1, z1, _)), Some(&(s2, o2, z2, _))) => {
                Ok(fingerprint(&a, &a_alts, f, (s1, o1, z1))?
                    == fingerprint(&b, &b_alts, f, (s2, o2, z2))?)
            }
            _ => Ok(false),
        }
    };
    // A function of this object the patch calls in the running kernel must
    // be one the kernel's build has: else the name could be a namesake of
    // another file.
    for f in &involved {
        if b.funcs.get(f).is_some_and(|x| x.3) && !a.funcs.contains_key(f) {
            return Err(format!(
                "{f} is a function of its own when built for patch code but not in the \
                 kernel's build (GCC inlined it there): the patch would call whatever else the \
                 kernel calls {f}"
            ));
        }
    }
    let mut unproven = Vec::new();
    for clone in involved.iter().filter(|n| is_clone(n)) {
        if !a.funcs.contains_key(clone) {
            continue;
        }
        let callers: BTreeSet<String> = references_to(&a, clone)
            .into_iter()
            .filter_map(|(r, call, _)| r.filter(|r| call && r != clone))
            .collect();
        let mut agreed = false;
        for c in &callers {
            if same(c)? {
                agreed = true;
                break;
            }
        }
        if !(agreed || callers.is_empty() && same(clone)?) {
            unproven.push((clone.clone(), callers.into_iter().collect()));
        }
    }
    Ok(unproven)
}

/// How to refer to a symbol of the running kernel that the patch uses.
pub trait KernelSymbols {
    /// The reference for `name`, defined by the object whose other symbols
    /// are `neighbours` (they tell namesakes apart: an object's code and
    /// data lie together in the kernel): `name`, or `name#N` (the N-th of
    /// that name in address order); `None` when the kernel has no such
    /// symbol or cannot tell which of its namesakes it is.
    fn reference(&self, name: &str, neighbours: &[String]) -> Option<String>;

    /// [`reference`](Self::reference) for a static of the object that the
    /// kernel has namesakes of (GCC's numbered statics: `__already_done.3`
    /// of one object lies among those of every other, in sections such as
    /// `.data.once` that all objects share), where `uses` says how the
    /// kernel's build of the object refers to it from its code: the kernel's
    /// copy of such a function then tells its address exactly.
    fn reference_used(
        &self,
        name: &str,
        neighbours: &[String],
        uses: &[StaticUse],
    ) -> Option<String> {
        let _ = uses;
        self.reference(name, neighbours)
    }
}

/// A PC-relative reference to a static in a function of the kernel's build
/// of an object: `func`'s relocation at `at` (from its start), its addend,
/// and the static's offset from the relocation's symbol (`base`: its place
/// in the section when the relocation is against the section). The field
/// in the kernel's code holds `S + addend - P`, so `S + base` is the
/// static's address there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticUse {
    /// The function whose code refers to the static.
    pub func: String,
    /// The relocated field's offset in the function.
    pub at: u64,
    /// The relocation's addend.
    pub addend: i64,
    /// The static's offset from the relocation's symbol.
    pub base: u64,
    /// Whether the field holds the address itself (`mov $_rs.1, %rdi`: a
    /// sign-extended 32-bit absolute relocation) rather than an offset from
    /// the field.
    #[doc(alias = "R_X86_64_32S")]
    pub absolute: bool,
}

/// How the functions of `o` refer to each of `names`, PC-relatively or by
/// a 32-bit absolute address (see [`StaticUse`]), in one pass over its code.
fn static_uses(o: &Obj<'_>, names: &HashSet<&str>) -> HashMap<String, Vec<StaticUse>> {
    let mut out: HashMap<String, Vec<StaticUse>> = HashMap::new();
    if names.is_empty() {
        return out;
    }
    for (f, &(sec, off, size, _)) in &o.funcs {
        let Ok((_, rels)) = o.range(sec, off, size) else {
            continue;
        };
        let abs32 = |r: &&Rel| {
            matches!(
                r.flags,
                RelocationFlags::Elf {
                    r_type: object::elf::R_X86_64_32S
                }
            )
        };
        for r in rels.iter().filter(|r| pc_relative(r) || abs32(r)) {
            let Ok(s) = o.file.symbol_by_index(r.sym) else {
                continue;
            };
            let hit = if s.kind() == SymbolKind::Section {
                s.section_index()
                    .and_then(|si| o.covering(si, string_offset(r).max(0) as u64))
            } else {
                s.name().ok().map(|n| (n.to_owned(), 0))
            };
            if let Some((name, base)) = hit.filter(|(n, _)| names.contains(n.as_str())) {
                out.entry(name).or_default().push(StaticUse {
                    func: f.clone(),
                    at: r.at,
                    addend: r.addend,
                    base,
                    absolute: abs32(&r),
                });
            }
        }
    }
    for uses in out.values_mut() {
        uses.sort_by(|x, y| x.func.cmp(&y.func).then(x.at.cmp(&y.at)));
    }
    out
}

/// What the diff of one object found, and the patch object built from it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ObjectDiff {
    /// The patch object (ELF relocatable), empty when nothing changed.
    #[serde(skip)]
    pub object: Vec<u8>,
    /// Functions of the running kernel the patch replaces, with why.
    pub changed: Vec<(String, String)>,
    /// How each replaced function is found in the running kernel: its name,
    /// or `name#N` among namesakes (see [`KernelSymbols::reference`]).
    pub references: BTreeMap<String, String>,
    /// Functions the diff adds (placed, called by changed code).
    pub added: Vec<String>,
    /// Functions placed as new copies without being switched, with why:
    /// ones the kernel has no copy of (inlined there) that changed code
    /// calls, and changed ones without a patchable entry (their callers are
    /// switched instead).
    pub pulled_in: Vec<(String, String)>,
    /// Data placed with the code (string literals, read-only data).
    pub data: Vec<String>,
    /// Variables the diff adds, placed as the patch's own writable data.
    pub own_data: Vec<String>,
    /// Functions whose code differs only in line numbers the diff moved
    /// (not replaced).
    #[serde(default)]
    pub line_shifted: Vec<String>,
    /// Exception-table entries carried with the placed code (made known
    /// to the kernel through lucos's exception index).
    #[serde(default)]
    pub extable_entries: usize,
}

/// What a relocation points at, as compared between the two builds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// A named symbol (numbered statics with their number dropped).
    Sym(String, i64),
    /// A string literal, by its text.
    Str(Vec<u8>),
    /// Anonymous data, by section name and addend.
    Sec(String, i64),
}

struct Obj<'d> {
    file: object::File<'d>,
    /// Function symbols: name → (section, offset, size, local).
    funcs: BTreeMap<String, (SectionIndex, u64, u64, bool)>,
}

impl<'d> Obj<'d> {
    fn parse(name: &str, data: &'d [u8]) -> Result<Self, String> {
        let file =
            object::File::parse(data).map_err(|e| format!("{name}: not an ELF object: {e}"))?;
        let mut funcs = BTreeMap::new();
        for s in file.symbols() {
            if s.kind() != SymbolKind::Text || s.is_undefined() {
                continue;
            }
            let (Ok(n), Some(sec)) = (s.name(), s.section_index()) else {
                continue;
            };
            funcs.insert(n.to_owned(), (sec, s.address(), s.size(), s.is_local()));
        }
        Ok(Obj { file, funcs })
    }

    fn section_name(&self, i: SectionIndex) -> String {
        self.file
            .section_by_index(i)
            .ok()
            .and_then(|s| s.name().ok().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The bytes and relocations (offset in the range, flags, target,
    /// addend, raw symbol) of `[off, off+size)` of section `sec`.
    fn range(&self, sec: SectionIndex, off: u64, size: u64) -> Result<(Vec<u8>, Vec<Rel>), String> {
        let s = self.file.section_by_index(sec).map_err(|e| e.to_string())?;
        let data = s.data().map_err(|e| e.to_string())?;
        let bytes = if s.kind() == SectionKind::UninitializedData {
            vec![0; size as usize]
        } else {
            data.get(off as usize..(off + size) as usize)
                .ok_or("a range lies past its section")?
                .to_vec()
        };
        let mut rels = Vec::new();
        for (at, r) in s.relocations() {
            if at < off || at >= off + size {
                continue;
            }
            let RelocationTarget::Symbol(sym) = r.target() else {
                return Err(format!(
                    "a relocation in {} has no symbol",
                    self.section_name(sec)
                ));
            };
            rels.push(Rel {
                at: at - off,
                flags: r.flags(),
                sym,
                addend: r.addend(),
                tail: 0,
            });
        }
        if matches!(s.kind(), SectionKind::Text) {
            instruction_tails(&bytes, &mut rels);
        }
        Ok((bytes, rels))
    }

    /// What relocation `r` points at, for comparing.
    fn target(&self, r: &Rel) -> Target {
        let Ok(sym) = self.file.symbol_by_index(r.sym) else {
            return Target::Sec("?".into(), r.addend);
        };
        if sym.kind() == SymbolKind::Section {
            let Some(si) = sym.section_index() else {
                return Target::Sec("?".into(), r.addend);
            };
            let name = self.section_name(si);
            if name == ALT_AUX {
                // Only ever jumped to from sites the alternatives rewrite;
                // where a snippet lies there is no change of the function.
                return Target::Sec(name, 0);
            }
            if is_strings(&self.file, si) {
                let off = string_offset(r);
                if let Some(s) = self
                    .file
                    .section_by_index(si)
                    .ok()
                    .and_then(|s| s.data().ok())
                    .and_then(|d| d.get(off as usize..))
                {
                    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
                    return Target::Str(s[..end].to_vec());
                }
            }
            // A symbol of that section covering the place: by its name. An
            // instruction with an immediate after its displacement makes a
            // PC-relative addend below -4: the place is the section's start.
            if let Some((n, base)) = self.covering(si, string_offset(r).max(0) as u64) {
                return Target::Sym(unnumbered(&n).to_owned(), r.addend - base as i64);
            }
            return Target::Sec(name, r.addend);
        }
        let n = sym.name().unwrap_or("?");
        // GCC's labels of merged constants (`.LC87`, in `.rodata.cst2`)
        // are numbered through the whole object: by their value.
        if n.starts_with(".L") {
            if let Some(v) = sym
                .section_index()
                .and_then(|si| self.constant(si, sym.address()))
            {
                return Target::Sec(format!("constant {v:02x?}"), r.addend);
            }
        }
        Target::Sym(unnumbered(n).to_owned(), r.addend)
    }

    /// The entry at `at` of section `si` if it is one of merged constants
    /// of a fixed size (`.rodata.cst8`).
    fn constant(&self, si: SectionIndex, at: u64) -> Option<Vec<u8>> {
        let sec = self.file.section_by_index(si).ok()?;
        let SectionFlags::Elf { sh_flags } = sec.flags() else {
            return None;
        };
        if sh_flags & u64::from(SHF_MERGE) == 0 || sh_flags & u64::from(SHF_STRINGS) != 0 {
            return None;
        }
        let size = match &self.file {
            object::File::Elf64(f) => {
                use object::read::elf::SectionHeader as _;
                f.elf_section_table()
                    .section(si)
                    .ok()?
                    .sh_entsize(f.endian())
            }
            _ => return None,
        };
        let d = sec.data().ok()?;
        (size > 0)
            .then(|| d.get(at as usize..(at + size) as usize).map(<[u8]>::to_vec))
            .flatten()
    }

    /// Table section `name` of `entry`-byte entries: its bytes, and what
    /// the relocation at each offset points at (section, offset); `None`
    /// when the object has no such table.
    #[allow(clippy::type_complexity)]
    fn table(
        &self,
        name: &str,
        entry: usize,
    ) -> Result<Option<(&[u8], HashMap<u64, (SectionIndex, u64)>)>, String> {
        let Some(table) = self.file.section_by_name(name) else {
            return Ok(None);
        };
        let data = table.data().map_err(|e| e.to_string())?;
        if data.len() % entry != 0 {
            return Err(format!(
                "{name} is not a whole number of {entry}-byte entries"
            ));
        }
        let mut fields: HashMap<u64, (SectionIndex, u64)> = HashMap::new();
        for (at, r) in table.relocations() {
            let RelocationTarget::Symbol(si) = r.target() else {
                continue;
            };
            let Ok(sym) = self.file.symbol_by_index(si) else {
                continue;
            };
            let Some(sec) = sym.section_index() else {
                continue;
            };
            fields.insert(at, (sec, (sym.address() as i64 + r.addend()) as u64));
        }
        Ok(Some((data, fields)))
    }

    /// The object's alternatives: the function each site is in, and the entry.
    fn alternatives(&self) -> Result<Vec<Alt>, String> {
        let Some((data, fields)) = self.table(ALT_TABLE, ALT_ENTRY as usize)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (n, e) in data.chunks_exact(ALT_ENTRY as usize).enumerate() {
            let at = n as u64 * ALT_ENTRY;
            let (Some(&(ssec, soff)), Some(&(rsec, roff))) =
                (fields.get(&at), fields.get(&(at + 4)))
            else {
                return Err(format!("{ALT_TABLE} entry {n} lacks its relocations"));
            };
            if self.section_name(rsec) != ALT_REPLACEMENT {
                return Err(format!(
                    "{ALT_TABLE} entry {n} points outside {ALT_REPLACEMENT}"
                ));
            }
            let Some((func, base)) = self.covering(ssec, soff) else {
                continue; // a site outside any function: never placed
            };
            out.push(Alt {
                func,
                at: soff - base,
                info: [e[8], e[9], e[10], e[11]],
                repl_sec: rsec,
                repl_off: roff,
                repl_len: u64::from(e[11]),
            });
        }
        Ok(out)
    }

    /// The object's exception-table entries whose instruction is in a
    /// function.
    fn extable(&self) -> Result<Vec<Ex>, String> {
        let Some((data, fields)) = self.table(EX_TABLE, EX_ENTRY)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (n, e) in data.chunks_exact(EX_ENTRY).enumerate() {
            let at = (n * EX_ENTRY) as u64;
            let (Some(&(isec, ioff)), Some(&(fsec, foff))) =
                (fields.get(&at), fields.get(&(at + 4)))
            else {
                return Err(format!("{EX_TABLE} entry {n} lacks its relocations"));
            };
            if fields.contains_key(&(at + 8)) {
                return Err(format!("{EX_TABLE} entry {n} has a relocated data word"));
            }
            if self.section_name(isec) == ALT_REPLACEMENT {
                return Err(format!(
                    "{EX_TABLE} entry {n} is for an instruction of an alternative's \
                     replacement, which lucos does not carry"
                ));
            }
            let Some((func, base)) = self.covering(isec, ioff) else {
                continue; // outside any function: never placed
            };
            // A fixup label may sit right after its function's last byte.
            let Some((fix_func, fbase)) = self
                .covering(fsec, foff)
                .or_else(|| self.covering(fsec, foff.checked_sub(1)?))
            else {
                return Err(format!(
                    "the fixup of {func}'s exception-table entry {n} is outside any function"
                ));
            };
            out.push(Ex {
                func,
                at: ioff - base,
                fix_func,
                fix_at: foff - fbase,
                data: [e[8], e[9], e[10], e[11]],
            });
        }
        Ok(out)
    }

    /// The name of the symbol relocation `r` points at: for a section
    /// symbol, the named symbol of that section covering the place.
    fn named(&self, r: &Rel) -> Option<String> {
        let s = self.file.symbol_by_index(r.sym).ok()?;
        if s.kind() == SymbolKind::Section {
            self.covering(s.section_index()?, string_offset(r).max(0) as u64)
                .map(|(n, _)| n)
        } else {
            Some(s.name().unwrap_or("").to_owned())
        }
    }

    /// The named symbol of section `si` covering offset `off`: its name and value.
    fn covering(&self, si: SectionIndex, off: u64) -> Option<(String, u64)> {
        self.file
            .symbols()
            .filter(|s| s.section_index() == Some(si) && s.kind() != SymbolKind::Section)
            .filter(|s| s.address() <= off && (off < s.address() + s.size().max(1)))
            .find_map(|s| {
                s.name()
                    .ok()
                    .filter(|n| !n.is_empty())
                    .map(|n| (n.to_owned(), s.address()))
            })
    }
}

/// One exception-table entry of an object: the instruction that may
/// fault and its fixup, each as a function and an offset in it.
#[derive(Debug, Clone)]
struct Ex {
    func: String,
    at: u64,
    fix_func: String,
    fix_at: u64,
    /// The entry's data word (type and register), as it is.
    data: [u8; 4],
}

/// One alternative of an object.
#[derive(Debug, Clone)]
struct Alt {
    /// The function whose code the site is in, and the site's offset there.
    func: String,
    at: u64,
    /// The entry's feature word and the two lengths, as they are.
    info: [u8; 4],
    /// The replacement: its section, offset and length.
    repl_sec: SectionIndex,
    repl_off: u64,
    repl_len: u64,
}

#[derive(Debug, Clone, Copy)]
struct Rel {
    at: u64,
    flags: RelocationFlags,
    sym: SymbolIndex,
    addend: i64,
    /// In code: the bytes of its instruction after the relocated field (an
    /// immediate after a RIP-relative displacement: `movb $1, x(%rip)`).
    tail: u8,
}

/// Whether `r` is relative to the place of its field.
fn pc_relative(r: &Rel) -> bool {
    matches!(
        r.flags,
        RelocationFlags::Elf {
            r_type: object::elf::R_X86_64_PC32 | object::elf::R_X86_64_PLT32,
        }
    )
}

/// The offset a relocation's addend points at within its section: a
/// PC-relative one is relative to the end of its instruction, so its addend
/// carries -4 for the displacement and minus the size of an immediate after
/// it (`cmpb $0, x(%rip)`: -5), which would otherwise name the variable
/// before the one meant (bytes of `.data.once`, say).
fn string_offset(r: &Rel) -> i64 {
    if pc_relative(r) {
        r.addend + 4 + i64::from(r.tail)
    } else {
        r.addend
    }
}

/// For each PC-relative relocation of `rels` in the code `bytes` (starting
/// at an instruction), the bytes of its instruction after its field.
fn instruction_tails(bytes: &[u8], rels: &mut [Rel]) {
    if !rels.iter().any(pc_relative) {
        return;
    }
    let mut ends = Vec::new();
    let mut d = iced_x86::Decoder::with_ip(64, bytes, 0, iced_x86::DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        ends.push((i.ip(), i.next_ip()));
    }
    for r in rels.iter_mut().filter(|r| pc_relative(r)) {
        if let Some(&(_, end)) = ends.iter().find(|&&(s, e)| s <= r.at && r.at + 4 <= e) {
            r.tail = (end - r.at - 4).min(8) as u8;
        }
    }
}

fn is_strings(file: &object::File<'_>, si: SectionIndex) -> bool {
    file.section_by_index(si)
        .map(|s| match s.flags() {
            SectionFlags::Elf { sh_flags } => {
                sh_flags & u64::from(SHF_MERGE) != 0 && sh_flags & u64::from(SHF_STRINGS) != 0
            }
            _ => false,
        })
        .unwrap_or(false)
}

fn is_writable(file: &object::File<'_>, si: SectionIndex) -> bool {
    file.section_by_index(si)
        .map(|s| match s.flags() {
            SectionFlags::Elf { sh_flags } => sh_flags & u64::from(SHF_WRITE) != 0,
            _ => true,
        })
        .unwrap_or(true)
}

/// `name` without GCC's numbering of statics (`__already_done.12` →
/// `__already_done`) or the kernel's `__UNIQUE_ID_` counter
/// (`__UNIQUE_ID_ddebug123` → `__UNIQUE_ID_ddebug`); clone suffixes
/// (`.isra.0`, `.constprop.1`) stay.
/// The number of a numbered static (`__warned.87`: 87; `__UNIQUE_ID_x12`:
/// 12); 0 for another name.
fn number_of(name: &str) -> u64 {
    name[unnumbered(name).len()..]
        .trim_start_matches('.')
        .parse()
        .unwrap_or(0)
}

fn unnumbered(name: &str) -> &str {
    // `__UNIQUE_ID_ddebug123` (__COUNTER__, shifted by any use above it).
    if let Some(rest) = name.strip_prefix("__UNIQUE_ID_") {
        let base = rest.trim_end_matches(|c: char| c.is_ascii_digit());
        if base.len() < rest.len() && !rest.contains('.') {
            return &name[..name.len() - (rest.len() - base.len())];
        }
    }
    match name.rsplit_once('.') {
        Some((base, n))
            if !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && !base.ends_with(".isra")
                && !base.ends_with(".constprop")
                && !base.ends_with(".part")
                && !base.ends_with(".cold")
                && !base.ends_with(".lto_priv") =>
        {
            base
        }
        _ => name,
    }
}

/// A function's bytes, its relocations as (offset, type, target), and its
/// alternatives (site, entry, replacement bytes and relocations).
type Fingerprint = (Vec<u8>, Vec<(u64, u32, Target)>, Vec<AltPrint>);
type AltPrint = (u64, [u8; 4], Vec<u8>, Vec<(u64, u32, Target)>);

/// Relocations of `rels` as (offset, type, target), sorted.
fn by_target(o: &Obj<'_>, rels: &[Rel]) -> Vec<(u64, u32, Target)> {
    let mut r: Vec<(u64, u32, Target)> = rels
        .iter()
        .map(|x| {
            let ty = match x.flags {
                RelocationFlags::Elf { r_type } => r_type,
                _ => 0,
            };
            (x.at, ty, o.target(x))
        })
        .collect();
    r.sort();
    r
}

/// A function's comparable form: bytes and relocations by target, and its
/// alternatives (`alts`, of the whole object).
fn fingerprint(
    o: &Obj<'_>,
    alts: &[Alt],
    name: &str,
    (sec, off, size): (SectionIndex, u64, u64),
) -> Result<Fingerprint, String> {
    let (bytes, rels) = o.range(sec, off, size)?;
    let mut ap = Vec::new();
    for x in alts.iter().filter(|x| x.func == name) {
        let (rb, rr) = o.range(x.repl_sec, x.repl_off, x.repl_len)?;
        ap.push((x.at, x.info, rb, by_target(o, &rr)));
    }
    Ok((bytes, by_target(o, &rels), ap))
}

/// Diffs `original` and `patched`, builds of the object file `name` (e.g.
/// `fs/proc/cmdline.o`, whose source is `cmdline.c` in the kernel's symbol
/// table), and builds the patch object.
pub fn diff_object(
    name: &str,
    original: &[u8],
    patched: &[u8],
    kernel: &dyn KernelSymbols,
) -> Result<ObjectDiff, String> {
    diff_object_of_build(name, original, patched, None, kernel)
}

/// [`diff_object`] where `original` is not the kernel's own build of the
/// object but one built as patch code is (lucos's headers), and `kernel_build`
/// is the kernel's: its names are the running kernel's. GCC numbers statics
/// in the order it meets them, and lucos's WARN uses no `__already_done`, so
/// the two builds can number the same static differently
/// (`__already_done.9` in one, `.3` in the other, and `.9` in the kernel
/// another object's): each static is paired through both builds.
pub fn diff_object_of_build(
    name: &str,
    original: &[u8],
    patched: &[u8],
    kernel_build: Option<&[u8]>,
    kernel: &dyn KernelSymbols,
) -> Result<ObjectDiff, String> {
    diff_object_with(
        name,
        original,
        patched,
        kernel_build,
        kernel,
        &DiffOptions::default(),
    )
}

/// What [`diff_object_with`] knows beyond the two builds.
#[derive(Debug, Default)]
pub struct DiffOptions<'a> {
    /// GCC clones changed code calls that the patch takes a copy of (from
    /// the patched build) instead of calling the running kernel's, because
    /// the kernel's calling convention for them cannot be shown
    /// ([`unproven_clones`]). Unchanged code, so the copy does what the
    /// kernel's does; only patch code calls it.
    pub own_copies: &'a [String],
    /// Where the diff moved the lines of the object's own C file and of
    /// the headers it changed: a function whose code differs only in line
    /// numbers it passes to a function (`ext4_error`'s `__LINE__`, a WARN
    /// in a header's inline function) is not changed.
    pub lines: Option<&'a LineMap>,
    /// New global variables of this object that other objects of the patch
    /// use: placed as the patch's own data even if no function of this
    /// object changed ([`new_global_variables`]).
    pub new_globals: &'a [String],
    /// Existing data whose layout the patch changes (`lucos build --data`):
    /// its new definition may differ in size and initial value (the
    /// running copy is made anew by the data change, not by the diff).
    pub layout_changed: &'a [String],
}

/// The data symbol `name` that `object` defines: its size, its initial
/// bytes (zeros for `.bss`) and the offsets in it that relocations fill (an
/// address: its bytes there are not its value), if it defines one.
pub fn defined_data(object: &[u8], name: &str) -> Option<(u64, Vec<u8>, Vec<u64>)> {
    let f = object::File::parse(object).ok()?;
    let s = f
        .symbols()
        .find(|s| s.name() == Ok(name) && !s.is_undefined() && s.kind() == SymbolKind::Data)?;
    let sec = f.section_by_index(s.section_index()?).ok()?;
    let data = sec.data().ok()?;
    let (start, end) = (s.address(), s.address() + s.size());
    let bytes = if data.is_empty() {
        vec![0; s.size() as usize]
    } else {
        data.get(start as usize..end as usize)?.to_vec()
    };
    let relocated = sec
        .relocations()
        .filter(|(at, _)| (start..end).contains(at))
        .map(|(at, _)| at - start)
        .collect();
    Some((s.size(), bytes, relocated))
}

/// The global variables `patched` defines that `original` (another build of
/// the same object) does not.
pub fn new_global_variables(original: &[u8], patched: &[u8]) -> Result<Vec<String>, String> {
    let a = object::File::parse(original).map_err(|e| e.to_string())?;
    let b = object::File::parse(patched).map_err(|e| e.to_string())?;
    let had: HashSet<&str> = a
        .symbols()
        .filter(|s| !s.is_undefined())
        .filter_map(|s| s.name().ok())
        .collect();
    Ok(b.symbols()
        .filter(|s| s.is_global() && !s.is_undefined() && s.kind() == SymbolKind::Data)
        .filter_map(|s| s.name().ok())
        .filter(|n| !had.contains(n))
        .map(str::to_owned)
        .collect())
}

/// The names a patch object leaves undefined (what it needs from the
/// kernel or from other objects of the patch).
pub fn undefined_symbols(object: &[u8]) -> BTreeSet<String> {
    if object.is_empty() {
        return BTreeSet::new();
    }
    object::File::parse(object)
        .map(|f| {
            f.symbols()
                .filter(|s| s.is_undefined())
                .filter_map(|s| s.name().ok().map(str::to_owned))
                .filter(|n| !n.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The global names a patch object defines (its functions and
/// variables, for the other objects of the patch).
pub fn defined_symbols(object: &[u8]) -> BTreeSet<String> {
    object::File::parse(object)
        .map(|f| {
            f.symbols()
                .filter(|s| s.is_definition() && s.is_global())
                .filter_map(|s| s.name().ok().map(str::to_owned))
                .filter(|n| !n.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Where the unchanged lines of the source files of an object (its C file,
/// the headers the diff changed) are after a diff: per file, runs of (old
/// first line, new first line, count), 1-based, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LineMap(Vec<Vec<(u32, u32, u32)>>);

impl LineMap {
    /// The map from the file's text before and after the diff.
    pub fn between(old: &str, new: &str) -> Self {
        let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
        let runs = similar::capture_diff_slices(similar::Algorithm::Myers, &a, &b)
            .into_iter()
            .filter_map(|op| match op {
                similar::DiffOp::Equal {
                    old_index,
                    new_index,
                    len,
                } => Some((old_index as u32 + 1, new_index as u32 + 1, len as u32)),
                _ => None,
            })
            .collect();
        LineMap(vec![runs])
    }

    /// This map and `other`'s: a line moved in either file is moved (the
    /// code of an object does not say which file a line number is of).
    pub fn and(mut self, other: &LineMap) -> Self {
        self.0.extend(other.0.iter().cloned());
        self
    }

    /// Whether unchanged line `old` of one of the files is line `new` after
    /// the diff, and moved.
    pub fn moved(&self, old: u32, new: u32) -> bool {
        self.0.iter().any(|runs| {
            let i = runs.partition_point(|&(o, _, _)| o <= old);
            i > 0 && {
                let (o, n, len) = runs[i - 1];
                old < o + len && n + (old - o) == new && old != new
            }
        })
    }
}

/// Whether two builds of a function differ only in line numbers the diff
/// moved (`lines`), each loaded as a 32-bit immediate (`mov $LINE, %edx`,
/// or into an argument's stack slot) that a later call passes on: same
/// length, same relocations and alternatives, every other byte equal.
/// kpatch ignores such `__LINE__` changes the same way, by a list of the
/// functions that take a line; here the line map does it: the old value
/// must be an unchanged line and the new one where that line went.
fn only_lines_moved(fa: &Fingerprint, fb: &Fingerprint, lines: &LineMap) -> bool {
    use iced_x86::{Code, Decoder, DecoderOptions, FlowControl};
    let same_refs = fa.1.len() == fb.1.len()
        && fa.1.iter().zip(&fb.1).all(|(x, y)| {
            x.0 == y.0
                && x.1 == y.1
                && match (&x.2, &y.2) {
                    (Target::Str(p), Target::Str(q)) => same_but_lines(p, q, lines),
                    (p, q) => p == q,
                }
        });
    if !same_refs || fa.2 != fb.2 || fa.0.len() != fb.0.len() || fa == fb {
        return false;
    }
    let mut da = Decoder::with_ip(64, &fa.0, 0, DecoderOptions::NONE);
    let mut db = Decoder::with_ip(64, &fb.0, 0, DecoderOptions::NONE);
    // A moved line not yet passed to a call.
    let mut pending = false;
    while da.can_decode() {
        let (ia, ib) = (da.decode(), db.decode());
        if ia.is_invalid() || ib.is_invalid() || ia.len() != ib.len() {
            return false;
        }
        let at = ia.ip() as usize..ia.ip() as usize + ia.len();
        let (xa, xb) = (&fa.0[at.clone()], &fb.0[at]);
        if xa == xb {
            if ia.flow_control() == FlowControl::Call {
                pending = false;
            }
            continue;
        }
        let is_line_load = matches!(ia.code(), Code::Mov_r32_imm32 | Code::Mov_rm32_imm32)
            && ia.code() == ib.code()
            && xa[..xa.len() - 4] == xb[..xb.len() - 4]
            && lines.moved(ia.immediate32(), ib.immediate32());
        if !is_line_load {
            return false;
        }
        pending = true;
    }
    !pending && !db.can_decode()
}

/// Whether string literals `p` and `q` are the same but for the lines of
/// `FILE.c:LINE` / `FILE.h:LINE` references the diff moved (fortify's
/// "field ... at net/core/dev.c:10296", WARN's messages).
fn same_but_lines(p: &[u8], q: &[u8], lines: &LineMap) -> bool {
    // Split into runs of digits and of the rest.
    fn runs(s: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..=s.len() {
            if i == s.len() || s[i].is_ascii_digit() != s[i - 1].is_ascii_digit() {
                out.push(&s[start..i]);
                start = i;
            }
        }
        out
    }
    let (rp, rq) = (runs(p), runs(q));
    if rp.len() != rq.len() {
        return false;
    }
    let number = |r: &[u8]| std::str::from_utf8(r).ok()?.parse::<u32>().ok();
    let mut prev: &[u8] = &[];
    for (x, y) in rp.iter().zip(&rq) {
        if x != y {
            let after_file = prev.ends_with(b".c:") || prev.ends_with(b".h:");
            match (number(x), number(y)) {
                (Some(a), Some(b)) if after_file && lines.moved(a, b) => {}
                _ => return false,
            }
        }
        prev = x;
    }
    true
}

/// [`diff_object_of_build`], with what else is known ([`DiffOptions`]).
pub fn diff_object_with(
    name: &str,
    original: &[u8],
    patched: &[u8],
    kernel_build: Option<&[u8]>,
    kernel: &dyn KernelSymbols,
    opts: &DiffOptions<'_>,
) -> Result<ObjectDiff, String> {
    let own_copies = opts.own_copies;
    let a = Obj::parse(name, original)?;
    let b = Obj::parse(name, patched)?;
    let p = kernel_build.map(|k| Obj::parse(name, k)).transpose()?;
    let (a_alts, b_alts) = (a.alternatives()?, b.alternatives()?);
    let mut out = ObjectDiff::default();
    // The kernel's build's named symbols: where its namesakes lie.
    let neighbours: Vec<String> = p
        .as_ref()
        .unwrap_or(&a)
        .file
        .symbols()
        .filter(|s| !s.is_undefined() && matches!(s.kind(), SymbolKind::Text | SymbolKind::Data))
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .collect();

    // Changed and new functions.
    let mut take: BTreeSet<String> = BTreeSet::new();
    // A cold part (`NAME.cold`, GCC's out-of-line unlikely path) belongs to
    // its function: a change in it changes the function.
    let mut cold_changed: BTreeSet<String> = BTreeSet::new();
    for (fname, &(sec, off, size, _)) in &b.funcs {
        if let Some(parent) = fname.strip_suffix(".cold") {
            let fb = fingerprint(&b, &b_alts, fname, (sec, off, size))?;
            let same = match a.funcs.get(fname) {
                Some(&(asec, aoff, asize, _)) => {
                    let fa = fingerprint(&a, &a_alts, fname, (asec, aoff, asize))?;
                    fa == fb || opts.lines.is_some_and(|l| only_lines_moved(&fa, &fb, l))
                }
                None => false,
            };
            if !same {
                cold_changed.insert(parent.to_owned());
            }
        }
    }
    for (fname, &(sec, off, size, _)) in &b.funcs {
        if fname.ends_with(".cold") {
            continue;
        }
        let sname = b.section_name(sec);
        let fb = fingerprint(&b, &b_alts, fname, (sec, off, size))?;
        let why = match a.funcs.get(fname) {
            Some(&(asec, aoff, asize, _)) => {
                let fa = fingerprint(&a, &a_alts, fname, (asec, aoff, asize))?;
                if fa == fb && !cold_changed.contains(fname) {
                    continue;
                }
                if !cold_changed.contains(fname)
                    && opts.lines.is_some_and(|l| only_lines_moved(&fa, &fb, l))
                {
                    out.line_shifted.push(fname.clone());
                    continue;
                }
                if fa == fb {
                    "its cold part changed"
                } else if fa.0 != fb.0 {
                    "its code changed"
                } else if fa.1 != fb.1 {
                    "what it refers to changed"
                } else {
                    "its alternatives changed"
                }
            }
            None => "new",
        };
        if sname.starts_with(".init.") || sname.starts_with(".exit.") {
            return Err(format!(
                "{fname} ({sname}) changed: it is __init/__exit code, which the kernel ran once \
                 and freed (or never runs); a live patch cannot change it"
            ));
        }
        if why == "new" {
            out.added.push(fname.clone());
        } else {
            let r = kernel.reference(fname, &neighbours).ok_or_else(|| {
                format!(
                    "{fname} changed, but the running kernel has no {fname} of this object \
                     (is {name} built into it?)"
                )
            })?;
            out.references.insert(fname.clone(), r);
            out.changed.push((fname.clone(), why.to_owned()));
        }
        take.insert(fname.clone());
    }
    // Existing data whose initial value the diff changed: refused.
    for s in b.file.symbols() {
        if s.kind() != SymbolKind::Data || s.is_undefined() {
            continue;
        }
        let (Ok(n), Some(si)) = (s.name(), s.section_index()) else {
            continue;
        };
        let Some(old) = a
            .file
            .symbols()
            .find(|x| x.name() == Ok(n) && x.kind() == SymbolKind::Data)
        else {
            continue;
        };
        let val = |o: &object::File<'_>, sym: &object::Symbol<'_, '_>| -> Option<Vec<u8>> {
            let sec = o.section_by_index(sym.section_index()?).ok()?;
            let d = sec.data().ok()?;
            if d.is_empty() {
                return Some(vec![0; sym.size() as usize]);
            }
            d.get(sym.address() as usize..(sym.address() + sym.size()) as usize)
                .map(<[u8]>::to_vec)
        };
        let (mut vb, mut va) = (val(&b.file, &s), val(&a.file, &old));
        // A dynamic-debug descriptor (`pr_debug`'s `descriptor.N` in
        // `__dyndbg`) records its line: a line shift is no change (the
        // kernel's descriptor keeps its line; only its control file shows it).
        if b.section_name(si).starts_with("__dyndbg") {
            for v in [&mut vb, &mut va].into_iter().flatten() {
                if let Some(w) = v.get_mut(DYNDBG_LINENO..DYNDBG_LINENO + 4) {
                    let x = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) & !DYNDBG_LINENO_MASK;
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
        // (Only an object the kernel has once: a namesake's references
        // would not name the data change's object.)
        if opts.layout_changed.iter().any(|x| x == n)
            && kernel.reference(n, &[]).as_deref() == Some(n)
        {
            continue;
        }
        if is_writable(&b.file, si) && vb != va {
            return Err(format!(
                "the diff changes the initial value of {n} (existing data in {name}): the \
                 running kernel's copy is not re-initialized by a live patch; change it with a \
                 data change (--data) or in code"
            ));
        }
    }

    if take.is_empty() && opts.new_globals.is_empty() {
        return Ok(out);
    }
    // A changed function the kernel cannot switch (no `__fentry__` call at
    // its entry: notrace, or a syscall body like `__do_sys_NAME`) is placed
    // but not switched; its callers, which must all be in this object and
    // only call it, are switched instead.
    loop {
        let stuck: Vec<String> = out
            .changed
            .iter()
            .map(|c| c.0.clone())
            .filter(|f| a.funcs.contains_key(f) && !has_entry(&a, f))
            .collect();
        if stuck.is_empty() {
            break;
        }
        for f in stuck {
            if !b.funcs.get(&f).is_some_and(|x| x.3) {
                return Err(format!(
                    "{f} changed, has no patchable entry (no __fentry__ call: notrace) and is \
                     global, so code outside this object may call it: lucos cannot switch it"
                ));
            }
            let mut callers = Vec::new();
            for (referrer, call, where_) in references_to(&b, &f) {
                // A cold part is its function's: its calls are the parent's.
                let referrer =
                    referrer.map(|r| r.strip_suffix(".cold").map(str::to_owned).unwrap_or(r));
                match referrer.filter(|_| call) {
                    Some(c) if c != f => callers.push(c),
                    Some(_) => {}
                    None => {
                        return Err(format!(
                            "{f} changed and has no patchable entry (no __fentry__ call), and \
                             its address is taken (in {where_}): lucos cannot switch it"
                        ))
                    }
                }
            }
            out.changed.retain(|c| c.0 != f);
            out.references.remove(&f);
            out.pulled_in.push((
                f.clone(),
                "changed, without a patchable entry: its callers are switched".into(),
            ));
            for c in callers {
                if take.insert(c.clone()) {
                    let r = kernel.reference(&c, &neighbours).ok_or_else(|| {
                        format!("{c} calls {f}, but the running kernel has no {c} of {name}")
                    })?;
                    out.references.insert(c.clone(), r);
                    out.changed
                        .push((c, format!("calls {f}, which has no patchable entry")));
                }
            }
        }
    }
    // Clones whose convention in the kernel cannot be shown: the patch's own.
    for c in own_copies {
        if b.funcs.contains_key(c) && take.insert(c.clone()) {
            out.pulled_in.push((
                c.clone(),
                "a GCC clone changed code calls, whose calling convention in the running \
                 kernel cannot be shown: the patch has its own copy"
                    .into(),
            ));
        }
    }
    // Cold parts go with their function.
    for f in take.clone() {
        let cold = format!("{f}.cold");
        if b.funcs.contains_key(&cold) {
            take.insert(cold);
        }
    }

    // Refused: a new export. The kernel's export table is what modules
    // link against; a patch cannot add to it, and dropping it silently
    // would leave a module that needs it failing to load.
    for sec in b.file.sections() {
        let Ok(sname) = sec.name() else { continue };
        let Some(sym) = ["___ksymtab+", "___ksymtab_gpl+"]
            .iter()
            .find_map(|p| sname.strip_prefix(p))
        else {
            continue;
        };
        if a.file.section_by_name(sname).is_none() {
            return Err(format!(
                "the diff exports {sym} (EXPORT_SYMBOL): a live patch cannot add to the running \
                 kernel's export table, so a module could not link to it"
            ));
        }
    }
    // Refused: changed code with entries in tables the kernel processes.
    for sec in b.file.sections() {
        let Ok(sname) = sec.name() else { continue };
        let Some((_, what)) = KERNEL_TABLES.iter().find(|(t, _)| *t == sname) else {
            continue;
        };
        for (_, r) in sec.relocations() {
            let RelocationTarget::Symbol(si) = r.target() else {
                continue;
            };
            let Ok(sym) = b.file.symbol_by_index(si) else {
                continue;
            };
            let rel = Rel {
                at: 0,
                flags: r.flags(),
                sym: si,
                addend: r.addend(),
                tail: 0,
            };
            let hit = if sym.kind() == SymbolKind::Section {
                sym.section_index()
                    .and_then(|x| b.covering(x, rel.addend as u64))
                    .map(|c| c.0)
            } else {
                sym.name().ok().map(str::to_owned)
            };
            if let Some(f) = hit.filter(|f| take.contains(f)) {
                return Err(format!(
                    "{f} has {what} ({sname}): lucos does not yet make new code's {sname} entries \
                     known to the running kernel, so it refuses the patch rather than drop them"
                ));
            }
        }
    }

    let Renumbering {
        map: mut renumber,
        new: new_statics,
    } = renumbering(&a, &b)?;
    if let Some(p) = &p {
        // Through the original build's names to the kernel's; a static the
        // two builds do not pair is left unpaired (refused where used).
        let to_kernel = renumbering(p, &a)?.map;
        renumber = renumber
            .into_iter()
            .filter_map(|(x, y)| to_kernel.get(&y).map(|z| (x, z.clone())))
            .collect();
    }
    // How the kernel's build uses each of its statics the patch refers to.
    let kernel_build = p.as_ref().unwrap_or(&a);
    let statics: HashSet<&str> = renumber.values().map(String::as_str).collect();
    let uses = static_uses(kernel_build, &statics);
    let refer = |kname: &str| -> Option<String> {
        if statics.contains(kname) {
            let none = Vec::new();
            kernel.reference_used(kname, &neighbours, uses.get(kname).unwrap_or(&none))
        } else {
            kernel.reference(kname, &neighbours)
        }
    };
    // The patch object.
    let mut w = write::Object::new(
        object::BinaryFormat::Elf,
        object::Architecture::X86_64,
        object::Endianness::Little,
    );
    // Placed sections of `b` → their copy; functions → (section, symbol).
    let mut placed_secs: HashMap<SectionIndex, write::SectionId> = HashMap::new();
    let mut fn_syms: HashMap<String, write::SymbolId> = HashMap::new();
    let mut ext_syms: HashMap<String, write::SymbolId> = HashMap::new();
    let mut queue: Vec<String> = take.iter().cloned().collect();
    let mut pending_secs: Vec<SectionIndex> = Vec::new();
    // Sections of variables the diff adds, placed as the patch's own data.
    let mut own_data: HashSet<SectionIndex> = HashSet::new();
    // New globals other objects of the patch use: placed whatever else
    // changed here.
    for g in opts.new_globals {
        let si = b
            .file
            .symbols()
            .find(|x| x.name() == Ok(g.as_str()) && !x.is_undefined() && x.is_global())
            .and_then(|x| x.section_index())
            .filter(|_| is_new_data(&a, g, &new_statics))
            .ok_or_else(|| format!("{name} has no new global variable {g}"))?;
        let sname = b.section_name(si);
        if !crate::link::is_own_data_section(&sname) {
            return Err(format!(
                "the patch uses {g}, a new variable in {sname}: per-CPU, read-only-after-init \
                 and kernel-walked sections cannot be a patch's own data"
            ));
        }
        own_data.insert(si);
        pending_secs.push(si);
    }
    // Code first, then relocations (a function may call one placed later).
    let mut code: Vec<(String, write::SectionId, SectionIndex, u64, u64)> = Vec::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    loop {
        while let Some(f) = queue.pop() {
            if !done.insert(f.clone()) {
                continue;
            }
            let &(sec, off, size, _) = b
                .funcs
                .get(&f)
                .ok_or_else(|| format!("{f}: no such function"))?;
            let (bytes, _) = b.range(sec, off, size)?;
            let align = b
                .file
                .section_by_index(sec)
                .map(|s| s.align())
                .unwrap_or(16)
                .max(1);
            let id = w.add_section(
                Vec::new(),
                format!(".text.{f}").into_bytes(),
                SectionKind::Text,
            );
            w.append_section_data(id, &bytes, align);
            let sym = w.add_symbol(write::Symbol {
                name: f.clone().into_bytes(),
                value: 0,
                size,
                kind: SymbolKind::Text,
                scope: SymbolScope::Compilation,
                weak: false,
                section: write::SymbolSection::Section(id),
                flags: object::SymbolFlags::None,
            });
            fn_syms.insert(f.clone(), sym);
            code.push((f.clone(), id, sec, off, size));
            // What it uses that the kernel does not have comes along:
            // functions (inlined everywhere there), anonymous read-only data
            // (string literals, tables), read-only data the kernel lacks.
            for r in b.range(sec, off, size)?.1 {
                let Ok(s) = b.file.symbol_by_index(r.sym) else {
                    continue;
                };
                if s.is_undefined() {
                    continue;
                }
                let named = if s.kind() == SymbolKind::Section {
                    let Some(si) = s.section_index() else {
                        continue;
                    };
                    match b.covering(si, string_offset(&r).max(0) as u64) {
                        Some((n, _)) => Some(n),
                        None => {
                            pending_secs.push(si);
                            None
                        }
                    }
                } else {
                    s.name().ok().map(str::to_owned)
                };
                let Some(n) = named else { continue };
                if take.contains(&n) {
                    continue;
                }
                let def = b
                    .file
                    .symbols()
                    .find(|x| x.name() == Ok(n.as_str()) && !x.is_undefined())
                    .and_then(|x| x.section_index().map(|si| (si, x.kind())));
                // A variable the diff adds is the patch's own, even where
                // the kernel has a namesake elsewhere.
                if let Some((si, SymbolKind::Data)) = def {
                    if is_writable(&b.file, si) && is_new_data(&a, &n, &new_statics) {
                        let sname = b.section_name(si);
                        if !crate::link::is_own_data_section(&sname) {
                            return Err(format!(
                                "changed code uses {n}, a new variable in {sname}: per-CPU, \
                                 read-only-after-init and kernel-walked sections (a new \
                                 pr_debug's __dyndbg descriptor, a module parameter) cannot be \
                                 a patch's own data"
                            ));
                        }
                        own_data.insert(si);
                        pending_secs.push(si);
                        continue;
                    }
                }
                // A numbered read-only static the running kernel's cannot be
                // told apart for (`__func__.4` of a new pr_warn): only its
                // bytes matter, so the patch takes its own copy.
                if let Some((si, _)) = def {
                    if !is_writable(&b.file, si)
                        && !renumber.contains_key(&n)
                        && unnumbered(&n) != n
                        && !b.funcs.contains_key(&n)
                    {
                        pending_secs.push(si);
                        continue;
                    }
                }
                let kname = renumber.get(&n).cloned().unwrap_or_else(|| n.clone());
                if refer(&kname).is_some() {
                    continue;
                }
                if b.funcs.contains_key(&n) {
                    out.pulled_in.push((
                        n.clone(),
                        "called by changed code; the kernel has no copy".into(),
                    ));
                    take.insert(n.clone());
                    queue.push(n);
                } else if let Some((si, _)) = def {
                    if !is_writable(&b.file, si) {
                        pending_secs.push(si);
                    }
                }
            }
        }
        // Anonymous read-only data the code points into (strings, jump
        // tables): placed whole; its own references may pull in more.
        let mut more = false;
        while let Some(si) = pending_secs.pop() {
            if placed_secs.contains_key(&si) {
                continue;
            }
            let sec = b.file.section_by_index(si).map_err(|e| e.to_string())?;
            let sname = sec.name().unwrap_or("?").to_owned();
            // A function's own section, reached by a section symbol: resolved
            // per relocation, by the function it lands in.
            if b.funcs.values().any(|v| v.0 == si) {
                continue;
            }
            if is_writable(&b.file, si) && !own_data.contains(&si) {
                continue; // resolved per relocation, by the symbol covering it
            }
            let data = sec.data().map_err(|e| e.to_string())?;
            let kind = if own_data.contains(&si) {
                if sec.kind() == SectionKind::UninitializedData {
                    SectionKind::UninitializedData
                } else {
                    SectionKind::Data
                }
            } else if is_strings(&b.file, si) {
                SectionKind::ReadOnlyString
            } else {
                SectionKind::ReadOnlyData
            };
            let id = w.add_section(Vec::new(), sname.clone().into_bytes(), kind);
            if kind == SectionKind::UninitializedData {
                w.append_section_bss(id, sec.size(), sec.align().max(1));
            } else {
                w.append_section_data(id, data, sec.align().max(1));
            }
            placed_secs.insert(si, id);
            if own_data.contains(&si) {
                // A new global is named in the patch object, so the patch's
                // other objects that use it link to this copy.
                // Its statics are named too (locally): a cumulative patch
                // that replaces this one takes over their values by name.
                for x in b.file.symbols() {
                    let Ok(n) = x.name() else { continue };
                    if x.section_index() == Some(si)
                        && x.kind() == SymbolKind::Data
                        && is_new_data(&a, n, &new_statics)
                    {
                        w.add_symbol(write::Symbol {
                            name: n.as_bytes().to_vec(),
                            value: x.address(),
                            size: x.size(),
                            kind: SymbolKind::Data,
                            scope: if x.is_global() {
                                SymbolScope::Linkage
                            } else {
                                SymbolScope::Compilation
                            },
                            weak: false,
                            section: write::SymbolSection::Section(id),
                            flags: object::SymbolFlags::None,
                        });
                    }
                }
                out.own_data.push(sname);
            } else {
                out.data.push(sname);
            }
            for (_, r) in sec.relocations() {
                if let RelocationTarget::Symbol(x) = r.target() {
                    if let Ok(s) = b.file.symbol_by_index(x) {
                        if s.kind() == SymbolKind::Section {
                            if let Some(t) = s.section_index() {
                                pending_secs.push(t);
                            }
                        }
                    }
                }
            }
            more = true;
        }
        if !more && queue.is_empty() {
            break;
        }
    }

    // Relocations of the placed code and data.
    let mut sites: Vec<(write::SectionId, SectionIndex, u64, u64)> = code
        .iter()
        .map(|(_, id, sec, off, size)| (*id, *sec, *off, *size))
        .collect();
    for (&si, &id) in &placed_secs {
        let size = b.file.section_by_index(si).map(|s| s.size()).unwrap_or(0);
        sites.push((id, si, 0, size));
    }
    // Alternatives of the placed functions: their entries and replacements,
    // applied at link time for the running kernel's CPU.
    let kept: Vec<&Alt> = b_alts
        .iter()
        .filter(|x| fn_syms.contains_key(&x.func))
        .collect();
    if let Some(first) = kept.first() {
        if kept.iter().any(|x| x.repl_sec != first.repl_sec) {
            return Err(format!(
                "the alternatives of {name} point into more than one {ALT_REPLACEMENT} section"
            ));
        }
        let rsec = b
            .file
            .section_by_index(first.repl_sec)
            .map_err(|e| e.to_string())?;
        let repl = w.add_section(
            Vec::new(),
            ALT_REPLACEMENT.as_bytes().to_vec(),
            SectionKind::Text,
        );
        w.append_section_data(repl, rsec.data().map_err(|e| e.to_string())?, 1);
        let table = w.add_section(
            Vec::new(),
            ALT_TABLE.as_bytes().to_vec(),
            SectionKind::ReadOnlyData,
        );
        let repl_sym = w.section_symbol(repl);
        for (n, x) in kept.iter().enumerate() {
            let mut e = [0u8; ALT_ENTRY as usize];
            e[8..].copy_from_slice(&x.info);
            w.append_section_data(table, &e, 1);
            let at = n as u64 * ALT_ENTRY;
            pc32_fields(
                &mut w,
                table,
                at,
                [
                    (fn_syms[&x.func], x.at as i64),
                    (repl_sym, x.repl_off as i64),
                ],
            )?;
            sites.push((repl, x.repl_sec, x.repl_off, x.repl_len));
        }
    }
    // Exception-table entries of the placed functions (an access that may
    // fault and its fixup): lucos's linker sorts them into the patch's
    // table, and its exception index makes the kernel find them.
    let kept_ex: Vec<Ex> = b
        .extable()?
        .into_iter()
        .filter(|e| fn_syms.contains_key(&e.func))
        .collect();
    if !kept_ex.is_empty() {
        let table = w.add_section(
            Vec::new(),
            EX_TABLE.as_bytes().to_vec(),
            SectionKind::ReadOnlyData,
        );
        for (n, e) in kept_ex.iter().enumerate() {
            let &fix = fn_syms.get(&e.fix_func).ok_or_else(|| {
                format!(
                    "{}'s exception-table entry has its fixup in {}, which the patch does not \
                     place",
                    e.func, e.fix_func
                )
            })?;
            let mut entry = [0u8; EX_ENTRY];
            entry[8..].copy_from_slice(&e.data);
            w.append_section_data(table, &entry, 4);
            let at = (n * EX_ENTRY) as u64;
            pc32_fields(
                &mut w,
                table,
                at,
                [(fn_syms[&e.func], e.at as i64), (fix, e.fix_at as i64)],
            )?;
        }
        out.extable_entries = kept_ex.len();
    }
    for (id, sec, off, size) in sites {
        let in_repl = b.section_name(sec) == ALT_REPLACEMENT;
        let aux = b.section_name(sec) == ALT_AUX;
        for r in b.range(sec, off, size)?.1 {
            let s = b.file.symbol_by_index(r.sym).map_err(|e| e.to_string())?;
            // `static_cpu_has` snippets of functions the patch leaves alone
            // are never reached from it: their jumps stay unresolved.
            if aux && !s.is_undefined() && !lands_in(&b, &s, &r, &fn_syms) {
                continue;
            }
            let at = if in_repl { r.at + off } else { r.at };
            let (symbol, addend) = resolve_target(
                &b,
                &s,
                &r,
                name,
                &refer,
                &mut w,
                &fn_syms,
                (&placed_secs, &own_data, &a, &new_statics),
                &mut ext_syms,
                &renumber,
            )?;
            w.add_relocation(
                id,
                write::Relocation {
                    offset: at,
                    symbol,
                    addend,
                    flags: r.flags,
                },
            )
            .map_err(|e| e.to_string())?;
        }
    }
    out.object = w.write().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Whether the reference `r` of `b` to `s` lands in a function the patch
/// places (`fn_syms`).
fn lands_in(
    b: &Obj<'_>,
    s: &object::Symbol<'_, '_>,
    r: &Rel,
    fn_syms: &HashMap<String, write::SymbolId>,
) -> bool {
    let name = if s.kind() == SymbolKind::Section {
        s.section_index()
            .and_then(|si| b.covering(si, string_offset(r).max(0) as u64))
            .map(|c| c.0)
    } else {
        s.name().ok().map(str::to_owned)
    };
    name.is_some_and(|n| fn_syms.contains_key(&n))
}

/// The patch object's symbol (and addend) for a reference of `b` to `s`
/// with `addend`.
#[allow(clippy::too_many_arguments)]
fn resolve_target(
    b: &Obj<'_>,
    s: &object::Symbol<'_, '_>,
    r: &Rel,
    name: &str,
    refer: &dyn Fn(&str) -> Option<String>,
    w: &mut write::Object<'_>,
    fn_syms: &HashMap<String, write::SymbolId>,
    (placed_secs, own_data, a, new_statics): (
        &HashMap<SectionIndex, write::SectionId>,
        &HashSet<SectionIndex>,
        &Obj<'_>,
        &HashSet<String>,
    ),
    ext_syms: &mut HashMap<String, write::SymbolId>,
    renumber: &HashMap<String, String>,
) -> Result<(write::SymbolId, i64), String> {
    let addend = r.addend;
    let mut external = |w: &mut write::Object<'_>, spec: String| -> write::SymbolId {
        *ext_syms.entry(spec.clone()).or_insert_with(|| {
            w.add_symbol(write::Symbol {
                name: spec.into_bytes(),
                value: 0,
                size: 0,
                kind: SymbolKind::Unknown,
                scope: SymbolScope::Linkage,
                weak: false,
                section: write::SymbolSection::Undefined,
                flags: object::SymbolFlags::None,
            })
        })
    };
    if s.is_undefined() {
        return Ok((
            external(w, s.name().map_err(|e| e.to_string())?.to_owned()),
            addend,
        ));
    }
    // A named symbol, or the one a section-relative reference lands in;
    // anonymous data only in a placed section.
    let (sname, delta) = if s.kind() == SymbolKind::Section {
        let si = s
            .section_index()
            .ok_or("a section symbol without a section")?;
        match b.covering(si, string_offset(r).max(0) as u64) {
            Some((n, base)) => (n, base as i64),
            None => match placed_secs.get(&si) {
                Some(&id) => return Ok((w.section_symbol(id), addend)),
                None => {
                    return Err(format!(
                        "{name}: changed code refers to {} at offset {addend}, where no \
                         symbol is",
                        b.section_name(si)
                    ))
                }
            },
        }
    } else {
        (s.name().map_err(|e| e.to_string())?.to_owned(), 0)
    };
    if let Some(&id) = fn_syms.get(&sname) {
        return Ok((id, addend - delta));
    }
    let sym = b
        .file
        .symbols()
        .find(|x| x.name() == Ok(sname.as_str()) && !x.is_undefined())
        .ok_or_else(|| format!("{name}: no symbol {sname}"))?;
    // Read-only data placed with the code (the kernel lacks it), and the
    // variables the diff adds; other variables of a section that holds a new
    // one (`.data.once`, `.data..read_mostly`) stay the kernel's.
    if let Some(i) = sym.section_index() {
        if let Some(&id) = placed_secs.get(&i) {
            if !own_data.contains(&i) || is_new_data(a, &sname, new_statics) {
                return Ok((w.section_symbol(id), sym.address() as i64 + addend - delta));
            }
        }
    }
    // A numbered static (`__already_done.3`) by the running kernel's number.
    let kname = match renumber.get(&sname) {
        Some(k) => k.clone(),
        None if unnumbered(&sname) != sname => {
            return Err(format!(
                "changed code uses {sname}, a numbered static, and lucos cannot tell which of \
                 the running kernel's {}.N it is",
                unnumbered(&sname)
            ))
        }
        None => sname.clone(),
    };
    match refer(&kname) {
        Some(spec) => Ok((external(w, spec), addend - delta)),
        None => {
            let writable = sym
                .section_index()
                .map(|i| is_writable(&b.file, i))
                .unwrap_or(true);
            if writable {
                Err(format!(
                    "changed code uses {sname}, data of {name} the running kernel has no symbol \
                     for (optimized away there, or named otherwise): a new copy would not share \
                     its state"
                ))
            } else {
                Err(format!(
                    "changed code uses {sname}, read-only data the running kernel does not have \
                     as a symbol"
                ))
            }
        }
    }
}

/// Whether `name`, data of the patched build that the running kernel has
/// no symbol for, is new: the original build has nothing of that name
/// (statics compared without GCC's numbering), it is a numbered static only
/// new functions or new sites use (`new_statics`, see [`renumbering`]), or
/// it is a once-flag of lucos's own WARN (never in the kernel:
/// guest-kernels/linux/patch-include). Existing data the kernel lacks by
/// name is not new: a copy would not share its state.
fn is_new_data(a: &Obj<'_>, name: &str, new_statics: &HashSet<String>) -> bool {
    let base = unnumbered(name);
    new_statics.contains(name)
        || base.starts_with("__lucos_")
        || !a
            .file
            .symbols()
            .any(|x| !x.is_undefined() && x.name().is_ok_and(|n| unnumbered(n) == base))
}

/// Whether function `f` of `o` starts with the `__fentry__` call (after an
/// `endbr64`), the site a live patch rewrites.
fn has_entry(o: &Obj<'_>, f: &str) -> bool {
    let Some(&(sec, off, size, _)) = o.funcs.get(f) else {
        return false;
    };
    let Ok((_, rels)) = o.range(sec, off, size) else {
        return false;
    };
    rels.iter().any(|r| {
        (r.at == 1 || r.at == 5)
            && o.file
                .symbol_by_index(r.sym)
                .is_ok_and(|s| s.name() == Ok("__fentry__"))
    })
}

/// Two consecutive 32-bit PC-relative fields at `at` of table `table`
/// (an alternatives or exception-table entry): each `(symbol, addend)`.
fn pc32_fields(
    w: &mut write::Object<'_>,
    table: write::SectionId,
    at: u64,
    fields: [(write::SymbolId, i64); 2],
) -> Result<(), String> {
    for (i, (symbol, addend)) in fields.into_iter().enumerate() {
        w.add_relocation(
            table,
            write::Relocation {
                offset: at + 4 * i as u64,
                symbol,
                addend,
                flags: RelocationFlags::Elf {
                    r_type: object::elf::R_X86_64_PC32,
                },
            },
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Sections that describe code rather than run or hold data: their
/// references to a function do not take its address.
fn is_metadata(name: &str) -> bool {
    name.starts_with(".debug")
        || name.starts_with(".discard")
        || name.starts_with(".orc_")
        || name.starts_with(".rela")
        || matches!(
            name,
            "__mcount_loc"
                | "__patchable_function_entries"
                | ".return_sites"
                | ".retpoline_sites"
                | ".call_sites"
                | ".ibt_endbr_seal"
                | ".static_call_sites"
                | "__ex_table"
                | "__bug_table"
                | "__jump_table"
                | ".altinstructions"
                | ".altinstr_aux"
                | ".altinstr_replacement"
                | ".parainstructions"
                | ".smp_locks"
                | ".eh_frame"
        )
}

/// Every reference in `o` to function `f` from allocated sections: (the
/// function it is in, if any; whether it is a call or jump; the section).
fn references_to(o: &Obj<'_>, f: &str) -> Vec<(Option<String>, bool, String)> {
    let Some(&(fsec, foff, fsize, _)) = o.funcs.get(f) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for sec in o.file.sections() {
        let sname = sec.name().unwrap_or("?").to_owned();
        if is_metadata(&sname) || sec.kind() == SectionKind::Metadata {
            continue;
        }
        let data = sec.data().unwrap_or(&[]);
        for (at, r) in sec.relocations() {
            let RelocationTarget::Symbol(si) = r.target() else {
                continue;
            };
            let Ok(sym) = o.file.symbol_by_index(si) else {
                continue;
            };
            let hits = if sym.kind() == SymbolKind::Section {
                let rel = Rel {
                    at,
                    flags: r.flags(),
                    sym: si,
                    addend: r.addend(),
                    tail: 0,
                };
                let t = string_offset(&rel);
                sym.section_index() == Some(fsec) && t >= foff as i64 && t < (foff + fsize) as i64
            } else {
                sym.name() == Ok(f)
            };
            if !hits {
                continue;
            }
            let ty = match r.flags() {
                RelocationFlags::Elf { r_type } => r_type,
                _ => 0,
            };
            let opcode = at
                .checked_sub(1)
                .and_then(|i| data.get(i as usize))
                .copied();
            // call, jmp, or a conditional jump (0f 8x).
            let call = ty == object::elf::R_X86_64_PLT32
                || (ty == object::elf::R_X86_64_PC32
                    && matches!(opcode, Some(0xe8 | 0xe9 | 0x80..=0x8f)));
            let referrer = o
                .funcs
                .iter()
                .find(|(_, v)| v.0 == sec.index() && at >= v.1 && at < v.1 + v.2)
                .map(|(n, _)| n.clone());
            out.push((referrer, call, sname.clone()));
        }
    }
    out
}

/// The numbered statics of `b` (`name.N`) paired with those of `a`, and
/// those of `b` that are new.
///
/// Pairs come through the functions of both that refer to them: for each
/// name, in the order of their numbers (GCC numbers them in the order it
/// meets their declarations, so a new one shifts the rest), where the
/// function refers to as many of that name in both; a name whose base occurs once in
/// each object pairs directly. A static of `b` that no pair names is new
/// when every function of `b` that refers to it is new or refers to no
/// static of that name in `a` (a static local belongs to its function, or
/// to the inline function whose copies refer to it): a `pr_warn_once` or
/// `WARN_ONCE` the diff adds to a function, in an object that has others.
/// A function that refers to more or fewer of a name than before pairs
/// them by what its code refers to next to each (the message of a
/// `pr_warn_once`, the function it calls): each old static whose context
/// one new static alone has is paired with it, and when all are, the new
/// statics left over are new. Otherwise they stay unpaired: lucos cannot
/// tell which is new.
struct Renumbering {
    /// `b`'s name → `a`'s.
    map: HashMap<String, String>,
    /// `b`'s statics that the original object does not have.
    new: HashSet<String>,
}

fn renumbering(a: &Obj<'_>, b: &Obj<'_>) -> Result<Renumbering, String> {
    let numbered =
        |o: &Obj<'_>, f: &(SectionIndex, u64, u64, bool)| -> Result<Vec<String>, String> {
            let (_, rels) = o.range(f.0, f.1, f.2)?;
            let mut v = Vec::new();
            for r in rels {
                let Some(n) = o.named(&r) else { continue };
                if unnumbered(&n) != n && !v.contains(&n) {
                    v.push(n);
                }
            }
            Ok(v)
        };
    let of_base = |v: &[String], base: &str| -> Vec<String> {
        v.iter()
            .filter(|n| unnumbered(n) == base)
            .cloned()
            .collect()
    };
    let mut map: HashMap<String, String> = HashMap::new();
    let mut clash: BTreeSet<String> = BTreeSet::new();
    // Each numbered static of `b` → whether some function refers to it that
    // the original has, with statics of its base.
    let mut known_user: HashMap<String, bool> = HashMap::new();
    // `b`'s statics a function refers to besides the ones it had.
    let mut added: BTreeSet<String> = BTreeSet::new();
    for (f, fb) in &b.funcs {
        let vb = numbered(b, fb)?;
        let va = match a.funcs.get(f) {
            Some(fa) => numbered(a, fa)?,
            None => Vec::new(),
        };
        let bases: BTreeSet<&str> = vb.iter().map(|n| unnumbered(n)).collect();
        for base in bases {
            let (xs, ys) = (of_base(&vb, base), of_base(&va, base));
            for x in &xs {
                let k = known_user.entry(x.clone()).or_insert(false);
                *k |= !ys.is_empty();
            }
            if xs.len() != ys.len() {
                if let Some((pairs, left)) =
                    pair_by_context(a, a.funcs.get(f).copied(), b, fb, f, base)?
                {
                    for (x, y) in pairs {
                        match map.get(&x) {
                            Some(prev) if *prev != y => {
                                clash.insert(x);
                            }
                            _ => {
                                map.insert(x, y);
                            }
                        }
                    }
                    added.extend(left);
                }
                continue;
            }
            // In the order GCC numbered them (the order their declarations
            // come in the source, which a fix elsewhere keeps), not the
            // order the code refers to them: that follows the optimizer's
            // block layout, which a change anywhere in the function moves
            // (__alloc_pages refers to its five WARN_ON_ONCE_GFP flags in
            // another order once a pr_warn_once is added to it).
            let by_number = |mut v: Vec<String>| {
                v.sort_by_key(|n| number_of(n));
                v
            };
            for (x, y) in by_number(xs).into_iter().zip(by_number(ys)) {
                match map.get(&x) {
                    Some(prev) if *prev != y => {
                        clash.insert(x);
                    }
                    _ => {
                        map.insert(x, y);
                    }
                }
            }
        }
    }
    for x in clash {
        map.remove(&x);
    }
    let new: HashSet<String> = known_user
        .into_iter()
        .filter(|(x, known)| (!known || added.contains(x)) && !map.contains_key(x))
        .map(|(x, _)| x)
        .collect();
    // Bases that occur once in each object.
    let count = |o: &Obj<'_>| {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for s in o.file.symbols() {
            if let Ok(n) = s.name() {
                if unnumbered(n) != n && !s.is_undefined() {
                    m.entry(unnumbered(n).to_owned())
                        .or_default()
                        .push(n.to_owned());
                }
            }
        }
        m
    };
    // Bases that occur as often in each object: in the order of their
    // numbers (the order of their declarations), where the pairs found
    // through functions agree with that order. The kernel's build of an
    // object and lucos's differ in which functions GCC inlines (lucos's
    // headers move its choices: __alloc_pages_slowpath is a function of its
    // own in one, inlined in the other), not in the order of the source.
    let (ca, cb) = (count(a), count(b));
    for (base, names) in &cb {
        let Some(olds) = ca.get(base) else { continue };
        if names.len() != olds.len() || names.iter().any(|x| new.contains(x)) {
            continue;
        }
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort_by_key(|n| number_of(n));
            v
        };
        let pairs: Vec<(String, String)> = sorted(names).into_iter().zip(sorted(olds)).collect();
        if pairs.iter().all(|(x, y)| map.get(x).is_none_or(|m| m == y)) {
            for (x, y) in pairs {
                map.entry(x).or_insert(y);
            }
        }
    }
    Ok(Renumbering { map, new })
}

/// Bytes of code either side of a reference to a numbered static whose
/// other references make its context.
const STATIC_CONTEXT: u64 = 48;

/// The numbered statics of `base` that function `name` (`fb` of `b`, `fa`
/// of `a`) and its `.cold` part refer to, paired by their contexts: for
/// each static, what the code refers to nearest each of its references
/// (its stores of an immediate, where it has some: a once flag being set),
/// within [`STATIC_CONTEXT`] bytes, jumps to the function's own parts
/// aside: the string literals (by their text: the message a once flag
/// guards) where there are some, else anything else. Each of `a`'s whose
/// context exactly one of `b`'s has, and no other of `a`'s, is paired with
/// it.
/// `Some((pairs, new))` only when every one of `a`'s is paired (`new`: the
/// rest of `b`'s); `None` when `a`'s function is not there or some context
/// is ambiguous.
#[allow(clippy::type_complexity)]
fn pair_by_context(
    a: &Obj<'_>,
    fa: Option<(SectionIndex, u64, u64, bool)>,
    b: &Obj<'_>,
    fb: &(SectionIndex, u64, u64, bool),
    name: &str,
    base: &str,
) -> Result<Option<(Vec<(String, String)>, Vec<String>)>, String> {
    let Some(fa) = fa else { return Ok(None) };
    let cold = format!("{name}.cold");
    let jump = |t: &Target| matches!(t, Target::Sym(n, _) if n == name || *n == cold);
    let part_contexts = |o: &Obj<'_>,
                         f: &(SectionIndex, u64, u64, bool)|
     -> Result<Vec<(String, BTreeSet<Target>)>, String> {
        let (_, rels) = o.range(f.0, f.1, f.2)?;
        // Each relocation's static of `base`, if it points at one.
        let statics: Vec<Option<String>> = rels
            .iter()
            .map(|r| o.named(r).filter(|n| unnumbered(n) == base && n != base))
            .collect();
        let mut out: Vec<(String, BTreeSet<Target>)> = Vec::new();
        // Where a static is stored to with an immediate (`movb $1,
        // flag(%rip)`: a once flag being set, in the block that goes on
        // to its message), only those references; GCC moves the test and
        // the rest of the block apart.
        let stored: BTreeSet<&String> = rels
            .iter()
            .zip(&statics)
            .filter_map(|(r, n)| n.as_ref().filter(|_| r.tail > 0))
            .collect();
        for (r, n) in rels.iter().zip(&statics) {
            let Some(n) = n else { continue };
            if r.tail == 0 && stored.contains(n) {
                continue;
            }
            // The nearest string literal (the message a once flag guards,
            // loaded beside the store that sets it), else the nearest
            // reference of any other kind, within reach.
            let others: Vec<(u64, Target)> = rels
                .iter()
                .zip(&statics)
                .filter(|(q, m)| q.at.abs_diff(r.at) <= STATIC_CONTEXT && m.is_none())
                .map(|(q, _)| (q.at.abs_diff(r.at), o.target(q)))
                .filter(|(_, t)| !jump(t))
                .collect();
            let nearest = |strings: bool| {
                others
                    .iter()
                    .filter(|(_, t)| matches!(t, Target::Str(_)) == strings)
                    .min_by_key(|(d, _)| *d)
                    .map(|(_, t)| t.clone())
            };
            let near: BTreeSet<Target> = nearest(true)
                .or_else(|| nearest(false))
                .into_iter()
                .collect();
            match out.iter_mut().find(|(x, _)| x == n) {
                Some((_, set)) => set.extend(near),
                None => out.push((n.clone(), near)),
            }
        }
        Ok(out)
    };
    // The function and its cold part (where GCC puts the body of a
    // `pr_warn_once` with arguments): each searched on its own.
    let contexts = |o: &Obj<'_>,
                    f: &(SectionIndex, u64, u64, bool)|
     -> Result<Vec<(String, BTreeSet<Target>)>, String> {
        let mut out: Vec<(String, BTreeSet<Target>)> = Vec::new();
        for part in std::iter::once(*f).chain(o.funcs.get(&cold).copied()) {
            for (n, set) in part_contexts(o, &part)? {
                match out.iter_mut().find(|(x, _)| *x == n) {
                    Some((_, s)) => s.extend(set),
                    None => out.push((n, set)),
                }
            }
        }
        // A static whose references have a message nearby is known by its
        // messages alone (what else is near differs between builds).
        for (_, set) in &mut out {
            if set.iter().any(|t| matches!(t, Target::Str(_))) {
                set.retain(|t| matches!(t, Target::Str(_)));
            }
        }
        Ok(out)
    };
    let (ca, cb) = (contexts(a, &fa)?, contexts(b, fb)?);
    let mut pairs = Vec::new();
    for (y, ctx) in &ca {
        let same_b: Vec<&String> = cb
            .iter()
            .filter(|(_, c)| c == ctx)
            .map(|(x, _)| x)
            .collect();
        let same_a = ca.iter().filter(|(_, c)| c == ctx).count();
        match same_b.as_slice() {
            [x] if same_a == 1 && !ctx.is_empty() => pairs.push(((*x).clone(), y.clone())),
            _ => return Ok(None),
        }
    }
    let new = cb
        .iter()
        .map(|(x, _)| x)
        .filter(|x| !pairs.iter().any(|(p, _)| p == *x))
        .cloned()
        .collect();
    Ok(Some((pairs, new)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// `src` compiled as the kernel's objects are for a diff (function and
    /// data sections, kernel code model).
    fn compile(tag: &str, src: &str) -> Vec<u8> {
        // Its own folder per call: tests run side by side.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("lucos-diffobj-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (c, o) = (dir.join("t.c"), dir.join("t.o"));
        std::fs::write(&c, src).expect("write source");
        let st = Command::new("gcc")
            .args([
                "-c",
                "-O2",
                "-fno-pic",
                "-mcmodel=kernel",
                "-mno-red-zone",
                "-pg",
                "-mfentry",
            ])
            .args([
                "-ffunction-sections",
                "-fdata-sections",
                "-fno-asynchronous-unwind-tables",
                "-o",
                "t.o",
                "t.c",
            ])
            // `__FILE__` is `t.c` in every build, as kbuild's are relative.
            .current_dir(&dir)
            .status()
            .expect("gcc (scripts/setup.sh installs it)");
        assert!(st.success(), "gcc {tag}");
        let bytes = std::fs::read(&o).expect("object");
        let _ = std::fs::remove_dir_all(&dir);
        bytes
    }

    /// A kernel that has `names` once each, and `twice` twice.
    struct Kernel {
        names: Vec<&'static str>,
        twice: Vec<&'static str>,
    }

    impl KernelSymbols for Kernel {
        fn reference(&self, name: &str, _: &[String]) -> Option<String> {
            if self.twice.contains(&name) {
                return Some(format!("{name}#1"));
            }
            self.names.contains(&name).then(|| name.to_owned())
        }
    }

    fn kernel() -> Kernel {
        Kernel {
            names: vec![
                "show",
                "helper",
                "other",
                "counter",
                "printk",
                "__already_done.1",
                "__already_done.0",
            ],
            twice: vec!["local_helper"],
        }
    }

    const BASE: &str = r#"
extern int printk(const char *, ...);
int counter;
static __attribute__((noinline)) int local_helper(int x) { return x * 3 + counter; }
int helper(int x) { return local_helper(x) + 1; }
int other(int x) { printk("other %d\n", x); return x; }
int show(int x) { printk("show %d\n", x); return helper(x); }
"#;

    fn undefined(obj: &[u8]) -> BTreeSet<String> {
        object::File::parse(obj).expect("patch object");
        undefined_symbols(obj)
    }

    /// The names of the functions `d` replaces.
    fn changed_names(d: &ObjectDiff) -> Vec<&str> {
        d.changed.iter().map(|c| c.0.as_str()).collect()
    }

    /// The patch object's references to the kernel's once-flags.
    fn flag_refs(d: &ObjectDiff) -> Vec<String> {
        undefined(&d.object)
            .into_iter()
            .filter(|n| n.starts_with("__already_done"))
            .collect()
    }

    #[test]
    fn only_the_changed_function_is_taken_and_the_rest_refers_to_the_kernel() {
        let a = compile("a1", BASE);
        // A string moved (a new one before it), one function changed.
        let b = compile(
            "b1",
            &BASE
                .replace("printk(\"other %d\\n\", x)", "printk(\"other!! %d\\n\", x)")
                .replace("return helper(x); }", "return helper(x) + 2; }"),
        );
        let d = diff_object("t.o", &a, &b, &kernel()).expect("diff");
        let changed: Vec<&str> = d.changed.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(changed, ["other", "show"]);
        assert!(d.added.is_empty() && d.pulled_in.is_empty());
        let und = undefined(&d.object);
        // show's call of helper is inlined: it calls the kernel's static
        // local_helper (by position: the kernel has two) and printk.
        assert!(
            und.contains("local_helper#1") && und.contains("printk"),
            "{und:?}"
        );
        assert!(d.data.iter().any(|s| s.contains(".str1.")), "{:?}", d.data);
        // It links: the kernel's helper and printk, the patch's strings.
        let objs = vec![("t.o".to_owned(), d.object.clone())];
        let l = crate::link(&objs, 0xffff_ffff_c000_0000, &|n: &str| match n {
            "local_helper#1" => Ok(0xffff_ffff_8100_1000),
            "printk" => Ok(0xffff_ffff_8100_2000),
            "__fentry__" => Ok(0xffff_ffff_8100_3000),
            _ => Err(format!("no {n}")),
        })
        .expect("link");
        assert!(l.symbol(Some("t.o"), "show").is_ok());
        // Identical builds: nothing changed.
        let same = diff_object("t.o", &a, &compile("a2", BASE), &kernel()).expect("diff");
        assert!(same.changed.is_empty() && same.object.is_empty());
    }

    #[test]
    fn an_inlined_helper_changes_its_callers_and_statics_with_namesakes_are_by_position() {
        let src = BASE.replace("__attribute__((noinline)) ", "inline ");
        let a = compile("a3", &src);
        let b = compile("b3", &src.replace("x * 3", "x * 4"));
        let d = diff_object("t.o", &a, &b, &kernel()).expect("diff");
        let changed: Vec<&str> = d.changed.iter().map(|c| c.0.as_str()).collect();
        assert!(changed.contains(&"helper"), "{changed:?}");
        // A kept out-of-line static the kernel has namesakes of.
        let a = compile("a4", BASE);
        let b = compile(
            "b4",
            &BASE.replace("return local_helper(x) + 1;", "return local_helper(x) + 5;"),
        );
        let d = diff_object("t.o", &a, &b, &kernel()).expect("diff");
        assert!(
            undefined(&d.object).contains("local_helper#1"),
            "{:?}",
            undefined(&d.object)
        );
    }

    #[test]
    fn refusals_name_their_cause() {
        let a = compile("a5", BASE);
        // A changed initial value of existing data.
        let b = compile("b5", &BASE.replace("int counter;", "int counter = 5;"));
        let e = diff_object("t.o", &a, &b, &kernel()).expect_err("data");
        assert!(e.contains("initial value of counter"), "{e}");
        // Existing data the kernel has no symbol for: a copy would not
        // share its state.
        let k = Kernel {
            names: vec!["show", "helper", "other", "printk"],
            twice: vec!["local_helper"],
        };
        let b = compile("b6", &BASE.replace("x * 3 + counter", "x * 5 + counter"));
        let e = diff_object("t.o", &a, &b, &k).expect_err("kernel lacks counter");
        assert!(
            e.contains("counter") && e.contains("share its state"),
            "{e}"
        );
        // Changed __init code.
        let init = "int __attribute__((section(\".init.text\"))) setup(int x) { return x + 1; }\n";
        let a = compile("a7", &format!("{BASE}{init}"));
        let b = compile("b7", &format!("{BASE}{}", init.replace("x + 1", "x + 2")));
        let e = diff_object("t.o", &a, &b, &kernel()).expect_err("init");
        assert!(e.contains("setup") && e.contains("__init"), "{e}");
    }

    #[test]
    fn exception_table_entries_go_with_their_functions_and_link_into_one_sorted_table() {
        // Two functions with an access that may fault (an exception-table
        // entry each: the instruction, its fixup after it, a type word);
        // only the changed one's entry goes with the patch.
        let site = |f: &str, ty: u32| {
            format!(
                "int {f}(int x) {{ asm volatile(\"1: nop\\n nop\\n2:\\n.pushsection __ex_table,\\\"a\\\"\\n.long 1b - .\\n.long 2b - .\\n.long {ty}\\n.popsection\"); return x + 1; }}\n"
            )
        };
        let src = format!("{BASE}{}{}", site("probe", 3), site("quiet", 5));
        let a = compile("a16", &src);
        let b = compile("b16", &src.replacen("x + 1", "x + 2", 1));
        let k = Kernel {
            names: vec!["probe", "quiet", "printk"],
            twice: vec![],
        };
        let d = diff_object("t.o", &a, &b, &k).expect("diff");
        assert_eq!(d.changed.len(), 1, "{:?}", d.changed);
        assert_eq!(d.extable_entries, 1);
        let objs = vec![("t.o".to_owned(), d.object.clone())];
        let l = crate::link(&objs, 0xffff_ffff_c000_0000, &|n: &str| match n {
            "__fentry__" => Ok(0xffff_ffff_8100_3000),
            _ => Err(format!("no {n}")),
        })
        .expect("link");
        let t = l.extable.expect("a table");
        assert_eq!(t.count, 1);
        let at = (t.addr - l.base) as usize;
        let field = |o: usize| {
            i32::from_le_bytes(
                l.bytes[at + o..at + o + 4]
                    .try_into()
                    .expect("4 or 8 bytes"),
            )
        };
        let insn = t.addr.wrapping_add_signed(field(0).into());
        let fixup = (t.addr + 4).wrapping_add_signed(field(4).into());
        let probe = l.symbol(Some("t.o"), "probe").expect("probe");
        // probe: the fentry call (5 bytes), then the two nops of the site.
        assert_eq!(insn, probe + 5);
        assert_eq!(fixup, probe + 7);
        assert_eq!(field(8), 3);
    }

    #[test]
    fn variables_the_diff_adds_are_the_patchs_own_writable_data() {
        let a = compile("a14", BASE);
        let b = compile(
            "b14",
            &BASE.replace(
                "int other(int x) {",
                "static int seen; static int start = 7; int other(int x) { seen += start++;",
            ),
        );
        let d = diff_object("t.o", &a, &b, &kernel()).expect("diff");
        assert!(d.own_data.iter().any(|s| s.contains("seen")), "{d:?}");
        assert!(d.own_data.iter().any(|s| s.contains("start")), "{d:?}");
        let objs = vec![("t.o".to_owned(), d.object.clone())];
        let l = crate::link(&objs, 0xffff_ffff_c000_0000, &|n: &str| match n {
            "printk" | "__fentry__" | "counter" => Ok(0xffff_ffff_8100_2000),
            _ => Err(format!("no {n}")),
        })
        .expect("link");
        // Both after the code, writable, `start` with its initial value;
        // the code reads and writes them there.
        assert_eq!(l.writable.len(), 1, "{:?}", l.writable);
        let (at, len) = l.writable[0];
        let other = l.symbol(Some("t.o"), "other").expect("other");
        assert!(at > other);
        let data = &l.bytes[(at - l.base) as usize..][..len as usize];
        assert!(data.chunks(4).any(|c| c == 7u32.to_le_bytes()), "{data:?}");
        let code = &l.bytes[(other - l.base) as usize..(at - l.base) as usize];
        let used: Vec<u64> =
            iced_x86::Decoder::with_ip(64, code, other, iced_x86::DecoderOptions::NONE)
                .into_iter()
                .filter(|i| i.is_ip_rel_memory_operand())
                .map(|i| i.ip_rel_memory_address())
                .filter(|&a| a >= at && a < at + len)
                .collect();
        assert!(used.len() >= 2, "{used:x?}");
        // A new per-CPU variable cannot be the patch's own (it is reached
        // through %gs, relative to the per-CPU area).
        let b = compile(
            "c14",
            &BASE.replace(
                "int other(int x) {",
                "static int pc __attribute__((section(\".data..percpu\"))); int other(int x) { pc++;",
            ),
        );
        let e = diff_object("t.o", &a, &b, &kernel()).expect_err("per-CPU");
        assert!(e.contains("pc") && e.contains(".data..percpu"), "{e}");
    }

    #[test]
    fn the_kernels_counters_are_numbering_too() {
        assert_eq!(unnumbered("__UNIQUE_ID_ddebug123"), "__UNIQUE_ID_ddebug");
        assert_eq!(unnumbered("__already_done.12"), "__already_done");
        assert_eq!(unnumbered("f.isra.0"), "f.isra.0");
        assert_eq!(unnumbered("__UNIQUE_ID_x"), "__UNIQUE_ID_x");
    }

    #[test]
    fn a_changed_function_without_a_patchable_entry_is_switched_through_its_callers() {
        let src = r#"
extern int printk(const char *, ...);
static __attribute__((noinline, no_instrument_function)) int body(int x) { printk("body"); return x + 1; }
int entry_a(int x) { return body(x) * 2; }
int entry_b(int x) { return body(x) * 3; }
int __attribute__((no_instrument_function)) global_body(int x) { return x - 1; }
"#;
        let k = Kernel {
            names: vec!["body", "entry_a", "entry_b", "global_body", "printk"],
            twice: vec![],
        };
        let a = compile("a9", src);
        let b = compile("b9", &src.replace("x + 1", "x + 2"));
        let d = diff_object("t.o", &a, &b, &k).expect("diff");
        let mut changed: Vec<&str> = d.changed.iter().map(|c| c.0.as_str()).collect();
        changed.sort_unstable();
        assert_eq!(changed, ["entry_a", "entry_b"], "{d:?}");
        assert!(d.pulled_in.iter().any(|p| p.0 == "body"), "{d:?}");
        // A global one: code elsewhere may call it.
        let b = compile("b10", &src.replace("x - 1", "x - 2"));
        let e = diff_object("t.o", &a, &b, &k).expect_err("global notrace");
        assert!(
            e.contains("global_body") && e.contains("no patchable entry"),
            "{e}"
        );
        // A static one whose address is taken.
        let src2 = format!("{src}\nint (*ptr)(int) = body;\n");
        let a = compile("a11", &src2);
        let b = compile("b11", &src2.replace("x + 1", "x + 2"));
        let e = diff_object("t.o", &a, &b, &k).expect_err("address taken");
        assert!(e.contains("address is taken"), "{e}");
    }

    #[test]
    fn what_the_kernel_lacks_is_placed_with_the_code() {
        let src = r#"
static const int table[4] = { 3, 1, 4, 1 };
static __attribute__((noinline)) int pick(int x) { return table[x & 3]; }
int show(int x) { return pick(x) + 1; }
"#;
        // The kernel has `show`, but neither the helper nor the table (as if
        // it had inlined or merged them away).
        let k = Kernel {
            names: vec!["show"],
            twice: vec![],
        };
        let a = compile("a12", src);
        let b = compile("b12", &src.replace("pick(x) + 1", "pick(x) + 2"));
        let d = diff_object("t.o", &a, &b, &k).expect("diff");
        assert_eq!(d.changed.len(), 1, "{d:?}");
        assert!(d.pulled_in.iter().any(|p| p.0 == "pick"), "{d:?}");
        assert!(d.data.iter().any(|s| s.contains("table")), "{d:?}");
        let und = undefined(&d.object);
        assert!(!und.contains("pick") && !und.contains("table"), "{und:?}");
    }

    #[test]
    fn numbered_statics_pair_by_their_users() {
        let src = r#"
extern int printk(const char *, ...);
int show(int x) { static int __already_done; if (!__already_done) { __already_done = 1; printk("a"); } return x; }
int other(int x) { static int __already_done; if (!__already_done) { __already_done = 1; printk("b"); } return x + 1; }
"#;
        let a = compile("a8", src);
        // `show` changes; GCC's numbering of the statics is as before.
        let b = compile("b8", &src.replace("return x; }", "return x + 7; }"));
        let d = diff_object("t.o", &a, &b, &kernel()).expect("diff");
        let und = undefined(&d.object);
        let refs: Vec<&String> = und
            .iter()
            .filter(|n| n.starts_with("__already_done"))
            .collect();
        assert_eq!(refs.len(), 1, "{und:?}");
        // The name the original object gives show's static.
        let f = object::File::parse(&*a).expect("obj");
        assert!(
            f.symbols().any(|s| s.name() == Ok(refs[0].as_str())),
            "{refs:?}"
        );
    }

    #[test]
    fn a_once_flag_added_beside_others_is_the_patchs_own_and_the_others_stay_the_kernels() {
        let src = r#"
extern int printk(const char *, ...);
#define ONCE(s) ({ static int __already_done; if (!__already_done) { __already_done = 1; printk(s); } })
int show(int x) { ONCE("a"); return x; }
int other(int x) { ONCE("b"); return x + 1; }
int third(int x) { return x * 2; }
"#;
        let a = compile("a9", src);
        let names = |o: &[u8]| -> BTreeSet<String> {
            object::File::parse(o)
                .expect("obj")
                .symbols()
                .filter_map(|s| s.name().ok().map(str::to_owned))
                .filter(|n| n.starts_with("__already_done"))
                .collect()
        };
        // The running kernel: this object's functions and statics.
        let kernel = Kernel {
            names: ["show", "other", "third", "printk"]
                .into_iter()
                .chain(
                    names(&a)
                        .into_iter()
                        .map(|n| &*Box::leak(n.into_boxed_str())),
                )
                .collect(),
            twice: vec![],
        };
        // A once-flag added to `third` (which had none): the patch's own.
        let b = compile(
            "b9",
            &src.replace("{ return x * 2; }", "{ ONCE(\"c\"); return x * 2; }"),
        );
        let d = diff_object("t.o", &a, &b, &kernel).expect("diff");
        assert_eq!(changed_names(&d), ["third"]);
        assert!(
            d.own_data.iter().any(|s| s.contains("__already_done")),
            "{d:?}"
        );
        assert!(flag_refs(&d).is_empty(), "{d:?}");
        // `show` changed too: its flag is the kernel's (as the original
        // names it), third's is new.
        let b = compile(
            "b10",
            &src.replace("{ return x * 2; }", "{ ONCE(\"c\"); return x * 2; }")
                .replace("return x; }", "return x + 7; }"),
        );
        let d = diff_object("t.o", &a, &b, &kernel).expect("diff");
        let refs = flag_refs(&d);
        assert_eq!(refs.len(), 1, "{refs:?}");
        assert!(names(&a).contains(&refs[0]), "{refs:?} {:?}", names(&a));
        assert_eq!(d.own_data.len(), 1, "{d:?}");
        // A second flag in a function that had one, before it: the old one
        // is known by its message ("a") and stays the kernel's, the new one
        // ("z") is the patch's own.
        let show_flag = |o: &[u8]| -> String {
            let obj = Obj::parse("t.o", o).expect("obj");
            let f = obj.funcs["show"];
            let (_, rels) = obj.range(f.0, f.1, f.2).expect("show");
            rels.iter()
                .filter_map(|r| obj.named(r))
                .find(|n| n.starts_with("__already_done"))
                .unwrap_or_default()
        };
        let b = compile(
            "b11",
            &src.replace(
                "{ ONCE(\"a\"); return x; }",
                "{ ONCE(\"z\"); ONCE(\"a\"); return x; }",
            ),
        );
        let d = diff_object("t.o", &a, &b, &kernel).expect("paired by context");
        assert_eq!(changed_names(&d), ["show"]);
        let refs = flag_refs(&d);
        assert_eq!(refs, [show_flag(&a)], "{d:?}");
        assert_eq!(d.own_data.len(), 1, "{d:?}");
        // Two flags whose code is alike: which is new is not known, refused
        // by name.
        let b = compile(
            "b11b",
            &src.replace(
                "{ ONCE(\"a\"); return x; }",
                "{ ONCE(\"a\"); ONCE(\"a\"); return x; }",
            ),
        );
        let e = diff_object("t.o", &a, &b, &kernel).expect_err("ambiguous");
        assert!(e.to_string().contains("numbered static"), "{e}");
    }

    #[test]
    fn a_new_read_only_numbered_static_is_the_patchs_copy_whatever_the_kernel_has() {
        let src = r#"
extern int printk(const char *, ...);
int show(int x) { printk("%s %d\n", __func__, x); return x; }
int other(int x) { printk("%s %d\n", __func__, x); return x + 1; }
int third(int x) { return x * 2; }
"#;
        let a = compile("a12", src);
        // The running kernel has `__func__.N` of every number, in other
        // objects too (namesakes).
        let kernel = Kernel {
            names: vec!["show", "other", "third", "printk"],
            twice: vec![
                "__func__.0",
                "__func__.1",
                "__func__.2",
                "__func__.3",
                "__func__.4",
            ],
        };
        // `third` prints its name now: a new `__func__.N`, copied into the
        // patch (before: refused, "cannot tell which").
        let b = compile(
            "b12",
            &src.replace(
                "{ return x * 2; }",
                "{ printk(\"%s\\n\", __func__); return x * 2; }",
            ),
        );
        let d = diff_object("t.o", &a, &b, &kernel).expect("diff");
        assert_eq!(changed_names(&d), ["third"]);
        assert!(d.data.iter().any(|s| s.contains("__func__")), "{d:?}");
        assert!(
            undefined(&d.object)
                .iter()
                .all(|n| !n.starts_with("__func__")),
            "{:?}",
            undefined(&d.object)
        );
        // The copy holds the name.
        let f = object::File::parse(&*d.object).expect("patch object");
        let sec = f
            .sections()
            .find(|s| s.name().is_ok_and(|n| n.contains("__func__")))
            .expect("__func__ section");
        assert_eq!(sec.data().expect("data"), b"third\0");
    }

    #[test]
    fn a_new_export_is_refused_by_name() {
        // EXPORT_SYMBOL as Linux 6.1 writes it: an entry in a section of
        // its own, `___ksymtab+NAME`.
        let src = r#"
extern int printk(const char *, ...);
int show(int x) { printk("show"); return x; }
"#;
        let a = compile("a17", src);
        let b = compile(
            "b17",
            &format!(
                "{src}int lucos_new(int x) {{ return x + 1; }}\n\
                 static const void *__ksymtab_lucos_new __attribute__((used, section(\"___ksymtab+lucos_new\"))) = lucos_new;\n"
            )
            .replace("return x; }", "return lucos_new(x); }"),
        );
        let e = diff_object("t.o", &a, &b, &kernel()).expect_err("a new export");
        assert!(e.contains("exports lucos_new (EXPORT_SYMBOL)"), "{e}");
    }

    #[test]
    fn a_function_without_an_entry_whose_cold_part_calls_it_is_switched_through_its_callers() {
        // `body` (notrace) has a cold part that calls `body` again: that
        // call is the function's own, not a caller to switch.
        let src = r#"
extern void __attribute__((cold)) note(int);
extern int g[64];
static __attribute__((noinline, no_instrument_function)) int body(int x, int d) {
    int s = 0;
    for (int i = 0; i < x; i++) {
        s += g[i & 63] * i;
        if (s > 100000) {
            note(s);
            s += body(x - 3, d + 1) * 3 + 1;
        }
    }
    return s + 1;
}
int caller(int x) { return body(x, 0) * 2; }
"#;
        let a = compile("a19", src);
        let b = compile("b19", &src.replace("return s + 1;", "return s + 2;"));
        let names: Vec<&'static str> = object::File::parse(&*a)
            .expect("obj")
            .symbols()
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .filter(|n| !n.is_empty())
            .map(|n| &*Box::leak(n.into_boxed_str()))
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("body") && n.ends_with(".cold")),
            "GCC split a cold part: {names:?}"
        );
        let kernel = Kernel {
            names,
            twice: vec![],
        };
        let d = diff_object("t.o", &a, &b, &kernel).expect("diff");
        assert_eq!(changed_names(&d), ["caller"]);
        // The function is placed with its cold part, which is not a
        // function of its own to switch or place.
        let placed: Vec<&str> = d.pulled_in.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            placed
                .iter()
                .any(|n| n.starts_with("body") && !n.ends_with(".cold")),
            "{placed:?}"
        );
        assert!(!placed.iter().any(|n| n.ends_with(".cold")), "{placed:?}");
    }

    #[test]
    fn line_maps_follow_unchanged_lines() {
        let m = LineMap::between("a\nb\nc\nd\n", "x\ny\na\nb\nd\n");
        assert!(m.moved(1, 3) && m.moved(2, 4) && m.moved(4, 5));
        // Removed, not where it went, not moved.
        assert!(!m.moved(3, 5) && !m.moved(1, 4));
        let same = LineMap::between("a\nb\n", "a\nb\n");
        assert!(!same.moved(1, 1));
        // Strings: a `FILE.c:LINE` whose line moved is the same string.
        assert!(same_but_lines(b"at x/a.c:1 now", b"at x/a.c:3 now", &m));
        assert!(!same_but_lines(b"at x/a.c:1 now", b"at x/a.c:4 now", &m));
        assert!(!same_but_lines(b"limit 1", b"limit 3", &m));
        assert!(!same_but_lines(b"at a.c:1", b"at b.c:3", &m));
    }

    #[test]
    fn a_function_whose_code_differs_only_in_moved_lines_is_left_alone() {
        let src = r#"
#define S2(x) #x
#define S(x) S2(x)
extern void report(const char *f, int line, int x);
int show(int x) { report("f", __LINE__, x); return x; }
int other(int x) { report(__FILE__ ":" S(__LINE__), __LINE__, x); return x + 1; }
"#;
        let a = compile("a15", src);
        let kernel = Kernel {
            names: vec!["show", "other", "report"],
            twice: vec![],
        };
        // Two lines added at the top, `show` changed: `other` passes its
        // line, two further down, and nothing else differs.
        let shifted = format!("/* a\n * b */\n{src}").replace("return x; }", "return x + 3; }");
        let b = compile("b15", &shifted);
        let lines = LineMap::between(src, &shifted);
        let opts = DiffOptions {
            lines: Some(&lines),
            ..DiffOptions::default()
        };
        let d = diff_object_with("t.o", &a, &b, None, &kernel, &opts).expect("diff");
        assert_eq!(changed_names(&d), ["show"]);
        assert_eq!(d.line_shifted, ["other"]);
        // Without the map: both replaced.
        let d = diff_object("t.o", &a, &b, &kernel).expect("diff");
        assert_eq!(changed_names(&d).len(), 2, "{d:?}");
        // A value that is not where the line went: a change.
        let off = shifted.replace(
            "__LINE__, x); return x + 1;",
            "__LINE__ + 1, x); return x + 1;",
        );
        let b = compile("c15", &off);
        let lines = LineMap::between(src, &off);
        let opts = DiffOptions {
            lines: Some(&lines),
            ..DiffOptions::default()
        };
        let d = diff_object_with("t.o", &a, &b, None, &kernel, &opts).expect("diff");
        assert_eq!(changed_names(&d).len(), 2, "{d:?}");
        assert!(d.line_shifted.is_empty());
    }

    #[test]
    fn numbered_statics_pair_in_the_order_of_their_numbers_and_object_wide() {
        // Three once-flags of inline helpers; the patched build calls them
        // in another order (the code refers to them in another order), the
        // numbers stay those of their declarations.
        let src = |inl: &str, order: &str| {
            format!(
                "extern void report(int *p);\n#define W static int flag; report(&flag)\nstatic {inl} void h1(void) {{ W; }}\nstatic {inl} void h2(void) {{ W; }}\nvoid show(void) {{ {{ W; }} {order} }}\n"
            )
        };
        let inl = "inline __attribute__((always_inline))";
        let a = compile("a18", &src(inl, "h1(); h2();"));
        let b = compile("b18", &src(inl, "h2(); h1();"));
        let (oa, ob) = (
            Obj::parse("t.o", &a).expect("a"),
            Obj::parse("t.o", &b).expect("b"),
        );
        let r = renumbering(&oa, &ob).expect("renumbering");
        for n in ["flag.0", "flag.1", "flag.2"] {
            assert_eq!(r.map.get(n).map(String::as_str), Some(n), "{:?}", r.map);
        }
        // The kernel's build calls the helpers (not inlined there): the
        // function refers to one flag there and three here; the object has
        // three of them in both.
        let p = compile("p18", &src("__attribute__((noinline))", "h1(); h2();"));
        let op = Obj::parse("t.o", &p).expect("p");
        let r = renumbering(&op, &oa).expect("renumbering");
        for n in ["flag.0", "flag.1", "flag.2"] {
            assert_eq!(r.map.get(n).map(String::as_str), Some(n), "{:?}", r.map);
        }
    }

    #[test]
    fn a_merged_constant_is_compared_by_its_value_not_its_label() {
        // A function added above renumbers GCC's constant labels (.LC0 ->
        // .LC1); the function using its constant is unchanged.
        let base = "double scale(double x) { return x * 1.5; }\n";
        let a = compile("a19", base);
        let b = compile(
            "b19",
            &format!("double extra(double x) {{ return x * 2.25; }}\n{base}"),
        );
        let kernel = Kernel {
            names: vec!["scale"],
            twice: vec![],
        };
        let d = diff_object("t.o", &a, &b, &kernel).expect("diff");
        assert!(changed_names(&d).is_empty(), "{d:?}");
        assert_eq!(d.added, ["extra"]);
        // Its value changed: a change.
        let c = compile("c19", &base.replace("1.5", "1.75"));
        let d = diff_object("t.o", &a, &c, &kernel).expect("diff");
        assert_eq!(changed_names(&d), ["scale"]);
    }

    #[test]
    fn lines_a_changed_header_moved_are_no_change_of_the_functions_that_pass_them() {
        // A header's inline warns with its own line (as WARN_ON does); the
        // diff adds two lines to the header above it and changes nothing
        // the C file's functions do. `#line` stands for the include.
        let header = "/* h.h */\nextern void report(const char *f, int line);\nstatic inline int check(int x) { if (x < 0) report(\"h\", __LINE__); return x; }\n";
        let moved = format!("/* one */\n/* two */\n{header}");
        let src = |h: &str| {
            format!(
                "#line 1 \"h.h\"\n{h}#line 1 \"t.c\"\nint show(int x) {{ return check(x) + 1; }}\nint other(int x) {{ return x; }}\n"
            )
        };
        let kernel = Kernel {
            names: vec!["show", "other", "report"],
            twice: vec![],
        };
        let a = compile("a17", &src(header));
        let b = compile("b17", &src(&moved));
        // The C file's own map (nothing moved) and the header's.
        let own = LineMap::between("int show;\n", "int show;\n");
        let lines = own.clone().and(&LineMap::between(header, &moved));
        let opts = DiffOptions {
            lines: Some(&lines),
            ..DiffOptions::default()
        };
        let d = diff_object_with("t.o", &a, &b, None, &kernel, &opts).expect("diff");
        assert!(changed_names(&d).is_empty(), "{d:?}");
        assert_eq!(d.line_shifted, ["show"]);
        // With the C file's map alone, show is replaced (as before headers
        // were mapped).
        let opts = DiffOptions {
            lines: Some(&own),
            ..DiffOptions::default()
        };
        let d = diff_object_with("t.o", &a, &b, None, &kernel, &opts).expect("diff");
        assert_eq!(changed_names(&d), ["show"]);
    }

    #[test]
    fn a_pr_debug_descriptor_whose_line_moved_is_no_change_of_data() {
        // Linux's `struct _ddebug` and `pr_debug`'s descriptor of it.
        let src = r#"
struct dd { const char *m, *f, *file, *fmt; unsigned int lineno:18, cls:6, flags:8; long key; } __attribute__((aligned(8)));
extern int printk(const char *, ...);
#define PR(s, fl) ({ static struct dd __attribute__((used, section("__dyndbg"))) descriptor = { "m", __func__, "f.c", s, __LINE__, 0, fl, 0 }; printk(s, &descriptor); })
int show(int x) { PR("a", 0); return x; }
int other(int x) { PR("b", 0); return x + 1; }
"#;
        let a = compile("a14", src);
        let kernel = Kernel {
            names: ["show", "other", "printk"]
                .into_iter()
                .chain(
                    object::File::parse(&*a)
                        .expect("obj")
                        .symbols()
                        .filter_map(|s| s.name().ok().map(str::to_owned))
                        .filter(|n| n.starts_with("descriptor"))
                        .map(|n| &*Box::leak(n.into_boxed_str())),
                )
                .collect(),
            twice: vec![],
        };
        // Two lines added above both: every descriptor's line moves.
        let shifted = format!("/* a\n * b */\n{src}").replace("return x + 1; }", "return x + 2; }");
        let d = diff_object("t.o", &a, &compile("b14", &shifted), &kernel).expect("diff");
        assert_eq!(changed_names(&d), ["other"]);
        // Another member of it changed: refused.
        let e = diff_object(
            "t.o",
            &a,
            &compile("c14", &shifted.replace("PR(\"a\", 0)", "PR(\"a\", 1)")),
            &kernel,
        )
        .expect_err("flags changed");
        assert!(e.contains("initial value of descriptor"), "{e}");
    }

    #[test]
    fn once_flags_packed_in_one_section_are_told_apart_by_their_instructions() {
        // Linux's DO_ONCE_LITE: one-byte flags in `.data.once`, tested with
        // `cmpb $0, x(%rip)` and set with `movb $1, x(%rip)`, whose
        // displacements are followed by an immediate byte.
        let src = r#"
extern int printk(const char *, ...);
#define ONCE(s) ({ static _Bool __attribute__((section(".data.once"))) __already_done; if (!__already_done) { __already_done = 1; printk(s); } })
int show(int x) { ONCE("a"); return x; }
int other(int x) { return x + 1; }
"#;
        let a = compile("a13", src);
        let b = compile(
            "b13",
            &src.replace("{ return x + 1; }", "{ ONCE(\"b\"); return x + 1; }"),
        );
        let names = |o: &[u8]| -> Vec<String> {
            object::File::parse(o)
                .expect("obj")
                .symbols()
                .filter_map(|s| s.name().ok().map(str::to_owned))
                .filter(|n| n.starts_with("__already_done"))
                .collect()
        };
        assert_eq!(names(&b).len(), 2, "{:?}", names(&b));
        let kernel = Kernel {
            names: ["show", "other", "printk"]
                .into_iter()
                .chain(
                    names(&a)
                        .into_iter()
                        .map(|n| &*Box::leak(n.into_boxed_str())),
                )
                .collect(),
            twice: vec![],
        };
        // `other`'s new flag is the patch's own, not show's (the byte before
        // it), which stays the kernel's and is not used.
        let d = diff_object("t.o", &a, &b, &kernel).expect("diff");
        assert_eq!(changed_names(&d), ["other"]);
        assert_eq!(d.own_data, [".data.once"], "{d:?}");
        assert!(flag_refs(&d).is_empty(), "{d:?}");
        // And `show` changed beside it: its flag is the kernel's.
        let b2 = compile(
            "b14",
            &src.replace("{ return x + 1; }", "{ ONCE(\"b\"); return x + 1; }")
                .replace("return x; }", "return x + 7; }"),
        );
        let d = diff_object("t.o", &a, &b2, &kernel).expect("diff");
        assert_eq!(flag_refs(&d), [names(&a)[0].clone()]);
    }

    #[test]
    fn a_new_global_defined_in_one_object_and_used_in_another_links_to_the_patchs_copy() {
        let one = "int counter;\nint show(int x) { return x + counter; }\n";
        let two = "int other(int x) { return x + 1; }\n";
        let (a1, a2) = (compile("a15", one), compile("a16", two));
        let b1 = compile(
            "b15",
            &one.replace("int counter;", "int counter;\nint lucos_global = 5;")
                .replace("return x + counter;", "lucos_global++; return x + counter;"),
        );
        let b2 = compile(
            "b16",
            &format!(
                "extern int lucos_global;\n{}",
                two.replace("x + 1;", "x + lucos_global;")
            ),
        );
        let kernel = Kernel {
            names: vec!["show", "other", "counter"],
            twice: vec![],
        };
        let d1 = diff_object("one.o", &a1, &b1, &kernel).expect("diff one");
        let d2 = diff_object("two.o", &a2, &b2, &kernel).expect("diff two");
        assert!(!d1.own_data.is_empty(), "{d1:?}");
        assert!(undefined(&d2.object).contains("lucos_global"));
        // Linked together: two.o's reference is one.o's new variable, not a
        // kernel symbol (the kernel has none of that name).
        let objs = vec![
            ("one.o".to_owned(), d1.object.clone()),
            ("two.o".to_owned(), d2.object.clone()),
        ];
        let base = 0xffff_ffff_c000_0000;
        let l = crate::link(&objs, base, &|n: &str| match n {
            "counter" => Ok(0xffff_ffff_8200_0000),
            "__fentry__" => Ok(0xffff_ffff_8100_3000),
            _ => Err(format!("no {n}")),
        })
        .expect("link");
        let g = l
            .symbol(None, "lucos_global")
            .expect("the new global is defined");
        assert!(g >= base, "{g:#x}");
        // The variable's object has no other change: on its own it gives
        // nothing; asked for the globals two.o needs, it places them.
        let b1 = compile(
            "b18",
            &one.replace("int counter;", "int counter;\nint lucos_global = 5;"),
        );
        let d1 = diff_object("one.o", &a1, &b1, &kernel).expect("diff one");
        assert!(d1.object.is_empty() && d1.changed.is_empty(), "{d1:?}");
        let wanted = undefined_symbols(&d2.object);
        let globals: Vec<String> = new_global_variables(&a1, &b1)
            .expect("new globals")
            .into_iter()
            .filter(|g| wanted.contains(g))
            .collect();
        assert_eq!(globals, ["lucos_global"]);
        let d1 = diff_object_with(
            "one.o",
            &a1,
            &b1,
            None,
            &kernel,
            &DiffOptions {
                new_globals: &globals,
                ..DiffOptions::default()
            },
        )
        .expect("diff one for its global");
        assert!(d1.changed.is_empty() && !d1.own_data.is_empty(), "{d1:?}");
        let objs = vec![
            ("one.o".to_owned(), d1.object.clone()),
            ("two.o".to_owned(), d2.object.clone()),
        ];
        let l = crate::link(&objs, base, &|n: &str| match n {
            "__fentry__" => Ok(0xffff_ffff_8100_3000),
            _ => Err(format!("no {n}")),
        })
        .expect("link");
        let g = l
            .symbol(None, "lucos_global")
            .expect("the new global is defined");
        assert!(g >= base, "{g:#x}");
        // Its initial value is the patch's.
        let at = (g - base) as usize;
        assert_eq!(l.bytes[at..at + 4], 5i32.to_le_bytes());
    }

    #[test]
    fn statics_are_named_as_the_kernels_own_build_names_them() {
        // The kernel's build: `warn` uses a once-flag; the build as patch
        // code is built (lucos's WARN) does not, so GCC numbers the others
        // differently there.
        let src = |warn_flag: bool| {
            format!(
                r#"
extern int printk(const char *, ...);
#define ONCE(s) ({{ static int __already_done; if (!__already_done) {{ __already_done = 1; printk(s); }} }})
int show(int x) {{ ONCE("a"); return x; }}
int other(int x) {{ ONCE("b"); return x + 1; }}
int warn(int x) {{ {} return x; }}
"#,
                if warn_flag {
                    "ONCE(\"w\");"
                } else {
                    "printk(\"w\");"
                }
            )
        };
        let own = compile("p12", &src(true));
        let a = compile("a12", &src(false));
        let b = compile(
            "b12",
            &src(false).replace("return x; }\nint other", "return x + 7; }\nint other"),
        );
        let flag_of = |o: &[u8], f: &str| -> String {
            let file = object::File::parse(o).expect("obj");
            let sec = file
                .symbols()
                .find(|s| s.name() == Ok(f))
                .and_then(|s| s.section_index())
                .expect("function");
            let rel = file
                .section_by_index(sec)
                .expect("section")
                .relocations()
                .find_map(|(_, r)| match r.target() {
                    object::RelocationTarget::Symbol(i) => {
                        let s = file.symbol_by_index(i).ok()?;
                        let si = s.section_index()?;
                        let name = file.section_by_index(si).ok()?.name().ok()?.to_owned();
                        name.strip_prefix(".bss.").map(str::to_owned)
                    }
                    _ => None,
                })
                .expect("a flag");
            rel
        };
        let kernel_name = flag_of(&own, "show");
        assert_ne!(kernel_name, flag_of(&a, "show"), "the builds number alike");
        let names: Vec<&'static str> = object::File::parse(&*own)
            .expect("obj")
            .symbols()
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .filter(|n| !n.is_empty())
            .map(|n| &*Box::leak(n.into_boxed_str()))
            .chain(["printk"])
            .collect();
        let kernel = Kernel {
            names,
            twice: vec![],
        };
        let d = diff_object_of_build("t.o", &a, &b, Some(&own), &kernel).expect("diff");
        let und = undefined(&d.object);
        assert!(
            und.contains(&kernel_name),
            "{und:?}, kernel's {kernel_name}"
        );
        assert!(d.own_data.is_empty(), "{d:?}");
    }

    /// `static_cpu_has` as Linux 6.1 writes it: an ALWAYS alternative over a
    /// jump to an out-of-line test in `.altinstr_aux`.
    const CPU_HAS: &str = r#"
extern struct { unsigned char caps[80]; } boot_cpu_data;
static inline __attribute__((always_inline)) int has(void)
{
	asm goto("661:\n\tjmp 6f\n662:\n"
		".skip -(((665f-664f)-(662b-661b)) > 0) * ((665f-664f)-(662b-661b)),0x90\n663:\n"
		".pushsection .altinstructions,\"a\"\n"
		" .long 661b - .\n .long 664f - .\n .word 117\n .byte 663b-661b\n .byte 665f-664f\n"
		".popsection\n.pushsection .altinstr_replacement,\"ax\"\n"
		"664:\n\tjmp %l[t_no]\n665:\n.popsection\n"
		".pushsection .altinstr_aux,\"ax\"\n6:\n\ttestb $1, boot_cpu_data(%%rip)\n"
		"\tjnz %l[t_yes]\n\tjmp %l[t_no]\n.popsection\n"
		: : : : t_yes, t_no);
t_yes:
	return 1;
t_no:
	return 0;
}
int first(int x) { return has() ? x + 1 : x; }
int second(int x) { return has() ? x * 2 : x; }
"#;

    #[test]
    fn alternatives_go_with_their_function_and_are_applied_at_link_time() {
        let a = compile("a15", CPU_HAS);
        // first gains a second test: second's out-of-line test moves in
        // .altinstr_aux, which is no change of second.
        let b = compile(
            "b15",
            &CPU_HAS.replace("? x + 1 : x;", "? x + 1 + has() : x;"),
        );
        let k = Kernel {
            names: vec!["first", "second", "boot_cpu_data"],
            twice: vec![],
        };
        let d = diff_object("t.o", &a, &b, &k).expect("diff");
        let changed: Vec<&str> = d.changed.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(changed, ["first"], "{d:?}");
        let f = object::File::parse(&*d.object).expect("patch object");
        let table = f.section_by_name(ALT_TABLE).expect("alternatives kept");
        assert_eq!(table.size(), 2 * ALT_ENTRY, "first's two sites only");
        assert!(f.section_by_name(ALT_REPLACEMENT).is_some());
        // Linked for a CPU (ALWAYS is bit 117): every site of first jumps
        // within first, none into the out-of-line tests.
        let objs = vec![("t.o".to_owned(), d.object.clone())];
        let resolve = |n: &str| match n {
            "boot_cpu_data" => Ok(0xffff_ffff_8200_0000),
            "__fentry__" => Ok(0xffff_ffff_8100_3000),
            _ => Err(format!("no {n}")),
        };
        let l =
            crate::link::link_with(
                &objs,
                0xffff_ffff_c000_0000,
                &resolve,
                &|bit| Ok(bit == 117),
            )
            .expect("link");
        let start = l.symbol(Some("t.o"), "first").expect("first");
        let size = f
            .symbols()
            .find(|s| s.name() == Ok("first"))
            .map(|s| s.size())
            .expect("first's size");
        let code = &l.bytes[(start - l.base) as usize..][..size as usize];
        let mut jumps = 0;
        for ins in iced_x86::Decoder::with_ip(64, code, start, iced_x86::DecoderOptions::NONE) {
            if ins.mnemonic() == iced_x86::Mnemonic::Jmp {
                jumps += 1;
                let t = ins.near_branch_target();
                assert!(t >= start && t < start + size, "a jump out of first: {ins}");
            }
        }
        assert!(jumps >= 2, "first's two sites became jumps");
        // Without the CPU's features the patch cannot be linked.
        let e = crate::link(&objs, 0xffff_ffff_c000_0000, &resolve).expect_err("no features");
        assert!(e.to_string().contains("alternatives"), "{e}");
    }

    #[test]
    fn a_clone_is_called_as_the_kernel_does_or_the_patch_is_refused() {
        let src = r#"
extern int printk(const char *, ...);
extern int flag;
static __attribute__((noinline)) int work(int x, int mode) { if (mode > 2) printk("m%d", x); return x * 7 + mode; }
int caller(int x) { return work(x, 3) + 1; }
int other(int x) { if (flag) printk("o"); return work(x + 1, 3) + 2; }
"#;
        let plain = compile("a13", src);
        let names: Vec<String> = object::File::parse(&*plain)
            .expect("obj")
            .symbols()
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .collect();
        let clone = names
            .iter()
            .find(|n| n.starts_with("work.constprop."))
            .expect("GCC cloned work")
            .clone();
        let diff = ObjectDiff {
            references: [(clone.clone(), clone.clone())].into(),
            ..ObjectDiff::default()
        };
        // One caller compiles differently (as a static branch would), the
        // other the same: the convention is shown.
        let one = compile(
            "b13",
            &src.replace("if (flag) printk(\"o\");", "if (flag > 1) printk(\"o\");"),
        );
        check_clone_conventions("t.o", &plain, &one, &diff).expect("one caller agrees");
        // Both differ: refused, naming the clone and its callers.
        let both = compile(
            "c13",
            &src.replace("if (flag) printk(\"o\");", "if (flag > 1) printk(\"o\");")
                .replace("work(x, 3) + 1;", "work(x, 3) + 1 + flag;"),
        );
        let e = check_clone_conventions("t.o", &plain, &both, &diff).expect_err("no caller agrees");
        assert!(e.contains(&clone) && e.contains("caller, other"), "{e}");
        // A clone the patch does not involve needs nothing.
        check_clone_conventions("t.o", &plain, &both, &ObjectDiff::default())
            .expect("not involved");
        // A patch changing `caller` in that build: the clone it calls is
        // unproven, so the patch takes its own copy of it, which then calls
        // nothing unproven.
        let patched = compile(
            "d13",
            &src.replace("if (flag) printk(\"o\");", "if (flag > 1) printk(\"o\");")
                .replace("work(x, 3) + 1 + flag;", "work(x, 3) + 5 + flag;"),
        );
        let kernel = Kernel {
            names: vec![
                "caller",
                "other",
                "printk",
                "flag",
                Box::leak(clone.clone().into_boxed_str()),
            ],
            twice: vec![],
        };
        let d = diff_object_of_build("t.o", &both, &patched, Some(&plain), &kernel).expect("diff");
        assert_eq!(changed_names(&d), ["caller"]);
        assert!(undefined(&d.object).contains(&clone), "{d:?}");
        let unproven = unproven_clones("t.o", &plain, &both, &d).expect("unproven");
        assert_eq!(unproven.len(), 1, "{unproven:?}");
        assert_eq!(unproven[0].0, clone);
        assert_eq!(unproven[0].1, ["caller", "other"]);
        let d = diff_object_with(
            "t.o",
            &both,
            &patched,
            Some(&plain),
            &kernel,
            &DiffOptions {
                own_copies: std::slice::from_ref(&clone),
                ..DiffOptions::default()
            },
        )
        .expect("diff with a copy");
        assert_eq!(changed_names(&d), ["caller"]);
        assert!(!undefined(&d.object).contains(&clone), "{d:?}");
        assert!(d.pulled_in.iter().any(|(n, _)| *n == clone), "{d:?}");
        assert!(unproven_clones("t.o", &plain, &both, &d)
            .expect("unproven")
            .is_empty());
    }
}
