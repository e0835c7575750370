//! The token call: a form or JSON `POST` of an OAuth 2 grant — Eshopbox's
//! `POST /api/v1/generateToken` with the refresh-token grant by default.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::response::{oauth_error_code, parse, rotated_refresh_token};
use super::source::{FetchedToken, TokenSource};
use crate::boxed::BoxFuture;
use crate::credentials::Credentials;
use crate::error::{Error, ErrorKind, MAX_RETRY_AFTER};

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

/// Fetches tokens with one OAuth 2 grant from one token endpoint.
pub(crate) struct GrantEndpoint {
    inner: Arc<Inner>,
}

/// Which grant a [`GrantEndpoint`] sends.
pub(crate) enum GrantKind {
    /// `grant_type=refresh_token`, with the refresh token to send next (replaced when
    /// the endpoint rotates it).
    RefreshToken(Mutex<SecretString>),
    /// `grant_type=client_credentials`, with an optional `scope`.
    ClientCredentials { scope: Option<String> },
}

/// Everything a [`GrantEndpoint`] needs.
pub(crate) struct GrantConfig {
    pub(crate) client: reqwest::Client,
    pub(crate) url: reqwest::Url,
    pub(crate) format: RequestFormat,
    pub(crate) client_id: String,
    pub(crate) client_secret: SecretString,
    pub(crate) grant: GrantKind,
    /// Send the client credentials as HTTP Basic instead of in the body.
    pub(crate) basic_auth: bool,
    pub(crate) on_rotated: Option<RotationHook>,
}

struct Inner {
    config: GrantConfig,
}

/// Called with the new refresh token after the endpoint rotated it.
pub(crate) type RotationHook = Arc<dyn Fn(&SecretString) + Send + Sync + 'static>;

#[derive(Serialize)]
struct Fields<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_secret: Option<&'a str>,
    grant_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

impl GrantEndpoint {
    pub(crate) fn new(config: GrantConfig) -> Self {
        GrantEndpoint {
            inner: Arc::new(Inner { config }),
        }
    }

    /// Eshopbox's refresh-token grant, credentials in the body.
    pub(crate) fn eshopbox(
        client: reqwest::Client,
        url: reqwest::Url,
        format: RequestFormat,
        credentials: Credentials,
        on_rotated: Option<RotationHook>,
    ) -> Self {
        GrantEndpoint::new(GrantConfig {
            client,
            url,
            format,
            client_id: credentials.client_id,
            client_secret: credentials.client_secret,
            grant: GrantKind::RefreshToken(Mutex::new(credentials.refresh_token)),
            basic_auth: false,
            on_rotated,
        })
    }
}

impl TokenSource for GrantEndpoint {
    fn fetch(&self) -> BoxFuture<'_, Result<FetchedToken, Error>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.fetch().await })
    }

    fn use_refresh_token(&self, refresh_token: SecretString) {
        if let GrantKind::RefreshToken(current) = &self.inner.config.grant {
            *current.lock().unwrap_or_else(PoisonError::into_inner) = refresh_token;
        }
    }

    fn refresh_token(&self) -> Option<SecretString> {
        self.inner.refresh_token()
    }
}

impl Inner {
    fn body(&self) -> Result<(Vec<u8>, &'static str), Error> {
        let config = &self.config;
        let (grant_type, refresh_token, scope) = match &config.grant {
            GrantKind::RefreshToken(token) => (
                "refresh_token",
                Some(token.lock().unwrap_or_else(PoisonError::into_inner).clone()),
                None,
            ),
            GrantKind::ClientCredentials { scope } => {
                ("client_credentials", None, scope.as_deref())
            }
        };
        let in_body = !config.basic_auth;
        let grant = Fields {
            client_id: in_body.then_some(config.client_id.as_str()),
            client_secret: in_body.then(|| config.client_secret.expose_secret()),
            grant_type,
            refresh_token: refresh_token.as_ref().map(|t| t.expose_secret()),
            scope,
        };
        // Neither serializer can fail on a few strings; the messages below never quote
        // the values.
        match config.format {
            RequestFormat::Json => serde_json::to_vec(&grant)
                .map(|b| (b, "application/json"))
                .map_err(|_| Error::config("could not encode the token request as JSON")),
            RequestFormat::Form => serde_urlencoded::to_string(&grant)
                .map(|s| (s.into_bytes(), "application/x-www-form-urlencoded"))
                .map_err(|_| Error::config("could not form-encode the token request")),
        }
    }

