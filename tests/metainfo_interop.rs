//! Interop of .torrent files with tools we did not write: torrents made by `mktorrent`,
//! `transmission-create` and python3-libtorrent must read the same in swarmfs as in
//! `transmission-show` and libtorrent, and torrents made by `swarmfs create` must load in them
//! with the info-hash we print. The tools are installed by scripts/test.sh; a missing tool is a
//! failure, not a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{bin, info_json_files, require_libtorrent, PY as PYTHON};

const TRACKER: &str = "http://127.0.0.1:6969/announce";

const LT_SHOW: &str = r#"
import json, sys, libtorrent as lt
ti = lt.torrent_info(sys.argv[1])
fs = ti.files()
pad = lt.file_storage.flag_pad_file
files = [[fs.file_path(i), fs.file_size(i)] for i in range(fs.num_files()) if not fs.file_flags(i) & pad]
pads = sum(1 for i in range(fs.num_files()) if fs.file_flags(i) & pad)
print(json.dumps({"info_hash": str(ti.info_hashes().v1), "piece_count": ti.num_pieces(),
                  "files": files, "pad_count": pads}))
"#;

const LT_CREATE: &str = r#"
import os, sys, libtorrent as lt
src, out = sys.argv[1], sys.argv[2]
fs = lt.file_storage()
lt.add_files(fs, src)
t = lt.create_torrent(fs, 16384)
t.add_tracker(sys.argv[3])
lt.set_piece_hashes(t, os.path.dirname(src))
open(out, "wb").write(lt.bencode(t.generate()))
"#;

fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed; scripts/test.sh installs it (it is needed for interop tests)"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("output is UTF-8")
}

/// Deterministic content of a given length.
fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Writes `files` (path below `root`, length) and returns `root`.
fn make_tree(base: &Path, root: &str, files: &[(&str, usize)]) -> PathBuf {
    let root = base.join(root);
    for (i, (path, len)) in files.iter().enumerate() {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content(*len, i as u32)).unwrap();
    }
    root
}

/// What a tool says a torrent holds. `files` are full paths (`name/dir/file` for multi-file
/// torrents, `name` for single-file ones) with sizes, pad files left out.
#[derive(Debug, PartialEq, Eq)]
struct View {
    info_hash: String,
    piece_count: u64,
    files: Vec<(String, u64)>,
}

fn swarmfs_view(torrent: &Path) -> View {
    let out = run(Command::new(bin()).arg("info").arg("--json").arg(torrent));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("info --json prints JSON");
    let (_, files) = info_json_files(&v);
    View {
        info_hash: v["info_hash"].as_str().unwrap().to_string(),
        piece_count: v["piece_count"].as_u64().unwrap(),
        files,
    }
}

/// libtorrent's view, and how many pad files it sees.
fn libtorrent_view(torrent: &Path) -> (View, u64) {
    require_libtorrent();
    let out = run(Command::new(PYTHON).args(["-c", LT_SHOW]).arg(torrent));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let files = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f[0].as_str().unwrap().to_string(), f[1].as_u64().unwrap()))
        .collect();
    let view = View {
        info_hash: v["info_hash"].as_str().unwrap().to_string(),
        piece_count: v["piece_count"].as_u64().unwrap(),
        files,
    };
    (view, v["pad_count"].as_u64().unwrap())
}

/// transmission-show's view: its sizes are rounded, so only paths, sorted.
fn transmission_view(torrent: &Path) -> (String, u64, Vec<String>) {
    require_tool("transmission-show");
    let out = run(Command::new("transmission-show").arg(torrent));
    let text = stdout(&out);
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no '{label}' in transmission-show output:\n{text}"))
    };
    // transmission 3 prints "Hash:", transmission 4 "Hash v1:".
    let hash = text
        .lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("Hash v1:")
                .or_else(|| l.strip_prefix("Hash:"))
        })
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no hash in transmission-show output:\n{text}"));
    let pieces: u64 = field("Piece Count:").parse().unwrap();
    let files_section = text
        .split("\nFILES\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no FILES section:\n{text}"));
    let mut files: Vec<String> = files_section
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.rsplit_once(" (").map_or(l, |(p, _)| p).to_string())
        .collect();
    files.sort();
    (hash, pieces, files)
}

