//! A small JSON Schema validator for the event log's schema
//! (docs/events.schema.json), enough to check real log lines in tests and in
//! `agentguard audit verify --schema`.
//!
//! It understands the keywords the events schema uses — `type`, `required`,
//! `properties`, `items`, `enum`, `const`, `minimum`, `pattern`, `allOf`,
//! `if`/`then` — and the annotations (`$schema`, `$id`, `title`,
//! `description`, `$comment`, `additionalProperties: true`). A schema using
//! anything else is refused at parse time, so nothing is silently unchecked.
use std::collections::HashMap;

use regex::Regex;
use serde_json::Value;
use thiserror::Error;

/// The schema of a log line, as shipped in docs/.
pub const EVENTS_SCHEMA: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/events.schema.json"));

const KEYWORDS: &[&str] = &["type", "required", "properties", "items", "enum", "const", "minimum", "pattern", "allOf", "if", "then"];
const ANNOTATIONS: &[&str] = &["$schema", "$id", "title", "description", "$comment", "additionalProperties", "examples"];

#[derive(Debug, Error)]
pub enum SchemaError {
    #[error("the schema is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("schema at {path}: {message}")]
    Unsupported { path: String, message: String },
}

pub struct Schema {
    root: Value,
    patterns: HashMap<String, Regex>,
}

impl Schema {
    pub fn parse(text: &str) -> Result<Self, SchemaError> {
        let root: Value = serde_json::from_str(text)?;
        let mut patterns = HashMap::new();
        check_supported(&root, "#", &mut patterns)?;
        Ok(Self { root, patterns })
    }

    /// The shipped events schema.
    pub fn events() -> Result<Self, SchemaError> {
        Self::parse(EVENTS_SCHEMA)
    }

    /// Every way `v` breaks the schema (empty: valid).
    pub fn validate(&self, v: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.check(&self.root, v, "", &mut errors);
        errors
    }

