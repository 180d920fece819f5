//! Live patching from the command line: keygen, build, inspect, patch,
//! revert, and the applied-patch list.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use symbol_db::fixups::CodeFixups;
use symbol_db::{KernelIdentity, KernelImage, SymbolTable};
use update_engine::lup::{key_hex, old_code_sha256, read_key_hex};
use update_engine::patcher::{PatchList, PatchReport, SwitchedFunction};
use update_engine::{FunctionPatch, Lup, Manifest, SigningKey, VerifyingKey};
use vmm_core::control::Request;

use crate::client::{connect, print_json};
use crate::error::{exit, CliError};

fn engine(e: update_engine::UpdateError) -> CliError {
    CliError::Other(crate::error::chain(&e))
}

/// Reads a public key file.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, CliError> {
    let bytes = read_key_hex(path).map_err(engine)?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| {
        CliError::Usage(format!(
            "{} is not an ed25519 public key: {e}",
            path.display()
        ))
    })
}

/// `lucos keygen --out KEY`: KEY (secret, mode 0600) and KEY.pub.
pub fn keygen(out: &Path) -> Result<i32, CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| CliError::io(format!("cannot create {}", out.display()), e))?;
    writeln!(f, "{}", key_hex(&key.to_bytes()))
        .map_err(|e| CliError::io(format!("cannot write {}", out.display()), e))?;
    let public = PathBuf::from(format!("{}.pub", out.display()));
    std::fs::write(
        &public,
        format!("{}\n", key_hex(&key.verifying_key().to_bytes())),
    )
    .map_err(|e| CliError::io(format!("cannot write {}", public.display()), e))?;
    println!(
        "secret key {} (keep it private), public key {}",
        out.display(),
        public.display()
    );
    Ok(exit::OK)
}

/// Arguments of `lucos build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The exact kernel build the patch is for: an ELF image (the test
    /// kernel, a vmlinux, or the vmlinux inside a bzImage; symbols from its
    /// symbol table or, stripped, its kallsyms).
    #[arg(long)]
    pub kernel: PathBuf,
    /// That kernel's kbuild tree (for Debian: the linux-headers package's
    /// /usr/src/linux-headers-RELEASE). Linux patches are compiled by kbuild
    /// with the kernel's own flags; without it, with the test kernel's.
    #[arg(long)]
    pub kbuild: Option<PathBuf>,
    /// Secret key from `lucos keygen`.
    #[arg(long, required_unless_present = "unsigned")]
    pub key: Option<PathBuf>,
    /// Write an unsigned patch (every VM refuses it; for tests of that refusal).
    #[arg(long)]
    pub unsigned: bool,
    /// Patch name (unique per VM; `lucos revert` takes it).
    #[arg(long)]
    pub name: String,
    /// What it fixes.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Patch version.
    #[arg(long, default_value_t = 1)]
    pub version: u32,
    /// A patch that must be applied first (repeatable).
    #[arg(long = "depends")]
    pub depends: Vec<String>,
    /// When the patch may switch: `consistent` (nothing in the replaced
    /// code) or `immediate` (nothing in the bytes being rewritten); `lucos
    /// patch --mode` overrides it.
    #[arg(long, default_value = "consistent")]
    pub mode: update_engine::lup::Mode,
    /// Replace only these kernel functions (NAME or NAME@OBJECT_FILE);
    /// default: every function the sources define that the kernel has.
    #[arg(long = "function")]
    pub functions: Vec<String>,
    /// A kernel object whose layout the patch changes: SYMBOL:STRUCT (a
    /// global `struct STRUCT` or an array of them; repeatable). The old
    /// layout comes from the kernel's DWARF or BTF, the new one from the
    /// patch's; the transfer between them is derived member by member.
    #[arg(long = "data", value_name = "SYMBOL:STRUCT")]
    pub data: Vec<String>,
    /// The value a member the patch adds starts at: SYMBOL.MEMBER=VALUE
    /// (default 0; repeatable).
    #[arg(long = "init", value_name = "SYMBOL.MEMBER=VALUE")]
    pub init: Vec<String>,
    /// Accept narrowing an integer member (values are truncated):
    /// SYMBOL.MEMBER (repeatable).
    #[arg(long = "narrow", value_name = "SYMBOL.MEMBER")]
    pub narrow: Vec<String>,
    /// Move the kernel data that points into SYMBOL (a `--data` object: a
    /// sysctl table's `.data`, say) to the new copy while the patch is
    /// applied, and back at revert (repeatable). Without it such pointers
    /// keep the old copy in use: the change never retires. Code that
    /// follows them must accept the new layout at the address they point to.
    #[arg(long = "repoint", value_name = "SYMBOL")]
    pub repoint: Vec<String>,
    /// A module of the target build (its `.ko` from the kernel package)
    /// whose functions the sources replace (repeatable): a source whose
    /// functions the module defines is linked against that module in the
    /// guest. Other sources replace vmlinux functions.
    #[arg(long = "module", value_name = "MODULE.ko", conflicts_with = "data")]
    pub modules: Vec<PathBuf>,
    /// Output `.lup`.
    #[arg(long, short)]
    pub out: PathBuf,
    /// A source diff (unified, `patch -p1` style) to build the patch from,
    /// instead of replacement functions: the objects it changes are built
    /// as they are and as patched in --source, and diffed.
    #[arg(long, requires = "source", conflicts_with_all = ["sources", "kbuild"])]
    pub diff: Option<PathBuf>,
    /// The running kernel's prepared kbuild tree, for --diff
    /// (guest-kernels/linux/fetch-source.sh prepares Debian's).
    #[arg(long, requires = "diff")]
    pub source: Option<PathBuf>,
    /// Print what was built as JSON (for --diff).
    #[arg(long)]
    pub json: bool,
    /// C sources holding the replacement functions.
    #[arg(required_unless_present = "diff")]
    pub sources: Vec<PathBuf>,
}

