//! Vigil's host daemon: supervises VM processes (one `vigil run` per VM), serves a
//! REST API on a Unix socket (and, with a bearer token, on TCP, over TLS off
//! loopback), aggregates the
//! VMs' metrics, and runs the security event stream (`vigil-events`: detectors,
//! incidents, policy actions, outputs). It never touches KVM or guest memory: it reaches each VM through
//! its process handle and its API socket only.

pub mod api;
pub mod auth;
pub mod balance;
pub mod client;
pub mod error;
pub mod events;
pub mod findings;
pub mod id;
pub mod metrics;
pub mod squeeze;
pub mod supervisor;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use supervisor::{
    MigrationTls, Supervisor, SupervisorConfig, SupervisorError, VmInfo, VmState,
};

/// Why the daemon could not start (or keep running).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    TokenFile(#[from] auth::TokenFileError),
    #[error(transparent)]
    TcpListen(#[from] auth::TcpListenError),
    #[error(transparent)]
    TlsFile(#[from] tls::TlsFileError),
    #[error(transparent)]
    EventsSettings(#[from] events::SettingsError),
    #[error(transparent)]
    Engine(#[from] events::EngineError),
    #[error("--state-dir {}: cannot create it: {source}", dir.display())]
    CreateStateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("--state-dir {}: cannot open {}: {source}", dir.display(), lock.display())]
    OpenLock {
        dir: PathBuf,
        lock: PathBuf,
        source: std::io::Error,
    },
    #[error("--state-dir {}: another vigil daemon uses it (it holds {})", dir.display(), lock.display())]
    StateDirTaken { dir: PathBuf, lock: PathBuf },
    #[error("--socket {}: the path exists and is not a socket; remove it or pick another", path.display())]
    NotASocket { path: PathBuf },
    #[error("--socket {}: another daemon is listening there (stop it first, or pick another --socket)", path.display())]
    SocketTaken { path: PathBuf },
    /// The Unix socket could not be set up; `what` says which step failed.
    #[error("--socket {}: {what}: {source}", path.display())]
    Socket {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("--socket-group {gid}: cannot hand {} to it (the daemon's user must be root or a member of that group): {source}", path.display())]
    SocketGroup {
        path: PathBuf,
        gid: u32,
        source: std::io::Error,
    },
    #[error("--listen-tcp {addr}: cannot listen: {source}")]
    ListenTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--allow-vm-path {}: {why}", path.display())]
    AllowVmPath { path: PathBuf, why: String },
    #[error("cannot watch {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start the daemon's runtime: {0}")]
    Runtime(std::io::Error),
}

/// Everything `vigil daemon` is told.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where the daemon keeps its lock and the VMs' folders.
    pub state_dir: PathBuf,
    /// The API's Unix socket (created with mode 0600, or 0660 with `socket_group`).
    pub socket: PathBuf,
    /// The group (gid) the socket is handed to, with mode 0660, so that its
    /// members may use the API (`--socket-group`); none: the daemon's user only.
    pub socket_group: Option<u32>,
    /// An optional TCP listener; needs `token_file`.
    pub listen_tcp: Option<SocketAddr>,
    /// The bearer token for the TCP listener (a file only its owner may read).
    pub token_file: Option<PathBuf>,
    /// TLS on the TCP listener (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    pub tls: Option<tls::ApiTls>,
    /// Serve plain HTTP on a non-loopback `listen_tcp` (`--insecure-plain-tcp`).
    pub insecure_plain_tcp: bool,
    /// TLS towards the other daemons' https APIs (`--peer-tls-*`).
    pub peer_tls: Option<tls::PeerTls>,
    /// Folders besides each VM's own whose files VM configurations may name
    /// (`--allow-vm-path`; each must exist).
    pub allowed_vm_paths: Vec<PathBuf>,
    /// The limit of each VM's `console.log` and `vmm.log`, and how many rotated
    /// files each keeps (`--vm-log-max-size`, `--vm-log-keep`).
    pub vm_logs: supervisor::LogLimits,
    /// The `vigil` binary that runs each VM.
    pub vmm_binary: PathBuf,
    /// Run each VM in the jailer (`vigild`'s default); none: unjailed, as the
    /// daemon's own child (`--no-jailer`, and this library's default).
    pub jail: Option<supervisor::JailSettings>,
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
    /// How long `GET /metrics` waits for each VM's snapshot.
    pub scrape_timeout: Duration,
    pub max_vms: usize,
    /// Security events: detector thresholds, policy, outputs, sample interval.
    pub events: events::EventsSettings,
    /// The adaptive migration policy (`--migrate-peer` ...); off without peers.
    pub migration: Option<balance::PolicySettings>,
    /// Host memory pressure lowers the pager-enabled VMs' RSS targets
    /// (`--squeeze-memory-pressure`); none: off.
    pub squeeze: Option<squeeze::SqueezeSettings>,
    /// TLS for migrations (`--migration-tls-*`).
    pub migration_tls: supervisor::MigrationTls,
}

impl DaemonConfig {
    pub fn new(state_dir: PathBuf, socket: PathBuf, vmm_binary: PathBuf) -> Self {
        DaemonConfig {
            state_dir,
            socket,
            socket_group: None,
            listen_tcp: None,
            token_file: None,
            tls: None,
            insecure_plain_tcp: false,
            peer_tls: None,
            allowed_vm_paths: Vec::new(),
            vm_logs: supervisor::LogLimits::default(),
            vmm_binary,
            jail: None,
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            scrape_timeout: Duration::from_millis(500),
            max_vms: 256,
            events: events::EventsSettings::default(),
            migration: None,
            squeeze: None,
            migration_tls: supervisor::MigrationTls::default(),
        }
    }
}

/// Holds `<state_dir>/daemon.lock` for the daemon's life: one daemon per state folder.
struct StateLock {
    _file: std::fs::File,
}

fn lock_state_dir(dir: &Path) -> Result<StateLock, DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.join("vms"))
        .map_err(|source| DaemonError::CreateStateDir {
            dir: dir.into(),
            source,
        })?;
    let lock = dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| DaemonError::OpenLock {
            dir: dir.into(),
            lock: lock.clone(),
            source,
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DaemonError::StateDirTaken {
            dir: dir.into(),
            lock,
        });
    }
    Ok(StateLock { _file: file })
}

