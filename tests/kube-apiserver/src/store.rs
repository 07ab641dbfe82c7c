//! The object store: every object of every resource, in memory, under one global
//! resourceVersion counter (etcd's revision); a bounded history of change events that feeds watches
//! and lets paginated lists read a consistent snapshot; and the write rules of the API server's
//! generic registry (server-set metadata, optimistic concurrency, preconditions, the status
//! subresource, finalizers, no-op updates that write nothing).

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::{
    resources::{self, Origin, ResourceInfo},
    status::{ApiError, FieldCause, GroupResource},
    validation::{
        check_dns1123_label, check_dns1123_subdomain, check_label_value, check_qualified_name,
    },
};

/// `(namespace, name)`; the namespace is empty for cluster-scoped objects. Ordered like etcd keys.
pub type ObjectKey = (String, String);

/// Revision of an empty store, so that "0" keeps its special "any version" meaning.
const INITIAL_REVISION: u64 = 1;

/// Attempts to find a free name for `generateName` before giving up with `AlreadyExists`.
const GENERATE_NAME_ATTEMPTS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct StoredEvent {
    pub revision: u64,
    pub resource: GroupResource,
    pub namespace: String,
    pub event_type: EventType,
    /// The object at this revision; for `Deleted`, its last state carrying the deletion revision.
    pub object: Value,
    /// The object before this revision (`None` for `Added`).
    pub previous: Option<Value>,
}

/// What watch streams receive from the store.
#[derive(Clone, Debug)]
pub enum Change {
    Event(Arc<StoredEvent>),
    /// Every open watch must end (compaction or shutdown); clients re-watch.
    Reset,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions {
    /// `dryRun=All`: validate and answer, persist nothing.
    pub dry_run: bool,
    /// Keep the status the writer supplied, as the kubelet or a controller would write it; REST
    /// writes to the main resource never do.
    pub keep_status: bool,
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteTarget {
    Main,
    /// The `/status` subresource: only `.status` changes.
    Status,
}

/// resourceVersion semantics of a list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListRead {
    /// No resourceVersion, or "0": the current state.
    Latest,
    /// The current state, which must be at least this revision.
    NotOlderThan(u64),
    /// The state exactly at this revision, rebuilt from history.
    Exact(u64),
}

pub struct ListQuery<'a> {
    pub namespace: Option<&'a str>,
    pub read: ListRead,
    /// Resume after this key (from a continue token; `read` is then `Exact`).
    pub after: Option<ObjectKey>,
    pub limit: Option<usize>,
    pub filter: &'a dyn Fn(&Value) -> bool,
    /// Whether `filter` can reject objects (the API server then omits remainingItemCount).
    pub filtered: bool,
}

pub struct ListPage {
    pub items: Vec<Value>,
    pub revision: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

/// The opaque `continue` value, in the API server's format: base64url JSON naming the snapshot
/// revision and the key to start at.
#[derive(Debug, PartialEq, Eq)]
pub struct ContinueToken {
    pub revision: u64,
    pub after: ObjectKey,
}

#[derive(Serialize, Deserialize)]
struct ContinueWire {
    v: String,
    rv: u64,
    start: String,
}

const CONTINUE_VERSION: &str = "meta.k8s.io/v1";

impl ContinueToken {
    pub fn encode(&self) -> String {
        let (namespace, name) = &self.after;
        let key = if namespace.is_empty() {
            name.clone()
        } else {
            format!("{namespace}/{name}")
        };
        let wire = ContinueWire {
            v: CONTINUE_VERSION.into(),
            rv: self.revision,
            start: format!("{key}\u{0}"),
        };
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wire).expect("continue token serializes"))
    }

    pub fn decode(token: &str) -> Result<Self, ApiError> {
        let invalid = |why: &str| ApiError::BadRequest(format!("invalid continue token: {why}"));
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim_end_matches('='))
            .map_err(|e| invalid(&e.to_string()))?;
        let wire: ContinueWire =
            serde_json::from_slice(&bytes).map_err(|e| invalid(&e.to_string()))?;
        if wire.v != CONTINUE_VERSION {
            return Err(invalid(
                "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
            ));
        }
        let key = wire.start.trim_end_matches('\u{0}');
        let after = match key.split_once('/') {
            Some((namespace, name)) => (namespace.to_string(), name.to_string()),
            None => (String::new(), key.to_string()),
        };
        Ok(Self {
            revision: wire.rv,
            after,
        })
    }
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchStart {
    /// Every change after this revision.
    After(u64),
    /// From now; `initial` first replays the current objects as synthetic ADDED events.
    Now { initial: bool },
}

