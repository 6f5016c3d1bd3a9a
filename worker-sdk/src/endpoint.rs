//! Broker addresses: parsing, leader hints, channels (with TLS and the
//! bearer token), and which node to try next.

use std::path::Path;
use std::time::Duration;

use tonic::codegen::http::Uri;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::{Interceptor, interceptor::InterceptedService};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::Error;

/// A channel to one broker node that adds this client's bearer token (if
/// any) to every call. What [`Client::admin`](crate::Client::admin) and
/// [`Client::jobs`](crate::Client::jobs) wrap.
pub type BrokerChannel = InterceptedService<Channel, Credentials>;

/// Adds `authorization: Bearer <token>` to each call when a token is set.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Credentials").field("token", &self.authorization.as_ref().map(|_| "<set>")).finish()
    }
}

impl Credentials {
    pub(crate) fn bearer(token: &str) -> Result<Credentials, Error> {
        let invalid = || Error::InvalidConfig("token: must be visible ASCII characters without spaces".to_owned());
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid());
        }
        let value = format!("Bearer {token}").parse::<AsciiMetadataValue>().map_err(|_| invalid())?;
        Ok(Credentials { authorization: Some(value) })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// TLS settings for brokers that serve `https://`: the CA that signed their
/// certificates, and optionally this client's own certificate (for brokers
/// started with `--tls-client-ca`).
///
/// ```no_run
/// # fn tls() -> Result<(), gantry_worker::Error> {
/// use gantry_worker::Tls;
/// let tls = Tls::ca_file("/etc/gantry/tls/ca.crt")?.identity_files("client.crt", "client.key")?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Tls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl Tls {
    /// Trusts the CA (PEM, one or more certificates) that signed the brokers' certificates.
    pub fn ca_pem(pem: impl Into<Vec<u8>>) -> Tls {
        Tls { ca_pem: pem.into(), identity: None, domain: None }
    }

    /// Like [`Tls::ca_pem`], read from a file.
    pub fn ca_file(path: impl AsRef<Path>) -> Result<Tls, Error> {
        Ok(Tls::ca_pem(read_pem("CA", path.as_ref())?))
    }

    /// Presents this certificate (PEM chain) and key (PEM) to the broker.
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Tls {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Like [`Tls::identity_pem`], read from files.
    pub fn identity_files(self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Tls, Error> {
        let cert = read_pem("certificate", cert.as_ref())?;
        let key = read_pem("key", key.as_ref())?;
        Ok(self.identity_pem(cert, key))
    }

    /// Checks the brokers' certificates for this name instead of the host
    /// of each address (e.g. when connecting by IP to a certificate for a name).
    pub fn domain_name(mut self, name: impl Into<String>) -> Tls {
        self.domain = Some(name.into());
        self
    }

    pub(crate) fn client_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::InvalidConfig(format!("TLS {what} {}: {e}", path.display())))
}

/// How a client or worker reaches brokers: TLS or not, and the token.
#[derive(Clone, Debug, Default)]
pub(crate) struct Connect {
    pub(crate) tls: Option<ClientTlsConfig>,
    pub(crate) credentials: Credentials,
}

impl Connect {
    pub(crate) fn new(tls: Option<&Tls>, token: Option<&str>) -> Result<Connect, Error> {
        let credentials = match token {
            Some(token) => Credentials::bearer(token)?,
            None => Credentials::default(),
        };
        let tls = tls.map(Tls::client_config);
        if let Some(config) = &tls {
            // Parse the PEM now: a bad file is a configuration error, not a
            // failed connection later.
            Endpoint::from_static("https://localhost")
                .tls_config(config.clone())
                .map_err(|e| Error::InvalidConfig(format!("TLS: {}", error_chain(&e))))?;
        }
        Ok(Connect { tls, credentials })
    }

    pub(crate) fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}

/// Metadata key in which a node names the shard leader (DESIGN §5, §6).
pub(crate) const LEADER_METADATA: &str = "gantry-leader";

/// Port assumed for a bare host without one (the broker's default `--listen`).
const DEFAULT_PORT: u16 = 50051;

/// Bounds TCP connect and the TLS handshake: a node that drops SYNs, or a
/// frozen one that never answers the handshake, costs this much, not the
/// kernel's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Normalises `host:port`, `host` or `http://host:port` into
/// `http://host:port`; with `tls`, `host:port`, `host` or `https://host:port`
/// into `https://host:port`.
///
/// A scheme that does not match the TLS settings is refused rather than
/// failing later: a clear error at startup beats a transport error (or a
/// plaintext token) on the first call.
pub(crate) fn parse_endpoint(raw: &str, tls: bool) -> Result<String, Error> {
    let invalid = || Error::InvalidEndpoint(raw.to_owned());
    let s = raw.trim();
    if s.is_empty() {
        return Err(invalid());
    }
    let scheme = if tls { "https" } else { "http" };
    let (with_scheme, bare) = match s.split_once("://") {
        Some((given, rest)) if given.eq_ignore_ascii_case(scheme) => (format!("{scheme}://{rest}"), false),
        Some((given, _)) if given.eq_ignore_ascii_case("https") => {
            return Err(Error::InvalidConfig(format!(
                "endpoint {s:?} is https:// but no TLS settings were given (Tls::ca_file, gantry --tls-ca)"
            )));
        }
        Some((given, _)) if given.eq_ignore_ascii_case("http") => {
            return Err(Error::InvalidConfig(format!(
                "endpoint {s:?} is plaintext http:// but TLS is configured; use https:// or host:port"
            )));
        }
        Some(_) => return Err(invalid()),
        None => (format!("{scheme}://{s}"), true),
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
        (None, true) => format!("{scheme}://{host}:{DEFAULT_PORT}"),
        _ => format!("{scheme}://{rebuilt}"),
    })
}

