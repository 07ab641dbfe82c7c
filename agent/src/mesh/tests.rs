use k8s_openapi::api::core::v1::{PodIP, PodSpec as CorePodSpec, PodStatus};
use kube::api::{ObjectMeta, Patch, PatchParams};
use prometheus_client::registry::Registry;
use sigil_proto::sigil::mesh::v1::MeshMember;
use sigil_proto::sigil::mesh::v1::mesh_discovery_client::MeshDiscoveryClient;
use sigil_proxy_api::services::Protocol;
use sigil_test_apiserver::{PodSpec, TestApiServer};

use super::*;
use crate::test_support::{BundleSource, TestAgent, TestCa, WEB_ID, td, this_uid, uid_is_web};

const WAIT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn spiffe(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(&mut Registry::default()))
}

fn member(id: &str, source: &str) -> Member {
    Member::single(spiffe(id), source)
}

fn member_of(ids: &[&str], source: &str) -> Member {
    Member {
        ids: ids.iter().map(|id| spiffe(id)).collect(),
        source: source.into(),
    }
}

/// The membership, once `what` holds for it.
async fn until(
    rx: &watch::Receiver<Arc<MeshState>>,
    what: impl Fn(&MeshSnapshot) -> bool,
) -> MeshSnapshot {
    until_state(rx, |state| what(state.members()))
        .await
        .members()
        .clone()
}

async fn until_state(
    rx: &watch::Receiver<Arc<MeshState>>,
    what: impl Fn(&MeshState) -> bool,
) -> Arc<MeshState> {
    tokio::time::timeout(WAIT, rx.clone().wait_for(|state| what(state)))
        .await
        .expect("the membership never reached the expected state")
        .expect("the membership task stopped")
        .clone()
}

// --- the mesh file ---

#[test]
fn a_good_file_parses() {
    let yaml = "members:\n\
                    - {ip: 198.18.0.2, id: \"spiffe://cluster.local/ns/b/sa/b\"}\n\
                    - ip: fd00::7\n  id: spiffe://cluster.local/vm/db\n";
    let members = parse_file(yaml.as_bytes(), &td()).unwrap().members;
    assert_eq!(
        members,
        BTreeMap::from([
            (ip("198.18.0.2"), spiffe("spiffe://cluster.local/ns/b/sa/b")),
            (ip("fd00::7"), spiffe("spiffe://cluster.local/vm/db")),
        ])
    );
    assert_eq!(
        parse_file(b"members: []", &td()).unwrap(),
        FileContent {
            members: BTreeMap::new(),
            services: Vec::new()
        }
    );
}

#[test]
fn a_bad_file_is_refused_naming_the_entry_and_field() {
    let cases = [
        (
            "members: [{ip: 198.18.0.2, id: spiffe://cluster.local/ns/b/sa/b, port: 80}]",
            "members[0]: unknown field `port`, expected `ip` or `id`",
        ),
        ("member: []", "unknown field `member`, expected `members`"),
        (
            "members:\n- {ip: 198.18.0.2, id: spiffe://cluster.local/ns/a/sa/a}\n- {ip: 198.18.0.300, id: spiffe://cluster.local/ns/b/sa/b}",
            "members[1].ip \"198.18.0.300\" is not an IP address",
        ),
        (
            "members: [{ip: 198.18.0.2, id: spiffe://cluster.local/ns//sa/b}]",
            "members[0].id \"spiffe://cluster.local/ns//sa/b\": SPIFFE ID path has an empty segment",
        ),
        (
            "members: [{ip: 198.18.0.2, id: \"https://cluster.local/ns/b/sa/b\"}]",
            "members[0].id \"https://cluster.local/ns/b/sa/b\": SPIFFE ID must start with",
        ),
        (
            "members: [{ip: 198.18.0.2, id: spiffe://cluster.local}]",
            "members[0].id spiffe://cluster.local has no path",
        ),
        (
            "members: [{ip: 198.18.0.2, id: spiffe://example.org/ns/b/sa/b}]",
            "members[0].id spiffe://example.org/ns/b/sa/b is not in this agent's trust domain cluster.local",
        ),
        (
            "members:\n- {ip: 198.18.0.2, id: spiffe://cluster.local/ns/a/sa/a}\n- {ip: 198.18.0.2, id: spiffe://cluster.local/ns/b/sa/b}",
            "members[1].ip 198.18.0.2 is already members[0].ip",
        ),
        (
            "members: [{ip: 198.18.0.2}]",
            "members[0]: missing field `id`",
        ),
    ];
    for (yaml, expected) in cases {
        let err = parse_file(yaml.as_bytes(), &td()).unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "{yaml}\n  gave: {err}\n  want: {expected}"
        );
    }
}

#[test]
fn a_missing_or_invalid_file_at_start_up_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = MeshFile::load(&dir.path().join("absent.yaml"), &td()).unwrap_err();
    assert!(matches!(missing, MeshError::Read(_)), "{missing:?}");
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, "members: [{ip: nope, id: spiffe://cluster.local/x}]").unwrap();
    let invalid = MeshFile::load(&path, &td()).unwrap_err();
    assert!(
        matches!(invalid, MeshError::Member(MemberError::Ip { index: 0, .. })),
        "{invalid:?}"
    );
}

/// The file source alone, on paused time: each poll is exactly one FILE_POLL_INTERVAL.
#[tokio::test(start_paused = true)]
async fn the_file_is_reloaded_on_change_and_a_bad_edit_keeps_the_last_good_members() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    let b = "spiffe://cluster.local/ns/b/sa/b";
    std::fs::write(&path, format!("members: [{{ip: 198.18.0.2, id: {b}}}]")).unwrap();
    let metrics = metrics();
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: None,
        file: Some(MeshFile::load(&path, &td()).unwrap()),
    };
    let rx = spawn(td(), sources, metrics.clone(), shutdown);
    let first = until(&rx, MeshSnapshot::is_synced).await;
    assert_eq!(first.version, 1);
    assert_eq!(
        first.members,
        BTreeMap::from([(ip("198.18.0.2"), member(b, FILE_SOURCE))])
    );
    assert_eq!(metrics.mesh_members.get(), 1);

    // Invalid, then unreadable: logged and counted once each, the members kept.
    std::fs::write(
        &path,
        "members: [{ip: 198.18.0.2, id: spiffe://evil.org/x}]",
    )
    .unwrap();
    tokio::time::sleep(FILE_POLL_INTERVAL * 3).await;
    assert_eq!(metrics.mesh_file_reload_failures.get(), 1);
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(FILE_POLL_INTERVAL * 3).await;
    assert_eq!(metrics.mesh_file_reload_failures.get(), 2);
    assert_eq!(*rx.borrow().members(), first, "nothing published");

    // A valid edit is published; rewriting the same members is not a change.
    let c = "spiffe://cluster.local/ns/c/sa/c";
    let edit = format!("members:\n- {{ip: 198.18.0.2, id: {b}}}\n- {{ip: 198.18.0.3, id: {c}}}\n");
    std::fs::write(&path, &edit).unwrap();
    let second = until(&rx, |snapshot| snapshot.version == 2).await;
    assert_eq!(
        second.members,
        BTreeMap::from([
            (ip("198.18.0.2"), member(b, FILE_SOURCE)),
            (ip("198.18.0.3"), member(c, FILE_SOURCE)),
        ])
    );
    assert_eq!(metrics.mesh_members.get(), 2);
    std::fs::write(&path, format!("# same members\n{edit}")).unwrap();
    tokio::time::sleep(FILE_POLL_INTERVAL * 3).await;
    assert_eq!(rx.borrow().version(), 2);
    assert_eq!(metrics.mesh_file_reload_failures.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn without_sources_the_empty_membership_is_published_and_shutdown_ends_it() {
    let (stop, shutdown) = watch::channel(false);
    let mut rx = spawn(td(), Sources::default(), metrics(), shutdown);
    let snapshot = until(&rx, MeshSnapshot::is_synced).await;
    assert!(snapshot.members.is_empty());
    rx.borrow_and_update();
    stop.send_replace(true);
    assert!(rx.changed().await.is_err(), "the sender is gone");
}

// --- pods ---

struct TestPod {
    name: &'static str,
    sa: Option<&'static str>,
    phase: &'static str,
    pod_ip: Option<&'static str>,
    pod_ips: &'static [&'static str],
    host_network: bool,
    created: &'static str,
}

