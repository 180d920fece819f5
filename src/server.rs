//! The control server of a running VM: answers the requests of
//! docs/control-protocol.md with the VMM (vmm-core) and the live-update
//! engine (update-engine). vmm-core's transport serves the socket.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use symbol_db::SymbolError;
use update_engine::health::{self, HealthError};
use update_engine::kernel::{self as introspect, GuestKernel, IntrospectError};
use update_engine::kernel::{SymbolAnswer, SymbolsInfo};
use update_engine::klog;
use update_engine::lup::Mode;
use update_engine::patcher::{PatchError, PatchReport, Patcher};
use update_engine::protect::{GuardPolicy, ModuleEvent, Writers, KERNEL_TEXT_OWNER};
use update_engine::UpdateError;
use vmm_core::control::{
    Done, ErrorCode, EventInfo, EventsInfo, PauseInfo, ProtectInfo, RegsInfo, Request, Response,
    Service, StatusInfo, PROTOCOL_VERSION,
};
use vmm_core::guest::Paused;
use vmm_core::vcpu::PauseError;
use vmm_core::vm::{host_kvm_flavor, Vm, VmError};
use vmm_core::write_control::Protection;

/// The longest an `alive` request waits for the guest's clock.
const MAX_ALIVE_MS: u64 = 60_000;

/// Static facts about the VM that `status` reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmIdentity {
    /// VM id.
    pub id: String,
    /// Kernel path.
    pub kernel: String,
    /// Command line.
    pub cmdline: String,
    /// RAM size.
    pub mem_bytes: u64,
    /// `lucos run --label` labels.
    pub labels: std::collections::BTreeMap<String, String>,
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
    /// What the guest may write on protected pages (installed in the VM).
    policy: Arc<GuardPolicy>,
    /// Live VMM upgrades the VM has been through.
    pub(crate) upgrades: AtomicU64,
    /// What a handover needs of the process (set by `lucos run`).
    pub(crate) handoff: Mutex<Option<crate::upgrade::HandoffCtx>>,
    /// The pid the guest was handed to: this process serves it no more.
    pub(crate) handed_to: std::sync::atomic::AtomicU32,
    /// `--protect-kernel` writers, until the kernel text is protected.
    pub(crate) protect_pending: Mutex<Option<Vec<String>>>,
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

