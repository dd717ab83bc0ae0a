//! `swarmfs download TORRENT|MAGNET -d DIR`: fetch the whole torrent into `DIR/<name>`,
//! resuming from whatever verified data is already there, then exit (with `--seed`, seed until
//! interrupted instead). A magnet link's metadata is fetched first and kept in DIR.

use std::path::PathBuf;
use std::time::Instant;

use crate::cli::common::{self, MetadataArgs, Source, SwarmArgs};
use crate::core::units::format_size;
use crate::engine::torrent::TorrentConfig;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .torrent file or a magnet link.
    #[arg(value_name = "TORRENT|MAGNET")]
    pub source: String,
    /// Directory that holds the content as DIR/<name> (default: the current directory).
    #[arg(short = 'd', long, value_name = "DIR", default_value = ".")]
    pub data_dir: PathBuf,
    /// Once complete, keep seeding until interrupted (Ctrl-C or SIGTERM), then say how much was
    /// uploaded.
    #[arg(long)]
    pub seed: bool,
    #[command(flatten)]
    pub metadata: MetadataArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let source = Source::parse(&args.source)?;
    let seed_after = args.seed;
    let cfg = TorrentConfig {
        data_dir: Some(args.data_dir.clone()),
        // Verified pieces go to disk; the cache only serves uploads to other leechers.
        cache_size: 16 << 20,
        fetch_all: true,
        ..TorrentConfig::default()
    };
    common::run_swarm(
        &args.swarm,
        &source,
        &args.metadata,
        cfg,
        |session, t| async move {
            let total = t.meta.info.lengths.total_length();
            let started = Instant::now();
            let start_bytes = t.snapshot().downloaded;
            common::spawn_status_line(t.clone());
            let done = t.wait_complete();
            let mut stop = std::pin::pin!(common::termination_signal());
            tokio::select! {
                _ = done => {}
                _ = &mut stop => {
                    session.shutdown().await;
                    anyhow::bail!("interrupted; run the same command again to resume");
                }
            }
            let secs = started.elapsed().as_secs_f64();
            let got = t.snapshot().downloaded - start_bytes;
            println!(
                "downloaded {} ({}) in {:.1} s, {}/s",
                t.name(),
                format_size(total),
                secs,
                format_size((got as f64 / secs.max(0.001)) as u64)
            );
            common::print_peer_sources(&t);
            // Where the bytes came from: tests and curious users read these lines.
            for (id, addr, bytes) in t.received_by_peer() {
                println!(
                    "received {bytes} bytes from peer {} at {addr}",
                    hex::encode(id)
                );
            }
            if seed_after {
                println!("seeding until interrupted");
                common::flush_stdout();
                stop.await;
                common::print_uploaded(&t);
            }
            session.shutdown().await;
            Ok(())
        },
    )
}
