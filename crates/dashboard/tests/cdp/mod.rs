//! A small Chrome DevTools Protocol client for browser tests: it starts Debian's
//! headless `chromium` with `--remote-debugging-pipe` and speaks CDP over the two
//! pipes that flag sets up (fd 3: commands in, fd 4: replies and events out, each
//! message a JSON text ended by a NUL byte).
//!
//! No WebSocket, no debugging port, no driver binary, no crate to download a browser
//! build: only `serde_json`, `libc` and the `chromium` package. Shared by
//! `crates/dashboard/tests/browser.rs` (a fake daemon) and
//! `crates/vigil/tests/dashboard.rs` (the real one) through `#[path]`.
#![allow(dead_code)] // each test uses a different subset

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The browser binary: `$VIGIL_CHROMIUM`, else the first of the usual names on `PATH`.
/// `None` (the caller prints SKIP) where there is none.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VIGIL_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// A headless browser with one page, killed (and its profile removed) on drop.
pub struct Browser {
    child: Child,
    to_browser: File,
    replies: Receiver<Value>,
    /// Console messages, uncaught exceptions and failed requests of the page, for
    /// failure reports.
    pub log: Arc<Mutex<Vec<String>>>,
    next_id: u64,
    session: String,
    profile: PathBuf,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Browser {
    /// Starts `chromium` headless with a window of `width` x `height` CSS pixels and
    /// attaches to a blank page. A browser that dies while starting (seen once on a
    /// loaded CI machine: "the browser went away" before the first target) is
    /// started again, up to three times in all.
    pub fn launch(chromium: &std::path::Path, width: u32, height: u32) -> Result<Browser, String> {
        Self::launch_with(chromium, width, height, &[])
    }

    /// [`Browser::launch`] with more command-line flags (`--ignore-certificate-errors`
    /// for a page served with a test CA's certificate).
    pub fn launch_with(
        chromium: &std::path::Path,
        width: u32,
        height: u32,
        flags: &[&str],
    ) -> Result<Browser, String> {
        let mut last = String::new();
        for attempt in 1..=3 {
            match Self::launch_once(chromium, width, height, flags) {
                Ok(b) => return Ok(b),
                Err(e) => {
                    eprintln!("chromium start {attempt}/3 failed: {e}");
                    last = e;
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            }
        }
        Err(last)
    }

    fn launch_once(
        chromium: &std::path::Path,
        width: u32,
        height: u32,
        flags: &[&str],
    ) -> Result<Browser, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let profile = std::env::temp_dir().join(format!(
            "vigil-chromium-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).map_err(|e| format!("profile dir: {e}"))?;
        let (cmd_r, cmd_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
        let (out_r, out_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
        let (child_in, child_out) = (cmd_r.as_raw_fd(), out_w.as_raw_fd());
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-breakpad",
            "--disable-client-side-phishing-detection",
            "--disable-domain-reliability",
            "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
            "--no-pings",
            "--metrics-recording-only",
            "--mute-audio",
            "--hide-scrollbars",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--window-size={width},{height}"))
        .args(flags)
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls
        // fcntl and dup2, which are async-signal-safe; it allocates nothing. The fds
        // are first moved above 10 so that placing them at 3 and 4 cannot overwrite
        // one with the other; dup2 clears close-on-exec on the copies.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(child_in, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(child_out, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", chromium.display()))?;
        drop(cmd_r);
        drop(out_w);
        let to_browser = File::from(cmd_w);
        let (tx, replies) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut r = BufReader::new(File::from(out_r));
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                let Ok(msg) = serde_json::from_slice::<Value>(&buf) else {
                    continue;
                };
                if msg.get("id").is_some() {
                    if tx.send(msg).is_err() {
                        break;
                    }
                } else if let Some(line) = describe_event(&msg) {
                    if let Ok(mut l) = log2.lock() {
                        l.push(line);
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to_browser,
            replies,
            log,
            next_id: 0,
            session: String::new(),
            profile,
        };
        let target = b.call_browser("Target.createTarget", json!({ "url": "about:blank" }))?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or("createTarget: no targetId")?
            .to_string();
        let attached = b.call_browser(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        )?;
        b.session = attached["sessionId"]
            .as_str()
            .ok_or("attachToTarget: no sessionId")?
            .to_string();
        b.call("Page.enable", json!({}))?;
        b.call("Runtime.enable", json!({}))?;
        b.call("Log.enable", json!({}))?;
        b.set_viewport(width, height)?;
        Ok(b)
    }

    fn send(&mut self, method: &str, params: Value, session: bool) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if session {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .map_err(|e| format!("{method}: writing to the browser: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(reply) if reply["id"] == json!(id) => {
                    if let Some(err) = reply.get("error") {
                        return Err(format!("{method}: {err}"));
                    }
                    return Ok(reply["result"].clone());
                }
                Ok(_) => continue, // a late reply to an earlier, timed-out call
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("{method}: no reply in 30 s"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("{method}: the browser went away"))
                }
            }
        }
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.send(method, params, false)
    }

    /// A CDP command on the page.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.send(method, params, true)
    }

    pub fn set_viewport(&mut self, width: u32, height: u32) -> Result<(), String> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .map(drop)
    }

    /// Loads `url` and waits for its `load` event.
    pub fn navigate(&mut self, url: &str) -> Result<(), String> {
        let r = self.call("Page.navigate", json!({ "url": url }))?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            return Err(format!("navigate {url}: {e}"));
        }
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(20),
        )
        .map(drop)
    }

