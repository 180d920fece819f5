//! Kernel loading: checks the image, loads an ELF kernel at its physical
//! addresses (linux-loader), and writes the command line, the initrd and the
//! test-kernel boot info.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{
    BOOT_INFO_START, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START,
};
use crate::memory::GuestRam;

/// "LUCOBI1", the boot_info magic (guest-kernels/testkernel/include/boot.h).
pub const BOOT_INFO_MAGIC: u64 = 0x0031_4942_4f43_554c;
/// boot_info version.
pub const BOOT_INFO_VERSION: u32 = 1;
/// boot_info flag: the host cannot deliver SYSCALL from guest user mode to
/// guest CPL0 (PVM), so the test kernel's tasks trap with int3 instead.
pub const BOOT_FLAG_NO_SYSCALL: u32 = 1;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel file cannot be read.
    #[error("cannot read kernel image {path}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is a bzImage, which this boot path does not take.
    #[error(
        "{0} is a bzImage; lucos boots it through the Linux boot protocol, not as an ELF kernel"
    )]
    IsBzImage(PathBuf),
    /// The file is not an ELF x86-64 executable.
    #[error("{path} is not an x86-64 ELF kernel image: {why}")]
    NotElf {
        /// The path given.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A loadable segment does not fit in guest RAM.
    #[error(
        "guest memory too small: {path} loads {end:#x} bytes into guest-physical memory \
         but the VM has {mem:#x} ({mem_mib} MiB); give it at least {need_mib} MiB"
    )]
    TooLittleMemory {
        /// The path given.
        path: PathBuf,
        /// End of the highest segment.
        end: u64,
        /// RAM size.
        mem: u64,
        /// RAM size in MiB.
        mem_mib: u64,
        /// Suggested RAM size in MiB.
        need_mib: u64,
    },
    /// A segment is below the 1 MiB line where the VMM keeps boot structures.
    #[error("{path}: segment at guest-physical {addr:#x} is below 1 MiB, where lucos keeps boot structures")]
    SegmentTooLow {
        /// The path given.
        path: PathBuf,
        /// The segment's physical address.
        addr: u64,
    },
    /// linux-loader failed.
    #[error("cannot load {path}")]
    Load {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line is too long.
    #[error("kernel command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Guest memory write failed.
    #[error("cannot write {0} into guest memory")]
    Write(&'static str),
}

/// What was loaded.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Entry point (virtual, from e_entry).
    pub entry: u64,
    /// First byte above the kernel image.
    pub end: u64,
    /// Where the initrd was put, and its size.
    pub initrd: Option<(u64, u64)>,
}

/// The kinds of kernel image lucos boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An ELF executable, booted with the lucos test-kernel protocol.
    Elf,
    /// A Linux bzImage, booted with the Linux 64-bit boot protocol.
    BzImage,
    /// An ELF kernel with a PVH entry point (a Linux `vmlinux`), booted with
    /// the PVH boot ABI at the given 32-bit entry.
    Pvh(u32),
}

/// ELF note of a PVH entry point: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn pvh_entry(elf: &goblin::elf::Elf<'_>, data: &[u8]) -> Option<u32> {
    elf.iter_note_headers(data)?.flatten().find_map(|n| {
        (n.n_type == XEN_ELFNOTE_PHYS32_ENTRY && n.name == "Xen" && n.desc.len() >= 4)
            .then(|| u32::from_le_bytes([n.desc[0], n.desc[1], n.desc[2], n.desc[3]]))
    })
}

