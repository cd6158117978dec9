//! Invariant 6 against a live sync server over loopback TCP: garbage on raw connections gets
//! a typed `ServerMsg::Error` and a closed connection, never a crash, never a change to the
//! server's store, and never a disturbance to a well-behaved client syncing meanwhile.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::frame::{encode_frame, FrameError, FRAME_LEN_MAX_DEFAULT};
use fieldlog::sync::net::read_frame;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::protocol::{ClientMsg, ErrorCode, ServerMsg, PROTOCOL_VERSION};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret, TOKEN_LEN_MAX};
use fieldlog::{
    Changeset, FieldSpec, FieldType, FieldWrite, LogEntry, Op, Pk, ReplicaId, Schema, Stamp, Store,
    Value, Write,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use support::{now_ms, token_for};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);

fn claims(user: &str, expires_at_ms: u64) -> Claims {
    Claims {
        user_id: user.into(),
        expires_at_ms,
        extra: Default::default(),
    }
}

fn hello(token: &str, protocol: u32, schema_version: u64, replica: u64) -> ClientMsg {
    ClientMsg::Hello {
        protocol,
        schema_version,
        token: token.to_owned(),
        replica: ReplicaId(replica),
        download_cursor: 0,
        last_sync: 0,
        reset_pending: false,
        reset_settled: None,
        subscriptions: None,
        subscriptions_acked: 0,
    }
}

fn frame(msg: &ClientMsg) -> Vec<u8> {
    encode_frame(msg, FRAME_LEN_MAX_DEFAULT).expect("encode")
}

/// A frame with `body` and a correct checksum (first 4 bytes of blake3), whatever the body.
fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&blake3::hash(body).as_bytes()[..4]);
    out.extend_from_slice(body);
    out
}

fn entry(seq: u64, time_ms: u64, replica: u64, writes: Vec<Write>) -> LogEntry {
    LogEntry {
        seq,
        stamp: Stamp {
            time: time_ms << 16,
            replica: ReplicaId(replica),
        },
        writes,
    }
}

fn insert(coll: &str, pk: i64, fields: Vec<(&str, Value)>) -> Write {
    Write {
        collection: coll.into(),
        pk: Pk::Int(pk),
        op: Op::Insert {
            fields: fields.into_iter().map(|(f, v)| (f.to_owned(), v)).collect(),
        },
    }
}

fn upload(replica: u64, entries: Vec<LogEntry>, more: bool) -> ClientMsg {
    ClientMsg::Upload {
        changeset: Changeset {
            origin: ReplicaId(replica),
            entries,
        },
        more,
    }
}

