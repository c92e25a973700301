//! Landlock (`exitless run --landlock on|require|off`, default `on`): once its set-up is done,
//! each thread of a running VM restricts itself to the few files the VMM still opens at run
//! time; every other path on the host is refused (`EACCES`), whatever user exitless runs as.
//!
//! **What is allowed after set-up.** The guest's images, the tap, `/dev/kvm`, the console log
//! and the sockets are opened (or bound) during set-up and used through their descriptors,
//! which Landlock does not touch. What is opened later, and so allowed here:
//! - reading `/proc/self` (the balloon's RSS facts), `/proc/meminfo` and `/proc/vmstat` (the
//!   memory cgroup's report), and the exitless binary itself (a panic's backtrace);
//! - writing the `--stats-json` report (created empty at set-up, written at the end);
//! - removing the `--api-socket` and `--vsock` socket files at the end (their directories get
//!   "remove a file" and nothing else);
//! - with `--mem-limit`: reading and writing its cgroup's files, going back to the group the
//!   process came from, and removing the group it created;
//! - with `--snapshot-dir DIR`: making directories and files beneath DIR and writing them (a
//!   snapshot's `state.json` and `memory`), removing a memory file a failed snapshot left.
//!
//! Handled are all file-system rights of Landlock ABI 6 and its TCP bind and connect rights
//! (exitless uses no TCP). Not handled: connecting to a Unix socket (ABI 9's right), which the
//! vsock device does at run time for every guest-initiated connection (`PATH_PORT`). A kernel
//! with an older ABI enforces what it knows (best effort; Debian 12's 6.1 kernel has ABI 2), one
//! without Landlock enforces nothing: `on` then says so once and runs on, `require` refuses to
//! start.
//!
//! **Why per thread.** Landlock restricts the calling thread and the threads it starts later
//! (a process-wide flag needs ABI 8, Linux 7.0); exitless starts threads during set-up (the
//! console writer, the IOMMU's side core, the vCPUs), so each restricts itself where it installs
//! its seccomp filter ([`crate::seccomp::apply`] calls [`restrict_thread`]), from one ruleset
//! built before the first thread starts ([`init`]). Device workers start from the launcher (or
//! a vCPU), already restricted, and inherit its domain.
//!
//! Also here: [`close_inherited_fds`], which `exitless run` calls first, so that no descriptor
//! of its parent reaches a process with an untrusted guest.
//!
//! Owns the ruleset; touches only the files named above (and creates the stats file).

use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetStatus, ABI,
};

/// The Landlock ABI whose rights exitless handles (tested here on ABI 7 and in the emulated
/// host's Debian kernel).
const TARGET: ABI = ABI::V6;

/// `--landlock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Restrict where the kernel has Landlock; where it has none, say so once and run on.
    #[default]
    On,
    /// Restrict, and refuse to start where the kernel cannot.
    Require,
    /// No Landlock restriction.
    Off,
}

/// A file or directory the VMM may still use after set-up, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub path: PathBuf,
    pub access: BitFlags<AccessFs>,
    /// Why (for the debug log and the tests).
    pub why: &'static str,
}

struct State {
    mode: Mode,
    ruleset: Mutex<RulesetCreated>,
}

static STATE: OnceLock<State> = OnceLock::new();
static SELFTEST: OnceLock<PathBuf> = OnceLock::new();

/// Closes every descriptor above stderr that exitless inherited (`exitless run` calls it first,
/// before it opens anything): a parent's pipes, sockets or files must not reach a process whose
/// guest is untrusted. Returns how many were open.
pub fn close_inherited_fds() -> usize {
    let open = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(4)) // 0-2 and the directory's own descriptor
        .unwrap_or(0);
    // SAFETY: nothing in this process uses a descriptor above 2 yet (called first in `run`);
    // close_range has no memory-safety preconditions.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        // Kernels before 5.9: one by one, up to the soft limit.
        // SAFETY: as above; sysconf and close take no pointers.
        let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) }.clamp(3, 1 << 20);
        for fd in 3..max as i32 {
            // SAFETY: as above.
            unsafe { libc::close(fd) };
        }
    }
    open
}

