//! The element-wise activations a convolution of this module applies to its outputs
//! while they are still in registers or cache, instead of tract running one more pass
//! over the whole tensor for each (ONNX Runtime's MLAS fuses them the same way).
//!
//! A fused convolution carries its activation as two attributes on the ONNX `Conv`
//! node, written by the graph rewrite of [`super::fold`] and read by the builder:
//! [`KIND`] names the function and [`PARAMS`] holds its constants.

use tract_onnx::pb::NodeProto;

/// The attribute naming a fused activation.
pub const KIND: &str = "falaj_activation";
/// The attribute holding its constants.
pub const PARAMS: &str = "falaj_activation_params";

/// A function applied to every output of a convolution.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Activation {
    /// The output as it is.
    #[default]
    Identity,
    /// `max(y, 0)`, NaN kept.
    Relu,
    /// `min(max(y, lo), hi)` (ONNX `Clip`; ReLU6 is `Clip(0, 6)`).
    Clip {
        /// Lower bound.
        lo: f32,
        /// Upper bound.
        hi: f32,
    },
    /// `min(max(alpha·y + beta, 0), 1)` (ONNX `HardSigmoid`).
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// `y · min(max(alpha·y + beta, lo), hi) · scale`: ONNX `HardSwish` (alpha 1, beta 3,
    /// 0..6, scale 1/6), `y · HardSigmoid(y)`, and PaddlePaddle's exported
    /// `y · Clip(y + 3, 0, 6) / 6`.
    Gated {
        /// Slope inside the gate.
        alpha: f32,
        /// Offset inside the gate.
        beta: f32,
        /// The gate's lower bound.
        lo: f32,
        /// The gate's upper bound.
        hi: f32,
        /// Factor on the product.
        scale: f32,
    },
}

impl Activation {
    /// The attribute values that describe this activation (`None` for the identity).
    pub fn to_attributes(self) -> Option<(&'static str, Vec<f32>)> {
        match self {
            Self::Identity => None,
            Self::Relu => Some(("relu", vec![])),
            Self::Clip { lo, hi } => Some(("clip", vec![lo, hi])),
            Self::HardSigmoid { alpha, beta } => Some(("hardsigmoid", vec![alpha, beta])),
            Self::Gated { alpha, beta, lo, hi, scale } => {
                Some(("gated", vec![alpha, beta, lo, hi, scale]))
            }
        }
    }

    /// The activation a `Conv` node carries; `Err` for attributes this module did not
    /// write.
    pub fn of_node(node: &NodeProto) -> Result<Self, String> {
        let Some(kind) = node.attribute.iter().find(|a| a.name == KIND) else {
            return Ok(Self::Identity);
        };
        let params =
            node.attribute.iter().find(|a| a.name == PARAMS).map_or(&[][..], |a| &a.floats);
        let kind = String::from_utf8_lossy(&kind.s);
        match (kind.as_ref(), params) {
            ("relu", []) => Ok(Self::Relu),
            ("clip", &[lo, hi]) => Ok(Self::Clip { lo, hi }),
            ("hardsigmoid", &[alpha, beta]) => Ok(Self::HardSigmoid { alpha, beta }),
            ("gated", &[alpha, beta, lo, hi, scale]) => {
                Ok(Self::Gated { alpha, beta, lo, hi, scale })
            }
            _ => Err(format!("unknown fused activation {kind:?} with {params:?}")),
        }
    }

    /// Applies the activation to `v` in place; the loops vectorise. `max` then `min`
    /// rather than `clamp`, which panics on bounds out of order (a model's Clip may have
    /// them) and treats NaN differently from ONNX Runtime.
    #[allow(clippy::manual_clamp)]
    #[inline(always)]
    pub fn apply(self, v: &mut [f32]) {
        match self {
            Self::Identity => {}
            Self::Relu => {
                // NaN stays NaN, as ONNX Runtime's Relu keeps it (`max` would give 0).
                for x in v.iter_mut() {
                    if *x < 0.0 {
                        *x = 0.0;
                    }
                }
            }
            Self::Clip { lo, hi } => {
                for x in v.iter_mut() {
                    *x = x.max(lo).min(hi);
                }
            }
            Self::HardSigmoid { alpha, beta } => {
                for x in v.iter_mut() {
                    *x = (alpha * *x + beta).max(0.0).min(1.0);
                }
            }
            Self::Gated { alpha, beta, lo, hi, scale } => {
                for x in v.iter_mut() {
                    *x = *x * (alpha * *x + beta).max(lo).min(hi) * scale;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_compute_their_definitions_and_survive_the_attributes() {
        let xs = [-8.0f32, -3.0, -1.0, 0.0, 0.5, 2.0, 7.0];
        let cases = [
            (Activation::Relu, [0.0, 0.0, 0.0, 0.0, 0.5, 2.0, 7.0]),
            (Activation::Clip { lo: 0.0, hi: 6.0 }, [0.0, 0.0, 0.0, 0.0, 0.5, 2.0, 6.0]),
            (
                Activation::HardSigmoid { alpha: 0.2, beta: 0.5 },
                [0.0, 0.0, 0.3, 0.5, 0.6, 0.9, 1.0],
            ),
            (
                Activation::Gated { alpha: 1.0, beta: 3.0, lo: 0.0, hi: 6.0, scale: 1.0 / 6.0 },
                [-0.0, -0.0, -1.0 / 3.0, 0.0, 0.5 * 3.5 / 6.0, 2.0 * 5.0 / 6.0, 7.0],
            ),
        ];
        for (act, expected) in cases {
            let mut v = xs;
            act.apply(&mut v);
            for (got, want) in v.iter().zip(expected) {
                assert!((got - want).abs() < 1e-6, "{act:?}: {v:?} against {expected:?}");
            }
            let (kind, params) = act.to_attributes().unwrap();
            let mut node = NodeProto::default();
            node.attribute.push(tract_onnx::pb::AttributeProto {
                name: KIND.into(),
                s: kind.as_bytes().to_vec(),
                ..Default::default()
            });
            node.attribute.push(tract_onnx::pb::AttributeProto {
                name: PARAMS.into(),
                floats: params,
                ..Default::default()
            });
            assert_eq!(Activation::of_node(&node), Ok(act));
        }
        assert_eq!(Activation::of_node(&NodeProto::default()), Ok(Activation::Identity));
    }
}
