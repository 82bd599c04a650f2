//! Graph IR and Token Merging rewrites for tome-compile: the ViT family
//! (`vit/`, the pipeline below) and Stable Diffusion UNets (`sd/`, tomesd).
//! No file I/O and no runtime: the caller parses ONNX and infers types.
//!
//! The pipeline, in order (`compile`):
//! 1. `Graph::take_from`: ONNX nodes into a `StableGraph`, weights moved, not copied.
//! 2. `canon::canonicalize`: nodes that compute nothing here (an all-true
//!    attention mask, an Add of zeros) are seen through, first, so that the
//!    matcher meets one form of what every exporter writes. (`prepare`, run
//!    by the caller before inference, has already inlined functions,
//!    unfused contrib ops and pinned a symbolic image input.)
//! 3. `matcher::match_vit`: blocks, prefix tokens and head, or a reason to refuse.
//! 4. `schedule::plan`: r per block, clamped as tokens shrink.
//! 5. Per block, in order, since each needs the sizes the previous merge left:
//!    `tome::proportional_attention` (reads the incoming sizes), then `tome::merge`.
//! 6. `tome::size_weighted_pool` for average-pool heads (needs the final sizes).
//! 7. `tome::retarget_token_constants` and `retarget_computed_shapes`, once
//!    every merge tells how many tokens reach each node.
//! 8. For the plugin and tract targets, `lower::merge_log_size` on every
//!    `BipartiteMerge` whose sizes a `Log` reads. For tract (`Ops::Tract`),
//!    then `lower::fuse_attention` per block,
//!    last: it swallows the proportional bias the passes above add; then
//!    `lower::fuse_layer_norm` on every float32 LayerNormalization. For
//!    onnxruntime (`Ops::OnnxRuntime*`), `lower::ort_attention` per block,
//!    likewise last, then `canon::remove_dead`. For OpenVINO (`Ops::Merge`),
//!    `lower::scale_after_scores` per block and
//!    `lower::merge_untransposed_keys` on every `BipartiteMerge`, then
//!    `canon::remove_dead`.
//! 9. `Graph::write_into`: topologically sorted nodes back into the model.

pub mod canon;
pub mod contrib;
pub mod functions;
pub mod graph;
pub mod inputs;
pub mod patch;
pub mod sd;
pub mod values;
pub mod vit;

use std::collections::{HashMap, HashSet};

use vit::{lower, matcher, schedule, tome};

pub use graph::{Dim, Graph, TensorType};
pub use vit::matcher::{Head, VitModel};
pub use vit::schedule::{Schedule, Step};
pub use tract_onnx::pb;

/// Why a model cannot be compiled. Messages name the node and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("the model has no graph")]
    NoGraph,
    #[error("no transformer block found: {0}. tome-compile merges tokens in ViT blocks with global self-attention; `tome-compile inspect` lists what it saw")]
    NoBlocks(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error(
        "{node} ({op}) reads every patch token after the last block (as an image grid, say), which merging \
         breaks; pass --unmerge to restore the full token sequence before it"
    )]
    TokenConsumer { node: String, op: String },
    #[error(
        "graph output {0} is every token after the last block, which merging shortens; pass --tokens merged to output \
         the merged tokens (and each one's size as graph output `tome_size`), or --unmerge to restore the full sequence"
    )]
    TokenOutput(String),
    #[error("bad --r {0}")]
    BadSchedule(String),
    /// A UNet option out of range (`--ratio`, `--stride`), named in the message.
    #[error("{0}")]
    BadOption(String),
    #[error("no UNet transformer block found (LayerNorm, self-attention, residual Add, ..., feed-forward on a [batch, tokens, channels] stream); `tome-compile inspect --ratio` lists what it saw")]
    NoUnetBlocks,
    #[error("tensor {0} has no inferred type")]
    MissingType(String),
    #[error("tensor name {0} is defined twice")]
    DuplicateTensor(String),
    #[error("the graph has a cycle through node {0}")]
    Cycle(String),
    #[error("internal error in patch '{label}': {detail}")]
    BadPatch { label: String, detail: String },
    #[error("opset {0} is too old: tome-compile needs the default ONNX domain at opset 13 or later; re-export with opset_version >= 13")]
    OldOpset(i64),
}

