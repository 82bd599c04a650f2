//! `--verify`: runs the original and the compiled model once in tract on a
//! deterministic input and refuses a compiled model that is visibly wrong.
//!
//! Checks, in order: the compiled outputs have the original's shapes; every
//! output of both is finite; and the model compiled with r = 0 everywhere
//! reproduces the original within `R0_TOLERANCE` (absolute), which catches
//! a broken round trip independently of what merging changes.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use tome_passes::{pb, Dim, Options, Schedule, TensorType};
use tract_onnx::prelude::*;

use crate::run::{floats, Runner};
use crate::Error;

/// Largest |original - compiled with r = 0| accepted on any output value.
pub const R0_TOLERANCE: f32 = 1e-5;
/// `Auto` verifies models of at most this many estimated multiply-accumulates
/// at batch 1 (5 G: ViT-S/16 at 224 px is 4.6 G, ViT-B/16 17.6 G).
pub const CHEAP_MACS: u64 = 5_000_000_000;
/// Seed of the verification input; fixed so that runs are reproducible.
const INPUT_SEED: u64 = 0x70_3E_C0_4D;

/// When to verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    On,
    Off,
    /// Verify when the model is cheap to run (`CHEAP_MACS`).
    Auto,
}

/// What verification did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Skipped(String),
    Passed { outputs: Vec<Vec<usize>>, r0_max_abs: f32 },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Outcome::Skipped(why) => write!(f, "not verified: {why}"),
            Outcome::Passed { outputs, r0_max_abs } => write!(
                f,
                "verified: output shapes {outputs:?} as the original's, finite; r = 0 reproduces the original (max |diff| {r0_max_abs:.1e})"
            ),
        }
    }
}

/// `None` when `mode` asks to verify this model, else why not.
pub fn skip_reason(mode: Mode, proto: &pb::ModelProto, types: &HashMap<String, TensorType>) -> Option<String> {
    match mode {
        Mode::On => None,
        Mode::Off => Some("--verify off".into()),
        Mode::Auto => {
            let macs = estimated_macs(proto, types);
            (macs > CHEAP_MACS).then(|| {
                format!("about {:.1} G multiply-accumulates, over the {} G that --verify auto runs (--verify on forces it)", macs as f64 / 1e9, CHEAP_MACS / 1_000_000_000)
            })
        }
    }
}

/// Multiply-accumulates of the MatMul, Gemm and Conv nodes at batch 1 (any
/// symbolic axis counted as 1), from the inferred types.
pub fn estimated_macs(proto: &pb::ModelProto, types: &HashMap<String, TensorType>) -> u64 {
    let elements = |t: &TensorType| {
        t.shape.iter().map(|d| d.fixed().unwrap_or(1).max(0) as u64).fold(1u64, u64::saturating_mul)
    };
    let dim = |name: &str, axis: usize| types.get(name).and_then(|t| t.dim(axis)).unwrap_or(1).max(0) as u64;
    let Some(graph) = proto.graph.as_ref() else { return 0 };
    let mut total = 0u64;
    for node in &graph.node {
        let (Some(out), Some(a)) = (node.output.first().and_then(|o| types.get(o)), node.input.first()) else { continue };
        let reduced = match node.op_type.as_str() {
            "MatMul" => types.get(a).and_then(|t| t.shape.last()).and_then(Dim::fixed).unwrap_or(1).max(0) as u64,
            "Gemm" => {
                let trans_a = node.attribute.iter().any(|at| at.name == "transA" && at.i != 0);
                dim(a, if trans_a { 0 } else { 1 })
            }
            "Conv" => match node.input.get(1).and_then(|w| types.get(w)) {
                Some(w) => w.shape.iter().skip(1).map(|d| d.fixed().unwrap_or(1).max(0) as u64).fold(1, u64::saturating_mul),
                None => 1,
            },
            _ => continue,
        };
        total = total.saturating_add(elements(out).saturating_mul(reduced));
    }
    total
}

