//! The virtio devices a VM is asked for, and the parsing of their command-line forms
//! (`--disk path=IMG[,readonly=on][,id=NAME][,direct=on][,swap-mapper=on][,coalesce=off|adaptive[:T]]`,
//! `--rng`, `--net tap=NAME[,mac=MAC][,coalesce=off|adaptive[:T]]`,
//! `--balloon [size=SIZE][,stats=SECONDS][,reporting=on|off][,deflate_on_oom=on|off]`,
//! `--vsock cid=N,socket=PATH`).

use std::path::PathBuf;

pub use super::moderation::Coalesce;

/// Serialized into a snapshot's `machine` section (what a restore builds; the IOMMU is not:
/// a VM with one cannot be snapshotted).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct VirtioConfig {
    pub disks: Vec<DiskConfig>,
    pub rng: bool,
    pub nets: Vec<NetConfig>,
    pub balloon: Option<BalloonConfig>,
    pub vsock: Option<VsockConfig>,
    /// The longest window a device worker polls its request queues for between bursts, in
    /// microseconds (0: never; see `worker`).
    pub queue_poll_us: u64,
    /// The emulated VT-d the devices sit behind (`--iommu`).
    #[serde(skip)]
    pub iommu: Option<crate::devices::iommu::IommuConfig>,
}

impl VirtioConfig {
    /// Whether the VM needs a PCI bus.
    pub fn any(&self) -> bool {
        !self.disks.is_empty()
            || self.rng
            || !self.nets.is_empty()
            || self.balloon.is_some()
            || self.vsock.is_some()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// The serial the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    pub id: Option<String>,
    /// `direct=on`: the image is opened `O_DIRECT`, bypassing the host's page cache.
    pub direct: bool,
    /// `swap-mapper=on`: whole-page reads become private file mappings of the image in guest RAM
    /// (see `swap_mapper`).
    pub swap_mapper: bool,
    /// `coalesce=off|adaptive[:T]`: the device's interrupt moderation (`moderation`).
    pub coalesce: Coalesce,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
    /// `coalesce=off|adaptive[:T]`: the device's interrupt moderation when the driver set none
    /// (`moderation`; `ethtool -C` in the guest takes precedence).
    pub coalesce: Coalesce,
}

/// `--balloon [size=SIZE][,stats=SECONDS][,reporting=on|off][,deflate_on_oom=on|off]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonConfig {
    /// Target balloon size in bytes (a multiple of 4 KiB), set at start-up.
    pub size: u64,
    /// Statistics polling interval in seconds; 0 does not offer the statistics queue.
    pub stats_interval: u32,
    /// Offer VIRTIO_BALLOON_F_REPORTING (free-page reporting).
    pub reporting: bool,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            size: 0,
            stats_interval: 5,
            reporting: true,
            deflate_on_oom: false,
        }
    }
}

pub fn parse_balloon(s: &str) -> Result<BalloonConfig, String> {
    let mut b = BalloonConfig::default();
    for (k, v) in pairs(s, "size")? {
        match k {
            "size" => {
                b.size = crate::config::parse_size(v).map_err(|e| format!("balloon size: {e}"))?;
                if !b.size.is_multiple_of(4096) {
                    return Err(format!("balloon size {v:?} is not a multiple of 4 KiB"));
                }
                if b.size >> 12 > u64::from(u32::MAX) {
                    return Err(format!("balloon size {v:?} is too large"));
                }
            }
            "stats" => {
                b.stats_interval =
                    v.parse::<u32>()
                        .ok()
                        .filter(|&n| n <= 3600)
                        .ok_or_else(|| {
                            format!("balloon stats interval {v:?} is not 0..=3600 seconds")
                        })?
            }
            "reporting" => b.reporting = on_off(v)?,
            "deflate_on_oom" => b.deflate_on_oom = on_off(v)?,
            _ => {
                return Err(format!(
                    "unknown --balloon option {k:?} (size, stats, reporting, deflate_on_oom)"
                ))
            }
        }
    }
    Ok(b)
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

/// `key=value` pairs separated by commas; a bare first item is taken as `first_key`.
fn pairs<'a>(s: &'a str, first_key: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    s.split(',')
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .map(|(i, p)| match p.split_once('=') {
            Some(kv) => Ok(kv),
            None if i == 0 => Ok((first_key, p)),
            None => Err(format!("{p:?} is not key=value")),
        })
        .collect()
}

fn on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{v:?} is not on or off")),
    }
}

pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut d = DiskConfig {
        path: PathBuf::new(),
        readonly: false,
        id: None,
        direct: false,
        swap_mapper: false,
        coalesce: Coalesce::default(),
    };
    for (k, v) in pairs(s, "path")? {
        match k {
            "path" => d.path = PathBuf::from(v),
            "readonly" | "ro" => d.readonly = on_off(v)?,
            "id" | "serial" => {
                if v.len() > 20 {
                    return Err(format!("disk id {v:?} is longer than 20 bytes"));
                }
                d.id = Some(v.to_string())
            }
            "direct" => d.direct = on_off(v)?,
            "swap-mapper" | "swap_mapper" => d.swap_mapper = on_off(v)?,
            "coalesce" => d.coalesce = Coalesce::parse(v).map_err(|e| format!("--disk {e}"))?,
            _ => {
                return Err(format!(
                "unknown --disk option {k:?} (path, readonly, id, direct, swap-mapper, coalesce)"
            ))
            }
        }
    }
    if d.path.as_os_str().is_empty() {
        return Err("--disk needs path=IMAGE".into());
    }
    Ok(d)
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address"));
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    Ok(m)
}

pub fn parse_net(s: &str, index: usize) -> Result<NetConfig, String> {
    let mut n = NetConfig {
        tap: String::new(),
        // Locally administered, unicast.
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + index as u8],
        coalesce: Coalesce::default(),
    };
    for (k, v) in pairs(s, "tap")? {
        match k {
            "tap" => n.tap = v.to_string(),
            "mac" => n.mac = parse_mac(v)?,
            "coalesce" => n.coalesce = Coalesce::parse(v).map_err(|e| format!("--net {e}"))?,
            _ => return Err(format!("unknown --net option {k:?} (tap, mac, coalesce)")),
        }
    }
    if n.tap.is_empty() {
        return Err("--net needs tap=NAME (at most 15 characters)".into());
    }
    if n.tap.len() >= 16 {
        return Err(format!(
            "--net: tap name {:?} is {} bytes long; interface names have at most 15",
            n.tap,
            n.tap.len()
        ));
    }
    Ok(n)
}

pub fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let mut cid = None;
    let mut socket = None;
    for (k, v) in pairs(s, "cid")? {
        match k {
            "cid" => cid = Some(v.parse::<u64>().map_err(|_| format!("bad cid {v:?}"))?),
            "socket" => socket = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown --vsock option {k:?} (cid, socket)")),
        }
    }
    let cid = cid.ok_or("--vsock needs cid=N")?;
    if cid < 3 || cid > u64::from(u32::MAX) {
        return Err(format!(
            "vsock cid {cid} is reserved or too large (3..2^32)"
        ));
    }
    Ok(VsockConfig {
        cid,
        socket: socket.ok_or("--vsock needs socket=PATH")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_options() {
        let d = parse_disk("path=/a.img,readonly=on,id=root").unwrap();
        assert_eq!(d.path, PathBuf::from("/a.img"));
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("root"));
        assert_eq!(parse_disk("/b.img").unwrap().path, PathBuf::from("/b.img"));
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=/a,bogus=1").is_err());
        assert!(parse_disk("path=/a,id=123456789012345678901").is_err());
        let n = parse_net("tap=tap0,mac=02:00:00:00:00:01", 0).unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 1]);
        assert!(parse_net("mac=zz", 0).is_err());
        assert_eq!(n.coalesce, Coalesce::default());
        let n = parse_net("tap=t,coalesce=off", 0).unwrap();
        assert_eq!(n.coalesce, Coalesce::Off);
        let d = parse_disk("/a,coalesce=adaptive:64").unwrap();
        assert_eq!(d.coalesce, Coalesce::Adaptive { cap_us: 64 });
        assert!(parse_net("tap=t,coalesce=sometimes", 0).is_err());
        assert!(parse_disk("/a,coalesce=adaptive:0").is_err());
        let v = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!(v.cid, 3);
        assert!(parse_vsock("cid=2,socket=/x").is_err());
        assert!(parse_vsock("cid=5").is_err());
    }

    #[test]
    fn parses_balloon_options() {
        assert_eq!(parse_balloon("").unwrap(), BalloonConfig::default());
        let b = parse_balloon("size=48M,stats=1,reporting=off,deflate_on_oom=on").unwrap();
        assert_eq!(
            b,
            BalloonConfig {
                size: 48 << 20,
                stats_interval: 1,
                reporting: false,
                deflate_on_oom: true
            }
        );
        assert_eq!(parse_balloon("1G").unwrap().size, 1 << 30);
        assert_eq!(parse_balloon("stats=0").unwrap().stats_interval, 0);
        assert!(parse_balloon("size=1000").unwrap().size == 1000 << 20);
        assert!(parse_balloon("size=4097B").is_err(), "not page-sized");
        assert!(parse_balloon("size=lots").is_err());
        assert!(parse_balloon("stats=-1").is_err());
        assert!(parse_balloon("stats=99999").is_err());
        assert!(parse_balloon("reporting=maybe").is_err());
        assert!(parse_balloon("size=1M,bogus=1").is_err());
        assert!(parse_balloon("size=1M,stats").is_err());
    }
}
