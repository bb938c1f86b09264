//! Synthetic records for the fake Zoho CRM: a module whose records are computed from their
//! index on every request, so a benchmark can serve a million contacts without holding a
//! million `serde_json::Value`s or cloning them per page.
//!
//! Record `i` (`0..count`) is deterministic: id `first_id + i`, `Email` `user{i}@example.test`,
//! `Modified_Time` `start + i` seconds (strictly increasing, so the `Modified_Time` order is the
//! index order and a `page_token` maps back to an index in O(1)), the assert field `true`
//! except for every `unasserted_every`-th record, and a `Language`. Records stored the usual
//! way in the same module (`FakeZoho::insert`, [`FakeZoho::edit_synthetic`]) are served too,
//! merged in `Modified_Time` order, and a stored record shadows the synthetic one with its id.
//!
//! Only what the connector asks for is supported: ascending order (`sort_by=Modified_Time`;
//! the other sorts are served in the same order), `page` (first 2,000) and `page_token`,
//! `If-Modified-Since`, `fields`.

use super::*;

/// A generated record source for one module (see the module docs).
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    pub count: u64,
    /// Id of record 0; record `i` has id `first_id + i`.
    pub first_id: u64,
    /// `Modified_Time` of record 0 (whole seconds); record `i` is `start + i` seconds.
    pub start: DateTime<Utc>,
    /// Every `unasserted_every`-th record (`i % k == k - 1`) has the assert field `false`;
    /// 0 = every record asserts.
    pub unasserted_every: u64,
    /// The boolean field that asserts the list (`Newsletter` in the tests' configs).
    pub assert_field: String,
}

impl SyntheticSource {
    /// `count` records, all modified in the past (the newest a day ago), every 50th not
    /// asserting `Newsletter`.
    pub fn new(count: u64) -> Self {
        let start = now_s() - chrono::Duration::seconds(count as i64 + 86_400);
        Self {
            count,
            first_id: 4_150_868_100_000_000_000,
            start,
            unasserted_every: 50,
            assert_field: "Newsletter".into(),
        }
    }

    pub fn id(&self, i: u64) -> String {
        (self.first_id + i).to_string()
    }

    /// The index of a synthetic id, if it is one.
    pub fn index_of(&self, id: &str) -> Option<u64> {
        let n: u64 = id.parse().ok()?;
        let i = n.checked_sub(self.first_id)?;
        (i < self.count).then_some(i)
    }

    pub fn email(&self, i: u64) -> String {
        format!("user{i}@example.test")
    }

    pub fn modified(&self, i: u64) -> DateTime<Utc> {
        self.start + chrono::Duration::seconds(i as i64)
    }

    pub fn asserted(&self, i: u64) -> bool {
        self.unasserted_every == 0 || i % self.unasserted_every != self.unasserted_every - 1
    }

    pub fn language(&self, i: u64) -> &'static str {
        if i % 4 == 3 { "es" } else { "en" }
    }

    /// Indices of the records that do not assert the list, in order.
    pub fn unasserted(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count).filter(|i| !self.asserted(*i))
    }

    /// Record `i`'s fields (without `Modified_Time`), as it would be stored.
    pub fn fields(&self, i: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), Value::String(self.id(i)));
        m.insert("Email".into(), Value::String(self.email(i)));
        m.insert("First_Name".into(), Value::String(format!("U{i}")));
        m.insert("Last_Name".into(), Value::String(format!("L{i}")));
        m.insert("Email_Opt_Out".into(), Value::Bool(false));
        m.insert(self.assert_field.clone(), Value::Bool(self.asserted(i)));
        m.insert(
            "Language".into(),
            Value::String(self.language(i).to_owned()),
        );
        m
    }

    /// Key of record `i` in the `Modified_Time` order.
    fn key(&self, i: u64) -> (i64, String) {
        (self.modified(i).timestamp(), self.id(i))
    }

    /// First index whose key is after `after`.
    fn first_after(&self, after: &(i64, String)) -> u64 {
        let at = after.0 - self.start.timestamp();
        if at < 0 {
            return 0;
        }
        let at = at as u64;
        if at >= self.count {
            return self.count;
        }
        if self.key(at) > *after { at } else { at + 1 }
    }

    /// First index modified at or after `since` (inclusive, as the fake's `If-Modified-Since`).
    fn first_since(&self, since: DateTime<Utc>) -> u64 {
        let d = since.timestamp() - self.start.timestamp();
        (d.max(0) as u64).min(self.count)
    }

    /// Write record `i` as JSON with `id` and the requested fields (no `Value` in between).
    fn write_json(&self, s: &ZohoState, i: u64, fields: &[&str], out: &mut String) {
        out.push_str("{\"id\":\"");
        out.push_str(&self.id(i));
        out.push('"');
        for f in fields {
            let value = match *f {
                "Email" => format!("\"{}\"", self.email(i)),
                "First_Name" => format!("\"U{i}\""),
                "Last_Name" => format!("\"L{i}\""),
                "Email_Opt_Out" => "false".into(),
                "Language" => format!("\"{}\"", self.language(i)),
                "Modified_Time" => format!("\"{}\"", s.render_time(self.modified(i))),
                f if f == self.assert_field => self.asserted(i).to_string(),
                _ => continue,
            };
            out.push_str(",\"");
            out.push_str(f);
            out.push_str("\":");
            out.push_str(&value);
        }
        out.push('}');
    }
}

