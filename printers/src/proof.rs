//! Proofing: a recipient's creative rendered from the campaign's HTML template and its merge
//! variables, as the printer will print it.
//!
//! Templates use `{{name}}` merge tags (spaces inside the braces allowed; names are letters,
//! digits, `_`, `-` and `.`). Values are HTML-escaped. A tag with no value, or a malformed
//! tag, fails the recipient with seed 004's `COULD_NOT_GENERATE_CREATIVE` message naming the
//! tag, rather than printing a card that says "Dear {{first_name}}". A template is parsed once
//! per campaign and rendered per recipient without re-scanning it.

use serde_json::{Map, Value};

use crate::state::{ErrorMessage, RecipientState};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Tag(String),
}

/// A parsed HTML template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Why a creative could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The template itself is broken (found when the campaign is checked, before any recipient).
    #[error("template: {0}")]
    Template(String),
    /// The recipient has no value for a tag the template uses.
    #[error("no value for merge tag {{{{{0}}}}}")]
    MissingVariable(String),
}

impl ProofError {
    /// The recipient's state (from `Proofing`).
    pub fn recipient_state(&self) -> RecipientState {
        RecipientState::error(ErrorMessage::CouldNotGenerateCreative, &self.to_string())
    }
}

impl Template {
    /// Parses a template; a `{{` without its `}}` or an invalid tag name is an error.
    pub fn parse(html: &str) -> Result<Template, ProofError> {
        let mut parts = Vec::new();
        let mut rest = html;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or_else(|| {
                ProofError::Template(format!(
                    "unclosed merge tag at byte {}",
                    html.len() - rest.len() + open
                ))
            })?;
            let name = after[..close].trim();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                return Err(ProofError::Template(format!(
                    "invalid merge tag {{{{{}}}}}",
                    &after[..close]
                )));
            }
            parts.push(Part::Tag(name.to_string()));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The merge tags used, in order of first use.
    pub fn tags(&self) -> Vec<&str> {
        let mut tags: Vec<&str> = Vec::new();
        for p in &self.parts {
            if let Part::Tag(t) = p {
                if !tags.contains(&t.as_str()) {
                    tags.push(t);
                }
            }
        }
        tags
    }

    /// Renders one recipient's creative. Strings are inserted as text, numbers and booleans as
    /// written in JSON; null, arrays and objects count as missing.
    pub fn render(&self, vars: &Map<String, Value>) -> Result<String, ProofError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Tag(name) => match vars.get(name) {
                    Some(Value::String(s)) => escape_into(&mut out, s),
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                        escape_into(&mut out, &v.to_string())
                    }
                    _ => return Err(ProofError::MissingVariable(name.clone())),
                },
            }
        }
        Ok(out)
    }
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_and_escapes() {
        let t = Template::parse("<p>Hi {{ first_name }}, {{points}} points{{x}}</p>").unwrap();
        assert_eq!(t.tags(), ["first_name", "points", "x"]);
        let html = t
            .render(&vars(
                json!({"first_name": "<Zoë & co>", "points": 120, "x": true}),
            ))
            .unwrap();
        assert_eq!(html, "<p>Hi &lt;Zoë &amp; co&gt;, 120 pointstrue</p>");
        assert_eq!(
            Template::parse("no tags").unwrap().render(&Map::new()),
            Ok("no tags".into())
        );
    }

    #[test]
    fn a_missing_value_is_could_not_generate_creative() {
        let t = Template::parse("Dear {{first_name}}").unwrap();
        for v in [
            json!({}),
            json!({"first_name": null}),
            json!({"first_name": [1]}),
        ] {
            let err = t.render(&vars(v)).unwrap_err();
            assert_eq!(err, ProofError::MissingVariable("first_name".into()));
            assert_eq!(
                err.recipient_state(),
                RecipientState::Error {
                    message: "Could not generate creative for recipient: no value for merge tag {{first_name}}".into()
                }
            );
            assert!(RecipientState::Proofing.allowed(&err.recipient_state()));
        }
    }

    #[test]
    fn broken_templates_are_refused() {
        for bad in [
            "Dear {{first_name",
            "{{}}",
            "{{first name}}",
            "{{a}}{{<b>}}",
        ] {
            assert!(
                matches!(Template::parse(bad), Err(ProofError::Template(_))),
                "{bad:?}"
            );
        }
    }
}
