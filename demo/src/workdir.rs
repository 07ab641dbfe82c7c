//! The demo's working directory: CA state, agent socket, policy and workload files, the two
//! proxy executables and every component's log. A fresh temporary directory unless `--dir` names
//! one; removed at the end only when it was temporary, nothing failed and `--keep` was not given.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WorkdirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--dir {0} is not empty: give an empty or new directory")]
    NotEmpty(PathBuf),
    #[error("finding this executable (to run the proxies from it): {0}")]
    CurrentExe(std::io::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkdirError + '_ {
    move |source| WorkdirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct Workdir {
    /// Absolute, with symlinks resolved (the agent matches executables by their real path).
    pub path: PathBuf,
    /// Set while the directory is a temporary one that will be removed.
    temp: Option<tempfile::TempDir>,
}

impl Workdir {
    /// `dir` (created if missing, must be empty), or a new temporary directory.
    pub fn create(dir: Option<&Path>) -> Result<Workdir, WorkdirError> {
        let (path, temp) = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
                if std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
                    return Err(WorkdirError::NotEmpty(dir.to_path_buf()));
                }
                (dir.to_path_buf(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("sigil-demo-")
                    .tempdir()
                    .map_err(io(&std::env::temp_dir()))?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let path = std::fs::canonicalize(&path).map_err(io(&path))?;
        let workdir = Workdir { path, temp };
        for sub in ["bin", "logs", "run"] {
            let dir = workdir.path.join(sub);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(workdir)
    }

    pub fn logs(&self) -> PathBuf {
        self.path.join("logs")
    }

    /// Whether the directory will be removed by [`Workdir::finish`] if asked to.
    pub fn is_temporary(&self) -> bool {
        self.temp.is_some()
    }

    /// Removes a temporary directory unless `keep`; returns whether it is still there.
    pub fn finish(mut self, keep: bool) -> bool {
        match self.temp.take() {
            Some(temp) if !keep => temp.close().is_err(),
            Some(temp) => {
                let _ = temp.keep();
                true
            }
            None => true,
        }
    }

    /// The running executable at `bin/<name>`: a hard link where possible (to the executable,
    /// or to a copy made for an earlier name), else a copy. Each proxy runs from its own path
    /// so the agent's unix attestor (uid + executable path) can tell them apart without running
    /// them as different users; the kernel reports a hard link by the path it was run from.
    pub fn link_self(&self, name: &str) -> Result<PathBuf, WorkdirError> {
        let exe = std::env::current_exe().map_err(WorkdirError::CurrentExe)?;
        let bin = self.path.join("bin");
        let target = bin.join(name);
        if std::fs::hard_link(&exe, &target).is_ok() {
            return Ok(target);
        }
        // Another filesystem, or protected_hardlinks for a file we do not own: one copy, then
        // hard links to it.
        let earlier = std::fs::read_dir(&bin)
            .map_err(io(&bin))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path != &target);
        if let Some(copy) = earlier
            && std::fs::hard_link(&copy, &target).is_ok()
        {
            return Ok(target);
        }
        std::fs::copy(&exe, &target).map_err(io(&target))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
            .map_err(io(&target))?;
        Ok(target)
    }
}

/// The effective uid of this process (the owner of `/proc/self`), which the children share.
pub fn current_uid() -> Result<u32, WorkdirError> {
    let proc_self = Path::new("/proc/self");
    Ok(std::fs::metadata(proc_self).map_err(io(proc_self))?.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_directory_must_be_empty_and_is_never_removed() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("new");
        let workdir = Workdir::create(Some(&dir)).unwrap();
        assert!(!workdir.is_temporary());
        assert!(workdir.logs().is_dir());
        assert!(workdir.finish(false));
        assert!(dir.is_dir());
        let err = Workdir::create(Some(&dir)).err().unwrap();
        assert!(matches!(err, WorkdirError::NotEmpty(_)), "{err}");
    }

    #[test]
    fn a_temporary_directory_is_removed_unless_kept() {
        let workdir = Workdir::create(None).unwrap();
        let path = workdir.path.clone();
        assert!(workdir.is_temporary());
        assert!(!workdir.finish(false));
        assert!(!path.exists());

        let workdir = Workdir::create(None).unwrap();
        let path = workdir.path.clone();
        assert!(workdir.finish(true));
        assert!(path.is_dir());
        std::fs::remove_dir_all(path).unwrap();
    }

    #[test]
    fn each_name_gets_its_own_path_to_this_executable() {
        let workdir = Workdir::create(None).unwrap();
        let a = workdir.link_self("a-proxy").unwrap();
        let b = workdir.link_self("b-proxy").unwrap();
        assert_ne!(a, b);
        let size = std::fs::metadata(std::env::current_exe().unwrap())
            .unwrap()
            .len();
        for path in [&a, &b] {
            let meta = std::fs::metadata(path).unwrap();
            assert_eq!(meta.len(), size);
            assert!(meta.permissions().mode() & 0o111 != 0, "executable");
        }
    }

    #[test]
    fn the_uid_is_the_owner_of_what_we_create() {
        let dir = tempfile::tempdir().unwrap();
        let owner = std::fs::metadata(dir.path()).unwrap().uid();
        assert_eq!(current_uid().unwrap(), owner);
    }
}