impl FakeZoho {
    /// Serve `src`'s records in `module` (created if missing), besides any stored ones.
    pub fn seed_synthetic(&self, module: &str, src: SyntheticSource) {
        let mut s = self.lock();
        s.modules.entry(module.to_owned()).or_default();
        s.synthetic.insert(module.to_owned(), src);
    }

    /// Change fields of synthetic record `index` (as a CRM user would): it is stored from now
    /// on, modified now, and shadows the generated one. Returns its id.
    pub fn edit_synthetic(&self, module: &str, index: u64, changes: Value) -> String {
        let mut s = self.lock();
        let src = s
            .synthetic
            .get(module)
            .unwrap_or_else(|| panic!("no synthetic records in {module}"))
            .clone();
        assert!(index < src.count, "synthetic record {index} out of range");
        let id = src.id(index);
        let records = s.modules.entry(module.to_owned()).or_default();
        let mut fields = records
            .get(&id)
            .map(|r| r.fields.clone())
            .unwrap_or_else(|| src.fields(index));
        if let Value::Object(changes) = changes {
            for (k, v) in changes {
                fields.insert(k, v);
            }
        }
        records.insert(
            id.clone(),
            FakeRecord {
                modified: now_s(),
                fields,
                raw: false,
            },
        );
        id
    }
}

/// A synthetic record as the API shows it (all fields), for `GET /{module}/{id}`.
/// Synthetic record `id` as a stored record (unchanged, its own `Modified_Time`), for a write
/// through the API to change: Zoho updates any record it holds, generated or not.
pub(super) fn stored_form(s: &ZohoState, module: &str, id: &str) -> Option<FakeRecord> {
    let src = s.synthetic.get(module)?;
    let i = src.index_of(id)?;
    Some(FakeRecord {
        modified: src.modified(i),
        fields: src.fields(i),
        raw: false,
    })
}

pub(super) fn find(s: &ZohoState, module: &str, id: &str) -> Option<Value> {
    let src = s.synthetic.get(module)?;
    let i = src.index_of(id)?;
    let mut m = src.fields(i);
    m.insert(
        "Modified_Time".into(),
        Value::String(s.render_time(src.modified(i))),
    );
    Some(Value::Object(m))
}

enum Row<'a> {
    Synthetic(u64),
    Stored(&'a FakeRecord),
}

