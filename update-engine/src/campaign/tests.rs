//! The campaign engine's decisions over an in-memory fleet (the real one,
//! over VMs' control sockets, is tested in tests/campaign.rs).

use super::*;

/// VMs as patch stacks; a VM's apply of a name it has is an error (as
/// the VMM's is), so a step done twice shows.
#[derive(Default)]
struct Fake {
    vms: Mutex<BTreeMap<String, Vec<String>>>,
    /// Times an apply on a VM answers busy before it succeeds.
    busy: Mutex<BTreeMap<String, u32>>,
    /// VMs whose log shows a problem once patched.
    warns: Vec<String>,
    calls: Mutex<Vec<String>>,
    /// vm01 stops while vm00 is reverted.
    vanish: bool,
    /// Times listing a VM's patches fails (not as gone) before it works.
    broken: Mutex<BTreeMap<String, u32>>,
}

impl Fake {
    fn new(n: usize) -> Self {
        let f = Fake::default();
        for i in 0..n {
            f.vms
                .lock()
                .expect("lock")
                .insert(format!("vm{i:02}"), Vec::new());
        }
        f
    }

    fn has(&self, vm: &str) -> Vec<String> {
        self.vms.lock().expect("lock")[vm].clone()
    }

    fn calls(&self, what: &str) -> usize {
        self.calls
            .lock()
            .expect("lock")
            .iter()
            .filter(|c| c.starts_with(what))
            .count()
    }
}

impl Fleet for Fake {
    fn running(&self) -> Result<Vec<(String, Labels)>, String> {
        Ok(self
            .vms
            .lock()
            .expect("lock")
            .keys()
            .map(|k| (k.clone(), BTreeMap::new()))
            .collect())
    }
    fn lock_vm(&self, _: &str, _: &str) -> Result<Held, String> {
        Ok(Box::new(()))
    }
    fn lock_file(&self, _: &Path) -> Result<Held, String> {
        Ok(Box::new(()))
    }
    fn patches(&self, vm: &str) -> Result<Vec<String>, FleetError> {
        if let Some(n) = self.broken.lock().expect("lock").get_mut(vm) {
            if *n > 0 {
                *n -= 1;
                return Err(FleetError::Failed("internal error".into()));
            }
        }
        self.vms
            .lock()
            .expect("lock")
            .get(vm)
            .cloned()
            .ok_or_else(|| FleetError::Gone(format!("no VM {vm}")))
    }
    fn apply(&self, vm: &str, file: &Path, _: bool) -> Result<f64, FleetError> {
        self.calls.lock().expect("lock").push(format!("apply {vm}"));
        if let Some(n) = self.busy.lock().expect("lock").get_mut(vm) {
            if *n > 0 {
                *n -= 1;
                return Err(FleetError::Busy("a vCPU is in the code".into()));
            }
        }
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("name")
            .to_owned();
        let mut vms = self.vms.lock().expect("lock");
        let p = vms.get_mut(vm).ok_or(FleetError::Gone(vm.into()))?;
        if p.contains(&name) {
            return Err(FleetError::Failed(format!("{name} is already applied")));
        }
        p.push(name);
        Ok(100.0)
    }
    fn revert(&self, vm: &str, name: &str) -> Result<f64, FleetError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("revert {vm}"));
        let mut vms = self.vms.lock().expect("lock");
        // vm01 stops while vm00 is being reverted.
        if self.vanish && vm == "vm00" {
            vms.remove("vm01");
        }
        let p = vms.get_mut(vm).ok_or(FleetError::Gone(vm.into()))?;
        let at = p
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| FleetError::Failed(format!("{name} is not applied")))?;
        p.remove(at);
        Ok(50.0)
    }
    fn log_seq(&self, _: &str) -> Result<u64, FleetError> {
        Ok(10)
    }
    fn log_problems(&self, vm: &str, since: u64) -> Result<LogCheck, FleetError> {
        let warned = self.warns.iter().any(|w| w == vm);
        Ok(LogCheck {
            problems: if warned {
                vec!["WARNING: CPU: 0 PID: 1 at x.c:1 f".into()]
            } else {
                Vec::new()
            },
            lost: 0,
            next: since,
        })
    }
    fn alive(&self, _: &str, _: Duration) -> Result<String, FleetError> {
        Ok("jiffies advanced".into())
    }
    fn verify(&self, _: &str) -> Result<Vec<String>, FleetError> {
        Ok(Vec::new())
    }
}

