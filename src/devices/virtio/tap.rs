//! A Linux tap device as virtio-net's backend: opened through `/dev/net/tun` with `IFF_TAP`,
//! `IFF_NO_PI` and `IFF_VNET_HDR` (every frame is preceded by a 12-byte `virtio_net_hdr_v1`,
//! `TUNSETVNETHDRSZ`), non-blocking, with the offloads set by `TUNSETOFFLOAD`.
//!
//! Owns the tap's file descriptor. Hand-written rather than a crate because what it needs is four
//! ioctls whose constants `libc` already has; the crates that wrap taps (Firecracker's and Cloud
//! Hypervisor's `net_util`, `tun-tap`) are either not published for reuse or do not set a vnet
//! header size and offloads.
//!
//! `TUNSETIFF` attaches to the tap named NAME if it exists (it must be a tap, not in use by another
//! process, and owned by this user unless we have `CAP_NET_ADMIN`); if it does not exist and we
//! have `CAP_NET_ADMIN`, the kernel creates it, unconfigured and down, and it disappears when
//! exitless closes it (it is not made persistent). A missing tap without the capability, a name
//! that is not a tap, or a tap in use is a start-up error naming the tap.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Size of `virtio_net_hdr_v1` (with `num_buffers`): what the tap prepends to every frame.
pub const VNET_HDR_LEN: usize = 12;

/// The `TUN_F_*` offload bits exitless may ask for.
pub const ALL_OFFLOADS: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO;

/// `struct ifreq` as TUNSETIFF uses it: the name and the flags (40 bytes in all).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
    /// The `TUN_F_*` offloads this kernel's tap accepts.
    supported: u32,
}

/// Checks a tap name as the kernel would take it (1..=15 bytes, no '/', no whitespace, no NUL).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!(
            "tap name {name:?} must be 1 to {} bytes long",
            libc::IFNAMSIZ - 1
        ));
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(format!("tap name {name:?} is not a valid interface name"));
    }
    Ok(())
}

fn ioctl_int(fd: RawFd, req: libc::Ioctl, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the request takes its argument by value (TUNSETOFFLOAD) and touches no memory of
    // ours; the result is checked.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed value of the type the request reads or
    // writes (checked by the callers: ifreq for TUNSETIFF, c_int for the others).
    if unsafe { libc::ioctl(fd, req, arg as *mut T) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens (or, with CAP_NET_ADMIN, creates) tap `name`; every error names the tap.
    pub fn open(name: &str) -> Result<Tap, String> {
        check_name(name).map_err(|e| format!("--net: {e}"))?;
        let what = |e: String| format!("cannot open tap {name}: {e}");
        // SAFETY: a NUL-terminated path; the returned descriptor is checked and then owned.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(what(format!(
                "/dev/net/tun: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut features: libc::c_int = 0;
        ioctl_ptr(fd, libc::TUNGETFEATURES, &mut features)
            .map_err(|e| what(format!("TUNGETFEATURES: {e}")))?;
        if features & libc::IFF_VNET_HDR == 0 {
            return Err(what("this kernel's tun has no IFF_VNET_HDR".into()));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        ioctl_ptr(fd, libc::TUNSETIFF, &mut req).map_err(|e| {
            what(match e.raw_os_error() {
                Some(libc::EPERM) => format!(
                    "{e}: it does not exist or belongs to another user, and creating or \
                     attaching it needs CAP_NET_ADMIN (ip tuntap add {name} mode tap user $USER)"
                ),
                Some(libc::EBUSY) => format!("{e}: another process has it open"),
                Some(libc::EINVAL) => format!("{e}: {name} exists and is not a tap device"),
                _ => e.to_string(),
            })
        })?;
        let mut hdr = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(fd, libc::TUNSETVNETHDRSZ, &mut hdr)
            .map_err(|e| what(format!("TUNSETVNETHDRSZ: {e}")))?;
        let mut tap = Tap {
            file,
            name: name.to_string(),
            supported: 0,
        };
        tap.supported = tap.probe_offloads();
        tap.set_offloads(0)
            .map_err(|e| what(format!("TUNSETOFFLOAD: {e}")))?;
        Ok(tap)
    }

    /// The offloads the kernel accepts: it refuses (EINVAL) a set with a bit it does not know.
    fn probe_offloads(&self) -> u32 {
        let mut ok = 0;
        if self.set_offloads(libc::TUN_F_CSUM).is_err() {
            return 0;
        }
        ok |= libc::TUN_F_CSUM;
        for bit in [
            libc::TUN_F_TSO4,
            libc::TUN_F_TSO6,
            libc::TUN_F_TSO_ECN,
            libc::TUN_F_UFO,
        ] {
            if self.set_offloads(ok | bit).is_ok() {
                ok |= bit;
            }
        }
        ok
    }

    /// A stand-in for unit tests and the fuzz target: any datagram descriptor behaves like a
    /// tap for the handler (offloads cannot be set on it: see [`handler`](super::net::handler)).
    #[doc(hidden)]
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
            supported: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `TUN_F_*` bits the tap supports.
    pub fn supported_offloads(&self) -> u32 {
        self.supported
    }

    /// TUNSETOFFLOAD: which offloaded (partially checksummed, GSO) frames the tap may hand us.
    pub fn set_offloads(&self, flags: u32) -> io::Result<()> {
        ioctl_int(
            self.file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    }

    /// Reads one frame (vnet header first); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most `buf.len()` bytes into the live buffer.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (vnet header first) gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must describe memory readable for its whole length during the call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs; their count fits a c_int (bounded by the
        // queue size).
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        assert!(check_name("tap0").is_ok());
        assert!(check_name("exitless-tap123").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("sixteen-bytes-xx").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("..").is_err());
    }
}
