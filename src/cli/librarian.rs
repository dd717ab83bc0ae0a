//! The mount's librarian: puts torrents on the library's shelves and takes them off, whether they
//! come from the command line, a file dropped into `.swarmfs/add/`, or a watched directory of
//! .torrent files, and shares the one cache budget among them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::cli::common::{self, MetadataArgs, Source, SwarmArgs};
use crate::core::magnet::Magnet;
use crate::core::metainfo::Metainfo;
use crate::engine::session::Session;
use crate::engine::torrent::TorrentConfig;
use crate::engine::PeerSource;
use crate::fuse::fs::{read_library, write_library, Control, Done, SharedLibrary, Shelved};
use crate::fuse::inode::InodeTable;
use crate::fuse::library::LibraryError;

/// How often a watched directory is looked at again.
pub const DIR_POLL: Duration = Duration::from_secs(2);
/// How often the cache budget is shared out again.
const REBALANCE_EVERY: Duration = Duration::from_secs(1);
/// A torrent counts as read for this long after its last read (or while a file is open).
const READ_RECENTLY: Duration = Duration::from_secs(10);

/// What adding a torrent came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    Mounted(String),
    AlreadyMounted(String),
}

pub struct Inner {
    session: Arc<Session>,
    library: SharedLibrary,
    /// The configuration each torrent starts with (`cache_size` is the whole budget).
    cfg: TorrentConfig,
    swarm: SwarmArgs,
    metadata: MetadataArgs,
    data_dir: Option<PathBuf>,
    /// Data-dir locks of the mounted torrents, by info-hash.
    locks: Mutex<HashMap<[u8; 20], std::fs::File>>,
    /// Each torrent's current share of the cache budget.
    shares: Mutex<HashMap<[u8; 20], u64>>,
    /// Control requests come from the FUSE thread: their work is spawned here.
    runtime: tokio::runtime::Handle,
    /// A torrent nobody has read for this long goes idle (`None`: never, as with `--seed`).
    idle_timeout: Option<Duration>,
}

#[derive(Clone)]
pub struct Librarian(Arc<Inner>);

impl Librarian {
    /// Call from within the runtime.
    pub fn new(
        session: Arc<Session>,
        library: SharedLibrary,
        cfg: TorrentConfig,
        swarm: SwarmArgs,
        metadata: MetadataArgs,
        data_dir: Option<PathBuf>,
        idle_timeout: Option<Duration>,
    ) -> Librarian {
        Librarian(Arc::new(Inner {
            session,
            library,
            cfg,
            swarm,
            metadata,
            data_dir,
            locks: Mutex::default(),
            shares: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
            idle_timeout,
        }))
    }

    /// Starts a torrent and puts it on the shelf; an info-hash already mounted changes nothing.
    /// With `-d DIR` it is remembered for the next mount of that DIR.
    pub async fn add_meta(
        &self,
        meta: Arc<Metainfo>,
        found_peers: Vec<(std::net::SocketAddr, PeerSource)>,
    ) -> anyhow::Result<Added> {
        self.put(meta, found_peers, true).await
    }

