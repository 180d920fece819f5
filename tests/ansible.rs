//! The Ansible role of `examples/ansible/` rolling a `lucos campaign` over
//! two "hosts" on this machine, with Debian's ansible-core: each host is a
//! run directory of its own with two test-kernel VMs, reached through
//! Ansible's local connection (CI's container runs no sshd; see the role's
//! README). A good patch ends patched everywhere, host 1 before host 2
//! (`serial`); a patch that trips the health check on host 1 stops the
//! play there, host 1 rolled back by the role, host 2 never touched.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use common::cli::{build_test_patch, p, text, wait_lines, RunDir, FIX};
use serde_json::Value;

/// Both tests start four VMs and an ansible-playbook: one at a time on a
/// 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const HOSTS: [&str; 2] = ["host1", "host2"];
const VMS: [&str; 2] = ["web1", "web2"];

/// web1 runs a task that prints the version string (the patched service's)
/// every 200 calls; web2 idles (`hlt`), so that four VMs leave Ansible's
/// Python some of a 2-core machine.
fn cmdline(vm: &str) -> &'static str {
    if vm == "web1" {
        "tasks=1 report=200"
    } else {
        "tasks=0"
    }
}

/// The campaign both tests run: `fix` on every VM, one VM first, then the
/// rest; the failing one adds `health` and `failure` lines.
fn plan(health: &str, failure: &str) -> String {
    format!(
        r#"name = "ansible-fix"

[[patch]]
file = "fix.lup"
action = "apply"

[targets]
vms = ["web*"]

[[wave]]
size = 1

[[wave]]
size = "rest"
soak = "1s"

[health]
alive = true
log = true
patch = true
{health}
[failure]
action = "{failure}"
"#
    )
}

/// The controller's side (plan, patch, key, inventory, reports, Ansible's
/// own temporary files) and the two hosts' run directories with their VMs.
struct Fleet {
    ctl: RunDir,
    hosts: Vec<RunDir>,
}

impl Fleet {
    /// Builds `fix.lup` beside the plan, writes the plan (and `files`), and
    /// starts web1 and web2 of the test kernel on each host, trusting the key.
    fn new(name: &str, plan_text: &str, files: &[(&str, &str)]) -> Self {
        common::require_kvm();
        require_ansible();
        let ctl = RunDir::new(&format!("ansible-{name}-ctl"));
        let plans = ctl.0.join("plans");
        std::fs::create_dir_all(&plans).expect("plans dir");
        let key = ctl.0.join("key");
        ctl.ok(&["keygen", "-o", p(&key)]);
        build_test_patch(&ctl, &plans, &key, "fix", FIX);
        std::fs::write(plans.join("fix.toml"), plan_text).expect("plan");
        for (f, body) in files {
            let path = plans.join(f);
            std::fs::write(&path, body).expect("plan file");
            set_mode(&path, 0o755);
        }
        let pubkey = ctl.0.join("key.pub");
        let hosts: Vec<RunDir> = HOSTS
            .iter()
            .map(|h| RunDir::new(&format!("ansible-{name}-{h}")))
            .collect();
        for host in &hosts {
            for vm in VMS {
                let serial = host.0.join(format!("{vm}.serial"));
                common::cli::start(
                    host,
                    vm,
                    &[
                        "--vcpus",
                        "1",
                        "--mem",
                        "64M",
                        "--cmdline",
                        cmdline(vm),
                        "--serial-log",
                        p(&serial),
                        "--trusted-key",
                        p(&pubkey),
                    ],
                );
            }
        }
        let fleet = Self { ctl, hosts };
        for h in 0..HOSTS.len() {
            wait_lines(&fleet.serial(h, "web1"), "version testkernel 1.0\n", 1, 60);
        }
        fleet
    }

    /// (host index, VM id) of every VM.
    fn each_vm(&self) -> impl Iterator<Item = (usize, &'static str)> {
        (0..HOSTS.len()).flat_map(|h| VMS.iter().map(move |vm| (h, *vm)))
    }

    fn serial(&self, h: usize, vm: &str) -> PathBuf {
        self.hosts[h].0.join(format!("{vm}.serial"))
    }

    /// Where the role copies the plan on host `h`.
    fn dest(&self, h: usize) -> PathBuf {
        self.ctl.0.join(format!("{}-campaign", HOSTS[h]))
    }

    fn report_path(&self, h: usize) -> PathBuf {
        self.ctl
            .0
            .join("reports")
            .join(format!("{}.json", HOSTS[h]))
    }

