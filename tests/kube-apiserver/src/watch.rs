//! Watch streams: newline-delimited `{"type": ..., "object": ...}` events from a store feed,
//! filtered by namespace and selectors with the API server's rules (an object that stops matching
//! arrives as DELETED, one that starts matching as ADDED), periodic BOOKMARKs, the end-of-initial-
//! events bookmark of streaming lists, `timeoutSeconds`, and ERROR events carrying a 410 Status.

use std::{convert::Infallible, time::Duration};

use axum::body::{Body, Bytes};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    rest::Presentation,
    selector::{FieldSelector, LabelSelector},
    status::{ApiError, GroupResource},
    store::{Change, EventType, StoredEvent, WatchFeed},
};

/// Events buffered between the store and a slow HTTP client.
const STREAM_BUFFER: usize = 64;

/// What one watch request asked for.
pub struct WatchRequest {
    pub resource: GroupResource,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: mark the end of the initial ADDED events with a bookmark.
    pub initial_events_end: bool,
    /// `timeoutSeconds`: the stream ends after this long.
    pub timeout: Duration,
    pub bookmark_interval: Duration,
    /// The revision the client said it has seen; bookmarks are only sent beyond it.
    pub start_revision: u64,
    pub presentation: Presentation,
}

impl WatchRequest {
    fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event this watcher sees for a stored change, if any.
    fn translate(&self, event: &StoredEvent) -> Option<(EventType, Value)> {
        if event.resource != self.resource
            || self
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != event.namespace)
        {
            return None;
        }
        let now = self.matches(&event.object);
        match event.event_type {
            EventType::Added | EventType::Deleted => {
                now.then(|| (event.event_type, event.object.clone()))
            }
            EventType::Modified => {
                let before = event.previous.as_ref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some((EventType::Modified, event.object.clone())),
                    (false, true) => Some((EventType::Added, event.object.clone())),
                    (true, false) => {
                        // The API server sends the last matching state with the new version.
                        let mut gone = event.previous.clone().unwrap_or_default();
                        gone["metadata"]["resourceVersion"] = json!(event.revision.to_string());
                        Some((EventType::Deleted, gone))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

fn line(event_type: &str, object: Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&json!({ "type": event_type, "object": object }))
        .expect("watch events serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Streams the feed (or, if opening it failed with 410, a single ERROR event) as a response body.
pub fn stream(feed: Result<WatchFeed, ApiError>, request: WatchRequest) -> Body {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        match feed {
            Ok(feed) => run(feed, request, tx).await,
            Err(err) => {
                let _ = tx.send(line("ERROR", err.to_status())).await;
            }
        }
    });
    Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
}

async fn run(mut feed: WatchFeed, request: WatchRequest, tx: mpsc::Sender<Bytes>) {
    let send = |event_type: EventType, object: Value| {
        line(event_type.as_str(), request.presentation.object(object))
    };
    for object in std::mem::take(&mut feed.initial) {
        if request.matches(&object) && tx.send(send(EventType::Added, object)).await.is_err() {
            return;
        }
    }
    if request.initial_events_end {
        let bookmark = request.presentation.bookmark(feed.revision, true);
        if tx.send(line("BOOKMARK", bookmark)).await.is_err() {
            return;
        }
    }
    for event in std::mem::take(&mut feed.backlog) {
        if let Some((event_type, object)) = request.translate(&event)
            && tx.send(send(event_type, object)).await.is_err()
        {
            return;
        }
    }
    // Everything up to feed.revision has been considered; the client has seen at least start.
    let mut progress = feed.revision;
    let mut client_revision = request.start_revision.max(if request.initial_events_end {
        feed.revision
    } else {
        0
    });
    let deadline = tokio::time::sleep(request.timeout);
    tokio::pin!(deadline);
    let mut bookmark_timer = tokio::time::interval_at(
        tokio::time::Instant::now() + request.bookmark_interval,
        request.bookmark_interval,
    );
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            _ = tx.closed() => return,
            _ = bookmark_timer.tick(), if request.bookmarks => {
                if progress > client_revision {
                    client_revision = progress;
                    if tx.send(line("BOOKMARK", request.presentation.bookmark(progress, false))).await.is_err() {
                        return;
                    }
                }
            }
            change = feed.changes.recv() => match change {
                Ok(Change::Event(event)) => {
                    progress = event.revision;
                    if let Some((event_type, object)) = request.translate(&event) {
                        client_revision = event.revision;
                        if tx.send(send(event_type, object)).await.is_err() {
                            return;
                        }
                    }
                }
                // Compaction, shutdown, or this watcher fell behind the broadcast buffer: end the
                // stream like the API server closes an unresponsive watcher; the client re-watches.
                Ok(Change::Reset) | Err(RecvError::Closed) | Err(RecvError::Lagged(_)) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_in(
        resource: &str,
        namespace: &str,
        event_type: EventType,
        revision: u64,
        object: Value,
        previous: Option<Value>,
    ) -> StoredEvent {
        StoredEvent {
            revision,
            resource: GroupResource::new("", resource),
            namespace: namespace.into(),
            event_type,
            object,
            previous,
        }
    }

    fn event(
        event_type: EventType,
        revision: u64,
        object: Value,
        previous: Option<Value>,
    ) -> StoredEvent {
        event_in("pods", "ns", event_type, revision, object, previous)
    }

    fn pod(node: &str, rv: u64) -> Value {
        json!({ "metadata": { "name": "p", "namespace": "ns", "resourceVersion": rv.to_string() },
                "spec": { "nodeName": node } })
    }

    fn request(fields: &str) -> WatchRequest {
        WatchRequest {
            resource: GroupResource::new("", "pods"),
            namespace: Some("ns".into()),
            labels: LabelSelector::default(),
            fields: FieldSelector::parse(fields).unwrap(),
            bookmarks: false,
            initial_events_end: false,
            timeout: Duration::from_secs(1),
            bookmark_interval: Duration::from_secs(60),
            start_revision: 0,
            presentation: Presentation::new("v1", "Pod", false),
        }
    }

    #[test]
    fn objects_moving_in_and_out_of_the_selection() {
        let req = request("spec.nodeName=node-a");
        let moved_in = event(EventType::Modified, 5, pod("node-a", 5), Some(pod("", 4)));
        let (t, o) = req.translate(&moved_in).unwrap();
        assert_eq!(
            (t, o["spec"]["nodeName"].as_str()),
            (EventType::Added, Some("node-a"))
        );

        let moved_out = event(
            EventType::Modified,
            6,
            pod("node-b", 6),
            Some(pod("node-a", 5)),
        );
        let (t, o) = req.translate(&moved_out).unwrap();
        assert_eq!(t, EventType::Deleted);
        assert_eq!(o["spec"]["nodeName"], "node-a", "last matching state");
        assert_eq!(o["metadata"]["resourceVersion"], "6", "but the new version");

        let stayed = event(
            EventType::Modified,
            7,
            pod("node-a", 7),
            Some(pod("node-a", 6)),
        );
        assert_eq!(req.translate(&stayed).unwrap().0, EventType::Modified);
        let elsewhere = event(
            EventType::Modified,
            8,
            pod("node-c", 8),
            Some(pod("node-b", 7)),
        );
        assert!(req.translate(&elsewhere).is_none());
        let added_elsewhere = event(EventType::Added, 9, pod("node-b", 9), None);
        assert!(req.translate(&added_elsewhere).is_none());
    }

    #[test]
    fn other_namespaces_and_resources_are_not_seen() {
        let req = request("");
        assert!(
            req.translate(&event(EventType::Added, 3, pod("a", 3), None))
                .is_some()
        );
        let other_ns = event_in("pods", "other", EventType::Added, 3, pod("a", 3), None);
        assert!(req.translate(&other_ns).is_none());
        let other_resource = event_in("secrets", "ns", EventType::Added, 3, pod("a", 3), None);
        assert!(req.translate(&other_resource).is_none());
    }
}

/// Watches end to end, through the real `kube` client and `kube::runtime::watcher`.
#[cfg(test)]
mod client_tests {
    use std::time::Duration;

    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
    use kube::{
        Api, ResourceExt,
        api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
        runtime::watcher::{self, Event},
    };
    use serde_json::json;

    use crate::{
        PodSpec, ServerOptions, TestApiServer,
        test_support::{configmap, next_within, secret},
    };

    fn phase(pod: &Pod) -> Option<String> {
        pod.status.as_ref().and_then(|s| s.phase.clone())
    }

    /// Next watcher event, skipping nothing: the tests assert the exact sequence.
    async fn next_event<S>(stream: &mut S) -> Event<Pod>
    where
        S: futures::Stream<Item = Result<Event<Pod>, watcher::Error>> + Unpin,
    {
        next_within(stream)
            .await
            .expect("watcher streams do not end")
            .expect("no watcher error expected here")
    }

    fn assert_init_with(events: &[Event<Pod>], expected: &[&str]) {
        assert!(matches!(events.first(), Some(Event::Init)), "{events:?}");
        assert!(matches!(events.last(), Some(Event::InitDone)), "{events:?}");
        let applied: Vec<String> = events[1..events.len() - 1]
            .iter()
            .map(|e| match e {
                Event::InitApply(pod) => pod.name_any(),
                other => panic!("expected InitApply, got {other:?}"),
            })
            .collect();
        assert_eq!(applied, expected);
    }

    async fn initial_events<S>(stream: &mut S, count: usize) -> Vec<Event<Pod>>
    where
        S: futures::Stream<Item = Result<Event<Pod>, watcher::Error>> + Unpin,
    {
        let mut events = Vec::new();
        for _ in 0..count + 2 {
            events.push(next_event(stream).await);
        }
        events
    }

    #[tokio::test]
    async fn field_selected_watcher_sees_only_its_node() {
        let server = TestApiServer::start().await;
        server.add_pod(&PodSpec::new("prod", "a1", "web", "node-a"));
        server.add_pod(&PodSpec::new("prod", "b1", "web", "node-b"));
        let pods: Api<Pod> = Api::all(server.client());
        let mut stream = watcher::watcher(
            pods,
            watcher::Config::default().fields("spec.nodeName=node-a"),
        )
        .boxed();
        let init = initial_events(&mut stream, 1).await;
        assert_init_with(&init, &["a1"]);

        server.add_pod(&PodSpec::new("prod", "b2", "web", "node-b"));
        server.add_pod(&PodSpec::new("dev", "a2", "api", "node-a"));
        match next_event(&mut stream).await {
            Event::Apply(pod) => assert_eq!(pod.name_any(), "a2", "b2 is on another node"),
            other => panic!("expected Apply(a2), got {other:?}"),
        }
        server.set_pod_phase("prod", "b1", "Failed");
        server.set_pod_phase("dev", "a2", "Succeeded");
        match next_event(&mut stream).await {
            Event::Apply(pod) => {
                assert_eq!(pod.name_any(), "a2");
                assert_eq!(phase(&pod).as_deref(), Some("Succeeded"));
            }
            other => panic!("expected Apply(a2 Succeeded), got {other:?}"),
        }
        server.delete_pod("prod", "b1");
        server.delete_pod("prod", "a1");
        match next_event(&mut stream).await {
            Event::Delete(pod) => assert_eq!(pod.name_any(), "a1"),
            other => panic!("expected Delete(a1), got {other:?}"),
        }
    }

    #[tokio::test]
    async fn too_old_resource_version_gets_410_gone_in_the_stream() {
        let server = TestApiServer::start_with(ServerOptions {
            history_limit: 4,
            ..ServerOptions::default()
        })
        .await;
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        let start = server.resource_version();
        for i in 0..6 {
            configmaps
                .create(&PostParams::default(), &configmap(&format!("c{i}"), &[]))
                .await
                .unwrap();
        }
        let mut stream = configmaps
            .watch(&WatchParams::default(), &start.to_string())
            .await
            .unwrap()
            .boxed();
        match next_within(&mut stream).await {
            Some(Ok(WatchEvent::Error(status))) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
                assert!(
                    status.message.starts_with("too old resource version"),
                    "{}",
                    status.message
                );
            }
            other => panic!("expected an ERROR event with 410, got {other:?}"),
        }
        assert!(
            next_within(&mut stream).await.is_none(),
            "the stream ends after the error"
        );

        // A version still in the history replays what came after it.
        let recent = server.resource_version() - 2;
        let mut stream = configmaps
            .watch(&WatchParams::default(), &recent.to_string())
            .await
            .unwrap()
            .boxed();
        for expected in ["c4", "c5"] {
            match next_within(&mut stream).await {
                Some(Ok(WatchEvent::Added(cm))) => assert_eq!(cm.name_any(), expected),
                other => panic!("expected ADDED {expected}, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn watcher_relists_after_410() {
        let server = TestApiServer::start().await;
        server.add_pod(&PodSpec::new("prod", "a1", "web", "node-a"));
        let pods: Api<Pod> = Api::all(server.client());
        let mut stream = watcher::watcher(
            pods,
            watcher::Config::default().fields("spec.nodeName=node-a"),
        )
        .boxed();
        assert_init_with(&initial_events(&mut stream, 1).await, &["a1"]);

        // The watcher does not see this change, so its resourceVersion stays behind; compaction
        // then ends its stream and its re-watch from that version is too old.
        server.add_pod(&PodSpec::new("prod", "b1", "web", "node-b"));
        server.compact();
        match next_within(&mut stream).await {
            Some(Err(watcher::Error::WatchError(status))) => assert_eq!(status.code, 410),
            other => panic!("expected a 410 watch error, got {other:?}"),
        }
        assert_init_with(&initial_events(&mut stream, 1).await, &["a1"]);
        server.add_pod(&PodSpec::new("prod", "a2", "web", "node-a"));
        match next_event(&mut stream).await {
            Event::Apply(pod) => assert_eq!(pod.name_any(), "a2"),
            other => panic!("expected Apply(a2) after recovery, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn streaming_list_ends_initial_events_with_a_bookmark() {
        let server = TestApiServer::start().await;
        server.add_pod(&PodSpec::new("prod", "a1", "web", "node-a"));
        server.add_pod(&PodSpec::new("prod", "a2", "web", "node-a"));
        let pods: Api<Pod> = Api::namespaced(server.client(), "prod");
        let mut stream =
            watcher::watcher(pods, watcher::Config::default().streaming_lists()).boxed();
        assert_init_with(&initial_events(&mut stream, 2).await, &["a1", "a2"]);
        server.delete_pod("prod", "a2");
        assert!(
            matches!(next_event(&mut stream).await, Event::Delete(pod) if pod.name_any() == "a2")
        );
    }

    #[tokio::test]
    async fn label_changes_move_objects_in_and_out_of_a_watch() {
        let server = TestApiServer::start().await;
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        configmaps
            .create(&PostParams::default(), &configmap("cm", &[("app", "web")]))
            .await
            .unwrap();
        let from = server.resource_version().to_string();
        let mut stream = configmaps
            .watch(&WatchParams::default().labels("app=web"), &from)
            .await
            .unwrap()
            .boxed();
        let relabel = |app: &str| {
            let configmaps = configmaps.clone();
            let patch = json!({ "metadata": { "labels": { "app": app } } });
            async move {
                configmaps
                    .patch("cm", &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .unwrap()
            }
        };
        let moved_out = relabel("db").await;
        match next_within(&mut stream).await {
            Some(Ok(WatchEvent::Deleted(cm))) => {
                assert_eq!(cm.labels()["app"], "web", "the last state that matched");
                assert_eq!(
                    cm.resource_version(),
                    moved_out.resource_version(),
                    "at the new version"
                );
            }
            other => panic!("expected DELETED, got {other:?}"),
        }
        relabel("web").await;
        assert!(matches!(
            next_within(&mut stream).await,
            Some(Ok(WatchEvent::Added(_)))
        ));
        relabel("web2").await;
        relabel("web3").await;
        relabel("web").await;
        // Out of the selection and back in: DELETED, then nothing for web3, then ADDED.
        assert!(matches!(
            next_within(&mut stream).await,
            Some(Ok(WatchEvent::Deleted(_)))
        ));
        assert!(matches!(
            next_within(&mut stream).await,
            Some(Ok(WatchEvent::Added(_)))
        ));
    }

    #[tokio::test]
    async fn timeout_seconds_ends_the_stream() {
        let server = TestApiServer::start().await;
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        let started = tokio::time::Instant::now();
        let mut stream = secrets
            .watch(&WatchParams::default().timeout(1), "0")
            .await
            .unwrap()
            .boxed();
        assert!(next_within(&mut stream).await.is_none());
        // next_within bounds it from above; the server must not end it early either.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    }

    #[tokio::test]
    async fn bookmarks_report_progress_past_unrelated_changes() {
        let server = TestApiServer::start_with(ServerOptions {
            bookmark_interval: Duration::from_millis(200),
            ..ServerOptions::default()
        })
        .await;
        let client = server.client();
        let secrets: Api<Secret> = Api::default_namespaced(client.clone());
        let configmaps: Api<ConfigMap> = Api::default_namespaced(client);
        let from = server.resource_version().to_string();
        let mut stream = secrets
            .watch(&WatchParams::default(), &from)
            .await
            .unwrap()
            .boxed();
        let mut without_bookmarks = secrets
            .watch(&WatchParams::default().disable_bookmarks(), &from)
            .await
            .unwrap()
            .boxed();
        configmaps
            .create(&PostParams::default(), &configmap("other", &[]))
            .await
            .unwrap();
        match next_within(&mut stream).await {
            Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                assert_eq!(
                    bookmark.metadata.resource_version,
                    server.resource_version().to_string()
                );
                assert_eq!(bookmark.types.kind, "Secret");
            }
            other => panic!("expected a BOOKMARK, got {other:?}"),
        }
        secrets
            .create(&PostParams::default(), &secret("s", "v"))
            .await
            .unwrap();
        assert!(matches!(
            next_within(&mut stream).await,
            Some(Ok(WatchEvent::Added(_)))
        ));
        assert!(
            matches!(
                next_within(&mut without_bookmarks).await,
                Some(Ok(WatchEvent::Added(_)))
            ),
            "no bookmarks unless allowWatchBookmarks"
        );
    }

    #[tokio::test]
    async fn watch_from_zero_starts_with_synthetic_adds() {
        let server = TestApiServer::start().await;
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        secrets
            .create(&PostParams::default(), &secret("existing", "v"))
            .await
            .unwrap();
        let mut stream = secrets
            .watch(&WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        match next_within(&mut stream).await {
            Some(Ok(WatchEvent::Added(s))) => assert_eq!(s.name_any(), "existing"),
            other => panic!("expected a synthetic ADDED, got {other:?}"),
        }
        let listed = secrets.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 1);
    }
}
