//! Kernel symbols, types and identity for lucos.
//!
//! One guest kernel, several sources: the ELF symbol table of a kernel image
//! (the test kernel, a Linux `vmlinux`), a `System.map`, the kallsyms tables
//! decoded from the kernel's own bytes (a running guest's memory, or a
//! stripped image), and DWARF for struct layouts. Duplicate local symbols are
//! normal in a kernel, so every symbol keeps the object file it came from
//! where the source knows it (ELF `STT_FILE`) and its position among
//! same-named symbols. [`KernelIdentity`] (build-id and version banner) ties
//! a file-based source to the running kernel it describes.

use std::collections::HashMap;
use std::path::Path;

use goblin::elf::sym::{STB_GLOBAL, STB_LOCAL, STB_WEAK, STT_FILE, STT_FUNC, STT_OBJECT};

pub mod btf;
pub mod dwarf;
pub mod fixups;
pub mod identity;
pub mod kallsyms;
pub mod module;
mod sysmap;

pub use identity::KernelIdentity;

/// Errors reading or querying symbols.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a usable ELF image.
    #[error("{path} is not a usable ELF file: {why}")]
    BadElf {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// No symbol has that name.
    #[error("no symbol named '{0}'")]
    NotFound(String),
    /// No symbol covers that address.
    #[error("no symbol contains address {0:#x}")]
    NoSymbolAt(u64),
    /// The image has no kallsyms tables that decode.
    #[error("no kallsyms in the kernel image: {0}")]
    NoKallsyms(String),
    /// The file has no DWARF.
    #[error("{0} has no DWARF debug info (built without -g, or stripped); types need it")]
    NoDebugInfo(String),
    /// No struct of that name in the DWARF.
    #[error("no struct named '{0}' in the debug info")]
    NoType(String),
    /// A struct without a member of that name.
    #[error("struct {strukt} has no member '{member}'")]
    NoMember {
        /// The struct.
        strukt: String,
        /// The member path asked for.
        member: String,
    },
    /// A System.map line that does not parse.
    #[error("{path}:{line}: not a System.map line: '{text}'")]
    BadMap {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A file-based source describes another kernel build than the running one.
    #[error("{source_name} is for another kernel build than the running one: {why}")]
    Mismatch {
        /// The file-based source.
        source_name: String,
        /// What differs.
        why: String,
    },
    /// A lookup that does not parse.
    #[error("'{0}' is not a symbol lookup: give NAME, NAME@OBJECT_FILE, NAME#N or a 0x address")]
    BadQuery(String),
    /// Several symbols have that name.
    #[error(
        "'{name}' is ambiguous: {count} symbols have that name (in {files}); \
         say which with NAME@OBJECT_FILE or NAME#N (0-based)"
    )]
    Ambiguous {
        /// The name.
        name: String,
        /// How many.
        count: usize,
        /// Their object files.
        files: String,
    },
}

/// Kind of symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SymbolKind {
    /// Code.
    Function,
    /// Data.
    Object,
    /// Anything else (labels from assembly, linker symbols).
    Other,
}

/// Serializes addresses as `"0x..."` strings: JSON numbers above 2^53 lose
/// precision in most consumers (jq, JavaScript).
pub mod hex_u64 {
    /// Serializes `v` as a hex string.
    pub fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:#x}"))
    }

    /// Reads a `"0x..."` string back.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(serde::de::Error::custom)
    }
}

/// One symbol.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Symbol {
    /// Name.
    pub name: String,
    /// Address.
    #[serde(with = "hex_u64")]
    pub addr: u64,
    /// Size in bytes (0 when unknown).
    pub size: u64,
    /// Function, object or other.
    pub kind: SymbolKind,
    /// The nm-style type letter (`T` global text, `t` local text, `D`, `b`, ...).
    #[serde(rename = "type")]
    pub ty: char,
    /// Global (or weak) rather than local.
    pub global: bool,
    /// The object file a local symbol came from, from the preceding STT_FILE entry.
    pub file: Option<String>,
    /// Position among the symbols of this name, in symbol-table order (0-based).
    pub position: usize,
}