const RUNNING: TestPod = TestPod {
    name: "web-1",
    sa: Some("web"),
    phase: "Running",
    pod_ip: Some("10.0.0.5"),
    pod_ips: &["10.0.0.5", "fd00::5"],
    host_network: false,
    created: "2026-01-01T00:00:00Z",
};

impl TestPod {
    fn pod(&self) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some(format!("uid-{}", self.name)),
                namespace: Some("demo".into()),
                name: Some(self.name.into()),
                creation_timestamp: Some(Time(self.created.parse().unwrap())),
                ..ObjectMeta::default()
            },
            spec: Some(CorePodSpec {
                service_account_name: self.sa.map(Into::into),
                host_network: Some(self.host_network),
                ..CorePodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(self.phase.into()),
                pod_ip: self.pod_ip.map(Into::into),
                pod_ips: Some(
                    self.pod_ips
                        .iter()
                        .map(|ip| PodIP { ip: (*ip).into() })
                        .collect(),
                ),
                ..PodStatus::default()
            }),
        }
    }

    fn mesh_pod(&self) -> Option<MeshPod> {
        mesh_pod(&self.pod(), &td()).unwrap()
    }
}

#[test]
fn pods_convert_to_members() {
    /// The IPs and ID the pod contributes, if any.
    type Contribution = Option<(&'static [&'static str], &'static str)>;
    let web = "spiffe://cluster.local/ns/demo/sa/web";
    let cases: [(&str, TestPod, Contribution); 8] = [
        (
            "every podIP",
            RUNNING,
            Some((&["10.0.0.5", "fd00::5"], web)),
        ),
        (
            "podIP when podIPs is empty",
            TestPod {
                pod_ips: &[],
                ..RUNNING
            },
            Some((&["10.0.0.5"], web)),
        ),
        (
            "pending with an IP",
            TestPod {
                phase: "Pending",
                ..RUNNING
            },
            Some((&["10.0.0.5", "fd00::5"], web)),
        ),
        (
            "host network",
            TestPod {
                host_network: true,
                ..RUNNING
            },
            None,
        ),
        (
            "succeeded",
            TestPod {
                phase: "Succeeded",
                ..RUNNING
            },
            None,
        ),
        (
            "failed",
            TestPod {
                phase: "Failed",
                ..RUNNING
            },
            None,
        ),
        (
            "no IP yet",
            TestPod {
                pod_ip: None,
                pod_ips: &[],
                phase: "Pending",
                ..RUNNING
            },
            None,
        ),
        (
            "default service account",
            TestPod {
                sa: None,
                ..RUNNING
            },
            Some((
                &["10.0.0.5", "fd00::5"],
                "spiffe://cluster.local/ns/demo/sa/default",
            )),
        ),
    ];
    for (what, pod, expected) in cases {
        let got = pod.mesh_pod();
        let got = got.as_ref().map(|p| {
            let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
            (ips, p.id.clone(), p.source.as_str())
        });
        let expected = expected.map(|(ips, id)| {
            let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
            (ips, spiffe(id), "demo/web-1")
        });
        assert_eq!(got, expected, "{what}");
    }
    let bad_sa = TestPod {
        sa: Some("Not_A/Segment"),
        ..RUNNING
    };
    let err = mesh_pod(&bad_sa.pod(), &td()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("pod demo/web-1 has no valid identity")
    );
}

#[test]
fn a_duplicate_ip_goes_to_the_running_then_newest_pod() {
    let old = TestPod {
        name: "old",
        sa: Some("old"),
        pod_ips: &["10.0.0.5"],
        ..RUNNING
    };
    let newer = TestPod {
        name: "newer",
        sa: Some("newer"),
        pod_ips: &["10.0.0.5"],
        created: "2026-01-02T00:00:00Z",
        ..RUNNING
    };
    let newest_pending = TestPod {
        name: "newest",
        sa: Some("newest"),
        pod_ips: &["10.0.0.5"],
        phase: "Pending",
        created: "2026-01-03T00:00:00Z",
        ..RUNNING
    };
    let pods = [&old, &newer, &newest_pending].map(|p| p.mesh_pod().unwrap());
    let ten = ip("10.0.0.5");
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let mut conflicts = Vec::new();
        let members = pod_members(order.iter().map(|&i| &pods[i]), &mut conflicts);
        assert_eq!(
            members,
            BTreeMap::from([(
                ten,
                member("spiffe://cluster.local/ns/demo/sa/newer", "demo/newer")
            )]),
            "{order:?}"
        );
        assert_eq!(
            conflicts,
            [Conflict {
                ip: ten,
                kept: "demo/newer".into(),
                ignored: vec!["demo/old".into(), "demo/newest".into()],
            }]
        );
    }
    // Without the running ones, the pending pod has the IP.
    let mut conflicts = Vec::new();
    let members = pod_members([&pods[2]], &mut conflicts);
    assert_eq!(members[&ten].source, "demo/newest");
    assert!(conflicts.is_empty());
}

