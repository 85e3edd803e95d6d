//! Random inputs through the whole public pipeline: nothing panics, outputs keep
//! their framing, events come only on state changes.

use vigil_events::output::{cef_escape_extension, syslog_escape_msg};
use vigil_events::*;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn opt_counter(&mut self, prev: Option<u64>) -> Option<u64> {
        match self.below(10) {
            0 => None,
            1 => Some(self.next()), // anything, resets included
            2 => Some(u64::MAX),
            _ => Some(prev.unwrap_or(0).saturating_add(self.below(2_000_000))),
        }
    }
    fn psi(&mut self) -> Option<f64> {
        match self.below(8) {
            0 => None,
            1 => Some(f64::NAN),
            2 => Some(-1.0),
            3 => Some(f64::INFINITY),
            _ => Some(self.below(10_000) as f64 / 100.0),
        }
    }
    fn string(&mut self) -> String {
        const PIECES: &[&str] = &[
            "a",
            " ",
            "\n",
            "\r",
            "|",
            "=",
            "\\",
            "]",
            "\"",
            "\0",
            "\x1b",
            "ü",
            "✓",
            "\u{2028}",
            "\u{85}",
            "key=value",
            "CEF:0|",
            "<13>1 ",
            "data: x\n\n",
            "%",
            "{",
            "}",
        ];
        let n = self.below(12);
        (0..n)
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect()
    }
}

#[test]
fn random_pipeline_never_panics_and_keeps_framing() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let config = DetectorConfig {
        disk_ops: FloodThreshold {
            enabled: true,
            enter_per_s: 50_000.0,
            sustain_s: 3,
            exit_per_s: 10_000.0,
        },
        ..DetectorConfig::default()
    };
    let mut host = HostDetector::new(config.clone()).unwrap();
    let mut vms = VmDetector::new(config).unwrap();
    let policy: Policy = serde_json::from_str(
        r#"{"cooldown_s":5,"rules":[
            {"when":{"rule":"vm_io_flood"},"action":"throttle"},
            {"when":{"min_priority":"Error"},"action":"pause"},
            {"when":{"rule":"incident_dos_crash"},"action":"stop"}]}"#,
    )
    .unwrap();
    let mut engine = Engine::new(
        Correlator::new(CorrelatorConfig {
            window_s: 20,
            ..CorrelatorConfig::default()
        }),
        PolicyEngine::new(policy).unwrap(),
    );
    let hub = EventHub::new(HubConfig {
        backlog: 64,
        subscriber_queue: 100_000,
        first_id: 1,
    });
    let mut sub = hub.subscribe(Resume::Live);
    let syslog = SyslogFormat::new("h");
    let cef = CefFormat::new("h");
    let mut fail = 0u64;
    let mut sink = |_: &Action| -> Result<(), String> {
        fail += 1;
        if fail % 3 == 0 {
            Err("no such vm\n|=".into())
        } else {
            Ok(())
        }
    };
    let mut last: Vec<VmSample> = (0..4)
        .map(|i| VmSample {
            vm_id: format!("vm{i}"),
            ..VmSample::default()
        })
        .collect();
    let mut published = 0u64;
    // "No spam": per condition, start and end events alternate.
    let mut states: std::collections::HashMap<(Rule, Option<String>, String), String> =
        std::collections::HashMap::new();
    for tick in 0..3000u64 {
        let at = Timestamp::from_unix_secs(1_000 + tick - rng.below(2)); // sometimes back
        let mut found = Vec::new();
        host.observe(
            &HostSample {
                at,
                psi_cpu_some_avg10: rng.psi(),
                psi_memory_some_avg10: rng.psi(),
                psi_io_some_avg10: rng.psi(),
            },
            &mut found,
        );
        for s in last.iter_mut() {
            s.at = at;
            s.disk_ops_total = rng.opt_counter(s.disk_ops_total);
            s.net_rx_packets_total = rng.opt_counter(s.net_rx_packets_total);
            s.net_tx_packets_total = rng.opt_counter(s.net_tx_packets_total);
            s.throttled_total = rng.opt_counter(s.throttled_total);
            vms.observe(s, &mut found);
        }
        if rng.below(50) == 0 {
            let vm = format!("vm{}", rng.below(4));
            found.push(Event::vm_crashed(&vm, at, &rng.string()));
        }
        if rng.below(40) == 0 {
            let peer = rng.string();
            let detail = rng.string();
            found.push(Event::api_rejected(
                Rule::ApiUnauthorized,
                at,
                None,
                ApiTransport::Network,
                &peer,
                &detail,
            ));
        }
        for e in found {
            for e in engine.handle(e, &mut sink) {
                let line = syslog.format(&e);
                assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
                let line = cef.format(&e);
                assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
                let json = falco_json_line(&e, "h");
                assert_eq!(json.matches('\n').count(), 1);
                let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                assert_eq!(v["rule"], e.rule.as_str());
                let back: Event =
                    serde_json::from_value(serde_json::to_value(&e).unwrap()).unwrap();
                assert_eq!(back, e);
                let field = |k: &str| e.fields.get(k).and_then(|v| v.as_str()).map(str::to_owned);
                let which = field("psi.resource")
                    .or(field("flood.kind"))
                    .unwrap_or_default();
                if let Some(state) = field("psi.state")
                    .or(field("flood.state"))
                    .or(field("ratelimit.state"))
                {
                    let prev = states.insert((e.rule, e.vm_id.clone(), which), state.clone());
                    assert_ne!(prev, Some(state), "{e:?}");
                }
                hub.publish(e);
                published += 1;
            }
        }
        engine.expire(at);
    }
    assert!(published > 0);
    assert!(states.len() > 10, "{states:?}");
    let mut received = 0;
    let mut last_id = 0;
    while let Ok(Some(p)) = sub.try_next() {
        assert!(p.id > last_id);
        last_id = p.id;
        received += 1;
    }
    assert_eq!(received, published);
}

#[test]
fn escapers_on_random_strings() {
    let mut rng = Rng(42);
    for _ in 0..5000 {
        let s = rng.string();
        let m = syslog_escape_msg(&s);
        assert!(!m.chars().any(char::is_control));
        let c = cef_escape_extension(&s);
        assert!(!c.chars().any(char::is_control));
        // Every '=' in a CEF value is escaped.
        let bytes = c.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'=' {
                let backslashes = bytes[..i].iter().rev().take_while(|x| **x == b'\\').count();
                assert_eq!(backslashes % 2, 1, "{c:?}");
            }
        }
        assert!(Timestamp::parse_rfc3339(&s).is_none() || s.len() >= 20);
        let _ = output::parse_last_event_id(&s);
        let _ = parse_psi_some_avg10(&s);
    }
}
