//! Review snapshots: a deterministic dump of one rewritten block per family,
//! so any change to the rewrite shows as a diff. Plus the negative case: with
//! r = 0 nothing may change.

mod common;

use common::*;
use tome_compile::onnx;

fn compiled(case_model: &str, r: &str) -> tome_passes::pb::ModelProto {
    let mut file = onnx::io::read(&fixture(case_model)).unwrap();
    tome_compile::compile(&mut file.proto, &file.dir, &options(r, true)).unwrap();
    file.proto
}

/// Block 1 merges after block 0 did, so it shows proportional attention too.
fn block_dump(case_model: &str) -> String {
    tome_passes::dump_nodes(&compiled(case_model, "8"), "blocks.1.tome")
}

#[test]
fn timm_classic_block_rewrite() {
    insta::assert_snapshot!(block_dump("timm_vit/model.onnx"));
}

#[test]
fn timm_dynamo_block_rewrite() {
    let model = compiled("timm_vit/model_dynamo.onnx", "8");
    let mut dump = tome_passes::dump_nodes(&model, "blocks.1.tome");
    // The token count baked into dynamo's Reshape constants, re-spelled per block.
    dump += &tome_passes::dump_nodes(&model, "node_Reshape_4");
    insta::assert_snapshot!(dump);
}

#[test]
fn deit_block_rewrite() {
    insta::assert_snapshot!(block_dump("timm_deit_distilled/model.onnx"));
}

#[test]
fn average_pool_head_rewrite() {
    let model = compiled("timm_vit_gap/model.onnx", "8");
    insta::assert_snapshot!(tome_passes::dump_nodes(&model, "/ReduceMean"));
}

#[test]
fn r0_leaves_the_graph_unchanged() {
    let original = onnx::io::read(&fixture("timm_vit/model.onnx")).unwrap().proto;
    let model = compiled("timm_vit/model.onnx", "0");
    let names = |m: &tome_passes::pb::ModelProto| -> Vec<String> {
        let mut v: Vec<String> = m.graph.as_ref().unwrap().node.iter().map(|n| n.name.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&model), names(&original));
    assert!(!names(&model).iter().any(|n| n.contains(".tome.")));
}

#[test]
fn output_is_deterministic_and_keeps_what_was_not_touched() {
    let a = compiled("timm_vit/model_dynamo.onnx", "16");
    let b = compiled("timm_vit/model_dynamo.onnx", "16");
    use prost::Message;
    assert_eq!(a.encode_to_vec(), b.encode_to_vec());
    let original = onnx::io::read(&fixture("timm_vit/model_dynamo.onnx")).unwrap().proto;
    assert_eq!(a.opset_import, original.opset_import);
    assert_eq!(a.producer_name, original.producer_name);
    assert_eq!(a.metadata_props, original.metadata_props);
    assert_eq!(a.graph.as_ref().unwrap().input, original.graph.as_ref().unwrap().input);
    assert_eq!(a.graph.as_ref().unwrap().output, original.graph.as_ref().unwrap().output);
}

#[test]
fn torchvision_block_rewrite() {
    let model = compiled("torchvision_vit/model.onnx", "8");
    let mut dump = tome_passes::dump_nodes(&model, "blocks.1.tome.prop_attn");
    // The token count torchvision's attention concatenates into its reshapes.
    dump += &tome_passes::dump_nodes(&model, "/encoder/layers/encoder_layer_1/self_attention/Concat_3");
    insta::assert_snapshot!(dump);
}

#[test]
fn fused_attention_op_block_rewrite() {
    let model = compiled("timm_vit_opset23/model.onnx", "8");
    insta::assert_snapshot!(tome_passes::dump_nodes(&model, "blocks.1.tome.prop_attn"));
}

/// `--target tract`: the similarity scores as before, then one
/// `BipartiteMerge` node with DeiT's two protected tokens.
#[test]
fn tract_target_block_rewrite() {
    let mut file = onnx::io::read(&fixture("timm_deit_distilled/model.onnx")).unwrap();
    let opts = tome_compile::Options { ops: tome_compile::Ops::Tract, ..options("8", true) };
    tome_compile::compile(&mut file.proto, &file.dir, &opts).unwrap();
    insta::assert_snapshot!(tome_passes::dump_nodes(&file.proto, "blocks.1.tome"));
}

/// `--target openvino-ops`: one `BipartiteMerge` node reading the block's
/// keys before their Transpose, the attention and its proportional bias in
/// standard ops, with Q·Kᵀ scaled after its MatMul (`lower::scale_after_scores`).
#[test]
fn plugin_target_block_rewrite() {
    let mut file = onnx::io::read(&fixture("timm_deit_distilled/model.onnx")).unwrap();
    let opts = tome_compile::Options { ops: tome_compile::Ops::Merge, ..options("8", true) };
    tome_compile::compile(&mut file.proto, &file.dir, &opts).unwrap();
    insta::assert_snapshot!(tome_passes::dump_nodes(&file.proto, "blocks.1.tome"));
}

/// `--target onnxruntime-ops`: the merge as above, and each attention with
/// its qkv projection as one onnxruntime `Attention` node taking the
/// proportional bias over rows; the merge reads k from its `present`.
#[test]
fn onnxruntime_target_block_rewrite() {
    let mut file = onnx::io::read(&fixture("timm_deit_distilled/model.onnx")).unwrap();
    let opts = tome_compile::Options { ops: tome_compile::Ops::OnnxRuntimeMerge, ..options("8", true) };
    tome_compile::compile(&mut file.proto, &file.dir, &opts).unwrap();
    insta::assert_snapshot!(tome_passes::dump_nodes(&file.proto, "blocks.1.tome"));
}