#[test]
fn services_outside_the_mesh_are_published_for_routes_without_changing_the_feeds() {
    let api = "spiffe://cluster.local/ns/demo/sa/api";
    let pods = [pod_at("api-1", "api", &["198.18.7.5"])];
    let services = [
        service("api", "demo", "198.19.7.10"),
        // One endpoint is not meshed.
        service("partial", "demo", "198.19.7.12"),
        service("plain", "demo", "198.19.7.13"),
        service("plain-headless", "demo", "None"),
        // No endpoint yet.
        service("none", "demo", "198.19.7.15"),
        // The mesh file lists it: meshed, whatever Kubernetes says.
        service("db", "demo", "198.19.7.16"),
    ];
    let slices = [
        slice("api-a", "demo", "api", &["198.18.7.5"]),
        slice(
            "partial-a",
            "demo",
            "partial",
            &["198.18.7.5", "198.18.7.99"],
        ),
        slice("plain-a", "demo", "plain", &["198.18.7.98"]),
        slice(
            "plain-headless-a",
            "demo",
            "plain-headless",
            &["198.18.7.98"],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    let vm = "spiffe://cluster.local/vm/db";
    std::fs::write(
        &path,
        format!(
            "members: [{{ip: 198.18.7.50, id: {vm}}}]\n\
             services:\n\
             - namespace: demo\n  name: db\n  clusterIPs: [198.19.7.16]\n\
             \x20 ports: [{{port: 80}}]\n\
             \x20 endpoints: [{{ip: 198.18.7.50}}]\n"
        ),
    )
    .unwrap();
    let file = MeshFile::load(&path, &td()).unwrap();
    let mut kube = kube_state(&pods, &services, &slices);
    kube.pods.synced = true;
    kube.services.synced = true;
    kube.slices.synced = true;

    let (merged, _) = merge(Some(&kube), Some(&file));
    let port_80 = ServicePort {
        name: String::new(),
        port: 80,
        protocol: Protocol::Detect,
        app_protocol: None,
    };
    let unmeshed = |name: &str, cluster_ips: &[&str]| UnmeshedService {
        key: ServiceKey::new("demo", name),
        cluster_ips: cluster_ips.iter().map(|a| ip(a)).collect(),
        ports: vec![port_80.clone()],
    };
    assert_eq!(
        merged.unmeshed,
        [
            unmeshed("none", &["198.19.7.15"]),
            unmeshed("partial", &["198.19.7.12"]),
            unmeshed("plain", &["198.19.7.13"]),
            unmeshed("plain-headless", &[]),
        ]
    );
    let meshed: Vec<String> = merged.services.iter().map(|s| s.key.to_string()).collect();
    assert_eq!(meshed, ["demo/api", "demo/db"]);
    // Unmeshed Services are no members: their connections pass through.
    assert!(!merged.members.contains_key(&ip("198.19.7.13")));

    let mut membership = Membership {
        td: td(),
        kube: Some(kube),
        file: Some(file),
        logged_conflicts: BTreeSet::new(),
        logged_partly_meshed: BTreeSet::new(),
        logged_invalid_opaque_ports: BTreeSet::new(),
        metrics: metrics(),
    };
    let content = membership.content();
    let first = Arc::new(membership.snapshot(1, content));
    assert_eq!(first.unmeshed_services(), merged.unmeshed);

    // An unmeshed Service changes: a new state for the routes, nothing for the feeds.
    let kube = membership.kube.as_mut().unwrap();
    assert!(kube.services.on_event(
        Event::Apply(service("plain", "demo", "198.19.7.14")),
        "services",
        kube_service
    ));
    let content = membership.content();
    assert!(content != first.0, "the publisher sees a change");
    let second = Arc::new(membership.snapshot(2, content));
    assert_eq!(second.members().members, first.members().members);
    assert_eq!(second.services().update_from(first.services()), None);
    assert_eq!(
        second.unmeshed_services()[2],
        unmeshed("plain", &["198.19.7.14"])
    );

    // It becomes meshed (its endpoint is now a meshed pod): it moves to the meshed Services.
    let kube = membership.kube.as_mut().unwrap();
    assert!(kube.on_pod_event(
        Event::Apply(pod_at("plain-1", "api", &["198.18.7.98"])),
        &td()
    ));
    let content = membership.content();
    assert!(content != second.0);
    let third = membership.snapshot(3, content);
    let unmeshed_keys: Vec<String> = (third.unmeshed_services().iter())
        .map(|s| s.key.to_string())
        .collect();
    assert_eq!(unmeshed_keys, ["demo/none", "demo/partial"]);
    assert!(
        third
            .services()
            .services()
            .any(|s| s.key == ServiceKey::new("demo", "plain"))
    );
    assert!(
        third
            .members()
            .get(ip("198.19.7.14"))
            .is_some_and(|m| m.ids.contains(&spiffe(api)))
    );
}

fn apply_pod(pods: &mut Listed<String, MeshPod>, pod: Pod) -> bool {
    pods.on_event(Event::Apply(pod), "meshed pods", |pod| {
        pod_contribution(pod, &td())
    })
}

fn service(name: &str, namespace: &str, cluster_ip: &str) -> Service {
    serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-svc-{namespace}-{name}")},
            "spec": {
                "clusterIP": cluster_ip,
                "clusterIPs": [cluster_ip],
                "ports": [{"port": 80, "targetPort": 8080}],
            },
        }))
        .unwrap()
}

/// An EndpointSlice of `namespace/service`; the addresses prefixed `!` are not ready.
fn slice(name: &str, namespace: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = addresses
        .iter()
        .map(|address| {
            let ready = !address.starts_with('!');
            serde_json::json!({
                "addresses": [address.trim_start_matches('!')],
                "conditions": {"ready": ready, "serving": true, "terminating": !ready},
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("uid-slice-{namespace}-{name}"),
            "labels": {SERVICE_NAME_LABEL: service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"port": 8080}],
    }))
    .unwrap()
}

fn kube_state(pods: &[Pod], services: &[Service], slices: &[EndpointSlice]) -> KubeState {
    let mut kube = KubeState::default();
    for pod in pods {
        apply_pod(&mut kube.pods, pod.clone());
    }
    for service in services {
        kube.services
            .on_event(Event::Apply(service.clone()), "services", kube_service);
    }
    for slice in slices {
        kube.slices
            .on_event(Event::Apply(slice.clone()), "endpoint slices", mesh_slice);
    }
    kube
}

fn service_members_of(kube: &KubeState, file: Option<&MeshFile>) -> BTreeMap<IpAddr, Member> {
    merge(Some(kube), file)
        .0
        .members
        .into_iter()
        .filter(|(_, m)| m.source.contains("/service/"))
        .collect()
}

