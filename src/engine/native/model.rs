//! A llama-architecture decoder on candle, for batched CPU decode.
//!
//! The weights come from the same GGUF file mistralrs loads, dequantized to F32 by candle's own
//! dequantization (what mistralrs's `CANDLE_DEQUANTIZE_ALL` load does), with F32 activations.
//! One decode step runs every sequence of the batch through each weight matrix at once (one
//! `[batch, hidden]` matmul per weight), so the weights are read once per step, not once per
//! sequence; attention runs per sequence over its own key/value cache.
//!
//! Batch invariance: gemm takes a matrix-vector path for a single row, whose sums are ordered
//! differently from its matrix kernel, and the kernel's order for an element does not depend on
//! how many rows share the call. [`linear`] therefore never multiplies a single row (it doubles
//! it), so a sequence's logits are the same bits whichever sequences it is batched with
//! (`tests::a_row_does_not_depend_on_its_batch`). Per-sequence attention and the row-wise norms
//! never mix sequences.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Query rows per prefill attention chunk: bounds the scores buffer to
/// `heads * PREFILL_CHUNK * len` floats (9 x 256 x 8192 x 4 B = 75 MiB for the default model at
/// its full context).
const PREFILL_CHUNK: usize = 256;

#[derive(Clone, Debug)]
pub struct Config {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub context: usize,
    pub vocab: usize,
}

impl Config {
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

pub struct Model {
    pub cfg: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// `[context, head_dim / 2]` rotary tables.
    cos: Tensor,
    sin: Tensor,
}

/// One sequence's keys and values, per layer, token-major: `[tokens, kv_heads * head_dim]`
/// (keys already rotated).
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    pub fn new(cfg: &Config) -> Self {
        Self {
            k: vec![Vec::new(); cfg.layers],
            v: vec![Vec::new(); cfg.layers],
            len: 0,
        }
    }
}

