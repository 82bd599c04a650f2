//! Reading and writing ONNX files: protobuf with prost and tract's generated
//! types, weights in external data files, atomic writes.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

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
    check_external(&proto, &dir)?;
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

/// Writes `proto` to `out` atomically: everything goes to temporary files
/// next to `out`, renamed into place only once complete; on error they are
/// removed and nothing is left behind. Tensors whose data lived in external
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
    if externals.iter().filter_map(|t| external_entry(t, "location")).any(|loc| same_file(&src_dir.join(loc), &data_path)) {
        return Err(Error::OutputIsInputData(data_path));
    }
    let data_tmp = if externals.is_empty() {
        None
    } else {
        let tmp = temp_path(&data_path);
        if let Err(e) = copy_external(externals, src_dir, &tmp, &data_name) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Some(tmp)
    };
    let tmp = temp_path(out);
    let mut data_in_place = false;
    let written = write_synced(&tmp, &proto.encode_to_vec()).map_err(|e| Error::io(out, e)).and_then(|()| {
        if let Some(d) = &data_tmp {
            fs::rename(d, &data_path).map_err(|e| Error::io(&data_path, e))?;
            data_in_place = true;
        }
        fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    });
    if written.is_err() {
        // Nothing of this write may stay: a data file without its model is useless.
        let renamed = data_in_place.then_some(&data_path);
        for leftover in [Some(&tmp), data_tmp.as_ref(), renamed].into_iter().flatten() {
            let _ = fs::remove_file(leftover);
        }
    }
    written
}

/// Writes `bytes` to `path` through a temporary file renamed into place;
/// on error the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = temp_path(path);
    let written = write_synced(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Whether two paths name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// A hidden name next to `path`, unique per process and call.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = path.file_name().and_then(|f| f.to_str()).unwrap_or("out");
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Where an external tensor's bytes are: its file and byte range, checked
/// against the file's length (a declared length is never trusted further).
fn external_range(t: &pb::TensorProto, src_dir: &Path) -> Result<(PathBuf, u64, u64), Error> {
    let bad = |why: String| Error::ExternalData { tensor: t.name.clone(), why };
    let loc = external_entry(t, "location").ok_or_else(|| bad("no location".into()))?;
    if loc.is_empty() || !Path::new(loc).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(bad(format!("location {loc:?} must be a relative path inside the model's folder")));
    }
    let number = |key: &str| -> Result<Option<u64>, Error> {
        external_entry(t, key).map(|v| v.parse().map_err(|_| bad(format!("{key} {v:?} is not a byte count")))).transpose()
    };
    let path = src_dir.join(loc);
    let file_len = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
    let start = number("offset")?.unwrap_or(0);
    let length = number("length")?.unwrap_or(file_len.saturating_sub(start));
    if start.checked_add(length).is_none_or(|end| end > file_len) {
        return Err(bad(format!("{} holds {file_len} bytes, fewer than offset {start} + length {length}", path.display())));
    }
    Ok((path, start, length))
}

/// Checks every external tensor of a model read from `dir` (see `external_range`).
fn check_external(proto: &pb::ModelProto, dir: &Path) -> Result<(), Error> {
    let mut tensors = proto.graph.iter().flat_map(|g| g.initializer.iter()).filter(|t| is_external(t));
    tensors.try_for_each(|t| external_range(t, dir).map(|_| ()))
}

/// Copies each external tensor's bytes into one file, 64-byte aligned.
fn copy_external(tensors: Vec<&mut pb::TensorProto>, src_dir: &Path, dest: &Path, location: &str) -> Result<(), Error> {
    let mut out = fs::File::create(dest).map_err(|e| Error::io(dest, e))?;
    let mut opened: HashMap<PathBuf, fs::File> = HashMap::new();
    let mut offset = 0u64;
    for t in tensors {
        let (src_path, start, length) = external_range(t, src_dir)?;
        let src = match opened.entry(src_path.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(fs::File::open(&src_path).map_err(|err| Error::io(&src_path, err))?),
        };
        src.seek(SeekFrom::Start(start)).map_err(|e| Error::io(&src_path, e))?;
        let copied = std::io::copy(&mut src.take(length), &mut out).map_err(|e| Error::io(dest, e))?;
        if copied != length {
            return Err(Error::ExternalData { tensor: t.name.clone(), why: format!("short read from {}", src_path.display()) });
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

/// Refuses to write over the input model or a directory.
pub fn check_output_path(input: &Path, output: &Path) -> Result<(), Error> {
    if output.is_dir() {
        return Err(Error::io(output, std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory")));
    }
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
