//! `swarmfs dht --listen ADDR`: run a standalone DHT node until SIGINT / SIGTERM: the first node
//! of a private swarm, or a bootstrap node for tests and local networks.
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::cli::common::{termination_signal, DhtArgs};
use crate::net::dht::DhtNode;

/// How often `-v` logs the node's counts.
const STATS_EVERY: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// UDP address to run the node on.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Without --dht-bootstrap the node joins nothing: it waits for others to join through it.
    #[command(flatten)]
    pub dht: DhtArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut settings = args.dht.settings();
        if args.dht.bootstrap.is_empty() {
            // A standalone node is a swarm's first node: the public routers are not its business.
            settings.bootstrap.clear();
        }
        let socket = tokio::net::UdpSocket::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on UDP {}", args.listen))?;
        let node = DhtNode::start(socket, settings)?;
        let mut stdout = std::io::stdout();
        writeln!(
            stdout,
            "dht node listening on {} (id {})",
            node.local_addr(),
            hex::encode(node.id().0)
        )?;
        stdout.flush()?;
        let mut every = tokio::time::interval(STATS_EVERY);
        let stop = termination_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = every.tick() => {
                    let s = node.stats();
                    log::info!("dht: {} nodes, {} torrents, {} peers stored", s.nodes, s.torrents_stored, s.peers_stored);
                }
            }
        }
        let s = node.stats();
        node.shutdown().await;
        println!(
            "dht: {} nodes, {} torrents, {} peers stored",
            s.nodes, s.torrents_stored, s.peers_stored
        );
        Ok(())
    })
}
