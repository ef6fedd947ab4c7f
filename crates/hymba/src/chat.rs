//! Chat prompts rendered from the checkpoint's own Jinja template (tokenizer_config.json) with
//! minijinja, configured like Hugging Face's `apply_chat_template`: `trim_blocks`,
//! `lstrip_blocks`, Python string methods such as `.strip()`, a `tojson` that writes what
//! Python's `json.dumps` writes, and `raise_exception`.

use crate::error::{Error, Result};
use minijinja::value::{Value, ValueKind};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// The Jinja text, as given.
    src: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// From the `chat_template` value: a string, or a list of `{name, template}` (the one named
    /// "default" is used).
    pub fn from_json(
        v: &serde_json::Value,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate> {
        let src = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .ok_or_else(|| {
                    Error::Template("`chat_template` list has no template named \"default\"".into())
                })?
                .to_string(),
            _ => {
                return Err(Error::Template(
                    "`chat_template` is neither a string nor a list".into(),
                ))
            }
        };
        ChatTemplate::new(&src, bos_token, eos_token)
    }

    /// The template's Jinja text.
    pub fn source(&self) -> &str {
        &self.src
    }

    pub fn new(src: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", src.to_string())
            .map_err(|e| Error::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            src: src.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Renders `messages` (and `tools`, JSON objects, when given).
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_with(
            messages,
            tools,
            add_generation_prompt,
            &serde_json::Map::new(),
        )
    }

    /// [`Self::render`] with more variables for the template (vLLM's `chat_template_kwargs`),
    /// e.g. Hymba's `contexts`: a list of passages the Instruct template shows the model.
    pub fn render_with(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        const OWN: [&str; 5] = [
            "messages",
            "tools",
            "add_generation_prompt",
            "bos_token",
            "eos_token",
        ];
        if let Some(k) = extra.keys().find(|k| OWN.contains(&k.as_str())) {
            return Err(Error::Template(format!(
                "`{k}` is set by the request itself, not as an extra template variable"
            )));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            ..Value::from_serialize(extra)
        })
        .map_err(|e| Error::Template(format!("{e:#}")))
    }
}

/// `tojson` as Hugging Face defines it: `json.dumps(x, ensure_ascii=False)` with Python's
/// default separators `", "` and `": "`, keys in their given order; `indent` supported.
fn tojson(
    v: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&v, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let (item_sep, key_sep) = if indent.is_some() {
        (",", ": ")
    } else {
        (", ", ": ")
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                // Python writes floats with a fractional part or exponent: 1.0, not 1.
                let s = format!("{f:?}");
                out.push_str(&s);
            }
        }
        ValueKind::String => {
            out.push_str(&serde_json::to_string(v.as_str().unwrap_or_default()).expect("string"))
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(it, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let ks = k
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::to_string(&ks).expect("string"));
                out.push_str(key_sep);
                write_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => out.push_str(&serde_json::to_string(&v.to_string()).expect("string")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_python_json() {
        let t = ChatTemplate::new("{{ x|tojson }}", "<s>", "</s>").unwrap();
        let env = &t.env;
        let out = env
            .render_str("{{ x|tojson }}", minijinja::context! { x => serde_json::json!({"name": "f", "args": [1, 2.5, true, null, "é\"\n"]}) })
            .unwrap();
        assert_eq!(
            out,
            r#"{"name": "f", "args": [1, 2.5, true, null, "é\"\n"]}"#
        );
    }

    #[test]
    fn strip_and_whitespace_control_follow_hf() {
        let src = "{% for m in messages %}\n  {% if true %}{{ m['content'].strip() }}|{% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t
            .render(
                &[Message::new("user", "  hi  "), Message::new("user", "yo\n")],
                None,
                false,
            )
            .unwrap();
        assert_eq!(out, "hi|yo|");
    }
}
