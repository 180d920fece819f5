//! Where a running kernel's code differs from its image file, by design.
//!
//! Linux rewrites parts of its own text after the image was built: at boot
//! (KASLR relocation of absolute addresses; ftrace turning `call
//! __fentry__` into a 5-byte nop; alternatives, retpoline and return-thunk
//! sites chosen for the CPU; `lock` prefixes dropped on one CPU; paravirt
//! sites) and at run time (jump labels, static calls). A live patch checks
//! the old function's bytes in guest memory against the file the patch was
//! built from, so it must know these places:
//!
//! - **masked** ranges are compared as zeros on both sides; they are the
//!   sites the kernel's own tables (`__mcount_loc`, `.altinstructions`,
//!   `.retpoline_sites`, `.return_sites`, `.smp_locks`, `.parainstructions`,
//!   `__jump_table`, `.static_call_sites`, `.ibt_endbr_seal`) list;
//! - **relocations** are the absolute addresses KASLR moved: the checker
//!   subtracts the slide again and compares exactly. They come from the
//!   relocation table a bzImage's payload carries after the ELF image
//!   (`vmlinux.relocs`, which the decompressor applies).
//!
//! Everything is given as link-time (file) addresses.

use goblin::elf::Elf;

use crate::SymbolError;

/// An absolute address in kernel code that KASLR relocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelocKind {
    /// 32-bit sign-extended address: the u32 there grows by the slide.
    Abs32,
    /// 32-bit inverse (per-CPU offsets): the u32 there shrinks by the slide.
    Inverse32,
    /// 64-bit address: the u64 there grows by the slide.
    Abs64,
}

/// The places of one kernel image whose running bytes legitimately differ
/// from the file.
#[derive(Debug, Clone, Default)]
pub struct CodeFixups {
    /// (address, length), sorted by address.
    pub masked: Vec<(u64, u64)>,
    /// (address, kind), sorted by address.
    pub relocs: Vec<(u64, RelocKind)>,
    /// Where each kind of site came from, for reports: (table, count).
    pub tables: Vec<(String, usize)>,
}

/// Sign-extends the low 32 bits a relocation table stores into a kernel
/// address.
fn kernel_addr(low: u32) -> u64 {
    i64::from(low as i32) as u64
}

