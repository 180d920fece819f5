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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use symbol_db::SymbolError;

use update_engine::UpdateError;

use crate::introspect::{self, GuestKernel, IntrospectError};
use crate::livepatch::{PatchError, PatchReport, Patcher};
use crate::vcpu::PauseError;
use crate::vm::{host_kvm_flavor, Vm, VmError};

/// Protocol version, reported by `status`.
pub const PROTOCOL_VERSION: u32 = 1;
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
    },
    /// Revert an applied patch.
    Revert {
        /// Its name.
        name: String,
    },
    /// The applied patches, oldest first.
    Patches,
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
    fn ok(data: impl Serialize) -> Self {
        Self {
            ok: true,
            data: Some(serde_json::to_value(data).unwrap_or(serde_json::Value::Null)),
            error: None,
        }
    }

    fn err(code: ErrorCode, message: impl Into<String>) -> Self {
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
}

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

/// Static facts about the VM that `status` reports.
#[derive(Debug, Clone)]
pub struct VmIdentity {
    /// VM id.
    pub id: String,
    /// Kernel path.
    pub kernel: String,
    /// Command line.
    pub cmdline: String,
    /// RAM size.
    pub mem_bytes: u64,
}

/// Serves control requests for one VM.
#[derive(Debug)]
pub struct ControlServer {
    vm: Arc<Vm>,
    ident: VmIdentity,
    pauses: AtomicU64,
    last_pause_ns: AtomicU64,
    /// The guest kernel, once inspected (it does not change while it runs).
    kernel: Mutex<Option<Arc<GuestKernel>>>,
    /// Live patches.
    patcher: Mutex<Patcher>,
    /// Held while a request that pauses the VM or changes its state is
    /// served: such requests from different clients never interleave.
    ops: Mutex<()>,
    /// Connections being served.
    clients: AtomicUsize,
}

/// One answer of a `symbols` request: the symbol, or why not.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum SymbolAnswer {
    /// Found.
    Found(symbol_db::Answer),
    /// Not found, or ambiguous.
    Failed {
        /// The query.
        query: String,
        /// Why.
        error: String,
    },
}

/// What `symbols` reports.
#[derive(Debug, Clone, Serialize)]
pub struct SymbolsInfo {
    /// Where the symbols came from.
    pub source: String,
    /// Build-id and banner read from guest memory.
    pub identity: symbol_db::KernelIdentity,
    /// The running `_text`.
    #[serde(with = "symbol_db::hex_u64")]
    pub text: u64,
    /// Guest-physical address of `_text`.
    #[serde(with = "symbol_db::hex_u64")]
    pub text_gpa: u64,
    /// KASLR slide of the virtual base, in bytes.
    pub slide: i64,
    /// Number of symbols.
    pub count: usize,
    /// Where the kallsyms tables were (kallsyms source only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kallsyms: Option<symbol_db::kallsyms::KallsymsLayout>,
    /// How long inspecting the kernel took (once; later requests reuse it).
    pub timings: introspect::Timings,
    /// Answers to the queries, in order.
    pub answers: Vec<SymbolAnswer>,
    /// Every symbol, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symbols: Option<Vec<symbol_db::Symbol>>,
}