/// Checks that swarmfs, libtorrent and transmission-show agree on `torrent`; returns our view.
fn assert_all_agree(torrent: &Path) -> View {
    let ours = swarmfs_view(torrent);
    let (lt, _) = libtorrent_view(torrent);
    assert_eq!(ours, lt, "swarmfs vs libtorrent on {}", torrent.display());
    let (hash, pieces, files) = transmission_view(torrent);
    assert_eq!(hash, ours.info_hash, "transmission-show hash");
    assert_eq!(pieces, ours.piece_count, "transmission-show piece count");
    let mut our_paths: Vec<String> = ours.files.iter().map(|(p, _)| p.clone()).collect();
    our_paths.sort();
    assert_eq!(files, our_paths, "transmission-show files");
    ours
}

/// A tree with nesting, odd sizes crossing piece boundaries, an empty file and unicode names.
const TREE: &[(&str, usize)] = &[
    ("a.bin", 100_000),
    ("empty.txt", 0),
    ("nested/deeper/c.dat", 33_333),
    ("nested/b.bin", 65_537),
    ("ünïcødé/日本語 ファイル.txt", 4_321),
    ("ünïcødé/🎉.bin", 1),
];

/// `(full path, length)` of TREE in our (sorted) stream order.
fn tree_listing(root: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(Vec<&str>, u64)> = TREE
        .iter()
        .map(|(p, l)| (p.split('/').collect(), *l as u64))
        .collect();
    v.sort();
    v.into_iter()
        .map(|(p, l)| (format!("{root}/{}", p.join("/")), l))
        .collect()
}

#[test]
fn mktorrent_torrents_read_like_reference_tools() {
    require_tool("mktorrent");
    let dir = tempfile::tempdir().unwrap();
    let tree = make_tree(dir.path(), "tree", TREE);
    let single = dir.path().join("single.iso");
    std::fs::write(&single, content(200_001, 99)).unwrap();
    for (source, pieces_log2) in [(&tree, "15"), (&single, "16")] {
        let out = dir.path().join("mk.torrent");
        let _ = std::fs::remove_file(&out);
        run(Command::new("mktorrent")
            .args(["-a", TRACKER, "-l", pieces_log2, "-o"])
            .arg(&out)
            .arg(source));
        let view = assert_all_agree(&out);
        assert!(view.piece_count > 1);
    }
}

#[test]
fn transmission_create_torrents_read_like_reference_tools() {
    require_tool("transmission-create");
    let dir = tempfile::tempdir().unwrap();
    let tree = make_tree(dir.path(), "tree", TREE);
    let single = dir.path().join("single.iso");
    std::fs::write(&single, content(200_001, 98)).unwrap();
    for source in [&tree, &single] {
        let out = dir.path().join("tc.torrent");
        let _ = std::fs::remove_file(&out);
        run(Command::new("transmission-create")
            .args(["-t", TRACKER, "-s", "32", "-o"])
            .arg(&out)
            .arg(source));
        let view = assert_all_agree(&out);
        assert!(view.piece_count > 1);
    }
}

/// Runs `swarmfs create` and returns the info-hash it printed.
fn swarmfs_create(source: &Path, out: &Path, extra: &[&str]) -> String {
    let output = run(Command::new(bin())
        .arg("create")
        .arg(source)
        .arg("-o")
        .arg(out)
        .args(["--tracker", TRACKER])
        .args(extra));
    let text = stdout(&output);
    let hash = text
        .lines()
        .find_map(|l| l.strip_prefix("info-hash: "))
        .unwrap_or_else(|| panic!("no info-hash printed:\n{text}"))
        .trim()
        .to_string();
    assert_eq!(hash.len(), 40, "{text}");
    hash
}

