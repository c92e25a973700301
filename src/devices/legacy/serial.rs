//! COM1: a 16550A UART (vm-superio's model) wired to the host console.
//!
//! Owns the console output path: bytes the guest writes go to stdout (and an optional log file),
//! and a [`ConsoleWatch`] keeps the last lines so the VMM can recognise a guest kernel panic and
//! explain a failed boot. Input from the host reaches the UART through [`Serial::enqueue`].
//! The log file stops at its cap ([`CappedLog`]).
//!
//! Output never blocks the guest: the vCPU thread only appends the bytes to a bounded
//! [`ConsoleQueue`] (`--console-buffer`, default 1 MiB), and the `console-out` thread
//! ([`ConsoleWriter`]) writes them to stdout and the log. A stdout that blocks (a full pipe nobody
//! reads, a stopped terminal) stalls only that thread: once the queue is full, what the guest
//! writes is dropped and counted (`bytes_dropped` in the serial device's facts). Before the
//! summary the VMM waits for the writer to drain the queue for as long as it makes progress
//! ([`ConsoleWriter::finish`]); what a stalled stdout never took is counted as `bytes_unwritten`.
//! A full non-blocking stdout (`EAGAIN`) is waited out; one that fails for good (a closed pipe) is
//! dropped, the log kept, and what it refused is counted as `bytes_lost`.
//! The kernel-panic watch stays on the vCPU thread (it ends the VM; it never blocks).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{BusDevice, VmEnd, VmEndSender};

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

const KEEP_LINES: usize = 200;
const PANIC_MARK: &str = "Kernel panic - not syncing";

/// The last lines the guest printed, shared with the VMM.
#[derive(Default)]
pub struct ConsoleWatch {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    bytes: u64,
    panicked: bool,
}

impl ConsoleWatch {
    /// Feeds one byte; returns the panic line once when a kernel panic appears.
    fn push(&mut self, b: u8) -> Option<String> {
        self.bytes += 1;
        if b != b'\n' {
            if self.partial.len() < 4096 && b != b'\r' {
                self.partial.push(b);
            }
            return None;
        }
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        let panic = (!self.panicked && line.contains(PANIC_MARK)).then(|| line.clone());
        if panic.is_some() {
            self.panicked = true;
        }
        if self.lines.len() == KEEP_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
        panic
    }

    /// The complete lines seen so far (at most the last 200), then the unfinished one.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            v.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        v
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The console log file (`--console-log`), which stops at `cap` bytes (`--console-log-max`) so a
/// guest cannot fill the host's disk: a note ends the file and stderr says so, once.
pub struct CappedLog {
    file: Box<dyn Write + Send>,
    cap: u64,
    written: u64,
    /// The first write error (a full disk), said once on stderr; the log stops there.
    failed: bool,
}

impl CappedLog {
    pub fn new(file: Box<dyn Write + Send>, cap: u64) -> Self {
        CappedLog {
            file,
            cap,
            written: 0,
            failed: false,
        }
    }

    fn write(&mut self, buf: &[u8]) {
        let room = self.cap.saturating_sub(self.written);
        if room == 0 || self.failed {
            return;
        }
        let n = buf.len().min(room as usize);
        if let Err(e) = self.file.write_all(&buf[..n]) {
            // Said, not silent: a log cut short by a full disk must not pass for the whole run.
            self.failed = true;
            eprintln!(
                "exitless: the console log could not be written after {} bytes ({e}); the rest \
                 is not logged",
                self.written
            );
            return;
        }
        self.written += n as u64;
        if self.written == self.cap {
            let note = format!(
                "console log reached its cap of {} bytes (--console-log-max); the rest is not logged",
                self.cap
            );
            let _ = writeln!(self.file, "\n[exitless: {note}]");
            let _ = self.file.flush();
            eprintln!("exitless: {note}");
        }
    }
}

/// The bytes on their way from the guest to stdout and the log, bounded.
pub struct ConsoleQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    bytes: VecDeque<u8>,
    cap: usize,
    dropped: u64,
    written: u64,
    /// Taken from the queue but refused by a stdout that failed for good.
    lost: u64,
    /// Taken by the writer and not yet written (counted as unwritten if it never is).
    in_flight: u64,
    closed: bool,
}

