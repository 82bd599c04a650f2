//! The ViT families ToMe has no published semantics for (`TOME_SPEC.md`,
//! "Families beyond the classic ViT"): rotary position embeddings and
//! windowed attention are refused, naming the node.

mod common;

use common::*;

/// The compile error for `case`.
fn refusal(case: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.onnx");
    let err = tome_compile::compile_file(&fixture(&format!("{case}/model.onnx")), &out, &options("8", true)).expect_err("refused");
    assert!(!out.exists(), "nothing is written on refusal");
    assert_eq!(tome_compile::ErrorKind::of_pass(match &err {
        tome_compile::Error::Pass(e) => e,
        other => panic!("{case}: not a refusal: {other}"),
    }), tome_compile::ErrorKind::UnsupportedModel);
    err.to_string()
}

#[test]
fn rotary_position_embeddings_are_refused_naming_the_node() {
    let err = refusal("eva02_rotary_refused");
    assert!(err.contains("/m/blocks.0/attn/Mul") && err.contains("rotary position embeddings"), "{err}");
}

#[test]
fn windowed_attention_is_refused_naming_the_node() {
    let err = refusal("vitdet_windowed_refused");
    assert!(err.contains("/m/blocks/blocks.0/attn/Softmax") && err.contains("windowed attention"), "{err}");
}
