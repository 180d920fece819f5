//! Struct layouts from BTF, the compact type format Linux keeps in its own
//! image (`.BTF`, between `__start_BTF` and `__stop_BTF`, with
//! CONFIG_DEBUG_INFO_BTF): distribution kernels that ship without DWARF
//! still carry it, and it is in guest memory whenever the kernel runs.
//!
//! Only what layouts need is kept: structs and unions with their members,
//! and enough of every other kind to name and size member types. The format
//! is the kernel's `Documentation/bpf/btf.rst`.

use crate::dwarf::{Member, StructLayout};
use crate::SymbolError;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_FWD: u8 = 7;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_FLOAT: u8 = 16;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

/// One BTF type, as far as layouts need it.
#[derive(Debug, Clone)]
struct Type {
    kind: u8,
    name: u32,
    /// Size for ints, enums, structs, unions, floats; the referred type
    /// for pointers, typedefs, qualifiers.
    size_or_type: u32,
    /// Struct and union members: (name, type, bit offset, bitfield width
    /// or 0).
    members: Vec<(u32, u32, u32, u32)>,
    /// Arrays: (element type, element count).
    array: Option<(u32, u32)>,
    /// Integers: (bit offset, bits) of the value in its storage.
    int_bits: Option<(u32, u32)>,
}

/// The types of one BTF blob, parsed once.
#[derive(Debug, Clone)]
pub struct Btf {
    /// Index 0 is `void`; ids start at 1.
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn bad(why: impl Into<String>) -> SymbolError {
    SymbolError::BadElf {
        path: "BTF".into(),
        why: why.into(),
    }
}

fn u32_at(d: &[u8], at: usize) -> Result<u32, SymbolError> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| bad(format!("truncated at {at:#x}")))
}

