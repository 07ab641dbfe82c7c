use super::super::test_support::{FakeProc, FakeProcess};
use super::*;
use k8s_openapi::api::core::v1::{PodSpec as CorePodSpec, PodStatus};
use kube::api::ObjectMeta;
use sigil_test_apiserver::{PodSpec, TestApiServer};
use tokio::time::Instant;

const NODE: &str = "node-a";

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn pod(uid: &str, namespace: &str, name: &str, sa: Option<&str>, phase: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            uid: Some(uid.into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(CorePodSpec {
            service_account_name: sa.map(Into::into),
            node_name: Some(NODE.into()),
            ..CorePodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            ..PodStatus::default()
        }),
    }
}

fn synced(pods: &[Pod]) -> NodePods {
    let mut node_pods = NodePods {
        synced: true,
        ..NodePods::default()
    };
    pods.iter().for_each(|p| node_pods.apply(p));
    node_pods
}

fn spiffe(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// Starts `watch_node_pods` for [`NODE`] against the server and waits for its first sync.
async fn watched(server: &TestApiServer) -> watch::Receiver<NodePods> {
    let (tx, rx) = watch::channel(NodePods::default());
    tokio::spawn(watch_node_pods(server.client(), NODE.into(), tx));
    until(&rx, |pods| pods.synced).await;
    rx
}

async fn until(rx: &watch::Receiver<NodePods>, what: impl Fn(&NodePods) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), rx.clone().wait_for(|p| what(p)))
        .await
        .expect("the node's pods never reached the expected state")
        .unwrap();
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap()
}

