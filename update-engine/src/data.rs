//! Data-layout changes (the LUCOS idea): a patch may give a kernel object
//! (a global struct, or an array of them) a new layout. The new code uses a
//! new copy placed in the patch area; the old copy stays where it is for
//! the old code. While both can run, write control traps every write to
//! either copy and the engine transfers the written members to the other
//! copy before the writer runs on ([`crate::protect::GuardPolicy`]). Once
//! no old code can run any more the change retires: the old copy is
//! released and only the new one is used.
//!
//! `lucos build` derives the transfer member by member, by name, from the
//! old layout (the running kernel's DWARF or BTF) and the new one (the
//! patch object's DWARF): same-typed members are copied, integers widened
//! or narrowed (narrowing refused unless declared), new members start at a
//! declared value (0 by default), removed members are dropped. Members the
//! rest of the kernel links to or locks (list heads, locks, wait queues)
//! are refused by name.

use serde::{Deserialize, Serialize};
use symbol_db::dwarf::{Member, StructLayout};

/// Owner of a data change's new copy: `data:PATCH:SYMBOL`.
pub fn owner(patch: &str, symbol: &str) -> String {
    format!(
        "{}{patch}:{symbol}",
        vmm_core::write_control::DATA_OWNER_PREFIX
    )
}

/// The write-control owner of patch `patch`'s own writable data (the new
/// variables it defines): the guest writes it freely, nothing is transferred.
pub fn own_owner(patch: &str) -> String {
    format!(
        "{}{patch}{OWN_SUFFIX}",
        vmm_core::write_control::DATA_OWNER_PREFIX
    )
}

/// Whether `owner` is a patch's own writable data ([`own_owner`]).
pub fn is_own(owner: &str) -> bool {
    owner.starts_with(vmm_core::write_control::DATA_OWNER_PREFIX) && owner.ends_with(OWN_SUFFIX)
}

const OWN_SUFFIX: &str = "/own";

/// Owner of its old copy (released on its own when the change retires).
pub fn old_owner(owner: &str) -> String {
    format!("{owner}{OLD_SUFFIX}")
}

const OLD_SUFFIX: &str = "/old";

/// A member's place and kind in one layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    /// Byte offset in the struct.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
    /// An integer (transferred by value: widened, narrowed, sign-extended).
    pub int: bool,
    /// A signed integer.
    pub signed: bool,
    /// A C `bool`: a value goes into it as 0 or 1 (not truncated).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boolean: bool,
}

/// How one member crosses between the layouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberXfer {
    /// Member name.
    pub name: String,
    /// Where it is in the old layout (`None`: added by the patch).
    pub old: Option<Field>,
    /// Where it is in the new layout (`None`: removed by the patch).
    pub new: Option<Field>,
    /// Value of an added member in copies made from the old layout.
    #[serde(default)]
    pub init: i64,
    /// Transferred by the patch's C transfer functions, not derived: a
    /// write to it runs the function for the other direction.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_c: bool,
}

/// The patch's own transfer functions for one object, in C: `void
/// lucos_to_new_SYMBOL(const struct OLD *old, struct NEW *new)` and `void
/// lucos_to_old_SYMBOL(const struct NEW *new, struct OLD *old)`, one element
/// each. They run after the derived transfer, in the VMM's sandbox, and
/// write what the derivation cannot (a renamed member, a changed type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CTransfer {
    /// The patch object defining them.
    pub object: String,
    /// Old→new.
    pub to_new: String,
    /// New→old.
    pub to_old: String,
}

/// The names C transfer functions of `symbol` must have.
pub fn c_names(symbol: &str) -> (String, String) {
    (
        format!("lucos_to_new_{symbol}"),
        format!("lucos_to_old_{symbol}"),
    )
}

/// One object whose layout a patch changes (the `.lup` manifest's `data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataChange {
    /// The kernel symbol.
    pub symbol: String,
    /// Its object file, for a local symbol whose name is not unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol_file: Option<String>,
    /// The struct type's name.
    pub type_name: String,
    /// Elements (1 for a single struct).
    pub count: u64,
    /// `sizeof` in the running kernel.
    pub old_size: u64,
    /// `sizeof` in the patch.
    pub new_size: u64,
    /// Member by member.
    pub members: Vec<MemberXfer>,
    /// Kernel functions that use the object and that the patch does not
    /// replace, and kernel data pointing into it (`data SYMBOL+OFF`, a
    /// sysctl table's `.data`, say): they keep using the old copy, so the
    /// change never retires (both copies stay coherent for as long as the
    /// patch is applied).
    #[serde(default)]
    pub users_left: Vec<String>,
    /// The patch's C transfer functions (`.lup` format 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c: Option<CTransfer>,
    /// Kernel data words pointing into the object that the patch moves to
    /// the new copy while it is applied (`lucos build --repoint`): written
    /// in the switch's pause, put back at revert. Not users left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repoint: Vec<Pointer>,
}

/// A kernel data word that points into a changed object: `holder+offset`
/// holds the object's address plus `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    /// The kernel symbol holding the pointer (a sysctl table, say).
    pub holder: String,
    /// Its object file, for a local symbol whose name is not unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_file: Option<String>,
    /// Byte offset of the pointer in the holder.
    pub offset: u64,
    /// Byte offset in the old object it points to.
    pub target: u64,
}

impl std::fmt::Display for Pointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{:#x}", self.holder, self.offset)
    }
}

/// What the patch author declared for one change (`lucos build --data`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// Initial values of added members.
    pub init: Vec<(String, i64)>,
    /// Members whose narrowing is accepted (values are truncated).
    pub narrow: Vec<String>,
    /// The patch's C transfer functions, if its sources define them.
    pub c: Option<CTransfer>,
}

/// Type names of members that other kernel data points into or that are
/// held across code: moving them to a new copy breaks the kernel.
const UNMOVABLE: &[&str] = &[
    "list_head",
    "hlist_head",
    "hlist_node",
    "rb_node",
    "rb_root",
    "llist_node",
    "spinlock",
    "raw_spinlock",
    "rwlock",
    "mutex",
    "rw_semaphore",
    "semaphore",
    "wait_queue_head",
    "completion",
    "work_struct",
    "delayed_work",
    "timer_list",
    "rcu_head",
    "callback_head",
    "kref",
    "refcount_struct",
    "seqcount",
    "seqcount_spinlock",
    "seqcount_raw_spinlock",
    "seqcount_rwlock",
    "seqcount_mutex",
    "seqlock",
    "swait_queue_head",
    "hrtimer",
    "kobject",
    "xarray",
    "idr",
    "notifier_block",
    "percpu_counter",
    "percpu_ref",
    "srcu_struct",
    "irq_work",
    "kthread_work",
    "tasklet_struct",
    "lockref",
    "plist_head",
    "plist_node",
    "hlist_nulls_head",
    "hlist_nulls_node",
    "rb_root_cached",
    "static_key",
    "llist_head",
    "rcuwait",
];

/// Of those, what a member the patch adds cannot start as: all zero bytes
/// is not an empty one (a list head points to itself, a reference count
/// of 0 is a freed object, a work item or timer has its function set up).
/// A zeroed lock, sequence count or singly linked head is an unlocked or
/// empty one (without lock debugging, as distribution kernels build).
const NOT_ZERO: &[&str] = &[
    "list_head",
    "mutex",
    "rw_semaphore",
    "semaphore",
    "wait_queue_head",
    "swait_queue_head",
    "completion",
    "work_struct",
    "delayed_work",
    "timer_list",
    "hrtimer",
    "kobject",
    "kref",
    "refcount_struct",
    "percpu_counter",
    "percpu_ref",
    "srcu_struct",
    "plist_head",
    "notifier_block",
    "tasklet_struct",
    "irq_work",
    "kthread_work",
    "idr",
];

