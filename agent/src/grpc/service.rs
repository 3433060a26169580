//! `inference.GRPCInferenceService` over the agent's [`AppState`]: each call translated to
//! the functions the REST handlers call, and their results back.

use std::pin::Pin;
use std::time::Instant;

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use super::proto::grpc_inference_service_server::GrpcInferenceService;
use super::proto::repository_index_response::ModelIndex;
use super::proto::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelStreamInferResponse, RepositoryIndexRequest,
    RepositoryIndexResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest,
    ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use super::{convert, status};
use crate::apikeys::Access;
use crate::models::VersionState;
use crate::server::{self, ApiError, AppState, ROUTING_KEY_HEADER};

/// The service; cloned per connection by tonic.
#[derive(Debug, Clone)]
pub(crate) struct Inference {
    pub(crate) state: AppState,
}

/// The protocol extensions the gRPC endpoint serves.
const EXTENSIONS: [&str; 2] = ["model_repository", "streaming"];

/// A version as a message names it: empty means the server's choice.
fn version_of(text: &str, name: &str) -> Result<Option<u64>, ApiError> {
    if text.is_empty() { Ok(None) } else { server::parse_version(text, name).map(Some) }
}

/// Lets a call through the gate with the key of its `authorization` metadata.
fn authorize<T>(state: &AppState, request: &Request<T>, access: Access<'_>) -> Result<(), Status> {
    let authorization = request.metadata().get("authorization").map(MetadataValue::as_bytes);
    state.gate.check(authorization, access).map_err(|denied| status(ApiError::from(denied)))
}

/// The routing key of a call's metadata (`x-falaj-routing-key`), as REST's header.
fn header_key<T>(request: &Request<T>) -> Option<String> {
    request.metadata().get(ROUTING_KEY_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Serves one ModelInfer message, admitted through the same request slots as REST.
async fn infer(
    state: &AppState,
    mut request: ModelInferRequest,
    header_key: Option<&str>,
) -> Result<ModelInferResponse, ApiError> {
    let name = std::mem::take(&mut request.model_name);
    let version = version_of(&request.model_version, &name)?;
    let _slot = server::admit_inference(state, &name).await?;
    let started = Instant::now();
    let raw = convert::wants_raw(&request);
    let decoded = convert::request(request).map_err(|e| ApiError::BadRequest(e.0));
    server::serve_inference(state, name, version, decoded, header_key, started, |answer| {
        convert::response(&answer, raw)
    })
    .await
}

/// [`infer`] for one message of a stream, whose model the stream's key must cover.
async fn authorized_infer(
    state: &AppState,
    request: ModelInferRequest,
    header_key: Option<&str>,
    authorization: Option<&[u8]>,
) -> Result<ModelInferResponse, ApiError> {
    state.gate.check(authorization, Access::Model(&request.model_name))?;
    infer(state, request, header_key).await
}

impl Inference {
    /// ModelInfer: the generated route's method and [`super::unary`]'s path both serve a
    /// call with this (the latter without the trait's boxed future).
    pub(super) async fn model_infer_call(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<ModelInferResponse, Status> {
        authorize(&self.state, &request, Access::Model(&request.get_ref().model_name))?;
        let key = header_key(&request);
        infer(&self.state, request.into_inner(), key.as_deref()).await.map_err(status)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.state.registry.catalog().ready() }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        authorize(&self.state, &request, Access::Model(&request.get_ref().name))?;
        let ModelReadyRequest { name, version } = request.into_inner();
        let ready = version_of(&version, &name)
            .and_then(|version| server::model_readiness(&self.state, &name, version))
            .map_err(status)?;
        Ok(Response::new(ModelReadyResponse { ready: ready.is_ok() }))
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        authorize(&self.state, &request, Access::AnyKey)?;
        Ok(Response::new(ServerMetadataResponse {
            name: server::SERVER_NAME.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: EXTENSIONS.iter().map(|&e| e.to_owned()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        authorize(&self.state, &request, Access::Model(&request.get_ref().name))?;
        let ModelMetadataRequest { name, version } = request.into_inner();
        let catalog = self.state.registry.catalog();
        let (model, versions) = version_of(&version, &name)
            .and_then(|version| server::described(&catalog, &name, version))
            .map_err(status)?;
        let spec = server::model_spec(&model).map_err(status)?;
        Ok(Response::new(ModelMetadataResponse {
            versions,
            platform: "onnx".to_owned(),
            inputs: convert::tensors(&spec.signature.inputs),
            outputs: convert::tensors(&spec.signature.outputs),
            name,
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        self.model_infer_call(request).await.map(Response::new)
    }

    type ModelStreamInferStream = ResponseStream;

    /// Answers the stream's requests in order, each as ModelInfer would; a refused request
    /// is answered with its message in `error_message` and the stream goes on.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        // A valid key opens the stream; each message is checked against its scope.
        authorize(&self.state, &request, Access::AnyKey)?;
        let authorization = request.metadata().get("authorization").map(|v| v.as_bytes().to_vec());
        let key = header_key(&request);
        let mut incoming = request.into_inner();
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let reply = match incoming.message().await {
                    Ok(None) => return,
                    Err(e) => Err(e),
                    Ok(Some(message)) => Ok(
                        match authorized_infer(
                            &state,
                            message,
                            key.as_deref(),
                            authorization.as_deref(),
                        )
                        .await
                        {
                            Ok(response) => ModelStreamInferResponse {
                                error_message: String::new(),
                                infer_response: Some(response),
                            },
                            Err(e) => ModelStreamInferResponse {
                                error_message: status(e).message().to_owned(),
                                infer_response: None,
                            },
                        },
                    ),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        authorize(&self.state, &request, Access::EveryModel)?;
        let only_ready = request.into_inner().ready;
        let catalog = self.state.registry.catalog();
        let mut models = Vec::new();
        for (name, entry) in &catalog.models {
            for (version, state) in &entry.versions {
                let (state, reason) = match state {
                    VersionState::Ready(_) => ("READY", String::new()),
                    VersionState::Failed { reason, .. } => ("UNAVAILABLE", reason.clone()),
                };
                if only_ready && state != "READY" {
                    continue;
                }
                models.push(ModelIndex {
                    name: name.clone(),
                    version: version.to_string(),
                    state: state.to_owned(),
                    reason,
                });
            }
        }
        Ok(Response::new(RepositoryIndexResponse { models }))
    }
}
