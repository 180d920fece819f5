//! Intel MultiProcessor Specification 1.4 table, so a Linux guest finds its
//! vCPUs, the IOAPIC and the ISA interrupt routing without ACPI.
//!
//! Layout: the configuration table (header and entries) at [`MPTABLE_START`],
//! the 16-byte floating pointer at [`MP_FLOATING_POINTER`] in the last KiB
//! below 640 KiB, where Linux scans for it; all of it e820-reserved.

use crate::memory::GuestRam;

/// Start of the reserved MP-table area (the configuration table).
pub const MPTABLE_START: u64 = 0x9e000;
/// The MP floating pointer structure.
pub const MP_FLOATING_POINTER: u64 = 0x9fc00;
/// Local APIC base.
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// IOAPIC base.
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MP_SPEC_REV: u8 = 4;
/// ISA interrupts routed through the IOAPIC.
const ISA_IRQS: u8 = 16;

/// Errors building the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many vCPUs for the space below 640 KiB.
    #[error("an MP table for {0} vCPUs does not fit below 640 KiB")]
    TooManyCpus(u8),
    /// Guest memory write failed.
    #[error("cannot write the MP table into guest memory")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds (floating pointer, configuration table) for `cpus` vCPUs, the
/// table to be placed at `config_addr`.
pub fn build(cpus: u8, config_addr: u64) -> (Vec<u8>, Vec<u8>) {
    let ioapic_id = cpus; // APIC IDs 0..cpus-1 are the vCPUs.
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        entries.push(0); // processor
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(0x1 | if cpu == 0 { 0x2 } else { 0 }); // enabled, BSP
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]); // IOAPIC, enabled
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT, conforming polarity/trigger, bus 0 IRQ -> IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0 of the BSP, NMI on LINT1 of all.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let header_len = 44usize;
    let table_len = (header_len + entries.len()) as u16;
    let mut header = Vec::with_capacity(header_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.push(MP_SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"LUCOS   ");
    header.extend_from_slice(b"LUCOSVMM    ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut config = header;
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(config_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    (fp, config)
}

/// Writes the MP table for `cpus` vCPUs at [`MPTABLE_START`].
pub fn write(ram: &GuestRam, cpus: u8) -> Result<(), MpTableError> {
    let (fp, config) = build(cpus, MPTABLE_START);
    if MPTABLE_START + config.len() as u64 > MP_FLOATING_POINTER {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    ram.write(MPTABLE_START, &config)
        .and_then(|()| ram.write(MP_FLOATING_POINTER, &fp))
        .map_err(|_| MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let (t, cfg) = build(2, MPTABLE_START);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t.len(), 16);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(&cfg[..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([cfg[34], cfg[35]]);
        assert_eq!(count, 2 + 1 + 1 + 16 + 2);
        assert_eq!(
            u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64,
            MPTABLE_START
        );
    }

    #[test]
    fn fits_for_many_cpus() {
        let (_, cfg) = build(64, MPTABLE_START);
        assert!(MPTABLE_START + cfg.len() as u64 <= MP_FLOATING_POINTER);
    }
}
