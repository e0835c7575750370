//! Which responses mean "this token was refused".
//!
//! Plain HTTP APIs answer `401 Unauthorized` ([`Http401`], the default). gRPC reports
//! a refused token as `grpc-status: 16` (UNAUTHENTICATED), usually in a
//! trailers-only response with HTTP status 200 ([`GrpcUnauthenticated`]). A closure
//! `Fn(&http::Response<B>) -> bool` can decide anything else.
//!
//! A response classified as unauthorized is treated exactly like a 401: the token it
//! carried is invalidated (if still current) and the request is resent once when its
//! body can be replayed.
//!
//! ```
//! use eshopbox_auth::classify::GrpcUnauthenticated;
//! use eshopbox_auth::{Credentials, EshopboxAuthLayer};
//!
//! # fn main() -> Result<(), eshopbox_auth::Error> {
//! let layer = EshopboxAuthLayer::builder(Credentials::new("id", "secret", "rt"))
//!     .unauthorized_when(GrpcUnauthenticated)
//!     .build()?;
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

use http::{Response, StatusCode};

/// Decides whether a response means the request's token was refused.
pub trait UnauthorizedPolicy<B>: Clone + Send + Sync + 'static {
    /// Whether `response` means the token was refused. Only the status and headers
    /// should be looked at: the body has not arrived yet.
    fn is_unauthorized(&self, response: &Response<B>) -> bool;
}

/// HTTP `401 Unauthorized`. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Http401;

impl<B> UnauthorizedPolicy<B> for Http401 {
    fn is_unauthorized(&self, response: &Response<B>) -> bool {
        response.status() == StatusCode::UNAUTHORIZED
    }
}

/// gRPC: `grpc-status: 16` (UNAUTHENTICATED) in the response headers — a
/// trailers-only response, which is how gRPC servers refuse a call before running
/// it — or HTTP 401 from a proxy in front of the server.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcUnauthenticated;

impl<B> UnauthorizedPolicy<B> for GrpcUnauthenticated {
    fn is_unauthorized(&self, response: &Response<B>) -> bool {
        response.status() == StatusCode::UNAUTHORIZED
            || response
                .headers()
                .get("grpc-status")
                .is_some_and(|status| status.as_bytes() == b"16")
    }
}

impl<B, F> UnauthorizedPolicy<B> for F
where
    F: Fn(&Response<B>) -> bool + Clone + Send + Sync + 'static,
{
    fn is_unauthorized(&self, response: &Response<B>) -> bool {
        self(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, grpc_status: Option<&'static str>) -> Response<()> {
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        if let Some(code) = grpc_status {
            res.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static(code));
        }
        res
    }

    #[test]
    fn http_401_only() {
        assert!(Http401.is_unauthorized(&response(401, None)));
        assert!(!Http401.is_unauthorized(&response(403, None)));
        assert!(!Http401.is_unauthorized(&response(200, Some("16"))));
    }

    #[test]
    fn grpc_unauthenticated_in_headers_or_401() {
        assert!(GrpcUnauthenticated.is_unauthorized(&response(200, Some("16"))));
        assert!(GrpcUnauthenticated.is_unauthorized(&response(401, None)));
        assert!(!GrpcUnauthenticated.is_unauthorized(&response(200, Some("0"))));
        assert!(!GrpcUnauthenticated.is_unauthorized(&response(200, Some("7"))));
        assert!(!GrpcUnauthenticated.is_unauthorized(&response(200, None)));
    }

    #[test]
    fn closures_decide() {
        let forbidden = |res: &Response<()>| res.status() == StatusCode::FORBIDDEN;
        assert!(forbidden.is_unauthorized(&response(403, None)));
        assert!(!forbidden.is_unauthorized(&response(401, None)));
        assert!(!forbidden.is_unauthorized(&response(200, None)));
    }
}
