//! `tome-compile tune` and `sweep`: candidate schedules, each compiled in
//! memory and run on the user's images next to the original model, measured
//! for the metric they cost and the speed they buy. `sweep` reports the
//! table; `tune` also picks the fastest schedule within `--max-drop` and
//! writes it (the paper's trade-off figure, for the user's model and data).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use tome_passes::{pb, Schedule};
use tract_linalg::multithread::multithread_tract_scope;
use tract_onnx::prelude::*;

use super::bench::{self, percentile};
use super::plot;
use crate::onnx::macs;
use crate::runtime::run::image_tensor;
use crate::targets::deploy::{FileOptions, Format, Target};
use crate::{onnx, runtime::verify, Error, Options};

/// What a candidate is judged by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Top-1 accuracy against the given labels; drop in points.
    Accuracy,
    /// How often the top-1 class equals the original model's; drop = 100 - agreement %.
    Agreement,
    /// Mean cosine similarity of the outputs to the original's; drop = 100 × (1 - cosine).
    Cosine,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Agreement => "agreement",
            Metric::Cosine => "cosine",
        }
    }
}

/// How to tune.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// Compile options of every candidate; the schedule is the candidate's.
    pub compile: Options,
    /// The target the chosen schedule is written for.
    pub target: Target,
    /// A folder of PNG/JPEG images, or of one folder per class (ImageFolder).
    pub images: PathBuf,
    /// A CSV of `file,label` (file relative to `images`, label a class index).
    pub labels: Option<PathBuf>,
    /// `None`: accuracy with labels, else chosen from the model's output.
    pub metric: Option<Metric>,
    /// The budget in points; `None` for `sweep`.
    pub max_drop: Option<f64>,
    /// Candidates; empty: constant and decreasing schedules up to the model's maximum.
    pub schedules: Vec<Schedule>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub batch: usize,
    pub threads: usize,
    /// Timed runs of each model per candidate.
    pub iters: usize,
    /// Skip images that fail to decode (named in the report) instead of stopping.
    pub skip_bad_images: bool,
    pub progress: bool,
    /// Where latency is measured (the metric is always tract's).
    pub runtime: Runtime,
}

/// The runtime whose latency `tune` compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// In process.
    Tract,
    /// onnxruntime's CPU provider, through `python3` (its package must be installed).
    OnnxRuntime,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Tract => "tract",
            Runtime::OnnxRuntime => "onnxruntime",
        }
    }
}

/// One candidate schedule, measured.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub schedule: Schedule,
    pub tokens_out: usize,
    /// MACs of the original over the candidate's (merging included).
    pub mac_ratio: f64,
    /// Timed runs of the original and of the candidate, in turns, milliseconds.
    pub original_ms: Vec<f64>,
    pub candidate_ms: Vec<f64>,
    /// The metric's value: accuracy or agreement in %, or the mean cosine.
    pub value: f64,
    /// Points lost against the original.
    pub drop: f64,
}

impl Candidate {
    /// Median latency of the original over the candidate's.
    pub fn speedup(&self) -> f64 {
        percentile(&self.original_ms, 0.5) / percentile(&self.candidate_ms, 0.5)
    }
    fn merges(&self) -> bool {
        self.mac_ratio > 1.0 + 1e-9 && self.tokens_out > 0
    }
}

/// What a sweep measured, and what tune chose.
#[derive(Clone, Debug)]
pub struct TuneReport {
    pub model: PathBuf,
    pub metric: Metric,
    pub metric_reason: String,
    pub images: usize,
    pub skipped: Vec<String>,
    /// The original's accuracy (in %) when labels were given.
    pub original_accuracy: Option<f64>,
    pub candidates: Vec<Candidate>,
    /// Index into `candidates` of the chosen schedule.
    pub chosen: Option<usize>,
    pub max_drop: Option<f64>,
    pub batch: usize,
    pub threads: usize,
    pub iters: usize,
    pub runtime: Runtime,
    pub output: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// The compile options besides the schedule, as command-line flags.
    pub flags: String,
}

