//! `vigil daemon` (the host daemon in the foreground) and `vigil ctl` (its CLI).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;
use vigil_daemon::client::{request_blocking, ClientError, Response};

/// The daemon's socket when neither --socket nor VIGIL_SOCKET says otherwise:
/// /run/vigil/daemon.sock for root, else $XDG_RUNTIME_DIR/vigil/daemon.sock (or
/// /tmp/vigil-UID/daemon.sock without XDG_RUNTIME_DIR).
pub fn default_socket() -> PathBuf {
    if let Some(path) = std::env::var_os("VIGIL_SOCKET") {
        return path.into();
    }
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return "/run/vigil/daemon.sock".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("vigil/daemon.sock"),
        None => PathBuf::from(format!("/tmp/vigil-{uid}/daemon.sock")),
    }
}

/// /var/lib/vigil for root, else $XDG_STATE_HOME/vigil or ~/.local/state/vigil.
fn default_state_dir() -> PathBuf {
    // SAFETY: as above.
    if unsafe { libc::getuid() } == 0 {
        return "/var/lib/vigil".into();
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("vigil");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/vigil"),
        None => std::env::temp_dir().join("vigil-state"),
    }
}

pub const DAEMON_ABOUT: &str = "\
Supervise VMs on this host: one `vigil run` process per VM, created, paused, resumed,
stopped and destroyed through a REST API (see `vigil ctl`). Runs in the foreground
(for systemd: Type=simple), logs to stderr (the journal), and on SIGTERM or SIGINT
stops every VM (SIGTERM, then SIGKILL after --stop-timeout), removes its socket and
exits 0. VMs never outlive the daemon (they get SIGTERM if it dies), and a VM that
crashes is reported (state \"crashed\", its exit status and the end of its logs), never
restarted.";

pub const DAEMON_AFTER_HELP: &str = "\
Access: the Unix socket is created with mode 0600, so only this user (and root) can
use it. --listen-tcp adds a TCP listener that always needs --token-file; every request
on it must carry `Authorization: Bearer <token>`. Make a token with
  head -c 32 /dev/urandom | base64 > /etc/vigil/token && chmod 600 /etc/vigil/token

Each VM lives in STATE-DIR/vms/ID: config.json, api.sock (its own API), console.log
(its serial console), vmm.log (the VMM's log), exit.json (how it ended).

Security events: every --sample-interval the daemon reads each running VM's
metrics and the host's pressure (PSI); detectors turn them into events (a VM's I/O
or packet flood, a saturated rate limiter, host pressure). VM crashes, lifecycle
changes and refused API requests (malformed: 400; no or bad token: 401, at most 10
a minute per peer, then one summary) are events too. Events about one VM are
grouped into incidents (a flood then a crash raises incident_dos_crash), and a
policy may throttle, pause or stop the VM; each action is an event. They stream on
GET /events (server-sent events; `vigil ctl events --follow`) and go to each
--events-output: json (Falco-style JSON lines), syslog (RFC 5424) or cef, to a file
(appended) or `-` (stderr).

--events-config FILE (JSON; every key optional, unknown keys refused):
  {\"detectors\": {\"disk_ops\": {\"enter_per_s\": 20000, \"sustain_s\": 30, \"exit_per_s\": 10000},
                 \"rate_limit\": {\"consecutive_samples\": 5, \"clear_samples\": 3}},
   \"correlation\": {\"window_s\": 300},
   \"policy\": {\"cooldown_s\": 60, \"rules\": [
     {\"name\": \"slow floods\", \"when\": {\"rule\": \"vm_io_flood\"}, \"action\": \"throttle\",
      \"params\": {\"ops_per_s\": 1000}},
     {\"name\": \"dos\", \"when\": {\"rule\": \"incident_dos_crash\"}, \"action\": \"stop\"}]}}
A throttle sets token-bucket limits on the VM's drives and interfaces (params,
per second: ops_per_s, bytes_per_s, disk_ops_per_s, disk_bytes_per_s,
net_packets_per_s, net_bytes_per_s). crates/daemon/README.md lists every key.

Example:
  vigil daemon --state-dir /var/lib/vigil --socket /run/vigil/daemon.sock \\
    --events-config /etc/vigil/events.json --events-output json:/var/log/vigil/events.jsonl
  vigil ctl create web-1 --config vm.json && vigil ctl list";

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Where VM folders and the daemon's lock live [default: /var/lib/vigil for root,
    /// else ~/.local/state/vigil].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// The API's Unix socket [default: $VIGIL_SOCKET, else /run/vigil/daemon.sock for
    /// root, else $XDG_RUNTIME_DIR/vigil/daemon.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Also serve the API on TCP at ADDR (e.g. 127.0.0.1:7070). Needs --token-file.
    #[arg(long, value_name = "ADDR")]
    pub listen_tcp: Option<SocketAddr>,

    /// A file holding the bearer token for --listen-tcp (at least 16 printable
    /// characters; readable by its owner only).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Seconds a new VM may take to report itself running on its API socket.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = parse_seconds)]
    pub start_timeout: f64,

    /// Seconds a stopping VM gets after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS", value_parser = parse_seconds)]
    pub stop_timeout: f64,

    /// Seconds GET /metrics waits for each VM's own metrics.
    #[arg(long, default_value_t = 0.5, value_name = "SECONDS", value_parser = parse_seconds)]
    pub scrape_timeout: f64,

    /// The most VMs the daemon holds at once (any state).
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_vms: usize,

    /// Security events: detector thresholds, correlation window and policy, as JSON
    /// (see below) [default: the built-in thresholds, no policy].
    #[arg(long, value_name = "FILE")]
    pub events_config: Option<PathBuf>,

    /// Also write every security event to PATH (appended; `-` for stderr) as
    /// FORMAT: json (Falco-style JSON lines), syslog (RFC 5424) or cef. Repeatable.
    #[arg(long, value_name = "FORMAT:PATH", value_parser = parse_output)]
    pub events_output: Vec<vigil_daemon::events::OutputSpec>,

    /// Seconds between two samples of the VMs' metrics and the host's pressure for
    /// the detectors.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS", value_parser = parse_interval)]
    pub sample_interval: f64,
}

fn parse_output(s: &str) -> Result<vigil_daemon::events::OutputSpec, String> {
    s.parse()
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.05..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in [0.05, 60]")),
    }
}

/// `vigil ctl create --introspect period_ms=100,policy=protect`: the create
/// request's `introspect` object (the daemon checks the values).
fn parse_introspect(s: &str) -> Result<Value, String> {
    let mut out = serde_json::Map::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('=').ok_or_else(|| {
            format!("{item:?}: expected key=value (period_ms, policy, baseline_after_ms)")
        })?;
        let v = match key {
            "period_ms" | "baseline_after_ms" => {
                Value::from(value.parse::<u64>().map_err(|_| {
                    format!("{key}={value}: expected a whole number of milliseconds")
                })?)
            }
            "policy" => Value::from(value),
            _ => {
                return Err(format!(
                    "unknown key {key:?} (expected period_ms, policy, baseline_after_ms)"
                ))
            }
        };
        out.insert(key.to_owned(), v);
    }
    Ok(Value::Object(out))
}

