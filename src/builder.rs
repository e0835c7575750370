//! The [`EshopboxAuthBuilder`]: every setting of the layer, checked once in `build`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use secrecy::SecretString;

use crate::classify::Http401;
use crate::credentials::Credentials;
use crate::destination::Destinations;
use crate::error::Error;
use crate::layer::{EshopboxAuthLayer, Shape};
use crate::replay::{CloneBodies, EmptyBodies};
use crate::store::{TokenStore, DEFAULT_LOCK_LEASE};
use crate::store_sync::StoreSync;
use crate::token::background::spawn_background;
use crate::token::cell::{Timing, TokenCell};
use crate::token::client::{check_token_url, default_client};
use crate::token::endpoint::{GrantEndpoint, RequestFormat, RotationHook};
use crate::token::refresh::Coordinator;
use crate::token::source::TokenSource;

pub use crate::token::fetch::DEFAULT_TOKEN_TIMEOUT;

/// Eshopbox's token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://auth.myeshopbox.com/api/v1/generateToken";

/// Default [`refresh_margin`](EshopboxAuthBuilder::refresh_margin): 5 minutes.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// The longest [`token_timeout`](EshopboxAuthBuilder::token_timeout) accepted: a day,
/// the life of an Eshopbox token.
const MAX_TOKEN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The longest [`failure_cooldown`](EshopboxAuthBuilder::failure_cooldown) accepted.
const MAX_FAILURE_COOLDOWN: Duration = Duration::from_secs(3600);

/// Default [`failure_cooldown`](EshopboxAuthBuilder::failure_cooldown): 2 seconds
/// (drawn between 1 and 5 s each time).
pub const DEFAULT_FAILURE_COOLDOWN: Duration = Duration::from_secs(2);

/// Default [`store_timeout`](EshopboxAuthBuilder::store_timeout): 1 second.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(1);

/// Builder for [`EshopboxAuthLayer`], from [`EshopboxAuthLayer::builder`].
///
/// Setters take and return the builder; [`build`](Self::build) checks everything and
/// reports bad input as an [`Error`] of kind [`Config`](crate::ErrorKind::Config).
///
/// `P` is the [`ReplayPolicy`](crate::ReplayPolicy) that decides which bodies may be
/// resent after a 401.
#[must_use]
pub struct EshopboxAuthBuilder<P = EmptyBodies, C = Http401> {
    settings: Settings,
    replay: P,
    unauthorized: C,
}

/// The builder's settings that do not depend on its type parameters.
struct Settings {
    origin: Origin,
    token_url: String,
    refresh_margin: Duration,
    token_timeout: Duration,
    attempt_timeout: Option<Duration>,
    retry_on_unauthorized: bool,
    request_format: RequestFormat,
    http_client: Option<reqwest::Client>,
    on_rotated: Option<RotationHook>,
    failure_cooldown: Duration,
    workspace: Option<String>,
    background_refresh: bool,
    store: Option<Arc<dyn TokenStore>>,
    lock_lease: Duration,
    store_timeout: Duration,
    store_required: bool,
    allowed_hosts: Vec<String>,
    allow_insecure_http: bool,
}

/// Where tokens come from.
enum Origin {
    /// Eshopbox's refresh grant with these credentials.
    Eshopbox(Credentials),
    /// A caller-supplied source.
    Custom(Box<dyn TokenSource>),
    /// Credentials per workspace, from a resolver (`crate::workspace`).
    #[cfg(feature = "workspaces")]
    PerWorkspace,
}

impl EshopboxAuthBuilder {
    pub(crate) fn new(credentials: Credentials) -> Self {
        Self::from_origin(Origin::Eshopbox(credentials))
    }

    pub(crate) fn with_source<T: TokenSource>(source: T) -> Self {
        Self::from_origin(Origin::Custom(Box::new(source)))
    }

    /// The shared settings of a per-workspace layer (`crate::workspace`).
    #[cfg(feature = "workspaces")]
    pub(crate) fn per_workspace() -> Self {
        Self::from_origin(Origin::PerWorkspace)
    }

