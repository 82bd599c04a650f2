//! Every fixture × every reference schedule, prop-attn on and off: the
//! compiled model must match the reference ToMe logits in tract and in
//! onnxruntime, with the reference's tokens per block; r = 0 must give the
//! original model. `--target tensorrt` must give the same model, pass the
//! TensorRT parser check, and so match the references too: tract runs the
//! default target's file, onnxruntime the tensorrt target's.

mod common;

use common::*;
use tome_compile::check::check_tensorrt;
use tome_compile::tensorrt_rules::TrtVersion;
use tome_compile::{Format, Target};

/// Compiles `source` for TensorRT next to `default` and checks that the
/// target changes nothing and passes the parser rules; returns its path.
fn tensorrt_twin(source: &std::path::Path, default: &std::path::Path, opts: &tome_compile::Options) -> std::path::PathBuf {
    let out = default.with_extension("tensorrt.onnx");
    tome_compile::compile_file_with(source, &out, opts, Target::TensorRt, Format::Onnx).expect("compile --target tensorrt");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(default).unwrap(), "{}: tensorrt target differs", out.display());
    let file = tome_compile::onnx_io::read(&out).unwrap();
    let report = check_tensorrt(&file.proto, None, &TrtVersion::ALL);
    let errors: Vec<String> = report.errors().map(|f| f.to_string()).collect();
    assert!(errors.is_empty(), "{}: {errors:#?}", out.display());
    out
}

fn check_case(case: &str, model: &str) {
    let refs = references(case);
    let dir = tempfile::tempdir().expect("tempdir");
    let source = fixture(&format!("{case}/{model}"));
    let npz = fixture(&format!("{case}/io.npz"));
    let mut ort_cases = vec![];
    for (key, r) in SCHEDULES {
        for prop in [1, 0] {
            let name = format!("{key}_prop{prop}");
            let out = dir.path().join(format!("{name}.onnx"));
            let opts = options(r, prop == 1);
            let report = compile_to(&source, &out, &opts);
            let trt = tensorrt_twin(&source, &out, &opts);
            assert_eq!(tokens_of(&report), expected_tokens(case, &name), "{case}/{model} {name}: tokens per block");
            let y = run_tract(&out, &refs);
            let err = max_relative_error(&y, &refs[&format!("logits_{name}")]);
            println!("tract {case}/{model} {name}: max relative error {err:.3e}");
            assert!(err <= 1e-4, "{case}/{model} {name}: tract relative error {err:e} > 1e-4");
            ort_cases.push((trt, npz.clone(), format!("logits_{name}")));
        }
    }
    let out = dir.path().join("r0.onnx");
    compile_to(&source, &out, &options("0", true));
    let err = max_abs_error(&run_tract(&out, &refs), &refs["logits_r0"]);
    assert!(err <= 1e-5, "{case}/{model} r=0: tract abs error {err:e} > 1e-5");
    ort_cases.push((out, npz.clone(), "logits_r0".to_string()));
    check_with_onnxruntime(dir.path(), &ort_cases);
}

#[test]
fn timm_vit_classic_export_matches_reference_tome() {
    check_case("timm_vit", "model.onnx");
}

#[test]
fn timm_vit_dynamo_export_matches_reference_tome() {
    check_case("timm_vit", "model_dynamo.onnx");
}

#[test]
fn deit_keeps_cls_and_dist_tokens_in_front() {
    check_case("timm_deit_distilled", "model.onnx");
}

#[test]
fn average_pool_head_becomes_size_weighted() {
    check_case("timm_vit_gap", "model.onnx");
}
