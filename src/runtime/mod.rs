//! Running models with tract on CPU: the op registrations tract needs for
//! compiled graphs, the fused attention kernel, `run`, `--verify`, and the
//! guard that turns tract's panics into errors.

pub mod guard;
pub mod run;
pub mod tract_attention;
pub mod tract_norm;
pub mod tract_ops;
pub mod verify;
