//! The guest's side: HTTP/1.1 requests on the MMDS address and their answers,
//! in Firecracker's formats (JSON, or IMDS text) and with its V2 session tokens.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::MmdsVersion;
use crate::store::{kind, Mmds, TOKEN_TTL_MAX};

/// Longest request (head and body) a guest may send; a longer one is refused
/// and its connection closed.
pub const MAX_REQUEST: usize = 4096;
const MAX_HEADERS: usize = 32;
const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "X-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-metadata-token";

/// What [`Mmds::answer`] made of the bytes a connection received.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Not a whole request yet: wait for more bytes.
    Incomplete,
    /// The first `consumed` bytes were one request; send `response`. With
    /// `close`, the bytes could not be parsed: close the connection after it.
    Answered {
        consumed: usize,
        response: Vec<u8>,
        close: bool,
    },
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body: body.into(),
            allow: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            _ => "Internal Server Error",
        };
        let allow = if self.allow {
            "Allow: GET, PUT\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nServer: Vigil MMDS\r\n{allow}Content-Type: {}\r\nContent-Length: {}\r\n\r\n{}",
            self.status,
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

fn header<'a>(req: &'a httparse::Request<'_, '_>, name: &str) -> Option<&'a [u8]> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The IMDS text form: an object's keys one a line (`key/` for an object), a
/// string as it is; nothing else has one.
fn imds_text(path: &str, v: &Value) -> Reply {
    match v {
        Value::String(s) => Reply::text(200, s.clone()),
        Value::Object(members) => {
            let keys: Vec<String> = members
                .iter()
                .map(|(k, v)| if v.is_object() { format!("{k}/") } else { k.clone() })
                .collect();
            Reply::text(200, keys.join("\n"))
        }
        other => Reply::text(
            400,
            format!(
                "Cannot retrieve value at {path}: it is {}, which the IMDS text format cannot show (ask with Accept: application/json).",
                kind(other)
            ),
        ),
    }
}

