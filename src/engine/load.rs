//! Loading a teacher: weights through mistralrs-core's loaders (so the activation dtype can be
//! chosen), digests, and the facts reported in `/v1/models`.

use std::io::Read;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use mistralrs_core::llguidance::toktrie::TokTrie;
use mistralrs_core::{
    AutoDeviceMapParams, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder,
    GGUFSpecificConfig, Loader, MistralRsBuilder, ModelDType, NormalLoaderBuilder,
    NormalSpecificConfig, SchedulerConfig, TokenSource,
};
use sha2::{Digest, Sha256};

use super::backend::{Backend, Lane, ScoringOn};
use super::native::Native;
use super::{ModelInfo, Teacher};
use crate::config::{
    DTypeSetting, EngineConfig, GenerationEngine, ModelConfig, ModelSource, ScoringEngine,
};

pub(super) async fn load_teacher(
    cfg: &ModelConfig,
    engine: &EngineConfig,
) -> anyhow::Result<Teacher> {
    let device = parse_device(&cfg.device)?;
    let on_cpu = device.is_cpu();
    let dtype = match (&cfg.dtype, on_cpu) {
        (DTypeSetting::Auto, true) => ModelDType::F32,
        (DTypeSetting::Auto, false) => ModelDType::BF16,
        (DTypeSetting::F32, _) => ModelDType::F32,
        (DTypeSetting::F16, _) => ModelDType::F16,
        (DTypeSetting::Bf16, _) => ModelDType::BF16,
    };
    let is_gguf = matches!(
        cfg.source,
        ModelSource::Gguf { .. } | ModelSource::Hub { file: Some(_), .. }
    );
    // With F32 activations, dequantized weights are both the fastest CPU path for teacher
    // forcing (dense F32 matmuls) and exact with respect to the stored quantized weights.
    let dequantize_scoring = on_cpu && is_gguf && cfg.dequantize_on_cpu;
    let dequantize_own_generation = on_cpu
        && is_gguf
        && cfg
            .generation_dequantize_on_cpu
            .unwrap_or(cfg.dequantize_on_cpu);
    // The native engine runs the generation weights: with `shared` those are the scoring
    // engine's, otherwise `generation_dequantize_on_cpu` decides how they load.
    let native_path = match cfg.scoring_engine {
        ScoringEngine::Shared => native_generation(cfg, on_cpu, dtype, dequantize_scoring)?,
        _ => native_generation(cfg, on_cpu, dtype, dequantize_own_generation)?,
    };
    // The native model is dequantized: it scores only where the scoring weights would be.
    let native_can_score = native_path.is_some() && dequantize_scoring;
    let place = match (cfg.scoring_engine, native_can_score) {
        (ScoringEngine::Native, false) => bail!(
            "model `{}`: scoring_engine = native runs teacher forcing on the native generation \
             engine's dequantized model, which this model does not have (see generation_engine \
             and dequantize_on_cpu)",
            cfg.id
        ),
        (ScoringEngine::Native | ScoringEngine::Auto, true) => ScoringEngine::Native,
        (ScoringEngine::Auto, false) if on_cpu => ScoringEngine::Separate,
        (ScoringEngine::Auto, false) => ScoringEngine::Shared,
        (chosen, _) => chosen,
    };
    let native_scoring = place == ScoringEngine::Native;
    let separate = place == ScoringEngine::Separate;
    // With native generation and scoring, the mistralrs instance computes nothing (it renders
    // chat templates and tokenizes): it keeps the quantized weights, the smallest copy.
    let dequantize_generation = match place {
        ScoringEngine::Native => false,
        ScoringEngine::Separate => dequantize_own_generation,
        _ => dequantize_scoring,
    };
    if on_cpu && native_path.is_none() && engine.max_batch > 1 {
        bail!(
            "model `{}`: engine.max_batch = {} on CPU with generation_engine = mistralrs: \
             mistralrs 0.8.1 computes batched CPU decode steps wrongly (its CPU decode attention \
             shares scratch buffers across the batch), so it runs one generation at a time; set \
             engine.max_batch = 1, or use the native engine (engine.native_max_batch)",
            cfg.id,
            engine.max_batch
        );
    }

    let (loader, weight_files, quant_label): (Box<dyn Loader>, Vec<PathBuf>, Option<String>) =
        match &cfg.source {
            ModelSource::Gguf { path } => {
                if !path.is_file() {
                    bail!(
                        "model `{}`: GGUF file {} not found (run scripts/fetch-model.sh for the default)",
                        cfg.id,
                        path.display()
                    );
                }
                let dir = path
                    .parent()
                    .unwrap_or(Path::new("."))
                    .to_string_lossy()
                    .into_owned();
                let file = path
                    .file_name()
                    .context("GGUF path has no file name")?
                    .to_string_lossy()
                    .into_owned();
                let loader = GGUFLoaderBuilder::new(
                    None,
                    None,
                    dir,
                    vec![file],
                    GGUFSpecificConfig { topology: None },
                    false,
                    None,
                )
                .build();
                (loader, vec![path.clone()], gguf_quantization(path).ok())
            }
            ModelSource::Hub {
                repo,
                file: Some(file),
                ..
            } => {
                let loader = GGUFLoaderBuilder::new(
                    None,
                    None,
                    repo.clone(),
                    vec![file.clone()],
                    GGUFSpecificConfig { topology: None },
                    false,
                    None,
                )
                .build();
                (loader, hub_cached_files(repo, Some(file)), None)
            }
            ModelSource::Safetensors { path, isq } => {
                let loader = NormalLoaderBuilder::new(
                    NormalSpecificConfig::default(),
                    None,
                    None,
                    Some(path.to_string_lossy().into_owned()),
                    false,
                    None,
                )
                .build(None)?;
                (loader, safetensors_files(path), isq.clone())
            }
            ModelSource::Hub {
                repo,
                file: None,
                isq,
            } => {
                let loader = NormalLoaderBuilder::new(
                    NormalSpecificConfig::default(),
                    None,
                    None,
                    Some(repo.clone()),
                    false,
                    None,
                )
                .build(None)?;
                (loader, hub_cached_files(repo, None), isq.clone())
            }
        };
    let isq = match &cfg.source {
        ModelSource::Safetensors { isq: Some(q), .. } | ModelSource::Hub { isq: Some(q), .. } => {
            Some(mistralrs_core::parse_isq_value(q, Some(&device)).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };

    let loader: Arc<dyn Loader> = Arc::from(loader);
    let load = |dequantize: bool| {
        let (loader, device, dtype, isq) = (loader.clone(), device.clone(), dtype, isq);
        let id = cfg.id.clone();
        async move {
            // candle decides at load whether to dequantize, from CANDLE_DEQUANTIZE_ALL read
            // once per thread (thread-local): each instance loads on a fresh thread with the
            // variable set for it. Loads run one after the other.
            std::env::set_var("CANDLE_DEQUANTIZE_ALL", if dequantize { "1" } else { "0" });
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name(format!("load-{id}"))
                .spawn(move || {
                    let _ = tx.send(loader.load_model_from_hf(
                        None,
                        TokenSource::None,
                        &dtype,
                        &device,
                        true,
                        DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
                        isq,
                        None,
                    ));
                })
                .context("model loading thread")?;
            rx.await
                .context("model loading thread")?
                .with_context(|| format!("loading model `{id}`"))
        }
    };
    let pipeline = load(dequantize_generation).await?;
    let scoring_pipeline = if separate {
        Some(load(dequantize_scoring).await?)
    } else {
        None
    };

    let (tokenizer, max_seq_len, eos, token_bytes) = {
        let p = pipeline.lock().await;
        let meta = p.get_metadata();
        let tokenizer = p.tokenizer().context("model has no tokenizer")?;
        let trie_bytes = meta.tok_env().map(|env| all_token_bytes(env.tok_trie()));
        (
            tokenizer,
            meta.max_seq_len,
            meta.eos_tok.clone(),
            trie_bytes,
        )
    };
    let architecture = {
        let p = pipeline.lock().await;
        p.name().clone()
    };

    let native = match native_path {
        Some(path) => {
            let (eos, id) = (eos.clone(), cfg.id.clone());
            let kv_cache_bytes = engine.native_kv_cache_mib << 20;
            let native =
                tokio::task::spawn_blocking(move || Native::start(&path, eos, &id, kv_cache_bytes))
                    .await
                    .context("native engine loading thread")?
                    .with_context(|| {
                        format!("loading the native generation engine of `{}`", cfg.id)
                    })?;
            Some(native)
        }
        None => None,
    };
    let max_batch = engine.max_batch.max(1);
    let generations_at_once = if native.is_some() {
        engine.native_max_batch.max(1)
    } else {
        max_batch
    };
    let build = |pipeline| async move {
        let scheduler = SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(NonZeroUsize::new(max_batch).expect("non-zero")),
        };
        MistralRsBuilder::new(pipeline, scheduler, false, None)
            .with_no_prefix_cache(true)
            .build()
            .await
    };
    let mistral = build(pipeline).await;
    let scoring = match scoring_pipeline {
        Some(p) => ScoringOn::Instance(build(p).await),
        None if native_scoring => ScoringOn::Native,
        None => ScoringOn::Generation,
    };
    let native_engine = native.is_some();
    let backend = Backend::new(
        mistral,
        scoring,
        native,
        generations_at_once,
        engine.max_queue,
        Duration::from_millis(engine.settle_ms),
        // Batch lines may use an idle generation engine only where it computes the same
        // logits: the same weights, dequantized alike (a native spare pass runs on the
        // scoring passes' own model).
        if native_scoring || dequantize_generation == dequantize_scoring {
            engine.spare_max_tokens
        } else {
            0
        },
        Duration::from_millis(engine.spare_quiet_ms),
    )?;
    tracing::info!(
        model = %cfg.id,
        scoring_engine = backend.scoring_engine(),
        dequantize_scoring,
        dequantize_generation,
        generation_engine = if native_engine { "native" } else { "mistralrs" },
        generations_at_once,
        "engine instances built"
    );

    let hash_files = weight_files.clone();
    let weights_sha256 = tokio::task::spawn_blocking(move || sha256_files(&hash_files))
        .await
        .context("hashing thread")??;
    let tokenizer_json = tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising tokenizer: {e}"))?;
    let tokenizer_sha256 = hex::encode(Sha256::digest(tokenizer_json.as_bytes()));

    // Warm-up pass: proves the engine answers and measures the logits width (the vocabulary
    // the model scores over, which can exceed the tokenizer's).
    let warm_token = eos.first().copied().unwrap_or(0);
    let vocab_size = backend
        .with_raw_logits(vec![warm_token, warm_token], Lane::Background, |l| l.vocab)
        .await
        .map_err(|e| anyhow::anyhow!("warm-up pass of `{}` failed: {e}", cfg.id))?;

    let token_bytes = token_bytes.unwrap_or_else(|| {
        (0..vocab_size as u32)
            .map(|id| {
                tokenizer
                    .decode(&[id], false)
                    .unwrap_or_default()
                    .into_bytes()
            })
            .collect()
    });

    let architecture = gguf_architecture(&weight_files).unwrap_or(architecture);
    let info = ModelInfo {
        id: cfg.id.clone(),
        architecture,
        quantization: cfg
            .quantization
            .clone()
            .or(quant_label)
            .unwrap_or_else(|| format!("{dtype:?}").to_lowercase()),
        weights_sha256,
        tokenizer_sha256,
        vocab_size,
        context_length: max_seq_len,
        max_top_k: cfg.max_top_k.min(vocab_size),
        licence: cfg.licence.clone(),
    };
    let special_ids = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| id)
        .collect();
    let mut plain = (*tokenizer).clone();
    plain.set_encode_special_tokens(true);
    Ok(Teacher {
        info,
        backend,
        plain_tokenizer: std::sync::Arc::new(plain),
        special_ids,
        digit_start: Default::default(),
        tokenizer,
        token_bytes,
        eos,
        max_new_tokens: engine.max_new_tokens,
    })
}