fn pause_error(e: &VmError) -> ErrorCode {
    match e {
        VmError::Pause(PauseError::AlreadyPaused) => ErrorCode::AlreadyPaused,
        VmError::Pause(PauseError::NotPaused) | VmError::NotPaused => ErrorCode::NotPaused,
        VmError::Pause(PauseError::NotRunning) => ErrorCode::NotRunning,
        VmError::NoSuchVcpu(_) => ErrorCode::NoSuchVcpu,
        VmError::Walk(_) => ErrorCode::NotMapped,
        _ => ErrorCode::Internal,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

impl ControlServer {
    /// A server for `vm`.
    pub fn new(vm: Arc<Vm>, ident: VmIdentity) -> Self {
        Self {
            vm,
            ident,
            pauses: AtomicU64::new(0),
            last_pause_ns: AtomicU64::new(u64::MAX),
            kernel: Mutex::new(None),
            patcher: Mutex::new(Patcher::new(Vec::new())),
            ops: Mutex::new(()),
            clients: AtomicUsize::new(0),
        }
    }

    /// Trusts patches signed by `keys` (`lucos run --trusted-key`).
    pub fn with_trusted_keys(self, keys: Vec<update_engine::VerifyingKey>) -> Self {
        Self {
            patcher: Mutex::new(Patcher::new(keys)),
            ..self
        }
    }

    fn patch_response(r: Result<PatchReport, PatchError>) -> Response {
        match r {
            Ok(rep) => Response::ok(rep),
            Err(e) => {
                let code = match &e {
                    PatchError::Update(UpdateError::WrongKernel { .. }) => {
                        ErrorCode::KernelMismatch
                    }
                    PatchError::Busy { .. } => ErrorCode::Busy,
                    PatchError::Update(UpdateError::Io { .. }) => ErrorCode::BadRequest,
                    PatchError::Update(_) => ErrorCode::PatchRefused,
                    PatchError::Vm(v) => pause_error(v),
                    _ => ErrorCode::Internal,
                };
                Response::err(code, error_chain(&e))
            }
        }
    }

    /// Handles one request; all but `status` one at a time.
    pub fn handle(&self, req: &Request) -> Response {
        if matches!(req, Request::Status) {
            return Response::ok(self.status());
        }
        let _one = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        self.handle_serialized(req)
    }

    fn handle_serialized(&self, req: &Request) -> Response {
        let fail = |e: VmError| Response::err(pause_error(&e), error_chain(&e));
        match req {
            Request::Status => Response::ok(self.status()),
            Request::Pause => match self.vm.pause() {
                Ok(took) => {
                    self.pauses.fetch_add(1, Ordering::Relaxed);
                    self.last_pause_ns
                        .store(took.as_nanos() as u64, Ordering::Relaxed);
                    Response::ok(serde_json::json!({ "pause_us": took.as_secs_f64() * 1e6 }))
                }
                Err(e) => fail(e),
            },
            Request::Resume => match self.vm.resume() {
                Ok(()) => Response::ok(serde_json::json!({})),
                Err(e) => fail(e),
            },
            Request::Stop => {
                self.vm.stop();
                Response::ok(serde_json::json!({}))
            }
            Request::Regs { vcpu } => match self.regs(*vcpu) {
                Ok(r) => Response::ok(r),
                Err(e) => fail(e),
            },
            Request::Translate { vcpu, gva } => match self.vm.translate(*vcpu, *gva) {
                Ok(t) => Response::ok(t),
                Err(e) => fail(e),
            },
            Request::Patch { path, replace } => {
                let kernel = match self.guest_kernel() {
                    Ok(k) => k,
                    Err(e) => return Response::err(ErrorCode::NoKernel, error_chain(&e)),
                };
                let mut p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
                Self::patch_response(p.apply(&self.vm, &kernel, Path::new(path), *replace))
            }
            Request::Revert { name } => {
                let mut p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
                Self::patch_response(p.revert(&self.vm, name))
            }
            Request::Patches => {
                let text = self
                    .guest_kernel()
                    .ok()
                    .and_then(|k| crate::livepatch::text_hash(&self.vm, &k).ok());
                let p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
                let (used, size) = p.area_usage();
                Response::ok(serde_json::json!({
                    "patches": p.applied(),
                    "kernel_text": text,
                    "patch_area": { "used_bytes": used, "size_bytes": size },
                }))
            }
            Request::Symbols {
                queries,
                all,
                source,
            } => match self.symbols(queries, *all, source.as_deref()) {
                Ok(info) => Response::ok(info),
                Err(e) => {
                    let code = match &e {
                        IntrospectError::Symbols(SymbolError::Mismatch { .. }) => {
                            ErrorCode::KernelMismatch
                        }
                        IntrospectError::Symbols(
                            SymbolError::Read { .. }
                            | SymbolError::BadMap { .. }
                            | SymbolError::BadElf { .. },
                        ) => ErrorCode::BadRequest,
                        IntrospectError::Vm(v) => pause_error(v),
                        _ => ErrorCode::NoKernel,
                    };
                    Response::err(code, error_chain(&e))
                }
            },
        }
    }

    /// The guest kernel, inspected on first use and kept.
    pub fn guest_kernel(&self) -> Result<Arc<GuestKernel>, IntrospectError> {
        let mut cached = self.kernel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cached.as_ref() {
            return Ok(k.clone());
        }
        let k = Arc::new(introspect::inspect(
            &self.vm,
            Path::new(&self.ident.kernel),
        )?);
        *cached = Some(k.clone());
        Ok(k)
    }

    fn symbols(
        &self,
        queries: &[String],
        all: bool,
        source: Option<&str>,
    ) -> Result<SymbolsInfo, IntrospectError> {
        let mut k = self.guest_kernel()?;
        if let Some(path) = source {
            k = Arc::new(k.with_file_source(Path::new(path))?);
        }
        let answers = queries
            .iter()
            .map(|q| match k.symbols.answer(q) {
                Ok(a) => SymbolAnswer::Found(a),
                Err(e) => SymbolAnswer::Failed {
                    query: q.clone(),
                    error: e.to_string(),
                },
            })
            .collect();
        Ok(SymbolsInfo {
            source: k.source.clone(),
            identity: k.identity.clone(),
            text: k.text,
            text_gpa: k.text_gpa,
            slide: k.slide,
            count: k.symbols.len(),
            kallsyms: k.kallsyms,
            timings: k.timings,
            answers,
            symbols: all.then(|| k.symbols.iter().cloned().collect()),
        })
    }

    fn status(&self) -> StatusInfo {
        let state = if self.vm.control().stopping() {
            "stopping"
        } else if self.vm.is_paused() {
            "paused"
        } else {
            "running"
        };
        let last = self.last_pause_ns.load(Ordering::Relaxed);
        StatusInfo {
            id: self.ident.id.clone(),
            pid: std::process::id(),
            state: state.into(),
            vcpus: self.vm.vcpu_count(),
            mem_bytes: self.ident.mem_bytes,
            kernel: self.ident.kernel.clone(),
            cmdline: self.ident.cmdline.clone(),
            uptime_ms: self.vm.uptime().as_millis() as u64,
            kvm: match host_kvm_flavor() {
                crate::vm::KvmFlavor::Hardware => "hardware".into(),
                crate::vm::KvmFlavor::Pvm => "pvm".into(),
            },
            pauses: self.pauses.load(Ordering::Relaxed),
            last_pause_us: (last != u64::MAX).then(|| last as f64 / 1e3),
            protocol: PROTOCOL_VERSION,
        }
    }

    fn regs(&self, vcpu: u8) -> Result<RegsInfo, VmError> {
        let r = self.vm.regs(vcpu)?;
        let s = self.vm.sregs(vcpu)?;
        let regs = [
            ("rax", r.rax),
            ("rbx", r.rbx),
            ("rcx", r.rcx),
            ("rdx", r.rdx),
            ("rsi", r.rsi),
            ("rdi", r.rdi),
            ("rsp", r.rsp),
            ("rbp", r.rbp),
            ("r8", r.r8),
            ("r9", r.r9),
            ("r10", r.r10),
            ("r11", r.r11),
            ("r12", r.r12),
            ("r13", r.r13),
            ("r14", r.r14),
            ("r15", r.r15),
            ("rip", r.rip),
            ("rflags", r.rflags),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Ok(RegsInfo {
            vcpu,
            regs,
            cs: s.cs.selector,
            cpl: (s.cs.selector & 3) as u8,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        })
    }

    /// Serves `listener` until the process ends: each connection on its own
    /// thread (at most [`MAX_CLIENTS`] at once), each carrying any number of
    /// requests.
    pub fn serve(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            let mut stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("control socket accept failed: {e}");
                    continue;
                }
            };
            if self.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                self.clients.fetch_sub(1, Ordering::SeqCst);
                let _ = send(
                    &mut stream,
                    &Response::err(
                        ErrorCode::Busy,
                        format!("{MAX_CLIENTS} clients are connected already; try again later"),
                    ),
                );
                continue;
            }
            let server = self.clone();
            let spawned = std::thread::Builder::new()
                .name("control-client".into())
                .spawn(move || {
                    if let Err(e) = server.serve_one(stream) {
                        log::debug!("control connection ended: {e}");
                    }
                    server.clients.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                self.clients.fetch_sub(1, Ordering::SeqCst);
                log::warn!("cannot start a thread for a control client: {e}");
            }
        }
    }

    fn serve_one(&self, stream: UnixStream) -> std::io::Result<()> {
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
            let resp = match serde_json::from_str::<Request>(&line) {
                // A bug in one request must not take the control socket down
                // with it: the VM would be left running but unreachable.
                Ok(req) => {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(&req)))
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
            send(&mut writer, &resp)?;
        }
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
        // Wake up now and then to check how long a begun line is taking.
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
            begun: None,
        })
    }

    fn next_line(&mut self) -> Result<Option<String>, LineError> {
        let mut chunk = [0u8; 8192];
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
                Ok(0) => return Ok(None),
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
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Self {
            id: id.into(),
            path: path.into(),
            reader: BufReader::new(stream),
            writer,
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