/// The images to run and their labels, in a fixed order.
struct Dataset {
    files: Vec<PathBuf>,
    labels: Option<Vec<usize>>,
    skipped: Vec<String>,
    tensors: Vec<Tensor>,
}

/// Measures every candidate on the images; chooses nothing.
pub fn sweep(path: &Path, opts: &TuneOptions) -> Result<TuneReport, Error> {
    if opts.batch == 0 || opts.threads == 0 || opts.iters == 0 {
        return Err(Error::Input("--batch, --threads and --iters must be at least 1".into()));
    }
    let mut file = onnx::io::read(path)?;
    let (_, types) = crate::prepare(&mut file.proto, &file.dir, &opts.compile)?;
    let macs_before = macs::count(&file.proto, &types).total();
    let (original, shape) = bench::plan(&file.proto, &file.dir, opts.batch)?;
    let [_, 3, height, width] = shape[..] else {
        return Err(Error::Input(format!("tune feeds images: it needs a model input [batch, 3, H, W], this one is {shape:?}")));
    };
    let mut data = dataset(opts, height, width)?;
    let batches = batches(&data.tensors, opts.batch)?;
    data.tensors.clear();
    let output_name = file.proto.graph.as_ref().and_then(|g| g.output.first()).map(|o| o.name.clone()).unwrap_or_default();
    let schedules = if opts.schedules.is_empty() { default_schedules(&file.proto, &types, opts)? } else { opts.schedules.clone() };

    let runs_per_candidate = (batches.len() + 2 * (opts.iters + opts.iters.div_ceil(bench::RUNS_PER_TURN))) as u64;
    let bar = bench::progress_bar(opts.progress, (batches.len() as u64) + schedules.len() as u64 * runs_per_candidate)?;
    let executor = bench::executor(opts.threads);
    bar.set_message("original");
    let reference = multithread_tract_scope(executor.clone(), || outputs(&original, &batches, data.files.len(), &bar))?;
    let (metric, metric_reason) = choose_metric(opts, &data, &reference, &output_name)?;
    let original_accuracy = data.labels.as_ref().map(|labels| accuracy(&reference, labels));

    let mut candidates = vec![];
    for schedule in schedules {
        bar.set_message(format!("--r {schedule}"));
        let mut proto = file.proto.clone();
        let compile = Options { schedule: schedule.clone(), ..opts.compile.clone() };
        let (report, compiled_types) = crate::compile_typed(&mut proto, &file.dir, types.clone(), &compile)?;
        let mac_ratio = macs_before as f64 / macs::count(&proto, &compiled_types).total().max(1) as f64;
        let (plan, _) = bench::plan(&proto, &file.dir, opts.batch)?;
        let (outs, mut times) = multithread_tract_scope(executor.clone(), || {
            let outs = outputs(&plan, &batches, data.files.len(), &bar)?;
            let times = match opts.runtime {
                Runtime::Tract => {
                    let input: TVec<TValue> = tvec![batches[0].clone().into()];
                    bench::time_in_turns(&[original.clone(), plan.clone()], &input, 0, opts.iters, &bar)?
                }
                Runtime::OnnxRuntime => onnxruntime_times(path, &proto, &file.dir, &shape, opts)?,
            };
            Ok::<_, Error>((outs, times))
        })?;
        let (value, drop) = measure(metric, &reference, &outs, data.labels.as_deref(), original_accuracy);
        let candidate_ms = times.pop().unwrap_or_default();
        let original_ms = times.pop().unwrap_or_default();
        candidates.push(Candidate { schedule, tokens_out: report.tokens_out, mac_ratio, original_ms, candidate_ms, value, drop });
    }
    bar.finish_and_clear();
    Ok(TuneReport {
        model: path.to_path_buf(),
        metric,
        metric_reason,
        images: data.files.len(),
        skipped: data.skipped,
        original_accuracy,
        candidates,
        chosen: None,
        max_drop: opts.max_drop,
        batch: opts.batch,
        threads: opts.threads,
        iters: opts.iters,
        runtime: opts.runtime,
        output: None,
        plot: None,
        flags: flags(&opts.compile, opts.target),
    })
}

