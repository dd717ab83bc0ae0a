//! A userspace WAN link for benchmarks (this kernel has no netem): a TCP proxy in front of one
//! seeder that holds every byte `--delay-ms` in each direction and caps what the seeder sends at
//! `--rate` bytes/s, like a home uplink with a deep buffer (whatever the seeder has sent waits in
//! the proxy's queue, up to `--buffer` bytes, before it goes out at the link's rate). The cap is
//! shared by all connections through the proxy, as the seeder's uplink is. With `--announce` the
//! proxy announces itself to an HTTP tracker as the seeder, so clients only ever reach the seeder
//! through it. `--stats FILE` is rewritten every 50 ms with the bytes sent to clients.
//!
//!   cargo run --release --example wan_proxy -- --listen 127.0.0.21:7000 \
//!       --upstream 127.0.0.11:6881 --delay-ms 25 --rate 4MiB \
//!       --announce http://127.0.0.1:6969/announce --info-hash HEX
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    /// One-way delay in each direction.
    #[arg(long, default_value_t = 25)]
    delay_ms: u64,
    /// The seeder's upload cap (bytes/s; suffixes K/M/KiB/MiB).
    #[arg(long, value_parser = swarmfs::cli::size_arg)]
    rate: u64,
    /// Bytes the link's queue holds before the seeder's sends block.
    #[arg(long, default_value = "4MiB", value_parser = swarmfs::cli::size_arg)]
    buffer: u64,
    /// Announce the proxy to this tracker (every 20 s) for `--info-hash`.
    #[arg(long)]
    announce: Option<String>,
    #[arg(long)]
    info_hash: Option<String>,
    #[arg(long)]
    stats: Option<PathBuf>,
}

/// The seeder's uplink: when it is next free, shared by every connection.
struct Link {
    free_at: Mutex<Instant>,
    rate: f64,
    queue: Arc<Semaphore>,
    sent: AtomicU64,
}

impl Link {
    /// When `len` bytes handed to the link now have left it.
    fn depart(&self, len: usize) -> Instant {
        let mut free = self.free_at.lock().unwrap();
        let start = (*free).max(Instant::now());
        *free = start + Duration::from_secs_f64(len as f64 / self.rate);
        *free
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    let delay = Duration::from_millis(args.delay_ms);
    let buffer = args.buffer.clamp(64 << 10, 1 << 30) as usize;
    let link = Arc::new(Link {
        free_at: Mutex::new(Instant::now()),
        rate: args.rate.max(1) as f64,
        queue: Arc::new(Semaphore::new(buffer)),
        sent: AtomicU64::new(0),
    });
    if let (Some(url), Some(hash)) = (args.announce.clone(), args.info_hash.clone()) {
        tokio::spawn(announce_loop(url, hash, args.listen));
    }
    if let Some(path) = args.stats.clone() {
        let link = link.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let line = format!("sent {}\n", link.sent.load(Ordering::Relaxed));
                // Written whole, then renamed: a reader never sees a half-written file.
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, line).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        });
    }
    println!("proxying {} -> {}", args.listen, args.upstream);
    loop {
        let (client, _) = listener.accept().await?;
        let (upstream, link) = (args.upstream, link.clone());
        tokio::spawn(async move {
            if let Ok(seeder) = TcpStream::connect(upstream).await {
                let _ = client.set_nodelay(true);
                let _ = seeder.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = seeder.into_split();
                // Client -> seeder: delay only. Seeder -> client: the link, then the delay.
                let up = pump(cr, sw, delay, None);
                let down = pump(sr, cw, delay, Some(link));
                let _ = tokio::join!(up, down);
            }
        });
    }
}

/// Moves bytes from `rd` to `wr`, each chunk released at its departure time plus `delay`.
async fn pump(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    link: Option<Arc<Link>>,
) {
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(Instant, Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>)>();
    let reader = {
        let link = link.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let (at, permit) = match &link {
                    Some(l) => {
                        let Ok(permit) = l.queue.clone().acquire_many_owned(n as u32).await else {
                            break;
                        };
                        (l.depart(n) + delay, Some(permit))
                    }
                    None => (Instant::now() + delay, None),
                };
                if tx.send((at, buf[..n].to_vec(), permit)).is_err() {
                    break;
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes, permit)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
            drop(permit);
            if let Some(l) = &link {
                l.sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::join!(reader, writer);
}

async fn announce_loop(url: String, info_hash: String, me: SocketAddr) {
    let Ok(hash) = hex::decode(&info_hash) else {
        eprintln!("bad --info-hash");
        return;
    };
    let escaped: String = hash.iter().map(|b| format!("%{b:02x}")).collect();
    let query = format!(
        "{url}?info_hash={escaped}&peer_id=-WP0001-{:012}&port={}&uploaded=0&downloaded=0&left=0&compact=1&ip={}",
        me.port(),
        me.port(),
        me.ip()
    );
    let client = reqwest::Client::new();
    loop {
        if let Err(e) = client.get(&query).send().await {
            eprintln!("announce: {e}");
        }
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
}
