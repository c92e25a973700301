//! The Debian guest of `tools/debian-guest.sh` (Debian's cloud kernel and a busybox initramfs whose
//! init loads the virtio modules and gives a shell on the console), and a driver for that shell:
//! the tests type one command line at a time into exitless's stdin (the guest's serial console)
//! and wait for each command's end marker before they send the next.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{exitless, Run};

pub const KERNEL: &str = "images/debian/vmlinuz";
pub const INITRD: &str = "images/debian/initrd.img";
/// initrd.img plus mkfs.ext4, e2fsck and socat (AF_VSOCK) from the build host.
pub const INITRD_TOOLS: &str = "images/debian/initrd-tools.img";
/// initrd-tools.img plus KVM's modules and `load-kvm` (not loaded at boot).
pub const INITRD_NESTED: &str = "images/debian/initrd-nested.img";

/// The shell's first step: no echo, no kernel messages, `r KEY VALUE` prints a result line.
const SHELL_SETUP: &str = "stty -echo; dmesg -n 1; r() { echo \"=R= $*\"; }";
/// Boots [`Vm::boot_shell`] tries when the guest triple-faults before its shell answers.
pub const BOOT_ATTEMPTS: u32 = 3;
/// Boots [`Vm::boot_shell`] has started again after a triple fault, in this test process.
pub static BOOT_RETRIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Boot to the init's first line (seconds on hardware, ~10 s in the emulated SVM host).
pub const BOOT_WAIT: Duration = Duration::from_secs(600);
pub const STEP_WAIT: Duration = Duration::from_secs(120);
pub const EXIT_WAIT: Duration = Duration::from_secs(120);

/// Why the Debian guest cannot be used here, if it cannot.
pub fn missing() -> Option<String> {
    [KERNEL, INITRD, INITRD_TOOLS]
        .iter()
        .find(|p| !Path::new(p).exists())
        .map(|p| format!("{p} is not built (tools/debian-guest.sh images/debian)"))
}