/// Sweeps, picks the fastest schedule whose drop is within `--max-drop`,
/// compiles it to `output` (the same bytes as `compile --r S`), and writes
/// the report as `OUTPUT.tune.json` and the plot as `OUTPUT.tune.png`.
pub fn tune(path: &Path, output: &Path, opts: &TuneOptions) -> Result<TuneReport, Error> {
    let Some(max_drop) = opts.max_drop.filter(|d| d.is_finite() && *d >= 0.0) else {
        return Err(Error::Input("--max-drop must be a number of points, 0 or more".into()));
    };
    onnx::io::check_output_path(path, output)?;
    // Fail before the sweep, not after it, when the output cannot go where asked.
    let folder = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !folder.is_dir() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder for -o");
        return Err(Error::io(folder, missing));
    }
    let mut report = sweep(path, opts)?;
    let within = |c: &&Candidate| c.merges() && c.drop <= max_drop;
    let chosen = report
        .candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| within(c))
        .max_by(|(_, a), (_, b)| a.speedup().total_cmp(&b.speedup()).then(a.mac_ratio.total_cmp(&b.mac_ratio)))
        .map(|(i, _)| i);
    let Some(chosen) = chosen else {
        let best = report.candidates.iter().filter(|c| c.merges()).min_by(|a, b| a.drop.total_cmp(&b.drop));
        let best = best.map_or("no candidate merges any token".to_string(), |c| {
            format!("the smallest drop was {:.2} at --r {} ({:.2}x measured)", c.drop, c.schedule, c.speedup())
        });
        return Err(Error::Input(format!(
            "no schedule that merges tokens stays within --max-drop {max_drop} ({} over {} images): {best}; raise --max-drop or try smaller --schedule values",
            report.metric.name(),
            report.images
        )));
    };
    report.chosen = Some(chosen);
    let schedule = report.candidates[chosen].schedule.clone();
    let compile = Options { schedule, ..opts.compile.clone() };
    let file = FileOptions { target: opts.target, format: Format::Onnx, verify: verify::Mode::Auto };
    crate::compile_file_checked(path, output, &compile, &file)?;
    let (json_path, png_path) = (sibling(output, "tune.json"), sibling(output, "tune.png"));
    report.output = Some(output.to_path_buf());
    report.plot = Some(png_path.clone());
    let png = plot::png(&figure(&report)).map_err(|e| Error::Input(format!("drawing the plot: {e}")))?;
    onnx::io::write_atomic(&png_path, &png)?;
    let text = serde_json::to_string_pretty(&to_json(&report)).map_err(|e| Error::Input(e.to_string()))?;
    onnx::io::write_atomic(&json_path, text.as_bytes())?;
    Ok(report)
}

/// Times the original at `original` and the candidate `proto` in
/// onnxruntime, in turns, through `python3` (`ort_timer.py`); the candidate
/// is written to a temporary folder for it, removed after.
fn onnxruntime_times(original: &Path, proto: &pb::ModelProto, dir: &Path, shape: &[usize], opts: &TuneOptions) -> Result<Vec<Vec<f64>>, Error> {
    const TIMER: &str = include_str!("ort_timer.py");
    let folder = std::env::temp_dir().join(format!("tome-compile-tune-{}", std::process::id()));
    std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
    let candidate = folder.join("candidate.onnx");
    let result = (|| {
        onnx::io::write(&mut proto.clone(), dir, &candidate)?;
        let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(TIMER)
            .arg(original)
            .arg(&candidate)
            .arg(shape.join(","))
            .args([opts.iters, opts.threads, bench::RUNS_PER_TURN].map(|v| v.to_string()))
            .output()
            .map_err(|e| Error::Input(format!("--runtime onnxruntime runs python3, which failed to start: {e}")))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(Error::Input(why.trim().lines().last().unwrap_or("onnxruntime failed").to_string()));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| Error::Run(format!("onnxruntime timings: {e}")))
    })();
    let _ = std::fs::remove_dir_all(&folder);
    result
}

