//! Reliability of the command line and the library (README, "Reliability"):
//! one documented exit code per kind of error, `--json` errors, `--verify`,
//! caught panics, atomic and byte-identical writes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{fixture, path, stderr, tome};
use prost::Message;
use tome_compile::runtime::verify::{self, Outcome};
use tome_compile::{onnx, Error, ErrorKind};
use tome_passes::pb;

/// Files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Asserts a failed command: exit `code`, one line on stderr, no panic text.
fn assert_fails(o: &Output, code: i32) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit code for: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "a panic was printed: {err}");
    err
}

/// `model` written into `dir` as `name` with `edit` applied.
fn edited(model: &str, dir: &Path, name: &str, edit: impl FnOnce(&mut pb::ModelProto)) -> PathBuf {
    let mut proto = onnx::io::read(&fixture(model)).unwrap().proto;
    edit(&mut proto);
    let out = dir.join(name);
    std::fs::write(&out, proto.encode_to_vec()).unwrap();
    out
}

fn set_floats(proto: &mut pb::ModelProto, tensor: &str, value: f32) {
    let t = proto.graph.as_mut().unwrap().initializer.iter_mut().find(|t| t.name == tensor).expect("tensor");
    let n = t.raw_data.len() / 4;
    t.raw_data = std::iter::repeat_n(value.to_le_bytes(), n).flatten().collect();
}

/// The timm fixture with its large weights moved to `weights.bin` in `dir`.
fn with_external_data(dir: &Path) -> PathBuf {
    let mut file = onnx::io::read(&fixture("timm_vit/model.onnx")).unwrap();
    let mut data = vec![];
    for t in file.proto.graph.as_mut().unwrap().initializer.iter_mut().filter(|t| t.raw_data.len() > 1024) {
        let raw = std::mem::take(&mut t.raw_data);
        t.data_location = Some(1);
        let entry = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
        t.external_data = vec![entry("location", "weights.bin".into()), entry("offset", data.len().to_string()), entry("length", raw.len().to_string())];
        data.extend(raw);
    }
    std::fs::write(dir.join("weights.bin"), &data).unwrap();
    let model = dir.join("external.onnx");
    std::fs::write(&model, file.proto.encode_to_vec()).unwrap();
    model
}

// ------------------------------------------------------------ exit codes

#[test]
fn usage_errors_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("timm_vit/model.onnx");
    let out = dir.path().join("out.onnx");
    for args in [
        vec!["--bogus"],
        vec![path(&model), "--r", "4"],
        vec![path(&model), "--r", "4", "-o", path(&out), "--verify", "maybe"],
        vec![path(&model), "--r", "four", "-o", path(&out)],
        vec![path(&model), "--r", "4", "-o", path(&model)],
    ] {
        let o = tome(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty());
    }
    assert!(listing(dir.path()).is_empty());
}

#[test]
fn help_and_version_exit_0() {
    assert_eq!(tome(&["--help"]).status.code(), Some(0));
    assert_eq!(tome(&["--version"]).status.code(), Some(0));
}

/// `y = Relu(x)`, x of shape [1, 4], at `opset`.
fn relu_model(opset: i64) -> pb::ModelProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let value = |name: &str| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: [1, 4].iter().map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() }).collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let relu = common::node("relu", "Relu", &["x"], &["y"], vec![]);
    pb::ModelProto {
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(pb::GraphProto { name: "relu".into(), node: vec![relu], input: vec![value("x")], output: vec![value("y")], ..Default::default() }),
        ..Default::default()
    }
}

#[test]
fn a_model_with_an_old_opset_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("opset11.onnx");
    std::fs::write(&input, relu_model(11).encode_to_vec()).unwrap();
    let err = assert_fails(&tome(&[path(&input), "--r", "4", "-o", path(&dir.path().join("out.onnx"))]), 2);
    assert!(err.contains("opset 11 is too old"), "{err}");
    let json = json_error(&tome(&[path(&input), "--r", "4", "-o", path(&dir.path().join("out.onnx")), "--json"]));
    assert_eq!(json["kind"], "unsupported_model");
}

#[test]
fn a_graph_reading_an_undefined_tensor_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let input = edited("timm_vit/model.onnx", dir.path(), "dangling.onnx", |m| {
        m.graph.as_mut().unwrap().node[3].input[0] = "nowhere".into();
    });
    let err = assert_fails(&tome(&[path(&input), "--r", "4", "-o", path(&dir.path().join("out.onnx"))]), 2);
    assert!(err.contains("reads nowhere, which no node, initializer or graph input defines"), "{err}");
}

