//! API keys for the agent's inference APIs (REST and gRPC), and the gate every request
//! passes through before it is served.
//!
//! A key is a random secret (`falaj_` and 64 hex digits: 256 bits from ring's system
//! random), shown once by `falaj-agent apikey create` and stored only as its SHA-256 in
//! the agent's database (`api_keys`), with its name, the models it may call (or every
//! model), an optional expiry and, once revoked, when. A request presents it as
//! `Authorization: Bearer SECRET` (REST header or gRPC metadata); its hash is compared in
//! constant time with every live key's.
//!
//! The server keeps the keys in memory and reads them again whenever another connection
//! has committed to the database (SQLite's `data_version`, checked at each request), so a
//! `falaj-agent apikey revoke` run by another process takes effect at the next request,
//! without a restart.
//!
//! Which requests need what (`Access`): health and liveness are open to everyone (load
//! balancers and orchestrators probe them without credentials); a model's endpoints need a
//! key for that model; server metadata and `/metrics` need any valid key; feature lookups
//! and the repository index, which span every model, need a key for every model.
//!
//! A key may also carry a rate its requests may not exceed, and each key's requests are
//! counted by outcome ([`Rate`]; `limits`).

mod limits;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use falaj_common::time::Timestamp;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use thiserror::Error;

pub(crate) use self::limits::Counts;
pub use self::limits::{Per, Rate};
use crate::store::{DB_FILE, Store, StoreError, audit};

/// What every key's secret starts with, so a leaked one is recognisable (secret scanners).
pub const PREFIX: &str = "falaj_";

/// How the inference APIs authenticate clients (`[http] auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No authentication. Unset, this is the default and allowed on loopback addresses
    /// only; set explicitly, the operator accepts it on any address (logged as a warning).
    None,
    /// An API key on every request but health checks.
    ApiKey,
    /// A client certificate signed by `[http] client_ca`, checked in the TLS handshake.
    Mtls,
}

impl std::fmt::Display for AuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::ApiKey => "api_key",
            Self::Mtls => "mtls",
        })
    }
}

/// Which models a key may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every model, and the endpoints that span models.
    All,
    /// These models only.
    Models(BTreeSet<String>),
}

impl Scope {
    fn allows(&self, model: &str) -> bool {
        match self {
            Self::All => true,
            Self::Models(models) => models.contains(model),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all models"),
            Self::Models(models) => {
                f.write_str(&models.iter().map(String::as_str).collect::<Vec<_>>().join(","))
            }
        }
    }
}

/// A key as stored and listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Its name.
    pub name: String,
    /// The models it may call.
    pub scope: Scope,
    /// When it was made.
    pub created: Timestamp,
    /// When it stops working, if ever.
    pub expires: Option<Timestamp>,
    /// When it was revoked.
    pub revoked: Option<Timestamp>,
    /// The rate its requests may not exceed, if any.
    pub rate: Option<Rate>,
}

#[derive(Debug, Clone)]
struct Stored {
    info: KeyInfo,
    sha256: [u8; 32],
}

/// What a request asks to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access<'a> {
    /// One model's metadata, readiness, inference or feedback.
    Model(&'a str),
    /// What any authenticated client may read (server metadata, `/metrics`).
    AnyKey,
    /// What spans every model (feature lookups, the repository index).
    EveryModel,
}

/// Why a request was refused: 401 / UNAUTHENTICATED, 403 / PERMISSION_DENIED or 429 /
/// RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum Denied {
    /// No key, or one that is unknown, revoked or expired.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid key that does not cover what was asked.
    #[error("{0}")]
    Forbidden(String),
    /// A valid key over its rate: no request of it is admitted for `retry_after`.
    #[error("{message}")]
    Throttled {
        /// Which key, its rate and when to come back.
        message: String,
        /// How long until the key's next request would be admitted.
        retry_after: Duration,
    },
}

/// The keys in force: checks presented secrets. No I/O.
#[derive(Debug, Clone, Default)]
pub(crate) struct Keyring {
    keys: Vec<Stored>,
}

