//! kallsyms decoded from a kernel image: the compressed symbol tables Linux
//! links into its own `.rodata` (scripts/kallsyms.c), found by their shape
//! rather than by symbol, so this works on a stripped image and on the bytes
//! of a running guest.
//!
//! The tables: `kallsyms_offsets` (one `i32` per symbol),
//! `kallsyms_relative_base`, `kallsyms_num_syms`, `kallsyms_names` (per
//! symbol a length, then token indices; the first expanded character is the
//! nm type letter), `kallsyms_markers` (offset into names of every 256th
//! symbol), `kallsyms_token_table` (256 NUL-terminated strings) and
//! `kallsyms_token_index` (`u16` offsets of those strings). Kernels since 6.1
//! write lengths over 127 in two bytes; newer ones add
//! `kallsyms_seqs_of_names` between markers and the token table. The search
//! does not depend on which tables sit next to which, except offsets,
//! relative base, count and names, which every version since 4.6 emits in
//! that order.

use crate::{KernelImage, Symbol, SymbolError, SymbolTable};

/// Where the tables were found, as virtual addresses of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KallsymsLayout {
    /// `kallsyms_offsets`.
    pub offsets: u64,
    /// `kallsyms_relative_base`.
    pub relative_base_at: u64,
    /// The value of `kallsyms_relative_base` (relocated, in a running guest).
    pub relative_base: u64,
    /// `kallsyms_num_syms` and its value.
    pub num_syms_at: u64,
    /// Number of symbols.
    pub num_syms: u32,
    /// `kallsyms_names`.
    pub names: u64,
    /// `kallsyms_markers`.
    pub markers: u64,
    /// `kallsyms_token_table`.
    pub token_table: u64,
    /// `kallsyms_token_index`.
    pub token_index: u64,
    /// Percpu symbols are absolute (CONFIG_KALLSYMS_ABSOLUTE_PERCPU).
    pub absolute_percpu: bool,
}

/// Decoded kallsyms: the symbols in table order (sorted by address) and where
/// the tables were.
#[derive(Debug)]
pub struct Kallsyms {
    /// The symbols.
    pub table: SymbolTable,
    /// Where the tables were.
    pub layout: KallsymsLayout,
}

fn not_found(why: &str) -> SymbolError {
    SymbolError::NoKallsyms(why.to_owned())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn align8(x: usize) -> usize {
    (x + 7) & !7
}

/// The token table: 256 strings, validated against the index after it.
struct Tokens {
    table: usize,
    index: usize,
    strings: Vec<Vec<u8>>,
}

/// Finds the token table. Single characters that occur in symbol names stay
/// tokens of their own value, so the digits are tokens 0x30..0x39 in a row:
/// "0\01\0...9\0". From there, 48 strings back is the table's start; 256
/// strings on, aligned, is an index that must agree with every string.
fn find_tokens(b: &[u8]) -> Option<Tokens> {
    const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
    let mut from = 0;
    while let Some(hit) = memchr::memmem::find(&b[from..], DIGITS) {
        let at = from + hit;
        from = at + 1;
        if let Some(t) = tokens_at(b, at) {
            return Some(t);
        }
    }
    None
}

fn tokens_at(b: &[u8], zero_token: usize) -> Option<Tokens> {
    // Walk back over tokens 0x2f..0x00: each ends with a NUL just before the
    // next one and is not empty.
    let mut cur = zero_token;
    for _ in 0..0x30 {
        if cur < 2 || b[cur - 1] != 0 || b[cur - 2] == 0 {
            return None;
        }
        let mut j = cur - 2;
        while j > 0 && b[j - 1] != 0 {
            j -= 1;
        }
        cur = j;
    }
    let table = cur;
    let mut strings = Vec::with_capacity(256);
    let mut offsets = Vec::with_capacity(256);
    let mut p = table;
    for _ in 0..256 {
        let len = memchr::memchr(0, b.get(p..)?)?;
        if len == 0 {
            return None;
        }
        offsets.push(p - table);
        strings.push(b[p..p + len].to_vec());
        p += len + 1;
    }
    let index = align8(p);
    for (i, &off) in offsets.iter().enumerate() {
        if u16_at(b, index + 2 * i)? as usize != off {
            return None;
        }
    }
    Some(Tokens {
        table,
        index,
        strings,
    })
}

/// Candidate marker arrays: 0, then entries growing by a plausible amount
/// for 256 compressed names, ending before the token table.
fn find_markers(b: &[u8], before: usize) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut i = 0;
    while i + 8 <= before {
        if u32_at(b, i) == Some(0) {
            let mut j = i + 4;
            let mut prev = 0u32;
            while j + 4 <= before {
                let v = u32_at(b, j).unwrap_or(0);
                let d = v.wrapping_sub(prev);
                if v <= prev || !(256..=256 * 512).contains(&d) {
                    break;
                }
                prev = v;
                j += 4;
            }
            let count = (j - i) / 4;
            if count >= 2 {
                found.push((i, count));
                i = j;
                continue;
            }
        }
        i += 4;
    }
    found
}

