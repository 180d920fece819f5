//! Struct layouts from DWARF (gimli): members, offsets, sizes and type names,
//! as the compiler wrote them.

use std::collections::HashMap;

use std::rc::Rc;

use gimli::{AttributeValue, EndianRcSlice, LittleEndian, UnitOffset};

use crate::SymbolError;

/// Sections are owned: those of a relocatable object are relocated first.
type R = EndianRcSlice<LittleEndian>;

/// One member of a struct.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// Member name (`<anon>` for an anonymous member).
    pub name: String,
    /// Byte offset in the struct.
    pub offset: u64,
    /// Size in bytes, when the type has one.
    pub size: Option<u64>,
    /// The member's type, C-style.
    pub type_name: String,
    /// Where the type is a struct or union (or an array of them, through
    /// typedefs and qualifiers): its layout, members within members, as
    /// [`shape`] spells it; `None` for other types. Two types of one name
    /// but different layouts differ here.
    #[serde(skip)]
    pub shape: Option<String>,
    /// The names the member's type goes by (typedefs, `struct X`) and,
    /// for a struct or union held by value, those of every member within
    /// it, at any depth (not through pointers): what the member holds.
    #[serde(skip)]
    pub within: Vec<String>,
}

/// How deep [`Member::shape`] goes into members within members.
pub const SHAPE_DEPTH: u32 = 8;

/// The canonical spelling of an aggregate's layout from its members
/// (`{name@offset:size<shape>,...}`), the same from DWARF and BTF: names,
/// byte offsets, sizes, and the members' own shapes.
pub fn shape(members: &[Member]) -> String {
    let parts: Vec<String> = members
        .iter()
        .map(|m| {
            format!(
                "{}@{}:{}{}",
                m.name,
                m.offset,
                m.size.map_or_else(|| "?".to_owned(), |s| s.to_string()),
                m.shape.as_deref().unwrap_or("")
            )
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// A struct's layout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StructLayout {
    /// Struct name (without `struct`).
    pub name: String,
    /// `sizeof`.
    pub size: u64,
    /// Members in declaration order.
    pub members: Vec<Member>,
    /// The compilation unit that defined it.
    pub unit: String,
}

/// The DWARF of one image, parsed once.
pub struct TypeDb<'a> {
    dwarf: gimli::Dwarf<R>,
    _image: std::marker::PhantomData<&'a [u8]>,
}

impl std::fmt::Debug for TypeDb<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TypeDb")
    }
}

fn dwarf_err(path: &str) -> impl Fn(gimli::Error) -> SymbolError + '_ {
    move |e| SymbolError::BadElf {
        path: path.to_owned(),
        why: format!("bad DWARF: {e}"),
    }
}

impl<'a> TypeDb<'a> {
    /// Reads the DWARF sections of the ELF image `data`; `path` names it in errors.
    pub fn from_elf(data: &'a [u8], path: &str) -> Result<Self, SymbolError> {
        let elf = crate::parse_elf(data, path)?;
        let mut sections: HashMap<String, Vec<u8>> = HashMap::new();
        let mut index: HashMap<usize, String> = HashMap::new();
        for (i, sh) in elf.section_headers.iter().enumerate() {
            if let Some(name) = elf.shdr_strtab.get_at(sh.sh_name) {
                if let Some(bytes) = crate::section_data(data, sh) {
                    if name.starts_with(".debug_") {
                        sections.insert(name.to_owned(), bytes.to_vec());
                        index.insert(i, name.to_owned());
                    }
                }
            }
        }
        if !sections.contains_key(".debug_info") {
            return Err(SymbolError::NoDebugInfo(path.to_owned()));
        }
        // A relocatable object (a patch's) keeps its DWARF's references to
        // other sections (string offsets, ...) in relocations: apply them.
        for (rel_index, relocs) in &elf.shdr_relocs {
            let target = elf.section_headers[*rel_index].sh_info as usize;
            let Some(bytes) = index.get(&target).and_then(|n| sections.get_mut(n)) else {
                continue;
            };
            for r in relocs.iter() {
                let sym = elf.syms.get(r.r_sym).map(|s| s.st_value).unwrap_or(0);
                let v = sym.wrapping_add(r.r_addend.unwrap_or(0) as u64);
                let at = r.r_offset as usize;
                let width = match r.r_type {
                    goblin::elf::reloc::R_X86_64_64 => 8,
                    goblin::elf::reloc::R_X86_64_32 | goblin::elf::reloc::R_X86_64_32S => 4,
                    _ => continue,
                };
                if let Some(dst) = bytes.get_mut(at..at + width) {
                    dst.copy_from_slice(&v.to_le_bytes()[..width]);
                }
            }
        }
        let dwarf = gimli::Dwarf::load(|id| -> Result<R, gimli::Error> {
            let b: Rc<[u8]> = sections
                .get(id.name())
                .map(|v| Rc::from(v.as_slice()))
                .unwrap_or_else(|| Rc::from(&[][..]));
            Ok(EndianRcSlice::new(b, LittleEndian))
        })
        .map_err(dwarf_err(path))?;
        Ok(Self {
            dwarf,
            _image: std::marker::PhantomData,
        })
    }