    fn from_origin(origin: Origin) -> Self {
        EshopboxAuthBuilder {
            settings: Settings {
                origin,
                token_url: DEFAULT_TOKEN_URL.to_owned(),
                refresh_margin: DEFAULT_REFRESH_MARGIN,
                token_timeout: DEFAULT_TOKEN_TIMEOUT,
                attempt_timeout: None,
                retry_on_unauthorized: true,
                request_format: RequestFormat::Json,
                http_client: None,
                on_rotated: None,
                failure_cooldown: DEFAULT_FAILURE_COOLDOWN,
                workspace: None,
                background_refresh: false,
                store: None,
                lock_lease: DEFAULT_LOCK_LEASE,
                store_timeout: DEFAULT_STORE_TIMEOUT,
                store_required: false,
                allowed_hosts: Vec::new(),
                allow_insecure_http: false,
            },
            replay: EmptyBodies,
            unauthorized: Http401,
        }
    }
}

impl<P, C> EshopboxAuthBuilder<P, C> {
    /// The token endpoint (default [`DEFAULT_TOKEN_URL`]). Must be `https://`, or
    /// `http://` on a loopback host (`localhost`, `127.0.0.0/8`, `[::1]`) for tests.
    pub fn token_url(mut self, url: &str) -> Self {
        url.clone_into(&mut self.settings.token_url);
        self
    }

