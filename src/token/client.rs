//! The HTTP client for token requests and the token URL it may call: https, or plain
//! http on loopback only, without fragment or user info; no redirects.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::Error;

/// Longest wait for a connection to the token endpoint (the token timeout, if
/// shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default client for token requests: a connect timeout, and no redirects (a
/// redirect would carry the client secret to another URL).
pub(crate) fn default_client(token_timeout: Duration) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT.min(token_timeout))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            Error::config("could not build the HTTP client for token requests").with_source(e)
        })
}

/// Parses the token URL and refuses plain http except on loopback.
pub(crate) fn check_token_url(raw: &str) -> Result<reqwest::Url, Error> {
    let url = reqwest::Url::parse(raw)
        .map_err(|e| Error::config(format!("token_url is not a valid URL: {e}")))?;
    // The answer is checked to come from this very URL, which a fragment or user
    // info would never match (neither is sent as part of it).
    if url.fragment().is_some() {
        return Err(Error::config("token_url must not have a fragment (#…)"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::config(
            "token_url must not carry user info (user:password@); the client id and secret \
             are sent with every token request",
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(Error::config(
            "token_url must use https (plain http is only allowed on a loopback host)",
        )),
        other => Err(Error::config(format!(
            "token_url must use https, not {other:?}"
        ))),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn https_and_loopback_http_are_accepted() {
        for ok in [
            "https://auth.myeshopbox.com/api/v1/generateToken",
            "http://127.0.0.1:8080/api/v1/generateToken",
            "http://127.9.9.9/t",
            "http://localhost:1/t",
            "http://[::1]:9/t",
        ] {
            assert!(check_token_url(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn plain_http_elsewhere_and_junk_are_refused() {
        for (bad, says) in [
            (
                "http://auth.myeshopbox.com/api/v1/generateToken",
                "must use https",
            ),
            ("http://10.0.0.1/t", "must use https"),
            ("http://localhost.evil.com/t", "must use https"),
            ("ftp://127.0.0.1/t", "not \"ftp\""),
            ("not a url", "not a valid URL"),
            ("http://127.0.0.1:8080/t#section", "fragment"),
            ("https://auth.myeshopbox.com/t#", "fragment"),
            ("http://user:pw@127.0.0.1:8080/t", "user info"),
            ("https://user@auth.myeshopbox.com/t", "user info"),
        ] {
            let err = check_token_url(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{bad}");
            assert!(err.to_string().contains(says), "{bad}: {err}");
            assert!(!format!("{err:?}").contains("pw"), "{bad}: {err:?}");
        }
    }
}
