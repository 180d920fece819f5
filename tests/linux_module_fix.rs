//! A real distribution fix of a module, live: Debian's 6.1.192-3 update
//! changes one function of nfsd.ko (`nfsd4_sequence`, "nfsd: preflight
//! SEQUENCE replies before accepting a slot"). Its source delta
//! (guest-kernels/linux/fixes/) is built with `lucos build --diff --module`
//! against the previous revision, 6.1.192-2 (the tree: previous-tree.sh;
//! the build checks the function as that tree builds it against the
//! 6.1.192-2 package's nfsd.ko), and applied to a Debian guest running
//! 6.1.192-2 in the emulated SVM host, with nfsd, the NFS client and the
//! modules they need loaded from that package, the guest serving a tmpfs
//! over NFSv4.1 to itself and reading it all the time. The patch switches
//! the loaded module's function (found at the address its own kallsyms
//! gives) while the server runs SEQUENCE operations through it; reads go on
//! without an error before the patch, while patched and after the revert.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::linux::{
    build_patch, guest_said, kernel_pkg, kernel_release, run_scenario_with, scn_answer, vmlinux_of,
    Extras, PatchDirs, SIGNAL,
};

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// The fix and the two Debian revisions it lies between.
const FIX: &str = "guest-kernels/linux/fixes/debian-6.1.192-3-nfsd.patch";
const FIXED: &str = "6.1.192-3";
const BEFORE: &str = "6.1.192-2";

/// Modules nfsd needs, in load order, then nfsd, then the NFS client's.
const MODULES: [&str; 11] = [
    "net/sunrpc/sunrpc.ko",
    "fs/nfs_common/grace.ko",
    "fs/lockd/lockd.ko",
    "fs/nfs_common/nfs_acl.ko",
    "net/sunrpc/auth_gss/auth_rpcgss.ko",
    "fs/nfsd/nfsd.ko",
    "fs/netfs/netfs.ko",
    "fs/fscache/fscache.ko",
    "fs/nfs/nfs.ko",
    "net/dns_resolver/dns_resolver.ko",
    "fs/nfs/nfsv4.ko",
];

/// The guest serves a tmpfs over NFSv4.1 and mounts it from itself
/// (loopback), so every open, read and stat of /mnt/hello is a compound
/// whose first operation, SEQUENCE, runs `nfsd4_sequence`. No nfs-utils in
/// the guest: the export is written into the kernel's caches as mountd and
/// exportfs would (client "lucos" is 127.0.0.1; the NFSv4 root, fsid 0, is
/// /export: read-only, insecure ports, no subtree check). Leases are off,
/// so no delegation lets the client open without asking the server.
/// `sequence` is the server's count of SEQUENCE operations
/// (/proc/net/rpc/nfsd, proc4ops: the count of operations, then one
/// counter per operation; SEQUENCE is operation 53).
const WORKLOAD: &str = r#"#!/bin/sh
for m in sunrpc grace lockd nfs_acl auth_rpcgss nfsd netfs fscache nfs dns_resolver nfsv4; do
  insmod /files/$m.ko || echo "@@NFS insmod $m failed"
done
ifconfig lo 127.0.0.1 up
echo 0 > /proc/sys/fs/leases-enable
mkdir -p /proc/fs/nfsd /export /mnt
mount -t nfsd nfsd /proc/fs/nfsd || echo "@@NFS mount failed"
mount -t tmpfs tmpfs /export
echo lucos-nfs > /export/hello
# NFSv4 only: it needs no rpcbind.
echo "-2 -3 +4 +4.1" > /proc/fs/nfsd/versions 2>/dev/null
echo 10 > /proc/fs/nfsd/nfsv4leasetime
echo 10 > /proc/fs/nfsd/nfsv4gracetime
never=2147483647
echo "nfsd 127.0.0.1 $never lucos" > /proc/net/rpc/auth.unix.ip/channel || echo "@@NFS client failed"
echo "lucos 1 \x00000000 $never /export" > /proc/net/rpc/nfsd.fh/channel || echo "@@NFS fsid failed"
echo "lucos /export $never 9219 65534 65534 0" > /proc/net/rpc/nfsd.export/channel || echo "@@NFS export failed"
echo 1 > /proc/fs/nfsd/threads || echo "@@NFS threads failed"
mount -t nfs4 -o vers=4.1,addr=127.0.0.1,clientaddr=127.0.0.1,noac,lookupcache=none 127.0.0.1:/ /mnt \
  || echo "@@NFS client mount failed"
kthreads() { grep -l '^nfsd$' /proc/[0-9]*/comm 2>/dev/null | wc -l; }
sequence() { awk '$1 == "proc4ops" { print $56 }' /proc/net/rpc/nfsd; }
io() { [ "$(cat /mnt/hello 2>/dev/null)" = lucos-nfs ] && [ "$(ls /mnt)" = hello ]; }
# Until the grace period ends, opens are refused.
i=0
until io; do
  i=$((i + 1)); [ $i -gt 600 ] && { echo "@@NFS io never worked"; break; }
  sleep 0.5
