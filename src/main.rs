//! The `swarmfs` command: argument parsing and wiring only; the work lives in the library.
use clap::{Parser, Subcommand};
use swarmfs::cli;

/// Mount a BitTorrent swarm as a read-only directory.
///
/// Sizes and rates accept binary suffixes: 256KiB, 64MiB, 1GiB (K, M, G mean the same).
#[derive(Parser, Debug)]
#[command(name = "swarmfs", version, about, long_about = None)]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a .torrent from a file or directory.
    Create(cli::create::Args),
    /// Show what a .torrent or magnet link holds.
    Info(cli::info::Args),
    /// Mount torrents as a read-only directory (returns once mounted).
    Mount(cli::mount::Args),
    /// Add torrents, magnet links or watched directories to a running mount.
    Add(cli::control::AddArgs),
    /// Remove a torrent from a running mount (by its name at the mount's root).
    Remove(cli::control::RemoveArgs),
    /// Show the torrents of a running mount (or of every mount): size, verified, peers, rates.
    Status(cli::control::StatusArgs),
    /// Seed a torrent from its data, or make a torrent of a path and seed it.
    Seed(cli::seed::Args),
    /// Download a torrent into a directory, then exit.
    Download(cli::download::Args),
    /// Run a small HTTP and UDP tracker on one port (for local swarms, demos and tests).
    Tracker(cli::tracker::Args),
    /// Run a standalone DHT node: the first node of a private swarm, a bootstrap node for tests
    /// (without --dht-bootstrap it joins nothing and waits for others to join through it; without
    /// --dht-state it keeps no table between runs).
    Dht(cli::dht::Args),
}

fn main() {
    // Piece buffers are 256 KiB: keep glibc from spreading them over many per-thread arenas,
    // which multiplies resident memory without holding more data. (The engine also hands freed
    // memory back once a second; see `Torrent::run_ticker`.)
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = Cli::parse();
    let level = match cli.verbose {
        // fuser warns when the kernel was unmounted before it: expected after `fusermount -u`.
        0 => "warn,fuser=error",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let result = match cli.command {
        Command::Create(a) => cli::create::run(a),
        Command::Info(a) => cli::info::run(a),
        Command::Mount(a) => cli::mount::run(a),
        Command::Add(a) => cli::control::run_add(a),
        Command::Remove(a) => cli::control::run_remove(a),
        Command::Status(a) => cli::control::run_status(a),
        Command::Seed(a) => cli::seed::run(a),
        Command::Download(a) => cli::download::run(a),
        Command::Tracker(a) => cli::tracker::run(a),
        Command::Dht(a) => cli::dht::run(a),
    };
    if let Err(e) = result {
        eprintln!("swarmfs: {e:#}");
        std::process::exit(1);
    }
}
