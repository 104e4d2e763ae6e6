//! Chat templates: a model's Jinja template rendered with minijinja, as transformers'
//! `apply_chat_template` renders it with jinja2.
//!
//! transformers compiles templates in an `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` with the `loopcontrols` extension, a `tojson` filter that is
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, and the
//! globals `raise_exception(message)` and `strftime_now(format)`; it renders with `messages`,
//! `tools` and `documents` (none when not given), `add_generation_prompt` and the special
//! tokens (`bos_token`, `eos_token`). This module sets minijinja up the same way; Python string
//! and dict methods (`.strip()`, `.items()`, ...) come from `minijinja-contrib`'s pycompat.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Rest, ValueKind, from_args};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::{Result, TokenizerError};

/// The name the template is stored under in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever the template accepts).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The marker an error raised by the template's `raise_exception` carries as its source.
#[derive(Debug)]
struct RaisedException;

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for RaisedException {}

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` / `eos_token` are the texts the template sees as
    /// `bos_token` / `eos_token` (undefined when `None`). A syntax error is a
    /// [`TokenizerError::ChatTemplate`].
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(template_error)?;
        Ok(Self {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt`, the template appends the start of an
    /// assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|t| t.render(ctx))
            .map_err(template_error)
    }
}

fn template_error(source: Error) -> TokenizerError {
    let raised = std::error::Error::source(&source).is_some_and(|s| s.is::<RaisedException>());
    let message = match (raised, source.detail()) {
        (true, Some(detail)) => detail.to_owned(),
        _ => source.to_string(),
    };
    TokenizerError::ChatTemplate {
        message,
        raised,
        source,
    }
}

/// `raise_exception(message)`: fails the render with `message`.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message).with_source(RaisedException))
}

/// `strftime_now(format)`: the current UTC time formatted with a subset of `strftime`
/// (`%Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%`).
fn strftime_now(format: &str) -> std::result::Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_time(secs, format).map(Value::from)
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

/// Formats `secs` since the Unix epoch (UTC) with a subset of `strftime`.
fn format_time(secs: u64, format: &str) -> std::result::Result<String, Error> {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3) % 7; // 1970-01-01 was a Thursday; 0 = Monday.
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // Writing to a String cannot fail.
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('a') => write!(out, "{}", &weekday_name[..3]),
            Some('A') => write!(out, "{weekday_name}"),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('%') => write!(out, "%"),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ));
            }
        };
    }
    Ok(out)
}

/// Options of [`tojson`], as Python's `json.dumps` takes them.
struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// The `tojson` filter of transformers: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, arguments positional or by keyword.
fn tojson(value: &Value, args: Rest<Value>) -> std::result::Result<Value, Error> {
    let (positional, kwargs): (&[Value], Kwargs) = from_args(&args)?;
    if positional.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let arg = |index: usize, name: &str| -> std::result::Result<Option<Value>, Error> {
        let by_name: Option<Value> = kwargs.get(name)?;
        Ok(by_name.or_else(|| positional.get(index).cloned()))
    };
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
            ValueKind::Number => Some(" ".repeat(usize::try_from(v)?)),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let (item_separator, key_separator) = match arg(2, "separators")? {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] => match (item.as_str(), key.as_str()) {
                    (Some(item), Some(key)) => (item.to_owned(), key.to_owned()),
                    _ => return Err(separators_error()),
                },
                _ => return Err(separators_error()),
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let options = JsonOptions {
        ensure_ascii,
        indent,
        item_separator,
        key_separator,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, value, &options, 0)?;
    Ok(Value::from(out))
}

fn separators_error() -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        "tojson: separators must be a pair of strings",
    )
}

