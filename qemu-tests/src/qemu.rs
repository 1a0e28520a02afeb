//! Starting and controlling one QEMU guest (TCG only: /dev/kvm hangs here).
//!
//! Every wait has a hard deadline; every failure carries the console tail;
//! the QEMU process is killed when the [`Vm`] is dropped.

use crate::cmd;
use crate::error::{Context, Error, Result};
use crate::parse;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Lines of console shown with a failure.
pub const CONSOLE_TAIL_LINES: usize = 60;

/// Multiply a timeout by `$DUALROOT_TIMEOUT_SCALE` (e.g. `2` on a slow host).
pub fn scaled(d: Duration) -> Duration {
    let f = std::env::var("DUALROOT_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| *f > 0.0)
        .unwrap_or(1.0);
    d.mul_f64(f)
}

#[derive(Debug, Clone)]
pub struct Nic {
    /// QEMU device model: `virtio-net-pci`, `e1000`, `rtl8139`, ...
    pub model: String,
    pub mac: String,
}

impl Nic {
    pub fn new(model: &str, mac: &str) -> Nic {
        Nic {
            model: model.into(),
            mac: mac.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
}

#[derive(Debug, Clone)]
pub enum Boot {
    /// SeaBIOS, then whatever is on the first disk.
    Disk,
    /// QEMU's `-kernel/-initrd/-append`.
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        append: String,
    },
}

/// The guest's firmware.
#[derive(Debug, Clone, PartialEq)]
pub enum Firmware {
    /// SeaBIOS on the i440fx machine.
    Bios,
    /// OVMF (Debian's `ovmf`) on q35 with its NVRAM in `vars`, a writable copy
    /// of an `OVMF_VARS` file that stays with the VM across reboots. With
    /// `secure_boot` the SMM build that enforces Secure Boot
    /// (`OVMF_CODE_4M.secboot.fd`; `vars` then holds enrolled keys, e.g. a copy
    /// of `OVMF_VARS_4M.ms.fd`).
    Uefi { vars: PathBuf, secure_boot: bool },
}

/// Debian's OVMF images.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
/// NVRAM as shipped: no boot entries, no keys.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// NVRAM with Microsoft's keys enrolled and Secure Boot on.
pub const OVMF_VARS_MS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

impl Firmware {
    /// UEFI with a fresh copy of `template` at `vars`.
    pub fn uefi_from(template: &Path, vars: &Path, secure_boot: bool) -> crate::Result<Firmware> {
        std::fs::copy(template, vars).map_err(|e| {
            crate::Error::msg(format!(
                "copying the OVMF NVRAM {} to {}: {e} (apt-get install ovmf)",
                template.display(),
                vars.display()
            ))
        })?;
        Ok(Firmware::Uefi {
            vars: vars.to_path_buf(),
            secure_boot,
        })
    }

    fn args(&self) -> Vec<String> {
        match self {
            Firmware::Bios => Vec::new(),
            Firmware::Uefi { vars, secure_boot } => {
                let (machine, code) = if *secure_boot {
                    ("q35,smm=on", OVMF_CODE_SECBOOT)
                } else {
                    ("q35", OVMF_CODE)
                };
                let mut a = vec!["-machine".to_string(), machine.to_string()];
                if *secure_boot {
                    a.extend([
                        "-global".to_string(),
                        "driver=cfi.pflash01,property=secure,value=on".to_string(),
                    ]);
                }
                a.extend([
                    "-drive".to_string(),
                    format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
                    "-drive".to_string(),
                    format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                ]);
                a
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub memory_mib: u32,
    pub cpus: u32,
    /// `-cpu` model: `max` has x86-64-v2 under TCG, `qemu64` has not.
    pub cpu: String,
    /// First disk is `vda`, then `vdb`, ... (all virtio-blk).
    pub disks: Vec<Disk>,
    /// Each NIC gets its own isolated user network, see [`nic_subnet`]; SSH
    /// is forwarded to the DHCP address (`.15`) behind each of the first two.
    /// The guests configure eth0 by DHCP (and eth1 statically, 10.0.3.15, on
    /// no network's subnet): when NIC names flip, eth0 sits behind the second
    /// NIC and SSH still answers there.
    pub nics: Vec<Nic>,
    pub boot: Boot,
    pub firmware: Firmware,
    /// `-no-reboot`: a guest reboot (or a panic with `panic=N`) ends QEMU.
    pub no_reboot: bool,
    /// Guest → host TCP forwards on the first NIC's network, see [`GuestFwd`].
    pub guestfwd: Vec<GuestFwd>,
    pub extra_args: Vec<String>,
}

/// Address on the first NIC's user network (10.0.2.0/24) where the
/// [`GuestFwd`] rules listen.
pub const GUESTFWD_ADDR: &str = "10.0.2.100";

/// One `guestfwd` rule: a guest connection to [`GUESTFWD_ADDR`]`:guest_port`
/// runs `cmd` (split like a shell would, no shell) with the connection as its
/// stdin and stdout, once per connection. Forwarding rules stay allowed under
/// `restrict=on`: the guest reaches only these ports on the host.
#[derive(Debug, Clone)]
pub struct GuestFwd {
    pub guest_port: u16,
    pub cmd: String,
}

pub const MAC_ETH0: &str = "52:54:00:d0:00:01";
pub const MAC_ETH1: &str = "52:54:00:d0:00:02";

impl Default for VmConfig {
    fn default() -> VmConfig {
        VmConfig {
            memory_mib: 1024,
            cpus: 2,
            cpu: "max".into(),
            disks: Vec::new(),
            nics: vec![
                Nic::new("virtio-net-pci", MAC_ETH0),
                Nic::new("virtio-net-pci", MAC_ETH1),
            ],
            boot: Boot::Disk,
            firmware: Firmware::Bios,
            no_reboot: false,
            guestfwd: Vec::new(),
            extra_args: Vec::new(),
        }
    }
}

impl VmConfig {
    pub fn disk(mut self, path: &Path, format: &str) -> VmConfig {
        self.disks.push(Disk {
            path: path.to_path_buf(),
            format: format.into(),
        });
        self
    }

    /// The QEMU arguments (without the binary) for this config;
    /// `ssh_ports[i]` is forwarded to port 22 behind NIC `i` (first two NICs).
    pub fn args(&self, console: &Path, ssh_ports: &[u16]) -> Vec<String> {
        let mut a: Vec<String> = [
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(self.firmware.args());
        a.extend(["-m".into(), self.memory_mib.to_string()]);
        a.extend(["-smp".into(), self.cpus.to_string()]);
        a.extend(["-cpu".into(), self.cpu.clone()]);
        a.extend(["-serial".into(), format!("file:{}", console.display())]);
        for d in &self.disks {
            a.extend([
                "-drive".into(),
                format!(
                    "file={},format={},if=virtio,cache=writeback",
                    d.path.display(),
                    d.format
                ),
            ]);
        }
        for (i, n) in self.nics.iter().enumerate() {
            let net = nic_subnet(i);
            let mut netdev = format!("user,id=n{i},restrict=on,net=10.0.{net}.0/24");
            if let Some(port) = ssh_ports.get(i).filter(|_| i < 2) {
                netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{port}-10.0.{net}.15:22"));
            }
            if i == 0 {
                for f in &self.guestfwd {
                    // a comma inside an option value is written twice
                    netdev.push_str(&format!(
                        ",guestfwd=tcp:{GUESTFWD_ADDR}:{}-cmd:{}",
                        f.guest_port,
                        f.cmd.replace(',', ",,")
                    ));
                }
            }
            a.extend(["-netdev".into(), netdev]);
            a.extend([
                "-device".into(),
                format!("{},netdev=n{i},mac={}", n.model, n.mac),
            ]);
        }
        if let Boot::Kernel {
            kernel,
            initrd,
            append,
        } = &self.boot
        {
            a.extend(["-kernel".into(), kernel.display().to_string()]);
            a.extend(["-initrd".into(), initrd.display().to_string()]);
            a.extend(["-append".into(), append.clone()]);
        }
        if self.no_reboot {
            a.push("-no-reboot".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// Figures a scenario reports; shared by the VMs it starts.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Highest MemTotal - MemAvailable seen in a guest, KiB.
    pub peak_guest_used_kib: Option<u64>,
    /// Highest VmHWM of a QEMU process, KiB (guest RAM it touched + QEMU).
    pub peak_qemu_rss_kib: Option<u64>,
    /// Seconds from QEMU start to the first SSH login, per boot waited for.
    pub boot_to_ssh_s: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct SshOutput {
    pub stdout: String,
    pub stderr: String,
    /// `None` when ssh was killed by a signal.
    pub code: Option<i32>,
}

impl SshOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Third octet of NIC `i`'s user network: 10.0.2.0/24, then 10.0.4.0/24,
/// 10.0.5.0/24, ... (10.0.3.0/24 is left out: the guests' static eth1 address
/// lives there, and a route to it must never shadow a real network).
pub fn nic_subnet(i: usize) -> usize {
    if i == 0 {
        2
    } else {
        i + 3
    }
}

fn have_setpriv() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A free TCP port on 127.0.0.1 (released again before QEMU binds it).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// ssh options for a guest whose host key changes with every image and boot:
/// no host key check, no known_hosts entry, no warning about either.
pub const SSH_THROWAWAY_HOST: [&str; 6] = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
];

pub struct Vm {
    name: String,
    config: VmConfig,
    dir: PathBuf,
    child: Option<Child>,
    boot: u32,
    console: PathBuf,
    /// Byte offset in the console where the next wait starts looking.
    console_mark: usize,
    /// Host ports forwarded to SSH behind the first two NICs.
    ssh_ports: Vec<u16>,
    /// The one of `ssh_ports` that answered last.
    ssh_port: u16,
    /// Index of the NIC behind `ssh_port`.
    ssh_nic: usize,
    started: Instant,
    stats: Arc<Mutex<Stats>>,
}

impl Vm {
    /// Start QEMU; files (console logs) go into `dir`.
    pub fn start(name: &str, config: VmConfig, dir: &Path, stats: Arc<Mutex<Stats>>) -> Result<Vm> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut vm = Vm {
            name: name.to_string(),
            config,
            dir: dir.to_path_buf(),
            child: None,
            boot: 0,
            console: PathBuf::new(),
            console_mark: 0,
            ssh_ports: Vec::new(),
            ssh_port: 0,
            ssh_nic: 0,
            started: Instant::now(),
            stats,
        };
        vm.spawn()?;
        Ok(vm)
    }

    fn spawn(&mut self) -> Result<()> {
        self.boot += 1;
        self.console = self
            .dir
            .join(format!("{}-console-{}.log", self.name, self.boot));
        self.console_mark = 0;
        self.ssh_ports = Vec::new();
        for _ in 0..self.config.nics.len().min(2) {
            let mut p = free_port()?;
            while self.ssh_ports.contains(&p) {
                p = free_port()?;
            }
            self.ssh_ports.push(p);
        }
        self.ssh_port = self.ssh_ports.first().copied().unwrap_or(0);
        let args = self.config.args(&self.console, &self.ssh_ports);
        let qemu_log = self
            .dir
            .join(format!("{}-qemu-{}.log", self.name, self.boot));
        let log = fs::File::create(&qemu_log)
            .with_context(|| format!("creating {}", qemu_log.display()))?;
        // setpriv --pdeathsig: QEMU dies with the test even when the test
        // process is killed outright and Drop never runs.
        let mut c = if have_setpriv() {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"]);
            c
        } else {
            Command::new("qemu-system-x86_64")
        };
        c.args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        println!("[{}] boot {}: {}", self.name, self.boot, cmd::describe(&c));
        self.started = Instant::now();
        self.child = Some(c.spawn().context("starting qemu-system-x86_64")?);
        Ok(())
    }

    /// Start QEMU again with the same disks after it exited or was killed.
    /// The new boot writes a new console file.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            crate::bail!("{}: restart while QEMU is still running", self.name);
        }
        self.spawn()
    }

    /// The config this VM was (or will be, after [`Vm::restart`]) started with:
    /// its disks, e.g. to read a powered-off guest's disk from the host.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Replace the config (e.g. another `-cpu` or boot mode) for the next
    /// [`Vm::restart`].
    pub fn config_mut(&mut self) -> &mut VmConfig {
        &mut self.config
    }

    /// Which NIC (index in [`VmConfig::nics`]) SSH answered behind: 0 when
    /// eth0 is on the first NIC, 1 when the names flipped.
    pub fn ssh_nic(&self) -> usize {
        self.ssh_nic
    }

    /// Host port of the guest's SSH (the forward that answered last).
    pub fn ssh_port(&self) -> u16 {
        self.ssh_port
    }

    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// Whole console of the current boot, cleaned of `\r` and escapes.
    pub fn console_text(&self) -> String {
        let raw = fs::read(&self.console).unwrap_or_default();
        parse::clean_console(&String::from_utf8_lossy(&raw))
    }

    /// Console of the current QEMU run from the mark on (see
    /// [`Vm::mark_console`]), cleaned. Reboots inside the guest stay in one
    /// QEMU run, so this spans every boot since the mark.
    pub fn console_since_mark(&self) -> String {
        let raw = fs::read(&self.console).unwrap_or_default();
        let start = self.console_mark.min(raw.len());
        parse::clean_console(&String::from_utf8_lossy(&raw[start..]))
    }

    pub fn console_tail(&self, lines: usize) -> String {
        cmd::tail_lines(&self.console_text(), lines)
    }

    /// An error about this guest, with the console tail and QEMU's own log.
    pub fn fail(&self, msg: impl Into<String>) -> Error {
        let qemu_log = self
            .dir
            .join(format!("{}-qemu-{}.log", self.name, self.boot));
        let qlog = fs::read_to_string(qemu_log).unwrap_or_default();
        let mut m = format!("{} (boot {}): {}", self.name, self.boot, msg.into());
        if !qlog.trim().is_empty() {
            m.push_str(&format!(
                "\nqemu said: {}",
                cmd::tail_lines(qlog.trim(), 10)
            ));
        }
        m.push_str(&format!("\nconsole log: {}", self.console.display()));
        Error::msg(m).with_console_tail(self.console_tail(CONSOLE_TAIL_LINES))
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn sample_qemu_rss(&self) {
        let Some(c) = &self.child else { return };
        let Ok(status) = fs::read_to_string(format!("/proc/{}/status", c.id())) else {
            return;
        };
        if let Some(hwm) = parse::proc_status_kib(&status, "VmHWM") {
            let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.peak_qemu_rss_kib = Some(s.peak_qemu_rss_kib.unwrap_or(0).max(hwm));
        }
    }

    /// Set the console mark at the current end: later waits only look at
    /// what the guest prints from now on.
    pub fn mark_console(&mut self) {
        self.console_mark = fs::metadata(&self.console)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
    }

    /// Wait until one of `markers` appears on the console after the mark.
    /// Fails at once when one of `fail_on` appears or QEMU exits, and at the
    /// deadline otherwise. Returns the index of the marker seen; the mark
    /// moves past it.
    pub fn wait_for_console_any(
        &mut self,
        markers: &[&str],
        fail_on: &[&str],
        timeout: Duration,
    ) -> Result<usize> {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            let raw = fs::read(&self.console).unwrap_or_default();
            let start = self.console_mark.min(raw.len());
            let text = String::from_utf8_lossy(&raw[start..]);
            if let Some((i, end)) = parse::find_first(&text, markers) {
                // `end` counts bytes of the lossy string; equal to raw bytes
                // except after invalid UTF-8, where re-marking is harmless.
                self.console_mark = start + end.min(raw.len() - start);
                return Ok(i);
            }
            if let Some((i, _)) = parse::find_first(&text, fail_on) {
                return Err(self.fail(format!(
                    "console showed {:?} while waiting for {markers:?}",
                    fail_on[i]
                )));
            }
            self.sample_qemu_rss();
            if !self.is_running() {
                let status = self.wait_exit(Duration::from_secs(5)).ok();
                return Err(self.fail(format!(
                    "QEMU exited ({}) while waiting for {markers:?}",
                    status.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
                )));
            }
            if Instant::now() >= deadline {
                return Err(self.fail(format!(
                    "timed out after {} s waiting for {markers:?} on the console",
                    timeout.as_secs()
                )));
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Wait for `marker`; a kernel panic fails at once.
    pub fn wait_for_console(&mut self, marker: &str, timeout: Duration) -> Result<()> {
        self.wait_for_console_any(&[marker], &[parse::KERNEL_PANIC], timeout)
            .map(|_| ())
    }

    fn ssh_command(&self, remote: &str) -> Command {
        self.ssh_command_port(remote, self.ssh_port)
    }

    fn ssh_command_port(&self, remote: &str, port: u16) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-i")
            .arg(crate::images::ssh_key())
            .args(["-p", &port.to_string()])
            .args(SSH_THROWAWAY_HOST)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "ServerAliveInterval=5",
                "-o",
                "ServerAliveCountMax=3",
                "root@127.0.0.1",
            ])
            .arg(remote);
        c
    }

    /// Run `remote` (a shell command line) in the guest as root; returns its
    /// output and exit code. Fails only when ssh cannot be run or the
    /// deadline passes (ssh's own failures show as exit code 255).
    pub fn ssh_timeout(&self, remote: &str, timeout: Duration) -> Result<SshOutput> {
        let timeout = scaled(timeout);
        let mut c = self.ssh_command(remote);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().context("starting ssh")?;
        let mut out = child.stdout.take().context("ssh stdout")?;
        let mut err = child.stderr.take().context("ssh stderr")?;
        let t_out = thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let t_err = thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.fail(format!(
                    "ssh command {remote:?} still running after {} s",
                    timeout.as_secs()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        };
        let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
        Ok(SshOutput {
            stdout,
            stderr,
            code: status.code(),
        })
    }

    /// [`Vm::ssh_timeout`] with 10 minutes: under TCG a `dracut` run in the
    /// guest alone takes minutes.
    pub fn ssh(&self, remote: &str) -> Result<SshOutput> {
        self.ssh_timeout(remote, Duration::from_secs(600))
    }

    /// Copy a file out of the guest (e.g. a journal or a log) to `local`.
    pub fn fetch(&self, remote_path: &str, local: &Path) -> Result<()> {
        let mut c = self.ssh_command(&format!("cat -- '{}'", remote_path.replace('\'', "'\\''")));
        let out = c.stdin(Stdio::null()).output().context("starting ssh")?;
        if !out.status.success() {
            return Err(self.fail(format!(
                "fetching {remote_path} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        fs::write(local, &out.stdout).with_context(|| format!("writing {}", local.display()))
    }

    /// Run `remote`; a non-zero exit is an error carrying its output.
    pub fn ssh_ok(&self, remote: &str) -> Result<String> {
        let o = self.ssh(remote)?;
        if !o.success() {
            return Err(self.fail(format!(
                "guest command {remote:?} exited {:?}\nstdout: {}\nstderr: {}",
                o.code,
                cmd::tail_lines(&o.stdout, 20),
                cmd::tail_lines(&o.stderr, 20)
            )));
        }
        Ok(o.stdout)
    }

    /// Wait until `ssh true` succeeds. Returns seconds since QEMU started.
    pub fn wait_for_ssh(&mut self, timeout: Duration) -> Result<f64> {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if !self.is_running() {
                return Err(self.fail("QEMU exited while waiting for SSH"));
            }
            // Only what came after the mark: a scenario may have made the guest
            // panic on purpose on earlier boots (a slot whose init exits).
            let raw = fs::read(&self.console).unwrap_or_default();
            let text = String::from_utf8_lossy(&raw[self.console_mark.min(raw.len())..]);
            if text.contains(parse::KERNEL_PANIC) {
                return Err(self.fail("kernel panic while waiting for SSH"));
            }
            // try the forward behind each NIC: names (and so addresses) may
            // have flipped
            for (i, port) in self.ssh_ports.clone().into_iter().enumerate() {
                self.ssh_port = port;
                self.ssh_nic = i;
                match self.ssh_timeout("true", Duration::from_secs(30)) {
                    Ok(o) if o.success() => {
                        let secs = self.started.elapsed().as_secs_f64();
                        self.stats
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .boot_to_ssh_s
                            .push(secs);
                        println!(
                            "[{}] boot {}: SSH up after {secs:.1} s (behind NIC {i})",
                            self.name, self.boot
                        );
                        let _ = self.sample_guest_memory();
                        return Ok(secs);
                    }
                    Ok(o) => last = format!("NIC {i}: {}", o.stderr.trim()),
                    Err(e) => last = format!("NIC {i}: {e}"),
                }
            }
            self.sample_qemu_rss();
            if Instant::now() >= deadline {
                return Err(self.fail(format!(
                    "no SSH after {} s (last: {})",
                    timeout.as_secs(),
                    cmd::tail_lines(&last, 3)
                )));
            }
            thread::sleep(Duration::from_secs(2));
        }
    }

    /// Read the guest's /proc/meminfo over SSH; record MemTotal-MemAvailable
    /// as a peak candidate and return it (KiB).
    pub fn sample_guest_memory(&self) -> Result<u64> {
        let text = self.ssh_ok("cat /proc/meminfo")?;
        let used = parse::meminfo_used_kib(&text).context("parsing guest /proc/meminfo")?;
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.peak_guest_used_kib = Some(s.peak_guest_used_kib.unwrap_or(0).max(used));
        Ok(used)
    }

    /// Wait for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            self.sample_qemu_rss();
            let Some(child) = &mut self.child else {
                crate::bail!("{}: QEMU is not running", self.name);
            };
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(self.fail(format!("QEMU still running after {} s", timeout.as_secs())));
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Power cut: SIGKILL to QEMU, now.
    pub fn power_cut(&mut self) -> Result<()> {
        self.sample_qemu_rss();
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            c.wait().context("reaping QEMU")?;
        }
        println!("[{}] boot {}: power cut", self.name, self.boot);
        Ok(())
    }

    /// Power cut at a chosen moment: as soon as `marker` shows on the
    /// console (polled every 20 ms), SIGKILL QEMU.
    pub fn power_cut_at(&mut self, marker: &str, timeout: Duration) -> Result<()> {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            let raw = fs::read(&self.console).unwrap_or_default();
            let start = self.console_mark.min(raw.len());
            if String::from_utf8_lossy(&raw[start..]).contains(marker) {
                return self.power_cut();
            }
            if !self.is_running() {
                return Err(self.fail(format!(
                    "QEMU exited before {marker:?} (power cut not done)"
                )));
            }
            if Instant::now() >= deadline {
                return Err(self.fail(format!(
                    "timed out after {} s waiting for {marker:?} to cut power",
                    timeout.as_secs()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Clean shutdown: `systemctl poweroff` over SSH, then wait for QEMU to
    /// exit. If it does not, QEMU is killed and this is an error.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        // The guest-memory column of the table: sampled after boot and here,
        // once the scenario's work is done (best effort).
        let _ = self.sample_guest_memory();
        let _ = self.ssh_timeout("systemctl poweroff", Duration::from_secs(30));
        match self.wait_exit(timeout) {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = self.power_cut();
                Err(e.with_console_tail(self.console_tail(CONSOLE_TAIL_LINES)))
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}