#[test]
fn a_service_is_a_member_when_every_endpoint_is_meshed_with_the_identities_behind_it() {
    let web = "spiffe://cluster.local/ns/demo/sa/web";
    let api = "spiffe://cluster.local/ns/demo/sa/api";
    let api_v2 = "spiffe://cluster.local/ns/demo/sa/api-v2";
    let pod = |name: &'static str, sa: &'static str, ips: &'static [&'static str]| {
        TestPod {
            name,
            sa: Some(sa),
            pod_ips: ips,
            pod_ip: ips.first().copied(),
            ..RUNNING
        }
        .pod()
    };
    let pods = [
        pod("web-1", "web", &["10.0.0.5"]),
        pod("web-2", "web", &["10.0.0.6"]),
        // One Deployment in the middle of a serviceAccountName change.
        pod("api-1", "api", &["10.0.0.7"]),
        pod("api-2", "api-v2", &["10.0.0.8"]),
    ];
    let services = [
        service("web", "demo", "10.96.0.10"),
        service("api", "demo", "10.96.0.11"),
        // One endpoint (terminating, not ready) is an unmeshed pod.
        service("partial", "demo", "10.96.0.12"),
        // No endpoint is meshed: outside the mesh, nothing to log.
        service("plain", "demo", "10.96.0.13"),
        // A slice without endpoints, and no slice at all.
        service("empty", "demo", "10.96.0.14"),
        service("none", "demo", "10.96.0.15"),
        // Same name, another namespace: demo's slices are not its own.
        service("web", "shop", "10.96.0.16"),
        // Headless: clients use the endpoints' own IPs.
        service("web-headless", "demo", "None"),
        // No selector: its slice is managed by hand.
        service("manual", "demo", "10.96.0.17"),
    ];
    let slices = [
        // The web Service's endpoints, over two slices.
        slice("web-a", "demo", "web", &["10.0.0.5"]),
        slice("web-b", "demo", "web", &["10.0.0.6"]),
        slice("api-a", "demo", "api", &["10.0.0.7", "10.0.0.8"]),
        slice("partial-a", "demo", "partial", &["10.0.0.5", "!10.0.0.99"]),
        slice("plain-a", "demo", "plain", &["10.0.0.98"]),
        slice("empty-a", "demo", "empty", &[]),
        slice("web-headless-a", "demo", "web-headless", &["10.0.0.5"]),
        slice("manual-1", "demo", "manual", &["10.0.0.6"]),
    ];
    let mut kube = kube_state(&pods, &services, &slices);
    let (Merged { members, .. }, notes) = merge(Some(&kube), None);
    assert_eq!(
        service_members_of(&kube, None),
        BTreeMap::from([
            (ip("10.96.0.10"), member(web, "demo/service/web")),
            (
                ip("10.96.0.11"),
                member_of(&[api, api_v2], "demo/service/api")
            ),
            (ip("10.96.0.17"), member(web, "demo/service/manual")),
        ])
    );
    assert_eq!(members[&ip("10.0.0.8")], member(api_v2, "demo/api-2"));
    assert_eq!(
        notes.partly_meshed,
        [PartlyMeshed {
            service: "demo/service/partial".into(),
            unmeshed: 1,
            examples: vec!["10.0.0.99".into()],
        }]
    );
    assert!(notes.conflicts.is_empty(), "{:?}", notes.conflicts);

    // The file wins over a Service on the same IP, and its entries count as meshed
    // endpoints: with the unmeshed one listed, the partial Service joins.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    let vm = "spiffe://cluster.local/vm/db";
    std::fs::write(
        &path,
        format!("members: [{{ip: 10.96.0.10, id: {vm}}}, {{ip: 10.0.0.99, id: {vm}}}]"),
    )
    .unwrap();
    let file = MeshFile::load(&path, &td()).unwrap();
    let (Merged { members, .. }, notes) = merge(Some(&kube), Some(&file));
    assert_eq!(members[&ip("10.96.0.10")], member(vm, FILE_SOURCE));
    assert_eq!(
        members[&ip("10.96.0.12")],
        member_of(&[vm, web], "demo/service/partial")
    );
    assert!(notes.partly_meshed.is_empty());

    // A slice leaves: the Service's others still count; its last: it leaves too.
    let delete_slice = |kube: &mut KubeState, slice: EndpointSlice| {
        kube.slices
            .on_event(Event::Delete(slice), "endpoint slices", mesh_slice)
    };
    assert!(delete_slice(&mut kube, slices[1].clone()));
    assert!(delete_slice(&mut kube, slices[2].clone()));
    let after = service_members_of(&kube, None);
    assert_eq!(after[&ip("10.96.0.10")], member(web, "demo/service/web"));
    assert_eq!(after.get(&ip("10.96.0.11")), None);
    // A Service leaves.
    assert!(
        kube.services
            .on_event(Event::Delete(services[0].clone()), "services", kube_service)
    );
    assert_eq!(
        service_members_of(&kube, None).keys().collect::<Vec<_>>(),
        [&ip("10.96.0.17")]
    );
}

/// An EndpointSlice of demo/web whose endpoints name their pods: (address, pod UID, ready,
/// serving, terminating), as the EndpointSlice controller writes them.
fn web_slice(endpoints: &[(&str, &str, bool, bool, bool)]) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(address, uid, ready, serving, terminating)| {
                serde_json::json!({
                    "addresses": [address],
                    "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                    "targetRef": {"kind": "Pod", "namespace": "demo", "name": uid.trim_start_matches("uid-"), "uid": uid},
                })
            })
            .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "web-a",
            "namespace": "demo",
            "uid": "uid-slice-demo-web-a",
            "labels": {SERVICE_NAME_LABEL: "web"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"port": 8080}],
    }))
    .unwrap()
}