/// The GGUF file the native generation engine runs, if this model uses it (see
/// `ModelConfig::generation_engine`).
fn native_generation(
    cfg: &ModelConfig,
    on_cpu: bool,
    dtype: ModelDType,
    dequantize_generation: bool,
) -> anyhow::Result<Option<PathBuf>> {
    let path = match &cfg.source {
        ModelSource::Gguf { path } => Some(path),
        _ => None,
    };
    let f32_activations = matches!(dtype, ModelDType::F32);
    let llama = |p: &Path| {
        gguf_architecture(std::slice::from_ref(&p.to_path_buf())).as_deref() == Some("llama")
    };
    let why_not = if !on_cpu {
        Some("it runs on CPU only")
    } else if !path.is_some_and(|p| llama(p)) {
        Some("it needs a local llama-architecture GGUF file")
    } else if !f32_activations {
        Some("it computes in F32 (dtype = f32 or auto)")
    } else if !dequantize_generation {
        Some("it runs dequantized weights (generation_dequantize_on_cpu = true)")
    } else {
        None
    };
    match (cfg.generation_engine, why_not) {
        (GenerationEngine::Mistralrs, _) => Ok(None),
        (GenerationEngine::Auto, Some(_)) => Ok(None),
        (GenerationEngine::Native, Some(why)) => {
            bail!("model `{}`: generation_engine = native, but {why}", cfg.id)
        }
        (_, None) => Ok(path.cloned()),
    }
}

