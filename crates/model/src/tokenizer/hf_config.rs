//! The parts of a HF `tokenizer_config.json` the tokenizer uses.

use serde_json::Value;

use super::{Result, TokenizerError};

/// What [`super::Tokenizer::with_hf_config`] reads from `tokenizer_config.json`.
#[derive(Debug, Default, PartialEq)]
pub(super) struct HfTokenizerConfig {
    pub(super) chat_template: Option<String>,
    pub(super) bos_token: Option<String>,
    pub(super) eos_token: Option<String>,
    pub(super) add_bos_token: Option<bool>,
    pub(super) add_eos_token: Option<bool>,
}

fn invalid(message: String) -> TokenizerError {
    TokenizerError::InvalidConfig { message }
}

impl HfTokenizerConfig {
    pub(super) fn parse(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let Value::Object(map) = root else {
            return Err(invalid("the top level is not an object".to_owned()));
        };
        Ok(Self {
            chat_template: map
                .get("chat_template")
                .map(chat_template)
                .transpose()?
                .flatten(),
            bos_token: map
                .get("bos_token")
                .map(|v| token("bos_token", v))
                .transpose()?
                .flatten(),
            eos_token: map
                .get("eos_token")
                .map(|v| token("eos_token", v))
                .transpose()?
                .flatten(),
            add_bos_token: map
                .get("add_bos_token")
                .map(|v| flag("add_bos_token", v))
                .transpose()?
                .flatten(),
            add_eos_token: map
                .get("add_eos_token")
                .map(|v| flag("add_eos_token", v))
                .transpose()?
                .flatten(),
        })
    }
}

/// A special token: a string, an `AddedToken` object (`{"content": ...}`) or null.
fn token(field: &str, v: &Value) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(invalid(format!(
                "{field} is an object without a string `content`"
            ))),
        },
        _ => Err(invalid(format!(
            "{field} is not a string or a token object"
        ))),
    }
}

fn flag(field: &str, v: &Value) -> Result<Option<bool>> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        _ => Err(invalid(format!("{field} is not a bool"))),
    }
}

/// `chat_template`: a string, or a list of `{"name", "template"}` of which `default` is taken
/// (else the first).
fn chat_template(v: &Value) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(items) => {
            let named = |item: &Value| -> Result<(Option<String>, String)> {
                let name = item.get("name").and_then(Value::as_str).map(str::to_owned);
                let template = item
                    .get("template")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        invalid("chat_template list entry without a string `template`".to_owned())
                    })?
                    .to_owned();
                Ok((name, template))
            };
            let entries = items.iter().map(named).collect::<Result<Vec<_>>>()?;
            let default = entries
                .iter()
                .find(|(name, _)| name.as_deref() == Some("default"))
                .or_else(|| entries.first());
            Ok(default.map(|(_, t)| t.clone()))
        }
        _ => Err(invalid(
            "chat_template is not a string or a list".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_forms_and_template_lists() {
        let config = HfTokenizerConfig::parse(
            r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true},
                "add_bos_token": true, "add_eos_token": null,
                "chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "D"}]}"#,
        );
        assert_eq!(
            config.ok(),
            Some(HfTokenizerConfig {
                chat_template: Some("D".to_owned()),
                bos_token: Some("<s>".to_owned()),
                eos_token: Some("</s>".to_owned()),
                add_bos_token: Some(true),
                add_eos_token: None,
            })
        );
    }

    #[test]
    fn rejects_bad_types() {
        for text in [
            "[]",
            "{",
            r#"{"bos_token": 3}"#,
            r#"{"eos_token": {"id": 2}}"#,
            r#"{"add_bos_token": "yes"}"#,
            r#"{"chat_template": 7}"#,
            r#"{"chat_template": [{"name": "default"}]}"#,
        ] {
            assert!(
                matches!(
                    HfTokenizerConfig::parse(text),
                    Err(TokenizerError::InvalidConfig { .. })
                ),
                "{text}"
            );
        }
    }
}