    /// How long before expiry to refresh (default 5 minutes). It is capped at half the
    /// token's lifetime, and up to a tenth of it is taken off at random so several
    /// processes do not refresh in lockstep. Within the margin, requests keep using the
    /// still-valid token while one refresh runs in the background.
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.settings.refresh_margin = margin;
        self
    }

    /// How long requests waiting for a token may wait for one refresh, retries
    /// included (default 30 s). Within it, transient failures (5xx, 408, 429,
    /// connection errors, an attempt that hangs) are retried with back-off; when the
    /// next attempt would start past it, the waiting requests fail with
    /// [`Unavailable`](crate::ErrorKind::Unavailable). With a
    /// [`token_store`](Self::token_store), a replica may first wait up to this long for
    /// another replica's refresh (the lock holder's) before making its own call, which
    /// again has this long: a request can then wait up to twice the timeout. Zero or
    /// more than a day makes `build()` fail with
    /// [`ErrorKind::Config`](crate::ErrorKind::Config).
    pub fn token_timeout(mut self, timeout: Duration) -> Self {
        self.settings.token_timeout = timeout;
        self
    }

    /// The longest one token request may take before it is abandoned and retried on a
    /// new connection (default: a third of what is left of the
    /// [`token_timeout`](Self::token_timeout), at least 5 s — 10 s for the first of a
    /// 30 s budget). Never more than what is left of the budget.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.settings.attempt_timeout = Some(timeout);
        self
    }

    /// Whether to resend a request once, with a new token, when it is answered
    /// `401 Unauthorized` (default `true`). Either way, the token that was refused is
    /// dropped so that the next request gets a new one.
    pub fn retry_on_unauthorized(mut self, retry: bool) -> Self {
        self.settings.retry_on_unauthorized = retry;
        self
    }

    /// How the token request body is encoded (default [`RequestFormat::Json`]).
    pub fn request_format(mut self, format: RequestFormat) -> Self {
        self.settings.request_format = format;
        self
    }

    /// The `reqwest::Client` for token requests. By default the layer builds its own,
    /// with a 10 s connect timeout and redirects off (a redirect would carry the client
    /// secret to another URL).
    ///
    /// **Build your client with `redirect(reqwest::redirect::Policy::none())`**: reqwest
    /// follows up to 10 redirects by default, and a `307`/`308` answer resends the token
    /// request — client secret and refresh token included — to wherever it points. The
    /// layer cannot see a client's redirect policy; when a redirect was followed, it
    /// refuses the answer ([`InvalidResponse`](crate::ErrorKind::InvalidResponse)), but
    /// by then the secret has been sent.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.settings.http_client = Some(client);
        self
    }

    /// Called with the new refresh token whenever the token endpoint rotates it, so
    /// the application can persist it. The layer itself uses the new one for every
    /// later refresh and never sends the old one again.
    ///
    /// The hook runs on the refresh task: keep it short (hand the value to a channel
    /// or spawn for slow storage).
    ///
    /// ```
    /// use eshopbox_auth::{Credentials, EshopboxAuthLayer};
    /// use eshopbox_auth::secrecy::ExposeSecret;
    ///
    /// # fn main() -> Result<(), eshopbox_auth::Error> {
    /// let layer = EshopboxAuthLayer::builder(Credentials::new("id", "secret", "rt"))
    ///     .on_refresh_token_rotated(|new| {
    ///         let _persist_me: &str = new.expose_secret();
    ///     })
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_refresh_token_rotated<F>(mut self, hook: F) -> Self
    where
        F: Fn(&SecretString) + Send + Sync + 'static,
    {
        self.settings.on_rotated = Some(Arc::new(hook));
        self
    }

    /// How long a permanent token failure (credentials rejected, invalid answer) is
    /// remembered while no valid token exists, so a burst of requests makes one POST
    /// rather than one each (default 2 s). Each time, the actual period is drawn at
    /// random between half and two and a half times this: 1 to 5 s by default.
    /// It is also the shortest time between two refreshes that follow an
    /// invalidation (a 401, or [`TokenHandle::invalidate`](crate::TokenHandle::invalidate)):
    /// an API that answers 401 to every request then costs one token call per
    /// cooldown rather than one per request. Zero turns both off; more than an hour
    /// makes `build()` fail with [`ErrorKind::Config`](crate::ErrorKind::Config).
    pub fn failure_cooldown(mut self, cooldown: Duration) -> Self {
        self.settings.failure_cooldown = cooldown;
        self
    }

    /// Adds `ProxyHost: <workspace>` to every request, as Eshopbox requires for
    /// workspace calls such as webhook registration (default: no such header).
    pub fn workspace(mut self, workspace: &str) -> Self {
        self.settings.workspace = Some(workspace.to_owned());
        self
    }

    /// Keeps a task that fetches a token at once and refreshes each one ahead of
    /// expiry, so requests normally never wait for a refresh (default off: tokens are
    /// fetched and refreshed by the requests that need them). The task ends when the
    /// last layer, service and handle is dropped. `build` must then run inside a
    /// tokio runtime.
    pub fn background_refresh(mut self, enabled: bool) -> Self {
        self.settings.background_refresh = enabled;
        self
    }

    /// Shares the token with every other layer using the same store — other replicas
    /// of the service, with [`RedisStore`](crate::store) — so that all of them
    /// together make one token call per expiry; see [`crate::store`]. Requests are
    /// still served from this layer's own copy of the token.
    pub fn token_store(mut self, store: impl TokenStore) -> Self {
        self.settings.store = Some(Arc::new(store));
        self
    }

    /// The lease of the token store's refresh lock (default 10 s; must be shorter
    /// than the token timeout). The holder renews it every third of the lease while
    /// its token call runs; if the holder dies or stalls, another replica takes over
    /// once the lease runs out.
    pub fn lock_lease(mut self, lease: Duration) -> Self {
        self.settings.lock_lease = lease;
        self
    }

    /// The longest one call to the token store may take (default 1 s). A store that
    /// does not answer in time counts as failed: the layer then requests its token
    /// directly.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.settings.store_timeout = timeout;
        self
    }

    /// Requests tokens only through the token store (default `false`). When the
    /// store fails (down, refusing the password, read-only), a refresh fails with
    /// [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) instead of calling
    /// the token endpoint directly; requests keep using a still-valid token meanwhile.
    /// For a provider that rotates refresh tokens, where a replica's direct call
    /// spends the refresh token the others share: the price is failed refreshes while
    /// the store is out. `eshopbox-token` works this way. Needs
    /// [`token_store`](Self::token_store).
    pub fn store_required(mut self, required: bool) -> Self {
        self.settings.store_required = required;
        self
    }

    /// Trusts one more host with the token, besides `myeshopbox.com`, `eshopbox.com`,
    /// their subdomains and loopback (which are always trusted). Call it once per
    /// host.
    ///
    /// `pattern` is an exact host (`gateway.internal.example`, an IPv4 address or a
    /// bracketed IPv6 address), or `*.` and a domain of at least two labels:
    /// `*.partner.example` matches every subdomain of `partner.example`, **not**
    /// `partner.example` itself (add that too if it is wanted). Hosts are compared
    /// case-insensitively, IPv6 addresses by value (`[2001:db8::1]` is
    /// `[2001:0db8:0::1]`); the port does not matter.
    ///
    /// `build()` fails with [`Config`](crate::ErrorKind::Config) on a pattern that is
    /// empty, `*`, a one-label wildcard like `*.com`, has a wildcard elsewhere, or
    /// contains a scheme, a path, a port or whitespace.
    ///
    /// By default the token goes only to `https://` URIs on these hosts; see
    /// [`allow_insecure_http`](Self::allow_insecure_http). A request to any other host
    /// fails with [`UntrustedDestination`](crate::ErrorKind::UntrustedDestination)
    /// before it is sent.
    ///
    /// ```
    /// use eshopbox_auth::{Credentials, EshopboxAuthLayer};
    ///
    /// # fn main() -> Result<(), eshopbox_auth::Error> {
    /// let layer = EshopboxAuthLayer::builder(Credentials::new("id", "secret", "rt"))
    ///     .allow_host("gateway.internal.example") // an API gateway in front of Eshopbox
    ///     .allow_host("*.eshopbox-proxy.example")
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn allow_host(mut self, pattern: &str) -> Self {
        self.settings.allowed_hosts.push(pattern.to_owned());
        self
    }

    /// Whether plain `http://` requests to trusted hosts (Eshopbox's and those added
    /// with [`allow_host`](Self::allow_host)) carry the token (default `false`: only
    /// https, and http to loopback). Without it, such a request fails with
    /// [`UntrustedDestination`](crate::ErrorKind::UntrustedDestination): on plain http
    /// anyone on the network path can read the token. It never opens untrusted hosts.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.settings.allow_insecure_http = allow;
        self
    }

    /// Which request bodies may be resent after a 401; see [`crate::replay`].
    pub fn replay_bodies<Q>(self, policy: Q) -> EshopboxAuthBuilder<Q, C> {
        EshopboxAuthBuilder {
            settings: self.settings,
            replay: policy,
            unauthorized: self.unauthorized,
        }
    }

    /// Which responses mean the token was refused (default [`Http401`]); see
    /// [`crate::classify`]. Use [`GrpcUnauthenticated`](crate::classify::GrpcUnauthenticated)
    /// for tonic channels.
    pub fn unauthorized_when<D>(self, policy: D) -> EshopboxAuthBuilder<P, D> {
        EshopboxAuthBuilder {
            settings: self.settings,
            replay: self.replay,
            unauthorized: policy,
        }
    }

    /// Resends any `Clone` body after a 401 (for example `Full<Bytes>`), by cloning it
    /// before the first attempt. Shorthand for `replay_bodies(CloneBodies)`.
    pub fn replay_cloneable_bodies(self) -> EshopboxAuthBuilder<CloneBodies, C> {
        self.replay_bodies(CloneBodies)
    }

    /// Checks the settings and builds the layer.
    ///
    /// Fails with [`ErrorKind::Config`](crate::ErrorKind::Config) on an empty
    /// credential, a token URL that does not parse, is plain `http://` on a host other
    /// than loopback or has a fragment or user info, a token timeout of zero or over a
    /// day, a lock lease not shorter than the token timeout, a zero store timeout,
    /// [`store_required`](Self::store_required) without a token store, a bad
    /// [`allow_host`](Self::allow_host) pattern, or an HTTP client that cannot be
    /// built.
    pub fn build(self) -> Result<EshopboxAuthLayer<P, C>, Error> {
        let destinations = self.settings.check()?;
        let proxy_host = self
            .settings
            .workspace
            .as_deref()
            .map(proxy_host)
            .transpose()?;
        // The Eshopbox grant tells the rotation hook itself (even for an answer that is
        // otherwise unusable); for other sources the fetcher does, from what they report.
        let (source, on_rotated): (Box<dyn TokenSource>, _) = match self.settings.origin {
            Origin::Custom(source) => (source, self.settings.on_rotated),
            #[cfg(feature = "workspaces")]
            Origin::PerWorkspace => {
                return Err(Error::config(
                    "a per-workspace builder builds no single layer",
                ))
            }
            Origin::Eshopbox(credentials) => {
                credentials.validate()?;
                let url = check_token_url(&self.settings.token_url)?;
                let client = match self.settings.http_client {
                    Some(client) => client,
                    None => default_client(self.settings.token_timeout)?,
                };
                let endpoint = GrantEndpoint::eshopbox(
                    client,
                    url,
                    self.settings.request_format,
                    credentials,
                    self.settings.on_rotated,
                );
                (Box::new(endpoint), None)
            }
        };
        let coordinator = self.settings.store.map(|store| {
            Box::new(StoreSync::new(
                store,
                self.settings.lock_lease,
                self.settings.store_timeout,
                self.settings.store_required,
            )) as Box<dyn Coordinator>
        });
        let cell = TokenCell::new(
            source,
            on_rotated,
            coordinator,
            Timing {
                margin: self.settings.refresh_margin,
                timeout: self.settings.token_timeout,
                attempt_timeout: self.settings.attempt_timeout,
                failure_cooldown: self.settings.failure_cooldown,
            },
        );
        if self.settings.background_refresh {
            spawn_background(&cell)?;
        }
        Ok(EshopboxAuthLayer::from_parts(
            cell,
            Shape {
                retry_on_unauthorized: self.settings.retry_on_unauthorized,
                proxy_host,
                destinations,
            },
            self.replay,
            self.unauthorized,
        ))
    }
}