    /// The first definition of `struct name`: its unit and the unit's
    /// name, and where in the unit it is; an error if no unit defines it.
    fn find_struct(&self, name: &str) -> Result<(gimli::Unit<R>, String, UnitOffset), SymbolError> {
        let err = dwarf_err("DWARF");
        let mut units = self.dwarf.units();
        while let Some(header) = units.next().map_err(&err)? {
            let unit = self.dwarf.unit(header).map_err(&err)?;
            let mut found = None;
            let mut cursor = unit.entries();
            while let Some(entry) = cursor.next_dfs().map_err(&err)? {
                if entry.tag() == gimli::DW_TAG_structure_type
                    && entry.attr_value(gimli::DW_AT_declaration).is_none()
                    && self.name_of(&unit, entry).as_deref() == Some(name)
                {
                    found = Some(entry.offset());
                    break;
                }
            }
            if let Some(at) = found {
                let unit_name = unit
                    .name
                    .as_ref()
                    .and_then(|n| {
                        gimli::Reader::to_string_lossy(n)
                            .ok()
                            .map(|c| c.into_owned())
                    })
                    .unwrap_or_default();
                return Ok((unit, unit_name, at));
            }
        }
        Err(SymbolError::NoType(name.to_owned()))
    }

    /// The layout of `struct name`; an error if no unit defines it.
    pub fn struct_layout(&self, name: &str) -> Result<StructLayout, SymbolError> {
        let err = dwarf_err("DWARF");
        let (unit, unit_name, at) = self.find_struct(name)?;
        let mut tree = unit.entries_tree(Some(at)).map_err(&err)?;
        let size = tree
            .root()
            .map_err(&err)?
            .entry()
            .attr_value(gimli::DW_AT_byte_size)
            .and_then(|v| v.udata_value())
            .unwrap_or(0);
        Ok(StructLayout {
            name: name.to_owned(),
            size,
            members: self.members(&unit, at, 0)?,
            unit: unit_name,
        })
    }

    /// The functions the image declares but does not define (what a patch
    /// object calls in the kernel), each with its return type and its
    /// parameters' types, C-style: `(name, returns, parameters)`.
    pub fn declared_functions(&self) -> Result<Vec<(String, String, Vec<String>)>, SymbolError> {
        let err = dwarf_err("DWARF");
        let mut out = Vec::new();
        let mut units = self.dwarf.units();
        while let Some(header) = units.next().map_err(&err)? {
            let unit = self.dwarf.unit(header).map_err(&err)?;
            let mut tree = unit.entries_tree(None).map_err(&err)?;
            let root = tree.root().map_err(&err)?;
            let mut children = root.children();
            while let Some(child) = children.next().map_err(&err)? {
                let e = child.entry();
                if e.tag() != gimli::DW_TAG_subprogram
                    || e.attr_value(gimli::DW_AT_declaration).is_none()
                {
                    continue;
                }
                let Some(name) = self.name_of(&unit, e) else {
                    continue;
                };
                let type_of = |e: &gimli::DebuggingInformationEntry<R>| match e
                    .attr_value(gimli::DW_AT_type)
                {
                    Some(AttributeValue::UnitRef(t)) => self.describe(&unit, t, 0).0,
                    _ => "void".to_owned(),
                };
                let returns = type_of(e);
                let mut params = Vec::new();
                let mut args = child.children();
                while let Some(a) = args.next().map_err(&err)? {
                    if a.entry().tag() == gimli::DW_TAG_formal_parameter {
                        params.push(type_of(a.entry()));
                    }
                }
                out.push((name, returns, params));
            }
        }
        Ok(out)
    }

    /// Bit offset and width of member `member` of `struct name` (a direct
    /// member): a bitfield's own bits, or a whole member's.
    pub fn bits_of(&self, name: &str, member: &str) -> Result<(u64, u64), SymbolError> {
        let (unit, _, at) = self.find_struct(name)?;
        self.member_bits(&unit, at, member)?
            .ok_or_else(|| SymbolError::NoMember {
                strukt: name.to_owned(),
                member: member.to_owned(),
            })
    }

