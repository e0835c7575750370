//! Parsing and validating the token endpoint's answer.
//!
//! Error messages here name the field and the rule it broke, never the field's value:
//! serde's own messages can quote the offending input, so they are not passed on.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::source::FetchedToken;
use super::value::check_access_token;
use crate::error::Error;

/// Lifetime assumed when the answer has no `expires_in`: Eshopbox issues 24 h tokens.
pub(crate) const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest lifetime believed: 30 days, the longest Eshopbox documents. A larger
/// `expires_in` is clamped to this.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 60 * 60);

#[derive(Deserialize)]
struct Raw {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    id_token: Option<String>,
    scope: Option<String>,
}

/// Parses a successful (2xx) answer. The access token is checked here (it must be
/// sendable in a header); its header is built when the token is installed.
pub(crate) fn parse(body: &[u8]) -> Result<FetchedToken, Error> {
    let raw: Raw = serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "JSON of the wrong shape",
            serde_json::error::Category::Eof => "truncated JSON",
            _ => "something that is not JSON",
        };
        Error::invalid_response(format!(
            "token endpoint answered {what} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;

    let access_token = raw
        .access_token
        .ok_or_else(|| Error::invalid_response("token endpoint answered without access_token"))?;
    if access_token.is_empty() {
        return Err(Error::invalid_response(
            "token endpoint answered an empty access_token",
        ));
    }
    if let Some(kind) = &raw.token_type {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(Error::invalid_response(format!(
                "token endpoint answered token_type {:?}, expected Bearer",
                truncate(kind)
            )));
        }
    }
    check_access_token(&access_token)?;
    let lifetime = match raw.expires_in {
        None | Some(serde_json::Value::Null) => DEFAULT_LIFETIME,
        Some(value) => lifetime(&value)?,
    };
    let mut token = FetchedToken::new(access_token).expires_in(lifetime);
    token.scope = raw.scope;
    token.has_id_token = raw.id_token.is_some();
    Ok(token)
}

/// A rotated `refresh_token` in a 2xx answer, read on its own so that it is kept even
/// when the rest of the answer is unusable: the old refresh token may already be spent.
pub(crate) fn rotated_refresh_token(body: &[u8]) -> Option<SecretString> {
    #[derive(Deserialize)]
    struct Rotation {
        refresh_token: Option<String>,
    }
    let rotation: Rotation = serde_json::from_slice(body).ok()?;
    rotation
        .refresh_token
        .filter(|rt| !rt.trim().is_empty())
        .map(SecretString::from)
}

/// A lifetime clamped to [`MAX_LIFETIME`].
pub(crate) fn clamp_lifetime(lifetime: Duration) -> Duration {
    lifetime.min(MAX_LIFETIME)
}

/// `expires_in` as a number of seconds (integer, float or numeric string). Zero or
/// negative means already stale; more than [`MAX_LIFETIME`] is clamped.
fn lifetime(value: &serde_json::Value) -> Result<Duration, Error> {
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|s| s.is_finite())
    .ok_or_else(|| Error::invalid_response("token endpoint answered a non-numeric expires_in"))?;
    if seconds <= 0.0 {
        return Ok(Duration::ZERO);
    }
    Ok(Duration::try_from_secs_f64(seconds)
        .unwrap_or(MAX_LIFETIME)
        .min(MAX_LIFETIME))
}

/// The OAuth 2 `error` code of an error answer, if it is a plausible code
/// (`invalid_grant`, …): short and made of `[A-Za-z0-9_.-]`. Anything else is dropped
/// rather than echoed, so an odd body cannot smuggle a secret into an error message.
pub(crate) fn oauth_error_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct OAuthError {
        error: Option<serde_json::Value>,
    }
    let parsed: OAuthError = serde_json::from_slice(body).ok()?;
    let code = parsed.error?.as_str()?.to_owned();
    let plausible = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    plausible.then_some(code)
}