    /// The value of a JavaScript expression (promises awaited).
    pub fn eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex["exception"]["description"]
                .as_str()
                .or(ex["text"].as_str())
                .unwrap_or("exception");
            return Err(format!("{expr}: {text}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expr` until it is truthy (returning its value) or `timeout` passes.
    pub fn wait_for(&mut self, expr: &str, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.eval(expr) {
                Ok(v) if truthy(&v) => return Ok(v),
                Ok(v) => v,
                Err(e) => json!(e),
            };
            if Instant::now() > deadline {
                return Err(format!(
                    "waited {timeout:?} for `{expr}` (last: {last})\npage log:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A real mouse click (press and release) at the middle of the element `selector`.
    pub fn click(&mut self, selector: &str) -> Result<(), String> {
        let sel = serde_json::to_string(selector).map_err(|e| e.to_string())?;
        let pos = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ))?;
        let (Some(x), Some(y)) = (pos[0].as_f64(), pos[1].as_f64()) else {
            return Err(format!("click: no element {selector}"));
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )?;
        }
        Ok(())
    }

    /// Focuses `selector` and types `text` into it as keyboard input would.
    pub fn type_into(&mut self, selector: &str, text: &str) -> Result<(), String> {
        self.click(selector)?;
        self.call("Input.insertText", json!({ "text": text }))
            .map(drop)
    }

    /// Presses Enter in the focused element.
    pub fn press_enter(&mut self) -> Result<(), String> {
        for kind in ["keyDown", "keyUp"] {
            self.call(
                "Input.dispatchKeyEvent",
                json!({ "type": kind, "key": "Enter", "code": "Enter",
                        "windowsVirtualKeyCode": 13, "text": "\r" }),
            )?;
        }
        Ok(())
    }

    /// A PNG of the viewport.
    pub fn screenshot(&mut self) -> Result<Vec<u8>, String> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }))?;
        let data = r["data"].as_str().ok_or("captureScreenshot: no data")?;
        base64_decode(data)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

fn describe_event(msg: &Value) -> Option<String> {
    let p = &msg["params"];
    match msg["method"].as_str()? {
        "Runtime.consoleAPICalled" => {
            let args: Vec<String> = p["args"]
                .as_array()?
                .iter()
                .map(|a| match &a["value"] {
                    Value::String(s) => s.clone(),
                    Value::Null => a["description"].as_str().unwrap_or("").to_string(),
                    v => v.to_string(),
                })
                .collect();
            Some(format!(
                "console.{}: {}",
                p["type"].as_str()?,
                args.join(" ")
            ))
        }
        "Runtime.exceptionThrown" => Some(format!(
            "exception: {}",
            p["exceptionDetails"]["exception"]["description"]
                .as_str()
                .or(p["exceptionDetails"]["text"].as_str())?
        )),
        "Log.entryAdded" => Some(format!(
            "log.{}: {} {}",
            p["entry"]["level"].as_str()?,
            p["entry"]["text"].as_str()?,
            p["entry"]["url"].as_str().unwrap_or("")
        )),
        _ => None,
    }
}

fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return Err(format!("base64: bad byte {c}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}
