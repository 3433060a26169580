//! The feature store's admin API routes, under `/v1/features/views`: apply a declaration,
//! list and show views with their history, ingest a file, build a snapshot bundle, export
//! training data. Every snapshot and ingest is also an event in `control.db`, so what
//! left the control plane (which view, which entities, which personal data hashed or
//! dropped) is on record.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use falaj_common::bundle::{BundleBuilder, Content};
use falaj_common::features::value::parse_time;
use falaj_common::features::view::PiiPolicy;
use falaj_common::features::{FeatureView, SnapshotSpec};
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::export::{self, ExportError};
use super::ingest::{self, IngestError};
use super::snapshot::{self, BuildError, SnapshotOptions};
use super::store;
use crate::admin::{Api, ApiError, ApiResult, BundleView, json_response, stage};
use crate::auth::{Permission as P, Routes};
use crate::db;
use crate::service::bundles::register;
use crate::sql::{SqlError, params};
use falaj_tables::Format;

/// Default lifetime of a snapshot bundle.
const SNAPSHOT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// The routes, each with the permission it needs.
pub fn routes() -> Routes {
    Routes::new()
        .put("/v1/features/views", P::ManageFeatureViews, apply)
        .get("/v1/features/views", P::ReadFleet, list)
        .get("/v1/features/views/{name}", P::ReadFleet, show)
        .post("/v1/features/views/{name}/ingest", P::IngestFeatures, ingest_file)
        .post("/v1/features/views/{name}/snapshots", P::BuildSnapshots, build_snapshot)
        .post("/v1/features/views/{name}/export", P::ExportTrainingData, export_file)
        .get("/v1/features/pii-keys", P::ReadFleet, list_pii_keys)
        .post("/v1/features/pii-keys/rotate", P::RotateKeys, rotate_pii_key)
}

/// How long the previous PII key's pseudonyms are still carried after a rotation, unless
/// the request says otherwise.
const PII_OVERLAP: Duration = Duration::from_secs(30 * 24 * 3600);

/// The body of `POST /v1/features/pii-keys/rotate`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotatePiiKeyRequest {
    /// Seconds the previous version's pseudonyms are still carried (default 30 days).
    #[serde(default)]
    pub overlap_seconds: Option<u64>,
}

async fn rotate_pii_key(
    State(api): State<Api>,
    axum::Json(request): axum::Json<RotatePiiKeyRequest>,
) -> ApiResult<Response> {
    let overlap = request.overlap_seconds.map_or(PII_OVERLAP, Duration::from_secs);
    let now = Timestamp::from_system(SystemTime::now());
    let rotated = api.features.rotate_pii_key(overlap, now).await.map_err(ApiError::internal)?;
    event(
        &api,
        "features.pii_key.rotate",
        format!("pii key v{}", rotated.version),
        json!({"previous": rotated.previous, "overlap_until": rotated.overlap_until}),
    )
    .await?;
    Ok(json_response(StatusCode::CREATED, &rotated))
}

async fn list_pii_keys(State(api): State<Api>) -> ApiResult<Response> {
    let versions = api.features.db.run(|c| super::pii_keys::list(&c)).await?;
    Ok(json_response(StatusCode::OK, &versions))
}

fn refused(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// A file refused for its rows: the message, and the report (first errors, counts) as
/// details.
fn invalid_rows(
    error: &impl std::fmt::Display,
    report: &falaj_common::features::Report,
) -> ApiError {
    refused("invalid_rows", error.to_string()).with_details(json!(report))
}

async fn event(
    api: &Api,
    kind: &'static str,
    subject: String,
    detail: serde_json::Value,
) -> ApiResult<()> {
    let now = Timestamp::from_system(SystemTime::now());
    api.shared.db.run(move |c| db::event(&c, now, kind, &subject, &detail.to_string())).await?;
    Ok(())
}

async fn apply(State(api): State<Api>, body: String) -> ApiResult<Response> {
    let view = FeatureView::from_toml(&body).map_err(|e| refused("invalid_view", e.to_string()))?;
    let now = Timestamp::from_system(SystemTime::now());
    let applied = api.features.db.run(move |c| store::apply(&c, &view, now)).await?;
    if applied.outcome != "unchanged" {
        let s = &applied.stored;
        event(
            &api,
            "features.apply",
            format!("{}@{}.{}", s.view.name, s.version, s.revision),
            json!({"outcome": applied.outcome, "changes": s.changes}),
        )
        .await?;
    }
    let status = if applied.outcome == "created" { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json_response(status, &applied))
}

async fn list(State(api): State<Api>) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, &views(&api).await?))
}

