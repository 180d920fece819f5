//! Write-control commands: protect, unprotect, events.

use std::time::Duration;

use vmm_core::control::{EventInfo, EventsInfo, ProtectInfo, Request};
use vmm_core::write_control::WriteStats;

use crate::client::{connect, print_typed};
use crate::error::{exit, CliError};

/// `lucos protect --vm ID --name N (--gpa A --len N | SYMBOL [--len N])`.
pub fn protect(
    vm: &str,
    name: &str,
    gpa: Option<u64>,
    symbol: Option<String>,
    len: Option<u64>,
    json: bool,
) -> Result<i32, CliError> {
    let info: ProtectInfo = connect(vm)?.call_as(&Request::Protect {
        name: name.to_owned(),
        gpa,
        symbol,
        len,
    })?;
    show(vm, &info, json);
    Ok(exit::OK)
}

/// `lucos protect --vm ID --kernel-text [--allow-writer F]...`.
pub fn protect_kernel(vm: &str, allow_writers: Vec<String>, json: bool) -> Result<i32, CliError> {
    let info: ProtectInfo = connect(vm)?.call_as(&Request::ProtectKernel { allow_writers })?;
    show(vm, &info, json);
    Ok(exit::OK)
}

/// `lucos protect --vm ID`: what is protected, and the slot layout.
pub fn protected(vm: &str, json: bool) -> Result<i32, CliError> {
    let info: ProtectInfo = connect(vm)?.call_as(&Request::Protected)?;
    show(vm, &info, json);
    if !json {
        println!("  memory slots (guest RAM, then the patch area):");
        for s in &info.slots {
            println!(
                "    {:#012x}..{:#012x} {}",
                s.gpa,
                s.gpa + s.len,
                if s.readonly {
                    "read-only"
                } else {
                    "read-write"
                }
            );
        }
    }
    Ok(exit::OK)
}

/// `lucos unprotect --vm ID NAME`.
pub fn unprotect(vm: &str, name: &str, json: bool) -> Result<i32, CliError> {
    let info: ProtectInfo = connect(vm)?.call_as(&Request::Unprotect {
        name: name.to_owned(),
    })?;
    show(vm, &info, json);
    Ok(exit::OK)
}

fn show(vm: &str, info: &ProtectInfo, json: bool) {
    if json {
        print_typed(info);
        return;
    }
    println!("VM {vm}: {} protected ranges", info.ranges.len());
    for r in &info.ranges {
        let native = match r.access {
            vmm_core::write_control::Access::Trapped => "",
            vmm_core::write_control::Access::Native => " (written natively)",
            vmm_core::write_control::Access::Relayed => " (read-only slot, writes relayed)",
        };
        println!(
            "  {:#012x}+{:<5} {:<24} {}{native}",
            r.gpa, r.len, r.owner, r.label
        );
    }
    println!("  {}", stats_line(&info.write_control));
}

/// One line of write-control figures, for status and list.
pub fn stats_line(s: &WriteStats) -> String {
    format!(
        "write control: {} ranges on {} read-only pages, {} memory slots; writes trapped {}, allowed {}, refused {}, rewound {}, handled {}",
        s.ranges, s.pages, s.slots, s.trapped, s.allowed, s.refused, s.rewound, s.handled
    )
}

/// `lucos events --vm ID [--since N] [--follow] [--json]`: refused writes;
/// with --follow, new ones as they come (JSON: one object per line).
pub fn events(vm: &str, since: u64, follow: bool, json: bool) -> Result<i32, CliError> {
    let mut c = connect(vm)?;
    let mut since = since;
    loop {
        let info: EventsInfo = match c.call_as(&Request::Events { since }) {
            Ok(i) => i,
            // The VM ended while we followed it: that is the end of the stream.
            Err(_) if follow && since > 0 => return Ok(exit::OK),
            Err(e) => return Err(e.into()),
        };
        if json && !follow {
            print_typed(&info);
            return Ok(exit::OK);
        }
        for e in &info.events {
            if json {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
            } else {
                println!("{}", event_line(e));
            }
        }
        since = info.next.saturating_sub(1);
        if !follow {
            if !json && info.events.is_empty() {
                println!("no write-control events");
            }
            return Ok(exit::OK);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn event_line(e: &EventInfo) -> String {
    let ev = &e.event;
    let bytes: String = ev.bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "#{} {:>8.3} s {} vCPU {} CPL {} rip {:#x}{} wrote {} bytes {} at {:#x} = {} ({})",
        ev.seq,
        ev.at_ms as f64 / 1e3,
        ev.kind,
        ev.vcpu,
        ev.cpl,
        ev.rip,
        e.writer
            .as_ref()
            .map(|w| format!(" ({w})"))
            .unwrap_or_default(),
        ev.bytes.len(),
        bytes,
        ev.gpa,
        ev.target,
        ev.owner
    )
}
