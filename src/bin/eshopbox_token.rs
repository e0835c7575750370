//! `eshopbox-token`: prints an Eshopbox access token, for scripts and humans
//! (feature `cli`).
//!
//! ```sh
//! curl -H "Authorization: Bearer $(eshopbox-token)" https://acme.myeshopbox.com/api/v2/inventoryListing
//! ```
//!
//! Credentials come from the environment, as for the quickstart; `--help` lists the
//! options. Errors go to standard error with a non-zero exit code, and never contain
//! a secret.

use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use eshopbox_auth::secrecy::ExposeSecret;
use eshopbox_auth::secrecy::SecretString;
use eshopbox_auth::store::{RedisStore, SharedRefreshToken, TokenStore};
use eshopbox_auth::{AccessToken, Credentials, EshopboxAuthLayer, TokenHandle, DEFAULT_TOKEN_URL};

const AFTER_HELP: &str = "\
Environment:
  ESHOPBOX_CLIENT_ID, ESHOPBOX_CLIENT_SECRET, ESHOPBOX_REFRESH_TOKEN
                        the app's credentials (required; read only from the environment)
  ESHOPBOX_REDIS_ENCRYPTION_KEY
                        64 hex digits: the token store's encryption key, if the fleet sets one

Exit status: 0 with the token on standard output; 1 when no token could be had;
2 on bad usage or configuration.";

/// Prints an Eshopbox access token on standard output.
///
/// Without a token store, it asks the token endpoint for a new token. With
/// `--redis-url`, it prints the token the fleet's Redis store holds while that one is
/// valid, and otherwise refreshes it through the store like a replica would (one token
/// call, shared; a rotated refresh token is saved there, never spent behind the
/// fleet's back).
#[derive(Debug, Parser)]
#[command(name = "eshopbox-token", version, after_help = AFTER_HELP)]
struct Args {
    /// The workspace (as for the layer's `workspace` option); printed with --json.
    #[arg(long, env = "ESHOPBOX_WORKSPACE")]
    workspace: Option<String>,

    /// The token endpoint: https, or http on a loopback host.
    #[arg(long, env = "ESHOPBOX_TOKEN_URL", default_value = DEFAULT_TOKEN_URL)]
    token_url: String,

    /// The fleet's Redis token store (`redis://` or `rediss://`).
    #[arg(long, env = "ESHOPBOX_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,

    /// The token store's key prefix, as the fleet configures it.
    #[arg(long, env = "ESHOPBOX_REDIS_KEY_PREFIX", requires = "redis_url")]
    redis_key_prefix: Option<String>,

    /// Print JSON: the token, its type, its expiry and the workspace.
    #[arg(long)]
    json: bool,

    /// Give up on the token after this many seconds (1 to 3600; with --redis-url,
    /// waiting for another replica's refresh may take as long again, and so may
    /// writing a rotated refresh token the store missed).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

/// A failure: its message (never a secret) and exit code.
struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 2,
        }
    }

    fn token(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 1,
        }
    }
}

impl From<eshopbox_auth::Error> for Failure {
    fn from(error: eshopbox_auth::Error) -> Self {
        if error.kind() == eshopbox_auth::ErrorKind::Config {
            Failure::usage(with_causes(&error))
        } else {
            Failure::token(with_causes(&error))
        }
    }
}

/// An error's message followed by those of its causes (a refused password, a refused
/// connection), which the message alone does not name.
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

