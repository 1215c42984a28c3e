//! Settings read from the environment, once per process.
//!
//! A variable that is set to something unusable leaves the library on its default and yields a
//! diagnostic naming the variable, the value received and the values accepted. The core knows
//! nothing of Python, so it never warns by itself: the bindings turn [`diagnostics`] into Python
//! warnings when `fastdrop` is imported, which also reads every variable then.
//!
//! A new variable is a `OnceLock<Setting<T>>` read with [`read`] beside the code that uses it,
//! plus one line in [`diagnostics`].

/// A setting's value and, when the variable held something unusable, why it was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting<T> {
    pub value: T,
    pub problem: Option<String>,
}

/// Reads the variable `name` with `parse`: unset or blank gives `default` silently; a value that
/// `parse` refuses (its error says what is accepted) gives `default` and a diagnostic that ends
/// "using {shown_default}".
pub fn read<T>(
    name: &str,
    default: T,
    shown_default: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Setting<T> {
    let raw = std::env::var(name).map_err(|e| match e {
        std::env::VarError::NotPresent => None,
        std::env::VarError::NotUnicode(v) => Some(v.to_string_lossy().into_owned()),
    });
    interpret(name, raw, default, shown_default, parse)
}

/// [`read`] on a given value: `Ok(text)` for a set variable, `Err(None)` for an unset one and
/// `Err(Some(lossy text))` for one that is not valid UTF-8 (split out to test without touching
/// the process environment).
fn interpret<T>(
    name: &str,
    raw: Result<String, Option<String>>,
    default: T,
    shown_default: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Setting<T> {
    let outcome = match &raw {
        Ok(v) if v.trim().is_empty() => return Setting::plain(default),
        Ok(v) => parse(v.trim()).map_err(|why| (v.as_str(), why)),
        Err(None) => return Setting::plain(default),
        Err(Some(v)) => Err((v.as_str(), "is not valid UTF-8".to_string())),
    };
    match outcome {
        Ok(value) => Setting::plain(value),
        Err((v, why)) => Setting {
            value: default,
            problem: Some(format!("{name}={v:?} {why}; using {shown_default}")),
        },
    }
}

impl<T> Setting<T> {
    fn plain(value: T) -> Self {
        Setting {
            value,
            problem: None,
        }
    }
}

/// What was wrong with each variable fastdrop reads (reading each one now if it was not yet).
pub fn diagnostics() -> Vec<String> {
    [
        crate::cpu::simd_setting().problem.clone(),
        crate::buffer::cap_setting().problem.clone(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits(v: &str) -> Result<u32, String> {
        v.parse()
            .map_err(|_| "is not a number: expected digits".to_string())
    }

    #[test]
    fn unset_and_blank_are_the_default_and_bad_values_say_why() {
        assert_eq!(interpret("V", Err(None), 7, "7", digits), Setting::plain(7));
        assert_eq!(
            interpret("V", Ok("  ".into()), 7, "7", digits),
            Setting::plain(7)
        );
        assert_eq!(
            interpret("V", Ok(" 12 ".into()), 7, "7", digits),
            Setting::plain(12)
        );
        let bad = interpret("V", Ok("x1".into()), 7, "the default 7", digits);
        assert_eq!(bad.value, 7);
        assert_eq!(
            bad.problem.as_deref(),
            Some("V=\"x1\" is not a number: expected digits; using the default 7")
        );
        let bad = interpret("V", Err(Some("\u{fffd}".into())), 7, "7", digits);
        assert_eq!(
            bad.problem.as_deref(),
            Some("V=\"\u{fffd}\" is not valid UTF-8; using 7")
        );
    }
}