impl Keyring {
    /// The live, unexpired key that `authorization` (the header's value) presents at `now`.
    fn find(&self, authorization: Option<&[u8]>, now: Timestamp) -> Result<&KeyInfo, Denied> {
        let Some(value) = authorization else {
            return Err(Denied::Unauthenticated(
                "an API key is required: send it as `Authorization: Bearer KEY`".into(),
            ));
        };
        // The scheme's name is case-insensitive (RFC 9110).
        let secret = value
            .split_at_checked(7)
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|(_, secret)| secret.trim_ascii())
            .ok_or_else(|| {
                Denied::Unauthenticated(
                    "the Authorization header must be `Bearer KEY` with an API key".into(),
                )
            })?;
        let hash = digest(&SHA256, secret);
        // Every key is compared, whichever matches, in constant time.
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.sha256.as_slice().ct_eq(hash.as_ref())) {
                found = Some(&key.info);
            }
        }
        let key = found.ok_or_else(|| Denied::Unauthenticated("unknown API key".into()))?;
        if let Some(at) = key.revoked {
            return Err(Denied::Unauthenticated(format!(
                "API key {} was revoked at {at}",
                key.name
            )));
        }
        if let Some(at) = key.expires.filter(|at| *at <= now) {
            return Err(Denied::Unauthenticated(format!("API key {} expired at {at}", key.name)));
        }
        Ok(key)
    }

    /// Whether `key` covers `access`.
    fn allows(key: &KeyInfo, access: Access<'_>) -> Result<(), Denied> {
        match access {
            Access::AnyKey => Ok(()),
            Access::Model(model) if key.scope.allows(model) => Ok(()),
            Access::Model(model) => Err(Denied::Forbidden(format!(
                "API key {} may not call model {model:?} (it covers {})",
                key.name, key.scope
            ))),
            Access::EveryModel if key.scope == Scope::All => Ok(()),
            Access::EveryModel => Err(Denied::Forbidden(format!(
                "API key {} covers only {}; this endpoint needs a key for every model",
                key.name, key.scope
            ))),
        }
    }
}

/// Why an API key operation failed.
#[derive(Debug, Error)]
pub enum ApiKeyError {
    /// The agent's store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// SQLite failed.
    #[error("API keys in {path}: {source}")]
    Db { path: PathBuf, source: rusqlite::Error },
    /// A name, scope or expiry that is refused.
    #[error("{0}")]
    Invalid(String),
    /// `revoke` of a name that does not exist.
    #[error("no API key named {0:?}")]
    Unknown(String),
    /// The system's random source failed.
    #[error("the system random source failed")]
    Random,
}

/// A key just made: its secret is shown once and never stored.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The key as stored.
    pub info: KeyInfo,
    /// The secret to hand to the client.
    pub secret: String,
}

/// The API keys in an agent's database. Each key made or revoked is an event of the
/// agent's audit log, recorded in the same transaction as the change.
#[derive(Debug)]
pub struct ApiKeys {
    path: PathBuf,
    conn: Connection,
}

fn check_name(name: &str) -> Result<(), ApiKeyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(ApiKeyError::Invalid(format!(
            "API key name {name:?} must be 1 to 64 bytes of lowercase letters, digits, '-', '_' \
             and '.', starting with a letter or digit"
        )))
    }
}

impl ApiKeys {
    /// Opens the keys of the agent in `data_dir` (applying the store's migrations).
    pub fn open(data_dir: &Path) -> Result<Self, ApiKeyError> {
        // Refused unless the agent is initialised there, as any opening of its store.
        drop(Store::open(data_dir)?);
        let path = data_dir.join(DB_FILE);
        // The store's own opening: the same pragmas, and the migrations it has just applied.
        let conn = crate::store::open_db(&path)?;
        Ok(Self { path, conn })
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> ApiKeyError + '_ {
        |source| ApiKeyError::Db { path: self.path.clone(), source }
    }

