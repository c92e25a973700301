//! `exitless bench irq`: the ELI thesis's Table 3.1 and 3.2 (interrupts, the exits they cost and
//! the time a guest keeps) and its Fig 3.6 coalescing sweep, with a real Linux guest over
//! virtio-net on a tap.
//!
//! One VM per configuration boots the Debian guest (its initramfs plus this very binary, which
//! is the guest's load generator: `exitless bench irq-load`) inside a network namespace whose tap
//! has the host's address; the bench's own threads in that namespace are the peers: a TCP sink
//! and a UDP echo. Typed into the guest's console, one after the other:
//! - **stream**: a TCP stream of 256-byte writes from the guest to the host (Netperf's
//!   TCP_STREAM with the thesis's message size), for `--seconds`;
//! - **rr**: UDP request–response, one 64-byte datagram in flight (Netperf's UDP_RR): the
//!   transactions per second and the mean round-trip latency (Table 3.2).
//!
//! Around each workload the bench reads KVM's per-vCPU statistics (exitless: its control socket's
//! `stats`; QEMU: QMP `query-stats`, the same counters from the same kernel), the vCPU threads'
//! CPU time split into guest and host time (`/proc/PID/task/TID/stat`: `guest_time` against
//! `utime + stime`, for the threads named `vcpuN` or QEMU's `CPU N/KVM`), and the guest reports
//! the interrupts it took (`/proc/stat`'s `intr` total) and its throughput. Exits per interrupt
//! are KVM's `exits` over the guest's interrupts; injections and IRQ-window exits are KVM's
//! `irq_injections` and `irq_window_exits`.
//!
//! Configurations: **baseline** (`--pv-eoi off --x2apic off`, `coalesce=off`,
//! `--queue-poll-us 0`, HLT exits on), **delivery-only** (moderation and polling on, completion
//! still by trapped xAPIC EOIs), **full** (everything on: x2APIC, PV EOI, moderation, polling,
//! `--dedicated-cores`), and **qemu** (`-M q35 -accel kvm -cpu host`,
//! `virtio-net-pci` on a tap netdev in the same namespace, same kernel and initramfs). The sweep
//! boots the full configuration once per `coalesce=adaptive:T`.
//!
//! Absolute numbers on the emulated SVM host mean little (TCG); the ratios between
//! configurations measured in the same run are the result.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use super::{find_program, read_lossy, round1, round3, tail, wait_with_limit, Peer, TempDir};

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const STREAM_PORT: u16 = 5201;
const RR_PORT: u16 = 5202;
/// Netperf-like message sizes: the thesis's 256-byte writes; a small RR datagram.
const STREAM_WRITE: usize = 256;
const RR_SIZE: usize = 64;

/// Arguments of `exitless bench irq`.
#[derive(Args, Debug, Clone)]
pub struct IrqArgs {
    /// Print one JSON array on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Also run the same guest under this VMM (virtio-net-pci on a tap netdev).
    #[arg(long, value_enum)]
    pub vs: Option<Peer>,
    /// Seconds each workload runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub seconds: u32,
    /// Boot every configuration this many times and keep each one's best throughput.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub rounds: u32,
    /// The coalescing caps T (µs) of the sweep, comma-separated; empty: no sweep.
    #[arg(long, default_value = "16,32,64,96")]
    pub sweep: String,
    /// The guest kernel.
    #[arg(long, default_value = "images/debian/vmlinuz")]
    pub kernel: PathBuf,
    /// The guest's initramfs (this binary and its libraries are appended to it).
    #[arg(long, default_value = "images/debian/initrd.img")]
    pub initrd: PathBuf,
    /// Guest memory.
    #[arg(long, default_value = "512M", value_parser = crate::config::parse_size)]
    pub mem: u64,
    /// Time limit of one VM (boot and both workloads), in seconds.
    #[arg(long, default_value_t = 900.0)]
    pub timeout: f64,
}

/// Arguments of `exitless bench irq-load` (runs in the guest).
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// `stream` (TCP, 256-byte writes) or `rr` (UDP request-response).
    pub workload: String,
    #[arg(long, default_value = HOST_IP)]
    pub host: String,
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
}

// --- the guest side ------------------------------------------------------------------------

