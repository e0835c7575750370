//! The destination guard: which requests may carry the token.
//!
//! The layer puts the token (and the `ProxyHost` header) only on a request whose URI
//! is
//!
//! - `https` to `myeshopbox.com`, `eshopbox.com` or any subdomain of either
//!   (workspace APIs at `https://<workspace>.myeshopbox.com/…`, warehouse APIs at
//!   `https://wms.eshopbox.com/api/…`), or to a host added with
//!   [`allow_host`](crate::EshopboxAuthBuilder::allow_host);
//! - `http` to one of those hosts, only with
//!   [`allow_insecure_http(true)`](crate::EshopboxAuthBuilder::allow_insecure_http);
//! - `http` or `https` to a loopback host (`localhost`, `127.0.0.0/8`, `[::1]`), for
//!   tests and local proxies;
//! - path-only (`/api/…`, no scheme or host), as tonic's generated clients send
//!   through a `Channel`, which sets the destination itself: the inner service decides
//!   where such a request goes, so the channel's own URI is what must be trusted.
//!
//! Hosts are compared on the parsed host of the URI (so `https://acme.myeshopbox.com@attacker.net/`
//! goes to `attacker.net`), case-insensitively and on label boundaries
//! (`evilmyeshopbox.com` and `myeshopbox.com.attacker.net` are foreign). The port does
//! not matter.
//!
//! Any other request fails before it leaves with an [`Error`] of kind
//! [`ErrorKind::UntrustedDestination`](crate::ErrorKind::UntrustedDestination): the
//! inner service is not called and no token is fetched.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use http::Uri;

use crate::error::{Error, ErrorKind};

/// The domains trusted by default, with all their subdomains, over https.
const ESHOPBOX_DOMAINS: [&str; 2] = ["myeshopbox.com", "eshopbox.com"];

/// The hosts a layer sends its token to: the defaults, the patterns added with
/// `allow_host`, and whether plain http may reach them.
#[derive(Clone, Default)]
pub(crate) struct Destinations {
    allow_insecure_http: bool,
    extra: Arc<[HostPattern]>,
}

/// One `allow_host` pattern, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// Exactly this host.
    Exact(Box<str>),
    /// Exactly this IPv6 address, however a URI writes it.
    Ipv6(Ipv6Addr),
    /// Every subdomain of this domain, not the domain itself (`*.partner.example`).
    Subdomains(Box<str>),
}

impl Destinations {
    /// The guard for these `allow_host` patterns; a bad pattern is a
    /// [`Config`](ErrorKind::Config) error.
    pub(crate) fn new(patterns: &[String], allow_insecure_http: bool) -> Result<Self, Error> {
        let extra = patterns
            .iter()
            .map(|pattern| HostPattern::parse(pattern))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Destinations {
            allow_insecure_http,
            extra: extra.into(),
        })
    }

    /// Whether a request to `uri` may carry the token; if not, the error to fail it
    /// with. Reads only the scheme and host `http::Uri` already parsed, and allocates
    /// nothing unless it refuses.
    #[inline]
    pub(crate) fn check(&self, uri: &Uri) -> Result<(), Error> {
        let Some(authority) = uri.authority() else {
            // Path-only: the inner service (a tonic `Channel`) sets the destination.
            return Ok(());
        };
        if uri.scheme_str() == Some("https") && is_eshopbox_authority(authority.as_str()) {
            return Ok(());
        }
        self.check_rest(uri.scheme_str(), uri.host().unwrap_or(""))
    }

    /// Like [`check`](Self::check), for a `url::Url` (a `reqwest::Request`'s URL). A
    /// URL without a host is refused.
    #[cfg(any(test, feature = "reqwest-middleware"))]
    pub(crate) fn check_url(&self, url: &url::Url) -> Result<(), Error> {
        let host = url.host_str().unwrap_or("");
        let scheme = url.scheme();
        if scheme == "https" && self.trusts(host) {
            return Ok(());
        }
        self.check_rest(Some(scheme), host)
    }

    /// The rare cases: loopback, plain http, refusal.
    #[cold]
    #[inline(never)]
    fn check_rest(&self, scheme: Option<&str>, host: &str) -> Result<(), Error> {
        let is = |name: &str| scheme.is_some_and(|s| s.eq_ignore_ascii_case(name));
        let web = is("https") || is("http");
        if web && is_loopback(host) {
            return Ok(());
        }
        let trusted = self.trusts(host);
        if is("https") && trusted {
            return Ok(());
        }
        if is("http") && trusted && self.allow_insecure_http {
            return Ok(());
        }
        Err(refusal(scheme, host, trusted))
    }

    /// Whether `host` is an Eshopbox host or matches an `allow_host` pattern. An IPv6
    /// literal is compared by value: `http::Uri` keeps it as written
    /// (`[2001:db8:0::1]`), `url::Url` shortens it.
    fn trusts(&self, host: &str) -> bool {
        if let Some(ip) = ipv6_literal(host) {
            return self.extra.contains(&HostPattern::Ipv6(ip));
        }
        let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
        ESHOPBOX_DOMAINS.iter().any(|domain| {
            host.eq_ignore_ascii_case(domain.as_bytes()) || is_subdomain(host, domain)
        }) || self.extra.iter().any(|pattern| pattern.matches(host))
    }
}

