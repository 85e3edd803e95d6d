//! `vigild`: the host daemon in the foreground (also run as `vigil daemon`). It
//! supervises VMs, each a process of the `vigil` binary beside it (or `--vmm`),
//! behind a REST API (`vigil-ctl` is its client), with the dashboard and the
//! security event stream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use vigil_daemon::balance::{PeerDaemon, PolicySettings};
use vigil_daemon::client::DaemonUrl;
use vigil_daemon::squeeze::SqueezeSettings;
use vigil_daemon::tls::{ApiTls, PeerTls};
use vigil_shared::args::{default_socket, parse_seconds};
use vigil_shared::{exit, logging, siblings};

/// /var/lib/vigil for root, else $XDG_STATE_HOME/vigil or ~/.local/state/vigil.
fn default_state_dir() -> PathBuf {
    // SAFETY: getuid cannot fail and touches no memory.
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

const ABOUT: &str = "\
Supervise VMs on this host: one `vigil run` process per VM (the `vigil` binary beside
this one, or --vmm), each in the jailer unless --no-jailer, created, paused, resumed,
stopped and destroyed through a REST API (see `vigil ctl`). Runs in the foreground
(for systemd: Type=simple), logs to stderr (the journal), and on SIGTERM or SIGINT stops every VM (SIGTERM, then SIGKILL after
--stop-timeout), removes its socket and exits 0. VMs never outlive the daemon (they get SIGTERM if it dies), and a VM that
crashes is reported (state \"crashed\", its exit status and the end of its logs), never
restarted.";

const AFTER_HELP: &str = "\
Access: the Unix socket is created with mode 0600, so only this user (and root) can
use it; --socket-group GROUP makes it 0660 for that group's members too. --listen-tcp adds a TCP listener that always needs --token-file; every request
on it must carry `Authorization: Bearer <token>`. Make a token with
  head -c 32 /dev/urandom | base64 > /etc/vigil/token && chmod 600 /etc/vigil/token
Off loopback the listener must be TLS (--tls-cert, --tls-key; add --tls-client-ca to
require client certificates too), so that the token never crosses the network in
clear text:
  vigil daemon --listen-tcp 0.0.0.0:7443 --token-file /etc/vigil/token \\
    --tls-cert /etc/vigil/api.pem --tls-key /etc/vigil/api.key
  vigil ctl --url https://host:7443 --token-file token --ca-cert ca.pem list

Each VM lives in STATE-DIR/vms/ID: config.json, console.log (its serial console)
and vmm.log (the VMM's log), each rotated at --vm-log-max-size (console.log.1, ...),
exit.json (how it ended, with the end of both logs). The files its configuration
names must be there or under an --allow-vm-path folder, e.g.
  vigil daemon --allow-vm-path /srv/vigil/images --allow-vm-path /srv/vigil/disks

Jails: each VM runs in vigil-jailer, as user 65534 (--jail-uid, --jail-gid),
chrooted into STATE-DIR/jails/vigil/ID/root, in a PID namespace of its own; its API
socket is run/api.sock there. The files its configuration names are hard-linked
into the jail (read-only ones copied when on another file system or not readable
by that user; writable disks, logs and metrics files are handed to that user, so
they must be on STATE-DIR's file system). Destroying the VM removes its jail. This
needs root; --no-jailer runs VMs unjailed, with the daemon's rights.

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
    --allow-vm-path /srv/vigil/images \\
    --events-config /etc/vigil/events.json --events-output json:/var/log/vigil/events.jsonl
  vigil ctl create web-1 --config vm.json && vigil ctl list";

/// The host daemon: supervises VMs (one `vigil run` process each) behind a REST API.
#[derive(Parser, Debug)]
#[command(name = "vigild", version, long_about = ABOUT, after_help = AFTER_HELP)]
struct DaemonArgs {
    /// Log level (error, warn, info, debug, trace) [default: info; VIGIL_LOG
    /// overrides it].
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,

    /// The VMM binary each VM runs as (`PATH run --api-sock ... --config-file ...`)
    /// [default: $VIGIL_VMM, else the `vigil` beside this vigild]. Checked at start.
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,

    /// The jailer each VM runs in (`PATH --id ID --exec-file VMM --uid N --gid N
    /// --chroot-base-dir STATE-DIR/jails --new-pid-ns -- run ...`) [default: the
    /// `vigil-jailer` beside this vigild]. Checked at start.
    #[arg(long, value_name = "PATH", conflicts_with = "no_jailer")]
    jailer: Option<PathBuf>,

    /// The user id each jailed VMM runs as (65534: nobody). Give one that
    /// owns no file of the host: the VMs' writable disks, log and metrics files are
    /// handed to it.
    #[arg(long, value_name = "N", default_value_t = vigil_daemon::supervisor::DEFAULT_JAIL_ID, conflicts_with = "no_jailer")]
    jail_uid: u32,

    /// The group id each jailed VMM runs as (65534: nogroup).
    #[arg(long, value_name = "N", default_value_t = vigil_daemon::supervisor::DEFAULT_JAIL_ID, conflicts_with = "no_jailer")]
    jail_gid: u32,

    /// A cgroup v2 setting for every VM (the jailer's --cgroup), e.g.
    /// memory.max=1073741824, cpu.max='50000 100000', pids.max=64; repeatable.
    /// Each VM gets its cgroup CGROUP2-ROOT/vigil/ID, removed when it is destroyed.
    #[arg(long, value_name = "FILE=VALUE", conflicts_with = "no_jailer")]
    jail_cgroup: Vec<String>,

    /// Run each VM as a child of the daemon with its rights (root's, when the
    /// daemon is root), outside any jail, as before the jailer. Needed when the
    /// daemon is not root; a warning is logged at start.
    #[arg(long)]
    no_jailer: bool,

    /// Where VM folders and the daemon's lock live [default: /var/lib/vigil for root,
    /// else ~/.local/state/vigil].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// The API's Unix socket [default: $VIGIL_SOCKET, else /run/vigil/daemon.sock for
    /// root, else $XDG_RUNTIME_DIR/vigil/daemon.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Let the members of GROUP (a name in /etc/group, or a gid) use the API socket too: it is
    /// handed to that group with mode 0660 [default: mode 0600, this user only].
    /// Anyone who can use the socket controls every VM: pick a group for exactly
    /// the people who should.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    socket_group: Option<u32>,

    /// Also serve the API (and the dashboard) on TCP at ADDR, e.g. 127.0.0.1:7070 or
    /// 0.0.0.0:7443. Needs --token-file; an address other than loopback also needs
    /// --tls-cert and --tls-key (or --insecure-plain-tcp).
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Option<SocketAddr>,

    /// A file holding the bearer token for --listen-tcp (at least 16 printable
    /// characters; readable by its owner only).
    #[arg(long, value_name = "PATH", requires = "listen_tcp")]
    token_file: Option<PathBuf>,

    /// Serve --listen-tcp over TLS 1.3 with this certificate chain (PEM, the
    /// daemon's own first; it must name the host clients reach it at). With
    /// --tls-key.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "listen_tcp"])]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Mutual TLS: every client of --listen-tcp must present a certificate this CA
    /// (PEM) issued, besides the bearer token (`vigil ctl --client-cert`).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Serve --listen-tcp as plain HTTP on an address other than loopback: the
    /// token and every answer cross the network in clear text. Only behind a TLS
    /// proxy or on a network you trust; a warning is logged at start.
    #[arg(long, requires = "listen_tcp", conflicts_with = "tls_cert")]
    insecure_plain_tcp: bool,

    /// Let VM configurations name files under DIR (kernels, initrds, disks, vsock
    /// sockets, logs, metrics): repeat for more folders. Every path in a VM's
    /// configuration must lead (links followed) into its own folder
    /// (STATE-DIR/vms/ID) or one of these, else POST /vms is refused (400, naming
    /// the field), so an API client cannot have the VMM open any other host file.
    /// Only folders whose contents the operator controls.
    #[arg(long, value_name = "DIR")]
    allow_vm_path: Vec<PathBuf>,

    /// The largest each VM's console.log (its serial console) and vmm.log (the
    /// VMM's own log) may grow, in bytes (K, M, G suffixes: powers of 1024; at
    /// least 4K): the daemon writes both and, at this size, rotates them
    /// (console.log becomes console.log.1, ...), so a guest that floods its
    /// console costs at most (--vm-log-keep + 1) times this much disk per log.
    #[arg(long, default_value = "16M", value_name = "SIZE", value_parser = parse_log_size)]
    vm_log_max_size: u64,

    /// Rotated files each VM log keeps besides the current one (0 to 100; 0: the
    /// log starts over at --vm-log-max-size).
    #[arg(long, default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=i64::from(vigil_daemon::supervisor::MAX_KEEP)))]
    vm_log_keep: u32,

    /// Seconds a new VM may take to report itself running on its API socket.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = parse_seconds)]
    start_timeout: f64,

    /// Seconds a stopping VM gets after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS", value_parser = parse_seconds)]
    stop_timeout: f64,

    /// Seconds GET /metrics waits for each VM's own metrics.
    #[arg(long, default_value_t = 0.5, value_name = "SECONDS", value_parser = parse_seconds)]
    scrape_timeout: f64,

    /// The most VMs the daemon holds at once (any state).
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_vms: usize,

    /// Security events: detector thresholds, correlation window and policy, as JSON
    /// (see below) [default: the built-in thresholds, no policy].
    #[arg(long, value_name = "FILE")]
    events_config: Option<PathBuf>,

    /// Also write every security event to PATH (appended; `-` for stderr) as
    /// FORMAT: json (Falco-style JSON lines), syslog (RFC 5424) or cef. Repeatable.
    #[arg(long, value_name = "FORMAT:PATH")]
    events_output: Vec<vigil_daemon::events::OutputSpec>,

    /// Seconds between two samples of the VMs' metrics and the host's pressure for
    /// the detectors.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS", value_parser = parse_interval)]
    sample_interval: f64,

    /// Move VMs away from this host when it is hot, to the daemon at URL (its
    /// --listen-tcp: https://HOST:PORT, which needs --peer-tls-ca, or HOST:PORT for
    /// plain HTTP), whose bearer token is in TOKEN_FILE; repeat for more peers
    /// (taken in turn). The host is hot when its CPU or memory pressure (PSI some
    /// avg10) stays above --migrate-cpu-pressure / --migrate-memory-pressure in
    /// --migrate-hits of the last --migrate-window samples and its trend says it
    /// stays so; the VM cheapest to move goes. Every decision is a policy_action
    /// event with its reasons and predicted costs. Example:
    /// --migrate-peer https://10.0.0.2:7443=/etc/vigil/peer.token --migrate-dry-run
    #[arg(long, value_name = "URL=TOKEN_FILE", value_parser = parse_peer)]
    migrate_peer: Vec<PeerDaemon>,

    /// The CA (PEM) the other daemons' API certificates come from: what this daemon
    /// checks when it sends a VM to an https:// peer (--migrate-peer, `vigil ctl
    /// migrate --to`).
    #[arg(long, value_name = "PEM")]
    peer_tls_ca: Option<PathBuf>,

    /// The client certificate (PEM) this daemon presents to peers that want one
    /// (their --tls-client-ca). With --peer-tls-key.
    #[arg(long, value_name = "PEM", requires_all = ["peer_tls_key", "peer_tls_ca"])]
    peer_tls_cert: Option<PathBuf>,

    /// The key of --peer-tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "peer_tls_cert")]
    peer_tls_key: Option<PathBuf>,

    /// Decide and report migrations, move nothing.
    #[arg(long)]
    migrate_dry_run: bool,

    /// Serve VMs migrating to this host over TLS with this certificate (PEM;
    /// with --migration-tls-key): the sources' daemons need --migration-tls-ca
    /// for the CA it comes from, and the certificate must name the HOST they
    /// reach this daemon at.
    #[arg(long, value_name = "PEM", requires = "migration_tls_key")]
    migration_tls_cert: Option<PathBuf>,

    /// The key of --migration-tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "migration_tls_cert")]
    migration_tls_key: Option<PathBuf>,

    /// Send VMs over TLS, trusting only destinations whose certificate comes
    /// from this CA (PEM, or the peer's self-signed certificate).
    #[arg(long, value_name = "PEM")]
    migration_tls_ca: Option<PathBuf>,

    /// Host CPU pressure (PSI some avg10, %) above which a sample is hot.
    #[arg(long, default_value_t = 50.0, value_name = "PERCENT", value_parser = parse_percent)]
    migrate_cpu_pressure: f64,

    /// Host memory pressure (PSI some avg10, %) above which a sample is hot.
    #[arg(long, default_value_t = 20.0, value_name = "PERCENT", value_parser = parse_percent)]
    migrate_memory_pressure: f64,

    /// Samples the hotspot test looks at.
    #[arg(long, default_value_t = 6, value_name = "N")]
    migrate_window: usize,

    /// Hot samples among --migrate-window that make a hotspot.
    #[arg(long, default_value_t = 4, value_name = "K")]
    migrate_hits: usize,

    /// Seconds after a migration decision before the next.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS", value_parser = parse_seconds)]
    migrate_cooldown: f64,

    /// Under host memory pressure (PSI some avg10 above PERCENT, or `off`),
    /// VMs with the memory-compression pager give memory back: at most every
    /// 10 s, each one's balloon is inflated by an eighth of its memory (up to
    /// half) where it has one, then its pager's RSS target lowered to 3/4 of
    /// what it keeps (not below 16 MiB); once the pressure stays under half
    /// of PERCENT for 10 samples, balloons and targets go back. Each change
    /// is a policy_action event (policy.rule memory_pressure).
    #[arg(long, default_value = "20", value_name = "PERCENT|off", value_parser = parse_squeeze)]
    squeeze_memory_pressure: Squeeze,
}

#[derive(Clone, Copy, Debug)]
struct Squeeze(Option<f64>);

fn parse_squeeze(s: &str) -> Result<Squeeze, String> {
    match s {
        "off" => Ok(Squeeze(None)),
        _ => parse_percent(s).map(|p| Squeeze(Some(p))),
    }
}

fn parse_peer(s: &str) -> Result<PeerDaemon, String> {
    let (addr, file) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected URL=TOKEN_FILE"))?;
    DaemonUrl::parse(addr).map_err(|e| e.to_string())?;
    let token = std::fs::read_to_string(file)
        .map_err(|e| format!("{file}: cannot read the peer's token: {e}"))?;
    Ok(PeerDaemon {
        addr: addr.to_owned(),
        token: token.trim().to_owned(),
    })
}

/// A group's gid, from its number or its name in /etc/group (read directly:
/// the binary is static, and glibc's getgrnam cannot load NSS modules there;
/// give a gid for a group from elsewhere, LDAP say).
fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("{s:?}: cannot read /etc/group to look it up: {e} (give a gid)"))?;
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some(s))
                .then(|| fields.nth(1)?.parse().ok())
                .flatten()
        })
        .ok_or_else(|| format!("{s:?}: no such group in /etc/group (give a group name or a gid)"))
}

