//! Broker addresses: parsing, leader hints, channels, and which node to try next.

use std::time::Duration;

use tonic::codegen::http::Uri;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

use crate::Error;

/// Metadata key in which a node names the shard leader (DESIGN §5, §6).
pub(crate) const LEADER_METADATA: &str = "gantry-leader";

/// Port assumed for a bare host without one (the broker's default `--listen`).
const DEFAULT_PORT: u16 = 50051;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Normalises `host:port`, `host` or `http://host:port` into `http://host:port`.
///
/// `https://` is refused rather than accepted and failing later: this build
/// has no TLS support, and a clear error at startup beats a transport error
/// on the first call.
pub(crate) fn parse_endpoint(raw: &str) -> Result<String, Error> {
    let invalid = || Error::InvalidEndpoint(raw.to_owned());
    let s = raw.trim();
    if s.is_empty() {
        return Err(invalid());
    }
    let (with_scheme, bare) = match s.split_once("://") {
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => (s.to_owned(), false),
        Some(_) => return Err(invalid()),
        None => (format!("http://{s}"), true),
    };
    let uri: Uri = with_scheme.parse().map_err(|_| invalid())?;
    let authority = uri.authority().ok_or_else(invalid)?;
    let host = authority.host();
    let port = authority.port_u16();
    // Rebuilding the authority from its parts rejects what `Uri` tolerates
    // but a connection cannot use: user info, an empty or non-numeric port.
    let rebuilt = match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    if host.is_empty() || authority.as_str() != rebuilt {
        return Err(invalid());
    }
    // A path or query would be silently dropped by gRPC routing; refuse it
    // instead of connecting somewhere the user did not mean.
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid());
    }
    Ok(match (port, bare) {
        (None, true) => format!("http://{host}:{DEFAULT_PORT}"),
        _ => format!("http://{rebuilt}"),
    })
}

pub(crate) fn parse_endpoints<I, S>(endpoints: I) -> Result<Vec<String>, Error>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut out = Vec::new();
    for e in endpoints {
        let e = parse_endpoint(&e.into())?;
        if !out.contains(&e) {
            out.push(e);
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidConfig("no broker endpoints given".to_owned()));
    }
    Ok(out)
}

/// The leader a node named in `gantry-leader`, if it named a usable one.
pub(crate) fn leader_hint(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get(LEADER_METADATA)?.to_str().ok()?;
    parse_endpoint(value).ok()
}

