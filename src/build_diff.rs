//! `lucos build --diff`: a live patch from a source diff, without building
//! the kernel. The diff is applied to copies of the files it touches (the
//! source tree stays pristine); each changed `.c` file's object is built as
//! it is and as patched, in the prepared kbuild output tree, with the
//! kernel's exact flags plus function and data sections; the two objects
//! are diffed ([`update_engine::diffobj`]) into patch objects.
//!
//! Builds in one tree take turns (a lock file in it): the patched source
//! sits in the output tree only while its object builds, and the original
//! object is put back, so the next build of that file is a no-op.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use symbol_db::{KernelImage, SymbolTable};
use update_engine::diffobj::{
    clone_unproven, diff_object_with, new_global_variables, undefined_symbols, unproven_clones,
    DiffOptions, KernelSymbols, LineMap, ObjectDiff, StaticUse,
};

use crate::error::CliError;

/// The flags lucos adds to the kernel's: each function and object in a
/// section of its own (fetch-source.sh prepares trees with the same).
const KCFLAGS: &str = "-ffunction-sections -fdata-sections";

/// Headers patch code is built with, found before the kernel's (path under
/// an include directory, text): see guest-kernels/linux/patch-include/.
const PATCH_INCLUDE: &[(&str, &str)] = &[
    (
        "asm/jump_label.h",
        include_str!("../guest-kernels/linux/patch-include/asm/jump_label.h"),
    ),
    (
        "asm/bug.h",
        include_str!("../guest-kernels/linux/patch-include/asm/bug.h"),
    ),
    (
        "asm/uaccess.h",
        include_str!("../guest-kernels/linux/patch-include/asm/uaccess.h"),
    ),
];

/// Writes the [`PATCH_INCLUDE`] headers under `dir` (where one differs) and
/// returns `dir`, for `-I` before the kernel's own include directories.
pub fn write_patch_include(dir: &Path) -> Result<PathBuf, CliError> {
    for (name, text) in PATCH_INCLUDE {
        let to = dir.join(name);
        if std::fs::read(&to).ok().as_deref() != Some(text.as_bytes()) {
            if let Some(d) = to.parent() {
                std::fs::create_dir_all(d)
                    .map_err(|e| CliError::io(format!("cannot make {}", d.display()), e))?;
            }
            std::fs::write(&to, text)
                .map_err(|e| CliError::io(format!("cannot write {}", to.display()), e))?;
        }
    }
    Ok(dir.to_owned())
}

/// The most objects one diff may need built (each twice).
const MAX_OBJECTS: usize = 48;

/// What the diff built: per object file, its diff.
#[derive(Debug)]
pub struct DiffBuild {
    /// (object file, its diff), for objects the diff changed.
    pub objects: Vec<(String, ObjectDiff)>,
    /// The module each object of a module is built into (object file,
    /// module name); the others are vmlinux's.
    pub module_of: Vec<(String, String)>,
    /// Steps and their times, for people.
    pub steps: Vec<(String, f64)>,
    /// The patched build of each object the diff changed (with its DWARF):
    /// where a data change (`--data`) finds its new layout.
    pub patched: Vec<(String, Vec<u8>)>,
}

/// References to the running kernel's symbols, from its vmlinux.
struct Refs<'a>(&'a SymbolTable, Option<&'a KernelImage>);

/// References from an object of a module: the module's own symbols (by
/// name: the patcher finds them in the loaded module's table), then the
/// kernel's.
struct ModuleRefs<'a> {
    module: &'a symbol_db::module::ModuleObject,
    kernel: Refs<'a>,
}

