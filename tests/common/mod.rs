//! Helpers shared by the integration tests: fixtures, references, tolerances.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tome_compile::runtime::run::{floats, Runner};
use tome_compile::{onnx, Options, Report, Schedule};
use tract_onnx::prelude::Tensor;

/// Runs the built `tome-compile` command with `args`.
pub fn tome(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tome-compile")).args(args).output().expect("run tome-compile")
}

/// A command's stderr, trimmed.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// A path as a command-line argument.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// The schedules of the fixtures' references, as `--r` spells them.
pub const SCHEDULES: [(&str, &str); 5] = [("r4", "4"), ("r8", "8"), ("r16", "16"), ("r64", "64"), ("decr8", "8:-1")];

pub fn options(r: &str, prop_attn: bool) -> Options {
    Options { schedule: r.parse::<Schedule>().expect("schedule"), prop_attn, unmerge: true, merged_tokens: false, image_size: None, bound: false, ops: tome_compile::Ops::Standard }
}

/// Compiles `model` into `out` with the library API.
pub fn compile_to(model: &Path, out: &Path, opts: &Options) -> Report {
    let mut file = onnx::io::read(model).expect("read fixture");
    let report = tome_compile::compile(&mut file.proto, &file.dir, opts).expect("compile");
    onnx::io::write(&mut file.proto, &file.dir, out).expect("write");
    report
}

/// The reference logits of `case`, and `pixel_values` (from `timm_vit`,
/// where a case shares its four images).
pub fn references(case: &str) -> BTreeMap<String, Tensor> {
    let mut refs = tome_compile::onnx::npz::read(&fixture(&format!("{case}/io.npz"))).expect("io.npz");
    // Audio models take spectrograms (`input_values`): the same place in the harness.
    if let Some(spectrograms) = refs.remove("input_values") {
        refs.insert("pixel_values".into(), spectrograms);
    }
    if !refs.contains_key("pixel_values") {
        let pixels = tome_compile::onnx::npz::read(&pixels_npz(case)).expect("pixels");
        refs.insert("pixel_values".into(), pixels["pixel_values"].clone());
    }
    refs
}

/// The archive holding the input images of `case`.
pub fn pixels_npz(case: &str) -> PathBuf {
    let own = fixture(&format!("{case}/io.npz"));
    let has_pixels = tome_compile::onnx::npz::read(&own).map(|a| a.contains_key("pixel_values") || a.contains_key("input_values")).unwrap_or(false);
    if has_pixels { own } else { fixture("timm_vit/io.npz") }
}

/// Runs `model` in tract on the fixture images, cast to the model's input type.
pub fn run_tract(model: &Path, refs: &BTreeMap<String, Tensor>) -> Tensor {
    let runner = Runner::load(model).expect("tract load");
    let pixels = refs["pixel_values"].cast_to_dt(runner.input_type).expect("cast").into_owned();
    let y = runner.run(vec![pixels]).expect("tract run").remove(0);
    y.cast_to_dt(tract_onnx::prelude::DatumType::F32).expect("cast").into_owned()
}

/// Largest per-image `max |y - ref| / max |ref|`.
pub fn max_relative_error(y: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(y.shape(), reference.shape(), "output shape");
    let (y, r) = (floats(y).expect("f32"), floats(reference).expect("f32"));
    let per_image = r.len() / reference.shape()[0];
    y.chunks(per_image)
        .zip(r.chunks(per_image))
        .map(|(a, b)| {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            diff / b.iter().map(|v| v.abs()).fold(0f32, f32::max)
        })
        .fold(0f32, f32::max)
}

pub fn max_abs_error(y: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(y.shape(), reference.shape(), "output shape");
    let (y, r) = (floats(y).expect("f32"), floats(reference).expect("f32"));
    y.iter().zip(&r).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
}

