//! Attestation: who is calling, decided from the caller's process only — its peer credentials
//! (SO_PEERCRED) and start time, both recorded when its connection was accepted and passed in as
//! a [`Caller`], and what the kernel says about that process under `/proc` — never from anything
//! the caller sends.
//!
//! Two attestors: [`k8s::KubernetesAttestor`] (PID → cgroup → pod UID → this node's pods →
//! namespace and service account) and [`unix::UnixAttestor`] (uid, optionally with the
//! executable's path, → a configured SPIFFE ID). Both check that the process now at the caller's
//! PID started when the one that connected did, and re-check it after attesting, so a PID reused
//! by another process — since the connection was accepted, or while attestation ran — is refused
//! rather than misattributed.

pub mod cgroup;
pub mod k8s;
pub mod procfs;
#[cfg(test)]
mod test_support;
pub mod unix;

use std::collections::BTreeMap;

use sigil_identity::SpiffeId;
use sigil_identity::spiffe::SpiffeIdError;

/// The kernel's word on who is at the other end of a Unix socket (SO_PEERCRED, as of `connect`),
/// and when that process started, as read when its connection was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// 0 when the peer is in a PID namespace this process cannot see.
    pub pid: i32,
    /// Effective uid and gid at `connect` time.
    pub uid: u32,
    pub gid: u32,
    /// The start time of the process at `pid` when the connection was accepted (see
    /// [`procfs::Procfs::start_time`]); `None` if it could not be read then. A PID only names the
    /// connecting process while the process at it still has this start time.
    pub start_time_at_connect: Option<u64>,
}

/// The identity a caller is entitled to, the pod it runs in (Kubernetes attestation only), and
/// its labels as of attestation (what policy selectors match): the pod's, or those its Unix
/// attestor entry configures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub id: SpiffeId,
    pub pod: Option<PodRef>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Why a caller was not attested. The messages are for the agent's logs; a caller is only told
/// that attestation failed.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("the peer's PID is unknown (it runs in a PID namespace this agent cannot see)")]
    NoPid,
    #[error("process {0} has exited")]
    ProcessGone(i32),
    #[error("PID {0} now belongs to a different process than the one attested (PID reused)")]
    PidReused(i32),
    #[error(
        "process {0} could not be read when it connected, so a later process at its PID cannot be told apart from it"
    )]
    NotRecordedAtConnect(i32),
    #[error(
        "process {pid} runs as uid {now} but connected as uid {peer} (PID reused or credentials changed)"
    )]
    UidChanged { pid: i32, peer: u32, now: u32 },
    #[error(
        "process {pid} is not in a Kubernetes pod's cgroup (a host process, or an unknown cgroup layout)"
    )]
    NoPodUid { pid: i32 },
    #[error("no pod with UID {uid} is on this node")]
    PodNotFound { uid: String },
    #[error("pod {uid} is unknown: this node's pod list has not been synced yet")]
    PodsNotSynced { uid: String },
    #[error("the watch of this node's pods has stopped; pod {uid} cannot be looked up")]
    PodWatchClosed { uid: String },
    #[error("pod {namespace}/{name} has {phase}; a finished pod holds no identity")]
    PodFinished {
        namespace: String,
        name: String,
        phase: String,
    },
    #[error("no workload entry for uid {uid}{}", path.as_deref().map(|p| format!(" running {p}")).unwrap_or_default())]
    NoEntry { uid: u32, path: Option<String> },
    #[error("the attested identity is not a valid SPIFFE ID: {0}")]
    Identity(#[from] SpiffeIdError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Config(String),
}

/// The attestor this agent was configured with.
#[derive(Clone, Debug)]
pub enum Attestor {
    Kubernetes(k8s::KubernetesAttestor),
    Unix(unix::UnixAttestor),
}

impl Attestor {
    pub async fn attest(&self, caller: &Caller) -> Result<Workload, AttestError> {
        match self {
            Attestor::Kubernetes(attestor) => attestor.attest(caller).await,
            Attestor::Unix(attestor) => attestor.attest(caller),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::procfs::Procfs;
    use super::*;
    use crate::peer::PeerAtAccept;
    use std::os::unix::fs::MetadataExt;
    use tokio::net::{UnixListener, UnixStream};

    /// The whole path a request takes: the kernel's peer credentials of a real connection and
    /// the start time recorded on accept, then the Unix attestor matching this test process's
    /// real uid and executable.
    #[tokio::test]
    async fn peer_credentials_of_a_real_connection_attest_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (client, accepted) = tokio::join!(UnixStream::connect(&socket), listener.accept());
        let _client = client.unwrap();
        let (server_side, _) = accepted.unwrap();
        let procfs = Procfs::host();
        let caller = PeerAtAccept::record(&server_side, &procfs)
            .caller()
            .unwrap();

        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let pid = std::process::id() as i32;
        assert_eq!(caller.pid, pid);
        assert_eq!(caller.uid, uid);
        assert_eq!(
            caller.start_time_at_connect,
            Some(procfs.start_time(pid).unwrap())
        );

        let exe = std::env::current_exe().unwrap();
        let yaml = format!(
            "workloads:\n\
             - {{uid: {uid}, id: spiffe://example.org/any-binary}}\n\
             - {{uid: {uid}, path: '{}', id: spiffe://example.org/this-test}}\n",
            exe.display()
        );
        let attestor = Attestor::Unix(unix::UnixAttestor::parse(&yaml, "test", procfs).unwrap());
        let workload = attestor.attest(&caller).await.unwrap();
        assert_eq!(
            workload,
            Workload {
                id: SpiffeId::parse("spiffe://example.org/this-test").unwrap(),
                pod: None,
                labels: BTreeMap::new(),
            }
        );
    }

    #[test]
    fn errors_say_what_was_refused() {
        let no_entry = AttestError::NoEntry {
            uid: 1000,
            path: Some("/usr/bin/envoy".into()),
        };
        assert_eq!(
            no_entry.to_string(),
            "no workload entry for uid 1000 running /usr/bin/envoy"
        );
        let no_entry = AttestError::NoEntry {
            uid: 1000,
            path: None,
        };
        assert_eq!(no_entry.to_string(), "no workload entry for uid 1000");
    }
}