#[tokio::test]
async fn attests_a_pod_from_the_watch_until_it_finishes() {
    let server = TestApiServer::start().await;
    let mut web = PodSpec::new("demo", "web-1", "web", NODE);
    web.labels.insert("app".into(), "web".into());
    let created = server.add_pod(&web);
    server.add_pod(&PodSpec::new("demo", "db-1", "db", "node-b"));
    let pods = watched(&server).await;
    assert_eq!(
        pods.borrow().service_accounts(),
        BTreeSet::from([("demo".to_string(), "web".to_string())])
    );

    let proc = FakeProc::new();
    let process = FakeProcess::in_pod(4242, 1337, &uid_of(&created));
    proc.add(&process);
    let attestor = KubernetesAttestor::new(proc.procfs(), td(), pods.clone());
    assert_eq!(
        attestor.attest(&process.caller()).await.unwrap(),
        Workload {
            id: spiffe("spiffe://cluster.local/ns/demo/sa/web"),
            pod: Some(PodRef {
                namespace: "demo".into(),
                name: "web-1".into(),
                uid: uid_of(&created),
            }),
            labels: web.labels.clone(),
        }
    );

    server.set_pod_phase("demo", "web-1", "Succeeded");
    until(&pods, |p| p.service_accounts().is_empty()).await;
    let refused = attestor.attest(&process.caller()).await;
    assert!(
        matches!(&refused, Err(AttestError::PodFinished { namespace, name, phase })
                if namespace == "demo" && name == "web-1" && phase == "Succeeded"),
        "{refused:?}"
    );

    server.delete_pod("demo", "web-1");
    until(&pods, |p| p.is_empty()).await;
    tokio::time::pause();
    let refused = attestor.attest(&process.caller()).await;
    assert!(
        matches!(&refused, Err(AttestError::PodNotFound { uid }) if *uid == uid_of(&created)),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_pod_on_another_node_is_not_found_after_the_wait() {
    let server = TestApiServer::start().await;
    let elsewhere = server.add_pod(&PodSpec::new("demo", "web-1", "web", "node-b"));
    let pods = watched(&server).await;
    assert!(pods.borrow().is_empty());

    let proc = FakeProc::new();
    let process = FakeProcess::in_pod(4242, 1337, &uid_of(&elsewhere));
    proc.add(&process);
    let attestor = KubernetesAttestor::new(proc.procfs(), td(), pods);
    // From here on time only moves when nothing else can run: the wait is exactly POD_WAIT.
    tokio::time::pause();
    let started = Instant::now();
    let refused = attestor.attest(&process.caller()).await;
    assert!(
        matches!(&refused, Err(AttestError::PodNotFound { uid }) if *uid == uid_of(&elsewhere)),
        "{refused:?}"
    );
    // Timers fire on whole milliseconds, and pausing left the clock between two.
    let waited = started.elapsed();
    assert!(
        waited >= POD_WAIT && waited <= POD_WAIT + Duration::from_millis(1),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_pod_listed_after_the_agent_started_is_waited_for() {
    let server = TestApiServer::start().await;
    let created = server.add_pod(&PodSpec::new("demo", "web-1", "web", NODE));
    let proc = FakeProc::new();
    let process = FakeProcess::in_pod(4242, 1337, &uid_of(&created));
    proc.add(&process);

    // The caller connects before the agent's pod watch has even listed the node.
    let (tx, rx) = watch::channel(NodePods::default());
    let attestor = KubernetesAttestor::new(proc.procfs(), td(), rx);
    let caller = process.caller();
    let attesting = tokio::spawn(async move { attestor.attest(&caller).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!attesting.is_finished());
    tokio::spawn(watch_node_pods(server.client(), NODE.into(), tx));

    let workload = attesting.await.unwrap().unwrap();
    assert_eq!(workload.id, spiffe("spiffe://cluster.local/ns/demo/sa/web"));
}

#[tokio::test(start_paused = true)]
async fn a_pod_delivered_within_the_wait_is_found_and_one_after_it_is_not() {
    let pod_uid = "8d1f0c2e-41a4-4e5e-9b5d-0f7a8d3c1b2a";
    let proc = FakeProc::new();
    let process = FakeProcess::in_pod(4242, 1337, pod_uid);
    proc.add(&process);
    let (tx, rx) = watch::channel(synced(&[]));
    let attestor = KubernetesAttestor::new(proc.procfs(), td(), rx);

    let late = pod(pod_uid, "demo", "web-1", Some("web"), "Running");
    let deliver_after = |delay: Duration| {
        let tx = tx.clone();
        let late = late.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            tx.send_modify(|pods| pods.apply(&late));
        })
    };

    let started = Instant::now();
    let too_late = deliver_after(POD_WAIT + Duration::from_millis(1));
    let refused = attestor.attest(&process.caller()).await;
    assert!(
        matches!(refused, Err(AttestError::PodNotFound { .. })),
        "{refused:?}"
    );
    assert_eq!(started.elapsed(), POD_WAIT);

    too_late.await.unwrap();
    tx.send_modify(|pods| pods.delete(&late));
    let started = Instant::now();
    deliver_after(POD_WAIT - Duration::from_millis(500));
    let workload = attestor.attest(&process.caller()).await.unwrap();
    assert_eq!(workload.id, spiffe("spiffe://cluster.local/ns/demo/sa/web"));
    assert_eq!(started.elapsed(), POD_WAIT - Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn an_unsynced_or_stopped_watch_is_reported_as_such() {
    let pod_uid = "8d1f0c2e-41a4-4e5e-9b5d-0f7a8d3c1b2a";
    let proc = FakeProc::new();
    let process = FakeProcess::in_pod(4242, 1337, pod_uid);
    proc.add(&process);

    let (tx, rx) = watch::channel(NodePods::default());
    let attestor = KubernetesAttestor::new(proc.procfs(), td(), rx);
    let refused = attestor.attest(&process.caller()).await;
    assert!(
        matches!(refused, Err(AttestError::PodsNotSynced { .. })),
        "{refused:?}"
    );

    drop(tx);
    let started = Instant::now();
    let refused = attestor.attest(&process.caller()).await;
    assert!(
        matches!(refused, Err(AttestError::PodWatchClosed { .. })),
        "{refused:?}"
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_pid_reused_while_the_pod_was_looked_up_is_refused() {
    let pod_uid = "8d1f0c2e-41a4-4e5e-9b5d-0f7a8d3c1b2a";
    let proc = FakeProc::new();
    let mut process = FakeProcess::in_pod(4242, 1337, pod_uid);
    proc.add(&process);
    let (_tx, rx) = watch::channel(synced(&[pod(pod_uid, "demo", "web-1", None, "Running")]));
    let attestor = KubernetesAttestor::new(proc.procfs(), td(), rx);

    let observed = attestor.observe(&process.caller()).unwrap();
    // The caller exits and another process (same uid, same pod even) gets its PID.
    process.start_time += 250;
    proc.add(&process);
    let workload = attestor.identify(&observed.container).await.unwrap();
    // A pod without a service account name runs as "default".
    assert_eq!(
        workload.id,
        spiffe("spiffe://cluster.local/ns/demo/sa/default")
    );
    let refused = attestor.procfs.confirm(&observed.process);
    assert!(
        matches!(refused, Err(AttestError::PidReused(4242))),
        "{refused:?}"
    );

    // Exiting between observation and confirmation is refused too.
    let observed = attestor.observe(&process.caller()).unwrap();
    proc.remove(4242);
    let refused = attestor.procfs.confirm(&observed.process);
    assert!(
        matches!(refused, Err(AttestError::ProcessGone(4242))),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pid_reused_since_the_connection_was_accepted_is_refused() {
    let (attacker_pod, victim_pod) = (
        "11111111-41a4-4e5e-9b5d-0f7a8d3c1b2a",
        "22222222-41a4-4e5e-9b5d-0f7a8d3c1b2a",
    );
    let proc = FakeProc::new();
    let (_tx, rx) = watch::channel(synced(&[
        pod(
            attacker_pod,
            "demo",
            "attacker",
            Some("attacker"),
            "Running",
        ),
        pod(victim_pod, "demo", "victim", Some("victim"), "Running"),
    ]));
    let attestor = KubernetesAttestor::new(proc.procfs(), td(), rx);

    // The attacker connected; its start time was recorded at accept. Then it forked, the
    // parent exited, and a process of the victim pod (same uid) got the PID.
    let attacker = FakeProcess::in_pod(4242, 1337, attacker_pod);
    let connected = attacker.caller();
    let victim = FakeProcess {
        start_time: attacker.start_time + 9_000,
        ..FakeProcess::in_pod(4242, 1337, victim_pod)
    };
    proc.add(&victim);
    let refused = attestor.attest(&connected).await;
    assert!(
        matches!(refused, Err(AttestError::PidReused(4242))),
        "{refused:?}"
    );
    // Not recorded at accept: refused, never attested as whoever holds the PID now.
    let unrecorded = Caller {
        start_time_at_connect: None,
        ..connected
    };
    let refused = attestor.attest(&unrecorded).await;
    assert!(
        matches!(refused, Err(AttestError::NotRecordedAtConnect(4242))),
        "{refused:?}"
    );
    // The victim's own connection, recorded with its own start time, is attested.
    let workload = attestor.attest(&victim.caller()).await.unwrap();
    assert_eq!(
        workload.id,
        spiffe("spiffe://cluster.local/ns/demo/sa/victim")
    );
}

#[tokio::test(start_paused = true)]
async fn processes_that_are_not_pod_containers_are_refused() {
    let pod_uid = "8d1f0c2e-41a4-4e5e-9b5d-0f7a8d3c1b2a";
    let proc = FakeProc::new();
    let (_tx, rx) = watch::channel(synced(&[pod(pod_uid, "demo", "web-1", None, "Running")]));
    let attestor = KubernetesAttestor::new(proc.procfs(), td(), rx);

    let host = FakeProcess::host(1, 0);
    proc.add(&host);
    let refused = attestor.attest(&host.caller()).await;
    assert!(
        matches!(refused, Err(AttestError::NoPodUid { pid: 1 })),
        "{refused:?}"
    );

    let gone = FakeProcess::in_pod(777, 1337, pod_uid);
    let refused = attestor.attest(&gone.caller()).await;
    assert!(
        matches!(refused, Err(AttestError::ProcessGone(777))),
        "{refused:?}"
    );

    let unseen = Caller {
        pid: 0,
        uid: 1337,
        gid: 1337,
        start_time_at_connect: None,
    };
    let refused = attestor.attest(&unseen).await;
    assert!(matches!(refused, Err(AttestError::NoPid)), "{refused:?}");

    // A different user reusing the PID of a pod process: uid no longer what connected.
    let reused = FakeProcess::in_pod(4242, 1337, pod_uid);
    proc.add(&reused);
    let mut caller = reused.caller();
    caller.uid = 1000;
    let refused = attestor.attest(&caller).await;
    assert!(
        matches!(
            refused,
            Err(AttestError::UidChanged {
                pid: 4242,
                peer: 1000,
                now: 1337
            })
        ),
        "{refused:?}"
    );
}

#[test]
fn node_pods_follow_applies_and_deletes_by_uid() {
    let mut pods = synced(&[
        pod("uid-1", "demo", "web-1", Some("web"), "Running"),
        pod("uid-2", "demo", "web-2", Some("web"), "Pending"),
        pod("uid-3", "demo", "job-1", Some("batch"), "Failed"),
        pod("uid-4", "other", "x", None, "Running"),
    ]);
    assert_eq!(pods.len(), 4);
    assert_eq!(
        pods.service_accounts(),
        BTreeSet::from([
            ("demo".to_string(), "web".to_string()),
            ("other".to_string(), "default".to_string()),
        ])
    );
    pods.apply(&pod("uid-4", "other", "x", None, "Succeeded"));
    pods.delete(&pod("uid-1", "demo", "web-1", Some("web"), "Running"));
    assert_eq!(
        pods.get("uid-4").unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    assert!(pods.get("uid-1").is_none());
    assert_eq!(
        pods.service_accounts(),
        BTreeSet::from([("demo".to_string(), "web".to_string())])
    );
    // A recreated pod of the same name is a different UID, not an update.
    pods.apply(&pod("uid-5", "demo", "web-2", Some("web"), "Running"));
    assert_eq!(pods.len(), 4);
}