impl Model {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)?;
        let meta = |key: &str| {
            content
                .metadata
                .get(key)
                .with_context(|| format!("GGUF metadata `{key}` missing"))
        };
        let arch = meta("general.architecture")?.to_string()?.clone();
        if arch != "llama" {
            bail!("the native decoder runs llama-architecture models, not `{arch}`");
        }
        let u = |key: &str| -> anyhow::Result<usize> {
            Ok(meta(&format!("llama.{key}"))?.to_u32()? as usize)
        };
        let heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let head_dim = hidden / heads;
        if let Ok(rope_dim) = u("rope.dimension_count") {
            if rope_dim != head_dim {
                bail!("partial rotary embeddings ({rope_dim} of {head_dim}) are not supported");
            }
        }
        if content.metadata.contains_key("llama.rope.scaling.type") {
            bail!("rotary scaling is not supported by the native decoder");
        }
        let theta = meta("llama.rope.freq_base")
            .and_then(|v| Ok(v.to_f32()?))
            .unwrap_or(10_000.0);
        let dev = Device::Cpu;
        let mut tensor = |name: &str| -> anyhow::Result<Tensor> {
            let q = content
                .tensor(&mut file, name, &dev)
                .with_context(|| format!("GGUF tensor `{name}`"))?;
            Ok(q.dequantize(&dev)?.to_dtype(DType::F32)?.contiguous()?)
        };
        let embed = tensor("token_embd.weight")?;
        let (vocab, embed_hidden) = embed.dims2()?;
        if embed_hidden != hidden {
            bail!("token embedding width {embed_hidden} is not {hidden}");
        }
        let cfg = Config {
            layers: u("block_count")?,
            heads,
            kv_heads: u("attention.head_count_kv").unwrap_or(heads),
            head_dim,
            eps: meta("llama.attention.layer_norm_rms_epsilon")?.to_f32()?,
            context: u("context_length")?,
            vocab,
        };
        if cfg.heads % cfg.kv_heads != 0 || head_dim % 2 != 0 {
            bail!("unsupported attention shape {cfg:?}");
        }
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut t = |name: &str| tensor(&format!("blk.{i}.{name}.weight"));
            layers.push(Layer {
                attn_norm: t("attn_norm")?,
                wq: t("attn_q")?,
                wk: t("attn_k")?,
                wv: t("attn_v")?,
                wo: t("attn_output")?,
                ffn_norm: t("ffn_norm")?,
                w_gate: t("ffn_gate")?,
                w_up: t("ffn_up")?,
                w_down: t("ffn_down")?,
            });
        }
        let norm = tensor("output_norm.weight")?;
        // Tied embeddings when the file has no output matrix.
        let lm_head = if content.tensor_infos.contains_key("output.weight") {
            tensor("output.weight")?
        } else {
            embed.clone()
        };
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(cfg.context * half);
        let mut sin = Vec::with_capacity(cfg.context * half);
        for pos in 0..cfg.context {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (cfg.context, half), &dev)?,
            sin: Tensor::from_vec(sin, (cfg.context, half), &dev)?,
            cfg,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Runs `tokens` (one sequence, appended after what `cache` holds) and returns the logits
    /// after its last token.
    pub fn prefill(&self, cache: &mut KvCache, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        let cfg = &self.cfg;
        let len = tokens.len();
        let start = cache.len;
        if len == 0 {
            bail!("nothing to run");
        }
        if start + len > cfg.context {
            bail!(
                "{} tokens exceed the context length {}",
                start + len,
                cfg.context
            );
        }
        let dev = Device::Cpu;
        let ids = Tensor::new(tokens, &dev)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let cos = self.cos.narrow(0, start, len)?;
        let sin = self.sin.narrow(0, start, len)?;
        let (h, kvh, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let rep = h / kvh;
        let scale = 1.0 / (d as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let n = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.eps)?;
            let q = linear(&n, &layer.wq)?
                .reshape((1, len, h, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = linear(&n, &layer.wk)?
                .reshape((1, len, kvh, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = linear(&n, &layer.wv)?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
            // Into the cache, token-major.
            let k_rows = k.transpose(1, 2)?.contiguous()?.flatten_all()?;
            cache.k[l].extend(k_rows.to_vec1::<f32>()?);
            cache.v[l].extend(v.flatten_all()?.to_vec1::<f32>()?);
            let total = start + len;
            let keys = Tensor::from_slice(&cache.k[l], (total, kvh, d), &dev)?
                .transpose(0, 1)?
                .contiguous()?;
            let values = Tensor::from_slice(&cache.v[l], (total, kvh, d), &dev)?
                .transpose(0, 1)?
                .contiguous()?;
            // Grouped heads: the `rep` query heads of one key/value head as one matrix.
            let q = q.reshape((kvh, rep, len, d))?;
            let mut chunks = Vec::new();
            for s in (0..len).step_by(PREFILL_CHUNK) {
                let rows = PREFILL_CHUNK.min(len - s);
                let seen = start + s + rows;
                let qc = q
                    .narrow(2, s, rows)?
                    .contiguous()?
                    .reshape((kvh, rep * rows, d))?;
                let kc = keys.narrow(1, 0, seen)?;
                let vc = values.narrow(1, 0, seen)?;
                let scores = (qc.matmul(&kc.t()?)? * scale)?.reshape((kvh, rep, rows, seen))?;
                let mask: Vec<f32> = (0..rows)
                    .flat_map(|r| {
                        (0..seen).map(move |j| {
                            if j <= start + s + r {
                                0.0
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (rows, seen), &dev)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?
                    .reshape((kvh, rep * rows, seen))?;
                let out = probs
                    .matmul(&vc.contiguous()?)?
                    .reshape((h, rows, d))?
                    .transpose(0, 1)?
                    .reshape((rows, h * d))?;
                chunks.push(out);
            }
            let attn = Tensor::cat(&chunks, 0)?;
            x = (x + linear(&attn, &layer.wo)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
        }
        cache.len += len;
        let last = x.narrow(0, len - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, cfg.eps)?;
        Ok(linear(&last, &self.lm_head)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// One decode step: `tokens[i]` appended to `caches[i]`; returns `[batch, vocab]` logits,
    /// row-major.
    pub fn decode(&self, caches: &mut [&mut KvCache], tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        let cfg = &self.cfg;
        let b = tokens.len();
        if b == 0 || caches.len() != b {
            bail!("a decode step needs one cache per token");
        }
        if let Some(c) = caches.iter().find(|c| c.len >= cfg.context) {
            bail!(
                "{} tokens exceed the context length {}",
                c.len + 1,
                cfg.context
            );
        }
        let dev = Device::Cpu;
        let (h, kvh, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let kvd = cfg.kv_dim();
        let positions: Vec<u32> = caches.iter().map(|c| c.len as u32).collect();
        let pos = Tensor::new(positions.as_slice(), &dev)?;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, 1, d / 2))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, 1, d / 2))?;
        let ids = Tensor::new(tokens, &dev)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let n = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.eps)?;
            let q = linear(&n, &layer.wq)?.reshape((b, h, 1, d))?;
            let k = linear(&n, &layer.wk)?.reshape((b, kvh, 1, d))?;
            let v = linear(&n, &layer.wv)?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let v = v.flatten_all()?.to_vec1::<f32>()?;
            for (i, cache) in caches.iter_mut().enumerate() {
                cache.k[l].extend_from_slice(&k[i * kvd..(i + 1) * kvd]);
                cache.v[l].extend_from_slice(&v[i * kvd..(i + 1) * kvd]);
            }
            let mut out = vec![0f32; b * h * d];
            let caches_ref: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
            out.par_chunks_mut(d)
                .enumerate()
                .for_each(|(row, out_head)| {
                    let (i, head) = (row / h, row % h);
                    let cache = caches_ref[i];
                    let seen = cache.len + 1;
                    attend(
                        &q[row * d..(row + 1) * d],
                        &cache.k[l][..seen * kvd],
                        &cache.v[l][..seen * kvd],
                        (head / (h / kvh)) * d,
                        kvd,
                        out_head,
                    );
                });
            let attn = Tensor::from_vec(out, (b, h * d), &dev)?;
            x = (x + linear(&attn, &layer.wo)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, cfg.eps)?;
        Ok(linear(&x, &self.lm_head)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = candle_nn::ops::rms_norm(x, &layer.ffn_norm, self.cfg.eps)?;
        let gate = candle_nn::ops::silu(&linear(&n, &layer.w_gate)?)?;
        let up = linear(&n, &layer.w_up)?;
        linear(&(gate * up)?, &layer.w_down)
    }
}

/// `x @ w^T` for `x` `[rows, in]` and `w` `[out, in]`; a single row is run as two (see the
/// module notes on batch invariance).
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.dim(0)? == 1 {
        let doubled = Tensor::cat(&[x, x], 0)?;
        return doubled.matmul(&w.t()?)?.narrow(0, 0, 1);
    }
    x.matmul(&w.t()?)
}

/// Softmax attention of one query head over `seen` cached positions of its key/value head
/// (`offset` into each `[kv_dim]` row), written to `out`.
fn attend(q: &[f32], keys: &[f32], values: &[f32], offset: usize, kv_dim: usize, out: &mut [f32]) {
    let d = q.len();
    let scale = 1.0 / (d as f32).sqrt();
    let seen = keys.len() / kv_dim;
    let mut scores: Vec<f32> = (0..seen)
        .map(|t| dot(q, &keys[t * kv_dim + offset..t * kv_dim + offset + d]) * scale)
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in &mut scores {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (t, p) in scores.iter().enumerate() {
        let p = p / sum;
        let row = &values[t * kv_dim + offset..t * kv_dim + offset + d];
        for (o, v) in out.iter_mut().zip(row) {
            *o += p * v;
        }
    }
}

/// A dot product with eight independent partial sums (the compiler vectorises it; the order of
/// the sums is fixed, so the result is deterministic).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        // Shapes of the default model's projections and its output layer.
        for (out, inp) in [
            (576, 576),
            (192, 576),
            (1536, 576),
            (576, 1536),
            (49152, 576),
        ] {
            let w = random(out, inp, 1);
            let rows = random(9, inp, 2);
            let alone = linear(&rows.narrow(0, 0, 1).unwrap(), &w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for batch in 2..=9 {
                let all = linear(&rows.narrow(0, 0, batch).unwrap(), &w).unwrap();
                let first = all.narrow(0, 0, 1).unwrap().flatten_all().unwrap();
                assert_eq!(
                    first.to_vec1::<f32>().unwrap(),
                    alone,
                    "[{out}, {inp}]: row 0 differs in a batch of {batch}"
                );
            }
        }
    }

    #[test]
    fn dot_matches_a_plain_sum() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..67).map(|i| 1.0 - i as f32 * 0.25).collect();
        let plain: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum();
        assert!((dot(&a, &b) as f64 - plain).abs() < 1e-2 * plain.abs().max(1.0));
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let q = vec![0.3f32; 8];
        let keys = vec![0.1f32; 16]; // kv_dim 16: two heads of 8
        let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let mut out = vec![0f32; 8];
        attend(&q, &keys, &values, 8, 16, &mut out);
        assert_eq!(out, (8..16).map(|i| i as f32).collect::<Vec<_>>());
    }
}