/// Length in bytes of `count` compressed names starting at `at`, or None if
/// they run past `end`.
fn names_len(b: &[u8], at: usize, count: usize, end: usize) -> Option<usize> {
    let mut q = at;
    for _ in 0..count {
        let mut len = *b.get(q)? as usize;
        q += 1;
        if len & 0x80 != 0 {
            len = (len & 0x7f) | ((*b.get(q)? as usize) << 7);
            q += 1;
        }
        if len == 0 {
            return None;
        }
        q += len;
        if q > end {
            return None;
        }
    }
    Some(q - at)
}

/// Decodes the kallsyms tables of `image`.
pub fn decode(image: &KernelImage) -> Result<Kallsyms, SymbolError> {
    let b = image.bytes();
    let tokens = find_tokens(b).ok_or_else(|| not_found("no kallsyms token table"))?;
    let markers = find_markers(b, tokens.table);
    // The markers array nearest the token table whose names check out.
    for &(markers_at, mcount) in markers.iter().rev() {
        let m: Vec<usize> = (0..mcount)
            .map(|k| u32_at(b, markers_at + 4 * k).unwrap_or(0) as usize)
            .collect();
        // kallsyms_num_syms: N with ceil(N / 256) == markers, 8-aligned, then
        // names right after whose every 256th entry lands on its marker.
        let mut p = markers_at.saturating_sub(8) & !7;
        loop {
            let n = u32_at(b, p).unwrap_or(0) as usize;
            if n > 0 && n.div_ceil(256) == mcount {
                let names = p + 8;
                let first = names_len(b, names, 256.min(n), markers_at);
                if mcount == 1 || first == Some(m[1]) {
                    if let Some(total) = names_len(b, names, n, markers_at) {
                        let ok = m
                            .iter()
                            .enumerate()
                            .all(|(k, &off)| names_len(b, names, 256 * k, markers_at) == Some(off));
                        if ok && names + total <= markers_at {
                            return finish(image, &tokens, p, n, names, markers_at);
                        }
                    }
                }
            }
            if p < 8 {
                break;
            }
            p -= 8;
        }
    }
    Err(not_found(
        "found a token table but no names/markers that decode against it",
    ))
}

fn finish(
    image: &KernelImage,
    tokens: &Tokens,
    num_syms_at: usize,
    n: usize,
    names: usize,
    markers: usize,
) -> Result<Kallsyms, SymbolError> {
    let b = image.bytes();
    let base_at = num_syms_at
        .checked_sub(8)
        .ok_or_else(|| not_found("no room for kallsyms_relative_base"))?;
    let relative_base =
        u64_at(b, base_at).ok_or_else(|| not_found("kallsyms_relative_base unreadable"))?;
    let offsets_at = base_at
        .checked_sub(align8(4 * n))
        .ok_or_else(|| not_found("no room for kallsyms_offsets"))?;
    let raw: Vec<i32> = (0..n)
        .map(|i| u32_at(b, offsets_at + 4 * i).unwrap_or(0) as i32)
        .collect();
    // With absolute percpu, negative entries are relative (base - 1 - off)
    // and non-negative ones absolute; without it all are base + off.
    let negatives = raw.iter().filter(|&&o| o < 0).count();
    let absolute_percpu = negatives > n / 2;
    let addr_of = |o: i32| -> u64 {
        if absolute_percpu {
            if o >= 0 {
                o as u64
            } else {
                relative_base.wrapping_sub(1).wrapping_sub(o as i64 as u64)
            }
        } else {
            relative_base.wrapping_add(o as u32 as u64)
        }
    };
    let mut symbols = Vec::with_capacity(n);
    let mut q = names;
    let mut expanded = Vec::with_capacity(128);
    for &o in &raw {
        let mut len = b[q] as usize;
        q += 1;
        if len & 0x80 != 0 {
            len = (len & 0x7f) | ((b[q] as usize) << 7);
            q += 1;
        }
        expanded.clear();
        for &t in &b[q..q + len] {
            expanded.extend_from_slice(&tokens.strings[t as usize]);
        }
        q += len;
        let (&ty, name) = expanded
            .split_first()
            .ok_or_else(|| not_found("empty kallsyms name"))?;
        symbols.push(Symbol::from_type_letter(
            String::from_utf8_lossy(name).into_owned(),
            addr_of(o),
            ty as char,
        ));
    }
    crate::sizes_to_next_address(&mut symbols);
    let va = |off: usize| image.base() + off as u64;
    Ok(Kallsyms {
        table: SymbolTable::from_symbols(symbols).with_estimated_sizes(),
        layout: KallsymsLayout {
            offsets: va(offsets_at),
            relative_base_at: va(base_at),
            relative_base,
            num_syms_at: va(num_syms_at),
            num_syms: n as u32,
            names: va(names),
            markers: va(markers),
            token_table: va(tokens.table),
            token_index: va(tokens.index),
            absolute_percpu,
        },
    })
}
