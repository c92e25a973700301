//! Panics of threads that must not take the VMM down with them: device workers and vCPUs.
//!
//! Owns the process's panic hook. [`catch`] runs a closure and turns a panic in it into a message
//! ("what at file:line"); while it runs, the hook keeps Rust's default report off stderr, so the
//! caller reports the panic once, in its own words (a guest that could trigger the same panic
//! again and again must not flood stderr). Other threads' panics are reported as usual.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Set while [`catch`] runs on this thread.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// The message of the last panic the hook kept quiet on this thread.
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(Cell::get) {
                return default(info);
            }
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = format!("{}{at}", payload_text(info.payload()));
            LAST.with(|l| *l.borrow_mut() = Some(msg));
        }));
    });
}

/// A panic payload's message (`panic!` gives a `&str` or a `String`).
pub fn payload_text(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Runs `f`; a panic in it becomes `Err(message)` instead of unwinding further. Whatever `f`
/// borrowed may be half-updated after a panic: callers drop it rather than use it again.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    let outer = CATCHING.replace(true);
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.set(outer);
    r.map_err(|p| LAST.take().unwrap_or_else(|| payload_text(&*p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_location() {
        assert_eq!(catch(|| 7), Ok(7));
        let n = 3;
        let e = catch(|| -> u32 { panic!("bad index {n}") }).unwrap_err();
        assert!(e.starts_with("bad index 3 at src/panics.rs:"), "{e}");
        let e = catch(|| -> u32 { panic!("static") }).unwrap_err();
        assert!(e.starts_with("static at "), "{e}");
        // Outside catch, the thread's panics unwind as usual.
        assert!(std::thread::spawn(|| panic!("plain")).join().is_err());
    }
}
