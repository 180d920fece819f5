//! Live patching the test kernel on /dev/kvm while user tasks on 2 vCPUs
//! call the patched services in a loop: apply, revert, refusals that leave
//! the kernel text byte-identical, a 3-function patch that must switch as
//! one, stacking with dependencies, cumulative `--replace`, and 1000
//! apply/revert cycles.

mod common;

use std::path::{Path, PathBuf};

use common::cli::{kernel, p, text, RunDir, FIX};
use vmm_core::control::{Client, Request};

struct Setup {
    dir: RunDir,
    serial: PathBuf,
}

fn lucos_ok(dir: &RunDir, args: &[&str]) -> String {
    let o = dir.lucos(args);
    assert!(o.status.success(), "lucos {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The 3-function chain (outer -> middle -> inner) with version mark '2':
/// each mark is written at a different time of one call, so a call that
/// mixes old and new code returns marks like "112".
const TRI2: &str = r#"#include "tk.h"
void tri_inner(char *buf, u64 work)
{
	service_delay(work);
	buf[2] = '2';
}

void tri_middle(char *buf, u64 work)
{
	buf[1] = '2';
	service_delay(work);
	tri_inner(buf, work);
	service_delay(work);
}

void tri_outer(char *buf, u64 work)
{
	buf[0] = '2';
	service_delay(work);
	tri_middle(buf, work);
	service_delay(work);
}
"#;

/// Keys, the fix built against the test kernel, and a running VM `lp` whose
/// 2 tasks report the version string every 100 calls.
fn setup(name: &str) -> Setup {
    setup_with(name, "tasks=2 iters=0 report=100")
}

/// Like [`setup`], with the test kernel's command line `cmdline`.
fn setup_with(name: &str, cmdline: &str) -> Setup {
    common::require_kvm();
    let dir = RunDir::new(name);
    let d = dir.0.clone();
    lucos_ok(&dir, &["keygen", "-o", p(&d.join("key"))]);
    std::fs::write(d.join("fix.c"), FIX).expect("fix.c");
    lucos_ok(
        &dir,
        &[
            "build",
            "--kernel",
            &kernel(),
            "--key",
            p(&d.join("key")),
            "--name",
            "fix",
            "-o",
            p(&d.join("fix.lup")),
            p(&d.join("fix.c")),
        ],
    );
    let serial = d.join("serial.log");
    lucos_ok(
        &dir,
        &[
            "run",
            "--vm",
            "lp",
            "--kernel",
            &kernel(),
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--cmdline",
            cmdline,
            "--serial-log",
            p(&serial),
            "--trusted-key",
            p(&d.join("key.pub")),
            "--detach",
            "--quiet",
        ],
    );
    let s = Setup { dir, serial };
    s.wait_lines("version testkernel 1.0\n", 4);
    s
}

impl Setup {
    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until `needle` occurs `n` more times than now.
    fn wait_lines(&self, needle: &str, n: usize) {
        common::cli::wait_lines(&self.serial, needle, n, 20);
    }

    fn text_sha(&self) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&lucos_ok(&self.dir, &["list", "--vm", "lp", "--json"]))
                .expect("json");
        v["kernel_text"]["sha256"]
            .as_str()
            .expect("text hash")
            .to_owned()
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.0.join(f)
    }

    /// `lucos build` of `src` as patch `name`, signed with the trusted key,
    /// with `extra` arguments (`--depends`, `--function`, ...).
    fn build(&self, name: &str, src: &str, extra: &[&str]) -> PathBuf {
        let c = self.path(&format!("{name}.c"));
        std::fs::write(&c, src).expect("patch source");
        let out = self.path(&format!("{name}.lup"));
        let (k, key) = (kernel(), self.path("key"));
        let mut args = vec![
            "build",
            "--kernel",
            &k,
            "--key",
            p(&key),
            "--name",
            name,
            "-o",
            p(&out),
        ];
        args.extend_from_slice(extra);
        args.push(p(&c));
        lucos_ok(&self.dir, &args);
        out
    }

    /// A control request that must succeed (the guest output if it fails).
    fn call(&self, c: &mut Client, req: Request) -> serde_json::Value {
        let what = format!("{req:?}");
        c.call(&req)
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.serial()))
    }
}

