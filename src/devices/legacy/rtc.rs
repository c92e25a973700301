//! CMOS real-time clock (MC146818) at ports 0x70/0x71: the wall-clock time a guest reads at boot,
//! in BCD and 24-hour mode, never "update in progress". Written in-tree because vm-superio has
//! only the ARM PL031; the model is 100 lines and its test covers the date arithmetic.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::BusDevice;

const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// The largest offset from the host clock a saved RTC may have: 10,000 years either way
/// (a snapshot's `offset` is checked against it; the date arithmetic is exact far beyond).
const MAX_OFFSET_SECS: u64 = 10_000 * 366 * 86_400;

pub struct Rtc {
    index: u8,
    /// Seconds added to the host clock (when the guest sets the time).
    offset: i64,
    reg_b: u8,
    nvram: [u8; 128],
    now: fn() -> i64,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// (year, month, day) from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    pub fn new() -> Self {
        Rtc {
            index: 0,
            offset: 0,
            reg_b: 0x02, // 24-hour, BCD
            nvram: [0; 128],
            now: host_now,
        }
    }

    fn register(&self, reg: u8) -> u8 {
        let t = (self.now)().saturating_add(self.offset);
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400) as u32;
        let (y, mo, d) = civil_from_days(days);
        let enc = |v: u32| {
            if self.reg_b & 0x04 != 0 {
                v as u8
            } else {
                bcd(v)
            }
        };
        match reg {
            0x00 => enc(secs % 60),
            0x02 => enc(secs / 60 % 60),
            0x04 => enc(secs / 3600),
            0x06 => enc(((days + 4).rem_euclid(7) + 1) as u32),
            0x07 => enc(d),
            0x08 => enc(mo),
            0x09 => enc((y % 100) as u32),
            CENTURY => enc((y / 100) as u32),
            REG_A => 0x26, // 32.768 kHz base, 1024 Hz rate, UIP clear
            REG_B => self.reg_b,
            REG_C => 0,
            REG_D => 0x80, // battery good
            r => self.nvram[r as usize & 0x7f],
        }
    }
}

/// The RTC in a snapshot: the guest's offset from the host clock (its time goes on from the
/// host's wall clock at the restore, as a real RTC's would), its registers and NVRAM.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedRtc {
    index: u8,
    offset: i64,
    reg_b: u8,
    nvram: Vec<u8>,
}

impl BusDevice for Rtc {
    fn save_state(&self) -> Result<serde_json::Value, String> {
        crate::devices::state_json(&SavedRtc {
            index: self.index,
            offset: self.offset,
            reg_b: self.reg_b,
            nvram: self.nvram.to_vec(),
        })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: SavedRtc = crate::devices::state_from(state)?;
        self.nvram = s
            .nvram
            .try_into()
            .map_err(|v: Vec<u8>| format!("NVRAM of {} bytes, not 128", v.len()))?;
        if s.offset.unsigned_abs() > MAX_OFFSET_SECS {
            return Err(format!(
                "a clock offset of {} s is more than {MAX_OFFSET_SECS} s",
                s.offset
            ));
        }
        self.index = s.index & 0x7f;
        self.offset = s.offset;
        self.reg_b = s.reg_b;
        Ok(())
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 && !data.is_empty() {
            data[0] = self.register(self.index);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = v & 0x7f,
            1 => match self.index {
                REG_B => self.reg_b = v & !0x80,
                REG_A | REG_C | REG_D => {}
                0x00..=0x09 | CENTURY => {} // setting the clock is not supported; keep host time
                r => self.nvram[r as usize] = v,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_778), (2026, 11, 21));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg | 0x80]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reads_bcd_time() {
        let mut rtc = Rtc::new();
        rtc.now = || 1_795_303_813; // 2026-11-21 23:30:13 UTC, a Saturday
        assert_eq!(read(&mut rtc, 0), 0x13);
        assert_eq!(read(&mut rtc, 2), 0x30);
        assert_eq!(read(&mut rtc, 4), 0x23);
        assert_eq!(read(&mut rtc, 7), 0x21);
        assert_eq!(read(&mut rtc, 8), 0x11);
        assert_eq!(read(&mut rtc, 9), 0x26);
        assert_eq!(read(&mut rtc, CENTURY), 0x20);
        assert_eq!(read(&mut rtc, 6), 7, "Saturday is day 7");
        assert_eq!(read(&mut rtc, REG_D), 0x80);
        // Binary mode when the guest asks for it.
        rtc.write(0, &[REG_B]);
        rtc.write(1, &[0x06]);
        assert_eq!(read(&mut rtc, 0), 13);
        // NVRAM keeps what the guest stores; garbage offsets are ignored.
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0x5a]);
        assert_eq!(read(&mut rtc, 0x40), 0x5a);
        rtc.write(7, &[1]);
        rtc.write(1, &[]);
    }

    /// A saved RTC with an offset no clock has (the snapshot fuzz target's find: `now + offset`
    /// overflowed at the next register read) is refused; one set in place reads without a
    /// panic; a saved index past the registers is masked (the next data-port write indexed
    /// the NVRAM with it).
    #[test]
    fn a_saved_clock_offset_out_of_range_is_refused() {
        let mut rtc = Rtc::new();
        let saved = |offset: i64, index: u8| serde_json::json!({"index": index, "offset": offset, "reg_b": 2, "nvram": vec![0u8; 128]});
        let e = rtc.restore_state(&saved(i64::MAX, 0)).unwrap_err();
        assert!(e.contains("clock offset"), "{e}");
        let e = rtc.restore_state(&saved(i64::MIN, 0)).unwrap_err();
        assert!(e.contains("clock offset"), "{e}");
        rtc.restore_state(&saved(-86_400, 0xff)).unwrap();
        rtc.write(1, &[0x5a]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        rtc.offset = i64::MAX;
        for reg in 0..0x80 {
            read(&mut rtc, reg);
        }
    }
}