impl Mmds {
    /// Answers the request at the start of `buf` (bytes a guest connection
    /// received), at time `now`.
    pub fn answer(&self, buf: &[u8], now: Instant) -> Request {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let refuse = |status, why: &str| Request::Answered {
            consumed: buf.len(),
            response: Reply::text(status, why).bytes(),
            close: true,
        };
        let head = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => return Request::Incomplete,
            Ok(httparse::Status::Partial) => {
                return refuse(413, "Request too large.");
            }
            Err(e) => return refuse(400, &format!("Malformed HTTP request: {e}.")),
        };
        let body = match header(&req, "Content-Length").map(std::str::from_utf8) {
            None => 0,
            Some(Ok(n)) => match n.trim().parse::<usize>() {
                Ok(n) => n,
                Err(_) => return refuse(400, "Invalid Content-Length."),
            },
            Some(Err(_)) => return refuse(400, "Invalid Content-Length."),
        };
        if head.saturating_add(body) > MAX_REQUEST {
            return refuse(413, "Request too large.");
        }
        if buf.len() < head + body {
            return Request::Incomplete;
        }
        let reply = self.reply(&req, now);
        Request::Answered {
            consumed: head + body,
            response: reply.bytes(),
            close: false,
        }
    }

    fn reply(&self, req: &httparse::Request<'_, '_>, now: Instant) -> Reply {
        let path = req.path.unwrap_or("/");
        let path = path.split(['?', '#']).next().unwrap_or("/");
        if !path.starts_with('/') {
            return Reply::text(400, format!("Invalid URI: {path}."));
        }
        let (version, imds_compat) = self
            .config()
            .map_or((MmdsVersion::V1, false), |c| (c.version, c.imds_compat));
        match req.method {
            Some("PUT") => self.put_token(req, path, now),
            Some("GET") => {
                if version == MmdsVersion::V2 {
                    match header(req, TOKEN_HEADER).map(std::str::from_utf8) {
                        None => {
                            return Reply::text(
                                401,
                                format!("No MMDS token provided. Use the {TOKEN_HEADER} header with a token from PUT {TOKEN_PATH}."),
                            )
                        }
                        Some(Ok(t)) if self.token_valid(t.trim(), now) => {}
                        Some(_) => return Reply::text(401, "MMDS token not valid."),
                    }
                }
                let json = !imds_compat
                    && header(req, "Accept")
                        .is_some_and(|a| a.windows(16).any(|w| w == b"application/json"));
                self.get_value(path, json)
            }
            _ => Reply {
                allow: true,
                ..Reply::text(405, "Not allowed HTTP method.")
            },
        }
    }

    fn put_token(&self, req: &httparse::Request<'_, '_>, path: &str, now: Instant) -> Reply {
        if header(req, "X-Forwarded-For").is_some() {
            return Reply::text(
                400,
                "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For",
            );
        }
        if path.trim_end_matches('/') != TOKEN_PATH {
            return Reply::text(404, format!("Resource not found: {path}."));
        }
        let Some(ttl) = header(req, TTL_HEADER) else {
            return Reply::text(
                400,
                format!("Token time to live value not found. Use the {TTL_HEADER} header to give the token's lifetime."),
            );
        };
        let ttl = String::from_utf8_lossy(ttl);
        match ttl.trim().parse::<u64>() {
            Ok(s @ 1..=TOKEN_TTL_MAX) => match self.new_token(now, Duration::from_secs(s)) {
                Ok(token) => Reply::text(200, token),
                Err(e) => Reply::text(500, format!("Cannot make a token: {e}.")),
            },
            _ => Reply::text(
                400,
                format!("Invalid time to live value provided for token: {ttl}. Please provide a value between 1 and {TOKEN_TTL_MAX}."),
            ),
        }
    }

    fn get_value(&self, path: &str, json: bool) -> Reply {
        let pointer = path.trim_end_matches('/');
        let found = {
            let s = self.lock();
            s.data.as_ref().and_then(|d| d.pointer(pointer)).cloned()
        };
        let Some(value) = found else {
            return Reply::text(404, format!("Resource not found: {path}."));
        };
        if json {
            Reply {
                content_type: "application/json",
                ..Reply::text(200, value.to_string())
            }
        } else {
            imds_text(path, &value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MmdsConfig;
    use serde_json::json;

    fn mmds(version: MmdsVersion, imds_compat: bool) -> Mmds {
        let m = Mmds::new(4096);
        m.set_config(MmdsConfig {
            version,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: crate::DEFAULT_IPV4,
            imds_compat,
        });
        m.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 3, "tags": {}}}}))
            .unwrap();
        m
    }

    fn ask(m: &Mmds, req: &str, now: Instant) -> (u16, String) {
        match m.answer(req.as_bytes(), now) {
            Request::Answered { response, .. } => {
                let text = String::from_utf8(response).unwrap();
                let status = text[9..12].parse().unwrap();
                let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
                (status, body)
            }
            Request::Incomplete => panic!("incomplete: {req:?}"),
        }
    }

    #[test]
    fn v1_answers_text_and_json() {
        let m = mmds(MmdsVersion::V1, false);
        let now = Instant::now();
        let get = |p: &str, extra: &str| ask(&m, &format!("GET {p} HTTP/1.1\r\n{extra}\r\n"), now);
        assert_eq!(get("/latest/meta-data/ami-id", ""), (200, "ami-1".into()));
        assert_eq!(
            get("/latest/meta-data/", ""),
            (200, "ami-id\nn\ntags/".into())
        );
        assert_eq!(get("/latest/meta-data/n", "").0, 400);
        assert_eq!(
            get("/latest/meta-data/n", "Accept: application/json\r\n"),
            (200, "3".into())
        );
        assert_eq!(get("/nothing", "").0, 404);
        assert_eq!(ask(&m, "POST / HTTP/1.1\r\n\r\n", now).0, 405);
    }

    #[test]
    fn imds_compat_answers_text_whatever_accept_says() {
        let m = mmds(MmdsVersion::V1, true);
        let (status, body) = ask(
            &m,
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
            Instant::now(),
        );
        assert_eq!((status, body.as_str()), (200, "ami-1"));
    }

    #[test]
    fn v2_needs_a_live_token() {
        let m = mmds(MmdsVersion::V2, false);
        let now = Instant::now();
        let get = "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n";
        assert_eq!(ask(&m, get, now).0, 401);
        let put = |ttl: &str, extra: &str| {
            ask(&m, &format!("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n{extra}\r\n"), now)
        };
        assert_eq!(put("0", "").0, 400);
        assert_eq!(put("21601", "").0, 400);
        assert_eq!(put("1", "X-Forwarded-For: 10.0.0.1\r\n").0, 400);
        let (status, token) = put("1", "");
        assert_eq!(status, 200);
        let with =
            format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
        assert_eq!(ask(&m, &with, now), (200, "ami-1".into()));
        assert_eq!(ask(&m, &with, now + Duration::from_secs(2)).0, 401);
        assert_eq!(
            ask(&m, "GET / HTTP/1.1\r\nX-metadata-token: bad\r\n\r\n", now).0,
            401
        );
    }

    #[test]
    fn partial_oversized_and_garbage_requests() {
        let m = mmds(MmdsVersion::V1, false);
        let now = Instant::now();
        assert_eq!(
            m.answer(b"GET / HTTP/1.1\r\nHost: x", now),
            Request::Incomplete
        );
        let two = b"GET /latest HTTP/1.1\r\n\r\nGET /latest HTTP/1.1\r\n\r\n";
        match m.answer(two, now) {
            Request::Answered {
                consumed, close, ..
            } => assert_eq!((consumed, close), (24, false)),
            r => panic!("{r:?}"),
        }
        let big = vec![b'a'; MAX_REQUEST + 1];
        assert!(matches!(
            m.answer(&big, now),
            Request::Answered { close: true, .. }
        ));
        assert!(matches!(
            m.answer(b"\x00\x01garbage\r\n\r\n", now),
            Request::Answered { close: true, .. }
        ));
        let huge_body = b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 99999\r\n\r\n";
        assert!(matches!(
            m.answer(huge_body, now),
            Request::Answered { close: true, .. }
        ));
    }
}
