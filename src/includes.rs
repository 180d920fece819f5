//! Which C files of a kernel source tree a header change reaches: the
//! reverse of the `#include` graph of the tree's C files and headers, from
//! the changed headers to every C file that includes one of them, directly
//! or through other headers, kept to C files their folder's Makefile builds.
//!
//! Why this is complete: kbuild compiles each object from one C file with
//! the include paths `arch/x86/include`, `include` and their `uapi`
//! folders (and the file's own folder for `"..."`), plus three headers it
//! forces in (`-include`); a header reaches an object only through an
//! `#include` line of that C file or of a header it includes. Every such
//! line is followed here, whatever `#if` surrounds it, so the set is a
//! superset: the objects are then built, and each kept only if its build
//! read the header (kbuild's dependency list of the object). A header the
//! build forces into every object is refused. Not followed: `#include` of
//! a macro (`#include TRACE_INCLUDE(...)`), used by trace event headers.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use crate::error::CliError;

/// Headers kbuild includes into every object (`-include`).
const FORCED: &[&str] = &[
    "include/linux/compiler-version.h",
    "include/linux/kconfig.h",
    "include/linux/compiler_types.h",
];

/// Folders of the tree that hold no kernel C code for x86.
const SKIP: &[&str] = &[
    "Documentation",
    "LICENSES",
    "samples",
    "scripts",
    "tools",
    "usr",
    ".git",
];

/// Where `<...>` includes are searched, in kbuild's order.
const SYSTEM: &[&str] = &[
    "arch/x86/include",
    "include",
    "arch/x86/include/uapi",
    "include/uapi",
];

/// The `#include` targets of C or header text: (quoted, path).
fn include_lines(text: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim_start();
        let Some(rest) = l.strip_prefix('#') else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix("include") else {
            continue;
        };
        let rest = rest.trim_start();
        let (quoted, close) = match rest.chars().next() {
            Some('"') => (true, '"'),
            Some('<') => (false, '>'),
            _ => continue,
        };
        if let Some(end) = rest[1..].find(close) {
            out.push((quoted, rest[1..1 + end].to_owned()));
        }
    }
    out
}

/// Every C file and header of the tree under `root` (relative paths).
fn sources(root: &Path) -> Result<Vec<String>, CliError> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let dir = root.join(&rel);
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| CliError::io(format!("cannot read {}", dir.display()), e))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = rel.join(&name);
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                let top = rel.as_os_str().is_empty();
                let other_arch = rel == Path::new("arch") && name != "x86";
                let skipped = top && SKIP.contains(&name.as_str());
                if !skipped && !other_arch {
                    dirs.push(path);
                }
            } else if ft.is_file() && (name.ends_with(".c") || name.ends_with(".h")) {
                out.push(path.to_string_lossy().into_owned());
            }
        }
    }
    Ok(out)
}

