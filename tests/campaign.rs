//! Patch campaigns over many test-kernel VMs on /dev/kvm, through the
//! `lucos` binary: waves, the journal surviving a SIGKILL, health checks
//! that stop and roll back, VMs that die mid-wave, bad plans and
//! conflicting campaigns.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::{build_test_patch, p, start, text, RunDir, FIX};
use serde_json::Value;

/// A patch whose new code makes the guest log a kernel warning each time
/// it runs.
const WARN: &str = r#"#include "tk.h"
const char *lucos_version(void)
{
	kprintf("WARNING: CPU: 0 PID: 1 at services.c:1 lucos_version (campaign test)\n");
	return "testkernel 1.0 (warns)";
}
"#;

struct Fleet {
    dir: RunDir,
    d: PathBuf,
}

impl Fleet {
    fn new(name: &str) -> Self {
        let dir = RunDir::new(name);
        let d = dir.0.join("work");
        std::fs::create_dir_all(&d).expect("work dir");
        let f = Self { dir, d };
        f.ok(&["keygen", "-o", p(&f.d.join("key"))]);
        f
    }

    fn ok(&self, args: &[&str]) -> String {
        self.dir.ok(args)
    }

    /// Builds a signed patch of `lucos_version` from `src`.
    fn patch(&self, name: &str, src: &str) -> PathBuf {
        build_test_patch(&self.dir, &self.d, &self.d.join("key"), name, src)
    }

    /// Starts test-kernel VMs `ids`, each running a task that calls the
    /// patched function at every report.
    fn start(&self, ids: &[String], labels: &[&str]) {
        let key = self.d.join("key.pub");
        for id in ids {
            let serial = self.d.join(format!("serial-{id}.log"));
            let mut args = vec![
                "--trusted-key",
                p(&key),
                "--mem",
                "32M",
                "--cmdline",
                "tasks=1 iters=0 mode=user report=20000",
                "--serial-log",
                p(&serial),
            ];
            for l in labels {
                args.extend(["--label", l]);
            }
            start(&self.dir, id, &args);
        }
    }

    fn plan(&self, name: &str, text: &str) -> PathBuf {
        let path = self.d.join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("plan");
        path
    }

    fn campaign(&self, args: &[&str]) -> std::process::Output {
        self.dir.lucos(&[&["campaign"], args].concat())
    }

    fn spawn_campaign(&self, plan: &Path) -> Child {
        Command::new(env!("CARGO_BIN_EXE_lucos"))
            .args(["campaign", "run", "--json", p(plan)])
            .env("LUCOS_RUN_DIR", &self.dir.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lucos campaign run")
    }

    /// The names of the patches applied to `vm`.
    fn patches(&self, vm: &str) -> Vec<String> {
        self.dir.patches(vm)
    }

    fn pauses(&self, vm: &str) -> u64 {
        let out = self.ok(&["status", "--vm", vm, "--json"]);
        let v: Value = serde_json::from_str(&out).expect("status json");
        v["pauses"].as_u64().expect("pauses")
    }

    /// A file the health hook waits on while it exists.
    fn hold(&self) -> PathBuf {
        self.d.join("hold")
    }
}

fn report(o: &std::process::Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("report JSON: {e}\n{}", text(o)))
}

fn journal(plan: &Path) -> Vec<Value> {
    let j = std::fs::read_to_string(format!("{}.journal", plan.display())).expect("journal");
    j.lines()
        .map(|l| serde_json::from_str(l).expect("journal line"))
        .collect()
}

fn events<'a>(j: &'a [Value], event: &str, vm: &str) -> Vec<&'a Value> {
    j.iter()
        .filter(|e| e["event"] == event && e["vm"] == vm)
        .collect()
}

/// Waits (a hang detector, not a speed limit) until `cond`.
fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A health command that, while `hold` exists and the wave is `wave`,
/// says it was reached and waits: the campaign is then in the middle of
/// that wave, VMs patched but not yet journaled as done.
fn hook(f: &Fleet, wave: usize) -> PathBuf {
    let hook = f.d.join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n[ -n \"$LUCOS_VM\" ] || exit 3\nif [ \"$LUCOS_WAVE\" = {wave} ]; then\n  while [ -e '{hold}' ]; do touch '{dir}/reached-'\"$LUCOS_VM\"; sleep 0.05; done\nfi\nexit 0\n",
            hold = f.hold().display(),
            dir = f.d.display()
        ),
    )
    .expect("hook");
    hook
}