/// `out.onnx` → `out.<ext>`, beside it.
pub fn sibling(output: &Path, ext: &str) -> PathBuf {
    output.with_extension(ext)
}

/// The default candidates: r = 0, then constant r and the paper's
/// decreasing `r:-1` at eight steps up to the r that would merge every
/// patch token away in a straight line, (N - P) / blocks.
fn default_schedules(
    proto: &pb::ModelProto,
    types: &std::collections::HashMap<String, tome_passes::TensorType>,
    opts: &TuneOptions,
) -> Result<Vec<Schedule>, Error> {
    let mut probe = proto.clone();
    let r0 = Options { schedule: Schedule::Constant(0), ..opts.compile.clone() };
    let report = tome_passes::compile(&mut probe, types.clone(), &r0)?;
    let tokens = report.blocks.first().map_or(0, |b| b.step.tokens_in);
    let full = tokens.saturating_sub(report.prefix) / report.blocks.len().max(1);
    let rs: BTreeSet<usize> = (1..=8).map(|i| (full * i).div_ceil(8)).filter(|&r| r > 0).collect();
    let mut schedules = vec![Schedule::Constant(0)];
    schedules.extend(rs.iter().map(|&r| Schedule::Constant(r)));
    schedules.extend(rs.iter().map(|&r| Schedule::Inflect { r, inflect: -1.0 }));
    Ok(schedules)
}

/// The images under `opts.images` in a fixed order (sorted paths), with
/// labels from `opts.labels` or from class folders, preprocessed like
/// `run --image`.
fn dataset(opts: &TuneOptions, height: usize, width: usize) -> Result<Dataset, Error> {
    let root = &opts.images;
    if !root.is_dir() {
        return Err(Error::Input(format!("--images {}: not a folder of images", root.display())));
    }
    let (files, labels) = match &opts.labels {
        Some(csv) => labelled_by_csv(root, csv)?,
        None => {
            let mut files = vec![];
            collect_images(root, &mut files)?;
            files.sort();
            let labels = image_folder_labels(root, &files)?;
            (files, labels)
        }
    };
    if files.is_empty() {
        return Err(Error::Input(format!("--images {}: no PNG or JPEG images in it", root.display())));
    }
    let mut data = Dataset { files: vec![], labels: labels.as_ref().map(|_| vec![]), skipped: vec![], tensors: vec![] };
    for (i, file) in files.into_iter().enumerate() {
        match image_tensor(&file, height, width, opts.mean, opts.std) {
            Ok(t) => {
                data.tensors.push(t);
                if let (Some(all), Some(kept)) = (&labels, data.labels.as_mut()) {
                    kept.push(all[i]);
                }
                data.files.push(file);
            }
            Err(Error::Input(why)) if opts.skip_bad_images => data.skipped.push(why),
            Err(Error::Input(why)) => return Err(Error::Input(format!("{why}; --skip-bad-images skips such files"))),
            Err(e) => return Err(e),
        }
    }
    if data.files.is_empty() {
        return Err(Error::Input(format!("--images {}: none of its images could be read", root.display())));
    }
    Ok(data)
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// ImageFolder's labels (torchvision's rule): when every image sits in a
/// subfolder of `root`, the label is the index of that subfolder's name
/// among the sorted names. `None` when some image lies in `root` itself.
fn image_folder_labels(root: &Path, files: &[PathBuf]) -> Result<Option<Vec<usize>>, Error> {
    let class_of = |f: &PathBuf| -> Option<String> {
        let rel = f.strip_prefix(root).ok()?;
        let mut parts = rel.components();
        let first = parts.next()?.as_os_str().to_string_lossy().to_string();
        parts.next().map(|_| first)
    };
    let classes: Option<Vec<String>> = files.iter().map(class_of).collect();
    let Some(classes) = classes else { return Ok(None) };
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    Ok(Some(classes.iter().map(|c| names.iter().position(|n| n == c).unwrap_or(0)).collect()))
}

/// The images and labels a `file,label` CSV lists (a header line is
/// skipped when its label is not a number).
fn labelled_by_csv(root: &Path, csv: &Path) -> Result<(Vec<PathBuf>, Option<Vec<usize>>), Error> {
    let text = std::fs::read_to_string(csv).map_err(|e| Error::io(csv, e))?;
    let (mut files, mut labels) = (vec![], vec![]);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || Error::Input(format!("{}:{}: expected `file,label` with a class index, found '{line}'", csv.display(), n + 1));
        let (file, label) = line.rsplit_once(',').ok_or_else(bad)?;
        match label.trim().parse::<usize>() {
            Ok(label) => {
                files.push(root.join(file.trim()));
                labels.push(label);
            }
            Err(_) if n == 0 => continue,
            Err(_) => return Err(bad()),
        }
    }
    Ok((files, Some(labels)))
}

