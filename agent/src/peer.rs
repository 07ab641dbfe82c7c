//! Who is on the other end of a request on the agent socket: the connection's peer, recorded
//! when the connection is accepted (SO_PEERCRED and the process's start time), attested into a
//! workload identity. Shared by every API served on the socket, so they all decide "who is this"
//! the same way. Also how many connections peers may hold: in all, and per process.

use std::sync::Arc;

use sigil_base::slots::{self, Refused};
use sigil_identity::TrustBundle;
use tokio::net::UnixStream;
use tokio::net::unix::UCred;
use tokio::sync::watch;
use tonic::Status;
use tracing::{debug, warn};

use crate::attest::procfs::Procfs;
use crate::attest::{Attestor, Caller, Workload};
use crate::certs::CertManager;
use crate::metrics::{Metrics, RefusedLabels, RefusedReason};

/// Default of `--max-connections`: every connection may buffer a header block
/// (`h2_authority`), so this bounds what a flood of them costs (some 40 KiB each at most).
pub const DEFAULT_MAX_CONNECTIONS: usize = 2_048;
/// Default of `--max-connections-per-process`: a proxy keeps a few (SDS, membership, policies).
pub const DEFAULT_MAX_CONNECTIONS_PER_PROCESS: usize = 128;

/// The peer of an agent-socket connection as of its accept: the connection info every request
/// on it carries. SO_PEERCRED names the connecting process by PID only, and requests come later,
/// when that PID may name another process; the start time read now tells the two apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAtAccept {
    /// `None` if the kernel gave no peer credentials.
    pub cred: Option<UCred>,
    /// Start time of the process at the peer's PID, read at accept; `None` if it could not be
    /// read (the peer already exited, or runs in a PID namespace this agent cannot see).
    pub start_time: Option<u64>,
}

impl PeerAtAccept {
    /// Records the peer of a connection just accepted, before any request on it is read.
    pub fn record(stream: &UnixStream, procfs: &Procfs) -> Self {
        let cred = stream.peer_cred().ok();
        let start_time = cred
            .and_then(|cred| cred.pid())
            .and_then(|pid| procfs.start_time(pid).ok());
        PeerAtAccept { cred, start_time }
    }

    /// The caller to attest, if the kernel gave peer credentials.
    pub fn caller(&self) -> Option<Caller> {
        self.cred.map(|cred| Caller {
            pid: cred.pid().unwrap_or(0),
            uid: cred.uid(),
            gid: cred.gid(),
            start_time_at_connect: self.start_time,
        })
    }
}

/// The agent socket's connection slots: at most `max` connections open at once, at most
/// `per_process` of them from one process (SO_PEERCRED's pid; connections without peer
/// credentials count as one process).
pub struct ConnectionSlots {
    slots: Arc<slots::ConnectionSlots<i32>>,
    metrics: Arc<Metrics>,
}

/// One open connection's slot, given back when dropped.
pub struct ConnectionSlot {
    slots: Arc<ConnectionSlots>,
    _slot: slots::ConnectionSlot<i32>,
}

impl ConnectionSlots {
    pub fn new(max: usize, per_process: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            slots: slots::ConnectionSlots::new(max, per_process),
            metrics,
        })
    }

    fn refused(&self, reason: RefusedReason) {
        self.metrics
            .connections_refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
    }

    /// A slot for a connection from `peer`, if the socket and its process have one left.
    pub fn take(self: &Arc<Self>, peer: &PeerAtAccept) -> Option<ConnectionSlot> {
        let pid = peer.cred.and_then(|cred| cred.pid()).unwrap_or(0);
        match self.slots.try_take(pid) {
            Ok(slot) => Some(ConnectionSlot {
                slots: self.clone(),
                _slot: slot,
            }),
            Err(Refused::Total) => {
                self.refused(RefusedReason::ConnectionLimit);
                warn!(
                    pid,
                    "every agent-socket connection slot is taken; closing a new connection"
                );
                None
            }
            Err(Refused::PerKey) => {
                self.refused(RefusedReason::PerProcessLimit);
                debug!(
                    pid,
                    limit = self.slots.per_key_limit(),
                    "process holds too many agent-socket connections; closing a new one"
                );
                None
            }
        }
    }
}

impl ConnectionSlot {
    /// Counts this connection as closed by a limit.
    pub fn refused(&self, reason: RefusedReason) {
        self.slots.refused(reason);
    }
}

/// What the socket's APIs need: attestation, certificates and the trust bundle.
#[derive(Clone)]
pub struct Workloads {
    attestor: Arc<Attestor>,
    pub certs: CertManager,
    pub bundle: watch::Receiver<Arc<TrustBundle>>,
    pub metrics: Arc<Metrics>,
}

impl Workloads {
    pub fn new(
        attestor: Arc<Attestor>,
        certs: CertManager,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Workloads {
            attestor,
            certs,
            bundle,
            metrics,
        }
    }

