//! Fuzzing with a fixed budget, seeded with the fixtures: random bytes,
//! truncated and bit-flipped files, graphs mutated through the protobuf
//! types, corrupt `.npz` archives and wrongly shaped inputs. Every case must
//! end in a compiled model or a clean `tome_compile::Error`: no panic
//! escaping the library, no hang (each case has `CASE_TIME_LIMIT`), and no
//! output or temporary file left behind by an error.
//!
//! `cargo test --test fuzz -- --nocapture` prints a table of classes, counts
//! and outcomes. A failing case is saved under `target/tmp/fuzz-failures/`;
//! reduce it and add it to `tests/fuzz_corpus/` (see `write_corpus`).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prost::Message;
use tome_compile::runtime::run::Runner;
use tome_compile::{runtime::verify, Error, ErrorKind, Options, Target};
use tome_passes::graph::{float_tensor, int64_tensor};
use tome_passes::pb;
use tract_onnx::prelude::Tensor;

/// A case that runs longer than this is a hang.
const CASE_TIME_LIMIT: Duration = Duration::from_secs(30);
const SEED: u64 = 0x70E_F022;

/// SplitMix64: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// What a case feeds the library.
enum Input {
    /// `model.onnx` (and side files such as external data), compiled with `compile_file_with`.
    Model { bytes: Vec<u8>, side: Vec<(String, Vec<u8>)>, opts: Options, mode: verify::Mode, target: Target },
    /// An archive read with `npz::read`.
    Npz(Vec<u8>),
    /// Pseudo-random tensors of these shapes, run through a compiled fixture.
    Run(Vec<Vec<usize>>),
}

/// How to make a case's input: the inputs of fixture-sized cases are built
/// on the worker, from the recipe and its own seed, so that only a few are
/// in memory at once.
#[derive(Clone)]
enum Recipe {
    RandomBytes,
    Truncated,
    BitFlipped,
    Mutated(usize),
    Stacked,
    Npz(usize),
    Run(usize),
    Corpus(PathBuf),
}

#[derive(Clone)]
struct Case {
    class: String,
    recipe: Recipe,
    seed: u64,
}

/// How a case ended. `CaughtPanic` is a tract panic the library caught.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Ok,
    Refused(ErrorKind, String),
    CaughtPanic(String),
}

impl Outcome {
    fn of(result: Result<(), Error>) -> Outcome {
        match result {
            Ok(()) => Outcome::Ok,
            Err(Error::Panic { message, .. }) => Outcome::CaughtPanic(message),
            Err(e) => Outcome::Refused(e.kind(), e.to_string()),
        }
    }
}

fn opts(r: &str, prop_attn: bool) -> Options {
    common::options(r, prop_attn)
}

// ---------------------------------------------------------------- running

/// Runs one case in `dir` and checks what it left there.
fn run_case(input: &Input, dir: &Path) -> Result<Outcome, String> {
    match input {
        Input::Model { bytes, side, opts, mode, target } => {
            let model = dir.join("model.onnx");
            std::fs::write(&model, bytes).map_err(|e| e.to_string())?;
            for (name, data) in side {
                std::fs::write(dir.join(name), data).map_err(|e| e.to_string())?;
            }
            let out_dir = dir.join("out");
            std::fs::create_dir(&out_dir).map_err(|e| e.to_string())?;
            let out = out_dir.join("compiled.onnx");
            let file = tome_compile::FileOptions { verify: *mode, target: *target, ..Default::default() };
            let result = tome_compile::compile_file_checked(&model, &out, opts, &file);
            let left: Vec<String> = std::fs::read_dir(&out_dir)
                .map_err(|e| e.to_string())?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            match &result {
                Ok(_) => {
                    let written = std::fs::read(&out).map_err(|e| format!("compiled but no output: {e}"))?;
                    tome_compile::onnx::io::decode(&written).map_err(|e| format!("output does not decode: {e}"))?;
                    if left.iter().any(|f| f.contains(".tmp-")) {
                        return Err(format!("temporary files left: {left:?}"));
                    }
                }
                Err(e) if !left.is_empty() => return Err(format!("error ({e}) but files left: {left:?}")),
                Err(e) if e.to_string().trim().is_empty() => return Err("an error without a message".into()),
                Err(_) => {}
            }
            Ok(Outcome::of(result.map(|_| ())))
        }
        Input::Npz(bytes) => {
            let path = dir.join("x.npz");
            std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
            Ok(Outcome::of(tome_compile::onnx::npz::read(&path).map(|_| ())))
        }
        Input::Run(shapes) => {
            let mut rng = Rng(shapes.len() as u64);
            let tensors: Vec<Tensor> = shapes
                .iter()
                .map(|s| {
                    let n: usize = s.iter().product();
                    let data: Vec<f32> = (0..n).map(|_| (rng.next() % 2000) as f32 / 1000.0 - 1.0).collect();
                    Tensor::from_shape(s, &data).expect("tensor")
                })
                .collect();
            Ok(Outcome::of(compiled_runner().run(tensors).map(|_| ())))
        }
    }
}

/// The timm fixture compiled at r = 8 for tract (`BipartiteMerge` ops),
/// planned once for the `Run` cases.
fn compiled_runner() -> &'static Runner {
    static RUNNER: OnceLock<Runner> = OnceLock::new();
    RUNNER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("r8.onnx");
        let model = common::fixture("timm_vit/model.onnx");
        tome_compile::compile_file_with(&model, &out, &opts("8", true), Target::Tract, tome_compile::Format::Onnx).expect("compile");
        Runner::load(&out).expect("load the compiled fixture")
    })
}

