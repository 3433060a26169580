//! Fleet benchmarks for the control plane:
//!
//! - `fanout [--agents 20] [--mib 200]`: one bundle to N agents over QUIC on loopback,
//!   aggregate MB/s, beside nginx (Debian's package) serving the same file over HTTPS to
//!   N curl clients in the same run.
//! - `delta [--mib 200]`: bytes moved for a version that changes only the last layer of a
//!   model, as a fraction of the bundle.
//!
//! `cargo bench --bench fleet -- fanout` (and so on); prints Markdown for BENCHMARKS.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use falaj_agent::enroll::{self, EnrollOptions};
use falaj_agent::sync::{SyncConfig, Syncer};
use falaj_common::bundle::RuntimeHint;
use falaj_common::desired::{DesiredBundle, DesiredState};
use falaj_common::protocol::ControlMessage;
use falaj_common::random::SeededRng;
use falaj_common::tensor::{DataType, Dim};
use falaj_control::client::AdminClient;
use falaj_control::daemon::{ControlPlane, ServeConfig};

#[path = "support/fleet.rs"]
#[expect(dead_code, reason = "the control plane as a process is for the scale bench")]
mod fleet;

const GROUP: &str = "bench";
const REGION: &str = "bench-1";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let which =
        args.iter().skip(1).find(|a| !a.starts_with('-') && a.as_str() != "--bench").cloned();
    match which.as_deref() {
        Some("fanout") => runtime
            .block_on(fanout(fleet::arg(&args, "--agents", 20), fleet::arg(&args, "--mib", 200))),
        Some("delta") => runtime.block_on(delta(fleet::arg(&args, "--mib", 200))),
        _ => bail!("usage: cargo bench --bench fleet -- fanout|delta [options]"),
    }
}

/// A control plane in this process.
struct Control {
    client: AdminClient,
    quic: SocketAddr,
    keys: PathBuf,
}

async fn start_control(dir: &Path) -> Result<Control> {
    let mut config = ServeConfig::new(&dir.join("control"));
    config.quic = "127.0.0.1:0".parse()?;
    config.admin = "127.0.0.1:0".parse()?;
    config.region = Some(REGION.into());
    let cp = ControlPlane::start(config).await?;
    let client = AdminClient::new(&format!("http://{}", cp.admin_addr()), cp.admin_token());
    let quic = cp.quic_addr();
    tokio::spawn(cp.run(std::future::pending()));
    Ok(Control { client, quic, keys: dir.join("control/keys") })
}

/// Enrolls an agent in `dir` and opens a session; returns it with the desired bundle.
async fn enrolled_session(
    control: &Control,
    dir: &Path,
) -> Result<(falaj_agent::sync::OpenSession, Option<DesiredBundle>)> {
    let token = control.client.create_token(GROUP, 600).await?.token;
    let options = EnrollOptions {
        control_plane: control.quic.to_string(),
        token,
        hostname: "bench".into(),
        region: None,
    };
    enroll::enroll(dir, &options, SystemTime::now()).await?;
    let syncer =
        Syncer::open(dir.to_owned(), Arc::default(), SyncConfig::default())?.context("enrolled")?;
    let session = syncer.open_fetcher().await?;
    let ControlMessage::Desired(signed) = &session.first else { bail!("no desired state") };
    let doc: DesiredState = serde_json::from_slice(&signed.document)?;
    Ok((session, doc.bundles.into_iter().next()))
}