/// The first of `list` that type name `type_name` names (as `struct X`,
/// `X`, or a typedef `X_t`).
fn named_in(list: &[&'static str], type_name: &str) -> Option<&'static str> {
    list.iter().copied().find(|u| {
        type_name
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|w| w == *u || w.trim_end_matches("_t") == *u)
    })
}

/// Whether member `m` is, or holds at any depth by value, one of `list`:
/// that one and the type name that says so.
fn holds<'m>(list: &[&'static str], m: &'m Member) -> Option<(&'static str, &'m str)> {
    // A pointer is copied as it is (or starts NULL): what it points to
    // does not move.
    let direct = (!m.type_name.contains('*') && m.type_name != "function").then_some(&m.type_name);
    direct
        .into_iter()
        .chain(&m.within)
        .find_map(|t| named_in(list, t).map(|u| (u, t.as_str())))
}

/// Whether a C type name is an integer type, and a signed one.
fn int_kind(type_name: &str, size: u64) -> Option<bool> {
    if !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    let t = type_name
        .trim_start_matches("const ")
        .trim_start_matches("volatile ")
        .trim();
    if t.contains('*') || t.contains('[') || t.starts_with("struct ") || t.starts_with("union ") {
        return None;
    }
    let unsigned = [
        "u8", "u16", "u32", "u64", "__u8", "__u16", "__u32", "__u64", "uint8_t", "uint16_t",
        "uint32_t", "uint64_t", "size_t", "bool", "_Bool",
    ];
    let signed = [
        "s8",
        "s16",
        "s32",
        "s64",
        "__s8",
        "__s16",
        "__s32",
        "__s64",
        "int8_t",
        "int16_t",
        "int32_t",
        "int64_t",
        "ssize_t",
        "loff_t",
        "time64_t",
        "int",
        "long",
        "short",
        "long int",
        "short int",
        "long long",
        "long long int",
        "char",
        "signed char",
    ];
    let c_words = ["unsigned", "signed", "short", "long", "int", "char"];
    if t.split_whitespace().all(|w| c_words.contains(&w)) {
        return Some(!t.split_whitespace().any(|w| w == "unsigned"));
    }
    if unsigned.contains(&t) || t.starts_with("enum ") {
        Some(false)
    } else if signed.contains(&t) {
        Some(true)
    } else {
        None
    }
}

fn field(m: &Member) -> Result<Field, String> {
    let size = m
        .size
        .ok_or_else(|| format!("member {} ({}) has no size", m.name, m.type_name))?;
    let int = int_kind(&m.type_name, size);
    Ok(Field {
        offset: u32::try_from(m.offset).map_err(|_| format!("member {} is too far", m.name))?,
        size: u32::try_from(size).map_err(|_| format!("member {} is too big", m.name))?,
        int: int.is_some(),
        signed: int.unwrap_or(false),
        boolean: matches!(
            m.type_name
                .trim_start_matches("const ")
                .trim_start_matches("volatile "),
            "bool" | "_Bool"
        ),
    })
}

/// The members that change `was` added to an object and change `now` adds
/// too, with the same name, size and kind (integer or not), in both new
/// layouts: when `now` replaces `was`, their values go from `was`'s new copy
/// to `now`'s as they are. (Name, place in `was`'s new layout, in `now`'s.)
pub fn added_in_both(was: &DataChange, now: &DataChange) -> Vec<(String, Field, Field)> {
    now.members
        .iter()
        .filter(|m| m.old.is_none())
        .filter_map(|m| {
            let to = m.new?;
            let from = was
                .members
                .iter()
                .find(|x| x.name == m.name && x.old.is_none())?
                .new?;
            (from.size == to.size && from.int == to.int).then(|| (m.name.clone(), from, to))
        })
        .collect()
}

/// Derives the member-by-member transfer of `symbol` (`count` elements)
/// from `old` to `new`; an error names what cannot be derived.
pub fn derive(
    symbol: &str,
    count: u64,
    old: &StructLayout,
    new: &StructLayout,
    declared: &Declared,
) -> Result<DataChange, String> {
    let mut members = Vec::new();
    if count == 0 || old.size == 0 || new.size == 0 {
        return Err(format!("{symbol}: struct {} has no size", old.name));
    }
    for m in &old.members {
        if m.name == "<anon>" {
            return Err(format!(
                "{symbol}: struct {} has an anonymous member; name it to transfer it",
                old.name
            ));
        }
        if let Some((u, t)) = holds(UNMOVABLE, m) {
            let what = if t == m.type_name {
                format!("is a {u} ({t})")
            } else {
                format!("({}) holds a {u} ({t})", m.type_name)
            };
            return Err(format!(
                "{symbol}: member {} {what}: other kernel data links to it or it is held \
                 across code, so it cannot move to a new copy",
                m.name
            ));
        }
    }
    for m in new
        .members
        .iter()
        .filter(|m| !old.members.iter().any(|o| o.name == m.name))
    {
        if let Some((u, t)) = holds(NOT_ZERO, m) {
            return Err(format!(
                "{symbol}: the patch adds member {} ({}) holding a {u} ({t}): lucos starts an \
                 added member as zero bytes, which is no initialized {u}",
                m.name, m.type_name
            ));
        }
    }
    for m in &new.members {
        if m.name == "<anon>" {
            return Err(format!(
                "{symbol}: the patch's struct {} has an anonymous member; name it",
                new.name
            ));
        }
        let n = field(m).map_err(|e| format!("{symbol}: {e}"))?;
        let o = old.members.iter().find(|x| x.name == m.name);
        let init = declared
            .init
            .iter()
            .find(|(name, _)| name == &m.name)
            .map(|(_, v)| *v);
        let Some(o) = o else {
            if !n.int && init.is_some_and(|v| v != 0) {
                return Err(format!(
                    "{symbol}: added member {} ({}) is not an integer: only 0 can start it",
                    m.name, m.type_name
                ));
            }
            members.push(MemberXfer {
                name: m.name.clone(),
                old: None,
                new: Some(n),
                init: init.unwrap_or(0),
                by_c: declared.c.is_some(),
            });
            continue;
        };
        if init.is_some() {
            return Err(format!(
                "{symbol}: member {} is in the old layout: its value is transferred, not set",
                m.name
            ));
        }
        let of = field(o).map_err(|e| format!("{symbol}: {e}"))?;
        // A struct member keeps its type's name but not its layout: a
        // copy of its bytes would put its members in the wrong places.
        let reshaped = matches!((&o.shape, &m.shape), (Some(a), Some(b)) if a != b);
        let derivable = if of.int && n.int {
            true
        } else {
            of.size == n.size && o.type_name == m.type_name && !reshaped
        };
        if !derivable && declared.c.is_some() {
            members.push(MemberXfer {
                name: m.name.clone(),
                old: Some(of),
                new: Some(n),
                init: 0,
                by_c: true,
            });
            continue;
        }
        if of.int && n.int {
            if n.size < of.size && !declared.narrow.contains(&m.name) {
                return Err(format!(
                    "{symbol}: member {} narrows from {} ({} bytes) to {} ({} bytes): values \
                     could be lost; declare it (--narrow {symbol}.{}) if that is intended",
                    m.name, o.type_name, of.size, m.type_name, n.size, m.name
                ));
            }
        } else if of.size != n.size || o.type_name != m.type_name || reshaped {
            let what = if reshaped && o.type_name == m.type_name {
                format!(
                    "keeps its type {} but the patch lays that type out otherwise (old {}, new \
                     {})",
                    m.type_name,
                    o.shape.as_deref().unwrap_or(""),
                    m.shape.as_deref().unwrap_or("")
                )
            } else {
                format!("changes type from {} to {}", o.type_name, m.type_name)
            };
            return Err(format!(
                "{symbol}: member {} {what}: lucos cannot derive that transfer",
                m.name
            ) + &format!(
                "; write it in C ({} and {} in the patch sources)",
                c_names(symbol).0,
                c_names(symbol).1
            ));
        }
        members.push(MemberXfer {
            name: m.name.clone(),
            old: Some(of),
            new: Some(n),
            init: 0,
            by_c: false,
        });
    }
    for o in &old.members {
        if !new.members.iter().any(|m| m.name == o.name) {
            members.push(MemberXfer {
                name: o.name.clone(),
                old: Some(field(o).map_err(|e| format!("{symbol}: {e}"))?),
                new: None,
                init: 0,
                by_c: declared.c.is_some(),
            });
        }
    }
    for (name, _) in &declared.init {
        if !members.iter().any(|x| &x.name == name && x.old.is_none()) {
            return Err(format!(
                "{symbol}: --init names {name}, which is not a member the patch adds"
            ));
        }
    }
    for name in &declared.narrow {
        if !members.iter().any(|x| &x.name == name) {
            return Err(format!(
                "{symbol}: --narrow names {name}, which is no member"
            ));
        }
    }
    let change = DataChange {
        symbol: symbol.to_owned(),
        symbol_file: None,
        type_name: old.name.clone(),
        count,
        old_size: old.size,
        new_size: new.size,
        members,
        users_left: Vec::new(),
        c: declared.c.clone(),
        repoint: Vec::new(),
    };
    change.check()?;
    Ok(change)
}

