//! tome-compile's runtime plugins (`plugins/`) refuse what they cannot
//! merge with a message naming it, in onnxruntime and OpenVINO alike
//! (`tests/plugin_check.py`), and agree on keys in either layout, stacked
//! first in onnxruntime `Attention`'s `present`, and on given scores, with
//! and without the optional third output `log(size)`, per token or spread
//! over query rows. Their numbers are checked on every fixture
//! (`tests/fixtures.rs`, `--target onnxruntime-ops`).

mod common;

use std::path::Path;

#[test]
fn plugins_refuse_an_impossible_merge_naming_it() {
    let (ort_ops, ov_ops) = common::plugins();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plugin_check.py");
    let out = std::process::Command::new("python3").arg(script).arg(ort_ops).arg(ov_ops).output().expect("python3 (see .ci/run)");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("ok ")).count(), 22, "{text}");
}