    /// Makes a key `name` for `scope`, expiring `expires_in` from `now` if given, held to
    /// `rate` if given. A revoked key's name may be used again; a live one's may not.
    pub fn create(
        &self,
        name: &str,
        scope: Scope,
        expires_in: Option<Duration>,
        rate: Option<Rate>,
        now: SystemTime,
    ) -> Result<NewKey, ApiKeyError> {
        check_name(name)?;
        if let Scope::Models(models) = &scope {
            if models.is_empty() {
                return Err(ApiKeyError::Invalid("--models names no model".into()));
            }
            for model in models {
                falaj_common::names::check_model_name(model)
                    .map_err(|e| ApiKeyError::Invalid(e.to_string()))?;
            }
        }
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).map_err(|_| ApiKeyError::Random)?;
        let secret = format!("{PREFIX}{}", hex::encode(bytes));
        let sha256 = digest(&SHA256, secret.as_bytes());
        let created = Timestamp::from_system(now);
        let expires = expires_in.map(|d| created.saturating_add(d));
        let models = match &scope {
            Scope::All => None,
            Scope::Models(m) => Some(serde_json::to_string(m).expect("a list of strings")),
        };
        let tx = self.conn.unchecked_transaction().map_err(self.db())?;
        let live: Option<Option<i64>> = tx
            .query_row("SELECT revoked_at FROM api_keys WHERE name = ?1", [name], |r| r.get(0))
            .optional()
            .map_err(self.db())?;
        if live.is_some_and(|revoked| revoked.is_none()) {
            return Err(ApiKeyError::Invalid(format!(
                "an API key named {name:?} exists; revoke it first or choose another name"
            )));
        }
        tx.execute("DELETE FROM api_keys WHERE name = ?1", [name]).map_err(self.db())?;
        tx.execute(
            "INSERT INTO api_keys (name, secret_sha256, models, created_at, expires_at, rate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                name,
                sha256.as_ref(),
                models,
                created.unix() as i64,
                expires.map(|e| e.unix() as i64),
                rate.map(|r| r.to_string())
            ],
        )
        .map_err(self.db())?;
        let detail = match rate {
            Some(rate) => format!("API key {name} for {scope} at {rate}"),
            None => format!("API key {name} for {scope}"),
        };
        audit::event(&tx, created.unix() as i64, "apikey-create", None, &detail)
            .map_err(self.db())?;
        tx.commit().map_err(self.db())?;
        let info = KeyInfo { name: name.to_owned(), scope, created, expires, revoked: None, rate };
        Ok(NewKey { info, secret })
    }

    /// Revokes key `name` at `now`; requests presenting it are refused from then on.
    pub fn revoke(&self, name: &str, now: SystemTime) -> Result<KeyInfo, ApiKeyError> {
        let at = Timestamp::from_system(now).unix() as i64;
        let tx = self.conn.unchecked_transaction().map_err(self.db())?;
        let changed = tx
            .execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                params![name, at],
            )
            .map_err(self.db())?;
        if changed == 1 {
            audit::event(&tx, at, "apikey-revoke", None, &format!("API key {name}"))
                .map_err(self.db())?;
        }
        tx.commit().map_err(self.db())?;
        let key = self.list()?.into_iter().find(|k| k.name == name);
        match key {
            Some(key) if changed == 1 || key.revoked.is_some() => Ok(key),
            _ => Err(ApiKeyError::Unknown(name.to_owned())),
        }
    }

    /// Every key, by name.
    pub fn list(&self) -> Result<Vec<KeyInfo>, ApiKeyError> {
        Ok(self.stored()?.into_iter().map(|s| s.info).collect())
    }

    fn stored(&self) -> Result<Vec<Stored>, ApiKeyError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT name, secret_sha256, models, created_at, expires_at, revoked_at, rate
                 FROM api_keys ORDER BY name",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(self.db())?;
        let mut keys = Vec::new();
        for row in rows {
            let (name, hash, models, created, expires, revoked, rate) = row.map_err(self.db())?;
            let damaged = |what: &str| {
                ApiKeyError::Invalid(format!("API key {name:?} in {}: {what}", self.path.display()))
            };
            let sha256 = <[u8; 32]>::try_from(hash.as_slice())
                .map_err(|_| damaged("its stored hash is not 32 bytes"))?;
            let scope = match models {
                None => Scope::All,
                Some(text) => Scope::Models(
                    serde_json::from_str(&text)
                        .map_err(|_| damaged("its stored models are not a list of names"))?,
                ),
            };
            let rate = rate
                .map(|r| r.parse().map_err(|e: String| damaged(&format!("its stored {e}"))))
                .transpose()?;
            let at = |secs: i64| Timestamp::from_unix(secs.max(0) as u64);
            let info = KeyInfo {
                name,
                scope,
                created: at(created),
                expires: expires.map(at),
                revoked: revoked.map(at),
                rate,
            };
            keys.push(Stored { info, sha256 });
        }
        Ok(keys)
    }

    fn data_version(&self) -> Result<i64, ApiKeyError> {
        // Prepared once: this runs at every guarded request.
        let mut stmt = self.conn.prepare_cached("PRAGMA data_version").map_err(self.db())?;
        stmt.query_row([], |r| r.get(0)).map_err(self.db())
    }
}