async fn connect(addr: &str) -> TcpStream {
    timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Sends `bytes`; with `close`, then shuts down the write half (the peer sees end of stream
/// but can still answer). Write errors are ignored: the server may close early.
async fn send(s: &mut TcpStream, bytes: &[u8], close: bool) {
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    if close {
        let _ = s.shutdown().await;
    }
}

async fn next(s: &mut TcpStream) -> Result<Option<ServerMsg>, FrameError> {
    timeout(WAIT, read_frame::<ServerMsg, _>(s, FRAME_LEN_MAX_DEFAULT))
        .await
        .expect("the server answers or closes in time")
}

/// The next frame after any `Download`s (which the server pushes once a handshake is done).
async fn next_skipping_downloads(s: &mut TcpStream) -> Result<Option<ServerMsg>, FrameError> {
    loop {
        match next(s).await {
            Ok(Some(ServerMsg::Download { .. })) => {}
            other => return other,
        }
    }
}

/// The next frame is `Error { code: want }`, and then the server closes the connection.
async fn expect_error(s: &mut TcpStream, want: ErrorCode, case: &str) {
    expect_error_after(next(s).await, s, want, case).await;
}

/// As [`expect_error`], on a connection past its handshake.
async fn expect_error_after_handshake(s: &mut TcpStream, want: ErrorCode, case: &str) {
    let first = next_skipping_downloads(s).await;
    expect_error_after(first, s, want, case).await;
}

async fn expect_error_after(
    first: Result<Option<ServerMsg>, FrameError>,
    s: &mut TcpStream,
    want: ErrorCode,
    case: &str,
) {
    match first {
        Ok(Some(ServerMsg::Error { code, message })) => {
            assert_eq!(code, want, "{case}: {message}");
            eprintln!("bad input: {case}: {} {message}", code.number());
        }
        other => panic!("{case}: expected Error {want:?}, got {other:?}"),
    }
    match next_skipping_downloads(s).await {
        Ok(None) => {}
        Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{case}: expected the server to close, got {other:?}"),
    }
}

/// A valid handshake as `replica`; returns the stream after `Welcome`.
async fn handshake(addr: &str, token: &str, replica: u64) -> TcpStream {
    let mut s = connect(addr).await;
    send(
        &mut s,
        &frame(&hello(token, PROTOCOL_VERSION, 0, replica)),
        false,
    )
    .await;
    match next(&mut s).await {
        Ok(Some(ServerMsg::Welcome { uploaded: 0, .. })) => s,
        other => panic!("expected Welcome with nothing uploaded, got {other:?}"),
    }
}

struct Fixture {
    server_store: Arc<Store>,
    server: Arc<SyncServer>,
    handle: ServerHandle,
    addr: String,
    secret: Secret,
    good: Arc<Store>,
    client: SyncClient,
    errors: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

/// A server whose `Strict` collection has a schema (`n`: required int), and a good client
/// that has written some `Note`s and is fully synced and idle.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = Secret::generate();
    let server_store = Arc::new(Store::open(dir.path().join("server.redb")).expect("open"));
    let server = Arc::new(
        SyncServer::open(server_store.clone(), ServerConfig::new(secret.clone())).expect("server"),
    );
    server
        .set_schema(Schema::new("Strict").field("n", FieldSpec::required(FieldType::Int)))
        .expect("schema");
    let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
        .await
        .expect("bind");
    let addr = handle.local_addr().expect("addr").to_string();
    let good = Arc::new(Store::open(dir.path().join("good.redb")).expect("open"));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let errs = errors.clone();
    let client = SyncClient::start(
        good.clone(),
        Transport::Tcp(addr.clone()),
        ClientConfig::new(token_for(&secret, "good")),
        {
            let mut hooks = ClientHooks::default();
            hooks.on_state = None;
            hooks.on_error = Some(Arc::new(move |e| {
                errs.lock().expect("errors").push(e.to_string());
            }));
            hooks
        },
    );
    good.write(|tx| {
        for pk in 0..10 {
            tx.insert("Note", pk, [("text", Value::from(format!("note {pk}")))])?;
        }
        Ok(())
    })
    .expect("write");
    let f = Fixture {
        server_store,
        server,
        handle,
        addr,
        secret,
        good,
        client,
        errors,
        _dir: dir,
    };
    f.sync_good().await;
    f
}

impl Fixture {
    async fn sync_good(&self) {
        timeout(WAIT, self.client.wait_for_upload())
            .await
            .expect("good client uploads")
            .expect("good client uploads");
        timeout(WAIT, self.client.wait_for_download())
            .await
            .expect("good client downloads")
            .expect("good client downloads");
        assert_eq!(self.client.fatal_error(), None);
        assert_eq!(self.good.last_sync(), self.good.log_head());
        assert_eq!(self.good.digest(), self.server_store.digest());
    }

    /// The good client still syncs: a write made now reaches the server.
    async fn good_write_reaches_server(&self, pk: i64) {
        let text = Value::from(format!("after the garbage {pk}"));
        self.good
            .write(|tx| tx.insert("Note", pk, [("text", text.clone())]))
            .expect("write");
        self.sync_good().await;
        assert_eq!(
            self.server_store
                .get("Note", pk)
                .expect("get")
                .and_then(|o| o.get("text").cloned()),
            Some(text)
        );
        assert_eq!(
            self.errors.lock().expect("errors").as_slice(),
            &[] as &[String],
            "the good client saw errors"
        );
    }

    /// (digest, version, Note count) of the server.
    fn server_state(&self) -> (fieldlog::Digest, u64, u64) {
        (
            self.server_store.digest(),
            self.server.version(),
            self.server_store.count("Note").expect("count"),
        )
    }

    async fn finish(self) {
        self.client.stop().await;
        self.handle.shutdown().await;
    }
}

/// Framing and handshake garbage, each on its own raw connection: random bytes, oversized
/// and truncated frames, bad checksums, undecodable bodies, messages before `Hello`, bad /
/// tampered / foreign / expired / oversized tokens, wrong protocol and schema versions, a
/// second `Hello`. Each gets its typed error and a closed connection; the server's digest,
/// version and object count are unchanged; the good client, connected throughout, sees no
/// error and its next write reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_connections_get_typed_errors_and_change_nothing() {
    let f = fixture().await;
    let before = f.server_state();
    let good_token = token_for(&f.secret, "mallory");
    let valid_hello = frame(&hello(&good_token, PROTOCOL_VERSION, 0, 77));
    let mut rng = StdRng::seed_from_u64(0xbad_1a9e7);
    let mut cases = 0;

    // Random bytes, then end of stream: an oversized length, a bad checksum or a
    // truncated frame, whichever the bytes make of the header.
    for i in 0..16 {
        let len = if i < 4 {
            i + 1
        } else {
            rng.random_range(5..4096)
        };
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let mut s = connect(&f.addr).await;
        send(&mut s, &bytes, true).await;
        expect_error(&mut s, ErrorCode::BadFrame, &format!("{len} random bytes")).await;
        cases += 1;
    }

    let mut tampered_body = valid_hello.clone();
    let last = tampered_body.len() - 1;
    tampered_body[last] ^= 0x01;
    let mut bad_sum = valid_hello.clone();
    bad_sum[5] ^= 0xff;
    let mut hello_trailing = valid_hello[8..].to_vec();
    hello_trailing.push(0);
    let frame_cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "length prefix u32::MAX",
            vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
            false,
        ),
        (
            "length prefix one over 16 MiB",
            {
                let mut h = ((FRAME_LEN_MAX_DEFAULT + 1) as u32).to_be_bytes().to_vec();
                h.extend_from_slice(&[0; 4]);
                h
            },
            false,
        ),
        (
            "truncated frame then close",
            valid_hello[..valid_hello.len() / 2].to_vec(),
            true,
        ),
        (
            "truncated header then close",
            valid_hello[..5].to_vec(),
            true,
        ),
        ("bad checksum", bad_sum, false),
        ("body altered under its checksum", tampered_body, false),
        (
            "checksummed body that is no message",
            raw_frame(&[0x7f, 1, 2, 3]),
            false,
        ),
        (
            "Hello with a trailing byte",
            raw_frame(&hello_trailing),
            false,
        ),
        ("empty body", raw_frame(&[]), false),
    ];
    for (case, bytes, close) in frame_cases {
        let mut s = connect(&f.addr).await;
        send(&mut s, &bytes, close).await;
        expect_error(&mut s, ErrorCode::BadFrame, case).await;
        cases += 1;
    }

    // Well-formed messages in the wrong order, or with bad credentials.
    let note = |pk| {
        entry(
            1,
            now_ms(),
            77,
            vec![insert("Note", pk, vec![("text", Value::from("x"))])],
        )
    };
    let tampered = {
        let mut t = good_token.clone().into_bytes();
        t[2] = if t[2] == b'0' { b'1' } else { b'0' };
        String::from_utf8(t).expect("ascii")
    };
    let foreign = token_for(&Secret::generate(), "mallory");
    let expired = token::issue(&f.secret, &claims("mallory", 1)).expect("token");
    let huge = "a".repeat(TOKEN_LEN_MAX + 1);
    let message_cases: Vec<(&str, Vec<ClientMsg>, ErrorCode)> = vec![
        (
            "Upload before Hello",
            vec![upload(77, vec![note(1_000)], false)],
            ErrorCode::UnexpectedMessage,
        ),
        (
            "DownloadAck before Hello",
            vec![ClientMsg::DownloadAck { cursor: 5 }],
            ErrorCode::UnexpectedMessage,
        ),
        (
            "Ping before Hello",
            vec![ClientMsg::Ping { id: 1 }],
            ErrorCode::UnexpectedMessage,
        ),
        (
            "SnapshotAck before Hello",
            vec![ClientMsg::SnapshotAck {
                settled: Some(u64::MAX),
            }],
            ErrorCode::UnexpectedMessage,
        ),
        (
            "Hello with a garbage token",
            vec![hello("not a token", PROTOCOL_VERSION, 0, 77)],
            ErrorCode::Unauthorized,
        ),
        (
            "Hello with an empty token",
            vec![hello("", PROTOCOL_VERSION, 0, 77)],
            ErrorCode::Unauthorized,
        ),
        (
            "Hello with a tampered token",
            vec![hello(&tampered, PROTOCOL_VERSION, 0, 77)],
            ErrorCode::Unauthorized,
        ),
        (
            "Hello with a token signed by another secret",
            vec![hello(&foreign, PROTOCOL_VERSION, 0, 77)],
            ErrorCode::Unauthorized,
        ),
        (
            "Hello with an oversized token",
            vec![hello(&huge, PROTOCOL_VERSION, 0, 77)],
            ErrorCode::Unauthorized,
        ),
        (
            "Hello with an expired token",
            vec![hello(&expired, PROTOCOL_VERSION, 0, 77)],
            ErrorCode::TokenExpired,
        ),
        (
            "Hello with the next protocol version",
            vec![hello(&good_token, PROTOCOL_VERSION + 1, 0, 77)],
            ErrorCode::ProtocolVersion,
        ),
        (
            "Hello with protocol version 0",
            vec![hello(&good_token, 0, 0, 77)],
            ErrorCode::ProtocolVersion,
        ),
        (
            "Hello with the wrong schema version",
            vec![hello(&good_token, PROTOCOL_VERSION, 7, 77)],
            ErrorCode::SchemaVersion,
        ),
        (
            "Upload (and Hello) after a refused Hello",
            vec![
                hello(&expired, PROTOCOL_VERSION, 0, 77),
                upload(77, vec![note(1_001)], false),
                hello(&good_token, PROTOCOL_VERSION, 0, 77),
            ],
            ErrorCode::TokenExpired,
        ),
    ];
    for (case, msgs, want) in message_cases {
        let mut s = connect(&f.addr).await;
        let bytes: Vec<u8> = msgs.iter().flat_map(frame).collect();
        send(&mut s, &bytes, false).await;
        expect_error(&mut s, want, case).await;
        cases += 1;
    }

    // A second Hello after a good one; a SnapshotAck when no reset is under way.
    let mut s = handshake(&f.addr, &good_token, 78).await;
    send(&mut s, &valid_hello, false).await;
    expect_error_after_handshake(&mut s, ErrorCode::UnexpectedMessage, "a second Hello").await;
    let mut s = handshake(&f.addr, &good_token, 78).await;
    let ack = frame(&ClientMsg::SnapshotAck { settled: Some(9) });
    send(&mut s, &ack, false).await;
    expect_error_after_handshake(&mut s, ErrorCode::UnexpectedMessage, "SnapshotAck").await;
    cases += 2;

    assert_eq!(f.server_state(), before, "garbage changed the server");
    assert_eq!(f.server.uploaded(ReplicaId(77)).expect("uploaded"), 0);
    f.good_write_reaches_server(100).await;
    eprintln!("bad input: {cases} garbage connections refused");
    f.finish().await;
}

