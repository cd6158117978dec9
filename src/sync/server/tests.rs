//! Unit tests of the server session.

use std::sync::Arc;

use super::enforce::atlas_pk;
use super::*;
use crate::changeset::Changeset;
use crate::clock::{ReplicaId, Stamp};
use crate::log::LogEntry;
use crate::log::{Op, Write};
use crate::store::Store;
use crate::sync::protocol::{
    ClientMsg, ErrorCode, ServerMsg, Subscription, SubscriptionSet, PROTOCOL_VERSION,
};
use crate::sync::token::{self, Claims, Secret};
use crate::value::{Pk, Value};

fn ready_session() -> (Arc<SyncServer>, ServerSession, ReplicaId) {
    ready_session_with(ServerConfig::new(Secret::generate()))
}

fn ready_session_with(config: ServerConfig) -> (Arc<SyncServer>, ServerSession, ReplicaId) {
    let secret = config.secret.clone();
    let store = Arc::new(Store::open_in_memory().unwrap());
    let server = Arc::new(SyncServer::open(store, config).unwrap());
    let claims = Claims {
        user_id: "u".into(),
        expires_at_ms: u64::MAX,
        extra: Default::default(),
    };
    let mut session = server.session();
    let client = ReplicaId(7);
    let out = session.on_message(
        ClientMsg::Hello {
            protocol: PROTOCOL_VERSION,
            schema_version: 0,
            token: token::issue(&secret, &claims).unwrap(),
            replica: client,
            download_cursor: 0,
            last_sync: 0,
            reset_pending: false,
            reset_settled: None,
            subscriptions: None,
            subscriptions_acked: 0,
        },
        0,
    );
    assert!(matches!(out[..], [ServerMsg::Welcome { .. }]), "{out:?}");
    (server, session, client)
}

fn upload(seq: u64, replica: ReplicaId) -> ClientMsg {
    ClientMsg::Upload {
        changeset: Changeset {
            origin: replica,
            entries: vec![LogEntry {
                seq,
                stamp: Stamp {
                    time: 1 << 16,
                    replica,
                },
                writes: vec![Write {
                    collection: "C".into(),
                    pk: Pk::Int(1),
                    op: Op::Insert {
                        fields: vec![("f".into(), Value::Int(seq as i64))],
                    },
                }],
            }],
        },
        more: false,
    }
}

/// A subscription change while a snapshot's chunks are in flight: the client still
/// acknowledges those chunks, after the server has begun the new snapshot. Counting
/// them for the new one ended it early, and the new one's own last acknowledgement
/// then came "outside a reset" (a fatal 101 for the client).
#[test]
fn acknowledgements_of_a_replaced_snapshot_do_not_count_for_the_next() {
    // Small chunks, so a snapshot has many.
    let mut config = ServerConfig::new(Secret::generate());
    config.batch_bytes = 256;
    let (server, mut session, _) = ready_session_with(config);
    server
        .write(|tx| {
            for i in 0..40i64 {
                tx.insert("C", i, [("f", Value::from("x".repeat(64)))])?;
            }
            Ok(())
        })
        .unwrap();
    let subscribe = |version: u64| ClientMsg::Subscribe {
        set: SubscriptionSet {
            version,
            subscriptions: vec![Subscription::new("all", "C", "TRUEPREDICATE")],
        },
    };
    let no_error = |out: &[ServerMsg]| {
        assert!(
            out.iter().all(|m| !matches!(m, ServerMsg::Error { .. })),
            "{out:?}"
        );
    };
    // Sends what the server has to send; returns the acknowledgements the client
    // will make, and whether the last chunk went.
    let drain = |session: &mut ServerSession| {
        let mut acks = Vec::new();
        loop {
            match &session.poll_download()[..] {
                [ServerMsg::Snapshot { end, .. }] => {
                    acks.push(ClientMsg::SnapshotAck {
                        settled: end.as_ref().map(|_| 0),
                    });
                    if end.is_some() {
                        return (acks, true);
                    }
                }
                [] => return (acks, false),
                other => panic!("{other:?}"),
            }
        }
    };
    let out = session.on_message(subscribe(1), 0);
    assert!(
        matches!(out[..], [ServerMsg::ResetRequired { .. }]),
        "{out:?}"
    );
    let (stale, done) = drain(&mut session);
    assert!(!stale.is_empty() && !done, "a window of the first snapshot");
    // The set changes again; the new snapshot's first window goes out at once.
    let out = session.on_message(subscribe(2), 0);
    assert!(
        matches!(out[..], [ServerMsg::ResetRequired { .. }]),
        "{out:?}"
    );
    let (acks, mut done) = drain(&mut session);
    // Then the client's acknowledgements of the old chunks arrive, then of the new.
    for ack in stale {
        no_error(&session.on_message(ack, 0));
    }
    // As on a connection: after each message the server sends what it may.
    let mut chunks = acks.len();
    let mut acks: std::collections::VecDeque<ClientMsg> = acks.into();
    let mut ended = false;
    while let Some(ack) = acks.pop_front() {
        let last = matches!(ack, ClientMsg::SnapshotAck { settled: Some(_) });
        let out = session.on_message(ack, 0);
        no_error(&out);
        if last {
            assert!(
                matches!(out[..], [ServerMsg::UploadAck { .. }]),
                "the last acknowledgement ends the snapshot: {out:?}"
            );
            ended = true;
        } else {
            assert_eq!(out, [], "only the last acknowledgement ends it");
        }
        if !done {
            let (more, last) = drain(&mut session);
            chunks += more.len();
            acks.extend(more);
            done = last;
        }
    }
    assert!(done && ended, "the snapshot ended after {chunks} chunks");
    assert!(chunks > 8, "{chunks} chunks");
    assert!(!session.is_closed());
}

/// Atlas's spelling of each key type, from its own compensating-write tests.
#[test]
fn keys_are_written_as_atlas_writes_them() {
    let mut id12 = [0u8; 12];
    id12[11] = 0xab;
    let id16: [u8; 16] = [
        0x01, 0x23, 0x45, 0x67, 0x9a, 0xbc, 0x4d, 0xef, 0x90, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc,
        0xde,
    ];
    assert_eq!(atlas_pk(&Pk::Int(123456)), "123456");
    assert_eq!(atlas_pk(&Pk::Int(-1)), "-1");
    assert_eq!(atlas_pk(&Pk::Str("short".into())), r#""short""#);
    assert_eq!(
        atlas_pk(&Pk::Id12(id12)),
        r#"ObjectID("0000000000000000000000ab")"#
    );
    assert_eq!(
        atlas_pk(&Pk::Id16(id16)),
        "UUID(01234567-9abc-4def-9012-3456789abcde)"
    );
}

#[test]
fn a_stamp_of_another_replica_is_refused() {
    let (server, mut session, _) = ready_session();
    let out = session.on_message(upload(1, ReplicaId(99)), 0);
    assert!(
        matches!(
            &out[..],
            [ServerMsg::Error {
                code: ErrorCode::BadChangeset,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(server.version(), 0);
    assert!(server.store().get("C", 1).unwrap().is_none());
}

#[test]
fn a_repeated_upload_is_applied_once() {
    let (server, mut session, client) = ready_session();
    for _ in 0..3 {
        let out = session.on_message(upload(1, client), 0);
        assert!(
            matches!(
                out[..],
                [ServerMsg::UploadAck {
                    seq: 1,
                    server_version: 1
                }]
            ),
            "{out:?}"
        );
    }
    assert_eq!(server.version(), 1, "one history record");
}
