//! Live VMM upgrade: the running VMM hands its guest to a new lucos
//! process (docs/upgrade.md).
//!
//! The old process starts the new binary (`lucos takeover`, hidden) with
//! one end of a socket pair and, while the guest runs on:
//!
//! 1. reads the new process's `hello` (its version and the handover
//!    formats it reads);
//! 2. sends `setup`: the VM's identity, patches, trusted keys, protections,
//!    tracked data and counters, with the guest's memfds, the control
//!    socket, the VM's lock and the serial log attached (SCM_RIGHTS); the
//!    new process builds its KVM VM over the same memory and answers
//!    `prepared`;
//! 3. stops taking connections, pauses the guest, sends `state` (the
//!    machine state: vCPUs, clock, interrupt controllers, devices); the new
//!    process loads it and answers `ready`;
//! 4. commits: sends `go`; the new process starts its vCPUs and answers
//!    `running`; the old one answers the client and exits.
//!
//! Until the commit, any failure (the new binary exits, hangs, refuses the
//! format, fails to load the state) kills the new process and resumes the
//! guest in the old one, as it was. After it, the guest belongs to the new
//! process.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use vmm_core::control::{AcceptGate, ErrorCode, Request, Response, UpgradeInfo};
use vmm_core::devices::SerialSink;
use vmm_core::handoff::Channel;
use vmm_core::snapshot::MachineState;
use vmm_core::write_control::{Protection, WriteCarry};
use vmm_core::Vm;

use crate::error::{exit, CliError};
use crate::server::{ControlServer, VmIdentity};

/// The newest handover format this build writes (docs/upgrade.md): 3 when
/// a cumulative patch carries a data change over (its owner is not its
/// patch's, which a reader of 2 would assume) or lucos's exception index
/// is installed (a reader of 2 would drop it, hook and all); 2 when the
/// VM has patches of modules (held patches, module parts, watches a lucos
/// without modules would refuse guest writes to); else 1.
pub const FORMAT: u32 = 4;
/// The oldest handover format this build reads.
pub const OLDEST_FORMAT: u32 = 1;
/// How long a new process has by default, from its start to the guest
/// running in it.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// The descriptor the new process finds its end of the channel on.
const CHANNEL_FD: RawFd = 3;

/// This binary's version, as `status` and `hello` report it.
pub fn version() -> String {
    format!("lucos {}", env!("CARGO_PKG_VERSION"))
}

/// The handover formats this binary reads: (oldest, newest). Tests of a
/// refused handover narrow it with LUCOS_HANDOFF_READS=N (reads only N),
/// as an older binary would be.
fn formats_read() -> (u32, u32) {
    match std::env::var("LUCOS_HANDOFF_READS")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        Some(n) => (n, n),
        None => (OLDEST_FORMAT, FORMAT),
    }
}

/// The handover format `service` needs: 4 with code of replaced patches
/// kept, 3 with a carried data change or the exception index, 2 with
/// module state, else 1 (which a lucos of before modules reads).
fn format_of(service: &ServiceState) -> u32 {
    let p = &service.patches;
    if !p.kept_code.is_empty() {
        return 4;
    }
    let modules = !p.held.is_empty()
        || p.applied.iter().any(|a| !a.modules.is_empty())
        || service
            .protections
            .iter()
            .any(|x| x.owner.starts_with(update_engine::protect::WATCH_PREFIX));
    let carried = p
        .applied
        .iter()
        .any(|a| !a.held_runs.is_empty() || a.data.iter().any(|d| d.owner.is_some()));
    if carried || p.extables.is_some() {
        3
    } else if modules {
        2
    } else {
        1
    }
}

/// Everything of the VM but its memory and machine state.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceState {
    /// Id, kernel, command line, memory size, labels.
    pub ident: VmIdentity,
    /// Public keys whose patches the VM accepts.
    pub trusted: Vec<[u8; 32]>,
    /// Applied patches, saved bytes, patch-area allocations.
    pub patches: update_engine::patcher::PatchState,
    /// Who may write kernel text.
    pub writers: update_engine::protect::Writers,
    /// Data changes being kept coherent.
    pub tracked: Vec<update_engine::data::TrackedState>,
    /// Write control's protected ranges.
    pub protections: Vec<Protection>,
    /// Pauses served.
    pub pauses: u64,
    /// The last pause's duration (u64::MAX: none yet).
    pub last_pause_ns: u64,
    /// Upgrades before this one.
    pub upgrades: u64,
    /// `--protect-kernel` writers, if the kernel text is not protected yet.
    pub protect_pending: Option<Vec<String>>,
    /// Write control's counters and event log so far (the machine state
    /// brings what came after).
    pub write: WriteCarry,
}

