use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use sigil_test_apiserver::{PodSpec, TestApiServer};

use super::*;

/// The phase of each pod by name.
#[derive(Debug, Default)]
struct Phases {
    synced: bool,
    pods: BTreeMap<String, String>,
}

impl Index<Pod> for Phases {
    fn apply(&mut self, pod: &Pod) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|status| status.phase.clone());
        self.pods.insert(name, phase.unwrap_or_default());
    }

    fn delete(&mut self, pod: &Pod) {
        self.pods
            .remove(pod.metadata.name.as_deref().unwrap_or_default());
    }

    fn set_synced(&mut self) {
        self.synced = true;
    }

    fn count(&self) -> usize {
        self.pods.len()
    }
}

async fn until(rx: &mut watch::Receiver<Phases>, what: impl Fn(&Phases) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|phases| what(phases)))
        .await
        .expect("the index never reached the expected state")
        .unwrap();
}

#[tokio::test]
async fn the_index_is_listed_whole_then_follows_each_change() {
    let server = TestApiServer::start().await;
    let mut running = PodSpec::new("demo", "web-1", "web", "node-a");
    running.phase = "Running".into();
    server.add_pod(&running);
    let (tx, mut rx) = watch::channel(Phases::default());
    let api: Api<Pod> = Api::all(server.client());
    tokio::spawn(keep(
        "pods",
        follow::watch(api, watcher::Config::default()),
        tx,
    ));
    until(&mut rx, |phases| phases.synced).await;
    assert_eq!(rx.borrow().pods["web-1"], "Running");

    server.set_pod_phase("demo", "web-1", "Succeeded");
    until(&mut rx, |phases| phases.pods["web-1"] == "Succeeded").await;
    server.add_pod(&PodSpec::new("demo", "db-1", "db", "node-b"));
    until(&mut rx, |phases| phases.count() == 2).await;
    server.delete_pod("demo", "web-1");
    until(&mut rx, |phases| !phases.pods.contains_key("web-1")).await;
    assert_eq!(rx.borrow().count(), 1);
}
