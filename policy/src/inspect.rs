//! `sigil inspect policy`: would this connection or request be allowed, and by which policy?
//!
//! Policies come from `--policy-file` or, without it, from the cluster (`authorizationpolicies`
//! and `peerauthentications.sigil.dev/v1alpha1` in the workload's namespace and the root
//! namespace, through `KUBECONFIG` or the in-cluster config). The first output line is the
//! answer, `ALLOW <namespace/name|default>` or `DENY <namespace/name|default>`; the lines after
//! it explain. A plaintext caller on a STRICT port is refused before authorization, so the
//! answer is then `DENY` by the PeerAuthentication that made the port STRICT (`default` when
//! it is sigil's default); on a DISABLE port the caller's identity is never seen, so the
//! request is evaluated as plaintext.
//!
//! `--path` goes through the proxy's path normalization ([`crate::path`], `--path-normalization`
//! as the proxy's flag, BASE by default) before matching, and the output says what it became;
//! a path the proxy answers 400 gets `DENY invalid-path`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::{ArgGroup, Args};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams};
use sigil_identity::SpiffeId;

use crate::cluster;
use crate::compiled::MtlsMode;
use crate::engine::{
    DEFAULT_DECIDER, DEFAULT_MTLS_MODE, EffectiveMtls, HttpRequest, MtlsLevel, Peer, PolicySet,
    Request, Workload,
};
use crate::envelope::{Kind, ROOT_NAMESPACE};
use crate::file::{self, FileError};
use crate::model;
use crate::path::{self, PathNormalization};
use crate::validate::{self, ValidationError};

/// The method of an HTTP request given without `--method`.
const DEFAULT_METHOD: &str = "GET";
/// The path of an HTTP request given without `--path`.
const DEFAULT_PATH: &str = "/";

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("workload").required(true).args(["pod", "labels"])))]
#[command(group(ArgGroup::new("caller").required(true).args(["from", "plaintext"])))]
pub struct InspectPolicyArgs {
    /// The called workload's namespace.
    #[arg(long, short = 'n')]
    pub namespace: String,
    /// The called pod; its labels are read from the cluster.
    #[arg(long)]
    pub pod: Option<String>,
    /// The called workload's labels instead of a pod: k=v,k2=v2 ("" for none).
    #[arg(long, value_name = "K=V,...", value_parser = parse_labels)]
    pub labels: Option<BTreeMap<String, String>>,
    /// The caller's SPIFFE ID, as its mTLS certificate carries it.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub from: Option<SpiffeId>,
    /// The caller connects in plaintext: no peer identity.
    #[arg(long)]
    pub plaintext: bool,
    /// The port called on the workload.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// HTTP method. Any of --method, --path, --host or --header makes this an HTTP request
    /// (method GET, path /, no Host unless given); without them it is a plain TCP connection.
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP request target: a path, with a query string (ignored by policies) if any. It is
    /// normalized as the proxy does (see --path-normalization) before matching.
    #[arg(long)]
    pub path: Option<String>,
    /// The path normalization of the proxy being asked about (its --path-normalization).
    #[arg(long, value_enum, default_value_t = PathNormalization::Base, ignore_case = true)]
    pub path_normalization: PathNormalization,
    /// HTTP Host header, with its port if the client sends one.
    #[arg(long)]
    pub host: Option<String>,
    /// HTTP request header, NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The caller's IP address, for ipBlocks and source.ip (the default, 0.0.0.0, stands for
    /// an unknown address).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub source_ip: IpAddr,
    /// Read the policies from this YAML file (as `kubectl apply -f` takes) instead of the
    /// cluster.
    #[arg(long, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("{pair:?}: expected KEY=VALUE")),
        })
        .collect()
}

