//! `swarmfs create PATH -o OUT.torrent`: make a .torrent from a file or directory.
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::core::metainfo::Metainfo;
use crate::core::units::format_size;
use crate::create::{check_piece_length, create_from_source, scan, CreateOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// File or directory to make the torrent of.
    pub path: PathBuf,
    /// Where to write the .torrent.
    #[arg(short, long, value_name = "OUT.torrent")]
    pub output: PathBuf,
    /// Tracker announce URL; repeat for backup trackers (each becomes its own tier).
    #[arg(long = "tracker", value_name = "URL")]
    pub trackers: Vec<String>,
    /// Piece length: a power of two from 16KiB to 64MiB (binary suffixes: KiB/MiB, K/M).
    #[arg(long, default_value = "256KiB", value_parser = crate::cli::size_arg)]
    pub piece_length: u64,
    /// Mark the torrent private (BEP 27: trackers only, no DHT or peer exchange).
    #[arg(long)]
    pub private: bool,
    /// Free-text comment stored in the torrent.
    #[arg(long, value_name = "TEXT")]
    pub comment: Option<String>,
    /// Store the current time as the creation date (off by default, so output is reproducible).
    #[arg(long)]
    pub creation_date: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let piece_length = check_piece_length(args.piece_length)?;
    let creation_date = if args.creation_date {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("system clock is before 1970")?;
        Some(now.as_secs() as i64)
    } else {
        None
    };
    let opts = CreateOptions {
        piece_length,
        trackers: args.trackers.iter().map(|t| vec![t.clone()]).collect(),
        private: args.private,
        comment: args.comment,
        creation_date,
        ..CreateOptions::default()
    };
    let source = scan(&args.path)?;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(source.total_length);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "hashing {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let result = create_from_source(&source, &opts, &|done| {
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let bytes = result?;
    let metainfo = Metainfo::from_bytes(&bytes).context("the new torrent does not parse")?;
    std::fs::write(&args.output, &bytes)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let files = metainfo.info.visible_files().count();
    println!(
        "wrote {} ({}, {} file{}, {}, {} pieces of {})",
        args.output.display(),
        metainfo.info.name,
        files,
        if files == 1 { "" } else { "s" },
        format_size(metainfo.info.total_length()),
        metainfo.info.lengths.piece_count(),
        format_size(piece_length as u64),
    );
    println!("info-hash: {}", metainfo.info_hash);
    Ok(())
}
