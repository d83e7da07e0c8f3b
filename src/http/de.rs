//! Request bodies are JSON objects all the way down.
//!
//! serde's derived `Deserialize` for a struct also accepts a JSON *array* of the fields in
//! order (`[null, null]` is a valid `JudgmentSpec`), which the contract does not allow: a body
//! or a nested object given as an array must be a 400. [`Object`] accepts only a JSON object;
//! the `*object` functions apply it to fields through `#[serde(deserialize_with = ...)]`
//! (with `#[serde(default)]` where the field may be absent). The schema is the field's own.

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
