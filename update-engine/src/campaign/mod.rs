//! Patch campaigns: one plan (patches, target VMs, waves, health checks,
//! what to do on failure) rolled over many VMs of a host, wave by wave,
//! each step journaled before the next so that a campaign killed at any
//! point resumes without changing a VM twice or skipping one
//! (docs/campaigns.md).
//!
//! The engine reaches VMs only through [`Fleet`]: the lucos binary's
//! implementation talks to each VM's control socket; health checks are the
//! VMM's, from outside the guest (its clock, its kernel log in guest
//! memory, the patched sites), plus an optional command on the host.

pub mod journal;
pub mod plan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use journal::{Check, Entry, Journal, Outcome};
pub use plan::{Action, OnFailure, Plan, PlanError, Wave};

/// Why a request to a VM failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetError {
    /// Its VMM is gone (not running, or died during the request).
    Gone(String),
    /// A patch or revert was refused as busy (a vCPU or task in the code);
    /// worth trying again.
    Busy(String),
    /// Anything else: a patch refused, a request failed.
    Failed(String),
}

impl std::fmt::Display for FleetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gone(m) | Self::Busy(m) | Self::Failed(m) => f.write_str(m),
        }
    }
}

/// A lock held for the campaign's life.
pub type Held = Box<dyn Send>;

/// A VM's labels (`lucos run --label k=v`).
pub type Labels = BTreeMap<String, String>;

/// The VMs of a host, as the campaign sees them.
pub trait Fleet: Sync {
    /// The running VMs: id and labels.
    fn running(&self) -> Result<Vec<(String, Labels)>, String>;
    /// Takes the campaign lock of `vm` for campaign `owner` (the plan's
    /// path), or says who holds it.
    fn lock_vm(&self, vm: &str, owner: &str) -> Result<Held, String>;
    /// Takes the lock file `path` (one run of a plan at a time), or says
    /// who holds it.
    fn lock_file(&self, path: &Path) -> Result<Held, String>;
    /// Names of the patches applied to `vm`, oldest first.
    fn patches(&self, vm: &str) -> Result<Vec<String>, FleetError>;
    /// Applies the `.lup` at `file` (replacing every applied patch if
    /// `replace`); how long the guest was paused, µs.
    fn apply(&self, vm: &str, file: &Path, replace: bool) -> Result<f64, FleetError>;
    /// Reverts patch `name`; how long the guest was paused, µs.
    fn revert(&self, vm: &str, name: &str) -> Result<f64, FleetError>;
    /// The sequence number the guest kernel's next log record will get.
    fn log_seq(&self, vm: &str) -> Result<u64, FleetError>;
    /// Kernel problems (oops, BUG, WARNING, lockup, stall, panic) logged
    /// from sequence number `since` on.
    fn log_problems(&self, vm: &str, since: u64) -> Result<LogCheck, FleetError>;
    /// Waits up to `timeout` for the guest kernel's clock to advance; what
    /// was seen.
    fn alive(&self, vm: &str, timeout: Duration) -> Result<String, FleetError>;
    /// Checks that the applied patches' sites and code hold what they
    /// should; the discrepancies.
    fn verify(&self, vm: &str) -> Result<Vec<String>, FleetError>;
}

/// What a read of a guest's kernel log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogCheck {
    /// The problem lines.
    pub problems: Vec<String>,
    /// Records overwritten before they could be read.
    pub lost: u64,
    /// The sequence number to read from next time.
    pub next: u64,
}

/// What a campaign shows as it goes (a terminal's bars, or plain lines).
pub trait Progress: Sync {
    /// Wave `wave` (0-based) of `waves` starts with `vms` VMs, `done` of them
    /// done already (a resumed campaign).
    fn wave_start(&self, wave: usize, waves: usize, vms: usize, done: usize);
    /// A VM is done.
    fn vm_done(&self, wave: usize, vm: &str, outcome: Outcome, detail: &str);
    /// Anything else worth a line.
    fn note(&self, msg: &str);
    /// The wave ended.
    fn wave_end(&self, wave: usize, ok: bool);
}

