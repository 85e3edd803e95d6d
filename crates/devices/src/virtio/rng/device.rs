//! The virtio-rng device: one queue, filled from `getrandom` under a rate limit.

use std::io::Write;
use std::sync::Arc;

use vigil_metrics::{DeviceCounters, DeviceKind};

use crate::GuestMemoryMmap;
use virtio_queue::Queue;

use crate::persist::Persist;
use crate::rate_limiter::{RateLimit, RateLimiter};
use crate::virtio::persist::DeviceState;
use crate::virtio::{
    serve_chains, whole_chain_writer, DeviceBroken, Publish, QueueOutcome, Served, VirtioDevice,
    TYPE_RNG, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request: a larger buffer is filled up to this.
const MAX_REQUEST: usize = 64 * 1024;

/// A virtio entropy device.
pub struct Rng {
    pub(super) limiter: RateLimiter,
    buf: Vec<u8>,
    bytes: u64,
    metrics: Arc<DeviceCounters>,
}

impl Rng {
    /// An entropy device limited by `limit`.
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limiter: RateLimiter::new(limit),
            buf: vec![0; MAX_REQUEST],
            bytes: 0,
            metrics: Arc::new(DeviceCounters::new(DeviceKind::Entropy, "rng0")),
        }
    }

    /// Counts into `metrics` (shared with whoever reads them) from now on.
    pub fn with_counters(mut self, metrics: Arc<DeviceCounters>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Bytes handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `buf.len() - done` bytes into our own buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}

    fn state(&self) -> DeviceState {
        DeviceState::Rng(self.save())
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        serve_chains(queue, mem, Publish::Every8, |chain| {
            let head = chain.head_index();
            let len = match whole_chain_writer(chain, mem) {
                Ok(writer) if writer.available_bytes() == 0 => {
                    // The spec has the driver give device-writable buffers only.
                    tracing::warn!(head, "virtio-rng request with nothing to write into");
                    self.metrics.errors.inc();
                    0
                }
                Ok(mut writer) => {
                    let n = writer.available_bytes().min(MAX_REQUEST);
                    if let Err(wait) = self.limiter.consume(n as u64) {
                        self.metrics.throttled.inc();
                        return Ok(Served::Wait(wait));
                    }
                    match fill_random(&mut self.buf[..n])
                        .and_then(|()| writer.write_all(&self.buf[..n]))
                    {
                        Ok(()) => n,
                        Err(e) => {
                            tracing::warn!("virtio-rng request failed: {e}");
                            self.metrics.errors.inc();
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(head, "malformed virtio-rng request: {e:?}");
                    self.metrics.errors.inc();
                    0
                }
            };
            self.bytes += len as u64;
            self.metrics.transfer_in(len as u64);
            Ok(Served::Used(len as u32))
        })
    }
}
