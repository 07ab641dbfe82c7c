//! The HTTP face of the double: the router, and the generic REST handler that maps the API
//! server's resource paths (`/api/v1/...`, `/apis/{group}/{version}/...`) and verbs (get, list,
//! watch, create, update, patch, delete, deletecollection, the `/status` subresource) onto the
//! store, with the API's query parameters, content types, response codes and object shapes.

use std::{collections::HashMap, sync::Arc, sync::atomic::AtomicU64, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    discovery,
    resources::{Origin, ResourceInfo, Scope},
    selector::{FieldSelector, LabelSelector, SelectorError},
    status::{ApiError, FieldCause, GroupResource, deleted_status},
    store::{
        ContinueToken, ListQuery, ListRead, ObjectKey, Preconditions, Store, WatchStart,
        WriteOptions, WriteTarget, meta_str, parse_resource_version,
    },
    tokenreview,
    watch::{self, WatchRequest},
};

/// Server-side watch timeout when the client gives none (the API server picks 30-60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// State shared by every handler.
pub struct App {
    pub store: Store,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub issuer: String,
    pub token_reviews: AtomicU64,
    pub bookmark_interval: Duration,
    /// See `ServerOptions::serve_undefined_resources`.
    pub serve_undefined_resources: bool,
    /// Every request served, for tests (`TestApiServer::requests`).
    pub requests: crate::request_log::RequestLog,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/version", get(discovery::version))
        .route(
            "/.well-known/openid-configuration",
            get(discovery::openid_configuration),
        )
        .route("/openid/v1/jwks", get(discovery::jwks))
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(tokenreview::create).fallback(method_not_allowed),
        )
        .fallback(handle)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::request_log::record,
        ))
        .with_state(app)
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

impl From<SelectorError> for ApiError {
    fn from(err: SelectorError) -> Self {
        ApiError::BadRequest(err.to_string())
    }
}

/// How objects are shaped on the way out: `apiVersion`/`kind` of the requested version, or
/// `PartialObjectMetadata` when the client asked for metadata only.
#[derive(Clone, Debug)]
pub struct Presentation {
    api_version: String,
    kind: String,
    metadata_only: bool,
}

const META_API_VERSION: &str = "meta.k8s.io/v1";

impl Presentation {
    pub fn new(api_version: &str, kind: &str, metadata_only: bool) -> Self {
        Self {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            metadata_only,
        }
    }

    pub fn object(&self, mut object: Value) -> Value {
        if self.metadata_only {
            return json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": META_API_VERSION,
                "metadata": object["metadata"].take(),
            });
        }
        object["apiVersion"] = json!(self.api_version);
        object["kind"] = json!(self.kind);
        object
    }

    /// A BOOKMARK's object: type meta and `metadata.resourceVersion` only.
    pub fn bookmark(&self, revision: u64, initial_events_end: bool) -> Value {
        let (api_version, kind) = if self.metadata_only {
            (META_API_VERSION, "PartialObjectMetadata")
        } else {
            (self.api_version.as_str(), self.kind.as_str())
        };
        let mut metadata = json!({ "resourceVersion": revision.to_string() });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata })
    }

    /// A list; items of built-in kinds carry no type meta, as the API server serializes them.
    fn list(&self, info: &ResourceInfo, items: Vec<Value>, metadata: Value) -> Value {
        let typed_items = info.origin != Origin::BuiltIn || self.metadata_only;
        let items: Vec<Value> = items
            .into_iter()
            .map(|item| {
                let mut item = self.object(item);
                if !typed_items && let Some(map) = item.as_object_mut() {
                    map.remove("apiVersion");
                    map.remove("kind");
                }
                item
            })
            .collect();
        let (api_version, kind) = if self.metadata_only {
            (
                META_API_VERSION.to_string(),
                "PartialObjectMetadataList".to_string(),
            )
        } else {
            (self.api_version.clone(), info.list_kind.clone())
        };
        json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items })
    }
}

/// A parsed resource path.
#[derive(Debug, PartialEq, Eq)]
struct ResourcePath {
    /// `v1` or `group/version`, as it appears in `apiVersion`.
    api_version: String,
    resource: GroupResource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl ResourcePath {
    fn parse(segments: &[&str]) -> Result<Self, ApiError> {
        let (group, version, rest) = match segments {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return Err(ApiError::PathNotFound),
        };
        let (namespace, resource, name, subresource) = match rest {
            ["namespaces", ns, resource] if !matches!(*resource, "status" | "finalize") => {
                (Some(*ns), *resource, None, None)
            }
            ["namespaces", ns, resource, name] => (Some(*ns), *resource, Some(*name), None),
            ["namespaces", ns, resource, name, sub] => {
                (Some(*ns), *resource, Some(*name), Some(*sub))
            }
            [resource] => (None, *resource, None, None),
            [resource, name] => (None, *resource, Some(*name), None),
            [resource, name, sub] => (None, *resource, Some(*name), Some(*sub)),
            _ => return Err(ApiError::PathNotFound),
        };
        Ok(Self {
            api_version: if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            },
            resource: GroupResource::new(group, resource),
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            subresource: subresource.map(str::to_string),
        })
    }

    fn key(&self, name: &str) -> ObjectKey {
        (self.namespace.clone().unwrap_or_default(), name.to_string())
    }
}

/// Rejects paths whose shape does not fit the resource's scope, as the API server's routes do.
fn check_scope(info: &ResourceInfo, path: &ResourcePath, method: &Method) -> Result<(), ApiError> {
    if info.create_only {
        return Err(ApiError::MethodNotAllowed);
    }
    match (info.scope, &path.namespace, &path.name) {
        (Scope::Cluster, Some(_), _) => return Err(ApiError::PathNotFound),
        (Scope::Namespaced, None, Some(_)) => return Err(ApiError::PathNotFound),
        (Scope::Namespaced, None, None) if *method != Method::GET => {
            return Err(ApiError::MethodNotAllowed);
        }
        _ => {}
    }
    match path.subresource.as_deref() {
        None => Ok(()),
        Some("status") if info.status_subresource => Ok(()),
        Some(_) => Err(ApiError::PathNotFound),
    }
}

