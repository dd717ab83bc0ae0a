//! `swarmfs mount SOURCE... MOUNTPOINT`: returns once the mount is live (for a lone magnet
//! link, once its metadata is fetched and the files are visible), then serves it in the
//! background (like sshfs and btfs) or, with `-f`, in the foreground. Each SOURCE is a .torrent,
//! a magnet link or a directory of .torrent files (watched); more can be added at runtime
//! through `.swarmfs/add/` (see `cli::librarian`).

use std::io::{BufRead, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fuser::{MountOption, SessionACL};

use crate::cli::common::{self, MetadataArgs, Source, SwarmArgs};
use crate::cli::librarian::{Added, Librarian};
use crate::cli::size_arg;
use crate::engine::metadata::FetchProgress;
use crate::engine::session::{bind_listener, Session};
use crate::engine::torrent::TorrentConfig;
use crate::fuse::fs::{LibraryFs, SharedLibrary};

/// What the mount was given to show.
enum MountSource {
    One(Source),
    /// A directory of .torrent files, watched.
    Dir(PathBuf),
}

impl Args {
    fn mountpoint(&self) -> PathBuf {
        PathBuf::from(self.paths.last().map(String::as_str).unwrap_or_default())
    }

    fn sources(&self) -> &[String] {
        &self.paths[..self.paths.len().saturating_sub(1)]
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Each SOURCE is a .torrent file, a magnet link, or a directory of .torrent files (watched:
    /// files added there appear in the mount, files removed disappear); the last argument is
    /// the mountpoint, an existing empty directory. Each torrent shows at the root under its
    /// name. More are added at runtime by copying a .torrent (or writing a magnet link) into
    /// MOUNTPOINT/.swarmfs/add/ or with `swarmfs add`, and removed with
    /// rm MOUNTPOINT/.swarmfs/torrents/NAME or `swarmfs remove`. With -d DIR the set persists: a
    /// later mount of DIR (SOURCEs may then be left out) comes back with the same torrents.
    #[arg(value_name = "[SOURCE]... MOUNTPOINT", num_args = 1.., required = true)]
    pub paths: Vec<String>,
    /// Stay in the foreground (default: return once mounted and serve in the background).
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Memory for verified pieces (an LRU cache), shared by all the mount's torrents: those
    /// being read split it.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = size_arg)]
    pub cache_size: u64,
    /// Also write verified pieces to DIR/<name>, so the mount doubles as a download; a later
    /// mount with the same DIR resumes after verifying.
    #[arg(short = 'd', long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A read that makes no progress for this many seconds fails with EIO.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub read_timeout: u64,
    /// A torrent with no open file and no read for this many seconds goes idle: it closes its
    /// peer connections and stops announcing, keeping its metadata (and data under -d); a read
    /// wakes it. 0: never.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub idle_timeout: u64,
    /// Keep every torrent connected and seeding, read or not (no idle timeout).
    #[arg(long)]
    pub seed: bool,
    /// Largest readahead window of a sequential reader.
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = size_arg)]
    pub readahead: u64,
    /// FUSE mount options, comma separated (allow_other, default_permissions, ...).
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    pub options: Vec<String>,
    /// Log file of the background process (default: $XDG_STATE_HOME/swarmfs/<name>.log).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    #[command(flatten)]
    pub metadata: MetadataArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
}

/// Checks the mountpoint and the FUSE setup, so a bad command fails with one clear line and
/// leaves nothing mounted.
fn check_mountpoint(mp: &Path) -> anyhow::Result<()> {
    let dead_mount = || {
        anyhow::anyhow!(
            "{} is a dead mount left by a crashed process (Transport endpoint is not connected); \
             run `fusermount -u {}` and try again",
            mp.display(),
            mp.display()
        )
    };
    let meta = match std::fs::metadata(mp) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Err(dead_mount()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mountpoint {} does not exist", mp.display())
        }
        Err(e) => bail!("cannot use mountpoint {}: {e}", mp.display()),
    };
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", mp.display());
    }
    let abs = std::fs::canonicalize(mp)?;
    if let Some(parent) = abs.parent() {
        if std::fs::metadata(parent)
            .map(|p| p.dev() != meta.dev())
            .unwrap_or(false)
        {
            // The kernel may answer `stat` from cached attributes even when the filesystem's
            // process is gone; listing the directory has to reach it.
            if let Err(e) = std::fs::read_dir(mp) {
                if e.raw_os_error() == Some(libc::ENOTCONN) {
                    return Err(dead_mount());
                }
            }
            bail!("{} is already a mount point", mp.display());
        }
    }
    if std::fs::read_dir(mp)
        .with_context(|| format!("cannot read mountpoint {}", mp.display()))?
        .next()
        .is_some()
    {
        bail!("mountpoint {} is not empty", mp.display());
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3 (apt-get install fuse3)");
    }
    // SAFETY: access() only reads its NUL-terminated path argument.
    if unsafe { libc::access(c"/dev/fuse".as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        bail!(
            "/dev/fuse is not readable and writable by this user; most systems make it mode 666 \
             (as root: chmod 666 /dev/fuse), and the FUSE library swarmfs uses needs that"
        );
    }
    if which("fusermount3").is_none() {
        bail!("fusermount3 is missing: install it with `apt-get install fuse3`");
    }
    Ok(())
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
    })
}