impl Symbol {
    /// A symbol known by its nm type letter only (kallsyms, System.map):
    /// size, file and position are filled in later.
    pub fn from_type_letter(name: String, addr: u64, ty: char) -> Self {
        let kind = match ty.to_ascii_lowercase() {
            't' | 'w' => SymbolKind::Function,
            'd' | 'r' | 'b' | 'g' | 's' | 'v' => SymbolKind::Object,
            _ => SymbolKind::Other,
        };
        Symbol {
            name,
            addr,
            size: 0,
            kind,
            ty,
            global: ty.is_ascii_uppercase(),
            file: None,
            position: 0,
        }
    }

    /// Whether `addr` lies inside this symbol.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr < self.addr + self.size.max(1)
    }
}

/// Sets each symbol's size to the distance to the next higher address, as
/// kallsyms does for sources that carry no sizes (kallsyms, System.map); the
/// highest symbol keeps size 0.
pub(crate) fn sizes_to_next_address(symbols: &mut [Symbol]) {
    let mut order: Vec<usize> = (0..symbols.len()).collect();
    order.sort_by_key(|&i| symbols[i].addr);
    let mut upper: Option<u64> = None;
    for w in (0..order.len()).rev() {
        let addr = symbols[order[w]].addr;
        if let Some(&next) = order.get(w + 1) {
            if symbols[next].addr > addr {
                upper = Some(symbols[next].addr);
            }
        }
        if let Some(u) = upper.filter(|&u| u > addr) {
            symbols[order[w]].size = u - addr;
        }
    }
}

