//! A llama-architecture decoder on candle, for batched CPU decode.
//!
//! The weights come from the same GGUF file mistralrs loads, dequantized to F32 by candle's own
//! dequantization (what mistralrs's `CANDLE_DEQUANTIZE_ALL` load does), with F32 activations.
//! One decode step runs every sequence of the batch through each weight matrix at once (one
//! `[batch, hidden]` matmul per weight), so the weights are read once per step, not once per
//! sequence; attention runs per sequence over its own key/value cache.
//!
//! The weight matrices are packed once, at load, for [`kernel::matmul`], and every product runs
//! through it: a decode step's and a prompt piece's (prefill, one sequence at a time, runs its
//! norms and attention on candle tensors). The kernel sums each element in one fixed order
//! whatever the batch, and everything else in a decode step (norms, rotary embedding,
//! per-sequence attention) is row-wise, so a sequence's logits are the same bits whichever
//! sequences it is batched with.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::kernel;
use crate::engine::simd;
use kernel::Panels;

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

    /// Key/value cache bytes per token of one sequence.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * 2 * self.kv_dim() * std::mem::size_of::<f32>()
    }
}

/// One decoder block. The query, key and value projections are one matrix (their rows one
/// after another), and so are the feed-forward gate and up projections: one product each per
/// step instead of three and two. Each output element is the same dot product either way.
struct Layer {
    attn_norm: Tensor,
    /// `[heads * head_dim + 2 * kv_dim, hidden]`: query rows, then key rows, then value rows.
    wqkv: Panels,
    wo: Panels,
    ffn_norm: Tensor,
    /// `[2 * ffn, hidden]`: gate rows, then up rows.
    w_gate_up: Panels,
    w_down: Panels,
}

