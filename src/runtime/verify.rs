//! `--verify`: runs the original and the compiled model once in tract on a
//! deterministic input and refuses a compiled model that is visibly wrong.
//!
//! Checks, in order: the compiled outputs have the original's shapes; every
//! output of both is finite; and the model compiled with r = 0 everywhere
//! reproduces the original within `R0_TOLERANCE` (absolute), which catches
//! a broken round trip independently of what merging changes. Last, the
//! prefix count is checked apart from the matcher (`first_patch_row`): a
//! miscounted prefix would merge the wrong tokens and still pass the rest.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use tome_passes::{pb, Options, Report, Schedule, TensorType};
use tract_onnx::prelude::*;

use crate::runtime::run::{floats, Runner};
use crate::Error;

/// Largest |original - compiled with r = 0| accepted on any output value.
pub const R0_TOLERANCE: f32 = 1e-5;
/// `Auto` verifies models of at most this many estimated multiply-accumulates
/// at batch 1 (5 G: ViT-S/16 at 224 px is 4.6 G, ViT-B/16 17.6 G).
pub const CHEAP_MACS: u64 = 5_000_000_000;
const BUG: &str = "this is a tome-compile bug, please report it with the model";
/// Seed of the verification input; fixed so that runs are reproducible.
const INPUT_SEED: u64 = 0x70_3E_C0_4D;

/// When to verify.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    On,
    Off,
    /// Verify when the model is cheap to run (`CHEAP_MACS`) and its inputs
    /// are floating point with only the batch axis symbolic.
    #[default]
    Auto,
}

