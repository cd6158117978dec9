//! Invariant 5 at the byte level: a tap records every byte the server sends each client;
//! decoding all of it must show no object of another user, and no task that is not
//! completed (the subscription), ever crossing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldlog::rules::Rules;
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::frame::{decode_frame, FRAME_LEN_MAX_DEFAULT};
use fieldlog::sync::net::{ClientHooks, ConnectionState, ServerHandle, SyncClient, Transport};
use fieldlog::sync::protocol::{ServerMsg, Subscription};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{FieldSpec, FieldType, Schema, Store, Value};
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RULES: &str = r#"{ "rules": { "Task": [ {
    "name": "ownTasks", "apply_when": {},
    "document_filters": { "read": { "ownerId": "%%user.id" }, "write": { "ownerId": "%%user.id" } },
    "read": true, "write": true, "insert": true, "delete": true } ] } }"#;

/// A proxy in front of the server that keeps, per connection, every byte the server sent.
async fn tap(server: String) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let captured = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&captured);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = TcpStream::connect(&server).await else {
                continue;
            };
            let index = {
                let mut c = sink.lock().unwrap();
                c.push(Vec::new());
                c.len() - 1
            };
            let sink = Arc::clone(&sink);
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = upstream.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            sink.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = cw.shutdown().await;
            });
        }
    });
    (addr, captured)
}