/// A token whose refresh is due within this long is not printed (see `usable_token`).
const DUE_WITHIN: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("eshopbox-token: could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("eshopbox-token: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(mut args: Args) -> Result<String, Failure> {
    // Empty means unset, as for the credentials' variables.
    args.workspace = args.workspace.filter(|workspace| !workspace.is_empty());
    let credentials = Credentials::new(
        required("ESHOPBOX_CLIENT_ID")?,
        required("ESHOPBOX_CLIENT_SECRET")?,
        required("ESHOPBOX_REFRESH_TOKEN")?,
    );
    let timeout = Duration::from_secs(args.timeout);
    let with_store = args.redis_url.is_some();
    // The refresh token the endpoint rotated to, if it did.
    let rotated: Arc<Mutex<Option<SecretString>>> = Arc::default();
    let mut kept: Option<(RedisStore, Option<SharedRefreshToken>)> = None;
    let mut builder = EshopboxAuthLayer::builder(credentials)
        .token_url(&args.token_url)
        .token_timeout(timeout)
        .on_refresh_token_rotated({
            let rotated = rotated.clone();
            move |refresh_token| {
                *rotated.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(refresh_token.clone());
                // With a store, the new refresh token is kept there for the fleet.
                if !with_store {
                    eprintln!(
                        "eshopbox-token: warning: the token endpoint rotated the refresh \
                         token; the one in ESHOPBOX_REFRESH_TOKEN is spent (use --redis-url \
                         to keep the new one in the fleet's store)"
                    );
                }
            }
        });
    if let Some(workspace) = &args.workspace {
        builder = builder.workspace(workspace);
    }
    if let Some(url) = &args.redis_url {
        let mut store = RedisStore::new(url)?;
        if let Some(prefix) = &args.redis_key_prefix {
            store = store.key_prefix(prefix);
        }
        if let Some(key) = optional("ESHOPBOX_REDIS_ENCRYPTION_KEY") {
            store = store.encryption_key(hex_key(&key)?);
        }
        let before = check_store(&store, timeout).await?;
        kept = Some((store.clone(), before));
        // The lease must be shorter than the token timeout, however short --timeout is.
        // Required: a store that fails later (it can be read but not written, say)
        // must not let the command spend the fleet's refresh token on its own.
        builder = builder
            .token_store(store)
            .store_required(true)
            .lock_lease((timeout / 2).min(Duration::from_secs(10)));
    }
    let layer = builder.build()?;
    // With a store, a replica may wait up to the token timeout for another one's
    // refresh before its own token call, which has the token timeout again.
    let bound = timeout * if with_store { 2 } else { 1 } + Duration::from_secs(5);
    let got = tokio::time::timeout(bound, usable_token(&layer.handle())).await;
    // Whether or not a token came of it, a rotation must reach the store.
    let rotated = rotated
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let (Some((store, before)), Some(rotated)) = (kept, rotated) {
        rotation_stored(&store, before, rotated, timeout).await?;
    }
    let token = got.map_err(|_| Failure::token("timed out waiting for a token"))??;

    if !args.json {
        return Ok(token.secret().expose_secret().to_owned());
    }
    let expires_in = token
        .info()
        .expires_at
        .saturating_duration_since(tokio::time::Instant::now());
    let expires_at = SystemTime::now() + expires_in;
    let output = serde_json::json!({
        "access_token": token.secret().expose_secret(),
        "token_type": "Bearer",
        "expires_in": expires_in.as_secs(),
        "expires_at": httpdate::fmt_http_date(expires_at),
        "expires_at_unix": expires_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "workspace": args.workspace,
    });
    Ok(output.to_string())
}

/// Reads the fleet's token and refresh token once before anything else. A layer
/// whose store fails refreshes on its own, which is right for a replica serving
/// requests, but here it would spend the fleet's refresh token outside the store
/// (and, if the endpoint rotates it, lose the new one when the command exits). So a
/// store that cannot be reached, refuses the password or holds values sealed with
/// another key ends the command with no token call.
async fn check_store(
    store: &RedisStore,
    timeout: Duration,
) -> Result<Option<SharedRefreshToken>, Failure> {
    let unusable = |error: &dyn std::fmt::Display| {
        Failure::token(format!(
            "the token store cannot be used, so no token was requested outside it: {error}"
        ))
    };
    let read = async {
        store.load().await?;
        store.load_refresh_token().await
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(stored)) => Ok(stored),
        Ok(Err(error)) => Err(unusable(&with_causes(&error))),
        Err(_) => Err(unusable(&format!("no answer within {timeout:?}"))),
    }
}

