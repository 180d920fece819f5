//! `lucos campaign run|status|abort`: a plan rolled over this host's VMs in
//! waves (update-engine's campaign module), each VM reached through its
//! control socket; progress bars on a terminal, plain lines elsewhere.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Subcommand;
use nix::fcntl::{Flock, FlockArg};
use update_engine::campaign::{
    self, CampaignError, Fleet, FleetError, Held, LogCheck, Outcome, Plan, Progress, Report,
};
use update_engine::patcher::{PatchReport, VerifyReport};
use vmm_core::control::{
    AliveInfo, Client, ClientError, DmesgInfo, ErrorCode, Request, StatusInfo, PROTOCOL_VERSION,
};

use crate::error::{exit, CliError};
use crate::paths;

/// `lucos campaign ...`.
#[derive(Debug, Subcommand)]
pub enum CampaignCmd {
    /// Run the campaign of PLAN (or resume it from its journal).
    Run {
        /// The plan (TOML; docs/campaigns.md).
        plan: PathBuf,
        /// Print the report as JSON on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Show where the campaign of PLAN stands, from its journal.
    Status {
        /// The plan.
        plan: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running campaign of PLAN after the VMs in flight (`run`
    /// resumes it).
    Abort {
        /// The plan.
        plan: PathBuf,
    },
}

/// Runs a `campaign` subcommand.
pub fn campaign(cmd: CampaignCmd) -> Result<i32, CliError> {
    match cmd {
        CampaignCmd::Run { plan, json } => run(&plan, json),
        CampaignCmd::Status { plan, json } => status(&plan, json),
        CampaignCmd::Abort { plan } => abort(&plan),
    }
}

fn absolute(p: &Path) -> Result<PathBuf, CliError> {
    std::path::absolute(p).map_err(|e| CliError::io(format!("{}", p.display()), e))
}

fn campaign_error(e: CampaignError) -> CliError {
    match e {
        CampaignError::Plan(p) => CliError::Usage(p.to_string()),
        CampaignError::Conflict(m) => CliError::BadState(m),
        CampaignError::Journal(m) | CampaignError::Fleet(m) => CliError::Other(m),
    }
}

/// The name of the `.lup` at `path` (read and parsed, not verified: the
/// VMM checks its signature).
fn lup_name(path: &Path) -> Result<String, String> {
    match std::fs::metadata(path) {
        Err(e) => return Err(format!("{}: {e}", path.display())),
        Ok(m) if !m.is_file() => return Err(format!("{} is not a file", path.display())),
        Ok(_) => {}
    }
    update_engine::Lup::read(path)
        .map(|l| l.manifest.name)
        .map_err(|e| e.to_string())
}

fn exit_of(r: &Report) -> i32 {
    match r.outcome.as_str() {
        "done" => exit::OK,
        "aborted" => exit::CAMPAIGN_ABORTED,
        _ => exit::CAMPAIGN_FAILED,
    }
}

/// `lucos campaign run`.
fn run(plan: &Path, json: bool) -> Result<i32, CliError> {
    let plan_path = absolute(plan)?;
    let plan = Plan::load(&plan_path, &lup_name).map_err(|e| CliError::Usage(e.to_string()))?;
    let progress = Bars::new(&plan.name);
    let report = campaign::run(&plan, &SocketFleet, &progress).map_err(campaign_error)?;
    progress.finish();
    if json {
        crate::client::print_typed(&report);
    } else {
        print_report(&report);
    }
    Ok(exit_of(&report))
}

/// Whether a run holds the plan's lock now (its pid).
fn runner(plan: &Path) -> Option<String> {
    let path = campaign::lock_path(plan);
    let file = File::options().read(true).write(true).open(&path).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => None,
        Err((mut f, _)) => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            Some(s.trim().to_owned())
        }
    }
}

/// `lucos campaign status`.
fn status(plan: &Path, json: bool) -> Result<i32, CliError> {
    let plan = absolute(plan)?;
    let state = campaign::status(&plan).map_err(campaign_error)?;
    let running = runner(&plan);
    let report = state.report(&plan, running.is_some());
    if json {
        crate::client::print_typed(&report);
    } else {
        print_report(&report);
        if let Some(who) = running {
            println!("running: {who}");
        }
    }
    Ok(exit::OK)
}

/// `lucos campaign abort`.
fn abort(plan: &Path) -> Result<i32, CliError> {
    let plan = absolute(plan)?;
    let Some(who) = runner(&plan) else {
        println!("campaign {} is not running", plan.display());
        return Ok(exit::OK);
    };
    let marker = campaign::abort_path(&plan);
    std::fs::write(&marker, format!("aborted by pid {}\n", std::process::id()))
        .map_err(|e| CliError::io(format!("cannot write {}", marker.display()), e))?;
    eprintln!("asked {who} to stop; waiting for the VMs in flight");
    let end = Instant::now() + Duration::from_secs(600);
    while runner(&plan).is_some() {
        if Instant::now() > end {
            return Err(CliError::Other(format!(
                "campaign {} did not stop within 10 minutes ({who})",
                plan.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "campaign {} aborted (`lucos campaign run` resumes it)",
        plan.display()
    );
    Ok(exit::OK)
}

fn print_report(r: &Report) {
    println!("campaign {} ({}): {}", r.name, r.plan, r.outcome);
    if let Some(f) = &r.failure {
        println!("  {f}");
    }
    for w in &r.waves {
        let state = match w.ok {
            Some(true) => "ok",
            Some(false) => "FAILED",
            None => "not finished",
        };
        println!("wave {} ({} VMs): {state}", w.wave, w.vms.len());
        for v in r.vms.iter().filter(|v| v.wave == w.wave) {
            let result = serde_json::to_value(v.result)
                .ok()
                .and_then(|s| s.as_str().map(str::to_owned))
                .unwrap_or_default();
            print!(
                "  {:<20} {:<12} paused {:>8.1} µs  {:>6} ms",
                v.vm, result, v.paused_us, v.ms
            );
            if !v.detail.is_empty() {
                print!("  {}", v.detail);
            }
            println!();
        }
    }
}

/// Progress: a bar per wave on a terminal, plain lines otherwise.
struct Bars {
    name: String,
    multi: Option<indicatif::MultiProgress>,
    bars: Mutex<BTreeMap<usize, indicatif::ProgressBar>>,
    waves: Mutex<usize>,
}

impl Bars {
    fn new(name: &str) -> Self {
        let multi = std::io::stderr()
            .is_terminal()
            .then(indicatif::MultiProgress::new);
        Self {
            name: name.to_owned(),
            multi,
            bars: Mutex::new(BTreeMap::new()),
            waves: Mutex::new(0),
        }
    }

    fn line(&self, s: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => {
                let mut e = std::io::stderr().lock();
                let _ = writeln!(e, "{s}");
            }
        }
    }

    fn finish(&self) {
        for b in self.bars.lock().unwrap_or_else(|e| e.into_inner()).values() {
            b.abandon();
        }
    }
}

impl Progress for Bars {
    fn wave_start(&self, wave: usize, waves: usize, vms: usize, done: usize) {
        *self.waves.lock().unwrap_or_else(|e| e.into_inner()) = waves;
        let head = format!("{}: wave {}/{waves}", self.name, wave + 1);
        match &self.multi {
            Some(m) => {
                let bar = m.add(indicatif::ProgressBar::new(vms as u64));
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} VMs {elapsed} {msg}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_prefix(head);
                bar.set_position(done as u64);
                self.bars
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(wave, bar);
            }
            None => self.line(&format!(
                "{head}: {vms} VMs{}",
                if done > 0 {
                    format!(", {done} done already")
                } else {
                    String::new()
                }
            )),
        }
    }

    fn vm_done(&self, wave: usize, vm: &str, outcome: Outcome, detail: &str) {
        let word = serde_json::to_value(outcome)
            .ok()
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_default();
        let text = if detail.is_empty() {
            format!("  {vm}: {word}")
        } else {
            format!("  {vm}: {word} ({detail})")
        };
        match self
            .bars
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&wave)
        {
            Some(bar) => {
                bar.inc(1);
                bar.set_message(format!("{vm} {word}"));
                if outcome != Outcome::Patched {
                    bar.println(text);
                }
            }
            None => self.line(&text),
        }
    }

    fn note(&self, msg: &str) {
        self.line(&format!("  {msg}"));
    }

    fn wave_end(&self, wave: usize, ok: bool) {
        if let Some(bar) = self
            .bars
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&wave)
        {
            bar.finish_with_message(if ok { "ok" } else { "FAILED" });
            return;
        }
        self.line(&format!(
            "{}: wave {} {}",
            self.name,
            wave + 1,
            if ok { "ok" } else { "FAILED" }
        ));
    }
}

/// This host's VMs, through their control sockets in the run directory.
struct SocketFleet;

fn fleet_error(e: ClientError) -> FleetError {
    match &e {
        ClientError::UnknownVm { .. }
        | ClientError::StaleSocket { .. }
        | ClientError::Io { .. } => FleetError::Gone(e.to_string()),
        ClientError::Remote(b) => match b.code {
            ErrorCode::Busy | ErrorCode::TooManyClients => FleetError::Busy(b.message.clone()),
            ErrorCode::NotRunning => FleetError::Gone(b.message.clone()),
            _ => FleetError::Failed(b.message.clone()),
        },
        _ => FleetError::Failed(e.to_string()),
    }
}

fn call<T: serde::de::DeserializeOwned>(vm: &str, req: &Request) -> Result<T, FleetError> {
    let mut c = Client::connect(vm, &paths::socket_path(vm)).map_err(fleet_error)?;
    match c.call_as(req) {
        // A broken or timed-out connection is a dead VMM only if a new one
        // cannot be made: a slow answer to a patch is not a VM gone.
        Err(e @ ClientError::Io { .. }) => match Client::connect(vm, &paths::socket_path(vm)) {
            Err(gone) => Err(FleetError::Gone(format!("{e}; {gone}"))),
            Ok(_) => Err(FleetError::Failed(format!(
                "{e} (the VMM still answers: the request's outcome is unknown)"
            ))),
        },
        other => other.map_err(fleet_error),
    }
}

/// Takes an exclusive lock on `path`, writing `who` into it; says who holds
/// it otherwise.
fn lock(path: &Path, who: &str) -> Result<Flock<File>, String> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    // `campaign status` and `abort` look with a shared lock held for a
    // moment: a lock busy only that long is not another campaign.
    let end = Instant::now() + Duration::from_millis(300);
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut l) => {
                let _ = nix::unistd::ftruncate(&*l, 0);
                let _ = l.write_all(who.as_bytes());
                let _ = l.flush();
                return Ok(l);
            }
            Err((f, _)) if Instant::now() < end => {
                file = f;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((mut f, _)) => {
                let mut s = String::new();
                let _ = f.read_to_string(&mut s);
                return Err(s.trim().to_owned());
            }
        }
    }
}

