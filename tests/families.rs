//! The ViT families beyond the classic one (`TOME_SPEC.md`, "Families
//! beyond the classic ViT"): VideoMAE (tubelet Conv3d, no prefix, mean pool),
//! SigLIP from transformers and timm (no prefix, attention-pooling head), AST
//! (spectrogram patches with overlapping strides, cls + distillation). Every
//! schedule, proportional attention on and off, against references from a
//! PyTorch ToMe forward on the Hugging Face or timm modules
//! (`fixtures/gen/tome_hf.py`, `gen_timm_siglip.py`), in tract,
//! onnxruntime and OpenVINO (with `--target onnxruntime` and
//! `onnxruntime-ops` too: every attention one onnxruntime `Attention`),
//! with the reference's tokens per block. And the families ToMe
//! has no semantics for, refused naming the node.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use tract_onnx::prelude::*;

/// `model` in tract at the references' batch, planned for that batch (the
/// SigLIP export's probe path does not plan with a symbolic batch in tract
/// 0.23); onnxruntime's `Attention` spelled out.
fn run_at_batch(model: &Path, refs: &BTreeMap<String, Tensor>) -> Tensor {
    let file = tome_compile::onnx::io::read(model).expect("read");
    let proto = tome_compile::onnx::tract_readable(&file.proto).expect("spelled out");
    let onnx = tract_onnx::Onnx { ignore_value_info: true, ..tome_compile::runtime::tract_ops::onnx() };
    let mut m = onnx.parse(&proto, file.dir.to_str()).expect("parse").model;
    let x = refs["pixel_values"].clone();
    m.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), x.shape())).expect("fact");
    let plan = m.into_optimized().expect("optimize").into_runnable().expect("plan");
    plan.run(tvec![x.into()]).expect("run").remove(0).into_tensor()
}

fn check_family(case: &str) {
    let refs = references(case);
    let dir = tempfile::tempdir().expect("tempdir");
    let source = fixture(&format!("{case}/model.onnx"));
    let mut ort = vec![];
    for (schedule, r) in SCHEDULES {
        for prop in [1, 0] {
            let name = format!("{schedule}_prop{prop}");
            let out = dir.path().join(format!("{name}.onnx"));
            let report = compile_to(&source, &out, &options(r, prop == 1));
            if let Some(expected) = expected_tokens(case, &name) {
                assert_eq!(tokens_of(&report), expected, "{case} {name}: tokens per block");
            }
            let err = max_relative_error(&run_at_batch(&out, &refs), &refs[&format!("logits_{name}")]);
            println!("tract {case} {name}: max relative error {err:.3e}");
            assert!(err <= 1e-4, "{case} {name}: tract relative error {err:e} > 1e-4");
            ort.push((out.clone(), case.to_string(), format!("logits_{name}")));
            // The onnxruntime targets: every block's attention one
            // onnxruntime `Attention`, and with the plugin one
            // BipartiteMerge a block; in tract (spelled out), and in
            // onnxruntime and OpenVINO with the plugins loaded.
            for (target, ext) in [(tome_compile::Target::OnnxRuntime, "ort.onnx"), (tome_compile::Target::OnnxRuntimeOps, "ortops.onnx")] {
                let twin = out.with_extension(ext);
                let fused = tome_compile::compile_file_with(&source, &twin, &options(r, prop == 1), target, tome_compile::Format::Onnx).expect("compile");
                let merges = if target == tome_compile::Target::OnnxRuntimeOps { report.blocks.iter().filter(|b| b.step.r > 0).count() } else { 0 };
                assert_eq!((fused.fused_merges, fused.fused_attentions), (merges, report.blocks.len()), "{case} {name} {ext}: fused merges and attentions");
                let err = max_relative_error(&run_at_batch(&twin, &refs), &refs[&format!("logits_{name}")]);
                assert!(err <= 1e-4, "{case} {name} {ext}: tract relative error {err:e} > 1e-4");
                ort.push((twin, case.to_string(), format!("logits_{name}")));
            }
        }
    }
    let out = dir.path().join("r0.onnx");
    compile_to(&source, &out, &options("0", true));
    let err = max_abs_error(&run_at_batch(&out, &refs), &refs["logits_r0"]);
    assert!(err <= 1e-5, "{case} r=0: tract abs error {err:e} > 1e-5");
    ort.push((out, case.to_string(), "logits_r0".to_string()));
    check_with_onnxruntime(dir.path(), &ort);
}

