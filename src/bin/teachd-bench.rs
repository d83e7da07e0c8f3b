//! Engine benchmark for one teacher on this machine; prints a markdown table.
//!
//!   cargo run --bin teachd-bench -- [--config config/default.toml] [--runs 5]
//!
//! Measures teacher forcing (scored tokens/s at 128, 512, 2048 tokens, median of `--runs`),
//! generation (time to first token, decode tokens/s) and the process's peak memory. Run it
//! with nothing else busy: on 2 cores, thread pools collapse under contention.

use std::time::{Duration, Instant};

use clap::Parser;
use teachd::engine::{GenEvent, GenerateParams, ModelRegistry};

#[derive(Parser)]
struct Args {
    #[arg(long, short, env = "TEACHD_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Sequence lengths to score.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    lengths: Vec<usize>,
    /// Tokens to generate per generation run.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = teachd::config::Config::load(args.config.as_deref())?;
    let t0 = Instant::now();
    let registry = ModelRegistry::load(&config.models, &config.engine).await?;
    let load = t0.elapsed();
    let teacher = registry
        .iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no model configured"))?
        .clone();
    let text = "Knowledge distillation trains a compact student network to reproduce the output distribution of a larger teacher model, position by position. ".repeat(200);
    let all_ids = teacher.tokenize(&text, true)?;

    println!(
        "model: {} ({}, {}), threads: {}, load: {:.1} s",
        teacher.info.id,
        teacher.info.architecture,
        teacher.info.quantization,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.as_secs_f64()
    );
    println!();
    println!("| measurement | value |");
    println!("|---|---|");
    for &len in &args.lengths {
        let ids = &all_ids[..len.min(all_ids.len())];
        // Warm-up, then timed runs of the full path (engine pass + top-20 math).
        teacher.score(ids, 1, 20, 1.0).await?;
        let mut rates = Vec::new();
        let mut secs = Vec::new();
        for _ in 0..args.runs {
            let start = Instant::now();
            let r = teacher.score(ids, 1, 20, 1.0).await?;
            let dt = start.elapsed().as_secs_f64();
            rates.push(r.rows.len() as f64 / dt);
            secs.push(dt);
        }
        println!("| teacher forcing, {len} tokens, top-20 | {:.1} scored tok/s (median {:.3} s / request) |", median(rates), median(secs));
        let mut raw = Vec::new();
        for _ in 0..args.runs {
            let start = Instant::now();
            teacher.raw_logits(ids).await?;
            raw.push(start.elapsed().as_secs_f64());
        }
        println!(
            "| of which the engine pass (raw logits) | {:.3} s (median) |",
            median(raw)
        );
    }

    let prompt = all_ids[..32].to_vec();
    let mut ttft = Vec::new();
    let mut decode = Vec::new();
    for run in 0..args.runs {
        let params = GenerateParams {
            prompt: prompt.clone(),
            max_new_tokens: args.gen_tokens,
            temperature: 1.0,
            top_p: 1.0,
            seed: run as u64,
            top_logprobs: 5,
        };
        let start = Instant::now();
        let mut handle = teacher.generate(params)?;
        let mut first: Option<Duration> = None;
        let mut n = 0usize;
        while let Some(ev) = handle.events.recv().await {
            match ev {
                GenEvent::Token(_) => {
                    n += 1;
                    first.get_or_insert_with(|| start.elapsed());
                }
                GenEvent::Done(_) => break,
                GenEvent::Error(e) => anyhow::bail!("generation failed: {e}"),
            }
        }
        let total = start.elapsed();
        if let Some(first) = first {
            ttft.push(first.as_secs_f64() * 1000.0);
            if n > 1 {
                decode.push((n - 1) as f64 / (total - first).as_secs_f64());
            }
        }
    }
    println!(
        "| time to first token (32-token prompt) | {:.1} ms (median) |",
        median(ttft)
    );
    println!(
        "| decode, top-5 logprobs | {:.1} tok/s (median of {} x {} tokens) |",
        median(decode),
        args.runs,
        args.gen_tokens
    );
    println!("| peak memory (VmHWM) | {:.0} MiB |", peak_rss_mib());
    Ok(())
}
