//! The PVH `hvm_start_info`: command line, memory map, RSDP. Copied out at boot so the
//! scenarios may reuse the memory the VMM put them in.

use crate::paging;

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MAX_REGIONS: usize = 32;
const CMDLINE_MAX: usize = 1024;
const E820_RAM: u32 = 1;

#[derive(Clone, Copy)]
pub struct Region {
    pub base: u64,
    pub size: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.base + self.size
    }
}

pub struct BootInfo {
    pub rsdp: u64,
    ram: [Region; MAX_REGIONS],
    ram_count: usize,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
}

/// Reads a `T` at physical address `addr` (identity-mapped, possibly unaligned).
fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the VMM hands over valid structures; addresses are identity-mapped first.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl BootInfo {
    /// Parses `hvm_start_info` at `addr`; a bad magic yields an empty description.
    pub fn parse(addr: u64) -> BootInfo {
        let mut info = BootInfo {
            rsdp: 0,
            ram: [Region { base: 0, size: 0 }; MAX_REGIONS],
            ram_count: 0,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
        };
        if !paging::map(addr) || read::<u32>(addr) != START_INFO_MAGIC {
            return info;
        }
        let version: u32 = read(addr + 4);
        let cmdline: u64 = read(addr + 24);
        info.rsdp = read(addr + 32);
        if cmdline != 0 && paging::map(cmdline) {
            while info.cmdline_len < CMDLINE_MAX {
                let byte: u8 = read(cmdline + info.cmdline_len as u64);
                if byte == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = byte;
                info.cmdline_len += 1;
            }
        }
        // The memory map arrived with version 1.
        let (memmap, entries): (u64, u32) = if version >= 1 {
            (read(addr + 40), read(addr + 48))
        } else {
            (0, 0)
        };
        if memmap != 0 && paging::map(memmap) {
            for i in 0..u64::from(entries) {
                let entry = memmap + 24 * i;
                let region = Region {
                    base: read(entry),
                    size: read(entry + 8),
                };
                if read::<u32>(entry + 16) == E820_RAM
                    && region.size != 0
                    && info.ram_count < MAX_REGIONS
                {
                    info.ram[info.ram_count] = region;
                    info.ram_count += 1;
                }
            }
        }
        info
    }

    pub fn ram(&self) -> &[Region] {
        &self.ram[..self.ram_count]
    }

    pub fn ram_kib(&self) -> u64 {
        self.ram().iter().map(|r| r.size / 1024).sum()
    }

    /// End of the highest RAM region.
    pub fn ram_top(&self) -> u64 {
        self.ram().iter().map(Region::end).max().unwrap_or(0)
    }

    /// The kernel command line (as copied at boot, at most 1 KiB).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The value of the last `KEY=VALUE` word for `key` (`key` without the `=`).
    pub fn param(&self, key: &[u8]) -> Option<&[u8]> {
        self.cmdline()
            .split(|&b| b == b' ')
            .filter_map(|word| {
                word.strip_prefix(key)
                    .and_then(|rest| rest.strip_prefix(b"="))
            })
            .last()
    }

    /// `key=N` as a decimal number within `min..=max`: `Ok(None)` without the word,
    /// `Err(value)` when it is not such a number.
    pub fn param_number(&self, key: &[u8], min: u64, max: u64) -> Result<Option<u64>, &[u8]> {
        let Some(value) = self.param(key) else {
            return Ok(None);
        };
        let mut n = 0u64;
        for &c in value {
            if !c.is_ascii_digit() {
                return Err(value);
            }
            n = n.saturating_mul(10).saturating_add(u64::from(c - b'0'));
        }
        if value.is_empty() || n < min || n > max {
            return Err(value);
        }
        Ok(Some(n))
    }

    /// Scenario names from `test=NAME[,NAME...]` words, in command-line order.
    pub fn scenarios(&self) -> impl Iterator<Item = &[u8]> {
        self.cmdline[..self.cmdline_len]
            .split(|&b| b == b' ')
            .filter_map(|word| word.strip_prefix(b"test="))
            .flat_map(|list| list.split(|&b| b == b','))
            .filter(|name| !name.is_empty())
    }
}
