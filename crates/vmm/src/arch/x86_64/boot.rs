//! Loading a kernel and its initrd, and writing what the boot protocol hands it:
//! PVH `hvm_start_info` or the Linux zero page (`boot_params`), the command line,
//! and the memory map.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::Path;

use crate::GuestMemoryMmap;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

use super::layout::{
    E820Entry, CMDLINE_START, HIMEM_START, MEMMAP_START, MMIO_HOLE_START, MODLIST_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use vigil_model::config::{BootProtocol, FieldError, KernelImage};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 4096;
/// Offset of the 64-bit entry (`startup_64`) from the start of a bzImage's
/// protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// How the first vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `EBX` = `hvm_start_info`.
    Pvh(GuestAddress),
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `RSI` = zero page.
    Linux64(GuestAddress),
}

/// A kernel placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Where to start.
    pub entry: EntryPoint,
    /// First byte after the kernel (the initrd must not go below).
    pub end: u64,
    /// The bzImage's setup header, when it was one.
    pub setup_header: Option<setup_header>,
}

/// An initrd placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Errors while loading the kernel and writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel_image_path {image:?}: cannot read it: {source}")]
    ReadKernel {
        image: String,
        source: std::io::Error,
    },
    #[error(
        "kernel_image_path {image:?}: neither an ELF vmlinux nor a bzImage (ELF: {elf}; bzImage: {bzimage})"
    )]
    UnknownFormat {
        image: String,
        elf: String,
        bzimage: String,
    },
    #[error("kernel_image_path {image:?}: does not fit in {memory_mib} MiB of guest memory (needs memory up to {end:#x}): {detail}")]
    KernelTooBig {
        image: String,
        memory_mib: u64,
        end: u64,
        detail: String,
    },
    #[error("kernel_image_path {image:?}: has no PVH entry note, but the PVH boot protocol was asked for")]
    NoPvhEntry { image: String },
    #[error("initrd_path {path:?}: cannot read it: {source}")]
    ReadInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd_path {path:?}: {size} bytes do not fit in guest memory between the kernel (ends at {kernel_end:#x}) and {limit:#x}")]
    InitrdTooBig {
        path: String,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot write boot information to guest memory: {0}")]
    Write(String),
}

impl FieldError for BootError {
    fn field(&self) -> &'static str {
        match self {
            BootError::ReadInitrd { .. } | BootError::InitrdTooBig { .. } => "initrd_path",
            BootError::Write(_) => "",
            _ => "kernel_image_path",
        }
    }
}

/// Loads `image` into `mem` and chooses its entry point.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    image: &KernelImage,
    protocol: BootProtocol,
    memory_bytes: u64,
) -> Result<LoadedKernel, BootError> {
    match image {
        KernelImage::File(path) => {
            let mut file = File::open(path).map_err(|source| BootError::ReadKernel {
                image: image.to_string(),
                source,
            })?;
            load_from(mem, &mut file, image, protocol, memory_bytes)
        }
        KernelImage::Embedded { bytes, .. } => {
            load_from(mem, &mut Cursor::new(*bytes), image, protocol, memory_bytes)
        }
    }
}

fn load_from<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    reader: &mut F,
    image: &KernelImage,
    protocol: BootProtocol,
    memory_bytes: u64,
) -> Result<LoadedKernel, BootError> {
    let name = image.to_string();
    let low_ram_end = memory_bytes.min(MMIO_HOLE_START);
    let too_big = |end: u64, detail: String| BootError::KernelTooBig {
        image: name.clone(),
        memory_mib: memory_bytes >> 20,
        end,
        detail,
    };

    match Elf::load(mem, None, reader, Some(HIMEM_START)) {
        Ok(res) => {
            if res.kernel_end > low_ram_end {
                return Err(too_big(res.kernel_end, "segments end past RAM".into()));
            }
            let entry = match (res.pvh_boot_cap, protocol) {
                (
                    PvhBootCapability::PvhEntryPresent(addr),
                    BootProtocol::Auto | BootProtocol::Pvh,
                ) => EntryPoint::Pvh(addr),
                (_, BootProtocol::Pvh) => return Err(BootError::NoPvhEntry { image: name }),
                _ => EntryPoint::Linux64(res.kernel_load),
            };
            Ok(LoadedKernel {
                entry,
                end: res.kernel_end,
                setup_header: None,
            })
        }
        Err(elf_err) if is_elf(reader) => Err(too_big(0, elf_err.to_string())),
        Err(elf_err) => {
            if protocol == BootProtocol::Pvh {
                return Err(BootError::NoPvhEntry { image: name });
            }
            let res = BzImage::load(mem, None, reader, Some(HIMEM_START)).map_err(|bz_err| {
                BootError::UnknownFormat {
                    image: name.clone(),
                    elf: elf_err.to_string(),
                    bzimage: bz_err.to_string(),
                }
            })?;
            let hdr = res.setup_header.expect("bzImage loader returns its header");
            // The kernel decompresses in place and needs `init_size` bytes from its start.
            let end = res.kernel_load.0 + u64::from(hdr.init_size).max(res.kernel_end);
            if end > low_ram_end {
                return Err(too_big(end, "the decompressed kernel needs more".into()));
            }
            Ok(LoadedKernel {
                entry: EntryPoint::Linux64(GuestAddress(
                    res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                )),
                end,
                setup_header: Some(hdr),
            })
        }
    }
}

