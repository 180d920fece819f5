//! The VMM's log: `log` records to standard error (a detached VM's log
//! file), `lucos: LEVEL: message`. `LUCOS_LOG` (error, warn, info, debug,
//! trace) sets the level; warnings and errors by default.

use log::{LevelFilter, Log, Metadata, Record};

struct Stderr;

impl Log for Stderr {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            eprintln!("lucos: {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger (once; later calls do nothing).
pub fn init() {
    let level = std::env::var("LUCOS_LOG")
        .ok()
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn);
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(level);
    }
}
