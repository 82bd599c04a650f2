//! Reach: the same models written by other exporters, versions and tools
//! (`fixtures/gen/gen_hf_matrix.py`, `gen_tools.py`, `gen_optimum.py`)
//! compile and match their references for every schedule, proportional
//! attention on and off, in tract and onnxruntime, with the reference's
//! tokens per block; what cannot be compiled is refused, naming the node.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use tome_compile::runtime::run::Runner;
use tome_compile::Options;
use tract_onnx::prelude::*;

/// All outputs of `model` in tract on the fixture images, by name.
fn run_named(model: &Path, refs: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let runner = Runner::load(model).expect("tract load");
    let pixels = refs["pixel_values"].cast_to_dt(runner.input_type).expect("cast").into_owned();
    let outputs = runner.run(vec![pixels]).expect("tract run");
    runner.output_names.iter().cloned().zip(outputs).collect()
}

/// Token `t` of every image of a [B, N, C] tensor.
fn token(x: &Tensor, t: usize) -> Tensor {
    x.slice(1, t, t + 1).expect("token").into_shape(&[x.shape()[0], x.shape()[2]]).expect("shape")
}

/// Every schedule of `refs_case` on `case/file`, compared on `output`
/// (token `at` of it when given) with `{key}_{schedule}` references.
fn check_outputs(case: &str, file: &str, refs_case: &str, key: &str, output: Option<&str>, at: Option<usize>, opts: &dyn Fn(&str, bool) -> Options) {
    let refs = references(refs_case);
    let dir = tempfile::tempdir().expect("tempdir");
    let source = fixture(&format!("{case}/{file}"));
    let pick = |outs: &BTreeMap<String, Tensor>| {
        let y = match output {
            Some(name) => outs[name].clone(),
            None => outs.values().next().expect("an output").clone(),
        };
        at.map(|t| token(&y, t)).unwrap_or(y)
    };
    let ort_key = |k: String| match (output, at) {
        (Some(o), Some(t)) => format!("{k}@{o}#{t}"),
        (Some(o), None) => format!("{k}@{o}"),
        _ => k,
    };
    let mut ort = vec![];
    for (schedule, r) in SCHEDULES {
        for prop in [1, 0] {
            let name = format!("{schedule}_prop{prop}");
            let out = dir.path().join(format!("{name}.onnx"));
            let report = compile_to(&source, &out, &opts(r, prop == 1));
            if let Some(expected) = expected_tokens(refs_case, &name) {
                assert_eq!(tokens_of(&report), expected, "{case}/{file} {name}: tokens per block");
            }
            let reference = &refs[&format!("{key}_{name}")];
            let err = max_relative_error(&pick(&run_named(&out, &refs)), reference);
            println!("tract {case}/{file} {name}: max relative error {err:.3e}");
            assert!(err <= 1e-4, "{case}/{file} {name}: tract relative error {err:e} > 1e-4");
            ort.push((out, refs_case.to_string(), ort_key(format!("{key}_{name}"))));
        }
    }
    let out = dir.path().join("r0.onnx");
    compile_to(&source, &out, &opts("0", true));
    let err = max_abs_error(&pick(&run_named(&out, &refs)), &refs[&format!("{key}_r0")]);
    assert!(err <= 1e-5, "{case}/{file} r=0: tract abs error {err:e} > 1e-5");
    ort.push((out, refs_case.to_string(), ort_key(format!("{key}_r0"))));
    check_with_onnxruntime(dir.path(), &ort);
}

/// The compile error for `case/file` with `opts`.
fn refused(case: &str, opts: &Options) -> String {
    refusal(&fixture(&format!("{case}/model.onnx")), opts).to_string()
}

fn check_logits(case: &str, file: &str, refs_case: &str) {
    check_outputs(case, file, refs_case, "logits", None, None, &options);
}

#[test]
fn transformers_materialised_all_true_mask_is_seen_through() {
    // transformers 5.17's TorchScript export: Range(N) >= 0 -> Expand -> Where(mask, 0, -inf) -> Add.
    for file in ["torch2.9_tf5.17_ts17.onnx", "torch2.9_tf5.17_ts14.onnx", "torch2.9_tf5.17_ts17_eager.onnx"] {
        check_logits("hf_vit_matrix", file, "hf_vit_matrix");
    }
}

#[test]
fn dynamo_folded_bool_mask_is_seen_through() {
    // transformers 5.24's dynamo export: a bool constant [1,1,197,1], at opset 18 through Where into
    // every Add, at opset 23 as the Attention op's mask.
    for file in ["torch2.15_tf5.24_dynamo18.onnx", "torch2.15_tf5.24_dynamo23.onnx"] {
        check_logits("hf_vit_matrix", file, "hf_vit_matrix");
    }
}

