//! Running the real `falaj` binary: one-shot commands and long-running servers whose
//! address is read from their first line of output.

#![allow(dead_code)] // each test file uses a different part

pub mod disk;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The binary under test.
pub const FALAJ: &str = env!("CARGO_BIN_EXE_falaj");

/// Runs `falaj ARGS...` to completion.
pub fn falaj(args: &[&str]) -> Output {
    Command::new(FALAJ).args(args).env("RUST_LOG", "warn").output().expect("falaj runs")
}

/// Runs `falaj ARGS...` to completion on the blocking pool, for async tests.
pub async fn falaj_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        falaj(&args)
    })
    .await
    .expect("the command's task runs")
}

/// Runs `falaj ARGS...` and requires success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = falaj(args);
    assert!(
        out.status.success(),
        "falaj {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `falaj ARGS...`, requires the exit code `code`; returns stderr.
pub fn fails(args: &[&str], code: i32) -> String {
    let out = falaj(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "falaj {args:?}: stderr: {stderr}");
    stderr
}

/// A child process killed on drop, with its stdout lines arriving on a channel.
pub struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Process {
    /// Starts `falaj ARGS...`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Starts `falaj ARGS...` with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(args, env, false, None)
    }

    /// [`Self::start_with_env`], with the lines of stderr (its log) arriving among those
    /// of stdout, for [`Self::wait_for`].
    pub fn start_logging(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(args, env, true, None)
    }

    /// [`Self::start_logging`], with `input` written to its standard input, then closed
    /// (a passphrase typed at start).
    pub fn start_logging_with_input(args: &[&str], env: &[(&str, &str)], input: &str) -> Self {
        Self::spawn(args, env, true, Some(input))
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], log: bool, input: Option<&str>) -> Self {
        let mut child = Command::new(FALAJ)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::inherit() })
            .stdout(Stdio::piped())
            .stderr(if log { Stdio::piped() } else { Stdio::inherit() })
            .spawn()
            .expect("falaj starts");
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            use std::io::Write as _;
            stdin.write_all(input.as_bytes()).expect("falaj reads its standard input");
        }
        let (tx, lines) = mpsc::channel();
        let forward = |out: Box<dyn std::io::Read + Send>, tx: mpsc::Sender<String>| {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        };
        forward(Box::new(child.stdout.take().unwrap()), tx.clone());
        if let Some(stderr) = child.stderr.take() {
            forward(Box::new(stderr), tx);
        }
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits (up to two minutes) for a line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line with {needle:?} ({e}); output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// A line containing `needle`, among those already read or else waited for: for a
    /// line on one stream while another stream's line was waited for first (the two are
    /// read by threads of their own, so either may be read first).
    pub fn saw_or_wait_for(&mut self, needle: &str) -> String {
        match self.seen.iter().find(|l| l.contains(needle)) {
            Some(line) => line.clone(),
            None => self.wait_for(needle),
        }
    }

    /// Waits for the `http://ADDR` that the process prints when serving.
    pub fn wait_for_addr(&mut self, needle: &str) -> SocketAddr {
        let line = self.wait_for(needle);
        let start = line.find("http://").expect("an http:// address") + "http://".len();
        let addr = line[start..].split_whitespace().next().unwrap();
        addr.trim_end_matches('/').parse().expect("an address")
    }

    /// Waits (up to `limit`) for the process to end on its own; returns how it ended. The
    /// end is seen as its output pipes closing (the forwarding threads then drop their
    /// senders), after which reaping it does not block.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return self.child.wait().expect("the process is ours");
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "the process did not end within {limit:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends SIGTERM and waits for the exit; returns how it ended.
    pub fn terminate_status(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .expect("sh runs");
        assert!(status.success());
        self.child.wait().expect("the process ends")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let status = Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .expect("sh runs");
        assert!(status.success());
        let status = self.child.wait().expect("the process ends");
        status.code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes keys, the sample model and a signed bundle of it in `dir`; returns the bundle.
pub fn sample_bundle(dir: &Path, region: &str, version: u64) -> std::path::PathBuf {
    let keys = dir.join("keys");
    if !keys.join("root.json").exists() {
        ok(&["control", "keys", "init", "--dir", keys.to_str().unwrap(), "--region", region]);
    }
    let sample = dir.join("sample");
    if !sample.join("model.onnx").exists() {
        ok(&["control", "sample", "--out", sample.to_str().unwrap(), "--rows", "4000"]);
    }
    let out = dir.join(format!("sensor-fault-{version}.falaj"));
    ok(&[
        "control",
        "bundle",
        "build",
        "--keys",
        keys.to_str().unwrap(),
        "--model",
        sample.join("model.onnx").to_str().unwrap(),
        "--name",
        "sensor-fault",
        "--version",
        &version.to_string(),
        "--reference",
        sample.join("reference.csv").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    out
}

/// `falaj agent init` in `agent` for `region`, pinning `root`; returns its output.
pub fn init_agent(agent: &Path, region: &str, root: &Path) -> String {
    ok(&["agent", "init", "--data-dir", s(agent), "--region", region, "--trust", s(root)])
}

/// `dir` as a `&str`, for command lines.
pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `falaj control serve` as a process, and how to reach it.
pub struct ControlProcess {
    pub process: Process,
    /// Its data directory.
    pub data: std::path::PathBuf,
    /// Its admin API's URL.
    pub url: String,
    /// Where agents connect (QUIC).
    pub quic: String,
}

impl ControlProcess {
    /// Starts a control plane of region `eu-west-1` in `data`, agents on `quic`, with
    /// `extra` arguments; returns once both addresses are printed.
    pub fn start(data: &Path, quic: &str, extra: &[&str]) -> Self {
        Self::start_with_env(data, quic, extra, &[])
    }

    /// [`Self::start`] with extra environment variables.
    pub fn start_with_env(data: &Path, quic: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        // In the PostgreSQL pass, a database of its own unless the test chose one.
        let chose = extra.iter().any(|a| *a == "--config" || *a == "--database");
        let database = crate::database::postgres_for(data).filter(|_| !chose);
        Self::launch(data, quic, extra, env, database.as_deref())
    }

    /// [`Self::start_with_env`] on SQLite in `data` in every pass: for the tests of the
    /// data directory's own files (its database on a full or read-only disk, a feature
    /// ingest killed between its writes to `features.db`).
    pub fn start_on_sqlite(data: &Path, quic: &str, env: &[(&str, &str)]) -> Self {
        Self::launch(data, quic, &[], env, None)
    }

    fn launch(
        data: &Path,
        quic: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        database: Option<&str>,
    ) -> Self {
        let mut args = vec![
            "control",
            "serve",
            "--data-dir",
            s(data),
            "--quic",
            quic,
            "--admin",
            "127.0.0.1:0",
            "--region",
            "eu-west-1",
        ];
        args.extend_from_slice(extra);
        if let Some(url) = database {
            args.extend(["--database", url]);
        }
        let mut process = Process::start_with_env(&args, env);
        let line = process.wait_for("admin API on");
        let url = line[line.find("http://").unwrap()..].split_whitespace().next().unwrap().into();
        let quic =
            process.wait_for("agents connect to").split_whitespace().nth(3).unwrap().to_owned();
        Self { process, data: data.to_owned(), url, quic }
    }

    /// `ARGS... --control-plane URL --data-dir DATA`, as arguments.
    pub fn args(&self, args: &[&str]) -> Vec<String> {
        let mut full: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        full.extend(["--control-plane".into(), self.url.clone()]);
        full.extend(["--data-dir".into(), s(&self.data).into()]);
        full
    }

    /// Runs `falaj ARGS...` against it and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        ok(&self.args(args).iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Runs `falaj ARGS...` against it, requires the exit code `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        fails(&self.args(args).iter().map(String::as_str).collect::<Vec<_>>(), code)
    }

    /// The agents its fleet view (`control agents`) shows connected and running
    /// `target` (`MODEL@VERSION`). An agent serves a version before its report of it
    /// reaches the control plane: wait for this rather than read it once.
    pub fn agents_running(&self, target: &str) -> usize {
        let fleet = self.ok(&["control", "agents"]);
        fleet.lines().filter(|l| l.contains("connected") && l.contains(target)).count()
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code.
    pub fn terminate(self) -> Option<i32> {
        self.process.terminate()
    }
}

/// The version of `model` the agent at `http` serves, if any.
pub async fn active(http: SocketAddr, model: &str) -> Option<u64> {
    let meta: serde_json::Value =
        reqwest::get(format!("http://{http}/v2/models/{model}")).await.ok()?.json().await.ok()?;
    meta["parameters"]["active_version"].as_str()?.parse().ok()
}

/// One inference of one row on the sample model served as `model` at `http`; the version
/// that answered, `None` on any failure.
pub async fn infer(http: SocketAddr, model: &str) -> Option<u64> {
    let body = serde_json::json!({"inputs": [{"name": "sensors", "shape": [1, 8], "datatype": "FP32",
        "data": [65.0, 3.0, 6.0, 12.0, 1500.0, 50.0, 400.0, 70.0]}]});
    let response = reqwest::Client::new()
        .post(format!("http://{http}/v2/models/{model}/infer"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body["model_version"].as_str()?.parse().ok()
}

/// Copies the directory `from` to `to`, modes included (key files are 0600).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::metadata(from).unwrap().permissions()).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Builds the sample model (in `work`) as `model@version` with `control`'s keys and pushes
/// it.
pub fn push_sample(control: &ControlProcess, work: &Path, model: &str, version: u64) {
    let sample = work.join("sample");
    if !sample.join("model.onnx").exists() {
        ok(&["control", "sample", "--out", s(&sample), "--rows", "2000"]);
    }
    let out = work.join(format!("{model}-{version}.falaj"));
    ok(&[
        "control",
        "bundle",
        "build",
        "--keys",
        s(&control.data.join("keys")),
        "--model",
        s(&sample.join("model.onnx")),
        "--name",
        model,
        "--version",
        &version.to_string(),
        "--out",
        s(&out),
    ]);
    let pushed = control.ok(&["control", "bundle", "push", s(&out)]);
    assert!(pushed.contains(&format!("registered {model}@{version}")), "{pushed}");
}

/// Enrolls an agent of group `edge` in `dir` with `addresses` (a token from `control`) and
/// starts it, reporting every 500 ms; returns it and its HTTP address.
pub fn enroll_and_serve(
    control: &ControlProcess,
    dir: &Path,
    addresses: &str,
) -> (Process, SocketAddr) {
    let token = control.ok(&["control", "token", "create", "--group", "edge", "--ttl", "10m"]);
    let enrolled = ok(&[
        "agent",
        "enroll",
        "--control-plane",
        addresses,
        "--token",
        token.trim(),
        "--data-dir",
        s(dir),
    ]);
    let shown = addresses.replace(',', ", ");
    assert!(enrolled.contains(&format!("with the control plane at {shown}")), "{enrolled}");
    let mut agent = Process::start(&[
        "agent",
        "serve",
        "--data-dir",
        s(dir),
        "--http",
        "127.0.0.1:0",
        "--heartbeat",
        "500ms",
    ]);
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    let line = agent.wait_for("syncing with the control plane at");
    assert!(line.contains(&shown), "the stored list: {line}");
    (agent, http)
}

/// The sum of every sample of `metric` the agent exposes.
pub async fn prometheus_sum(url: &str, metric: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