impl HostPattern {
    fn parse(pattern: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::config(format!("allow_host({pattern:?}): {why}"));
        if pattern.is_empty() {
            return Err(bad("the pattern is empty"));
        }
        if pattern.chars().any(char::is_whitespace) {
            return Err(bad("the pattern contains whitespace"));
        }
        if pattern.contains("://") {
            return Err(bad("give a host, without a scheme"));
        }
        if pattern.contains('/') {
            return Err(bad("give a host, without a path"));
        }
        let lower = pattern.to_ascii_lowercase();
        if let Some(domain) = lower.strip_prefix("*.") {
            if !is_domain(domain) {
                return Err(bad("expected \"*.\" followed by a domain name"));
            }
            if !domain.contains('.') {
                return Err(bad(
                    "a wildcard needs a domain of at least two labels, like \"*.partner.example\"",
                ));
            }
            return Ok(HostPattern::Subdomains(domain.into()));
        }
        if lower.contains('*') {
            return Err(bad(
                "a wildcard is only allowed as \"*.\" followed by a domain of at least two labels",
            ));
        }
        if let Some(ip) = ipv6_literal(&lower) {
            return Ok(HostPattern::Ipv6(ip));
        }
        if !is_domain(&lower) {
            return Err(bad(
                "expected a host name, an IPv4 address or a bracketed IPv6 address, without a port",
            ));
        }
        Ok(HostPattern::Exact(lower.into()))
    }

    fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostPattern::Exact(exact) => host.eq_ignore_ascii_case(exact.as_bytes()),
            HostPattern::Subdomains(domain) => is_subdomain(host, domain),
            // Compared in `trusts`: an address is no name.
            HostPattern::Ipv6(_) => false,
        }
    }
}

/// The request path's shortcut for the common case: whether `authority` (user info,
/// host and port, as `http::Uri` holds it) is `<labels>.myeshopbox.com` or
/// `<labels>.eshopbox.com` (ASCII case-insensitively), at least 16 bytes long, where
/// `<labels>` does not start with `[`, does not end with an empty label, and holds no
/// `:` or `@`. Then there is no user info and no port, the host is no IP literal, and
/// it is a subdomain of one of those domains. Anything else (shorter names, the bare
/// domains, user info, a port, a trailing dot, another host) goes the general way,
/// which reads the host `http::Uri` finds.
///
/// The `:` matters: `http::Uri` accepts `evil.com:.eshopbox.com` as host `evil.com`
/// with a port that does not parse (a connector then uses the scheme's port), and
/// `[2001:db8::1].eshopbox.com` as the IP literal before the dot. A bracket anywhere
/// but at the start stays in the host (`http::Uri` takes an IP literal only from the
/// start of the host), and the general rule would trust that host too.
///
/// The last 16 bytes are compared as two words: the domain's letters with their case
/// bit cleared (only `A`–`Z` and `a`–`z` give a capital letter that way), its dots as
/// they are. Clearing or setting that bit on a dot would let 0x0E through:
/// `http::Uri` refuses control characters when it parses, but
/// `Authority::from_static` does not check every byte that it keeps.
#[inline]
fn is_eshopbox_authority(authority: &str) -> bool {
    // Per byte (little-endian): `0xDF` clears a letter's case bit, `0xFF` keeps a dot
    // as it is, `0x00` ignores a byte in front of the domain.
    const L: u8 = 0xDF;
    const PBOX_COM: u64 = u64::from_le_bytes([L, L, L, L, 0xFF, L, L, L]);
    const MYESHO: u64 = u64::from_le_bytes([0, 0xFF, L, L, L, L, L, L]);
    const ESHO: u64 = u64::from_le_bytes([0, 0, 0, 0xFF, L, L, L, L]);
    // `x.myeshopbox.com` and `abc.eshopbox.com` are the shortest names taken here.
    let bytes = authority.as_bytes();
    let Some((_, last)) = bytes.split_last_chunk::<16>() else {
        return false;
    };
    let (low, high) = last.split_at(8);
    let (Ok(low), Ok(high)) = (<[u8; 8]>::try_from(low), <[u8; 8]>::try_from(high)) else {
        return false;
    };
    let (low, high) = (u64::from_le_bytes(low), u64::from_le_bytes(high));
    if high & PBOX_COM != u64::from_le_bytes(*b"PBOX.COM") {
        return false;
    }
    // The byte right in front of the domain is the labels' last.
    let (labels, last_byte) = if low & MYESHO == u64::from_le_bytes(*b"\0.MYESHO") {
        (bytes.len() - 15, low as u8)
    } else if low & ESHO == u64::from_le_bytes(*b"\0\0\0.ESHO") {
        (bytes.len() - 13, (low >> 16) as u8)
    } else {
        return false;
    };
    last_byte != b'.' && labels_are_plain(bytes, labels)
}