/// After a token call that rotated the refresh token: makes sure the fleet's store
/// holds the new one before the command ends. The layer writes it after its call, but
/// if the store failed just then, the retry it keeps making would end with this
/// process, and the fleet's only valid refresh token with it. So it is written here,
/// over the version the store held before (`before`), until the store takes it or the
/// timeout passes; then the command fails, and prints no token. A store that holds
/// yet another version has moved on without this command (another replica's refresh):
/// nothing is written over it, and the command fails at once, saying so.
async fn rotation_stored(
    store: &RedisStore,
    before: Option<SharedRefreshToken>,
    rotated: SecretString,
    timeout: Duration,
) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let version = SharedRefreshToken::new(fastrand::u64(..), rotated.clone());
    let before_id = before.as_ref().map(SharedRefreshToken::id);
    let mut last = String::from("no answer");
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let seen = match store.load_refresh_token().await? {
                Some(stored)
                    if stored.refresh_token().expose_secret() == rotated.expose_secret() =>
                {
                    Seen::Ours
                }
                // Still the version the call replaced: put ours over it.
                Some(stored) if Some(stored.id()) == before_id => {
                    Seen::Written(store.save_refresh_token(&version, before_id).await?)
                }
                // Empty (it was at the start, or a restart lost the data): ours is the
                // newest.
                None => Seen::Written(store.save_refresh_token(&version, None).await?),
                Some(_) => Seen::Another,
            };
            Ok::<_, eshopbox_auth::Error>(seen)
        };
        match tokio::time::timeout(Duration::from_secs(1), attempt).await {
            Ok(Ok(Seen::Ours | Seen::Written(true))) => return Ok(()),
            Ok(Ok(Seen::Written(false))) => last = "the store kept another refresh token".into(),
            Ok(Ok(Seen::Another)) => {
                return Err(Failure::token(
                    "the token endpoint rotated the refresh token, and the token store now \
                     holds another one than the command read at its start or got: it was \
                     not overwritten; check that the fleet's token calls succeed (no token \
                     is printed)",
                ))
            }
            Ok(Err(error)) => last = with_causes(&error),
            Err(_) => last = "no answer within 1s".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(Failure::token(format!(
        "the token endpoint rotated the refresh token, and the token store did not take \
         the new one within {timeout:?} ({last}): the fleet's refresh token may be lost; \
         no token is printed"
    )))
}

/// What the store held when the command looked to store a rotation.
enum Seen {
    /// The rotated refresh token: nothing to do.
    Ours,
    /// The version the call replaced (or nothing), and whether ours was written over it.
    Written(bool),
    /// Yet another version.
    Another,
}

fn optional(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

fn required(name: &str) -> Result<String, Failure> {
    optional(name).ok_or_else(|| Failure::usage(format!("{name} is not set")))
}

/// The 32-byte key from 64 hex digits.
fn hex_key(text: &str) -> Result<[u8; 32], Failure> {
    let bad = || Failure::usage("ESHOPBOX_REDIS_ENCRYPTION_KEY must be 64 hex digits");
    let digits = text.trim().as_bytes();
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(key)
}

/// A token worth printing: the current or stored one, unless it is due for refresh,
/// then a new one. The layer sets a token's `refresh_at` from its lifetime and the
/// refresh margin (at most half the lifetime), but never less than a second ahead, so
/// that a request may still use a token taken from the store that is already due; for
/// a token handed out of the process, one due within two seconds counts as due.
async fn usable_token(handle: &TokenHandle) -> Result<AccessToken, eshopbox_auth::Error> {
    let token = handle.get().await?;
    if token.info().refresh_at > tokio::time::Instant::now() + DUE_WITHIN {
        return Ok(token);
    }
    handle.refresh().await?;
    handle
        .token()
        .ok_or_else(|| eshopbox_auth::Error::unavailable("the new token expired at once"))
}