/// Everything a new watch stream needs, taken atomically so nothing falls between.
pub struct WatchFeed {
    /// Current objects to send as ADDED (for `WatchStart::Now { initial: true }`).
    pub initial: Vec<Value>,
    /// Retained events after the start revision, of this resource and namespace.
    pub backlog: Vec<Arc<StoredEvent>>,
    /// The store revision at subscription: `initial` and `backlog` cover everything up to it,
    /// `changes` delivers everything after it.
    pub revision: u64,
    pub changes: broadcast::Receiver<Change>,
}

/// Outcome of a delete.
pub struct Deletion {
    pub object: Value,
    /// Finalizers keep the object; only `deletionTimestamp` was set.
    pub pending: bool,
}

/// Delete preconditions (`DeleteOptions.preconditions`).
#[derive(Clone, Debug, Default)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

struct State {
    revision: u64,
    objects: BTreeMap<GroupResource, BTreeMap<ObjectKey, Value>>,
    history: VecDeque<Arc<StoredEvent>>,
    history_limit: usize,
    /// Every event after this revision is still in `history`.
    compacted_through: u64,
    learned_kinds: HashMap<GroupResource, String>,
    changes: broadcast::Sender<Change>,
}

/// The shared store; all operations are synchronous and atomic under one lock.
pub struct Store {
    state: Mutex<State>,
}

/// A random (version 4) UUID, as Kubernetes assigns to `metadata.uid`.
pub fn new_uid() -> String {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("system randomness available");
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The five-character suffix of `generateName`, from the API server's alphabet (no vowels).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut bytes = [0u8; 5];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("system randomness available");
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Now, in the API's timestamp format (RFC 3339, whole seconds).
pub fn now_timestamp() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("timestamps serialize")
}

pub fn meta_str<'a>(object: &'a Value, field: &str) -> &'a str {
    object["metadata"][field].as_str().unwrap_or_default()
}

fn metadata_mut(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::BadRequest("the object must be a JSON object".into()))?;
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    meta.as_object_mut()
        .ok_or_else(|| ApiError::BadRequest("metadata must be a JSON object".into()))
}

fn namespace_mismatch() -> ApiError {
    ApiError::BadRequest(
        "the namespace of the provided object does not match the namespace sent on the request"
            .into(),
    )
}

/// Puts the request's namespace on the object, or rejects a different one in the body.
fn place_in_namespace(meta: &mut Map<String, Value>, namespace: &str) -> Result<(), ApiError> {
    if namespace.is_empty() {
        meta.remove("namespace");
        return Ok(());
    }
    match meta.get("namespace").and_then(Value::as_str) {
        Some(body_ns) if !body_ns.is_empty() && body_ns != namespace => Err(namespace_mismatch()),
        _ => {
            meta.insert("namespace".into(), json!(namespace));
            Ok(())
        }
    }
}

fn invalid(info: &ResourceInfo, name: &str, causes: Vec<FieldCause>) -> ApiError {
    ApiError::Invalid {
        group: info.resource.group.clone(),
        kind: info.kind.clone(),
        qualified_kind: info.qualified_kind(),
        name: name.to_string(),
        causes,
    }
}

/// Name and label syntax, as the registry validates every write.
fn validate(info: &ResourceInfo, object: &Value) -> Result<(), ApiError> {
    let name = meta_str(object, "name");
    let mut causes = Vec::new();
    let name_check = if info.name_is_label() {
        check_dns1123_label(name)
    } else {
        check_dns1123_subdomain(name)
    };
    if let Err(why) = name_check {
        causes.push(FieldCause::invalid("metadata.name", name, &why));
    }
    if let Some(labels) = object["metadata"]["labels"].as_object() {
        for (key, value) in labels {
            if let Err(why) = check_qualified_name(key) {
                causes.push(FieldCause::invalid("metadata.labels", key, &why));
            }
            match value.as_str() {
                Some(v) => {
                    if let Err(why) = check_label_value(v) {
                        causes.push(FieldCause::invalid(
                            &format!("metadata.labels[{key}]"),
                            v,
                            &why,
                        ));
                    }
                }
                None => causes.push(FieldCause::invalid(
                    &format!("metadata.labels[{key}]"),
                    &value.to_string(),
                    "label values must be strings",
                )),
            }
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(info, name, causes))
    }
}

/// Secrets: `stringData` is write-only and lands base64-encoded in `data`; `type` defaults to Opaque.
fn normalize_secret(object: &mut Value) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    if let Some(Value::Object(string_data)) = map.remove("stringData") {
        let data = map.entry("data").or_insert_with(|| json!({}));
        if !data.is_object() {
            *data = json!({});
        }
        for (key, value) in string_data {
            let text = value
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            data[&key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
        }
    }
    if map
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .is_empty()
    {
        map.insert("type".into(), json!("Opaque"));
    }
}

