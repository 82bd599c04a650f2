//! The `tome-compile` command line: argument parsing and one function per
//! command; the commands' work lives in the library modules.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use crate::runtime::run::{floats, image_tensor, top_k, Runner};
use crate::{runtime::verify, ErrorKind, Ops, Options, PassError, Report, Schedule, Target};

pub mod bench;
pub mod inspect;
pub mod plot;
mod tools;
pub mod tune;
pub mod visualize;

/// Applies Token Merging (ToMe) to an ONNX Vision Transformer.
///
/// `tome-compile in.onnx --r 16 -o out.onnx` writes a model that merges r
/// similar tokens per block; `tome-compile run out.onnx --image cat.png`
/// runs a model with tract on CPU.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    compile: CompileArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Rewrite a ViT to merge tokens (the default command).
    Compile(CompileArgs),
    /// Run a model with tract on CPU and print its outputs (top-5 for a classifier).
    Run(RunArgs),
    /// Check a model against TensorRT's ONNX-parser constraints (8.6 and 10.x).
    Check(tools::CheckArgs),
    /// Time the original and the compiled model in tract on CPU.
    Bench(tools::BenchArgs),
    /// Show blocks, schedule, tokens and MACs before and after, without writing.
    Inspect(tools::InspectArgs),
    /// Draw which patches each final token stands for, on an image (PNG).
    Visualize(VisualizeArgs),
    /// Choose the fastest schedule within an accuracy budget on your images, and write it.
    Tune(tools::TuneArgs),
    /// Measure candidate schedules on your images (speed and metric drop), choosing none.
    Sweep(tools::SweepArgs),
}

#[derive(Args)]
struct VisualizeArgs {
    /// The ONNX model (compiled in memory; not written).
    model: PathBuf,
    /// Tokens merged per block, as for compile.
    #[arg(long = "r", value_name = "SCHEDULE", allow_hyphen_values = true)]
    r: String,
    #[arg(long, value_enum, default_value_t = Switch::On)]
    prop_attn: Switch,
    /// The image (PNG or JPEG), resized to the model's input size.
    #[arg(long)]
    image: PathBuf,
    /// Per-channel mean (ImageNet's by default).
    #[arg(long, value_delimiter = ',', default_values_t = [0.485, 0.456, 0.406])]
    mean: Vec<f32>,
    /// Per-channel standard deviation.
    #[arg(long, value_delimiter = ',', default_values_t = [0.229, 0.224, 0.225])]
    std: Vec<f32>,
    /// Image size for an input the export left symbolic (see compile).
    #[arg(long, value_name = "HxW", value_parser = tools::parse_image_size)]
    image_size: Option<[i64; 2]>,
    /// The PNG to write.
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Args)]
struct CompileArgs {
    /// The ONNX model to compile.
    #[arg(required = true)]
    input: Option<PathBuf>,
    /// Tokens merged per block: `16`, a list `16,16,8,0` (padded with 0), or
    /// `R:INFLECT` like `8:-1` (the paper's decreasing schedule).
    #[arg(long = "r", value_name = "SCHEDULE", allow_hyphen_values = true, required_unless_present = "ratio", conflicts_with = "ratio")]
    r: Option<String>,
    /// Where to write the compiled model (never the input).
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    #[command(flatten)]
    unet: tools::UnetArgs,
    /// Proportional attention: add log(size) to the attention logits.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    prop_attn: Switch,
    /// For heads that read every patch token (a Reshape back to an image grid,
    /// as in segmentation): give each patch the value of the token it merged
    /// into, restoring the full sequence before that head.
    #[arg(long, conflicts_with = "tokens")]
    unmerge: bool,
    /// For a graph output of every token (a backbone's last_hidden_state):
    /// `merged` outputs the merged tokens and adds graph output `tome_size`
    /// (each token's size); `full` is --unmerge.
    #[arg(long, value_enum, value_name = "merged|full")]
    tokens: Option<tools::TokensArg>,
    /// Image size for an input whose height and width the export left
    /// symbolic and the graph does not fix: `224x224` or `224`.
    #[arg(long, value_name = "HxW", value_parser = tools::parse_image_size)]
    image_size: Option<[i64; 2]>,
    /// Write the timing bound instead (see `bench --bound`): tokens dropped,
    /// not merged, so the outputs are wrong. For benchmarks only.
    #[arg(long, hide = true)]
    bound: bool,
    #[command(flatten)]
    deploy: tools::DeployArgs,
    /// Run original and compiled model once in tract and refuse a wrong
    /// result; `auto` does it when the model is cheap (at most 5 G
    /// multiply-accumulates at batch 1).
    #[arg(long, value_enum, default_value_t = VerifyArg::Auto)]
    verify: VerifyArg,
    /// Print the report as JSON, and errors as one JSON object on stderr.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum VerifyArg {
    On,
    Off,
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Args)]
struct RunArgs {
    /// The ONNX model to run.
    model: PathBuf,
    /// Inputs from a .npz archive: arrays named like the model's inputs, or
    /// the only array for a one-input model.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    input: Option<PathBuf>,
    /// An image file (PNG or JPEG), resized to the model's input size.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Per-channel mean for --image (ImageNet's by default; timm's augreg ViTs use 0.5,0.5,0.5).
    #[arg(long, value_delimiter = ',', default_values_t = [0.485, 0.456, 0.406])]
    mean: Vec<f32>,
    /// Per-channel standard deviation for --image.
    #[arg(long, value_delimiter = ',', default_values_t = [0.229, 0.224, 0.225])]
    std: Vec<f32>,
    /// Report errors as one JSON object on stderr.
    #[arg(long)]
    json: bool,
}