/// A pod leaving a Service, event by event in each order Kubernetes delivers them (the pod's
/// deletion before or after the slice update that drops its address, and a force deletion
/// that skips the terminating conditions): the Service is a member after every event, and
/// the leaving pod's own IP stops being one as soon as the pod is gone.
#[test]
fn a_leaving_pod_never_takes_its_service_out_of_the_mesh() {
    let web = "spiffe://cluster.local/ns/demo/sa/web";
    let cluster_ip = ip("10.96.0.10");
    let pod = |name: &'static str, ip: &'static [&'static str], phase: &'static str| {
        TestPod {
            name,
            phase,
            pod_ips: ip,
            pod_ip: ip.first().copied(),
            ..RUNNING
        }
        .pod()
    };
    let web_1 = pod("web-1", &["10.0.0.5"], "Running");
    let web_2 = pod("web-2", &["10.0.0.6"], "Running");
    let mut web_1_terminating = web_1.clone();
    web_1_terminating.metadata.deletion_timestamp =
        Some(Time("2026-01-01T01:00:00Z".parse().unwrap()));
    let mut web_1_finished = web_1_terminating.clone();
    web_1_finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let both_ready = web_slice(&[
        ("10.0.0.5", "uid-web-1", true, true, true),
        ("10.0.0.6", "uid-web-2", true, true, false),
    ]);
    let terminating = |serving| {
        web_slice(&[
            ("10.0.0.5", "uid-web-1", false, serving, true),
            ("10.0.0.6", "uid-web-2", true, true, false),
        ])
    };
    let web_2_only = web_slice(&[("10.0.0.6", "uid-web-2", true, true, false)]);

    enum Step {
        Pod(Box<Event<Pod>>),
        Slice(Box<EndpointSlice>),
    }
    let pod_step = |event: Event<Pod>| Step::Pod(Box::new(event));
    let slice_step = |slice: EndpointSlice| Step::Slice(Box::new(slice));
    let graceful_start = || {
        vec![
            pod_step(Event::Apply(web_1_terminating.clone())),
            slice_step(terminating(true)),
            slice_step(terminating(false)),
        ]
    };
    let pod_gone = || {
        vec![
            pod_step(Event::Apply(web_1_finished.clone())),
            pod_step(Event::Delete(web_1_finished.clone())),
        ]
    };
    let orders: [(&str, Vec<Step>); 4] = [
        (
            "pod deleted before the slice update",
            [
                graceful_start(),
                pod_gone(),
                vec![slice_step(web_2_only.clone())],
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        (
            "pod deleted after the slice update",
            [
                graceful_start(),
                vec![slice_step(web_2_only.clone())],
                pod_gone(),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        (
            "force deletion, the slice still saying ready",
            vec![
                pod_step(Event::Delete(web_1.clone())),
                slice_step(web_2_only.clone()),
            ],
        ),
        (
            "the pod missing from a re-list",
            vec![
                pod_step(Event::Init),
                pod_step(Event::InitApply(web_2.clone())),
                pod_step(Event::InitDone),
                slice_step(web_2_only.clone()),
            ],
        ),
    ];
    for (order, steps) in orders {
        let mut kube = kube_state(
            &[web_1.clone(), web_2.clone()],
            &[service("web", "demo", "10.96.0.10")],
            std::slice::from_ref(&both_ready),
        );
        assert_eq!(
            service_members_of(&kube, None)[&cluster_ip],
            member(web, "demo/service/web")
        );
        for (index, step) in steps.into_iter().enumerate() {
            match step {
                Step::Pod(event) => {
                    kube.on_pod_event(*event, &td());
                }
                Step::Slice(slice) => {
                    kube.on_slice_event(Event::Apply(*slice));
                }
            }
            let (Merged { members, .. }, notes) = merge(Some(&kube), None);
            assert_eq!(
                members.get(&cluster_ip),
                Some(&member(web, "demo/service/web")),
                "{order}, after step {index}"
            );
            assert!(notes.partly_meshed.is_empty(), "{order}, step {index}");
            if !kube.pods.items.contains_key("uid-web-1") {
                assert_eq!(members.get(&ip("10.0.0.5")), None, "{order}, step {index}");
            }
        }
        assert!(
            kube.leaving.is_empty(),
            "{order}: forgotten once no slice names it"
        );
    }

    // The address a leaving pod had, listed for another pod (not meshed): that is a
    // plaintext endpoint, and the Service leaves the mesh.
    let mut kube = kube_state(
        &[web_1.clone(), web_2.clone()],
        &[service("web", "demo", "10.96.0.10")],
        std::slice::from_ref(&both_ready),
    );
    kube.on_pod_event(Event::Delete(web_1.clone()), &td());
    kube.on_slice_event(Event::Apply(web_slice(&[
        ("10.0.0.5", "uid-web-1", false, false, true),
        ("10.0.0.6", "uid-web-2", true, true, false),
        ("10.0.0.5", "uid-plain", true, true, false),
    ])));
    let (Merged { members, .. }, notes) = merge(Some(&kube), None);
    assert_eq!(members.get(&cluster_ip), None);
    assert_eq!(notes.partly_meshed.len(), 1);
}

#[test]
fn slices_convert_to_their_services_endpoint_addresses() {
    let mut fqdn = slice("ext", "demo", "ext", &["10.0.0.5"]);
    fqdn.address_type = "FQDN".into();
    assert_eq!(mesh_slice(&fqdn), None);
    let mut orphan = slice("orphan", "demo", "x", &["10.0.0.5"]);
    orphan.metadata.labels = None;
    assert_eq!(mesh_slice(&orphan), None);
    assert_eq!(
        mesh_slice(&slice("web-a", "demo", "web", &["10.0.0.5", "!10.0.0.6"])),
        Some(MeshSlice {
            service: "demo/service/web".into(),
            ports: BTreeMap::from([(String::new(), 8080)]),
            addresses: [("10.0.0.5", true), ("10.0.0.6", false)]
                .map(|(address, ready)| EndpointAddress {
                    address: address.into(),
                    pod_uid: None,
                    state: EndpointState {
                        ready,
                        serving: true,
                        terminating: !ready,
                        node: None,
                        zone: None,
                    },
                })
                .to_vec(),
        })
    );
    let mut external = service("ext", "demo", "10.96.0.9");
    external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    assert_eq!(kube_service(&external), None);
}

#[test]
fn the_file_wins_over_a_pod_on_the_same_ip() {
    let mut pods = Listed::default();
    assert!(apply_pod(&mut pods, RUNNING.pod()));
    assert!(!apply_pod(&mut pods, RUNNING.pod()), "no change");
    let vm = "spiffe://cluster.local/vm/db";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(
        &path,
        format!("members: [{{ip: 10.0.0.5, id: {vm}}}, {{ip: 10.9.9.9, id: {vm}}}]"),
    )
    .unwrap();
    let file = MeshFile::load(&path, &td()).unwrap();
    let kube = KubeState {
        pods,
        ..KubeState::default()
    };
    let (Merged { members, .. }, notes) = merge(Some(&kube), Some(&file));
    assert_eq!(
        members,
        BTreeMap::from([
            (ip("10.0.0.5"), member(vm, FILE_SOURCE)),
            (ip("10.9.9.9"), member(vm, FILE_SOURCE)),
            (
                ip("fd00::5"),
                member("spiffe://cluster.local/ns/demo/sa/web", "demo/web-1")
            ),
        ])
    );
    assert_eq!(
        notes.conflicts,
        [Conflict {
            ip: ip("10.0.0.5"),
            kept: FILE_SOURCE.into(),
            ignored: vec!["demo/web-1".into()],
        }]
    );
    // A pod that finishes leaves the membership.
    let finished = TestPod {
        phase: "Succeeded",
        ..RUNNING
    };
    let mut pods = kube.pods;
    assert!(apply_pod(&mut pods, finished.pod()));
    assert!(pods.items.is_empty());
}

// --- the meshed Services ---

/// A pod of `demo` with one IP, labelled for the mesh.
fn pod_at(name: &'static str, sa: &'static str, ips: &'static [&'static str]) -> Pod {
    TestPod {
        name,
        sa: Some(sa),
        pod_ips: ips,
        pod_ip: ips.first().copied(),
        ..RUNNING
    }
    .pod()
}

/// A Service of `demo` from its spec (and annotations), as JSON.
fn service_of(name: &str, spec: serde_json::Value, annotations: serde_json::Value) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": "demo",
            "uid": format!("uid-svc-{name}"),
            "annotations": annotations,
        },
        "spec": spec,
    }))
    .unwrap()
}

