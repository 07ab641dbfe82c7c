//! The Unix attestor, for machines without Kubernetes: a YAML file maps a uid, optionally with
//! the executable's path, to a SPIFFE ID, and optionally to labels that authorization policy
//! selectors match (what a pod's labels are in Kubernetes).
//!
//! ```yaml
//! workloads:
//!   - {uid: 1000, path: /usr/bin/envoy, id: spiffe://example.org/ns/shop/sa/web, labels: {app: web}}
//!   - {uid: 1000, id: spiffe://example.org/tools}
//! ```
//!
//! The uid is the caller's SO_PEERCRED uid; when the caller's start time was recorded at accept,
//! its PID must still name that process (so a connection handed down to a child that outlived
//! its parent is not attested). The executable is read from `/proc/<pid>/exe` only when some
//! entry for that uid names a path, and is then the path with symlinks resolved, as the kernel
//! reports it: configure `/usr/local/bin/envoy`, not a symlink to it. A binary replaced
//! since the process started shows as "<path> (deleted)" and matches no path entry. An entry
//! with uid and path wins over the uid-only one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sigil_identity::SpiffeId;

use super::procfs::Procfs;
use super::{AttestError, Caller, Workload};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    workloads: Vec<EntryConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryConfig {
    uid: u32,
    #[serde(default)]
    path: Option<PathBuf>,
    id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// What one entry attests its callers as.
#[derive(Clone, Debug)]
struct Entry {
    id: SpiffeId,
    labels: BTreeMap<String, String>,
}

/// The entries configured for one uid.
#[derive(Clone, Debug, Default)]
struct UidEntries {
    any_binary: Option<Entry>,
    by_path: HashMap<PathBuf, Entry>,
}

impl UidEntries {
    fn select(&self, exe: Option<&Path>) -> Option<&Entry> {
        exe.and_then(|exe| self.by_path.get(exe))
            .or(self.any_binary.as_ref())
    }
}

#[derive(Clone, Debug)]
pub struct UnixAttestor {
    procfs: Procfs,
    by_uid: HashMap<u32, UidEntries>,
}

impl UnixAttestor {
    pub fn load(path: &Path, procfs: Procfs) -> Result<Self, AttestError> {
        let yaml = std::fs::read_to_string(path)
            .map_err(|err| AttestError::Config(format!("reading {}: {err}", path.display())))?;
        Self::parse(&yaml, &path.display().to_string(), procfs)
    }

    /// Parses and validates a workloads file; `origin` names it in errors.
    pub fn parse(yaml: &str, origin: &str, procfs: Procfs) -> Result<Self, AttestError> {
        let file: ConfigFile = serde_yaml::from_str(yaml)
            .map_err(|err| AttestError::Config(format!("{origin}: {err}")))?;
        let mut by_uid: HashMap<u32, UidEntries> = HashMap::new();
        for (index, entry) in file.workloads.into_iter().enumerate() {
            let invalid =
                |why: String| AttestError::Config(format!("{origin}: workloads[{index}]: {why}"));
            let id = SpiffeId::parse(&entry.id)
                .map_err(|err| invalid(format!("id {:?}: {err}", entry.id)))?;
            if id.is_trust_domain_id() {
                return Err(invalid(format!(
                    "id {id} has no path; a workload ID needs one"
                )));
            }
            let entries = by_uid.entry(entry.uid).or_default();
            let attested = Entry {
                id,
                labels: entry.labels,
            };
            match entry.path {
                None => {
                    if entries.any_binary.replace(attested).is_some() {
                        return Err(invalid(format!("a second entry for uid {}", entry.uid)));
                    }
                }
                Some(path) => {
                    if !path.is_absolute() {
                        return Err(invalid(format!("path {} is not absolute", path.display())));
                    }
                    let duplicate = format!(
                        "a second entry for uid {} and {}",
                        entry.uid,
                        path.display()
                    );
                    if entries.by_path.insert(path, attested).is_some() {
                        return Err(invalid(duplicate));
                    }
                }
            }
        }
        Ok(UnixAttestor { procfs, by_uid })
    }

    pub fn attest(&self, caller: &Caller) -> Result<Workload, AttestError> {
        let Some(entries) = self.by_uid.get(&caller.uid) else {
            return Err(AttestError::NoEntry {
                uid: caller.uid,
                path: None,
            });
        };
        let exe = if entries.by_path.is_empty() {
            self.procfs.check_not_reused(caller)?;
            None
        } else {
            Some(self.exe_of(caller)?)
        };
        match entries.select(exe.as_deref()) {
            Some(entry) => Ok(Workload {
                id: entry.id.clone(),
                pod: None,
                labels: entry.labels.clone(),
            }),
            None => Err(AttestError::NoEntry {
                uid: caller.uid,
                path: exe.map(|exe| exe.display().to_string()),
            }),
        }
    }

    /// The caller's executable, read between observing the process and confirming that its PID
    /// still names that same process.
    fn exe_of(&self, caller: &Caller) -> Result<PathBuf, AttestError> {
        let process = self.procfs.observe(caller)?;
        let exe = self.procfs.exe(caller.pid)?;
        self.procfs.confirm(&process)?;
        Ok(exe)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{FakeProc, FakeProcess};
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const CONFIG: &str = "\
workloads:
  - {uid: 1000, path: /usr/bin/envoy, id: spiffe://example.org/web}
  - {uid: 1000, id: spiffe://example.org/tools}
  - uid: 2000
    path: /opt/db/bin/postgres
    id: spiffe://example.org/db
";

    fn spiffe(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn running(proc: &FakeProc, pid: i32, uid: u32, exe: &str) -> Caller {
        let process = FakeProcess {
            exe: exe.into(),
            ..FakeProcess::host(pid, uid)
        };
        proc.add(&process);
        process.caller()
    }

    fn id_of(attested: Result<Workload, AttestError>) -> SpiffeId {
        let workload = attested.unwrap();
        assert_eq!(workload.pod, None);
        workload.id
    }

    #[test]
    fn uid_and_path_entry_beats_the_uid_only_entry() {
        let proc = FakeProc::new();
        let attestor = UnixAttestor::parse(CONFIG, "test", proc.procfs()).unwrap();
        let envoy = running(&proc, 10, 1000, "/usr/bin/envoy");
        assert_eq!(
            id_of(attestor.attest(&envoy)),
            spiffe("spiffe://example.org/web")
        );
        let shell = running(&proc, 11, 1000, "/usr/bin/bash");
        assert_eq!(
            id_of(attestor.attest(&shell)),
            spiffe("spiffe://example.org/tools")
        );
        // Envoy replaced on disk since it started: no longer the configured binary.
        let replaced = running(&proc, 12, 1000, "/usr/bin/envoy (deleted)");
        assert_eq!(
            id_of(attestor.attest(&replaced)),
            spiffe("spiffe://example.org/tools")
        );
        let postgres = running(&proc, 13, 2000, "/opt/db/bin/postgres");
        assert_eq!(
            id_of(attestor.attest(&postgres)),
            spiffe("spiffe://example.org/db")
        );
    }

    #[test]
    fn the_matching_entry_s_labels_are_attested() {
        let proc = FakeProc::new();
        let yaml = "workloads:\n\
                    - {uid: 1000, path: /usr/bin/envoy, id: spiffe://example.org/ns/shop/sa/web, labels: {app: web, tier: front}}\n\
                    - {uid: 1000, id: spiffe://example.org/tools}\n";
        let attestor = UnixAttestor::parse(yaml, "test", proc.procfs()).unwrap();
        let envoy = running(&proc, 10, 1000, "/usr/bin/envoy");
        assert_eq!(
            attestor.attest(&envoy).unwrap().labels,
            BTreeMap::from([
                ("app".to_string(), "web".to_string()),
                ("tier".to_string(), "front".to_string()),
            ])
        );
        let shell = running(&proc, 11, 1000, "/usr/bin/bash");
        assert!(attestor.attest(&shell).unwrap().labels.is_empty());
        let not_strings = "workloads: [{uid: 1, id: spiffe://a/b, labels: [app]}]";
        assert!(UnixAttestor::parse(not_strings, "test", proc.procfs()).is_err());
    }

    #[test]
    fn a_uid_only_match_of_an_unrecorded_process_needs_nothing_from_proc() {
        let proc = FakeProc::new();
        let yaml = "workloads: [{uid: 1000, id: spiffe://example.org/tools}]";
        let attestor = UnixAttestor::parse(yaml, "test", proc.procfs()).unwrap();
        // Not in the fake /proc, and not even a visible PID: the uid alone decides.
        let caller = Caller {
            pid: 0,
            uid: 1000,
            gid: 1000,
            start_time_at_connect: None,
        };
        assert_eq!(
            id_of(attestor.attest(&caller)),
            spiffe("spiffe://example.org/tools")
        );
    }

    #[test]
    fn a_uid_only_match_needs_the_process_that_connected() {
        let proc = FakeProc::new();
        let yaml = "workloads: [{uid: 1000, id: spiffe://example.org/tools}]";
        let attestor = UnixAttestor::parse(yaml, "test", proc.procfs()).unwrap();
        let caller = running(&proc, 40, 1000, "/usr/bin/bash");
        assert_eq!(
            id_of(attestor.attest(&caller)),
            spiffe("spiffe://example.org/tools")
        );
        // Another process got the PID since the connection was accepted.
        let reused = Caller {
            start_time_at_connect: caller.start_time_at_connect.map(|t| t + 1),
            ..caller
        };
        assert!(matches!(
            attestor.attest(&reused),
            Err(AttestError::PidReused(40))
        ));
        proc.remove(40);
        assert!(matches!(
            attestor.attest(&caller),
            Err(AttestError::ProcessGone(40))
        ));
    }

    #[test]
    fn callers_without_an_entry_are_refused() {
        let proc = FakeProc::new();
        let attestor = UnixAttestor::parse(CONFIG, "test", proc.procfs()).unwrap();
        let stranger = running(&proc, 20, 3000, "/usr/bin/envoy");
        assert!(matches!(
            attestor.attest(&stranger),
            Err(AttestError::NoEntry {
                uid: 3000,
                path: None
            })
        ));
        let not_postgres = running(&proc, 21, 2000, "/usr/bin/psql");
        let refused = attestor.attest(&not_postgres);
        assert!(
            matches!(&refused, Err(AttestError::NoEntry { uid: 2000, path: Some(p) }) if p == "/usr/bin/psql"),
            "{refused:?}"
        );
    }

    #[test]
    fn a_path_match_needs_the_process_it_connected_as() {
        let proc = FakeProc::new();
        let attestor = UnixAttestor::parse(CONFIG, "test", proc.procfs()).unwrap();
        let gone = Caller {
            pid: 30,
            uid: 2000,
            gid: 2000,
            start_time_at_connect: Some(123_456),
        };
        assert!(matches!(
            attestor.attest(&gone),
            Err(AttestError::ProcessGone(30))
        ));
        let hidden = Caller {
            pid: 0,
            start_time_at_connect: None,
            ..gone
        };
        assert!(matches!(attestor.attest(&hidden), Err(AttestError::NoPid)));
        // The PID now belongs to a root process running the configured binary.
        running(&proc, 30, 0, "/opt/db/bin/postgres");
        assert!(matches!(
            attestor.attest(&gone),
            Err(AttestError::UidChanged {
                pid: 30,
                peer: 2000,
                now: 0
            })
        ));
    }

    #[test]
    fn a_path_match_refuses_a_pid_reused_since_accept() {
        let proc = FakeProc::new();
        let attestor = UnixAttestor::parse(CONFIG, "test", proc.procfs()).unwrap();
        let postgres = running(&proc, 31, 2000, "/opt/db/bin/postgres");
        assert_eq!(
            id_of(attestor.attest(&postgres)),
            spiffe("spiffe://example.org/db")
        );
        // Same uid, same binary, but not the process that connected.
        let reused = Caller {
            start_time_at_connect: Some(1),
            ..postgres
        };
        assert!(matches!(
            attestor.attest(&reused),
            Err(AttestError::PidReused(31))
        ));
        let unrecorded = Caller {
            start_time_at_connect: None,
            ..postgres
        };
        assert!(matches!(
            attestor.attest(&unrecorded),
            Err(AttestError::NotRecordedAtConnect(31))
        ));
    }

    #[test]
    fn invalid_files_are_rejected_with_the_reason() {
        let config_error =
            |yaml: &str| match UnixAttestor::parse(yaml, "workloads.yaml", Procfs::host()) {
                Err(AttestError::Config(message)) => message,
                other => panic!("expected a Config error for {yaml:?}, got {other:?}"),
            };
        assert!(config_error("workloads: [").starts_with("workloads.yaml: "));
        assert!(config_error("{}").contains("missing field `workloads`"));
        assert!(config_error("workloads: []\nextra: 1").contains("unknown field `extra`"));
        assert!(
            config_error("workloads: [{uid: 1, id: spiffe://a/b, exe: /bin/sh}]")
                .contains("unknown field `exe`")
        );
        assert!(config_error("workloads: [{uid: -1, id: spiffe://a/b}]").contains("workloads"));
        assert!(
            config_error("workloads: [{path: /bin/sh, id: spiffe://a/b}]")
                .contains("missing field `uid`")
        );
        assert_eq!(
            config_error("workloads: [{uid: 1, id: spiffe://a/b}, {uid: 1, id: 'http://a/b'}]"),
            "workloads.yaml: workloads[1]: id \"http://a/b\": SPIFFE ID must start with the lowercase scheme \"spiffe://\""
        );
        assert!(
            config_error("workloads: [{uid: 1, id: 'spiffe://example.org'}]")
                .contains("has no path")
        );
        assert!(
            config_error("workloads: [{uid: 1, path: bin/sh, id: spiffe://a/b}]")
                .contains("not absolute")
        );
        assert!(
            config_error("workloads: [{uid: 1, id: spiffe://a/b}, {uid: 1, id: spiffe://a/c}]")
                .contains("a second entry for uid 1")
        );
        assert!(
            config_error(
                "workloads: [{uid: 1, path: /bin/sh, id: spiffe://a/b}, {uid: 1, path: /bin/sh, id: spiffe://a/c}]"
            )
            .contains("a second entry for uid 1 and /bin/sh")
        );
    }

    #[test]
    fn loads_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workloads.yaml");
        let proc = FakeProc::new();
        assert!(matches!(
            UnixAttestor::load(&path, proc.procfs()),
            Err(AttestError::Config(message)) if message.starts_with("reading ")
        ));
        std::fs::write(&path, CONFIG).unwrap();
        let attestor = UnixAttestor::load(&path, proc.procfs()).unwrap();
        let envoy = running(&proc, 10, 1000, "/usr/bin/envoy");
        assert_eq!(
            id_of(attestor.attest(&envoy)),
            spiffe("spiffe://example.org/web")
        );
    }

    #[test]
    fn attests_this_real_process_by_uid_and_executable() {
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let exe = std::env::current_exe().unwrap();
        let yaml = format!(
            "workloads:\n\
             - {{uid: {uid}, id: spiffe://example.org/other-binaries}}\n\
             - {{uid: {uid}, path: '{}', id: spiffe://example.org/this-test}}\n",
            exe.display()
        );
        let attestor = UnixAttestor::parse(&yaml, "test", Procfs::host()).unwrap();
        let pid = std::process::id() as i32;
        let me = Caller {
            pid,
            uid,
            gid: 0,
            start_time_at_connect: Some(Procfs::host().start_time(pid).unwrap()),
        };
        assert_eq!(
            id_of(attestor.attest(&me)),
            spiffe("spiffe://example.org/this-test")
        );
        let someone_else = Caller { uid: uid + 1, ..me };
        assert!(matches!(
            attestor.attest(&someone_else),
            Err(AttestError::NoEntry { path: None, .. })
        ));
    }
}
