//! A torrent's timers and connector: once a second, choking, request expiry, new outgoing
//! connections and tracker totals; between ticks, addresses from discovery (trackers, `--peer`)
//! are connected to as they arrive. Every task it starts belongs to the torrent's task group.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::engine::peer;
use crate::engine::tasks::Failure;
use crate::engine::torrent::Torrent;
use crate::engine::PeerSource;
use crate::net::dht::{DhtHandle, LookupUpdate};

/// Explicit `--peer`s are retried this often after a disconnect.
const RETRY_EXPLICIT_EVERY: Duration = Duration::from_secs(5);
/// The DHT is asked again this soon while no node answers (a fresh node, or bootstrap pending).
pub const DHT_RETRY: Duration = Duration::from_secs(10);

impl Torrent {
    /// Starts the announcer, the DHT announces (`dht`, unless the torrent is private), the
    /// ticker and the connector on the current runtime.
    pub fn start(self: &Arc<Self>, dht: Option<DhtHandle>) {
        let (peers_tx, peers_rx) = mpsc::unbounded_channel();
        self.start_trackers(peers_tx.clone());
        // Kept for waking from idleness (trackers start again).
        *self.discovery_tx() = Some(peers_tx.clone());
        for p in &self.cfg.peers {
            let _ = peers_tx.send((*p, PeerSource::Direct));
        }
        for p in &self.cfg.found_peers {
            let _ = peers_tx.send(*p);
        }
        if let Some(dht) = dht {
            let _ = self.dht.set(dht.clone());
            if self.meta.info.private {
                log::debug!("{}: private torrent: not using the DHT", self.name());
            } else {
                let (info_hash, port) = (self.info_hash.0, self.listen_port);
                let interval = self.cfg.dht_announce_interval;
                let forward = peers_tx.clone();
                let awake = Some(self.awake_rx());
                self.tasks
                    .spawn("dht-announce", Failure::Routine, async move {
                        feed_dht_peers(
                            dht,
                            info_hash,
                            Some(port),
                            interval,
                            DHT_RETRY,
                            forward,
                            awake,
                        )
                        .await;
                        Ok::<(), std::convert::Infallible>(())
                    });
            }
        }
        drop(peers_tx);
        let t = self.clone();
        self.tasks.spawn("ticker", Failure::Serious, async move {
            t.run_ticker(peers_rx).await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    async fn run_ticker(
        self: Arc<Self>,
        mut peers_rx: mpsc::UnboundedReceiver<(SocketAddr, PeerSource)>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut retry_explicit = Instant::now();
        // Without trackers every sender is gone at once; a closed channel must not spin.
        let mut discovery_open = true;
        loop {
            tokio::select! {
                addr = peers_rx.recv(), if discovery_open => {
                    match addr {
                        Some((addr, source)) => {
                            self.lock().add_candidate(addr, source);
                            self.connect_more();
                        }
                        None => discovery_open = false,
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            {
                let mut st = self.lock();
                st.choke_round(now.into_std());
                st.expire_requests(now.into_std());
                if now.duration_since(retry_explicit) >= RETRY_EXPLICIT_EVERY {
                    retry_explicit = now;
                    for p in &self.cfg.peers {
                        st.requeue(*p);
                    }
                }
                #[cfg(debug_assertions)]
                st.check_invariants();
            }
            self.connect_more();
            self.publish_totals();
            // Evicted pieces leave 256 KiB holes in the heap that glibc keeps resident; give
            // them back so resident memory follows the cache budget. Cheap once a second.
            // SAFETY: malloc_trim only releases free memory; it is thread-safe.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Starts the announcer, whose peers go to `peers_tx` (at start, and on waking).
    pub(crate) fn start_trackers(
        self: &Arc<Self>,
        peers_tx: mpsc::UnboundedSender<(SocketAddr, PeerSource)>,
    ) {
        let (tracker_tx, mut tracker_rx) = mpsc::unbounded_channel();
        self.start_announcer(tracker_tx);
        self.tasks
            .spawn("tracker-peers", Failure::Routine, async move {
                while let Some(addr) = tracker_rx.recv().await {
                    if peers_tx.send((addr, PeerSource::Tracker)).is_err() {
                        break;
                    }
                }
                Ok::<(), std::convert::Infallible>(())
            });
    }

    pub(crate) fn connect_more(self: &Arc<Self>) {
        loop {
            let Some(addr) = self.lock().start_connect() else {
                return;
            };
            let t = self.clone();
            self.tasks.spawn("peer-out", Failure::Routine, async move {
                peer::connect_and_run(t, addr).await
            });
        }
    }
}

/// Looks `info_hash` up on the DHT (announcing us on `announce_port`, if given) and feeds the
/// peers found to `peers_tx`, again and again: every `interval`, or every `retry` while no node
/// answers. While `awake` says false (an idle torrent) it waits, and looks up again as soon as it
/// turns true. Ends when `peers_tx`'s receiver is gone (or the task is cancelled).
pub(crate) async fn feed_dht_peers(
    dht: DhtHandle,
    info_hash: [u8; 20],
    announce_port: Option<u16>,
    interval: Duration,
    retry: Duration,
    peers_tx: mpsc::UnboundedSender<(SocketAddr, PeerSource)>,
    mut awake: Option<watch::Receiver<bool>>,
) {
    loop {
        if let Some(rx) = &mut awake {
            while !*rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
        let mut lookup = dht.get_peers(info_hash, announce_port);
        let mut answered = false;
        loop {
            tokio::select! {
                update = lookup.recv() => match update {
                    Some(LookupUpdate::Peers(peers)) => {
                        for p in peers {
                            if peers_tx.send((p, PeerSource::Dht)).is_err() {
                                return;
                            }
                        }
                    }
                    Some(LookupUpdate::Done(summary)) => {
                        answered = summary.answered > 0;
                        log::debug!(
                            "dht lookup: {} of {} queries answered, {} hops",
                            summary.answered,
                            summary.queried,
                            summary.hops
                        );
                        break;
                    }
                    // The node is gone (shutting down): try again later.
                    None => break,
                },
                _ = peers_tx.closed() => return,
            }
        }
        let wait = if answered {
            interval
        } else {
            retry.min(interval)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = peers_tx.closed() => return,
            // Gone idle: the loop's top waits for waking, then looks up at once.
            _ = went_idle(&mut awake) => {}
        }
    }
}

/// Resolves when `awake` turns false; never without one.
async fn went_idle(awake: &mut Option<watch::Receiver<bool>>) {
    match awake {
        Some(rx) => {
            let _ = rx.wait_for(|a| !*a).await;
        }
        None => std::future::pending().await,
    }
}
