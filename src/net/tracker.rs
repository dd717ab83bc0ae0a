//! Tracker client (HTTP(S) and UDP) and the per-torrent announcer task.
//!
//! `TrackerClient` does one announce or scrape: over reqwest for http(s) URLs, over BEP 15 for
//! udp URLs (`net::udp_tracker`). `Announcer` owns the announce
//! schedule of one torrent: `started`, regular re-announces at the tracker's interval, BEP 12 tier
//! order, back-off on failure, `completed` and `stopped`; every peer it learns goes to a channel.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::core::tracker_proto::{
    announce_url, parse_announce_response, parse_scrape_response, scrape_url, AnnounceEvent,
    AnnounceRequest, AnnounceResponse, ScrapeResponse, SwarmPeer, TrackerError, TransferTotals,
};
use crate::net::udp_tracker::{UdpSchedule, UdpTrackerClient};

/// Whole-request timeout for one HTTP tracker exchange (the default of `AnnouncerConfig`).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest tracker response body we read; real ones are a few KiB.
const MAX_BODY_BYTES: usize = 1 << 20;
/// How many distinct tracker messages we remember so each is logged once.
const MAX_REMEMBERED_MESSAGES: usize = 64;

/// A tracker client for http, https and udp announce URLs. Cheap to clone (one shared HTTP
/// client, one shared UDP connection-id cache).
#[derive(Clone, Debug)]
pub struct TrackerClient {
    http: reqwest::Client,
    udp: UdpTrackerClient,
}

impl Default for TrackerClient {
    fn default() -> Self {
        Self::new()
    }
}

impl TrackerClient {
    /// A client that gives UDP trackers BEP 15's full retransmission schedule.
    pub fn new() -> Self {
        Self::with_udp_schedule(UdpSchedule::default())
    }

    /// A client whose UDP exchanges follow `udp` (HTTP requests get `HTTP_TIMEOUT`).
    pub fn with_udp_schedule(udp: UdpSchedule) -> Self {
        Self::with_timeouts(HTTP_TIMEOUT, udp)
    }

    /// A client whose HTTP exchanges (connect, redirects, whole body) end within
    /// `http_timeout` and whose UDP exchanges follow `udp`.
    pub fn with_timeouts(http_timeout: Duration, udp: UdpSchedule) -> Self {
        Self::with_local_ip(http_timeout, udp, None)
    }

    /// As [`Self::with_timeouts`], every request sent from `local_ip` when given (the address
    /// we listen on, so the tracker hands others the address that reaches us).
    pub fn with_local_ip(
        http_timeout: Duration,
        udp: UdpSchedule,
        local_ip: Option<IpAddr>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .local_address(local_ip)
            .timeout(http_timeout)
            .connect_timeout(CONNECT_TIMEOUT.min(http_timeout))
            .user_agent(concat!("swarmfs/", env!("CARGO_PKG_VERSION")))
            // No keep-alive pool: announces are minutes apart, and some trackers (opentracker)
            // close the connection after each answer without saying so, which breaks reuse.
            .pool_max_idle_per_host(0)
            .build()
            // Building fails only if the TLS backend cannot start; fall back to defaults then.
            .unwrap_or_else(|e| {
                log::warn!("tracker HTTP client: {e}; using defaults");
                reqwest::Client::new()
            });
        TrackerClient {
            http,
            udp: UdpTrackerClient::new(udp).with_local_ip(local_ip),
        }
    }

    /// Announces `req` to `tracker` (an http, https or udp announce URL).
    pub async fn announce(
        &self,
        tracker: &str,
        req: &AnnounceRequest,
    ) -> Result<AnnounceResponse, TrackerError> {
        if is_udp(tracker) {
            return self.udp.announce(tracker, req).await;
        }
        let url = announce_url(tracker, req)?;
        let body = self.get(&url).await?;
        parse_announce_response(&body)
    }

    /// Scrapes `tracker` (given by its announce URL) for the given torrents.
    pub async fn scrape(
        &self,
        tracker: &str,
        info_hashes: &[[u8; 20]],
    ) -> Result<ScrapeResponse, TrackerError> {
        if is_udp(tracker) {
            return self.udp.scrape(tracker, info_hashes).await;
        }
        let url = scrape_url(tracker, info_hashes)?;
        let body = self.get(&url).await?;
        parse_scrape_response(&body)
    }

