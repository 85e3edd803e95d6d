//! The x86_64 platform: memory layout, boot protocols, ACPI, CPUID and vCPU setup.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
