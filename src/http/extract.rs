//! Extractors: how a request's parts become typed handler input, with every rejection in the
//! OpenAI error envelope (400/413/415) instead of axum's plain-text rejections.
//!
//! Request bodies are JSON objects all the way down: serde's derived `Deserialize` for a struct
//! also accepts a JSON *array* of the fields in order (`[null, null]` is a valid
//! `JudgmentSpec`), which the contract does not allow. [`Object`] accepts only a JSON object;
//! the `*object` functions apply it to fields through `#[serde(deserialize_with = ...)]` (with
//! `#[serde(default)]` where the field may be absent). The schema is the field's own.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::error::ApiError;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// A `T` that was given as a JSON object (not as an array of its fields).
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        de.deserialize_map(ObjectVisitor(PhantomData)).map(Object)
    }
}

pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(de: D) -> Result<T, D::Error> {
    Object::deserialize(de).map(|o| o.0)
}

pub fn opt_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    de: D,
) -> Result<Option<T>, D::Error> {
    Option::<Object<T>>::deserialize(de).map(|o| o.map(|o| o.0))
}

pub fn vec_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    de: D,
) -> Result<Vec<T>, D::Error> {
    Vec::<Object<T>>::deserialize(de).map(|v| v.into_iter().map(|o| o.0).collect())
}

pub fn opt_vec_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    de: D,
) -> Result<Option<Vec<T>>, D::Error> {
    Option::<Vec<Object<T>>>::deserialize(de)
        .map(|v| v.map(|v| v.into_iter().map(|o| o.0).collect()))
}

/// JSON body extractor whose rejections are rendered in the error envelope (400/413/415),
/// instead of axum's plain-text rejections.
pub struct Json<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        // `Object`: a body that is a JSON array is a 400 even where serde would read a struct
        // from the array of its fields.
        match axum::Json::<Object<T>>::from_request(req, state).await {
            Ok(axum::Json(Object(value))) => Ok(Json(value)),
            Err(JsonRejection::BytesRejection(rej))
                if rej.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::PayloadTooLarge {
                    message: "request body is over the size limit".into(),
                    code: Some("body_too_large"),
                })
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::BadRequest {
                message: "expected `Content-Type: application/json`".into(),
                param: None,
                code: Some("invalid_content_type"),
            }),
            Err(rej) => Err(ApiError::BadRequest {
                message: rej.body_text(),
                param: None,
                code: Some("invalid_json"),
            }),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
/// A path id, or 400 naming the parameter. (axum's `Path<Uuid>` would reject in plain text.)
pub(crate) fn parse_id(param: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_param(param, format!("`{param}` must be a UUID")))
}

/// Deserializes a present field as `Some(value)`, `null` included, so that PATCH can tell
/// "set to null" (`Some(None)`) from "absent" (`None`).
pub(crate) fn double_option<'de, T, D>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(de).map(Some)
}

/// Query-string extractor whose rejections use the error envelope (400), like `error::Json`.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // No text the database stores or compares may hold NUL (Postgres refuses it): a 400
        // here, for every query of every handler, instead of a database error later.
        let query = parts.uri.query().unwrap_or_default().to_ascii_lowercase();
        if query.contains("%00") {
            return Err(ApiError::BadRequest {
                message: "query parameters may not contain NUL characters".into(),
                param: None,
                code: Some("invalid_query"),
            });
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|rej| ApiError::BadRequest {
                message: rej.body_text(),
                param: None,
                code: Some("invalid_query"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(default)]
        a: Option<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[serde(default, deserialize_with = "opt_object")]
        one: Option<Inner>,
        #[serde(default, deserialize_with = "opt_vec_object")]
        many: Option<Vec<Inner>>,
    }

    #[test]
    fn objects_only() {
        let ok: Object<Outer> =
            serde_json::from_str(r#"{"one": {"a": 1}, "many": [{}, {"a": 2}]}"#).unwrap();
        assert_eq!(ok.0.one, Some(Inner { a: Some(1) }));
        assert_eq!(ok.0.many.unwrap().len(), 2);
        let absent: Object<Outer> = serde_json::from_str(r#"{"one": null}"#).unwrap();
        assert!(absent.0.one.is_none() && absent.0.many.is_none());
        // serde alone would take these arrays as the fields in order.
        assert!(serde_json::from_str::<Inner>("[1]").is_ok());
        assert!(serde_json::from_str::<Object<Inner>>("[1]").is_err());
        assert!(serde_json::from_str::<Object<Outer>>(r#"{"one": [1]}"#).is_err());
        assert!(serde_json::from_str::<Object<Outer>>(r#"{"many": [[null]]}"#).is_err());
        assert!(serde_json::from_str::<Object<Outer>>(r#"{"bogus": 1}"#).is_err());
    }
}