impl KernelSymbols for ModuleRefs<'_> {
    fn reference_used(
        &self,
        name: &str,
        neighbours: &[String],
        uses: &[StaticUse],
    ) -> Option<String> {
        match self.module.defines(name) {
            0 => self.kernel.reference_used(name, neighbours, uses),
            1 => Some(name.to_owned()),
            // Namesakes in the module (`_rs.3` of two of its objects):
            // the one the module's own code of this object refers to, read
            // from the module file's relocation of the same field (its
            // target, less the object's addend, plus the static's offset
            // from the object's symbol), counted among its namesakes.
            _ => uses.iter().find_map(|u| {
                let [f] = self.module.functions_named(&u.func)[..] else {
                    return None;
                };
                let (sec, v) = self.module.reference_at(f.section, f.offset + u.at)?;
                let at = v.wrapping_sub(u.addend as u64).wrapping_add(u.base);
                let i = self.module.namesake_position(name, sec, at)?;
                Some(format!("{name}#{i}"))
            }),
        }
    }

    fn reference(&self, name: &str, neighbours: &[String]) -> Option<String> {
        match self.module.defines(name) {
            0 => self.kernel.reference(name, neighbours),
            1 => Some(name.to_owned()),
            // Namesakes inside one module: not told apart.
            _ => None,
        }
    }
}

impl KernelSymbols for Refs<'_> {
    fn reference_used(
        &self,
        name: &str,
        neighbours: &[String],
        uses: &[StaticUse],
    ) -> Option<String> {
        let mut all = self.0.all_named(name);
        if all.len() < 2 {
            return self.reference(name, neighbours);
        }
        all.sort_by_key(|s| s.addr);
        // The address the kernel's own code of the object uses, read from
        // the field of its relocation in the kernel image.
        if let Some(image) = self.1 {
            for u in uses {
                let Some(f) = self
                    .reference(&u.func, neighbours)
                    .and_then(|spec| self.0.reference(&spec).ok().map(|s| s.addr))
                else {
                    continue;
                };
                let p = f + u.at;
                let Some(field) = image.read(p, 4) else {
                    continue;
                };
                let field = i32::from_le_bytes(field.try_into().expect("4 bytes"));
                // PC-relative: the field is S + A - P; absolute: S + A.
                let from = if u.absolute { 0 } else { p };
                let at = from
                    .wrapping_add(field as i64 as u64)
                    .wrapping_sub(u.addend as u64)
                    .wrapping_add(u.base);
                if let Some(i) = all.iter().position(|s| s.addr == at) {
                    return Some(format!("{name}#{i}"));
                }
            }
        }
        self.reference(name, neighbours)
    }

    fn reference(&self, name: &str, neighbours: &[String]) -> Option<String> {
        let mut all = self.0.all_named(name);
        match all.len() {
            0 => return None,
            1 => return Some(name.to_owned()),
            _ => {}
        }
        all.sort_by_key(|s| s.addr);
        // Namesakes: the one nearest a symbol of the same object that the
        // kernel has only once, of the same kind (code or data).
        let code = |s: &symbol_db::Symbol| s.kind == symbol_db::SymbolKind::Function;
        let anchors: Vec<&symbol_db::Symbol> = neighbours
            .iter()
            .filter(|n| n.as_str() != name)
            .filter_map(|n| match self.0.all_named(n).as_slice() {
                [one] => Some(*one),
                _ => None,
            })
            .collect();
        let (pos, _) = all
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                anchors
                    .iter()
                    .filter(|a| code(a) == code(c))
                    .map(|a| a.addr.abs_diff(c.addr))
                    .min()
                    .map(|d| (i, d))
            })
            .min_by_key(|&(_, d)| d)?;
        Some(format!("{name}#{pos}"))
    }
}

/// Checks that each function `d` replaces, in `object` as the tree builds
/// it, has the bytes module `m`'s file has (relocated fields and rewritten
/// sites of either masked): else the tree is not the source of the
/// module's build, and the patch would be made from other code.
fn same_as_module(
    object: &str,
    built: &[u8],
    m: &symbol_db::module::ModuleObject,
    d: &ObjectDiff,
) -> Result<(), CliError> {
    let ours = symbol_db::module::ModuleObject::parse(built, object)?;
    for (name, _) in &d.changed {
        let reference = d.references.get(name).unwrap_or(name);
        let (Some(a), Some(b)) = (
            ours.functions_named(name).first().copied(),
            m.functions_named(reference).first().copied(),
        ) else {
            continue;
        };
        let (ca, cb) = (ours.code(a), m.code(b));
        let same = match (ca, cb) {
            (Some(x), Some(y)) if x.len() == y.len() => {
                let mut x = x.to_vec();
                let mut y = y.to_vec();
                for (o, l) in ours.masked(a).into_iter().chain(m.masked(b)) {
                    let r = o as usize..(o + l) as usize;
                    x[r.clone()].fill(0);
                    y[r].fill(0);
                }
                x == y
            }
            _ => false,
        };
        if !same {
            return Err(CliError::WrongKernel(format!(
                "{object}: {name} as this tree builds it ({} bytes) is not module {}'s ({} \
                 bytes): the tree is not the source of that module's build",
                a.size, m.name, b.size
            )));
        }
    }
    Ok(())
}

