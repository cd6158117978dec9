//! Client reset under crashes, lost messages and server restores, driven in process: one
//! `ServerSession` per client connection and one `ClientSession` per client, with messages
//! moved by a small deterministic loop (no tokio, no sockets). Invariant 4 of DESIGN.md:
//! nothing unsynced is lost in a reset, and a crash during a reset resumes on next open.
//!
//! A "crash" drops the client's session, its queued messages and its `Arc<Store>`, then opens
//! the same file again. A "cut" loses one message and everything after it on that connection
//! (a broken TCP connection). Every store runs on one `ManualTimeSource`, and each crash case
//! starts from a byte-for-byte copy of the same prepared files (same replica ids, same
//! stamps), so its final state must equal an uninterrupted run's, digest for digest.

mod support;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fieldlog::reset::{ObjectSnapshot, ResetMode, ResetReason, ResetReport};
use fieldlog::sync::client::{ClientConfig, ClientSession};
use fieldlog::sync::protocol::{ClientMsg, ServerMsg, PROTOCOL_VERSION};
use fieldlog::sync::server::{ServerConfig, ServerSession, SyncServer};
use fieldlog::sync::token::Secret;
use fieldlog::Backup;
use fieldlog::{
    Digest, FieldSpec, FieldType, ManualTimeSource, Options, ReplicaId, Schema, Store, Value,
};
use support::oracle::{fate, same_write, written, Fate, Written};
use support::token_for;

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

/// Snapshot chunks and downloads are cut at about this many bytes, so a reset of a few dozen
/// objects takes many chunks.
const BATCH_BYTES: usize = 300;
const START_MS: u64 = 1_700_000_000_000;
const DOG: &str = "Dog";

/// A message about to be delivered on client `i`'s connection.
#[derive(Debug)]
enum Msg<'a> {
    Up(&'a ClientMsg),
    Down(&'a ServerMsg),
}

/// What the driver does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Deliver,
    /// Deliver it, then stop the run (what its handler queued stays queued).
    DeliverStop,
    /// Stop the run with it undelivered, still queued.
    HoldStop,
    /// Lose it and break the connection.
    Cut,
}

struct Conn {
    server: ServerSession,
    client: ClientSession,
    up: VecDeque<ClientMsg>,
    down: VecDeque<ServerMsg>,
}

struct Client {
    path: PathBuf,
    mode: ResetMode,
    store: Option<Arc<Store>>,
    conn: Option<Conn>,
    reports: Vec<ResetReport>,
    errors: Vec<String>,
    /// The first server message of each connection: "Welcome", "ResetRequired" or "Error".
    greetings: Vec<&'static str>,
}

struct World {
    tmp: tempfile::TempDir,
    secret: Secret,
    token: String,
    time: ManualTimeSource,
    server: Option<Arc<SyncServer>>,
    clients: Vec<Client>,
}

fn options(time: &ManualTimeSource) -> Options {
    Options::default().time(Arc::new(time.clone()))
}

fn greeting(m: &ServerMsg) -> Option<&'static str> {
    match m {
        ServerMsg::Welcome { .. } => Some("Welcome"),
        ServerMsg::ResetRequired { .. } => Some("ResetRequired"),
        ServerMsg::Error { .. } => Some("Error"),
        _ => None,
    }
}

