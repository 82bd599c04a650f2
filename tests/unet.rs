//! Stable Diffusion UNets (tomesd): every reference configuration of the
//! two fixture UNets, compiled and checked against tomesd's own outputs in
//! tract and onnxruntime at batch 1 and 2; the plan against the blocks
//! tomesd merged; refusals with their one-line errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture, max_relative_error, path, stderr, tome};
use tome_compile::runtime::run::Runner;
use tract_onnx::prelude::*;

/// The command-line flags of a case.json configuration.
fn flags(cfg: &serde_json::Value) -> Vec<String> {
    let mut merge = vec![];
    for (key, name) in [("merge_attn", "attn"), ("merge_crossattn", "crossattn"), ("merge_mlp", "mlp")] {
        if cfg[key] == true {
            merge.push(name);
        }
    }
    vec![
        "--ratio".into(),
        cfg["ratio"].to_string(),
        "--max-downsample".into(),
        cfg["max_downsample"].to_string(),
        "--stride".into(),
        format!("{}x{}", cfg["sy"], cfg["sx"]),
        "--merge".into(),
        merge.join(","),
    ]
}

/// Runs `model` in tract on the case's inputs at `batch` ("b1" or "b2").
fn run_tract(model: &Path, io: &std::collections::BTreeMap<String, Tensor>, batch: &str) -> Tensor {
    let runner = Runner::load(model).expect("tract loads the UNet");
    let inputs = runner.input_names.iter().map(|n| io[&format!("{n}_{batch}")].clone()).collect();
    runner.run(inputs).expect("tract runs the UNet").remove(0)
}

#[test]
fn every_tomesd_configuration_matches_the_reference_in_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = vec![];
    for case in ["sd_unet", "sdxl_unet"] {
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture(&format!("{case}/case.json"))).unwrap()).unwrap();
        let io = tome_compile::onnx::npz::read(&fixture(&format!("{case}/io.npz"))).unwrap();
        let model = fixture(&format!("{case}/model.onnx"));
        for (name, cfg) in meta["configs"].as_object().unwrap() {
            let out: PathBuf = dir.path().join(format!("{case}_{name}.onnx"));
            let mut args = vec![path(&model).to_string(), "-o".into(), path(&out).to_string(), "--json".into()];
            args.extend(flags(cfg));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = tome(&args);
            if cfg["equals_plain"] == true {
                // SDXL at max_downsample 1: tomesd merges nothing; the compiler says so instead.
                assert_eq!(o.status.code(), Some(2), "{case} {name}");
                assert!(stderr(&o).contains("--max-downsample 2 reaches it"), "{}", stderr(&o));
                assert!(!out.exists());
                continue;
            }
            assert!(o.status.success(), "{case} {name}: {}", stderr(&o));
            let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let merging: Vec<(usize, u64, u64)> = report["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| b["r"].as_u64().unwrap() > 0)
                .map(|b| (b["tokens"].as_u64().unwrap() as usize, b["downsample"].as_u64().unwrap(), b["r"].as_u64().unwrap()))
                .collect();
            let expected: Vec<(usize, u64, u64)> = cfg["merging_blocks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| (b["tokens"].as_u64().unwrap() as usize, b["downsample"].as_u64().unwrap(), b["r"].as_u64().unwrap()))
                .collect();
            assert_eq!(merging, expected, "{case} {name}: the blocks tomesd merged, with their tokens, downsample and r");
            for batch in ["b1", "b2"] {
                let y = run_tract(&out, &io, batch);
                let err = max_relative_error(&y, &io[&format!("out_{name}_{batch}")]);
                assert!(err <= 1e-4, "{case} {name} {batch}: tract relative error {err}");
            }
            manifest.push(format!("{} {} {name}", path(&out), path(&fixture(&format!("{case}/io.npz")))));
        }
    }
    assert_eq!(manifest.len(), 8 + 4, "8 sd_unet and 4 sdxl_unet configurations merge (its 4 at max_downsample 1 do not)");
    check_with_onnxruntime(dir.path(), &manifest);
}

