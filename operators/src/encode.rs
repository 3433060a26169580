//! Categorical encoders and ZipMap: OneHotEncoder, LabelEncoder (opsets 1-4),
//! CategoryMapper, ZipMap.

use std::collections::HashMap;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::expandable;

use crate::attrs;
use crate::expand::{Built, Kernel, Node, Out, Shape, expand, gather};

/// A key of a lookup table: strings, integers, or floats (by their bits, every NaN one
/// key, so a NaN key matches NaN inputs).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Str(String),
    Int(i64),
    Float(u64),
}

impl Key {
    fn float(v: f64) -> Self {
        Self::Float(if v.is_nan() { f64::NAN.to_bits() } else { (v + 0.0).to_bits() })
    }

    /// Every element of `t` as a key of the kind `kind` holds.
    fn all(t: &Tensor) -> TractResult<Vec<Self>> {
        let dt = t.datum_type();
        Ok(if dt == String::datum_type() {
            t.try_as_plain_ram()?.as_slice::<String>()?.iter().cloned().map(Self::Str).collect()
        } else if dt.is_float() {
            let cast = t.cast_to::<f64>()?;
            cast.try_as_plain_ram()?.as_slice::<f64>()?.iter().map(|&v| Self::float(v)).collect()
        } else {
            let cast = t.cast_to::<i64>()?;
            cast.try_as_plain_ram()?.as_slice::<i64>()?.iter().map(|&v| Self::Int(v)).collect()
        })
    }
}

/// Up to this many string keys are found by comparing them in turn, which beats hashing
/// every element of a batch; past it, by a hash map.
const SHORT: usize = 16;

/// Keys to positions. Strings are found by `&str`, so an input's elements are never
/// copied to be looked up; numbers through [`Key`].
#[derive(Clone, Debug, PartialEq)]
struct Index {
    /// Every key, numbers and strings.
    keys: HashMap<Key, usize>,
    /// The string keys, when there are at most [`SHORT`] of them.
    short: Vec<(String, usize)>,
}