impl World {
    fn new(modes: &[ResetMode]) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let secret = Secret::generate();
        World::open(tmp, secret, START_MS, modes)
    }

    fn open(tmp: tempfile::TempDir, secret: Secret, now: u64, modes: &[ResetMode]) -> World {
        let token = token_for(&secret, "u");
        let time = ManualTimeSource::new(now);
        let clients = modes
            .iter()
            .enumerate()
            .map(|(i, &mode)| {
                let path = tmp.path().join(format!("c{i}.redb"));
                let store = Arc::new(Store::open_with(&path, options(&time)).unwrap());
                Client {
                    path,
                    mode,
                    store: Some(store),
                    conn: None,
                    reports: Vec::new(),
                    errors: Vec::new(),
                    greetings: Vec::new(),
                }
            })
            .collect();
        let mut w = World {
            tmp,
            secret,
            token,
            time,
            server: None,
            clients,
        };
        w.open_server();
        w
    }

    fn server_path(&self) -> PathBuf {
        self.tmp.path().join("server.redb")
    }

    fn open_server(&mut self) {
        let store = Arc::new(Store::open_with(self.server_path(), options(&self.time)).unwrap());
        let mut config = ServerConfig::new(self.secret.clone());
        config.batch_bytes = BATCH_BYTES;
        self.server = Some(Arc::new(SyncServer::open(store, config).unwrap()));
    }

    /// Breaks every connection and closes the server (its file can then be copied).
    fn close_server(&mut self) {
        for i in 0..self.clients.len() {
            self.disconnect(i);
        }
        let server = Arc::into_inner(self.server.take().unwrap()).expect("no session holds it");
        drop(server);
    }

    fn server(&self) -> &Arc<SyncServer> {
        self.server.as_ref().unwrap()
    }

    fn store(&self, i: usize) -> &Arc<Store> {
        self.clients[i].store.as_ref().unwrap()
    }

    fn backup_path(&self, i: usize) -> PathBuf {
        let mut p = self.clients[i].path.clone().into_os_string();
        p.push(".reset-backup");
        PathBuf::from(p)
    }

    fn connect(&mut self, i: usize) {
        if self.clients[i].conn.is_some() {
            return;
        }
        let mut config = ClientConfig::new(self.token.clone());
        config.reset_mode = self.clients[i].mode;
        let store = Arc::clone(self.store(i));
        let mut client = ClientSession::new(store, config);
        let hello = client.hello().unwrap();
        let server = self.server().session();
        self.clients[i].conn = Some(Conn {
            server,
            client,
            up: VecDeque::from([hello]),
            down: VecDeque::new(),
        });
    }

    fn connect_all(&mut self) {
        for i in 0..self.clients.len() {
            self.connect(i);
        }
    }

    /// Drops both ends of client `i`'s connection and everything in flight on it.
    fn disconnect(&mut self, i: usize) {
        let c = &mut self.clients[i];
        if let Some(mut conn) = c.conn.take() {
            c.reports.extend(conn.client.take_reset_reports());
        }
    }

    /// Kills client `i`: session, queued messages and store handle are gone; the store file
    /// is opened again.
    fn crash(&mut self, i: usize) {
        self.disconnect(i);
        let store = self.clients[i].store.take().unwrap();
        let store = Arc::into_inner(store).expect("the crashed client's store is unshared");
        drop(store);
        let reopened = Store::open_with(&self.clients[i].path, options(&self.time)).unwrap();
        self.clients[i].store = Some(Arc::new(reopened));
    }

    /// Queues what the sessions have to send: uploads and downloads, until each says no.
    fn poll_all(&mut self) {
        for i in 0..self.clients.len() {
            let Some(conn) = self.clients[i].conn.as_mut() else {
                continue;
            };
            let mut failed = None;
            loop {
                match conn.client.poll_upload() {
                    Ok(Some(m)) => conn.up.push_back(m),
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            loop {
                let out = conn.server.poll_download();
                if out.is_empty() {
                    break;
                }
                conn.down.extend(out);
            }
            if let Some(e) = failed {
                self.clients[i].errors.push(e);
                self.disconnect(i);
            }
        }
    }

    /// Moves messages until nothing moves, or `hook` stops it (then returns the client whose
    /// connection it stopped on).
    fn run_with(&mut self, mut hook: impl FnMut(usize, Msg<'_>) -> Act) -> Option<usize> {
        for _ in 0..200_000 {
            self.poll_all();
            let mut moved = false;
            for i in 0..self.clients.len() {
                let now = self.time_now();
                let c = &mut self.clients[i];
                let Some(conn) = c.conn.as_mut() else {
                    continue;
                };
                if let Some(m) = conn.up.front() {
                    moved = true;
                    match hook(i, Msg::Up(m)) {
                        Act::HoldStop => return Some(i),
                        Act::Cut => {
                            self.disconnect(i);
                            continue;
                        }
                        act => {
                            let m = conn.up.pop_front().unwrap();
                            let out = conn.server.on_message(m, now);
                            conn.down.extend(out);
                            if act == Act::DeliverStop {
                                return Some(i);
                            }
                        }
                    }
                }
                let Some(conn) = c.conn.as_mut() else {
                    continue;
                };
                if let Some(m) = conn.down.front() {
                    moved = true;
                    match hook(i, Msg::Down(m)) {
                        Act::HoldStop => return Some(i),
                        Act::Cut => {
                            self.disconnect(i);
                            continue;
                        }
                        act => {
                            let m = conn.down.pop_front().unwrap();
                            if let Some(g) = greeting(&m) {
                                c.greetings.push(g);
                            }
                            let r = conn.client.on_message(m);
                            c.reports.extend(conn.client.take_reset_reports());
                            match r {
                                Ok(out) => conn.up.extend(out),
                                Err(e) => {
                                    c.errors.push(e.to_string());
                                    self.disconnect(i);
                                    continue;
                                }
                            }
                            if act == Act::DeliverStop {
                                return Some(i);
                            }
                        }
                    }
                }
            }
            if !moved {
                return None;
            }
        }
        panic!("the driver did not settle");
    }

    fn time_now(&self) -> u64 {
        use fieldlog::TimeSource;
        self.time.now_ms()
    }

    /// Runs until nothing moves.
    fn run(&mut self) {
        assert_eq!(self.run_with(|_, _| Act::Deliver), None);
    }

    fn sync_all(&mut self) {
        self.connect_all();
        self.run();
    }

    fn assert_no_errors(&self) {
        for (i, c) in self.clients.iter().enumerate() {
            assert!(c.errors.is_empty(), "client {i}: {:?}", c.errors);
        }
    }

    /// Closes everything; the files stay in the directory.
    fn into_template(mut self) -> Template {
        self.close_server();
        for i in 0..self.clients.len() {
            self.disconnect(i);
            let s = self.clients[i].store.take().unwrap();
            drop(Arc::into_inner(s).expect("unshared"));
        }
        Template {
            now: self.time_now(),
            modes: self.clients.iter().map(|c| c.mode).collect(),
            tmp: self.tmp,
            secret: self.secret,
        }
    }

    /// The server's full state (tombstones and every stamp), read the way a resetting client
    /// gets it: a snapshot for a made-up replica that never acknowledges the last chunk.
    fn server_snapshot(&self) -> Vec<ObjectSnapshot> {
        let server = self.server();
        let mut s = server.session();
        let hello = ClientMsg::Hello {
            protocol: PROTOCOL_VERSION,
            schema_version: 0,
            token: self.token.clone(),
            replica: ReplicaId(0x5ca1_ab1e),
            download_cursor: 0,
            last_sync: 0,
            reset_pending: true,
            reset_settled: None,
            subscriptions: None,
            subscriptions_acked: 0,
        };
        let out = s.on_message(hello, self.time_now());
        assert!(
            matches!(out.as_slice(), [ServerMsg::ResetRequired { .. }]),
            "{out:?}"
        );
        let mut objects = Vec::new();
        loop {
            let out = s.poll_download();
            assert_eq!(out.len(), 1, "{out:?}");
            let Some(ServerMsg::Snapshot { objects: o, end }) = out.into_iter().next() else {
                panic!("not a snapshot");
            };
            objects.extend(o);
            if end.is_some() {
                return objects;
            }
            assert!(s
                .on_message(ClientMsg::SnapshotAck { settled: None }, 0)
                .is_empty());
        }
    }
}

/// Prepared files, closed: every case starts from a copy.
struct Template {
    tmp: tempfile::TempDir,
    secret: Secret,
    now: u64,
    modes: Vec<ResetMode>,
}

impl Template {
    fn world(&self) -> World {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(self.tmp.path(), tmp.path());
        World::open(tmp, self.secret.clone(), self.now, &self.modes)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Writes and the invariant-4 check
// ---------------------------------------------------------------------------------------

/// Runs a transaction on `store` and returns its field writes, read back from the log.
fn write(
    store: &Store,
    f: impl FnOnce(&mut fieldlog::WriteTx<'_>) -> fieldlog::Result<()>,
) -> Vec<Written> {
    let ((), c) = store.write(f).unwrap();
    let seq = c.seq.expect("the transaction wrote something");
    let entry = store.log_after(seq - 1, 1).unwrap().pop().unwrap();
    assert_eq!(entry.seq, seq);
    written(&entry)
}

fn field(store: &Store, pk: i64, f: &str) -> Option<Value> {
    store.get_field(DOG, pk, f).unwrap().map(|(v, _)| v)
}

fn digests(w: &World) -> Vec<Digest> {
    w.clients
        .iter()
        .map(|c| c.store.as_ref().unwrap().digest())
        .collect()
}

/// Every replica holds the server's state.
fn assert_converged(w: &World) {
    let server = w.server().store().digest();
    for (i, d) in digests(w).into_iter().enumerate() {
        assert_eq!(d, server, "client {i} differs from the server");
    }
}

/// The next connection of client `i` is welcomed (no reset marker left, nothing to redo)
/// and produces no report.
fn assert_settled(w: &mut World, i: usize) {
    w.disconnect(i);
    let reports = w.clients[i].reports.len();
    w.connect(i);
    w.run();
    assert_eq!(w.clients[i].greetings.last(), Some(&"Welcome"));
    assert_eq!(w.clients[i].reports.len(), reports, "a reset ran again");
    assert_eq!(w.store(i).last_sync(), w.store(i).log_head());
}

// ---------------------------------------------------------------------------------------
// The scenario: A resets after being offline while B wrote and the server compacted
// ---------------------------------------------------------------------------------------

const A: usize = 0;
const B: usize = 1;
const RECOVER: ResetMode = ResetMode::RecoverUnsyncedChanges;
const MODES: [ResetMode; 4] = [
    ResetMode::RecoverUnsyncedChanges,
    ResetMode::RecoverOrDiscard,
    ResetMode::DiscardUnsyncedChanges,
    ResetMode::Manual,
];

fn recovering(mode: ResetMode) -> bool {
    matches!(
        mode,
        ResetMode::RecoverUnsyncedChanges | ResetMode::RecoverOrDiscard
    )
}

fn dog(pk: i64) -> [(&'static str, Value); 3] {
    [
        ("name", Value::from(format!("dog number {pk}"))),
        ("age", Value::from(pk)),
        ("color", Value::from("brown")),
    ]
}

struct Prepared {
    template: Template,
    /// A's reset mode.
    mode: ResetMode,
    /// A's writes the server has not acknowledged when A reconnects.
    unsynced: Vec<Written>,
}

/// B creates 40 dogs and both sync; A goes offline and writes (one write B's newer value
/// beats, one update of an object B deletes, an insert, a delete, a one-field and a
/// two-field update); B writes and syncs; the server compacts all history. A's next
/// connection must reset, and the snapshot takes many chunks.
fn prepare(mode_a: ResetMode) -> Prepared {
    let mut w = World::new(&[mode_a, RECOVER]);
    for chunk in 0..4 {
        write(w.store(B), |tx| {
            for pk in chunk * 10..chunk * 10 + 10 {
                tx.insert(DOG, pk, dog(pk))?;
            }
            Ok(())
        });
    }
    w.sync_all();
    w.disconnect(A);
    w.time.advance(1_000);
    let a = Arc::clone(w.store(A));
    let mut unsynced = Vec::new();
    unsynced.extend(write(&a, |tx| tx.set(DOG, 1, "age", 100)));
    unsynced.extend(write(&a, |tx| tx.insert(DOG, 100, [("name", "new")])));
    unsynced.extend(write(&a, |tx| tx.delete(DOG, 2)));
    unsynced.extend(write(&a, |tx| tx.set(DOG, 3, "name", "renamed by a")));
    unsynced.extend(write(&a, |tx| {
        tx.update(
            DOG,
            4,
            [("age", Value::from(44)), ("color", Value::from("black"))],
        )
    }));
    unsynced.extend(write(&a, |tx| tx.set(DOG, 5, "name", "a5")));
    drop(a);
    assert_eq!(unsynced.len(), 8);
    w.time.advance(1_000);
    write(w.store(B), |tx| {
        tx.set(DOG, 1, "age", 200)?;
        tx.delete(DOG, 5)?;
        tx.set(DOG, 6, "color", "white")
    });
    w.connect(B);
    w.run();
    w.server().compact_history(w.server().version()).unwrap();
    w.assert_no_errors();
    Prepared {
        template: w.into_template(),
        mode: mode_a,
        unsynced,
    }
}

/// What an uninterrupted reset of the prepared history ends with.
struct Reference {
    server: Digest,
    version: u64,
    fates: Vec<Fate>,
    chunks: usize,
}

fn is_snapshot(m: &Msg<'_>) -> bool {
    matches!(m, Msg::Down(ServerMsg::Snapshot { .. }))
}

fn is_final_snapshot_ack(m: &Msg<'_>) -> bool {
    matches!(m, Msg::Up(ClientMsg::SnapshotAck { settled: Some(_) }))
}

fn reference(p: &Prepared) -> Reference {
    let mut w = p.template.world();
    w.connect_all();
    let mut chunks = 0;
    assert_eq!(
        w.run_with(|i, m| {
            if i == A && is_snapshot(&m) {
                chunks += 1;
            }
            Act::Deliver
        }),
        None
    );
    w.assert_no_errors();
    assert_converged(&w);
    let reports = &w.clients[A].reports;
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = &reports[0];
    assert!(
        matches!(r.reason, Some(ResetReason::BehindHorizon { .. })),
        "{r:?}"
    );
    let snapshot = w.server_snapshot();
    let fates: Vec<Fate> = p
        .unsynced
        .iter()
        .map(|u| fate(&snapshot, reports, u))
        .collect();
    let count = |want: Fate| fates.iter().filter(|f| **f == want).count();
    // The age B rewrote later and the update of the object B deleted lose by stamp. In the
    // recovering modes the insert (existence and name), the delete, the rename and both
    // fields of the two-field update are recovered; otherwise they are discarded.
    assert_eq!(count(Fate::Beaten), 2, "{fates:?}");
    if recovering(p.mode) {
        assert_eq!(r.recovered.len(), 6, "{r:?}");
        assert_eq!(r.superseded.len(), 2, "{r:?}");
        assert!(r.discarded.is_empty(), "{r:?}");
        assert_eq!(count(Fate::OnServer), 6, "{fates:?}");
    } else {
        assert!(r.recovered.is_empty(), "{r:?}");
        assert_eq!(r.discarded.len(), 8, "{r:?}");
        assert_eq!(count(Fate::Discarded), 6, "{fates:?}");
    }
    let server = w.server().store();
    assert_eq!(field(server, 1, "age"), Some(Value::from(200)));
    assert_eq!(server.get(DOG, 5).unwrap(), None);
    if recovering(p.mode) {
        assert_eq!(field(server, 100, "name"), Some(Value::from("new")));
        assert_eq!(server.get(DOG, 2).unwrap(), None);
        assert_eq!(field(server, 4, "color"), Some(Value::from("black")));
    } else {
        assert_eq!(server.get(DOG, 100).unwrap(), None);
        assert!(server.get(DOG, 2).unwrap().is_some());
        assert_eq!(field(server, 4, "color"), Some(Value::from("brown")));
    }
    assert_eq!(w.backup_path(A).exists(), p.mode == ResetMode::Manual);
    let out = Reference {
        server: server.digest(),
        version: w.server().version(),
        fates,
        chunks,
    };
    assert_settled(&mut w, A);
    out
}

/// After the interrupted reset finished: the same end as the uninterrupted one, every
/// unsynced write accounted for, the backup gone, and no reset left to do.
fn assert_like_reference(w: &mut World, p: &Prepared, r: &Reference) {
    w.assert_no_errors();
    assert_converged(w);
    assert_eq!(w.server().store().digest(), r.server);
    assert_eq!(
        w.server().version(),
        r.version,
        "the server's history differs: something was applied twice or not at all"
    );
    let snapshot = w.server_snapshot();
    let reports = &w.clients[A].reports;
    assert!(!reports.is_empty());
    for (u, want) in p.unsynced.iter().zip(&r.fates) {
        assert_eq!(fate(&snapshot, reports, u), *want, "{u:?}");
        let reported = reports.iter().any(|rep| {
            rep.recovered.iter().any(|x| same_write(x, u))
                || rep.superseded.iter().any(|x| same_write(&x.write, u))
                || rep.discarded.iter().any(|x| same_write(&x.write, u))
        });
        assert!(reported, "no report names {u:?}: {reports:?}");
    }
    assert_eq!(
        w.backup_path(A).exists(),
        p.mode == ResetMode::Manual,
        "the backup outlived the reset, or Manual lost it"
    );
    assert_settled(w, A);
}

/// Runs the prepared reset, crashes A where `hook` stops, checks `at_crash`, reopens A and
/// lets the reset finish.
fn crash_case(
    p: &Prepared,
    r: &Reference,
    hook: impl FnMut(usize, Msg<'_>) -> Act,
    at_crash: impl FnOnce(&World),
) -> World {
    let mut w = p.template.world();
    w.connect_all();
    assert_eq!(
        w.run_with(hook),
        Some(A),
        "the crash point was never reached"
    );
    at_crash(&w);
    w.crash(A);
    w.connect_all();
    w.run();
    assert_like_reference(&mut w, p, r);
    w
}

fn backup_exists(w: &World) {
    assert!(
        w.backup_path(A).exists(),
        "the backup is gone before success"
    );
}

/// (a)–(e): a crash at each step of a reset resumes and ends as an uninterrupted reset does.
#[test]
fn crash_at_each_step_of_a_reset() {
    let p = prepare(RECOVER);
    let r = reference(&p);
    assert!(r.chunks >= 5, "the snapshot took {} chunks", r.chunks);

    // (a) ResetRequired received: backup and marker written, nothing staged.
    crash_case(
        &p,
        &r,
        |i, m| match m {
            Msg::Down(ServerMsg::ResetRequired { .. }) if i == A => Act::DeliverStop,
            _ => Act::Deliver,
        },
        backup_exists,
    );

    // (b) the first of many chunks staged (its acknowledgement and later chunks lost).
    crash_case(
        &p,
        &r,
        |i, m| match m {
            Msg::Down(ServerMsg::Snapshot { end, .. }) if i == A => {
                assert!(end.is_none(), "the first chunk was the last");
                Act::DeliverStop
            }
            _ => Act::Deliver,
        },
        backup_exists,
    );

    // (c) the last chunk applied, the swap done, the final SnapshotAck not yet at the server.
    crash_case(
        &p,
        &r,
        |i, m| {
            if i == A && is_final_snapshot_ack(&m) {
                Act::HoldStop
            } else {
                Act::Deliver
            }
        },
        |w| {
            backup_exists(w);
            let reports = &w.clients[A].reports;
            assert_eq!(reports.len(), 1, "the swap reports at once");
            assert_eq!(field(w.store(A), 100, "name"), Some(Value::from("new")));
        },
    );

    // (d) the recovered writes uploaded and applied, the UploadAck not yet at the client.
    // The first UploadAck after the swap confirms the settled position (the server answers
    // the final SnapshotAck with it); the second acknowledges the recovered writes.
    let mut swapped = false;
    let mut acks_after_swap = 0;
    crash_case(
        &p,
        &r,
        |i, m| {
            if i != A {
                return Act::Deliver;
            }
            if is_final_snapshot_ack(&m) {
                swapped = true;
            }
            match m {
                Msg::Down(ServerMsg::UploadAck { .. }) if swapped => {
                    acks_after_swap += 1;
                    if acks_after_swap == 2 {
                        Act::HoldStop
                    } else {
                        Act::Deliver
                    }
                }
                _ => Act::Deliver,
            }
        },
        |w| {
            backup_exists(w);
            let server = w.server().store();
            assert_eq!(field(server, 100, "name"), Some(Value::from("new")));
            assert_eq!(w.server().version(), r.version);
            assert!(w.store(A).last_sync() < w.store(A).log_head());
        },
    );

    // (e) the recovered writes' UploadAck handled (the second after the swap, see (d)):
    // the backup and the marker go in that handler.
    let mut swapped = false;
    let mut acks_after_swap = 0;
    crash_case(
        &p,
        &r,
        |i, m| {
            if i != A {
                return Act::Deliver;
            }
            if is_final_snapshot_ack(&m) {
                swapped = true;
            }
            match m {
                Msg::Down(ServerMsg::UploadAck { .. }) if swapped => {
                    acks_after_swap += 1;
                    if acks_after_swap == 2 {
                        Act::DeliverStop
                    } else {
                        Act::Deliver
                    }
                }
                _ => Act::Deliver,
            }
        },
        |w| {
            assert!(
                !w.backup_path(A).exists(),
                "acknowledged, yet the backup stays"
            );
            assert_eq!(w.store(A).last_sync(), w.store(A).log_head());
        },
    );
}

/// A crash after every chunk in turn (and a second crash in the resumed reset).
#[test]
fn crash_after_every_chunk_and_twice() {
    let p = prepare(RECOVER);
    let r = reference(&p);
    for k in 1..r.chunks {
        let mut seen = 0;
        crash_case(
            &p,
            &r,
            |i, m| {
                if i == A && is_snapshot(&m) {
                    seen += 1;
                    if seen == k {
                        return Act::DeliverStop;
                    }
                }
                Act::Deliver
            },
            backup_exists,
        );
    }
    // Twice: after chunk 2, then after chunk 3 of the resumed reset.
    let mut w = p.template.world();
    w.connect_all();
    for k in [2, 3] {
        let mut seen = 0;
        let stopped = w.run_with(|i, m| {
            if i == A && is_snapshot(&m) {
                seen += 1;
                if seen == k {
                    return Act::DeliverStop;
                }
            }
            Act::Deliver
        });
        assert_eq!(stopped, Some(A));
        backup_exists(&w);
        w.crash(A);
        w.connect_all();
    }
    w.run();
    assert_like_reference(&mut w, &p, &r);
}

/// Holds A's final SnapshotAck and crashes A (as `crash_case` (c) does).
fn crash_before_final_snapshot_ack(p: &Prepared, r: &Reference) -> World {
    crash_case(
        p,
        r,
        |i, m| {
            if i == A && is_final_snapshot_ack(&m) {
                Act::HoldStop
            } else {
                Act::Deliver
            }
        },
        |_| {},
    )
}

/// (c) once more: the swap is done and reported, so the reconnect must not start a second
/// reset.
#[test]
fn lost_final_snapshot_ack_resets_only_once() {
    let p = prepare(RECOVER);
    let r = reference(&p);
    // A crash, as in (c).
    let w = crash_before_final_snapshot_ack(&p, &r);
    let c = &w.clients[A];
    assert_eq!(
        c.greetings,
        ["ResetRequired", "Welcome", "Welcome"],
        "reports: {:#?}",
        c.reports
    );
    assert_eq!(c.reports.len(), 1);
    // A mere connection loss does the same.
    let mut w = p.template.world();
    w.connect_all();
    let mut cut = false;
    w.run_with(|i, m| {
        if i == A && is_final_snapshot_ack(&m) && !cut {
            cut = true;
            Act::Cut
        } else {
            Act::Deliver
        }
    });
    assert!(cut);
    w.connect_all();
    w.run();
    assert_like_reference(&mut w, &p, &r);
    let c = &w.clients[A];
    assert_eq!(c.greetings, ["ResetRequired", "Welcome", "Welcome"]);
    assert_eq!(c.reports.len(), 1);
}

/// Manual mode, (c): the backup the application recovers from keeps the unsynced writes.
#[test]
fn manual_backup_survives_a_lost_final_snapshot_ack() {
    let p = prepare(ResetMode::Manual);
    let r = reference(&p);
    let w = crash_before_final_snapshot_ack(&p, &r);
    let backup = Backup::open(w.backup_path(A)).unwrap();
    assert_eq!(
        backup.unsynced().unwrap().len(),
        6,
        "the six offline entries"
    );
    assert!(
        backup.get(DOG, 100).unwrap().is_some(),
        "A's offline insert"
    );
}

/// Stops after the `k`-th snapshot chunk delivered to A.
fn after_chunk(k: usize) -> impl FnMut(usize, Msg<'_>) -> Act {
    let mut seen = 0;
    move |i, m| {
        if i == A && is_snapshot(&m) {
            seen += 1;
            if seen == k {
                return Act::DeliverStop;
            }
        }
        Act::Deliver
    }
}

/// (2) Writes made while the snapshot downloads (between chunks) reach the server, with and
/// without a crash in between.
#[test]
fn writes_during_a_reset_are_not_lost() {
    let p = prepare(RECOVER);
    for crash in [false, true] {
        let mut w = p.template.world();
        w.connect_all();
        assert_eq!(w.run_with(after_chunk(2)), Some(A));
        w.time.advance(5_000);
        let mut during = write(w.store(A), |tx| {
            tx.set(DOG, 7, "name", "written during the reset")?;
            tx.set(DOG, 1, "age", 300)
        });
        if crash {
            w.crash(A);
            w.connect(A);
        }
        assert_eq!(w.run_with(after_chunk(3)), Some(A));
        during.extend(write(w.store(A), |tx| {
            tx.insert(DOG, 101, [("name", "inserted during the reset")])
        }));
        w.run();
        w.assert_no_errors();
        assert_converged(&w);
        let server = w.server().store();
        assert_eq!(field(server, 1, "age"), Some(Value::from(300)), "{crash}");
        assert_eq!(
            field(server, 101, "name"),
            Some(Value::from("inserted during the reset"))
        );
        let snapshot = w.server_snapshot();
        let reports = &w.clients[A].reports;
        for u in &during {
            assert_eq!(fate(&snapshot, reports, u), Fate::OnServer, "{u:?}");
            assert!(
                reports
                    .iter()
                    .any(|r| r.recovered.iter().any(|x| same_write(x, u))),
                "{u:?} is not reported recovered: {reports:?}"
            );
        }
        for u in &p.unsynced {
            assert_ne!(fate(&snapshot, reports, u), Fate::Lost, "{u:?}");
        }
        assert!(!w.backup_path(A).exists());
        assert_settled(&mut w, A);
    }
}

/// (3) An upload the server applied but whose UploadAck was lost, then compaction: the reset
/// treats those entries as synced (the ResetRequired carries the server's position), so they
/// are neither replayed nor applied twice; only the later write is recovered.
#[test]
fn applied_upload_with_lost_ack_is_not_applied_twice() {
    let mut w = World::new(&[RECOVER, RECOVER]);
    write(w.store(B), |tx| {
        for pk in 0..10 {
            tx.insert(DOG, pk, dog(pk))?;
        }
        Ok(())
    });
    w.sync_all();
    w.disconnect(A);
    let mut applied = Vec::new();
    for pk in 0..3 {
        w.time.advance(10);
        applied.extend(write(w.store(A), |tx| tx.set(DOG, pk, "age", 1_000 + pk)));
    }
    let v0 = w.server().version();
    w.connect(A);
    // The UploadAck is lost with the connection.
    let mut cut = false;
    assert_eq!(
        w.run_with(|i, m| match m {
            Msg::Down(ServerMsg::UploadAck { .. }) if i == A && !cut => {
                cut = true;
                Act::Cut
            }
            _ => Act::Deliver,
        }),
        None
    );
    assert!(cut);
    assert_eq!(w.server().version(), v0 + 3, "one version per transaction");
    assert_eq!(w.store(A).last_sync(), 0, "the acknowledgement was lost");
    w.time.advance(10);
    let later = write(w.store(A), |tx| tx.set(DOG, 5, "color", "grey"));
    write(w.store(B), |tx| tx.set(DOG, 9, "name", "b"));
    w.run();
    w.server().compact_history(w.server().version()).unwrap();
    let v1 = w.server().version();
    assert_eq!(v1, v0 + 4);

    w.connect(A);
    w.run();
    w.assert_no_errors();
    assert_eq!(w.clients[A].greetings.last(), Some(&"ResetRequired"));
    let reports = w.clients[A].reports.clone();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = &reports[0];
    assert!(matches!(r.reason, Some(ResetReason::BehindHorizon { .. })));
    // What the code does: the three applied writes count as synced and appear nowhere in
    // the report; the one later write is recovered.
    assert_eq!(r.recovered, later_as_unsynced(&later), "{r:?}");
    assert!(r.superseded.is_empty() && r.discarded.is_empty(), "{r:?}");
    assert_eq!(
        w.server().version(),
        v1 + 1,
        "only the later transaction was applied again"
    );
    let snapshot = w.server_snapshot();
    for u in applied.iter().chain(&later) {
        assert_eq!(fate(&snapshot, &reports, u), Fate::OnServer, "{u:?}");
    }
    assert_converged(&w);
    assert!(!w.backup_path(A).exists());
    assert_settled(&mut w, A);
}

fn later_as_unsynced(ws: &[Written]) -> Vec<fieldlog::reset::UnsyncedWrite> {
    ws.iter()
        .map(|w| fieldlog::reset::UnsyncedWrite {
            collection: DOG.into(),
            pk: w.pk.clone(),
            field: w.field.clone(),
            value: w.value.clone(),
            stamp: w.stamp,
        })
        .collect()
}

/// The first report of the last connection's reset, checked against `mode`: every write in
/// `unsynced` recovered, or discarded (Discard and Manual).
fn assert_report(r: &ResetReport, mode: ResetMode, unsynced: &[Written]) {
    assert_eq!(r.mode, mode);
    let listed = if recovering(mode) {
        assert!(r.discarded.is_empty(), "{mode:?}: {r:?}");
        r.recovered.clone()
    } else {
        assert!(r.recovered.is_empty(), "{mode:?}: {r:?}");
        r.discarded.iter().map(|d| d.write.clone()).collect()
    };
    assert!(r.superseded.is_empty(), "{mode:?}: {r:?}");
    assert_eq!(listed, later_as_unsynced(unsynced), "{mode:?}");
}

/// The backup stays only in Manual mode (then the application opens and removes it).
fn check_backup(w: &World, r: &ResetReport, mode: ResetMode, unsynced_entries: usize) {
    let path = r.backup.clone().expect("a file store is backed up");
    assert_eq!(path, w.backup_path(A));
    if mode == ResetMode::Manual {
        let b = Backup::open(&path).unwrap();
        assert_eq!(b.unsynced().unwrap().len(), unsynced_entries, "{mode:?}");
        b.remove().unwrap();
    } else {
        assert!(!path.exists(), "{mode:?}: the backup outlived the reset");
    }
}

/// (4) Trigger (c): the server is restored from a copy of its file that lacks A's last,
/// acknowledged writes. A's next Hello gets ResetRequired(ClientAheadOfServer); recovering
/// modes replay the lost writes from A's log, the others report them discarded and the
/// server does not get them.
#[test]
fn server_restored_from_backup_in_every_mode() {
    for mode in MODES {
        let mut w = World::new(&[mode]);
        write(w.store(A), |tx| {
            for pk in 1..=5 {
                tx.insert(DOG, pk, dog(pk))?;
            }
            Ok(())
        });
        w.sync_all();
        w.close_server();
        // A copy of the server's files: the database and its write-ahead file, whose
        // records are part of the state (the uploads are records).
        let saved = w.tmp.path().join("server.saved");
        let wal = |p: &std::path::Path| {
            let mut p = p.as_os_str().to_owned();
            p.push("-wal");
            std::path::PathBuf::from(p)
        };
        std::fs::copy(w.server_path(), &saved).unwrap();
        std::fs::copy(wal(&w.server_path()), wal(&saved)).unwrap();
        w.open_server();

        let mut lost = Vec::new();
        w.time.advance(1_000);
        lost.extend(write(w.store(A), |tx| tx.set(DOG, 1, "age", 2)));
        lost.extend(write(w.store(A), |tx| {
            tx.insert(DOG, 10, [("name", "ten")])
        }));
        lost.extend(write(w.store(A), |tx| tx.delete(DOG, 3)));
        w.sync_all();
        assert_eq!(w.store(A).last_sync(), w.store(A).log_head());
        assert_eq!(
            field(w.server().store(), 10, "name"),
            Some(Value::from("ten"))
        );

        w.close_server();
        std::fs::copy(&saved, w.server_path()).unwrap();
        std::fs::copy(wal(&saved), wal(&w.server_path())).unwrap();
        w.open_server();
        assert_eq!(w.server().store().get(DOG, 10).unwrap(), None, "restored");
        let greeted = w.clients[A].greetings.len();
        w.sync_all();
        w.assert_no_errors();
        assert_eq!(w.clients[A].greetings[greeted], "ResetRequired", "{mode:?}");
        let reports = w.clients[A].reports.clone();
        assert_eq!(reports.len(), 1, "{mode:?}: {reports:?}");
        let r = &reports[0];
        assert!(
            matches!(r.reason, Some(ResetReason::ClientAheadOfServer { .. })),
            "{mode:?}: {r:?}"
        );
        assert_report(r, mode, &lost);
        let server = w.server().store();
        let snapshot = w.server_snapshot();
        if recovering(mode) {
            assert_eq!(field(server, 1, "age"), Some(Value::from(2)));
            assert_eq!(field(server, 10, "name"), Some(Value::from("ten")));
            assert_eq!(server.get(DOG, 3).unwrap(), None);
            for u in &lost {
                assert_eq!(
                    fate(&snapshot, &reports, u),
                    Fate::OnServer,
                    "{mode:?} {u:?}"
                );
            }
        } else {
            assert_eq!(field(server, 1, "age"), Some(Value::from(1)));
            assert_eq!(server.get(DOG, 10).unwrap(), None);
            assert!(server.get(DOG, 3).unwrap().is_some());
            for u in &lost {
                assert_eq!(
                    fate(&snapshot, &reports, u),
                    Fate::Discarded,
                    "{mode:?} {u:?}"
                );
            }
        }
        assert_converged(&w);
        // The lost writes were acknowledged before the restore, so the backup's log holds
        // them at or below its last sync: `Backup::unsynced` does not list them.
        check_backup(&w, r, mode, 0);
        assert_settled(&mut w, A);
    }
}

/// (5a) Trigger (a), compaction, in every mode.
#[test]
fn compaction_reset_in_every_mode() {
    for mode in MODES {
        let mut w = World::new(&[mode, RECOVER]);
        write(w.store(B), |tx| {
            for pk in 1..=3 {
                tx.insert(DOG, pk, dog(pk))?;
            }
            Ok(())
        });
        w.sync_all();
        w.disconnect(A);
        w.time.advance(1_000);
        let mut unsynced = Vec::new();
        unsynced.extend(write(w.store(A), |tx| tx.set(DOG, 1, "age", 10)));
        unsynced.extend(write(w.store(A), |tx| {
            tx.insert(DOG, 20, [("name", "twenty")])
        }));
        unsynced.extend(write(w.store(A), |tx| tx.delete(DOG, 2)));
        write(w.store(B), |tx| tx.set(DOG, 3, "name", "b"));
        w.run();
        w.server().compact_history(w.server().version()).unwrap();
        w.sync_all();
        w.assert_no_errors();
        let reports = w.clients[A].reports.clone();
        assert_eq!(reports.len(), 1, "{mode:?}: {reports:?}");
        let r = &reports[0];
        assert!(
            matches!(r.reason, Some(ResetReason::BehindHorizon { .. })),
            "{mode:?}: {r:?}"
        );
        assert_report(r, mode, &unsynced);
        let server = w.server().store();
        assert_eq!(field(server, 3, "name"), Some(Value::from("b")));
        let want_age = if recovering(mode) { 10 } else { 1 };
        assert_eq!(field(server, 1, "age"), Some(Value::from(want_age)));
        assert_eq!(server.get(DOG, 20).unwrap().is_some(), recovering(mode));
        assert_eq!(server.get(DOG, 2).unwrap().is_none(), recovering(mode));
        assert_converged(&w);
        check_backup(&w, r, mode, 3);
        assert_settled(&mut w, A);
    }
}

/// Several unsynced writes to one object, interleaved with writes to others: the replay
/// decides each against the state the object's earlier writes left (a stale write and a
/// later one that wins; a delete, then a re-insert), and the report lists every write in
/// log order, not key order.
#[test]
fn writes_to_one_object_replay_in_log_order() {
    let mut w = World::new(&[RECOVER, RECOVER]);
    write(w.store(B), |tx| {
        for pk in 1..=3 {
            tx.insert(DOG, pk, dog(pk))?;
        }
        Ok(())
    });
    w.sync_all();
    w.disconnect(A);
    w.time.advance(1_000);
    let stale = write(w.store(A), |tx| tx.set(DOG, 2, "age", 20));
    let mut recovered = write(w.store(A), |tx| tx.set(DOG, 1, "age", 10));
    w.time.advance(10);
    write(w.store(B), |tx| tx.set(DOG, 2, "age", 99));
    w.run();
    w.time.advance(10);
    recovered.extend(write(w.store(A), |tx| tx.set(DOG, 2, "age", 21)));
    recovered.extend(write(w.store(A), |tx| tx.delete(DOG, 3)));
    recovered.extend(write(w.store(A), |tx| {
        tx.insert(DOG, 3, [("name", "again")])
    }));
    recovered.extend(write(w.store(A), |tx| {
        tx.set(DOG, 2, "color", "white")?;
        tx.set(DOG, 1, "name", "a")
    }));
    w.server().compact_history(w.server().version()).unwrap();
    w.sync_all();
    w.assert_no_errors();

    let reports = w.clients[A].reports.clone();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = &reports[0];
    assert_eq!(r.recovered, later_as_unsynced(&recovered), "{r:?}");
    let superseded: Vec<_> = r.superseded.iter().map(|s| s.write.clone()).collect();
    assert_eq!(superseded, later_as_unsynced(&stale), "{r:?}");
    assert_eq!(r.superseded[0].server_value, Some(Value::from(99)));
    assert!(r.discarded.is_empty(), "{r:?}");

    let server = w.server().store();
    assert_eq!(field(server, 1, "age"), Some(Value::from(10)));
    assert_eq!(field(server, 1, "name"), Some(Value::from("a")));
    assert_eq!(field(server, 2, "age"), Some(Value::from(21)));
    assert_eq!(field(server, 2, "color"), Some(Value::from("white")));
    assert_eq!(field(server, 3, "name"), Some(Value::from("again")));
    assert_eq!(field(server, 3, "age"), None, "the re-insert starts afresh");
    assert_converged(&w);
    assert_settled(&mut w, A);
}

/// (5b) Trigger (b), a breaking schema change (a field removed), in every mode: a write to the
/// removed field is discarded even when recovering.
#[test]
fn breaking_schema_change_reset_in_every_mode() {
    let v1 = Schema::new(DOG)
        .field("name", FieldSpec::optional(FieldType::String))
        .field("age", FieldSpec::optional(FieldType::Int))
        .field("color", FieldSpec::optional(FieldType::String));
    let v2 = Schema::new(DOG)
        .field("name", FieldSpec::optional(FieldType::String))
        .field("age", FieldSpec::optional(FieldType::Int));
    for mode in MODES {
        let mut w = World::new(&[mode]);
        assert!(!w.server().set_schema(v1.clone()).unwrap());
        w.sync_all();
        assert!(w.store(A).schema(DOG).is_some(), "adopted");
        write(w.store(A), |tx| {
            for pk in 1..=3 {
                tx.insert(DOG, pk, dog(pk))?;
            }
            Ok(())
        });
        w.sync_all();
        w.disconnect(A);
        w.time.advance(1_000);
        let age = write(w.store(A), |tx| tx.set(DOG, 1, "age", 5));
        let color = write(w.store(A), |tx| tx.set(DOG, 2, "color", "red"));
        assert!(w.server().set_schema(v2.clone()).unwrap(), "breaking");
        w.sync_all();
        w.assert_no_errors();
        let reports = w.clients[A].reports.clone();
        assert_eq!(reports.len(), 1, "{mode:?}: {reports:?}");
        let r = &reports[0];
        assert!(
            matches!(r.reason, Some(ResetReason::BreakingSchemaChange { .. })),
            "{mode:?}: {r:?}"
        );
        assert!(r.superseded.is_empty(), "{mode:?}: {r:?}");
        if recovering(mode) {
            assert_eq!(r.recovered, later_as_unsynced(&age), "{mode:?}");
            assert_eq!(r.discarded.len(), 1, "{mode:?}: {r:?}");
            assert!(r.discarded[0].reason.contains("schema"), "{r:?}");
        } else {
            assert!(r.recovered.is_empty(), "{mode:?}: {r:?}");
            assert_eq!(r.discarded.len(), 2, "{mode:?}: {r:?}");
        }
        let discarded: Vec<_> = r.discarded.iter().map(|d| d.write.clone()).collect();
        assert!(discarded.contains(&later_as_unsynced(&color)[0]), "{r:?}");
        let want_age = if recovering(mode) { 5 } else { 1 };
        assert_eq!(
            field(w.server().store(), 1, "age"),
            Some(Value::from(want_age))
        );
        assert_eq!(w.store(A).schema(DOG), Some(v2.clone()), "{mode:?}");
        assert_converged(&w);
        check_backup(&w, r, mode, 2);
        assert_settled(&mut w, A);
    }
}

/// Compaction while a connected client's downloads are behind it: the session must not skip
/// the compacted changes; the client resets (now or on reconnect) and converges.
#[test]
fn compaction_while_a_connected_client_is_behind() {
    let mut w = World::new(&[RECOVER, RECOVER]);
    w.sync_all();
    for pk in 0..20 {
        write(w.store(B), |tx| tx.insert(DOG, pk, dog(pk)));
    }
    // Stop when A's first download arrives: its session has a window of downloads queued
    // and has read no further.
    assert_eq!(
        w.run_with(|i, m| match m {
            Msg::Down(ServerMsg::Download { .. }) if i == A => Act::HoldStop,
            _ => Act::Deliver,
        }),
        Some(A)
    );
    w.server().compact_history(w.server().version()).unwrap();
    let mut delivered = 0;
    let stopped = w.run_with(|_, _| {
        delivered += 1;
        if delivered > 1_000 {
            Act::HoldStop
        } else {
            Act::Deliver
        }
    });
    assert_eq!(stopped, None, "the sessions never settled");
    // A reconnect (a reset, if A is behind) must bring A to the server's state.
    w.disconnect(A);
    w.sync_all();
    w.assert_no_errors();
    assert_converged(&w);
}

/// Manual mode: a crash while the snapshot downloads resumes without touching the backup,
/// which keeps every unsynced write for the application.
#[test]
fn crash_during_a_manual_reset_keeps_the_backup() {
    let p = prepare(ResetMode::Manual);
    let r = reference(&p);
    for k in [0, 1] {
        let w = crash_case(
            &p,
            &r,
            |i, m| match m {
                Msg::Down(ServerMsg::ResetRequired { .. }) if i == A && k == 0 => Act::DeliverStop,
                Msg::Down(ServerMsg::Snapshot { .. }) if i == A && k == 1 => Act::DeliverStop,
                _ => Act::Deliver,
            },
            backup_exists,
        );
        let report = &w.clients[A].reports[0];
        assert_eq!(report.discarded.len(), 8, "{report:?}");
        let backup = Backup::open(w.backup_path(A)).unwrap();
        assert_eq!(
            backup.unsynced().unwrap().len(),
            6,
            "the six offline entries"
        );
        assert_eq!(
            backup.get(DOG, 100).unwrap().unwrap().get("name"),
            Some(&Value::from("new"))
        );
        backup.remove().unwrap();
    }
}

/// The names of the redb tables in a closed store file.
fn tables(path: &Path) -> Vec<String> {
    use redb::{ReadableDatabase, TableHandle};
    let db = redb::Database::open(path).unwrap();
    let rtx = db.begin_read().unwrap();
    let names = rtx.list_tables().unwrap().map(|t| t.name().to_owned());
    names.collect()
}

/// A reset's swap renames the state it replaces aside (`reset_replaced`) and drops it in a
/// later transaction; a crash between the two leaves it in the file, and the next open
/// must drop it, or it would stay there for good.
#[test]
fn a_reset_leaves_no_replaced_state_behind() {
    let mut w = World::new(&[RECOVER, RECOVER]);
    write(w.store(B), |tx| {
        for pk in 1..=20 {
            tx.insert(DOG, pk, dog(pk))?;
        }
        Ok(())
    });
    w.sync_all();
    w.disconnect(A);
    w.time.advance(1_000);
    write(w.store(A), |tx| tx.set(DOG, 2, "age", 20));
    write(w.store(B), |tx| tx.set(DOG, 3, "age", 30));
    w.run();
    // A is now behind the server's history.
    w.server().compact_history(w.server().version()).unwrap();
    w.sync_all();
    w.assert_no_errors();
    assert_eq!(w.clients[A].reports.len(), 1, "a reset ran");
    assert_converged(&w);
    let digest = w.store(A).digest();

    // Closed after the reset: only the live state is left.
    w.disconnect(A);
    drop(Arc::into_inner(w.clients[A].store.take().unwrap()).expect("unshared"));
    let path = w.clients[A].path.clone();
    let reset_tables = |path: &Path| -> Vec<String> {
        tables(path)
            .into_iter()
            .filter(|t| t.starts_with("reset_"))
            .collect()
    };
    assert_eq!(reset_tables(&path), Vec::<String>::new());

    // What a crash right after the swap leaves: the replaced state, still in the file.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&[u8], &[u8]> =
                redb::TableDefinition::new("reset_replaced");
            let mut t = txn.open_table(def).unwrap();
            t.insert(&b"old key"[..], &b"old row"[..]).unwrap();
        }
        txn.commit().unwrap();
    }
    assert_eq!(reset_tables(&path), vec!["reset_replaced".to_owned()]);
    let store = Store::open_with(&path, options(&w.time)).unwrap();
    assert_eq!(store.digest(), digest);
    assert!(store.verify_digest().unwrap());
    drop(store);
    assert_eq!(reset_tables(&path), Vec::<String>::new(), "open drops it");
}
