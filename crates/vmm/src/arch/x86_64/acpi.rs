//! ACPI tables for a hardware-reduced x86_64 platform: RSDP, XSDT, FADT, MADT and
//! DSDT, so that a guest finds every vCPU, the I/O APIC, COM1, and a way to power
//! off (the FADT sleep control register) and reset (the FADT reset register);
//! with PCI, an MCFG for the ECAM window and the root bridge in the DSDT.

use crate::GuestMemoryMmap;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vigil_devices::legacy::{ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_END, ACPI_START, APIC_START, IOAPIC_START, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START,
};
use vigil_devices::pci::ECAM_BUS_SIZE;

const OEM_ID: [u8; 6] = *b"VIGIL ";
const OEM_REVISION: u32 = 1;

/// I/O port of the ACPI sleep control / reset register.
pub const ACPI_POWER_PORT: u16 = 0x600;
/// COM1's port and interrupt, declared in the DSDT.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

// IA-PC boot architecture flags (FADT): an i8042 is present, VGA is not, nor is a CMOS RTC.
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// The tables laid out in guest memory.
#[derive(Debug)]
pub struct AcpiTables {
    /// Where the RSDP is (what `boot_params.acpi_rsdp_addr` and PVH `rsdp_paddr` carry).
    pub rsdp: GuestAddress,
    /// Each table's signature, address and bytes, in the order written.
    pub tables: Vec<([u8; 4], GuestAddress, Vec<u8>)>,
}

/// Errors from placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes, more than the {room} reserved for them")]
    TooLarge { needed: u64, room: u64 },
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device as the DSDT declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base of its register window.
    pub base: u64,
    /// Length of the window.
    pub len: u64,
    /// Its interrupt (GSI).
    pub gsi: u32,
}

/// `_SB_.Vnnn`: a device Linux's virtio-mmio driver binds through ACPI (`LNRO0005`).
fn virtio_device_aml(index: usize, dev: &MmioDevice, out: &mut Vec<u8>) {
    let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.len as u32);
    let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid = aml::Name::new("_UID".into(), &(index as u32));
    let crs = aml::Name::new("_CRS".into(), &crs);
    let path = format!("_SB_.V{index:03}");
    aml::Device::new(path.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(out);
}

/// A device on I/O ports that the DSDT declares by its hardware id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoDevice {
    /// `_SB_.<name>`.
    pub name: &'static str,
    /// `_HID`, an ACPI or PNP id.
    pub hid: &'static str,
    /// First port.
    pub port: u16,
    /// How many ports.
    pub ports: u8,
}

fn io_device_aml(dev: &IoDevice, out: &mut Vec<u8>) {
    let io = aml::IO::new(dev.port, dev.port, 4, dev.ports);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    let hid = aml::Name::new("_HID".into(), &dev.hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let path = format!("_SB_.{}", dev.name);
    aml::Device::new(path.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(out);
}

/// A PCI device's INTA: its slot on bus 0 and its I/O APIC line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIntx {
    pub slot: u8,
    pub gsi: u32,
}

/// `_SB_.PCI0`, the root bridge of segment 0, bus 0, its BARs in
/// [`PCI_MMIO_START`], its slots' INTA routed to I/O APIC lines by `_PRT`; and
/// `_SB_.MRES`, the motherboard resource that reserves the ECAM window (Linux
/// uses an MCFG window only when it is reserved so).
fn pci_aml(intx: &[PciIntx], out: &mut Vec<u8>) {
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let window = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &window]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    // _PRT entries: address (slot << 16 | 0xffff), pin 0 (INTA), source 0 (a
    // GSI, not a link device), the GSI.
    let fields: Vec<(u32, u32)> = intx
        .iter()
        .map(|i| ((u32::from(i.slot) << 16) | 0xffff, i.gsi))
        .collect();
    let entries: Vec<aml::Package> = fields
        .iter()
        .map(|(address, gsi)| aml::Package::new(vec![address, &aml::ZERO, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Package::new(entries.iter().map(|e| e as &dyn Aml).collect());
    let prt = aml::Name::new("_PRT".into(), &prt);
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt],
    )
    .to_aml_bytes(out);
    let ecam = aml::Memory32Fixed::new(false, PCI_ECAM_START as u32, ECAM_BUS_SIZE as u32);
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let uid = aml::Name::new("_UID".into(), &aml::ONE);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new("_SB_.MRES".into(), vec![&hid, &uid, &crs]).to_aml_bytes(out);
}

/// The MCFG: bus 0 of segment 0 at [`PCI_ECAM_START`].
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"VIGILMCF", OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
    let mut bytes = Vec::new();
    mcfg.to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt(virtio: &[MmioDevice], io_devices: &[IoDevice], pci: Option<&[PciIntx]>) -> Vec<u8> {
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&ACPI_S5_SLEEP_TYPE]));
    let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    com1.to_aml_bytes(&mut body);
    for (i, dev) in virtio.iter().enumerate() {
        virtio_device_aml(i, dev, &mut body);
    }
    for dev in io_devices {
        io_device_aml(dev, &mut body);
    }
    if let Some(intx) = pci {
        pci_aml(intx, &mut body);
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VIGILDST", OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = |addr| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, addr);
    let mut fadt = FADTBuilder::new(OEM_ID, *b"VIGILFAC", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.sleep_control_reg = port(u64::from(ACPI_POWER_PORT));
    fadt.sleep_status_reg = port(u64::from(ACPI_POWER_PORT));
    fadt.reset_reg = port(u64::from(ACPI_POWER_PORT));
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

fn madt(apic_ids: &[u8]) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"VIGILAPC",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START),
    );
    for (uid, &id) in apic_ids.iter().enumerate() {
        madt.add_structure(ProcessorLocalApic::new(
            uid as u8,
            id,
            EnabledStatus::Enabled,
        ));
    }
    // The I/O APIC takes the id after the last vCPU's.
    let ioapic_id = apic_ids.iter().max().map_or(0, |m| m + 1);
    madt.add_structure(IoApic::new(ioapic_id, IOAPIC_START, 0));
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    bytes
}

