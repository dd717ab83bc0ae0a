//! Trackers end to end on 127.0.0.1: our client against our built-in tracker and against Debian's
//! opentracker, the per-torrent Announcer against our tracker, and the `swarmfs tracker` command.
mod common;

use common::trackers::{local, request, start_opentracker, watchdog, Via};
use std::net::SocketAddr;
use std::time::Duration;

use swarmfs::core::tracker_proto::{AnnounceEvent, SwarmPeer, TrackerError, TransferTotals};
use swarmfs::net::tracker::{Announcer, AnnouncerConfig, AnnouncerSetup, TrackerClient};
use swarmfs::net::tracker_server::{AnnounceSeen, TrackerConfig, TrackerServer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, mpsc, watch};

/// An info-hash with bytes that need percent-encoding (and one that form decoders turn into a space).
fn binary_hash(seed: u8) -> [u8; 20] {
    let mut hash = [0u8; 20];
    for (i, b) in hash.iter_mut().enumerate() {
        *b = seed.wrapping_add((i as u8).wrapping_mul(37));
    }
    hash[0] = b'+';
    hash[1] = 0;
    hash[2] = 0xFF;
    hash
}

async fn start_server(cfg: TrackerConfig) -> TrackerServer {
    TrackerServer::bind(local(0), cfg)
        .await
        .expect("bind tracker")
}

/// Waits for the next announce the tracker accepts from `port`.
async fn next_from(seen: &mut broadcast::Receiver<AnnounceSeen>, port: u16) -> AnnounceSeen {
    loop {
        let record = seen.recv().await.expect("tracker observer channel");
        if record.peer.port() == port {
            return record;
        }
    }
}

