//! CMOS real-time clock (ports 0x70/0x71).

use crate::arch::{inb, outb};

/// A wall-clock reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

fn cmos(reg: u8) -> u8 {
    outb(0x70, reg);
    inb(0x71)
}

/// Reads the RTC (waits, bounded, for an update in progress to end).
pub fn read() -> DateTime {
    for _ in 0..10_000 {
        if cmos(0x0a) & 0x80 == 0 {
            break;
        }
    }
    let b = cmos(0x0b);
    let bcd = |v: u8| {
        if b & 4 == 0 {
            (v & 0xf) + (v >> 4) * 10
        } else {
            v
        }
    };
    let raw_hour = cmos(0x04);
    let mut hour = bcd(raw_hour & 0x7f);
    if b & 2 == 0 && raw_hour & 0x80 != 0 {
        hour = (hour % 12) + 12;
    }
    DateTime {
        second: bcd(cmos(0x00)),
        minute: bcd(cmos(0x02)),
        hour,
        day: bcd(cmos(0x07)),
        month: bcd(cmos(0x08)),
        year: 2000 + bcd(cmos(0x09)) as u16,
    }
}

impl core::fmt::Display for DateTime {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}