    async fn put(
        &self,
        meta: Arc<Metainfo>,
        found_peers: Vec<(std::net::SocketAddr, PeerSource)>,
        remember: bool,
    ) -> anyhow::Result<Added> {
        let me = &self.0;
        let hash = meta.info_hash.0;
        if let Some(name) = self.name_of(&hash) {
            return Ok(Added::AlreadyMounted(name));
        }
        let lock = match &me.data_dir {
            Some(d) => Some(crate::cli::mount::lock_data_dir(d, &meta.info.name)?),
            None => None,
        };
        let inodes = {
            let info = meta.clone();
            tokio::task::spawn_blocking(move || InodeTable::new(&info.info)).await?
        };
        let mut cfg = me.cfg.clone();
        cfg.found_peers = found_peers;
        let progress = common::verify_progress(meta.info.lengths.piece_count());
        let torrent = match me.session.torrent(meta.info_hash) {
            // Added meanwhile by another request: that one puts it on the shelf.
            Some(_) => return Ok(Added::AlreadyMounted(meta.info.name.clone())),
            None => me.session.add_torrent(meta, cfg, progress).await?,
        };
        let inserted = write_library(&me.library).insert(hash, inodes, torrent.clone());
        match inserted {
            Ok(slot) => {
                if let Some(l) = lock {
                    lock_map(&me.locks).insert(hash, l);
                }
                if let (Some(dir), true) = (&me.data_dir, remember) {
                    if let Err(e) = remember_torrent(dir, &torrent.meta) {
                        log::warn!(
                            "{e:#}; the next mount of {} will not have it",
                            dir.display()
                        );
                    }
                }
                self.rebalance();
                let name = read_library(&me.library)
                    .shelf(slot)
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                log::info!("mounted {name} ({})", torrent.info_hash);
                Ok(Added::Mounted(name))
            }
            Err(LibraryError::AlreadyMounted(name)) => {
                me.session.remove_torrent(torrent.info_hash).await;
                Ok(Added::AlreadyMounted(name))
            }
            Err(e) => {
                me.session.remove_torrent(torrent.info_hash).await;
                Err(e.into())
            }
        }
    }

    /// The name at the root of the torrent with this info-hash, if it is mounted.
    fn name_of(&self, hash: &[u8; 20]) -> Option<String> {
        let lib = read_library(&self.0.library);
        lib.slot_of(hash)
            .and_then(|slot| lib.shelf(slot))
            .map(|s| s.name.clone())
    }

    /// Resolves a source (fetching a magnet's metadata, listed in `status` meanwhile) and adds it.
    pub async fn add_source(&self, source: Source) -> anyhow::Result<Added> {
        let me = &self.0;
        let magnet = match source {
            Source::Torrent(meta) => return self.add_meta(meta, Vec::new()).await,
            Source::Magnet(m) => m,
        };
        let hash = magnet.info_hash.0;
        if let Some(name) = self.name_of(&hash) {
            return Ok(Added::AlreadyMounted(name));
        }
        let label = magnet_label(&magnet);
        write_library(&me.library).set_fetching(hash, format!("{label}: metadata"));
        let library = me.library.clone();
        let on_progress = |p: &crate::engine::metadata::FetchProgress| {
            write_library(&library)
                .set_fetching(hash, format!("{label}: {}", common::fetch_progress_line(p)));
        };
        let source = Source::Magnet(magnet.clone());
        let resolved = common::resolve(
            &me.session,
            &source,
            &me.swarm,
            &me.metadata,
            me.data_dir.as_deref(),
            on_progress,
        )
        .await;
        let added = match resolved {
            Ok(r) => self.add_meta(r.meta, r.found_peers).await,
            Err(e) => Err(e),
        };
        write_library(&me.library).clear_fetching(&hash);
        added
    }

    /// Takes a torrent off the shelves (if it still is) and stops it; data under `-d` stays.
    pub async fn remove(&self, torrent: Shelved) {
        let me = &self.0;
        let hash = torrent.info_hash.0;
        {
            let mut lib = write_library(&me.library);
            if let Some(slot) = lib.slot_of(&hash) {
                lib.remove(slot);
            }
        }
        me.session.remove_torrent(torrent.info_hash).await;
        if let Some(dir) = &me.data_dir {
            if let Err(e) = forget_torrent(dir, &hash) {
                log::warn!("{e:#}");
            }
        }
        lock_map(&me.locks).remove(&hash);
        lock_map(&me.shares).remove(&hash);
        log::info!("removed {} ({})", torrent.name(), torrent.info_hash);
        self.rebalance();
    }

    /// Removes the torrent called `name` at the root; false if there is none.
    pub async fn remove_named(&self, name: &str) -> bool {
        let torrent = {
            let lib = read_library(&self.0.library);
            lib.slot_named(name)
                .and_then(|s| lib.shelf(s))
                .map(|s| s.item.clone())
        };
        match torrent {
            Some(t) => {
                self.remove(t).await;
                true
            }
            None => false,
        }
    }

    /// What `.swarmfs/status` says.
    pub fn status(&self) -> String {
        crate::fuse::fs::status_text(&read_library(&self.0.library))
    }

