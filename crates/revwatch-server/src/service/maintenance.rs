//! Maintenance: Status, Alarm and HashKV. Defragment, Hash, Snapshot and MoveLeader are
//! not supported and answer Unimplemented.

use std::sync::Arc;

use etcd_proto::etcdserverpb::alarm_request::AlarmAction;
use etcd_proto::etcdserverpb::maintenance_server::Maintenance;
use etcd_proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use etcd_proto::mvccpb::KeyValue;
use prost::Message;
use tonic::{Request, Response, Status};

use super::COMPAT_VERSION;
use crate::error::EtcdError;
use crate::hash::Crc32c;
use crate::shared::Core;

pub(crate) struct MaintenanceService {
    core: Arc<Core>,
}

impl MaintenanceService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    fn hash_kv_at(&self, revision: i64) -> Result<HashKvResponse, EtcdError> {
        let cur = self.core.store.read_rev();
        let state = self.core.store.state();
        let compacted = state.compacted();
        // Like etcd: the compacted revision itself can no longer be hashed.
        if revision > 0 && revision <= compacted {
            return Err(EtcdError::Compacted);
        }
        if revision > cur {
            return Err(EtcdError::FutureRev);
        }
        let at = if revision > 0 { revision } else { cur };
        // etcd's hash, byte for byte: the bucket name, then the records it covers as
        // its `key` bucket stores them. The key is the revision (main, '_', sub;
        // big-endian), with a 't' suffix for a tombstone, whose value holds only the key.
        let mut crc = Crc32c::new();
        crc.update(b"key");
        for rec in state.hashed_records(at) {
            crc.update(&rec.rev.main.to_be_bytes());
            crc.update(b"_");
            crc.update(&rec.rev.sub.to_be_bytes());
            let stored = if rec.tombstone {
                crc.update(b"t");
                KeyValue {
                    key: rec.key.to_vec(),
                    ..KeyValue::default()
                }
            } else {
                rec.to_kv()
            };
            crc.update(&stored.encode_to_vec());
        }
        Ok(HashKvResponse {
            header: self.core.header(cur),
            hash: crc.finish(),
            compact_revision: compacted,
        })
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let req = req.into_inner();
        let member_id = self.core.store.identity().member_id;
        let mut alarms = self.core.alarms();
        let listed = match AlarmAction::try_from(req.action) {
            Ok(AlarmAction::Get) | Err(_) => alarms.clone(),
            Ok(AlarmAction::Activate) => {
                let alarm = AlarmMember {
                    member_id: if req.member_id == 0 {
                        member_id
                    } else {
                        req.member_id
                    },
                    alarm: req.alarm,
                };
                if req.alarm != AlarmType::None as i32 && !alarms.contains(&alarm) {
                    alarms.push(alarm);
                }
                vec![alarm]
            }
            Ok(AlarmAction::Deactivate) => {
                let before = alarms.len();
                alarms.retain(|a| !(a.member_id == req.member_id && a.alarm == req.alarm));
                if alarms.len() < before {
                    vec![AlarmMember {
                        member_id: req.member_id,
                        alarm: req.alarm,
                    }]
                } else {
                    Vec::new()
                }
            }
        };
        drop(alarms);
        Ok(Response::new(AlarmResponse {
            // etcd 3.4 answers Alarm straight from its applier, with no header.
            header: None,
            alarms: listed,
        }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let id = self.core.store.identity();
        let rev = self.core.store.read_rev();
        let errors = self
            .core
            .alarms()
            .iter()
            .map(|a| {
                let name = AlarmType::try_from(a.alarm).map_or("UNKNOWN", |t| t.as_str_name());
                format!("memberID:{} alarm:{name} ", a.member_id)
            })
            .collect();
        let db_size = self.core.store.db_size();
        Ok(Response::new(StatusResponse {
            header: self.core.header(rev),
            version: COMPAT_VERSION.to_owned(),
            db_size,
            leader: id.member_id,
            // There is no raft log; the revision is the closest analogue of an applied index.
            raft_index: rev as u64,
            raft_term: id.raft_term,
            raft_applied_index: rev as u64,
            errors,
            db_size_in_use: db_size,
            is_learner: false,
        }))
    }

    async fn defragment(
        &self,
        _req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Err(Status::unimplemented("defragment is not supported"))
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(Status::unimplemented("hash is not supported; use HashKV"))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        Ok(Response::new(self.hash_kv_at(req.into_inner().revision)?))
    }

    type SnapshotStream = futures::stream::Empty<Result<SnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        _req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(Status::unimplemented("snapshot is not supported"))
    }

    async fn move_leader(
        &self,
        _req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(Status::unimplemented(
            "single-member server: there is no other leader",
        ))
    }
}
