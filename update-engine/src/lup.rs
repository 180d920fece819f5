//! The `.lup` patch container (docs/lup-format.md).
//!
//! ```text
//! "LUCOSLUP"             8 bytes magic
//! format version         u32 LE (1, 2 with data changes, 3 with C transfer
//!                        functions, 4 with functions of modules, 5 with
//!                        kernel pointers repointed to new copies)
//! manifest length        u32 LE, then the manifest as JSON
//! object count           u32 LE, then per object:
//!   name length u16 LE, name, data length u32 LE, data (relocatable ELF)
//! signature flag         u8: 1 signed, 0 not
//! signature              64 bytes ed25519 over every byte before the flag
//! ```

use std::path::Path;

use ed25519_dalek::{Signature, Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use symbol_db::fixups::{reloc_len, RelocKind};
use symbol_db::KernelIdentity;

use crate::UpdateError;

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// Magic at the start of every `.lup`.
pub const MAGIC: &[u8; 8] = b"LUCOSLUP";
/// The newest container format version this build reads and writes: 5 for
/// a patch whose data changes repoint kernel pointers (a lucos ignoring
/// them would retire a change the kernel still reaches), 4 for
/// a patch that replaces functions of modules, 3 for one whose data changes
/// have C transfer functions, 2 for one with only derived data changes, 1
/// for every other (a lucos that reads an older version refuses a newer
/// patch rather than apply it without what it does not know: a lucos
/// without modules would look a module's function up in vmlinux).
pub const FORMAT_VERSION: u32 = 5;

fn format_version(m: &Manifest) -> u32 {
    if !m.modules.is_empty() {
        4
    } else if m.data.is_empty() {
        1
    } else if m.data.iter().any(|d| !d.repoint.is_empty()) {
        5
    } else if m.data.iter().all(|d| d.c.is_none()) {
        2
    } else {
        3
    }
}

/// A module whose functions a patch replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleTarget {
    /// The module's name, as the kernel knows it (`binfmt_misc`).
    pub name: String,
    /// Hex of the GNU build-id of the `.ko` the patch was built against:
    /// the loaded module must carry the same.
    pub build_id: String,
    /// The patch objects linked against it (its own symbols first, then the
    /// kernel's, then other modules'); every other object is vmlinux's.
    pub objects: Vec<String>,
}

/// One function the patch replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionPatch {
    /// The old function's symbol.
    pub old: String,
    /// Its object file, for a local symbol whose name is not unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_file: Option<String>,
    /// Its size in bytes in the target build.
    pub old_size: u64,
    /// SHA-256 of its bytes in the target build, with the `old_masked`
    /// ranges zeroed (see [`old_code_sha256`]).
    pub old_sha256: String,
    /// Ranges (offset, length) of the function the kernel rewrites at boot
    /// or run time (ftrace, alternatives, return thunks, jump labels, ...):
    /// compared as zeros.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub old_masked: Vec<(u32, u32)>,
    /// Absolute addresses in the function that KASLR moves (offset, kind):
    /// the checker takes the running kernel's slide off them first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub old_relocs: Vec<(u32, RelocKind)>,
    /// The replacement's symbol in the patch object.
    pub new: String,
    /// The object that defines it (patches written before this field: the
    /// global of that name, or the only local one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_object: Option<String>,
    /// The module the old function is in (one of the manifest's
    /// `modules`); none for vmlinux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `object` (a relocatable ELF) without its DWARF (`.debug_*` and the
