//! A shard's leader raises the shard's format (DESIGN §13) once every member,
//! voters and learners, runs a binary that supports the newer one and none
//! holds the upgrade: it asks each member's NodeInfo and proposes
//! `SetFormat` with the newest format all of them support. A member that
//! does not answer, or answers without formats (a build before format
//! gates: format 0 only), keeps the shard where it is. Checked again every
//! period, so a member that was upgraded, removed or lifted its hold is
//! seen on the next round.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{Node, ShardNode};
use crate::format::table::{BINARY_VERSION, FORMAT_MAX, FORMAT_MIN_SUPPORTED};
use crate::queue::{Applied, Command};

/// What one member said about the formats it supports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberFormats {
    pub node_id: u64,
    /// `None`: it did not answer (why).
    pub answer: Result<NodeFormats, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFormats {
    pub version: String,
    pub format_min: u32,
    pub format_max: u32,
    pub held: bool,
}

/// Why a shard cannot be raised further, or the format it can go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RaiseVerdict {
    /// Every member supports `to`, which is newer than the shard's format.
    Raise { to: u32 },
    /// Already at the newest format every member supports.
    UpToDate,
    /// Someone holds the formats, doesn't answer, or lacks the next one.
    Blocked { reason: String },
}

/// The pure decision, for tests: `current` is the shard's format.
pub fn decide(current: u32, members: &[MemberFormats]) -> RaiseVerdict {
    if current >= FORMAT_MAX {
        return RaiseVerdict::UpToDate;
    }
    let mut common = FORMAT_MAX;
    for member in members {
        match &member.answer {
            Err(why) => {
                return RaiseVerdict::Blocked { reason: format!("node {} did not answer ({why})", member.node_id) };
            }
            Ok(formats) if formats.held => {
                return RaiseVerdict::Blocked {
                    reason: format!(
                        "node {} holds the upgrade (`gantry cluster upgrade finalize` lifts it)",
                        member.node_id
                    ),
                };
            }
            Ok(formats) => common = common.min(formats.format_max),
        }
    }
    if common > current {
        return RaiseVerdict::Raise { to: common };
    }
    let lacking: Vec<String> = members
        .iter()
        .filter_map(|m| match &m.answer {
            Ok(f) if f.format_max <= current => Some(format!(
                "node {} (gantry {}, formats up to {})",
                m.node_id,
                if f.version.is_empty() { "before format gates" } else { &f.version },
                f.format_max
            )),
            _ => None,
        })
        .collect();
    RaiseVerdict::Blocked {
        reason: format!("format {} needs every member to support it; lacking: {}", current + 1, lacking.join(", ")),
    }
}

impl ShardNode {
    /// The formats each member of the shard supports (this node's own
    /// without a call).
    pub async fn members_formats(&self, node: &Node) -> Vec<MemberFormats> {
        let status = self.raft.status();
        let asks = status.nodes.iter().map(|(id, member)| node.formats_of(*id, &member.peer));
        futures::future::join_all(asks).await
    }

    /// The shard's format as this node applied it.
    pub fn format(&self) -> u32 {
        self.raft.state().format()
    }

    /// Raises the shard's format if every member supports a newer one;
    /// the verdict either way.
    pub async fn raise_format_if_possible(&self, node: &Node) -> RaiseVerdict {
        let current = self.format();
        let verdict = decide(current, &self.members_formats(node).await);
        if let RaiseVerdict::Raise { to } = verdict {
            match self.propose(Command::SetFormat { format: to }).await {
                Ok(Applied::FormatSet { format }) => {
                    tracing::info!(shard = %self.raft.shard(), from = current, to = format, "shard format raised");
                }
                Ok(other) => tracing::warn!(shard = %self.raft.shard(), ?other, "raising the shard's format"),
                Err(e) => {
                    return RaiseVerdict::Blocked { reason: format!("proposing SetFormat {to}: {e}") };
                }
            }
        }
        verdict
    }
}

impl Node {
    /// Every member of any shard: id and peer address.
    fn all_members(&self) -> std::collections::BTreeMap<u64, String> {
        let mut members = std::collections::BTreeMap::new();
        for shard in &self.shards {
            for (id, member) in shard.raft.status().nodes {
                members.entry(id).or_insert(member.peer);
            }
        }
        members.entry(self.node_id).or_insert_with(|| self.peer_advertise.clone());
        members
    }

