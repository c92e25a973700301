//! Application processors: INIT-SIPI-SIPI through a real-mode trampoline at 0x10000.

use crate::arch::{halt_forever, pause, rdtsc};
use crate::lapic;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Physical page of the trampoline (SIPI vector 0x10); clear of the VMM's boot data.
pub const TRAMPOLINE: u64 = 0x10000;
/// APs that reached `kit_ap_rust`.
pub static STARTED: AtomicUsize = AtomicUsize::new(0);
static AP_MAIN: AtomicUsize = AtomicUsize::new(0);

extern "C" {
    static kit_tramp_start: u8;
    static kit_tramp_end: u8;
}

#[no_mangle]
extern "C" fn kit_ap_rust(_slot: u32) -> ! {
    crate::trap::load_idt();
    lapic::init_ap();
    let id = lapic::id();
    let f = AP_MAIN.load(Ordering::Acquire);
    STARTED.fetch_add(1, Ordering::AcqRel);
    if f != 0 {
        // SAFETY: only `start_aps` stores non-zero values, and those are `fn(u32)`.
        let f: fn(u32) = unsafe { core::mem::transmute::<usize, fn(u32)>(f) };
        f(id);
    }
    halt_forever()
}

/// Starts every CPU in `apic_ids` other than this one, one after another; each runs
/// `ap_main(apic_id)` and then halts. Returns how many reached `ap_main`; `on_timeout` is told
/// about each AP that did not start within `timeout_ms`.
pub fn start_aps(
    apic_ids: &[u32],
    ap_main: fn(u32),
    timeout_ms: u64,
    on_timeout: fn(u32),
) -> usize {
    // SAFETY: copies the position-independent trampoline (a few dozen bytes) to a RAM page that
    // neither the kit image nor the VMM uses.
    unsafe {
        let start = core::ptr::addr_of!(kit_tramp_start);
        let len = core::ptr::addr_of!(kit_tramp_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
    AP_MAIN.store(ap_main as usize, Ordering::Release);
    let me = lapic::id();
    let hz = lapic::tsc_hz();
    for &id in apic_ids.iter().filter(|&&id| id != me) {
        let before = STARTED.load(Ordering::Acquire);
        lapic::send_init(id);
        lapic::delay_ns(10_000_000);
        lapic::send_sipi(id, (TRAMPOLINE >> 12) as u8);
        lapic::delay_ns(200_000);
        if STARTED.load(Ordering::Acquire) == before {
            lapic::send_sipi(id, (TRAMPOLINE >> 12) as u8);
        }
        let t = rdtsc();
        while STARTED.load(Ordering::Acquire) == before {
            if rdtsc() - t > timeout_ms * (hz / 1000) {
                on_timeout(id);
                break;
            }
            pause();
        }
    }
    STARTED.load(Ordering::Acquire)
}