pub(crate) fn parse_endpoints<I, S>(endpoints: I, tls: bool) -> Result<Vec<String>, Error>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut out = Vec::new();
    for e in endpoints {
        let e = parse_endpoint(&e.into(), tls)?;
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
pub(crate) fn leader_hint(metadata: &MetadataMap, tls: bool) -> Option<String> {
    let value = metadata.get(LEADER_METADATA)?.to_str().ok()?;
    parse_endpoint(value, tls).ok()
}

/// Every channel pings its node over HTTP/2 every [`KEEPALIVE_INTERVAL`],
/// idle or not, and drops the connection when a ping goes unanswered for
/// [`KEEPALIVE_TIMEOUT`]. A frozen or partitioned node keeps its TCP
/// connections open (the kernel still acknowledges), so without pings it
/// would be noticed only after the kernel's TCP timeout (minutes): a worker
/// long after its session and leases are gone, a `WaitJob` long poll only at
/// its own timeout, a cached unary connection only when a call's deadline
/// passes on it.
pub(crate) fn endpoint(uri: &str, connect: &Connect) -> Result<Endpoint, Error> {
    let mut ep = Endpoint::from_shared(uri.to_owned())
        .map_err(|_| Error::InvalidEndpoint(uri.to_owned()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = &connect.tls {
        ep = ep.tls_config(tls.clone()).map_err(|e| Error::InvalidConfig(format!("TLS: {}", error_chain(&e))))?;
    }
    Ok(ep)
}

/// Creates a lazily-connected channel (needs a Tokio runtime).
pub(crate) fn lazy_channel(uri: &str, connect: &Connect) -> Result<BrokerChannel, Error> {
    Ok(with_credentials(endpoint(uri, connect)?.connect_lazy(), connect))
}

pub(crate) fn with_credentials(channel: Channel, connect: &Connect) -> BrokerChannel {
    InterceptedService::new(channel, connect.credentials.clone())
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
        assert_eq!(parse_endpoint("127.0.0.1:50051", false).unwrap(), "http://127.0.0.1:50051");
        assert_eq!(parse_endpoint(" node-1:7000 ", false).unwrap(), "http://node-1:7000");
        assert_eq!(parse_endpoint("[::1]:50051", false).unwrap(), "http://[::1]:50051");
        assert_eq!(parse_endpoint("node-1:7000", true).unwrap(), "https://node-1:7000");
    }

    #[test]
    fn bare_host_gets_default_port() {
        assert_eq!(parse_endpoint("localhost", false).unwrap(), "http://localhost:50051");
        assert_eq!(parse_endpoint("localhost", true).unwrap(), "https://localhost:50051");
    }

    #[test]
    fn http_urls_are_kept() {
        assert_eq!(parse_endpoint("http://10.0.0.1:50051", false).unwrap(), "http://10.0.0.1:50051");
        assert_eq!(parse_endpoint("http://10.0.0.1:50051/", false).unwrap(), "http://10.0.0.1:50051");
        assert_eq!(parse_endpoint("HTTP://h:1", false).unwrap(), "http://h:1");
    }

    #[test]
    fn the_scheme_follows_the_tls_settings() {
        assert_eq!(parse_endpoint("https://h:1", true).unwrap(), "https://h:1");
        assert_eq!(
            parse_endpoint("HTTPS://h", true).unwrap(),
            "https://h",
            "an explicit scheme keeps its default port"
        );
        assert_eq!(parse_endpoint("h", true).unwrap(), "https://h:50051");
        let err = parse_endpoint("https://h:1", false).unwrap_err().to_string();
        assert!(err.contains("no TLS settings"), "{err}");
        let err = parse_endpoint("http://h:1", true).unwrap_err().to_string();
        assert!(err.contains("plaintext"), "{err}");
        assert!(matches!(parse_endpoint("ftp://h:1", true), Err(Error::InvalidEndpoint(_))));
    }

    #[test]
    fn tokens_become_bearer_metadata() {
        let mut credentials = Credentials::bearer("secret-token-0001").unwrap();
        let request = credentials.call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer secret-token-0001");
        assert!(!format!("{credentials:?}").contains("secret"), "Debug never prints the token");
        assert!(Credentials::bearer("two words").is_err());
        assert!(Credentials::bearer("").is_err());
        let mut none = Credentials::default();
        assert!(none.call(tonic::Request::new(())).unwrap().metadata().get("authorization").is_none());
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
            assert!(
                matches!(parse_endpoint(bad, false), Err(Error::InvalidEndpoint(_) | Error::InvalidConfig(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn endpoint_lists_dedupe_and_reject_empty() {
        let v = parse_endpoints(["a:1", "http://a:1", "b:2"], false).unwrap();
        assert_eq!(v, vec!["http://a:1", "http://b:2"]);
        assert!(matches!(parse_endpoints(Vec::<String>::new(), false), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn leader_hint_from_metadata() {
        let mut md = MetadataMap::new();
        assert_eq!(leader_hint(&md, false), None);
        md.insert(LEADER_METADATA, "10.0.0.2:50051".parse().unwrap());
        assert_eq!(leader_hint(&md, false).as_deref(), Some("http://10.0.0.2:50051"));
        assert_eq!(leader_hint(&md, true).as_deref(), Some("https://10.0.0.2:50051"));
        md.insert(LEADER_METADATA, "".parse().unwrap());
        assert_eq!(leader_hint(&md, false), None);
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
