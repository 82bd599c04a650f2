//! The command-line side of `check`, `bench`, `inspect` and compile's
//! `--target` / `--format`; the work itself lives in the library modules.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};
use super::Output;
use crate::cli::bench::{self, BenchOptions};
use crate::cli::tune;
use crate::targets::check::check_tensorrt;
use crate::targets::tensorrt_rules::TrtVersion;
use crate::{onnx, runtime::verify, Compiled, FileOptions, Format, Ops, Options, Schedule, Target};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    /// One form that tract, onnxruntime and TensorRT all accept (checked by tract).
    #[default]
    Portable,
    /// Also checked against TensorRT 8.6 and 10.x ONNX-parser constraints.
    Tensorrt,
    Onnxruntime,
    /// onnxruntime with tome-compile's custom-op library (libtome_ort_ops):
    /// each block's merge as one node.
    OnnxruntimeOps,
    /// OpenVINO with tome-compile's extension (libtome_ov_ops): each
    /// block's merge as one node.
    OpenvinoOps,
    Tract,
}

impl From<TargetArg> for Target {
    fn from(t: TargetArg) -> Target {
        match t {
            TargetArg::Portable => Target::Portable,
            TargetArg::Tensorrt => Target::TensorRt,
            TargetArg::Onnxruntime => Target::OnnxRuntime,
            TargetArg::OnnxruntimeOps => Target::OnnxRuntimeOps,
            TargetArg::OpenvinoOps => Target::OpenVinoOps,
            TargetArg::Tract => Target::Tract,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    #[default]
    Onnx,
    /// tract's NNEF archive (tar), for deploying with tract.
    Nnef,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Compile flags that choose where the model goes.
#[derive(Args, Clone, Debug, Default)]
pub struct DeployArgs {
    /// The runtime the model is for; the graph is the same for all, and
    /// `tensorrt` also checks it against TensorRT's parser constraints.
    #[arg(long, value_enum, default_value_t = TargetArg::Portable)]
    pub target: TargetArg,
    /// Output format: ONNX, or tract's NNEF archive.
    #[arg(long, value_enum, default_value_t = FormatArg::Onnx)]
    pub format: FormatArg,
}

pub fn compile_file(input: &Path, output: &Path, opts: &Options, deploy: &DeployArgs, verify: verify::Mode) -> Result<Compiled> {
    let format = match deploy.format {
        FormatArg::Onnx => Format::Onnx,
        FormatArg::Nnef => Format::Nnef,
    };
    let file = FileOptions { target: deploy.target.into(), format, verify };
    Ok(crate::compile_file_checked(input, output, opts, &file)?)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CheckTarget {
    Tensorrt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrtVersionArg {
    #[value(name = "8.6")]
    V8_6,
    #[value(name = "10")]
    V10,
    All,
}

#[derive(Args)]
pub struct CheckArgs {
    /// The ONNX model to check.
    model: PathBuf,
    /// The runtime whose constraints to check.
    #[arg(long, value_enum, default_value_t = CheckTarget::Tensorrt)]
    target: CheckTarget,
    /// Which TensorRT parser to check against.
    #[arg(long = "trt-version", value_enum, default_value_t = TrtVersionArg::All)]
    trt_version: TrtVersionArg,
    /// Print the findings as JSON.
    #[arg(long)]
    json: bool,
}

/// Prints every finding; fails when any is an error.
pub fn check(args: CheckArgs) -> Result<()> {
    let file = onnx::io::read(&args.model)?;
    let versions: Vec<TrtVersion> = match args.trt_version {
        TrtVersionArg::V8_6 => vec![TrtVersion::V8_6],
        TrtVersionArg::V10 => vec![TrtVersion::V10],
        TrtVersionArg::All => TrtVersion::ALL.to_vec(),
    };
    // Data types need tract's inference; without it the op and constant checks still run.
    let types = crate::infer_types(&file.proto, &file.dir);
    if let Err(e) = &types {
        eprintln!("warning: data types not checked: {e}");
    }
    let report = check_tensorrt(&file.proto, types.as_ref().ok(), &versions);
    let errors = report.errors().count();
    let warnings = report.findings.len() - errors;
    let which: Vec<String> = versions.iter().map(|v| v.to_string()).collect();
    if args.json {
        let findings: Vec<serde_json::Value> = report
            .findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "node": f.node,
                    "op": f.op,
                    "tensorrt": f.versions.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                    "severity": format!("{:?}", f.severity).to_lowercase(),
                    "why": f.why,
                    "source": f.source,
                })
            })
            .collect();
        let out = serde_json::json!({
            "model": args.model.display().to_string(),
            "target": "tensorrt",
            "versions": which,
            "nodes": report.nodes,
            "passed": report.passed(),
            "findings": findings,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for f in &report.findings {
            println!("{f}");
        }
        println!(
            "{}: {} nodes checked against TensorRT {}: {errors} error{}, {warnings} warning{}",
            args.model.display(),
            report.nodes,
            which.join(" and "),
            if errors == 1 { "" } else { "s" },
            if warnings == 1 { "" } else { "s" },
        );
    }
    if errors > 0 {
        let first = report.errors().next().map(|f| format!("{} ({})", f.node, f.op)).unwrap_or_default();
        let findings = format!("{} violates TensorRT parser constraints at {errors} node(s), first {first}", args.model.display());
        return Err(crate::Error::Target { target: "tensorrt".into(), findings }.into());
    }
    Ok(())
}

#[derive(Args)]
pub struct BenchArgs {
    /// The ONNX model to time (compiled in memory; nothing is written).
    model: PathBuf,
    /// Tokens merged per block, as for compile.
    #[arg(long = "r", value_name = "SCHEDULE", allow_hyphen_values = true, required_unless_present_any = ["against", "ratio"], conflicts_with = "ratio")]
    r: Option<String>,
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    prop_attn: OnOff,
    /// tract threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Images per run.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs of each model.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed runs of each model first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Print the measurements as JSON (no progress bar).
    #[arg(long)]
    json: bool,
    /// Time this ONNX file against the input instead of compiling it (e.g. an
    /// earlier compile, or another ToMe export); --r is then not needed.
    #[arg(long, value_name = "FILE")]
    against: Option<PathBuf>,
    /// Then time every node of the compiled model over N runs and show where the time goes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    profile: usize,
    /// Restore the full token sequence for heads that read every patch token (see compile).
    #[arg(long, conflicts_with = "tokens")]
    unmerge: bool,
    /// For a graph output of every token: merged or full (see compile).
    #[arg(long, value_enum, value_name = "merged|full")]
    tokens: Option<TokensArg>,
    /// Image size for an input the export left symbolic (see compile).
    #[arg(long, value_name = "HxW", value_parser = parse_image_size)]
    image_size: Option<[i64; 2]>,
    /// Time the timing bound instead of the ToMe graph: the last r tokens of
    /// each block dropped, not merged. Same token counts, no merging cost,
    /// wrong outputs; the speedup any ToMe graph can at best reach here
    #[arg(long, conflicts_with = "against")]
    bound: bool,
    /// Time the standard-op graph (what onnxruntime and TensorRT get) instead
    /// of the tract target's, whose merges are one `BipartiteMerge` op and
    /// attentions one `FusedAttention` op each.
    #[arg(long, conflicts_with = "against")]
    portable: bool,
    /// Also time these compiles of the input in the same turns
    /// (comma list): portable (the standard-op graph), bound (the timing
    /// bound), r0 (nothing merged: the target's own ops alone).
    #[arg(long, value_delimiter = ',', value_name = "VARIANTS", conflicts_with = "against")]
    also: Vec<bench::Variant>,
    /// A Stable Diffusion UNet: time the original against tomesd's merging (see compile --ratio).
    #[command(flatten)]
    unet: UnetArgs,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let schedule: Schedule = args.r.as_deref().unwrap_or("0").parse()?;
    let opts = BenchOptions {
        compile: {
            let (unmerge, merged_tokens) = token_choice(args.unmerge, args.tokens);
            Options {
                schedule,
                prop_attn: args.prop_attn == OnOff::On,
                unmerge,
                merged_tokens,
                image_size: args.image_size,
                bound: args.bound,
                ops: if args.portable { Ops::Standard } else { Ops::Tract },
            }
        },
        threads: args.threads.unwrap_or_else(bench::all_cores),
        batch: args.batch,
        iters: args.iters,
        warmup: args.warmup,
        progress: !args.json,
        profile_runs: args.profile,
        against: args.against,
        also: args.also,
        unet: args.unet.ratio.map(|_| (args.unet.options(), args.unet.latent)),
    };
    let report = bench::bench(&args.model, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&bench::to_json(&report))?);
    } else {
        print!("{}", bench::render(&report));
    }
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// The ONNX model to inspect (nothing is written).
    model: PathBuf,
    /// Tokens merged per block, as for compile; 0 shows the model as it is.
    #[arg(long = "r", value_name = "SCHEDULE", allow_hyphen_values = true, default_value = "0")]
    r: String,
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    prop_attn: OnOff,
    /// The target the compiled model would be checked for.
    #[arg(long, value_enum, default_value_t = TargetArg::Portable)]
    target: TargetArg,
    /// Print the inspection as JSON.
    #[arg(long)]
    json: bool,
    /// Plan with --unmerge, for heads that read every patch token (see compile).
    #[arg(long, conflicts_with = "tokens")]
    unmerge: bool,
    /// For a graph output of every token: merged or full (see compile).
    #[arg(long, value_enum, value_name = "merged|full")]
    tokens: Option<TokensArg>,
    /// Image size for an input the export left symbolic (see compile).
    #[arg(long, value_name = "HxW", value_parser = parse_image_size)]
    image_size: Option<[i64; 2]>,
    /// A Stable Diffusion UNet: list its transformer blocks and tomesd's plan (see compile --ratio).
    #[command(flatten)]
    unet: UnetArgs,
}

/// What a graph output of every token carries after merging.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokensArg {
    /// The merged tokens, with graph output `tome_size`.
    Merged,
    /// Every original token (as --unmerge).
    Full,
}