/// Whether the image starts with the ELF magic (so a load error is not a format error).
fn is_elf<F: Read + Seek>(reader: &mut F) -> bool {
    let mut magic = [0u8; 4];
    reader.rewind().is_ok() && reader.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF"
}

/// Loads the initrd at the top of low RAM, page aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    memory_bytes: u64,
) -> Result<LoadedInitrd, BootError> {
    let name = path.display().to_string();
    let read_err = |source| BootError::ReadInitrd {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let mut limit = memory_bytes.min(MMIO_HOLE_START);
    if let Some(hdr) = kernel.setup_header {
        limit = limit.min(u64::from(hdr.initrd_addr_max) + 1);
    }
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel.end)
        .ok_or(BootError::InitrdTooBig {
            path: name.clone(),
            size,
            kernel_end: kernel.end,
            limit,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::ReadInitrd {
            path: name,
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, CMDLINE_START)
        .map_err(|e| BootError::Write(e.to_string()))
}

/// Writes the PVH start info, module list and memory map.
pub fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<LoadedInitrd>,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START.0,
        rsdp_paddr: rsdp.0,
        memmap_paddr: MEMMAP_START.0,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = MODLIST_START.0;
        let module = hvm_modlist_entry {
            paddr: initrd.addr.0,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, MODLIST_START)
            .map_err(|e| BootError::Write(e.to_string()))?;
    }
    let mut params = BootParams::new(&start_info, PVH_INFO_START);
    params.set_sections(&memmap, MEMMAP_START);
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|e| BootError::Write(e.to_string()))
}

/// Builds the Linux zero page for the 64-bit boot protocol.
pub fn zero_page(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    e820: &[E820Entry],
    initrd: Option<LoadedInitrd>,
    rsdp: GuestAddress,
) -> boot_params {
    let mut params = boot_params {
        hdr: kernel.setup_header.unwrap_or(setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT,
            ..Default::default()
        }),
        acpi_rsdp_addr: rsdp.0,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    params
}