impl Settings {
    /// Checks what does not depend on where tokens come from; returns the
    /// destination guard.
    fn check(&self) -> Result<Destinations, Error> {
        if self.token_timeout.is_zero() {
            return Err(Error::config("token_timeout must be more than zero"));
        }
        if self.token_timeout > MAX_TOKEN_TIMEOUT {
            return Err(Error::config("token_timeout must be at most a day"));
        }
        if self.failure_cooldown > MAX_FAILURE_COOLDOWN {
            return Err(Error::config("failure_cooldown must be at most an hour"));
        }
        if self.attempt_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::config("attempt_timeout must be more than zero"));
        }
        if self.lock_lease < Duration::from_millis(1) {
            return Err(Error::config("lock_lease must be at least a millisecond"));
        }
        if self.store.is_some() && self.lock_lease >= self.token_timeout {
            // Replicas wait for a lock holder at most the token timeout; a dead
            // holder's lease must run out before that.
            return Err(Error::config(
                "lock_lease must be shorter than token_timeout",
            ));
        }
        if self.store_timeout.is_zero() {
            return Err(Error::config("store_timeout must be more than zero"));
        }
        if self.store_required && self.store.is_none() {
            return Err(Error::config("store_required needs a token_store"));
        }
        Destinations::new(&self.allowed_hosts, self.allow_insecure_http)
    }
}