    async fn fetch(&self) -> Result<FetchedToken, Error> {
        let (body, content_type) = self.body()?;
        let config = &self.config;
        let mut request = config
            .client
            .post(config.url.clone())
            .header(CONTENT_TYPE, content_type)
            .header(ACCEPT, "application/json");
        if config.basic_auth {
            request = request.basic_auth(
                &config.client_id,
                Some(config.client_secret.expose_secret()),
            );
        }
        let mut response = request
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error(e, "sending the token request"))?;
        if response.url() != &config.url {
            // A client that follows redirects already sent the grant elsewhere; at
            // least do not trust the answer.
            return Err(Error::invalid_response(
                "the token request was redirected to another URL: the HTTP client for token \
                 requests follows redirects (build it with reqwest::redirect::Policy::none())",
            ));
        }
        let status = response.status();
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now())),
            _ => None,
        };

        // A failure's status says what it is, whatever its body: an error page too
        // long to read is dropped unread, its status and `Retry-After` still count.
        let failed = |bytes: &[u8]| {
            let code = oauth_error_code(bytes).filter(|code| !self.touches_secret(code));
            Err(status_error(status, code).with_retry_after(retry_after))
        };
        let too_long = || {
            if status.is_success() {
                Err(too_large(status))
            } else {
                failed(&[])
            }
        };
        if response
            .content_length()
            .is_some_and(|len| len > MAX_BODY as u64)
        {
            return too_long();
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error(e, "reading the token response"))?
        {
            if bytes.len() + chunk.len() > MAX_BODY {
                return too_long();
            }
            bytes.extend_from_slice(&chunk);
        }

        if !status.is_success() {
            return failed(&bytes);
        }
        let rotated = rotated_refresh_token(&bytes);
        if let Some(rotated) = &rotated {
            self.rotate(rotated);
        }
        let mut token = parse(&bytes)?;
        token.refresh_token = rotated;
        Ok(token)
    }
}

impl Inner {
    /// Whether `text` holds a secret this endpoint sends (the client secret, the
    /// refresh token) or is part of one: an error answer that echoes one must not
    /// carry it into an error message.
    fn touches_secret(&self, text: &str) -> bool {
        let touches =
            |secret: &str| !secret.is_empty() && (text.contains(secret) || secret.contains(text));
        touches(self.config.client_secret.expose_secret())
            || self
                .refresh_token()
                .is_some_and(|current| touches(current.expose_secret()))
    }

    /// The refresh token sent next, if this is a refresh-token grant.
    fn refresh_token(&self) -> Option<SecretString> {
        match &self.config.grant {
            GrantKind::RefreshToken(current) => Some(
                current
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            ),
            GrantKind::ClientCredentials { .. } => None,
        }
    }

    /// Uses a rotated refresh token from now on and tells the application.
    fn rotate(&self, rotated: &SecretString) {
        let GrantKind::RefreshToken(refresh_token) = &self.config.grant else {
            return;
        };
        {
            let mut current = refresh_token.lock().unwrap_or_else(PoisonError::into_inner);
            if current.expose_secret() == rotated.expose_secret() {
                return;
            }
            *current = rotated.clone();
        }
        tracing::info!("token endpoint rotated the refresh token; using the new one");
        if let Some(hook) = &self.config.on_rotated {
            hook(rotated);
        }
    }
}

/// An error for a non-2xx answer, with its OAuth `error` code if any. 408, 429 and
/// 5xx are worth retrying later; other 4xx mean the credentials or the refresh token
/// were refused.
fn status_error(status: StatusCode, code: Option<String>) -> Error {
    let (kind, message) = if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        (ErrorKind::Unavailable, "token endpoint failed")
    } else if status.is_redirection() {
        (
            ErrorKind::InvalidResponse,
            "token endpoint answered a redirect, which is not followed (it would carry the \
             client secret to another URL); check token_url",
        )
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

/// `Retry-After` as delay-seconds or an HTTP-date, capped at [`MAX_RETRY_AFTER`].
/// A date in the past means "now".
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 3600 ", now), Some(MAX_RETRY_AFTER));
        let in_20s = httpdate::fmt_http_date(now + Duration::from_secs(20));
        assert_eq!(
            parse_retry_after(&in_20s, now),
            Some(Duration::from_secs(20))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(20));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn statuses_are_classified() {
        let kind = |code: u16| status_error(StatusCode::from_u16(code).unwrap(), None).kind();
        for code in [400, 401, 403, 404, 422] {
            assert_eq!(kind(code), ErrorKind::Rejected, "{code}");
        }
        for code in [408, 429, 500, 502, 503, 504] {
            assert_eq!(kind(code), ErrorKind::Unavailable, "{code}");
        }
        assert_eq!(kind(302), ErrorKind::InvalidResponse);
    }
}
