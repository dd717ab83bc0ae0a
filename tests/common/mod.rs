//! Helpers for end-to-end tests: data sets, torrents, swarmfs processes on 127.0.0.1 with
//! watchdogs, third-party tools. Every process started here is killed when its guard drops.
#![allow(dead_code)]

pub mod trackers;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The swarmfs binary under test: `$SWARMFS_BIN` when set, else the one cargo built. Worktrees
/// that share a target dir overwrite each other's `target/debug/swarmfs` at every build, so a
/// run that must test its own build points this at a copy of it.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("SWARMFS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_swarmfs").to_string())
    })
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no stored data.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_file(path: &Path, len: usize, seed: u64) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, data(len, seed)).unwrap();
}

/// Fails with the command line and output when a tool fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (scripts/test.sh installs the tools tests need)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `swarmfs create PATH -o OUT [extra]`.
pub fn create_torrent(path: &Path, out: &Path, extra: &[&str]) {
    run_ok(
        Command::new(bin())
            .arg("create")
            .arg(path)
            .arg("-o")
            .arg(out)
            .args(extra),
    );
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub stdout_lines: mpsc::Receiver<String>,
    pub stderr_path: Option<PathBuf>,
}

impl Proc {
    /// Starts `cmd` with stdout piped (lines readable through `next_line`) and stderr to a file.
    pub fn spawn(name: &str, cmd: &mut Command, stderr_to: &Path) -> Proc {
        let err = std::fs::File::create(stderr_to).unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            name: name.to_string(),
            stdout_lines: rx,
            stderr_path: Some(stderr_to.to_path_buf()),
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The next stdout line that starts with `prefix`, within `within` (a watchdog, not a timing claim).
    pub fn wait_line(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout_lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => continue,
                Err(_) => panic!(
                    "{}: no line starting with {prefix:?} within {within:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
            }
        }
    }

    /// The address from a "listening on ADDR" line.
    pub fn listen_addr(&mut self) -> SocketAddr {
        let line = self.wait_line("listening on ", Duration::from_secs(60));
        line.trim_start_matches("listening on ")
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits for exit within `within`; kills and fails the test past it.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {within:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `swarmfs seed TORRENT -d DIR --listen 127.0.0.1:0` (or the `--listen` in `extra`) and its
/// address.
pub fn seeder(dir: &Path, torrent: &Path, logs: &Path, extra: &[&str]) -> (Proc, SocketAddr) {
    let (p, addr, _) = seeder_with_peer_id(dir, torrent, logs, extra);
    (p, addr)
}

/// `swarmfs download TORRENT -d DIR --listen 127.0.0.1:0`, running.
pub fn download(torrent: &Path, dir: &Path, logs: &Path, extra: &[&str]) -> Proc {
    Proc::spawn(
        "download",
        Command::new(bin())
            .arg("download")
            .arg(torrent)
            .arg("-d")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--no-dht"])
            .args(extra)
            .env("RUST_LOG", "swarmfs=info"),
        logs,
    )
}

/// Byte-compares two trees (files only), failing with the first difference.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let mut fa = files_under(a);
    let mut fb = files_under(b);
    fa.sort();
    fb.sort();
    assert_eq!(
        fa,
        fb,
        "file lists differ between {} and {}",
        a.display(),
        b.display()
    );
    let under = |root: &Path, rel: &Path| {
        if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        }
    };
    for rel in fa {
        let x = std::fs::read(under(a, &rel)).unwrap();
        let y = std::fs::read(under(b, &rel)).unwrap();
        assert!(
            x == y,
            "{} differs ({} vs {} bytes)",
            rel.display(),
            x.len(),
            y.len()
        );
    }
}

pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if root.is_file() {
        return vec![PathBuf::new()];
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out
}

pub fn sha256_file(path: &Path) -> String {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).unwrap();
    sha256(&buf)
}

/// sha256 through the system tool (the way a user checks a file), of bytes we hold.
pub fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A free TCP port on 127.0.0.1 (for tools that cannot report the port they got).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's python3 (the one python3-libtorrent is built for).
pub const PY: &str = "/usr/bin/python3";

/// A `swarmfs mount -f` process; unmounted (lazily if need be) and killed on drop.
pub struct Mount {
    pub proc: Proc,
    pub dir: PathBuf,
    pub listen_addr: Option<SocketAddr>,
}

