//! `popen sft` and `popen predict`: thin front ends of popen-train.

use anyhow::Result;

#[derive(clap::Args)]
pub struct SftArgs {}

#[derive(clap::Args)]
pub struct PredictArgs {}

pub fn sft(_a: SftArgs) -> Result<()> {
    anyhow::bail!("popen sft: not built yet")
}

pub fn predict(_a: PredictArgs) -> Result<()> {
    anyhow::bail!("popen predict: not built yet")
}