/// A finished case: its outcome or what it broke, and how long it took.
struct Ran {
    class: String,
    label: String,
    result: Result<Outcome, String>,
    took: Duration,
}

/// Runs `cases` on a few worker threads; each case is built and run on its
/// own thread (8 MiB stack, as a main thread has) so that a hang can be
/// timed out.
fn run_all(cases: &[Case]) -> Vec<Ran> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Ran)>> = Mutex::new(vec![]);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i).cloned() else { break };
                let started = Instant::now();
                let (tx, rx) = mpsc::channel();
                let class = case.class.clone();
                std::thread::Builder::new()
                    .stack_size(8 << 20)
                    .spawn(move || {
                        let (label, input) = case.build();
                        let _ = tx.send((label.clone(), Err("started".to_string())));
                        let dir = tempfile::tempdir().expect("tempdir");
                        let result = std::panic::catch_unwind(|| run_case(&input, dir.path()))
                            .unwrap_or_else(|_| Err("a panic escaped the library".into()));
                        let _ = tx.send((label, result));
                    })
                    .expect("spawn");
                let label = rx.recv().map(|(l, _)| l).unwrap_or_default();
                let result = rx
                    .recv_timeout(CASE_TIME_LIMIT)
                    .map(|(_, r)| r)
                    .unwrap_or_else(|_| Err(format!("no result within {CASE_TIME_LIMIT:?}")));
                let ran = Ran { class, label, result, took: started.elapsed() };
                results.lock().expect("results").push((i, ran));
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Saves the input of a failing case for reproduction.
fn save_failure(case: &Case, n: usize) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let (ext, bytes) = match case.build().1 {
        Input::Model { bytes, .. } => ("onnx", bytes),
        Input::Npz(bytes) => ("npz", bytes),
        Input::Run(shapes) => ("txt", format!("{shapes:?}").into_bytes()),
    };
    let path = dir.join(format!("case-{n}.{ext}"));
    let _ = std::fs::write(&path, bytes);
    path
}

/// Prints the table of classes, counts and outcomes (markdown, as in the README).
fn print_table(ran: &[Ran], elapsed: Duration) {
    const KINDS: [ErrorKind; 6] = [
        ErrorKind::InvalidModel,
        ErrorKind::UnsupportedModel,
        ErrorKind::Usage,
        ErrorKind::Io,
        ErrorKind::VerificationFailed,
        ErrorKind::Internal,
    ];
    let mut classes: Vec<&str> = vec![];
    let mut rows: BTreeMap<&str, [usize; 10]> = BTreeMap::new();
    for r in ran {
        if !classes.contains(&r.class.as_str()) {
            classes.push(&r.class);
        }
        let row = rows.entry(&r.class).or_default();
        row[0] += 1;
        match &r.result {
            Ok(Outcome::Ok) => row[1] += 1,
            Ok(Outcome::Refused(kind, _)) => row[2 + KINDS.iter().position(|k| k == kind).unwrap_or(5)] += 1,
            Ok(Outcome::CaughtPanic(_)) => row[8] += 1,
            Err(_) => row[9] += 1,
        }
    }
    println!("| class | cases | compiled / read / ran | invalid model | unsupported model | usage | I/O | verification failed | internal | tract panic caught | crash or hang |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let line = |name: &str, r: &[usize]| {
        let cells: Vec<String> = r.iter().map(|n| n.to_string()).collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    for class in &classes {
        line(class, &rows[class]);
    }
    let total: Vec<usize> = (0..10).map(|i| rows.values().map(|r| r[i]).sum()).collect();
    line("**all**", &total);
    let slowest = ran.iter().max_by_key(|r| r.took).map(|r| format!("{} ({}) {:.1?}", r.class, r.label, r.took)).unwrap_or_default();
    println!("{} cases in {elapsed:.1?}; slowest: {slowest}", ran.len());
}

/// Runs `cases`, prints the table and fails on any crash, hang or leftover file.
fn check(cases: &[Case]) -> Vec<Ran> {
    let started = Instant::now();
    let ran = run_all(cases);
    print_table(&ran, started.elapsed());
    if std::env::var_os("TOME_FUZZ_VERBOSE").is_some() {
        for r in &ran {
            println!("{} / {} [{:.1?}]: {:?}", r.class, r.label, r.took, r.result);
        }
    }
    let mut failures = vec![];
    for (n, (r, case)) in ran.iter().zip(cases).enumerate() {
        if let Err(why) = &r.result {
            let saved = save_failure(case, n);
            failures.push(format!("{} / {}: {why} (input saved to {})", r.class, r.label, saved.display()));
        }
        if let Ok(Outcome::CaughtPanic(message)) = &r.result {
            // tract may panic on odd graphs; a panic in this project's code is a bug.
            if message.contains(" at src/") || message.contains(" at passes/") {
                failures.push(format!("{} / {}: panic in tome-compile: {message}", r.class, r.label));
            }
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
    ran
}

// ---------------------------------------------------------------- seeds

/// Every fixture model, decoded, with its name; read once.
fn seeds() -> &'static [(String, pb::ModelProto)] {
    static SEEDS: OnceLock<Vec<(String, pb::ModelProto)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut found = vec![];
        let root = common::fixture("");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root).expect("fixtures").flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs.iter().filter(|d| d.is_dir()) {
            let mut models: Vec<PathBuf> = std::fs::read_dir(dir).expect("fixture dir").flatten().map(|e| e.path()).collect();
            models.sort();
            for m in models.iter().filter(|m| m.extension().is_some_and(|e| e == "onnx")) {
                let file = tome_compile::onnx::io::read(m).expect("fixture decodes");
                let name = m.strip_prefix(&root).unwrap_or(m).display().to_string();
                found.push((name, file.proto));
            }
        }
        assert!(!found.is_empty(), "no fixtures found");
        found
    })
}