    /// Host `h`'s report from the controller's report folder.
    fn report(&self, h: usize) -> Value {
        let path = self.report_path(h);
        let s = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("no report {}: {e}", path.display()));
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("report {}: {e}\n{s}", path.display()))
    }

    /// The names of the patches VM `vm` of host `h` carries.
    fn patches(&self, h: usize, vm: &str) -> Vec<String> {
        self.hosts[h].patches(vm)
    }

    /// `ansible-playbook site.yml` over the two hosts, timed; `files`: the
    /// plan's files the role copies (None: the role's default).
    fn playbook(&self, files: Option<&[&str]>) -> Output {
        let ctl = &self.ctl.0;
        let mut inv = String::from("lucos_hosts:\n  hosts:\n");
        for (h, host) in self.hosts.iter().enumerate() {
            inv += &format!(
                "    {}:\n      lucos_campaign_run_dir: {}\n      lucos_campaign_dest: {}\n",
                HOSTS[h],
                json(p(&host.0)),
                json(p(&self.dest(h)))
            );
        }
        // The local connection: both hosts are this machine.
        inv += "  vars:\n    ansible_connection: local\n";
        inv += "    ansible_python_interpreter: \"{{ ansible_playbook_python }}\"\n";
        inv += &format!(
            "    lucos_campaign_bin: {}\n    lucos_campaign_plan: {}\n    lucos_campaign_report_dir: {}\n    lucos_campaign_poll: 1\n",
            json(env!("CARGO_BIN_EXE_lucos")),
            json(p(&ctl.join("plans/fix.toml"))),
            json(p(&ctl.join("reports"))),
        );
        if let Some(files) = files {
            inv += &format!(
                "    lucos_campaign_files: {}\n",
                serde_json::to_string(files).expect("files")
            );
        }
        let inventory = ctl.join("inventory.yml");
        std::fs::write(&inventory, inv).expect("inventory");
        // Ansible reads no configuration of this machine's and keeps its
        // temporary files (and its async jobs' status) in the test's folder.
        let cfg = ctl.join("ansible.cfg");
        std::fs::write(&cfg, "[defaults]\n").expect("ansible.cfg");
        let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ansible/site.yml");
        let t = Instant::now();
        let o = Command::new("ansible-playbook")
            .arg("-i")
            .arg(&inventory)
            .arg(&site)
            .current_dir(ctl)
            .env("ANSIBLE_CONFIG", &cfg)
            .env("ANSIBLE_HOME", ctl.join("ansible-home"))
            .env("ANSIBLE_LOCAL_TEMP", ctl.join("ansible-tmp"))
            .env("ANSIBLE_REMOTE_TEMP", ctl.join("ansible-remote-tmp"))
            .env("ANSIBLE_ASYNC_DIR", ctl.join("ansible-async"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env_remove("LUCOS_RUN_DIR")
            .output()
            .expect("run ansible-playbook");
        eprintln!("ansible-playbook took {:.1} s", t.elapsed().as_secs_f64());
        o
    }
}

/// Fails loudly without Ansible: this test must not pass by skipping.
fn require_ansible() {
    match Command::new("ansible-playbook").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("ansible-playbook --version failed: {}", text(&o)),
        Err(e) => panic!(
            "this test needs ansible-playbook (Debian's ansible-core; scripts/setup.sh test \
             installs it) and cannot run without it: {e}. It is not skipped on purpose."
        ),
    }
}

/// A string as a YAML (JSON) scalar.
fn json(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|n| n.as_str().expect("patch name"))
        .collect()
}

#[test]
fn rolls_a_campaign_over_two_hosts_one_after_the_other() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = Fleet::new("ok", &plan("", "rollback-wave"), &[]);
    // lucos_campaign_files is left to its default here: every .lup beside
    // the plan.
    let o = fleet.playbook(None);
    assert!(o.status.success(), "ansible-playbook: {}", text(&o));

    for (h, vm) in fleet.each_vm() {
        assert_eq!(
            fleet.patches(h, vm),
            ["fix"],
            "{} {vm} is not patched: {}",
            HOSTS[h],
            text(&o)
        );
    }
    // The guest runs the new code.
    for h in 0..HOSTS.len() {
        wait_lines(
            &fleet.serial(h, "web1"),
            "version testkernel 1.0 (live-patched)\n",
            1,
            60,
        );
    }

    // Each host's JSON report came back to the controller.
    let reports: Vec<Value> = (0..HOSTS.len()).map(|h| fleet.report(h)).collect();
    for (h, r) in reports.iter().enumerate() {
        let c = &r["campaign"];
        assert_eq!(r["host"], HOSTS[h], "{r:#}");
        assert_eq!(r["rc"], 0, "{r:#}");
        assert_eq!(c["outcome"], "done", "{r:#}");
        assert_eq!(c["name"], "ansible-fix", "{r:#}");
        assert!(r["rollback"].is_null(), "{r:#}");
        let vms = c["vms"].as_array().expect("vms");
        let mut ids: Vec<&str> = vms.iter().map(|v| v["vm"].as_str().expect("vm")).collect();
        ids.sort_unstable();
        assert_eq!(ids, VMS, "{r:#}");
        for v in vms {
            assert_eq!(v["result"], "patched", "{r:#}");
            assert!(names(&v["before"]).is_empty(), "{r:#}");
            assert_eq!(names(&v["after"]), ["fix"], "{r:#}");
            assert!(
                v["health"]
                    .as_array()
                    .expect("health")
                    .iter()
                    .all(|c| c["ok"] == true),
                "{r:#}"
            );
        }
    }

    // serial: host 1's campaign had finished before host 2's began, by the
    // role's clock (fixed-width UTC timestamps compare as strings) ...
    let at = |h: usize, k: &str| reports[h][k].as_str().expect("timestamp").to_owned();
    assert!(
        at(0, "finished") < at(1, "started"),
        "host1 {}..{}, host2 {}..{}",
        at(0, "started"),
        at(0, "finished"),
        at(1, "started"),
        at(1, "finished")
    );
    // ... by the campaigns' own clocks ...
    let ms = |h: usize, k: &str| {
        reports[h]["campaign"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {}'s report", HOSTS[h]))
    };
    assert!(
        ms(0, "ended_ms") <= ms(1, "started_ms"),
        "host1's campaign ended at {} ms, host2's started at {} ms",
        ms(0, "ended_ms"),
        ms(1, "started_ms")
    );
    // ... and by the files: host 1's journal was last written before the
    // plan was copied to host 2.
    assert!(
        mtime(&fleet.dest(0).join("fix.toml.journal")) <= mtime(&fleet.dest(1).join("fix.toml")),
        "host1's journal changed after host2's plan arrived"
    );
}