/// The version line every task prints, with `v` as version.
fn version_line(v: &str) -> String {
    format!("version {v}\n")
}

#[test]
fn patch_changes_the_running_service_and_revert_restores_it() {
    let s = setup("apply");
    let before = s.text_sha();
    let out = lucos_ok(&s.dir, &["patch", "--vm", "lp", p(&s.path("fix.lup"))]);
    assert!(
        out.contains("applied 'fix': 1 function switched in one pause"),
        "{out}"
    );
    // Every task on both vCPUs now reports the new string.
    s.wait_lines("version testkernel 1.0 (live-patched)\n", 4);
    let listed = lucos_ok(&s.dir, &["list", "--vm", "lp"]);
    assert!(
        listed.contains("fix v1") && listed.contains("lucos_version"),
        "{listed}"
    );
    assert_ne!(s.text_sha(), before, "the trampoline is in kernel text");
    lucos_ok(&s.dir, &["revert", "--vm", "lp", "fix"]);
    let at_revert = s.serial().len();
    s.wait_lines("version testkernel 1.0\n", 4);
    assert!(!s.serial()[at_revert..]
        .lines()
        .skip(2)
        .any(|l| l.contains("live-patched")));
    assert_eq!(s.text_sha(), before, "revert restores the original bytes");
    assert!(lucos_ok(&s.dir, &["list", "--vm", "lp"]).contains("no patches applied"));
    // Nothing crashed: both tasks still run, the VM is still up.
    assert!(lucos_ok(&s.dir, &["status", "--vm", "lp"]).contains("running"));
    assert!(
        !s.serial().contains("PANIC") && !s.serial().contains("fault"),
        "{}",
        s.serial()
    );
}