#[test]
fn io_errors_exit_3_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("timm_vit/model.onnx");
    let err = assert_fails(&tome(&["/nonexistent/model.onnx", "--r", "4", "-o", path(&dir.path().join("out.onnx"))]), 3);
    assert!(err.contains("/nonexistent/model.onnx") && err.contains("No such file"), "{err}");
    let file = dir.path().join("a_file");
    std::fs::write(&file, "not a folder").unwrap();
    let taken = dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    for out in [dir.path().join("missing/out.onnx"), file.join("out.onnx"), taken.clone()] {
        let err = assert_fails(&tome(&[path(&model), "--r", "4", "-o", path(&out)]), 3);
        assert!(err.contains(path(&out)), "the error names the output: {err}");
    }
    assert_eq!(listing(dir.path()), vec!["a_file", "taken"]);
    assert!(listing(&taken).is_empty());
}

#[test]
fn a_model_that_fails_verify_on_exits_4_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = edited("timm_vit/model.onnx", dir.path(), "inf.onnx", |m| set_floats(m, "head.bias", f32::INFINITY));
    let out = dir.path().join("out.onnx");
    let err = assert_fails(&tome(&[path(&input), "--r", "4", "-o", path(&out), "--verify", "on"]), 4);
    assert!(err.contains("verification failed") && err.contains("not finite"), "{err}");
    assert!(!out.exists());
    // Without --verify on, a model that gives nothing to compare with is written, saying so.
    for flags in [vec![], vec!["--verify", "off"]] {
        let o = tome(&[&[path(&input), "--r", "4", "-o", path(&out)], flags.as_slice()].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("not verified: "), "{}", String::from_utf8_lossy(&o.stdout));
    }
}