/// Whether the first `len` bytes of `bytes`, an authority that ends with one of the
/// shortcut's domains, hold no `:` and no `@` and do not start with `[`. The first
/// eight bytes are tested as one word: `bytes` has at least 16, and any of them past
/// `len` are the domain's letters and dots. Labels longer than eight bytes go on byte
/// by byte.
#[inline]
fn labels_are_plain(bytes: &[u8], len: usize) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let Some(first) = bytes.first_chunk::<8>() else {
        return false;
    };
    let word = u64::from_le_bytes(*first);
    let colon = word ^ u64::from_ne_bytes([b':'; 8]);
    let at = word ^ u64::from_ne_bytes([b'@'; 8]);
    // The classic test, for both at once: some high bit is set exactly when some
    // byte of `colon` or of `at` is 0.
    let found = (colon.wrapping_sub(ONES) & !colon) | (at.wrapping_sub(ONES) & !at);
    found & HIGHS == 0
        && word as u8 != b'['
        && (len <= 8 || !bytes[8..len].iter().any(|&b| b == b':' || b == b'@'))
}

/// Whether `host` is a strict subdomain of `domain`: it ends with `.` + `domain`
/// (ASCII case-insensitively) and has something before that dot.
fn is_subdomain(host: &[u8], domain: &str) -> bool {
    let domain = domain.as_bytes();
    host.len() > domain.len() + 1 && {
        let (head, tail) = host.split_at(host.len() - domain.len());
        head.ends_with(b".") && tail.eq_ignore_ascii_case(domain)
    }
}