/// Everything but metadata and status: what `metadata.generation` counts changes of.
fn spec_part(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        for field in ["metadata", "status", "kind", "apiVersion"] {
            map.remove(field);
        }
    }
    copy
}

fn has_finalizers(object: &Value) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

fn set_resource_version(object: &mut Value, revision: u64) {
    object["metadata"]["resourceVersion"] = json!(revision.to_string());
}

pub fn parse_resource_version(value: &str) -> Result<u64, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("invalid resource version {value:?}")))
}

impl State {
    fn resolve(&self, resource: &GroupResource) -> ResourceInfo {
        if let Some(info) = resources::builtin_info(resource) {
            return info;
        }
        let crd_name = format!("{}.{}", resource.resource, resource.group);
        if let Some(crd) = self
            .objects
            .get(&resources::crd_resource())
            .and_then(|crds| crds.get(&(String::new(), crd_name)))
        {
            return resources::from_crd(resource, crd);
        }
        resources::unregistered(
            resource,
            self.learned_kinds.get(resource).map(String::as_str),
        )
    }

    fn get(&self, resource: &GroupResource, key: &ObjectKey) -> Option<&Value> {
        self.objects
            .get(resource)
            .and_then(|objects| objects.get(key))
    }

    fn commit(
        &mut self,
        resource: &GroupResource,
        key: &ObjectKey,
        event_type: EventType,
        mut object: Value,
        previous: Option<Value>,
    ) -> Value {
        self.revision += 1;
        set_resource_version(&mut object, self.revision);
        let objects = self.objects.entry(resource.clone()).or_default();
        match event_type {
            EventType::Deleted => {
                objects.remove(key);
            }
            EventType::Added | EventType::Modified => {
                objects.insert(key.clone(), object.clone());
            }
        }
        let event = Arc::new(StoredEvent {
            revision: self.revision,
            resource: resource.clone(),
            namespace: key.0.clone(),
            event_type,
            object: object.clone(),
            previous,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted_through = dropped.revision;
            }
        }
        // No receiver just means nobody is watching.
        let _ = self.changes.send(Change::Event(event));
        object
    }

    fn too_old(&self, revision: u64) -> ApiError {
        ApiError::Expired(format!(
            "too old resource version: {revision} ({})",
            self.compacted_through + 1
        ))
    }

    fn check_not_future(&self, revision: u64) -> Result<(), ApiError> {
        if revision > self.revision {
            return Err(ApiError::TooLargeResourceVersion {
                requested: revision,
                current: self.revision,
            });
        }
        Ok(())
    }

    /// The objects of `resource` as they were at `revision`, undoing newer events.
    fn snapshot(
        &self,
        resource: &GroupResource,
        revision: u64,
    ) -> Result<BTreeMap<ObjectKey, Value>, ApiError> {
        self.check_not_future(revision)?;
        if revision < self.compacted_through {
            return Err(self.too_old(revision));
        }
        let mut objects = self.objects.get(resource).cloned().unwrap_or_default();
        for event in self
            .history
            .iter()
            .rev()
            .take_while(|e| e.revision > revision)
        {
            if event.resource != *resource {
                continue;
            }
            let key = (
                event.namespace.clone(),
                meta_str(&event.object, "name").to_string(),
            );
            // Undo the event: an addition disappears, anything else restores what was before.
            match &event.previous {
                None => {
                    objects.remove(&key);
                }
                Some(previous) => {
                    objects.insert(key, previous.clone());
                }
            }
        }
        Ok(objects)
    }