/// Reads `--events-config`: vigil-events' `EventsConfig` as JSON.
fn read_events_config(path: &Path) -> anyhow::Result<vigil_events::EventsConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--events-config {}: cannot read it", path.display()))?;
    let config: vigil_events::EventsConfig = serde_json::from_str(&text).with_context(|| {
        format!(
            "--events-config {}: not a valid events configuration",
            path.display()
        )
    })?;
    config
        .validate()
        .with_context(|| format!("--events-config {}", path.display()))?;
    Ok(config)
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

pub fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    if args.listen_tcp.is_none() && args.token_file.is_some() {
        bail!(
            "--token-file {} is only used with --listen-tcp ADDR",
            args.token_file.unwrap_or_default().display()
        );
    }
    let vmm_binary =
        std::env::current_exe().context("cannot find the vigil binary (current_exe)")?;
    let mut config = vigil_daemon::DaemonConfig::new(
        args.state_dir.unwrap_or_else(default_state_dir),
        args.socket.unwrap_or_else(default_socket),
        vmm_binary,
    );
    config.listen_tcp = args.listen_tcp;
    config.token_file = args.token_file;
    config.start_timeout = Duration::from_secs_f64(args.start_timeout);
    config.stop_timeout = Duration::from_secs_f64(args.stop_timeout);
    config.scrape_timeout = Duration::from_secs_f64(args.scrape_timeout);
    if args.max_vms == 0 {
        bail!("--max-vms 0: the daemon must be allowed at least one VM");
    }
    config.max_vms = args.max_vms;
    if let Some(path) = &args.events_config {
        config.events.config = read_events_config(path)?;
    }
    config.events.outputs = args.events_output;
    config.events.sample_interval = Duration::from_secs_f64(args.sample_interval);
    vigil_daemon::events::validate_settings(&config.events).map_err(|e| {
        anyhow::anyhow!(
            "{}{e}",
            args.events_config
                .as_ref()
                .map(|p| format!("{}: ", p.display()))
                .unwrap_or_default()
        )
    })?;
    vigil_daemon::run(config)
}