/// The images as batches of `batch`, the last one padded by repeating its
/// final image (whose outputs are dropped).
fn batches(tensors: &[Tensor], batch: usize) -> Result<Vec<Tensor>, Error> {
    tensors
        .chunks(batch)
        .map(|chunk| {
            let mut views: Vec<&Tensor> = chunk.iter().collect();
            while views.len() < batch {
                views.push(&chunk[chunk.len() - 1]);
            }
            Tensor::stack_tensors(0, &views).map_err(|e| Error::Run(format!("{e:#}")))
        })
        .collect()
}

/// The first output of `plan` on every image, one row per image.
fn outputs(plan: &Arc<TypedRunnableModel>, batches: &[Tensor], images: usize, bar: &indicatif::ProgressBar) -> Result<Vec<Vec<f32>>, Error> {
    let mut rows = vec![];
    for input in batches {
        let out = plan.run(tvec![input.clone().into()]).map_err(|e| Error::Run(format!("{e:#}")))?;
        bar.inc(1);
        let first = out.into_iter().next().ok_or_else(|| Error::Run("the model has no output".into()))?.into_tensor();
        let first = first.cast_to::<f32>().map_err(|e| Error::Run(format!("{e:#}")))?.into_owned();
        let values: Vec<f32> = first.to_plain_array_view::<f32>().map_err(|e| Error::Run(format!("{e:#}")))?.iter().copied().collect();
        let per_image = values.len() / input.shape()[0].max(1);
        rows.extend(values.chunks(per_image.max(1)).map(|c| c.to_vec()));
    }
    rows.truncate(images);
    Ok(rows)
}

/// The metric: the user's, else accuracy with labels, else agreement for
/// a classifier's scores (an output [batch, classes] named like logits),
/// else cosine.
fn choose_metric(opts: &TuneOptions, data: &Dataset, reference: &[Vec<f32>], output: &str) -> Result<(Metric, String), Error> {
    let classes = reference.first().map_or(0, |r| r.len());
    match (opts.metric, &data.labels) {
        (Some(Metric::Accuracy), None) => {
            Err(Error::Input("--metric accuracy needs labels: class folders under --images, or --labels FILE.csv".into()))
        }
        (Some(Metric::Accuracy), Some(labels)) => {
            match labels.iter().find(|&&l| l >= classes) {
                Some(l) => Err(Error::Input(format!("label {l} is not a class of this model, whose output has {classes} scores"))),
                None => Ok((Metric::Accuracy, "asked for (--metric accuracy)".into())),
            }
        }
        (Some(m), _) => Ok((m, format!("asked for (--metric {})", m.name()))),
        (None, Some(labels)) if labels.iter().all(|&l| l < classes) => {
            Ok((Metric::Accuracy, "labels were given".into()))
        }
        (None, Some(_)) => Err(Error::Input(format!(
            "the labels name classes beyond the {classes} scores of output {output}; use --metric agreement or cosine"
        ))),
        (None, None) if output.to_ascii_lowercase().contains("logit") => {
            Ok((Metric::Agreement, format!("output {output} holds class scores and no labels were given")))
        }
        (None, None) => Ok((Metric::Cosine, format!("output {output} is not named like class scores (logits): an embedding"))),
    }
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(i, _)| i)
}

