//! `vigil-ctl`: the host daemon's client (also run as `vigil ctl`): requests
//! through `vigil_daemon::client`, answers as tables or `--json`.

mod render;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::Value;
use vigil_daemon::auth::Token;
use vigil_daemon::client::{
    BlockingClient, ClientError, ClientTls, DaemonUrl, Endpoint, PemError, Response, TcpEndpoint,
};
use vigil_model::config::IntrospectConfig;
use vigil_shared::args::{default_socket, parse_seconds};
use vigil_shared::{exit, logging};

use render::{
    describe, event_line, migration_progress, migration_summary, uptime, vm_table, SseFrames,
};

const AFTER_HELP: &str = "\
Output: aligned tables for people by default; --json prints the daemon's JSON as it
came (for scripts and jq). Exit status: 0 on success, 1 when the daemon refused (its
message is printed) or cannot be reached.

The daemon: its Unix socket (--socket), or its TCP API (--url) with its token
(--token-file); https also needs --ca-cert, the CA its certificate (its --tls-cert)
comes from, and a daemon started with --tls-client-ca wants --client-cert and
--client-key too. Every command works either way.

Examples:
  vigil ctl create web-1 --config vm.json   # Firecracker-style config file
  vigil ctl list
  vigil ctl pause web-1 && vigil ctl resume web-1
  vigil ctl stop web-1 --timeout 5          # SIGTERM, SIGKILL after 5 s
  vigil ctl inspect web-1 --json | jq .exit
  vigil ctl destroy web-1
  vigil ctl --url https://10.0.0.2:7443 --token-file token --ca-cert ca.pem list";

/// Talk to the host daemon (`vigild`): list, create, inspect, pause, resume, stop
/// and destroy VMs, read metrics and security events.
#[derive(Parser, Debug)]
#[command(name = "vigil-ctl", version, after_help = AFTER_HELP)]
struct CtlArgs {
    /// Log level for this client's own messages (error, warn, info, debug, trace)
    /// [default: warn; VIGIL_LOG overrides it].
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,

    /// The daemon's socket [default: as `vigil daemon`'s: $VIGIL_SOCKET, else
    /// /run/vigil/daemon.sock for root, else $XDG_RUNTIME_DIR/vigil/daemon.sock].
    #[arg(long, value_name = "PATH", global = true, conflicts_with = "url")]
    socket: Option<PathBuf>,

    /// Reach the daemon on its TCP API (its --listen-tcp) instead of its socket:
    /// https://HOST:PORT (with --ca-cert), or http://HOST:PORT for a plain listener
    /// (loopback, say). Needs --token-file.
    #[arg(long, value_name = "URL", global = true, requires = "token_file")]
    url: Option<DaemonUrl>,

    /// The file holding the daemon's bearer token (its --token-file; readable by
    /// its owner only).
    #[arg(long, value_name = "PATH", global = true, requires = "url")]
    token_file: Option<PathBuf>,

    /// The CA (PEM) the daemon's certificate must come from, for an https --url
    /// (or the daemon's own self-signed certificate).
    #[arg(long, value_name = "PEM", global = true, requires = "url")]
    ca_cert: Option<PathBuf>,

    /// The client certificate (PEM) to present to a daemon that wants one (its
    /// --tls-client-ca). With --client-key.
    #[arg(long, value_name = "PEM", global = true, requires_all = ["client_key", "ca_cert"])]
    client_cert: Option<PathBuf>,

    /// The key of --client-cert (PEM).
    #[arg(long, value_name = "PEM", global = true, requires = "client_cert")]
    client_key: Option<PathBuf>,

