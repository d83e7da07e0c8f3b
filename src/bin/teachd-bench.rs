//! Engine benchmark for one teacher on this machine; prints markdown tables.
//!
//!   cargo run --bin teachd-bench -- [--config config/default.toml] [--runs 3]
//!
//! Measures, in-process (no HTTP): teacher forcing (scored tokens/s at 128, 512, 2048 tokens,
//! median of `--runs`), peak memory of one teacher-forcing pass at 512 / 2048 / 8192 tokens,
//! generation (time to first token, single-stream decode, and aggregate decode with 1 / 4 / 8
//! concurrent clients, while all of them decode and end to end; `--runs` rounds of every client
//! count back to back, each ratio the median of the rounds' ratios), the
//! latency of short calls while long generations run against the same calls on an idle
//! engine, batch invariance (a generation alone vs beside others, and generation logprobs vs
//! teacher forcing of the same tokens), and what teachd's own per-step work costs in a decode
//! step. Run it with nothing else busy: on 2 cores, thread pools collapse under contention.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use teachd::engine::{math, GenEvent, GenToken, GenerateParams, ModelRegistry, Teacher};

#[derive(Parser)]
struct Args {
    #[arg(long, short, env = "TEACHD_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Sequence lengths to score.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    lengths: Vec<usize>,
    /// Sequence lengths whose peak memory is measured (one pass each, clamped to the model's
    /// context length).
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    rss_lengths: Vec<usize>,
    /// Tokens per generation in the decode measurements.
    #[arg(long, default_value_t = 48)]
    gen_tokens: usize,
    /// Concurrent clients in the aggregate decode measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    clients: Vec<usize>,
    /// Length of each of the 4 long generations the short calls run beside.
    #[arg(long, default_value_t = 256)]
    long_tokens: usize,
    /// Short calls of each kind, idle and under load.
    #[arg(long, default_value_t = 12)]
    short_calls: usize,
    /// Skip sections: any of tf, rss, decode, load, invariance, exactness, step.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// "1 concurrent client", "4 concurrent clients".
fn clients_label(n: usize) -> String {
    format!("{n} concurrent client{}", if n == 1 { "" } else { "s" })
}

/// Nearest-rank percentile.
fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .unwrap_or(f64::NAN)
}

fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:") / 1024.0
}

/// Reset the peak-RSS counter to the current RSS (Linux: `5` into clear_refs).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// One run of `clients` concurrent generations of `gen_tokens` tokens (prompts of 32 tokens, or
/// 32, 35, 38, ... with `spread` 3, sampled at T = 1): (end-to-end tok/s, decode tok/s).
///
/// End to end counts every token over the whole run, prompt processing included. Decode counts
/// the tokens that arrived while every client was decoding (from the last client's first token
/// to the first client's last) over that window: the prompts are processed one after another
/// before the step that first batches them, so a window opened at the earliest first token
/// would count the other clients' prompt processing as decode time.
async fn concurrent_decode(
    teacher: &Arc<Teacher>,
    all_ids: &[u32],
    clients: usize,
    spread: usize,
    gen_tokens: usize,
) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let t = teacher.clone();
            let len = 32 + c * spread;
            let mut params = greedy(all_ids[c * 3..c * 3 + len].to_vec(), gen_tokens);
            params.temperature = 1.0;
            params.seed = c as u64;
            tokio::spawn(async move { arrivals(&t, params, start).await })
        })
        .collect();
    let mut runs = Vec::new();
    for t in tasks {
        let times = t.await??;
        anyhow::ensure!(times.len() > 1, "a generation stopped after one token");
        runs.push(times);
    }
    let generated: usize = runs.iter().map(Vec::len).sum();
    let lasts: Vec<Duration> = runs.iter().map(|r| r[r.len() - 1]).collect();
    let end = lasts.iter().max().copied().unwrap_or_default();
    let close = lasts.iter().min().copied().unwrap_or_default();
    let open = runs.iter().map(|r| r[0]).max().unwrap_or_default();
    anyhow::ensure!(close > open, "the clients never decoded together");
    let inside = runs
        .iter()
        .flatten()
        .filter(|&&t| t > open && t <= close)
        .count();
    let rate = generated as f64 / end.as_secs_f64();
    let decode = inside as f64 / (close - open).as_secs_f64();
    Ok((rate, decode))
}

