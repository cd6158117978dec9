//! The `fieldlog` command: `demo`, `serve`, `token`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{Store, SystemTimeSource, TimeSource, Value};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{RngExt, SeedableRng};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The environment variable holding the server secret (hex), when no file is given.
const SECRET_ENV: &str = "FIELDLOG_SECRET";

#[derive(Parser)]
#[command(
    name = "fieldlog",
    version,
    about = "Field-level embedded store with sync"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A real server on 127.0.0.1 and several clients that write fast, go offline, come
    /// back, and converge. Needs no set-up: everything lives in a temporary folder.
    Demo {
        /// Number of clients.
        #[arg(long, default_value_t = 6)]
        clients: usize,
        /// Field writes per client.
        #[arg(long, default_value_t = 5_000)]
        writes: u64,
        /// Objects per client.
        #[arg(long, default_value_t = 200)]
        objects: u64,
        /// Seed for the random writes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Runs a sync server until Ctrl-C.
    Serve {
        /// The server's store file (created if missing).
        #[arg(long)]
        db: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7878")]
        listen: String,
        /// File with the secret (hex); otherwise $FIELDLOG_SECRET.
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
    /// Prints a token for a user (for development), signed with the server's secret.
    Token {
        /// The user id.
        #[arg(long)]
        user: String,
        /// File with the secret (hex); otherwise $FIELDLOG_SECRET.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Prints a new random secret (hex) for `serve` and `token`.
    Secret,
    /// Lists the conflicts a server recorded (the server must not be running on it).
    Conflicts {
        /// The server's store file.
        #[arg(long)]
        db: PathBuf,
        /// Show conflicts after this number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

/// Logs the library's events to stderr: `RUST_LOG` sets the level (default: info for the
/// server, warnings otherwise).
fn install_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    install_logging(match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    });
    let result = match cli.command {
        Command::Demo {
            clients,
            writes,
            objects,
            seed,
        } => runtime().and_then(|rt| rt.block_on(demo(clients, writes, objects.max(1), seed))),
        Command::Serve {
            db,
            listen,
            secret_file,
        } => runtime().and_then(|rt| rt.block_on(serve(db, listen, secret_file))),
        Command::Token {
            user,
            secret_file,
            ttl_secs,
        } => make_token(&user, secret_file, ttl_secs),
        Command::Secret => {
            println!("{}", Secret::generate().to_hex());
            Ok(())
        }
        Command::Conflicts { db, after, limit } => list_conflicts(&db, after, limit),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn list_conflicts(db: &std::path::Path, after: u64, limit: usize) -> Result<(), BoxError> {
    if !db.exists() {
        return Err(format!("{} does not exist", db.display()).into());
    }
    let store = Store::open(db)?;
    let records = fieldlog::sync::server::conflicts_in(&store, after, limit)?;
    println!("id\tkind\tobject\tfield\tclient (user, value)\tserver (user, value)\tpolicy\twinner");
    for r in &records {
        let c = &r.conflict;
        let side = |s: &fieldlog::conflict::Side| {
            format!(
                "{}, {}",
                s.user
                    .clone()
                    .or(s.replica.map(|r| r.to_string()))
                    .unwrap_or_default(),
                s.value.as_ref().map_or("-".into(), ToString::to_string)
            )
        };
        println!(
            "{}\t{}\t{}[{}]\t{}\t{}\t{}\t{}\t{:?}",
            r.id,
            c.kind,
            c.collection,
            c.pk,
            c.field.as_deref().unwrap_or("-"),
            side(&c.client),
            side(&c.server),
            r.policy,
            r.decision
        );
    }
    eprintln!("{} conflicts", records.len());
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn make_token(user: &str, file: Option<PathBuf>, ttl_secs: u64) -> Result<(), BoxError> {
    let secret = Secret::from_env_or_file(SECRET_ENV, file.as_deref())?;
    let claims = Claims {
        user_id: user.to_owned(),
        expires_at_ms: SystemTimeSource.now_ms() + ttl_secs * 1000,
        extra: Default::default(),
    };
    println!("{}", token::issue(&secret, &claims)?);
    Ok(())
}

async fn serve(db: PathBuf, listen: String, file: Option<PathBuf>) -> Result<(), BoxError> {
    let secret = Secret::from_env_or_file(SECRET_ENV, file.as_deref())?;
    let store = Arc::new(Store::open(&db)?);
    let server = Arc::new(SyncServer::open(store, ServerConfig::new(secret))?);
    let handle = ServerHandle::bind(Arc::clone(&server), &listen).await?;
    let addr = handle.local_addr().map(|a| a.to_string()).unwrap_or(listen);
    eprintln!(
        "fieldlog: serving {} on {addr} (server version {}); Ctrl-C stops",
        db.display(),
        server.version()
    );
    tokio::signal::ctrl_c().await?;
    // Every acknowledgement was sent after a durable commit, so stopping here loses
    // nothing acknowledged; unacknowledged uploads are resent by their clients.
    handle.shutdown().await;
    eprintln!("fieldlog: stopped at server version {}", server.version());
    Ok(())
}

/// What the demo writes: `writes` field writes by each of `clients` clients, over
/// `objects` objects per client, the randomness seeded by `seed`.
#[derive(Clone, Copy)]
struct Load {
    clients: usize,
    writes: u64,
    objects: u64,
    seed: u64,
}

async fn demo(clients: usize, writes: u64, objects: u64, seed: u64) -> Result<(), BoxError> {
    let load = Load {
        clients,
        writes,
        objects,
        seed,
    };
    let demo = Demo::start(load).await?;
    let started = Instant::now();
    let total_writes = demo.write(load).await?;
    let writing = started.elapsed();
    let converge = Instant::now();
    demo.converge().await?;
    let equal = demo.report(total_writes, writing, converge.elapsed())?;
    demo.stop().await;
    if equal != clients {
        return Err("clients did not converge".into());
    }
    println!("converged");
    Ok(())
}

/// The demo's server and clients, each with a store of its own in a temporary folder.
struct Demo {
    dir: tempfile::TempDir,
    clients: usize,
    server_store: Arc<Store>,
    server: Arc<SyncServer>,
    handle: ServerHandle,
    replicas: Vec<(Arc<Store>, Arc<SyncClient>)>,
}

impl Demo {
    /// A server on a free local port, and `load.clients` clients connected to it over TCP.
    async fn start(load: Load) -> Result<Demo, BoxError> {
        let dir = tempfile::tempdir()?;
        let secret = Secret::generate();
        let server_store = Arc::new(Store::open(dir.path().join("server.redb"))?);
        let server = Arc::new(SyncServer::open(
            Arc::clone(&server_store),
            ServerConfig::new(secret.clone()),
        )?);
        let handle = ServerHandle::bind(Arc::clone(&server), "127.0.0.1:0").await?;
        let addr = handle
            .local_addr()
            .ok_or("server has no address")?
            .to_string();
        println!(
            "server on {addr}, {} clients, {} field writes each, stores in {}",
            load.clients,
            load.writes,
            dir.path().display()
        );
        let mut replicas = Vec::new();
        for i in 0..load.clients {
            let store = Arc::new(Store::open(dir.path().join(format!("client{i}.redb")))?);
            let claims = Claims {
                user_id: format!("user{i}"),
                expires_at_ms: u64::MAX,
                extra: Default::default(),
            };
            let client = SyncClient::start(
                Arc::clone(&store),
                Transport::Tcp(addr.clone()),
                ClientConfig::new(token::issue(&secret, &claims)?),
                ClientHooks::default(),
            );
            replicas.push((store, Arc::new(client)));
        }
        let clients = load.clients;
        Ok(Demo {
            dir,
            clients,
            server_store,
            server,
            handle,
            replicas,
        })
    }

    /// Every client writes its share at once, on blocking threads, with a progress bar;
    /// returns the field writes made.
    async fn write(&self, load: Load) -> Result<u64, BoxError> {
        let bar = ProgressBar::new(load.writes * load.clients as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} field writes {per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let offline_now = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (i, (store, client)) in self.replicas.iter().enumerate() {
            let (store, client, bar, offline_now) = (
                Arc::clone(store),
                Arc::clone(client),
                bar.clone(),
                Arc::clone(&offline_now),
            );
            tasks.push(tokio::task::spawn_blocking(move || {
                client_writes(load, i, &store, &client, &bar, &offline_now)
            }));
        }
        let mut total_writes = 0;
        for t in tasks {
            total_writes += t.await??;
        }
        bar.finish_with_message("written; converging");
        Ok(total_writes)
    }

    /// Waits until every client has uploaded everything, then downloaded everything.
    async fn converge(&self) -> Result<(), BoxError> {
        for (_, c) in &self.replicas {
            c.wait_for_upload().await?;
        }
        for (_, c) in &self.replicas {
            c.wait_for_download().await?;
        }
        Ok(())
    }

    /// Prints the figures; returns how many clients' digests equal the server's.
    fn report(
        &self,
        total_writes: u64,
        writing: Duration,
        converged_in: Duration,
    ) -> Result<usize, BoxError> {
        let clients = self.clients;
        let want = self.server_store.digest();
        let equal = self
            .replicas
            .iter()
            .filter(|(s, _)| s.digest() == want)
            .count();
        let bytes = std::fs::metadata(self.dir.path().join("server.redb"))?.len();
        println!("field writes:        {total_writes} in {writing:.2?} ({:.0}/s across {clients} clients, each commit durable)",
            total_writes as f64 / writing.as_secs_f64());
        println!(
            "server history:      {} transactions, store file {:.1} MiB",
            self.server.version(),
            bytes as f64 / (1 << 20) as f64
        );
        println!(
            "connections:         {} (clients reconnect after going offline)",
            self.handle.connections()
        );
        println!("time to converge:    {converged_in:.2?} after the last write");
        let end_to_end = writing + converged_in;
        println!(
            "end to end:          {:.0} field changes/s (first write to every client converged)",
            total_writes as f64 / end_to_end.as_secs_f64()
        );
        println!(
            "objects:             {} on the server",
            self.server_store.count("Item")?
        );
        println!("digests equal:       {equal}/{clients} clients match the server ({want})");
        Ok(equal)
    }

    async fn stop(self) {
        for (_, c) in self.replicas {
            if let Ok(c) = Arc::try_unwrap(c) {
                c.stop().await;
            }
        }
        self.handle.shutdown().await;
    }
}

/// Client `i`'s writes: its own objects, then field writes in small transactions to
/// random objects, going offline now and then for a stretch of writes.
fn client_writes(
    load: Load,
    i: usize,
    store: &Store,
    client: &SyncClient,
    bar: &ProgressBar,
    offline_now: &AtomicU64,
) -> Result<u64, BoxError> {
    let Load {
        clients,
        writes,
        objects,
        seed,
    } = load;
    let total = clients as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(i as u64));
    store.write(|tx| {
        for k in 0..objects {
            let fields = (0..10).map(|f| (format!("field{f}"), Value::from(0)));
            tx.insert("Item", (i as u64 * objects + k) as i64, fields)?;
        }
        Ok(())
    })?;
    let mut done = 0;
    let mut offline_until = None;
    while done < writes {
        match offline_until {
            None if rng.random_ratio(1, 40) => {
                client.set_online(false);
                offline_now.fetch_add(1, Ordering::Relaxed);
                offline_until = Some(done + rng.random_range(100..800));
            }
            Some(until) if done >= until => {
                client.set_online(true);
                offline_now.fetch_sub(1, Ordering::Relaxed);
                offline_until = None;
            }
            _ => {}
        }
        let n = (writes - done).min(rng.random_range(1..20));
        store.write(|tx| {
            for _ in 0..n {
                let k = rng.random_range(0..objects);
                let mut pk = (rng.random_range(0..total) * objects + k) as i64;
                if tx.get("Item", pk)?.is_none() {
                    // Not downloaded yet: edit one of our own instead.
                    pk = (i as u64 * objects + k) as i64;
                }
                let field = format!("field{}", rng.random_range(0..10));
                tx.set("Item", pk, &field, rng.random_range(0..1_000_000i64))?;
            }
            Ok(())
        })?;
        done += n;
        bar.inc(n);
        bar.set_message(format!("({} offline)", offline_now.load(Ordering::Relaxed)));
    }
    if offline_until.is_some() {
        client.set_online(true);
        offline_now.fetch_sub(1, Ordering::Relaxed);
    }
    Ok(done)
}