    /// Print the daemon's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
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
        /// security events), as `vigil run --introspect` takes it: period=DURATION
        /// (1ms to 1h, default 1s), policy=report|protect, baseline_after=DURATION
        /// (default 1s); period_ms=N and baseline_after_ms=N also do. `--introspect`
        /// alone takes the defaults.
        #[arg(long, value_name = "[period=DUR][,policy=P][,baseline_after=DUR]", num_args = 0..=1, default_missing_value = "", value_parser = parse_introspect)]
        introspect: Option<Value>,
        /// Trace the guest's system calls into syscalls.jsonl in the VM's folder:
        /// the calls to keep (read,write,59; cr3=0x... for one process), or all.
        #[arg(long, value_name = "LIST", num_args = 0..=1, default_missing_value = "")]
        trace_syscalls: Option<String>,
        /// Let the VM's API socket write into the guest (PUT /vigil/debug/...): for
        /// tests only.
        #[arg(long)]
        debug_api: bool,
        /// Put the VM's virtio devices on PCI (virtio-pci, MSI-X), as `vigil run
        /// --enable-pci`; snapshots and migrations keep them there.
        #[arg(long)]
        enable_pci: bool,
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
    /// Move a running VM to another host's daemon, live: that daemon starts a
    /// process waiting for it, this daemon tells the VM to migrate there (by default
    /// pre-copy, then a pause of about --downtime-ms, switching to post-copy when
    /// pre-copy cannot converge; see --method), and once it runs there its record
    /// here says `migrated`. On a failure before the VM runs there it keeps running
    /// here. The other daemon
    /// must listen on TCP (`vigil daemon --listen-tcp ADDR --token-file F`, with
    /// --tls-cert off loopback); give its URL and token (this daemon checks an
    /// https peer's certificate against its --peer-tls-ca). On a terminal (without
    /// --json) a progress line shows the round, bytes sent and remaining, dirty rate,
    /// bandwidth, predicted pause and throttle; at the end, the total time, pause and
    /// bytes. Example:
    /// vigil ctl migrate web1 --to https://10.0.0.2:7443 --peer-token-file /etc/vigil/peer.token
    Migrate {
        id: String,
        /// The other daemon's TCP API: https://HOST:PORT, or HOST:PORT for a plain
        /// HTTP one.
        #[arg(long, value_name = "URL")]
        to: String,
        /// A file holding the other daemon's bearer token.
        #[arg(long, value_name = "FILE")]
        peer_token_file: PathBuf,
        /// The longest pause at the end, in milliseconds [default: 100].
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// At most this many MiB/s [default: no limit].
        #[arg(long, value_name = "MIB")]
        bandwidth_mib_s: Option<u64>,
        /// auto: pre-copy, then post-copy if it does not converge; precopy:
        /// pre-copy only; postcopy: the VM moves at once and its memory follows
        /// (the shortest pause, but the VM is lost if the link fails before
        /// every page arrived) [default: auto].
        #[arg(long, value_name = "METHOD")]
        method: Option<vigil_model::migration::MigrationMethod>,
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
/// How often `migrate` redraws its progress line.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Where the daemon is, from --socket or --url and its TLS and token flags.
fn endpoint(args: &CtlArgs) -> anyhow::Result<Endpoint> {
    let Some(url) = &args.url else {
        return Ok(Endpoint::Unix(
            args.socket.clone().unwrap_or_else(default_socket),
        ));
    };
    // The daemon's rules for its token file hold for its clients' copies too.
    let token = match &args.token_file {
        Some(path) => Token::from_file(path)?,
        None => bail!("--url {url} needs --token-file, the daemon's bearer token"),
    };
    let tls = match (&args.ca_cert, url.https) {
        (Some(ca), true) => {
            let identity = args.client_cert.as_deref().zip(args.client_key.as_deref());
            Some(ClientTls::load(ca, identity).map_err(|e| {
                let flag = match e {
                    PemError::Cert { .. } => "--client-cert",
                    PemError::Key { .. } => "--client-key",
                    PemError::Ca { .. } => "--ca-cert",
                };
                anyhow::anyhow!("{flag} {e}")
            })?)
        }
        (Some(ca), false) => bail!(
            "--ca-cert {} with --url {url}: a plain http:// daemon has no certificate to check (use https://)",
            ca.display()
        ),
        (None, true) => bail!(
            "--url {url} needs --ca-cert: the CA the daemon's certificate (its --tls-cert) comes from"
        ),
        (None, false) => {
            let host = url.host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                tracing::warn!("--url {url}: the token crosses the network in clear text (use https://)");
            }
            None
        }
    };
    Ok(Endpoint::Tcp(TcpEndpoint::new(
        url.clone(),
        token.as_str(),
        tls,
    )?))
}

fn call(
    daemon: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Value>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let body = body.map(|b| b.to_string().into_bytes());
    let client = BlockingClient::new().context("cannot start an I/O runtime")?;
    let answer = client.request_to(daemon, method, path, body, timeout);
    match answer {
        Ok(r) if r.is_success() => Ok(r),
        Ok(r) => bail!(
            "the daemon refused {method} {path} (HTTP {}): {}",
            r.status,
            r.fault_message()
        ),
        Err(e) => Err(unreachable(daemon, e)),
    }
}

/// What a client error means for the operator.
fn unreachable(daemon: &Endpoint, e: ClientError) -> anyhow::Error {
    match (daemon, e) {
        (Endpoint::Unix(socket), ClientError::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            anyhow::anyhow!(
                "no daemon at {}: start one with `vigil daemon` (or point --socket / VIGIL_SOCKET at its socket)",
                socket.display()
            )
        }
        (Endpoint::Unix(socket), ClientError::Connect { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            anyhow::anyhow!(
                "cannot connect to {}: permission denied (the daemon's socket is mode 0600, or 0660 for its --socket-group: run as the daemon's user or a member of that group)",
                socket.display()
            )
        }
        (Endpoint::Tcp(t), ClientError::Connect { source, .. }) => anyhow::anyhow!(
            "no daemon answers at {}: {source} (is it started with --listen-tcp {}?)",
            t.url(),
            t.url().authority()
        ),
        (_, e) => e.into(),
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

fn run(args: CtlArgs) -> anyhow::Result<()> {
    let daemon = &endpoint(&args)?;
    let json = args.json;
    // An id the daemon could never have accepted cannot even be put in a URL.
    match &args.command {
        CtlCommand::Create { id, .. }
        | CtlCommand::Inspect { id }
        | CtlCommand::Pause { id }
        | CtlCommand::Resume { id }
        | CtlCommand::Stop { id, .. }
        | CtlCommand::Migrate { id, .. }
        | CtlCommand::Destroy { id } => vigil_daemon::id::validate_id(id)?,
        CtlCommand::List | CtlCommand::Metrics | CtlCommand::Health | CtlCommand::Events { .. } => {
        }
    }
    match args.command {
        CtlCommand::List => {
            let r = call(daemon, "GET", "/vms", None, FAST)?;
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
            enable_pci,
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
            if enable_pci {
                body["enable_pci"] = Value::Bool(true);
            }
            let r = call(daemon, "POST", "/vms", Some(body), SLOW)?;
            print_record(&r, json);
        }
        CtlCommand::Inspect { id } => {
            let r = call(daemon, "GET", &format!("/vms/{id}"), None, FAST)?;
            if json {
                print_json(&r);
            } else {
                print!("{}", describe(&r.json().unwrap_or_default()));
            }
        }
        CtlCommand::Pause { id } => state_change(daemon, &id, "Paused", json)?,
        CtlCommand::Resume { id } => state_change(daemon, &id, "Resumed", json)?,
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
                daemon,
                "POST",
                &format!("/vms/{id}/stop"),
                Some(Value::Object(body)),
                SLOW,
            )?;
            print_record(&r, json);
        }
        CtlCommand::Migrate {
            id,
            to,
            peer_token_file,
            downtime_ms,
            bandwidth_mib_s,
            method,
        } => {
            let token = std::fs::read_to_string(&peer_token_file).with_context(|| {
                format!(
                    "--peer-token-file {}: cannot read it",
                    peer_token_file.display()
                )
            })?;
            let body = serde_json::json!({
                "to": to,
                "peer_token": token.trim(),
                "downtime_ms": downtime_ms,
                "bandwidth_mib_s": bandwidth_mib_s,
                "method": method,
            });
            eprintln!("migrating {id} to the daemon at {to}...");
            let status_path = format!("/vms/{id}/migration");
            let done = AtomicBool::new(false);
            let live = !json && std::io::stderr().is_terminal();
            let r = std::thread::scope(|scope| {
                if live {
                    // The POST answers once it ended: meanwhile, the progress.
                    scope.spawn(|| {
                        while !done.load(Ordering::Acquire) {
                            if let Ok(r) = call(daemon, "GET", &status_path, None, FAST) {
                                let line = migration_progress(&r.json().unwrap_or_default());
                                eprint!("\r\x1b[2K{line}");
                            }
                            std::thread::sleep(PROGRESS_INTERVAL);
                        }
                        eprint!("\r\x1b[2K");
                    });
                }
                let r = call(
                    daemon,
                    "POST",
                    &format!("/vms/{id}/migrate"),
                    Some(body),
                    Duration::from_secs(660),
                );
                done.store(true, Ordering::Release);
                r
            })?;
            if !json {
                if let Ok(status) = call(daemon, "GET", &status_path, None, FAST) {
                    eprintln!("{}", migration_summary(&status.json().unwrap_or_default()));
                }
            }
            print_record(&r, json);
        }
        CtlCommand::Destroy { id } => {
            call(daemon, "DELETE", &format!("/vms/{id}"), None, SLOW)?;
            if json {
                println!("{}", serde_json::json!({"id": id, "destroyed": true}));
            } else {
                println!("destroyed {id}");
            }
        }
        CtlCommand::Metrics => {
            let r = call(daemon, "GET", "/metrics", None, FAST)?;
            print!("{}", r.text());
        }
        CtlCommand::Events { follow } => events(daemon, follow, json)?,
        CtlCommand::Health => {
            let r = call(daemon, "GET", "/health", None, FAST)?;
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

/// `vigil ctl create --introspect period=100ms,policy=protect`: the create
/// request's `introspect` object (the daemon checks the values, as `vigil run`
/// does).
fn parse_introspect(s: &str) -> Result<Value, String> {
    let config = IntrospectConfig::from_options(s).map_err(|e| e.to_string())?;
    serde_json::to_value(config).map_err(|e| e.to_string())
}

fn events(daemon: &Endpoint, follow: bool, json: bool) -> anyhow::Result<()> {
    let print = |data: String| {
        if json {
            println!("{data}");
        } else {
            println!("{}", event_line(&data));
        }
    };
    if !follow {
        let r = call(daemon, "GET", "/events?follow=false", None, FAST)?;
        let mut frames = SseFrames::default();
        frames.push(&r.body).into_iter().for_each(print);
        return Ok(());
    }
    let client = BlockingClient::new().context("cannot start an I/O runtime")?;
    let mut frames = SseFrames::default();
    let refused = client
        .stream(
            daemon,
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
        .map_err(|e| unreachable(daemon, e))?;
    if let Some(r) = refused {
        bail!(
            "the daemon refused GET /events (HTTP {}): {}",
            r.status,
            r.fault_message()
        );
    }
    Ok(())
}

fn state_change(daemon: &Endpoint, id: &str, state: &str, json: bool) -> anyhow::Result<()> {
    let r = call(
        daemon,
        "PATCH",
        &format!("/vms/{id}"),
        Some(serde_json::json!({"state": state})),
        FAST,
    )?;
    print_record(&r, json);
    Ok(())
}

fn main() -> ExitCode {
    let args = CtlArgs::parse();
    if let Err(code) = logging::start("vigil-ctl", args.log_level.as_deref(), "warn") {
        return code;
    }
    exit::report("vigil-ctl", run(args).map(|()| ExitCode::SUCCESS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        CtlArgs::command().debug_assert();
    }

    #[test]
    fn introspect_options() {
        assert_eq!(parse_introspect(""), Ok(serde_json::json!({})));
        assert_eq!(
            parse_introspect("period_ms=100,policy=protect,baseline_after_ms=0"),
            Ok(serde_json::json!({"period_ms": 100, "policy": "protect", "baseline_after_ms": 0}))
        );
        assert_eq!(
            parse_introspect("period=1s,baseline_after=250ms"),
            Ok(serde_json::json!({"period_ms": 1000, "baseline_after_ms": 250}))
        );
        assert!(parse_introspect("speed=1s")
            .unwrap_err()
            .contains("\"speed\""));
        assert!(parse_introspect("period_ms=fast")
            .unwrap_err()
            .contains("period_ms=fast"));
        assert!(parse_introspect("policy").is_err());
    }
}
