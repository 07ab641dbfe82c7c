//! `sigil.agent.v1.AgentAdmin` on the agent socket: what identities the agent holds and when each
//! renews, for `sigil inspect agent`. Only root on the node may ask (by the connection's peer
//! credentials): the list says which workloads run here.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::peer::PeerAtAccept;
use sigil_proto::sigil::agent::v1::agent_admin_client::AgentAdminClient;
use sigil_proto::sigil::agent::v1::agent_admin_server::{AgentAdmin, AgentAdminServer};
use sigil_proto::sigil::agent::v1::{
    IdentityStatus, ListIdentitiesRequest, ListIdentitiesResponse,
};
use tonic::{Request, Response, Status};

use crate::peer::Workloads;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("connecting to the agent socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the agent refused: {0}")]
    Refused(#[from] Status),
}

pub struct Admin {
    workloads: Workloads,
}

impl Admin {
    pub fn new(workloads: Workloads) -> Self {
        Admin { workloads }
    }

    pub fn into_service(self) -> AgentAdminServer<Admin> {
        AgentAdminServer::new(self)
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl AgentAdmin for Admin {
    async fn list_identities(
        &self,
        request: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        let uid = request
            .extensions()
            .get::<PeerAtAccept>()
            .and_then(|info| info.cred)
            .map(|cred| cred.uid());
        if uid != Some(0) {
            return Err(Status::permission_denied(
                "only root on this node may list the agent's identities",
            ));
        }
        let identities = self
            .workloads
            .certs
            .list()
            .await
            .map_err(|_| Status::unavailable("the agent is shutting down"))?
            .into_iter()
            .map(|status| IdentityStatus {
                spiffe_id: status.id.to_string(),
                serial: status
                    .svid
                    .as_ref()
                    .map(|s| s.serial_hex.clone())
                    .unwrap_or_default(),
                not_after_unix: status
                    .svid
                    .as_ref()
                    .map_or(0, |s| unix_seconds(s.not_after)),
                renew_at_unix: status.svid.as_ref().map_or(0, |s| unix_seconds(s.renew_at)),
                subscribers: status.subscribers as u32,
                prefetched: status.prefetched,
            })
            .collect();
        let bundle_roots = self.workloads.bundle.borrow().roots.len() as u32;
        Ok(Response::new(ListIdentitiesResponse {
            identities,
            bundle_roots,
        }))
    }
}

/// Asks the agent at `socket` for its identities.
pub async fn list_identities(socket: &Path) -> Result<ListIdentitiesResponse, InspectError> {
    let channel = sigil_base::socket_client::connect(socket)
        .await
        .map_err(|source| InspectError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    Ok(AgentAdminClient::new(channel)
        .list_identities(ListIdentitiesRequest {})
        .await?
        .into_inner())
}

/// `sigil inspect agent`: one line per identity.
pub fn print_identities(list: &ListIdentitiesResponse, now: SystemTime, out: &mut impl Write) {
    let now = unix_seconds(now);
    let _ = writeln!(
        out,
        "{} identities, trust bundle with {} root(s)",
        list.identities.len(),
        list.bundle_roots
    );
    let _ = writeln!(
        out,
        "{:<56} {:<34} {:>12} {:>12} {:>5} PREFETCHED",
        "IDENTITY", "SERIAL", "EXPIRES IN", "RENEWS IN", "SUBS"
    );
    let relative = |t: i64| {
        if t == 0 {
            "-".to_string()
        } else {
            format!("{}s", t - now)
        }
    };
    for identity in &list.identities {
        let _ = writeln!(
            out,
            "{:<56} {:<34} {:>12} {:>12} {:>5} {}",
            identity.spiffe_id,
            if identity.serial.is_empty() {
                "(pending)"
            } else {
                &identity.serial
            },
            relative(identity.not_after_unix),
            relative(identity.renew_at_unix),
            identity.subscribers,
            if identity.prefetched { "yes" } else { "no" },
        );
    }
}
