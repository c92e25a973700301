//! The snapshot's on-disk container: `DIR/state.json` and how it is checked.
//!
//! ```text
//! {
//!   "format": "exitless-snapshot",     // anything else: not a snapshot
//!   "version": 1,                      // another: refused (no migration between versions yet)
//!   "exitless": "0.1.0",               // the version that wrote it (information only)
//!   "sections": {                      // each: its CRC-32 and its body, checked on load
//!     "host":    {"crc32": N, "body": {cpu_vendor, cpu_signature, cpu_brand, kvm, tsc_khz}},
//!     "machine": {"crc32": N, "body": {guest, mem_bytes, cpus, nested, debug_exit, probe, ...}},
//!     "vcpus":   {"crc32": N, "body": [{id, cpuid, regs, sregs, xsave, xcrs, msrs, ...}, ...]},
//!     "vm":      {"crc32": N, "body": {pic_master, pic_slave, ioapic, pit, clock_ns}},
//!     "devices": {"crc32": N, "body": {"serial@0x3f8": {...}, "rtc@0x70": {...}, ...}},
//!     "memory":  {"crc32": N, "body": {size, regions, data_bytes, data_crc32}}
//!   }
//! }
//! ```
//!
//! A section's CRC-32 covers the exact bytes of its body in the file (kept as raw JSON text by
//! `serde_json::value::RawValue`), so any change to a body — a flipped byte, a cut — is caught
//! before the body is parsed. KVM's structures (registers, XSAVE, LAPIC, irqchip, ...) are
//! kvm-bindings' own serde forms (their bytes, as JSON arrays). JSON rather than a binary
//! encoding: the file is small (about 30 KiB per vCPU), its structure is readable with any tool,
//! and serde_json is already here; guest RAM, the large part, is the separate sparse `memory`
//! file (see [`super::memory`]).
//!
//! Owns the container's layout and its checks; it knows nothing of KVM or of the VM.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::SnapshotError;

/// The `format` field of every exitless snapshot.
pub const MAGIC: &str = "exitless-snapshot";
/// The layout this exitless writes and reads.
pub const VERSION: u32 = 1;
/// The state file's name in the snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// A state file larger than this is not one of ours (about 30 KiB per vCPU is usual).
const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Serialize, Deserialize)]
struct Section {
    crc32: u32,
    body: Box<RawValue>,
}

#[derive(Serialize, Deserialize)]
struct Container {
    format: String,
    version: u32,
    exitless: String,
    sections: BTreeMap<String, Section>,
}

/// Just the fields that say whether the rest can be read.
#[derive(Deserialize)]
struct Header {
    format: Option<String>,
    version: Option<u32>,
}

/// Sections on their way to the file.
#[derive(Default)]
pub struct Writer {
    sections: BTreeMap<String, Section>,
}

impl Writer {
    /// Adds a section (its body serialised once; the checksum covers those bytes).
    pub fn add<T: Serialize>(&mut self, name: &str, body: &T) -> Result<(), SnapshotError> {
        let text = serde_json::to_string(body)
            .map_err(|e| SnapshotError::Save(format!("encoding the {name} section: {e}")))?;
        let crc32 = crc32fast::hash(text.as_bytes());
        let body = RawValue::from_string(text)
            .map_err(|e| SnapshotError::Save(format!("encoding the {name} section: {e}")))?;
        self.sections.insert(name.into(), Section { crc32, body });
        Ok(())
    }