/// What this kernel offers: `Ok(abi)` or why Landlock cannot be used.
pub fn kernel_abi() -> Result<i64, String> {
    // The crate keeps its own probe private; this is the documented version query
    // (landlock_create_ruleset with LANDLOCK_CREATE_RULESET_VERSION), for the message only.
    // SAFETY: a null attribute pointer with size 0 and the VERSION flag reads nothing.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    if v > 0 {
        return Ok(v);
    }
    Err(match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EOPNOTSUPP) => "this kernel has Landlock but it is not enabled at boot (add \
                                   landlock to the kernel's lsm= parameter)"
            .into(),
        _ => "this kernel has no Landlock (CONFIG_SECURITY_LANDLOCK, Linux 5.13+)".into(),
    })
}

/// What a VM with this configuration still opens after set-up (see the module doc).
pub fn allowed(cfg: &crate::config::VmConfig, cgroup: &[Allowed]) -> Vec<Allowed> {
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let mut a = vec![
        allow("/proc/self", read, "the balloon's RSS facts"),
        allow("/proc/meminfo", AccessFs::ReadFile, "host memory"),
        allow(
            "/proc/vmstat",
            AccessFs::ReadFile,
            "the memory cgroup's report",
        ),
    ];
    if let Ok(exe) = std::env::current_exe() {
        a.push(allow(exe, AccessFs::ReadFile, "a panic's backtrace"));
    }
    if let Some(p) = &cfg.stats_json {
        a.push(allow(
            p,
            AccessFs::WriteFile | AccessFs::Truncate,
            "the report (--stats-json)",
        ));
    }
    let sockets = cfg
        .api_socket
        .iter()
        .chain(cfg.virtio.vsock.as_ref().map(|v| &v.socket));
    for s in sockets {
        if let Some(dir) = parent(s) {
            a.push(allow(
                dir,
                AccessFs::RemoveFile,
                "removing a socket at the end",
            ));
        }
    }
    if let Some(d) = &cfg.snapshot_dir {
        a.push(allow(
            d,
            AccessFs::MakeDir
                | AccessFs::MakeReg
                | AccessFs::WriteFile
                | AccessFs::ReadFile
                | AccessFs::ReadDir
                | AccessFs::Truncate
                | AccessFs::RemoveFile,
            "writing snapshots (--snapshot-dir)",
        ));
    }
    a.extend_from_slice(cgroup);
    a
}

/// A rule.
pub fn allow(
    path: impl Into<PathBuf>,
    access: impl Into<BitFlags<AccessFs>>,
    why: &'static str,
) -> Allowed {
    Allowed {
        path: path.into(),
        access: access.into(),
        why,
    }
}

/// A path's directory (`.` for a bare file name).
pub fn parent(p: &Path) -> Option<PathBuf> {
    match p.parent() {
        Some(d) if d.as_os_str().is_empty() => Some(PathBuf::from(".")),
        d => d.map(Path::to_path_buf),
    }
}

/// Builds the ruleset (before any thread of the VM starts). `selftest`: test only, a path the
/// main thread tries to open once restricted (`--landlock-selftest`).
pub fn init(
    mode: Mode,
    cfg: &crate::config::VmConfig,
    cgroup: &[Allowed],
    selftest: Option<&Path>,
) -> Result<(), String> {
    if let Some(p) = selftest {
        let _ = SELFTEST.set(p.to_path_buf());
    }
    if let Some(d) = &cfg.snapshot_dir {
        std::fs::create_dir_all(d).map_err(|e| format!("--snapshot-dir {}: {e}", d.display()))?;
    }
    if mode == Mode::Off {
        return Ok(());
    }
    if let Err(why) = kernel_abi() {
        if mode == Mode::Require {
            return Err(format!("--landlock require: {why}"));
        }
        eprintln!("exitless: landlock: {why}; running without file restrictions (--landlock off says nothing)");
        return Ok(());
    }
    // Written at the end by a restricted thread, which may write it but not create it.
    if let Some(p) = &cfg.stats_json {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
    }
    let ruleset = build(&allowed(cfg, cgroup)).map_err(|e| format!("landlock: {e}"))?;
    let _ = STATE.set(State {
        mode,
        ruleset: Mutex::new(ruleset),
    });
    Ok(())
}

/// Whether the VM's threads are restricted (Landlock on and enforced by this kernel).
pub fn active() -> bool {
    STATE.get().is_some()
}

