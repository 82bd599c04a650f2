//! `tome-compile bench`: the original model and its compiled form, both in
//! tract on CPU, timed in one run (taking turns, so both see the same machine
//! state), next to the speedup the MAC count predicts.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tome_passes::pb;
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::onnx::macs::{self, Macs};
use crate::{onnx, Error, Ops, Options, Report};

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub compile: Options,
    /// tract's matrix-multiply threads; at least 1.
    pub threads: usize,
    /// Images per run; the models' symbolic batch axis is fixed to it before optimising.
    pub batch: usize,
    /// Timed runs of each model.
    pub iters: usize,
    /// Untimed runs of each model first.
    pub warmup: usize,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Also time every node of the compiled model over this many runs (0: don't).
    pub profile_runs: usize,
    /// Time this model as the "compiled" side instead of compiling the input
    /// (an earlier compile, another target, another exporter's ToMe graph).
    pub against: Option<std::path::PathBuf>,
    /// Further compiles of the input, timed in the same turns.
    pub also: Vec<Variant>,
    /// A Stable Diffusion UNet: compile with tomesd's options instead of
    /// `compile`'s schedule, its latent pinned to the given size if set.
    pub unet: Option<(tome_passes::sd::UnetOptions, Option<[i64; 2]>)>,
}

/// Another compile of the input to time alongside (`bench --also`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The standard-op graph, as onnxruntime and TensorRT get it.
    Portable,
    /// The timing bound (`Options::bound`).
    Bound,
    /// The same target with nothing merged (r = 0): what the target's
    /// lowerings (tract's `FusedAttention`) alone are worth.
    Unmerged,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Portable => "portable",
            Variant::Bound => "bound",
            Variant::Unmerged => "r0",
        }
    }

    fn options(self, opts: &Options) -> Options {
        match self {
            Variant::Portable => Options { ops: Ops::Standard, bound: false, ..opts.clone() },
            Variant::Bound => Options { bound: true, ..opts.clone() },
            Variant::Unmerged => Options { schedule: tome_passes::Schedule::Constant(0), bound: false, ..opts.clone() },
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Variant, String> {
        match s {
            "portable" => Ok(Variant::Portable),
            "bound" => Ok(Variant::Bound),
            "r0" => Ok(Variant::Unmerged),
            _ => Err(format!("unknown variant '{s}': expected portable, bound or r0")),
        }
    }
}

/// Latencies of one model.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Every timed run, in milliseconds, in run order.
    pub runs_ms: Vec<f64>,
    pub macs: Macs,
}

impl Timing {
    pub fn median_ms(&self) -> f64 {
        percentile(&self.runs_ms, 0.5)
    }
    pub fn p90_ms(&self) -> f64 {
        percentile(&self.runs_ms, 0.9)
    }
}

/// Nearest-rank percentile (`q` in 0..=1) of `values`.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// What one bench run measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub options: BenchOptions,
    /// What the compiler did; `None` when timing `--against` a given file.
    pub report: Option<Report>,
    pub original: Timing,
    pub compiled: Timing,
    /// The `--also` variants, timed in the same runs.
    pub also: Vec<(Variant, Timing)>,
    /// Per-op time in the compiled model, when profiled.
    pub profile: Option<Profile>,
}

/// Where the compiled model's time goes, per op kind, over the profiled runs.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// (op name, milliseconds per run, nodes), largest first.
    pub by_op: Vec<(String, f64, usize)>,
    /// Milliseconds per run in the matching and merge nodes (`*.tome.merge.*`
    /// after tract's optimiser, which keeps the anchor's name on fused nodes).
    pub merge_ms: f64,
    /// The matching and merge nodes' time per op kind, largest first.
    pub merge_by_op: Vec<(String, f64, usize)>,
    pub total_ms: f64,
    /// (node name as tract optimised it, op name, milliseconds per run),
    /// largest first; in `--json` only.
    pub nodes: Vec<(String, String, f64)>,
}

impl BenchReport {
    pub fn throughput(&self, t: &Timing) -> f64 {
        self.options.batch as f64 * 1000.0 / t.median_ms()
    }
    /// Median latency of the original over that of the compiled model.
    pub fn speedup(&self) -> f64 {
        self.speedup_of(&self.compiled)
    }
    /// Median latency of the original over that of `t`.
    pub fn speedup_of(&self, t: &Timing) -> f64 {
        self.original.median_ms() / t.median_ms()
    }
    /// MACs of the original over those of the compiled model (merging included).
    pub fn ideal_speedup(&self) -> f64 {
        self.original.macs.total() as f64 / self.compiled.macs.total() as f64
    }
}

