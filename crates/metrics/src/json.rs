//! Firecracker-style JSON lines: one JSON object per flush, on one line, with a
//! `utc_timestamp_ms` and one object per group of counters.
//!
//! Groups (present when the VM has what they count):
//!
//! | group | what |
//! |---|---|
//! | `vm` | `uptime_ms`, `guest_memory_bytes`, `rss_bytes`, `balloon_actual_bytes`, `balloon_target_bytes`, `dirty_bytes_per_s` |
//! | `vcpu` | all vCPUs together: `exits_<reason>` (reasons: `io`, `mmio`, `hlt`, `shutdown`, `internal_error`, `fail_entry`, `system_event`, `msr`, `debug`, `intr`, `other`), `exits_total`, `guest_ns`, `unclaimed_pio`, `unclaimed_mmio`, `cpu_ns`, `wait_ns`, `exit_handling_count`, `exit_handling_sum_ns`, `exit_handling_p50_ns`, `exit_handling_p99_ns`, `exit_handling_max_ns` |
//! | `vcpu<N>` | the same for vCPU N |
//! | `block`, `net`, `vsock`, `entropy`, `balloon` | all devices of the kind together: `<dir>_bytes`, `<dir>_count` for the kind's two directions (`read`/`write`, `rx`/`tx`, `deflate`/`inflate`; entropy has `read` only), `other_count`, `errors`, `throttled`, `interrupts` (used-buffer interrupts raised), `notifications` (queue notifications the device loop took; virtio-blk and virtio-net), `merged` (requests moved by one system call with the one before them; virtio-blk), `hole_reads` (reads answered with zeroes from a hole of a sparse image, not read; virtio-blk); the balloon adds `actual_pages`, `target_pages` |
//! | `block_<name>`, `net_<name>` | the same for one disk or interface (`block_blk0`) |
//! | `introspect` | once monitoring or tracing ran: `checks`, `check_sum_ns`, `pages_hashed`, `findings`, `msr_writes_allowed`, `msr_writes_refused`, `syscalls_seen`, `syscalls_traced`, `syscalls_unreturned` |
//! | `host` | when given: `load1`, `load5`, `load15`, `mem_total_bytes`, `mem_available_bytes`, `cpus`, and `pressure_<cpu\|memory\|io>_<some\|full>_avg10` (percent) / `_total_us` where PSI exists |
//!
//! Unlike Firecracker, whose counters are deltas since the previous flush, every
//! counter here is a total since the VM started: a consumer subtracts two lines for
//! a rate, and a lost line loses nothing. Latency quantiles are the upper bound of
//! the histogram bucket they fall in (powers of two, in ns); `u64::MAX` means
//! beyond the last bucket (~8.6 s). Absent values (`cpu_ns` once unreadable,
//! `rss_bytes`) are left out rather than written as null.

use std::fmt::Write;

use crate::device::{DeviceKind, DeviceSnapshot};
use crate::host::HostSnapshot;
use crate::vcpu::VcpuSnapshot;
use crate::vm::VmMetricsSnapshot;

