//! A memory limit for the whole VMM (`--mem-limit SIZE[,swap=SIZE][,cgroup=PATH]`): the host
//! reclaims guest RAM behind the guest's back, as a host under memory pressure does
//! (*uncooperative swapping*, VSWAPPER's setting), so overcommit can be studied and exitless's
//! answers to it (the swap mapper, `devices::virtio::swap_mapper`) measured.
//!
//! Owns one memory cgroup and the process's membership in it; touches nothing else of the
//! cgroup tree. The limit is the kernel's: exitless only creates the group, sets `memory.max`
//! (v2) or `memory.limit_in_bytes` (v1), and moves itself in before guest RAM is mapped (memory
//! is charged to the cgroup of the task that faults it in, so pages touched before the move
//! would stay outside the limit).
//!
//! - **Created** (no `cgroup=`, needs root and a memory controller): cgroup v2 is preferred, a
//!   group `exitless-PID` directly under the v2 root (the only place a controller can be
//!   enabled without moving other processes: "no internal processes"), `+memory` is written to
//!   the root's `cgroup.subtree_control`; else cgroup v1, `exitless-PID` under the v1 memory
//!   hierarchy's root. `swap=SIZE` sets `memory.swap.max` (v2; v1 `memory.memsw.limit_in_bytes`
//!   = limit + swap). When the VM ends, exitless moves back to the cgroup it came from and
//!   removes the group.
//! - **Existing** (`cgroup=PATH`, a directory of a mounted cgroup hierarchy, e.g. one delegated
//!   to the user by systemd: `systemd-run --user --scope -p MemoryMax=100M ...` makes one):
//!   exitless joins it, sets the limit in it when `SIZE` is not 0 (`--mem-limit 0,cgroup=PATH`
//!   keeps the group's own limits) and leaves the group in place at the end.
//!
//! Whatever cannot be done (no cgroup file system, no memory controller, not root, a limit below
//! what the kernel accepts) is a start-up error saying what is missing; nothing is left behind.
//! The host must have swap for anonymous guest pages to be reclaimed at all (without it, the
//! cgroup's OOM killer ends exitless when the guest touches more than the limit); see the README's
//! memory-overcommit section.
//!
//! [`MemCgroup::facts`] reads the group's counters for the run report: `memory.current` /
//! `memory.swap.current`, `pgmajfault`, the refaults of file and anonymous pages
//! (`workingset_refault_*`), and the host's `pswpin`/`pswpout` from /proc/vmstat (host-wide: on
//! a host that runs one VM they are that VM's swap traffic; the bench runs that way).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `--mem-limit` asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemLimitConfig {
    /// Bytes of memory (RAM) the VMM may use; 0 keeps an existing group's limit.
    pub max: u64,
    /// Bytes of swap the VMM may use (None: the kernel's default, unlimited).
    pub swap_max: Option<u64>,
    /// An existing cgroup directory to join instead of creating one.
    pub cgroup: Option<PathBuf>,
}

/// Smallest limit accepted: the VMM's own code and buffers must fit beside some guest RAM.
pub const MIN_LIMIT: u64 = 16 << 20;

