//! Emulated platform devices: the first I/O tier. Every guest access to them is an exit, so they
//! stay tiny and are used only where a guest expects them (console, clock, power, reset) or where a
//! test needs a counted exit (the probe).

pub mod debug_exit;
pub mod i8042;
pub mod pm;
pub mod probe;
pub mod rtc;
pub mod serial;
