//! `lucos symbols` and `lucos types`: what symbol-db knows about a running
//! guest kernel or a kernel file.

use std::io::Write;
use std::path::PathBuf;

use serde_json::{json, Value};
use symbol_db::btf::Btf;
use symbol_db::dwarf::TypeDb;
use symbol_db::{KernelIdentity, SymbolError, SymbolTable};
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
            connect(vm)?.call(&Request::Symbols {
                queries: args.queries.clone(),
                all: args.all,
                source,
            })?
        }
        (None, Some(file)) => from_file(file, &args.queries, args.all)?,
        (None, None) => return Err(CliError::Usage("give --vm ID or --kernel FILE".into())),
    };
    report(&info, &args)
}

/// The same answer as the VMM gives, for a kernel file.
fn from_file(file: &std::path::Path, queries: &[String], all: bool) -> Result<Value, CliError> {
    let table = SymbolTable::from_file(file)?;
    let data = symbol_db::read_file(file)?;
    let identity = if data.starts_with(b"\x7fELF") {
        KernelIdentity::from_elf(&data, &file.display().to_string())?
    } else {
        KernelIdentity::default()
    };
    let answers: Vec<Value> = queries
        .iter()
        .map(|q| match table.answer(q) {
            Ok(a) => serde_json::to_value(a).unwrap_or(Value::Null),
            Err(e) => json!({ "query": q, "error": e.to_string() }),
        })
        .collect();
    let mut v = json!({
        "source": file.display().to_string(),
        "identity": identity,
        "count": table.len(),
        "answers": answers,
    });
    if all {
        v["symbols"] = serde_json::to_value(table.iter().collect::<Vec<_>>()).unwrap_or_default();
    }
    Ok(v)
}

fn report(info: &Value, args: &SymbolsArgs) -> Result<i32, CliError> {
    let answers = info["answers"].as_array().cloned().unwrap_or_default();
    let failed = answers.iter().filter(|a| a.get("error").is_some()).count();
    if args.json {
        if args.all {
            println!("{info}");
        } else {
            print_json(info);
        }
        return Ok(if failed > 0 { exit::ERROR } else { exit::OK });
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.all {
        for s in info["symbols"].as_array().into_iter().flatten() {
            let addr = s["addr"].as_str().unwrap_or("0x0");
            let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).unwrap_or(0);
            let _ = writeln!(
                out,
                "{addr:016x} {} {}",
                s["type"].as_str().unwrap_or("?"),
                s["name"].as_str().unwrap_or("")
            );
        }
    } else if answers.is_empty() {
        let s = |k: &str| info[k].as_str().unwrap_or("-").to_owned();
        let _ = writeln!(out, "source    {}", s("source"));
        let _ = writeln!(
            out,
            "version   {}",
            info["identity"]["version"].as_str().unwrap_or("-")
        );
        let _ = writeln!(
            out,
            "build-id  {}",
            info["identity"]["build_id"].as_str().unwrap_or("-")
        );
        if let Some(text) = info["text"].as_str() {
            let slide = info["slide"].as_i64().unwrap_or(0);
            let _ = writeln!(
                out,
                "_text     {text} (KASLR slide {}{:#x}), guest-physical {}",
                if slide < 0 { "-" } else { "+" },
                slide.unsigned_abs(),
                s("text_gpa")
            );
        }
        let _ = writeln!(out, "symbols   {}", info["count"]);
    }
    let mut errors = Vec::new();
    for a in &answers {
        match a.get("error") {
            Some(e) => errors.push(e.as_str().unwrap_or("?").to_owned()),
            None => match serde_json::from_value::<symbol_db::Answer>(a.clone()) {
                Ok(v) => {
                    let _ = writeln!(out, "{v}");
                }
                Err(_) => {
                    let _ = writeln!(out, "{a}");
                }
            },
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
