//! Torrent names as libtorrent sanitizes them: for one crafted torrent per rule, `swarmfs info`
//! and python3-libtorrent (2.0, what qBittorrent runs) must both open it with the same name and
//! the same file paths, or both refuse it (swarmfs in one line). A download of a torrent whose
//! paths climb out with `..` writes only inside its root.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sha1::{Digest, Sha1};
use swarmfs::core::bencode::Owned;

use common::{bin, download, files_under, info_json_files, require_libtorrent, run_ok, seeder, PY};

const PIECE: u64 = 16384;

/// One JSON line per torrent file named on the command line: the name and the non-pad files
/// (full paths, sizes) libtorrent opens it with, or the error it refuses it with.
const LT_OPEN: &str = r#"
import json, sys, libtorrent as lt
pad = lt.file_storage.flag_pad_file
for path in sys.argv[1:]:
    try:
        ti = lt.torrent_info(path)
        fs = ti.files()
        files = [[fs.file_path(i), fs.file_size(i)] for i in range(fs.num_files())
                 if not fs.file_flags(i) & pad]
        print(json.dumps({"ok": True, "name": ti.name(), "files": files}))
    except Exception as e:
        print(json.dumps({"ok": False, "error": str(e)}))
"#;

/// What a program made of a torrent: `Ok((name, [(full path, size)]))` or its error text.
type Opened = Result<(String, Vec<(String, u64)>), String>;

fn bytes(b: &[u8]) -> Owned {
    Owned::Bytes(b.to_vec())
}

fn dict(entries: Vec<(&[u8], Owned)>) -> Owned {
    Owned::Dict(entries.into_iter().map(|(k, v)| (k.to_vec(), v)).collect())
}

/// A file of a multi-file torrent: raw path components and length.
type File<'a> = (&'a [&'a [u8]], u64);

/// A multi-file torrent named `name` (raw bytes) with `files` and fake piece hashes; `extra`
/// entries go into each file dictionary by index.
fn multi(name: &[u8], files: &[File], extra: &[(usize, &[u8], Owned)]) -> Vec<u8> {
    let total: u64 = files.iter().map(|f| f.1).sum();
    with_pieces(name, files, extra, fake_pieces(total))
}

fn with_pieces(
    name: &[u8],
    files: &[File],
    extra: &[(usize, &[u8], Owned)],
    pieces: Vec<u8>,
) -> Vec<u8> {
    let list = files
        .iter()
        .enumerate()
        .map(|(i, (path, length))| {
            let mut file = vec![
                (&b"length"[..], Owned::Int(*length as i64)),
                (
                    b"path",
                    Owned::List(path.iter().map(|c| bytes(c)).collect()),
                ),
            ];
            for (_, key, value) in extra.iter().filter(|e| e.0 == i) {
                file.push((key, value.clone()));
            }
            dict(file)
        })
        .collect();
    let info = dict(vec![
        (b"files", Owned::List(list)),
        (b"name", bytes(name)),
        (b"piece length", Owned::Int(PIECE as i64)),
        (b"pieces", Owned::Bytes(pieces)),
    ]);
    dict(vec![(b"info", info)]).encode()
}

fn fake_pieces(total: u64) -> Vec<u8> {
    vec![b'h'; 20 * total.div_ceil(PIECE) as usize]
}

/// A single-file torrent with these raw `info` entries.
fn raw_info(entries: Vec<(&[u8], Owned)>) -> Vec<u8> {
    dict(vec![(b"info", dict(entries))]).encode()
}

fn single(name: &[u8], length: i64) -> Vec<u8> {
    raw_info(vec![
        (b"length", Owned::Int(length)),
        (b"name", bytes(name)),
        (b"piece length", Owned::Int(PIECE as i64)),
        (b"pieces", bytes(&fake_pieces(length.max(1) as u64))),
    ])
}

/// A single-file hybrid (BEP 52): v1 `name` of 5 bytes, v2 `file tree` of one file.
fn hybrid(name: &[u8], tree_name: &[u8], tree_length: i64) -> Vec<u8> {
    let leaf = dict(vec![(
        b"",
        dict(vec![
            (b"length", Owned::Int(tree_length)),
            (b"pieces root", bytes(&[7; 32])),
        ]),
    )]);
    raw_info(vec![
        (b"file tree", dict(vec![(tree_name, leaf)])),
        (b"length", Owned::Int(5)),
        (b"meta version", Owned::Int(2)),
        (b"name", bytes(name)),
        (b"piece length", Owned::Int(PIECE as i64)),
        (b"pieces", bytes(&fake_pieces(5))),
    ])
}

fn libtorrent_opens(torrents: &[&Path]) -> Vec<Opened> {
    require_libtorrent();
    let out = run_ok(Command::new(PY).args(["-c", LT_OPEN]).args(torrents));
    let opened: Vec<Opened> = out
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            if !v["ok"].as_bool().unwrap() {
                return Err(v["error"].as_str().unwrap().to_string());
            }
            let files = v["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (f[0].as_str().unwrap().to_string(), f[1].as_u64().unwrap()))
                .collect();
            Ok((v["name"].as_str().unwrap().to_string(), files))
        })
        .collect();
    assert_eq!(opened.len(), torrents.len(), "{out}");
    opened
}