/// relocations for them): what `lucos build` read the patch's types from,
/// and nothing that applying it uses. A patch object built with the
/// kernel's flags is mostly debug information (a one-function Linux patch:
/// 114 KB, 1.9 KB without), which every apply would read, hash and check
/// the signature of. `None` when the object has a section this rewrite
/// does not know how to carry (it is then kept whole).
pub fn strip_debug(object: &[u8]) -> Option<Vec<u8>> {
    let debug = |name: &[u8]| name.starts_with(b".debug_") || name.starts_with(b".rela.debug_");
    let mut b = object::build::elf::Builder::read(object).ok()?;
    let mut any = false;
    for s in b.sections.iter_mut() {
        if debug(&s.name) {
            s.delete = true;
            any = true;
        }
    }
    if !any {
        return None;
    }
    b.delete_orphans();
    let mut out = Vec::new();
    b.write(&mut out).ok()?;
    // The same sections but the debug ones (the same bytes, but the
    // symbol and string tables'), the same named symbols and relocations.
    use object::{Object, ObjectSection, ObjectSymbol};
    let tables = [&b".symtab"[..], b".strtab", b".shstrtab"];
    let (before, after) = (
        object::File::parse(object).ok()?,
        object::File::parse(&*out).ok()?,
    );
    let sections = |f: &object::File| -> Vec<(Vec<u8>, Vec<u8>)> {
        f.sections()
            .filter(|s| !s.name_bytes().is_ok_and(debug))
            .map(|s| {
                let name = s.name_bytes().unwrap_or_default();
                let data = if tables.contains(&name) || name.starts_with(b".rela") {
                    &[][..]
                } else {
                    s.data().unwrap_or_default()
                };
                (name.to_vec(), data.to_vec())
            })
            .collect()
    };
    let symbols = |f: &object::File| -> Vec<(Vec<u8>, u64, u64)> {
        f.symbols()
            .filter(|s| s.kind() != object::SymbolKind::Section)
            .map(|s| {
                (
                    s.name_bytes().unwrap_or_default().to_vec(),
                    s.address(),
                    s.size(),
                )
            })
            .collect()
    };
    let relocations = |f: &object::File| -> Vec<(u64, Vec<u8>, i64)> {
        let target = |t: object::RelocationTarget| -> Vec<u8> {
            match t {
                object::RelocationTarget::Symbol(i) => f.symbol_by_index(i).ok().map(|s| {
                    match s.section_index().and_then(|x| f.section_by_index(x).ok()) {
                        Some(sec) if s.kind() == object::SymbolKind::Section => {
                            sec.name_bytes().unwrap_or_default().to_vec()
                        }
                        _ => s.name_bytes().unwrap_or_default().to_vec(),
                    }
                }),
                _ => None,
            }
            .unwrap_or_default()
        };
        f.sections()
            .filter(|s| !s.name_bytes().is_ok_and(debug))
            .flat_map(|s| s.relocations())
            .map(|(at, r)| (at, target(r.target()), r.addend()))
            .collect()
    };
    (sections(&before) == sections(&after)
        && symbols(&before) == symbols(&after)
        && relocations(&before) == relocations(&after))
    .then_some(out)
}

/// The hash a patch records for an old function: `code` as the file has it
/// (`slide` 0) or as the running kernel has it (its KASLR slide), with each
/// relocated address moved back to its link-time value and every masked
/// range zeroed. Out-of-range entries are an error, not skipped.
pub fn old_code_sha256(
    code: &[u8],
    masked: &[(u32, u32)],
    relocs: &[(u32, RelocKind)],
    slide: u64,
) -> Result<String, String> {
    let mut c = code.to_vec();
    for &(off, kind) in relocs {
        let at = off as usize;
        let n = reloc_len(kind) as usize;
        let field = c
            .get_mut(at..at + n)
            .ok_or_else(|| format!("relocation at +{off:#x} lies past the function's end"))?;
        match kind {
            RelocKind::Abs64 => {
                let v = u64::from_le_bytes((&*field).try_into().expect("8 bytes"));
                field.copy_from_slice(&v.wrapping_sub(slide).to_le_bytes());
            }
            RelocKind::Abs32 | RelocKind::Inverse32 => {
                let v = u32::from_le_bytes((&*field).try_into().expect("4 bytes"));
                let s = slide as u32;
                let back = if kind == RelocKind::Abs32 {
                    v.wrapping_sub(s)
                } else {
                    v.wrapping_add(s)
                };
                field.copy_from_slice(&back.to_le_bytes());
            }
        }
    }
    for &(off, len) in masked {
        let (a, b) = (off as usize, off as usize + len as usize);
        c.get_mut(a..b)
            .ok_or_else(|| format!("masked range +{off:#x} lies past the function's end"))?
            .fill(0);
    }
    Ok(sha256_hex(&c))
}