/// The checked settings every workspace's token cell is made from
/// (`crate::workspace`): all of the builder's but the credentials.
#[cfg(feature = "workspaces")]
pub(crate) struct CellSettings {
    pub(crate) client: reqwest::Client,
    pub(crate) url: reqwest::Url,
    pub(crate) format: RequestFormat,
    pub(crate) timing: Timing,
    pub(crate) store: Option<Arc<dyn TokenStore>>,
    pub(crate) lock_lease: Duration,
    pub(crate) store_timeout: Duration,
    pub(crate) store_required: bool,
    pub(crate) background_refresh: bool,
}

#[cfg(feature = "workspaces")]
impl<P, C> EshopboxAuthBuilder<P, C> {
    /// Checks the settings as [`build`](Self::build) does and hands them out for a
    /// per-workspace layer, with the request shape (without `ProxyHost`: each
    /// workspace has its own) and both policies.
    pub(crate) fn into_cell_settings(self) -> Result<(CellSettings, Shape, P, C), Error> {
        let destinations = self.settings.check()?;
        let url = check_token_url(&self.settings.token_url)?;
        let client = match self.settings.http_client {
            Some(client) => client,
            None => default_client(self.settings.token_timeout)?,
        };
        let settings = CellSettings {
            client,
            url,
            format: self.settings.request_format,
            timing: Timing {
                margin: self.settings.refresh_margin,
                timeout: self.settings.token_timeout,
                attempt_timeout: self.settings.attempt_timeout,
                failure_cooldown: self.settings.failure_cooldown,
            },
            store: self.settings.store,
            lock_lease: self.settings.lock_lease,
            store_timeout: self.settings.store_timeout,
            store_required: self.settings.store_required,
            background_refresh: self.settings.background_refresh,
        };
        let shape = Shape {
            retry_on_unauthorized: self.settings.retry_on_unauthorized,
            proxy_host: None,
            destinations,
        };
        Ok((settings, shape, self.replay, self.unauthorized))
    }
}