    /// Shares `--cache-size` out: torrents being read split it, the others get nothing (their
    /// pieces give way to the readers'); when nobody reads, everyone gets an equal share.
    pub fn rebalance(&self) {
        let me = &self.0;
        let torrents: Vec<Shelved> = read_library(&me.library)
            .shelves()
            .map(|(_, s)| s.item.clone())
            .collect();
        if torrents.is_empty() {
            return;
        }
        let read: Vec<bool> = torrents
            .iter()
            .map(|t| t.is_being_read(READ_RECENTLY))
            .collect();
        let mut shares = lock_map(&me.shares);
        for (t, share) in torrents.iter().zip(cache_shares(me.cfg.cache_size, &read)) {
            if shares.insert(t.info_hash.0, share) != Some(share) {
                log::debug!("{}: cache share {share}", t.name());
                t.set_cache_budget(share);
            }
        }
    }

    /// Torrents nobody read for `--idle-timeout` go idle (a read wakes them).
    fn put_idle_to_sleep(&self) {
        let Some(timeout) = self.0.idle_timeout else {
            return;
        };
        let idle: Vec<Shelved> = read_library(&self.0.library)
            .shelves()
            .map(|(_, s)| s.item.clone())
            .filter(|t| !t.is_asleep() && !t.is_being_read(timeout))
            .collect();
        for t in idle {
            self.0.runtime.spawn(async move { t.sleep().await });
        }
    }

    /// Every second, until the session ends: shares the cache out again and puts idle
    /// torrents to sleep.
    pub fn spawn_housekeeping(&self) {
        let me = self.clone();
        self.0.runtime.spawn(async move {
            let mut every = tokio::time::interval(REBALANCE_EVERY);
            loop {
                every.tick().await;
                me.rebalance();
                me.put_idle_to_sleep();
            }
        });
    }

    /// Watches `dir`: its .torrent files are mounted, and a file removed takes its torrent with
    /// it. The first look is done before this returns.
    pub async fn watch_dir(&self, dir: PathBuf) {
        let mut seen: HashMap<PathBuf, Option<[u8; 20]>> = HashMap::new();
        self.look_at_dir(&dir, &mut seen).await;
        let me = self.clone();
        self.0.runtime.spawn(async move {
            loop {
                tokio::time::sleep(DIR_POLL).await;
                me.look_at_dir(&dir, &mut seen).await;
            }
        });
    }

    async fn look_at_dir(&self, dir: &Path, seen: &mut HashMap<PathBuf, Option<[u8; 20]>>) {
        let now: HashSet<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "torrent") && p.is_file())
                .collect(),
            Err(e) => {
                log::warn!("cannot read {}: {e}", dir.display());
                return;
            }
        };
        let gone: Vec<PathBuf> = seen.keys().filter(|p| !now.contains(*p)).cloned().collect();
        for path in gone {
            let Some(Some(hash)) = seen.remove(&path) else {
                continue;
            };
            let torrent = {
                let lib = read_library(&self.0.library);
                lib.slot_of(&hash)
                    .and_then(|s| lib.shelf(s))
                    .map(|s| s.item.clone())
            };
            if let Some(t) = torrent {
                self.remove(t).await;
            }
        }
        let mut new: Vec<PathBuf> = now.into_iter().filter(|p| !seen.contains_key(p)).collect();
        new.sort();
        for path in new {
            let added = match common::load_torrent(&path) {
                // A watched directory's torrents come back from it, not from the data dir.
                Ok(meta) => {
                    let hash = meta.info_hash.0;
                    self.put(meta, Vec::new(), false).await.map(|a| (hash, a))
                }
                Err(e) => Err(e),
            };
            match added {
                Ok((hash, Added::Mounted(_))) => {
                    seen.insert(path, Some(hash));
                }
                Ok((_, Added::AlreadyMounted(name))) => {
                    self.note(format!("{}: already mounted as {name}", path.display()));
                    seen.insert(path, None);
                }
                Err(e) => {
                    self.note(format!("error: {}: {e:#}", path.display()));
                    seen.insert(path, None);
                }
            }
        }
    }

    /// With `-d DIR`: mounts again the torrents an earlier mount of DIR had, in their order.
    /// Returns their names.
    pub async fn restore(&self) -> Vec<String> {
        let Some(dir) = self.0.data_dir.clone() else {
            return Vec::new();
        };
        let mut names = Vec::new();
        for hex in remembered(&dir) {
            let path = dir.join(LIBRARY_DIR).join(format!("{hex}.torrent"));
            let added = match common::load_torrent(&path) {
                Ok(meta) => self.add_meta(meta, Vec::new()).await,
                Err(e) => Err(e),
            };
            match added {
                Ok(Added::Mounted(name)) => names.push(name),
                Ok(Added::AlreadyMounted(_)) => {}
                Err(e) => self.note(format!("error: {}: {e:#}", path.display())),
            }
        }
        names
    }

    pub fn note(&self, line: String) {
        log::warn!("{line}");
        write_library(&self.0.library).note(line);
    }
}

