//! Values of the tensors that depend only on constants and static shapes,
//! known up to broadcasting: what the canonical view (`canon`) sees through.
//! Exporters compute attention masks, reshape targets and token counts from
//! `Shape` at run time; with the token count static, most of that is known.

use std::collections::HashMap;

use crate::graph::{self, Dim, Graph};
use crate::pb;

/// Largest value evaluated, in elements (a 197×197 mask is 38 809).
const MAX_ELEMENTS: usize = 1 << 20;

/// A tensor's value up to broadcasting: the tensor equals `data` (row-major,
/// shape `shape`, the tensor's rank) broadcast to its own shape, so each
/// axis of `shape` is 1 or the tensor's size. Elements a symbolic axis
/// decides (the batch size in a `Shape` output) are `None`.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub elem: i32,
    pub shape: Vec<usize>,
    pub data: Vec<Option<f64>>,
}

impl Value {
    fn scalar(elem: i32, rank: usize, v: f64) -> Value {
        Value { elem, shape: vec![1; rank], data: vec![Some(v)] }
    }

    /// Every element, if every one is known.
    pub fn known(&self) -> Option<Vec<f64>> {
        self.data.iter().copied().collect()
    }

    /// Whether every element is known and equal to `v`.
    pub fn all(&self, v: f64) -> bool {
        self.data.iter().all(|&x| x == Some(v))
    }

    /// Known integer elements (shapes, indices, axes).
    pub fn ints(&self) -> Option<Vec<i64>> {
        self.data.iter().map(|x| x.map(|v| v as i64)).collect()
    }

    fn strides(&self) -> Vec<usize> {
        let mut s = vec![1; self.shape.len()];
        for a in (0..self.shape.len().saturating_sub(1)).rev() {
            s[a] = s[a + 1] * self.shape[a + 1];
        }
        s
    }

    /// The same value at a higher rank (leading unit axes).
    fn at_rank(&self, rank: usize) -> Value {
        let mut v = self.clone();
        while v.shape.len() < rank {
            v.shape.insert(0, 1);
        }
        v
    }
}

/// Every tensor whose value `Value` can state, by name.
pub fn evaluate(g: &Graph) -> HashMap<String, Value> {
    evaluate_with(g, &HashMap::new())
}

/// As `evaluate`, with symbolic dims (the batch axis) given the values in
/// `probe`: evaluated at two probes, an element that follows the symbol is
/// the symbol (`canon::fold_shape_inputs`).
pub fn evaluate_with(g: &Graph, probe: &HashMap<String, i64>) -> HashMap<String, Value> {
    let mut known: HashMap<String, Value> = HashMap::new();
    let Ok(order) = g.topological_order() else { return known };
    for id in order {
        let node = g.node(id);
        let input = |slot: usize, known: &HashMap<String, Value>| -> Option<Value> {
            let name = node.input(slot)?;
            known.get(name).cloned().or_else(|| g.initializer(name).and_then(from_tensor))
        };
        if let Some(v) = eval_node(g, node, probe, &|slot| input(slot, &known)) {
            if v.data.len() <= MAX_ELEMENTS {
                known.insert(node.output().to_string(), v);
            }
        }
    }
    known
}

/// A small constant tensor held in the model file.
pub fn from_tensor(t: &pb::TensorProto) -> Option<Value> {
    let n: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
    if n > MAX_ELEMENTS || t.data_location == Some(1) {
        return None;
    }
    let data: Vec<f64> = match t.data_type {
        graph::INT64 | 6 => graph::tensor_i64(t)?.into_iter().map(|v| v as f64).collect(),
        graph::FLOAT => graph::tensor_f32(t)?.into_iter().map(f64::from).collect(),
        9 | 2 => match t.raw_data.is_empty() {
            true => t.int32_data.iter().map(|&v| v as f64).collect(),
            false => t.raw_data.iter().map(|&v| v as f64).collect(),
        },
        11 => match t.raw_data.is_empty() {
            true => t.double_data.clone(),
            false => t.raw_data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
        },
        _ => return None,
    };
    (data.len() == n).then(|| Value { elem: t.data_type, shape: t.dims.iter().map(|&d| d as usize).collect(), data: data.into_iter().map(Some).collect() })
}