/// One page of a module with a synthetic source: generated and stored records merged in
/// `Modified_Time` order (ties by id), with the same paging rules as the stored-only list.
#[allow(clippy::too_many_arguments)]
pub(super) fn list_page(
    s: &ZohoState,
    src: &SyntheticSource,
    records: &BTreeMap<String, FakeRecord>,
    module: &str,
    q: &HashMap<String, String>,
    fields: &[&str],
    per_page: usize,
    since: Option<DateTime<Utc>>,
) -> (u16, Response, usize) {
    let err = |status: u16, code: &str, msg: &str, details: Value| {
        (status, envelope(status, code, msg, details), 0)
    };
    let sort_by = q.get("sort_by").map(String::as_str).unwrap_or("id");
    let desc = q.get("sort_order").map(String::as_str) == Some("desc");
    // Synthetic ids and times grow with the index, so every ascending order is the index
    // order; stored records are merged by `Modified_Time` whatever the sort (close enough for
    // the start-up check, which reads one record).
    if desc {
        return err(
            400,
            "INVALID_DATA",
            "synthetic records are listed in ascending order only",
            json!({"param_name": "sort_order"}),
        );
    }
    let bound = token_bound(module, sort_by, desc, since);
    let (after, skip, page) = match page_start(q, &bound, per_page) {
        Ok(PageStart::After(after)) => (Some(after), 0, None),
        Ok(PageStart::Page(page)) => (None, (page - 1) * per_page, Some(page)),
        Err((status, code, msg, details)) => return err(status, code, msg, details),
    };
    let stored_key = |(k, r): &(&String, &FakeRecord)| (r.modified.timestamp(), (*k).clone());
    let mut stored: Vec<(&String, &FakeRecord)> = records
        .iter()
        .filter(|(_, r)| since.is_none_or(|t| r.modified >= t))
        .filter(|row| after.as_ref().is_none_or(|a| stored_key(row) > *a))
        .collect();
    stored.sort_by_key(stored_key);
    let mut next_syn = since.map(|t| src.first_since(t)).unwrap_or(0);
    if let Some(a) = &after {
        next_syn = next_syn.max(src.first_after(a));
    }
    let mut next_stored = 0;
    // Merge the two ordered streams; take one row more than the page to know about `more`.
    let mut rows: Vec<((i64, String), Row<'_>)> = Vec::with_capacity(per_page + 1);
    let mut skipped = 0;
    while rows.len() <= per_page {
        while next_syn < src.count && !records.is_empty() && records.contains_key(&src.id(next_syn))
        {
            next_syn += 1;
        }
        let syn = (next_syn < src.count).then(|| src.key(next_syn));
        let sto = stored.get(next_stored).map(stored_key);
        let row = match (syn, sto) {
            (None, None) => break,
            (Some(a), Some(b)) if b < a => {
                next_stored += 1;
                (b, Row::Stored(stored[next_stored - 1].1))
            }
            (Some(a), _) => {
                next_syn += 1;
                (a, Row::Synthetic(next_syn - 1))
            }
            (None, Some(b)) => {
                next_stored += 1;
                (b, Row::Stored(stored[next_stored - 1].1))
            }
        };
        if skipped < skip {
            skipped += 1;
            continue;
        }
        rows.push(row);
    }
    let more = rows.len() > per_page;
    rows.truncate(per_page);
    if rows.is_empty() {
        let status = if since.is_some() {
            s.not_modified_status
        } else {
            204
        };
        return (status, empty(status), 0);
    }
    let mut data = String::with_capacity(rows.len() * 200);
    for (n, (_, row)) in rows.iter().enumerate() {
        if n > 0 {
            data.push(',');
        }
        match row {
            Row::Synthetic(i) => src.write_json(s, *i, fields, &mut data),
            Row::Stored(r) if r.raw => data.push_str(
                &r.fields
                    .get("__not_an_object")
                    .cloned()
                    .unwrap_or_else(|| Value::Object(r.fields.clone()))
                    .to_string(),
            ),
            Row::Stored(r) => {
                let full = s.render(r);
                let mut out = Map::new();
                out.insert("id".into(), full["id"].clone());
                for f in fields {
                    if let Some(v) = full.get(*f) {
                        out.insert((*f).to_owned(), v.clone());
                    }
                }
                data.push_str(&Value::Object(out).to_string());
            }
        }
    }
    let next_page_token = more.then(|| {
        let (ts, k) = &rows[rows.len() - 1].0;
        encode_token(*ts, k, &bound)
    });
    let n = rows.len();
    let info = json!({
        "per_page": per_page, "count": n, "page": page.unwrap_or(0), "sort_by": sort_by,
        "sort_order": "asc", "more_records": more,
        "next_page_token": next_page_token, "previous_page_token": null,
        "page_token_expiry": next_page_token.as_ref().map(|_| s.render_time(now_s() + chrono::Duration::days(1))),
    });
    let body = format!("{{\"data\":[{data}],\"info\":{info}}}");
    let response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
        body,
    )
        .into_response();
    (200, response, n)
}
