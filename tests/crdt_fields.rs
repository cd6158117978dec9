//! Conflict-free field types over real sync: counters add up, texts merge by character, on
//! every replica, and both survive a client reset.

use std::sync::Arc;
use std::time::Duration;

use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{FieldSpec, FieldType, Schema, Store, Value};
use rand::seq::SliceRandom;
use rand::SeedableRng;

async fn setup(
    n: usize,
) -> (
    tempfile::TempDir,
    Arc<SyncServer>,
    ServerHandle,
    Vec<(Arc<Store>, SyncClient)>,
) {
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::generate();
    let store = Arc::new(Store::open(dir.path().join("server.redb")).unwrap());
    let server = Arc::new(SyncServer::open(store, ServerConfig::new(secret.clone())).unwrap());
    server
        .set_schema(
            Schema::new("Post")
                .field("title", FieldSpec::optional(FieldType::String))
                .field("likes", FieldSpec::optional(FieldType::Counter))
                .field("body", FieldSpec::optional(FieldType::Text)),
        )
        .unwrap();
    let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
        .await
        .unwrap();
    let addr = handle.local_addr().unwrap().to_string();
    let mut clients = Vec::new();
    for i in 0..n {
        let s = Arc::new(Store::open(dir.path().join(format!("c{i}.redb"))).unwrap());
        let claims = Claims {
            user_id: format!("u{i}"),
            expires_at_ms: u64::MAX,
            extra: Default::default(),
        };
        let c = SyncClient::start(
            s.clone(),
            Transport::Tcp(addr.clone()),
            ClientConfig::new(token::issue(&secret, &claims).unwrap()),
            ClientHooks::default(),
        );
        clients.push((s, c));
    }
    (dir, server, handle, clients)
}

async fn sync(c: &SyncClient) {
    tokio::time::timeout(Duration::from_secs(20), async {
        c.wait_for_upload().await.expect("upload");
        c.wait_for_download().await.expect("download");
    })
    .await
    .expect("sync timed out");
}

