//! A hostile snapshot state file (`vigil snapshot inspect`, `PUT
//! /snapshot/load`): any bytes must give an error or a state, never a panic, a
//! hang or an allocation the file's own length does not bound; a state then
//! goes through the checks a restore makes before it builds anything (the
//! devices' registers and queues, the carried integrity monitor). Input: a byte choosing whether the
//! header's length and checksum are mended ([`vigil_fuzz::split_mend`]), then
//! the file. The seeds (`corpus/snapshot_state/`) are real state files of the
//! test guest (`examples/seed_corpus.rs`).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vigil_fuzz::{mend_state, restore_devices, split_mend};
use vigil_introspect::live::{MonitorState, STATE_EXTENSION};
use vigil_vmm::snapshot::file;

fuzz_target!(|data: &[u8]| {
    let (mend, mut bytes) = split_mend(data);
    if mend {
        mend_state(&mut bytes);
    }
    let Ok((header, state)) = file::decode_state(Path::new("fuzz.state"), &bytes) else {
        return;
    };
    assert_eq!(header.state_bytes as usize + 32, bytes.len());
    // What inspect and a restore size guest RAM and the memory file from.
    let ram = state
        .memory
        .iter()
        .try_fold(0u64, |t, r| t.checked_add(r.bytes));
    let Some(ram) = ram else {
        panic!("RAM ranges past 2^64 bytes: {:?}", state.memory);
    };
    // A restore maps the memory file over these ranges; small ones stand in.
    let mem = (ram <= 256 << 20)
        .then(|| vigil_vmm::builder::memory_for(&state.memory).ok())
        .flatten();
    restore_devices(&state, mem.as_ref());
    if let Some(carried) = state.extensions.get(STATE_EXTENSION) {
        let _ = MonitorState::from_json(carried);
    }
});