impl ConsoleQueue {
    fn new(cap: usize) -> Self {
        ConsoleQueue {
            state: Mutex::new(QueueState {
                cap: cap.max(1),
                ..Default::default()
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends what fits; the rest is dropped and counted. Never waits for the writer.
    pub fn push(&self, buf: &[u8]) {
        let mut s = self.lock();
        let room = s.cap.saturating_sub(s.bytes.len());
        let n = buf.len().min(room);
        s.bytes.extend(&buf[..n]);
        s.dropped += (buf.len() - n) as u64;
        drop(s);
        if n > 0 {
            self.ready.notify_one();
        }
    }

    /// Bytes the guest wrote that the queue had no room for.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Waits for bytes (up to 64 KiB at a time); None once closed and empty.
    fn take(&self) -> Option<Vec<u8>> {
        let mut s = self.lock();
        while s.bytes.is_empty() && !s.closed {
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.bytes.is_empty() {
            return None;
        }
        let n = s.bytes.len().min(64 << 10);
        s.in_flight = n as u64;
        Some(s.bytes.drain(..n).collect())
    }
}

/// The `console-out` thread: drains the [`ConsoleQueue`] into stdout and the log.
pub struct ConsoleWriter {
    queue: Arc<ConsoleQueue>,
    done: mpsc::Receiver<()>,
}

/// What [`ConsoleWriter::finish`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleTotals {
    /// Dropped because the queue was full.
    pub dropped: u64,
    /// Still queued, or taken but not written, when the writer stopped making progress (stdout
    /// stalled).
    pub unwritten: u64,
    /// Refused by a stdout that failed (closed pipe, bad descriptor); the log still has them.
    pub lost: u64,
}

impl ConsoleTotals {
    /// What of the guest's output neither stdout nor the log got, said in a line; None when
    /// both got everything (bytes only stdout refused are in the log, and not counted here).
    pub fn incomplete(&self) -> Option<String> {
        if self.dropped == 0 && self.unwritten == 0 {
            return None;
        }
        Some(format!(
            "the guest's console output is incomplete: {} bytes dropped (the console queue was \
             full), {} bytes unwritten (the console writer stopped making progress)",
            self.dropped, self.unwritten
        ))
    }
}

impl ConsoleWriter {
    /// Starts the writer with a queue of `cap` bytes.
    pub fn start(
        out: Option<Box<dyn Write + Send>>,
        log: Option<CappedLog>,
        cap: usize,
    ) -> std::io::Result<ConsoleWriter> {
        let queue = Arc::new(ConsoleQueue::new(cap));
        let (tx, done) = mpsc::channel();
        let q = queue.clone();
        std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || {
                crate::seccomp::apply(crate::seccomp::Kind::ConsoleOut);
                drain(&q, out, log);
                let _ = tx.send(());
            })?;
        Ok(ConsoleWriter { queue, done })
    }

    pub fn queue(&self) -> Arc<ConsoleQueue> {
        self.queue.clone()
    }

    /// Closes the queue and waits for the writer to empty it, for as long as it makes progress
    /// (each `patience` without a byte written ends the wait); a writer stuck on a stdout that
    /// never takes its bytes is left behind (the process exit ends it).
    pub fn finish(self, patience: Duration) -> ConsoleTotals {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
        let mut last = self.queue.lock().written;
        loop {
            match self.done.recv_timeout(patience) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = self.queue.lock().written;
                    if now == last {
                        break;
                    }
                    last = now;
                }
            }
        }
        let s = self.queue.lock();
        ConsoleTotals {
            dropped: s.dropped,
            unwritten: s.bytes.len() as u64 + s.in_flight,
            lost: s.lost,
        }
    }
}

/// The writer's loop. Console failures never stop it: a stdout that is momentarily full
/// (`EAGAIN` on a non-blocking descriptor) is retried; one that fails for good (a closed pipe) is
/// left out from then on, the bytes it did not take counted as lost, and the log still written.
fn drain(q: &ConsoleQueue, mut out: Option<Box<dyn Write + Send>>, mut log: Option<CappedLog>) {
    while let Some(chunk) = q.take() {
        if let Some(o) = out.as_mut() {
            if let Err(lost) = write_out(o.as_mut(), &chunk) {
                q.lock().lost += lost;
                out = None;
            }
        } else {
            q.lock().lost += chunk.len() as u64;
        }
        if let Some(l) = log.as_mut() {
            l.write(&chunk);
        }
        let mut s = q.lock();
        s.written += chunk.len() as u64;
        s.in_flight = 0;
    }
}

/// Writes all of `buf`, waiting out `EAGAIN`/`EINTR` (1 ms naps: the writer has nothing else to
/// do, and `finish` gives up on a writer that stops making progress). Err: the bytes not written.
fn write_out(o: &mut dyn Write, buf: &[u8]) -> Result<(), u64> {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    let mut done = 0;
    while done < buf.len() {
        match o.write(&buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == Interrupted => {}
            Err(e) if e.kind() == WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => break,
        }
    }
    let flushed = loop {
        match o.flush() {
            Err(e) if matches!(e.kind(), Interrupted | WouldBlock) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            r => break r.is_ok(),
        }
    };
    match (done == buf.len(), flushed) {
        (true, true) => Ok(()),
        _ => Err((buf.len() - done) as u64),
    }
}

/// Where the guest's console output goes: the writer's queue (None: nowhere) and the panic
/// watch.
pub struct ConsoleOut {
    queue: Option<Arc<ConsoleQueue>>,
    watch: Arc<Mutex<ConsoleWatch>>,
    end: VmEndSender,
}

impl ConsoleOut {
    pub fn new(
        queue: Option<Arc<ConsoleQueue>>,
        watch: Arc<Mutex<ConsoleWatch>>,
        end: VmEndSender,
    ) -> Self {
        ConsoleOut { queue, watch, end }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(q) = &self.queue {
            q.push(buf);
        }
        let mut w = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        for &b in buf {
            if let Some(line) = w.push(b) {
                let _ = self.end.send(VmEnd::GuestPanic(line));
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART on the I/O bus.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl Serial {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

/// Register offsets and bits this wrapper looks at (16550).
const IER: u8 = 1;
const IIR: u8 = 2;
const LCR: u8 = 3;
const IER_RDI: u8 = 0x01;
const IIR_NO_INT: u8 = 0x01;
/// FIFOs enabled, received data available.
const IIR_FIFO_RDA: u8 = 0xc4;
const LCR_DLAB: u8 = 0x80;

impl Serial {
    /// The IIR as a 16550 gives it: received data is reported for as long as the receive FIFO
    /// holds any and its interrupt is enabled. `vm_superio` forgets the condition once the guest
    /// has read one byte or the IIR, so a guest that stops reading with bytes left (Linux's 8250
    /// driver reads at most 256 per pass, and on its next interrupt returns at once when the IIR
    /// says "none") would never read them: the console input hung in the middle of a long line.
    fn read_iir(&mut self) -> u8 {
        let iir = self.uart.read(IIR);
        let dlab = self.uart.read(LCR) & LCR_DLAB != 0;
        let rx_pending = self.uart.fifo_capacity() < FIFO_SIZE;
        if iir & IIR_NO_INT != 0 && !dlab && rx_pending && self.uart.read(IER) & IER_RDI != 0 {
            IIR_FIFO_RDA
        } else {
            iir
        }
    }
}

/// vm_superio's receive FIFO size.
const FIFO_SIZE: usize = 64;

/// The UART's registers and receive FIFO in a snapshot (vm-superio's `SerialState`, which
/// has no serde form of its own).
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedUart {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl Serial {
    fn saved(&self) -> SavedUart {
        let s = self.uart.state();
        SavedUart {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the saved state, writing where this one writes and raising the same interrupt.
    fn restore(&mut self, s: SavedUart) -> Result<(), String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| e.to_string())?;
        // The output is moved into the new UART; the old one gets a placeholder and is dropped.
        let placeholder = ConsoleOut::new(
            None,
            Arc::new(Mutex::new(ConsoleWatch::default())),
            mpsc::channel().0,
        );
        let old = std::mem::replace(
            &mut self.uart,
            vm_superio::Serial::new(
                IrqTrigger(irq.try_clone().map_err(|e| e.to_string())?),
                placeholder,
            ),
        );
        let out = old.into_writer();
        self.uart = vm_superio::Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("{e:?}"))?;
        Ok(())
    }
}

impl BusDevice for Serial {
    fn save_state(&self) -> Result<serde_json::Value, String> {
        crate::devices::state_json(&self.saved())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.restore(crate::devices::state_from(state)?)
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o == IIR as u64 => data[0] = self.read_iir(),
            o if o < 8 => data[0] = self.uart.read(offset as u8),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 8 && !data.is_empty() {
            // A failed interrupt injection is not the guest's fault and not fatal.
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn uart() -> (
        Serial,
        Arc<Mutex<ConsoleWatch>>,
        mpsc::Receiver<VmEnd>,
        EventFd,
    ) {
        let watch = Arc::new(Mutex::new(ConsoleWatch::default()));
        let (tx, rx) = mpsc::channel();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = ConsoleOut::new(None, watch.clone(), tx);
        (Serial::new(irq.try_clone().unwrap(), out), watch, rx, irq)
    }

    #[test]
    fn transmits_lines_to_the_console() {
        let (mut s, watch, rx, _irq) = uart();
        for b in b"hello\r\nworld" {
            s.write(0, &[*b]);
        }
        assert_eq!(watch.lock().unwrap().lines(), vec!["hello", "world"]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn recognises_a_kernel_panic_once() {
        let (mut s, _w, rx, _irq) = uart();
        for b in b"[ 1.0] Kernel panic - not syncing: No working init found.\nagain Kernel panic - not syncing\n" {
            s.write(0, &[*b]);
        }
        match rx.try_recv().unwrap() {
            VmEnd::GuestPanic(l) => assert!(l.contains("No working init")),
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err());
    }

    /// A guest that read part of the FIFO and then the IIR is told data is still there (the
    /// console input hang: Linux returned from its interrupt handler on "no interrupt" with
    /// bytes left, and no new interrupt ever came).
    #[test]
    fn the_iir_reports_received_data_while_the_fifo_holds_any() {
        let (mut s, _w, _rx, _irq) = uart();
        s.write(1, &[0x01]); // IER: received-data interrupt on
        assert_eq!(s.enqueue(b"abc"), 3);
        let mut b = [0u8];
        s.read(2, &mut b);
        assert_eq!(b[0] & 0x0f, 0x04, "IIR: received data");
        s.read(0, &mut b);
        assert_eq!(b[0], b'a');
        s.read(2, &mut b);
        assert_eq!(b[0] & 0x0f, 0x04, "IIR with two bytes left: {:#x}", b[0]);
        s.read(0, &mut b);
        s.read(0, &mut b);
        assert_eq!(b[0], b'c');
        s.read(2, &mut b);
        assert_eq!(b[0] & 0x01, 0x01, "IIR once the FIFO is empty: {:#x}", b[0]);
        // With the receive interrupt off, nothing is reported.
        s.write(1, &[0x00]);
        assert_eq!(s.enqueue(b"d"), 1);
        s.read(2, &mut b);
        assert_eq!(b[0] & 0x01, 0x01);
    }

    #[test]
    fn receives_input_and_raises_an_interrupt() {
        let (mut s, _w, _rx, irq) = uart();
        s.write(1, &[0x01]); // IER: received-data interrupt on
        assert_eq!(s.enqueue(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 1, 0, "data ready");
        let mut d = [0u8];
        s.read(0, &mut d);
        assert_eq!(d[0], b'a');
        // Garbage offsets and empty writes are ignored.
        s.write(0x40, &[1]);
        s.write(0, &[]);
        let mut wide = [0xffu8; 4];
        s.read(0x40, &mut wide);
        assert_eq!(wide, [0; 4]);
    }

    /// A `Write` the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A stdout that never takes a byte: the guest's writes still return at once; what does not
    /// fit is dropped and counted, and `finish` gives up on the stuck writer.
    #[test]
    fn a_stalled_stdout_never_blocks_the_guest() {
        struct Stuck(mpsc::Receiver<()>);
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv(); // until the test ends
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (_hold, rx) = mpsc::channel();
        let w = ConsoleWriter::start(Some(Box::new(Stuck(rx))), None, 100).unwrap();
        let (tx, _end) = mpsc::channel();
        let watch = Arc::new(Mutex::new(ConsoleWatch::default()));
        let mut out = ConsoleOut::new(Some(w.queue()), watch.clone(), tx);
        for _ in 0..1000 {
            out.write_all(b"0123456789").unwrap();
        }
        assert_eq!(
            watch.lock().unwrap().bytes(),
            10_000,
            "the watch saw every byte"
        );
        let t = w.finish(Duration::from_millis(50));
        // The writer took one chunk (at most the 100 queued) and is stuck writing it: that
        // chunk counts as unwritten, so every byte is either dropped or unwritten.
        assert!((9_800..10_000).contains(&t.dropped), "{t:?}");
        assert_eq!(t.dropped + t.unwritten, 10_000, "{t:?}");
        let why = t.incomplete().expect("a loss is said");
        assert!(
            why.contains(&format!("{} bytes dropped", t.dropped)),
            "{why}"
        );
    }

    /// A stdout that says `EAGAIN` now and then (a non-blocking terminal or pipe) still gets
    /// every byte; one that breaks for good is dropped, its bytes counted as lost, and the log
    /// keeps everything.
    #[test]
    fn a_full_stdout_is_retried_and_a_broken_one_counted() {
        struct Flaky(Shared, u32);
        impl Write for Flaky {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.1 += 1;
                if !self.1.is_multiple_of(3) {
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                let n = b.len().min(5);
                self.0.write(&b[..n])
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let text: Vec<u8> = (0..300u32).map(|i| b'a' + (i % 26) as u8).collect();
        let run = |out: Box<dyn Write + Send>, log: Shared| {
            let log = CappedLog::new(Box::new(log), 1 << 20);
            let w = ConsoleWriter::start(Some(out), Some(log), 1 << 20).unwrap();
            let (tx, _end) = mpsc::channel();
            let mut o = ConsoleOut::new(Some(w.queue()), Arc::default(), tx);
            for c in text.chunks(30) {
                o.write_all(c).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            w.finish(Duration::from_secs(5))
        };
        let (stdout, log) = (Shared::default(), Shared::default());
        let t = run(Box::new(Flaky(stdout.clone(), 0)), log.clone());
        assert_eq!(t, ConsoleTotals::default());
        assert_eq!(*stdout.0.lock().unwrap(), text);
        assert_eq!(*log.0.lock().unwrap(), text);
        let log = Shared::default();
        let t = run(Box::new(Broken), log.clone());
        assert_eq!((t.lost, t.dropped, t.unwritten), (300, 0, 0), "{t:?}");
        assert_eq!(*log.0.lock().unwrap(), text);
        assert_eq!(t.incomplete(), None, "the log has everything");
        let stalled = ConsoleTotals {
            unwritten: 7,
            ..ConsoleTotals::default()
        };
        assert!(stalled
            .incomplete()
            .is_some_and(|w| w.contains("7 bytes unwritten")));
    }

    /// Everything reaches stdout and the log, in order, when they keep up.
    #[test]
    fn the_writer_drains_everything_before_finish_returns() {
        let file = Shared::default();
        let log = CappedLog::new(Box::new(file.clone()), 1 << 20);
        let stdout = Shared::default();
        let w = ConsoleWriter::start(Some(Box::new(stdout.clone())), Some(log), 1 << 20).unwrap();
        let (tx, _end) = mpsc::channel();
        let mut out = ConsoleOut::new(Some(w.queue()), Arc::default(), tx);
        let text: Vec<u8> = (0..50_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for c in text.chunks(7) {
            out.write_all(c).unwrap();
        }
        let t = w.finish(Duration::from_secs(5));
        assert_eq!(t, ConsoleTotals::default());
        assert_eq!(*stdout.0.lock().unwrap(), text);
        assert_eq!(*file.0.lock().unwrap(), text);
    }

    /// A log file that fails (a full disk) is given up at its first error, not retried per
    /// chunk (the error is said once on stderr).
    #[test]
    fn a_failing_console_log_is_given_up_once() {
        struct Full(Arc<Mutex<u32>>);
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                *self.0.lock().unwrap() += 1;
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let tries = Arc::new(Mutex::new(0));
        let mut log = CappedLog::new(Box::new(Full(tries.clone())), 1 << 20);
        log.write(b"one");
        log.write(b"two");
        assert!(log.failed);
        assert_eq!((*tries.lock().unwrap(), log.written), (1, 0));
    }

    #[test]
    fn the_console_log_stops_at_its_cap_with_one_note() {
        let file = Shared::default();
        let mut log = CappedLog::new(Box::new(file.clone()), 10);
        log.write(b"0123456");
        log.write(b"789abc");
        log.write(b"more");
        let text = String::from_utf8(file.0.lock().unwrap().clone()).unwrap();
        let (head, note) = text.split_at(10);
        assert_eq!(head, "0123456789");
        assert_eq!(
            note.matches("reached its cap of 10 bytes").count(),
            1,
            "{note}"
        );
    }
}
