//! The daemon's security event stream end to end, with real test-guest VMs: a
//! flooding guest is detected, throttled by a policy and seen saturating its rate
//! limiter (in the JSON-lines, syslog and CEF outputs and on `GET /events`); a
//! crashing guest gives `vm_crashed`; malformed and unauthorized API requests are
//! reported, limited per peer; `vigil ctl events` prints the stream.

mod common;

use common::{json_lines, scratch};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{
    free_loopback_addr, http_exchange, http_unix, tcp_args, wait_for_state, Daemon, VIGIL,
};
use serde_json::{json, Value};

fn rule(e: &Value) -> &str {
    e["rule"].as_str().unwrap_or("")
}

/// Waits until the JSON-lines output holds an event for which `want` holds.
fn wait_event(d: &Daemon, path: &Path, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(e) = json_lines(path).into_iter().find(|e| want(e)) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} event within 30 s; events:\n{}\n--- daemon\n{}",
            std::fs::read_to_string(path).unwrap_or_default(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Falco's output keys, every one.
fn assert_falco_keys(e: &Value) {
    for key in [
        "time",
        "rule",
        "priority",
        "output",
        "output_fields",
        "source",
        "tags",
        "hostname",
    ] {
        assert!(e.get(key).is_some(), "no {key} in {e}");
    }
}

/// `(second, ops)` of each `flood: <ops> ops in second <k>` console line so far.
fn flood_seconds(console: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (ops, k) = l.strip_prefix("flood: ")?.split_once(" ops in second ")?;
            Some((k.trim().parse().ok()?, ops.parse().ok()?))
        })
        .collect()
}

/// Reads `GET /events` (server-sent events, on the Unix socket) until `done` holds
/// for the events seen, or `timeout`; returns the `(id, event)` pairs.
fn read_sse(
    socket: &Path,
    last_event_id: Option<u64>,
    timeout: Duration,
    done: impl Fn(&[(u64, Value)]) -> bool,
) -> Vec<(u64, Value)> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n{resume}\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let (mut events, mut id) = (Vec::new(), None);
    let deadline = Instant::now() + timeout;
    let mut line = String::new();
    while Instant::now() < deadline && !done(&events) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => continue,
        }
        // Chunk-size lines are hex; SSE lines start with their field name.
        let line = line.trim_end();
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
            events.push((id.take().expect("an id before each data line"), v));
        }
    }
    events
}