#[test]
fn hugging_face_vit_across_torch_and_transformers_releases() {
    for file in ["torch2.15_tf5.24_ts17.onnx", "torch2.4_tf4.46_ts17.onnx", "torch2.4_tf4.46_ts14.onnx"] {
        check_logits("hf_vit_matrix", file, "hf_vit_matrix");
    }
}

#[test]
fn torch_2_4_dynamo_export_of_nested_local_functions_is_inlined() {
    // One call of 60 nested functions, shape vectors tract cannot follow
    // (`Abs(Cast(Concat(B, -1, -1)))`) and N baked into `Mul(197, B)`.
    check_logits("hf_vit_matrix", "torch2.4_tf4.46_dynamo18.onnx", "hf_vit_matrix");
}

#[test]
fn timm_vit_across_torch_releases_and_exporters() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("timm_vit_matrix/case.json")).expect("case.json")).expect("json");
    let files: Vec<String> = json["files"].as_object().expect("files").keys().cloned().collect();
    assert!(files.len() >= 7, "{files:?}");
    for file in files {
        check_logits("timm_vit_matrix", &file, "timm_vit");
    }
}

#[test]
fn optimum_vit_with_every_input_dim_symbolic() {
    check_logits("optimum_vit", "model.onnx", "optimum_vit");
}

#[test]
fn optimum_deit_keeps_cls_and_distillation_tokens() {
    check_logits("optimum_deit", "model.onnx", "optimum_deit");
}

fn sized(r: &str, prop: bool) -> Options {
    Options { merged_tokens: true, unmerge: false, image_size: Some([224, 224]), ..options(r, prop) }
}

#[test]
fn optimum_dinov2_needs_the_image_size_its_graph_interpolates_for() {
    let err = refused("optimum_dinov2", &Options { unmerge: false, ..options("8", true) });
    assert!(err.contains("--image-size") && err.contains("pixel_values"), "{err}");
    let err = refused("optimum_dinov2", &Options { unmerge: false, image_size: Some([224, 224]), ..options("8", true) });
    assert!(err.contains("--tokens merged") && err.contains("--unmerge") && err.contains("last_hidden_state"), "{err}");
}

#[test]
fn optimum_dinov2_backbone_cls_token_matches_for_every_schedule() {
    check_outputs("optimum_dinov2", "model.onnx", "optimum_dinov2", "pooler_output", Some("last_hidden_state"), Some(0), &sized);
}

#[test]
fn dinov2_merged_tokens_and_their_sizes_match_the_reference() {
    let refs = references("optimum_dinov2");
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, r, prop) in [("r8_prop1", "8", true), ("decr8_prop0", "8:-1", false)] {
        let out = dir.path().join(format!("merged_{name}.onnx"));
        let report = compile_to(&fixture("optimum_dinov2/model.onnx"), &out, &sized(r, prop));
        assert_eq!(report.merged_outputs, vec!["last_hidden_state".to_string()]);
        let outs = run_named(&out, &refs);
        let err = max_relative_error(&outs["last_hidden_state"], &refs[&format!("last_hidden_state_merged_{name}")]);
        assert!(err <= 1e-4, "{name}: merged tokens, relative error {err:e}");
        let size = &outs[tome_passes::SIZE_OUTPUT];
        assert_eq!(max_abs_error(size, &refs[&format!("tome_size_{name}")]), 0.0, "{name}: sizes");
        for image in tome_compile::runtime::run::floats(size).expect("f32").chunks(size.shape()[1]) {
            assert_eq!(image.iter().sum::<f32>(), 257.0, "{name}: sizes sum to the original token count");
        }
        let unmerged = dir.path().join(format!("unmerged_{name}.onnx"));
        compile_to(&fixture("optimum_dinov2/model.onnx"), &unmerged, &Options { unmerge: true, merged_tokens: false, ..sized(r, prop) });
        let err = max_relative_error(&run_named(&unmerged, &refs)["last_hidden_state"], &refs[&format!("last_hidden_state_unmerged_{name}")]);
        assert!(err <= 1e-4, "{name}: unmerged tokens, relative error {err:e}");
        let ort = vec![
            (out.clone(), "optimum_dinov2".to_string(), format!("last_hidden_state_merged_{name}@last_hidden_state")),
            (out, "optimum_dinov2".to_string(), format!("tome_size_{name}@tome_size")),
            (unmerged, "optimum_dinov2".to_string(), format!("last_hidden_state_unmerged_{name}@last_hidden_state")),
        ];
        check_with_onnxruntime(dir.path(), &ort);
    }
}

#[test]
fn optimum_clip_vision_pooled_output_matches_for_every_schedule() {
    let merged = |r: &str, prop: bool| Options { image_size: None, ..sized(r, prop) };
    check_outputs("optimum_clip_vision", "model.onnx", "optimum_clip_vision", "pooler_output", Some("pooler_output"), None, &merged);
}