impl Btf {
    /// Parses a BTF blob (little-endian, as on x86-64).
    pub fn parse(data: &[u8]) -> Result<Self, SymbolError> {
        let magic = data.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if magic != Some(MAGIC) {
            return Err(bad("no BTF magic (0xeb9f, little-endian)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types_at = hdr_len + type_off;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| bad("string section out of bounds"))?
            .to_vec();
        let tdata = data
            .get(types_at..types_at + type_len)
            .ok_or_else(|| bad("type section out of bounds"))?;
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            size_or_type: 0,
            members: Vec::new(),
            array: None,
            int_bits: None,
        }];
        let mut at = 0;
        while at < tdata.len() {
            let name = u32_at(tdata, at)?;
            let info = u32_at(tdata, at + 4)?;
            let size_or_type = u32_at(tdata, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = ((info >> 24) & 0x1f) as u8;
            let kind_flag = info >> 31 != 0;
            let mut t = Type {
                kind,
                name,
                size_or_type,
                members: Vec::new(),
                array: None,
                int_bits: None,
            };
            match kind {
                KIND_INT => {
                    let enc = u32_at(tdata, at)?;
                    t.int_bits = Some(((enc >> 16) & 0xff, enc & 0xff));
                    at += 4;
                }
                KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => {
                    t.array = Some((u32_at(tdata, at)?, u32_at(tdata, at + 8)?));
                    at += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let off = u32_at(tdata, m + 8)?;
                        // With kind_flag the top 8 bits are a bitfield's size.
                        let (bits, width) = if kind_flag {
                            (off & 0xff_ffff, off >> 24)
                        } else {
                            (off, 0)
                        };
                        t.members
                            .push((u32_at(tdata, m)?, u32_at(tdata, m + 4)?, bits, width));
                    }
                    at += 12 * vlen;
                }
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                k => return Err(bad(format!("unknown BTF kind {k} (type {})", types.len()))),
            }
            types.push(t);
        }
        Ok(Self { types, strings })
    }

    /// Parses the `.BTF` section of the ELF image `data`; `path` names it in errors.
    pub fn from_elf(data: &[u8], path: &str) -> Result<Self, SymbolError> {
        let elf = crate::parse_elf(data, path)?;
        let sh = elf
            .section_headers
            .iter()
            .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".BTF"))
            .ok_or_else(|| SymbolError::BadElf {
                path: path.to_owned(),
                why: "no .BTF section (kernel built without CONFIG_DEBUG_INFO_BTF)".into(),
            })?;
        let bytes = crate::section_data(data, sh).ok_or_else(|| SymbolError::BadElf {
            path: path.to_owned(),
            why: ".BTF section out of bounds".into(),
        })?;
        Self::parse(bytes)
    }

    /// Number of types (without `void`).
    pub fn len(&self) -> usize {
        self.types.len() - 1
    }

    /// Whether there are no types.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("?")
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    /// The struct named `name` (a complete one, not a forward declaration).
    fn find_struct(&self, name: &str) -> Option<&Type> {
        self.types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name) == name)
    }

    /// `id` with typedefs and qualifiers peeled off.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<u64> {
        let t = self.resolve(id)?;
        match t.kind {
            KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION | KIND_FLOAT => {
                Some(u64::from(t.size_or_type))
            }
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let (elem, n) = t.array?;
                Some(self.size_of(elem)? * u64::from(n))
            }
            _ => None,
        }
    }

    /// The C spelling of type `id`, as far as a layout listing needs it.
    fn type_name(&self, id: u32) -> String {
        let Some(t) = self.get(id) else {
            return "?".into();
        };
        let name = self.name(t.name);
        match t.kind {
            0 => "void".into(),
            KIND_PTR => format!("{} *", self.type_name(t.size_or_type)),
            KIND_ARRAY => {
                // `T x[2][3]`, an array of arrays here (GCC) or one of 6
                // (pahole), is spelled flat: `T[6]`, as lucos reads DWARF.
                let (mut elem, mut n) = t.array.unwrap_or_default();
                while let Some((inner, m)) = self
                    .get(elem)
                    .filter(|e| e.kind == KIND_ARRAY)
                    .and_then(|e| e.array)
                {
                    n = n.saturating_mul(m);
                    elem = inner;
                }
                format!("{}[{n}]", self.type_name(elem))
            }
            KIND_STRUCT if name.is_empty() => "struct <anon>".into(),
            KIND_STRUCT => format!("struct {name}"),
            KIND_UNION if name.is_empty() => "union <anon>".into(),
            KIND_UNION => format!("union {name}"),
            KIND_ENUM | KIND_ENUM64 => format!("enum {name}"),
            KIND_CONST => format!("const {}", self.type_name(t.size_or_type)),
            KIND_VOLATILE => format!("volatile {}", self.type_name(t.size_or_type)),
            KIND_RESTRICT | KIND_TYPE_TAG => self.type_name(t.size_or_type),
            KIND_FUNC_PROTO => "function".into(),
            _ => name.to_owned(),
        }
    }

    /// The layout of `struct name`.
    pub fn struct_layout(&self, name: &str) -> Result<StructLayout, SymbolError> {
        let t = self
            .find_struct(name)
            .ok_or_else(|| SymbolError::NoType(name.to_owned()))?;
        Ok(self.layout_of(name, t))
    }

    fn layout_of(&self, name: &str, t: &Type) -> StructLayout {
        StructLayout {
            name: name.to_owned(),
            size: u64::from(t.size_or_type),
            members: self.members_of(t, 0),
            unit: "BTF".into(),
        }
    }

    /// Every distinct layout the BTF gives `struct name` (file-local
    /// structs of one name in several files are several types).
    pub fn struct_layouts(&self, name: &str) -> Vec<StructLayout> {
        let mut out: Vec<StructLayout> = Vec::new();
        for t in self
            .types
            .iter()
            .filter(|t| t.kind == KIND_STRUCT && self.name(t.name) == name)
        {
            let l = self.layout_of(name, t);
            if !out
                .iter()
                .any(|o| o.size == l.size && o.members == l.members)
            {
                out.push(l);
            }
        }
        out
    }

    /// The members of struct or union `t`, `depth` aggregates deep.
    fn members_of(&self, t: &Type, depth: u32) -> Vec<Member> {
        t.members
            .iter()
            .map(|&(n, ty, bits, _)| {
                let (shape, within) = self.aggregate(ty, depth + 1);
                Member {
                    name: match self.name(n) {
                        "" => "<anon>".into(),
                        s => s.to_owned(),
                    },
                    offset: u64::from(bits / 8),
                    size: self.size_of(ty),
                    type_name: self.type_name(ty),
                    shape,
                    within,
                }
            })
            .collect()
    }

    /// For type `id`: its layout if it is an aggregate (through typedefs,
    /// qualifiers and arrays), spelled as [`crate::dwarf::shape`] does, and
    /// what it holds ([`Member::within`]), as DWARF gives them.
    fn aggregate(&self, id: u32, depth: u32) -> (Option<String>, Vec<String>) {
        let mut names = Vec::new();
        let mut count: Option<u64> = None;
        let mut id = id;
        for _ in 0..32 {
            let Some(t) = self.get(id) else {
                break;
            };
            let name = self.name(t.name);
            match t.kind {
                KIND_TYPEDEF => names.push(name.to_owned()),
                KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {}
                KIND_ARRAY => {
                    // Flat, as type names are.
                    let Some((elem, n)) = t.array else {
                        break;
                    };
                    count = Some(count.unwrap_or(1).saturating_mul(u64::from(n)));
                    id = elem;
                    continue;
                }
                KIND_STRUCT | KIND_UNION => {
                    if !name.is_empty() {
                        let kw = if t.kind == KIND_UNION {
                            "union"
                        } else {
                            "struct"
                        };
                        names.push(format!("{kw} {name}"));
                    }
                    let dims = count.map(|n| format!("[{n}]")).unwrap_or_default();
                    if depth > crate::dwarf::SHAPE_DEPTH {
                        return (Some(format!("{dims}{{...}}")), names);
                    }
                    let members = self.members_of(t, depth);
                    for m in &members {
                        names.extend(m.within.iter().cloned());
                    }
                    return (
                        Some(format!("{dims}{}", crate::dwarf::shape(&members))),
                        names,
                    );
                }
                _ => break,
            }
            id = t.size_or_type;
        }
        (None, names)
    }

    /// Byte offset of `path` (`member` or `member.member...`) in `struct
    /// name`, looking through anonymous structs and unions as C does.
    pub fn offset_of(&self, name: &str, path: &str) -> Result<u64, SymbolError> {
        self.walk(name, path).map(|(at, _)| at)
    }

    /// Byte offset and size of `path` in `struct name`, as [`Btf::offset_of`]
    /// finds it (through anonymous structs and unions).
    pub fn member_of(&self, name: &str, path: &str) -> Result<(u64, u64), SymbolError> {
        let (at, ty) = self.walk(name, path)?;
        let size = self
            .size_of(ty)
            .ok_or_else(|| bad(format!("{name}.{path} has no size")))?;
        Ok((at, size))
    }

    /// Bit offset and width of `path` in `struct name`, as
    /// [`Btf::offset_of`] finds it: a bitfield's own bits, or a whole
    /// member's (its size in bits).
    pub fn bits_of(&self, name: &str, path: &str) -> Result<(u64, u64), SymbolError> {
        let (at, ty, width) = self.walk_bits(name, path)?;
        if width > 0 {
            return Ok((at, u64::from(width)));
        }
        let size = self
            .size_of(ty)
            .ok_or_else(|| bad(format!("{name}.{path} has no size")))?;
        // Without kind_flag a bitfield is an integer type of fewer bits.
        match self.resolve(ty).and_then(|t| t.int_bits) {
            Some((off, bits)) if u64::from(bits) < size * 8 => {
                Ok((at + u64::from(off), u64::from(bits)))
            }
            _ => Ok((at, size * 8)),
        }
    }

    /// (byte offset, type) of `path` in `struct name`.
    fn walk(&self, name: &str, path: &str) -> Result<(u64, u32), SymbolError> {
        self.walk_bits(name, path).map(|(at, ty, _)| (at / 8, ty))
    }

    /// (bit offset, type, bitfield width or 0) of `path` in `struct name`.
    fn walk_bits(&self, name: &str, path: &str) -> Result<(u64, u32, u32), SymbolError> {
        let t = self
            .find_struct(name)
            .ok_or_else(|| SymbolError::NoType(name.to_owned()))?;
        let (mut at, mut cur, mut ty, mut width) = (0u64, t, 0u32, 0u32);
        for part in path.split('.') {
            let (off, mty, w) = self
                .member(cur, part)
                .ok_or_else(|| SymbolError::NoMember {
                    strukt: name.to_owned(),
                    member: path.to_owned(),
                })?;
            at += off;
            ty = mty;
            width = w;
            cur = self
                .resolve(mty)
                .ok_or_else(|| bad(format!("bad type {mty} in struct {name}")))?;
        }
        Ok((at, ty, width))
    }

    /// (bit offset, type, bitfield width or 0) of member `name` of `t`,
    /// through anonymous members.
    fn member(&self, t: &Type, name: &str) -> Option<(u64, u32, u32)> {
        for &(n, ty, bits, width) in &t.members {
            let mname = self.name(n);
            if mname == name {
                return Some((u64::from(bits), ty, width));
            }
            if mname.is_empty() {
                let inner = self.resolve(ty)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some((off, ty, w)) = self.member(inner, name) {
                        return Some((u64::from(bits) + off, ty, w));
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: int (4), struct inner { int a; int b; }, struct
    /// outer { int x; struct inner in; union { int u; }; int *p; }.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0x\0in\0u\0outer\0p\0u8\0bf\0f\0lvl\0".to_vec();
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .expect("string") as u32
                + 1
        };
        let mut t = Vec::new();
        let mut ty = |name: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name, (kind << 24) | vlen, size].iter().chain(extra) {
                t.extend_from_slice(&v.to_le_bytes());
            }
        };
        ty(s("int"), 1, 0, 4, &[32]); // 1: int
        ty(s("inner"), 4, 2, 8, &[s("a"), 1, 0, s("b"), 1, 32]); // 2
        ty(0, 5, 1, 4, &[s("u"), 1, 0]); // 3: anonymous union
        ty(0, 2, 0, 1, &[]); // 4: int *
        ty(
            s("outer"),
            4,
            4,
            24,
            &[s("x"), 1, 0, s("in"), 2, 32, 0, 3, 96, s("p"), 4, 128],
        ); // 5
        ty(s("u8"), 1, 0, 1, &[8]); // 6: u8
        ty(
            s("bf"),
            4 | 0x80,
            2,
            1,
            &[s("f"), 6, 5 << 24, s("lvl"), 6, (3 << 24) | 5],
        ); // 7: struct bf { u8 f:5; u8 lvl:3; }, kind_flag: widths in the offsets
        let mut d = Vec::new();
        d.extend_from_slice(&MAGIC.to_le_bytes());
        d.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d.extend_from_slice(&t);
        d.extend_from_slice(&strings);
        d
    }

    #[test]
    fn offsets_through_nested_and_anonymous_members() {
        let b = Btf::parse(&blob()).expect("parse");
        assert_eq!(b.len(), 7);
        assert_eq!(b.offset_of("outer", "x").expect("offset"), 0);
        assert_eq!(b.offset_of("outer", "in.b").expect("offset"), 8);
        assert_eq!(b.offset_of("outer", "u").expect("offset"), 12);
        assert_eq!(b.offset_of("outer", "p").expect("offset"), 16);
        assert!(b.offset_of("outer", "in.c").is_err());
        assert!(b.offset_of("nosuch", "x").is_err());
        // With sizes: through the anonymous union, and nested.
        assert_eq!(b.member_of("outer", "u").expect("u"), (12, 4));
        assert_eq!(b.member_of("outer", "in.b").expect("in.b"), (8, 4));
        assert_eq!(b.member_of("outer", "p").expect("p"), (16, 8));
        assert!(b.member_of("outer", "nope").is_err());
        let l = b.struct_layout("outer").expect("layout");
        assert_eq!(l.size, 24);
        let names: Vec<_> = l
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.offset, m.size, m.type_name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("x", 0, Some(4), "int"),
                ("in", 4, Some(8), "struct inner"),
                ("<anon>", 12, Some(4), "union <anon>"),
                ("p", 16, Some(8), "int *"),
            ]
        );
    }

    #[test]
    fn bitfields_and_whole_members_in_bits() {
        let b = Btf::parse(&blob()).expect("parse");
        assert_eq!(b.bits_of("bf", "f").expect("f"), (0, 5));
        assert_eq!(b.bits_of("bf", "lvl").expect("lvl"), (5, 3));
        assert_eq!(b.offset_of("bf", "lvl").expect("lvl"), 0);
        assert_eq!(b.bits_of("outer", "in.b").expect("in.b"), (64, 32));
        assert_eq!(b.bits_of("outer", "p").expect("p"), (128, 64));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
        let mut d = blob();
        d.truncate(40);
        assert!(Btf::parse(&d).is_err());
    }
}
