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

use vmm_core::guest::{find_words, Guest, Paused, PhysMemory};
use vmm_core::memory::MemoryError;
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
/// Where x86-64 Linux maps all of physical memory when it does not move it
/// (`__PAGE_OFFSET` with 4-level paging, no KASLR of the direct map).
const LINUX_PAGE_OFFSET: u64 = 0xffff_8880_0000_0000;

/// What is looked for: a `[start, end)` range of values (addresses) and
/// what it is, for messages (`files_stat (old copy)`).
pub type Target = (u64, u64, String);

/// Guest-physical `[start, end)` ranges.
pub type Spans = Vec<(u64, u64)>;

/// Who holds a switch back when a word of memory points into a target.
pub const MEMORY: &str = "memory";

/// A scan of guest RAM for pointers into one object, kept current by the
/// dirty log until it is dropped (which turns the log off).
pub struct PointerScan<'g> {
    guest: &'g dyn Guest,
    /// What is looked for.
    targets: Vec<Target>,
    /// Their ranges alone (what [`find_words`] takes).
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
    /// Turns the dirty log on and scans guest RAM and the patch area
    /// outside `skip` for words in `targets` while the guest runs; then, up
    /// to [`ROUNDS`] times, the pages written meanwhile.
    pub fn start(
        guest: &'g dyn Guest,
        targets: Vec<Target>,
        skip: Vec<(u64, u64)>,
    ) -> Result<Self, String> {
        if let Err(e) = guest.set_dirty_log(true) {
            // Not left on in part.
            let _ = guest.set_dirty_log(false);
            return Err(e.to_string());
        }
        let mut s = PointerScan {
            guest,
            values: targets.iter().map(|t| (t.0, t.1)).collect(),
            targets,
            skip,
            hits: Vec::new(),
            rescanned: None,
            scanned: (0, std::time::Duration::ZERO),
        };
        let t = std::time::Instant::now();
        let mut bytes = s.scan(None)?;
        for _ in 0..ROUNDS {
            // Unknown (a slot changed): all of it again.
            let pages = s.dirty()?;
            let few = pages.as_ref().is_some_and(|p| p.len() < FEW_PAGES);
            bytes += s.scan(pages.as_deref())?;
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
                let area = self.guest.area();
                self.guest
                    .ram_ranges()
                    .iter()
                    .map(|&(a, n)| (a, a + n))
                    .chain([(area.gpa, area.gpa + area.size)])
                    .collect()
            }
            Some(pages) => {
                self.hits
                    .retain(|(a, _)| pages.binary_search(&(a & !(PAGE - 1))).is_err());
                pages.iter().map(|&p| (p, p + PAGE)).collect()
            }
        };
        let spans = subtract(&spans, &self.skip);
        let found = find_words(&GuestMemory(self.guest), &spans, &self.values)
            .map_err(|e| format!("scanning guest memory: {e}"))?;
        self.hits.extend(found);
        self.hits.sort_unstable();
        self.hits.dedup();
        Ok(spans.iter().map(|(a, b)| b - a).sum())
    }

    /// In a pause: the words that hold a pointer into the object now (the
    /// pages written since the last scan are scanned again).
    pub fn now(&mut self) -> Result<&[(u64, u64)], String> {
        let pages = self.dirty()?;
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

/// Guest RAM and the patch area (the VMM's memory the guest sees: new
/// copies, patches' own variables) as one guest-physical memory.
struct GuestMemory<'g>(&'g dyn Guest);