/// An EndpointSlice of `demo/<service>` from its endpoints and ports, as JSON.
fn slice_of(
    name: &str,
    service: &str,
    endpoints: serde_json::Value,
    ports: serde_json::Value,
) -> EndpointSlice {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": "demo",
            "uid": format!("uid-slice-{name}"),
            "labels": {SERVICE_NAME_LABEL: service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
    .unwrap()
}

fn services_of(kube: &KubeState, file: Option<&MeshFile>) -> BTreeMap<String, MeshService> {
    merge(Some(kube), file)
        .0
        .services
        .into_iter()
        .map(|service| (service.key.to_string(), service))
        .collect()
}

const API: &str = "spiffe://cluster.local/ns/demo/sa/api";

#[test]
fn meshed_services_are_served_with_their_endpoints_by_the_membership_rule() {
    let pods = [
        pod_at("api-1", "api", &["198.18.0.2"]),
        pod_at("api-2", "api", &["198.18.0.3"]),
        pod_at("api-3", "api", &["198.18.0.4"]),
    ];
    let two_ports = serde_json::json!({
        "clusterIP": "198.19.0.10",
        "clusterIPs": ["198.19.0.10"],
        "ports": [
            {"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"},
            {"name": "db", "port": 3306, "targetPort": 3306},
        ],
    });
    let services = [
        service_of(
            "api",
            two_ports.clone(),
            serde_json::json!({OPAQUE_PORTS_ANNOTATION: "3306"}),
        ),
        // Headless, with an annotation that does not parse.
        service_of(
            "api-headless",
            serde_json::json!({"clusterIP": "None", "ports": [{"name": "grpc", "port": 9090}]}),
            serde_json::json!({OPAQUE_PORTS_ANNOTATION: "3306-80"}),
        ),
        // One of its endpoints is not meshed.
        service_of("partial", two_ports.clone(), serde_json::json!({})),
    ];
    let endpoint = |address: &str, pod: &str, conditions: serde_json::Value| {
        serde_json::json!({
            "addresses": [address],
            "conditions": conditions,
            "nodeName": "node-a",
            "zone": "zone-1",
            "targetRef": {"kind": "Pod", "namespace": "demo", "name": pod, "uid": format!("uid-{pod}")},
        })
    };
    let ports =
        |web: u16| serde_json::json!([{"name": "http", "port": web}, {"name": "db", "port": 3306}]);
    let slices = [
        // The named target port "web" is 8080 on some pods and 8081 on another: two slices.
        slice_of(
            "api-a",
            "api",
            serde_json::json!([
                endpoint("198.18.0.2", "api-1", serde_json::json!({})),
                endpoint("198.18.0.3", "api-2", serde_json::json!({"ready": false})),
            ]),
            ports(8080),
        ),
        slice_of(
            "api-b",
            "api",
            serde_json::json!([endpoint(
                "198.18.0.4",
                "api-3",
                serde_json::json!({"ready": false, "serving": true, "terminating": true})
            )]),
            ports(8081),
        ),
        slice_of(
            "api-headless-a",
            "api-headless",
            serde_json::json!([endpoint("198.18.0.2", "api-1", serde_json::json!({}))]),
            serde_json::json!([{"name": "grpc", "port": 9090}]),
        ),
        slice_of(
            "partial-a",
            "partial",
            serde_json::json!([
                endpoint("198.18.0.2", "api-1", serde_json::json!({})),
                endpoint("198.18.0.99", "plain-1", serde_json::json!({})),
            ]),
            ports(8080),
        ),
    ];
    let mut kube = kube_state(&pods, &services, &slices);
    let served = services_of(&kube, None);
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        ["demo/api", "demo/api-headless"],
        "the partly meshed Service is left out"
    );
    let api_endpoint =
        |address: &str, pod: &str, web: u16, conditions: (bool, bool, bool)| Endpoint {
            ip: ip(address),
            ports: BTreeMap::from([("http".into(), web), ("db".into(), 3306)]),
            id: spiffe(API),
            ready: conditions.0,
            serving: conditions.1,
            terminating: conditions.2,
            node: Some("node-a".into()),
            zone: Some("zone-1".into()),
            source: format!("demo/{pod}"),
        };
    assert_eq!(
        served["demo/api"],
        MeshService {
            key: ServiceKey::new("demo", "api"),
            cluster_ips: vec![ip("198.19.0.10")],
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: Protocol::Http1,
                    app_protocol: Some("http".into()),
                },
                ServicePort {
                    name: "db".into(),
                    port: 3306,
                    protocol: Protocol::Opaque,
                    app_protocol: None,
                },
            ],
            endpoints: vec![
                // No conditions: ready, serving, not terminating.
                api_endpoint("198.18.0.2", "api-1", 8080, (true, true, false)),
                // Not ready, serving unset: not serving either.
                api_endpoint("198.18.0.3", "api-2", 8080, (false, false, false)),
                api_endpoint("198.18.0.4", "api-3", 8081, (false, true, true)),
            ],
        }
    );
    let headless = &served["demo/api-headless"];
    assert!(headless.cluster_ips.is_empty());
    assert_eq!(
        headless.ports[0].protocol,
        Protocol::Grpc,
        "annotation ignored"
    );
    assert_eq!(headless.endpoints.len(), 1);
    let (Merged { members, .. }, notes) = merge(Some(&kube), None);
    assert_eq!(
        members[&ip("198.19.0.10")],
        member(API, "demo/service/api"),
        "the membership by the same rule"
    );
    assert_eq!(
        notes.invalid_opaque_ports,
        [(
            ServiceKey::new("demo", "api-headless"),
            InvalidOpaquePorts {
                value: "3306-80".into(),
                reason: "the range \"3306-80\" ends before it starts".into(),
            }
        )]
    );
    assert_eq!(notes.partly_meshed.len(), 1);

    // An endpoint becomes terminating and one is added: api alone changes.
    let before = ServiceTable::new(1, served.into_values());
    let pod_4 = pod_at("api-4", "api", &["198.18.0.5"]);
    apply_pod(&mut kube.pods, pod_4);
    assert!(kube.on_slice_event(Event::Apply(slice_of(
        "api-a",
        "api",
        serde_json::json!([
            endpoint(
                "198.18.0.2",
                "api-1",
                serde_json::json!({"ready": false, "serving": true, "terminating": true})
            ),
            endpoint("198.18.0.3", "api-2", serde_json::json!({"ready": false})),
            endpoint("198.18.0.5", "api-4", serde_json::json!({"ready": true})),
        ]),
        ports(8080),
    ))));
    let after = ServiceTable::new(2, services_of(&kube, None).into_values());
    let update = after.update_from(&before).unwrap();
    assert_eq!(update.upserts.len(), 1);
    assert_eq!(update.upserts[0].name, "api");
    assert!(update.removals.is_empty());
    let api = after.get(&ServiceKey::new("demo", "api")).unwrap();
    let ips: Vec<String> = api.endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(
        ips,
        ["198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.0.5"]
    );
    assert!(api.endpoints[0].terminating && !api.endpoints[0].takes_new_requests());
    assert!(api.endpoints[3].takes_new_requests());

    // A slice naming an address twice (one slice replacing another): one endpoint, the ready one.
    kube.on_slice_event(Event::Apply(slice_of(
        "api-c",
        "api",
        serde_json::json!([endpoint("198.18.0.3", "api-2", serde_json::json!({}))]),
        ports(8080),
    )));
    let api = services_of(&kube, None).remove("demo/api").unwrap();
    let twice: Vec<&Endpoint> = api
        .endpoints
        .iter()
        .filter(|e| e.ip == ip("198.18.0.3"))
        .collect();
    assert_eq!(twice.len(), 1);
    assert!(twice[0].ready);

    // The Service goes: it is removed.
    assert!(
        kube.services
            .on_event(Event::Delete(services[0].clone()), "services", kube_service)
    );
    let gone = ServiceTable::new(3, services_of(&kube, None).into_values());
    let update = gone.update_from(&after).unwrap();
    assert_eq!(
        (update.upserts.len(), update.removals),
        (0, vec!["demo/api".to_owned()])
    );

    // The mesh file's Service of the same name wins over Kubernetes'.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(
        &path,
        format!(
            "members: [{{ip: 198.18.1.2, id: {API}}}]\n\
             services:\n\
             - {{namespace: demo, name: api-headless, endpoints: [{{ip: 198.18.1.2}}]}}\n"
        ),
    )
    .unwrap();
    let file = MeshFile::load(&path, &td()).unwrap();
    let headless = services_of(&kube, Some(&file))
        .remove("demo/api-headless")
        .unwrap();
    assert_eq!(headless.endpoints.len(), 1);
    assert_eq!(headless.endpoints[0].ip, ip("198.18.1.2"));
    assert_eq!(headless.endpoints[0].source, FILE_SOURCE);
}

