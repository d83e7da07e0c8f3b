//! Request input shared by the teacher handlers: chat messages and their schemas, prompt and
//! stop shapes, and the validators of sampling parameters and stored text.

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::ToSchema;

use crate::engine::{ChatMessage, Teacher};
use crate::error::ApiError;

/// Generation sampling parameters: temperature in [0, 100] (0 = greedy), top_p in (0, 1].
pub fn validate_sampling(temperature: f64, top_p: f64) -> Result<(), ApiError> {
    validate_temperature(temperature, true)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param("top_p", "top_p must be in (0, 1]"));
    }
    Ok(())
}

/// An OpenAI chat message. `content` is a string or an array of `{"type":"text","text":…}`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct Message {
    #[schema(schema_with = role_schema)]
    pub role: String,
    #[schema(schema_with = content_schema)]
    pub content: serde_json::Value,
}

// Schemas of the fields kept as `serde_json::Value` (several JSON shapes, parsed by hand).

fn role_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["system", "user", "assistant", "developer", "tool"]))
        .build()
}

fn content_schema() -> Schema {
    let part = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "type",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["text"])),
        )
        .required("type")
        .property("text", ObjectBuilder::new().schema_type(Type::String))
        .required("text");
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(ArrayBuilder::new().items(part))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "A string, an array of text parts `{\"type\": \"text\", \"text\": ...}`, or null (empty).",
        ))
        .build()
        .into()
}

/// `stop` of the generation endpoints: up to 4 non-empty strings.
pub fn stop_schema() -> Schema {
    let text = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
    };
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(text())
        .item(ArrayBuilder::new().items(text()).max_items(Some(4)))
        .description(Some(
            "A stop sequence or up to 4 of them; generation ends before the first that appears.",
        ))
        .build()
        .into()
}

/// `prompt` of /v1/completions: a string, strings, token ids, or arrays of token ids.
pub fn prompt_schema() -> Schema {
    let id = || {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
            .maximum(Some(u32::MAX))
    };
    let ids = || ArrayBuilder::new().items(id()).min_items(Some(1));
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(
            ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(Type::String))
                .min_items(Some(1)),
        )
        .item(ids())
        .item(ArrayBuilder::new().items(ids()).min_items(Some(1)))
        .description(Some(
            "A string, an array of strings, an array of token ids, or an array of token-id arrays (one choice each).",
        ))
        .build()
        .into()
}

pub fn convert_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "messages must not be empty",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                serde_json::Value::Array(parts) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.get("type").and_then(|t| t.as_str()), part.get("text")) {
                            (Some("text"), Some(serde_json::Value::String(t))) => text.push_str(t),
                            _ => {
                                return Err(ApiError::bad_param(
                                    &format!("messages[{i}].content"),
                                    "only text content parts are supported",
                                ))
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].content"),
                        "content must be a string or an array of text parts",
                    ))
                }
            };
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "developer" | "tool"
            ) {
                return Err(ApiError::bad_param(
                    &format!("messages[{i}].role"),
                    format!("unknown role `{}`", m.role),
                ));
            }
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect()
}

/// Output precision: the model computes in f32, more digits would be noise.
pub fn f(x: f64) -> f32 {
    x as f32
}

/// 400 when a string that goes to PostgreSQL holds U+0000, which `text` cannot store (the
/// insert or query would fail: a 500, or a 503 where storage errors fail closed).
pub fn no_nul(param: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::bad_param(
            param,
            format!("`{param}` must not contain NUL (U+0000)"),
        ));
    }
    Ok(())
}

/// A client-supplied text that is stored: not blank, no NUL, at most `max` characters (so that
/// what one request can make the server store stays bounded).
pub fn stored_text(param: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::bad_param(
            param,
            format!("`{param}` must not be empty"),
        ));
    }
    no_nul(param, value)?;
    if value.chars().count() > max {
        return Err(ApiError::bad_param(
            param,
            format!("`{param}` is longer than {max} characters"),
        ));
    }
    Ok(())
}

/// Smallest temperature accepted (other than 0 = greedy for generation). Below it, `logits / T`
/// leaves the range where the softmax is computed exactly (and `1 / T` overflows near 1e-308).
pub const MIN_TEMPERATURE: f64 = 1e-4;

pub fn validate_temperature(t: f64, allow_zero: bool) -> Result<(), ApiError> {
    if t.is_finite() && t > 0.0 && t < MIN_TEMPERATURE {
        return Err(ApiError::bad_param(
            "temperature",
            format!(
                "temperature must be at least {MIN_TEMPERATURE}{}",
                if allow_zero {
                    " (or 0 for greedy decoding)"
                } else {
                    ""
                }
            ),
        ));
    }
    let ok = t.is_finite() && if allow_zero { t >= 0.0 } else { t > 0.0 } && t <= 100.0;
    if ok {
        Ok(())
    } else if allow_zero {
        Err(ApiError::bad_param(
            "temperature",
            "temperature must be in [0, 100]",
        ))
    } else {
        Err(ApiError::bad_param(
            "temperature",
            "temperature must be in (0, 100]",
        ))
    }
}

pub fn validate_top_k(teacher: &Teacher, k: usize, param: &str) -> Result<(), ApiError> {
    if k > teacher.info.max_top_k {
        return Err(ApiError::bad_param(
            param,
            format!(
                "{param} is {k}; this model's max_top_k is {}",
                teacher.info.max_top_k
            ),
        ));
    }
    Ok(())
}

/// A random seed when the caller gave none.
pub fn seed_or_random(seed: Option<i64>) -> u64 {
    seed.map(|s| s as u64).unwrap_or_else(rand::random)
}
