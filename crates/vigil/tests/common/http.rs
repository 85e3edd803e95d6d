//! A minimal HTTP/1.1 client over a Unix socket, for the API tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// An answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `fault_message` of an error answer.
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {:?}", self.body))
            .to_string()
    }
}

/// Sends one request (`body` empty for none) and reads the whole answer.
pub fn request(sock: &Path, method: &str, path: &str, body: &str) -> Answer {
    try_request(sock, method, path, body).unwrap_or_else(|| panic!("{method} {path}: no answer"))
}

/// As [`request`]; `None` when the connection closes without an answer (the
/// process behind the socket died first).
pub fn try_request(sock: &Path, method: &str, path: &str, body: &str) -> Option<Answer> {
    let mut stream =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    if raw.is_empty() {
        return None;
    }
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {raw:?}"));
    Some(Answer {
        status,
        body: body.to_string(),
    })
}

/// Waits until something listens on `sock`.
pub fn wait_for(sock: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {} after {timeout:?}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
