//! The daemon's TCP listener over TLS, against the stand-in VMM
//! (`examples/fake_vmm.rs`): https with the token works (API and dashboard),
//! a wrong token, plain HTTP on the TLS port and an unknown CA do not; mutual
//! TLS refuses clients without a certificate from its CA; plain HTTP off
//! loopback needs `insecure_plain_tcp`; bad certificate files name their flag;
//! and one daemon reaches another's https API (with `peer_tls`).
//! With real VMs and `vigil ctl --url`: crates/vigil/tests/daemon.rs.

mod pki;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pki::Ca;
use serde_json::{json, Value};
use vigil_daemon::client::{
    request_to, ClientError, ClientTls, DaemonUrl, Endpoint, Response, TcpEndpoint,
};
use vigil_daemon::tls::{ApiTls, PeerTls};
use vigil_daemon::{DaemonConfig, DaemonError};

const TOKEN: &str = "tls-test-token-0123456789";

fn fake_vmm() -> PathBuf {
    // target/<triple>/debug/deps/tls-HASH -> target/<triple>/debug/examples/fake_vmm
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/fake_vmm")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vigil-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon listening on TCP at `listen` with the test token, configured
/// further by `adjust`.
struct Daemon {
    dir: PathBuf,
    port: u16,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), DaemonError>>>,
}