done
# Traffic from now on, all the time; a failed read is reported.
(n=0; while :; do
  # Replaced whole (a reader never sees it truncated, half written).
  if io; then n=$((n + 1)); echo $n > /tmp/io.new; mv /tmp/io.new /tmp/io; else echo "@@NFS io failed after $n"; fi
  sleep 0.1
done) &
# Waits until the server has run N more SEQUENCEs, and says how many ran.
traffic() {
  s=$(sequence); r=$(cat /tmp/io)
  [ -n "$s" ] || { echo "@@NFS traffic-$2 failed: no SEQUENCE count"; return; }
  until [ "$(sequence)" -ge $((s + $1)) ]; do sleep 0.2; done
  echo "@@NFS traffic-$2 sequence=+$(( $(sequence) - s )) io=+$(( $(cat /tmp/io) - r ))"
}
echo "@@NFS ready threads=$(cat /proc/fs/nfsd/threads) kthreads=$(kthreads) versions=$(cat /proc/fs/nfsd/versions)"
traffic 20 before
until grep -q lucos-step-2 /proc/uptime; do sleep 0.2; done
traffic 20 patched
echo "@@NFS patched threads=$(cat /proc/fs/nfsd/threads) kthreads=$(kthreads)"
until ! grep -q lucos-step-2 /proc/uptime; do sleep 0.2; done
traffic 20 reverted
echo "@@NFS reverted threads=$(cat /proc/fs/nfsd/threads) kthreads=$(kthreads)"
while :; do sleep 1; done
"#;