/// What verification did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Skipped(String),
    Passed { outputs: Vec<Vec<usize>>, r0_max_abs: f32, first_patch: Option<usize> },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Outcome::Skipped(why) => write!(f, "not verified: {why}"),
            Outcome::Passed { outputs, r0_max_abs, first_patch } => {
                write!(
                    f,
                    "verified: output shapes {outputs:?} as the original's, finite; r = 0 reproduces the original (max |diff| {r0_max_abs:.1e})"
                )?;
                match first_patch {
                    Some(row) => write!(f, "; the first patch token is row {row}, as matched"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// `None` when `mode` asks to verify this model, else why not.
pub fn skip_reason(mode: Mode, proto: &pb::ModelProto, types: &HashMap<String, TensorType>) -> Option<String> {
    match mode {
        Mode::On => None,
        Mode::Off => Some("--verify off".into()),
        Mode::Auto => {
            let macs = crate::onnx::macs::count(proto, types).total();
            if macs > CHEAP_MACS {
                return Some(format!(
                    "about {:.1} G multiply-accumulates, over the {} G that --verify auto runs (--verify on forces it)",
                    macs as f64 / 1e9,
                    CHEAP_MACS / 1_000_000_000
                ));
            }
            unverifiable_input(proto, types)
        }
    }
}

/// Why the seeded input cannot be made for some graph input: not floating
/// point, or a symbolic axis other than the batch.
fn unverifiable_input(proto: &pb::ModelProto, types: &HashMap<String, TensorType>) -> Option<String> {
    let graph = proto.graph.as_ref()?;
    let weights: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph.input.iter().filter(|i| !weights.contains(&i.name.as_str())).find_map(|input| {
        let Some(ty) = types.get(&input.name) else { return Some(format!("input {} has no known type", input.name)) };
        if !matches!(ty.elem, 1 | 10 | 11) {
            return Some(format!("input {} is {ty}; verification feeds floating-point inputs", input.name));
        }
        let symbolic = ty.shape.iter().skip(1).any(|d| d.fixed().is_none());
        symbolic.then(|| format!("input {} is {ty}; verification needs every axis but the batch static", input.name))
    })
}

/// Runs `original`, `compiled` and `original` compiled with r = 0 in tract
/// on one seeded pseudo-random input of batch 1 and checks them (module
/// docs). When the original itself gives nothing to compare with (tract
/// cannot run it, or its outputs are not finite), that is an error if
/// `required` (`--verify on`), else a skip.
pub fn verify(original: &pb::ModelProto, compiled: &pb::ModelProto, dir: &Path, opts: &Options, report: &Report, required: bool) -> Result<Outcome, Error> {
    let fail = |why: String| Err(Error::Verification(why));
    let Reference { inputs, expected, names } = match run_original(original, dir) {
        Ok(reference) => reference,
        Err(why) if required => return fail(why),
        Err(why) => return Ok(Outcome::Skipped(why)),
    };
    let run = |model: &pb::ModelProto, what: &str| {
        let outputs = Runner::from_proto(model, dir).and_then(|r| r.run(inputs.clone()));
        outputs.map_err(|e| Error::Verification(format!("tract cannot run {what} ({e}); {BUG}")))
    };
    let got = run(compiled, "the compiled model")?;
    same_shapes(&names, &expected, &got, "the compiled model", opts.merged_tokens)?;
    for (name, y) in names.iter().zip(&got) {
        if !is_finite(y) {
            return fail(format!("the compiled model's output {name} has NaN or infinite values; {BUG}"));
        }
    }
    let mut r0 = original.clone();
    let r0_opts = Options { schedule: Schedule::Constant(0), ..opts.clone() };
    crate::compile(&mut r0, dir, &r0_opts)?;
    let identity = run(&r0, "the model compiled with r = 0")?;
    same_shapes(&names, &expected, &identity, "the model compiled with r = 0", opts.merged_tokens)?;
    let mut r0_max_abs = 0f32;
    for ((name, a), b) in names.iter().zip(&expected).zip(&identity) {
        let diff = max_abs_diff(a, b).unwrap_or(f32::INFINITY);
        if diff.is_nan() || diff > R0_TOLERANCE {
            return fail(format!("with r = 0 the output {name} differs from the original by {diff:e} (tolerance {R0_TOLERANCE:e}); {BUG}"));
        }
        r0_max_abs = r0_max_abs.max(diff);
    }
    let first_patch = first_patch_row(original, dir, &inputs, &report.first_block_input);
    if let Some(row) = first_patch.filter(|&row| row != report.prefix) {
        return fail(format!(
            "moving the first input value changes row {row} of the first block's input first, but the matcher counted {} prefix tokens; {BUG}",
            report.prefix
        ));
    }
    Ok(Outcome::Passed { outputs: got.iter().map(|t| t.shape().to_vec()).collect(), r0_max_abs, first_patch })
}

/// The row of the first block's input (`tokens` [1, N, C]) that the first
/// input value (image 0's top-left pixel, a video's first frame, a
/// spectrogram's first bin) reaches first: the first patch token, after
/// the prefix tokens, which no pixel reaches. Found by running the original
/// twice, the value moved by one; `None` when tract cannot tell.
fn first_patch_row(original: &pb::ModelProto, dir: &Path, inputs: &[Tensor], tokens: &str) -> Option<usize> {
    let mut probe = original.clone();
    probe.graph.as_mut()?.output.push(pb::ValueInfoProto { name: tokens.to_string(), ..Default::default() });
    let runner = Runner::from_proto(&probe, dir).ok()?;
    let mut moved = inputs.to_vec();
    let mut values = as_f32(moved.first()?)?;
    *values.first_mut()? += 1.0;
    let first = Tensor::from_shape(inputs[0].shape(), &values).ok()?;
    moved[0] = first.cast_to_dt(inputs[0].datum_type()).ok()?.into_owned();
    let rows = |inputs: Vec<Tensor>| -> Option<Tensor> { runner.run(inputs).ok()?.pop() };
    let (a, b) = (rows(inputs.to_vec())?, rows(moved)?);
    let width = *a.shape().last()?;
    let (a, b) = (as_f32(&a)?, as_f32(&b)?);
    a.chunks(width.max(1)).zip(b.chunks(width.max(1))).position(|(x, y)| x != y)
}

/// What the original model gives on the seeded input.
struct Reference {
    inputs: Vec<Tensor>,
    expected: Vec<Tensor>,
    names: Vec<String>,
}

/// The original run on the seeded input, or why it gives nothing to compare with.
fn run_original(original: &pb::ModelProto, dir: &Path) -> Result<Reference, String> {
    let cannot = |e: Error| format!("tract cannot run the original model ({e})");
    let runner = Runner::from_proto(original, dir).map_err(cannot)?;
    let inputs = deterministic_inputs(&runner)?;
    let expected = runner.run(inputs.clone()).map_err(cannot)?;
    if let Some((name, _)) = runner.output_names.iter().zip(&expected).find(|(_, y)| !is_finite(y)) {
        return Err(format!("the original model's output {name} is not finite on the verification input"));
    }
    Ok(Reference { inputs, expected, names: runner.output_names.clone() })
}

/// One input per model input, batch 1, values uniform in [-1, 1) from a
/// fixed seed (the scale of normalised pixels), cast to the input's type.
fn deterministic_inputs(runner: &Runner) -> Result<Vec<Tensor>, String> {
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
        if !dt.is_float() {
            return Err(format!("input {name} is {dt:?}; verification feeds floating-point inputs"));
        }
        let shape: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(axis, d)| match (axis, d) {
                (_, Some(d)) => Ok(*d),
                (0, None) => Ok(1),
                (axis, None) => Err(format!("input {name} axis {axis} is symbolic; only the batch axis may be")),
            })
            .collect::<Result<_, _>>()?;
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n as u64 <= crate::onnx::validate::MAX_ELEMENTS);
        let count = count.ok_or_else(|| format!("input {name} of shape {shape:?} is too large to verify"))?;
        let data: Vec<f32> = (0..count).map(|_| next()).collect();
        let tensor = Tensor::from_shape(&shape, &data).and_then(|t| Ok(t.cast_to_dt(dt)?.into_owned()));
        out.push(tensor.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// The outputs have the original's shapes. With `merged` (`--tokens
/// merged`), an output may have fewer tokens (axis 1), and one more output,
/// the sizes, comes last: each image's sizes must add up to the original
/// token count.
fn same_shapes(names: &[String], expected: &[Tensor], got: &[Tensor], what: &str, merged: bool) -> Result<(), Error> {
    let extra = usize::from(merged);
    if expected.len() + extra != got.len() {
        return Err(Error::Verification(format!("{what} has {} outputs, the original {}; {BUG}", got.len(), expected.len())));
    }
    let mut tokens = None;
    for ((name, a), b) in names.iter().zip(expected).zip(got) {
        let shrunk = merged && a.rank() == 3 && b.rank() == 3 && a.shape()[0] == b.shape()[0] && a.shape()[2] == b.shape()[2];
        if shrunk && a.shape()[1] >= b.shape()[1] {
            tokens = Some(a.shape()[1]);
        } else if a.shape() != b.shape() {
            return Err(Error::Verification(format!("{what}'s output {name} is {:?}, the original's {:?}; {BUG}", b.shape(), a.shape())));
        }
    }
    if let (true, Some(sizes)) = (merged, got.last()) {
        let per_image = as_f32(sizes).unwrap_or_default();
        let count = tokens.unwrap_or(0) as f32;
        let rows = sizes.shape().get(1).copied().unwrap_or(1).max(1);
        if per_image.chunks(rows).any(|image| image.iter().sum::<f32>() != count) {
            return Err(Error::Verification(format!("{what}'s token sizes do not add up to the original {count} tokens; {BUG}")));
        }
    }
    Ok(())
}

/// The values of a floating-point tensor (float16, 32 or 64) as float32.
fn as_f32(t: &Tensor) -> Option<Vec<f32>> {
    if !t.datum_type().is_float() {
        return None;
    }
    floats(t.cast_to::<f32>().ok()?.as_ref())
}

fn is_finite(t: &Tensor) -> bool {
    as_f32(t).is_none_or(|v| v.iter().all(|x| x.is_finite()))
}

/// Largest absolute difference of two floating-point tensors; 0 for equal
/// non-float tensors, `None` when they cannot be compared.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Option<f32> {
    match (as_f32(a), as_f32(b)) {
        (Some(x), Some(y)) => Some(x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max)),
        _ => (a == b).then_some(0.0),
    }
}
