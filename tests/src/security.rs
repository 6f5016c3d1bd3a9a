//! TLS certificates and bearer tokens for tests, made at test time: a CA, a
//! node certificate for `127.0.0.1` and `localhost` valid for server and
//! client use (like the Helm chart's), a client certificate, and a
//! certificate of another CA that nobody trusts.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use gantry_broker::config::Config;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub const PRODUCER_TOKEN: &str = "producer-token-for-tests-0001";
pub const WORKER_TOKEN: &str = "worker-token-for-tests-000002";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0000003";
/// Well formed, in no token file.
pub const UNKNOWN_TOKEN: &str = "unknown-token-for-tests-00004";

/// Files of a test PKI in a temporary directory.
pub struct TestPki {
    dir: tempfile::TempDir,
}

/// Which certificate a test client presents.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ClientCert {
    None,
    /// Signed by the test CA, for client use only.
    Client,
    /// The nodes' certificate (server and client use).
    Node,
    /// Signed by a CA nobody trusts.
    Rogue,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("ca key");
    let pem = params.self_signed(&key).expect("ca cert").pem();
    (params, key, pem)
}

fn leaf(
    name: &str,
    sans: &[&str],
    usages: &[ExtendedKeyUsagePurpose],
    issuer: &Issuer<'_, KeyPair>,
) -> (String, String) {
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = usages.to_vec();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("signed cert");
    (cert.pem(), key.serialize_pem())
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, pem: &str| std::fs::write(dir.path().join(name), pem).expect("write pem");
        let (ca_params, ca_key, ca_pem) = ca("gantry test CA");
        write("ca.crt", &ca_pem);
        let issuer = Issuer::new(ca_params, ca_key);
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let (cert, key) = leaf("gantry node", &["127.0.0.1", "localhost"], &[ServerAuth, ClientAuth], &issuer);
        write("node.crt", &cert);
        write("node.key", &key);
        let (cert, key) = leaf("gantry client", &["client.test"], &[ClientAuth], &issuer);
        write("client.crt", &cert);
        write("client.key", &key);
        let (rogue_params, rogue_key, _) = ca("somebody else's CA");
        let rogue = Issuer::new(rogue_params, rogue_key);
        let (cert, key) = leaf("gantry node", &["127.0.0.1", "localhost"], &[ServerAuth, ClientAuth], &rogue);
        write("rogue.crt", &cert);
        write("rogue.key", &key);
        TestPki { dir }
    }

    /// `ca.crt`, `node.crt`, `node.key`, `client.crt`, `client.key`, `rogue.crt`, `rogue.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read pem")
    }

    /// TLS on the client port; with `client_certs`, client certificates
    /// signed by the test CA are required.
    pub fn client_port_tls(&self, config: &mut Config, client_certs: bool) {
        config.tls_cert = Some(self.path("node.crt"));
        config.tls_key = Some(self.path("node.key"));
        config.tls_client_ca = client_certs.then(|| self.path("ca.crt"));
    }

    /// Mutual TLS on the peer port.
    pub fn peer_tls(&self, config: &mut Config) {
        config.peer_tls_cert = Some(self.path("node.crt"));
        config.peer_tls_key = Some(self.path("node.key"));
        config.peer_tls_ca = Some(self.path("ca.crt"));
    }

    /// The SDK's TLS settings: trust the test CA, present `cert`.
    pub fn sdk_tls(&self, cert: ClientCert) -> gantry_worker::Tls {
        let tls = gantry_worker::Tls::ca_pem(self.read("ca.crt"));
        match self.identity_files(cert) {
            Some((cert, key)) => tls.identity_pem(self.read(cert), self.read(key)),
            None => tls,
        }
    }

    fn identity_files(&self, cert: ClientCert) -> Option<(&'static str, &'static str)> {
        match cert {
            ClientCert::None => None,
            ClientCert::Client => Some(("client.crt", "client.key")),
            ClientCert::Node => Some(("node.crt", "node.key")),
            ClientCert::Rogue => Some(("rogue.crt", "rogue.key")),
        }
    }

    /// A raw TLS channel to `addr` that trusts the test CA and presents `cert`.
    pub fn channel(&self, addr: SocketAddr, cert: ClientCert) -> Channel {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read("ca.crt")));
        if let Some((cert, key)) = self.identity_files(cert) {
            tls = tls.identity(Identity::from_pem(self.read(cert), self.read(key)));
        }
        Endpoint::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls config")
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// Writes a token file with one token per role (in both accepted orders,
/// with comments) into `dir`; returns its path.
pub fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("tokens");
    let text =
        format!("# Gantry test tokens\n{PRODUCER_TOKEN} producer\n\nworker {WORKER_TOKEN}\n  {ADMIN_TOKEN}\tadmin  \n");
    std::fs::write(&path, text).expect("write token file");
    path
}

/// `request` with `authorization: Bearer <token>`.
pub fn bearer<T>(mut request: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii token"));
    request
}