fn truncate(s: &str) -> String {
    s.chars().take(16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::value::Bearer;
    use crate::ErrorKind;
    use http::HeaderValue;
    use secrecy::ExposeSecret;

    /// The header the cell builds for a parsed token.
    fn header(t: &FetchedToken) -> HeaderValue {
        Bearer::new(t.access_token.clone())
            .unwrap()
            .header()
            .clone()
    }

    fn lifetime_of(t: &FetchedToken) -> Duration {
        t.expires_in.expect("parse always sets the lifetime")
    }

    const SAMPLE: &str = r#"{
        "access_token": "eyJhbGciOiJSUzI1N.InR5cCI6IkpXVCIsI",
        "id_token": "eyyRwffpgDlOyAxcv.OkguyrSHtteckIyueW",
        "scope": "openid profile offline_access",
        "expires_in": 86400,
        "token_type": "Bearer"
    }"#;

    #[test]
    fn parses_the_documented_sample() {
        let t = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(header(&t), "Bearer eyJhbGciOiJSUzI1N.InR5cCI6IkpXVCIsI");
        assert!(header(&t).is_sensitive());
        assert_eq!(lifetime_of(&t), Duration::from_secs(86400));
        assert_eq!(t.scope.as_deref(), Some("openid profile offline_access"));
        assert!(t.has_id_token);
        assert!(rotated_refresh_token(SAMPLE.as_bytes()).is_none());
    }

    #[test]
    fn rotated_refresh_token_is_read_even_from_an_unusable_answer() {
        let body = br#"{"access_token":"a","expires_in":60,"refresh_token":"rt2"}"#;
        assert_eq!(rotated_refresh_token(body).unwrap().expose_secret(), "rt2");
        assert!(!parse(body).unwrap().has_id_token);
        let unusable = br#"{"token_type":"mac","refresh_token":"rt3"}"#;
        assert!(parse(unusable).is_err());
        assert_eq!(
            rotated_refresh_token(unusable).unwrap().expose_secret(),
            "rt3"
        );
        assert!(rotated_refresh_token(br#"{"refresh_token":" "}"#).is_none());
        assert!(rotated_refresh_token(b"<html>").is_none());
    }

    #[test]
    fn expires_in_defaults_clamps_and_accepts_strings() {
        let life = |json: &str| parse(json.as_bytes()).map(|t| lifetime_of(&t));
        assert_eq!(life(r#"{"access_token":"a"}"#).unwrap(), DEFAULT_LIFETIME);
        assert_eq!(
            life(r#"{"access_token":"a","expires_in":null}"#).unwrap(),
            DEFAULT_LIFETIME
        );
        assert_eq!(
            life(r#"{"access_token":"a","expires_in":0}"#).unwrap(),
            Duration::ZERO
        );
        assert_eq!(
            life(r#"{"access_token":"a","expires_in":-1}"#).unwrap(),
            Duration::ZERO
        );
        assert_eq!(
            life(r#"{"access_token":"a","expires_in":1000000000000}"#).unwrap(),
            MAX_LIFETIME
        );
        assert_eq!(
            life(r#"{"access_token":"a","expires_in":1e300}"#).unwrap(),
            MAX_LIFETIME
        );
        assert_eq!(
            life(r#"{"access_token":"a","expires_in":"3600"}"#).unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            life(r#"{"access_token":"a","expires_in":1.5}"#).unwrap(),
            Duration::from_millis(1500)
        );
        let err = life(r#"{"access_token":"a","expires_in":"soon"}"#).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidResponse);
        assert!(err.to_string().contains("expires_in"));
    }

    #[test]
    fn token_type_must_be_bearer_in_any_case() {
        assert!(parse(br#"{"access_token":"a","token_type":"bEaReR"}"#).is_ok());
        let err = parse(br#"{"access_token":"a","token_type":"mac"}"#).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidResponse);
        assert!(err.to_string().contains("token_type"));
    }

    #[test]
    fn bad_bodies_name_the_cause_without_echoing_values() {
        let cases: &[(&[u8], &str)] = &[
            (b"<html>bad gateway</html>", "not JSON"),
            (br#"{"access_token":"abc"#, "truncated JSON"),
            (br#"{"access_token":42}"#, "wrong shape"),
            (br#"{"token_type":"Bearer"}"#, "without access_token"),
            (br#"{"access_token":""}"#, "empty access_token"),
            (
                br#"{"access_token":"secret-abc\r\nX-Evil: 1"}"#,
                "control characters",
            ),
            (br#"{"access_token":"secret abc"}"#, "whitespace"),
        ];
        for (body, expected) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidResponse, "{expected}");
            let shown = format!("{err} {err:?}");
            assert!(
                shown.contains(expected),
                "{shown} should mention {expected}"
            );
            assert!(!shown.contains("secret"), "{shown} leaks the token");
        }
    }

    #[test]
    fn oauth_error_codes_are_read_only_when_plausible() {
        assert_eq!(
            oauth_error_code(br#"{"error":"invalid_grant","error_description":"x"}"#).as_deref(),
            Some("invalid_grant")
        );
        assert_eq!(oauth_error_code(br#"{"error":"has spaces in it"}"#), None);
        assert_eq!(oauth_error_code(br#"{"error":{"errors":[]}}"#), None);
        assert_eq!(oauth_error_code(b"<html>"), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse(&body);
                let _ = oauth_error_code(&body);
                let _ = rotated_refresh_token(&body);
            }

            #[test]
            fn a_token_is_accepted_exactly_when_it_can_be_a_header(
                token in "zq[ -~\t\r\n\u{80}-\u{10FFFF}]{0,40}",
                expires_in in proptest::option::of(any::<i64>()),
                kind in proptest::option::of("[Bb][Ee][Aa][Rr][Ee][Rr]|mac|"),
            ) {
                let mut json = serde_json::json!({ "access_token": token });
                if let Some(e) = expires_in { json["expires_in"] = e.into(); }
                if let Some(k) = &kind { json["token_type"] = k.clone().into(); }
                let result = parse(json.to_string().as_bytes());
                let clean = !token.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
                let bearer = kind.as_deref().is_none_or(|k| k.eq_ignore_ascii_case("bearer"));
                match result {
                    Ok(t) => {
                        prop_assert!(clean && bearer);
                        let expected = format!("Bearer {token}");
                        let built = header(&t);
                        prop_assert_eq!(built.as_bytes(), expected.as_bytes());
                        prop_assert!(header(&t).is_sensitive());
                        prop_assert!(lifetime_of(&t) <= MAX_LIFETIME);
                        if let Some(e) = expires_in {
                            prop_assert_eq!(lifetime_of(&t).is_zero(), e <= 0);
                        }
                    }
                    Err(e) => {
                        prop_assert!(!clean || !bearer, "{}", e);
                        prop_assert_eq!(e.kind(), crate::ErrorKind::InvalidResponse);
                        let shown = format!("{e} {e:?}");
                        if token.len() > 2 {
                            prop_assert!(!shown.contains(&token), "{} leaks the token", shown);
                        }
                    }
                }
            }
        }
    }
}
