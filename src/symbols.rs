//! `lucos symbols` and `lucos types`: what symbol-db knows about a running
//! guest kernel or a kernel file.

use std::io::Write;
use std::path::PathBuf;

use symbol_db::btf::Btf;
use symbol_db::dwarf::TypeDb;
use symbol_db::{KernelIdentity, SymbolError, SymbolTable};
use update_engine::kernel::{SymbolAnswer, SymbolsInfo};
use vmm_core::control::Request;

use crate::client::{connect, print_json};
use crate::error::{exit, CliError};

/// Arguments of `lucos symbols`.
#[derive(Debug, clap::Args)]
pub struct SymbolsArgs {
    /// The VM whose running kernel to inspect (symbols decoded from its memory).
    #[arg(long, required_unless_present = "kernel", conflicts_with = "kernel")]
    vm: Option<String>,
    /// A kernel file instead: an ELF image (its symbol table, or the kallsyms
    /// inside a stripped vmlinux) or a System.map.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// With --vm: use this vmlinux or System.map of the running build; it is
    /// checked against the running kernel and refused if it is another build.
    #[arg(long, requires = "vm")]
    map: Option<PathBuf>,
    /// Print every symbol, in /proc/kallsyms format.
    #[arg(long)]
    all: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Lookups: NAME, NAME@OBJECT_FILE, NAME#N (N-th of that name) or 0xADDRESS.
    queries: Vec<String>,
}

/// What `lucos symbols` reports: the VMM's answer for a running kernel, or
/// the same fields for a kernel file.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Info {
    /// From a running guest (the VMM's typed answer).
    Vm(SymbolsInfo),
    /// From a file.
    File(FileInfo),
}

/// `lucos symbols --kernel FILE`: what a file says.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct FileInfo {
    source: String,
    identity: KernelIdentity,
    count: usize,
    answers: Vec<SymbolAnswer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    symbols: Option<Vec<symbol_db::Symbol>>,
}

impl Info {
    fn answers(&self) -> &[SymbolAnswer] {
        match self {
            Info::Vm(i) => &i.answers,
            Info::File(f) => &f.answers,
        }
    }
    fn symbols(&self) -> Option<&[symbol_db::Symbol]> {
        match self {
            Info::Vm(i) => i.symbols.as_deref(),
            Info::File(f) => f.symbols.as_deref(),
        }
    }
}

/// `lucos symbols`.
pub fn symbols(args: SymbolsArgs) -> Result<i32, CliError> {
    let info = match (&args.vm, &args.kernel) {
        (Some(vm), _) => {
            let source = match &args.map {
                Some(p) => Some(
                    std::fs::canonicalize(p)
                        .map_err(|e| CliError::io(format!("cannot read {}", p.display()), e))?
                        .display()
                        .to_string(),
                ),
                None => None,
            };
            Info::Vm(connect(vm)?.call_as::<SymbolsInfo>(&Request::Symbols {
                queries: args.queries.clone(),
                all: args.all,
                source,
            })?)
        }
        (None, Some(file)) => Info::File(from_file(file, &args.queries, args.all)?),
        (None, None) => return Err(CliError::Usage("give --vm ID or --kernel FILE".into())),
    };
    report(&info, &args)
}

/// The same answer as the VMM gives, for a kernel file.
fn from_file(file: &std::path::Path, queries: &[String], all: bool) -> Result<FileInfo, CliError> {
    let table = SymbolTable::from_file(file)?;
    let data = symbol_db::read_file(file)?;
    let identity = if data.starts_with(b"\x7fELF") {
        KernelIdentity::from_elf(&data, &file.display().to_string())?
    } else {
        KernelIdentity::default()
    };
    let answers = queries
        .iter()
        .map(|q| match table.answer(q) {
            Ok(a) => SymbolAnswer::Found(a),
            Err(e) => SymbolAnswer::Failed {
                query: q.clone(),
                error: e.to_string(),
            },
        })
        .collect();
    Ok(FileInfo {
        source: file.display().to_string(),
        identity,
        count: table.len(),
        answers,
        symbols: all.then(|| table.iter().cloned().collect()),
    })
}

