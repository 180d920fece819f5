//! ACPI tables for Linux guests: RSDP, XSDT, a hardware-reduced FADT, a DSDT
//! with `\_S5` (so the guest can power off), and a MADT listing the vCPUs'
//! local APICs and the IOAPIC. Built with the rust-vmm `acpi_tables` crate.
//!
//! Layout in the e820-reserved BIOS area: RSDP at [`RSDP_START`] (where Linux
//! also scans for it; its address is in the zero page too), tables after it.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::mptable::{APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE};
use crate::memory::GuestRam;

/// Start of the reserved BIOS area holding the ACPI tables.
pub const ACPI_START: u64 = 0xe0000;
/// End of it.
pub const ACPI_END: u64 = 0x10_0000;
/// The RSDP.
pub const RSDP_START: u64 = ACPI_START;
/// The sleep control/status register (one I/O port): writing SLP_EN with
/// SLP_TYP 5 powers the VM off.
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// SLP_TYP of the S5 (soft off) state, as `\_S5` declares it.
pub const S5_SLEEP_TYPE: u8 = 5;

const OEM_ID: [u8; 6] = *b"LUCOS ";
const OEM_TABLE_ID: [u8; 8] = *b"LUCOSVMM";

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the ACPI tables into guest memory")]
pub struct AcpiError;

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Writes the ACPI tables for `cpus` vCPUs; returns the RSDP address.
pub fn write(ram: &GuestRam, cpus: u8) -> Result<u64, AcpiError> {
    let mut next = RSDP_START + 64;
    let mut place = |data: &[u8]| -> Result<u64, AcpiError> {
        let addr = next;
        if addr + data.len() as u64 > ACPI_END {
            return Err(AcpiError);
        }
        ram.write(addr, data).map_err(|_| AcpiError)?;
        next = (addr + data.len() as u64 + 15) & !15;
        Ok(addr)
    };

    // DSDT: \_S5 for poweroff, and COM1 with its I/O ports and IRQ. A
    // hardware-reduced platform has no legacy PIC, so Linux maps ISA
    // interrupts only for devices the DSDT describes.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8]),
    );
    s5.to_aml_bytes(&mut dsdt);
    let com1_irq = aml::Interrupt::new(true, true, false, false, crate::devices::COM1_IRQ);
    let com1_io = aml::IO::new(crate::devices::COM1_BASE, crate::devices::COM1_BASE, 1, 8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_irq, &com1_io]);
    let hid = aml::EISAName::new("PNP0501");
    let com1_hid = aml::Name::new("_HID".into(), &hid);
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);
    com1.to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    let dsdt_addr = place(dsdt.as_slice())?;

    let port = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.sleep_control_reg = port;
    fadt.sleep_status_reg = port;
    let fadt_addr = place(&bytes(&fadt.finalize()))?;

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(APIC_DEFAULT_BASE),
    );
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, IOAPIC_DEFAULT_BASE, 0));
    let madt_addr = place(&bytes(&madt))?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes(&xsdt))?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    ram.write(RSDP_START, &bytes(&rsdp))
        .map_err(|_| AcpiError)?;
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let ram = GuestRam::new(2 << 20).expect("ram");
        let rsdp = write(&ram, 2).expect("tables");
        let mut r = [0u8; 36];
        ram.read(rsdp, &mut r).expect("read");
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = u64::from_le_bytes(r[24..32].try_into().expect("8 bytes"));
        let mut hdr = [0u8; 36];
        ram.read(xsdt, &mut hdr).expect("read");
        assert_eq!(&hdr[..4], b"XSDT");
        let len = u32::from_le_bytes(hdr[4..8].try_into().expect("4")) as usize;
        let mut x = vec![0u8; len];
        ram.read(xsdt, &mut x).expect("read");
        assert_eq!(sum(&x), 0);
        let mut sigs = Vec::new();
        for e in x[36..].chunks(8) {
            let addr = u64::from_le_bytes(e.try_into().expect("8"));
            let mut h = [0u8; 8];
            ram.read(addr, &mut h).expect("read");
            let tlen = u32::from_le_bytes(h[4..8].try_into().expect("4")) as usize;
            let mut t = vec![0u8; tlen];
            ram.read(addr, &mut t).expect("read");
            assert_eq!(sum(&t), 0, "{:?}", std::str::from_utf8(&h[..4]));
            sigs.push(String::from_utf8_lossy(&h[..4]).into_owned());
        }
        assert_eq!(sigs, ["FACP", "APIC"]);
    }
}