/// The process side of a VM: what `lucos run` was given that the new
/// process needs too.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessState {
    /// vCPUs.
    pub vcpus: u8,
    /// The patch area's guest-physical base.
    pub area_gpa: u64,
    /// Copy serial output to stdout.
    pub stdout: bool,
    /// A serial log file is attached.
    pub serial_log: bool,
    /// The binary the new process runs (its own default for the next
    /// upgrade).
    pub binary: String,
    /// The CPUID each vCPU was given (kept: the new binary's own policy
    /// may differ).
    pub cpuids: Vec<Vec<vmm_core::snapshot::CpuidEntry>>,
}

/// The machine state and the counters that move while the guest runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct PausedState {
    /// vCPUs, clock, interrupt controllers, devices.
    pub machine: MachineState,
    /// Write control's counters and events.
    pub write: WriteCarry,
    /// Data-change counters.
    pub data: Vec<(String, [u64; 3])>,
    /// Guest uptime so far.
    pub uptime_ms: u64,
}

/// A message on the handover channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum Msg {
    /// New -> old: who it is, what it reads.
    Hello {
        version: String,
        pid: u32,
        reads: (u32, u32),
    },
    /// Old -> new (with files: RAM, patch area, control socket, lock,
    /// serial log): everything but the machine state.
    Setup {
        format: u32,
        process: ProcessState,
        service: Box<ServiceState>,
    },
    /// New -> old: VM built, waiting for the state.
    Prepared,
    /// Old -> new: the paused guest's state.
    State {
        format: u32,
        state: Box<PausedState>,
    },
    /// New -> old: state loaded, vCPUs not started.
    Ready,
    /// Old -> new: the guest is yours.
    Go,
    /// New -> old: vCPUs started at `started_ns` (CLOCK_MONOTONIC).
    Running { started_ns: u64 },
    /// New -> old: it cannot go on.
    Failed { message: String },
}

/// What a VMM process needs to hand its guest over (set by `lucos run`).
#[derive(Debug)]
pub struct HandoffCtx {
    /// The control socket (a second descriptor of it).
    pub listener: OwnedFd,
    /// The VM's lock file (a second descriptor; the lock is the open file's).
    pub lock: OwnedFd,
    /// The serial log (same open file, so the same offset).
    pub serial_log: Option<File>,
    /// Copy serial output to stdout.
    pub stdout: bool,
    /// The binary this VMM was started from.
    pub binary: PathBuf,
    /// Stops the accept loop while the socket changes hands.
    pub gate: Arc<AcceptGate>,
}

/// CLOCK_MONOTONIC, which both processes share, in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The old side, a failure before the commit: the new process is killed
/// and the guest resumed as it was.
struct Attempt<'a> {
    server: &'a ControlServer,
    child: Option<Child>,
    paused: bool,
    held: Option<Arc<AcceptGate>>,
    /// The guest went to the new process: nothing may be undone.
    committed: bool,
}

impl Drop for Attempt<'_> {
    /// Whatever ends an attempt before its commit (an error, a panic)
    /// undoes it.
    fn drop(&mut self) {
        if !self.committed {
            self.undo();
        }
    }
}

impl Attempt<'_> {
    fn undo(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.paused {
            if let Err(e) = self.server.vm().resume() {
                log::error!("upgrade: resuming the guest after a failed handover: {e}");
            }
            self.paused = false;
        }
        if let Some(g) = self.held.take() {
            g.release();
        }
    }

    /// Why the new process stopped answering: its exit status if it ended.
    fn child_gone(&mut self, e: &std::io::Error, stage: &str) -> String {
        if let Some(c) = self.child.as_mut() {
            // Give an exiting process a moment to be reaped.
            for _ in 0..50 {
                if let Ok(Some(status)) = c.try_wait() {
                    return format!("the new lucos exited {stage} ({status})");
                }
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("the new lucos did not answer {stage} in time")
            }
            _ => format!("the new lucos failed {stage}: {e}"),
        }
    }
}