/// Top-1 accuracy in %.
fn accuracy(rows: &[Vec<f32>], labels: &[usize]) -> f64 {
    let hits = rows.iter().zip(labels).filter(|(row, &l)| argmax(row) == l).count();
    100.0 * hits as f64 / rows.len().max(1) as f64
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(1e-30)
}

/// (value, drop) of the candidate's outputs against the reference's.
fn measure(metric: Metric, reference: &[Vec<f32>], outs: &[Vec<f32>], labels: Option<&[usize]>, original_accuracy: Option<f64>) -> (f64, f64) {
    match (metric, labels) {
        (Metric::Accuracy, Some(labels)) => {
            let value = accuracy(outs, labels);
            (value, original_accuracy.unwrap_or(value) - value)
        }
        (Metric::Cosine, _) => {
            let mean = reference.iter().zip(outs).map(|(a, b)| cosine(a, b)).sum::<f64>() / outs.len().max(1) as f64;
            (mean, 100.0 * (1.0 - mean))
        }
        _ => {
            let same = reference.iter().zip(outs).filter(|(a, b)| argmax(a) == argmax(b)).count();
            let value = 100.0 * same as f64 / outs.len().max(1) as f64;
            (value, 100.0 - value)
        }
    }
}

/// The compile flags besides `--r` that reproduce the chosen model.
fn flags(opts: &Options, target: Target) -> String {
    let mut f = vec![];
    if !opts.prop_attn {
        f.push("--prop-attn off".to_string());
    }
    if opts.unmerge {
        f.push("--tokens full".into());
    }
    if opts.merged_tokens {
        f.push("--tokens merged".into());
    }
    if let Some([h, w]) = opts.image_size {
        f.push(format!("--image-size {h}x{w}"));
    }
    if target != Target::Portable {
        f.push(format!("--target {target}"));
    }
    f.join(" ")
}

fn schedule_kind(s: &Schedule) -> &'static str {
    match s {
        Schedule::Inflect { .. } => "decreasing",
        _ => "constant",
    }
}

/// The figure `tune` writes: measured speedup against the drop, one point
/// per candidate, the budget as a dashed line, the chosen one ringed.
pub fn figure(r: &TuneReport) -> plot::Figure {
    const CONSTANT: [u8; 3] = [31, 119, 180];
    const DECREASING: [u8; 3] = [255, 127, 14];
    let points = r
        .candidates
        .iter()
        .enumerate()
        .map(|(i, c)| plot::Point {
            x: c.speedup(),
            y: c.drop,
            color: if schedule_kind(&c.schedule) == "constant" { CONSTANT } else { DECREASING },
            label: format!("r{}", c.schedule),
            marked: r.chosen == Some(i),
        })
        .collect();
    let name = r.model.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
    plot::Figure {
        title: format!("{name}: {} over {} images, {} batch {}", r.metric.name(), r.images, r.runtime.name(), r.batch),
        x_title: "speedup over the original (measured, median latency)".into(),
        y_title: format!("{} drop (points)", r.metric.name()),
        points,
        hline: r.max_drop.map(|d| (d, format!("max drop {d}"))),
        legend: vec![(CONSTANT, "constant r".into()), (DECREASING, "decreasing r:-1".into())],
    }
}