/// What to do to the model.
#[derive(Clone, Debug)]
pub struct Options {
    pub schedule: Schedule,
    pub prop_attn: bool,
    /// Restore the full token sequence for heads that read every patch token.
    pub unmerge: bool,
    /// A graph output of every token carries the merged tokens instead, and
    /// graph output `tome_size` [batch, tokens, 1] the patches each stands for.
    pub merged_tokens: bool,
    /// [height, width] of an image input the export left symbolic and whose
    /// graph does not fix it (`inputs::pin_image_input`).
    pub image_size: Option<[i64; 2]>,
    /// Not ToMe but its timing bound: drop the last r tokens of each block
    /// instead of merging them (`tome::truncate`). The blocks see the
    /// compiled token counts with no matching, merging or proportional
    /// attention, so the outputs are wrong and the speed is what any ToMe
    /// graph with this schedule can at best reach on a runtime.
    pub bound: bool,
    /// Which of tome-compile's own ops the graph may use.
    pub ops: Ops,
}

/// tome-compile's own ops (domain `ai.tome`) a compiled graph may use, for
/// the runtimes that have them registered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ops {
    /// Standard ONNX only: every runtime.
    #[default]
    Standard,
    /// Each block's similarity, matching and merge as one `BipartiteMerge`
    /// node (`tome::FUSED_MERGE_OP`) reading the block's keys (k before
    /// the Transpose that makes kᵀ), except where a block must track token
    /// sources; the rest standard, with Q·Kᵀ scaled after its MatMul. For
    /// OpenVINO with tome-compile's plugin (`--target openvino-ops`).
    Merge,
    /// For tract with tome-compile's ops registered (`--target tract`): the
    /// matching and merge as one `BipartiteMerge` node after the similarity
    /// scores (tract's MatMul); the proportional-attention Add as a
    /// `ProportionalBias` node; each attention as one `FusedAttention` node
    /// (`lower::FUSED_ATTENTION_OP`) that takes that bias; and each float32
    /// LayerNormalization over the last axis as one `FusedLayerNorm`.
    Tract,
    /// For onnxruntime (`--target onnxruntime`): the standard-op merge, and
    /// each attention with its qkv projection as onnxruntime's own
    /// `com.microsoft` `Attention` node (`lower::ort_attention`), taking the
    /// proportional bias as its `attention_bias`.
    OnnxRuntime,
    /// `Merge` and onnxruntime's `Attention`, for onnxruntime with
    /// tome-compile's plugin (`--target onnxruntime-ops`).
    OnnxRuntimeMerge,
}

impl Ops {
    /// Whether a block's matching and merge are one `BipartiteMerge` node.
    pub fn fuses_merge(self) -> bool {
        matches!(self, Ops::Merge | Ops::OnnxRuntimeMerge | Ops::Tract)
    }

    /// Whether attentions become onnxruntime's `Attention` nodes.
    pub fn onnxruntime_attention(self) -> bool {
        matches!(self, Ops::OnnxRuntime | Ops::OnnxRuntimeMerge)
    }
}

/// One block as compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockReport {
    pub name: String,
    pub heads: usize,
    pub head_dim: usize,
    pub width: usize,
    pub step: Step,
}

/// What the compiler found and did.
#[derive(Clone, Debug)]
pub struct Report {
    pub blocks: Vec<BlockReport>,
    pub prefix: usize,
    pub patches: usize,
    pub head: String,
    pub tokens_out: usize,
    pub patch_labels: Vec<String>,
    /// Merges written as one `BipartiteMerge` node (`Ops::Merge`, `Ops::Tract`).
    pub fused_merges: usize,
    /// Attentions written as one node: `FusedAttention` (`Ops::Tract`) or
    /// onnxruntime's `Attention` (`Ops::OnnxRuntime`, `OnnxRuntimeMerge`).
    pub fused_attentions: usize,
    /// What the canonical view saw through (`canon`), one line per kind.
    pub canonical: Vec<String>,
    /// Graph outputs that carry the merged tokens (`Options::merged_tokens`).
    pub merged_outputs: Vec<String>,
    /// What `prepare` did before inference: contrib ops unfused, a symbolic
    /// image input pinned.
    pub prepared: Vec<String>,
    /// The first block's input (prefix tokens, then patch tokens), for checks.
    pub first_block_input: String,
    /// What the patch embedding reads (`matcher::VitModel::family`).
    pub family: String,
}