    /// GETs `url` and returns the body, read up to `MAX_BODY_BYTES`. A non-2xx answer is an
    /// error, except that a bencoded `failure reason` in it is passed on (some trackers send their
    /// refusals with 4xx).
    async fn get(&self, url: &str) -> Result<Vec<u8>, TrackerError> {
        let mut response = self.http.get(url).send().await.map_err(http_error)?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(http_error)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(TrackerError::Malformed(format!(
                    "response larger than {MAX_BODY_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok(body);
        }
        match parse_announce_response(&body) {
            Err(failure @ TrackerError::Failure(_)) => Err(failure),
            _ => Err(TrackerError::Http(format!("HTTP status {status}"))),
        }
    }
}

/// The URL names a UDP tracker (BEP 15).
fn is_udp(tracker: &str) -> bool {
    tracker
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("udp"))
}

fn http_error(e: reqwest::Error) -> TrackerError {
    if e.is_timeout() {
        return TrackerError::Timeout;
    }
    // Without the URL (it is long and holds our peer id), with the causes (the top-level message
    // alone is just "error sending request").
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    TrackerError::Http(message)
}

/// Timing knobs of an `Announcer`. `Default` is what a real client uses.
#[derive(Clone, Debug)]
pub struct AnnouncerConfig {
    /// First retry delay after every tracker failed; doubles on each further failure.
    pub first_retry: Duration,
    /// Longest retry delay.
    pub max_retry: Duration,
    /// Shortest re-announce interval we accept from a tracker (guards against `interval 0`).
    pub min_announce_interval: Duration,
    /// Longest re-announce interval we accept from a tracker.
    pub max_announce_interval: Duration,
    /// Gap between announces that `want_peers` honours when the tracker gave no `min interval`.
    pub default_min_interval: Duration,
    /// How many peers we ask for.
    pub numwant: u32,
    /// Time allowed for each `stopped` announce (and for an announce in flight when stopping).
    pub stop_timeout: Duration,
    /// Time allowed for one HTTP announce, body included (a tracker that trickles or never
    /// ends its answer fails then, and the next tracker is tried).
    pub http_timeout: Duration,
    /// How a UDP tracker is retried within one announce round: BEP 15's base (15 s), but only a
    /// couple of sends, so a silent UDP tracker does not hold up its tier for the spec's two
    /// hours; the round moves on to the next tracker and the whole round is retried later.
    pub udp: UdpSchedule,
    /// Announces leave from this address (the `--listen` address when it names one).
    pub local_ip: Option<IpAddr>,
}

impl Default for AnnouncerConfig {
    fn default() -> Self {
        AnnouncerConfig {
            first_retry: Duration::from_secs(5),
            max_retry: Duration::from_secs(30 * 60),
            min_announce_interval: Duration::from_secs(5),
            max_announce_interval: Duration::from_secs(2 * 60 * 60),
            default_min_interval: Duration::from_secs(30),
            numwant: 50,
            stop_timeout: Duration::from_secs(2),
            http_timeout: HTTP_TIMEOUT,
            udp: UdpSchedule {
                retry_base: crate::core::udp_tracker::SPEC_RETRY_BASE,
                attempts: 2,
            },
            local_ip: None,
        }
    }
}

/// Everything an `Announcer` starts from.
pub struct AnnouncerSetup {
    pub config: AnnouncerConfig,
    /// BEP 12 tiers of announce URLs.
    pub tiers: Vec<Vec<String>>,
    /// Who we announce as.
    pub peer: SwarmPeer,
    /// The current totals, read at each announce.
    pub totals: watch::Receiver<TransferTotals>,
    /// Where every peer address learnt from a tracker goes.
    pub peers_tx: mpsc::UnboundedSender<SocketAddr>,
}

enum Command {
    WantPeers,
    Completed,
    Stop(oneshot::Sender<()>),
}

/// The announce task of one torrent. Dropping it ends the task without a `stopped` event; call
/// [`Announcer::stop`] to leave the swarm politely.
pub struct Announcer {
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl Announcer {
    /// Spawns a task (on the current tokio runtime) that announces `started`, then re-announces
    /// every interval (respecting `min interval`), trying BEP 12 tiers in order (shuffled within a
    /// tier once; a tracker that answers moves to the front of its tier), retrying failures with
    /// exponential back-off, and sends every peer address it learns to `peers_tx`. A tracker's
    /// `failure reason` or `warning message` is logged with `log::warn!`, once per distinct text.
    /// http(s) and udp trackers are contacted; other URLs count as failing trackers. A UDP
    /// tracker gets `config.udp` (two sends by default) before the next tracker is tried.
    pub fn spawn(setup: AnnouncerSetup) -> Announcer {
        let AnnouncerSetup {
            config,
            tiers,
            peer,
            totals,
            peers_tx,
        } = setup;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let mut rng = rand::thread_rng();
        let tiers = tiers
            .into_iter()
            .filter(|tier| !tier.is_empty())
            .map(|mut tier| {
                tier.shuffle(&mut rng);
                tier.into_iter().map(TrackerState::new).collect()
            })
            .collect();
        let task = AnnounceTask {
            client: TrackerClient::with_local_ip(config.http_timeout, config.udp, config.local_ip),
            tiers,
            peer,
            totals,
            peers_tx,
            logged: HashSet::new(),
            retry_delay: config.first_retry,
            config,
        };
        Announcer {
            commands,
            task: tokio::spawn(task.run(command_rx)),
        }
    }

    /// Asks for more peers now (e.g. when the torrent has too few), honouring `min interval`.
    pub fn want_peers(&self) {
        let _ = self.commands.send(Command::WantPeers);
    }

    /// Sends a `completed` event at the next opportunity (right away).
    pub fn completed(&self) {
        let _ = self.commands.send(Command::Completed);
    }

    /// Sends `stopped` to the trackers that worked (each bounded by the stop timeout, 2 s by
    /// default), then ends the task.
    pub async fn stop(self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.commands.send(Command::Stop(done_tx)).is_ok() {
            let _ = done_rx.await;
        }
        let _ = self.task.await;
    }
}

struct TrackerState {
    url: String,
    /// This tracker accepted our `started` (so it should also hear `stopped`).
    started: bool,
}

impl TrackerState {
    fn new(url: String) -> Self {
        TrackerState {
            url,
            started: false,
        }
    }
}

/// The result of one announce round.
struct RoundOutcome {
    result: Result<AnnounceResponse, TrackerError>,
    /// The event that the answering tracker accepted, if any.
    event_sent: Option<AnnounceEvent>,
}

struct AnnounceTask {
    client: TrackerClient,
    /// BEP 12 tiers, each in its current try order.
    tiers: Vec<Vec<TrackerState>>,
    peer: SwarmPeer,
    totals: watch::Receiver<TransferTotals>,
    peers_tx: mpsc::UnboundedSender<SocketAddr>,
    /// Tracker messages already logged (each distinct one is logged once).
    logged: HashSet<String>,
    retry_delay: Duration,
    config: AnnouncerConfig,
}

/// Scheduling state that commands change, also while a round is in flight.
struct Schedule {
    next_announce: Instant,
    /// Earliest time `want_peers` may trigger an announce.
    earliest_extra: Instant,
    /// The last round failed; we are waiting out a back-off (want_peers does not cut it short).
    backing_off: bool,
    completed_pending: bool,
    stop: Option<oneshot::Sender<()>>,
}

impl Schedule {
    /// Applies one command; returns false when the task should stop.
    fn apply(&mut self, command: Option<Command>) -> bool {
        let now = Instant::now();
        match command {
            Some(Command::WantPeers) => {
                if !self.backing_off {
                    self.next_announce = self.next_announce.min(self.earliest_extra.max(now));
                }
                true
            }
            Some(Command::Completed) => {
                self.completed_pending = true;
                self.next_announce = now;
                true
            }
            Some(Command::Stop(done)) => {
                self.stop = Some(done);
                false
            }
            // The Announcer was dropped.
            None => false,
        }
    }
}

impl AnnounceTask {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let now = Instant::now();
        let mut schedule = Schedule {
            next_announce: now,
            earliest_extra: now,
            backing_off: false,
            completed_pending: false,
            stop: None,
        };
        let stop_timeout = self.config.stop_timeout;
        'task: loop {
            tokio::select! {
                _ = tokio::time::sleep_until(schedule.next_announce) => {}
                command = commands.recv() => {
                    if schedule.apply(command) { continue 'task } else { break 'task }
                }
            }
            let completed = schedule.completed_pending;
            let mut stopping = false;
            let outcome = {
                let round = self.round(completed);
                tokio::pin!(round);
                loop {
                    tokio::select! {
                        outcome = &mut round => break Some(outcome),
                        command = commands.recv(), if !stopping => {
                            if !schedule.apply(command) {
                                // Let the announce in flight finish (briefly), so a tracker that
                                // just took our `started` also hears `stopped`.
                                stopping = true;
                                break tokio::time::timeout(stop_timeout, &mut round).await.ok();
                            }
                        }
                    }
                }
            };
            if stopping {
                break 'task;
            }
            let Some(outcome) = outcome else {
                continue 'task;
            };
            self.apply_outcome(outcome, &mut schedule);
        }
        self.send_stopped().await;
        if let Some(done) = schedule.stop {
            let _ = done.send(());
        }
    }

