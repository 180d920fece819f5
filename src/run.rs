//! `lucos run`: the VMM process of one VM.
//!
//! Phases: check arguments -> take the VM id's lock -> create the VM (KVM,
//! RAM, kernel, devices, vCPUs) -> bind the control socket -> start the
//! vCPUs -> serve until the guest ends or is stopped -> clean up.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use std::os::fd::AsFd;

use vmm_core::control::{bind_socket, AcceptGate, Client, Request};
use vmm_core::devices::SerialSink;
use vmm_core::{ExitReason, Vm, VmConfig};

use crate::error::{exit, CliError};
use crate::paths;
use crate::server::{ControlServer, VmIdentity};
use crate::upgrade::HandoffCtx;

/// Arguments of `lucos run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// VM id (names its control socket).
    #[arg(long)]
    pub vm: String,
    /// Kernel image (ELF).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// Also write the guest's serial output to this file.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Do not copy the guest's serial output to stdout.
    #[arg(long)]
    pub quiet: bool,
    /// Start the VM in the background and return once its control socket answers.
    #[arg(long)]
    pub detach: bool,
    /// Public key (from `lucos keygen`) whose signed patches this VM accepts;
    /// repeat for several. Without one, every patch is refused.
    #[arg(long = "trusted-key")]
    pub trusted_keys: Vec<PathBuf>,
    /// Kernel text integrity once the kernel has booted (as `lucos protect
    /// --kernel-text`): on Linux when it has made its text read-only, on
    /// other kernels when a vCPU runs in user mode.
    #[arg(long)]
    pub protect_kernel: bool,
    /// With --protect-kernel: a function also allowed to write kernel text (repeatable).
    #[arg(long, requires = "protect_kernel")]
    pub allow_writer: Vec<String>,
    /// A label KEY=VALUE for campaigns to select the VM by (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
}