/// Readies an exported model for type inference, before `compile`:
/// model-local functions are inlined (`functions`), onnxruntime's fused
/// contrib ops become standard ops (`contrib`), and an
/// image input left symbolic gets its channels and size (`inputs`). Returns
/// one line per thing done, for the report.
pub fn prepare(model: &mut pb::ModelProto, image_size: Option<[i64; 2]>) -> Result<Vec<String>, PassError> {
    let mut done = vec![];
    match functions::inline(model)? {
        0 => {}
        calls => done.push(format!("inlined {calls} calls of model-local functions")),
    }
    done.extend(contrib::unfuse(model)?.into_iter().map(|op| format!("unfused {op} (onnxruntime contrib op)")));
    done.extend(inputs::pin_image_input(model, image_size)?);
    Ok(done)
}

/// Rewrites the shape inputs that `types` (a runtime's inference) could
/// not follow into constants and `Shape` reads of the batch axis
/// (`canon::fold_shape_inputs`); returns how many. Infer again after.
pub fn fold_shapes(model: &mut pb::ModelProto, types: HashMap<String, TensorType>) -> Result<usize, PassError> {
    let typed: HashSet<String> = types.keys().cloned().collect();
    let mut g = Graph::take_from(model, types)?;
    let folded = canon::fold_shape_inputs(&mut g, &|t| !typed.contains(t));
    g.write_into(model)?;
    folded
}

/// Rewrites `model` in place to apply ToMe; `types` holds every tensor's type.
pub fn compile(model: &mut pb::ModelProto, types: HashMap<String, TensorType>, opts: &Options) -> Result<Report, PassError> {
    compile_with(model, types, opts, false)
}

/// Name of the graph output `Options::merged_tokens` adds: each output
/// token's size (how many original tokens it stands for).
pub const SIZE_OUTPUT: &str = "tome_size";

/// Name of the extra graph output `compile_exposing_sources` adds.
pub const SOURCE_OUTPUT: &str = "tome_source";

/// As `compile`, and adds the graph output `tome_source` [batch, tokens]
/// int64: for each original token, the index of the final token standing
/// for it (what `tome-compile visualize` draws). Absent when nothing merges.
pub fn compile_exposing_sources(model: &mut pb::ModelProto, types: HashMap<String, TensorType>, opts: &Options) -> Result<Report, PassError> {
    compile_with(model, types, opts, true)
}

fn compile_with(model: &mut pb::ModelProto, types: HashMap<String, TensorType>, opts: &Options, expose: bool) -> Result<Report, PassError> {
    let mut g = Graph::take_from(model, types)?;
    let result = rewrite(&mut g, opts, expose);
    let changed = match &result {
        Ok(done) => done.changed.clone(),
        Err(_) => HashSet::new(),
    };
    let exposed = g.is_output(SOURCE_OUTPUT);
    let sized = g.is_output(SIZE_OUTPUT);
    g.write_into(model)?;
    let Rewritten { report, declared, .. } = result?;
    if let Some(graph) = model.graph.as_mut() {
        let batch = batch_dim(graph);
        let produced: HashSet<&String> = graph.node.iter().flat_map(|n| &n.output).collect();
        graph.value_info.retain(|v| !changed.contains(&v.name) && produced.contains(&v.name));
        // The merged tokens in the residual stream's type, batch named as the input names it.
        for (name, ty) in declared {
            let shape = std::iter::once(batch.clone()).chain(ty.shape[1..].iter().cloned()).collect();
            graph.value_info.push(output_info(&name, ty.elem, shape));
        }
        let tokens_in = report.blocks.first().map(|b| b.step.tokens_in).unwrap_or(0) as i64;
        if exposed {
            graph.output.push(output_info(SOURCE_OUTPUT, graph::INT64, vec![batch.clone(), Dim::Fixed(tokens_in)]));
        }
        if sized {
            let tokens = Dim::Fixed(report.tokens_out as i64);
            for out in graph.output.iter_mut().filter(|o| report.merged_outputs.contains(&o.name)) {
                set_token_dim(out, report.tokens_out as i64);
            }
            graph.output.push(output_info(SIZE_OUTPUT, graph::FLOAT, vec![batch, tokens, Dim::Fixed(1)]));
        }
    }
    for domain in [tome::OPS_DOMAIN, lower::ORT_DOMAIN] {
        let used = model.graph.iter().flat_map(|g| &g.node).any(|n| n.domain == domain);
        if used && !model.opset_import.iter().any(|o| o.domain == domain) {
            model.opset_import.push(pb::OperatorSetIdProto { domain: domain.into(), version: 1 });
        }
    }
    Ok(report)
}

