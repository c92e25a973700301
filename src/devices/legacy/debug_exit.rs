//! QEMU's `isa-debug-exit` at port 0xf4: a write of V ends the VM with status `(V << 1) | 1`.
//! It exists so a kit guest reports its result the same way under exitless and under QEMU.

use crate::devices::{BusDevice, VmEnd, VmEndSender};

pub struct DebugExit {
    end: VmEndSender,
}

impl DebugExit {
    pub fn new(end: VmEndSender) -> Self {
        DebugExit { end }
    }
}

impl BusDevice for DebugExit {
    /// Nothing the guest can see changes: its snapshot state is empty.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }

    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let _ = self.end.send(VmEnd::DebugExit(v));
        }
    }
}

/// The process exit status QEMU uses for a debug-exit write of `v`.
pub fn status(v: u8) -> i32 {
    ((v as i32) << 1) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_with_qemu_status() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut d = DebugExit::new(tx);
        d.write(0, &[3, 0, 0, 0]);
        assert_eq!(rx.try_recv().unwrap(), VmEnd::DebugExit(3));
        assert_eq!(status(3), 7);
        assert_eq!(status(0), 1);
        d.write(0, &[]);
        assert!(rx.try_recv().is_err());
    }
}