/// After a valid handshake, uploads the server must refuse as a whole: schema violations
/// (wrong type, missing required field, undeclared field — alone, or after a valid entry
/// in the same changeset), a stamp of another replica, a stamp far in the future, non-rising sequence numbers, bad
/// names, two writes to one object, an oversized value, and a pieced upload not continued.
/// Each gets `BadChangeset` (`UnexpectedMessage` for the broken piece chain) and a closed
/// connection, and nothing of it is applied: the server's digest, version and counts are
/// unchanged and it records nothing uploaded for the offending replica. A pieced upload
/// whose connection drops before the last piece is not applied either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_uploads_are_refused() {
    let f = fixture().await;
    let strict_before = f.server_store.count("Strict").expect("count");
    let token = token_for(&f.secret, "mallory");
    let now = now_ms();
    let valid_note = |seq, pk| {
        entry(
            seq,
            now,
            90,
            vec![insert("Note", pk, vec![("text", Value::from("sneaky"))])],
        )
    };
    // A write that breaks the schema is refused on its own (ErrorsOccurred): the upload is
    // acknowledged, the write is reverted and reported, the connection stays.
    let schema_cases: Vec<(&str, u64, Vec<LogEntry>)> = vec![
        (
            "schema: n is a string",
            80,
            vec![entry(
                1,
                now,
                80,
                vec![insert("Strict", 1, vec![("n", Value::from("five"))])],
            )],
        ),
        (
            "schema: required n missing",
            81,
            vec![entry(1, now, 81, vec![insert("Strict", 1, vec![])])],
        ),
        (
            "schema: required n is null",
            82,
            vec![entry(
                1,
                now,
                82,
                vec![insert("Strict", 1, vec![("n", Value::Null)])],
            )],
        ),
        (
            "schema: update of an undeclared field",
            83,
            vec![entry(
                1,
                now,
                83,
                vec![Write {
                    collection: "Strict".into(),
                    pk: Pk::Int(2),
                    op: Op::Update {
                        fields: vec![FieldWrite {
                            field: "undeclared".into(),
                            value: Value::Int(1),
                            base: None,
                        }],
                    },
                }],
            )],
        ),
    ];
    for (case, replica, entries) in schema_cases {
        let mut s = handshake(&f.addr, &token, replica).await;
        send(&mut s, &frame(&upload(replica, entries, false)), false).await;
        // The refusal comes first, so a client that saw the acknowledgement saw it too.
        match next_skipping_downloads(&mut s).await {
            Ok(Some(ServerMsg::CompensatingWrite { refused })) => {
                assert_eq!(refused.len(), 1, "{case}");
                assert!(
                    refused[0]
                        .detail
                        .as_deref()
                        .is_some_and(|d| d.starts_with("failed validation")),
                    "{case}: {}",
                    refused[0]
                );
                assert!(
                    refused[0]
                        .reason
                        .ends_with(r#" in table "Strict" not allowed"#),
                    "{case}: {}",
                    refused[0].reason
                );
                assert_eq!(refused[0].collection, "Strict");
            }
            other => panic!("{case}: expected CompensatingWrite, got {other:?}"),
        }
        match next_skipping_downloads(&mut s).await {
            Ok(Some(ServerMsg::UploadAck { seq: 1, .. })) => {}
            other => panic!("{case}: expected UploadAck, got {other:?}"),
        }
        assert_eq!(
            f.server_store.count("Strict").expect("count"),
            strict_before,
            "{case}: applied"
        );
        assert_eq!(
            f.server.uploaded(ReplicaId(replica)).expect("uploaded"),
            1,
            "{case}"
        );
    }
    let records = f.server.conflicts(0, 100).expect("conflicts");
    assert_eq!(records.len(), 4);
    assert!(records
        .iter()
        .all(|r| r.conflict.kind == fieldlog::conflict::ConflictKind::ErrorsOccurred));
    // In one upload, the valid entry goes through and the invalid write is refused.
    let mut s = handshake(&f.addr, &token, 84).await;
    send(
        &mut s,
        &frame(&upload(
            84,
            vec![
                entry(
                    1,
                    now,
                    84,
                    vec![insert("Note", 509, vec![("text", Value::from("fine"))])],
                ),
                entry(
                    2,
                    now,
                    84,
                    vec![insert("Strict", 1, vec![("n", Value::Bool(true))])],
                ),
            ],
            false,
        )),
        false,
    )
    .await;
    match next_skipping_downloads(&mut s).await {
        Ok(Some(ServerMsg::CompensatingWrite { refused })) => assert_eq!(refused.len(), 1),
        other => panic!("mixed upload: expected CompensatingWrite, got {other:?}"),
    }
    match next_skipping_downloads(&mut s).await {
        Ok(Some(ServerMsg::UploadAck { seq: 2, .. })) => {}
        other => panic!("mixed upload: expected UploadAck, got {other:?}"),
    }
    assert!(f.server_store.get("Note", 509).expect("get").is_some());
    assert_eq!(
        f.server_store.count("Strict").expect("count"),
        strict_before
    );
    drop(s);
    let before = f.server_state();

    let cases: Vec<(&str, Vec<LogEntry>)> = vec![
        (
            "an entry stamped by another replica",
            vec![entry(
                1,
                now,
                91,
                vec![insert("Note", 508, vec![("text", Value::from("forged"))])],
            )],
        ),
        (
            "stamp a day in the future",
            vec![entry(
                1,
                now + 86_400_000,
                90,
                vec![insert("Note", 501, vec![("text", Value::from("future"))])],
            )],
        ),
        ("sequence number 0", vec![valid_note(0, 502)]),
        (
            "sequence numbers not rising",
            vec![valid_note(3, 503), valid_note(3, 504)],
        ),
        (
            "reserved collection name",
            vec![entry(
                1,
                now,
                90,
                vec![insert("__system", 1, vec![("a", Value::Int(1))])],
            )],
        ),
        (
            "reserved field name",
            vec![entry(
                1,
                now,
                90,
                vec![insert("Note", 505, vec![("_id", Value::Int(1))])],
            )],
        ),
        (
            "two writes to one object",
            vec![entry(
                1,
                now,
                90,
                vec![
                    insert("Note", 506, vec![("text", Value::from("a"))]),
                    insert("Note", 506, vec![("text", Value::from("b"))]),
                ],
            )],
        ),
        (
            "a value over the 4 MiB limit",
            vec![entry(
                1,
                now,
                90,
                vec![insert(
                    "Note",
                    507,
                    vec![("text", Value::Bytes(vec![0; (4 << 20) + 1]))],
                )],
            )],
        ),
    ];
    let mut n = 0;
    for (case, entries) in cases {
        let mut s = handshake(&f.addr, &token, 90).await;
        send(&mut s, &frame(&upload(90, entries, false)), false).await;
        expect_error_after_handshake(&mut s, ErrorCode::BadChangeset, case).await;
        assert_eq!(f.server_state(), before, "{case}: something was applied");
        assert_eq!(f.server.uploaded(ReplicaId(90)).expect("uploaded"), 0);
        n += 1;
    }

    // A pieced upload must continue the same transaction.
    let mut s = handshake(&f.addr, &token, 90).await;
    send(
        &mut s,
        &frame(&upload(90, vec![valid_note(1, 600)], true)),
        false,
    )
    .await;
    send(
        &mut s,
        &frame(&upload(90, vec![valid_note(2, 601)], false)),
        false,
    )
    .await;
    expect_error_after_handshake(
        &mut s,
        ErrorCode::UnexpectedMessage,
        "a piece that does not continue",
    )
    .await;
    // A first piece, then the connection drops: nothing is applied.
    let mut s = handshake(&f.addr, &token, 90).await;
    send(
        &mut s,
        &frame(&upload(90, vec![valid_note(1, 602)], true)),
        true,
    )
    .await;
    match next_skipping_downloads(&mut s).await {
        Ok(None) => {}
        Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("after a half-sent transaction: {other:?}"),
    }
    n += 2;

    assert_eq!(f.server_state(), before, "an invalid upload was applied");
    assert_eq!(
        f.server_store.count("Strict").expect("count"),
        strict_before
    );
    for pk in [500, 501, 502, 503, 504, 505, 506, 507, 508, 600, 601, 602] {
        assert_eq!(
            f.server_store.get("Note", pk).expect("get"),
            None,
            "Note {pk}"
        );
    }
    assert_eq!(f.server.uploaded(ReplicaId(90)).expect("uploaded"), 0);

    // The same replica can still upload a valid changeset afterwards.
    let mut s = handshake(&f.addr, &token, 90).await;
    send(
        &mut s,
        &frame(&upload(90, vec![valid_note(1, 700)], false)),
        false,
    )
    .await;
    match next_skipping_downloads(&mut s).await {
        Ok(Some(ServerMsg::UploadAck { seq: 1, .. })) => {}
        other => panic!("a valid upload after the refusals: {other:?}"),
    }
    assert!(f.server_store.get("Note", 700).expect("get").is_some());
    drop(s);

    f.good_write_reaches_server(100).await;
    eprintln!("bad input: {n} invalid uploads refused");
    f.finish().await;
}
