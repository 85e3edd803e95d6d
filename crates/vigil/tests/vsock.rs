//! virtio-vsock end to end: the test guest connects to CID 2 port 1234, which the
//! device bridges to the Unix socket `<uds>_1234`, where an echo server answers.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use common::{run, TIMEOUT};

#[test]
fn vsock_guest_connection_reaches_the_host_echo_server() {
    let uds = std::env::temp_dir().join(format!("vigil-vsock-{}.sock", std::process::id()));
    let port_path = format!("{}_1234", uds.display());
    std::fs::remove_file(&port_path).ok();
    let listener = UnixListener::bind(&port_path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    stream.write_all(&buf[..n]).unwrap();
                }
            }
        }
        got
    });
    let r = run(
        &[
            "run",
            "--vsock",
            &format!("cid=3,uds={}", uds.display()),
            "--cmdline",
            "test=vsock",
        ],
        TIMEOUT,
    );
    std::fs::remove_file(&port_path).ok();
    std::fs::remove_file(&uds).ok();
    assert_eq!(
        r.line("TEST vsock "),
        "TEST vsock PASS cid=3 echoed=16",
        "{r}"
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(server.join().unwrap(), b"vigil-vsock-ping");
}

#[test]
fn vsock_option_errors_name_the_value() {
    let r = run(&["run", "--vsock", "cid=2,uds=/tmp/x.sock"], TIMEOUT);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr.contains("--vsock cid=2: 0 to 2 are reserved"),
        "{r}"
    );
    let r = run(&["run", "--vsock", "cid=3"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("uds=PATH is required"), "{r}");
    let r = run(
        &["run", "--vsock", "cid=3,uds=/nonexistent/dir/v.sock"],
        TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("--vsock uds=/nonexistent/dir/v.sock: cannot listen there"),
        "{r}"
    );
}