/// The number of CPU cores, the default for `--threads`.
pub fn all_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Timed runs of one model in a row. Models take turns, and each turn starts
/// with an untimed run: the timed runs then find the model's weights in
/// cache as far as they fit, as a deployed model running back to back
/// does, while turns spread the machine's drift over every model alike.
/// (Timing single runs in turn would time every model with cold weights.)
pub(crate) const RUNS_PER_TURN: usize = 4;

/// Compiles `path` in memory and times it against the original.
pub fn bench(path: &Path, opts: &BenchOptions) -> Result<BenchReport, Error> {
    if opts.threads == 0 || opts.batch == 0 || opts.iters == 0 {
        return Err(Error::Input("--threads, --batch and --iters must be at least 1".into()));
    }
    let mut file = onnx::io::read(path)?;
    if opts.unet.is_some() && !opts.also.is_empty() {
        return Err(Error::Input("--also compares ViT compiles; it does not apply to a UNet (--ratio)".into()));
    }
    let (_, types) = match &opts.unet {
        Some((_, latent)) => crate::prepare_latent(&mut file.proto, &file.dir, *latent)?,
        None => crate::prepare(&mut file.proto, &file.dir, &opts.compile)?,
    };
    let macs_before = macs::count(&file.proto, &types);
    // The input compiled with `compile`, and its MACs.
    let compiled_with = |compile: &Options| -> Result<(pb::ModelProto, Report, Macs), Error> {
        let mut proto = file.proto.clone();
        let (report, compiled_types) = crate::compile_typed(&mut proto, &file.dir, types.clone(), compile)?;
        let macs = macs::count(&proto, &compiled_types);
        Ok((proto, report, macs))
    };
    let (compiled, compiled_dir, report, macs_after) = match &opts.against {
        Some(other) => {
            let other = onnx::io::read(other)?;
            // A peer graph may not type-check in tract's inference; its MACs are then unknown (0).
            let macs = crate::infer_types(&other.proto, &other.dir).map(|t| macs::count(&other.proto, &t)).unwrap_or_default();
            (other.proto, other.dir, None, macs)
        }
        None => match &opts.unet {
            Some((unet, _)) => {
                let mut proto = file.proto.clone();
                tome_passes::sd::compile_unet(&mut proto, types.clone(), unet)?;
                let compiled_types = crate::infer_types(&proto, &file.dir).map_err(|e| Error::TypeCheck(e.to_string()))?;
                let macs = macs::count(&proto, &compiled_types);
                (proto, file.dir.clone(), None, macs)
            }
            None => {
                let (proto, report, macs) = compiled_with(&opts.compile)?;
                (proto, file.dir.clone(), Some(report), macs)
            }
        },
    };
    let (original_plan, shape) = plan_all(&file.proto, &file.dir, opts.batch)?;
    let mut plans = vec![original_plan, planned_like(&compiled, &compiled_dir, opts.batch, &shape)?];
    drop(compiled);
    let mut also_macs = vec![];
    for variant in &opts.also {
        let (proto, _, macs) = compiled_with(&variant.options(&opts.compile))?;
        also_macs.push(macs);
        plans.push(planned_like(&proto, &file.dir, opts.batch, &shape)?);
    }
    let input = synthetic_inputs(&shape)?;

    let turns = opts.iters.div_ceil(RUNS_PER_TURN);
    let total = (opts.warmup + turns + opts.iters) as u64 * plans.len() as u64;
    let bar = progress_bar(opts.progress, total)?;
    let mut runs = multithread_tract_scope(executor(opts.threads), || time_in_turns(&plans, &input, opts.warmup, opts.iters, &bar))?;
    bar.finish_and_clear();
    let profile = if opts.profile_runs > 0 {
        Some(multithread_tract_scope(executor(opts.threads), || profile(&plans[1], &input, opts.profile_runs))?)
    } else {
        None
    };
    let also = opts.also.iter().zip(runs.split_off(2)).zip(also_macs).map(|((v, runs_ms), macs)| (*v, Timing { runs_ms, macs })).collect();
    let compiled = runs.pop().unwrap_or_default();
    let original = runs.pop().unwrap_or_default();
    Ok(BenchReport {
        options: opts.clone(),
        report,
        original: Timing { runs_ms: original, macs: macs_before },
        compiled: Timing { runs_ms: compiled, macs: macs_after },
        also,
        profile,
    })
}

