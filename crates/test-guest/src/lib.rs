//! Vigil's test guest, built from `guest/` by this crate's build script.
//!
//! The VMM's integration tests boot [`ELF`] and parse its serial output (see
//! `guest/README.md` for the boot protocol, the scenarios and the output format).

/// The test guest's ELF image (PVH entry), built from guest/ by build.rs.
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vigil-test-guest.elf"));

/// Path of the built image, for tools that want a file (QEMU's `-kernel`, objdump).
pub const ELF_PATH: &str = concat!(env!("OUT_DIR"), "/vigil-test-guest.elf");

/// Word `w` (0..512) of page `i` of the `compress` scenario's mix, as the guest
/// writes it (`guest/src/density.rs`): by `i % 4`, zeros, one of four distinct
/// pages, text, random data.
pub fn compress_mix_word(i: u64, w: u64) -> u64 {
    const TEXT: [&[u8; 8]; 4] = [b"the cold", b" pages o", b"f a gues", b"t idle.\n"];
    match i % 4 {
        0 => 0,
        1 => ((i / 4) % 4 + 1).wrapping_mul(0x0101_0101_0101_0101) ^ w,
        2 if w == 0 => i,
        2 => u64::from_le_bytes(*TEXT[(w % 4) as usize]),
        _ => {
            // splitmix64
            let mut z = (i << 20 | w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn is_an_elf_with_a_pvh_note() {
        assert_eq!(&ELF[..4], b"\x7fELF");
        // The note's name and type: "Xen\0", XEN_ELFNOTE_PHYS32_ENTRY = 18.
        let note = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
        assert!(ELF.windows(note.len()).any(|w| w == note), "no PVH note");
    }

    /// Symbol name -> (address, size if any, `nm` type letter).
    type Symbols = std::collections::HashMap<String, (u64, Option<u64>, char)>;

    /// `nm -S` of the image.
    fn symbols() -> Option<Symbols> {
        let output = Command::new("nm").args(["-S", ELF_PATH]).output().ok()?;
        if !output.status.success() {
            return None;
        }
        let mut map = std::collections::HashMap::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (addr, size, kind, name) = match fields[..] {
                [addr, size, kind, name] => (addr, Some(size), kind, name),
                [addr, kind, name] => (addr, None, kind, name),
                _ => continue,
            };
            let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
            let kind = kind.chars().next().unwrap();
            map.insert(name.to_string(), (hex(addr), size.map(hex), kind));
        }
        Some(map)
    }

    #[test]
    fn kernel_layout_symbols_are_visible() {
        let Some(symbols) = symbols() else {
            eprintln!("nm not available: skipping the symbol check");
            return;
        };
        let get = |name: &str| {
            *symbols
                .get(name)
                .unwrap_or_else(|| panic!("no symbol {name} in the image"))
        };
        let text = get("_stext").0..get("_etext").0;
        let rodata = get("__start_rodata").0..get("__end_rodata").0;
        assert!(
            text.start < text.end && text.end <= rodata.start,
            "{text:x?} {rodata:x?}"
        );
        assert_eq!(rodata.start % 4096, 0);
        assert_eq!(rodata.end % 4096, 0);
        // .text.user (the CPL3 code) is inside the kernel text.
        assert_eq!(get("__user_start").0, text.start);

        let (table, size, kind) = get("sys_call_table");
        assert_eq!(size, Some(128), "16 function pointers");
        assert_eq!(kind, 'R', "in read-only data");
        assert!(rodata.contains(&table) && table + 128 <= rodata.end);
        for name in [
            "syscall_entry",
            "rootkit_page_fault",
            "rootkit_sys_hook",
            "rootkit_syscall_entry",
            "patch_target",
            "blk_target",
            "sys_vigil_0",
            "sys_vigil_15",
        ] {
            let (addr, size, kind) = get(name);
            assert_eq!(kind, 'T', "{name} is a global text symbol");
            assert!(size.is_some_and(|s| s > 0), "{name} has a size");
            assert!(
                text.contains(&addr),
                "{name} at {addr:#x} outside {text:x?}"
            );
        }
        // The table's entries are sys_vigil_0..15, in order, in the file.
        for n in 0..16u64 {
            let at = file_offset(table + 8 * n);
            let entry = u64::from_le_bytes(ELF[at..at + 8].try_into().unwrap());
            assert_eq!(entry, get(&format!("sys_vigil_{n}")).0, "entry {n}");
        }
        // patch_target starts with `mov $imm32, %eax` (what rootkit-text reports).
        assert_eq!(ELF[file_offset(get("patch_target").0)], 0xb8);
        // blk_target, what rootkit-blk reads a sector over, is a text page alone,
        // all `ret` (0xc3): a disk sector of anything else changes its hash.
        let (blk, size, _) = get("blk_target");
        assert_eq!((blk % 4096, size), (0, Some(4096)));
        assert!(blk + 4096 <= text.end, "{blk:#x} in {text:x?}");
        let at = file_offset(blk);
        assert!(ELF[at..at + 4096].iter().all(|&b| b == 0xc3));
    }

    /// Where the byte at `vaddr` lies in the file, through the ELF's PT_LOAD headers.
    fn file_offset(vaddr: u64) -> usize {
        let u16_at = |at: usize| u16::from_le_bytes(ELF[at..at + 2].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(ELF[at..at + 8].try_into().unwrap());
        let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
        for i in 0..usize::from(phnum) {
            let ph = phoff + i * usize::from(phentsize);
            let kind = u32::from_le_bytes(ELF[ph..ph + 4].try_into().unwrap());
            let (offset, start, filesz) = (u64_at(ph + 8), u64_at(ph + 16), u64_at(ph + 32));
            if kind == 1 && (start..start + filesz).contains(&vaddr) {
                return (offset + vaddr - start) as usize;
            }
        }
        panic!("{vaddr:#x} is not in the file");
    }

    /// Instructions the platform's CPL0 emulator cannot execute (PLATFORM.md).
    fn forbidden_at_cpl0(mnemonic: &str, operands: &str) -> bool {
        const NAMES: &[&str] = &[
            "int3",
            "cmpxchg16b",
            "clac",
            "stac",
            "popcnt",
            "fwait",
            "wait",
        ];
        NAMES.contains(&mnemonic)
            || mnemonic.starts_with("xsave")
            || mnemonic.starts_with("xrstor")
            // SSE: plain moves work, anything else (pxor, xorps, pcmpeqb, pmovmskb,
            // movq xmm,r64...) fails emulation.
            || (operands.contains("%xmm")
                && !["movdqu", "movdqa", "movups", "movaps"].contains(&mnemonic))
    }

    #[test]
    fn no_unemulated_instructions_at_cpl0() {
        let output = match Command::new("objdump")
            .args(["-d", "--no-show-raw-insn", ELF_PATH])
            .output()
        {
            Ok(output) if output.status.success() => output,
            _ => {
                eprintln!("objdump not available: skipping the CPL0 instruction check");
                return;
            }
        };
        let text = String::from_utf8_lossy(&output.stdout);
        let mut section = "";
        // Instructions of the current symbol: (line, mnemonic, operands).
        let mut symbol: Vec<(&str, &str, String)> = Vec::new();
        let mut bad = Vec::new();
        let mut check = |section: &str, symbol: &mut Vec<(&str, &str, String)>| {
            // Trailing int3s are padding (after a call to a function that never returns,
            // or up to the next symbol's alignment): never executed.
            let body = symbol
                .iter()
                .rposition(|(_, m, _)| *m != "int3")
                .map_or(0, |last| last + 1);
            if section != ".text.user" {
                for (line, mnemonic, operands) in &symbol[..body] {
                    if forbidden_at_cpl0(mnemonic, operands) {
                        bad.push(format!("{section}: {}", line.trim()));
                    }
                }
            }
            symbol.clear();
        };
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("Disassembly of section ") {
                check(section, &mut symbol);
                section = name.trim_end_matches(':');
            } else if line.ends_with(">:") {
                check(section, &mut symbol);
            } else if let Some((_, insn)) = line.split_once(":\t") {
                // Instruction lines: "  addr:\tmnemonic operands".
                let mut parts = insn.split_whitespace();
                let mnemonic = parts.next().unwrap_or("");
                symbol.push((line, mnemonic, parts.collect::<Vec<_>>().join(" ")));
            }
        }
        check(section, &mut symbol);
        assert!(
            bad.is_empty(),
            "instructions the CPL0 emulator cannot run:\n{}",
            bad.join("\n")
        );
    }
}