/// The schedule of the shuffled-graph cases.
const SHUFFLED_R: &str = "8:-1";

/// Indices of the seeds that compile as they are (with `SHUFFLED_R`); some
/// fixtures are there to be refused.
fn compiling_seeds() -> &'static [usize] {
    static COMPILING: OnceLock<Vec<usize>> = OnceLock::new();
    COMPILING.get_or_init(|| {
        let dir = Path::new(".");
        (0..seeds().len())
            .filter(|&i| tome_compile::compile(&mut seeds()[i].1.clone(), dir, &opts(SHUFFLED_R, true)).is_ok())
            .collect()
    })
}

fn model_input(model: &pb::ModelProto, side: Vec<(String, Vec<u8>)>, rng: &mut Rng, mode: verify::Mode) -> (String, Input) {
    let r = *rng.pick(&["16", "4", "0", "8:-1", "2,2,2"]);
    let opts = opts(r, rng.chance(50));
    let target = any_target(rng);
    (format!("--r {r} --target {target}"), Input::Model { bytes: model.encode_to_vec(), side, opts, mode, target })
}

/// The default target, or tract's (whose merges are `BipartiteMerge` ops).
fn any_target(rng: &mut Rng) -> Target {
    if rng.chance(50) { Target::Tract } else { Target::Portable }
}

fn byte_input(bytes: Vec<u8>, rng: &mut Rng) -> Input {
    let r = *rng.pick(&["16", "4", "8:-1"]);
    Input::Model { bytes, side: vec![], opts: opts(r, true), mode: verify::Mode::Auto, target: Target::Portable }
}

// ---------------------------------------------------------------- mutations

type Mutator = fn(&mut Rng, &mut pb::ModelProto, &mut Vec<(String, Vec<u8>)>) -> String;

/// Graph mutations, each a class of its own in the table.
const MUTATIONS: &[(&str, Mutator)] = &[
    ("dangling input", dangling_input),
    ("cycle", cycle),
    ("wrong rank: graph input", wrong_rank_input),
    ("wrong rank: weight", wrong_rank_weight),
    ("missing initializer", missing_initializer),
    ("absurd input dims", absurd_input_dims),
    ("absurd weight dims (2^40, -5, ...)", absurd_weight_dims),
    ("external data: 2^60 lengths, bad paths", external_data),
    ("raw data shorter than dims", short_raw_data),
    ("duplicate tensor names", duplicate_names),
    ("opset 0, 12, 99999, missing", opset),
    ("unknown or swapped op types", op_type),
    ("attributes out of range", attributes),
    ("shape constants 2^40, -7, 0", shape_constants),
    ("element types 0, string, 99", data_types),
    ("constant-folding bombs", folding_bomb),
    ("empty tensor names", empty_names),
    ("graph inputs or outputs removed", drop_io),
    ("nodes shuffled (must compile)", shuffle_nodes),
];

fn graph(m: &mut pb::ModelProto) -> &mut pb::GraphProto {
    m.graph.as_mut().expect("seed graph")
}

const ABSURD: [i64; 8] = [1 << 40, -7, 0, i64::MAX, i64::MIN, 1 << 24 | 1, -1, 3];

fn dangling_input(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let i = rng.below(g.node.len());
    let node = &mut g.node[i];
    let slot = rng.below(node.input.len().max(1));
    if node.input.is_empty() {
        node.input.push(String::new());
    }
    node.input[slot] = "fuzz.missing".into();
    format!("{} input {slot}", node.name)
}

fn cycle(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let i = rng.below(g.node.len());
    let j = i + rng.below(g.node.len() - i);
    let Some(later) = g.node[j].output.first().cloned() else { return "no output".into() };
    let node = &mut g.node[i];
    if node.input.is_empty() {
        node.input.push(later.clone());
    } else {
        let slot = rng.below(node.input.len());
        node.input[slot] = later.clone();
    }
    format!("{} reads {later}", node.name)
}

fn tensor_dims(v: &mut pb::ValueInfoProto) -> Option<&mut Vec<pb::tensor_shape_proto::Dimension>> {
    let pb::type_proto::Value::TensorType(t) = v.r#type.as_mut()?.value.as_mut()?;
    t.shape.as_mut().map(|s| &mut s.dim)
}

fn fixed(v: i64) -> pb::tensor_shape_proto::Dimension {
    pb::tensor_shape_proto::Dimension { value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)), ..Default::default() }
}

fn wrong_rank_input(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let Some(dims) = g.input.first_mut().and_then(tensor_dims) else { return "no input shape".into() };
    match rng.below(3) {
        0 => {
            dims.pop();
            "input rank - 1".into()
        }
        1 => {
            dims.push(fixed(1));
            "input rank + 1".into()
        }
        _ => {
            dims.clear();
            "input scalar".into()
        }
    }
}

fn wrong_rank_weight(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let i = rng.below(g.initializer.len());
    let t = &mut g.initializer[i];
    let n: i64 = t.dims.iter().product();
    t.dims = match rng.below(3) {
        0 => vec![n],
        1 => [vec![1], t.dims.clone()].concat(),
        _ => vec![1, 1, n],
    };
    format!("{} dims {:?}", t.name, t.dims)
}