    /// The workload behind `request`'s connection. Callers learn only that attestation failed;
    /// the log says why.
    pub async fn attest<T>(&self, request: &tonic::Request<T>) -> Result<Workload, Status> {
        let caller = request
            .extensions()
            .get::<PeerAtAccept>()
            .and_then(PeerAtAccept::caller)
            .ok_or_else(|| {
                self.metrics.attestation_failures.inc();
                warn!("request without peer credentials (not on the agent's Unix socket)");
                Status::permission_denied("caller could not be attested")
            })?;
        self.attestor.attest(&caller).await.map_err(|e| {
            self.metrics.attestation_failures.inc();
            warn!(pid = caller.pid, uid = caller.uid, error = %e, "attestation failed");
            Status::permission_denied("caller could not be attested")
        })
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;
    use tonic::transport::server::Connected;

    use super::*;
    use crate::attest::AttestError;
    use crate::attest::unix::UnixAttestor;
    use crate::h2_authority::H2AuthorityStream;
    use crate::test_support::{WEB_ID, this_uid, uid_is_web};

    /// A real connection from another process: what is recorded at accept is that process's
    /// SO_PEERCRED and its start time as `/proc/<pid>/stat` gives it, and once that process has
    /// exited, its connection (still open, held by whoever inherited it) is no longer attested.
    #[tokio::test]
    async fn the_peer_recorded_at_accept_is_the_connecting_process() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        // The child connects, says so, then keeps the connection until its stdin closes.
        let mut child = tokio::process::Command::new("python3")
            .args([
                "-c",
                "import socket, sys\n\
                 s = socket.socket(socket.AF_UNIX)\n\
                 s.connect(sys.argv[1])\n\
                 print('connected', flush=True)\n\
                 sys.stdin.read()\n",
            ])
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let child_pid = child.id().unwrap() as i32;
        let (stream, _) = listener.accept().await.unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .await
            .unwrap();
        assert_eq!(line, "connected\n");

        let procfs = Procfs::host();
        let metrics = Arc::new(Metrics::new(
            &mut prometheus_client::registry::Registry::default(),
        ));
        let connection =
            H2AuthorityStream::accept(stream, &procfs, &ConnectionSlots::new(1, 1, metrics))
                .unwrap();
        let peer = connection.connect_info();
        let stat = std::fs::read_to_string(format!("/proc/{child_pid}/stat")).unwrap();
        let start_time_in_stat: u64 = stat[stat.rfind(')').unwrap() + 2..]
            .split(' ')
            .nth(22 - 3)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(peer.start_time, Some(start_time_in_stat));
        let caller = peer.caller().unwrap();
        assert_eq!(caller.pid, child_pid);
        assert_eq!(caller.uid, this_uid());
        assert_eq!(caller.start_time_at_connect, Some(start_time_in_stat));

        let attestor = UnixAttestor::parse(&uid_is_web(this_uid()), "test", procfs).unwrap();
        assert_eq!(attestor.attest(&caller).unwrap().id.to_string(), WEB_ID);
        // Whatever process holds that PID later is not the one that connected.
        let reused = Caller {
            start_time_at_connect: Some(start_time_in_stat + 1),
            ..caller
        };
        assert!(matches!(
            attestor.attest(&reused),
            Err(AttestError::PidReused(pid)) if pid == child_pid
        ));

        drop(child.stdin.take());
        assert!(child.wait().await.unwrap().success());
        assert!(matches!(
            attestor.attest(&caller),
            Err(AttestError::ProcessGone(pid)) if pid == child_pid
        ));
    }

    #[tokio::test]
    async fn a_peer_gone_before_accept_is_recorded_without_a_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        // Connects and exits at once: by the time the agent accepts, its PID names nothing.
        let status = Command::new("python3")
            .args([
                "-c",
                "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
            ])
            .arg(&socket)
            .status()
            .unwrap();
        assert!(status.success());
        let (stream, _) = listener.accept().await.unwrap();
        let peer = PeerAtAccept::record(&stream, &Procfs::host());
        let caller = peer.caller().expect("credentials outlive the process");
        assert_eq!(peer.start_time, None);
        assert_eq!(caller.start_time_at_connect, None);

        // A path entry needs the process: refused, whoever holds the PID by now.
        let exe = std::env::current_exe().unwrap();
        let yaml = format!(
            "workloads: [{{uid: {}, path: '{}', id: {WEB_ID}}}]",
            this_uid(),
            exe.display()
        );
        let attestor = UnixAttestor::parse(&yaml, "test", Procfs::host()).unwrap();
        let refused = attestor.attest(&caller);
        assert!(
            matches!(
                refused,
                Err(AttestError::NotRecordedAtConnect(_) | AttestError::ProcessGone(_))
            ),
            "{refused:?}"
        );
    }
}
