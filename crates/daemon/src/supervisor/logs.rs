//! A VM's two logs, written by the daemon: the VMM's stdout (the guest's
//! serial console) and stderr (its own log) come through pipes, and one task
//! per pipe copies them into `console.log` and `vmm.log` in the VM's folder.
//! A log that reaches `max_bytes` is rotated (`NAME` becomes `NAME.1`, `NAME.1`
//! becomes `NAME.2`, ... up to `keep`; the oldest goes), at a line end when the
//! last 4 KiB before the limit have one. Each task holds one read buffer and
//! the log's last [`TAIL_BYTES`] (what the VM's record reports when it ends),
//! so a guest that floods its console costs the daemon a fixed amount of
//! memory, and at most `(keep + 1) * max_bytes` of disk per log.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::process::TAIL_BYTES;

/// How large a VM's log may grow, and how many rotated files it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// The most bytes one file holds (`--vm-log-max-size`).
    pub max_bytes: u64,
    /// Rotated files kept besides the current one (`--vm-log-keep`).
    pub keep: u32,
}

/// The smallest `max_bytes` the daemon takes.
pub const MIN_LOG_BYTES: u64 = 4096;
/// The most rotated files a log keeps.
pub const MAX_KEEP: u32 = 100;

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 20,
            keep: 2,
        }
    }
}

/// `NAME.k`: the `k`th newest rotated file of the log at `path`.
pub fn rotated(path: &Path, k: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{k}"));
    PathBuf::from(name)
}

