//! `swarmfs add`, `swarmfs remove` and `swarmfs status`: they talk to a running mount over a Unix
//! socket next to its state (`$XDG_RUNTIME_DIR/swarmfs/`, or `$XDG_STATE_HOME/swarmfs/` when that
//! is unset), one per mountpoint. The mount checks each caller's uid (`SO_PEERCRED`): only the
//! mount's owner and root may control it, whatever the socket's permissions say.
//!
//! The protocol is one JSON request line from the client and one JSON reply line from the mount.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::cli::common::{self, Source};
use crate::cli::librarian::{Added, Librarian};
use crate::core::magnet::Magnet;
use crate::core::metainfo::{Metainfo, MAX_TORRENT_FILE_BYTES};

/// Longest request line (a .torrent of the largest size, base64-encoded, and some room).
const MAX_REQUEST: u64 = MAX_TORRENT_FILE_BYTES / 3 * 4 + (1 << 20);
/// A client that sends nothing for this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// What is read of a refused client's request, and for how long, before the refusal.
const REFUSED_REQUEST_READ: u64 = 64 * 1024;
const REFUSED_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client waits for the mount's reply (adding a torrent with `-d` verifies its data).
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Add { items: Vec<Item> },
    Remove { name: String },
    Status,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Item {
    /// A .torrent's bytes, base64, and where they came from (for messages).
    Torrent {
        label: String,
        base64: String,
    },
    Magnet(String),
    /// A directory of .torrent files, to watch.
    Dir(PathBuf),
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    lines: Vec<String>,
}

/// The directory holding the mounts' sockets.
pub fn socket_dir() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .or_else(|| std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("swarmfs")
}

/// The control socket of the mount at `mountpoint`, named by its canonical path. The path is
/// resolved through the mountpoint's parent: a FUSE mount refuses other users, even `stat`.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let through_parent = match (mountpoint.parent(), mountpoint.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            std::fs::canonicalize(parent).ok().map(|p| p.join(name))
        }
        _ => None,
    };
    let abs = through_parent
        .or_else(|| std::fs::canonicalize(mountpoint).ok())
        .unwrap_or_else(|| mountpoint.to_path_buf());
    let digest = Sha1::digest(abs.as_os_str().as_encoded_bytes());
    socket_dir().join(format!("mount-{}.sock", &hex::encode(digest)[..16]))
}

// ---- the mount's side ----

/// Binds the control socket of the mount at `mountpoint` (replacing a stale one: the mountpoint
/// was checked to be free, so no live mount owns it). Its directory is private to the owner.
pub fn bind(mountpoint: &Path) -> anyhow::Result<(UnixListener, PathBuf)> {
    let path = socket_path(mountpoint);
    let dir = socket_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    Ok((listener, path))
}

/// Answers control requests until the task is dropped.
pub async fn serve(listener: UnixListener, librarian: Librarian, mountpoint: PathBuf) {
    // SAFETY: geteuid has no preconditions.
    let owner = unsafe { libc::geteuid() };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let librarian = librarian.clone();
        let mountpoint = mountpoint.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, owner, &librarian, &mountpoint).await {
                log::debug!("control connection: {e:#}");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    owner: u32,
    librarian: &Librarian,
    mountpoint: &Path,
) -> anyhow::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.into_split();
    let reply = if uid != owner && uid != 0 {
        log::warn!("control: refused a request from uid {uid}");
        // Its request is read (a little of it, briefly) before the answer, so the client's
        // write does not meet a closed socket and miss the reason.
        let mut line = String::new();
        let mut reader = BufReader::new(rd.take(REFUSED_REQUEST_READ));
        let _ = tokio::time::timeout(REFUSED_TIMEOUT, reader.read_line(&mut line)).await;
        Reply {
            ok: false,
            lines: vec![format!(
                "refused: uid {uid} is neither the mount's owner (uid {owner}) nor root"
            )],
        }
    } else {
        let mut line = String::new();
        let mut reader = BufReader::new(rd.take(MAX_REQUEST));
        tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
            .await
            .context("no request")??;
        match serde_json::from_str::<Request>(&line) {
            Ok(request) => run_request(request, librarian, mountpoint).await,
            Err(e) => Reply {
                ok: false,
                lines: vec![format!("bad request: {e}")],
            },
        }
    };
    let mut text = serde_json::to_string(&reply)?;
    text.push('\n');
    wr.write_all(text.as_bytes()).await?;
    Ok(())
}

async fn run_request(request: Request, librarian: &Librarian, mountpoint: &Path) -> Reply {
    let mut lines = Vec::new();
    let mut ok = true;
    match request {
        Request::Status => {
            lines.push(format!("{}:", mountpoint.display()));
            lines.extend(librarian.status().lines().map(str::to_owned));
        }
        Request::Remove { name } => match librarian.remove_named(&name).await {
            true => lines.push(format!("removed {name}")),
            false => {
                ok = false;
                lines.push(format!(
                    "no torrent called {name:?} in {}",
                    mountpoint.display()
                ));
            }
        },
        Request::Add { items } => {
            for item in items {
                match add_item(item, librarian).await {
                    Ok(line) => lines.push(line),
                    Err(e) => {
                        ok = false;
                        lines.push(format!("error: {e:#}"));
                    }
                }
            }
        }
    }
    Reply { ok, lines }
}