/// Checks that `path` is a kernel image lucos can boot and that it fits in
/// `mem_bytes` of RAM.
pub fn check_kernel(path: &Path, mem_bytes: u64) -> Result<KernelKind, LoadError> {
    let data = std::fs::read(path).map_err(|source| LoadError::Open {
        path: path.to_owned(),
        source,
    })?;
    if data.len() > 0x264 && &data[0x202..0x206] == b"HdrS" {
        let version = u16::from_le_bytes([data[0x206], data[0x207]]);
        let loadflags = data[0x211];
        let xloadflags = u16::from_le_bytes([data[0x236], data[0x237]]);
        if version < 0x020c || loadflags & 1 == 0 || xloadflags & 1 == 0 {
            return Err(LoadError::NotElf {
                path: path.to_owned(),
                why: format!(
                    "bzImage boot protocol {}.{:02} without a 64-bit entry point (need 2.12+, XLF_KERNEL_64)",
                    version >> 8,
                    version & 0xff
                ),
            });
        }
        // The decompressor needs the image plus its own extraction room.
        let need = HIMEM_START + 4 * data.len() as u64 + (64 << 20);
        if need > mem_bytes {
            return Err(LoadError::TooLittleMemory {
                path: path.to_owned(),
                end: need,
                mem: mem_bytes,
                mem_mib: mem_bytes >> 20,
                need_mib: need.div_ceil(1 << 20).next_power_of_two(),
            });
        }
        return Ok(KernelKind::BzImage);
    }
    let not_elf = |why: String| LoadError::NotElf {
        path: path.to_owned(),
        why,
    };
    let elf = goblin::elf::Elf::parse(&data).map_err(|e| not_elf(e.to_string()))?;
    if !elf.is_64 || elf.header.e_machine != goblin::elf::header::EM_X86_64 {
        return Err(not_elf("not a 64-bit x86-64 object".into()));
    }
    if elf.header.e_type != goblin::elf::header::ET_EXEC {
        return Err(not_elf("not an executable (ET_EXEC)".into()));
    }
    let mut end = 0u64;
    for ph in elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == goblin::elf::program_header::PT_LOAD)
    {
        if ph.p_paddr < HIMEM_START {
            return Err(LoadError::SegmentTooLow {
                path: path.to_owned(),
                addr: ph.p_paddr,
            });
        }
        end = end.max(ph.p_paddr.saturating_add(ph.p_memsz));
    }
    if end == 0 {
        return Err(not_elf("no loadable segments".into()));
    }
    let pvh = pvh_entry(&elf, &data);
    if end > mem_bytes {
        let need_mib = (end + (16 << 20)).div_ceil(1 << 20).next_power_of_two();
        return Err(LoadError::TooLittleMemory {
            path: path.to_owned(),
            end,
            mem: mem_bytes,
            mem_mib: mem_bytes >> 20,
            need_mib,
        });
    }
    Ok(match pvh {
        Some(entry) => KernelKind::Pvh(entry),
        None => KernelKind::Elf,
    })
}

/// Loads the ELF kernel at `path` and, if given, the initrd above it.
pub fn load_elf(
    ram: &GuestRam,
    path: &Path,
    initrd: Option<&Path>,
) -> Result<LoadedKernel, LoadError> {
    let mut file = File::open(path).map_err(|source| LoadError::Open {
        path: path.to_owned(),
        source,
    })?;
    let res = Elf::load(ram.memory(), None, &mut file, None).map_err(|source| LoadError::Load {
        path: path.to_owned(),
        source,
    })?;
    let end = res.kernel_end;
    let initrd = match initrd {
        Some(p) => Some(place_initrd(ram, p, end, u64::MAX)?),
        None => None,
    };
    Ok(LoadedKernel {
        entry: res.kernel_load.0,
        end,
        initrd,
    })
}

/// Loads `data` (an initrd) at the highest 2 MiB-aligned address that ends
/// below `limit` and starts at or above `floor`.
fn place_initrd(
    ram: &GuestRam,
    path: &Path,
    floor: u64,
    limit: u64,
) -> Result<(u64, u64), LoadError> {
    let data = std::fs::read(path).map_err(|source| LoadError::Open {
        path: path.to_owned(),
        source,
    })?;
    let size = data.len() as u64;
    let top = ram.ranges()[0].len.min(limit);
    match top.checked_sub(size).map(|a| a & !((2 << 20) - 1)) {
        Some(a) if a >= floor => {
            ram.write(a, &data)
                .map_err(|_| LoadError::Write("initrd"))?;
            Ok((a, size))
        }
        _ => Err(LoadError::InitrdTooBig {
            path: path.to_owned(),
            size,
        }),
    }
}

