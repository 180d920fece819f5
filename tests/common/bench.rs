//! Helpers the Linux-guest benchmarks share.

/// Runs per measurement: `LUCOS_BENCH_RUNS`, default 3.
pub fn runs() -> usize {
    std::env::var("LUCOS_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The number after `key=` in a line of `key=value` words.
pub fn number(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// The replaced functions and the /proc file each one shows; every one is
/// `int NAME(struct seq_file *m, void *v)` behind a single_open file.
pub const FUNCS: [(&str, &str); 10] = [
    ("cmdline_proc_show", "cmdline"),
    ("version_proc_show", "version"),
    ("loadavg_proc_show", "loadavg"),
    ("uptime_proc_show", "uptime"),
    ("meminfo_proc_show", "meminfo"),
    ("show_softirqs", "softirqs"),
    ("show_stat", "stat"),
    ("filesystems_proc_show", "filesystems"),
    ("execdomains_proc_show", "execdomains"),
    ("proc_cgroupstats_show", "cgroups"),
];

/// The replacement body, the same for lucos and livepatch.
pub fn body(file: &str) -> String {
    format!("{{\n\tseq_puts(m, \"lucos-bench {file}\\n\");\n\treturn 0;\n}}\n")
}

/// Replacement functions for `lucos build`: named as the functions they replace.
pub fn lucos_source(n: usize) -> String {
    let mut s = String::from("#include <linux/seq_file.h>\n\n");
    for (f, file) in &FUNCS[..n] {
        s += &format!("int {f}(struct seq_file *m, void *v)\n{}\n", body(file));
    }
    s
}
