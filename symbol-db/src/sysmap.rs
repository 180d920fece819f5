//! `System.map`: `nm -n` output of vmlinux, one `ADDRESS TYPE NAME` per line.

use crate::{Symbol, SymbolError, SymbolTable};

pub(crate) fn parse(text: &str, path: &str) -> Result<SymbolTable, SymbolError> {
    let mut symbols = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || SymbolError::BadMap {
            path: path.to_owned(),
            line: i + 1,
            text: line.chars().take(80).collect(),
        };
        let mut f = line.split_whitespace();
        let (Some(addr), Some(ty), Some(name)) = (f.next(), f.next(), f.next()) else {
            return Err(bad());
        };
        let addr = u64::from_str_radix(addr, 16).map_err(|_| bad())?;
        let mut ty_chars = ty.chars();
        let (Some(ty), None) = (ty_chars.next(), ty_chars.next()) else {
            return Err(bad());
        };
        if !ty.is_ascii_alphabetic() {
            return Err(bad());
        }
        symbols.push(Symbol::from_type_letter(name.to_owned(), addr, ty));
    }
    if symbols.is_empty() {
        return Err(SymbolError::BadMap {
            path: path.to_owned(),
            line: 0,
            text: "no symbols".into(),
        });
    }
    // Debian's placeholder: one line telling where the real map is.
    if symbols.len() == 1 {
        return Err(SymbolError::BadMap {
            path: path.to_owned(),
            line: 1,
            text: format!("{} (a placeholder, not a real System.map)", symbols[0].name),
        });
    }
    crate::sizes_to_next_address(&mut symbols);
    Ok(SymbolTable::from_symbols(symbols).with_estimated_sizes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sizes() {
        let t = parse(
            "ffffffff81000000 T _text\nffffffff81000010 t foo\nffffffff81000010 t foo\nffffffff81000040 T bar\n",
            "m",
        )
        .expect("map");
        assert_eq!(t.len(), 4);
        assert_eq!(t.all_named("foo").len(), 2);
        assert_eq!(t.lookup("_text").expect("_text").size, 0x10);
        let (s, off) = t.symbolize(0xffffffff81000012).expect("in foo");
        assert_eq!((s.name.as_str(), off), ("foo", 2));
    }

    #[test]
    fn rejects_garbage_with_the_line() {
        let e = parse("ffffffff81000000 T _text\nhello\n", "x.map").expect_err("bad");
        assert!(e.to_string().contains("x.map:2"), "{e}");
        let e = parse("ffffffffffffffff B The real System.map is elsewhere", "d").expect_err("one");
        assert!(e.to_string().contains("placeholder"), "{e}");
    }
}
