//! Authenticates every call on the CA's gRPC port from its headers, before tonic reads its
//! message: a call without a valid credential is answered UNAUTHENTICATED while its body is still
//! in HTTP/2's flow-control window, so unauthenticated peers cannot make the CA buffer messages.
//! A call that authenticates moves its connection to the authenticated connection slots
//! (`tls_server::Admission`) and carries its caller to the handler (`service::Authenticated`).

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::metadata::MetadataMap;

use crate::service::{Authenticated, Ca};
use crate::tls_server::PeerInfo;

/// The tower layer in front of the gRPC services.
#[derive(Clone)]
pub struct AuthenticateFirstLayer(pub Arc<Ca>);

impl<S> tower::Layer<S> for AuthenticateFirstLayer {
    type Service = AuthenticateFirst<S>;

    fn layer(&self, inner: S) -> AuthenticateFirst<S> {
        AuthenticateFirst {
            inner,
            ca: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthenticateFirst<S> {
    inner: S,
    ca: Arc<Ca>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthenticateFirst<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone may not be ready; the one polled ready is the one to call.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let ca = self.ca.clone();
        Box::pin(async move {
            let peer = request.extensions().get::<PeerInfo>().cloned();
            let metadata = MetadataMap::from_headers(request.headers().clone());
            match ca
                .authenticate_call(request.uri().path(), &metadata, peer.as_ref())
                .await
            {
                Ok(caller) => {
                    if let Some(peer) = &peer {
                        peer.admission.authenticated();
                    }
                    request.extensions_mut().insert(Authenticated(caller));
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}
