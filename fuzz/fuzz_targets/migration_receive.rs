//! A hostile migration source against the destination (`vigil run
//! --migrate-from`): the fuzz input is everything the source sends, read by the
//! destination's own code (`receive::receive_state`) up to the VM's build: the
//! `Hello` and its token, `Begin` (guest RAM ranges), `Pages`, `Zeros`,
//! `Pending`, then `State`. Any stream must end in an error or a state, never
//! a panic, a hang or an allocation no frame asked for; a state then goes
//! through the checks a restore makes before it builds anything. Input: a byte
//! choosing whether the frames' CRCs are mended ([`vigil_fuzz::split_mend`]),
//! then the stream. The seeds (`corpus/migration_receive/`) are streams of the
//! test guest as a source sends them, with `MIGRATION_TOKEN`
//! (`examples/seed_corpus.rs`).

#![no_main]

use std::io::{Read, Write};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vigil_fuzz::{mend_frames, restore_devices, split_mend, MIGRATION_TOKEN};
use vigil_migration::receive;
use vigil_migration::target::Stream;

/// The source's side of the connection: reads come from the input, the
/// destination's answers go nowhere.
struct Source<'a>(&'a [u8]);

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Source<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for Source<'_> {
    fn set_read_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }

    fn try_clone(&self) -> std::io::Result<Box<dyn Stream>> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

fuzz_target!(|data: &[u8]| {
    let (mend, mut stream) = split_mend(data);
    if mend {
        mend_frames(&mut stream);
    }
    let mut source = Source(&stream);
    if let Ok(received) = receive::receive_state(&mut source, MIGRATION_TOKEN) {
        restore_devices(&received.state, Some(&received.mem));
    }
});