async fn offline(c: &SyncClient) {
    c.set_online(false);
    tokio::time::sleep(Duration::from_millis(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_increments_add_up_in_any_sync_order() {
    let (_dir, server, handle, clients) = setup(5).await;
    clients[0]
        .0
        .write(|tx| tx.insert("Post", 1, [("title", Value::from("hi"))]))
        .unwrap();
    for (_, c) in &clients {
        sync(c).await;
    }
    for (_, c) in &clients {
        offline(c).await;
    }
    let mut want = 0;
    for (i, (s, _)) in clients.iter().enumerate() {
        for k in 0..=i as i64 {
            s.write(|tx| tx.increment("Post", 1, "likes", k + 1))
                .unwrap();
            want += k + 1;
        }
    }
    let mut order: Vec<usize> = (0..clients.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(9));
    for i in order {
        clients[i].1.set_online(true);
        sync(&clients[i].1).await;
    }
    for (_, c) in &clients {
        sync(c).await;
    }
    for s in clients
        .iter()
        .map(|(s, _)| s.as_ref())
        .chain([server.store().as_ref()])
    {
        assert_eq!(
            s.get("Post", 1).unwrap().unwrap().get("likes"),
            Some(&Value::Int(want))
        );
        assert_eq!(
            s.get_field("Post", 1, "likes").unwrap().map(|(v, _)| v),
            Some(Value::Int(want))
        );
        assert_eq!(s.digest(), server.store().digest());
    }
    for (_, c) in clients {
        c.stop().await;
    }
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_text_edits_keep_every_insertion() {
    let (_dir, server, handle, clients) = setup(3).await;
    clients[0]
        .0
        .write(|tx| {
            tx.insert("Post", 1, [("title", Value::from("doc"))])?;
            tx.edit_text("Post", 1, "body", 0, 0, "The quick fox.")
        })
        .unwrap();
    for (_, c) in &clients {
        sync(c).await;
    }
    for (_, c) in &clients {
        offline(c).await;
    }
    let inserts = [(4, "very "), (10, "brown "), (14, " jumps")];
    for ((s, _), (pos, text)) in clients.iter().zip(inserts) {
        s.write(|tx| tx.edit_text("Post", 1, "body", pos, 0, text))
            .unwrap();
    }
    for (_, c) in clients.iter().rev() {
        c.set_online(true);
        sync(c).await;
    }
    for (_, c) in &clients {
        sync(c).await;
    }
    let text = |s: &Store| match s.get("Post", 1).unwrap().unwrap().get("body") {
        Some(Value::String(t)) => t.clone(),
        other => panic!("body is {other:?}"),
    };
    let want = text(server.store());
    for (_, t) in inserts {
        assert!(want.contains(t), "{want:?} lost {t:?}");
    }
    assert!(want.starts_with("The very quick"), "{want:?}");
    for (s, _) in &clients {
        assert_eq!(text(s), want);
        assert_eq!(s.digest(), server.store().digest());
    }
    for (_, c) in clients {
        c.stop().await;
    }
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_text_survive_a_client_reset() {
    let (_dir, server, handle, clients) = setup(2).await;
    let ((a, ca), (b, cb)) = (&clients[0], &clients[1]);
    a.write(|tx| tx.insert("Post", 1, [("title", Value::from("t"))]))
        .unwrap();
    sync(ca).await;
    sync(cb).await;
    offline(ca).await;
    a.write(|tx| {
        tx.increment("Post", 1, "likes", 3)?;
        tx.edit_text("Post", 1, "body", 0, 0, "from a")
    })
    .unwrap();
    b.write(|tx| {
        tx.increment("Post", 1, "likes", 4)?;
        tx.edit_text("Post", 1, "body", 0, 0, "from b ")
    })
    .unwrap();
    sync(cb).await;
    server.compact_history(server.version()).unwrap();
    ca.set_online(true);
    let report = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(r) = ca.take_reset_reports().pop() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("no reset");
    assert_eq!(report.recovered.len(), 2, "{report:?}");
    sync(ca).await;
    sync(cb).await;
    for s in [a.as_ref(), b.as_ref(), server.store().as_ref()] {
        let o = s.get("Post", 1).unwrap().unwrap();
        assert_eq!(o.get("likes"), Some(&Value::Int(7)));
        let Some(Value::String(body)) = o.get("body") else {
            panic!("{o:?}")
        };
        assert!(
            body.contains("from a") && body.contains("from b"),
            "{body:?}"
        );
        assert_eq!(s.digest(), server.store().digest());
    }
    for (_, c) in clients {
        c.stop().await;
    }
    handle.shutdown().await;
}

#[test]
fn counters_and_texts_refuse_direct_writes_under_a_schema() {
    let s = Store::open_in_memory().unwrap();
    s.set_schema(
        Schema::new("Post")
            .field("likes", FieldSpec::optional(FieldType::Counter))
            .field("body", FieldSpec::optional(FieldType::Text)),
    )
    .unwrap();
    s.write(|tx| tx.insert("Post", 1, std::iter::empty::<(String, Value)>()))
        .unwrap();
    let e = s.write(|tx| tx.set("Post", 1, "likes", 5)).unwrap_err();
    assert!(matches!(e, fieldlog::Error::Schema { .. }), "{e}");
    let e = s
        .write(|tx| tx.set("Post", 1, "__c.likes.0000000000000001", 5))
        .unwrap_err();
    assert!(matches!(e, fieldlog::Error::BadName { .. }), "{e}");
    s.write(|tx| tx.increment("Post", 1, "likes", 2)).unwrap();
    let e = s
        .write(|tx| tx.edit_text("Post", 1, "body", 5, 0, "x"))
        .unwrap_err();
    assert!(matches!(e, fieldlog::Error::Conversion { .. }), "{e}");
    assert_eq!(
        s.get("Post", 1).unwrap().unwrap().get("likes"),
        Some(&Value::Int(2))
    );
}
