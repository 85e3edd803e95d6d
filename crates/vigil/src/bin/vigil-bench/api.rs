//! `vigil bench api`: request latency of the per-VM API and of the daemon's API, and
//! how fast the daemon creates (and destroys) VMs. Everything runs here: a `vigild`
//! child process (the one beside this binary) in a scratch folder, test-guest VMs
//! halted in `test=hang`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use vigil_daemon::client::BlockingClient;
use vigil_shared::siblings;

#[derive(Args, Debug)]
pub struct ApiBenchArgs {
    /// Requests per latency figure (each on a fresh connection, as `vigil ctl` and the
    /// daemon make them).
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub requests: usize,

    /// VMs per creation-rate figure.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub vms: usize,

    /// Guest memory of each VM, in MiB.
    #[arg(long, default_value_t = 32, value_name = "MiB")]
    pub memory: u64,
}

const TIMEOUT: Duration = Duration::from_secs(120);

struct Bench {
    dir: PathBuf,
    socket: PathBuf,
    daemon: Child,
    client: BlockingClient,
    memory: u64,
}

impl Bench {
    fn start(memory: u64) -> anyhow::Result<Bench> {
        let dir = std::env::temp_dir().join(format!("vigil-bench-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("guest.elf"), vigil_test_guest::ELF)?;
        let socket = dir.join("daemon.sock");
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let vigild = siblings::beside_me(siblings::DAEMON)?;
        siblings::check_executable(
            &vigild,
            "the daemon to measure (vigild, beside vigil-bench)",
        )?;
        let daemon = Command::new(&vigild)
            .args(["--log-level", "warn", "--state-dir"])
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(&socket)
            // The guest's kernel is in this folder.
            .arg("--allow-vm-path")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", vigild.display()))?;
        let bench = Bench {
            dir,
            socket,
            daemon,
            client: BlockingClient::new()?,
            memory,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while bench.call("GET", "/health", None).is_err() {
            if Instant::now() > deadline {
                bail!("the daemon did not answer: {}", bench.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(bench)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        call_on(&self.client, &self.socket, method, path, body)
    }

    fn config(&self) -> Value {
        json!({
            "boot-source": {"kernel_image_path": self.dir.join("guest.elf"), "boot_args": "test=hang"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": self.memory},
        })
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn call_on(
    client: &BlockingClient,
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let r = client.request(
        socket,
        method,
        path,
        body.map(|b| b.to_string().into_bytes()),
        TIMEOUT,
    )?;
    if !r.is_success() {
        bail!("{method} {path}: HTTP {}: {}", r.status, r.fault_message());
    }
    Ok(r.json().unwrap_or(Value::Null))
}

struct Latency {
    what: String,
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn latency(
    client: &BlockingClient,
    socket: &Path,
    path: &str,
    n: usize,
    what: String,
) -> anyhow::Result<Latency> {
    for _ in 0..n.min(50) {
        call_on(client, socket, "GET", path, None)?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        call_on(client, socket, "GET", path, None)?;
        samples.push(t.elapsed());
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / n.max(1) as u32;
    Ok(Latency {
        what,
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
        mean,
    })
}

struct Rate {
    what: String,
    vms: usize,
    total: Duration,
    per_vm_p50: Option<Duration>,
}

pub fn run(args: ApiBenchArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.vms == 0 {
        bail!("--requests and --vms must be at least 1");
    }
    let b = Bench::start(args.memory)?;
    let n = args.requests;
    let mut latencies = Vec::new();
    let mut rates = Vec::new();

    let vm = b.call(
        "POST",
        "/vms",
        Some(json!({"id": "latency", "config": b.config()})),
    )?;
    let vm_socket = PathBuf::from(vm["api_socket"].as_str().unwrap_or_default());
    latencies.push(latency(
        &b.client,
        &vm_socket,
        "/",
        n,
        "VM API: `GET /` (instance info)".into(),
    )?);
    latencies.push(latency(
        &b.client,
        &b.socket,
        "/vms",
        n,
        "daemon: `GET /vms` (1 VM)".into(),
    )?);
    latencies.push(latency(
        &b.client,
        &b.socket,
        "/vms/latency",
        n,
        "daemon: `GET /vms/{id}` (asks the VM)".into(),
    )?);
    b.call("DELETE", "/vms/latency", None)?;

    // One at a time: each create returns once the VM's API reports it running.
    let mut per_vm = Vec::new();
    let start = Instant::now();
    for i in 0..args.vms {
        let t = Instant::now();
        b.call(
            "POST",
            "/vms",
            Some(json!({"id": format!("seq{i}"), "config": b.config()})),
        )?;
        per_vm.push(t.elapsed());
    }
    let total = start.elapsed();
    per_vm.sort();
    rates.push(Rate {
        what: "create, one at a time".into(),
        vms: args.vms,
        total,
        per_vm_p50: Some(percentile(&per_vm, 0.5)),
    });
    let mut per_vm = Vec::new();
    let start = Instant::now();
    for i in 0..args.vms {
        let t = Instant::now();
        b.call("DELETE", &format!("/vms/seq{i}"), None)?;
        per_vm.push(t.elapsed());
    }
    let total = start.elapsed();
    per_vm.sort();
    rates.push(Rate {
        what: "destroy, one at a time".into(),
        vms: args.vms,
        total,
        per_vm_p50: Some(percentile(&per_vm, 0.5)),
    });

    // All at once, from as many clients.
    let socket = b.socket.as_path();
    let all_at_once = |method: &'static str,
                       make: &(dyn Fn(usize) -> (String, Option<Value>) + Sync)|
     -> anyhow::Result<Duration> {
        let start = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..args.vms)
                .map(|i| {
                    s.spawn(move || -> anyhow::Result<()> {
                        let client = BlockingClient::new()?;
                        let (path, body) = make(i);
                        call_on(&client, socket, method, &path, body)?;
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a client thread panicked"))
            })
        })?;
        Ok(start.elapsed())
    };
    let config = b.config();
    let total = all_at_once("POST", &|i| {
        (
            "/vms".into(),
            Some(json!({"id": format!("par{i}"), "config": config})),
        )
    })?;
    rates.push(Rate {
        what: format!("create, {} at once", args.vms),
        vms: args.vms,
        total,
        per_vm_p50: None,
    });
    let few = (n / 10).max(1);
    latencies.push(latency(
        &b.client,
        &b.socket,
        "/vms",
        n,
        format!("daemon: `GET /vms` ({} VMs)", args.vms),
    )?);
    latencies.push(latency(
        &b.client,
        &b.socket,
        "/metrics",
        few,
        format!("daemon: `GET /metrics` ({} VMs, each asked)", args.vms),
    )?);
    let total = all_at_once("DELETE", &|i| (format!("/vms/par{i}"), None))?;
    rates.push(Rate {
        what: format!("destroy, {} at once", args.vms),
        vms: args.vms,
        total,
        per_vm_p50: None,
    });

    println!("API request latency, each request on a fresh connection ({n} requests; /metrics: {few}):\n");
    println!("| request | p50 (µs) | p99 (µs) | mean (µs) |");
    println!("|---|---|---|---|");
    for l in &latencies {
        println!(
            "| {} | {} | {} | {} |",
            l.what,
            l.p50.as_micros(),
            l.p99.as_micros(),
            l.mean.as_micros()
        );
    }
    println!("\nVM creation through the daemon (test guest, 1 vCPU, {} MiB; a create returns once the VM's API reports it running):\n", args.memory);
    println!("| operation | VMs | total (ms) | VMs/s | per VM, p50 (ms) |");
    println!("|---|---|---|---|---|");
    for r in &rates {
        println!(
            "| {} | {} | {:.1} | {:.1} | {} |",
            r.what,
            r.vms,
            r.total.as_secs_f64() * 1e3,
            r.vms as f64 / r.total.as_secs_f64(),
            r.per_vm_p50
                .map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
        );
    }
    Ok(())
}