/// A VM in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    /// VM id.
    pub vm: String,
    /// Wave (1-based, as people count).
    pub wave: usize,
    /// What became of it.
    pub result: Outcome,
    /// Its patches before the campaign's step.
    pub before: Vec<String>,
    /// Its patches after (after the rollback, if rolled back).
    pub after: Vec<String>,
    /// Time its vCPUs were paused by the step, µs.
    pub paused_us: f64,
    /// The step's time, ms (health checks included).
    pub ms: u64,
    /// Health checks (the last run of them).
    pub health: Vec<Check>,
    /// Why it failed, notes.
    pub detail: String,
    /// Whether its step began (journaled `begin`): only then can the
    /// campaign have changed it, and only then does a rollback touch it.
    #[serde(default)]
    pub began: bool,
}

/// A wave in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveReport {
    /// 1-based.
    pub wave: usize,
    /// Its VMs.
    pub vms: Vec<String>,
    /// Whether it ended, and well.
    pub ok: Option<bool>,
}

/// What `lucos campaign run --json` and `status --json` print.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The plan file.
    pub plan: String,
    /// The campaign's name.
    pub name: String,
    /// `done`, `failed`, `aborted`, `running` or `not-started`.
    pub outcome: String,
    /// Why it failed or was aborted.
    pub failure: Option<String>,
    /// Its waves.
    pub waves: Vec<WaveReport>,
    /// Its VMs, wave by wave.
    pub vms: Vec<VmReport>,
    /// The plan's patches (names), in order.
    #[serde(default)]
    pub patches: Vec<String>,
    /// Unix time the campaign began, ms.
    pub started_ms: Option<u64>,
    /// Unix time it ended, ms.
    pub ended_ms: Option<u64>,
}

/// Why a campaign could not run (as opposed to a VM failing in it).
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    /// The plan is wrong.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Another campaign holds the plan or a VM.
    #[error("{0}")]
    Conflict(String),
    /// The journal cannot be read, written, or is of another plan.
    #[error("{0}")]
    Journal(String),
    /// The host's VMs cannot be listed.
    #[error("{0}")]
    Fleet(String),
}

/// The journal of the plan at `plan`.
pub fn journal_path(plan: &Path) -> PathBuf {
    suffixed(plan, ".journal")
}

/// The lock file a run of the plan holds.
pub fn lock_path(plan: &Path) -> PathBuf {
    suffixed(plan, ".lock")
}

/// The file `lucos campaign abort` creates to stop a run.
pub fn abort_path(plan: &Path) -> PathBuf {
    suffixed(plan, ".abort")
}

fn suffixed(p: &Path, s: &str) -> PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(s);
    PathBuf::from(o)
}

/// What the journal's `Start` says.
#[derive(Debug)]
struct Started {
    patches: Vec<String>,
    digest: String,
    name: String,
    waves: Vec<Vec<String>>,
    settings: Vec<Wave>,
    at: u64,
}

/// A campaign's state replayed from its journal.
#[derive(Debug, Default)]
pub struct State {
    /// The `Start` entry.
    start: Option<Started>,
    /// VMs by id: the last word on each.
    vms: BTreeMap<String, VmReport>,
    /// `Begin` without `Done`: (before, log_seq).
    in_flight: BTreeMap<String, (Vec<String>, Option<u64>)>,
    /// Waves ended: ok.
    waves_done: BTreeMap<usize, bool>,
    /// The end: (outcome, reason, at).
    end: Option<(String, Option<String>, u64)>,
}