/// Dot-separated non-empty labels of letters, digits, `-` and `_`.
fn is_domain(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The address of a bracketed IPv6 literal (`[2001:db8::1]`).
fn ipv6_literal(host: &str) -> Option<Ipv6Addr> {
    host.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// `localhost`, an address in `127.0.0.0/8`, or `[::1]`.
fn is_loopback(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Some(ip) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return ip.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// The error for a refused request: names the scheme and host, nothing else of the
/// URI (its user info or query could hold secrets).
fn refusal(scheme: Option<&str>, host: &str, trusted: bool) -> Error {
    let scheme = scheme.unwrap_or("(no scheme)");
    let message = if trusted && scheme.eq_ignore_ascii_case("http") {
        format!(
            "refused to send the token to {scheme}://{host}: plain http to a host other than \
             loopback (use https, or allow_insecure_http(true))"
        )
    } else {
        format!(
            "refused to send the token to {scheme}://{host}: not a trusted destination (https to \
             myeshopbox.com, eshopbox.com and their subdomains, loopback, or a host added with \
             allow_host)"
        )
    };
    Error::new(ErrorKind::UntrustedDestination, message)
}

impl fmt::Debug for Destinations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destinations")
            .field("allowed_hosts", &self.extra)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_guard() -> Destinations {
        Destinations::new(&[], false).unwrap()
    }

    fn allows(guard: &Destinations, uri: &str) -> bool {
        let parsed: Uri = uri.parse().unwrap_or_else(|e| panic!("{uri}: {e}"));
        let by_uri = guard.check(&parsed).is_ok();
        // A `url::Url` of the same address gets the same answer (path-only URIs have
        // no `Url` form).
        if let Ok(url) = url::Url::parse(uri) {
            assert_eq!(guard.check_url(&url).is_ok(), by_uri, "{uri} as a Url");
        }
        by_uri
    }

    #[test]
    fn eshopbox_hosts_over_https_are_trusted() {
        let guard = default_guard();
        for uri in [
            "https://myeshopbox.com/",
            "https://eshopbox.com/",
            "https://acme.myeshopbox.com/api/v2/inventoryListing",
            "https://wms.eshopbox.com/api/v1/orders",
            "https://a.b.c.myeshopbox.com/x",
            "https://ACME.MyEshopbox.COM/upper",
            "https://wms.ESHOPBOX.com/upper",
            "https://acme.myeshopbox.com:443/explicit-port",
            "https://acme.myeshopbox.com:8443/other-port",
            "https://acme.myeshopbox.com./trailing-dot",
            "HTTPS://acme.myeshopbox.com/upper-scheme",
        ] {
            assert!(allows(&guard, uri), "{uri}");
        }
    }

    #[test]
    fn look_alike_and_foreign_hosts_are_refused() {
        let guard = default_guard();
        for uri in [
            "https://evilmyeshopbox.com/",
            "https://evileshopbox.com/",
            "https://myeshopbox.com.attacker.net/",
            "https://eshopbox.com.attacker.net/",
            "https://acme.myeshopbox.co/",
            "https://attacker.example.net/steal",
            "https://acme.myeshopbox.com@attacker.net/",
            "https://acme.myeshopbox.com:443@attacker.net/",
            "https://user:pass@attacker.net/",
            "https://xmyeshopbox.com/",
            "https://myeshopbox.comx/",
            "https://10.0.0.1/",
            "https://[fd00::1]/",
            // `http::Uri` reads these as host `evil.com` (or an IP literal) with a port
            // that does not parse: a connector would go to that host.
            "https://evil.com:.eshopbox.com/",
            "https://evil.com:443.myeshopbox.com/",
            "https://evil.com:x.acme.myeshopbox.com/",
            "https://[2001:db8::1].eshopbox.com/",
            "https://a@[2001:db8::1].eshopbox.com/",
            "https://acme.myeshopbox.com@evil.com:.eshopbox.com/",
        ] {
            assert!(!allows(&guard, uri), "{uri}");
        }
    }

    #[test]
    fn userinfo_does_not_make_a_foreign_host_trusted_nor_the_reverse() {
        let guard = default_guard();
        assert!(allows(&guard, "https://attacker.net@acme.myeshopbox.com/"));
        let err = guard
            .check(
                &"https://acme.myeshopbox.com@attacker.net/x"
                    .parse()
                    .unwrap(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("https://attacker.net:"), "{err}");
        assert!(!err.to_string().contains("acme"), "{err}");
    }

    #[test]
    fn the_shortcut_agrees_with_the_general_rule() {
        // (authority, taken by the shortcut, trusted by the general rule)
        for (authority, shortcut, trusted) in [
            // Taken by the shortcut.
            ("acme.myeshopbox.com", true, true),
            ("ACME.MYESHOPBOX.COM", true, true),
            ("wms.EshopBox.Com", true, true),
            ("x.myeshopbox.com", true, true),
            ("abc.eshopbox.com", true, true),
            ("a.b.myeshopbox.com", true, true),
            ("averylongworkspacename.myeshopbox.com", true, true),
            // A bracket after the start stays in the host, which the general rule
            // trusts too (a connector cannot resolve it).
            ("a[b].myeshopbox.com", true, true),
            // Trusted, but left to the general way: shorter than the shortcut's 16
            // bytes, user info, a port, a trailing dot, an empty label.
            ("eshopbox.com", false, true),
            ("myeshopbox.com", false, true),
            ("my.eshopbox.com", false, true),
            ("evil.com@acme.myeshopbox.com", false, true),
            ("user.@eshopbox.com", false, true),
            ("my@eshopbox.com", false, true),
            ("user:pass@acme.myeshopbox.com", false, true),
            ("acme.myeshopbox.com:443", false, true),
            ("user.name.here@acme.myeshopbox.com", false, true),
            ("a@b.myeshopbox.com", false, true),
            ("acme.myeshopbox.com.", false, true),
            ("a..myeshopbox.com", false, true),
            ("ab..eshopbox.com", false, true),
            // Foreign hosts.
            ("xmyeshopbox.com", false, false),
            ("amyeshopbox.com", false, false),
            ("acme.xmyeshopbox.com", false, false),
            ("x.mymyeshopbox.com", false, false),
            ("evileshopbox.com", false, false),
            ("abc.evileshopbox.com", false, false),
            ("myeshopbox.co", false, false),
            ("shopbox.com", false, false),
            ("evil.com:.eshopbox.com", false, false),
            ("evil.com:443.myeshopbox.com", false, false),
            ("[2001:db8::1].eshopbox.com", false, false),
            ("evil.example.net:x.myeshopbox.com", false, false),
            ("evil.example:x.myeshopbox.com", false, false),
            ("ev:x.myeshopbox.com", false, false),
            // A bracketed literal without a colon (`http::Uri` takes it as the host).
            ("[v1.acme].eshopbox.com", false, false),
        ] {
            assert_eq!(is_eshopbox_authority(authority), shortcut, "{authority}");
            let uri: Uri = format!("https://{authority}/").parse().unwrap();
            let general = default_guard().check_rest(uri.scheme_str(), uri.host().unwrap());
            assert_eq!(general.is_ok(), trusted, "{authority}");
        }
        // The host here is the loopback literal `[::1]`, which the general rule
        // trusts; the shortcut does not take it.
        assert!(!is_eshopbox_authority("a@[::1].myeshopbox.com"));
        let uri: Uri = "https://a@[::1].myeshopbox.com/".parse().unwrap();
        assert_eq!(uri.host(), Some("[::1]"));
    }

    mod shortcut {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

            /// Whatever authority `http::Uri` accepts, the shortcut trusts it only if
            /// the general rule — on the host `http::Uri` reports, which is where a
            /// connector goes — trusts it too.
            #[test]
            fn never_trusts_what_the_host_rule_refuses(
                pieces in proptest::collection::vec(
                    prop_oneof![
                        Just("eshopbox.com"), Just("myeshopbox.com"), Just("my"),
                        Just("evil.com"), Just("acme"), Just("."), Just(":"),
                        Just("@"), Just("["), Just("]"), Just("::1"), Just("443"),
                        Just("%3a"), Just("-"), Just("workspacename"),
                    ],
                    1..8,
                ),
            ) {
                let authority = pieces.concat();
                let Ok(uri) = format!("https://{authority}/").parse::<Uri>() else {
                    return Ok(());
                };
                if is_eshopbox_authority(&authority) {
                    let host = uri.host().unwrap_or("");
                    prop_assert!(
                        default_guard().check_rest(Some("https"), host).is_ok(),
                        "shortcut trusted {authority:?}, whose host is {host:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_a_dot_passes_for_a_dot() {
        // Setting the case bit would turn 0x0E into `.`. `http::Uri` refuses control
        // characters when it parses, but `Authority::from_static` keeps bytes after a
        // `/`, `?` or `#` unchecked: the shortcut must not read 0x0E as a dot.
        for authority in [
            "ab/\x0emyeshopbox.com",
            "ab?\x0emyeshopbox.com",
            "ab#\x0emyeshopbox.com",
            "abc/\x0eeshopbox.com",
            "abc/x.myeshopbox\x0ecom",
        ] {
            assert!(!is_eshopbox_authority(authority), "{authority:?}");
            let uri = Uri::builder()
                .scheme("https")
                .authority(http::uri::Authority::from_static(authority))
                .path_and_query("/")
                .build()
                .unwrap();
            assert!(default_guard().check(&uri).is_err(), "{authority:?}");
        }
    }

    #[test]
    fn plain_http_reaches_only_loopback_by_default() {
        let guard = default_guard();
        for uri in [
            "http://acme.myeshopbox.com/api",
            "http://wms.eshopbox.com/api",
            "http://attacker.example.net/",
            "ws://acme.myeshopbox.com/",
            "ftp://127.0.0.1/",
        ] {
            assert!(!allows(&guard, uri), "{uri}");
        }
        for uri in [
            "http://localhost/",
            "http://LOCALHOST:8080/",
            "https://localhost/",
            "http://127.0.0.1:9/",
            "http://127.1.2.3/",
            "https://127.0.0.1/",
            "http://[::1]:8080/",
            "https://[::1]/",
        ] {
            assert!(allows(&guard, uri), "{uri}");
        }
        for uri in [
            "http://localhost.attacker.net/",
            "http://128.0.0.1/",
            "http://[::2]/",
            "http://127.0.0.1.attacker.net/",
        ] {
            assert!(!allows(&guard, uri), "{uri}");
        }
    }

    #[test]
    fn allow_insecure_http_opens_trusted_hosts_only() {
        let guard = Destinations::new(&["gateway.internal.example".into()], true).unwrap();
        assert!(allows(&guard, "http://acme.myeshopbox.com/api"));
        assert!(allows(&guard, "http://gateway.internal.example/api"));
        assert!(!allows(&guard, "http://attacker.example.net/"));
        assert!(!allows(&guard, "ws://acme.myeshopbox.com/"));
        let strict = Destinations::new(&["gateway.internal.example".into()], false).unwrap();
        assert!(!allows(&strict, "http://gateway.internal.example/api"));
        assert!(allows(&strict, "https://gateway.internal.example/api"));
    }

    #[test]
    fn path_only_requests_pass() {
        let guard = default_guard();
        assert!(allows(&guard, "/eshopbox.Orders/Get"));
        assert!(allows(&guard, "/"));
    }

    #[test]
    fn allow_host_patterns() {
        let guard = Destinations::new(
            &[
                "Gateway.Internal.Example".into(),
                "*.partner.example".into(),
                "10.1.2.3".into(),
                "[fd00::1]".into(),
                "[2001:DB8:0:0::1]".into(),
            ],
            false,
        )
        .unwrap();
        for uri in [
            "https://gateway.internal.example/",
            "https://GATEWAY.internal.example:443/",
            "https://api.partner.example/",
            "https://a.b.PARTNER.example/",
            "https://10.1.2.3/",
            "https://[fd00::1]/",
            "https://[FD00:0::1]/",
            "https://[fd00:0000:0:0:0:0:0:0001]/",
            "https://[2001:db8::1]/",
            "https://[2001:0db8::0:1]:443/",
            "https://acme.myeshopbox.com/",
        ] {
            assert!(allows(&guard, uri), "{uri}");
        }
        for uri in [
            "https://partner.example/",
            "https://evilpartner.example/",
            "https://api.partner.example.attacker.net/",
            "https://x.gateway.internal.example/",
            "https://internal.example/",
            "https://10.1.2.4/",
            "https://[fd00::2]/",
            "https://[2001:db8::1:0]/",
        ] {
            assert!(!allows(&guard, uri), "{uri}");
        }
    }

    #[test]
    fn bad_patterns_are_config_errors() {
        for (pattern, says) in [
            ("", "empty"),
            ("*", "wildcard"),
            ("*.com", "at least two labels"),
            ("*.", "domain name"),
            ("https://gateway.example", "scheme"),
            ("gateway.example/api", "path"),
            ("gateway .example", "whitespace"),
            (" gateway.example", "whitespace"),
            ("gateway.example\n", "whitespace"),
            ("api.*.example", "wildcard"),
            ("gateway.example:8443", "without a port"),
            ("user@gateway.example", "host name"),
            ("gateway..example", "host name"),
            ("[not-an-ip]", "host name"),
        ] {
            let err = Destinations::new(&[pattern.to_owned()], false).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{pattern:?}");
            assert!(err.to_string().contains(says), "{pattern:?}: {err}");
        }
    }

    #[test]
    fn refusal_names_scheme_and_host_only() {
        let guard = default_guard();
        let err = guard
            .check(
                &"https://user:hunter2@attacker.example.net:8443/p?key=hunter2"
                    .parse()
                    .unwrap(),
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UntrustedDestination);
        let text = format!("{err} {err:?}");
        assert!(text.contains("https://attacker.example.net"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let err = guard
            .check(&"http://acme.myeshopbox.com/".parse().unwrap())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("http://acme.myeshopbox.com: plain http"),
            "{err}"
        );
    }
}
