//! TLS and bearer tokens: loads the files the config names, checks them at
//! startup (a bad file stops the broker with a message naming it), and says
//! how open the node is.
//!
//! - Client port: TLS with `--tls-cert/--tls-key`, client certificates
//!   required with `--tls-client-ca`; bearer tokens (`--token-file`,
//!   format in `tokens`) checked by `grpc::auth` before any call is served
//!   or forwarded. Health and reflection stay open.
//! - Peer port: mutual TLS with `--peer-tls-cert/--peer-tls-key/--peer-tls-ca`;
//!   the node presents the same certificate when it dials other nodes
//!   (`raft::PeerChannels`). The peer port does not check tokens: a call
//!   forwarded there was checked by the node the client called, and the
//!   caller is trusted because its certificate is a node's. Without peer
//!   TLS anyone who reaches the peer port is trusted that way, which is
//!   why the broker warns when that port is beyond loopback.
//!
//! Owns no connections; `server.rs` applies what it loads.

pub mod tokens;

use std::{net::SocketAddr, path::Path, sync::Arc};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use self::tokens::{Reload, TokenFile};
use crate::{
    config::{Config, ConfigError},
    raft::network::DialSettings,
};

/// What the config's TLS and token files amount to.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// TLS of the client port.
    pub client_tls: Option<ServerTlsConfig>,
    /// The client port requires client certificates.
    pub client_certs_required: bool,
    /// Mutual TLS of the peer port (server side).
    pub peer_tls: Option<ServerTlsConfig>,
    /// How this node dials peer ports (and, for `--join`, client ports).
    pub dial: DialSettings,
    pub tokens: Option<Arc<TokenFile>>,
}

/// Reads a PEM file of `field` that must hold a block of `kind`
/// (`CERTIFICATE` or `PRIVATE KEY`): a swapped or empty file is named here,
/// not reported as a puzzling handshake error later.
fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let file_error = |message: String| ConfigError::File { path: path.display().to_string(), message };
    let pem = std::fs::read(path).map_err(|e| file_error(format!("{field}: {e}")))?;
    let kind = if field.ends_with("-key") { "PRIVATE KEY" } else { "CERTIFICATE" };
    let text = String::from_utf8_lossy(&pem);
    if !text.lines().any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{kind}-----"))) {
        return Err(file_error(format!("{field}: no PEM {kind} block in the file")));
    }
    Ok(pem)
}

fn invalid(field: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { field, message }
}

