//! Trackers that misbehave, served by hand on 127.0.0.1: 500s, garbage, a 100 MiB body, a reply
//! that never ends, a million peers, a redirect loop, a slow trickle. Each announce ends with an
//! error within its (scaled) timeout, without reading more than the body cap, and an
//! announcer whose first tier is such a tracker still reaches the honest tracker of its second
//! tier. The built-in tracker refuses a 1 MB request line and keeps serving.
mod common;

use std::time::Duration;

use common::trackers::{local, request, watchdog};
use swarmfs::core::tracker_proto::{AnnounceEvent, SwarmPeer, TrackerError, TransferTotals};
use swarmfs::net::tracker::{Announcer, AnnouncerConfig, AnnouncerSetup, TrackerClient};
use swarmfs::net::tracker_server::{TrackerConfig, TrackerServer};
use swarmfs::net::udp_tracker::UdpSchedule;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// The scaled announce timeout these tests give the client (15 s in real use).
const HTTP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Hostile {
    ServerError,
    Garbage,
    HugeBody,
    NeverEnds,
    MillionPeers,
    RedirectLoop,
    SlowTrickle,
}

const ALL: [Hostile; 7] = [
    Hostile::ServerError,
    Hostile::Garbage,
    Hostile::HugeBody,
    Hostile::NeverEnds,
    Hostile::MillionPeers,
    Hostile::RedirectLoop,
    Hostile::SlowTrickle,
];

/// Serves `mode` to every connection; returns the announce URL.
async fn hostile_tracker(mode: Hostile) -> String {
    let listener = TcpListener::bind(local(0)).await.unwrap();
    let url = format!("http://{}/announce", listener.local_addr().unwrap());
    let target = url.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(&mut stream);
                let mut line = String::new();
                while reader.read_line(&mut line).await.unwrap_or(0) > 2 {
                    line.clear();
                }
                // Errors mean the client hung up, which is what these trackers make it do.
                let _ = serve(&mut stream, mode, &target).await;
            });
        }
    });
    url
}

