//! The command line: the main job, `run`, and bad input. Every bad input must
//! give a one-line error, its documented exit code (README, "Reliability"),
//! no panic and no output file.

mod common;

use std::path::Path;

use common::{fixture, stderr, tome};
use prost::Message;
use tome_compile::onnx;
use tome_passes::pb;

/// Runs a compile that must fail with exit `code`; returns its error line.
fn refused(input: &Path, r: &str, out: &Path, code: i32) -> String {
    let o = tome(&[input.to_str().unwrap(), "--r", r, "-o", out.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(o.status.code(), Some(code), "exit code for: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.lines().count(), 1, "error must be one line: {err}");
    assert!(!out.exists(), "no output file may be written on error");
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
    err
}

#[test]
fn compiles_and_prints_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vit_r16.onnx");
    let model = fixture("timm_vit/model.onnx");
    let o = tome(&[model.to_str().unwrap(), "--r", "16", "-o", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.contains("197 tokens = 1 prefix + 196 patches, head: token 0"), "{text}");
    assert!(text.contains("blocks.5     16    117     101"), "{text}");
    assert!(text.contains("tokens leaving the last block: 101"), "{text}");
    assert!(!text.contains("BipartiteMerge"), "the default target has standard ops only: {text}");
    assert!(out.exists());

    let fused = dir.path().join("vit_r16_tract.onnx");
    let o = tome(&[model.to_str().unwrap(), "--r", "16", "--target", "tract", "-o", fused.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.contains("6 merges as one BipartiteMerge node each: runs in tract with tome-compile's ops only"), "{text}");
    let o = tome(&["run", fused.to_str().unwrap(), "--input", fixture("timm_vit/io.npz").to_str().unwrap()]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("image 3 top-5"), "{}", stderr(&o));
}

#[test]
fn run_prints_top5_from_npz_and_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vit.onnx");
    let model = fixture("timm_vit/model.onnx");
    assert!(tome(&["compile", model.to_str().unwrap(), "--r", "8", "-o", out.to_str().unwrap()]).status.success());
    let npz = fixture("timm_vit/io.npz");
    let o = tome(&["run", out.to_str().unwrap(), "--input", npz.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.contains("logits: [4, 10]") && text.contains("image 3 top-5"), "{text}");

    let png = dir.path().join("gradient.png");
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 128])).save(&png).unwrap();
    let o = tome(&["run", out.to_str().unwrap(), "--image", png.to_str().unwrap(), "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.contains("logits: [1, 10]") && text.contains("image 0 top-5"), "{text}");
}

#[test]
fn a_file_that_is_not_onnx_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("notes.onnx");
    std::fs::write(&input, "this is not a model\n").unwrap();
    let err = refused(&input, "16", &dir.path().join("out.onnx"), 2);
    assert!(err.contains("is not a readable ONNX model"), "{err}");
}

#[test]
fn a_truncated_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("timm_vit/model.onnx")).unwrap();
    let input = dir.path().join("truncated.onnx");
    std::fs::write(&input, &bytes[..bytes.len() / 2]).unwrap();
    let err = refused(&input, "16", &dir.path().join("out.onnx"), 2);
    assert!(err.contains("truncated.onnx"), "{err}");
}

