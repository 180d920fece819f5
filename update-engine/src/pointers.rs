//! Pointers into an old copy that the guest keeps in memory at run time.
//!
//! A data change retires when nothing can use its old copy again: no code
//! that uses it can run (checked in a pause: vCPUs, sleeping tasks), and no
//! pointer into it is left anywhere code could follow it. Pointers in the
//! kernel image's own data are found at build time (`users_left`,
//! `--repoint`); registers and the live part of kernel stacks are checked in
//! the pause. Pointers the kernel saved at run time (a `struct foo *` in a
//! heap object, a table copied at registration) are found here, by scanning
//! guest RAM for 8-byte words whose value lies in the old copy (its kernel
//! address, and its direct-map alias where the kernel has one): the
//! conservative scan of a garbage collector, exact about what it reports
//! since it reports the words themselves.
//!
//! The scan runs while the guest runs, with KVM's dirty log on: in the
//! retirement's pause only the pages the guest wrote since are scanned
//! again (a pre-copy, as live migration does), so the pause stays short and
//! no pointer can move from an unscanned page to a scanned one unseen.
//! Words on kernel stacks are left to the stack checks: below a stack
//! pointer is dead memory, and the live part was checked.

use vmm_core::guest::{find_words, Guest, Paused};
use vmm_core::pagewalk::{self, PagingState};
use vmm_core::vm::VmError;

use crate::kernel::GuestKernel;
use crate::safety::{Active, STACK_BYTES};

/// Rounds of scanning again, while the guest runs, the pages it wrote
/// during the round before, until they are few.
const ROUNDS: usize = 3;
/// Pages written during a round below which the pause takes the rest.
const FEW_PAGES: usize = 256;
const PAGE: u64 = 4096;

/// `[start, end)` address ranges.
pub type Ranges = Vec<(u64, u64)>;

/// A scan of guest RAM for pointers into one object, kept current by the
/// dirty log until it is dropped (which turns the log off).
pub struct PointerScan<'g> {
    guest: &'g dyn Guest,
    /// Values looked for: `[start, end)` address ranges.
    values: Vec<(u64, u64)>,
    /// Guest-physical ranges not scanned (kernel text, the object itself).
    skip: Vec<(u64, u64)>,
    /// Words holding a value looked for, as of the last scan of their page:
    /// (guest-physical address, value), sorted.
    hits: Vec<(u64, u64)>,
    /// Pages scanned again in the last [`PointerScan::now`] (`None`: all),
    /// if a pause got that far.
    pub rescanned: Option<Option<usize>>,
    /// Bytes scanned while the guest ran, and how long that took.
    pub scanned: (u64, std::time::Duration),
}

impl std::fmt::Debug for PointerScan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointerScan")
            .field("values", &self.values)
            .field("hits", &self.hits)
            .finish()
    }
}

impl<'g> PointerScan<'g> {
    /// Turns the dirty log on and scans guest RAM outside `skip` for words
    /// in `values` while the guest runs; then, up to [`ROUNDS`] times, the
    /// pages written meanwhile.
    pub fn start(
        guest: &'g dyn Guest,
        values: Vec<(u64, u64)>,
        skip: Vec<(u64, u64)>,
    ) -> Result<Self, String> {
        guest.set_dirty_log(true).map_err(|e| e.to_string())?;
        let mut s = PointerScan {
            guest,
            values,
            skip,
            hits: Vec::new(),
            rescanned: None,
            scanned: (0, std::time::Duration::ZERO),
        };
        let t = std::time::Instant::now();
        let mut bytes = s.scan(None)?;
        for _ in 0..ROUNDS {
            let Some(pages) = s.dirty()? else { break };
            let few = pages.len() < FEW_PAGES;
            bytes += s.scan(Some(&pages))?;
            if few {
                break;
            }
        }
        s.scanned = (bytes, t.elapsed());
        Ok(s)
    }

    fn dirty(&self) -> Result<Option<Vec<u64>>, String> {
        self.guest.dirty_pages().map_err(|e: VmError| e.to_string())
    }

