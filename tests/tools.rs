//! The tools around the compiler: `check --target tensorrt`, `bench`,
//! `inspect`, `--format nnef` and the in-memory library entry point.
//! Timings are printed, never asserted.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use prost::Message;
use tome_compile::targets::check::check_tensorrt;
use tome_compile::targets::tensorrt_rules::TrtVersion;
use tome_compile::{onnx, Format, Target};
use tome_passes::pb;
use tract_onnx::prelude::*;

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}


fn model(opset: i64, graph: pb::GraphProto) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(graph),
        ..Default::default()
    }
}

/// The paper's scatter-add merge, as its TorchScript export spells it:
/// `ScatterElements(reduction="add")` (opset 16).
fn scatter_add_model() -> pb::ModelProto {
    let reduction = pb::AttributeProto { name: "reduction".into(), r#type: 3, s: b"add".to_vec(), ..Default::default() };
    let axis = pb::AttributeProto { name: "axis".into(), r#type: 2, i: 1, ..Default::default() };
    model(
        16,
        pb::GraphProto {
            name: "scatter_add".into(),
            node: vec![node("blocks.0.merge.scatter_reduce", "ScatterElements", &["x", "dst", "x"], &["y"], vec![axis, reduction])],
            initializer: vec![tome_passes::graph::int64_tensor("dst", &[2, 4], &[0, 0, 1, 1, 2, 2, 3, 3])],
            input: vec![value("x", 1, &[2, 4])],
            output: vec![value("y", 1, &[2, 4])],
            ..Default::default()
        },
    )
}

fn write_model(dir: &Path, name: &str, m: &pb::ModelProto) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    path
}

#[test]
fn check_fails_naming_a_scatter_elements_with_reduction_add() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "scatter_add.onnx", &scatter_add_model());
    let o = tome(&["check", path.to_str().unwrap(), "--target", "tensorrt"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "a model failing the target is unsupported: {out}{err}");
    assert!(!err.contains("panicked"), "{err}");
    for version in ["8.6", "10.x"] {
        let line = out
            .lines()
            .find(|l| l.contains("node blocks.0.merge.scatter_reduce (ScatterElements)") && l.contains(&format!("TensorRT {version}:")))
            .unwrap_or_else(|| panic!("no finding for TensorRT {version}:\n{out}"));
        assert!(line.starts_with("error:") && line.contains("reduction=\"add\""), "{line}");
        assert!(line.contains("[source: onnx-tensorrt"), "each finding names its source: {line}");
    }
    assert!(err.contains("blocks.0.merge.scatter_reduce"), "the error line names the node: {err}");

    let o = tome(&["check", path.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_str(&text(&o).0).expect("check --json prints JSON");
    assert_eq!(json["passed"], false);
    let f = &json["findings"][0];
    assert_eq!((f["node"].as_str(), f["op"].as_str(), f["severity"].as_str()), (Some("blocks.0.merge.scatter_reduce"), Some("ScatterElements"), Some("error")));
}

#[test]
fn check_flags_a_topk_whose_k_is_computed_at_run_time() {
    let k = pb::ValueInfoProto { ..value("k", 7, &[1]) };
    let m = model(
        17,
        pb::GraphProto {
            name: "topk".into(),
            node: vec![node("order", "TopK", &["x", "k"], &["values", "indices"], vec![])],
            input: vec![value("x", 1, &[1, 8]), k],
            output: vec![value("values", 1, &[1, 8]), value("indices", 7, &[1, 8])],
            ..Default::default()
        },
    );
    let report = check_tensorrt(&m, None, &TrtVersion::ALL);
    let f = report.errors().find(|f| f.node == "order").expect("TopK finding");
    assert!(f.why.contains("input 1 (K) k is computed at run time"), "{f}");
    assert_eq!(f.versions, TrtVersion::ALL.to_vec());
}

#[test]
fn check_passes_on_tensorrt_target_outputs() {
    let dir = tempfile::tempdir().unwrap();
    for case_model in ["timm_vit/model.onnx", "timm_vit/model_dynamo.onnx", "timm_deit_distilled/model.onnx", "timm_vit_gap/model.onnx"] {
        let out = dir.path().join(case_model.replace('/', "_"));
        let o = tome(&["compile", fixture(case_model).to_str().unwrap(), "--r", "16", "--target", "tensorrt", "-o", out.to_str().unwrap()]);
        assert!(o.status.success(), "{case_model}: {}", text(&o).1);
        let o = tome(&["check", out.to_str().unwrap(), "--target", "tensorrt"]);
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{case_model}: {stdout}{stderr}");
        assert!(stdout.contains(": 0 errors"), "{stdout}");
    }
}

#[test]
fn tensorrt_target_refuses_to_write_a_model_that_breaks_the_rules() {
    // A model that fails the check before compiling can never pass after it:
    // the refusal must name the node and leave no file behind.
    let mut proto = onnx::io::read(&fixture("timm_vit/model.onnx")).unwrap().proto;
    let graph = proto.graph.as_mut().unwrap();
    let gelu = graph.node.iter_mut().find(|n| n.op_type == "Erf").expect("an Erf");
    gelu.domain = "com.example".into();
    let name = gelu.name.clone();
    proto.opset_import.push(pb::OperatorSetIdProto { domain: "com.example".into(), version: 1 });
    let report = check_tensorrt(&proto, None, &TrtVersion::ALL);
    assert!(report.errors().any(|f| f.node == name), "{:?}", report.findings);
    let err = tome_compile::compile_bytes_for(&proto.encode_to_vec(), &options("8", true), Target::TensorRt);
    // tract runs it (it reads ops by name), so the refusal comes from the TensorRT check.
    match err {
        Err(tome_compile::Error::Target { findings, .. }) => {
            assert!(findings.contains(&name) && findings.contains("com.example"), "{findings}")
        }
        Err(e) => panic!("expected the TensorRT check to refuse, got: {e}"),
        Ok(_) => panic!("a model with a custom-domain op passed --target tensorrt"),
    }
}

#[test]
fn compile_bytes_gives_the_same_model_as_compile_file() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("timm_vit/model.onnx");
    let out = dir.path().join("file.onnx");
    let from_file = tome_compile::compile_file(&source, &out, &options("16", true)).unwrap();
    let bytes = std::fs::read(&source).unwrap();
    let (compiled, report) = tome_compile::compile_bytes(&bytes, &options("16", true)).unwrap();
    assert_eq!(compiled, std::fs::read(&out).unwrap());
    assert_eq!(tokens_of(&report), tokens_of(&from_file));
    let (for_trt, _) = tome_compile::compile_bytes_for(&bytes, &options("16", true), Target::TensorRt).unwrap();
    assert_eq!(for_trt, compiled, "one graph form serves every target");
}

#[test]
fn compile_bytes_refuses_external_data_naming_the_tensor() {
    let mut proto = onnx::io::read(&fixture("timm_vit/model.onnx")).unwrap().proto;
    let t = proto.graph.as_mut().unwrap().initializer.iter_mut().find(|t| t.raw_data.len() > 1024).unwrap();
    t.raw_data.clear();
    t.data_location = Some(1);
    t.external_data = vec![pb::StringStringEntryProto { key: "location".into(), value: "w.bin".into() }];
    let name = t.name.clone();
    let err = tome_compile::compile_bytes(&proto.encode_to_vec(), &options("16", true)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&name) && msg.contains("compile_file"), "{msg}");
}

