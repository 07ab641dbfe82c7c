//! Label and field selectors in the API's query syntax (`labelSelector=app=web,tier notin (db)`,
//! `fieldSelector=spec.nodeName=node-a`): parsing with the API server's rules and matching against
//! stored objects.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::validation::{check_label_value, check_qualified_name};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("unable to parse requirement: {0}")]
    LabelRequirement(String),
    #[error("invalid selector: {0:?}; can't understand {1:?}")]
    FieldTerm(String, String),
    #[error("field label not supported: {0}")]
    UnsupportedField(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Splits on commas outside parentheses (`a in (x,y),b` has two terms).
fn split_top_level(input: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&input[start..]);
    terms
}

fn label_key(key: &str) -> Result<String, SelectorError> {
    check_qualified_name(key)
        .map_err(|e| SelectorError::LabelRequirement(format!("key {key:?}: {e}")))?;
    Ok(key.to_string())
}

fn label_value(value: &str) -> Result<String, SelectorError> {
    check_label_value(value).map_err(|e| {
        SelectorError::LabelRequirement(format!("values[0]: Invalid value: {value:?}: {e}"))
    })?;
    Ok(value.to_string())
}

fn value_set(rest: &str, operator: &str) -> Result<BTreeSet<String>, SelectorError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError::LabelRequirement(format!("found {rest:?}, expected: '('")))?;
    let values: BTreeSet<String> = inner
        .split(',')
        .map(|v| label_value(v.trim()))
        .collect::<Result<_, _>>()?;
    if inner.trim().is_empty() {
        return Err(SelectorError::LabelRequirement(format!(
            "for '{operator}' operator, values set can't be empty"
        )));
    }
    Ok(values)
}

fn parse_label_term(term: &str) -> Result<LabelRequirement, SelectorError> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelRequirement::DoesNotExist(label_key(key.trim())?));
    }
    let key_end = term
        .find(|c: char| c.is_whitespace() || c == '=' || c == '!' || c == '(')
        .unwrap_or(term.len());
    let key = label_key(&term[..key_end])?;
    let rest = term[key_end..].trim_start();
    if rest.is_empty() {
        return Ok(LabelRequirement::Exists(key));
    }
    if let Some(value) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
        return Ok(LabelRequirement::Equals(key, label_value(value.trim())?));
    }
    if let Some(value) = rest.strip_prefix("!=") {
        return Ok(LabelRequirement::NotEquals(key, label_value(value.trim())?));
    }
    let word_end = rest
        .find(|c: char| c.is_whitespace() || c == '(')
        .unwrap_or(rest.len());
    match &rest[..word_end] {
        "in" => Ok(LabelRequirement::In(
            key,
            value_set(&rest[word_end..], "in")?,
        )),
        "notin" => Ok(LabelRequirement::NotIn(
            key,
            value_set(&rest[word_end..], "notin")?,
        )),
        other => Err(SelectorError::LabelRequirement(format!(
            "found {other:?}, expected: in, notin, =, ==, !=, gt, lt"
        ))),
    }
}

impl LabelSelector {
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        if input.trim().is_empty() {
            return Ok(Self::default());
        }
        let requirements = split_top_level(input)
            .into_iter()
            .map(|term| parse_label_term(term.trim()))
            .collect::<Result<_, _>>()?;
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Matches the `metadata.labels` of `object`.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements.iter().all(|req| match req {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, set) => label(k).is_some_and(|v| set.contains(v)),
            LabelRequirement::NotIn(k, set) => !label(k).is_some_and(|v| set.contains(v)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    field: String,
    value: String,
    equal: bool,
}

/// A parsed `fieldSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

/// Splits on unescaped `sep` and removes the backslash escapes the field-selector syntax allows.
fn split_unescaped(input: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = input.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    let part = parts.last_mut().expect("parts is never empty");
                    part.push('\\');
                    part.push(next);
                }
            }
            c if c == sep => parts.push(String::new()),
            c => parts.last_mut().expect("parts is never empty").push(c),
        }
    }
    parts
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Finds the first unescaped operator in a field term; returns (field, op, value).
fn split_field_term(term: &str) -> Option<(&str, &'static str, &str)> {
    let bytes = term.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                return Some((&term[..i], "!=", &term[i + 2..]));
            }
            b'=' if bytes.get(i + 1) == Some(&b'=') => {
                return Some((&term[..i], "==", &term[i + 2..]));
            }
            b'=' => return Some((&term[..i], "=", &term[i + 1..])),
            _ => i += 1,
        }
    }
    None
}

