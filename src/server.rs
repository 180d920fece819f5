//! The control server of a running VM: answers the requests of
//! docs/control-protocol.md with the VMM (vmm-core) and the live-update
//! engine (update-engine). vmm-core's transport serves the socket.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use symbol_db::SymbolError;
use update_engine::kernel::{self as introspect, GuestKernel, IntrospectError};
use update_engine::patcher::{PatchError, PatchReport, Patcher};
use update_engine::UpdateError;
use vmm_core::control::{
    ErrorCode, RegsInfo, Request, Response, Service, StatusInfo, PROTOCOL_VERSION,
};
use vmm_core::vcpu::PauseError;
use vmm_core::vm::{host_kvm_flavor, Vm, VmError};

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
                Self::patch_response(p.apply(self.vm.as_ref(), &kernel, Path::new(path), *replace))
            }
            Request::Revert { name } => {
                let kernel = match self.guest_kernel() {
                    Ok(k) => k,
                    Err(e) => return Response::err(ErrorCode::NoKernel, error_chain(&e)),
                };
                let mut p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
                Self::patch_response(p.revert(self.vm.as_ref(), &kernel, name))
            }
            Request::Patches => {
                let text = self
                    .guest_kernel()
                    .ok()
                    .and_then(|k| update_engine::patcher::text_hash(self.vm.as_ref(), &k).ok());
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
            self.vm.as_ref(),
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
                vmm_core::vm::KvmFlavor::Hardware => "hardware".into(),
                vmm_core::vm::KvmFlavor::Pvm => "pvm".into(),
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
}

impl Service for ControlServer {
    /// All but `status` one at a time.
    fn handle(&self, req: &Request) -> Response {
        if matches!(req, Request::Status) {
            return Response::ok(self.status());
        }
        let _one = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        self.handle_serialized(req)
    }
}
