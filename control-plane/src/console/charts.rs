//! The console's charts, drawn on the server as SVG with `plotters` (its SVG backend
//! only): lines over time (request rate, errors, latency, a guard's value against its
//! threshold), ranked horizontal bars (drift per feature) and paired histograms (a
//! feature's reference beside what agents see now). The SVG goes inline into the page:
//! no script draws it, and the strict Content-Security-Policy holds (plotters writes
//! presentation attributes, no `style` attributes, and escapes its text). Each chart
//! carries `role="img"` and a label for screen readers; the numbers are in a table
//! beside it.

use falaj_common::time::Timestamp;
use maud::html;
use plotters::prelude::*;

const WIDTH: u32 = 480;
const HEIGHT: u32 = 240;
/// Text size: the charts are shown at about their own width on a laptop.
const FONT: u32 = 13;
/// Line colours, told apart by more than hue (the legend names each).
const COLOURS: [RGBColor; 4] =
    [RGBColor(11, 92, 173), RGBColor(214, 110, 0), RGBColor(27, 122, 61), RGBColor(120, 60, 160)];
const THRESHOLD: RGBColor = RGBColor(179, 38, 30);

/// One line: a name for the legend and `(unix seconds, value)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend's name.
    pub name: String,
    /// The points, in time order.
    pub points: Vec<(f64, f64)>,
}

/// Why a chart was not drawn (shown instead of it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chart not drawn: {0}")]
pub struct ChartError(String);

fn fail(e: impl std::fmt::Display) -> ChartError {
    ChartError(e.to_string())
}

/// `svg` with its accessible role and label.
/// Draws the legend of every labelled series at `position`, in the console's style.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), ChartError> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 205, 212))
        .label_font(("sans-serif", FONT))
        .draw()
        .map_err(fail)
}

fn labelled(svg: &str, label: &str) -> String {
    let label = html! { (label) }.into_string();
    svg.replacen("<svg ", &format!("<svg role=\"img\" aria-label=\"{label}\" "), 1)
}

/// A time axis label: hours and minutes for a span under two days, else month and day.
fn time_label(unix: f64, span: f64) -> String {
    let text = Timestamp::from_unix(unix.max(0.0) as u64).to_string();
    if span < 2.0 * 86_400.0 {
        text.get(11..16).unwrap_or_default().to_owned()
    } else {
        text.get(5..10).unwrap_or_default().to_owned()
    }
}

/// The range of `values` with a margin; never empty.
fn range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if (hi - lo).abs() < f64::EPSILON {
        hi = lo + lo.abs().max(1.0);
    }
    (lo, hi + (hi - lo) * 0.08)
}

/// Lines over the time span `from..to` (unix seconds), with a horizontal `threshold` (a
/// guard's or a rule's) when given. Each point is also marked, so a lone one shows.
pub fn lines(
    label: &str,
    series: &[Series],
    threshold: Option<f64>,
    (from, to): (f64, f64),
) -> Result<String, ChartError> {
    let to = to.max(from + 1.0);
    draw_lines(label, series, threshold, (from, to), &|x| time_label(x, to - from))
}

/// Lines over a count (epochs): the x axis is numbered.
pub fn curve(label: &str, series: &[Series]) -> Result<String, ChartError> {
    let (x0, x1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)), false);
    draw_lines(label, series, None, (x0, x1.max(x0 + 1.0)), &|x| format!("{x:.0}"))
}

fn draw_lines(
    label: &str,
    series: &[Series],
    threshold: Option<f64>,
    (x0, x1): (f64, f64),
    x_label: &dyn Fn(f64) -> String,
) -> Result<String, ChartError> {
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).chain(threshold);
    let (y0, y1) = range(ys, true);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(26)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .x_labels(6)
            .y_labels(5)
            .x_label_formatter(&|x| x_label(*x))
            .y_label_formatter(&|y| format_value(*y))
            .light_line_style(RGBColor(235, 238, 242))
            .label_style(("sans-serif", FONT))
            .draw()
            .map_err(fail)?;
        for (i, s) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(
                    LineSeries::new(s.points.iter().copied(), colour.stroke_width(2)).point_size(2),
                )
                .map_err(fail)?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        }
        if let Some(t) = threshold {
            chart
                .draw_series(LineSeries::new([(x0, t), (x1, t)], THRESHOLD.stroke_width(1)))
                .map_err(fail)?
                .label(format!("threshold {}", format_value(t)))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], THRESHOLD));
        }
        if !series.is_empty() {
            legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
        root.present().map_err(fail)?;
    }
    Ok(labelled(&svg, label))
}