fn eval_node(g: &Graph, node: &graph::Node, probe: &HashMap<String, i64>, input: &dyn Fn(usize) -> Option<Value>) -> Option<Value> {
    let out_ty = g.ty(node.output());
    let rank = out_ty.map(|t| t.rank());
    let elem = out_ty.map(|t| t.elem).unwrap_or(graph::FLOAT);
    match node.op() {
        "Constant" => constant_node(node),
        "Identity" | "Dropout" => input(0),
        "Shape" => {
            let ty = g.ty(node.input(0)?)?;
            let r = ty.rank() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(node.attr_int("start").unwrap_or(0));
            let end = clamp(node.attr_int("end").unwrap_or(r));
            let dim = |d: &Dim| match d {
                Dim::Fixed(v) => Some(*v as f64),
                Dim::Symbol(s) => probe.get(s).map(|&v| v as f64),
            };
            let data: Vec<Option<f64>> = ty.shape[start..end.max(start)].iter().map(dim).collect();
            Some(Value { elem: graph::INT64, shape: vec![data.len()], data })
        }
        "Cast" => cast(&input(0)?, node.attr_int("to")? as i32),
        "CastLike" => cast(&input(0)?, g.ty(node.input(1)?)?.elem),
        "Expand" => Some(input(0)?.at_rank(rank?)),
        "ConstantOfShape" => {
            let fill = node.attr("value").and_then(|a| a.t.as_ref()).and_then(from_tensor);
            let (elem, v) = match fill {
                Some(f) => (f.elem, f.data.first().copied().flatten()?),
                None => (graph::FLOAT, 0.0),
            };
            Some(Value::scalar(elem, rank?, v))
        }
        "Unsqueeze" => {
            let x = input(0)?;
            let axes = axes(node, input, rank?)?;
            let mut shape = x.shape.clone();
            for a in axes {
                shape.insert(a.min(shape.len()), 1);
            }
            Some(Value { shape, ..x })
        }
        "Squeeze" => {
            let x = input(0)?;
            let r = x.shape.len();
            let axes = match (node.attr_ints("axes"), node.input(1)) {
                // No axes: every unit axis of the input.
                (None, None) => g.ty(node.input(0)?)?.shape.iter().enumerate().filter(|(_, d)| **d == Dim::Fixed(1)).map(|(a, _)| a).collect(),
                _ => axes(node, input, r)?,
            };
            let shape = x.shape.iter().enumerate().filter(|(a, _)| !axes.contains(a)).map(|(_, &d)| d).collect();
            Some(Value { shape, ..x })
        }
        "Reshape" => {
            let x = input(0)?;
            let target: Vec<usize> = out_ty?.shape.iter().map(|d| d.fixed().map(|v| v as usize)).collect::<Option<_>>().unwrap_or_default();
            let count: usize = target.iter().product();
            match (x.data.len() == count && !target.is_empty(), uniform(&x)) {
                (true, _) => Some(Value { shape: target, ..x }),
                (false, Some(v)) => Some(Value::scalar(x.elem, rank?, v)),
                _ => None,
            }
        }
        "Transpose" => {
            let x = input(0)?;
            let r = x.shape.len();
            let perm: Vec<usize> = match node.attr_ints("perm") {
                Some(p) => p.iter().map(|&a| a as usize).collect(),
                None => (0..r).rev().collect(),
            };
            let mut sorted = perm.clone();
            sorted.sort();
            if sorted != (0..r).collect::<Vec<_>>() {
                return None;
            }
            let shape: Vec<usize> = perm.iter().map(|&a| x.shape[a]).collect();
            let strides = x.strides();
            let out = Value { shape: shape.clone(), data: vec![], elem: x.elem };
            let data = (0..x.data.len())
                .map(|flat| {
                    let mut rem = flat;
                    let mut src = 0;
                    for (k, s) in out.strides().iter().enumerate() {
                        src += (rem / s) * strides[perm[k]];
                        rem %= s;
                    }
                    x.data[src]
                })
                .collect();
            Some(Value { data, ..out })
        }
        "Gather" => gather(g, node, &input(0)?, &input(1)?),
        "Concat" => {
            let axis = node.attr_int("axis")?;
            let parts: Vec<Value> = (0..node.proto.input.len()).map(input).collect::<Option<_>>()?;
            concat(g, node, parts, axis)
        }
        "Slice" => slice(g, node, input),
        "Range" => {
            let (start, limit, delta) = (scalar_of(&input(0)?)?, scalar_of(&input(1)?)?, scalar_of(&input(2)?)?);
            if delta == 0.0 {
                return None;
            }
            let n = (((limit - start) / delta).ceil().max(0.0)) as usize;
            (n <= MAX_ELEMENTS).then(|| Value {
                elem,
                shape: vec![n],
                data: (0..n).map(|i| Some(start + i as f64 * delta)).collect(),
            })
        }
        "Where" => where_(&input(0)?, &input(1)?, &input(2)?, elem),
        op => {
            let f: fn(f64, f64) -> Option<f64> = match op {
                "Add" => |a, b| Some(a + b),
                "Sub" => |a, b| Some(a - b),
                "Mul" => |a, b| Some(a * b),
                "Div" => |a, b| Some(a / b),
                "Equal" => |a, b| Some((a == b) as u8 as f64),
                "Greater" => |a, b| Some((a > b) as u8 as f64),
                "GreaterOrEqual" => |a, b| Some((a >= b) as u8 as f64),
                "Less" => |a, b| Some((a < b) as u8 as f64),
                "LessOrEqual" => |a, b| Some((a <= b) as u8 as f64),
                "And" => |a, b| Some((a != 0.0 && b != 0.0) as u8 as f64),
                "Or" => |a, b| Some((a != 0.0 || b != 0.0) as u8 as f64),
                "Max" => |a, b| Some(a.max(b)),
                "Min" => |a, b| Some(a.min(b)),
                "Not" | "Neg" | "IsNaN" | "IsInf" | "Abs" | "Sqrt" => return unary(op, &input(0)?),
                _ => return None,
            };
            if node.proto.input.len() != 2 {
                return None;
            }
            let (a, b) = (input(0)?, input(1)?);
            let v = broadcast2(&a, &b, elem, |x, y| x.zip(y).and_then(|(x, y)| f(x, y)))?;
            Some(round_to(v, elem))
        }
    }
}

