//! Kernel symbols from a `System.map` or the kernel ELF's `.symtab`, to name guest
//! addresses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use vigil_model::config::KernelImage;

/// Symbols sorted by address.
#[derive(Clone, Debug, Default)]
pub struct SymbolTable {
    symbols: Vec<(u64, String)>,
}

/// Errors reading a `System.map`.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("--symbols {path}: cannot read it: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("--symbols {path}: line {line} is not `ADDRESS TYPE NAME`: {text:?}")]
    Parse {
        path: String,
        line: usize,
        text: String,
    },
    #[error("kernel ELF: cannot read its symbol table: {0}")]
    Elf(String),
}

/// The kernel's symbols, read the first time something needs them (a crash
/// report, introspection) from a `System.map` or else the kernel ELF's own
/// `.symtab`: a Linux kernel's table takes megabytes of the VMM's memory, which
/// most VMs never use. Clones share the one table.
#[derive(Clone, Debug)]
pub struct KernelSymbols(Arc<LazyTable>);

#[derive(Debug)]
struct LazyTable {
    map: Option<PathBuf>,
    kernel: KernelImage,
    table: OnceLock<Option<Arc<SymbolTable>>>,
}

impl KernelSymbols {
    /// The symbols of the `System.map` at `map` when there is one, else those of
    /// `kernel`'s ELF image. Nothing is read yet.
    pub fn new(map: Option<PathBuf>, kernel: KernelImage) -> Self {
        Self(Arc::new(LazyTable {
            map,
            kernel,
            table: OnceLock::new(),
        }))
    }

    /// The table, read now if nobody asked before; `None` without symbols (a
    /// bzImage, a stripped ELF) or when the `System.map` cannot be read (logged).
    pub fn get(&self) -> Option<Arc<SymbolTable>> {
        self.0.table.get_or_init(|| self.0.read()).clone()
    }
}

impl LazyTable {
    fn read(&self) -> Option<Arc<SymbolTable>> {
        let table = match (&self.map, &self.kernel) {
            (Some(path), _) => SymbolTable::load(path)
                .inspect_err(|e| tracing::warn!("no kernel symbols: {e}"))
                .ok(),
            (None, KernelImage::Embedded { bytes, .. }) => SymbolTable::from_kernel_image(bytes),
            (None, KernelImage::File(path)) => match std::fs::read(path) {
                Ok(bytes) => SymbolTable::from_kernel_image(&bytes),
                Err(e) => {
                    tracing::warn!("--kernel {}: no symbols: {e}", path.display());
                    None
                }
            },
        };
        if let Some(t) = &table {
            tracing::debug!(kernel = %self.kernel, symbols = t.len(), "kernel symbols read");
        }
        table.map(Arc::new)
    }
}

