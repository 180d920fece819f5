//! A patch's C transfer functions, run by the VMM in its sandbox
//! ([`vmm_core::sandbox`]): the patch objects linked a second time, at the
//! sandbox's code address, against nothing of the kernel. A transfer
//! function sees one element of each layout (copies) and nothing else; a
//! kernel symbol it uses is an unmapped address, so using one faults and
//! the fault names the symbol. Faults and runaways fail the call with
//! their cause; the caller keeps the guest as it was.
//!
//! Two engines run the same linked code: the sandbox's interpreter
//! ([`vmm_core::sandbox::interp`], no VM entry: what a trapped write pays)
//! where it carries out every instruction the functions can reach, else
//! the KVM sandbox. The dry run before a patch's pause runs both on every
//! element and keeps the interpreter only if its results are the KVM
//! sandbox's, byte for byte. `LUCOS_TRANSFER_ENGINE=sandbox` in the VMM's
//! environment makes the KVM sandbox the engine.

use std::cell::RefCell;
use std::sync::Mutex;
use std::time::Duration;

use vmm_core::sandbox::interp::{Program, INSTRUCTION_LIMIT};
use vmm_core::sandbox::{self, Sandbox, SandboxError};

use crate::data::{CTransfer, DataChange};

/// The C transfer functions of one data change, ready to run.
#[derive(Debug)]
pub struct CRunner {
    symbol: String,
    functions: CTransfer,
    sandbox: Mutex<Sandbox>,
    /// The interpreter while it is the engine, else why the KVM sandbox is.
    interpreter: Mutex<Result<Program, String>>,
    to_new: u64,
    to_old: u64,
    /// Kernel symbols the objects refer to, by poison slot.
    unresolved: Vec<String>,
    /// Where the patch's own variables would be (not mapped).
    own_data: std::ops::Range<u64>,
    limit: Duration,
    old_size: usize,
    new_size: usize,
}

