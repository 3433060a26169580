//! Shape arithmetic for planning: element counts, strides, NumPy broadcasting, ONNX
//! window sizes and the shapes of view operators (Reshape, Flatten, Squeeze, Unsqueeze).

use crate::graph::{Padding, ViewKind, Window};

pub(super) fn elements(shape: &[usize]) -> usize {
    shape.iter().product()
}

pub(super) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// numpy broadcasting of two shapes.
pub(super) fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
            let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
            match (da, db) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// Strides for reading `shape` as if broadcast to `out` (0 on broadcast axes), padded on
/// the left to `out`'s rank.
pub(super) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let strides = contiguous_strides(shape);
    let pad = out.len() - shape.len();
    (0..out.len())
        .map(|i| if i < pad || shape[i - pad] == 1 { 0 } else { strides[i - pad] })
        .collect()
}

/// Pads a list on the left to six entries with `fill`.
pub(super) fn six(values: &[usize], fill: usize) -> Result<Vec<u32>, String> {
    if values.len() > 6 {
        return Err(format!("rank {} (at most 6)", values.len()));
    }
    let mut out = vec![fill; 6 - values.len()];
    out.extend_from_slice(values);
    out.into_iter().map(|v| u32::try_from(v).map_err(|_| "a size over 2^32".to_owned())).collect()
}

pub(super) fn axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(a).ok().filter(|&a| a < rank)
}

/// Output size and begin/end pads of one spatial axis.
pub(super) fn spatial(input: usize, window: &Window, i: usize) -> Option<(usize, usize, usize)> {
    if input == 0 {
        return None; // an empty axis: no window fits
    }
    let spatial = window.kernel.len();
    let effective = (window.kernel[i] - 1) * window.dilations[i] + 1;
    let stride = window.strides[i];
    let (begin, end) = match &window.padding {
        Padding::Explicit(pads) => (pads[i], pads[i + spatial]),
        Padding::Valid => (0, 0),
        Padding::Same { upper } => {
            let out = input.div_ceil(stride);
            let total = ((out - 1) * stride + effective).saturating_sub(input);
            let small = total / 2;
            if *upper { (small, total - small) } else { (total - small, small) }
        }
    };
    let span = (input + begin + end).checked_sub(effective)?;
    let mut out = if window.ceil_mode { span.div_ceil(stride) + 1 } else { span / stride + 1 };
    // A last window that would start in the end padding is dropped (as ONNX and PyTorch do).
    if window.ceil_mode && (out - 1) * stride >= input + begin {
        out -= 1;
    }
    Some((out, begin, end))
}

/// Per-dimension batch strides of an operand broadcast to `batch`.
pub(super) fn batch_strides(operand: &[usize], batch: &[usize], matrix: usize) -> Vec<usize> {
    broadcast_strides(operand, batch).into_iter().map(|s| s * matrix).collect::<Vec<_>>()
}

/// A 1-D or 2-D window input seen as (images × channels, H, W), with 1-D as H = 1.
pub(super) fn spatial_view(
    shape: &[usize],
    window: &Window,
) -> Result<(usize, usize, usize, Window), String> {
    match (shape.len(), window.kernel.len()) {
        (4, 2) => Ok((shape[0] * shape[1], shape[2], shape[3], window.clone())),
        (3, 1) => {
            let padding = match &window.padding {
                Padding::Explicit(p) => Padding::Explicit(vec![0, p[0], 0, p[1]]),
                other => other.clone(),
            };
            Ok((
                shape[0] * shape[1],
                1,
                shape[2],
                Window {
                    kernel: vec![1, window.kernel[0]],
                    strides: vec![1, window.strides[0]],
                    dilations: vec![1, window.dilations[0]],
                    padding,
                    ceil_mode: window.ceil_mode,
                },
            ))
        }
        (rank, spatial) => Err(format!("input of rank {rank} for a {spatial}-D window")),
    }
}