/// One JSON line (ending in `\n`) for `vm`, with the host's readings if given.
pub fn json_line(vm: &VmMetricsSnapshot, host: Option<&HostSnapshot>) -> String {
    let mut o = Obj::new();
    o.u64("utc_timestamp_ms", vm.utc_timestamp_ms);
    {
        let mut g = o.obj("vm");
        g.u64("uptime_ms", vm.uptime_ns / 1_000_000);
        g.u64("guest_memory_bytes", vm.memory.guest_bytes);
        g.opt("rss_bytes", vm.memory.rss_bytes);
        g.opt("balloon_actual_bytes", vm.memory.balloon_actual_bytes);
        g.opt("balloon_target_bytes", vm.memory.balloon_target_bytes);
        g.opt("dirty_bytes_per_s", vm.memory.dirty_bytes_per_s);
        o.end(g);
    }
    if !vm.vcpus.is_empty() {
        let total = VcpuSnapshot::sum(&vm.vcpus);
        let g = vcpu_group(o.obj("vcpu"), &total);
        o.end(g);
        for v in &vm.vcpus {
            let g = vcpu_group(o.obj(&format!("vcpu{}", v.id)), v);
            o.end(g);
        }
    }
    for kind in [
        DeviceKind::Block,
        DeviceKind::Net,
        DeviceKind::Vsock,
        DeviceKind::Entropy,
        DeviceKind::Balloon,
    ] {
        let of_kind: Vec<&DeviceSnapshot> = vm.devices.iter().filter(|d| d.kind == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        let total = sum_devices(kind, &of_kind);
        let g = device_group(o.obj(kind.group()), &total);
        o.end(g);
        if matches!(kind, DeviceKind::Block | DeviceKind::Net) {
            for d in of_kind {
                let g = device_group(o.obj(&format!("{}_{}", kind.group(), d.name)), d);
                o.end(g);
            }
        }
    }
    let i = &vm.introspection;
    if i.monitoring || i.tracing || i.checks > 0 || i.syscalls_seen > 0 {
        let mut g = o.obj("introspect");
        g.u64("checks", i.checks);
        g.u64("check_sum_ns", i.check_time.sum_ns);
        g.u64("pages_hashed", i.pages_hashed);
        g.u64("findings", i.findings_total());
        g.u64("msr_writes_allowed", i.msr_writes_allowed);
        g.u64("msr_writes_refused", i.msr_writes_refused);
        g.u64("syscalls_seen", i.syscalls_seen);
        g.u64("syscalls_traced", i.syscalls_traced);
        g.u64("syscalls_unreturned", i.syscalls_unreturned);
        o.end(g);
    }
    if let Some(h) = host {
        let mut g = o.obj("host");
        if let Some(l) = h.load {
            g.f64("load1", l.load1);
            g.f64("load5", l.load5);
            g.f64("load15", l.load15);
        }
        if let Some(m) = h.memory {
            g.u64("mem_total_bytes", m.total_bytes);
            g.u64("mem_available_bytes", m.available_bytes);
        }
        g.opt("cpus", h.cpus.map(u64::from));
        for (resource, p) in h.pressures() {
            let Some(p) = p else { continue };
            for (kind, line) in [("some", Some(&p.some)), ("full", p.full.as_ref())] {
                if let Some(l) = line {
                    g.f64(&format!("pressure_{resource}_{kind}_avg10"), l.avg10);
                    g.u64(&format!("pressure_{resource}_{kind}_total_us"), l.total_us);
                }
            }
        }
        o.end(g);
    }
    let mut line = o.finish();
    line.push('\n');
    line
}

fn vcpu_group(mut g: Obj, v: &VcpuSnapshot) -> Obj {
    for (reason, n) in v.exits.iter() {
        g.u64(&format!("exits_{}", reason.name()), n);
    }
    g.u64("exits_total", v.exits.total());
    g.u64("guest_ns", v.guest_ns);
    g.u64("unclaimed_pio", v.unclaimed_pio);
    g.u64("unclaimed_mmio", v.unclaimed_mmio);
    g.opt("cpu_ns", v.cpu_ns);
    g.opt("wait_ns", v.wait_ns);
    let h = &v.exit_handling;
    g.u64("exit_handling_count", h.count);
    g.u64("exit_handling_sum_ns", h.sum_ns);
    g.opt("exit_handling_p50_ns", h.quantile_bound_ns(0.5));
    g.opt("exit_handling_p99_ns", h.quantile_bound_ns(0.99));
    g.opt("exit_handling_max_ns", h.quantile_bound_ns(1.0));
    g
}

fn sum_devices(kind: DeviceKind, all: &[&DeviceSnapshot]) -> DeviceSnapshot {
    let mut t = DeviceSnapshot {
        kind,
        ..Default::default()
    };
    for d in all {
        t.bytes_in += d.bytes_in;
        t.bytes_out += d.bytes_out;
        t.ops_in += d.ops_in;
        t.ops_out += d.ops_out;
        t.ops_other += d.ops_other;
        t.errors += d.errors;
        t.throttled += d.throttled;
        t.interrupts += d.interrupts;
        t.notifications += d.notifications;
        t.merged += d.merged;
        t.hole_reads += d.hole_reads;
        t.balloon = t.balloon.or(d.balloon);
    }
    t
}

fn device_group(mut g: Obj, d: &DeviceSnapshot) -> Obj {
    let (to, from) = d.kind.directions();
    g.u64(&format!("{to}_bytes"), d.bytes_in);
    g.u64(&format!("{to}_count"), d.ops_in);
    if d.kind != DeviceKind::Entropy {
        g.u64(&format!("{from}_bytes"), d.bytes_out);
        g.u64(&format!("{from}_count"), d.ops_out);
    }
    g.u64("other_count", d.ops_other);
    g.u64("errors", d.errors);
    g.u64("throttled", d.throttled);
    g.u64("interrupts", d.interrupts);
    g.u64("notifications", d.notifications);
    g.u64("merged", d.merged);
    g.u64("hole_reads", d.hole_reads);
    if let Some(b) = d.balloon {
        g.u64("actual_pages", b.actual_pages);
        g.u64("target_pages", b.target_pages);
    }
    g
}

/// A JSON object being written.
struct Obj {
    buf: String,
    first: bool,
}

impl Obj {
    fn new() -> Self {
        Self {
            buf: String::from("{"),
            first: true,
        }
    }

    fn key(&mut self, k: &str) {
        if !self.first {
            self.buf.push(',');
        }
        self.first = false;
        escape_str(&mut self.buf, k);
        self.buf.push(':');
    }

    fn u64(&mut self, k: &str, v: u64) {
        self.key(k);
        let _ = write!(self.buf, "{v}");
    }

    fn f64(&mut self, k: &str, v: f64) {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.buf, "{v}");
        } else {
            self.buf.push_str("null");
        }
    }

    fn opt(&mut self, k: &str, v: Option<u64>) {
        if let Some(v) = v {
            self.u64(k, v);
        }
    }

    /// Starts a nested object under `k`; give it back with [`Self::end`].
    fn obj(&mut self, k: &str) -> Obj {
        self.key(k);
        Obj::new()
    }

    fn end(&mut self, child: Obj) {
        self.buf.push_str(&child.finish());
    }

    fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