/// Serves `upgrade`: hands the guest to `binary` (default: the one this
/// VMM was started from), or leaves it running here and says why.
pub fn hand_over(server: &ControlServer, binary: Option<&str>, limit: Duration) -> Response {
    let t0 = Instant::now();
    let ctx = server.handoff.lock().unwrap_or_else(|e| e.into_inner());
    let Some(ctx) = ctx.as_ref() else {
        return Response::err(
            ErrorCode::UpgradeFailed,
            "this VMM cannot hand its guest over (it was not started by `lucos run`)",
        );
    };
    let binary = binary
        .map(PathBuf::from)
        .unwrap_or_else(|| ctx.binary.clone());
    let mut a = Attempt {
        server,
        child: None,
        paused: false,
        held: None,
        committed: false,
    };
    match attempt(&mut a, ctx, &binary, limit, t0) {
        Ok(info) => {
            // The new process outlives this one; it is not waited for.
            drop(a.child.take());
            Response::ok(info)
        }
        Err(Failure::Before(why)) => {
            a.undo();
            log::warn!("upgrade to {} failed: {why}", binary.display());
            Response::err(
                ErrorCode::UpgradeFailed,
                format!(
                    "upgrade to {} failed; the guest runs on in this VMM (pid {}): {why}",
                    binary.display(),
                    std::process::id()
                ),
            )
        }
        Err(Failure::After(why)) => {
            log::error!("upgrade: {why}");
            Response::err(ErrorCode::Internal, why)
        }
    }
}

enum Failure {
    /// Nothing changed: undo and keep the guest.
    Before(String),
    /// After the commit: the guest is the new process's.
    After(String),
}

/// In the forked child: puts the channel at CHANNEL_FD, without
/// close-on-exec.
fn to_channel_fd(fd: RawFd) -> std::io::Result<()> {
    let rc = if fd == CHANNEL_FD {
        // SAFETY: fcntl on a descriptor this process has open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }
    } else {
        // SAFETY: dup2 of a descriptor this process has open.
        unsafe { libc::dup2(fd, CHANNEL_FD) }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn spawn(binary: &PathBuf, theirs: &UnixStream) -> Result<Child, String> {
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.arg("takeover")
        .arg("--fd")
        .arg(CHANNEL_FD.to_string())
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and calls
    // only dup2 and fcntl (in `to_channel_fd`), which are async-signal-safe.
    unsafe { cmd.pre_exec(move || to_channel_fd(fd)) };
    cmd.spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))
}