struct Params(HashMap<String, String>);

impl Params {
    fn from_uri(uri: &Uri) -> Result<Self, ApiError> {
        Query::<HashMap<String, String>>::try_from_uri(uri)
            .map(|Query(map)| Self(map))
            .map_err(|e| ApiError::BadRequest(e.to_string()))
    }

    fn get(&self, key: &str) -> &str {
        self.0.get(key).map(String::as_str).unwrap_or_default()
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), "true" | "1")
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ApiError> {
        match self.get(key) {
            "" => Ok(None),
            value => value
                .parse()
                .map(Some)
                .map_err(|_| ApiError::BadRequest(format!("invalid value {value:?} for {key}"))),
        }
    }

    fn dry_run(&self) -> Result<bool, ApiError> {
        match self.get("dryRun") {
            "" => Ok(false),
            "All" => Ok(true),
            other => Err(ApiError::BadRequest(format!(
                "unsupported dryRun value {other:?}; only \"All\""
            ))),
        }
    }

    fn selectors(&self, info: &ResourceInfo) -> Result<(LabelSelector, FieldSelector), ApiError> {
        let labels = LabelSelector::parse(self.get("labelSelector"))?;
        let fields = FieldSelector::parse(self.get("fieldSelector"))?;
        fields.check_supported(&info.selectable_fields())?;
        Ok((labels, fields))
    }
}

fn list_options_invalid(field: &str, message: &str) -> ApiError {
    ApiError::Invalid {
        group: "meta.k8s.io".into(),
        kind: "ListOptions".into(),
        qualified_kind: "ListOptions.meta.k8s.io".into(),
        name: String::new(),
        causes: vec![FieldCause {
            reason: "FieldValueForbidden",
            field: field.into(),
            message: format!("Forbidden: {message}"),
        }],
    }
}

fn json_response(code: StatusCode, body: Value) -> Response {
    (code, Json(body)).into_response()
}

fn decode_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let parsed = if content_type.starts_with("application/yaml")
        || content_type.starts_with("application/apply-patch+yaml")
    {
        serde_yaml::from_slice::<Value>(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(body).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| {
        ApiError::BadRequest(format!("the body of the request could not be decoded: {e}"))
    })
}

/// Checks the body's type meta against the request and fills in what the client left out.
fn check_type_meta(
    info: &ResourceInfo,
    api_version: &str,
    mut object: Value,
) -> Result<Value, ApiError> {
    let Some(map) = object.as_object_mut() else {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    };
    match map.get("apiVersion").and_then(Value::as_str) {
        Some(given) if !given.is_empty() && given != api_version => {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({given}) does not match the expected API version ({api_version})"
            )));
        }
        _ => {
            map.insert("apiVersion".into(), json!(api_version));
        }
    }
    match map.get("kind").and_then(Value::as_str) {
        Some(kind) if !kind.is_empty() => {
            if info.origin != Origin::Unregistered && kind != info.kind {
                return Err(ApiError::BadRequest(format!(
                    "the object provided is unrecognized (must be of type {}): kind {kind:?}",
                    info.kind
                )));
            }
        }
        _ => {
            map.insert("kind".into(), json!(info.kind));
        }
    }
    Ok(object)
}

async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve(&app, &method, &uri, &headers, &body).unwrap_or_else(IntoResponse::into_response)
}