/// A `--header NAME=VALUE` flag (`sigil inspect route` takes the same).
pub fn parse_header(s: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=VALUE"))?;
    let name = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not an HTTP header name"))?;
    let value = http::HeaderValue::from_str(value)
        .map_err(|_| format!("{value:?} is not a valid header value"))?;
    Ok((name, value))
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("connecting to the Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    #[error("listing {kind}s in namespace {namespace}: {source} (are sigil's CRDs installed?)")]
    List {
        kind: Kind,
        namespace: String,
        source: kube::Error,
    },
    #[error("reading pod {namespace}/{pod}: {source}")]
    Pod {
        namespace: String,
        pod: String,
        source: kube::Error,
    },
    #[error("{kind} {name} in the cluster: {message}")]
    Object {
        kind: Kind,
        name: String,
        message: String,
    },
    #[error("invalid policies in the cluster:\n{0}")]
    Invalid(#[source] ValidationError),
    #[error("writing the answer: {0}")]
    Output(#[from] std::io::Error),
}

/// Answers the question and writes the answer to `out`: Ok(true) for ALLOW, Ok(false) for DENY.
pub async fn run(args: &InspectPolicyArgs, out: &mut impl Write) -> Result<bool, InspectError> {
    let mut client = None;
    let set = match &args.policy_file {
        Some(path) => file::load_policy_set(path)?,
        None => cluster_policies(connect(&mut client).await?, &args.namespace).await?,
    };
    let labels = match (&args.labels, &args.pod) {
        (Some(labels), _) => labels.clone(),
        (None, Some(pod)) => pod_labels(connect(&mut client).await?, &args.namespace, pod).await?,
        // clap's "workload" group requires one of them.
        (None, None) => BTreeMap::new(),
    };
    let workload = Workload {
        namespace: &args.namespace,
        labels: &labels,
    };
    Ok(answer(&set, &workload, args, out)?)
}

async fn connect(slot: &mut Option<kube::Client>) -> Result<&kube::Client, InspectError> {
    let client = match slot.take() {
        Some(client) => client,
        None => kube::Client::try_default()
            .await
            .map_err(InspectError::Client)?,
    };
    Ok(slot.insert(client))
}

async fn pod_labels(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
) -> Result<BTreeMap<String, String>, InspectError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let found = pods.get(pod).await.map_err(|source| InspectError::Pod {
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        source,
    })?;
    Ok(found.metadata.labels.unwrap_or_default())
}

/// Lists both kinds in the workload's namespace and the root namespace (nothing else can apply).
async fn cluster_policies(
    client: &kube::Client,
    namespace: &str,
) -> Result<PolicySet, InspectError> {
    let mut namespaces = vec![namespace];
    if namespace != ROOT_NAMESPACE {
        namespaces.push(ROOT_NAMESPACE);
    }
    let mut objects = Vec::new();
    for kind in Kind::ALL {
        let resource = cluster::api_resource(kind);
        for ns in &namespaces {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
            let list =
                api.list(&ListParams::default())
                    .await
                    .map_err(|source| InspectError::List {
                        kind,
                        namespace: (*ns).to_owned(),
                        source,
                    })?;
            for item in list.items {
                objects.push(from_cluster(kind, item)?);
            }
        }
    }
    validate::policy_set(&objects).map_err(InspectError::Invalid)
}

/// Rebuilds the object from the fields policies use, so server-side metadata never matters.
fn from_cluster(kind: Kind, item: DynamicObject) -> Result<model::Object, InspectError> {
    let invalid = |message| InspectError::Object {
        kind,
        name: format!(
            "{}/{}",
            item.metadata.namespace.as_deref().unwrap_or_default(),
            item.metadata.name.as_deref().unwrap_or_default()
        ),
        message,
    };
    let envelope = cluster::envelope(kind, &item)
        .ok_or_else(|| invalid("the object has no namespace or name".to_owned()))?;
    model::Object::from_parts(&envelope, cluster::spec(&item)).map_err(invalid)
}

fn answer(
    set: &PolicySet,
    workload: &Workload<'_>,
    args: &InspectPolicyArgs,
    out: &mut impl Write,
) -> std::io::Result<bool> {
    let mtls = set.effective_mtls(workload, args.port, DEFAULT_MTLS_MODE);
    if args.from.is_none() && mtls.mode == MtlsMode::Strict {
        let decider = mtls
            .policy
            .map_or_else(|| DEFAULT_DECIDER.to_owned(), ToString::to_string);
        writeln!(out, "DENY {decider}")?;
        writeln!(
            out,
            "reason: plaintext is refused before authorization: mTLS is STRICT on port {}",
            args.port
        )?;
        write_mtls(out, &mtls, args.port)?;
        return Ok(false);
    }

    let peer = match (&args.from, mtls.mode) {
        (Some(id), MtlsMode::Strict | MtlsMode::Permissive) => Some(Peer::new(id)),
        (Some(_), MtlsMode::Disable) | (None, _) => None,
    };
    let headers: http::HeaderMap = args.headers.iter().cloned().collect();
    let is_http = args.method.is_some()
        || args.path.is_some()
        || args.host.is_some()
        || !args.headers.is_empty();
    let target = args.path.as_deref().unwrap_or(DEFAULT_PATH);
    let normalized = match path::normalize_target(target, args.path_normalization) {
        Ok(normalized) => normalized,
        Err(e) => {
            writeln!(out, "DENY invalid-path")?;
            writeln!(
                out,
                "reason: the proxy answers 400 Bad Request before authorization: {e} \
                 (path normalization {})",
                args.path_normalization
            )?;
            return Ok(false);
        }
    };
    let http = is_http.then(|| HttpRequest {
        method: args.method.as_deref().unwrap_or(DEFAULT_METHOD),
        path: normalized.split('?').next().unwrap_or_default(),
        host: args.host.as_deref().unwrap_or_default(),
        headers: &headers,
    });
    let request = Request {
        peer: peer.as_ref(),
        source_ip: args.source_ip,
        destination_port: args.port,
        http,
    };
    let decision = set.evaluate(workload, &request);

    writeln!(out, "{decision}")?;
    writeln!(out, "reason: {}", decision.reason)?;
    let applying: Vec<_> = set
        .authorization_policies()
        .filter(|p| p.applies_to(workload))
        .collect();
    if decision.policy().is_none() && !decision.is_allowed() {
        let allow: Vec<String> = applying
            .iter()
            .filter(|p| p.action() == crate::compiled::AuthzAction::Allow)
            .map(|p| p.name().to_string())
            .collect();
        writeln!(out, "allow policies that apply: {}", allow.join(", "))?;
    }
    if decision.audit.is_empty() {
        writeln!(out, "audit: none")?;
    } else {
        let audit: Vec<String> = decision.audit.iter().map(ToString::to_string).collect();
        writeln!(out, "audit: {}", audit.join(", "))?;
    }
    write_mtls(out, &mtls, args.port)?;
    if args.from.is_some() && mtls.mode == MtlsMode::Disable {
        writeln!(
            out,
            "note: the caller's identity is not seen on a DISABLE port; evaluated as plaintext"
        )?;
    }
    writeln!(
        out,
        "request: {} on port {}",
        if is_http { "HTTP" } else { "non-HTTP (TCP)" },
        args.port
    )?;
    if let Some(path) = &args.path {
        writeln!(
            out,
            "path: {path} normalized ({}) to {normalized}, as the proxy matches and forwards it",
            args.path_normalization
        )?;
    }
    for policy in &applying {
        for warning in policy.warnings() {
            writeln!(out, "warning: {}: {warning}", policy.name())?;
        }
    }
    Ok(decision.is_allowed())
}

fn write_mtls(out: &mut impl Write, mtls: &EffectiveMtls<'_>, port: u16) -> std::io::Result<()> {
    let source = match (mtls.level, mtls.policy) {
        (MtlsLevel::Default, _) | (_, None) => {
            "sigil's default: no PeerAuthentication sets a mode".to_owned()
        }
        (level, Some(policy)) => format!("{level} PeerAuthentication {policy}"),
    };
    let plaintext = match mtls.mode {
        MtlsMode::Strict => "plaintext is refused",
        MtlsMode::Permissive => "mTLS and plaintext are accepted",
        MtlsMode::Disable => "plaintext only, callers have no identity",
    };
    writeln!(
        out,
        "mtls: {} on port {port} ({source}); {plaintext}",
        mtls.mode
    )
}