/// `--image-size`: `HxW` or one number for a square image.
pub fn parse_image_size(s: &str) -> Result<[i64; 2], String> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    let sizes: Vec<i64> = parts.iter().map(|p| p.trim().parse::<i64>()).collect::<Result<_, _>>().map_err(|_| format!("{s}: expected HxW such as 224x224"))?;
    match sizes.as_slice() {
        [s] if *s > 0 => Ok([*s, *s]),
        [h, w] if *h > 0 && *w > 0 => Ok([*h, *w]),
        _ => Err(format!("{s}: expected HxW such as 224x224, positive")),
    }
}

/// (unmerge, merged_tokens) from `--unmerge` and `--tokens`.
pub fn token_choice(unmerge: bool, tokens: Option<TokensArg>) -> (bool, bool) {
    (unmerge || tokens == Some(TokensArg::Full), tokens == Some(TokensArg::Merged))
}

pub fn inspect(args: InspectArgs) -> Result<Output> {
    if args.unet.ratio.is_some() {
        let opts = args.unet.options();
        let mut file = onnx::io::read(&args.model)?;
        let report = crate::inspect_unet(&mut file.proto, &file.dir, &opts, args.unet.latent)?;
        return Ok(Output::Report { text: unet_text(&report, &opts), json: unet_json(&report, &opts) });
    }
    let schedule: Schedule = args.r.parse()?;
    let (unmerge, merged_tokens) = token_choice(args.unmerge, args.tokens);
    let opts = Options {
        schedule,
        prop_attn: args.prop_attn == OnOff::On,
        unmerge,
        merged_tokens,
        image_size: args.image_size,
        bound: false,
        ops: Ops::Standard,
    };
    let inspection = crate::cli::inspect::inspect(&args.model, &opts, args.target.into()).map_err(|e| unet_hint(&args.model, e.into()))?;
    let _ = args.json; // read by the dispatcher
    Ok(Output::Report { text: crate::cli::inspect::render(&inspection), json: crate::cli::inspect::to_json(&inspection) })
}

