//! The i8042 keyboard controller, reduced to what guests use it for: the CPU reset line (0xfe to
//! port 0x64; Linux's `reboot=k`). There is no keyboard: the status register always says "output
//! buffer full, input buffer empty", so Linux's probe drains 16 bytes, concludes "No controller
//! found" and moves on (an empty status made it poll 10,000 times: 10k exits and ~1.4 s of an
//! emulated boot), while `reboot=k`'s wait for an empty input buffer passes at once.

use crate::devices::{BusDevice, VmEnd, VmEndSender};

pub struct I8042 {
    end: VmEndSender,
}

const CMD_RESET_CPU: u8 = 0xfe;
/// Status: output buffer full (bit 0); input buffer empty (bit 1 clear).
const STATUS_OBF: u8 = 0x01;

impl I8042 {
    pub fn new(end: VmEndSender) -> Self {
        I8042 { end }
    }
}

impl BusDevice for I8042 {
    /// Nothing the guest can see changes: its snapshot state is empty.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }

    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 4 {
            if let Some(b) = data.first_mut() {
                *b = STATUS_OBF;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Port 0x64 is offset 4 of the 0x60..0x65 range.
        if offset == 4 && data.first() == Some(&CMD_RESET_CPU) {
            let _ = self.end.send(VmEnd::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_on_0xfe_only() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut d = I8042::new(tx);
        d.write(0, &[0xfe]);
        d.write(4, &[0xaa]);
        assert!(rx.try_recv().is_err());
        d.write(4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), VmEnd::Reset);
        let mut b = [0xff];
        d.read(4, &mut b);
        assert_eq!(b[0] & 0x02, 0, "input buffer empty: reboot=k need not wait");
        assert_eq!(
            b[0] & 0x01,
            0x01,
            "output buffer full: Linux's probe gives up fast"
        );
        d.read(0, &mut b);
        assert_eq!(b, [0]);
    }
}