pub struct Model {
    pub cfg: Config,
    /// `[vocab, hidden]`, or `None` where the output layer is tied to the token embedding (the
    /// embedding's rows are then read from `lm_head`'s panels).
    embed: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `[vocab, hidden]`.
    lm_head: Panels,
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
    /// A cache with room for `tokens` tokens, allocated now (it never grows past that unless
    /// more are appended).
    pub fn with_capacity(cfg: &Config, tokens: usize) -> Self {
        let room = || {
            (0..cfg.layers)
                .map(|_| Vec::with_capacity(tokens * cfg.kv_dim()))
                .collect()
        };
        Self {
            k: room(),
            v: room(),
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
        // Each matrix is dropped once packed.
        let pack = |t: Tensor| -> anyhow::Result<Panels> {
            let (_, inner) = t.dims2()?;
            Ok(Panels::new(&F32s::of(&t)?, inner))
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
        if !cfg.heads.is_multiple_of(cfg.kv_heads) || !head_dim.is_multiple_of(2) {
            bail!("unsupported attention shape {cfg:?}");
        }
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut t = |name: &str| tensor(&format!("blk.{i}.{name}.weight"));
            // Each part is dropped once copied into its joint matrix.
            let wqkv = Tensor::cat(&[t("attn_q")?, t("attn_k")?, t("attn_v")?], 0)?;
            let w_gate_up = Tensor::cat(&[t("ffn_gate")?, t("ffn_up")?], 0)?;
            layers.push(Layer {
                attn_norm: t("attn_norm")?,
                wqkv: pack(wqkv)?,
                wo: pack(t("attn_output")?)?,
                ffn_norm: t("ffn_norm")?,
                w_gate_up: pack(w_gate_up)?,
                w_down: pack(t("ffn_down")?)?,
            });
        }
        let norm = tensor("output_norm.weight")?;
        // Tied embeddings when the file has no output matrix.
        let (embed, lm_head) = if content.tensor_infos.contains_key("output.weight") {
            (Some(embed), pack(tensor("output.weight")?)?)
        } else {
            (None, pack(embed)?)
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
        let x = self.append(cache, tokens)?;
        let last = x.narrow(0, tokens.len() - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.cfg.eps)?;
        Ok(product(&last, &self.lm_head)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// Teacher forcing: the logits after every token of `tokens` (one sequence, from an empty
    /// cache), `[len, vocab]` row-major, run in prompt pieces of `piece` tokens.
    pub fn logits_all(&self, tokens: &[u32], piece: usize) -> anyhow::Result<Vec<f32>> {
        let mut out = Vec::with_capacity(tokens.len() * self.cfg.vocab);
        self.logits_by_piece(tokens, piece, |_, rows| out.extend_from_slice(rows))?;
        Ok(out)
    }

    /// [`Model::logits_all`] a piece at a time: `on_piece(first, rows)` gets the logits after
    /// tokens `first..first + rows.len() / vocab`, row-major, as each piece is run; only one
    /// piece's logits exist at a time.
    pub fn logits_by_piece(
        &self,
        tokens: &[u32],
        piece: usize,
        mut on_piece: impl FnMut(usize, &[f32]),
    ) -> anyhow::Result<()> {
        let mut cache = KvCache::with_capacity(&self.cfg, tokens.len());
        let piece = piece.max(1);
        for (i, chunk) in tokens.chunks(piece).enumerate() {
            let x = self.append(&mut cache, chunk)?;
            let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.eps)?;
            let x = x.contiguous()?;
            on_piece(
                i * piece,
                &kernel::matmul(&F32s::of(&x)?, chunk.len(), &self.lm_head),
            );
        }
        Ok(())
    }

    /// Appends the embedding of each token to `x`.
    fn embed_into(&self, tokens: &[u32], x: &mut Vec<f32>) -> anyhow::Result<()> {
        let vocab = self.cfg.vocab;
        if let Some(t) = tokens.iter().find(|t| **t as usize >= vocab) {
            bail!("token {t} is outside the vocabulary ({vocab})");
        }
        match &self.embed {
            Some(embed) => {
                let embed = F32s::of(embed)?;
                let hidden = embed.len() / vocab;
                for &t in tokens {
                    let t = t as usize;
                    x.extend_from_slice(&embed[t * hidden..(t + 1) * hidden]);
                }
            }
            None => tokens
                .iter()
                .for_each(|&t| self.lm_head.row_into(t as usize, x)),
        }
        Ok(())
    }

    /// Runs `tokens` into `cache` like [`Model::prefill`], without the output layer (a piece of
    /// a prompt that more pieces follow); returns the last layer's hidden states.
    pub fn append(&self, cache: &mut KvCache, tokens: &[u32]) -> anyhow::Result<Tensor> {
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
        let hidden = self.lm_head.inner();
        let mut x = Vec::with_capacity(len * hidden);
        self.embed_into(tokens, &mut x)?;
        let mut x = Tensor::from_vec(x, (len, hidden), &dev)?;
        let cos = self.cos.narrow(0, start, len)?;
        let sin = self.sin.narrow(0, start, len)?;
        let (h, kvh, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let rep = h / kvh;
        let scale = 1.0 / (d as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let n = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.eps)?;
            let qkv = product(&n, &layer.wqkv)?;
            let q = qkv
                .narrow(1, 0, h * d)?
                .contiguous()?
                .reshape((1, len, h, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = qkv
                .narrow(1, h * d, kvh * d)?
                .contiguous()?
                .reshape((1, len, kvh, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = qkv.narrow(1, (h + kvh) * d, kvh * d)?.contiguous()?;
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
            x = (x + product(&attn, &layer.wo)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
        }
        cache.len += len;
        Ok(x)
    }

    /// One decode step: `tokens[i]` appended to `caches[i]`; returns `[batch, vocab]` logits,
    /// row-major. Runs on plain slices: every product goes through [`kernel::matmul`] and every
    /// other operation is row-wise, so a sequence's logits do not
    /// depend on the sequences beside it.
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
        let (h, kvh, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let (kvd, qd, half) = (cfg.kv_dim(), h * d, d / 2);
        let hidden = self.lm_head.inner();
        let mut x = Vec::with_capacity(b * hidden);
        self.embed_into(tokens, &mut x)?;
        let (cos, sin) = (F32s::of(&self.cos)?, F32s::of(&self.sin)?);
        let positions: Vec<usize> = caches.iter().map(|c| c.len).collect();
        let rotate = |rows: &mut [f32], width: usize| {
            for (row, p) in rows.chunks_exact_mut(width).zip(&positions) {
                let p = p * half;
                rope_i(row, &cos[p..p + half], &sin[p..p + half]);
            }
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let n = rms_norm(&x, &F32s::of(&layer.attn_norm)?, cfg.eps);
            let qkv = kernel::matmul(&n, b, &layer.wqkv);
            let width = qd + 2 * kvd;
            let mut q = Vec::with_capacity(b * qd);
            let mut k = Vec::with_capacity(b * kvd);
            for row in qkv.chunks_exact(width) {
                q.extend_from_slice(&row[..qd]);
                k.extend_from_slice(&row[qd..qd + kvd]);
            }
            rotate(&mut q, qd);
            rotate(&mut k, kvd);
            for (i, cache) in caches.iter_mut().enumerate() {
                cache.k[l].extend_from_slice(&k[i * kvd..(i + 1) * kvd]);
                cache.v[l].extend_from_slice(&qkv[i * width + qd + kvd..(i + 1) * width]);
            }
            let mut attn = vec![0f32; b * qd];
            let caches_ref: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
            attn.par_chunks_mut(d)
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
            add(&mut x, &kernel::matmul(&attn, b, &layer.wo));
            let n = rms_norm(&x, &F32s::of(&layer.ffn_norm)?, cfg.eps);
            let gate_up = kernel::matmul(&n, b, &layer.w_gate_up);
            let ffn = gate_up.len() / b / 2;
            // Row by row, side by side (a few thousand exponentials per row).
            let mut act = vec![0f32; b * ffn];
            act.par_chunks_mut(ffn)
                .zip(gate_up.par_chunks_exact(2 * ffn))
                .for_each(|(act, row)| {
                    // silu(g) * u = g / (1 + exp(-g)) * u.
                    let (gate, up) = row.split_at(ffn);
                    for (a, g) in act.iter_mut().zip(gate) {
                        *a = -g;
                    }
                    simd::exp_f32(act);
                    for ((a, g), u) in act.iter_mut().zip(gate).zip(up) {
                        *a = g / (1.0 + *a) * u;
                    }
                });
            add(&mut x, &kernel::matmul(&act, b, &layer.w_down));
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        let x = rms_norm(&x, &F32s::of(&self.norm)?, cfg.eps);
        Ok(kernel::matmul(&x, b, &self.lm_head))
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> anyhow::Result<Tensor> {
        let n = candle_nn::ops::rms_norm(x, &layer.ffn_norm, self.cfg.eps)?;
        let gate_up = product(&n, &layer.w_gate_up)?;
        let ffn = gate_up.dim(1)? / 2;
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, ffn)?)?;
        let up = gate_up.narrow(1, ffn, ffn)?;
        product(&(gate * up)?, &layer.w_down)
    }
}

/// `x @ w^T` for `x` `[rows, inner]` (prefill: one sequence at a time).
fn product(x: &Tensor, w: &Panels) -> anyhow::Result<Tensor> {
    let x = x.contiguous()?;
    let (rows, _) = x.dims2()?;
    let out = kernel::matmul(&F32s::of(&x)?, rows, w);
    Ok(Tensor::from_vec(out, (rows, w.outs()), &Device::Cpu)?)
}

/// A contiguous F32 CPU tensor's elements, borrowed.
struct F32s<'a> {
    storage: std::sync::RwLockReadGuard<'a, Storage>,
    range: std::ops::Range<usize>,
}

impl<'a> F32s<'a> {
    fn of(t: &'a Tensor) -> anyhow::Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("a weight is not contiguous");
        };
        if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
            bail!("a weight is not F32 on the CPU");
        }
        Ok(Self {
            storage,
            range: start..end,
        })
    }
}

impl std::ops::Deref for F32s<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.clone()],
            _ => unreachable!("checked in F32s::of"),
        }
    }
}

/// candle's `rms_norm`, row by row: `x / sqrt(mean(x^2) + eps) * alpha`.
fn rms_norm(x: &[f32], alpha: &[f32], eps: f32) -> Vec<f32> {
    let dim = alpha.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / dim as f32 + eps).sqrt();
        out.extend(row.iter().zip(alpha).map(|(v, a)| v / m * a));
    }
    out
}