/// Compiles each source into `tmp`: with kbuild (`make -C KBUILD M=tmp
/// NAME.o`, the kernel's exact flags, objtool included, lucos's
/// patch-include headers first) for Linux, or with
/// the test kernel's flags. Returns (stem, object path) per source.
fn compile(args: &BuildArgs, tmp: &Path) -> Result<Vec<(String, PathBuf)>, CliError> {
    let mut objs = Vec::new();
    for src in &args.sources {
        let stem = src
            .file_stem()
            .map(|s| {
                s.to_string_lossy()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            })
            .unwrap_or_else(|| "patch".into());
        if objs.iter().any(|(s, _)| s == &stem) {
            return Err(CliError::Usage(format!(
                "two sources are named {stem}: object files would collide"
            )));
        }
        objs.push((stem.clone(), tmp.join(format!("{stem}.o"))));
        if args.kbuild.is_some() {
            std::fs::copy(src, tmp.join(format!("{stem}.c")))
                .map_err(|e| CliError::io(format!("cannot read {}", src.display()), e))?;
        }
    }
    let failed = |what: String, out: &std::process::Output| {
        CliError::Other(format!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    if let Some(kbuild) = &args.kbuild {
        let list: Vec<String> = objs.iter().map(|(s, _)| format!("{s}.o")).collect();
        std::fs::write(tmp.join("Kbuild"), format!("obj-m := {}\n", list.join(" ")))
            .map_err(|e| CliError::io("cannot write the Kbuild file".into(), e))?;
        // Patch code is built like `lucos build --diff`'s: static branches
        // read their key, WARN calls __warn (no jump or bug tables).
        let include = crate::build_diff::write_patch_include(&tmp.join(".lucos-include"))?;
        let out = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(kbuild)
            .arg(format!("M={}", tmp.display()))
            .arg(format!("NOSTDINC_FLAGS=-nostdinc -I{}", include.display()))
            .args(&list)
            .output()
            .map_err(|e| {
                CliError::io("cannot run make (scripts/setup.sh installs it)".into(), e)
            })?;
        if !out.status.success() {
            return Err(failed(format!("kbuild in {}", kbuild.display()), &out));
        }
        return Ok(objs);
    }
    let flags = env!("LUCOS_TESTKERNEL_PATCH_CFLAGS");
    for (src, (_, obj)) in args.sources.iter().zip(&objs) {
        let out = Command::new("gcc")
            .args(flags.split_whitespace())
            .arg("-c")
            .arg(src)
            .arg("-o")
            .arg(obj)
            .output()
            .map_err(|e| CliError::io("cannot run gcc (scripts/setup.sh installs it)".into(), e))?;
        if !out.status.success() {
            return Err(failed(format!("compiling {}", src.display()), &out));
        }
    }
    Ok(objs)
}

/// The replacement of module `m`'s function `old` by `new` of `object`:
/// its size and hash from the `.ko`, with every relocated field and
/// rewritten site masked.
fn module_function(
    m: &symbol_db::module::ModuleObject,
    old: &str,
    new: &str,
    object: &str,
) -> Result<FunctionPatch, CliError> {
    let f = match m.functions_named(old).as_slice() {
        [f] => (*f).clone(),
        [] => {
            return Err(CliError::Refused(format!(
                "module {} has no function {old}",
                m.name
            )))
        }
        _ => {
            return Err(CliError::Usage(format!(
                "module {} has more than one function named {old}: lucos cannot tell which \
                 one to replace",
                m.name
            )))
        }
    };
    let code = m.code(&f).ok_or_else(|| {
        CliError::Other(format!("{}: {} lies outside its section", m.name, f.name))
    })?;
    let old_masked = m.masked(&f);
    let old_sha256 = old_code_sha256(code, &old_masked, &[], 0).map_err(CliError::Other)?;
    Ok(FunctionPatch {
        old: f.name.clone(),
        old_file: None,
        old_size: f.size,
        old_sha256,
        old_masked,
        old_relocs: Vec::new(),
        new: new.to_owned(),
        new_object: Some(object.to_owned()),
        module: Some(m.name.clone()),
    })
}

/// A part of a function GCC moved out of line (`NAME.cold`): reached only
/// by jumps from its function, in that function's frame, so never replaced
/// on its own (the replacement's own part goes with it).
fn is_fragment(name: &str) -> bool {
    name.contains(".cold")
}

/// The `--module` files: each a module of the target build (its vermagic
/// names the target's release), with a build-id.
fn read_modules(
    paths: &[PathBuf],
    target: &KernelIdentity,
) -> Result<Vec<symbol_db::module::ModuleObject>, CliError> {
    // "Linux version RELEASE (...": the release a module's vermagic starts with.
    let release = target
        .version
        .as_deref()
        .and_then(|v| v.strip_prefix("Linux version "))
        .and_then(|v| v.split_whitespace().next());
    let mut out: Vec<symbol_db::module::ModuleObject> = Vec::new();
    for p in paths {
        let m = symbol_db::module::ModuleObject::from_file(p)?;
        let Some(release) = release else {
            return Err(CliError::Usage(format!(
                "{}: --module is for Linux kernels, and the kernel has no Linux banner",
                p.display()
            )));
        };
        let built_for = m
            .vermagic
            .as_deref()
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("?");
        if built_for != release {
            return Err(CliError::Usage(format!(
                "{}: module {} was built for kernel {built_for}, the patch targets {release}",
                p.display(),
                m.name
            )));
        }
        if m.build_id.is_none() {
            return Err(CliError::Usage(format!(
                "{}: module {} has no build-id; a patch must name the exact build it is for",
                p.display(),
                m.name
            )));
        }
        if out.iter().any(|o| o.name == m.name) {
            return Err(CliError::Usage(format!("module {} given twice", m.name)));
        }
        out.push(m);
    }
    Ok(out)
}

/// `lucos build`: compile replacement functions with the target kernel's
/// flags and package them as a signed `.lup`.
pub fn build(args: BuildArgs) -> Result<i32, CliError> {
    let kname = args.kernel.display().to_string();
    let kdata = symbol_db::read_file(&args.kernel)?;
    let ksyms = SymbolTable::from_kernel_elf(&kdata, &kname)?;
    let image = KernelImage::from_elf_bytes(&kdata, &kname)?;
    let fixups = CodeFixups::from_elf_bytes(&kdata, &kname, &image, &ksyms)?;
    let target = KernelIdentity::from_elf(&kdata, &kname)?;
    if target.build_id.is_none() {
        return Err(CliError::Usage(format!(
            "{kname} has no build-id; a patch must name the exact build it is for"
        )));
    }
    if args.kbuild.is_none()
        && args.diff.is_none()
        && target
            .version
            .as_deref()
            .is_some_and(|v| v.starts_with("Linux version"))
    {
        return Err(CliError::Usage(format!(
            "{kname} is a Linux kernel: give --kbuild with its kbuild tree (linux-headers) so the \
             patch is compiled with the kernel's own flags"
        )));
    }
    let modules = read_modules(&args.modules, &target)?;
    // From a diff: the objects it changed, and which functions they replace.
    let from_diff = match (&args.diff, &args.source) {
        (Some(diff), Some(tree)) => {
            let banner = target.version.clone().unwrap_or_default();
            // Objects whose layout the patch changes may differ in the diff.
            let layout_changed: Vec<String> = args
                .data
                .iter()
                .filter_map(|d| d.split(':').next().map(str::to_owned))
                .collect();
            let built = crate::build_diff::build(
                diff,
                tree,
                &banner,
                &ksyms,
                Some(&image),
                &modules,
                &layout_changed,
            )?;
            if !args.json {
                for (step, secs) in &built.steps {
                    eprintln!("lucos build: {step}: {secs:.2} s");
                }
            }
            Some(built)
        }
        _ => None,
    };
    let tmp = std::env::temp_dir().join(format!("lucos-build-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)
        .map_err(|e| CliError::io("cannot create a build directory".into(), e))?;
    // (stem, object bytes) per source; the build directory goes either way.
    let compiled = if let Some(built) = &from_diff {
        Ok(built
            .objects
            .iter()
            .map(|(name, d)| {
                (
                    name.strip_suffix(".o").unwrap_or(name).to_owned(),
                    d.object.clone(),
                )
            })
            .collect())
    } else {
        compile(&args, &tmp).and_then(|objs| {
            objs.into_iter()
                .map(|(stem, obj)| {
                    std::fs::read(&obj)
                        .map(|data| (stem, data))
                        .map_err(|e| CliError::io(format!("cannot read {}", obj.display()), e))
                })
                .collect::<Result<Vec<_>, _>>()
        })
    };
    let _ = std::fs::remove_dir_all(&tmp);
    let mut module_targets: Vec<update_engine::lup::ModuleTarget> = Vec::new();
    let mut objects = Vec::new();
    let mut functions = Vec::new();
    for (stem, data) in compiled? {
        // Replacement functions: those the object defines that the kernel has.
        let osyms = SymbolTable::from_elf_bytes(&data, &format!("{stem}.o"))?;
        // From a diff: the functions it changed (not those it adds or pulls
        // in), each with its reference in the running kernel.
        let diff_wanted: Option<Vec<(String, String)>> = from_diff.as_ref().map(|b| {
            b.objects
                .iter()
                .filter(|(n, _)| n.strip_suffix(".o") == Some(stem.as_str()))
                .flat_map(|(_, d)| {
                    d.changed.iter().map(|c| {
                        let r = d.references.get(&c.0).cloned().unwrap_or(c.0.clone());
                        (c.0.clone(), r)
                    })
                })
                .collect()
        });
        let object = format!("{stem}.o");
        // Functions of a module: this object is linked against it.
        let mut target_module: Option<&symbol_db::module::ModuleObject> = None;
        // From a diff, an object built into a module: the functions it changed.
        if let (Some(b), Some(wanted)) = (&from_diff, &diff_wanted) {
            if let Some((_, name)) = b.module_of.iter().find(|(o, _)| *o == object) {
                let m = modules
                    .iter()
                    .find(|m| &m.name == name)
                    .ok_or_else(|| CliError::Other(format!("module {name} went missing")))?;
                target_module = Some(m);
                for (new, reference) in wanted {
                    functions.push(module_function(m, reference, new, &object)?);
                }
            }
        }
        for s in osyms
            .iter()
            .filter(|s| s.kind == symbol_db::SymbolKind::Function && !is_fragment(&s.name))
            .filter(|_| from_diff.is_none())
        {
            let wanted = args.functions.is_empty()
                || args
                    .functions
                    .iter()
                    .any(|f| f.split('@').next() == Some(s.name.as_str()));
            let owners: Vec<&symbol_db::module::ModuleObject> = modules
                .iter()
                .filter(|m| !m.functions_named(&s.name).is_empty())
                .collect();
            let m = match owners.as_slice() {
                [] => continue,
                [m] => *m,
                [a, b, ..] => {
                    return Err(CliError::Usage(format!(
                        "{} is a function of both {} and {}: give only the module it replaces",
                        s.name, a.name, b.name
                    )))
                }
            };
            if !wanted {
                continue;
            }
            if let Some(t) = target_module.filter(|t| t.name != m.name) {
                return Err(CliError::Usage(format!(
                    "{stem}: replaces functions of both {} and {}: put each module's \
                     functions in a source of its own",
                    t.name, m.name
                )));
            }
            target_module = Some(m);
            functions.push(module_function(m, &s.name, &s.name, &object)?);
        }
        if let (Some(m), None) = (target_module, &from_diff) {
            // Its other functions would be linked against the module: a
            // vmlinux replacement among them would be dropped silently.
            if let Some(v) = osyms.iter().find(|s| {
                s.kind == symbol_db::SymbolKind::Function
                    && !is_fragment(&s.name)
                    && m.functions_named(&s.name).is_empty()
                    && !ksyms.all_named(&s.name).is_empty()
                    && (args.functions.is_empty()
                        || args
                            .functions
                            .iter()
                            .any(|f| f.split('@').next() == Some(s.name.as_str())))
            }) {
                return Err(CliError::Usage(format!(
                    "{stem}: {} is a vmlinux function, and the source replaces functions of \
                     module {}: put vmlinux's replacements in a source of their own",
                    v.name, m.name
                )));
            }
        }
        if let Some(m) = target_module {
            let build_id = m.build_id.clone().unwrap_or_default();
            match module_targets.iter_mut().find(|t| t.name == m.name) {
                Some(t) => t.objects.push(object.clone()),
                None => module_targets.push(update_engine::lup::ModuleTarget {
                    name: m.name.clone(),
                    build_id,
                    objects: vec![object.clone()],
                }),
            }
            objects.push((object, data));
            continue;
        }
        for s in osyms
            .iter()
            .filter(|s| s.kind == symbol_db::SymbolKind::Function && !is_fragment(&s.name))
        {
            let diff_ref = match &diff_wanted {
                Some(w) => match w.iter().find(|(n, _)| *n == s.name) {
                    Some((_, r)) => Some(r.clone()),
                    None => continue,
                },
                None => None,
            };
            let wanted = args.functions.is_empty()
                || args
                    .functions
                    .iter()
                    .any(|f| f.split('@').next() == Some(s.name.as_str()));
            if !wanted || ksyms.all_named(&s.name).is_empty() {
                continue;
            }
            let spec = args
                .functions
                .iter()
                .find(|f| f.split('@').next() == Some(s.name.as_str()))
                .cloned()
                .unwrap_or_else(|| s.name.clone());
            let old = match &diff_ref {
                Some(r) => ksyms.reference(r)?.clone(),
                None => ksyms.answer(&spec)?.symbol,
            };
            let bytes = image.read(old.addr, old.size as usize).ok_or_else(|| {
                CliError::Other(format!(
                    "{} lies outside {kname}'s loadable segments",
                    old.name
                ))
            })?;
            // Sites the kernel rewrites itself are masked; KASLR-relocated
            // addresses are recorded so the VMM can undo the slide.
            let (old_masked, old_relocs) = fixups.within(old.addr, old.size);
            let old_sha256 =
                old_code_sha256(bytes, &old_masked, &old_relocs, 0).map_err(CliError::Other)?;
            functions.push(FunctionPatch {
                // From a diff, a namesake by its position: `name#N`.
                old: diff_ref.clone().unwrap_or_else(|| old.name.clone()),
                old_file: if ksyms.all_named(&old.name).len() > 1 {
                    old.file.clone()
                } else {
                    None
                },
                old_size: old.size,
                old_sha256,
                old_masked,
                old_relocs,
                new: s.name.clone(),
                new_object: Some(format!("{stem}.o")),
                module: None,
            });
        }
        objects.push((format!("{stem}.o"), data));
    }
    if functions.is_empty() {
        return Err(CliError::Usage(
            "the sources define no function the kernel has: nothing to replace".into(),
        ));
    }
    if !args.data.is_empty() && !module_targets.is_empty() {
        return Err(CliError::Usage(
            "a patch of modules cannot also change data layouts (not supported yet)".into(),
        ));
    }
    // New layouts: from the patch's objects, or from a diff, from its
    // patched builds (the patch objects a diff makes carry no DWARF).
    let types: Vec<(String, Vec<u8>)> = match &from_diff {
        Some(b) => b.patched.clone(),
        None => Vec::new(),
    };
    let data = data_changes(
        &args,
        (&kdata, &kname),
        (&ksyms, &image),
        &objects,
        &types,
        &functions,
    )?;
    let manifest = Manifest {
        name: args.name.clone(),
        description: args.description.clone(),
        version: args.version,
        target,
        functions,
        depends: args.depends.clone(),
        objects: objects.iter().map(|(n, _)| n.clone()).collect(),
        mode: args.mode,
        data,
        modules: module_targets,
    };
    let key = match (&args.key, args.unsigned) {
        (_, true) => None,
        (Some(k), false) => Some(SigningKey::from_bytes(&read_key_hex(k).map_err(engine)?)),
        (None, false) => return Err(CliError::Usage("give --key (or --unsigned)".into())),
    };
    // The types are read: the objects go without their DWARF (what every
    // apply reads, hashes and checks the signature of).
    let objects = objects
        .into_iter()
        .map(|(n, d)| match update_engine::lup::strip_debug(&d) {
            Some(s) => (n, s),
            None => (n, d),
        })
        .collect();
    let lup = Lup::new(manifest, objects, key.as_ref());
    std::fs::write(&args.out, lup.to_bytes())
        .map_err(|e| CliError::io(format!("cannot write {}", args.out.display()), e))?;
    if args.json {
        #[derive(serde::Serialize)]
        struct Step<'a> {
            step: &'a str,
            seconds: f64,
        }
        #[derive(serde::Serialize)]
        struct Object<'a> {
            object: &'a str,
            #[serde(flatten)]
            diff: &'a update_engine::diffobj::ObjectDiff,
        }
        #[derive(serde::Serialize)]
        struct Built<'a> {
            out: String,
            name: &'a str,
            build_id: Option<&'a str>,
            signed: bool,
            functions: Vec<&'a str>,
            objects: Vec<Object<'a>>,
            steps: Vec<Step<'a>>,
        }
        print_typed(&Built {
            out: args.out.display().to_string(),
            name: &lup.manifest.name,
            build_id: lup.manifest.target.build_id.as_deref(),
            signed: key.is_some(),
            functions: lup
                .manifest
                .functions
                .iter()
                .map(|f| f.old.as_str())
                .collect(),
            objects: from_diff
                .iter()
                .flat_map(|b| b.objects.iter())
                .map(|(object, diff)| Object { object, diff })
                .collect(),
            steps: from_diff
                .iter()
                .flat_map(|b| b.steps.iter())
                .map(|(step, seconds)| Step {
                    step,
                    seconds: *seconds,
                })
                .collect(),
        });
        return Ok(exit::OK);
    }
    if let Some(built) = &from_diff {
        for (object, d) in &built.objects {
            for (f, why) in &d.changed {
                println!("{object}: replaces {f} ({why})");
            }
            for f in &d.added {
                println!("{object}: adds {f} (new in the diff)");
            }
            for f in &d.line_shifted {
                println!("{object}: leaves {f} (only line numbers moved)");
            }
            for (f, why) in &d.pulled_in {
                println!("{object}: places {f} ({why})");
            }
            for s in &d.data {
                let what = if s == ".altinstr_aux" {
                    "the out-of-line CPU-feature tests of its alternatives"
                } else {
                    "read-only data changed code uses"
                };
                println!("{object}: places {s} ({what})");
            }
            for s in &d.own_data {
                println!("{object}: places {s} (a variable the diff adds: the patch's own data)");
            }
            if d.extable_entries > 0 {
                println!(
                    "{object}: carries {} exception-table entr{} (made known to the kernel \
                     through lucos's exception index)",
                    d.extable_entries,
                    if d.extable_entries == 1 { "y" } else { "ies" }
                );
            }
        }
    }
    println!(
        "{}: patch '{}' for {} ({} function{}: {}){}",
        args.out.display(),
        lup.manifest.name,
        lup.manifest.target.build_id.as_deref().unwrap_or("?"),
        lup.manifest.functions.len(),
        if lup.manifest.functions.len() == 1 {
            ""
        } else {
            "s"
        },
        lup.manifest
            .functions
            .iter()
            .map(|f| f.old.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if key.is_none() { ", UNSIGNED" } else { "" }
    );
    Ok(exit::OK)
}

/// Refuses a patch whose code calls a kernel function it does not replace
/// that takes or returns a `struct TYPE *` of a struct whose layout it
/// changes: the kernel's function has the old layout compiled in, so it
/// would read the new copy as the old one (or hand the patch's code the
/// old copy as a new one).
fn unreplaced_callees(
    objects: &[(String, Vec<u8>)],
    spec: &str,
    type_name: &str,
) -> Result<(), CliError> {
    let pointer = format!("struct {type_name} *");
    let is_pointer = |t: &str| {
        t.trim_start_matches("const ")
            .trim_start_matches("volatile ")
            .trim_start_matches("const ")
            == pointer
    };
    // (A function another object of the patch defines is the patch's.)
    let defined: std::collections::BTreeSet<String> = objects
        .iter()
        .flat_map(|(_, d)| update_engine::diffobj::defined_symbols(d))
        .collect();
    for (name, data) in objects {
        let Ok(db) = symbol_db::dwarf::TypeDb::from_elf(data, name) else {
            continue;
        };
        let called = update_engine::diffobj::undefined_symbols(data);
        for (f, returns, params) in db.declared_functions().unwrap_or_default() {
            if !called.contains(&f) || defined.contains(&f) {
                continue;
            }
            let what = match params.iter().position(|p| is_pointer(p)) {
                Some(n) => format!("passes it a {pointer} (parameter {})", n + 1),
                None if is_pointer(&returns) => format!("takes a {pointer} from it"),
                None => continue,
            };
            return Err(CliError::Usage(format!(
                "--data {spec}: the patch's code calls {f}, which it does not replace, and \
                 {what}: the kernel's {f} has the old layout compiled in; replace {f} in the \
                 patch too"
            )));
        }
    }
    Ok(())
}

/// The `--data` changes: each object's old layout (the kernel's DWARF, or
/// its BTF) and new one (the patch objects' DWARF), the transfer derived
/// between them, and the kernel functions left using the old copy.
fn data_changes(
    args: &BuildArgs,
    (kdata, kname): (&[u8], &str),
    (ksyms, image): (&SymbolTable, &KernelImage),
    objects: &[(String, Vec<u8>)],
    types: &[(String, Vec<u8>)],
    functions: &[FunctionPatch],
) -> Result<Vec<update_engine::data::DataChange>, CliError> {
    use update_engine::data::{data_pointers, derive, users_of, Declared};
    let mut out = Vec::new();
    let member_arg = |flag: &str, v: &str| -> Result<(String, String), CliError> {
        v.split_once('.')
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .ok_or_else(|| CliError::Usage(format!("--{flag} {v}: give SYMBOL.MEMBER")))
    };
    // Init code and data are freed once the kernel is up: what they use
    // does not count.
    let range = |a: &str, b: &str| -> Option<(u64, u64)> {
        Some((ksyms.lookup(a).ok()?.addr, ksyms.lookup(b).ok()?.addr))
    };
    let init = range("__init_begin", "__init_end");
    let text = range("_stext", "_etext");
    let all_functions: Vec<(String, u64, u64)> = ksyms
        .iter()
        .filter(|s| s.kind == symbol_db::SymbolKind::Function && s.size > 0)
        .filter(|s| !init.is_some_and(|(a, b)| s.addr >= a && s.addr < b))
        .map(|s| (s.name.clone(), s.addr, s.size))
        .collect();
    let skip: Vec<(u64, u64)> = [init, text].into_iter().flatten().collect();
    for r in &args.repoint {
        if !args.data.iter().any(|d| d.split(':').next() == Some(r)) {
            return Err(CliError::Usage(format!(
                "--repoint {r}: {r} is not an object the patch changes (give --data {r}:STRUCT)"
            )));
        }
    }
    for spec in &args.data {
        let (symbol, type_spec) = spec.split_once(':').ok_or_else(|| {
            CliError::Usage(format!(
                "--data {spec}: give SYMBOL:STRUCT or SYMBOL:STRUCT*COUNT (stats_table:task_stat)"
            ))
        })?;
        // STRUCT*COUNT: an array of COUNT, said explicitly.
        let (type_name, given) = match type_spec.split_once('*') {
            Some((t, n)) => (
                t,
                Some(n.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    CliError::Usage(format!("--data {spec}: {n} is not a count"))
                })?),
            ),
            None => (type_spec, None),
        };
        let mut declared = Declared::default();
        for v in &args.init {
            let (target, value) = v
                .split_once('=')
                .ok_or_else(|| CliError::Usage(format!("--init {v}: give SYMBOL.MEMBER=VALUE")))?;
            let (sym, member) = member_arg("init", target)?;
            let value: i64 = parse_int(value)
                .ok_or_else(|| CliError::Usage(format!("--init {v}: {value} is not a number")))?;
            if sym == symbol {
                declared.init.push((member, value));
            }
        }
        for v in &args.narrow {
            let (sym, member) = member_arg("narrow", v)?;
            if sym == symbol {
                declared.narrow.push(member);
            }
        }
        declared.c = c_transfer(symbol, objects)?;
        let sym = ksyms.answer(symbol)?.symbol;
        // A per-CPU variable's symbol is the template each CPU's copy was
        // made from; code reaches its own copy through %gs.
        if range("__per_cpu_start", "__per_cpu_end")
            .is_some_and(|(a, b)| a != b && sym.addr >= a && sym.addr < b)
        {
            return Err(CliError::Usage(format!(
                "--data {spec}: {symbol} is a per-CPU variable (each CPU has a copy of its own, \
                 reached through %gs): lucos cannot give it a new layout"
            )));
        }
        let old = match symbol_db::dwarf::TypeDb::from_elf(kdata, kname) {
            Ok(db) => db.struct_layout(type_name)?,
            Err(_) => {
                let btf = symbol_db::btf::Btf::from_elf(kdata, kname)?;
                let all = btf.struct_layouts(type_name);
                if all.len() > 1 {
                    return Err(CliError::Usage(format!(
                        "--data {spec}: the kernel has {} different struct {type_name} (file-local \
                         structs of one name, sizes {}): lucos cannot tell which one {symbol} is",
                        all.len(),
                        all.iter()
                            .map(|l| l.size.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                btf.struct_layout(type_name)?
            }
        };
        // The patch code must use the object (else the change would only
        // trap the kernel's writes, forever), by name or, with --repoint,
        // through the kernel words moved to the new copy.
        let uses =
            |data: &Vec<u8>| update_engine::diffobj::undefined_symbols(data).contains(symbol);
        if !args.repoint.iter().any(|r| r == symbol) && !objects.iter().any(|(_, d)| uses(d)) {
            return Err(CliError::Usage(format!(
                "--data {spec}: the patch's code does not use {symbol}"
            )));
        }
        // From a diff: the object as its patched build defines it (its
        // DWARF first, its size and initial value).
        let defined = types.iter().find_map(|(name, data)| {
            update_engine::diffobj::defined_data(data, symbol).map(|d| (name, data, d))
        });
        // The new layout is the one the code using the object has (the
        // diff's defining object first); other objects may have a struct
        // of that name of their own.
        let users: Vec<(&String, &Vec<u8>)> = objects
            .iter()
            .chain(types)
            .filter(|(_, d)| uses(d))
            .map(|(n, d)| (n, d))
            .collect();
        let candidates: Vec<(&String, &Vec<u8>)> = if users.is_empty() {
            objects.iter().chain(types).map(|(n, d)| (n, d)).collect()
        } else {
            users
        };
        let layouts: Vec<(&String, symbol_db::dwarf::StructLayout)> = defined
            .iter()
            .map(|(name, data, _)| (*name, *data))
            .chain(candidates)
            .filter_map(|(name, data)| {
                symbol_db::dwarf::TypeDb::from_elf(data, name)
                    .ok()
                    .and_then(|db| db.struct_layout(type_name).ok())
                    .map(|l| (name, l))
            })
            .collect();
        // Every object of the patch that uses the object has the new
        // layout (one compiled against the old header would use the old).
        let same = |a: &symbol_db::dwarf::StructLayout, b: &symbol_db::dwarf::StructLayout| {
            a.size == b.size && a.members == b.members
        };
        if let Some((other, _)) = layouts.iter().find(|(_, l)| !same(l, &layouts[0].1)) {
            return Err(CliError::Usage(format!(
                "--data {spec}: the patch's objects lay struct {type_name} out differently ({} \
                 and {other}): all of its code must use the new layout",
                layouts[0].0
            )));
        }
        let new = layouts.into_iter().map(|(_, l)| l).next().ok_or_else(|| {
            CliError::Usage(format!(
                "--data {spec}: the patch's sources do not use struct {type_name} (no DWARF \
                     for it in their objects): the new code must define and use the new layout"
            ))
        })?;
        unreplaced_callees(objects, spec, type_name)?;
        // From kallsyms a size is the distance to the next symbol: it may
        // include the padding after the object.
        if old.size == 0 || sym.size == 0 {
            return Err(CliError::Usage(format!(
                "--data {spec}: {symbol} or struct {type_name} has no size"
            )));
        }
        // From kallsyms a size is the distance to the next symbol: it may
        // include padding, so the count is 1 unless given (or unless only
        // an array fits the size).
        let count = match given {
            Some(n) if n * old.size > sym.size => {
                return Err(CliError::Usage(format!(
                    "--data {spec}: {n} x {} bytes do not fit in {symbol} ({} bytes)",
                    old.size, sym.size
                )))
            }
            Some(n) if !ksyms.sizes_estimated() && n * old.size != sym.size => {
                return Err(CliError::Usage(format!(
                    "--data {spec}: {symbol} is {} bytes, not {n} x {}",
                    sym.size, old.size
                )))
            }
            Some(n) => n,
            None if ksyms.sizes_estimated() && sym.size < 2 * old.size => 1,
            None if ksyms.sizes_estimated() => {
                return Err(CliError::Usage(format!(
                    "--data {spec}: kallsyms gives no sizes and {symbol}'s {} bytes to the next \
                     symbol could hold up to {} struct {type_name}: give SYMBOL:STRUCT*COUNT",
                    sym.size,
                    sym.size / old.size
                )))
            }
            None if sym.size % old.size != 0 => {
                return Err(CliError::Usage(format!(
                    "--data {spec}: {symbol} is {} bytes, not a whole number of struct \
                     {type_name} ({} bytes)",
                    sym.size, old.size
                )))
            }
            None => sym.size / old.size,
        };
        if count * old.size != sym.size {
            eprintln!(
                "note: {symbol}: {} bytes to the next symbol (kallsyms gives no sizes), taken \
                 as {count} struct {type_name} of {} bytes",
                sym.size, old.size
            );
        }
        // A diff whose changed objects do not define it (its file has no
        // other change) gives no length or start values to check.
        if !types.is_empty() && defined.is_none() {
            return Err(CliError::Usage(format!(
                "--data {spec}: the diff changes no function of the file defining {symbol}: \
                 lucos cannot check its new length and start values (change its users in the \
                 same file, or write the patch by hand)"
            )));
        }
        if let Some((name, _, (size, bytes, relocated))) = &defined {
            // A layout change, not a length change: the new copy holds as
            // many elements as the running object.
            if *size != count * new.size {
                return Err(CliError::Usage(format!(
                    "--data {spec}: the diff makes {symbol} {size} bytes ({name}), but the \
                     running kernel's {count} x struct {type_name} become {} bytes: lucos \
                     changes an object's layout, not its number of elements",
                    count * new.size
                )));
            }
            // An added member's start value: the diff's initializer, unless
            // --init gives one (existing members keep their running value).
            let given: Vec<String> = declared.init.iter().map(|(n, _)| n.clone()).collect();
            for m in new.members.iter().filter(|m| {
                !old.members.iter().any(|o| o.name == m.name) && !given.contains(&m.name)
            }) {
                let at = |i: u64| -> Option<&[u8]> {
                    let from = (i * new.size + m.offset) as usize;
                    bytes.get(from..from + m.size? as usize)
                };
                // An address (a relocation fills it) is not a start value.
                let filled = (0..count).any(|i| {
                    let from = i * new.size + m.offset;
                    let to = from + m.size.unwrap_or(0);
                    relocated.iter().any(|&r| r + 8 > from && r < to)
                });
                if filled {
                    return Err(CliError::Usage(format!(
                        "--data {spec}: the diff starts added member {} with an address: lucos \
                         starts added members with numbers only (set it in code)",
                        m.name
                    )));
                }
                let first = at(0).unwrap_or_default();
                if first.iter().all(|&b| b == 0) && (1..count).all(|i| at(i) == Some(first)) {
                    continue;
                }
                let value = match first.len() {
                    1 | 2 | 4 | 8 if (1..count).all(|i| at(i) == Some(first)) => {
                        let mut w = [0u8; 8];
                        w[..first.len()].copy_from_slice(first);
                        let shift = 64 - 8 * first.len() as u32;
                        Some((i64::from_le_bytes(w) << shift) >> shift)
                    }
                    _ => None,
                };
                match value {
                    Some(v) => declared.init.push((m.name.clone(), v)),
                    None => {
                        return Err(CliError::Usage(format!(
                            "--data {spec}: the diff starts added member {} with a value lucos \
                             cannot give each element: give it with --init {symbol}.{}=VALUE",
                            m.name, m.name
                        )))
                    }
                }
            }
        }
        let mut change = derive(symbol, count, &old, &new, &declared).map_err(CliError::Usage)?;
        let end = sym.addr + count * old.size;
        if let Some(bytes) = image.read(sym.addr, (count * old.size) as usize) {
            change
                .check_self_pointers(bytes, sym.addr)
                .map_err(|e| CliError::Usage(format!("--data {spec}: {e}")))?;
        }
        if ksyms.all_named(symbol).len() > 1 {
            change.symbol_file = sym.file.clone();
        }
        change.users_left = users_of(image, &all_functions, (sym.addr, end), old.size)
            .into_iter()
            .filter(|u| !functions.iter().any(|f| &f.old == u))
            .collect();
        // Module code (loaded now or later) may use an exported object;
        // lucos does not look into modules for its users.
        if let Some(u) = update_engine::data::exported_user(ksyms, symbol) {
            change.users_left.push(u);
        }
        // Kernel data pointing into the object: no patch can replace it;
        // with --repoint it moves to the new copy while the patch is applied.
        let repoint = args.repoint.iter().any(|r| r == symbol);
        for at in data_pointers(image, &skip, sym.addr, end) {
            let holder = ksyms.symbolize(at);
            let name = holder
                .as_ref()
                .map(|(s, off)| format!("{}+{off:#x}", s.name))
                .unwrap_or_else(|| format!("{at:#x}"));
            if !repoint {
                change.users_left.push(format!("data {name}"));
                continue;
            }
            let Some((h, offset)) = holder else {
                return Err(CliError::Usage(format!(
                    "--repoint {symbol}: the kernel word at {at:#x} points into it and belongs                      to no symbol: lucos cannot find it again in the running kernel"
                )));
            };
            let value = image
                .read(at, 8)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
            let pointer = update_engine::data::Pointer {
                holder: h.name.clone(),
                holder_file: (ksyms.all_named(&h.name).len() > 1)
                    .then(|| h.file.clone())
                    .flatten(),
                offset,
                target: value - sym.addr,
            };
            if change.map_offset(pointer.target).is_none() {
                return Err(CliError::Usage(format!(
                    "--repoint {symbol}: {name} points to byte {:#x} of it, which the new layout                      removes",
                    pointer.target
                )));
            }
            change.repoint.push(pointer);
        }
        if repoint && change.repoint.is_empty() {
            return Err(CliError::Usage(format!(
                "--repoint {symbol}: no kernel data points into it"
            )));
        }
        change.check().map_err(CliError::Usage)?;
        out.push(change);
    }
    Ok(out)
}

/// The C transfer functions the sources define for `symbol`
/// (`lucos_to_new_SYMBOL` and `lucos_to_old_SYMBOL`, both or neither).
fn c_transfer(
    symbol: &str,
    objects: &[(String, Vec<u8>)],
) -> Result<Option<update_engine::data::CTransfer>, CliError> {
    let (to_new, to_old) = update_engine::data::c_names(symbol);
    let mut found: Vec<(String, &str)> = Vec::new();
    for (name, data) in objects {
        let syms = SymbolTable::from_elf_bytes(data, name)?;
        for f in [&to_new, &to_old] {
            if syms
                .all_named(f)
                .iter()
                .any(|s| s.kind == symbol_db::SymbolKind::Function && s.size > 0)
            {
                found.push((f.clone(), name));
            }
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [(a, oa), (b, ob)] if a != b && oa == ob => Ok(Some(update_engine::data::CTransfer {
            object: (*oa).to_owned(),
            to_new,
            to_old,
        })),
        [(a, oa), (b, ob)] if a != b => Err(CliError::Usage(format!(
            "{a} is in {oa} but {b} in {ob}: define both transfer functions of {symbol} in one \
             source"
        ))),
        [(one, _)] => Err(CliError::Usage(format!(
            "the sources define {one} but not {}: a data change needs its C transfer in both \
             directions (writes by old code reach the new copy, and writes by new code the old)",
            if *one == to_new { &to_old } else { &to_new }
        ))),
        _ => Err(CliError::Usage(format!(
            "the transfer functions of {symbol} are defined more than once"
        ))),
    }
}

fn parse_int(s: &str) -> Option<i64> {
    match s.strip_prefix("0x") {
        Some(h) => i64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `lucos inspect PATCH.lup`. With `--key`, the exit status says whether
/// the signature verifies by that key: 0 only when it does, else
/// [`exit::PATCH_REFUSED`] (an unsigned patch too); `--json` says which in
/// `signature_valid`.
pub fn inspect(path: &Path, json: bool, key: Option<&Path>) -> Result<i32, CliError> {
    let lup = Lup::read(path).map_err(engine)?;
    // (what to print, whether it verified: None when there was nothing to check)
    let (signature, valid) = match (&lup.signature, key) {
        (None, None) => ("none (unsigned)".to_owned(), None),
        (None, Some(_)) => ("none (unsigned): nothing to verify".to_owned(), Some(false)),
        (Some(_), Some(k)) => {
            let vk = read_public_key(k)?;
            match lup.verify(&[vk], &path.display().to_string()) {
                Ok(_) => (format!("valid, by {}", k.display()), Some(true)),
                Err(e) => (format!("INVALID: {e}"), Some(false)),
            }
        }
        (Some(_), None) => ("present (give --key KEY.pub to check it)".to_owned(), None),
    };
    let code = match valid {
        Some(false) => {
            eprintln!(
                "lucos: error: {}: the signature does not verify by {}",
                path.display(),
                key.map(|k| k.display().to_string()).unwrap_or_default()
            );
            exit::PATCH_REFUSED
        }
        _ => exit::OK,
    };
    if json {
        let mut v = serde_json::to_value(&lup.manifest).unwrap_or_default();
        v["signature"] = Value::String(signature);
        v["signature_valid"] = valid.map_or(Value::Null, Value::Bool);
        v["objects_bytes"] = lup
            .objects
            .iter()
            .map(|(_, d)| d.len())
            .sum::<usize>()
            .into();
        print_json(&v);
        return Ok(code);
    }
    let m = &lup.manifest;
    println!("patch       {} (version {})", m.name, m.version);
    println!("description {}", m.description);
    println!(
        "target      build-id {}",
        m.target.build_id.as_deref().unwrap_or("-")
    );
    println!("            {}", m.target.version.as_deref().unwrap_or("-"));
    println!(
        "depends     {}",
        if m.depends.is_empty() {
            "-".into()
        } else {
            m.depends.join(", ")
        }
    );
    println!("signature   {signature}");
    for t in &m.modules {
        println!(
            "module      {} (build-id {}): objects {}",
            t.name,
            t.build_id,
            t.objects.join(", ")
        );
    }
    for f in &m.functions {
        println!(
            "function    {}{} ({} bytes, sha256 {}) -> {}",
            f.old,
            f.old_file
                .as_deref()
                .or(f.module.as_deref())
                .map(|x| format!("@{x}"))
                .unwrap_or_default(),
            f.old_size,
            &f.old_sha256[..16],
            f.new
        );
    }
    for d in &m.data {
        println!(
            "data        {} (struct {} x {}): {} -> {} bytes each",
            d.symbol, d.type_name, d.count, d.old_size, d.new_size
        );
        for x in &d.members {
            let at = |f: &Option<update_engine::data::Field>| match f {
                Some(f) => format!("+{}:{}", f.offset, f.size),
                None => "-".into(),
            };
            let how = match (&x.old, &x.new) {
                (Some(_), Some(_)) if x.by_c => "by C",
                (Some(o), Some(n)) if o.int && n.int && o.size != n.size => "converted",
                (Some(_), Some(_)) => "copied",
                (None, Some(_)) if x.by_c => "added (set by C)",
                (None, Some(_)) => "added",
                _ if x.by_c => "read by C",
                _ => "dropped",
            };
            let init = if x.old.is_none() {
                format!(" (starts at {})", x.init)
            } else {
                String::new()
            };
            println!(
                "  member    {:<16} {:>8} -> {:<8} {how}{init}",
                x.name,
                at(&x.old),
                at(&x.new)
            );
        }
        if let Some(c) = &d.c {
            println!(
                "  C         {} / {} ({}), in the VMM's sandbox",
                c.to_new, c.to_old, c.object
            );
        }
        if !d.users_left.is_empty() {
            println!(
                "  old copy  still used by {} (kept coherent while the patch is applied)",
                d.users_left.join(", ")
            );
        }
        for p in &d.repoint {
            let to = d.map_offset(p.target).unwrap_or_default();
            println!(
                "  repoint   {p}: {}+{:#x} -> new copy +{to:#x} while applied",
                d.symbol, p.target
            );
        }
    }
    for (n, d) in &lup.objects {
        println!("object      {n} ({} bytes)", d.len());
    }
    Ok(code)
}

/// One line per switched function: name, old entry -> replacement.
fn print_functions(functions: &[SwitchedFunction]) {
    for f in functions {
        let at = f
            .module
            .as_deref()
            .map(|m| format!("@{m}"))
            .unwrap_or_default();
        println!(
            "  {}{at} {:#x} -> {:#x}",
            f.function, f.old_addr, f.new_addr
        );
    }
}

fn show_report(r: &PatchReport, verb: &str) {
    if let (Some(m), true) = (&r.waiting_for, r.functions.is_empty()) {
        if verb == "reverted" {
            println!(
                "dropped '{}': it was held for module {m}, which never loaded",
                r.name
            );
        } else {
            println!(
                "held '{}': module {m} is not loaded; the patch is applied when the guest loads \
                 it, before any of its code runs",
                r.name
            );
        }
        return;
    }
    let immediate = r.mode == update_engine::lup::Mode::Immediate;
    let mut tasks = match r.sleeping_tasks_checked {
        Some(0) if immediate => String::new(),
        Some(n) => format!("; vCPUs and {n} sleeping tasks checked"),
        None => String::new(),
    };
    if immediate {
        tasks.push_str("; immediate: calls already in old code finish there");
    }
    let n = r.functions.len();
    println!(
        "{verb} '{}': {n} function{} switched in one pause of {:.1} µs ({} tr{}{tasks}), {:.1} ms in all",
        r.name,
        if n == 1 { "" } else { "s" },
        r.pause_us,
        r.tries,
        if r.tries == 1 { "y" } else { "ies" },
        r.total_us / 1e3
    );
    print_functions(&r.functions);
    if let (Some(m), false) = (&r.waiting_for, r.functions.is_empty()) {
        println!(
            "  held: its part for {m} (not loaded), applied when the guest loads it, before any \
             of its code runs"
        );
    }
}

/// Prints `v` as the JSON a script reads.
fn print_typed(v: &impl serde::Serialize) {
    print_json(&serde_json::to_value(v).unwrap_or(Value::Null));
}

/// `lucos patch --vm ID PATCH.lup`.
pub fn patch(
    vm: &str,
    path: &Path,
    replace: bool,
    mode: Option<update_engine::lup::Mode>,
    json: bool,
) -> Result<i32, CliError> {
    let abs = std::fs::canonicalize(path)
        .map_err(|e| CliError::io(format!("cannot read {}", path.display()), e))?;
    let r: PatchReport = connect(vm)?.call_as(&Request::Patch {
        path: abs.display().to_string(),
        replace,
        mode: mode.map(|m| m.to_string()),
    })?;
    if json {
        print_typed(&r);
    } else {
        show_report(
            &r,
            if replace {
                "replaced every patch with"
            } else {
                "applied"
            },
        );
    }
    Ok(exit::OK)
}

/// `lucos revert --vm ID NAME`.
pub fn revert(vm: &str, name: &str, json: bool) -> Result<i32, CliError> {
    let r: PatchReport = connect(vm)?.call_as(&Request::Revert {
        name: name.to_owned(),
    })?;
    if json {
        print_typed(&r);
    } else {
        show_report(&r, "reverted");
    }
    Ok(exit::OK)
}

/// `lucos list --vm ID`: the applied patches.
pub fn list_patches(vm: &str, json: bool) -> Result<i32, CliError> {
    let l: PatchList = connect(vm)?.call_as(&Request::Patches)?;
    if json {
        print_typed(&l);
        return Ok(exit::OK);
    }
    if l.patches.is_empty() && l.held.is_empty() {
        println!("no patches applied to VM {vm}");
    }
    for p in &l.patches {
        println!(
            "{} v{}  {}  ({} bytes at {:#x}, applied {})",
            p.name, p.version, p.description, p.code_bytes, p.code_addr, p.mode
        );
        print_functions(&p.functions);
        // The objects it covers: vmlinux (when it switched any of its
        // functions), and each module, applied or gone with the module.
        let mut objects = Vec::new();
        if p.functions.iter().any(|f| f.module.is_none()) || p.modules.is_empty() {
            objects.push("vmlinux applied".to_owned());
        }
        for m in &p.modules {
            let st = match m.status {
                update_engine::patcher::ObjectStatus::Applied => "applied",
                update_engine::patcher::ObjectStatus::Gone => "gone (unloaded)",
            };
            objects.push(format!("{} {st}", m.name));
        }
        println!("  objects   {}", objects.join(", "));
        for d in &p.data {
            println!(
                "  data      {} (struct {} x {}): {} -> {} bytes, old copy {:#x}, new copy {:#x}",
                d.symbol, d.type_name, d.count, d.old_bytes, d.new_bytes, d.old_addr, d.new_addr
            );
            let st = &d.stats;
            let failures = if st.failures > 0 {
                format!(", {} FAILED (the copies may differ)", st.failures)
            } else {
                String::new()
            };
            let when = match st.retired_after_ms {
                Some(ms) => format!("retired {ms} ms after the apply"),
                None => st.state.clone(),
            };
            println!(
                "            {when}: {} writes transferred in {:.1} ms{failures}",
                st.transfers,
                st.transfer_ns as f64 / 1e6
            );
            // An owner of another patch: carried over; of this one's with a
            // number: made while a replaced change held the plain one.
            if let Some(o) = &d.owner {
                if o.starts_with(&format!(
                    "{}#",
                    update_engine::data::owner(&p.name, &d.symbol)
                )) {
                    println!("            tracked as {o}");
                } else {
                    println!("            carried over from the patch that made it ({o})");
                }
            }
            if let Some(e) = &st.c_engine {
                println!("            C transfer functions run by: {e}");
            }
            if !d.users_left.is_empty() {
                println!(
                    "            old copy still used by {}",
                    d.users_left.join(", ")
                );
            }
            if let Some(w) = &st.waiting {
                println!("            not retired yet: {w}");
            }
            if let Some(sc) = &st.scan {
                println!(
                    "            memory scanned for pointers into the old copy: {} MiB in {:.1} ms while the guest ran{}{}",
                    sc.bytes >> 20,
                    sc.running_us as f64 / 1e3,
                    sc.pause_pages
                        .map(|n| format!(", {n} pages again in the pause"))
                        .unwrap_or_default(),
                    st.retire_pause_us
                        .map(|us| format!(" (retirement pause {:.2} ms)", us as f64 / 1e3))
                        .unwrap_or_default()
                );
            }
            for r in &d.repointed {
                println!(
                    "            {} points at the new copy ({:#x}, was {:#x})",
                    r.word, r.new, r.old
                );
            }
        }
        let owner = update_engine::patcher::patch_owner(&p.name);
        let prot: Vec<_> = l
            .protected
            .iter()
            .filter(|r| r.owner == owner || r.owner.starts_with(&format!("{owner}@")))
            .collect();
        println!(
            "  write control: {} ranges ({} bytes) protected from the guest",
            prot.len(),
            prot.iter().map(|r| r.len).sum::<u64>()
        );
    }
    for h in &l.held {
        let state = match h.coming {
            Some(a) => format!("module being loaded at {a:#x}"),
            None => "not loaded".into(),
        };
        println!(
            "{} v{}  {}  (held for module {}: {state})",
            h.name, h.version, h.description, h.module
        );
        if let Some(e) = &h.last_error {
            println!("  last load: not applied: {e}");
        }
    }
    println!(
        "patch area  {} of {} bytes in use",
        l.patch_area.used_bytes, l.patch_area.size_bytes
    );
    for c in &l.kept_code {
        println!(
            "  kept      code of replaced patch {} at {:#x} ({} bytes): calls may still be in \
             it (immediate mode); given back once a pause finds none",
            c.patch, c.code_addr, c.code_bytes
        );
    }
    if let Some(x) = &l.exception_index {
        println!(
            "exception index  {} ({:#x}) jumps to lucos's index at {:#x}, for the exception \
             tables of: {}",
            x.hooked,
            x.site,
            x.page,
            x.patches.join(", ")
        );
    }
    let s: vmm_core::control::StatusInfo = connect(vm)?.call_as(&Request::Status)?;
    println!("{}", crate::protect::stats_line(&s.write_control));
    if let Some(t) = &l.kernel_text {
        println!(
            "kernel text {:#x}..{:#x} sha256 {}",
            t.start, t.end, t.sha256
        );
    }
    if let Some(t) = &l.kernel_page_tables {
        println!(
            "page tables {} pages from {:#x} sha256 {}",
            t.pages, t.root, t.sha256
        );
    }
    Ok(exit::OK)
}
