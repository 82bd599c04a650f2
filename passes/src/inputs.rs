//! Image inputs an exporter left symbolic beyond the batch axis (optimum
//! writes `[batch_size, num_channels, height, width]`). Token counts must be
//! static, so the channels and the image size are pinned before anything is
//! inferred: channels from the patch embedding's weights, the size from the
//! position embedding's length (which fixes the patch grid), or from
//! `Options::image_size` where the graph interpolates its position embedding.
//!
//! ```text
//!  pixel_values [B, c?, h?, w?] ─ Conv(W [C, c, k, k], stride s) ─ … ─ Add(pos [1, P + g·g, C])
//!  ⇒ c from W, h = w = (g − 1)·s + k
//! ```

use std::collections::VecDeque;

use crate::pb;
use crate::PassError;

use pb::tensor_shape_proto::dimension::Value as DimValue;

/// Prefix tokens tried when reading the grid off a position embedding
/// (cls, dist, registers); the smallest that leaves a square grid wins.
const MAX_PREFIX: i64 = 16;

/// Pins the channels, height and width of an image input left symbolic;
/// returns what was pinned and why, or `None` when nothing was symbolic.
/// `image_size` ([height, width]) overrides the graph.
pub fn pin_image_input(model: &mut pb::ModelProto, image_size: Option<[i64; 2]>) -> Result<Option<String>, PassError> {
    let graph = model.graph.as_mut().ok_or(PassError::NoGraph)?;
    let inits: std::collections::HashMap<&str, &pb::TensorProto> =
        graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let Some((slot, dims)) = graph.input.iter().enumerate().find_map(|(k, i)| {
        let dims = input_dims(i)?;
        (dims.len() == 4 && !inits.contains_key(i.name.as_str()) && dims[1..].iter().any(Option::is_none)).then_some((k, dims))
    }) else {
        return Ok(None);
    };
    let name = graph.input[slot].name.clone();
    // The patch embedding reads the input directly or through Casts (CLIP's to its weights' type).
    let mut read = name.clone();
    while let Some(cast) = graph.node.iter().find(|n| matches!(n.op_type.as_str(), "Cast" | "Identity") && n.input.first() == Some(&read)) {
        read = cast.output[0].clone();
    }
    let conv = graph
        .node
        .iter()
        .find(|n| n.op_type == "Conv" && n.input.first() == Some(&read))
        .ok_or_else(|| unpinned(&name, "no patch-embedding Conv reads it"))?;
    let weight = conv.input.get(1).and_then(|w| inits.get(w.as_str())).filter(|w| w.dims.len() == 4);
    let weight = weight.ok_or_else(|| unpinned(&name, &format!("the weights of {} are not a constant 4-D tensor", conv.name)))?;
    let group = attr(conv, "group").map(|a| a.i).unwrap_or(1);
    let (width, channels, kernel) = (weight.dims[0], weight.dims[1] * group, [weight.dims[2], weight.dims[3]]);
    let stride = attr(conv, "strides").map(|a| a.ints.clone()).unwrap_or_else(|| vec![1, 1]);
    let pads = attr(conv, "pads").map(|a| a.ints.clone()).unwrap_or_else(|| vec![0; 4]);
    let (size, why) = match image_size {
        Some(s) => (s, "--image-size".to_string()),
        None => {
            let (pos, len) = position_embedding(graph, &inits, &conv.output[0], width).ok_or_else(|| {
                unpinned(&name, "nothing in the graph fixes the image size (the position embedding is computed in the graph, interpolated for the input's size, say)")
            })?;
            let (prefix, side) = (0..=MAX_PREFIX.min(len))
                .find_map(|p| {
                    let side = ((len - p) as f64).sqrt().round() as i64;
                    (side > 0 && side * side == len - p).then_some((p, side))
                })
                .ok_or_else(|| unpinned(&name, &format!("position embedding {pos} has {len} rows, which is no square grid after up to {MAX_PREFIX} prefix tokens")))?;
            let axis = |a: usize| (side - 1) * stride.get(a).copied().unwrap_or(1) + kernel[a] - pads.get(a).copied().unwrap_or(0) - pads.get(a + 2).copied().unwrap_or(0);
            ([axis(0), axis(1)], format!("position embedding {pos} ({len} = {prefix} + {side}x{side})"))
        }
    };
    if let Some(c) = dims[1].filter(|&c| c != channels) {
        return Err(PassError::Unsupported(format!("input {name} has {c} channels but {} reads {channels}", conv.name)));
    }
    for (axis, (&want, have)) in size.iter().zip(&dims[2..]).enumerate() {
        if let Some(have) = have.filter(|&h| h != want) {
            return Err(PassError::Unsupported(format!(
                "input {name} axis {} is {have} but {why} gives {want}",
                axis + 2
            )));
        }
    }
    set_dims(&mut graph.input[slot], &[channels, size[0], size[1]]);
    Ok(Some(format!("input {name} pinned to [batch, {channels}, {}, {}] by {why}", size[0], size[1])))
}

