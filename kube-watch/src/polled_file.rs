//! A configuration file followed while the process runs (the agent's `--mesh-file` and
//! `--policy-file`): loaded at start-up, where a missing or invalid file is an error, then re-read
//! every [`POLL_INTERVAL`]. Polling rather than inotify, because these files are typically ConfigMap
//! volumes or edited by tools that replace them, which inotify watches lose track of.
//!
//! Each read is compared with the previous one, so new contents are parsed once, and a failure
//! (unreadable, or contents that do not parse) is reported once rather than on every poll; after
//! a failure the last good value stays in force.
//!
//! The loop of [`crate::follow`] re-reads it for the states that merge such a file with their
//! watches ([`crate::State::poll_file`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a followed file is re-read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What the last read of the file found.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Contents(Vec<u8>),
    Unreadable(std::io::ErrorKind),
}

/// A file, what was last read from it, and the value its last valid contents parsed to.
#[derive(Debug)]
pub struct PolledFile<T> {
    path: PathBuf,
    seen: Seen,
    value: T,
}

impl<T> PolledFile<T> {
    /// Reads and parses the file at start-up.
    pub fn load<E: From<std::io::Error>>(
        path: &Path,
        parse: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Result<Self, E> {
        let contents = std::fs::read(path)?;
        let value = parse(&contents)?;
        Ok(PolledFile {
            path: path.to_path_buf(),
            seen: Seen::Contents(contents),
            value,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value of the last valid contents.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// Re-reads the file: `Ok(true)` if it had new, valid contents (the value may still be
    /// equal), `Ok(false)` if nothing changed (same contents, or the same failure as last time),
    /// `Err` for a new failure, after which the last good value stays.
    pub async fn poll<E: From<std::io::Error>>(
        &mut self,
        parse: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Result<bool, E> {
        let read = tokio::fs::read(&self.path).await;
        self.reload(read, parse)
    }

    fn reload<E: From<std::io::Error>>(
        &mut self,
        read: std::io::Result<Vec<u8>>,
        parse: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Result<bool, E> {
        match read {
            Ok(contents) => {
                if matches!(&self.seen, Seen::Contents(last) if *last == contents) {
                    return Ok(false);
                }
                let parsed = parse(&contents);
                self.seen = Seen::Contents(contents);
                self.value = parsed?;
                Ok(true)
            }
            Err(e) => {
                let seen = Seen::Unreadable(e.kind());
                if self.seen == seen {
                    return Ok(false);
                }
                self.seen = seen;
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error("{0}")]
        Read(#[from] std::io::Error),
        #[error("not a number")]
        Parse,
    }

    fn number(contents: &[u8]) -> Result<u32, TestError> {
        std::str::from_utf8(contents)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or(TestError::Parse)
    }

    #[test]
    fn each_change_and_each_new_failure_is_seen_once_and_the_last_good_value_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        assert!(matches!(
            PolledFile::load(&path, number),
            Err(TestError::Read(_))
        ));
        std::fs::write(&path, "1").unwrap();
        let mut file = PolledFile::load(&path, number).unwrap();
        assert_eq!((file.path(), *file.value()), (path.as_path(), 1));

        let read = |s: &str| Ok(s.as_bytes().to_vec());
        assert!(!file.reload(read("1"), number).unwrap(), "same contents");
        assert!(matches!(
            file.reload(read("x"), number),
            Err(TestError::Parse)
        ));
        assert!(!file.reload(read("x"), number).unwrap(), "same failure");
        assert_eq!(*file.value(), 1);
        let gone = || Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(matches!(
            file.reload(gone(), number),
            Err(TestError::Read(_))
        ));
        assert!(!file.reload(gone(), number).unwrap(), "still gone");
        assert!(file.reload(read("2"), number).unwrap());
        assert_eq!(*file.value(), 2);
        // Equal value, different bytes: new contents all the same.
        assert!(file.reload(read("2\n"), number).unwrap());
    }
}