/// Builds the tables for vCPUs with `apic_ids`, virtio-mmio devices `virtio`,
/// the port devices `io` and, with `pci` (its devices' INTA lines), the PCI root
/// bridge, and writes them at [`ACPI_START`].
pub fn write_tables(
    mem: &GuestMemoryMmap,
    apic_ids: &[u8],
    virtio: &[MmioDevice],
    io: &[IoDevice],
    pci: Option<&[PciIntx]>,
) -> Result<AcpiTables, AcpiError> {
    let rsdp_len = Rsdp::len() as u64;
    let align = |a: u64| (a + 15) & !15;
    let mut next = align(ACPI_START.0 + rsdp_len);
    let mut tables = Vec::new();
    let mut place = |sig: [u8; 4], bytes: Vec<u8>| {
        let addr = GuestAddress(next);
        next = align(next + bytes.len() as u64);
        tables.push((sig, addr, bytes));
        addr
    };
    let dsdt_addr = place(*b"DSDT", dsdt(virtio, io, pci));
    let fadt_addr = place(*b"FACP", fadt(dsdt_addr.0));
    let madt_addr = place(*b"APIC", madt(apic_ids));
    let mut xsdt = XSDT::new(OEM_ID, *b"VIGILXSD", OEM_REVISION);
    xsdt.add_entry(fadt_addr.0);
    xsdt.add_entry(madt_addr.0);
    if pci.is_some() {
        xsdt.add_entry(place(*b"MCFG", mcfg()).0);
    }
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(*b"XSDT", xsdt_bytes);
    if next > ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: next - ACPI_START.0,
            room: ACPI_END - ACPI_START.0,
        });
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr.0);
    mem.write_slice(zerocopy::IntoBytes::as_bytes(&rsdp), ACPI_START)?;
    for (_, addr, bytes) in &tables {
        mem.write_slice(bytes, *addr)?;
    }
    Ok(AcpiTables {
        rsdp: ACPI_START,
        tables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_are_checksummed_and_linked() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let virtio = [
            MmioDevice {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ];
        let rt = IoDevice {
            name: "VRTT",
            hid: "VGL0001",
            port: 0x620,
            ports: 32,
        };
        let t = write_tables(&mem, &[0, 1, 2, 3], &virtio, &[rt], None).unwrap();

        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, t.rsdp).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]), "ACPI 1.0 checksum");
        assert!(checksum_ok(&rsdp), "extended checksum");
        assert_eq!(rsdp[15], 2, "revision 2: XSDT present");
        let xsdt_addr = u64_at(&rsdp, 24);

        for (sig, addr, bytes) in &t.tables {
            let mut in_mem = vec![0u8; bytes.len()];
            mem.read_slice(&mut in_mem, *addr).unwrap();
            assert_eq!(&in_mem, bytes);
            assert_eq!(&bytes[..4], sig);
            assert_eq!(u32_at(bytes, 4) as usize, bytes.len(), "{sig:?} length");
            assert!(checksum_ok(bytes), "{sig:?} checksum");
            assert!(addr.0 >= ACPI_START.0 && addr.0 + bytes.len() as u64 <= ACPI_END);
        }
        let find = |s: &[u8; 4]| t.tables.iter().find(|(sig, _, _)| sig == s).unwrap();
        let (_, xaddr, xsdt) = find(b"XSDT");
        assert_eq!(xaddr.0, xsdt_addr);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(entries, vec![find(b"FACP").1 .0, find(b"APIC").1 .0]);
        assert!(!t.tables.iter().any(|(sig, _, _)| sig == b"MCFG"));

        let (_, _, dsdt) = find(b"DSDT");
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"VRTT") && has(b"VGL0001"), "the RT timer is declared");
        // Its I/O port descriptor: decode16, 0x620..0x620, alignment 4, 32 ports.
        assert!(has(&[0x47, 0x01, 0x20, 0x06, 0x20, 0x06, 0x04, 0x20]));

        let (_, _, fadt) = find(b"FACP");
        assert_eq!(u64_at(fadt, 140), find(b"DSDT").1 .0, "X_DSDT");
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        // SLEEP_CONTROL_REG: system I/O, 8 bits, at the power port.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), u64::from(ACPI_POWER_PORT));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);

        let (_, _, madt) = find(b"APIC");
        assert_eq!(u32_at(madt, 36), APIC_START);
        let mut lapic_ids = Vec::new();
        let mut ioapics = 0;
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(u32_at(madt, off + 4) & 1, 1, "enabled");
                    lapic_ids.push(madt[off + 3]);
                }
                1 => {
                    ioapics += 1;
                    assert_eq!(madt[off + 2], 4, "I/O APIC id after the vCPUs");
                    assert_eq!(u32_at(madt, off + 4), IOAPIC_START);
                }
                _ => panic!("unexpected MADT entry {kind}"),
            }
            off += len;
        }
        assert_eq!(lapic_ids, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, 1);

        let (_, _, dsdt) = find(b"DSDT");
        let body = &dsdt[36..];
        assert!(body.windows(4).any(|w| w == b"_S5_"));
        assert!(body.windows(4).any(|w| w == b"COM1"));
        // Two virtio-mmio devices, each with its window and interrupt.
        assert_eq!(body.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
        for dev in &virtio {
            let mut mem32 = vec![0x86, 9, 0, 1];
            mem32.extend_from_slice(&(dev.base as u32).to_le_bytes());
            mem32.extend_from_slice(&(dev.len as u32).to_le_bytes());
            assert!(
                body.windows(mem32.len()).any(|w| w == mem32),
                "Memory32Fixed for {dev:?}"
            );
            let mut irq = vec![0x89, 6, 0, 0x03, 1];
            irq.extend_from_slice(&dev.gsi.to_le_bytes());
            assert!(
                body.windows(irq.len()).any(|w| w == irq),
                "Interrupt for {dev:?}"
            );
        }
    }

    /// With PCI: an MCFG for bus 0 at the ECAM window, linked from the XSDT, and
    /// the root bridge and the ECAM reservation in the DSDT.
    #[test]
    fn pci_adds_mcfg_and_the_root_bridge() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let intx = [PciIntx { slot: 1, gsi: 5 }, PciIntx { slot: 2, gsi: 6 }];
        let t = write_tables(&mem, &[0], &[], &[], Some(&intx)).unwrap();
        let find = |s: &[u8; 4]| t.tables.iter().find(|(sig, _, _)| sig == s).unwrap();
        let (_, mcfg_addr, mcfg) = find(b"MCFG");
        assert!(checksum_ok(mcfg));
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(mcfg, 44), PCI_ECAM_START);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 0], "segment 0, buses 0 to 0");
        let (_, _, xsdt) = find(b"XSDT");
        assert!((36..xsdt.len())
            .step_by(8)
            .any(|o| u64_at(xsdt, o) == mcfg_addr.0));
        let (_, _, dsdt) = find(b"DSDT");
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"_SEG") && has(b"_BBN") && has(b"MRES"));
        // PNP0A08 and PNP0A03 as EISA ids.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x08]) && has(&[0x41, 0xd0, 0x0a, 0x03]));
        // The BAR window: DWordMemory 0xc0000000..0xcfffffff.
        let mut window = (PCI_MMIO_START as u32).to_le_bytes().to_vec();
        window.extend_from_slice(&((PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32).to_le_bytes());
        assert!(has(&window));
        assert!(!has(b"LNRO0005"));
        // _PRT: slot 2's INTA on GSI 6 (DWord 0x2ffff, Zero, Zero, Byte 6).
        assert!(has(b"_PRT"));
        assert!(has(&[0x0c, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x0a, 0x06]));
    }
}