/// The arguments that boot the Debian guest (with the tools initramfs) with `cpus` and `mem`.
pub fn args(cpus: u32, mem: &str) -> Vec<String> {
    [
        "--kernel",
        KERNEL,
        "--initrd",
        INITRD_TOOLS,
        "--cpus",
        &cpus.to_string(),
        "--mem",
        mem,
        "--timeout",
        "1200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A running exitless whose console the test reads as it arrives and types into.
pub struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    out_thread: Option<JoinHandle<()>>,
    err_thread: Option<JoinHandle<Vec<u8>>>,
    /// exitless's stderr, once `err_thread` has been joined.
    stderr_seen: Vec<u8>,
    report: PathBuf,
    steps: u32,
}

impl Vm {
    /// `exitless run ARGS --stats-json REPORT`, inside `netns` when given.
    pub fn start(netns: Option<&str>, args: &[String], report: &Path) -> Vm {
        Vm::start_verb("run", netns, args, report)
    }

    /// `exitless restore ARGS --stats-json REPORT`, inside `netns` when given: the guest goes on
    /// where its snapshot stopped it (a shell already set up by [`Vm::shell`] answers at once).
    pub fn restore(netns: Option<&str>, args: &[String], report: &Path) -> Vm {
        Vm::start_verb("restore", netns, args, report)
    }

    fn start_verb(verb: &str, netns: Option<&str>, args: &[String], report: &Path) -> Vm {
        let mut cmd = match netns {
            Some(ns) => {
                // `ip netns exec` enters the namespace and execs exitless: the child is exitless.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exitless());
                c
            }
            None => Command::new(exitless()),
        };
        cmd.arg(verb).args(args).arg("--stats-json").arg(report);
        Vm::spawn(cmd, report)
    }

    /// Another VMM (a peer such as QEMU) whose serial console is its stdin and stdout.
    pub fn start_command(cmd: Command, report: &Path) -> Vm {
        Vm::spawn(cmd, report)
    }

    fn spawn(mut cmd: Command, report: &Path) -> Vm {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the VMM");
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let out_thread = {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    out.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            })
        };
        let mut stderr = child.stderr.take().unwrap();
        let err_thread = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            s
        });
        Vm {
            stdin: child.stdin.take(),
            child,
            out,
            out_thread: Some(out_thread),
            err_thread: Some(err_thread),
            stderr_seen: Vec::new(),
            report: report.to_path_buf(),
            steps: 0,
        }
    }

    /// Boots the Debian guest with `args` (see [`args`]) and waits for its shell, which then
    /// echoes nothing typed (busybox's line editing reads plain lines), prints no kernel messages
    /// and has `r KEY VALUE` to print a result line (`=R= KEY VALUE`) no typed text starts with.
    ///
    /// A guest that triple-faults before its shell has answered is booted again (at most
    /// [`BOOT_ATTEMPTS`] boots): the emulated SVM host's TCG now and then wrecks a guest at a
    /// random point (tools/test.sh), and nothing of the test has happened yet. Each retry is
    /// said on stderr.
    pub fn boot_shell(netns: Option<&str>, args: &[String], report: &Path) -> Vm {
        for attempt in 1..=BOOT_ATTEMPTS {
            let mut vm = Vm::start(netns, args, report);
            match vm.try_shell() {
                Ok(()) => return vm,
                Err(why) if attempt < BOOT_ATTEMPTS && vm.triple_faulted() => {
                    BOOT_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    eprintln!(
                        "boot_shell: boot {attempt} of {BOOT_ATTEMPTS}: the guest triple-faulted \
                         before its shell answered ({}); booting again",
                        why.lines().next().unwrap_or("")
                    )
                }
                Err(why) => vm.fail(&why),
            }
        }
        unreachable!("the last attempt returns or fails")
    }

    /// Whether exitless ended because the guest triple-faulted (its stderr says so).
    fn triple_faulted(&mut self) -> bool {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            return false;
        }
        let stderr = self.stderr();
        find(&stderr, b"guest triple-faulted").is_some()
    }

    /// exitless's stderr once it has ended (read once, kept for [`Vm::fail`]).
    fn stderr(&mut self) -> Vec<u8> {
        if let Some(t) = self.err_thread.take() {
            self.stderr_seen = t.join().unwrap_or_default();
        }
        self.stderr_seen.clone()
    }

    /// [`Vm::shell`]'s waits and first step, returning what went wrong instead of failing.
    fn try_shell(&mut self) -> Result<(), String> {
        let at = self.try_wait_for("exitless-guest: nproc=", 0, BOOT_WAIT, "boot")?;
        self.try_wait_for("exitless# ", at, STEP_WAIT, "shell prompt")?;
        self.try_step(SHELL_SETUP, STEP_WAIT).map(|_| ())
    }

    /// [`Vm::boot_shell`] for a VMM already started.
    pub fn shell(mut vm: Vm) -> Vm {
        let at = vm.wait_for("exitless-guest: nproc=", 0, BOOT_WAIT, "boot");
        vm.wait_for("exitless# ", at, STEP_WAIT, "shell prompt");
        vm.step(SHELL_SETUP, STEP_WAIT);
        vm
    }

    /// Runs `cmd` (which prints `r KEY ...` lines) and returns the value of `key`; fails the test
    /// (with the console) when the guest printed none.
    pub fn value(&mut self, cmd: &str, key: &str) -> String {
        let out = self.step(cmd, STEP_WAIT);
        match results(&out).remove(key) {
            Some(v) => v,
            None => self.fail(&format!("{cmd:?} printed no {key}")),
        }
    }

    /// Brings the guest's first network interface up with `ip`/24 and returns its name; fails
    /// the test (with the console) when `ip` does not succeed.
    #[allow(dead_code)]
    pub fn net_up(&mut self, ip: &str) -> String {
        let dev = self.value(
            "r dev $(ls /sys/class/net | grep -v '^lo$' | head -n 1)",
            "dev",
        );
        let status = self.number(
            &format!("ip link set {dev} up && ip addr add {ip}/24 dev {dev}; r ip $?"),
            "ip",
        );
        if status != 0 {
            self.fail(&format!("ip on {dev} ended with status {status}"));
        }
        dev
    }

    /// Like [`Vm::value`], as a number.
    pub fn number(&mut self, cmd: &str, key: &str) -> u64 {
        let v = self.value(cmd, key);
        match v.split_whitespace().next().and_then(|n| n.parse().ok()) {
            Some(n) => n,
            None => self.fail(&format!("{key} is {v:?}, not a number")),
        }
    }

    /// exitless's process id (for /proc reads on the host).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the console showed so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn console_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// Waits until `pat` appears in the console output after byte `from`; returns the offset
    /// just past it. Ends the VM and fails the test (with the console) on timeout or exit.
    pub fn wait_for(&mut self, pat: &str, from: usize, timeout: Duration, what: &str) -> usize {
        match self.try_wait_for(pat, from, timeout, what) {
            Ok(at) => at,
            Err(why) => self.fail(&why),
        }
    }

    /// [`Vm::wait_for`], returning why it did not come instead of failing.
    fn try_wait_for(
        &mut self,
        pat: &str,
        from: usize,
        timeout: Duration,
        what: &str,
    ) -> Result<usize, String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(i) = find(&out[from.min(out.len())..], pat.as_bytes()) {
                    return Ok(from + i + pat.len());
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader take the last bytes, then look once more.
                std::thread::sleep(Duration::from_millis(200));
                let out = self.out.lock().unwrap();
                if let Some(i) = find(&out[from.min(out.len())..], pat.as_bytes()) {
                    return Ok(from + i + pat.len());
                }
                return Err(format!("{what}: exitless ended ({st}) before {pat:?}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{what}: no {pat:?} on the console within {} s",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn send(&mut self, line: &str) {
        if let Err(why) = self.try_send(line) {
            self.fail(&why);
        }
    }

    fn try_send(&mut self, line: &str) -> Result<(), String> {
        if exitless::bench::nested::type_line(self.stdin.as_mut(), line) {
            Ok(())
        } else {
            Err(format!(
                "could not type {line:?}: exitless's stdin is closed"
            ))
        }
    }

    /// Types one shell command line and waits for its end marker (`r` is defined by the first
    /// step); returns the console output from the moment it was typed.
    pub fn step(&mut self, cmd: &str, timeout: Duration) -> String {
        match self.try_step(cmd, timeout) {
            Ok(out) => out,
            Err(why) => self.fail(&why),
        }
    }

    fn try_step(&mut self, cmd: &str, timeout: Duration) -> Result<String, String> {
        self.steps += 1;
        let n = self.steps;
        let from = self.console_len();
        self.try_send(&format!("{cmd}; r step-{n} done"))?;
        let end = self.try_wait_for(&format!("=R= step-{n} done"), from, timeout, cmd)?;
        Ok(String::from_utf8_lossy(&self.out.lock().unwrap()[from..end]).into_owned())
    }

    /// Ends the VM and fails the test with what the console and stderr showed.
    pub fn fail(&mut self, why: &str) -> ! {
        // SIGINT first: exitless then stops the VM and still prints its summary (exits, device
        // facts, and with --sample-rips where the guest was), which tells why it stopped.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = self.stderr();
        if let Some(t) = self.out_thread.take() {
            let _ = t.join();
        }
        let out = self.out.lock().unwrap();
        panic!(
            "{why}\n--- console\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&stderr)
        );
    }

    /// After `poweroff -f`: waits for exitless to end and collects the run.
    pub fn finish(mut self) -> Run {
        drop(self.stdin.take());
        let deadline = Instant::now() + EXIT_WAIT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() > deadline => {
                    self.fail("exitless did not end after poweroff -f")
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => self.fail(&format!("wait for exitless: {e}")),
            }
        };
        if let Some(t) = self.out_thread.take() {
            let _ = t.join();
        }
        let stderr = self.stderr();
        let stdout = std::mem::take(&mut *self.out.lock().unwrap());
        Run {
            status: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            report: std::fs::read_to_string(&self.report)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok()),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A panic between start and finish must not leave the VM running (or the namespace busy).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `=R= KEY VALUE` lines the guest printed, as KEY → VALUE (the last one wins).
pub use exitless::bench::results;

/// A marker of fixed length (prefix + 8 hex digits) unique to this run.
pub fn marker(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:08x}", t ^ std::process::id().rotate_left(16))
}

pub fn write_at(img: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(data, offset).unwrap();
}

pub fn read_at(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}