impl State {
    /// Replays `entries`.
    pub fn replay(entries: &[Entry]) -> Self {
        let mut s = State::default();
        for e in entries {
            match e {
                Entry::Start {
                    at,
                    digest,
                    name,
                    waves,
                    settings,
                    patches,
                } => {
                    for (i, w) in waves.iter().enumerate() {
                        for vm in w {
                            s.vms.insert(vm.clone(), pending(vm, i));
                        }
                    }
                    s.start = Some(Started {
                        patches: patches.clone(),
                        digest: digest.clone(),
                        name: name.clone(),
                        waves: waves.clone(),
                        settings: settings.clone(),
                        at: *at,
                    });
                }
                // A run after an abort resumes the campaign.
                Entry::Run { .. } => {
                    if s.end.as_ref().is_some_and(|e| e.0 == "aborted") {
                        s.end = None;
                    }
                }
                Entry::Begin {
                    vm,
                    before,
                    log_seq,
                    ..
                } => {
                    s.in_flight.insert(vm.clone(), (before.clone(), *log_seq));
                    if let Some(r) = s.vms.get_mut(vm) {
                        r.before = before.clone();
                        r.began = true;
                        r.result = Outcome::InFlight;
                    }
                }
                Entry::Done {
                    vm,
                    outcome,
                    after,
                    paused_us,
                    ms,
                    health,
                    detail,
                    ..
                } => {
                    s.in_flight.remove(vm);
                    if let Some(r) = s.vms.get_mut(vm) {
                        r.result = *outcome;
                        r.after = after.clone();
                        r.paused_us = *paused_us;
                        r.ms = *ms;
                        r.health = health.clone();
                        r.detail = detail.clone();
                    }
                }
                Entry::WaveDone { wave, ok, .. } => {
                    s.waves_done.insert(*wave, *ok);
                }
                Entry::RolledBack {
                    vm,
                    ok,
                    after,
                    detail,
                    ..
                } => {
                    if let Some(r) = s.vms.get_mut(vm) {
                        if *ok {
                            r.result = Outcome::RolledBack;
                        }
                        r.after = after.clone();
                        r.detail = if r.detail.is_empty() {
                            detail.clone()
                        } else {
                            format!("{}; {detail}", r.detail)
                        };
                    }
                }
                Entry::End {
                    at,
                    outcome,
                    reason,
                } => s.end = Some((outcome.clone(), reason.clone(), *at)),
            }
        }
        s
    }

    /// The report of this state, for the plan at `plan`.
    pub fn report(&self, plan: &Path, running: bool) -> Report {
        let (name, waves, started, patches) = match &self.start {
            Some(s) => (
                s.name.clone(),
                s.waves.clone(),
                Some(s.at),
                s.patches.clone(),
            ),
            None => (String::new(), Vec::new(), None, Vec::new()),
        };
        let outcome = match (&self.end, &self.start) {
            (Some((o, ..)), _) => o.clone(),
            (None, None) => "not-started".into(),
            (None, Some(_)) if running => "running".into(),
            (None, Some(_)) => "interrupted".into(),
        };
        Report {
            plan: plan.display().to_string(),
            name,
            outcome,
            failure: self.end.as_ref().and_then(|e| e.1.clone()),
            waves: waves
                .iter()
                .enumerate()
                .map(|(i, vms)| WaveReport {
                    wave: i + 1,
                    vms: vms.clone(),
                    ok: self.waves_done.get(&i).copied(),
                })
                .collect(),
            vms: waves
                .iter()
                .flatten()
                .filter_map(|vm| self.vms.get(vm).cloned())
                .collect(),
            started_ms: started,
            ended_ms: self.end.as_ref().map(|e| e.2),
            patches,
        }
    }
}

fn pending(vm: &str, wave: usize) -> VmReport {
    VmReport {
        vm: vm.to_owned(),
        wave: wave + 1,
        result: Outcome::Pending,
        before: Vec::new(),
        after: Vec::new(),
        paused_us: 0.0,
        ms: 0,
        health: Vec::new(),
        detail: String::new(),
        began: false,
    }
}

/// The state of the campaign of the plan at `plan`, from its journal.
pub fn status(plan: &Path) -> Result<State, CampaignError> {
    Journal::read(&journal_path(plan))
        .map(|e| State::replay(&e))
        .map_err(CampaignError::Journal)
}

/// One run of a campaign: a first one, or one resuming from the journal.
struct Run<'a> {
    plan: &'a Plan,
    fleet: &'a dyn Fleet,
    progress: &'a dyn Progress,
    journal: Mutex<Journal>,
    abort: PathBuf,
    aborted: AtomicBool,
}

