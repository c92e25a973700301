//! `kit`: the runtime of exitless's test guests. See README.md.
#![no_std]

pub mod acpi;
pub mod arch;
pub mod boot;
pub mod console;
pub mod lapic;
pub mod pci;
pub mod probe;
pub mod rtc;
pub mod smp;
pub mod trap;
pub mod virtio;

pub use probe::{
    mmio_read as probe_mmio_read, mmio_write as probe_mmio_write, pio_read as probe_pio_read,
    pio_write as probe_pio_write,
};
pub use trap::{run_user, set_handler, try_run_user, Fault, TrapFrame};

/// What the guest learned at boot.
#[derive(Debug)]
pub struct BootInfo {
    /// Physical address of `struct hvm_start_info` (0 if the magic was wrong).
    pub start_info: u64,
    /// `rsdp_paddr` from the start info (may be 0; see `acpi::rsdp`).
    pub rsdp_hint: u64,
    /// Kernel command line (empty if none).
    pub cmdline: &'static str,
    /// Sum of the RAM (type 1) entries of the PVH memory map.
    pub ram_bytes: u64,
    /// Number of PVH memory map entries.
    pub memmap_entries: u32,
}

const HVM_START_MAGIC: u32 = 0x336e_c578;

static mut BOOT: BootInfo = BootInfo {
    start_info: 0,
    rsdp_hint: 0,
    cmdline: "",
    ram_bytes: 0,
    memmap_entries: 0,
};

extern "Rust" {
    fn kit_guest_main(boot: &'static BootInfo) -> !;
    static KIT_GUEST_NAME: &'static str;
}

/// TSC value at the PVH entry point.
pub fn boot_tsc() -> u64 {
    extern "C" {
        static kit_boot_tsc: u64;
    }
    // SAFETY: written once by the entry code before any Rust runs.
    unsafe { core::ptr::addr_of!(kit_boot_tsc).read_volatile() }
}

/// The guest's binary name (for messages).
pub fn guest_name() -> &'static str {
    // SAFETY: defined once per binary by `entry!`, immutable.
    unsafe { KIT_GUEST_NAME }
}

fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: the start info, memory map and command line are in identity-mapped low memory.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn parse_start_info(p: u64) -> BootInfo {
    let mut b = BootInfo {
        start_info: 0,
        rsdp_hint: 0,
        cmdline: "",
        ram_bytes: 0,
        memmap_entries: 0,
    };
    if p == 0 || peek::<u32>(p) != HVM_START_MAGIC {
        println!("kit: warning: no hvm_start_info at {:#x}", p);
        return b;
    }
    b.start_info = p;
    b.rsdp_hint = peek(p + 32);
    let cmd: u64 = peek(p + 24);
    if cmd != 0 && cmd < 1 << 32 {
        let len = (0..4096).find(|&i| peek::<u8>(cmd + i) == 0).unwrap_or(0);
        // SAFETY: `len` bytes of the command line are mapped and stay untouched.
        let s = unsafe { core::slice::from_raw_parts(cmd as *const u8, len as usize) };
        b.cmdline = core::str::from_utf8(s).unwrap_or("");
    }
    if peek::<u32>(p + 4) >= 1 {
        let (map, n): (u64, u32) = (peek(p + 40), peek(p + 48));
        b.memmap_entries = n;
        b.ram_bytes = (0..n as u64)
            .map(|i| map + 24 * i)
            .filter(|&e| peek::<u32>(e + 16) == 1)
            .map(|e| peek::<u64>(e + 8))
            .sum();
    }
    b
}

#[no_mangle]
extern "C" fn kit_rust_start(start_info: u32) -> ! {
    trap::init_bsp();
    lapic::init();
    let b = parse_start_info(start_info as u64);
    // SAFETY: single-threaded boot; BOOT is written once here and only read afterwards.
    let boot: &'static BootInfo = unsafe {
        let p = core::ptr::addr_of_mut!(BOOT);
        p.write(b);
        &*p
    };
    // SAFETY: `kit_guest_main` is defined by the binary through `entry!`.
    unsafe { kit_guest_main(boot) }
}

/// Declares the guest's `fn main(&'static BootInfo) -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        static KIT_GUEST_NAME: &str = env!("CARGO_BIN_NAME");
        #[no_mangle]
        fn kit_guest_main(boot: &'static $crate::BootInfo) -> ! {
            let f: fn(&'static $crate::BootInfo) -> ! = $main;
            f(boot)
        }
    };
}

/// Prints `kit: PASS <name>`.
pub fn pass(name: &str) {
    println!("kit: PASS {}", name);
}

/// Prints `kit: FAIL <name>: <reason>` and exits with status 1 (VM status 3).
pub fn fail(name: &str, reason: core::fmt::Arguments) -> ! {
    println!("kit: FAIL {}: {}", name, reason);
    exit(1)
}

/// Powers off through ACPI PM1a_CNT (S5, SLP_TYP 0): exit status 0 under QEMU q35 and exitless.
pub fn poweroff() -> ! {
    // The VMM acts on the write asynchronously: halt instead of running on.
    arch::outw(0x604, 0x2000);
    arch::halt_forever()
}

/// Resets through the i8042 controller.
pub fn reset() -> ! {
    arch::outb(0x64, 0xfe);
    arch::halt_forever()
}

/// Ends the VM through isa-debug-exit (port 0xf4): the VMM exits with `(code << 1) | 1`.
pub fn exit(code: u8) -> ! {
    arch::outb(0xf4, code);
    arch::halt_forever()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::force_unlock();
    println!("kit: FAIL {}: panic: {}", guest_name(), info);
    exit(1)
}