    /// Scans `pages` again (`None`: all of RAM), replacing what was found
    /// on them before; returns the bytes scanned.
    fn scan(&mut self, pages: Option<&[u64]>) -> Result<u64, String> {
        let spans: Vec<(u64, u64)> = match pages {
            None => {
                self.hits.clear();
                self.guest
                    .ram_ranges()
                    .iter()
                    .map(|&(a, n)| (a, a + n))
                    .collect()
            }
            Some(pages) => {
                self.hits
                    .retain(|(a, _)| pages.binary_search(&(a & !(PAGE - 1))).is_err());
                pages.iter().map(|&p| (p, p + PAGE)).collect()
            }
        };
        let spans = subtract(&spans, &self.skip);
        let found = find_words(self.guest.ram(), &spans, &self.values)
            .map_err(|e| format!("scanning guest memory: {e}"))?;
        self.hits.extend(found);
        self.hits.sort_unstable();
        self.hits.dedup();
        Ok(spans.iter().map(|(a, b)| b - a).sum())
    }

    /// In a pause: the words that hold a pointer into the object now (the
    /// pages written since the last scan are scanned again).
    pub fn now(&mut self) -> Result<&[(u64, u64)], String> {
        let pages = self.dirty()?.map(|mut pages| {
            // The guest's writes to protected pages (read-only slots) are
            // made by the VMM, out of KVM's log: those pages too.
            let ram = self.guest.ram_ranges();
            for p in self.guest.protections() {
                let first = p.gpa & !(PAGE - 1);
                pages.extend(
                    (first..p.gpa + p.len)
                        .step_by(PAGE as usize)
                        .filter(|a| ram.iter().any(|&(s, n)| (s..s + n).contains(a))),
                );
            }
            pages.sort_unstable();
            pages.dedup();
            pages
        });
        self.rescanned = Some(pages.as_ref().map(Vec::len));
        self.scan(pages.as_deref())?;
        Ok(&self.hits)
    }
}

impl Drop for PointerScan<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.guest.set_dirty_log(false) {
            log::warn!("turning the dirty log off after a pointer scan: {e}");
        }
    }
}

/// `spans` less `skip` (both `[start, end)` lists; `skip` in any order).
fn subtract(spans: &[(u64, u64)], skip: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = spans.to_vec();
    for &(a, b) in skip {
        out = out
            .into_iter()
            .flat_map(|(s, e)| {
                if b <= s || a >= e {
                    vec![(s, e)]
                } else {
                    [(s, a.max(s)), (b.min(e), e)]
                        .into_iter()
                        .filter(|(x, y)| x < y)
                        .collect()
                }
            })
            .collect();
    }
    out
}

/// What to look for and what to leave out for the old copy of `symbol` at
/// kernel address `[start, end)`: its kernel addresses and, where the
/// kernel has a direct map (`page_offset_base`), their alias there; the
/// kernel's text and the copy itself are not scanned.
pub fn targets(
    g: &dyn Guest,
    k: &GuestKernel,
    tables: PagingState,
    text: Option<(u64, u64)>,
    start: u64,
    end: u64,
) -> Result<(Ranges, Ranges), String> {
    let mut values = vec![(start, end)];
    let mut skip: Vec<(u64, u64)> = text.map(|(a, n)| (a, a + n)).into_iter().collect();
    let mut at = start;
    let mut gpas = Vec::new();
    while at < end {
        let t = pagewalk::translate(g.ram(), tables, at)
            .map_err(|e| format!("the old copy at {at:#x}: {e}"))?;
        let n = ((at | (PAGE - 1)) + 1).min(end) - at;
        gpas.push((t.gpa, t.gpa + n));
        at += n;
    }
    skip.extend(gpas.iter().copied());
    if let Ok(s) = k.symbols.lookup("page_offset_base") {
        let mut b = [0u8; 8];
        if crate::kernel::read_virt(g, tables, s.addr, &mut b).is_ok() {
            let base = u64::from_le_bytes(b);
            values.extend(gpas.iter().map(|&(a, e)| (base + a, base + e)));
        }
    }
    Ok((values, skip))
}