#[test]
fn videomae_tubelets_count_as_patches_with_no_prefix() {
    let report = tome_compile::cli::inspect::inspect(&fixture("videomae/model.onnx"), &options("8", true), tome_compile::Target::Portable).expect("inspect");
    assert_eq!(report.report.family, "video, 2x7x7 tubelets (Conv3d)");
    assert_eq!((report.report.prefix, report.report.patches), (0, 98), "2 x 7 x 7 tubelets, no prefix");
    check_family("videomae");
}

#[test]
fn siglip_attention_pool_is_proportional_over_its_keys() {
    let report = tome_compile::cli::inspect::inspect(&fixture("siglip/model.onnx"), &options("8", true), tome_compile::Target::Portable).expect("inspect");
    assert!(report.report.head.starts_with("attention pool"), "{}", report.report.head);
    assert_eq!(report.report.family, "image, 7x7 patches");
    check_family("siglip");
}

#[test]
fn timm_siglip_attention_pool_latent_is_proportional_over_its_keys() {
    // timm's AttentionPoolLatent: batch-first logits [B, H, 1, N]; leaving log(size) out of it
    // moves the output by 0.15 to 0.51 (case.json), so the references tell.
    let report = tome_compile::cli::inspect::inspect(&fixture("timm_siglip/model.onnx"), &options("8", true), tome_compile::Target::Portable).expect("inspect");
    assert!(report.report.head.starts_with("attention pool /attn_pool/Softmax"), "{}", report.report.head);
    check_family("timm_siglip");
}

#[test]
fn ast_spectrogram_patches_keep_cls_and_distillation_in_front() {
    let report = tome_compile::cli::inspect::inspect(&fixture("ast/model.onnx"), &options("8", true), tome_compile::Target::Portable).expect("inspect");
    assert_eq!((report.report.prefix, report.report.family.as_str()), (2, "spectrogram, 12x17 patches"));
    check_family("ast");
}

/// The compile error for `case`, a refusal of an unsupported model.
fn refused(case: &str) -> String {
    let err = refusal(&fixture(&format!("{case}/model.onnx")), &options("8", true));
    assert!(matches!(err, tome_compile::Error::Pass(_)), "{case}: not a refusal by the passes: {err}");
    assert_eq!(err.kind(), tome_compile::ErrorKind::UnsupportedModel, "{case}: {err}");
    err.to_string()
}

#[test]
fn rotary_position_embeddings_are_refused_naming_the_node() {
    let err = refused("eva02_rotary_refused");
    assert!(err.contains("/m/blocks.0/attn/Mul") && err.contains("rotary position embeddings"), "{err}");
}

#[test]
fn windowed_attention_is_refused_naming_the_node() {
    let err = refused("vitdet_windowed_refused");
    assert!(err.contains("/m/blocks/blocks.0/attn/Softmax") && err.contains("windowed attention"), "{err}");
}

#[test]
fn tokens_concatenated_after_the_patches_are_refused_naming_the_concat() {
    // timm_vit with its cls token moved behind the patch tokens: the prefix cannot be
    // protected, and a count taken from shapes alone would be wrong.
    let mut file = tome_compile::onnx::io::read(&fixture("timm_vit/model.onnx")).expect("read");
    let graph = file.proto.graph.as_mut().expect("graph");
    let concat = graph.node.iter_mut().find(|n| n.name == "/Concat_1").expect("the cls Concat");
    concat.input.swap(0, 1);
    let err = tome_compile::compile(&mut file.proto, &file.dir, &options("8", true)).expect_err("refused").to_string();
    assert!(err.contains("/Concat_1 puts tokens after the patch tokens"), "{err}");
}