async fn add_item(item: Item, librarian: &Librarian) -> anyhow::Result<String> {
    match item {
        Item::Torrent { label, base64 } => {
            let bytes = data_encoding::BASE64
                .decode(base64.as_bytes())
                .context("bad base64")?;
            let meta = Metainfo::from_bytes(&bytes)
                .with_context(|| format!("{label} is not a valid torrent"))?;
            Ok(match librarian.add_meta(meta.into(), Vec::new()).await? {
                Added::Mounted(name) => format!("mounted {name}"),
                Added::AlreadyMounted(name) => format!("{label}: already mounted as {name}"),
            })
        }
        Item::Magnet(link) => {
            let magnet = Magnet::parse(&link).context("bad magnet link")?;
            let hash = magnet.info_hash;
            let l = librarian.clone();
            tokio::spawn(async move {
                if let Err(e) = l.add_source(Source::Magnet(magnet)).await {
                    l.note(format!("error: {hash}: {e:#}"));
                }
            });
            Ok(format!(
                "fetching the metadata of {hash}; its files appear once it is known (.swarmfs/status lists it meanwhile)"
            ))
        }
        Item::Dir(dir) => {
            librarian.watch_dir(dir.clone()).await;
            Ok(format!("watching {}", dir.display()))
        }
    }
}

// ---- the client's side ----

async fn ask(mountpoint: &Path, request: &Request) -> anyhow::Result<Reply> {
    let path = socket_path(mountpoint);
    ask_socket(&path, request).await.with_context(|| {
        format!(
            "no swarmfs mount answers for {} (socket {})",
            mountpoint.display(),
            path.display()
        )
    })
}

fn print(reply: Reply) -> anyhow::Result<()> {
    let Reply { ok, mut lines } = reply;
    if ok {
        for l in lines {
            println!("{l}");
        }
        return Ok(());
    }
    let last = lines.pop().unwrap_or_default();
    for l in lines {
        println!("{l}");
    }
    bail!("{last}")
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The mountpoint of a running `swarmfs mount`.
    pub mountpoint: PathBuf,
    /// .torrent files, magnet links, or directories of .torrent files (watched).
    #[arg(value_name = "SOURCE", required = true)]
    pub sources: Vec<String>,
}

pub fn run_add(args: AddArgs) -> anyhow::Result<()> {
    let mut items = Vec::new();
    for s in &args.sources {
        let path = Path::new(s);
        if common::is_magnet(s) {
            Magnet::parse(s).context("bad magnet link")?;
            items.push(Item::Magnet(s.clone()));
        } else if path.is_dir() {
            let abs = std::fs::canonicalize(path)
                .with_context(|| format!("cannot use {}", path.display()))?;
            items.push(Item::Dir(abs));
        } else {
            // Parsed here first, so a bad file fails with the usual one line.
            common::load_torrent(path)?;
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            items.push(Item::Torrent {
                label: s.clone(),
                base64: data_encoding::BASE64.encode(&bytes),
            });
        }
    }
    block_on(async { print(ask(&args.mountpoint, &Request::Add { items }).await?) })
}

#[derive(clap::Args, Debug)]
pub struct RemoveArgs {
    /// The mountpoint of a running `swarmfs mount`.
    pub mountpoint: PathBuf,
    /// The torrent's name at the mount's root (data under -d is kept).
    pub name: String,
}

pub fn run_remove(args: RemoveArgs) -> anyhow::Result<()> {
    let request = Request::Remove { name: args.name };
    block_on(async { print(ask(&args.mountpoint, &request).await?) })
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The mountpoint of a running `swarmfs mount` (default: every mount of this user).
    pub mountpoint: Option<PathBuf>,
}

pub fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    block_on(async {
        if let Some(mp) = &args.mountpoint {
            return print(ask(mp, &Request::Status).await?);
        }
        // Every live mount's socket; stale ones (a mount that was killed) are skipped.
        let mut found = false;
        let mut sockets: Vec<PathBuf> = std::fs::read_dir(socket_dir())
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                    .collect()
            })
            .unwrap_or_default();
        sockets.sort();
        for socket in sockets {
            let Ok(reply) = ask_socket(&socket, &Request::Status).await else {
                continue;
            };
            found = true;
            print(reply)?;
        }
        if !found {
            println!("no swarmfs mounts are running");
        }
        Ok(())
    })
}

async fn ask_socket(socket: &Path, request: &Request) -> anyhow::Result<Reply> {
    let mut stream = UnixStream::connect(socket).await?;
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    // A mount that refuses us may close before reading all of it: its reply still says why.
    let written = stream.write_all(text.as_bytes()).await;
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST));
    let read = tokio::time::timeout(REPLY_TIMEOUT, reader.read_line(&mut line)).await?;
    match serde_json::from_str(&line) {
        Ok(reply) => Ok(reply),
        Err(e) => {
            written?;
            read?;
            Err(e.into())
        }
    }
}