fn missing_initializer(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let i = rng.below(g.initializer.len());
    g.initializer.remove(i).name
}

fn absurd_input_dims(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let Some(dims) = g.input.first_mut().and_then(tensor_dims) else { return "no input shape".into() };
    let axis = rng.below(dims.len());
    let v = *rng.pick(&[0, -1, 1 << 24 | 1, 1 << 40, i64::MAX, 7, 1024]);
    if let Some(d) = dims.get_mut(axis) {
        *d = fixed(v);
    }
    format!("input axis {axis} = {v}")
}

fn absurd_weight_dims(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let i = rng.below(g.initializer.len());
    let t = &mut g.initializer[i];
    let v = *rng.pick(&ABSURD);
    if t.dims.is_empty() {
        t.dims.push(v);
    } else {
        let axis = rng.below(t.dims.len());
        t.dims[axis] = v;
    }
    format!("{} dims {:?}", t.name, t.dims)
}

fn external_data(rng: &mut Rng, m: &mut pb::ModelProto, side: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let with_data: Vec<usize> = (0..g.initializer.len()).filter(|&i| !g.initializer[i].raw_data.is_empty()).collect();
    let Some(&i) = with_data.get(rng.below(with_data.len())) else { return "no initializer holds raw data".into() };
    let t = &mut g.initializer[i];
    let raw = std::mem::take(&mut t.raw_data);
    let len = raw.len() as u64;
    side.push(("weights.bin".into(), raw));
    let location = *rng.pick(&["weights.bin", "weights.bin", "weights.bin", "../weights.bin", "/etc/hostname", "", "missing.bin", "./weights.bin"]);
    let offset = *rng.pick(&["", "0", "0", "1", "9223372036854775807", "-1", "abc"]);
    let lengths = [String::new(), len.to_string(), len.to_string(), (len + 1).to_string(), (1u64 << 60).to_string(), u64::MAX.to_string()];
    let length = rng.pick(&lengths).clone();
    let entry = |k: &str, v: &str| pb::StringStringEntryProto { key: k.into(), value: v.into() };
    t.data_location = Some(1);
    t.external_data = vec![entry("location", location)];
    if !offset.is_empty() {
        t.external_data.push(entry("offset", offset));
    }
    if !length.is_empty() {
        t.external_data.push(entry("length", &length));
    }
    format!("{} at {location:?} offset {offset:?} length {length:?}", t.name)
}

fn short_raw_data(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let with_data: Vec<usize> = (0..g.initializer.len()).filter(|&i| !g.initializer[i].raw_data.is_empty()).collect();
    let Some(&i) = with_data.get(rng.below(with_data.len())) else { return "no initializer holds raw data".into() };
    let t = &mut g.initializer[i];
    let cut = 1 + rng.below(t.raw_data.len());
    t.raw_data.truncate(t.raw_data.len() - cut);
    format!("{} lost {cut} bytes", t.name)
}

fn duplicate_names(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    match rng.below(3) {
        0 => {
            let (i, j) = (rng.below(g.node.len()), rng.below(g.node.len()));
            let other = g.node[j].output.first().cloned().unwrap_or_default();
            if let Some(o) = g.node[i].output.first_mut() {
                *o = other.clone();
            }
            format!("{} also writes {other}", g.node[i].name)
        }
        1 => {
            let t = g.initializer[rng.below(g.initializer.len())].clone();
            g.initializer.push(t.clone());
            format!("initializer {} twice", t.name)
        }
        _ => {
            let t = g.initializer[rng.below(g.initializer.len())].name.clone();
            let i = rng.below(g.node.len());
            if let Some(o) = g.node[i].output.first_mut() {
                *o = t.clone();
            }
            format!("{} writes initializer {t}", g.node[i].name)
        }
    }
}

fn opset(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let version = *rng.pick(&[0, 1, 12, 13, 99999, -1, i64::MAX]);
    match rng.below(4) {
        0 => {
            m.opset_import.retain(|o| !o.domain.is_empty() && o.domain != "ai.onnx");
            m.opset_import.push(pb::OperatorSetIdProto { domain: "com.fuzz".into(), version: 1 });
            "no default opset".into()
        }
        1 => {
            m.opset_import.push(pb::OperatorSetIdProto { domain: String::new(), version });
            format!("second default opset {version}")
        }
        _ => {
            for o in m.opset_import.iter_mut().filter(|o| o.domain.is_empty() || o.domain == "ai.onnx") {
                o.version = version;
            }
            format!("opset {version}")
        }
    }
}

fn op_type(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let i = rng.below(g.node.len());
    let op = *rng.pick(&["FuzzOp", "Identity", "Relu", "Softmax", "MatMul", "Conv", "Reshape", "Loop", "If", "", "Add", "Transpose"]);
    g.node[i].op_type = op.into();
    if rng.chance(30) {
        g.node[i].domain = "com.fuzz".into();
    }
    format!("{} is now {op:?}", g.node[i].name)
}

fn attributes(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let with_attrs: Vec<usize> = (0..g.node.len()).filter(|&i| !g.node[i].attribute.is_empty()).collect();
    // A graph whose nodes carry no attributes (one call of a local function, say) is left as it is.
    let Some(&i) = with_attrs.get(rng.below(with_attrs.len())) else { return "no node has attributes".into() };
    let node = &mut g.node[i];
    let a = rng.below(node.attribute.len());
    let v = *rng.pick(&ABSURD);
    let attr = &mut node.attribute[a];
    match rng.below(4) {
        0 if !attr.ints.is_empty() => {
            let k = rng.below(attr.ints.len());
            attr.ints[k] = v;
        }
        1 => attr.r#type = *rng.pick(&[0, 1, 3, 99]),
        2 => {
            let name = node.attribute.remove(a).name;
            return format!("{} lost attribute {name}", node.name);
        }
        _ => attr.i = v,
    }
    format!("{} attribute {} = {v}", node.name, node.attribute[a].name)
}