/// Runs (or resumes) the campaign of `plan` over `fleet` and returns its
/// report; a VM failing is in the report (outcome `failed`), not an error.
pub fn run(
    plan: &Plan,
    fleet: &dyn Fleet,
    progress: &dyn Progress,
) -> Result<Report, CampaignError> {
    let _plan_lock = fleet
        .lock_file(&lock_path(&plan.path))
        .map_err(CampaignError::Conflict)?;
    let jpath = journal_path(&plan.path);
    let entries = Journal::read(&jpath).map_err(CampaignError::Journal)?;
    let state = State::replay(&entries);
    if let Some(started) = &state.start {
        if started.digest != plan.digest {
            return Err(CampaignError::Journal(format!(
                "{} changed since its campaign began (journal {}): finish or abort that campaign with the plan it had, or move the journal away to start a new one",
                plan.path.display(),
                jpath.display()
            )));
        }
    }
    let abort = abort_path(&plan.path);
    // Finished (done or failed); an aborted campaign is resumed.
    if state.end.as_ref().is_some_and(|e| e.0 != "aborted") {
        return Ok(state.report(&plan.path, false));
    }
    let _ = std::fs::remove_file(&abort);
    let (waves, settings): (Vec<Vec<String>>, Vec<Wave>) = match &state.start {
        Some(s) => (s.waves.clone(), s.settings.clone()),
        None => {
            let running = fleet.running().map_err(CampaignError::Fleet)?;
            let vms = plan.resolve(&running)?;
            let split = plan.split(&vms);
            (
                split.iter().map(|(_, v)| v.clone()).collect(),
                split.into_iter().map(|(w, _)| w).collect(),
            )
        }
    };
    // Every VM the campaign may touch (a rollback of everything touches
    // every one), before touching any.
    let owner = plan.path.display().to_string();
    let mut held = Vec::new();
    for vm in waves.iter().flatten() {
        held.push(fleet.lock_vm(vm, &owner).map_err(CampaignError::Conflict)?);
    }
    let mut journal = Journal::open(&jpath).map_err(CampaignError::Journal)?;
    if state.start.is_none() {
        journal
            .append(&Entry::Start {
                at: journal::now_ms(),
                digest: plan.digest.clone(),
                name: plan.name.clone(),
                waves: waves.clone(),
                settings: settings.clone(),
                patches: plan.patches.iter().map(|p| p.name.clone()).collect(),
            })
            .map_err(CampaignError::Journal)?;
    }
    journal
        .append(&Entry::Run {
            at: journal::now_ms(),
            pid: std::process::id(),
        })
        .map_err(CampaignError::Journal)?;
    let r = Run {
        plan,
        fleet,
        progress,
        journal: Mutex::new(journal),
        abort,
        aborted: AtomicBool::new(false),
    };
    let (outcome, reason) = r.waves(&waves, &settings, state)?;
    r.log(Entry::End {
        at: journal::now_ms(),
        outcome: outcome.into(),
        reason,
    })?;
    drop(held);
    let state = State::replay(&Journal::read(&jpath).map_err(CampaignError::Journal)?);
    Ok(state.report(&plan.path, false))
}