/// Parses `SIZE[,swap=SIZE][,cgroup=PATH]`.
pub fn parse(s: &str) -> Result<MemLimitConfig, String> {
    let mut c = MemLimitConfig::default();
    let mut size_seen = false;
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            None if i == 0 => {
                c.max = crate::config::parse_size(part)
                    .map_err(|e| format!("--mem-limit size: {e}"))?;
                size_seen = true;
            }
            Some(("size", v)) => {
                c.max =
                    crate::config::parse_size(v).map_err(|e| format!("--mem-limit size: {e}"))?;
                size_seen = true;
            }
            Some(("swap", v)) => {
                c.swap_max = Some(
                    crate::config::parse_size(v).map_err(|e| format!("--mem-limit swap: {e}"))?,
                )
            }
            Some(("cgroup", v)) if !v.is_empty() => c.cgroup = Some(PathBuf::from(v)),
            _ => {
                return Err(format!(
                    "--mem-limit: {part:?} is not SIZE, swap=SIZE or cgroup=PATH"
                ))
            }
        }
    }
    if !size_seen {
        return Err(
            "--mem-limit needs a size (e.g. 128M; 0 with cgroup=PATH keeps its limits)".into(),
        );
    }
    if c.max == 0 && c.cgroup.is_none() {
        return Err(
            "--mem-limit 0 only makes sense with cgroup=PATH (keep that group's limit)".into(),
        );
    }
    if c.max != 0 && c.max < MIN_LIMIT {
        return Err(format!(
            "--mem-limit {} MiB is below the {} MiB the VMM itself needs",
            c.max >> 20,
            MIN_LIMIT >> 20
        ));
    }
    Ok(c)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The VMM's memory cgroup while the VM runs (see the module doc). Dropping it moves the process
/// back to where it was and removes a group exitless created.
#[derive(Debug)]
pub struct MemCgroup {
    dir: PathBuf,
    version: Version,
    created: bool,
    /// The `cgroup.procs` of the group the process came from.
    back_to: Option<PathBuf>,
}

/// Where the cgroup file systems are mounted and where this process sits in them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    /// The v2 hierarchy's mount point and this process's group in it.
    pub v2: Option<(PathBuf, String)>,
    /// The v1 memory hierarchy's mount point and this process's group in it.
    pub v1_memory: Option<(PathBuf, String)>,
}

impl Mounts {
    /// From /proc/self/mountinfo and /proc/self/cgroup.
    pub fn detect() -> Mounts {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Mounts::parse(&info, &groups)
    }

    fn parse(mountinfo: &str, cgroup: &str) -> Mounts {
        let mut m = Mounts::default();
        let own = |pred: &dyn Fn(&str, &str) -> bool| {
            cgroup.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (id, ctl, path) = (f.next()?, f.next()?, f.next()?);
                pred(id, ctl).then(|| path.to_string())
            })
        };
        for line in mountinfo.lines() {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let point = left.split(' ').nth(4).map(unescape);
            let mut r = right.split(' ');
            let (fstype, superopts) = (r.next(), r.nth(1).unwrap_or(""));
            match (fstype, point) {
                (Some("cgroup2"), Some(p)) if m.v2.is_none() => {
                    if let Some(g) = own(&|id, _| id == "0") {
                        m.v2 = Some((p, g));
                    }
                }
                (Some("cgroup"), Some(p))
                    if m.v1_memory.is_none() && superopts.split(',').any(|o| o == "memory") =>
                {
                    if let Some(g) = own(&|_, ctl| ctl.split(',').any(|c| c == "memory")) {
                        m.v1_memory = Some((p, g));
                    }
                }
                _ => {}
            }
        }
        m
    }
}

/// mountinfo escapes spaces and the like as `\040`.
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

impl MemCgroup {
    /// Puts this process under the limit `cfg` asks for (see the module doc).
    /// What the end of the run still opens (see `sandbox`): the group's files, the group left
    /// for, the parent of a group created here (to remove it).
    pub fn landlock_rules(&self) -> Vec<crate::sandbox::Allowed> {
        use crate::sandbox::allow;
        use landlock::AccessFs;
        let mut r = vec![allow(
            &self.dir,
            AccessFs::ReadFile | AccessFs::WriteFile,
            "the memory cgroup's files",
        )];
        if let Some(b) = &self.back_to {
            r.push(allow(b, AccessFs::WriteFile, "leaving the memory cgroup"));
        }
        if let (true, Some(p)) = (self.created, self.dir.parent()) {
            r.push(allow(p, AccessFs::RemoveDir, "removing the memory cgroup"));
        }
        r
    }

