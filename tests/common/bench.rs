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

/// The 99th percentile of `v` (nearest rank; `v` must not be empty).
#[allow(dead_code)]
pub fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]
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

/// A Linux livepatch module: `defs` (the replacement functions, C) and a
/// `klp_patch` of one `klp_object` (vmlinux) replacing each `(old, new)`.
pub fn klp_module(defs: &str, funcs: &[(&str, String)]) -> String {
    let mut s = String::from(
        "#include <linux/module.h>\n#include <linux/livepatch.h>\n#include <linux/seq_file.h>\n\n",
    );
    s += defs;
    s += "static struct klp_func funcs[] = {\n";
    for (old, new) in funcs {
        s += &format!("\t{{ .old_name = \"{old}\", .new_func = {new} }},\n");
    }
    s += "\t{ }\n};\n\nstatic struct klp_object objs[] = {\n\t{ .funcs = funcs },\n\t{ }\n};\n\n";
    s += "static struct klp_patch patch = {\n\t.mod = THIS_MODULE,\n\t.objs = objs,\n};\n\n";
    s += "static int __init lpb_init(void)\n{\n\treturn klp_enable_patch(&patch);\n}\n\n";
    s += "static void __exit lpb_exit(void)\n{\n}\n\n";
    s += "module_init(lpb_init);\nmodule_exit(lpb_exit);\nMODULE_LICENSE(\"GPL\");\nMODULE_INFO(livepatch, \"Y\");\n";
    s
}

/// A lucos patch source making /proc/sys/kernel/domainname (and hostname)
/// read `step-done-TAG`: the host's signal to a guest workload waiting for
/// it (`until grep -q step-done-TAG /proc/sys/kernel/domainname`).
pub fn step_signal_source(tag: &str) -> String {
    format!(
        "#include <linux/sysctl.h>\n#include <linux/string.h>\n#include <linux/errno.h>\n\n\
         int proc_do_uts_string(struct ctl_table *table, int write, void *buffer, size_t *lenp, loff_t *ppos)\n\
         {{\n\tstatic const char s[] = \"step-done-{tag}\\n\";\n\tsize_t n = sizeof(s) - 1;\n\n\
         \tif (write)\n\t\treturn -EPERM;\n\tif (*ppos) {{\n\t\t*lenp = 0;\n\t\treturn 0;\n\t}}\n\
         \tif (n > *lenp)\n\t\tn = *lenp;\n\tmemcpy(buffer, s, n);\n\t*lenp = n;\n\t*ppos += n;\n\treturn 0;\n}}\n"
    )
}

/// Shell for scenarios: `start_vm MEM` starts VM `b` (2 vCPUs) on the
/// guest kernel with its serial log in `$LOG`; `await TEXT` waits (10 min
/// at most) until `$LOG` has TEXT; `figures` prints the `pause_us`,
/// `total_us`, `tries` and `sleeping_tasks_checked` of the JSON reply in
/// /tmp/o as key=value words, or what it said instead.
pub const SCENARIO_HELPERS: &str = r#"
start_vm() {
  $LUCOS run --vm b --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem $1 \
    --cmdline "console=ttyS0 panic=-1 quiet" --serial-log $LOG --trusted-key $FILES/key.pub --quiet --detach
}
await() {
  w=0
  until grep -q "$1" $LOG; do
    sleep 0.05; w=$((w + 1))
    if [ $w -gt 12000 ]; then echo "@@SCN timeout waiting for $1"; sed 's/^/G| /' $LOG; return 1; fi
  done
}
figures() {
  tr -d ' \n' < /tmp/o | grep -o '"\(pause_us\|total_us\|tries\|sleeping_tasks_checked\|read_us\|verify_us\|modules_us\|resolve_us\|place_us\|plan_us\|relay_us\)":[0-9.]*' | sed 's/"//g; s/:/=/' | tr '\n' ' '
  grep -q '"pause_us"' /tmp/o || tr '\n' ' ' < /tmp/o
}
"#;

/// Builds klptime (guest-kernels/linux/bench/klptime.c), static, into `dir`.
pub fn build_klptime(dir: &std::path::Path) {
    super::linux::run_ok(
        std::process::Command::new("cc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(dir.join("klptime"))
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/guest-kernels/linux/bench/klptime.c"
            )),
    );
}
