//! Which identity an authenticated caller may get: its own, or, for a trusted node agent, the
//! identity of a pod on its own node (Kubernetes) or one its static entry grants (no Kubernetes).
//! A compromised node can therefore obtain only the identities of pods scheduled on it.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;
use sigil_identity::{SpiffeId, TrustDomain};
use tokio::sync::watch;

use crate::authn::{Caller, Credential, TokenIdentity};
use crate::pods::{self, PodIndex};

/// Service accounts allowed to impersonate by default.
pub const DEFAULT_TRUSTED_AGENTS: &[&str] = &["sigil-system/sigil-agent"];

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum AuthzError {
    #[error("requested identity {0:?} is not a valid SPIFFE ID: {1}")]
    BadRequestedId(String, #[source] sigil_identity::spiffe::SpiffeIdError),
    #[error("requested identity {0} is outside trust domain {1}")]
    ForeignTrustDomain(SpiffeId, TrustDomain),
    #[error("{caller} may not impersonate: not a trusted node agent")]
    NotAnAgent { caller: SpiffeId },
    #[error("agent {caller} token is not bound to a pod, so its node is unknown")]
    AgentTokenNotPodBound { caller: SpiffeId },
    #[error("agent pod {pod} is not in the pod index (deleted, or index not synced)")]
    AgentPodUnknown { pod: String },
    #[error("agent pod {pod} has UID {actual}, token says {claimed}")]
    AgentPodUidMismatch {
        pod: String,
        claimed: String,
        actual: String,
    },
    #[error("agent pod {pod} is on node {index_node:?} but its token says {token_node:?}")]
    AgentNodeMismatch {
        pod: String,
        index_node: Option<String>,
        token_node: Option<String>,
    },
    #[error("{requested} is not a Kubernetes service-account identity (/ns/<ns>/sa/<sa>)")]
    NotServiceAccountId { requested: SpiffeId },
    #[error(
        "no live pod with service account {namespace}/{service_account} on node {node} (agent {caller})"
    )]
    NoPodOnNode {
        caller: SpiffeId,
        node: String,
        namespace: String,
        service_account: String,
    },
    #[error("no pod index: impersonation by token needs the Kubernetes API")]
    NoPodIndex,
    #[error(
        "renewal of {id} by certificate refused: this CA accepts tokens, so callers present their token"
    )]
    RenewalByCertificate { id: SpiffeId },
    #[error("static entry for {caller} does not grant {requested}")]
    NotGranted {
        caller: SpiffeId,
        requested: SpiffeId,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StaticEntriesError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("{path}: {id:?} is not a valid SPIFFE ID: {reason}")]
    BadId {
        path: String,
        id: String,
        reason: String,
    },
    #[error(
        "{path}: {id} is a trust-domain ID (no path); workload certificates are for IDs with a path"
    )]
    TrustDomainId { path: String, id: SpiffeId },
}

