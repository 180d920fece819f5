//! Client commands: list, status, pause, resume, stop, regs.

use serde_json::Value;
use vmm_core::control::{Client, Request, StatusInfo};

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

fn status_of(v: Value) -> Result<StatusInfo, CliError> {
    serde_json::from_value(v).map_err(|e| CliError::Other(format!("unexpected status answer: {e}")))
}

/// `lucos status`.
pub fn status(id: &str, json: bool) -> Result<(), CliError> {
    let v = connect(id)?.call(&Request::Status)?;
    if json {
        print_json(&v);
        return Ok(());
    }
    let s = status_of(v)?;
    println!("VM {}: {}", s.id, s.state);
    println!("  pid      {}", s.pid);
    println!("  vcpus    {}", s.vcpus);
    println!("  memory   {} MiB", s.mem_bytes >> 20);
    println!("  kernel   {}", s.kernel);
    println!("  cmdline  {}", s.cmdline);
    println!("  uptime   {:.1} s", s.uptime_ms as f64 / 1e3);
    println!("  kvm      {}", s.kvm);
    match s.last_pause_us {
        Some(us) => println!("  pauses   {} (last took {us:.1} µs)", s.pauses),
        None => println!("  pauses   {}", s.pauses),
    }
    Ok(())
}

/// `lucos pause`.
pub fn pause(id: &str, json: bool) -> Result<(), CliError> {
    let v = connect(id)?.call(&Request::Pause)?;
    if json {
        print_json(&v);
    } else {
        let us = v
            .get("pause_us")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        println!("VM {id} paused (all vCPUs out in {us:.1} µs)");
    }
    Ok(())
}

/// `lucos resume` / `lucos stop`.
pub fn simple(id: &str, req: Request, done: &str) -> Result<i32, CliError> {
    connect(id)?.call(&req)?;
    println!("VM {id} {done}");
    Ok(exit::OK)
}

/// `lucos regs`.
pub fn regs(id: &str, vcpu: u8, json: bool) -> Result<(), CliError> {
    let v = connect(id)?.call(&Request::Regs { vcpu })?;
    if json {
        print_json(&v);
        return Ok(());
    }
    let r: vmm_core::control::RegsInfo = serde_json::from_value(v)
        .map_err(|e| CliError::Other(format!("unexpected regs answer: {e}")))?;
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
            let row = match Client::connect(&id, &paths::socket_path(&id))
                .and_then(|mut c| c.call(&Request::Status))
            {
                Ok(v) => v,
                Err(e) => serde_json::json!({ "id": id, "state": "dead", "error": e.to_string() }),
            };
            rows.push(row);
        }
    }
    if json {
        print_json(&Value::Array(rows));
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
        let get = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
        let state = get("state");
        if state == "dead" {
            println!(
                "{:<20} {:>8} {:<9}",
                get("id").as_str().unwrap_or("?"),
                "-",
                "dead"
            );
            continue;
        }
        println!(
            "{:<20} {:>8} {:<9} {:>5} {:>7}M {:>8.1}s",
            get("id").as_str().unwrap_or("?"),
            get("pid"),
            state.as_str().unwrap_or("?"),
            get("vcpus"),
            get("mem_bytes").as_u64().unwrap_or(0) >> 20,
            get("uptime_ms").as_u64().unwrap_or(0) as f64 / 1e3,
        );
    }
    Ok(())
}