    /// (bit offset, width) of member `member` of the struct at `at`.
    fn member_bits(
        &self,
        unit: &gimli::Unit<R>,
        at: UnitOffset,
        member: &str,
    ) -> Result<Option<(u64, u64)>, SymbolError> {
        let err = dwarf_err("DWARF");
        let mut tree = unit.entries_tree(Some(at)).map_err(&err)?;
        let root = tree.root().map_err(&err)?;
        let mut children = root.children();
        while let Some(child) = children.next().map_err(&err)? {
            let e = child.entry();
            if e.tag() != gimli::DW_TAG_member || self.name_of(unit, e).as_deref() != Some(member) {
                continue;
            }
            let udata = |a| e.attr_value(a).and_then(|v| v.udata_value());
            let size = match e.attr_value(gimli::DW_AT_type) {
                Some(AttributeValue::UnitRef(t)) => self.describe(unit, t, 0).1,
                _ => None,
            };
            let location = udata(gimli::DW_AT_data_member_location).unwrap_or(0);
            let Some(width) = udata(gimli::DW_AT_bit_size) else {
                let size = size.ok_or_else(|| SymbolError::BadElf {
                    path: "DWARF".into(),
                    why: format!("member {member} has no size"),
                })?;
                return Ok(Some((location * 8, size * 8)));
            };
            if let Some(bit) = udata(gimli::DW_AT_data_bit_offset) {
                return Ok(Some((bit, width)));
            }
            // DWARF 2/3: bits counted from the most significant end of a
            // storage unit of DW_AT_byte_size bytes at the location.
            let storage = udata(gimli::DW_AT_byte_size).or(size).unwrap_or(0);
            let from_msb = udata(gimli::DW_AT_bit_offset).unwrap_or(0);
            let from_lsb =
                (storage * 8)
                    .checked_sub(from_msb + width)
                    .ok_or_else(|| SymbolError::BadElf {
                        path: "DWARF".into(),
                        why: format!("bitfield {member} does not fit its storage unit"),
                    })?;
            return Ok(Some((location * 8 + from_lsb, width)));
        }
        Ok(None)
    }

    fn name_of(
        &self,
        unit: &gimli::Unit<R>,
        entry: &gimli::DebuggingInformationEntry<R>,
    ) -> Option<String> {
        let v = entry.attr_value(gimli::DW_AT_name)?;
        self.dwarf.attr_string(unit, v).ok().and_then(|s| {
            gimli::Reader::to_string_lossy(&s)
                .ok()
                .map(|c| c.into_owned())
        })
    }

    fn members(
        &self,
        unit: &gimli::Unit<R>,
        at: UnitOffset,
        depth: u32,
    ) -> Result<Vec<Member>, SymbolError> {
        let err = dwarf_err("DWARF");
        let mut tree = unit.entries_tree(Some(at)).map_err(&err)?;
        let root = tree.root().map_err(&err)?;
        let mut children = root.children();
        let mut out = Vec::new();
        while let Some(child) = children.next().map_err(&err)? {
            let e = child.entry();
            if e.tag() != gimli::DW_TAG_member {
                continue;
            }
            let ty = match e.attr_value(gimli::DW_AT_type) {
                Some(AttributeValue::UnitRef(t)) => Some(t),
                _ => None,
            };
            let (type_name, size) = match ty {
                Some(t) => self.describe(unit, t, 0),
                None => ("?".to_owned(), None),
            };
            let udata = |a| e.attr_value(a).and_then(|v| v.udata_value());
            // A bitfield's offset is the byte holding its first bit, as
            // BTF has it (DWARF 2-4 give its storage unit's place and the
            // bits counted from that unit's most significant end).
            let location = udata(gimli::DW_AT_data_member_location);
            let offset = match (
                udata(gimli::DW_AT_bit_size),
                udata(gimli::DW_AT_data_bit_offset),
            ) {
                (_, Some(bit)) => bit / 8,
                (Some(width), None) if udata(gimli::DW_AT_bit_offset).is_some() => {
                    let storage = udata(gimli::DW_AT_byte_size).or(size).unwrap_or(0);
                    let from_msb = udata(gimli::DW_AT_bit_offset).unwrap_or(0);
                    let from_lsb = (storage * 8).saturating_sub(from_msb.saturating_add(width));
                    (location.unwrap_or(0) * 8 + from_lsb) / 8
                }
                // Else a union's member, or the first.
                _ => location.unwrap_or(0),
            };
            let (shape, within) = match ty {
                Some(t) => self.aggregate(unit, t, depth + 1),
                None => (None, Vec::new()),
            };
            out.push(Member {
                name: self.name_of(unit, e).unwrap_or_else(|| "<anon>".into()),
                offset,
                size,
                type_name,
                shape,
                within,
            });
        }
        Ok(out)
    }

