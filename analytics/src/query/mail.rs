//! Where a mailed recipient is now: the ledger's `mail_state` (its state when the run ended)
//! moved on by the printer's tracking events the webhook intake recorded for the piece
//! (`delivered` → Received, `bounced` from a returned piece → Returned; Scheduled becomes Sent
//! first), in event-time order, along the recipient state graph
//! ([`broadside_tracking::tracking::Milestone::transitions`]; docs/recipient-states.md).
//!
//! Tracking events are events of the run (`run_id`) whose id starts with `lob-` and whose
//! `email` is the piece's recipient key; the fold is made when asked, so it always reflects
//! every tracking event in the store, whatever order they arrived in.

use std::collections::HashMap;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use chrono::{DateTime, Utc};
use datafusion::functions::expr_fn::starts_with;
use datafusion::logical_expr::{col, lit, Expr};
use serde::Serialize;

use broadside_tracking::state::RecipientState;
use broadside_tracking::tracking::Milestone;

use crate::query::strings;
use crate::query::{for_each_batch, Catalog, QueryResult, Scope};
use crate::webhook::LOB_EVENT_PREFIX;

/// A mailed recipient's state now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MailStateNow {
    /// The state (`Sent`, `Received`, `Returned`, …).
    pub state: String,
    /// The tracking event that last moved it, if any (`lob-evt_…`).
    pub event_id: Option<String>,
    /// When that event happened.
    pub at: Option<DateTime<Utc>>,
}

/// The state now of each `(key, ledger mail_state)` of run `run_id` in workspace `ws`.
pub async fn current_mail_states(
    catalog: &Catalog,
    ws: &str,
    run_id: &str,
    ledger: &[(String, String)],
) -> QueryResult<HashMap<String, MailStateNow>> {
    let mut now: HashMap<String, (Option<RecipientState>, MailStateNow)> = HashMap::new();
    let mut keys = Vec::new();
    for (key, state) in ledger {
        let view = MailStateNow {
            state: state.clone(),
            event_id: None,
            at: None,
        };
        // States with data (Skipped, Error) are final: tracking does not move them.
        let s = RecipientState::from_name(state);
        if s.is_some() {
            keys.push(lit(key.as_str()));
        }
        now.insert(key.clone(), (s, view));
    }
    if !keys.is_empty() {
        let ctx = catalog.session(&Scope::Workspace(ws.to_string()))?;
        let filter: Expr = col("run_id")
            .eq(lit(run_id))
            .and(starts_with(col("event_id"), lit(LOB_EVENT_PREFIX)))
            .and(col("event_type").in_list(vec![lit("delivered"), lit("bounced")], false))
            .and(col("email").in_list(keys, false));
        let df = ctx
            .table("events")
            .await?
            .filter(filter)?
            .select(vec![
                col("email"),
                col("event_type"),
                col("event_id"),
                col("ts"),
            ])?
            .sort(vec![
                col("ts").sort(true, false),
                col("event_id").sort(true, false),
            ])?;
        for_each_batch(&catalog.limits(), df, |b| {
            let (emails, types, ids) = (
                strings(b, "email")?,
                strings(b, "event_type")?,
                strings(b, "event_id")?,
            );
            let ts = b
                .column_by_name("ts")
                .expect("selected")
                .as_primitive::<TimestampMicrosecondType>();
            for i in 0..b.num_rows() {
                let (Some((Some(state), view)), Some(m)) = (
                    now.get_mut(emails.value(i)),
                    Milestone::of_event_type(types.value(i)),
                ) else {
                    continue;
                };
                // A piece not (yet) sent by the ledger's account keeps its state.
                let Ok(path) = m.transitions(ids.value(i), state) else {
                    continue;
                };
                if let Some(last) = path.last() {
                    *state = last.clone();
                    view.state = last.name().to_string();
                    view.event_id = Some(ids.value(i).to_string());
                    view.at = DateTime::from_timestamp_micros(ts.value(i));
                }
            }
            Ok(())
        })
        .await?;
    }
    Ok(now.into_iter().map(|(k, (_, v))| (k, v)).collect())
}
