//! Options shared by the commands that join a swarm (seed, download, mount): one name for one
//! concept everywhere.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::cli::size_arg;
use crate::core::dht::DhtConfig;
use crate::core::magnet::Magnet;
use crate::core::metadata;
use crate::core::metainfo::{Metainfo, MetainfoError};
use crate::core::units::format_size;
use crate::engine::metadata::FetchProgress;
use crate::engine::session::{Session, SessionConfig};
use crate::engine::torrent::{Torrent, TorrentConfig};
use crate::engine::PeerSource;
use crate::net::dht::DhtSettings;

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
    /// Never upload: every peer stays choked and no request is served (a pure downloader, as
    /// in a client-server transfer).
    #[arg(long)]
    pub no_upload: bool,
    /// Most peers connected at once for this torrent. One in five of these slots is kept for
    /// connections we open; when all are taken, a peer that has been neither interested in us
    /// nor sending us data for 5 s gives its slot to a newcomer.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub max_peers: usize,
    /// Peers we upload to at once for the rate they give us (tit-for-tat), besides the
    /// optimistic unchoke. Fewer slots move each piece faster to the peers that get one.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub upload_slots: usize,
    /// Most incoming connections at once for the whole process (all torrents); more are closed
    /// at once. Separate from --max-peers because a connection names its torrent only after
    /// its handshake.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub max_incoming: usize,
    /// Do not use the DHT (mainline, BEP 5) to find peers or to be found.
    #[arg(long)]
    pub no_dht: bool,
    /// Ask the DHT for peers and announce us this often, in seconds (every 10 s instead while
    /// no DHT node answers).
    #[arg(long, value_name = "SECONDS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub dht_announce_interval: u64,
    #[command(flatten)]
    pub dht: DhtArgs,
}

/// The public routers a DHT node joins through when no `--dht-bootstrap` is given.
pub const DEFAULT_DHT_BOOTSTRAP: [&str; 3] = [
    "router.bittorrent.com:6881",
    "dht.transmissionbt.com:6881",
    "router.utorrent.com:6881",
];

/// How our DHT node joins and behaves (shared by the swarm commands and `swarmfs dht`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DhtArgs {
    /// Join the DHT through this node (HOST:PORT, repeatable). Default: the public routers
    /// (router.bittorrent.com, dht.transmissionbt.com, router.utorrent.com), plus the nodes
    /// saved by the last run.
    #[arg(long = "dht-bootstrap", value_name = "HOST:PORT")]
    pub bootstrap: Vec<String>,
    /// Where the DHT routing table is kept between runs. Default:
    /// $XDG_STATE_HOME/swarmfs/dht.dat (~/.local/state/...); with --dht-bootstrap, none unless
    /// named here.
    #[arg(long = "dht-state", value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Queries per second we answer from one IP address; more are dropped (0: no limit).
    #[arg(long = "dht-rate-limit", value_name = "N", default_value_t = 20)]
    pub rate_limit: u32,
    /// Seconds a DHT query may go unanswered before its node counts as failing it.
    #[arg(long = "dht-query-timeout", value_name = "SECONDS", default_value_t = 5.0,
          value_parser = positive_seconds)]
    pub query_timeout: f64,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 3600.0 => Ok(s),
        _ => Err(format!("expected seconds between 0 and 3600, got {text:?}")),
    }
}

impl DhtArgs {
    /// The node's settings: bootstrap contacts, state file, limits.
    pub fn settings(&self) -> DhtSettings {
        let custom = !self.bootstrap.is_empty();
        let bootstrap = if custom {
            self.bootstrap.clone()
        } else {
            DEFAULT_DHT_BOOTSTRAP
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        let state_file = match &self.state {
            Some(path) => Some(path.clone()),
            // A private or test DHT must not mix with the table of real use.
            None if custom => None,
            None => default_dht_state_file(),
        };
        DhtSettings {
            config: DhtConfig {
                rate_limit: self.rate_limit,
                query_timeout: Duration::from_secs_f64(self.query_timeout),
                ..DhtConfig::default()
            },
            bootstrap,
            state_file,
        }
    }
}

/// `$XDG_STATE_HOME/swarmfs/dht.dat`, or `~/.local/state/swarmfs/dht.dat`.
fn default_dht_state_file() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))?;
    Some(state.join("swarmfs").join("dht.dat"))
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
            dht: (!self.no_dht).then(|| self.dht.settings()),
        }
    }

    pub fn apply(&self, cfg: &mut TorrentConfig) -> anyhow::Result<()> {
        cfg.peers = self.peer_addrs()?;
        cfg.trackers = self.trackers.clone();
        if self.upload_rate == Some(0) {
            anyhow::bail!(
                "--upload-rate 0 would stall every peer we unchoke; --no-upload never unchokes any"
            );
        }
        if self.download_rate == Some(0) {
            anyhow::bail!("--download-rate 0 would never download anything");
        }
        cfg.upload_rate = self.upload_rate;
        cfg.download_rate = self.download_rate;
        cfg.no_upload = self.no_upload;
        cfg.max_peers = self.max_peers.max(1);
        cfg.upload_slots = self.upload_slots.max(1);
        cfg.dht_announce_interval = Duration::from_secs(self.dht_announce_interval);
        Ok(())
    }
}