impl CRunner {
    /// Links `objects` (the patch's) for the sandbox and finds `change`'s
    /// functions. `None` when the change has none.
    pub fn new(change: &DataChange, objects: &[(String, Vec<u8>)]) -> Result<Option<Self>, String> {
        let Some(c) = &change.c else {
            return Ok(None);
        };
        let unresolved = RefCell::new(Vec::<String>::new());
        let resolve = |name: &str| -> Result<u64, String> {
            if let Some(a) = sandbox::runtime_symbol(name) {
                return Ok(a);
            }
            let mut u = unresolved.borrow_mut();
            let i = match u.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    u.push(name.to_owned());
                    u.len() - 1
                }
            };
            sandbox::poison_symbol(i as u64)
                .ok_or_else(|| "the patch refers to too many kernel symbols".to_owned())
        };
        let linked = crate::link::link(objects, sandbox::CODE_VA, &resolve)
            .map_err(|e| format!("linking the transfer functions of {}: {e}", change.symbol))?;
        // The patch's own variables (of other functions in the same
        // sources) are linked after its code and read-only data: the
        // sandbox gets the code only, so a transfer function that uses one
        // faults, named, instead of seeing its initial value.
        let code_len = linked
            .writable
            .iter()
            .map(|&(at, _)| at.saturating_sub(linked.base) as usize)
            .min()
            .unwrap_or(linked.bytes.len())
            .min(linked.bytes.len());
        let code = &linked.bytes[..code_len];
        let own_data =
            sandbox::CODE_VA + code_len as u64..sandbox::CODE_VA + linked.bytes.len() as u64;
        let to_new = linked.symbol(Some(&c.object), &c.to_new)?;
        let to_old = linked.symbol(Some(&c.object), &c.to_old)?;
        let sb = Sandbox::new(code)
            .map_err(|e| format!("transfer functions of {}: {e}", change.symbol))?;
        let forced = std::env::var("LUCOS_TRANSFER_ENGINE").is_ok_and(|v| v == "sandbox");
        let program = if forced {
            Err("(LUCOS_TRANSFER_ENGINE=sandbox)".to_owned())
        } else {
            Program::new(code, &[to_new, to_old])
        };
        let interpreter = program.map_err(|why| {
            log::info!(
                "transfer functions of {} run in the KVM sandbox: the interpreter does not \
                 carry out {why}",
                change.symbol
            );
            format!("the interpreter does not carry out {why}")
        });
        Ok(Some(CRunner {
            symbol: change.symbol.clone(),
            functions: c.clone(),
            sandbox: Mutex::new(sb),
            interpreter: Mutex::new(interpreter),
            to_new,
            to_old,
            unresolved: unresolved.into_inner(),
            own_data,
            limit: sandbox::TIME_LIMIT,
            old_size: change.old_size as usize,
            new_size: change.new_size as usize,
        }))
    }

    /// Overrides the time limit of one call.
    pub fn with_limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// The interpreter while it is the engine, else why the KVM sandbox is.
    fn interpreter(&self) -> std::sync::MutexGuard<'_, Result<Program, String>> {
        self.interpreter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The interpreter's instruction limit for the time limit of a call.
    fn instructions(&self) -> u64 {
        let scaled = INSTRUCTION_LIMIT as u128 * self.limit.as_micros()
            / sandbox::TIME_LIMIT.as_micros().max(1);
        (scaled as u64).max(1)
    }

    /// Which engine runs the functions: `interpreter`, or `kvm-sandbox`
    /// and why.
    pub fn engine(&self) -> (&'static str, Option<String>) {
        match &*self.interpreter() {
            Ok(_) => ("interpreter", None),
            Err(why) => ("kvm-sandbox", Some(why.clone())),
        }
    }

    fn call(&self, entry: u64, name: &str, a: &[u8], b: &mut [u8]) -> Result<(), String> {
        let limit = self.instructions();
        if let Ok(p) = self.interpreter().as_mut() {
            let b_size = b.len();
            return p
                .call_each(entry, (a, a.len()), (b, b_size), limit)
                .map_err(|e| self.explain(name, e));
        }
        let mut sb = self.sandbox.lock().unwrap_or_else(|e| e.into_inner());
        // The limit is wall-clock time: a host that took the thread away
        // for a while is not a runaway. Once more with four times as long.
        let r = match sb.call(entry, a, b, self.limit) {
            Err(SandboxError::RanAway(_)) => sb.call(entry, a, b, self.limit * 4),
            r => r,
        };
        r.map_err(|e| self.explain(name, e))
    }

    /// The error of a call of `name`, naming the kernel symbol a fault was
    /// for when it was one.
    fn explain(&self, name: &str, e: SandboxError) -> String {
        let mut why = format!("transfer function {name} of {}: {e}", self.symbol);
        if let SandboxError::Fault { address, .. } = e {
            if let Some(s) =
                sandbox::poison_index(address).and_then(|i| self.unresolved.get(i as usize))
            {
                why += &format!(" (it uses {s})");
            } else if self.own_data.contains(&address) {
                why += " (a variable of the patch's own: a transfer function can use only its \
                         two arguments)";
            }
        }
        why
    }

    /// Old→new for one element: `new` holds the element's current new
    /// bytes (the derived part already done) and gets what the function
    /// wrote.
    pub fn to_new(&self, old: &[u8], new: &mut [u8]) -> Result<(), String> {
        debug_assert_eq!((old.len(), new.len()), (self.old_size, self.new_size));
        self.call(self.to_new, &self.functions.to_new, old, new)
    }

    /// New→old for one element, likewise.
    pub fn to_old(&self, new: &[u8], old: &mut [u8]) -> Result<(), String> {
        debug_assert_eq!((old.len(), new.len()), (self.old_size, self.new_size));
        self.call(self.to_old, &self.functions.to_old, new, old)
    }

    /// `entry` over every element pair of `a` and `b` (sizes `a_size`,
    /// `b_size`), in as few sandbox calls as the buffers allow: a pause
    /// does not pay a VM exit per element.
    fn each(
        &self,
        entry: u64,
        name: &str,
        (a, a_size): (&[u8], usize),
        (b, b_size): (&mut [u8], usize),
    ) -> Result<(), String> {
        if let Ok(p) = self.interpreter().as_mut() {
            return interpret_each(p, entry, (a, a_size), (b, b_size), self.instructions())
                .map_err(|e| self.explain(name, e));
        }
        self.each_in_sandbox(entry, name, (a, a_size), (b, b_size))
    }

    /// [`CRunner::each`] in the KVM sandbox.
    fn each_in_sandbox(
        &self,
        entry: u64,
        name: &str,
        (a, a_size): (&[u8], usize),
        (b, b_size): (&mut [u8], usize),
    ) -> Result<(), String> {
        let per = per_call(a_size, b_size);
        let mut sb = self.sandbox.lock().unwrap_or_else(|e| e.into_inner());
        for (ac, bc) in a.chunks(per * a_size).zip(b.chunks_mut(per * b_size)) {
            let limit = self.limit * (ac.len() / a_size.max(1)).max(1) as u32;
            let r = match sb.call_each(entry, (ac, a_size), (bc, b_size), limit) {
                Err(SandboxError::RanAway(_)) => {
                    sb.call_each(entry, (ac, a_size), (bc, b_size), limit * 4)
                }
                r => r,
            };
            r.map_err(|e| self.explain(name, e))?;
        }
        Ok(())
    }

    /// Old→new for every element of the object (`old`, `new` whole, the
    /// derived part of `new` done).
    pub fn to_new_all(&self, old: &[u8], new: &mut [u8]) -> Result<(), String> {
        let (os, ns) = (self.old_size, self.new_size);
        self.each(self.to_new, &self.functions.to_new, (old, os), (new, ns))
    }

    /// New→old for every element, likewise.
    pub fn to_old_all(&self, new: &[u8], old: &mut [u8]) -> Result<(), String> {
        let (os, ns) = (self.old_size, self.new_size);
        self.each(self.to_old, &self.functions.to_old, (new, ns), (old, os))
    }

    /// Both directions over every element of `old` (a snapshot of the old
    /// object), results thrown away: a function that faults or runs away
    /// is refused before the guest is paused. Run in the KVM sandbox, and
    /// by the interpreter where it is the engine: unless its results are
    /// the sandbox's, byte for byte, the KVM sandbox becomes the engine.
    pub fn dry_run(&self, change: &DataChange, old: &[u8]) -> Result<(), String> {
        let (os, ns) = (change.old_size as usize, change.new_size as usize);
        let mut derived = vec![0u8; ns * old.len() / os.max(1)];
        for (o, n) in old.chunks(os).zip(derived.chunks_mut(ns)) {
            change.to_new(o, n);
        }
        let mut new = derived.clone();
        self.each_in_sandbox(
            self.to_new,
            &self.functions.to_new,
            (old, os),
            (&mut new, ns),
        )?;
        let mut back_derived = old.to_vec();
        for (o, n) in back_derived.chunks_mut(os).zip(new.chunks(ns)) {
            change.to_old(n, o);
        }
        let mut back = back_derived.clone();
        self.each_in_sandbox(
            self.to_old,
            &self.functions.to_old,
            (&new, ns),
            (&mut back, os),
        )?;

        let mut slot = self.interpreter();
        let Ok(p) = slot.as_mut() else {
            return Ok(());
        };
        let limit = self.instructions();
        let mut differs = None;
        for (entry, (a, a_size), (init, want, b_size)) in [
            (self.to_new, (old, os), (&derived, &new, ns)),
            (self.to_old, (&new[..], ns), (&back_derived, &back, os)),
        ] {
            let mut got = init.clone();
            if let Err(e) = interpret_each(p, entry, (a, a_size), (&mut got, b_size), limit) {
                differs = Some(format!("it failed where the KVM sandbox did not: {e}"));
            } else if &got != want {
                let at = got
                    .iter()
                    .zip(want.iter())
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                differs = Some(format!(
                    "element {} differs from the KVM sandbox's at byte {}",
                    at / b_size.max(1),
                    at % b_size.max(1)
                ));
            }
            if differs.is_some() {
                break;
            }
        }
        if let Some(why) = differs {
            log::warn!(
                "transfer functions of {}: the interpreter's results are not the KVM sandbox's \
                 ({why}); they run in the KVM sandbox",
                self.symbol
            );
            *slot = Err(format!(
                "the interpreter's results differed in the dry run: {why}"
            ));
        }
        Ok(())
    }
}

/// Element pairs of sizes `a_size` and `b_size` one call takes.
fn per_call(a_size: usize, b_size: usize) -> usize {
    (sandbox::ARG_MAX as usize / a_size.max(b_size).max(1)).max(1)
}

/// `entry` interpreted over every element pair, as many per call as the
/// sandbox's buffers take (what the KVM sandbox would be given).
fn interpret_each(
    p: &mut Program,
    entry: u64,
    (a, a_size): (&[u8], usize),
    (b, b_size): (&mut [u8], usize),
    limit: u64,
) -> Result<(), SandboxError> {
    let per = per_call(a_size, b_size);
    for (ac, bc) in a.chunks(per * a_size).zip(b.chunks_mut(per * b_size)) {
        p.call_each(entry, (ac, a_size), (bc, b_size), limit)?;
    }
    Ok(())
}
