//! Template checks and creative sync: before a send, each variant's template must only use
//! merge tags the source provides, and the email system must have its current content.
//!
//! A merge tag is `{{name}}` (spaces inside the braces are allowed; a name is letters, digits,
//! `_` and `.`). [`check_merge_tags`] lists every tag that no source column resolves and every
//! unclosed `{{`, with line numbers. [`TemplateSync`] PUTs a template's content to the creative
//! API (`PUT {endpoint}/templates/{name}`, JSON `name`, `content`, `content_hash`, and
//! `sender_domain` when the campaign has one) only when its SHA-256 (with the sender domain)
//! differs from the last content synced; the store remembers both hashes.

use std::collections::BTreeSet;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::db::values;
use crate::store::Store;

/// Hex SHA-256 of a template's content.
pub fn content_hash(content: &str) -> String {
    Sha256::digest(content.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The merge tags a template uses, in order of first use, with their 1-based line; unclosed
/// or malformed tags are errors.
pub fn merge_tags(content: &str) -> std::result::Result<Vec<(String, usize)>, Vec<String>> {
    let mut tags: Vec<(String, usize)> = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let mut rest = line;
        while let Some(open) = rest.find("{{") {
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                problems.push(format!("line {}: unclosed {{{{", i + 1));
                break;
            };
            let name = after[..close].trim();
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
            if !valid {
                problems.push(format!(
                    "line {}: {{{{{name}}}}} is not a merge tag name",
                    i + 1
                ));
            } else if !tags.iter().any(|(t, _)| t == name) {
                tags.push((name.to_string(), i + 1));
            }
            rest = &after[close + 2..];
        }
    }
    if problems.is_empty() {
        Ok(tags)
    } else {
        Err(problems)
    }
}

/// Checks that every merge tag of `content` is one of `columns`; every problem is listed.
pub fn check_merge_tags(name: &str, content: &str, columns: &[&str]) -> Result<Vec<String>> {
    let known: BTreeSet<&str> = columns.iter().copied().collect();
    let tags = merge_tags(content).map_err(|problems| Error::Template {
        name: name.to_string(),
        problems,
    })?;
    let problems: Vec<String> = tags
        .iter()
        .filter(|(t, _)| !known.contains(t.as_str()))
        .map(|(t, line)| {
            let hint = columns
                .iter()
                .find(|c| c.eq_ignore_ascii_case(t))
                .map(|c| format!(" (did you mean {{{{{c}}}}}?)"))
                .unwrap_or_default();
            format!("line {line}: unknown merge tag {{{{{t}}}}}{hint}")
        })
        .collect();
    if problems.is_empty() {
        Ok(tags.into_iter().map(|(t, _)| t).collect())
    } else {
        Err(Error::Template {
            name: name.to_string(),
            problems,
        })
    }
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// The creative API already has this content; nothing was sent.
    Unchanged,
    /// The content was sent.
    Synced {
        /// Its hash.
        content_hash: String,
    },
}

/// One template to sync: its name, its content and the sender domain it is sent from.
#[derive(Debug, Clone, Copy)]
pub struct Template<'a> {
    /// The template's name in the email system.
    pub name: &'a str,
    /// Its content.
    pub content: &'a str,
    /// The campaign's sender domain, if it has one.
    pub sender_domain: Option<&'a str>,
}

/// The email system's creative API.
#[derive(Debug, Clone)]
pub struct TemplateSync {
    /// Base URL (`http://creative.internal/api`).
    pub endpoint: String,
    /// Bearer token, if the API needs one.
    pub token: Option<String>,
}

