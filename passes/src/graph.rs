//! The graph IR: ONNX nodes in a petgraph `StableGraph` (node ids survive
//! removals), edges from producer to consumer labelled with the tensor name,
//! and the type (element type and shape, batch symbolic) of every tensor.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;

use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::pb;
use crate::PassError;

/// One axis of a tensor shape: a number, or a symbol such as the batch axis.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(i64),
    Symbol(String),
}

impl Dim {
    pub fn fixed(&self) -> Option<i64> {
        match self {
            Dim::Fixed(v) => Some(*v),
            Dim::Symbol(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbol(s) => write!(f, "{s}"),
        }
    }
}

/// Element type (ONNX `TensorProto.DataType`) and shape of a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorType {
    pub elem: i32,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(elem: i32, shape: Vec<Dim>) -> Self {
        TensorType { elem, shape }
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn dim(&self, axis: usize) -> Option<i64> {
        self.shape.get(axis).and_then(Dim::fixed)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        write!(f, "{}[{}]", elem_name(self.elem), dims.join(","))
    }
}

pub fn elem_name(elem: i32) -> &'static str {
    match elem {
        1 => "f32",
        6 => "i32",
        7 => "i64",
        9 => "bool",
        10 => "f16",
        11 => "f64",
        16 => "bf16",
        _ => "?",
    }
}

pub const FLOAT: i32 = 1;
pub const INT64: i32 = 7;
pub const FLOAT16: i32 = 10;

/// A node of the graph: its ONNX proto and a sort key that keeps the file's
/// order for original nodes and puts new nodes right after their anchor.
#[derive(Clone, Debug)]
pub struct Node {
    pub proto: pb::NodeProto,
    pub order: (usize, usize),
}

impl Node {
    pub fn op(&self) -> &str {
        &self.proto.op_type
    }
    pub fn name(&self) -> &str {
        &self.proto.name
    }
    pub fn input(&self, slot: usize) -> Option<&str> {
        self.proto.input.get(slot).map(String::as_str).filter(|s| !s.is_empty())
    }
    pub fn output(&self) -> &str {
        self.proto.output.first().map(String::as_str).unwrap_or("")
    }
    pub fn attr(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.proto.attribute.iter().find(|a| a.name == name)
    }
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        self.attr(name).map(|a| a.i)
    }
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }
}

/// The model's graph, taken out of a `ModelProto` and put back by `write_into`.
#[derive(Clone, Debug)]
pub struct Graph {
    pub net: StableGraph<Node, String>,
    producer: HashMap<String, NodeIndex>,
    initializers: Vec<pb::TensorProto>,
    initializer_index: HashMap<String, usize>,
    dropped: HashSet<String>,
    pub types: HashMap<String, TensorType>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub opset: i64,
}

impl Graph {
    /// Takes nodes and initializers out of `model` (no weight is copied).
    /// `types` gives the inferred type of every tensor.
    pub fn take_from(model: &mut pb::ModelProto, types: HashMap<String, TensorType>) -> Result<Graph, PassError> {
        let opset = default_opset(model);
        let graph = model.graph.as_mut().ok_or(PassError::NoGraph)?;
        let initializers = std::mem::take(&mut graph.initializer);
        let initializer_index = initializers.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let mut g = Graph {
            net: StableGraph::new(),
            producer: HashMap::new(),
            initializers,
            initializer_index,
            dropped: HashSet::new(),
            types,
            inputs: graph.input.iter().map(|i| i.name.clone()).collect(),
            outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
            opset,
        };
        for (ix, proto) in std::mem::take(&mut graph.node).into_iter().enumerate() {
            g.add_node(proto, (ix, 0))?;
        }
        // Wire edges once every producer is known (the file need not be sorted).
        let ids: Vec<NodeIndex> = g.net.node_indices().collect();
        for id in ids {
            g.connect_inputs(id);
        }
        Ok(g)
    }

    /// Puts nodes (topologically sorted) and initializers back into `model`.
    pub fn write_into(mut self, model: &mut pb::ModelProto) -> Result<(), PassError> {
        let order = self.topological_order()?;
        let nodes: Vec<pb::NodeProto> = order.iter().map(|&id| self.net[id].proto.clone()).collect();
        let dropped = std::mem::take(&mut self.dropped);
        let mut inits = std::mem::take(&mut self.initializers);
        inits.retain(|t| !dropped.contains(&t.name));
        let graph = model.graph.as_mut().ok_or(PassError::NoGraph)?;
        graph.node = nodes;
        graph.initializer = inits;
        Ok(())
    }

    /// Drops the constant `tensor` (an initializer or a `Constant` node) once
    /// nothing reads it any more.
    pub(crate) fn drop_if_orphaned(&mut self, tensor: &str) {
        if self.is_output(tensor) || !self.consumers(tensor).is_empty() {
            return;
        }
        match self.producer(tensor) {
            Some(id) if self.net[id].op() == "Constant" => self.remove(id),
            Some(_) => {}
            None if self.initializer_index.remove(tensor).is_some() => {
                self.dropped.insert(tensor.to_string());
            }
            None => {}
        }
    }