fn mount_options(args: &Args) -> anyhow::Result<(Vec<MountOption>, SessionACL)> {
    // Not the kernel's read-only flag: it would refuse the control directory's writes before
    // they reach us; `fs.rs` answers every other write with EROFS itself.
    let mut opts = vec![
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::FSName("swarmfs".into()),
        MountOption::Subtype("swarmfs".into()),
    ];
    let mut acl = SessionACL::Owner;
    for o in args.options.iter().flat_map(|o| o.split(',')) {
        match o.trim() {
            "" | "ro" => {}
            "allow_other" => {
                // SAFETY: getuid has no preconditions.
                let root = unsafe { libc::getuid() } == 0;
                let allowed = std::fs::read_to_string("/etc/fuse.conf")
                    .map(|c| c.lines().any(|l| l.trim() == "user_allow_other"))
                    .unwrap_or(false);
                if !root && !allowed {
                    bail!("-o allow_other needs `user_allow_other` in /etc/fuse.conf (as root: echo user_allow_other >> /etc/fuse.conf)");
                }
                acl = SessionACL::All;
            }
            "allow_root" => acl = SessionACL::RootAndOwner,
            "default_permissions" => opts.push(MountOption::DefaultPermissions),
            "rw" => bail!("swarmfs mounts are read-only; -o rw is not supported"),
            other => opts.push(MountOption::CUSTOM(other.to_string())),
        }
    }
    Ok((opts, acl))
}

