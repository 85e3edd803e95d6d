//! Kernel symbols from a `System.map`, to name guest addresses.

use std::path::Path;

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

    /// Parses `System.map` text; on error, the 1-based line number and its text.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut symbols = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let mut parts = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                if line.trim().is_empty() {
                    continue;
                }
                return Err((i + 1, line.to_string()));
            };
            let addr = u64::from_str_radix(addr, 16).map_err(|_| (i + 1, line.to_string()))?;
            // Absolute symbols (`A`) are not places in the kernel image.
            if !kind.eq_ignore_ascii_case("a") {
                symbols.push((addr, name.to_string()));
            }
        }
        symbols.sort_by_key(|(a, _)| *a);
        Ok(Self { symbols })
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
    fn reports_bad_lines() {
        let e =
            SymbolTable::parse("ffffffff81000000 T _text\nnot a symbol line at all\n").unwrap_err();
        assert_eq!(e.0, 2);
        assert_eq!(SymbolTable::parse("zzzz T x").unwrap_err().0, 1);
    }
}
