//! The DHT node's socket task: moves datagrams between one UDP socket and the pure
//! `core::dht::Dht`, runs its timers, and routes lookup results to whoever asked.
//!
//! `DhtNode::start` spawns the task on the current runtime and returns a cheap `DhtHandle`.
//! Lookups answer on their own channel (`Lookup`), peers as they arrive and then a summary.
//! `shutdown` saves the routing table (when a state file is set) and ends the task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::core::dht::{Dht, DhtConfig, DhtEvent, DhtStats, LookupId, LookupSummary};
use crate::core::routing::NodeId;

/// Datagrams larger than this are not KRPC (the codec drops anything over 1500 bytes).
const RECV_BUFFER: usize = 2048;
/// The longest the task sleeps between ticks, so stats stay fresh.
const MAX_IDLE: Duration = Duration::from_secs(1);
/// Stats are published at most this often (counting the table costs a walk over it, too much
/// for every datagram).
const STATS_EVERY: Duration = Duration::from_millis(100);
/// How long resolving one bootstrap host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run a node.
#[derive(Clone, Debug, Default)]
pub struct DhtSettings {
    pub config: DhtConfig,
    /// Contacts to join through (`--dht-bootstrap`, HOST:PORT; names resolved by the task).
    pub bootstrap: Vec<String>,
    /// Where the routing table is loaded from at start and saved to at shutdown.
    pub state_file: Option<PathBuf>,
}

/// What a lookup reports, in order: peers as they arrive (get_peers only), then `Done`.
#[derive(Debug, Clone)]
pub enum LookupUpdate {
    Peers(Vec<SocketAddr>),
    Done(LookupSummary),
}

/// The receiving end of one lookup; dropping it does not stop the lookup, only its reports.
pub type Lookup = mpsc::UnboundedReceiver<LookupUpdate>;

