//! The buckets with paused time (refill, burst, identities, overrides, eviction, updates), and
//! the inbound path in process on real sockets: a denied request takes no token, refusals are
//! answered as documented, and a client offering three times the rate gets the rate.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use clap::Parser;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use sigil_proxy_api::services::{Endpoint, MeshService, Protocol, ServicePort};
use sigil_route::compiled::{GrpcMatch, HttpMatch, PathMatch, ServiceRef, ValueMatch};
use sigil_route::{InboundPolicy, RouteSet};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::config::ProxyConfig;
use crate::forward::Shared;

/// Where the workload serves demo/api:80 (its pod IP and target port).
const POD: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 47, 10)), 8080);
const POLICY: &str = "demo/api-limit";

fn spiffe(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
        .parse()
        .unwrap()
}

fn per_second(requests: u32, burst: u32) -> Limit {
    Limit {
        requests,
        period: Duration::from_secs(1),
        burst,
    }
}

fn port_key() -> PortKey {
    PortKey {
        service: ServiceRef {
            namespace: "demo".into(),
            name: "api".into(),
        },
        port: 80,
    }
}

fn limit(total: Option<Limit>, per_identity: Option<Limit>) -> LocalRateLimit {
    LocalRateLimit {
        source: POLICY.into(),
        http_matches: Vec::new(),
        grpc_matches: Vec::new(),
        total,
        per_identity,
        overrides: Vec::new(),
    }
}

fn route_table(limits: Vec<LocalRateLimit>) -> Arc<RouteTable> {
    let mut routes = RouteSet::default();
    routes.inbound.insert(
        port_key(),
        Arc::new(InboundPolicy {
            key: port_key(),
            limits,
        }),
    );
    Arc::new(RouteTable { version: 1, routes })
}

/// demo/api, port 80 (`http`) served at `pod`.
fn service_table(pod: SocketAddr) -> Arc<ServiceTable> {
    Arc::new(ServiceTable::new(
        1,
        [MeshService {
            key: ServiceKey::new("demo", "api"),
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(198, 18, 47, 1))],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http1,
                app_protocol: None,
            }],
            endpoints: vec![Endpoint {
                ip: pod.ip(),
                ports: BTreeMap::from([("http".to_owned(), pod.port())]),
                id: spiffe("api"),
                ready: true,
                serving: true,
                terminating: false,
                node: None,
                zone: None,
                source: "demo/api-0".into(),
            }],
        }],
    ))
}

/// A proxy's limits fed by channels the test holds.
struct Fixture {
    limits: RateLimits,
    routes: watch::Sender<Option<Arc<RouteTable>>>,
    _services: watch::Sender<Option<Arc<ServiceTable>>>,
    registry: Registry,
}

impl Fixture {
    fn new(limits: Vec<LocalRateLimit>) -> Fixture {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let (routes, routes_rx) = watch::channel(Some(route_table(limits)));
        let (services, services_rx) = watch::channel(Some(service_table(POD)));
        Fixture {
            limits: RateLimits::new(routes_rx, services_rx, metrics),
            routes,
            _services: services,
            registry,
        }
    }

    /// A GET of `path` from `client` to `local`: `Ok` if admitted, else the refusal.
    fn get_at(
        &self,
        local: SocketAddr,
        client: Option<&SpiffeId>,
        path: &str,
    ) -> Result<(), Refusal> {
        let headers = HeaderMap::new();
        let head = RequestHead {
            method: &Method::GET,
            path,
            query: None,
            headers: &headers,
        };
        match self.limits.check(local, client, &head) {
            None => Ok(()),
            Some(refusal) => Err(refusal),
        }
    }

    fn get(&self, client: Option<&SpiffeId>) -> Result<(), Refusal> {
        self.get_at(POD, client, "/")
    }

    /// How many of `n` GETs from `client` are admitted, at this instant.
    fn admitted(&self, client: Option<&SpiffeId>, n: usize) -> usize {
        (0..n).filter(|_| self.get(client).is_ok()).count()
    }

    fn scope(&self, client: Option<&SpiffeId>) -> Scope {
        self.get(client).expect_err("refused").scope
    }