/// The keys a server checks, read again when the database changes.
#[derive(Debug)]
struct LiveKeys {
    keys: ApiKeys,
    version: Option<i64>,
    ring: Keyring,
    per_key: limits::PerKey,
}

/// What a server checks each request against: its authentication mode and, for API keys,
/// the keys in force.
#[derive(Debug)]
pub(crate) struct Gate {
    mode: AuthMode,
    keys: Option<Mutex<LiveKeys>>,
}

impl Gate {
    /// A gate that lets every request through.
    pub(crate) fn open() -> Self {
        Self { mode: AuthMode::None, keys: None }
    }

    /// The gate of `mode` for the agent in `data_dir`.
    pub(crate) fn new(mode: AuthMode, data_dir: &Path) -> Result<Self, ApiKeyError> {
        let keys = match mode {
            AuthMode::ApiKey => {
                let keys = ApiKeys::open(data_dir)?;
                let mut live = LiveKeys {
                    keys,
                    version: None,
                    ring: Keyring::default(),
                    per_key: limits::PerKey::default(),
                };
                refresh(&mut live)?;
                if live.ring.keys.iter().all(|k| k.info.revoked.is_some()) {
                    tracing::warn!(
                        "API keys are required but none is in force: every request but health \
                         checks is refused until `falaj-agent apikey create` makes one"
                    );
                }
                Some(Mutex::new(live))
            }
            AuthMode::None | AuthMode::Mtls => None,
        };
        Ok(Self { mode, keys })
    }

    /// Whether a request with `authorization` may reach `access` now, within its key's
    /// rate; counted for the key. With mutual TLS the handshake has already checked the
    /// client; without authentication all may pass.
    pub(crate) fn check(
        &self,
        authorization: Option<&[u8]>,
        access: Access<'_>,
    ) -> Result<(), Denied> {
        let Some(keys) = &self.keys else { return Ok(()) };
        let mut live = keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = refresh(&mut live) {
            // The keys last read stay in force (a revoked key read before stays revoked).
            tracing::error!(error = %err, "reading the API keys failed");
        }
        let LiveKeys { ring, per_key, .. } = &mut *live;
        let key = ring.find(authorization, Timestamp::from_system(SystemTime::now()))?;
        if let Err(denied) = Keyring::allows(key, access) {
            per_key.forbidden(&key.name);
            return Err(denied);
        }
        per_key.admit(&key.name).map_err(|(rate, retry_after)| Denied::Throttled {
            message: format!(
                "API key {} is over its rate of {rate}: try again in {:.1} s",
                key.name,
                retry_after.as_secs_f64()
            ),
            retry_after,
        })
    }

    /// Each key's requests since the server started, by outcome (none without API keys).
    pub(crate) fn counts(&self) -> Vec<(String, Counts)> {
        let Some(keys) = &self.keys else { return Vec::new() };
        keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner).per_key.counts()
    }

    /// Whether requests are checked at all (for the log).
    pub(crate) fn mode(&self) -> AuthMode {
        self.mode
    }
}

/// Reads the keys again if another connection committed since the last read.
fn refresh(live: &mut LiveKeys) -> Result<(), ApiKeyError> {
    let version = live.keys.data_version()?;
    if live.version != Some(version) {
        let keys = live.keys.stored()?;
        live.per_key.update(keys.iter().map(|k| &k.info));
        live.ring = Keyring { keys };
        live.version = Some(version);
    }
    Ok(())
}

/// Checks that the authentication settings hold together and that nothing is served
/// unauthenticated off loopback unless the operator said so: `auth` unset means no
/// authentication, allowed on loopback addresses only.
pub fn check_settings(
    listen: &[SocketAddr],
    auth: Option<AuthMode>,
    tls: bool,
    client_ca: bool,
) -> Result<(), String> {
    if client_ca && !tls {
        return Err("client_ca needs tls_certificate and tls_key (mutual TLS is TLS)".into());
    }
    match auth {
        Some(AuthMode::Mtls) if !client_ca => {
            Err("auth = \"mtls\" needs client_ca, the CA that signs client certificates".into())
        }
        None | Some(AuthMode::None) if client_ca => {
            Err("client_ca is set: choose auth = \"mtls\" (or \"api_key\" to require both)".into())
        }
        None => match listen.iter().find(|a| !a.ip().is_loopback()) {
            Some(addr) => Err(format!(
                "{addr} is not a loopback address and no authentication is configured: set \
                 auth = \"api_key\" or \"mtls\", or auth = \"none\" to serve it unauthenticated \
                 on purpose"
            )),
            None => Ok(()),
        },
        Some(_) => Ok(()),
    }
}

