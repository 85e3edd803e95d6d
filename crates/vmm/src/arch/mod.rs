//! Architecture-specific parts of building a VM.

pub mod x86_64;
