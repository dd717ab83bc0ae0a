//! Helpers for the tracker tests (HTTP and UDP): announce requests, a watchdog for async tests,
//! and Debian's opentracker on free loopback ports.
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use swarmfs::core::tracker_proto::{AnnounceEvent, AnnounceRequest, SwarmPeer, TransferTotals};
use swarmfs::net::tracker::TrackerClient;
use swarmfs::net::udp_tracker::UdpSchedule;

/// Every async test runs under this so a hang is a failure, not a stuck suite.
pub async fn watchdog<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .expect("test did not finish within 30 s")
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An announce from a peer on `port` (its peer id ends with the port).
pub fn request(
    info_hash: [u8; 20],
    port: u16,
    left: u64,
    event: Option<AnnounceEvent>,
) -> AnnounceRequest {
    let mut peer_id = *b"-SF0100-000000000000";
    peer_id[14..].copy_from_slice(format!("{port:06}").as_bytes());
    AnnounceRequest {
        peer: SwarmPeer {
            info_hash,
            peer_id,
            port,
        },
        totals: TransferTotals {
            left,
            ..TransferTotals::default()
        },
        event,
        numwant: 50,
    }
}

/// A UDP port nothing listens on (bound, then released).
pub fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind(local(0)).unwrap();
    socket.local_addr().unwrap().port()
}

/// A schedule scaled down from BEP 15's 15 s base, with all of the spec's sends.
pub fn quick_schedule() -> UdpSchedule {
    UdpSchedule {
        retry_base: Duration::from_millis(50),
        ..UdpSchedule::default()
    }
}

/// Which of opentracker's two listeners `OpenTracker::url` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Http,
    Udp,
}

/// opentracker serving only `whitelisted` (Debian's build whitelists), HTTP and UDP on free
/// loopback ports; `url` is the announce URL of one of them.
pub struct OpenTracker {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

/// A torrent every opentracker here also serves, announced to until the whitelist is loaded.
const OPENTRACKER_PROBE: [u8; 20] = [0x9B; 20];

pub async fn start_opentracker(whitelisted: &[[u8; 20]], via: Via) -> OpenTracker {
    let dir = tempfile::tempdir().unwrap();
    let list: String = whitelisted
        .iter()
        .chain([&OPENTRACKER_PROBE])
        .map(|h| hex::encode(h) + "\n")
        .collect();
    std::fs::write(dir.path().join("whitelist.txt"), list).unwrap();
    let tcp_port = super::free_port();
    let udp_port = free_udp_port();
    // opentracker chroots to -d and reads the whitelist from there, so the name is relative.
    let spawned = tokio::process::Command::new("opentracker")
        .args(["-i", "127.0.0.1", "-p", &tcp_port.to_string()])
        .args(["-P", &udp_port.to_string(), "-w", "whitelist.txt"])
        .arg("-d")
        .arg(dir.path())
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("opentracker is not installed; scripts/test.sh installs it")
        }
        Err(e) => panic!("cannot start opentracker: {e}"),
    };
    // Ready means: it accepts a `started` for the probe torrent (before it listens the port is
    // refused; before it has read the whitelist every torrent is refused, except that a
    // `stopped` is answered for any torrent, so that is no sign). The probe's own swarm keeps
    // the tested ones clean.
    let url = match via {
        Via::Http => format!("http://127.0.0.1:{tcp_port}/announce"),
        Via::Udp => format!("udp://127.0.0.1:{udp_port}/announce"),
    };
    let client = TrackerClient::with_udp_schedule(quick_schedule());
    let probe = request(OPENTRACKER_PROBE, 1, 0, Some(AnnounceEvent::Started));
    while client.announce(&url, &probe).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    OpenTracker {
        _child: child,
        _dir: dir,
        url,
    }
}