#[test]
fn swarmfs_create_torrents_load_in_reference_tools() {
    let dir = tempfile::tempdir().unwrap();
    let tree = make_tree(dir.path(), "tree", TREE);
    let flat = make_tree(
        dir.path(),
        "flat",
        &[("one", 16_384), ("two", 16_385), ("zero", 0)],
    );
    let single = dir.path().join("single file.iso");
    std::fs::write(&single, content(300_000, 7)).unwrap();
    let unicode_single = dir.path().join("ñame – 名前.mkv");
    std::fs::write(&unicode_single, content(5, 8)).unwrap();

    /// Source, the files we expect to see, extra `create` arguments.
    type Case<'a> = (&'a Path, Vec<(String, u64)>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        (&single, vec![("single file.iso".into(), 300_000)], &[]),
        (
            &unicode_single,
            vec![("ñame – 名前.mkv".into(), 5)],
            &["--piece-length", "16KiB"],
        ),
        (
            &flat,
            vec![
                ("flat/one".into(), 16_384),
                ("flat/two".into(), 16_385),
                ("flat/zero".into(), 0),
            ],
            &["--piece-length", "16K", "--private", "--comment", "ünï"],
        ),
        (&tree, tree_listing("tree"), &["--piece-length", "32KiB"]),
    ];
    for (i, (source, expected_files, extra)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("ours{i}.torrent"));
        let printed = swarmfs_create(source, &out, extra);
        let view = assert_all_agree(&out);
        assert_eq!(
            view.info_hash,
            printed,
            "printed hash of {}",
            source.display()
        );
        assert_eq!(view.files, expected_files, "files of {}", source.display());

        // Same input, same bytes.
        let again = dir.path().join(format!("again{i}.torrent"));
        swarmfs_create(source, &again, extra);
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    }
}

#[test]
fn libtorrent_pad_files_are_hidden_and_hash_matches() {
    require_libtorrent();
    let dir = tempfile::tempdir().unwrap();
    let root = make_tree(
        dir.path(),
        "padded",
        &[("a", 1_000), ("b/c", 20_000), ("d", 5), ("e", 16_385)],
    );
    let out = dir.path().join("lt.torrent");
    run(Command::new(PYTHON)
        .args(["-c", LT_CREATE])
        .arg(&root)
        .arg(&out)
        .arg(TRACKER));
    let (lt, pads) = libtorrent_view(&out);
    assert!(
        pads > 0,
        "libtorrent made no pad files; the test would prove nothing"
    );
    let ours = swarmfs_view(&out);
    assert_eq!(ours.info_hash, lt.info_hash);
    assert_eq!(ours.piece_count, lt.piece_count);
    let mut expected = vec![
        ("padded/a".to_string(), 1_000),
        ("padded/b/c".to_string(), 20_000),
        ("padded/d".to_string(), 5),
        ("padded/e".to_string(), 16_385),
    ];
    expected.sort();
    let mut listed = ours.files.clone();
    listed.sort();
    assert_eq!(listed, expected);
    assert_eq!(ours.files, lt.files);
    // Human output does not show pad files either.
    let text = stdout(&run(Command::new(bin()).arg("info").arg(&out)));
    assert!(text.contains(&lt.info_hash));
    assert!(!text.contains(".pad"), "{text}");
}

#[test]
fn cli_reports_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.torrent");
    std::fs::write(&bad, b"d4:infod4:name2:..ee").unwrap();
    let out = Command::new(bin()).arg("info").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not a valid torrent"), "{err}");

    let out = Command::new(bin())
        .args(["info", "magnet:?xt=urn:btih:123"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad info-hash"));

    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new(bin())
        .arg("create")
        .arg(&file)
        .arg("-o")
        .arg(dir.path().join("f.torrent"))
        .args(["--piece-length", "100KiB"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
    assert!(!dir.path().join("f.torrent").exists());

    // libtorrent and Transmission refuse torrents with no data, so we do not make them.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let out = Command::new(bin())
        .arg("create")
        .arg(&empty)
        .arg("-o")
        .arg(dir.path().join("e.torrent"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no data"));
}

#[test]
fn info_shows_what_a_magnet_link_holds() {
    let hash = "ddde2fda68414a34ee25e12511f29f60759bcfca";
    let link = format!(
        "magnet:?xt=urn:btih:{hash}&dn=My+Data&tr=http%3A%2F%2F127.0.0.1%3A6969%2Fannounce&x.pe=127.0.0.1:6881&x.pe=[::1]:6882"
    );
    let out = run(Command::new(bin()).args(["info", "--json", &link]));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["info_hash"], hash);
    assert_eq!(v["name"], "My Data");
    assert_eq!(v["trackers"], serde_json::json!([TRACKER]));
    assert_eq!(
        v["peers"],
        serde_json::json!(["127.0.0.1:6881", "[::1]:6882"])
    );
}
