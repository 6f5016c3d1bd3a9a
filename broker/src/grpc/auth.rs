//! Bearer tokens on the client port: a tower layer in front of every service
//! (and before forwarding, so a call is checked once, where it enters the
//! cluster). With no token file it lets everything through.
//!
//! | path | role needed |
//! |---|---|
//! | `grpc.health.v1.Health/*`, `grpc.reflection.*` | none (open) |
//! | `gantry.v1.Jobs/*` | `producer` |
//! | `gantry.v1.Worker/*` | `worker` |
//! | anything else (`gantry.v1.Admin/*`, unknown) | `admin` |
//!
//! `admin` may call everything. No or an unknown token is UNAUTHENTICATED, a
//! token without the role PERMISSION_DENIED; the message says which.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::security::tokens::{Lookup, Role, TokenFile, Tokens};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

#[derive(Clone)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenFile>>,
}

impl AuthLayer {
    /// `None`: no token file, every call passes.
    pub fn new(tokens: Option<Arc<TokenFile>>) -> Self {
        AuthLayer { tokens }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, tokens: self.tokens.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<TokenFile>>,
}

/// The role a call needs; `None` for the open services.
fn required_role(path: &str) -> Option<Role> {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        None
    } else if path.starts_with("/gantry.v1.Jobs/") {
        Some(Role::Producer)
    } else if path.starts_with("/gantry.v1.Worker/") {
        Some(Role::Worker)
    } else {
        Some(Role::Admin)
    }
}

/// Checks the call's `authorization` metadata against `tokens`.
pub fn check(tokens: &Tokens, path: &str, authorization: Option<&http::HeaderValue>) -> Result<(), Status> {
    let Some(needed) = required_role(path) else { return Ok(()) };
    let Some(value) = authorization else {
        return Err(Status::unauthenticated(
            "missing bearer token: this broker requires `authorization: Bearer <token>` metadata (gantry --token, GANTRY_TOKEN)",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| Status::unauthenticated("authorization metadata is not `Bearer <token>`"))?;
    match tokens.lookup(token.as_bytes()) {
        Lookup::Unknown => Err(Status::unauthenticated("unknown bearer token: it is not in this broker's token file")),
        Lookup::Known(roles) if roles.allows(needed) => Ok(()),
        Lookup::Known(roles) => {
            let or_admin = if needed == Role::Admin { "" } else { " (or admin)" };
            Err(Status::permission_denied(format!(
                "{path} needs the {} role{or_admin}; this token has {}",
                needed.name(),
                roles.names().join(", ")
            )))
        }
    }
}

impl<S> Service<Request<Body>> for Auth<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Body>) -> BoxFuture {
        if let Some(file) = &self.tokens
            && let Err(status) =
                check(&file.tokens(), request.uri().path(), request.headers().get(http::header::AUTHORIZATION))
        {
            tracing::debug!(path = request.uri().path(), code = ?status.code(), "call refused");
            return Box::pin(async move { Ok(status.into_http::<Body>()) });
        }
        // The clone is not ready; the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { inner.call(request).await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::parse("producer-token-0001 producer\nworker-token-000002 worker\nadmin-token-0000003 admin\n").unwrap()
    }

    fn code(path: &str, header: Option<&str>) -> tonic::Code {
        let header = header.map(|h| http::HeaderValue::from_str(h).unwrap());
        match check(&tokens(), path, header.as_ref()) {
            Ok(()) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    }

    #[test]
    fn roles_by_service() {
        use tonic::Code::*;
        let producer = Some("Bearer producer-token-0001");
        let worker = Some("bearer worker-token-000002");
        let admin = Some("Bearer admin-token-0000003");
        assert_eq!(code("/gantry.v1.Jobs/Enqueue", producer), Ok);
        assert_eq!(code("/gantry.v1.Jobs/Enqueue", worker), PermissionDenied);
        assert_eq!(code("/gantry.v1.Jobs/Enqueue", admin), Ok);
        assert_eq!(code("/gantry.v1.Worker/Connect", worker), Ok);
        assert_eq!(code("/gantry.v1.Worker/Connect", producer), PermissionDenied);
        assert_eq!(code("/gantry.v1.Admin/ListQueues", producer), PermissionDenied);
        assert_eq!(code("/gantry.v1.Admin/ListQueues", admin), Ok);
        assert_eq!(code("/gantry.peer.v1.PeerService/Raft", worker), PermissionDenied, "unknown paths need admin");
        assert_eq!(code("/gantry.v1.Jobs/Enqueue", None), Unauthenticated);
        assert_eq!(code("/gantry.v1.Jobs/Enqueue", Some("Bearer nope-nope-nope-nope")), Unauthenticated);
        assert_eq!(code("/gantry.v1.Jobs/Enqueue", Some("Basic cHJvZHVjZXI=")), Unauthenticated);
        assert_eq!(code("/grpc.health.v1.Health/Check", None), Ok);
        assert_eq!(code("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None), Ok);
        let status = check(&tokens(), "/gantry.v1.Admin/AddNode", Some(&"Bearer producer-token-0001".parse().unwrap()))
            .unwrap_err();
        assert_eq!(status.message(), "/gantry.v1.Admin/AddNode needs the admin role; this token has producer");
    }
}
