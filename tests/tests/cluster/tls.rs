//! A cluster with TLS on the client ports, mutual TLS between peers and
//! bearer tokens: Raft, forwarded calls and proxied worker streams cross the
//! peer port only with a node certificate; tokens are checked where a call
//! enters the cluster; `--join` gets in with TLS and an admin token.

use std::time::Duration;

use bytes::Bytes;
use gantry_proto::peer::{NodeInfoRequest, peer_service_client::PeerServiceClient};
use gantry_tests::{
    TestBroker,
    cluster::{CLUSTER_WAIT, TestCluster},
    eventually,
    security::{ClientCert, PRODUCER_TOKEN, TestPki, WORKER_TOKEN, bearer, token_file},
    v1::{self as proto, JobState, jobs_client::JobsClient, worker_client::WorkerClient},
};
use gantry_worker::{Client, Worker};

fn secure(pki: &TestPki, tokens: &std::path::Path) -> impl Fn(&mut gantry_broker::config::Config) {
    move |config| {
        pki.client_port_tls(config, false);
        pki.peer_tls(config);
        config.token_file = Some(tokens.to_path_buf());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_speak_mutual_tls_and_forward_checked_calls() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let cluster = TestCluster::start_with(3, secure(&pki, &tokens)).await;

    // Enqueue through a follower: checked there, forwarded over mTLS. An
    // election on a busy machine is retried.
    let request = proto::EnqueueRequest { queue: "tls-q".into(), payload: b"x".to_vec(), ..Default::default() };
    let (job_id, follower) = eventually("an enqueue forwarded by a follower", CLUSTER_WAIT, || {
        let (cluster, pki, request) = (&cluster, &pki, request.clone());
        async move {
            let leader = cluster.wait_for_leader().await;
            let follower = cluster.other(leader);
            let mut jobs = JobsClient::new(pki.channel(cluster.addrs[follower], ClientCert::None));
            match jobs.enqueue(bearer(tonic::Request::new(request), PRODUCER_TOKEN)).await {
                Ok(response) => {
                    let hint = response.metadata().get("gantry-leader").expect("leader hint").to_str().unwrap();
                    (hint == cluster.endpoint(leader)).then(|| (response.into_inner().job_id, follower))
                }
                Err(status) if status.code() == tonic::Code::Unavailable => None,
                Err(status) => panic!("forwarded enqueue: {status:?}"),
            }
        }
    })
    .await;
    let mut jobs = JobsClient::new(pki.channel(cluster.addrs[follower], ClientCert::None));
    let refused = jobs.enqueue(bearer(tonic::Request::new(request), WORKER_TOKEN)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "checked at the node the client called");

    // A worker stream opened on a follower is proxied to the leader.
    eventually("a worker stream proxied by a follower", CLUSTER_WAIT, || async {
        let mut worker = WorkerClient::new(pki.channel(cluster.addrs[follower], ClientCert::None));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(proto::WorkerMessage {
            kind: Some(proto::worker_message::Kind::Hello(proto::Hello {
                worker_id: "proxied".into(),
                queues: vec!["nothing-here".into()],
                max_in_flight: 1,
                resume_session_id: String::new(),
            })),
        })
        .unwrap();
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let request = bearer(tonic::Request::new(stream), WORKER_TOKEN);
        let first = match worker.connect(request).await {
            Ok(response) => response.into_inner().message().await,
            Err(status) => Err(status),
        };
        match first {
            Ok(Some(proto::BrokerMessage { kind: Some(proto::broker_message::Kind::Welcome(_)) })) => Some(()),
            Err(status) if status.code() == tonic::Code::Unavailable => None,
            other => panic!("proxied stream: {other:?}"),
        }
    })
    .await;

    // The SDK, given every node, runs the job.
    let endpoints: Vec<String> = cluster.addrs.iter().map(|a| format!("https://{a}")).collect();
    let runner = Worker::builder(endpoints.clone())
        .tls(pki.sdk_tls(ClientCert::None))
        .token(WORKER_TOKEN)
        .queue("tls-q")
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner.run(
        |_ctx: gantry_worker::JobContext| async { Ok(Bytes::from_static(b"ok")) },
        async move {
            let _ = stopped.await;
        },
    ));
    let client =
        Client::builder(endpoints).tls(pki.sdk_tls(ClientCert::None)).token(PRODUCER_TOKEN).connect().await.unwrap();
    let done = client.wait(&job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    let _ = stop.send(());
    running.await.unwrap().unwrap();

    // The peer port takes only node certificates of the cluster's CA.
    let peer = cluster.peer_addr(follower);
    let node_info = |cert: ClientCert| {
        let mut client = PeerServiceClient::new(pki.channel(peer, cert));
        async move { client.node_info(NodeInfoRequest {}).await.map(|r| r.into_inner().node_id) }
    };
    assert_eq!(node_info(ClientCert::Node).await.expect("a node certificate is accepted"), follower as u64 + 1);
    assert!(node_info(ClientCert::None).await.is_err(), "the peer port served a caller without a certificate");
    assert!(node_info(ClientCert::Rogue).await.is_err(), "the peer port served a certificate of another CA");
    let mut plaintext = PeerServiceClient::new(gantry_tests::channel(peer));
    assert!(plaintext.node_info(NodeInfoRequest {}).await.is_err(), "the peer port served plaintext");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_uses_tls_and_an_admin_token() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let cluster = TestCluster::start_with(1, secure(&pki, &tokens)).await;
    let adjust = secure(&pki, &tokens);
    let joiner = TestBroker::start_with(|config| {
        adjust(config);
        config.node_id = 2;
        config.join = vec![cluster.endpoint(0)];
        config.election_timeout = Duration::from_millis(300);
    })
    .await;
    eventually("node 2 becomes a voter through --join", CLUSTER_WAIT, || async {
        cluster.server(0).node().shards[0].raft.status().voters.contains(&2).then_some(())
    })
    .await;
    joiner.stop().await;
    cluster.shutdown().await;
}