    fn apply_outcome(&mut self, outcome: RoundOutcome, schedule: &mut Schedule) {
        let now = Instant::now();
        match outcome.result {
            Ok(response) => {
                if outcome.event_sent == Some(AnnounceEvent::Completed) {
                    schedule.completed_pending = false;
                }
                let interval = Duration::from_secs(response.interval.into()).clamp(
                    self.config.min_announce_interval,
                    self.config.max_announce_interval,
                );
                let min_interval = response
                    .min_interval
                    .map(|s| Duration::from_secs(s.into()))
                    .unwrap_or(self.config.default_min_interval)
                    .clamp(self.config.min_announce_interval, interval);
                // A `completed` still owed goes out right away (the tracker that answered had
                // to hear `started` first).
                if !schedule.completed_pending {
                    schedule.next_announce = now + interval;
                }
                schedule.earliest_extra = now + min_interval;
                schedule.backing_off = false;
                self.retry_delay = self.config.first_retry;
                for peer in response.peers {
                    let _ = self.peers_tx.send(peer);
                }
            }
            Err(e) => {
                log::debug!(
                    "no tracker answered; retrying in {:?}: {e}",
                    self.retry_delay
                );
                schedule.next_announce = now + self.retry_delay;
                schedule.backing_off = true;
                self.retry_delay = (self.retry_delay * 2).min(self.config.max_retry);
            }
        }
    }