fn shape_constants(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let small: Vec<usize> = (0..g.initializer.len())
        .filter(|&i| g.initializer[i].data_type == 7 && g.initializer[i].dims.iter().product::<i64>() <= 8)
        .collect();
    let v = *rng.pick(&ABSURD);
    if let (false, Some(&i)) = (small.is_empty() || rng.chance(30), small.get(rng.below(small.len()))) {
        let t = &mut g.initializer[i];
        let mut values = tome_passes::graph::tensor_i64(t).unwrap_or_default();
        if values.is_empty() {
            values.push(v);
        } else {
            let k = rng.below(values.len());
            values[k] = v;
        }
        *t = int64_tensor(&t.name, &t.dims, &values);
        return format!("{} = {values:?}", t.name);
    }
    // A Constant node's value (dynamo and classic exports keep shapes there).
    let consts: Vec<usize> = (0..g.node.len()).filter(|&i| g.node[i].op_type == "Constant").collect();
    let Some(&i) = consts.get(rng.below(consts.len())) else { return "no shape constant".into() };
    let node = &mut g.node[i];
    if let Some(t) = node.attribute.iter_mut().find_map(|a| a.t.as_mut()).filter(|t| t.data_type == 7) {
        let mut values = tome_passes::graph::tensor_i64(t).unwrap_or_default();
        if let Some(x) = values.first_mut() {
            *x = v;
        }
        *t = int64_tensor(&t.name, &t.dims, &values);
        return format!("{} = {values:?}", node.name);
    }
    "no int64 constant".into()
}

fn data_types(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let i = rng.below(g.initializer.len());
    let dt = *rng.pick(&[0, 8, 13, 14, 16, 17, 99, -3, 7, 1, 9]);
    g.initializer[i].data_type = dt;
    format!("{} data type {dt}", g.initializer[i].name)
}

/// A node with constant inputs whose folded output would be enormous,
/// added as an extra graph output.
fn folding_bomb(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let (node, inits, label) = bomb(rng.below(6));
    g.output.push(pb::ValueInfoProto { name: node.output[0].clone(), ..Default::default() });
    g.node.push(node);
    g.initializer.extend(inits);
    label
}

/// One of six nodes whose output tract would fold from constants: 2^26 to 2^80 elements, or Range's division by 0.
fn bomb(which: usize) -> (pb::NodeProto, Vec<pb::TensorProto>, String) {
    let node = |op: &str, inputs: &[&str]| common::node(&format!("fuzz.{op}"), op, inputs, &[&format!("fuzz.{op}.out")], vec![]);
    let big = 1i64 << 40;
    match which {
        0 => (node("Range", &["fuzz.a", "fuzz.b", "fuzz.c"]), vec![int64_tensor("fuzz.a", &[], &[0]), int64_tensor("fuzz.b", &[], &[big]), int64_tensor("fuzz.c", &[], &[1])], "Range(0, 2^40, 1)".into()),
        1 => (node("ConstantOfShape", &["fuzz.s"]), vec![int64_tensor("fuzz.s", &[2], &[big, big])], "ConstantOfShape([2^40, 2^40])".into()),
        2 => (node("Expand", &["fuzz.x", "fuzz.s"]), vec![float_tensor("fuzz.x", &[1], &[1.0]), int64_tensor("fuzz.s", &[2], &[1 << 20, 1 << 20])], "Expand(1, [2^20, 2^20])".into()),
        3 => (node("Tile", &["fuzz.x", "fuzz.s"]), vec![float_tensor("fuzz.x", &[1], &[1.0]), int64_tensor("fuzz.s", &[1], &[big])], "Tile(1, [2^40])".into()),
        4 => {
            let n = 1usize << 13;
            (node("MatMul", &["fuzz.x", "fuzz.y"]), vec![float_tensor("fuzz.x", &[n as i64, 1], &vec![1.0; n]), float_tensor("fuzz.y", &[1, n as i64], &vec![1.0; n])], "MatMul outer product 2^13 x 2^13".into())
        }
        _ => (node("Range", &["fuzz.a", "fuzz.b", "fuzz.c"]), vec![float_tensor("fuzz.a", &[], &[0.0]), float_tensor("fuzz.b", &[], &[1.0]), float_tensor("fuzz.c", &[], &[0.0])], "Range(0, 1, 0)".into()),
    }
}

fn empty_names(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    let i = rng.below(g.node.len());
    let node = &mut g.node[i];
    if rng.chance(50) && !node.input.is_empty() {
        let k = rng.below(node.input.len());
        node.input[k].clear();
        format!("{} input {k} empty", node.name)
    } else {
        node.output.iter_mut().for_each(String::clear);
        format!("{} outputs empty", node.name)
    }
}

fn drop_io(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    match rng.below(3) {
        0 => {
            g.output.clear();
            "no graph outputs".into()
        }
        1 => {
            g.input.clear();
            "no graph inputs".into()
        }
        _ => {
            g.output.push(pb::ValueInfoProto { name: "fuzz.nowhere".into(), ..Default::default() });
            "an output nothing produces".into()
        }
    }
}