/// Parses the ELF image `data`; `path` names it in errors.
pub(crate) fn parse_elf<'a>(
    data: &'a [u8],
    path: &str,
) -> Result<goblin::elf::Elf<'a>, SymbolError> {
    goblin::elf::Elf::parse(data).map_err(|e| SymbolError::BadElf {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// The file contents of section `sh` of `data`: none for a NOBITS section
/// or one that lies outside the file.
pub(crate) fn section_data<'a>(
    data: &'a [u8],
    sh: &goblin::elf::SectionHeader,
) -> Option<&'a [u8]> {
    if sh.sh_type == goblin::elf::section_header::SHT_NOBITS {
        return None;
    }
    let start = usize::try_from(sh.sh_offset).ok()?;
    data.get(start..start.checked_add(usize::try_from(sh.sh_size).ok()?)?)
}
/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, SymbolError> {
    std::fs::read(path).map_err(|source| SymbolError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// nm's type letter for an ELF symbol in section `shndx`.
fn elf_type_letter(elf: &goblin::elf::Elf, shndx: usize, global: bool) -> char {
    use goblin::elf::section_header::{SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHT_NOBITS};
    let c = if shndx == goblin::elf::section_header::SHN_ABS as usize {
        'a'
    } else {
        match elf.section_headers.get(shndx) {
            Some(sh) if sh.sh_flags & SHF_EXECINSTR as u64 != 0 => 't',
            Some(sh) if sh.sh_type == SHT_NOBITS => 'b',
            Some(sh) if sh.sh_flags & SHF_WRITE as u64 != 0 => 'd',
            Some(sh) if sh.sh_flags & SHF_ALLOC as u64 != 0 => 'r',
            _ => 'n',
        }
    };
    if global {
        c.to_ascii_uppercase()
    } else {
        c
    }
}

/// The bytes of a kernel image as mapped at its virtual addresses: from an
/// ELF file's loadable segments, or read out of a running guest. Unmapped
/// gaps read as zero.
#[derive(Debug, Clone)]
pub struct KernelImage {
    base: u64,
    bytes: Vec<u8>,
}

/// Kernel images are mapped in the top half of the address space; segments
/// below it (x86's per-CPU segment at 0) are not part of the image mapping.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

impl KernelImage {
    /// An image whose first byte is at virtual address `base`.
    pub fn new(base: u64, bytes: Vec<u8>) -> Self {
        KernelImage { base, bytes }
    }

    /// The loadable kernel segments of an ELF image laid out at their
    /// virtual addresses.
    pub fn from_elf_bytes(data: &[u8], name: &str) -> Result<Self, SymbolError> {
        let bad = |why: String| SymbolError::BadElf {
            path: name.to_owned(),
            why,
        };
        let elf = parse_elf(data, name)?;
        let loads: Vec<_> = elf
            .program_headers
            .iter()
            .filter(|ph| ph.p_type == goblin::elf::program_header::PT_LOAD)
            .filter(|ph| ph.p_vaddr >= KERNEL_HALF && ph.p_filesz > 0)
            .collect();
        let base = loads
            .iter()
            .map(|ph| ph.p_vaddr)
            .min()
            .ok_or_else(|| bad("no loadable kernel segments".into()))?;
        let end = loads
            .iter()
            .map(|ph| ph.p_vaddr + ph.p_memsz)
            .max()
            .unwrap_or(base);
        if end - base > 1 << 30 {
            return Err(bad("kernel segments span more than 1 GiB".into()));
        }
        let mut bytes = vec![0u8; (end - base) as usize];
        for ph in loads {
            let src = data
                .get(ph.p_offset as usize..(ph.p_offset + ph.p_filesz) as usize)
                .ok_or_else(
                    || bad("a segment lies past the end of the file (truncated?)".into()),
                )?;
            let at = (ph.p_vaddr - base) as usize;
            bytes[at..at + src.len()].copy_from_slice(src);
        }
        Ok(KernelImage { base, bytes })
    }

    /// Virtual address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// `len` bytes at virtual address `addr`, if inside the image.
    pub fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        self.bytes.get(off..off.checked_add(len)?)
    }

    /// The NUL-terminated string at `addr` (at most 512 bytes).
    pub fn c_str(&self, addr: u64) -> Option<String> {
        let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        let tail = self.bytes.get(off..)?;
        let tail = &tail[..tail.len().min(512)];
        let len = memchr::memchr(0, tail)?;
        Some(String::from_utf8_lossy(&tail[..len]).into_owned())
    }
}

/// A symbol lookup as users write it: `NAME`, `NAME@FILE` (the object file
/// of a local symbol, e.g. `mix@console.c`), `NAME#N` (the N-th of that name,
/// 0-based, in table order) or an address (`0xffffffff81001234`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// By name.
    Name {
        /// The name.
        name: String,
        /// Object file, for duplicates.
        file: Option<String>,
        /// Position among same-named symbols, for duplicates.
        position: Option<usize>,
    },
    /// By address.
    Addr(u64),
}

impl std::str::FromStr for Query {
    type Err = SymbolError;

    fn from_str(q: &str) -> Result<Self, SymbolError> {
        let bad = || SymbolError::BadQuery(q.to_owned());
        if let Some(hex) = q.strip_prefix("0x").or_else(|| q.strip_prefix("0X")) {
            return u64::from_str_radix(hex, 16)
                .map(Query::Addr)
                .map_err(|_| bad());
        }
        if let Some((name, pos)) = q.rsplit_once('#') {
            let position = pos.parse().map_err(|_| bad())?;
            return Ok(Query::Name {
                name: name.to_owned(),
                file: None,
                position: Some(position),
            });
        }
        if let Some((name, file)) = q.split_once('@') {
            if name.is_empty() || file.is_empty() {
                return Err(bad());
            }
            return Ok(Query::Name {
                name: name.to_owned(),
                file: Some(file.to_owned()),
                position: None,
            });
        }
        if q.is_empty() {
            return Err(bad());
        }
        Ok(Query::Name {
            name: q.to_owned(),
            file: None,
            position: None,
        })
    }
}