#[test]
fn a_flood_is_detected_throttled_by_policy_and_written_to_every_output() {
    let files = scratch("flood");
    let config = files.join("events.json");
    std::fs::write(
        &config,
        json!({
            "detectors": {
                "disk_ops": {"enter_per_s": 200, "sustain_s": 2, "exit_per_s": 150},
                "rate_limit": {"consecutive_samples": 3, "clear_samples": 3},
            },
            "policy": {"rules": [{
                "name": "slow floods down", "when": {"rule": "vm_io_flood"},
                "action": "throttle", "params": {"ops_per_s": 100},
            }]},
        })
        .to_string(),
    )
    .unwrap();
    let (jsonl, syslog, cef) = (
        files.join("events.jsonl"),
        files.join("events.syslog"),
        files.join("events.cef"),
    );
    let output = |format: &str, path: &Path| format!("{format}:{}", path.display());
    let mut d = Daemon::start(
        "secev-flood",
        &[
            "--events-config",
            config.to_str().unwrap(),
            "--events-output",
            &output("json", &jsonl),
            "--events-output",
            &output("syslog", &syslog),
            "--events-output",
            &output("cef", &cef),
            "--sample-interval",
            "0.5",
        ],
    );
    // A live reader of GET /events from the start.
    let socket = d.socket.clone();
    let live = std::thread::spawn(move || {
        read_sse(&socket, None, Duration::from_secs(40), |seen| {
            seen.iter()
                .any(|(_, e)| rule(e) == "vm_rate_limit_saturated")
        })
    });

    // In the daemon's folder: the one its VMs may name files in.
    let disk = d.dir.join("data.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut vm = d.config("flood flood_s=20");
    vm["drives"] = json!([{"drive_id": "data", "path_on_host": disk, "is_root_device": false}]);
    let (status, body) = d.http("POST", "/vms", Some(json!({"id": "flood-1", "config": vm})));
    assert_eq!(status, 201, "{body}\n{}", d.log());
    let console = d.dir.join("state/vms/flood-1/console.log");

    // The flood, with its ATT&CK technique, then the policy's throttle in the same
    // incident.
    let flood = wait_event(&d, &jsonl, "vm_io_flood", |e| {
        rule(e) == "vm_io_flood" && e["priority"] == "Warning"
    });
    let throttled_at = flood_seconds(&console).len();
    assert_falco_keys(&flood);
    assert_eq!(flood["source"], "host");
    assert_eq!(flood["output_fields"]["vm.id"], "flood-1");
    assert_eq!(flood["output_fields"]["flood.kind"], "disk_ops");
    assert_eq!(
        flood["tags"],
        json!(["vm", "resource_exhaustion", "mitre_impact", "T1499.001"])
    );
    let incident = flood["output_fields"]["incident.id"].clone();
    assert!(incident.is_u64(), "{flood}");
    let action = wait_event(&d, &jsonl, "policy_action", |e| rule(e) == "policy_action");
    assert_falco_keys(&action);
    let f = &action["output_fields"];
    assert_eq!(f["policy.action"], "throttle", "{action}");
    assert_eq!(f["policy.result"], "ok", "{action}");
    assert_eq!(f["policy.rule"], "slow floods down");
    assert_eq!(f["vm.id"], "flood-1");
    assert_eq!(f["incident.id"], incident);
    assert_eq!(action["priority"], "Notice");

    // The guest feels it: a second wholly after the throttle stays near 100 ops.
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let seen = flood_seconds(&console);
        if seen.len() >= throttled_at + 2 {
            break seen;
        }
        assert!(Instant::now() < deadline, "flood lines stopped: {seen:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let baseline = seen[0].1;
    let throttled = seen[throttled_at + 1].1;
    eprintln!("flood: {baseline} ops/s, then {throttled} ops/s under the policy");
    assert!(
        (20..=200).contains(&throttled) && baseline > 3 * throttled,
        "{seen:?} (throttled after {throttled_at} seconds)"
    );
    let config = d.http("GET", "/vms/flood-1", None).1;
    assert_eq!(
        config["state"], "running",
        "the VM runs on, throttled: {config}"
    );

    // The limiter now holds it back in every sample: saturated, same incident.
    let saturated = wait_event(&d, &jsonl, "vm_rate_limit_saturated", |e| {
        rule(e) == "vm_rate_limit_saturated"
    });
    assert_eq!(saturated["priority"], "Warning");
    assert_eq!(saturated["output_fields"]["incident.id"], incident);
    assert!(saturated["tags"]
        .as_array()
        .unwrap()
        .contains(&json!("T1499")));

    // GET /events delivered the same events live, in order, with ids ...
    let live = live.join().unwrap();
    let order: Vec<&str> = live.iter().map(|(_, e)| rule(e)).collect();
    let pos = |r: &str| order.iter().position(|x| *x == r).unwrap_or(usize::MAX);
    assert!(
        pos("vm_lifecycle") < pos("vm_io_flood")
            && pos("vm_io_flood") < pos("policy_action")
            && pos("policy_action") < pos("vm_rate_limit_saturated"),
        "{order:?}"
    );
    assert!(live.windows(2).all(|w| w[0].0 < w[1].0), "ids grow");
    let (flood_id, live_flood) = live.iter().find(|(_, e)| rule(e) == "vm_io_flood").unwrap();
    assert_eq!(live_flood["output"], flood["output"]);
    assert_eq!(live_flood["tags"], flood["tags"]);
    // ... and resumes after a Last-Event-ID with the event that followed it.
    let resumed = read_sse(&d.socket, Some(*flood_id), Duration::from_secs(5), |s| {
        !s.is_empty()
    });
    assert_eq!(resumed.first().map(|(id, _)| *id), Some(flood_id + 1));

    // Stop everything: every output then holds one line per event.
    assert_eq!(d.http("DELETE", "/vms/flood-1", None).0, 204);
    assert_eq!(d.sigterm().code(), Some(0), "{}", d.log());
    let events = json_lines(&jsonl);
    let syslog = std::fs::read_to_string(&syslog).unwrap();
    let cef = std::fs::read_to_string(&cef).unwrap();
    assert_eq!(syslog.lines().count(), events.len(), "{syslog}");
    assert_eq!(cef.lines().count(), events.len(), "{cef}");
    for ((e, s), c) in events.iter().zip(syslog.lines()).zip(cef.lines()) {
        let r = rule(e);
        // <PRI>1 TIMESTAMP HOST vigil PID MSGID [vigil@32473 ...] MSG
        let fields: Vec<&str> = s.splitn(7, ' ').collect();
        assert!(
            fields[0].starts_with('<') && fields[0].ends_with(">1"),
            "{s}"
        );
        assert_eq!(fields[3], "vigil", "{s}");
        assert_eq!(fields[5], r, "{s}");
        assert!(fields[6].starts_with("[vigil@32473 "), "{s}");
        assert!(
            c.starts_with(&format!(
                "CEF:0|Vigil|Vigil|{}|{r}|",
                env!("CARGO_PKG_VERSION")
            )),
            "{c}"
        );
    }
    let flood_syslog = syslog
        .lines()
        .find(|l| l.contains(" vm_io_flood ["))
        .unwrap();
    // local0 (16) * 8 + Warning (4)
    assert!(flood_syslog.starts_with("<132>1 "), "{flood_syslog}");
    assert!(flood_syslog.contains("T1499.001"), "{flood_syslog}");
    let flood_cef = cef.lines().find(|l| l.contains("|vm_io_flood|")).unwrap();
    assert!(
        flood_cef.contains("|5|") && flood_cef.contains("cs1=flood-1"),
        "{flood_cef}"
    );
    std::fs::remove_dir_all(&files).ok();
}

#[test]
fn a_crashing_guest_gives_vm_crashed() {
    let files = scratch("crash");
    let jsonl = files.join("events.jsonl");
    let d = Daemon::start(
        "secev-crash",
        &["--events-output", &format!("json:{}", jsonl.display())],
    );
    d.create("boom", "triple-fault");
    wait_for_state(&d, "boom", "crashed");
    let crash = wait_event(&d, &jsonl, "vm_crashed", |e| rule(e) == "vm_crashed");
    assert_falco_keys(&crash);
    assert_eq!(crash["priority"], "Error");
    let f = &crash["output_fields"];
    assert_eq!(f["vm.id"], "boom");
    assert_eq!(f["crash.reason"], "triple fault", "{crash}");
    assert_eq!(f["proc.exit_code"], 3);
    assert!(
        crash["output"]
            .as_str()
            .unwrap()
            .contains("vm boom crashed: triple fault"),
        "{crash}"
    );
    // A crash is not also a lifecycle event.
    assert!(!json_lines(&jsonl)
        .iter()
        .any(|e| e["output_fields"]["vm.lifecycle"] == "crashed"));
    drop(d);
    std::fs::remove_dir_all(&files).ok();
}

#[test]
fn api_misuse_is_reported_limited_per_peer_and_printed_by_ctl() {
    let files = scratch("api");
    let jsonl = files.join("events.jsonl");
    let token_file = files.join("token");
    std::fs::write(&token_file, "s3cret-s3cret-s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let addr = free_loopback_addr();
    let jsonl_output = format!("json:{}", jsonl.display());
    let d = Daemon::start(
        "secev-api",
        &[
            &tcp_args(&addr, &token_file)[..],
            &["--events-output", &jsonl_output],
        ]
        .concat(),
    );
    // `vigil ctl events --follow --json`, following from the start.
    let mut follower = Command::new(VIGIL)
        .args(["ctl", "--socket"])
        .arg(&d.socket)
        .args(["events", "--follow", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let followed = {
        let out = follower.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let done = line.contains("api_unauthorized");
                lines.push(line);
                if done {
                    break;
                }
            }
            lines
        })
    };

    // A body that is not JSON, on the Unix socket.
    let (status, text) = http_unix(&d.socket, "POST", "/vms", None, None);
    assert_eq!(status, 400, "{text}");
    let malformed = wait_event(&d, &jsonl, "api_malformed_request", |e| {
        rule(e) == "api_malformed_request"
    });
    assert_falco_keys(&malformed);
    let f = &malformed["output_fields"];
    assert_eq!(f["api.transport"], "unix_socket");
    assert!(f["api.peer"].as_str().unwrap().starts_with("uid="), "{f}");
    assert!(
        f["api.detail"].as_str().unwrap().starts_with("POST /vms: "),
        "{f}"
    );
    assert_eq!(
        malformed["tags"],
        json!(["api", "mitre_privilege_escalation", "T1068"])
    );
    assert_eq!(malformed["priority"], "Notice");

    // Twenty requests without the token on TCP: ten events, not twenty.
    for _ in 0..20 {
        let stream = std::net::TcpStream::connect(&addr).unwrap();
        assert_eq!(http_exchange(stream, "GET", "/vms", None, None).0, 401);
    }
    wait_event(&d, &jsonl, "api_unauthorized", |e| {
        rule(e) == "api_unauthorized"
    });
    // What the daemon has at once is all that comes: give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    let unauthorized: Vec<Value> = json_lines(&jsonl)
        .into_iter()
        .filter(|e| rule(e) == "api_unauthorized")
        .collect();
    assert_eq!(unauthorized.len(), 10, "{unauthorized:#?}");
    let f = &unauthorized[0]["output_fields"];
    assert_eq!(f["api.transport"], "network");
    assert!(
        f["api.peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{f}"
    );
    assert_eq!(
        f["api.detail"].as_str().unwrap().split(':').next(),
        Some("GET /vms")
    );
    assert_eq!(unauthorized[0]["priority"], "Warning");
    assert_eq!(
        unauthorized[0]["tags"],
        json!(["api", "mitre_initial_access", "T1190"])
    );

    // The follower printed them as they came, as Falco-style JSON ...
    let lines = followed.join().unwrap();
    // SAFETY: kill has no memory effects; the pid is our unreaped child.
    unsafe { libc::kill(follower.id() as i32, libc::SIGTERM) };
    let _ = follower.wait();
    let rules: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["rule"].to_string())
        .collect();
    assert!(
        rules.contains(&"\"api_malformed_request\"".to_owned())
            && rules.contains(&"\"api_unauthorized\"".to_owned()),
        "{lines:?}"
    );
    // ... and `vigil ctl events` prints the recent ones, one line each.
    let r = d.ctl_ok(&["events"]);
    let printed: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.contains(" api_unauthorized "))
        .collect();
    assert_eq!(printed.len(), 10, "{r}");
    assert!(
        printed[0].contains("Warning")
            && printed[0].contains("unauthorized request from 127.0.0.1:"),
        "{}",
        printed[0]
    );
    drop(d);
    std::fs::remove_dir_all(&files).ok();
}
