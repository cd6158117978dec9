//! Invariant 5 at the byte level: a tap records every byte the server sends each client;
//! decoding all of it must show no object of another user, and no task that is not
//! completed (the subscription), ever crossing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldlog::rules::Rules;
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::frame::{decode_frame, FRAME_LEN_MAX_DEFAULT};
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::protocol::{ServerMsg, Subscription};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{FieldSpec, FieldType, Schema, Store, Value};
use rand::{Rng, SeedableRng};
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
            subs.push(Subscription {
                name: "done".into(),
                collection: "Task".into(),
                query: "status == \"completed\"".into(),
            })
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