/// `plan_all`, refusing a model whose inputs differ from the original's.
fn planned_like(proto: &pb::ModelProto, dir: &Path, batch: usize, shape: &[(DatumType, Vec<usize>)]) -> Result<Arc<TypedRunnableModel>, Error> {
    let (plan, other) = plan_all(proto, dir, batch)?;
    if other != shape {
        return Err(Error::Input(format!("the models take different inputs: {shape:?} and {other:?}")));
    }
    Ok(plan)
}

/// Times every node of `plan` over `runs` runs, grouped by op.
fn profile(plan: &Arc<TypedRunnableModel>, input: &TVec<TValue>, runs: usize) -> Result<Profile, Error> {
    use std::collections::HashMap;
    use tract_onnx::tract_core::plan::{eval, SimpleState};
    let err = |e: TractError| Error::Run(format!("{e:#}"));
    let mut state = SimpleState::new(plan).map_err(err)?;
    let mut per_node: HashMap<usize, (f64, String, bool)> = HashMap::new();
    for _ in 0..runs {
        state
            .run_plan_with_eval(input.clone(), |ctx, op_state, node, inputs| {
                let start = Instant::now();
                let out = eval(ctx, op_state, node, inputs);
                let entry = per_node
                    .entry(node.id)
                    .or_insert_with(|| (0.0, node.op().name().to_string(), node.name.contains(".tome.merge.")));
                entry.0 += start.elapsed().as_secs_f64() * 1000.0;
                out
            })
            .map_err(err)?;
    }
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let mut merge_by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let mut profile = Profile::default();
    for (id, (ms, op, tome)) in per_node {
        let ms = ms / runs as f64;
        profile.nodes.push((plan.model().node(id).name.clone(), op.clone(), ms));
        profile.total_ms += ms;
        if tome {
            profile.merge_ms += ms;
            let e = merge_by_op.entry(op.clone()).or_default();
            e.0 += ms;
            e.1 += 1;
        }
        let e = by_op.entry(op).or_default();
        e.0 += ms;
        e.1 += 1;
    }
    let sorted = |m: HashMap<String, (f64, usize)>| {
        let mut v: Vec<(String, f64, usize)> = m.into_iter().map(|(op, (ms, n))| (op, ms, n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    };
    profile.nodes.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    profile.by_op = sorted(by_op);
    profile.merge_by_op = sorted(merge_by_op);
    Ok(profile)
}

/// tract's executor for `threads` threads. One thread is tract's own
/// single-threaded executor: a one-thread pool would make tract's matrix
/// products fall back to rayon's global pool, one thread per core.
pub(crate) fn executor(threads: usize) -> Executor {
    if threads == 1 { Executor::SingleThread } else { Executor::multithread(threads) }
}

/// A bar counting model runs on stderr (hidden unless `show`).
pub(crate) fn progress_bar(show: bool, len: u64) -> Result<indicatif::ProgressBar, Error> {
    let bar = if show { indicatif::ProgressBar::new(len) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>9} [{bar:30}] {pos}/{len} runs, {elapsed}")
            .map_err(|e| Error::Input(e.to_string()))?
            .progress_chars("=> "),
    );
    Ok(bar)
}

/// Times `iters` runs of each plan on `input`, after `warmup` untimed runs
/// each; plans take turns (see `RUNS_PER_TURN`). Milliseconds, per plan.
pub(crate) fn time_in_turns(
    plans: &[Arc<TypedRunnableModel>],
    input: &TVec<TValue>,
    warmup: usize,
    iters: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<Vec<f64>>, Error> {
    let run = |k: usize| -> Result<f64, Error> {
        let start = Instant::now();
        plans[k].run(input.clone()).map_err(|e| Error::Run(format!("{e:#}")))?;
        bar.inc(1);
        Ok(start.elapsed().as_secs_f64() * 1000.0)
    };
    let prev = bar.message();
    bar.set_message(if warmup > 0 { "warm-up".to_string() } else { prev.clone() });
    for k in 0..plans.len() {
        for _ in 0..warmup {
            run(k)?;
        }
    }
    bar.set_message(if warmup > 0 { "timing".to_string() } else { prev });
    let mut runs = vec![vec![]; plans.len()];
    for turn in 0..iters.div_ceil(RUNS_PER_TURN) {
        // Rotate which model goes first so none always follows another.
        for k in (0..plans.len()).map(|j| (turn + j) % plans.len()) {
            run(k)?;
            while runs[k].len() < iters.min((turn + 1) * RUNS_PER_TURN) {
                let ms = run(k)?;
                runs[k].push(ms);
            }
        }
    }
    Ok(runs)
}

/// Parses `proto` (one input), fixes its batch axis to `batch` and
/// optimises it for tract; returns the plan and the input's shape.
pub(crate) fn plan(proto: &pb::ModelProto, dir: &Path, batch: usize) -> Result<(Arc<TypedRunnableModel>, Vec<usize>), Error> {
    let (plan, mut inputs) = plan_all(proto, dir, batch)?;
    match inputs.len() {
        1 => Ok((plan, inputs.remove(0).1)),
        n => Err(Error::Input(format!("this command needs a model with one input, this one has {n}"))),
    }
}

/// Each input's element type and shape.
pub(crate) type InputFacts = Vec<(DatumType, Vec<usize>)>;

/// Parses `proto`, fixes the batch axis (axis 0, where symbolic) of every
/// input to `batch` and optimises it for tract; returns the plan and each
/// input's type and shape.
pub(crate) fn plan_all(proto: &pb::ModelProto, dir: &Path, batch: usize) -> Result<(Arc<TypedRunnableModel>, InputFacts), Error> {
    let err = |e: TractError| Error::Run(format!("{e:#}"));
    // The exporters' value_info spell the batch as a symbol, which would not
    // unify with the fixed batch; tract infers every shape without them.
    let onnx = tract_onnx::Onnx { ignore_value_info: true, ..crate::runtime::tract_ops::onnx() };
    let mut model = onnx.parse(proto, dir.to_str()).map_err(err)?.model;
    let mut inputs = vec![];
    for i in 0..model.inputs.len() {
        let fact = model.input_fact(i).map_err(err)?.clone();
        let dims = fact.shape.concretize().ok_or_else(|| Error::Input(format!("input {i} has no known rank")))?;
        let shape: Vec<usize> = dims
            .iter()
            .enumerate()
            .map(|(axis, d)| match d.to_i64() {
                Ok(v) if v > 0 => Ok(v as usize),
                _ if axis == 0 => Ok(batch),
                _ => Err(Error::Input(format!("input {i} axis {axis} is {d}; bench needs every axis but the batch static"))),
            })
            .collect::<Result<_, _>>()?;
        if i == 0 && shape.first() != Some(&batch) && dims.first().is_some_and(|d| d.to_i64().is_ok()) {
            return Err(Error::Input(format!("the model's batch axis is fixed to {}; use --batch {}", shape[0], shape[0])));
        }
        let dt = fact.datum_type.concretize().unwrap_or(f32::datum_type());
        model.set_input_fact(i, InferenceFact::dt_shape(dt, &shape)).map_err(err)?;
        inputs.push((dt, shape));
    }
    let plan = model.into_optimized().map_err(err)?.into_runnable().map_err(err)?;
    Ok((plan, inputs))
}

/// Deterministic inputs: floats in [-1, 1) (`synthetic_input`), integers
/// 500 (a mid denoising step, for a UNet's timestep).
fn synthetic_inputs(facts: &[(DatumType, Vec<usize>)]) -> Result<TVec<TValue>, Error> {
    facts
        .iter()
        .map(|(dt, shape)| {
            let t = if dt.is_float() { synthetic_input(shape)?.cast_to_dt(*dt).map(|t| t.into_owned()) } else {
                let n: usize = shape.iter().product();
                Tensor::from_shape(shape, &vec![500i64; n]).and_then(|t| t.cast_to_dt(*dt).map(|t| t.into_owned()))
            };
            t.map(TValue::from).map_err(|e| Error::Run(format!("{e:#}")))
        })
        .collect()
}

/// A deterministic input in [-1, 1), like normalised pixels.
fn synthetic_input(shape: &[usize]) -> Result<Tensor, Error> {
    let n: usize = shape.iter().product();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_shape(shape, &data).map_err(|e| Error::Run(e.to_string()))
}

/// The table printed by `tome-compile bench`.
pub fn render(r: &BenchReport) -> String {
    let o = &r.options;
    let mut s = format!(
        "tract on CPU, {} thread{}, batch {}, {} timed runs per model after {} warm-up (in turns of one untimed and up to {RUNS_PER_TURN} timed)\n",
        o.threads,
        if o.threads == 1 { "" } else { "s" },
        o.batch,
        o.iters,
        o.warmup
    );
    s += &format!(
        "{:<18} {:>10} {:>10} {:>10} {:>12}\n",
        "model", "median ms", "p90 ms", "images/s", "GMACs/image"
    );
    let label = match &o.against {
        Some(p) => p.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
        None if o.unet.is_some() => format!("compiled --ratio {}", o.unet.as_ref().map_or(0.0, |u| u.0.ratio)),
        None if o.compile.bound => format!("bound --r {}", o.compile.schedule),
        None if o.compile.ops == Ops::Tract => format!("compiled --r {}", o.compile.schedule),
        None => format!("portable --r {}", o.compile.schedule),
    };
    let also: Vec<(String, &Timing)> = r.also.iter().map(|(v, t)| (format!("{} --r {}", v.name(), o.compile.schedule), t)).collect();
    let rows = [("original".to_string(), &r.original), (label, &r.compiled)].into_iter().chain(also);
    for (name, t) in rows {
        s += &format!(
            "{:<18} {:>10.2} {:>10.2} {:>10.2} {:>12.2}\n",
            name,
            t.median_ms(),
            t.p90_ms(),
            r.throughput(t),
            t.macs.total() as f64 / 1e9
        );
    }
    let ideal = if r.compiled.macs.total() > 0 { format!("{:.2}x", r.ideal_speedup()) } else { "unknown".into() };
    s += &format!("speedup: {:.2}x measured (median latency), {ideal} ideal (MACs)", r.speedup());
    if let Some(report) = &r.report {
        s += &format!("; tokens leaving the last block: {}", report.tokens_out);
    }
    s += "\n";
    for (v, t) in &r.also {
        s += &format!("{}: {:.2}x measured\n", v.name(), r.speedup_of(t));
    }
    if let Some(p) = &r.profile {
        s += &format!(
            "profile of the compiled model ({} runs): {:.2} ms per run in nodes, {:.2} ms ({:.1}%) in the matching and merge nodes\n",
            o.profile_runs,
            p.total_ms,
            p.merge_ms,
            100.0 * p.merge_ms / p.total_ms.max(1e-9)
        );
        s += &format!("{:<28} {:>8} {:>7} {:>6}\n", "op", "ms/run", "share", "nodes");
        for (op, ms, n) in p.by_op.iter().take(12) {
            s += &format!("{:<28} {:>8.2} {:>6.1}% {:>6}\n", op, ms, 100.0 * ms / p.total_ms.max(1e-9), n);
        }
        let top: Vec<String> = p.merge_by_op.iter().take(6).map(|(op, ms, n)| format!("{op} {ms:.2} ms ({n})")).collect();
        s += &format!("matching and merge nodes by op: {}\n", top.join(", "));
    }
    s
}

/// The measurements as JSON, for pipelines.
pub fn to_json(r: &BenchReport) -> serde_json::Value {
    let timing = |t: &Timing| {
        json!({
            "median_ms": t.median_ms(),
            "p90_ms": t.p90_ms(),
            "images_per_s": r.throughput(t),
            "macs_per_image": t.macs.total(),
            "runs_ms": t.runs_ms,
        })
    };
    json!({
        "runtime": "tract",
        "threads": r.options.threads,
        "batch": r.options.batch,
        "iters": r.options.iters,
        "warmup": r.options.warmup,
        "schedule": r.options.compile.schedule.to_string(),
        "prop_attn": r.options.compile.prop_attn,
        "bound": r.options.compile.bound,
        "form": if r.options.compile.ops == Ops::Tract { "tract" } else { "portable" },
        "tokens_out": r.report.as_ref().map(|rep| rep.tokens_out),
        "unet_ratio": r.options.unet.as_ref().map(|u| u.0.ratio),
        "against": r.options.against.as_ref().map(|p| p.display().to_string()),
        "original": timing(&r.original),
        "compiled": timing(&r.compiled),
        "also": r.also.iter().map(|(v, t)| json!({"variant": v.name(), "timing": timing(t), "speedup": r.speedup_of(t)})).collect::<Vec<_>>(),
        "speedup": r.speedup(),
        "ideal_speedup": Some(r.ideal_speedup()).filter(|x| x.is_finite()),
        "profile": r.profile.as_ref().map(|p| json!({
            "total_ms": p.total_ms,
            "merge_ms": p.merge_ms,
            "merge_by_op": p.merge_by_op.iter().map(|(op, ms, n)| json!({"op": op, "ms": ms, "nodes": n})).collect::<Vec<_>>(),
            "by_op": p.by_op.iter().map(|(op, ms, n)| json!({"op": op, "ms": ms, "nodes": n})).collect::<Vec<_>>(),
            "nodes": p.nodes.iter().map(|(name, op, ms)| json!({"name": name, "op": op, "ms": ms})).collect::<Vec<_>>(),
        })),
    })
}
