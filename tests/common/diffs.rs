//! Source diffs against the pinned Debian kernel source, for the
//! `lucos build --diff` test and benchmark.

use std::path::Path;
use std::process::Command;

/// The prepared source tree of the guest's kernel build.
pub fn source_tree() -> String {
    let out = Command::new("guest-kernels/linux/fetch-source.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run fetch-source.sh");
    assert!(
        out.status.success(),
        "fetch-source.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A unified diff of `file` (relative to the source tree) with `edit`
/// applied to its text, as `diff -u` writes it with a/ and b/ prefixes.
pub fn make_diff(tree: &str, file: &str, edit: impl FnOnce(&str) -> String) -> String {
    let mut edit = Some(edit);
    make_diffs(tree, &[file], |_, s| (edit.take().expect("one file"))(s))
}

/// A unified diff of several files, each edited by `edit(file, text)`.
pub fn make_diffs(
    tree: &str,
    files: &[&str],
    mut edit: impl FnMut(&str, &str) -> String,
) -> String {
    let dir = std::env::temp_dir().join(format!("lucos-mkdiff-{}", std::process::id()));
    let mut diff = String::new();
    for file in files {
        let src = Path::new(tree).join("source").join(file);
        let old =
            std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let new = edit(file, &old);
        assert_ne!(old, new, "the edit of {file} changed nothing");
        let (a, b) = (dir.join("a").join(file), dir.join("b").join(file));
        for (p, text) in [(&a, &old), (&b, &new)] {
            std::fs::create_dir_all(p.parent().expect("parent")).expect("dir");
            std::fs::write(p, text).expect("write");
        }
        let out = Command::new("diff")
            .args(["-u", &format!("a/{file}"), &format!("b/{file}")])
            .current_dir(&dir)
            .output()
            .expect("diff");
        diff.push_str(&String::from_utf8(out.stdout).expect("utf-8 diff"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    diff
}

/// Replaces exactly one occurrence of `from` in `s`.
pub fn once(s: &str, from: &str, to: &str) -> String {
    assert_eq!(
        s.matches(from).count(),
        1,
        "'{from}' is not in the source once"
    );
    s.replacen(from, to, 1)
}

/// A one-file fix: /proc/cmdline ends with " lucos.diff=1".
pub const CMDLINE_FIX: fn(&str) -> String = |tree| {
    make_diff(tree, "fs/proc/cmdline.c", |s| {
        once(
            s,
            "\tseq_putc(m, '\\n');",
            "\tseq_puts(m, \" lucos.diff=1\\n\");",
        )
    })
};

/// A header change: a new inline in fs/proc/internal.h (included by 23
/// objects), used by /proc/softirqs ("LucosMark: 1").
pub const HEADER_FIX: fn(&str) -> String = |tree| {
    make_diffs(
        tree,
        &["fs/proc/internal.h", "fs/proc/softirqs.c"],
        |f, s| {
            if f.ends_with(".h") {
                once(
                s,
                "static inline struct proc_inode *PROC_I(",
                "#include <linux/seq_file.h>\n\nstatic inline void proc_lucos_mark(struct seq_file *m)\n{\n\tseq_puts(m, \"LucosMark: 1\\n\");\n}\n\nstatic inline struct proc_inode *PROC_I(",
            )
            } else {
                once(
                    s,
                    "\t}\n\treturn 0;\n}",
                    "\t}\n\tproc_lucos_mark(p);\n\treturn 0;\n}",
                )
            }
        },
    )
};