/// The answer to one [`Query`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    /// The query as given.
    pub query: String,
    /// The symbol found.
    pub symbol: Symbol,
    /// Offset of the address into the symbol (0 for a name).
    #[serde(with = "hex_u64")]
    pub offset: u64,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.symbol;
        let whence = match &s.file {
            Some(file) => format!(" [{file}]"),
            None => String::new(),
        };
        if self.query.starts_with("0x") || self.query.starts_with("0X") {
            write!(
                f,
                "{:#018x} = {}+{:#x}/{:#x} {}{}",
                s.addr + self.offset,
                s.name,
                self.offset,
                s.size,
                s.ty,
                whence
            )
        } else {
            write!(
                f,
                "{:016x} {} {} size={:#x}{}{}",
                s.addr,
                s.ty,
                s.name,
                s.size,
                whence,
                if s.position > 0 {
                    format!(" #{}", s.position)
                } else {
                    String::new()
                }
            )
        }
    }
}

/// The symbols of one kernel image.
#[derive(Debug, Default, Clone)]
pub struct SymbolTable {
    symbols: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
    /// Indices of sized symbols, sorted by address.
    by_addr: Vec<usize>,
    /// Sizes are distances to the next symbol (kallsyms, System.map), not
    /// the compiler's: they may include padding.
    sizes_estimated: bool,
}

impl SymbolTable {
    /// Reads the symbol table of the ELF file at `path`.
    pub fn from_elf_file(path: &Path) -> Result<Self, SymbolError> {
        let data = read_file(path)?;
        Self::from_elf_bytes(&data, &path.display().to_string())
    }

    /// Reads the symbol table of an ELF image in memory; `name` is used in errors.
    pub fn from_elf_bytes(data: &[u8], name: &str) -> Result<Self, SymbolError> {
        let bad = |why: String| SymbolError::BadElf {
            path: name.to_owned(),
            why,
        };
        let elf = parse_elf(data, name)?;
        if elf.syms.is_empty() {
            return Err(bad("no symbol table (stripped?)".into()));
        }
        let mut symbols = Vec::new();
        let mut file: Option<String> = None;
        for sym in elf.syms.iter() {
            let name = elf.strtab.get_at(sym.st_name).unwrap_or("");
            if sym.st_type() == STT_FILE {
                file = Some(name.to_owned());
                continue;
            }
            if name.is_empty() || sym.st_shndx == 0 {
                continue;
            }
            let bind = sym.st_bind();
            let global = bind == STB_GLOBAL || bind == STB_WEAK;
            let kind = match sym.st_type() {
                STT_FUNC => SymbolKind::Function,
                STT_OBJECT => SymbolKind::Object,
                _ => SymbolKind::Other,
            };
            let ty = elf_type_letter(&elf, sym.st_shndx, global);
            symbols.push(Symbol {
                name: name.to_owned(),
                addr: sym.st_value,
                size: sym.st_size,
                kind,
                ty,
                global,
                file: if bind == STB_LOCAL {
                    file.clone()
                } else {
                    None
                },
                position: 0,
            });
        }
        Ok(Self::from_symbols(symbols))
    }

    /// A table of `symbols`, in their order; positions among same-named
    /// symbols are assigned here.
    pub fn from_symbols(mut symbols: Vec<Symbol>) -> Self {
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in symbols.iter_mut().enumerate() {
            let same = by_name.entry(s.name.clone()).or_default();
            s.position = same.len();
            same.push(i);
        }
        let mut by_addr: Vec<usize> = (0..symbols.len())
            .filter(|&i| symbols[i].size > 0)
            .collect();
        by_addr.sort_by_key(|&i| symbols[i].addr);
        SymbolTable {
            symbols,
            by_name,
            by_addr,
            sizes_estimated: false,
        }
    }

    /// Marks the sizes as distances to the next symbol.
    pub fn with_estimated_sizes(mut self) -> Self {
        self.sizes_estimated = true;
        self
    }

    /// Whether sizes are distances to the next symbol (they may include
    /// padding) rather than the compiler's.
    pub fn sizes_estimated(&self) -> bool {
        self.sizes_estimated
    }