/// The interrupts this kernel has taken (`/proc/stat`'s `intr` total).
fn interrupts_taken() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("intr "))
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// `exitless bench irq-load`: runs a workload and prints `=R=` lines (bytes or transactions,
/// seconds, interrupts taken meanwhile).
pub fn load(args: &LoadArgs) -> Result<(), String> {
    let dur = Duration::from_secs(u64::from(args.seconds));
    let intr0 = interrupts_taken();
    let start = Instant::now();
    let (work, lat_us) = match args.workload.as_str() {
        "stream" => {
            let mut s = std::net::TcpStream::connect((args.host.as_str(), STREAM_PORT))
                .map_err(|e| format!("connect: {e}"))?;
            let buf = [0x5au8; STREAM_WRITE];
            let mut bytes = 0u64;
            while start.elapsed() < dur {
                for _ in 0..64 {
                    s.write_all(&buf).map_err(|e| format!("send: {e}"))?;
                    bytes += STREAM_WRITE as u64;
                }
            }
            (bytes, 0.0)
        }
        "rr" => {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
            s.connect((args.host.as_str(), RR_PORT))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let req = [0x33u8; RR_SIZE];
            let mut resp = [0u8; 2048];
            let mut n = 0u64;
            let mut lost = 0u64;
            while start.elapsed() < dur {
                s.send(&req).map_err(|e| format!("send: {e}"))?;
                match s.recv(&mut resp) {
                    Ok(_) => n += 1,
                    Err(_) => lost += 1,
                }
            }
            println!("=R= lost {lost}");
            let secs = start.elapsed().as_secs_f64();
            (n, secs * 1e6 / n.max(1) as f64)
        }
        w => return Err(format!("unknown workload {w:?} (stream, rr)")),
    };
    let secs = start.elapsed().as_secs_f64();
    let intr = interrupts_taken().saturating_sub(intr0);
    println!("=R= work {work}");
    println!("=R= seconds {secs:.4}");
    println!("=R= latency_us {lat_us:.2}");
    println!("=R= interrupts {intr}");
    Ok(())
}

// --- the host side: peers in the namespace -------------------------------------------------

/// Moves the calling thread into network namespace `ns` (`ip netns add` made it).
fn enter_netns(ns: &str) -> Result<(), String> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .map_err(|e| format!("network namespace {ns}: {e}"))?;
    // SAFETY: setns on a namespace descriptor we hold open; it changes this thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes `c`'s child enter network namespace `ns` (and only that: `ip netns exec` would also
/// remount /sys, hiding tracefs from `--kernel-exit-reasons`). The returned file must stay open
/// until the child is spawned.
pub(super) fn in_netns(c: &mut Command, ns: &str) -> Result<std::fs::File, String> {
    use std::os::unix::process::CommandExt;
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .map_err(|e| format!("network namespace {ns}: {e}"))?;
    let fd = f.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only setns(2), which
    // is async-signal-safe, on a descriptor the parent keeps open until the spawn.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(f)
}

/// The host's side of the guest's network: a namespace whose tap has [`HOST_IP`], with the TCP
/// sink and the UDP echo running in it (`bench iommu`'s Linux part uses it too).
pub(super) fn host_side() -> Result<super::io::Netns, String> {
    let ns = super::io::Netns::create()?;
    super::io::netns_ip(
        &ns.name,
        &["addr", "add", &format!("{HOST_IP}/24"), "dev", &ns.tap],
    )?;
    start_peers(&ns.name)?;
    Ok(ns)
}

/// Starts the TCP sink and the UDP echo in `ns` (threads that live as long as the bench).
fn start_peers(ns: &str) -> Result<(), String> {
    let ns = ns.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = enter_netns(&ns).and_then(|_| {
            let tcp = TcpListener::bind((HOST_IP, STREAM_PORT)).map_err(|e| e.to_string())?;
            let udp = UdpSocket::bind((HOST_IP, RR_PORT)).map_err(|e| e.to_string())?;
            Ok((tcp, udp))
        });
        let (tcp, udp) = match r {
            Ok(p) => {
                let _ = tx.send(Ok(()));
                p
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        std::thread::spawn(move || {
            let mut b = [0u8; 2048];
            loop {
                if let Ok((n, from)) = udp.recv_from(&mut b) {
                    let _ = udp.send_to(&b[..n], from);
                }
            }
        });
        for s in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut b = vec![0u8; 1 << 16];
                while matches!(s.read(&mut b), Ok(n) if n > 0) {}
            });
        }
    });
    rx.recv()
        .map_err(|_| "the peer thread ended".to_string())?
        .map_err(|e| format!("host peers: {e}"))
}

// --- configurations ------------------------------------------------------------------------

/// A VM the bench boots.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub name: String,
    pub qemu: bool,
    /// Extra `exitless run` options.
    pub options: Vec<String>,
    /// The workloads it runs.
    pub rr: bool,
}