    /// The buckets of the `nth` limit (its order in the policy).
    fn buckets(&self, nth: usize) -> Arc<Buckets> {
        let active = self.limits.active().expect("limits in force");
        active.by_local[&POD][nth].buckets.clone()
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

#[tokio::test(start_paused = true)]
async fn a_bucket_holds_its_burst_and_refills_at_the_rate() {
    let f = Fixture::new(vec![limit(Some(per_second(10, 5)), None)]);
    // Full at first: the burst, then nothing.
    assert_eq!(f.admitted(None, 20), 5);
    let refusal = f.get(None).unwrap_err();
    assert_eq!(refusal.scope, Scope::Total);
    assert_eq!(refusal.retry_after, Duration::from_millis(100));
    assert_eq!(refusal.retry_after_secs(), 1);
    // One token per 100 ms, exactly: none at 99 ms, one at 100 ms.
    tokio::time::advance(Duration::from_millis(99)).await;
    assert_eq!(refusal_wait(&f), Duration::from_millis(1));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(f.admitted(None, 20), 1);
    // Fractions of a token add up across refills: half a token every 50 ms.
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(50)).await;
        f.get(None).ok();
    }
    assert_eq!(f.admitted(None, 20), 0);
    tokio::time::advance(Duration::from_millis(50)).await;
    assert_eq!(f.admitted(None, 20), 1);
    // A long pause fills the bucket to its burst, no further.
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(f.admitted(None, 20), 5);
}

