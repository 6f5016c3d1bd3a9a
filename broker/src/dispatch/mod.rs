//! The leader's memory and loops, per shard: the proposer that batches
//! commands into log entries, the registry of live worker sessions, the
//! dispatcher, and WaitJob waiters. Knows nothing of protobuf.

mod dispatcher;
pub mod integrity;
pub mod proposer;
pub mod registry;
pub mod route;
pub mod shard_wire;
pub mod upgrade;
pub mod waiters;

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::sync::{Notify, mpsc, watch};

pub use self::{
    proposer::Proposer,
    registry::{Outbound, Registry},
    waiters::Waiters,
};
use crate::{
    clock::Clock,
    queue::{Command, Event},
    raft::{PeerChannels, ShardRaft},
};

#[derive(Clone, Debug)]
pub struct DispatchSettings {
    pub heartbeat_interval: Duration,
    pub session_ttl: Duration,
}

impl DispatchSettings {
    fn tick_interval(&self) -> Duration {
        dispatcher::tick_interval(self.heartbeat_interval, self.session_ttl)
    }
}

/// Everything this node runs for one shard.
pub struct ShardNode {
    /// This node.
    pub node_id: u64,
    pub raft: Arc<ShardRaft>,
    pub proposer: Proposer,
    pub registry: Registry,
    pub waiters: Waiters,
    pub clock: Arc<dyn Clock>,
    pub settings: DispatchSettings,
    /// Where commands go when another node leads the shard (`route.rs`).
    peers: PeerChannels,
    wake: Arc<Notify>,
}

impl ShardNode {
    /// Starts the proposer and the dispatch loop; `events` is the state
    /// machine's event stream of this shard.
    pub fn start(
        node_id: u64,
        raft: Arc<ShardRaft>,
        events: mpsc::UnboundedReceiver<Vec<Event>>,
        clock: Arc<dyn Clock>,
        settings: DispatchSettings,
        peers: PeerChannels,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let wake = Arc::new(Notify::new());
        let node = Arc::new_cyclic(|me: &Weak<ShardNode>| {
            let me = me.clone();
            let rider: proposer::Rider = Box::new(move |commands| me.upgrade()?.dispatch_riding_along(commands));
            ShardNode {
                node_id,
                proposer: Proposer::spawn(raft.clone(), clock.clone(), Some(rider)),
                raft,
                registry: Registry::default(),
                waiters: Waiters::default(),
                clock,
                settings,
                peers,
                wake: wake.clone(),
            }
        });
        tokio::spawn(dispatcher::run(node.clone(), events, wake, shutdown));
        node
    }

    /// The `Dispatch` that rides along in an entry the leader proposes for
    /// other reasons: enqueues and results in it are followed, in the same
    /// commit, by handing due jobs to every connected session with room.
    /// Only connected sessions: a job pushed to a session whose stream is
    /// not attached yet would sit unseen until its lease ran out. Sessions
    /// without room cost the state machine a lookup each.
    ///
    /// Not with a `Release` or `Fail`: the job it puts back could go straight
    /// back to the same session, whose worker would then see the job's new
    /// assignment before the ack of its release. Those wait for the next
    /// entry, as every dispatch did before.
    fn dispatch_riding_along(&self, commands: &[Command]) -> Option<Command> {
        let excluded =
            |c: &Command| matches!(c, Command::Dispatch { .. } | Command::Release { .. } | Command::Fail { .. });
        if commands.iter().any(excluded) || !self.raft.is_leader() {
            return None;
        }
        let sessions = self.registry.connected();
        (!sessions.is_empty()).then_some(Command::Dispatch { sessions })
    }

    /// A session connected or asked for more: look for work now.
    pub fn wake_dispatcher(&self) {
        self.wake.notify_one();
    }
}

/// This node's shards and how queues and jobs map onto them.
pub struct Node {
    pub node_id: u64,
    /// Client address of this node.
    pub advertise: String,
    /// Peer address of this node.
    pub peer_advertise: String,
    /// Channels to other nodes' peer ports (Raft, forwarding, node info).
    pub channels: PeerChannels,
    pub shards: Vec<Arc<ShardNode>>,
    pub clock: Arc<dyn Clock>,
    pub settings: DispatchSettings,
    /// Flips to true when the node shuts down: long-lived streams end then.
    pub shutdown: watch::Receiver<bool>,
    /// Whether an operator holds the shards' formats (`gantry cluster upgrade hold`).
    pub upgrade_hold: Arc<crate::format::hold::UpgradeHold>,
}

impl Node {
    /// The shard that owns a queue: a stable hash (FNV-1a, 64 bit) of the
    /// queue name modulo the shard count. Never change it: existing queues
    /// would move.
    pub fn shard_for_queue(&self, queue: &str) -> &Arc<ShardNode> {
        &self.shards[(queue_hash(queue) % self.shards.len() as u64) as usize]
    }

    /// The shard a job id names, if this cluster has it.
    pub fn shard_for_job(&self, job_id: crate::queue::JobId) -> Option<&Arc<ShardNode>> {
        self.shard(job_id.shard)
    }

    pub fn shard(&self, id: crate::queue::ShardId) -> Option<&Arc<ShardNode>> {
        self.shards.iter().find(|s| s.raft.shard() == id)
    }
}

pub fn queue_hash(queue: &str) -> u64 {
    queue.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    #[test]
    fn queue_hash_is_fnv1a() {
        // Published FNV-1a 64 test vectors: the hash must never change.
        assert_eq!(super::queue_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::queue_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::queue_hash("foobar"), 0x8594_4171_f739_67e8);
    }
}
