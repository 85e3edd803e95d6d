//! TLS 1.3 (rustls, ring) for the migration stream, when certificates are
//! given: the destination presents a certificate, the source checks it against
//! a CA it was given. The one-time token is still checked, inside TLS.
//!
//! A [`TlsStream`] can be cloned, one handle reading while another writes (as
//! post-copy does): the handles share the rustls connection behind a mutex
//! that no handle holds while it waits on the socket. A reader takes socket
//! bytes without the lock and hands them to rustls under it; a writer seals its
//! bytes under the lock and sends the records after, in order (a second mutex
//! keeps the records of two writes from interleaving).

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ServerConnection};
pub use vigil_tls::PemError;

use crate::target::Stream;
use crate::wire;

/// How long a peer may take to answer during the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The first byte of a TLS handshake record (and of an alert).
const HANDSHAKE_RECORD: u8 = 0x16;
const ALERT_RECORD: u8 = 0x15;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file (`vigil_tls` names which).
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("{0:?}: not a DNS name or an IP address")]
    ServerName(String),
    #[error("TLS handshake with the source failed: {0}")]
    Handshake(String),
}

/// The destination's side: its certificate and key.
#[derive(Clone)]
pub struct ServerTls(Arc<rustls::ServerConfig>);

impl ServerTls {
    /// From a PEM certificate chain (the destination's first) and its PEM
    /// private key (PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let mut config = vigil_tls::server_config(cert, key, None)?;
        // Nothing resumes a migration's session.
        config.send_tls13_tickets = 0;
        Ok(Self(Arc::new(config)))
    }

    /// The server side of a TLS session on `socket`, handshake done. A source
    /// that does not speak TLS is answered, in plain frames, why not.
    pub fn accept(&self, mut socket: Box<dyn Stream>) -> Result<Box<dyn Stream>, TlsError> {
        let failed = |e: &dyn std::fmt::Display| TlsError::Handshake(e.to_string());
        socket
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| failed(&e))?;
        let mut first = vec![0u8; 16 * 1024];
        let n = socket.read(&mut first).map_err(|e| failed(&e))?;
        if n == 0 {
            return Err(failed(&"the source closed the connection"));
        }
        if first[0] != HANDSHAKE_RECORD {
            // Its whole first frame read, the answer is not lost to a reset.
            let _ = wire::read(&mut (&first[..n]).chain(&mut socket));
            let why = "this destination takes migrations over TLS only (give the source tls_ca)";
            let _ = wire::answer(&mut socket, false, why);
            return Err(failed(&"the source does not speak TLS"));
        }
        let mut conn = ServerConnection::new(self.0.clone()).map_err(|e| failed(&e))?;
        let mut taken = &first[..n];
        while !taken.is_empty() {
            if conn.read_tls(&mut taken).map_err(|e| failed(&e))? == 0 {
                break;
            }
            if let Err(e) = conn.process_new_packets() {
                // The alert that tells the source why.
                let _ = flush(&mut Connection::Server(conn), &mut socket);
                return Err(failed(&e));
            }
        }
        let mut conn = Connection::Server(conn);
        handshake(&mut conn, &mut socket).map_err(|e| failed(&e))?;
        Ok(Box::new(TlsStream::new(conn, socket)))
    }
}

/// The source's side: the CA the destination's certificate must come from,
/// and the name it must carry.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the certificates in the PEM file `ca` (a CA, or the
    /// destination's own self-signed certificate) for `server_name`.
    pub fn load(ca: &Path, server_name: &str) -> Result<Self, TlsError> {
        let config = vigil_tls::client_config(ca, None)?;
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.into()))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The client side of a TLS session on `socket`, handshake done.
    pub fn connect(&self, mut socket: Box<dyn Stream>) -> io::Result<Box<dyn Stream>> {
        let failed = |why: String| io::Error::other(format!("TLS handshake: {why}"));
        socket.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let conn = ClientConnection::new(self.config.clone(), self.server_name.clone())
            .map_err(|e| failed(e.to_string()))?;
        let mut conn = Connection::Client(conn);
        let mut watched = FirstByte {
            socket: &mut socket,
            first: None,
        };
        if let Err(e) = handshake(&mut conn, &mut watched) {
            return Err(match watched.first {
                // A plain Vigil answers in frames: it was given no certificate.
                Some(b) if b != HANDSHAKE_RECORD && b != ALERT_RECORD => failed(
                    "the destination does not speak TLS (start it with --migration-tls-cert and --migration-tls-key, or migrate without tls_ca)".into(),
                ),
                _ => failed(e.to_string()),
            });
        }
        Ok(Box::new(TlsStream::new(conn, socket)))
    }
}

