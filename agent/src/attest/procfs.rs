//! Reading what the kernel says about a process under a procfs root (`/proc` on a host; a
//! directory tree in tests), and the PID-reuse checks: a process is named by its PID *and* its
//! start time, recorded when its connection is accepted, compared when a request on that
//! connection is attested, and re-read after attestation, so that a PID recycled in between is
//! caught.

use std::io;
use std::path::{Path, PathBuf};

use super::{AttestError, Caller};

/// `ESRCH`: what reads under `/proc/<pid>` return while the process is being torn down.
const ESRCH: i32 = 3;

#[derive(Clone, Debug)]
pub struct Procfs {
    root: PathBuf,
}

/// A process as first observed. PID and start time together name one process for the life of
/// the machine; the uid is what it ran as then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub uid: u32,
    pub start_time: u64,
}

impl Procfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Procfs { root: root.into() }
    }

    /// The host's `/proc` (in Kubernetes the agent needs `hostPID: true` to see pods' processes).
    pub fn host() -> Self {
        Self::new("/proc")
    }

    /// Start time of the process in clock ticks since boot: field 22 of `/proc/<pid>/stat`.
    pub fn start_time(&self, pid: i32) -> Result<u64, AttestError> {
        let path = self.path(pid, "stat")?;
        let stat = read(pid, &path)?;
        parse_start_time(&stat).ok_or_else(|| {
            AttestError::Io(format!("{}: no start time in {stat:?}", path.display()))
        })
    }

    /// `/proc/<pid>/cgroup`, unparsed.
    pub fn cgroup(&self, pid: i32) -> Result<String, AttestError> {
        read(pid, &self.path(pid, "cgroup")?)
    }

    /// The process's executable, as `/proc/<pid>/exe` links to it: symlinks resolved, and
    /// suffixed " (deleted)" if the file was replaced or removed since it started.
    pub fn exe(&self, pid: i32) -> Result<PathBuf, AttestError> {
        let path = self.path(pid, "exe")?;
        std::fs::read_link(&path).map_err(|err| io_error(pid, &path, err))
    }

    /// The process's effective uid (second field of the `Uid:` line of `/proc/<pid>/status`):
    /// the one SO_PEERCRED reports, so the two can be compared.
    pub fn uid(&self, pid: i32) -> Result<u32, AttestError> {
        let path = self.path(pid, "status")?;
        let status = read(pid, &path)?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            .and_then(|uid| uid.parse().ok())
            .ok_or_else(|| AttestError::Io(format!("{}: no effective uid", path.display())))
    }

    /// Records the caller's process before anything else is read about it, and checks that it
    /// is the process that connected (same start time) and still runs as the uid it connected
    /// with. A caller whose start time was not recorded at accept is refused: its PID may name
    /// anyone by now.
    pub fn observe(&self, caller: &Caller) -> Result<Process, AttestError> {
        let start_time = self.start_time(caller.pid)?;
        match caller.start_time_at_connect {
            Some(recorded) if recorded == start_time => {}
            Some(_) => return Err(AttestError::PidReused(caller.pid)),
            None => return Err(AttestError::NotRecordedAtConnect(caller.pid)),
        }
        let uid = self.uid(caller.pid)?;
        if uid != caller.uid {
            return Err(AttestError::UidChanged {
                pid: caller.pid,
                peer: caller.uid,
                now: uid,
            });
        }
        Ok(Process {
            pid: caller.pid,
            uid,
            start_time,
        })
    }

    /// For attestation that reads nothing else under `/proc` (the Unix attestor's uid-only
    /// entries): when the caller's start time was recorded at accept, checks that its PID still
    /// names that process. A caller whose process could not be recorded (a PID this agent cannot
    /// see) is left to its peer credentials alone.
    pub fn check_not_reused(&self, caller: &Caller) -> Result<(), AttestError> {
        match caller.start_time_at_connect {
            Some(recorded) if self.start_time(caller.pid)? != recorded => {
                Err(AttestError::PidReused(caller.pid))
            }
            _ => Ok(()),
        }
    }

    /// Checks, after everything else was read, that the PID still names the observed process.
    /// The start time is read last so it vouches for every read before it.
    pub fn confirm(&self, process: &Process) -> Result<(), AttestError> {
        let uid = self.uid(process.pid)?;
        if uid != process.uid {
            return Err(AttestError::UidChanged {
                pid: process.pid,
                peer: process.uid,
                now: uid,
            });
        }
        if self.start_time(process.pid)? != process.start_time {
            return Err(AttestError::PidReused(process.pid));
        }
        Ok(())
    }

    fn path(&self, pid: i32, file: &str) -> Result<PathBuf, AttestError> {
        if pid <= 0 {
            return Err(AttestError::NoPid);
        }
        Ok(self.root.join(pid.to_string()).join(file))
    }
}

