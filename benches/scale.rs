//! Scale-out (issue 21): N simulated agents against one control plane on SQLite, then the
//! same agents against one replica on PostgreSQL, then against two replicas on it, side
//! by side.
//!
//! The agents are enrolled once, with the SQLite control plane; `falaj control migrate
//! --from-sqlite` then copies its state into an empty PostgreSQL database (a cluster made
//! here with Debian's server programs, syncing its commits as PostgreSQL does by default),
//! and both replicas get copies of the region's keys, as an operator moving to replicas
//! would do. Each control plane runs as its own process (the `falaj` binary, release
//! profile); the agents run in this process, each with its own certificate and QUIC
//! connection, spread over 100 UDP sockets on as many loopback addresses (the control
//! plane caps handshakes in progress per address, as it would for agents behind one NAT),
//! and with two replicas agent `i` connects to replica `i % 2`. For each backend:
//!
//! - **connect storm**: every agent connects at once; the time until each has its first
//!   desired-state document (refused handshakes are retried with backoff and jitter, as
//!   agents do);
//! - **heartbeat CPU**: each control-plane process's CPU over `--seconds` while every agent
//!   sends a report every 10 s;
//! - **memory per agent**: each process's resident set with its agents connected, less
//!   before they came, over its agents;
//! - **fan-out**: a new version deployed through the first control plane; the time until
//!   every agent has a document naming it (on PostgreSQL the second replica learns of it
//!   from the database's newest event, which it polls every second);
//! - **window ingest**: every agent sends a metric window at once (as agents do every
//!   10 s per model), and `--windows` in all, each as soon as the one before is
//!   acknowledged (stored; several, so that the rate is read over seconds, not over one
//!   burst of a busy machine); windows a second until every one is acknowledged, and the
//!   CPU each control plane (and PostgreSQL's processes) used per window meanwhile.
//!
//! `cargo bench --bench scale -- [--agents 10000] [--seconds 30] [--windows 5]`; prints Markdown for
//! BENCHMARKS.md. Needs PostgreSQL's server programs (`apt-get install postgresql`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use falaj_agent::enroll::{self, EnrollOptions};
use falaj_agent::identity::IdentityFiles;
use falaj_common::desired::DesiredState;
use falaj_common::keys::Sha256;
use falaj_common::metrics::{Counts, MetricsWindow};
use falaj_common::protocol::io::{read_frame, write_frame};
use falaj_common::protocol::{
    ActualState, AgentMessage, ControlMessage, HeldBundle, SERVER_NAME, SequencedWindow,
};
use falaj_common::random::SeededRng;
use falaj_common::sketch::LatencySketch;
use falaj_common::time::Timestamp;
use tokio::sync::{mpsc, watch};

#[path = "support/fleet.rs"]
mod fleet;
#[path = "../control-plane/tests/storage/postgres.rs"]
#[expect(dead_code, reason = "the storage tests' harness: the bench uses one cluster")]
mod postgres;

use fleet::ControlServer;

const GROUP: &str = "bench";
const REGION: &str = "bench-1";
const MODEL: &str = "scale";
const HEARTBEAT: Duration = Duration::from_secs(10);
/// UDP sockets (and loopback addresses) the simulated agents connect from.
const SOURCES: usize = 100;
/// How long any one phase may take before the bench gives up.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let agents = fleet::arg(&args, "--agents", 10_000);
    let seconds = fleet::arg(&args, "--seconds", 30);
    let windows = fleet::arg(&args, "--windows", 5);
    ensure!(windows > 0, "--windows takes a number above 0");
    let run = run(agents, seconds, windows as u64);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run)
}

/// One control-plane process's figures.
struct Process {
    /// Agents connected to it.
    agents: usize,
    /// RSS before they connect, KiB.
    rss_empty: u64,
    /// RSS with them, KiB.
    rss: u64,
    /// CPU ticks over the heartbeat phase.
    heartbeat_ticks: u64,
    /// CPU ticks from the windows' sending until the last acknowledgement.
    ingest_ticks: u64,
}

/// What an agent tells the bench.
enum Event {
    /// Its first desired-state document came.
    Connected,
    /// A document naming this version of the model came.
    Desired(u64),
    /// Its metric window is stored.
    Acked,
}

