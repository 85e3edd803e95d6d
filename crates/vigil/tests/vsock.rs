//! virtio-vsock end to end: the test guest connects to CID 2 port 1234, which the
//! device bridges to the Unix socket `<uds>_1234`, where an echo server answers.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use common::{run, TIMEOUT};

/// An echo server for one connection on `path`; what it received.
fn echo_server(path: &str) -> std::thread::JoinHandle<Vec<u8>> {
    std::fs::remove_file(path).ok();
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
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
    })
}

/// Runs the test guest's `scenario` with a vsock device whose `<uds>_1234` is an
/// echo server: the run, and what the server received.
fn run_with_echo_server(name: &str, scenario: &str) -> (common::Run, Vec<u8>) {
    run_with_echo_server_and(name, scenario, &[])
}

/// [`run_with_echo_server`] with `extra` options.
fn run_with_echo_server_and(name: &str, scenario: &str, extra: &[&str]) -> (common::Run, Vec<u8>) {
    let uds = std::env::temp_dir().join(format!("vigil-vsock-{name}-{}.sock", std::process::id()));
    let port_path = format!("{}_1234", uds.display());
    let server = echo_server(&port_path);
    let vsock = format!("cid=3,uds={}", uds.display());
    let cmdline = format!("test={scenario}");
    let mut args = vec!["run", "--vsock", &vsock, "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    let r = run(&args, TIMEOUT);
    std::fs::remove_file(&port_path).ok();
    std::fs::remove_file(&uds).ok();
    (r, server.join().unwrap())
}

#[test]
fn vsock_guest_connection_reaches_the_host_echo_server() {
    let (r, echoed) = run_with_echo_server("echo", "vsock");
    assert_eq!(
        r.line("TEST vsock "),
        "TEST vsock PASS cid=3 echoed=16",
        "{r}"
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(echoed, b"vigil-vsock-ping");
}

/// The same over virtio-pci: three queues, each on its own MSI-X vector.
#[test]
fn vsock_over_pci_reaches_the_host_echo_server() {
    let (r, echoed) = run_with_echo_server_and("echo-pci", "vsock", &["--enable-pci"]);
    assert_eq!(
        r.line("TEST vsock "),
        "TEST vsock PASS cid=3 echoed=16",
        "{r}"
    );
    assert_eq!(echoed, b"vigil-vsock-ping");
}

#[test]
fn vsock_hostile_packets_are_refused_and_the_device_goes_on() {
    let (r, echoed) = run_with_echo_server("evil", "vsock-evil");
    // Refused with RST: a length past the buffer, an unknown op, a type the device
    // does not do. Dropped without a word: wrong source or destination CID, and
    // chains with no packet to read (short, outside RAM, looping, 2 GiB). After
    // each, the device answers a probe; then a whole connection echoes.
    assert_eq!(
        r.line("TEST vsock-evil "),
        "TEST vsock-evil PASS len=rst op=rst type=rst src=none dst=none short=none \
         oob=none loop=none huge=none alive=9 cid=3 echoed=16",
        "{r}"
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(echoed, b"vigil-vsock-ping");
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

#[test]
fn a_host_client_connects_to_a_listening_guest() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    let uds = std::env::temp_dir().join(format!("vigil-vsock-listen-{}.sock", std::process::id()));
    let mut child = common::vigil()
        .args(["run", "--vsock", &format!("cid=3,uds={}", uds.display())])
        .args(["--cmdline", "test=vsock-listen"])
        .spawn()
        .unwrap();
    let mut console = BufReader::new(child.stdout.take().unwrap());
    let mut lines = String::new();
    // Wait for the guest to listen, then connect the way Firecracker clients do.
    loop {
        let mut line = String::new();
        assert!(
            console.read_line(&mut line).unwrap() > 0,
            "guest ended early:\n{lines}"
        );
        lines.push_str(&line);
        if line.starts_with("vsock: listening on port 5000") {
            break;
        }
    }
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    let mut reader = BufReader::new(host.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    let host_port: u32 = ok[3..].trim().parse().unwrap();
    host.write_all(b"vigil-vsock-hello").unwrap();
    let mut echo = [0u8; 17];
    reader.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"vigil-vsock-hello");
    drop(reader);
    drop(host);
    let mut rest = String::new();
    console.read_to_string(&mut rest).unwrap();
    let r = common::finish(child, TIMEOUT);
    std::fs::remove_file(&uds).ok();
    let all = format!("{lines}{rest}");
    let expected = format!("TEST vsock-listen PASS port=5000 peer_port={host_port} echoed=17");
    assert!(all.contains(&expected), "{expected}\n{all}\n{}", r.stderr);
    assert_eq!(r.code, Some(0), "{r}");
}