fn attempt(
    a: &mut Attempt<'_>,
    ctx: &HandoffCtx,
    binary: &PathBuf,
    limit: Duration,
    t0: Instant,
) -> Result<UpgradeInfo, Failure> {
    let server = a.server;
    let vm = server.vm();
    let before = Failure::Before;
    let (ours, theirs) = UnixStream::pair().map_err(|e| before(format!("socket pair: {e}")))?;
    a.child = Some(spawn(binary, &theirs).map_err(before)?);
    drop(theirs);
    let mut ch = Channel::new(ours);
    let left = |ch: &Channel| {
        let t = limit
            .saturating_sub(t0.elapsed())
            .max(Duration::from_millis(1));
        ch.set_timeout(Some(t))
    };

    // 1. hello
    left(&ch).map_err(|e| before(format!("setting the channel's time limit: {e}")))?;
    let (version, new_pid, reads) = match ch.recv::<Msg>() {
        Ok((
            Msg::Hello {
                version,
                pid,
                reads,
            },
            _,
        )) => {
            log::info!("upgrade: {version} (pid {pid}) reads handover formats {reads:?}");
            (version, pid, reads)
        }
        Ok((other, _)) => return Err(before(format!("unexpected first message {other:?}"))),
        Err(e) => return Err(before(a.child_gone(&e, "at start"))),
    };

    // 2. setup, with the files.
    let service = server.export();
    let format = format_of(&service);
    if format == 2 && reads.1 < 2 {
        return Err(before(format!(
            "the new lucos ({version}) reads handover formats up to {}; this VM's state needs \
             format {format} (patches of kernel modules)",
            reads.1
        )));
    }
    let events_sent = service.write.next_event.saturating_sub(1);
    let process = ProcessState {
        vcpus: vm.vcpu_count(),
        area_gpa: vm.area_gpa(),
        stdout: ctx.stdout,
        serial_log: ctx.serial_log.is_some(),
        binary: binary.display().to_string(),
        cpuids: vm.cpuid_entries().to_vec(),
    };
    let [ram, area] = vm.memfds();
    let mut fds = vec![ram, area, ctx.listener.as_raw_fd(), ctx.lock.as_raw_fd()];
    if let Some(f) = &ctx.serial_log {
        fds.push(f.as_raw_fd());
    }
    let setup = Msg::Setup {
        format,
        process,
        service: Box::new(service),
    };
    ch.send(&setup, &fds)
        .map_err(|e| before(a.child_gone(&e, "taking the setup")))?;
    left(&ch).map_err(|e| before(format!("setting the channel's time limit: {e}")))?;
    match ch.recv::<Msg>() {
        Ok((Msg::Prepared, _)) => {}
        Ok((Msg::Failed { message }, _)) => return Err(before(message)),
        Ok((other, _)) => return Err(before(format!("unexpected message {other:?}"))),
        Err(e) => return Err(before(a.child_gone(&e, "building its VM"))),
    }

    // 3. the pause: no new connections, the guest stopped, its state sent.
    a.held = Some(ctx.gate.clone());
    if !ctx.gate.hold() {
        return Err(before(
            "the control socket's accept loop did not stop within a second".into(),
        ));
    }
    let (pause, pauses) = vm
        .pause_for_save()
        .map_err(|e| before(format!("pausing the guest: {e}")))?;
    a.paused = true;
    // A vCPU held for a module event (a module being loaded or unloaded)
    // waits for this process's modules thread: handed over, its event would
    // be lost.
    if vm.control().held() > 0 {
        return Err(before(
            "a guest module is being loaded or unloaded and lucos is dealing with it (a vCPU \
             is held): try again"
                .into(),
        ));
    }
    let paused_ns = monotonic_ns();
    let machine = vm
        .save_machine()
        .map_err(|e| before(format!("saving the machine state: {e}")))?;
    let tsc_khz = machine.vcpus.first().and_then(|v| v.tsc_khz);
    let state = Msg::State {
        format,
        state: Box::new(PausedState {
            machine,
            write: vm.write_control().carried(events_sent),
            data: server.data_counts(),
            uptime_ms: vm.uptime().as_millis() as u64,
        }),
    };
    let state_bytes = ch
        .send(&state, &[])
        .map_err(|e| before(a.child_gone(&e, "taking the state")))? as u64;
    left(&ch).map_err(|e| before(format!("setting the channel's time limit: {e}")))?;
    match ch.recv::<Msg>() {
        Ok((Msg::Ready, _)) => {}
        Ok((Msg::Failed { message }, _)) => return Err(before(message)),
        Ok((other, _)) => return Err(before(format!("unexpected message {other:?}"))),
        Err(e) => return Err(before(a.child_gone(&e, "loading the state"))),
    }

    // 4. commit. A VM being stopped (`lucos stop`, a signal) is not
    // handed over. From here this process refuses every request and its
    // vCPUs never run again; if `go` cannot be sent whole, the new process
    // never starts the guest and it is taken back.
    if vm.control().stopping() {
        return Err(before("the VM is being stopped".into()));
    }
    server.handed_to.store(new_pid, Ordering::SeqCst);
    if !vm.control().set_handed_over(true) {
        server.handed_to.store(0, Ordering::SeqCst);
        return Err(before("the VM is being stopped".into()));
    }
    if let Err(e) = ch.send(&Msg::Go, &[]) {
        vm.control().set_handed_over(false);
        server.handed_to.store(0, Ordering::SeqCst);
        return Err(before(
            a.child_gone(&e, "before it could be given the guest"),
        ));
    }
    a.committed = true;
    // The new process passes the partial output line on.
    vm.forget_serial_pending();
    let _ = ch.set_timeout(Some(Duration::from_secs(10)));
    let started_ns = match ch.recv::<Msg>() {
        Ok((Msg::Running { started_ns }, _)) => started_ns,
        Ok((other, _)) => {
            return Err(Failure::After(format!(
                "the new VMM (pid {new_pid}) was given the guest and answered {other:?}"
            )))
        }
        Err(e) => {
            return Err(Failure::After(format!(
                "the new VMM (pid {new_pid}) was given the guest and did not report it running \
                 ({e}); it may run it still: see its log"
            )))
        }
    };
    let upgrades = server.upgrades.fetch_add(1, Ordering::SeqCst) + 1;
    Ok(UpgradeInfo {
        old_pid: std::process::id(),
        new_pid,
        binary: binary.display().to_string(),
        version,
        upgrades,
        downtime_us: started_ns.saturating_sub(paused_ns) as f64 / 1e3 + pause.as_secs_f64() * 1e6,
        pause_us: pause.as_secs_f64() * 1e6,
        pauses,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        state_bytes,
        tsc_khz,
    })
}

