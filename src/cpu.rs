//! `FASTDROP_SIMD`: one switch, read once, for both SIMD choices, the generator's backend
//! (`rng::backend`) and the element loops' instruction set (`kernel::isa`). Every path gives the
//! same bits; the switch exists to rule a path out or to benchmark it.

use crate::env::{self, Setting};
use std::sync::OnceLock;

/// The variable's name.
pub const SIMD_VAR: &str = "FASTDROP_SIMD";

/// What `FASTDROP_SIMD` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// The fastest paths this CPU runs (the default).
    Auto,
    /// No SIMD anywhere: the portable generator and element loops (`scalar` is an alias).
    Portable,
    /// The generator on AES-NI at most (not VAES); the element loops as `Auto`.
    AesNi,
    /// The generator on VAES if the CPU has it; the element loops as `Auto`.
    Vaes,
}

/// Parses a `FASTDROP_SIMD` value (case and surrounding blanks ignored).
pub fn parse_simd(value: &str) -> Result<Simd, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(Simd::Auto),
        "portable" | "scalar" => Ok(Simd::Portable),
        "aesni" => Ok(Simd::AesNi),
        "vaes" => Ok(Simd::Vaes),
        _ => Err("is not a SIMD choice: expected auto, portable (or scalar), aesni or vaes".into()),
    }
}

/// The setting, read once; an unknown value means `auto` (and a diagnostic, see `env`).
pub fn simd_setting() -> &'static Setting<Simd> {
    static SETTING: OnceLock<Setting<Simd>> = OnceLock::new();
    SETTING.get_or_init(|| env::read(SIMD_VAR, Simd::Auto, "auto", parse_simd))
}

/// What `FASTDROP_SIMD` asks for.
pub fn simd() -> Simd {
    simd_setting().value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_values_and_nothing_else_parse() {
        for (v, want) in [
            ("auto", Simd::Auto),
            ("portable", Simd::Portable),
            (" Scalar ", Simd::Portable),
            ("PORTABLE", Simd::Portable),
            ("aesni", Simd::AesNi),
            ("vaes", Simd::Vaes),
        ] {
            assert_eq!(parse_simd(v), Ok(want), "{v}");
        }
        for v in ["bogus", "avx2", "", "vaes2", "none"] {
            let e = parse_simd(v).unwrap_err();
            assert!(
                e.contains("auto, portable (or scalar), aesni or vaes"),
                "{e}"
            );
        }
    }
}