fn serve(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    if *method == Method::GET
        && let Some(document) = discovery::document(&app.store, &segments)
    {
        return Ok(json_response(StatusCode::OK, document));
    }
    let path = ResourcePath::parse(&segments)?;
    let params = Params::from_uri(uri)?;
    let info = app.store.resolve(&path.resource);
    if info.origin == Origin::Unregistered && !app.serve_undefined_resources {
        return Err(ApiError::PathNotFound);
    }
    check_scope(&info, &path, method)?;
    let metadata_only = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("as=PartialObjectMetadata"));
    let presentation = Presentation::new(&path.api_version, &info.kind, metadata_only);
    let target = if path.subresource.is_some() {
        WriteTarget::Status
    } else {
        WriteTarget::Main
    };
    let request = Request {
        app,
        path: &path,
        info: &info,
        params: &params,
        presentation: &presentation,
    };
    match (path.name.as_deref(), method.clone()) {
        (None, Method::GET) if params.flag("watch") => request.watch(None),
        (None, Method::GET) => request.list(),
        (None, Method::POST) => request.create(headers, body),
        (None, Method::DELETE) => request.delete_collection(),
        (Some(name), Method::GET) if params.flag("watch") && target == WriteTarget::Main => {
            request.watch(Some(name))
        }
        (Some(name), Method::GET) => request.get(name),
        (Some(name), Method::PUT) => request.replace(name, target, headers, body),
        (Some(name), Method::PATCH) => request.patch(name, target, headers, body),
        (Some(name), Method::DELETE) if target == WriteTarget::Main => request.delete(name, body),
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// One resource request, with everything the verbs need.
struct Request<'a> {
    app: &'a App,
    path: &'a ResourcePath,
    info: &'a ResourceInfo,
    params: &'a Params,
    presentation: &'a Presentation,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DeleteOptions {
    #[serde(default)]
    preconditions: Option<DeletePreconditions>,
    #[serde(default)]
    dry_run: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DeletePreconditions {
    uid: Option<String>,
    resource_version: Option<String>,
}

impl Request<'_> {
    fn namespace(&self) -> &str {
        self.path.namespace.as_deref().unwrap_or_default()
    }

    fn write_options(&self) -> Result<WriteOptions, ApiError> {
        Ok(WriteOptions {
            dry_run: self.params.dry_run()?,
            keep_status: false,
        })
    }

    fn object_response(&self, code: StatusCode, object: Value) -> Result<Response, ApiError> {
        Ok(json_response(code, self.presentation.object(object)))
    }

    fn get(&self, name: &str) -> Result<Response, ApiError> {
        let object = self
            .app
            .store
            .get(&self.info.resource, &self.path.key(name))?;
        self.object_response(StatusCode::OK, object)
    }

    fn list_read(&self) -> Result<(ListRead, Option<ObjectKey>), ApiError> {
        let rv = self.params.get("resourceVersion");
        let continue_token = self.params.get("continue");
        if !continue_token.is_empty() {
            if !rv.is_empty() {
                return Err(ApiError::BadRequest(
                    "specifying resource version is not allowed when using continue".into(),
                ));
            }
            let token = ContinueToken::decode(continue_token)?;
            return Ok((ListRead::Exact(token.revision), Some(token.after)));
        }
        let limited = self.params.number::<usize>("limit")?.unwrap_or(0) > 0;
        let read = match (self.params.get("resourceVersionMatch"), rv) {
            ("", "" | "0") => ListRead::Latest,
            ("", rv) if limited => ListRead::Exact(parse_resource_version(rv)?),
            ("", rv) => ListRead::NotOlderThan(parse_resource_version(rv)?),
            (_, "") => {
                return Err(list_options_invalid(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            ("NotOlderThan", "0") => ListRead::Latest,
            ("NotOlderThan", rv) => ListRead::NotOlderThan(parse_resource_version(rv)?),
            ("Exact", "0") => {
                return Err(list_options_invalid(
                    "resourceVersionMatch",
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
            ("Exact", rv) => ListRead::Exact(parse_resource_version(rv)?),
            (other, _) => {
                return Err(list_options_invalid(
                    "resourceVersionMatch",
                    &format!("unsupported value {other:?}"),
                ));
            }
        };
        Ok((read, None))
    }

    fn list(&self) -> Result<Response, ApiError> {
        let (labels, fields) = self.params.selectors(self.info)?;
        let (read, after) = self.list_read()?;
        let filter = |object: &Value| labels.matches(object) && fields.matches(object);
        let page = self.app.store.list(
            &self.info.resource,
            &ListQuery {
                namespace: self.path.namespace.as_deref(),
                read,
                after,
                limit: self.params.number("limit")?,
                filter: &filter,
                filtered: !labels.is_empty() || !fields.is_empty(),
            },
        )?;
        let mut metadata = json!({ "resourceVersion": page.revision.to_string() });
        if let Some(token) = page.continue_token {
            metadata["continue"] = json!(token);
        }
        if let Some(remaining) = page.remaining {
            metadata["remainingItemCount"] = json!(remaining);
        }
        Ok(json_response(
            StatusCode::OK,
            self.presentation.list(self.info, page.items, metadata),
        ))
    }

    fn watch(&self, name: Option<&str>) -> Result<Response, ApiError> {
        let (labels, mut fields) = self.params.selectors(self.info)?;
        if let Some(name) = name {
            // Watching one object by path is a watch with a metadata.name field selector.
            let existing = self.params.get("fieldSelector");
            let combined = if existing.is_empty() {
                format!("metadata.name={name}")
            } else {
                format!("{existing},metadata.name={name}")
            };
            fields = FieldSelector::parse(&combined)?;
        }
        let bookmarks = self.params.flag("allowWatchBookmarks");
        let send_initial_events = match self.params.get("sendInitialEvents") {
            "" => None,
            value => Some(value == "true"),
        };
        if send_initial_events == Some(true) {
            if self.params.get("resourceVersionMatch") != "NotOlderThan" {
                return Err(list_options_invalid(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if !bookmarks {
                return Err(list_options_invalid(
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
        }
        let rv = self.params.get("resourceVersion");
        let start = match (rv, send_initial_events) {
            (_, Some(true)) | ("" | "0", None) => WatchStart::Now { initial: true },
            ("" | "0", Some(false)) => WatchStart::Now { initial: false },
            (rv, _) => WatchStart::After(parse_resource_version(rv)?),
        };
        let timeout = self
            .params
            .number::<u64>("timeoutSeconds")?
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_WATCH_TIMEOUT);
        // A too-old version is reported inside a 200 stream (as an ERROR event), as the API
        // server does; every other failure is an HTTP error.
        let feed = match self.app.store.open_watch(
            &self.info.resource,
            self.path.namespace.as_deref(),
            start,
        ) {
            Err(err) if !matches!(err, ApiError::Expired(_)) => return Err(err),
            feed => feed,
        };
        let request = WatchRequest {
            resource: self.info.resource.clone(),
            namespace: self.path.namespace.clone(),
            labels,
            fields,
            bookmarks,
            initial_events_end: send_initial_events == Some(true),
            timeout,
            bookmark_interval: self.app.bookmark_interval,
            start_revision: match start {
                WatchStart::After(revision) => revision,
                WatchStart::Now { .. } => 0,
            },
            presentation: self.presentation.clone(),
        };
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            watch::stream(feed, request),
        )
            .into_response())
    }

    fn create(&self, headers: &HeaderMap, body: &Bytes) -> Result<Response, ApiError> {
        let object = check_type_meta(
            self.info,
            &self.path.api_version,
            decode_body(headers, body)?,
        )?;
        let created =
            self.app
                .store
                .create(self.info, self.namespace(), object, self.write_options()?)?;
        self.object_response(StatusCode::CREATED, created)
    }

    fn replace(
        &self,
        name: &str,
        target: WriteTarget,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Response, ApiError> {
        let desired = check_type_meta(
            self.info,
            &self.path.api_version,
            decode_body(headers, body)?,
        )?;
        let body_name = meta_str(&desired, "name");
        if body_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let updated = self.app.store.update_with(
            self.info,
            &self.path.key(name),
            target,
            self.write_options()?,
            |_| Ok(desired),
        )?;
        self.object_response(StatusCode::OK, updated)
    }

    fn patch(
        &self,
        name: &str,
        target: WriteTarget,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Response, ApiError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        let key = self.path.key(name);
        let opts = self.write_options()?;
        let store = &self.app.store;
        let api_version = self.path.api_version.clone();
        let with_type_meta = move |mut object: Value| {
            object["apiVersion"] = json!(api_version);
            object
        };
        let updated = match media_type {
            "application/merge-patch+json" => {
                let patch: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::BadRequest(format!("invalid merge patch: {e}")))?;
                store.update_with(self.info, &key, target, opts, |current| {
                    let mut desired = current.clone();
                    json_patch::merge(&mut desired, &patch);
                    Ok(with_type_meta(desired))
                })?
            }
            "application/json-patch+json" => {
                let patch: json_patch::Patch = serde_json::from_slice(body)
                    .map_err(|e| ApiError::BadRequest(format!("invalid JSON patch: {e}")))?;
                store.update_with(self.info, &key, target, opts, |current| {
                    let mut desired = current.clone();
                    json_patch::patch(&mut desired, &patch).map_err(|e| ApiError::Invalid {
                        group: self.info.resource.group.clone(),
                        kind: self.info.kind.clone(),
                        qualified_kind: self.info.qualified_kind(),
                        name: name.to_string(),
                        causes: vec![FieldCause {
                            reason: "FieldValueInvalid",
                            field: "patch".into(),
                            message: e.to_string(),
                        }],
                    })?;
                    Ok(with_type_meta(desired))
                })?
            }
            "application/apply-patch+yaml" => return self.apply(name, target, headers, body),
            _ => {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "the body of the request was in an unknown format ({media_type}) - accepted media types include: \
                     application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml \
                     (this test double does not implement strategic merge patch)"
                )));
            }
        };
        self.object_response(StatusCode::OK, updated)
    }

    /// Server-side apply, approximated as create-or-merge; `fieldManager` is required as in the API.
    fn apply(
        &self,
        name: &str,
        target: WriteTarget,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Response, ApiError> {
        if self.params.get("fieldManager").is_empty() {
            return Err(ApiError::Invalid {
                group: "meta.k8s.io".into(),
                kind: "PatchOptions".into(),
                qualified_kind: "PatchOptions.meta.k8s.io".into(),
                name: String::new(),
                causes: vec![FieldCause::required(
                    "fieldManager",
                    "is required for apply patch",
                )],
            });
        }
        let config = decode_body(headers, body)?;
        if !config.get("apiVersion").is_some_and(Value::is_string)
            || !config.get("kind").is_some_and(Value::is_string)
        {
            return Err(ApiError::BadRequest(
                "invalid object type: apiVersion and kind must be set in an apply configuration"
                    .into(),
            ));
        }
        let config = check_type_meta(self.info, &self.path.api_version, config)?;
        match meta_str(&config, "name") {
            "" => {}
            body_name if body_name != name => {
                return Err(ApiError::BadRequest(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        let (object, created) = self.app.store.apply(
            self.info,
            &self.path.key(name),
            target,
            self.write_options()?,
            config,
        )?;
        let code = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        self.object_response(code, object)
    }

    fn delete(&self, name: &str, body: &Bytes) -> Result<Response, ApiError> {
        let options: DeleteOptions = if body.is_empty() {
            DeleteOptions::default()
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::BadRequest(format!("invalid DeleteOptions: {e}")))?
        };
        let preconditions = options
            .preconditions
            .map(|p| Preconditions {
                uid: p.uid,
                resource_version: p.resource_version,
            })
            .unwrap_or_default();
        let dry_run = self.params.dry_run()? || options.dry_run.iter().any(|d| d == "All");
        let deletion =
            self.app
                .store
                .delete(self.info, &self.path.key(name), &preconditions, dry_run)?;
        if deletion.pending {
            return self.object_response(StatusCode::ACCEPTED, deletion.object);
        }
        if self.info.returns_deleted_object {
            return self.object_response(StatusCode::OK, deletion.object);
        }
        Ok(json_response(
            StatusCode::OK,
            deleted_status(&self.info.resource, name, meta_str(&deletion.object, "uid")),
        ))
    }

    fn delete_collection(&self) -> Result<Response, ApiError> {
        let (labels, fields) = self.params.selectors(self.info)?;
        let filter = |object: &Value| labels.matches(object) && fields.matches(object);
        let deleted = self.app.store.delete_collection(
            self.info,
            self.path.namespace.as_deref(),
            &filter,
            self.params.dry_run()?,
        )?;
        let metadata = json!({ "resourceVersion": self.app.store.revision().to_string() });
        Ok(json_response(
            StatusCode::OK,
            self.presentation.list(self.info, deleted, metadata),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str) -> Result<ResourcePath, ApiError> {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        ResourcePath::parse(&segments)
    }

    #[test]
    fn core_and_group_paths() {
        let p = parse("/api/v1/namespaces/prod/pods/web-0/status").unwrap();
        assert_eq!(p.api_version, "v1");
        assert_eq!(p.resource, GroupResource::new("", "pods"));
        assert_eq!(p.namespace.as_deref(), Some("prod"));
        assert_eq!(p.name.as_deref(), Some("web-0"));
        assert_eq!(p.subresource.as_deref(), Some("status"));

        let p = parse("/apis/apps/v1/deployments").unwrap();
        assert_eq!(p.api_version, "apps/v1");
        assert_eq!((p.namespace, p.name), (None, None));

        // A namespace's own subresource, not a collection inside it.
        let p = parse("/api/v1/namespaces/prod/status").unwrap();
        assert_eq!(p.resource.resource, "namespaces");
        assert_eq!(p.name.as_deref(), Some("prod"));

        let p = parse("/api/v1/namespaces/prod").unwrap();
        assert_eq!(
            (p.resource.resource.as_str(), p.name.as_deref()),
            ("namespaces", Some("prod"))
        );

        assert!(matches!(parse("/healthz"), Err(ApiError::PathNotFound)));
        assert!(matches!(
            parse("/api/v1/namespaces/a/pods/b/c/d"),
            Err(ApiError::PathNotFound)
        ));
    }

    #[test]
    fn scope_rules_follow_the_api_routes() {
        let store = Store::new(10);
        let pods = store.resolve(&GroupResource::new("", "pods"));
        let namespaces = store.resolve(&GroupResource::new("", "namespaces"));
        let secrets = store.resolve(&GroupResource::new("", "secrets"));
        let check = |info: &ResourceInfo, path: &str, method: Method| {
            check_scope(info, &parse(path).unwrap(), &method)
        };
        assert!(
            check(&pods, "/api/v1/pods", Method::GET).is_ok(),
            "all-namespaces list"
        );
        assert!(matches!(
            check(&pods, "/api/v1/pods", Method::POST),
            Err(ApiError::MethodNotAllowed)
        ));
        assert!(matches!(
            check(&pods, "/api/v1/pods/x", Method::GET),
            Err(ApiError::PathNotFound)
        ));
        assert!(matches!(
            check(&namespaces, "/api/v1/namespaces/a/namespaces", Method::GET),
            Err(ApiError::PathNotFound)
        ));
        assert!(check(&pods, "/api/v1/namespaces/a/pods/x/status", Method::PUT).is_ok());
        assert!(matches!(
            check(
                &secrets,
                "/api/v1/namespaces/a/secrets/x/status",
                Method::GET
            ),
            Err(ApiError::PathNotFound)
        ));
        assert!(matches!(
            check(&pods, "/api/v1/namespaces/a/pods/x/log", Method::GET),
            Err(ApiError::PathNotFound)
        ));
    }

    #[test]
    fn type_meta_is_checked_and_defaulted() {
        let store = Store::new(10);
        let secrets = store.resolve(&GroupResource::new("", "secrets"));
        let filled = check_type_meta(&secrets, "v1", json!({ "metadata": {} })).unwrap();
        assert_eq!(
            (filled["apiVersion"].as_str(), filled["kind"].as_str()),
            (Some("v1"), Some("Secret"))
        );
        assert!(matches!(
            check_type_meta(
                &secrets,
                "v1",
                json!({ "apiVersion": "v2", "kind": "Secret" })
            ),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            check_type_meta(
                &secrets,
                "v1",
                json!({ "apiVersion": "v1", "kind": "ConfigMap" })
            ),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn builtin_list_items_carry_no_type_meta() {
        let store = Store::new(10);
        let pods = store.resolve(&GroupResource::new("", "pods"));
        let presentation = Presentation::new("v1", "Pod", false);
        let list = presentation.list(
            &pods,
            vec![json!({ "metadata": { "name": "a" } })],
            json!({}),
        );
        assert_eq!(list["kind"], "PodList");
        assert!(list["items"][0].get("kind").is_none());
        let metadata_only = Presentation::new("v1", "Pod", true);
        let list = metadata_only.list(
            &pods,
            vec![json!({ "metadata": { "name": "a" }, "spec": {} })],
            json!({}),
        );
        assert_eq!(list["kind"], "PartialObjectMetadataList");
        assert_eq!(list["items"][0]["kind"], "PartialObjectMetadata");
        assert!(list["items"][0].get("spec").is_none());
    }
}

/// The REST verbs end to end, through the real `kube` client.
#[cfg(test)]
mod client_tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::{ConfigMap, Pod, Secret},
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    use kube::{
        Api, ResourceExt,
        api::{
            ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
            PatchParams, PostParams, Preconditions,
        },
    };
    use serde_json::json;

    use crate::{
        PodSpec, ServerOptions, TestApiServer,
        test_support::{api_status, configmap, expect_failure, secret},
    };

    fn names<K: ResourceExt>(items: impl IntoIterator<Item = K>) -> Vec<String> {
        items.into_iter().map(|o| o.name_any()).collect()
    }

    #[tokio::test]
    async fn create_get_list_replace_delete_with_status_errors() {
        let server = TestApiServer::start().await;
        let secrets: Api<Secret> = Api::namespaced(server.client(), "prod");
        let pp = PostParams::default();

        let created = secrets.create(&pp, &secret("db", "one")).await.unwrap();
        assert_eq!(created.metadata.namespace.as_deref(), Some("prod"));
        assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
        assert_eq!(created.type_.as_deref(), Some("Opaque"));
        let got = secrets.get("db").await.unwrap();
        assert_eq!(got.metadata.uid, created.metadata.uid);
        assert_eq!(
            got.metadata.resource_version,
            created.metadata.resource_version
        );

        let missing = expect_failure(secrets.get("missing").await, 404, "NotFound");
        assert_eq!(missing.message, "secrets \"missing\" not found");
        let details = missing.details.unwrap();
        assert_eq!(
            (details.name.as_str(), details.kind.as_str()),
            ("missing", "secrets")
        );
        let clash = expect_failure(
            secrets.create(&pp, &secret("db", "two")).await,
            409,
            "AlreadyExists",
        );
        assert_eq!(clash.message, "secrets \"db\" already exists");

        let mut next = got.clone();
        next.data = secret("db", "two").data;
        let replaced = secrets.replace("db", &pp, &next).await.unwrap();
        let version = |s: &Secret| {
            s.metadata
                .resource_version
                .clone()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        assert!(version(&replaced) > version(&created));
        assert_eq!(replaced.data, next.data);
        expect_failure(
            secrets.replace("ghost", &pp, &secret("ghost", "x")).await,
            404,
            "NotFound",
        );

        let list = secrets.list(&ListParams::default()).await.unwrap();
        assert_eq!(names(list.items), ["db"]);
        assert_eq!(
            list.metadata.resource_version,
            Some(server.resource_version().to_string())
        );
        assert_eq!(list.types.kind, "SecretList");

        // Built-in types other than pods answer a finished delete with a Success Status.
        let deleted = secrets
            .delete("db", &DeleteParams::default())
            .await
            .unwrap();
        let status = deleted.right().expect("a Status for a deleted Secret");
        assert!(status.is_success());
        assert_eq!(status.details.unwrap().uid, created.metadata.uid.unwrap());
        expect_failure(
            secrets.delete("db", &DeleteParams::default()).await,
            404,
            "NotFound",
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creates_of_one_secret_have_exactly_one_winner() {
        let server = TestApiServer::start().await;
        for round in 0..8 {
            let name = format!("sigil-ca-{round}");
            let first: Api<Secret> = Api::namespaced(server.client(), "sigil-system");
            let second: Api<Secret> = Api::namespaced(server.client(), "sigil-system");
            let pp = PostParams::default();
            let (root_a, root_b) = (secret(&name, "root-a"), secret(&name, "root-b"));
            let (a, b) = tokio::join!(first.create(&pp, &root_a), second.create(&pp, &root_b));
            let (winner, loser) = match (a, b) {
                (Ok(winner), loser @ Err(_)) | (loser @ Err(_), Ok(winner)) => (winner, loser),
                other => panic!("expected exactly one winner, got {other:?}"),
            };
            expect_failure(loser, 409, "AlreadyExists");
            // The loser re-reads and finds the winner's root.
            assert_eq!(first.get(&name).await.unwrap().data, winner.data);
        }
    }

    #[tokio::test]
    async fn stale_resource_versions_conflict() {
        let server = TestApiServer::start().await;
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        let pp = PostParams::default();
        let v1 = configmaps
            .create(&pp, &configmap("bundle", &[]))
            .await
            .unwrap();
        let mut update = v1.clone();
        update.data = Some(BTreeMap::from([("root-cert.pem".into(), "new".into())]));
        configmaps.replace("bundle", &pp, &update).await.unwrap();

        let conflict = expect_failure(
            configmaps.replace("bundle", &pp, &update).await,
            409,
            "Conflict",
        );
        assert!(
            conflict.message.contains("the object has been modified"),
            "{}",
            conflict.message
        );

        let stale_patch = json!({ "metadata": { "resourceVersion": v1.resource_version() }, "data": { "x": "y" } });
        expect_failure(
            configmaps
                .patch(
                    "bundle",
                    &PatchParams::default(),
                    &Patch::Merge(&stale_patch),
                )
                .await,
            409,
            "Conflict",
        );
        let stale_delete = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: v1.resource_version(),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let failed = expect_failure(
            configmaps.delete("bundle", &stale_delete).await,
            409,
            "Conflict",
        );
        assert!(
            failed.message.contains("Precondition failed"),
            "{}",
            failed.message
        );
        assert!(
            configmaps.get("bundle").await.is_ok(),
            "a failed precondition deletes nothing"
        );
    }

    #[tokio::test]
    async fn label_and_field_selectors_filter_lists() {
        let server = TestApiServer::start().await;
        let pod = |ns: &str, name: &str, node: &str, app: &str, phase: &str| {
            let mut spec = PodSpec::new(ns, name, "default", node);
            spec.labels.insert("app".into(), app.into());
            spec.phase = phase.into();
            server.add_pod(&spec);
        };
        pod("prod", "a1", "node-a", "web", "Running");
        pod("prod", "a2", "node-a", "db", "Pending");
        pod("prod", "b1", "node-b", "web", "Running");
        pod("dev", "a3", "node-a", "web", "Running");
        let pods: Api<Pod> = Api::namespaced(server.client(), "prod");
        let list = |lp: ListParams| {
            let pods = pods.clone();
            async move { names(pods.list(&lp).await.unwrap().items) }
        };
        assert_eq!(
            list(ListParams::default().fields("spec.nodeName=node-a")).await,
            ["a1", "a2"]
        );
        assert_eq!(
            list(ListParams::default().fields("spec.nodeName!=node-a")).await,
            ["b1"]
        );
        assert_eq!(
            list(ListParams::default().fields("spec.nodeName=node-a,status.phase=Running")).await,
            ["a1"]
        );
        assert_eq!(
            list(ListParams::default().fields("metadata.name=b1")).await,
            ["b1"]
        );
        assert_eq!(
            list(ListParams::default().labels("app=web")).await,
            ["a1", "b1"]
        );
        assert_eq!(
            list(ListParams::default().labels("app in (db,cache)")).await,
            ["a2"]
        );
        assert_eq!(
            list(ListParams::default().labels("app,app!=web")).await,
            ["a2"]
        );
        assert!(list(ListParams::default().labels("!app")).await.is_empty());
        assert_eq!(
            list(
                ListParams::default()
                    .labels("app=web")
                    .fields("spec.nodeName=node-b")
            )
            .await,
            ["b1"]
        );

        let everywhere: Api<Pod> = Api::all(server.client());
        let on_a = everywhere
            .list(&ListParams::default().fields("spec.nodeName=node-a"))
            .await
            .unwrap();
        assert_eq!(
            names(on_a.items),
            ["a3", "a1", "a2"],
            "all namespaces, in key order"
        );

        let unsupported = expect_failure(
            pods.list(&ListParams::default().fields("spec.color=red"))
                .await,
            400,
            "BadRequest",
        );
        assert_eq!(unsupported.message, "field label not supported: spec.color");
        expect_failure(
            pods.list(&ListParams::default().labels("app in web")).await,
            400,
            "BadRequest",
        );
    }

    #[tokio::test]
    async fn pages_come_from_one_consistent_snapshot() {
        let server = TestApiServer::start().await;
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        let pp = PostParams::default();
        for i in 0..5 {
            configmaps
                .create(&pp, &configmap(&format!("c{i}"), &[]))
                .await
                .unwrap();
        }
        let first = configmaps
            .list(&ListParams::default().limit(2))
            .await
            .unwrap();
        assert_eq!(names(first.items.clone()), ["c0", "c1"]);
        assert_eq!(first.metadata.remaining_item_count, Some(3));
        let token = first.metadata.continue_.clone().expect("more pages");

        // Changes after the first page must not show up in later pages.
        configmaps.create(&pp, &configmap("c5", &[])).await.unwrap();
        configmaps
            .delete("c3", &DeleteParams::default())
            .await
            .unwrap();

        let second = configmaps
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap();
        assert_eq!(names(second.items), ["c2", "c3"]);
        assert_eq!(
            second.metadata.resource_version,
            first.metadata.resource_version
        );
        let third = configmaps
            .list(
                &ListParams::default()
                    .limit(2)
                    .continue_token(second.metadata.continue_.as_deref().unwrap()),
            )
            .await
            .unwrap();
        assert_eq!(names(third.items), ["c4"]);
        assert_eq!(third.metadata.continue_, None);

        let now = configmaps.list(&ListParams::default()).await.unwrap();
        assert_eq!(names(now.items), ["c0", "c1", "c2", "c4", "c5"]);
        expect_failure(
            configmaps
                .list(&ListParams::default().continue_token("not-a-token"))
                .await,
            400,
            "BadRequest",
        );
    }

    #[tokio::test]
    async fn merge_json_and_apply_patches() {
        let server = TestApiServer::start().await;
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        configmaps
            .create(&PostParams::default(), &configmap("cfg", &[("app", "web")]))
            .await
            .unwrap();

        let merged = configmaps
            .patch(
                "cfg",
                &PatchParams::default(),
                &Patch::Merge(json!({ "data": { "extra": "1", "k": null } })),
            )
            .await
            .unwrap();
        assert_eq!(
            merged.data,
            Some(BTreeMap::from([("extra".into(), "1".into())]))
        );

        let ops: json_patch::Patch =
            serde_json::from_value(json!([{ "op": "add", "path": "/data/added", "value": "2" }]))
                .unwrap();
        let patched = configmaps
            .patch("cfg", &PatchParams::default(), &Patch::Json::<()>(ops))
            .await
            .unwrap();
        assert_eq!(patched.data.unwrap()["added"], "2");
        let failing: json_patch::Patch = serde_json::from_value(
            json!([{ "op": "test", "path": "/data/added", "value": "nope" }]),
        )
        .unwrap();
        expect_failure(
            configmaps
                .patch("cfg", &PatchParams::default(), &Patch::Json::<()>(failing))
                .await,
            422,
            "Invalid",
        );

        // Server-side apply creates, then merges.
        let apply = PatchParams::apply("sigil-test");
        let config = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "applied" }, "data": { "a": "1" } });
        let created = configmaps
            .patch("applied", &apply, &Patch::Apply(&config))
            .await
            .unwrap();
        assert_eq!(created.metadata.namespace.as_deref(), Some("default"));
        let config = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "applied" }, "data": { "b": "2" } });
        let updated = configmaps
            .patch("applied", &apply, &Patch::Apply(&config))
            .await
            .unwrap();
        assert_eq!(updated.data.unwrap().len(), 2);
        assert_eq!(updated.metadata.uid, created.metadata.uid);

        expect_failure(
            configmaps
                .patch(
                    "cfg",
                    &PatchParams::default(),
                    &Patch::Strategic(json!({ "data": {} })),
                )
                .await,
            415,
            "UnsupportedMediaType",
        );
        expect_failure(
            configmaps
                .patch(
                    "absent",
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "data": {} })),
                )
                .await,
            404,
            "NotFound",
        );
    }

    #[tokio::test]
    async fn pod_status_is_a_subresource() {
        let server = TestApiServer::start().await;
        let pods: Api<Pod> = Api::default_namespaced(server.client());
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": "web" },
            "spec": { "containers": [ { "name": "app", "image": "app:1" } ] },
            "status": { "phase": "Running" }
        }))
        .unwrap();
        let created = pods.create(&PostParams::default(), &pod).await.unwrap();
        let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
        assert_eq!(
            phase(&created).as_deref(),
            Some("Pending"),
            "clients cannot create status"
        );

        let mut change_status = created.clone();
        change_status.status.as_mut().unwrap().phase = Some("Failed".into());
        let kept = pods
            .replace("web", &PostParams::default(), &change_status)
            .await
            .unwrap();
        assert_eq!(
            phase(&kept).as_deref(),
            Some("Pending"),
            "main resource ignores status"
        );

        let running = pods
            .patch_status("web", &PatchParams::default(), &Patch::Merge(json!({ "status": { "phase": "Running" },
                                                                               "metadata": { "labels": { "x": "y" } } })))
            .await
            .unwrap();
        assert_eq!(phase(&running).as_deref(), Some("Running"));
        assert_eq!(
            running.metadata.labels, None,
            "status writes change only status"
        );

        // Pods answer deletes with the deleted pod.
        let deleted = pods.delete("web", &DeleteParams::default()).await.unwrap();
        assert_eq!(deleted.left().expect("the deleted pod").name_any(), "web");
    }

    #[tokio::test]
    async fn finalizers_hold_deletion_until_removed() {
        let server = TestApiServer::start().await;
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        let mut cm = configmap("held", &[]);
        cm.metadata.finalizers = Some(vec!["sigil.dev/cleanup".into()]);
        configmaps
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
        let pending = configmaps
            .delete("held", &DeleteParams::default())
            .await
            .unwrap();
        let pending = pending.left().expect("the object, still there");
        assert!(pending.metadata.deletion_timestamp.is_some());
        assert!(configmaps.get("held").await.is_ok());
        configmaps
            .patch(
                "held",
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
            )
            .await
            .unwrap();
        expect_failure(configmaps.get("held").await, 404, "NotFound");
    }

    #[tokio::test]
    async fn invalid_objects_and_requests_are_rejected() {
        let server = TestApiServer::start().await;
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        let pp = PostParams::default();
        let bad_name = expect_failure(
            configmaps.create(&pp, &configmap("Bad_Name", &[])).await,
            422,
            "Invalid",
        );
        assert_eq!(bad_name.details.unwrap().causes[0].field, "metadata.name");
        expect_failure(
            configmaps
                .create(&pp, &configmap("ok", &[("app", "-bad-")]))
                .await,
            422,
            "Invalid",
        );
        let mut elsewhere = configmap("moved", &[]);
        elsewhere.metadata.namespace = Some("other".into());
        let mismatch = expect_failure(configmaps.create(&pp, &elsewhere).await, 400, "BadRequest");
        assert!(
            mismatch.message.contains("does not match the namespace"),
            "{}",
            mismatch.message
        );
        let mut nameless = configmap("x", &[]);
        nameless.metadata.name = None;
        expect_failure(configmaps.create(&pp, &nameless).await, 422, "Invalid");
        let mut generated = configmap("x", &[]);
        generated.metadata.name = None;
        generated.metadata.generate_name = Some("gen-".into());
        let made = configmaps.create(&pp, &generated).await.unwrap();
        assert!(made.name_any().starts_with("gen-") && made.name_any().len() == 9);

        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let would_be = configmaps
            .create(&dry, &configmap("dry", &[]))
            .await
            .unwrap();
        assert_eq!(would_be.name_any(), "dry");
        expect_failure(configmaps.get("dry").await, 404, "NotFound");
    }

    #[tokio::test]
    async fn metadata_only_lists() {
        let server = TestApiServer::start().await;
        server.add_pod(&PodSpec::new("default", "p1", "default", "node-a"));
        let pods: Api<Pod> = Api::default_namespaced(server.client());
        let list = pods.list_metadata(&ListParams::default()).await.unwrap();
        assert_eq!(list.items.len(), 1);
        assert_eq!(list.items[0].metadata.name.as_deref(), Some("p1"));
        assert_eq!(
            list.items[0].types.as_ref().unwrap().kind,
            "PartialObjectMetadata"
        );
    }

    fn policy_crd() -> CustomResourceDefinition {
        serde_json::from_value(json!({
            "metadata": { "name": "policies.sigil.dev" },
            "spec": {
                "group": "sigil.dev",
                "names": { "plural": "policies", "singular": "policy", "kind": "Policy", "listKind": "PolicyList" },
                "scope": "Namespaced",
                "versions": [{
                    "name": "v1alpha1", "served": true, "storage": true,
                    "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                    "subresources": { "status": {} },
                    "selectableFields": [ { "jsonPath": ".spec.mode" } ]
                }]
            }
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn custom_resources_work_once_their_crd_exists() {
        let server = TestApiServer::start().await;
        let client = server.client();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&PostParams::default(), &policy_crd())
            .await
            .unwrap();

        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("sigil.dev", "v1alpha1", "Policy"),
            "policies",
        );
        let policies: Api<DynamicObject> = Api::namespaced_with(client.clone(), "prod", &resource);
        for (name, mode) in [("strict", "strict"), ("lax", "permissive")] {
            let object =
                DynamicObject::new(name, &resource).data(json!({ "spec": { "mode": mode } }));
            let created = policies
                .create(&PostParams::default(), &object)
                .await
                .unwrap();
            assert_eq!(created.metadata.generation, Some(1));
        }
        let list = policies
            .list(&ListParams::default().fields("spec.mode=strict"))
            .await
            .unwrap();
        assert_eq!(list.types.kind, "PolicyList");
        assert_eq!(names(list.items.clone()), ["strict"]);
        assert_eq!(
            list.items[0].types.as_ref().unwrap().kind,
            "Policy",
            "custom resource items keep their kind"
        );

        // Spec changes bump the generation, status writes do not.
        let bumped = policies
            .patch(
                "strict",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "mode": "stricter" } })),
            )
            .await
            .unwrap();
        assert_eq!(bumped.metadata.generation, Some(2));
        let with_status = policies
            .patch_status(
                "strict",
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "ready": true } })),
            )
            .await
            .unwrap();
        assert_eq!(with_status.metadata.generation, Some(2));
        assert_eq!(with_status.data["status"]["ready"], true);

        let deleted = policies
            .delete("lax", &DeleteParams::default())
            .await
            .unwrap();
        assert_eq!(
            deleted
                .left()
                .expect("custom resources return the object")
                .name_any(),
            "lax"
        );

        // Discovery now lists the custom resource.
        let request = http::Request::get("/apis/sigil.dev/v1alpha1")
            .body(Vec::new())
            .unwrap();
        let discovery: serde_json::Value = client.request(request).await.unwrap();
        assert_eq!(discovery["resources"][0]["name"], "policies");
        assert_eq!(discovery["resources"][1]["name"], "policies/status");
    }

    #[tokio::test]
    async fn undefined_resources_are_stored_generically() {
        let server = TestApiServer::start().await;
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("example.com", "v1", "Widget"),
            "widgets",
        );
        let widgets: Api<DynamicObject> =
            Api::namespaced_with(server.client(), "default", &resource);
        let object = DynamicObject::new("w1", &resource).data(json!({ "spec": { "size": 3 } }));
        widgets
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
        let got = widgets.get("w1").await.unwrap();
        assert_eq!(got.data["spec"]["size"], 3);
        assert_eq!(
            widgets
                .list(&ListParams::default())
                .await
                .unwrap()
                .types
                .kind,
            "WidgetList"
        );
        let missing = expect_failure(widgets.get("w2").await, 404, "NotFound");
        assert_eq!(missing.message, "widgets.example.com \"w2\" not found");
        assert_eq!(missing.details.unwrap().group, "example.com");
    }

    #[tokio::test]
    async fn undefined_resources_can_be_not_found_until_their_crd_exists() {
        let server = TestApiServer::start_with(ServerOptions {
            serve_undefined_resources: false,
            ..ServerOptions::default()
        })
        .await;
        let client = server.client();
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("sigil.dev", "v1alpha1", "Policy"),
            "policies",
        );
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let policies: Api<DynamicObject> = Api::namespaced_with(client.clone(), "prod", &resource);
        let missing = expect_failure(all.list(&ListParams::default()).await, 404, "NotFound");
        assert_eq!(
            missing.message,
            "the server could not find the requested resource"
        );
        let object = DynamicObject::new("p", &resource).data(json!({ "spec": {} }));
        expect_failure(
            policies.create(&PostParams::default(), &object).await,
            404,
            "NotFound",
        );
        // Built-in resources are served all the same.
        let configmaps: Api<ConfigMap> = Api::default_namespaced(client.clone());
        assert!(configmaps.list(&ListParams::default()).await.is_ok());

        let crds: Api<CustomResourceDefinition> = Api::all(client);
        crds.create(&PostParams::default(), &policy_crd())
            .await
            .unwrap();
        policies
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
        assert_eq!(
            names(all.list(&ListParams::default()).await.unwrap().items),
            ["p"]
        );
    }

    #[tokio::test]
    async fn wrong_scope_paths_are_not_served() {
        let server = TestApiServer::start().await;
        let client = server.client();
        let raw = |method: &str, path: &str| {
            http::Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json")
                .body(b"{}".to_vec())
                .unwrap()
        };
        let status = api_status(
            client
                .request::<serde_json::Value>(raw("POST", "/api/v1/pods"))
                .await,
        );
        assert_eq!(status.code, 405);
        let status = api_status(
            client
                .request::<serde_json::Value>(raw("GET", "/api/v1/namespaces/a/namespaces/b"))
                .await,
        );
        assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
        let status = api_status(
            client
                .request::<serde_json::Value>(raw("GET", "/api/v1/namespaces/a/pods/p/log"))
                .await,
        );
        assert_eq!(status.code, 404);
        let status = api_status(
            client
                .request::<serde_json::Value>(raw(
                    "GET",
                    "/apis/authentication.k8s.io/v1/tokenreviews",
                ))
                .await,
        );
        assert_eq!(status.code, 405);
    }
}
