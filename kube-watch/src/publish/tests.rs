use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use sigil_test_apiserver::{PodSpec, TestApiServer};

use super::*;
use crate::follow::WatchEvent;
use crate::{Listed, PolledFile};

const WAIT: Duration = Duration::from_secs(10);

/// The names of the pods a watch delivered, and those a file lists (one per line).
struct Names {
    /// `None`: no watch.
    pods: Option<Listed<String, String>>,
    file: Option<PolledFile<BTreeSet<String>>>,
}

/// A version and the names.
type Snapshot = (u64, BTreeSet<String>);

fn lines(contents: &[u8]) -> Result<BTreeSet<String>, std::io::Error> {
    let text = std::str::from_utf8(contents).map_err(std::io::Error::other)?;
    Ok(text.lines().map(str::to_string).collect())
}

impl State for Names {
    type Event = WatchEvent<Pod>;
    type Content = BTreeSet<String>;
    type Snapshot = Snapshot;

    fn on_event(&mut self, event: WatchEvent<Pod>) -> bool {
        match (self.pods.as_mut(), event) {
            (Some(pods), Ok(event)) => {
                pods.on_event(event, "pods", |pod| pod.metadata.name.clone())
            }
            _ => false,
        }
    }

    fn synced(&self) -> bool {
        self.pods.as_ref().is_none_or(|pods| pods.synced)
    }

    fn has_file(&self) -> bool {
        self.file.is_some()
    }

    async fn poll_file(&mut self) -> bool {
        match self.file.as_mut() {
            Some(file) => file.poll(lines).await.unwrap_or(false),
            None => false,
        }
    }

    fn content(&mut self) -> BTreeSet<String> {
        let pods = self.pods.iter().flat_map(|pods| pods.items.values());
        let file = self.file.iter().flat_map(|file| file.value());
        pods.chain(file).cloned().collect()
    }

    fn published(snapshot: &Snapshot) -> (u64, &BTreeSet<String>) {
        (snapshot.0, &snapshot.1)
    }

    fn snapshot(&self, version: u64, content: BTreeSet<String>) -> Snapshot {
        (version, content)
    }
}

fn names(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

fn replace(path: &Path, contents: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(next, path).unwrap();
}

async fn until(
    rx: &watch::Receiver<Arc<Snapshot>>,
    what: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    tokio::time::timeout(WAIT, rx.clone().wait_for(|snapshot| what(snapshot)))
        .await
        .expect("the snapshot never reached the expected state")
        .expect("the task stopped")
        .clone()
}

fn pod_events(server: &TestApiServer) -> Events<WatchEvent<Pod>> {
    let api: Api<Pod> = Api::all(server.client());
    follow::watch(api, watcher::Config::default())
}

#[tokio::test]
async fn watch_and_file_are_merged_and_each_change_is_published_once_with_the_next_version() {
    let server = TestApiServer::start().await;
    server.add_pod(&PodSpec::new("demo", "web-1", "web", "node-a"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names");
    std::fs::write(&path, "vm\n").unwrap();
    let state = Names {
        pods: Some(Listed::default()),
        file: Some(PolledFile::load(&path, lines).unwrap()),
    };
    let (stop, shutdown) = watch::channel(false);
    let rx = spawn("names", state, Some(pod_events(&server)), shutdown);

    let first = until(&rx, |(version, _)| *version > 0).await;
    assert_eq!(*first, (1, names(&["vm", "web-1"])));

    server.add_pod(&PodSpec::new("demo", "db-1", "db", "node-b"));
    let second = until(&rx, |(version, _)| *version > 1).await;
    assert_eq!(*second, (2, names(&["db-1", "vm", "web-1"])));

    // A change the content does not show is no new version; the next real one is 3.
    server.set_pod_phase("demo", "web-1", "Succeeded");
    replace(&path, "vm\n");
    server.delete_pod("demo", "db-1");
    let third = until(&rx, |(version, _)| *version > 2).await;
    assert_eq!(*third, (3, names(&["vm", "web-1"])));
    replace(&path, "vm-2\n");
    let fourth = until(&rx, |(version, _)| *version > 3).await;
    assert_eq!(*fourth, (4, names(&["vm-2", "web-1"])));

    stop.send_replace(true);
    let mut rx = rx;
    tokio::time::timeout(WAIT, async { while rx.changed().await.is_ok() {} })
        .await
        .expect("shutdown drops the snapshots' sender");
    assert_eq!(rx.borrow().0, 4);
}

#[tokio::test]
async fn nothing_is_published_before_every_watch_has_synced() {
    let server = TestApiServer::start().await;
    let events = pod_events(&server);
    server.shutdown().await;
    let state = Names {
        pods: Some(Listed::default()),
        file: None,
    };
    let (_stop, shutdown) = watch::channel(false);
    let rx = spawn("names", state, Some(events), shutdown);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(**rx.borrow(), Snapshot::default(), "version 0 until synced");
}

#[tokio::test]
async fn without_watches_the_file_is_published_at_once_and_a_dropped_shutdown_stops_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names");
    std::fs::write(&path, "vm\n").unwrap();
    let state = Names {
        pods: None,
        file: Some(PolledFile::load(&path, lines).unwrap()),
    };
    let (stop, shutdown) = watch::channel(false);
    let mut rx = spawn("names", state, None, shutdown);
    let first = until(&rx, |(version, _)| *version > 0).await;
    assert_eq!(*first, (1, names(&["vm"])));
    drop(stop);
    tokio::time::timeout(WAIT, async { while rx.changed().await.is_ok() {} })
        .await
        .expect("the task stops when the shutdown sender is dropped");
}
