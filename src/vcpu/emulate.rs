//! Completion of instructions the host's KVM failed to emulate: trap-and-emulate finishing what the
//! host cannot.
//!
//! On a PVM host (see [`crate::host`]) there is no VMX/SVM: KVM runs a guest's CPL0 code through its
//! instruction emulator, and that emulator lacks instructions a stock Linux kernel executes — `int3`
//! outside real mode (alternatives self-test, `text_poke_bp`), `fwait` (every task exit),
//! `clac`/`stac` (SMAP), `popcnt`, `cmpxchg16b` and more. The host also ORs its own feature bits into
//! guest CPUID leaves 1 and 7, so the guest cannot always be steered away from them. With
//! `KVM_CAP_EXIT_ON_EMULATION_FAILURE` such an instruction reaches userspace as
//! `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION` together with its bytes. This module
//! decodes those bytes and completes the instruction against the vCPU's registers (and, for memory
//! operands, guest memory through [`GuestAccess`]); the caller then advances RIP or injects the
//! exception and re-enters the guest.
//!
//! What this module owns: a small, pure x86 decoder (legacy prefixes, REX, ModRM/SIB/displacement,
//! RIP-relative and segment-override addressing) and the semantics of the instructions listed in
//! [`complete`]. It never panics on any byte string; anything it does not recognise, or any
//! truncated encoding, is [`Completion::Unhandled`] and the caller reports it with [`describe`].
//!
//! Measured on the development host (a real-mode guest with the capability on): `popcnt`, `stac`,
//! `clac`, `fwait` and `rdrand` each exit with suberror 1, flag 1 and 15 instruction bytes (the
//! failing instruction first, then whatever follows it); a completion round trip
//! (`KVM_GET_REGS`/`KVM_GET_SREGS`/decode/`KVM_SET_REGS`) costs ~0.1 ms. The host emulator itself
//! runs `tzcnt`, `endbr32`, the fences, hint NOPs and prefetches — and runs `lzcnt` (F3 0F BD) as
//! `bsr`, silently: the guest should not be shown LZCNT/ABM. The rarer forms are completed here
//! anyway in case a host variant fails on them.
//!
//! What the host cannot do, and this cannot fix: instructions that need FPU/XSAVE state (`xrstor`,
//! SSSE3), and a guest `syscall` from CPL3, which never exits to userspace on such a host.

use kvm_bindings::{kvm_regs, kvm_sregs};

/// What to do after an emulation failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Instruction done: registers were updated; advance RIP by `len`.
    Done {
        /// Length of the instruction in bytes.
        len: u8,
        /// Mnemonic, for logs and counters.
        what: &'static str,
    },
    /// Deliver exception `vector` (with error code) to the guest as if the instruction raised it;
    /// RIP advanced by `advance` first (`int3` is a trap: RIP after the instruction; faults such as
    /// `#UD` and `#GP` leave RIP at the instruction, `advance` 0).
    Exception {
        /// Exception vector (3 = #BP, 1 = #DB, 6 = #UD, 13 = #GP).
        vector: u8,
        /// Error code to push, for vectors that have one.
        error_code: Option<u32>,
        /// Bytes to advance RIP by before delivering.
        advance: u8,
        /// Mnemonic, for logs and counters.
        what: &'static str,
    },
    /// Not an instruction we complete (unknown, truncated, unsupported mode, or a memory fault).
    Unhandled,
}

/// Why a guest memory access failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The guest virtual address does not translate (or is not backed by guest RAM).
    Fault {
        /// The failing guest virtual address.
        gva: u64,
    },
    /// The accessor does not implement this operation.
    Unsupported,
}

/// Access to guest *virtual* memory for memory operands, with the vCPU's current page tables.
///
/// Implementations translate each page separately (an access may cross a page boundary).
pub trait GuestAccess {
    /// Reads `buf.len()` bytes at guest virtual address `gva`.
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError>;
    /// Writes `data` at guest virtual address `gva`.
    fn write(&mut self, gva: u64, data: &[u8]) -> Result<(), AccessError>;
    /// Atomically (with respect to other vCPUs) compares the `expected.len()` bytes at `gva` with
    /// `expected`; if equal stores `new` and returns `Ok(true)`, else copies the current bytes into
    /// `current` and returns `Ok(false)`. Used by `cmpxchg8b`/`cmpxchg16b`; the default declines,
    /// which makes those instructions [`Completion::Unhandled`].
    fn compare_exchange(
        &mut self,
        gva: u64,
        expected: &[u8],
        new: &[u8],
        current: &mut [u8],
    ) -> Result<bool, AccessError> {
        let _ = (gva, expected, new, current);
        Err(AccessError::Unsupported)
    }
}

// RFLAGS bits.
const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const AC: u64 = 1 << 18;
const ARITH_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

/// Architectural maximum instruction length.
const MAX_INSN_LEN: usize = 15;

/// Exception vectors.
const DB_VECTOR: u8 = 1;
const BP_VECTOR: u8 = 3;
const UD_VECTOR: u8 = 6;
const GP_VECTOR: u8 = 13;

/// The code segment's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Long,
    Prot32,
    Real16,
}

