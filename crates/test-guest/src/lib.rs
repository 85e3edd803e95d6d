//! Vigil's test guest, built from `guest/` by this crate's build script.
//!
//! The VMM's integration tests boot [`ELF`] and parse its serial output (see
//! `guest/README.md` for the boot protocol, the scenarios and the output format).

/// The test guest's ELF image (PVH entry), built from guest/ by build.rs.
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vigil-test-guest.elf"));

/// Path of the built image, for tools that want a file (QEMU's `-kernel`, objdump).
pub const ELF_PATH: &str = concat!(env!("OUT_DIR"), "/vigil-test-guest.elf");

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