/// What the bench tells every agent.
#[derive(Clone, PartialEq, Eq)]
enum Order {
    Idle,
    /// Windows with these sequence numbers, each sent once the one before is stored.
    SendWindows(std::ops::Range<u64>),
    Stop,
}

/// One backend's figures.
struct Figures {
    backend: &'static str,
    /// Per control-plane process.
    processes: Vec<Process>,
    heartbeat_secs: f64,
    connect_secs: f64,
    fanout_secs: f64,
    ingest_secs: f64,
    /// CPU ticks PostgreSQL's processes used over the ingest (none on SQLite).
    database_ingest_ticks: u64,
    agents: usize,
    /// Windows each agent sent in the ingest.
    windows: u64,
    /// Sessions opened again during the storm, and after it.
    reconnects: (usize, usize),
}

async fn run(agents: usize, seconds: u64, windows: u64) -> Result<()> {
    let bin = postgres::binaries().map_err(anyhow::Error::msg)?;
    let work = tempfile::tempdir()?;
    let sqlite = work.path().join("sqlite");

    // SQLite, one control plane: enrolls every agent.
    // Every enrollment comes from one address here: allow 16 at a time from it (4 by default).
    let provisioning = work.path().join("sqlite.toml");
    std::fs::write(&provisioning, "[quic]\nmax_enrollments_per_address = 16\n")?;
    let provisioning = provisioning.display().to_string();
    let server =
        ControlServer::start(&sqlite, REGION, &["--config", &provisioning, "--heartbeat", "10s"])?;
    let enroll_started = Instant::now();
    let identities = enroll_all(&server, work.path(), agents).await?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    for version in [1, 2, 3, 4] {
        let path = work.path().join(format!("{MODEL}-{version}.falaj"));
        let payload = fleet::noise(64 << 10, version);
        fleet::write_bundle(&sqlite.join("keys"), &path, (MODEL, version), REGION, payload)?;
        server.client.push_bundle(&path).await?;
    }
    server.client.deploy(GROUP, MODEL, 1).await?;
    let phase = Phase { backend: "SQLite, one control plane", deploys: 2, seconds, windows };
    let on_sqlite = measure(&phase, &[&server], &identities).await?;
    drop(server);

    // PostgreSQL: the same state, migrated; two replicas sharing the chunks directory.
    let (cluster, url) = tokio::task::spawn_blocking(move || {
        let cluster = postgres::Cluster::start_durable(&bin).map_err(anyhow::Error::msg)?;
        let url = cluster.database("");
        Ok::<_, anyhow::Error>((cluster, url))
    })
    .await??;
    let migrated = Command::new(env!("CARGO_BIN_EXE_falaj"))
        .args(["control", "migrate", "--from-sqlite"])
        .arg(&sqlite)
        .args(["--to", &url])
        .output()?;
    ensure!(migrated.status.success(), "migrate: {}", String::from_utf8_lossy(&migrated.stderr));
    let config = work.path().join("replicas.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n\n[bundles]\nblobs_dir = \"{}\"\n",
            sqlite.join("blobs").display()
        ),
    )?;
    let replica = |name: &str| -> Result<ControlServer> {
        let data = work.path().join(name);
        copy_dir(&sqlite.join("keys"), &data.join("keys"))?;
        let config = config.display().to_string();
        ControlServer::start(&data, REGION, &["--config", &config, "--heartbeat", "10s"])
    };
    // One replica first, with every agent: a replica against SQLite's one process on the
    // same cores. Then two fresh ones, the agents spread over both.
    let solo = replica("solo")?;
    let phase = Phase { backend: "PostgreSQL, one replica", deploys: 3, seconds, windows };
    let on_one = measure(&phase, &[&solo], &identities).await?;
    drop(solo);
    let (a, b) = (replica("a")?, replica("b")?);
    let phase = Phase { backend: "PostgreSQL, two replicas", deploys: 4, seconds, windows };
    let on_two = measure(&phase, &[&a, &b], &identities).await?;
    drop((a, b));
    drop(cluster);

    print_figures(agents, seconds, enroll_secs, &[on_sqlite, on_one, on_two]);
    Ok(())
}