/// What `rewrite` did: the report, the tensors whose shapes changed and
/// the merged tokens' types to declare.
struct Rewritten {
    report: Report,
    changed: HashSet<String>,
    declared: Vec<(String, TensorType)>,
}

/// Runs the passes.
fn rewrite(g: &mut Graph, opts: &Options, expose_sources: bool) -> Result<Rewritten, PassError> {
    if g.opset < 13 {
        return Err(PassError::OldOpset(g.opset));
    }
    let canonical = canon::canonicalize(g)?;
    let vit = matcher::match_vit(g)?;
    let dense = match &vit.head {
        Head::Grid { tensor, op, .. } if op == "output" => Some(tensor.clone()),
        _ => None,
    };
    let unmerge_at = match &vit.head {
        Head::Grid { tensor, .. } if opts.unmerge => Some(tensor.clone()),
        Head::Grid { .. } if dense.is_some() && opts.merged_tokens => None,
        Head::Grid { tensor, op, .. } if op == "output" => return Err(PassError::TokenOutput(tensor.clone())),
        Head::Grid { reader, op, .. } => {
            return Err(PassError::TokenConsumer { node: reader.clone(), op: op.clone() });
        }
        _ => None,
    };
    let size_output = dense.filter(|_| unmerge_at.is_none() && opts.merged_tokens);
    if opts.bound && (unmerge_at.is_some() || expose_sources || size_output.is_some()) {
        return Err(PassError::Unsupported(
            "the timing bound drops tokens, so it cannot restore them (--unmerge), map them or size them (--tokens merged)".into(),
        ));
    }
    let requested = opts.schedule.per_block(vit.blocks.len())?;
    let steps = schedule::plan(&requested, vit.tokens, vit.prefix);
    let original: HashSet<_> = g.nodes().collect();
    let mut labels = vec![];
    let mut merged: Vec<tome::Merged> = vec![];
    // The merged tokens' types, for the file's value_info: onnxruntime
    // infers no shape past a merge, and fuses by shapes (BiasGelu) only
    // where it knows them. The stream's own type with N - r tokens.
    let mut declared = vec![];
    for (block, step) in vit.blocks.iter().zip(&steps) {
        let size = merged.last().map(|m| m.size.clone());
        if let (true, false, Some(size)) = (opts.prop_attn, opts.bound, &size) {
            let p = tome::proportional_attention(g, block, size, opts.ops == Ops::Tract)?;
            labels.push(p.label.clone());
            patch::apply(g, p)?;
        }
        if step.r > 0 {
            let track = unmerge_at.is_some() || expose_sources;
            let (p, m) = match opts.bound {
                true => tome::truncate(g, block, step.tokens_in, step.r, opts.ops)?,
                false => {
                    let at = tome::MergeAt { tokens: step.tokens_in, r: step.r, prefix: vit.prefix };
                    tome::merge(g, block, at, merged.last(), track, opts.ops)?
                }
            };
            if let Some(ty) = g.ty(&block.residual).filter(|t| t.rank() == 3) {
                let shape = vec![ty.shape[0].clone(), Dim::Fixed(m.tokens as i64), ty.shape[2].clone()];
                declared.push((m.x.clone(), TensorType { elem: ty.elem, shape }));
            }
            labels.push(p.label.clone());
            patch::apply(g, p)?;
            merged.push(m);
        }
    }
    if let (Head::AveragePool { reduce, slice, .. }, Some(m), false) = (&vit.head, merged.last(), opts.bound) {
        let p = tome::size_weighted_pool(g, *reduce, *slice, &m.size)?;
        labels.push(p.label.clone());
        patch::apply(g, p)?;
    }
    if let (Head::AttentionPool(pool), true, Some(m), false) = (&vit.head, opts.prop_attn, merged.last(), opts.bound) {
        let p = tome::pool_attention_bias(g, pool, &m.size, opts.ops == Ops::Tract)?;
        labels.push(p.label.clone());
        patch::apply(g, p)?;
    }
    if let (true, Some(source)) = (expose_sources, merged.last().and_then(|m| m.source.as_deref())) {
        let block = vit.blocks.last().map(|b| b.attention).unwrap_or_default();
        let mut p = patch::Patch::new("source map output", block);
        p.nodes.push(pb::NodeProto {
            name: format!("{SOURCE_OUTPUT}.identity"),
            op_type: "Identity".into(),
            input: vec![source.to_string()],
            output: vec![SOURCE_OUTPUT.into()],
            ..Default::default()
        });
        patch::apply(g, p)?;
        g.outputs.push(SOURCE_OUTPUT.into());
    }
    if let Some(tokens) = &size_output {
        let p = tome::size_output(g, tokens, merged.last().map(|m| m.size.as_str()), SIZE_OUTPUT)?;
        labels.push(p.label.clone());
        patch::apply(g, p)?;
        g.outputs.push(SIZE_OUTPUT.into());
    }
    let mut stages: Vec<(String, usize)> = merged.iter().map(|m| (m.x.clone(), m.tokens)).collect();
    if let (Some(tensor), Some(source)) = (&unmerge_at, merged.last().and_then(|m| m.source.as_deref())) {
        let (p, full) = tome::unmerge(g, tensor, source, vit.tokens)?;
        labels.push(p.label.clone());
        patch::apply(g, p)?;
        stages.push((full, vit.tokens));
    }
    let per_node = tome::tokens_per_node(g, vit.tokens, &stages)?;
    let original: HashSet<_> = original.into_iter().filter(|id| g.net.contains_node(*id)).collect();
    for p in tome::retarget_token_constants(g, vit.tokens, &per_node, &original) {
        labels.push(p.label.clone());
        patch::apply(g, p)?;
    }
    for p in tome::retarget_computed_shapes(g, vit.tokens, &per_node, &original) {
        labels.push(p.label.clone());
        patch::apply(g, p)?;
    }
    let changed: HashSet<String> = per_node
        .iter()
        .filter(|(id, n)| **n != vit.tokens && g.net.contains_node(**id))
        .flat_map(|(id, _)| g.node(*id).proto.output.clone())
        .collect();
    // After `changed`: a fused node writes a tensor whose token count changed.
    if opts.ops.fuses_merge() {
        lower_each(g, tome::FUSED_MERGE_OP, lower::merge_log_size, &mut labels)?;
    }
    if opts.ops == Ops::Tract {
        for block in &vit.blocks {
            if let Some(p) = lower::fuse_attention(g, block) {
                labels.push(p.label.clone());
                patch::apply(g, p)?;
            }
        }
        lower_each(g, "LayerNormalization", lower::fuse_layer_norm, &mut labels)?;
    }
    if opts.ops == Ops::Merge {
        let values = values::evaluate(g);
        for block in &vit.blocks {
            if let Some(p) = lower::scale_after_scores(g, block, &values) {
                labels.push(p.label.clone());
                patch::apply(g, p)?;
            }
        }
        lower_each(g, tome::FUSED_MERGE_OP, lower::merge_untransposed_keys, &mut labels)?;
        canon::remove_dead(g)?;
    }
    if opts.ops.onnxruntime_attention() {
        let values = values::evaluate(g);
        for (block, step) in vit.blocks.iter().zip(&steps) {
            if let Some(p) = lower::ort_attention(g, block, step.tokens_in, &values) {
                labels.push(p.label.clone());
                patch::apply(g, p)?;
            }
        }
        lower_each(g, tome::FUSED_MERGE_OP, lower::merge_bias_rows, &mut labels)?;
        canon::remove_dead(g)?;
    }
    let blocks = vit
        .blocks
        .iter()
        .zip(&steps)
        .map(|(b, s)| BlockReport { name: b.name.clone(), heads: b.heads, head_dim: b.head_dim, width: b.width, step: *s })
        .collect();
    let report = Report {
        blocks,
        prefix: vit.prefix,
        patches: vit.patches,
        head: vit.head.describe(),
        tokens_out: steps.last().map(|s| s.tokens_out).unwrap_or(vit.tokens),
        patch_labels: labels,
        fused_merges: g.nodes().filter(|id| g.node(*id).op() == tome::FUSED_MERGE_OP).count(),
        fused_attentions: g
            .nodes()
            .filter(|id| {
                let node = g.node(*id);
                node.op() == lower::FUSED_ATTENTION_OP || (node.op() == lower::ORT_ATTENTION_OP && node.proto.domain == lower::ORT_DOMAIN)
            })
            .count(),
        canonical,
        merged_outputs: size_output.into_iter().collect(),
        prepared: vec![],
        first_block_input: vit.blocks.first().map(|b| b.block_input.clone()).unwrap_or_default(),
        family: vit.family.clone(),
    };
    let declared = declared.into_iter().filter(|(t, _)| g.producer(t).is_some() && !g.is_output(t)).collect();
    Ok(Rewritten { report, changed, declared })
}