fn read(pid: i32, path: &Path) -> Result<String, AttestError> {
    std::fs::read_to_string(path).map_err(|err| io_error(pid, path, err))
}

fn io_error(pid: i32, path: &Path, err: io::Error) -> AttestError {
    if err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(ESRCH) {
        AttestError::ProcessGone(pid)
    } else {
        AttestError::Io(format!("reading {}: {err}", path.display()))
    }
}

/// Field 22 of a `stat` line. Field 2 is the command name in parentheses, which may itself hold
/// spaces and ')', so fields are counted from the *last* ')'.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the command name.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{FakeProc, FakeProcess};
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn start_time_survives_command_names_with_spaces_and_parentheses() {
        let line = |comm: &str| {
            format!(
                "4242 ({comm}) S 1 4242 4242 0 -1 4194560 1 0 0 0 5 3 0 0 20 0 1 0 987654 12345678 300 18446744073709551615\n"
            )
        };
        assert_eq!(parse_start_time(&line("envoy")), Some(987654));
        assert_eq!(parse_start_time(&line("a b) S 1 2 3")), Some(987654));
        assert_eq!(parse_start_time(&line(")) (")), Some(987654));
        assert_eq!(parse_start_time("4242 (envoy) S 1 2"), None);
        assert_eq!(parse_start_time("no parentheses at all"), None);
        assert_eq!(parse_start_time(""), None);
    }

    #[test]
    fn reads_a_fake_process() {
        let proc = FakeProc::new();
        proc.add(&FakeProcess {
            pid: 4242,
            uid: 1000,
            start_time: 777,
            cgroup: "0::/init.scope\n".into(),
            exe: "/usr/bin/envoy".into(),
        });
        let procfs = proc.procfs();
        assert_eq!(procfs.start_time(4242).unwrap(), 777);
        assert_eq!(procfs.uid(4242).unwrap(), 1000);
        assert_eq!(procfs.cgroup(4242).unwrap(), "0::/init.scope\n");
        assert_eq!(procfs.exe(4242).unwrap(), PathBuf::from("/usr/bin/envoy"));
    }

    #[test]
    fn a_missing_process_is_gone_and_garbage_is_an_io_error() {
        let proc = FakeProc::new();
        let procfs = proc.procfs();
        assert!(matches!(
            procfs.start_time(99),
            Err(AttestError::ProcessGone(99))
        ));
        assert!(matches!(procfs.exe(99), Err(AttestError::ProcessGone(99))));
        assert!(matches!(procfs.start_time(0), Err(AttestError::NoPid)));
        assert!(matches!(procfs.uid(-1), Err(AttestError::NoPid)));

        std::fs::create_dir_all(proc.root().join("5")).unwrap();
        std::fs::write(proc.root().join("5/stat"), "5 (x) S 1").unwrap();
        std::fs::write(proc.root().join("5/status"), "Name:\tx\nGid:\t0\t0\t0\t0\n").unwrap();
        assert!(matches!(procfs.start_time(5), Err(AttestError::Io(_))));
        assert!(matches!(procfs.uid(5), Err(AttestError::Io(_))));
    }

    #[test]
    fn the_effective_uid_is_the_one_compared_with_peer_credentials() {
        let proc = FakeProc::new();
        proc.add(&FakeProcess::host(7, 1000));
        // A setuid binary: real uid 1000, effective uid 0 (what SO_PEERCRED would report).
        std::fs::write(
            proc.root().join("7/status"),
            "Name:\tsu\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n",
        )
        .unwrap();
        assert_eq!(proc.procfs().uid(7).unwrap(), 0);
    }

    #[test]
    fn confirm_catches_pid_reuse_uid_change_and_exit() {
        let proc = FakeProc::new();
        let procfs = proc.procfs();
        let mut process = FakeProcess::host(4242, 1000);
        proc.add(&process);
        let caller = process.caller();

        let observed = procfs.observe(&caller).unwrap();
        assert_eq!(
            observed,
            Process {
                pid: 4242,
                uid: 1000,
                start_time: process.start_time
            }
        );
        procfs.confirm(&observed).unwrap();

        process.start_time += 1;
        proc.add(&process);
        assert!(matches!(
            procfs.confirm(&observed),
            Err(AttestError::PidReused(4242))
        ));

        // The same process, now running as root.
        process.start_time -= 1;
        process.uid = 0;
        proc.add(&process);
        assert!(matches!(
            procfs.confirm(&observed),
            Err(AttestError::UidChanged {
                pid: 4242,
                peer: 1000,
                now: 0
            })
        ));
        // The caller connected as 1000; the process at that PID now runs as 0.
        assert!(matches!(
            procfs.observe(&caller),
            Err(AttestError::UidChanged {
                pid: 4242,
                peer: 1000,
                now: 0
            })
        ));

        proc.remove(4242);
        assert!(matches!(
            procfs.confirm(&observed),
            Err(AttestError::ProcessGone(4242))
        ));
    }

    #[test]
    fn observe_refuses_a_process_started_after_the_one_that_connected() {
        let proc = FakeProc::new();
        let procfs = proc.procfs();
        let process = FakeProcess::host(4242, 1000);
        proc.add(&process);
        let connected = process.caller();
        assert_eq!(connected.start_time_at_connect, Some(process.start_time));
        assert_eq!(procfs.observe(&connected).unwrap().start_time, 123_456);
        procfs.check_not_reused(&connected).unwrap();

        // The connecting process exited and another got its PID before this request.
        let earlier = Caller {
            start_time_at_connect: Some(process.start_time - 1),
            ..connected
        };
        assert!(matches!(
            procfs.observe(&earlier),
            Err(AttestError::PidReused(4242))
        ));
        assert!(matches!(
            procfs.check_not_reused(&earlier),
            Err(AttestError::PidReused(4242))
        ));

        // Not recorded at accept: no /proc-based decision trusts the PID.
        let unrecorded = Caller {
            start_time_at_connect: None,
            ..connected
        };
        assert!(matches!(
            procfs.observe(&unrecorded),
            Err(AttestError::NotRecordedAtConnect(4242))
        ));
        procfs.check_not_reused(&unrecorded).unwrap();
        assert!(matches!(
            procfs.observe(&Caller {
                pid: 0,
                ..unrecorded
            }),
            Err(AttestError::NoPid)
        ));

        proc.remove(4242);
        assert!(matches!(
            procfs.check_not_reused(&connected),
            Err(AttestError::ProcessGone(4242))
        ));
    }

    #[test]
    fn reads_this_very_process_from_the_host_proc() {
        let procfs = Procfs::host();
        let pid = std::process::id() as i32;
        let start_time = procfs.start_time(pid).unwrap();
        assert!(start_time > 0);
        assert_eq!(procfs.start_time(pid).unwrap(), start_time);
        assert_eq!(
            procfs.uid(pid).unwrap(),
            std::fs::metadata("/proc/self").unwrap().uid()
        );
        assert_eq!(procfs.exe(pid).unwrap(), std::env::current_exe().unwrap());
        assert!(!procfs.cgroup(pid).unwrap().is_empty());
    }
}
