//! `lucos`: a VMM that live-updates the guest kernel from outside.

mod client;
mod demo;
mod error;
mod logger;
mod patch;
mod paths;
mod run;
mod server;
mod symbols;

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
    /// Boot the bundled test kernel, pause it mid-flight and show what each vCPU was doing.
    Demo {
        /// Keep the test kernel image here instead of a temporary file.
        #[arg(long)]
        kernel_out: Option<PathBuf>,
    },
}

fn main() {
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
            json,
            patch,
        } => patch::patch(&vm, &patch, replace, json),
        Command::Revert { vm, json, name } => patch::revert(&vm, &name, json),
        Command::Status { vm, json } => client::status(&vm, json).map(|()| exit::OK),
        Command::Pause { vm, json } => client::pause(&vm, json).map(|()| exit::OK),
        Command::Resume { vm } => {
            client::simple(&vm, vmm_core::control::Request::Resume, "resumed")
        }
        Command::Stop { vm } => client::simple(&vm, vmm_core::control::Request::Stop, "stopping"),
        Command::Regs { vm, vcpu, json } => client::regs(&vm, vcpu, json).map(|()| exit::OK),
        Command::Symbols(args) => symbols::symbols(args),
        Command::Types(args) => symbols::types(args),
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