fn default_log_file(name: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    base.join("swarmfs").join(format!("{safe}.log"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut sources = Vec::new();
    for text in args.sources() {
        let path = Path::new(text);
        if !common::is_magnet(text) && path.is_dir() {
            sources.push(MountSource::Dir(path.to_path_buf()));
        } else {
            sources.push(MountSource::One(Source::parse(text)?));
        }
    }
    let mountpoint = args.mountpoint();
    check_mountpoint(&mountpoint)?;
    let (options, acl) = mount_options(&args)?;
    let mut cfg = TorrentConfig {
        data_dir: args.data_dir.clone(),
        cache_size: args.cache_size.max(1 << 20),
        fetch_all: args.data_dir.is_some(),
        read_timeout: Duration::from_secs(args.read_timeout.max(1)),
        readahead: args.readahead,
        ..TorrentConfig::default()
    };
    args.swarm.apply(&mut cfg)?;
    // A second mount of the same content in one data dir fails here, in the foreground.
    if let Some(d) = &args.data_dir {
        for s in &sources {
            if let MountSource::One(Source::Torrent(meta)) = s {
                drop(lock_data_dir(d, &meta.info.name)?);
            }
        }
    }

    // Background mode forks before any thread exists (the tokio runtime comes after).
    let notify = if args.foreground {
        None
    } else {
        let hint = match sources.first() {
            Some(MountSource::One(s)) => s.name_hint(),
            Some(MountSource::Dir(d)) => d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "library".into()),
            None => "swarmfs".into(),
        };
        let log_file = args
            .log_file
            .clone()
            .unwrap_or_else(|| default_log_file(&hint));
        Some(daemonize(&log_file)?)
    };
    let result = serve(args, sources, cfg, options, acl, notify);
    if let Err(e) = &result {
        log::error!("{e:#}");
    }
    result
}

/// Serves the mount; `notify` (background mode) hears `status` lines while a lone magnet's
/// metadata is fetched, then "ok" once the mount is live, or the error.
fn serve(
    args: Args,
    sources: Vec<MountSource>,
    cfg: TorrentConfig,
    options: Vec<MountOption>,
    acl: SessionACL,
    mut notify: Option<std::fs::File>,
) -> anyhow::Result<()> {
    let fail = |notify: &mut Option<std::fs::File>, e: anyhow::Error| -> anyhow::Error {
        if let Some(n) = notify.as_mut() {
            let _ = write!(n, "{e:#}");
        }
        e
    };
    let mountpoint = args.mountpoint();
    let rt = tokio::runtime::Runtime::new()?;
    let status = notify.as_ref();
    let library = SharedLibrary::default();
    let lone = sources.len() == 1;
    let started = rt.block_on(async {
        let listener = bind_listener(args.swarm.listen).await?;
        let session = Arc::new(Session::start(listener, args.swarm.session_config())?);
        let librarian = Librarian::new(
            session.clone(),
            library.clone(),
            cfg,
            args.swarm.clone(),
            args.metadata.clone(),
            args.data_dir.clone(),
            (!args.seed && args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout)),
        );
        let started = async {
            // With -d: the torrents an earlier mount of that data dir had, first.
            let mut names = librarian.restore().await;
            for source in sources {
                match source {
                    MountSource::One(Source::Torrent(meta)) => {
                        if let Added::Mounted(n) = librarian.add_meta(meta, Vec::new()).await? {
                            names.push(n);
                        }
                    }
                    // A lone magnet: the mount returns once its files are visible, or fails.
                    MountSource::One(source @ Source::Magnet(_)) if lone => {
                        let on_progress = |p: &FetchProgress| match status {
                            Some(mut n) => {
                                let _ = writeln!(
                                    n,
                                    "{STATUS_PREFIX}{}",
                                    common::fetch_progress_line(p)
                                );
                            }
                            None if common::is_terminal() => {
                                eprint!("\r{}", common::fetch_progress_line(p));
                            }
                            None => {}
                        };
                        let resolved = common::resolve(
                            &session,
                            &source,
                            &args.swarm,
                            &args.metadata,
                            args.data_dir.as_deref(),
                            on_progress,
                        )
                        .await;
                        if status.is_none() && common::is_terminal() {
                            eprintln!();
                        }
                        let resolved = resolved?;
                        let added = librarian
                            .add_meta(resolved.meta, resolved.found_peers)
                            .await?;
                        if let Added::Mounted(n) = added {
                            names.push(n);
                        }
                    }
                    // Among others, a magnet shows up once its metadata is known.
                    MountSource::One(source) => {
                        let l = librarian.clone();
                        tokio::spawn(async move {
                            let hint = source.name_hint();
                            if let Err(e) = l.add_source(source).await {
                                l.note(format!("error: {hint}: {e:#}"));
                            }
                        });
                    }
                    MountSource::Dir(dir) => librarian.watch_dir(dir).await,
                }
            }
            librarian.spawn_housekeeping();
            anyhow::Ok(names)
        };
        match started.await {
            Ok(names) => Ok((session, librarian, names)),
            Err(e) => {
                session.shutdown().await;
                Err(e)
            }
        }
    });
    let (session, librarian, names) = match started {
        Ok(x) => x,
        Err(e) => return Err(fail(&mut notify, e)),
    };
    log::info!("listening on {}", session.listen_addr);
    let fs = LibraryFs::new(library, Arc::new(librarian.clone()), rt.handle().clone());
    let open_files = fs.open_files.clone();
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = acl;
    let mut fuse_session = match fuser::Session::new(fs, &mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            rt.block_on(session.shutdown());
            let e = anyhow::anyhow!("cannot mount on {}: {e}", mountpoint.display());
            return Err(fail(&mut notify, e));
        }
    };
    // The control socket (`swarmfs add/remove/status`), live before the mount command returns.
    let control = rt.block_on(async { crate::cli::control::bind(&mountpoint) });
    let socket = match control {
        Ok((listener, path)) => {
            let mp = std::fs::canonicalize(&mountpoint).unwrap_or_else(|_| mountpoint.clone());
            rt.spawn(crate::cli::control::serve(listener, librarian.clone(), mp));
            Some(path)
        }
        Err(e) => {
            log::warn!("{e:#}; swarmfs add/remove/status will not reach this mount");
            None
        }
    };
    let mut unmounter = fuse_session.unmount_callable();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fuse-loop".into())
        .spawn(move || {
            let r = fuse_session.run();
            let _ = done_tx.send(r);
        })?;
    match notify.take() {
        Some(mut n) => {
            let _ = n.write_all(b"ok");
        }
        None => println!(
            "mounted {} at {} (listening on {})",
            if names.is_empty() {
                "nothing yet".to_string()
            } else {
                names.join(", ")
            },
            mountpoint.display(),
            session.listen_addr
        ),
    }
    raise_readahead(&mountpoint);

    rt.block_on(async {
        let mut done_rx = done_rx;
        tokio::select! {
            r = &mut done_rx => {
                if let Ok(Err(e)) = r {
                    log::warn!("FUSE session ended with an error: {e}");
                }
                log::info!("unmounted; stopping");
                session.shutdown().await;
            }
            _ = common::termination_signal() => {
                log::info!("signal: failing waiting reads, unmounting");
                session.shutdown().await;
                if let Err(e) = unmounter.unmount() {
                    log::warn!("unmount: {e}; detaching lazily");
                    let _ = std::process::Command::new("fusermount3")
                        .arg("-uz")
                        .arg(&mountpoint)
                        .status();
                }
                if open_files.load(Ordering::SeqCst) == 0 {
                    let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
                }
            }
        }
    });
    rt.shutdown_timeout(Duration::from_millis(500));
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Starts a progress line on the pipe from the background process to the waiting parent; any
/// other text is the final word ("ok" or the error).
const STATUS_PREFIX: &str = "status ";