#[test]
fn a_dual_stack_service_is_served_with_both_cluster_ips_and_both_families_endpoints() {
    // Dual-stack pods (one IPv4 and one IPv6 podIP each) behind a Service with two cluster IPs:
    // the EndpointSlice controller writes one slice per family.
    let pods = [
        pod_at("api-1", "api", &["198.18.0.2", "2001:2::2"]),
        pod_at("api-2", "api", &["198.18.0.3", "2001:2::3"]),
    ];
    let services = [service_of(
        "api",
        serde_json::json!({
            "clusterIP": "198.19.0.10",
            "clusterIPs": ["198.19.0.10", "2001:2:0:ff::10"],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        }),
        serde_json::json!({}),
    )];
    let endpoint = |address: &str, pod: &str| {
        serde_json::json!({
            "addresses": [address],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": "demo", "name": pod, "uid": format!("uid-{pod}")},
        })
    };
    let ports = serde_json::json!([{"name": "http", "port": 8080}]);
    let v4 = slice_of(
        "api-v4",
        "api",
        serde_json::json!([
            endpoint("198.18.0.2", "api-1"),
            endpoint("198.18.0.3", "api-2")
        ]),
        ports.clone(),
    );
    let mut v6 = slice_of(
        "api-v6",
        "api",
        serde_json::json!([
            endpoint("2001:2::2", "api-1"),
            endpoint("2001:2::3", "api-2")
        ]),
        ports,
    );
    v6.address_type = "IPv6".into();
    let kube = kube_state(&pods, &services, &[v4, v6]);

    let served = services_of(&kube, None);
    let api = &served["demo/api"];
    assert_eq!(api.cluster_ips, [ip("198.19.0.10"), ip("2001:2:0:ff::10")]);
    let mut addresses: Vec<IpAddr> = api.endpoints.iter().map(|e| e.ip).collect();
    addresses.sort();
    assert_eq!(
        addresses,
        [
            ip("198.18.0.2"),
            ip("198.18.0.3"),
            ip("2001:2::2"),
            ip("2001:2::3")
        ],
        "both families' endpoints, each with its pod's identity"
    );
    assert!(api.endpoints.iter().all(|e| e.id == spiffe(API)));

    let (Merged { members, .. }, notes) = merge(Some(&kube), None);
    for address in ["198.18.0.2", "2001:2::2", "198.19.0.10", "2001:2:0:ff::10"] {
        assert!(
            members.contains_key(&ip(address)),
            "{address} is a member: {members:?}"
        );
    }
    assert!(notes.partly_meshed.is_empty());

    // The IPv6 slice gains an endpoint that is not meshed: the Service leaves the mesh in
    // both families, as it would in one.
    let mut v6 = slice_of(
        "api-v6",
        "api",
        serde_json::json!([
            endpoint("2001:2::2", "api-1"),
            endpoint("2001:2::99", "plain-1")
        ]),
        serde_json::json!([{"name": "http", "port": 8080}]),
    );
    v6.address_type = "IPv6".into();
    let v4 = slice_of(
        "api-v4",
        "api",
        serde_json::json!([endpoint("198.18.0.2", "api-1")]),
        serde_json::json!([{"name": "http", "port": 8080}]),
    );
    let kube = kube_state(&pods, &services, &[v4, v6]);
    assert!(!services_of(&kube, None).contains_key("demo/api"));
    let (Merged { members, .. }, _) = merge(Some(&kube), None);
    assert!(!members.contains_key(&ip("2001:2:0:ff::10")));
    assert!(!members.contains_key(&ip("198.19.0.10")));
}

