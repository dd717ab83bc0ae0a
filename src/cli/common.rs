//! Options shared by the commands that join a swarm (seed, download, mount): one name for one
//! concept everywhere.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cli::size_arg;
use crate::core::metainfo::{Metainfo, MetainfoError};
use crate::core::units::format_size;
use crate::engine::session::{Session, SessionConfig};
use crate::engine::torrent::{Torrent, TorrentConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct SwarmArgs {
    /// Address to accept peers on (default: port 6881 on all addresses, or the next free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Connect to this peer directly (repeatable); no tracker needed.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub peers: Vec<String>,
    /// Announce to this tracker too (repeatable), after the torrent's own.
    #[arg(long = "tracker", value_name = "URL")]
    pub trackers: Vec<String>,
    /// Cap on upload rate in bytes per second (e.g. 10MiB).
    #[arg(long, value_name = "RATE", value_parser = size_arg)]
    pub upload_rate: Option<u64>,
    /// Cap on download rate in bytes per second (e.g. 10MiB).
    #[arg(long, value_name = "RATE", value_parser = size_arg)]
    pub download_rate: Option<u64>,
    /// Most peers connected at once for this torrent.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub max_peers: usize,
    /// Most incoming connections at once for the whole process (all torrents); more are closed
    /// at once. Separate from --max-peers because a connection names its torrent only after
    /// its handshake.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub max_incoming: usize,
    /// Do not use the DHT (swarmfs has no DHT yet, so this is the behaviour either way).
    #[arg(long)]
    pub no_dht: bool,
}

impl SwarmArgs {
    /// Resolves `--peer` names (HOST:PORT; names through the system resolver).
    pub fn peer_addrs(&self) -> anyhow::Result<Vec<SocketAddr>> {
        use std::net::ToSocketAddrs;
        let mut out = Vec::new();
        for p in &self.peers {
            let addrs: Vec<SocketAddr> = p
                .to_socket_addrs()
                .with_context(|| format!("--peer {p}: expected HOST:PORT"))?
                .collect();
            out.extend(addrs.into_iter().next());
        }
        Ok(out)
    }

    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            max_incoming: self.max_incoming.max(1),
        }
    }

    pub fn apply(&self, cfg: &mut TorrentConfig) -> anyhow::Result<()> {
        cfg.peers = self.peer_addrs()?;
        cfg.trackers = self.trackers.clone();
        cfg.upload_rate = self.upload_rate;
        cfg.download_rate = self.download_rate;
        cfg.max_peers = self.max_peers.max(1);
        Ok(())
    }
}

/// Reads and parses the .torrent at `path` for every command (info, mount, seed, download):
/// through [`Metainfo::from_file`], whose read stops at [`MAX_TORRENT_FILE_BYTES`], so
/// `/dev/zero` or a huge file fails at once instead of filling memory.
///
/// [`MAX_TORRENT_FILE_BYTES`]: crate::core::metainfo::MAX_TORRENT_FILE_BYTES
pub fn load_torrent(path: &Path) -> anyhow::Result<Arc<Metainfo>> {
    match Metainfo::from_file(path) {
        Ok(meta) => Ok(Arc::new(meta)),
        // These already name the path and say what is wrong with it.
        Err(e @ (MetainfoError::Io { .. } | MetainfoError::FileTooLarge { .. })) => Err(e.into()),
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("{} is not a valid torrent", path.display())))
        }
    }
}

pub fn is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// A progress bar for verifying existing data, shown only on a terminal.
pub fn verify_progress(pieces: u32) -> Arc<dyn Fn(u32) + Send + Sync> {
    if !is_terminal() || pieces == 0 {
        return Arc::new(|_| {});
    }
    let bar = indicatif::ProgressBar::new(pieces as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("verifying {bar:40} {pos}/{len} pieces")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Arc::new(move |n| {
        bar.set_position(n as u64);
        if n >= pieces {
            bar.finish_and_clear();
        }
    })
}

/// Prints a live status line (rates, peers, pieces, ETA) on a terminal until the torrent stops.
pub fn spawn_status_line(t: Arc<Torrent>) {
    if !is_terminal() {
        return;
    }
    tokio::spawn(async move {
        let bar = indicatif::ProgressBar::new_spinner();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = t.stopped() => break,
            }
            let s = t.snapshot();
            let eta = if s.bytes_left == 0 {
                "done".to_string()
            } else if s.down_rate > 1.0 {
                format!("ETA {}s", (s.bytes_left as f64 / s.down_rate) as u64)
            } else {
                "ETA -".to_string()
            };
            bar.set_message(format!(
                "{}  down {}/s  up {}/s  peers {} ({} seeds)  pieces {}/{}  {}",
                t.name(),
                format_size(s.down_rate as u64),
                format_size(s.up_rate as u64),
                s.peers,
                s.seeds,
                s.pieces_have,
                s.pieces_total,
                eta
            ));
            bar.tick();
        }
        bar.finish_and_clear();
    });
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Binds the listener, prints where it listens, and adds the torrent (verifying its data dir):
/// the start shared by `seed` and `download`.
pub async fn join_swarm(
    swarm: &SwarmArgs,
    meta: Arc<crate::core::metainfo::Metainfo>,
    cfg: TorrentConfig,
) -> anyhow::Result<(Session, Arc<Torrent>)> {
    let listener = crate::engine::session::bind_listener(swarm.listen).await?;
    let session = Session::start(listener, swarm.session_config())?;
    announce_listen(session.listen_addr);
    let progress = verify_progress(meta.info.lengths.piece_count());
    let t = session.add_torrent(meta, cfg, progress).await?;
    Ok((session, t))
}

/// The whole life of `seed` and `download`: the swarm options applied to `cfg`, a runtime, the
/// session joined, then `body` with the session and the torrent.
pub fn run_swarm<F, Fut>(
    swarm: &SwarmArgs,
    meta: Arc<Metainfo>,
    mut cfg: TorrentConfig,
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Session, Arc<Torrent>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    swarm.apply(&mut cfg)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (session, t) = join_swarm(swarm, meta, cfg).await?;
        body(session, t).await
    })
}

/// Prints where we listen (tests and scripts read this line) and flushes.
pub fn announce_listen(addr: SocketAddr) {
    use std::io::Write;
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
}