/// What a patch is and what it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Patch name (unique per VM; used by revert).
    pub name: String,
    /// What it fixes.
    #[serde(default)]
    pub description: String,
    /// The patch's own version.
    #[serde(default = "one")]
    pub version: u32,
    /// The exact kernel build it is for.
    pub target: KernelIdentity,
    /// Functions it replaces; all switch in the same pause.
    pub functions: Vec<FunctionPatch>,
    /// Patches that must be applied first.
    #[serde(default)]
    pub depends: Vec<String>,
    /// The object files (names in the container) holding the new code.
    pub objects: Vec<String>,
    /// When the switch may happen (`lucos patch --mode` overrides it).
    #[serde(default)]
    pub mode: Mode,
    /// Kernel objects whose layout the patch changes (format version 2; 3
    /// with C transfer functions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<crate::data::DataChange>,
    /// Modules whose functions it replaces (format version 4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<ModuleTarget>,
}

impl Manifest {
    /// The module target `object` (a patch object) is linked against, if
    /// any.
    pub fn module_of_object(&self, object: &str) -> Option<&ModuleTarget> {
        self.modules
            .iter()
            .find(|m| m.objects.iter().any(|o| o == object))
    }
}

/// When a patch's switch may happen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Only when no vCPU and no sleeping task is anywhere in the code the
    /// patch replaces (kpatch's rule): no call mixes old and new code.
    /// Waits (bounded), then refuses, naming who was in it.
    #[default]
    Consistent,
    /// In the first pause where no vCPU or task is inside the bytes being
    /// rewritten (the LUCOS model): new calls take the new code at once,
    /// calls already in old functions finish there. Safe when old and new
    /// code may run side by side (no change of meaning across them).
    Immediate,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Consistent => "consistent",
            Mode::Immediate => "immediate",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "consistent" => Ok(Mode::Consistent),
            "immediate" => Ok(Mode::Immediate),
            _ => Err(format!("'{s}' is not a mode: consistent or immediate")),
        }
    }
}

fn one() -> u32 {
    1
}

/// A `.lup` in memory.
#[derive(Debug, Clone)]
pub struct Lup {
    /// The manifest.
    pub manifest: Manifest,
    /// (name, relocatable ELF) per object.
    pub objects: Vec<(String, Vec<u8>)>,
    /// The signature, if signed.
    pub signature: Option<[u8; 64]>,
    /// The signed bytes (everything before the signature flag).
    signed: Vec<u8>,
}

fn body(manifest: &Manifest, objects: &[(String, Vec<u8>)]) -> Vec<u8> {
    let json = serde_json::to_vec(manifest).unwrap_or_default();
    let mut b = Vec::new();
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&format_version(manifest).to_le_bytes());
    b.extend_from_slice(&(json.len() as u32).to_le_bytes());
    b.extend_from_slice(&json);
    b.extend_from_slice(&(objects.len() as u32).to_le_bytes());
    for (name, data) in objects {
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
    }
    b
}

