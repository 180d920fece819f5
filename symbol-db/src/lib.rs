//! Kernel symbols for lucos.
//!
//! This first source is the ELF symbol table of a kernel image (the test
//! kernel, or a Linux `vmlinux`): look a symbol up by name, or find which
//! function or object an address falls in. Duplicate local symbols are
//! normal in a kernel, so every symbol keeps the object file it came from
//! (its `STT_FILE` entry) and its position among same-named symbols.

use std::collections::HashMap;
use std::path::Path;

use goblin::elf::sym::{STB_GLOBAL, STB_LOCAL, STB_WEAK, STT_FILE, STT_FUNC, STT_OBJECT};

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
    /// Several symbols have that name.
    #[error(
        "'{name}' is ambiguous: {count} symbols have that name (in {files}); give the object file"
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SymbolKind {
    /// Code.
    Function,
    /// Data.
    Object,
    /// Anything else (labels from assembly, linker symbols).
    Other,
}

/// One symbol.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Symbol {
    /// Name.
    pub name: String,
    /// Address.
    pub addr: u64,
    /// Size in bytes (0 when unknown).
    pub size: u64,
    /// Function, object or other.
    pub kind: SymbolKind,
    /// Global (or weak) rather than local.
    pub global: bool,
    /// The object file a local symbol came from, from the preceding STT_FILE entry.
    pub file: Option<String>,
    /// Position among the symbols of this name, in symbol-table order (0-based).
    pub position: usize,
}

impl Symbol {
    /// Whether `addr` lies inside this symbol.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr < self.addr + self.size.max(1)
    }
}

/// The symbols of one kernel image.
#[derive(Debug, Default)]
pub struct SymbolTable {
    symbols: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
    /// Indices of sized symbols, sorted by address.
    by_addr: Vec<usize>,
}

impl SymbolTable {
    /// Reads the symbol table of the ELF file at `path`.
    pub fn from_elf_file(path: &Path) -> Result<Self, SymbolError> {
        let data = std::fs::read(path).map_err(|source| SymbolError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_elf_bytes(&data, &path.display().to_string())
    }

    /// Reads the symbol table of an ELF image in memory; `name` is used in errors.
    pub fn from_elf_bytes(data: &[u8], name: &str) -> Result<Self, SymbolError> {
        let bad = |why: String| SymbolError::BadElf {
            path: name.to_owned(),
            why,
        };
        let elf = goblin::elf::Elf::parse(data).map_err(|e| bad(e.to_string()))?;
        if elf.syms.is_empty() {
            return Err(bad("no symbol table (stripped?)".into()));
        }
        let mut table = SymbolTable::default();
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
            let idx = table.symbols.len();
            let same = table.by_name.entry(name.to_owned()).or_default();
            table.symbols.push(Symbol {
                name: name.to_owned(),
                addr: sym.st_value,
                size: sym.st_size,
                kind,
                global,
                file: if bind == STB_LOCAL {
                    file.clone()
                } else {
                    None
                },
                position: same.len(),
            });
            same.push(idx);
        }
        table.by_addr = (0..table.symbols.len())
            .filter(|&i| table.symbols[i].size > 0)
            .collect();
        table.by_addr.sort_by_key(|&i| table.symbols[i].addr);
        Ok(table)
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
                    .map(|s| s.file.as_deref().unwrap_or("global"))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The symbol called `name` from object file `file`.
    pub fn lookup_in(&self, name: &str, file: &str) -> Result<&Symbol, SymbolError> {
        self.all_named(name)
            .into_iter()
            .find(|s| s.file.as_deref() == Some(file))
            .ok_or_else(|| SymbolError::NotFound(format!("{name} in {file}")))
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
