//! `swarmfs tracker`: run the built-in tracker (HTTP and UDP on one port) until SIGINT / SIGTERM.
use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;

use crate::net::tracker_server::{TrackerConfig, TrackerServer};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to serve announces and scrapes on: HTTP (http://ADDR/announce) and UDP, BEP 15
    /// (udp://ADDR/announce), on the same port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6969")]
    pub listen: SocketAddr,
    /// Seconds between announces asked of clients (peers expire after three missed ones).
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub interval: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let server = TrackerServer::bind(args.listen, TrackerConfig::with_interval(args.interval))
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "tracker listening on {}", server.announce_url())?;
        stdout.flush()?;
        wait_for_termination().await?;
        server.shutdown().await;
        Ok(())
    })
}

/// Returns on SIGINT or SIGTERM.
async fn wait_for_termination() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
