//! The host terminal as the guest's console: raw mode while the VM runs (so keys reach the guest
//! unchanged), restored on every way out — normal end, error, panic (the guard's `Drop`) and fatal
//! signals (a handler restores it before the default action).

use std::sync::Mutex;

/// The terminal settings to restore, kept global so a signal handler can reach them.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin in raw mode if it is a terminal; restores it when dropped.
pub struct RawModeGuard {
    active: bool,
}

impl RawModeGuard {
    pub fn new() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return RawModeGuard { active: false };
        }
        // SAFETY: zeroed termios is a valid out-parameter for tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `t` is a valid pointer.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawModeGuard { active: false };
        }
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        let mut raw = t;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the host side stays readable if the guest prints "\n".
        raw.c_oflag = t.c_oflag;
        // SAFETY: fd 0 is a terminal, `raw` a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        install_signal_restore();
        RawModeGuard { active: true }
    }
}

impl Default for RawModeGuard {
    fn default() -> Self {
        Self::new()
    }
}

/// Restores the saved terminal settings, if any. Safe to call more than once.
pub fn restore() {
    if let Ok(saved) = SAVED.try_lock() {
        if let Some(t) = saved.as_ref() {
            // SAFETY: restoring settings previously read from the same descriptor.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        if self.active {
            restore();
        }
    }
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    restore();
    // SAFETY: resetting to the default action and re-raising is async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_signal_restore() {
    for sig in [libc::SIGQUIT, libc::SIGABRT] {
        // SAFETY: the handler only calls async-signal-safe functions (tcsetattr, signal, raise);
        // the mutex is taken with try_lock so it cannot deadlock.
        unsafe { libc::signal(sig, on_fatal_signal as *const () as libc::sighandler_t) };
    }
}