/// `falaj-agent apikey`: make, list and revoke the inference APIs' API keys.
pub mod cli {
    use std::time::{Duration, SystemTime};

    use clap::{Args, Subcommand};
    use falaj_common::time::Timestamp;

    use super::{ApiKeyError, ApiKeys, Rate, Scope};
    use crate::cli::{DataDir, Failure, store_failure};

    /// `apikey` subcommands.
    #[derive(Debug, Subcommand)]
    pub enum ApiKeyCommand {
        /// Make a key; its secret is printed once, on stdout, and stored only hashed.
        Create(CreateArgs),
        /// List the keys (never their secrets).
        List(DataDir),
        /// Revoke a key: a running agent refuses it from its next request on.
        Revoke(RevokeArgs),
    }

    /// Arguments of `apikey create`.
    #[derive(Debug, Args)]
    pub struct CreateArgs {
        /// The key's name (lowercase letters, digits, '-', '_', '.').
        #[arg(long)]
        name: String,
        /// The models it may call, comma-separated (default: every model).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// How long it works, e.g. `90d` (default: until revoked).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// The most requests it may make: `COUNT/s`, `COUNT/min` or `COUNT/h` on average,
        /// up to COUNT at once (default: no limit). Over it, requests are answered 429
        /// (REST) or RESOURCE_EXHAUSTED (gRPC).
        #[arg(long)]
        rate: Option<Rate>,
        #[command(flatten)]
        data: DataDir,
    }

    /// Arguments of `apikey revoke`.
    #[derive(Debug, Args)]
    pub struct RevokeArgs {
        /// The key's name.
        name: String,
        #[command(flatten)]
        data: DataDir,
    }

    fn failure(err: ApiKeyError) -> Failure {
        match err {
            ApiKeyError::Store(e) => store_failure(e),
            e @ (ApiKeyError::Invalid(_) | ApiKeyError::Unknown(_)) => Failure::Usage(e.into()),
            e => Failure::Other(e.into()),
        }
    }

