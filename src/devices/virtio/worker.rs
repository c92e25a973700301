//! A device's worker thread: an epoll loop over its queues' ioeventfds, a kill eventfd and the
//! device's own file descriptors (tap, sockets). See the threading model in `devices::virtio`.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::irq::Msix;
use super::transport::Shared;
use super::{DeviceStats, QueueHandler};

const KILL: u64 = u64::MAX;
const EXTRA: u64 = 1 << 32;

pub fn spawn(
    name: String,
    mut handler: Box<dyn QueueHandler>,
    queue_evts: Vec<EventFd>,
    kill: EventFd,
    stats: Arc<DeviceStats>,
    shared: Arc<Shared>,
    msix: Arc<Msix>,
) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    let add = |fd: RawFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(kill.as_raw_fd(), KILL)?;
    for (i, e) in queue_evts.iter().enumerate() {
        add(e.as_raw_fd(), i as u64)?;
    }
    let extra = handler.extra_fds();
    for (i, fd) in extra.iter().enumerate() {
        add(*fd, EXTRA + i as u64)?;
    }
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let fail = |why: String| {
                log::warn!("{name}: {why}: device needs reset");
                stats.needs_reset.fetch_add(1, Ordering::Relaxed);
                shared.device_status.fetch_or(
                    virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as u8,
                    Ordering::SeqCst,
                );
                msix.trigger(shared.config_vector.load(Ordering::SeqCst), 2);
            };
            // Chains made available before DRIVER_OK (or before this thread ran) are served now.
            for q in 0..queue_evts.len() {
                if let Err(e) = handler.process(q) {
                    return fail(e);
                }
            }
            let mut events = vec![EpollEvent::default(); 8 + extra.len()];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return fail(format!("epoll: {e}")),
                };
                for ev in &events[..n] {
                    let token = ev.data();
                    let r = if token == KILL {
                        return;
                    } else if token >= EXTRA {
                        handler.fd_ready((token - EXTRA) as usize)
                    } else {
                        let q = token as usize;
                        if let Ok(c) = queue_evts[q].read() {
                            stats.notifications.fetch_add(c, Ordering::Relaxed);
                        }
                        handler.process(q)
                    };
                    if let Err(e) = r {
                        return fail(e);
                    }
                }
            }
        })
}
