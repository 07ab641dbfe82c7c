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
            EventType::Added | EventType::Deleted => now.then(|| (event.event_type, event.object.clone())),
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
    let send = |event_type: EventType, object: Value| line(event_type.as_str(), request.presentation.object(object));
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
        if let Some((event_type, object)) = request.translate(&event) {
            if tx.send(send(event_type, object)).await.is_err() {
                return;
            }
        }
    }
    // Everything up to feed.revision has been considered; the client has seen at least start.
    let mut progress = feed.revision;
    let mut client_revision = request.start_revision.max(if request.initial_events_end { feed.revision } else { 0 });
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

    fn event(event_type: EventType, revision: u64, object: Value, previous: Option<Value>) -> StoredEvent {
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
        assert_eq!((t, o["spec"]["nodeName"].as_str()), (EventType::Added, Some("node-a")));

        let moved_out = event(EventType::Modified, 6, pod("node-b", 6), Some(pod("node-a", 5)));
        let (t, o) = req.translate(&moved_out).unwrap();
        assert_eq!(t, EventType::Deleted);
        assert_eq!(o["spec"]["nodeName"], "node-a", "last matching state");
        assert_eq!(o["metadata"]["resourceVersion"], "6", "but the new version");

        let stayed = event(EventType::Modified, 7, pod("node-a", 7), Some(pod("node-a", 6)));
        assert_eq!(req.translate(&stayed).unwrap().0, EventType::Modified);
        let elsewhere = event(EventType::Modified, 8, pod("node-c", 8), Some(pod("node-b", 7)));
        assert!(req.translate(&elsewhere).is_none());
        let added_elsewhere = event(EventType::Added, 9, pod("node-b", 9), None);
        assert!(req.translate(&added_elsewhere).is_none());
    }

    #[test]
    fn other_namespaces_and_resources_are_not_seen() {
        let req = request("");
        assert!(req.translate(&event(EventType::Added, 3, pod("a", 3), None)).is_some());
        let other_ns = event_in("pods", "other", EventType::Added, 3, pod("a", 3), None);
        assert!(req.translate(&other_ns).is_none());
        let other_resource = event_in("secrets", "ns", EventType::Added, 3, pod("a", 3), None);
        assert!(req.translate(&other_resource).is_none());
    }
}