#[test]
fn bad_patches_are_refused_and_leave_the_kernel_text_byte_identical() {
    let s = setup("refuse");
    let before = s.text_sha();
    let refused = |lup: &Path, code: i32, why: &str| {
        let o = s.dir.lucos(&["patch", "--vm", "lp", p(lup)]);
        assert_eq!(o.status.code(), Some(code), "{}", text(&o));
        assert!(text(&o).contains(why), "expected '{why}': {}", text(&o));
        assert_eq!(s.text_sha(), before, "after a refused {}", lup.display());
    };
    let build = |name: &str, src: &str, extra: &[&str], kernel_file: &str| -> PathBuf {
        let c = s.path(&format!("{name}.c"));
        std::fs::write(&c, src).expect("src");
        let out = s.path(&format!("{name}.lup"));
        let mut args = vec![
            "build",
            "--kernel",
            kernel_file,
            "--name",
            name,
            "-o",
            p(&out),
        ];
        let key = s.path("key");
        if !extra.contains(&"--unsigned") {
            args.extend(["--key", p(&key)]);
        }
        args.extend_from_slice(extra);
        args.push(p(&c));
        lucos_ok(&s.dir, &args);
        out
    };
    // Unsigned.
    let unsigned = build("unsigned", FIX, &["--unsigned"], &kernel());
    refused(&unsigned, 6, "is not signed");
    // Tampered: one byte of the code flipped after signing.
    let mut bytes = std::fs::read(s.path("fix.lup")).expect("lup");
    let at = bytes.len() - 200;
    bytes[at] ^= 0x55;
    std::fs::write(s.path("tampered.lup"), &bytes).expect("write");
    refused(&s.path("tampered.lup"), 6, "signature does not verify");
    // `inspect --key` tells a script by its exit status whether a patch is
    // signed by that key: 0 only when it verifies, 6 when not (or unsigned).
    let pubkey = s.path("key.pub");
    let inspect = |lup: &Path, json: bool| {
        let mut args = vec!["inspect", "--key", p(&pubkey), p(lup)];
        if json {
            args.push("--json");
        }
        s.dir.lucos(&args)
    };
    for (lup, code, valid) in [
        (s.path("fix.lup"), 0, true),
        (s.path("tampered.lup"), 6, false),
        (unsigned.clone(), 6, false),
    ] {
        for json in [false, true] {
            let o = inspect(&lup, json);
            let (what, out) = (lup.display(), text(&o));
            assert_eq!(o.status.code(), Some(code), "{what} (json {json}): {out}");
            if json {
                let v: serde_json::Value =
                    serde_json::from_slice(&o.stdout).expect("inspect --json");
                assert_eq!(v["signature_valid"], valid, "{what}: {v}");
            }
        }
    }
    let o = s.dir.lucos(&["inspect", "--json", p(&s.path("fix.lup"))]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect --json");
    assert_eq!(
        v["signature_valid"],
        serde_json::Value::Null,
        "unchecked: {v}"
    );
    // Signed by a key the VM does not trust.
    lucos_ok(&s.dir, &["keygen", "-o", p(&s.path("other"))]);
    let c = s.path("fix.c");
    let o = s.path("untrusted.lup");
    lucos_ok(
        &s.dir,
        &[
            "build",
            "--kernel",
            &kernel(),
            "--key",
            p(&s.path("other")),
            "--name",
            "u",
            "-o",
            p(&o),
            p(&c),
        ],
    );
    refused(&o, 6, "signature does not verify with any trusted key");
    // Built for another kernel build (same code, another build-id).
    let other = s.path("other-build.elf");
    common::kernel_of_another_build(&other);
    let wrong = build("wrongbuild", FIX, &[], p(&other));
    refused(&wrong, 5, "is for another kernel build");
    // Old bytes differ: built against a kernel file whose lucos_version was altered.
    let altered = s.path("altered.elf");
    common::kernel_with_altered(&altered, "lucos_version", 8);
    let mism = build("mismatch", FIX, &[], p(&altered));
    refused(&mism, 6, "lucos_version does not match");
    // A kernel symbol that does not exist.
    let unknown = build(
        "unknown",
        "#include \"tk.h\"\nextern const char *no_such_kernel_function(void);\nconst char *lucos_version(void) { return no_such_kernel_function(); }\n",
        &[],
        &kernel(),
    );
    refused(&unknown, 6, "no symbol named 'no_such_kernel_function'");
    // Revert of something not applied; patch of a VM that does not exist.
    let o = s.dir.lucos(&["revert", "--vm", "lp", "nothing"]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(
        text(&o).contains("no applied patch named 'nothing'"),
        "{}",
        text(&o)
    );
    let o = s
        .dir
        .lucos(&["patch", "--vm", "nosuchvm", p(&s.path("fix.lup"))]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    // The guest never noticed: still the original version, still running.
    s.wait_lines("version testkernel 1.0\n", 4);
    assert!(!s.serial().contains("live-patched"));
}

#[test]
fn a_thousand_apply_revert_cycles_under_load() {
    let s = setup("cycles");
    let before = s.text_sha();
    let sock = s.dir.0.join("lp.sock");
    let mut c = Client::connect("lp", &sock).expect("connect");
    let lup = s.path("fix.lup").display().to_string();
    let mut max_tries = 0;
    let mut first_at = None;
    for i in 0..1000 {
        let r = c
            .call(&Request::Patch {
                path: lup.clone(),
                replace: false,
                mode: None,
            })
            .unwrap_or_else(|e| panic!("apply {i}: {e}"));
        max_tries = max_tries.max(r["tries"].as_u64().unwrap_or(0));
        // A revert frees the patch's code: every apply reuses the same place.
        let at = r["functions"][0]["new_addr"].clone();
        assert!(at.is_string(), "{r}");
        let first = first_at.get_or_insert_with(|| at.clone());
        assert_eq!(&at, first, "apply {i} placed its code elsewhere");
        c.call(&Request::Revert { name: "fix".into() })
            .unwrap_or_else(|e| panic!("revert {i}: {e}"));
    }
    let area = c.call(&Request::Patches).expect("list")["patch_area"].clone();
    assert_eq!(area["used_bytes"], 0, "{area}");
    assert_eq!(area["size_bytes"], 2 << 20, "{area}");
    drop(c);
    assert_eq!(s.text_sha(), before);
    // The tasks kept running and report the original string at the end.
    s.wait_lines("version testkernel 1.0\n", 4);
    assert!(lucos_ok(&s.dir, &["status", "--vm", "lp"]).contains("running"));
    eprintln!("1000 cycles; most pauses one patch needed: {max_tries}");
}

#[test]
fn demo_boots_pauses_live_patches_and_reverts() {
    common::require_kvm();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lucos"))
        .arg("demo")
        .output()
        .expect("lucos demo");
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for needle in [
        "== paused the running guest",
        "== applied 'demo-fix' while the tasks ran: 1 function switched in one pause",
        "version testkernel 1.0 + live patch 'demo-fix'",
        "== reverted 'demo-fix'",
        "== applied 'stats2' while the tasks update the table",
        "calls, sum and last value exact every time, no update lost",
        "== reverted 'stats2' in one pause",
        "more reports checked after the revert: exact ==",
        "== the tasks run on, unpatched: stopping the guest ==",
        "== guest ended: stopped ==",
    ] {
        assert!(out.contains(needle), "'{needle}' missing:\n{out}");
    }
    // After the revert the tasks report the original string again.
    let after = &out[out.find("== reverted 'demo-fix'").expect("revert line")..];
    assert!(
        after.lines().any(|l| l.ends_with("version testkernel 1.0")),
        "{out}"
    );
}

#[test]
fn a_three_function_patch_switches_as_one_under_load() {
    // Both tasks call the chain back to back, with busy work inside each
    // function, so pauses often catch a vCPU in the middle of a call. A call
    // that started in old code and went on in new code would print MIXED.
    let s = setup_with("triple", "tasks=2 iters=0 report=50 mode=triple spin=10");
    s.wait_lines(" triple 111 mixed 0\n", 4);
    let before = s.text_sha();
    let tri = s.build("tri", TRI2, &[]);
    let info = lucos_ok(&s.dir, &["inspect", p(&tri)]);
    for f in ["tri_outer", "tri_middle", "tri_inner"] {
        assert!(info.contains(f), "{info}");
    }
    let mut c = Client::connect("lp", &s.dir.0.join("lp.sock")).expect("connect");
    let (rounds, mut tries, mut max_tries) = (20, 0, 0);
    for _ in 0..rounds {
        let r = s.call(
            &mut c,
            Request::Patch {
                path: p(&tri).into(),
                replace: false,
                mode: None,
            },
        );
        assert_eq!(r["functions"].as_array().map(Vec::len), Some(3), "{r}");
        let t = r["tries"].as_u64().expect("tries");
        (tries, max_tries) = (tries + t, max_tries.max(t));
        s.wait_lines(" triple 222 mixed 0\n", 2);
        let r = s.call(&mut c, Request::Revert { name: "tri".into() });
        let t = r["tries"].as_u64().expect("tries");
        (tries, max_tries) = (tries + t, max_tries.max(t));
        s.wait_lines(" triple 111 mixed 0\n", 2);
    }
    drop(c);
    let serial = s.serial();
    assert!(
        !serial.contains("MIXED"),
        "a call mixed old and new code:\n{}",
        serial
            .lines()
            .filter(|l| l.contains("MIXED"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The activeness check was exercised: some pauses found a vCPU inside
    // the chain (on the stack or executing) and were retried.
    assert!(
        tries > 2 * rounds,
        "no pause was ever refused in {} switches: the load does not reach the chain",
        2 * rounds
    );
    assert_eq!(s.text_sha(), before);
    assert!(lucos_ok(&s.dir, &["status", "--vm", "lp"]).contains("running"));
    eprintln!(
        "{} switches of 3 functions: {tries} pauses in all, at most {max_tries} for one",
        2 * rounds
    );
}

#[test]
fn patches_stack_with_dependencies_and_revert_in_order() {
    let s = setup("stack");
    let before = s.text_sha();
    let fix = s.path("fix.lup");
    let on_fix = s.build(
        "onfix",
        &FIX.replace("(live-patched)", "(on top of fix)"),
        &["--depends", "fix"],
    );
    let refused = |args: &[&str], why: &str| {
        let sha = s.text_sha();
        let o = s.dir.lucos(args);
        assert_eq!(o.status.code(), Some(6), "{}", text(&o));
        assert!(text(&o).contains(why), "expected '{why}': {}", text(&o));
        assert_eq!(s.text_sha(), sha, "a refused {args:?} changed kernel text");
    };
    // A patch whose dependency is not applied.
    refused(
        &["patch", "--vm", "lp", p(&on_fix)],
        "patch 'onfix' depends on 'fix', which is not applied",
    );
    lucos_ok(&s.dir, &["patch", "--vm", "lp", p(&fix)]);
    s.wait_lines(&version_line("testkernel 1.0 (live-patched)"), 4);
    lucos_ok(&s.dir, &["patch", "--vm", "lp", p(&on_fix)]);
    s.wait_lines(&version_line("testkernel 1.0 (on top of fix)"), 4);
    let listed = lucos_ok(&s.dir, &["list", "--vm", "lp"]);
    assert!(
        listed.contains("fix v1") && listed.contains("onfix v1"),
        "{listed}"
    );
    // The bottom of the stack cannot go first.
    refused(
        &["revert", "--vm", "lp", "fix"],
        "patch 'onfix' depends on 'fix'; revert it first",
    );
    lucos_ok(&s.dir, &["revert", "--vm", "lp", "onfix"]);
    s.wait_lines(&version_line("testkernel 1.0 (live-patched)"), 4);
    // Without a declared dependency, a later patch of the same function
    // still pins the earlier one.
    let other = s.build("other", &FIX.replace("(live-patched)", "(other)"), &[]);
    lucos_ok(&s.dir, &["patch", "--vm", "lp", p(&other)]);
    s.wait_lines(&version_line("testkernel 1.0 (other)"), 4);
    refused(
        &["revert", "--vm", "lp", "fix"],
        "lucos_version is switched again by the later patch 'other'; revert that first",
    );
    lucos_ok(&s.dir, &["revert", "--vm", "lp", "other"]);
    lucos_ok(&s.dir, &["revert", "--vm", "lp", "fix"]);
    s.wait_lines(&version_line("testkernel 1.0"), 4);
    assert_eq!(
        s.text_sha(),
        before,
        "the stack unwound to the original bytes"
    );
}

#[test]
fn replace_swaps_the_stack_for_one_cumulative_patch() {
    let s = setup_with("replace", "tasks=2 iters=0 report=50 mode=triple spin=10");
    let before = s.text_sha();
    let tri = s.build("tri", TRI2, &[]);
    lucos_ok(&s.dir, &["patch", "--vm", "lp", p(&s.path("fix.lup"))]);
    lucos_ok(&s.dir, &["patch", "--vm", "lp", p(&tri)]);
    s.wait_lines(&version_line("testkernel 1.0 (live-patched)"), 4);
    s.wait_lines(" triple 222 mixed 0\n", 4);
    // One cumulative patch: a newer lucos_version, and nothing for the chain.
    let cum = s.build("cum", &FIX.replace("(live-patched)", "(cumulative)"), &[]);
    let out = lucos_ok(&s.dir, &["patch", "--replace", "--vm", "lp", p(&cum)]);
    assert!(out.contains("replaced every patch with 'cum'"), "{out}");
    s.wait_lines(&version_line("testkernel 1.0 (cumulative)"), 4);
    // The chain went back to its original code in the same switch.
    s.wait_lines(" triple 111 mixed 0\n", 4);
    let listed = lucos_ok(&s.dir, &["list", "--vm", "lp"]);
    assert!(listed.contains("cum v1"), "{listed}");
    assert!(
        !listed.contains("fix v1") && !listed.contains("tri v1"),
        "{listed}"
    );
    // The replaced patches' code was freed in that switch: only cum's is left.
    let v: serde_json::Value =
        serde_json::from_str(&lucos_ok(&s.dir, &["list", "--vm", "lp", "--json"])).expect("json");
    assert_eq!(
        v["patch_area"]["used_bytes"], v["patches"][0]["code_bytes"],
        "{v}"
    );
    lucos_ok(&s.dir, &["revert", "--vm", "lp", "cum"]);
    s.wait_lines(&version_line("testkernel 1.0"), 4);
    assert!(
        lucos_ok(&s.dir, &["list", "--vm", "lp"]).contains("patch area  0 of 2097152 bytes in use")
    );
    assert_eq!(s.text_sha(), before);
    assert!(!s.serial().contains("MIXED"));
}

#[test]
fn an_idle_client_holds_nobody_up_and_oversized_or_garbage_requests_get_an_error() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use vmm_core::control::{ErrorCode, Response, MAX_REQUEST_BYTES};

    let s = setup("clients");
    let before = s.text_sha();
    let sock = s.dir.0.join("lp.sock");
    // One client connected and silent, one that began a request and stalls.
    let idle = UnixStream::connect(&sock).expect("idle client");
    let mut stalled = UnixStream::connect(&sock).expect("stalled client");
    stalled.write_all(br#"{"op":"sta"#).expect("write");
    // Everyone else goes on: query, pause, patch, revert.
    for _ in 0..3 {
        assert!(lucos_ok(&s.dir, &["status", "--vm", "lp"]).contains("running"));
    }
    lucos_ok(&s.dir, &["pause", "--vm", "lp"]);
    lucos_ok(&s.dir, &["regs", "--vm", "lp", "--vcpu", "1"]);
    lucos_ok(&s.dir, &["resume", "--vm", "lp"]);
    lucos_ok(&s.dir, &["patch", "--vm", "lp", p(&s.path("fix.lup"))]);
    s.wait_lines("version testkernel 1.0 (live-patched)\n", 2);
    lucos_ok(&s.dir, &["revert", "--vm", "lp", "fix"]);
    s.wait_lines("version testkernel 1.0\n", 2);

    let answer = |conn: &UnixStream| -> Response {
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).expect("reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply '{line}': {e}"))
    };
    // 100 MB without a newline: an error reply, the connection closed.
    let big = UnixStream::connect(&sock).expect("big client");
    let mut w = big.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            if w.write_all(&chunk).is_err() {
                break; // the server closed the connection
            }
        }
    });
    let r = answer(&big);
    let e = r.error.expect("an error");
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(
        e.message
            .contains(&format!("larger than {MAX_REQUEST_BYTES} bytes")),
        "{}",
        e.message
    );
    writer.join().expect("writer");
    // Garbage: an error reply, and the connection still serves.
    let mut g = UnixStream::connect(&sock).expect("garbage client");
    g.write_all(b"\x01\x02 not json at all\n").expect("write");
    let e = answer(&g).error.expect("an error");
    assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
    g.write_all(b"{\"op\":\"explode\"}\n").expect("write");
    assert_eq!(
        answer(&g).error.expect("an error").code,
        ErrorCode::BadRequest
    );
    g.write_all(b"{\"op\":\"status\"}\n").expect("write");
    assert!(answer(&g).ok);
    // The idle client is still served when it speaks up; the stalled one
    // was told its request took too long.
    (&idle).write_all(b"{\"op\":\"status\"}\n").expect("write");
    assert!(answer(&idle).ok);
    let e = answer(&stalled)
        .error
        .expect("the stalled request is refused");
    assert!(e.message.contains("not completed within"), "{}", e.message);
    // Nothing of this touched the guest.
    assert_eq!(s.text_sha(), before);
    assert!(lucos_ok(&s.dir, &["status", "--vm", "lp"]).contains("running"));
}