/// `KEY=VALUE`, the key of letters, digits, `_`, `.`, `-`, `/`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label '{s}' is not KEY=VALUE"))?;
    let key_ok = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'));
    if !key_ok {
        return Err(format!(
            "label key '{k}': use letters, digits, '_', '.', '-' or '/'"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Runs the VMM (or, with --detach, starts it in the background).
pub fn run(args: RunArgs) -> Result<i32, CliError> {
    paths::validate_id(&args.vm)?;
    for (i, (k, _)) in args.labels.iter().enumerate() {
        if args.labels[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(CliError::Usage(format!("--label {k} is given twice")));
        }
    }
    let mem_bytes = paths::parse_mem(&args.mem)?;
    if args.vcpus == 0 || args.vcpus > vmm_core::vm::MAX_VCPUS {
        return Err(CliError::Usage(format!(
            "--vcpus must be between 1 and {}, got {}",
            vmm_core::vm::MAX_VCPUS,
            args.vcpus
        )));
    }
    let mut trusted = Vec::new();
    for k in &args.trusted_keys {
        trusted.push(crate::patch::read_public_key(k)?);
    }
    // Bad images fail here, in the foreground, even with --detach.
    vmm_core::vm::check_bootable(&args.kernel, mem_bytes)?;
    paths::ensure_run_dir()?;
    if args.detach {
        return detach(&args);
    }

    // The lock lives as long as this process: it is what makes an id "running".
    let lock = paths::lock_vm(&args.vm)?;
    let sock = paths::socket_path(&args.vm);
    if sock.exists() {
        // We hold the lock, so whoever made this socket is gone.
        eprintln!(
            "lucos: removing stale socket {} left by a dead VMM",
            sock.display()
        );
        std::fs::remove_file(&sock)
            .map_err(|e| CliError::io(format!("cannot remove {}", sock.display()), e))?;
    }

    let signals = block_signals()?;
    let serial_log = match &args.serial_log {
        Some(p) => Some(
            File::create(p)
                .map_err(|e| CliError::io(format!("cannot create {}", p.display()), e))?,
        ),
        None => None,
    };
    // A second descriptor of the same open file (same offset), for a VMM
    // the guest is handed to.
    let serial_log_handoff = match &serial_log {
        Some(f) => Some(
            f.try_clone()
                .map_err(|e| CliError::io("cannot duplicate the serial log".into(), e))?,
        ),
        None => None,
    };
    let vm = Vm::create(VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        vcpus: args.vcpus,
        mem_bytes,
        serial: SerialSink::new(!args.quiet, serial_log, None),
    })?;
    let listener = bind_socket(&sock)
        .map_err(|e| CliError::io(format!("cannot bind control socket {}", sock.display()), e))?;
    vm.start()?;
    let vm = Arc::new(vm);

    let server = ControlServer::new(
        vm.clone(),
        VmIdentity {
            id: args.vm.clone(),
            kernel: args.kernel.display().to_string(),
            cmdline: args.cmdline.clone(),
            mem_bytes,
            labels: args.labels.iter().cloned().collect(),
        },
    )
    .with_trusted_keys(trusted);
    if args.protect_kernel {
        *server
            .protect_pending
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(args.allow_writer.clone());
    }
    let gate = Arc::new(
        AcceptGate::new().map_err(|e| CliError::io("cannot create an eventfd".into(), e))?,
    );
    let dup = |fd: std::os::fd::BorrowedFd<'_>, what: &str| {
        fd.try_clone_to_owned()
            .map_err(|e| CliError::io(format!("cannot duplicate the {what}"), e))
    };
    *server.handoff.lock().unwrap_or_else(|e| e.into_inner()) = Some(HandoffCtx {
        listener: dup(listener.as_fd(), "control socket")?,
        lock: dup(lock.as_fd(), "lock file")?,
        serial_log: serial_log_handoff,
        stdout: !args.quiet,
        binary: std::env::current_exe()
            .map_err(|e| CliError::io("cannot find the lucos binary".into(), e))?,
        gate: gate.clone(),
    });
    let code = serve_vm(vm, Arc::new(server), listener, gate, sock, signals);
    if matches!(code, Ok(HANDED_OVER)) {
        // The lock is the new VMM's now: unlocking it on the way out
        // (Flock's drop) would release it for that process too.
        std::mem::forget(lock);
        return Ok(exit::OK);
    }
    code
}

/// What [`serve_vm`] returns when the guest was handed to another process.
pub const HANDED_OVER: i32 = -1;

/// Blocks SIGINT and SIGTERM in this thread, before any other thread
/// exists, so every thread inherits the mask: a thread of their own takes
/// them ([`serve_vm`]).
pub fn block_signals() -> Result<SigSet, CliError> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| CliError::io("cannot block signals".into(), e.into()))?;
    Ok(signals)
}