/// The table's configurations, and the sweep's (full with `coalesce=adaptive:T`).
pub fn configs(tap: &str, peer: bool, sweep: &[u32], run_help: &str) -> Vec<Config> {
    // The completion options land with the other half of this work; used where this binary
    // has them.
    let has = |o: &str| run_help.contains(o);
    let completion = |on: bool| -> Vec<String> {
        let v = if on { "on" } else { "off" };
        ["--pv-eoi", "--x2apic"]
            .iter()
            .filter(|o| has(o))
            .flat_map(|o| [o.to_string(), v.to_string()])
            .collect()
    };
    let net = |c: &str| vec!["--net".to_string(), format!("tap={tap},coalesce={c}")];
    // ELI's dedicated core: HLT stays in the guest (where the binary and host have it).
    let dedicated: Vec<String> = if has("--dedicated-cores") {
        vec!["--dedicated-cores".into()]
    } else {
        vec![]
    };
    // KVM's exits by SVM/VMX reason (the tracepoint counters), where the binary has them: the
    // table then says which exits each interrupt still costs. Where the host cannot trace, the
    // run says why and keeps KVM's aggregate counters.
    let traced: Vec<String> = if has("--kernel-exit-reasons") {
        vec!["--kernel-exit-reasons".into()]
    } else {
        vec![]
    };
    let mk = |name: &str, opts: Vec<String>| Config {
        name: name.into(),
        qemu: false,
        options: [opts, traced.clone()].concat(),
        rr: true,
    };
    let mut v = vec![
        mk(
            "baseline",
            [
                completion(false),
                net("off"),
                vec!["--queue-poll-us".into(), "0".into()],
            ]
            .concat(),
        ),
        mk(
            "delivery-only",
            [completion(false), net("adaptive")].concat(),
        ),
        mk(
            "full",
            [completion(true), net("adaptive"), dedicated.clone()].concat(),
        ),
    ];
    if peer {
        v.push(Config {
            name: "qemu".into(),
            qemu: true,
            options: vec![],
            rr: true,
        });
    }
    for t in sweep {
        v.push(Config {
            name: format!("full T={t}"),
            qemu: false,
            options: [
                completion(true),
                net(&format!("adaptive:{t}")),
                dedicated.clone(),
                traced.clone(),
            ]
            .concat(),
            rr: false,
        });
    }
    v
}

// --- one VM --------------------------------------------------------------------------------

/// KVM's counters and the vCPU threads' CPU time at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    kvm: BTreeMap<String, u64>,
    /// (guest ticks, all ticks) of the vCPU threads.
    ticks: (u64, u64),
    at: Option<Instant>,
}

/// The vCPU threads' `guest_time` and `utime + stime` (clock ticks).
fn vcpu_ticks(pid: u32) -> (u64, u64) {
    let mut g = 0;
    let mut all = 0;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        let vcpu = comm.starts_with("vcpu") || (comm.starts_with("CPU ") && comm.ends_with("/KVM"));
        if !vcpu {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: state is field 3.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // utime 14, stime 15, guest_time 43 (1-based); rest starts at field 3.
        let at = |n: usize| f.get(n - 3).copied().unwrap_or(0);
        all += at(14) + at(15);
        g += at(43);
    }
    (g, all)
}

/// A running VM: its console (a file), its stdin, its statistics source.
struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    console: PathBuf,
    errors: PathBuf,
    socket: PathBuf,
    qemu: bool,
    qmp: Option<(
        std::os::unix::net::UnixStream,
        BufReader<std::os::unix::net::UnixStream>,
    )>,
    steps: u32,
}

impl Vm {
    fn start(
        cfg: &Config,
        program: &Path,
        ns: &str,
        tap: &str,
        args: &IrqArgs,
        initrd: &Path,
        dir: &Path,
    ) -> Result<Vm, String> {
        let tag: String = cfg.name.chars().filter(|c| c.is_alphanumeric()).collect();
        let f = |w: &str| dir.join(format!("{tag}-{w}"));
        let (console, errors, socket) = (f("console.log"), f("stderr.log"), f("control.sock"));
        let _ = std::fs::remove_file(&socket);
        let s = |p: &Path| p.display().to_string();
        let mem = format!("{}", args.mem >> 20);
        let cmdline = "console=ttyS0 quiet";
        let mut c = Command::new(program);
        let _netns = in_netns(&mut c, ns)?;
        if cfg.qemu {
            c.args([
                "-M",
                "q35",
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-m",
                &mem,
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                // Named threads ("CPU 0/KVM"): the vCPU threads' time is read by name.
                "-name",
                "irq-bench,debug-threads=on",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-kernel",
                &s(&args.kernel),
                "-initrd",
                &s(initrd),
                "-append",
                cmdline,
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
                "-qmp",
                &format!("unix:{},server=on,wait=off", s(&socket)),
            ]);
        } else {
            c.args([
                "run",
                "--kernel",
                &s(&args.kernel),
                "--initrd",
                &s(initrd),
                "--mem",
                &format!("{mem}M"),
                "--cpus",
                "1",
                "--no-summary",
                "--api-socket",
                &s(&socket),
                "--timeout",
                &format!("{}", args.timeout),
            ]);
            c.args(&cfg.options);
        }
        let out = std::fs::File::create(&console).map_err(|e| e.to_string())?;
        let err = std::fs::File::create(&errors).map_err(|e| e.to_string())?;
        let child = c
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let mut vm = Vm {
            stdin: None,
            child,
            console,
            errors,
            socket,
            qemu: cfg.qemu,
            qmp: None,
            steps: 0,
        };
        vm.stdin = vm.child.stdin.take();
        Ok(vm)
    }