/// Guest-physical pages of kernel stacks now: each vCPU's (the one its
/// stack pointer is on in kernel mode, and the one its next entry into the
/// kernel starts from, `RSP0` of its task-state segment) and, on Linux,
/// every task's.
pub fn stack_pages(
    paused: &Paused<'_>,
    tables: PagingState,
    tasks: Option<&crate::linux::TaskLayout>,
) -> Result<Vec<u64>, String> {
    let g = paused.guest();
    let mut stacks: Vec<(u64, PagingState)> = Vec::new();
    for v in 0..g.vcpu_count() {
        let s = paused.vcpu(v).map_err(|e| e.to_string())?;
        if s.cpl == 0 {
            stacks.push((s.rsp & !(STACK_BYTES - 1), s.paging));
        }
        let mut b = [0u8; 8];
        if s.tr_base != 0 && crate::kernel::read_virt(g, s.paging, s.tr_base + 4, &mut b).is_ok() {
            let rsp0 = u64::from_le_bytes(b);
            stacks.push((rsp0.wrapping_sub(1) & !(STACK_BYTES - 1), s.paging));
        }
    }
    if let Some(layout) = tasks {
        for base in crate::linux::task_stacks(g, tables, layout)? {
            stacks.push((base & !(STACK_BYTES - 1), tables));
        }
    }
    let mut pages = Vec::new();
    for (base, paging) in stacks {
        for p in (base..base + STACK_BYTES).step_by(PAGE as usize) {
            if let Ok(t) = pagewalk::translate(g.ram(), paging, p) {
                pages.push(t.gpa & !(PAGE - 1));
            }
        }
    }
    pages.sort_unstable();
    pages.dedup();
    Ok(pages)
}

/// The first of `hits` outside `stack_pages`, as what holds the data of
/// `labels` (value ranges, and what they are: `files_stat (old copy)`) in
/// use: the word's guest-physical address and, in the kernel image, its
/// symbol.
pub fn holding(
    k: &GuestKernel,
    labels: &[(u64, u64, String)],
    hits: &[(u64, u64)],
    stack_pages: &[u64],
) -> Option<(String, Active)> {
    let (gpa, value) = hits
        .iter()
        .copied()
        .find(|(a, _)| stack_pages.binary_search(&(a & !(PAGE - 1))).is_err())?;
    let named = gpa
        .checked_sub(k.text_gpa)
        .and_then(|off| k.symbols.symbolize(k.text + off))
        .map(|(s, off)| format!("{}+{off:#x}, ", s.name))
        .unwrap_or_default();
    let data = labels
        .iter()
        .find(|(a, b, _)| (*a..*b).contains(&value))
        .map_or_else(|| "data being left".to_owned(), |l| l.2.clone());
    Some((
        "memory".to_owned(),
        Active::Holding {
            data,
            place: format!("the word at {named}guest-physical {gpa:#x}"),
            value,
        },
    ))
}

/// A check for a switch's pause ([`crate::switch::switch_checked`]): no
/// word of guest memory outside kernel stacks holds a value of `labels`
/// (`scan` kept current by the dirty log).
pub fn check<'a, 'g: 'a>(
    scan: &'a mut PointerScan<'g>,
    k: &'a GuestKernel,
    tables: PagingState,
    tasks: Option<&'a crate::linux::TaskLayout>,
    labels: Vec<(u64, u64, String)>,
) -> impl FnMut(&Paused<'_>) -> Result<Option<(String, Active)>, String> + 'a + use<'a, 'g> {
    move |paused| {
        let hits = scan.now()?;
        if hits.is_empty() {
            return Ok(None);
        }
        let stacks = stack_pages(paused, tables, tasks)?;
        Ok(holding(k, &labels, hits, &stacks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_ranges_are_cut_out_of_the_spans() {
        let spans = [(0, 100), (200, 300)];
        assert_eq!(
            subtract(&spans, &[(50, 60), (190, 210), (290, 400)]),
            vec![(0, 50), (60, 100), (210, 290)]
        );
        assert_eq!(subtract(&spans, &[(0, 300)]), Vec::<(u64, u64)>::new());
        assert_eq!(subtract(&spans, &[]), spans.to_vec());
    }
}
