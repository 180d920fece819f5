//! Which exact kernel build this is: the GNU build-id note the linker wrote
//! and the version banner, read from an ELF file or from the kernel's own
//! bytes, so that a symbol source for another build is refused.

use crate::{KernelImage, SymbolError, SymbolTable};

/// Symbols holding the version banner: Linux's, and the test kernel's.
const BANNER_SYMBOLS: &[&str] = &["linux_banner", "tk_banner"];

/// The identity of one kernel build.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelIdentity {
    /// The GNU build-id, hex.
    pub build_id: Option<String>,
    /// The version banner (`Linux version 6.1.0-... #1 SMP ...`), without the newline.
    pub version: Option<String>,
}

impl KernelIdentity {
    /// Reads the identity of the running kernel (or an image of it) through
    /// its symbols: the notes between `__start_notes` and `__stop_notes`, and
    /// the banner string.
    pub fn from_image(image: &KernelImage, symbols: &SymbolTable) -> Self {
        let one = |name: &str| symbols.all_named(name).first().map(|s| s.addr);
        let build_id = match (one("__start_notes"), one("__stop_notes")) {
            (Some(a), Some(b)) if b > a && b - a < 1 << 16 => image
                .read(a, (b - a) as usize)
                .and_then(build_id_from_notes),
            _ => None,
        };
        let version = BANNER_SYMBOLS.iter().find_map(|n| {
            one(n)
                .and_then(|a| image.c_str(a))
                .map(|s| s.trim_end().to_owned())
        });
        KernelIdentity { build_id, version }
    }

    /// The identity recorded in an ELF file: its build-id note, and the
    /// banner when the file has a symbol table (or kallsyms) to find it by.
    pub fn from_elf(data: &[u8], name: &str) -> Result<Self, SymbolError> {
        let elf = crate::parse_elf(data, name)?;
        // Note sections first (what the linker wrote), then note segments.
        let sections = elf
            .section_headers
            .iter()
            .filter(|sh| sh.sh_type == goblin::elf::section_header::SHT_NOTE)
            .map(|sh| (sh.sh_offset, sh.sh_size));
        let segments = elf
            .program_headers
            .iter()
            .filter(|ph| ph.p_type == goblin::elf::program_header::PT_NOTE)
            .map(|ph| (ph.p_offset, ph.p_filesz));
        let build_id = sections.chain(segments).find_map(|(off, len)| {
            data.get(off as usize..off.checked_add(len)? as usize)
                .and_then(build_id_from_notes)
        });
        let version = KernelImage::from_elf_bytes(data, name)
            .ok()
            .and_then(|image| {
                let symbols = SymbolTable::from_elf_bytes(data, name)
                    .or_else(|_| crate::kallsyms::decode(&image).map(|k| k.table))
                    .ok()?;
                KernelIdentity::from_image(&image, &symbols).version
            });
        Ok(KernelIdentity { build_id, version })
    }

    /// Refuses `other` (a file-based source called `source_name`) unless it
    /// describes the same build as `self` (the running kernel): build-ids
    /// must be equal where both are known, banners likewise; something must
    /// have been compared.
    pub fn check_same(&self, other: &KernelIdentity, source_name: &str) -> Result<(), SymbolError> {
        let mismatch = |why: String| SymbolError::Mismatch {
            source_name: source_name.to_owned(),
            why,
        };
        let mut compared = false;
        if let (Some(a), Some(b)) = (&self.build_id, &other.build_id) {
            if a != b {
                return Err(mismatch(format!("build-id {b}, running kernel {a}")));
            }
            compared = true;
        }
        if let (Some(a), Some(b)) = (&self.version, &other.version) {
            if a != b {
                return Err(mismatch(format!("version '{b}', running kernel '{a}'")));
            }
            compared = true;
        }
        if compared {
            Ok(())
        } else {
            Err(mismatch(
                "it carries neither a build-id nor a version banner to check".into(),
            ))
        }
    }
}

/// The GNU build-id (hex) in a run of ELF notes.
pub fn build_id_from_notes(notes: &[u8]) -> Option<String> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(notes.get(at..at + 4)?.try_into().ok()?))
    };
    let align4 = |x: usize| (x + 3) & !3;
    let mut at = 0;
    while at + 12 <= notes.len() {
        let namesz = word(at)? as usize;
        let descsz = word(at + 4)? as usize;
        let ty = word(at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at + align4(namesz);
        let next = desc_at + align4(descsz);
        if next > notes.len() {
            return None;
        }
        if ty == NT_GNU_BUILD_ID && notes.get(name_at..name_at + namesz) == Some(b"GNU\0") {
            let desc = &notes[desc_at..desc_at + descsz];
            return Some(desc.iter().map(|b| format!("{b:02x}")).collect());
        }
        at = next;
    }
    None
}
