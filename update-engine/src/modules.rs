//! The kernel modules of a running Linux guest, read from outside: the
//! kernel's own `modules` list walked in guest memory, each `struct module`
//! read with the layout the kernel's BTF gives (no agent, no pause).
//!
//! Linux 6.1: `struct module` has `state`, `list`, `name`, `version`,
//! `srcversion`, `core_layout` (`base`, `size`, `text_size`, `ro_size`) and
//! `kallsyms` (a `struct mod_kallsyms`: `symtab`, `num_symtab`, `strtab`,
//! `typetab`), the module's own ELF symbols as it keeps them after loading.

use serde::{Deserialize, Serialize};
use symbol_db::btf::Btf;
use symbol_db::SymbolTable;
use vmm_core::guest::Guest;
use vmm_core::pagewalk::PagingState;

use crate::kernel as introspect;

/// Longest module name (MODULE_NAME_LEN) and list length lucos walks.
const NAME_LEN: usize = 56;
const MAX_MODULES: usize = 4096;
/// Longest symbol table and symbol name read.
const MAX_SYMBOLS: u64 = 1 << 20;
const MAX_STRING: usize = 512;

/// Where a kernel keeps its modules and what a module looks like.
#[derive(Debug, Clone)]
pub struct ModuleLayout {
    /// Address of the `modules` list head.
    head: u64,
    list: u64,
    state: u64,
    name: u64,
    version: u64,
    srcversion: u64,
    base: u64,
    size: u64,
    text_size: u64,
    ro_size: u64,
    kallsyms: u64,
    symtab: u64,
    num_symtab: u64,
    strtab: u64,
    typetab: u64,
    /// Where the module's ELF notes are (its sysfs `notes` directory).
    notes: Option<NotesLayout>,
    /// The paging to read kernel memory through.
    pub paging: PagingState,
}

/// `struct module_notes_attrs` (CONFIG_SYSFS and CONFIG_KALLSYMS): the
/// module's SHF_ALLOC note sections, each a `struct bin_attribute` whose
/// `private` is the loaded section and `size` its length.
#[derive(Debug, Clone, Copy)]
struct NotesLayout {
    /// `module.notes_attrs`.
    attrs_ptr: u64,
    /// `module_notes_attrs.notes` and `.attrs`.
    count: u64,
    array: u64,
    /// `sizeof(struct bin_attribute)`, and its `size` and `private`.
    stride: u64,
    size: u64,
    private: u64,
}

/// One loaded module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// Its name.
    pub name: String,
    /// `live`, `coming` (loading: its init runs), `going` or `unformed`.
    pub state: String,
    /// Address of its `struct module`.
    #[serde(with = "symbol_db::hex_u64")]
    pub addr: u64,
    /// Start of its core memory (text first).
    #[serde(with = "symbol_db::hex_u64")]
    pub base: u64,
    /// Bytes of core memory, of text, of text and read-only data.
    pub size: u64,
    /// Bytes of text.
    pub text_size: u64,
    /// Bytes of text and read-only data.
    pub ro_size: u64,
    /// MODULE_VERSION, if it has one.
    pub version: Option<String>,
    /// The hash of its sources (`srcversion`), if the kernel keeps it.
    pub srcversion: Option<String>,
    /// Symbols in its table.
    pub symbols: u64,
    /// Hex of the GNU build-id note it was loaded with (its identity: the
    /// `.ko` file's), when the kernel keeps its notes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

/// What the `modules` request answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModulesInfo {
    /// The loaded modules, the newest first.
    pub modules: Vec<ModuleInfo>,
    /// The symbols of the module asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbols: Option<Vec<ModuleSymbol>>,
}

/// One symbol of a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSymbol {
    /// Its name.
    pub name: String,
    /// Its address.
    #[serde(with = "symbol_db::hex_u64")]
    pub addr: u64,
    /// Its size.
    pub size: u64,
    /// Its kallsyms type letter (`t`, `T`, `d`...).
    #[serde(rename = "type")]
    pub kind: char,
}