    /// What every member of the cluster supports (`gantry cluster upgrade status`).
    pub async fn cluster_formats(&self) -> Vec<MemberFormats> {
        let members = self.all_members();
        let asks = members.iter().map(|(id, peer)| self.formats_of(*id, peer));
        futures::future::join_all(asks).await
    }

    /// What member `node_id` (at `peer`) supports: this node's own without
    /// a call, the others' from their NodeInfo.
    async fn formats_of(&self, node_id: u64, peer: &str) -> MemberFormats {
        if node_id == self.node_id {
            let own = NodeFormats {
                version: BINARY_VERSION.to_owned(),
                format_min: FORMAT_MIN_SUPPORTED,
                format_max: FORMAT_MAX,
                held: self.upgrade_hold.is_held(),
            };
            return MemberFormats { node_id, answer: Ok(own) };
        }
        let answer = crate::cluster::node_info(&self.channels, peer).await.map(|info| NodeFormats {
            version: info.version,
            format_min: info.format_min,
            format_max: info.format_max,
            held: info.upgrade_held,
        });
        MemberFormats { node_id, answer }
    }

    /// Holds or lifts the upgrade hold on every member; what each said.
    pub async fn set_upgrade_hold_everywhere(&self, hold: bool) -> Vec<(u64, Result<(), String>)> {
        let asks = self.all_members().into_iter().map(|(id, peer)| async move {
            if id == self.node_id {
                return (id, self.upgrade_hold.set(hold).map_err(|e| e.to_string()));
            }
            let answer = async {
                let mut client = self.channels.client(&peer)?;
                let mut request = tonic::Request::new(gantry_proto::peer::SetUpgradeHoldRequest { hold });
                request.set_timeout(Duration::from_secs(5));
                client.set_upgrade_hold(request).await.map(|_| ()).map_err(|s| match s.code() {
                    tonic::Code::Unimplemented => "it runs a release before format gates".to_owned(),
                    _ => s.message().to_owned(),
                })
            };
            (id, answer.await)
        });
        futures::future::join_all(asks).await
    }
}

/// Raises `shard`'s format whenever this node leads it and it can be.
pub async fn raise_formats(
    node: Arc<Node>,
    shard: Arc<ShardNode>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_reason = String::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        if !shard.raft.is_leader() || shard.format() >= FORMAT_MAX {
            continue;
        }
        if let RaiseVerdict::Blocked { reason } = shard.raise_format_if_possible(&node).await
            && reason != last_reason
        {
            tracing::info!(shard = %shard.raft.shard(), format = shard.format(), "shard format not raised: {reason}");
            last_reason = reason;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node_id: u64, format_max: u32, held: bool) -> MemberFormats {
        MemberFormats { node_id, answer: Ok(NodeFormats { version: "v".into(), format_min: 0, format_max, held }) }
    }

    #[test]
    fn a_shard_is_raised_only_when_every_member_supports_it_and_none_holds() {
        let all_new = [member(1, FORMAT_MAX, false), member(2, FORMAT_MAX, false), member(3, FORMAT_MAX, false)];
        assert_eq!(decide(0, &all_new), RaiseVerdict::Raise { to: FORMAT_MAX });
        assert_eq!(decide(FORMAT_MAX, &all_new), RaiseVerdict::UpToDate);
        let held_at_max = [member(1, FORMAT_MAX, true)];
        assert_eq!(decide(FORMAT_MAX, &held_at_max), RaiseVerdict::UpToDate, "a hold with nothing left to raise");

        let one_old = [member(1, FORMAT_MAX, false), member(2, 0, false), member(3, FORMAT_MAX, false)];
        match decide(0, &one_old) {
            RaiseVerdict::Blocked { reason } => assert!(reason.contains("node 2"), "{reason}"),
            other => panic!("raised past an old member: {other:?}"),
        }
        let held = [member(1, FORMAT_MAX, false), member(2, FORMAT_MAX, true)];
        assert!(matches!(decide(0, &held), RaiseVerdict::Blocked { reason } if reason.contains("holds")));
        let silent = [member(1, FORMAT_MAX, false), MemberFormats { node_id: 2, answer: Err("timeout".into()) }];
        assert!(matches!(decide(0, &silent), RaiseVerdict::Blocked { reason } if reason.contains("did not answer")));
    }
}
