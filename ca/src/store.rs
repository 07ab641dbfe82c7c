//! Where the self-signed CA keeps its state: a directory (outside Kubernetes) or the Secret
//! `sigil-system/sigil-ca`. Both create the state only if absent, so replicas that start together
//! end with one root: the loser of the race reads the winner's.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::state::CaState;

/// The key under which the state document is kept in the Secret and the file name in the directory.
pub const STATE_KEY: &str = "ca.json";
/// Public copy of the trust bundle, next to the state, for operators.
pub const BUNDLE_KEY: &str = "root-cert.pem";
pub const DEFAULT_SECRET_NAMESPACE: &str = "sigil-system";
pub const DEFAULT_SECRET_NAME: &str = "sigil-ca";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Secret {0} has no {STATE_KEY} key")]
    MissingKey(String),
    #[error("the stored state changed underneath this update; retry")]
    Conflict,
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// A place that holds one `CaState`, with a version for optimistic concurrency.
#[derive(Clone)]
pub enum StateStore {
    Dir(PathBuf),
    Secret { api: Box<Api<Secret>>, name: String },
}

/// A state as read, with the version needed to replace it.
#[derive(Clone, Debug)]
pub struct Versioned {
    pub state: CaState,
    version: Option<String>,
}

impl StateStore {
    pub fn secret(client: kube::Client, namespace: &str, name: &str) -> Self {
        StateStore::Secret {
            api: Box::new(Api::namespaced(client, namespace)),
            name: name.to_string(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            StateStore::Dir(dir) => format!("directory {}", dir.display()),
            StateStore::Secret { api: _, name } => format!("Secret {name}"),
        }
    }

    pub async fn load(&self) -> Result<Option<Versioned>, StoreError> {
        match self {
            StateStore::Dir(dir) => {
                let path = dir.join(STATE_KEY);
                match tokio::fs::read(&path).await {
                    Ok(bytes) => {
                        let version = format!("{:x}", crc(&bytes));
                        Ok(Some(Versioned {
                            state: CaState::decode(&bytes)?,
                            version: Some(version),
                        }))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(StoreError::Io { path, source }),
                }
            }
            StateStore::Secret { api, name } => {
                let Some(secret) = api.get_opt(name).await? else {
                    return Ok(None);
                };
                let bytes = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(STATE_KEY))
                    .ok_or_else(|| StoreError::MissingKey(name.clone()))?;
                Ok(Some(Versioned {
                    state: CaState::decode(&bytes.0)?,
                    version: secret.metadata.resource_version.clone(),
                }))
            }
        }
    }

    /// Stores `state` unless some state is there already; returns whichever state is stored.
    pub async fn create_if_absent(
        &self,
        state: &CaState,
        bundle_pem: &str,
    ) -> Result<Versioned, StoreError> {
        match self {
            StateStore::Dir(dir) => {
                let io = |source| StoreError::Io {
                    path: dir.clone(),
                    source,
                };
                std::fs::create_dir_all(dir).map_err(io)?;
                let tmp = write_private_temp(dir, &state.encode()).map_err(io)?;
                // hard_link fails if the target exists, so exactly one creator wins.
                let linked = std::fs::hard_link(&tmp, dir.join(STATE_KEY));
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {
                        write_public(dir, bundle_pem).map_err(io)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io(e)),
                }
            }
            StateStore::Secret { api, name } => {
                let secret = state_secret(name, state, bundle_pem, None);
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.load()
            .await?
            .ok_or_else(|| StoreError::MissingKey(self.describe()))
    }

    /// Replaces the state read as `previous`; `Conflict` if it changed since.
    pub async fn replace(
        &self,
        previous: &Versioned,
        state: &CaState,
        bundle_pem: &str,
    ) -> Result<(), StoreError> {
        match self {
            StateStore::Dir(dir) => {
                let io = |source| StoreError::Io {
                    path: dir.clone(),
                    source,
                };
                let current = self.load().await?;
                if current.map(|c| c.version) != Some(previous.version.clone()) {
                    return Err(StoreError::Conflict);
                }
                let tmp = write_private_temp(dir, &state.encode()).map_err(io)?;
                std::fs::rename(&tmp, dir.join(STATE_KEY)).map_err(io)?;
                write_public(dir, bundle_pem).map_err(io)?;
                Ok(())
            }
            StateStore::Secret { api, name } => {
                let secret = state_secret(name, state, bundle_pem, previous.version.clone());
                match api.replace(name, &PostParams::default(), &secret).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        Err(StoreError::Conflict)
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}

fn state_secret(name: &str, state: &CaState, bundle_pem: &str, version: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            resource_version: version,
            labels: Some([("app.kubernetes.io/part-of".to_string(), "sigil".to_string())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(
            [
                (STATE_KEY.to_string(), ByteString(state.encode())),
                (
                    BUNDLE_KEY.to_string(),
                    ByteString(bundle_pem.as_bytes().to_vec()),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

/// Writes the private state to a fresh 0600 temp file in `dir` (same filesystem, for link/rename).
fn write_private_temp(dir: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let tmp = dir.join(format!(
        ".{STATE_KEY}.{}.{}",
        std::process::id(),
        crc(bytes)
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(tmp)
}

fn write_public(dir: &Path, bundle_pem: &str) -> std::io::Result<()> {
    let path = dir.join(BUNDLE_KEY);
    let tmp = dir.join(format!(".{BUNDLE_KEY}.{}", std::process::id()));
    std::fs::write(&tmp, bundle_pem)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(tmp, path)
}

/// A content fingerprint, used as the directory store's version.
fn crc(bytes: &[u8]) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_identity::TrustDomain;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[tokio::test]
    async fn dir_create_if_absent_keeps_the_first_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::Dir(dir.path().join("state"));
        assert!(store.load().await.unwrap().is_none());
        let first = CaState::new_self_signed(&td(), 1).unwrap();
        let second = CaState::new_self_signed(&td(), 2).unwrap();
        let a = store.create_if_absent(&first, "pem").await.unwrap();
        let b = store.create_if_absent(&second, "pem").await.unwrap();
        assert_eq!(a.state, first);
        assert_eq!(b.state, first);
        let mode = std::fs::metadata(dir.path().join("state").join(STATE_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the state holds private keys");
    }

    #[tokio::test]
    async fn dir_replace_detects_concurrent_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::Dir(dir.path().to_path_buf());
        let first = CaState::new_self_signed(&td(), 1).unwrap();
        let read = store.create_if_absent(&first, "pem").await.unwrap();
        let mut next = first.clone();
        next.generations[0].added_at = 5;
        store.replace(&read, &next, "pem").await.unwrap();
        let err = store.replace(&read, &first, "pem").await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict));
        assert_eq!(store.load().await.unwrap().unwrap().state, next);
    }

    #[tokio::test]
    async fn secret_create_race_ends_with_one_state() {
        let server = sigil_test_apiserver::TestApiServer::start().await;
        let store = StateStore::secret(server.client(), "sigil-system", "sigil-ca");
        let (a, b) = (
            CaState::new_self_signed(&td(), 1).unwrap(),
            CaState::new_self_signed(&td(), 2).unwrap(),
        );
        let (ra, rb) = tokio::join!(
            store.create_if_absent(&a, "pem"),
            store.create_if_absent(&b, "pem")
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.state, rb.state);
        assert!(ra.state == a || ra.state == b);

        let mut next = ra.state.clone();
        next.generations[0].added_at = 9;
        store.replace(&ra, &next, "pem").await.unwrap();
        assert!(matches!(
            store.replace(&ra, &next, "pem").await,
            Err(StoreError::Conflict)
        ));
    }
}
