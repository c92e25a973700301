//! ACPI power management: the PM1a event and control blocks and the PM timer (ICH9 layout at
//! 0x600), and the reset control register at 0xcf9. This is how a guest's `poweroff` (S5) and
//! `reboot` end the VM. In-tree because no rust-vmm crate models the fixed-hardware ACPI blocks.

use std::time::Instant;

use crate::arch::x86_64::layout::{S5_SLP_TYP, SLP_EN};
use crate::devices::{data_to_u64, u64_to_data, BusDevice, VmEnd, VmEndSender};

const PM_TIMER_HZ: u128 = 3_579_545;
const SCI_EN: u16 = 1;

pub struct Pm {
    sts: u16,
    en: u16,
    cnt: u16,
    start: Instant,
    end: VmEndSender,
}

impl Pm {
    pub fn new(end: VmEndSender) -> Self {
        Pm {
            sts: 0,
            en: 0,
            // No SMI_CMD in the FADT: ACPI mode is always on.
            cnt: SCI_EN,
            start: Instant::now(),
            end,
        }
    }

    fn timer(&self) -> u32 {
        (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u32
    }

    fn regs(&self) -> [u8; 12] {
        let mut r = [0u8; 12];
        r[0..2].copy_from_slice(&self.sts.to_le_bytes());
        r[2..4].copy_from_slice(&self.en.to_le_bytes());
        r[4..6].copy_from_slice(&self.cnt.to_le_bytes());
        r[8..12].copy_from_slice(&self.timer().to_le_bytes());
        r
    }

    fn write_cnt(&mut self, v: u16) {
        if v & SLP_EN != 0 {
            let typ = (v >> 10) & 7;
            if typ == S5_SLP_TYP {
                let _ = self.end.send(VmEnd::PowerOff);
            } else {
                crate::warn_limited!(
                    "pm-sleep-type",
                    "guest asked for ACPI sleep type {typ}, which exitless does not offer"
                );
            }
        }
        self.cnt = (v & !SLP_EN) | SCI_EN;
    }
}

/// The PM block in a snapshot: its registers and where its timer stood (it goes on from
/// there, never backwards).
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedPm {
    sts: u16,
    en: u16,
    cnt: u16,
    timer_ns: u64,
}

impl BusDevice for Pm {
    fn save_state(&self) -> Result<serde_json::Value, String> {
        crate::devices::state_json(&SavedPm {
            sts: self.sts,
            en: self.en,
            cnt: self.cnt,
            timer_ns: self.start.elapsed().as_nanos() as u64,
        })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: SavedPm = crate::devices::state_from(state)?;
        let ago = std::time::Duration::from_nanos(s.timer_ns);
        self.start = Instant::now()
            .checked_sub(ago)
            .ok_or("the PM timer's saved value is out of range")?;
        (self.sts, self.en, self.cnt) = (s.sts, s.en, s.cnt);
        Ok(())
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let r = self.regs();
        for (i, b) in data.iter_mut().enumerate() {
            *b = r.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let v = data_to_u64(data);
        match (offset, data.len()) {
            (0, 4) => {
                self.sts &= !(v as u16);
                self.en = (v >> 16) as u16;
            }
            (0, _) => self.sts &= !(v as u16),
            (2, _) => self.en = v as u16,
            (4, _) => self.write_cnt(v as u16),
            _ => {} // the timer is read-only; the rest is reserved
        }
    }
}

/// The reset control register (0xcf9): bit 2 resets the machine.
pub struct ResetControl {
    value: u8,
    end: VmEndSender,
}

impl ResetControl {
    pub fn new(end: VmEndSender) -> Self {
        ResetControl { value: 0, end }
    }
}

impl BusDevice for ResetControl {
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(self.value.into())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.value = crate::devices::state_from(state)?;
        Ok(())
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        u64_to_data(self.value as u64, data);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.value = v & 0x0a;
            if v & 0x04 != 0 {
                let _ = self.end.send(VmEnd::Reset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn s5_powers_off_and_other_sleep_states_do_not() {
        let (tx, rx) = mpsc::channel();
        let mut pm = Pm::new(tx);
        pm.write(4, &(SLP_EN | (3 << 10)).to_le_bytes()); // S3: refused
        assert!(rx.try_recv().is_err());
        pm.write(4, &0u16.to_le_bytes());
        assert!(rx.try_recv().is_err());
        let mut cnt = [0u8; 2];
        pm.read(4, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & SCI_EN, SCI_EN);
        pm.write(4, &(SLP_EN | (S5_SLP_TYP << 10)).to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), VmEnd::PowerOff);
    }

    #[test]
    fn status_is_write_one_to_clear_and_timer_runs() {
        let (tx, _rx) = mpsc::channel();
        let mut pm = Pm::new(tx);
        pm.sts = 0x0101;
        pm.write(0, &[0x01, 0x00]);
        assert_eq!(pm.sts, 0x0100);
        pm.write(2, &[0x20, 0x01]);
        assert_eq!(pm.en, 0x0120);
        let mut t0 = [0u8; 4];
        pm.read(8, &mut t0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut t1 = [0u8; 4];
        pm.read(8, &mut t1);
        let d = u32::from_le_bytes(t1).wrapping_sub(u32::from_le_bytes(t0));
        assert!(d >= 7000, "PM timer advanced only {d} ticks in 2 ms");
        // Garbage: reserved offsets and odd sizes are ignored.
        pm.write(6, &[0xff]);
        pm.write(0x20, &[0xff; 8]);
        let mut far = [0xaau8; 4];
        pm.read(14, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn cf9_resets() {
        let (tx, rx) = mpsc::channel();
        let mut r = ResetControl::new(tx);
        r.write(0, &[0x02]);
        assert!(rx.try_recv().is_err());
        r.write(0, &[0x06]);
        assert_eq!(rx.try_recv().unwrap(), VmEnd::Reset);
    }
}