/// Enrolls `agents` agents with `server` (16 at a time); their directories.
async fn enroll_all(server: &ControlServer, work: &Path, agents: usize) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..agents {
        let dir = work.join(format!("agent-{i}"));
        dirs.push(dir.clone());
        let (client, quic) = (server.client.clone(), server.quic);
        tasks.spawn(async move {
            let token = client.create_token(GROUP, 3600).await?.token;
            let options = EnrollOptions {
                control_plane: quic.to_string(),
                token,
                hostname: format!("sim-{i}"),
                region: None,
            };
            enroll::enroll(&dir, &options, SystemTime::now()).await?;
            Ok::<_, anyhow::Error>(())
        });
        while tasks.len() >= 16 {
            tasks.join_next().await.context("task")???;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(dirs)
}

/// One backend's run.
struct Phase {
    backend: &'static str,
    /// The version the fan-out deploys (also, times 1000, the first sequence number of each
    /// agent's windows).
    deploys: u64,
    /// How long the heartbeat CPU is measured over.
    seconds: u64,
    /// Windows each agent sends in the ingest, one after the other's acknowledgement.
    windows: u64,
}

/// Runs every phase against `servers` (agent `i` on server `i % servers.len()`).
async fn measure(
    phase: &Phase,
    servers: &[&ControlServer],
    identities: &[PathBuf],
) -> Result<Figures> {
    let Phase { backend, deploys, seconds, windows } = *phase;
    let agents = identities.len();
    // Settled before the first reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let empty: Vec<u64> = servers.iter().map(|s| fleet::rss_kib(s.pid)).collect::<Result<_>>()?;
    let sources: Vec<quinn::Endpoint> = (0..SOURCES)
        .map(|i| {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, u8::try_from(i + 1).unwrap_or(1)));
            quinn::Endpoint::client(SocketAddr::new(ip, 0))
        })
        .collect::<std::io::Result<_>>()?;
    let window = Arc::new(window());
    let manifest = servers[0]
        .client
        .bundles()
        .await?
        .into_iter()
        .find(|b| b.name == MODEL && b.version == 1)
        .context("version 1 is pushed")?
        .manifest_sha256
        .parse()?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (orders, order) = watch::channel(Order::Idle);
    let reconnects = Arc::new(AtomicUsize::new(0));

    let started = Instant::now();
    for (i, dir) in identities.iter().enumerate() {
        let agent = SimulatedAgent {
            endpoint: sources[i % SOURCES].clone(),
            control: servers[i % servers.len()].quic,
            config: IdentityFiles::new(dir).session_config()?,
            manifest,
            window: Arc::clone(&window),
            events: events_tx.clone(),
            orders: order.clone(),
            seed: i as u64,
            reconnects: Arc::clone(&reconnects),
            connected: false,
            newest: 0,
            unacknowledged: None,
            next: 0..0,
        };
        tokio::spawn(agent.run());
    }
    count(&mut events, agents, |e| matches!(e, Event::Connected), "connected").await?;
    let connect_secs = started.elapsed().as_secs_f64();
    let storm_reconnects = reconnects.load(Ordering::Relaxed);

    // Idle: reports every heartbeat.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before: Vec<u64> =
        servers.iter().map(|s| fleet::cpu_ticks(s.pid)).collect::<Result<_>>()?;
    let idle = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let heartbeat_secs = idle.elapsed().as_secs_f64();
    let mut processes = Vec::new();
    for (k, server) in servers.iter().enumerate() {
        let ticks = fleet::cpu_ticks(server.pid)? - before[k];
        let on_it = (0..agents).filter(|i| i % servers.len() == k).count();
        processes.push(Process {
            agents: on_it,
            rss_empty: empty[k],
            rss: fleet::rss_kib(server.pid)?,
            heartbeat_ticks: ticks,
            ingest_ticks: 0,
        });
    }

    let started = Instant::now();
    servers[0].client.deploy(GROUP, MODEL, deploys).await?;
    count(&mut events, agents, |e| matches!(e, Event::Desired(v) if *v == deploys), "deployed")
        .await?;
    let fanout_secs = started.elapsed().as_secs_f64();

    let before: Vec<u64> =
        servers.iter().map(|s| fleet::cpu_ticks(s.pid)).collect::<Result<_>>()?;
    let database_before = postgres_ticks()?;
    let started = Instant::now();
    // Sequence numbers of this phase's own: the earlier phases' windows are in the
    // migrated database.
    let first = deploys * 1000;
    orders.send(Order::SendWindows(first..first + windows))?;
    count(&mut events, agents, |e| matches!(e, Event::Acked), "windows acknowledged").await?;
    let ingest_secs = started.elapsed().as_secs_f64();
    for ((process, server), before) in processes.iter_mut().zip(servers).zip(before) {
        process.ingest_ticks = fleet::cpu_ticks(server.pid)? - before;
    }
    let database_ingest_ticks = postgres_ticks()?.saturating_sub(database_before);

    orders.send(Order::Stop)?;
    for source in &sources {
        source.close(0u32.into(), b"done");
    }
    Ok(Figures {
        backend,
        processes,
        heartbeat_secs,
        connect_secs,
        fanout_secs,
        ingest_secs,
        database_ingest_ticks,
        agents,
        windows,
        reconnects: (storm_reconnects, reconnects.load(Ordering::Relaxed) - storm_reconnects),
    })
}