fn reached(f: &Fleet) -> usize {
    std::fs::read_dir(&f.d)
        .expect("work dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("reached-"))
        .count()
}

#[test]
fn waves_over_22_vms_survive_a_sigkill_in_wave_two() {
    let f = Fleet::new("campaign-waves");
    let fix = f.patch("fix", FIX);
    let ids: Vec<String> = (0..22).map(|i| format!("web{i:02}")).collect();
    f.start(&ids, &["tier=web"]);
    // One VM outside the plan's targets (no label): never touched.
    f.start(&["db0".to_owned()], &[]);
    let hook = hook(&f, 2);
    let plan = f.plan(
        "waves",
        &format!(
            r#"name = "fix-rollout"
[[patch]]
file = "{fix}"
[targets]
vms = ["web*", "db*"]
labels = {{ tier = "web" }}
[[wave]]
size = 1
[[wave]]
size = "25%"
concurrency = 4
[[wave]]
size = "rest"
concurrency = 4
soak = "1s"
[health]
command = "sh {hook}"
timeout = "10m"
[failure]
action = "rollback-wave"
"#,
            fix = fix.display(),
            hook = hook.display()
        ),
    );
    std::fs::write(f.hold(), "").expect("hold");
    let mut child = f.spawn_campaign(&plan);
    wait_for("a VM of wave 2 in its health check", 600, || {
        reached(&f) > 0
    });
    child.kill().expect("SIGKILL the campaign");
    let _ = child.wait();
    std::fs::remove_file(f.hold()).expect("release the hook");

    let j = journal(&plan);
    let in_flight: Vec<&String> = ids
        .iter()
        .filter(|vm| !events(&j, "begin", vm).is_empty() && events(&j, "done", vm).is_empty())
        .collect();
    assert!(!in_flight.is_empty(), "killed with a VM in flight: {j:#?}");
    let wave1_done = j.iter().filter(|e| e["event"] == "wave-done").count();
    assert_eq!(wave1_done, 1, "killed in wave 2: {j:#?}");

    let status = f.campaign(&["status", "--json", p(&plan)]);
    assert!(status.status.success(), "{}", text(&status));
    assert_eq!(
        report(&status)["outcome"],
        "interrupted",
        "{}",
        text(&status)
    );

    // Run again: it resumes from the journal.
    let o = f.campaign(&["run", "--json", p(&plan)]);
    assert!(o.status.success(), "{}", text(&o));
    let r = report(&o);
    assert_eq!(r["outcome"], "done", "{r:#}");
    let sizes: Vec<usize> = r["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| w["vms"].as_array().expect("vms").len())
        .collect();
    assert_eq!(
        sizes,
        [1, 6, 15],
        "1, then 25% of 22 rounded up, then the rest"
    );
    let vms = r["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 22);
    for v in vms {
        assert_eq!(v["result"], "patched", "{v:#}");
        for c in v["health"].as_array().expect("health") {
            assert_eq!(c["ok"], true, "{v:#}");
        }
        let names: Vec<&str> = v["health"]
            .as_array()
            .expect("health")
            .iter()
            .map(|c| c["check"].as_str().expect("check"))
            .collect();
        assert_eq!(names, ["alive", "log", "patch", "command"]);
    }
    let j = journal(&plan);
    for vm in &ids {
        assert_eq!(f.patches(vm), ["fix"], "{vm}");
        // Begun once and done once, whatever the kill interrupted.
        assert_eq!(events(&j, "begin", vm).len(), 1, "{vm}: {j:#?}");
        let done = events(&j, "done", vm);
        assert_eq!(done.len(), 1, "{vm}: {j:#?}");
        assert_eq!(done[0]["outcome"], "patched");
    }
    for vm in in_flight {
        let d = events(&j, "done", vm);
        assert!(
            d[0]["detail"]
                .as_str()
                .expect("detail")
                .contains("applied by an earlier run"),
            "{vm} was patched by the killed run and not again: {:#}",
            d[0]
        );
    }
    assert!(f.patches("db0").is_empty());
    assert_eq!(
        f.pauses("db0"),
        0,
        "a VM outside the targets is never paused"
    );
    // Once done, running it again changes nothing.
    let again = f.campaign(&["run", "--json", p(&plan)]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(journal(&plan).len(), j.len(), "nothing more journaled");
    // The patch reached the guests.
    for vm in &ids {
        common::cli::wait_lines(
            &f.d.join(format!("serial-{vm}.log")),
            "live-patched",
            1,
            300,
        );
    }
}

#[test]
fn a_health_check_tripped_in_the_canary_rolls_it_back_and_touches_no_other_vm() {
    let f = Fleet::new("campaign-canary");
    let warn = f.patch("warn", WARN);
    let ids: Vec<String> = (0..4).map(|i| format!("vm{i}")).collect();
    f.start(&ids, &[]);
    // The command waits for the patched code to have run (it logs its
    // warning on every call): the log check after the soak then sees it,
    // whatever the machine's speed.
    let plan = f.plan(
        "canary",
        &format!(
            r#"[[patch]]
file = "{warn}"
[targets]
vms = ["vm*"]
[[wave]]
size = 1
soak = "200ms"
[[wave]]
size = "rest"
concurrency = 3
[health]
command = "while ! grep -q warns {d}/serial-$LUCOS_VM.log; do sleep 0.05; done"
timeout = "5m"
"#,
            warn = warn.display(),
            d = f.d.display()
        ),
    );
    let o = f.campaign(&["run", "--json", p(&plan)]);
    assert_eq!(
        o.status.code(),
        Some(8),
        "stopped on a failure: {}",
        text(&o)
    );
    let r = report(&o);
    assert_eq!(r["outcome"], "failed", "{r:#}");
    let failure = r["failure"].as_str().expect("failure");
    assert!(
        failure.contains("wave 1") && failure.contains("vm0"),
        "{failure}"
    );
    assert!(failure.contains("health check log failed"), "{failure}");
    assert!(failure.contains("WARNING"), "{failure}");
    let vms = r["vms"].as_array().expect("vms");
    assert_eq!(vms[0]["vm"], "vm0");
    assert_eq!(vms[0]["result"], "rolled-back", "{r:#}");
    for v in &vms[1..] {
        assert_eq!(v["result"], "pending", "{r:#}");
    }
    assert!(f.patches("vm0").is_empty(), "the canary is rolled back");
    for vm in &ids[1..] {
        assert!(f.patches(vm).is_empty());
        assert_eq!(f.pauses(vm), 0, "{vm} was never touched");
    }
    // A failed campaign stays failed: running it again touches nothing.
    let again = f.campaign(&["run", "--json", p(&plan)]);
    assert_eq!(again.status.code(), Some(8), "{}", text(&again));
    for vm in &ids[1..] {
        assert_eq!(f.pauses(vm), 0);
    }
}

#[test]
fn vms_stopped_or_killed_mid_wave_are_reported_and_the_rest_go_on() {
    let f = Fleet::new("campaign-gone");
    let fix = f.patch("fix", FIX);
    let ids: Vec<String> = (0..4).map(|i| format!("vm{i}")).collect();
    f.start(&ids, &[]);
    let lucos = env!("CARGO_BIN_EXE_lucos");
    // vm0's health command stops vm2 and kills vm3's VMM with SIGKILL
    // (run directory inherited; the VMM's pid is in its lock file).
    let plan = f.plan(
        "gone",
        &format!(
            r#"[[patch]]
file = "{fix}"
[targets]
vms = ["vm0", "vm1", "vm2", "vm3"]
[health]
command = '[ "$LUCOS_VM" != vm0 ] || {{ {lucos} stop --vm vm2 && while [ -e $LUCOS_RUN_DIR/vm2.sock ]; do sleep 0.05; done && kill -9 $(cat $LUCOS_RUN_DIR/vm3.lock); }}'
"#,
            fix = fix.display(),
        ),
    );
    let o = f.campaign(&["run", "--json", p(&plan)]);
    assert!(o.status.success(), "{}", text(&o));
    let r = report(&o);
    assert_eq!(r["outcome"], "done", "{r:#}");
    let result = |vm: &str| {
        r["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .find(|v| v["vm"] == vm)
            .expect("vm")["result"]
            .clone()
    };
    assert_eq!(result("vm2"), "gone", "{r:#}");
    assert_eq!(result("vm3"), "gone", "a VMM killed mid-campaign: {r:#}");
    for vm in ["vm0", "vm1"] {
        assert_eq!(result(vm), "patched", "{r:#}");
        assert_eq!(f.patches(vm), ["fix"]);
    }
}

#[test]
fn bad_plans_and_conflicting_campaigns_are_refused_before_any_vm_is_touched() {
    let f = Fleet::new("campaign-bad");
    let fix = f.patch("fix", FIX);
    let ids: Vec<String> = (0..2).map(|i| format!("vm{i}")).collect();
    f.start(&ids, &[]);
    let good = format!(
        "[[patch]]\nfile = \"{}\"\n[targets]\nvms = [\"vm*\"]\n[[wave]]\nsize = 1\n",
        fix.display()
    );
    let cases: [(&str, String, &str); 5] = [
        (
            "unknown",
            good.replace("size = 1", "size = 1\nsoakk = \"1s\""),
            ":7: unknown field `soakk`",
        ),
        (
            "zero",
            good.replace("size = 1", "size = 0"),
            ":6: wave 1: size 0: a wave needs at least one VM",
        ),
        (
            "glob",
            good.replace("vm*", "web*"),
            ":4: target 'web*' matches no running VM",
        ),
        (
            "missing",
            good.replace("fix.lup", "nothere.lup"),
            "nothere.lup",
        ),
        (
            "notlup",
            good.replace(&fix.display().to_string(), "/etc/hostname"),
            "not a valid .lup",
        ),
    ];
    for (name, plan, want) in cases {
        let path = f.plan(name, &plan);
        let o = f.campaign(&["run", p(&path)]);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{name}: wanted '{want}' in {err}");
        assert!(!Path::new(&format!("{}.journal", path.display())).exists());
    }
    for vm in &ids {
        assert_eq!(f.pauses(vm), 0, "{vm} untouched by bad plans");
    }

    // Two campaigns on the same VMs: the second is refused, naming the VM
    // and the first; abort stops the first, and run resumes it.
    let hook = hook(&f, 1);
    let first = f.plan(
        "first",
        &format!("{good}[health]\ncommand = \"sh {}\"\n", hook.display()),
    );
    std::fs::write(f.hold(), "").expect("hold");
    let child = f.spawn_campaign(&first);
    wait_for("the first campaign's canary", 300, || reached(&f) > 0);
    let second = f.plan("second", &good);
    let o = f.campaign(&["run", p(&second)]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("VM vm0 is in another campaign") && err.contains("first.toml"),
        "{err}"
    );
    let same = f.campaign(&["run", p(&first)]);
    assert_eq!(same.status.code(), Some(4), "{}", text(&same));
    assert!(String::from_utf8_lossy(&same.stderr).contains("already running"));

    let abort = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["campaign", "abort", p(&first)])
        .env("LUCOS_RUN_DIR", &f.dir.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("abort");
    wait_for("the abort marker", 60, || {
        Path::new(&format!("{}.abort", first.display())).exists()
    });
    std::fs::remove_file(f.hold()).expect("release");
    let aborted = child.wait_with_output().expect("first campaign");
    assert_eq!(aborted.status.code(), Some(9), "{}", text(&aborted));
    let a = abort.wait_with_output().expect("abort");
    assert!(a.status.success(), "{}", text(&a));
    assert_eq!(report(&aborted)["outcome"], "aborted");
    assert_eq!(f.patches("vm0"), ["fix"], "the VM in flight finished");
    assert!(
        f.patches("vm1").is_empty(),
        "nothing started after the abort"
    );
    let o = f.campaign(&["run", "--json", p(&first)]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(report(&o)["outcome"], "done");
    for vm in &ids {
        assert_eq!(f.patches(vm), ["fix"]);
    }
}