fn shuffle_nodes(rng: &mut Rng, m: &mut pb::ModelProto, _: &mut Vec<(String, Vec<u8>)>) -> String {
    let g = graph(m);
    for i in (1..g.node.len()).rev() {
        let j = rng.below(i + 1);
        g.node.swap(i, j);
    }
    format!("{} nodes shuffled", g.node.len())
}

// ---------------------------------------------------------------- npz

/// A zip archive of `.npy` entries, stored (not deflated).
fn zip_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(vec![]));
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        zip.start_file(*name, stored).expect("zip entry");
        zip.write_all(data).expect("zip data");
    }
    zip.finish().expect("zip").into_inner()
}

/// An `.npy` file: magic, version, header of `header_len` (declared) and `data`.
fn npy(version: u8, header: &str, declared_len: Option<u32>, data: &[u8]) -> Vec<u8> {
    let mut out = b"\x93NUMPY".to_vec();
    out.extend([version, 0]);
    let len = declared_len.unwrap_or(header.len() as u32);
    if version == 1 {
        out.extend((len as u16).to_le_bytes());
    } else {
        out.extend(len.to_le_bytes());
    }
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// Crafted archives: absurd shapes, lying header lengths and sizes.
fn crafted_npz(which: usize) -> (String, Vec<u8>) {
    let header = |descr: &str, shape: &str| format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let f32s = |n: usize| vec![0u8; 4 * n];
    let (label, entry) = match which % 9 {
        0 => ("shape (2^40, 2^40)", npy(1, &header("<f4", "(1099511627776, 1099511627776)"), None, &f32s(2))),
        1 => ("shape (0, 2^62)", npy(1, &header("<f4", "(0, 4611686018427387904)"), None, &[])),
        2 => ("shape (-1,)", npy(1, &header("<f4", "(-1,)"), None, &f32s(1))),
        3 => ("3 elements declared, 2 present", npy(1, &header("<f4", "(3,)"), None, &f32s(2))),
        4 => ("header length 2^32 - 1", npy(2, &header("<f4", "(2,)"), Some(u32::MAX), &f32s(2))),
        5 => ("float16", npy(1, &header("<f2", "(2,)"), None, &[0; 4])),
        6 => ("version 9", npy(9, &header("<f4", "(2,)"), None, &f32s(2))),
        7 => ("Fortran order", npy(1, &header("<f4", "(2, 2)").replace("False", "True"), None, &f32s(4))),
        _ => ("no shape key", npy(1, "{'descr': '<f4'}", None, &f32s(1))),
    };
    (label.into(), zip_of(&[("x.npy", entry)]))
}

/// Sets the uncompressed size of every entry (local and central headers) to `size`.
fn lie_about_sizes(mut zip: Vec<u8>, size: u32) -> Vec<u8> {
    for at in 0..zip.len().saturating_sub(30) {
        let field = match &zip[at..at + 4] {
            b"PK\x03\x04" => at + 22,
            b"PK\x01\x02" => at + 24,
            _ => continue,
        };
        zip[field..field + 4].copy_from_slice(&size.to_le_bytes());
    }
    zip
}

// ---------------------------------------------------------------- the cases

/// Byte positions in the graph's structure (nodes, then inputs, outputs and
/// opsets at the end) rather than inside the weights.
fn structural_position(rng: &mut Rng, model: &pb::ModelProto, len: usize) -> usize {
    let nodes = pb::GraphProto { node: model.graph.as_ref().map(|g| g.node.clone()).unwrap_or_default(), ..Default::default() };
    match rng.below(3) {
        0 => rng.below(len),
        1 => rng.below((nodes.encoded_len() + 64).min(len)),
        _ => len - 1 - rng.below(4096.min(len)),
    }
}

/// The budget: how many cases of each class.
fn all_cases() -> Vec<Case> {
    let mut rng = Rng(SEED);
    let mut cases = vec![];
    let mut add = |class: &str, recipe: Recipe, n: usize| {
        for _ in 0..n {
            cases.push(Case { class: class.into(), recipe: recipe.clone(), seed: rng.next() });
        }
    };
    add("random bytes", Recipe::RandomBytes, 200);
    add("truncated fixture", Recipe::Truncated, 50);
    add("bit-flipped fixture", Recipe::BitFlipped, 100);
    for (k, (class, _)) in MUTATIONS.iter().enumerate() {
        add(&format!("mutated: {class}"), Recipe::Mutated(k), 12);
    }
    add("mutated: 2-3 of the above", Recipe::Stacked, 40);
    for n in 0..60 {
        add("npz: truncated, flipped, crafted", Recipe::Npz(n), 1);
    }
    for n in 0..20 {
        add("run: input shapes", Recipe::Run(n), 1);
    }
    cases
}

impl Case {
    /// The case's label and input, the same on every call.
    fn build(&self) -> (String, Input) {
        let mut rng = Rng(self.seed);
        let seeds = seeds();
        let s = rng.below(seeds.len());
        let (seed_name, seed) = (&seeds[s].0, &seeds[s].1);
        match &self.recipe {
            Recipe::RandomBytes => {
                let len = *rng.pick(&[0, 1, 2, 7, 16, 64, 300, 1024, 4096]);
                let mut bytes = rng.bytes(len);
                if rng.chance(33) {
                    // A real model's first bytes make the protobuf decoder go further.
                    bytes = [seed.encode_to_vec()[..64].to_vec(), bytes].concat();
                }
                (format!("{} bytes", bytes.len()), byte_input(bytes, &mut rng))
            }
            Recipe::Truncated => {
                let bytes = seed.encode_to_vec();
                let cut = rng.below(bytes.len());
                (format!("{seed_name} cut at {cut}"), byte_input(bytes[..cut].to_vec(), &mut rng))
            }
            Recipe::BitFlipped => {
                let mut bytes = seed.encode_to_vec();
                let mut at = vec![];
                for _ in 0..1 + rng.below(8) {
                    let p = structural_position(&mut rng, seed, bytes.len());
                    bytes[p] ^= 1 << rng.below(8);
                    at.push(p);
                }
                (format!("{seed_name} bits {at:?}"), byte_input(bytes, &mut rng))
            }
            Recipe::Mutated(k) if MUTATIONS[*k].0.contains("shuffled") => {
                // Reordered nodes are the same model: seeds that compile must still compile.
                let compiling = compiling_seeds();
                let (seed_name, seed) = &seeds[compiling[rng.below(compiling.len())]];
                let mut model = seed.clone();
                let what = shuffle_nodes(&mut rng, &mut model, &mut vec![]);
                let (opts, target) = (opts(SHUFFLED_R, rng.chance(50)), any_target(&mut rng));
                let input = Input::Model { bytes: model.encode_to_vec(), side: vec![], opts, mode: verify::Mode::Auto, target };
                (format!("{seed_name}: {what}, --r {SHUFFLED_R} --target {target}"), input)
            }
            Recipe::Mutated(k) => {
                let (mut model, mut side) = (seed.clone(), vec![]);
                let what = (MUTATIONS[*k].1)(&mut rng, &mut model, &mut side);
                // Whatever compiles is verified (the fixtures are cheap).
                let (r, input) = model_input(&model, side, &mut rng, verify::Mode::Auto);
                (format!("{seed_name}: {what}, {r}"), input)
            }
            Recipe::Stacked => {
                let (mut model, mut side, mut what) = (seed.clone(), vec![], vec![]);
                for _ in 0..2 + rng.below(2) {
                    let (_, mutate) = rng.pick(MUTATIONS);
                    what.push(mutate(&mut rng, &mut model, &mut side));
                }
                let (r, input) = model_input(&model, side, &mut rng, verify::Mode::Auto);
                (format!("{seed_name}: {}, {r}", what.join("; ")), input)
            }
            Recipe::Npz(n) => {
                let npz = std::fs::read(common::fixture("timm_vit/io.npz")).expect("io.npz");
                let (label, bytes) = match n % 4 {
                    0 => {
                        let cut = rng.below(npz.len());
                        (format!("io.npz cut at {cut}"), npz[..cut].to_vec())
                    }
                    1 => {
                        let mut b = npz;
                        let at: Vec<usize> =
                            (0..1 + rng.below(4)).map(|_| if rng.chance(50) { rng.below(256) } else { b.len() - 1 - rng.below(1024) }).collect();
                        at.iter().for_each(|&p| b[p] ^= 1 << rng.below(8));
                        (format!("io.npz bits {at:?}"), b)
                    }
                    2 => crafted_npz(n / 4),
                    _ => {
                        let (label, zip) = crafted_npz(n / 4 + 3);
                        let size = *rng.pick(&[u32::MAX, 1 << 31, 0, 1]);
                        (format!("{label}, sizes declared as {size}"), lie_about_sizes(zip, size))
                    }
                };
                (label, Input::Npz(bytes))
            }
            Recipe::Run(n) => {
                let shapes = match n % 5 {
                    0 => vec![vec![1 + n / 5, 3, 224, 224]],
                    1 => vec![vec![1, 3, 224, 224 - 16 * (1 + rng.below(4))]],
                    2 => vec![(0..rng.below(6)).map(|_| rng.below(8)).collect()],
                    3 => vec![vec![0, 3, 224, 224]],
                    _ => vec![vec![1, 3, 224, 224], vec![1]],
                };
                (format!("{shapes:?}"), Input::Run(shapes))
            }
            Recipe::Corpus(path) => (path.file_name().unwrap_or_default().to_string_lossy().into_owned(), corpus_input(path)),
        }
    }
}

#[test]
fn every_fuzzed_input_compiles_or_fails_cleanly() {
    let ran = check(&all_cases());
    for r in ran.iter().filter(|r| r.class.contains("shuffled")) {
        assert_eq!(r.result, Ok(Outcome::Ok), "{}: a reordered graph must compile (and pass --verify auto)", r.label);
    }
}

// ---------------------------------------------------------------- corpus

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus")
}

