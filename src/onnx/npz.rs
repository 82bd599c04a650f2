//! Reads NumPy `.npz` archives (stored or deflated) of little-endian
//! float32, float64 and int64 arrays into tract tensors.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use tract_onnx::prelude::*;

use crate::Error;

/// Every array in `path`, by name without the `.npy` suffix.
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>, Error> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |why: String| Error::Input(format!("{}: not a readable .npz archive: {why}", path.display()));
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| bad(e.to_string()))?;
        let name = entry.name().map_err(|e| bad(e.to_string()))?.trim_end_matches(".npy").to_string();
        let declared = entry.size();
        // Deflate expands at most 1032:1; a larger claim is a lie, and no
        // array may hold more than MAX_ELEMENTS 8-byte values.
        let plausible = entry.compressed_size().saturating_mul(1032).saturating_add(1024);
        if declared > plausible || declared > crate::onnx::validate::MAX_ELEMENTS * 8 {
            return Err(bad(format!("array {name} declares {declared} bytes from {} compressed", entry.compressed_size())));
        }
        // The declared size only hints the capacity; reading stops one byte past it.
        let mut bytes = Vec::with_capacity(declared.min(1 << 26) as usize);
        entry.by_ref().take(declared + 1).read_to_end(&mut bytes).map_err(|e| bad(e.to_string()))?;
        if bytes.len() as u64 != declared {
            return Err(bad(format!("array {name} holds {} bytes, its header says {declared}", bytes.len())));
        }
        let tensor = parse_npy(&bytes).map_err(|why| bad(format!("array {name}: {why}")))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Parses one `.npy` file: magic, header dict, then C-order data.
pub fn parse_npy(bytes: &[u8]) -> Result<Tensor, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("missing the NUMPY magic".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes.get(start..start + header_len).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}':"))? + key.len() + 3;
        Some(header[at..].trim_start())
    };
    let descr = field("descr").and_then(|s| s.split('\'').nth(1)).ok_or("no descr")?;
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_text = field("shape").and_then(|s| s.split(')').next()).ok_or("no shape")?;
    let shape: Vec<usize> = shape_text
        .trim_start_matches('(')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape_text}")))
        .collect::<Result<_, _>>()?;
    let limit = crate::onnx::validate::MAX_ELEMENTS as usize;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= limit);
    let count = count.filter(|_| shape.iter().all(|&d| d <= limit)).ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let data = &bytes[start + header_len..];
    let need = |size: usize| -> Result<&[u8], String> {
        let n = count.checked_mul(size).ok_or("shape overflows")?;
        data.get(..n).ok_or_else(|| format!("{} bytes of data for {count} elements", data.len()))
    };
    let tensor = match descr {
        "<f4" => {
            let v: Vec<f32> = need(4)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Tensor::from_shape(&shape, &v)
        }
        "<f8" => {
            let v: Vec<f32> =
                need(8)?.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect();
            Tensor::from_shape(&shape, &v)
        }
        "<i8" => {
            let v: Vec<i64> = need(8)?.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            Tensor::from_shape(&shape, &v)
        }
        d => return Err(format!("dtype {d} is not supported (float32, float64 or int64)")),
    };
    tensor.map_err(|e| e.to_string())
}