fn refusal_wait(f: &Fixture) -> Duration {
    f.get(None).unwrap_err().retry_after
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
    let refusal = |retry_after| Refusal {
        service: "demo/api".into(),
        policy: POLICY.into(),
        scope: Scope::Total,
        retry_after,
        grpc: false,
    };
    for (wait, secs) in [
        (Duration::ZERO, 1),
        (Duration::from_nanos(1), 1),
        (Duration::from_secs(1), 1),
        (Duration::from_millis(1001), 2),
        (Duration::from_secs(30), 30),
        (Duration::from_millis(29_999), 30),
    ] {
        assert_eq!(refusal(wait).retry_after_secs(), secs, "{wait:?}");
    }
    // One request per 2.5 s: refused right after, a token in 2.5 s, so 3.
    let f = Fixture::new(vec![limit(
        Some(Limit {
            requests: 1,
            period: Duration::from_millis(2500),
            burst: 1,
        }),
        None,
    )]);
    f.get(None).unwrap();
    let refused = f.get(None).unwrap_err();
    assert_eq!(refused.retry_after, Duration::from_millis(2500));
    let response = refused.response();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "3");
    assert_eq!(
        response.headers()["sigil-proxy-error"],
        "rate limited by demo/api-limit"
    );
    // The wait is to when every bucket the request needs has a token: the emptiest one.
    let f = Fixture::new(vec![limit(
        Some(per_second(1, 1)),
        Some(Limit {
            requests: 1,
            period: Duration::from_secs(4),
            burst: 1,
        }),
    )]);
    let web = spiffe("web");
    f.get(Some(&web)).unwrap();
    let refused = f.get(Some(&web)).unwrap_err();
    assert_eq!(refused.scope, Scope::Total);
    assert_eq!(refused.retry_after_secs(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_grpc_refusal_is_trailers_only_resource_exhausted() {
    let refusal = Refusal {
        service: "demo/api".into(),
        policy: POLICY.into(),
        scope: Scope::Identity,
        retry_after: Duration::from_millis(300),
        grpc: true,
    };
    let response = refusal.response();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(headers["grpc-status"], "8");
    assert_eq!(headers["grpc-message"], "rate limited by demo/api-limit");
    assert_eq!(headers["retry-after"], "1");
    let body = response.into_body().collect().await.unwrap();
    assert!(body.to_bytes().is_empty(), "trailers-only: no message");
}

#[tokio::test(start_paused = true)]
async fn each_identity_has_its_own_bucket_and_plaintext_clients_share_one() {
    let f = Fixture::new(vec![limit(None, Some(per_second(2, 2)))]);
    let (web, batch) = (spiffe("web"), spiffe("batch"));
    assert_eq!(f.admitted(Some(&web), 5), 2);
    assert_eq!(f.scope(Some(&web)), Scope::Identity);
    assert_eq!(f.admitted(Some(&batch), 5), 2);
    // Plaintext (PERMISSIVE) clients: one "unauthenticated" bucket for all of them.
    assert_eq!(f.admitted(None, 5), 2);
    assert_eq!(f.scope(None), Scope::Identity);
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(f.admitted(Some(&web), 5), 1);
    assert_eq!(f.admitted(None, 5), 1);
    assert!(
        f.metrics_text().contains(
            "sigil_proxy_rate_limited_total{service=\"demo/api\",policy=\"demo/api-limit\",\
             scope=\"identity\"} 19"
        ),
        "{}",
        f.metrics_text()
    );
}

#[tokio::test(start_paused = true)]
async fn an_override_replaces_the_identity_limit_for_its_clients() {
    let (reporter, auditor, web) = (spiffe("reporter"), spiffe("auditor"), spiffe("web"));
    let mut with_override = limit(Some(per_second(100, 100)), Some(per_second(2, 2)));
    with_override.overrides = vec![IdentityOverride {
        clients: BTreeSet::from([reporter.clone(), auditor.clone()]),
        limit: per_second(5, 5),
    }];
    let f = Fixture::new(vec![with_override]);
    assert_eq!(f.admitted(Some(&web), 10), 2);
    assert_eq!(f.scope(Some(&web)), Scope::Identity);
    // The override's clients share its one bucket (as Linkerd's overrides do).
    assert_eq!(f.admitted(Some(&reporter), 3), 3);
    assert_eq!(f.admitted(Some(&auditor), 10), 2);
    assert_eq!(f.scope(Some(&reporter)), Scope::Override);
    // Plaintext clients are never in an override.
    assert_eq!(f.admitted(None, 10), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_takes_from_every_bucket_or_from_none() {
    // The total (3) and each identity (2).
    let f = Fixture::new(vec![limit(Some(per_second(3, 3)), Some(per_second(2, 2)))]);
    let (web, batch) = (spiffe("web"), spiffe("batch"));
    assert_eq!(f.admitted(Some(&web), 2), 2);
    // Refused by web's own bucket: the total keeps its last token.
    for _ in 0..5 {
        assert_eq!(f.scope(Some(&web)), Scope::Identity);
    }
    assert_eq!(f.admitted(Some(&batch), 5), 1);
    assert_eq!(f.scope(Some(&batch)), Scope::Total);
    // Refused by the total: batch's own bucket keeps its second token.
    tokio::time::advance(Duration::from_millis(334)).await;
    assert_eq!(f.admitted(Some(&batch), 1), 1);

    // Two policies on the port: a request refused by the second gives the first its token
    // back.
    let mut second = limit(Some(per_second(1, 1)), None);
    second.source = "demo/strict".into();
    let f = Fixture::new(vec![limit(Some(per_second(1, 2)), None), second]);
    f.get(None).unwrap();
    let refused = f.get(None).unwrap_err();
    assert_eq!(refused.policy, "demo/strict");
    assert_eq!(total_tokens(&f.buckets(0)), 1);
    assert_eq!(total_tokens(&f.buckets(1)), 0);
}

/// Whole tokens in a limit's total bucket.
fn total_tokens(buckets: &Buckets) -> u128 {
    let rate = Rate::of(&buckets.config.total.unwrap());
    lock(&buckets.state).total.unwrap().level / rate.period_ns
}

#[tokio::test(start_paused = true)]
async fn only_connections_to_the_services_endpoints_are_limited() {
    let f = Fixture::new(vec![limit(Some(per_second(1, 1)), None)]);
    f.get(None).unwrap();
    assert!(f.get(None).is_err());
    // Another port of the pod, and another address: not demo/api:80's endpoint.
    let other_port = SocketAddr::new(POD.ip(), 9090);
    let other_ip = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 47, 11)), 8080);
    for local in [other_port, other_ip] {
        for _ in 0..5 {
            assert!(f.get_at(local, None, "/").is_ok(), "{local}");
        }
    }
    // No limits at all: nothing is looked up.
    f.routes.send_replace(Some(Arc::new(RouteTable::default())));
    assert!(f.limits.active().is_none());
    assert!(f.get(None).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_limit_with_matches_applies_only_to_the_requests_matching_them() {
    let mut writes = limit(Some(per_second(1, 1)), None);
    writes.http_matches = vec![HttpMatch {
        path: Some(PathMatch::Prefix("/write".into())),
        ..HttpMatch::default()
    }];
    writes.grpc_matches = vec![GrpcMatch {
        service: Some(ValueMatch::Exact("demo.Api".into())),
        method: Some(ValueMatch::Exact("Write".into())),
        headers: Vec::new(),
    }];
    let f = Fixture::new(vec![writes]);
    f.get_at(POD, None, "/write/a").unwrap();
    assert!(f.get_at(POD, None, "/write/b").is_err());
    for _ in 0..5 {
        f.get_at(POD, None, "/read").unwrap();
    }
    // gRPC: by its GRPCRoute match, answered the gRPC way.
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/grpc".parse().unwrap());
    let grpc = |path| RequestHead {
        method: &Method::POST,
        path,
        query: None,
        headers: &headers,
    };
    let refused = f
        .limits
        .check(POD, None, &grpc("/demo.Api/Write"))
        .expect("limited");
    assert!(refused.grpc);
    assert!(f.limits.check(POD, None, &grpc("/demo.Api/Read")).is_none());
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_limit_keeps_its_state_across_updates_and_a_changed_one_starts_full() {
    let f = Fixture::new(vec![limit(Some(per_second(1, 1)), None)]);
    f.get(None).unwrap();
    assert!(f.get(None).is_err());
    // A new table (another version, new `Arc`s) with the same limit: still empty.
    let mut same = (*route_table(vec![limit(Some(per_second(1, 1)), None)])).clone();
    same.version = 2;
    f.routes.send_replace(Some(Arc::new(same)));
    assert!(f.get(None).is_err());
    // The limit changed: full again, with the new burst.
    f.routes
        .send_replace(Some(route_table(vec![limit(Some(per_second(1, 3)), None)])));
    assert_eq!(f.admitted(None, 10), 3);
    // Removed, then back unchanged: a limit that was not in force starts full.
    f.routes.send_replace(Some(Arc::new(RouteTable::default())));
    assert!(f.get(None).is_ok());
    f.routes
        .send_replace(Some(route_table(vec![limit(Some(per_second(1, 3)), None)])));
    assert_eq!(f.admitted(None, 10), 3);
}

#[tokio::test(start_paused = true)]
async fn idle_identity_buckets_are_dropped_and_their_number_is_capped() {
    let f = Fixture::new(vec![limit(None, Some(per_second(1, 1)))]);
    let ids: Vec<SpiffeId> = (0..=MAX_IDENTITY_BUCKETS)
        .map(|i| spiffe(&format!("rotating-{i}")))
        .collect();
    for id in &ids[..MAX_IDENTITY_BUCKETS] {
        f.get(Some(id)).unwrap();
    }
    let buckets = f.buckets(0);
    assert_eq!(buckets.identities_held(), MAX_IDENTITY_BUCKETS);
    // Beyond the cap: new identities share one overflow bucket, the map does not grow.
    let (late, later) = (&ids[MAX_IDENTITY_BUCKETS], spiffe("later"));
    f.get(Some(late)).unwrap();
    assert_eq!(f.scope(Some(&later)), Scope::Identity);
    assert_eq!(buckets.identities_held(), MAX_IDENTITY_BUCKETS);
    // Clients that have a bucket keep it.
    tokio::time::advance(Duration::from_secs(1)).await;
    f.get(Some(&ids[0])).unwrap();
    assert!(f.get(Some(&ids[0])).is_err());
    // Ten periods idle: dropped at the next new client (ids[0] was used 9 s before).
    tokio::time::advance(Duration::from_secs(9)).await;
    f.get(Some(&later)).unwrap();
    assert_eq!(buckets.identities_held(), 2);
    // A dropped bucket was full anyway: nothing is lost or gained by forgetting it.
    tokio::time::advance(Duration::from_secs(1)).await;
    f.get(Some(&ids[0])).unwrap();
    f.get(Some(&ids[1])).unwrap();
    assert!(f.get(Some(&ids[1])).is_err());
}

#[test]
fn idle_time_covers_a_full_refill() {
    // 10 periods, unless refilling from empty takes longer (a burst of 50 at 1/s: 50 s).
    assert_eq!(
        Rate::of(&per_second(5, 5)).idle_after(),
        Duration::from_secs(10)
    );
    assert_eq!(
        Rate::of(&per_second(1, 50)).idle_after(),
        Duration::from_secs(50)
    );
}

// --- The inbound path on real sockets ---

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    proxy: ProxyConfig,
}

/// An HTTP/2 application answering 200 `ok`.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"ok",
                ))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// demo's workload (`app: db`) denies `/forbidden` to everyone.
fn deny_forbidden() -> Arc<crate::policy::PolicyState> {
    let spec = serde_json::json!({
        "action": "DENY",
        "selector": {"matchLabels": {"app": "db"}},
        "rules": [{"to": [{"operation": {"paths": ["/forbidden"]}}]}],
    });
    let envelope = sigil_policy::Envelope::new(
        sigil_policy::Kind::from_name("AuthorizationPolicy").unwrap(),
        "demo",
        "deny-forbidden",
    );
    let checked = sigil_policy::validate::object(&envelope, &spec);
    Arc::new(crate::policy::PolicyState::from_wire(
        &sigil_proto::sigil::policy::v2::PolicySet {
            version: 1,
            namespace: "demo".into(),
            labels: [("app".to_string(), "db".to_string())].into(),
            policies: vec![sigil_proxy_api::policy::to_wire(&checked)],
        },
    ))
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn send(sender: &Sender, request: http::request::Builder) -> Response<Incoming> {
    let request = request.body(Empty::new()).unwrap();
    sender.clone().send_request(request).await.unwrap()
}

#[tokio::test]
async fn the_inbound_proxy_limits_authorized_requests_on_real_connections() {
    let config = Cli::try_parse_from(["proxy", "--mtls-mode", "disable"])
        .unwrap()
        .proxy;
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    // Two per minute: what is taken is plain to see.
    let slow = Limit {
        requests: 2,
        period: Duration::from_secs(60),
        burst: 2,
    };
    let (routes_tx, routes) = watch::channel(Some(route_table(vec![limit(Some(slow), None)])));
    let (_services_tx, services) = watch::channel(Some(service_table(proxy)));
    let (_tls_tx, tls) = watch::channel(None);
    let (_mesh_tx, mesh) = watch::channel(None);
    let (_policies_tx, policies) = watch::channel(Some(deny_forbidden()));
    let (_close_tx, close) = watch::channel(false);
    let shared = Shared {
        retry_budgets: Arc::default(),
        rate_limits: Arc::new(RateLimits::new(
            routes.clone(),
            services.clone(),
            metrics.clone(),
        )),
        pools: Arc::new(crate::pool::Pools::new(
            tls.clone(),
            metrics.clone(),
            config.connect_timeout,
            1,
        )),
        balancers: Arc::new(crate::balance::Balancers::new(metrics.clone())),
        app_pools: Arc::default(),
        tracer: crate::trace::Tracer::disabled(),
        config: Arc::new(config),
        tls,
        mesh,
        metrics,
        policies,
        close,
        inbound_slots: Arc::new(tokio::sync::Semaphore::new(16)),
        services,
        routes,
    };
    let target = crate::inbound::AppTarget::Fixed(app().await);
    tokio::spawn(async move {
        while let Ok((stream, source)) = listener.accept().await {
            tokio::spawn(crate::inbound::handle(
                stream,
                source,
                target,
                shared.clone(),
            ));
        }
    });
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let get = |path: &str| Request::get(format!("http://api.demo{path}"));

    println!("case: requests denied by policy take no token");
    for _ in 0..5 {
        assert_eq!(send(&sender, get("/forbidden")).await.status(), 403);
    }
    for _ in 0..2 {
        assert_eq!(send(&sender, get("/ok")).await.status(), 200);
    }

    println!("case: a refused request is answered 429 with Retry-After, gRPC with status 8");
    let refused = send(&sender, get("/ok")).await;
    assert_eq!(refused.status(), 429);
    // A token every 30 s.
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(
        refused.headers()["sigil-proxy-error"],
        "rate limited by demo/api-limit"
    );
    let grpc = send(
        &sender,
        Request::post("http://api.demo/demo.Api/Get")
            .header("content-type", "application/grpc")
            .header("te", "trailers"),
    )
    .await;
    assert_eq!(grpc.status(), 200);
    assert_eq!(grpc.headers()["grpc-status"], "8");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for series in [
        "sigil_proxy_rate_limited_total{service=\"demo/api\",policy=\"demo/api-limit\",scope=\"total\"} 2",
        "status_code=\"429\"",
    ] {
        assert!(text.contains(series), "{series} not in\n{text}");
    }

    println!("case: three times the rate for 3 s gets the rate");
    // A burst of a tenth of a second's worth absorbs the jitter of the client's ticks.
    const RATE: u32 = 50;
    const BURST: u32 = RATE / 10;
    routes_tx.send_replace(Some(route_table(vec![limit(
        Some(per_second(RATE, BURST)),
        None,
    )])));
    let started = std::time::Instant::now();
    let offered = 3 * RATE as usize * 3;
    let mut tick = tokio::time::interval(Duration::from_secs(3) / offered as u32);
    let mut answers = Vec::with_capacity(offered);
    for _ in 0..offered {
        tick.tick().await;
        let sender = sender.clone();
        answers.push(tokio::spawn(async move {
            send(&sender, get("/ok")).await.status().as_u16()
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for answer in answers {
        match answer.await.unwrap() {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("answered {other}"),
        }
    }
    println!(
        "{ok} admitted, {limited} refused of {offered} in {:?}",
        started.elapsed()
    );
    // R/s for 3 s and the burst the bucket starts with, ±10%.
    let want = (3 * RATE + BURST) as usize;
    assert!(
        ok * 10 >= want * 9 && ok * 10 <= want * 11,
        "{ok} admitted, want {want} ±10%"
    );
    assert_eq!(ok + limited, offered);
}
