//! Hostile frames of the migration stream, as either side reads them
//! (`wire::read`, `wire::expect`) and every payload decoder of the protocol
//! (`parse_hello`, `parse_answer`, `addresses`, `pages`): any bytes must decode
//! or give an error, never panic, hang or allocate more than a frame may carry.
//! Input: a byte choosing whether the frames' CRCs are mended
//! ([`vigil_fuzz::split_mend`]), then the frames. The seeds
//! (`corpus/migration_frames/`) are frames of each kind.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_fuzz::{mend_frames, split_mend};
use vigil_migration::wire::{self, Kind, MAX_PAYLOAD, PAGE};

fuzz_target!(|data: &[u8]| {
    let (mend, mut stream) = split_mend(data);
    if mend {
        mend_frames(&mut stream);
    }
    let mut input = stream.as_slice();
    while let Ok(frame) = wire::read(&mut input) {
        assert!(frame.payload.len() <= MAX_PAYLOAD);
        match frame.kind {
            Kind::Hello => {
                if let Ok((_, token)) = wire::parse_hello(&frame.payload) {
                    assert_eq!(token.len() + 12, frame.payload.len());
                }
            }
            Kind::Answer => {
                let _ = wire::parse_answer(&frame.payload);
            }
            Kind::Pages => {
                if let Some((gpa, data)) = wire::pages(&frame.payload) {
                    assert!(gpa % PAGE as u64 == 0 && !data.is_empty() && data.len() % PAGE == 0);
                }
            }
            Kind::Zeros | Kind::Pending | Kind::Want => {
                if let Some(pages) = wire::addresses(&frame.payload) {
                    assert_eq!(pages.len() * 8, frame.payload.len());
                    assert!(pages.iter().all(|p| p % PAGE as u64 == 0));
                }
            }
            _ => {}
        }
    }
    // As a reader that wants one kind: another kind or a Cancel is an error.
    let mut input = stream.as_slice();
    let _ = wire::expect(&mut input, Kind::Answer);
});