fn write_json(
    out: &mut String,
    value: &Value,
    options: &JsonOptions,
    depth: usize,
) -> std::result::Result<(), Error> {
    const MAX_DEPTH: usize = 256;
    if depth > MAX_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => write_float(out, f64::try_from(value.clone())?),
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), options),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), options, depth, |out, i| {
                write_json(out, &items[i], options, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
                    ValueKind::None => "null".to_owned(),
                    ValueKind::Bool | ValueKind::Number => {
                        let mut s = String::new();
                        write_json(&mut s, &key, options, depth + 1)?;
                        s
                    }
                    kind => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "tojson: keys must be str, int, float, bool or None, not {kind}"
                            ),
                        ));
                    }
                };
                entries.push((key, item));
            }
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', entries.len(), options, depth, |out, i| {
                let (key, item) = &entries[i];
                write_json_string(out, key, options);
                out.push_str(&options.key_separator);
                write_json(out, item, options, depth + 1)
            })?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    options: &JsonOptions,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> std::result::Result<(), Error>,
) -> std::result::Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &options.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    for i in 0..len {
        if i > 0 {
            out.push_str(&options.item_separator);
        }
        newline(out, depth + 1);
        item(out, i)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// A float as Python's `repr` writes it (`1.0`, `0.1`, `1e-05`, `1e+16`, `NaN`, `Infinity`).
fn write_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
        return;
    }
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    // Shortest round-trip digits and the decimal exponent.
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    out.push_str(sign);
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            out.push_str("0.");
            for _ in 0..-point {
                out.push('0');
            }
            out.push_str(&digits);
        } else {
            let point = point as usize;
            if digits.len() <= point {
                out.push_str(&digits);
                for _ in digits.len()..point {
                    out.push('0');
                }
                out.push_str(".0");
            } else {
                out.push_str(&digits[..point]);
                out.push('.');
                out.push_str(&digits[point..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        );
    }
}

/// A JSON string as Python's `json.dumps` writes it.
fn write_json_string(out: &mut String, s: &str, options: &JsonOptions) {
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
            c if (c as u32) < 0x20 || (options.ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
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

    fn render(source: &str) -> String {
        let template = ChatTemplate::new(source, None, None);
        let rendered = template.and_then(|t| t.render(&[], false));
        match rendered {
            Ok(s) => s,
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn floats_like_python_repr() {
        for (v, want) in [
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e20, "1.2345e+20"),
            (123.456, "123.456"),
            (0.0, "0.0"),
            (f64::INFINITY, "Infinity"),
        ] {
            let mut s = String::new();
            write_float(&mut s, v);
            assert_eq!(s, want, "{v}");
        }
    }

    #[test]
    fn tojson_options() {
        assert_eq!(render("{{ [1, 'a'] | tojson }}"), r#"[1, "a"]"#);
        assert_eq!(
            render("{{ {'k': [1, 2]} | tojson(separators=(',', ':')) }}"),
            r#"{"k":[1,2]}"#
        );
        assert_eq!(
            render("{{ 'é\u{1F600}' | tojson(true) }}"),
            r#""\u00e9\ud83d\ude00""#
        );
        assert_eq!(render("{{ [[]] | tojson(indent='\t') }}"), "[\n\t[]\n]");
        assert!(render("{{ 1 | tojson(foo=1) }}").starts_with("error:"));
    }

    #[test]
    fn strftime_subset() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let secs = 1_709_211_909;
        assert_eq!(
            format_time(secs, "%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %e %%").ok(),
            Some("2024-02-29 13:05:09 Thu Thursday Feb February 060 24 01PM 29 %".to_owned())
        );
        assert_eq!(
            format_time(0, "%d %b %Y").ok(),
            Some("01 Jan 1970".to_owned())
        );
        assert!(format_time(0, "%Q").is_err());
        assert!(render("{{ strftime_now('%Y') }}").len() == 4);
    }

    #[test]
    fn raise_exception_is_marked() {
        let template = ChatTemplate::new("{{ raise_exception('no ' + 'way') }}", None, None);
        match template.and_then(|t| t.render(&[], false)) {
            Err(TokenizerError::ChatTemplate {
                message, raised, ..
            }) => {
                assert_eq!(message, "no way");
                assert!(raised);
            }
            other => panic!("unexpected {other:?}"),
        }
        match ChatTemplate::new("{% for %}", None, None) {
            Err(TokenizerError::ChatTemplate { raised, .. }) => assert!(!raised),
            other => panic!("unexpected {other:?}"),
        }
    }
}