fn check_with_onnxruntime(dir: &Path, manifest: &[String]) {
    let file = dir.join("manifest.txt");
    std::fs::write(&file, manifest.join("\n")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/unet_check.py");
    let out = Command::new("python3").arg(script).arg(&file).output().expect("python3 (see .ci/run)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("ok ort ")).count(), 2 * manifest.len(), "{text}");
}

#[test]
fn optimums_export_needs_the_latent_size_and_then_matches() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("sd_unet/model_optimum.onnx");
    let out = dir.path().join("out.onnx");
    let o = tome(&[path(&model), "--ratio", "0.5", "-o", path(&out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pass --latent HxW") && stderr(&o).lines().count() == 1, "{}", stderr(&o));
    assert!(!out.exists());
    let o = tome(&[path(&model), "--ratio", "0.5", "--latent", "16x16", "-o", path(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    // optimum feeds the timestep as a float32 scalar; the harness casts to the declared type.
    check_with_onnxruntime(dir.path(), &[format!("{} {} r0.5_md1_attn", path(&out), path(&fixture("sd_unet/io.npz")))]);
}

#[test]
fn the_compiled_unet_passes_the_tensorrt_rules() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = fixture("sd_unet/model.onnx");
    // 0.3: TopK picks the merging tokens; 0.5 at max_downsample 2: the staying ones (r > src - r there); 0.75: none.
    for (ratio, md) in [("0.3", "1"), ("0.5", "2"), ("0.75", "1")] {
        let args = [path(&model), "--ratio", ratio, "--max-downsample", md, "--merge", "attn,crossattn,mlp", "--target", "tensorrt", "-o", path(&out)];
        let o = tome(&args);
        assert!(o.status.success(), "{ratio}: {}", stderr(&o));
        let o = tome(&["check", path(&out)]);
        assert!(o.status.success(), "{ratio}: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    }
}

#[test]
fn bad_ratios_strides_and_models_are_one_line_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let unet = fixture("sd_unet/model.onnx");
    let cases: [(Vec<&str>, i32, &str); 4] = [
        (vec!["--ratio", "0.8"], 1, "--ratio 0.8: must be in [0, 0.75]"),
        (vec!["--ratio", "-0.1"], 1, "must be in [0, 0.75]"),
        (vec!["--ratio", "0.5", "--stride", "32x32"], 1, "--stride 32x32 does not fit"),
        (vec!["--ratio", "0.5", "--r", "8"], 1, "cannot be used with"),
    ];
    for (flags, code, words) in cases {
        let mut args = vec![path(&unet), "-o", path(&out)];
        args.extend(flags.iter().copied());
        let o = tome(&args);
        assert_eq!(o.status.code(), Some(code), "{flags:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(words), "{flags:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
    // A model with no transformer block: a ViT is matched and its tokens are not a latent grid; a Conv alone has none.
    let vit = tome(&[path(&fixture("timm_vit/model.onnx")), "--ratio", "0.5", "-o", path(&out)]);
    assert_eq!(vit.status.code(), Some(2), "{}", stderr(&vit));
    let conv = dir.path().join("conv.onnx");
    write_conv_only(&conv);
    let o = tome(&[path(&conv), "--ratio", "0.5", "-o", path(&out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no UNet transformer block found"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);
    assert!(!out.exists());
}

/// A one-Conv model over a [batch, 4, 8, 8] latent.
fn write_conv_only(out: &Path) {
    use prost::Message;
    use tome_passes::pb;
    let weight = tome_passes::graph::float_tensor("w", &[4, 4, 1, 1], &[0.5; 16]);
    let graph = pb::GraphProto {
        name: "conv".into(),
        node: vec![common::node("conv", "Conv", &["sample", "w"], &["out_sample"], vec![])],
        initializer: vec![weight],
        input: vec![common::value("sample", 1, &[1, 4, 8, 8])],
        output: vec![common::value("out_sample", 1, &[1, 4, 8, 8])],
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(graph),
        ..Default::default()
    };
    std::fs::write(out, model.encode_to_vec()).unwrap();
}

#[test]
fn a_unet_given_r_points_to_ratio_and_inspect_lists_its_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let unet = fixture("sdxl_unet/model.onnx");
    let o = tome(&[path(&unet), "--r", "8", "-o", path(&dir.path().join("x.onnx"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("this is a UNet with 14 transformer blocks: use --ratio"), "{}", stderr(&o));
    let o = tome(&["inspect", path(&unet), "--ratio", "0.5", "--max-downsample", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let blocks = report["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 14);
    let at_two: Vec<&serde_json::Value> = blocks.iter().filter(|b| b["downsample"] == 2).collect();
    assert_eq!(at_two.len(), 6, "SDXL's first transformer level: 64 tokens at downsample 2");
    assert!(at_two.iter().all(|b| b["tokens"] == 64 && b["r"] == 32 && b["merged"] == serde_json::json!(["attn"])));
    assert!(blocks.iter().filter(|b| b["downsample"] == 4).all(|b| b["r"] == 0));
}

#[test]
fn random_dst_cells_match_tomesd_given_the_same_cells() {
    // fixtures/sd_unet/io_rand.npz: tomesd with use_rand=True, its torch.randint returning the cells
    // that --rand-seed 7 put in the compiled graph for the step (fixtures/gen/gen_sd_random.py).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rand.onnx");
    let o = tome(&[path(&fixture("sd_unet/model.onnx")), "--ratio", "0.5", "--rand-seed", "7", "-o", path(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let again = dir.path().join("again.onnx");
    assert!(tome(&[path(&fixture("sd_unet/model.onnx")), "--ratio", "0.5", "--rand-seed", "7", "-o", path(&again)]).status.success());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap(), "the same seed writes the same bytes");
    let io = tome_compile::onnx::npz::read(&fixture("sd_unet/io.npz")).unwrap();
    let refs = tome_compile::onnx::npz::read(&fixture("sd_unet/io_rand.npz")).unwrap();
    for batch in ["b1", "b2"] {
        let y = run_tract(&out, &io, batch);
        let err = max_relative_error(&y, &refs[&format!("out_rand7_{batch}")]);
        assert!(err <= 1e-4, "{batch}: tract relative error {err}");
    }
    // Batch 1 is odd: tomesd turns its randomness off there, and so does the graph.
    assert!(max_relative_error(&refs["out_rand7_b1"], &io["out_r0.5_md1_attn_b1"]) < 1e-6);
    assert!(max_relative_error(&refs["out_rand7_b2"], &io["out_r0.5_md1_attn_b2"]) > 1e-3, "batch 2 uses random cells");
    let line = format!("{} {} rand7 {}", path(&out), path(&fixture("sd_unet/io.npz")), path(&fixture("sd_unet/io_rand.npz")));
    check_with_onnxruntime(dir.path(), &[line]);
}

#[test]
fn bench_times_a_unet_step_against_its_tomesd_compile() {
    let o = tome(&["bench", path(&fixture("sd_unet/model.onnx")), "--ratio", "0.5", "--iters", "1", "--warmup", "0", "--threads", "1", "--batch", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["unet_ratio"], 0.5);
    assert_eq!(report["batch"], 2);
    let (before, after) = (report["original"]["macs_per_image"].as_u64().unwrap(), report["compiled"]["macs_per_image"].as_u64().unwrap());
    assert!(after < before, "merging removes work: {before} -> {after} MACs");
    assert!(report["compiled"]["median_ms"].as_f64().unwrap() > 0.0);
    let o = tome(&["bench", path(&fixture("sd_unet/model.onnx")), "--ratio", "0.5", "--also", "bound"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}