    pub fn enter(cfg: &MemLimitConfig) -> Result<MemCgroup, String> {
        MemCgroup::enter_in(cfg, &Mounts::detect(), std::process::id())
    }

    fn enter_in(cfg: &MemLimitConfig, mounts: &Mounts, pid: u32) -> Result<MemCgroup, String> {
        let (dir, version, created, back_to) = match &cfg.cgroup {
            Some(dir) => {
                let version = if dir.join("memory.max").exists() {
                    Version::V2
                } else if dir.join("memory.limit_in_bytes").exists() {
                    Version::V1
                } else {
                    return Err(format!(
                        "--mem-limit cgroup={}: not a cgroup with the memory controller \
                         (no memory.max or memory.limit_in_bytes there)",
                        dir.display()
                    ));
                };
                let back = own_procs(mounts, version);
                (dir.clone(), version, false, back)
            }
            None => {
                let (root, version) = if let Some((root, _)) = &mounts.v2 {
                    let sub = root.join("cgroup.subtree_control");
                    let has_memory = std::fs::read_to_string(root.join("cgroup.controllers"))
                        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
                    if !has_memory && mounts.v1_memory.is_none() {
                        return Err(format!(
                            "--mem-limit: the cgroup v2 hierarchy at {} has no memory controller \
                             (it may be bound to cgroup v1; pass cgroup=PATH of a memory cgroup)",
                            root.display()
                        ));
                    }
                    if has_memory {
                        write(&sub, "+memory").map_err(|e| {
                            format!("--mem-limit needs root to create a memory cgroup ({e}); run as root or pass cgroup=PATH of a delegated group")
                        })?;
                        (root.clone(), Version::V2)
                    } else {
                        let (r, _) = mounts.v1_memory.clone().unwrap_or_default();
                        (r, Version::V1)
                    }
                } else if let Some((root, _)) = &mounts.v1_memory {
                    (root.clone(), Version::V1)
                } else {
                    return Err(
                        "--mem-limit: no cgroup file system with a memory controller is mounted \
                         (mount cgroup2 on /sys/fs/cgroup)"
                            .into(),
                    );
                };
                let dir = root.join(format!("exitless-{pid}"));
                std::fs::create_dir(&dir).map_err(|e| {
                    format!(
                        "--mem-limit: cannot create the cgroup {} ({e}); it needs root",
                        dir.display()
                    )
                })?;
                (dir, version, true, own_procs(mounts, version))
            }
        };
        let group = MemCgroup {
            dir,
            version,
            created,
            back_to,
        };
        // From here on a failure drops `group`, which removes what was created.
        group.set_limits(cfg)?;
        write(&group.dir.join("cgroup.procs"), &pid.to_string())
            .map_err(|e| format!("--mem-limit: cannot join the cgroup: {e}"))?;
        Ok(group)
    }