/// `case.json`'s tokens entering each block then leaving the last, for
/// `key`, where the case records them.
pub fn expected_tokens(case: &str, key: &str) -> Option<Vec<usize>> {
    let text = std::fs::read_to_string(fixture(&format!("{case}/case.json"))).expect("case.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let tokens = json["references"][key]["tokens"].as_array()?;
    Some(tokens.iter().map(|v| v.as_u64().expect("token count") as usize).collect())
}

pub fn tokens_of(report: &Report) -> Vec<usize> {
    let mut t: Vec<usize> = report.blocks.iter().map(|b| b.step.tokens_in).collect();
    t.push(report.tokens_out);
    t
}

/// tome-compile's runtime plugins, (libtome_ort_ops, libtome_ov_ops), built
/// once per test binary into `target/plugins` (a target directory of their
/// own: this one is locked while the tests run).
pub fn plugins() -> &'static (PathBuf, PathBuf) {
    static BUILT: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target/plugins");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .current_dir(root)
            .args(["build", "--quiet", "-p", "tome-onnxruntime-ops", "-p", "tome-openvino-ops", "--target-dir"])
            .arg(&target)
            .output()
            .expect("run cargo build for the plugins");
        assert!(out.status.success(), "building the plugins failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let libs = (target.join("debug/libtome_ort_ops.so"), target.join("debug/libtome_ov_ops.so"));
        assert!(libs.0.exists() && libs.1.exists(), "the plugins were not built: {libs:?}");
        libs
    })
}

/// Runs `tests/ort_check.py` (onnx.checker full check, then onnxruntime and,
/// for float32 models, OpenVINO against the references, both with
/// tome-compile's plugins loaded) on `cases` of (model, case, key); panics
/// with its output when any case fails.
pub fn check_with_onnxruntime(dir: &Path, cases: &[(PathBuf, String, String)]) {
    check_with_onnxruntime_within(dir, cases, None)
}

/// As `check_with_onnxruntime`, with a relative tolerance replacing the spec's.
pub fn check_with_onnxruntime_within(dir: &Path, cases: &[(PathBuf, String, String)], tolerance: Option<f32>) {
    let manifest = dir.join("manifest.txt");
    let tol = tolerance.map(|t| format!(" {t}")).unwrap_or_default();
    let lines: Vec<String> = cases
        .iter()
        .map(|(m, case, k)| {
            let refs = fixture(&format!("{case}/io.npz"));
            format!("{} {} {k} {}{tol}", m.display(), refs.display(), pixels_npz(case).display())
        })
        .collect();
    std::fs::write(&manifest, lines.join("\n")).expect("manifest");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_check.py");
    let (ort_ops, ov_ops) = plugins();
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&manifest)
        .env("TOME_ORT_OPS", ort_ops)
        .env("TOME_OV_OPS", ov_ops)
        .output()
        .expect("python3 must be installed (see .ci/run for the packages)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "onnxruntime/OpenVINO check failed (pip install -r tests/requirements.txt):\n{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("ok   ort ")).count(), cases.len(), "{text}");
}

/// A node named `name` running `op` from `ins` to `outs`.
pub fn node(name: &str, op: &str, ins: &[&str], outs: &[&str], attribute: Vec<tome_passes::pb::AttributeProto>) -> tome_passes::pb::NodeProto {
    tome_passes::pb::NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

/// A graph input or output of element type `elem` and static shape `dims`.
pub fn value(name: &str, elem: i32, dims: &[i64]) -> tome_passes::pb::ValueInfoProto {
    tome_passes::pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(tome_passes::pb::TypeProto {
            value: Some(tome_passes::pb::type_proto::Value::TensorType(tome_passes::pb::type_proto::Tensor {
                elem_type: elem,
                shape: Some(tome_passes::pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tome_passes::pb::tensor_shape_proto::Dimension {
                            value: Some(tome_passes::pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The error compiling `model` with `opts` to a file, checking that nothing was written.
pub fn refusal(model: &Path, opts: &Options) -> tome_compile::Error {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.onnx");
    let err = tome_compile::compile_file(model, &out, opts).expect_err("refused");
    assert!(!out.exists(), "nothing is written on refusal");
    err
}
