//! A kernel module file (`.ko`): a relocatable ELF object the kernel links
//! into itself at load time. What a live patch of a loaded module needs of
//! it: the module's name and build-id (its identity, as the loaded module
//! carries them), its functions, and, per function, the byte ranges that
//! differ between the file and the loaded module by design.
//!
//! A loaded module's code differs from its file in more places than
//! vmlinux's does from its image: every relocated field (the loader writes
//! each call to the kernel, each address of the module's own data), and the
//! sites the kernel rewrites at load or later, found as in vmlinux through
//! the module's own tables (`__mcount_loc`, `.altinstructions`,
//! `.return_sites`, `.retpoline_sites`, `.smp_locks`, `.parainstructions`,
//! `__jump_table`, `.static_call_sites`). In a relocatable object each
//! table entry's site is the target of the relocation at that entry (site
//! `S + A`, whether the field is absolute or PC-relative), so the sites are
//! read from the tables' relocations, never from their (zero) contents.

use std::collections::HashMap;

use goblin::elf::section_header::{SHF_ALLOC, SHF_EXECINSTR, SHT_NOBITS};
use goblin::elf::sym::STT_FUNC;

use crate::SymbolError;

/// One function of a module file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFunction {
    /// Its name.
    pub name: String,
    /// Its section's index and name.
    pub section: usize,
    /// The section's name.
    pub section_name: String,
    /// Offset in its section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Whether it is global.
    pub global: bool,
}

/// A module file, parsed.
#[derive(Debug, Clone)]
pub struct ModuleObject {
    /// The module's name (`name=` of its `.modinfo`, else the file's stem).
    pub name: String,
    /// Hex of its GNU build-id note.
    pub build_id: Option<String>,
    /// Its `srcversion=` and `version=`, when it has them.
    pub srcversion: Option<String>,
    /// Its version.
    pub version: Option<String>,
    /// `vermagic=`: the kernel release and options it was built for.
    pub vermagic: Option<String>,
    /// Its functions in executable sections (not init code: the kernel runs
    /// it once at load and frees it).
    pub functions: Vec<ModuleFunction>,
    /// Per executable section index: its bytes.
    text: HashMap<usize, Vec<u8>>,
    /// Per executable section index: masked ranges (offset, length),
    /// sorted.
    masked: HashMap<usize, Vec<(u64, u64)>>,
    /// Where each table's sites came from: (table, count).
    pub tables: Vec<(String, usize)>,
    /// How many defined symbols (functions, data) have each name.
    defined: HashMap<String, usize>,
    /// Where the names defined more than once are: (section, offset).
    namesakes: HashMap<String, Vec<(usize, u64)>>,
    /// Per relocated field of code (section, offset): what it refers to
    /// (section, offset: its symbol's value plus the addend).
    code_refs: HashMap<(usize, u64), (usize, u64)>,
}

/// Bytes a relocation of x86-64 type `t` writes.
fn field_len(t: u32) -> u64 {
    use goblin::elf::reloc::*;
    match t {
        R_X86_64_64 | R_X86_64_PC64 | R_X86_64_GOTOFF64 => 8,
        R_X86_64_16 | R_X86_64_PC16 => 2,
        R_X86_64_8 | R_X86_64_PC8 => 1,
        R_X86_64_NONE => 0,
        _ => 4,
    }
}