pub const CTL_AFTER_HELP: &str = "\
Output: aligned tables for people by default; --json prints the daemon's JSON as it
came (for scripts and jq). Exit status: 0 on success, 1 when the daemon refused (its
message is printed) or cannot be reached.

Examples:
  vigil ctl create web-1 --config vm.json   # Firecracker-style config file
  vigil ctl list
  vigil ctl pause web-1 && vigil ctl resume web-1
  vigil ctl stop web-1 --timeout 5          # SIGTERM, SIGKILL after 5 s
  vigil ctl inspect web-1 --json | jq .exit
  vigil ctl destroy web-1";

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The daemon's socket [default: as `vigil daemon`'s: $VIGIL_SOCKET, else
    /// /run/vigil/daemon.sock for root, else $XDG_RUNTIME_DIR/vigil/daemon.sock].
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,

    /// Print the daemon's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// List the VMs: ID, STATE, PID, VCPUS, MEMORY, UPTIME, and how ended ones ended.
    #[command(alias = "ls")]
    List,
    /// Create a VM from a Firecracker-style JSON configuration and start it.
    Create {
        /// Its id: 1 to 64 characters from A-Z a-z 0-9 _ -.
        id: String,
        /// The configuration file ("boot-source", "machine-config", "drives", ...).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Watch the guest kernel's integrity from the start (its findings become
        /// security events): period_ms=N (1 to 3600000, default 1000),
        /// policy=report|protect, baseline_after_ms=N; `--introspect` alone takes the
        /// defaults.
        #[arg(long, value_name = "[period_ms=N][,policy=P][,baseline_after_ms=N]", num_args = 0..=1, default_missing_value = "", value_parser = parse_introspect)]
        introspect: Option<Value>,
        /// Trace the guest's system calls into syscalls.jsonl in the VM's folder:
        /// the calls to keep (read,write,59; cr3=0x... for one process), or all.
        #[arg(long, value_name = "LIST", num_args = 0..=1, default_missing_value = "")]
        trace_syscalls: Option<String>,
        /// Let the VM's API socket write into the guest (PUT /vigil/debug/...): for
        /// tests only.
        #[arg(long)]
        debug_api: bool,
    },
    /// Show everything about one VM, including how it ended and its logs' last lines.
    Inspect { id: String },
    /// Pause a running VM (its vCPUs stop; its memory stays).
    Pause { id: String },
    /// Resume a paused VM.
    Resume { id: String },
    /// Stop a VM; its record and folder stay until `destroy`.
    Stop {
        id: String,
        /// Seconds to wait before SIGKILL [default: the daemon's --stop-timeout].
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
        timeout: Option<f64>,
        /// Ask the guest to shut down (Ctrl+Alt+Del) before SIGTERM.
        #[arg(long)]
        ctrl_alt_del: bool,
    },
    /// Stop a VM (when it runs) and remove it and its folder.
    #[command(alias = "rm")]
    Destroy { id: String },
    /// Print the Prometheus metrics of the host, the daemon and every VM.
    Metrics,
    /// Check that the daemon answers.
    Health,
    /// Print the security event stream: the recent events (one line each: time,
    /// priority, rule, VM, incident, message; --json: Falco-style JSON lines), then
    /// with --follow every new one until the daemon stops or Ctrl-C.
    Events {
        /// Keep printing events as they come.
        #[arg(long, short)]
        follow: bool,
    },
}

