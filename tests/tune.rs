//! `tune` and `sweep` on the fixtures with real photos (fixtures/images):
//! the chosen schedule's drop is within the budget, recomputed outside the
//! project with onnxruntime; the written model is `compile --r S`'s bytes;
//! bad image folders and budgets are refused, nothing written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixture, path, stderr, tome};
use tome_compile::runtime::run::image_tensor;

const HALF: [&str; 4] = ["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"];

/// The photos as the model sees them, in tune's order (sorted paths), as `.npy`.
fn write_pixels(files: &[PathBuf], out: &Path) {
    let mut data = vec![];
    for f in files {
        let t = image_tensor(f, 224, 224, [0.5; 3], [0.5; 3]).expect("image");
        data.extend(t.to_plain_array_view::<f32>().expect("f32").iter().copied());
    }
    let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, 3, 224, 224), }}", files.len());
    let mut header = header.into_bytes();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header);
    bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(out, bytes).expect("write npy");
}

fn photos() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture("images"))
        .expect("images")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    files
}

/// The drop onnxruntime measures for `compiled` against `original`.
fn onnxruntime_drop(original: &Path, compiled: &Path, pixels: &Path, metric: &str, labels: &[usize]) -> f64 {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tune_check.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).args([original, compiled, pixels]).arg(metric);
    cmd.args(labels.iter().map(|l| l.to_string()));
    let out = cmd.output().expect("python3 (see .ci/run for the packages)");
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("a number")
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

#[test]
fn tune_chooses_the_fastest_schedule_within_a_cosine_budget_and_onnxruntime_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned.onnx");
    let model = fixture("timm_vit/model.onnx");
    let images = fixture("images");
    let mut args = vec!["tune", path(&model), "--images", path(&images), "--metric", "cosine", "--max-drop", "0.03"];
    args.extend(HALF);
    args.extend(["--iters", "4", "--threads", "1", "-o", path(&out), "--json"]);
    let report = json(&tome(&args));
    let candidates = report["candidates"].as_array().expect("candidates");
    assert_eq!(candidates.len(), 17, "r0, 8 constant and 8 decreasing schedules");
    assert!(candidates.iter().any(|c| c["drop"].as_f64().unwrap() > 0.03), "the budget must bind for the test to mean something");
    let chosen = &report["chosen"];
    let budget: Vec<&serde_json::Value> = candidates.iter().filter(|c| c["within_budget"] == true).collect();
    let fastest = budget.iter().map(|c| c["speedup"].as_f64().unwrap()).fold(0.0, f64::max);
    assert_eq!(chosen["speedup"].as_f64().unwrap(), fastest, "the fastest within budget");
    let drop = chosen["drop"].as_f64().unwrap();
    assert!(drop <= 0.03);

    // Outside the project: onnxruntime's drop on the same photos.
    let pixels = dir.path().join("pixels.npy");
    write_pixels(&photos(), &pixels);
    let ort = onnxruntime_drop(&model, &out, &pixels, "cosine", &[]);
    assert!(ort <= 0.03, "onnxruntime measures {ort} points");
    assert!((ort - drop).abs() < 1e-4, "tract {drop} vs onnxruntime {ort}");

    // The written model is compile's, for the chosen schedule.
    let schedule = chosen["schedule"].as_str().unwrap();
    let again = dir.path().join("again.onnx");
    let o = tome(&["compile", path(&model), "--r", schedule, "-o", path(&again)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("tuned.tune.json")).unwrap()).unwrap();
    assert_eq!(written["chosen"]["schedule"], chosen["schedule"]);
    let plot = image::open(dir.path().join("tuned.tune.png")).expect("a PNG plot");
    assert_eq!((plot.width(), plot.height()), (760, 500));
}

/// Labels for the eleven photos (sorted by name). The weights are random:
/// these are the original model's top-1 classes except for astronaut (2,
/// the model says 1) and rocket (7, the model says 3), so the original
/// scores 9 of 11.
const LABELS: [usize; 11] = [2, 3, 1, 3, 3, 3, 3, 7, 3, 3, 7];