    fn check(&self, s: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
        let Some(s) = s.as_object() else { return };
        let here = if at.is_empty() { "/" } else { at };
        if let Some(t) = s.get("type") {
            let names: Vec<&str> = match t {
                Value::String(n) => vec![n.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !names.iter().any(|n| type_matches(n, v)) {
                errors.push(format!("{here}: {v} is not of type {}", names.join(" or ")));
                return;
            }
        }
        if let Some(Value::Array(options)) = s.get("enum") {
            if !options.contains(v) {
                errors.push(format!("{here}: {v} is not one of {}", Value::Array(options.clone())));
            }
        }
        if let Some(c) = s.get("const") {
            if c != v {
                errors.push(format!("{here}: {v} is not {c}"));
            }
        }
        if let (Some(min), Some(n)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
            if n < min {
                errors.push(format!("{here}: {n} is below the minimum {min}"));
            }
        }
        if let (Some(Value::String(p)), Some(text)) = (s.get("pattern"), v.as_str()) {
            if self.patterns.get(p).is_some_and(|re| !re.is_match(text)) {
                errors.push(format!("{here}: {text:?} does not match {p}"));
            }
        }
        if let Value::Object(obj) = v {
            if let Some(Value::Array(req)) = s.get("required") {
                for key in req.iter().filter_map(Value::as_str) {
                    if !obj.contains_key(key) {
                        errors.push(format!("{here}: missing required field {key:?}"));
                    }
                }
            }
            if let Some(Value::Object(props)) = s.get("properties") {
                for (key, sub) in props {
                    if let Some(val) = obj.get(key) {
                        self.check(sub, val, &format!("{at}/{key}"), errors);
                    }
                }
            }
        }
        if let (Some(items), Value::Array(arr)) = (s.get("items"), v) {
            for (i, item) in arr.iter().enumerate() {
                self.check(items, item, &format!("{at}/{i}"), errors);
            }
        }
        if let Some(Value::Array(all)) = s.get("allOf") {
            for sub in all {
                self.check(sub, v, at, errors);
            }
        }
        if let Some(cond) = s.get("if") {
            let mut scratch = Vec::new();
            self.check(cond, v, at, &mut scratch);
            if scratch.is_empty() {
                if let Some(then) = s.get("then") {
                    self.check(then, v, at, errors);
                }
            }
        }
    }
}

fn type_matches(name: &str, v: &Value) -> bool {
    match name {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        _ => false,
    }
}

fn check_supported(s: &Value, path: &str, patterns: &mut HashMap<String, Regex>) -> Result<(), SchemaError> {
    let unsupported = |message: String| SchemaError::Unsupported { path: path.to_owned(), message };
    let Some(obj) = s.as_object() else {
        return Err(unsupported("a schema must be an object".into()));
    };
    for (key, val) in obj {
        match key.as_str() {
            "properties" => {
                let props = val.as_object().ok_or_else(|| unsupported("properties must be an object".into()))?;
                for (name, sub) in props {
                    check_supported(sub, &format!("{path}/properties/{name}"), patterns)?;
                }
            }
            "items" | "if" | "then" => check_supported(val, &format!("{path}/{key}"), patterns)?,
            "allOf" => {
                let all = val.as_array().ok_or_else(|| unsupported("allOf must be an array".into()))?;
                for (i, sub) in all.iter().enumerate() {
                    check_supported(sub, &format!("{path}/allOf/{i}"), patterns)?;
                }
            }
            "pattern" => {
                let p = val.as_str().ok_or_else(|| unsupported("pattern must be a string".into()))?;
                let re = Regex::new(p).map_err(|e| unsupported(format!("pattern {p:?}: {e}")))?;
                patterns.insert(p.to_owned(), re);
            }
            "additionalProperties" if val != &Value::Bool(true) => {
                return Err(unsupported("only `additionalProperties: true` is supported".into()));
            }
            k if KEYWORDS.contains(&k) || ANNOTATIONS.contains(&k) => {}
            other => return Err(unsupported(format!("keyword {other:?} is not supported by this validator"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_shipped_schema_uses_only_supported_keywords() {
        Schema::events().expect("docs/events.schema.json parses and is fully understood");
    }

    #[test]
    fn checks_types_required_enums_patterns_and_conditionals() {
        let s = Schema::parse(
            r#"{
              "type": "object",
              "required": ["seq", "kind"],
              "properties": {
                "seq": { "type": "integer", "minimum": 1 },
                "prev": { "type": "string", "pattern": "^[0-9a-f]{4}$" },
                "kind": { "type": "string" },
                "decision": { "type": ["string", "null"], "enum": ["allow", "deny", null] },
                "lineage": { "type": "array", "items": { "type": "integer" } }
              },
              "allOf": [
                { "if": { "properties": { "kind": { "const": "net" } } }, "then": { "required": ["port"] } }
              ]
            }"#,
        )
        .expect("parses");
        assert!(s.validate(&json!({"seq": 1, "kind": "exec", "decision": null, "lineage": [1, 2]})).is_empty());
        let bad = s.validate(&json!({"seq": 0, "prev": "xyz", "decision": "maybe", "lineage": [1, "a"]}));
        // Five, plus the conditional: as in JSON Schema, an `if` on an absent
        // property holds, so `then` applies.
        assert_eq!(bad.len(), 6, "{bad:#?}");
        assert!(bad.iter().any(|e| e.contains("missing required field \"kind\"")));
        let net = s.validate(&json!({"seq": 2, "kind": "net"}));
        assert_eq!(net, vec!["/: missing required field \"port\"".to_owned()]);
        assert!(s.validate(&json!({"seq": 1.5, "kind": "x"}))[0].contains("not of type integer"));
    }

    #[test]
    fn unknown_keywords_are_refused() {
        assert!(matches!(Schema::parse(r#"{"oneOf": []}"#), Err(SchemaError::Unsupported { .. })));
        assert!(matches!(Schema::parse(r#"{"additionalProperties": false}"#), Err(SchemaError::Unsupported { .. })));
        assert!(matches!(Schema::parse(r#"{"pattern": "("}"#), Err(SchemaError::Unsupported { .. })));
    }
}
