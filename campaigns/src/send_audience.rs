//! A sending's audience applied to a send: its conditions restrict the recipients the source
//! yields. File sources (CSV, Parquet, synthetic) are filtered batch by batch before the
//! decision stages ([`AudienceSource`]); the ERP source gets the conditions as a parameterised
//! WHERE on its query ([`SendAudience::erp`]).
//!
//! Rows outside the audience are not recipients of the send, so they get no decision and no
//! ledger row — exactly as rows an ERP query's WHERE leaves out. The ledger's `row` then counts
//! audience members in source order. Rows the source could not read (already `errored`) are
//! kept: whether they belong to the audience is unknown, and dropping them would hide bad input.

use std::sync::Arc;

use crate::audience::{Condition, Conditions, FieldDef, FieldKind, FieldMap, Scalar, SqlDialect};
use crate::error::{Error, Result};
use arrow_array::{Array, BooleanArray, StringArray};
use broadside_pipeline::model::{Decision, RecipientBatch, RecipientLayout, RowDetail};
use broadside_pipeline::runner::{Source, SourceItem};
use broadside_pipeline::spec::{
    CampaignSpec, ErpAudience, ErpParam, ErpParamType, ErpParamValue, ErpSourceSpec,
};
use xxhash_rust::xxh3::xxh3_64;

/// Allow-listed columns that are a recipient field of another name.
const ALIASES: &[(&str, &str)] = &[("postal_code", "zip")];

/// The fields a sending's conditions may use in a send: the campaign API's allow-list (`allow`,
/// [`FieldMap::member_defaults`] plus `--audience-fields`) restricted to the recipient fields
/// the spec maps. An allowed field's column names a recipient field (`zip` or a merge field such
/// as `points`; `postal_code` stands for `zip`).
pub fn field_map(allow: &FieldMap, layout: &RecipientLayout) -> FieldMap {
    let defs: Vec<FieldDef> = allow
        .defs()
        .filter_map(|d| {
            let has = |c: &str| layout.names().iter().any(|n| n == c);
            let column = if has(&d.column) {
                d.column.as_str()
            } else {
                ALIASES
                    .iter()
                    .find(|(f, c)| *f == d.column && has(c))
                    .map(|(_, c)| *c)?
            };
            Some(FieldDef {
                column: column.to_string(),
                ..d.clone()
            })
        })
        .collect();
    FieldMap::new(defs).expect("layout names of allow-listed fields are plain names")
}

/// The allow-list for conditions: [`FieldMap::member_defaults`] plus the fields of a JSON file
/// (`[{"group": "member_properties", "field": "points", "column": "points", "kind":
/// "integer"}]`), which add to or replace the defaults.
pub fn allowed_fields(file: Option<&std::path::Path>) -> Result<FieldMap> {
    let mut defs: Vec<FieldDef> = FieldMap::member_defaults().defs().cloned().collect();
    let what = match file {
        Some(p) => format!("--audience-fields {}", p.display()),
        None => "the default audience fields".to_string(),
    };
    if let Some(p) = file {
        let text =
            std::fs::read(p).map_err(|e| Error::invalid(&what, format!("reading it: {e}")))?;
        let extra: Vec<FieldDef> = serde_json::from_slice(&text).map_err(|e| {
            Error::invalid(
                &what,
                format!("expected [{{\"group\", \"field\", \"column\", \"kind\"}}, …]: {e}"),
            )
        })?;
        defs.extend(extra);
    }
    FieldMap::new(defs).map_err(|e| Error::invalid(&what, e.to_string()))
}

/// A sending's conditions compiled for one campaign spec.
#[derive(Debug, Clone)]
pub struct SendAudience {
    conditions: Conditions,
    /// Every allowed column: (layout name, batch index, kind).
    columns: Vec<(String, usize, FieldKind)>,
    fingerprint: String,
}