fn parse_device(spec: &str) -> anyhow::Result<mistralrs::Device> {
    match spec {
        "cpu" => Ok(mistralrs::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s.strip_prefix("cuda:").unwrap_or("0").parse()?;
            if cfg!(feature = "cuda") {
                Ok(mistralrs::Device::new_cuda(ordinal)?)
            } else {
                bail!("device `{s}` needs teachd built with `--features cuda`")
            }
        }
        other => bail!("unknown device `{other}` (expected cpu, cuda or cuda:N)"),
    }
}

fn all_token_bytes(trie: &TokTrie) -> Vec<Vec<u8>> {
    (0..trie.vocab_size() as u32)
        .map(|id| {
            let b = trie.token(id);
            if b.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER) {
                b[1..].to_vec()
            } else {
                b.to_vec()
            }
        })
        .collect()
}

/// SHA-256 of one file, or of the concatenated per-file digests (sorted by name) for several.
fn sha256_files(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut digests = Vec::new();
    for f in files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        digests.push(hasher.finalize().to_vec());
    }
    match digests.len() {
        0 => bail!("no weight files found to hash"),
        1 => Ok(hex::encode(&digests[0])),
        _ => {
            let mut outer = Sha256::new();
            for d in digests {
                outer.update(d);
            }
            Ok(hex::encode(outer.finalize()))
        }
    }
}