impl Run<'_> {
    fn log(&self, e: Entry) -> Result<(), CampaignError> {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(&e)
            .map_err(CampaignError::Journal)
    }

    fn abort_requested(&self) -> bool {
        if self.abort.exists() {
            self.aborted.store(true, Ordering::SeqCst);
        }
        self.aborted.load(Ordering::SeqCst)
    }

    /// Every wave not yet ended; (outcome, reason).
    fn waves(
        &self,
        waves: &[Vec<String>],
        settings: &[Wave],
        state: State,
    ) -> Result<(&'static str, Option<String>), CampaignError> {
        let mut reports = state.vms;
        let mut in_flight = state.in_flight;
        for (i, vms) in waves.iter().enumerate() {
            let wave = &settings[i.min(settings.len() - 1)];
            if state.waves_done.get(&i) == Some(&true) {
                continue;
            }
            let failed_before = state.waves_done.get(&i) == Some(&false);
            // A VM of this wave failed before a crash: no new VM starts,
            // only those the crash caught in their step are finished.
            let failed_in_wave = first_failure(vms, &reports).is_some();
            let todo: Vec<String> = vms
                .iter()
                .filter(|vm| {
                    in_flight.contains_key(*vm)
                        || (!failed_in_wave
                            && reports
                                .get(*vm)
                                .is_none_or(|r| r.result == Outcome::Pending))
                })
                .cloned()
                .collect();
            self.progress
                .wave_start(i, waves.len(), vms.len(), vms.len() - todo.len());
            let failure;
            if !failed_before {
                let done = self.wave(i, wave, &todo, &mut in_flight)?;
                for r in done {
                    reports.insert(r.vm.clone(), r);
                }
                let mut first = first_failure(vms, &reports);
                if first.is_none() && !wave.soak.is_zero() && !self.abort_requested() {
                    first = self.soak(i, wave, vms, &mut reports)?;
                }
                failure = first;
                if self.aborted.load(Ordering::SeqCst) && failure.is_none() {
                    return Ok((
                        "aborted",
                        Some(format!(
                            "aborted by `lucos campaign abort` in wave {}",
                            i + 1
                        )),
                    ));
                }
                self.log(Entry::WaveDone {
                    at: journal::now_ms(),
                    wave: i,
                    ok: failure.is_none(),
                })?;
                self.progress.wave_end(i, failure.is_none());
            } else {
                failure =
                    first_failure(vms, &reports).or_else(|| Some(format!("wave {} failed", i + 1)));
            }
            if let Some(why) = failure {
                let undo: Vec<String> = match self.plan.on_failure {
                    OnFailure::Stop => Vec::new(),
                    OnFailure::RollbackWave => vms.clone(),
                    OnFailure::RollbackAll => waves[..=i].iter().flatten().cloned().collect(),
                };
                self.rollback(&undo, &reports, wave.timeout)?;
                let what = match self.plan.on_failure {
                    OnFailure::Stop => "stopped",
                    OnFailure::RollbackWave => "stopped and rolled back the wave",
                    OnFailure::RollbackAll => "stopped and rolled back every VM",
                };
                return Ok(("failed", Some(format!("wave {}: {why}; {what}", i + 1))));
            }
        }
        Ok(("done", None))
    }

    /// Steps `todo` of wave `i`, `wave.concurrency` at a time; a failure
    /// (or an abort) stops new steps, those in flight finish.
    fn wave(
        &self,
        i: usize,
        wave: &Wave,
        todo: &[String],
        in_flight: &mut BTreeMap<String, (Vec<String>, Option<u64>)>,
    ) -> Result<Vec<VmReport>, CampaignError> {
        let deadline = Instant::now() + wave.timeout;
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let out = Mutex::new(Vec::new());
        let error = Mutex::new(None);
        let prior = &*in_flight;
        std::thread::scope(|s| {
            for _ in 0..wave.concurrency.min(todo.len()) {
                s.spawn(|| loop {
                    if stop.load(Ordering::SeqCst) || self.abort_requested() {
                        return;
                    }
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(vm) = todo.get(k) else { return };
                    match self.step(vm, i, prior.get(vm).cloned(), deadline) {
                        Ok(r) => {
                            self.progress.vm_done(i, vm, r.result, &r.detail);
                            if r.result == Outcome::Failed {
                                stop.store(true, Ordering::SeqCst);
                            }
                            out.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                        }
                        Err(e) => {
                            stop.store(true, Ordering::SeqCst);
                            *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        let out = out.into_inner().unwrap_or_else(|e| e.into_inner());
        for r in &out {
            in_flight.remove(&r.vm);
        }
        Ok(out)
    }

    /// Retries `f` while it is refused as busy, with back-off, until `deadline`.
    fn retry<T>(
        &self,
        deadline: Instant,
        mut f: impl FnMut() -> Result<T, FleetError>,
    ) -> Result<T, FleetError> {
        let mut wait = Duration::from_millis(50);
        loop {
            match f() {
                Err(FleetError::Busy(m)) if Instant::now() + wait < deadline => {
                    log::info!("busy ({m}); again in {} ms", wait.as_millis());
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(FleetError::Busy(m)) => {
                    return Err(FleetError::Failed(format!(
                        "still busy at the wave's time limit: {m}"
                    )))
                }
                other => return other,
            }
        }
    }

    /// One VM: its patches' actions, then its health checks. `prior`: the
    /// `Begin` of a run that died before its `Done`.
    fn step(
        &self,
        vm: &str,
        wave: usize,
        prior: Option<(Vec<String>, Option<u64>)>,
        deadline: Instant,
    ) -> Result<VmReport, CampaignError> {
        let t0 = Instant::now();
        let mut report = pending(vm, wave);
        let done = |mut r: VmReport, outcome: Outcome, detail: String| {
            r.result = outcome;
            r.detail = detail;
            r.ms = t0.elapsed().as_millis() as u64;
            self.log(Entry::Done {
                at: journal::now_ms(),
                vm: vm.to_owned(),
                wave,
                outcome: r.result,
                after: r.after.clone(),
                paused_us: r.paused_us,
                ms: r.ms,
                health: r.health.clone(),
                detail: r.detail.clone(),
            })?;
            Ok(r)
        };
        let gone = |e: &FleetError| matches!(e, FleetError::Gone(_));
        // What the VM carries now, when just read (a fresh step's `before`).
        let mut known: Option<Vec<String>> = None;
        let (before, log_seq) = match prior {
            Some(p) => p,
            None => {
                let before = match self.retry(deadline, || self.fleet.patches(vm)) {
                    Ok(b) => b,
                    Err(e) if gone(&e) => return done(report, Outcome::Gone, e.to_string()),
                    Err(e) => return done(report, Outcome::Failed, e.to_string()),
                };
                let seq = match self.plan.health.log {
                    true => self.fleet.log_seq(vm).ok(),
                    false => None,
                };
                self.log(Entry::Begin {
                    at: journal::now_ms(),
                    vm: vm.to_owned(),
                    wave,
                    before: before.clone(),
                    log_seq: seq,
                })?;
                known = Some(before.clone());
                (before, seq)
            }
        };
        report.before = before.clone();
        report.began = true;
        let mut notes = Vec::new();
        for p in &self.plan.patches {
            let now = match known.take().map_or_else(|| self.fleet.patches(vm), Ok) {
                Ok(n) => n,
                Err(e) if gone(&e) => return done(report, Outcome::Gone, e.to_string()),
                Err(e) => return done(report, Outcome::Failed, e.to_string()),
            };
            let has = now.contains(&p.name);
            let r = match p.action {
                Action::Apply if has => {
                    if !before.contains(&p.name) {
                        notes.push(format!("{} applied by an earlier run", p.name));
                    } else {
                        notes.push(format!("{} was applied already", p.name));
                    }
                    continue;
                }
                Action::Revert if !has => {
                    notes.push(format!("{} is not applied", p.name));
                    continue;
                }
                Action::Replace if now == [p.name.clone()] => {
                    notes.push(format!("{} is the only patch already", p.name));
                    continue;
                }
                Action::Apply | Action::Replace => self.retry(deadline, || {
                    self.fleet.apply(vm, &p.file, p.action == Action::Replace)
                }),
                Action::Revert => self.retry(deadline, || self.fleet.revert(vm, &p.name)),
            };
            match r {
                Ok(us) => report.paused_us += us,
                Err(e) if gone(&e) => return done(report, Outcome::Gone, e.to_string()),
                Err(e) => {
                    report.after = self.fleet.patches(vm).unwrap_or_default();
                    report.health.push(Check {
                        check: "step".into(),
                        ok: false,
                        detail: e.to_string(),
                    });
                    return done(
                        report,
                        Outcome::Failed,
                        format!("{:?} {}: {e}", p.action, p.name).to_lowercase(),
                    );
                }
            }
        }
        report.after = self.fleet.patches(vm).unwrap_or_default();
        report.health = self.health(vm, wave, log_seq, &report.after);
        if let Some(c) = report.health.iter().find(|c| !c.ok) {
            let detail = format!("health check {} failed: {}", c.check, c.detail);
            let outcome = match self.fleet.patches(vm) {
                Err(FleetError::Gone(_)) => Outcome::Gone,
                _ => Outcome::Failed,
            };
            return done(report, outcome, detail);
        }
        done(report, Outcome::Patched, notes.join("; "))
    }

    /// The plan's health checks on `vm`, its kernel log read from `log_seq`.
    fn health(&self, vm: &str, wave: usize, log_seq: Option<u64>, after: &[String]) -> Vec<Check> {
        let h = &self.plan.health;
        let mut out = Vec::new();
        let check = |name: &str, r: Result<String, String>| Check {
            check: name.into(),
            ok: r.is_ok(),
            detail: r.unwrap_or_else(|e| e),
        };
        if h.alive {
            out.push(check(
                "alive",
                self.fleet.alive(vm, h.timeout).map_err(|e| e.to_string()),
            ));
        }
        if h.log {
            let r = match log_seq {
                None => Err("the kernel log could not be read before the step".into()),
                Some(seq) => match self.fleet.log_problems(vm, seq) {
                    Ok(LogCheck { problems: p, lost: 0, .. }) if p.is_empty() => {
                        Ok(format!("no problem logged since record {seq}"))
                    }
                    // A ring overwritten faster than the checks read it
                    // would fail every chatty guest; say it, pass.
                    Ok(LogCheck { problems: p, lost, .. }) if p.is_empty() => Ok(format!(
                        "no problem logged since record {seq} ({lost} records overwritten before they were read)"
                    )),
                    Ok(LogCheck { problems: p, .. }) => Err(format!(
                        "{} problem line(s) since record {seq}: {}",
                        p.len(),
                        p.iter().take(3).cloned().collect::<Vec<_>>().join(" | ")
                    )),
                    Err(e) => Err(e.to_string()),
                },
            };
            out.push(check("log", r));
        }
        if h.patch {
            let mut wrong = Vec::new();
            for p in &self.plan.patches {
                let has = after.contains(&p.name);
                match p.action {
                    Action::Apply if !has => wrong.push(format!("{} is not applied", p.name)),
                    Action::Revert if has => wrong.push(format!("{} is still applied", p.name)),
                    Action::Replace if after != [p.name.clone()] => {
                        wrong.push(format!("applied are {after:?}, not only {}", p.name))
                    }
                    _ => {}
                }
            }
            let r = match self.fleet.verify(vm) {
                Ok(v) => {
                    wrong.extend(v);
                    if wrong.is_empty() {
                        Ok(format!(
                            "applied {after:?}; every switched site as it should be"
                        ))
                    } else {
                        Err(wrong.join("; "))
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            out.push(check("patch", r));
        }
        if let Some(cmd) = &h.command {
            out.push(check("command", self.command(cmd, vm, wave)));
        }
        out
    }

    /// Runs the plan's health command for `vm`.
    fn command(&self, cmd: &str, vm: &str, wave: usize) -> Result<String, String> {
        let dir = self.plan.path.parent().unwrap_or(Path::new("."));
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
            .env("LUCOS_VM", vm)
            .env("LUCOS_CAMPAIGN", &self.plan.name)
            .env("LUCOS_WAVE", (wave + 1).to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
        let end = Instant::now() + self.plan.health.timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "`{cmd}` still ran after {:?}; killed",
                        self.plan.health.timeout
                    ));
                }
                Err(e) => return Err(format!("waiting for `{cmd}`: {e}")),
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for `{cmd}`: {e}"))?;
        let text = String::from_utf8_lossy(if out.stderr.is_empty() {
            &out.stdout
        } else {
            &out.stderr
        })
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .to_owned();
        match out.status.code() {
            Some(0) => Ok(format!("`{cmd}` exited 0")),
            Some(c) => Err(format!("`{cmd}` exited {c}: {text}")),
            None => Err(format!("`{cmd}` was killed by a signal: {text}")),
        }
    }

    /// Waits the wave's soak (an abort cuts it short), then checks its
    /// VMs again; the first failure.
    fn soak(
        &self,
        i: usize,
        wave: &Wave,
        vms: &[String],
        reports: &mut BTreeMap<String, VmReport>,
    ) -> Result<Option<String>, CampaignError> {
        self.progress.note(&format!(
            "wave {}: soaking {}",
            i + 1,
            humantime::format_duration(wave.soak)
        ));
        // The wave's patched VMs' logs are read all through the soak, from
        // where each step began, so that a chatty guest's ring does not
        // overwrite a problem before the end.
        let patched: Vec<String> = vms
            .iter()
            .filter(|vm| {
                reports
                    .get(*vm)
                    .is_some_and(|r| r.result == Outcome::Patched)
            })
            .cloned()
            .collect();
        let baselines = self.journal_log_seqs();
        let mut cursors: BTreeMap<String, Option<u64>> = patched
            .iter()
            .map(|vm| {
                let seq = baselines
                    .get(vm)
                    .copied()
                    .or_else(|| self.fleet.log_seq(vm).ok());
                (vm.clone(), seq)
            })
            .collect();
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let end = Instant::now() + wave.soak;
        while Instant::now() < end {
            if self.abort_requested() {
                return Ok(None);
            }
            if self.plan.health.log {
                for (vm, cursor) in cursors.iter_mut() {
                    let Some(at) = *cursor else { continue };
                    if let Ok(c) = self.fleet.log_problems(vm, at) {
                        seen.entry(vm.clone()).or_default().extend(c.problems);
                        *cursor = Some(c.next.max(at));
                    }
                }
            }
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(250)));
        }
        for vm in &patched {
            let Some(r) = reports.get(vm).cloned() else {
                continue;
            };
            let seq = cursors.get(vm).copied().flatten();
            let mut health = self.health(vm, i, seq, &r.after);
            if let Some(lines) = seen.get(vm).filter(|l| !l.is_empty()) {
                if let Some(c) = health.iter_mut().find(|c| c.check == "log") {
                    c.ok = false;
                    c.detail = format!(
                        "{} problem line(s) during the soak: {}",
                        lines.len(),
                        lines
                            .iter()
                            .take(3)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(" | ")
                    );
                }
            }
            if let Some(c) = health.iter().find(|c| !c.ok) {
                let detail = format!(
                    "after the soak: health check {} failed: {}",
                    c.check, c.detail
                );
                let gone = matches!(self.fleet.patches(vm), Err(FleetError::Gone(_)));
                let outcome = if gone { Outcome::Gone } else { Outcome::Failed };
                self.log(Entry::Done {
                    at: journal::now_ms(),
                    vm: vm.clone(),
                    wave: i,
                    outcome,
                    after: r.after.clone(),
                    paused_us: r.paused_us,
                    ms: r.ms,
                    health: health.clone(),
                    detail: detail.clone(),
                })?;
                self.progress.vm_done(i, vm, outcome, &detail);
                let nr = VmReport {
                    result: outcome,
                    health,
                    detail,
                    ..r
                };
                reports.insert(vm.clone(), nr);
            }
        }
        Ok(first_failure(vms, reports))
    }

    /// The log baselines the VMs' `Begin`s recorded (the last one each).
    fn journal_log_seqs(&self) -> BTreeMap<String, u64> {
        let path = self
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .path()
            .to_owned();
        let mut out = BTreeMap::new();
        for e in Journal::read(&path).unwrap_or_default() {
            if let Entry::Begin {
                vm,
                log_seq: Some(seq),
                ..
            } = e
            {
                out.insert(vm, seq);
            }
        }
        out
    }

    /// Undoes the campaign's step on `vms` (only what it changed: a patch
    /// it applied is reverted, one it reverted applied again).
    fn rollback(
        &self,
        vms: &[String],
        reports: &BTreeMap<String, VmReport>,
        timeout: Duration,
    ) -> Result<(), CampaignError> {
        for vm in vms {
            let Some(r) = reports.get(vm) else { continue };
            // Never begun (its `before` unknown): the campaign changed nothing.
            if !r.began || matches!(r.result, Outcome::Gone | Outcome::RolledBack) {
                continue;
            }
            let mut notes = Vec::new();
            let mut ok = true;
            for p in self.plan.patches.iter().rev() {
                let now = match self.fleet.patches(vm) {
                    Ok(n) => n,
                    Err(e) => {
                        ok = false;
                        notes.push(e.to_string());
                        break;
                    }
                };
                let has = now.contains(&p.name);
                let was = r.before.contains(&p.name);
                let deadline = Instant::now() + timeout;
                let res = match p.action {
                    Action::Apply if has && !was => {
                        self.retry(deadline, || self.fleet.revert(vm, &p.name))
                    }
                    Action::Revert if !has && was => {
                        self.retry(deadline, || self.fleet.apply(vm, &p.file, false))
                    }
                    _ => continue,
                };
                match res {
                    Ok(_) => notes.push(format!(
                        "rolled back: {} {}",
                        if p.action == Action::Apply {
                            "reverted"
                        } else {
                            "applied again"
                        },
                        p.name
                    )),
                    Err(e) => {
                        ok = false;
                        notes.push(format!("rollback of {} failed: {e}", p.name));
                    }
                }
            }
            let after = self.fleet.patches(vm).unwrap_or_default();
            self.progress.note(&format!(
                "{vm}: {}",
                if notes.is_empty() {
                    "nothing to roll back".into()
                } else {
                    notes.join("; ")
                }
            ));
            self.log(Entry::RolledBack {
                at: journal::now_ms(),
                vm: vm.clone(),
                ok,
                after,
                detail: if notes.is_empty() {
                    "nothing to roll back".into()
                } else {
                    notes.join("; ")
                },
            })?;
        }
        Ok(())
    }
}

/// The first failed VM of `vms`, as a reason.
fn first_failure(vms: &[String], reports: &BTreeMap<String, VmReport>) -> Option<String> {
    vms.iter()
        .filter_map(|vm| reports.get(vm))
        .find(|r| r.result == Outcome::Failed)
        .map(|r| format!("VM {} failed: {}", r.vm, r.detail))
}

#[cfg(test)]
mod tests;