impl PhysMemory for GuestMemory<'_> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let area = self.0.area();
        match gpa.checked_sub(area.gpa).filter(|&off| off < area.size) {
            Some(off) => self.0.area_read(off, buf),
            None => self.0.ram().read_phys(gpa, buf),
        }
    }
    fn write_phys(&self, gpa: u64, _: &[u8]) -> Result<(), MemoryError> {
        Err(MemoryError::OutOfRange { addr: gpa, len: 0 })
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

/// What to look for and what to leave out for `what`, at kernel address
/// `[start, end)` in RAM: its kernel addresses and their alias in Linux's
/// direct map; the kernel's text and the object itself are not scanned.
pub fn targets(
    g: &dyn Guest,
    k: &GuestKernel,
    tables: PagingState,
    text: Option<(u64, u64)>,
    (start, end): (u64, u64),
    what: &str,
) -> Result<(Vec<Target>, Spans), String> {
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
    // Linux's direct map: where `page_offset_base` says (KASLR), else its
    // fixed place.
    let direct = match k.symbols.lookup("page_offset_base") {
        Ok(s) => {
            let mut b = [0u8; 8];
            crate::kernel::read_virt(g, tables, s.addr, &mut b)
                .map_err(|e| format!("page_offset_base: {e}"))?;
            Some(u64::from_le_bytes(b))
        }
        Err(_) if k.symbols.lookup("init_task").is_ok() => Some(LINUX_PAGE_OFFSET),
        Err(_) => None,
    };
    if let Some(base) = direct {
        values.extend(gpas.iter().map(|&(a, e)| (base + a, base + e)));
    }
    let targets = values
        .into_iter()
        .map(|(a, b)| (a, b, what.to_owned()))
        .collect();
    Ok((targets, skip))
}

/// Guest-physical pages of kernel stacks whose words the stack checks
/// cover (their live part) or that are dead: each vCPU's (the one its
/// stack pointer is on in kernel mode; for the test kernel, whose tasks
/// enter the kernel on their CPU's stack, the one `RSP0` of its
/// task-state segment names, which on Linux is the entry trampoline's) and,
/// on Linux, every task's but that of a task interrupted on a vCPU now
/// running on another stack (its frames there are live and are scanned).
pub fn stack_pages(
    paused: &Paused<'_>,
    tables: PagingState,
    tasks: Option<&crate::linux::TaskLayout>,
) -> Result<Vec<u64>, String> {
    let g = paused.guest();
    let mut stacks: Vec<(u64, PagingState)> = Vec::new();
    let mut vcpus = Vec::new();
    for v in 0..g.vcpu_count() {
        let s = paused.vcpu(v).map_err(|e| e.to_string())?;
        vcpus.push(s);
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
        let current = crate::linux::current_stacks(g, tables, layout, g.vcpu_count())?;
        let interrupted = |base: u64| {
            current.iter().zip(&vcpus).any(|(c, s)| {
                *c == Some(base) && s.cpl == 0 && !(base..base + STACK_BYTES).contains(&s.rsp)
            })
        };
        for base in crate::linux::task_stacks(g, tables, layout)? {
            if !interrupted(base) {
                stacks.push((base & !(STACK_BYTES - 1), tables));
            }
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
/// `targets` in use: the word's guest-physical address and, in the kernel
/// image, its symbol.
pub fn holding(
    k: &GuestKernel,
    targets: &[Target],
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
    let data = targets
        .iter()
        .find(|(a, b, _)| (*a..*b).contains(&value))
        .map_or_else(|| "data being left".to_owned(), |l| l.2.clone());
    Some((
        MEMORY.to_owned(),
        Active::Holding {
            data,
            place: format!("the word at {named}guest-physical {gpa:#x}"),
            value,
        },
    ))
}

/// A check for a switch's pause ([`crate::switch::switch_checked`]): no
/// word of guest memory outside kernel stacks points into `scan`'s targets
/// (the scan kept current by the dirty log).
pub fn check<'a, 'g: 'a>(
    scan: &'a mut PointerScan<'g>,
    k: &'a GuestKernel,
    tables: PagingState,
    tasks: Option<&'a crate::linux::TaskLayout>,
) -> impl FnMut(&Paused<'_>) -> Result<Option<(String, Active)>, String> + 'a + use<'a, 'g> {
    move |paused| {
        if scan.now()?.is_empty() {
            return Ok(None);
        }
        let stacks = stack_pages(paused, tables, tasks)?;
        Ok(holding(k, &scan.targets, &scan.hits, &stacks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;
    use vmm_core::guest::{AreaInfo, PauseToken, VcpuState};
    use vmm_core::write_control::{ProtectError, Protection};

    const OBJ: (u64, u64) = (0xffff_ffff_8100_4ce0, 0xffff_ffff_8100_4cf0);
    const AREA: u64 = 0x10_0000;

    /// 64 KiB of RAM and a 4 KiB patch area after it; its dirty log is
    /// what the test says it is.
    struct Mem {
        ram: Mutex<Vec<u8>>,
        area: Mutex<Vec<u8>>,
        log: Mutex<Option<Vec<u64>>>,
    }

    impl Mem {
        fn new() -> Self {
            Mem {
                ram: Mutex::new(vec![0; 0x1_0000]),
                area: Mutex::new(vec![0; 0x1000]),
                log: Mutex::new(Some(Vec::new())),
            }
        }
        /// The guest writes `v` at `gpa`; `logged`: KVM saw it.
        fn put(&self, gpa: u64, v: u64, logged: bool) {
            let mut r = self.ram.lock().expect("lock");
            r[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
            if logged {
                if let Some(l) = self.log.lock().expect("lock").as_mut() {
                    l.push(gpa & !0xfff);
                }
            }
        }
    }

    impl PhysMemory for Mem {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let r = self.ram.lock().expect("lock");
            buf.copy_from_slice(&r[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        }
        fn write_phys(&self, _: u64, _: &[u8]) -> Result<(), MemoryError> {
            unreachable!()
        }
    }

    impl Guest for Mem {
        fn ram(&self) -> &dyn PhysMemory {
            self
        }
        fn vcpu_count(&self) -> u8 {
            1
        }
        fn is_paused(&self) -> bool {
            false
        }
        fn pause_vcpus(&self) -> Result<Duration, VmError> {
            Ok(Duration::ZERO)
        }
        fn resume_vcpus(&self) -> Result<(), VmError> {
            Ok(())
        }
        fn vcpu_state(&self, _: &PauseToken, _: u8) -> Result<VcpuState, VmError> {
            unreachable!()
        }
        fn area(&self) -> AreaInfo {
            AreaInfo {
                gpa: AREA,
                size: 0x1000,
            }
        }
        fn area_write(&self, _: u64, _: &[u8]) -> Result<(), MemoryError> {
            unreachable!()
        }
        fn area_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let a = self.area.lock().expect("lock");
            buf.copy_from_slice(&a[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn change_protection(
            &self,
            _: &PauseToken,
            _: &[String],
            _: &[Protection],
        ) -> Result<(), ProtectError> {
            unreachable!()
        }
        fn protections(&self) -> Vec<Protection> {
            Vec::new()
        }
        fn ram_ranges(&self) -> Vec<(u64, u64)> {
            vec![(0, 0x1_0000)]
        }
        fn dirty_pages(&self) -> Result<Option<Vec<u64>>, VmError> {
            let mut l = self.log.lock().expect("lock");
            Ok(match l.as_mut() {
                Some(v) => Some(std::mem::take(v)),
                None => {
                    *l = Some(Vec::new());
                    None
                }
            })
        }
    }

    #[test]
    fn the_scan_follows_the_log_and_scans_all_again_when_it_is_lost() {
        let g = Mem::new();
        g.put(0x1000, OBJ.0, true);
        g.put(0x2000 + 4, OBJ.0, true); // not a word
        g.area.lock().expect("lock")[0x10..0x18].copy_from_slice(&(OBJ.0 + 8).to_le_bytes());
        let mut s = PointerScan::start(
            &g,
            vec![(OBJ.0, OBJ.1, "obj".into())],
            vec![(0x3000, 0x4000)],
        )
        .expect("scan");
        // RAM and the patch area, not what is skipped.
        g.put(0x3008, OBJ.0, false);
        assert_eq!(
            s.now().expect("now"),
            &[(0x1000, OBJ.0), (AREA + 0x10, OBJ.0 + 8)]
        );
        // Written since, logged: the pointer moved, the pause sees where.
        g.put(0x1000, 0, true);
        g.put(0x5000, OBJ.0 + 1, true);
        assert_eq!(
            s.now().expect("now"),
            &[(0x5000, OBJ.0 + 1), (AREA + 0x10, OBJ.0 + 8)]
        );
        assert_eq!(s.rescanned, Some(Some(2)));
        // The log lost (a slot changed): all of it again.
        g.put(0x6000, OBJ.0 + 2, false);
        *g.log.lock().expect("lock") = None;
        assert_eq!(s.now().expect("now").len(), 3);
        assert_eq!(s.rescanned, Some(None));
    }

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