fn parse_log_size(s: &str) -> Result<u64, String> {
    use vigil_daemon::supervisor::MIN_LOG_BYTES;
    match vigil_model::options::parse_size(s) {
        Some(n) if n >= MIN_LOG_BYTES => Ok(n),
        Some(_) => Err(format!(
            "{s:?} is too small: give at least {}K",
            MIN_LOG_BYTES >> 10
        )),
        None => Err(format!(
            "{s:?} is not a size (bytes, or with a K, M or G suffix)"
        )),
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 100.0 => Ok(v),
        _ => Err(format!("{s:?} is not a percentage in (0, 100]")),
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.05..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in [0.05, 60]")),
    }
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

fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let vmm_binary = vmm_binary(args.vmm)?;
    let jail = if args.no_jailer {
        tracing::warn!("--no-jailer: VMs run unjailed, as children of this daemon with its user ({}), its file system and its namespaces", current_uid());
        None
    } else {
        Some(jail_settings(
            args.jailer,
            args.jail_uid,
            args.jail_gid,
            args.jail_cgroup,
        )?)
    };
    let mut config = vigil_daemon::DaemonConfig::new(
        args.state_dir.unwrap_or_else(default_state_dir),
        args.socket.unwrap_or_else(default_socket),
        vmm_binary,
    );
    config.jail = jail;
    config.socket_group = args.socket_group;
    config.allowed_vm_paths = args.allow_vm_path;
    config.vm_logs = vigil_daemon::supervisor::LogLimits {
        max_bytes: args.vm_log_max_size,
        keep: args.vm_log_keep,
    };
    config.listen_tcp = args.listen_tcp;
    config.token_file = args.token_file;
    config.tls = args.tls_cert.zip(args.tls_key).map(|(cert, key)| ApiTls {
        cert,
        key,
        client_ca: args.tls_client_ca,
    });
    config.insecure_plain_tcp = args.insecure_plain_tcp;
    config.peer_tls = args.peer_tls_ca.map(|ca| PeerTls {
        ca,
        identity: args.peer_tls_cert.zip(args.peer_tls_key),
    });
    if let Some(peer) = args
        .migrate_peer
        .iter()
        .find(|p| p.addr.starts_with("https://"))
    {
        if config.peer_tls.is_none() {
            bail!(
                "--migrate-peer {}: https needs --peer-tls-ca, the CA the peer's certificate comes from",
                peer.addr
            );
        }
    }
    config.start_timeout = Duration::from_secs_f64(args.start_timeout);
    config.stop_timeout = Duration::from_secs_f64(args.stop_timeout);
    config.scrape_timeout = Duration::from_secs_f64(args.scrape_timeout);
    if args.max_vms == 0 {
        bail!("--max-vms 0: the daemon must be allowed at least one VM");
    }
    config.max_vms = args.max_vms;
    for (option, path) in [
        ("--migration-tls-cert", &args.migration_tls_cert),
        ("--migration-tls-key", &args.migration_tls_key),
        ("--migration-tls-ca", &args.migration_tls_ca),
    ] {
        if let Some(path) = path {
            std::fs::File::open(path)
                .with_context(|| format!("{option} {}: cannot read it", path.display()))?;
        }
    }
    config.migration_tls = vigil_daemon::MigrationTls {
        identity: args.migration_tls_cert.zip(args.migration_tls_key),
        ca: args.migration_tls_ca,
    };
    if let Some(path) = &args.events_config {
        config.events.config = read_events_config(path)?;
    }
    config.events.outputs = args.events_output;
    config.events.sample_interval = Duration::from_secs_f64(args.sample_interval);
    config.squeeze = args
        .squeeze_memory_pressure
        .0
        .map(|pressure| SqueezeSettings {
            pressure,
            ..SqueezeSettings::default()
        });
    if !args.migrate_peer.is_empty() {
        if args.migrate_window == 0
            || args.migrate_hits == 0
            || args.migrate_hits > args.migrate_window
        {
            bail!(
                "--migrate-hits {} with --migrate-window {}: give 1 <= hits <= window",
                args.migrate_hits,
                args.migrate_window
            );
        }
        config.migration = Some(PolicySettings {
            cpu_pressure: args.migrate_cpu_pressure,
            memory_pressure: args.migrate_memory_pressure,
            window: args.migrate_window,
            hits: args.migrate_hits,
            dry_run: args.migrate_dry_run,
            cooldown: Duration::from_secs_f64(args.migrate_cooldown),
            ..PolicySettings::with_peers(args.migrate_peer)
        });
    } else if args.migrate_dry_run {
        bail!("--migrate-dry-run without --migrate-peer: the policy has nowhere to move VMs");
    }
    vigil_daemon::events::validate_settings(&config.events).map_err(|e| {
        anyhow::anyhow!(
            "{}{e}",
            args.events_config
                .as_ref()
                .map(|p| format!("{}: ", p.display()))
                .unwrap_or_default()
        )
    })?;
    Ok(vigil_daemon::run(config)?)
}

