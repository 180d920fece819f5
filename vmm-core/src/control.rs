//! The per-VM control socket and its JSON protocol (docs/control-protocol.md).
//!
//! Each running VM serves a Unix stream socket, mode 0600, at
//! `<run dir>/<id>.sock`. A client writes one JSON request per line and
//! reads one JSON response per line:
//!
//! ```text
//! -> {"op":"status"}
//! <- {"ok":true,"data":{"id":"web1","state":"running",...}}
//! -> {"op":"resume"}
//! <- {"ok":false,"error":{"code":"not_paused","message":"the VM is not paused"}}
//! ```
//!
//! Many clients may be connected at once, each served on its own thread: an
//! idle or slow client holds no one else up. A request line may be at most
//! [`MAX_REQUEST_BYTES`] long and, once begun, must be complete within
//! [`REQUEST_SECS`] seconds; otherwise the client gets an error reply and
//! the connection is closed. Requests that pause, patch or read vCPU state
//! are served one at a time per VM (two patches never interleave); `status`
//! always answers at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Protocol version, reported by `status`.
pub const PROTOCOL_VERSION: u32 = 3;
/// The longest request line the server reads (1 MiB).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Seconds a client has to finish a request line it has begun.
pub const REQUEST_SECS: u64 = 10;
/// Clients served at once; more are told so and disconnected.
pub const MAX_CLIENTS: usize = 64;

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Describe the VM.
    Status,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Stop the VM and end the VMM process.
    Stop,
    /// Registers of a vCPU (VM must be paused).
    Regs {
        /// vCPU index.
        vcpu: u8,
    },
    /// Translate a guest-virtual address through a vCPU's page tables (VM must be paused).
    Translate {
        /// vCPU index.
        vcpu: u8,
        /// Guest-virtual address.
        gva: u64,
    },
    /// Apply a signed `.lup` (path on the VMM's host).
    Patch {
        /// The patch file.
        path: String,
        /// Replace every applied patch with this cumulative one.
        #[serde(default)]
        replace: bool,
        /// `consistent` or `immediate`, overriding the patch's own mode.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
    },
    /// Revert an applied patch.
    Revert {
        /// Its name.
        name: String,
    },
    /// The applied patches, oldest first.
    Patches,
    /// Checks that the applied patches are in effect: every switched site
    /// and every patch's code as placed (while the guest runs).
    Verify,
    /// The guest kernel's identity and symbols; answers lookups.
    Symbols {
        /// Lookups: NAME, NAME@FILE, NAME#N or 0xADDR.
        #[serde(default)]
        queries: Vec<String>,
        /// Also return every symbol.
        #[serde(default)]
        all: bool,
        /// A vmlinux or System.map of this build to use instead (checked first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    /// Write control: protect a byte range of guest memory from the guest.
    Protect {
        /// Name to release it by (`lucos unprotect`).
        name: String,
        /// Guest-physical start...
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gpa: Option<u64>,
        /// ...or a kernel symbol (NAME, NAME@FILE, NAME#N, 0xADDR), translated
        /// through vCPU 0's page tables.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        symbol: Option<String>,
        /// Bytes from the start (default: the symbol's size).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        len: Option<u64>,
    },
    /// Kernel text integrity: protect the running kernel's text and
    /// read-only data; only its own text patching may write them.
    ProtectKernel {
        /// Functions also allowed to write kernel text (by the writing
        /// instruction's address), besides Linux's text_poke.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allow_writers: Vec<String>,
    },
    /// Every protected range and the memory-slot layout now.
    Protected,
    /// Release a range protected with `protect`.
    Unprotect {
        /// Its name.
        name: String,
    },
    /// Write-control events (refused writes) after sequence number `since`.
    Events {
        /// Last sequence number seen (0: from the oldest kept).
        #[serde(default)]
        since: u64,
    },
    /// The guest kernel's log, read from guest memory (no agent, no pause):
    /// the records from sequence number `since` on.
    Dmesg {
        /// First sequence number wanted (0: from the oldest kept; an earlier
        /// answer's `next`: what came since).
        #[serde(default)]
        since: u64,
    },
    /// Whether the guest kernel's clock advances (read from guest memory,
    /// no pause): waits up to `timeout_ms` for it to tick.
    Alive {
        /// How long to wait for a tick, in milliseconds.
        timeout_ms: u64,
    },
    /// The guest kernel's loaded modules, read from guest memory (no
    /// agent, no pause); with `symbols_of`, that module's symbols too.
    Modules {
        /// A module whose symbols to return.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        symbols_of: Option<String>,
    },
    /// Hand the running guest to a new VMM process (`lucos upgrade`).
    Upgrade {
        /// The new lucos binary (default: the path this VMM was started from).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<String>,
        /// How long the new process has to start, take the state and report
        /// the guest running, in milliseconds (default 10 s).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
}

/// What `upgrade` answers once the new VMM runs the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpgradeInfo {
    /// The VMM process that had the guest.
    pub old_pid: u32,
    /// The one that has it now.
    pub new_pid: u32,
    /// The new binary.
    pub binary: String,
    /// Its version.
    pub version: String,
    /// Upgrades this VM has been through, this one included.
    pub upgrades: u64,
    /// Guest downtime: from the last vCPU out in the old process to the
    /// new one's vCPUs started, microseconds.
    pub downtime_us: f64,
    /// Pausing the vCPUs (request to the last one out) before that,
    /// microseconds: the first vCPU out waits this much longer.
    pub pause_us: f64,
    /// Pauses it took to find every vCPU where its state can be saved
    /// whole (1 but on PVM hosts: see docs/upgrade.md).
    #[serde(default)]
    pub pauses: u32,
    /// The whole operation, from the request to the new process's report,
    /// milliseconds (the new process starts and builds its VM while the
    /// guest still runs).
    pub total_ms: f64,
    /// Bytes of state sent while the guest was paused.
    pub state_bytes: u64,
    /// The guest's TSC frequency in kHz, where KVM tells it (to read
    /// guest-measured stalls in cycles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsc_khz: Option<u32>,
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed.
    BadRequest,
    /// The VM is already paused.
    AlreadyPaused,
    /// The VM is not paused.
    NotPaused,
    /// The VM is stopping.
    NotRunning,
    /// No such vCPU.
    NoSuchVcpu,
    /// The address is not mapped.
    NotMapped,
    /// The guest kernel cannot be inspected yet (still booting), or its
    /// symbols cannot be found.
    NoKernel,
    /// A symbol source is for another kernel build.
    KernelMismatch,
    /// A lookup found nothing, or several.
    NoSymbol,
    /// A patch was refused by a check (signature, target, bytes, symbols,
    /// site safety, stack); the guest is unchanged.
    PatchRefused,
    /// A vCPU stayed inside a patch site; the guest is unchanged, try again.
    Busy,
    /// The VMM serves as many clients as it will; try again later.
    TooManyClients,
    /// The guest kernel's clock did not advance in the time given (`alive`).
    Stalled,
    /// A new VMM process did not take the guest over; it runs on under the
    /// old one, unchanged.
    UpgradeFailed,
    /// Anything else.
    Internal,
}