impl SendAudience {
    /// Checks `conditions` against the allowed fields `layout` carries; errors name
    /// `audience.conditions[i].field` (or `.operator`, `.value`).
    pub fn compile(
        conditions: &[Condition],
        allow: &FieldMap,
        layout: &RecipientLayout,
    ) -> Result<SendAudience> {
        let map = field_map(allow, layout);
        // The error names the condition and lists the fields this spec allows.
        let compiled = Conditions::compile(conditions, &map, "audience.conditions")?;
        let columns = map
            .defs()
            .filter_map(|d| {
                let idx = layout.names().iter().position(|n| *n == d.column)?;
                Some((d.column.clone(), idx, d.kind))
            })
            .collect();
        let json = serde_json::to_string(conditions)
            .map_err(|e| Error::invalid("audience.conditions", e.to_string()))?;
        Ok(SendAudience {
            conditions: compiled,
            columns,
            fingerprint: format!("conditions={:016x}", xxh3_64(json.as_bytes())),
        })
    }

    /// What a resumed run must match: a hash of the conditions (values are not repeated in the
    /// run record).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The conditions as a WHERE on an ERP query's result: each recipient field becomes the
    /// quoted source column the spec maps it to, each value a parameter numbered after the
    /// query's own.
    pub fn erp(&self, spec: &CampaignSpec, e: &ErpSourceSpec) -> ErpAudience {
        let mapping = spec.columns.source_columns();
        let column = |layout_name: &str| {
            let source = mapping
                .iter()
                .find(|(l, _)| l == layout_name)
                .map_or(layout_name, |(_, s)| s.as_str());
            format!(
                "{}.{}",
                broadside_sources::erp::ALIAS,
                broadside_sources::erp::quote_ident(source)
            )
        };
        let sql = self
            .conditions
            .to_sql_with(SqlDialect::MsSql, e.params.len() + 1, &column);
        let params = sql
            .params
            .into_iter()
            .map(|p| match p {
                Scalar::Null => ErpParam {
                    sql_type: ErpParamType::Nvarchar,
                    value: None,
                },
                Scalar::Int(i) => ErpParam {
                    sql_type: ErpParamType::Bigint,
                    value: Some(ErpParamValue::Int(i)),
                },
                Scalar::Real(r) => ErpParam {
                    sql_type: ErpParamType::Float,
                    value: Some(ErpParamValue::Float(r)),
                },
                Scalar::Text(t) => ErpParam {
                    sql_type: ErpParamType::Nvarchar,
                    value: Some(ErpParamValue::Text(t)),
                },
            })
            .collect();
        ErpAudience {
            where_sql: sql.where_sql,
            params,
        }
    }

    /// Keeps the rows of a freshly read batch that are in the audience, plus rows the source
    /// already decided (could not read); the others are not recipients and leave the batch.
    pub fn filter(&self, b: RecipientBatch) -> broadside_pipeline::Result<RecipientBatch> {
        let n = b.len();
        let cols: Vec<(&str, &StringArray, FieldKind)> = self
            .columns
            .iter()
            .map(|(name, idx, kind)| (name.as_str(), b.column(*idx), *kind))
            .collect();
        let keep: Vec<bool> = (0..n)
            .map(|i| {
                b.decisions[i] != Decision::Pending
                    || self.conditions.matches(&|col: &str| {
                        // Text cells are copied per compared row: one small allocation per
                        // condition, next to the per-row work of the decision stages.
                        cols.iter().find(|(name, _, _)| *name == col).map_or(
                            Scalar::Null,
                            |(_, a, kind)| {
                                Scalar::from_text(*kind, a.is_valid(i).then(|| a.value(i)))
                            },
                        )
                    })
            })
            .collect();
        if keep.iter().all(|k| *k) {
            return Ok(b);
        }
        if !b.payload.is_empty() || !b.placement_file.is_empty() {
            return Err(audience_error(
                "the audience filter runs on freshly read batches only",
            ));
        }
        let mask = BooleanArray::from(keep.clone());
        let columns = arrow_select::filter::filter_record_batch(&b.columns, &mask)
            .map_err(|e| audience_error(e.to_string()))?;
        let mut out = RecipientBatch::new(b.seq, b.first_row, columns);
        // new index of every kept row
        let mut at = vec![u32::MAX; n];
        let mut j = 0usize;
        for i in 0..n {
            if keep[i] {
                at[i] = j as u32;
                out.decisions[j] = b.decisions[i];
                out.reasons[j] = b.reasons[i];
                out.variants[j] = b.variants[i];
                j += 1;
            }
        }
        if b.lists.len() == n {
            out.lists = (0..n).filter(|i| keep[*i]).map(|i| b.lists[i]).collect();
        }
        out.details = b
            .details
            .into_iter()
            .filter(|d| keep.get(d.row as usize).copied().unwrap_or(false))
            .map(|d| RowDetail {
                row: at[d.row as usize],
                text: d.text,
            })
            .collect();
        if let Some(keys) = &b.keys {
            let k = arrow_select::filter::filter(keys, &mask)
                .map_err(|e| audience_error(e.to_string()))?;
            out.keys = k.as_any().downcast_ref::<StringArray>().cloned();
        }
        Ok(out)
    }
}