/// How long `ctl` waits for answers that involve starting or stopping processes.
const SLOW: Duration = Duration::from_secs(120);
const FAST: Duration = Duration::from_secs(15);

fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let body = body.map(|b| b.to_string().into_bytes());
    match request_blocking(socket, method, path, body, timeout) {
        Ok(r) if r.is_success() => Ok(r),
        Ok(r) => bail!(
            "the daemon refused {method} {path} (HTTP {}): {}",
            r.status,
            r.fault_message()
        ),
        Err(ClientError::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            bail!(
                "no daemon at {}: start one with `vigil daemon` (or point --socket / VIGIL_SOCKET at its socket)",
                socket.display()
            )
        }
        Err(ClientError::Connect { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            bail!(
                "cannot connect to {}: permission denied (the daemon's socket is mode 0600: run as the daemon's user)",
                socket.display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// One VM's record as the daemon answered it: raw JSON, or a one-row table.
fn print_record(r: &Response, json: bool) {
    if json {
        print_json(r);
    } else {
        let v = r.json().unwrap_or_default();
        print!("{}", vm_table(std::slice::from_ref(&v)));
    }
}

fn print_json(r: &Response) {
    match r.json() {
        Some(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| r.text())
        ),
        None => println!("{}", r.text()),
    }
}

pub fn run_ctl(args: CtlArgs) -> anyhow::Result<()> {
    let socket = args.socket.unwrap_or_else(default_socket);
    let socket = socket.as_path();
    let json = args.json;
    // An id the daemon could never have accepted cannot even be put in a URL.
    match &args.command {
        CtlCommand::Create { id, .. }
        | CtlCommand::Inspect { id }
        | CtlCommand::Pause { id }
        | CtlCommand::Resume { id }
        | CtlCommand::Stop { id, .. }
        | CtlCommand::Destroy { id } => {
            vigil_daemon::id::validate_id(id).map_err(anyhow::Error::msg)?
        }
        CtlCommand::List | CtlCommand::Metrics | CtlCommand::Health | CtlCommand::Events { .. } => {
        }
    }
    match args.command {
        CtlCommand::List => {
            let r = call(socket, "GET", "/vms", None, FAST)?;
            if json {
                print_json(&r);
            } else {
                let vms = r
                    .json()
                    .and_then(|v| v.as_array().cloned())
                    .unwrap_or_default();
                print!("{}", vm_table(&vms));
            }
        }
        CtlCommand::Create {
            id,
            config,
            introspect,
            trace_syscalls,
            debug_api,
        } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("--config {}: cannot read it", config.display()))?;
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("--config {}: not valid JSON", config.display()))?;
            let mut body = serde_json::json!({"id": id, "config": value});
            if let Some(i) = introspect {
                body["introspect"] = i;
            }
            if let Some(t) = trace_syscalls {
                body["trace_syscalls"] = if t.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::json!({ "syscalls": t })
                };
            }
            if debug_api {
                body["debug_api"] = Value::Bool(true);
            }
            let r = call(socket, "POST", "/vms", Some(body), SLOW)?;
            print_record(&r, json);
        }
        CtlCommand::Inspect { id } => {
            let r = call(socket, "GET", &format!("/vms/{id}"), None, FAST)?;
            if json {
                print_json(&r);
            } else {
                print!("{}", describe(&r.json().unwrap_or_default()));
            }
        }
        CtlCommand::Pause { id } => state_change(socket, &id, "Paused", json)?,
        CtlCommand::Resume { id } => state_change(socket, &id, "Resumed", json)?,
        CtlCommand::Stop {
            id,
            timeout,
            ctrl_alt_del,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(t) = timeout {
                body.insert("timeout_s".into(), t.into());
            }
            if ctrl_alt_del {
                body.insert("method".into(), "ctrl-alt-del".into());
            }
            let r = call(
                socket,
                "POST",
                &format!("/vms/{id}/stop"),
                Some(Value::Object(body)),
                SLOW,
            )?;
            print_record(&r, json);
        }
        CtlCommand::Destroy { id } => {
            call(socket, "DELETE", &format!("/vms/{id}"), None, SLOW)?;
            if json {
                println!("{}", serde_json::json!({"id": id, "destroyed": true}));
            } else {
                println!("destroyed {id}");
            }
        }
        CtlCommand::Metrics => {
            let r = call(socket, "GET", "/metrics", None, FAST)?;
            print!("{}", r.text());
        }
        CtlCommand::Events { follow } => events(socket, follow, json)?,
        CtlCommand::Health => {
            let r = call(socket, "GET", "/health", None, FAST)?;
            if json {
                print_json(&r);
            } else {
                let v = r.json().unwrap_or_default();
                println!(
                    "ok: vigil daemon {} (pid {}), {} VM(s), up {}",
                    v["version"].as_str().unwrap_or("?"),
                    v["pid"],
                    v["vms"],
                    uptime(v["uptime_s"].as_f64())
                );
            }
        }
    }
    Ok(())
}