/// An error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Code a script can act on.
    pub code: ErrorCode,
    /// Message a person can read.
    pub message: String,
}

/// A response line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// The error, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    /// A successful response carrying `data`.
    pub fn ok(data: impl Serialize) -> Self {
        Self {
            ok: true,
            data: Some(serde_json::to_value(data).unwrap_or(serde_json::Value::Null)),
            error: None,
        }
    }

    /// An error response.
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusInfo {
    /// VM id.
    pub id: String,
    /// VMM process id.
    pub pid: u32,
    /// "running", "paused" or "stopping".
    pub state: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Kernel image path.
    pub kernel: String,
    /// Kernel command line.
    pub cmdline: String,
    /// Milliseconds since the vCPUs started.
    pub uptime_ms: u64,
    /// "hardware" or "pvm".
    pub kvm: String,
    /// Pauses served so far.
    pub pauses: u64,
    /// Duration of the last pause (request to all vCPUs out), microseconds.
    pub last_pause_us: Option<f64>,
    /// Protocol version.
    pub protocol: u32,
    /// Write control: trapped writes and what became of them, protected
    /// ranges, pages and memory slots.
    #[serde(default)]
    pub write_control: crate::write_control::WriteStats,
    /// Labels given at `lucos run --label k=v` (campaigns select VMs by them).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Version of the VMM binary serving the VM.
    #[serde(default)]
    pub vmm_version: String,
    /// Live VMM upgrades the VM has been through.
    #[serde(default)]
    pub upgrades: u64,
}

