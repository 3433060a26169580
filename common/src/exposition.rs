//! The Prometheus text exposition both shells share (feature `prometheus`): request,
//! error and latency figures per model version, and plain gauges and counters, written
//! with `prometheus-client` at scrape time from whatever the shell keeps.

use std::fmt::Write as _;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::sketch::LatencySketch;

/// Latency histogram bounds, in seconds.
pub const LATENCY_BOUNDS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// One model version's cumulative figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionFigures {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u64,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Latencies of successful requests.
    pub latency: LatencySketch,
    /// Their sum, in seconds.
    pub latency_sum_seconds: f64,
}

/// A plain figure: `(name, help, is a counter, value)`; gauges otherwise.
pub type Scalar = (&'static str, &'static str, bool, u64);

/// Writes `falaj_inference_requests`, `falaj_inference_errors` and
/// `falaj_inference_latency_seconds`, labelled by model and version; `measured` says by
/// whom in the help text.
pub fn encode_versions(
    encoder: &mut DescriptorEncoder<'_>,
    measured: &str,
    figures: &[VersionFigures],
) -> std::fmt::Result {
    let labels =
        |f: &VersionFigures| [("model", f.model.clone()), ("version", f.version.to_string())];
    for (name, help, pick) in [
        (
            "falaj_inference_requests",
            "Inference requests",
            (|f| f.requests) as fn(&VersionFigures) -> u64,
        ),
        ("falaj_inference_errors", "Inference requests that failed", |f| f.errors),
    ] {
        let help = format!("{help}, {measured}");
        let mut family = encoder.encode_descriptor(name, &help, None, MetricType::Counter)?;
        for f in figures {
            family
                .encode_family(&labels(f))?
                .encode_counter::<NoLabelSet, _, u64>(&pick(f), None)?;
        }
    }
    let help = format!("Latency of successful inference requests, {measured}");
    let mut family = encoder.encode_descriptor(
        "falaj_inference_latency_seconds",
        &help,
        None,
        MetricType::Histogram,
    )?;
    let micros = LATENCY_BOUNDS.map(|b| b * 1e6);
    for f in figures {
        // prometheus-client takes each bucket's own count and accumulates them.
        let cumulative = f.latency.cumulative(&micros);
        let own = cumulative.iter().scan(0, |below, &c| Some(c - std::mem::replace(below, c)));
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS.iter().copied().zip(own).collect();
        family.encode_family(&labels(f))?.encode_histogram::<NoLabelSet>(
            f.latency_sum_seconds,
            f.latency.count(),
            &buckets,
            None,
        )?;
    }
    Ok(())
}

/// Writes plain gauges and counters.
pub fn encode_scalars(encoder: &mut DescriptorEncoder<'_>, scalars: &[Scalar]) -> std::fmt::Result {
    for &(name, help, is_counter, value) in scalars {
        if is_counter {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        } else {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&i64::try_from(value).unwrap_or(i64::MAX))?;
        }
    }
    Ok(())
}

/// A labelled figure: its labels and its value.
pub type Labelled = (Vec<(&'static str, String)>, f64);

/// Writes one family of labelled counters (`counter`) or gauges.
pub fn encode_labelled(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    counter: bool,
    rows: &[Labelled],
) -> std::fmt::Result {
    let kind = if counter { MetricType::Counter } else { MetricType::Gauge };
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let mut metric = family.encode_family(labels)?;
        if counter {
            metric.encode_counter::<NoLabelSet, _, u64>(value, None)?;
        } else {
            metric.encode_gauge(value)?;
        }
    }
    Ok(())
}

/// Renders `collector` in the Prometheus text format.
pub fn render(collector: impl Collector) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
            let mut latency = LatencySketch::default();
            latency.record(200.0);
            latency.record(2_000_000.0);
            let figures = VersionFigures {
                model: "pump".into(),
                version: 3,
                requests: 3,
                errors: 1,
                latency,
                latency_sum_seconds: 2.0002,
            };
            encode_versions(&mut encoder, "measured here", &[figures])?;
            encode_scalars(
                &mut encoder,
                &[("falaj_things", "Things", false, 7), ("falaj_events", "Events", true, 9)],
            )
        }
    }

    #[test]
    fn figures_render_as_prometheus_text() {
        let text = render(Fixed);
        for line in [
            "falaj_inference_requests_total{model=\"pump\",version=\"3\"} 3",
            "falaj_inference_errors_total{model=\"pump\",version=\"3\"} 1",
            "falaj_inference_latency_seconds_bucket{model=\"pump\",version=\"3\",le=\"0.0001\"} 0",
            "falaj_inference_latency_seconds_bucket{model=\"pump\",version=\"3\",le=\"0.00025\"} 1",
            "falaj_inference_latency_seconds_bucket{model=\"pump\",version=\"3\",le=\"1\"} 1",
            "falaj_inference_latency_seconds_bucket{model=\"pump\",version=\"3\",le=\"5\"} 2",
            "falaj_inference_latency_seconds_bucket{model=\"pump\",version=\"3\",le=\"+Inf\"} 2",
            "falaj_inference_latency_seconds_sum{model=\"pump\",version=\"3\"} 2.0002",
            "falaj_inference_latency_seconds_count{model=\"pump\",version=\"3\"} 2",
            "falaj_things 7",
            "falaj_events_total 9",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }
}
