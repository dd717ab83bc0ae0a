//! Real programs on files through the mount, compared with the same programs on the original
//! files: ffprobe on an MP4 whose `moov` is at the end and on an MKV, ffmpeg seeking to three
//! offsets and extracting one frame each, unzip listing and extracting a member, sqlite3 queries
//! (random page reads). The media are generated with ffmpeg at test time.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

struct Setup {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    mnt: PathBuf,
    _seed: Proc,
    _mount: Mount,
}

/// Runs `cmd` (with a watchdog) and returns its stdout; fails with its stderr if it fails.
fn output(cmd: &mut Command) -> Vec<u8> {
    let what = format!("{cmd:?}");
    let mut cmd = std::mem::replace(cmd, Command::new("true"));
    let out = with_watchdog(Duration::from_secs(120), &what.clone(), move || {
        cmd.output().unwrap()
    });
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn ffmpeg(args: &[&str]) {
    output(
        Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y"])
            .args(args),
    );
}

fn make_content(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mp4 = dir.join("clip.mp4");
    let mkv = dir.join("clip.mkv");
    // 30 s of test pattern; the mp4 muxer writes `moov` at the end unless told otherwise.
    for (out, format) in [(&mp4, "mp4"), (&mkv, "matroska")] {
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=25",
            "-t",
            "30",
            "-c:v",
            "mpeg4",
            "-q:v",
            "4",
            "-g",
            "25",
            "-f",
            format,
            out.to_str().unwrap(),
        ]);
    }
    let head = std::fs::read(&mp4).unwrap();
    let moov = head.windows(4).position(|w| w == b"moov").unwrap();
    let mdat = head.windows(4).position(|w| w == b"mdat").unwrap();
    assert!(moov > mdat, "the test needs an mp4 with moov at the end");

    write_file(&dir.join("docs/a.bin"), 400_000, 31);
    write_file(&dir.join("docs/b.bin"), 900_000, 32);
    write_file(&dir.join("docs/c.txt"), 5_000, 33);
    output(
        Command::new("zip")
            .current_dir(dir)
            .args(["-q", "-r", "archive.zip", "docs"]),
    );
    let sql = "create table t(id integer primary key, x integer, s text);
        with recursive n(i) as (select 1 union all select i + 1 from n where i < 40000)
        insert into t select i, (i * 7919) % 10007, printf('row %08d', i) from n;";
    output(Command::new("sqlite3").arg(dir.join("data.db")).arg(sql));
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src/media");
    make_content(&src);
    let torrent = tmp.path().join("media.torrent");
    // Small pieces: the files span many, so index pieces and seeks matter.
    create_torrent(&src, &torrent, &["--piece-length", "64KiB"]);
    let (seed, addr) = seeder(
        &tmp.path().join("src"),
        &torrent,
        &tmp.path().join("seed.log"),
        &[],
    );
    let mnt = tmp.path().join("mnt");
    let mount = Mount::start(
        &torrent,
        &mnt,
        &tmp.path().join("mount.log"),
        &["--peer", &addr.to_string()],
    );
    Setup {
        src,
        mnt: mnt.join("media"),
        _tmp: tmp,
        _seed: seed,
        _mount: mount,
    }
}

fn ffprobe(path: &Path) -> String {
    let out = output(
        Command::new("ffprobe")
            .args(["-v", "error", "-show_format", "-show_streams"])
            .arg(path),
    );
    // The file name differs; everything else must not.
    String::from_utf8(out)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("filename="))
        .collect::<Vec<_>>()
        .join("\n")
}

fn frame_at(path: &Path, seconds: &str) -> String {
    let raw = output(
        Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-ss", seconds, "-i"])
            .arg(path)
            .args(["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]),
    );
    assert_eq!(raw.len(), 320 * 240 * 3, "one frame");
    sha256(&raw)
}

#[test]
fn media_archives_and_databases_read_through_the_mount_as_from_disk() {
    let s = setup();
    for name in ["clip.mp4", "clip.mkv"] {
        let (local, mounted) = (s.src.join(name), s.mnt.join(name));
        let probe = ffprobe(&local);
        assert!(probe.contains("codec_name=mpeg4"), "{probe}");
        assert_eq!(ffprobe(&mounted), probe, "{name}");
        for at in ["21.5", "3", "12.2"] {
            assert_eq!(
                frame_at(&mounted, at),
                frame_at(&local, at),
                "{name} at {at} s"
            );
        }
    }

    let list = |dir: &Path| {
        String::from_utf8(output(
            Command::new("unzip").arg("-l").arg(dir.join("archive.zip")),
        ))
        .unwrap()
        .lines()
        .skip(1) // "Archive: <path>"
        .collect::<Vec<_>>()
        .join("\n")
    };
    assert_eq!(list(&s.mnt), list(&s.src));
    let member = output(
        Command::new("unzip")
            .arg("-p")
            .arg(s.mnt.join("archive.zip"))
            .arg("docs/b.bin"),
    );
    assert_eq!(member, std::fs::read(s.src.join("docs/b.bin")).unwrap());

    let query = "select count(*), sum(x) from t; select s from t where id in (7, 23456, 39999);
        select id from t where x = 5000 order by id limit 3;";
    let sql = |dir: &Path| {
        let uri = format!("file:{}?immutable=1", dir.join("data.db").display());
        output(Command::new("sqlite3").arg("-readonly").arg(uri).arg(query))
    };
    let local = sql(&s.src);
    assert!(
        String::from_utf8_lossy(&local).starts_with("40000|"),
        "{local:?}"
    );
    assert_eq!(sql(&s.mnt), local);
}