    fn request(&self, event: Option<AnnounceEvent>) -> AnnounceRequest {
        AnnounceRequest {
            peer: self.peer,
            totals: *self.totals.borrow(),
            event,
            numwant: self.config.numwant,
        }
    }

    /// One announce in BEP 12 order: the first tracker that answers wins and moves to the front
    /// of its tier. The event is `started` for a tracker that has not accepted one yet, else
    /// `completed` if pending, else none.
    async fn round(&mut self, completed_pending: bool) -> RoundOutcome {
        let mut last_error = TrackerError::Http("no trackers".into());
        for tier_index in 0..self.tiers.len() {
            let tier_len = self.tiers.get(tier_index).map_or(0, Vec::len);
            for index in 0..tier_len {
                let Some(tracker) = self.tiers.get(tier_index).and_then(|t| t.get(index)) else {
                    continue;
                };
                let event = if !tracker.started {
                    Some(AnnounceEvent::Started)
                } else if completed_pending {
                    Some(AnnounceEvent::Completed)
                } else {
                    None
                };
                let url = tracker.url.clone();
                let request = self.request(event);
                match self.client.announce(&url, &request).await {
                    Ok(response) => {
                        if let Some(warning) = &response.warning {
                            self.log_once(&url, warning);
                        }
                        if let Some(tier) = self.tiers.get_mut(tier_index) {
                            let mut tracker = tier.remove(index);
                            tracker.started = true;
                            tier.insert(0, tracker);
                        }
                        log::debug!(
                            "tracker {url}: {} peers, interval {} s",
                            response.peers.len(),
                            response.interval
                        );
                        return RoundOutcome {
                            result: Ok(response),
                            event_sent: event,
                        };
                    }
                    Err(e) => {
                        match &e {
                            TrackerError::Failure(reason) => self.log_once(&url, reason),
                            other => log::info!("tracker {url}: {other}"),
                        }
                        last_error = e;
                    }
                }
            }
        }
        RoundOutcome {
            result: Err(last_error),
            event_sent: None,
        }
    }

    fn log_once(&mut self, url: &str, message: &str) {
        let key = format!("{url}\n{message}");
        if self.logged.contains(&key) {
            return;
        }
        if self.logged.len() >= MAX_REMEMBERED_MESSAGES {
            self.logged.clear();
        }
        log::warn!("tracker {url}: {message}");
        self.logged.insert(key);
    }

    /// Tells every tracker that accepted our `started` that we are leaving, all at once, each
    /// bounded by the stop timeout.
    async fn send_stopped(&mut self) {
        let mut stops = tokio::task::JoinSet::new();
        let request = self.request(Some(AnnounceEvent::Stopped));
        for tracker in self.tiers.iter_mut().flatten() {
            if !std::mem::take(&mut tracker.started) {
                continue;
            }
            let client = self.client.clone();
            let request = request.clone();
            let url = tracker.url.clone();
            let timeout = self.config.stop_timeout;
            stops.spawn(async move {
                match tokio::time::timeout(timeout, client.announce(&url, &request)).await {
                    Ok(Ok(_)) => log::debug!("tracker {url}: stopped"),
                    Ok(Err(e)) => log::debug!("tracker {url}: stopped failed: {e}"),
                    Err(_) => log::debug!("tracker {url}: stopped timed out"),
                }
            });
        }
        while stops.join_next().await.is_some() {}
    }
}
