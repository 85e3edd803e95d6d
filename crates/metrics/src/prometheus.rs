//! The Prometheus text exposition format (version 0.0.4) of many VMs' snapshots,
//! each labelled `vm="<id>"`, and of the host.
//!
//! Names follow Prometheus conventions: a `vigil_` prefix, base units (seconds,
//! bytes), `_total` on counters, one `# HELP` and one `# TYPE` line per family,
//! all of a family's samples together. Label values are escaped (`\\`, `\"`, `\n`).

use std::fmt::Write;

use crate::host::HostSnapshot;
use crate::primitives::HistogramSnapshot;
use crate::vm::VmMetricsSnapshot;

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders `vms` (VM id, snapshot) and, when given, the host.
pub fn render(vms: &[(&str, &VmMetricsSnapshot)], host: Option<&HostSnapshot>) -> String {
    let mut out = String::new();
    render_vms(&mut out, vms);
    if let Some(host) = host {
        render_host(&mut out, host);
    }
    out
}

/// One metric family: its samples are collected, then written after its HELP and
/// TYPE lines (nothing at all when it has no samples).
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    body: String,
}

impl<'a> Family<'a> {
    fn new(
        out: &'a mut String,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
    ) -> Self {
        Self {
            out,
            name,
            help,
            kind,
            body: String::new(),
        }
    }

    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: Value) {
        self.body.push_str(self.name);
        self.body.push_str(suffix);
        if !labels.is_empty() {
            self.body.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.body.push(',');
                }
                self.body.push_str(k);
                self.body.push_str("=\"");
                escape_label(&mut self.body, v);
                self.body.push('"');
            }
            self.body.push('}');
        }
        self.body.push(' ');
        value.write(&mut self.body);
        self.body.push('\n');
    }

    fn histogram(&mut self, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        for (bound, cumulative) in h.cumulative() {
            let le = match bound {
                Some(ns) => fmt_f64(ns as f64 / 1e9),
                None => "+Inf".to_string(),
            };
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample("_bucket", &with_le, Value::Int(cumulative));
        }
        self.sample("_sum", labels, Value::Float(h.sum_ns as f64 / 1e9));
        self.sample("_count", labels, Value::Int(h.count));
    }
}

impl Drop for Family<'_> {
    fn drop(&mut self) {
        if self.body.is_empty() {
            return;
        }
        let _ = writeln!(self.out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(self.out, "# TYPE {} {}", self.name, self.kind);
        self.out.push_str(&self.body);
    }
}

#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl Value {
    fn write(self, out: &mut String) {
        match self {
            Value::Int(v) => {
                let _ = write!(out, "{v}");
            }
            Value::Float(v) => out.push_str(&fmt_f64(v)),
        }
    }
}