/// What a command was given: a .torrent (read and parsed at once, so a bad one fails before
/// anything starts) or a magnet link, whose metadata is fetched from the swarm.
#[derive(Debug, Clone)]
pub enum Source {
    Torrent(Arc<Metainfo>),
    Magnet(Magnet),
}

impl Source {
    /// A `magnet:` link (any case), or else the path of a .torrent file.
    pub fn parse(text: &str) -> anyhow::Result<Source> {
        if is_magnet(text) {
            let magnet = Magnet::parse(text).context("bad magnet link")?;
            return Ok(Source::Magnet(magnet));
        }
        Ok(Source::Torrent(load_torrent(Path::new(text))?))
    }

    /// A name for log files before the metadata is known.
    pub fn name_hint(&self) -> String {
        match self {
            Source::Torrent(meta) => meta.info.name.clone(),
            Source::Magnet(m) => m
                .display_name
                .clone()
                .unwrap_or_else(|| m.info_hash.to_hex()),
        }
    }
}

pub fn is_magnet(text: &str) -> bool {
    text.get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("magnet:"))
}

/// Options for magnet links (metadata exchange, BEP 9).
#[derive(clap::Args, Debug, Clone)]
pub struct MetadataArgs {
    /// With a magnet link: fail when no peer has sent the torrent's metadata after this many
    /// seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub metadata_timeout: u64,
    /// With a magnet link: also write the fetched metadata to FILE as a .torrent (its
    /// info-hash is the magnet's).
    #[arg(long, value_name = "FILE")]
    pub save_torrent: Option<PathBuf>,
}

impl Default for MetadataArgs {
    fn default() -> Self {
        MetadataArgs {
            metadata_timeout: 60,
            save_torrent: None,
        }
    }
}

/// A torrent ready to add, and the peers its metadata fetch found (connected to at start).
pub struct Resolved {
    pub meta: Arc<Metainfo>,
    pub found_peers: Vec<(SocketAddr, PeerSource)>,
}

/// Where `-d DIR` keeps a magnet's fetched metadata, so a restart does not fetch it again.
fn saved_metadata_path(dir: &Path, magnet: &Magnet) -> PathBuf {
    dir.join(format!(".{}.torrent", magnet.info_hash.to_hex()))
}

/// The torrent of `source`: as given, or for a magnet link the metadata saved in `data_dir`
/// by an earlier run, or else fetched from the swarm (x.pe peers, `--peer`, trackers) within
/// `--metadata-timeout`. `on_progress` hears how the fetch goes.
pub async fn resolve(
    session: &Session,
    source: &Source,
    swarm: &SwarmArgs,
    md: &MetadataArgs,
    data_dir: Option<&Path>,
    on_progress: impl Fn(&FetchProgress),
) -> anyhow::Result<Resolved> {
    let magnet = match source {
        Source::Torrent(meta) => {
            return Ok(Resolved {
                meta: meta.clone(),
                found_peers: Vec::new(),
            })
        }
        Source::Magnet(m) => m,
    };
    if let Some(dir) = data_dir {
        let path = saved_metadata_path(dir, magnet);
        if path.exists() {
            match load_torrent(&path) {
                Ok(meta) if meta.info_hash == magnet.info_hash => {
                    log::info!("using the metadata saved in {}", path.display());
                    save_torrent(md, &meta)?;
                    return Ok(Resolved {
                        meta,
                        found_peers: Vec::new(),
                    });
                }
                Ok(_) => log::warn!("{} is for another torrent; ignored", path.display()),
                Err(e) => log::warn!("{e:#}; fetching the metadata again"),
            }
        }
    }
    let mut peers = magnet.peers.clone();
    peers.extend(swarm.peer_addrs()?);
    let mut tiers: Vec<Vec<String>> = magnet.trackers.iter().map(|t| vec![t.clone()]).collect();
    tiers.extend(swarm.trackers.iter().map(|t| vec![t.clone()]));
    let (progress_tx, mut progress_rx) = watch::channel(FetchProgress::default());
    let fetch = session.fetch_metadata(magnet.info_hash, peers, tiers, progress_tx);
    tokio::pin!(fetch);
    let deadline = tokio::time::sleep(Duration::from_secs(md.metadata_timeout.max(1)));
    tokio::pin!(deadline);
    let fetched = loop {
        tokio::select! {
            f = &mut fetch => break f,
            Ok(()) = progress_rx.changed() => on_progress(&progress_rx.borrow_and_update()),
            _ = &mut deadline => break None,
        }
    };
    let Some(fetched) = fetched else {
        let p = *progress_rx.borrow();
        let hint = match (p.peers_found, session.dht()) {
            (0, Some(dht)) => format!(
                " (no peers found: the DHT ({} nodes) knows none; add a tracker, --peer HOST:PORT, or x.pe= to the link)",
                dht.stats().nodes
            ),
            (0, None) => {
                " (no peers found: add a tracker, --peer HOST:PORT, or x.pe= to the link)".to_string()
            }
            _ => String::new(),
        };
        bail!(
            "no metadata for {} after {} s: {} peers found, {} connected, {} offered the metadata{hint}",
            magnet.info_hash,
            md.metadata_timeout.max(1),
            p.peers_found,
            p.peers_connected,
            p.peers_offering
        );
    };
    let bytes = metadata::torrent_file(&fetched.info_bytes, &magnet.trackers);
    let meta = Arc::new(Metainfo::from_bytes(&bytes).with_context(|| {
        format!(
            "peers sent metadata for {} that is not a valid torrent",
            magnet.info_hash
        )
    })?);
    if let Some(dir) = data_dir {
        let path = saved_metadata_path(dir, magnet);
        let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &bytes));
        if let Err(e) = written {
            log::warn!("cannot keep the metadata in {}: {e}", path.display());
        }
    }
    save_torrent(md, &meta)?;
    Ok(Resolved {
        meta,
        found_peers: fetched.peers,
    })
}