#[test]
fn nnef_archive_loads_back_in_tract_and_matches_the_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let refs = references("timm_vit");
    for (case_model, key) in [("timm_vit/model.onnx", "logits_r16_prop1"), ("timm_vit/model_dynamo.onnx", "logits_r16_prop1")] {
        let source = fixture(case_model);
        let onnx = dir.path().join("model.onnx");
        let tar = dir.path().join("model.nnef.tar");
        tome_compile::compile_file_with(&source, &onnx, &options("16", true), Target::Portable, Format::Onnx).unwrap();
        tome_compile::compile_file_with(&source, &tar, &options("16", true), Target::Tract, Format::Nnef).unwrap();
        // Plain tract NNEF (tract_core only): no tome-compile extension is needed to load it.
        let plan = tract_nnef::nnef()
            .model_for_path(&tar)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .unwrap_or_else(|e| panic!("{case_model}: tract cannot load the NNEF archive: {e:#}"));
        let y = plan.run(tvec![refs["pixel_values"].clone().into()]).unwrap().remove(0).into_tensor();
        let from_onnx = run_tract(&onnx, &refs);
        let same = max_relative_error(&y, &from_onnx);
        let err = max_relative_error(&y, &refs[key]);
        println!("{case_model}: NNEF vs ONNX {same:.2e}, NNEF vs reference {err:.2e}");
        assert!(same <= 1e-5, "{case_model}: NNEF and ONNX outputs differ by {same:e}");
        assert!(err <= 1e-4, "{case_model}: NNEF vs reference {err:e}");
    }
}

