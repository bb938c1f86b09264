//! `POST .../contacts/search`: `filterGroups` (filters within a group AND, groups OR), one
//! sort, `properties`, `limit`, the numeric `after` offset, `total`, the 10,000-result cap and
//! the index lag (search sees the version of a contact that was indexed, see
//! [`super::HubSpotState::search_lag`]; archived contacts never appear).
//!
//! Inferred, where HubSpot's documentation says nothing: ties in the sort order, and results
//! without a sort, are in record-id order; text comparisons ignore case; a filter on a property
//! the portal does not define, a sort given as a bare string, an unknown direction and an
//! unparseable date value are refused with 400; a contact without the filtered property
//! matches only `NEQ`, `NOT_IN`, `NOT_CONTAINS_TOKEN` and `NOT_HAS_PROPERTY`; the text of the
//! 400 past the 10,000th result is the fake's own.

use std::cmp::Ordering;
use std::time::Instant;

use serde_json::{Value, json};

use super::HubSpotState;
use super::http::{Reply, error};
use super::properties::{ordering_kind, time_ms};

const OPERATORS: &[&str] = &[
    "EQ",
    "NEQ",
    "LT",
    "LTE",
    "GT",
    "GTE",
    "BETWEEN",
    "IN",
    "NOT_IN",
    "HAS_PROPERTY",
    "NOT_HAS_PROPERTY",
    "CONTAINS_TOKEN",
    "NOT_CONTAINS_TOKEN",
];

/// How a property's values compare.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Number,
    Time,
    Text,
}

#[derive(Debug, Clone, PartialEq, PartialOrd)]
enum Val {
    Num(f64),
    Text(String),
}

fn kind_of(s: &HubSpotState, name: &str) -> Kind {
    match ordering_kind(s, name) {
        Some(true) => Kind::Number,
        Some(false) => Kind::Time,
        None => Kind::Text,
    }
}

fn parse(kind: Kind, v: &str) -> Option<Val> {
    match kind {
        Kind::Number => v.parse::<f64>().ok().map(Val::Num),
        Kind::Time => time_ms(v).map(|ms| Val::Num(ms as f64)),
        Kind::Text => Some(Val::Text(v.to_lowercase())),
    }
}

#[derive(Debug)]
struct Filter {
    property: String,
    operator: String,
    kind: Kind,
    value: Option<Val>,
    high: Option<Val>,
    values: Vec<Val>,
    /// Raw lower-cased token for the token operators.
    token: String,
}