    /// Writes `dir/state.json` (a new file: an existing one is never overwritten) and syncs it.
    pub fn write(self, dir: &Path) -> Result<u64, SnapshotError> {
        let text = self.into_bytes()?;
        let path = dir.join(STATE_FILE);
        let io = |e: std::io::Error| SnapshotError::Save(format!("{}: {e}", path.display()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        f.write_all(&text).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(text.len() as u64)
    }

    /// The state file's bytes.
    pub fn into_bytes(self) -> Result<Vec<u8>, SnapshotError> {
        let c = Container {
            format: MAGIC.into(),
            version: VERSION,
            exitless: env!("CARGO_PKG_VERSION").into(),
            sections: self.sections,
        };
        serde_json::to_vec(&c)
            .map_err(|e| SnapshotError::Save(format!("encoding {STATE_FILE}: {e}")))
    }
}

/// A state file read and checked: every section's checksum verified, bodies not yet parsed.
pub struct Reader {
    sections: BTreeMap<String, Section>,
}

impl Reader {
    /// Reads `dir/state.json`: refuses what is not a snapshot, another version, and any section
    /// whose checksum does not match.
    pub fn open(dir: &Path) -> Result<Reader, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let bad = |why: String| SnapshotError::Invalid(format!("{}: {why}", path.display()));
        let meta = std::fs::metadata(&path).map_err(|e| bad(e.to_string()))?;
        if meta.len() > MAX_STATE_BYTES {
            return Err(bad(format!("{} bytes is too large", meta.len())));
        }
        let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks a state file's bytes (`origin` names them in errors): what [`Reader::open`] does
    /// once it has read the file.
    pub fn parse(text: &[u8], origin: &str) -> Result<Reader, SnapshotError> {
        let bad = |why: String| SnapshotError::Invalid(format!("{origin}: {why}"));
        let header: Header = serde_json::from_slice(text)
            .map_err(|e| bad(format!("truncated or not JSON ({e})")))?;
        if header.format.as_deref() != Some(MAGIC) {
            return Err(bad(
                "not an exitless snapshot (no \"format\": \"exitless-snapshot\")".into(),
            ));
        }
        match header.version {
            Some(VERSION) => {}
            v => {
                return Err(SnapshotError::Version {
                    found: v.map_or("none".into(), |v| v.to_string()),
                    supported: VERSION,
                })
            }
        }
        let c: Container = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        for (name, s) in &c.sections {
            let crc = crc32fast::hash(s.body.get().as_bytes());
            if crc != s.crc32 {
                return Err(bad(format!(
                    "the {name} section is corrupted (CRC-32 {crc:#010x}, recorded {:#010x})",
                    s.crc32
                )));
            }
        }
        Ok(Reader {
            sections: c.sections,
        })
    }

    /// A section's body, parsed.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T, SnapshotError> {
        let s = self
            .sections
            .get(name)
            .ok_or_else(|| SnapshotError::Invalid(format!("the {name} section is missing")))?;
        serde_json::from_str(s.body.get())
            .map_err(|e| SnapshotError::Invalid(format!("the {name} section: {e}")))
    }
}

/// Replaces one section of an existing state file, with a valid checksum (tests only: this is
/// how a test makes a snapshot "from another host" that only the host check refuses).
pub(crate) fn rewrite_section<T: Serialize>(
    dir: &Path,
    name: &str,
    body: &T,
) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let err = |e: String| SnapshotError::Save(format!("{}: {e}", path.display()));
    let text = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
    let mut c: Container = serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?;
    let mut w = Writer::default();
    w.add(name, body)?;
    c.sections.extend(w.sections);
    let text = serde_json::to_vec(&c).map_err(|e| err(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("exitless-fmt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sections_round_trip_and_damage_is_refused() {
        let d = dir("rt");
        let mut w = Writer::default();
        w.add("a", &vec![1u32, 2, 3]).unwrap();
        w.add("b", &"text").unwrap();
        w.write(&d).unwrap();
        let r = Reader::open(&d).unwrap();
        assert_eq!(r.get::<Vec<u32>>("a").unwrap(), vec![1, 2, 3]);
        assert!(r.get::<u32>("missing").is_err());
        // An existing state file is never overwritten.
        assert!(Writer::default().write(&d).is_err());
        let path = d.join(STATE_FILE);
        let good = std::fs::read_to_string(&path).unwrap();
        let check = |text: &str, want: &str| {
            std::fs::write(&path, text).unwrap();
            let e = Reader::open(&d).err().expect("refused").to_string();
            assert!(e.contains(want), "{e}");
        };
        check(
            &good.replace("[1,2,3]", "[1,2,4]"),
            "the a section is corrupted",
        );
        check(&good[..good.len() / 2], "truncated");
        check(&good.replace("\"version\":1", "\"version\":7"), "version 7");
        check(&good.replace(MAGIC, "other"), "not an exitless snapshot");
        check("", "truncated");
        let _ = std::fs::remove_dir_all(&d);
    }
}