fn report(info: &Info, args: &SymbolsArgs) -> Result<i32, CliError> {
    let answers = info.answers();
    let failed = answers
        .iter()
        .filter(|a| matches!(a, SymbolAnswer::Failed { .. }))
        .count();
    if args.json {
        let v = serde_json::to_value(info).unwrap_or(serde_json::Value::Null);
        if args.all {
            println!("{v}");
        } else {
            print_json(&v);
        }
        return Ok(if failed > 0 { exit::ERROR } else { exit::OK });
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.all {
        for s in info.symbols().into_iter().flatten() {
            let _ = writeln!(out, "{:016x} {} {}", s.addr, s.ty, s.name);
        }
    } else if answers.is_empty() {
        let (source, identity, count) = match info {
            Info::Vm(i) => (&i.source, &i.identity, i.count),
            Info::File(f) => (&f.source, &f.identity, f.count),
        };
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let _ = writeln!(out, "source    {source}");
        let _ = writeln!(out, "version   {}", or_dash(&identity.version));
        let _ = writeln!(out, "build-id  {}", or_dash(&identity.build_id));
        if let Info::Vm(i) = info {
            let _ = writeln!(
                out,
                "_text     {:#x} (KASLR slide {}{:#x}), guest-physical {:#x}",
                i.text,
                if i.slide < 0 { "-" } else { "+" },
                i.slide.unsigned_abs(),
                i.text_gpa
            );
        }
        let _ = writeln!(out, "symbols   {count}");
    }
    let mut errors = Vec::new();
    for a in answers {
        match a {
            SymbolAnswer::Failed { error, .. } => errors.push(error.clone()),
            SymbolAnswer::Found(v) => {
                let _ = writeln!(out, "{v}");
            }
        }
    }
    let _ = out.flush();
    drop(out);
    for e in errors {
        eprintln!("lucos: error: {e}");
    }
    Ok(if failed > 0 { exit::ERROR } else { exit::OK })
}

/// Arguments of `lucos types`.
#[derive(Debug, clap::Args)]
pub struct TypesArgs {
    /// Kernel ELF with DWARF debug info (the test kernel, a vmlinux with
    /// debug info), or with BTF (a distribution's stripped vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Struct names (without `struct`).
    #[arg(required = true)]
    structs: Vec<String>,
}

/// `lucos types`.
pub fn types(args: TypesArgs) -> Result<i32, CliError> {
    let data = symbol_db::read_file(&args.kernel)?;
    let path = args.kernel.display().to_string();
    let mut layouts = Vec::new();
    // DWARF where the image has it; otherwise the kernel's own BTF (what a
    // distribution's stripped vmlinux still carries).
    match TypeDb::from_elf(&data, &path) {
        Ok(db) => {
            for name in &args.structs {
                layouts.push(db.struct_layout(name)?);
            }
        }
        Err(SymbolError::NoDebugInfo(_)) if Btf::from_elf(&data, &path).is_ok() => {
            let btf = Btf::from_elf(&data, &path)?;
            for name in &args.structs {
                layouts.push(btf.struct_layout(name)?);
            }
        }
        Err(e) => return Err(e.into()),
    }
    if args.json {
        print_json(&serde_json::to_value(&layouts).unwrap_or_default());
        return Ok(exit::OK);
    }
    for l in layouts {
        println!(
            "struct {} {{ /* size {}, from {} */",
            l.name, l.size, l.unit
        );
        for m in &l.members {
            let size = m.size.map(|s| s.to_string()).unwrap_or_else(|| "?".into());
            let decl = match m.type_name.split_once('[') {
                Some((base, dims)) => format!("{base} {}[{dims}", m.name),
                None => format!("{} {}", m.type_name, m.name),
            };
            println!(
                "\t{:<40} /* offset {:>4}, size {:>4} */",
                format!("{decl};"),
                m.offset,
                size
            );
        }
        println!("}};");
    }
    Ok(exit::OK)
}
