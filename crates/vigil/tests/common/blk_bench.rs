//! The test guest's `blk-bench` under Vigil: a run on a fresh image, its PASS
//! line's figures and the block device's metrics.

use std::path::PathBuf;

use super::{run, Run, TIMEOUT};

/// A fresh 64 MiB image and a metrics path, removed on drop.
pub struct Files {
    pub disk: PathBuf,
    pub metrics: PathBuf,
}

impl Files {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let disk = dir.join(format!("vigil-blkq-{pid}-{name}.img"));
        let metrics = dir.join(format!("vigil-blkq-{pid}-{name}.json"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        std::fs::remove_file(&metrics).ok();
        Files { disk, metrics }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        std::fs::remove_file(&self.disk).ok();
        std::fs::remove_file(&self.metrics).ok();
    }
}

/// What one `blk-bench` run reported: its PASS line's figures and the block
/// device's metrics.
pub struct Bench {
    pub figures: Vec<(String, u64)>,
    pub block: serde_json::Value,
    pub run: Run,
}

impl Bench {
    pub fn figure(&self, key: &str) -> u64 {
        self.figures
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {key} in the PASS line\n{}", self.run))
    }

    pub fn metric(&self, key: &str) -> u64 {
        self.block[key]
            .as_u64()
            .unwrap_or_else(|| panic!("block.{key} missing: {}", self.block))
    }

    /// Reads and writes the device completed.
    pub fn requests(&self) -> u64 {
        self.metric("read_count") + self.metric("write_count")
    }
}

/// Runs the test guest with `cmdline` (and `extra` options) on `files`' image,
/// the disk with `options` (`io_engine=async`, ...); the run and the VM's
/// metrics at its end.
pub fn run_on_disk(
    files: &Files,
    options: &str,
    cmdline: &str,
    extra: &[&str],
) -> (Run, serde_json::Value) {
    let disk = format!("path={},{options}", files.disk.display());
    let mut args = vec![
        "run",
        "--memory",
        "128",
        "--disk",
        &disk,
        "--metrics-path",
        files.metrics.to_str().unwrap(),
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    let run = run(&args, TIMEOUT);
    let text = std::fs::read_to_string(&files.metrics).expect("the metrics file");
    let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    (run, m)
}

/// Runs `blk-bench` with `params` (and `extra` options) on a fresh image, the
/// disk with `options` (`io_engine=async`, ...).
pub fn bench(name: &str, params: &str, extra: &[&str], options: &str) -> Bench {
    let files = Files::new(name);
    let cmdline = format!("test=blk-bench {params}");
    let (run, metrics) = run_on_disk(&files, options, &cmdline, extra);
    let line = run.line("TEST blk-bench ");
    assert!(line.starts_with("TEST blk-bench PASS"), "{run}");
    let figures = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    Bench {
        figures,
        block: metrics["block"].clone(),
        run,
    }
}
