//! The SQL Broadside sends: the campaign's query wrapped with the key order and the shard
//! predicate, its typed parameters, and the fingerprint a resumed run is checked against.

use broadside_pipeline::spec::{
    parse_datetime, parse_decimal, ErpAudience, ErpParam, ErpParamType, ErpParamValue,
    ErpSourceSpec,
};
use tiberius::numeric::Numeric;
use tiberius::Query;
use xxhash_rust::xxh3::xxh3_64;

/// The derived-table alias the campaign query is wrapped in.
pub const ALIAS: &str = "bs_source";

/// `[name]` with `]` doubled: a column name as a T-SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("[{}]", name.replace(']', "]]"))
}

/// `SELECT TOP (n) * FROM (query) AS bs_source`: the result's columns (and a sample) without
/// running the whole query.
pub fn probe_sql(query: &str, limit: u32) -> String {
    format!(
        "SELECT TOP ({limit}) * FROM (\n{}\n) AS {ALIAS}",
        query.trim().trim_end_matches(';')
    )
}

/// The full read: the query in key order, restricted to the audience (a WHERE fragment over
/// `bs_source` whose values are parameters, see [`ErpAudience`]). A shard reads the whole
/// result and keeps its recipients (see `Shard::holds`): the shard is decided on the recipient
/// key normalised exactly as the pipeline does, which no T-SQL expression reproduces.
pub fn read_sql(query: &str, key: &str, audience: Option<&ErpAudience>) -> String {
    let mut sql = format!(
        "SELECT * FROM (\n{}\n) AS {ALIAS}",
        query.trim().trim_end_matches(';')
    );
    if let Some(a) = audience {
        sql.push_str(&format!("\nWHERE ({})", a.where_sql));
    }
    sql.push_str(&format!("\nORDER BY {ALIAS}.{}", quote_ident(key)));
    sql
}

/// The parameters of the full read: the spec's, then the audience's (whose placeholders are
/// numbered after the spec's).
pub fn read_params(e: &ErpSourceSpec) -> Vec<ErpParam> {
    let mut all = e.params.clone();
    if let Some(a) = &e.audience {
        all.extend(a.params.iter().cloned());
    }
    all
}

/// A query with the spec's parameters bound as `@P1`, `@P2`, … (checked by spec validation).
pub fn bind<'a>(sql: String, params: &'a [ErpParam]) -> Query<'a> {
    let mut q = Query::new(sql);
    for p in params {
        use ErpParamType as T;
        use ErpParamValue as V;
        match (p.sql_type, &p.value) {
            (T::Bit, Some(V::Bool(b))) => q.bind(*b),
            (T::Bit, _) => q.bind(None::<bool>),
            (T::Int, Some(V::Int(i))) => q.bind(*i as i32),
            (T::Int, _) => q.bind(None::<i32>),
            (T::Bigint, Some(V::Int(i))) => q.bind(*i),
            (T::Bigint, _) => q.bind(None::<i64>),
            (T::Float, Some(V::Float(f))) => q.bind(*f),
            (T::Float, Some(V::Int(i))) => q.bind(*i as f64),
            (T::Float, _) => q.bind(None::<f64>),
            (T::Decimal, Some(V::Text(t))) => match parse_decimal(t) {
                Some((v, s)) => q.bind(Numeric::new_with_scale(v, s)),
                None => q.bind(None::<Numeric>),
            },
            (T::Decimal, _) => q.bind(None::<Numeric>),
            (T::Nvarchar, Some(V::Text(t))) => q.bind(t.as_str()),
            (T::Nvarchar, _) => q.bind(None::<&str>),
            (T::Date, Some(V::Text(t))) => {
                q.bind(chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d").ok())
            }
            (T::Date, _) => q.bind(None::<chrono::NaiveDate>),
            (T::Datetime2, Some(V::Text(t))) => q.bind(parse_datetime(t)),
            (T::Datetime2, _) => q.bind(None::<chrono::NaiveDateTime>),
            (T::Uniqueidentifier, Some(V::Text(t))) => {
                q.bind(uuid::Uuid::parse_str(t.trim_matches(|c| c == '{' || c == '}')).ok())
            }
            (T::Uniqueidentifier, _) => q.bind(None::<uuid::Uuid>),
        }
    }
    q
}