/// A view in the list `GET /v1/features/views` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewSummary {
    pub name: String,
    /// Its current version: bumped by breaking changes.
    pub version: u64,
    /// Its revision within the version: bumped by compatible changes.
    pub revision: u64,
    /// The entity its features describe.
    pub entity: falaj_common::features::view::Entity,
    /// How many features it declares.
    pub features: usize,
    /// Rows held for the current version.
    pub rows: u64,
    /// Distinct entities among them.
    pub entities: u64,
    /// When the current revision was applied.
    pub applied_at: Timestamp,
}

/// One view as `GET /v1/features/views/{name}` answers: its definition, history, counts,
/// last ten ingests and last ten snapshots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewDetail {
    /// The current revision.
    pub current: store::StoredView,
    /// Every revision, oldest first.
    pub history: Vec<store::StoredView>,
    /// Rows held for the current version.
    pub rows: u64,
    /// Distinct entities among them.
    pub entities: u64,
    /// The last ten ingests that wrote rows, newest first.
    pub ingests: Vec<IngestRecord>,
    /// The last ten snapshots built, newest first.
    pub snapshots: Vec<SnapshotRecord>,
}

/// An ingest as a view's detail lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestRecord {
    pub id: i64,
    /// The view version it wrote to.
    pub version: u64,
    pub at: Timestamp,
    /// The file's name, or `stdin`.
    pub source: String,
    /// `csv` or `parquet`.
    pub format: String,
    /// Rows written.
    pub rows: u64,
}

/// A snapshot as a view's detail lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The snapshot bundle's version.
    pub version: u64,
    pub view_version: u64,
    pub built_at: Timestamp,
    /// Feature values at or before this time.
    pub as_of: Timestamp,
    /// `all`, or the entities or filter asked for.
    pub scope: String,
    /// Entities in it.
    pub entities: u64,
    /// Features carried as keyed hashes.
    pub pseudonymised: Vec<String>,
}

/// Every view with its counts, as `GET /v1/features/views` answers (the API's and the
/// console's service).
pub(crate) async fn views(api: &Api) -> ApiResult<Vec<ViewSummary>> {
    let views = api
        .features
        .db
        .run(|c| {
            store::list(&c)?
                .into_iter()
                .map(|s| {
                    let (rows, entities) = store::counts(&c, &s)?;
                    Ok(ViewSummary {
                        features: s.view.features.len(),
                        name: s.view.name,
                        version: s.version,
                        revision: s.revision,
                        entity: s.view.entity,
                        rows,
                        entities,
                        applied_at: s.applied_at,
                    })
                })
                .collect::<Result<Vec<_>, SqlError>>()
        })
        .await?;
    Ok(views)
}

async fn show(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, &view_detail(&api, name).await?))
}