/// What `protect` and `unprotect` answer: every protected range now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProtectInfo {
    /// The ranges, with their owners.
    pub ranges: Vec<crate::write_control::Protection>,
    /// The slot layout now: RAM's, then the patch area's.
    pub slots: Vec<crate::write_control::SlotSpec>,
    /// Counters.
    pub write_control: crate::write_control::WriteStats,
}

/// One event as `events` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventInfo {
    /// The event.
    #[serde(flatten)]
    pub event: crate::write_control::WriteEvent,
    /// The writer's RIP as SYMBOL+0xOFF, when the guest kernel's symbols are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

/// What `events` answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventsInfo {
    /// Events after `since`, oldest first.
    pub events: Vec<EventInfo>,
    /// The sequence number the next event will have (ask `since: next - 1`).
    pub next: u64,
    /// Counters.
    pub write_control: crate::write_control::WriteStats,
}

/// One record of the guest kernel's log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogRecord {
    /// Sequence number (the kernel's own: 0 is its first line).
    pub seq: u64,
    /// When it was logged, nanoseconds on the kernel's clock.
    pub ts_ns: u64,
    /// Syslog level (0 emergency .. 7 debug).
    pub level: u8,
    /// The line, without its level or a newline.
    pub text: String,
}

/// What `dmesg` answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DmesgInfo {
    /// Records from `since` on, oldest first.
    pub records: Vec<LogRecord>,
    /// The sequence number to ask for next (`since: next`).
    pub next: u64,
    /// Records from `since` on that were overwritten before they could be
    /// read (the ring wrapped).
    pub lost: u64,
}

/// What `alive` answers: the guest kernel's clock advanced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AliveInfo {
    /// The clock read (`jiffies_64`, or `jiffies`).
    pub symbol: String,
    /// Its value first...
    pub before: u64,
    /// ...and once it had changed.
    pub after: u64,
    /// How long that took, in milliseconds.
    pub waited_ms: u64,
}

/// What `pause` answers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct PauseInfo {
    /// From the request until every vCPU was out of guest mode, µs.
    pub pause_us: f64,
}

/// What `resume` and `stop` answer: nothing but success (`{}`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Done {}

/// Registers of one vCPU, as reported by `regs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegsInfo {
    /// vCPU index.
    pub vcpu: u8,
    /// General registers by name.
    pub regs: std::collections::BTreeMap<String, u64>,
    /// CS selector.
    pub cs: u16,
    /// Current privilege level (CS.RPL).
    pub cpl: u8,
    /// CR0, CR3, CR4, EFER.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// What answers a VM's control requests: the policy above vmm-core (the
/// lucos binary's server). The transport below parses, bounds and frames.
pub trait Service: Send + Sync + 'static {
    /// The answer to one request. Called from one thread per client, so
    /// several at once: serializing what must be serialized is the
    /// service's business.
    fn handle(&self, req: &Request) -> Response;

    /// Called once the answer to `req` is written to its client: what must
    /// wait for the answer to be out (stopping the VM ends the process,
    /// which would otherwise cut the `stop` answer off).
    fn after_reply(&self, _req: &Request) {}
}