fn secs(ns: u64) -> Value {
    Value::Float(ns as f64 / 1e9)
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Name, help and the value of one series of a one-value-per-series family.
type SimpleFamily<T, V> = (&'static str, &'static str, fn(&T) -> V);

fn render_vms(out: &mut String, vms: &[(&str, &VmMetricsSnapshot)]) {
    {
        let mut f = Family::new(
            out,
            "vigil_vm_uptime_seconds",
            "gauge",
            "Time since the VM started.",
        );
        for (vm, s) in vms {
            f.sample("", &[("vm", vm)], secs(s.uptime_ns));
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_vm_memory_guest_bytes",
            "gauge",
            "Guest RAM as configured.",
        );
        for (vm, s) in vms {
            f.sample("", &[("vm", vm)], Value::Int(s.memory.guest_bytes));
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_vm_memory_rss_bytes",
            "gauge",
            "Resident memory of the VMM process (guest pages it touched included).",
        );
        for (vm, s) in vms {
            if let Some(rss) = s.memory.rss_bytes {
                f.sample("", &[("vm", vm)], Value::Int(rss));
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_vm_balloon_actual_bytes",
            "gauge",
            "Memory the guest holds in its balloon.",
        );
        for (vm, s) in vms {
            if let Some(b) = s.memory.balloon_actual_bytes {
                f.sample("", &[("vm", vm)], Value::Int(b));
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_vm_balloon_target_bytes",
            "gauge",
            "Memory the balloon asks the guest for.",
        );
        for (vm, s) in vms {
            if let Some(b) = s.memory.balloon_target_bytes {
                f.sample("", &[("vm", vm)], Value::Int(b));
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_vm_dirty_bytes_per_second",
            "gauge",
            "Guest memory written per second, between the last two readings.",
        );
        for (vm, s) in vms {
            if let Some(b) = s.memory.dirty_bytes_per_s {
                f.sample("", &[("vm", vm)], Value::Int(b));
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_vcpu_exits_total",
            "counter",
            "Returns from KVM_RUN to the VMM, by reason.",
        );
        for (vm, s) in vms {
            for v in &s.vcpus {
                let id = v.id.to_string();
                for (reason, n) in v.exits.iter() {
                    f.sample(
                        "",
                        &[("vm", vm), ("vcpu", &id), ("reason", reason.name())],
                        Value::Int(n),
                    );
                }
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_vcpu_exit_handling_seconds",
            "histogram",
            "Time from KVM_RUN returning to the next KVM_RUN: the VMM's handling of an exit.",
        );
        for (vm, s) in vms {
            for v in &s.vcpus {
                let id = v.id.to_string();
                f.histogram(&[("vm", vm), ("vcpu", &id)], &v.exit_handling);
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_vcpu_unclaimed_accesses_total",
            "counter",
            "Guest port I/O (space=pio) and MMIO (space=mmio) accesses no device claims: reads get all ones, writes are dropped.",
        );
        for (vm, s) in vms {
            for v in &s.vcpus {
                let id = v.id.to_string();
                for (space, n) in [("pio", v.unclaimed_pio), ("mmio", v.unclaimed_mmio)] {
                    f.sample(
                        "",
                        &[("vm", vm), ("vcpu", &id), ("space", space)],
                        Value::Int(n),
                    );
                }
            }
        }
    }
    let per_vcpu: [SimpleFamily<crate::VcpuSnapshot, Option<u64>>; 3] = [
        (
            "vigil_vcpu_guest_seconds_total",
            "Time inside KVM_RUN (guest code, in-kernel exits and halts).",
            |v| Some(v.guest_ns),
        ),
        (
            "vigil_vcpu_cpu_seconds_total",
            "Time the vCPU thread ran on a host CPU (schedstat).",
            |v| v.cpu_ns,
        ),
        (
            "vigil_vcpu_wait_seconds_total",
            "Time the vCPU thread was runnable but waited for a host CPU (schedstat): steal as the guest sees it.",
            |v| v.wait_ns,
        ),
    ];
    for (name, help, get) in per_vcpu {
        let mut f = Family::new(out, name, "counter", help);
        for (vm, s) in vms {
            for v in &s.vcpus {
                if let Some(ns) = get(v) {
                    let id = v.id.to_string();
                    f.sample("", &[("vm", vm), ("vcpu", &id)], secs(ns));
                }
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_device_bytes_total",
            "counter",
            "Payload bytes a device moved, by direction (read/rx/deflate: to the guest; write/tx/inflate: from it).",
        );
        for (vm, s) in vms {
            for d in &s.devices {
                let (to, from) = d.kind.directions();
                let kind = d.kind.group();
                for (dir, n) in [(to, d.bytes_in), (from, d.bytes_out)] {
                    if d.kind == crate::DeviceKind::Entropy && dir == "write" {
                        continue;
                    }
                    let labels = [
                        ("vm", *vm),
                        ("device", &d.name),
                        ("kind", kind),
                        ("direction", dir),
                    ];
                    f.sample("", &labels, Value::Int(n));
                }
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_device_ops_total",
            "counter",
            "Requests, frames or packets a device completed, by operation.",
        );
        for (vm, s) in vms {
            for d in &s.devices {
                let (to, from) = d.kind.directions();
                let kind = d.kind.group();
                for (op, n) in [(to, d.ops_in), (from, d.ops_out), ("other", d.ops_other)] {
                    let labels = [("vm", *vm), ("device", &d.name), ("kind", kind), ("op", op)];
                    f.sample("", &labels, Value::Int(n));
                }
            }
        }
    }
    let per_device: [SimpleFamily<crate::DeviceSnapshot, u64>; 6] = [
        (
            "vigil_device_errors_total",
            "Failed requests and dropped frames or packets.",
            |d| d.errors,
        ),
        (
            "vigil_device_throttled_total",
            "Times a request waited for the device's rate limiter.",
            |d| d.throttled,
        ),
        (
            "vigil_device_interrupts_total",
            "Used-buffer interrupts the device raised.",
            |d| d.interrupts,
        ),
        (
            "vigil_device_notifications_total",
            "Queue notifications the device event loop took.",
            |d| d.notifications,
        ),
        (
            "vigil_device_merged_total",
            "Requests moved by one system call or io_uring entry with the one before them.",
            |d| d.merged,
        ),
        (
            "vigil_device_hole_reads_total",
            "Reads answered with zeroes from a hole of a sparse image, without reading it.",
            |d| d.hole_reads,
        ),
    ];
    for (name, help, get) in per_device {
        let mut f = Family::new(out, name, "counter", help);
        for (vm, s) in vms {
            for d in &s.devices {
                let labels = [("vm", *vm), ("device", &d.name), ("kind", d.kind.group())];
                f.sample("", &labels, Value::Int(get(d)));
            }
        }
    }
    render_introspection(out, vms);
    render_rt(out, vms);
    render_pager(out, vms);
}

fn render_pager(out: &mut String, vms: &[(&str, &VmMetricsSnapshot)]) {
    let vms: Vec<_> = vms
        .iter()
        .filter(|(_, s)| s.memory_compression.enabled)
        .collect();
    let gauges: [SimpleFamily<crate::PagerSnapshot, u64>; 4] = [
        (
            "vigil_memory_compression_footprint_bytes",
            "Guest memory in RAM and the pool: what an RSS target bounds.",
            |p| p.footprint_bytes,
        ),
        (
            "vigil_memory_compression_pool_bytes",
            "Bytes of compressed guest pages the VMM holds.",
            |p| p.pool_bytes,
        ),
        (
            "vigil_memory_compression_saved_bytes",
            "Guest bytes held out of RAM less the pool they take.",
            |p| p.bytes_saved,
        ),
        (
            "vigil_memory_compression_pages_held",
            "Guest pages held out of RAM (compressed, zero or duplicate).",
            |p| p.pages_held,
        ),
    ];
    for (name, help, get) in gauges {
        let mut f = Family::new(out, name, "gauge", help);
        for (vm, s) in &vms {
            f.sample("", &[("vm", vm)], Value::Int(get(&s.memory_compression)));
        }
    }
    let counters: [SimpleFamily<crate::PagerSnapshot, u64>; 4] = [
        (
            "vigil_memory_compression_pages_total",
            "Cold guest pages taken out of RAM.",
            |p| p.pages_compressed,
        ),
        (
            "vigil_memory_compression_zero_pages_total",
            "Cold guest pages of zeros, held as a marker.",
            |p| p.pages_zero,
        ),
        (
            "vigil_memory_compression_deduplicated_pages_total",
            "Cold guest pages identical to one already held, stored once.",
            |p| p.pages_deduplicated,
        ),
        (
            "vigil_memory_compression_restored_pages_total",
            "Held guest pages put back on first access.",
            |p| p.pages_restored,
        ),
    ];
    for (name, help, get) in counters {
        let mut f = Family::new(out, name, "counter", help);
        for (vm, s) in &vms {
            f.sample("", &[("vm", vm)], Value::Int(get(&s.memory_compression)));
        }
    }
    let mut f = Family::new(
        out,
        "vigil_memory_compression_fault_in_seconds",
        "histogram",
        "From a fault on a held guest page to the page being back.",
    );
    for (vm, s) in &vms {
        if s.memory_compression.fault_in.count > 0 {
            f.histogram(&[("vm", vm)], &s.memory_compression.fault_in);
        }
    }
}

fn render_rt(out: &mut String, vms: &[(&str, &VmMetricsSnapshot)]) {
    let per_vm: [SimpleFamily<crate::RtSnapshot, u64>; 4] = [
        (
            "vigil_rt_timer_expiries_total",
            "RT timer expiries injected into the guest.",
            |r| r.expiries,
        ),
        (
            "vigil_rt_timer_skipped_total",
            "RT timer expiries skipped: reached after the next one was due.",
            |r| r.skipped,
        ),
        (
            "vigil_rt_timer_boosts_total",
            "RT timer expiries that raised a vCPU thread to SCHED_FIFO.",
            |r| r.boosts,
        ),
        (
            "vigil_rt_timer_overruns_total",
            "RT timer boosts the guest did not end within its budget (withdrawn; a security event).",
            |r| r.overruns,
        ),
    ];
    for (name, help, get) in per_vm {
        let mut f = Family::new(out, name, "counter", help);
        for (vm, s) in vms {
            f.sample("", &[("vm", vm)], Value::Int(get(&s.rt)));
        }
    }
    let mut f = Family::new(
        out,
        "vigil_rt_timer_injection_late_seconds",
        "histogram",
        "From an RT timer expiry's deadline to the injection of its interrupt.",
    );
    for (vm, s) in vms {
        if s.rt.injection_late.count > 0 {
            f.histogram(&[("vm", vm)], &s.rt.injection_late);
        }
    }
}

fn render_introspection(out: &mut String, vms: &[(&str, &VmMetricsSnapshot)]) {
    let per_vm: [SimpleFamily<crate::IntrospectSnapshot, u64>; 5] = [
        (
            "vigil_introspect_checks_total",
            "Integrity checks of the guest kernel against its baseline.",
            |i| i.checks,
        ),
        (
            "vigil_introspect_pages_hashed_total",
            "Guest pages integrity checks re-hashed (those the dirty log said were written).",
            |i| i.pages_hashed,
        ),
        (
            "vigil_introspect_syscalls_seen_total",
            "Guest system calls the tracer's breakpoint caught, before its filter.",
            |i| i.syscalls_seen,
        ),
        (
            "vigil_introspect_syscalls_traced_total",
            "Guest system calls the tracer recorded (those its filter kept).",
            |i| i.syscalls_traced,
        ),
        (
            "vigil_introspect_syscalls_unreturned_total",
            "Recorded guest system calls whose return the tracer did not see.",
            |i| i.syscalls_unreturned,
        ),
    ];
    for (name, help, get) in per_vm {
        let mut f = Family::new(out, name, "counter", help);
        for (vm, s) in vms {
            f.sample("", &[("vm", vm)], Value::Int(get(&s.introspection)));
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_introspect_active",
            "gauge",
            "1 while the integrity monitor (what=\"monitor\") or the system call tracer (what=\"trace\") runs.",
        );
        for (vm, s) in vms {
            let i = &s.introspection;
            for (what, on) in [("monitor", i.monitoring), ("trace", i.tracing)] {
                f.sample("", &[("vm", vm), ("what", what)], Value::Int(u64::from(on)));
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_introspect_check_seconds",
            "histogram",
            "Time one integrity check took.",
        );
        for (vm, s) in vms {
            if s.introspection.check_time.count > 0 {
                f.histogram(&[("vm", vm)], &s.introspection.check_time);
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_introspect_findings_total",
            "counter",
            "Differences from the integrity baseline, by rule (each reported once).",
        );
        for (vm, s) in vms {
            for (rule, n) in &s.introspection.findings {
                f.sample("", &[("vm", vm), ("rule", rule)], Value::Int(*n));
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_introspect_msr_writes_total",
            "counter",
            "Guest writes to guarded MSRs (the syscall MSRs), by verdict.",
        );
        for (vm, s) in vms {
            let i = &s.introspection;
            for (verdict, n) in [
                ("allowed", i.msr_writes_allowed),
                ("refused", i.msr_writes_refused),
            ] {
                f.sample("", &[("vm", vm), ("verdict", verdict)], Value::Int(n));
            }
        }
    }
}

fn render_host(out: &mut String, h: &HostSnapshot) {
    {
        let mut f = Family::new(
            out,
            "vigil_host_pressure_ratio",
            "gauge",
            "Share of time some (or all non-idle) tasks stalled on a resource, averaged over a window (PSI).",
        );
        for (resource, p) in h.pressures() {
            let Some(p) = p else { continue };
            for (kind, line) in [("some", Some(&p.some)), ("full", p.full.as_ref())] {
                let Some(l) = line else { continue };
                for (window, avg) in [("10s", l.avg10), ("60s", l.avg60), ("300s", l.avg300)] {
                    let labels = [("resource", resource), ("kind", kind), ("window", window)];
                    f.sample("", &labels, Value::Float(avg / 100.0));
                }
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_host_pressure_stalled_seconds_total",
            "counter",
            "Time some (or all non-idle) tasks stalled on a resource (PSI total).",
        );
        for (resource, p) in h.pressures() {
            let Some(p) = p else { continue };
            for (kind, line) in [("some", Some(&p.some)), ("full", p.full.as_ref())] {
                if let Some(l) = line {
                    let labels = [("resource", resource), ("kind", kind)];
                    f.sample("", &labels, Value::Float(l.total_us as f64 / 1e6));
                }
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_host_load_average",
            "gauge",
            "Host load average (runnable and uninterruptible tasks).",
        );
        if let Some(l) = h.load {
            for (window, v) in [("1m", l.load1), ("5m", l.load5), ("15m", l.load15)] {
                f.sample("", &[("window", window)], Value::Float(v));
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_host_memory_total_bytes",
            "gauge",
            "Host RAM (MemTotal).",
        );
        if let Some(m) = h.memory {
            f.sample("", &[], Value::Int(m.total_bytes));
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_host_memory_available_bytes",
            "gauge",
            "Host memory available without swapping (MemAvailable).",
        );
        if let Some(m) = h.memory {
            f.sample("", &[], Value::Int(m.available_bytes));
        }
    }
    {
        let mut f = Family::new(
            out,
            "vigil_host_cpu_seconds_total",
            "counter",
            "Host CPU time of all CPUs together, by mode (/proc/stat).",
        );
        if let Some(c) = h.cpu {
            for (mode, v) in c.iter() {
                f.sample("", &[("mode", mode)], Value::Float(v));
            }
        }
    }
    {
        let mut f = Family::new(out, "vigil_host_cpus", "gauge", "Host CPUs online.");
        if let Some(n) = h.cpus {
            f.sample("", &[], Value::Int(u64::from(n)));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::{DeviceCounters, DeviceKind};
    use crate::host::{parse_pressure, LoadAvg, MemInfo};
    use crate::vcpu::{ExitReason, VcpuCounters};
    use crate::vm::VmMetrics;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    /// A small checker of the text format: HELP and TYPE once per family, before
    /// its samples, samples of a family together; counters end in `_total`;
    /// histogram buckets are cumulative and `+Inf` equals `_count`; label values
    /// are properly quoted and escaped; values parse. Returns the samples as
    /// `(name, labels, value)`.
    pub(crate) fn check(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helped: BTreeSet<String> = BTreeSet::new();
        let mut finished: BTreeSet<String> = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(helped.insert(name.clone()), "HELP twice for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(helped.contains(name), "TYPE before HELP for {name}");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "type {kind}"
                );
                assert!(
                    types.insert(name.into(), kind.into()).is_none(),
                    "TYPE twice for {name}"
                );
                if let Some(prev) = current.replace(name.to_string()) {
                    finished.insert(prev);
                }
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "line {line:?}");
            let (name, labels, value) = parse_sample(line);
            let family = if types.contains_key(&name) {
                name.clone()
            } else {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
                    .unwrap_or_else(|| panic!("sample {name} has no HELP/TYPE"))
                    .to_string()
            };
            assert_eq!(
                current.as_deref(),
                Some(family.as_str()),
                "{name} out of its family"
            );
            assert!(!finished.contains(&family));
            assert!(name.starts_with("vigil_"), "{name}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            match types[&family].as_str() {
                "counter" => assert!(family.ends_with("_total"), "counter {family}"),
                _ => assert!(!family.ends_with("_total"), "non-counter {family}"),
            }
            samples.push((name, labels, value));
        }
        // Histograms: cumulative buckets, +Inf == _count.
        for (family, _) in types.iter().filter(|(_, k)| *k == "histogram") {
            let bucket = format!("{family}_bucket");
            let count = format!("{family}_count");
            let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for (n, l, v) in &samples {
                if *n == bucket {
                    let mut key = l.clone();
                    let le = key.remove("le").expect("bucket without le");
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    };
                    series.entry(key).or_default().push((le, *v));
                }
            }
            assert!(!series.is_empty(), "{family} without buckets");
            for (key, buckets) in series {
                assert!(buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
                let (last_le, last) = *buckets.last().unwrap();
                assert_eq!(
                    last_le,
                    f64::INFINITY,
                    "{family} {key:?} has no +Inf bucket"
                );
                let c = samples
                    .iter()
                    .find(|(n, l, _)| *n == count && *l == key)
                    .expect("_count");
                assert_eq!(c.2, last, "{family} {key:?}: +Inf bucket != _count");
            }
        }
        samples
    }

    fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
        let name_end = line.find(['{', ' ']).expect("sample name");
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            loop {
                let start = chars.peek().unwrap().0;
                let eq = r[start..].find('=').unwrap() + start;
                let key = r[start..eq].to_string();
                assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                while chars.peek().unwrap().0 <= eq {
                    chars.next();
                }
                assert_eq!(chars.next().unwrap().1, '"');
                let mut value = String::new();
                loop {
                    match chars.next().unwrap().1 {
                        '\\' => match chars.next().unwrap().1 {
                            'n' => value.push('\n'),
                            c @ ('\\' | '"') => value.push(c),
                            c => panic!("bad escape \\{c}"),
                        },
                        '"' => break,
                        '\n' => panic!("raw newline"),
                        c => value.push(c),
                    }
                }
                assert!(labels.insert(key, value).is_none(), "label twice");
                match chars.next().unwrap() {
                    (_, ',') => continue,
                    (i, '}') => {
                        rest = &r[i + 1..];
                        break;
                    }
                    (_, c) => panic!("unexpected {c}"),
                }
            }
        }
        let value = rest.strip_prefix(' ').expect("space before value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value {v:?}")),
        };
        (name, labels, value)
    }

    pub(crate) fn sample_vm() -> VmMetricsSnapshot {
        let v0 = Arc::new(VcpuCounters::new(0));
        let v1 = Arc::new(VcpuCounters::new(1));
        for _ in 0..5 {
            v0.count_exit(ExitReason::Io);
            v0.exit_handling.record_ns(2_000);
        }
        v0.count_exit(ExitReason::Mmio);
        v0.exit_handling.record_ns(20_000_000_000);
        v0.guest_ns.add(1_500_000_000);
        v1.count_exit(ExitReason::Hlt);
        let blk = Arc::new(DeviceCounters::new(DeviceKind::Block, "blk0"));
        blk.transfer_in(4608);
        blk.transfer_out(4096);
        blk.errors.inc();
        let rng = Arc::new(DeviceCounters::new(DeviceKind::Entropy, "rng0"));
        rng.transfer_in(128);
        rng.throttled.inc();
        let balloon = Arc::new(DeviceCounters::new(DeviceKind::Balloon, "balloon0"));
        balloon.balloon_target_pages.set(256);
        let m = VmMetrics::new(128 << 20, vec![v0, v1], vec![blk, rng, balloon]);
        m.mark_started();
        let i = m.introspect();
        i.monitoring.set(1);
        i.checks.add(3);
        i.check_time.record_ns(40_000);
        i.count_finding("idt_entry_modified");
        i.msr_writes_refused.inc();
        m.snapshot()
    }

    fn find<'a>(
        samples: &'a [(String, BTreeMap<String, String>, f64)],
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<&'a f64> {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, _, v)| v)
    }

    #[test]
    fn renders_several_vms_and_the_host() {
        let a = sample_vm();
        let b = sample_vm();
        let host = HostSnapshot {
            cpu_pressure: parse_pressure("some avg10=12.5 avg60=1 avg300=0 total=2500000\n"),
            memory_pressure: None,
            io_pressure: parse_pressure(
                "some avg10=0 avg60=0 avg300=0 total=1\nfull avg10=0 avg60=0 avg300=0 total=1\n",
            ),
            load: Some(LoadAvg {
                load1: 0.5,
                load5: 1.0,
                load15: 2.0,
            }),
            memory: Some(MemInfo {
                total_bytes: 1 << 30,
                available_bytes: 1 << 29,
            }),
            cpu: None,
            cpus: Some(2),
        };
        let odd_id = "we\"ird\\vm\nid";
        let text = render(&[("vm-a", &a), (odd_id, &b)], Some(&host));
        let samples = check(&text);
        let s = &samples;
        assert_eq!(
            find(
                s,
                "vigil_vcpu_exits_total",
                &[("vm", "vm-a"), ("vcpu", "0"), ("reason", "io")]
            ),
            Some(&5.0)
        );
        assert_eq!(
            find(
                s,
                "vigil_vcpu_exits_total",
                &[("vm", odd_id), ("vcpu", "1"), ("reason", "hlt")]
            ),
            Some(&1.0),
            "the escaped id parses back\n{text}"
        );
        assert!(text.contains(r#"vm="we\"ird\\vm\nid""#));
        assert_eq!(
            find(s, "vigil_introspect_checks_total", &[("vm", "vm-a")]),
            Some(&3.0)
        );
        assert_eq!(
            find(
                s,
                "vigil_introspect_findings_total",
                &[("vm", "vm-a"), ("rule", "idt_entry_modified")]
            ),
            Some(&1.0)
        );
        assert_eq!(
            find(
                s,
                "vigil_introspect_msr_writes_total",
                &[("vm", "vm-a"), ("verdict", "refused")]
            ),
            Some(&1.0)
        );
        assert_eq!(
            find(
                s,
                "vigil_introspect_active",
                &[("vm", "vm-a"), ("what", "monitor")]
            ),
            Some(&1.0)
        );
        assert_eq!(
            find(s, "vigil_introspect_check_seconds_count", &[("vm", "vm-a")]),
            Some(&1.0)
        );
        assert_eq!(
            find(
                s,
                "vigil_vcpu_exit_handling_seconds_count",
                &[("vm", "vm-a"), ("vcpu", "0")]
            ),
            Some(&6.0)
        );
        assert_eq!(
            find(
                s,
                "vigil_vcpu_exit_handling_seconds_bucket",
                &[("vm", "vm-a"), ("vcpu", "0"), ("le", "0.000002048")]
            ),
            Some(&5.0),
            "{text}"
        );
        assert_eq!(
            find(
                s,
                "vigil_vcpu_exit_handling_seconds_bucket",
                &[("vcpu", "0"), ("le", "+Inf")]
            ),
            Some(&6.0)
        );
        assert_eq!(
            find(s, "vigil_vcpu_exit_handling_seconds_sum", &[("vcpu", "0")]),
            Some(&20.00001)
        );
        assert_eq!(
            find(s, "vigil_vcpu_guest_seconds_total", &[("vcpu", "0")]),
            Some(&1.5)
        );
        assert_eq!(
            find(
                s,
                "vigil_device_bytes_total",
                &[("device", "blk0"), ("direction", "read")]
            ),
            Some(&4608.0)
        );
        assert_eq!(
            find(
                s,
                "vigil_device_bytes_total",
                &[("device", "blk0"), ("direction", "write")]
            ),
            Some(&4096.0)
        );
        assert_eq!(
            find(
                s,
                "vigil_device_bytes_total",
                &[("device", "rng0"), ("direction", "write")]
            ),
            None
        );
        assert_eq!(
            find(s, "vigil_device_errors_total", &[("device", "blk0")]),
            Some(&1.0)
        );
        assert_eq!(
            find(s, "vigil_device_throttled_total", &[("device", "rng0")]),
            Some(&1.0)
        );
        assert_eq!(
            find(s, "vigil_vm_memory_guest_bytes", &[("vm", "vm-a")]),
            Some(&134217728.0)
        );
        assert!(find(s, "vigil_vm_memory_rss_bytes", &[("vm", "vm-a")]).unwrap() > &0.0);
        assert_eq!(
            find(s, "vigil_vm_balloon_target_bytes", &[("vm", "vm-a")]),
            Some(&(256.0 * 4096.0))
        );
        assert!(find(s, "vigil_vm_uptime_seconds", &[("vm", "vm-a")]).is_some());
        assert_eq!(
            find(
                s,
                "vigil_host_pressure_ratio",
                &[("resource", "cpu"), ("kind", "some"), ("window", "10s")]
            ),
            Some(&0.125)
        );
        assert_eq!(
            find(
                s,
                "vigil_host_pressure_stalled_seconds_total",
                &[("resource", "cpu")]
            ),
            Some(&2.5)
        );
        assert_eq!(
            find(s, "vigil_host_pressure_ratio", &[("resource", "memory")]),
            None,
            "absent PSI gives no samples"
        );
        assert_eq!(
            find(s, "vigil_host_load_average", &[("window", "15m")]),
            Some(&2.0)
        );
        assert_eq!(find(s, "vigil_host_cpus", &[]), Some(&2.0));
        assert!(
            !text.contains("vigil_host_cpu_seconds_total"),
            "no samples, no family"
        );
    }

    #[test]
    fn renders_the_pager_of_vms_that_have_one() {
        let mut a = sample_vm();
        let b = sample_vm();
        let p = crate::PagerCounters::default();
        p.enabled.set(1);
        p.pages_held.set(100);
        p.pool_bytes.set(4096);
        p.pages_compressed.add(120);
        p.pages_restored.add(20);
        p.fault_in.record_ns(12_000);
        a.memory_compression = p.snapshot();
        let text = render(&[("vm-a", &a), ("vm-b", &b)], None);
        let s = &check(&text);
        let vm_a = [("vm", "vm-a")];
        assert_eq!(
            find(s, "vigil_memory_compression_pool_bytes", &vm_a),
            Some(&4096.0)
        );
        assert_eq!(
            find(s, "vigil_memory_compression_saved_bytes", &vm_a),
            Some(&(100.0 * 4096.0 - 4096.0))
        );
        assert_eq!(
            find(s, "vigil_memory_compression_restored_pages_total", &vm_a),
            Some(&20.0)
        );
        assert_eq!(
            find(s, "vigil_memory_compression_fault_in_seconds_count", &vm_a),
            Some(&1.0)
        );
        // vm-b runs without the pager: no samples of it.
        assert_eq!(
            find(s, "vigil_memory_compression_pool_bytes", &[("vm", "vm-b")]),
            None
        );
    }

    #[test]
    fn renders_this_host_and_nothing() {
        check(&render(&[], Some(&HostSnapshot::read())));
        assert_eq!(render(&[], None), "");
        assert_eq!(render(&[], Some(&HostSnapshot::default())), "");
    }
}
