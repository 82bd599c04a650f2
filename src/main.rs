//! The `tome-compile` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tome_compile::run::{floats, image_tensor, top_k, Runner};
use tome_compile::{verify, ErrorKind, Options, PassError, Report, Schedule};

mod tools;

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
    #[arg(long = "r", value_name = "SCHEDULE", allow_hyphen_values = true, required = true)]
    r: Option<String>,
    /// Where to write the compiled model (never the input).
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
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
    /// Report errors as one JSON object on stderr.
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

fn main() -> ExitCode {
    let json_flag = std::env::args_os().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(e) if json_flag => {
            let text = e.render().to_string();
            return fail(ErrorKind::Usage, text.trim().trim_start_matches("error: "), true);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(ErrorKind::Usage.exit_code());
        }
    };
    let (json, command): (bool, Box<dyn FnOnce() -> Result<()>>) = match cli.command {
        Some(Command::Compile(args)) => (args.json, Box::new(|| compile(args))),
        Some(Command::Run(args)) => (args.json, Box::new(|| run(args))),
        Some(Command::Check(args)) => (json_flag, Box::new(|| tools::check(args))),
        Some(Command::Bench(args)) => (json_flag, Box::new(|| tools::bench(args))),
        Some(Command::Inspect(args)) => (json_flag, Box::new(|| tools::inspect(args))),
        Some(Command::Visualize(args)) => (json_flag, Box::new(|| visualize(args))),
        None => (cli.compile.json, Box::new(|| compile(cli.compile))),
    };
    // The library catches tract's panics; this net catches any other, so
    // that no command prints a panic.
    let result = tome_compile::guard::catch_panics("running the command", || Ok(command()));
    match result.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(error_kind(&e), &message(&e), json),
    }
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
        .find_map(|cause| match (cause.downcast_ref::<tome_compile::Error>(), cause.downcast_ref::<PassError>()) {
            (Some(e), _) => Some(e.kind()),
            (_, Some(e)) => Some(ErrorKind::of_pass(e)),
            _ => cause.is::<std::io::Error>().then_some(ErrorKind::Io),
        })
        .unwrap_or(ErrorKind::Usage)
}

/// Prints the error on stderr, as one line or, with `--json`, as one JSON
/// object `{"error": {"kind", "message", "exit_code"}}`; returns its exit code.
fn fail(kind: ErrorKind, message: &str, json: bool) -> ExitCode {
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
    ExitCode::from(kind.exit_code())
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

fn compile(args: CompileArgs) -> Result<()> {
    let (Some(input), Some(r), Some(output)) = (args.input, args.r, args.output) else {
        bail!("compile needs a model, --r and -o");
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
        tract_ops: false,
    };
    let mode = match args.verify {
        VerifyArg::On => verify::Mode::On,
        VerifyArg::Off => verify::Mode::Off,
        VerifyArg::Auto => verify::Mode::Auto,
    };
    let compiled = tools::compile_file(&input, &output, &opts, &args.deploy, mode)?;
    print_report(&compiled.report, &schedule, opts.prop_attn);
    if compiled.report.fused_merges > 0 {
        let (n, op) = (compiled.report.fused_merges, tome_passes::tome::FUSED_MERGE_OP);
        println!("{n} merges as one {op} node each: runs in tract with tome-compile's ops only");
    }
    if compiled.report.fused_attentions > 0 {
        let (n, op) = (compiled.report.fused_attentions, tome_passes::lower::FUSED_ATTENTION_OP);
        println!("{n} attentions as one {op} node each");
    }
    println!("{}", compiled.verification);
    println!("wrote {}", output.display());
    Ok(())
}

fn print_report(report: &Report, schedule: &Schedule, prop_attn: bool) {
    let first = &report.blocks[0];
    println!(
        "{} blocks ({} heads x {}, width {}), {} tokens = {} prefix + {} patches, head: {}",
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
        println!("{line}");
    }
    if !report.canonical.is_empty() {
        println!("seen through (compute nothing here): {}", report.canonical.join(", "));
    }
    println!("schedule --r {schedule}, proportional attention {}", if prop_attn { "on" } else { "off" });
    println!("{:<10} {:>4} {:>6} {:>7}", "block", "r", "tokens", "merged");
    for b in &report.blocks {
        let clamp = if b.step.r < b.step.requested { format!(" (asked {})", b.step.requested) } else { String::new() };
        println!("{:<10} {:>4} {:>6} {:>7}{clamp}", b.name, b.step.r, b.step.tokens_in, b.step.tokens_out);
    }
    println!("tokens leaving the last block: {}", report.tokens_out);
    for out in &report.merged_outputs {
        println!("graph output {out} carries the {} merged tokens; their sizes are graph output tome_size", report.tokens_out);
    }
}

fn run(args: RunArgs) -> Result<()> {
    let runner = Runner::load(&args.model)?;
    let inputs = match (&args.input, &args.image) {
        (Some(npz), _) => {
            let mut arrays = tome_compile::npz::read(npz)?;
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
        tract_ops: false,
    };
    let (Ok(mean), Ok(std)) = (<[f32; 3]>::try_from(args.mean), <[f32; 3]>::try_from(args.std)) else {
        bail!("--mean and --std take three comma-separated values, one per RGB channel");
    };
    let v = tome_compile::visualize::visualize(&args.model, &opts, &args.image, mean, std)?;
    tome_compile::visualize::save(&v, &args.output)?;
    println!("{} patches in {} groups (final patch tokens); wrote {}", v.group.len(), v.groups, args.output.display());
    Ok(())
}
