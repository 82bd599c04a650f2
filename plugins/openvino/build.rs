//! Compiles the extension's C++ half (`cpp/extension.cpp`) against
//! OpenVINO's headers and links it with libopenvino. OpenVINO comes from
//! `OPENVINO_ROOT` (a directory with `include/` and `lib/` or `libs/`), else
//! from the `openvino` package of `python3` (the wheel ships both). Without
//! either the crate builds a library with no extension in it and says so.
//! The op also needs the TBB that OpenVINO ships (its threads).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cpp/extension.cpp");
    println!("cargo:rerun-if-env-changed=OPENVINO_ROOT");
    let Some(root) = openvino_root() else {
        println!("cargo:warning=OpenVINO not found (set OPENVINO_ROOT or pip install openvino): libtome_ov_ops has no extension");
        return;
    };
    let Some(lib) = ["lib", "libs", "runtime/lib/intel64"].iter().map(|d| root.join(d)).find(|d| find_lib(d, "openvino").is_some()) else {
        println!("cargo:warning=no libopenvino.so under {}: libtome_ov_ops has no extension", root.display());
        return;
    };
    let include = [root.join("include"), root.join("runtime/include")].into_iter().find(|d| d.join("openvino/op/op.hpp").exists());
    let Some(include) = include else {
        println!("cargo:warning=no OpenVINO headers under {}: libtome_ov_ops has no extension", root.display());
        return;
    };
    // The op runs a batch's images on OpenVINO's TBB threads: the wheel
    // ships TBB beside OpenVINO, an archive install under runtime/3rdparty.
    let tbb_include = [include.clone(), root.join("runtime/3rdparty/tbb/include")].into_iter().find(|d| d.join("tbb/parallel_for.h").exists());
    let tbb_lib = [lib.clone(), root.join("runtime/3rdparty/tbb/lib")].into_iter().find_map(|d| find_lib(&d, "tbb"));
    let (Some(tbb_include), Some(tbb_lib)) = (tbb_include, tbb_lib) else {
        println!("cargo:warning=no TBB headers or libtbb beside OpenVINO under {}: libtome_ov_ops has no extension", root.display());
        return;
    };
    // OpenVINO's headers as system headers: their warnings are not ours.
    let mut build = cc::Build::new();
    build.cpp(true).std("c++17").flag("-isystem").flag(include.as_os_str());
    if tbb_include != include {
        build.flag("-isystem").flag(tbb_include.as_os_str());
    }
    build.file("cpp/extension.cpp").compile("tome_ov_extension");
    let libs = ["openvino", "openvino_onnx_frontend"].iter().filter_map(|name| find_lib(&lib, name));
    for file in libs.chain([tbb_lib]) {
        println!("cargo:rustc-link-arg-cdylib={}", file.display());
    }
    println!("cargo:rustc-cfg=openvino");
    println!("cargo:rustc-check-cfg=cfg(openvino)");
}

fn openvino_root() -> Option<PathBuf> {
    if let Some(root) = std::env::var_os("OPENVINO_ROOT") {
        return Some(PathBuf::from(root));
    }
    let out = Command::new("python3").args(["-c", "import openvino, os; print(os.path.dirname(openvino.__file__))"]).output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !dir.trim().is_empty()).then(|| PathBuf::from(dir.trim()))
}

/// `lib{name}.so` or its versioned file (the wheel ships only `.so.NNNN`).
fn find_lib(dir: &Path, name: &str) -> Option<PathBuf> {
    let exact = format!("lib{name}.so");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f == exact || f.starts_with(&format!("{exact}."))))
        .collect();
    found.sort();
    found.into_iter().next()
}