/// `swarmfs info --json`; a refusal must be one line on stderr.
fn swarmfs_opens(torrent: &Path) -> Opened {
    let out = Command::new(bin())
        .args(["info", "--json"])
        .arg(torrent)
        .output()
        .unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(
            err.lines().count(),
            1,
            "refusal of {} not one line: {err}",
            torrent.display()
        );
        return Err(err);
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok(info_json_files(&v))
}

const BITCOMET_PAD: &[u8] =
    b"_____padding_file_0_if you see this file, please update to BitComet 0.85 or above____";

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Torrents both programs must open alike, and the paths swarmfs must show for them (so a rule
/// that both dropped would still fail here).
fn opened_alike() -> Vec<(&'static str, Vec<u8>, Vec<String>)> {
    let long = [b"a".repeat(300), b".txt".to_vec()].concat();
    vec![
        (
            "dot-dot climbs",
            multi(b"r", &[(&[b"..", b"..", b"etc", b"passwd"], 1)], &[]),
            strings(&["r/etc/passwd"]),
        ),
        (
            "dot and trailing dot-dot",
            multi(b"r", &[(&[b".", b"a", b".."], 1)], &[]),
            strings(&["r/a"]),
        ),
        (
            "empty component",
            multi(b"r", &[(&[b"", b"b"], 1)], &[]),
            strings(&["r/_/b"]),
        ),
        (
            "components that filter to nothing",
            multi(
                b"r",
                &[(&[b"/", b"x"], 1), (&[b"\\", "\u{202e}".as_bytes()], 1)],
                &[],
            ),
            strings(&["r/x", "r/_"]),
        ),
        (
            "separators inside a component",
            multi(b"r", &[(&[b"a/b"], 1), (&[b"..\\c"], 1)], &[]),
            strings(&["r/ab", "r/..c"]),
        ),
        (
            "absolute path and name",
            multi(b"/abs", &[(&[b"/etc", b"passwd"], 1)], &[]),
            strings(&["abs/etc/passwd"]),
        ),
        (
            "control characters and invalid UTF-8",
            multi(
                b"r",
                &[
                    (&[b"x\x01y"], 1),
                    (&[b"x\xffy"], 1),
                    (&[b"x\xe3\x81y"], 1),
                    (&[b"a\0b"], 1),
                ],
                &[],
            ),
            strings(&["r/x_y", "r/x_y.1", "r/x_", "r/ab"]),
        ),
        (
            "direction override",
            multi(b"r", &[(&["exe\u{202e}iva.txt".as_bytes()], 1)], &[]),
            strings(&["r/exeiva.txt"]),
        ),
        (
            "long name keeps its extension",
            multi(b"r", &[(&[&long], 1)], &[]),
            vec![format!("r/{}.txt", "a".repeat(240))],
        ),
        (
            "duplicates",
            multi(
                b"r",
                &[
                    (&[b"bar.txt"], 1),
                    (&[b"bar.txt"], 1),
                    (&[b"BAR.txt"], 1),
                    (&[b"bar.1.txt"], 1),
                ],
                &[],
            ),
            strings(&["r/bar.txt", "r/bar.1.txt", "r/BAR.2.txt", "r/bar.1.1.txt"]),
        ),
        (
            "file where a directory is",
            multi(b"r", &[(&[b"a"], 1), (&[b"a", b"b"], 1)], &[]),
            strings(&["r/a.1", "r/a/b"]),
        ),
        (
            "BitComet pad files",
            multi(
                b"r",
                &[(&[b"a"], 1), (&[BITCOMET_PAD], PIECE - 1), (&[b"b"], 1)],
                &[],
            ),
            strings(&["r/a", "r/b"]),
        ),
        (
            "pad file without a path",
            multi(
                b"r",
                &[(&[b"a"], 1), (&[], PIECE - 1), (&[b"b"], 1)],
                &[(1, b"attr", bytes(b"p"))],
            ),
            strings(&["r/a", "r/b"]),
        ),
        (
            "invalid name.utf-8 is still preferred",
            raw_info(vec![
                (b"length", Owned::Int(5)),
                (b"name", bytes(b"good")),
                (b"name.utf-8", bytes(b"\xfe")),
                (b"piece length", Owned::Int(PIECE as i64)),
                (b"pieces", bytes(&fake_pieces(5))),
            ]),
            strings(&["_"]),
        ),
        (
            "empty directory name",
            multi(b"", &[(&[b"f"], 1)], &[]),
            strings(&["_/f"]),
        ),
        (
            "trailing bytes",
            [single(b"x", 5), b"\0 trailing garbage".to_vec()].concat(),
            strings(&["x"]),
        ),
        (
            "hybrid whose parts agree",
            hybrid(b"x", b"x", 5),
            strings(&["x"]),
        ),
        (
            "a duplicate key: the first one counts",
            duplicate_name(),
            strings(&["first"]),
        ),
    ]
}

/// A single-file torrent whose info dictionary has `name` twice ("first", then "second").
fn duplicate_name() -> Vec<u8> {
    let once = single(b"first", 5);
    let at = once
        .windows(13)
        .position(|w| w == b"4:name5:first")
        .expect("the name entry")
        + 13;
    [&once[..at], b"4:name6:second", &once[at..]].concat()
}

fn write(dir: &Path, i: usize, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(format!("{i}.torrent"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn unsafe_names_open_as_in_libtorrent() {
    let dir = tempfile::tempdir().unwrap();
    let cases = opened_alike();
    let paths: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| write(dir.path(), i, &c.1))
        .collect();
    let lt = libtorrent_opens(&paths.iter().map(|p| p.as_path()).collect::<Vec<_>>());
    for ((what, _, expected), (path, lt)) in cases.iter().zip(paths.iter().zip(lt)) {
        let ours = swarmfs_opens(path);
        assert_eq!(ours, lt, "{what}: swarmfs vs libtorrent");
        let (_, files) = ours.unwrap_or_else(|e| panic!("{what}: refused: {e}"));
        let shown: Vec<String> = files.into_iter().map(|(p, _)| p).collect();
        assert_eq!(shown, *expected, "{what}");
    }
}

#[test]
fn a_directory_name_of_nothing_becomes_the_info_hash_as_in_libtorrent() {
    let dir = tempfile::tempdir().unwrap();
    let torrent = write(dir.path(), 0, &multi(b"..", &[(&[b"f"], 1)], &[]));
    let lt = libtorrent_opens(&[&torrent]).remove(0);
    let ours = swarmfs_opens(&torrent);
    assert_eq!(ours, lt);
    let info = run_ok(Command::new(bin()).args(["info", "--json"]).arg(&torrent));
    let v: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(ours.unwrap().0, v["info_hash"].as_str().unwrap());
}

#[test]
fn what_libtorrent_refuses_swarmfs_refuses_in_one_line() {
    let info = |entries: Vec<(&'static [u8], Owned)>| raw_info(entries);
    let pl = || (&b"piece length"[..], Owned::Int(PIECE as i64));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no info", dict(vec![(b"announce", bytes(b"x"))]).encode()),
        (
            "no name",
            info(vec![
                (b"length", Owned::Int(5)),
                pl(),
                (b"pieces", bytes(&fake_pieces(5))),
            ]),
        ),
        (
            "no pieces",
            info(vec![
                (b"length", Owned::Int(5)),
                (b"name", bytes(b"x")),
                pl(),
            ]),
        ),
        ("negative length", single(b"x", -5)),
        (
            "zero length",
            info(vec![
                (b"length", Owned::Int(0)),
                (b"name", bytes(b"x")),
                pl(),
                (b"pieces", bytes(b"")),
            ]),
        ),
        (
            "zero piece length",
            info(vec![
                (b"length", Owned::Int(5)),
                (b"name", bytes(b"x")),
                (b"piece length", Owned::Int(0)),
                (b"pieces", bytes(&fake_pieces(5))),
            ]),
        ),
        (
            "piece count mismatch",
            info(vec![
                (b"length", Owned::Int(5)),
                (b"name", bytes(b"x")),
                pl(),
                (b"pieces", bytes(&fake_pieces(PIECE * 3))),
            ]),
        ),
        ("single file named ..", single(b"..", 5)),
        ("single file with an empty name", single(b"", 5)),
        ("empty path", multi(b"r", &[(&[], 1)], &[])),
        ("hybrid names disagree", hybrid(b"x", b"y", 5)),
        ("hybrid lengths disagree", hybrid(b"x", b"x", 6)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| write(dir.path(), i, &c.1))
        .collect();
    let lt = libtorrent_opens(&paths.iter().map(|p| p.as_path()).collect::<Vec<_>>());
    for ((what, _), (path, lt)) in cases.iter().zip(paths.iter().zip(lt)) {
        assert!(lt.is_err(), "{what}: libtorrent opens it: {lt:?}");
        let ours = swarmfs_opens(path);
        let err = ours.expect_err(what);
        assert!(err.contains("not a valid torrent"), "{what}: {err}");
    }
}

#[test]
fn v2_only_torrents_are_refused_in_one_line() {
    let leaf = dict(vec![(
        b"",
        dict(vec![
            (b"length", Owned::Int(5)),
            (b"pieces root", bytes(&[7; 32])),
        ]),
    )]);
    let v2 = raw_info(vec![
        (b"file tree", dict(vec![(b"x", leaf)])),
        (b"meta version", Owned::Int(2)),
        (b"name", bytes(b"x")),
        (b"piece length", Owned::Int(PIECE as i64)),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let err = swarmfs_opens(&write(dir.path(), 0, &v2)).unwrap_err();
    assert!(err.contains("v2-only"), "{err}");
}

/// Sorted paths of the files under `root`, relative to it.
fn relative_files(root: &Path) -> Vec<String> {
    let mut files: Vec<String> = files_under(root)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    files
}

#[test]
fn a_download_with_climbing_paths_stays_inside_its_root() {
    let tmp = tempfile::tempdir().unwrap();
    let sizes = [20_000usize, 5_000, 100];
    let content: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| common::data(n, i as u64))
        .collect();
    let stream = content.concat();
    let pieces: Vec<u8> = stream
        .chunks(PIECE as usize)
        .flat_map(|c| Sha1::digest(c).to_vec())
        .collect();
    let files: &[File] = &[
        (&[b"..", b"..", b"escape.bin"], sizes[0] as u64),
        (&[b"/abs", b"x.bin"], sizes[1] as u64),
        (&[b"a/b"], sizes[2] as u64),
    ];
    let torrent = with_pieces(b"../up", files, &[], pieces);
    let torrent_path = tmp.path().join("climb.torrent");
    std::fs::write(&torrent_path, &torrent).unwrap();

    // The seeder finds its data at the sanitized paths: `..up` is the name with `/` removed.
    let sanitized = ["..up/escape.bin", "..up/abs/x.bin", "..up/ab"];
    let seed_dir = tmp.path().join("seed");
    for (path, bytes) in sanitized.iter().zip(&content) {
        let p = seed_dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let (_seed, addr) = seeder(&seed_dir, &torrent_path, &tmp.path().join("seed.log"), &[]);
    let dl_dir = tmp.path().join("dl");
    let mut d = download(
        &torrent_path,
        &dl_dir,
        &tmp.path().join("dl.log"),
        &["--peer", &addr.to_string()],
    );
    assert!(
        d.wait_exit(Duration::from_secs(60)).success(),
        "download failed: {}",
        d.stderr()
    );

    assert_eq!(
        relative_files(&dl_dir),
        ["..up/ab", "..up/abs/x.bin", "..up/escape.bin"]
    );
    for (path, bytes) in sanitized.iter().zip(&content) {
        assert_eq!(&std::fs::read(dl_dir.join(path)).unwrap(), bytes, "{path}");
    }
    // Nothing landed next to the download dir or above it.
    let mut beside: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(
        beside,
        ["climb.torrent", "dl", "dl.log", "seed", "seed.log"]
    );
}