/// Forks; the parent waits for the child's word and exits, the child returns a pipe to report on
/// and carries on detached from the terminal, logging to `log_file`.
fn daemonize(log_file: &Path) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = log_file.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create log directory {}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .with_context(|| format!("cannot open log file {}", log_file.display()))?;
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the process is single-threaded here (no runtime yet), so fork is sound.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both fds came from pipe() above and are owned by exactly one side after fork.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if pid > 0 {
        drop(write_end);
        let mut msg = String::new();
        let shown = common::is_terminal();
        let mut last_status = false;
        for line in std::io::BufReader::new(std::fs::File::from(read_end)).lines() {
            let Ok(line) = line else { break };
            match line.strip_prefix(STATUS_PREFIX) {
                Some(status) if shown => {
                    eprint!("\r{status}");
                    last_status = true;
                }
                Some(_) => {}
                None => {
                    msg.push_str(if msg.is_empty() { "" } else { "\n" });
                    msg.push_str(&line);
                }
            }
        }
        if last_status {
            eprintln!();
        }
        if msg == "ok" {
            std::process::exit(0);
        }
        if msg.is_empty() {
            msg = format!(
                "the background process exited before mounting; see {}",
                log_file.display()
            );
        }
        eprintln!("swarmfs: {msg}");
        std::process::exit(1);
    }
    drop(read_end);
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscalls on fds we own; setsid detaches from the terminal's session.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    Ok(std::fs::File::from(write_end))
}

/// A lock file in the data dir refuses a second mount of the same content.
pub fn lock_data_dir(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!(".{name}.swarmfs-lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "{} is in use by another swarmfs (lock {})",
            dir.display(),
            path.display()
        );
    }
    Ok(f)
}

/// As root, raise the mount's own kernel readahead (its bdi read_ahead_kb); FUSE INIT can only
/// lower it. Done from a thread: stat on the mountpoint needs the FUSE loop running.
fn raise_readahead(mp: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let mp = mp.to_path_buf();
    std::thread::spawn(move || {
        let Ok(meta) = std::fs::metadata(&mp) else {
            return;
        };
        let dev = meta.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
        if let Err(e) = std::fs::write(&path, "1024") {
            log::debug!("raising {path}: {e}");
        }
    });
}