/// `stream` channels also get HTTP/2 keepalive: a worker's stream is mostly
/// idle from the broker's side, and without pings a frozen or partitioned
/// broker would only be noticed after the kernel's TCP timeout (minutes),
/// long after its session and leases are gone.
pub(crate) fn endpoint(uri: &str, stream: bool) -> Result<Endpoint, Error> {
    let ep = Endpoint::from_shared(uri.to_owned())
        .map_err(|_| Error::InvalidEndpoint(uri.to_owned()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    Ok(if stream {
        ep.http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
    } else {
        ep
    })
}

/// Creates a lazily-connected channel (needs a Tokio runtime).
pub(crate) fn lazy_channel(uri: &str, stream: bool) -> Result<Channel, Error> {
    Ok(endpoint(uri, stream)?.connect_lazy())
}

/// Which address to try next: a one-shot hint (redirect or `gantry-leader`)
/// first, then the last address that worked, then the configured endpoints in
/// turn.
#[derive(Debug, Clone)]
pub(crate) struct Targets {
    endpoints: Vec<String>,
    next: usize,
    hint: Option<String>,
    sticky: Option<String>,
}

impl Targets {
    pub(crate) fn new(endpoints: Vec<String>) -> Self {
        Targets { endpoints, next: 0, hint: None, sticky: None }
    }

    pub(crate) fn set_hint(&mut self, hint: String) {
        self.hint = Some(hint);
    }

    pub(crate) fn pick(&mut self) -> String {
        if let Some(h) = self.hint.take() {
            return h;
        }
        if let Some(s) = &self.sticky {
            return s.clone();
        }
        // `endpoints` is never empty (checked by `parse_endpoints`), but stay
        // panic-free if that ever changes.
        match self.endpoints.get(self.next % self.endpoints.len().max(1)) {
            Some(e) => e.clone(),
            None => format!("http://127.0.0.1:{DEFAULT_PORT}"),
        }
    }

    pub(crate) fn succeeded(&mut self, target: &str) {
        match self.endpoints.iter().position(|e| e == target) {
            Some(i) => {
                self.next = i;
                self.sticky = None;
            }
            None => self.sticky = Some(target.to_owned()),
        }
    }

    pub(crate) fn failed(&mut self, target: &str) {
        if self.sticky.as_deref() == Some(target) {
            self.sticky = None;
        } else if self.endpoints.get(self.next % self.endpoints.len().max(1)).map(String::as_str) == Some(target) {
            self.next = (self.next + 1) % self.endpoints.len().max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_get_a_scheme() {
        assert_eq!(parse_endpoint("127.0.0.1:50051").unwrap(), "http://127.0.0.1:50051");
        assert_eq!(parse_endpoint(" node-1:7000 ").unwrap(), "http://node-1:7000");
        assert_eq!(parse_endpoint("[::1]:50051").unwrap(), "http://[::1]:50051");
    }

    #[test]
    fn bare_host_gets_default_port() {
        assert_eq!(parse_endpoint("localhost").unwrap(), "http://localhost:50051");
    }

    #[test]
    fn http_urls_are_kept() {
        assert_eq!(parse_endpoint("http://10.0.0.1:50051").unwrap(), "http://10.0.0.1:50051");
        assert_eq!(parse_endpoint("http://10.0.0.1:50051/").unwrap(), "http://10.0.0.1:50051");
        assert_eq!(parse_endpoint("HTTP://h:1").unwrap(), "http://h:1");
    }

    #[test]
    fn bad_endpoints_are_refused() {
        for bad in [
            "",
            "   ",
            "http://",
            "https://h:1",
            "ftp://h:1",
            "h:1/path",
            "h:notaport",
            "a b:1",
            "user@h:1",
            "h:1?x=1",
            "h:",
        ] {
            assert!(matches!(parse_endpoint(bad), Err(Error::InvalidEndpoint(_))), "{bad:?} accepted");
        }
    }

    #[test]
    fn endpoint_lists_dedupe_and_reject_empty() {
        let v = parse_endpoints(["a:1", "http://a:1", "b:2"]).unwrap();
        assert_eq!(v, vec!["http://a:1", "http://b:2"]);
        assert!(matches!(parse_endpoints(Vec::<String>::new()), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn leader_hint_from_metadata() {
        let mut md = MetadataMap::new();
        assert_eq!(leader_hint(&md), None);
        md.insert(LEADER_METADATA, "10.0.0.2:50051".parse().unwrap());
        assert_eq!(leader_hint(&md).as_deref(), Some("http://10.0.0.2:50051"));
        md.insert(LEADER_METADATA, "".parse().unwrap());
        assert_eq!(leader_hint(&md), None);
    }

    #[test]
    fn targets_rotate_and_prefer_hints() {
        let mut t = Targets::new(vec!["http://a:1".into(), "http://b:1".into()]);
        assert_eq!(t.pick(), "http://a:1");
        t.failed("http://a:1");
        assert_eq!(t.pick(), "http://b:1");
        t.set_hint("http://c:1".into());
        assert_eq!(t.pick(), "http://c:1");
        t.succeeded("http://c:1");
        // The hinted leader worked: stay with it until it fails.
        assert_eq!(t.pick(), "http://c:1");
        t.failed("http://c:1");
        assert_eq!(t.pick(), "http://b:1");
        t.failed("http://b:1");
        assert_eq!(t.pick(), "http://a:1");
    }
}
