//! `swarmfs dht --listen ADDR`: run a standalone DHT node until SIGINT / SIGTERM: the first node
//! of a private swarm, or a bootstrap node for tests and local networks.
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use tokio::signal::unix::{signal, SignalKind};

use crate::cli::common::DhtArgs;
use crate::net::dht::DhtNode;

/// How often `-v` logs the node's counts.
const STATS_EVERY: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// UDP address to run the node on.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Without --dht-bootstrap the node joins nothing: it waits for others to join through it;
    /// without --dht-state it keeps no table between runs.
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
        if args.dht.state.is_none() {
            // Nor is the table of real use: a private swarm's nodes must not end up in it.
            settings.state_file = None;
        }
        let socket = tokio::net::UdpSocket::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on UDP {}", args.listen))?;
        let node = DhtNode::start(socket, settings)?;
        // Listening for signals before saying we run: a SIGTERM right after that line must stop
        // us cleanly (and save the table), not kill us.
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut stdout = std::io::stdout();
        writeln!(
            stdout,
            "dht node listening on {} (id {})",
            node.local_addr(),
            hex::encode(node.id().0)
        )?;
        stdout.flush()?;
        let mut every = tokio::time::interval(STATS_EVERY);
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
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