async fn fanout(agents: usize, mib: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let control = start_control(dir.path()).await?;
    let bundle = dir.path().join("bundle.falaj");
    let size = fleet::write_bundle(
        &control.keys,
        &bundle,
        ("fanout", 1),
        REGION,
        fleet::noise(mib << 20, 7),
    )?;
    control.client.push_bundle(&bundle).await?;
    control.client.deploy(GROUP, "fanout", 1).await?;
    let mut sessions = Vec::new();
    for i in 0..agents {
        sessions.push(enrolled_session(&control, &dir.path().join(format!("agent-{i}"))).await?);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (session, want) in sessions {
        let want = want.context("the bundle is deployed")?;
        tasks.spawn(async move {
            let stats = session.fetcher.download(&want).await;
            drop(session);
            stats
        });
    }
    let mut moved = 0u64;
    while let Some(done) = tasks.join_next().await {
        moved += done??.1.fetched_bytes;
    }
    let quic_secs = started.elapsed().as_secs_f64();
    let nginx = nginx_fanout(&bundle, agents, dir.path());
    println!(
        "Fan-out of one {:.1} MiB bundle to {agents} agents on loopback",
        size as f64 / f64::from(1 << 20)
    );
    println!();
    println!("| transport | clients | seconds | aggregate MB/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| Falaj QUIC + mutual TLS (chunks written to disk) | {agents} | {quic_secs:.2} | {:.0} |",
        moved as f64 / quic_secs / 1e6
    );
    match nginx {
        Ok(secs) => {
            println!(
                "| nginx HTTPS (TLS 1.3, HTTP/1.1) + curl (written to disk) | {agents} | {secs:.2} | {:.0} |",
                (size * agents as u64) as f64 / secs / 1e6
            );
            println!();
            println!(
                "ratio Falaj / nginx: {:.2}",
                ((moved as f64) / quic_secs) / ((size * agents as u64) as f64 / secs)
            );
        }
        Err(err) => println!("| nginx | skipped: {err:#} | | |"),
    }
    Ok(())
}

/// Serves `file` with nginx over HTTPS and downloads it with `clients` curl processes at
/// once; returns the seconds until the last finished.
fn nginx_fanout(file: &Path, clients: usize, work: &Path) -> Result<f64> {
    let root = work.join("nginx");
    std::fs::create_dir_all(root.join("www"))?;
    std::fs::copy(file, root.join("www/bundle.falaj"))?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
    std::fs::write(root.join("cert.pem"), cert.pem())?;
    std::fs::write(root.join("key.pem"), key.serialize_pem())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let conf = format!(
        "worker_processes 2;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  client_body_temp_path {root}/tmp;\n  proxy_temp_path {root}/tmp;\n  fastcgi_temp_path {root}/tmp;\n  uwsgi_temp_path {root}/tmp;\n  scgi_temp_path {root}/tmp;\n\
           server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {root}/cert.pem;\n    ssl_certificate_key {root}/key.pem;\n    ssl_protocols TLSv1.3;\n    root {root}/www;\n  }}\n}}\n",
        root = root.display()
    );
    std::fs::write(root.join("nginx.conf"), conf)?;
    let status = Command::new("nginx")
        .args(["-c", &root.join("nginx.conf").display().to_string()])
        .status()
        .context("running nginx")?;
    anyhow::ensure!(status.success(), "nginx did not start");
    let started = Instant::now();
    let children: Vec<_> = (0..clients)
        .map(|i| {
            Command::new("curl")
                .args([
                    "-sk",
                    "--http1.1",
                    "-o",
                    &root.join(format!("got-{i}")).display().to_string(),
                ])
                .arg(format!("https://127.0.0.1:{port}/bundle.falaj"))
                .stdout(Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .context("running curl")?;
    for mut child in children {
        anyhow::ensure!(child.wait()?.success(), "curl failed");
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = Command::new("nginx")
        .args(["-c", &root.join("nginx.conf").display().to_string(), "-s", "stop"])
        .status();
    Ok(secs)
}

async fn delta(mib: usize) -> Result<()> {
    use falaj_common::onnx::{Attr, GraphBuilder};
    let dir = tempfile::tempdir()?;
    let control = start_control(dir.path()).await?;
    // A real model: [N, 256] -> Gemm (the body, `mib` MiB) -> Relu -> Gemm (the head).
    let hidden = (mib << 20) / 4 / 256;
    let write_model = |path: &Path, head_seed: u64| -> Result<()> {
        let mut body = SeededRng::new(1);
        let mut head = SeededRng::new(head_seed);
        let w1: Vec<f32> = (0..256 * hidden).map(|_| body.normal(0.0, 0.05) as f32).collect();
        let w2: Vec<f32> = (0..hidden * 10).map(|_| head.normal(0.0, 0.05) as f32).collect();
        let n = || Dim::Symbol("N".into());
        let mut g = GraphBuilder::new("layered");
        g.input("x", DataType::Fp32, &[n(), Dim::Fixed(256)])
            .weights("w1", &[hidden, 256], &w1)
            .weights("b1", &[hidden], &vec![0.0; hidden])
            .node("Gemm", &["x", "w1", "b1"], &["h"], vec![Attr::Int("transB", 1)])
            .node("Relu", &["h"], &["r"], vec![])
            .weights("w2", &[10, hidden], &w2)
            .weights("b2", &[10], &[0.0; 10])
            .node("Gemm", &["r", "w2", "b2"], &["y"], vec![Attr::Int("transB", 1)])
            .output("y", DataType::Fp32, &[n(), Dim::Fixed(10)]);
        std::fs::write(path, g.encode("bench"))?;
        Ok(())
    };
    let mut sizes = Vec::new();
    for version in [1u64, 2] {
        let model = dir.path().join(format!("m{version}.onnx"));
        write_model(&model, version)?;
        let out = dir.path().join(format!("layered-{version}.falaj"));
        let options = falaj_control::bundle::BuildOptions {
            keys: control.keys.clone(),
            model,
            name: "layered".into(),
            version,
            reference: None,
            runtime: RuntimeHint::Cpu,
            lifetime: Duration::from_secs(3600),
            out: out.clone(),
            features: None,
            shapes: std::collections::BTreeMap::new(),
        };
        falaj_control::bundle::build(&options, SystemTime::now())?;
        control.client.push_bundle(&out).await?;
        sizes.push(std::fs::metadata(&out)?.len());
    }
    control.client.deploy(GROUP, "layered", 1).await?;
    let agent = dir.path().join("agent");
    let (session, want) = enrolled_session(&control, &agent).await?;
    let first = session.fetcher.install(&want.context("v1 deployed")?, SystemTime::now()).await?;
    drop(session);
    control.client.deploy(GROUP, "layered", 2).await?;
    let syncer = Syncer::open(agent, Arc::default(), SyncConfig::default())?.context("enrolled")?;
    let session = syncer.open_fetcher().await?;
    let ControlMessage::Desired(signed) = &session.first else { bail!("no desired state") };
    let doc: DesiredState = serde_json::from_slice(&signed.document)?;
    let want = doc.bundles.into_iter().find(|b| b.version == 2).context("v2 deployed")?;
    let second = session.fetcher.install(&want, SystemTime::now()).await?;
    println!(
        "Delta: a version that changes only the last layer ({hidden} x 10 head) of a {mib} MiB model"
    );
    println!();
    println!("| version | bundle bytes | chunks | fetched chunks | fetched bytes | fraction |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (v, (stats, size)) in [(1, (first, sizes[0])), (2, (second, sizes[1]))] {
        println!(
            "| {v} | {size} | {} | {} | {} | {:.2}% |",
            stats.chunks,
            stats.fetched,
            stats.fetched_bytes,
            stats.fetched_bytes as f64 * 100.0 / size as f64
        );
    }
    Ok(())
}
