//! A patch's C transfer functions, run by the VMM in its sandbox
//! ([`vmm_core::sandbox`]): the patch objects linked a second time, at the
//! sandbox's code address, against nothing of the kernel. A transfer
//! function sees one element of each layout (copies) and nothing else; a
//! kernel symbol it uses is an unmapped address, so using one faults and
//! the fault names the symbol. Faults and runaways fail the call with
//! their cause; the caller keeps the guest as it was.

use std::cell::RefCell;
use std::sync::Mutex;
use std::time::Duration;

use vmm_core::sandbox::{self, Sandbox, SandboxError};

use crate::data::{CTransfer, DataChange};

/// The C transfer functions of one data change, ready to run.
#[derive(Debug)]
pub struct CRunner {
    symbol: String,
    functions: CTransfer,
    sandbox: Mutex<Sandbox>,
    to_new: u64,
    to_old: u64,
    /// Kernel symbols the objects refer to, by poison slot.
    unresolved: Vec<String>,
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
        if !linked.writable.is_empty() {
            return Err(format!(
                "the transfer functions of {} define variables of their own: the sandbox runs \
                 them on read-only code",
                change.symbol
            ));
        }
        let to_new = linked.symbol(Some(&c.object), &c.to_new)?;
        let to_old = linked.symbol(Some(&c.object), &c.to_old)?;
        let sb = Sandbox::new(&linked.bytes)
            .map_err(|e| format!("transfer functions of {}: {e}", change.symbol))?;
        Ok(Some(CRunner {
            symbol: change.symbol.clone(),
            functions: c.clone(),
            sandbox: Mutex::new(sb),
            to_new,
            to_old,
            unresolved: unresolved.into_inner(),
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

    fn call(&self, entry: u64, name: &str, a: &[u8], b: &mut [u8]) -> Result<(), String> {
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
        let per = (sandbox::ARG_MAX as usize / a_size.max(b_size).max(1)).max(1);
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
    /// is refused before the guest is paused.
    pub fn dry_run(&self, change: &DataChange, old: &[u8]) -> Result<(), String> {
        let (os, ns) = (change.old_size as usize, change.new_size as usize);
        let mut new = vec![0u8; ns * old.len() / os.max(1)];
        for (o, n) in old.chunks(os).zip(new.chunks_mut(ns)) {
            change.to_new(o, n);
        }
        self.to_new_all(old, &mut new)?;
        let mut back = old.to_vec();
        for (o, n) in back.chunks_mut(os).zip(new.chunks(ns)) {
            change.to_old(n, o);
        }
        self.to_old_all(&new, &mut back)
    }
}