/// The VMM the daemon spawns: `--vmm`, else `$VIGIL_VMM`, else `vigil` beside
/// this binary; refused now, not at the first VM, when it is not there.
fn vmm_binary(option: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let (path, what) = match (option, std::env::var_os("VIGIL_VMM")) {
        (Some(path), _) => (path, "--vmm".to_owned()),
        (None, Some(path)) => (PathBuf::from(path), "VIGIL_VMM".to_owned()),
        (None, None) => (
            siblings::beside_me(siblings::VMM)?,
            "the VMM binary (vigil, beside vigild; or give --vmm PATH)".to_owned(),
        ),
    };
    siblings::check_executable(&path, &what)?;
    Ok(path)
}

fn current_uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// How VMs are jailed: the jailer is `--jailer`, else `vigil-jailer` beside this
/// binary; refused now, not at the first VM, when it is not there or cannot work.
fn jail_settings(
    jailer: Option<PathBuf>,
    uid: u32,
    gid: u32,
    cgroups: Vec<String>,
) -> anyhow::Result<vigil_daemon::supervisor::JailSettings> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "VMs run in the jailer (vigil-jailer), which needs root (it makes a chroot, namespaces and a cgroup, and changes user); this daemon runs as uid {}: run it as root, or pass --no-jailer to run VMs unjailed with this user's rights",
            current_uid()
        );
    }
    let (path, what) = match jailer {
        Some(path) => (path, "--jailer".to_owned()),
        None => (
            siblings::beside_me(siblings::JAILER)?,
            "the jailer (vigil-jailer, beside vigild; or give --jailer PATH, or --no-jailer)"
                .to_owned(),
        ),
    };
    siblings::check_executable(&path, &what)?;
    for setting in &cgroups {
        if setting
            .split_once('=')
            .is_none_or(|(file, _)| file.is_empty())
        {
            bail!("--jail-cgroup {setting:?}: expected FILE=VALUE, e.g. memory.max=1073741824");
        }
    }
    Ok(vigil_daemon::supervisor::JailSettings {
        jailer: path,
        uid,
        gid,
        cgroups,
    })
}

fn main() -> ExitCode {
    let args = DaemonArgs::parse();
    if let Err(code) = logging::start("vigild", args.log_level.as_deref(), "info") {
        return code;
    }
    exit::report("vigild", run(args).map(|()| ExitCode::SUCCESS))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::DaemonArgs::command().debug_assert();
    }

    #[test]
    fn log_sizes() {
        assert_eq!(super::parse_log_size("16M"), Ok(16 << 20));
        assert_eq!(super::parse_log_size("4096"), Ok(4096));
        assert!(super::parse_log_size("1K")
            .unwrap_err()
            .contains("at least 4K"));
        assert!(super::parse_log_size("lots")
            .unwrap_err()
            .contains("not a size"));
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(super::parse_group("0"), Ok(0));
        assert_eq!(super::parse_group("root"), Ok(0));
        assert_eq!(super::parse_group("4242"), Ok(4242));
        let e = super::parse_group("no-such-group-here").unwrap_err();
        assert!(e.contains("no such group"), "{e}");
    }
}