impl SymbolTable {
    /// Reads a `System.map` (`ffffffff81000000 T _text` per line).
    pub fn load(path: &Path) -> Result<Self, SymbolError> {
        let text = std::fs::read_to_string(path).map_err(|source| SymbolError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, text)| SymbolError::Parse {
            path: path.display().to_string(),
            line,
            text,
        })
    }

    /// The function, object and untyped symbols of an ELF image's `.symtab`
    /// (untyped: what a linker script or assembly defines, such as `_stext`,
    /// `__start_rodata` or a label after a table), local ones included, by their
    /// link-time address; zero and absolute addresses and the assembler's `.L`
    /// labels are left out, as a `System.map` does. Rust names are demangled. An ELF without `.symtab` (stripped)
    /// gives an empty table.
    pub fn from_elf(bytes: &[u8]) -> Result<Self, SymbolError> {
        use object::{Object, ObjectSymbol, SymbolKind, SymbolSection};
        // `object` reads ELF structures in place, so it wants them 8-byte aligned;
        // an `include_bytes!` image may not be.
        let aligned: Vec<u64>;
        let bytes = if bytes.as_ptr().align_offset(8) == 0 {
            bytes
        } else {
            let mut words = vec![0u64; bytes.len().div_ceil(8)];
            zerocopy::IntoBytes::as_mut_bytes(&mut words[..])[..bytes.len()].copy_from_slice(bytes);
            aligned = words;
            &zerocopy::IntoBytes::as_bytes(&aligned[..])[..bytes.len()]
        };
        let file = object::File::parse(bytes).map_err(|e| SymbolError::Elf(e.to_string()))?;
        let mut symbols: Vec<(u64, String)> = file
            .symbols()
            .filter(|s| s.address() != 0)
            .filter(|s| {
                !matches!(
                    s.section(),
                    SymbolSection::Absolute | SymbolSection::Undefined
                )
            })
            // As `nm` (and so System.map) lists them: untyped symbols too, local
            // ones included (assembly labels such as a table's end), but not the
            // assembler's own `.L` labels.
            .filter(|s| {
                matches!(
                    s.kind(),
                    SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown
                )
            })
            .filter_map(|s| Some((s.address(), s.name().ok()?)))
            .filter(|(_, name)| !name.is_empty() && !name.starts_with(".L"))
            // Rust symbols (a Rust kernel, Rust for Linux) by their path, without
            // the hash: `vigil_test_guest::cpu::IDT`, not `_ZN16vigil_test_guest...E`.
            .map(|(addr, name)| match rustc_demangle::try_demangle(name) {
                Ok(d) => (addr, format!("{d:#}")),
                Err(_) => (addr, name.to_string()),
            })
            .collect();
        symbols.sort();
        symbols.dedup();
        Ok(Self { symbols })
    }

    /// [`SymbolTable::from_elf`] when `bytes` are an ELF image with symbols;
    /// `None` for anything else (a bzImage, a stripped ELF, a damaged one).
    pub fn from_kernel_image(bytes: &[u8]) -> Option<Self> {
        if !bytes.starts_with(b"\x7fELF") {
            return None;
        }
        match Self::from_elf(bytes) {
            Ok(t) if !t.is_empty() => Some(t),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!("no symbols from the kernel: {e}");
                None
            }
        }
    }

    /// Parses `System.map` text; on error, the 1-based line number and its text.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut symbols = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if let Some(sym) = parse_line(line).map_err(|()| (i + 1, line.to_string()))? {
                symbols.push(sym);
            }
        }
        symbols.sort_by_key(|(a, _)| *a);
        Ok(Self { symbols })
    }

    /// Parses `System.map` text, skipping lines that are not `ADDRESS TYPE NAME`;
    /// also returns how many lines it skipped.
    pub fn parse_lenient(text: &str) -> (Self, usize) {
        let mut symbols = Vec::new();
        let mut skipped = 0;
        for line in text.lines() {
            match parse_line(line) {
                Ok(Some(sym)) => symbols.push(sym),
                Ok(None) => {}
                Err(()) => skipped += 1,
            }
        }
        symbols.sort_by_key(|(a, _)| *a);
        (Self { symbols }, skipped)
    }

    /// How many symbols the table holds.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether the table holds no symbol.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The symbol at or below `addr`, and the offset into it.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.symbols.partition_point(|(a, _)| *a <= addr);
        let (start, name) = self.symbols.get(i.checked_sub(1)?)?;
        Some((name, addr - start))
    }

    /// The address of the symbol called `name`.
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.symbols
            .iter()
            .find(|(_, n)| n == name)
            .map(|(a, _)| *a)
    }

    /// Formats `addr` as `name+0xoff`, or nothing when no symbol covers it.
    pub fn describe(&self, addr: u64) -> Option<String> {
        self.lookup(addr)
            .map(|(name, off)| format!("{name}+{off:#x}"))
    }
}

