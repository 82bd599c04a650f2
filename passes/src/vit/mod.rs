//! The Vision Transformer family (ViT, DeiT, CLIP and SigLIP towers,
//! DINOv2, VideoMAE, AST): ToMe between attention and MLP, with size
//! tracking and proportional attention (`TOME_SPEC.md`).
//!
//! `matcher` finds the blocks and the head, `schedule` turns `--r` into r
//! per block, `tome` builds the merge, proportional attention and head
//! patches, `lower` rewrites them for a target's runtime.

pub mod lower;
pub mod matcher;
pub mod schedule;
pub mod tome;