/// The CPU time of every `postgres` process on the machine (the bench's cluster: its
/// server and a backend per connection), in clock ticks.
fn postgres_ticks() -> Result<u64> {
    let mut ticks = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "postgres" {
            // A backend that ended meanwhile is no longer counted.
            ticks += fleet::cpu_ticks(pid).unwrap_or(0);
        }
    }
    Ok(ticks)
}

/// Waits until `want` agents sent an event matching `wanted`.
async fn count(
    events: &mut mpsc::UnboundedReceiver<Event>,
    want: usize,
    wanted: impl Fn(&Event) -> bool,
    what: &str,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + PHASE_LIMIT;
    let mut seen = 0;
    while seen < want {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .with_context(|| format!("only {seen} of {want} agents: {what}"))?
            .context("every agent stopped")?;
        if wanted(&event) {
            seen += 1;
        }
    }
    Ok(())
}

/// An agent as the control plane sees one: its own certificate and connection, a hello
/// naming the version it holds, a report every heartbeat, and the documents it is sent. A
/// lost session is opened again after a backoff with jitter, as agents do (the control
/// plane closes a connection that opens no session stream within 10 s, which happens in
/// the storm when this process falls behind); what it reports survives the reconnection,
/// so each event is sent once.
struct SimulatedAgent {
    endpoint: quinn::Endpoint,
    control: SocketAddr,
    config: quinn::ClientConfig,
    manifest: Sha256,
    window: Arc<MetricsWindow>,
    events: mpsc::UnboundedSender<Event>,
    orders: watch::Receiver<Order>,
    seed: u64,
    reconnects: Arc<AtomicUsize>,
    /// Whether its first document came.
    connected: bool,
    /// The newest version of the model a document named.
    newest: u64,
    /// The window sent and not yet acknowledged (sent again on a new session).
    unacknowledged: Option<u64>,
    /// The sequence numbers still to send after it.
    next: std::ops::Range<u64>,
}

impl SimulatedAgent {
    async fn run(mut self) {
        let mut rng = SeededRng::new(self.seed);
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.session().await {
                Ok(()) => return,
                Err(_) if *self.orders.borrow() == Order::Stop => return,
                Err(_) => {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff.mul_f64(0.5 + rng.uniform())).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One session, until the bench says stop (`Ok`) or the connection is lost.
    async fn session(&mut self) -> Result<()> {
        let conn =
            self.endpoint.connect_with(self.config.clone(), self.control, SERVER_NAME)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let state = ActualState {
            desired_version: None,
            bundles: vec![HeldBundle {
                name: MODEL.into(),
                version: 1,
                manifest_sha256: self.manifest,
                active: true,
                managed: true,
                engine: None,
            }],
            ready: true,
            ..ActualState::default()
        };
        write_frame(&mut send, &AgentMessage::Hello(state.clone())).await?;
        if let Some(seq) = self.unacknowledged {
            self.send_window(&mut send, seq).await?;
        }
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => write_frame(&mut send, &AgentMessage::Report(state.clone())).await?,
                changed = self.orders.changed() => {
                    changed?;
                    let order = self.orders.borrow_and_update().clone();
                    match order {
                        Order::SendWindows(mut seqs) => {
                            if let Some(seq) = seqs.next() {
                                self.next = seqs;
                                self.unacknowledged = Some(seq);
                                self.send_window(&mut send, seq).await?;
                            }
                        }
                        Order::Stop => return Ok(()),
                        Order::Idle => {}
                    }
                }
                message = read_frame::<ControlMessage>(&mut recv) => match message? {
                    None => bail!("the control plane closed the session"),
                    Some(ControlMessage::Desired(signed)) => {
                        let doc: DesiredState = serde_json::from_slice(&signed.document)?;
                        if !std::mem::replace(&mut self.connected, true) {
                            self.events.send(Event::Connected)?;
                        }
                        let named = doc.bundles.iter().filter(|b| b.name == MODEL).map(|b| b.version).max();
                        if let Some(v) = named.filter(|v| *v > self.newest) {
                            self.newest = v;
                            self.events.send(Event::Desired(v))?;
                        }
                    }
                    Some(ControlMessage::Ack { .. }) => {
                        if self.unacknowledged.take().is_some() {
                            if let Some(seq) = self.next.next() {
                                self.unacknowledged = Some(seq);
                                self.send_window(&mut send, seq).await?;
                            } else {
                                self.events.send(Event::Acked)?;
                            }
                        }
                    }
                    Some(_) => {}
                },
            }
        }
    }