/// Horizontal bars, largest first as given: `(name, value)`.
pub fn ranked_bars(label: &str, bars: &[(String, f64)]) -> Result<String, ChartError> {
    let n = bars.len().max(1) as f64;
    let (_, x1) = range(bars.iter().map(|b| b.1), true);
    // The left of the plot (below zero) holds the names, so no text crosses a bar.
    let x0 = -x1 * 0.6;
    let height = (44 + 28 * bars.len().max(1)) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(24)
            .y_label_area_size(4)
            .build_cartesian_2d(x0..x1, 0.0..n)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_labels(5)
            .x_label_formatter(&|x| if *x < 0.0 { String::new() } else { format_value(*x) })
            .light_line_style(RGBColor(235, 238, 242))
            .label_style(("sans-serif", FONT))
            .draw()
            .map_err(fail)?;
        // The first bar at the top.
        let top = |i: usize| n - i as f64;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                Rectangle::new([(0.0, top(i) - 0.8), (*v, top(i) - 0.2)], COLOURS[0].filled())
            }))
            .map_err(fail)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (name, v))| {
                Text::new(
                    format!("{name}  {}", format_value(*v)),
                    (x0 * 0.98, top(i) - 0.2),
                    ("sans-serif", FONT).into_font().color(&BLACK),
                )
            }))
            .map_err(fail)?;
        root.present().map_err(fail)?;
    }
    Ok(labelled(&svg, label))
}

/// Two distributions over the same bins, side by side per bin (shares of their totals).
pub fn paired_histogram(
    label: &str,
    names: (&str, &str),
    first: &[u64],
    second: &[u64],
) -> Result<String, ChartError> {
    let share = |counts: &[u64]| {
        let total: u64 = counts.iter().sum();
        counts.iter().map(|&c| if total == 0 { 0.0 } else { c as f64 / total as f64 }).collect()
    };
    let (a, b): (Vec<f64>, Vec<f64>) = (share(first), share(second));
    let bins = a.len().max(b.len()).max(1);
    let (_, y1) = range(a.iter().chain(&b).copied(), true);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(24)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..bins as f64, 0.0..y1)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bins.min(12))
            .x_label_formatter(&|x| format!("bin {}", *x as usize + 1))
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .label_style(("sans-serif", FONT))
            .draw()
            .map_err(fail)?;
        for (k, (values, name)) in [(&a, names.0), (&b, names.1)].into_iter().enumerate() {
            let colour = COLOURS[k];
            let offset = 0.1 + 0.4 * k as f64;
            chart
                .draw_series(values.iter().enumerate().map(|(i, v)| {
                    let x = i as f64 + offset;
                    Rectangle::new([(x, 0.0), (x + 0.38, *v)], colour.filled())
                }))
                .map_err(fail)?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(fail)?;
    }
    Ok(labelled(&svg, label))
}

/// A value for an axis or a label: few digits, never scientific below a million.
pub fn format_value(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(points: &[(f64, f64)]) -> Vec<Series> {
        vec![Series { name: "v1 <requests>".into(), points: points.to_vec() }]
    }

    #[test]
    fn a_line_chart_is_one_labelled_svg_with_its_line_and_escaped_legend() {
        let svg = lines(
            "Requests & errors",
            &series(&[(0.0, 1.0), (60.0, 3.0), (120.0, 2.0)]),
            Some(2.5),
            (0.0, 120.0),
        )
        .unwrap();
        assert!(
            svg.starts_with("<svg role=\"img\" aria-label=\"Requests &amp; errors\" "),
            "{svg}"
        );
        assert_eq!(svg.matches("<svg").count(), 1);
        assert!(svg.contains("<polyline"), "the series is drawn");
        assert!(svg.contains("v1 &lt;requests&gt;"), "legend escaped");
        assert!(svg.contains("threshold 2.50"));
        assert!(!svg.contains("style="), "no style attributes (CSP)");
        assert!(!svg.contains("<script"));
    }

    #[test]
    fn empty_and_flat_series_still_draw() {
        assert!(lines("nothing", &[], None, (0.0, 0.0)).unwrap().contains("<svg"));
        assert!(
            lines("flat", &series(&[(5.0, 0.0), (5.0, 0.0)]), None, (5.0, 5.0))
                .unwrap()
                .contains("<svg")
        );
        assert!(ranked_bars("none", &[]).unwrap().contains("<svg"));
        assert!(paired_histogram("none", ("a", "b"), &[], &[]).unwrap().contains("<svg"));
    }

    #[test]
    fn ranked_bars_name_each_feature_with_its_value() {
        let svg =
            ranked_bars("drift", &[("vibration".into(), 0.42), ("temp".into(), 0.01)]).unwrap();
        assert!(svg.contains("vibration  0.420"), "{svg}");
        assert!(svg.contains("temp  0.010"));
        assert!(svg.matches("<rect").count() >= 2);
    }

    #[test]
    fn time_labels_follow_the_span() {
        let t = Timestamp::parse("2026-12-04T16:05:00Z").unwrap().unix() as f64;
        assert_eq!(time_label(t, 3600.0), "16:05");
        assert_eq!(time_label(t, 30.0 * 86_400.0), "12-04");
    }

    #[test]
    fn values_are_short() {
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(0.01234), "0.012");
        assert_eq!(format_value(12.345), "12.35");
        assert_eq!(format_value(1234.0), "1234");
    }
}