fn constant_node(node: &graph::Node) -> Option<Value> {
    if let Some(t) = node.attr("value").and_then(|a| a.t.as_ref()) {
        return from_tensor(t);
    }
    if let Some(a) = node.attr("value_ints") {
        return Some(Value { elem: graph::INT64, shape: vec![a.ints.len()], data: a.ints.iter().map(|&v| Some(v as f64)).collect() });
    }
    if let Some(a) = node.attr("value_int") {
        return Some(Value { elem: graph::INT64, shape: vec![], data: vec![Some(a.i as f64)] });
    }
    if let Some(a) = node.attr("value_float") {
        return Some(Value { elem: graph::FLOAT, shape: vec![], data: vec![Some(a.f as f64)] });
    }
    None
}

/// The one element, if every element is known and equal.
fn uniform(x: &Value) -> Option<f64> {
    let first = x.data.first().copied().flatten()?;
    x.data.iter().all(|&v| v == Some(first)).then_some(first)
}

fn scalar_of(x: &Value) -> Option<f64> {
    (x.data.len() == 1).then(|| x.data[0]).flatten()
}

/// The axes of Unsqueeze/Squeeze (attribute before opset 13, input after), normalised.
fn axes(node: &graph::Node, input: &dyn Fn(usize) -> Option<Value>, rank: usize) -> Option<Vec<usize>> {
    let raw = match node.attr_ints("axes") {
        Some(a) => a.to_vec(),
        None => input(1)?.ints()?,
    };
    let mut axes: Vec<usize> = raw.iter().map(|&a| if a < 0 { a + rank as i64 } else { a } as usize).collect();
    axes.sort();
    Some(axes)
}

fn round_to(mut v: Value, elem: i32) -> Value {
    for x in v.data.iter_mut().flatten() {
        *x = match elem {
            graph::FLOAT => *x as f32 as f64,
            10 | 16 => *x as f32 as f64,
            graph::INT64 | 6 | 3 | 5 => x.trunc(),
            9 => (*x != 0.0) as u8 as f64,
            _ => *x,
        };
    }
    v.elem = elem;
    v
}

fn cast(x: &Value, to: i32) -> Option<Value> {
    Some(round_to(x.clone(), to))
}

fn unary(op: &str, x: &Value) -> Option<Value> {
    let f = |v: f64| match op {
        "Not" => (v == 0.0) as u8 as f64,
        "Neg" => -v,
        "IsNaN" => v.is_nan() as u8 as f64,
        "IsInf" => v.is_infinite() as u8 as f64,
        "Sqrt" => v.sqrt(),
        _ => v.abs(),
    };
    let elem = if matches!(op, "Not" | "IsNaN" | "IsInf") { 9 } else { x.elem };
    Some(Value { elem, shape: x.shape.clone(), data: x.data.iter().map(|v| v.map(f)).collect() })
}