/// A corpus model with its side files (`<name>.onnx.<side>` next to it,
/// written as `<side>`), or an archive.
fn corpus_input(path: &Path) -> Input {
    let bytes = std::fs::read(path).expect("corpus file");
    let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    if name.ends_with(".npz") {
        return Input::Npz(bytes);
    }
    let side = std::fs::read_dir(corpus_dir())
        .expect("corpus")
        .flatten()
        .filter_map(|e| {
            let side = e.file_name().to_str()?.strip_prefix(&format!("{name}."))?.to_string();
            Some((side, std::fs::read(e.path()).ok()?))
        })
        .collect();
    Input::Model { bytes, side, opts: opts("4", true), mode: verify::Mode::Auto, target: Target::Portable }
}

/// Each file in `tests/fuzz_corpus/` is named `<expected kind>--<what>.onnx`
/// (or `.npz`), the kind as `--json` spells it; `compiled` means it must
/// compile (or read). Side files are `<model file>.<name>`.
#[test]
fn corpus_files_end_as_recorded() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir()).expect("corpus").flatten().map(|e| e.path()).collect();
    files.retain(|f| f.extension().is_some_and(|e| e == "onnx" || e == "npz"));
    files.sort();
    assert!(files.len() >= 10, "the corpus is missing files");
    let cases: Vec<Case> = files.iter().map(|f| Case { class: "corpus".into(), recipe: Recipe::Corpus(f.clone()), seed: 0 }).collect();
    let ran = check(&cases);
    for r in &ran {
        let expected = r.label.split_once("--").map(|(kind, _)| kind).unwrap_or_default();
        let got = match &r.result {
            Ok(Outcome::Ok) => "compiled",
            Ok(Outcome::Refused(k, _)) => k.name(),
            Ok(Outcome::CaughtPanic(_)) => "internal",
            Err(_) => "crash",
        };
        assert_eq!(got, expected, "{}", r.label);
    }
}