impl ModuleObject {
    /// Parses the module file `data` (`name` names it in errors).
    pub fn parse(data: &[u8], name: &str) -> Result<Self, SymbolError> {
        let bad = |why: String| SymbolError::BadElf {
            path: name.to_owned(),
            why,
        };
        // Distributions may ship modules compressed (.ko.xz, .ko.zst, .ko.gz).
        for (magic, what) in [
            (&b"\xfd7zXZ\0"[..], "xz"),
            (&b"\x28\xb5\x2f\xfd"[..], "zstd"),
            (&b"\x1f\x8b"[..], "gzip"),
        ] {
            if data.starts_with(magic) {
                return Err(bad(format!(
                    "a {what}-compressed module: decompress it first (e.g. `{what} -d`)"
                )));
            }
        }
        let elf = crate::parse_elf(data, name)?;
        if elf.header.e_machine != goblin::elf::header::EM_X86_64 {
            return Err(bad(format!(
                "a module for machine {} (lucos patches x86-64 kernels)",
                elf.header.e_machine
            )));
        }
        if elf.header.e_type != goblin::elf::header::ET_REL {
            return Err(bad(
                "not a kernel module (not a relocatable object: a .ko is one)".into(),
            ));
        }
        let sec_name = |i: usize| -> &str {
            elf.section_headers
                .get(i)
                .and_then(|sh| elf.shdr_strtab.get_at(sh.sh_name))
                .unwrap_or("")
        };
        let find = |n: &str| {
            elf.section_headers
                .iter()
                .position(|sh| elf.shdr_strtab.get_at(sh.sh_name) == Some(n))
        };
        // .modinfo: NUL-separated key=value strings.
        let mut info: HashMap<String, String> = HashMap::new();
        if let Some(i) = find(".modinfo") {
            let d = crate::section_data(data, &elf.section_headers[i]).unwrap_or_default();
            for kv in d.split(|&b| b == 0) {
                let s = String::from_utf8_lossy(kv);
                if let Some((k, v)) = s.split_once('=') {
                    info.entry(k.to_owned()).or_insert_with(|| v.to_owned());
                }
            }
        }
        let stem = std::path::Path::new(name)
            .file_stem()
            .map(|s| s.to_string_lossy().replace('-', "_"))
            .unwrap_or_default();
        let build_id = find(".note.gnu.build-id")
            .and_then(|i| crate::section_data(data, &elf.section_headers[i]))
            .and_then(crate::identity::build_id_from_notes);
        let is_text = |i: usize| {
            elf.section_headers.get(i).is_some_and(|sh| {
                sh.sh_flags & u64::from(SHF_ALLOC | SHF_EXECINSTR)
                    == u64::from(SHF_ALLOC | SHF_EXECINSTR)
                    && sh.sh_type != SHT_NOBITS
            })
        };
        let mut text = HashMap::new();
        for (i, sh) in elf.section_headers.iter().enumerate() {
            if is_text(i) {
                let d = crate::section_data(data, sh)
                    .ok_or_else(|| bad(format!("section {} lies outside the file", sec_name(i))))?;
                text.insert(i, d.to_vec());
            }
        }
        let mut defined: HashMap<String, usize> = HashMap::new();
        for s in elf.syms.iter() {
            let kind = s.st_type();
            if s.st_shndx == 0 || !matches!(kind, STT_FUNC | goblin::elf::sym::STT_OBJECT) {
                continue;
            }
            if let Some(n) = elf.strtab.get_at(s.st_name).filter(|n| !n.is_empty()) {
                *defined.entry(n.to_owned()).or_default() += 1;
            }
        }
        let mut namesakes: HashMap<String, Vec<(usize, u64)>> = HashMap::new();
        for s in elf.syms.iter() {
            if s.st_shndx == 0 || !matches!(s.st_type(), STT_FUNC | goblin::elf::sym::STT_OBJECT) {
                continue;
            }
            if let Some(n) = elf.strtab.get_at(s.st_name) {
                if defined.get(n).is_some_and(|&c| c > 1) {
                    namesakes
                        .entry(n.to_owned())
                        .or_default()
                        .push((s.st_shndx, s.st_value));
                }
            }
        }
        let mut functions = Vec::new();
        for s in elf.syms.iter() {
            if s.st_type() != STT_FUNC || !is_text(s.st_shndx) {
                continue;
            }
            // Init code runs once at load and is freed after: never replaced.
            if sec_name(s.st_shndx).starts_with(".init") {
                continue;
            }
            let Some(n) = elf.strtab.get_at(s.st_name) else {
                continue;
            };
            functions.push(ModuleFunction {
                name: n.to_owned(),
                section: s.st_shndx,
                section_name: sec_name(s.st_shndx).to_owned(),
                offset: s.st_value,
                size: s.st_size,
                global: s.st_bind() != goblin::elf::sym::STB_LOCAL,
            });
        }
        // (section, offset) of symbol `idx` plus `addend`.
        let target = |idx: usize, addend: i64| -> Option<(usize, u64)> {
            let s = elf.syms.get(idx)?;
            Some((s.st_shndx, s.st_value.wrapping_add(addend as u64)))
        };
        let mut masked: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
        let mut tables = Vec::new();
        // Relocations per section they apply to, sorted by offset.
        let mut relocs: HashMap<usize, Vec<goblin::elf::Reloc>> = HashMap::new();
        for (sh_idx, rs) in &elf.shdr_relocs {
            let Some(sh) = elf.section_headers.get(*sh_idx) else {
                continue;
            };
            let applies_to = sh.sh_info as usize;
            let v = relocs.entry(applies_to).or_default();
            v.extend(rs.iter());
            v.sort_by_key(|r| r.r_offset);
        }
        // Every relocated field of code: the loader writes it.
        let mut code_refs = HashMap::new();
        for (sec, rs) in &relocs {
            if !text.contains_key(sec) {
                continue;
            }
            for r in rs {
                if let Some(t) = target(r.r_sym, r.r_addend.unwrap_or(0)) {
                    code_refs.insert((*sec, r.r_offset), t);
                }
            }
            let m = masked.entry(*sec).or_default();
            for r in rs {
                let n = field_len(r.r_type);
                if n > 0 {
                    m.push((r.r_offset, n));
                }
            }
        }
        // The sites of a table: the relocation at each entry's site field.
        let sites_of = |table: &str, stride: u64, field: u64| -> Option<Vec<(u64, (usize, u64))>> {
            let i = find(table)?;
            let rs = relocs.get(&i)?;
            Some(
                rs.iter()
                    .filter(|r| r.r_offset % stride == field)
                    .filter_map(|r| {
                        target(r.r_sym, r.r_addend.unwrap_or(0)).map(|t| (r.r_offset, t))
                    })
                    .collect(),
            )
        };
        let table_bytes = |table: &str| {
            find(table)
                .and_then(|i| crate::section_data(data, &elf.section_headers[i]))
                .unwrap_or_default()
        };
        let mut add = |sec: usize, off: u64, len: u64| {
            if text.contains_key(&sec) {
                masked.entry(sec).or_default().push((off, len));
            }
        };
        // A relative call/jmp is 5 bytes, a conditional jump 6.
        let branch_len =
            |sec: usize, off: u64| match text.get(&sec).and_then(|t| t.get(off as usize)) {
                Some(0x0f) => 6,
                _ => 5,
            };
        // A static branch is a 2-byte or a 5-byte jump or nop (objtool
        // picks the nop of the jump's size).
        let jump_len = |sec: usize, off: u64| {
            let at = text
                .get(&sec)
                .and_then(|t| t.get(off as usize..off as usize + 2));
            match at {
                Some([0xeb, _]) | Some([0x66, 0x90]) => 2,
                _ => 5,
            }
        };
        for (table, stride, len) in [
            (".retpoline_sites", 4, None),
            (".return_sites", 4, None),
            (".smp_locks", 4, Some(1)),
            (".ibt_endbr_seal", 4, Some(4)),
            ("__mcount_loc", 8, Some(5)),
            ("__jump_table", 16, Some(0)),
            (".static_call_sites", 8, Some(5)),
        ] {
            let Some(sites) = sites_of(table, stride, 0) else {
                continue;
            };
            tables.push((table.to_owned(), sites.len()));
            for (_, (sec, off)) in sites {
                let l = match len {
                    Some(0) => jump_len(sec, off),
                    Some(l) => l,
                    None => branch_len(sec, off),
                };
                add(sec, off, l);
            }
        }
        // struct alt_instr: s32 instr, s32 repl, u16 cpuid, u8 instrlen,
        // u8 replacementlen (12 bytes).
        if let Some(sites) = sites_of(".altinstructions", 12, 0) {
            let t = table_bytes(".altinstructions");
            tables.push((".altinstructions".into(), sites.len()));
            for (at, (sec, off)) in sites {
                let l = t.get(at as usize + 10).copied().unwrap_or(0);
                add(sec, off, u64::from(l));
            }
        }
        // struct paravirt_patch_site: u8 *instr, u8 type, u8 len (16 bytes).
        if let Some(sites) = sites_of(".parainstructions", 16, 0) {
            let t = table_bytes(".parainstructions");
            tables.push((".parainstructions".into(), sites.len()));
            for (at, (sec, off)) in sites {
                let l = t.get(at as usize + 9).copied().unwrap_or(0);
                add(sec, off, u64::from(l));
            }
        }
        for v in masked.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        Ok(ModuleObject {
            name: info.get("name").cloned().unwrap_or(stem),
            build_id,
            srcversion: info.get("srcversion").cloned(),
            version: info.get("version").cloned(),
            vermagic: info.get("vermagic").cloned(),
            functions,
            text,
            masked,
            tables,
            defined,
            namesakes,
            code_refs,
        })
    }