/// `--save-torrent FILE`: the torrent as a .torrent file.
fn save_torrent(md: &MetadataArgs, meta: &Metainfo) -> anyhow::Result<()> {
    let Some(path) = &md.save_torrent else {
        return Ok(());
    };
    let trackers: Vec<String> = meta.trackers().into_iter().flatten().collect();
    std::fs::write(path, metadata::torrent_file(&meta.info_bytes, &trackers))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// One line about a metadata fetch in progress.
pub fn fetch_progress_line(p: &FetchProgress) -> String {
    format!(
        "fetching metadata: {} peers found, {} connected, {} offering, {}/{} pieces",
        p.peers_found, p.peers_connected, p.peers_offering, p.pieces_have, p.pieces_total
    )
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
            let dht = s
                .dht_nodes
                .map(|n| format!("  dht {n} nodes"))
                .unwrap_or_default();
            bar.set_message(format!(
                "{}  down {}/s  up {}/s  peers {} ({} seeds; {}){dht}  pieces {}/{}  {}",
                t.name(),
                format_size(s.down_rate as u64),
                format_size(s.up_rate as u64),
                s.peers,
                s.seeds,
                s.sources,
                s.pieces_have,
                s.pieces_total,
                eta
            ));
            bar.tick();
        }
        bar.finish_and_clear();
    });
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when it
/// is first polled: keep one and await it wherever the wait goes on, and a signal that comes in
/// between (while printing, say) is not lost.
pub fn termination_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
}

/// Binds the listener, prints where it listens, resolves the source (fetching a magnet's
/// metadata) and adds the torrent (verifying its data dir): the start shared by `seed` and
/// `download`.
pub async fn join_swarm(
    swarm: &SwarmArgs,
    source: &Source,
    md: &MetadataArgs,
    mut cfg: TorrentConfig,
) -> anyhow::Result<(Session, Arc<Torrent>)> {
    let listener = crate::engine::session::bind_listener(swarm.listen).await?;
    let session = Session::start(listener, swarm.session_config())?;
    announce_listen(session.listen_addr);
    let data_dir = cfg.data_dir.clone();
    let shown = is_terminal();
    let resolved = resolve(&session, source, swarm, md, data_dir.as_deref(), |p| {
        if shown {
            eprint!("\r{}", fetch_progress_line(p));
        }
    })
    .await;
    if shown && matches!(source, Source::Magnet(_)) {
        eprintln!();
    }
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => {
            session.shutdown().await;
            return Err(e);
        }
    };
    cfg.found_peers = resolved.found_peers;
    let meta = resolved.meta;
    let progress = verify_progress(meta.info.lengths.piece_count());
    let t = session.add_torrent(meta, cfg, progress).await?;
    Ok((session, t))
}

/// The whole life of `seed` and `download`: the swarm options applied to `cfg`, a runtime, the
/// session joined, then `body` with the session and the torrent.
pub fn run_swarm<F, Fut>(
    swarm: &SwarmArgs,
    source: &Source,
    md: &MetadataArgs,
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
        let (session, t) = join_swarm(swarm, source, md, cfg).await?;
        body(session, t).await
    })
}

/// The closing lines of `seed` and `download` about where peers came from (tests read them).
pub fn print_peer_sources(t: &Torrent) {
    let s = t.snapshot();
    println!("peers by source: {}", s.sources_ever);
    println!(
        "pex messages: {} sent, {} received",
        s.pex_sent, s.pex_received
    );
    match s.dht_nodes {
        _ if t.meta.info.private => println!("dht: not used (private torrent)"),
        Some(n) => println!("dht: {n} nodes"),
        None => println!("dht: off"),
    }
}

/// The closing line of a seeder: bytes of piece data sent to peers (scripts read it).
pub fn print_uploaded(t: &Torrent) {
    println!("uploaded {} bytes", t.snapshot().uploaded);
}

/// Prints where we listen (tests and scripts read this line) and flushes.
pub fn announce_listen(addr: SocketAddr) {
    println!("listening on {addr}");
    flush_stdout();
}

/// Sends what was printed on, for a script waiting on a line.
pub fn flush_stdout() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}