#[test]
fn a_health_check_failure_stops_the_play_and_rolls_the_first_host_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The host's health check fails on a VM that carries the patch: the
    // first VM patched on host 1 trips it. The campaign itself rolls back
    // nothing ("stop"): what undoes the patch is the role's rescue.
    let check = format!(
        "#!/bin/sh\n\
         # Trips on a VM that carries fix.\n\
         if '{}' list --vm \"$LUCOS_VM\" | grep -q 'fix v'; then\n\
         \techo \"$LUCOS_VM carries fix: failing on purpose\" >&2\n\
         \texit 1\n\
         fi\n",
        env!("CARGO_BIN_EXE_lucos")
    );
    let fleet = Fleet::new(
        "fail",
        &plan("command = \"./check.sh\"\n", "stop"),
        &[("check.sh", &check)],
    );
    let o = fleet.playbook(Some(&["fix.lup", "check.sh"]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "a host failed: {}", text(&o));
    assert!(out.contains("rolled back: "), "{}", text(&o));

    // Host 1: the campaign failed on a VM it had patched; the role reverted
    // exactly that, and no VM carries a patch now.
    let r = fleet.report(0);
    let c = &r["campaign"];
    assert_eq!(c["outcome"], "failed", "{r:#}");
    assert_eq!(r["rc"], 8, "{r:#}");
    assert!(c["failure"].is_string(), "{r:#}");
    let tripped: Vec<&str> = c["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .filter(|v| names(&v["after"]).contains(&"fix"))
        .map(|v| v["vm"].as_str().expect("vm"))
        .collect();
    assert!(
        !tripped.is_empty(),
        "the campaign left no VM patched (plan says stop): {r:#}"
    );
    // ... and it failed there for the check's reason (not a broken script).
    let tripped_check = c["vms"].as_array().expect("vms").iter().any(|v| {
        v["health"].as_array().is_some_and(|hs| {
            hs.iter().any(|h| {
                h["ok"] == false
                    && h["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("carries fix: failing on purpose"))
            })
        })
    });
    assert!(tripped_check, "no health check tripped on the patch: {r:#}");
    let rollback = r["rollback"].as_array().expect("rollback");
    for vm in &tripped {
        let e = rollback
            .iter()
            .find(|e| e["vm"] == *vm)
            .unwrap_or_else(|| panic!("{vm} not rolled back: {r:#}"));
        assert_eq!(names(&e["reverted"]), ["fix"], "{r:#}");
    }
    assert!(
        rollback.iter().all(|e| names(&e["left"]).is_empty()),
        "{r:#}"
    );
    for vm in VMS {
        assert!(
            fleet.patches(0, vm).is_empty(),
            "host1 {vm} still patched: {r:#}\n{}",
            text(&o)
        );
    }

    // Its journal (campaign failed) is set aside: the next run of the play
    // starts a new campaign.
    let aside = std::fs::read_dir(fleet.dest(0))
        .expect("host1's campaign folder")
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("fix.toml.journal.rolled-back-")
        });
    assert!(aside, "host1's journal not set aside");
    assert!(!fleet.dest(0).join("fix.toml.journal").exists());

    // Host 2 was never touched: no plan copied, no report, no patch, not
    // even in the play's recap.
    assert!(!fleet.dest(1).exists(), "host2 got the plan: {}", text(&o));
    assert!(!fleet.report_path(1).exists(), "host2 has a report");
    for vm in VMS {
        assert!(fleet.patches(1, vm).is_empty(), "host2 {vm} patched");
    }
    let recap = out.split("PLAY RECAP").nth(1).unwrap_or_default();
    assert!(!recap.contains("host2"), "host2 ran: {}", text(&o));
}