fn build(allowed: &[Allowed]) -> Result<RulesetCreated, landlock::RulesetError> {
    let handled = AccessFs::from_all(TARGET);
    let mut r = landlock::Ruleset::default()
        .handle_access(handled)?
        .handle_access(AccessNet::from_all(TARGET))?
        .create()?;
    for a in allowed {
        // A file that does not exist (e.g. /proc/vmstat in a jail) needs no rule.
        let Ok(fd) = PathFd::new(&a.path) else {
            log::debug!("landlock: {} does not exist", a.path.display());
            continue;
        };
        let kind = std::fs::metadata(&a.path).map(|m| m.file_type());
        // A pipe or socket (`--stats-json /dev/stdout` into a pipe) is no file-system object:
        // Landlock neither takes a rule for it nor restricts opening it.
        if kind.as_ref().is_ok_and(|k| k.is_fifo() || k.is_socket()) {
            continue;
        }
        let is_dir = kind.is_ok_and(|k| k.is_dir());
        let mut access = a.access & handled;
        if !is_dir {
            access &= AccessFs::from_file(TARGET);
        }
        if access.is_empty() {
            continue;
        }
        log::debug!("landlock: {} {:?} ({})", a.path.display(), access, a.why);
        r = r.add_rule(PathBeneath::new(fd, access))?;
    }
    Ok(r)
}

/// Restricts the calling thread (`kind` names it in messages). A no-op with `--landlock off`
/// or where the kernel has no Landlock (`on`).
pub fn restrict_thread(kind: &str) {
    if let Some(state) = STATE.get() {
        restrict(state, kind);
    }
    if let (Some(p), "main") = (SELFTEST.get(), kind) {
        selftest(p);
    }
}

fn restrict(state: &State, kind: &str) {
    let clone = state
        .ruleset
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .try_clone();
    let status = clone
        .map_err(|e| e.to_string())
        .and_then(|r| r.restrict_self().map_err(|e| e.to_string()));
    match status {
        Ok(s) if s.ruleset != RulesetStatus::NotEnforced || state.mode != Mode::Require => {
            log::debug!("landlock ({:?}) on for a {kind} thread", s.ruleset);
        }
        Ok(_) => fatal(kind, "not enforced by this kernel"),
        Err(e) if state.mode == Mode::Require => fatal(kind, &e),
        Err(e) => log::warn!("landlock: the {kind} thread runs unrestricted: {e}"),
    }
}

fn fatal(kind: &str, why: &str) -> ! {
    crate::terminal::restore();
    eprintln!("exitless: landlock: cannot restrict the {kind} thread: {why} (--landlock on runs on without)");
    std::process::exit(1);
}

/// Test only: opens `p` for reading and says what happened.
fn selftest(p: &Path) {
    match std::fs::File::open(p) {
        Ok(_) => eprintln!("exitless: landlock selftest: {} opened", p.display()),
        Err(e) => eprintln!("exitless: landlock selftest: {} refused: {e}", p.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_socket_name_lives_in_the_current_directory() {
        assert_eq!(parent(Path::new("v.sock")), Some(PathBuf::from(".")));
        assert_eq!(parent(Path::new("/run/x/v.sock")), Some("/run/x".into()));
    }

    /// In a thread of its own (restrictions are per thread and stay): a restricted thread
    /// opens what its rules allow and nothing else.
    #[test]
    fn a_restricted_thread_opens_only_what_is_allowed() {
        if let Err(why) = kernel_abi() {
            return crate::test_skip("a_restricted_thread_opens_only_what_is_allowed", &why);
        }
        let dir = std::env::temp_dir().join(format!("exitless-landlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ok, no) = (dir.join("allowed"), dir.join("other"));
        std::fs::write(&ok, "a").unwrap();
        std::fs::write(&no, "b").unwrap();
        let rules = vec![allow(&ok, AccessFs::ReadFile, "test")];
        let (ok2, no2) = (ok.clone(), no.clone());
        let (a, b) = std::thread::spawn(move || {
            build(&rules).unwrap().restrict_self().unwrap();
            (std::fs::read(&ok2).is_ok(), std::fs::read(&no2).is_ok())
        })
        .join()
        .unwrap();
        assert!(a, "the allowed file was refused");
        assert!(!b, "a file outside the rules was opened");
        // This thread was not restricted.
        assert!(std::fs::read(&no).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