impl ModuleLayout {
    /// The layout of a Linux kernel with BTF; `paging` reads its memory.
    pub fn from_btf(btf: &Btf, symbols: &SymbolTable, paging: PagingState) -> Result<Self, String> {
        let head = symbols
            .all_named("modules")
            .into_iter()
            .find(|s| !matches!(s.kind, symbol_db::SymbolKind::Function))
            .ok_or("the kernel has no `modules` list (no CONFIG_MODULES)")?
            .addr;
        let m = |p: &str| btf.offset_of("module", p).map_err(|e| e.to_string());
        let k = |p: &str| btf.offset_of("mod_kallsyms", p).map_err(|e| e.to_string());
        Ok(Self {
            head,
            list: m("list")?,
            state: m("state")?,
            name: m("name")?,
            version: m("version")?,
            srcversion: m("srcversion")?,
            base: m("core_layout.base")?,
            size: m("core_layout.size")?,
            text_size: m("core_layout.text_size")?,
            ro_size: m("core_layout.ro_size")?,
            kallsyms: m("kallsyms")?,
            symtab: k("symtab")?,
            num_symtab: k("num_symtab")?,
            strtab: k("strtab")?,
            typetab: k("typetab")?,
            notes: (|| -> Result<NotesLayout, symbol_db::SymbolError> {
                Ok(NotesLayout {
                    attrs_ptr: btf.offset_of("module", "notes_attrs")?,
                    count: btf.offset_of("module_notes_attrs", "notes")?,
                    array: btf.offset_of("module_notes_attrs", "attrs")?,
                    stride: btf.struct_layout("bin_attribute")?.size,
                    size: btf.offset_of("bin_attribute", "size")?,
                    private: btf.offset_of("bin_attribute", "private")?,
                })
            })()
            .ok(),
            paging,
        })
    }
}

impl ModuleLayout {
    /// Address of the kernel's `modules` list head (its `next` first): a
    /// module is added at the head.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Address of module `m`'s list node's `prev` (poisoned when the node
    /// leaves the list).
    pub fn list_prev_addr(&self, m: &ModuleInfo) -> u64 {
        m.addr + self.list + 8
    }

    /// Address of module `m`'s `state` (a u32: 0 live, 1 coming, 2 going,
    /// 3 unformed).
    pub fn state_addr(&self, m: &ModuleInfo) -> u64 {
        m.addr + self.state
    }
}

/// Errors reading modules.
#[derive(Debug, thiserror::Error)]
#[error("reading the guest's modules: {0}")]
pub struct ModuleError(String);

struct Reader<'a> {
    vm: &'a dyn Guest,
    paging: PagingState,
}