/// A small CNN: Conv → Relu → GlobalAveragePool → Flatten → Gemm.
fn small_cnn() -> pb::ModelProto {
    let f32s = |name: &str, dims: &[i64]| {
        let n: i64 = dims.iter().product();
        tome_passes::graph::float_tensor(name, dims, &vec![0.1; n as usize])
    };
    let node = |op: &str, ins: &[&str], out: &str| common::node(out, op, ins, &[out], vec![]);
    let value = |name: &str, dims: &[i64]| common::value(name, 1, dims);
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(pb::GraphProto {
            name: "cnn".into(),
            node: vec![
                node("Conv", &["x", "w", "b"], "conv"),
                node("Relu", &["conv"], "relu"),
                node("GlobalAveragePool", &["relu"], "pool"),
                node("Flatten", &["pool"], "flat"),
                node("Gemm", &["flat", "fc_w", "fc_b"], "y"),
            ],
            initializer: vec![f32s("w", &[4, 3, 3, 3]), f32s("b", &[4]), f32s("fc_w", &[4, 2]), f32s("fc_b", &[2])],
            input: vec![value("x", &[1, 3, 8, 8])],
            output: vec![value("y", &[1, 2])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn a_model_without_transformer_blocks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cnn.onnx");
    std::fs::write(&input, small_cnn().encode_to_vec()).unwrap();
    // The model itself is valid: tract runs it.
    assert!(tome(&["run", input.to_str().unwrap(), "--image", "/nonexistent.png"]).status.code() == Some(3));
    let err = refused(&input, "16", &dir.path().join("out.onnx"), 2);
    assert!(err.contains("no transformer block found") && err.contains("no Softmax"), "{err}");
}

#[test]
fn negative_r_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(&fixture("timm_vit/model.onnx"), "-1", &dir.path().join("out.onnx"), 1);
    assert!(err.contains("'-1'") && err.contains("0 or more"), "{err}");
}

#[test]
fn a_schedule_longer_than_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(&fixture("timm_vit/model.onnx"), "1,1,1,1,1,1,1", &dir.path().join("out.onnx"), 1);
    assert!(err.contains("7 entries") && err.contains("6 blocks"), "{err}");
}

#[test]
fn the_input_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("model.onnx");
    std::fs::copy(fixture("timm_vit/model.onnx"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let o = tome(&[input.to_str().unwrap(), "--r", "16", "-o", input.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is the input model"), "{}", stderr(&o));
    // The same file named another way is caught too.
    let other = dir.path().join(".").join("model.onnx");
    assert!(!tome(&[input.to_str().unwrap(), "--r", "16", "-o", other.to_str().unwrap()]).status.success());
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn external_data_is_read_and_written() {
    // Move every large initializer of a fixture into an external file.
    let dir = tempfile::tempdir().unwrap();
    let mut file = onnx::io::read(&fixture("timm_vit/model.onnx")).unwrap();
    let mut data = vec![];
    for t in file.proto.graph.as_mut().unwrap().initializer.iter_mut().filter(|t| t.raw_data.len() > 1024) {
        let raw = std::mem::take(&mut t.raw_data);
        t.data_location = Some(1);
        t.external_data = vec![
            pb::StringStringEntryProto { key: "location".into(), value: "weights.bin".into() },
            pb::StringStringEntryProto { key: "offset".into(), value: data.len().to_string() },
            pb::StringStringEntryProto { key: "length".into(), value: raw.len().to_string() },
        ];
        data.extend(raw);
    }
    let input = dir.path().join("external.onnx");
    std::fs::write(dir.path().join("weights.bin"), &data).unwrap();
    std::fs::write(&input, file.proto.encode_to_vec()).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("compiled.onnx");
    let o = tome(&[input.to_str().unwrap(), "--r", "16", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let written = std::fs::read(out_dir.join("compiled.onnx.data")).unwrap();
    assert!(written.len() >= data.len(), "weights stay external");
    let size = std::fs::metadata(&out).unwrap().len();
    assert!(size < 200_000, "weights are not inlined: {size} bytes");
    // Same numbers as the inline fixture.
    let refs = common::references("timm_vit");
    let err = common::max_relative_error(&common::run_tract(&out, &refs), &refs["logits_r16_prop1"]);
    assert!(err <= 1e-4, "relative error {err:e}");
}

#[test]
fn a_head_reading_the_patch_grid_is_refused_without_unmerge() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(&fixture("timm_vit_grid/model.onnx"), "8", &dir.path().join("out.onnx"), 2);
    assert!(err.contains("/Reshape_1 (Reshape)") && err.contains("--unmerge"), "{err}");
    let out = dir.path().join("unmerged.onnx");
    let model = fixture("timm_vit_grid/model.onnx");
    let o = tome(&[model.to_str().unwrap(), "--r", "8", "--unmerge", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn windowed_attention_with_relative_position_bias_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(&fixture("swin_refused/model.onnx"), "8", &dir.path().join("out.onnx"), 2);
    assert!(err.contains("no transformer block found") && err.contains("relative position bias"), "{err}");
    assert!(err.contains("/layers/layers.0/blocks/blocks.0/attn/Add"), "names the node: {err}");
}

#[test]
fn inspect_says_which_attention_it_could_not_match_and_why() {
    let model = fixture("swin_refused/model.onnx");
    let o = tome(&["inspect", model.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(text.contains("attention nodes found: 4"), "{text}");
    assert_eq!(text.matches("not matched:").count(), 4, "{text}");
    assert!(text.contains("/layers/layers.3/blocks/blocks.0/attn/softmax/Softmax (Softmax): not matched:"), "{text}");
    assert!(text.contains("relative position bias"), "{text}");
}

/// Saves fixture image `index` (normalised with mean and std 0.5) as a PNG.
fn fixture_png(index: usize, path: &Path) {
    let refs = common::references("timm_vit");
    let pixels = tome_compile::runtime::run::floats(&refs["pixel_values"]).unwrap();
    let plane = 224 * 224;
    let start = index * 3 * plane;
    let img = image::RgbImage::from_fn(224, 224, |x, y| {
        let at = |c: usize| pixels[start + c * plane + y as usize * 224 + x as usize];
        image::Rgb([0, 1, 2].map(|c| ((at(c) * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8))
    });
    img.save(path).unwrap();
}

#[test]
fn visualize_draws_one_colour_group_per_final_patch_token() {
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("cat.png");
    fixture_png(0, &cat);
    let out = dir.path().join("merged.png");
    let model = fixture("timm_vit/model.onnx");
    let args = [model.to_str().unwrap(), "--r", "16", "--image", cat.to_str().unwrap()];
    let o = tome(&[&["visualize"], &args[..], &["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "-o", out.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    // r = 16 over 6 blocks leaves 101 tokens (case.json): cls + 100 patch tokens.
    let final_patch_tokens = common::expected_tokens("timm_vit", "r16_prop1").unwrap().last().unwrap() - 1;
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("196 patches in {final_patch_tokens} groups")));
    let png = image::open(&out).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (224, 224));
    let mut colours: Vec<[u8; 3]> = png.pixels().map(|p| p.0).filter(|c| *c != [16, 16, 16]).collect();
    colours.sort();
    colours.dedup();
    assert_eq!(colours.len(), final_patch_tokens, "one fill colour per group");
}

#[test]
fn a_backbone_output_of_every_token_names_both_flags_and_inspect_still_reports() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("optimum_dinov2/model.onnx");
    let out = dir.path().join("dino.onnx");
    let o = tome(&[model.to_str().unwrap(), "--r", "8", "--image-size", "224", "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("last_hidden_state") && err.contains("--tokens merged") && err.contains("--unmerge"), "{err}");
    assert!(!out.exists(), "nothing written");
    let o = tome(&["inspect", model.to_str().unwrap(), "--r", "8", "--image-size", "224x224"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("257 = 1 prefix + 256 patches") && text.contains("needs a flag") && text.contains("--tokens merged"), "{text}");
    assert!(text.contains("input pixel_values pinned to [batch, 3, 224, 224] by --image-size"), "{text}");
    let o = tome(&[model.to_str().unwrap(), "--r", "8", "--image-size", "224", "--tokens", "merged", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("graph output last_hidden_state carries the 209 merged tokens"));
}

#[test]
fn visualize_works_on_a_backbone_whose_output_is_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("cat.png");
    fixture_png(0, &cat);
    for (model, extra) in [("timm_vit_features/model.onnx", vec![]), ("optimum_dinov2/model.onnx", vec!["--image-size", "224"])] {
        let out = dir.path().join("merged.png");
        let model = fixture(model);
        let args = [model.to_str().unwrap(), "--r", "8", "--image", cat.to_str().unwrap(), "-o", out.to_str().unwrap()];
        let o = tome(&[&["visualize"], &args[..], &extra[..]].concat());
        assert!(o.status.success(), "{}: {}", model.display(), stderr(&o));
        assert!(image::open(&out).is_ok());
    }
}

#[test]
fn an_image_input_left_symbolic_is_pinned_from_the_position_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vit.onnx");
    let o = tome(&[fixture("optimum_vit/model.onnx").to_str().unwrap(), "--r", "8", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("input pixel_values pinned to [batch, 3, 224, 224] by position embedding"), "{text}");
    let o = tome(&[fixture("optimum_vit/model.onnx").to_str().unwrap(), "--r", "8", "--image-size", "12x", "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn onnxruntime_optimizer_layouts_for_one_cpu_are_refused_naming_the_node() {
    let model = fixture("ort_optimized/timm_vit_opt99.onnx");
    let dir = tempfile::tempdir().unwrap();
    let o = tome(&[model.to_str().unwrap(), "--r", "8", "-o", dir.path().join("x.onnx").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("com.microsoft.nchwc") && stderr(&o).contains("compile the model as exported"), "{}", stderr(&o));
}
