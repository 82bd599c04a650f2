//! Reading and writing ONNX files: protobuf with prost and tract's generated
//! types, weights in external data files, atomic writes.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use tome_passes::pb;

use crate::Error;

/// A parsed model and the folder its external data paths are relative to.
pub struct OnnxFile {
    pub proto: pb::ModelProto,
    pub dir: PathBuf,
}

/// Reads and decodes `path`, checking that it holds an ONNX model.
pub fn read(path: &Path) -> Result<OnnxFile, Error> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let proto = decode(&bytes).map_err(|why| Error::NotOnnx { path: path.to_path_buf(), why })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    Ok(OnnxFile { proto, dir })
}

/// Decodes ONNX bytes; the error says what is missing.
pub fn decode(bytes: &[u8]) -> Result<pb::ModelProto, String> {
    let proto = pb::ModelProto::decode(bytes).map_err(|e| format!("not an ONNX protobuf ({e})"))?;
    let graph = proto.graph.as_ref().ok_or("the protobuf has no graph (truncated, or not an ONNX model)")?;
    if graph.node.is_empty() || proto.opset_import.is_empty() {
        return Err("the graph has no nodes or no opset_import (truncated, or not an ONNX model)".into());
    }
    Ok(proto)
}

/// Whether a tensor's data lives in an external file.
fn is_external(t: &pb::TensorProto) -> bool {
    t.data_location == Some(1)
}

fn external_entry<'a>(t: &'a pb::TensorProto, key: &str) -> Option<&'a str> {
    t.external_data.iter().find(|e| e.key == key).map(|e| e.value.as_str())
}

/// Writes `proto` to `out` atomically. Tensors whose data lived in external
/// files under `src_dir` are copied into `<out>.data`, so the output never
/// depends on the input's files.
pub fn write(proto: &mut pb::ModelProto, src_dir: &Path, out: &Path) -> Result<(), Error> {
    let data_name = format!("{}.data", out.file_name().and_then(|f| f.to_str()).unwrap_or("model.onnx"));
    let data_path = out.with_file_name(&data_name);
    let externals = proto
        .graph
        .iter_mut()
        .flat_map(|g| g.initializer.iter_mut())
        .filter(|t| is_external(t))
        .collect::<Vec<_>>();
    let data_tmp = if externals.is_empty() {
        None
    } else {
        let tmp = temp_path(&data_path);
        let result = copy_external(externals, src_dir, &tmp, &data_name);
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Some(tmp)
    };
    let bytes = proto.encode_to_vec();
    let tmp = temp_path(out);
    let written = fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        if let Some(d) = &data_tmp {
            let _ = fs::remove_file(d);
        }
        return Err(Error::io(out, e));
    }
    if let Some(d) = data_tmp {
        fs::rename(&d, &data_path).map_err(|e| Error::io(&data_path, e))?;
    }
    fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|f| f.to_str()).unwrap_or("out");
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Copies each external tensor's bytes into one file, 64-byte aligned.
fn copy_external(tensors: Vec<&mut pb::TensorProto>, src_dir: &Path, dest: &Path, location: &str) -> Result<(), Error> {
    let mut out = fs::File::create(dest).map_err(|e| Error::io(dest, e))?;
    let mut opened: HashMap<String, fs::File> = HashMap::new();
    let mut offset = 0u64;
    for t in tensors {
        let bad = |why: String| Error::ExternalData { tensor: t.name.clone(), why };
        let loc = external_entry(t, "location").ok_or_else(|| bad("no location".into()))?.to_string();
        let start: u64 = external_entry(t, "offset").unwrap_or("0").parse().map_err(|_| bad("bad offset".into()))?;
        let src_path = src_dir.join(&loc);
        if !opened.contains_key(&loc) {
            let f = fs::File::open(&src_path).map_err(|e| bad(format!("cannot open {}: {e}", src_path.display())))?;
            opened.insert(loc.clone(), f);
        }
        let src = opened.get_mut(&loc).ok_or_else(|| bad("cannot open".into()))?;
        let file_len = src.metadata().map(|m| m.len()).unwrap_or(0);
        let length: u64 = match external_entry(t, "length") {
            Some(l) => l.parse().map_err(|_| bad("bad length".into()))?,
            None => file_len.saturating_sub(start),
        };
        if start.checked_add(length).is_none_or(|end| end > file_len) {
            return Err(bad(format!("{} holds {file_len} bytes, fewer than offset {start} + length {length}", src_path.display())));
        }
        src.seek(SeekFrom::Start(start)).map_err(|e| Error::io(&src_path, e))?;
        let copied = std::io::copy(&mut src.take(length), &mut out).map_err(|e| Error::io(dest, e))?;
        if copied != length {
            return Err(bad(format!("short read from {}", src_path.display())));
        }
        let pad = (64 - (length % 64)) % 64;
        out.write_all(&vec![0u8; pad as usize]).map_err(|e| Error::io(dest, e))?;
        t.external_data = vec![
            entry("location", location),
            entry("offset", &offset.to_string()),
            entry("length", &length.to_string()),
        ];
        offset += length + pad;
    }
    out.sync_all().map_err(|e| Error::io(dest, e))
}

fn entry(key: &str, value: &str) -> pb::StringStringEntryProto {
    pb::StringStringEntryProto { key: key.into(), value: value.into() }
}

/// Refuses to write over the input model or its data file.
pub fn check_output_path(input: &Path, output: &Path) -> Result<(), Error> {
    let canon = |p: &Path| -> Option<PathBuf> {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(parent.canonicalize().ok()?.join(p.file_name()?))
    };
    let same = match (canon(input), canon(output)) {
        (Some(a), Some(b)) => a == b,
        _ => input == output,
    };
    if same {
        return Err(Error::OutputIsInput(output.to_path_buf()));
    }
    Ok(())
}