/// Reads and writes until the handshake is done and its last records sent.
fn handshake(conn: &mut Connection, socket: &mut (impl Read + Write)) -> io::Result<()> {
    while conn.is_handshaking() {
        let (read, wrote) = match conn.complete_io(socket) {
            Ok(done) => done,
            Err(e) => {
                // The alert that tells the peer why (complete_io may have
                // written only part of what was queued).
                let _ = flush(conn, socket);
                return Err(e);
            }
        };
        if read == 0 && wrote == 0 && conn.is_handshaking() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    flush(conn, socket)
}

/// Writes every TLS record queued.
fn flush(conn: &mut Connection, socket: &mut impl Write) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(socket)?;
    }
    Ok(())
}

/// A socket that remembers the first byte the peer sent.
struct FirstByte<'a> {
    socket: &'a mut Box<dyn Stream>,
    first: Option<u8>,
}

impl Read for FirstByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.socket.read(buf)?;
        if n > 0 && self.first.is_none() {
            self.first = Some(buf[0]);
        }
        Ok(n)
    }
}

impl Write for FirstByte<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.socket.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.socket.flush()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rustls connection and the socket bytes it has not taken yet (it takes
/// none while decrypted bytes wait to be read).
struct Session {
    conn: Connection,
    inbox: Vec<u8>,
}

/// A TLS session on a socket; its clones share it.
pub struct TlsStream {
    session: Arc<Mutex<Session>>,
    /// Held from sealing a write's records to their last byte on the socket.
    sending: Arc<Mutex<()>>,
    socket: Box<dyn Stream>,
    buffer: Box<[u8]>,
}

impl TlsStream {
    fn new(conn: Connection, socket: Box<dyn Stream>) -> Self {
        Self {
            session: Arc::new(Mutex::new(Session {
                conn,
                inbox: Vec::new(),
            })),
            sending: Arc::default(),
            socket,
            buffer: vec![0u8; 32 * 1024].into_boxed_slice(),
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut session = lock(&self.session);
                let Session { conn, inbox } = &mut *session;
                while !inbox.is_empty() && conn.wants_read() {
                    let taken = conn.read_tls(&mut inbox.as_slice())?;
                    inbox.drain(..taken);
                    conn.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if taken == 0 {
                        break;
                    }
                }
                match conn.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    done => return done,
                }
            }
            // Waits on the socket without the lock: the writer goes on.
            let n = self.socket.read(&mut self.buffer)?;
            let mut session = lock(&self.session);
            if n == 0 {
                // The peer closed: rustls says whether it ended cleanly.
                session.conn.read_tls(&mut &[][..])?;
                session
                    .conn
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                return match session.conn.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    done => done,
                };
            }
            session.inbox.extend_from_slice(&self.buffer[..n]);
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _sending = lock(&self.sending);
        let mut records = Vec::with_capacity(buf.len() + 64);
        let n = {
            let mut session = lock(&self.session);
            let n = session.conn.writer().write(buf)?;
            while session.conn.wants_write() {
                session.conn.write_tls(&mut records)?;
            }
            n
        };
        self.socket.write_all(&records)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.socket.flush()
    }
}