/// Runs `original`, `compiled` and `original` compiled with r = 0 in tract
/// on one seeded pseudo-random input of batch 1 and checks them (module docs).
pub fn verify(original: &pb::ModelProto, compiled: &pb::ModelProto, dir: &Path, opts: &Options) -> Result<Outcome, Error> {
    let fail = |why: String| Err(Error::Verification(why));
    let reference = Runner::from_proto(original, dir)?;
    let inputs = deterministic_inputs(&reference)?;
    let expected = reference.run(inputs.clone())?;
    let names = &reference.output_names;
    for (name, y) in names.iter().zip(&expected) {
        if !is_finite(y) {
            return fail(format!("the original model's output {name} is not finite on the verification input, so nothing can be compared"));
        }
    }
    let got = Runner::from_proto(compiled, dir)?.run(inputs.clone())?;
    same_shapes(names, &expected, &got, "the compiled model")?;
    for (name, y) in names.iter().zip(&got) {
        if !is_finite(y) {
            return fail(format!("the compiled model's output {name} has NaN or infinite values"));
        }
    }
    let mut r0 = original.clone();
    let r0_opts = Options { schedule: Schedule::Constant(0), ..opts.clone() };
    crate::compile(&mut r0, dir, &r0_opts)?;
    let identity = Runner::from_proto(&r0, dir)?.run(inputs)?;
    same_shapes(names, &expected, &identity, "the model compiled with r = 0")?;
    let mut r0_max_abs = 0f32;
    for ((name, a), b) in names.iter().zip(&expected).zip(&identity) {
        let diff = max_abs_diff(a, b).unwrap_or(f32::INFINITY);
        if !(diff <= R0_TOLERANCE) {
            return fail(format!("with r = 0 the output {name} differs from the original by {diff:e} (tolerance {R0_TOLERANCE:e})"));
        }
        r0_max_abs = r0_max_abs.max(diff);
    }
    Ok(Outcome::Passed { outputs: got.iter().map(|t| t.shape().to_vec()).collect(), r0_max_abs })
}

/// One input per model input, batch 1, values uniform in [-1, 1) from a
/// fixed seed (the scale of normalised pixels).
fn deterministic_inputs(runner: &Runner) -> Result<Vec<Tensor>, Error> {
    let mut state = INPUT_SEED;
    let mut next = move || {
        // SplitMix64.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let mut out = vec![];
    for ((dt, shape), name) in runner.input_facts().into_iter().zip(&runner.input_names) {
        if dt != f32::datum_type() {
            return Err(Error::Verification(format!("input {name} is {dt:?}; verification feeds float32 inputs")));
        }
        let shape: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(axis, d)| match (axis, d) {
                (_, Some(d)) => Ok(*d),
                (0, None) => Ok(1),
                (axis, None) => Err(Error::Verification(format!("input {name} axis {axis} is symbolic; only the batch axis may be"))),
            })
            .collect::<Result<_, _>>()?;
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n as u64 <= crate::validate::MAX_ELEMENTS);
        let count = count.ok_or_else(|| Error::TooLarge { what: format!("input {name}"), why: format!("shape {shape:?}") })?;
        let data: Vec<f32> = (0..count).map(|_| next()).collect();
        out.push(Tensor::from_shape(&shape, &data).map_err(|e| Error::Verification(e.to_string()))?);
    }
    Ok(out)
}

fn same_shapes(names: &[String], expected: &[Tensor], got: &[Tensor], what: &str) -> Result<(), Error> {
    if expected.len() != got.len() {
        return Err(Error::Verification(format!("{what} has {} outputs, the original {}", got.len(), expected.len())));
    }
    for ((name, a), b) in names.iter().zip(expected).zip(got) {
        if a.shape() != b.shape() {
            return Err(Error::Verification(format!("{what}'s output {name} is {:?}, the original's {:?}", b.shape(), a.shape())));
        }
    }
    Ok(())
}

fn is_finite(t: &Tensor) -> bool {
    floats(t).is_none_or(|v| v.iter().all(|x| x.is_finite()))
}

/// Largest absolute difference of two float32 tensors; 0 for equal non-float
/// tensors, `None` when they cannot be compared.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Option<f32> {
    match (floats(a), floats(b)) {
        (Some(x), Some(y)) => Some(x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max)),
        _ => (a == b).then_some(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_count_matmul_rows_times_reduced_axis() {
        let ty = |shape: &[i64]| TensorType::new(1, shape.iter().map(|&d| Dim::Fixed(d)).collect());
        let types: HashMap<String, TensorType> =
            [("a".to_string(), ty(&[1, 197, 64])), ("w".to_string(), ty(&[64, 256])), ("y".to_string(), ty(&[1, 197, 256]))]
                .into();
        let node = pb::NodeProto {
            op_type: "MatMul".into(),
            input: vec!["a".into(), "w".into()],
            output: vec!["y".into()],
            ..Default::default()
        };
        let proto = pb::ModelProto { graph: Some(pb::GraphProto { node: vec![node], ..Default::default() }), ..Default::default() };
        assert_eq!(estimated_macs(&proto, &types), 197 * 256 * 64);
    }
}