impl Security {
    pub fn load(config: &Config) -> Result<Security, ConfigError> {
        let mut security = Security::default();
        let mut client_identity = None;
        if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
            let identity = Identity::from_pem(read("tls-cert", cert)?, read("tls-key", key)?);
            let mut tls = ServerTlsConfig::new().identity(identity.clone());
            if let Some(ca) = &config.tls_client_ca {
                tls = tls.client_ca_root(Certificate::from_pem(read("tls-client-ca", ca)?));
                security.client_certs_required = true;
            }
            check_server(&tls)
                .map_err(|e| invalid("tls-cert", format!("{} / {}: {e}", cert.display(), key.display())))?;
            security.client_tls = Some(tls);
            client_identity = Some(identity);
        }
        let mut peer_ca = None;
        let mut peer_identity = None;
        if let (Some(cert), Some(key), Some(ca)) = (&config.peer_tls_cert, &config.peer_tls_key, &config.peer_tls_ca) {
            let identity = Identity::from_pem(read("peer-tls-cert", cert)?, read("peer-tls-key", key)?);
            let ca = Certificate::from_pem(read("peer-tls-ca", ca)?);
            let tls = ServerTlsConfig::new().identity(identity.clone()).client_ca_root(ca.clone());
            check_server(&tls)
                .map_err(|e| invalid("peer-tls-cert", format!("{} / {}: {e}", cert.display(), key.display())))?;
            let dial = ClientTlsConfig::new().ca_certificate(ca.clone()).identity(identity.clone());
            check_client(&dial).map_err(|e| invalid("peer-tls-ca", e))?;
            security.peer_tls = Some(tls);
            security.dial.peer_tls = Some(dial);
            peer_ca = Some(ca);
            peer_identity = Some(identity);
        }
        if let Some(path) = &config.token_file {
            let file = TokenFile::load(path).map_err(|message| invalid("token-file", message))?;
            let tokens = file.tokens();
            if !config.join.is_empty() && tokens.admin_token().is_none() {
                return Err(invalid(
                    "token-file",
                    format!(
                        "{}: --join calls AddNode, which needs a token with the admin role in this file",
                        path.display()
                    ),
                ));
            }
            security.dial.client_token = tokens.admin_token().map(|t| String::from_utf8_lossy(t).into_owned());
            security.tokens = Some(Arc::new(file));
        }
        // `--join` dials the client port of a running cluster, configured
        // like this node: TLS when this node serves TLS, verified with the
        // peer CA (the cluster's CA), presenting the peer certificate in
        // case the cluster requires client certificates.
        if security.client_tls.is_some() {
            let ca = match (peer_ca, &config.tls_client_ca) {
                (Some(ca), _) => Some(ca),
                (None, Some(path)) => Some(Certificate::from_pem(read("tls-client-ca", path)?)),
                (None, None) => None,
            };
            match ca {
                Some(ca) => {
                    let mut tls = ClientTlsConfig::new().ca_certificate(ca);
                    if let Some(identity) = peer_identity.or(client_identity) {
                        tls = tls.identity(identity);
                    }
                    security.dial.client_tls = Some(tls);
                }
                None if !config.join.is_empty() => {
                    return Err(invalid(
                        "join",
                        "the cluster's client ports speak TLS (like this node's) but there is no CA to verify them: set --peer-tls-ca".into(),
                    ));
                }
                None => {}
            }
        }
        Ok(security)
    }

    /// Warns about every way this node is open to whoever reaches its
    /// ports; silent when both ports are loopback-only or locked down.
    pub fn warn_if_open(&self, client: SocketAddr, peer: SocketAddr) {
        if !client.ip().is_loopback() {
            let authenticated = self.tokens.is_some() || self.client_certs_required;
            match (self.client_tls.is_some(), authenticated) {
                (false, false) => {
                    tracing::warn!(address = %client, "listening beyond loopback WITHOUT authentication or TLS: anyone who can reach this port can enqueue, take and administer jobs")
                }
                (false, true) => {
                    tracing::warn!(address = %client, "listening beyond loopback WITHOUT TLS: bearer tokens and job data cross the network in cleartext; set --tls-cert and --tls-key")
                }
                (true, false) => {
                    tracing::warn!(address = %client, "listening beyond loopback WITHOUT authentication: anyone who can reach this port can enqueue, take and administer jobs; set --token-file or --tls-client-ca")
                }
                (true, true) => {}
            }
        }
        if !peer.ip().is_loopback() && self.peer_tls.is_none() {
            tracing::warn!(address = %peer, "peer port listening beyond loopback WITHOUT mutual TLS: anyone who can reach it can send Raft messages and call every service without a token; set --peer-tls-cert, --peer-tls-key and --peer-tls-ca");
        }
    }
}

/// Builds the TLS acceptor once, so a bad certificate or key is a startup
/// error that names the files, not a failed handshake later.
fn check_server(tls: &ServerTlsConfig) -> Result<(), String> {
    tonic::transport::Server::builder().tls_config(tls.clone()).map(|_| ()).map_err(|e| error_chain(&e))
}

fn check_client(tls: &ClientTlsConfig) -> Result<(), String> {
    tonic::transport::Endpoint::from_static("https://localhost")
        .tls_config(tls.clone())
        .map(|_| ())
        .map_err(|e| error_chain(&e))
}

/// tonic's errors say "transport error" and keep the cause in `source()`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}

/// Re-reads the token file every `interval` until shutdown, logging what
/// changed; a refused file is reported once, not every round.
pub async fn watch_token_file(
    file: Arc<TokenFile>,
    interval: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut last_refusal = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let checked = file.clone();
        let Ok(outcome) = tokio::task::spawn_blocking(move || checked.reload()).await else { continue };
        match outcome {
            Reload::Unchanged => {}
            Reload::Changed(count) => {
                last_refusal = None;
                tracing::info!(path = %file.path().display(), tokens = count, "token file changed: new calls are checked against it");
            }
            Reload::Refused(reason) => {
                if last_refusal.as_ref() != Some(&reason) {
                    tracing::error!(%reason, "token file changed but cannot be used: the tokens loaded before stay in force");
                    last_refusal = Some(reason);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        // The key given as the certificate: named, not a handshake error later.
        let config = Config { tls_cert: Some(key.clone()), tls_key: Some(key.clone()), ..Default::default() };
        let err = Security::load(&config).unwrap_err().to_string();
        assert!(err.contains("node.key") && err.contains("tls-cert: no PEM CERTIFICATE block"), "{err}");
        let config = Config { token_file: Some(dir.path().join("missing")), ..Default::default() };
        let err = Security::load(&config).unwrap_err().to_string();
        assert!(err.contains("token-file") && err.contains("cannot read"), "{err}");
        let open = Security::load(&Config::default()).unwrap();
        assert!(open.client_tls.is_none() && open.peer_tls.is_none() && open.tokens.is_none());
    }
}