    /// Runs an `apikey` command.
    pub fn run(command: &ApiKeyCommand) -> Result<(), Failure> {
        let now = SystemTime::now();
        match command {
            ApiKeyCommand::Create(args) => {
                let keys = ApiKeys::open(&args.data.resolve()?).map_err(failure)?;
                let scope = match &args.models {
                    None => Scope::All,
                    Some(models) => {
                        Scope::Models(models.iter().map(|m| m.trim().to_owned()).collect())
                    }
                };
                let made = keys
                    .create(&args.name, scope, args.expires_in, args.rate, now)
                    .map_err(failure)?;
                let expires =
                    made.info.expires.map_or_else(|| "never".to_owned(), |e| e.to_string());
                let rate = made
                    .info
                    .rate
                    .map_or_else(|| "no rate limit".into(), |r| format!("at most {r}"));
                eprintln!(
                    "created API key {} for {}, expires {expires}, {rate}; its secret follows, \
                     shown this once (send it as `Authorization: Bearer KEY`)",
                    made.info.name, made.info.scope
                );
                println!("{}", made.secret);
                Ok(())
            }
            ApiKeyCommand::List(data) => {
                let keys = ApiKeys::open(&data.resolve()?).map_err(failure)?;
                let listed = keys.list().map_err(failure)?;
                if listed.is_empty() {
                    println!("no API keys (make one with `falaj-agent apikey create --name NAME`)");
                    return Ok(());
                }
                let at = Timestamp::from_system(now);
                println!(
                    "{:<24} {:<10} {:<22} {:<22} {:<12} MODELS",
                    "NAME", "STATUS", "CREATED", "EXPIRES", "RATE"
                );
                for key in listed {
                    let status = match (key.revoked, key.expires) {
                        (Some(_), _) => "revoked",
                        (None, Some(e)) if e <= at => "expired",
                        _ => "active",
                    };
                    let expires = key.expires.map_or_else(|| "never".to_owned(), |e| e.to_string());
                    let rate = key.rate.map_or_else(|| "-".to_owned(), |r| r.to_string());
                    println!(
                        "{:<24} {:<10} {:<22} {:<22} {:<12} {}",
                        key.name,
                        status,
                        key.created.to_string(),
                        expires,
                        rate,
                        key.scope
                    );
                }
                Ok(())
            }
            ApiKeyCommand::Revoke(args) => {
                let keys = ApiKeys::open(&args.data.resolve()?).map_err(failure)?;
                let key = keys.revoke(&args.name, now).map_err(failure)?;
                println!(
                    "revoked API key {} (revoked at {}); a running agent refuses it from its next request",
                    key.name,
                    key.revoked.map_or_else(String::new, |r| r.to_string())
                );
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key as the tests write it: name, secret, scope, expiry, revocation (Unix seconds).
    type Row<'a> = (&'a str, &'a str, Scope, Option<u64>, Option<u64>);

    fn ring_of(keys: &[Row<'_>]) -> Keyring {
        Keyring {
            keys: keys
                .iter()
                .map(|(name, secret, scope, expires, revoked)| Stored {
                    info: KeyInfo {
                        name: (*name).to_owned(),
                        scope: scope.clone(),
                        created: Timestamp::from_unix(0),
                        expires: expires.map(Timestamp::from_unix),
                        revoked: revoked.map(Timestamp::from_unix),
                        rate: None,
                    },
                    sha256: digest(&SHA256, secret.as_bytes()).as_ref().try_into().unwrap(),
                })
                .collect(),
        }
    }

    fn models(names: &[&str]) -> Scope {
        Scope::Models(names.iter().map(|&n| n.to_owned()).collect())
    }

    #[test]
    fn each_refusal_has_its_kind_and_reason() {
        let ring = ring_of(&[
            ("all", "s-all", Scope::All, None, None),
            ("ab", "s-ab", models(&["a", "b"]), Some(100), None),
            ("old", "s-old", Scope::All, None, Some(5)),
        ]);
        let now = Timestamp::from_unix(50);
        let check = |auth: Option<&str>, access, at: Timestamp| {
            Keyring::allows(ring.find(auth.map(str::as_bytes), at)?, access)
        };
        let unauthenticated = |r: Result<(), Denied>, needle: &str| match r {
            Err(Denied::Unauthenticated(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("{other:?}"),
        };
        let forbidden = |r: Result<(), Denied>, needle: &str| match r {
            Err(Denied::Forbidden(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("{other:?}"),
        };
        assert_eq!(check(Some("Bearer s-all"), Access::Model("x"), now), Ok(()));
        assert_eq!(check(Some("Bearer s-all"), Access::EveryModel, now), Ok(()));
        assert_eq!(check(Some("bearer  s-ab "), Access::Model("b"), now), Ok(()));
        assert_eq!(check(Some("BEARER s-ab"), Access::Model("b"), now), Ok(()));
        assert_eq!(check(Some("Bearer s-ab"), Access::AnyKey, now), Ok(()));
        unauthenticated(check(None, Access::AnyKey, now), "Authorization: Bearer");
        unauthenticated(check(Some("Basic s-all"), Access::AnyKey, now), "must be `Bearer");
        unauthenticated(check(Some("Bearer s-none"), Access::AnyKey, now), "unknown API key");
        unauthenticated(check(Some("Bearer s-old"), Access::AnyKey, now), "old was revoked");
        let later = Timestamp::from_unix(100);
        unauthenticated(check(Some("Bearer s-ab"), Access::Model("a"), later), "ab expired");
        forbidden(check(Some("Bearer s-ab"), Access::Model("c"), now), "may not call model \"c\"");
        forbidden(check(Some("Bearer s-ab"), Access::EveryModel, now), "covers only a,b");
    }

    #[test]
    fn settings_that_do_not_hold_together_are_refused() {
        let lo = ["127.0.0.1:8000".parse().unwrap()];
        let any = ["127.0.0.1:8000".parse().unwrap(), "0.0.0.0:8001".parse().unwrap()];
        assert_eq!(check_settings(&lo, None, false, false), Ok(()));
        let err = check_settings(&any, None, false, false).unwrap_err();
        assert!(err.contains("0.0.0.0:8001 is not a loopback address"), "{err}");
        assert_eq!(check_settings(&any, Some(AuthMode::None), false, false), Ok(()));
        assert_eq!(check_settings(&any, Some(AuthMode::ApiKey), false, false), Ok(()));
        assert!(check_settings(&lo, Some(AuthMode::Mtls), true, false).is_err());
        assert_eq!(check_settings(&any, Some(AuthMode::Mtls), true, true), Ok(()));
        assert!(check_settings(&lo, Some(AuthMode::Mtls), false, true).is_err());
        assert!(check_settings(&lo, None, true, true).is_err());
        assert_eq!(check_settings(&lo, Some(AuthMode::ApiKey), true, true), Ok(()));
    }

    /// A new agent's data directory (kept while the first value lives) and its keys.
    fn agent_keys() -> (tempfile::TempDir, PathBuf, ApiKeys) {
        let (tmp, store) = crate::store::tests::store();
        let dir = store.dir().to_owned();
        drop(store);
        let keys = ApiKeys::open(&dir).unwrap();
        (tmp, dir, keys)
    }

    #[test]
    fn keys_are_stored_hashed_listed_and_revoked() {
        let (_tmp, dir, keys) = agent_keys();
        let now = SystemTime::now();
        let made =
            keys.create("app", models(&["m"]), Some(Duration::from_secs(60)), None, now).unwrap();
        assert!(made.secret.starts_with(PREFIX) && made.secret.len() == PREFIX.len() + 64);
        for file in std::fs::read_dir(&dir).unwrap() {
            let raw = std::fs::read(file.unwrap().path()).unwrap_or_default();
            assert!(!raw.windows(made.secret.len()).any(|w| w == made.secret.as_bytes()));
        }
        let err = keys.create("app", Scope::All, None, None, now).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
        assert!(keys.create("Bad Name", Scope::All, None, None, now).is_err());
        assert!(keys.create("x", models(&["NOPE"]), None, None, now).is_err());
        let listed = keys.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].expires.unwrap().unix() - listed[0].created.unix(), 60);

        let gate = Gate::new(AuthMode::ApiKey, &dir).unwrap();
        let bearer = format!("Bearer {}", made.secret);
        assert_eq!(gate.check(Some(bearer.as_bytes()), Access::Model("m")), Ok(()));
        // Revoked through another connection: the gate sees it at the next request.
        ApiKeys::open(&dir).unwrap().revoke("app", now).unwrap();
        assert!(matches!(
            gate.check(Some(bearer.as_bytes()), Access::Model("m")),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(keys.revoke("ghost", now), Err(ApiKeyError::Unknown(_))));
        // A revoked key's name may be used again, with a new secret.
        let again = keys.create("app", Scope::All, None, None, now).unwrap();
        assert_ne!(again.secret, made.secret);
    }

    #[test]
    fn a_key_is_made_or_revoked_only_with_its_audit_entry() {
        let (_tmp, dir, keys) = agent_keys();
        let now = SystemTime::now();
        let other = Connection::open(dir.join(DB_FILE)).unwrap();
        let actions = || -> Vec<String> {
            let mut stmt = other.prepare("SELECT action FROM audit ORDER BY seq").unwrap();
            stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
        };
        let before = actions();
        let refuse = "CREATE TRIGGER refuse BEFORE INSERT ON audit
                      BEGIN SELECT RAISE(ABORT, 'the audit log is full'); END;";

        // The audit entry cannot be written: no key is made.
        other.execute_batch(refuse).unwrap();
        let err = keys.create("app", Scope::All, None, None, now).unwrap_err().to_string();
        assert!(err.contains("the audit log is full"), "{err}");
        assert!(keys.list().unwrap().is_empty());
        other.execute_batch("DROP TRIGGER refuse").unwrap();
        keys.create("app", Scope::All, None, None, now).unwrap();

        // Nor is one revoked.
        other.execute_batch(refuse).unwrap();
        assert!(keys.revoke("app", now).is_err());
        assert_eq!(keys.list().unwrap()[0].revoked, None);
        other.execute_batch("DROP TRIGGER refuse").unwrap();
        assert!(keys.revoke("app", now).unwrap().revoked.is_some());
        assert_eq!(actions()[before.len()..], ["apikey-create", "apikey-revoke"]);
    }
}
