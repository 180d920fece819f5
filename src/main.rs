//! `lucos`: a VMM that live-updates the guest kernel from outside.

mod build_diff;
mod campaign;
mod client;
mod demo;
mod dmesg;
mod error;
mod includes;
mod logger;
mod patch;
mod paths;
mod protect;
mod run;
mod server;
mod symbols;
mod upgrade;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::{chain, exit, CliError};

/// lucos: run VMs and live-patch their kernels from outside.
#[derive(Debug, Parser)]
#[command(name = "lucos", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a VM and serve its control socket until it ends.
    Run(run::RunArgs),
    /// List running VMs; with --vm, the patches applied to that VM.
    List {
        /// Show this VM's applied patches.
        #[arg(long)]
        vm: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make a signing key pair: KEY (secret) and KEY.pub (give it to `lucos run --trusted-key`).
    Keygen {
        /// Where to write the secret key.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Compile replacement functions against a kernel build into a signed .lup.
    Build(patch::BuildArgs),
    /// Show what a .lup contains and whether its signature holds.
    Inspect {
        /// The patch.
        patch: PathBuf,
        /// Public key to check the signature with.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Live-patch a running VM's kernel: every function switches in one pause.
    Patch {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Replace every applied patch with this cumulative one.
        #[arg(long)]
        replace: bool,
        /// `consistent`: switch only when nothing is in the replaced code;
        /// `immediate`: when nothing is in the bytes being rewritten (calls
        /// already in old code finish there). Default: the patch's own.
        #[arg(long)]
        mode: Option<update_engine::lup::Mode>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The signed .lup.
        patch: PathBuf,
    },
    /// Revert an applied patch (its functions get their original code back).
    Revert {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Patch name.
        name: String,
    },
    /// Protect guest memory from the guest (write control): a byte range by
    /// guest-physical address, or a kernel symbol; writes to it are refused
    /// and reported (`lucos events`).
    Protect {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Name to release it by (without it, and without a range: list
        /// what is protected and the memory-slot layout).
        #[arg(long)]
        name: Option<String>,
        /// Guest-physical start (0x... or decimal).
        #[arg(long, value_parser = parse_u64)]
        gpa: Option<u64>,
        /// Length in bytes (default for a symbol: its size).
        #[arg(long, value_parser = parse_u64)]
        len: Option<u64>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Kernel text integrity: protect the kernel's text and read-only
        /// data; only its own text patching (Linux: text_poke) may write them.
        #[arg(long, conflicts_with_all = ["name", "gpa", "len", "symbol"])]
        kernel_text: bool,
        /// With --kernel-text: a function also allowed to write kernel text (repeatable).
        #[arg(long, requires = "kernel_text")]
        allow_writer: Vec<String>,
        /// A kernel symbol: NAME, NAME@FILE, NAME#N or 0xADDR (guest-virtual).
        symbol: Option<String>,
    },
    /// Release a range protected with `lucos protect`.
    Unprotect {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Its name.
        name: String,
    },
    /// Show the guest writes that write control refused (who, where, what).
    Events {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep printing new events until the VM ends.
        #[arg(long)]
        follow: bool,
        /// Machine-readable output (with --follow: one JSON object per line).
        #[arg(long)]
        json: bool,
    },
    /// List the guest kernel's loaded modules, read from guest memory (no
    /// agent): name, state, core memory, version; `--symbols M` also lists
    /// module M's symbols.
    Modules {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Also list this module's symbols.
        #[arg(long)]
        symbols: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the guest kernel's log, read from guest memory (no agent).
    Dmesg {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Only records from this sequence number on (`next` of an earlier answer).
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep printing new records until the VM ends.
        #[arg(long)]
        follow: bool,
        /// Machine-readable output (with --follow: one record per line).
        #[arg(long)]
        json: bool,
    },
    /// Check that the guest kernel's clock advances (read from guest memory).
    Alive {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// How long to wait for a tick, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's state.
    Status {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Pause every vCPU of a VM, wherever it is.
    Pause {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused VM.
    Resume {
        /// VM id.
        #[arg(long)]
        vm: String,
    },
    /// Stop a VM (its VMM process ends).
    Stop {
        /// VM id.
        #[arg(long)]
        vm: String,
    },
    /// Show a paused VM's vCPU registers.
    Regs {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// vCPU index.
        #[arg(long, default_value_t = 0)]
        vcpu: u8,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Find symbols of a running guest kernel (decoded from its memory) or a
    /// kernel file: by name, NAME@OBJECT_FILE, NAME#N, or address.
    Symbols(symbols::SymbolsArgs),
    /// Show struct layouts (members, offsets, sizes) from a kernel's DWARF.
    Types(symbols::TypesArgs),
    /// Hand a running VM to a new lucos binary (live VMM upgrade): the guest
    /// pauses for milliseconds, keeps its patches and protections, and runs
    /// on under the old VMM if the new one fails (docs/upgrade.md).
    Upgrade(upgrade::UpgradeArgs),
    /// Take a VM over from a VMM that hands it over (started by `upgrade`).
    #[command(hide = true)]
    Takeover(upgrade::TakeoverArgs),
    /// Roll patches over this host's VMs in waves, with health checks,
    /// rollback and a journal (docs/campaigns.md).
    #[command(subcommand)]
    Campaign(campaign::CampaignCmd),
    /// Boot the bundled test kernel, pause it mid-flight and show what each vCPU was doing.
    Demo {
        /// Keep the test kernel image here instead of a temporary file.
        #[arg(long)]
        kernel_out: Option<PathBuf>,
    },
}

/// A number in decimal or 0x-hexadecimal.
fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("'{s}' is not a number: {e}"))
}

fn main() {
    // A closed pipe (`lucos events --follow | head`) ends lucos quietly, as
    // it does any command-line tool, instead of a panic in println!.
    // SAFETY: resetting a signal's disposition to the default at start-up,
    // before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    logger::init();
    let cli = Cli::parse();
    let result: Result<i32, CliError> = match cli.cmd {
        Command::Run(args) => run::run(args),
        Command::List { vm: Some(vm), json } => patch::list_patches(&vm, json),
        Command::List { vm: None, json } => client::list(json).map(|()| exit::OK),
        Command::Keygen { out } => patch::keygen(&out),
        Command::Build(args) => patch::build(args),
        Command::Inspect { patch, key, json } => patch::inspect(&patch, json, key.as_deref()),
        Command::Patch {
            vm,
            replace,
            mode,
            json,
            patch,
        } => patch::patch(&vm, &patch, replace, mode, json),
        Command::Revert { vm, json, name } => patch::revert(&vm, &name, json),
        Command::Protect {
            vm,
            name,
            gpa,
            len,
            json,
            symbol,
            kernel_text,
            allow_writer,
        } => match name {
            _ if kernel_text => protect::protect_kernel(&vm, allow_writer, json),
            Some(name) => protect::protect(&vm, &name, gpa, symbol, len, json),
            None if gpa.is_none() && symbol.is_none() && len.is_none() => {
                protect::protected(&vm, json)
            }
            None => Err(CliError::Usage(
                "lucos protect: --name NAME is needed to protect a range".into(),
            )),
        },
        Command::Unprotect { vm, json, name } => protect::unprotect(&vm, &name, json),
        Command::Events {
            vm,
            since,
            follow,
            json,
        } => protect::events(&vm, since, follow, json),
        Command::Dmesg {
            vm,
            since,
            follow,
            json,
        } => dmesg::dmesg(&vm, since, follow, json),
        Command::Alive { vm, timeout, json } => dmesg::alive(&vm, timeout, json),
        Command::Modules { vm, symbols, json } => dmesg::modules(&vm, symbols, json),
        Command::Status { vm, json } => client::status(&vm, json).map(|()| exit::OK),
        Command::Pause { vm, json } => client::pause(&vm, json).map(|()| exit::OK),
        Command::Resume { vm } => {
            client::simple(&vm, vmm_core::control::Request::Resume, "resumed")
        }
        Command::Stop { vm } => client::simple(&vm, vmm_core::control::Request::Stop, "stopping"),
        Command::Regs { vm, vcpu, json } => client::regs(&vm, vcpu, json).map(|()| exit::OK),
        Command::Symbols(args) => symbols::symbols(args),
        Command::Types(args) => symbols::types(args),
        Command::Campaign(cmd) => campaign::campaign(cmd),
        Command::Upgrade(args) => upgrade::upgrade(args),
        Command::Takeover(args) => upgrade::takeover(args),
        Command::Demo { kernel_out } => demo::demo(kernel_out),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("lucos: error: {}", chain(&e));
            std::process::exit(e.exit_code());
        }
    }
}