impl Stream for TlsStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(timeout)
    }

    fn try_clone(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(Self {
            session: self.session.clone(),
            sending: self.sending.clone(),
            socket: self.socket.try_clone()?,
            buffer: vec![0u8; self.buffer.len()].into_boxed_slice(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::sync::mpsc;
    use std::thread;

    use super::*;

    /// A self-signed certificate for `name` and its key, as PEM files.
    fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    fn scratch(test: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vigil-tls-{test}-{}", std::process::id()))
    }

    /// A connected pair of TCP sockets.
    fn pair() -> (Box<dyn Stream>, Box<dyn Stream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (Box::new(client), Box::new(server))
    }

    /// The client's end and the server's, each as its handshake ended.
    type Ends = (
        io::Result<Box<dyn Stream>>,
        Result<Box<dyn Stream>, TlsError>,
    );

    /// Both ends of a TLS session (the server's handshake on a thread).
    fn session(server: &ServerTls, client: &ClientTls) -> Ends {
        let (c, s) = pair();
        let server = server.clone();
        let accepted = thread::spawn(move || server.accept(s));
        let connected = client.connect(c);
        (connected, accepted.join().unwrap())
    }

    /// Bytes that say where they are in the stream.
    fn pattern(at: usize, len: usize) -> Vec<u8> {
        (at..at + len).map(|i| (i % 251) as u8).collect()
    }

    const BYTES: usize = 16 << 20;

    fn send_all(mut out: Box<dyn Stream>) {
        let mut at = 0;
        while at < BYTES {
            let chunk = pattern(at, (BYTES - at).min(100_000));
            out.write_all(&chunk).unwrap();
            at += chunk.len();
        }
    }

    fn receive_all(mut input: Box<dyn Stream>) -> bool {
        let mut got = vec![0u8; BYTES];
        input.read_exact(&mut got).unwrap();
        got == pattern(0, BYTES)
    }

    #[test]
    fn clones_read_and_write_at_once_both_ways() {
        let dir = scratch("clones");
        let (cert, key) = certificate(&dir, "localhost");
        let server = ServerTls::load(&cert, &key).unwrap();
        let client = ClientTls::load(&cert, "localhost").unwrap();
        let (c, s) = session(&server, &client);
        let (c, s) = (c.unwrap(), s.unwrap());
        // Each end writes 16 MiB on one handle while reading 16 MiB on the
        // other: a writer that held the session while blocked on a full socket
        // would stop the peer's reader, and both would hang.
        let (done, finished) = mpsc::channel();
        for end in [c, s] {
            let writer = end.try_clone().unwrap();
            let done = done.clone();
            thread::spawn(move || send_all(writer));
            thread::spawn(move || done.send(receive_all(end)).unwrap());
        }
        for _ in 0..2 {
            let intact = finished
                .recv_timeout(Duration::from_secs(120))
                .expect("both directions at once hang");
            assert!(intact, "the bytes that arrived are not the bytes sent");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_read_times_out_and_the_stream_goes_on() {
        let dir = scratch("timeout");
        let (cert, key) = certificate(&dir, "127.0.0.1");
        let server = ServerTls::load(&cert, &key).unwrap();
        let client = ClientTls::load(&cert, "127.0.0.1").unwrap();
        let (c, s) = session(&server, &client);
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut byte = [0u8; 1];
        let e = c.read(&mut byte).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        s.write_all(b"x").unwrap();
        c.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        drop(s);
        let e = c.read(&mut byte).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_on_both_sides() {
        let dir = scratch("wrong-ca");
        let (cert, key) = certificate(&dir.join("real"), "localhost");
        let (other, _) = certificate(&dir.join("other"), "localhost");
        let server = ServerTls::load(&cert, &key).unwrap();
        let client = ClientTls::load(&other, "localhost").unwrap();
        let (c, s) = session(&server, &client);
        let c = c.err().expect("the source accepted an unknown issuer");
        assert!(
            c.to_string()
                .contains("TLS handshake: invalid peer certificate"),
            "{c}"
        );
        let s = s
            .err()
            .expect("the destination went on after a refused handshake");
        assert!(
            s.to_string()
                .contains("handshake with the source failed: received fatal alert"),
            "{s}"
        );
        // A name the certificate does not carry.
        let client = ClientTls::load(&cert, "elsewhere").unwrap();
        let c = session(&server, &client).0.err().unwrap();
        assert!(
            c.to_string().contains("not valid for name \"elsewhere\""),
            "{c}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_plain_source_is_told_in_plain_frames() {
        let dir = scratch("plain-source");
        let (cert, key) = certificate(&dir, "localhost");
        let server = ServerTls::load(&cert, &key).unwrap();
        let (mut c, s) = pair();
        let accepted = thread::spawn(move || server.accept(s));
        wire::write(&mut c, wire::Kind::Hello, &wire::hello("token")).unwrap();
        let answer = wire::read_answer(&mut c).unwrap().unwrap_err();
        assert!(answer.contains("over TLS only"), "{answer}");
        let e = accepted.join().unwrap().err().unwrap();
        assert!(e.to_string().contains("does not speak TLS"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_tls_source_to_a_plain_destination_says_so() {
        let dir = scratch("plain-destination");
        let (cert, _) = certificate(&dir, "localhost");
        let client = ClientTls::load(&cert, "localhost").unwrap();
        let (c, mut s) = pair();
        // What a destination without certificates does with the first frame.
        let plain = thread::spawn(move || {
            let e = wire::read(&mut s).unwrap_err();
            let _ = wire::answer(&mut s, false, &e.to_string());
            e.to_string()
        });
        let e = client.connect(c).err().unwrap();
        assert!(
            e.to_string().contains("the destination does not speak TLS"),
            "{e}"
        );
        let seen = plain.join().unwrap();
        assert!(seen.contains("no --migration-tls-cert"), "{seen}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_files_say_which_and_why() {
        // vigil-tls checks the files; here, that its verdict comes through.
        let dir = scratch("bad-files");
        let (cert, key) = certificate(&dir, "localhost");
        let e = ServerTls::load(&key, &key).err().unwrap();
        assert!(
            matches!(e, TlsError::Pem(PemError::Cert { .. })) && e.to_string().contains("key.pem"),
            "{e}"
        );
        let e = ServerTls::load(&cert, &cert).err().unwrap();
        assert!(matches!(e, TlsError::Pem(PemError::Key { .. })), "{e}");
        let e = ClientTls::load(&key, "localhost").err().unwrap();
        assert!(matches!(e, TlsError::Pem(PemError::Ca { .. })), "{e}");
        let e = ClientTls::load(&cert, "not a name!").err().unwrap();
        assert!(matches!(e, TlsError::ServerName(_)), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
