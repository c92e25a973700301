//! COM1 (16550 at 0x3f8): polled output and input, usable from CPL0 and CPL3 (IOPL=3).

use crate::arch::{inb, outb, pause};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
static LOCK: AtomicBool = AtomicBool::new(false);

/// Writes one byte once the transmitter holding register is empty.
pub fn putb(b: u8) {
    while inb(LSR) & 0x20 == 0 {
        pause();
    }
    outb(COM1, b);
}

/// Returns a received byte, if any.
pub fn try_getb() -> Option<u8> {
    (inb(LSR) & 1 != 0).then(|| inb(COM1))
}

/// Waits for a received byte.
pub fn getb() -> u8 {
    loop {
        if let Some(b) = try_getb() {
            return b;
        }
        pause();
    }
}

/// Reads a line (without its terminator) into `buf`; returns its length. Empty lines are skipped.
pub fn read_line(buf: &mut [u8]) -> usize {
    let mut n = 0;
    loop {
        match getb() {
            b'\r' | b'\n' if n > 0 => return n,
            b'\r' | b'\n' => {}
            b if n < buf.len() => {
                buf[n] = b;
                n += 1;
            }
            _ => {}
        }
    }
}

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(putb);
        Ok(())
    }
}

/// Used by `print!`/`println!`: formats under a spin lock (one line never interleaves across CPUs).
pub fn print_fmt(args: fmt::Arguments) {
    while LOCK
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        pause();
    }
    let _ = Com1.write_fmt(args);
    LOCK.store(false, Ordering::Release);
}

/// Releases the console lock unconditionally (fatal paths: the holder is gone).
pub fn force_unlock() {
    LOCK.store(false, Ordering::Release);
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print_fmt(format_args!($($arg)*)) };
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}
