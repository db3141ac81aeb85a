//! Audience and condition JSON as a sending payload carries it: `Recipients::from_json`
//! (audience, inline recipients, channel preference, via `Audience::from_json`), then the
//! conditions compiled against the field allow-list into SQL for each dialect and evaluated
//! on rows. No outside text may reach the SQL: every value must be a parameter.
#![no_main]

use broadside_campaigns::audience::{
    pick_channel, Audience, Conditions, FieldDef, FieldKind, FieldMap, Recipients, Scalar,
    SqlDialect,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn fields() -> FieldMap {
    let mut defs: Vec<FieldDef> = FieldMap::member_defaults().defs().cloned().collect();
    defs.push(FieldDef {
        group: "member_properties".into(),
        field: "score".into(),
        column: "score".into(),
        kind: FieldKind::Real,
    });
    FieldMap::new(defs).unwrap()
}

fn check_sql(conds: &Conditions) {
    for dialect in [SqlDialect::Sqlite, SqlDialect::Postgres, SqlDialect::MsSql] {
        let f = conds.to_sql(dialect);
        let placeholders = match dialect {
            SqlDialect::Sqlite => f.where_sql.matches('?').count(),
            SqlDialect::Postgres => f.where_sql.matches('$').count(),
            SqlDialect::MsSql => f.where_sql.matches("@P").count(),
        };
        assert_eq!(placeholders, f.params.len(), "{}", f.where_sql);
        // The only literal is LIKE's escape character.
        let likes = f.where_sql.matches(" LIKE ").count();
        assert_eq!(
            f.where_sql.matches('\'').count(),
            2 * likes,
            "{}",
            f.where_sql
        );
        let again = conds.to_sql_with(dialect, 7, &|c| format!("t.\"{c}\""));
        assert_eq!(again.params, f.params);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let obj = match v {
        Value::Object(o) => o,
        // A bare audience object or condition list, wrapped as a sending payload would.
        Value::Array(a) => {
            let mut audience = Map::new();
            audience.insert("type".into(), "inline".into());
            audience.insert("conditions".into(), Value::Array(a));
            let mut o = Map::new();
            o.insert("audience".into(), Value::Object(audience));
            o
        }
        _ => return,
    };
    let _ = Audience::from_json(&Value::Object(obj.clone()), "audience");
    let Ok(r) = Recipients::from_json(&obj) else {
        return;
    };
    assert!(!r.channels_preference.is_empty());
    for rec in &r.recipients {
        if rec.member_id.is_none() {
            assert!(pick_channel(&rec.identifiers(), &r.channels_preference).is_some());
        }
        let _ = rec.merge_properties(&Map::new());
    }
    let Some(Audience::Inline { conditions }) = &r.audience else {
        return;
    };
    let Ok(conds) = Conditions::compile(conditions, &fields(), "audience.conditions") else {
        return;
    };
    check_sql(&conds);
    // Rows whose cells are the conditions' own values, and missing ones.
    let cells: Vec<Scalar> = conditions
        .iter()
        .filter_map(|c| c.value.as_ref())
        .map(|v| match v {
            Value::String(s) => Scalar::Text(s.clone()),
            Value::Number(n) => n
                .as_i64()
                .map(Scalar::Int)
                .unwrap_or(Scalar::Real(n.as_f64().unwrap_or(0.0))),
            _ => Scalar::Null,
        })
        .chain([Scalar::Null])
        .collect();
    for cell in &cells {
        let _ = conds.matches(&|_col| cell.clone());
    }
});
