//! Writes the seed corpora of the decoder fuzz targets from real snapshot state
//! files (made by `vigil run --api-sock` and `PUT /snapshot/create`, see
//! crates/vmm/README.md, "Fuzzing"), with the encoders the VMM itself uses.
//! Each seed (`seed-*`: the names `fuzz/.gitignore` keeps) is a byte that asks
//! for the checksums to be mended (they are right already), then the input
//! proper (`vigil_fuzz::split_mend`):
//!
//! - `corpus/snapshot_state/`: each state file as it is;
//! - `corpus/migration_receive/`: for the first state, what a source sends: `Hello`
//!   with the target's token, `Begin` (the state's RAM ranges), a `Pages`, a
//!   `Zeros` and a `Pending` frame, then `State`; and the same without
//!   `Pending` (pre-copy), and one the source cancels;
//! - `corpus/migration_frames/`: one frame of every kind;
//! - `corpus/snapshot_packed/`: a memory file's packed section.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus -- STATE...`

use std::path::{Path, PathBuf};

use vigil_migration::wire::{self, Kind, PAGE};
use vigil_model::config::CompressionAlgo;
use vigil_vmm::snapshot::{file, packed};

/// `vigil_fuzz::MIGRATION_TOKEN`, the token `migration_receive` waits for. Not
/// imported: what links `vigil_fuzz` links libFuzzer, whose interceptors crash
/// a program that is not a fuzz target (statically linked, as this is).
const MIGRATION_TOKEN: &str = "fuzz-token";

fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::write(&mut out, kind, payload).expect("a Vec takes every write");
    out
}

/// Saves a seed: a 0 byte (mend the checksums, which are right already: see
/// `vigil_fuzz::split_mend`), then `bytes`.
fn save(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create the corpus folder");
    let path = dir.join(name);
    std::fs::write(&path, [&[0], bytes].concat())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    println!("{}", path.display());
}

/// One page, every byte 7, as an LZ4 block (written out here: one literal, a
/// match of 4090 bytes at offset 1, then the five literals a block ends with).
fn sevens_lz4() -> Vec<u8> {
    let mut block = vec![0x1f, 7, 1, 0];
    // The match length less 4 and the token's 15, in bytes of 255 and a rest.
    let mut rest = 4090 - 4 - 15;
    while rest >= 255 {
        block.push(255);
        rest -= 255;
    }
    block.push(rest as u8);
    block.extend_from_slice(&[0x50, 7, 7, 7, 7, 7]);
    block
}

/// A memory file's packed section (its RAM image left out) as the VMM's
/// writer makes it: pages 1, 5 and 6 each the page of sevens (its bytes
/// written once).
fn packed_section() -> Vec<u8> {
    let path = std::env::temp_dir().join(format!("vigil-seed-section-{}", std::process::id()));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("a scratch file");
    let mut section = packed::SectionWriter::new(&file, 0);
    for page in [1, 5, 6] {
        section
            .push(page, CompressionAlgo::Lz4, &sevens_lz4())
            .expect("written");
    }
    section.finish().expect("written");
    let bytes = std::fs::read(&path).expect("read back");
    let _ = std::fs::remove_file(&path);
    bytes
}

/// A `Packed` payload of one page at `gpa`, every byte 7.
fn packed_payload(gpa: u64) -> Vec<u8> {
    let block = sevens_lz4();
    let mut payload = vec![wire::codec_byte(CompressionAlgo::Lz4)];
    payload.extend_from_slice(&gpa.to_le_bytes());
    payload.extend_from_slice(&(block.len() as u16).to_le_bytes());
    payload.extend_from_slice(&block);
    payload
}

fn main() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let states: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    assert!(!states.is_empty(), "usage: seed_corpus STATE_FILE...");
    let page: Vec<u8> = (0..PAGE).map(|i| i as u8).collect();
    let mut pages = 0x1000u64.to_le_bytes().to_vec();
    pages.extend_from_slice(&page);
    let zeros = wire::address_payload(&[0x2000, 0x3000]);
    let pending = wire::address_payload(&[0x4000, 0x5000]);
    let packed = packed_payload(0x6000);

    for (i, path) in states.iter().enumerate() {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, state) = file::decode_state(path, &bytes).unwrap_or_else(|e| panic!("{e}"));
        save(
            &corpus.join("snapshot_state"),
            &format!("seed-state-{i}"),
            &bytes,
        );
        // One state is enough for the stream (a state is tens of KiB: the
        // corpus stays small).
        if i > 0 {
            continue;
        }

        let begin = serde_json::to_vec(&state.memory).expect("RAM ranges encode");
        let body = serde_json::to_vec(&state).expect("a state encodes");
        let head = [
            frame(Kind::Hello, &wire::hello(MIGRATION_TOKEN)),
            frame(Kind::Begin, &begin),
            frame(Kind::Pages, &pages),
            frame(Kind::Zeros, &zeros),
        ]
        .concat();
        let dir = corpus.join("migration_receive");
        save(
            &dir,
            "seed-precopy",
            &[head.clone(), frame(Kind::State, &body)].concat(),
        );
        save(
            &dir,
            "seed-postcopy",
            &[
                head.clone(),
                frame(Kind::Pending, &pending),
                frame(Kind::State, &body),
            ]
            .concat(),
        );
        save(
            &dir,
            "seed-packed",
            &[
                head.clone(),
                frame(Kind::Packed, &packed),
                frame(Kind::State, &body),
            ]
            .concat(),
        );
        save(
            &dir,
            "seed-cancelled",
            &[head, frame(Kind::Cancel, b"the source gave up")].concat(),
        );
    }

    let every_kind = [
        frame(Kind::Hello, &wire::hello(MIGRATION_TOKEN)),
        frame(Kind::Answer, b"\x01built"),
        frame(Kind::Answer, b"\x00the source's token is wrong"),
        frame(Kind::Begin, br#"[{"guest_address":0,"bytes":33554432}]"#),
        frame(Kind::Pages, &pages),
        frame(Kind::Zeros, &zeros),
        frame(Kind::Pending, &pending),
        frame(Kind::Want, &pending),
        frame(Kind::State, b"{}"),
        frame(Kind::Commit, &[]),
        frame(Kind::Running, &[]),
        frame(Kind::Done, &[]),
        frame(Kind::Cancel, b"cancelled"),
        frame(Kind::Packed, &packed),
    ]
    .concat();
    save(
        &corpus.join("migration_frames"),
        "seed-every-kind",
        &every_kind,
    );
    save(
        &corpus.join("snapshot_packed"),
        "seed-section",
        &packed_section(),
    );
}