/// tomesd's flags, for a Stable Diffusion UNet (`--ratio` selects it).
#[derive(Args)]
pub struct UnetArgs {
    /// For a UNet (tomesd): the share of each block's tokens that merge, in
    /// [0, 1 - 1/(sx·sy)] (0.75 at stride 2x2: every src token).
    #[arg(long, value_name = "RATIO", allow_hyphen_values = true)]
    pub ratio: Option<f64>,
    /// Merge in blocks whose tokens are downsampled at most this much from
    /// the latent (1, 2, 4, 8; SDXL's first transformer blocks are at 2).
    #[arg(long, default_value_t = 1, requires = "ratio")]
    pub max_downsample: usize,
    /// The dst grid's stride, SYxSX: one dst token per cell.
    #[arg(long, value_name = "SYxSX", value_parser = parse_stride, default_value = "2x2", requires = "ratio")]
    pub stride: [usize; 2],
    /// Which sub-layers merge around them: attn (self-attention), crossattn, mlp; comma list.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [MergeArg::Attn], requires = "ratio")]
    pub merge: Vec<MergeArg>,
    /// The latent's size, for an export that left it symbolic: `64x64` (512 px images).
    #[arg(long, value_name = "HxW", value_parser = parse_image_size, requires = "ratio")]
    pub latent: Option<[i64; 2]>,
    /// Random dst cells, as tomesd's default use_rand=True (equal in
    /// distribution, not in value): each merging block carries 64 patterns
    /// drawn from this seed, and the timestep input picks one (t mod 64).
    /// Without it, dst is the top-left of each cell (use_rand=False).
    #[arg(long, value_name = "SEED", requires = "ratio")]
    pub rand_seed: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MergeArg {
    Attn,
    Crossattn,
    Mlp,
}

fn parse_stride(s: &str) -> Result<[usize; 2], String> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    match parts.iter().map(|p| p.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>() {
        Ok(v) if v.len() == 2 && v[0] > 0 && v[1] > 0 => Ok([v[0], v[1]]),
        _ => Err(format!("{s}: expected SYxSX such as 2x2")),
    }
}

impl UnetArgs {
    pub fn options(&self) -> tome_passes::sd::UnetOptions {
        use tome_passes::sd::Kind;
        tome_passes::sd::UnetOptions {
            ratio: self.ratio.unwrap_or(0.5),
            max_downsample: self.max_downsample,
            stride: self.stride,
            merge: self
                .merge
                .iter()
                .map(|m| match m {
                    MergeArg::Attn => Kind::SelfAttention,
                    MergeArg::Crossattn => Kind::CrossAttention,
                    MergeArg::Mlp => Kind::FeedForward,
                })
                .collect(),
            rand_seed: self.rand_seed,
        }
    }
}

/// The UNet report as the terminal shows it.
pub fn unet_text(report: &tome_passes::sd::UnetReport, opts: &tome_passes::sd::UnetOptions) -> String {
    let merged: Vec<&str> = opts.merge.iter().map(|k| k.name()).collect();
    let dst = match opts.rand_seed {
        Some(seed) => format!("random dst cells ({} patterns per block from seed {seed}, picked by the timestep)", tome_passes::sd::tomesd::PATTERNS),
        None => "dst at each cell's top-left".to_string(),
    };
    let mut s = format!(
        "UNet, latent {}x{}, {} transformer blocks; tomesd ratio {}, max downsample {}, stride {}x{}, merge {}, {dst}\n",
        report.latent[0],
        report.latent[1],
        report.blocks.len(),
        opts.ratio,
        opts.max_downsample,
        opts.stride[0],
        opts.stride[1],
        merged.join(",")
    );
    s += &format!("{:<56} {:>6} {:>5} {:>7} {:>5}  {}\n", "block", "tokens", "down", "grid", "r", "merges");
    for b in &report.blocks {
        let what: Vec<&str> = b.merged.iter().map(|k| k.name()).collect();
        s += &format!(
            "{:<56} {:>6} {:>5} {:>7} {:>5}  {}\n",
            b.name,
            b.tokens,
            b.downsample,
            format!("{}x{}", b.grid[0], b.grid[1]),
            b.r,
            if what.is_empty() { "-".to_string() } else { what.join(",") }
        );
    }
    s
}

/// The UNet report as JSON.
pub fn unet_json(report: &tome_passes::sd::UnetReport, opts: &tome_passes::sd::UnetOptions) -> serde_json::Value {
    serde_json::json!({
        "family": "unet",
        "latent": report.latent,
        "ratio": opts.ratio,
        "max_downsample": opts.max_downsample,
        "stride": opts.stride,
        "merge": opts.merge.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "rand_seed": opts.rand_seed,
        "blocks": report.blocks.iter().map(|b| serde_json::json!({
            "name": b.name,
            "tokens": b.tokens,
            "width": b.width,
            "downsample": b.downsample,
            "grid": b.grid,
            "r": b.r,
            "sublayers": b.sublayers.iter().map(|k| k.name()).collect::<Vec<_>>(),
            "merged": b.merged.iter().map(|k| k.name()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// `e`, with a pointer to `--ratio` when `model` is a UNet (whose blocks the
/// ViT matcher refuses).
pub fn unet_hint(model: &Path, e: anyhow::Error) -> anyhow::Error {
    let is_unet = onnx::io::read(model).ok().and_then(|mut f| {
        let opts = tome_passes::sd::UnetOptions::default();
        crate::inspect_unet(&mut f.proto, &f.dir, &opts, None).ok().map(|r| r.blocks.len())
    });
    match is_unet {
        Some(n) if n > 0 => e.context(format!("this is a UNet with {n} transformer blocks: use --ratio (tomesd's Token Merging for Stable Diffusion), not --r")),
        _ => e,
    }
}

/// `compile --ratio`: tomesd on a UNet, written to `output`.
pub fn compile_unet(input: &Path, output: &Path, args: &UnetArgs, target: Target) -> Result<Output> {
    let opts = args.options();
    onnx::io::check_output_path(input, output)?;
    let mut file = onnx::io::read(input)?;
    let (prepared, report) = crate::compile_unet(&mut file.proto, &file.dir, &opts, args.latent)?;
    crate::targets::deploy::validate(&file.proto, &file.dir, target)?;
    onnx::io::write(&mut file.proto, &file.dir, output)?;
    let mut text = unet_text(&report, &opts);
    for line in prepared {
        text += &format!("{line}\n");
    }
    text += &format!("wrote {}\n", output.display());
    let mut json = unet_json(&report, &opts);
    json["output"] = output.display().to_string().into();
    Ok(Output::Report { text, json })
}

/// The flags `sweep` and `tune` share.
#[derive(Args)]
pub struct SweepArgs {
    /// The ONNX model (candidates are compiled in memory).
    model: PathBuf,
    /// A folder of PNG/JPEG images (searched recursively); with one
    /// subfolder per class (ImageFolder: classes are the sorted folder
    /// names), the images are labelled.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Labels as a CSV of `file,label` (file relative to --images, label a
    /// class index); only the files it lists are used.
    #[arg(long, value_name = "FILE.csv")]
    labels: Option<PathBuf>,
    /// What to measure: accuracy (needs labels), agreement (top-1 equal to
    /// the original's) or cosine (of the outputs, for embeddings). Default:
    /// accuracy with labels, agreement for an output named like logits, else cosine.
    #[arg(long, value_enum)]
    metric: Option<MetricArg>,
    /// Candidate schedules (repeat the flag), as for --r: `--schedule 8
    /// --schedule 8:-1`. Default: r = 0, and constant and decreasing r at
    /// eight steps up to the model's maximum.
    #[arg(long = "schedule", value_name = "SCHEDULE", allow_hyphen_values = true)]
    schedules: Vec<String>,
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    prop_attn: OnOff,
    /// Per-channel mean for the images (ImageNet's by default; timm's augreg ViTs use 0.5,0.5,0.5).
    #[arg(long, value_delimiter = ',', default_values_t = [0.485, 0.456, 0.406])]
    mean: Vec<f32>,
    /// Per-channel standard deviation for the images.
    #[arg(long, value_delimiter = ',', default_values_t = [0.229, 0.224, 0.225])]
    std: Vec<f32>,
    /// Images per run, for the metric and the timing.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// tract threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed runs of the original and of each candidate, in turns.
    #[arg(long, default_value_t = 12)]
    iters: usize,
    /// Skip images that fail to decode (they are named in the report) instead of stopping.
    #[arg(long)]
    skip_bad_images: bool,
    /// For a graph output of every token: merged or full (see compile).
    #[arg(long, value_enum, value_name = "merged|full")]
    tokens: Option<TokensArg>,
    /// Image size for an input the export left symbolic (see compile).
    #[arg(long, value_name = "HxW", value_parser = parse_image_size)]
    image_size: Option<[i64; 2]>,
    /// The target the chosen schedule is compiled for (see compile).
    #[arg(long, value_enum, default_value_t = TargetArg::Portable)]
    target: TargetArg,
    /// Where latency is measured: tract in process, or onnxruntime through
    /// python3 (needs its onnxruntime package). The metric is tract's.
    #[arg(long, value_enum, default_value_t = RuntimeArg::Tract)]
    runtime: RuntimeArg,
    /// Print the table as JSON (the progress bar stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TuneArgs {
    #[command(flatten)]
    sweep: SweepArgs,
    /// The budget: the largest drop of the metric accepted, in points (for
    /// cosine, 100 x (1 - mean cosine)).
    #[arg(long, value_name = "POINTS")]
    max_drop: f64,
    /// Where to write the chosen model; its report goes to OUT.tune.json and its plot to OUT.tune.png.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeArg {
    Tract,
    Onnxruntime,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricArg {
    Accuracy,
    Agreement,
    Cosine,
}

fn tune_options(args: &SweepArgs, max_drop: Option<f64>) -> Result<tune::TuneOptions> {
    let (Ok(mean), Ok(std)) = (<[f32; 3]>::try_from(args.mean.clone()), <[f32; 3]>::try_from(args.std.clone())) else {
        anyhow::bail!("--mean and --std take three comma-separated values, one per RGB channel");
    };
    let (unmerge, merged_tokens) = token_choice(false, args.tokens);
    Ok(tune::TuneOptions {
        compile: Options {
            schedule: Schedule::Constant(0),
            prop_attn: args.prop_attn == OnOff::On,
            unmerge,
            merged_tokens,
            image_size: args.image_size,
            bound: false,
            ops: Ops::Standard,
        },
        target: args.target.into(),
        images: args.images.clone(),
        labels: args.labels.clone(),
        metric: args.metric.map(|m| match m {
            MetricArg::Accuracy => tune::Metric::Accuracy,
            MetricArg::Agreement => tune::Metric::Agreement,
            MetricArg::Cosine => tune::Metric::Cosine,
        }),
        max_drop,
        schedules: args.schedules.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
        mean,
        std,
        batch: args.batch,
        threads: args.threads.unwrap_or_else(bench::all_cores),
        iters: args.iters,
        skip_bad_images: args.skip_bad_images,
        progress: true,
        runtime: match args.runtime {
            RuntimeArg::Tract => tune::Runtime::Tract,
            RuntimeArg::Onnxruntime => tune::Runtime::OnnxRuntime,
        },
    })
}

pub fn sweep(args: SweepArgs) -> Result<Output> {
    let report = tune::sweep(&args.model, &tune_options(&args, None)?)?;
    Ok(Output::Report { text: tune::render(&report), json: tune::to_json(&report) })
}

pub fn tune(args: TuneArgs) -> Result<Output> {
    let report = tune::tune(&args.sweep.model, &args.output, &tune_options(&args.sweep, Some(args.max_drop))?)?;
    Ok(Output::Report { text: tune::render(&report), json: tune::to_json(&report) })
}