/// Splits server-sent events out of a byte stream: the `data:` of each complete
/// frame (comments and keep-alives skipped).
#[derive(Default)]
struct SseFrames {
    buf: String,
}

impl SseFrames {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let frame: String = self.buf.drain(..end + 2).collect();
            let data: Vec<&str> = frame
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// One event (Falco-style JSON) as one line for people.
pub fn event_line(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return text.to_owned();
    };
    let f = &v["output_fields"];
    let s = |x: &Value| x.as_str().map_or_else(|| "-".to_owned(), str::to_owned);
    let incident = f["incident.id"]
        .as_u64()
        .map_or_else(String::new, |i| format!(" incident={i}"));
    let what = finding_text(f).unwrap_or_else(|| s(&v["output"]));
    let line = format!(
        "{} {:<13} {:<24} vm={}{incident}  {what}",
        s(&v["time"]),
        s(&v["priority"]),
        s(&v["rule"]),
        s(&f["vm.id"]),
    );
    // The message comes from guests and peers: no control characters on a terminal.
    line.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// An introspection finding's fields, for people: `vCPU 0 LSTAR: 0x1000
/// <syscall_entry> -> 0x2000 <rootkit_syscall_entry> (refused)`; `None` for other
/// events (and for findings without a `from`, whose message says it better).
fn finding_text(f: &Value) -> Option<String> {
    let get = |k: &str| f[k].as_str().filter(|s| !s.is_empty());
    let location = get("introspect.location")?;
    let from = get("introspect.from")?;
    let to = get("introspect.to").unwrap_or("-");
    let sym = |k: &str| get(k).map(|s| format!(" <{s}>")).unwrap_or_default();
    let vcpu = f["introspect.vcpu"]
        .as_u64()
        .map(|v| format!("vCPU {v} "))
        .unwrap_or_default();
    let mut text = format!(
        "{vcpu}{location}: {from}{} -> {to}{}",
        sym("introspect.from_symbol"),
        sym("introspect.symbol")
    );
    if f["introspect.restored"] == Value::Bool(true) {
        text.push_str(" (restored)");
    }
    match f["introspect.refused"].as_bool() {
        Some(true) => text.push_str(" (refused)"),
        Some(false) => text.push_str(" (let through)"),
        None => {}
    }
    Some(text)
}

fn events(socket: &Path, follow: bool, json: bool) -> anyhow::Result<()> {
    let print = |data: String| {
        if json {
            println!("{data}");
        } else {
            println!("{}", event_line(&data));
        }
    };
    if !follow {
        let r = call(socket, "GET", "/events?follow=false", None, FAST)?;
        let mut frames = SseFrames::default();
        frames.push(&r.body).into_iter().for_each(print);
        return Ok(());
    }
    let client =
        vigil_daemon::client::BlockingClient::new().context("cannot start an I/O runtime")?;
    let mut frames = SseFrames::default();
    let refused = client
        .stream(
            socket,
            "/events",
            &[("accept", "text/event-stream")],
            FAST,
            |chunk| {
                frames.push(chunk).into_iter().for_each(print);
                use std::io::Write;
                // A closed pipe (`| head`) ends the stream.
                std::io::stdout().flush().is_ok()
            },
        )
        .map_err(|e| match e {
            ClientError::Connect { .. } => anyhow::anyhow!(
                "no daemon at {}: start one with `vigil daemon` (or point --socket / VIGIL_SOCKET at its socket)",
                socket.display()
            ),
            e => e.into(),
        })?;
    if let Some(r) = refused {
        bail!(
            "the daemon refused GET /events (HTTP {}): {}",
            r.status,
            r.fault_message()
        );
    }
    Ok(())
}

fn state_change(socket: &Path, id: &str, state: &str, json: bool) -> anyhow::Result<()> {
    let r = call(
        socket,
        "PATCH",
        &format!("/vms/{id}"),
        Some(serde_json::json!({"state": state})),
        FAST,
    )?;
    print_record(&r, json);
    Ok(())
}

/// 42s, 3m05s, 2h07m, 3d04h.
pub fn uptime(seconds: Option<f64>) -> String {
    let Some(s) = seconds.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "-".into();
    };
    let s = s as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn field(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The VMs as an aligned table.
pub fn vm_table(vms: &[Value]) -> String {
    let header = ["ID", "STATE", "PID", "VCPUS", "MEMORY", "UPTIME", "EXIT"];
    let rows: Vec<[String; 7]> = vms
        .iter()
        .map(|v| {
            let exit = match (&v["exit"]["code"], &v["exit"]["signal"]) {
                (Value::Number(c), _) => format!("status {c}"),
                (_, Value::Number(s)) => format!("signal {s}"),
                _ => "-".into(),
            };
            [
                field(v, "id"),
                field(v, "state"),
                field(v, "pid"),
                field(v, "vcpus"),
                v["memory_mib"]
                    .as_u64()
                    .map_or("-".into(), |m| format!("{m} MiB")),
                uptime(v["uptime_s"].as_f64()),
                exit,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for row in &rows {
        line(row);
    }
    out
}

/// One VM, as "key: value" lines and its logs' tails.
fn describe(v: &Value) -> String {
    let mut out = vm_table(std::slice::from_ref(v));
    out.push('\n');
    for (label, key) in [
        ("dir", "dir"),
        ("api socket", "api_socket"),
        ("created (unix s)", "created_at_unix_s"),
    ] {
        out.push_str(&format!("{label:<17} {}\n", field(v, key)));
    }
    if let Some(reason) = v["exit"]["reason"].as_str() {
        out.push_str(&format!("{:<17} {reason}\n", "how it ended"));
    }
    for (label, key) in [
        ("VMM log (end)", "stderr_tail"),
        ("console (end)", "console_tail"),
    ] {
        if let Some(text) = v[key].as_str().filter(|t| !t.trim().is_empty()) {
            out.push_str(&format!("\n--- {label}\n{}", text));
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let vms = [
            serde_json::json!({"id": "a", "state": "running", "pid": 12, "vcpus": 1, "memory_mib": 32, "uptime_s": 5.2}),
            serde_json::json!({"id": "long-name", "state": "crashed", "pid": null, "vcpus": 2, "memory_mib": 1024, "uptime_s": 3700.0, "exit": {"code": 3}}),
        ];
        let t = vm_table(&vms);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(lines[1].find("running"), Some(col));
        assert_eq!(lines[2].find("crashed"), Some(col));
        assert!(
            lines[2].contains("1024 MiB")
                && lines[2].contains("1h01m")
                && lines[2].ends_with("status 3")
        );
        assert!(lines[1].ends_with('-'));
    }

    #[test]
    fn sse_frames_and_event_lines() {
        let mut f = SseFrames::default();
        assert!(f.push(b"id: 1\nevent: vigil\ndata: {\"rule\":").is_empty());
        let got = f.push(b"\"x\"}\n\n: keepalive\n\nid: 2\ndata: 7\n\n");
        assert_eq!(got, ["{\"rule\":\"x\"}", "7"]);
        let line = event_line(
            r#"{"time":"2026-01-01T00:00:00.000000000Z","priority":"Warning","rule":"vm_io_flood",
                "output":"vm a: flood\nforged","output_fields":{"vm.id":"a","incident.id":3}}"#,
        );
        assert!(
            line.starts_with("2026-01-01T00:00:00.000000000Z Warning"),
            "{line}"
        );
        assert!(
            line.contains("vm_io_flood") && line.contains("vm=a incident=3"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(event_line("not json"), "not json");
    }

    #[test]
    fn introspect_options() {
        assert_eq!(parse_introspect(""), Ok(serde_json::json!({})));
        assert_eq!(
            parse_introspect("period_ms=100,policy=protect,baseline_after_ms=0"),
            Ok(serde_json::json!({"period_ms": 100, "policy": "protect", "baseline_after_ms": 0}))
        );
        assert!(parse_introspect("period=1s")
            .unwrap_err()
            .contains("\"period\""));
        assert!(parse_introspect("period_ms=fast")
            .unwrap_err()
            .contains("period_ms=fast"));
        assert!(parse_introspect("policy").is_err());
    }

    #[test]
    fn findings_as_lines() {
        let line = event_line(
            r#"{"time":"t","priority":"Critical","rule":"syscall_table_modified","output":"vm a: long message",
                "output_fields":{"vm.id":"a","introspect.location":"sys_call_table[1]",
                "introspect.from":"0x1000","introspect.to":"0x2000","introspect.from_symbol":"sys_vigil_1",
                "introspect.symbol":"rootkit_sys_hook","introspect.restored":false,"introspect.seq":1}}"#,
        );
        assert!(
            line.ends_with(
                "vm=a  sys_call_table[1]: 0x1000 <sys_vigil_1> -> 0x2000 <rootkit_sys_hook>"
            ),
            "{line}"
        );
        let line = event_line(
            r#"{"time":"t","priority":"Critical","rule":"syscall_msr_write","output":"m",
                "output_fields":{"vm.id":"a","introspect.location":"LSTAR","introspect.vcpu":0,
                "introspect.from":"0x1000","introspect.to":"0x2000","introspect.refused":true}}"#,
        );
        assert!(
            line.ends_with("vCPU 0 LSTAR: 0x1000 -> 0x2000 (refused)"),
            "{line}"
        );
        // Without a baseline value: the message.
        let line = event_line(
            r#"{"time":"t","priority":"Warning","rule":"integrity_read_failed","output":"vm a: cannot read",
                "output_fields":{"vm.id":"a","introspect.location":"IDT","introspect.from":""}}"#,
        );
        assert!(line.ends_with("vm a: cannot read"), "{line}");
    }

    #[test]
    fn uptimes() {
        assert_eq!(uptime(Some(0.4)), "0s");
        assert_eq!(uptime(Some(185.0)), "3m05s");
        assert_eq!(uptime(Some(90000.0)), "1d01h");
        assert_eq!(uptime(None), "-");
        assert_eq!(uptime(Some(f64::NAN)), "-");
    }
}