async fn serve(s: &mut tokio::net::TcpStream, mode: Hostile, url: &str) -> std::io::Result<()> {
    let head = |status: &str, extra: &str| format!("HTTP/1.1 {status}\r\n{extra}\r\n");
    match mode {
        Hostile::ServerError => {
            s.write_all(head("500 Internal Server Error", "Content-Length: 4\r\n").as_bytes())
                .await?;
            s.write_all(b"oops").await
        }
        Hostile::Garbage => {
            let body = b"<html>this is not bencode</html>";
            let h = head("200 OK", &format!("Content-Length: {}\r\n", body.len()));
            s.write_all(h.as_bytes()).await?;
            s.write_all(body).await
        }
        Hostile::HugeBody => {
            s.write_all(head("200 OK", "Content-Length: 104857600\r\n").as_bytes())
                .await?;
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..1600 {
                s.write_all(&chunk).await?;
            }
            Ok(())
        }
        Hostile::NeverEnds => {
            s.write_all(head("200 OK", "Transfer-Encoding: chunked\r\n").as_bytes())
                .await?;
            loop {
                s.write_all(b"1\r\nd\r\n").await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Hostile::MillionPeers => {
            let peers = 1_000_000 * 6;
            let h = format!("d8:intervali1800e5:peers{peers}:");
            let body_len = h.len() + peers + 1;
            let h2 = head("200 OK", &format!("Content-Length: {body_len}\r\n"));
            s.write_all(h2.as_bytes()).await?;
            s.write_all(h.as_bytes()).await?;
            let chunk = [127, 0, 0, 1, 0x1A, 0xE1].repeat(10_000);
            for _ in 0..100 {
                s.write_all(&chunk).await?;
            }
            s.write_all(b"e").await
        }
        Hostile::RedirectLoop => {
            let h = head(
                "302 Found",
                &format!("Location: {url}?again=1\r\nContent-Length: 0\r\n"),
            );
            s.write_all(h.as_bytes()).await
        }
        Hostile::SlowTrickle => {
            s.write_all(head("200 OK", "Content-Length: 100\r\n").as_bytes())
                .await?;
            for b in b"d8:intervali1800e5:peers0:e".iter().cycle().take(100) {
                s.write_all(&[*b]).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(())
        }
    }
}

fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib << 10
}

#[tokio::test]
async fn each_hostile_tracker_fails_its_announce_in_time_without_reading_past_the_cap() {
    watchdog(async {
        let client = TrackerClient::with_timeouts(HTTP_TIMEOUT, UdpSchedule::default());
        for mode in ALL {
            let url = hostile_tracker(mode).await;
            // Peak memory of this process, from here (writing 5 resets it to the current).
            std::fs::write("/proc/self/clear_refs", "5").unwrap();
            let before = peak_rss();
            let started = std::time::Instant::now();
            let req = request([9; 20], 4242, 5, Some(AnnounceEvent::Started));
            // A watchdog at ten times the timeout: the client's own timeout must end it.
            let err = tokio::time::timeout(10 * HTTP_TIMEOUT, client.announce(&url, &req))
                .await
                .unwrap_or_else(|_| panic!("{mode:?}: the announce outlived its timeout"))
                .expect_err("a hostile tracker's announce fails");
            let took = started.elapsed();
            let grew = peak_rss().saturating_sub(before);
            eprintln!(
                "{mode:?}: {err} after {took:?}, peak RSS +{} KiB",
                grew >> 10
            );
            let expected = match mode {
                Hostile::ServerError => matches!(&err, TrackerError::Http(m) if m.contains("500")),
                Hostile::Garbage => matches!(err, TrackerError::Malformed(_)),
                Hostile::HugeBody | Hostile::MillionPeers => {
                    matches!(&err, TrackerError::Malformed(m) if m.contains("larger than"))
                }
                Hostile::NeverEnds | Hostile::SlowTrickle => matches!(err, TrackerError::Timeout),
                Hostile::RedirectLoop => matches!(err, TrackerError::Http(_)),
            };
            assert!(expected, "{mode:?}: unexpected error {err:?}");
            assert!(
                grew < 32 << 20,
                "{mode:?}: peak RSS grew by {} MiB",
                grew >> 20
            );
        }
    })
    .await
}

/// An announcer whose first tier is a hostile tracker reaches the honest one of its second tier.
#[tokio::test]
async fn other_tiers_keep_working_behind_a_hostile_tracker() {
    watchdog(async {
        let honest = TrackerServer::bind(local(0), TrackerConfig::default())
            .await
            .unwrap();
        let mut seen = honest.observe();
        let mut announcers = Vec::new();
        for (i, mode) in ALL.iter().enumerate() {
            let (_totals_tx, totals) = watch::channel(TransferTotals::default());
            let (peers_tx, _peers_rx) = mpsc::unbounded_channel();
            let announcer = Announcer::spawn(AnnouncerSetup {
                config: AnnouncerConfig {
                    http_timeout: HTTP_TIMEOUT,
                    ..AnnouncerConfig::default()
                },
                tiers: vec![
                    vec![hostile_tracker(*mode).await],
                    vec![honest.announce_url()],
                ],
                peer: SwarmPeer {
                    info_hash: [i as u8 + 1; 20],
                    peer_id: [b'h'; 20],
                    port: 7000 + i as u16,
                },
                totals,
                peers_tx,
            });
            announcers.push((announcer, _totals_tx, _peers_rx));
        }
        let mut reached = std::collections::HashSet::new();
        while reached.len() < ALL.len() {
            let record = seen.recv().await.expect("the honest tracker's observer");
            reached.insert(record.peer.port());
        }
        honest.shutdown().await;
    })
    .await
}

/// A 1 MB request line gets an error (or a closed connection), not a stalled or dead tracker.
#[tokio::test]
async fn the_built_in_tracker_refuses_a_1_mb_request_line_and_keeps_serving() {
    watchdog(async {
        let server = TrackerServer::bind(local(0), TrackerConfig::default())
            .await
            .unwrap();
        let mut stream = tokio::net::TcpStream::connect(server.local_addr)
            .await
            .unwrap();
        let line = format!("GET /announce?{} HTTP/1.1\r\n\r\n", "a".repeat(1 << 20));
        // The server may hang up before it has read all of it.
        let _ = stream.write_all(line.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
        let client = TrackerClient::new();
        let req = request([3; 20], 5151, 0, Some(AnnounceEvent::Started));
        client
            .announce(&server.announce_url(), &req)
            .await
            .expect("an honest announce is still served");
        server.shutdown().await;
    })
    .await
}
