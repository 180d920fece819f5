//! Client commands: list, status, pause, resume, stop, regs.

use serde_json::Value;
use vmm_core::control::{Client, Done, PauseInfo, RegsInfo, Request, StatusInfo};

use crate::error::{exit, CliError};
use crate::paths;

pub(crate) fn connect(id: &str) -> Result<Client, CliError> {
    paths::validate_id(id)?;
    Ok(Client::connect(id, &paths::socket_path(id))?)
}

pub(crate) fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Prints `v` as the JSON a script reads.
pub(crate) fn print_typed(v: &impl serde::Serialize) {
    print_json(&serde_json::to_value(v).unwrap_or(Value::Null));
}

/// `lucos status`.
pub fn status(id: &str, json: bool) -> Result<(), CliError> {
    let s: StatusInfo = connect(id)?.call_as(&Request::Status)?;
    if json {
        print_typed(&s);
        return Ok(());
    }
    println!("VM {}: {}", s.id, s.state);
    println!("  pid      {}", s.pid);
    println!(
        "  vmm      {} ({} live upgrade{})",
        s.vmm_version,
        s.upgrades,
        if s.upgrades == 1 { "" } else { "s" }
    );
    println!("  vcpus    {}", s.vcpus);
    println!("  memory   {} MiB", s.mem_bytes >> 20);
    println!("  kernel   {}", s.kernel);
    println!("  cmdline  {}", s.cmdline);
    if !s.labels.is_empty() {
        let l: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  labels   {}", l.join(" "));
    }
    println!("  uptime   {:.1} s", s.uptime_ms as f64 / 1e3);
    println!("  kvm      {}", s.kvm);
    match s.last_pause_us {
        Some(us) => println!("  pauses   {} (last took {us:.1} µs)", s.pauses),
        None => println!("  pauses   {}", s.pauses),
    }
    println!("  {}", crate::protect::stats_line(&s.write_control));
    Ok(())
}

/// `lucos pause`.
pub fn pause(id: &str, json: bool) -> Result<(), CliError> {
    let p: PauseInfo = connect(id)?.call_as(&Request::Pause)?;
    if json {
        print_typed(&p);
    } else {
        println!("VM {id} paused (all vCPUs out in {:.1} µs)", p.pause_us);
    }
    Ok(())
}

/// `lucos resume` / `lucos stop`.
pub fn simple(id: &str, req: Request, done: &str) -> Result<i32, CliError> {
    let Done {} = connect(id)?.call_as(&req)?;
    println!("VM {id} {done}");
    Ok(exit::OK)
}

/// `lucos regs`.
pub fn regs(id: &str, vcpu: u8, json: bool) -> Result<(), CliError> {
    let r: RegsInfo = connect(id)?.call_as(&Request::Regs { vcpu })?;
    if json {
        print_typed(&r);
        return Ok(());
    }
    println!(
        "vCPU {} (CPL {}, {} mode) cs={:#x} cr3={:#x}",
        r.vcpu,
        r.cpl,
        if r.cpl == 3 { "user" } else { "kernel" },
        r.cs,
        r.cr3
    );
    for (name, val) in &r.regs {
        println!("  {name:<6} {val:#018x}");
    }
    Ok(())
}

/// One row of `lucos list`: a VM's status, or why it has none.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
enum Row {
    Up(Box<StatusInfo>),
    Dead {
        id: String,
        state: &'static str,
        error: String,
    },
}

/// `lucos list`: every VM with a socket in the run directory.
pub fn list(json: bool) -> Result<(), CliError> {
    let dir = paths::run_dir();
    let mut rows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter_map(|n| n.strip_suffix(".sock").map(str::to_owned))
            .collect();
        names.sort();
        for id in names {
            // status answers at once; a VMM that does not within 10 s is
            // shown as dead rather than holding the whole list up.
            let row = match Client::connect(&id, &paths::socket_path(&id)).and_then(|mut c| {
                c.set_timeout(Some(std::time::Duration::from_secs(10)))?;
                c.call_as::<StatusInfo>(&Request::Status)
            }) {
                Ok(s) => Row::Up(Box::new(s)),
                Err(e) => Row::Dead {
                    id,
                    state: "dead",
                    error: e.to_string(),
                },
            };
            rows.push(row);
        }
    }
    if json {
        print_typed(&rows);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no VMs running (run directory {})", dir.display());
        return Ok(());
    }
    println!(
        "{:<20} {:>8} {:<9} {:>5} {:>8} {:>9}",
        "ID", "PID", "STATE", "VCPUS", "MEM", "UPTIME"
    );
    for r in rows {
        match r {
            Row::Dead { id, .. } => println!("{:<20} {:>8} {:<9}", id, "-", "dead"),
            Row::Up(s) => println!(
                "{:<20} {:>8} {:<9} {:>5} {:>7}M {:>8.1}s",
                s.id,
                s.pid,
                s.state,
                s.vcpus,
                s.mem_bytes >> 20,
                s.uptime_ms as f64 / 1e3,
            ),
        }
    }
    Ok(())
}
