//! The Stable Diffusion family: tomesd's Token Merging inside a UNet's
//! transformer blocks (`TOME_SPEC.md`, "Stable Diffusion UNets"). Tokens
//! merge before a sub-layer and unmerge right after it, so every block
//! still sees all tokens; one matching per block from its input.
//!
//! The pipeline (`compile_unet`): `matcher::match_unet` finds the blocks,
//! `plan` gives each its downsample level, grid and r (tomesd's rules),
//! `tomesd::block_patch` rewrites each block that merges.

pub mod matcher;
pub mod tomesd;

use std::collections::HashMap;

use crate::graph::{Graph, TensorType};
use crate::{patch, pb, PassError};
pub use matcher::Kind;

/// tomesd's arguments, under its names.
#[derive(Clone, Debug, PartialEq)]
pub struct UnetOptions {
    /// Share of each block's tokens that merge (`ratio`), in [0, 1 - 1/(sx·sy)].
    pub ratio: f64,
    /// Merge in blocks whose tokens are downsampled at most this much (1, 2, 4, 8).
    pub max_downsample: usize,
    /// The dst grid's stride (sy, sx).
    pub stride: [usize; 2],
    /// The sub-layers that merge (tomesd's merge_attn, merge_crossattn, merge_mlp).
    pub merge: Vec<Kind>,
    /// `None`: dst at the top-left of each cell (tomesd's `use_rand=False`).
    /// `Some(seed)`: `tomesd::PATTERNS` seeded random dst patterns per block,
    /// one picked by the timestep input (tomesd's `use_rand=True`, in
    /// distribution, not in value).
    pub rand_seed: Option<u64>,
}

impl Default for UnetOptions {
    fn default() -> Self {
        UnetOptions { ratio: 0.5, max_downsample: 1, stride: [2, 2], merge: vec![Kind::SelfAttention], rand_seed: None }
    }
}

/// What tomesd does in one transformer block.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockPlan {
    pub name: String,
    pub tokens: usize,
    pub width: usize,
    /// tomesd's downsample: ceil(sqrt(H0·W0 // N)).
    pub downsample: usize,
    /// The block's token grid, h × w.
    pub grid: [usize; 2],
    /// Tokens merged away in each merged sub-layer; 0 when the block does not merge.
    pub r: usize,
    /// The sub-layers the block has, in order.
    pub sublayers: Vec<Kind>,
    /// The sub-layers that merge (empty when the block does not).
    pub merged: Vec<Kind>,
}

/// What `compile_unet` did.
#[derive(Clone, Debug, PartialEq)]
pub struct UnetReport {
    /// The latent's height and width, H0 × W0.
    pub latent: [usize; 2],
    pub blocks: Vec<BlockPlan>,
}

impl UnetReport {
    pub fn merging(&self) -> impl Iterator<Item = &BlockPlan> {
        self.blocks.iter().filter(|b| b.r > 0)
    }
}

/// The latent's size from the first 4-D graph input with a static height
/// and width (`sample` [B, 4, H0, W0]).
pub fn latent_size(g: &Graph) -> Result<[usize; 2], PassError> {
    let mut symbolic = None;
    for input in &g.inputs {
        let Some(ty) = g.ty(input).filter(|t| t.rank() == 4) else { continue };
        match (ty.dim(2), ty.dim(3)) {
            (Some(h), Some(w)) if h > 0 && w > 0 => return Ok([h as usize, w as usize]),
            _ => symbolic = Some(input.clone()),
        }
    }
    Err(PassError::Unsupported(match symbolic {
        Some(name) => format!("the latent input {name} has a symbolic height or width; pass --latent HxW (64x64 for 512 px images)"),
        None => "no 4-D latent input (sample [batch, channels, H, W]) found".into(),
    }))
}

/// tomesd's plan for every block: which merge, on what grid, with what r.
pub fn plan(blocks: &[matcher::UnetBlock], latent: [usize; 2], opts: &UnetOptions) -> Result<Vec<BlockPlan>, PassError> {
    let [sy, sx] = opts.stride;
    if sy == 0 || sx == 0 {
        return Err(PassError::BadOption(format!("--stride {sy}x{sx}: both must be at least 1")));
    }
    let most = 1.0 - 1.0 / (sx * sy) as f64;
    if !(0.0..=most).contains(&opts.ratio) {
        return Err(PassError::BadOption(format!(
            "--ratio {}: must be in [0, {most}] (1 - 1/(sx·sy) for stride {sy}x{sx}: at most every src token merges)",
            opts.ratio
        )));
    }
    let [h0, w0] = latent;
    blocks
        .iter()
        .map(|b| {
            let downsample = (((h0 * w0) / b.tokens.max(1)) as f64).sqrt().ceil().max(1.0) as usize;
            let grid = [h0.div_ceil(downsample), w0.div_ceil(downsample)];
            if grid[0] * grid[1] != b.tokens {
                return Err(PassError::Unsupported(format!(
                    "{}: {} tokens are not the {}x{} grid a {h0}x{w0} latent gives at downsample {downsample}; pass the latent size the model was exported for (--latent)",
                    b.name, b.tokens, grid[0], grid[1]
                )));
            }
            let merges = downsample <= opts.max_downsample;
            if merges && (grid[0] < sy || grid[1] < sx) {
                return Err(PassError::BadOption(format!(
                    "--stride {sy}x{sx} does not fit {}: its token grid is {}x{}",
                    b.name, grid[0], grid[1]
                )));
            }
            let sublayers: Vec<Kind> = b.sublayers.iter().map(|s| s.kind).collect();
            let merged: Vec<Kind> = if merges { sublayers.iter().copied().filter(|k| opts.merge.contains(k)).collect() } else { vec![] };
            let r = if merged.is_empty() { 0 } else { tomesd::split(grid[0], grid[1], sy, sx, (b.tokens as f64 * opts.ratio) as usize).r };
            Ok(BlockPlan { name: b.name.clone(), tokens: b.tokens, width: b.width, downsample, grid, r, sublayers, merged: if r > 0 { merged } else { vec![] } })
        })
        .collect()
}

