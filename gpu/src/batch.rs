//! Dynamic batching: requests that arrive while the GPU is busy, or within a small
//! configurable wait, run as one dispatch over their rows stacked along the batch axis.
//!
//! One worker thread per model takes every request queued, waits up to `wait` for more
//! (while under `max_rows`), stacks the compatible ones, pads the batch to a power of two
//! (so a handful of plans serve every batch size), runs it and hands each request its rows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::graph::InputDim;
use crate::{GpuError, GpuModel, Values};

/// How requests are batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// How long the first request of a batch waits for others. Zero batches only what
    /// queued while the GPU was busy.
    pub wait: Duration,
    /// The most rows in one batch.
    pub max_rows: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { wait: Duration::ZERO, max_rows: 256 }
    }
}

struct Job {
    inputs: Vec<Values>,
    reply: SyncSender<Result<Vec<Values>, GpuError>>,
}

/// Batches requests to one model.
#[derive(Debug)]
pub struct Batcher {
    model: Arc<GpuModel>,
    queue: Mutex<Option<Sender<Job>>>,
    worker: Option<thread::JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Drop for Batcher {
    /// Closes the queue and waits for the worker, so that the model's GPU resources are
    /// released before the batcher is gone (a process exiting while a thread still tears
    /// down Vulkan objects can crash in the driver).
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Dispatches run and rows served, for metrics.
#[derive(Debug, Default)]
struct Stats {
    batches: AtomicU64,
    rows: AtomicU64,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("rows", &rows(&self.inputs)).finish_non_exhaustive()
    }
}

fn rows(inputs: &[Values]) -> usize {
    inputs.first().and_then(|(s, _)| s.first()).copied().unwrap_or(0)
}

impl Batcher {
    /// Starts batching for `model`, or `None` when its graph has no batch axis to stack
    /// along (every input's first dimension free and every output's first dimension the
    /// batch); such a model runs request by request.
    pub fn start(model: Arc<GpuModel>, config: BatchConfig) -> Result<Option<Self>, GpuError> {
        if !batchable(&model)? {
            return Ok(None);
        }
        let (sender, receiver) = mpsc::channel();
        let (worker, stats) = (model.clone(), Arc::new(Stats::default()));
        let counters = stats.clone();
        let worker = thread::Builder::new()
            .name("falaj-gpu-batch".into())
            .spawn(move || work(&worker, &receiver, config, &counters))
            .map_err(|e| GpuError::Device(format!("cannot start the batching thread: {e}")))?;
        Ok(Some(Self { model, queue: Mutex::new(Some(sender)), worker: Some(worker), stats }))
    }

    /// Runs `inputs` in the next batch and returns this request's outputs.
    pub fn run(&self, inputs: Vec<Values>) -> Result<Vec<Values>, GpuError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|q| q.send(Job { inputs, reply }));
        if !matches!(sent, Some(Ok(()))) {
            return Err(GpuError::Device("the batching thread has stopped".into()));
        }
        answer.recv().map_err(|_| GpuError::Device("the batching thread has stopped".into()))?
    }

    /// Batches run so far and the request rows they carried (padding not counted).
    pub fn stats(&self) -> (u64, u64) {
        (self.stats.batches.load(Ordering::Relaxed), self.stats.rows.load(Ordering::Relaxed))
    }

    /// The model batched.
    pub fn model(&self) -> &Arc<GpuModel> {
        &self.model
    }
}

/// Whether stacking rows is sound: the batch axis is free on every input, and plans for
/// one and for two rows give outputs whose first dimension is the row count.
fn batchable(model: &GpuModel) -> Result<bool, GpuError> {
    let inputs = &model.graph().inputs;
    if inputs.is_empty() || inputs.iter().any(|i| i.dims.first() != Some(&InputDim::Free)) {
        return Ok(false);
    }
    for batch in [1, 2] {
        let shapes: Vec<Vec<usize>> = inputs
            .iter()
            .map(|i| {
                std::iter::once(batch)
                    .chain(i.dims[1..].iter().map(|d| match d {
                        InputDim::Fixed(n) => *n,
                        InputDim::Free => 1,
                    }))
                    .collect()
            })
            .collect();
        let plan = model.plan(&shapes)?;
        let plan = plan.lock().unwrap_or_else(PoisonError::into_inner);
        if plan.output_shapes().any(|s| s.first() != Some(&batch)) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn work(model: &GpuModel, queue: &Receiver<Job>, config: BatchConfig, stats: &Stats) {
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return, // the batcher was dropped
            },
        };
        if rows(&first.inputs) >= config.max_rows {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.rows.fetch_add(rows(&first.inputs) as u64, Ordering::Relaxed);
            let _ = first.reply.send(run_alone(model, &first.inputs));
            continue;
        }
        let deadline = Instant::now() + config.wait;
        let mut batch = vec![first];
        let mut total = rows(&batch[0].inputs);
        while total < config.max_rows {
            let next = match queue.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    match queue.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            if compatible(&batch[0].inputs, &next.inputs)
                && total + rows(&next.inputs) <= config.max_rows
            {
                total += rows(&next.inputs);
                batch.push(next);
            } else {
                held = Some(next); // first of the next batch
                break;
            }
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.rows.fetch_add(total as u64, Ordering::Relaxed);
        run_batch(model, batch, total, config.max_rows);
    }
}

fn run_alone(model: &GpuModel, inputs: &[Values]) -> Result<Vec<Values>, GpuError> {
    let refs: Vec<(&[usize], &[f32])> =
        inputs.iter().map(|(s, d)| (s.as_slice(), d.as_slice())).collect();
    model.run(&refs)
}

/// Same input count and the same shapes but for the batch axis.
fn compatible(a: &[Values], b: &[Values]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((sa, _), (sb, _))| sa.len() == sb.len() && sa.get(1..) == sb.get(1..))
}

fn run_batch(model: &GpuModel, batch: Vec<Job>, total: usize, max_rows: usize) {
    if let [job] = &batch[..]
        && total.is_power_of_two()
    {
        let _ = job.reply.send(run_alone(model, &job.inputs));
        return;
    }
    let padded = total.next_power_of_two().min(max_rows).max(total);
    let stacked: Vec<Values> = (0..batch[0].inputs.len())
        .map(|i| {
            let (shape, _) = &batch[0].inputs[i];
            let row: usize = shape[1..].iter().product();
            let mut data = Vec::with_capacity(padded * row);
            for job in &batch {
                data.extend_from_slice(&job.inputs[i].1);
            }
            data.resize(padded * row, 0.0);
            let mut shape = shape.clone();
            shape[0] = padded;
            (shape, data)
        })
        .collect();
    match run_alone(model, &stacked) {
        Ok(outputs) => {
            let mut start = 0;
            for job in batch {
                let n = rows(&job.inputs);
                let mine = outputs
                    .iter()
                    .map(|(shape, data)| {
                        let row: usize = shape[1..].iter().product();
                        let mut s = shape.clone();
                        s[0] = n;
                        (s, data[start * row..(start + n) * row].to_vec())
                    })
                    .collect();
                start += n;
                let _ = job.reply.send(Ok(mine));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for job in batch {
                let _ = job.reply.send(Err(GpuError::Device(message.clone())));
            }
        }
    }
}