fn create(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// One log file of a VM, rotated at its limit.
pub(super) struct RotatingLog {
    path: PathBuf,
    file: File,
    written: u64,
    limits: LogLimits,
    /// Whether the file ends at a line end (or is empty).
    ends_line: bool,
    /// Whether a failed write was reported (one report per log).
    reported: bool,
}

/// How far before its limit a file may end, to end at a line end.
const LINE_SLACK: usize = 4096;

impl RotatingLog {
    /// Creates (or empties) the log at `path`.
    pub(super) fn create(path: PathBuf, limits: LogLimits) -> std::io::Result<Self> {
        Ok(Self {
            file: create(&path)?,
            path,
            written: 0,
            limits,
            ends_line: true,
            reported: false,
        })
    }

    /// Appends `bytes`, rotating as often as the limit says. A failure is
    /// logged once and the bytes dropped: the VM's output is never held up.
    fn write(&mut self, mut bytes: &[u8]) {
        let max = self.limits.max_bytes;
        while !bytes.is_empty() {
            if self.written >= max {
                if let Err(e) = self.rotate() {
                    self.report("cannot rotate", &e);
                    // Whatever happens, the file stays within its limit.
                    let _ = self.file.set_len(0);
                    let _ = std::io::Seek::seek(&mut self.file, std::io::SeekFrom::Start(0));
                }
                self.written = 0;
                self.ends_line = true;
            }
            let room = (max - self.written) as usize;
            let (n, full) = if bytes.len() <= room {
                (bytes.len(), false)
            } else {
                // End the file at a line end when one is near the limit.
                let near = room.saturating_sub(LINE_SLACK);
                match bytes[near..room].iter().rposition(|&b| b == b'\n') {
                    Some(nl) => (near + nl + 1, true),
                    // The file already ends a line close enough to its limit.
                    None if near == 0 && self.ends_line && self.written > 0 => (0, true),
                    None => (room, true),
                }
            };
            if n > 0 {
                if let Err(e) = self.file.write_all(&bytes[..n]) {
                    self.report("cannot write", &e);
                }
                self.ends_line = bytes[n - 1] == b'\n';
            }
            // A full file is done: the rest starts the next.
            self.written = if full { max } else { self.written + n as u64 };
            bytes = &bytes[n..];
        }
    }

    /// `NAME` -> `NAME.1` -> ... -> `NAME.keep`; a new, empty `NAME`.
    fn rotate(&mut self) -> std::io::Result<()> {
        let keep = self.limits.keep;
        if keep > 0 {
            for k in (1..keep).rev() {
                match std::fs::rename(rotated(&self.path, k), rotated(&self.path, k + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.file = create(&self.path)?;
        Ok(())
    }

    fn report(&mut self, what: &str, e: &std::io::Error) {
        if !self.reported {
            self.reported = true;
            tracing::warn!(
                "{what} {}: {e} (its output is dropped meanwhile)",
                self.path.display()
            );
        }
    }
}

/// The last [`TAIL_BYTES`] of a stream.
#[derive(Default)]
struct Tail {
    bytes: VecDeque<u8>,
    /// Whether earlier bytes were dropped.
    cut: bool,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        let max = TAIL_BYTES as usize;
        let bytes = if bytes.len() > max {
            self.cut = true;
            &bytes[bytes.len() - max..]
        } else {
            bytes
        };
        let over = (self.bytes.len() + bytes.len()).saturating_sub(max);
        if over > 0 {
            self.cut = true;
            self.bytes.drain(..over);
        }
        self.bytes.extend(bytes);
    }

    /// The text, from a line start when it was cut.
    fn text(self) -> String {
        let bytes: Vec<u8> = self.bytes.into();
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if self.cut {
            if let Some(nl) = text.find('\n') {
                text.drain(..=nl);
            }
        }
        text
    }
}

/// Copies a pipe into `log` until the pipe ends; returns the end of what came
/// through (at most [`TAIL_BYTES`]).
pub(super) async fn copy(mut pipe: impl AsyncRead + Unpin, mut log: RotatingLog) -> String {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut tail = Tail::default();
    loop {
        let n = match pipe.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(
                    "cannot read the VMM's output for {}: {e}",
                    log.path.display()
                );
                break;
            }
        };
        // Local file writes land in the page cache: short enough to make here.
        log.write(&buffer[..n]);
        tail.push(&buffer[..n]);
    }
    tail.text()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vigil-logs-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn lines(from: usize, to: usize) -> String {
        (from..to).map(|i| format!("line {i}\n")).collect()
    }

    #[test]
    fn rotates_at_line_ends_within_the_limit() {
        let dir = scratch("rotate");
        let path = dir.join("console.log");
        let limits = LogLimits {
            max_bytes: 4096,
            keep: 2,
        };
        let mut log = RotatingLog::create(path.clone(), limits).unwrap();
        let text = lines(0, 20_000);
        // In uneven pieces, as a pipe gives them.
        for piece in text.as_bytes().chunks(1000) {
            log.write(piece);
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let files = [rotated(&path, 2), rotated(&path, 1), path.clone()];
        for (i, f) in files.iter().enumerate() {
            let t = read(f);
            assert!(t.len() <= 4096, "{}: {} bytes", f.display(), t.len());
            // A rotated file was filled up to its last whole line.
            let rotated = i < 2;
            assert!(
                !rotated || t.len() > 4096 - 20,
                "{}: only {} bytes",
                f.display(),
                t.len()
            );
            assert!(
                t.starts_with("line ") && t.ends_with('\n'),
                "{}",
                f.display()
            );
        }
        assert!(!rotated(&path, 3).exists());
        // The three files are the end of the text, in order, nothing lost between.
        let kept: String = files.iter().map(|f| read(f)).collect();
        assert!(text.ends_with(&kept));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn without_rotated_files_the_log_starts_over() {
        let dir = scratch("keep0");
        let path = dir.join("vmm.log");
        let limits = LogLimits {
            max_bytes: 4096,
            keep: 0,
        };
        let mut log = RotatingLog::create(path.clone(), limits).unwrap();
        // One write larger than the limit, without line ends.
        log.write(&vec![b'x'; 10_000]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10_000 - 2 * 4096);
        assert!(!rotated(&path, 1).exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tails_start_at_a_line() {
        let mut tail = Tail::default();
        let text = lines(0, 1000);
        for piece in text.as_bytes().chunks(777) {
            tail.push(piece);
        }
        let t = tail.text();
        assert!(t.starts_with("line ") && t.ends_with("line 999\n"), "{t}");
        assert!(t.len() <= TAIL_BYTES as usize);
        let mut short = Tail::default();
        short.push(b"a\nb\n");
        assert_eq!(short.text(), "a\nb\n");
    }

    #[tokio::test]
    async fn copies_a_pipe_and_returns_its_end() {
        let dir = scratch("copy");
        let path = dir.join("console.log");
        let limits = LogLimits {
            max_bytes: 4096,
            keep: 1,
        };
        let log = RotatingLog::create(path.clone(), limits).unwrap();
        let text = lines(0, 5000);
        let tail = copy(text.as_bytes(), log).await;
        assert!(tail.ends_with("line 4999\n"), "{tail}");
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with("line 4999\n"));
        assert!(rotated(&path, 1).exists() && !rotated(&path, 2).exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
