//! Where VMs keep their control sockets and locks, and how VM ids look.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

use crate::error::CliError;

/// The run directory: `$LUCOS_RUN_DIR`, else `$XDG_RUNTIME_DIR/lucos`, else `/run/lucos`.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LUCOS_RUN_DIR") {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(x) => PathBuf::from(x).join("lucos"),
        None => PathBuf::from("/run/lucos"),
    }
}

/// Creates the run directory (mode 0700) if needed.
pub fn ensure_run_dir() -> Result<PathBuf, CliError> {
    let dir = run_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| CliError::io(format!("cannot create run directory {}", dir.display()), e))?;
    Ok(dir)
}

/// Checks a VM id: 1-64 characters of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn validate_id(id: &str) -> Result<(), CliError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "invalid VM id '{id}': use 1-64 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        )))
    }
}

/// The control socket of VM `id`.
pub fn socket_path(id: &str) -> PathBuf {
    run_dir().join(format!("{id}.sock"))
}

/// The lock file of VM `id`.
pub fn lock_path(id: &str) -> PathBuf {
    run_dir().join(format!("{id}.lock"))
}

/// The log of a detached VM `id`.
pub fn log_path(id: &str) -> PathBuf {
    run_dir().join(format!("{id}.log"))
}

/// Holds VM `id`'s lock for the life of the VMM: a second `lucos run` of the
/// same id fails, and a lock nobody holds marks sockets left by a dead VMM.
pub fn lock_vm(id: &str) -> Result<Flock<File>, CliError> {
    let path = lock_path(id);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(&path)
        .map_err(|e| CliError::io(format!("cannot open lock file {}", path.display()), e))?;
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let _ = nix::unistd::ftruncate(&*lock, 0);
            let _ =
                std::io::Write::write_all(&mut &*lock, std::process::id().to_string().as_bytes());
            Ok(lock)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            Err(CliError::AlreadyRunning {
                id: id.to_owned(),
                pid: pid.trim().to_owned(),
            })
        }
        Err((_, e)) => Err(CliError::io(
            format!("cannot lock {}", path.display()),
            std::io::Error::from(e),
        )),
    }
}

/// Parses a memory size: bytes, or a number with K, M, G (binary units).
pub fn parse_mem(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => {
                    return Err(CliError::Usage(format!(
                        "bad memory size '{s}': use e.g. 512M or 2G"
                    )))
                }
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| CliError::Usage(format!("bad memory size '{s}': use e.g. 512M or 2G")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem("512M").expect("ok"), 512 << 20);
        assert_eq!(parse_mem("2g").expect("ok"), 2 << 30);
        assert_eq!(parse_mem("4096").expect("ok"), 4096);
        for bad in ["", "M", "12T", "-1M", "0", "1.5G"] {
            assert!(parse_mem(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids() {
        for good in ["web1", "a", "vm_2.test-x"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "sp ace", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }
}