/// Serves a running VM until it ends: the retire and protect-kernel
/// threads, the control socket, the signals. Returns the exit code, or
/// [`HANDED_OVER`] when the guest went to a new VMM process.
pub fn serve_vm(
    vm: Arc<Vm>,
    server: Arc<ControlServer>,
    listener: std::os::unix::net::UnixListener,
    gate: Arc<AcceptGate>,
    sock: PathBuf,
    signals: SigSet,
) -> Result<i32, CliError> {
    let id = server.identity().id.clone();
    {
        // Data changes retire in the background (a pause only while one is
        // tracked and could retire).
        let (server, ctl) = (server.clone(), vm.control());
        std::thread::Builder::new()
            .name("retire".into())
            .spawn(move || {
                while ctl.wait_stopped(Some(Duration::from_millis(500))).is_none() {
                    server.retire_tick();
                }
            })
            .map_err(|e| CliError::io("cannot start the retire thread".into(), e))?;
    }
    {
        // Watched writes about the guest's modules (a patch held for a
        // module being loaded, a patched module being unloaded) hold their
        // vCPU until this thread has dealt with them.
        let (server, ctl) = (server.clone(), vm.control());
        std::thread::Builder::new()
            .name("modules".into())
            .spawn(move || {
                while ctl.exit_reason().is_none() {
                    if let Some(ev) = server.next_module_event(Duration::from_millis(500)) {
                        let t0 = std::time::Instant::now();
                        // Whatever happens, the held vCPU goes on.
                        let dealt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            server.module_event(&ev)
                        }));
                        if dealt.is_err() {
                            log::error!("dealing with a module event ({ev:?}) panicked");
                        }
                        ctl.release(usize::from(ev.vcpu()));
                        // A long hold (behind a long request) can make the
                        // guest's other CPUs wait on this one.
                        let held = t0.elapsed();
                        if held > Duration::from_secs(1) {
                            log::warn!(
                                "vCPU {} was held {} ms for a module event",
                                ev.vcpu(),
                                held.as_millis()
                            );
                        }
                    }
                }
            })
            .map_err(|e| CliError::io("cannot start the modules thread".into(), e))?;
    }
    let pending = server
        .protect_pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if pending.is_some() {
        let (server, ctl) = (server.clone(), vm.control());
        std::thread::Builder::new()
            .name("protect-kernel".into())
            .spawn(move || protect_when_booted(&server, &ctl))
            .map_err(|e| CliError::io("cannot start the protect-kernel thread".into(), e))?;
    }
    {
        let server = server.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || vmm_core::control::serve(listener, server, gate))
            .map_err(|e| CliError::io("cannot start the control thread".into(), e))?;
    }
    let ctl = vm.control();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                eprintln!("lucos: {sig}: stopping the VM");
                ctl.stop(ExitReason::Stopped);
            }
        })
        .map_err(|e| CliError::io("cannot start the signal thread".into(), e))?;

    let reason = vm
        .control()
        .wait_stopped(None)
        .unwrap_or(ExitReason::Stopped);
    // An upgrade in progress decides how this process ends: wait for it
    // (it holds the handover context until it committed or undid).
    drop(server.handoff.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(pid) = server.handed_to() {
        eprintln!("lucos: VM {id} handed over to a new VMM, pid {pid}");
        return Ok(HANDED_OVER);
    }
    let _ = std::fs::remove_file(&sock);
    eprintln!("lucos: VM {id} ended: {reason}");
    Ok(match reason {
        ExitReason::GuestExit { status } => i32::from(status),
        ExitReason::Reset | ExitReason::PowerOff | ExitReason::Stopped => exit::OK,
        ExitReason::TripleFault { .. } | ExitReason::Error { .. } => exit::GUEST_CRASHED,
    })
}

/// `run --protect-kernel`: checks five times a second whether the kernel
/// has booted, then protects its text (once; a failure is logged).
fn protect_when_booted(server: &ControlServer, ctl: &vmm_core::vcpu::RunControl) {
    while !ctl.stopping() {
        std::thread::sleep(Duration::from_millis(200));
        if !server.kernel_booted() {
            continue;
        }
        match server.protect_pending_kernel().map(|r| r.error) {
            Some(None) => eprintln!(
                "lucos: kernel text integrity on: the kernel's text and read-only data are protected"
            ),
            Some(Some(e)) => eprintln!("lucos: error: --protect-kernel failed: {}", e.message),
            None => {}
        }
        return;
    }
}

/// Re-runs this command without --detach in a new session, logging to the run
/// directory, and returns once the VM's socket answers.
fn detach(args: &RunArgs) -> Result<i32, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::io("cannot find the lucos binary".into(), e))?;
    let child_args: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    let log = paths::log_path(&args.vm);
    let out = File::create(&log)
        .map_err(|e| CliError::io(format!("cannot create {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| CliError::io(format!("cannot reopen {}", log.display()), e))?;
    let mut cmd = Command::new(exe);
    cmd.args(child_args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setsid, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| CliError::io("cannot start the VMM process".into(), e))?;
    let sock = paths::socket_path(&args.vm);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| CliError::io("cannot wait for the VMM process".into(), e))?
        {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let last = text
                .lines()
                .rev()
                .find(|l| l.starts_with("lucos: error:"))
                .unwrap_or("see the log");
            return Err(CliError::Other(format!(
                "VM {} did not start ({status}): {} (log: {})",
                args.vm,
                last.trim_start_matches("lucos: error: "),
                log.display()
            )));
        }
        if let Ok(mut c) = Client::connect(&args.vm, &sock) {
            if c.call(&Request::Status).is_ok() {
                println!(
                    "VM {} running (pid {}), control socket {}, log {}",
                    args.vm,
                    child.id(),
                    sock.display(),
                    log.display()
                );
                return Ok(exit::OK);
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(CliError::Other(format!(
                "VM {} did not answer on {} within 30 s (log: {})",
                args.vm,
                sock.display(),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