/// Applies `lower` to each node of `op` the graph has now, one patch at a
/// time (each sees the graph the patches before it left), labels kept.
fn lower_each(g: &mut Graph, op: &str, lower: fn(&Graph, petgraph::stable_graph::NodeIndex) -> Option<patch::Patch>, labels: &mut Vec<String>) -> Result<(), PassError> {
    let ids: Vec<petgraph::stable_graph::NodeIndex> = g.nodes().filter(|id| g.node(*id).op() == op).collect();
    for id in ids {
        if let Some(p) = lower(g, id) {
            labels.push(p.label.clone());
            patch::apply(g, p)?;
        }
    }
    Ok(())
}

/// The batch axis as the model's first input names it ("batch" if it does not).
fn batch_dim(graph: &pb::GraphProto) -> Dim {
    use pb::tensor_shape_proto::dimension::Value;
    let first = graph.input.iter().find(|i| !graph.initializer.iter().any(|t| t.name == i.name));
    let dim0 = first.and_then(|i| {
        let pb::type_proto::Value::TensorType(t) = i.r#type.as_ref()?.value.as_ref()?;
        t.shape.as_ref()?.dim.first()?.value.clone()
    });
    match dim0 {
        Some(Value::DimParam(p)) => Dim::Symbol(p),
        Some(Value::DimValue(v)) => Dim::Fixed(v),
        None => Dim::Symbol("batch".into()),
    }
}