    fn text(&self) -> String {
        read_lossy(&self.console)
    }

    /// Waits until the console shows `what` after byte `from`; returns where it ends.
    fn wait_for(&mut self, what: &str, from: usize, limit: Duration) -> Result<usize, String> {
        let start = Instant::now();
        loop {
            let t = self.text();
            if let Some(at) = t.get(from..).and_then(|s| s.find(what)) {
                return Ok(from + at + what.len());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("the VMM ended ({st}) before {what:?}"));
            }
            if start.elapsed() > limit {
                return Err(format!("no {what:?} within {} s", limit.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `cmd`, then waits for its end marker; returns the console text it printed.
    fn step(&mut self, cmd: &str, limit: Duration) -> Result<String, String> {
        self.steps += 1;
        let from = self.text().len();
        let marker = format!("=R= step{}", self.steps);
        let line = format!("{cmd}; r step{}\n", self.steps);
        let w = self.stdin.as_mut().ok_or("no console input")?;
        w.write_all(line.as_bytes())
            .and_then(|_| w.flush())
            .map_err(|e| format!("typing into the console: {e}"))?;
        let end = self.wait_for(&marker, from, limit)?;
        Ok(self.text()[from..end].to_string())
    }

    fn qmp_call(&mut self, cmd: Value) -> Result<Value, String> {
        if self.qmp.is_none() {
            let s = std::os::unix::net::UnixStream::connect(&self.socket)
                .map_err(|e| format!("QMP: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
            self.qmp = Some((s, r));
            self.qmp_call(json!({"execute": "qmp_capabilities"}))?;
        }
        let (w, r) = self.qmp.as_mut().expect("connected");
        super::io::qmp_command(w, r, &cmd)
    }

    fn snapshot(&mut self) -> Result<Snapshot, String> {
        let kvm = if self.qemu {
            let ret =
                self.qmp_call(json!({"execute": "query-stats", "arguments": {"target": "vcpu"}}))?;
            super::io::kvm_stats_of(&ret)?
        } else {
            let reply = crate::api::request(&self.socket, &crate::api::Call::Stats)?;
            let mut kvm: BTreeMap<String, u64> = reply["kvm"]
                .as_object()
                .ok_or_else(|| format!("no KVM statistics from exitless: {reply}"))?
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect();
            kvm.extend(traced_sums(&reply));
            kvm
        };
        Ok(Snapshot {
            kvm,
            ticks: vcpu_ticks(self.child.id()),
            at: Some(Instant::now()),
        })
    }

    fn stop(mut self) {
        drop(self.stdin.take());
        if self.qemu {
            let _ = self.qmp_call(json!({"execute": "quit"}));
        } else {
            let _ = crate::api::request(&self.socket, &crate::api::Call::Quit);
        }
        let _ = wait_with_limit(&mut self.child, Duration::from_secs(20));
    }

    fn context(&self) -> String {
        format!(
            "\n  last console lines:\n{}\n  the VMM said:\n{}",
            tail(&self.text(), 8),
            tail(&read_lossy(&self.errors), 6)
        )
    }
}

/// The exits by SVM/VMX reason (`kvm_exit.<reason>`, counted per vCPU where traced) summed
/// over the vCPUs of a stats reply.
fn traced_sums(reply: &Value) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    let vcpus = reply["vcpus"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for v in vcpus {
        let Some(kvm) = v["kvm"].as_object() else {
            continue;
        };
        for (k, n) in kvm {
            if let (true, Some(n)) = (k.starts_with(crate::rates::TRACED_PREFIX), n.as_u64()) {
                *sums.entry(k.clone()).or_insert(0) += n;
            }
        }
    }
    sums
}

/// One workload's measurement under one configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Measure {
    pub config: String,
    pub workload: String,
    /// Mbit/s (stream) or transactions/s (rr).
    pub throughput: f64,
    pub unit: &'static str,
    /// rr: mean round trip (µs).
    pub latency_us: Option<f64>,
    pub exits_per_s: f64,
    pub interrupts_per_s: f64,
    pub injections_per_s: f64,
    pub irq_window_exits_per_s: f64,
    pub halt_exits_per_s: f64,
    pub time_in_guest: Option<f64>,
    /// Exits per unit of work: per 256-byte write (stream) or per transaction (rr).
    pub exits_per_work: f64,
    /// KVM's exits by reason (its `*_exits` counters, `insn_emulation`, `hypercalls`) per second.
    pub by_reason: BTreeMap<String, f64>,
}

impl Measure {
    pub fn exits_per_interrupt(&self) -> f64 {
        self.exits_per_s / self.interrupts_per_s.max(1e-9)
    }
}

/// The measure of one workload from the snapshots around it and the guest's own report.
pub fn measure(
    config: &str,
    workload: &str,
    before: &Snapshot,
    after: &Snapshot,
    guest: &BTreeMap<String, String>,
) -> Result<Measure, String> {
    let g = |k: &str| -> Result<f64, String> {
        guest
            .get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("the guest's load generator reported no {k}"))
    };
    let work = g("work")?;
    let secs = g("seconds")?.max(1e-6);
    let wall = match (before.at, after.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-6),
        _ => secs,
    };
    let d = |k: &str| {
        after.kvm.get(k).copied().unwrap_or(0) as f64
            - before.kvm.get(k).copied().unwrap_or(0) as f64
    };
    let exits = d("exits");
    let (gt, all) = (
        after.ticks.0.saturating_sub(before.ticks.0),
        after.ticks.1.saturating_sub(before.ticks.1),
    );
    let stream = workload == "stream";
    let units = if stream {
        work / STREAM_WRITE as f64
    } else {
        work
    };
    Ok(Measure {
        config: config.into(),
        workload: workload.into(),
        throughput: if stream {
            work * 8.0 / secs / 1e6
        } else {
            work / secs
        },
        unit: if stream { "Mbit/s" } else { "trans/s" },
        latency_us: (!stream).then(|| g("latency_us").unwrap_or(0.0)),
        exits_per_s: exits / wall,
        interrupts_per_s: g("interrupts")? / secs,
        injections_per_s: d("irq_injections") / wall,
        irq_window_exits_per_s: d("irq_window_exits") / wall,
        halt_exits_per_s: d("halt_exits") / wall,
        time_in_guest: (all > 0).then(|| (gt as f64 / all as f64).min(1.0)),
        exits_per_work: exits / units.max(1.0),
        by_reason: after
            .kvm
            .keys()
            .filter(|k| {
                k.ends_with("_exits")
                    || *k == "insn_emulation"
                    || *k == "hypercalls"
                    || k.starts_with(crate::rates::TRACED_PREFIX)
            })
            .map(|k| (k.clone(), d(k) / wall))
            .filter(|(_, v)| *v > 0.0)
            .collect(),
    })
}

/// Boots `cfg`, runs its workloads, returns their measures.
#[allow(clippy::too_many_arguments)]
fn run_config(
    cfg: &Config,
    program: &Path,
    ns: &str,
    tap: &str,
    args: &IrqArgs,
    initrd: &Path,
    dir: &Path,
) -> Result<Vec<Measure>, String> {
    let mut vm = Vm::start(cfg, program, ns, tap, args, initrd, dir)?;
    let r = drive(&mut vm, cfg, args);
    let r = r.map_err(|e| format!("{e}{}", vm.context()));
    vm.stop();
    r
}

/// The guest's shell command that brings its first network interface up (its name in `$d`) with
/// [`GUEST_IP`] and pings the host: `=R= net 0` when it works.
pub(super) fn net_up_command() -> String {
    format!(
        "d=$(ls /sys/class/net | grep -v '^lo$' | head -n 1); ip link set $d up && \
         ip addr add {GUEST_IP}/24 dev $d && ping -c 1 -W 20 {HOST_IP} >/dev/null; r net $?"
    )
}

/// The guest's shell command that runs workload `w` (`stream`, `rr`) against the host's peers.
pub(super) fn load_command(w: &str, seconds: u32) -> String {
    format!("exitless bench irq-load {w} --host {HOST_IP} --seconds {seconds}")
}

fn drive(vm: &mut Vm, cfg: &Config, args: &IrqArgs) -> Result<Vec<Measure>, String> {
    let boot = Duration::from_secs_f64(args.timeout);
    let at = vm.wait_for("exitless-guest: nproc=", 0, boot)?;
    vm.wait_for("exitless# ", at, boot)?;
    let step = Duration::from_secs(120);
    vm.step("stty -echo; dmesg -n 1; r() { echo \"=R= $*\"; }", step)?;
    let out = vm.step(&net_up_command(), step)?;
    if !out.contains("=R= net 0") {
        return Err(format!("the guest's network did not come up: {out}"));
    }
    let mut v = Vec::new();
    let workloads: &[&str] = if cfg.rr {
        &["stream", "rr"]
    } else {
        &["stream"]
    };
    for w in workloads {
        let before = vm.snapshot()?;
        let out = vm.step(
            &load_command(w, args.seconds),
            Duration::from_secs(u64::from(args.seconds) * 20 + 120),
        )?;
        let after = vm.snapshot()?;
        let res = super::results(&out);
        v.push(
            measure(&cfg.name, w, &before, &after, &res).map_err(|e| format!("{w}: {e}: {out}"))?,
        );
    }
    Ok(v)
}

// --- report --------------------------------------------------------------------------------

pub fn to_json(m: &[Measure]) -> Value {
    Value::Array(
        m.iter()
            .map(|m| {
                json!({
                    "config": m.config,
                    "workload": m.workload,
                    "throughput": round3(m.throughput),
                    "throughput_unit": m.unit,
                    "latency_us": m.latency_us.map(round3),
                    "exits_per_s": round1(m.exits_per_s),
                    "exits_per_interrupt": round3(m.exits_per_interrupt()),
                    "interrupts_per_s": round1(m.interrupts_per_s),
                    "injections_per_s": round1(m.injections_per_s),
                    "irq_window_exits_per_s": round1(m.irq_window_exits_per_s),
                    "halt_exits_per_s": round1(m.halt_exits_per_s),
                    "time_in_guest": m.time_in_guest.map(round3),
                    "exits_per_work": round3(m.exits_per_work),
                    "exits_by_reason_per_s": m.by_reason.iter()
                        .map(|(k, v)| (k.clone(), json!(round1(*v))))
                        .collect::<serde_json::Map<String, Value>>(),
                })
            })
            .collect(),
    )
}

fn cell(x: Option<f64>, prec: usize) -> String {
    x.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

/// Table 3.1/3.2-style: one column per configuration, a block per workload; then the sweep.
pub fn table(m: &[Measure]) -> String {
    let mut s = String::new();
    for w in ["stream", "rr"] {
        let cols: Vec<&Measure> = m
            .iter()
            .filter(|x| x.workload == w && !x.config.starts_with("full T="))
            .collect();
        if cols.is_empty() {
            continue;
        }
        let title = if w == "stream" {
            "TCP stream, 256-byte writes guest -> host (Table 3.1)"
        } else {
            "UDP request-response, 64 bytes (Table 3.2)"
        };
        s += &format!("\n{title}\n{:<22}", "");
        for c in &cols {
            s += &format!("{:>14}", c.config);
        }
        s += "\n";
        let base = cols.first().map(|c| c.exits_per_work).unwrap_or(0.0);
        let qemu = cols.iter().find(|c| c.config == "qemu");
        let mut row = |name: &str, f: &dyn Fn(&Measure) -> String| {
            s += &format!("{name:<22}");
            for c in &cols {
                s += &format!("{:>14}", f(c));
            }
            s += "\n";
        };
        row(&format!("throughput ({})", cols[0].unit), &|c| {
            format!("{:.2}", c.throughput)
        });
        if w == "rr" {
            row("latency (µs)", &|c| cell(c.latency_us, 1));
        }
        row("exits/s", &|c| format!("{:.0}", c.exits_per_s));
        row("exits/interrupt", &|c| {
            format!("{:.2}", c.exits_per_interrupt())
        });
        row("interrupts/s", &|c| format!("{:.0}", c.interrupts_per_s));
        row("injections/s", &|c| format!("{:.0}", c.injections_per_s));
        row("IRQ-window exits/s", &|c| {
            format!("{:.0}", c.irq_window_exits_per_s)
        });
        row("halt exits/s", &|c| format!("{:.0}", c.halt_exits_per_s));
        row("time in guest", &|c| {
            cell(c.time_in_guest.map(|t| t * 100.0), 1) + "%"
        });
        let unit = if w == "stream" { "write" } else { "trans." };
        row(&format!("exits per {unit}"), &|c| {
            format!("{:.3}", c.exits_per_work)
        });
        row("vs baseline exits/work", &|c| {
            format!("{:.2}x", c.exits_per_work / base.max(1e-9))
        });
        if let Some(q) = qemu {
            row("vs qemu throughput", &|c| {
                format!("{:.2}x", c.throughput / q.throughput.max(1e-9))
            });
            row("vs qemu exits/work", &|c| {
                format!("{:.2}x", c.exits_per_work / q.exits_per_work.max(1e-9))
            });
        }
        for c in &cols {
            s += &by_reason_lines(c);
        }
    }
    let sweep: Vec<&Measure> = m
        .iter()
        .filter(|x| x.config.starts_with("full T="))
        .collect();
    if !sweep.is_empty() {
        s += "\nCoalescing sweep (Fig 3.6), TCP stream, full configuration with coalesce=adaptive:T\n";
        s += &format!(
            "{:<12}{:>14}{:>14}{:>14}{:>16}{:>14}\n",
            "T (µs)", "Mbit/s", "interrupts/s", "exits/s", "exits/interrupt", "in guest"
        );
        for c in sweep {
            s += &format!(
                "{:<12}{:>14.2}{:>14.0}{:>14.0}{:>16.2}{:>14}\n",
                c.config.trim_start_matches("full T="),
                c.throughput,
                c.interrupts_per_s,
                c.exits_per_s,
                c.exits_per_interrupt(),
                cell(c.time_in_guest.map(|t| t * 100.0), 1) + "%"
            );
        }
    }
    s
}

/// A configuration's exits by reason: KVM's aggregate counters per second, and where traced
/// the SVM/VMX reasons per interrupt (what each interrupt still costs, by cause).
fn by_reason_lines(c: &Measure) -> String {
    let prefix = crate::rates::TRACED_PREFIX;
    let top = |traced: bool, per: f64, prec: usize| -> Vec<String> {
        let mut r: Vec<(&String, &f64)> = c
            .by_reason
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) == traced)
            .collect();
        r.sort_by(|a, b| b.1.total_cmp(a.1));
        r.iter()
            .take(8)
            .map(|(k, v)| format!("{} {:.prec$}", k.trim_start_matches(prefix), *v / per))
            .collect()
    };
    let mut s = format!(
        "  {} exits/s by counter: {}\n",
        c.config,
        top(false, 1.0, 0).join(", ")
    );
    let traced = top(true, c.interrupts_per_s.max(1e-9), 2);
    if !traced.is_empty() {
        s += &format!(
            "  {} exits per interrupt by exit reason: {}\n",
            c.config,
            traced.join(", ")
        );
    }
    s
}

/// Keeps, per configuration and workload, the measure with the best throughput.
fn best(all: Vec<Measure>) -> Vec<Measure> {
    let mut out: Vec<Measure> = Vec::new();
    for m in all {
        match out
            .iter_mut()
            .find(|o| o.config == m.config && o.workload == m.workload)
        {
            Some(o) if o.throughput >= m.throughput => {}
            Some(o) => *o = m,
            None => out.push(m),
        }
    }
    out
}

/// Runs `exitless bench irq`.
pub fn run(args: &IrqArgs) -> Result<(), String> {
    let sweep: Vec<u32> = args
        .sweep
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|t| (1..=crate::devices::virtio::moderation::MAX_CAP_US).contains(t))
                .ok_or_else(|| format!("--sweep {s:?}: not a cap in µs (1..=1000)"))
        })
        .collect::<Result<_, _>>()?;
    for (what, p) in [("--kernel", &args.kernel), ("--initrd", &args.initrd)] {
        if !p.is_file() {
            return Err(format!(
                "{what} {}: not found (tools/debian-guest.sh images/debian builds it)",
                p.display()
            ));
        }
    }
    let kvm = crate::vmm::open_kvm().map_err(|e| e.to_string())?;
    if crate::host::HostInfo::detect(&kvm).pvm.is_some() {
        return Err(
            "this host's KVM is PVM, where a Linux guest's userspace does not run: run \
                    the bench where KVM is hardware-style, e.g. tools/svm-host.sh exitless \
                    bench irq --vs qemu"
                .into(),
        );
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
    let qemu = match args.vs {
        Some(Peer::Qemu) => Some(find_program("qemu-system-x86_64").ok_or(
            "--vs qemu: qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)",
        )?),
        None => None,
    };
    let help = Command::new(&exe)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let ns = host_side()?;
    let dir = TempDir::new("exitless-bench-irq").map_err(|e| format!("temporary dir: {e}"))?;
    let initrd = dir.path().join("initrd-irq.img");
    super::nested::initrd_with_exitless(&args.initrd, &exe, &initrd)?;
    let cfgs = configs(&ns.tap, qemu.is_some(), &sweep, &help);
    let mut all = Vec::new();
    for round in 0..args.rounds {
        for cfg in &cfgs {
            let program = if cfg.qemu {
                qemu.as_deref().expect("qemu config only with --vs qemu")
            } else {
                &exe
            };
            let m = run_config(cfg, program, &ns.name, &ns.tap, args, &initrd, dir.path())
                .map_err(|e| format!("{} (round {}): {e}", cfg.name, round + 1))?;
            if !args.json {
                for x in &m {
                    eprintln!(
                        "round {}: {:<14} {:<6} {:>10.2} {:<7} {:>9.0} exits/s {:>9.0} interrupts/s",
                        round + 1,
                        x.config,
                        x.workload,
                        x.throughput,
                        x.unit,
                        x.exits_per_s,
                        x.interrupts_per_s
                    );
                }
            }
            all.extend(m);
        }
    }
    let m = best(all);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&m)).expect("JSON serialises")
        );
    } else {
        print!("{}", table(&m));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(exits: u64, inj: u64, win: u64, ticks: (u64, u64), at: Instant) -> Snapshot {
        Snapshot {
            kvm: BTreeMap::from([
                ("exits".to_string(), exits),
                ("irq_injections".to_string(), inj),
                ("irq_window_exits".to_string(), win),
            ]),
            ticks,
            at: Some(at),
        }
    }

    #[test]
    fn a_measure_is_rates_over_the_workload() {
        let t = Instant::now();
        let a = snap(1000, 10, 5, (100, 200), t);
        let b = snap(
            21_000,
            5_010,
            1_005,
            (1_080, 1_200),
            t + Duration::from_secs(10),
        );
        let guest = BTreeMap::from([
            ("work".to_string(), format!("{}", 256 * 100_000)),
            ("seconds".to_string(), "10.0".to_string()),
            ("interrupts".to_string(), "10000".to_string()),
        ]);
        let m = measure("full", "stream", &a, &b, &guest).unwrap();
        assert!((m.exits_per_s - 2000.0).abs() < 1.0);
        assert!((m.interrupts_per_s - 1000.0).abs() < 1e-6);
        assert!((m.exits_per_interrupt() - 2.0).abs() < 1e-3);
        assert!((m.injections_per_s - 500.0).abs() < 1.0);
        assert!((m.irq_window_exits_per_s - 100.0).abs() < 1.0);
        assert_eq!(m.time_in_guest, Some(0.98));
        assert!((m.throughput - 256.0 * 100_000.0 * 8.0 / 10.0 / 1e6).abs() < 1e-6);
        assert!((m.exits_per_work - 0.2).abs() < 1e-9);
        assert_eq!(m.by_reason.get("irq_window_exits"), Some(&100.0));
        let j = to_json(&[m]);
        for k in [
            "config",
            "workload",
            "throughput",
            "exits_per_s",
            "exits_per_interrupt",
            "interrupts_per_s",
            "time_in_guest",
        ] {
            assert!(!j[0][k].is_null(), "{k}");
        }
        let mut g = guest.clone();
        g.remove("interrupts");
        assert!(
            measure("x", "rr", &a, &b, &g).is_err(),
            "a missing report is an error"
        );
    }

    #[test]
    fn configurations_follow_the_table_and_the_binary() {
        let help = "--pv-eoi <on|off> --x2apic <on|off> --dedicated-cores[=<CPULIST>]";
        let c = configs("tap0", true, &[16, 96], help);
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "baseline",
                "delivery-only",
                "full",
                "qemu",
                "full T=16",
                "full T=96"
            ]
        );
        let base = c[0].options.join(" ");
        assert!(base.contains("--pv-eoi off --x2apic off"), "{base}");
        assert!(base.contains("tap=tap0,coalesce=off"), "{base}");
        assert!(base.contains("--queue-poll-us 0"), "{base}");
        assert!(c[2].options.join(" ").contains("--pv-eoi on"));
        assert!(c[2].options.contains(&"--dedicated-cores".to_string()));
        assert!(!base.contains("--dedicated-cores"));
        assert!(c[5].options.join(" ").contains("coalesce=adaptive:96"));
        assert!(!c[5].rr);
        // Every exitless configuration counts KVM's exits by reason where the binary can.
        let traced = "--kernel-exit-reasons".to_string();
        assert!(!c[0].options.contains(&traced));
        let c = configs(
            "tap0",
            true,
            &[16],
            &format!("{help} --kernel-exit-reasons"),
        );
        for x in &c {
            assert_eq!(x.options.contains(&traced), !x.qemu, "{}", x.name);
        }
        // A binary without the completion options: they are left out, not invented.
        let c = configs("tap0", false, &[], "");
        assert_eq!(c.len(), 3);
        assert!(!c[0].options.join(" ").contains("--pv-eoi"));
    }

    #[test]
    fn traced_exits_are_summed_over_the_vcpus() {
        let reply = json!({"vcpus": [
            {"kvm": {"kvm_exit.intr": 3, "kvm_exit.vintr": 1, "exits": 9}},
            {"kvm": {"kvm_exit.intr": 4}},
            {"id": 2},
        ]});
        let s = traced_sums(&reply);
        assert_eq!(s.get("kvm_exit.intr"), Some(&7));
        assert_eq!(s.get("kvm_exit.vintr"), Some(&1));
        assert_eq!(s.get("exits"), None);
        assert!(traced_sums(&json!({})).is_empty());
    }

    #[test]
    fn best_keeps_the_fastest_round() {
        let m = |t: f64| Measure {
            config: "full".into(),
            workload: "stream".into(),
            throughput: t,
            unit: "Mbit/s",
            latency_us: None,
            exits_per_s: 1.0,
            interrupts_per_s: 1.0,
            injections_per_s: 0.0,
            irq_window_exits_per_s: 0.0,
            halt_exits_per_s: 0.0,
            time_in_guest: None,
            exits_per_work: 1.0,
            by_reason: BTreeMap::new(),
        };
        let b = best(vec![m(1.0), m(3.0), m(2.0)]);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].throughput, 3.0);
        assert!(table(&b).contains("3.00"));
    }
}