fn config(dir: &Path, listen: SocketAddr, adjust: impl FnOnce(&mut DaemonConfig)) -> DaemonConfig {
    std::fs::create_dir_all(dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = DaemonConfig::new(dir.join("state"), dir.join("daemon.sock"), fake_vmm());
    config.listen_tcp = Some(listen);
    config.token_file = Some(token_file);
    // The configs name the fake VMM as their kernel: its folder is allowed.
    config.allowed_vm_paths = vec![fake_vmm().parent().unwrap().to_owned()];
    config.start_timeout = Duration::from_secs(10);
    config.stop_timeout = Duration::from_secs(2);
    adjust(&mut config);
    config
}

impl Daemon {
    async fn start(dir: &Path, ip: [u8; 4], adjust: impl FnOnce(&mut DaemonConfig)) -> Daemon {
        let port = free_port();
        let config = config(dir, SocketAddr::from((ip, port)), adjust);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(vigil_daemon::serve(config, async {
            let _ = rx.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                !task.is_finished(),
                "the daemon ended: {:?}",
                task.await.unwrap()
            );
            assert!(Instant::now() < deadline, "the daemon did not listen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Daemon {
            dir: dir.to_owned(),
            port,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Its TCP API at `scheme://127.0.0.1:PORT` with `token` and `tls`.
    fn endpoint(&self, scheme: &str, token: &str, tls: Option<ClientTls>) -> Endpoint {
        let url = DaemonUrl::parse(&format!("{scheme}://127.0.0.1:{}", self.port)).unwrap();
        Endpoint::Tcp(TcpEndpoint::new(url, token, tls).unwrap())
    }

    async fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap().unwrap();
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

async fn call(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Response, ClientError> {
    request_to(
        endpoint,
        method,
        path,
        body.map(|b| b.to_string().into_bytes()),
        Duration::from_secs(20),
    )
    .await
}

fn create_body(id: &str) -> Value {
    json!({"id": id, "config": {
        "boot-source": {"kernel_image_path": fake_vmm()},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
    }})
}

/// One hand-written request on a plain TCP connection: the whole answer.
fn plain_exchange(port: u16, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_token_serves_the_api_and_the_dashboard() {
    let dir = scratch("https");
    let ca = Ca::new(&dir.join("pki"), "ca");
    let server = ca.server("server");
    let d = Daemon::start(&dir, [127, 0, 0, 1], |c| {
        c.tls = Some(ApiTls {
            cert: server.cert.clone(),
            key: server.key.clone(),
            client_ca: None,
        });
    })
    .await;
    let tls = ClientTls::load(&ca.pem, None).unwrap();
    let https = d.endpoint("https", TOKEN, Some(tls.clone()));

    let r = call(&https, "GET", "/vms", None).await.unwrap();
    assert_eq!((r.status, r.text()), (200, "[]".into()));
    let r = call(&https, "POST", "/vms", Some(create_body("web-1")))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json().unwrap()["state"], "running");
    let r = call(&https, "GET", "/health", None).await.unwrap();
    assert_eq!(r.json().unwrap()["vms"], 1);
    // The event stream the dashboard follows (the engine files events on its
    // own thread: the creation's may take a moment).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = call(&https, "GET", "/events?follow=false", None)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        if r.text().contains("vm web-1 created") {
            break;
        }
        assert!(Instant::now() < deadline, "no creation event: {}", r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The dashboard's page and assets come without the token; its data does not.
    let no_token = d.endpoint("https", "not-the-token-0123456789", Some(tls.clone()));
    let r = call(&no_token, "GET", "/", None).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Vigil"), "{}", r.text());
    for asset in vigil_dashboard::asset_names() {
        let r = call(&no_token, "GET", &format!("/assets/{asset}"), None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{asset}");
    }
    for (method, path) in [
        ("GET", "/vms"),
        ("GET", "/events"),
        ("DELETE", "/vms/web-1"),
    ] {
        let r = call(&no_token, method, path, None).await.unwrap();
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text());
    }

    // Plain HTTP on the TLS port: a plain 400 that says why, never the API,
    // even with the right token.
    let answer = plain_exchange(
        d.port,
        &format!("GET /vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("TLS only: use https://"), "{answer}");
    assert!(!answer.contains("web-1"), "{answer}");
    let plain = d.endpoint("http", TOKEN, None);
    let r = call(&plain, "GET", "/vms", None).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(r.fault_message().contains("use https://"), "{}", r.text());

    // A CA that did not issue the daemon's certificate: the client refuses it.
    let other = Ca::new(&dir.join("pki-other"), "other-ca");
    let wrong_ca = d.endpoint(
        "https",
        TOKEN,
        Some(ClientTls::load(&other.pem, None).unwrap()),
    );
    let e = call(&wrong_ca, "GET", "/vms", None).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Tls { .. })
            && e.to_string()
                .contains("certificate does not come from the CA given"),
        "{e}"
    );
    // Silence (no handshake at all) holds up no one: the API still answers.
    let _idle = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    let r = call(&https, "DELETE", "/vms/web-1", None).await.unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_wants_a_client_certificate_from_its_ca() {
    let dir = scratch("mtls");
    let ca = Ca::new(&dir.join("pki"), "ca");
    let server = ca.server("server");
    let client = ca.client("client");
    let other = Ca::new(&dir.join("pki-other"), "other-ca");
    let stranger = other.client("stranger");
    let d = Daemon::start(&dir, [127, 0, 0, 1], |c| {
        c.tls = Some(ApiTls {
            cert: server.cert.clone(),
            key: server.key.clone(),
            client_ca: Some(ca.pem.clone()),
        });
    })
    .await;
    let with = |pem: Option<&pki::Pem>, token: &str| {
        let identity = pem.map(|p| (p.cert.as_path(), p.key.as_path()));
        d.endpoint(
            "https",
            token,
            Some(ClientTls::load(&ca.pem, identity).unwrap()),
        )
    };
    let e = call(&with(None, TOKEN), "GET", "/vms", None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("wants a client certificate"), "{e}");
    let e = call(&with(Some(&stranger), TOKEN), "GET", "/vms", None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Tls { .. })
            && e.to_string()
                .contains("does not accept this client certificate"),
        "{e}"
    );
    let r = call(&with(Some(&client), TOKEN), "GET", "/vms", None)
        .await
        .unwrap();
    assert_eq!((r.status, r.text()), (200, "[]".into()));
    // A client certificate does not replace the token.
    let r = call(
        &with(Some(&client), "not-the-token-0123456789"),
        "GET",
        "/vms",
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_off_loopback_only_when_insisted() {
    let dir = scratch("plain");
    // Refused at start, before anything listens.
    let config = config(&dir, SocketAddr::from(([0, 0, 0, 0], free_port())), |_| {});
    let e = vigil_daemon::serve(config, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(e, DaemonError::TcpListen(_))
            && e.to_string().contains("is not a loopback address")
            && e.to_string().contains("--insecure-plain-tcp"),
        "{e}"
    );
    assert!(!dir.join("daemon.sock").exists());

    // The operator insists: it serves plain HTTP (with the token).
    let d = Daemon::start(&dir, [0, 0, 0, 0], |c| c.insecure_plain_tcp = true).await;
    let r = call(&d.endpoint("http", TOKEN, None), "GET", "/vms", None)
        .await
        .unwrap();
    assert_eq!((r.status, r.text()), (200, "[]".into()));
    // An https client finds out that it is not TLS.
    let ca = Ca::new(&dir.join("pki"), "ca");
    let tls = ClientTls::load(&ca.pem, None).unwrap();
    let e = call(&d.endpoint("https", TOKEN, Some(tls)), "GET", "/vms", None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not speak TLS"), "{e}");
    d.stop().await;

    // Off loopback with TLS: fine.
    let dir = scratch("any-tls");
    let ca = Ca::new(&dir.join("pki"), "ca");
    let server = ca.server("server");
    let d = Daemon::start(&dir, [0, 0, 0, 0], |c| {
        c.tls = Some(ApiTls {
            cert: server.cert.clone(),
            key: server.key.clone(),
            client_ca: None,
        })
    })
    .await;
    let tls = ClientTls::load(&ca.pem, None).unwrap();
    let r = call(&d.endpoint("https", TOKEN, Some(tls)), "GET", "/vms", None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_name_their_flag_and_path() {
    let dir = scratch("bad-files");
    let ca = Ca::new(&dir.join("pki"), "ca");
    let server = ca.server("server");
    let missing = dir.join("missing.pem");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let tls = |cert: &Path, key: &Path, client_ca: Option<&Path>| ApiTls {
        cert: cert.into(),
        key: key.into(),
        client_ca: client_ca.map(Into::into),
    };
    for (api, peer, want) in [
        (
            Some(tls(&missing, &server.key, None)),
            None,
            format!("--tls-cert {}: cannot read", missing.display()),
        ),
        (
            Some(tls(&server.cert, &server.cert, None)),
            None,
            format!("--tls-key {}: ", server.cert.display()),
        ),
        (
            Some(tls(&server.cert, &server.key, Some(&server.key))),
            None,
            format!("--tls-client-ca {}: no CERTIFICATE", server.key.display()),
        ),
        (
            None,
            Some(PeerTls {
                ca: missing.clone(),
                identity: None,
            }),
            format!("--peer-tls-ca {}: cannot read", missing.display()),
        ),
    ] {
        let config = config(&dir, listen, |c| {
            c.tls = api;
            c.peer_tls = peer;
        });
        let e = vigil_daemon::serve(config, std::future::pending())
            .await
            .unwrap_err();
        assert!(
            matches!(e, DaemonError::TlsFile(_)) && e.to_string().starts_with(&want),
            "{e}\nwanted: {want}"
        );
        assert!(!dir.join("daemon.sock").exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_reaches_another_over_https() {
    let dir = scratch("peers");
    let ca = Ca::new(&dir.join("pki"), "ca");
    let server = ca.server("b");
    let a_client = ca.client("a");
    let b = Daemon::start(&dir.join("b"), [127, 0, 0, 1], |c| {
        c.tls = Some(ApiTls {
            cert: server.cert.clone(),
            key: server.key.clone(),
            client_ca: Some(ca.pem.clone()),
        })
    })
    .await;
    let a = Daemon::start(&dir.join("a"), [127, 0, 0, 1], |c| {
        c.peer_tls = Some(PeerTls {
            ca: ca.pem.clone(),
            identity: Some((a_client.cert.clone(), a_client.key.clone())),
        })
    })
    .await;
    let a_api = a.endpoint("http", TOKEN, None);
    let r = call(&a_api, "POST", "/vms", Some(create_body("mover")))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    // b answers over TLS, with a's client certificate and its token: the
    // stand-in VMM cannot receive a VM, so b refuses, and says why.
    let to = format!("https://127.0.0.1:{}", b.port);
    let migrate = |token: &str| json!({"to": to, "peer_token": token});
    let r = call(&a_api, "POST", "/vms/mover/migrate", Some(migrate(TOKEN)))
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.fault_message().contains(&format!(
            "the daemon at {to} refused to receive the VM (HTTP 400)"
        )),
        "{}",
        r.text()
    );
    let r = call(
        &a_api,
        "POST",
        "/vms/mover/migrate",
        Some(migrate("not-the-token-0123456789")),
    )
    .await
    .unwrap();
    assert!(r.fault_message().contains("(HTTP 401)"), "{}", r.text());
    // Plain HTTP to b's TLS port is answered in plain words.
    let plain = format!("127.0.0.1:{}", b.port);
    let r = call(
        &a_api,
        "POST",
        "/vms/mover/migrate",
        Some(json!({"to": plain, "peer_token": TOKEN})),
    )
    .await
    .unwrap();
    assert!(r.fault_message().contains("TLS only"), "{}", r.text());
    // The VM stays here through all of it.
    let r = call(&a_api, "GET", "/vms/mover", None).await.unwrap();
    assert_eq!(r.json().unwrap()["state"], "running");
    a.stop().await;
    b.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_peers_need_a_ca() {
    let dir = scratch("peer-no-ca");
    let d = Daemon::start(&dir, [127, 0, 0, 1], |_| {}).await;
    let api = d.endpoint("http", TOKEN, None);
    let r = call(&api, "POST", "/vms", Some(create_body("vm")))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = call(
        &api,
        "POST",
        "/vms/vm/migrate",
        Some(json!({"to": "https://127.0.0.1:1", "peer_token": TOKEN})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.fault_message().contains("--peer-tls-ca"), "{}", r.text());
    let r = call(
        &api,
        "POST",
        "/vms/vm/migrate",
        Some(json!({"to": "ftp://127.0.0.1:1", "peer_token": TOKEN})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.fault_message().contains("https://HOST:PORT"),
        "{}",
        r.text()
    );
    d.stop().await;
}
