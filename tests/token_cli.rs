//! The `eshopbox-token` command (feature `cli`), run as a built binary against the
//! mock Eshopbox on 127.0.0.1, with and without a real `redis-server` as token store.

#![cfg(feature = "cli")]

mod support;

use std::process::Output;
use std::time::Duration;

use eshopbox_auth::mock::{MockEshopbox, CLIENT_SECRET, REFRESH_TOKEN};
use eshopbox_auth::secrecy::{ExposeSecret, SecretString};
use eshopbox_auth::store::{RedisStore, SharedRefreshToken, SharedToken, TokenStore};
use eshopbox_auth::EshopboxAuthLayer;
use http::StatusCode;
use support::redis::RedisServer;

/// Bound on one run of the command.
const LIMIT: Duration = Duration::from_secs(30);

/// Runs the command with the mock's credentials in its environment (and nothing
/// else of the caller's `ESHOPBOX_*` variables), plus `env`.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_eshopbox-token"));
    for (name, _) in std::env::vars() {
        if name.starts_with("ESHOPBOX_") {
            command.env_remove(name);
        }
    }
    command
        .env("ESHOPBOX_CLIENT_ID", eshopbox_auth::mock::CLIENT_ID)
        .env("ESHOPBOX_CLIENT_SECRET", CLIENT_SECRET)
        .env("ESHOPBOX_REFRESH_TOKEN", REFRESH_TOKEN)
        .envs(env.iter().copied())
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(LIMIT, command.output())
        .await
        .expect("eshopbox-token hangs")
        .expect("could not run eshopbox-token")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_no_secret(output: &Output, token: Option<&str>) {
    let all = format!("{}{}", text(&output.stdout), text(&output.stderr));
    for secret in [CLIENT_SECRET, REFRESH_TOKEN].into_iter().chain(token) {
        assert!(!all.contains(secret), "the output leaks {secret:?}: {all}");
    }
}

