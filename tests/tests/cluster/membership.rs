//! AddNode, RemoveNode and TransferLeader on an in-process cluster.

use gantry_tests::{
    cluster::{TestCluster, cluster_status},
    get_job,
    v1::{self as proto, JobState},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_leader_then_remove_a_node() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let target = cluster.other(leader) as u64 + 1;
    let mut admin = cluster.admin(leader);
    let status = admin
        .transfer_leader(proto::TransferLeaderRequest { shard: 0, node_id: target })
        .await
        .expect("transfer leader")
        .into_inner();
    assert_eq!(status.shards[0].leader_id, target);
    assert_eq!(cluster.wait_for_leader().await as u64 + 1, target);

    // Refusals name the problem.
    let err = admin.transfer_leader(proto::TransferLeaderRequest { shard: 0, node_id: 9 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not a voter"), "{err:?}");
    let err = admin.transfer_leader(proto::TransferLeaderRequest { shard: 7, node_id: 1 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // Remove a follower: two voters remain and still commit.
    let removed = (1..=3u64).find(|id| *id != target).unwrap();
    let status = admin.remove_node(proto::RemoveNodeRequest { node_id: removed }).await.expect("remove").into_inner();
    assert_eq!(status.shards[0].voters.len(), 2, "{status:?}");
    assert!(status.nodes.iter().all(|n| n.node_id != removed), "{status:?}");
    let mut jobs = cluster.jobs(target as usize - 1);
    let id = jobs
        .enqueue(proto::EnqueueRequest { queue: "q".into(), payload: b"x".to_vec(), ..Default::default() })
        .await
        .expect("enqueue with two voters")
        .into_inner()
        .job_id;
    assert_eq!(get_job(&mut jobs, &id).await.state(), JobState::Ready);
    let err = admin.remove_node(proto::RemoveNodeRequest { node_id: removed }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_node_checks_the_node_and_catches_it_up() {
    let mut cluster = TestCluster::start_with_spare(3).await;
    let leader = cluster.wait_for_leader().await;
    let mut jobs = cluster.jobs(leader);
    let mut ids = Vec::new();
    for i in 0..20 {
        let request = proto::EnqueueRequest { queue: "q".into(), payload: vec![i], ..Default::default() };
        ids.push(jobs.enqueue(request).await.expect("enqueue").into_inner().job_id);
    }
    let spare = 3;
    cluster.restart(spare).await;
    let mut admin = cluster.admin(cluster.other(leader));
    let peer = cluster.peer_addr(spare).to_string();

    let err = admin.add_node(proto::AddNodeRequest { node_id: 5, address: peer.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("is node 4, not node 5"), "{err:?}");
    let err = admin.add_node(proto::AddNodeRequest { node_id: 4, address: "nowhere".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let status = admin.add_node(proto::AddNodeRequest { node_id: 4, address: peer }).await.expect("add").into_inner();
    assert_eq!(status.shards[0].voters.len(), 4, "{status:?}");
    let status = cluster_status(cluster.addrs[spare]).await.expect("status");
    cluster.wait_applied(spare, status.shards[0].commit_index).await;
    for id in &ids {
        assert_eq!(get_job(&mut cluster.jobs(spare), id).await.state(), JobState::Ready);
    }
    cluster.shutdown().await;
}

/// Scaling down can remove the leader itself (the highest id often leads):
/// the membership change commits, the others elect a leader among
/// themselves and keep committing, and the removed node is not a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_leader_hands_the_cluster_to_the_rest() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let removed = leader as u64 + 1;
    let follower = cluster.other(leader);
    let mut admin = cluster.admin(follower);
    let status = admin.remove_node(proto::RemoveNodeRequest { node_id: removed }).await.expect("remove").into_inner();
    assert!(!status.shards[0].voters.contains(&removed), "{status:?}");
    let new_leader = cluster.wait_for_leader().await;
    assert_ne!(new_leader, leader, "the removed node still leads");
    let mut jobs = cluster.jobs(new_leader);
    let id = jobs
        .enqueue(proto::EnqueueRequest { queue: "q".into(), payload: b"x".to_vec(), ..Default::default() })
        .await
        .expect("enqueue after the leader left")
        .into_inner()
        .job_id;
    assert_eq!(get_job(&mut jobs, &id).await.state(), JobState::Ready);
    let status = cluster
        .admin(new_leader)
        .cluster_status(proto::ClusterStatusRequest::default())
        .await
        .expect("cluster status")
        .into_inner();
    assert_eq!(status.shards[0].voters.len(), 2, "{status:?}");
    assert!(status.nodes.iter().all(|n| n.node_id != removed), "{status:?}");
    cluster.shutdown().await;
}