/// candle's interleaved rotary embedding (`rope_i`) of one row of heads at one position.
fn rope_i(row: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in row.chunks_exact_mut(2 * half) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos[i] - b * sin[i];
            pair[1] = a * sin[i] + b * cos[i];
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
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
    let max = simd::max_f32(&scores);
    for s in &mut scores {
        *s -= max;
    }
    simd::exp_f32(&mut scores);
    let sum = scores.iter().fold(0f32, |sum, e| sum + e);
    for s in &mut scores {
        *s /= sum;
    }
    // Each output element sums `p * v` over the positions in order. A whole block of `BLOCK`
    // elements keeps its sums in registers across the positions (a slice of sums would go
    // through memory at every position); a shorter last block sums the same way in place.
    const BLOCK: usize = 32;
    for (b, out) in out.chunks_mut(BLOCK).enumerate() {
        let n = out.len();
        let rows = scores.iter().enumerate().map(|(t, p)| {
            let from = t * kv_dim + offset + b * BLOCK;
            (p, &values[from..from + n])
        });
        if let Ok(out) = <&mut [f32; BLOCK]>::try_from(&mut *out) {
            let mut acc = [0f32; BLOCK];
            for (p, v) in rows {
                let v: &[f32; BLOCK] = v.try_into().expect("a whole block");
                for i in 0..BLOCK {
                    acc[i] += p * v[i];
                }
            }
            *out = acc;
        } else {
            out.fill(0.0);
            for (p, v) in rows {
                for (o, v) in out.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
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
    fn attention_sums_each_element_over_the_positions_in_order() {
        // Two whole blocks of sums and a tail of 8, over 7 positions of a key/value head at
        // offset 72 of 144.
        let (d, kv_dim, seen) = (72, 144, 7);
        let wave = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>();
        let (q, keys, values) = (
            wave(d, 0.7),
            wave(seen * kv_dim, 0.3),
            wave(seen * kv_dim, 1.1),
        );
        let mut out = vec![0f32; d];
        attend(&q, &keys, &values, 72, kv_dim, &mut out);
        // The same weights, then every element summed plainly, position by position.
        let scale = 1.0 / (d as f32).sqrt();
        let scores: Vec<f32> = (0..seen)
            .map(|t| dot(&q, &keys[t * kv_dim + 72..t * kv_dim + 72 + d]) * scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut exps: Vec<f32> = scores.iter().map(|s| s - max).collect();
        simd::exp_f32(&mut exps);
        let sum = exps.iter().fold(0f32, |a, e| a + e);
        let mut want = vec![0f32; d];
        for (t, e) in exps.iter().enumerate() {
            for (i, w) in want.iter_mut().enumerate() {
                *w += e / sum * values[t * kv_dim + 72 + i];
            }
        }
        assert_eq!(out, want);
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
