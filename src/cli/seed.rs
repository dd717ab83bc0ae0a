//! `swarmfs seed TORRENT -d DIR` (verify, then seed) and `swarmfs seed PATH` (make the torrent,
//! write it to `<name>.torrent`, seed PATH).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::cli::common::{self, SwarmArgs};
use crate::cli::size_arg;
use crate::core::metainfo::{Metainfo, MAX_TORRENT_FILE_BYTES};
use crate::core::units::format_size;
use crate::engine::torrent::TorrentConfig;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .torrent file (its data is read from DIR/<name>), or a file or directory to make a
    /// torrent of and seed.
    pub target: PathBuf,
    /// Directory that holds the content as DIR/<name> (default: the current directory).
    #[arg(short = 'd', long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where `seed PATH` writes the torrent it makes (default: ./<name>.torrent).
    #[arg(long, value_name = "FILE")]
    pub torrent_out: Option<PathBuf>,
    /// Piece length of a torrent made by `seed PATH`.
    #[arg(long, value_name = "SIZE", default_value = "256KiB", value_parser = size_arg)]
    pub piece_length: u64,
    /// Memory for cached pieces being uploaded.
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = size_arg)]
    pub cache_size: u64,
    #[command(flatten)]
    pub swarm: SwarmArgs,
}

/// The torrent `seed TARGET` was given, or `None` when TARGET is content to make one of.
/// Every read goes through the capped [`common::load_torrent`], and a pipe or device is read
/// once only.
fn torrent_target(path: &Path) -> anyhow::Result<Option<Arc<Metainfo>>> {
    let Ok(meta) = std::fs::metadata(path) else {
        // `make_torrent` says that it does not exist.
        return Ok(None);
    };
    if meta.is_dir() {
        return Ok(None);
    }
    if !meta.is_file() {
        // A pipe (`seed <(curl ...)`) or a device cannot be content (`create` refuses them),
        // so it can only be a torrent.
        return common::load_torrent(path).map(Some);
    }
    if path.extension().is_some_and(|e| e == "torrent") {
        // Looks like a torrent: if it does not parse, say why rather than seeding the file.
        return common::load_torrent(path).map(Some);
    }
    if meta.len() > MAX_TORRENT_FILE_BYTES {
        // Too large to be a torrent: content (an ISO, a video), not worth reading here.
        return Ok(None);
    }
    // A small file that parses as a torrent is one, whatever its name.
    Ok(common::load_torrent(path).ok())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (meta, data_dir) = match torrent_target(&args.target)? {
        Some(meta) => (
            meta,
            args.data_dir.clone().unwrap_or_else(|| PathBuf::from(".")),
        ),
        None => make_torrent(&args)?,
    };
    let cfg = TorrentConfig {
        data_dir: Some(data_dir),
        cache_size: args.cache_size,
        fetch_all: true,
        ..TorrentConfig::default()
    };
    common::run_swarm(
        &args.swarm,
        &common::Source::Torrent(meta),
        &common::MetadataArgs::default(),
        cfg,
        |session, t| async move {
            let stop = common::termination_signal();
            let s = t.snapshot();
            println!(
                "seeding {} ({}), info-hash {}, peer id {}, {}/{} pieces verified",
                t.name(),
                format_size(t.lengths.total_length()),
                t.info_hash,
                hex::encode(t.peer_id),
                s.pieces_have,
                s.pieces_total
            );
            common::spawn_status_line(t.clone());
            stop.await;
            common::print_peer_sources(&t);
            common::print_uploaded(&t);
            session.shutdown().await;
            Ok(())
        },
    )
}

/// `seed PATH`: the torrent of PATH, written out; its data dir is PATH's parent.
fn make_torrent(args: &Args) -> anyhow::Result<(Arc<Metainfo>, PathBuf)> {
    let path = &args.target;
    if !path.exists() {
        anyhow::bail!("{} does not exist", path.display());
    }
    let abs = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("cannot seed the root directory")?;
    let piece_length = crate::create::check_piece_length(args.piece_length)?;
    let opts = crate::create::CreateOptions {
        piece_length,
        trackers: args
            .swarm
            .trackers
            .iter()
            .map(|t| vec![t.clone()])
            .collect(),
        ..Default::default()
    };
    let bytes = crate::create::create_torrent(&abs, &opts, &|_| {})?;
    let out = args
        .torrent_out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}.torrent")));
    std::fs::write(&out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
    println!("wrote {}", out.display());
    let meta = Metainfo::from_bytes(&bytes).context("the torrent we made does not parse")?;
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((Arc::new(meta), dir))
}