    /// Reads a `System.map` (`nm -n` output: address, type letter, name).
    pub fn from_system_map(text: &str, path: &str) -> Result<Self, SymbolError> {
        sysmap::parse(text, path)
    }

    /// Symbols of an ELF kernel image: its symbol table, or when it is
    /// stripped (a vmlinux taken out of a bzImage) its kallsyms tables.
    pub fn from_kernel_elf(data: &[u8], name: &str) -> Result<Self, SymbolError> {
        match Self::from_elf_bytes(data, name) {
            Err(SymbolError::BadElf { why, .. }) if why.contains("no symbol table") => {
                let image = KernelImage::from_elf_bytes(data, name)?;
                Ok(kallsyms::decode(&image)?.table.with_estimated_sizes())
            }
            other => other,
        }
    }

    /// Reads symbols from the file at `path`: an ELF image's symbol table, or
    /// when the image is stripped the kallsyms tables inside it; or a
    /// System.map.
    pub fn from_file(path: &Path) -> Result<Self, SymbolError> {
        let data = read_file(path)?;
        let name = path.display().to_string();
        if data.starts_with(b"\x7fELF") {
            Self::from_kernel_elf(&data, &name)
        } else {
            let text = String::from_utf8(data).map_err(|_| SymbolError::BadElf {
                path: name.clone(),
                why: "neither an ELF file nor a text System.map".into(),
            })?;
            Self::from_system_map(&text, &name)
        }
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// All symbols, in symbol-table order.
    pub fn iter(&self) -> impl Iterator<Item = &Symbol> {
        self.symbols.iter()
    }

    /// Every symbol called `name`.
    pub fn all_named(&self, name: &str) -> Vec<&Symbol> {
        self.by_name
            .get(name)
            .map(|v| v.iter().map(|&i| &self.symbols[i]).collect())
            .unwrap_or_default()
    }

    /// The one symbol called `name`; an error if there is none or several.
    pub fn lookup(&self, name: &str) -> Result<&Symbol, SymbolError> {
        match self.all_named(name).as_slice() {
            [] => Err(SymbolError::NotFound(name.to_owned())),
            [one] => Ok(one),
            many => Err(SymbolError::Ambiguous {
                name: name.to_owned(),
                count: many.len(),
                files: many
                    .iter()
                    .map(|s| match &s.file {
                        Some(f) => f.clone(),
                        None => format!("#{} at {:#x}", s.position, s.addr),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The symbol a patch object's undefined reference names: `NAME`, or
    /// `NAME#N`, the N-th symbol of that name in address order (a `static`
    /// the kernel has namesakes of; `lucos build --diff` writes these).
    pub fn reference(&self, spec: &str) -> Result<&Symbol, SymbolError> {
        let Some((name, n)) = split_reference(spec) else {
            return self.lookup(spec);
        };
        let mut all = self.all_named(name);
        all.sort_by_key(|s| s.addr);
        let count = all.len();
        all.into_iter().nth(n).ok_or_else(|| {
            SymbolError::NotFound(format!(
                "{spec} (the kernel has {count} symbols named {name})"
            ))
        })
    }

    /// The symbol called `name` from object file `file`.
    pub fn lookup_in(&self, name: &str, file: &str) -> Result<&Symbol, SymbolError> {
        self.all_named(name)
            .into_iter()
            .find(|s| s.file.as_deref() == Some(file))
            .ok_or_else(|| {
                let all = self.all_named(name);
                if all.is_empty() {
                    SymbolError::NotFound(name.to_owned())
                } else {
                    SymbolError::NotFound(format!(
                        "{name}@{file} (the {} symbols of that name are in: {})",
                        all.len(),
                        all.iter()
                            .map(|s| s.file.as_deref().unwrap_or("global"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            })
    }

    /// Answers a lookup written as a [`Query`].
    pub fn answer(&self, query: &str) -> Result<Answer, SymbolError> {
        let (symbol, offset) = match query.parse::<Query>()? {
            Query::Addr(a) => self.symbolize(a).ok_or(SymbolError::NoSymbolAt(a))?,
            Query::Name {
                name,
                file: Some(file),
                ..
            } => (self.lookup_in(&name, &file)?, 0),
            Query::Name {
                name,
                position: Some(p),
                ..
            } => {
                let all = self.all_named(&name);
                let count = all.len();
                let s = all.into_iter().nth(p).ok_or_else(|| {
                    if count == 0 {
                        SymbolError::NotFound(name.clone())
                    } else {
                        SymbolError::NotFound(format!("{name}#{p} (there are {count})"))
                    }
                })?;
                (s, 0)
            }
            Query::Name { name, .. } => (self.lookup(&name)?, 0),
        };
        Ok(Answer {
            query: query.to_owned(),
            symbol: symbol.clone(),
            offset,
        })
    }

    /// The sized symbol containing `addr`, and the offset into it.
    pub fn symbolize(&self, addr: u64) -> Option<(&Symbol, u64)> {
        let pos = self
            .by_addr
            .partition_point(|&i| self.symbols[i].addr <= addr);
        self.by_addr[..pos]
            .iter()
            .rev()
            .map(|&i| &self.symbols[i])
            .take(8)
            .find(|s| s.contains(addr))
            .map(|s| (s, addr - s.addr))
    }
}

/// `NAME#N` (the N-th symbol called NAME in address order, as `lucos build
/// --diff` names a static that has namesakes) as (NAME, N); `None` for a
/// plain name.
pub fn split_reference(spec: &str) -> Option<(&str, usize)> {
    spec.rsplit_once('#')
        .and_then(|(name, n)| n.parse::<usize>().ok().map(|n| (name, n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_clear_error() {
        let err = SymbolTable::from_elf_bytes(b"not an elf at all", "junk").expect_err("garbage");
        assert!(
            err.to_string().contains("junk is not a usable ELF file"),
            "{err}"
        );
    }

    #[test]
    fn truncated_elf_is_an_error() {
        let me = std::fs::read(std::env::current_exe().expect("test binary")).expect("read");
        assert!(SymbolTable::from_elf_bytes(&me[..200], "cut").is_err());
    }

    #[test]
    fn references_pick_namesakes_by_address_order() {
        // A System.map lists by address; the table keeps its order here,
        // so list the namesakes out of order to show it is by address.
        let map = "ffffffff81003000 t helper\n\
                   ffffffff81001000 t helper\n\
                   ffffffff81002000 T unique\n";
        let t = SymbolTable::from_system_map(map, "map").expect("map");
        assert_eq!(
            t.reference("unique").expect("unique").addr,
            0xffffffff81002000
        );
        assert_eq!(
            t.reference("helper#0").expect("#0").addr,
            0xffffffff81001000
        );
        assert_eq!(
            t.reference("helper#1").expect("#1").addr,
            0xffffffff81003000
        );
        assert!(matches!(
            t.reference("helper"),
            Err(SymbolError::Ambiguous { .. })
        ));
        let e = t.reference("helper#2").expect_err("past the end");
        assert!(e.to_string().contains("2 symbols named helper"), "{e}");
    }

    #[test]
    fn own_binary_symbols_resolve_both_ways() {
        let exe = std::env::current_exe().expect("test binary");
        let table = SymbolTable::from_elf_file(&exe).expect("symbols");
        assert!(!table.is_empty());
        let f = table
            .iter()
            .find(|s| s.kind == SymbolKind::Function && s.size > 16)
            .expect("a sized function");
        let (hit, off) = table.symbolize(f.addr + 3).expect("symbolize");
        assert_eq!(off, 3);
        assert!(hit.contains(f.addr + 3));
        assert!(matches!(
            table.lookup("no_such_symbol_xyz"),
            Err(SymbolError::NotFound(_))
        ));
    }
}
