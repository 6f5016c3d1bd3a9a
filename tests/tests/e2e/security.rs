//! TLS on the client port (with and without client certificates), bearer
//! tokens per role, and the SDK, the CLI and grpcurl against a broker that
//! has both.

use std::{process::Command, time::Duration};

use bytes::Bytes;
use gantry_tests::{
    TestBroker, gantry_binary,
    security::{ADMIN_TOKEN, ClientCert, PRODUCER_TOKEN, TestPki, UNKNOWN_TOKEN, WORKER_TOKEN, bearer, token_file},
    v1 as proto,
};
use gantry_worker::{Client, Worker};
use proto::{admin_client::AdminClient, jobs_client::JobsClient};
use tonic::Code;

async fn tls_broker(pki: &TestPki, client_certs: bool, tokens: bool) -> TestBroker {
    let tokens_dir = tempfile::tempdir().unwrap();
    let path = token_file(tokens_dir.path());
    TestBroker::start_with(|c| {
        pki.client_port_tls(c, client_certs);
        if tokens {
            c.token_file = Some(path);
        }
    })
    .await
}

async fn sdk_client(
    broker: &TestBroker,
    pki: &TestPki,
    cert: ClientCert,
    token: Option<&str>,
) -> Result<Client, String> {
    let mut builder = Client::builder([format!("https://{}", broker.addr)]).tls(pki.sdk_tls(cert));
    if let Some(token) = token {
        builder = builder.token(token);
    }
    builder.connect().await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_port_serves_the_sdk_and_refuses_plaintext() {
    let pki = TestPki::new();
    let broker = tls_broker(&pki, false, false).await;

    let client = sdk_client(&broker, &pki, ClientCert::None, None).await.expect("TLS client connects");
    let job = client.enqueue("over-tls", "secret payload").send().await.unwrap();
    let worker = Worker::builder([broker.endpoint()]) // bare host:port: https, since TLS is set
        .tls(pki.sdk_tls(ClientCert::None))
        .queue("over-tls")
        .worker_id("tls-worker")
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(
        |ctx: gantry_worker::JobContext| async move { Ok(Bytes::from(ctx.payload().to_vec())) },
        async move {
            let _ = stopped.await;
        },
    ));
    let done = client.wait(&job.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(done.state(), proto::JobState::Succeeded);
    assert_eq!(done.result, b"secret payload");
    let _ = stop.send(());
    running.await.unwrap().unwrap();

    // Plaintext against the TLS port fails; so does an unknown CA.
    let plain = tokio::time::timeout(Duration::from_secs(10), Client::connect([broker.endpoint()])).await;
    let plain_enqueue = match plain {
        Ok(Ok(plain)) => plain.enqueue("over-tls", "x").send().await.is_err(),
        _ => true,
    };
    assert!(plain_enqueue, "a plaintext client was served on the TLS port");
    let rogue_ca =
        Client::builder([broker.endpoint()]).tls(gantry_worker::Tls::ca_pem(pki.read("rogue.crt"))).connect().await;
    assert!(rogue_ca.is_err(), "a client that does not trust the broker's CA connected");
    // Health stays reachable over TLS without credentials.
    let mut health = tonic_health::pb::health_client::HealthClient::new(pki.channel(broker.addr, ClientCert::None));
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health over TLS");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_with_tls_client_ca() {
    let pki = TestPki::new();
    let broker = tls_broker(&pki, true, false).await;
    let enqueue = |cert: ClientCert| {
        let mut jobs = JobsClient::new(pki.channel(broker.addr, cert));
        async move {
            let request = proto::EnqueueRequest { queue: "mtls".into(), payload: b"x".to_vec(), ..Default::default() };
            jobs.enqueue(request).await.map(|_| ())
        }
    };
    enqueue(ClientCert::Client).await.expect("a client certificate of the CA is accepted");
    assert!(enqueue(ClientCert::None).await.is_err(), "no client certificate was accepted");
    assert!(enqueue(ClientCert::Rogue).await.is_err(), "a certificate of another CA was accepted");
    let client = sdk_client(&broker, &pki, ClientCert::Client, None).await.expect("SDK with a client certificate");
    client.enqueue("mtls", "y").send().await.unwrap();
    broker.stop().await;
}

/// Every service, every kind of caller: right role OK, wrong role
/// PERMISSION_DENIED, no or an unknown token UNAUTHENTICATED.
/// Tokens rotate without a restart: the broker re-reads its token file, and a
/// broken rewrite keeps the tokens in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_token_file_takes_effect_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path());
    let broker = TestBroker::start_with(|c| {
        c.token_file = Some(path.clone());
        c.token_reload_interval = Duration::from_millis(50);
    })
    .await;
    let get_queue = |token: &'static str| {
        let mut admin = broker.admin();
        async move {
            let request = bearer(tonic::Request::new(proto::ListQueuesRequest {}), token);
            admin.list_queues(request).await.map(|_| ()).map_err(|s| s.code())
        }
    };
    assert_eq!(get_queue(ADMIN_TOKEN).await, Ok(()));
    assert_eq!(get_queue(UNKNOWN_TOKEN).await, Err(Code::Unauthenticated));
    // Rotate: the old admin token out, a new one in.
    std::fs::write(&path, format!("{UNKNOWN_TOKEN} admin\n{PRODUCER_TOKEN} producer\n")).unwrap();
    gantry_tests::eventually("the rotated token file is in force", Duration::from_secs(10), || async {
        (get_queue(UNKNOWN_TOKEN).await.is_ok() && get_queue(ADMIN_TOKEN).await == Err(Code::Unauthenticated))
            .then_some(())
    })
    .await;
    // A broken rewrite is ignored: the admin keeps working over many reload
    // rounds (the broker logs the refusal once).
    std::fs::write(&path, "not a token file\n").unwrap();
    let mut checks = 0;
    gantry_tests::eventually("the broken file has been seen a few times", Duration::from_secs(10), || {
        checks += 1;
        let ok = get_queue(UNKNOWN_TOKEN);
        async move {
            assert_eq!(ok.await, Ok(()), "a broken token file locked the admin out");
            (checks >= 10).then_some(())
        }
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grant_each_role_its_services() {
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path());
    let broker = TestBroker::start_with(|c| c.token_file = Some(path)).await;

    let enqueue = |token: Option<&'static str>| {
        let mut jobs = broker.jobs();
        async move {
            let request = proto::EnqueueRequest { queue: "auth".into(), payload: b"x".to_vec(), ..Default::default() };
            let request = match token {
                Some(token) => bearer(tonic::Request::new(request), token),
                None => tonic::Request::new(request),
            };
            jobs.enqueue(request).await.map(|_| ())
        }
    };
    let connect = |token: Option<&'static str>| {
        let mut worker = broker.worker();
        async move {
            let hello = proto::WorkerMessage {
                kind: Some(proto::worker_message::Kind::Hello(proto::Hello {
                    worker_id: "auth-worker".into(),
                    queues: vec!["auth".into()],
                    max_in_flight: 1,
                    resume_session_id: String::new(),
                })),
            };
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tx.send(hello).unwrap();
            let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            let request = match token {
                Some(token) => bearer(tonic::Request::new(stream), token),
                None => tonic::Request::new(stream),
            };
            let mut inbound = worker.connect(request).await?.into_inner();
            let first = inbound.message().await?;
            assert!(
                matches!(first, Some(proto::BrokerMessage { kind: Some(proto::broker_message::Kind::Welcome(_)) })),
                "{first:?}"
            );
            drop(tx);
            Ok::<(), tonic::Status>(())
        }
    };
    let list_queues = |token: Option<&'static str>| {
        let mut admin = broker.admin();
        async move {
            let request = match token {
                Some(token) => bearer(tonic::Request::new(proto::ListQueuesRequest {}), token),
                None => tonic::Request::new(proto::ListQueuesRequest {}),
            };
            admin.list_queues(request).await.map(|_| ())
        }
    };
    let code = |result: Result<(), tonic::Status>| result.err().map(|s| s.code());

    for (token, jobs, worker, admin) in [
        (Some(PRODUCER_TOKEN), None, Some(Code::PermissionDenied), Some(Code::PermissionDenied)),
        (Some(WORKER_TOKEN), Some(Code::PermissionDenied), None, Some(Code::PermissionDenied)),
        (Some(ADMIN_TOKEN), None, None, None),
        (Some(UNKNOWN_TOKEN), Some(Code::Unauthenticated), Some(Code::Unauthenticated), Some(Code::Unauthenticated)),
        (None, Some(Code::Unauthenticated), Some(Code::Unauthenticated), Some(Code::Unauthenticated)),
    ] {
        assert_eq!(code(enqueue(token).await), jobs, "Jobs.Enqueue with {token:?}");
        assert_eq!(code(connect(token).await), worker, "Worker.Connect with {token:?}");
        assert_eq!(code(list_queues(token).await), admin, "Admin.ListQueues with {token:?}");
    }

    // The messages say what is wrong.
    let missing = enqueue(None).await.unwrap_err();
    assert!(missing.message().contains("missing bearer token"), "{}", missing.message());
    let unknown = enqueue(Some(UNKNOWN_TOKEN)).await.unwrap_err();
    assert!(unknown.message().contains("unknown bearer token"), "{}", unknown.message());
    let denied = connect(Some(PRODUCER_TOKEN)).await.unwrap_err();
    assert_eq!(denied.message(), "/gantry.v1.Worker/Connect needs the worker role (or admin); this token has producer");
    let mut admin = AdminClient::new(broker.channel());
    let not_bearer = {
        let mut request = tonic::Request::new(proto::ListQueuesRequest {});
        request.metadata_mut().insert("authorization", format!("Basic {ADMIN_TOKEN}").parse().unwrap());
        admin.list_queues(request).await.unwrap_err()
    };
    assert_eq!(not_bearer.code(), Code::Unauthenticated);
    assert!(not_bearer.message().contains("not `Bearer <token>`"), "{}", not_bearer.message());

    // Health needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel());
    let status = health.check(tonic_health::pb::HealthCheckRequest { service: "gantry.v1.Jobs".into() }).await;
    assert!(status.is_ok(), "{status:?}");
    broker.stop().await;
}