    fn set_limits(&self, cfg: &MemLimitConfig) -> Result<(), String> {
        if cfg.max == 0 {
            return Ok(());
        }
        let f = |name: &str| self.dir.join(name);
        let max = cfg.max.to_string();
        match self.version {
            Version::V2 => {
                write(&f("memory.max"), &max)?;
                if let Some(s) = cfg.swap_max {
                    if !f("memory.swap.max").exists() {
                        return Err("--mem-limit swap=: this kernel has no swap accounting \
                             (memory.swap.max; boot with swapaccount=1)"
                            .into());
                    }
                    write(&f("memory.swap.max"), &s.to_string())?;
                }
            }
            Version::V1 => {
                // memsw must stay >= the limit: raise it first, set it last.
                let memsw = f("memory.memsw.limit_in_bytes");
                if cfg.swap_max.is_some() && !memsw.exists() {
                    return Err("--mem-limit swap=: this kernel has no swap accounting \
                         (memory.memsw.limit_in_bytes; boot with swapaccount=1)"
                        .into());
                }
                if memsw.exists() {
                    write(&memsw, "-1")?;
                }
                write(&f("memory.limit_in_bytes"), &max)?;
                if let Some(s) = cfg.swap_max {
                    write(&memsw, &cfg.max.saturating_add(s).to_string())?;
                }
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The group's counters and the host's swap traffic (see the module doc), for the report.
    pub fn facts(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).ok();
        let num = |name: &str| read(name).and_then(|s| s.trim().parse::<u64>().ok());
        let (current, limit, swap) = match self.version {
            Version::V2 => ("memory.current", "memory.max", "memory.swap.current"),
            Version::V1 => (
                "memory.usage_in_bytes",
                "memory.limit_in_bytes",
                "memory.memsw.usage_in_bytes",
            ),
        };
        for (key, file) in [
            ("current_bytes", current),
            ("limit_bytes", limit),
            ("swap_bytes", swap),
        ] {
            if let Some(v) = num(file) {
                out.insert(key, v);
            }
        }
        if let Some(peak) = num("memory.peak").or_else(|| num("memory.max_usage_in_bytes")) {
            out.insert("peak_bytes", peak);
        }
        let stat = read("memory.stat").unwrap_or_default();
        for (key, field) in [
            ("pgmajfault", "pgmajfault"),
            ("refault_anon", "workingset_refault_anon"),
            ("refault_file", "workingset_refault_file"),
            ("file_bytes", "file"),
            ("anon_bytes", "anon"),
        ] {
            if let Some(v) = field_of(&stat, field) {
                out.insert(key, v);
            }
        }
        let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
        for key in ["pswpin", "pswpout"] {
            if let Some(v) = field_of(&vmstat, key) {
                out.insert(
                    if key == "pswpin" {
                        "host_pswpin"
                    } else {
                        "host_pswpout"
                    },
                    v,
                );
            }
        }
        out
    }
}

/// `name value` lines (memory.stat, /proc/vmstat; /proc/meminfo without its colons): the value
/// of `name` (its first word after the name).
pub fn field_of(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name)
            .then(|| v.split_whitespace().next()?.parse().ok())
            .flatten()
    })
}

/// Whether the host has swap (`SwapTotal` of /proc/meminfo above 0; false when unreadable).
pub fn host_has_swap() -> bool {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    field_of(&meminfo.replace(':', ""), "SwapTotal").is_some_and(|kib| kib > 0)
}