/// Arguments of `lucos upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// VM id.
    #[arg(long)]
    pub vm: String,
    /// The new lucos binary (default: the path the VMM was started from,
    /// which a package update may have replaced).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Seconds the new VMM has to take the guest over before the old one
    /// gives up and keeps it.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `lucos upgrade`.
pub fn upgrade(args: UpgradeArgs) -> Result<i32, CliError> {
    let binary = match &args.binary {
        Some(b) => Some(
            std::fs::canonicalize(b)
                .map_err(|e| CliError::io(format!("cannot find {}", b.display()), e))?
                .display()
                .to_string(),
        ),
        None => None,
    };
    let mut client = crate::client::connect(&args.vm)?;
    let status: vmm_core::control::StatusInfo = client.call_as(&Request::Status)?;
    if status.protocol < 3 {
        return Err(CliError::BadState(format!(
            "VM {}'s VMM (pid {}) speaks control protocol {}, and live upgrade needs 3: \
             it is older than live upgrade and can only be restarted",
            args.vm, status.pid, status.protocol
        )));
    }
    let info: UpgradeInfo = client.call_as(&Request::Upgrade {
        binary,
        timeout_ms: Some(args.timeout.saturating_mul(1000)),
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).unwrap_or_default()
        );
    } else {
        println!(
            "VM {} now runs in {} (pid {}, was {}): downtime {:.2} ms, upgrade {} of this VM, {:.0} ms in all",
            args.vm,
            info.version,
            info.new_pid,
            info.old_pid,
            info.downtime_us / 1e3,
            info.upgrades,
            info.total_ms
        );
    }
    Ok(exit::OK)
}

/// Arguments of `lucos takeover` (started by a VMM handing its guest over).
#[derive(Debug, Args)]
pub struct TakeoverArgs {
    /// The channel to the old VMM.
    #[arg(long)]
    pub fd: RawFd,
}