fn gantry(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(gantry_binary())
        .args(args)
        .env_remove("GANTRY_TOKEN")
        .env_remove("GANTRY_TLS_CA")
        .envs(envs.iter().copied())
        .output()
        .expect("run gantry");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let output = Command::new("grpcurl").args(args).output().unwrap_or_else(|e| {
        panic!("grpcurl could not be run ({e}); the test command (scripts/test.sh) installs it with pip")
    });
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

/// The SDK (client and worker), the CLI and grpcurl against TLS and tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_cli_and_grpcurl_with_tls_and_tokens() {
    let pki = TestPki::new();
    let broker = tls_broker(&pki, false, true).await;

    let producer = sdk_client(&broker, &pki, ClientCert::None, Some(PRODUCER_TOKEN)).await.unwrap();
    let job = producer.enqueue("secured", "work").send().await.unwrap();
    // A worker with a producer's token is refused outright: run returns.
    let wrong = Worker::builder([broker.endpoint()])
        .tls(pki.sdk_tls(ClientCert::None))
        .token(PRODUCER_TOKEN)
        .queue("secured")
        .build()
        .unwrap();
    let handler = |_ctx: gantry_worker::JobContext| async { Ok(Bytes::new()) };
    let refused = tokio::time::timeout(Duration::from_secs(20), wrong.run(handler, std::future::pending::<()>()))
        .await
        .expect("a refused worker stops");
    assert_eq!(refused.unwrap_err().code(), Some(Code::PermissionDenied));
    let worker = Worker::builder([format!("https://{}", broker.addr)])
        .tls(pki.sdk_tls(ClientCert::None))
        .token(WORKER_TOKEN)
        .queue("secured")
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(
        |_ctx: gantry_worker::JobContext| async move { Ok(Bytes::from_static(b"done")) },
        async move {
            let _ = stopped.await;
        },
    ));
    let done = producer.wait(&job.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!((done.state(), done.result.as_slice()), (proto::JobState::Succeeded, b"done".as_slice()));
    let _ = stop.send(());
    running.await.unwrap().unwrap();

    // The CLI: flags and environment.
    let addr = broker.endpoint();
    let ca = pki.path("ca.crt");
    let ca = ca.to_str().unwrap();
    let (ok, out, err) = tokio::task::block_in_place(|| {
        gantry(&["enqueue", "secured", "from-cli", "--addr", &addr, "--tls-ca", ca, "--token", PRODUCER_TOKEN], &[])
    });
    assert!(ok, "gantry enqueue over TLS with a token failed: {err}");
    let job_id = out.lines().next().unwrap_or_default().to_owned();
    assert!(!job_id.is_empty());
    let (ok, out, err) = tokio::task::block_in_place(|| {
        gantry(&["queues", "--json", "--addr", &addr], &[("GANTRY_TLS_CA", ca), ("GANTRY_TOKEN", ADMIN_TOKEN)])
    });
    assert!(ok, "gantry queues with GANTRY_TLS_CA and GANTRY_TOKEN failed: {err}");
    assert!(out.contains("secured"), "{out}");
    let (ok, _, err) = tokio::task::block_in_place(|| {
        gantry(&["queues", "--addr", &addr, "--tls-ca", ca, "--token", PRODUCER_TOKEN], &[])
    });
    assert!(!ok && err.contains("PERMISSION_DENIED") && err.contains("admin role"), "{err}");
    let (ok, _, err) =
        tokio::task::block_in_place(|| gantry(&["job", "get", &job_id, "--addr", &addr, "--tls-ca", ca], &[]));
    assert!(!ok && err.contains("UNAUTHENTICATED") && err.contains("missing bearer token"), "{err}");

    // grpcurl: reflection and health are open, the services need a token.
    let (ok, listed, err) = tokio::task::block_in_place(|| grpcurl(&["-cacert", ca, &addr, "list"]));
    assert!(ok && listed.lines().any(|l| l == "gantry.v1.Jobs"), "grpcurl list over TLS without a token: {err}");
    let auth = format!("authorization: Bearer {PRODUCER_TOKEN}");
    let body = format!(r#"{{"job_id":"{job_id}"}}"#);
    let (ok, out, err) = tokio::task::block_in_place(|| {
        grpcurl(&["-cacert", ca, "-H", &auth, "-d", &body, &addr, "gantry.v1.Jobs/GetJob"])
    });
    assert!(ok && out.contains(&job_id), "grpcurl GetJob with a token: {out} {err}");
    broker.stop().await;
}