/// The write-control owner of a range protected with `lucos protect NAME`
/// (`kernel-text`: the kernel's text and read-only data).
fn user_owner(name: &str) -> String {
    // The kernel text's integrity protection, and the relayed slot the
    // first patch of kernel text keeps (`lucos unprotect lucos:text` gives
    // it back; the next patch of kernel text takes it again).
    if name == KERNEL_TEXT_OWNER || name == update_engine::patcher::TEXT_RELAY_OWNER {
        return name.to_owned();
    }
    format!("user:{name}")
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
        let policy = Arc::new(GuardPolicy::new());
        vm.write_control().set_policy(policy.clone());
        let tracker = policy.data();
        Self {
            policy,
            vm,
            ident,
            pauses: AtomicU64::new(0),
            last_pause_ns: AtomicU64::new(u64::MAX),
            kernel: Mutex::new(None),
            patcher: Mutex::new(Patcher::new(Vec::new()).with_data_tracker(tracker)),
            ops: Mutex::new(()),
            upgrades: AtomicU64::new(0),
            handoff: Mutex::new(None),
            handed_to: Default::default(),
            protect_pending: Mutex::new(None),
        }
    }

    /// `run --protect-kernel` once the kernel has booted: protects its
    /// text with the pending writers, under the same lock as every state
    /// change (an upgrade never carries a protection both done and
    /// pending). Returns the answer, or None if nothing was pending.
    pub fn protect_pending_kernel(&self) -> Option<Response> {
        let _one = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        if self.handed_to().is_some() {
            return None;
        }
        let allow_writers = self
            .protect_pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        Some(self.handle_serialized(&Request::ProtectKernel { allow_writers }))
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Its identity.
    pub fn identity(&self) -> &VmIdentity {
        &self.ident
    }

    /// The pid the guest was handed to, once it was.
    pub fn handed_to(&self) -> Option<u32> {
        match self.handed_to.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// What another VMM process needs to serve this VM as this one does
    /// (everything but the machine state and the guest's memory).
    pub(crate) fn export(&self) -> crate::upgrade::ServiceState {
        let p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
        crate::upgrade::ServiceState {
            ident: self.ident.clone(),
            trusted: p.trusted().iter().map(|k| k.to_bytes()).collect(),
            patches: p.state().clone(),
            writers: self.policy.writers(),
            tracked: self.policy.data().export(),
            protections: self.vm.write_control().protections(),
            pauses: self.pauses.load(Ordering::Relaxed),
            last_pause_ns: self.last_pause_ns.load(Ordering::Relaxed),
            upgrades: self.upgrades.load(Ordering::Relaxed),
            protect_pending: self
                .protect_pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            write: self.vm.write_control().carried(0),
        }
    }

    /// A server for `vm` (built over memory another VMM process handed
    /// over) that goes on from `st`: patches, trusted keys, protections,
    /// tracked data, counters.
    pub(crate) fn import(vm: Arc<Vm>, st: &crate::upgrade::ServiceState) -> Result<Self, String> {
        let mut keys = Vec::with_capacity(st.trusted.len());
        for k in &st.trusted {
            keys.push(
                update_engine::VerifyingKey::from_bytes(k)
                    .map_err(|e| format!("a trusted key: {e}"))?,
            );
        }
        let policy = Arc::new(GuardPolicy::new());
        policy.set_writers(st.writers.clone());
        policy.data().import(&st.tracked)?;
        vm.write_control().set_policy(policy.clone());
        vm.write_control()
            .change(vm.as_ref(), &[], &st.protections)
            .map_err(|e| format!("protections: {e}"))?;
        let patcher = Patcher::restore(keys, st.patches.clone()).with_data_tracker(policy.data());
        Ok(Self {
            policy,
            vm,
            ident: st.ident.clone(),
            pauses: AtomicU64::new(st.pauses),
            last_pause_ns: AtomicU64::new(st.last_pause_ns),
            kernel: Mutex::new(None),
            patcher: Mutex::new(patcher),
            ops: Mutex::new(()),
            upgrades: AtomicU64::new(st.upgrades),
            handoff: Mutex::new(None),
            handed_to: Default::default(),
            protect_pending: Mutex::new(st.protect_pending.clone()),
        })
    }

    /// Data-change counters now (owner, counters), for the machine state.
    /// (Read in the handover's pause: the counters only, not a copy of
    /// each change and its patch objects.)
    pub(crate) fn data_counts(&self) -> Vec<(String, [u64; 3])> {
        self.policy.data().counts()
    }

    /// Sets the data-change counters to another process's.
    pub(crate) fn set_data_counts(&self, counts: &[(String, [u64; 3])]) {
        self.policy.data().set_counts(counts);
    }

    /// Trusts patches signed by `keys` (`lucos run --trusted-key`).
    pub fn with_trusted_keys(self, keys: Vec<update_engine::VerifyingKey>) -> Self {
        Self {
            patcher: Mutex::new(Patcher::new(keys).with_data_tracker(self.policy.data())),
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
                    Response::ok(PauseInfo {
                        pause_us: took.as_secs_f64() * 1e6,
                    })
                }
                Err(e) => fail(e),
            },
            Request::Resume => match self.vm.resume() {
                Ok(()) => Response::ok(Done {}),
                Err(e) => fail(e),
            },
            Request::Stop => {
                self.vm.stop();
                Response::ok(Done {})
            }
            Request::Upgrade { binary, timeout_ms } => crate::upgrade::hand_over(
                self,
                binary.as_deref(),
                Duration::from_millis(timeout_ms.unwrap_or(crate::upgrade::DEFAULT_TIMEOUT_MS)),
            ),
            Request::Regs { vcpu } => match self.regs(*vcpu) {
                Ok(r) => Response::ok(r),
                Err(e) => fail(e),
            },
            Request::Translate { vcpu, gva } => match self.vm.translate(*vcpu, *gva) {
                Ok(t) => Response::ok(t),
                Err(e) => fail(e),
            },
            Request::Patch {
                path,
                replace,
                mode,
            } => {
                let mode = match mode.as_deref().map(str::parse::<Mode>).transpose() {
                    Ok(m) => m,
                    Err(e) => return Response::err(ErrorCode::BadRequest, e),
                };
                let kernel = match self.guest_kernel() {
                    Ok(k) => k,
                    Err(e) => return Response::err(ErrorCode::NoKernel, error_chain(&e)),
                };
                let mut p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
                Self::patch_response(p.apply_as(
                    self.vm.as_ref(),
                    &kernel,
                    Path::new(path),
                    *replace,
                    mode,
                ))
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
                let k = self.guest_kernel().ok();
                let mut p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
                // Parts of patches whose module the guest unloaded show as gone.
                if let Some(k) = &k {
                    if let Err(e) = p.reconcile_modules(self.vm.as_ref(), k) {
                        log::warn!("checking patched modules: {e}");
                    }
                }
                Response::ok(p.list(self.vm.as_ref(), k.as_deref()))
            }
            Request::Verify => {
                let kernel = match self.guest_kernel() {
                    Ok(k) => k,
                    Err(e) => return Response::err(ErrorCode::NoKernel, error_chain(&e)),
                };
                let mut p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = p.reconcile_modules(self.vm.as_ref(), &kernel) {
                    return Self::patch_response(Err(e));
                }
                match p.verify_applied(self.vm.as_ref(), &kernel) {
                    Ok(r) => Response::ok(r),
                    Err(e) => Self::patch_response(Err(e)),
                }
            }
            Request::Protect {
                name,
                gpa,
                symbol,
                len,
            } => match self.protect(name, *gpa, symbol.as_deref(), *len) {
                Ok(()) => Response::ok(self.protect_info()),
                Err(r) => r,
            },
            Request::ProtectKernel { allow_writers } => match self.protect_kernel(allow_writers) {
                Ok(()) => Response::ok(self.protect_info()),
                Err(r) => r,
            },
            Request::Unprotect { name } => {
                let owner = user_owner(name);
                if !self
                    .vm
                    .write_control()
                    .protections()
                    .iter()
                    .any(|p| p.owner == owner)
                {
                    return Response::err(
                        ErrorCode::BadRequest,
                        format!("no range protected by the name '{name}' (lucos protect); patches' ranges go with their revert"),
                    );
                }
                match self.change_protection(&[owner], &[]) {
                    Ok(()) => Response::ok(self.protect_info()),
                    Err(r) => r,
                }
            }
            Request::Events { since } => Response::ok(self.events(*since)),
            Request::Protected => Response::ok(self.protect_info()),
            Request::Dmesg { since } => self.dmesg(*since),
            Request::Modules { symbols_of } => self.modules(symbols_of.as_deref()),
            Request::Alive { timeout_ms } => self.alive(*timeout_ms),
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

    /// Protects `len` bytes at `gpa`, or at kernel symbol `symbol` (its
    /// size by default), under the name `name`.
    fn protect(
        &self,
        name: &str,
        gpa: Option<u64>,
        symbol: Option<&str>,
        len: Option<u64>,
    ) -> Result<(), Response> {
        let bad = |m: String| Response::err(ErrorCode::BadRequest, m);
        if name.is_empty() || name.contains(char::is_whitespace) || name == KERNEL_TEXT_OWNER {
            return Err(bad(format!(
                "'{name}' is not a protection name (no spaces, not empty, not {KERNEL_TEXT_OWNER})"
            )));
        }
        let owner = user_owner(name);
        if self
            .vm
            .write_control()
            .protections()
            .iter()
            .any(|p| p.owner == owner)
        {
            return Err(bad(format!(
                "a range is protected by the name '{name}' already"
            )));
        }
        // The range is found and protected in one pause (a symbol's
        // translation through vCPU 0's tables must still hold).
        let (paused, range) = match (gpa, symbol) {
            (Some(gpa), None) => {
                let len = len.ok_or_else(|| bad("protect by address needs a length".into()))?;
                let paused = Paused::new(self.vm.as_ref())
                    .map_err(|e| Response::err(pause_error(&e), error_chain(&e)))?;
                let label = format!("{gpa:#x}");
                (
                    paused,
                    Protection {
                        owner,
                        label,
                        gpa,
                        len,
                        access: vmm_core::write_control::Access::Trapped,
                    },
                )
            }
            (None, Some(q)) => {
                let k = self
                    .guest_kernel()
                    .map_err(|e| Response::err(ErrorCode::NoKernel, error_chain(&e)))?;
                let a = k
                    .symbols
                    .answer(q)
                    .map_err(|e| Response::err(ErrorCode::NoSymbol, e.to_string()))?;
                let va = a.symbol.addr + a.offset;
                let len = len.unwrap_or(a.symbol.size.saturating_sub(a.offset));
                let (paused, paging) = self.paused_paging()?;
                let at = |va: u64| {
                    vmm_core::pagewalk::translate(self.vm.ram().as_ref(), paging, va)
                        .map(|t| t.gpa)
                        .map_err(|e| {
                            Response::err(ErrorCode::NotMapped, format!("{q} at {va:#x}: {e}"))
                        })
                };
                let gpa = at(va)?;
                if len > 0 && at(va + len - 1)? != gpa + len - 1 {
                    return Err(bad(format!(
                        "{q} ({va:#x}+{len:#x}) is not contiguous in guest-physical memory; protect it in parts"
                    )));
                }
                let label = if a.offset == 0 {
                    a.symbol.name.clone()
                } else {
                    format!("{}+{:#x}", a.symbol.name, a.offset)
                };
                (
                    paused,
                    Protection {
                        owner,
                        label,
                        gpa,
                        len,
                        access: vmm_core::write_control::Access::Trapped,
                    },
                )
            }
            _ => {
                return Err(bad(
                    "protect needs exactly one of an address and a symbol".into()
                ))
            }
        };
        paused
            .change_protection(&[], &[range])
            .map_err(|e| bad(e.to_string()))
    }

    /// Kernel text integrity: the running kernel's text (and read-only data,
    /// where its symbols bracket it) protected; its own text patching, and
    /// the functions in `allow_writers`, may write there.
    fn protect_kernel(&self, allow_writers: &[String]) -> Result<(), Response> {
        let k = self
            .guest_kernel()
            .map_err(|e| Response::err(ErrorCode::NoKernel, error_chain(&e)))?;
        let sym = |n: &str| k.symbols.lookup(n).ok().map(|s| s.addr);
        let mut spans = Vec::new();
        for (label, start, end) in [
            (".text", "_stext", "_etext"),
            (".rodata", "__start_rodata", "__end_rodata"),
        ] {
            match (sym(start), sym(end)) {
                (Some(s), Some(e)) if e > s => spans.push((label, s, e)),
                _ if label == ".text" => {
                    return Err(Response::err(
                        ErrorCode::NoSymbol,
                        "the kernel's symbols have no _stext.._etext",
                    ))
                }
                _ => {}
            }
        }
        let mut functions = Vec::new();
        for w in allow_writers {
            let a = k
                .symbols
                .answer(w)
                .map_err(|e| Response::err(ErrorCode::NoSymbol, e.to_string()))?;
            functions.push((
                a.symbol.name.clone(),
                a.symbol.addr,
                a.symbol.addr + a.symbol.size.max(1),
            ));
        }
        let (paused, paging) = self.paused_paging()?;
        let paging = match &k.tasks {
            Ok(t) => t.paging(paging, k.text, k.text_gpa),
            Err(_) => paging,
        };
        let mut ranges = Vec::new();
        for (label, start, end) in spans {
            // The kernel image is physically contiguous: check both ends.
            let gpa = start.wrapping_sub(k.text).wrapping_add(k.text_gpa);
            for (va, want) in [(start, gpa), (end - 1, gpa + (end - 1 - start))] {
                match vmm_core::pagewalk::translate(self.vm.ram().as_ref(), paging, va) {
                    Ok(t) if t.gpa == want => {}
                    other => {
                        return Err(Response::err(
                            ErrorCode::NotMapped,
                            format!(
                            "kernel {label} at {va:#x} is not where the image puts it: {other:?}"
                        ),
                        ))
                    }
                }
            }
            ranges.push(Protection {
                owner: KERNEL_TEXT_OWNER.into(),
                label: label.into(),
                gpa,
                len: end - start,
                access: vmm_core::write_control::Access::Trapped,
            });
        }
        let poking_pgd = match &k.tasks {
            Ok(t) => {
                match update_engine::linux::poking_pgd(self.vm.as_ref(), paging, t, &k.symbols) {
                    Ok(pgd) => Some(pgd),
                    Err(e) => {
                        log::warn!("kernel text integrity without Linux's text_poke allowed: {e}");
                        None
                    }
                }
            }
            Err(_) => None,
        };
        let before = self.policy.writers();
        self.policy.set_writers(Writers {
            poking_pgd,
            functions,
        });
        paused
            .change_protection(&[KERNEL_TEXT_OWNER.to_owned()], &ranges)
            .map_err(|e| {
                self.policy.set_writers(before);
                Response::err(ErrorCode::BadRequest, e.to_string())
            })
    }

    /// Whether the guest kernel has booted far enough for kernel text
    /// integrity: a Linux kernel has made its text read-only in its own page
    /// tables (mark_rodata_ro, after its init code patched itself); another
    /// kernel has a vCPU in user mode.
    pub fn kernel_booted(&self) -> bool {
        let Ok(k) = self.guest_kernel() else {
            return false;
        };
        let _one = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(paused) = Paused::new(self.vm.as_ref()) else {
            return false;
        };
        let states: Vec<_> = (0..self.vm.vcpu_count())
            .filter_map(|v| paused.vcpu(v).ok())
            .collect();
        let Some(first) = states.first() else {
            return false;
        };
        match &k.tasks {
            Ok(t) => {
                let paging = t.paging(first.paging, k.text, k.text_gpa);
                let text = k.symbols.lookup("_stext").map(|s| s.addr).unwrap_or(k.text);
                vmm_core::pagewalk::translate(self.vm.ram().as_ref(), paging, text)
                    .is_ok_and(|t| !t.writable)
            }
            Err(_) => states.iter().any(|s| s.cpl == 3),
        }
    }

    /// The guest paused, and vCPU 0's paging (for translating kernel and
    /// user addresses while nothing moves).
    fn paused_paging(&self) -> Result<(Paused<'_>, vmm_core::pagewalk::PagingState), Response> {
        let fail = |e: VmError| Response::err(pause_error(&e), error_chain(&e));
        let paused = Paused::new(self.vm.as_ref()).map_err(fail)?;
        let paging = paused.vcpu(0).map_err(fail)?.paging;
        Ok((paused, paging))
    }

    /// A write-control change in a pause of its own.
    fn change_protection(&self, release: &[String], add: &[Protection]) -> Result<(), Response> {
        let paused = Paused::new(self.vm.as_ref())
            .map_err(|e| Response::err(pause_error(&e), error_chain(&e)))?;
        paused
            .change_protection(release, add)
            .map_err(|e| Response::err(ErrorCode::BadRequest, e.to_string()))
    }

    fn protect_info(&self) -> ProtectInfo {
        let wc = self.vm.write_control();
        ProtectInfo {
            ranges: wc.protections(),
            slots: wc.slot_layout(),
            write_control: wc.stats(),
        }
    }

    /// Refused writes after `since`, the writer named by the kernel's symbols when known.
    fn events(&self, since: u64) -> EventsInfo {
        let wc = self.vm.write_control();
        let (events, next) = wc.events_since(since);
        let k = self
            .kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let events = events
            .into_iter()
            .map(|event| {
                let writer = k.as_ref().and_then(|k| {
                    k.symbols
                        .symbolize(event.rip)
                        .map(|(s, off)| format!("{}+{off:#x}", s.name))
                });
                EventInfo { event, writer }
            })
            .collect();
        EventsInfo {
            events,
            next,
            write_control: wc.stats(),
        }
    }

    /// The next module event the write policy holds a vCPU for.
    pub fn next_module_event(&self, timeout: Duration) -> Option<ModuleEvent> {
        self.policy.next_module_event(timeout)
    }

    /// Deals with a module event (the caller releases its vCPU after).
    pub fn module_event(&self, ev: &ModuleEvent) {
        let _one = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        if self.handed_to().is_some() {
            return;
        }
        let k = match self.guest_kernel() {
            Ok(k) => k,
            Err(e) => {
                log::error!("a module event ({ev:?}): {}", error_chain(&e));
                return;
            }
        };
        let mut p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
        match p.on_module_event(self.vm.as_ref(), &k, ev) {
            Ok(said) => {
                for s in said {
                    log::info!("{s}");
                }
            }
            Err(e) => log::error!("a module event ({ev:?}): {}", error_chain(&e)),
        }
    }

    /// The guest kernel, inspected on first use and kept.
    /// The background check of data changes (the VMM runs it about once
    /// a second): retires those that can, each in one short pause.
    pub fn retire_tick(&self) {
        let _one = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        if self.handed_to().is_some() {
            return;
        }
        let mut p = self.patcher.lock().unwrap_or_else(|e| e.into_inner());
        if !p.may_retire() {
            return;
        }
        let Ok(k) = self.guest_kernel() else { return };
        match p.retire(self.vm.as_ref(), &k) {
            Ok(done) => {
                for d in done {
                    log::info!("data change {d} retired: its old copy is no longer used");
                }
            }
            Err(e) => log::warn!("checking data changes for retirement: {}", error_chain(&e)),
        }
    }

    /// The guest kernel for a request served without the `ops` lock: the
    /// cached one, or (first time) one inspected under the lock, since an
    /// inspection pauses the VM.
    fn guest_kernel_unserialized(&self) -> Result<Arc<GuestKernel>, IntrospectError> {
        if let Some(k) = self
            .kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Ok(k.clone());
        }
        let _one = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        self.guest_kernel()
    }

    /// `dmesg`: the guest kernel's log from `since` on, read while it runs.
    fn dmesg(&self, since: u64) -> Response {
        let k = match self.guest_kernel_unserialized() {
            Ok(k) => k,
            Err(e) => return Response::err(ErrorCode::NoKernel, error_chain(&e)),
        };
        let layout = match &k.log {
            Ok(l) => l,
            Err(e) => {
                return Response::err(
                    ErrorCode::NoKernel,
                    format!("the guest kernel's log cannot be found: {e}"),
                )
            }
        };
        match klog::read_guest(self.vm.as_ref(), layout, since) {
            Ok(info) => Response::ok(info),
            Err(e @ klog::LogError::Read { .. }) => {
                Response::err(ErrorCode::NotMapped, error_chain(&e))
            }
            Err(e) => Response::err(ErrorCode::Internal, error_chain(&e)),
        }
    }

    /// `modules`: the guest's loaded modules (and one's symbols), read
    /// while the guest runs.
    fn modules(&self, symbols_of: Option<&str>) -> Response {
        let k = match self.guest_kernel_unserialized() {
            Ok(k) => k,
            Err(e) => return Response::err(ErrorCode::NoKernel, error_chain(&e)),
        };
        let layout = match &k.modules {
            Ok(l) => l,
            Err(e) => {
                return Response::err(
                    ErrorCode::NoKernel,
                    format!("the guest kernel's modules cannot be found: {e}"),
                )
            }
        };
        let modules = match update_engine::modules::list(self.vm.as_ref(), layout) {
            Ok(m) => m,
            Err(e) => return Response::err(ErrorCode::NotMapped, error_chain(&e)),
        };
        let symbols = match symbols_of {
            None => None,
            Some(name) => {
                let Some(m) = modules.iter().find(|m| m.name == name) else {
                    return Response::err(
                        ErrorCode::NoSymbol,
                        format!("no module named '{name}' is loaded"),
                    );
                };
                match update_engine::modules::symbols(self.vm.as_ref(), layout, m) {
                    Ok(s) => Some(s),
                    Err(e) => return Response::err(ErrorCode::NotMapped, error_chain(&e)),
                }
            }
        };
        Response::ok(update_engine::modules::ModulesInfo { modules, symbols })
    }

    /// `alive`: waits up to `timeout_ms` for the guest kernel's clock to
    /// advance, reading it while the guest runs.
    fn alive(&self, timeout_ms: u64) -> Response {
        if timeout_ms > MAX_ALIVE_MS {
            return Response::err(
                ErrorCode::BadRequest,
                format!("alive waits at most {MAX_ALIVE_MS} ms, not {timeout_ms}"),
            );
        }
        let k = match self.guest_kernel_unserialized() {
            Ok(k) => k,
            Err(e) => return Response::err(ErrorCode::NoKernel, error_chain(&e)),
        };
        match health::wait_alive(self.vm.as_ref(), &k, Duration::from_millis(timeout_ms)) {
            Ok(info) => Response::ok(info),
            Err(e @ HealthError::Stalled { .. }) => {
                let mut m = error_chain(&e);
                if self.vm.is_paused() {
                    m.push_str("; the VM is paused");
                }
                Response::err(ErrorCode::Stalled, m)
            }
            Err(e @ (HealthError::NoClock | HealthError::NotInImage { .. })) => {
                Response::err(ErrorCode::NoSymbol, error_chain(&e))
            }
            Err(e) => Response::err(ErrorCode::Internal, error_chain(&e)),
        }
    }

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
            .map(|q| {
                let found = match self.module_symbol(&k, q) {
                    Some(r) => r,
                    None => k.symbols.answer(q).map_err(|e| e.to_string()),
                };
                match found {
                    Ok(a) => SymbolAnswer::Found(a),
                    Err(error) => SymbolAnswer::Failed {
                        query: q.clone(),
                        error,
                    },
                }
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

    /// `NAME@MODULE` where MODULE is a module loaded in the guest: the
    /// symbol from that module's own table (its `file` is the module).
    /// None when the query is no such lookup (`NAME@FILE` of vmlinux).
    fn module_symbol(&self, k: &GuestKernel, q: &str) -> Option<Result<symbol_db::Answer, String>> {
        let (name, module) = q.rsplit_once('@')?;
        let layout = k.modules.as_ref().ok()?;
        let modules = update_engine::modules::list(self.vm.as_ref(), layout).ok()?;
        let m = modules.iter().find(|m| m.name == module)?;
        Some(
            update_engine::modules::symbols(self.vm.as_ref(), layout, m)
                .map_err(|e| e.to_string())
                .and_then(|syms| {
                    let s = update_engine::modules::symbol_named(&syms, module, name)?;
                    let mut sym =
                        symbol_db::Symbol::from_type_letter(s.name.clone(), s.addr, s.kind);
                    sym.size = s.size;
                    sym.file = Some(module.to_owned());
                    Ok(symbol_db::Answer {
                        query: q.to_owned(),
                        symbol: sym,
                        offset: 0,
                    })
                }),
        )
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
            write_control: self.vm.write_control().stats(),
            labels: self.ident.labels.clone(),
            vmm_version: crate::upgrade::version(),
            upgrades: self.upgrades.load(Ordering::Relaxed),
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
        if let Some(pid) = self.handed_to() {
            return Response::err(
                ErrorCode::NotRunning,
                format!("this VMM handed the VM to a new one (pid {pid}); connect again"),
            );
        }
        match req {
            Request::Status => return Response::ok(self.status()),
            Request::Protected => return Response::ok(self.protect_info()),
            // Read from guest memory while the guest runs: they answer
            // while a patch is applied (or the VM is paused).
            Request::Dmesg { since } => return self.dmesg(*since),
            Request::Alive { timeout_ms } => return self.alive(*timeout_ms),
            Request::Modules { symbols_of } => return self.modules(symbols_of.as_deref()),
            // Stopping never waits for a patch or an inspection in progress
            // (a switch that is stopped in its pause still completes).
            // The VM stops once this answer is out (`after_reply`).
            Request::Stop => return Response::ok(Done {}),
            _ => {}
        }
        let _one = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        // A request that waited for an upgrade must not act on a VM it
        // handed over.
        if let Some(pid) = self.handed_to() {
            return Response::err(
                ErrorCode::NotRunning,
                format!("this VMM handed the VM to a new one (pid {pid}); connect again"),
            );
        }
        self.handle_serialized(req)
    }

    fn after_reply(&self, req: &Request) {
        if matches!(req, Request::Stop) {
            self.vm.stop();
        }
        // Handed over: the old vCPU threads end parked (they never run the
        // guest again) and the process exits.
        if matches!(req, Request::Upgrade { .. }) && self.handed_to().is_some() {
            self.vm.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde_json::Value;
    use update_engine::kernel::SymbolsInfo;
    use update_engine::patcher::{PatchList, PatchReport};
    use vmm_core::control::{
        Done, ErrorCode, EventsInfo, PauseInfo, ProtectInfo, RegsInfo, Request, Response,
        StatusInfo,
    };
    use vmm_core::pagewalk::Translation;

    const DOC: &str = include_str!("../docs/control-protocol.md");

    /// `data` decoded as `T` and encoded again.
    fn typed<T: serde::Serialize + DeserializeOwned>(data: &Value) -> Value {
        let t: T = serde_json::from_value(data.clone())
            .unwrap_or_else(|e| panic!("{data} is not a {}: {e}", std::any::type_name::<T>()));
        serde_json::to_value(t).expect("encode")
    }

    #[test]
    fn every_example_in_the_protocol_doc_round_trips_through_the_wire_types() {
        let mut last: Option<Request> = None;
        let (mut requests, mut answers) = (0, 0);
        for line in DOC.lines().map(str::trim) {
            if let Some(text) = line.strip_prefix("-> ") {
                let doc: Value = serde_json::from_str(text).expect("a request line is JSON");
                last = serde_json::from_str::<Request>(text).ok();
                if let Some(req) = &last {
                    assert_eq!(serde_json::to_value(req).expect("encode"), doc, "{text}");
                }
                requests += 1;
            } else if let Some(text) = line.strip_prefix("<- ") {
                let doc: Value = serde_json::from_str(text).expect("an answer line is JSON");
                let resp: Response = serde_json::from_str(text).expect("an answer");
                assert_eq!(serde_json::to_value(&resp).expect("encode"), doc, "{text}");
                let Some(req) = last.take() else {
                    let e = resp.error.expect("an unknown request gets an error");
                    assert_eq!(e.code, ErrorCode::BadRequest, "{text}");
                    answers += 1;
                    continue;
                };
                if !resp.ok {
                    assert!(resp.error.is_some(), "{text}");
                    answers += 1;
                    continue;
                }
                let data = resp.data.clone().unwrap_or(Value::Null);
                let back = match req {
                    Request::Status => typed::<StatusInfo>(&data),
                    Request::Pause => typed::<PauseInfo>(&data),
                    Request::Resume | Request::Stop => typed::<Done>(&data),
                    Request::Regs { .. } => typed::<RegsInfo>(&data),
                    Request::Translate { .. } => typed::<Translation>(&data),
                    Request::Patch { .. } | Request::Revert { .. } => typed::<PatchReport>(&data),
                    Request::Patches => typed::<PatchList>(&data),
                    Request::Verify => typed::<update_engine::patcher::VerifyReport>(&data),
                    Request::Symbols { .. } => typed::<SymbolsInfo>(&data),
                    Request::Protect { .. }
                    | Request::ProtectKernel { .. }
                    | Request::Unprotect { .. }
                    | Request::Protected => typed::<ProtectInfo>(&data),
                    Request::Events { .. } => typed::<EventsInfo>(&data),
                    Request::Dmesg { .. } => typed::<vmm_core::control::DmesgInfo>(&data),
                    Request::Alive { .. } => typed::<vmm_core::control::AliveInfo>(&data),
                    Request::Upgrade { .. } => typed::<vmm_core::control::UpgradeInfo>(&data),
                    Request::Modules { .. } => typed::<update_engine::modules::ModulesInfo>(&data),
                };
                assert_eq!(back, data, "{req:?}: the answer changed in a round trip");
                answers += 1;
            }
        }
        assert_eq!(requests, answers, "every request in the doc has its answer");
        assert!(requests >= 12, "only {requests} examples found in the doc");
    }
}