/// `f` over two values broadcast against each other (numpy rules).
fn broadcast2(a: &Value, b: &Value, elem: i32, f: impl Fn(Option<f64>, Option<f64>) -> Option<f64>) -> Option<Value> {
    let rank = a.shape.len().max(b.shape.len());
    let (a, b) = (a.at_rank(rank), b.at_rank(rank));
    let shape: Vec<usize> = a
        .shape
        .iter()
        .zip(&b.shape)
        .map(|(&x, &y)| match (x, y) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let count: usize = shape.iter().product();
    if count > MAX_ELEMENTS {
        return None;
    }
    let out = Value { elem, shape, data: vec![] };
    let (os, sa, sb) = (out.strides(), a.strides(), b.strides());
    let data = (0..count)
        .map(|flat| {
            let (mut ia, mut ib, mut rem) = (0, 0, flat);
            for ax in 0..rank {
                let i = rem / os[ax];
                rem %= os[ax];
                if a.shape[ax] > 1 {
                    ia += i * sa[ax];
                }
                if b.shape[ax] > 1 {
                    ib += i * sb[ax];
                }
            }
            f(a.data[ia], b.data[ib])
        })
        .collect();
    Some(Value { data, ..out })
}

fn where_(c: &Value, a: &Value, b: &Value, elem: i32) -> Option<Value> {
    let rank = c.shape.len().max(a.shape.len()).max(b.shape.len());
    let (c, a, b) = (c.at_rank(rank), a.at_rank(rank), b.at_rank(rank));
    let mut shape = vec![1; rank];
    for (ax, out) in shape.iter_mut().enumerate() {
        for d in [c.shape[ax], a.shape[ax], b.shape[ax]] {
            if d != 1 {
                if *out != 1 && *out != d {
                    return None;
                }
                *out = d;
            }
        }
    }
    let count: usize = shape.iter().product();
    if count > MAX_ELEMENTS {
        return None;
    }
    let out = Value { elem, shape, data: vec![] };
    let os = out.strides();
    let pick = |v: &Value, flat: usize| {
        let (mut i, mut rem, s) = (0, flat, v.strides());
        for ax in 0..rank {
            let k = rem / os[ax];
            rem %= os[ax];
            if v.shape[ax] > 1 {
                i += k * s[ax];
            }
        }
        v.data[i]
    };
    let data = (0..count)
        .map(|flat| match pick(&c, flat) {
            Some(x) if x != 0.0 => pick(&a, flat),
            Some(_) => pick(&b, flat),
            None => None,
        })
        .collect();
    Some(Value { data, ..out })
}

fn gather(g: &Graph, node: &graph::Node, data: &Value, index: &Value) -> Option<Value> {
    let r = data.shape.len() as i64;
    let axis = node.attr_int("axis").unwrap_or(0);
    let axis = (if axis < 0 { axis + r } else { axis }) as usize;
    let full = g.ty(node.input(0)?)?.dim(axis);
    let idx = index.ints()?;
    let span = data.shape.get(axis).copied()?;
    let picks: Vec<usize> = idx
        .iter()
        .map(|&i| match (span, full) {
            (1, _) => Some(0),
            (_, Some(n)) => Some((if i < 0 { i + n } else { i }) as usize).filter(|&k| k < span),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let outer: usize = data.shape[..axis].iter().product();
    let inner: usize = data.shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * picks.len() * inner);
    for o in 0..outer {
        for &p in &picks {
            out.extend_from_slice(&data.data[(o * span + p) * inner..(o * span + p + 1) * inner]);
        }
    }
    let mut shape = data.shape[..axis].to_vec();
    shape.extend(&index.shape);
    shape.extend(&data.shape[axis + 1..]);
    Some(Value { elem: data.elem, shape, data: out })
}

/// Whether `v` states every element of `tensor` (no broadcast axis).
fn exact(g: &Graph, tensor: &str, v: &Value) -> bool {
    g.ty(tensor).is_some_and(|t| t.shape.iter().zip(&v.shape).all(|(d, &n)| *d == Dim::Fixed(n as i64)) && t.rank() == v.shape.len())
}

fn concat(g: &Graph, node: &graph::Node, parts: Vec<Value>, axis: i64) -> Option<Value> {
    let r = parts.first()?.shape.len() as i64;
    let axis = (if axis < 0 { axis + r } else { axis }) as usize;
    let same_but_axis = |p: &Value| p.shape.len() == parts[0].shape.len() && (0..p.shape.len()).all(|a| a == axis || p.shape[a] == parts[0].shape[a]);
    if axis >= parts[0].shape.len() || !parts.iter().all(same_but_axis) || !node.proto.input.iter().zip(&parts).all(|(t, v)| exact(g, t, v)) {
        return None;
    }
    let outer: usize = parts[0].shape[..axis].iter().product();
    let mut data = vec![];
    for o in 0..outer {
        for p in &parts {
            let chunk = p.shape[axis..].iter().product::<usize>();
            data.extend_from_slice(&p.data[o * chunk..(o + 1) * chunk]);
        }
    }
    let mut shape = parts[0].shape.clone();
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    Some(Value { elem: parts[0].elem, shape, data })
}

/// A Slice of a 1-D value with constant bounds.
fn slice(g: &Graph, node: &graph::Node, input: &dyn Fn(usize) -> Option<Value>) -> Option<Value> {
    let x = input(0)?;
    if x.shape.len() != 1 || !exact(g, node.input(0)?, &x) {
        return None;
    }
    let (start, end) = (input(1)?.ints()?, input(2)?.ints()?);
    let step = match node.input(4) {
        Some(_) => input(4)?.ints()?,
        None => vec![1],
    };
    let ([s], [e], [1]) = (start.as_slice(), end.as_slice(), step.as_slice()) else { return None };
    let n = x.data.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + n } else { v }).clamp(0, n) as usize;
    let (s, e) = (clamp(*s), clamp(*e));
    let data = x.data[s..e.max(s)].to_vec();
    Some(Value { shape: vec![data.len()], data, ..x })
}