struct Quiet;
impl Progress for Quiet {
    fn wave_start(&self, _: usize, _: usize, _: usize, _: usize) {}
    fn vm_done(&self, _: usize, _: &str, _: Outcome, _: &str) {}
    fn note(&self, _: &str) {}
    fn wave_end(&self, _: usize, _: bool) {}
}

fn setup(name: &str, plan: &str) -> (PathBuf, Plan) {
    let dir = std::env::temp_dir().join(format!("lucos-campaign-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("plan.toml");
    std::fs::write(&path, plan).expect("plan");
    let name_of = |p: &Path| {
        Ok(p.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_owned())
    };
    let plan = Plan::load(&path, &name_of).expect("plan");
    (dir, plan)
}

const WAVES: &str = r#"[[patch]]
file = "fix.lup"
[targets]
vms = ["*"]
[[wave]]
size = 1
[[wave]]
size = "50%"
concurrency = 3
[[wave]]
size = "rest"
concurrency = 2
[health]
alive = true
"#;

#[test]
fn a_run_killed_between_apply_and_journal_resumes_without_applying_twice() {
    let (dir, plan) = setup("resume", WAVES);
    let fleet = Fake::new(10);
    // A first run that journaled its start and vm00's begin, applied the
    // patch, and died before journaling done.
    seed(
        &plan,
        &fleet,
        &[Entry::Begin {
            at: 2,
            vm: "vm00".into(),
            wave: 0,
            before: Vec::new(),
            log_seq: Some(3),
        }],
    );
    fleet
        .apply("vm00", Path::new("fix.lup"), false)
        .expect("first run's apply");
    let r = run(&plan, &fleet, &Quiet).expect("resumed");
    assert_eq!(r.outcome, "done", "{r:#?}");
    assert_eq!(fleet.calls("apply"), 10, "each VM applied once");
    for v in &r.vms {
        assert_eq!(v.result, Outcome::Patched, "{v:?}");
        assert_eq!(fleet.has(&v.vm), ["fix"]);
    }
    assert!(r.vms[0].detail.contains("applied by an earlier run"));
    let sizes: Vec<usize> = r.waves.iter().map(|w| w.vms.len()).collect();
    assert_eq!(sizes, [1, 5, 4]);
    // Done: a further run does nothing.
    let again = run(&plan, &fleet, &Quiet).expect("again");
    assert_eq!(again.outcome, "done");
    assert_eq!(fleet.calls("apply"), 10);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn busy_is_retried_and_a_failure_in_wave_two_rolls_back_everything() {
    let text = WAVES.replace("[health]", "[failure]\naction = \"rollback-all\"\n[health]");
    let (dir, plan) = setup("rollback", &text);
    let mut fleet = Fake::new(10);
    fleet.busy.lock().expect("lock").insert("vm00".into(), 3);
    fleet.warns = vec!["vm03".into()];
    let r = run(&plan, &fleet, &Quiet).expect("ran");
    assert_eq!(r.outcome, "failed", "{r:#?}");
    let failure = r.failure.clone().expect("why");
    assert!(
        failure.contains("wave 2") && failure.contains("vm03"),
        "{failure}"
    );
    // vm00 was busy three times, then applied.
    assert_eq!(fleet.calls("apply vm00"), 4);
    for v in &r.vms {
        assert!(
            fleet.has(&v.vm).is_empty(),
            "{} rolled back or untouched",
            v.vm
        );
        let want = match v.wave {
            1 | 2 if v.result != Outcome::Pending => Outcome::RolledBack,
            _ => Outcome::Pending,
        };
        assert_eq!(v.result, want, "{v:?}");
    }
    assert!(r
        .vms
        .iter()
        .filter(|v| v.wave == 3)
        .all(|v| v.result == Outcome::Pending));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_revert_campaign_rolls_back_by_applying_again_and_gone_vms_are_reported() {
    let text = WAVES
        .replace(
            "file = \"fix.lup\"",
            "file = \"fix.lup\"\naction = \"revert\"",
        )
        .replace("size = 1", "size = 4");
    let (dir, plan) = setup("revert", &text);
    let mut fleet = Fake::new(6);
    for vm in ["vm00", "vm01", "vm02", "vm03", "vm04", "vm05"] {
        fleet
            .apply(vm, Path::new("fix.lup"), false)
            .expect("applied");
    }
    fleet.warns = vec!["vm03".into()];
    fleet.vanish = true;
    let r = run(&plan, &fleet, &Quiet).expect("ran");
    assert_eq!(r.outcome, "failed", "{r:#?}");
    let by = |vm: &str| r.vms.iter().find(|v| v.vm == vm).expect("vm").result;
    // vm01 stopped in the middle of the wave: reported, not a failure.
    assert_eq!(by("vm01"), Outcome::Gone);
    // vm03's log showed a problem: the wave's reverts are undone.
    for vm in ["vm00", "vm02", "vm03"] {
        assert_eq!(by(vm), Outcome::RolledBack, "{r:#?}");
        assert_eq!(fleet.has(vm), ["fix"], "{vm} has its patch again");
    }
    for vm in ["vm04", "vm05"] {
        assert_eq!(by(vm), Outcome::Pending);
        assert_eq!(fleet.has(vm), ["fix"]);
    }
    assert_eq!(fleet.calls("revert"), 3);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_journal_of_another_plan_is_refused() {
    let (dir, plan) = setup("digest", WAVES);
    let fleet = Fake::new(2);
    run(&plan, &fleet, &Quiet).expect("ran");
    std::fs::write(&plan.path, WAVES.replace("size = 1", "size = 2")).expect("edit");
    let name_of = |p: &Path| {
        Ok(p.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_owned())
    };
    let changed = Plan::load(&plan.path, &name_of).expect("plan");
    let e = run(&changed, &fleet, &Quiet).expect_err("another plan");
    assert!(
        e.to_string().contains("changed since its campaign began"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A journal as a first run left it: started, then `entries`.
fn seed(plan: &Plan, fleet: &Fake, entries: &[Entry]) {
    let mut j = Journal::open(&journal_path(&plan.path)).expect("journal");
    let vms: Vec<String> = fleet
        .running()
        .expect("vms")
        .into_iter()
        .map(|v| v.0)
        .collect();
    let split = plan.split(&vms);
    j.append(&Entry::Start {
        at: 1,
        digest: plan.digest.clone(),
        name: plan.name.clone(),
        waves: split.iter().map(|w| w.1.clone()).collect(),
        settings: split.iter().map(|w| w.0.clone()).collect(),
        patches: vec!["fix".into()],
    })
    .expect("append");
    for e in entries {
        j.append(e).expect("append");
    }
}

#[test]
fn a_run_killed_after_a_failure_starts_no_new_vm_of_that_wave_when_resumed() {
    let (dir, plan) = setup("failed-kill", &WAVES.replace("size = 1", "size = 3"));
    let fleet = Fake::new(6);
    // vm00 failed, and the run died before it ended the wave.
    seed(
        &plan,
        &fleet,
        &[
            Entry::Begin {
                at: 2,
                vm: "vm00".into(),
                wave: 0,
                before: Vec::new(),
                log_seq: Some(1),
            },
            Entry::Done {
                at: 3,
                vm: "vm00".into(),
                wave: 0,
                outcome: Outcome::Failed,
                after: Vec::new(),
                paused_us: 0.0,
                ms: 1,
                health: Vec::new(),
                detail: "patch refused".into(),
            },
        ],
    );
    let r = run(&plan, &fleet, &Quiet).expect("resumed");
    assert_eq!(r.outcome, "failed", "{r:#?}");
    assert_eq!(fleet.calls("apply"), 0, "no VM of the failed wave started");
    assert!(
        r.vms[1..].iter().all(|v| v.result == Outcome::Pending),
        "{r:#?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_vm_whose_step_never_began_is_not_rolled_back() {
    let text = WAVES.replace("size = 1", "size = 3");
    let (dir, plan) = setup("never-began", &text);
    let mut fleet = Fake::new(4);
    // vm01 had the patch before the campaign; listing it fails once (its
    // step fails before it begins); vm02 then fails its health check.
    fleet
        .apply("vm01", Path::new("fix.lup"), false)
        .expect("applied");
    fleet.broken.lock().expect("lock").insert("vm01".into(), 1);
    fleet.warns = vec!["vm02".into()];
    let r = run(&plan, &fleet, &Quiet).expect("ran");
    assert_eq!(r.outcome, "failed", "{r:#?}");
    assert_eq!(fleet.has("vm01"), ["fix"], "its own patch kept: {r:#?}");
    assert_eq!(fleet.calls("revert vm01"), 0);
    assert!(!r.vms[1].began);
    assert_eq!(fleet.has("vm00"), Vec::<String>::new(), "vm00 rolled back");
    let _ = std::fs::remove_dir_all(dir);
}