/// Lets the VMM stop taking new connections on its control socket while
/// it hands the socket to another process (`lucos upgrade`), and take them
/// again if that fails. Connections already open are served on.
#[derive(Debug)]
pub struct AcceptGate {
    state: std::sync::Mutex<GateState>,
    cv: std::sync::Condvar,
    wake: vmm_sys_util::eventfd::EventFd,
}

#[derive(Debug, Default)]
struct GateState {
    hold: bool,
    /// Holds asked for, and the last one the accept loop stopped for.
    asked: u64,
    stopped: u64,
}

impl AcceptGate {
    /// An open gate.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            state: Default::default(),
            cv: Default::default(),
            wake: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops accepting. True once the accept loop has stopped for this
    /// hold; false if it did not within a second (the gate is open again).
    pub fn hold(&self) -> bool {
        let mut st = self.lock();
        st.hold = true;
        st.asked += 1;
        let want = st.asked;
        let _ = self.wake.write(1);
        let deadline = Instant::now() + Duration::from_secs(1);
        while st.stopped < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.hold = false;
                self.cv.notify_all();
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Accepts again.
    pub fn release(&self) {
        self.lock().hold = false;
        self.cv.notify_all();
    }

    /// Waits while held.
    fn pass(&self) {
        let mut st = self.lock();
        while st.hold {
            st.stopped = st.asked;
            self.cv.notify_all();
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Serves `listener` until the process ends: each connection on its own
/// thread (at most [`MAX_CLIENTS`] at once), each carrying any number of
/// requests, answered by `service`. `gate` can stop it accepting.
pub fn serve(listener: UnixListener, service: Arc<dyn Service>, gate: Arc<AcceptGate>) {
    use std::os::fd::AsRawFd;
    let clients = Arc::new(AtomicUsize::new(0));
    // Non-blocking: another process may accept on the same socket (during
    // a VMM upgrade), and a connection seen by poll may be gone by accept.
    if let Err(e) = listener.set_nonblocking(true) {
        log::warn!("control socket: cannot make it non-blocking: {e}");
    }
    loop {
        gate.pass();
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: gate.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd for descriptors this
        // function's arguments keep open.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            let _ = gate.wake.read();
            continue;
        }
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log::warn!("control socket accept failed: {e}");
                continue;
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            log::warn!("control connection: {e}");
            continue;
        }
        let slot = ClientSlot::take(&clients);
        if slot.is_none() {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = send(
                &mut stream,
                &Response::err(
                    ErrorCode::TooManyClients,
                    format!("{MAX_CLIENTS} clients are connected already; try again later"),
                ),
            );
            continue;
        }
        let service = service.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = serve_one(service.as_ref(), stream) {
                    log::debug!("control connection ended: {e}");
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a thread for a control client: {e}");
        }
    }
}

/// One of the [`MAX_CLIENTS`] places, given back when dropped (however the
/// client's thread ends).
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        if count.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(ClientSlot(count.clone()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_one(service: &dyn Service, stream: UnixStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut lines = Lines::new(stream)?;
    loop {
        let line = match lines.next_line() {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(LineError::Io(e)) => return Err(e),
            Err(bad) => {
                // The stream cannot be trusted to resynchronize: answer and close.
                let why = bad.to_string();
                send(&mut writer, &Response::err(ErrorCode::BadRequest, why))?;
                return Ok(());
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let req = serde_json::from_str::<Request>(&line);
        let resp = match &req {
            // A bug in one request must not take the control socket down
            // with it: the VM would be left running but unreachable.
            Ok(req) => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| service.handle(req)))
                    .unwrap_or_else(|p| {
                        let why = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_default();
                        log::error!("control request {req:?} panicked: {why}");
                        Response::err(ErrorCode::Internal, format!("internal error: {why}"))
                    })
            }
            Err(e) => Response::err(ErrorCode::BadRequest, format!("bad request: {e}")),
        };
        let sent = send(&mut writer, &resp);
        if let Ok(req) = &req {
            service.after_reply(req);
        }
        sent?;
    }
}

fn send(w: &mut impl Write, resp: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(resp)?;
    out.push(b'\n');
    w.write_all(&out)
}

/// Why a request line could not be read.
#[derive(Debug, thiserror::Error)]
enum LineError {
    #[error("request larger than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error("request not completed within {REQUEST_SECS} s of its first byte")]
    TooSlow,
    #[error("request is not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Io(std::io::Error),
}

/// Request lines from one client, bounded in size and in the time a begun
/// line may take; an idle client (nothing begun) may wait as long as it likes.
struct Lines {
    stream: UnixStream,
    buf: Vec<u8>,
    /// When the first byte of the line in `buf` arrived.
    begun: Option<Instant>,
}

impl Lines {
    fn new(stream: UnixStream) -> std::io::Result<Self> {
        // Wake up now and then to check how long a begun line is taking; a
        // client that does not read its answers is dropped.
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.set_write_timeout(Some(Duration::from_secs(REQUEST_SECS)))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
            begun: None,
        })
    }

    fn next_line(&mut self) -> Result<Option<String>, LineError> {
        let mut chunk = [0u8; 8192];
        // A line that came with the previous one is timed from now: serving
        // that one does not count against it.
        if !self.buf.is_empty() {
            self.begun = Some(Instant::now());
        }
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(nl + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                self.begun = (!self.buf.is_empty()).then(Instant::now);
                return String::from_utf8(line)
                    .map(Some)
                    .map_err(|_| LineError::NotUtf8);
            }
            if self.buf.len() > MAX_REQUEST_BYTES {
                return Err(LineError::TooLong);
            }
            if self
                .begun
                .is_some_and(|t| t.elapsed() > Duration::from_secs(REQUEST_SECS))
            {
                return Err(LineError::TooSlow);
            }
            match self.stream.read(&mut chunk) {
                // The client closed: an unterminated last line is its last request.
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => {
                    let line = std::mem::take(&mut self.buf);
                    return String::from_utf8(line)
                        .map(Some)
                        .map_err(|_| LineError::NotUtf8);
                }
                Ok(n) => {
                    self.begun.get_or_insert_with(Instant::now);
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }
}

/// Binds the control socket at `path` with mode 0600.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Errors talking to a VM's control socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket for that id.
    #[error("no VM named '{id}' is running (no control socket at {path})")]
    UnknownVm {
        /// VM id.
        id: String,
        /// Where the socket would be.
        path: PathBuf,
    },
    /// A socket exists but nobody listens: its VMM died.
    #[error("VM '{id}' is not running: {path} is a stale socket left by a dead VMM (remove it, or start the VM again with `lucos run`)")]
    StaleSocket {
        /// VM id.
        id: String,
        /// The socket.
        path: PathBuf,
    },
    /// I/O on the socket failed.
    #[error("talking to VM '{id}' over {path} failed")]
    Io {
        /// VM id.
        id: String,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM answered with an error.
    #[error("{}", .0.message)]
    Remote(ErrorBody),
    /// The answer could not be parsed.
    #[error("VM '{id}' sent a response lucos cannot parse: {why}")]
    BadResponse {
        /// VM id.
        id: String,
        /// Why.
        why: String,
    },
}

/// How long a client waits for an answer: `LUCOS_CLIENT_TIMEOUT` seconds
/// (0: for ever), by default [`CLIENT_TIMEOUT_SECS`]. A VMM that dies closes
/// the socket, which ends the wait at once; the timeout is for a VMM that
/// hangs. It is long because an answer can take long on a loaded machine:
/// the first request that needs the guest kernel reads and decodes it (tens
/// of MB), and a patch waits for a pause in which nothing runs old code.
fn client_timeout() -> Option<Duration> {
    let secs = std::env::var("LUCOS_CLIENT_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(CLIENT_TIMEOUT_SECS);
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// Default seconds a client waits for an answer.
pub const CLIENT_TIMEOUT_SECS: u64 = 600;

/// A connection to one VM's control socket.
#[derive(Debug)]
pub struct Client {
    id: String,
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the socket of VM `id` at `path`.
    pub fn connect(id: &str, path: &Path) -> Result<Self, ClientError> {
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClientError::UnknownVm {
                    id: id.into(),
                    path: path.into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(ClientError::StaleSocket {
                    id: id.into(),
                    path: path.into(),
                })
            }
            Err(source) => {
                return Err(ClientError::Io {
                    id: id.into(),
                    path: path.into(),
                    source,
                })
            }
        };
        let io = |source| ClientError::Io {
            id: id.into(),
            path: path.into(),
            source,
        };
        stream.set_read_timeout(client_timeout()).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Self {
            id: id.into(),
            path: path.into(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Waits at most `limit` for each answer from now on (None: for ever).
    pub fn set_timeout(&mut self, limit: Option<Duration>) -> Result<(), ClientError> {
        self.writer
            .set_read_timeout(limit)
            .map_err(|source| ClientError::Io {
                id: self.id.clone(),
                path: self.path.clone(),
                source,
            })
    }

    /// Sends `req` and decodes the `data` of a successful response as the
    /// request's reply type `T`: an answer that does not fit (a renamed or
    /// missing field) is an error naming it, never a default.
    pub fn call_as<T: serde::de::DeserializeOwned>(
        &mut self,
        req: &Request,
    ) -> Result<T, ClientError> {
        let v = self.call(req)?;
        serde_json::from_value(v).map_err(|e| ClientError::BadResponse {
            id: self.id.clone(),
            why: format!("the answer to {req:?} does not fit its type: {e}"),
        })
    }

    /// Sends `req` and returns the `data` of a successful response.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, ClientError> {
        let io = |source| ClientError::Io {
            id: self.id.clone(),
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(req).map_err(|e| io(e.into()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).map_err(io)?;
        if n == 0 {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the VMM closed the connection",
            )));
        }
        let resp: Response =
            serde_json::from_str(&answer).map_err(|e| ClientError::BadResponse {
                id: self.id.clone(),
                why: e.to_string(),
            })?;
        match (resp.ok, resp.error) {
            (true, _) => Ok(resp.data.unwrap_or(serde_json::Value::Null)),
            (false, Some(e)) => Err(ClientError::Remote(e)),
            (false, None) => Err(ClientError::BadResponse {
                id: self.id.clone(),
                why: "error response without an error".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_documented() {
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("json"),
            r#"{"op":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"regs","vcpu":1}"#).expect("parse"),
            Request::Regs { vcpu: 1 }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn error_response_shape() {
        let r = Response::err(ErrorCode::NotPaused, "the VM is not paused");
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            r#"{"ok":false,"error":{"code":"not_paused","message":"the VM is not paused"}}"#
        );
    }

    #[test]
    fn client_errors_for_missing_and_stale_sockets() {
        let dir = std::env::temp_dir().join(format!("lucos-ctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("nope.sock");
        assert!(matches!(
            Client::connect("nope", &missing),
            Err(ClientError::UnknownVm { .. })
        ));
        let stale = dir.join("dead.sock");
        let _ = std::fs::remove_file(&stale);
        drop(UnixListener::bind(&stale).expect("bind"));
        let err = Client::connect("dead", &stale).expect_err("stale");
        assert!(matches!(err, ClientError::StaleSocket { .. }));
        assert!(err.to_string().contains("stale socket"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