    /// For the type at `at`: its layout if it is an aggregate (through
    /// typedefs, qualifiers and arrays), as [`shape`] spells it, and what
    /// it holds ([`Member::within`]). The aggregate's members are read
    /// once for both.
    fn aggregate(
        &self,
        unit: &gimli::Unit<R>,
        at: UnitOffset,
        depth: u32,
    ) -> (Option<String>, Vec<String>) {
        let mut names = Vec::new();
        let mut count: Option<u64> = None;
        let mut at = at;
        for _ in 0..32 {
            let Ok(e) = unit.entry(at) else {
                break;
            };
            let next = match e.attr_value(gimli::DW_AT_type) {
                Some(AttributeValue::UnitRef(t)) => Some(t),
                _ => None,
            };
            match e.tag() {
                gimli::DW_TAG_typedef => names.extend(self.name_of(unit, &e)),
                gimli::DW_TAG_const_type | gimli::DW_TAG_volatile_type => {}
                gimli::DW_TAG_array_type => {
                    let n = self.array_count(unit, at);
                    count = Some(count.unwrap_or(1).saturating_mul(n));
                }
                gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type => {
                    let kw = if e.tag() == gimli::DW_TAG_union_type {
                        "union"
                    } else {
                        "struct"
                    };
                    names.extend(self.name_of(unit, &e).map(|n| format!("{kw} {n}")));
                    let dims = count.map(|n| format!("[{n}]")).unwrap_or_default();
                    if depth > SHAPE_DEPTH {
                        return (Some(format!("{dims}{{...}}")), names);
                    }
                    let members = self.members(unit, at, depth).unwrap_or_default();
                    for m in &members {
                        names.extend(m.within.iter().cloned());
                    }
                    return (Some(format!("{dims}{}", shape(&members))), names);
                }
                _ => break,
            }
            match next {
                Some(t) => at = t,
                None => break,
            }
        }
        (None, names)
    }

    /// A C-style name and the size of the type at `at`.
    fn describe(&self, unit: &gimli::Unit<R>, at: UnitOffset, depth: u32) -> (String, Option<u64>) {
        if depth > 16 {
            return ("...".into(), None);
        }
        let Ok(e) = unit.entry(at) else {
            return ("?".into(), None);
        };
        let byte_size = e
            .attr_value(gimli::DW_AT_byte_size)
            .and_then(|v| v.udata_value());
        let inner = || match e.attr_value(gimli::DW_AT_type) {
            Some(AttributeValue::UnitRef(t)) => self.describe(unit, t, depth + 1),
            _ => ("void".to_owned(), None),
        };
        let named = |kw: &str| match self.name_of(unit, &e) {
            Some(n) if kw.is_empty() => n,
            Some(n) => format!("{kw} {n}"),
            None => format!("{kw} <anon>"),
        };
        match e.tag() {
            gimli::DW_TAG_base_type => (named(""), byte_size),
            gimli::DW_TAG_structure_type => (named("struct"), byte_size),
            gimli::DW_TAG_union_type => (named("union"), byte_size),
            gimli::DW_TAG_enumeration_type => (named("enum"), byte_size),
            gimli::DW_TAG_typedef => (named(""), inner().1),
            gimli::DW_TAG_pointer_type => (format!("{} *", inner().0), byte_size.or(Some(8))),
            gimli::DW_TAG_const_type => {
                let (n, s) = inner();
                (format!("const {n}"), s)
            }
            gimli::DW_TAG_volatile_type => {
                let (n, s) = inner();
                (format!("volatile {n}"), s)
            }
            gimli::DW_TAG_array_type => {
                let (n, s) = inner();
                let count = self.array_count(unit, at);
                let total = s.map(|s| s.saturating_mul(count)).or(byte_size);
                // Spelled flat (`int[6]` for `int x[2][3]`), as pahole
                // writes the kernel's BTF.
                (format!("{n}[{count}]"), total)
            }
            gimli::DW_TAG_subroutine_type => ("function".into(), None),
            _ => ("?".into(), byte_size),
        }
    }

    /// The number of elements of the array type at `at`: `T x[4][8]` is
    /// one array type with a subrange per dimension, counted as 32 (flat,
    /// as pahole's BTF has it); a flexible array's is 0, as in BTF.
    fn array_count(&self, unit: &gimli::Unit<R>, at: UnitOffset) -> u64 {
        let Ok(mut tree) = unit.entries_tree(Some(at)) else {
            return 0;
        };
        let Ok(root) = tree.root() else {
            return 0;
        };
        let mut children = root.children();
        let mut count = None;
        while let Ok(Some(child)) = children.next() {
            let e = child.entry();
            if e.tag() != gimli::DW_TAG_subrange_type {
                continue;
            }
            let udata = |a| e.attr_value(a).and_then(|v| v.udata_value());
            let n = udata(gimli::DW_AT_count)
                .or_else(|| udata(gimli::DW_AT_upper_bound).and_then(|u| u.checked_add(1)))
                .unwrap_or(0);
            count = Some(count.unwrap_or(1u64).saturating_mul(n));
        }
        count.unwrap_or(0)
    }
}