/// What identifies the rows a run reads: server, database, a hash of the query text, its
/// parameters and key, the audience, and the shard. A resumed run whose fingerprint differs is
/// refused.
pub fn fingerprint(e: &ErpSourceSpec) -> String {
    let params = serde_json::to_string(&e.params).unwrap_or_default();
    let h = xxh3_64(format!("{}\u{0}{params}\u{0}{}", e.query, e.key_column).as_bytes());
    let shard = e.shard.map_or_else(|| "all".to_string(), |s| s.to_string());
    // Appended only with an audience, so runs recorded before audiences existed still resume.
    let audience = match &e.audience {
        None => String::new(),
        Some(a) => {
            let params = serde_json::to_string(&a.params).unwrap_or_default();
            format!(
                " audience={:016x}",
                xxh3_64(format!("{}\u{0}{params}", a.where_sql).as_bytes())
            )
        }
    };
    format!(
        "erp {} query={h:016x} key={} shard={shard}{audience}",
        e.server(),
        e.key_column
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use broadside_pipeline::spec::Shard;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("Customer Id"), "[Customer Id]");
        assert_eq!(quote_ident("a]b"), "[a]]b]");
    }

    #[test]
    fn the_read_orders_by_the_key() {
        let q = "SELECT Id, Email FROM dbo.Customers WHERE Active = @P1;";
        let full = read_sql(q, "Id", None);
        assert!(
            full.ends_with(") AS bs_source\nORDER BY bs_source.[Id]"),
            "{full}"
        );
        assert!(!full.contains(';'), "{full}");
    }

    #[test]
    fn the_audience_is_a_where_with_parameters_before_the_order() {
        let q = "SELECT Id, Country FROM dbo.Customers WHERE Active = @P1";
        let a = ErpAudience {
            where_sql: "(bs_source.[Country] = @P2)".into(),
            params: vec![ErpParam {
                sql_type: ErpParamType::Nvarchar,
                value: Some(ErpParamValue::Text("O'Brien".into())),
            }],
        };
        let sql = read_sql(q, "Id", Some(&a));
        assert!(
            sql.ends_with(
                ") AS bs_source\nWHERE ((bs_source.[Country] = @P2))\nORDER BY bs_source.[Id]"
            ),
            "{sql}"
        );
        assert!(!sql.contains("Brien"), "values are parameters: {sql}");
        let mut e = spec("SELECT Id FROM t");
        e.params.push(ErpParam {
            sql_type: ErpParamType::Int,
            value: Some(ErpParamValue::Int(1)),
        });
        e.audience = Some(a);
        let all = read_params(&e);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].value, Some(ErpParamValue::Text("O'Brien".into())));
    }

    fn spec(query: &str) -> ErpSourceSpec {
        toml::from_str(&format!(
            "host = \"h\"\ndatabase = \"d\"\nuser = \"u\"\npassword_env = \"P\"\nkey_column = \"Id\"\nquery = \"{query}\""
        ))
        .unwrap()
    }

    #[test]
    fn the_fingerprint_changes_with_query_params_and_shard() {
        let a = spec("SELECT Id FROM t");
        let mut b = a.clone();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b.query.push_str(" WHERE Id > 1");
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let mut c = a.clone();
        c.shard = Some(Shard { index: 1, count: 2 });
        assert_ne!(fingerprint(&a), fingerprint(&c));
        assert!(fingerprint(&c).contains("shard=1/2"));
        let mut d = a.clone();
        d.params.push(ErpParam {
            sql_type: ErpParamType::Int,
            value: Some(ErpParamValue::Int(1)),
        });
        assert_ne!(fingerprint(&a), fingerprint(&d));
        assert!(!fingerprint(&a).contains("SELECT"));
        let aud = |v: &str| ErpAudience {
            where_sql: "(bs_source.[Country] = @P1)".into(),
            params: vec![ErpParam {
                sql_type: ErpParamType::Nvarchar,
                value: Some(ErpParamValue::Text(v.into())),
            }],
        };
        let mut us = a.clone();
        us.audience = Some(aud("US"));
        let mut no = a.clone();
        no.audience = Some(aud("NO"));
        assert_ne!(fingerprint(&a), fingerprint(&us));
        assert_ne!(fingerprint(&us), fingerprint(&no));
        assert!(!fingerprint(&us).contains("US"), "{}", fingerprint(&us));
    }
}