fn escape_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prometheus::tests::sample_vm;

    #[test]
    fn one_line_of_valid_json_with_every_group() {
        let vm = sample_vm();
        let line = json_line(&vm, Some(&HostSnapshot::read()));
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["utc_timestamp_ms"], vm.utc_timestamp_ms);
        assert_eq!(v["vm"]["guest_memory_bytes"], 128u64 << 20);
        assert!(v["vm"]["rss_bytes"].as_u64().unwrap() > 0);
        assert_eq!(v["vm"]["balloon_target_bytes"], 256 * 4096);
        assert_eq!(v["vcpu0"]["exits_io"], 5);
        assert_eq!(v["vcpu0"]["exits_mmio"], 1);
        assert_eq!(v["vcpu1"]["exits_hlt"], 1);
        assert_eq!(v["vcpu"]["exits_total"], 7);
        assert_eq!(v["vcpu"]["exit_handling_count"], 6);
        assert_eq!(v["vcpu0"]["exit_handling_p50_ns"], 2048);
        assert_eq!(v["vcpu0"]["exit_handling_max_ns"], u64::MAX);
        assert!(v["vcpu1"].get("exit_handling_p50_ns").is_none());
        assert_eq!(v["vcpu0"]["guest_ns"], 1_500_000_000u64);
        assert_eq!(v["block"]["read_bytes"], 4608);
        assert_eq!(v["block_blk0"]["write_bytes"], 4096);
        assert_eq!(v["block_blk0"]["read_count"], 1);
        assert_eq!(v["block_blk0"]["errors"], 1);
        assert_eq!(v["entropy"]["read_bytes"], 128);
        assert_eq!(v["entropy"]["throttled"], 1);
        assert!(v["entropy"].get("write_bytes").is_none());
        assert_eq!(v["balloon"]["target_pages"], 256);
        assert_eq!(v["balloon"]["inflate_bytes"], 0);
        assert!(v.get("net").is_none());
        assert!(v["host"]["load1"].is_number());
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        escape_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let mut vm = sample_vm();
        vm.devices[0].name = "we\"ird\n".into();
        let line = json_line(&vm, None);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["block_we\"ird\n"]["read_bytes"], 4608);
    }
}