#[test]
fn a_mask_that_is_not_all_true_is_refused_naming_the_node() {
    // transformers 5.17's mask with `Range(N) >= 5`: no longer all true, so it computes something
    // merged tokens would misindex. It must be refused, not dropped.
    let mut file = tome_compile::onnx::io::read(&fixture("hf_vit_matrix/torch2.9_tf5.17_ts17.onnx")).expect("read");
    let graph = file.proto.graph.as_mut().expect("graph");
    let ge = graph.node.iter_mut().find(|n| n.op_type == "GreaterOrEqual").expect("the mask's comparison");
    ge.input[1] = "test.start".into();
    graph.initializer.push(tome_passes::graph::int64_tensor("test.start", &[], &[5]));
    let err = tome_compile::compile(&mut file.proto, &file.dir, &options("8", true)).expect_err("refused").to_string();
    assert!(err.contains("/m/vit/layers.0/attention/Add") && err.contains("merged tokens would misindex it"), "{err}");
}

/// Each file of a folder whose `case.json` lists `files` with `references_from`.
fn check_listed(case: &str, skip: &[&str]) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{case}/case.json"))).expect("case.json")).expect("json");
    let files = json["files"].as_object().expect("files");
    let mut checked = 0;
    for (file, meta) in files.iter().filter(|(f, _)| !skip.contains(&f.as_str())) {
        check_logits(case, file, meta["references_from"].as_str().expect("references_from"));
        checked += 1;
    }
    assert!(checked >= 4, "{case}: {checked} files");
}

#[test]
fn graphs_simplified_by_onnxslim_and_onnxsim() {
    check_listed("simplified", &[]);
}

#[test]
fn graphs_rewritten_by_onnxruntime_transformers_optimizer() {
    // Level 99 puts the patch embedding in com.microsoft.nchwc (one CPU's layout): refused in tests/cli.rs.
    check_listed("ort_optimized", &["timm_vit_opt99.onnx"]);
}

#[test]
fn onnxruntime_fused_attention_is_refused_naming_the_node() {
    // onnxruntime's optimizer fuses no ViT attention here; a graph where it did hides the keys.
    let mut file = tome_compile::onnx::io::read(&fixture("ort_optimized/timm_vit_opt1.onnx")).expect("read");
    let graph = file.proto.graph.as_mut().expect("graph");
    let softmax = graph.node.iter_mut().find(|n| n.op_type == "Softmax").expect("a Softmax");
    softmax.op_type = "MultiHeadAttention".into();
    softmax.domain = "com.microsoft".into();
    let name = softmax.name.clone();
    let err = tome_compile::compile(&mut file.proto, &file.dir, &options("8", true)).expect_err("refused").to_string();
    assert!(err.contains(&name) && err.contains("MultiHeadAttention") && err.contains("compile the model as exported"), "{err}");
}

/// onnxruntime's `Attention` (the form `--target onnxruntime` writes, and
/// its optimizer's fusion) is read back: a graph whose every attention is
/// one such node compiles again and matches the reference ToMe; with a
/// mask it is refused, naming the node.
#[test]
fn onnxruntime_attention_nodes_are_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fused = dir.path().join("fused.onnx");
    let file_opts = tome_compile::targets::deploy::FileOptions { target: tome_compile::Target::OnnxRuntime, ..Default::default() };
    let r0 = Options { unmerge: false, ..options("0", true) };
    let compiled = tome_compile::compile_file_checked(&fixture("timm_vit/model.onnx"), &fused, &r0, &file_opts).expect("r = 0 for onnxruntime");
    assert_eq!(compiled.report.fused_attentions, 6);
    let refs = references("timm_vit");
    let out = dir.path().join("r8.onnx");
    let report = compile_to(&fused, &out, &Options { unmerge: false, ..options("8", true) });
    assert!(report.prepared.iter().any(|l| l.contains("6 Attention")), "{:?}", report.prepared);
    let err = max_relative_error(&run_tract(&out, &refs), &refs["logits_r8_prop1"]);
    assert!(err <= 1e-4, "recompiled onnxruntime Attention graph: relative error {err:e} > 1e-4");
    let mut file = tome_compile::onnx::io::read(&fused).expect("read");
    let graph = file.proto.graph.as_mut().expect("graph");
    let attention = graph.node.iter_mut().find(|n| n.op_type == "Attention").expect("an Attention");
    attention.input.resize(4, String::new());
    attention.input[3] = graph.input[0].name.clone();
    let name = attention.name.clone();
    let err = tome_compile::compile(&mut file.proto, &file.dir, &options("8", true)).expect_err("refused").to_string();
    assert!(err.contains(&name) && err.contains("mask"), "{err}");
}