/// One view with its history, ingests and snapshots, as `GET /v1/features/views/{name}`
/// answers (the API's and the console's service).
pub(crate) async fn view_detail(api: &Api, name: String) -> ApiResult<ViewDetail> {
    let lookup = name.clone();
    let found = api
        .features
        .db
        .run(move |c| {
            let history = store::history(&c, &lookup)?;
            let Some(current) = history.last() else { return Ok(None) };
            let (rows, entities) = store::counts(&c, current)?;
            let ingests = c.query_map(
                "SELECT id, version, at, source, format, rows FROM ingests
                 WHERE view = $1 AND rows > 0 ORDER BY id DESC LIMIT 10",
                params![lookup],
                |r| {
                    Ok(IngestRecord {
                        id: r.get(0)?,
                        version: r.get::<i64>(1)? as u64,
                        at: db::from_ts(r.get(2)?),
                        source: r.get(3)?,
                        format: r.get(4)?,
                        rows: r.get::<i64>(5)? as u64,
                    })
                },
            )?;
            let snapshots = c.query_map(
                "SELECT version, view_version, built_at, as_of, scope, entities, features
                 FROM snapshots WHERE view = $1 ORDER BY version DESC LIMIT 10",
                params![lookup],
                |r| {
                    Ok(SnapshotRecord {
                        version: r.get::<i64>(0)? as u64,
                        view_version: r.get::<i64>(1)? as u64,
                        built_at: db::from_ts(r.get(2)?),
                        as_of: db::from_ts(r.get(3)?),
                        scope: r.get(4)?,
                        entities: r.get::<i64>(5)? as u64,
                        pseudonymised: pseudonymised(&r.get::<String>(6)?),
                    })
                },
            )?;
            Ok(Some(ViewDetail {
                current: current.clone(),
                history,
                rows,
                entities,
                ingests,
                snapshots,
            }))
        })
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no feature view {name:?}")))?;
    Ok(found)
}

#[derive(Debug, Deserialize)]
struct FileParams {
    /// The file's name, for reports and the ingest record.
    file: Option<String>,
    /// The output format of an export.
    format: Option<String>,
}

async fn ingest_file(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(params): Query<FileParams>,
    body: Body,
) -> ApiResult<Response> {
    let staged = stage(&api, body, super::STAGED_INGEST, "file").await?;
    let file = params.file.unwrap_or_else(|| "upload".to_owned());
    let now = Timestamp::from_system(SystemTime::now());
    let (view, source) = (name.clone(), file.clone());
    let path = staged.path().to_owned();
    let result =
        api.features.db.run(move |c| Ok(ingest::ingest(&c, &view, &path, &source, now))).await?;
    drop(staged);
    let ingested = result.map_err(|e| match e {
        IngestError::UnknownView(_) => ApiError::not_found(e.to_string()),
        IngestError::Rows { ref report, .. } => invalid_rows(&e, report),
        IngestError::Header { .. } | IngestError::Source(_) => {
            refused("invalid_file", e.to_string())
        }
        // The operator must act, so the answer says what is full (nothing was written).
        IngestError::Store(_) if e.is_storage_full() => {
            tracing::error!(error = %e, file = store::FEATURES_DB_FILE, "feature ingest refused: the disk is full");
            ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_full",
                format!(
                    "the offline store {} is full ({e}): nothing was ingested; free space on the control plane's data disk and send the file again",
                    store::FEATURES_DB_FILE
                ),
            )
        }
        IngestError::Store(_) => ApiError::internal(e),
    })?;
    event(
        &api,
        "features.ingest",
        format!("{}@{}", ingested.view, ingested.version),
        json!({"file": file, "rows": ingested.rows, "ingest": ingested.id}),
    )
    .await?;
    Ok(json_response(StatusCode::OK, &ingested))
}

/// The features a recorded snapshot carried as pseudonyms.
fn pseudonymised(features: &str) -> Vec<String> {
    serde_json::from_str::<Vec<falaj_common::features::SnapshotFeature>>(features)
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f.pseudonymised)
        .map(|f| f.name)
        .collect()
}

/// A snapshot request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Only these entities.
    #[serde(default)]
    pub entities: Option<Vec<String>>,
    /// Only entities passing this filter.
    #[serde(default)]
    pub filter: Option<String>,
    /// Values as of this RFC 3339 time (default: now).
    #[serde(default)]
    pub as_of: Option<String>,
    /// `hash` or `drop`, for personal data the view gives no policy for.
    #[serde(default)]
    pub pii: Option<PiiPolicy>,
    /// Lifetime of the bundle in seconds (default 90 days).
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
}

