//! Agentless views of the guest kernel, read by the VMM from guest memory:
//! its log (`lucos dmesg`) and whether its clock advances (`lucos alive`).

use std::time::Duration;

use vmm_core::control::{AliveInfo, ClientError, DmesgInfo, LogRecord, Request};

use crate::client::{connect, print_typed};
use crate::error::{exit, CliError};

/// How often `dmesg --follow` asks for new records.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// `lucos dmesg --vm ID [--since SEQ] [--follow] [--json]`: the guest
/// kernel's log from sequence number `since` on; with --follow, new records
/// as they come until the VM ends (JSON: one record per line).
pub fn dmesg(vm: &str, since: u64, follow: bool, json: bool) -> Result<i32, CliError> {
    let mut c = connect(vm)?;
    let mut since = since;
    let mut answered = false;
    loop {
        let info: DmesgInfo = match c.call_as(&Request::Dmesg { since }) {
            Ok(i) => i,
            // The VM ended while we followed it: that is the end of the log.
            Err(
                e @ (ClientError::Io { .. }
                | ClientError::UnknownVm { .. }
                | ClientError::StaleSocket { .. }),
            ) if follow && answered => {
                log::debug!("dmesg --follow: the VM ended ({e})");
                return Ok(exit::OK);
            }
            Err(e) => return Err(e.into()),
        };
        answered = true;
        if json && !follow {
            print_typed(&info);
            return Ok(exit::OK);
        }
        if info.lost > 0 {
            eprintln!(
                "lucos: {} records from {since} on were overwritten before they were read",
                info.lost
            );
        }
        for r in &info.records {
            if json {
                println!("{}", serde_json::to_string(r).unwrap_or_default());
            } else {
                println!("{}", line(r));
            }
        }
        since = info.next;
        if !follow {
            return Ok(exit::OK);
        }
        std::thread::sleep(FOLLOW_EVERY);
    }
}

/// A record as Linux's dmesg prints it: `[    1.234567] text`.
pub fn line(r: &LogRecord) -> String {
    format!(
        "[{:5}.{:06}] {}",
        r.ts_ns / 1_000_000_000,
        r.ts_ns % 1_000_000_000 / 1_000,
        r.text
    )
}

/// `lucos alive --vm ID [--timeout MS] [--json]`: waits for the guest
/// kernel's clock to advance; an error (exit 1) if it does not in time.
pub fn alive(vm: &str, timeout_ms: u64, json: bool) -> Result<i32, CliError> {
    let a: AliveInfo = connect(vm)?.call_as(&Request::Alive { timeout_ms })?;
    if json {
        print_typed(&a);
    } else {
        println!(
            "VM {vm}: alive ({} went from {} to {} in {} ms)",
            a.symbol, a.before, a.after, a.waited_ms
        );
    }
    Ok(exit::OK)
}

/// `lucos modules`: the guest kernel's loaded modules (and one's symbols).
pub fn modules(vm: &str, symbols_of: Option<String>, json: bool) -> Result<i32, CliError> {
    let info: update_engine::modules::ModulesInfo =
        connect(vm)?.call_as(&Request::Modules { symbols_of })?;
    if json {
        print_typed(&info);
        return Ok(exit::OK);
    }
    println!(
        "{:<24} {:<8} {:>18} {:>9} {:>9} {:>7}  version / srcversion",
        "module", "state", "base", "size", "text", "symbols"
    );
    for m in &info.modules {
        println!(
            "{:<24} {:<8} {:>#18x} {:>9} {:>9} {:>7}  {} / {}",
            m.name,
            m.state,
            m.base,
            m.size,
            m.text_size,
            m.symbols,
            m.version.as_deref().unwrap_or("-"),
            m.srcversion.as_deref().unwrap_or("-")
        );
    }
    for s in info.symbols.iter().flatten() {
        println!("{:016x} {} {} size={:#x}", s.addr, s.kind, s.name, s.size);
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_look_like_linux_dmesg() {
        let r = |ts_ns, text: &str| LogRecord {
            seq: 0,
            ts_ns,
            level: 6,
            text: text.into(),
        };
        assert_eq!(
            line(&r(0, "Linux version 6.1")),
            "[    0.000000] Linux version 6.1"
        );
        assert_eq!(line(&r(1_234_567_891, "x")), "[    1.234567] x");
        assert_eq!(line(&r(123_456_000_000_000, "y")), "[123456.000000] y");
    }
}
