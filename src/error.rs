//! CLI errors and the exit codes scripts can act on.

use vmm_core::control::ClientError;

/// Exit codes of `lucos` (docs/cli.md).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Any error not listed below.
    pub const ERROR: i32 = 1;
    /// Bad usage or arguments.
    pub const USAGE: i32 = 2;
    /// No such VM, or its VMM is dead.
    pub const NO_VM: i32 = 3;
    /// The VM is not in a state that allows the request.
    pub const BAD_STATE: i32 = 4;
    /// A symbol source or patch is for another kernel build than the running one.
    pub const WRONG_KERNEL: i32 = 5;
    /// A patch was refused by a check (signature, bytes, symbols, site, stack); the guest is unchanged.
    pub const PATCH_REFUSED: i32 = 6;
    /// A vCPU or a sleeping task stayed in code the patch replaces through every try; the guest is unchanged, try again.
    pub const BUSY: i32 = 7;
    /// `lucos campaign run`: the campaign stopped on a failure (and rolled
    /// back what its plan says); see its report.
    pub const CAMPAIGN_FAILED: i32 = 8;
    /// `lucos campaign run`: the campaign was aborted (`lucos campaign
    /// abort`); `run` resumes it.
    pub const CAMPAIGN_ABORTED: i32 = 9;
    /// `lucos upgrade`: the new VMM did not take the guest over; it runs on
    /// under the old one, unchanged.
    pub const UPGRADE_FAILED: i32 = 10;
    /// `lucos run`: the guest crashed (triple fault, KVM error).
    pub const GUEST_CRASHED: i32 = 125;
}

/// An error to report and exit with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The id is in use.
    #[error("VM '{id}' is already running (pid {pid})")]
    AlreadyRunning {
        /// VM id.
        id: String,
        /// Its VMM's pid.
        pid: String,
    },
    /// I/O.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Creating or running the VM.
    #[error(transparent)]
    Vm(#[from] vmm_core::VmError),
    /// Symbols and types.
    #[error(transparent)]
    Symbols(#[from] symbol_db::SymbolError),
    /// Talking to a VM.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A source tree (or other input) is for another kernel build.
    #[error("{0}")]
    WrongKernel(String),
    /// A patch build refused what it was given (a change it cannot carry).
    #[error("{0}")]
    Refused(String),
    /// A VM (or a campaign) is not in a state that allows the request.
    #[error("{0}")]
    BadState(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// An I/O error with context.
    pub fn io(what: String, source: std::io::Error) -> Self {
        Self::Io { what, source }
    }

    /// The exit code for this error.
    pub fn exit_code(&self) -> i32 {
        use vmm_core::control::ErrorCode;
        match self {
            Self::Usage(_) => exit::USAGE,
            Self::WrongKernel(_) => exit::WRONG_KERNEL,
            Self::Refused(_) => exit::PATCH_REFUSED,
            Self::BadState(_) => exit::BAD_STATE,
            Self::Client(ClientError::UnknownVm { .. } | ClientError::StaleSocket { .. }) => {
                exit::NO_VM
            }
            Self::Client(ClientError::Remote(e)) => match e.code {
                ErrorCode::AlreadyPaused | ErrorCode::NotPaused | ErrorCode::NotRunning => {
                    exit::BAD_STATE
                }
                ErrorCode::BadRequest | ErrorCode::NoSuchVcpu => exit::USAGE,
                ErrorCode::KernelMismatch => exit::WRONG_KERNEL,
                ErrorCode::PatchRefused => exit::PATCH_REFUSED,
                ErrorCode::Busy | ErrorCode::TooManyClients => exit::BUSY,
                ErrorCode::UpgradeFailed => exit::UPGRADE_FAILED,
                _ => exit::ERROR,
            },
            Self::Symbols(symbol_db::SymbolError::Mismatch { .. }) => exit::WRONG_KERNEL,
            _ => exit::ERROR,
        }
    }
}

/// The error and its causes on one line, each cause once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}
