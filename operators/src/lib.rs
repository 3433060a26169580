//! The operators Falaj's CPU engine adds to tract: the ONNX-ML set (`ai.onnx.ml`), which
//! scikit-learn, XGBoost and LightGBM models exported by skl2onnx and onnxmltools are made
//! of, implemented natively and registered into tract-onnx's operator registry
//! ([`register`]), so that graphs mixing them with standard operators still load, type
//! and run as one tract plan.
//!
//! Tree ensembles are compiled at load into flat arrays walked several trees (or rows) at
//! a time ([`tree::forest`]). Every operator computes what ONNX Runtime computes,
//! including its choices where the ONNX specification is silent (binary classifiers'
//! score layouts, labels), so that models give the same answers on both.

// tract's `internal` preludes are made to be imported whole: an operator uses dozens of
// their names (facts, tensors, solver rules, macros).
#![allow(clippy::wildcard_imports)]

pub mod attrs;
pub mod control;
pub mod encode;
pub mod expand;
pub mod linear;
pub mod neighbors;
pub mod nn;
pub mod post;
pub mod prep;
pub mod tree;

use tract_onnx::model::OnnxOpRegister;

/// The operators this crate provides (ONNX type names; domain `ai.onnx.ml`, and `If`
/// from the default domain, which tract has but analyses both branches of). The
/// standard operators whose kernels this crate puts in front of tract's are
/// [`NATIVE_STANDARD`].
pub const OPERATORS: &[&str] = &[
    "ArrayFeatureExtractor",
    "Binarizer",
    "CategoryMapper",
    "FeatureVectorizer",
    "If",
    "Imputer",
    "LabelEncoder",
    "LinearClassifier",
    "LinearRegressor",
    "Normalizer",
    "OneHotEncoder",
    "SVMClassifier",
    "SVMRegressor",
    "Scaler",
    "TreeEnsemble",
    "TreeEnsembleClassifier",
    "TreeEnsembleRegressor",
    "ZipMap",
];

/// The standard (`ai.onnx`) operators this crate registers in place of tract's own:
/// ArgMax/ArgMin always natively; Conv (2-D float32, one group or depthwise), MatMul (by constant 2-D
/// weights, with the bias Add and activation after it folded in), Softmax (along the last
/// axis of short rows, or a middle axis) and Scan (skl2onnx's nearest-neighbour distance
/// scan) natively where they suit, by tract's builder otherwise.
pub const NATIVE_STANDARD: &[&str] = &["ArgMax", "ArgMin", "Conv", "MatMul", "Scan", "Softmax"];

/// Which of the standard operators Conv, MatMul and Softmax [`register_with`] puts in
/// front of tract's builders (the others of [`NATIVE_STANDARD`] always are). The engine
/// uses [`Native::ALL`]; the others are for comparing against tract's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Native {
    /// 2-D convolutions of one group and depthwise ones ([`nn::direct`],
    /// [`nn::pointwise`], [`nn::depthwise`]).
    pub conv: bool,
    /// Products by constant 2-D weights ([`nn::dense`]).
    pub matmul: bool,
    /// Opset-13 Softmax ([`mod@nn::softmax`]).
    pub softmax: bool,
}

impl Native {
    /// All three natively where they suit: what the engine registers.
    pub const ALL: Self = Self { conv: true, matmul: true, softmax: true };
    /// All three by tract's builders.
    pub const NONE: Self = Self { conv: false, matmul: false, softmax: false };
}

/// Registers every operator of [`OPERATORS`] and [`NATIVE_STANDARD`] into `registry`,
/// replacing tract's own where it has one.
pub fn register(registry: &mut OnnxOpRegister) {
    register_with(registry, Native::ALL);
}

/// [`register`], with Conv, MatMul and Softmax left to tract where `native` says so
/// (then fold with [`nn::fold::fold_convolutions_for`] the same `native`, and skip
/// [`nn::fold::fold_matmuls`] without native MatMul).
pub fn register_with(registry: &mut OnnxOpRegister, native: Native) {
    // tract's own builders stay behind ours, for the cases ours leave to them.
    if let Some(&conv) = registry.0.get("Conv") {
        let _ = nn::TRACT_CONV.set(conv);
        if native.conv {
            registry.insert("Conv", nn::conv);
        }
    }
    if let Some(&matmul) = registry.0.get("MatMul") {
        let _ = nn::TRACT_MATMUL.set(matmul);
        if native.matmul {
            registry.insert("MatMul", nn::matmul);
        }
    }
    if let Some(&softmax) = registry.0.get("Softmax") {
        let _ = nn::TRACT_SOFTMAX.set(softmax);
        if native.softmax {
            registry.insert("Softmax", nn::softmax);
        }
    }
    if let Some(&scan) = registry.0.get("Scan") {
        let _ = neighbors::TRACT_SCAN.set(scan);
        registry.insert("Scan", neighbors::scan);
    }
    registry.insert("ArgMax", nn::argmax::arg_extreme);
    registry.insert("ArgMin", nn::argmax::arg_extreme);
    registry.insert("ArrayFeatureExtractor", prep::array_feature_extractor);
    registry.insert("Binarizer", prep::binarizer);
    registry.insert("CategoryMapper", encode::category_mapper);
    registry.insert("FeatureVectorizer", prep::feature_vectorizer);
    registry.insert("If", control::parse);
    registry.insert("Imputer", prep::imputer);
    registry.insert("LabelEncoder", encode::label_encoder);
    registry.insert("LinearClassifier", linear::linear_classifier);
    registry.insert("LinearRegressor", linear::linear_regressor);
    registry.insert("Normalizer", prep::normalizer);
    registry.insert("OneHotEncoder", encode::one_hot_encoder);
    registry.insert("SVMClassifier", linear::svm_classifier);
    registry.insert("SVMRegressor", linear::svm_regressor);
    registry.insert("Scaler", prep::scaler);
    registry.insert("TreeEnsemble", tree::ensemble);
    registry.insert("TreeEnsembleClassifier", tree::classifier);
    registry.insert("TreeEnsembleRegressor", tree::regressor);
    registry.insert("ZipMap", encode::zip_map);
}