impl Reader<'_> {
    fn bytes(&self, va: u64, buf: &mut [u8], what: &str) -> Result<(), ModuleError> {
        introspect::read_virt(self.vm, self.paging, va, buf)
            .map_err(|e| ModuleError(format!("{what} at {va:#x}: {e}")))
    }

    fn u64(&self, va: u64, what: &str) -> Result<u64, ModuleError> {
        let mut b = [0u8; 8];
        self.bytes(va, &mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn u32(&self, va: u64, what: &str) -> Result<u32, ModuleError> {
        let mut b = [0u8; 4];
        self.bytes(va, &mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A NUL-terminated string of at most `max` bytes at `va`.
    fn c_str(&self, va: u64, max: usize, what: &str) -> Result<String, ModuleError> {
        let mut out = Vec::new();
        let mut at = va;
        while out.len() < max {
            // Up to the end of the page, so a short string near a page end
            // never touches the next one.
            let n = (4096 - (at & 4095) as usize).min(max - out.len()).min(64);
            let mut b = vec![0u8; n];
            self.bytes(at, &mut b, what)?;
            if let Some(z) = b.iter().position(|&c| c == 0) {
                out.extend_from_slice(&b[..z]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&b);
            at += n as u64;
        }
        Err(ModuleError(format!(
            "{what} at {va:#x}: no end within {max} bytes"
        )))
    }

    fn opt_str(&self, ptr_at: u64, what: &str) -> Result<Option<String>, ModuleError> {
        match self.u64(ptr_at, what)? {
            0 => Ok(None),
            p => self.c_str(p, MAX_STRING, what).map(Some),
        }
    }
}

fn state_name(s: u32) -> String {
    match s {
        0 => "live",
        1 => "coming",
        2 => "going",
        3 => "unformed",
        _ => return format!("state {s}"),
    }
    .to_owned()
}

/// The modules loaded in the guest now, in the kernel's list order (the
/// newest first).
pub fn list(vm: &dyn Guest, l: &ModuleLayout) -> Result<Vec<ModuleInfo>, ModuleError> {
    let r = Reader {
        vm,
        paging: l.paging,
    };
    let mut out = Vec::new();
    let mut node = r.u64(l.head, "the modules list head")?;
    while node != l.head {
        if out.len() >= MAX_MODULES {
            return Err(ModuleError(format!(
                "the modules list has more than {MAX_MODULES} entries (a loop?)"
            )));
        }
        out.push(read_module(&r, l, node.wrapping_sub(l.list))?);
        node = r.u64(node, "the modules list")?;
    }
    Ok(out)
}

/// The module whose `struct module` is at `m`.
fn read_module(r: &Reader<'_>, l: &ModuleLayout, m: u64) -> Result<ModuleInfo, ModuleError> {
    let mut name = [0u8; NAME_LEN];
    r.bytes(m + l.name, &mut name, "a module's name")?;
    let end = name.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
    let kallsyms = r.u64(m + l.kallsyms, "a module's kallsyms")?;
    let symbols = match kallsyms {
        0 => 0,
        k => r.u32(k + l.num_symtab, "a module's symbol count")?.into(),
    };
    Ok(ModuleInfo {
        name: String::from_utf8_lossy(&name[..end]).into_owned(),
        state: state_name(r.u32(m + l.state, "a module's state")?),
        addr: m,
        base: r.u64(m + l.base, "a module's base")?,
        size: r.u32(m + l.size, "a module's size")?.into(),
        text_size: r.u32(m + l.text_size, "a module's text size")?.into(),
        ro_size: r.u32(m + l.ro_size, "a module's read-only size")?.into(),
        // Best-effort: a string of a module being freed may be gone already.
        version: r
            .opt_str(m + l.version, "a module's version")
            .ok()
            .flatten(),
        srcversion: r
            .opt_str(m + l.srcversion, "a module's srcversion")
            .ok()
            .flatten(),
        symbols,
        build_id: l.notes.and_then(|n| build_id(r, m, n)),
    })
}

/// The module a node of the kernel's modules list belongs to, as it is now
/// (a module being loaded is in the list from its `unformed` state on);
/// none for the list head itself.
pub fn module_at_node(
    vm: &dyn Guest,
    l: &ModuleLayout,
    node: u64,
) -> Result<Option<ModuleInfo>, ModuleError> {
    if node == l.head {
        return Ok(None);
    }
    let r = Reader {
        vm,
        paging: l.paging,
    };
    read_module(&r, l, node.wrapping_sub(l.list)).map(Some)
}

/// The GNU build-id note in module `m`'s read-only core memory (where the
/// loader puts its SHF_ALLOC notes), for a module whose notes the kernel
/// does not list yet (its sysfs entries come after it is `coming`).
pub fn scan_build_id(vm: &dyn Guest, l: &ModuleLayout, m: &ModuleInfo) -> Option<String> {
    let r = Reader {
        vm,
        paging: l.paging,
    };
    let len = m.ro_size.min(64 << 20);
    let mut ro = vec![0u8; len as usize];
    r.bytes(m.base, &mut ro, "a module's read-only memory")
        .ok()?;
    // A note: namesz 4, descsz (1..=64), type NT_GNU_BUILD_ID (3), "GNU\0".
    (0..ro.len().saturating_sub(16)).step_by(4).find_map(|i| {
        let word = |at: usize| u32::from_le_bytes(ro[at..at + 4].try_into().unwrap_or_default());
        let desc = word(i + 4) as usize;
        if word(i) != 4 || word(i + 8) != 3 || &ro[i + 12..i + 16] != b"GNU\0" {
            return None;
        }
        if desc == 0 || desc > 64 || i + 16 + desc > ro.len() {
            return None;
        }
        let end = (i + 16 + desc.div_ceil(4) * 4).min(ro.len());
        symbol_db::identity::build_id_from_notes(&ro[i..end])
    })
}

/// The build-id among the loaded note sections of the module at `m`
/// (none while it has no notes: a module being loaded or unloaded).
fn build_id(r: &Reader<'_>, m: u64, n: NotesLayout) -> Option<String> {
    let attrs = r.u64(m + n.attrs_ptr, "a module's notes").ok()?;
    if attrs == 0 {
        return None;
    }
    let count = r.u32(attrs + n.count, "a module's note count").ok()?;
    for i in 0..u64::from(count.min(64)) {
        let a = attrs + n.array + i * n.stride;
        let size = r.u64(a + n.size, "a note's size").ok()?;
        let at = r.u64(a + n.private, "a note's address").ok()?;
        if size == 0 || size > 4096 || at == 0 {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        r.bytes(at, &mut notes, "a module's notes").ok()?;
        if let Some(id) = symbol_db::identity::build_id_from_notes(&notes) {
            return Some(id);
        }
    }
    None
}

/// The live module named `name`, or why there is none.
pub fn find(vm: &dyn Guest, l: &ModuleLayout, name: &str) -> Result<ModuleInfo, ModuleError> {
    let all = list(vm, l)?;
    all.into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| ModuleError(format!("module {name} is not loaded in the guest")))
}

/// The symbols of module `m` (from its own symbol table as the kernel keeps
/// it), without the empty and section entries.
pub fn symbols(
    vm: &dyn Guest,
    l: &ModuleLayout,
    m: &ModuleInfo,
) -> Result<Vec<ModuleSymbol>, ModuleError> {
    let r = Reader {
        vm,
        paging: l.paging,
    };
    let k = r.u64(m.addr + l.kallsyms, "a module's kallsyms")?;
    if k == 0 {
        return Ok(Vec::new());
    }
    let symtab = r.u64(k + l.symtab, "a module's symbol table")?;
    let n = u64::from(r.u32(k + l.num_symtab, "a module's symbol count")?);
    let strtab = r.u64(k + l.strtab, "a module's string table")?;
    let typetab = r.u64(k + l.typetab, "a module's type table")?;
    if n > MAX_SYMBOLS {
        return Err(ModuleError(format!("module {} claims {n} symbols", m.name)));
    }
    let mut table = vec![0u8; (n * 24) as usize];
    r.bytes(symtab, &mut table, "a module's symbol table")?;
    let mut types = vec![0u8; n as usize];
    if typetab != 0 {
        r.bytes(typetab, &mut types, "a module's type table")?;
    }
    let mut out = Vec::new();
    for (i, e) in table.chunks_exact(24).enumerate() {
        let st_name = u32::from_le_bytes(e[0..4].try_into().unwrap_or_default());
        let info = e[4];
        let value = u64::from_le_bytes(e[8..16].try_into().unwrap_or_default());
        let size = u64::from_le_bytes(e[16..24].try_into().unwrap_or_default());
        // STT_SECTION (3) and STT_FILE (4) entries, and nameless ones, are
        // not symbols one looks up.
        if st_name == 0 || matches!(info & 0xf, 3 | 4) || value == 0 {
            continue;
        }
        let name = r.c_str(strtab + u64::from(st_name), MAX_STRING, "a symbol name")?;
        let kind = match types[i] {
            0 => '?',
            t => char::from(t),
        };
        out.push(ModuleSymbol {
            name,
            addr: value,
            size,
            kind,
        });
    }
    // As /proc/kallsyms shows them: an exported symbol (one the module's
    // `__ksymtab_NAME` entry exports) in upper case, others in lower case.
    let exported: std::collections::HashSet<String> = out
        .iter()
        .filter_map(|s| s.name.strip_prefix("__ksymtab_").map(str::to_owned))
        .collect();
    for s in &mut out {
        s.kind = if exported.contains(&s.name) {
            s.kind.to_ascii_uppercase()
        } else {
            s.kind.to_ascii_lowercase()
        };
    }
    Ok(out)
}

/// The one symbol named `name` among a module's `symbols`, or why not.
pub fn symbol_named<'s>(
    symbols: &'s [ModuleSymbol],
    module: &str,
    name: &str,
) -> Result<&'s ModuleSymbol, String> {
    let mut all = symbols.iter().filter(|s| s.name == name);
    match (all.next(), all.next()) {
        (Some(s), None) => Ok(s),
        (None, _) => Err(format!("module {module} has no symbol {name}")),
        (Some(_), Some(_)) => Err(format!(
            "module {module} has more than one symbol named {name}"
        )),
    }
}