/// `lucos takeover`: the new side.
pub fn takeover(args: TakeoverArgs) -> Result<i32, CliError> {
    // SAFETY: the old VMM put its end of the channel at this descriptor,
    // which nothing else in this process owns.
    let stream = unsafe { UnixStream::from_raw_fd(args.fd) };
    let mut ch = Channel::new(stream);
    let reads = formats_read();
    let fail = |ch: &mut Channel, message: String| -> CliError {
        let _ = ch.send(
            &Msg::Failed {
                message: message.clone(),
            },
            &[],
        );
        CliError::Other(message)
    };
    ch.send(
        &Msg::Hello {
            version: version(),
            pid: std::process::id(),
            reads,
        },
        &[],
    )
    .map_err(|e| CliError::io("the handover channel".into(), e))?;
    let (msg, files) = ch
        .recv::<Msg>()
        .map_err(|e| CliError::io("the handover channel".into(), e))?;
    let Msg::Setup {
        format,
        process,
        service,
    } = msg
    else {
        return Err(fail(&mut ch, format!("expected the setup, got {msg:?}")));
    };
    if format < reads.0 || format > reads.1 {
        return Err(fail(
            &mut ch,
            format!(
                "the new lucos ({}) cannot read handover format {format}: it reads formats {}..={}",
                version(),
                reads.0,
                reads.1
            ),
        ));
    }
    let want = 4 + usize::from(process.serial_log);
    if files.len() != want {
        return Err(fail(
            &mut ch,
            format!("the setup carried {} files, not {want}", files.len()),
        ));
    }
    let mut files = files.into_iter();
    let mut next = || files.next().expect("counted above");
    let (ram, area, listener, lock) = (next(), next(), next(), next());
    let serial_log = process.serial_log.then(&mut next);
    let listener = UnixListener::from(OwnedFd::from(listener));

    let signals = crate::run::block_signals()?;
    let sink = SerialSink::new(
        process.stdout,
        serial_log.as_ref().and_then(|f| f.try_clone().ok()),
        None,
    );
    let vm = Vm::adopt(
        service.ident.mem_bytes,
        ram,
        area,
        process.area_gpa,
        process.vcpus,
        sink,
        &process.cpuids,
    )
    .map_err(|e| {
        fail(
            &mut ch,
            format!("building the VM: {}", crate::error::chain(&e)),
        )
    })?;
    let vm = Arc::new(vm);
    let server = ControlServer::import(vm.clone(), &service)
        .map_err(|e| fail(&mut ch, format!("taking the VM's state: {e}")))?;
    let gate = Arc::new(
        AcceptGate::new().map_err(|e| fail(&mut ch, format!("control socket gate: {e}")))?,
    );
    ch.send(&Msg::Prepared, &[])
        .map_err(|e| CliError::io("the handover channel".into(), e))?;

    let (msg, _) = ch
        .recv::<Msg>()
        .map_err(|e| CliError::io("the handover channel".into(), e))?;
    let Msg::State { format, state } = msg else {
        return Err(fail(&mut ch, format!("expected the state, got {msg:?}")));
    };
    if format < reads.0 || format > reads.1 {
        return Err(fail(
            &mut ch,
            format!("the new lucos cannot read machine-state format {format}"),
        ));
    }
    vm.load_machine(&state.machine).map_err(|e| {
        fail(
            &mut ch,
            format!("loading the state: {}", crate::error::chain(&e)),
        )
    })?;
    vm.write_control().carry_on(&service.write);
    vm.write_control().carry_on(&state.write);
    server.set_data_counts(&state.data);
    vm.carry_uptime(Duration::from_millis(state.uptime_ms));
    ch.send(&Msg::Ready, &[])
        .map_err(|e| CliError::io("the handover channel".into(), e))?;

    // Once `go` arrives the guest is ours; without it (the old VMM gave
    // up, or died) this process must never run it.
    ch.set_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| CliError::io("the handover channel".into(), e))?;
    match ch.recv::<Msg>() {
        Ok((Msg::Go, _)) => {}
        Ok((other, _)) => return Err(CliError::Other(format!("expected go, got {other:?}"))),
        Err(e) => return Err(CliError::io("waiting for the old VMM's go".into(), e)),
    }
    vm.start()?;
    let started_ns = monotonic_ns();
    let _ = ch.send(&Msg::Running { started_ns }, &[]);
    drop(ch);
    // The lock file names the VMM that holds the VM: this one now.
    {
        use std::os::unix::fs::FileExt;
        let _ = lock.set_len(0);
        let _ = lock.write_at(std::process::id().to_string().as_bytes(), 0);
    }
    eprintln!(
        "lucos: VM {} taken over by pid {} ({}), upgrade {}",
        service.ident.id,
        std::process::id(),
        version(),
        service.upgrades + 1
    );
    server
        .upgrades
        .store(service.upgrades + 1, Ordering::SeqCst);
    let ctx = HandoffCtx {
        listener: listener
            .try_clone()
            .map(OwnedFd::from)
            .map_err(|e| CliError::io("control socket".into(), e))?,
        lock: OwnedFd::from(lock),
        serial_log,
        stdout: process.stdout,
        binary: PathBuf::from(&process.binary),
        gate: gate.clone(),
    };
    *server.handoff.lock().unwrap_or_else(|e| e.into_inner()) = Some(ctx);
    let sock = crate::paths::socket_path(&service.ident.id);
    match crate::run::serve_vm(vm, Arc::new(server), listener, gate, sock, signals)? {
        crate::run::HANDED_OVER => Ok(exit::OK),
        code => Ok(code),
    }
}