/// Zero page (`struct boot_params`) of the Linux boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Loads a Linux bzImage, its initrd and the zero page (boot_params with
/// the e820 map) for the 64-bit boot protocol. Returns the 64-bit entry point.
pub fn load_bzimage(
    ram: &GuestRam,
    path: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    acpi_rsdp: Option<u64>,
) -> Result<LoadedKernel, LoadError> {
    use linux_loader::configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams};
    use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
    use linux_loader::loader::bzimage::BzImage;

    let mut file = File::open(path).map_err(|source| LoadError::Open {
        path: path.to_owned(),
        source,
    })?;
    let res = BzImage::load(
        ram.memory(),
        None,
        &mut file,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|source| LoadError::Load {
        path: path.to_owned(),
        source,
    })?;
    let mut params = boot_params::default();
    if let Some(hdr) = res.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some(rsdp) = acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let end = res.kernel_end.max(res.kernel_load.0);
    let initrd = match initrd {
        Some(p) => {
            let limit = u64::from(params.hdr.initrd_addr_max)
                .saturating_add(1)
                .max(1 << 20);
            let floor =
                params.hdr.pref_address.max(res.kernel_load.0) + u64::from(params.hdr.init_size);
            let (addr, size) = place_initrd(ram, p, floor, limit)?;
            params.hdr.ramdisk_image = addr as u32;
            params.hdr.ramdisk_size = size as u32;
            Some((addr, size))
        }
        None => None,
    };
    let e820 = memory_map(ram);
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        ram.memory(),
    )
    .map_err(|_| LoadError::Write("the zero page"))?;
    Ok(LoadedKernel {
        // startup_64 sits 0x200 into the protected-mode kernel.
        entry: res.kernel_load.0 + 0x200,
        end,
        initrd,
    })
}

/// The guest's memory map (e820 types): RAM, and the reserved MP-table and
/// ACPI areas.
pub fn memory_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut e820 = vec![
        (0, crate::arch::mptable::MPTABLE_START, E820_RAM),
        (
            crate::arch::mptable::MPTABLE_START,
            0xa0000 - crate::arch::mptable::MPTABLE_START,
            E820_RESERVED,
        ),
    ];
    for r in ram.ranges() {
        let start = r.guest_addr.max(HIMEM_START);
        e820.push((start, r.guest_addr + r.len - start, E820_RAM));
    }
    e820
}

/// Loads a Linux `vmlinux` with a PVH entry point, its initrd, and the PVH
/// start info (command line, initrd module, memory map, ACPI RSDP).
pub fn load_pvh(
    ram: &GuestRam,
    path: &Path,
    entry: u32,
    initrd: Option<&Path>,
    acpi_rsdp: u64,
) -> Result<LoadedKernel, LoadError> {
    use linux_loader::loader::elf::start_info::{
        hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
    };
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    let LoadedKernel { end, initrd, .. } = load_elf(ram, path, initrd)?;
    let info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr = PVH_INFO_START + info_size;
    let memmap_addr = modlist_addr + std::mem::size_of::<hvm_modlist_entry>() as u64;
    let map = memory_map(ram);
    let write = |addr: u64, bytes: &[u8]| {
        ram.write(addr, bytes)
            .map_err(|_| LoadError::Write("the PVH start info"))
    };
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        };
        write(
            memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
            vm_memory::ByteValued::as_slice(&e),
        )?;
    }
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        write(modlist_addr, vm_memory::ByteValued::as_slice(&m))?;
    }
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: modlist_addr,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: acpi_rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    write(PVH_INFO_START, vm_memory::ByteValued::as_slice(&info))?;
    Ok(LoadedKernel {
        entry: u64::from(entry),
        end,
        initrd,
    })
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<(), LoadError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    ram.write(CMDLINE_START, &bytes)
        .map_err(|_| LoadError::Write("the command line"))
}

/// Writes the test kernel's `struct boot_info` at [`BOOT_INFO_START`].
pub fn write_boot_info(
    ram: &GuestRam,
    nr_cpus: u8,
    cmdline_len: usize,
    flags: u32,
) -> Result<(), LoadError> {
    let mem = ram.memory();
    let w = |off: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(BOOT_INFO_START + off))
            .map_err(|_| LoadError::Write("boot info"))
    };
    w(0, &BOOT_INFO_MAGIC.to_le_bytes())?;
    w(8, &BOOT_INFO_VERSION.to_le_bytes())?;
    w(12, &u32::from(nr_cpus).to_le_bytes())?;
    w(16, &ram.size().to_le_bytes())?;
    w(24, &CMDLINE_START.to_le_bytes())?;
    w(32, &(cmdline_len as u32).to_le_bytes())?;
    w(36, &flags.to_le_bytes())
}