/// The objects the Makefile (or Kbuild file) of folder `dir` builds into
/// the kernel with the tree `tree`'s configuration: make itself reads the
/// folder's Makefile with the configuration's values, and the composite
/// objects of `obj-y` (`NAME-y`, `NAME-objs`) are expanded. Modules
/// (`obj-m`) are not part of vmlinux.
fn built_objects(root: &Path, tree: &Path, dir: &Path) -> Vec<String> {
    let kbuild = ["Kbuild", "Makefile"]
        .iter()
        .map(|m| root.join(dir).join(m))
        .find(|p| p.exists());
    let Some(kbuild) = kbuild else {
        return Vec::new();
    };
    let d = dir.display();
    let script = format!(
        "include {conf}\nsrctree := {root}\nsrc := {d}\nobj := {d}\ninclude {mk}\n\
         lucos-objs := $(foreach o,$(obj-y),$(if $(strip $($(o:.o=-y)) $($(o:.o=-objs))),\
         $($(o:.o=-y)) $($(o:.o=-objs)),$(o)))\nlucos-print:\n\t@echo $(lucos-objs)\n",
        conf = tree.join("include/config/auto.conf").display(),
        root = root.display(),
        mk = kbuild.display(),
    );
    let out = std::process::Command::new("make")
        .args(["-s", "--no-print-directory", "-f", "-", "lucos-print"])
        .current_dir(root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write as _;
                let _ = stdin.write_all(script.as_bytes());
            }
            child.wait_with_output()
        });
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The C files under `root` that include one of `headers` (relative
/// paths), directly or not, and that their folder's Makefile builds.
pub fn includers(root: &Path, tree: &Path, headers: &[String]) -> Result<Vec<String>, CliError> {
    for h in headers {
        if FORCED.contains(&h.as_str()) {
            return Err(CliError::Refused(format!(
                "the diff changes {h}, which kbuild includes into every object: that is a \
                 change to the whole kernel, not a live patch"
            )));
        }
    }
    let files = sources(root)?;
    let known: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    // Reverse edges: header → the files that include it.
    let mut included_by: HashMap<String, Vec<String>> = HashMap::new();
    for f in &files {
        let Ok(text) = std::fs::read(root.join(f)) else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        let dir = Path::new(f).parent().unwrap_or(Path::new(""));
        for (quoted, inc) in include_lines(&text) {
            let mut targets = Vec::new();
            if quoted {
                let local = normalize(&dir.join(&inc));
                if known.contains(local.as_str()) {
                    targets.push(local);
                }
            }
            if targets.is_empty() {
                // The first system folder that has it; `<asm/x.h>` may also
                // be a generated wrapper of `asm-generic/x.h`.
                if let Some(t) = SYSTEM
                    .iter()
                    .map(|s| format!("{s}/{inc}"))
                    .find(|t| known.contains(t.as_str()))
                {
                    targets.push(t);
                } else if let Some(rest) = inc.strip_prefix("asm/") {
                    let t = format!("include/asm-generic/{rest}");
                    if known.contains(t.as_str()) {
                        targets.push(t);
                    }
                }
            }
            for t in targets {
                included_by.entry(t).or_default().push(f.clone());
            }
        }
    }
    for forced in FORCED {
        if reaches(&included_by, forced, headers) {
            return Err(CliError::Refused(format!(
                "the diff changes a header included by {forced}, which kbuild includes into \
                 every object: that is a change to the whole kernel, not a live patch"
            )));
        }
    }
    let mut folders: HashMap<PathBuf, Vec<String>> = HashMap::new();
    let mut built = |c: &str| -> bool {
        let p = Path::new(c);
        let (Some(dir), Some(stem)) = (p.parent(), p.file_stem()) else {
            return false;
        };
        let objs = folders
            .entry(dir.to_owned())
            .or_insert_with(|| built_objects(root, tree, dir));
        let obj = format!("{}.o", stem.to_string_lossy());
        objs.contains(&obj)
    };
    let mut seen: BTreeSet<String> = headers.iter().cloned().collect();
    let mut queue: VecDeque<String> = headers.iter().cloned().collect();
    let mut out = BTreeSet::new();
    while let Some(h) = queue.pop_front() {
        for f in included_by.get(&h).into_iter().flatten() {
            if !seen.insert(f.clone()) {
                continue;
            }
            if f.ends_with(".c") {
                if built(f) {
                    out.insert(f.clone());
                }
                // A C file included by another one.
                queue.push_back(f.clone());
            } else {
                queue.push_back(f.clone());
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Whether `from` includes one of `headers`, directly or not.
fn reaches(included_by: &HashMap<String, Vec<String>>, from: &str, headers: &[String]) -> bool {
    // Walk forward: invert the reverse map lazily for `from`'s closure.
    let mut includes: HashMap<&str, Vec<&str>> = HashMap::new();
    for (h, by) in included_by {
        for f in by {
            includes.entry(f.as_str()).or_default().push(h.as_str());
        }
    }
    let mut seen = BTreeSet::new();
    let mut stack = vec![from];
    while let Some(f) = stack.pop() {
        if headers.iter().any(|h| h == f) {
            return true;
        }
        if seen.insert(f) {
            stack.extend(includes.get(f).into_iter().flatten().copied());
        }
    }
    false
}

/// `a/b/../c` → `a/c` (no file system access).
fn normalize(p: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::CurDir => {}
            other => parts.push(other.as_os_str().to_string_lossy().into_owned()),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_lines_are_read_as_the_preprocessor_reads_them() {
        let t = "#include <linux/fs.h>\n  #  include \"internal.h\" // x\n#define X\n#include MACRO(x)\n";
        assert_eq!(
            include_lines(t),
            vec![
                (false, "linux/fs.h".to_owned()),
                (true, "internal.h".to_owned())
            ]
        );
        assert_eq!(normalize(Path::new("fs/proc/../x.h")), "fs/x.h");
    }
}