enum Command {
    GetPeers {
        info_hash: [u8; 20],
        announce_port: Option<u16>,
        reply: mpsc::UnboundedSender<LookupUpdate>,
    },
    FindNode {
        target: NodeId,
        reply: mpsc::UnboundedSender<LookupUpdate>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// A running node. Cheap to clone; the task ends on `shutdown` or when every handle is gone.
#[derive(Clone)]
pub struct DhtHandle {
    commands: mpsc::UnboundedSender<Command>,
    stats: watch::Receiver<DhtStats>,
    local_addr: SocketAddr,
    id: NodeId,
}

pub struct DhtNode;

impl DhtNode {
    /// Starts a node on `socket` (on the current tokio runtime): loads the saved table if there
    /// is one (its id and nodes), bootstraps from its nodes and `settings.bootstrap`.
    pub fn start(socket: UdpSocket, settings: DhtSettings) -> std::io::Result<DhtHandle> {
        let local_addr = socket.local_addr()?;
        let saved = settings.state_file.as_deref().and_then(load_state);
        let (id, saved_nodes) = match saved {
            Some((id, nodes)) => (id, nodes),
            None => (NodeId::random(&mut rand::thread_rng()), Vec::new()),
        };
        let now = Instant::now().into_std();
        let dht = Dht::new(id, settings.config.clone(), rand::random(), now);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (stats_tx, stats) = watch::channel(DhtStats::default());
        let task = NodeTask {
            socket,
            dht,
            lookups: HashMap::new(),
            stats_tx,
            stats_due: Instant::now(),
            state_file: settings.state_file,
        };
        tokio::spawn(task.run(command_rx, settings.bootstrap, saved_nodes));
        Ok(DhtHandle {
            commands,
            stats,
            local_addr,
            id,
        })
    }
}

impl DhtHandle {
    /// Looks up peers for `info_hash`; with `announce_port`, announces us on that port to the
    /// closest nodes at the end.
    pub fn get_peers(&self, info_hash: [u8; 20], announce_port: Option<u16>) -> Lookup {
        let (reply, rx) = mpsc::unbounded_channel();
        let _ = self.commands.send(Command::GetPeers {
            info_hash,
            announce_port,
            reply,
        });
        rx
    }

    /// Looks up the nodes closest to `target`.
    pub fn find_node(&self, target: NodeId) -> Lookup {
        let (reply, rx) = mpsc::unbounded_channel();
        let _ = self.commands.send(Command::FindNode { target, reply });
        rx
    }

    /// Counts at most about a second old (published every 100 ms while the node is busy, and at
    /// each of its wake-ups, at least once a second).
    pub fn stats(&self) -> DhtStats {
        *self.stats.borrow()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Saves the routing table (if a state file is set) and ends the task.
    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Shutdown(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

struct NodeTask {
    socket: UdpSocket,
    dht: Dht,
    lookups: HashMap<LookupId, mpsc::UnboundedSender<LookupUpdate>>,
    stats_tx: watch::Sender<DhtStats>,
    stats_due: Instant,
    state_file: Option<PathBuf>,
}

impl NodeTask {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        bootstrap: Vec<String>,
        saved_nodes: Vec<SocketAddr>,
    ) {
        let mut contacts = saved_nodes;
        contacts.extend(resolve_all(&bootstrap, self.local_addr_is_v4()).await);
        self.dht.bootstrap(&contacts, Instant::now().into_std());
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            self.flush().await;
            let now = Instant::now();
            let wake = self
                .dht
                .next_timeout()
                .map(Instant::from_std)
                .unwrap_or(now + MAX_IDLE)
                .min(now + MAX_IDLE)
                .max(now);
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((len, from)) => {
                        if let Some(packet) = buf.get(..len) {
                            self.dht.handle(from, packet, Instant::now().into_std());
                        }
                    }
                    // ICMP errors from an earlier send surface here on some systems; they say
                    // nothing about the next datagram.
                    Err(e) => log::trace!("dht recv: {e}"),
                },
                command = commands.recv() => match command {
                    Some(Command::GetPeers { info_hash, announce_port, reply }) => {
                        let id = self.dht.get_peers(info_hash, announce_port, Instant::now().into_std());
                        self.lookups.insert(id, reply);
                    }
                    Some(Command::FindNode { target, reply }) => {
                        let id = self.dht.find_node(target, Instant::now().into_std());
                        self.lookups.insert(id, reply);
                    }
                    Some(Command::Shutdown(done)) => {
                        self.save();
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.save();
                        return;
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    self.dht.tick(Instant::now().into_std());
                }
            }
        }
    }

    fn local_addr_is_v4(&self) -> bool {
        self.socket.local_addr().map_or(true, |a| a.is_ipv4())
    }

    /// Sends what the node queued, hands out its events, publishes its stats.
    async fn flush(&mut self) {
        while let Some(t) = self.dht.poll_transmit() {
            if let Err(e) = self.socket.send_to(&t.bytes, t.to).await {
                log::trace!("dht send to {}: {e}", t.to);
            }
        }
        while let Some(event) = self.dht.poll_event() {
            match event {
                DhtEvent::Peers { lookup, peers, .. } => {
                    if let Some(reply) = self.lookups.get(&lookup) {
                        let _ = reply.send(LookupUpdate::Peers(peers));
                    }
                }
                DhtEvent::LookupDone {
                    lookup, summary, ..
                } => {
                    if let Some(reply) = self.lookups.remove(&lookup) {
                        let _ = reply.send(LookupUpdate::Done(summary));
                    }
                }
            }
        }
        let now = Instant::now();
        if now >= self.stats_due {
            self.stats_due = now + STATS_EVERY;
            // Read with `borrow` only (nobody waits for changes), so replacing is cheap.
            self.stats_tx.send_replace(self.dht.stats());
        }
    }

    fn save(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let bytes = self.dht.save();
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                // Written aside and renamed, so a crash never leaves half a table.
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path))
            });
        match written {
            Ok(()) => log::debug!("dht: saved the routing table to {}", path.display()),
            Err(e) => log::warn!("cannot save the DHT table to {}: {e}", path.display()),
        }
    }
}

/// The saved table at `path`: our id and the nodes to bootstrap from. A missing or unreadable
/// file means a fresh start.
fn load_state(path: &std::path::Path) -> Option<(NodeId, Vec<SocketAddr>)> {
    use std::io::Read;
    let mut bytes = Vec::new();
    // Capped: a table of a few hundred nodes is a few KiB.
    let file = std::fs::File::open(path).ok()?;
    file.take(1 << 20).read_to_end(&mut bytes).ok()?;
    match crate::core::dht::load_saved(&bytes) {
        Ok(saved) => {
            log::debug!("dht: {} nodes from {}", saved.1.len(), path.display());
            Some(saved)
        }
        Err(e) => {
            log::warn!("ignoring the DHT table in {}: {e}", path.display());
            None
        }
    }
}

/// Resolves HOST:PORT contacts of our address family; names that do not resolve are logged.
async fn resolve_all(contacts: &[String], want_v4: bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for contact in contacts {
        match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(contact.as_str())).await
        {
            Ok(Ok(addrs)) => out.extend(addrs.filter(|a| a.is_ipv4() == want_v4).take(4)),
            Ok(Err(e)) => log::info!("dht bootstrap {contact}: {e}"),
            Err(_) => log::info!("dht bootstrap {contact}: no answer from the resolver"),
        }
    }
    out
}
