//! The trivial guest of `vigil-bench boot`: the smallest ELF every VMM here boots
//! through its PVH entry. Its 32-bit code writes one line to COM1 and halts with
//! interrupts off, so the VMM has done nothing but start, load it and carry 30 or
//! so port writes: what is measured is the VMM's own start-up.

/// Where the image is loaded: 1 MiB, the lowest address every loader accepts.
const LOAD: u32 = 0x10_0000;
/// The ELF header and two program headers come first.
const CODE: usize = 64 + 2 * 56;
/// The line the guest prints.
pub const LINE: &str = "vigil-bench trivial PVH guest";

/// `cld; mov dx, 0x3f8; mov esi, MSG; l: lodsb; test al, al; jz d; out dx, al;
/// jmp l; d: cli; h: hlt; jmp h`, MSG patched in at [`MSG_OPERAND`].
const PROGRAM: [u8; 20] = [
    0xfc, // cld
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8 (COM1)
    0xbe, 0, 0, 0, 0,    // mov esi, MSG
    0xac, // l: lodsb
    0x84, 0xc0, // test al, al
    0x74, 0x03, // jz d
    0xee, // out dx, al
    0xeb, 0xf8, // jmp l
    0xfa, // d: cli
    0xf4, // h: hlt
];
/// `jmp h` (a halted vCPU with interrupts off stays halted; this is belt and braces).
const HALT_LOOP: [u8; 2] = [0xeb, 0xfd];
const MSG_OPERAND: usize = 6;

/// The ELF image: header, a PT_LOAD of the whole file at [`LOAD`], a PT_NOTE
/// with the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, an 8-byte descriptor as
/// Linux writes it), then the code and the message.
pub fn image() -> Vec<u8> {
    let mut code = PROGRAM.to_vec();
    code.extend(HALT_LOOP);
    let msg_at = CODE + code.len();
    let mut msg = format!("{LINE}\n").into_bytes();
    msg.push(0);
    let note_at = (msg_at + msg.len()).next_multiple_of(4);
    let entry = LOAD + CODE as u32;
    code[MSG_OPERAND..MSG_OPERAND + 4].copy_from_slice(&(LOAD + msg_at as u32).to_le_bytes());
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // n_namesz: "Xen\0"
    note.extend(8u32.to_le_bytes()); // n_descsz
    note.extend(18u32.to_le_bytes()); // n_type: XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend(u64::from(entry).to_le_bytes());
    let size = note_at + note.len();

    let mut elf = Vec::with_capacity(size);
    elf.extend(b"\x7fELF");
    elf.extend([2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    elf.extend([0; 8]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend(u64::from(entry).to_le_bytes()); // e_entry
    elf.extend(64u64.to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend(0u32.to_le_bytes()); // e_flags
    elf.extend(64u16.to_le_bytes()); // e_ehsize
    elf.extend(56u16.to_le_bytes()); // e_phentsize
    elf.extend(2u16.to_le_bytes()); // e_phnum
    elf.extend([0; 6]); // e_shentsize, e_shnum, e_shstrndx
    let mut phdr = |kind: u32, flags: u32, offset: usize, len: usize, align: u64| {
        elf.extend(kind.to_le_bytes());
        elf.extend(flags.to_le_bytes());
        elf.extend((offset as u64).to_le_bytes());
        elf.extend(u64::from(LOAD + offset as u32).to_le_bytes()); // p_vaddr
        elf.extend(u64::from(LOAD + offset as u32).to_le_bytes()); // p_paddr
        elf.extend((len as u64).to_le_bytes()); // p_filesz
        elf.extend((len as u64).to_le_bytes()); // p_memsz
        elf.extend(align.to_le_bytes());
    };
    phdr(1, 5, 0, size, 0x1000); // PT_LOAD, R+X
    phdr(4, 4, note_at, note.len(), 4); // PT_NOTE, R
    elf.extend(code);
    elf.extend(msg);
    elf.resize(note_at, 0);
    elf.extend(note);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_laid_out_as_its_headers_say() {
        let elf = image();
        let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
        // The code starts at the entry point.
        let entry = u64_at(24);
        assert_eq!(entry, u64::from(LOAD) + CODE as u64);
        assert_eq!(elf[CODE], 0xfc);
        // The PT_LOAD covers the whole file.
        assert_eq!(u32_at(64), 1);
        assert_eq!(u64_at(64 + 32), elf.len() as u64);
        // The note names the same entry point.
        assert_eq!(u32_at(120), 4);
        let note = u64_at(120 + 8) as usize;
        assert_eq!(note % 4, 0);
        assert_eq!(&elf[note + 12..note + 16], b"Xen\0");
        assert_eq!(u32_at(note + 8), 18);
        assert_eq!(u64_at(note + 16), entry);
        // `mov esi` points at the message, NUL-terminated.
        let msg = (u32_at(CODE + MSG_OPERAND) - LOAD) as usize;
        assert!(elf[msg..].starts_with(format!("{LINE}\n\0").as_bytes()));
    }
}