#[test]
fn a_model_tract_cannot_run_is_written_unverified_unless_verify_is_on() {
    // tract 0.23 cannot plan this float16 export (its Gemm); onnxruntime runs it.
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("timm_vit_fp16/model.onnx");
    let out = dir.path().join("out.onnx");
    let o = tome(&[path(&model), "--r", "4", "-o", path(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("not verified: tract cannot run the original model"), "{text}");
    std::fs::remove_file(&out).unwrap();
    let err = assert_fails(&tome(&[path(&model), "--r", "4", "-o", path(&out), "--verify", "on"]), 4);
    assert!(err.contains("tract cannot run the original model"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_panic_inside_tract_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let input = corpus.join("internal--tract-panics-on-unsqueeze-axis-3-of-a-scalar.onnx");
    let err = assert_fails(&tome(&[path(&input), "--r", "4", "-o", path(&dir.path().join("out.onnx"))]), 4);
    assert!(err.starts_with("error: panic while analysing the model with tract: index exceeds length"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

// ------------------------------------------------------------ --json

fn json_error(o: &Output) -> serde_json::Value {
    assert!(o.stdout.is_empty(), "--json errors print nothing on stdout");
    let text = stderr(o);
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(value["error"]["exit_code"].as_i64(), o.status.code().map(i64::from), "{text}");
    value["error"].clone()
}

#[test]
fn json_errors_are_one_escaped_object_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("a \"quoted\" \\ name\twith\nnewline\u{1}.onnx");
    let e = json_error(&tome(&[path(&odd), "--r", "4", "-o", path(&dir.path().join("out.onnx")), "--json"]));
    assert_eq!(e["kind"], "io");
    assert!(e["message"].as_str().unwrap().contains(path(&odd)), "{e}");

    let e = json_error(&tome(&[path(&fixture("timm_vit/model.onnx")), "--r", "-3", "-o", "x.onnx", "--json"]));
    assert_eq!((e["kind"].as_str(), e["exit_code"].as_i64()), (Some("usage"), Some(1)));

    let e = json_error(&tome(&["--json", "--no-such-flag"]));
    assert_eq!(e["kind"], "usage");
    assert!(e["message"].as_str().unwrap().contains("--no-such-flag"), "{e}");

    let not_onnx = dir.path().join("notes.onnx");
    std::fs::write(&not_onnx, "text").unwrap();
    let e = json_error(&tome(&["compile", path(&not_onnx), "--r", "4", "-o", "x.onnx", "--json"]));
    assert_eq!((e["kind"].as_str(), e["exit_code"].as_i64()), (Some("invalid_model"), Some(2)));

    let e = json_error(&tome(&["run", path(&not_onnx), "--input", "x.npz", "--json"]));
    assert_eq!(e["kind"], "invalid_model");
}

#[test]
fn every_error_kind_has_its_documented_exit_code() {
    let table = [
        (ErrorKind::Usage, "usage", 1),
        (ErrorKind::InvalidModel, "invalid_model", 2),
        (ErrorKind::UnsupportedModel, "unsupported_model", 2),
        (ErrorKind::Io, "io", 3),
        (ErrorKind::VerificationFailed, "verification_failed", 4),
        (ErrorKind::Internal, "internal", 4),
    ];
    for (kind, name, code) in table {
        assert_eq!((kind.name(), kind.exit_code()), (name, code));
    }
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for (_, name, code) in table {
        assert!(readme.contains(&format!("| {code} | `{name}` |")), "README's exit-code table lacks {name} = {code}");
    }
}

// ------------------------------------------------------------ --verify

#[test]
fn verification_runs_by_default_on_a_cheap_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = tome(&[path(&fixture("timm_vit/model.onnx")), "--r", "16", "-o", path(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("verified: output shapes [[1, 10]] as the original's, finite; r = 0 reproduces the original"), "{text}");
}

#[test]
fn verification_passes_on_every_fixture() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["timm_vit/model.onnx", "timm_vit/model_dynamo.onnx", "timm_deit_distilled/model.onnx", "timm_vit_gap/model.onnx"] {
        let out = dir.path().join("out.onnx");
        let file = tome_compile::FileOptions { verify: verify::Mode::On, ..Default::default() };
        let compiled = tome_compile::compile_file_checked(&fixture(model), &out, &common::options("8:-1", true), &file)
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        match compiled.verification {
            Outcome::Passed { r0_max_abs, .. } => assert!(r0_max_abs <= verify::R0_TOLERANCE, "{model}"),
            Outcome::Skipped(why) => panic!("{model}: --verify on skipped: {why}"),
        }
    }
}

/// The timm fixture and its compiled form (r = 8), as protos.
fn original_and_compiled() -> (pb::ModelProto, pb::ModelProto, PathBuf, tome_compile::Report) {
    let file = onnx::io::read(&fixture("timm_vit/model.onnx")).unwrap();
    let mut compiled = file.proto.clone();
    let report = tome_compile::compile(&mut compiled, &file.dir, &common::options("8", true)).unwrap();
    (file.proto, compiled, file.dir, report)
}

#[test]
fn verification_refuses_nan_outputs() {
    let (original, mut compiled, dir, report) = original_and_compiled();
    set_floats(&mut compiled, "head.bias", f32::NAN);
    let err = verify::verify(&original, &compiled, &dir, &common::options("8", true), &report, false).unwrap_err();
    assert!(matches!(err, Error::Verification(_)) && err.to_string().contains("output logits has NaN or infinite values"), "{err}");
    assert_eq!(err.kind().exit_code(), 4);
}

#[test]
fn verification_refuses_other_output_shapes() {
    let (original, mut compiled, dir, report) = original_and_compiled();
    // Expose the tokens before the head instead of the logits.
    let graph = compiled.graph.as_mut().unwrap();
    let head_input = graph.node.iter().rev().find(|n| n.output.contains(&"logits".to_string())).unwrap().input[0].clone();
    graph.output[0].name = head_input;
    graph.output[0].r#type = None;
    let err = verify::verify(&original, &compiled, &dir, &common::options("8", true), &report, false).unwrap_err();
    assert!(err.to_string().contains("the compiled model's output") && err.to_string().contains("the original's [1, 10]"), "{err}");
}

#[test]
fn auto_verification_skips_models_over_the_cost_limit() {
    let file = onnx::io::read(&fixture("timm_vit/model.onnx")).unwrap();
    let mut types = tome_compile::infer_types(&file.proto, &file.dir).unwrap();
    assert!(tome_compile::onnx::macs::count(&file.proto, &types).total() < verify::CHEAP_MACS);
    assert_eq!(verify::skip_reason(verify::Mode::Auto, &file.proto, &types), None);
    // The same graph at a (pretend) width of 2^20: far over the limit.
    for ty in types.values_mut() {
        if let Some(last) = ty.shape.last_mut() {
            *last = tome_passes::Dim::Fixed(1 << 20);
        }
    }
    let why = verify::skip_reason(verify::Mode::Auto, &file.proto, &types).expect("skipped");
    assert!(why.contains("--verify on forces it"), "{why}");
    assert_eq!(verify::skip_reason(verify::Mode::On, &file.proto, &types), None);
}

// ------------------------------------------------------------ writes

/// A `BipartiteMerge` or `FusedAttention` node (`--target tract`) whose
/// attributes or inputs do not fit is refused when tract plans the model,
/// naming the node.
#[test]
fn a_corrupt_tract_target_node_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let compiled = dir.path().join("tract.onnx");
    let o = tome(&[path(&fixture("timm_vit/model.onnx")), "--r", "16", "--target", "tract", "-o", path(&compiled)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cases = [
        ("r.onnx", "BipartiteMerge", "blocks.0.tome.merge.bipartite", "r=1000 is more than half of the 197 tokens"),
        ("scores.onnx", "BipartiteMerge", "blocks.0.tome.merge.bipartite", "scores must be [B,99,98] for 197 tokens"),
        ("bias.onnx", "FusedAttention", "blocks.1.tome.attention.fused", "bias [B,1,1,N] or [B,N,1]"),
    ];
    for (name, op, node_name, expected) in cases {
        let mut proto = onnx::io::read(&compiled).unwrap().proto;
        let node = proto.graph.as_mut().unwrap().node.iter_mut().find(|n| n.op_type == op && n.name == node_name).expect("a tract-target node");
        match name {
            "r.onnx" => node.attribute.iter_mut().filter(|a| a.name == "r").for_each(|a| a.i = 1000),
            "scores.onnx" => node.input[1] = node.input[0].clone(),
            _ => node.input[3] = "blocks.0.tome.merge.bipartite.x".into(), // [B,N,C], neither [B,1,1,N] nor [B,N,1]
        }
        let bad = dir.path().join(name);
        std::fs::write(&bad, proto.encode_to_vec()).unwrap();
        let err = assert_fails(&tome(&["run", path(&bad), "--input", path(&fixture("timm_vit/io.npz"))]), 2);
        assert!(err.contains(node_name) && err.contains(expected), "{name}: {err}");
    }
}

#[test]
fn same_input_and_flags_give_byte_identical_output() {
    let dir = tempfile::tempdir().unwrap();
    let external = with_external_data(dir.path());
    let cases = [(fixture("timm_vit/model_dynamo.onnx"), "16", "portable"), (external, "8:-1", "portable"), (fixture("timm_deit_distilled/model.onnx"), "8", "tract")];
    for (model, flags, target) in cases {
        let mut written = vec![];
        for run in ["a", "b"] {
            let out_dir = dir.path().join(run);
            std::fs::create_dir_all(&out_dir).unwrap();
            let out = out_dir.join("compiled.onnx");
            let o = tome(&[path(&model), "--r", flags, "--target", target, "-o", path(&out)]);
            assert!(o.status.success(), "{}", stderr(&o));
            let data = std::fs::read(out_dir.join("compiled.onnx.data")).ok();
            written.push((std::fs::read(&out).unwrap(), data));
            std::fs::remove_dir_all(&out_dir).unwrap();
        }
        assert!(written[0] == written[1], "{}: two runs wrote different bytes", model.display());
    }
}

#[test]
fn a_failed_rename_leaves_neither_model_nor_data_nor_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let external = with_external_data(dir.path());
    let mut file = onnx::io::read(&external).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    // The output name is taken by a folder: writing the data works, renaming the model cannot.
    let out = out_dir.join("compiled.onnx");
    std::fs::create_dir(&out).unwrap();
    let err = onnx::io::write(&mut file.proto, &file.dir, &out).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert_eq!(listing(&out_dir), vec!["compiled.onnx"]);
}

#[test]
fn the_output_never_replaces_the_inputs_external_data() {
    let dir = tempfile::tempdir().unwrap();
    let external = with_external_data(dir.path());
    // `-o weights.onnx` writes its data to `weights.onnx.data`: make that the input's data file.
    std::fs::rename(dir.path().join("weights.bin"), dir.path().join("weights.onnx.data")).unwrap();
    let mut proto = pb::ModelProto::decode(std::fs::read(&external).unwrap().as_slice()).unwrap();
    for t in proto.graph.as_mut().unwrap().initializer.iter_mut() {
        for e in t.external_data.iter_mut().filter(|e| e.key == "location") {
            e.value = "weights.onnx.data".into();
        }
    }
    let input = dir.path().join("input.onnx");
    std::fs::write(&input, proto.encode_to_vec()).unwrap();
    let before = std::fs::read(dir.path().join("weights.onnx.data")).unwrap();
    let err = assert_fails(&tome(&[path(&input), "--r", "4", "-o", path(&dir.path().join("weights.onnx"))]), 1);
    assert!(err.contains("would replace the input's external data"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("weights.onnx.data")).unwrap(), before);
}

/// `--verify` checks the prefix count apart from the matcher: a report
/// that miscounts it (as VideoMAE's once did: 364 prefix tokens for 0) fails.
#[test]
fn verify_catches_a_miscounted_prefix() {
    let file = onnx::io::read(&fixture("timm_vit/model.onnx")).unwrap();
    let opts = common::options("8", true);
    let mut compiled = file.proto.clone();
    let report = tome_compile::compile(&mut compiled, &file.dir, &opts).unwrap();
    let outcome = verify::verify(&file.proto, &compiled, &file.dir, &opts, &report, true).unwrap();
    assert!(outcome.to_string().contains("the first patch token is row 1, as matched"), "{outcome}");
    for wrong in [0, 2, 364] {
        let miscounted = tome_compile::Report { prefix: wrong, ..report.clone() };
        let err = verify::verify(&file.proto, &compiled, &file.dir, &opts, &miscounted, true).unwrap_err();
        assert!(matches!(err, Error::Verification(_)) && err.to_string().contains(&format!("counted {wrong} prefix tokens")), "{err}");
    }
}