/// Runs the command line `args` (the program name first, as
/// `std::env::args_os` gives it) and returns the documented exit code.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    ExitCode::from(run_command_line(args))
}

/// `main`'s exit code as a number (0 ok, 1 usage, 2 model, 3 I/O, 4 verification or internal).
pub fn run_command_line(args: impl IntoIterator<Item = std::ffi::OsString>) -> u8 {
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    let json_flag = args.iter().any(|a| a == "--json");
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return 0;
        }
        Err(e) if json_flag => {
            let text = e.render().to_string();
            return fail(ErrorKind::Usage, text.trim().trim_start_matches("error: "), true);
        }
        Err(e) => {
            let _ = e.print();
            return ErrorKind::Usage.exit_code();
        }
    };
    let (json, result) = dispatch(cli, json_flag);
    match result {
        Ok(Output::Printed) => 0,
        Ok(Output::Report { text, json: value }) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
            } else {
                print!("{text}");
            }
            0
        }
        Err(e) => fail(e.kind, &e.message, json),
    }
}

/// Runs a command line for a program rather than a person (the Python
/// package): the command's result as `--json` would print it, or its
/// failure. Only progress bars (on a terminal) are printed.
pub fn execute(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<serde_json::Value, Failure> {
    let cli = Cli::try_parse_from(args).map_err(|e| {
        let text = e.render().to_string();
        Failure { kind: ErrorKind::Usage, message: text.trim().trim_start_matches("error: ").to_string() }
    })?;
    match dispatch(cli, true).1? {
        Output::Report { json, .. } => Ok(json),
        Output::Printed => Ok(serde_json::Value::Null),
    }
}

/// What a command leaves to print.
enum Output {
    /// It printed what it had to say itself.
    Printed,
    /// Its text for a terminal, and its result for `--json`.
    Report { text: String, json: serde_json::Value },
}

/// A failed command: its kind (and so its exit code) and its one-line
/// message, as `--json` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

/// Runs the parsed command; returns whether its output is JSON, and what it produced.
fn dispatch(cli: Cli, json_flag: bool) -> (bool, Result<Output, Failure>) {
    let (json, command): (bool, Box<dyn FnOnce() -> Result<Output>>) = match cli.command {
        Some(Command::Compile(args)) => (args.json || json_flag, Box::new(|| compile(args))),
        Some(Command::Run(args)) => (args.json, Box::new(|| printed(run(args)))),
        Some(Command::Check(args)) => (json_flag, Box::new(|| printed(tools::check(args)))),
        Some(Command::Bench(args)) => (json_flag, Box::new(|| printed(tools::bench(args)))),
        Some(Command::Inspect(args)) => (json_flag, Box::new(|| tools::inspect(args))),
        Some(Command::Visualize(args)) => (json_flag, Box::new(|| printed(visualize(args)))),
        Some(Command::Tune(args)) => (json_flag, Box::new(|| tools::tune(args))),
        Some(Command::Sweep(args)) => (json_flag, Box::new(|| tools::sweep(args))),
        None => (cli.compile.json || json_flag, Box::new(|| compile(cli.compile))),
    };
    // The library catches tract's panics; this net catches any other, so
    // that no command prints a panic.
    let result = crate::runtime::guard::catch_panics("running the command", || Ok(command()));
    let result = result.map_err(anyhow::Error::from).and_then(|r| r);
    (json, result.map_err(|e| Failure { kind: error_kind(&e), message: message(&e) }))
}

fn printed(done: Result<()>) -> Result<Output> {
    done.map(|()| Output::Printed)
}

/// The error and its causes, skipping a cause whose text the message
/// already holds (an I/O error names its source in its own text).
fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if !text.contains(&cause) {
            text += if text.is_empty() { "" } else { ": " };
            text += &cause;
        }
    }
    text
}

