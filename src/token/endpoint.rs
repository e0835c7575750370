//! The Eshopbox token call: `POST /api/v1/generateToken` with the refresh-token grant.

use std::sync::{Arc, Mutex, PoisonError};

use http::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::response::{oauth_error_code, parse};
use super::{BoxFuture, Source, TokenResponse};
use crate::credentials::Credentials;
use crate::error::{Error, ErrorKind};

/// The largest token answer read; a longer body is refused rather than buffered.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// How the grant's fields are encoded in the token request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestFormat {
    /// `Content-Type: application/json` — what the Eshopbox documentation shows.
    #[default]
    Json,
    /// `Content-Type: application/x-www-form-urlencoded`, the classic OAuth 2 form.
    Form,
}

/// Fetches tokens from the Eshopbox token endpoint.
pub(crate) struct EshopboxEndpoint {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    url: reqwest::Url,
    format: RequestFormat,
    client_id: String,
    client_secret: SecretString,
    /// The refresh token to send next; replaced when the endpoint rotates it.
    refresh_token: Mutex<SecretString>,
}

#[derive(Serialize)]
struct Grant<'a> {
    client_id: &'a str,
    client_secret: &'a str,
    grant_type: &'static str,
    refresh_token: &'a str,
}

impl EshopboxEndpoint {
    pub(crate) fn new(
        client: reqwest::Client,
        url: reqwest::Url,
        format: RequestFormat,
        credentials: Credentials,
    ) -> Self {
        EshopboxEndpoint {
            inner: Arc::new(Inner {
                client,
                url,
                format,
                client_id: credentials.client_id,
                client_secret: credentials.client_secret,
                refresh_token: Mutex::new(credentials.refresh_token),
            }),
        }
    }
}

impl Source for EshopboxEndpoint {
    fn fetch(&self) -> BoxFuture<Result<TokenResponse, Error>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.fetch().await })
    }
}

impl Inner {
    fn body(&self) -> Result<(Vec<u8>, &'static str), Error> {
        let refresh_token = self
            .refresh_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let grant = Grant {
            client_id: &self.client_id,
            client_secret: self.client_secret.expose_secret(),
            grant_type: "refresh_token",
            refresh_token: refresh_token.expose_secret(),
        };
        // Neither serializer can fail on four strings; the messages below never quote
        // the values.
        match self.format {
            RequestFormat::Json => serde_json::to_vec(&grant)
                .map(|b| (b, "application/json"))
                .map_err(|_| Error::config("could not encode the token request as JSON")),
            RequestFormat::Form => serde_urlencoded::to_string(&grant)
                .map(|s| (s.into_bytes(), "application/x-www-form-urlencoded"))
                .map_err(|_| Error::config("could not form-encode the token request")),
        }
    }

    async fn fetch(&self) -> Result<TokenResponse, Error> {
        let (body, content_type) = self.body()?;
        let mut response = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, content_type)
            .header(ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error(e, "sending the token request"))?;
        let status = response.status();

        if response
            .content_length()
            .is_some_and(|len| len > MAX_BODY as u64)
        {
            return Err(too_large(status));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error(e, "reading the token response"))?
        {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(too_large(status));
            }
            bytes.extend_from_slice(&chunk);
        }

        if !status.is_success() {
            return Err(status_error(status, &bytes));
        }
        let token = parse(&bytes)?;
        if let Some(rotated) = &token.refresh_token {
            let mut current = self
                .refresh_token
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if current.expose_secret() != rotated.expose_secret() {
                *current = rotated.clone();
                tracing::info!("token endpoint rotated the refresh token; using the new one");
            }
        }
        Ok(token)
    }
}

/// An error for a non-2xx answer. 408, 429 and 5xx are worth retrying later; other
/// 4xx mean the credentials or the refresh token were refused.
fn status_error(status: StatusCode, body: &[u8]) -> Error {
    let code = oauth_error_code(body);
    let (kind, message) = if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        (ErrorKind::Unavailable, "token endpoint failed")
    } else if status.is_client_error() {
        (
            ErrorKind::Rejected,
            "token endpoint refused the credentials or refresh token",
        )
    } else {
        (
            ErrorKind::InvalidResponse,
            "token endpoint answered an unexpected status",
        )
    };
    Error::new(kind, message).with_status(status, code)
}

fn too_large(status: StatusCode) -> Error {
    Error::invalid_response(format!(
        "token endpoint answered more than {MAX_BODY} bytes"
    ))
    .with_status(status, None)
}

/// Wraps a transport failure. The URL is stripped (it may carry a query string) and
/// no request body is ever part of a reqwest error.
fn transport_error(e: reqwest::Error, doing: &str) -> Error {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    Error::unavailable(format!("{doing} {what}")).with_source(e.without_url())
}