/// One line: `Ok(None)` for a blank line or an absolute symbol, `Err` for a malformed one.
fn parse_line(line: &str) -> Result<Option<(u64, String)>, ()> {
    let mut parts = line.split_whitespace();
    let (Some(addr), Some(kind), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return if line.trim().is_empty() {
            Ok(None)
        } else {
            Err(())
        };
    };
    let addr = u64::from_str_radix(addr, 16).map_err(|_| ())?;
    // Absolute symbols (`A`) are not places in the kernel image.
    if kind.eq_ignore_ascii_case("a") {
        return Ok(None);
    }
    Ok(Some((addr, name.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 A VDSO32_PRELINK
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000100 t secondary_startup_64
ffffffff81a00000 T entry_SYSCALL_64
";

    #[test]
    fn looks_up_nearest_symbol_below() {
        let t = SymbolTable::parse(MAP).unwrap();
        assert_eq!(
            t.describe(0xffffffff81000104).unwrap(),
            "secondary_startup_64+0x4"
        );
        assert_eq!(t.lookup(0xffffffff81a00000), Some(("entry_SYSCALL_64", 0)));
        assert_eq!(t.lookup(0x1000), None, "absolute symbols are skipped");
        assert_eq!(t.address_of("entry_SYSCALL_64"), Some(0xffffffff81a00000));
    }

    #[test]
    fn symbols_from_the_test_guest_elf() {
        let t = SymbolTable::from_elf(vigil_test_guest::ELF).unwrap();
        let entry = t.address_of("syscall_entry").expect("syscall_entry");
        let kmain = t.address_of("kmain").expect("kmain");
        assert!(
            entry >= 0x10_0000 && kmain >= 0x10_0000,
            "{entry:#x} {kmain:#x}"
        );
        assert_eq!(t.describe(kmain + 1).unwrap(), "kmain+0x1");
        // Rust statics by their path, without the mangling or the hash.
        let idt = t
            .address_of("vigil_test_guest::cpu::IDT")
            .expect("demangled");
        assert_eq!(
            t.describe(idt + 8).unwrap(),
            "vigil_test_guest::cpu::IDT+0x8"
        );
        assert!(t.address_of("_ZN16vigil_test_guest3cpu3IDT").is_none());
        assert!(SymbolTable::from_elf(b"not an elf").is_err());
        assert!(SymbolTable::from_kernel_image(b"MZ...").is_none());
        assert!(SymbolTable::from_kernel_image(vigil_test_guest::ELF).is_some());
    }

    #[test]
    fn symbols_from_vmlinux_match_its_system_map() {
        // `../shared` next to the repository (or `VIGIL_SHARED_DIR`).
        let dir = std::env::var_os("VIGIL_SHARED_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
            })
            .join("guest-kernels/linux-6.1-tiny");
        let (vmlinux, map) = (dir.join("vmlinux"), dir.join("System.map"));
        let (Ok(elf), Ok(map)) = (std::fs::read(&vmlinux), std::fs::read_to_string(&map)) else {
            eprintln!("SKIP: {} not found", vmlinux.display());
            return;
        };
        let from_elf = SymbolTable::from_elf(&elf).unwrap();
        let (from_map, _) = SymbolTable::parse_lenient(&map);
        for name in [
            "entry_SYSCALL_64",
            "start_kernel",
            "_stext",
            "_etext",
            "__start_rodata",
        ] {
            let want = from_map.address_of(name);
            assert!(want.is_some(), "{name} not in System.map");
            assert_eq!(from_elf.address_of(name), want, "{name}");
        }
        assert!(
            from_elf.len() * 10 >= from_map.len() * 9,
            "{} symbols from the ELF, {} in System.map",
            from_elf.len(),
            from_map.len()
        );
    }

    #[test]
    fn reports_bad_lines() {
        let e =
            SymbolTable::parse("ffffffff81000000 T _text\nnot a symbol line at all\n").unwrap_err();
        assert_eq!(e.0, 2);
        assert_eq!(SymbolTable::parse("zzzz T x").unwrap_err().0, 1);
    }

    #[test]
    fn lenient_parse_skips_bad_lines() {
        let (t, skipped) =
            SymbolTable::parse_lenient("ffffffff81000000 T _text\ngarbage\nzzzz T x\n\n");
        assert_eq!(skipped, 2);
        assert_eq!(t.len(), 1);
        assert_eq!(t.address_of("_text"), Some(0xffffffff81000000));
    }
}
