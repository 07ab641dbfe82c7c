//! Fake `/proc` trees for the attestor tests: `<root>/<pid>/{stat,status,cgroup,exe}` laid out as
//! the kernel shows them, with `exe` a (possibly dangling) symlink.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::Caller;
use super::procfs::Procfs;

pub const CONTAINER_ID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

/// One process in a fake tree.
#[derive(Clone, Debug)]
pub struct FakeProcess {
    pub pid: i32,
    pub uid: u32,
    pub start_time: u64,
    pub cgroup: String,
    pub exe: PathBuf,
}

impl FakeProcess {
    /// A process outside any pod (systemd's `init.scope`).
    pub fn host(pid: i32, uid: u32) -> Self {
        FakeProcess {
            pid,
            uid,
            start_time: 123_456,
            cgroup: "0::/init.scope\n".into(),
            exe: "/usr/sbin/host-daemon".into(),
        }
    }

    /// A container process of pod `pod_uid` on a cgroup v2, systemd-driver, containerd node.
    pub fn in_pod(pid: i32, uid: u32, pod_uid: &str) -> Self {
        let slice_uid = pod_uid.replace('-', "_");
        FakeProcess {
            cgroup: format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{CONTAINER_ID}.scope\n"
            ),
            exe: "/usr/local/bin/envoy".into(),
            ..Self::host(pid, uid)
        }
    }

    /// Its SO_PEERCRED credentials and start time, as recorded when it connected.
    pub fn caller(&self) -> Caller {
        Caller {
            pid: self.pid,
            uid: self.uid,
            gid: self.uid,
            start_time_at_connect: Some(self.start_time),
        }
    }
}

pub struct FakeProc {
    dir: TempDir,
}

impl FakeProc {
    pub fn new() -> Self {
        FakeProc {
            dir: tempfile::tempdir().expect("creating a temporary /proc"),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn procfs(&self) -> Procfs {
        Procfs::new(self.root())
    }

    /// Writes (or rewrites) a process's files.
    pub fn add(&self, p: &FakeProcess) {
        let dir = self.root().join(p.pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        // The command name has a space and a ')' like a hostile one could.
        let stat = format!(
            "{pid} (evil) name) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 {start} 12345678 300 18446744073709551615\n",
            pid = p.pid,
            start = p.start_time
        );
        std::fs::write(dir.join("stat"), stat).unwrap();
        let status = format!(
            "Name:\tevil) name\nState:\tS (sleeping)\nPid:\t{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n",
            pid = p.pid,
            uid = p.uid
        );
        std::fs::write(dir.join("status"), status).unwrap();
        std::fs::write(dir.join("cgroup"), &p.cgroup).unwrap();
        let exe = dir.join("exe");
        if exe.symlink_metadata().is_ok() {
            std::fs::remove_file(&exe).unwrap();
        }
        std::os::unix::fs::symlink(&p.exe, exe).unwrap();
    }

    /// The process exits.
    pub fn remove(&self, pid: i32) {
        std::fs::remove_dir_all(self.root().join(pid.to_string())).unwrap();
    }
}
