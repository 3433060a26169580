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
    /// `y · sigmoid(y)` (SiLU, Swish: `Mul(y, Sigmoid(y))`), with an exponential that
    /// vectorises ([`exp`]).
    Silu,
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
            Self::Silu => Some(("silu", vec![])),
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
            ("silu", []) => Ok(Self::Silu),
            _ => Err(format!("unknown fused activation {kind:?} with {params:?}")),
        }
    }

    /// Applies the activation to `v` in place; see [`Activation::apply_to`].
    #[inline(always)]
    pub fn apply(self, v: &mut [f32]) {
        per_activation!(self, f => {
            for x in v.iter_mut() {
                *x = f(*x);
            }
        });
    }

    /// Writes the activation of `src` into `dst` (as many values as the shorter has).
    /// The loops vectorise, every bound a select (`at_least`, `at_most`) and no
    /// branch. Reading one buffer and writing another matters: in place, a select
    /// that leaves some values as they are (ReLU) compiles to a masked store, and a
    /// kernel reading that row back stalls on it.
    #[inline(always)]
    pub fn apply_to(self, src: &[f32], dst: &mut [f32]) {
        per_activation!(self, f => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = f(x);
            }
        });
    }
}

/// Runs `$body` with `$f` bound to the activation `$act` as a closure of one value: one
/// `match` arm per activation, each with its own copy of `$body` (so each loop
/// vectorises). Bounds are applied lower then upper rather than by `clamp`, which
/// panics on bounds out of order (a model's Clip may have them) and treats NaN
/// differently from ONNX Runtime.
macro_rules! per_activation {
    ($act:expr, $f:ident => $body:block) => {
        match $act {
            Activation::Identity => {
                let $f = |x: f32| x;
                $body
            }
            // NaN stays NaN, as ONNX Runtime's Relu keeps it (`max` would give 0).
            Activation::Relu => {
                let $f = |x: f32| if x < 0.0 { 0.0 } else { x };
                $body
            }
            Activation::Clip { lo, hi } => {
                let $f = |x: f32| at_most(at_least(x, lo), hi);
                $body
            }
            Activation::HardSigmoid { alpha, beta } => {
                let $f = |x: f32| at_most(at_least(alpha * x + beta, 0.0), 1.0);
                $body
            }
            Activation::Gated { alpha, beta, lo, hi, scale } => {
                let $f = |x: f32| x * at_most(at_least(alpha * x + beta, lo), hi) * scale;
                $body
            }
            Activation::Silu => {
                let $f = |x: f32| x / (1.0 + exp(-x));
                $body
            }
        }
    };
}
use per_activation;

/// `x.max(lo)` for a bound that is not NaN (a NaN `x` gives `lo`), as a comparison
/// that compiles to one instruction; `f32::max` takes three for its handling of NaN.
#[inline(always)]
fn at_least(x: f32, lo: f32) -> f32 {
    if x >= lo { x } else { lo }
}

/// `x.min(hi)` for a bound that is not NaN (a NaN `x` gives `hi`), as [`at_least`].
#[inline(always)]
fn at_most(x: f32, hi: f32) -> f32 {
    if x <= hi { x } else { hi }
}

/// `e^x` for `x` in -87..88 (clamped to it: 0 and infinity are not reached),
/// within two ulps, in operations that vectorise (no call, no branch): `x = n·ln 2 + r`
/// with `|r| ≤ ln 2 / 2`, Cephes' degree-6 polynomial for `e^r`, and `2^n` built from its
/// exponent bits. A NaN stays NaN.
#[inline(always)]
#[allow(clippy::unreadable_literal, clippy::excessive_precision, clippy::many_single_char_names)]
pub fn exp(x: f32) -> f32 {
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = n.mul_add(-0.693_359_375, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5e-1);
    let p = (p * r).mul_add(r, r) + 1.0;
    // n sits in the low bits of t's mantissa; 2^n's exponent field is n + 127.
    let bits = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
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
        // NaN: kept by ReLU; taken to a bound by the bounded ones, as `f32::max` and
        // `f32::min` take it (the selects stand in for them).
        let mut v = [f32::NAN];
        Activation::Relu.apply(&mut v);
        assert!(v[0].is_nan());
        let mut v = [f32::NAN];
        Activation::Clip { lo: -1.0, hi: 6.0 }.apply(&mut v);
        assert_eq!(v[0].to_bits(), (-1.0f32).to_bits(), "NaN.max(-1).min(6)");
        let mut v = [f32::NAN];
        Activation::HardSigmoid { alpha: 0.2, beta: 0.5 }.apply(&mut v);
        assert_eq!(v[0].to_bits(), 0.0f32.to_bits(), "NaN.max(0).min(1)");
    }

    #[test]
    fn the_exponential_and_silu_match_the_standard_library() {
        // Both ends of the clamp, around zero, and the points where n changes.
        let mut xs: Vec<f32> = (-8700..=8800).map(|i| i as f32 * 0.01).collect();
        xs.extend([-0.346_573_6, 0.346_573_6, 1e-30, -1e-30, 0.0, -0.0]);
        for &x in &xs {
            let (got, want) = (exp(x), x.exp());
            assert!(
                (got - want).abs() <= 3.0 * f32::EPSILON * want,
                "exp({x}): {got} against {want}"
            );
        }
        assert!(exp(f32::NAN).is_nan());
        let mut v: Vec<f32> = xs.clone();
        v.extend([-1000.0, -100.0, 100.0, 1000.0]);
        let mut got = v.clone();
        Activation::Silu.apply(&mut got);
        for (x, g) in v.iter().zip(&got) {
            let want = f64::from(*x) / (1.0 + (-f64::from(*x)).exp());
            assert!(
                (f64::from(*g) - want).abs() <= 1e-6 * want.abs() + 1e-30,
                "silu({x}): {g} against {want}"
            );
        }
    }
}