/// Writes the zero page at [`ZERO_PAGE_START`].
pub fn write_zero_page(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, ZERO_PAGE_START)
        .map_err(|e| BootError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{e820_map, E820Type};

    const MEM: u64 = 64 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn kernel() -> LoadedKernel {
        LoadedKernel {
            entry: EntryPoint::Linux64(HIMEM_START),
            end: 0x20_0000,
            setup_header: None,
        }
    }

    #[test]
    fn pvh_start_info_carries_cmdline_memmap_initrd_and_rsdp() {
        let m = mem();
        let e820 = e820_map(MEM);
        let initrd = LoadedInitrd {
            addr: GuestAddress(0x300_0000),
            size: 1234,
        };
        write_cmdline(&m, "console=ttyS0 test=serial").unwrap();
        write_pvh_info(&m, &e820, Some(initrd), GuestAddress(0xe0000)).unwrap();
        let info: hvm_start_info = m.read_obj(PVH_INFO_START).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.memmap_entries as usize, e820.len());
        let mut cmd = [0u8; 26];
        m.read_slice(&mut cmd, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 test=serial\0");
        for (i, e) in e820.iter().enumerate() {
            let got: hvm_memmap_table_entry = m
                .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!(
                (got.addr, got.size, got.type_),
                (e.addr, e.size, e.kind as u32)
            );
        }
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 1234));
    }

    #[test]
    fn zero_page_fields() {
        let e820 = e820_map(MEM);
        let initrd = LoadedInitrd {
            addr: GuestAddress(0x300_0000),
            size: 4096,
        };
        let p = zero_page(&kernel(), 10, &e820, Some(initrd), GuestAddress(0xe0000));
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START.0 as u32);
        assert_eq!({ hdr.cmdline_size }, 10);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x300_0000, 4096)
        );
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries as usize, e820.len());
        let last = p.e820_table[e820.len() - 1];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (1 << 20, MEM - (1 << 20), E820Type::Ram as u32)
        );
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_and_must_fit() {
        let m = mem();
        let dir = std::env::temp_dir().join(format!("vigil-initrd-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5a; 5000]).unwrap();
        let got = load_initrd(&m, &dir, &kernel(), MEM).unwrap();
        assert_eq!(got.size, 5000);
        assert_eq!(got.addr.0, (MEM - 5000) & !0xfff);
        let mut back = vec![0u8; 5000];
        m.read_slice(&mut back, got.addr).unwrap();
        assert!(back.iter().all(|b| *b == 0x5a));

        let huge_kernel = LoadedKernel {
            end: MEM - 4096,
            ..kernel()
        };
        let e = load_initrd(&m, &dir, &huge_kernel, MEM)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5000 bytes do not fit"), "{e}");
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn garbage_is_neither_elf_nor_bzimage() {
        let m = mem();
        static JUNK: [u8; 4096] = [0x11; 4096];
        let image = KernelImage::Embedded {
            name: "junk",
            bytes: &JUNK,
        };
        let e = load_kernel(&m, &image, BootProtocol::Auto, MEM).unwrap_err();
        // Neutral (the configuration field), and as `vigil run` names it.
        assert!(
            e.to_string().starts_with(
                "kernel_image_path \"<embedded junk>\": neither an ELF vmlinux nor a bzImage"
            ),
            "{e}"
        );
        assert!(
            e.named("--kernel")
                .starts_with("--kernel <embedded junk>: neither an ELF vmlinux nor a bzImage"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod bzimage_tests {
    use super::*;

    /// A minimal bzImage: one setup sector after the boot sector, the setup header
    /// at 0x1f1, then the protected-mode payload.
    fn bzimage(init_size: u32) -> Vec<u8> {
        let mut image = vec![0u8; 2 * 512 + 4096];
        image[0x1f1] = 1; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&KERNEL_BOOT_FLAG_MAGIC.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        image[0x211] = 0x1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        image[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        image[1024..1028].copy_from_slice(b"KRNL");
        image
    }

    #[test]
    fn bzimage_enters_at_startup_64_with_its_header() {
        const MEM: u64 = 32 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let bytes: &'static [u8] = Box::leak(bzimage(0x80_0000).into_boxed_slice());
        let image = KernelImage::Embedded { name: "bz", bytes };
        let k = load_kernel(&mem, &image, BootProtocol::Auto, MEM).unwrap();
        assert_eq!(k.entry, EntryPoint::Linux64(GuestAddress(0x10_0200)));
        assert_eq!(
            k.end,
            0x10_0000 + 0x80_0000,
            "room for the decompressed kernel"
        );
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        let mut payload = [0u8; 4];
        mem.read_slice(&mut payload, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(&payload, b"KRNL");

        // The zero page keeps the image's header and fills in the loader's fields.
        let p = zero_page(&k, 5, &[], None, GuestAddress(0xe0000));
        assert_eq!(
            ({ p.hdr.version }, { p.hdr.type_of_loader }),
            (0x020f, 0xff)
        );

        // PVH needs an ELF note; a bzImage cannot give one.
        let e = load_kernel(&mem, &image, BootProtocol::Pvh, MEM).unwrap_err();
        assert!(matches!(e, BootError::NoPvhEntry { .. }), "{e}");
    }

    #[test]
    fn bzimage_that_cannot_decompress_in_memory_is_refused() {
        const MEM: u64 = 8 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let bytes: &'static [u8] = Box::leak(bzimage(64 << 20).into_boxed_slice());
        let image = KernelImage::Embedded { name: "bz", bytes };
        let e = load_kernel(&mem, &image, BootProtocol::Auto, MEM)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit in 8 MiB of guest memory"), "{e}");
    }
}