#[test]
fn compile_writes_an_nnef_archive_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("vit.nnef.tar");
    let model = fixture("timm_vit/model.onnx");
    let o = tome(&["compile", model.to_str().unwrap(), "--r", "8", "--format", "nnef", "-o", tar.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let bytes = std::fs::read(&tar).unwrap();
    assert_eq!(&bytes[..10], b"graph.nnef", "a tar whose first entry is graph.nnef");

    let refused = dir.path().join("trt.nnef.tar");
    let o = tome(&["compile", model.to_str().unwrap(), "--r", "8", "--format", "nnef", "--target", "tensorrt", "-o", refused.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--format nnef") && !refused.exists(), "{err}");
}

#[test]
fn bench_times_both_models_once_and_reports_json() {
    let model = fixture("timm_vit/model.onnx");
    let args = ["--iters", "1", "--warmup", "0", "--threads", "1", "--batch", "2", "--json", "--also", "portable,bound", "--profile", "1"];
    let o = tome(&[&["bench", model.to_str().unwrap(), "--r", "16"][..], &args].concat());
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("bench --json prints JSON");
    assert_eq!(json["batch"], 2);
    assert_eq!(json["threads"], 1);
    assert_eq!(json["tokens_out"], 101);
    assert_eq!(json["form"], "tract");
    let also = json["also"].as_array().expect("also");
    let variants: Vec<&str> = also.iter().filter_map(|a| a["variant"].as_str()).collect();
    assert_eq!(variants, ["portable", "bound"], "{out}");
    let timings = [&json["original"], &json["compiled"], &also[0]["timing"], &also[1]["timing"]];
    for t in timings {
        assert_eq!(t["runs_ms"].as_array().map(Vec::len), Some(1), "{out}");
        assert!(t["median_ms"].as_f64().is_some_and(f64::is_finite), "{out}");
    }
    // The portable graph merges the same tokens with other ops: its MACs are
    // the tract form's (the fused op's arithmetic is not counted) plus the
    // r x r sums of the merged rows, within 1%.
    let macs = |t: &serde_json::Value| t["macs_per_image"].as_f64().unwrap();
    let (fused, portable) = (macs(&json["compiled"]), macs(&also[0]["timing"]));
    assert!(portable >= fused && portable / fused < 1.01, "{fused} vs {portable}");
    // In the tract form the matching and merge are the BipartiteMerge and the similarity nodes only.
    let merge_ops: Vec<&str> = json["profile"]["merge_by_op"].as_array().unwrap().iter().filter_map(|o| o["op"].as_str()).collect();
    assert!(merge_ops.contains(&"BipartiteMerge") && !merge_ops.contains(&"Topk"), "{merge_ops:?}");
    assert!(json["ideal_speedup"].as_f64().unwrap() > 1.0, "{out}");
    println!("{out}");

    // A dynamo export spells the batch as a symbol in its value_info; bench fixes it all the same.
    let dynamo = fixture("timm_vit/model_dynamo.onnx");
    let o = tome(&["bench", dynamo.to_str().unwrap(), "--r", "8", "--iters", "1", "--warmup", "0", "--batch", "3"]);
    assert!(o.status.success(), "{}", text(&o).1);

    let o = tome(&["bench", model.to_str().unwrap(), "--r", "8", "--iters", "1", "--warmup", "0"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for needle in ["median ms", "p90 ms", "images/s", "original", "compiled --r 8", "x ideal (MACs)"] {
        assert!(out.contains(needle), "missing {needle}:\n{out}");
    }
}

#[test]
fn bench_refuses_zero_threads() {
    let model = fixture("timm_vit/model.onnx");
    let o = tome(&["bench", model.to_str().unwrap(), "--r", "16", "--iters", "1", "--threads", "0"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--threads") && !err.contains("panicked"), "{err}");
}

/// MACs per image of a timm ViT by the textbook formula, for blocks given as
/// (tokens entering, tokens after the merge): per block qkv (3C²), Q·Kᵀ and
/// attention·V (2NC per token), projection (C²) on the N tokens entering,
/// then the MLP (8C² at ratio 4) on the tokens left after the merge; plus
/// the patch embedding and the classifier when `embed_and_head`.
fn vit_macs(blocks: &[(usize, usize)], c: u64, patches: u64, patch: u64, classes: u64, embed_and_head: bool) -> u64 {
    let per_block: u64 = blocks
        .iter()
        .map(|&(n, kept)| {
            let (n, kept) = (n as u64, kept as u64);
            n * 3 * c * c + 2 * n * n * c + n * c * c + kept * 8 * c * c
        })
        .sum();
    let ends = if embed_and_head { patches * c * 3 * patch * patch + c * classes } else { 0 };
    per_block + ends
}

fn schedule_blocks(tokens: usize, r: usize, blocks: usize) -> Vec<(usize, usize)> {
    tome_passes::vit::schedule::plan(&vec![r; blocks], tokens, 1).iter().map(|s| (s.tokens_in, s.tokens_out)).collect()
}

#[test]
fn inspect_counts_macs_like_the_vit_formula() {
    let model = fixture("timm_vit/model.onnx");
    let o = tome(&["inspect", model.to_str().unwrap(), "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let expected = vit_macs(&[(197, 197); 6], 64, 196, 16, 10, true);
    assert_eq!(json["macs_before"].as_u64(), Some(expected), "{out}");
    assert_eq!(json["macs_after"].as_u64(), Some(expected), "r = 0 changes nothing");
    assert_eq!(json["family"].as_str(), Some("image, 14x14 patches"), "{out}");

    let o = tome(&["inspect", model.to_str().unwrap(), "--r", "16", "--target", "tensorrt"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for needle in [
        "6 blocks: 2 heads x head dim 32 = width 64",
        "197 = 1 prefix + 196 patches; head: token 0",
        "proportional attention on, target tensorrt",
        "predicted speedup from MACs",
    ] {
        assert!(out.contains(needle), "missing {needle:?}:\n{out}");
    }
    let last = out.lines().find(|l| l.starts_with("blocks.5")).unwrap_or_default();
    assert_eq!(last.split_whitespace().collect::<Vec<_>>(), ["blocks.5", "16", "16", "117", "101"], "{out}");

    let o = tome(&["inspect", model.to_str().unwrap(), "--r", "16", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
    let after = json["macs_after"].as_u64().unwrap();
    let merging = json["macs_after_merging"].as_u64().unwrap();
    let model_macs = vit_macs(&schedule_blocks(197, 16, 6), 64, 196, 16, 10, true);
    assert_eq!(after - merging, model_macs, "the model's own layers on the merged token counts");
}

#[test]
fn the_mac_formula_gives_the_spec_reduction_for_vit_b_at_r16() {
    // TOME_SPEC.md: ViT-B/16 at r = 16, ideal MAC reduction 2.02x (the blocks).
    let before = vit_macs(&[(197, 197); 12], 768, 196, 16, 1000, false);
    let after = vit_macs(&schedule_blocks(197, 16, 12), 768, 196, 16, 1000, false);
    let ratio = before as f64 / after as f64;
    assert_eq!(format!("{ratio:.2}"), "2.02");
}

#[test]
fn bound_drops_tokens_to_the_compiled_counts_without_merging() {
    let model = fixture("timm_vit/model.onnx");
    let o = tome(&["bench", model.to_str().unwrap(), "--r", "16", "--bound", "--iters", "1", "--warmup", "0", "--threads", "1", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("bench --json prints JSON");
    assert_eq!(json["bound"], true);
    assert_eq!(json["tokens_out"], 101, "the bound keeps ToMe's token counts");

    let dir = tempfile::tempdir().unwrap();
    let (bound, tome_out) = (dir.path().join("bound.onnx"), dir.path().join("tome.onnx"));
    for (path, extra) in [(&bound, Some("--bound")), (&tome_out, None)] {
        let mut args = vec![model.to_str().unwrap(), "--r", "16", "-o", path.to_str().unwrap()];
        args.extend(extra);
        let o = tome(&args);
        assert!(o.status.success(), "{}", text(&o).1);
    }
    let nodes = |p: &Path| pb::ModelProto::decode(std::fs::read(p).unwrap().as_slice()).unwrap().graph.unwrap().node;
    let (bound_nodes, tome_nodes) = (nodes(&bound), nodes(&tome_out));
    assert!(bound_nodes.iter().all(|n| !n.name.contains(".tome.merge") && !n.name.contains(".tome.prop_attn")));
    // One Slice per merging block stands in for the whole merge.
    let slices = bound_nodes.iter().filter(|n| n.name.contains(".tome.bound")).count();
    assert_eq!(slices, 6, "the fixture has 6 blocks");
    assert!(tome_nodes.len() > bound_nodes.len() + 6 * 20, "{} vs {}", tome_nodes.len(), bound_nodes.len());
    // Same token counts, so the same MACs but for the merge's own.
    let o = tome(&["bench", model.to_str().unwrap(), "--r", "16", "--iters", "1", "--warmup", "0", "--threads", "1", "--json"]);
    let tome_json: serde_json::Value = serde_json::from_str(&text(&o).0).expect("bench --json prints JSON");
    let macs = |j: &serde_json::Value| j["compiled"]["macs_per_image"].as_f64().unwrap();
    let (b, t) = (macs(&json), macs(&tome_json));
    assert!(b < t && b > 0.97 * t, "bound {b} vs ToMe {t} MACs");

    // tract's bound keeps the kept tokens with a Gather: a Slice there
    // would move up into the attention's output projection and split it.
    let tract_bound = dir.path().join("tract_bound.onnx");
    let o = tome(&[model.to_str().unwrap(), "--r", "16", "--bound", "--target", "tract", "-o", tract_bound.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let gathers = nodes(&tract_bound).iter().filter(|n| n.name.contains(".tome.bound") && n.op_type == "Gather").count();
    assert_eq!(gathers, 6, "a Gather per merging block");
    let file = onnx::io::read(&tract_bound).unwrap();
    let tract = tract_onnx::Onnx { ignore_value_info: true, ..tome_compile::runtime::tract_ops::onnx() };
    let plan = tract.parse(&file.proto, file.dir.to_str()).unwrap().model.into_optimized().unwrap();
    let split: Vec<_> = plan.nodes().iter().filter(|n| n.name.contains("split-over")).map(|n| n.name.clone()).collect();
    assert!(split.is_empty(), "tract split nodes around the bound: {split:?}");

    let grid = fixture("timm_vit_grid/model.onnx");
    let o = tome(&[grid.to_str().unwrap(), "--r", "8", "--unmerge", "--bound", "-o", dir.path().join("g.onnx").to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("timing bound"), "{err}");
}

#[test]
fn onnxruntimes_optimizer_fuses_the_compiled_graph_and_keeps_its_numbers() {
    // Its SkipLayerNormalization fusion needs its symbolic shape inference, which GatherND's batch dims broke.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r8.onnx");
    let o = tome(&[fixture("timm_vit/model.onnx").to_str().unwrap(), "--r", "8", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_optimizer_check.py");
    let npz = fixture("timm_vit/io.npz");
    let o = Command::new("python3").arg(script).args([out.to_str().unwrap(), "2", "64", npz.to_str().unwrap(), "logits_r8_prop1", "6"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
}

/// The file declares each merge's merged tokens (value_info), so
/// onnxruntime's session fuses past the merges as on the original
/// (BiasGelu needs shapes; without them it fused no block after a merge),
/// for every target onnxruntime runs, and the numbers hold.
#[test]
fn onnxruntime_fuses_past_the_merges_as_on_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("timm_vit/model.onnx");
    let mut outs = vec![];
    for target in ["portable", "onnxruntime", "onnxruntime-ops"] {
        let out = dir.path().join(format!("{target}.onnx"));
        let o = tome(&[source.to_str().unwrap(), "--r", "8", "--target", target, "-o", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let file = onnx::io::read(&out).unwrap();
        let graph = file.proto.graph.as_ref().unwrap();
        let declared: Vec<(String, Vec<i64>)> = graph
            .value_info
            .iter()
            .filter(|v| v.name.contains(".tome.merge"))
            .map(|v| {
                let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else { panic!("{}: no tensor type", v.name) };
                let dims = t.shape.as_ref().unwrap().dim.iter().skip(1).map(|d| match d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v,
                    _ => -1,
                });
                (v.name.clone(), dims.collect())
            })
            .collect();
        let xs: Vec<&Vec<i64>> = declared.iter().filter(|(n, _)| n.ends_with(".x")).map(|(_, d)| d).collect();
        let want: Vec<Vec<i64>> = (1..=6).map(|b| vec![197 - 8 * b, 64]).collect();
        assert_eq!(xs, want.iter().collect::<Vec<_>>(), "{target}: the merged tokens' declared shapes");
        outs.push(out);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_session_check.py");
    let (ort_ops, _) = plugins();
    let npz = fixture("timm_vit/io.npz");
    let o = Command::new("python3").arg(script).arg(ort_ops).arg(&npz).arg("logits_r8_prop1").arg(&source).args(&outs).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    println!("{text}");
    assert!(o.status.success(), "{text}");
}