/// Functions of `image` whose code refers to `[start, end)`: a memory
/// operand or an immediate inside it (RIP-relative, absolute or
/// sign-extended 32-bit addresses alike). `functions`: (name, address,
/// size). What they are is what keeps the old copy in use.
pub fn users_of(
    image: &symbol_db::KernelImage,
    functions: &[(String, u64, u64)],
    (start, end): (u64, u64),
    elem: u64,
) -> Vec<String> {
    use iced_x86::{Decoder, DecoderOptions, OpKind};
    let inside = |a: u64| a >= start && a < end;
    // An indexed access may start up to an element before the object
    // (`table[i - 1]`: the index plus a displacement before it).
    let indexed = |a: u64| a >= start.saturating_sub(elem) && a < end;
    let mut out = Vec::new();
    for (name, addr, size) in functions {
        let Some(code) = image.read(*addr, *size as usize) else {
            continue;
        };
        let mut d = Decoder::with_ip(64, code, *addr, DecoderOptions::NONE);
        let uses = d.iter().any(|i| {
            (0..i.op_count()).any(|k| match i.op_kind(k) {
                OpKind::Memory => {
                    i.memory_base() == iced_x86::Register::None && inside(i.memory_displacement64())
                        || i.is_ip_rel_memory_operand() && inside(i.ip_rel_memory_address())
                }
                OpKind::Immediate32to64 | OpKind::Immediate64 | OpKind::Immediate32 => {
                    inside(i.immediate(k)) || inside(i.immediate(k) as u32 as i32 as i64 as u64)
                }
                _ => false,
            }) || (i.memory_base() != iced_x86::Register::None
                && i.memory_base() != iced_x86::Register::RIP
                && inside(i.memory_displacement64()))
                || (i.memory_index() != iced_x86::Register::None
                    && indexed(i.memory_displacement64()))
        });
        if uses && !out.contains(name) {
            out.push(name.clone());
        }
    }
    out
}

/// The words of an object at kernel address `start` (its bytes `bytes`)
/// that point into the object itself (a member aimed at another member or
/// element): as `(offset, value)`. A copy of such a word in a new copy
/// would point into the old one.
pub fn self_pointers(bytes: &[u8], start: u64) -> Vec<(u64, u64)> {
    let end = start + bytes.len() as u64;
    words_into(bytes, start, (start, end))
        .map(|(at, v)| (at - start, v))
        .collect()
}

/// The aligned 8-byte words of `bytes` (at address `base`) whose value lies
/// in `[start, end)`: (address, value).
fn words_into(
    bytes: &[u8],
    base: u64,
    (start, end): (u64, u64),
) -> impl Iterator<Item = (u64, u64)> + '_ {
    let first = (base.next_multiple_of(8) - base) as usize;
    (first..bytes.len().saturating_sub(7))
        .step_by(8)
        .filter_map(move |i| {
            let v = u64::from_le_bytes(bytes[i..i + 8].try_into().ok()?);
            (v >= start && v < end).then_some((base + i as u64, v))
        })
}

impl DataChange {
    /// Refuses an object some of whose words (`bytes`, the object at
    /// `start` as it is) point into itself, naming the first and its
    /// member.
    pub fn check_self_pointers(&self, bytes: &[u8], start: u64) -> Result<(), String> {
        let Some(&(off, value)) = self_pointers(bytes, start).first() else {
            return Ok(());
        };
        let within = off % self.old_size;
        let member = self
            .members
            .iter()
            .find(|m| {
                m.old.is_some_and(|f| {
                    within >= u64::from(f.offset) && within < u64::from(f.offset + f.size)
                })
            })
            .map(|m| format!(" (member {})", m.name))
            .unwrap_or_default();
        Err(format!(
            "{}+{off:#x}{member} holds {value:#x}, a pointer into {} itself: in a new copy it \
             would point into the old one, so lucos cannot give the object a new layout",
            self.symbol, self.symbol
        ))
    }
}

/// If the kernel exports `symbol` (`__ksymtab_SYMBOL`), what stays using
/// its old copy: module code, which lucos does not look into for users (a
/// module loaded later could use it too), so such a change never retires.
pub fn exported_user(symbols: &symbol_db::SymbolTable, symbol: &str) -> Option<String> {
    // (A file-local namesake is not what the export names.)
    (symbols.all_named(symbol).len() == 1 && symbols.lookup(&format!("__ksymtab_{symbol}")).is_ok())
        .then(|| format!("modules ({symbol} is exported)"))
}

/// Words of `image`'s data (outside `skip`: kernel text, init memory the
/// kernel freed, the object itself) that hold an address in `[start, end)`:
/// other kernel data pointing into the object (a sysctl table's `.data`, a
/// saved `&obj`). Code following such a pointer uses the old copy forever,
/// so a change with one never retires. Returns the words' addresses.
pub fn data_pointers(
    image: &symbol_db::KernelImage,
    skip: &[(u64, u64)],
    start: u64,
    end: u64,
) -> Vec<u64> {
    words_into(image.bytes(), image.base(), (start, end))
        .map(|(at, _)| at)
        .filter(|&at| !skip.iter().any(|&(a, b)| at >= a && at < b) && !(start..end).contains(&at))
        .collect()
}

fn read_int(b: &[u8], f: &Field) -> i128 {
    let mut v = [0u8; 8];
    let n = f.size.min(8) as usize;
    v[..n].copy_from_slice(&b[f.offset as usize..f.offset as usize + n]);
    let u = u64::from_le_bytes(v);
    if f.signed && n < 8 {
        let shift = 64 - 8 * n as u32;
        i128::from(((u << shift) as i64) >> shift)
    } else if f.signed {
        i128::from(u as i64)
    } else {
        i128::from(u)
    }
}

fn put(to: &Field, from: &Field, src: &[u8], dst: &mut [u8]) {
    let d = to.offset as usize;
    if to.int && from.int {
        let v = read_int(src, from) as u64;
        let v = if to.boolean { u64::from(v != 0) } else { v };
        let n = to.size.min(8) as usize;
        dst[d..d + n].copy_from_slice(&v.to_le_bytes()[..n]);
    } else {
        let s = from.offset as usize;
        let n = to.size.min(from.size) as usize;
        dst[d..d + n].copy_from_slice(&src[s..s + n]);
    }
}

impl DataChange {
    /// Bytes of the old object.
    pub fn old_bytes(&self) -> u64 {
        self.old_size * self.count
    }

    /// Bytes of the new copy.
    pub fn new_bytes(&self) -> u64 {
        self.new_size * self.count
    }