impl TemplateSync {
    /// Checks `content` against `columns`, records it, and PUTs it to the creative API (with
    /// the campaign's sender domain, if any) when its hash differs from the last synced one. A
    /// failed PUT leaves it unsynced, so the next call tries again.
    ///
    /// The store is used before and after the request, never across it, but the future
    /// borrows it: run it on the thread that owns the store.
    pub async fn sync(
        &self,
        store: &Store,
        ws: &str,
        template: &Template<'_>,
        columns: &[&str],
        now: i64,
    ) -> Result<SyncOutcome> {
        let Template {
            name,
            content,
            sender_domain,
        } = *template;
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid_name {
            return Err(Error::invalid(
                "template",
                format!("{name:?}: names are letters, digits, '_', '-' and '.'"),
            ));
        }
        check_merge_tags(name, content, columns)?;
        // What the email system holds is the content and the domain it is sent from: a new
        // domain syncs again.
        let hash = match sender_domain {
            None => content_hash(content),
            Some(d) => content_hash(&format!("{content}\0sender_domain={d}")),
        };
        let synced = store.save_template(ws, name, content, &hash, now)?;
        if synced.as_deref() == Some(hash.as_str()) {
            return Ok(SyncOutcome::Unchanged);
        }
        let url = format!("{}/templates/{name}", self.endpoint.trim_end_matches('/'));
        let mut body =
            json!({"name": name, "content": content, "content_hash": content_hash(content)});
        if let Some(d) = sender_domain {
            body["sender_domain"] = json!(d);
        }
        let body = body.to_string();
        let fail = |message: String| Error::CreativeSync {
            name: name.to_string(),
            url: url.clone(),
            message,
        };
        let (status, answer) =
            crate::http::send("PUT", &url, "application/json", self.token.as_deref(), body)
                .await
                .map_err(fail)?;
        if !(200..300).contains(&status) {
            return Err(fail(format!("answered {status}: {}", answer.trim())));
        }
        store.mark_template_synced(ws, name, &hash, now)?;
        Ok(SyncOutcome::Synced {
            content_hash: content_hash(content),
        })
    }
}

impl Store {
    /// Records a template's content; returns the hash last synced, if any.
    pub fn save_template(
        &self,
        ws: &str,
        name: &str,
        content: &str,
        hash: &str,
        _now: i64,
    ) -> Result<Option<String>> {
        self.db()
            .query_opt(
                "INSERT INTO templates (workspace_id, name, content, content_hash) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (workspace_id, name) DO UPDATE SET content = excluded.content, content_hash = excluded.content_hash
                 RETURNING synced_hash",
                values![ws, name, content, hash],
            )
            .and_then(|r| r.map_or(Ok(None), |r| r.get(0)))
            .map_err(|e| self.store_error(format!("saving template {name}"), e))
    }

    /// Records that the creative API has the content with `hash`.
    pub fn mark_template_synced(&self, ws: &str, name: &str, hash: &str, now: i64) -> Result<()> {
        self.db()
            .execute(
                "UPDATE templates SET synced_hash = ?3, synced_at = ?4 WHERE workspace_id = ?1 AND name = ?2",
                values![ws, name, hash, now],
            )
            .map_err(|e| self.store_error(format!("marking template {name} synced"), e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_listed_once_with_their_first_line() {
        let t = "Hi {{ first_name }},\nyour {{city}} offer {{first_name}}\n{{ order.total }}";
        assert_eq!(
            merge_tags(t).unwrap(),
            vec![
                ("first_name".into(), 1),
                ("city".into(), 2),
                ("order.total".into(), 3)
            ]
        );
        let bad = merge_tags("ok {{a}}\n{{ two words }}\nand {{unclosed").unwrap_err();
        assert_eq!(
            bad,
            vec![
                "line 2: {{two words}} is not a merge tag name",
                "line 3: unclosed {{"
            ]
        );
    }

    #[test]
    fn unknown_tags_are_reported_with_lines_and_hints() {
        let cols = ["first_name", "City", "email"];
        assert_eq!(
            check_merge_tags("spring", "{{first_name}} {{email}}", &cols).unwrap(),
            vec!["first_name", "email"]
        );
        let e = check_merge_tags("spring", "{{first_name}}\n{{city}} {{voucher}}", &cols)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "template spring: line 2: unknown merge tag {{city}} (did you mean {{City}}?); line 2: unknown merge tag {{voucher}}"
        );
    }
}