/// Each torrent's share of a `total` cache budget: those being read split it, the others get
/// nothing; when nobody reads, all split it.
fn cache_shares(total: u64, being_read: &[bool]) -> Vec<u64> {
    let readers = being_read.iter().filter(|&&r| r).count() as u64;
    let all = being_read.len().max(1) as u64;
    being_read
        .iter()
        .map(|&r| match readers {
            0 => total / all,
            n if r => total / n,
            _ => 0,
        })
        .collect()
}

/// Under `-d DIR`: the mounted torrents' .torrent files (`<info-hash>.torrent`) and their order.
pub const LIBRARY_DIR: &str = ".swarmfs-library";
const ORDER_FILE: &str = "order";

/// The info-hashes (hex) remembered in `dir`, in the order they were added.
fn remembered(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(LIBRARY_DIR).join(ORDER_FILE))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| l.len() == 40 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .collect()
}

fn write_order(dir: &Path, order: &[String]) -> anyhow::Result<()> {
    let lib = dir.join(LIBRARY_DIR);
    let tmp = lib.join(format!("{ORDER_FILE}.tmp"));
    let mut text = order.join("\n");
    text.push('\n');
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, lib.join(ORDER_FILE))
        .with_context(|| format!("cannot write {}", lib.join(ORDER_FILE).display()))
}