/// Probe values for the symbolic axis: large enough that no real constant
/// equals them by chance.
const PROBES: [i64; 2] = [1031, 2053];

/// Shape vectors by name, each element as (a, c) for `a·batch + c`.
pub type LinearShapes = HashMap<String, Vec<(i64, i64)>>;
/// Where the batch axis lives: (graph input, axis).
pub type BatchAxis = (String, usize);

/// Integer vectors whose every element is `a·batch + c` for integers a, c
/// (shape vectors: `[batch·197, 64]`, `[batch, -1, 197]`), found by
/// evaluating the graph at two batch sizes; with where the batch axis lives
/// (a graph input and axis). Models with more than one symbolic axis, or
/// none, give nothing.
pub fn linear_shapes(g: &Graph) -> (LinearShapes, Option<BatchAxis>) {
    let mut symbols: Vec<(String, String, usize)> = vec![];
    for input in &g.inputs {
        for (axis, d) in g.ty(input).map(|t| t.shape.clone()).unwrap_or_default().into_iter().enumerate() {
            if let Dim::Symbol(s) = d {
                if !symbols.iter().any(|(known, _, _)| *known == s) {
                    symbols.push((s, input.clone(), axis));
                }
            }
        }
    }
    let [(symbol, input, axis)] = symbols.as_slice() else { return (HashMap::new(), None) };
    let at = |p: i64| evaluate_with(g, &HashMap::from([(symbol.clone(), p)]));
    let (low, high) = (at(PROBES[0]), at(PROBES[1]));
    let mut shapes = HashMap::new();
    for (name, x) in low {
        let (Some(x), Some(y)) = (x.known(), high.get(&name).and_then(Value::known)) else { continue };
        if x.len() != y.len() || x.len() > 8 || !matches!(g.ty(&name).map(|t| t.elem), Some(graph::INT64) | Some(6)) {
            continue;
        }
        let span = (PROBES[1] - PROBES[0]) as f64;
        let elems: Option<Vec<(i64, i64)>> = x
            .iter()
            .zip(&y)
            .map(|(&x, &y)| {
                let a = (y - x) / span;
                (a.fract() == 0.0).then(|| (a as i64, (x - a * PROBES[0] as f64) as i64))
            })
            .collect();
        if let Some(elems) = elems {
            shapes.insert(name, elems);
        }
    }
    (shapes, Some((input.clone(), *axis)))
}
