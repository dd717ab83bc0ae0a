//! The session: our peer id, the listening socket, and the torrents it routes incoming
//! connections to.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::net::TcpListener;

use crate::core::metainfo::Metainfo;
use crate::core::wire::Handshake;
use crate::engine::torrent::{spawn_named, Torrent, TorrentConfig};
use crate::net::peer;

/// The default listening port; the next free one is taken if it is busy.
pub const DEFAULT_PORT: u16 = 6881;

pub struct Session {
    pub peer_id: [u8; 20],
    pub listen_addr: SocketAddr,
    torrents: Arc<Mutex<HashMap<[u8; 20], Arc<Torrent>>>>,
}

/// An Azureus-style peer id: `-SF0100-` and 12 random bytes.
pub fn new_peer_id() -> [u8; 20] {
    let mut id = [0u8; 20];
    id[..8].copy_from_slice(b"-SF0100-");
    rand::thread_rng().fill(&mut id[8..]);
    id
}

/// Binds `listen`, or with none the first free port from 6881 up (then any port).
pub async fn bind_listener(listen: Option<SocketAddr>) -> std::io::Result<TcpListener> {
    if let Some(addr) = listen {
        return TcpListener::bind(addr).await;
    }
    for port in DEFAULT_PORT..DEFAULT_PORT + 10 {
        if let Ok(l) = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await {
            return Ok(l);
        }
    }
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await
}

impl Session {
    /// Starts accepting connections on `listener`.
    pub fn start(listener: TcpListener) -> std::io::Result<Session> {
        let listen_addr = listener.local_addr()?;
        let torrents: Arc<Mutex<HashMap<[u8; 20], Arc<Torrent>>>> = Arc::default();
        let peer_id = new_peer_id();
        let routes = torrents.clone();
        spawn_named("listener", async move {
            loop {
                let (stream, addr) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        log::warn!("accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let routes = routes.clone();
                spawn_named("peer-incoming", async move {
                    let (theirs, incoming) = match peer::accept(stream).await {
                        Ok(x) => x,
                        Err(e) => {
                            log::debug!("incoming {addr}: {e}");
                            return;
                        }
                    };
                    let torrent = routes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&theirs.info_hash)
                        .cloned();
                    let Some(t) = torrent else {
                        log::debug!("incoming {addr}: unknown torrent");
                        return;
                    };
                    if t.is_shutting_down() {
                        return;
                    }
                    let ours = Handshake::new(t.info_hash.0, t.peer_id);
                    match incoming.answer(&ours).await {
                        Ok((r, w)) => {
                            let _ = crate::engine::peer::run(t, addr, theirs, r, w).await;
                        }
                        Err(e) => log::debug!("incoming {addr}: {e}"),
                    }
                });
            }
        });
        Ok(Session {
            peer_id,
            listen_addr,
            torrents,
        })
    }

    /// Adds a torrent (verifying its data dir first, on the blocking pool) and starts it.
    pub async fn add_torrent(
        &self,
        meta: Arc<Metainfo>,
        cfg: TorrentConfig,
        progress: Arc<dyn Fn(u32) + Send + Sync>,
    ) -> anyhow::Result<Arc<Torrent>> {
        let peer_id = self.peer_id;
        let port = self.listen_addr.port();
        let t = tokio::task::spawn_blocking(move || {
            Torrent::new(meta, cfg, peer_id, port, &|n| progress(n))
        })
        .await??;
        self.torrents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.info_hash.0, t.clone());
        t.start();
        Ok(t)
    }

    pub async fn shutdown(&self) {
        let all: Vec<Arc<Torrent>> = self
            .torrents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for t in all {
            t.shutdown().await;
        }
    }
}