/// `--static-entries` file: which agents (by certificate identity) may issue which identities.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticEntriesFile {
    agents: Vec<StaticAgent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticAgent {
    id: String,
    may_issue: Vec<String>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct StaticEntries(HashMap<SpiffeId, HashSet<SpiffeId>>);

impl StaticEntries {
    pub fn load(path: &Path) -> Result<Self, StaticEntriesError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| StaticEntriesError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, StaticEntriesError> {
        let file: StaticEntriesFile =
            serde_yaml::from_str(text).map_err(|source| StaticEntriesError::Parse {
                path: origin.to_string(),
                source,
            })?;
        let parse = |id: &str| {
            let parsed = SpiffeId::parse(id).map_err(|e| StaticEntriesError::BadId {
                path: origin.to_string(),
                id: id.to_string(),
                reason: e.to_string(),
            })?;
            if parsed.is_trust_domain_id() {
                return Err(StaticEntriesError::TrustDomainId {
                    path: origin.to_string(),
                    id: parsed,
                });
            }
            Ok(parsed)
        };
        let mut entries = HashMap::new();
        for agent in file.agents {
            let grants = agent
                .may_issue
                .iter()
                .map(|id| parse(id))
                .collect::<Result<HashSet<_>, _>>()?;
            entries
                .entry(parse(&agent.id)?)
                .or_insert_with(HashSet::new)
                .extend(grants);
        }
        Ok(StaticEntries(entries))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub struct Authorizer {
    trust_domain: TrustDomain,
    /// (namespace, service account) pairs of node agents.
    trusted_agents: HashSet<(String, String)>,
    static_entries: StaticEntries,
    pods: Option<watch::Receiver<PodIndex>>,
    /// `--auth tokenreview|jwks`: then a certificate does not renew itself.
    tokens_accepted: bool,
}

impl Authorizer {
    pub fn new(
        trust_domain: TrustDomain,
        trusted_agents: HashSet<(String, String)>,
        static_entries: StaticEntries,
        pods: Option<watch::Receiver<PodIndex>>,
        tokens_accepted: bool,
    ) -> Self {
        Authorizer {
            trust_domain,
            trusted_agents,
            static_entries,
            pods,
            tokens_accepted,
        }
    }

    /// The identity to issue: the caller's own when `impersonate` is empty, else the requested
    /// one if the caller is allowed to obtain it. Checks against pods the index may not know
    /// yet wait up to `pods::INDEX_GRACE` for it to catch up.
    pub async fn authorize(
        &self,
        caller: &Caller,
        impersonate: &str,
    ) -> Result<SpiffeId, AuthzError> {
        if impersonate.is_empty() || impersonate == caller.id.to_string() {
            return self.own_identity(caller);
        }
        let requested = SpiffeId::parse(impersonate)
            .map_err(|e| AuthzError::BadRequestedId(impersonate.to_string(), e))?;
        if requested.trust_domain() != &self.trust_domain {
            return Err(AuthzError::ForeignTrustDomain(
                requested,
                self.trust_domain.clone(),
            ));
        }
        match &caller.credential {
            Credential::ClientCert => {
                let grants =
                    self.static_entries
                        .0
                        .get(&caller.id)
                        .ok_or(AuthzError::NotAnAgent {
                            caller: caller.id.clone(),
                        })?;
                if grants.contains(&requested) {
                    Ok(requested)
                } else {
                    Err(AuthzError::NotGranted {
                        caller: caller.id.clone(),
                        requested,
                    })
                }
            }
            Credential::Token(token) => {
                if !self
                    .trusted_agents
                    .contains(&(token.namespace.clone(), token.service_account.clone()))
                {
                    return Err(AuthzError::NotAnAgent {
                        caller: caller.id.clone(),
                    });
                }
                let pods = self.pods.as_ref().ok_or(AuthzError::NoPodIndex)?;
                pods::wait_for(pods, pods::INDEX_GRACE, |index| {
                    node_grant(index, caller, token, &requested)
                })
                .await
            }
        }
    }

    /// A caller's own identity. Where tokens are accepted, every workload and agent has one, and
    /// a token names its pod and node, which a certificate does not: a certificate (perhaps
    /// stolen with its key) must not renew itself there, or it would live forever wherever a pod
    /// of that service account runs. Hosts without Kubernetes (`--auth certs`) renew by
    /// certificate; their renewals are capped at the default lifetime (`service.rs`).
    fn own_identity(&self, caller: &Caller) -> Result<SpiffeId, AuthzError> {
        if caller.credential == Credential::ClientCert && self.tokens_accepted {
            return Err(AuthzError::RenewalByCertificate {
                id: caller.id.clone(),
            });
        }
        Ok(caller.id.clone())
    }
}

/// Node-agent impersonation by token: the agent's pod (from its pod-bound token) must be in the
/// index with that UID, its node is the index's, and a live pod with the requested service
/// account must be on that node.
fn node_grant(
    index: &PodIndex,
    caller: &Caller,
    token: &TokenIdentity,
    requested: &SpiffeId,
) -> Result<SpiffeId, AuthzError> {
    let Some((pod_name, pod_uid)) = &token.pod else {
        return Err(AuthzError::AgentTokenNotPodBound {
            caller: caller.id.clone(),
        });
    };
    let (namespace, service_account) =
        requested
            .service_account()
            .ok_or_else(|| AuthzError::NotServiceAccountId {
                requested: requested.clone(),
            })?;
    let pod = format!("{}/{pod_name}", token.namespace);
    let agent_pod = index
        .get(&token.namespace, pod_name)
        .ok_or_else(|| AuthzError::AgentPodUnknown { pod: pod.clone() })?;
    if &agent_pod.uid != pod_uid {
        return Err(AuthzError::AgentPodUidMismatch {
            pod,
            claimed: pod_uid.clone(),
            actual: agent_pod.uid.clone(),
        });
    }
    let node = match (&agent_pod.node, &token.node) {
        (Some(index_node), None) => index_node,
        (Some(index_node), Some(token_node)) if index_node == token_node => index_node,
        (index_node, token_node) => {
            return Err(AuthzError::AgentNodeMismatch {
                pod,
                index_node: index_node.clone(),
                token_node: token_node.clone(),
            });
        }
    };
    if index.has_live_pod(node, namespace, service_account) {
        Ok(requested.clone())
    } else {
        Err(AuthzError::NoPodOnNode {
            caller: caller.id.clone(),
            node: node.clone(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }
}

/// Parses `namespace/service-account` pairs (the `--trusted-agent` flag).
pub fn parse_service_account(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.to_string(), sa.to_string()))
        }
        _ => Err(format!("{s:?} is not <namespace>/<service-account>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::TokenIdentity;
    use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(sa.into()),
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    fn agent_caller(node: Option<&str>) -> Caller {
        Caller {
            id: SpiffeId::parse("spiffe://cluster.local/ns/sigil-system/sa/sigil-agent").unwrap(),
            credential: Credential::Token(TokenIdentity {
                namespace: "sigil-system".into(),
                service_account: "sigil-agent".into(),
                pod: Some(("agent-a".into(), "uid-agent-a".into())),
                node: node.map(str::to_string),
                expires_at: None,
            }),
        }
    }

    fn authorizer() -> Authorizer {
        let mut index = PodIndex::default();
        index.apply(&pod(
            "sigil-system",
            "agent-a",
            "uid-agent-a",
            "sigil-agent",
            "node-a",
            "Running",
        ));
        index.apply(&pod("demo", "web-1", "u1", "web", "node-a", "Running"));
        index.apply(&pod("demo", "db-1", "u2", "db", "node-b", "Running"));
        index.apply(&pod("demo", "job-1", "u3", "job", "node-a", "Succeeded"));
        index.synced = true;
        let (_, rx) = watch::channel(index);
        let entries = StaticEntries::parse(
            "agents:\n- id: spiffe://cluster.local/ns/sigil-system/sa/sigil-agent\n  may_issue: [spiffe://cluster.local/ns/demo/sa/web]\n",
            "test",
        )
        .unwrap();
        Authorizer::new(
            td(),
            [("sigil-system".to_string(), "sigil-agent".to_string())].into(),
            entries,
            Some(rx),
            true,
        )
    }

    #[tokio::test]
    async fn own_identity_is_always_granted() {
        let a = authorizer();
        let caller = agent_caller(None);
        assert_eq!(a.authorize(&caller, "").await.unwrap(), caller.id);
    }

    #[tokio::test]
    async fn agent_gets_identities_of_pods_on_its_node_only() {
        let a = authorizer();
        let caller = agent_caller(Some("node-a"));
        assert_eq!(
            a.authorize(&caller, "spiffe://cluster.local/ns/demo/sa/web")
                .await
                .unwrap()
                .to_string(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        assert!(matches!(
            a.authorize(&caller, "spiffe://cluster.local/ns/demo/sa/db")
                .await,
            Err(AuthzError::NoPodOnNode { .. })
        ));
        assert!(
            matches!(
                a.authorize(&caller, "spiffe://cluster.local/ns/demo/sa/job")
                    .await,
                Err(AuthzError::NoPodOnNode { .. })
            ),
            "a Succeeded pod holds no identity"
        );
        assert!(matches!(
            a.authorize(&caller, "spiffe://other.org/ns/demo/sa/web")
                .await,
            Err(AuthzError::ForeignTrustDomain(..))
        ));
        assert!(matches!(
            a.authorize(&caller, "spiffe://cluster.local/custom/path")
                .await,
            Err(AuthzError::NotServiceAccountId { .. })
        ));
        assert!(matches!(
            a.authorize(&caller, "not-an-id").await,
            Err(AuthzError::BadRequestedId(..))
        ));
    }

    #[tokio::test]
    async fn agent_token_checks() {
        let a = authorizer();
        let web = "spiffe://cluster.local/ns/demo/sa/web";
        let lying = agent_caller(Some("node-b"));
        assert!(matches!(
            a.authorize(&lying, web).await,
            Err(AuthzError::AgentNodeMismatch { .. })
        ));

        let mut stale = agent_caller(None);
        if let Credential::Token(t) = &mut stale.credential {
            t.pod = Some(("agent-a".into(), "old-uid".into()));
        }
        assert!(matches!(
            a.authorize(&stale, web).await,
            Err(AuthzError::AgentPodUidMismatch { .. })
        ));

        let mut unbound = agent_caller(None);
        if let Credential::Token(t) = &mut unbound.credential {
            t.pod = None;
        }
        assert!(matches!(
            a.authorize(&unbound, web).await,
            Err(AuthzError::AgentTokenNotPodBound { .. })
        ));

        let mut gone = agent_caller(None);
        if let Credential::Token(t) = &mut gone.credential {
            t.pod = Some(("agent-z".into(), "uid".into()));
        }
        assert!(matches!(
            a.authorize(&gone, web).await,
            Err(AuthzError::AgentPodUnknown { .. })
        ));
    }

    #[tokio::test]
    async fn non_agent_service_account_cannot_impersonate() {
        let a = authorizer();
        let caller = Caller {
            id: SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap(),
            credential: Credential::Token(TokenIdentity {
                namespace: "demo".into(),
                service_account: "web".into(),
                pod: Some(("web-1".into(), "u1".into())),
                node: None,
                expires_at: None,
            }),
        };
        assert!(matches!(
            a.authorize(&caller, "spiffe://cluster.local/ns/demo/sa/db")
                .await,
            Err(AuthzError::NotAnAgent { .. })
        ));
    }

    #[tokio::test]
    async fn renewal_by_certificate_is_refused_where_tokens_are_accepted() {
        let a = authorizer();
        let web = Caller {
            id: SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap(),
            credential: Credential::ClientCert,
        };
        assert!(
            matches!(
                a.authorize(&web, "").await,
                Err(AuthzError::RenewalByCertificate { .. })
            ),
            "web has a live pod, but a certificate alone names no pod or node"
        );
        assert!(matches!(
            a.authorize(&web, "spiffe://cluster.local/ns/demo/sa/web")
                .await,
            Err(AuthzError::RenewalByCertificate { .. })
        ));
        let certs_only =
            Authorizer::new(td(), HashSet::new(), StaticEntries::default(), None, false);
        assert_eq!(certs_only.authorize(&web, "").await.unwrap(), web.id);
    }

    #[tokio::test]
    async fn static_entries_grant_exactly_what_they_list() {
        let a = authorizer();
        let agent = Caller {
            id: SpiffeId::parse("spiffe://cluster.local/ns/sigil-system/sa/sigil-agent").unwrap(),
            credential: Credential::ClientCert,
        };
        assert!(
            a.authorize(&agent, "spiffe://cluster.local/ns/demo/sa/web")
                .await
                .is_ok()
        );
        assert!(matches!(
            a.authorize(&agent, "spiffe://cluster.local/ns/demo/sa/db")
                .await,
            Err(AuthzError::NotGranted { .. })
        ));
        let other = Caller {
            id: SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap(),
            credential: Credential::ClientCert,
        };
        assert!(matches!(
            a.authorize(&other, "spiffe://cluster.local/ns/demo/sa/db")
                .await,
            Err(AuthzError::NotAnAgent { .. })
        ));
    }

    #[test]
    fn static_entries_file_errors() {
        assert!(matches!(
            StaticEntries::parse("agents: [{id: x, may_issue: []}]", "f"),
            Err(StaticEntriesError::BadId { .. })
        ));
        assert!(matches!(
            StaticEntries::parse(
                "agents: [{id: spiffe://cluster.local/ns/a/sa/b, may_issue: [spiffe://cluster.local]}]",
                "f"
            ),
            Err(StaticEntriesError::TrustDomainId { .. })
        ));
        assert!(matches!(
            StaticEntries::parse("agent: []", "f"),
            Err(StaticEntriesError::Parse { .. })
        ));
        assert!(matches!(
            StaticEntries::load(Path::new("/nonexistent/entries.yaml")),
            Err(StaticEntriesError::Read { .. })
        ));
        assert_eq!(
            parse_service_account("a/b").unwrap(),
            ("a".into(), "b".into())
        );
        assert!(parse_service_account("ab").is_err());
    }
}