/// Exit codes, by `ErrorKind`: 0 ok, 1 usage, 2 invalid or unsupported
/// model, 3 I/O, 4 verification failed or internal error. Errors the
/// command line raises itself (missing or conflicting arguments) are usage.
fn error_kind(e: &anyhow::Error) -> ErrorKind {
    e.chain()
        .find_map(|cause| match (cause.downcast_ref::<crate::Error>(), cause.downcast_ref::<PassError>()) {
            (Some(e), _) => Some(e.kind()),
            (_, Some(e)) => Some(ErrorKind::of_pass(e)),
            _ => cause.is::<std::io::Error>().then_some(ErrorKind::Io),
        })
        .unwrap_or(ErrorKind::Usage)
}

/// Prints the error on stderr, as one line or, with `--json`, as one JSON
/// object `{"error": {"kind", "message", "exit_code"}}`; returns its exit code.
fn fail(kind: ErrorKind, message: &str, json: bool) -> u8 {
    if json {
        eprintln!(
            "{{\"error\": {{\"kind\": {}, \"message\": {}, \"exit_code\": {}}}}}",
            json_string(kind.name()),
            json_string(message),
            kind.exit_code()
        );
    } else {
        eprintln!("error: {}", message.replace('\n', " "));
    }
    kind.exit_code()
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn compile(args: CompileArgs) -> Result<Output> {
    if args.unet.ratio.is_some() {
        let (Some(input), Some(output)) = (&args.input, &args.output) else {
            bail!("compile needs a model and -o");
        };
        return tools::compile_unet(input, output, &args.unet, args.deploy.target.into());
    }
    let (Some(input), Some(r), Some(output)) = (args.input, args.r, args.output) else {
        bail!("compile needs a model, --r (or --ratio for a UNet) and -o");
    };
    let schedule: Schedule = r.parse()?;
    let prop_attn = matches!(args.prop_attn, Switch::On);
    let (unmerge, merged_tokens) = tools::token_choice(args.unmerge, args.tokens);
    let opts = Options {
        schedule: schedule.clone(),
        prop_attn,
        unmerge,
        merged_tokens,
        image_size: args.image_size,
        bound: args.bound,
        ops: Ops::Standard,
    };
    let mode = match args.verify {
        VerifyArg::On => verify::Mode::On,
        VerifyArg::Off => verify::Mode::Off,
        VerifyArg::Auto => verify::Mode::Auto,
    };
    let compiled = tools::compile_file(&input, &output, &opts, &args.deploy, mode).map_err(|e| match e.downcast_ref::<crate::Error>() {
        Some(crate::Error::Pass(_)) => tools::unet_hint(&input, e),
        _ => e,
    })?;
    let mut text = report_text(&compiled.report, &schedule, opts.prop_attn);
    if compiled.report.fused_merges > 0 {
        let (n, op) = (compiled.report.fused_merges, tome_passes::vit::tome::FUSED_MERGE_OP);
        let runs = match Target::from(args.deploy.target) {
            Target::OnnxRuntimeOps => "runs in onnxruntime with libtome_ort_ops registered (README: Runtime plugins)",
            Target::OpenVinoOps => "runs in OpenVINO with libtome_ov_ops added (README: Runtime plugins)",
            _ => "runs in tract with tome-compile's ops only",
        };
        text += &format!("{n} merges as one {op} node each: {runs}\n");
    }
    if compiled.report.fused_attentions > 0 {
        let n = compiled.report.fused_attentions;
        let op = match Target::from(args.deploy.target) {
            Target::Tract => tome_passes::vit::lower::FUSED_ATTENTION_OP,
            _ => "com.microsoft Attention (onnxruntime's)",
        };
        text += &format!("{n} attentions as one {op} node each\n");
    }
    text += &format!("{}\nwrote {}\n", compiled.verification, output.display());
    let mut json = inspect::report_json(&compiled.report, &opts, args.deploy.target.into());
    if let Some(map) = json.as_object_mut() {
        map.insert("verification".into(), compiled.verification.to_string().into());
        map.insert("output".into(), output.display().to_string().into());
    }
    Ok(Output::Report { text, json })
}

/// The compile report as the terminal shows it.
fn report_text(report: &Report, schedule: &Schedule, prop_attn: bool) -> String {
    let mut s = String::new();
    let first = &report.blocks[0];
    s += &format!("{} blocks ({} heads x {}, width {}), {} tokens = {} prefix + {} patches, head: {}\n",
        report.blocks.len(),
        first.heads,
        first.head_dim,
        first.width,
        first.step.tokens_in,
        report.prefix,
        first.step.tokens_in - report.prefix,
        report.head
    );
    for line in &report.prepared {
        s += &format!("{line}\n");
    }
    if !report.canonical.is_empty() {
        s += &format!("seen through (compute nothing here): {}\n", report.canonical.join(", "));
    }
    s += &format!("schedule --r {schedule}, proportional attention {}\n", if prop_attn { "on" } else { "off" });
    s += &format!("{:<10} {:>4} {:>6} {:>7}\n", "block", "r", "tokens", "merged");
    for b in &report.blocks {
        let clamp = if b.step.r < b.step.requested { format!(" (asked {})", b.step.requested) } else { String::new() };
        s += &format!("{:<10} {:>4} {:>6} {:>7}{clamp}\n", b.name, b.step.r, b.step.tokens_in, b.step.tokens_out);
    }
    s += &format!("tokens leaving the last block: {}\n", report.tokens_out);
    for out in &report.merged_outputs {
        s += &format!("graph output {out} carries the {} merged tokens; their sizes are graph output tome_size\n", report.tokens_out);
    }
    s
}

fn run(args: RunArgs) -> Result<()> {
    let runner = Runner::load(&args.model)?;
    let inputs = match (&args.input, &args.image) {
        (Some(npz), _) => {
            let mut arrays = crate::onnx::npz::read(npz)?;
            if arrays.len() == 1 && runner.input_names.len() == 1 {
                arrays.into_values().collect()
            } else {
                runner
                    .input_names
                    .iter()
                    .map(|n| arrays.remove(n).with_context(|| format!("{} has no array named {n}", npz.display())))
                    .collect::<Result<Vec<_>>>()?
            }
        }
        (None, Some(image)) => {
            let (h, w) = match runner.input_shape.as_slice() {
                [_, 3, h, w] if *h > 0 && *w > 0 => (*h, *w),
                s => bail!("--image needs a model input of shape [batch, 3, H, W], this model takes {s:?}"),
            };
            let (Ok(mean), Ok(std)) = (<[f32; 3]>::try_from(args.mean), <[f32; 3]>::try_from(args.std)) else {
                bail!("--mean and --std take three comma-separated values, one per RGB channel");
            };
            vec![image_tensor(image, h, w, mean, std)?]
        }
        (None, None) => bail!("give --input x.npz or --image file"),
    };
    let outputs = runner.run(inputs)?;
    for (name, out) in runner.output_names.iter().zip(&outputs) {
        println!("{name}: {:?}", out.shape());
        match (out.shape(), floats(out)) {
            ([batch, classes], Some(values)) if *classes > 1 => {
                for (i, row) in values.chunks(*classes).enumerate().take(*batch) {
                    let top: Vec<String> = top_k(row, 5).iter().map(|(c, v)| format!("{c}: {v:.4}")).collect();
                    println!("  image {i} top-5 (class: logit): {}", top.join("  "));
                }
            }
            (_, Some(values)) => println!("  {:?}", &values[..values.len().min(10)]),
            _ => println!("  {out:?}"),
        }
    }
    Ok(())
}

fn visualize(args: VisualizeArgs) -> Result<()> {
    let schedule: Schedule = args.r.parse()?;
    // Only the sources are read, so any head is fine: restore full sequences where one is needed.
    let opts = Options {
        schedule,
        prop_attn: matches!(args.prop_attn, Switch::On),
        unmerge: true,
        merged_tokens: false,
        image_size: args.image_size,
        bound: false,
        ops: Ops::Standard,
    };
    let (Ok(mean), Ok(std)) = (<[f32; 3]>::try_from(args.mean), <[f32; 3]>::try_from(args.std)) else {
        bail!("--mean and --std take three comma-separated values, one per RGB channel");
    };
    let v = crate::cli::visualize::visualize(&args.model, &opts, &args.image, mean, std)?;
    crate::cli::visualize::save(&v, &args.output)?;
    println!("{} patches in {} groups (final patch tokens); wrote {}", v.group.len(), v.groups, args.output.display());
    Ok(())
}