/// The `cgroup.procs` of the group this process is in now, in the hierarchy of `version`.
fn own_procs(mounts: &Mounts, version: Version) -> Option<PathBuf> {
    let (root, group) = match version {
        Version::V2 => mounts.v2.as_ref()?,
        Version::V1 => mounts.v1_memory.as_ref()?,
    };
    Some(
        root.join(group.trim_start_matches('/'))
            .join("cgroup.procs"),
    )
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        if let Some(back) = &self.back_to {
            if let Err(e) = write(back, &std::process::id().to_string()) {
                log::debug!("leaving the memory cgroup: {e}");
            }
        }
        if self.created {
            if let Err(e) = std::fs::remove_dir(&self.dir) {
                eprintln!(
                    "exitless: cannot remove the memory cgroup {}: {e}",
                    self.dir.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_swap_and_an_existing_group() {
        assert_eq!(
            parse("128M").unwrap(),
            MemLimitConfig {
                max: 128 << 20,
                swap_max: None,
                cgroup: None
            }
        );
        let c = parse("1G,swap=2G,cgroup=/sys/fs/cgroup/vm").unwrap();
        assert_eq!(c.max, 1 << 30);
        assert_eq!(c.swap_max, Some(2 << 30));
        assert_eq!(c.cgroup.as_deref(), Some(Path::new("/sys/fs/cgroup/vm")));
        assert_eq!(parse("0,cgroup=/g").unwrap().max, 0);
        for bad in [
            "",
            "lots",
            "1M",
            "0",
            "128M,swap=x",
            "128M,color=red",
            "swap=1G",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn finds_the_v2_and_v1_memory_hierarchies() {
        let info = "\
30 23 0:26 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
31 23 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 23 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 23 0:32 / /mnt/with\\040space rw - ext4 /dev/vda rw";
        let groups = "4:memory:/jobs/a\n1:cpu:/\n0::/user.slice\n";
        let m = Mounts::parse(info, groups);
        assert_eq!(
            m.v2,
            Some((
                PathBuf::from("/sys/fs/cgroup/unified"),
                "/user.slice".into()
            ))
        );
        assert_eq!(
            m.v1_memory,
            Some((PathBuf::from("/sys/fs/cgroup/memory"), "/jobs/a".into()))
        );
        assert_eq!(
            unescape("/mnt/with\\040space"),
            PathBuf::from("/mnt/with space")
        );
        assert_eq!(Mounts::parse("", ""), Mounts::default());
    }

    /// A fake v2 root (plain files in a temporary directory): what exitless writes where, and
    /// that the group goes away at the end.
    #[test]
    fn creates_limits_joins_and_removes_a_v2_group() {
        let root = std::env::temp_dir().join(format!("exitless-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("user")).unwrap();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory io\n").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let mounts = Mounts {
            v2: Some((root.clone(), "/user".into())),
            v1_memory: None,
        };
        let dir = root.join("exitless-77");
        // The kernel creates a group's files; the fake's group is made first, so mkdir fails:
        // a clear error, nothing written.
        std::fs::create_dir(&dir).unwrap();
        let e = MemCgroup::enter_in(&parse("64M").unwrap(), &mounts, 77).unwrap_err();
        assert!(e.contains("cannot create the cgroup"), "{e}");
        std::fs::remove_dir(&dir).unwrap();
        // An existing group without a memory controller is refused by name.
        let e = MemCgroup::enter_in(
            &parse(&format!("64M,cgroup={}", root.join("user").display())).unwrap(),
            &mounts,
            77,
        )
        .unwrap_err();
        assert!(e.contains("not a cgroup with the memory controller"), "{e}");
        // An existing group that has one: limits written, joined, left in place.
        let g = root.join("user");
        for f in [
            "memory.max",
            "memory.swap.max",
            "cgroup.procs",
            "memory.current",
        ] {
            std::fs::write(g.join(f), "").unwrap();
        }
        std::fs::write(
            g.join("memory.stat"),
            "anon 4096\nfile 8192\npgmajfault 3\n",
        )
        .unwrap();
        let cfg = parse(&format!("64M,swap=32M,cgroup={}", g.display())).unwrap();
        let cg = MemCgroup::enter_in(&cfg, &mounts, 77).unwrap();
        assert_eq!(
            std::fs::read_to_string(g.join("memory.max")).unwrap(),
            "67108864"
        );
        assert_eq!(
            std::fs::read_to_string(g.join("memory.swap.max")).unwrap(),
            "33554432"
        );
        assert_eq!(
            std::fs::read_to_string(g.join("cgroup.procs")).unwrap(),
            "77"
        );
        let facts = cg.facts();
        assert_eq!(facts.get("pgmajfault"), Some(&3));
        assert_eq!(facts.get("file_bytes"), Some(&8192));
        assert_eq!(cg.version(), Version::V2);
        drop(cg);
        assert!(g.exists(), "an existing group is left in place");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn counters_are_read_by_name() {
        let t = "pgfault 10\npgmajfault 7\npswpin 12\n";
        assert_eq!(field_of(t, "pgmajfault"), Some(7));
        assert_eq!(field_of(t, "pswpin"), Some(12));
        assert_eq!(field_of(t, "pswp"), None);
        // /proc/meminfo's form once its colons are gone: the number, not the unit.
        assert_eq!(
            field_of("SwapTotal       1048572 kB\n", "SwapTotal"),
            Some(1048572)
        );
    }
}