/// The arrival time (since `origin`) of each token of one generation.
async fn arrivals(
    teacher: &Arc<Teacher>,
    params: GenerateParams,
    origin: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut handle = teacher.generate(params)?;
    let mut times = Vec::new();
    while let Some(ev) = handle.events.recv().await {
        match ev {
            GenEvent::Token(_) => times.push(origin.elapsed()),
            GenEvent::Done(_) => break,
            GenEvent::Error(e) => anyhow::bail!("generation failed: {e}"),
        }
    }
    Ok(times)
}

/// Run one generation to the end; its tokens and the time to the first and the last one.
async fn generate(
    teacher: &Arc<Teacher>,
    params: GenerateParams,
) -> anyhow::Result<(Vec<GenToken>, Duration, Duration)> {
    let start = Instant::now();
    let mut handle = teacher.generate(params)?;
    let mut first = None;
    let mut tokens = Vec::new();
    while let Some(ev) = handle.events.recv().await {
        match ev {
            GenEvent::Token(t) => {
                first.get_or_insert_with(|| start.elapsed());
                tokens.push(t);
            }
            GenEvent::Done(_) => break,
            GenEvent::Error(e) => anyhow::bail!("generation failed: {e}"),
        }
    }
    Ok((tokens, first.unwrap_or_default(), start.elapsed()))
}

fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> GenerateParams {
    GenerateParams {
        prompt,
        max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        top_logprobs: 5,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let skip = |name: &str| args.skip.iter().any(|s| s == name);
    let config = teachd::config::Config::load(args.config.as_deref())?;
    let t0 = Instant::now();
    let registry = ModelRegistry::load(&config.models, &config.engine).await?;
    let load = t0.elapsed();
    let teacher = registry
        .iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no model configured"))?
        .clone();
    let text = "Knowledge distillation trains a compact student network to reproduce the output distribution of a larger teacher model, position by position. ".repeat(400);
    let mut all_ids = teacher.tokenize(&text, true)?;
    while all_ids.len() < 8192 {
        let more = all_ids.clone();
        all_ids.extend(more);
    }
    let model_cfg = &config.models[0];
    let generation = teacher.generation_engine();

    println!(
        "model: {} ({}, {}), threads: {}, load: {:.1} s, rss after load: {:.0} MiB, engine: {}, generations: {} ({} at once), dequantize (scoring/generation): {}/{}",
        teacher.info.id,
        teacher.info.architecture,
        teacher.info.quantization,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.as_secs_f64(),
        status_kib("VmRSS:") / 1024.0,
        match teacher.scoring_engine() {
            "native" => "teacher forcing on the native engine",
            "separate" => "separate scoring instance",
            _ => "one shared instance",
        },
        generation.0,
        generation.1,
        model_cfg.dequantize_on_cpu,
        model_cfg.generation_dequantize_on_cpu.unwrap_or(model_cfg.dequantize_on_cpu),
    );
    println!();
    println!("| measurement | value |");
    println!("|---|---|");

    if !skip("tf") {
        for &len in &args.lengths {
            let ids = &all_ids[..len.min(teacher.info.context_length)];
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
            println!(
                "| teacher forcing, {len} tokens, top-20 | {:.1} scored tok/s (median {:.3} s / request) |",
                median(rates),
                median(secs)
            );
        }
        // Several short sequences from different clients at once vs the same one by one.
        let shorts: Vec<Vec<u32>> = (0..8)
            .map(|i| all_ids[i * 7..i * 7 + 64].to_vec())
            .collect();
        let start = Instant::now();
        for ids in &shorts {
            teacher.score(ids, 1, 20, 1.0).await?;
        }
        let serial = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let tasks: Vec<_> = shorts
            .iter()
            .cloned()
            .map(|ids| {
                let t = teacher.clone();
                tokio::spawn(async move { t.score(&ids, 1, 20, 1.0).await.map(|_| ()) })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        let concurrent = start.elapsed().as_secs_f64();
        println!(
            "| 8 x 64-token teacher forcing: one by one / 8 clients at once | {serial:.2} s / {concurrent:.2} s |"
        );
    }

    if !skip("rss") {
        for &len in &args.rss_lengths {
            let len = len.min(teacher.info.context_length);
            let ids = &all_ids[..len];
            let before = status_kib("VmRSS:") / 1024.0;
            let reset = reset_peak_rss();
            let start = Instant::now();
            teacher.score(ids, 1, 20, 1.0).await?;
            let dt = start.elapsed().as_secs_f64();
            let logits_mib = (len * teacher.info.vocab_size * 4) as f64 / (1024.0 * 1024.0);
            println!(
                "| peak memory, one {len}-token pass | {:.0} MiB (rss before {before:.0} MiB; one [len, vocab] f32 buffer = {logits_mib:.0} MiB; {dt:.1} s){} |",
                peak_rss_mib(),
                if reset { "" } else { " (peak not reset: whole-process peak)" }
            );
        }
    }

    if !skip("decode") {
        let prompt = all_ids[..32].to_vec();
        let mut ttft = Vec::new();
        let mut decode = Vec::new();
        for run in 0..args.runs {
            let mut params = greedy(prompt.clone(), args.gen_tokens);
            params.temperature = 1.0;
            params.seed = run as u64;
            let (tokens, first, total) = generate(&teacher, params).await?;
            ttft.push(first.as_secs_f64() * 1000.0);
            if tokens.len() > 1 {
                decode.push((tokens.len() - 1) as f64 / (total - first).as_secs_f64());
            }
        }
        println!(
            "| time to first token (32-token prompt) | {:.1} ms (median) |",
            median(ttft)
        );
        println!(
            "| decode, one client, top-5 logprobs | {:.1} tok/s (median of {} x {} tokens) |",
            median(decode),
            args.runs,
            args.gen_tokens
        );
        for (kind, spread) in [
            ("equal-length prompts", 0usize),
            ("prompts of different lengths", 3),
        ] {
            // `runs` rounds, each running every client count once, back to back: a ratio
            // compares runs a few seconds apart (this machine's speed drifts by tens of % over
            // minutes), and the table gives the median of the rounds' ratios.
            let counts = &args.clients;
            let mut runs = vec![Vec::new(); counts.len()];
            for _ in 0..args.runs {
                for (i, &clients) in counts.iter().enumerate() {
                    let (rate, decode) =
                        concurrent_decode(&teacher, &all_ids, clients, spread, args.gen_tokens)
                            .await?;
                    runs[i].push((rate, decode));
                }
            }
            for (i, &clients) in counts.iter().enumerate() {
                let of = |f: fn(&(f64, f64)) -> f64| median(runs[i].iter().map(f).collect());
                let ratios = |f: fn(&(f64, f64)) -> f64| -> Vec<f64> {
                    runs[i]
                        .iter()
                        .zip(&runs[0])
                        .map(|(r, b)| f(r) / f(b))
                        .collect()
                };
                let decode = ratios(|r| r.1);
                let each: Vec<String> = decode.iter().map(|r| format!("{r:.2}x")).collect();
                println!(
                    "| decode, {} x {} tokens, {kind} | {:.1} tok/s aggregate decode while all decode ({:.2}x {}; rounds {}); end to end with the prompts {:.1} tok/s ({:.2}x); medians of {} rounds |",
                    clients_label(clients),
                    args.gen_tokens,
                    of(|r| r.1),
                    median(decode.clone()),
                    clients_label(counts[0]),
                    each.join(" / "),
                    of(|r| r.0),
                    median(ratios(|r| r.0)),
                    args.runs
                );
            }
        }
    }

    if !skip("load") {
        let short_tf = all_ids[100..132].to_vec();
        let short_gen = all_ids[200..224].to_vec();
        let measure = |label: &'static str| {
            let teacher = teacher.clone();
            let (short_tf, short_gen) = (short_tf.clone(), short_gen.clone());
            let n = args.short_calls;
            async move {
                let mut tf = Vec::new();
                let mut gen = Vec::new();
                for _ in 0..n {
                    let start = Instant::now();
                    teacher.score(&short_tf, 1, 20, 1.0).await?;
                    tf.push(start.elapsed().as_secs_f64() * 1000.0);
                    let (_, first, _) = generate(&teacher, greedy(short_gen.clone(), 8)).await?;
                    gen.push(first.as_secs_f64() * 1000.0);
                }
                println!(
                    "| {label}: 32-token /v1/logprobs latency | p50 {:.0} ms, p99 {:.0} ms |",
                    percentile(tf.clone(), 50.0),
                    percentile(tf, 99.0)
                );
                println!(
                    "| {label}: short generation, time to first token | p50 {:.0} ms, p99 {:.0} ms |",
                    percentile(gen.clone(), 50.0),
                    percentile(gen, 99.0)
                );
                anyhow::Ok(())
            }
        };
        measure("idle").await?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let step_times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let long: Vec<_> = (0..4)
            .map(|c| {
                let t = teacher.clone();
                let stop = stop.clone();
                let step_times = step_times.clone();
                let mut params =
                    greedy(all_ids[300 + c * 5..332 + c * 5].to_vec(), args.long_tokens);
                params.temperature = 1.0;
                params.seed = c as u64;
                tokio::spawn(async move {
                    // Keep 4 long generations running until the short calls are done.
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let (tokens, first, total) = generate(&t, params.clone()).await?;
                        if tokens.len() > 1 {
                            step_times.lock().unwrap().push(
                                (total - first).as_secs_f64() * 1000.0 / (tokens.len() - 1) as f64,
                            );
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        measure("under 4 long generations").await?;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in long {
            t.await??;
        }
        let steps = step_times.lock().unwrap().clone();
        if !steps.is_empty() {
            println!(
                "| decode step of the 4 long generations meanwhile | {:.0} ms (median) |",
                median(steps)
            );
        }
    }

    if !skip("invariance") {
        // The same greedy generation alone and beside 3 others (different prompts, lengths).
        let prompt = all_ids[40..72].to_vec();
        let (alone, _, _) = generate(&teacher, greedy(prompt.clone(), args.gen_tokens)).await?;
        let others: Vec<_> = (0..3)
            .map(|c| {
                let t = teacher.clone();
                let p = greedy(all_ids[500 + c..532 + c * 2].to_vec(), args.gen_tokens);
                tokio::spawn(async move { generate(&t, p).await })
            })
            .collect();
        let (beside, _, _) = generate(&teacher, greedy(prompt.clone(), args.gen_tokens)).await?;
        for t in others {
            t.await??;
        }
        let same_ids = alone.iter().map(|t| t.id).eq(beside.iter().map(|t| t.id));
        let diverge = alone
            .iter()
            .zip(&beside)
            .position(|(a, b)| a.id != b.id)
            .unwrap_or(alone.len().min(beside.len()));
        // Differences up to (and including) the first differing step, where both saw the
        // same context.
        let max_diff = alone
            .iter()
            .zip(&beside)
            .take(diverge + 1)
            .flat_map(|(a, b)| {
                std::iter::once((a.logprob - b.logprob).abs()).chain(
                    a.top
                        .iter()
                        .zip(&b.top)
                        .filter(|(x, y)| x.0 == y.0)
                        .map(|(x, y)| (x.1 - y.1).abs()),
                )
            })
            .fold(0.0f64, f64::max);
        let bit_equal = same_ids
            && alone.iter().zip(&beside).all(|(a, b)| {
                a.logprob.to_bits() == b.logprob.to_bits()
                    && a.top
                        .iter()
                        .map(|x| (x.0, x.1.to_bits()))
                        .eq(b.top.iter().map(|x| (x.0, x.1.to_bits())))
            });
        println!(
            "| generation alone vs beside 3 others (greedy, {} tokens) | {}; max logprob difference over the shared context {max_diff:.2e} |",
            alone.len(),
            if bit_equal {
                "bit-identical".to_string()
            } else if same_ids {
                "same tokens, logprobs differ".to_string()
            } else {
                format!("same first {diverge} tokens, then a near-tie flips")
            }
        );
        // Generation logprobs against teacher forcing of the same tokens, alone and batched.
        for (label, run) in [("alone", &alone), ("beside 3 others", &beside)] {
            let mut seq = prompt.clone();
            seq.extend(run.iter().map(|t| t.id));
            let scored = teacher.score(&seq, prompt.len(), 0, 1.0).await?;
            let err = run
                .iter()
                .zip(&scored.rows)
                .map(|(g, r)| (g.logprob - r.token_logprob).abs())
                .fold(0.0f64, f64::max);
            println!("| generation logprobs ({label}) vs teacher forcing of the same tokens | max abs difference {err:.2e} |");
        }
    }

    if !skip("exactness") {
        // Generation logprobs against teacher forcing of the generated tokens, for sequences
        // that share the engine in different ways.
        // (where in the text the prompt starts, its length, start delay in ms, tokens to generate;
        // 0 = --gen-tokens)
        type Seqs = Vec<(usize, usize, u64, usize)>;
        let scenarios: [(&str, Seqs); 5] = [
            (
                "2 equal-length prompts together, the second stops after 1 token",
                vec![(40, 32, 0, 0), (600, 32, 0, 1)],
            ),
            (
                "2 equal-length prompts, started together",
                vec![(40, 32, 0, 0), (600, 32, 0, 0)],
            ),
            (
                "2 prompts of different lengths, started together",
                vec![(40, 32, 0, 0), (600, 37, 0, 0)],
            ),
            (
                "4 equal-length prompts, started together",
                vec![
                    (40, 32, 0, 0),
                    (600, 32, 0, 0),
                    (900, 32, 0, 0),
                    (1200, 32, 0, 0),
                ],
            ),
            (
                "equal-length prompts, second starts 300 ms later",
                vec![(40, 32, 0, 0), (600, 32, 300, 0)],
            ),
        ];
        for (label, seqs) in scenarios {
            let tasks: Vec<_> = seqs
                .iter()
                .map(|&(at, len, delay, max_new)| {
                    let t = teacher.clone();
                    let prompt = all_ids[at..at + len].to_vec();
                    let n = if max_new == 0 {
                        args.gen_tokens
                    } else {
                        max_new
                    };
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let (tokens, _, _) = generate(&t, greedy(prompt.clone(), n)).await?;
                        anyhow::Ok((prompt, tokens))
                    })
                })
                .collect();
            let mut errs = Vec::new();
            for task in tasks {
                let (prompt, tokens) = task.await??;
                let mut seq = prompt.clone();
                seq.extend(tokens.iter().map(|t| t.id));
                let scored = teacher.score(&seq, prompt.len(), 0, 1.0).await?;
                let diffs: Vec<f64> = tokens
                    .iter()
                    .zip(&scored.rows)
                    .map(|(g, r)| (g.logprob - r.token_logprob).abs())
                    .collect();
                let err = diffs.iter().cloned().fold(0.0f64, f64::max);
                match diffs.iter().position(|&d| d > 1e-3) {
                    Some(at) => errs.push(format!("{err:.1e} (from token {at})")),
                    None => errs.push(format!("{err:.1e}")),
                }
            }
            println!(
                "| generation vs teacher forcing, {label} | max abs difference per sequence: {} |",
                errs.join(", ")
            );
        }
    }

    if !skip("step") {
        // teachd's own work in one decode step, as the generation's step function does it
        // (`math::pick`: log-softmax over the vocabulary, the sample, top-5).
        let vocab = teacher.info.vocab_size;
        // A flat distribution (logits spread evenly over 10 nats: a top-p 0.9 nucleus of about
        // a quarter of the vocabulary) and a peaked one (probability falling as 1 / rank^2:
        // the most likely token 0.61, a nucleus of a few tokens).
        let flat: Vec<f32> = (0..vocab)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let peaked: Vec<f32> = (0..vocab)
            .map(|i| -2.0 * ((1 + (i * 7919) % vocab) as f32).ln())
            .collect();
        let n = 200;
        for (shape, logits, temperature, top_p) in [
            ("flat", &flat, 0.0, 1.0),
            ("flat", &flat, 1.0, 1.0),
            ("flat", &flat, 1.0, 0.9),
            ("peaked", &peaked, 1.0, 0.9),
        ] {
            let start = Instant::now();
            for i in 0..n {
                let u = (i as f64 + 0.5) / n as f64;
                std::hint::black_box(math::pick(logits, temperature, top_p, 5, || u));
            }
            let how = if temperature == 0.0 {
                "greedy".to_string()
            } else {
                format!("T = {temperature}, top_p = {top_p}")
            };
            println!(
                "| teachd's per-step work (vocab {vocab}, {shape} logits, {how}, top-5) | {:.2} ms |",
                start.elapsed().as_secs_f64() * 1000.0 / n as f64
            );
        }
    }
    println!(
        "| peak memory of the run (VmHWM) | {:.0} MiB |",
        peak_rss_mib()
    );
    Ok(())
}
