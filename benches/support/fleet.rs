//! What the fleet benchmarks (`fleet`, `scale`) share: their arguments, seeded noise, a
//! signed bundle with a payload of the bench's choosing, the control plane as its own process (the `falaj` binary the bench
//! was built with), and the process figures read from `/proc`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use falaj_common::bundle::{BundleBuilder, Content, ModelFormat, ModelSpec, RuntimeHint};
use falaj_common::random::SeededRng;
use falaj_common::tensor::{DataType, Dim, Signature, TensorSpec};
use falaj_common::time::Timestamp;
use falaj_control::client::AdminClient;

/// The value after `--name` in `args`, else `default`.
pub fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `len` bytes of seeded noise (nothing in it repeats, so nothing deduplicates).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SeededRng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&rng.uniform().to_bits().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A signed bundle of `region` whose payload is `payload` (the transfer does not look
/// inside; a fake model file keeps the benchmarks about moving bytes and documents).
pub fn write_bundle(
    keys: &Path,
    out: &Path,
    (name, version): (&str, u64),
    region: &str,
    payload: Vec<u8>,
) -> Result<u64> {
    let trust = falaj_control::keys::load_trust(keys, SystemTime::now())?;
    let signers = falaj_control::keys::load_signing_keys(
        &falaj_control::vault::Vault::open(keys, None)?,
        &trust,
    )?;
    let now = Timestamp::from_system(SystemTime::now());
    let spec = TensorSpec {
        name: "x".into(),
        datatype: DataType::Fp32,
        shape: vec![Dim::Symbol("N".into())],
    };
    let content = Content::Model(ModelSpec {
        file: "model.onnx".into(),
        format: ModelFormat::Onnx,
        runtime: RuntimeHint::Auto,
        signature: Signature { inputs: vec![spec.clone()], outputs: vec![spec] },
        reference: None,
        features: None,
        lineage: None,
        shapes: std::collections::BTreeMap::new(),
    });
    let refs: Vec<_> = signers.iter().collect();
    let (_, bytes) = BundleBuilder::new(
        name,
        version,
        region,
        now,
        now.saturating_add(Duration::from_secs(3600)),
        content,
    )
    .file("model.onnx", payload)
    .build(&refs)?;
    std::fs::write(out, &bytes)?;
    Ok(bytes.len() as u64)
}

/// `falaj control serve` as its own process, started by [`ControlServer::start`] and
/// killed when dropped.
pub struct ControlServer {
    child: Child,
    /// Its process id, for [`rss_kib`] and [`cpu_ticks`].
    pub pid: u32,
    /// Its admin API, with the bootstrap token of its data directory.
    pub client: AdminClient,
    /// Where agents connect.
    pub quic: std::net::SocketAddr,
}

impl ControlServer {
    /// Starts `falaj control serve --data-dir DATA` on free loopback ports for `region`,
    /// with `extra` arguments; returns once both addresses are printed.
    pub fn start(data: &Path, region: &str, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_falaj"))
            .args(["control", "serve", "--data-dir", &data.display().to_string()])
            .args(["--quic", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--region", region])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting falaj control serve")?;
        let pid = child.id();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
            child.stdout.take().context("stdout")?,
        ));
        let mut line = |what: &str| -> Result<String> {
            lines
                .find(|l| l.as_ref().is_ok_and(|l| l.contains(what)))
                .with_context(|| format!("the control plane exited before printing {what:?}"))?
                .map_err(Into::into)
        };
        let admin_line = line("admin API on")?;
        let quic_line = line("agents connect to")?;
        let admin = admin_line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .context("admin url")?
            .to_owned();
        let quic = quic_line.split_whitespace().nth(3).context("quic addr")?.parse()?;
        let token = std::fs::read_to_string(data.join("admin.token"))?.trim().to_owned();
        Ok(Self { child, pid, client: AdminClient::new(&admin, &token), quic })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resident set of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// The CPU time process `pid` has used (user and system), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Clock ticks a second (`USER_HZ`, 100 on Linux).
pub const TICKS_PER_SECOND: f64 = 100.0;