    fn add_node(&mut self, proto: pb::NodeProto, order: (usize, usize)) -> Result<NodeIndex, PassError> {
        for out in proto.output.iter().filter(|o| !o.is_empty()) {
            if self.producer.contains_key(out) || self.initializer_index.contains_key(out) {
                return Err(PassError::DuplicateTensor(out.clone()));
            }
        }
        let outputs = proto.output.clone();
        let id = self.net.add_node(Node { proto, order });
        for out in outputs.into_iter().filter(|o| !o.is_empty()) {
            self.producer.insert(out, id);
        }
        Ok(id)
    }

    fn connect_inputs(&mut self, id: NodeIndex) {
        let inputs = self.net[id].proto.input.clone();
        for input in inputs {
            if let Some(&p) = self.producer.get(&input) {
                self.net.add_edge(p, id, input);
            }
        }
    }

    /// Adds a node wired to its producers and to any nodes already reading
    /// its outputs; used by the patch driver.
    pub(crate) fn insert(&mut self, proto: pb::NodeProto, order: (usize, usize)) -> Result<NodeIndex, PassError> {
        let outputs = proto.output.clone();
        let id = self.add_node(proto, order)?;
        self.connect_inputs(id);
        for out in outputs.iter().filter(|o| !o.is_empty()) {
            for (reader, _) in self.consumers(out) {
                self.net.add_edge(id, reader, out.clone());
            }
        }
        Ok(id)
    }

    /// Renames what `id` produces as `old` to `new`, leaving the readers of
    /// `old` (and a graph output of that name) waiting for a new producer.
    pub(crate) fn rename_output(&mut self, id: NodeIndex, old: &str, new: &str) -> Result<(), PassError> {
        if self.producer.contains_key(new) || self.initializer_index.contains_key(new) {
            return Err(PassError::DuplicateTensor(new.to_string()));
        }
        for out in self.net[id].proto.output.iter_mut().filter(|o| *o == old) {
            *out = new.to_string();
        }
        self.producer.remove(old);
        self.producer.insert(new.to_string(), id);
        let stale: Vec<_> = self.net.edges_directed(id, Direction::Outgoing).filter(|e| *e.weight() == old).map(|e| e.id()).collect();
        for e in stale {
            self.net.remove_edge(e);
        }
        Ok(())
    }

    pub(crate) fn remove(&mut self, id: NodeIndex) {
        if let Some(node) = self.net.remove_node(id) {
            for out in &node.proto.output {
                self.producer.remove(out);
            }
        }
    }

    pub(crate) fn add_initializer(&mut self, t: pb::TensorProto) -> Result<(), PassError> {
        if self.producer.contains_key(&t.name) || self.initializer_index.contains_key(&t.name) {
            return Err(PassError::DuplicateTensor(t.name));
        }
        self.initializer_index.insert(t.name.clone(), self.initializers.len());
        self.initializers.push(t);
        Ok(())
    }

    /// Points input `slot` of `id` at `tensor` (appending optional inputs as
    /// needed), keeping edges in step.
    pub(crate) fn set_input(&mut self, id: NodeIndex, slot: usize, tensor: &str) {
        let inputs = &mut self.net[id].proto.input;
        if inputs.len() <= slot {
            inputs.resize(slot + 1, String::new());
        }
        let old = std::mem::replace(&mut self.net[id].proto.input[slot], tensor.to_string());
        let still_used = self.net[id].proto.input.contains(&old);
        if !still_used {
            let stale: Vec<_> = self
                .net
                .edges_directed(id, Direction::Incoming)
                .filter(|e| *e.weight() == old)
                .map(|e| e.id())
                .collect();
            for e in stale {
                self.net.remove_edge(e);
            }
        }
        if let Some(&p) = self.producer.get(tensor) {
            self.net.add_edge(p, id, tensor.to_string());
        }
    }