impl CodeFixups {
    /// Reads the tables of an ELF kernel image (the test kernel, a vmlinux,
    /// or the payload of a bzImage with its relocation table after it). A
    /// table is found as its own section or, where the linker script merges
    /// it into another (`__mcount_loc` into `.init.data`, `__jump_table`
    /// into `.data`), between its start and stop symbols in `symbols`.
    /// `image` is `data`'s [`crate::KernelImage`].
    pub fn from_elf_bytes(
        data: &[u8],
        name: &str,
        image: &crate::KernelImage,
        symbols: &crate::SymbolTable,
    ) -> Result<Self, SymbolError> {
        let bad = |why: String| SymbolError::BadElf {
            path: name.to_owned(),
            why,
        };
        let elf = crate::parse_elf(data, name)?;
        // (link address, bytes) of a table.
        let table = |section: &str, start: &str, stop: &str| -> Option<(u64, Vec<u8>)> {
            if let Some((sh, bytes)) = elf.section_headers.iter().find_map(|sh| {
                (elf.shdr_strtab.get_at(sh.sh_name) == Some(section))
                    .then(|| crate::section_data(data, sh).map(|b| (sh, b)))
                    .flatten()
            }) {
                return Some((sh.sh_addr, bytes.to_vec()));
            }
            let a = symbols.lookup(start).ok()?.addr;
            let b = symbols.lookup(stop).ok()?.addr;
            if b <= a || b - a > 64 << 20 {
                return None;
            }
            image.read(a, (b - a) as usize).map(|v| (a, v.to_vec()))
        };
        // A relative call/jmp is 5 bytes, a conditional jump 6.
        let branch_len = |addr: u64| -> u64 {
            match image.read(addr, 1) {
                Some([0x0f]) => 6,
                _ => 5,
            }
        };
        let rel32 = |base: u64, entry: usize, stride: usize, e: &[u8]| -> u64 {
            let rel = i32::from_le_bytes(e[0..4].try_into().expect("4 bytes"));
            (base + (entry * stride) as u64).wrapping_add(i64::from(rel) as u64)
        };
        let mut fx = CodeFixups::default();
        // Tables of 32-bit offsets relative to each entry.
        for (sec, start, stop, fixed) in [
            (
                ".retpoline_sites",
                "__retpoline_sites",
                "__retpoline_sites_end",
                None,
            ),
            (
                ".return_sites",
                "__return_sites",
                "__return_sites_end",
                None,
            ),
            (".smp_locks", "__smp_locks", "__smp_locks_end", Some(1)),
            (
                ".ibt_endbr_seal",
                "__ibt_endbr_seal",
                "__ibt_endbr_seal_end",
                Some(4),
            ),
        ] {
            let Some((base, bytes)) = table(sec, start, stop) else {
                continue;
            };
            let n = bytes.len() / 4;
            for (i, e) in bytes.chunks_exact(4).enumerate() {
                let at = rel32(base, i, 4, e);
                fx.masked
                    .push((at, fixed.unwrap_or_else(|| branch_len(at))));
            }
            fx.tables.push((sec.into(), n));
        }
        // __mcount_loc: absolute addresses of the 5-byte fentry calls.
        if let Some((_, bytes)) = table("__mcount_loc", "__start_mcount_loc", "__stop_mcount_loc") {
            let v: Vec<u64> = bytes
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .filter(|&a| a != 0)
                .collect();
            fx.tables.push(("__mcount_loc".into(), v.len()));
            fx.masked.extend(v.into_iter().map(|a| (a, 5)));
        }
        // struct alt_instr (Linux 5.x-6.2): s32 instr, s32 repl, u16 cpuid,
        // u8 instrlen, u8 replacementlen.
        if let Some((base, bytes)) = table(
            ".altinstructions",
            "__alt_instructions",
            "__alt_instructions_end",
        ) {
            for (i, e) in bytes.chunks_exact(12).enumerate() {
                fx.masked.push((rel32(base, i, 12, e), u64::from(e[10])));
            }
            fx.tables
                .push((".altinstructions".into(), bytes.len() / 12));
        }
        // struct paravirt_patch_site: u8 *instr, u8 type, u8 len (16 bytes).
        if let Some((_, bytes)) = table(
            ".parainstructions",
            "__parainstructions",
            "__parainstructions_end",
        ) {
            for e in bytes.chunks_exact(16) {
                let at = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
                fx.masked.push((at, u64::from(e[9])));
            }
            fx.tables
                .push((".parainstructions".into(), bytes.len() / 16));
        }
        // struct jump_entry: s32 code, s32 target, long key (16 bytes);
        // struct static_call_site: s32 addr, s32 key (8 bytes).
        for (sec, start, stop, size) in [
            (
                "__jump_table",
                "__start___jump_table",
                "__stop___jump_table",
                16,
            ),
            (
                ".static_call_sites",
                "__start_static_call_sites",
                "__stop_static_call_sites",
                8,
            ),
        ] {
            let Some((base, bytes)) = table(sec, start, stop) else {
                continue;
            };
            for (i, e) in bytes.chunks_exact(size).enumerate() {
                fx.masked.push((rel32(base, i, size, e), 5));
            }
            fx.tables.push((sec.into(), bytes.len() / size));
        }
        // Every masked site must lie in the image: a table whose layout is
        // not the one assumed above would point anywhere.
        if let Some(&(at, _)) = fx
            .masked
            .iter()
            .find(|(a, l)| image.read(*a, *l as usize).is_none())
        {
            return Err(bad(format!(
                "a code-patching table points outside the kernel image ({at:#x}): \
                 its layout is not the one this lucos knows"
            )));
        }
        fx.relocs = appended_relocs(data, &elf, image).map_err(bad)?;
        if !fx.relocs.is_empty() {
            fx.tables.push(("vmlinux.relocs".into(), fx.relocs.len()));
        }
        fx.masked.sort_unstable();
        fx.masked.dedup();
        fx.relocs.sort_unstable_by_key(|r| r.0);
        Ok(fx)
    }

