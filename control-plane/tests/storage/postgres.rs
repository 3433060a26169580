//! A real PostgreSQL for tests: a cluster made with the installed `initdb` in a temporary
//! directory, listening on loopback on a free port and on a unix socket in that directory,
//! with TLS (a certificate from a CA made here), stopped and removed when dropped.
//!
//! PostgreSQL refuses to run as root: as root the directory is handed to the `postgres`
//! user and the server's programs run through `runuser -u postgres --`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// Where Debian puts PostgreSQL's server programs (one directory per major version).
const DEBIAN: &str = "/usr/lib/postgresql";

/// The directory holding `initdb` and `pg_ctl`, or why there is none.
pub fn binaries() -> Result<PathBuf, String> {
    let has = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("FALAJ_POSTGRES_BIN").map(PathBuf::from) {
        return if has(&dir) {
            Ok(dir)
        } else {
            Err(format!("FALAJ_POSTGRES_BIN={} holds no initdb and pg_ctl", dir.display()))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, dir)| has(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|dir| has(dir))
        .ok_or_else(|| {
            "PostgreSQL's server is not installed (apt-get install -y postgresql)".to_owned()
        })
}

/// What tests run with: nothing is synced to disk (a test's database lives as long as it).
const TEST_SETTINGS: &str = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off";

/// The role whose logins need a password; the cluster trusts every other.
pub const PASSWORD_ROLE: &str = "with_password";

/// A running cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some("postgres")` when the server's programs must run as that user.
    run_as: Option<&'static str>,
    databases: AtomicU32,
}

impl Cluster {
    /// Makes and starts a cluster with the programs in `bin`.
    pub fn start(bin: &Path) -> Result<Self, String> {
        Self::start_with(bin, TEST_SETTINGS)
    }

    /// A cluster that syncs its commits to disk as PostgreSQL does by default, for
    /// benchmarks (`benches/scale.rs`, which includes this file) that set it beside SQLite
    /// with `synchronous = FULL`.
    #[allow(dead_code, reason = "used by the scale benchmark, not by the tests")]
    pub fn start_durable(bin: &Path) -> Result<Self, String> {
        Self::start_with(bin, "")
    }

    /// Starts a cluster with `settings` (`-c name=value ...`) added to the server's own.
    fn start_with(bin: &Path, settings: &str) -> Result<Self, String> {
        let dir =
            tempfile::Builder::new().prefix("falaj-pg").tempdir().map_err(|e| e.to_string())?;
        let root = output(Command::new("id").arg("-u"))?.trim() == "0";
        let run_as = root.then_some("postgres");
        let data = dir.path().join("data");
        write_certificates(dir.path())?;
        if root {
            let uid: u32 = parse_id(&output(Command::new("id").args(["-u", "postgres"]))?)?;
            let gid: u32 = parse_id(&output(Command::new("id").args(["-g", "postgres"]))?)?;
            for entry in std::fs::read_dir(dir.path()).map_err(|e| e.to_string())?.flatten() {
                std::os::unix::fs::chown(entry.path(), Some(uid), Some(gid))
                    .map_err(|e| e.to_string())?;
            }
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| e.to_string())?;
        }
        let mut cluster =
            Self { dir, bin: bin.to_owned(), port: 0, run_as, databases: AtomicU32::new(0) };
        let data_arg = data.display().to_string();
        cluster.server(
            "initdb",
            &[
                "-D",
                &data_arg,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        // One role must give its password (the rest are trusted): the first line matches it.
        let hba = data.join("pg_hba.conf");
        let trusted = std::fs::read_to_string(&hba).map_err(|e| e.to_string())?;
        std::fs::write(
            &hba,
            format!("host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n{trusted}"),
        )
        .map_err(|e| e.to_string())?;
        cluster.port = free_port()?;
        let socket_dir = cluster.dir.path().display().to_string();
        let options = format!(
            "-p {} -k {socket_dir} -c listen_addresses=127.0.0.1 {settings} \
             -c max_connections=300 -c ssl=on \
             -c ssl_cert_file={socket_dir}/server.crt -c ssl_key_file={socket_dir}/server.key",
            cluster.port
        );
        let log = cluster.dir.path().join("server.log").display().to_string();
        // `-w`: pg_ctl returns once the server accepts connections.
        if let Err(e) =
            cluster.server("pg_ctl", &["-D", &data_arg, "-l", &log, "-o", &options, "-w", "start"])
        {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{e}\nserver log:\n{log}"));
        }
        Ok(cluster)
    }

    /// Runs one of the server's programs (as `postgres` when root).
    fn server(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let path = self.bin.join(program);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        command.args(args).current_dir(self.dir.path());
        output(&mut command)
    }

    /// A URL for a new, empty database of its own (`extra`: more query parameters).
    pub fn database(&self, extra: &str) -> String {
        let name = format!("test_{}", self.databases.fetch_add(1, Ordering::Relaxed));
        self.create_database(&name, "postgres");
        self.url(&name, extra)
    }

    /// The superuser's connection to the `postgres` database.
    fn admin(&self) -> postgres::Client {
        postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
                self.port
            ),
            postgres::NoTls,
        )
        .expect("the test cluster accepts its superuser")
    }

    /// Makes database `name` owned by `owner`.
    pub fn create_database(&self, name: &str, owner: &str) {
        self.create_database_with(name, &format!("OWNER {owner}"));
    }

    /// Makes database `name` with `options` (`CREATE DATABASE`'s own).
    pub fn create_database_with(&self, name: &str, options: &str) {
        self.admin()
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .expect("a database is created");
    }

    /// The superuser's URL of the server, without a database (`postgres://postgres@HOST:PORT`).
    #[allow(dead_code, reason = "tests/external's PostgreSQL pass uses it, these tests do not")]
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// The URL of database `name` over TCP (`extra`: query parameters, `sslmode=disable`
    /// when empty).
    pub fn url(&self, name: &str, extra: &str) -> String {
        let extra = if extra.is_empty() { "sslmode=disable" } else { extra };
        format!("postgres://postgres@127.0.0.1:{}/{name}?{extra}", self.port)
    }

    /// The CA that signed the server's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        if let Err(e) = self.server("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]) {
            eprintln!("stopping the test PostgreSQL failed: {e}");
        }
    }
}

/// A CA (`ca.pem`) and the server's certificate for 127.0.0.1 and localhost signed by it
/// (`server.crt`, `server.key`: the key readable by its owner only, as PostgreSQL demands).
fn write_certificates(dir: &Path) -> Result<(), String> {
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).map_err(e)?;
    let key = KeyPair::generate().map_err(e)?;
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .map_err(e)?
        .signed_by(&key, &issuer)
        .map_err(e)?;
    let write = |name: &str, text: &str, mode: u32| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    write("ca.pem", &ca_cert.pem(), 0o644)?;
    write("server.crt", &server.pem(), 0o644)?;
    write("server.key", &key.serialize_pem(), 0o600)
}

fn output(command: &mut Command) -> Result<String, String> {
    let Output { status, stdout, stderr } =
        command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{command:?}: {status}\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

fn parse_id(text: &str) -> Result<u32, String> {
    text.trim().parse().map_err(|_| format!("not a user id: {text:?}"))
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}
