//! Running Linux guests under lucos for the integration tests.
//!
//! On a host with hardware virtualization the scenario runs right here on
//! /dev/kvm. On a PVM host it runs inside the emulated host: QEMU TCG with an
//! AMD EPYC that has SVM and NPT, booting the pinned Debian kernel, which
//! loads the real kvm-amd and runs lucos on real KVM with nested paging
//! (guest-kernels/linux/emulated-host/).
//!
//! A scenario is a shell script run with `$LUCOS`, `$GUEST_KERNEL`,
//! `$GUEST_INITRD` and `$LUCOS_RUN_DIR` set; it reports in `@@SCN` lines.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_core::vm::{host_kvm_flavor, KvmFlavor};

/// Shell functions every scenario can use.
///
/// `boot ID TIMEOUT_S LUCOS_RUN_ARGS...` runs a VM in the background with its
/// serial output in /tmp/ID.serial, waits for it to end, prints the serial
/// output (each line prefixed `G| `, so guest kernel messages are never taken
/// for the emulated host's own) and `@@SCN ID end=...`; if it has not ended in time it prints where
/// every VMM thread is (`@@DUMP`), the vCPU registers, and stops it.
const SCENARIO_PRELUDE: &str = r#"
# When the scenario ends: every VM that ended other than on request or by its
# guest's choice, why, and the end of its VMM log and serial output
# (`@@VMEND` lines, which a failed expectation puts first in its message).
vm_ends() {
  for f in $LUCOS_RUN_DIR/*.log; do
    [ -f "$f" ] || continue
    id=$(basename "$f" .log)
    end=$(grep -o 'ended: .*' "$f" | tail -n 1)
    case "$end" in
      "ended: stopped" | "ended: guest powered off" | "ended: guest exited with status 0") continue ;;
      "") kill -0 "$(cat $LUCOS_RUN_DIR/$id.lock 2>/dev/null)" 2>/dev/null && continue; end="gone without an end line" ;;
    esac
    echo "@@VMEND $id $end"
    tail -n 40 "$f" | sed "s/^/@@VMEND $id V| /"
    [ -f /tmp/$id.serial ] && tail -n 40 /tmp/$id.serial | sed "s/^/@@VMEND $id G| /"
    # A triple fault resets the vCPU: KVM's trace still has where it was.
    case "$end" in *triple*) kvm_trace 40 | sed "s/^/@@VMEND $id /" ;; esac
  done
}
# A heartbeat every 20 s: the harness takes an emulated host that prints
# nothing for 121 s for a frozen one (a host failure, started again). With
# it, that silence is the whole host frozen; a lucos command that does not
# return runs into the scenario's own bounds and fails the test instead.
(while :; do sleep 20; echo "@@HEARTBEAT"; done) &
BEAT=$!
trap 'kill $BEAT 2>/dev/null; vm_ends' EXIT
dump_vm() {
  pid=$(cat $LUCOS_RUN_DIR/$1.lock 2>/dev/null)
  for t in /proc/$pid/task/*; do
    echo "@@DUMP $(cat $t/comm) state=$(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan 2>/dev/null)"
    sed 's/^/@@DUMP   /' $t/stack 2>/dev/null
  done
  $LUCOS pause --vm $1 && for v in 0 1 2 3; do $LUCOS regs --vm $1 --vcpu $v 2>/dev/null; done
  # Where each vCPU is, by symbol (kallsyms read from the paused guest).
  for v in 0 1 2 3; do
    rip=$($LUCOS regs --vm $1 --vcpu $v 2>/dev/null | awk '$1 == "rip" {print $2}')
    [ -n "$rip" ] && echo "@@DUMP vCPU $v at $($LUCOS symbols --vm $1 $rip 2>&1 | head -n 1)"
  done
  kvm_trace 40
}
# seen LOG PATTERN: waits (up to 300 s) until the serial log LOG has a line
# matching PATTERN.
seen() {
  n=0
  until grep -q "$2" "$1"; do
    sleep 0.2; n=$((n + 1))
    if [ $n -gt 1500 ]; then echo "@@SCN timeout waiting for '$2'"; return 1; fi
  done
}
# seen_after LOG N PATTERN [COUNT]: waits (up to 300 s) until COUNT (1)
# lines matching PATTERN follow the first N lines of the serial log LOG
# (what the guest printed after a step, however slow it runs).
seen_after() {
  n=0
  until [ "$(tail -n +$(($2 + 1)) "$1" | grep -c "$3")" -ge "${4:-1}" ]; do
    sleep 0.2; n=$((n + 1))
    if [ $n -gt 1500 ]; then echo "@@SCN timeout waiting for '$3' after line $2"; return 1; fi
  done
}
# one FILE: FILE on one line (a command's answer in an @@SCN line).
one() { tr '\n' ' ' < "$1"; }
# lucos_retry ARGS...: `lucos ARGS` into /tmp/o, run again (up to 5 times)
# while it exits 7 (something stayed in the replaced code through every
# pause: "try again", docs/cli.md), as a script would; $rc and $tries.
lucos_retry() {
  tries=0
  while :; do
    tries=$((tries + 1))
    $LUCOS "$@" > /tmp/o 2>&1; rc=$?
    [ $rc -eq 7 ] && [ $tries -lt 5 ] || break
  done
}
wait_vm() {
  n=0
  while $LUCOS status --vm $1 >/dev/null 2>&1; do
    sleep 0.5; n=$((n + 1))
    if [ $n -gt $(($2 * 2)) ]; then
      echo "@@SCN $1 hung"; dump_vm $1; $LUCOS stop --vm $1; return 1
    fi
  done
}
boot() {
  id=$1 limit=$2; shift 2
  rm -f /tmp/$id.serial
  $LUCOS run --vm $id --serial-log /tmp/$id.serial --quiet --detach "$@" >/dev/null || { echo "@@SCN $id end=start-failed"; return 1; }
  wait_vm $id $limit
  sed 's/^/G| /' /tmp/$id.serial
  echo "@@SCN $id end=$(grep -o 'ended: .*' $LUCOS_RUN_DIR/$id.log)"
  grep -q 'ended: guest' $LUCOS_RUN_DIR/$id.log && return 0
  sed 's/^/V| /' $LUCOS_RUN_DIR/$id.log
  if grep -q 'triple-faulted' $LUCOS_RUN_DIR/$id.log; then kvm_trace; fi
  died_in_boot /tmp/$id.serial
  return 1
}
# died_in_boot SERIAL: a guest that died in the emulated host before its
# /init reported "@@GUEST up" (before lucos did anything but run it) makes
# the host suspect: QEMU TCG's emulation of SVM there has been seen to crash
# the host's own kernel, hang it, and triple-fault booting guests (a few
# percent of boots; in CI twice in a row in one host, 2026-12-01; and once a
# guest booted again in the same host after such a death then failed in a
# way never seen elsewhere, 2026-12-02). "@@HOSTFAIL" makes the test harness
# run the whole scenario again in a fresh emulated host (a bounded number of
# times, loudly). On a hardware host, or after "@@GUEST up", it is a failure.
died_in_boot() {
  [ "$LUCOS_EMULATED_HOST" = 1 ] && ! grep -q "@@GUEST up" $1 2>/dev/null || return 1
  echo "@@HOSTFAIL a guest died while its kernel booted in this emulated host"
  sleep 30
  return 1
}
# up ID LOG LUCOS_RUN_ARGS...: starts a VM in the background (serial output
# in LOG) and waits until its guest reports "@@GUEST up"; else prints what
# is known (serial, VMM log, KVM trace) and fails (see died_in_boot).
up() {
  id=$1 log=$2; shift 2
  rm -f $log
  $LUCOS run --vm $id --serial-log $log --quiet --detach "$@" >/dev/null || { echo "@@SCN $id start-failed"; return 1; }
  n=0
  while ! grep -q "@@GUEST up" $log 2>/dev/null; do
    $LUCOS status --vm $id >/dev/null 2>&1 || break
    sleep 0.2; n=$((n + 1)); [ $n -gt 1500 ] && break
  done
  grep -q "@@GUEST up" $log && return 0
  echo "@@SCN $id guest did not come up"
  if $LUCOS status --vm $id >/dev/null 2>&1; then dump_vm $id; $LUCOS stop --vm $id >/dev/null 2>&1; sleep 1; fi
  sed 's/^/G| /' $log; sed 's/^/V| /' $LUCOS_RUN_DIR/$id.log; kvm_trace
  died_in_boot $log
  return 1
}
# The tail of the emulated host's KVM trace (empty on a host without tracefs access).
kvm_trace() {
  [ -r /sys/kernel/tracing/trace ] && tail -n ${1:-80} /sys/kernel/tracing/trace | sed 's/^/T| /'
  return 0
}
"#;

/// Scenarios are CPU-heavy (TCG): run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh folder of this call's own: tests of one binary run side by side
/// (two extracting the kernel at once shared one folder, and one's clean-up
/// removed the other's half-written vmlinux).
fn scratch(name: &str) -> PathBuf {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("lucos-linux-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn run_script(script: &str, args: &[&Path]) -> String {
    let out = Command::new(repo().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    if !out.status.success() {
        panic!(
            "{script} failed ({}):\n{}{}\nThe Linux-guest tests need the packages and kernel that \
             scripts/setup.sh installs; they fail rather than skip without them.",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The unpacked kernel package of the chosen known build (fetched and
/// checked on first use; guest-kernels/linux/versions.env lists the builds).
pub fn kernel_pkg() -> PathBuf {
    PathBuf::from(run_script("guest-kernels/linux/fetch-kernel.sh", &[]))
}

/// A live patch that is the host's signal to a guest scenario that its next
/// step may begin: /proc/uptime says `lucos-step-2` (the guest polls it).
#[allow(dead_code)]
pub const SIGNAL: &str = r#"#include <linux/seq_file.h>

int uptime_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-step-2\n");
	return 0;
}
"#;

/// The chosen build's kbuild tree (linux-headers, fetched and checked on
/// first use): what `lucos build --kbuild` and livepatch modules build against.
pub fn kbuild_dir() -> PathBuf {
    let dir = PathBuf::from(run_script("guest-kernels/linux/fetch-headers.sh", &[]));
    assert!(dir.join("Makefile").exists(), "{}", dir.display());
    dir
}

/// A value of the `lucos-build.env` that fetch-kernel.sh writes beside an
/// unpacked kernel package (`KERNEL_ABI`, `KERNEL_VERSION`, `KERNEL_RELEASE`).
pub fn build_value(pkg: &Path, key: &str) -> String {
    let env = pkg.join("lucos-build.env");
    std::fs::read_to_string(&env)
        .unwrap_or_else(|e| panic!("{}: {e}", env.display()))
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {key} in {}", env.display()))
}

/// The release (`uname -r`) of the kernel in `pkg`, e.g. `6.1.0-57-cloud-amd64`.
pub fn kernel_release(pkg: &Path) -> String {
    build_value(pkg, "KERNEL_RELEASE")
}

/// The guest kernel (bzImage) in `pkg`.
pub fn guest_kernel(pkg: &Path) -> PathBuf {
    pkg.join(format!("boot/vmlinuz-{}", kernel_release(pkg)))
}

/// The unpacked kernel package of another known build than the chosen one,
/// if the archive (or the cache) still has one: a kernel "of another build"
/// for the refusal tests.
pub fn other_kernel_pkg() -> Option<PathBuf> {
    let out = Command::new(repo().join("guest-kernels/linux/fetch-kernel.sh"))
        .arg("--other")
        .output()
        .expect("run fetch-kernel.sh --other");
    match out.status.code() {
        Some(0) => Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())),
        Some(3) => None,
        _ => panic!(
            "fetch-kernel.sh --other failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The uncompressed image (ELF vmlinux, stripped, as the guest runs it) of
/// the kernel in `pkg`, read from its bzImage.
pub fn vmlinux_of(pkg: &Path) -> Vec<u8> {
    let dir = scratch("vmlinux");
    let out = dir.join("vmlinux");
    run_script(
        "guest-kernels/linux/extract-vmlinux.sh",
        &[&guest_kernel(pkg), &out],
    );
    let data = std::fs::read(&out).expect("vmlinux");
    let _ = std::fs::remove_dir_all(&dir);
    data
}

/// The chosen guest kernel's uncompressed image (see [`vmlinux_of`]).
pub fn package_vmlinux() -> Vec<u8> {
    vmlinux_of(&kernel_pkg())
}

/// A scratch set for a Linux scenario: `DIR/files` (the host's, with a
/// fresh signing key `key`), `DIR/guest` (the guest's /files), `DIR/kmod`
/// (module builds) and `DIR/vmlinux` (the chosen guest kernel's image).
pub struct PatchDirs {
    /// The whole scratch directory (remove it when done).
    pub dir: PathBuf,
    /// Host files: key, `.lup`s.
    pub files: PathBuf,
    /// Guest files.
    pub guest: PathBuf,
    /// Module builds.
    pub kmod: PathBuf,
    /// The guest kernel's image.
    pub vmlinux: PathBuf,
}

impl PatchDirs {
    /// Creates them under the temporary directory, named after `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lucos-{tag}-{}", std::process::id()));
        let (files, guest, kmod) = (dir.join("files"), dir.join("guest"), dir.join("kmod"));
        for d in [&files, &guest, &kmod] {
            std::fs::create_dir_all(d).expect("dir");
        }
        let vmlinux = dir.join("vmlinux");
        std::fs::write(&vmlinux, package_vmlinux()).expect("vmlinux");
        run_ok(
            Command::new(env!("CARGO_BIN_EXE_lucos"))
                .arg("keygen")
                .arg("-o")
                .arg(files.join("key")),
        );
        PatchDirs {
            dir,
            files,
            guest,
            kmod,
            vmlinux,
        }
    }
}

/// What the scenario printed after `@@SCN {what} rc=`, which must start
/// with `rc` (the command's exit status): the rest of the line.
#[allow(dead_code)]
pub fn scn_answer<'a>(text: &'a str, what: &str, rc: &str) -> &'a str {
    let prefix = format!("@@SCN {what} rc=");
    let rest = text
        .lines()
        .find_map(|l| l.find(&prefix).map(|i| &l[i + prefix.len()..]))
        .unwrap_or_else(|| panic!("no '{prefix}' line:\n{text}"));
    assert!(
        rest.starts_with(&format!("{rc} ")) || rest == rc,
        "{what}: expected rc={rc}: {rest}\n{text}"
    );
    rest[rc.len()..].trim()
}

/// What the guest said after `@@GUEST {tag} {what}` (its first such line).
#[allow(dead_code)]
pub fn guest_said<'a>(text: &'a str, tag: &str, what: &str) -> &'a str {
    let prefix = format!("@@GUEST {tag} {what}");
    text.lines()
        .find_map(|l| l.find(&prefix).map(|i| l[i + prefix.len()..].trim()))
        .unwrap_or_else(|| panic!("the guest did not say '{tag} {what}':\n{text}"))
}

/// Runs `cmd`, failing with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `lucos build` of `src` (written to `dir/NAME_src.c`) against `vmlinux`
/// with `kbuild`, into `dir/NAME.lup`, signed by `dir/key` unless `extra`
/// has `--unsigned`.
pub fn build_patch(
    dir: &Path,
    kbuild: &Path,
    vmlinux: &Path,
    name: &str,
    src: &str,
    extra: &[&str],
) {
    let c = dir.join(format!("{name}_src.c"));
    std::fs::write(&c, src).expect("source");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lucos"));
    cmd.args(["build", "--kernel"])
        .arg(vmlinux)
        .arg("--kbuild")
        .arg(kbuild)
        .args(["--name", name, "-o"])
        .arg(dir.join(format!("{name}.lup")));
    if !extra.contains(&"--unsigned") {
        cmd.arg("--key").arg(dir.join("key"));
    }
    run_ok(cmd.args(extra).arg(&c));
}

/// Kernel modules built against `kbuild` in `dir` from `sources` (file
/// stem, C source): `dir/STEM.ko`.
pub fn build_modules(kbuild: &Path, dir: &Path, sources: &[(&str, &str)]) {
    let mut objs = Vec::new();
    for (stem, src) in sources {
        std::fs::write(dir.join(format!("{stem}.c")), src).expect("module source");
        objs.push(format!("{stem}.o"));
    }
    std::fs::write(dir.join("Kbuild"), format!("obj-m := {}\n", objs.join(" "))).expect("Kbuild");
    run_ok(
        Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(kbuild)
            .arg(format!("M={}", dir.display()))
            .arg("modules"),
    );
}

/// What a scenario printed.
pub struct ScenarioOutput {
    /// Everything: host console, lucos, guest serial.
    pub text: String,
    /// Where it ran.
    pub where_: &'static str,
}

impl ScenarioOutput {
    /// Panics with the whole output unless `needle` is in it.
    pub fn expect(&self, needle: &str) {
        assert!(
            self.text.contains(needle),
            "'{needle}' not in the output of the scenario ({}):\n{}{}",
            self.where_,
            self.vm_ends(),
            self.text
        );
    }

    /// The `@@VMEND` lines (VMs that ended unexpectedly), then a rule; or
    /// nothing.
    pub fn vm_ends(&self) -> String {
        let ends: Vec<&str> = self
            .text
            .lines()
            .filter(|l| l.contains("@@VMEND "))
            .collect();
        if ends.is_empty() {
            return String::new();
        }
        format!("{}\n---- the whole output:\n", ends.join("\n"))
    }

    /// The first line starting with `prefix`; fails, naming it, when there
    /// is none.
    pub fn line(&self, prefix: &str) -> String {
        self.text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no '{prefix}' line in the output of the scenario ({}):\n{}{}",
                    self.where_,
                    self.vm_ends(),
                    self.text
                )
            })
            .to_owned()
    }

    /// The value after `key=` on the first line starting with `prefix`.
    pub fn value(&self, prefix: &str, key: &str) -> Option<String> {
        self.text
            .lines()
            .filter_map(|l| l.find(prefix).map(|i| &l[i..]))
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_owned))
            })
    }
}

/// What a scenario needs besides lucos and the guest's bzImage and initramfs.
#[derive(Debug, Default, Clone)]
pub struct Extras {
    /// `$QEMU`: QEMU, the reference VMM.
    pub qemu: bool,
    /// `$GUEST_VMLINUX`: the guest kernel as an ELF vmlinux (PVH entry).
    pub vmlinux: bool,
    /// `$OTHER_KERNEL`: the lucos test kernel (another kernel build).
    pub testkernel: bool,
    /// `$FILES`: a directory of files the scenario uses (patches, keys).
    pub files: Option<PathBuf>,
    /// A directory the guest's initramfs carries as /files (programs and
    /// modules its workload runs).
    pub guest_files: Option<PathBuf>,
    /// `$LUCOS_BASELINE`: another lucos binary (an earlier build), for
    /// benchmarks that compare it with this one in the same run.
    pub baseline: Option<PathBuf>,
    /// The unpacked kernel package the guest (and the emulated host) runs,
    /// instead of the chosen build's.
    pub kernel: Option<PathBuf>,
}

/// Runs `scenario` against a guest whose /workload.sh is `workload`.
pub fn run_scenario(
    name: &str,
    workload: &str,
    scenario: &str,
    timeout: Duration,
) -> ScenarioOutput {
    run_scenario_with(name, workload, scenario, timeout, Extras::default())
}

/// As [`run_scenario`], with `extras`.
pub fn run_scenario_with(
    name: &str,
    workload: &str,
    scenario: &str,
    timeout: Duration,
    extras: Extras,
) -> ScenarioOutput {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch(name);
    let pkg = extras.kernel.clone().unwrap_or_else(kernel_pkg);
    let wl = dir.join("workload.sh");
    std::fs::write(&wl, workload).expect("workload");
    let initrd = dir.join("guest-initrd.cpio.gz");
    match &extras.guest_files {
        Some(files) => run_script(
            "guest-kernels/linux/mkinitramfs-guest.sh",
            &[&initrd, &wl, files],
        ),
        None => run_script("guest-kernels/linux/mkinitramfs-guest.sh", &[&initrd, &wl]),
    };
    let scn = dir.join("scenario.sh");
    std::fs::write(&scn, format!("{SCENARIO_PRELUDE}\n{scenario}")).expect("scenario");
    let vmlinux = dir.join("vmlinux");
    if extras.vmlinux {
        run_script(
            "guest-kernels/linux/extract-vmlinux.sh",
            &[&guest_kernel(&pkg), &vmlinux],
        );
    }

    let flavor = host_kvm_flavor();
    let mut attempt = 1;
    let result = loop {
        match run_once(
            name, &dir, &pkg, &scn, &initrd, &vmlinux, flavor, &extras, timeout,
        ) {
            Err(HostFailure(text)) if attempt < HOST_ATTEMPTS => {
                // The emulated host is QEMU TCG emulating SVM for a real
                // kvm-amd; its own kernel has been seen to lock up there (a
                // TCG problem, not a guest or lucos one). Say so, loudly, and
                // give the scenario a fresh host.
                eprintln!(
                    "WARNING: scenario {name}: the emulated SVM host's own kernel failed \
                     (attempt {attempt} of {HOST_ATTEMPTS}); retrying in a fresh host. Its \
                     output:\n{text}"
                );
                attempt += 1;
            }
            other => break other,
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(out) => out,
        Err(HostFailure(text)) => {
            panic!(
                "scenario {name}: the emulated SVM host's kernel failed {HOST_ATTEMPTS} times:\n{text}"
            )
        }
    }
}

/// Fresh emulated hosts a scenario gets when the host's own kernel fails
/// under it. QEMU TCG's SVM emulation loses the host's GS base now and then
/// (seen: the host's vCPU thread recursing in exc_page_fault on a %gs
/// access, "stack guard page was hit"), a few percent of guest boots; a
/// scenario that boots several guests meets it more often.
const HOST_ATTEMPTS: u32 = 3;

/// Seconds without a line from the emulated host (it prints a heartbeat every
/// 20 s) after which it counts as hung.
const HOST_SILENT_SECS: u64 = 120;

/// The emulated host's own kernel locked up or panicked.
struct HostFailure(String);

/// Lines of the emulated host's own kernel that mean it is no longer sound.
/// Guest output reaches the console prefixed (`G| `), so never matches.
fn host_failed(line: &str) -> bool {
    // G| lines are the guest's serial, V| lines lucos's log: not the host's.
    !line.starts_with("G| ")
        && !line.starts_with("V| ")
        && [
            "BUG: ", // soft lockup, bad page access, stack guard page hit
            "general protection fault",
            "Kernel panic - not syncing",
            // RCU stalls, whatever the flavour (rcu_sched, rcu_preempt): seen
            // as a CPU of the emulated host whose timer stopped firing.
            "self-detected stall",
            "rcu: INFO: rcu_",
            "blocked for more than", // a hung task
            "@@HOSTFAIL",            // a guest died in boot (the prelude's died_in_boot)
        ]
        .iter()
        .any(|s| line.contains(s))
}

#[allow(clippy::too_many_arguments)]
fn run_once(
    name: &str,
    dir: &Path,
    pkg: &Path,
    scn: &Path,
    initrd: &Path,
    vmlinux: &Path,
    flavor: KvmFlavor,
    extras: &Extras,
    timeout: Duration,
) -> Result<ScenarioOutput, HostFailure> {
    let lucos = PathBuf::from(env!("CARGO_BIN_EXE_lucos"));
    let (mut cmd, where_) = match flavor {
        KvmFlavor::Hardware => {
            super::require_kvm();
            let mut c = Command::new("sh");
            c.arg(scn)
                .env("LUCOS", &lucos)
                .env("GUEST_KERNEL", guest_kernel(pkg))
                .env("GUEST_INITRD", initrd)
                .env("LUCOS_RUN_DIR", dir.join("run"))
                .env("QEMU", "qemu-system-x86_64")
                .env("GUEST_VMLINUX", vmlinux)
                .env("OTHER_KERNEL", env!("LUCOS_TESTKERNEL"))
                .env("FILES", extras.files.clone().unwrap_or_default());
            if let Some(b) = &extras.baseline {
                c.env("LUCOS_BASELINE", b);
            }
            (c, "this host's KVM")
        }
        KvmFlavor::Pvm => {
            let host_initrd = dir.join("host-initrd.cpio.gz");
            let out =
                Command::new(repo().join("guest-kernels/linux/emulated-host/mkinitramfs-host.sh"))
                    .args([host_initrd.as_path(), pkg, &lucos, initrd, scn])
                    .env("WITH_QEMU", if extras.qemu { "1" } else { "0" })
                    .env("WITH_FILES", extras.files.clone().unwrap_or_default())
                    .env("WITH_BASELINE", extras.baseline.clone().unwrap_or_default())
                    .env(
                        "WITH_TESTKERNEL",
                        if extras.testkernel {
                            env!("LUCOS_TESTKERNEL")
                        } else {
                            ""
                        },
                    )
                    .env(
                        "WITH_VMLINUX",
                        if extras.vmlinux {
                            vmlinux.as_os_str()
                        } else {
                            "".as_ref()
                        },
                    )
                    .output()
                    .expect("run mkinitramfs-host.sh");
            assert!(
                out.status.success(),
                "mkinitramfs-host.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let mut c = Command::new(repo().join("guest-kernels/linux/emulated-host/run.sh"));
            c.arg(pkg).arg(&host_initrd);
            (c, "the emulated SVM host")
        }
    };
    // Own process group, so a timeout kills QEMU and everything under it.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().expect("start scenario");
    let pgid = child.id() as i32;
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let failed = Arc::new(AtomicBool::new(false));
    // Seconds after `started` of the last line from the scenario.
    let started = Instant::now();
    let heard = Arc::new(AtomicU64::new(0));
    let out_t = {
        let failed = failed.clone();
        let heard = heard.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                heard.store(started.elapsed().as_secs(), Ordering::SeqCst);
                if host_failed(&line) {
                    failed.store(true, Ordering::SeqCst);
                }
                if line.starts_with("@@HOST alive") {
                    continue;
                }
                s.push_str(&line);
                s.push('\n');
            }
            s
        })
    };
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        // The emulated host prints a heartbeat every 20 s (host-init.sh).
        let silent = started.elapsed().as_secs() - heard.load(Ordering::SeqCst);
        if matches!(flavor, KvmFlavor::Pvm) && silent > HOST_SILENT_SECS {
            eprintln!("scenario {name}: the emulated host printed nothing for {silent} s: hung");
            failed.store(true, Ordering::SeqCst);
        }
        let host_dead = failed.load(Ordering::SeqCst);
        if host_dead || Instant::now() > deadline {
            timed_out = !host_dead;
            // SAFETY: kill(2) on the scenario's own process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = format!(
        "{}\n{}",
        out_t.join().unwrap_or_default(),
        err_t.join().unwrap_or_default()
    );
    // The host's /init reports the scenario's end; without that line the
    // emulated host's kernel died under it (QEMU exits on a host reset).
    let host_died = matches!(flavor, KvmFlavor::Pvm)
        && !timed_out
        && !text.lines().any(|l| l.starts_with("@@HOST scenario rc="));
    if failed.load(Ordering::SeqCst) || host_died {
        return Err(HostFailure(text));
    }
    assert!(
        !timed_out,
        "scenario {name} ran past {timeout:?} in {where_}:\n{text}"
    );
    // What the scenario reported, as it ran, with LUCOS_SCENARIO_ECHO=1 and
    // --nocapture. Not by default: a failing test's captured output then
    // starts with its assertion's reason (the output follows in it), which
    // is what a CI log's excerpt shows.
    if std::env::var_os("LUCOS_SCENARIO_ECHO").is_some() {
        for l in text.lines().filter(|l| l.starts_with("@@SCN")) {
            eprintln!("{l}");
        }
    }
    Ok(ScenarioOutput { text, where_ })
}
