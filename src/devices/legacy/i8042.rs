//! The i8042 keyboard controller, reduced to what guests use it for: the CPU reset line (0xfe to
//! port 0x64; Linux's `reboot=k`). Keyboard and mouse probing is switched off on the kernel
//! command line and in the FADT, so reads return "no data".

use crate::devices::{BusDevice, VmEnd, VmEndSender};

pub struct I8042 {
    end: VmEndSender,
}

const CMD_RESET_CPU: u8 = 0xfe;

impl I8042 {
    pub fn new(end: VmEndSender) -> Self {
        I8042 { end }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
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
        assert_eq!(b, [0]);
    }
}