#[test]
fn accuracy_from_a_csv_or_class_folders_matches_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let files = photos();
    let csv: String = files.iter().zip(LABELS).map(|(f, l)| format!("{},{l}\n", f.file_name().unwrap().to_string_lossy())).collect();
    let csv_path = dir.path().join("labels.csv");
    std::fs::write(&csv_path, format!("file,label\n{csv}")).unwrap();
    // The same labels as an ImageFolder tree: class folders named so that sorted order gives the index.
    let tree = dir.path().join("tree");
    for (f, l) in files.iter().zip(LABELS) {
        let class = tree.join(format!("class_{l:02}"));
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(f, class.join(f.file_name().unwrap())).unwrap();
    }
    for c in 0..10 {
        std::fs::create_dir_all(tree.join(format!("class_{c:02}"))).unwrap();
    }
    let model = fixture("timm_vit/model.onnx");
    let images = fixture("images");
    let sweep = |extra: &[&str]| {
        let mut args = vec!["sweep", path(&model), "--schedule", "16", "--schedule", "32:-1", "--iters", "1", "--threads", "1", "--json"];
        args.extend(HALF);
        args.extend(extra);
        json(&tome(&args))
    };
    let by_csv = sweep(&["--images", path(&images), "--labels", path(&csv_path)]);
    let by_tree = sweep(&["--images", path(&tree)]);
    assert_eq!(by_csv["metric"], "accuracy");
    assert_eq!(by_csv["metric_reason"], "labels were given");
    assert!((by_csv["original_accuracy"].as_f64().unwrap() - 900.0 / 11.0).abs() < 1e-9, "{}", by_csv["original_accuracy"]);
    assert_eq!(by_tree["original_accuracy"], by_csv["original_accuracy"]);
    let pixels = dir.path().join("pixels.npy");
    write_pixels(&files, &pixels);
    for (a, b) in by_csv["candidates"].as_array().unwrap().iter().zip(by_tree["candidates"].as_array().unwrap()) {
        assert_eq!(a["drop"], b["drop"]);
        let compiled = dir.path().join("c.onnx");
        let o = tome(&["compile", path(&model), "--r", a["schedule"].as_str().unwrap(), "-o", path(&compiled)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let ort = onnxruntime_drop(&model, &compiled, &pixels, "accuracy", &LABELS);
        assert!((ort - a["drop"].as_f64().unwrap()).abs() < 1e-9, "{} drop: tract {} vs onnxruntime {ort}", a["schedule"], a["drop"]);
    }
}

#[test]
fn agreement_is_the_default_for_logits_and_counts_flipped_images() {
    let model = fixture("hf_vit_eager/model.onnx");
    let images = fixture("images");
    let mut args = vec!["sweep", path(&model), "--images", path(&images), "--schedule", "32:-1", "--iters", "1", "--threads", "1", "--json"];
    args.extend(HALF);
    let report = json(&tome(&args));
    assert_eq!(report["metric"], "agreement");
    let c = &report["candidates"][0];
    let dir = tempfile::tempdir().unwrap();
    let compiled = dir.path().join("c.onnx");
    assert!(tome(&["compile", path(&model), "--r", "32:-1", "-o", path(&compiled)]).status.success());
    let pixels = dir.path().join("pixels.npy");
    write_pixels(&photos(), &pixels);
    let ort = onnxruntime_drop(&model, &compiled, &pixels, "agreement", &[]);
    assert!(ort > 0.0, "32:-1 flips at least one photo's class on this model");
    assert!((ort - c["drop"].as_f64().unwrap()).abs() < 1e-9, "tract {} vs onnxruntime {ort}", c["drop"]);
}

#[test]
fn a_budget_no_schedule_meets_names_the_best_found_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = fixture("hf_vit_eager/model.onnx");
    let images = fixture("images");
    let mut args = vec!["tune", path(&model), "--images", path(&images), "--schedule", "0", "--schedule", "32:-1", "--max-drop", "1"];
    args.extend(HALF);
    args.extend(["--iters", "1", "-o", path(&out)]);
    let o = tome(&args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("no schedule that merges tokens stays within --max-drop 1") && e.contains("at --r 32:-1"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
}

#[test]
fn empty_folders_and_broken_images_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("timm_vit/model.onnx");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = tome(&["sweep", path(&model), "--images", path(&empty), "--schedule", "8"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no PNG or JPEG images"), "{}", stderr(&o));

    let some = dir.path().join("some");
    std::fs::create_dir(&some).unwrap();
    std::fs::copy(fixture("images/chelsea.jpg"), some.join("chelsea.jpg")).unwrap();
    std::fs::write(some.join("broken.jpg"), b"not a jpeg").unwrap();
    let o = tome(&["sweep", path(&model), "--images", path(&some), "--schedule", "8", "--iters", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("broken.jpg") && stderr(&o).contains("--skip-bad-images"), "{}", stderr(&o));
    let o = tome(&["sweep", path(&model), "--images", path(&some), "--schedule", "8", "--iters", "1", "--skip-bad-images", "--json"]);
    let report = json(&o);
    assert_eq!(report["images"], 1);
    assert!(report["skipped_images"][0].as_str().unwrap().contains("broken.jpg"));

    let o = tome(&["sweep", path(&model), "--images", path(&some), "--metric", "accuracy", "--skip-bad-images"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--metric accuracy needs labels"), "{}", stderr(&o));
}

#[test]
fn latency_can_come_from_onnxruntime() {
    let model = fixture("timm_vit/model.onnx");
    let images = fixture("images");
    let mut args = vec!["sweep", path(&model), "--images", path(&images), "--schedule", "32:-1", "--runtime", "onnxruntime"];
    args.extend(["--iters", "4", "--threads", "1", "--json"]);
    let report = json(&tome(&args));
    assert_eq!(report["runtime"], "onnxruntime");
    assert_eq!(report["metric_runtime"], "tract");
    let c = &report["candidates"][0];
    assert!(c["median_ms"].as_f64().unwrap() > 0.0 && c["original_median_ms"].as_f64().unwrap() > 0.0, "{c}");
}
