//! Helpers for the tests that drive the double through the real `kube` client.

use std::{collections::BTreeMap, fmt::Debug, time::Duration};

use futures::{Stream, StreamExt};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{api::ObjectMeta, core::Status};

/// How long a test waits for something the server should do promptly.
pub const PROMPTLY: Duration = Duration::from_secs(5);

/// The `Status` of a failed call; panics on success or on a non-API error.
pub fn api_status<T: Debug>(result: Result<T, kube::Error>) -> Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

/// Asserts code and reason of a failed call and returns its Status for further checks.
pub fn expect_failure<T: Debug>(result: Result<T, kube::Error>, code: u16, reason: &str) -> Status {
    let status = api_status(result);
    assert_eq!(
        (status.code, status.reason.as_str()),
        (code, reason),
        "{status:?}"
    );
    status
}

pub fn secret(name: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "value".into(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

pub fn configmap(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("k".into(), "v".into())])),
        ..ConfigMap::default()
    }
}

/// The next item of a stream, failing the test if none comes promptly.
pub async fn next_within<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    tokio::time::timeout(PROMPTLY, stream.next())
        .await
        .expect("the server should have sent the next event by now")
}
