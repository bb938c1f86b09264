//! `fields` / `exclude_fields`: comma-separated dot paths (`members.email_address`); an
//! unknown path is 422 `Requested Fields Invalid`.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::errors::ApiError;

fn paths(q: &HashMap<String, String>, key: &str) -> Vec<Vec<String>> {
    q.get(key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| p.split('.').map(str::to_owned).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `path` names something in `v` (an empty array accepts anything below it).
fn path_valid(v: &Value, path: &[String]) -> bool {
    let Some((head, rest)) = path.split_first() else {
        return true;
    };
    match v {
        Value::Object(m) => m.get(head).is_some_and(|c| path_valid(c, rest)),
        Value::Array(a) => a.first().is_none_or(|x| path_valid(x, path)),
        _ => false,
    }
}

fn keep(v: &Value, include: &[Vec<String>]) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, val) in m {
                let subs: Vec<Vec<String>> = include
                    .iter()
                    .filter(|p| p.first() == Some(k))
                    .map(|p| p[1..].to_vec())
                    .collect();
                if subs.is_empty() {
                    continue;
                }
                if subs.iter().any(Vec::is_empty) {
                    out.insert(k.clone(), val.clone());
                } else {
                    out.insert(k.clone(), keep(val, &subs));
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| keep(x, include)).collect()),
        other => other.clone(),
    }
}

fn drop_path(v: &mut Value, path: &[String]) {
    match v {
        Value::Object(m) => match path {
            [] => {}
            [last] => {
                m.remove(last);
            }
            [head, rest @ ..] => {
                if let Some(c) = m.get_mut(head) {
                    drop_path(c, rest);
                }
            }
        },
        Value::Array(a) => a.iter_mut().for_each(|x| drop_path(x, path)),
        _ => {}
    }
}

/// Apply `fields` / `exclude_fields`; 422 `Requested Fields Invalid` for an unknown path.
pub(super) fn project(v: &Value, q: &HashMap<String, String>) -> Result<Value, ApiError> {
    let include = paths(q, "fields");
    let exclude = paths(q, "exclude_fields");
    if include.iter().chain(&exclude).any(|p| !path_valid(v, p)) {
        return Err(ApiError::new(
            422,
            "Requested Fields Invalid",
            "The fields requested from this resource are invalid.",
        ));
    }
    let mut out = if include.is_empty() {
        v.clone()
    } else {
        keep(v, &include)
    };
    for p in &exclude {
        drop_path(&mut out, p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn projection_keeps_and_drops_paths() {
        let v = json!({"members": [{"id": "a", "status": "x", "merge_fields": {"F": 1}}],
                       "total_items": 1, "list_id": "l"});
        let q: HashMap<String, String> = [(
            "fields".to_owned(),
            "members.id,members.merge_fields.F,total_items".to_owned(),
        )]
        .into();
        assert_eq!(
            project(&v, &q).ok(),
            Some(json!({"members": [{"id": "a", "merge_fields": {"F": 1}}], "total_items": 1}))
        );
        let q: HashMap<String, String> =
            [("exclude_fields".to_owned(), "members.status".to_owned())].into();
        assert_eq!(
            project(&v, &q).ok(),
            Some(json!({"members": [{"id": "a", "merge_fields": {"F": 1}}],
                        "total_items": 1, "list_id": "l"}))
        );
        let q: HashMap<String, String> = [("fields".to_owned(), "members.nope".to_owned())].into();
        assert_eq!(project(&v, &q).err().map(|e| e.status), Some(422));
    }
}