/// A port nothing listens on (bound, then released).
fn unused_port() -> u16 {
    let listener = std::net::TcpListener::bind(local(0)).unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn our_client_and_server_peers_find_each_other() {
    watchdog(async {
        let server = start_server(TrackerConfig::default()).await;
        let url = server.announce_url();
        let client = TrackerClient::new();
        let hash = binary_hash(1);

        let first = client
            .announce(
                &url,
                &request(hash, 1111, 100, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();
        assert!(first.peers.is_empty(), "a peer is not given itself");
        assert_eq!(first.interval, 30);
        assert_eq!((first.complete, first.incomplete), (Some(0), Some(1)));

        let second = client
            .announce(&url, &request(hash, 2222, 0, Some(AnnounceEvent::Started)))
            .await
            .unwrap();
        assert_eq!(second.peers, vec![local(1111)]);
        assert_eq!((second.complete, second.incomplete), (Some(1), Some(1)));

        let again = client
            .announce(&url, &request(hash, 1111, 100, None))
            .await
            .unwrap();
        assert_eq!(again.peers, vec![local(2222)]);

        // A different torrent is a different swarm.
        let other = client
            .announce(
                &url,
                &request(binary_hash(2), 3333, 5, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();
        assert!(other.peers.is_empty());

        client
            .announce(
                &url,
                &request(hash, 1111, 0, Some(AnnounceEvent::Completed)),
            )
            .await
            .unwrap();
        let scrape = client.scrape(&url, &[hash, binary_hash(2)]).await.unwrap();
        assert_eq!(scrape.files.len(), 2);
        let stats = scrape.files[&hash];
        assert_eq!(
            (stats.complete, stats.incomplete, stats.downloaded),
            (2, 0, 1)
        );

        client
            .announce(&url, &request(hash, 2222, 0, Some(AnnounceEvent::Stopped)))
            .await
            .unwrap();
        let after_stop = client
            .announce(&url, &request(hash, 1111, 0, None))
            .await
            .unwrap();
        assert!(
            after_stop.peers.is_empty(),
            "stopped peer still listed: {after_stop:?}"
        );
        let stats = client.scrape(&url, &[hash]).await.unwrap().files[&hash];
        assert_eq!((stats.complete, stats.incomplete), (1, 0));

        server.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn server_forgets_peers_that_stop_announcing() {
    watchdog(async {
        let server = start_server(TrackerConfig {
            interval: 1,
            peer_expiry: Duration::from_millis(300),
        })
        .await;
        let client = TrackerClient::new();
        let hash = binary_hash(3);
        client
            .announce(
                &server.announce_url(),
                &request(hash, 1111, 5, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();
        assert_eq!(server.stats(&hash).map(|s| s.incomplete), Some(1));
        // The periodic sweep removes the silent peer (the watchdog fails the test if it never does).
        while server.stats(&hash).is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let answer = client
            .announce(&server.announce_url(), &request(hash, 2222, 5, None))
            .await
            .unwrap();
        assert!(answer.peers.is_empty());
        server.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn server_answers_bad_requests_with_failure_reason() {
    watchdog(async {
        let server = start_server(TrackerConfig::default()).await;
        let short_hash = format!(
            "http://{}/announce?info_hash=abc&peer_id=x&port=1&left=0",
            server.local_addr
        );
        let body = http_get(server.local_addr, &short_hash).await;
        assert!(body.starts_with("HTTP/1.0 200"), "{body}");
        assert!(body.contains("d14:failure reason"), "{body}");
        assert!(body.contains("info_hash must be 20 bytes"), "{body}");
        server.shutdown().await;
    })
    .await
}

/// A bare HTTP/1.0 GET returning the raw response (status line, headers, body).
async fn http_get(addr: SocketAddr, url: &str) -> String {
    let path = url.split_once(&addr.to_string()).map_or(url, |(_, p)| p);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// Serves one canned HTTP response to every connection.
async fn canned_tracker(status: &'static str, body: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(local(0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut reader = BufReader::new(&mut stream);
            let mut line = String::new();
            while reader.read_line(&mut line).await.unwrap_or(0) > 2 {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body).await;
        }
    });
    addr
}

#[tokio::test]
async fn failure_reason_is_surfaced_as_failure() {
    watchdog(async {
        let client = TrackerClient::new();
        let req = request(binary_hash(4), 1111, 5, Some(AnnounceEvent::Started));
        for status in ["200 OK", "400 Bad Request"] {
            let addr = canned_tracker(status, b"d14:failure reason15:torrent unknowne").await;
            let err = client
                .announce(&format!("http://{addr}/announce"), &req)
                .await
                .unwrap_err();
            assert_eq!(
                err,
                TrackerError::Failure("torrent unknown".into()),
                "status {status}"
            );
        }
        let addr = canned_tracker("500 Internal Server Error", b"oops").await;
        let err = client
            .announce(&format!("http://{addr}/announce"), &req)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TrackerError::Http(ref m) if m.contains("500")),
            "{err:?}"
        );
        let addr = canned_tracker("200 OK", b"<html>").await;
        let err = client
            .announce(&format!("http://{addr}/announce"), &req)
            .await
            .unwrap_err();
        assert!(matches!(err, TrackerError::Malformed(_)), "{err:?}");
        let err = client
            .announce(&format!("http://{}/announce", local(unused_port())), &req)
            .await
            .unwrap_err();
        assert!(matches!(err, TrackerError::Http(_)), "{err:?}");
    })
    .await
}

#[tokio::test]
async fn our_client_against_opentracker() {
    watchdog(async {
        let hash = binary_hash(5);
        let tracker = start_opentracker(&[hash], Via::Http).await;
        let client = TrackerClient::new();

        client
            .announce(
                &tracker.url,
                &request(hash, 1111, 100, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();
        let second = client
            .announce(
                &tracker.url,
                &request(hash, 2222, 0, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();
        assert!(second.peers.contains(&local(1111)), "{second:?}");
        assert_eq!((second.complete, second.incomplete), (Some(1), Some(1)));
        assert!(second.interval > 0);

        let first = client
            .announce(&tracker.url, &request(hash, 1111, 100, None))
            .await
            .unwrap();
        assert!(first.peers.contains(&local(2222)), "{first:?}");

        let scrape = client.scrape(&tracker.url, &[hash]).await.unwrap();
        let stats = scrape.files[&hash];
        assert_eq!((stats.complete, stats.incomplete), (1, 1));

        client
            .announce(
                &tracker.url,
                &request(hash, 2222, 0, Some(AnnounceEvent::Stopped)),
            )
            .await
            .unwrap();
        let after_stop = client
            .announce(&tracker.url, &request(hash, 1111, 100, None))
            .await
            .unwrap();
        assert!(!after_stop.peers.contains(&local(2222)), "{after_stop:?}");

        // A torrent opentracker does not serve: its refusal reaches us as Failure.
        let err = client
            .announce(
                &tracker.url,
                &request(binary_hash(6), 1111, 5, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TrackerError::Failure(reason) if reason.contains("not authorized")),
            "{err:?}"
        );
    })
    .await
}

fn quick_announcer_config() -> AnnouncerConfig {
    AnnouncerConfig {
        first_retry: Duration::from_millis(200),
        max_retry: Duration::from_secs(1),
        min_announce_interval: Duration::from_millis(200),
        default_min_interval: Duration::from_millis(200),
        ..AnnouncerConfig::default()
    }
}

#[tokio::test]
async fn announcer_lifecycle_seen_by_the_tracker() {
    watchdog(async {
        let server = start_server(TrackerConfig::with_interval(1)).await;
        let mut seen = server.observe();
        let hash = binary_hash(7);
        // Another peer is already in the swarm: the announcer must hand it to us.
        TrackerClient::new()
            .announce(
                &server.announce_url(),
                &request(hash, 9999, 0, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();

        let (totals_tx, totals_rx) = watch::channel(TransferTotals {
            uploaded: 0,
            downloaded: 0,
            left: 1000,
        });
        let (peers_tx, mut peers_rx) = mpsc::unbounded_channel();
        let dead = format!("http://{}/announce", local(unused_port()));
        let announcer = Announcer::spawn(AnnouncerSetup {
            config: quick_announcer_config(),
            // A dead tracker in the first tier: BEP 12 order falls through to the next tier.
            tiers: vec![vec![dead], vec![server.announce_url()]],
            peer: SwarmPeer {
                info_hash: hash,
                peer_id: *b"-SF0100-announcer000",
                port: 4444,
            },
            totals: totals_rx,
            peers_tx,
        });

        let started = next_from(&mut seen, 4444).await;
        assert_eq!(started.event, Some(AnnounceEvent::Started));
        assert_eq!(started.left, 1000);
        assert_eq!(peers_rx.recv().await, Some(local(9999)));

        // The tracker asks for 1 s intervals: a regular re-announce follows.
        let regular = next_from(&mut seen, 4444).await;
        assert_eq!(regular.event, None);

        totals_tx.send_replace(TransferTotals {
            uploaded: 0,
            downloaded: 1000,
            left: 0,
        });
        announcer.completed();
        let completed = loop {
            let record = next_from(&mut seen, 4444).await;
            if record.event.is_some() {
                break record;
            }
        };
        assert_eq!(completed.event, Some(AnnounceEvent::Completed));
        assert_eq!(completed.left, 0);
        assert_eq!(
            server.stats(&hash).map(|s| (s.complete, s.downloaded)),
            Some((2, 1))
        );

        announcer.want_peers();
        announcer.stop().await;
        let stopped = loop {
            let record = next_from(&mut seen, 4444).await;
            if record.event.is_some() {
                break record;
            }
        };
        assert_eq!(stopped.event, Some(AnnounceEvent::Stopped));
        assert_eq!(
            server.stats(&hash).map(|s| (s.complete, s.incomplete)),
            Some((1, 0))
        );
        server.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn announcer_retries_until_the_tracker_is_up() {
    watchdog(async {
        // A listener that takes the first announce and hangs up: that attempt fails.
        let refuser = tokio::net::TcpListener::bind(local(0)).await.unwrap();
        let addr = refuser.local_addr().unwrap();
        let (_totals_tx, totals_rx) = watch::channel(TransferTotals::default());
        let (peers_tx, _peers_rx) = mpsc::unbounded_channel();
        let announcer = Announcer::spawn(AnnouncerSetup {
            config: quick_announcer_config(),
            tiers: vec![vec![format!("http://{addr}/announce")]],
            peer: SwarmPeer {
                info_hash: binary_hash(8),
                peer_id: *b"-SF0100-retrying0000",
                port: 5555,
            },
            totals: totals_rx,
            peers_tx,
        });
        let (first_attempt, _) = refuser.accept().await.unwrap();
        drop(first_attempt);
        drop(refuser);
        // The tracker comes up on that port; the back-off retry must reach it.
        let server = TrackerServer::bind(addr, TrackerConfig::default())
            .await
            .expect("rebind the released port");
        let mut seen = server.observe();
        let started = next_from(&mut seen, 5555).await;
        assert_eq!(started.event, Some(AnnounceEvent::Started));
        announcer.stop().await;
        assert_eq!(
            next_from(&mut seen, 5555).await.event,
            Some(AnnounceEvent::Stopped)
        );
        server.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn stop_without_a_working_tracker_returns_promptly() {
    watchdog(async {
        let (_totals_tx, totals_rx) = watch::channel(TransferTotals::default());
        let (peers_tx, _peers_rx) = mpsc::unbounded_channel();
        let announcer = Announcer::spawn(AnnouncerSetup {
            config: AnnouncerConfig::default(),
            tiers: vec![
                vec![format!("http://{}/announce", local(unused_port()))],
                vec!["udp://127.0.0.1:1".into()],
            ],
            peer: SwarmPeer {
                info_hash: binary_hash(9),
                peer_id: *b"-SF0100-nothing00000",
                port: 6666,
            },
            totals: totals_rx,
            peers_tx,
        });
        announcer.want_peers();
        announcer.stop().await;
    })
    .await
}

#[tokio::test]
async fn tracker_command_prints_its_address_and_exits_on_sigterm() {
    watchdog(async {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_swarmfs"))
            .args(["tracker", "--listen", "127.0.0.1:0", "--interval", "7"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await.unwrap();
        let url = line
            .trim()
            .strip_prefix("tracker listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        assert!(
            url.starts_with("http://127.0.0.1:") && url.ends_with("/announce"),
            "{url}"
        );
        let answer = TrackerClient::new()
            .announce(
                &url,
                &request(binary_hash(10), 1111, 5, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();
        assert_eq!(answer.interval, 7);

        let pid = child.id().unwrap() as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = child.wait().await.unwrap();
        assert!(status.success(), "{status}");
    })
    .await
}