impl Mode {
    fn of(sregs: &kvm_sregs) -> Mode {
        if sregs.cs.l != 0 && sregs.efer & (1 << 10) != 0 {
            Mode::Long
        } else if sregs.cs.db != 0 {
            Mode::Prot32
        } else {
            Mode::Real16
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// Legacy prefixes and REX.
#[derive(Clone, Copy, Debug, Default)]
struct Prefixes {
    opsize: bool,
    adsize: bool,
    rep: bool,
    repne: bool,
    lock: bool,
    seg: Option<Seg>,
    rex: u8,
}

impl Prefixes {
    fn rex_w(&self) -> bool {
        self.rex & 8 != 0
    }
    fn rex_r(&self) -> usize {
        usize::from(self.rex & 4 != 0) << 3
    }
    fn rex_x(&self) -> usize {
        usize::from(self.rex & 2 != 0) << 3
    }
    fn rex_b(&self) -> usize {
        usize::from(self.rex & 1 != 0) << 3
    }
}

/// Byte cursor over the instruction; every read is bounds-checked (None = truncated).
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Option<u8> {
        if self.pos >= MAX_INSN_LEN {
            return None;
        }
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    fn peek(&self) -> Option<u8> {
        if self.pos >= MAX_INSN_LEN {
            return None;
        }
        self.bytes.get(self.pos).copied()
    }
    fn i8(&mut self) -> Option<i64> {
        self.next().map(|b| i64::from(b as i8))
    }
    fn i32(&mut self) -> Option<i64> {
        let mut v = [0u8; 4];
        for b in &mut v {
            *b = self.next()?;
        }
        Some(i64::from(i32::from_le_bytes(v)))
    }
    fn len(&self) -> u8 {
        // pos <= MAX_INSN_LEN (15) by construction.
        self.pos as u8
    }
}

/// Reads legacy prefixes and (in long mode) REX; leaves the cursor on the first opcode byte.
fn prefixes(cur: &mut Cursor, mode: Mode) -> Option<Prefixes> {
    let mut p = Prefixes::default();
    loop {
        let b = cur.peek()?;
        match b {
            0x66 => p.opsize = true,
            0x67 => p.adsize = true,
            0xF3 => {
                p.rep = true;
                p.repne = false;
            }
            0xF2 => {
                p.repne = true;
                p.rep = false;
            }
            0xF0 => p.lock = true,
            0x26 => p.seg = Some(Seg::Es),
            0x2E => p.seg = Some(Seg::Cs),
            0x36 => p.seg = Some(Seg::Ss),
            0x3E => p.seg = Some(Seg::Ds),
            0x64 => p.seg = Some(Seg::Fs),
            0x65 => p.seg = Some(Seg::Gs),
            0x40..=0x4F if mode == Mode::Long => {
                cur.next()?;
                p.rex = b;
                // REX must immediately precede the opcode; a REX followed by another prefix is
                // ignored (handled by the reset below when the loop sees a legacy prefix).
                match cur.peek()? {
                    0x40..=0x4F
                    | 0x66
                    | 0x67
                    | 0xF3
                    | 0xF2
                    | 0xF0
                    | 0x26
                    | 0x2E
                    | 0x36
                    | 0x3E
                    | 0x64
                    | 0x65 => {
                        p.rex = 0;
                        continue;
                    }
                    _ => return Some(p),
                }
            }
            _ => return Some(p),
        }
        cur.next()?;
    }
}

/// A decoded ModRM r/m operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operand {
    /// General-purpose register number 0–15.
    Reg(usize),
    /// Guest virtual (linear) address.
    Mem(u64),
}

/// A decoded ModRM byte with its operand.
struct ModRm {
    /// The reg field, extended by REX.R.
    reg: usize,
    /// The raw reg field (opcode extension for group opcodes).
    ext: u8,
    rm: Operand,
}

/// Register number → value.
fn gpr(regs: &kvm_regs, n: usize) -> u64 {
    match n {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    }
}

fn gpr_mut(regs: &mut kvm_regs, n: usize) -> &mut u64 {
    match n {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// Writes a `size`-byte result to a register with x86 semantics: 32-bit writes zero-extend,
/// 16-bit writes keep bits 16–63.
fn set_gpr(regs: &mut kvm_regs, n: usize, size: u8, value: u64) {
    let r = gpr_mut(regs, n);
    *r = match size {
        2 => (*r & !0xFFFF) | (value & 0xFFFF),
        4 => value & 0xFFFF_FFFF,
        _ => value,
    };
}

fn mask(size: u8) -> u64 {
    match size {
        2 => 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => u64::MAX,
    }
}

/// Operand size (bytes) for instructions with 16/32/64-bit forms.
fn op_size(p: &Prefixes, mode: Mode) -> u8 {
    match mode {
        Mode::Long if p.rex_w() => 8,
        Mode::Long | Mode::Prot32 => {
            if p.opsize {
                2
            } else {
                4
            }
        }
        Mode::Real16 => {
            if p.opsize {
                4
            } else {
                2
            }
        }
    }
}

/// Decodes ModRM (+ SIB + displacement) at the cursor. The RIP-relative target is computed from
/// the instruction's end, which is the cursor position after the displacement (`imm_after` more
/// bytes of immediate follow). 16-bit addressing is not supported (None).
fn modrm(
    cur: &mut Cursor,
    p: &Prefixes,
    mode: Mode,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    imm_after: u8,
) -> Option<ModRm> {
    let b = cur.next()?;
    let md = b >> 6;
    let ext = (b >> 3) & 7;
    let reg = usize::from(ext) | p.rex_r();
    let rm = usize::from(b & 7);
    if md == 3 {
        return Some(ModRm {
            reg,
            ext,
            rm: Operand::Reg(rm | p.rex_b()),
        });
    }
    let addr_size: u8 = match (mode, p.adsize) {
        (Mode::Long, false) => 8,
        (Mode::Long, true) | (Mode::Prot32, false) | (Mode::Real16, true) => 4,
        _ => return None,
    };
    let mut default_seg = Seg::Ds;
    let mut ea: u64;
    let mut rip_relative = false;
    if rm == 4 {
        let sib = cur.next()?;
        let scale = sib >> 6;
        let index = usize::from((sib >> 3) & 7) | p.rex_x();
        let base = usize::from(sib & 7);
        ea = if index == 4 {
            0
        } else {
            gpr(regs, index) << scale
        };
        if base == 5 && md == 0 {
            ea = ea.wrapping_add(cur.i32()? as u64);
        } else {
            let base = base | p.rex_b();
            if base == 4 || base == 5 {
                default_seg = Seg::Ss;
            }
            ea = ea.wrapping_add(gpr(regs, base));
        }
    } else if rm == 5 && md == 0 {
        ea = cur.i32()? as u64;
        rip_relative = mode == Mode::Long;
    } else {
        let base = rm | p.rex_b();
        if base == 4 || base == 5 {
            default_seg = Seg::Ss;
        }
        ea = gpr(regs, base);
    }
    match md {
        1 => ea = ea.wrapping_add(cur.i8()? as u64),
        2 => ea = ea.wrapping_add(cur.i32()? as u64),
        _ => {}
    }
    if rip_relative {
        let end = u64::from(cur.len()) + u64::from(imm_after);
        ea = ea.wrapping_add(regs.rip).wrapping_add(end);
    }
    if addr_size == 4 {
        ea &= 0xFFFF_FFFF;
    }
    let seg = p.seg.unwrap_or(default_seg);
    let base = match (mode, seg) {
        (Mode::Long, Seg::Fs) => sregs.fs.base,
        (Mode::Long, Seg::Gs) => sregs.gs.base,
        (Mode::Long, _) => 0,
        (_, Seg::Es) => sregs.es.base,
        (_, Seg::Cs) => sregs.cs.base,
        (_, Seg::Ss) => sregs.ss.base,
        (_, Seg::Ds) => sregs.ds.base,
        (_, Seg::Fs) => sregs.fs.base,
        (_, Seg::Gs) => sregs.gs.base,
    };
    let mut linear = ea.wrapping_add(base);
    if mode != Mode::Long {
        linear &= 0xFFFF_FFFF;
    }
    Some(ModRm {
        reg,
        ext,
        rm: Operand::Mem(linear),
    })
}

/// Reads a `size`-byte r/m operand.
fn read_rm(
    rm: Operand,
    size: u8,
    regs: &kvm_regs,
    mem: &mut dyn GuestAccess,
) -> Result<u64, AccessError> {
    match rm {
        Operand::Reg(n) => Ok(gpr(regs, n) & mask(size)),
        Operand::Mem(gva) => {
            let mut buf = [0u8; 8];
            mem.read(gva, &mut buf[..usize::from(size)])?;
            Ok(u64::from_le_bytes(buf))
        }
    }
}

/// Bit-count instructions of the F3 0F Bx family.
#[derive(Clone, Copy)]
enum BitCount {
    Popcnt,
    Tzcnt,
    Lzcnt,
}

fn bit_count(
    op: BitCount,
    cur: &mut Cursor,
    p: &Prefixes,
    mode: Mode,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &mut dyn GuestAccess,
) -> Option<Completion> {
    let size = op_size(p, mode);
    let m = modrm(cur, p, mode, regs, sregs, 0)?;
    let src = read_rm(m.rm, size, regs, mem).ok()?;
    let bits = u32::from(size) * 8;
    let (result, what) = match op {
        BitCount::Popcnt => (u64::from(src.count_ones()), "popcnt"),
        BitCount::Tzcnt => (u64::from(src.trailing_zeros().min(bits)), "tzcnt"),
        BitCount::Lzcnt => (u64::from(src.leading_zeros() - (64 - bits)), "lzcnt"),
    };
    set_gpr(regs, m.reg, size, result);
    let mut flags = regs.rflags & !ARITH_FLAGS;
    match op {
        BitCount::Popcnt => {
            if src == 0 {
                flags |= ZF;
            }
        }
        BitCount::Tzcnt | BitCount::Lzcnt => {
            if src == 0 {
                flags |= CF;
            }
            if result == 0 {
                flags |= ZF;
            }
        }
    }
    regs.rflags = flags;
    Some(Completion::Done {
        len: cur.len(),
        what,
    })
}

/// A hardware random number from the host, if it has one (rdrand/rdseed).
fn host_random(seed: bool) -> Option<u64> {
    /// # Safety
    /// The CPU must support RDRAND.
    #[target_feature(enable = "rdrand")]
    unsafe fn rdrand() -> Option<u64> {
        let mut v = 0u64;
        (core::arch::x86_64::_rdrand64_step(&mut v) == 1).then_some(v)
    }
    /// # Safety
    /// The CPU must support RDSEED.
    #[target_feature(enable = "rdseed")]
    unsafe fn rdseed() -> Option<u64> {
        let mut v = 0u64;
        (core::arch::x86_64::_rdseed64_step(&mut v) == 1).then_some(v)
    }
    if seed && std::is_x86_feature_detected!("rdseed") {
        // SAFETY: RDSEED support was just detected.
        unsafe { rdseed() }
    } else if !seed && std::is_x86_feature_detected!("rdrand") {
        // SAFETY: RDRAND support was just detected.
        unsafe { rdrand() }
    } else {
        None
    }
}

/// Completes the instruction in `insn` (the bytes at the guest's RIP, as reported with the
/// emulation failure) against `regs`, using `sregs` for the mode and segment bases and `mem` for
/// memory operands. RIP is *not* changed: the caller advances it as the result says.
///
/// Completed: `int3` (#BP trap), `int1`/`icebp` (#DB trap), `ud2` (#UD), `fwait`/`wait` (no-op:
/// no unmasked x87 exceptions are pending in a kernel that got here), `clac`/`stac` (RFLAGS.AC),
/// `popcnt`/`tzcnt`/`lzcnt` (16/32/64-bit, register or memory source), `rdrand`/`rdseed` (from the
/// host's generator; CF=0 "try again" when the host has none), `lfence`/`sfence`/`mfence`,
/// `clflush`/`clflushopt`/`clwb` and the hint NOPs `0F 0D`, `0F 18`–`0F 1F` incl. `endbr32/64`
/// (no-ops: the VMM's accesses are already coherent), and `cmpxchg8b`/`cmpxchg16b` when `mem`
/// implements [`GuestAccess::compare_exchange`] (#GP(0) on a misaligned `cmpxchg16b`).
/// A memory operand whose access faults makes the instruction [`Completion::Unhandled`].
pub fn complete(
    insn: &[u8],
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &mut dyn GuestAccess,
) -> Completion {
    complete_inner(insn, regs, sregs, mem).unwrap_or(Completion::Unhandled)
}

fn complete_inner(
    insn: &[u8],
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &mut dyn GuestAccess,
) -> Option<Completion> {
    let mode = Mode::of(sregs);
    let mut cur = Cursor {
        bytes: insn,
        pos: 0,
    };
    let p = prefixes(&mut cur, mode)?;
    let op = cur.next()?;
    let exception = |vector, error_code, advance, what| {
        Some(Completion::Exception {
            vector,
            error_code,
            advance,
            what,
        })
    };
    match op {
        0xCC => exception(BP_VECTOR, None, cur.len(), "int3"),
        0xF1 => exception(DB_VECTOR, None, cur.len(), "int1"),
        0x9B => Some(Completion::Done {
            len: cur.len(),
            what: "fwait",
        }),
        0x0F => two_byte(&mut cur, &p, mode, regs, sregs, mem),
        _ => None,
    }
}

fn two_byte(
    cur: &mut Cursor,
    p: &Prefixes,
    mode: Mode,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    mem: &mut dyn GuestAccess,
) -> Option<Completion> {
    let op = cur.next()?;
    let done = |cur: &Cursor, what| {
        Some(Completion::Done {
            len: cur.len(),
            what,
        })
    };
    match op {
        0x0B => Some(Completion::Exception {
            vector: UD_VECTOR,
            error_code: None,
            advance: 0,
            what: "ud2",
        }),
        0x01 => match cur.next()? {
            0xCA => {
                regs.rflags &= !AC;
                done(cur, "clac")
            }
            0xCB => {
                regs.rflags |= AC;
                done(cur, "stac")
            }
            _ => None,
        },
        0x0D | 0x18..=0x1F => {
            // Prefetches and hint NOPs (incl. endbr64 = F3 0F 1E FA): decode ModRM for the length.
            modrm(cur, p, mode, regs, sregs, 0)?;
            let what = match (op, p.rep, insn_tail(cur)) {
                (0x1E, true, Some(0xFA)) => "endbr64",
                (0x1E, true, Some(0xFB)) => "endbr32",
                (0x0D | 0x18, _, _) => "prefetch",
                _ => "nop",
            };
            done(cur, what)
        }
        0xAE => {
            let m = modrm(cur, p, mode, regs, sregs, 0)?;
            match (m.rm, m.ext, p.opsize, p.rep || p.repne) {
                (Operand::Reg(_), 5, false, false) => done(cur, "lfence"),
                (Operand::Reg(_), 6, false, false) => done(cur, "mfence"),
                (Operand::Reg(_), 7, false, false) => done(cur, "sfence"),
                (Operand::Mem(_), 7, false, false) => done(cur, "clflush"),
                (Operand::Mem(_), 7, true, false) => done(cur, "clflushopt"),
                (Operand::Mem(_), 6, true, false) => done(cur, "clwb"),
                _ => None,
            }
        }
        0xB8 if p.rep => bit_count(BitCount::Popcnt, cur, p, mode, regs, sregs, mem),
        0xBC if p.rep => bit_count(BitCount::Tzcnt, cur, p, mode, regs, sregs, mem),
        0xBD if p.rep => bit_count(BitCount::Lzcnt, cur, p, mode, regs, sregs, mem),
        0xC7 => {
            let m = modrm(cur, p, mode, regs, sregs, 0)?;
            match (m.rm, m.ext) {
                (Operand::Reg(n), 6 | 7) if !p.rep && !p.repne => {
                    let seed = m.ext == 7;
                    let size = op_size(p, mode);
                    let mut flags = regs.rflags & !ARITH_FLAGS;
                    let value = match host_random(seed) {
                        Some(v) => {
                            flags |= CF;
                            v
                        }
                        None => 0,
                    };
                    set_gpr(regs, n, size, value);
                    regs.rflags = flags;
                    done(cur, if seed { "rdseed" } else { "rdrand" })
                }
                (Operand::Mem(gva), 1) if !p.rep && !p.repne => {
                    cmpxchg8b16b(gva, p.rex_w() && mode == Mode::Long, cur, regs, mem)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The last byte decoded (the ModRM byte of a register-form hint NOP), to name endbr32/64.
fn insn_tail(cur: &Cursor) -> Option<u8> {
    cur.pos
        .checked_sub(1)
        .and_then(|i| cur.bytes.get(i))
        .copied()
}

fn cmpxchg8b16b(
    gva: u64,
    wide: bool,
    cur: &Cursor,
    regs: &mut kvm_regs,
    mem: &mut dyn GuestAccess,
) -> Option<Completion> {
    let (what, half) = if wide {
        ("cmpxchg16b", 8usize)
    } else {
        ("cmpxchg8b", 4usize)
    };
    if wide && !gva.is_multiple_of(16) {
        return Some(Completion::Exception {
            vector: GP_VECTOR,
            error_code: Some(0),
            advance: 0,
            what,
        });
    }
    let mut expected = [0u8; 16];
    let mut new = [0u8; 16];
    let mut current = [0u8; 16];
    expected[..half].copy_from_slice(&regs.rax.to_le_bytes()[..half]);
    expected[half..2 * half].copy_from_slice(&regs.rdx.to_le_bytes()[..half]);
    new[..half].copy_from_slice(&regs.rbx.to_le_bytes()[..half]);
    new[half..2 * half].copy_from_slice(&regs.rcx.to_le_bytes()[..half]);
    let n = 2 * half;
    let swapped = mem
        .compare_exchange(gva, &expected[..n], &new[..n], &mut current[..n])
        .ok()?;
    if swapped {
        regs.rflags |= ZF;
    } else {
        regs.rflags &= !ZF;
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo[..half].copy_from_slice(&current[..half]);
        hi[..half].copy_from_slice(&current[half..n]);
        let size = if wide { 8 } else { 4 };
        set_gpr(regs, 0, size, u64::from_le_bytes(lo));
        set_gpr(regs, 2, size, u64::from_le_bytes(hi));
    }
    Some(Completion::Done {
        len: cur.len(),
        what,
    })
}

/// Hex bytes of the instruction plus a guess at its mnemonic, for error messages, e.g.
/// `"0f 01 ca (clac)"`. Uses the bytes as given (at most 15).
pub fn describe(insn: &[u8]) -> String {
    let bytes = &insn[..insn.len().min(MAX_INSN_LEN)];
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let hex = if hex.is_empty() {
        "<no bytes>".to_string()
    } else {
        hex.join(" ")
    };
    format!("{hex} ({})", mnemonic_guess(bytes))
}

/// What [`describe`] calls a VEX-encoded instruction (in 64-bit mode `c4`/`c5` are always VEX).
pub const VEX: &str = "VEX-encoded (AVX, BMI1/BMI2)";

/// Best-effort mnemonic of a 64-bit-mode instruction.
fn mnemonic_guess(insn: &[u8]) -> &'static str {
    let mut cur = Cursor {
        bytes: insn,
        pos: 0,
    };
    let Some(p) = prefixes(&mut cur, Mode::Long) else {
        return "truncated";
    };
    let Some(op) = cur.next() else {
        return "truncated";
    };
    let modrm_ext = |i: usize| insn.get(i).map(|b| ((b >> 6), (b >> 3) & 7));
    match op {
        0xCC => "int3",
        0xCD => "int n",
        0xF1 => "int1",
        0xF4 => "hlt",
        0x9B => "fwait",
        0xCF => "iret",
        0xA4 | 0xA5 if p.rep => "rep movs",
        0xAA | 0xAB if p.rep => "rep stos",
        0xD8..=0xDF => "x87",
        0xC4 | 0xC5 => VEX,
        0x62 => "EVEX-encoded (AVX-512)",
        0xE4..=0xE7 | 0xEC..=0xEF => "in/out",
        0x0F => {
            let Some(op2) = cur.next() else {
                return "truncated";
            };
            let m = modrm_ext(cur.pos);
            match op2 {
                0x01 => match insn.get(cur.pos) {
                    Some(0xCA) => "clac",
                    Some(0xCB) => "stac",
                    Some(0xD0) => "xgetbv",
                    Some(0xD1) => "xsetbv",
                    Some(0xF8) => "swapgs",
                    Some(0xF9) => "rdtscp",
                    Some(0xEE) => "rdpkru",
                    Some(0xEF) => "wrpkru",
                    _ => "0f 01 group (system)",
                },
                0x05 => "syscall",
                0x07 => "sysret",
                0x0B => "ud2",
                0x0D | 0x18 => "prefetch",
                0x1E if p.rep => "endbr/rdssp",
                0x19..=0x1F => "nop",
                0x30 => "wrmsr",
                0x31 => "rdtsc",
                0x32 => "rdmsr",
                0x38 | 0x3A => "sse/ssse3 (0f 38/3a)",
                0x10..=0x17 | 0x28..=0x2F | 0x50..=0x7F | 0xC2..=0xC6 | 0xD0..=0xFF => "sse/mmx",
                0xA2 => "cpuid",
                0xAE => match m {
                    Some((3, 5)) => "lfence",
                    Some((3, 6)) => "mfence",
                    Some((3, 7)) => "sfence",
                    Some((3, 0 | 1)) if p.rep => "rdfsbase/rdgsbase",
                    Some((3, 2 | 3)) if p.rep => "wrfsbase/wrgsbase",
                    Some((_, 0)) => "fxsave",
                    Some((_, 1)) => "fxrstor",
                    Some((_, 2)) => "ldmxcsr",
                    Some((_, 3)) => "stmxcsr",
                    Some((_, 4)) => "xsave",
                    Some((_, 5)) => "xrstor",
                    Some((_, 6)) if p.opsize => "clwb",
                    Some((_, 6)) => "xsaveopt",
                    Some((_, 7)) if p.opsize => "clflushopt",
                    Some((_, 7)) => "clflush",
                    _ => "0f ae group",
                },
                0xB8 if p.rep => "popcnt",
                0xBC if p.rep => "tzcnt",
                0xBD if p.rep => "lzcnt",
                0xBC => "bsf",
                0xBD => "bsr",
                0xB0 | 0xB1 => "cmpxchg",
                0xC7 => match m {
                    Some((3, 6)) => "rdrand",
                    Some((3, 7)) if p.rep => "rdpid",
                    Some((3, 7)) => "rdseed",
                    Some((_, 1)) if p.rex_w() => "cmpxchg16b",
                    Some((_, 1)) => "cmpxchg8b",
                    Some((_, 3)) => "xrstors",
                    Some((_, 4)) => "xsavec",
                    Some((_, 5)) => "xsaves",
                    _ => "0f c7 group",
                },
                _ => "unknown 0f xx",
            }
        }
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_segment;

    /// Flat guest memory at `base`, identity "virtual" addresses.
    struct FlatMem {
        base: u64,
        bytes: Vec<u8>,
        atomic: bool,
    }

    impl FlatMem {
        fn new(base: u64, len: usize) -> FlatMem {
            FlatMem {
                base,
                bytes: vec![0; len],
                atomic: true,
            }
        }
        fn range(&self, gva: u64, len: usize) -> Result<std::ops::Range<usize>, AccessError> {
            let off = gva
                .checked_sub(self.base)
                .ok_or(AccessError::Fault { gva })?;
            let off = usize::try_from(off).map_err(|_| AccessError::Fault { gva })?;
            let end = off.checked_add(len).ok_or(AccessError::Fault { gva })?;
            if end > self.bytes.len() {
                return Err(AccessError::Fault { gva });
            }
            Ok(off..end)
        }
        fn put(&mut self, gva: u64, data: &[u8]) {
            let r = self.range(gva, data.len()).unwrap();
            self.bytes[r].copy_from_slice(data);
        }
    }

    impl GuestAccess for FlatMem {
        fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
            let r = self.range(gva, buf.len())?;
            buf.copy_from_slice(&self.bytes[r]);
            Ok(())
        }
        fn write(&mut self, gva: u64, data: &[u8]) -> Result<(), AccessError> {
            let r = self.range(gva, data.len())?;
            self.bytes[r].copy_from_slice(data);
            Ok(())
        }
        fn compare_exchange(
            &mut self,
            gva: u64,
            expected: &[u8],
            new: &[u8],
            current: &mut [u8],
        ) -> Result<bool, AccessError> {
            if !self.atomic {
                return Err(AccessError::Unsupported);
            }
            let r = self.range(gva, expected.len())?;
            if &self.bytes[r.clone()] == expected {
                self.bytes[r].copy_from_slice(new);
                Ok(true)
            } else {
                current.copy_from_slice(&self.bytes[r]);
                Ok(false)
            }
        }
    }

    fn long_sregs() -> kvm_sregs {
        let code = kvm_segment {
            l: 1,
            present: 1,
            s: 1,
            type_: 11,
            ..Default::default()
        };
        kvm_sregs {
            cs: code,
            efer: (1 << 10) | (1 << 8),
            cr0: 0x8000_0011,
            ..Default::default()
        }
    }

    fn prot32_sregs() -> kvm_sregs {
        let code = kvm_segment {
            db: 1,
            present: 1,
            s: 1,
            type_: 11,
            ..Default::default()
        };
        kvm_sregs {
            cs: code,
            cr0: 0x11,
            ..Default::default()
        }
    }

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x2,
            ..Default::default()
        }
    }

    fn run(insn: &[u8], r: &mut kvm_regs) -> Completion {
        let mut mem = FlatMem::new(0x1000, 0x1000);
        complete(insn, r, &long_sregs(), &mut mem)
    }

    #[test]
    fn int3_is_a_bp_trap() {
        let mut r = regs();
        assert_eq!(
            run(&[0xCC, 0x90, 0x90], &mut r),
            Completion::Exception {
                vector: 3,
                error_code: None,
                advance: 1,
                what: "int3"
            }
        );
        assert_eq!(r, regs());
    }

    #[test]
    fn ud2_is_a_fault_at_the_instruction() {
        let mut r = regs();
        assert!(matches!(
            run(&[0x0F, 0x0B], &mut r),
            Completion::Exception {
                vector: 6,
                advance: 0,
                ..
            }
        ));
    }

    #[test]
    fn fwait_is_a_noop() {
        let mut r = regs();
        assert_eq!(
            run(&[0x9B, 0xCC], &mut r),
            Completion::Done {
                len: 1,
                what: "fwait"
            }
        );
        assert_eq!(r, regs());
    }

    #[test]
    fn clac_stac_toggle_ac() {
        let mut r = regs();
        assert_eq!(
            run(&[0x0F, 0x01, 0xCB], &mut r),
            Completion::Done {
                len: 3,
                what: "stac"
            }
        );
        assert_eq!(r.rflags, 0x2 | AC);
        assert_eq!(
            run(&[0x0F, 0x01, 0xCA], &mut r),
            Completion::Done {
                len: 3,
                what: "clac"
            }
        );
        assert_eq!(r.rflags, 0x2);
        assert_eq!(run(&[0x0F, 0x01, 0xCC], &mut r), Completion::Unhandled);
    }

    #[test]
    fn popcnt_register_forms() {
        // popcnt rax, rcx (f3 48 0f b8 c1)
        let mut r = regs();
        r.rcx = 0xF0F0_0000_0000_0001;
        r.rax = 0x1234;
        r.rflags = 0x2 | CF | OF | SF | PF | AF | ZF;
        assert_eq!(
            run(&[0xF3, 0x48, 0x0F, 0xB8, 0xC1], &mut r),
            Completion::Done {
                len: 5,
                what: "popcnt"
            }
        );
        assert_eq!(r.rax, 9);
        assert_eq!(r.rflags, 0x2);
        // popcnt r9d, r10d (f3 45 0f b8 ca): 32-bit, zero-extends
        r.r10 = 0xFFFF_FFFF_0000_000F;
        r.r9 = u64::MAX;
        assert!(matches!(
            run(&[0xF3, 0x45, 0x0F, 0xB8, 0xCA], &mut r),
            Completion::Done { len: 5, .. }
        ));
        assert_eq!(r.r9, 4);
        // popcnt ax, dx (66 f3 0f b8 c2): 16-bit, keeps upper bits; source 0 sets ZF
        r.rdx = 0xFFFF_0000;
        r.rax = 0xAAAA_BBBB_CCCC_DDDD;
        assert!(matches!(
            run(&[0x66, 0xF3, 0x0F, 0xB8, 0xC2], &mut r),
            Completion::Done { len: 5, .. }
        ));
        assert_eq!(r.rax, 0xAAAA_BBBB_CCCC_0000);
        assert_eq!(r.rflags, 0x2 | ZF);
        // without F3 it is jmpe/reserved: not ours
        assert_eq!(run(&[0x0F, 0xB8, 0xC1], &mut r), Completion::Unhandled);
    }

    #[test]
    fn popcnt_memory_forms() {
        let mut mem = FlatMem::new(0x1000, 0x1000);
        mem.put(0x1100, &0x0000_0001_0000_0003u64.to_le_bytes());
        mem.put(0x1200, &0xFFu64.to_le_bytes());
        let s = long_sregs();

        // popcnt rax, [rbx] (f3 48 0f b8 03)
        let mut r = regs();
        r.rbx = 0x1100;
        assert_eq!(
            complete(&[0xF3, 0x48, 0x0F, 0xB8, 0x03], &mut r, &s, &mut mem),
            Completion::Done {
                len: 5,
                what: "popcnt"
            }
        );
        assert_eq!(r.rax, 3);

        // popcnt edx, [rsi + rcx*4 + 0x10] (f3 0f b8 54 8e 10)
        let mut r = regs();
        r.rcx = 0x4;
        r.rsi = 0x1100 - 0x10 - 0x10;
        assert_eq!(
            complete(&[0xF3, 0x0F, 0xB8, 0x54, 0x8E, 0x10], &mut r, &s, &mut mem),
            Completion::Done {
                len: 6,
                what: "popcnt"
            }
        );
        assert_eq!(r.rdx, 2);

        // popcnt r8, [r13 + 0x100] via mod=10 disp32 (f3 4d 0f b8 85 00 01 00 00)
        let mut r = regs();
        r.r13 = 0x1100;
        assert!(matches!(
            complete(
                &[0xF3, 0x4D, 0x0F, 0xB8, 0x85, 0x00, 0x01, 0x00, 0x00],
                &mut r,
                &s,
                &mut mem
            ),
            Completion::Done { len: 9, .. }
        ));
        assert_eq!(r.r8, 8);

        // RIP-relative: popcnt rax, [rip + disp32] (f3 48 0f b8 05 disp32), len 9
        let mut r = regs();
        r.rip = 0x1000;
        let disp = 0x1200u32 - (0x1000 + 9);
        let mut insn = vec![0xF3, 0x48, 0x0F, 0xB8, 0x05];
        insn.extend_from_slice(&disp.to_le_bytes());
        assert!(matches!(
            complete(&insn, &mut r, &s, &mut mem),
            Completion::Done { len: 9, .. }
        ));
        assert_eq!(r.rax, 8);

        // SIB with no base (mod=00 base=101): popcnt eax, [rcx*8 + 0x1000]
        let mut r = regs();
        r.rcx = 0x40; // 0x200 + 0x1000 = 0x1200
        assert!(matches!(
            complete(
                &[0xF3, 0x0F, 0xB8, 0x04, 0xCD, 0x00, 0x10, 0x00, 0x00],
                &mut r,
                &s,
                &mut mem
            ),
            Completion::Done { len: 9, .. }
        ));
        assert_eq!(r.rax, 8);

        // gs override: popcnt rax, gs:[0x100] (65 f3 48 0f b8 04 25 00 01 00 00)
        let mut s_gs = long_sregs();
        s_gs.gs.base = 0x1100;
        let mut r = regs();
        assert!(matches!(
            complete(
                &[0x65, 0xF3, 0x48, 0x0F, 0xB8, 0x04, 0x25, 0x00, 0x01, 0x00, 0x00],
                &mut r,
                &s_gs,
                &mut mem
            ),
            Completion::Done { len: 11, .. }
        ));
        assert_eq!(r.rax, 8);

        // a faulting operand is not completed, and registers are untouched
        let mut r = regs();
        r.rbx = 0xdead_0000;
        assert_eq!(
            complete(&[0xF3, 0x48, 0x0F, 0xB8, 0x03], &mut r, &s, &mut mem),
            Completion::Unhandled
        );
        assert_eq!(r.rax, 0);
    }

    #[test]
    fn popcnt_in_32bit_mode_with_segment_base() {
        let mut mem = FlatMem::new(0x1000, 0x1000);
        mem.put(0x1100, &0x7u32.to_le_bytes());
        let mut s = prot32_sregs();
        s.ds.base = 0x1000;
        let mut r = regs();
        r.rip = 0x10_0000;
        r.rbx = 0x100;
        // f3 0f b8 03: popcnt eax, [ebx]; 0x48 would be `dec eax` in 32-bit mode, not REX
        assert!(matches!(
            complete(&[0xF3, 0x0F, 0xB8, 0x03], &mut r, &s, &mut mem),
            Completion::Done { len: 4, .. }
        ));
        assert_eq!(r.rax, 3);
        assert_eq!(
            complete(&[0xF3, 0x48, 0x0F, 0xB8, 0x03], &mut r, &s, &mut mem),
            Completion::Unhandled
        );
    }

    #[test]
    fn tzcnt_lzcnt() {
        let mut r = regs();
        r.rcx = 0x100;
        assert!(matches!(
            run(&[0xF3, 0x48, 0x0F, 0xBC, 0xC1], &mut r),
            Completion::Done { what: "tzcnt", .. }
        ));
        assert_eq!(r.rax, 8);
        assert_eq!(r.rflags & (CF | ZF), 0);
        assert!(matches!(
            run(&[0xF3, 0x0F, 0xBD, 0xC1], &mut r),
            Completion::Done { what: "lzcnt", .. }
        ));
        assert_eq!(r.rax, 23);
        r.rcx = 0;
        run(&[0xF3, 0x0F, 0xBC, 0xC1], &mut r);
        assert_eq!(r.rax, 32);
        assert_eq!(r.rflags & (CF | ZF), CF);
        r.rcx = 0x8000;
        run(&[0x66, 0xF3, 0x0F, 0xBD, 0xC1], &mut r);
        assert_eq!(r.rax & 0xFFFF, 0);
        assert_eq!(r.rflags & (CF | ZF), ZF);
    }

    #[test]
    fn fences_flushes_hints() {
        let mut r = regs();
        r.rdi = 0x1000;
        for (insn, what) in [
            (&[0x0F, 0xAE, 0xE8][..], "lfence"),
            (&[0x0F, 0xAE, 0xF0][..], "mfence"),
            (&[0x0F, 0xAE, 0xF8][..], "sfence"),
            (&[0x0F, 0xAE, 0x3F][..], "clflush"),
            (&[0x66, 0x0F, 0xAE, 0x3F][..], "clflushopt"),
            (&[0x66, 0x0F, 0xAE, 0x37][..], "clwb"),
            (&[0xF3, 0x0F, 0x1E, 0xFA][..], "endbr64"),
            (&[0x0F, 0x1F, 0x44, 0x00, 0x00][..], "nop"),
            (&[0x0F, 0x18, 0x0F][..], "prefetch"),
        ] {
            let before = r;
            assert_eq!(
                run(insn, &mut r),
                Completion::Done {
                    len: insn.len() as u8,
                    what
                },
                "{}",
                describe(insn)
            );
            assert_eq!(r, before);
        }
        // xrstor [rdi], xsave [rdi], fxsave [rdi]: not ours
        for insn in [
            &[0x0F, 0xAE, 0x2F][..],
            &[0x0F, 0xAE, 0x27],
            &[0x0F, 0xAE, 0x07],
        ] {
            assert_eq!(run(insn, &mut r), Completion::Unhandled);
        }
    }

    #[test]
    fn rdrand_sets_cf_or_reports_failure() {
        let mut r = regs();
        r.rflags |= ZF | OF;
        assert!(matches!(
            run(&[0x48, 0x0F, 0xC7, 0xF0], &mut r),
            Completion::Done {
                len: 4,
                what: "rdrand"
            }
        ));
        assert_eq!(r.rflags & (ZF | OF), 0);
        if std::is_x86_feature_detected!("rdrand") {
            assert_eq!(r.rflags & CF, CF);
        }
        // rdpid (f3 0f c7 f8) is not ours
        assert_eq!(
            run(&[0xF3, 0x0F, 0xC7, 0xF8], &mut r),
            Completion::Unhandled
        );
    }

    #[test]
    fn cmpxchg16b() {
        let s = long_sregs();
        let mut mem = FlatMem::new(0x1000, 0x1000);
        mem.put(0x1100, &1u64.to_le_bytes());
        mem.put(0x1108, &2u64.to_le_bytes());
        // lock cmpxchg16b [rdi] (f0 48 0f c7 0f)
        let insn = [0xF0, 0x48, 0x0F, 0xC7, 0x0F];
        let mut r = regs();
        r.rdi = 0x1100;
        r.rax = 1;
        r.rdx = 2;
        r.rbx = 3;
        r.rcx = 4;
        assert!(matches!(
            complete(&insn, &mut r, &s, &mut mem),
            Completion::Done {
                len: 5,
                what: "cmpxchg16b"
            }
        ));
        assert_eq!(r.rflags & ZF, ZF);
        assert_eq!(&mem.bytes[0x100..0x108], &3u64.to_le_bytes());
        assert_eq!(&mem.bytes[0x108..0x110], &4u64.to_le_bytes());
        // mismatch: loads current into rdx:rax, clears ZF
        assert!(matches!(
            complete(&insn, &mut r, &s, &mut mem),
            Completion::Done { .. }
        ));
        assert_eq!((r.rax, r.rdx), (3, 4));
        assert_eq!(r.rflags & ZF, 0);
        // misaligned: #GP(0)
        r.rdi = 0x1108;
        assert!(matches!(
            complete(&insn, &mut r, &s, &mut mem),
            Completion::Exception {
                vector: 13,
                error_code: Some(0),
                advance: 0,
                ..
            }
        ));
        // an accessor without an atomic compare-exchange declines
        mem.atomic = false;
        r.rdi = 0x1100;
        assert_eq!(complete(&insn, &mut r, &s, &mut mem), Completion::Unhandled);
    }

    #[test]
    fn prefixes_and_truncation() {
        let mut r = regs();
        // Segment override + operand size before int3: still int3, advance covers the prefixes.
        assert!(matches!(
            run(&[0x2E, 0xCC], &mut r),
            Completion::Exception { advance: 2, .. }
        ));
        // REX followed by a legacy prefix is ignored: 48 f3 0f b8 c1 is popcnt ecx-sized (32-bit)
        r.rcx = u64::MAX;
        assert!(matches!(
            run(&[0x48, 0xF3, 0x0F, 0xB8, 0xC1], &mut r),
            Completion::Done { len: 5, .. }
        ));
        assert_eq!(r.rax, 32);
        // Truncated encodings
        for insn in [
            &[][..],
            &[0xF3],
            &[0xF3, 0x0F],
            &[0xF3, 0x0F, 0xB8],
            &[0xF3, 0x0F, 0xB8, 0x04],
            &[0xF3, 0x0F, 0xB8, 0x05, 0x00, 0x00],
            &[0x0F, 0x01],
        ] {
            assert_eq!(run(insn, &mut r), Completion::Unhandled, "{insn:02x?}");
        }
        // More than 15 bytes of prefixes
        let long = [0x66u8; 20];
        assert_eq!(run(&long, &mut r), Completion::Unhandled);
        // Unknown instruction
        assert_eq!(run(&[0x0F, 0x05], &mut r), Completion::Unhandled);
    }

    #[test]
    fn describe_names_things() {
        assert_eq!(describe(&[0x0F, 0x01, 0xCA]), "0f 01 ca (clac)");
        assert_eq!(describe(&[0xCC]), "cc (int3)");
        assert!(describe(&[0x48, 0x0F, 0xAE, 0x2F]).ends_with("(xrstor)"));
        assert!(describe(&[0xF0, 0x48, 0x0F, 0xC7, 0x0F]).ends_with("(cmpxchg16b)"));
        assert!(describe(&[0x0F, 0x05]).ends_with("(syscall)"));
        // shrx eax, ebx, ecx: BMI2, as zstd's decoder uses where CPUID shows BMI2.
        assert!(describe(&[0xC4, 0xE2, 0x73, 0xF7, 0xC3]).ends_with(&format!("({VEX})")));
        assert_eq!(describe(&[]), "<no bytes> (truncated)");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let interesting = [
            0x0F, 0xF3, 0x66, 0x67, 0x48, 0x4D, 0xB8, 0xBC, 0xBD, 0xC7, 0xAE, 0x01, 0xCA, 0xCC,
            0x9B, 0x65, 0x1E, 0x04, 0x05, 0x44, 0x84,
        ];
        for mode in 0..3 {
            let mut s = match mode {
                0 => long_sregs(),
                1 => prot32_sregs(),
                _ => kvm_sregs::default(),
            };
            s.fs.base = u64::MAX - 3;
            for _ in 0..20_000 {
                let len = (next() % 18) as usize;
                let insn: Vec<u8> = (0..len)
                    .map(|_| {
                        let v = next();
                        if v & 1 == 0 {
                            interesting[(v >> 8) as usize % interesting.len()]
                        } else {
                            (v >> 8) as u8
                        }
                    })
                    .collect();
                let mut r = kvm_regs {
                    rax: next(),
                    rbx: next(),
                    rcx: next(),
                    rdx: next(),
                    rsi: next(),
                    rdi: next(),
                    rbp: next(),
                    rsp: next(),
                    r8: next(),
                    r13: next(),
                    rip: next(),
                    rflags: 2,
                    ..Default::default()
                };
                let mut mem = FlatMem::new(0, 0x1_0000);
                match complete(&insn, &mut r, &s, &mut mem) {
                    Completion::Done { len, .. } => {
                        assert!(len as usize <= insn.len().min(15))
                    }
                    Completion::Exception { advance, .. } => {
                        assert!(advance as usize <= insn.len().min(15))
                    }
                    Completion::Unhandled => {}
                }
                let _ = describe(&insn);
            }
        }
    }
}