/// Every message the server sent on one connection.
fn decode_all(mut bytes: &[u8]) -> Vec<ServerMsg> {
    let mut out = Vec::new();
    while let Ok(Some((m, used))) = decode_frame::<ServerMsg>(bytes, FRAME_LEN_MAX_DEFAULT) {
        out.push(m);
        bytes = &bytes[used..];
    }
    assert!(
        bytes.is_empty() || bytes.len() < 8,
        "undecodable tail of {} bytes",
        bytes.len()
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_object_of_another_user_ever_crosses_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::generate();
    let store = Arc::new(Store::open(dir.path().join("server.redb")).unwrap());
    let mut config = ServerConfig::new(secret.clone());
    config.rules = Some(Arc::new(Rules::load(RULES).unwrap()));
    let server = Arc::new(SyncServer::open(store, config).unwrap());
    server
        .set_schema(
            Schema::new("Task")
                .field(
                    "ownerId",
                    FieldSpec::required(FieldType::String).queryable(),
                )
                .field("status", FieldSpec::optional(FieldType::String).queryable())
                .field("title", FieldSpec::optional(FieldType::String)),
        )
        .unwrap();
    let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
        .await
        .unwrap();
    let users = ["ann", "ben", "cat"];
    let mut clients = Vec::new();
    for user in users {
        let (addr, captured) = tap(handle.local_addr().unwrap().to_string()).await;
        let s = Arc::new(Store::open(dir.path().join(format!("{user}.redb"))).unwrap());
        let claims = Claims {
            user_id: user.into(),
            expires_at_ms: u64::MAX,
            extra: Default::default(),
        };
        let c = SyncClient::start(
            s.clone(),
            Transport::Tcp(addr),
            ClientConfig::new(token::issue(&secret, &claims).unwrap()),
            ClientHooks::default(),
        );
        c.update_subscriptions(|subs| {
            subs.push(Subscription::new("done", "Task", "status == \"completed\""))
        })
        .unwrap();
        tokio::time::timeout(Duration::from_secs(20), c.wait_for_subscriptions())
            .await
            .unwrap()
            .unwrap();
        clients.push((user, s, c, captured));
    }

    // Interleaved writes: each user creates tasks, the server creates tasks for everyone,
    // statuses flip between open and completed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for round in 0..30 {
        for (user, s, _, _) in &clients {
            let pk = format!("{user}-{}", round % 6);
            let status = if rng.random_bool(0.5) {
                "completed"
            } else {
                "open"
            };
            s.write(|tx| match tx.get("Task", pk.as_str())? {
                Some(_) => tx.set("Task", pk.as_str(), "status", status),
                None => tx.insert(
                    "Task",
                    pk.as_str(),
                    [
                        ("ownerId", Value::from(*user)),
                        ("status", Value::from(status)),
                        ("title", Value::from("t")),
                    ],
                ),
            })
            .unwrap();
        }
        let owner = users[rng.random_range(0..users.len())];
        server
            .write(|tx| {
                let pk = format!("srv-{round}");
                tx.insert(
                    "Task",
                    pk.as_str(),
                    [
                        ("ownerId", Value::from(owner)),
                        ("status", Value::from("completed")),
                    ],
                )
            })
            .unwrap();
        if round % 7 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (_, _, c, _) in &clients {
        tokio::time::timeout(Duration::from_secs(30), async {
            c.wait_for_upload().await.expect("upload");
            c.wait_for_download().await.expect("download");
        })
        .await
        .unwrap();
    }

    let mut objects_seen = 0;
    for (user, s, c, captured) in &clients {
        assert_eq!(c.fatal_error(), None);
        // Locally: exactly the user's completed tasks on the server.
        let want: Vec<_> = server
            .store()
            .query(
                "Task",
                &format!("ownerId == '{user}' AND status == 'completed'"),
            )
            .unwrap();
        assert!(!want.is_empty());
        assert_eq!(s.scan("Task").unwrap(), want, "{user}");
        // On the wire: nothing else, ever.
        for conn in captured.lock().unwrap().iter() {
            for m in decode_all(conn) {
                let objects = match m {
                    ServerMsg::ViewDownload { objects, .. }
                    | ServerMsg::Snapshot { objects, .. } => objects,
                    ServerMsg::Download { changeset, .. } => {
                        assert!(
                            changeset.entries.iter().all(|e| e.writes.is_empty()),
                            "{user} got log entries"
                        );
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                for o in objects {
                    objects_seen += 1;
                    let field = |n: &str| {
                        o.fields
                            .iter()
                            .find(|(f, _, _)| f == n)
                            .map(|(_, _, v)| v.clone())
                    };
                    assert_eq!(
                        field("ownerId"),
                        Some(Value::from(*user)),
                        "{user} received {o:?}"
                    );
                    assert_eq!(
                        field("status"),
                        Some(Value::from("completed")),
                        "{user} received {o:?}"
                    );
                }
            }
        }
    }
    assert!(objects_seen > 20, "the tap saw {objects_seen} objects");
    for (_, _, c, _) in clients {
        c.stop().await;
    }
    handle.shutdown().await;
}

/// A role that reads every task and writes its own, but never reads or writes `secret`
/// (a string), `bonus` (a counter) or `diary` (a text).
const HIDDEN_RULES: &str = r#"{ "rules": { "Task": [ {
    "name": "team", "apply_when": {},
    "document_filters": { "read": true, "write": { "ownerId": "%%user.id" } },
    "fields": { "secret": { "read": false, "write": false },
                "bonus": { "read": false, "write": false },
                "diary": { "read": false, "write": false } },
    "additional_fields": { "read": true, "write": true } } ] } }"#;

/// What the server writes into the hidden fields; it must never be in a byte sent.
const MARKER: &str = "TOPSECRET";
const HIDDEN: [&str; 3] = ["secret", "bonus", "diary"];

