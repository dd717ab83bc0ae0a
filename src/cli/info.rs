//! `swarmfs info TORRENT|MAGNET [--json] [--fetch]`: show what a .torrent or a magnet link
//! holds; with `--fetch`, a magnet's metadata is fetched from the swarm and shown as a torrent's.
use serde_json::json;

use crate::cli::common::{self, MetadataArgs, Source, SwarmArgs};
use crate::core::metainfo::{Magnet, Metainfo};
use crate::core::units::format_size;
use crate::engine::session::{bind_listener, Session};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .torrent file or a magnet link.
    #[arg(value_name = "TORRENT|MAGNET")]
    pub source: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// For a magnet link: fetch the metadata from the swarm (its x.pe peers and trackers, or
    /// --peer / --tracker) and show the torrent.
    #[arg(long)]
    pub fetch: bool,
    #[command(flatten)]
    pub metadata: MetadataArgs,
    #[command(flatten, next_help_heading = "Joining the swarm (with --fetch)")]
    pub swarm: SwarmArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let source = Source::parse(&args.source)?;
    let metainfo = match &source {
        Source::Torrent(meta) => meta.clone(),
        Source::Magnet(magnet) if !args.fetch => {
            if args.json {
                println!("{}", magnet_json(magnet));
            } else {
                print!("{}", magnet_text(magnet));
            }
            return Ok(());
        }
        Source::Magnet(_) => fetch(&args, &source)?,
    };
    if args.json {
        println!("{}", torrent_json(&metainfo));
    } else {
        print!("{}", torrent_text(&metainfo));
    }
    Ok(())
}

/// Joins the swarm only for as long as fetching the metadata takes.
fn fetch(args: &Args, source: &Source) -> anyhow::Result<std::sync::Arc<Metainfo>> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = bind_listener(args.swarm.listen).await?;
        let session = Session::start(listener, args.swarm.session_config())?;
        let shown = common::is_terminal();
        let resolved = common::resolve(&session, source, &args.swarm, &args.metadata, None, |p| {
            if shown {
                eprint!("\r{}", common::fetch_progress_line(p));
            }
        })
        .await;
        if shown {
            eprintln!();
        }
        session.shutdown().await;
        Ok(resolved?.meta)
    })
}

pub fn torrent_json(m: &Metainfo) -> serde_json::Value {
    let files: Vec<_> = m
        .info
        .visible_files()
        .map(|(_, f)| match &f.original {
            Some(original) => {
                json!({ "path": f.display_path(), "length": f.length, "original": original })
            }
            None => json!({ "path": f.display_path(), "length": f.length }),
        })
        .collect();
    json!({
        "name": m.info.name,
        "original_name": m.info.original_name,
        "info_hash": m.info_hash.to_hex(),
        "total_size": m.info.total_length(),
        "piece_length": m.info.piece_length,
        "piece_count": m.info.lengths.piece_count(),
        "multi_file": m.info.multi_file,
        "files": files,
        "trackers": m.trackers(),
        "private": m.info.private,
        "comment": m.comment,
        "created_by": m.created_by,
        "creation_date": m.creation_date,
        "magnet": m.magnet().to_uri(),
    })
}

pub fn torrent_text(m: &Metainfo) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<14}{value}\n"));
    line("name:", m.info.name.clone());
    if let Some(original) = &m.info.original_name {
        line("", format!("(sanitized from {original:?})"));
    }
    line("info-hash:", m.info_hash.to_hex());
    line(
        "total size:",
        format!(
            "{} ({} bytes)",
            format_size(m.info.total_length()),
            m.info.total_length()
        ),
    );
    line(
        "pieces:",
        format!(
            "{} x {}",
            m.info.lengths.piece_count(),
            format_size(m.info.piece_length as u64)
        ),
    );
    line("private:", if m.info.private { "yes" } else { "no" }.into());
    if let Some(c) = &m.comment {
        line("comment:", c.clone());
    }
    if let Some(c) = &m.created_by {
        line("created by:", c.clone());
    }
    if let Some(d) = m.creation_date {
        line("created on:", format_unix_time(d));
    }
    let trackers = m.trackers();
    if trackers.is_empty() {
        line("trackers:", "none".into());
    } else {
        out.push_str("trackers:\n");
        for (i, tier) in trackers.iter().enumerate() {
            for url in tier {
                out.push_str(&format!("  tier {}: {url}\n", i + 1));
            }
        }
    }
    let files: Vec<_> = m.info.visible_files().collect();
    out.push_str(&format!("files ({}):\n", files.len()));
    for (_, f) in files {
        out.push_str(&format!(
            "  {:>10}  {}\n",
            format_size(f.length),
            f.display_path()
        ));
    }
    // Names are sanitized as libtorrent does; say which, so nobody looks for the written ones.
    let renamed: Vec<_> = m.info.renamed_files().collect();
    if !renamed.is_empty() {
        out.push_str(&format!("sanitized names ({}):\n", renamed.len()));
        for f in renamed {
            let original = f.original.as_deref().unwrap_or_default();
            out.push_str(&format!("  {original:?} -> {}\n", f.display_path()));
        }
    }
    out
}

pub fn magnet_json(m: &Magnet) -> serde_json::Value {
    json!({
        "info_hash": m.info_hash.to_hex(),
        "name": m.display_name,
        "trackers": m.trackers,
        "peers": m.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
    })
}

pub fn magnet_text(m: &Magnet) -> String {
    let mut out = format!("{:<14}{}\n", "info-hash:", m.info_hash);
    out.push_str(&format!(
        "{:<14}{}\n",
        "name:",
        m.display_name.as_deref().unwrap_or("(not in the link)")
    ));
    out.push_str(&format!("trackers ({}):\n", m.trackers.len()));
    for t in &m.trackers {
        out.push_str(&format!("  {t}\n"));
    }
    out.push_str(&format!("peers ({}):\n", m.peers.len()));
    for p in &m.peers {
        out.push_str(&format!("  {p}\n"));
    }
    out
}

/// `1700000000` -> `2023-11-14 22:13:20 UTC` (proleptic Gregorian, no time zone database).
fn format_unix_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_say_which_names_were_sanitized() {
        let bytes = b"d4:infod5:filesld6:lengthi1e4:pathl2:..1:xeed6:lengthi1e4:pathl1:yeee4:name3:/up12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaaee";
        let m = Metainfo::from_bytes(bytes).unwrap();
        let text = torrent_text(&m);
        assert!(text.contains("name:         up\n"), "{text}");
        assert!(text.contains("(sanitized from \"/up\")"), "{text}");
        assert!(
            text.contains("sanitized names (1):\n  \"../x\" -> x\n"),
            "{text}"
        );
        let json = torrent_json(&m);
        assert_eq!(json["original_name"], "/up");
        assert_eq!(json["files"][0]["original"], "../x");
        assert_eq!(json["files"][1].get("original"), None);
        let clean = b"d4:infod5:filesld6:lengthi1e4:pathl2:zz1:xeed6:lengthi1e4:pathl1:yeee4:name3:upp12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaaee";
        let clean = Metainfo::from_bytes(clean).unwrap();
        assert!(!torrent_text(&clean).contains("sanitized"));
        assert!(torrent_json(&clean)["original_name"].is_null());
    }

    #[test]
    fn formats_dates() {
        assert_eq!(format_unix_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_unix_time(951_782_400), "2000-02-29 00:00:00 UTC");
        // Extreme values from a file must not panic.
        let _ = format_unix_time(i64::MAX);
        let _ = format_unix_time(i64::MIN);
    }
}
