//! Every command reads a .torrent through one loader with one size cap: given `/dev/zero`
//! (endless bytes) or a huge file, each fails at once with one clear line instead of reading
//! forever or filling memory.
mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Address space for the child: far above what a capped read needs, so that an uncapped read
/// of `/dev/zero` dies within a second or two instead of eating the machine's memory for the
/// whole watchdog period.
const CHILD_ADDRESS_SPACE: libc::rlim_t = 2 << 30;

/// Runs `swarmfs ARGS` (its stderr kept in a file in `dir`), killing it and failing the test
/// if it has not exited within 20 s (a watchdog); returns the exit status and stderr.
fn run_swarmfs(dir: &Path, name: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: CHILD_ADDRESS_SPACE,
                rlim_max: CHILD_ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut proc = Proc::spawn(name, &mut cmd, &dir.join(format!("{name}.stderr")));
    let status = proc.wait_exit(Duration::from_secs(20));
    (status, proc.stderr())
}

#[test]
fn every_command_refuses_an_endless_or_huge_torrent_file_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mountpoint = tmp.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    // A regular file larger than the child may allocate (sparse: no disk used).
    let huge = tmp.path().join("huge.torrent");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(2 * CHILD_ADDRESS_SPACE)
        .unwrap();
    let (mnt, data) = (mountpoint.to_str().unwrap(), data_dir.to_str().unwrap());
    // Every command is run on every source, so a failure lists all that misbehave.
    let mut failures = Vec::new();
    for source in ["/dev/zero", huge.to_str().unwrap()] {
        // `--listen` on loopback, should a regression get as far as the network.
        let commands: [&[&str]; 4] = [
            &["info", source],
            &["mount", source, mnt, "--listen", "127.0.0.1:0", "--no-dht"],
            &["seed", source, "--listen", "127.0.0.1:0", "--no-dht"],
            &[
                "download",
                source,
                "-d",
                data,
                "--listen",
                "127.0.0.1:0",
                "--no-dht",
            ],
        ];
        for args in commands {
            let name = args[0];
            let (status, stderr) = run_swarmfs(tmp.path(), name, args);
            let one_clear_line = stderr.trim().lines().count() == 1
                && stderr.contains(&format!("{source} is larger than"))
                && stderr.contains("not a .torrent file");
            if status.code() != Some(1) || !one_clear_line {
                failures.push(format!("{name} {source}: exit {status}, stderr {stderr:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(!is_mountpoint(&mountpoint), "mount left something mounted");
}