impl Index {
    fn new(keys: HashMap<Key, usize>) -> Self {
        let strings = keys.keys().filter(|k| matches!(k, Key::Str(_))).count();
        let short = if strings <= SHORT {
            keys.iter()
                .filter_map(|(k, &i)| match k {
                    Key::Str(s) => Some((s.clone(), i)),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        Self { keys, short }
    }

    /// The position of the string key `s`.
    fn string(&self, s: &str) -> Option<usize> {
        if self.short.is_empty() && !self.keys.is_empty() {
            // Past SHORT strings (or none at all: then nothing matches either way).
            return self.keys.get(&Key::Str(s.to_owned())).copied();
        }
        self.short.iter().find(|(k, _)| k == s).map(|&(_, i)| i)
    }

    /// Calls `found` with each element's index and position (`None`: not a key). Strings
    /// are matched as strings, floats as floats (or as integers with `floats_as_ints`,
    /// as ONNX Runtime's one-hot encoder casts them), other numbers as integers.
    fn each(
        &self,
        t: &Tensor,
        floats_as_ints: bool,
        mut found: impl FnMut(usize, Option<usize>) -> TractResult<()>,
    ) -> TractResult<()> {
        let dt = t.datum_type();
        if dt == String::datum_type() {
            for (i, s) in t.try_as_plain_ram()?.as_slice::<String>()?.iter().enumerate() {
                found(i, self.string(s))?;
            }
        } else if dt.is_float() {
            let cast = t.cast_to::<f64>()?;
            for (i, &v) in cast.try_as_plain_ram()?.as_slice::<f64>()?.iter().enumerate() {
                let key = if floats_as_ints { Key::Int(v as i64) } else { Key::float(v) };
                found(i, self.keys.get(&key).copied())?;
            }
        } else {
            let cast = t.cast_to::<i64>()?;
            for (i, &v) in cast.try_as_plain_ram()?.as_slice::<i64>()?.iter().enumerate() {
                found(i, self.keys.get(&Key::Int(v)).copied())?;
            }
        }
        Ok(())
    }
}

/// Maps each input element to a value through a table, with a default for the rest.
#[derive(Clone, Debug, PartialEq)]
pub struct Lookup {
    name: &'static str,
    index: Index,
    /// The values, then the default: a 1-D tensor of `index.len() + 1` elements.
    values: Arc<Tensor>,
}

impl Lookup {
    fn new(
        name: &'static str,
        keys: &Tensor,
        values: &Tensor,
        default: &Tensor,
    ) -> TractResult<Self> {
        if keys.len() != values.len() {
            bail!("{name}: {} keys for {} values", keys.len(), values.len());
        }
        let mut index = HashMap::with_capacity(keys.len());
        for (i, k) in Key::all(keys)?.into_iter().enumerate() {
            index.entry(k).or_insert(i);
        }
        let values = values.clone().into_shape(&[values.len()])?;
        let default = default.cast_to_dt(values.datum_type())?.into_owned().into_shape(&[1])?;
        let both = Tensor::stack_tensors(0, &[values, default])?;
        Ok(Self { name, index: Index::new(index), values: both.into_arc_tensor() })
    }

    fn dt(&self) -> DatumType {
        self.values.datum_type()
    }
}

impl Kernel for Lookup {
    fn name(&self) -> &'static str {
        self.name
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let default = self.values.len() - 1;
        let mut picks = Vec::with_capacity(inputs[0].len());
        self.index.each(&inputs[0], false, |_, at| {
            picks.push(at.unwrap_or(default));
            Ok(())
        })?;
        Ok(tvec![gather(&self.values, &picks)?.into_shape(inputs[0].shape())?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![self.dt().fact(inputs[0].shape.clone())])
    }
}

/// LabelEncoder: opset 1 (`classes_strings`, string to index and back), opsets 2-3
/// (`keys_*` and `values_*` lists) and opset 4 (`keys_tensor`, `values_tensor`).
pub fn label_encoder(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let default_of = |dt: DatumType| -> TractResult<Tensor> {
        if let Some(t) = attrs::tensor(ctx, node, "default_tensor")? {
            return Ok(t);
        }
        Ok(if dt == String::datum_type() {
            tensor0(
                node.get_attr_opt::<String>("default_string")?.unwrap_or_else(|| "_Unused".into()),
            )
        } else if dt.is_float() {
            tensor0(node.get_attr_opt::<f32>("default_float")?.unwrap_or(-0.0))
        } else {
            tensor0(node.get_attr_opt::<i64>("default_int64")?.unwrap_or(-1))
        })
    };
    let list = |suffix: &str| -> TractResult<Option<Tensor>> {
        if let Some(t) = attrs::tensor(ctx, node, &format!("{suffix}_tensor"))? {
            return Ok(Some(t));
        }
        if let Some(v) = node.get_attr_opt_vec::<String>(&format!("{suffix}_strings"))? {
            return Ok(Some(tensor1(&v)));
        }
        if let Some(v) = node.get_attr_opt_vec::<i64>(&format!("{suffix}_int64s"))? {
            return Ok(Some(tensor1(&v)));
        }
        Ok(node.get_attr_opt_vec::<f32>(&format!("{suffix}_floats"))?.map(|v| tensor1(&v)))
    };
    let lookup = if let Some(classes) = node.get_attr_opt_vec::<String>("classes_strings")? {
        // Opset 1: the direction follows the input's type, known only when typing.
        let n = classes.len() as i64;
        let to_index = Lookup::new(
            "LabelEncoder",
            &tensor1(&classes),
            &tensor1(&(0..n).collect::<Vec<_>>()),
            &default_of(i64::datum_type())?,
        )?;
        let to_string = Lookup::new(
            "LabelEncoder",
            &tensor1(&(0..n).collect::<Vec<_>>()),
            &tensor1(&classes),
            &default_of(String::datum_type())?,
        )?;
        return Ok((
            expandable::expand(ByInputType { from_string: to_index, from_other: to_string }),
            vec![],
        ));
    } else {
        let keys = list("keys")?.map_or_else(|| node.bail("no keys"), Ok)?;
        let values = list("values")?.map_or_else(|| node.bail("no values"), Ok)?;
        let default = default_of(values.datum_type())?;
        Lookup::new("LabelEncoder", &keys, &values, &default)
            .or_else(|e| node.bail(&e.to_string()))?
    };
    let dt = lookup.dt();
    expand(lookup, vec![Out::new(dt, Shape::Like)])
}

/// CategoryMapper: strings to integers or integers to strings, by position in two lists.
pub fn category_mapper(_: &ParsingContext, node: &NodeProto) -> Built {
    let ints = node.get_attr_vec::<i64>("cats_int64s")?;
    let strs = node.get_attr_vec::<String>("cats_strings")?;
    node.expect(ints.len() == strs.len(), "cats_int64s and cats_strings of the same length")?;
    let default_int = tensor0(node.get_attr_opt::<i64>("default_int64")?.unwrap_or(-1));
    let default_str =
        tensor0(node.get_attr_opt::<String>("default_string")?.unwrap_or_else(|| "_Unused".into()));
    let from_string =
        Lookup::new("CategoryMapper", &tensor1(&strs), &tensor1(&ints), &default_int)?;
    let from_other = Lookup::new("CategoryMapper", &tensor1(&ints), &tensor1(&strs), &default_str)?;
    Ok((expandable::expand(ByInputType { from_string, from_other }), vec![]))
}

/// A lookup whose direction follows its input's type: strings in, or anything else in.
#[derive(Clone, Debug)]
struct ByInputType {
    from_string: Lookup,
    from_other: Lookup,
}

impl Expansion for ByInputType {
    fn name(&self) -> StaticName {
        self.from_string.name.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        let (a, b) = (self.from_string.dt(), self.from_other.dt());
        s.given(&inputs[0].datum_type, move |s, dt| {
            s.equals(&outputs[0].datum_type, if dt == String::datum_type() { a } else { b })
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let lookup = if model.outlet_fact(inputs[0])?.datum_type == String::datum_type() {
            &self.from_string
        } else {
            &self.from_other
        };
        model.wire_node(prefix, Node(lookup.clone()), inputs)
    }
}

/// OneHotEncoder: a new last axis with a 1 at each element's category.
#[derive(Clone, Debug, PartialEq)]
pub struct OneHotEncoder {
    index: Index,
    categories: usize,
    zeros: bool,
}

impl Kernel for OneHotEncoder {
    fn name(&self) -> &'static str {
        "OneHotEncoder"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let input = &inputs[0];
        let mut shape: TVec<usize> = input.shape().into();
        shape.push(self.categories);
        let mut out = Tensor::zero::<f32>(&shape)?;
        let mut view = out.try_as_plain_ram_mut()?;
        let values = view.as_slice_mut::<f32>()?;
        // Numbers are looked up as integers, as ONNX Runtime casts them.
        self.index.each(input, true, |i, at| {
            match at {
                Some(c) => values[i * self.categories + c] = 1.0,
                None if self.zeros => {}
                None => {
                    bail!("OneHotEncoder: unknown category {} (and zeros = 0)", element(input, i))
                }
            }
            Ok(())
        })?;
        Ok(tvec![out])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        shape.push(self.categories.to_dim());
        Ok(tvec![f32::fact(shape)])
    }
}

/// OneHotEncoder.
pub fn one_hot_encoder(_: &ParsingContext, node: &NodeProto) -> Built {
    let cats = match (
        node.get_attr_opt_vec::<i64>("cats_int64s")?,
        node.get_attr_opt_vec::<String>("cats_strings")?,
    ) {
        (Some(i), None) => tensor1(&i),
        (None, Some(s)) => tensor1(&s),
        _ => return node.bail("exactly one of cats_int64s and cats_strings must be set"),
    };
    node.expect(cats.len() > 0, "at least one category")?;
    let mut index = HashMap::new();
    for (i, k) in Key::all(&cats)?.into_iter().enumerate() {
        index.insert(k, i);
    }
    let zeros = node.get_attr_opt::<i64>("zeros")?.unwrap_or(1) != 0;
    let categories = cats.len();
    expand(
        OneHotEncoder { index: Index::new(index), categories, zeros },
        vec![Out::new(f32::datum_type(), Shape::Append(categories))],
    )
}

/// Element `i` of `t`, for an error message.
fn element(t: &Tensor, i: usize) -> String {
    t.cast_to::<String>()
        .ok()
        .and_then(|s| {
            Some(format!("{:?}", s.try_as_plain_ram().ok()?.as_slice::<String>().ok()?.get(i)?))
        })
        .unwrap_or_else(|| format!("at element {i}"))
}

/// ZipMap, served as the tensor it zips: the `[rows, classes]` probabilities, in the
/// order of its class labels (the Open Inference Protocol has no maps).
#[derive(Clone, Debug, PartialEq)]
pub struct ZipMap;

impl Kernel for ZipMap {
    fn name(&self) -> &'static str {
        "ZipMap"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        Ok(tvec![inputs[0].clone().into_tensor()])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![inputs[0].without_value()])
    }
}

/// ZipMap.
pub fn zip_map(_: &ParsingContext, node: &NodeProto) -> Built {
    let labels = attrs::Labels::read(node, "classlabels_int64s", "classlabels_strings")?;
    node.expect(!labels.is_empty(), "at least one class label")?;
    expand(ZipMap, vec![Out::new(f32::datum_type(), Shape::Like)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<K: Kernel>(k: &K, input: Tensor) -> TractResult<Tensor> {
        Ok(k.eval(&[input.into_tvalue()])?.remove(0))
    }

    #[test]
    fn lookups_with_defaults_and_nan_keys() {
        let l = Lookup::new(
            "LabelEncoder",
            &tensor1(&["a".to_string(), "b".into()]),
            &tensor1(&[3i64, 4]),
            &tensor0(-1i64),
        )
        .unwrap();
        let out = run(&l, tensor2(&[["b".to_string()], ["z".into()]])).unwrap();
        assert_eq!(out, tensor2(&[[4i64], [-1]]));
        let f = Lookup::new(
            "LabelEncoder",
            &tensor1(&[f32::NAN, 1.0]),
            &tensor1(&["nan".to_string(), "one".into()]),
            &tensor0("?".to_string()),
        )
        .unwrap();
        let out = run(&f, tensor1(&[1.0f32, f32::NAN, 2.0])).unwrap();
        assert_eq!(out, tensor1(&["one".to_string(), "nan".into(), "?".into()]));
        assert!(
            Lookup::new("LabelEncoder", &tensor1(&[1i64]), &tensor1(&[1i64, 2]), &tensor0(0i64))
                .is_err()
        );
    }

    #[test]
    fn long_string_tables_are_hashed_and_give_the_same_answers() {
        // Past SHORT keys the index hashes; a duplicate key keeps its first value.
        let mut keys: Vec<String> = (0..SHORT + 4).map(|i| format!("k{i}")).collect();
        keys.push("k3".into());
        let values: Vec<i64> = (0..keys.len() as i64).map(|i| i * 10).collect();
        let l = Lookup::new("LabelEncoder", &tensor1(&keys), &tensor1(&values), &tensor0(-1i64))
            .unwrap();
        assert!(l.index.short.is_empty());
        let input = tensor1(&["k19".to_string(), "k3".into(), String::new(), "k".into()]);
        assert_eq!(run(&l, input).unwrap(), tensor1(&[190i64, 30, -1, -1]));
        let short = Lookup::new(
            "LabelEncoder",
            &tensor1(&keys[..3]),
            &tensor1(&values[..3]),
            &tensor0(-1i64),
        )
        .unwrap();
        assert_eq!(short.index.short.len(), 3);
        let input = tensor2(&[["k2".to_string(), "k0".into()], ["K0".into(), "k2 ".into()]]);
        assert_eq!(run(&short, input).unwrap(), tensor2(&[[20i64, 0], [-1, -1]]));
    }

    #[test]
    fn one_hot_of_strings_and_numbers() {
        let index: HashMap<Key, usize> =
            [(Key::Str("x".into()), 0), (Key::Str("y".into()), 1)].into();
        let enc = OneHotEncoder { index: Index::new(index), categories: 2, zeros: true };
        let out = run(&enc, tensor2(&[["y".to_string()], ["q".into()]])).unwrap();
        assert_eq!(out, tensor3(&[[[0.0f32, 1.0]], [[0.0, 0.0]]]));
        let strict = OneHotEncoder { zeros: false, ..enc };
        let err = run(&strict, tensor1(&["x".to_string(), "q".into()])).unwrap_err().to_string();
        assert!(err.contains("unknown category \"q\""), "{err}");
        let many: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
        let index = many.iter().enumerate().map(|(i, c)| (Key::Str(c.clone()), i)).collect();
        let wide = OneHotEncoder { index: Index::new(index), categories: 40, zeros: true };
        let out = run(&wide, tensor1(&["c39".to_string(), "c40".into()])).unwrap();
        let mut want = vec![0.0f32; 80];
        want[39] = 1.0;
        assert_eq!(out, Tensor::from_shape(&[2, 40], &want).unwrap());
        let ints = OneHotEncoder {
            index: Index::new([(Key::Int(2), 0), (Key::Int(5), 1)].into()),
            categories: 2,
            zeros: true,
        };
        assert_eq!(
            run(&ints, tensor1(&[5.0f32, 2.0])).unwrap(),
            tensor2(&[[0.0f32, 1.0], [1.0, 0.0]])
        );
    }
}