/// The value of `KEY="..."` or `KEY=...` in a config or env file.
fn setting(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_owned())
    })
}

/// The files a unified diff changes (its `+++ b/PATH` lines, one level of
/// prefix dropped, as `patch -p1` does).
pub fn changed_files(diff: &str) -> Result<Vec<String>, CliError> {
    let mut files = Vec::new();
    for l in diff.lines() {
        let Some(p) = l.strip_prefix("+++ ") else {
            continue;
        };
        let p = p.split('\t').next().unwrap_or("").trim();
        if p == "/dev/null" {
            return Err(CliError::Usage(
                "the diff deletes a file: a live patch cannot remove source files".into(),
            ));
        }
        let p = p.split_once('/').map(|x| x.1).unwrap_or(p).to_owned();
        if !files.contains(&p) {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(CliError::Usage(
            "the diff changes no file (is it a unified diff, as `diff -u` or `git diff` write?)"
                .into(),
        ));
    }
    Ok(files)
}

/// Runs make in `tree` for `targets` (in parallel); the compiler's own
/// message on failure. `for_patch`: a build with lucos's headers (`vars`):
/// the objects are removed first and built anew, while kbuild is told not
/// to rebuild for changed command lines (`KBUILD_NOCMDDEP`), so the tree's
/// `prepare` outputs (asm-offsets and the like, whose command lines name
/// the include flags) stay as the kernel's flags built them and the next
/// build with those flags is a no-op.
fn make(tree: &Path, vars: &[String], targets: &[String], for_patch: bool) -> Result<(), CliError> {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cmd = Command::new("make");
    cmd.arg("-s")
        .arg(format!("-j{jobs}"))
        .arg("-C")
        .arg(tree)
        .args(vars)
        .arg(format!("KCFLAGS={KCFLAGS}"))
        .args(targets);
    if for_patch {
        for t in targets {
            let _ = std::fs::remove_file(tree.join(t));
        }
        cmd.env("KBUILD_NOCMDDEP", "1");
    } else {
        cmd.env_remove("KBUILD_NOCMDDEP");
    }
    let out = cmd
        .output()
        .map_err(|e| CliError::io("cannot run make (scripts/setup.sh installs it)".into(), e))?;
    if !out.status.success() {
        return Err(CliError::Other(format!(
            "building {} failed:\n{}{}",
            targets.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Removes the patched source (and what was built from it) from the tree,
/// and puts the original object back, however the build ended.
struct Restore {
    remove: Vec<PathBuf>,
    put_back: Vec<(PathBuf, Vec<u8>)>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        for p in &self.remove {
            let _ = std::fs::remove_file(p);
        }
        for (p, bytes) in &self.put_back {
            let _ = std::fs::write(p, bytes);
        }
    }
}

/// Builds the objects `diff_path` changes in the prepared kbuild tree
/// `tree` and diffs them against the running kernel `kernel` (its banner
/// `banner`, its symbols `ksyms`).
pub fn build(
    diff_path: &Path,
    tree: &Path,
    banner: &str,
    ksyms: &SymbolTable,
    image: Option<&KernelImage>,
    modules: &[symbol_db::module::ModuleObject],
    layout_changed: &[String],
) -> Result<DiffBuild, CliError> {
    let mut steps = Vec::new();
    let t0 = Instant::now();
    // make runs in the tree (`-C`) and the patch headers' overlay is named
    // relative to it: a relative tree (`--source ../linux`) must not reach
    // them as written (kbuild would miss lucos's headers and keep the
    // kernel's jump labels and WARN tables).
    let tree = &std::fs::canonicalize(tree).map_err(|e| {
        CliError::Usage(format!(
            "{} is not a prepared kernel build tree: {e} (guest-kernels/linux/fetch-source.sh prepares one)",
            tree.display()
        ))
    })?;
    let diff = std::fs::read_to_string(diff_path)
        .map_err(|e| CliError::io(format!("cannot read {}", diff_path.display()), e))?;
    let files = changed_files(&diff)?;
    let (mut c_files, mut h_files) = (Vec::new(), Vec::new());
    for f in &files {
        match Path::new(f).extension().and_then(|e| e.to_str()) {
            Some("c") => c_files.push(f.clone()),
            Some("h") => h_files.push(f.clone()),
            _ => {
                return Err(CliError::Refused(format!(
                    "the diff changes {f}: only C sources and headers can be live-patched (not \
                     assembler, build files or configuration)"
                )))
            }
        }
    }
    // The tree: prepared, of the running kernel's release, config and compiler.
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| {
            CliError::Usage(format!(
                "{} is not a prepared kernel build tree (no {}: {e}); \
                 guest-kernels/linux/fetch-source.sh prepares one",
                tree.display(),
                p.display()
            ))
        })
    };
    let config = read(tree.join(".config"))?;
    let uts = read(tree.join("include/generated/utsrelease.h"))?;
    let release = uts
        .split('"')
        .nth(1)
        .ok_or_else(|| CliError::Usage(format!("{}: no UTS_RELEASE", tree.display())))?
        .to_owned();
    let cc_text = setting(&config, "CONFIG_CC_VERSION_TEXT").unwrap_or_default();
    if !banner.contains(&format!("Linux version {release} ")) {
        return Err(CliError::WrongKernel(format!(
            "{} is a tree of release {release}; the kernel is '{}'",
            tree.display(),
            banner.trim()
        )));
    }
    // A tree fetch-source.sh made names its Debian source version too.
    if let Some(version) = std::fs::read_to_string(tree.join("lucos-build.env"))
        .ok()
        .and_then(|env| setting(&env, "KERNEL_VERSION"))
    {
        if !banner.contains(&format!(" {version} ")) {
            return Err(CliError::WrongKernel(format!(
                "{} is the source of Debian {version}; the kernel is '{}'",
                tree.display(),
                banner.trim()
            )));
        }
    }
    if cc_text.is_empty() || !banner.contains(&cc_text) {
        return Err(CliError::WrongKernel(format!(
            "{} is configured for the compiler '{cc_text}'; the kernel was built by another: '{}'",
            tree.display(),
            banner.trim()
        )));
    }
    let cc = cc_text
        .split_whitespace()
        .next()
        .unwrap_or("gcc")
        .to_owned();
    let have = Command::new(&cc)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    if have != cc_text {
        return Err(CliError::Usage(format!(
            "the kernel was built with '{cc_text}'; {cc} here is '{}' (scripts/setup.sh test \
             installs the kernel's compiler)",
            if have.is_empty() { "missing" } else { &have }
        )));
    }
    let source = std::fs::canonicalize(tree.join("source")).unwrap_or_else(|_| tree.to_owned());
    steps.push(("check the tree".to_owned(), t0.elapsed().as_secs_f64()));

    // The diff, applied to copies of the files it names.
    let t = Instant::now();
    let scratch = std::env::temp_dir().join(format!("lucos-diff-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let result = (|| -> Result<(), CliError> {
        for f in &files {
            let from = source.join(f);
            let to = scratch.join(f);
            if let Some(d) = to.parent() {
                std::fs::create_dir_all(d)
                    .map_err(|e| CliError::io("cannot make a scratch folder".into(), e))?;
            }
            if from.exists() {
                std::fs::copy(&from, &to)
                    .map_err(|e| CliError::io(format!("cannot read {}", from.display()), e))?;
                let mut perm = std::fs::metadata(&to)
                    .map_err(|e| CliError::io("scratch copy".into(), e))?
                    .permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                perm.set_readonly(false);
                let _ = std::fs::set_permissions(&to, perm);
            }
        }
        let out = Command::new("patch")
            .args([
                "-p1",
                "-s",
                "-N",
                "-r",
                "-",
                "--no-backup-if-mismatch",
                "-d",
            ])
            .arg(&scratch)
            .arg("-i")
            .arg(std::fs::canonicalize(diff_path).unwrap_or_else(|_| diff_path.to_owned()))
            .output()
            .map_err(|e| {
                CliError::io("cannot run patch (scripts/setup.sh installs it)".into(), e)
            })?;
        if !out.status.success() {
            return Err(CliError::Usage(format!(
                "the diff does not apply to {}:\n{}{}",
                source.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(e);
    }
    steps.push(("apply the diff".to_owned(), t.elapsed().as_secs_f64()));

    // The objects to build: the changed C files', and for a changed
    // header every object whose build includes it.
    let t = Instant::now();
    let mut candidates: Vec<String> = c_files.clone();
    if !h_files.is_empty() {
        for c in crate::includes::includers(&source, tree, &h_files)? {
            if !candidates.contains(&c) {
                candidates.push(c);
            }
        }
        steps.push((
            format!(
                "find what includes {} ({} C files built into this config)",
                h_files.join(", "),
                candidates.len() - c_files.len()
            ),
            t.elapsed().as_secs_f64(),
        ));
        if candidates.len() > MAX_OBJECTS {
            return Err(CliError::Refused(format!(
                "the header change reaches {} C files (e.g. {}): lucos build --diff builds at \
                 most {MAX_OBJECTS} objects twice; give the fix as changes to fewer headers, or \
                 to the C files that matter",
                candidates.len(),
                candidates
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }

    // One build at a time in this tree.
    let lock_path = tree.join(".lucos-build.lock");
    let lock = File::create(&lock_path)
        .map_err(|e| CliError::io(format!("cannot create {}", lock_path.display()), e))?;
    // SAFETY: flock(2) on a descriptor this function owns; the lock goes
    // when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(CliError::io(
            format!("cannot lock {}", lock_path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    // Headers found before the kernel's when building patch code (static
    // branches that read their key, WARN without __bug_table, user accesses
    // through the kernel's helpers), in the tree so that switching back and
    // forth does not rewrite them.
    let patch_include = write_patch_include(&tree.join(".lucos/include"))?;
    let nostdinc = format!("-nostdinc -I{}", patch_include.display());
    // The kernel's own flags (its exact code), and with lucos's headers.
    let vars = vec![
        format!("CC={cc}"),
        format!("HOSTCC={cc}"),
        format!("KERNELRELEASE={release}"),
    ];
    let mut lucos_vars = vars.clone();
    lucos_vars.push(format!("NOSTDINC_FLAGS={nostdinc}"));
    let refs = Refs(ksyms, image);
    let overlay = scratch.join(".overlay");
    // (object file, index in `modules`) of objects built into a module.
    let mut module_of: Vec<(String, usize)> = Vec::new();
    type Built = (Vec<(String, ObjectDiff)>, Vec<(String, Vec<u8>)>);
    let result = (|| -> Result<Built, CliError> {
        let obj_of = |c: &str| Path::new(c).with_extension("o");
        let cmd_of = |c: &str| {
            let o = obj_of(c);
            o.with_file_name(format!(
                ".{}.cmd",
                o.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ))
        };
        let targets = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|c| obj_of(c).to_string_lossy().into_owned())
                .collect()
        };
        let t = Instant::now();
        make(tree, &vars, &targets(&candidates), false)?;
        let mut originals = Vec::new();
        for c in &candidates {
            let o = obj_of(c);
            let obj = std::fs::read(tree.join(&o))
                .map_err(|e| CliError::io(format!("cannot read {}", o.display()), e))?;
            let cmd = std::fs::read(tree.join(cmd_of(c))).unwrap_or_default();
            originals.push((c.clone(), obj, cmd));
        }
        steps.push((
            format!("build {} object(s) as they are", candidates.len()),
            t.elapsed().as_secs_f64(),
        ));
        // A header's candidates: those whose build read it.
        let used = |cmd: &[u8], path: &Path| {
            memchr::memmem::find(cmd, path.as_os_str().as_encoded_bytes()).is_some()
        };
        originals.retain(|(c, _, cmd)| {
            c_files.contains(c) || h_files.iter().any(|h| used(cmd, &source.join(h)))
        });
        // Objects of the running kernel only: one the diff names must be;
        // a header's includer that is not (a module, say) is left out.
        let in_kernel = |obj: &[u8]| -> bool {
            let Ok(t) = SymbolTable::from_elf_bytes(obj, "object") else {
                return false;
            };
            let funcs: Vec<&symbol_db::Symbol> = t
                .iter()
                .filter(|s| s.kind == symbol_db::SymbolKind::Function)
                .collect();
            let has = |s: &&&symbol_db::Symbol| !ksyms.all_named(&s.name).is_empty();
            let globals: Vec<&&symbol_db::Symbol> = funcs.iter().filter(|s| s.global).collect();
            if globals.is_empty() {
                !funcs.is_empty() && funcs.iter().filter(has).count() * 2 >= funcs.len()
            } else {
                globals.iter().any(has)
            }
        };
        // Or of a module given with --module: most of its functions are
        // the module's.
        let in_module = |obj: &[u8]| -> Option<usize> {
            let t = SymbolTable::from_elf_bytes(obj, "object").ok()?;
            let funcs: Vec<&symbol_db::Symbol> = t
                .iter()
                .filter(|s| s.kind == symbol_db::SymbolKind::Function)
                .collect();
            modules.iter().position(|m| {
                !funcs.is_empty()
                    && funcs
                        .iter()
                        .filter(|s| !m.functions_named(&s.name).is_empty())
                        .count()
                        * 2
                        >= funcs.len()
            })
        };
        for (c, obj, _) in &originals {
            if let Some(i) = in_module(obj) {
                module_of.push((obj_of(c).to_string_lossy().into_owned(), i));
            } else if c_files.contains(c) && !in_kernel(obj) {
                return Err(CliError::Refused(format!(
                    "{c} is not built into the running kernel (its functions are not in its \
                     symbols): a module (give its .ko with --module), or code of another \
                     configuration"
                )));
            }
        }
        originals.retain(|(c, obj, _)| {
            c_files.contains(c)
                || in_kernel(obj)
                || module_of
                    .iter()
                    .any(|(o, _)| *o == obj_of(c).to_string_lossy())
        });
        let kept: Vec<String> = originals.iter().map(|o| o.0.clone()).collect();

        // Objects with jump labels, WARN/BUG or exception-table entries:
        // built again with lucos's headers, which is the build compared with
        // the patched one. The headers change only those sites; where GCC
        // then chose otherwise (inlining a function or not, a clone's calling
        // convention), the diff and the check below see it. Objects built
        // only because they include a changed header are built so too:
        // lucos's headers may move GCC's choices even in an object without
        // such sites (a comment added to kernel/futex/futex.h changed the
        // register allocation of __do_sys_futex_waitv in syscalls.o, which
        // has none), and such an object should change only where the header
        // does.
        let t = Instant::now();
        let rewritten: Vec<String> = originals
            .iter()
            .filter(|(c, obj, _)| {
                update_engine::diffobj::has_rewritten_tables(obj) || !c_files.contains(c)
            })
            .map(|o| o.0.clone())
            .collect();
        let mut compared: Vec<Vec<u8>> = originals.iter().map(|o| o.1.clone()).collect();
        let mut plain_of: Vec<Option<Vec<u8>>> = vec![None; originals.len()];
        if !rewritten.is_empty() {
            let mut restore = Restore {
                remove: vec![],
                put_back: vec![],
            };
            for (c, obj, cmd) in &originals {
                if rewritten.contains(c) {
                    restore.put_back.push((tree.join(obj_of(c)), obj.clone()));
                    restore.put_back.push((tree.join(cmd_of(c)), cmd.clone()));
                }
            }
            make(tree, &lucos_vars, &targets(&rewritten), true)?;
            for (i, (c, plain, _)) in originals.iter().enumerate() {
                if !rewritten.contains(c) {
                    continue;
                }
                let o = obj_of(c);
                let obj = std::fs::read(tree.join(&o))
                    .map_err(|e| CliError::io(format!("cannot read {}", o.display()), e))?;
                plain_of[i] = Some(plain.clone());
                compared[i] = obj;
            }
            drop(restore);
            steps.push((
                format!(
                    "build {} object(s) as they are, as patch code is built (lucos's headers)",
                    rewritten.len()
                ),
                t.elapsed().as_secs_f64(),
            ));
        }

        // The patched build: changed C files in the output tree (found
        // before the pristine ones); changed headers in an overlay searched
        // first, or beside their C files for a header of a source folder.
        let t = Instant::now();
        let mut restore = Restore {
            remove: vec![],
            put_back: vec![],
        };
        for (c, obj, cmd) in &originals {
            restore.put_back.push((tree.join(obj_of(c)), obj.clone()));
            restore.put_back.push((tree.join(cmd_of(c)), cmd.clone()));
        }
        let mut in_tree: Vec<String> = c_files.clone();
        let mut overlaid = false;
        for h in &h_files {
            if h.starts_with("include/") || h.starts_with("arch/x86/include/") {
                let to = overlay.join(h);
                if let Some(d) = to.parent() {
                    std::fs::create_dir_all(d)
                        .map_err(|e| CliError::io("cannot make the overlay".into(), e))?;
                }
                std::fs::copy(scratch.join(h), &to)
                    .map_err(|e| CliError::io(format!("cannot place {h}"), e))?;
                overlaid = true;
            } else {
                in_tree.push(h.clone());
                // Its includers, from beside it.
                for c in &kept {
                    if !in_tree.contains(c) {
                        in_tree.push(c.clone());
                    }
                }
            }
        }
        for f in &in_tree {
            let from = if files.contains(f) {
                scratch.join(f)
            } else {
                source.join(f)
            };
            restore.remove.push(tree.join(f));
            std::fs::copy(&from, tree.join(f))
                .map_err(|e| CliError::io(format!("cannot place {f} in the tree"), e))?;
        }
        let mut pvars = lucos_vars.clone();
        if overlaid {
            let o = overlay.display();
            pvars.retain(|v| !v.starts_with("NOSTDINC_FLAGS="));
            pvars.push(format!(
                "NOSTDINC_FLAGS={nostdinc} -I{o}/arch/x86/include -I{o}/include \
                 -I{o}/arch/x86/include/uapi -I{o}/include/uapi"
            ));
        }
        make(tree, &pvars, &targets(&kept), true)?;
        let mut patched = Vec::new();
        for (c, _, _) in &originals {
            let o = obj_of(c);
            let obj = std::fs::read(tree.join(&o))
                .map_err(|e| CliError::io(format!("cannot read {}", o.display()), e))?;
            let cmd = std::fs::read(tree.join(cmd_of(c))).unwrap_or_default();
            // The patched build read the patched headers, never the originals.
            for h in &h_files {
                if used(&cmd, &source.join(h)) {
                    return Err(CliError::Other(format!(
                        "{} was built with the original {h}, not the patched one (included \
                         in a way lucos cannot redirect)",
                        o.display()
                    )));
                }
            }
            patched.push(obj);
        }
        drop(restore);
        steps.push((
            format!("build {} object(s) patched", kept.len()),
            t.elapsed().as_secs_f64(),
        ));
        let t = Instant::now();
        // Where the diff moved the lines of each object's C file and of
        // the headers it changed (read once: an object may be diffed twice).
        let text = |p: PathBuf| {
            String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
        };
        let moved_in = |f: &String| LineMap::between(&text(source.join(f)), &text(scratch.join(f)));
        let headers = h_files.iter().map(moved_in).reduce(|a, b| a.and(&b));
        let lines: Vec<Option<LineMap>> = originals
            .iter()
            .map(|(c, _, _)| {
                let own = c_files.contains(c).then(|| moved_in(c));
                match (own, &headers) {
                    (Some(o), Some(h)) => Some(o.and(h)),
                    (o, h) => o.or_else(|| h.clone()),
                }
            })
            .collect();
        // One object's diff; `globals`: new global variables of it that
        // other objects' patch code uses (placed even if nothing else of
        // it changed).
        let diff_one = |i: usize, globals: &[String]| -> Result<(String, ObjectDiff), CliError> {
            let c = &originals[i].0;
            let (original, patched) = (&compared[i], &patched[i]);
            let objs = obj_of(c).to_string_lossy().into_owned();
            // Names of the kernel's own build (where the compared one was
            // built with lucos's headers).
            let own = plain_of[i].as_deref();
            // GCC clones whose calling convention in the kernel cannot be
            // shown (their callers compile otherwise for patch code): the
            // patch takes its own copy, and checks again what that copy
            // calls.
            let mut copies: Vec<String> = Vec::new();
            let lines = lines[i].as_ref();
            let d = loop {
                let opts = DiffOptions {
                    own_copies: &copies,
                    lines,
                    new_globals: globals,
                    layout_changed,
                };
                let d = match module_of.iter().find(|(o, _)| *o == objs) {
                    Some(&(_, m)) => diff_object_with(
                        &objs,
                        original,
                        patched,
                        own,
                        &ModuleRefs {
                            module: &modules[m],
                            kernel: Refs(ksyms, image),
                        },
                        &opts,
                    ),
                    None => diff_object_with(&objs, original, patched, own, &refs, &opts),
                }
                .map_err(|e| CliError::Refused(format!("{objs}: {e}")))?;
                let Some(plain) = &plain_of[i] else { break d };
                let unproven = unproven_clones(&objs, plain, original, &d)
                    .map_err(|e| CliError::Refused(format!("{objs}: {e}")))?;
                let mut more = false;
                for (clone, callers) in unproven {
                    // Only called clones: a copy would not be the kernel's
                    // function where its address is compared.
                    if callers.is_empty() || copies.contains(&clone) {
                        return Err(CliError::Refused(format!(
                            "{objs}: {}",
                            clone_unproven(&clone, &callers)
                        )));
                    }
                    copies.push(clone);
                    more = true;
                }
                if !more {
                    break d;
                }
            };
            // An object of a module: each function it replaces, as this
            // tree builds it, must be the module's (the tree is the source
            // of that build).
            if let Some(&(_, m)) = module_of.iter().find(|(o, _)| *o == objs) {
                let plain = plain_of[i].as_ref().unwrap_or(&originals[i].1);
                same_as_module(&objs, plain, &modules[m], &d)?;
            }
            Ok((objs, d))
        };
        let mut objects = Vec::new();
        let mut builds = Vec::new();
        let mut unchanged = Vec::new();
        for (i, build) in patched.iter().enumerate() {
            let (objs, d) = diff_one(i, &[])?;
            if !d.changed.is_empty() || !d.added.is_empty() {
                builds.push((objs.clone(), build.clone()));
                objects.push((objs, d));
            } else {
                unchanged.push(i);
            }
        }
        // A new global variable used by another object's patch code, whose
        // own object has no other change: that object contributes it.
        let mut wanted: std::collections::BTreeSet<String> = Default::default();
        for (_, d) in &objects {
            wanted.extend(undefined_symbols(&d.object));
        }
        for i in unchanged {
            let globals: Vec<String> = new_global_variables(&compared[i], &patched[i])
                .map_err(|e| CliError::Refused(format!("{}: {e}", originals[i].0)))?
                .into_iter()
                .filter(|g| wanted.contains(g))
                .collect();
            if !globals.is_empty() {
                let (objs, d) = diff_one(i, &globals)?;
                builds.push((objs.clone(), patched[i].clone()));
                objects.push((objs, d));
            }
        }
        steps.push((
            format!("diff {} object(s)", originals.len()),
            t.elapsed().as_secs_f64(),
        ));
        Ok((objects, builds))
    })();
    drop(lock);
    let _ = std::fs::remove_dir_all(&scratch);
    let (objects, patched) = result?;
    if objects.is_empty() {
        return Err(CliError::Refused(
            "no functional change: the diff changes no function's code (comments, \
             formatting, or code the compiler left out)"
                .into(),
        ));
    }
    if objects.iter().all(|(_, d)| d.changed.is_empty()) {
        return Err(CliError::Refused(
            "the diff only adds functions that nothing in the running kernel calls: \
             nothing to switch"
                .into(),
        ));
    }
    let module_of = module_of
        .into_iter()
        .filter(|(o, _)| objects.iter().any(|(x, _)| x == o))
        .map(|(o, i)| (o, modules[i].name.clone()))
        .collect();
    Ok(DiffBuild {
        objects,
        module_of,
        steps,
        patched,
    })
}