/// Whether a stored field name is a hidden field or a part of one (`__c.bonus.<replica>`).
fn hidden(name: &str) -> bool {
    HIDDEN.iter().any(|h| {
        name == *h
            || name.starts_with(&format!("__c.{h}."))
            || name.starts_with(&format!("__t.{h}."))
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

struct Tapped {
    user: &'static str,
    store: Arc<Store>,
    sync: SyncClient,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn tapped_client(
    user: &'static str,
    server_addr: String,
    secret: &Secret,
    dir: &std::path::Path,
) -> Tapped {
    let (addr, captured) = tap(server_addr).await;
    let store = Arc::new(Store::open(dir.join(format!("{user}.redb"))).unwrap());
    let claims = Claims {
        user_id: user.into(),
        expires_at_ms: u64::MAX,
        extra: Default::default(),
    };
    let sync = SyncClient::start(
        store.clone(),
        Transport::Tcp(addr),
        ClientConfig::new(token::issue(secret, &claims).unwrap()),
        ClientHooks::default(),
    );
    Tapped {
        user,
        store,
        sync,
        captured,
    }
}

async fn settle(clients: &[Tapped]) {
    for c in clients {
        tokio::time::timeout(Duration::from_secs(30), async {
            c.sync.wait_for_upload().await.expect("upload");
            c.sync.wait_for_download().await.expect("download");
        })
        .await
        .expect("sync timed out");
        assert_eq!(c.sync.fatal_error(), None, "{}", c.user);
    }
}

async fn subscribe(c: &Tapped, query: &str) {
    let query = query.to_owned();
    c.sync
        .update_subscriptions(move |subs| {
            subs.clear();
            subs.push(Subscription::new("tasks", "Task", query));
        })
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), c.sync.wait_for_subscriptions())
        .await
        .unwrap()
        .unwrap();
}

/// Drops the client's connection, runs `meanwhile`, and waits until the client has made a
/// new connection.
async fn reconnect(c: &Tapped, meanwhile: impl FnOnce()) {
    let before = c.captured.lock().unwrap().len();
    c.sync.set_online(false);
    tokio::time::timeout(Duration::from_secs(20), async {
        while c.sync.state() != ConnectionState::Disconnected {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        meanwhile();
        c.sync.set_online(true);
        while c.captured.lock().unwrap().len() == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("reconnect timed out");
}

/// The server's tasks as a client may hold them: the hidden fields dropped.
fn without_hidden(objects: Vec<fieldlog::Object>) -> Vec<fieldlog::Object> {
    objects
        .into_iter()
        .map(|mut o| {
            o.fields.retain(|f, _| !hidden(f));
            o
        })
        .collect()
}

/// Field-level read permissions at the byte level, through every path that carries objects:
/// view downloads, the snapshot of a subscription change, of a forced reset and of a reset
/// after compaction. Random writes by the server (into the hidden fields too) and by the
/// clients (some trying to write the hidden fields) interleave with those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_field_a_role_cannot_read_ever_crosses_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::generate();
    let store = Arc::new(Store::open(dir.path().join("server.redb")).unwrap());
    let mut config = ServerConfig::new(secret.clone());
    config.rules = Some(Arc::new(Rules::load(HIDDEN_RULES).unwrap()));
    let server = Arc::new(SyncServer::open(store, config).unwrap());
    server
        .set_schema(
            Schema::new("Task")
                .field(
                    "ownerId",
                    FieldSpec::required(FieldType::String).queryable(),
                )
                .field("status", FieldSpec::optional(FieldType::String).queryable())
                .field("title", FieldSpec::optional(FieldType::String))
                .field("secret", FieldSpec::optional(FieldType::String))
                .field("bonus", FieldSpec::optional(FieldType::Counter))
                .field("diary", FieldSpec::optional(FieldType::Text)),
        )
        .unwrap();
    let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
        .await
        .unwrap();
    let server_addr = handle.local_addr().unwrap().to_string();
    let mut clients = Vec::new();
    for user in ["ann", "ben", "cat"] {
        clients.push(tapped_client(user, server_addr.clone(), &secret, dir.path()).await);
    }
    // ann has subscriptions (view changes rebuild her view with a snapshot); ben and cat
    // see everything their role lets them read.
    subscribe(&clients[0], "status == 'completed'").await;

    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for round in 0..24 {
        for c in &clients {
            let pk = format!("{}-{}", c.user, round % 4);
            let status = if rng.random_bool(0.5) {
                "completed"
            } else {
                "open"
            };
            let poke_secret = rng.random_bool(0.2);
            c.store
                .write(|tx| {
                    match tx.get("Task", pk.as_str())? {
                        Some(_) => tx.set("Task", pk.as_str(), "status", status)?,
                        None => tx.insert(
                            "Task",
                            pk.as_str(),
                            [
                                ("ownerId", Value::from(c.user)),
                                ("status", Value::from(status)),
                                ("title", Value::from("t")),
                            ],
                        )?,
                    }
                    if poke_secret {
                        // Refused: the client's own value comes back in its compensating write.
                        tx.set("Task", pk.as_str(), "secret", format!("mine-{}", c.user))?;
                    }
                    Ok(())
                })
                .unwrap();
        }
        let owner = ["ann", "ben", "cat"][rng.random_range(0..3)];
        server
            .write(|tx| {
                let pk = format!("srv-{}", round % 6);
                if tx.get("Task", pk.as_str())?.is_none() {
                    tx.insert(
                        "Task",
                        pk.as_str(),
                        [
                            ("ownerId", Value::from(owner)),
                            ("status", Value::from("completed")),
                            ("secret", Value::from(format!("{MARKER}-{round}"))),
                        ],
                    )?;
                    tx.edit_text(
                        "Task",
                        pk.as_str(),
                        "diary",
                        0,
                        0,
                        &format!("{MARKER} diary"),
                    )?;
                }
                tx.set("Task", pk.as_str(), "secret", format!("{MARKER}-{round}"))?;
                tx.increment("Task", pk.as_str(), "bonus", 1000)
            })
            .unwrap();
        match round % 8 {
            // A subscription change: a snapshot of the new view.
            2 => subscribe(&clients[0], "TRUEPREDICATE").await,
            3 => subscribe(&clients[0], "status == 'completed'").await,
            // A forced reset: a snapshot of everything cat may read.
            5 => {
                settle(&clients).await;
                server.force_reset(clients[2].store.replica_id()).unwrap();
                reconnect(&clients[2], || {}).await;
            }
            // History compacted under an offline client: a reset when it is back.
            7 => {
                settle(&clients).await;
                reconnect(&clients[1], || {
                    server
                        .write(|tx| tx.set("Task", "srv-0", "title", "moved"))
                        .unwrap();
                    server.compact_history(server.version()).unwrap();
                })
                .await;
            }
            _ => {}
        }
    }
    settle(&clients).await;
    settle(&clients).await;

    let all = server.store().scan("Task").unwrap();
    assert!(
        all.iter().any(|o| o
            .get("secret")
            .is_some_and(|v| matches!(v, Value::String(s) if s.starts_with(MARKER)))),
        "the server holds the hidden values"
    );
    let mut resets = std::collections::BTreeSet::new();
    let mut objects_seen = 0;
    for c in &clients {
        // Locally: every task it may read (ann: the completed ones), without hidden fields.
        let mut want = without_hidden(all.clone());
        if c.user == "ann" {
            want.retain(|o| o.get("status") == Some(&Value::from("completed")));
        }
        assert!(!want.is_empty());
        assert_eq!(c.store.scan("Task").unwrap(), want, "{}", c.user);
        for conn in c.captured.lock().unwrap().iter() {
            assert!(
                !contains(conn, MARKER.as_bytes()),
                "{} received a hidden value",
                c.user
            );
            for m in decode_all(conn) {
                let objects = match m {
                    ServerMsg::ViewDownload { objects, .. }
                    | ServerMsg::Snapshot { objects, .. } => objects,
                    ServerMsg::Download { changeset, .. } => {
                        assert!(
                            changeset.entries.iter().all(|e| e.writes.is_empty()),
                            "{} got log entries",
                            c.user
                        );
                        Vec::new()
                    }
                    ServerMsg::ResetRequired { reason, .. } => {
                        resets.insert(
                            format!("{reason:?}")
                                .split([' ', '{'])
                                .next()
                                .unwrap()
                                .to_owned(),
                        );
                        Vec::new()
                    }
                    ServerMsg::CompensatingWrite { refused } => {
                        for r in refused {
                            for (f, v) in &r.fields {
                                if hidden(f) {
                                    assert_eq!(v, &Value::from(format!("mine-{}", c.user)));
                                }
                            }
                        }
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                for o in objects {
                    objects_seen += 1;
                    assert!(
                        o.fields.iter().all(|(f, _, _)| !hidden(f)),
                        "{} received {o:?}",
                        c.user
                    );
                }
            }
        }
    }
    assert!(objects_seen > 50, "the tap saw {objects_seen} objects");
    for path in ["SubscriptionsChanged", "Forced", "BehindHorizon"] {
        assert!(
            resets.contains(path),
            "no {path} snapshot was sent: {resets:?}"
        );
    }
    for c in clients {
        c.sync.stop().await;
    }
    handle.shutdown().await;
}