async fn build_snapshot(
    State(api): State<Api>,
    Path(name): Path<String>,
    axum::Json(request): axum::Json<SnapshotRequest>,
) -> ApiResult<Response> {
    let now = SystemTime::now();
    let as_of = request
        .as_of
        .as_deref()
        .map(|t| {
            parse_time(t).ok_or_else(|| {
                ApiError::bad_request(format!("as_of {t:?} is not an RFC 3339 time"))
            })
        })
        .transpose()?;
    // Two snapshots built at once would take the same version, and the second's record
    // could describe the first one's bundle: one at a time in this process, and one at a
    // time across replicas, until the bundle is registered.
    let _building = api.features.building().await;
    let (db, view) = (api.features.db.clone(), name.clone());
    let versions = tokio::task::spawn_blocking(move || snapshot::VersionLock::acquire(&db, &view))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let version = next_version(&api, &name).await?;
    let options = SnapshotOptions {
        entities: request.entities,
        filter: request.filter,
        as_of,
        pii: request.pii,
    };
    let now_micros = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    // The region's keys as recorded: one another replica rotated in is loaded (and its file
    // checked) first; a file missing or different here refuses the snapshot (logged).
    let keyring =
        api.features.keyring(Timestamp::from_system(now)).await.map_err(ApiError::internal)?;
    let view = name.clone();
    let built = api
        .features
        .db
        .run(move |c| Ok(snapshot::build(&c, &view, &options, &keyring, now_micros, Vec::new())))
        .await?;
    let (spec, payload) = built.map_err(|e| match e {
        BuildError::UnknownView(_) => ApiError::not_found(e.to_string()),
        BuildError::Store(_) | BuildError::Payload(_) => ApiError::internal(e),
        BuildError::Pii(_) => refused("raw_pii", e.to_string()),
        _ => refused("invalid_snapshot", e.to_string()),
    })?;
    let created = Timestamp::from_system(now);
    let ttl = request.expires_in_seconds.map_or(SNAPSHOT_TTL, Duration::from_secs);
    // Hashing, signing and writing a payload of tens of MiB: on the blocking pool.
    let (shared, staging, content) =
        (Arc::clone(&api.shared), Arc::clone(&api.staging), Content::Features(spec.clone()));
    let (file, bundle_name) = (spec.file.clone(), name.clone());
    let staged = tokio::task::spawn_blocking(move || {
        let keyring = shared.keyring();
        let signers: Vec<_> = keyring.signers.iter().collect();
        let (_, bytes) = BundleBuilder::new(
            &bundle_name,
            version,
            &shared.region,
            created,
            created.saturating_add(ttl),
            content,
        )
        .file(&file, payload)
        .build(&signers)
        .map_err(|e| refused("invalid_snapshot", e.to_string()))?;
        std::fs::create_dir_all(&*staging).map_err(ApiError::internal)?;
        let mut staged = tempfile::Builder::new()
            .prefix("snapshot-")
            .tempfile_in(&*staging)
            .map_err(ApiError::internal)?;
        staged.write_all(&bytes).map_err(ApiError::internal)?;
        Ok::<_, ApiError>(staged)
    })
    .await
    .map_err(ApiError::internal)??;
    // Recorded first: a bundle of this name is registered only if it is known as a
    // snapshot (a record whose bundle failed to register is replaced by the next one).
    let recorded = spec.clone();
    api.features.db.run(move |c| snapshot::record(&c, &recorded, version, created)).await?;
    let (row, new_chunks, _) = register(&api.shared, staged.path()).await?;
    drop(staged);
    // Its connection closes on the blocking pool (dropped here, on a thread of its own).
    tokio::task::spawn_blocking(move || versions.release()).await.map_err(ApiError::internal)?;
    let carried = carried(&spec);
    let detail = serde_json::to_value(&carried).map_err(ApiError::internal)?;
    event(&api, "features.snapshot", format!("{name}@{version}"), detail).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &SnapshotBuilt { bundle: BundleView::from(&row), new_chunks, snapshot: carried },
    ))
}

/// What `POST /v1/features/views/{name}/snapshots` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotBuilt {
    /// The snapshot's bundle, registered.
    pub bundle: BundleView,
    /// Chunks the control plane did not hold before.
    pub new_chunks: u64,
    /// What it carries.
    pub snapshot: Carried,
}