/// The file source alone, on paused time: its Services are served, and an invalid edit keeps
/// the last good ones.
#[tokio::test(start_paused = true)]
async fn the_mesh_files_services_are_served_and_a_bad_edit_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    let file = |endpoint: &str| {
        format!(
            "members:\n\
             - {{ip: 198.18.0.2, id: {API}}}\n\
             - {{ip: 198.18.0.4, id: {API}}}\n\
             services:\n\
             - namespace: demo\n  name: api\n  clusterIPs: [198.19.0.10]\n\
             \x20 ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n\
             \x20 endpoints: [{{ip: 198.18.0.2}}, {{ip: {endpoint}, ready: false}}]\n"
        )
    };
    std::fs::write(&path, file("198.18.0.4")).unwrap();
    let metrics = metrics();
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: None,
        file: Some(MeshFile::load(&path, &td()).unwrap()),
    };
    let rx = spawn(td(), sources, metrics.clone(), shutdown);
    let first = until_state(&rx, MeshState::is_synced).await;
    let table = first.services();
    assert_eq!(table.version, 1);
    let api = table.by_cluster_ip(ip("198.19.0.10")).unwrap();
    assert_eq!(api.key, ServiceKey::new("demo", "api"));
    assert_eq!(api.ports[0].protocol, Protocol::Http1);
    let endpoints: Vec<(String, u16, bool)> = api
        .endpoints
        .iter()
        .map(|e| {
            (
                e.ip.to_string(),
                e.target_port(&api.ports[0]).unwrap(),
                e.ready,
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [
            ("198.18.0.2".into(), 8080, true),
            ("198.18.0.4".into(), 8080, false)
        ]
    );
    assert!(api.endpoints.iter().all(|e| e.id == spiffe(API)));
    assert_eq!(metrics.mesh_services.get(), 1);

    // An endpoint that is not a member: refused, counted, the last good file kept.
    std::fs::write(&path, file("198.18.0.9")).unwrap();
    tokio::time::sleep(FILE_POLL_INTERVAL * 3).await;
    assert_eq!(metrics.mesh_file_reload_failures.get(), 1);
    assert_eq!(rx.borrow().version(), 1, "nothing published");
    assert_eq!(rx.borrow().services().get(&api.key), Some(api));

    // A valid edit is published.
    std::fs::write(
        &path,
        file("198.18.0.2").replace(", {ip: 198.18.0.2, ready: false}", ""),
    )
    .unwrap();
    let second = until_state(&rx, |state| state.version() == 2).await;
    let api = second
        .services()
        .get(&ServiceKey::new("demo", "api"))
        .unwrap();
    assert_eq!(api.endpoints.len(), 1);
}

// --- the Kubernetes source, against the test API server ---

/// What the kubelet does once the pod's sandbox has an address.
async fn set_pod_ips(server: &TestApiServer, namespace: &str, name: &str, ips: &[&str]) {
    let pods: Api<Pod> = Api::namespaced(server.client(), namespace);
    let status = Pod {
        status: Some(PodStatus {
            pod_ip: ips.first().map(|ip| (*ip).into()),
            pod_ips: Some(ips.iter().map(|ip| PodIP { ip: (*ip).into() }).collect()),
            ..PodStatus::default()
        }),
        ..Pod::default()
    };
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

fn labelled(namespace: &str, name: &str, sa: &str) -> PodSpec {
    let mut spec = PodSpec::new(namespace, name, sa, "node-a");
    spec.labels
        .insert(TLS_MODE_LABEL.into(), TLS_MODE_MTLS.into());
    spec
}

#[tokio::test]
async fn labelled_pods_with_ips_are_members_until_deleted() {
    let server = TestApiServer::start().await;
    server.add_pod(&labelled("demo", "web-1", "web"));
    set_pod_ips(&server, "demo", "web-1", &["10.0.0.5"]).await;
    // Unlabelled, or labelled for something else: not meshed.
    server.add_pod(&PodSpec::new("demo", "plain-1", "plain", "node-b"));
    set_pod_ips(&server, "demo", "plain-1", &["10.0.0.6"]).await;
    let mut other_mode = PodSpec::new("demo", "off-1", "off", "node-b");
    other_mode
        .labels
        .insert(TLS_MODE_LABEL.into(), "disabled".into());
    server.add_pod(&other_mode);
    set_pod_ips(&server, "demo", "off-1", &["10.0.0.7"]).await;

    let metrics = metrics();
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: Some(server.client()),
        file: None,
    };
    let rx = spawn(td(), sources, metrics.clone(), shutdown);
    let synced = until(&rx, MeshSnapshot::is_synced).await;
    let web = "spiffe://cluster.local/ns/demo/sa/web";
    assert_eq!(
        synced.members,
        BTreeMap::from([(ip("10.0.0.5"), member(web, "demo/web-1"))])
    );

    // A new labelled pod in another namespace joins once it has an address.
    server.add_pod(&labelled("shop", "db-1", "db"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.borrow().members().members.len(), 1, "no IP yet");
    set_pod_ips(&server, "shop", "db-1", &["10.0.1.9", "fd00::9"]).await;
    let grown = until(&rx, |s| s.members.len() == 3).await;
    let db = "spiffe://cluster.local/ns/shop/sa/db";
    assert_eq!(grown.get(ip("fd00::9")), Some(&member(db, "shop/db-1")));
    assert_eq!(grown.get(ip("10.0.0.6")), None);
    assert_eq!(metrics.mesh_members.get(), 3);

    server.delete_pod("demo", "web-1");
    let shrunk = until(&rx, |s| s.members.len() == 2).await;
    assert_eq!(shrunk.get(ip("10.0.0.5")), None);
    server.set_pod_phase("shop", "db-1", "Succeeded");
    until(&rx, |s| s.members.is_empty()).await;
    assert_eq!(metrics.mesh_members.get(), 0);
}

#[tokio::test]
async fn nothing_is_published_before_the_pods_are_synced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(
        &path,
        "members: [{ip: 198.18.0.2, id: spiffe://cluster.local/vm/a}]",
    )
    .unwrap();
    let server = TestApiServer::start().await;
    let client = server.client();
    server.shutdown().await;
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: Some(client),
        file: Some(MeshFile::load(&path, &td()).unwrap()),
    };
    let rx = spawn(td(), sources, metrics(), shutdown);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !rx.borrow().is_synced(),
        "the file alone is not the membership"
    );
}

// --- the gRPC service on a real socket ---

impl TestAgent {
    async fn mesh_client(&self) -> MeshDiscoveryClient<tonic::transport::Channel> {
        MeshDiscoveryClient::new(self.channel().await)
    }
}

async fn serve(unix_map: &str) -> TestAgent {
    let ca = TestCa::prepare().await;
    TestAgent::serve(
        SocketApi::Mesh,
        ca,
        Duration::from_secs(3600),
        unix_map,
        BundleSource::Test,
    )
    .await
}

fn snapshot(version: u64, members: &[(&str, &str)]) -> Arc<MeshState> {
    let members = members
        .iter()
        .map(|(ip_, id)| (ip(ip_), member(id, FILE_SOURCE)))
        .collect();
    Arc::new(MeshState::new(version, members, []))
}

#[tokio::test]
async fn an_attested_caller_gets_the_membership_then_every_change() {
    let mut agent = serve(&uid_is_web(this_uid())).await;
    let mut client = agent.mesh_client().await;
    let mut stream = client
        .watch_members(WatchMembersRequest {})
        .await
        .unwrap()
        .into_inner();
    // Not synced yet: nothing is sent until it is.
    let mut first = Box::pin(stream.message());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut first)
            .await
            .is_err()
    );
    let b = "spiffe://cluster.local/ns/b/sa/b";
    agent
        .mesh_tx
        .send_replace(snapshot(1, &[("198.18.0.2", b)]));
    let message = tokio::time::timeout(WAIT, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        message,
        MeshMembers {
            members: vec![MeshMember {
                ip: "198.18.0.2".into(),
                spiffe_ids: vec![b.into()],
                source: FILE_SOURCE.into(),
            }],
            version: 1,
        }
    );
    assert_eq!(
        MeshSnapshot::from_message(&message).unwrap(),
        *snapshot(1, &[("198.18.0.2", b)]).members()
    );
    assert_eq!(agent.streams_open(), 1);

    agent
        .mesh_tx
        .send_replace(snapshot(2, &[("198.18.0.2", b), ("fd00::3", WEB_ID)]));
    let message = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let parsed = MeshSnapshot::from_message(&message).unwrap();
    assert_eq!(parsed.version, 2);
    assert_eq!(
        parsed.get(ip("fd00::3")),
        Some(&member(WEB_ID, FILE_SOURCE))
    );
    assert_eq!(agent.pushes(), 2);

    // A state that changes only the Services is not a membership change: nothing is sent.
    let members = snapshot(2, &[("198.18.0.2", b), ("fd00::3", WEB_ID)])
        .members()
        .members
        .clone();
    let service = MeshService {
        key: ServiceKey::new("demo", "web"),
        cluster_ips: vec![],
        ports: vec![],
        endpoints: vec![],
    };
    agent
        .mesh_tx
        .send_replace(Arc::new(MeshState::new(3, members, [service])));
    agent
        .mesh_tx
        .send_replace(snapshot(4, &[("198.18.0.2", b)]));
    let message = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(message.version, 4);
    assert_eq!(agent.pushes(), 3);

    // The agent stops: the stream ends with a status clients retry on.
    agent.mesh_tx = watch::channel(Arc::new(MeshState::default())).0;
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::Unavailable);
    assert_eq!(end.message(), "the agent is shutting down");
}

#[tokio::test]
async fn an_unattested_caller_is_refused() {
    let uid = this_uid();
    let agent = serve(&format!(
        "workloads:\n- {{uid: {uid}, path: /usr/bin/not-this-test, id: {WEB_ID}}}\n"
    ))
    .await;
    agent.mesh_tx.send_replace(snapshot(1, &[]));
    let refused = agent
        .mesh_client()
        .await
        .watch_members(WatchMembersRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(refused.message(), "caller could not be attested");
    assert_eq!(agent.metrics.attestation_failures.get(), 1);
    assert_eq!(agent.streams_open(), 0);
}