fn safetensors_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

/// The files of a hub repository as mistralrs cached them (`<hf cache>/models--org--name`).
fn hub_cached_files(repo: &str, file: Option<&str>) -> Vec<PathBuf> {
    let Some(cache) = mistralrs_core::hf_hub_cache_dir() else {
        return Vec::new();
    };
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|snap| {
            std::fs::read_dir(snap.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .filter(|p| match file {
            Some(f) => p.file_name().is_some_and(|n| n == f),
            None => p.extension().is_some_and(|e| e == "safetensors"),
        })
        .collect();
    files.sort();
    files
}

fn read_gguf(path: &Path) -> anyhow::Result<candle_core::quantized::gguf_file::Content> {
    let mut f = std::fs::File::open(path)?;
    Ok(candle_core::quantized::gguf_file::Content::read(&mut f)?)
}

/// The dominant quantization of the 2-D weights, e.g. `Q4_1`.
fn gguf_quantization(path: &Path) -> anyhow::Result<String> {
    let content = read_gguf(path)?;
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for info in content.tensor_infos.values() {
        if info.shape.dims().len() == 2 {
            *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += info.shape.elem_count();
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(name, _)| name.to_uppercase())
        .context("no 2-D tensors")
}

fn gguf_architecture(files: &[PathBuf]) -> Option<String> {
    let path = files
        .first()
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))?;
    let content = read_gguf(path).ok()?;
    content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
}