    /// Checks the manifest's numbers against each other (a `.lup` is input).
    pub fn check(&self) -> Result<(), String> {
        let bad = |why: String| Err(format!("data change {}: {why}", self.symbol));
        if self.count == 0 || self.old_size == 0 || self.new_size == 0 {
            return bad("empty".into());
        }
        let too_big = |size: u64| size.checked_mul(self.count).is_none_or(|b| b > 1 << 20);
        if too_big(self.old_size) || too_big(self.new_size) {
            return bad("larger than 1 MiB".into());
        }
        // Members of one layout never overlap (a bitfield would: DWARF gives
        // it its unit's offset and size).
        for layout in [0, 1] {
            let mut spans: Vec<(u32, u32, &str)> = self
                .members
                .iter()
                .filter_map(|m| if layout == 0 { m.old } else { m.new }.map(|f| (f, m)))
                .map(|(f, m)| (f.offset, f.offset.saturating_add(f.size), m.name.as_str()))
                .collect();
            spans.sort_unstable();
            if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
                return bad(format!(
                    "members {} and {} overlap (a bitfield?): lucos cannot transfer them",
                    w[0].2, w[1].2
                ));
            }
        }
        for p in &self.repoint {
            if self.map_offset(p.target).is_none() {
                return bad(format!(
                    "{p} points to byte {:#x}, which has no place in the new layout",
                    p.target
                ));
            }
        }
        if let Some(m) = self.members.iter().find(|m| m.by_c && self.c.is_none()) {
            return bad(format!(
                "member {} is carried by C transfer functions the patch does not have",
                m.name
            ));
        }
        for m in &self.members {
            for (f, size) in [(m.old, self.old_size), (m.new, self.new_size)] {
                if let Some(f) = f {
                    if f.size == 0 || u64::from(f.offset) + u64::from(f.size) > size {
                        return bad(format!("member {} lies outside its struct", m.name));
                    }
                    if f.int && f.size > 8 {
                        return bad(format!(
                            "member {} is an integer of {} bytes",
                            m.name, f.size
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Where byte `off` of the old object is in the new copy: a byte of a
    /// member maps to the same byte of that member in the new layout (what
    /// generic code reaches through a pointer is a member: a sysctl entry's
    /// `.data = &obj.member`; a pointer to an element's start is one to its
    /// first member, and follows it if the patch moves it), the start of an
    /// element whose first member the patch removes to the new element's
    /// start, the end to the end. `None` for a byte of a removed member (or
    /// past a narrowed one's end), padding, or past the end.
    pub fn map_offset(&self, off: u64) -> Option<u64> {
        if off == self.old_bytes() {
            return Some(self.new_bytes());
        }
        let (elem, within) = (off / self.old_size, off % self.old_size);
        if elem >= self.count {
            return None;
        }
        let base = elem * self.new_size;
        let member = self.members.iter().find_map(|m| {
            let o = m.old?;
            let at = within.checked_sub(u64::from(o.offset))?;
            (at < u64::from(o.size)).then_some((m.new, at))
        });
        match member {
            Some((Some(n), at)) if at < u64::from(n.size) => Some(base + u64::from(n.offset) + at),
            Some(_) if within != 0 => None,
            _ if within == 0 => Some(base),
            _ => None,
        }
    }

    /// One element in the new layout, from one in the old (old→new).
    pub fn to_new(&self, old: &[u8], new: &mut [u8]) {
        new.fill(0);
        for m in &self.members {
            match (&m.old, &m.new) {
                (Some(_), Some(_)) if m.by_c => {}
                (Some(o), Some(n)) => put(n, o, old, new),
                (None, Some(n)) => {
                    let d = n.offset as usize;
                    let k = n.size.min(8) as usize;
                    new[d..d + k].copy_from_slice(&m.init.to_le_bytes()[..k]);
                }
                _ => {}
            }
        }
    }

    /// One element in the old layout, from one in the new (new→old); the
    /// old element's bytes no member covers (padding, ...) are kept.
    pub fn to_old(&self, new: &[u8], old: &mut [u8]) {
        for m in &self.members {
            if let (Some(o), Some(n), false) = (&m.old, &m.new, m.by_c) {
                put(o, n, new, old);
            }
        }
    }

    /// After an instruction that adds to memory (`add`, `sub`, `inc`,
    /// `dec`, `xadd`) changed `[off, off+len)` of an old element from `was`
    /// to `now`: for each integer member it wrote that the new layout
    /// widens, its new value in the new element as it is (`other`) plus
    /// the difference the instruction made (taken in the old member's
    /// width, signed): (offset in the new element, bytes). A counter the
    /// new code took past what the old member holds keeps its high part
    /// when old code adds to it.
    pub fn carry_added(
        &self,
        was: &[u8],
        now: &[u8],
        other: &[u8],
        off: u64,
        len: u64,
    ) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for m in self.members.iter().filter(|m| !m.by_c) {
            let (Some(o), Some(n)) = (m.old, m.new) else {
                continue;
            };
            let (os, oe) = (u64::from(o.offset), u64::from(o.offset + o.size));
            if !(o.int && n.int && n.size > o.size && os >= off && oe <= off + len) {
                continue;
            }
            let bits = 8 * o.size;
            let diff = (read_int(now, &o) as u64).wrapping_sub(read_int(was, &o) as u64);
            // Sign-extended from the old width: `sub`, `dec` subtract.
            let shift = 64 - bits;
            let diff = ((diff << shift) as i64 >> shift) as u64;
            let value = (read_int(other, &n) as u64).wrapping_add(diff);
            let k = n.size.min(8) as usize;
            out.push((u64::from(n.offset), value.to_le_bytes()[..k].to_vec()));
        }
        out
    }

    /// After `[off, off+len)` of an element changed in one layout (`from_old`:
    /// the old one), what to write in the other: (offset in the element,
    /// bytes), one member each. `elem` is the changed element, whole.
    pub fn mirror(&self, from_old: bool, elem: &[u8], off: u64, len: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for m in &self.members {
            let (from, to) = if from_old {
                (m.old, m.new)
            } else {
                (m.new, m.old)
            };
            let (Some(f), Some(t), false) = (from, to, m.by_c) else {
                continue;
            };
            let (fs, fe) = (u64::from(f.offset), u64::from(f.offset + f.size));
            if fs >= off + len || fe <= off {
                continue;
            }
            let mut buf = vec![0u8; (t.offset + t.size) as usize];
            put(&t, &f, elem, &mut buf);
            out.push((u64::from(t.offset), buf[t.offset as usize..].to_vec()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, offset: u64, size: u64, ty: &str) -> Member {
        Member {
            name: name.into(),
            offset,
            size: Some(size),
            type_name: ty.into(),
            shape: None,
            within: Vec::new(),
        }
    }

    fn layout(size: u64, members: Vec<Member>) -> StructLayout {
        StructLayout {
            name: "task_stat".into(),
            size,
            members,
            unit: "t".into(),
        }
    }

    fn old() -> StructLayout {
        layout(
            24,
            vec![
                m("id", 0, 4, "u32"),
                m("calls", 4, 4, "u32"),
                m("delta", 8, 4, "s32"),
                m("gone", 12, 4, "u32"),
                m("sum", 16, 8, "u64"),
            ],
        )
    }

    fn new() -> StructLayout {
        layout(
            40,
            vec![
                m("id", 0, 4, "u32"),
                m("flags", 4, 4, "u32"),
                m("calls", 8, 8, "u64"),
                m("delta", 16, 8, "s64"),
                m("sum", 24, 8, "u64"),
                m("name", 32, 8, "char [8]"),
            ],
        )
    }

    #[test]
    fn derives_copies_widens_adds_and_drops_by_name() {
        let d = Declared {
            init: vec![("flags".into(), 7)],
            narrow: vec![],
            c: None,
        };
        let c = derive("stats", 2, &old(), &new(), &d).expect("derive");
        c.check().expect("consistent");
        let mut o = vec![0u8; 24];
        o[0..4].copy_from_slice(&5u32.to_le_bytes());
        o[4..8].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        o[8..12].copy_from_slice(&(-3i32).to_le_bytes());
        o[12..16].copy_from_slice(&9u32.to_le_bytes());
        o[16..24].copy_from_slice(&77u64.to_le_bytes());
        let mut n = vec![0xaau8; 40];
        c.to_new(&o, &mut n);
        assert_eq!(u32::from_le_bytes(n[0..4].try_into().expect("4 bytes")), 5);
        assert_eq!(u32::from_le_bytes(n[4..8].try_into().expect("4 bytes")), 7);
        assert_eq!(
            u64::from_le_bytes(n[8..16].try_into().expect("8 bytes")),
            0xffff_fff0
        );
        assert_eq!(
            i64::from_le_bytes(n[16..24].try_into().expect("8 bytes")),
            -3
        );
        assert_eq!(
            u64::from_le_bytes(n[24..32].try_into().expect("8 bytes")),
            77
        );
        assert_eq!(&n[32..40], &[0; 8]);
        // Back: the removed member keeps what the old element had.
        let mut back = o.clone();
        back[4..8].fill(0);
        c.to_old(&n, &mut back);
        assert_eq!(back, o);
        // A write to the old `calls` mirrors to the new `calls` only.
        let w = c.mirror(true, &o, 4, 4);
        assert_eq!(w, vec![(8, 0xffff_fff0u64.to_le_bytes().to_vec())]);
        // A write to the new `flags` (added) mirrors nowhere.
        assert!(c.mirror(false, &n, 4, 4).is_empty());
        // A write to the old `gone` (removed) mirrors nowhere.
        assert!(c.mirror(true, &o, 12, 4).is_empty());
    }

    #[test]
    fn a_pointer_into_the_old_object_maps_by_member_and_element() {
        let mut c = derive("stats", 2, &old(), &new(), &Declared::default()).expect("derive");
        // An element's start: its first member's place.
        assert_eq!(c.map_offset(0), Some(0));
        assert_eq!(c.map_offset(24), Some(40));
        // A member, inside a member, in the second element.
        assert_eq!(c.map_offset(16), Some(24));
        assert_eq!(c.map_offset(24 + 8), Some(40 + 16));
        assert_eq!(c.map_offset(5), Some(9));
        // The end maps to the end.
        assert_eq!(c.map_offset(48), Some(80));
        // A removed member, and past the end: nowhere.
        assert_eq!(c.map_offset(12), None);
        assert_eq!(c.map_offset(49), None);
        // A manifest pointing nowhere is refused by name.
        c.repoint.push(Pointer {
            holder: "table".into(),
            holder_file: None,
            offset: 8,
            target: 12,
        });
        let e = c.check().expect_err("removed member");
        assert!(e.contains("table+0x8") && e.contains("0xc"), "{e}");
        // A member added in front: a pointer to the start follows the first
        // member (`&obj` is `&obj.first`); with the first member removed it
        // is the new element's start.
        let two = |names: &[&str]| {
            let members = names
                .iter()
                .enumerate()
                .map(|(i, n)| m(n, 8 * i as u64, 8, "u64"))
                .collect::<Vec<_>>();
            layout(8 * names.len() as u64, members)
        };
        let moved = derive(
            "lim",
            1,
            &two(&["max", "used"]),
            &two(&["gen", "max", "used"]),
            &Declared::default(),
        )
        .expect("derive");
        assert_eq!(moved.map_offset(0), Some(8));
        assert_eq!(moved.map_offset(8), Some(16));
        let gone = derive(
            "lim",
            1,
            &two(&["max", "used"]),
            &two(&["used"]),
            &Declared::default(),
        )
        .expect("derive");
        assert_eq!(gone.map_offset(0), Some(0));
        assert_eq!(gone.map_offset(3), None);
    }

    #[test]
    fn refuses_what_it_cannot_derive_by_name() {
        let none = Declared::default();
        let mut n = new();
        n.members[2] = m("calls", 8, 2, "u16");
        let e = derive("stats", 1, &old(), &n, &none).expect_err("refused");
        assert!(e.contains("calls narrows"), "{e}");
        let d = Declared {
            init: vec![],
            narrow: vec!["calls".into()],
            c: None,
        };
        derive("stats", 1, &old(), &n, &d).expect("declared narrowing");
        let mut n = new();
        n.members[4] = m("sum", 24, 8, "struct foo *");
        let e = derive("stats", 1, &old(), &n, &none).expect_err("refused");
        assert!(e.contains("sum changes type"), "{e}");
        let mut o = old();
        o.members.push(m("node", 24, 16, "struct list_head"));
        let e = derive("stats", 1, &o, &new(), &none).expect_err("refused");
        assert!(e.contains("node is a list_head"), "{e}");
        let d = Declared {
            init: vec![("calls".into(), 1)],
            narrow: vec![],
            c: None,
        };
        assert!(derive("stats", 1, &old(), &new(), &d).is_err());
        let d = Declared {
            init: vec![("nope".into(), 1)],
            narrow: vec![],
            c: None,
        };
        assert!(derive("stats", 1, &old(), &new(), &d).is_err());
    }

    #[test]
    fn an_addition_by_old_code_to_a_widened_counter_keeps_its_high_part() {
        let ch = derive("stats", 1, &old(), &new(), &Declared::default()).expect("derive");
        // `calls`: u32 at 4 in the old layout, u64 at 8 in the new. New
        // code took it past 2^32; the old copy holds its low half.
        let mut other = vec![0u8; 40];
        other[8..16].copy_from_slice(&0x1_0000_0005u64.to_le_bytes());
        let mut was = vec![0u8; 24];
        was[4..8].copy_from_slice(&5u32.to_le_bytes());
        let mut now = was.clone();
        now[4..8].copy_from_slice(&8u32.to_le_bytes()); // add $3
        let w = ch.carry_added(&was, &now, &other, 4, 4);
        assert_eq!(w, [(8, 0x1_0000_0008u64.to_le_bytes().to_vec())]);
        // A subtraction through zero borrows from the high part.
        now[4..8].copy_from_slice(&u32::MAX.to_le_bytes()); // sub $6
        let w = ch.carry_added(&was, &now, &other, 4, 4);
        assert_eq!(w, [(8, 0xffff_ffffu64.to_le_bytes().to_vec())]);
        // Members not widened, or not written, are the plain mirror's.
        assert!(ch.carry_added(&was, &now, &other, 16, 8).is_empty());
        assert!(ch.carry_added(&was, &now, &other, 0, 4).is_empty());
    }

    /// Guest memory for a tracker: 512 bytes.
    struct Ram(std::sync::Mutex<Vec<u8>>);

    impl vmm_core::guest::PhysMemory for Ram {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), vmm_core::memory::MemoryError> {
            let m = self.0.lock().expect("ram");
            buf.copy_from_slice(&m[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        }
        fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), vmm_core::memory::MemoryError> {
            let mut m = self.0.lock().expect("ram");
            m[gpa as usize..gpa as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }

    #[test]
    fn a_tracked_write_transfers_an_addition_as_one_and_a_store_as_its_value() {
        use vmm_core::guest::PhysMemory;
        let ch = derive("stats", 1, &old(), &new(), &Declared::default()).expect("derive");
        let tracker = DataTracker::default();
        tracker.add(Tracked::new("o".into(), ch, 0, 0x100));
        let ram = Ram(std::sync::Mutex::new(vec![0; 512]));
        // The new copy's `calls` (u64 at 8) is past 2^32; old code added 3
        // to the old copy's (u32 at 4): 5 -> 8.
        ram.write_phys(0x108, &0x1_0000_0005u64.to_le_bytes())
            .expect("w");
        ram.write_phys(4, &8u32.to_le_bytes()).expect("w");
        tracker
            .transfer("o", 4, 4, Some(&5u32.to_le_bytes()), &ram)
            .expect("transfer");
        assert_eq!(ram.read_u64_phys(0x108).expect("r"), 0x1_0000_0008);
        // A plain store (no bytes before): its value.
        ram.write_phys(4, &2u32.to_le_bytes()).expect("w");
        tracker.transfer("o", 4, 4, None, &ram).expect("transfer");
        assert_eq!(ram.read_u64_phys(0x108).expect("r"), 2);
    }

    #[test]
    fn an_object_pointing_into_itself_is_refused_naming_the_member() {
        let base = 0xffff_ffff_8100_0040u64;
        let ch = derive("stats", 2, &old(), &new(), &Declared::default()).expect("derive");
        let mut bytes = vec![0u8; 48];
        // A pointer elsewhere, and one just past the end: not into it.
        bytes[16..24].copy_from_slice(&0xffff_ffff_8200_0000u64.to_le_bytes());
        bytes[40..48].copy_from_slice(&(base + 48).to_le_bytes());
        ch.check_self_pointers(&bytes, base)
            .expect("no pointer into itself");
        // The second element's `sum` aims at the first element.
        bytes[40..48].copy_from_slice(&(base + 4).to_le_bytes());
        let e = ch.check_self_pointers(&bytes, base).expect_err("refused");
        assert!(
            e.contains("stats+0x28 (member sum) holds 0xffffffff81000044, a pointer into stats"),
            "{e}"
        );
    }

    #[test]
    fn what_a_member_holds_by_value_is_checked_at_any_depth_and_added_ones_must_start_at_zero() {
        // A struct holding a lock two levels down, through typedefs.
        let mut held = m("guard", 24, 8, "struct guard");
        held.within = vec![
            "struct guard".into(),
            "spinlock_t".into(),
            "struct spinlock".into(),
            "struct raw_spinlock".into(),
        ];
        let mut o = old();
        o.members.push(held.clone());
        o.size = 32;
        let mut n = new();
        n.members.push(m("guard", 40, 8, "struct guard"));
        n.size = 48;
        let e = derive("stats", 1, &o, &n, &Declared::default()).expect_err("refused");
        assert!(
            e.contains("member guard (struct guard) holds a spinlock (spinlock_t)"),
            "{e}"
        );
        // A reference count by its typedef's name.
        let mut o = old();
        let mut r = m("refs", 24, 4, "refcount_t");
        r.within = vec!["refcount_t".into(), "struct refcount_struct".into()];
        o.members.push(r);
        o.size = 28;
        let e = derive("stats", 1, &o, &new(), &Declared::default()).expect_err("refused");
        assert!(
            e.contains("member refs (refcount_t) holds a refcount_struct"),
            "{e}"
        );
        // Added: a lock starts unlocked as zero bytes, a list head does not.
        let mut n = new();
        let mut lock = m("lock", 40, 4, "spinlock_t");
        lock.within = vec!["spinlock_t".into(), "struct spinlock".into()];
        n.members.push(lock);
        n.size = 48;
        derive("stats", 1, &old(), &n, &Declared::default()).expect("an added lock");
        // A pointer to a list head (or to a mutex) is a word: it starts NULL.
        let mut n = new();
        n.members.push(m("next", 40, 8, "struct list_head *"));
        n.size = 48;
        derive("stats", 1, &old(), &n, &Declared::default()).expect("an added pointer");
        let mut n = new();
        let mut q = m("queue", 40, 16, "struct waiters");
        q.within = vec!["struct waiters".into(), "struct list_head".into()];
        n.members.push(q);
        n.size = 56;
        let e = derive("stats", 1, &old(), &n, &Declared::default()).expect_err("refused");
        assert!(
            e.contains("adds member queue (struct waiters) holding a list_head"),
            "{e}"
        );
    }

    #[test]
    fn a_struct_member_whose_type_is_laid_out_anew_is_not_copied_as_bytes() {
        let with = |at: u64, shape: &str| {
            let mut r = m("range", at, 16, "struct range");
            r.shape = Some(shape.into());
            r
        };
        let (was, now) = ("{lo@0:8,hi@8:8}", "{hi@0:8,lo@8:8}");
        let mut o = old();
        o.members.push(with(24, was));
        o.size = 40;
        let mut n = new();
        n.members.push(with(40, was));
        n.size = 56;
        let same = derive("stats", 1, &o, &n, &Declared::default()).expect("same shape");
        assert!(same.members.iter().any(|x| x.name == "range" && !x.by_c));
        n.members[6] = with(40, now);
        let e = derive("stats", 1, &o, &n, &Declared::default()).expect_err("reshaped");
        assert!(
            e.contains("member range keeps its type struct range but the patch lays that type")
                && e.contains(was)
                && e.contains(now)
                && e.contains("lucos_to_new_stats"),
            "{e}"
        );
        let d = Declared {
            c: Some(CTransfer {
                object: "p.o".into(),
                to_new: c_names("stats").0,
                to_old: c_names("stats").1,
            }),
            ..Declared::default()
        };
        let ch = derive("stats", 1, &o, &n, &d).expect("with C");
        assert!(ch.members.iter().any(|x| x.name == "range" && x.by_c));
    }

    #[test]
    fn with_c_functions_renamed_and_retyped_members_go_to_c() {
        let c = CTransfer {
            object: "p.o".into(),
            to_new: c_names("stats").0,
            to_old: c_names("stats").1,
        };
        let mut n = new();
        n.members[4] = m("total", 24, 8, "u64"); // `sum` renamed
        n.members[5] = m("name", 32, 8, "struct foo *"); // was char [8]... added anyway
        let mut o = old();
        o.members.push(m("name", 24, 8, "char [8]"));
        o.size = 32;
        let none = Declared::default();
        let e = derive("stats", 1, &o, &n, &none).expect_err("a type change without C");
        assert!(e.contains("lucos_to_new_stats"), "{e}");
        let d = Declared {
            c: Some(c.clone()),
            ..Declared::default()
        };
        let ch = derive("stats", 1, &o, &n, &d).expect("derive with C");
        assert_eq!(ch.c, Some(c));
        let by_c: Vec<&str> = ch
            .members
            .iter()
            .filter(|x| x.by_c)
            .map(|x| x.name.as_str())
            .collect();
        // flags and total added, name retyped, gone and sum only in the old.
        assert_eq!(by_c, ["flags", "total", "name", "gone", "sum"]);
        // A write to `calls` mirrors as before; C's members do not mirror.
        assert_eq!(ch.mirror(true, &[0; 32], 4, 4).len(), 1);
        assert!(ch.mirror(true, &[0; 32], 16, 8).is_empty());
        // The derived transfer leaves C's members alone.
        let mut nb = vec![0x55u8; 40];
        ch.to_new(&[1; 32], &mut nb);
        assert_eq!(&nb[24..40], &[0; 16], "derived part zeroes, C fills");
    }

    #[test]
    fn data_pointing_into_the_object_is_found_outside_what_is_skipped() {
        let base = 0xffff_ffff_8100_0000u64;
        let mut bytes = vec![0u8; 0x100];
        let obj = base + 0x80;
        // A pointer to the object's second member, one in "text" (skipped),
        // one in the object itself, one just past it.
        bytes[0x10..0x18].copy_from_slice(&(obj + 8).to_le_bytes());
        bytes[0x40..0x48].copy_from_slice(&obj.to_le_bytes());
        bytes[0x88..0x90].copy_from_slice(&obj.to_le_bytes());
        bytes[0xc0..0xc8].copy_from_slice(&(obj + 0x20).to_le_bytes());
        let image = symbol_db::KernelImage::new(base, bytes);
        let skip = [(base + 0x40, base + 0x50)];
        assert_eq!(
            data_pointers(&image, &skip, obj, obj + 0x20),
            vec![base + 0x10]
        );
    }

    #[test]
    fn an_indexed_access_from_an_element_before_the_object_is_a_use() {
        let obj = 0xffff_ffff_8100_0080u64;
        // mov eax, [rax*8 + obj-24]: `table[i - 1]` of 24-byte elements
        // (disp32, sign-extended); then ret.
        let disp = (obj - 24) as u32;
        let mut code = vec![0x8b, 0x04, 0xc5];
        code.extend_from_slice(&disp.to_le_bytes());
        code.push(0xc3);
        let at = 0xffff_ffff_8100_1000u64;
        let len = code.len() as u64;
        let image = symbol_db::KernelImage::new(at, code);
        let f = [("prev_of".to_owned(), at, len)];
        assert_eq!(users_of(&image, &f, (obj, obj + 0x60), 24), ["prev_of"]);
        // Two elements before: another object's.
        assert!(users_of(&image, &f, (obj + 24, obj + 0x60), 24).is_empty());
    }

    #[test]
    fn overlapping_members_such_as_bitfields_are_refused() {
        let mut o = old();
        o.members.push(m("flag", 0, 4, "unsigned int"));
        let e = derive("stats", 1, &o, &new(), &Declared::default()).expect_err("refused");
        assert!(e.contains("overlap"), "{e}");
    }

    #[test]
    fn manifests_with_members_outside_their_struct_are_refused() {
        let mut c = derive("stats", 1, &old(), &new(), &Declared::default()).expect("derive");
        c.members[0].new = Some(Field {
            offset: 39,
            size: 4,
            int: true,
            signed: false,
            boolean: false,
        });
        assert!(c.check().is_err());
    }

    #[test]
    fn a_value_narrowed_into_a_bool_is_0_or_1() {
        // `gone` (u32) becomes a bool, declared: 256 is true, not 0.
        let mut n = new();
        n.members.push(m("gone", 40, 1, "bool"));
        n.size = 48;
        let d = Declared {
            narrow: vec!["gone".into()],
            ..Declared::default()
        };
        let ch = derive("stats", 1, &old(), &n, &d).expect("derive");
        let mut o = vec![0u8; 24];
        o[12..16].copy_from_slice(&256u32.to_le_bytes());
        let mut nb = vec![0u8; 48];
        ch.to_new(&o, &mut nb);
        assert_eq!(nb[40], 1);
        o[12..16].copy_from_slice(&0u32.to_le_bytes());
        ch.to_new(&o, &mut nb);
        assert_eq!(nb[40], 0);
    }
}

/// One data change being tracked: both copies protected, writes to either
/// transferred to the other.
#[derive(Debug)]
pub struct Tracked {
    /// Owner of both copies' protections.
    pub owner: String,
    /// The change.
    pub change: DataChange,
    /// Guest-physical start of the old copy (contiguous).
    pub old_gpa: u64,
    /// Guest-physical start of the new copy (in the patch area).
    pub new_gpa: u64,
    /// Trapped writes transferred.
    pub transfers: std::sync::atomic::AtomicU64,
    /// Nanoseconds spent transferring them.
    pub transfer_ns: std::sync::atomic::AtomicU64,
    /// No old code can use the old copy any more: writes to the new one
    /// are no longer transferred.
    pub retired: std::sync::atomic::AtomicBool,
    /// Since tracking began.
    pub since: std::time::Instant,
    /// Milliseconds from tracking to retirement.
    pub retired_after_ms: std::sync::atomic::AtomicU64,
    /// The patch's C transfer functions, if it has them.
    pub c: Option<std::sync::Arc<crate::transfer::CRunner>>,
    /// Trapped writes whose C transfer failed (the other copy missed them).
    pub failures: std::sync::atomic::AtomicU64,
    /// The patch objects `c` was linked from (what another VMM process
    /// taking the guest over links again).
    pub c_objects: Option<std::sync::Arc<PatchObjects>>,
    /// What held the last retirement check back (a task in old code, a
    /// register holding a pointer into the old copy).
    pub waiting: std::sync::Mutex<Option<String>>,
    /// The last scan of guest memory for pointers into the old copy.
    pub scan: std::sync::Mutex<Option<ScanStats>>,
    /// The retirement's pause, microseconds.
    pub retire_pause_us: std::sync::atomic::AtomicU64,
}

/// The last scan of guest memory for pointers into an old copy before a
/// retirement ([`crate::pointers`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanStats {
    /// Bytes scanned while the guest ran (all of RAM once, then what it
    /// wrote meanwhile).
    pub bytes: u64,
    /// Microseconds that took.
    pub running_us: u64,
    /// Pages scanned again in the pause (written since, or protected);
    /// absent when the pause did not get that far or scanned all of RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_pages: Option<u64>,
}

/// A patch's objects: (name, ELF bytes).
pub type PatchObjects = Vec<(String, Vec<u8>)>;

/// One tracked change as handed to another VMM process (`lucos upgrade`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedState {
    /// Owner of both copies' protections.
    pub owner: String,
    /// The change.
    pub change: DataChange,
    /// Guest-physical start of the old copy.
    pub old_gpa: u64,
    /// Guest-physical start of the new copy.
    pub new_gpa: u64,
    /// Milliseconds since tracking began.
    pub age_ms: u64,
    /// Whether it has retired.
    pub retired: bool,
    /// Milliseconds from tracking to retirement, once retired.
    pub retired_after_ms: u64,
    /// Counters: transfers, their nanoseconds, failures.
    pub counts: [u64; 3],
    /// The patch objects its C transfer functions are linked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c_objects: Option<Vec<(String, Vec<u8>)>>,
}

impl Tracked {
    /// Tracking `change` from now on.
    pub fn new(owner: String, change: DataChange, old_gpa: u64, new_gpa: u64) -> Self {
        Tracked {
            owner,
            change,
            old_gpa,
            new_gpa,
            transfers: Default::default(),
            transfer_ns: Default::default(),
            retired: Default::default(),
            since: std::time::Instant::now(),
            retired_after_ms: Default::default(),
            c: None,
            failures: Default::default(),
            c_objects: None,
            waiting: Default::default(),
            scan: Default::default(),
            retire_pause_us: Default::default(),
        }
    }

    /// With the patch's C transfer functions, linked from `objects`.
    pub fn with_c(
        mut self,
        c: Option<std::sync::Arc<crate::transfer::CRunner>>,
        objects: &[(String, Vec<u8>)],
    ) -> Self {
        if c.is_some() {
            self.c_objects = Some(std::sync::Arc::new(objects.to_vec()));
        }
        self.c = c;
        self
    }
}

/// Live figures of one tracked change (`lucos list`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStats {
    /// `tracking` (both copies kept coherent) or `retired` (only the new
    /// copy is in use).
    pub state: String,
    /// Milliseconds from apply to retirement, once retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_after_ms: Option<u64>,
    /// Trapped writes transferred to the other copy.
    pub transfers: u64,
    /// Time spent in those transfers, nanoseconds.
    pub transfer_ns: u64,
    /// Trapped writes whose C transfer function failed (faulted or ran
    /// past its time limit): each is logged with its cause.
    #[serde(default)]
    pub failures: u64,
    /// While tracking: what held the last retirement check back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// What runs the change's C transfer functions, if it has any:
    /// `interpreter`, or `kvm-sandbox: WHY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c_engine: Option<String>,
    /// The last scan of guest memory for pointers into the old copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<ScanStats>,
    /// The retirement's pause, microseconds, once retired (by this VMM
    /// process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_pause_us: Option<u64>,
}

/// The data changes of one VM being tracked, shared by the patcher (which
/// adds and removes them in switch pauses) and the write policy (which
/// transfers trapped writes).
#[derive(Debug, Default)]
pub struct DataTracker {
    list: std::sync::RwLock<Vec<std::sync::Arc<Tracked>>>,
}

impl DataTracker {
    /// Starts tracking `t` (before the pause that protects its copies).
    pub fn add(&self, t: Tracked) {
        self.list
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(std::sync::Arc::new(t));
    }

    /// Every tracked change, for another VMM process.
    pub fn export(&self) -> Vec<TrackedState> {
        use std::sync::atomic::Ordering::Relaxed;
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|t| TrackedState {
                owner: t.owner.clone(),
                change: t.change.clone(),
                old_gpa: t.old_gpa,
                new_gpa: t.new_gpa,
                age_ms: t.since.elapsed().as_millis() as u64,
                retired: t.retired.load(Relaxed),
                retired_after_ms: t.retired_after_ms.load(Relaxed),
                counts: [
                    t.transfers.load(Relaxed),
                    t.transfer_ns.load(Relaxed),
                    t.failures.load(Relaxed),
                ],
                c_objects: t.c_objects.as_ref().map(|o| o.as_ref().clone()),
            })
            .collect()
    }

    /// Tracks what another VMM process exported (its C transfer functions
    /// linked again here), replacing anything tracked.
    pub fn import(&self, list: &[TrackedState]) -> Result<(), String> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = Vec::with_capacity(list.len());
        for s in list {
            let objects = s.c_objects.clone().unwrap_or_default();
            let c = crate::transfer::CRunner::new(&s.change, &objects)?.map(std::sync::Arc::new);
            let t = Tracked::new(s.owner.clone(), s.change.clone(), s.old_gpa, s.new_gpa)
                .with_c(c, &objects);
            let t = Tracked {
                since: std::time::Instant::now()
                    .checked_sub(std::time::Duration::from_millis(s.age_ms))
                    .unwrap_or_else(std::time::Instant::now),
                ..t
            };
            t.retired.store(s.retired, Relaxed);
            t.retired_after_ms.store(s.retired_after_ms, Relaxed);
            t.transfers.store(s.counts[0], Relaxed);
            t.transfer_ns.store(s.counts[1], Relaxed);
            t.failures.store(s.counts[2], Relaxed);
            out.push(std::sync::Arc::new(t));
        }
        *self.list.write().unwrap_or_else(|e| e.into_inner()) = out;
        Ok(())
    }

    /// The counters of every tracked change (owner; transfers, their
    /// nanoseconds, failures): what moves while the guest runs.
    pub fn counts(&self) -> Vec<(String, [u64; 3])> {
        use std::sync::atomic::Ordering::Relaxed;
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|t| {
                let c = [
                    t.transfers.load(Relaxed),
                    t.transfer_ns.load(Relaxed),
                    t.failures.load(Relaxed),
                ];
                (t.owner.clone(), c)
            })
            .collect()
    }

    /// Sets the counters of tracked changes to `counts` (owner, counters),
    /// as another VMM process had them when it paused.
    pub fn set_counts(&self, counts: &[(String, [u64; 3])]) {
        use std::sync::atomic::Ordering::Relaxed;
        for (owner, c) in counts {
            if let Some(t) = self.get(owner) {
                t.transfers.store(c[0], Relaxed);
                t.transfer_ns.store(c[1], Relaxed);
                t.failures.store(c[2], Relaxed);
            }
        }
    }

    /// Stops tracking `owner`'s change.
    pub fn remove(&self, owner: &str) {
        self.list
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| t.owner != owner);
    }

    /// The C transfer functions of `owner`'s change, if tracked and it has
    /// them.
    pub fn c_runner(&self, owner: &str) -> Option<std::sync::Arc<crate::transfer::CRunner>> {
        self.get(owner).and_then(|t| t.c.clone())
    }

    /// The change `owner` names, if tracked.
    pub fn get(&self, owner: &str) -> Option<std::sync::Arc<Tracked>> {
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|t| t.owner == owner.strip_suffix(OLD_SUFFIX).unwrap_or(owner))
            .cloned()
    }

    /// Marks `owner`'s change retired (its old copy was just released, in
    /// a pause of `pause_us`).
    pub fn retire(&self, owner: &str, pause_us: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(t) = self.get(owner) {
            t.retire_pause_us.store(pause_us, Relaxed);
            t.retired_after_ms
                .store(t.since.elapsed().as_millis() as u64, Relaxed);
            t.retired.store(true, Relaxed);
        }
    }

    /// Whether a trapped write of `owner`'s change failed to transfer (its
    /// copies may differ: it never retires).
    pub fn failed(&self, owner: &str) -> bool {
        self.get(owner)
            .is_some_and(|t| t.failures.load(std::sync::atomic::Ordering::Relaxed) > 0)
    }

    /// Whether `owner`'s change is retired.
    pub fn is_retired(&self, owner: &str) -> bool {
        self.get(owner)
            .is_some_and(|t| t.retired.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Figures of `owner`'s change.
    pub fn stats(&self, owner: &str) -> Option<DataStats> {
        use std::sync::atomic::Ordering::Relaxed;
        self.get(owner).map(|t| DataStats {
            state: if t.retired.load(Relaxed) {
                "retired".into()
            } else {
                "tracking".into()
            },
            retired_after_ms: t
                .retired
                .load(Relaxed)
                .then(|| t.retired_after_ms.load(Relaxed)),
            transfers: t.transfers.load(Relaxed),
            transfer_ns: t.transfer_ns.load(Relaxed),
            failures: t.failures.load(Relaxed),
            waiting: if t.retired.load(Relaxed) {
                None
            } else {
                t.waiting.lock().unwrap_or_else(|e| e.into_inner()).clone()
            },
            c_engine: t.c.as_ref().map(|c| match c.engine() {
                (e, None) => e.to_owned(),
                (e, Some(why)) => format!("{e}: {why}"),
            }),
            scan: t.scan.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            retire_pause_us: Some(t.retire_pause_us.load(Relaxed)).filter(|&us| us > 0),
        })
    }

    /// Notes the last scan of memory for pointers into `owner`'s old copy.
    pub fn scanned(&self, owner: &str, scan: ScanStats) {
        if let Some(t) = self.get(owner) {
            *t.scan.lock().unwrap_or_else(|e| e.into_inner()) = Some(scan);
        }
    }

    /// Notes what held `owner`'s retirement back this time.
    pub fn waiting(&self, owner: &str, why: String) {
        if let Some(t) = self.get(owner) {
            *t.waiting.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    }

    /// After `data` was written at `gpa` in one of `owner`'s copies (the
    /// write is in memory), writes the members it changed into the other
    /// copy. Runs with the owner's write lock held, so writes to the two
    /// copies never interleave.
    pub fn transfer(
        &self,
        owner: &str,
        gpa: u64,
        len: u64,
        before: Option<&[u8]>,
        mem: &dyn vmm_core::guest::PhysMemory,
    ) -> Result<(), String> {
        let t0 = std::time::Instant::now();
        let t = self
            .get(owner)
            .ok_or_else(|| format!("{owner} is not tracked"))?;
        if t.retired.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let c = &t.change;
        let (from_old, base, size, other_base, other_size) =
            if gpa >= t.old_gpa && gpa < t.old_gpa + c.old_bytes() {
                (true, t.old_gpa, c.old_size, t.new_gpa, c.new_size)
            } else if gpa >= t.new_gpa && gpa < t.new_gpa + c.new_bytes() {
                (false, t.new_gpa, c.new_size, t.old_gpa, c.old_size)
            } else {
                return Err(format!("{gpa:#x} is in neither copy of {owner}"));
            };
        let end = (gpa + len).min(base + size * c.count);
        let mut elem = vec![0u8; size as usize];
        let mut other = vec![0u8; other_size as usize];
        let mut i = (gpa - base) / size;
        let mut failed = None;
        while base + i * size < end {
            let at = base + i * size;
            mem.read_phys(at, &mut elem).map_err(|e| e.to_string())?;
            let off = gpa.max(at) - at;
            let n = end.min(at + size) - (at + off);
            let other_at = other_base + i * other_size;
            let mut writes = c.mirror(from_old, &elem, off, n);
            // An instruction that added to a member the new layout widens:
            // what it added goes to the new copy's value, which may be past
            // what the old member can hold.
            if let (true, Some(b)) = (from_old, before) {
                let mut was = elem.clone();
                let from = (at + off - gpa) as usize;
                was[off as usize..(off + n) as usize].copy_from_slice(&b[from..from + n as usize]);
                mem.read_phys(other_at, &mut other)
                    .map_err(|e| e.to_string())?;
                for (to_off, bytes) in c.carry_added(&was, &elem, &other, off, n) {
                    if let Some(w) = writes.iter_mut().find(|w| w.0 == to_off) {
                        w.1 = bytes;
                    }
                }
            }
            for (to_off, bytes) in writes {
                mem.write_phys(other_at + to_off, &bytes)
                    .map_err(|e| e.to_string())?;
            }
            // A C function may compute what it carries from any member, so
            // every write to an element of a change that has one runs it.
            if let Some(runner) = &t.c {
                mem.read_phys(other_at, &mut other)
                    .map_err(|e| e.to_string())?;
                let r = if from_old {
                    runner.to_new(&elem, &mut other)
                } else {
                    runner.to_old(&elem, &mut other)
                };
                match r {
                    Ok(()) => mem
                        .write_phys(other_at, &other)
                        .map_err(|e| e.to_string())?,
                    Err(e) => failed = Some(e),
                }
            }
            i += 1;
        }
        if let Some(e) = failed {
            t.failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(e);
        }
        use std::sync::atomic::Ordering::Relaxed;
        t.transfers.fetch_add(1, Relaxed);
        t.transfer_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        Ok(())
    }
}