/// The `ProxyHost` value for a workspace name: non-empty, a valid header value.
fn proxy_host(workspace: &str) -> Result<HeaderValue, Error> {
    let workspace = workspace.trim();
    if workspace.is_empty() || workspace.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(Error::config(
            "workspace must be a non-empty name without spaces",
        ));
    }
    HeaderValue::from_str(workspace)
        .map_err(|_| Error::config("workspace is not a valid header value"))
}

impl<P: fmt::Debug, C: fmt::Debug> fmt::Debug for EshopboxAuthBuilder<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EshopboxAuthBuilder")
            .field(
                "origin",
                match &self.settings.origin {
                    Origin::Eshopbox(credentials) => credentials as &dyn fmt::Debug,
                    Origin::Custom(_) => &"custom token source",
                    #[cfg(feature = "workspaces")]
                    Origin::PerWorkspace => &"per workspace",
                },
            )
            .field("token_url", &self.settings.token_url)
            .field("refresh_margin", &self.settings.refresh_margin)
            .field("token_timeout", &self.settings.token_timeout)
            .field("attempt_timeout", &self.settings.attempt_timeout)
            .field(
                "retry_on_unauthorized",
                &self.settings.retry_on_unauthorized,
            )
            .field("request_format", &self.settings.request_format)
            .field("failure_cooldown", &self.settings.failure_cooldown)
            .field("workspace", &self.settings.workspace)
            .field("background_refresh", &self.settings.background_refresh)
            .field("token_store", &self.settings.store.is_some())
            .field("lock_lease", &self.settings.lock_lease)
            .field("store_timeout", &self.settings.store_timeout)
            .field("store_required", &self.settings.store_required)
            .field("allowed_hosts", &self.settings.allowed_hosts)
            .field("allow_insecure_http", &self.settings.allow_insecure_http)
            .field(
                "on_refresh_token_rotated",
                &self.settings.on_rotated.is_some(),
            )
            .field("replay", &self.replay)
            .field("unauthorized", &self.unauthorized)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn build_reports_bad_settings() {
        let creds = || Credentials::new("id", "secret", "rt");
        let err = EshopboxAuthLayer::builder(creds())
            .token_url("http://example.com/t")
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let err = EshopboxAuthLayer::builder(creds())
            .token_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("token_timeout"));
        // "Never give up" is not a timeout: past a day is refused (`Duration::MAX`
        // used to overflow the refresh's deadline, in a spawned task).
        for long in [Duration::from_secs(24 * 3600 + 1), Duration::MAX] {
            let err = EshopboxAuthLayer::builder(creds())
                .token_timeout(long)
                .build()
                .unwrap_err();
            assert!(err.to_string().contains("at most a day"), "{err}");
        }
        assert!(EshopboxAuthLayer::builder(creds())
            .token_timeout(Duration::from_secs(24 * 3600))
            .build()
            .is_ok());
        let err = EshopboxAuthLayer::builder(creds())
            .attempt_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("attempt_timeout"));
        let err = EshopboxAuthLayer::builder(creds())
            .failure_cooldown(Duration::from_secs(3601))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("failure_cooldown"), "{err}");
        assert!(EshopboxAuthLayer::builder(creds())
            .failure_cooldown(Duration::from_secs(3600))
            .build()
            .is_ok());
        let err = EshopboxAuthLayer::builder(creds())
            .workspace(" ")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("workspace"));
        let err = EshopboxAuthLayer::new(Credentials::new("id", "", "rt")).unwrap_err();
        assert!(err.to_string().contains("client_secret is empty"));
        assert!(EshopboxAuthLayer::new(creds()).is_ok());
        let store = crate::store::InProcessStore::new;
        let err = EshopboxAuthLayer::builder(creds())
            .token_store(store())
            .lock_lease(Duration::from_secs(30))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("lock_lease"));
        let err = EshopboxAuthLayer::builder(creds())
            .token_store(store())
            .store_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("store_timeout"));
        // Without a store, the lease does not matter.
        assert!(EshopboxAuthLayer::builder(creds())
            .lock_lease(Duration::from_secs(60))
            .build()
            .is_ok());
    }
}