/// What a snapshot carries (also the detail of its `features.snapshot` event).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Carried {
    pub view: String,
    /// Its version.
    pub view_version: u64,
    /// Entities in it.
    pub entities: u64,
    /// `all`, or the entities or filter asked for.
    pub scope: String,
    /// Feature values at or before this time.
    pub as_of: Timestamp,
    /// Its features.
    pub features: Vec<String>,
    /// Those carried as keyed hashes.
    pub pseudonymised: Vec<String>,
    /// The versions of the region's PII key that made them.
    pub pii_keys: std::collections::BTreeSet<u32>,
}

/// The next snapshot version of view `name` ([`snapshot::next_version`]): the bundle takes
/// the view's name and its versions count the view's snapshots, so a bundle of that name
/// that is not one of them (a model) is a conflict. Under the view's
/// [`snapshot::VersionLock`].
async fn next_version(api: &Api, name: &str) -> ApiResult<u64> {
    let lookup = name.to_owned();
    let bundles = api
        .shared
        .db
        .run(move |c| {
            Ok(db::bundles(&c)?
                .into_iter()
                .filter(|b| b.name == lookup)
                .map(|b| b.version)
                .collect::<Vec<_>>())
        })
        .await?;
    let lookup = name.to_owned();
    let ours = api.features.db.run(move |c| snapshot::recorded(&c, &lookup)).await?;
    snapshot::next_version(name, &bundles, &ours)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()))
}

/// What a snapshot carries, for the record: entities, scope, time, and which features
/// were pseudonymised.
fn carried(spec: &SnapshotSpec) -> Carried {
    Carried {
        view: spec.view.clone(),
        view_version: spec.view_version,
        entities: spec.entities,
        scope: spec.scope.clone(),
        as_of: spec.as_of,
        features: spec.features.iter().map(|f| f.name.clone()).collect(),
        pseudonymised: spec
            .features
            .iter()
            .filter(|f| f.pseudonymised)
            .map(|f| f.name.clone())
            .collect(),
        pii_keys: spec.features.iter().filter_map(|f| f.pii_key).collect(),
    }
}

async fn export_file(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(params): Query<FileParams>,
    body: Body,
) -> ApiResult<Response> {
    let format = match params.format.as_deref() {
        None | Some("parquet") => Format::Parquet,
        Some("csv") => Format::Csv,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format must be csv or parquet, not {other:?}"
            )));
        }
    };
    let labels = stage(&api, body, "labels-", "labels file").await?;
    let out = tempfile::Builder::new()
        .prefix("export-")
        .tempfile_in(&*api.staging)
        .map_err(ApiError::internal)?;
    let file = params.file.unwrap_or_else(|| "labels".to_owned());
    let (view, labels_path, out_path) =
        (name.clone(), labels.path().to_owned(), out.path().to_owned());
    let result = api
        .features
        .db
        .run(move |c| Ok(export::export(&c, &view, &labels_path, &file, &out_path, format)))
        .await?;
    let exported = result.map_err(|e| match e {
        ExportError::UnknownView(_) => ApiError::not_found(e.to_string()),
        ExportError::Rows { ref report, .. } => invalid_rows(&e, report),
        ExportError::Header { .. } | ExportError::Source(_) => {
            refused("invalid_file", e.to_string())
        }
        ExportError::Output { .. } | ExportError::Store(_) => ApiError::internal(e),
    })?;
    event(
        &api,
        "features.export",
        format!("{name}@{}", exported.version),
        json!({"rows": exported.rows, "matched": exported.matched}),
    )
    .await?;
    // The open handle keeps the file readable after the temporary name is removed.
    let reader = tokio::fs::File::open(out.path()).await.map_err(ApiError::internal)?;
    drop(out);
    let content_type = match format {
        Format::Csv => "text/csv",
        Format::Parquet => "application/vnd.apache.parquet",
    };
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::HeaderName::from_static("x-falaj-rows"), exported.rows.to_string()),
            (header::HeaderName::from_static("x-falaj-matched"), exported.matched.to_string()),
            (header::HeaderName::from_static("x-falaj-view-version"), exported.version.to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(reader)),
    )
        .into_response())
}