/// Rewrites `model` in place with tomesd's merging; `types` holds every
/// tensor's type. The model's value_info is dropped: token counts inside
/// the merged sub-layers change, and runtimes infer them again.
pub fn compile_unet(model: &mut pb::ModelProto, types: HashMap<String, TensorType>, opts: &UnetOptions) -> Result<UnetReport, PassError> {
    let mut g = Graph::take_from(model, types)?;
    let result = rewrite(&mut g, opts);
    g.write_into(model)?;
    let report = result?;
    if let Some(graph) = model.graph.as_mut() {
        graph.value_info.clear();
    }
    Ok(report)
}

/// The blocks and their plan without changing anything (`inspect`).
pub fn inspect_unet(model: &mut pb::ModelProto, types: HashMap<String, TensorType>, opts: &UnetOptions) -> Result<UnetReport, PassError> {
    let g = Graph::take_from(model, types)?;
    let planned = plan_graph(&g, opts);
    g.write_into(model)?;
    Ok(planned?.1)
}

/// The graph input carrying the denoising step (`timestep`), which picks
/// the random dst pattern.
fn timestep_input(g: &Graph) -> Result<String, PassError> {
    g.inputs
        .iter()
        .find(|i| i.to_ascii_lowercase().contains("timestep") && g.ty(i).is_some_and(|t| t.rank() <= 1))
        .cloned()
        .ok_or_else(|| PassError::Unsupported("--rand-seed varies the dst cells with the denoising step, read from a graph input named timestep (a scalar or [batch]); this UNet has none".into()))
}

/// The blocks and tomesd's plan for them.
fn plan_graph(g: &Graph, opts: &UnetOptions) -> Result<(Vec<matcher::UnetBlock>, UnetReport), PassError> {
    if g.opset < 13 {
        return Err(PassError::OldOpset(g.opset));
    }
    let blocks = matcher::match_unet(g)?;
    if blocks.is_empty() {
        return Err(PassError::NoUnetBlocks);
    }
    let latent = latent_size(g)?;
    let plans = plan(&blocks, latent, opts)?;
    Ok((blocks, UnetReport { latent, blocks: plans }))
}

fn rewrite(g: &mut Graph, opts: &UnetOptions) -> Result<UnetReport, PassError> {
    let (blocks, report) = plan_graph(g, opts)?;
    if report.merging().next().is_none() {
        let shallowest = report.blocks.iter().map(|b| b.downsample).min().unwrap_or(1);
        let why = if shallowest > opts.max_downsample {
            format!(
                "no transformer block is at downsample <= {} (the shallowest is at {shallowest}, as in SDXL's layout); --max-downsample {shallowest} reaches it",
                opts.max_downsample
            )
        } else {
            "no block merges a token at this --ratio and --merge".to_string()
        };
        return Err(PassError::Unsupported(why));
    }
    let [sy, sx] = opts.stride;
    let timestep = match opts.rand_seed {
        Some(_) => Some(timestep_input(g)?),
        None => None,
    };
    for (index, (block, plan)) in blocks.iter().zip(&report.blocks).enumerate() {
        if plan.r == 0 {
            continue;
        }
        let [h, w] = plan.grid;
        let p = match (opts.rand_seed, &timestep) {
            (Some(seed), Some(t)) => {
                // Each block draws its own patterns (tomesd draws per call).
                let mut rng = tomesd::Rng::new(seed ^ ((index as u64 + 1) << 32));
                let mut splits: Vec<tomesd::Split> = (0..tomesd::PATTERNS).map(|_| tomesd::random_split(h, w, sy, sx, plan.r, &mut rng)).collect();
                splits.push(tomesd::split(h, w, sy, sx, plan.r));
                let tokens = tomesd::Tokens::Random { splits: &splits, timestep: t, stream: &block.input };
                tomesd::block_patch(g, block, &tokens, &plan.merged)?
            }
            _ => tomesd::block_patch(g, block, &tomesd::Tokens::Fixed(&tomesd::split(h, w, sy, sx, plan.r)), &plan.merged)?,
        };
        patch::apply(g, p)?;
    }
    Ok(report)
}