/// The table `sweep` and `tune` print.
pub fn render(r: &TuneReport) -> String {
    let mut s = format!(
        "{} images, metric {} ({}), latency in {} at batch {}, {} thread{}, {} timed runs per model per candidate\n",
        r.images,
        r.metric.name(),
        r.metric_reason,
        r.runtime.name(),
        r.batch,
        r.threads,
        if r.threads == 1 { "" } else { "s" },
        r.iters
    );
    for skipped in &r.skipped {
        s += &format!("skipped: {skipped}\n");
    }
    if let Some(acc) = r.original_accuracy {
        s += &format!("original accuracy: {acc:.2}%\n");
    }
    s += &format!("{:<10} {:>7} {:>9} {:>9} {:>10} {:>8}\n", "--r", "tokens", "measured", "MACs", r.metric.name(), "drop");
    let decimals = if r.metric == Metric::Cosine { 3 } else { 2 };
    for (i, c) in r.candidates.iter().enumerate() {
        let value = if r.metric == Metric::Cosine { format!("{:.5}", c.value) } else { format!("{:.2}%", c.value) };
        let mark = if r.chosen == Some(i) { "  <- chosen" } else { "" };
        s += &format!(
            "{:<10} {:>7} {:>8.2}x {:>8.2}x {:>10} {:>8.decimals$}{mark}\n",
            c.schedule.to_string(),
            c.tokens_out,
            c.speedup(),
            c.mac_ratio,
            value,
            c.drop
        );
    }
    if let (Some(i), Some(out)) = (r.chosen, &r.output) {
        let c = &r.candidates[i];
        s += &format!(
            "chosen --r {} ({:.2}x measured, drop {:.3} within --max-drop {}): wrote {} (= tome-compile compile --r {}{}), {}, {}\n",
            c.schedule,
            c.speedup(),
            c.drop,
            r.max_drop.unwrap_or_default(),
            out.display(),
            c.schedule,
            if r.flags.is_empty() { String::new() } else { format!(" {}", r.flags) },
            sibling(out, "tune.json").display(),
            r.plot.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
        );
    }
    s
}

/// The report as JSON (what `tune` writes beside the model, and `--json` prints).
pub fn to_json(r: &TuneReport) -> serde_json::Value {
    let candidate = |c: &Candidate| {
        json!({
            "schedule": c.schedule.to_string(),
            "kind": schedule_kind(&c.schedule),
            "tokens_out": c.tokens_out,
            "mac_ratio": c.mac_ratio,
            "speedup": c.speedup(),
            "original_median_ms": percentile(&c.original_ms, 0.5),
            "original_p90_ms": percentile(&c.original_ms, 0.9),
            "median_ms": percentile(&c.candidate_ms, 0.5),
            "p90_ms": percentile(&c.candidate_ms, 0.9),
            "value": c.value,
            "drop": c.drop,
            "within_budget": r.max_drop.map(|d| c.merges() && c.drop <= d),
        })
    };
    json!({
        "model": r.model.display().to_string(),
        "runtime": r.runtime.name(),
        "metric_runtime": "tract",
        "batch": r.batch,
        "threads": r.threads,
        "iters": r.iters,
        "metric": r.metric.name(),
        "metric_reason": r.metric_reason,
        "max_drop": r.max_drop,
        "images": r.images,
        "skipped_images": r.skipped,
        "original_accuracy": r.original_accuracy,
        "candidates": r.candidates.iter().map(candidate).collect::<Vec<_>>(),
        "chosen": r.chosen.map(|i| candidate(&r.candidates[i])),
        "compile_flags": r.flags,
        "output": r.output.as_ref().map(|p| p.display().to_string()),
        "report": r.output.as_ref().map(|p| sibling(p, "tune.json").display().to_string()),
        "plot": r.plot.as_ref().map(|p| p.display().to_string()),
    })
}