/// Hex of SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Lup {
    /// A new patch, signed with `key` if given.
    pub fn new(
        manifest: Manifest,
        objects: Vec<(String, Vec<u8>)>,
        key: Option<&SigningKey>,
    ) -> Self {
        let signed = body(&manifest, &objects);
        let signature = key.map(|k| k.sign(&signed).to_bytes());
        Lup {
            manifest,
            objects,
            signature,
            signed,
        }
    }

    /// The container's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.signed.clone();
        match &self.signature {
            Some(sig) => {
                b.push(1);
                b.extend_from_slice(sig);
            }
            None => b.push(0),
        }
        b
    }

    /// Parses a container; `path` names it in errors. Does not verify the
    /// signature (see [`Lup::verify`]).
    pub fn parse(data: &[u8], path: &str) -> Result<Self, UpdateError> {
        let bad = |why: &str| UpdateError::BadLup {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        let mut r = Reader { data, at: 0 };
        if r.take(8).ok_or_else(|| bad("shorter than its header"))? != MAGIC {
            return Err(bad("no LUCOSLUP magic (not a lucos patch)"));
        }
        let version = r.u32().ok_or_else(|| bad("truncated header"))?;
        if version == 0 || version > FORMAT_VERSION {
            return Err(bad(&format!(
                "format version {version}; this lucos reads versions 1 to {FORMAT_VERSION}"
            )));
        }
        let mlen = r.u32().ok_or_else(|| bad("truncated header"))? as usize;
        let json = r.take(mlen).ok_or_else(|| bad("truncated manifest"))?;
        let manifest: Manifest =
            serde_json::from_slice(json).map_err(|e| bad(&format!("bad manifest: {e}")))?;
        if version != format_version(&manifest) {
            return Err(bad(&format!(
                "format version {version} does not match its manifest (data changes: {})",
                manifest.data.len()
            )));
        }
        for d in &manifest.data {
            d.check().map_err(|e| bad(&e))?;
        }
        for f in &manifest.functions {
            if let Some(m) = &f.module {
                if !manifest.modules.iter().any(|t| &t.name == m) {
                    return Err(bad(&format!(
                        "function {} is in module {m}, which the manifest does not name",
                        f.old
                    )));
                }
            }
        }
        for (i, t) in manifest.modules.iter().enumerate() {
            if manifest.modules[..i].iter().any(|x| x.name == t.name) {
                return Err(bad(&format!("module {} is named twice", t.name)));
            }
            if t.name.is_empty() || t.name.len() >= 56 || t.build_id.is_empty() {
                return Err(bad("a module target without a name or build-id"));
            }
            if let Some(o) = t.objects.iter().find(|o| !manifest.objects.contains(o)) {
                return Err(bad(&format!(
                    "module {} names object {o}, which the manifest does not",
                    t.name
                )));
            }
            if manifest.modules[..i]
                .iter()
                .any(|x| x.objects.iter().any(|o| t.objects.contains(o)))
            {
                return Err(bad(&format!(
                    "an object of module {} is another module's too",
                    t.name
                )));
            }
        }
        // A module's replacement is defined by one of that module's objects
        // (else it would be linked against another object's symbols).
        for f in &manifest.functions {
            let object = f.new_object.as_deref();
            let of = object
                .and_then(|o| manifest.module_of_object(o))
                .map(|t| &t.name);
            if f.module.is_some() && (object.is_none() || of != f.module.as_ref()) {
                return Err(bad(&format!(
                    "the replacement of {} is not in an object of its module",
                    f.old
                )));
            }
            if let (None, Some(m)) = (&f.module, of) {
                return Err(bad(&format!(
                    "the replacement of vmlinux's {} is in an object of module {m}",
                    f.old
                )));
            }
        }
        if !manifest.data.is_empty() && !manifest.modules.is_empty() {
            return Err(bad(
                "a patch of modules cannot also change data layouts (not supported yet)",
            ));
        }
        let count = r.u32().ok_or_else(|| bad("truncated object table"))?;
        if count > 64 {
            return Err(bad("too many objects"));
        }
        let mut objects = Vec::new();
        for _ in 0..count {
            let nlen = r.u16().ok_or_else(|| bad("truncated object table"))? as usize;
            let name = r.take(nlen).ok_or_else(|| bad("truncated object name"))?;
            let name =
                String::from_utf8(name.to_vec()).map_err(|_| bad("object name not UTF-8"))?;
            let dlen = r.u32().ok_or_else(|| bad("truncated object table"))? as usize;
            let d = r
                .take(dlen)
                .ok_or_else(|| bad("truncated object (file cut short?)"))?;
            objects.push((name, d.to_vec()));
        }
        let signed = data[..r.at].to_vec();
        let signature = match r
            .take(1)
            .ok_or_else(|| bad("no signature flag (file cut short?)"))?[0]
        {
            0 => None,
            1 => {
                let s = r.take(64).ok_or_else(|| bad("truncated signature"))?;
                let mut sig = [0u8; 64];
                sig.copy_from_slice(s);
                Some(sig)
            }
            _ => return Err(bad("bad signature flag")),
        };
        if r.at != data.len() {
            return Err(bad("trailing bytes after the signature"));
        }
        for o in &manifest.objects {
            if !objects.iter().any(|(n, _)| n == o) {
                return Err(bad(&format!(
                    "manifest names object {o}, which is not in the file"
                )));
            }
        }
        Ok(Lup {
            manifest,
            objects,
            signature,
            signed,
        })
    }

    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<Self, UpdateError> {
        let data = std::fs::read(path).map_err(|source| UpdateError::Io {
            what: format!("cannot read {}", path.display()),
            source,
        })?;
        Self::parse(&data, &path.display().to_string())
    }

    /// Checks the signature against `trusted` keys; returns the key that
    /// signed it.
    pub fn verify(
        &self,
        trusted: &[VerifyingKey],
        path: &str,
    ) -> Result<VerifyingKey, UpdateError> {
        let sig = self
            .signature
            .ok_or_else(|| UpdateError::Unsigned(path.to_owned()))?;
        if trusted.is_empty() {
            return Err(UpdateError::NoTrustedKeys);
        }
        let sig = Signature::from_bytes(&sig);
        trusted
            .iter()
            .find(|k| k.verify(&self.signed, &sig).is_ok())
            .copied()
            .ok_or_else(|| UpdateError::BadSignature(path.to_owned()))
    }

    /// The part of this (verified) patch that covers `modules`, and vmlinux
    /// too when `vmlinux`: their functions and objects only, named `name`
    /// (a patch whose modules are not all loaded is applied in parts).
    pub fn part(&self, name: &str, modules: &[String], vmlinux: bool) -> Lup {
        let m = &self.manifest;
        let keep_object = |o: &str| match m.module_of_object(o) {
            Some(t) => modules.contains(&t.name),
            None => vmlinux,
        };
        let manifest = Manifest {
            name: name.to_owned(),
            functions: m
                .functions
                .iter()
                .filter(|f| match &f.module {
                    Some(x) => modules.contains(x),
                    None => vmlinux,
                })
                .cloned()
                .collect(),
            objects: m
                .objects
                .iter()
                .filter(|o| keep_object(o))
                .cloned()
                .collect(),
            modules: m
                .modules
                .iter()
                .filter(|t| modules.contains(&t.name))
                .cloned()
                .collect(),
            // A module's part stands alone: it is applied when the module
            // loads, whatever else is applied then.
            depends: if vmlinux {
                m.depends.clone()
            } else {
                Vec::new()
            },
            ..m.clone()
        };
        Lup {
            objects: self
                .objects
                .iter()
                .filter(|(n, _)| keep_object(n))
                .cloned()
                .collect(),
            manifest,
            signature: self.signature,
            signed: self.signed.clone(),
        }
    }

    /// Refuses the patch unless it targets the running kernel `running`.
    pub fn check_target(&self, running: &KernelIdentity) -> Result<(), UpdateError> {
        running
            .check_same(
                &self.manifest.target,
                &format!("patch '{}'", self.manifest.name),
            )
            .map_err(|e| UpdateError::WrongKernel {
                patch: self.manifest.name.clone(),
                why: match e {
                    symbol_db::SymbolError::Mismatch { why, .. } => why,
                    other => other.to_string(),
                },
            })
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// Key files: 32 raw bytes, hex-encoded on one line (`KEY` secret,
/// `KEY.pub` public).
pub fn read_key_hex(path: &Path) -> Result<[u8; 32], UpdateError> {
    let text = std::fs::read_to_string(path).map_err(|source| UpdateError::Io {
        what: format!("cannot read key {}", path.display()),
        source,
    })?;
    let t = text.trim();
    let bad = || UpdateError::BadLup {
        path: path.display().to_string(),
        why: "not a lucos key (64 hex digits)".into(),
    };
    if t.len() != 64 {
        return Err(bad());
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(k)
}

/// Hex of a key.
pub fn key_hex(k: &[u8; 32]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Manifest, Vec<(String, Vec<u8>)>) {
        (
            Manifest {
                name: "fix".into(),
                description: "d".into(),
                version: 1,
                target: KernelIdentity {
                    build_id: Some("ab".into()),
                    version: None,
                },
                functions: vec![],
                depends: vec![],
                objects: vec!["a.o".into()],
                mode: Mode::Consistent,
                data: vec![],
                modules: vec![],
            },
            vec![("a.o".into(), vec![1, 2, 3])],
        )
    }

    #[test]
    fn round_trip_sign_verify_and_tamper() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let (m, o) = sample();
        let bytes = Lup::new(m.clone(), o, Some(&key)).to_bytes();
        let lup = Lup::parse(&bytes, "p").expect("parse");
        assert_eq!(lup.manifest, m);
        lup.verify(&[key.verifying_key()], "p").expect("verifies");
        let other = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
        assert!(matches!(
            lup.verify(&[other], "p"),
            Err(UpdateError::BadSignature(_))
        ));
        // Flip one byte of the object: parses, does not verify.
        let mut t = bytes.clone();
        let at = bytes.len() - 66;
        t[at] ^= 1;
        let lup = Lup::parse(&t, "p").expect("parse");
        assert!(matches!(
            lup.verify(&[key.verifying_key()], "p"),
            Err(UpdateError::BadSignature(_))
        ));
        // Cut short: a clear error.
        let e = Lup::parse(&bytes[..bytes.len() - 10], "p").expect_err("cut");
        assert!(e.to_string().contains("truncated signature"), "{e}");
        let e = Lup::parse(b"hello", "p").expect_err("junk");
        assert!(e.to_string().contains("shorter than its header"), "{e}");
    }

    #[test]
    fn unsigned_is_refused() {
        let (m, o) = sample();
        let bytes = Lup::new(m, o, None).to_bytes();
        let lup = Lup::parse(&bytes, "p").expect("parse");
        let k = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        assert!(matches!(
            lup.verify(&[k], "p"),
            Err(UpdateError::Unsigned(_))
        ));
    }

    #[test]
    fn module_targets_make_format_4_and_must_be_consistent() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let (mut m, o) = sample();
        m.functions.push(FunctionPatch {
            old: "bm_status_read".into(),
            old_file: None,
            old_size: 101,
            old_sha256: "00".into(),
            old_masked: vec![(0, 5)],
            old_relocs: vec![],
            new: "bm_status_read".into(),
            new_object: Some("a.o".into()),
            module: Some("binfmt_misc".into()),
        });
        m.modules.push(ModuleTarget {
            name: "binfmt_misc".into(),
            build_id: "5ed3".into(),
            objects: vec!["a.o".into()],
        });
        let bytes = Lup::new(m.clone(), o.clone(), Some(&key)).to_bytes();
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().expect("4")), 4);
        let lup = Lup::parse(&bytes, "p").expect("parse");
        assert_eq!(
            lup.manifest
                .module_of_object("a.o")
                .map(|t| t.name.as_str()),
            Some("binfmt_misc")
        );
        assert!(lup.manifest.module_of_object("b.o").is_none());
        // A lucos that knows format 3 at most refuses it (the header says 4).
        let mut old = bytes.clone();
        old[8..12].copy_from_slice(&3u32.to_le_bytes());
        let e = Lup::parse(&old, "p").expect_err("version");
        assert!(e.to_string().contains("does not match its manifest"), "{e}");
        // A function in a module the manifest does not name.
        let mut bad = m.clone();
        bad.functions[0].module = Some("nfsd".into());
        let e = Lup::parse(&Lup::new(bad, o.clone(), None).to_bytes(), "p").expect_err("unnamed");
        assert!(
            e.to_string()
                .contains("module nfsd, which the manifest does not name"),
            "{e}"
        );
        // A module named twice.
        let mut bad = m.clone();
        bad.modules.push(bad.modules[0].clone());
        let e = Lup::parse(&Lup::new(bad, o, None).to_bytes(), "p").expect_err("twice");
        assert!(e.to_string().contains("named twice"), "{e}");
    }

    #[test]
    fn a_patch_that_repoints_kernel_pointers_is_format_5_and_older_readers_refuse_it() {
        let (mut m, o) = sample();
        let change: crate::data::DataChange = serde_json::from_str(
            r#"{"symbol": "files_stat", "type_name": "files_stat_struct", "count": 1,
                "old_size": 8, "new_size": 16, "users_left": [],
                "members": [
                  {"name": "max", "old": {"offset": 0, "size": 8, "int": true, "signed": false},
                                  "new": {"offset": 8, "size": 8, "int": true, "signed": false}}],
                "repoint": [{"holder": "fs_stat_sysctls", "offset": 72, "target": 0}]}"#,
        )
        .expect("change");
        m.data.push(change.clone());
        let bytes = Lup::new(m.clone(), o.clone(), None).to_bytes();
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().expect("4")), 5);
        let lup = Lup::parse(&bytes, "p").expect("parse");
        assert_eq!(
            lup.manifest.data[0].repoint[0].to_string(),
            "fs_stat_sysctls+0x48"
        );
        // Written as format 2 (what a lucos without repointing reads): refused.
        let mut old = bytes.clone();
        old[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = Lup::parse(&old, "p").expect_err("version");
        assert!(e.to_string().contains("does not match its manifest"), "{e}");
        // Without the pointers it is format 2 again.
        m.data[0].repoint.clear();
        let bytes = Lup::new(m, o, None).to_bytes();
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().expect("4")), 2);
    }

    /// A relocatable object like a patch's: a function calling an external
    /// one, and DWARF sections with relocations into the code.
    fn object_with_debug() -> Vec<u8> {
        use object::write;
        let mut w = write::Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let text = w.add_section(Vec::new(), b".text".to_vec(), object::SectionKind::Text);
        w.append_section_data(text, &[0xe8, 0, 0, 0, 0, 0xc3], 16);
        let f = w.add_symbol(write::Symbol {
            name: b"fix".to_vec(),
            value: 0,
            size: 6,
            kind: object::SymbolKind::Text,
            scope: object::SymbolScope::Linkage,
            weak: false,
            section: write::SymbolSection::Section(text),
            flags: object::SymbolFlags::None,
        });
        let ext = w.add_symbol(write::Symbol {
            name: b"kernel_helper".to_vec(),
            value: 0,
            size: 0,
            kind: object::SymbolKind::Text,
            scope: object::SymbolScope::Unknown,
            weak: false,
            section: write::SymbolSection::Undefined,
            flags: object::SymbolFlags::None,
        });
        let rel = |symbol, addend| write::Relocation {
            offset: 1,
            symbol,
            addend,
            flags: object::RelocationFlags::Elf {
                r_type: object::elf::R_X86_64_PLT32,
            },
        };
        w.add_relocation(text, rel(ext, -4)).expect("reloc");
        for name in [".debug_info", ".debug_line"] {
            let d = w.add_section(
                Vec::new(),
                name.as_bytes().to_vec(),
                object::SectionKind::Debug,
            );
            w.append_section_data(d, &[0u8; 4096], 1);
            let r = write::Relocation {
                offset: 8,
                symbol: f,
                addend: 0,
                flags: object::RelocationFlags::Elf {
                    r_type: object::elf::R_X86_64_64,
                },
            };
            w.add_relocation(d, r).expect("reloc");
        }
        w.write().expect("object")
    }

    #[test]
    fn strip_debug_drops_dwarf_and_keeps_code_symbols_and_relocations() {
        use object::{Object, ObjectSection, ObjectSymbol};
        let with = object_with_debug();
        let without = strip_debug(&with).expect("stripped");
        assert!(
            without.len() + 8192 <= with.len(),
            "{} -> {}",
            with.len(),
            without.len()
        );
        let f = object::File::parse(&*without).expect("an object");
        assert!(f
            .sections()
            .all(|s| !s.name().unwrap_or("").contains("debug")));
        let text = f.section_by_name(".text").expect("text");
        assert_eq!(text.data().expect("data"), [0xe8, 0, 0, 0, 0, 0xc3]);
        let relocs: Vec<_> = text.relocations().collect();
        assert_eq!(relocs.len(), 1);
        let object::RelocationTarget::Symbol(i) = relocs[0].1.target() else {
            panic!("{relocs:?}")
        };
        assert_eq!(
            f.symbol_by_index(i).and_then(|s| s.name()),
            Ok("kernel_helper")
        );
        assert_eq!(relocs[0].1.addend(), -4);
        assert!(f.symbols().any(|s| s.name() == Ok("fix") && s.size() == 6));
        // Nothing to strip: kept as it is (the caller keeps the original).
        assert_eq!(strip_debug(&without), None);
        assert_eq!(strip_debug(b"not an object"), None);
    }
}