impl Mount {
    /// Mounts in the foreground and waits for "mounted".
    pub fn start(torrent: &Path, dir: &Path, logs: &Path, extra: &[&str]) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let mut proc = Proc::spawn(
            "mount",
            Command::new(bin())
                .arg("mount")
                .arg("-f")
                .arg(torrent)
                .arg(dir)
                .args(["--listen", "127.0.0.1:0", "--no-dht"])
                .args(extra)
                .env("RUST_LOG", "swarmfs=info"),
            logs,
        );
        let line = proc.wait_line("mounted ", Duration::from_secs(60));
        let listen_addr = line
            .rsplit("listening on ")
            .next()
            .and_then(|s| s.trim_end_matches(')').parse().ok());
        Mount {
            proc,
            dir: dir.to_path_buf(),
            listen_addr,
        }
    }

    pub fn is_mounted(&self) -> bool {
        is_mountpoint(&self.dir)
    }

    pub fn unmount(&mut self) {
        run_ok(Command::new("fusermount3").arg("-u").arg(&self.dir));
    }

    /// Peak resident memory of the mount process (VmHWM) in bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.proc.child.id(), "VmHWM:") * 1024
    }

    /// Bytes the mount process caused to be written to storage.
    pub fn write_bytes(&self) -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.proc.child.id())).unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mountpoint(&self.dir) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.dir)
                .status();
        }
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
}

pub fn is_mountpoint(dir: &Path) -> bool {
    let Ok(abs) = std::fs::canonicalize(dir) else {
        // A dead FUSE mount cannot be resolved but is still listed.
        return std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&dir.to_string_lossy()));
    };
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&abs.to_string_lossy()))
}

/// Runs `f` on a thread and fails the test if it takes longer than `within` (a watchdog).
pub fn with_watchdog<T: Send + 'static>(
    within: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(within)
        .unwrap_or_else(|_| panic!("watchdog: {what} did not finish within {within:?}"))
}

impl Proc {
    /// Every stdout line not yet read, up to end of file (the process has exited or closed
    /// stdout); fails past `within` (a watchdog).
    pub fn stdout_to_end(&mut self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout_lines.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => return lines,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{}: stdout still open after {within:?}", self.name)
                }
            }
        }
    }
}

/// Like `seeder`, also returning the seeder's peer id (40 hex digits) from its "seeding" line.
pub fn seeder_with_peer_id(
    dir: &Path,
    torrent: &Path,
    logs: &Path,
    extra: &[&str],
) -> (Proc, SocketAddr, String) {
    // 127.0.0.1 unless `extra` gives the seeder an address of its own.
    let listen = match extra.contains(&"--listen") {
        true => &[][..],
        false => &["--listen", "127.0.0.1:0"][..],
    };
    let mut p = Proc::spawn(
        "seeder",
        Command::new(bin())
            .arg("seed")
            .arg(torrent)
            .arg("-d")
            .arg(dir)
            .args(listen)
            .arg("--no-dht")
            .args(extra)
            .env("RUST_LOG", "swarmfs=info"),
        logs,
    );
    let addr = p.listen_addr();
    let line = p.wait_line("seeding ", Duration::from_secs(120));
    let peer_id = line
        .split("peer id ")
        .nth(1)
        .and_then(|rest| rest.get(..40))
        .filter(|id| id.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no peer id in the seeder's line {line:?}"))
        .to_ascii_lowercase();
    (p, addr, peer_id)
}

/// `swarmfs tracker --listen 127.0.0.1:0` and its announce URL.
pub fn tracker(logs: &Path, extra: &[&str]) -> (Proc, String) {
    let mut p = Proc::spawn(
        "tracker",
        Command::new(bin())
            .args(["tracker", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "swarmfs=info"),
        logs,
    );
    let line = p.wait_line("tracker listening on ", Duration::from_secs(60));
    let url = line
        .trim_start_matches("tracker listening on ")
        .trim()
        .to_string();
    (p, url)
}

/// Bytes per peer from a download's exit lines "received N bytes from peer <hex id> at ADDR",
/// as (peer id in lowercase hex, address, bytes).
pub fn received_by_peer(stdout: &[String]) -> Vec<(String, String, u64)> {
    stdout
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("received ")?;
            let (bytes, rest) = rest.split_once(" bytes from peer ")?;
            let (id, addr) = rest.split_once(" at ")?;
            Some((
                id.trim().to_ascii_lowercase(),
                addr.trim().to_string(),
                bytes.parse().ok()?,
            ))
        })
        .collect()
}

/// Fails unless python3-libtorrent imports (scripts/test.sh installs it): a missing reference
/// client is a failure, not a skip.
pub fn require_libtorrent() {
    let ok = Command::new(PY)
        .args(["-c", "import libtorrent"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "python3-libtorrent is not importable from {PY}; scripts/test.sh installs it"
    );
}

/// The name and files of `swarmfs info --json` output: files as full paths (`name/dir/file`
/// for a multi-file torrent, `name` for a single file) with their lengths.
pub fn info_json_files(v: &serde_json::Value) -> (String, Vec<(String, u64)>) {
    let name = v["name"].as_str().unwrap().to_string();
    let multi = v["multi_file"].as_bool().unwrap();
    let files = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let path = f["path"].as_str().unwrap();
            let full = match multi {
                true => format!("{name}/{path}"),
                false => path.to_string(),
            };
            (full, f["length"].as_u64().unwrap())
        })
        .collect();
    (name, files)
}