    /// Reads and parses the module file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SymbolError> {
        let data = crate::read_file(path)?;
        Self::parse(&data, &path.display().to_string())
    }

    /// How many functions and variables the module defines named `name`.
    pub fn defines(&self, name: &str) -> usize {
        self.defined.get(name).copied().unwrap_or(0)
    }

    /// What the relocated field at `offset` of code section `section`
    /// refers to: (section, offset), its symbol's value plus its addend.
    pub fn reference_at(&self, section: usize, offset: u64) -> Option<(usize, u64)> {
        self.code_refs.get(&(section, offset)).copied()
    }

    /// Which of the module's symbols named `name` is the one at `offset` of
    /// `section`, counted in address order, where all of them are in that
    /// one section (the module loader keeps a section's order, so the
    /// loaded module's symbols of that name come in the same order); `None`
    /// otherwise.
    pub fn namesake_position(&self, name: &str, section: usize, offset: u64) -> Option<usize> {
        let all = self.namesakes.get(name)?;
        if all.iter().any(|&(s, _)| s != section) {
            return None;
        }
        let mut offsets: Vec<u64> = all.iter().map(|&(_, o)| o).collect();
        offsets.sort_unstable();
        offsets.iter().position(|&o| o == offset)
    }

    /// The functions named `name` (a local name may repeat).
    pub fn functions_named(&self, name: &str) -> Vec<&ModuleFunction> {
        self.functions.iter().filter(|f| f.name == name).collect()
    }

    /// The bytes of `f` as the file has them (relocated fields zero).
    pub fn code(&self, f: &ModuleFunction) -> Option<&[u8]> {
        let t = self.text.get(&f.section)?;
        t.get(f.offset as usize..(f.offset + f.size) as usize)
    }

    /// The ranges of `f` (offset, length from its entry) whose bytes the
    /// loaded module has by design other than the file: relocated fields
    /// and the sites of the kernel's code-patching tables, clipped to `f`.
    pub fn masked(&self, f: &ModuleFunction) -> Vec<(u32, u32)> {
        let (a, e) = (f.offset, f.offset + f.size);
        self.masked
            .get(&f.section)
            .map(|v| {
                v.iter()
                    .filter(|&&(o, l)| o < e && o + l > a)
                    .map(|&(o, l)| {
                        let s = o.max(a);
                        let t = (o + l).min(e);
                        ((s - a) as u32, (t - s) as u32)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}
