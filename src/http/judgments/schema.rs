//! Hand-written schemas of the judgment types whose derived ones would be wrong: the request
//! (a flattened closed object) and a batch item (a flattened optional result).

use serde::Serialize;
use utoipa::openapi::schema::{
    AllOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::ToSchema;

use super::{BatchItem, BatchResponse, JudgmentRequest, JudgmentResult, JudgmentSpec, MAX_ITEMS};
use crate::error::ErrorBody;

/// The 200 body of /v1/judgments: one result, or with `items` the batch.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum JudgmentResponse {
    One(JudgmentResult),
    Batch(BatchResponse),
}

impl utoipa::PartialSchema for JudgmentRequest {
    fn schema() -> RefOr<Schema> {
        let RefOr::T(Schema::Object(mut obj)) = <JudgmentSpec as utoipa::PartialSchema>::schema()
        else {
            unreachable!("JudgmentSpec derives an object schema")
        };
        obj.properties.insert(
            "model".into(),
            ObjectBuilder::new().schema_type(Type::String).into(),
        );
        obj.required.insert(0, "model".into());
        obj.properties.insert(
            "items".into(),
            ArrayBuilder::new()
                .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
                .items(Ref::from_schema_name("JudgmentSpec"))
                .min_items(Some(1))
                .max_items(Some(MAX_ITEMS))
                .description(Some(
                    "A batch: each item is one judgment (its fields then stay out of the top level).",
                ))
                .into(),
        );
        obj.description = Some(
            "One judgment (the fields of `JudgmentSpec`), or a batch of them in `items`.".into(),
        );
        #[allow(deprecated)]
        {
            obj.example = Some(
                serde_json::json!({"model": "smollm2-135m-instruct", "mode": "absolute",
                "instruction": "What is 2+2?", "response": "4",
                "rubric": {"criteria": "Is the answer correct?", "scale": [1, 5], "descriptions": {"1": "wrong", "5": "correct"}}}),
            );
        }
        RefOr::T(Schema::Object(obj))
    }
}

impl ToSchema for JudgmentRequest {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((
            JudgmentSpec::name().into(),
            <JudgmentSpec as utoipa::PartialSchema>::schema(),
        ));
        <JudgmentSpec as ToSchema>::schemas(schemas);
    }
}

impl utoipa::PartialSchema for BatchItem {
    fn schema() -> RefOr<Schema> {
        let index = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0))
                .description(Some("Position in `items`."))
        };
        OneOfBuilder::new()
            .item(
                AllOfBuilder::new()
                    .item(Ref::from_schema_name("JudgmentResult"))
                    .item(
                        ObjectBuilder::new()
                            .schema_type(Type::Object)
                            .property("index", index())
                            .required("index"),
                    ),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property("index", index())
                    .required("index")
                    .property("error", Ref::from_schema_name("ErrorBody"))
                    .required("error"),
            )
            .description(Some(
                "One item's outcome: `index` with the result's fields, or `index` with `error`.",
            ))
            .into()
    }
}

impl ToSchema for BatchItem {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((
            JudgmentResult::name().into(),
            <JudgmentResult as utoipa::PartialSchema>::schema(),
        ));
        <JudgmentResult as ToSchema>::schemas(schemas);
        schemas.push((
            ErrorBody::name().into(),
            <ErrorBody as utoipa::PartialSchema>::schema(),
        ));
        <ErrorBody as ToSchema>::schemas(schemas);
    }
}
