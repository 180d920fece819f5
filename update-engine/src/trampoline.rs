//! Trampolines: a 5-byte `jmp rel32` written over an old function's entry,
//! and the checks that make writing it safe while the guest is paused
//! anywhere.

use iced_x86::{Decoder, DecoderOptions, FlowControl};

use crate::UpdateError;

/// Bytes a trampoline overwrites.
pub const TRAMPOLINE_LEN: usize = 5;

/// The 5-byte nop GCC's `-mfentry -mnop-mcount` puts at every function entry
/// (and Linux's ftrace leaves there when tracing is off).
pub const FENTRY_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// `jmp rel32` at `from` to `to`.
pub fn jmp_rel32(from: u64, to: u64) -> Result<[u8; 5], String> {
    let rel = to.wrapping_sub(from + 5) as i64;
    let rel =
        i32::try_from(rel).map_err(|_| format!("{to:#x} is more than 2 GiB from {from:#x}"))?;
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&rel.to_le_bytes());
    Ok(b)
}

/// A checked patch site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    /// The old function's entry.
    pub addr: u64,
    /// The bytes the trampoline replaces.
    pub saved: [u8; 5],
}

/// Checks that `function` (its bytes `code`, starting at `addr`) can take a
/// trampoline: its first instruction is at least 5 bytes (so no thread can be
/// interrupted, or return, inside the bytes overwritten), and nothing in the
/// function branches into those bytes.
pub fn check_site(function: &str, addr: u64, code: &[u8]) -> Result<Site, UpdateError> {
    let unsafe_site = |why: String| UpdateError::UnsafeSite {
        function: function.to_owned(),
        addr,
        why,
    };
    if code.len() < TRAMPOLINE_LEN {
        return Err(unsafe_site(format!(
            "it is {} bytes long; a trampoline needs 5",
            code.len()
        )));
    }
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let first = decoder.decode();
    if first.is_invalid() {
        return Err(unsafe_site(
            "its first bytes do not decode as an instruction".into(),
        ));
    }
    if first.len() < TRAMPOLINE_LEN {
        return Err(unsafe_site(format!(
            "its first instruction ({first}) is {} bytes; without a 5-byte entry (the fentry nop) \
             a thread could be stopped inside the bytes a trampoline overwrites",
            first.len()
        )));
    }
    let inside = addr + 1..addr + TRAMPOLINE_LEN as u64;
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    for ins in &mut decoder {
        match ins.flow_control() {
            FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Call
            | FlowControl::XbeginXabortXend => {
                let t = ins.near_branch_target();
                if inside.contains(&t) {
                    return Err(unsafe_site(format!(
                        "the instruction at {:#x} ({ins}) branches to {t:#x}, inside the bytes a \
                         trampoline overwrites",
                        ins.ip()
                    )));
                }
            }
            _ => {}
        }
    }
    let mut saved = [0u8; 5];
    saved.copy_from_slice(&code[..TRAMPOLINE_LEN]);
    Ok(Site { addr, saved })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fentry_nop_entry_is_a_site() {
        // nop5; push rbp; ret
        let code = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55, 0xc3];
        let s = check_site("f", 0x1000, &code).expect("site");
        assert_eq!(s.saved, FENTRY_NOP);
        assert_eq!(
            jmp_rel32(0x1000, 0x2000).expect("jmp"),
            [0xe9, 0xfb, 0x0f, 0, 0]
        );
    }

    #[test]
    fn short_entry_and_branch_into_the_site_are_refused() {
        // push rbp; mov rbp,rsp; ... : first instruction 1 byte.
        let code = [0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3];
        let e = check_site("g", 0x1000, &code).expect_err("short");
        assert!(e.to_string().contains("is 1 bytes"), "{e}");
        // nop5; jmp back to 0x1002 (inside the nop).
        let code = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0xeb, 0xfb];
        let e = check_site("h", 0x1000, &code).expect_err("branch");
        assert!(e.to_string().contains("branches to 0x1002"), "{e}");
    }
}