/// A graph output's declaration.
fn output_info(name: &str, elem: i32, shape: Vec<Dim>) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = |d: Dim| Dimension {
        value: Some(match d {
            Dim::Fixed(v) => Value::DimValue(v),
            Dim::Symbol(s) => Value::DimParam(s),
        }),
        ..Default::default()
    };
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem,
                shape: Some(pb::TensorShapeProto { dim: shape.into_iter().map(dim).collect() }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Declares the token axis (axis 1) of a graph output as `tokens` long.
fn set_token_dim(out: &mut pb::ValueInfoProto, tokens: i64) {
    use pb::tensor_shape_proto::dimension::Value;
    if let Some(pb::type_proto::Value::TensorType(t)) = out.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if let Some(d) = t.shape.as_mut().and_then(|s| s.dim.get_mut(1)) {
            d.value = Some(Value::DimValue(tokens));
        }
    }
}

/// Every attention node of `model` and whether it anchors a block (see
/// `matcher::diagnose`); `types` as for `compile`.
pub fn diagnose(model: &pb::ModelProto, types: HashMap<String, TensorType>) -> Result<Vec<matcher::Diagnosis>, PassError> {
    let mut copy = pb::ModelProto { graph: model.graph.clone(), opset_import: model.opset_import.clone(), ..Default::default() };
    let mut g = Graph::take_from(&mut copy, types)?;
    canon::canonicalize(&mut g)?;
    matcher::diagnose(&g)
}

/// A deterministic text dump of the nodes whose names start with `prefix`,
/// in topological order: op, name, inputs, outputs, attributes, constants'
/// shapes. Used for review snapshots.
pub fn dump_nodes(model: &pb::ModelProto, prefix: &str) -> String {
    let Some(graph) = model.graph.as_ref() else { return String::new() };
    let inits: HashMap<&str, &pb::TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = String::new();
    for node in graph.node.iter().filter(|n| n.name.starts_with(prefix)) {
        let show = |t: &String| match inits.get(t.as_str()) {
            Some(c) => match graph::tensor_i64(c) {
                Some(v) if v.len() <= 8 => format!("{t}={v:?}"),
                _ => format!("{t}:{}{:?}", graph::elem_name(c.data_type), c.dims),
            },
            None => t.clone(),
        };
        let ins: Vec<String> = node.input.iter().map(show).collect();
        let attrs: Vec<String> = node
            .attribute
            .iter()
            .map(|a| match a.r#type {
                1 => format!("{}={}", a.name, a.f),
                7 => format!("{}={:?}", a.name, a.ints),
                _ => format!("{}={}", a.name, a.i),
            })
            .collect();
        out += &format!("{} {}({}) -> {}", node.op_type, node.name, ins.join(", "), node.output.join(", "));
        if !attrs.is_empty() {
            out += &format!(" [{}]", attrs.join(", "));
        }
        out += "\n";
    }
    out
}