impl FieldSelector {
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        if input.trim().is_empty() {
            return Ok(Self::default());
        }
        let requirements = split_unescaped(input, ',')
            .into_iter()
            .map(|term| {
                let (field, op, value) = split_field_term(&term)
                    .ok_or_else(|| SelectorError::FieldTerm(input.to_string(), term.clone()))?;
                Ok(FieldRequirement {
                    field: field.trim().to_string(),
                    value: unescape(value),
                    equal: op != "!=",
                })
            })
            .collect::<Result<_, SelectorError>>()?;
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Rejects fields the resource does not index, as the API server does.
    pub fn check_supported(&self, supported: &[String]) -> Result<(), SelectorError> {
        match self
            .requirements
            .iter()
            .find(|r| !supported.contains(&r.field))
        {
            Some(r) => Err(SelectorError::UnsupportedField(r.field.clone())),
            None => Ok(()),
        }
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.requirements
            .iter()
            .all(|r| (field_value(object, &r.field) == r.value) == r.equal)
    }
}

/// The string form of a selectable field; absent fields read as "" like the API server's field sets.
fn field_value(object: &Value, field: &str) -> String {
    let pointer = format!("/{}", field.replace('.', "/"));
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({ "metadata": { "name": "p", "namespace": "ns", "labels": labels },
                "spec": { "nodeName": "node-a", "hostNetwork": true }, "status": { "phase": "Running" } })
    }

    #[test]
    fn equality_operators() {
        let o = obj(json!({ "app": "web", "tier": "front" }));
        for (sel, expected) in [
            ("app=web", true),
            ("app==web", true),
            ("app = web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app=web,tier=back", false),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                expected,
                "{sel}"
            );
        }
    }

    #[test]
    fn set_and_existence_operators() {
        let o = obj(json!({ "app": "web" }));
        for (sel, expected) in [
            ("app in (web, db)", true),
            ("app in (db)", false),
            ("app notin (db,cache)", true),
            ("app notin (web)", false),
            ("missing notin (web)", true),
            ("missing in (web)", false),
            ("app", true),
            ("!app", false),
            ("! missing", true),
            ("app in (web),!tier", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                expected,
                "{sel}"
            );
        }
    }

    #[test]
    fn bad_label_selectors_are_rejected() {
        for bad in [
            "app in web",
            "app in ()",
            "app ~ x",
            "Bad_Prefix/x=y",
            "app=-bad",
            "=x",
        ] {
            assert!(
                matches!(
                    LabelSelector::parse(bad),
                    Err(SelectorError::LabelRequirement(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        for (sel, expected) in [
            ("spec.nodeName=node-a", true),
            ("spec.nodeName==node-a", true),
            ("spec.nodeName!=node-a", false),
            ("spec.nodeName=node-b", false),
            ("status.phase=Running,metadata.namespace=ns", true),
            ("metadata.name!=q", true),
            ("spec.hostNetwork=true", true),
            ("spec.schedulerName=", true),
        ] {
            assert_eq!(
                FieldSelector::parse(sel).unwrap().matches(&o),
                expected,
                "{sel}"
            );
        }
    }

    #[test]
    fn field_selector_escapes_and_errors() {
        let o = json!({ "metadata": { "name": "a,b=c" } });
        assert!(
            FieldSelector::parse(r"metadata.name=a\,b\=c")
                .unwrap()
                .matches(&o)
        );
        assert!(matches!(
            FieldSelector::parse("spec.nodeName"),
            Err(SelectorError::FieldTerm(_, _))
        ));
        let sel = FieldSelector::parse("spec.color=red").unwrap();
        assert_eq!(
            sel.check_supported(&["metadata.name".to_string()]),
            Err(SelectorError::UnsupportedField("spec.color".into()))
        );
    }
}