fn audience_error(message: impl Into<String>) -> broadside_pipeline::Error {
    broadside_pipeline::Error::Stage {
        stage: "audience".into(),
        message: message.into(),
    }
}

/// A file source restricted to a sending's audience: each batch is filtered where it is
/// decoded (on a worker thread for CSV), before the decision stages. Batches left empty are
/// skipped when the source decodes them itself.
pub struct AudienceSource {
    inner: Box<dyn Source>,
    audience: Arc<SendAudience>,
}

impl AudienceSource {
    /// Wraps a source.
    pub fn new(inner: Box<dyn Source>, audience: Arc<SendAudience>) -> AudienceSource {
        AudienceSource { inner, audience }
    }
}

impl Source for AudienceSource {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn next_batch(&mut self) -> broadside_pipeline::Result<Option<RecipientBatch>> {
        while let Some(b) = self.inner.next_batch()? {
            let b = self.audience.filter(b)?;
            if !b.is_empty() {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    fn next_item(&mut self) -> broadside_pipeline::Result<Option<SourceItem>> {
        loop {
            match self.inner.next_item()? {
                None => return Ok(None),
                Some(SourceItem::Ready(b)) => {
                    let b = self.audience.filter(*b)?;
                    if !b.is_empty() {
                        return Ok(Some(SourceItem::Ready(Box::new(b))));
                    }
                }
                Some(SourceItem::Raw(decode)) => {
                    let audience = self.audience.clone();
                    return Ok(Some(SourceItem::Raw(Box::new(move || {
                        audience.filter(decode()?)
                    }))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::RecordBatch;
    use broadside_pipeline::model::{Reason, StdField};
    use serde_json::json;

    fn layout() -> Arc<RecipientLayout> {
        Arc::new(RecipientLayout::new(
            &[
                StdField::Email,
                StdField::FirstName,
                StdField::Zip,
                StdField::Country,
            ],
            &["points".to_string()],
        ))
    }

    /// (email, first_name, zip, country, points)
    type Row = (
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
    );

    fn batch(rows: &[Row]) -> RecipientBatch {
        let l = layout();
        let col = |f: &dyn Fn(&Row) -> Option<&'static str>| -> arrow_array::ArrayRef {
            Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
        };
        let rb = RecordBatch::try_new(
            l.schema(),
            vec![
                col(&|r| Some(r.0)),
                col(&|r| r.1),
                col(&|r| r.2),
                col(&|r| r.3),
                col(&|r| Some(r.4)),
            ],
        )
        .unwrap();
        RecipientBatch::new(3, 100, rb)
    }

    const ROWS: &[Row] = &[
        ("a@x.no", Some("Ann"), Some("0150"), Some("NO"), "10"),
        ("b@x.no", Some("Bob"), Some("10001"), Some("US"), "20"),
        ("c@x.no", None, Some("10002"), Some("US"), "30"),
        ("d@x.no", Some("O'Brien"), None, Some("IE"), "40"),
        ("e@x.no", Some("Eve"), Some("10003"), None, "50"),
        ("f@x.no", Some("bob"), Some("90210"), Some("US"), "60"),
    ];

    fn audience(conds: serde_json::Value) -> SendAudience {
        let conds: Vec<Condition> = serde_json::from_value(conds).unwrap();
        SendAudience::compile(&conds, &FieldMap::member_defaults(), &layout()).unwrap()
    }

    fn cond(field: &str, op: &str, value: serde_json::Value) -> serde_json::Value {
        let mut c = json!({"condition_group": "member_properties", "field": field, "operator": op});
        if !value.is_null() {
            c["value"] = value;
        }
        c
    }

    fn emails(b: &RecipientBatch) -> Vec<String> {
        let e = b.column(0);
        (0..b.len()).map(|i| e.value(i).to_string()).collect()
    }

    #[test]
    fn the_filter_keeps_exactly_the_matching_rows_in_order() {
        let a = audience(json!([
            cond("country", "eq", json!("US")),
            cond("postal_code", "starts_with", json!("100")),
        ]));
        let out = a.filter(batch(ROWS)).unwrap();
        assert_eq!(emails(&out), ["b@x.no", "c@x.no"]);
        assert_eq!((out.seq, out.first_row), (3, 100));
        assert_eq!(out.columns.num_columns(), 5);
        assert!(out.decisions.iter().all(|d| *d == Decision::Pending));
        assert_eq!(out.variants.len(), 2);

        let a = audience(json!([cond("first_name", "match", json!("BOB"))]));
        assert_eq!(
            emails(&a.filter(batch(ROWS)).unwrap()),
            ["b@x.no", "f@x.no"]
        );
        // a quote in a value is a value like any other
        let a = audience(json!([cond("first_name", "eq", json!("O'Brien"))]));
        assert_eq!(emails(&a.filter(batch(ROWS)).unwrap()), ["d@x.no"]);
        // missing cells fail eq and pass ne / not_set
        let a = audience(json!([cond("country", "ne", json!("US"))]));
        assert_eq!(
            emails(&a.filter(batch(ROWS)).unwrap()),
            ["a@x.no", "d@x.no", "e@x.no"]
        );
        let a = audience(json!([cond("first_name", "not_set", json!(null))]));
        assert_eq!(emails(&a.filter(batch(ROWS)).unwrap()), ["c@x.no"]);
        let none = audience(json!([cond("country", "eq", json!("SE"))]));
        assert!(none.filter(batch(ROWS)).unwrap().is_empty());
        let all = audience(json!([]));
        assert_eq!(all.filter(batch(ROWS)).unwrap().len(), ROWS.len());
    }

    #[test]
    fn merge_fields_allowed_with_a_kind_compare_as_that_kind() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fields.json");
        std::fs::write(
            &file,
            r#"[{"group": "member_properties", "field": "points", "column": "points", "kind": "integer"},
                {"group": "member_properties", "field": "zip_text", "column": "zip", "kind": "text"}]"#,
        )
        .unwrap();
        let allow = allowed_fields(Some(&file)).unwrap();
        let conds: Vec<Condition> = serde_json::from_value(json!([
            cond("points", "gte", json!(9)),
            cond("points", "lt", json!("60")),
        ]))
        .unwrap();
        let a = SendAudience::compile(&conds, &allow, &layout()).unwrap();
        // numbers compare as numbers: as text, "10" … "50" are all below "9"
        assert_eq!(
            emails(&a.filter(batch(ROWS)).unwrap()),
            ["a@x.no", "b@x.no", "c@x.no", "d@x.no", "e@x.no"]
        );
        let mut b = batch(&ROWS[..1]);
        b.columns = RecordBatch::try_new(
            layout().schema(),
            vec![
                Arc::new(StringArray::from(vec!["z@x.no"])),
                Arc::new(StringArray::from(vec![Some("Zed")])),
                Arc::new(StringArray::from(vec![Some("1")])),
                Arc::new(StringArray::from(vec![Some("US")])),
                Arc::new(StringArray::from(vec!["not a number"])),
            ],
        )
        .unwrap();
        assert!(a.filter(b).unwrap().is_empty(), "unparseable is missing");
        // without the file, points is not allowed
        let e = format!(
            "{:#}",
            SendAudience::compile(&conds, &FieldMap::member_defaults(), &layout()).unwrap_err()
        );
        assert!(
            e.contains(
                "audience.conditions[0].field: member_properties.points is not a known field"
            ),
            "{e}"
        );
        std::fs::write(
            &file,
            r#"[{"group": "g", "field": "f", "column": "a b", "kind": "text"}]"#,
        )
        .unwrap();
        let e = format!("{:#}", allowed_fields(Some(&file)).unwrap_err());
        assert!(e.contains("fields.g.f.column"), "{e}");
    }

    #[test]
    fn rows_the_source_could_not_read_stay_with_their_details() {
        let mut b = batch(ROWS);
        b.decide(2, Decision::Errored, Reason::MalformedRow);
        b.details.push(RowDetail {
            row: 2,
            text: "in.csv:4: 3 fields, expected 5".into(),
        });
        b.decide(5, Decision::Errored, Reason::InvalidUtf8);
        b.details.push(RowDetail {
            row: 5,
            text: "in.csv:7: first_name is not UTF-8".into(),
        });
        let a = audience(json!([cond("country", "eq", json!("NO"))]));
        let out = a.filter(b).unwrap();
        assert_eq!(emails(&out), ["a@x.no", "c@x.no", "f@x.no"]);
        assert_eq!(
            out.decisions,
            [Decision::Pending, Decision::Errored, Decision::Errored]
        );
        assert_eq!(
            out.reasons,
            [Reason::None, Reason::MalformedRow, Reason::InvalidUtf8]
        );
        assert_eq!(out.detail(1), Some("in.csv:4: 3 fields, expected 5"));
        assert_eq!(out.detail(2), Some("in.csv:7: first_name is not UTF-8"));
        assert_eq!(out.detail(0), None);
    }

    #[test]
    fn fields_the_spec_does_not_map_are_refused_by_name() {
        let conds: Vec<Condition> = serde_json::from_value(json!([
            cond("country", "eq", json!("US")),
            cond("city", "eq", json!("Oslo")),
        ]))
        .unwrap();
        let e = format!(
            "{:#}",
            SendAudience::compile(&conds, &FieldMap::member_defaults(), &layout()).unwrap_err()
        );
        assert!(
            e.contains("audience.conditions[1].field: member_properties.city is not a known field"),
            "{e}"
        );
        // postal_code is the spec's zip; merge fields are not in the allow-list
        let known: Vec<String> = field_map(&FieldMap::member_defaults(), &layout())
            .defs()
            .map(|d| format!("{}->{}", d.field, d.column))
            .collect();
        assert_eq!(
            known,
            [
                "country->country",
                "email->email",
                "first_name->first_name",
                "postal_code->zip"
            ]
        );
    }

    #[test]
    fn erp_conditions_use_source_columns_and_numbered_parameters() {
        // two parameters of its own (@P1, @P2)
        let mut spec = CampaignSpec::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/erp.toml"),
        )
        .unwrap();
        spec.columns.country = Some("Country Code".into());
        spec.columns.zip = Some("Zip]x".into());
        let broadside_pipeline::spec::SourceSpec::Erp(e) = &spec.source else {
            panic!("erp spec")
        };
        let layout =
            RecipientLayout::new(&[StdField::Email, StdField::Zip, StdField::Country], &[]);
        let conds: Vec<Condition> = serde_json::from_value(json!([
            cond("country", "in", json!(["US", "CA"])),
            cond("postal_code", "eq", json!("x'); DROP TABLE t; --")),
        ]))
        .unwrap();
        let a = SendAudience::compile(&conds, &FieldMap::member_defaults(), &layout)
            .unwrap()
            .erp(&spec, e);
        assert_eq!(
            a.where_sql,
            "(bs_source.[Country Code] IN (@P3, @P4)) AND (bs_source.[Zip]]x] = @P5)"
        );
        assert_eq!(a.params.len(), 3);
        assert_eq!(
            a.params[2].value,
            Some(ErpParamValue::Text("x'); DROP TABLE t; --".into()))
        );
        assert!(a
            .params
            .iter()
            .all(|p| p.sql_type == ErpParamType::Nvarchar));
    }
}
