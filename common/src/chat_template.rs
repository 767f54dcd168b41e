//! HF chat templates rendered with minijinja the way transformers renders them with Jinja2
//! (`transformers.utils.chat_template_utils`): `trim_blocks` and `lstrip_blocks` on, loop
//! controls, Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, …),
//! `raise_exception`, `strftime_now`, a `tojson` that writes what Python's `json.dumps`
//! writes, and the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//! `tools` = none and `documents` = none.
//!
//! Known gap: Python's `'%s' % x` string formatting is not available (minijinja has no
//! operator hook for it); no widely used chat template relies on it.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::tokenizer::TokenizerInfo;
use crate::{Error, Result};

/// One chat turn, with the field names of HF's message dicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (a tokenizer_config.json, a GGUF file, …); the template is
    /// registered under this name so that every minijinja error carries it too.
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `template`. `source` names it in errors.
    pub fn new(
        template: &str,
        source: impl Into<String>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        // The template is named after its source file; a name ending in .json or .html
        // would otherwise switch on minijinja's auto-escaping, which Jinja2 here never does.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(source.clone(), strip_generation_tags(template))
            .map_err(|e| Error::format(&source, format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// The tokenizer's own template, if it has one.
    pub fn from_tokenizer(tok: &TokenizerInfo) -> Result<Option<Self>> {
        tok.chat_template
            .as_deref()
            .map(|t| {
                ChatTemplate::new(
                    t,
                    tok.source.display().to_string(),
                    tok.bos_token.as_deref(),
                    Some(&tok.eos_token),
                )
            })
            .transpose()
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(&self.source)
            .map_err(|e| Error::format(&self.source, format!("chat template: {e}")))?;
        // transformers passes None for bos/eos it does not have; leaving them undefined
        // renders as "" here, where Jinja2 would write "None" into the prompt.
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().map(Value::from).unwrap_or(Value::UNDEFINED),
            eos_token => self.eos_token.as_deref().map(Value::from).unwrap_or(Value::UNDEFINED),
            tools => Value::from(()),
            documents => Value::from(()),
        };
        tmpl.render(ctx)
            .map_err(|e| Error::Data(format!("chat template from {}: {e}", self.source)))
    }
}

/// transformers' `{% generation %}…{% endgeneration %}` tags only mark the assistant text for
/// its mask bookkeeping; they render their body unchanged. They become `{% if true %}` /
/// `{% endif %}` here, keeping any `-`/`+` whitespace markers so trimming stays identical.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open_marker, body) = split_marker_front(inner);
        let (body, close_marker) = split_marker_back(body);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(open_marker);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(close_marker);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn split_marker_front(s: &str) -> (&str, &str) {
    match s.chars().next() {
        Some('-' | '+') => (&s[..1], &s[1..]),
        _ => ("", s),
    }
}

fn split_marker_back(s: &str) -> (&str, &str) {
    match s.chars().last() {
        Some('-' | '+') => (&s[..s.len() - 1], &s[s.len() - 1..]),
        _ => (s, ""),
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current time formatted with Python's strftime codes. transformers
/// uses local time; this uses UTC, which is what a container's local time is.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &fmt)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn strftime(unix_secs: i64, fmt: &str) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let is_leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + u32::from(is_leap && m > 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, so no HTML escaping and Python's spacing
/// (`", "`/`": "` without indent, `","`/`": "` with one).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.is_integer() => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        Some(v) => Some(v.as_str().map(str::to_string).ok_or_else(|| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be an int or a string",
            )
        })?),
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    dump(&value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

fn dump(
    v: &Value,
    o: &JsonOpts,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => out.push_str(&python_float(f64::try_from(v.clone())?)),
        ValueKind::String => json_string(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, level + 1);
                dump(item, o, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort_by_key(|a| a.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, level + 1);
                // Python turns int/bool/None keys into strings; minijinja's to_string matches
                // for ints and strings.
                json_string(&k.to_string(), o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                dump(&v.get_item(k)?, o, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of kind {other} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// Python's `repr(float)` for the common cases: shortest round-trip digits, with `.0` on
/// integral values and an exponent outside [1e-4, 1e16).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{f:e}"); // shortest digits, e.g. "1e20", "1.5e-7"
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_assets::*;
    use serde_json::Value as Json;

    fn messages_of(v: &Json) -> Vec<Message> {
        serde_json::from_value(v.clone()).unwrap()
    }

    /// Renders every fixture conversation and compares with transformers'
    /// apply_chat_template(tokenize=False).
    fn check_against_fixture(tmpl: &ChatTemplate, fx: &Json) {
        let chats = fx["chat"].as_array().unwrap();
        assert!(chats.len() >= 10);
        for c in chats {
            let msgs = messages_of(&c["messages"]);
            let agp = c["add_generation_prompt"].as_bool().unwrap();
            let got = tmpl.render(&msgs, agp).unwrap();
            assert_eq!(
                got,
                c["text"].as_str().unwrap(),
                "{} (add_generation_prompt={agp})",
                c["name"]
            );
        }
    }

    #[test]
    fn smollm2_template_matches_transformers() {
        let fx = read_fixture("tokenizer/smollm2.json");
        let t = ChatTemplate::new(
            fx["chat_template"].as_str().unwrap(),
            "smollm2.gguf",
            fx["bos_token"].as_str(),
            fx["eos_token"].as_str(),
        )
        .unwrap();
        check_against_fixture(&t, &fx);
    }

    fn hf_template(name: &str) -> (ChatTemplate, Json) {
        let fx = read_fixture(&format!("tokenizer/{name}.json"));
        let cfg_path = fixture(&format!("tokenizer/{name}/tokenizer_config.json"));
        let cfg: Json = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        let t = ChatTemplate::new(
            cfg["chat_template"].as_str().unwrap(),
            cfg_path.display().to_string(),
            fx["bos_token"].as_str(),
            fx["eos_token"].as_str(),
        )
        .unwrap();
        (t, fx)
    }

    /// Qwen3's template exercises namespaces, reverse slicing, `.split()[-1]`, `.lstrip()`,
    /// `.startswith()` and `is defined`/`is string` tests.
    #[test]
    fn qwen3_template_matches_transformers() {
        let (t, fx) = hf_template("qwen3");
        check_against_fixture(&t, &fx);
    }

    #[test]
    fn llama3_template_matches_transformers() {
        let (t, fx) = hf_template("llama3");
        check_against_fixture(&t, &fx);
    }

    /// Small templates that each lean on one transformers rendering rule, rendered by
    /// transformers into the fixture.
    #[test]
    fn feature_templates_match_transformers() {
        let fx = read_fixture("tokenizer/template_features.json");
        let cases = fx["cases"].as_array().unwrap();
        assert!(cases.len() >= 5);
        for c in cases {
            let t = ChatTemplate::new(
                c["template"].as_str().unwrap(),
                c["name"].as_str().unwrap(),
                fx["bos_token"].as_str(),
                fx["eos_token"].as_str(),
            )
            .unwrap();
            let got = t.render(
                &messages_of(&c["messages"]),
                c["add_generation_prompt"].as_bool().unwrap(),
            );
            assert_eq!(got.unwrap(), c["text"].as_str().unwrap(), "{}", c["name"]);
        }
    }

    #[test]
    fn raise_exception_names_the_template_source() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('roles must be user/assistant') }}{% endif %}{% endfor %}",
            "/models/x/tokenizer_config.json",
            None,
            Some("</s>"),
        )
        .unwrap();
        let err = t
            .render(&[Message::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/models/x/tokenizer_config.json")
                && err.contains("roles must be user/assistant"),
            "{err}"
        );
        assert!(matches!(t.render(&[Message::new("user", "x")], false), Ok(s) if s.is_empty()));
    }

    #[test]
    fn syntax_error_names_the_template_source() {
        let err = ChatTemplate::new("{% for m in messages %}", "weird.gguf", None, None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("weird.gguf:"), "{err}");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{%- for m in messages -%}{%- generation -%}  [{{ m.content }}]  {%- endgeneration -%}{%- endfor -%}";
        assert_eq!(
            strip_generation_tags(src),
            "{%- for m in messages -%}{%- if true -%}  [{{ m.content }}]  {%- endif -%}{%- endfor -%}"
        );
    }

    /// Reference dates are well-known calendar facts, not outputs of this code.
    #[test]
    fn strftime_known_dates() {
        assert_eq!(
            strftime(0, "%Y-%m-%d %H:%M:%S %A %j"),
            "1970-01-01 00:00:00 Thursday 001"
        );
        // 2000-02-29 12:34:56 UTC, a leap day, was a Tuesday.
        assert_eq!(
            strftime(951_827_696, "%d %b %Y, %a %I:%M %p %y %B %j %%"),
            "29 Feb 2000, Tue 12:34 PM 00 February 060 %"
        );
        // 2024-12-31 was a Tuesday and day 366 of a leap year.
        assert_eq!(strftime(1_735_603_200, "%A %j %e"), "Tuesday 366 31");
    }
}