    fn create(
        &mut self,
        info: &ResourceInfo,
        namespace: &str,
        mut object: Value,
        opts: WriteOptions,
    ) -> Result<Value, ApiError> {
        let resource = &info.resource;
        let meta = metadata_mut(&mut object)?;
        place_in_namespace(meta, namespace)?;
        if meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|rv| !rv.is_empty())
        {
            // etcd3 storage refuses this; the API server reports it as an internal error.
            return Err(ApiError::Internal(
                "resourceVersion should not be set on objects to be created".into(),
            ));
        }
        let given_name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let generate_name = meta
            .get("generateName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if given_name.is_empty() && generate_name.is_empty() {
            return Err(invalid(
                info,
                "",
                vec![FieldCause::required(
                    "metadata.name",
                    "name or generateName is required",
                )],
            ));
        }
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert("creationTimestamp".into(), now_timestamp());
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        if info.tracks_generation {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }
        if resource == &GroupResource::new("", "secrets") {
            normalize_secret(&mut object);
        }
        if !opts.keep_status {
            match (resource.group.as_str(), resource.resource.as_str()) {
                ("", "pods") => object["status"] = json!({ "phase": "Pending" }),
                ("", "namespaces") => object["status"] = json!({ "phase": "Active" }),
                _ if info.status_subresource => {
                    if let Some(map) = object.as_object_mut() {
                        map.remove("status");
                    }
                }
                _ => {}
            }
        }
        let mut attempts = if given_name.is_empty() {
            GENERATE_NAME_ATTEMPTS
        } else {
            1
        };
        let name = loop {
            let candidate = if given_name.is_empty() {
                format!("{generate_name}{}", random_suffix())
            } else {
                given_name.clone()
            };
            attempts -= 1;
            let taken = self
                .get(resource, &(namespace.to_string(), candidate.clone()))
                .is_some();
            if !taken {
                break candidate;
            }
            if attempts == 0 {
                return Err(ApiError::AlreadyExists {
                    resource: resource.clone(),
                    name: candidate,
                });
            }
        };
        object["metadata"]["name"] = json!(name);
        validate(info, &object)?;
        if opts.dry_run {
            return Ok(object);
        }
        if info.origin == Origin::Unregistered
            && let Some(kind) = object["kind"].as_str()
        {
            self.learned_kinds
                .insert(resource.clone(), kind.to_string());
        }
        Ok(self.commit(
            resource,
            &(namespace.to_string(), name),
            EventType::Added,
            object,
            None,
        ))
    }

    fn update(
        &mut self,
        info: &ResourceInfo,
        key: &ObjectKey,
        current: Value,
        mut desired: Value,
        target: WriteTarget,
        opts: WriteOptions,
    ) -> Result<Value, ApiError> {
        let resource = &info.resource;
        let (namespace, name) = key;
        let meta = metadata_mut(&mut desired)?;
        match meta.get("name").and_then(Value::as_str).unwrap_or_default() {
            "" => {
                meta.insert("name".into(), json!(name));
            }
            body_name if body_name != name => {
                return Err(ApiError::BadRequest(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        place_in_namespace(meta, namespace)?;
        let current_rv = meta_str(&current, "resourceVersion").to_string();
        match meta.get("resourceVersion").and_then(Value::as_str) {
            Some(rv) if !rv.is_empty() && rv != current_rv => {
                return Err(ApiError::modified(resource, name));
            }
            _ => {}
        }
        let current_uid = meta_str(&current, "uid").to_string();
        match meta.get("uid").and_then(Value::as_str) {
            Some(uid) if !uid.is_empty() && uid != current_uid => {
                return Err(ApiError::Conflict {
                    resource: resource.clone(),
                    name: name.clone(),
                    detail: format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {current_uid}"
                    ),
                });
            }
            _ => {}
        }
        // Server-owned metadata cannot be changed by clients.
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "generateName",
        ] {
            match current["metadata"].get(field) {
                Some(value) => meta.insert(field.into(), value.clone()),
                None => meta.remove(field),
            };
        }
        meta.insert("resourceVersion".into(), json!(current_rv));
        desired["kind"] = current["kind"].clone();

        match target {
            WriteTarget::Status => {
                let mut only_status = current.clone();
                match desired.get("status") {
                    Some(status) => only_status["status"] = status.clone(),
                    None => {
                        if let Some(map) = only_status.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
                only_status["apiVersion"] = desired["apiVersion"].clone();
                desired = only_status;
            }
            WriteTarget::Main if info.status_subresource && !opts.keep_status => {
                match current.get("status") {
                    Some(status) => desired["status"] = status.clone(),
                    None => {
                        if let Some(map) = desired.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
            }
            WriteTarget::Main => {}
        }
        if resource == &GroupResource::new("", "secrets") {
            normalize_secret(&mut desired);
        }
        validate(info, &desired)?;
        if info.tracks_generation && spec_part(&desired) != spec_part(&current) {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            desired["metadata"]["generation"] = json!(generation);
        }
        if desired == current {
            // The registry skips writes that change nothing: no new resourceVersion, no event.
            return Ok(current);
        }
        if opts.dry_run {
            return Ok(desired);
        }
        let terminating = current["metadata"].get("deletionTimestamp").is_some();
        if terminating && !has_finalizers(&desired) {
            // The last finalizer is gone: the pending deletion completes.
            return Ok(self.commit(resource, key, EventType::Deleted, desired, Some(current)));
        }
        Ok(self.commit(resource, key, EventType::Modified, desired, Some(current)))
    }

    fn delete(
        &mut self,
        info: &ResourceInfo,
        key: &ObjectKey,
        preconditions: &Preconditions,
        dry_run: bool,
    ) -> Result<Deletion, ApiError> {
        let resource = &info.resource;
        let current = self
            .get(resource, key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, &key.1))?;
        let failed = |detail: String| ApiError::Conflict {
            resource: resource.clone(),
            name: key.1.clone(),
            detail: format!("Precondition failed: {detail}"),
        };
        if let Some(uid) = &preconditions.uid {
            let actual = meta_str(&current, "uid");
            if uid != actual {
                return Err(failed(format!(
                    "UID in precondition: {uid}, UID in object meta: {actual}"
                )));
            }
        }
        if let Some(rv) = &preconditions.resource_version {
            let actual = meta_str(&current, "resourceVersion");
            if rv != actual {
                return Err(failed(format!(
                    "ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"
                )));
            }
        }
        if has_finalizers(&current) {
            if current["metadata"].get("deletionTimestamp").is_some() || dry_run {
                return Ok(Deletion {
                    object: current,
                    pending: true,
                });
            }
            let mut terminating = current.clone();
            terminating["metadata"]["deletionTimestamp"] = now_timestamp();
            terminating["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            let object = self.commit(
                resource,
                key,
                EventType::Modified,
                terminating,
                Some(current),
            );
            return Ok(Deletion {
                object,
                pending: true,
            });
        }
        if dry_run {
            return Ok(Deletion {
                object: current,
                pending: false,
            });
        }
        let object = self.commit(
            resource,
            key,
            EventType::Deleted,
            current.clone(),
            Some(current),
        );
        Ok(Deletion {
            object,
            pending: false,
        })
    }
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let history_limit = history_limit.max(1);
        let (changes, _) = broadcast::channel(history_limit.max(16));
        Self {
            state: Mutex::new(State {
                revision: INITIAL_REVISION,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit,
                compacted_through: 0,
                learned_kinds: HashMap::new(),
                changes,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take the whole double down with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn resolve(&self, resource: &GroupResource) -> ResourceInfo {
        self.state().resolve(resource)
    }

    pub fn revision(&self) -> u64 {
        self.state().revision
    }

    /// Stored `CustomResourceDefinition` objects (for discovery).
    pub fn crds(&self) -> Vec<Value> {
        self.state()
            .objects
            .get(&resources::crd_resource())
            .map(|crds| crds.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, resource: &GroupResource, key: &ObjectKey) -> Result<Value, ApiError> {
        self.state()
            .get(resource, key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, &key.1))
    }

    pub fn list(
        &self,
        resource: &GroupResource,
        query: &ListQuery<'_>,
    ) -> Result<ListPage, ApiError> {
        let state = self.state();
        let empty = BTreeMap::new();
        let current = || Cow::Borrowed(state.objects.get(resource).unwrap_or(&empty));
        let (objects, revision) = match query.read {
            ListRead::Latest => (current(), state.revision),
            ListRead::NotOlderThan(revision) => {
                state.check_not_future(revision)?;
                (current(), state.revision)
            }
            ListRead::Exact(revision) => {
                let snapshot = state.snapshot(resource, revision).map_err(|err| match err {
                    ApiError::Expired(_) if query.after.is_some() => ApiError::Expired(
                        "The provided continue parameter is too old to display a consistent list result. \
                         You can start a new list without the continue parameter."
                            .into(),
                    ),
                    other => other,
                })?;
                (Cow::Owned(snapshot), revision)
            }
        };
        let in_scope = |key: &ObjectKey| query.namespace.is_none_or(|ns| key.0 == ns);
        let mut candidates = objects
            .iter()
            .filter(|(key, _)| query.after.as_ref().is_none_or(|after| *key > after))
            .filter(|(key, _)| in_scope(key))
            .filter(|(_, object)| (query.filter)(object));
        let limit = query.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last_key = None;
        for (key, object) in candidates.by_ref() {
            items.push(object.clone());
            last_key = Some(key.clone());
            if items.len() == limit {
                break;
            }
        }
        let rest = candidates.count() as u64;
        let (continue_token, remaining) = match last_key {
            Some(after) if rest > 0 => (
                Some(ContinueToken { revision, after }.encode()),
                (!query.filtered).then_some(rest),
            ),
            _ => (None, None),
        };
        Ok(ListPage {
            items,
            revision,
            continue_token,
            remaining,
        })
    }

    pub fn create(
        &self,
        info: &ResourceInfo,
        namespace: &str,
        object: Value,
        opts: WriteOptions,
    ) -> Result<Value, ApiError> {
        self.state().create(info, namespace, object, opts)
    }

    /// Returns the object, creating it from `template` first if it does not exist.
    pub fn ensure(
        &self,
        info: &ResourceInfo,
        key: &ObjectKey,
        template: Value,
    ) -> Result<Value, ApiError> {
        let mut state = self.state();
        if let Some(existing) = state.get(&info.resource, key) {
            return Ok(existing.clone());
        }
        state.create(
            info,
            &key.0,
            template,
            WriteOptions {
                keep_status: true,
                ..WriteOptions::default()
            },
        )
    }

    /// Read-modify-write under the lock: `change` maps the stored object to the desired one.
    pub fn update_with(
        &self,
        info: &ResourceInfo,
        key: &ObjectKey,
        target: WriteTarget,
        opts: WriteOptions,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut state = self.state();
        let current = state
            .get(&info.resource, key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&info.resource, &key.1))?;
        let desired = change(&current)?;
        state.update(info, key, current, desired, target, opts)
    }

    /// Server-side apply as create-or-merge; returns the object and whether it was created.
    pub fn apply(
        &self,
        info: &ResourceInfo,
        key: &ObjectKey,
        target: WriteTarget,
        opts: WriteOptions,
        config: Value,
    ) -> Result<(Value, bool), ApiError> {
        let mut state = self.state();
        match state.get(&info.resource, key).cloned() {
            None if target == WriteTarget::Main => {
                let mut object = config;
                metadata_mut(&mut object)?.insert("name".into(), json!(key.1));
                Ok((state.create(info, &key.0, object, opts)?, true))
            }
            None => Err(ApiError::not_found(&info.resource, &key.1)),
            Some(current) => {
                let mut desired = current.clone();
                json_patch::merge(&mut desired, &config);
                Ok((
                    state.update(info, key, current, desired, target, opts)?,
                    false,
                ))
            }
        }
    }

    pub fn delete(
        &self,
        info: &ResourceInfo,
        key: &ObjectKey,
        preconditions: &Preconditions,
        dry_run: bool,
    ) -> Result<Deletion, ApiError> {
        self.state().delete(info, key, preconditions, dry_run)
    }

    /// Deletes every object in scope that `filter` accepts; returns what was deleted or is pending.
    pub fn delete_collection(
        &self,
        info: &ResourceInfo,
        namespace: Option<&str>,
        filter: &dyn Fn(&Value) -> bool,
        dry_run: bool,
    ) -> Result<Vec<Value>, ApiError> {
        let mut state = self.state();
        let keys: Vec<ObjectKey> = state
            .objects
            .get(&info.resource)
            .into_iter()
            .flatten()
            .filter(|(key, object)| namespace.is_none_or(|ns| key.0 == ns) && filter(object))
            .map(|(key, _)| key.clone())
            .collect();
        keys.iter()
            .map(|key| {
                state
                    .delete(info, key, &Preconditions::default(), dry_run)
                    .map(|d| d.object)
            })
            .collect()
    }

    pub fn open_watch(
        &self,
        resource: &GroupResource,
        namespace: Option<&str>,
        start: WatchStart,
    ) -> Result<WatchFeed, ApiError> {
        let state = self.state();
        let in_scope = |ns: &str| namespace.is_none_or(|wanted| wanted == ns);
        let (initial, backlog) = match start {
            WatchStart::After(revision) => {
                state.check_not_future(revision)?;
                if revision < state.compacted_through {
                    return Err(state.too_old(revision));
                }
                let backlog = state
                    .history
                    .iter()
                    .filter(|e| {
                        e.revision > revision && e.resource == *resource && in_scope(&e.namespace)
                    })
                    .cloned()
                    .collect();
                (Vec::new(), backlog)
            }
            WatchStart::Now { initial } => {
                let objects = if initial {
                    state
                        .objects
                        .get(resource)
                        .into_iter()
                        .flatten()
                        .filter(|(key, _)| in_scope(&key.0))
                        .map(|(_, object)| object.clone())
                        .collect()
                } else {
                    Vec::new()
                };
                (objects, Vec::new())
            }
        };
        Ok(WatchFeed {
            initial,
            backlog,
            revision: state.revision,
            changes: state.changes.subscribe(),
        })
    }

    /// Forgets all history (like etcd compaction) and ends every open watch (like an API server
    /// restart): clients re-watch from their last resourceVersion and, if that is older than
    /// now, get 410 Gone and must re-list.
    pub fn compact(&self) {
        let mut state = self.state();
        state.history.clear();
        state.compacted_through = state.revision;
        let _ = state.changes.send(Change::Reset);
    }

    /// Ends every open watch stream without touching history.
    pub fn end_watches(&self) {
        let _ = self.state().changes.send(Change::Reset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> ResourceInfo {
        resources::builtin_info(&GroupResource::new("", "secrets")).unwrap()
    }

    fn secret(name: &str) -> Value {
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name }, "stringData": { "k": "v" } })
    }

    fn key(ns: &str, name: &str) -> ObjectKey {
        (ns.to_string(), name.to_string())
    }

    fn rv(object: &Value) -> u64 {
        meta_str(object, "resourceVersion").parse().unwrap()
    }

    #[test]
    fn create_sets_server_metadata_and_normalizes_secrets() {
        let store = Store::new(100);
        let created = store
            .create(&secrets(), "ns", secret("s"), WriteOptions::default())
            .unwrap();
        assert_eq!(meta_str(&created, "namespace"), "ns");
        assert_eq!(meta_str(&created, "uid").len(), 36);
        assert!(!meta_str(&created, "creationTimestamp").is_empty());
        assert_eq!(rv(&created), INITIAL_REVISION + 1);
        assert_eq!(created["data"]["k"], "dg==");
        assert_eq!(created["type"], "Opaque");
        assert!(created.get("stringData").is_none());
    }

    #[test]
    fn create_rejects_clashes_missing_names_and_preset_versions() {
        let store = Store::new(100);
        store
            .create(&secrets(), "ns", secret("s"), WriteOptions::default())
            .unwrap();
        assert!(matches!(
            store.create(&secrets(), "ns", secret("s"), WriteOptions::default()),
            Err(ApiError::AlreadyExists { .. })
        ));
        // Same name in another namespace is a different object.
        store
            .create(&secrets(), "other", secret("s"), WriteOptions::default())
            .unwrap();
        let nameless = json!({ "metadata": {} });
        match store.create(&secrets(), "ns", nameless, WriteOptions::default()) {
            Err(ApiError::Invalid { causes, .. }) => {
                assert_eq!(causes[0].reason, "FieldValueRequired")
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        let mut with_rv = secret("t");
        with_rv["metadata"]["resourceVersion"] = json!("5");
        assert!(matches!(
            store.create(&secrets(), "ns", with_rv, WriteOptions::default()),
            Err(ApiError::Internal(_))
        ));
        let mut wrong_ns = secret("u");
        wrong_ns["metadata"]["namespace"] = json!("elsewhere");
        assert!(matches!(
            store.create(&secrets(), "ns", wrong_ns, WriteOptions::default()),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn generate_name_appends_a_suffix() {
        let store = Store::new(100);
        let object = json!({ "metadata": { "generateName": "tok-" } });
        let created = store
            .create(&secrets(), "ns", object, WriteOptions::default())
            .unwrap();
        let name = meta_str(&created, "name");
        assert!(name.starts_with("tok-") && name.len() == 9, "{name}");
    }

    #[test]
    fn update_enforces_resource_version_and_skips_no_ops() {
        let store = Store::new(100);
        let created = store
            .create(&secrets(), "ns", secret("s"), WriteOptions::default())
            .unwrap();
        let same = store
            .update_with(
                &secrets(),
                &key("ns", "s"),
                WriteTarget::Main,
                WriteOptions::default(),
                |c| Ok(c.clone()),
            )
            .unwrap();
        assert_eq!(
            rv(&same),
            rv(&created),
            "a no-op update must not bump the version"
        );

        let changed = store
            .update_with(
                &secrets(),
                &key("ns", "s"),
                WriteTarget::Main,
                WriteOptions::default(),
                |c| {
                    let mut next = c.clone();
                    next["data"]["k"] = json!("dzI=");
                    Ok(next)
                },
            )
            .unwrap();
        assert_eq!(rv(&changed), rv(&created) + 1);

        let stale = store.update_with(
            &secrets(),
            &key("ns", "s"),
            WriteTarget::Main,
            WriteOptions::default(),
            |_| {
                let mut old = created.clone();
                old["data"]["k"] = json!("eDM=");
                Ok(old)
            },
        );
        assert!(matches!(stale, Err(ApiError::Conflict { .. })), "{stale:?}");
    }

    #[test]
    fn finalizers_defer_deletion_until_removed() {
        let store = Store::new(100);
        let mut object = secret("f");
        object["metadata"]["finalizers"] = json!(["sigil.dev/cleanup"]);
        store
            .create(&secrets(), "ns", object, WriteOptions::default())
            .unwrap();
        let deletion = store
            .delete(
                &secrets(),
                &key("ns", "f"),
                &Preconditions::default(),
                false,
            )
            .unwrap();
        assert!(deletion.pending);
        assert!(deletion.object["metadata"]["deletionTimestamp"].is_string());
        store
            .update_with(
                &secrets(),
                &key("ns", "f"),
                WriteTarget::Main,
                WriteOptions::default(),
                |c| {
                    let mut next = c.clone();
                    next["metadata"]["finalizers"] = json!([]);
                    Ok(next)
                },
            )
            .unwrap();
        assert!(matches!(
            store.get(&GroupResource::new("", "secrets"), &key("ns", "f")),
            Err(ApiError::NotFound { .. })
        ));
    }

    #[test]
    fn delete_preconditions_are_checked() {
        let store = Store::new(100);
        store
            .create(&secrets(), "ns", secret("p"), WriteOptions::default())
            .unwrap();
        let wrong_uid = Preconditions {
            uid: Some("nope".into()),
            resource_version: None,
        };
        assert!(matches!(
            store.delete(&secrets(), &key("ns", "p"), &wrong_uid, false),
            Err(ApiError::Conflict { .. })
        ));
        assert!(matches!(
            store.delete(
                &secrets(),
                &key("ns", "missing"),
                &Preconditions::default(),
                false
            ),
            Err(ApiError::NotFound { .. })
        ));
    }

    #[test]
    fn snapshots_rebuild_past_states_until_compacted() {
        let store = Store::new(3);
        let info = secrets();
        let a = store
            .create(&info, "ns", secret("a"), WriteOptions::default())
            .unwrap();
        let at_a = rv(&a);
        store
            .create(&info, "ns", secret("b"), WriteOptions::default())
            .unwrap();
        store
            .delete(&info, &key("ns", "a"), &Preconditions::default(), false)
            .unwrap();
        let everything = |_: &Value| true;
        let query = |read| ListQuery {
            namespace: Some("ns"),
            read,
            after: None,
            limit: None,
            filter: &everything,
            filtered: false,
        };
        let past = store
            .list(&info.resource, &query(ListRead::Exact(at_a)))
            .unwrap();
        let names: Vec<&str> = past.items.iter().map(|o| meta_str(o, "name")).collect();
        assert_eq!(names, ["a"]);
        let now = store
            .list(&info.resource, &query(ListRead::Latest))
            .unwrap();
        let names: Vec<&str> = now.items.iter().map(|o| meta_str(o, "name")).collect();
        assert_eq!(names, ["b"]);

        // Two more writes push the creation of "a" out of the 3-event history.
        store
            .create(&info, "ns", secret("c"), WriteOptions::default())
            .unwrap();
        store
            .create(&info, "ns", secret("d"), WriteOptions::default())
            .unwrap();
        assert!(matches!(
            store.list(&info.resource, &query(ListRead::Exact(at_a))),
            Err(ApiError::Expired(_))
        ));
        assert!(matches!(
            store.list(&info.resource, &query(ListRead::Exact(999))),
            Err(ApiError::TooLargeResourceVersion { .. })
        ));
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = ContinueToken {
            revision: 42,
            after: key("ns", "web-1"),
        };
        assert_eq!(ContinueToken::decode(&token.encode()).unwrap(), token);
        let cluster = ContinueToken {
            revision: 7,
            after: key("", "node-a"),
        };
        assert_eq!(ContinueToken::decode(&cluster.encode()).unwrap(), cluster);
        assert!(matches!(
            ContinueToken::decode("%%%"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn watch_start_checks_history_bounds() {
        let store = Store::new(2);
        let info = secrets();
        for name in ["a", "b", "c"] {
            store
                .create(&info, "ns", secret(name), WriteOptions::default())
                .unwrap();
        }
        assert!(matches!(
            store.open_watch(&info.resource, None, WatchStart::After(INITIAL_REVISION)),
            Err(ApiError::Expired(_))
        ));
        let feed = store
            .open_watch(
                &info.resource,
                Some("ns"),
                WatchStart::After(INITIAL_REVISION + 1),
            )
            .unwrap();
        assert_eq!(feed.backlog.len(), 2);
        assert!(matches!(
            store.open_watch(&info.resource, None, WatchStart::After(1000)),
            Err(ApiError::TooLargeResourceVersion { .. })
        ));
        let feed = store
            .open_watch(&info.resource, None, WatchStart::Now { initial: true })
            .unwrap();
        assert_eq!(feed.initial.len(), 3);
        assert_eq!(feed.revision, store.revision());
    }

    #[test]
    fn uids_are_version_4() {
        let uid = new_uid();
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4");
        assert_ne!(uid, new_uid());
    }
}