fn remember_torrent(dir: &Path, meta: &Metainfo) -> anyhow::Result<()> {
    let lib = dir.join(LIBRARY_DIR);
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let hex = meta.info_hash.to_hex();
    let path = lib.join(format!("{hex}.torrent"));
    if !path.exists() {
        let trackers: Vec<String> = meta.trackers().into_iter().flatten().collect();
        let bytes = crate::core::metadata::torrent_file(&meta.info_bytes, &trackers);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut order = remembered(dir);
    if !order.contains(&hex) {
        order.push(hex);
        write_order(dir, &order)?;
    }
    Ok(())
}

fn forget_torrent(dir: &Path, hash: &[u8; 20]) -> anyhow::Result<()> {
    let hex = hex::encode(hash);
    let mut order = remembered(dir);
    if order.contains(&hex) {
        order.retain(|h| *h != hex);
        write_order(dir, &order)?;
    }
    let _ = std::fs::remove_file(dir.join(LIBRARY_DIR).join(format!("{hex}.torrent")));
    Ok(())
}

fn lock_map<K, V>(m: &Mutex<HashMap<K, V>>) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn magnet_label(m: &Magnet) -> String {
    match &m.display_name {
        Some(n) => format!("{n} ({})", m.info_hash),
        None => m.info_hash.to_hex(),
    }
}

/// What a file written into `add/` holds: a magnet link, or a .torrent.
fn parse_added(bytes: &[u8]) -> anyhow::Result<Source> {
    let text = std::str::from_utf8(bytes).ok().map(str::trim);
    if let Some(link) = text.filter(|t| common::is_magnet(t)) {
        let magnet = Magnet::parse(link).context("bad magnet link")?;
        return Ok(Source::Magnet(magnet));
    }
    let meta = Metainfo::from_bytes(bytes).context("not a valid torrent or magnet link")?;
    Ok(Source::Torrent(Arc::new(meta)))
}

impl Control for Librarian {
    fn add(&self, name: String, bytes: Vec<u8>, done: Done) {
        let source = match parse_added(&bytes) {
            Ok(s) => s,
            Err(e) => return done(Err(format!("{e:#}"))),
        };
        let me = self.clone();
        let is_magnet = matches!(source, Source::Magnet(_));
        // A magnet's close does not wait for its metadata: `status` lists it until then.
        let mut done = Some(done);
        if is_magnet {
            if let Some(d) = done.take() {
                d(Ok(()));
            }
        }
        self.0.runtime.clone().spawn(async move {
            let result = match me.add_source(source).await {
                Ok(Added::Mounted(_)) => Ok(()),
                Ok(Added::AlreadyMounted(as_name)) => {
                    me.note(format!("add/{name}: already mounted as {as_name}"));
                    Ok(())
                }
                Err(e) => Err(format!("{e:#}")),
            };
            match (done, result) {
                (Some(d), r) => d(r),
                (None, Err(e)) => me.note(format!("error: add/{name}: {e}")),
                (None, Ok(())) => {}
            }
        });
    }

    fn remove(&self, torrent: Shelved, done: Done) {
        let me = self.clone();
        self.0.runtime.clone().spawn(async move {
            me.remove(torrent).await;
            done(Ok(()));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_split_the_cache_and_idle_torrents_give_theirs_up() {
        assert_eq!(cache_shares(300, &[false]), [300]);
        assert_eq!(cache_shares(300, &[true]), [300]);
        assert_eq!(cache_shares(300, &[false, false, false]), [100, 100, 100]);
        assert_eq!(cache_shares(300, &[false, true, false]), [0, 300, 0]);
        assert_eq!(cache_shares(300, &[true, true, false]), [150, 150, 0]);
        assert!(cache_shares(300, &[]).is_empty());
    }

    #[test]
    fn a_data_dir_remembers_torrents_in_the_order_they_came() {
        use crate::core::metainfo::{build_torrent, TorrentContent, TorrentSpec};
        let dir = tempfile::tempdir().unwrap();
        let meta = |name: &str| {
            let bytes = build_torrent(&TorrentSpec {
                name: name.into(),
                content: TorrentContent::SingleFile { length: 10 },
                piece_length: 16384,
                piece_hashes: vec![[0; 20]],
                trackers: vec![vec!["http://127.0.0.1:1/announce".into()]],
                private: false,
                comment: None,
                created_by: None,
                creation_date: None,
            })
            .unwrap();
            Metainfo::from_bytes(&bytes).unwrap()
        };
        let (b, a) = (meta("b"), meta("a"));
        remember_torrent(dir.path(), &b).unwrap();
        remember_torrent(dir.path(), &a).unwrap();
        remember_torrent(dir.path(), &b).unwrap();
        let hexes = |m: &Metainfo| m.info_hash.to_hex();
        assert_eq!(remembered(dir.path()), [hexes(&b), hexes(&a)]);
        let path = dir
            .path()
            .join(LIBRARY_DIR)
            .join(format!("{}.torrent", hexes(&a)));
        let again = common::load_torrent(&path).unwrap();
        assert_eq!(
            (again.info_hash, again.trackers()),
            (a.info_hash, a.trackers())
        );
        forget_torrent(dir.path(), &b.info_hash.0).unwrap();
        assert_eq!(remembered(dir.path()), [hexes(&a)]);
        assert!(!dir
            .path()
            .join(LIBRARY_DIR)
            .join(format!("{}.torrent", hexes(&b)))
            .exists());
    }

    #[test]
    fn added_files_are_magnets_or_torrents_and_nothing_else() {
        let link = format!("magnet:?xt=urn:btih:{}\n", "ab".repeat(20));
        assert!(matches!(
            parse_added(link.as_bytes()),
            Ok(Source::Magnet(_))
        ));
        assert!(parse_added(b"magnet:?xt=urn:btih:nothex").is_err());
        assert!(parse_added(b"hello").is_err());
        assert!(parse_added(b"").is_err());
    }
}
