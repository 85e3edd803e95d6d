//! The packed pages after a memory file's RAM image (`PUT /snapshot/load`,
//! `vigil snapshot merge`, `vigil snapshot inspect --mem`): any bytes must give
//! an error or entries, never a panic, a hang or an allocation the bytes do not
//! bound; each entry then unpacks (or is refused) as a load unpacks it. Input: a
//! byte choosing whether the footer's checksum is mended
//! ([`vigil_fuzz::split_mend`]), then the section. The seed
//! (`corpus/snapshot_packed/`) is a section the VMM's writer made
//! (`examples/seed_corpus.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_fuzz::{mend_section, split_mend};
use vigil_vmm::snapshot::packed;

/// The RAM the section's pages number through: 4 MiB.
const PAGES: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let (mend, mut bytes) = split_mend(data);
    if mend {
        mend_section(&mut bytes);
    }
    let Ok(entries) = packed::parse_section(&bytes, PAGES) else {
        return;
    };
    assert!(entries.windows(2).all(|w| w[0].page < w[1].page));
    let _ = packed::unpack_each(
        &entries,
        |e| e,
        |page, bytes| {
            assert!(page < PAGES && bytes.len() == 4096);
            Ok(())
        },
    );
});
