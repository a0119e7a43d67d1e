//! Converts protobuf `Struct` values (route metadata, jwt_authn metadata) to JSON.

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

/// A `google.protobuf.Struct` as a JSON object.
pub fn struct_to_json(s: &prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect::<Map<_, _>>(),
    )
}

fn value_to_json(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        // Struct numbers are doubles; whole ones read back as integers so that `timeoutMs: 50`
        // and a numeric claim keep their integer form.
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && *n >= 0.0 && *n < 9.007_199_254_740_992e15 {
                Value::Number(Number::from(*n as u64))
            } else {
                Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_values_convert() {
        let s = prost_types::Struct {
            fields: [
                (
                    "n".to_string(),
                    prost_types::Value {
                        kind: Some(Kind::NumberValue(50.0)),
                    },
                ),
                (
                    "f".to_string(),
                    prost_types::Value {
                        kind: Some(Kind::NumberValue(-1.5)),
                    },
                ),
                (
                    "l".to_string(),
                    prost_types::Value {
                        kind: Some(Kind::ListValue(prost_types::ListValue {
                            values: vec![prost_types::Value {
                                kind: Some(Kind::BoolValue(true)),
                            }],
                        })),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        };
        assert_eq!(
            struct_to_json(&s),
            serde_json::json!({"n": 50, "f": -1.5, "l": [true]})
        );
    }
}