impl Fleet for SocketFleet {
    fn running(&self) -> Result<Vec<(String, campaign::Labels)>, String> {
        let dir = paths::run_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("cannot list run directory {}: {e}", dir.display())),
        };
        let mut out = Vec::new();
        let mut silent = Vec::new();
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".sock") else {
                continue;
            };
            let status = Client::connect(id, &paths::socket_path(id)).and_then(|mut c| {
                c.set_timeout(Some(Duration::from_secs(10)))?;
                c.call_as::<StatusInfo>(&Request::Status)
            });
            match status {
                Ok(s) if s.protocol < PROTOCOL_VERSION => silent.push(format!(
                    "{id} (its VMM speaks protocol {}, without the health checks of {PROTOCOL_VERSION}: restart or upgrade it)",
                    s.protocol
                )),
                Ok(s) => out.push((s.id, s.labels)),
                // A dead VMM's socket is not a running VM.
                Err(ClientError::UnknownVm { .. } | ClientError::StaleSocket { .. }) => {}
                // A VMM that does not answer could be a target: say so
                // rather than leave it out of the campaign unnoticed.
                Err(e) => silent.push(format!("{id} ({e})")),
            }
        }
        if !silent.is_empty() {
            return Err(format!(
                "cannot tell which VMs of {} the plan targets: {}",
                dir.display(),
                silent.join("; ")
            ));
        }
        Ok(out)
    }

    fn lock_vm(&self, vm: &str, owner: &str) -> Result<Held, String> {
        let path = paths::run_dir().join(format!("{vm}.campaign"));
        let who = format!("campaign {owner} (pid {})", std::process::id());
        lock(&path, &who)
            .map(|l| Box::new(l) as Held)
            .map_err(|other| format!("VM {vm} is in another campaign: {other}"))
    }

    fn lock_file(&self, path: &Path) -> Result<Held, String> {
        let who = format!("pid {}", std::process::id());
        lock(path, &who)
            .map(|l| Box::new(l) as Held)
            .map_err(|other| {
                format!(
                    "this plan's campaign is already running ({other}; lock {})",
                    path.display()
                )
            })
    }

    fn patches(&self, vm: &str) -> Result<Vec<String>, FleetError> {
        // `verify` names them without hashing the kernel's text as
        // `patches` does.
        let v: VerifyReport = call(vm, &Request::Verify)?;
        Ok(v.applied)
    }

    fn apply(&self, vm: &str, file: &Path, replace: bool) -> Result<f64, FleetError> {
        let r: PatchReport = call(
            vm,
            &Request::Patch {
                path: file.display().to_string(),
                replace,
                mode: None,
            },
        )?;
        Ok(r.pause_us)
    }

    fn revert(&self, vm: &str, name: &str) -> Result<f64, FleetError> {
        let r: PatchReport = call(
            vm,
            &Request::Revert {
                name: name.to_owned(),
            },
        )?;
        Ok(r.pause_us)
    }

    fn log_seq(&self, vm: &str) -> Result<u64, FleetError> {
        let d: DmesgInfo = call(vm, &Request::Dmesg { since: u64::MAX })?;
        Ok(d.next)
    }

    fn log_problems(&self, vm: &str, since: u64) -> Result<LogCheck, FleetError> {
        let d: DmesgInfo = call(vm, &Request::Dmesg { since })?;
        let problems = d
            .records
            .iter()
            .filter(|r| update_engine::klog::problem(&r.text).is_some())
            .map(|r| r.text.clone())
            .collect();
        Ok(LogCheck {
            problems,
            lost: d.lost,
            next: d.next,
        })
    }

    fn alive(&self, vm: &str, timeout: Duration) -> Result<String, FleetError> {
        let a: AliveInfo = call(
            vm,
            &Request::Alive {
                // The VMM waits at most a minute for a tick.
                timeout_ms: timeout.min(Duration::from_secs(60)).as_millis() as u64,
            },
        )?;
        Ok(format!(
            "{} advanced {} -> {} in {} ms",
            a.symbol, a.before, a.after, a.waited_ms
        ))
    }

    fn verify(&self, vm: &str) -> Result<Vec<String>, FleetError> {
        let v: VerifyReport = call(vm, &Request::Verify)?;
        Ok(v.problems)
    }
}
