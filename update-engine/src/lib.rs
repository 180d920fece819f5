//! lucos live-update engine: the policy above vmm-core's mechanism. The
//! `.lup` patch format and its signature, the guest kernel as seen from
//! outside (kernel, linux), linking a patch against it, placing it in the
//! patch area, the checks that make a switch safe and the switch itself,
//! and the patcher that runs them as phases (patcher's module docs).
//!
//! The engine drives a VM only through [`vmm_core::guest::Guest`]: KVM in
//! the VMM, an in-memory guest in the unit tests.

pub mod area;
pub mod campaign;
pub mod data;
pub mod diffobj;
pub mod extable;
pub mod health;
pub mod kernel;
pub mod klog;
pub mod link;
pub mod linux;
pub mod lup;
pub mod modules;
pub mod patcher;
pub mod pointers;
pub mod protect;
pub mod safety;
pub mod switch;
pub mod trampoline;
pub mod transfer;

pub use link::{link, Linked};
pub use lup::{FunctionPatch, Lup, Manifest, SigningKey, VerifyingKey};
pub use trampoline::{check_site, jmp_rel32, Site};

/// Errors of the update engine. Each names its cause; none leaves anything
/// half-done (the VMM applies nothing before every check has passed).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The file is not a `.lup`, or is damaged.
    #[error("{path}: not a valid .lup patch: {why}")]
    BadLup {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The patch carries no signature.
    #[error("{0}: the patch is not signed; lucos applies only patches signed by a trusted key")]
    Unsigned(String),
    /// The signature does not verify with any trusted key.
    #[error("{0}: the signature does not verify with any trusted key (tampered, or signed by an untrusted key)")]
    BadSignature(String),
    /// No trusted keys were configured.
    #[error("no trusted keys: start the VM with `lucos run --trusted-key KEY.pub`")]
    NoTrustedKeys,
    /// The patch is for another kernel build.
    #[error("patch '{patch}' is for another kernel build: {why}")]
    WrongKernel {
        /// The patch.
        patch: String,
        /// What differs.
        why: String,
    },
    /// The old function's bytes are not what the patch was built against.
    #[error("patch '{patch}': {function} does not match: {why}")]
    OldBytesMismatch {
        /// The patch.
        patch: String,
        /// The old function.
        function: String,
        /// What differs.
        why: String,
    },
    /// A symbol the patch needs is not in the running kernel.
    #[error("patch '{patch}': {why}")]
    Symbol {
        /// The patch.
        patch: String,
        /// The lookup error.
        why: String,
    },
    /// A module the patch replaces functions of is not there as the patch
    /// needs it (not loaded, another build, being loaded or unloaded).
    #[error("patch '{patch}': module {module} {why}")]
    Module {
        /// The patch.
        patch: String,
        /// The module.
        module: String,
        /// What is wrong.
        why: String,
    },
    /// A relocation the linker does not handle.
    #[error(
        "patch object {object}: relocation type {kind} ({number}) in {section} is not supported"
    )]
    UnsupportedRelocation {
        /// The object file.
        object: String,
        /// Section the relocation applies to.
        section: String,
        /// Type name.
        kind: String,
        /// Type number.
        number: u32,
    },
    /// A relocated value does not fit.
    #[error("patch object {object}: relocation against {symbol} out of range ({value:#x} does not fit {bits} bits)")]
    RelocationOverflow {
        /// The object file.
        object: String,
        /// The target symbol.
        symbol: String,
        /// The value.
        value: i64,
        /// Field width.
        bits: u32,
    },
    /// The object is not a usable relocatable ELF.
    #[error("patch object {object}: {why}")]
    BadObject {
        /// The object file.
        object: String,
        /// What is wrong.
        why: String,
    },
    /// A function entry cannot take a trampoline.
    #[error("{function} at {addr:#x} cannot be patched: {why}")]
    UnsafeSite {
        /// The function.
        function: String,
        /// Its entry.
        addr: u64,
        /// Why.
        why: String,
    },
    /// Anything about the patch stack (dependencies, names, reverts).
    #[error("{0}")]
    Stack(String),
    /// A data-layout change that cannot be made (its C transfer functions
    /// fault, run away, or do not link).
    #[error("data change: {0}")]
    Data(String),
    /// I/O.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