const SCENARIO: &str = r#"
LOG=/tmp/nf.serial
fail() { tail -n 40 $LOG | sed 's/^/G| /'; $LUCOS stop --vm nf >/dev/null 2>&1; exit 1; }
up nf $LOG --kernel $GUEST_KERNEL --initrd $GUEST_INITRD --vcpus 2 --mem 512M --cmdline "$CMDLINE" --trusted-key $FILES/key.pub || exit 1
seen $LOG '^@@NFS ready' || fail
$LUCOS symbols --vm nf nfsd4_sequence@nfsd --json > /tmp/o 2>&1; echo "@@SCN symbols rc=$? $(one /tmp/o)"
$LUCOS patch --vm nf $FILES/nfsd-seq.lup --json > /tmp/o 2>&1; echo "@@SCN fix rc=$? $(one /tmp/o)"
$LUCOS list --vm nf --json > /tmp/o 2>&1; echo "@@SCN list rc=$? $(one /tmp/o)"
$LUCOS patch --vm nf $FILES/go.lup > /tmp/o 2>&1; echo "@@SCN go rc=$? $(one /tmp/o)"
seen $LOG '^@@NFS patched' || fail
$LUCOS revert --vm nf nfsd-seq > /tmp/o 2>&1; echo "@@SCN revert rc=$? $(one /tmp/o)"
$LUCOS revert --vm nf go > /tmp/o 2>&1; echo "@@SCN revertgo rc=$? $(one /tmp/o)"
seen $LOG '^@@NFS reverted' || fail
$LUCOS list --vm nf --json > /tmp/o 2>&1; echo "@@SCN list2 rc=$? $(one /tmp/o)"
$LUCOS stop --vm nf >/dev/null
wait_vm nf 300
tr -d '\r' < $LOG | grep -e '^@@NFS' | sed 's/^/@@GUEST /'
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn linux_debian_nfsd_fix_built_from_its_source_delta_is_applied_to_the_previous_revision() {
    let chosen = kernel_pkg();
    let version = |pkg: &std::path::Path| common::linux::build_value(pkg, "KERNEL_VERSION");
    assert_eq!(
        version(&chosen),
        FIXED,
        "this test replays Debian's {FIXED} nfsd fix; the chosen build is another (update \
         the fix and the revisions here when the known builds move on)"
    );
    let before = common::linux::other_kernel_pkg()
        .filter(|p| version(p) == BEFORE)
        .unwrap_or_else(|| {
            panic!("Debian {BEFORE}'s kernel package is not to be had (versions.env, the archive)")
        });
    let PatchDirs {
        dir,
        files,
        guest: guest_dir,
        kmod: _,
        vmlinux: _,
    } = PatchDirs::new("module-fix");
    // The previous revision's tree: this build's source with the fix taken out.
    let work = repo().join("target/lucos-work/previous");
    let out = Command::new(repo().join("guest-kernels/linux/previous-tree.sh"))
        .arg(repo().join(FIX))
        .arg(&before)
        .arg(&work)
        .output()
        .expect("previous-tree.sh");
    assert!(
        out.status.success(),
        "previous-tree.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let release = kernel_release(&before);
    let ko = |rel: &str| before.join(format!("lib/modules/{release}/kernel/{rel}"));
    for m in MODULES {
        let name = std::path::Path::new(m).file_name().expect("name");
        std::fs::copy(ko(m), guest_dir.join(name)).expect("module");
    }
    let vmlinux = dir.join("vmlinux-before");
    std::fs::write(&vmlinux, vmlinux_of(&before)).expect("vmlinux");

    // The fix, from its source delta, against 6.1.192-2's nfsd.ko.
    let built = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["build", "--kernel"])
        .arg(&vmlinux)
        .arg("--diff")
        .arg(repo().join(FIX))
        .arg("--source")
        .arg(&tree)
        .arg("--module")
        .arg(ko("fs/nfsd/nfsd.ko"))
        .arg("--key")
        .arg(files.join("key"))
        .args(["--name", "nfsd-seq", "--json", "-o"])
        .arg(files.join("nfsd-seq.lup"))
        .output()
        .expect("lucos build");
    assert!(
        built.status.success(),
        "lucos build --diff: {}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let built: serde_json::Value = serde_json::from_slice(&built.stdout).expect("build JSON");
    assert_eq!(
        built["functions"],
        serde_json::json!(["nfsd4_sequence"]),
        "{built}"
    );
    // The fixed build's own function differs: the delta is a real change.
    let fixed_ko = chosen.join(format!(
        "lib/modules/{}/kernel/fs/nfsd/nfsd.ko",
        kernel_release(&chosen)
    ));
    let size = |path: &std::path::Path| {
        symbol_db::module::ModuleObject::from_file(path)
            .expect("module")
            .functions_named("nfsd4_sequence")[0]
            .size
    };
    assert_ne!(size(&ko("fs/nfsd/nfsd.ko")), size(&fixed_ko));
    // The host's signal to the guest, for the previous revision's vmlinux.
    build_patch(&files, &tree, &vmlinux, "go", SIGNAL, &[]);

    let out = run_scenario_with(
        "nf",
        WORKLOAD,
        &format!("CMDLINE=\"{CMDLINE}\"\n{SCENARIO}"),
        Duration::from_secs(1200),
        Extras {
            files: Some(files.clone()),
            guest_files: Some(guest_dir.clone()),
            kernel: Some(before.clone()),
            ..Extras::default()
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    let text = &out.text;
    for l in text.lines().filter(|l| l.contains("@@GUEST")) {
        eprintln!("{l}");
    }

    let ready = guest_said(text, "@@NFS", "ready");
    assert!(ready.starts_with("threads=1 kthreads=1"), "{ready}\n{text}");
    let syms: serde_json::Value =
        serde_json::from_str(scn_answer(text, "symbols", "0")).expect("symbols JSON");
    let addr = syms["answers"][0]["symbol"]["addr"]
        .as_str()
        .expect("nfsd4_sequence's address")
        .to_owned();
    let fix: serde_json::Value =
        serde_json::from_str(scn_answer(text, "fix", "0")).expect("fix JSON");
    assert_eq!(fix["functions"][0]["function"], "nfsd4_sequence", "{fix}");
    assert_eq!(fix["functions"][0]["module"], "nfsd", "{fix}");
    assert_eq!(fix["functions"][0]["old_addr"], addr.as_str(), "{fix}");
    let list: serde_json::Value =
        serde_json::from_str(scn_answer(text, "list", "0")).expect("list");
    assert_eq!(list["patches"][0]["modules"][0]["name"], "nfsd", "{list}");
    // NFS traffic through nfsd4_sequence before the patch, while patched
    // and after the revert; no read failed.
    for phase in ["before", "patched", "reverted"] {
        let said = guest_said(text, "@@NFS", &format!("traffic-{phase}"));
        let count = |key: &str| -> u64 {
            said.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in '{said}'"))
        };
        assert!(count("sequence=+") >= 20, "{phase}: {said}");
        assert!(count("io=+") >= 1, "{phase}: {said}");
    }
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("@@NFS") && (l.contains("failed") || l.contains("never")))
        .collect();
    assert!(failed.is_empty(), "{failed:?}\n{text}");
    // The server thread lives on through the patch and its revert.
    assert_eq!(
        guest_said(text, "@@NFS", "patched"),
        "threads=1 kthreads=1",
        "{text}"
    );
    scn_answer(text, "revert", "0");
    scn_answer(text, "revertgo", "0");
    assert_eq!(
        guest_said(text, "@@NFS", "reverted"),
        "threads=1 kthreads=1",
        "{text}"
    );
    let list2: serde_json::Value =
        serde_json::from_str(scn_answer(text, "list2", "0")).expect("list2");
    assert_eq!(
        list2["patches"].as_array().map(Vec::len),
        Some(0),
        "{list2}"
    );
}