fn unpinned(input: &str, why: &str) -> PassError {
    PassError::Unsupported(format!(
        "input {input} leaves its image size symbolic and {why}; pass --image-size HxW (e.g. --image-size 224x224)"
    ))
}

fn attr<'n>(node: &'n pb::NodeProto, name: &str) -> Option<&'n pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// Declared dims of a tensor input (`None` for symbolic or missing ones).
fn input_dims(v: &pb::ValueInfoProto) -> Option<Vec<Option<i64>>> {
    let pb::type_proto::Value::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
    let dims = t.shape.as_ref()?.dim.iter().map(|d| match d.value {
        Some(DimValue::DimValue(v)) if v > 0 => Some(v),
        _ => None,
    });
    Some(dims.collect())
}

fn set_dims(v: &mut pb::ValueInfoProto, values: &[i64]) {
    if let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if let Some(shape) = t.shape.as_mut() {
            for (d, &value) in shape.dim.iter_mut().skip(1).zip(values) {
                d.value = Some(DimValue::DimValue(value));
                d.denotation.clear();
            }
        }
    }
}

/// The first position embedding downstream of the patch embedding: a
/// constant [1, L, width] or [L, width] added to the tokens; its name and L.
fn position_embedding(
    graph: &pb::GraphProto,
    inits: &std::collections::HashMap<&str, &pb::TensorProto>,
    from: &str,
    width: i64,
) -> Option<(String, i64)> {
    let constants: std::collections::HashMap<&str, &pb::TensorProto> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Constant")
        .filter_map(|n| Some((n.output.first()?.as_str(), attr(n, "value")?.t.as_ref()?)))
        .collect();
    let mut queue = VecDeque::from([(from.to_string(), 0)]);
    let mut seen = std::collections::HashSet::new();
    while let Some((tensor, depth)) = queue.pop_front() {
        for node in graph.node.iter().filter(|n| n.input.contains(&tensor)) {
            if !seen.insert(node.name.clone()) || depth > 16 {
                continue;
            }
            if node.op_type == "Add" {
                let constant = |i: &str| inits.get(i).or_else(|| constants.get(i)).copied();
                let pos = node.input.iter().filter(|i| **i != tensor).find_map(|i| {
                    if let Some(t) = constant(i) {
                        return match t.dims.as_slice() {
                            [1, l, c] | [l, c] if *c == width && *l > 1 => Some((i.clone(), *l)),
                            _ => None,
                        };
                    }
                    // CLIP looks its rows up by constant ids: Gather(table [L', C], ids [1, L]).
                    let gather = graph.node.iter().find(|n| n.op_type == "Gather" && n.output.first() == Some(i))?;
                    let (table, ids) = (constant(gather.input.first()?)?, constant(gather.input.get(1)?)?);
                    match (table.dims.as_slice(), ids.dims.as_slice()) {
                        ([_, c], [1, l] | [l]) if *c == width && *l > 1 => Some((table.name.clone(), *l)),
                        _ => None,
                    }
                });
                if pos.is_some() {
                    return pos;
                }
            }
            queue.extend(node.output.iter().map(|o| (o.clone(), depth + 1)));
        }
    }
    None
}