    async fn send_window(&self, send: &mut quinn::SendStream, seq: u64) -> Result<()> {
        let batch = vec![SequencedWindow { seq, window: (*self.window).clone() }];
        write_frame(send, &AgentMessage::Windows(batch)).await?;
        Ok(())
    }
}

/// A window of the model as an agent sends one every 10 s: 200 requests, latencies, and
/// 10-bin histograms of one input and one output.
fn window() -> MetricsWindow {
    let mut latency = LatencySketch::default();
    for i in 0..200 {
        latency.record(40.0 + f64::from(i % 17));
    }
    let bins: Vec<u64> = (0..10).map(|b| (b * 7 % 13) as u64).collect();
    let now = Timestamp::from_system(SystemTime::now()).unix();
    MetricsWindow {
        model: MODEL.into(),
        version: 1,
        start: Timestamp::from_unix(now - now % 10 - 60),
        seconds: 10,
        counts: Counts {
            requests: 200,
            rows: 200,
            latency,
            inputs: vec![bins.clone()],
            outputs: vec![bins],
            ..Counts::default()
        },
    }
}

/// Copies directory `from` (files only, one level) to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

fn print_figures(agents: usize, seconds: u64, enroll_secs: f64, figures: &[Figures]) {
    println!("Scale-out: {agents} simulated agents (heartbeat 10 s)");
    println!();
    println!("Enrollment of {agents} agents, 16 at a time (SQLite): {enroll_secs:.1} s");
    println!();
    println!(
        "| backend | process | agents | connect storm s | heartbeat CPU (% of a core, {seconds} s) | RSS before MiB | RSS with agents MiB | KiB per agent | fan-out s | window ingest /s | ingest CPU µs per window |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for f in figures {
        for (k, p) in f.processes.iter().enumerate() {
            let seconds = |ticks: u64| ticks as f64 / fleet::TICKS_PER_SECOND;
            println!(
                "| {} | {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} |",
                f.backend,
                k + 1,
                p.agents,
                f.connect_secs,
                seconds(p.heartbeat_ticks) / f.heartbeat_secs * 100.0,
                p.rss_empty as f64 / 1024.0,
                p.rss as f64 / 1024.0,
                p.rss.saturating_sub(p.rss_empty) as f64 / p.agents as f64,
                f.fanout_secs,
                (f.agents as u64 * f.windows) as f64 / f.ingest_secs,
                seconds(p.ingest_ticks) * 1e6 / (p.agents as u64 * f.windows) as f64,
            );
        }
    }
    println!();
    for f in figures {
        let (storm, after) = f.reconnects;
        println!("{}: {storm} sessions opened again during the storm, {after} after it", f.backend);
        if f.database_ingest_ticks > 0 {
            println!(
                "{}: PostgreSQL's processes used {:.0} µs of CPU per window over the ingest",
                f.backend,
                f.database_ingest_ticks as f64 / fleet::TICKS_PER_SECOND * 1e6
                    / (f.agents as u64 * f.windows) as f64
            );
        }
    }
}
