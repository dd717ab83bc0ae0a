//! UDP trackers (BEP 15) end to end on loopback: our client against Debian's opentracker and our
//! built-in tracker (IPv4 and IPv6), retransmission against a tracker that drops packets, the
//! Announcer moving past silent UDP trackers, ICMP refusal, and a download whose only tracker is
//! a udp:// URL.
mod common;

use common::trackers::{
    free_udp_port, local, quick_schedule, request, start_opentracker, watchdog, Via,
};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use swarmfs::core::tracker_proto::{
    AnnounceEvent, AnnounceResponse, SwarmPeer, TrackerError, TransferTotals,
};
use swarmfs::core::udp_tracker::{
    decode_request, encode_announce_response, encode_connect_response, encode_error, RequestKind,
};
use swarmfs::net::tracker::{Announcer, AnnouncerConfig, AnnouncerSetup, TrackerClient};
use swarmfs::net::tracker_server::{TrackerConfig, TrackerServer};
use swarmfs::net::udp_tracker::UdpSchedule;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

fn hash(seed: u8) -> [u8; 20] {
    let mut hash = [seed; 20];
    hash[0] = 0;
    hash[19] = 0xFF;
    hash
}

#[tokio::test]
async fn our_client_against_opentracker_over_udp() {
    watchdog(async {
        let info_hash = hash(1);
        let tracker = start_opentracker(&[info_hash], Via::Udp).await;
        let client = TrackerClient::new();

        // (opentracker may list the asking peer itself: no assertion on the first answer.)
        client
            .announce(
                &tracker.url,
                &request(info_hash, 1111, 100, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();
        let second = client
            .announce(
                &tracker.url,
                &request(info_hash, 2222, 0, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();
        assert!(second.peers.contains(&local(1111)), "{second:?}");
        assert_eq!((second.complete, second.incomplete), (Some(1), Some(1)));
        assert!(second.interval > 0);

        let scrape = client.scrape(&tracker.url, &[info_hash]).await.unwrap();
        let stats = scrape.files[&info_hash];
        assert_eq!((stats.complete, stats.incomplete), (1, 1));

        // A torrent opentracker does not serve: it answers a bare 8-byte announce header (no
        // counts, no peers), which must fail the announce, not pass as an empty peer list.
        let err = client
            .announce(
                &tracker.url,
                &request(hash(2), 1111, 5, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, TrackerError::Failure(_) | TrackerError::Malformed(_)),
            "{err:?}"
        );
    })
    .await
}

/// Two announces and a scrape through `url` (a udp:// URL of our tracker), from peers on `ip`.
async fn two_peers_find_each_other(server: &TrackerServer, ip: std::net::IpAddr) {
    let url = server.udp_announce_url();
    let client = TrackerClient::new();
    let info_hash = hash(3);
    let first = client
        .announce(
            &url,
            &request(info_hash, 1111, 100, Some(AnnounceEvent::Started)),
        )
        .await
        .unwrap();
    assert!(first.peers.is_empty(), "a peer is not given itself");
    assert_eq!(first.interval, 30);
    let second = client
        .announce(
            &url,
            &request(info_hash, 2222, 0, Some(AnnounceEvent::Started)),
        )
        .await
        .unwrap();
    assert_eq!(second.peers, vec![SocketAddr::new(ip, 1111)]);
    assert_eq!((second.complete, second.incomplete), (Some(1), Some(1)));
    // The HTTP side shares the peer store.
    let over_http = client
        .announce(
            &server.announce_url(),
            &request(info_hash, 3333, 0, Some(AnnounceEvent::Started)),
        )
        .await
        .unwrap();
    assert_eq!(over_http.peers.len(), 2, "{over_http:?}");

    client
        .announce(
            &url,
            &request(info_hash, 1111, 0, Some(AnnounceEvent::Completed)),
        )
        .await
        .unwrap();
    let scrape = client.scrape(&url, &[info_hash, hash(4)]).await.unwrap();
    let stats = scrape.files[&info_hash];
    assert_eq!(
        (stats.complete, stats.incomplete, stats.downloaded),
        (3, 0, 1)
    );
    assert_eq!(
        scrape.files[&hash(4)].complete,
        0,
        "unknown torrents count 0"
    );
    // More than fit in one UDP scrape (74) are asked in several.
    let many: Vec<[u8; 20]> = (0..100u8).map(|i| [i; 20]).chain([info_hash]).collect();
    let scrape = client.scrape(&url, &many).await.unwrap();
    assert_eq!(scrape.files.len(), many.len());
    assert_eq!(scrape.files[&info_hash].complete, 3);
}

#[tokio::test]
async fn our_client_and_tracker_over_udp_on_ipv4_and_ipv6() {
    watchdog(async {
        let server = TrackerServer::bind(local(0), TrackerConfig::default())
            .await
            .unwrap();
        two_peers_find_each_other(&server, local(0).ip()).await;
        server.shutdown().await;

        let v6: SocketAddr = "[::1]:0".parse().unwrap();
        match TrackerServer::bind(v6, TrackerConfig::default()).await {
            Ok(server) => {
                two_peers_find_each_other(&server, v6.ip()).await;
                server.shutdown().await;
            }
            Err(e) => eprintln!("note: skipping the IPv6 case, cannot bind [::1]: {e}"),
        }
    })
    .await
}

/// A UDP tracker on 127.0.0.1 that ignores the first `drop_connects` connect requests and the
/// first `drop_announces` announces, then answers with `peers`; it counts what it receives and
/// refuses announces without the connection id it gave.
struct FlakyTracker {
    url: String,
    connects: Arc<AtomicUsize>,
    announces: Arc<AtomicUsize>,
}

async fn flaky_tracker(
    drop_connects: usize,
    drop_announces: usize,
    peers: Vec<SocketAddr>,
) -> FlakyTracker {
    const CONNECTION_ID: u64 = 0x5eed_5eed_5eed_5eed;
    let socket = UdpSocket::bind(local(0)).await.unwrap();
    let url = format!("udp://{}/announce", socket.local_addr().unwrap());
    let connects = Arc::new(AtomicUsize::new(0));
    let announces = Arc::new(AtomicUsize::new(0));
    let (seen_connects, seen_announces) = (connects.clone(), announces.clone());
    tokio::spawn(async move {
        let mut packet = vec![0u8; 2048];
        while let Ok((len, from)) = socket.recv_from(&mut packet).await {
            let Ok(request) = decode_request(&packet[..len]) else {
                continue;
            };
            let mut answer = Vec::new();
            match request.kind {
                RequestKind::Connect => {
                    if seen_connects.fetch_add(1, Ordering::SeqCst) < drop_connects {
                        continue;
                    }
                    encode_connect_response(request.transaction_id, CONNECTION_ID, &mut answer);
                }
                RequestKind::Announce { .. } if request.connection_id != CONNECTION_ID => {
                    encode_error(request.transaction_id, "bad connection id", &mut answer);
                }
                RequestKind::Announce { .. } => {
                    if seen_announces.fetch_add(1, Ordering::SeqCst) < drop_announces {
                        continue;
                    }
                    let response = AnnounceResponse {
                        interval: 60,
                        min_interval: None,
                        peers: peers.clone(),
                        complete: Some(1),
                        incomplete: Some(0),
                        warning: None,
                    };
                    encode_announce_response(request.transaction_id, &response, false, &mut answer);
                }
                RequestKind::Scrape(_) => continue,
            }
            let _ = socket.send_to(&answer, from).await;
        }
    });
    FlakyTracker {
        url,
        connects,
        announces,
    }
}

#[tokio::test]
async fn client_retransmits_until_the_tracker_answers() {
    watchdog(async {
        let client = TrackerClient::with_udp_schedule(quick_schedule());
        let req = request(hash(5), 1111, 5, Some(AnnounceEvent::Started));

        // Lost connects: the connect is sent again until one is answered.
        let tracker = flaky_tracker(3, 0, vec![local(7001)]).await;
        let answer = client.announce(&tracker.url, &req).await.unwrap();
        assert_eq!(answer.peers, vec![local(7001)]);
        assert_eq!(tracker.connects.load(Ordering::SeqCst), 4);
        assert_eq!(tracker.announces.load(Ordering::SeqCst), 1);

        // Lost announces: the announce is sent again with the connection id already held.
        let tracker = flaky_tracker(0, 2, vec![local(7002)]).await;
        let answer = client.announce(&tracker.url, &req).await.unwrap();
        assert_eq!(answer.peers, vec![local(7002)]);
        assert_eq!(tracker.connects.load(Ordering::SeqCst), 1);
        assert_eq!(tracker.announces.load(Ordering::SeqCst), 3);

        // A clone shares the cached connection id: no new connect within the minute.
        let answer = client.clone().announce(&tracker.url, &req).await.unwrap();
        assert_eq!(answer.peers, vec![local(7002)]);
        assert_eq!(tracker.connects.load(Ordering::SeqCst), 1);
        assert_eq!(tracker.announces.load(Ordering::SeqCst), 4);

        // A tracker that never answers: the schedule runs out and the exchange fails.
        let few = TrackerClient::with_udp_schedule(UdpSchedule {
            retry_base: Duration::from_millis(20),
            attempts: 3,
        });
        let silent = flaky_tracker(usize::MAX, 0, vec![]).await;
        assert_eq!(
            few.announce(&silent.url, &req).await.unwrap_err(),
            TrackerError::Timeout
        );
        assert_eq!(silent.connects.load(Ordering::SeqCst), 3);
    })
    .await
}

/// A bound UDP socket that reads and counts packets and never answers.
async fn silent_tracker() -> (String, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind(local(0)).await.unwrap();
    let url = format!("udp://{}/announce", socket.local_addr().unwrap());
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        let mut packet = [0u8; 2048];
        while socket.recv_from(&mut packet).await.is_ok() {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (url, received)
}

#[tokio::test]
async fn announcer_moves_past_silent_udp_trackers() {
    watchdog(async {
        let server = TrackerServer::bind(local(0), TrackerConfig::default())
            .await
            .unwrap();
        let info_hash = hash(6);
        // A peer already in the swarm of the working tracker: the announcer must hand it to us.
        TrackerClient::new()
            .announce(
                &server.udp_announce_url(),
                &request(info_hash, 9999, 0, Some(AnnounceEvent::Started)),
            )
            .await
            .unwrap();
        let (silent_a, sent_a) = silent_tracker().await;
        let (silent_b, sent_b) = silent_tracker().await;
        let (silent_c, _) = silent_tracker().await;
        let (_totals_tx, totals) = watch::channel(TransferTotals::default());
        let (peers_tx, mut peers_rx) = mpsc::unbounded_channel();
        // With the spec's full schedule (9 sends) each silent tracker would hold the round for
        // 50 ms * 511 = 25 s, and the watchdog would fail the test.
        let config = AnnouncerConfig {
            udp: UdpSchedule {
                retry_base: Duration::from_millis(50),
                ..AnnouncerConfig::default().udp
            },
            ..AnnouncerConfig::default()
        };
        assert_eq!(config.udp.attempts, 2);
        let announcer = Announcer::spawn(AnnouncerSetup {
            config,
            // Tier 1 is silent throughout; in tier 2 the silent one may come first (shuffled).
            tiers: vec![
                vec![silent_a, silent_b],
                vec![silent_c, server.udp_announce_url()],
            ],
            peer: SwarmPeer {
                info_hash,
                peer_id: *b"-SF0100-movingon0000",
                port: 4444,
            },
            totals,
            peers_tx,
        });
        assert_eq!(peers_rx.recv().await, Some(local(9999)));
        assert!(sent_a.load(Ordering::SeqCst) >= 1);
        assert!(sent_b.load(Ordering::SeqCst) >= 1);
        announcer.stop().await;
        server.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn refused_port_fails_at_once_not_after_the_schedule() {
    watchdog(async {
        // The spec's schedule (15 s, then 30 s, ...): only the ICMP refusal can end this within
        // the watchdog.
        let client = TrackerClient::new();
        let url = format!("udp://{}/announce", local(free_udp_port()));
        let err = client
            .announce(&url, &request(hash(7), 1111, 5, None))
            .await
            .unwrap_err();
        assert!(matches!(err, TrackerError::Network(_)), "{err:?}");
        let err = client.scrape(&url, &[hash(7)]).await.unwrap_err();
        assert!(matches!(err, TrackerError::Network(_)), "{err:?}");
    })
    .await
}

#[test]
fn download_whose_only_tracker_is_udp_is_byte_identical() {
    use common::*;
    let tmp = tempfile::tempdir().unwrap();
    let (_tracker, http_url) = tracker(&tmp.path().join("tracker.log"), &[]);
    // The tracker answers UDP on its HTTP port.
    let udp_url = http_url.replacen("http://", "udp://", 1);
    assert!(udp_url.starts_with("udp://127.0.0.1:"), "{udp_url}");
    let src = tmp.path().join("src");
    write_file(&src.join("file.bin"), 3 * 1024 * 1024 + 777, 15);
    let torrent = tmp.path().join("file.torrent");
    create_torrent(&src.join("file.bin"), &torrent, &["--tracker", &udp_url]);
    let info_hash =
        swarmfs::core::metainfo::Metainfo::from_bytes(&std::fs::read(&torrent).unwrap())
            .unwrap()
            .info_hash
            .0;
    let (_seed, _addr) = seeder(&src, &torrent, &tmp.path().join("seed.log"), &[]);

    // The download starts once the tracker knows the seeder (it announced over UDP).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(watchdog(async {
        let client = TrackerClient::with_udp_schedule(quick_schedule());
        loop {
            if let Ok(scrape) = client.scrape(&udp_url, &[info_hash]).await {
                if scrape
                    .files
                    .get(&info_hash)
                    .is_some_and(|s| s.complete == 1)
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }));

    let dst = tmp.path().join("dst");
    let mut download = download(&torrent, &dst, &tmp.path().join("dl.log"), &[]);
    let status = download.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "download failed: {}", download.stderr());
    assert_same_tree(&src.join("file.bin"), &dst.join("file.bin"));
}