pub(super) fn view_shape(kind: &ViewKind, input: &[usize]) -> Result<Vec<usize>, String> {
    let rank = input.len();
    Ok(match kind {
        ViewKind::Identity => input.to_vec(),
        ViewKind::Flatten(a) => {
            let a = if *a < 0 { *a + rank as i64 } else { *a };
            let a = usize::try_from(a).ok().filter(|&a| a <= rank).ok_or("axis out of range")?;
            vec![input[..a].iter().product(), input[a..].iter().product()]
        }
        ViewKind::Reshape { shape, allowzero } => {
            let mut out = Vec::with_capacity(shape.len());
            let mut infer = None;
            for (i, &d) in shape.iter().enumerate() {
                match d {
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        out.push(1);
                    }
                    0 if !allowzero => out.push(*input.get(i).ok_or("0 past the input's rank")?),
                    d if d >= 0 => out.push(d as usize),
                    _ => return Err(format!("target shape {shape:?}")),
                }
            }
            if let Some(i) = infer {
                let known: usize = out.iter().product();
                if known == 0 || !elements(input).is_multiple_of(known) {
                    return Err(format!("cannot infer -1 in {shape:?} from {input:?}"));
                }
                out[i] = elements(input) / known;
            }
            out
        }
        ViewKind::Squeeze(axes) => match axes {
            None => input.iter().copied().filter(|&d| d != 1).collect(),
            Some(axes) => {
                let axes: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(a, rank))
                    .collect::<Option<_>>()
                    .ok_or("axis out of range")?;
                if axes.iter().any(|&a| input[a] != 1) {
                    return Err(format!("squeezing an axis of size other than 1 in {input:?}"));
                }
                input
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, &d)| d)
                    .collect()
            }
        },
        ViewKind::Unsqueeze(axes) => {
            let out_rank = rank + axes.len();
            let axes: Vec<usize> = axes
                .iter()
                .map(|&a| axis(a, out_rank))
                .collect::<Option<_>>()
                .ok_or("axis out of range")?;
            let mut rest = input.iter();
            (0..out_rank)
                .map(|i| if axes.contains(&i) { Some(1) } else { rest.next().copied() })
                .collect::<Option<_>>()
                .ok_or("repeated axes")?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[2, 3, 4], &[4]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast(&[2, 3], &[4]), None);
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]), vec![0, 1, 0]);
    }

    #[test]
    fn spatial_sizes_follow_the_onnx_formulas() {
        let w = |padding, ceil_mode| Window {
            kernel: vec![3],
            strides: vec![2],
            dilations: vec![1],
            padding,
            ceil_mode,
        };
        assert_eq!(spatial(32, &w(Padding::Explicit(vec![1, 1]), false), 0), Some((16, 1, 1)));
        assert_eq!(spatial(32, &w(Padding::Same { upper: true }, false), 0), Some((16, 0, 1)));
        assert_eq!(spatial(32, &w(Padding::Same { upper: false }, false), 0), Some((16, 1, 0)));
        assert_eq!(spatial(32, &w(Padding::Valid, false), 0), Some((15, 0, 0)));
        assert_eq!(spatial(4, &w(Padding::Valid, true), 0), Some((2, 0, 0)));
        assert_eq!(spatial(2, &w(Padding::Valid, false), 0), None);
        assert_eq!(spatial(0, &w(Padding::Same { upper: true }, false), 0), None, "empty axis");
    }

    #[test]
    fn views_resolve_their_shapes() {
        let reshape = |shape: &[i64]| ViewKind::Reshape { shape: shape.to_vec(), allowzero: false };
        assert_eq!(view_shape(&reshape(&[0, -1]), &[2, 3, 4]).unwrap(), vec![2, 12]);
        assert!(view_shape(&reshape(&[5, -1]), &[2, 3, 4]).is_err());
        assert_eq!(view_shape(&ViewKind::Flatten(0), &[2, 3]).unwrap(), vec![1, 6]);
        assert_eq!(view_shape(&ViewKind::Squeeze(Some(vec![-1])), &[2, 1]).unwrap(), vec![2]);
        assert_eq!(
            view_shape(&ViewKind::Unsqueeze(vec![0, 3]), &[2, 3]).unwrap(),
            vec![1, 2, 3, 1]
        );
    }
}
