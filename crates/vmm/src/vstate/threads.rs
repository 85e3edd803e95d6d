//! The vCPU threads of a running VM as other threads reach them: kicked out of
//! `KVM_RUN` by a signal, parked at the pause gate, and sent requests through
//! their mailboxes (served on their own thread, see [`super::inspect`]). Both
//! handles of a running VM share it: the lifecycle handle pauses with it, the
//! inspection handle sends requests.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};

use super::inspect::{self, Mailbox, VcpuAccess};
use super::pause::PauseGate;
use crate::ControlError;

/// The signal that kicks vCPU threads out of `KVM_RUN`.
pub(crate) fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct VcpuThreads {
    /// Where vCPUs park while the VM is paused.
    pub(crate) gate: Arc<PauseGate>,
    /// The threads, by vCPU index, to kick; emptied before they are joined.
    threads: Mutex<Vec<libc::pthread_t>>,
    /// Per-vCPU requests, by vCPU index.
    mailboxes: Vec<Arc<Mailbox>>,
}

impl VcpuThreads {
    pub(crate) fn new(
        gate: Arc<PauseGate>,
        threads: Vec<libc::pthread_t>,
        mailboxes: Vec<Arc<Mailbox>>,
    ) -> Self {
        Self {
            gate,
            threads: Mutex::new(threads),
            mailboxes,
        }
    }

    /// How many vCPUs the VM has.
    pub(crate) fn count(&self) -> usize {
        self.mailboxes.len()
    }

    /// Kicks every thread out of `KVM_RUN` (a thread not in it notices nothing).
    pub(crate) fn kick_all(&self) {
        for &thread in lock(&self.threads).iter() {
            // SAFETY: `thread` is a vCPU thread that has not been joined (the list
            // is emptied, under this lock, before any join), and the kick signal
            // has a handler that does nothing.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Forgets the threads, before they are joined: no kick may reach a thread id
    /// once it is joined.
    pub(crate) fn forget(&self) {
        lock(&self.threads).clear();
    }

    /// Queues `f` for vCPU `vcpu`; its result comes on the receiver.
    fn post<T: Send + 'static>(
        &self,
        vcpu: u32,
        f: impl FnOnce(&mut VcpuAccess<'_>) -> T + Send + 'static,
    ) -> Result<Receiver<T>, ControlError> {
        let mailbox = self
            .mailboxes
            .get(vcpu as usize)
            .ok_or(ControlError::NoVcpu(vcpu, self.count()))?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if lock(&self.threads).get(vcpu as usize) == Some(&me) {
            return Err(ControlError::OwnThread(vcpu));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let request = Box::new(move |access: &mut VcpuAccess<'_>| {
            let _ = tx.send(f(access));
        });
        if mailbox.post(request) {
            Ok(rx)
        } else {
            Err(ControlError::VcpuGone(vcpu))
        }
    }

    /// Waits for the result of a request posted to `vcpu`.
    fn wait<T>(&self, vcpu: u32, reply: Receiver<T>) -> Result<T, ControlError> {
        inspect::wait_reply(vcpu, &reply, || {
            if let Some(&thread) = lock(&self.threads).get(vcpu as usize) {
                // SAFETY: as in `kick_all`: a vCPU thread not yet joined, and a kick
                // signal whose handler does nothing.
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
            // A parked vCPU waits on the pause gate, not in KVM_RUN.
            self.gate.wake_all();
        })
    }

    /// Runs `f` on vCPU `vcpu`'s thread, between two `KVM_RUN`s (running or
    /// paused), and returns what it returns.
    pub(crate) fn call<T: Send + 'static>(
        &self,
        vcpu: u32,
        f: impl FnOnce(&mut VcpuAccess<'_>) -> T + Send + 'static,
    ) -> Result<T, ControlError> {
        let reply = self.post(vcpu, f)?;
        self.wait(vcpu, reply)
    }

    /// Runs `f` on every vCPU, all at once; results by vCPU index.
    pub(crate) fn call_each<T: Send + 'static>(
        &self,
        f: impl Fn(&mut VcpuAccess<'_>) -> T + Clone + Send + 'static,
    ) -> Result<Vec<T>, ControlError> {
        let count = self.count() as u32;
        let replies = (0..count)
            .map(|vcpu| self.post(vcpu, f.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        (0..count)
            .zip(replies)
            .map(|(vcpu, reply)| self.wait(vcpu, reply))
            .collect()
    }
}
