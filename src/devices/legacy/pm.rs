//! ACPI power management: the PM1a event and control blocks and the PM timer (ICH9 layout at
//! 0x600), the fixed-hardware power button, and the reset control register at 0xcf9. This is how
//! a guest's `poweroff` (S5) and `reboot` end the VM, and how the host asks a guest to power off
//! (`PUT /api/v1/vm/shutdown` with `"acpi"`: [`Pm::press_power_button`]). In-tree because no
//! rust-vmm crate models the fixed-hardware ACPI blocks.
//!
//! The SCI (IRQ 9, level-triggered in the MADT) is raised through an irqfd, which pulses the
//! line: once when the button is pressed with its event enabled, and once when the guest enables
//! the event while the button's status is still set. A pulse is enough for an ACPI driver, which
//! reads PM1_STS in its handler and clears what it found (Linux's does).

use std::time::Instant;

use crate::arch::x86_64::layout::{S5_SLP_TYP, SLP_EN};
use crate::devices::{data_to_u64, u64_to_data, BusDevice, VmEnd, VmEndSender};
use vmm_sys_util::eventfd::EventFd;

const PM_TIMER_HZ: u128 = 3_579_545;
const SCI_EN: u16 = 1;
/// PM1_STS.PWRBTN_STS and PM1_EN.PWRBTN_EN: the fixed-hardware power button.
const PWRBTN: u16 = 1 << 8;

pub struct Pm {
    sts: u16,
    en: u16,
    cnt: u16,
    start: Instant,
    end: VmEndSender,
    /// The SCI's irqfd (none in unit tests and the fuzz target).
    sci: Option<EventFd>,
    /// Power-button presses, and SCIs raised for them.
    presses: u64,
    scis: u64,
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
            sci: None,
            presses: 0,
            scis: 0,
        }
    }

    /// The block raising the SCI through `sci` (an irqfd on the SCI's GSI).
    pub fn with_sci(end: VmEndSender, sci: EventFd) -> Self {
        Pm {
            sci: Some(sci),
            ..Self::new(end)
        }
    }

    /// The power button pressed: its status set, and the SCI raised if the guest enabled it
    /// (a guest that did not sees the status when it next enables the event).
    pub fn press_power_button(&mut self) {
        self.presses += 1;
        self.sts |= PWRBTN;
        if self.en & PWRBTN != 0 {
            self.raise_sci();
        }
    }

    /// Presses so far, SCIs raised for them, and whether the guest has enabled the button's
    /// event (an ACPI-aware guest does at boot).
    pub fn power_button_facts(&self) -> (u64, u64, bool) {
        (self.presses, self.scis, self.en & PWRBTN != 0)
    }

    fn raise_sci(&mut self) {
        self.scis += 1;
        if let Some(e) = &self.sci {
            // A full counter (never, at one write per press) only loses a pulse.
            let _ = e.write(1);
        }
    }

    /// PM1_EN written: an event enabled while its status is set raises the SCI now.
    fn write_en(&mut self, v: u16) {
        let newly = v & !self.en;
        self.en = v;
        if newly & self.sts & PWRBTN != 0 {
            self.raise_sci();
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
                self.write_en((v >> 16) as u16);
            }
            (0, _) => self.sts &= !(v as u16),
            (2, _) => self.write_en(v as u16),
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
    fn the_power_button_raises_the_sci_once_its_event_is_enabled() {
        let (tx, _rx) = mpsc::channel();
        let sci = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut pm = Pm::with_sci(tx, sci.try_clone().unwrap());
        let sts = |pm: &mut Pm| {
            let mut b = [0u8; 2];
            pm.read(0, &mut b);
            u16::from_le_bytes(b)
        };
        // Pressed before the guest enabled the event: status set, no SCI yet.
        pm.press_power_button();
        assert_eq!(sts(&mut pm) & PWRBTN, PWRBTN);
        assert!(sci.read().is_err(), "no SCI while the event is disabled");
        // Enabling it with the status still set raises the SCI; enabling it again does not.
        pm.write(2, &PWRBTN.to_le_bytes());
        assert_eq!(sci.read().unwrap(), 1);
        pm.write(2, &PWRBTN.to_le_bytes());
        assert!(sci.read().is_err());
        // The guest clears the status (write one to clear); the next press raises it at once.
        pm.write(0, &PWRBTN.to_le_bytes());
        assert_eq!(sts(&mut pm) & PWRBTN, 0);
        pm.press_power_button();
        assert_eq!(sci.read().unwrap(), 1);
        // A 4-byte write sets the enables too (status in the low half, enables in the high).
        pm.write(0, &(u32::from(PWRBTN)).to_le_bytes());
        assert_eq!(pm.power_button_facts(), (2, 2, false));
        pm.press_power_button();
        assert!(sci.read().is_err(), "event disabled by the 4-byte write");
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