/// Whether the mock's API accepts `token`.
async fn accepted(eshopbox: &MockEshopbox, token: &str) -> bool {
    let response = reqwest::Client::new()
        .get(eshopbox.url("/api/v2/inventoryListing"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    response.status() == StatusCode::OK
}

#[tokio::test]
async fn prints_a_token_the_api_accepts() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let output = run(&["--token-url", &eshopbox.token_url()], &[]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let token = stdout.strip_suffix('\n').expect("one line");
    assert!(!token.is_empty() && !token.contains('\n'), "{stdout:?}");
    assert!(accepted(&eshopbox, token).await);
    assert_eq!(eshopbox.token_calls(), 1);
    assert_eq!(text(&output.stderr), "");
    assert_no_secret(&output, None);
}

#[tokio::test]
async fn json_has_the_token_its_expiry_and_the_workspace() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    eshopbox.set_token_lifetime(Duration::from_secs(3600));
    let output = run(
        &["--json", "--workspace", "acme"],
        &[("ESHOPBOX_TOKEN_URL", &eshopbox.token_url())],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let token = json["access_token"].as_str().unwrap();
    assert!(accepted(&eshopbox, token).await);
    assert_eq!(json["token_type"], "Bearer");
    let expires_in = json["expires_in"].as_u64().unwrap();
    assert!((3500..=3600).contains(&expires_in), "{json}");
    assert!(json["expires_at_unix"].as_u64().unwrap() > 1_700_000_000);
    assert!(httpdate::parse_http_date(json["expires_at"].as_str().unwrap()).is_ok());
    assert_eq!(json["workspace"], "acme");

    // An empty ESHOPBOX_WORKSPACE is no workspace, as empty credential variables are
    // unset.
    let output = run(
        &["--json"],
        &[
            ("ESHOPBOX_TOKEN_URL", &eshopbox.token_url()),
            ("ESHOPBOX_WORKSPACE", ""),
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["workspace"], serde_json::Value::Null);
}

#[tokio::test]
async fn failures_go_to_stderr_with_a_nonzero_exit_and_no_secret() {
    let eshopbox = MockEshopbox::start().await.unwrap();

    // Rejected credentials: exit 1.
    eshopbox.fail_next_token_calls(1, StatusCode::BAD_REQUEST);
    let output = run(&["--token-url", &eshopbox.token_url()], &[]).await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(text(&output.stdout), "");
    assert!(
        text(&output.stderr).starts_with("eshopbox-token: eshopbox auth: credentials rejected"),
        "{}",
        text(&output.stderr)
    );
    assert_no_secret(&output, None);

    // A missing credential: exit 2, naming the variable.
    let output = run(
        &["--token-url", &eshopbox.token_url()],
        &[("ESHOPBOX_CLIENT_SECRET", "")],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("ESHOPBOX_CLIENT_SECRET is not set"));
    assert_eq!(text(&output.stdout), "");

    // A plain-http token URL on a host other than loopback: exit 2.
    let output = run(&["--token-url", "http://auth.example.net/t"], &[]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("token_url must use https"));
    assert_no_secret(&output, None);

    // A --timeout out of range is a usage error, not an overflow.
    let output = run(
        &[
            "--token-url",
            &eshopbox.token_url(),
            "--timeout",
            "18446744073709551615",
        ],
        &[],
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert_eq!(eshopbox.token_calls(), 1);

    // An endpoint that cannot be reached: exit 1.
    let (_reserved, closed) = support::refusing_address();
    let url = format!("http://{closed}/t");
    let output = run(&["--token-url", &url, "--timeout", "2"], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert_no_secret(&output, None);
    assert_eq!(eshopbox.token_calls(), 1);
}

#[tokio::test]
async fn help_lists_the_options_and_the_environment() {
    let output = run(
        &["--help"],
        &[("ESHOPBOX_REDIS_URL", "redis://:hunter2@x/")],
    )
    .await;
    assert!(output.status.success());
    let help = text(&output.stdout);
    for option in [
        "--workspace",
        "--token-url",
        "--redis-url",
        "--redis-key-prefix",
        "--json",
        "ESHOPBOX_CLIENT_SECRET",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
    assert!(!help.contains("hunter2"), "--help shows the Redis password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_it_prints_the_fleets_token_instead_of_minting_one() {
    let redis = RedisServer::start();
    let eshopbox = MockEshopbox::start().await.unwrap();
    let key = [7u8; 32];
    let key_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();

    // A replica of the fleet gets a token through the store.
    let replica = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .token_store(
            RedisStore::new(&redis.url())
                .unwrap()
                .key_prefix("fleet:")
                .encryption_key(key),
        )
        .build()
        .unwrap();
    let fleet_token = replica.handle().get().await.unwrap();
    let fleet_token = fleet_token.secret().expose_secret().to_owned();
    assert_eq!(eshopbox.token_calls(), 1);

    let args = [
        "--token-url",
        &eshopbox.token_url(),
        "--redis-url",
        &redis.url(),
        "--redis-key-prefix",
        "fleet:",
    ];
    let env = [("ESHOPBOX_REDIS_ENCRYPTION_KEY", key_hex.as_str())];
    let output = run(&args, &env).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), format!("{fleet_token}\n"));
    assert_eq!(
        eshopbox.token_calls(),
        1,
        "the command minted a token of its own"
    );

    // With a store that holds no token, it refreshes through the store, so the
    // fleet's replicas then take its token instead of making a call of their own.
    let other_prefix = ["--redis-key-prefix", "other:"];
    let output = run(&[&args[..4], &other_prefix[..]].concat(), &env).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(eshopbox.token_calls(), 2);
    let printed = text(&output.stdout);
    let other_replica = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .token_store(
            RedisStore::new(&redis.url())
                .unwrap()
                .key_prefix("other:")
                .encryption_key(key),
        )
        .build()
        .unwrap();
    let adopted = other_replica.handle().get().await.unwrap();
    assert_eq!(format!("{}\n", adopted.secret().expose_secret()), printed);
    assert_eq!(
        eshopbox.token_calls(),
        2,
        "the replica did not adopt the stored token"
    );

    // A short --timeout still leaves the store's refresh lock a lease shorter than it.
    let short = ["--redis-key-prefix", "short:", "--timeout", "5"];
    let output = run(&[&args[..4], &short[..]].concat(), &env).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(eshopbox.token_calls(), 3);

    // A bad encryption key is a usage error.
    let output = run(&args, &[("ESHOPBOX_REDIS_ENCRYPTION_KEY", "not-hex")]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("64 hex digits"));
    assert_no_secret(&output, Some(&fleet_token));
}

/// Writes `token` to the store under `prefix`, living `lifetime` seconds in all with
/// `left` seconds to go, as a replica of the fleet would have; returns that store.
async fn store_token(
    redis: &RedisServer,
    prefix: &str,
    token: &str,
    lifetime: u64,
    left: u64,
) -> RedisStore {
    let store = RedisStore::new(&redis.url()).unwrap().key_prefix(prefix);
    let shared = SharedToken::new(
        1,
        SecretString::from(token.to_owned()),
        Duration::from_secs(lifetime),
        Duration::from_secs(left),
    );
    store.save(&shared).await.unwrap();
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_token_due_for_refresh_is_replaced_not_printed() {
    let redis = RedisServer::start();
    let eshopbox = MockEshopbox::start().await.unwrap();
    // The fleet's token has 200 s of its hour left: inside the default refresh window
    // (5 minutes), so printing it would hand out a token about to expire.
    let store = store_token(&redis, "due:", "stored-but-due", 3600, 200).await;

    let args = [
        "--token-url",
        &eshopbox.token_url(),
        "--redis-url",
        &redis.url(),
        "--redis-key-prefix",
        "due:",
    ];
    let output = run(&args, &[]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed = text(&output.stdout);
    let printed = printed.trim_end();
    assert_ne!(printed, "stored-but-due");
    assert_eq!(eshopbox.token_calls(), 1);
    assert!(accepted(&eshopbox, printed).await);
    // The new token is in the store for the fleet.
    let stored = store.load().await.unwrap().unwrap();
    assert_eq!(stored.access_token().expose_secret(), printed);

    // A short-lived token is due only in the last half of its life (the margin is
    // capped there): with 4 of its 5 minutes left it is printed as it is.
    store_token(&redis, "short:", "stored-short-lived", 300, 240).await;
    let short_args = [&args[..4], &["--redis-key-prefix", "short:"][..]].concat();
    let output = run(&short_args, &[]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "stored-short-lived\n");
    assert_eq!(
        eshopbox.token_calls(),
        1,
        "a token call for a token not yet due"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_store_ends_the_command_without_a_token_call() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let redis = RedisServer::start();
    // The fleet seals its values with a key.
    let key = [9u8; 32];
    let fleet = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .token_store(
            RedisStore::new(&redis.url())
                .unwrap()
                .key_prefix("sealed:")
                .encryption_key(key),
        )
        .build()
        .unwrap();
    fleet.handle().get().await.unwrap();
    assert_eq!(eshopbox.token_calls(), 1);
    // Nothing listens on this address.
    let (_socket, refusing) = support::refusing_address();
    let unreachable = format!("redis://{refusing}/");
    let wrong_password = redis.url().replace("redis://", "redis://:wrong-password@");
    // A user that may read but not write (as with a reader endpoint): the command's
    // first look at the store passes, its lock is refused.
    redis.command(
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("reader")
            .arg("on")
            .arg(">reader-password")
            .arg("~*")
            .arg("+@read")
            .arg("+eval")
            .arg("+evalsha"),
    );
    let reader = redis
        .url()
        .replace("redis://", "redis://reader:reader-password@");
    redis.command(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg("right-password"),
    );
    let with_password = redis.url().replace("redis://", "redis://:right-password@");
    // Each case, and the cause the command names.
    for (url, prefix, why, cause) in [
        (unreachable.as_str(), "any:", "unreachable", "refused"),
        (
            wrong_password.as_str(),
            "any:",
            "a wrong password",
            "authentication failed",
        ),
        (
            reader.as_str(),
            "any:",
            "a read-only user",
            "can't run this command",
        ),
        // The fleet's key was not given: its values cannot be read.
        (
            with_password.as_str(),
            "sealed:",
            "sealed with another key",
            "encrypted",
        ),
    ] {
        let args = [
            "--token-url",
            &eshopbox.token_url(),
            "--redis-url",
            url,
            "--redis-key-prefix",
            prefix,
            "--timeout",
            "5",
        ];
        let output = run(&args, &[]).await;
        assert_eq!(
            output.status.code(),
            Some(1),
            "{why}: {}",
            text(&output.stderr)
        );
        assert_eq!(text(&output.stdout), "", "{why}");
        // Found at the first look, or (the read-only user) when taking the lock.
        assert!(
            text(&output.stderr).contains("token store cannot be used")
                || text(&output.stderr).contains("requests tokens only through it"),
            "{why}: {}",
            text(&output.stderr)
        );
        assert!(
            text(&output.stderr).to_lowercase().contains(cause),
            "{why}: {}",
            text(&output.stderr)
        );
        assert_eq!(
            eshopbox.token_calls(),
            1,
            "{why}: a token call outside the store"
        );
        assert_no_secret(&output, None);
        assert!(!text(&output.stderr).contains("-password"), "{why}");
    }
}

/// A token endpoint that rotates the refresh token on every call (and refuses spent
/// ones), and in the middle of each call runs `meanwhile` on Redis and then pauses
/// its writes for 2.5 s: the layer's write after the call fails.
async fn rotating_and_pausing(
    redis: &RedisServer,
    meanwhile: impl Fn(&mut redis::Connection) + Send + 'static,
) -> support::TokenServer {
    let admin = redis.client();
    let mut current = support::REFRESH_TOKEN.to_owned();
    let mut issued = 0;
    support::TokenServer::start_seeing(move |_, seen| {
        if support::sent_refresh_token(seen).as_deref() != Some(current.as_str()) {
            return support::Reply::json(400, r#"{"error":"invalid_grant"}"#);
        }
        issued += 1;
        current = format!("rt-{issued}");
        let mut connection = admin.get_connection().unwrap();
        meanwhile(&mut connection);
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(2500)
            .arg("WRITE")
            .query::<()>(&mut connection)
            .unwrap();
        support::Reply::json(
            200,
            &format!(
                r#"{{"access_token":"tok-{issued}","refresh_token":"{current}","expires_in":3600,"token_type":"Bearer"}}"#
            ),
        )
    })
    .await
}

/// The command's arguments for `endpoint` and `redis`, key prefix `fleet:`.
fn fleet_args(endpoint: &support::TokenServer, redis: &RedisServer) -> Vec<String> {
    [
        "--token-url",
        &endpoint.url(),
        "--redis-url",
        &redis.url(),
        "--redis-key-prefix",
        "fleet:",
        "--timeout",
        "10",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The fleet's stored refresh token.
async fn fleet_refresh_token(redis: &RedisServer) -> Option<String> {
    RedisStore::new(&redis.url())
        .unwrap()
        .key_prefix("fleet:")
        .load_refresh_token()
        .await
        .unwrap()
        .map(|stored| stored.refresh_token().expose_secret().to_owned())
}

// The layer writes a rotated refresh token to the store after its call; if the store
// fails just then (here writes are paused from the middle of the call), the command
// writes it itself before it ends, instead of ending with the fleet's only valid
// refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_the_store_missed_is_stored_before_the_command_ends() {
    let redis = RedisServer::start();
    let endpoint = rotating_and_pausing(&redis, |_| {}).await;
    let args = fleet_args(&endpoint, &redis);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = run(&args, &[("ESHOPBOX_REFRESH_TOKEN", support::REFRESH_TOKEN)]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "tok-1");
    assert_eq!(fleet_refresh_token(&redis).await.as_deref(), Some("rt-1"));
}

// If by then the store holds a refresh token the command neither read at its start nor
// got (another replica's), the command writes nothing over it and fails at once,
// printing no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_is_not_written_over_a_refresh_token_the_command_did_not_expect() {
    let redis = RedisServer::start();
    RedisStore::new(&redis.url())
        .unwrap()
        .key_prefix("scratch:")
        .save_refresh_token(
            &SharedRefreshToken::new(99, SecretString::from("rt-other")),
            None,
        )
        .await
        .unwrap();
    let other = redis.get("{scratch:}refresh-token").unwrap();
    let endpoint = rotating_and_pausing(&redis, move |connection| {
        redis::cmd("SET")
            .arg("{fleet:}refresh-token")
            .arg(&other)
            .query::<()>(connection)
            .unwrap();
    })
    .await;
    let args = fleet_args(&endpoint, &redis);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = run(&args, &[("ESHOPBOX_REFRESH_TOKEN", support::REFRESH_TOKEN)]).await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "");
    assert!(
        text(&output.stderr).contains("not overwritten"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(
        fleet_refresh_token(&redis).await.as_deref(),
        Some("rt-other")
    );
}