fn scalar(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(t) => Some(t.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn bad(msg: &str) -> Reply {
    error(400, "VALIDATION_ERROR", msg)
}

fn parse_filter(s: &HubSpotState, f: &Value) -> Result<Filter, Reply> {
    let Some(property) = f.get("propertyName").and_then(Value::as_str) else {
        return Err(bad("Every filter needs a propertyName"));
    };
    if !s.properties.contains_key(property) {
        return Err(bad(&format!(
            "There was a problem with the request: property {property} does not exist"
        )));
    }
    let operator = f
        .get("operator")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !OPERATORS.contains(&operator) {
        return Err(bad(&format!(
            "Invalid operator {operator:?}; must be one of {OPERATORS:?}"
        )));
    }
    let kind = kind_of(s, property);
    let value_of = |key: &str| -> Result<Option<Val>, Reply> {
        match scalar(f.get(key)) {
            None => Ok(None),
            Some(raw) => parse(kind, &raw)
                .map(Some)
                .ok_or_else(|| bad(&format!("{raw} is not a valid value for {property}"))),
        }
    };
    let value = value_of("value")?;
    let high = value_of("highValue")?;
    let mut values = Vec::new();
    if let Some(list) = f.get("values").and_then(Value::as_array) {
        for v in list {
            let raw = scalar(Some(v)).unwrap_or_default();
            values.push(
                parse(kind, &raw)
                    .ok_or_else(|| bad(&format!("{raw} is not a valid value for {property}")))?,
            );
        }
    }
    let needs = match operator {
        "BETWEEN" => value.is_some() && high.is_some(),
        "IN" | "NOT_IN" => !values.is_empty(),
        "HAS_PROPERTY" | "NOT_HAS_PROPERTY" => true,
        _ => value.is_some(),
    };
    if !needs {
        return Err(bad(&format!(
            "Operator {operator} on {property} is missing its value(s)"
        )));
    }
    Ok(Filter {
        property: property.to_owned(),
        operator: operator.to_owned(),
        kind,
        token: scalar(f.get("value")).unwrap_or_default().to_lowercase(),
        value,
        high,
        values,
    })
}

fn cmp(a: &Val, b: &Val) -> Option<Ordering> {
    a.partial_cmp(b)
}

fn token_match(text: &str, token: &str) -> bool {
    let text = text.to_lowercase();
    if token.contains('*') {
        let core = token.trim_matches('*');
        return text.contains(core);
    }
    text.split(|c: char| !c.is_alphanumeric() && c != '@' && c != '.')
        .any(|t| t == token)
        || text == token
}

fn matches(f: &Filter, props: &std::collections::BTreeMap<String, String>) -> bool {
    let raw = props.get(&f.property).filter(|v| !v.is_empty());
    match f.operator.as_str() {
        "HAS_PROPERTY" => return raw.is_some(),
        "NOT_HAS_PROPERTY" => return raw.is_none(),
        _ => {}
    }
    let Some(raw) = raw else {
        return matches!(f.operator.as_str(), "NEQ" | "NOT_IN" | "NOT_CONTAINS_TOKEN");
    };
    // A multiple-checkbox value matches EQ / IN when one of its parts does.
    let candidates: Vec<Val> = if f.kind == Kind::Text {
        let mut c: Vec<Val> = raw
            .split(';')
            .map(|p| Val::Text(p.to_lowercase()))
            .collect();
        c.push(Val::Text(raw.to_lowercase()));
        c
    } else {
        parse(f.kind, raw).into_iter().collect()
    };
    let Some(v) = parse(f.kind, raw) else {
        return false;
    };
    let value = f.value.as_ref();
    let with = |want: fn(Ordering) -> bool| value.and_then(|x| cmp(&v, x)).is_some_and(want);
    match f.operator.as_str() {
        "EQ" => value.is_some_and(|x| candidates.contains(x)),
        "NEQ" => value.is_some_and(|x| !candidates.contains(x)),
        "LT" => with(|o| o == Ordering::Less),
        "LTE" => with(|o| o != Ordering::Greater),
        "GT" => with(|o| o == Ordering::Greater),
        "GTE" => with(|o| o != Ordering::Less),
        "BETWEEN" => {
            with(|o| o != Ordering::Less)
                && f.high
                    .as_ref()
                    .and_then(|h| cmp(&v, h))
                    .is_some_and(|o| o != Ordering::Greater)
        }
        "IN" => candidates.iter().any(|c| f.values.contains(c)),
        "NOT_IN" => !candidates.iter().any(|c| f.values.contains(c)),
        "CONTAINS_TOKEN" => token_match(raw, &f.token),
        "NOT_CONTAINS_TOKEN" => !token_match(raw, &f.token),
        _ => false,
    }
}

/// `POST .../contacts/search`.
pub(crate) fn search(s: &mut HubSpotState, body: &Value) -> Reply {
    let groups: Vec<Value> = match body.get("filterGroups") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return bad("filterGroups must be an array"),
    };
    if groups.len() > s.filter_groups_max {
        return bad(&format!(
            "Too many filter groups: {} (the maximum is {})",
            groups.len(),
            s.filter_groups_max
        ));
    }
    let mut parsed: Vec<Vec<Filter>> = Vec::new();
    let mut total_filters = 0;
    for g in &groups {
        let filters = g
            .get("filters")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if filters.len() > s.filters_per_group_max {
            return bad(&format!(
                "Too many filters in a group: {} (the maximum is {})",
                filters.len(),
                s.filters_per_group_max
            ));
        }
        total_filters += filters.len();
        let mut out = Vec::new();
        for f in &filters {
            match parse_filter(s, f) {
                Ok(f) => out.push(f),
                Err(r) => return r,
            }
        }
        parsed.push(out);
    }
    if total_filters > s.filters_total_max {
        return bad(&format!(
            "Too many filters: {total_filters} (the maximum is {})",
            s.filters_total_max
        ));
    }

    let sorts = match body.get("sorts") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return bad("sorts must be an array"),
    };
    if sorts.len() > 1 {
        return bad("Only one sort is supported");
    }
    let sort = match sorts.first() {
        None => None,
        Some(Value::Object(o)) => {
            let Some(p) = o.get("propertyName").and_then(Value::as_str) else {
                return bad("A sort needs a propertyName");
            };
            if !s.properties.contains_key(p) {
                return bad(&format!("Cannot sort by {p}: the property does not exist"));
            }
            let desc = match o.get("direction").and_then(Value::as_str) {
                None | Some("ASCENDING") => false,
                Some("DESCENDING") => true,
                Some(d) => return bad(&format!("Invalid sort direction {d}")),
            };
            Some((p.to_owned(), kind_of(s, p), desc))
        }
        Some(other) => {
            return bad(&format!(
                "A sort must be an object with propertyName and direction, not {other}"
            ));
        }
    };

    let limit = match body.get("limit") {
        None | Some(Value::Null) => 10,
        Some(v) => match v.as_u64().map(|n| n as usize) {
            Some(n) if n >= 1 && n <= s.search_max_limit => n,
            _ => {
                return bad(&format!(
                    "limit must be between 1 and {} (got {v})",
                    s.search_max_limit
                ));
            }
        },
    };
    let after = match body.get("after") {
        None | Some(Value::Null) => 0,
        Some(v) => match scalar(Some(v)).and_then(|t| t.parse::<usize>().ok()) {
            Some(n) => n,
            None => return bad(&format!("Invalid after: {v}")),
        },
    };
    if after.saturating_add(limit) > s.search_result_cap {
        return bad(&format!(
            "There was a problem with the request: search results can only be paged up to {} results (after {after} + limit {limit})",
            s.search_result_cap
        ));
    }
    let query = body
        .get("query")
        .and_then(Value::as_str)
        .map(str::to_lowercase)
        .filter(|q| !q.is_empty());
    let properties: Option<Vec<String>> =
        body.get("properties").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        });

    let now = Instant::now();
    let mut matched: Vec<(Option<Val>, u64)> = Vec::new();
    for c in s.contacts.values() {
        let Some(view) = c.searchable(now) else {
            continue;
        };
        let by_filter =
            parsed.is_empty() || parsed.iter().any(|g| g.iter().all(|f| matches(f, view)));
        let by_query = query.as_ref().is_none_or(|q| {
            ["email", "firstname", "lastname", "phone", "company"]
                .iter()
                .any(|p| {
                    view.get(*p)
                        .is_some_and(|v| v.to_lowercase().contains(q.as_str()))
                })
        });
        if by_filter && by_query {
            let key = sort
                .as_ref()
                .and_then(|(p, k, _)| view.get(p).and_then(|v| parse(*k, v)));
            matched.push((key, c.id));
        }
    }
    if let Some((_, _, desc)) = &sort {
        let desc = *desc;
        matched.sort_by(|(a, ia), (b, ib)| {
            let o = match (a, b) {
                (Some(a), Some(b)) => {
                    let o = a.partial_cmp(b).unwrap_or(Ordering::Equal);
                    if desc { o.reverse() } else { o }
                }
                // Records without the sorted property come last either way.
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            };
            o.then(ia.cmp(ib))
        });
    }
    let total = matched.len();
    let results: Vec<Value> = matched
        .iter()
        .skip(after)
        .take(limit)
        .filter_map(|(_, id)| {
            let c = s.contacts.get(id)?;
            let view = c.searchable(now)?;
            let mut v = c.render(view, properties.as_deref(), None, Some(&s.properties));
            v["archived"] = json!(false);
            Some(v)
        })
        .collect();
    let mut out = json!({"total": total, "results": results});
    if after.saturating_add(limit) < total {
        out["paging"] = json!({"next": {"after": (after + limit).to_string()}});
    }
    Reply::ok(out)
}