/// The `--allow-vm-path` folders, resolved (links followed): each must be an
/// existing folder.
fn allowed_vm_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DaemonError> {
    paths
        .iter()
        .map(|path| {
            let bad = |why: String| DaemonError::AllowVmPath {
                path: path.clone(),
                why,
            };
            let resolved = std::fs::canonicalize(path).map_err(|e| bad(e.to_string()))?;
            if !resolved.is_dir() {
                return Err(bad("not a folder".into()));
            }
            if resolved.parent().is_none() {
                return Err(bad("the whole file system: VMs could name any file".into()));
            }
            Ok(resolved)
        })
        .collect()
}

/// Binds the Unix socket with mode 0600 (0660 and handed to `group`, when given),
/// refusing when another daemon answers on it and removing a stale socket file
/// left by one that died.
fn bind_unix(path: &Path, group: Option<u32>) -> Result<tokio::net::UnixListener, DaemonError> {
    let failed = |what| {
        move |source| DaemonError::Socket {
            path: path.into(),
            what,
            source,
        }
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(DaemonError::NotASocket { path: path.into() });
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(DaemonError::SocketTaken { path: path.into() }),
            Err(_) => {
                tracing::info!("removing the stale socket {}", path.display());
                std::fs::remove_file(path).map_err(failed("cannot remove the stale socket"))?;
            }
        }
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(failed("cannot create its folder"))?;
    }
    // Create it already private: no moment in which another user could connect.
    // SAFETY: umask only changes this process's file-creation mask; it is restored
    // right after the bind.
    let old = unsafe { libc::umask(0o177) };
    let listener = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(failed("cannot listen"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(failed("cannot set its mode to 0600"))?;
    if let Some(gid) = group {
        // The group first, then its access: the socket is never open to the
        // daemon's own group on the way.
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| {
            let _ = std::fs::remove_file(path);
            DaemonError::SocketGroup {
                path: path.into(),
                gid,
                source,
            }
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(failed("cannot set its mode to 0660"))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(failed("cannot listen"))?;
    tokio::net::UnixListener::from_std(listener).map_err(failed("cannot listen"))
}

/// Runs the daemon until `shutdown` completes: then stops every VM (SIGTERM, then
/// SIGKILL after the stop timeout), removes the socket and returns.
pub async fn serve(
    config: DaemonConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let token = match &config.token_file {
        Some(path) => Some(auth::Token::from_file(path)?),
        None => None,
    };
    let acceptor = match (config.listen_tcp, &config.tls) {
        (Some(_), Some(tls)) => Some(tls.acceptor()?),
        (None, Some(_)) => {
            tracing::warn!("--tls-cert without --listen-tcp: not used (the Unix socket relies on its file mode)");
            None
        }
        (_, None) => None,
    };
    if let Some(addr) = config.listen_tcp {
        auth::check_tcp_listen(
            addr,
            token.as_ref(),
            acceptor.is_some(),
            config.insecure_plain_tcp,
        )?;
    } else if token.is_some() {
        tracing::warn!("--token-file without --listen-tcp: the token is not used (the Unix socket relies on its file mode)");
    }
    let peer_tls = config
        .peer_tls
        .as_ref()
        .map(tls::PeerTls::load)
        .transpose()?;
    events::validate_settings(&config.events)?;
    let allowed = allowed_vm_paths(&config.allowed_vm_paths)?;
    let lock = lock_state_dir(&config.state_dir)?;
    let vms = std::fs::canonicalize(config.state_dir.join("vms")).map_err(|source| {
        DaemonError::CreateStateDir {
            dir: config.state_dir.clone(),
            source,
        }
    })?;
    let unix = bind_unix(&config.socket, config.socket_group)?;
    let tcp = match config.listen_tcp {
        Some(addr) => Some((
            addr,
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::ListenTcp { addr, source })?,
        )),
        None => None,
    };

    let (events, engine_input) = events::Events::new(&config.events);
    let supervisor = Arc::new(Supervisor::new(
        SupervisorConfig {
            state_dir: config.state_dir.clone(),
            vmm_binary: config.vmm_binary.clone(),
            jail: config.jail.clone(),
            start_timeout: config.start_timeout,
            stop_timeout: config.stop_timeout,
            vm_request_timeout: Duration::from_secs(5),
            max_vms: config.max_vms,
            migration_tls: config.migration_tls.clone(),
            peer_tls,
            paths: supervisor::PathPolicy::new(vms, allowed),
            vm_logs: config.vm_logs,
        },
        events.clone(),
    ));
    let engine = events::start_engine(
        engine_input,
        &events,
        &config.events,
        Arc::downgrade(&supervisor),
        tokio::runtime::Handle::current(),
    )?;
    let state = api::AppState {
        supervisor: supervisor.clone(),
        started: Instant::now(),
        scrape_timeout: config.scrape_timeout,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    tracing::info!(
        "vigil daemon {} listening on {}{}",
        env!("CARGO_PKG_VERSION"),
        config.socket.display(),
        config
            .listen_tcp
            .map(|a| format!(
                " and on tcp {a} ({}, bearer token)",
                match &config.tls {
                    Some(t) if t.client_ca.is_some() => "TLS, client certificates",
                    Some(_) => "TLS",
                    None => "plain HTTP",
                }
            ))
            .unwrap_or_default()
    );
    // The dashboard's assets are public; everything they show comes from the API
    // routes, which need the token on TCP: so the dashboard is merged outside the
    // token layer.
    let sampler = tokio::spawn(events::sample(
        supervisor.clone(),
        events.clone(),
        config.events.sample_interval,
        config.scrape_timeout,
        config.migration.clone().map(balance::Policy::new),
        config.squeeze.clone().map(squeeze::Squeezer::new),
        stop_rx.clone(),
    ));
    // Misuse reporting is the outermost layer: it sees the token check's 401s.
    let misuse = axum::middleware::from_fn_with_state(events.clone(), api::report_misuse);
    let unix_app = api::router(state.clone())
        .merge(vigil_dashboard::router())
        .layer(misuse.clone());
    let unix_server = axum::serve(
        unix,
        unix_app.into_make_service_with_connect_info::<api::UnixPeer>(),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));
    let unix_task = tokio::spawn(async move { unix_server.await });
    let tcp_task = match (tcp, token) {
        (Some((addr, listener)), Some(token)) => {
            let app = api::router(state.clone())
                .layer(axum::middleware::from_fn_with_state(
                    token,
                    auth::require_token,
                ))
                .merge(vigil_dashboard::router())
                .layer(misuse)
                .into_make_service_with_connect_info::<api::TcpPeer>();
            let stop = stopped(stop_rx.clone());
            Some(match acceptor {
                Some(acceptor) => {
                    let listener = tls::TlsListener::new(listener, acceptor)
                        .map_err(|source| DaemonError::ListenTcp { addr, source })?;
                    let server = axum::serve(listener, app).with_graceful_shutdown(stop);
                    tokio::spawn(async move { server.await })
                }
                None => {
                    let server = axum::serve(listener, app).with_graceful_shutdown(stop);
                    tokio::spawn(async move { server.await })
                }
            })
        }
        _ => None,
    };

    shutdown.await;
    tracing::info!(
        "shutting down: stopping {} VM(s)",
        supervisor
            .list()
            .iter()
            .filter(|v| v.state().is_live())
            .count()
    );
    let _ = stop_tx.send(true);
    supervisor.stop_all().await;
    let _ = sampler.await;
    // The VMs' last events are queued: write them out, then end the engine.
    engine.stop().await;
    // Event streams never end by themselves: end them, or the servers' graceful
    // shutdown would wait for every open dashboard.
    supervisor.events().stream().close();
    // In-flight requests had the time of the VMs' stop to finish; do not wait forever.
    let _ = tokio::time::timeout(Duration::from_secs(5), unix_task).await;
    if let Some(task) = tcp_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    if let Err(e) = std::fs::remove_file(&config.socket) {
        tracing::warn!("cannot remove {}: {e}", config.socket.display());
    }
    drop(lock);
    tracing::info!("daemon stopped");
    Ok(())
}

/// Starts watching SIGTERM and SIGINT (from this call on: none is missed) and
/// returns a future that resolves on the first of them. Needs a runtime.
pub fn termination_signal() -> Result<impl Future<Output = ()>, DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let watch = |kind, name| {
        signal(kind).map_err(|source| DaemonError::Signal {
            signal: name,
            source,
        })
    };
    let mut term = watch(SignalKind::terminate(), "SIGTERM")?;
    let mut int = watch(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Runs the daemon in the foreground until SIGTERM or SIGINT (what `vigil daemon` does).
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_name("vigil-daemon")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async {
        // Watch the signals before listening, so that none is missed.
        let signals = termination_signal()?;
        serve(config, signals).await
    })
}