    pub fn nodes(&self) -> impl Iterator<Item = NodeIndex> + '_ {
        self.net.node_indices()
    }

    pub fn node(&self, id: NodeIndex) -> &Node {
        &self.net[id]
    }

    pub fn producer(&self, tensor: &str) -> Option<NodeIndex> {
        self.producer.get(tensor).copied()
    }

    /// Whether `tensor` is one of the graph's outputs.
    pub fn is_output(&self, tensor: &str) -> bool {
        self.outputs.iter().any(|o| o == tensor)
    }

    pub fn producer_node(&self, tensor: &str) -> Option<&Node> {
        self.producer(tensor).map(|id| &self.net[id])
    }

    /// Nodes reading `tensor`, with the input slot, in file order.
    pub fn consumers(&self, tensor: &str) -> Vec<(NodeIndex, usize)> {
        let mut found: Vec<(NodeIndex, usize)> = self
            .net
            .node_indices()
            .flat_map(|id| {
                self.net[id]
                    .proto
                    .input
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| *i == tensor)
                    .map(move |(slot, _)| (id, slot))
            })
            .collect();
        found.sort_by_key(|(id, slot)| (self.net[*id].order, *slot));
        found
    }

    pub fn ty(&self, tensor: &str) -> Option<&TensorType> {
        self.types.get(tensor)
    }

    pub fn initializer(&self, name: &str) -> Option<&pb::TensorProto> {
        self.initializer_index.get(name).map(|&i| &self.initializers[i])
    }

    /// The value of a constant tensor: an initializer or a `Constant` node's output.
    pub fn constant(&self, tensor: &str) -> Option<&pb::TensorProto> {
        if let Some(t) = self.initializer(tensor) {
            return Some(t);
        }
        let node = self.producer_node(tensor)?;
        if node.op() != "Constant" {
            return None;
        }
        node.attr("value").and_then(|a| a.t.as_ref())
    }

    pub fn constant_i64(&self, tensor: &str) -> Option<Vec<i64>> {
        if let Some(node) = self.producer_node(tensor).filter(|n| n.op() == "Constant") {
            if let Some(v) = node.attr("value_ints") {
                return Some(v.ints.clone());
            }
            if let Some(v) = node.attr("value_int") {
                return Some(vec![v.i]);
            }
        }
        self.constant(tensor).and_then(tensor_i64)
    }

    pub fn constant_f32(&self, tensor: &str) -> Option<Vec<f32>> {
        self.constant(tensor).and_then(tensor_f32)
    }

    pub fn is_constant(&self, tensor: &str) -> bool {
        self.constant(tensor).is_some() || self.constant_i64(tensor).is_some()
    }

    /// Nodes in an order where every producer comes before its consumers;
    /// among ready nodes the smallest `order` key goes first, so the output is
    /// deterministic and new nodes sit next to their anchors.
    pub fn topological_order(&self) -> Result<Vec<NodeIndex>, PassError> {
        let mut pending: HashMap<NodeIndex, usize> = HashMap::new();
        let mut ready = BinaryHeap::new();
        for id in self.net.node_indices() {
            let deps: HashSet<NodeIndex> =
                self.net.edges_directed(id, Direction::Incoming).map(|e| e.source()).collect();
            if deps.is_empty() {
                ready.push(Reverse((self.net[id].order, id)));
            } else {
                pending.insert(id, deps.len());
            }
        }
        let mut out = Vec::with_capacity(self.net.node_count());
        while let Some(Reverse((_, id))) = ready.pop() {
            out.push(id);
            let next: HashSet<NodeIndex> =
                self.net.edges_directed(id, Direction::Outgoing).map(|e| e.target()).collect();
            for n in next {
                if let Some(c) = pending.get_mut(&n) {
                    *c -= 1;
                    if *c == 0 {
                        pending.remove(&n);
                        ready.push(Reverse((self.net[n].order, n)));
                    }
                }
            }
        }
        match pending.keys().min_by_key(|id| self.net[**id].order) {
            Some(id) => Err(PassError::Cycle(self.net[*id].name().to_string())),
            None => Ok(out),
        }
    }

    /// Every node reachable from `from` following edges in `dir` (excluding `from`).
    pub fn reachable(&self, from: NodeIndex, dir: Direction) -> HashSet<NodeIndex> {
        let mut seen = HashSet::new();
        let mut stack = vec![from];
        while let Some(id) = stack.pop() {
            for n in self.net.neighbors_directed(id, dir) {
                if seen.insert(n) {
                    stack.push(n);
                }
            }
        }
        seen
    }
}

/// The model's opset for the default ONNX domain (0 when it imports none).
pub fn default_opset(model: &pb::ModelProto) -> i64 {
    model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version).unwrap_or(0)
}

/// Decodes an integer tensor (int64 or int32, typed fields or raw bytes).
pub fn tensor_i64(t: &pb::TensorProto) -> Option<Vec<i64>> {
    if t.data_location == Some(1) {
        return None;
    }
    match t.data_type {
        7 if !t.raw_data.is_empty() => {
            Some(t.raw_data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
        }
        7 => Some(t.int64_data.clone()),
        6 if !t.raw_data.is_empty() => Some(
            t.raw_data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64).collect(),
        ),
        6 => Some(t.int32_data.iter().map(|&v| v as i64).collect()),
        _ => None,
    }
}

/// Decodes a float32 tensor held in the model file (not external data).
pub fn tensor_f32(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != FLOAT || t.data_location == Some(1) {
        return None;
    }
    if t.raw_data.is_empty() {
        return Some(t.float_data.clone());
    }
    Some(t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect())
}

pub fn int64_tensor(name: &str, dims: &[i64], values: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: INT64,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: FLOAT,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}