/// Writes the crafted corpus files: `cargo test --test fuzz -- --ignored write_corpus`.
#[test]
#[ignore]
fn write_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for (name, bytes) in corpus() {
        std::fs::write(dir.join(name), bytes).expect("write");
    }
}

/// A tiny valid graph (Relu of a [1, 4] input) to hang crafted nodes on.
fn tiny(extra: Vec<pb::NodeProto>, inits: Vec<pb::TensorProto>, opset: i64) -> pb::ModelProto {
    let value = |name: &str, dims: &[i64]| {
        let mut v = pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor { elem_type: 1, shape: Some(pb::TensorShapeProto { dim: vec![] }) })),
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Some(d) = tensor_dims(&mut v) {
            d.extend(dims.iter().map(|&x| fixed(x)));
        }
        v
    };
    let mut outputs = vec![value("y", &[1, 4])];
    outputs.extend(extra.iter().map(|n| pb::ValueInfoProto { name: n.output[0].clone(), ..Default::default() }));
    let relu = common::node("relu", "Relu", &["x"], &["y"], vec![]);
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(pb::GraphProto {
            name: "tiny".into(),
            node: [vec![relu], extra].concat(),
            initializer: inits,
            input: vec![value("x", &[1, 4])],
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The crafted corpus, by file name.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    let mut add = |name: &str, m: pb::ModelProto| out.push((format!("{name}.onnx"), m.encode_to_vec()));
    for which in 0..6 {
        let (node, inits, _) = bomb(which);
        let name = format!("invalid_model--fold-{}", node.op_type.to_lowercase());
        add(&if which == 5 { format!("{name}-zero-step") } else { name }, tiny(vec![node], inits, 17));
    }
    add("unsupported_model--no-transformer-block", tiny(vec![], vec![], 17));
    add("unsupported_model--opset-0", tiny(vec![], vec![], 0));
    let mut cyclic = tiny(vec![], vec![], 17);
    graph(&mut cyclic).node[0].input[0] = "y".into();
    add("invalid_model--self-loop", cyclic);
    let mut huge_input = tiny(vec![], vec![], 17);
    if let Some(d) = graph(&mut huge_input).input.first_mut().and_then(tensor_dims) {
        d[1] = fixed(1 << 40);
    }
    add("invalid_model--input-axis-2pow40", huge_input);
    let mut weight = float_tensor("w", &[1 << 40, 1 << 40], &[1.0]);
    weight.raw_data.truncate(4);
    add("invalid_model--weight-dims-2pow40", tiny(vec![], vec![weight], 17));
    let mut external = float_tensor("w", &[4], &[1.0; 4]);
    external.raw_data.clear();
    external.data_location = Some(1);
    let entry = |k: &str, v: &str| pb::StringStringEntryProto { key: k.into(), value: v.into() };
    external.external_data = vec![entry("location", "weights.bin"), entry("length", "1152921504606846976")];
    add("invalid_model--external-length-2pow60", tiny(vec![], vec![external.clone()], 17));
    out.push(("invalid_model--external-length-2pow60.onnx.weights.bin".into(), vec![0; 16]));
    external.external_data = vec![entry("location", "../../../etc/hostname")];
    let mut add = |name: &str, m: pb::ModelProto| out.push((format!("{name}.onnx"), m.encode_to_vec()));
    add("invalid_model--external-outside-folder", tiny(vec![], vec![external], 17));
    out.push(("invalid_model--not-onnx.onnx".into(), b"ONNX? no, a text file\n".to_vec()));
    // Found by the fuzzer: Unsqueeze of a scalar at axis 3 panics inside tract.
    let shape = common::node("shape", "Shape", &["x"], &["s"], vec![]);
    let gather = common::node("gather", "Gather", &["s", "zero"], &["n"], vec![]);
    let unsqueeze = common::node("unsqueeze", "Unsqueeze", &["n", "axes"], &["u"], vec![]);
    let inits = vec![int64_tensor("zero", &[], &[0]), int64_tensor("axes", &[1], &[3])];
    let m = tiny(vec![shape, gather, unsqueeze], inits, 17);
    out.push(("internal--tract-panics-on-unsqueeze-axis-3-of-a-scalar.onnx".into(), m.encode_to_vec()));
    for (which, name) in [(0, "shape-2pow40-by-2pow40"), (1, "shape-0-by-2pow62"), (4, "header-length-2pow32")] {
        out.push((format!("usage--npz-{name}.npz"), crafted_npz(which).1));
    }
    let (_, zip) = crafted_npz(3);
    out.push(("usage--npz-declared-size-2pow31.npz".into(), lie_about_sizes(zip, 1 << 31)));
    out
}