    /// The masked ranges and relocations inside `[addr, addr + len)`, as
    /// offsets from `addr` (masked ranges clipped to the function).
    pub fn within(&self, addr: u64, len: u64) -> FunctionFixups {
        let end = addr + len;
        let masked = self
            .masked
            .iter()
            .filter(|&&(a, l)| a < end && a + l > addr)
            .map(|&(a, l)| {
                let s = a.max(addr);
                let e = (a + l).min(end);
                ((s - addr) as u32, (e - s) as u32)
            })
            .collect();
        let relocs = self
            .relocs
            .iter()
            .filter(|&&(a, k)| a >= addr && a + reloc_len(k) <= end)
            .map(|&(a, k)| ((a - addr) as u32, k))
            .collect();
        (masked, relocs)
    }
}

/// Masked ranges (offset, length) and relocations (offset, kind) of one
/// function, relative to its entry.
pub type FunctionFixups = (Vec<(u32, u32)>, Vec<(u32, RelocKind)>);

/// Bytes a relocation of `kind` covers.
pub fn reloc_len(kind: RelocKind) -> u64 {
    match kind {
        RelocKind::Abs64 => 8,
        _ => 4,
    }
}

/// The relocation table a bzImage payload carries right after the ELF
/// image (arch/x86/tools/relocs): u32 entries `0, 64-bit..., 0, inverse
/// 32-bit..., 0, 32-bit...`, each the low 32 bits of a link-time address.
/// Empty when the file ends with the ELF image.
fn appended_relocs(
    data: &[u8],
    elf: &Elf<'_>,
    image: &crate::KernelImage,
) -> Result<Vec<(u64, RelocKind)>, String> {
    let h = &elf.header;
    let shend = h.e_shoff + u64::from(h.e_shnum) * u64::from(h.e_shentsize);
    let phend = h.e_phoff + u64::from(h.e_phnum) * u64::from(h.e_phentsize);
    let sections_end = elf
        .section_headers
        .iter()
        .filter(|sh| sh.sh_type != goblin::elf::section_header::SHT_NOBITS)
        .map(|sh| sh.sh_offset + sh.sh_size)
        .max()
        .unwrap_or(0);
    let end = shend.max(phend).max(sections_end) as usize;
    let Some(tail) = data.get(end..) else {
        return Ok(Vec::new());
    };
    if tail.is_empty() {
        return Ok(Vec::new());
    }
    let bad = |why: &str| format!("the data after the ELF image is not a relocation table: {why}");
    if tail.len() % 4 != 0 {
        return Err(bad("its length is not a multiple of 4"));
    }
    let words: Vec<u32> = tail
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
        .collect();
    if words.first() != Some(&0) {
        return Err(bad("it does not start with a stop entry"));
    }
    let mut relocs = Vec::with_capacity(words.len());
    let mut kind = 0;
    for &w in &words[1..] {
        if w == 0 {
            kind += 1;
            if kind > 2 {
                return Err(bad("more than three lists"));
            }
            continue;
        }
        let k = [RelocKind::Abs64, RelocKind::Inverse32, RelocKind::Abs32][kind];
        relocs.push((kernel_addr(w), k));
    }
    if kind != 2 {
        return Err(bad("fewer than three lists"));
    }
    // Sites in the per-CPU section have small link addresses (it is linked
    // at 0) and are not code; the rest must lie in the image, or the data
    // is something else.
    let total = relocs.len();
    relocs.retain(|(a, k)| image.read(*a, reloc_len(*k) as usize).is_some());
    if relocs.len() < total * 9 / 10 {
        return Err(bad(&format!(
            "only {} of its {total} entries lie in the kernel image",
            relocs.len()
        )));
    }
    Ok(relocs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_clips_masks_and_keeps_whole_relocations() {
        let fx = CodeFixups {
            masked: vec![(0x0ff0, 0x20), (0x1010, 5), (0x2000, 5)],
            relocs: vec![(0x1004, RelocKind::Abs32), (0x101e, RelocKind::Abs64)],
            tables: vec![],
        };
        let (m, r) = fx.within(0x1000, 0x20);
        assert_eq!(m, vec![(0, 0x10), (0x10, 5)]);
        assert_eq!(r, vec![(4, RelocKind::Abs32)]);
    }

    #[test]
    fn relocation_addresses_are_sign_extended() {
        assert_eq!(kernel_addr(0x8100_0456), 0xffff_ffff_8100_0456);
    }
}
