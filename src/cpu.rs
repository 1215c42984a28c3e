//! What the CPU offers and what fastdrop may use of it, each decided once per process: the
//! instruction-set extensions this CPU has ([`features`], probed once for every caller), and
//! `FASTDROP_SIMD` ([`simd`]), one switch for both SIMD choices, the generator's backend
//! (`rng::backend`) and the element loops' instruction set ([`isa`]). Every path gives the same
//! bits; the switch exists to rule a path out or to benchmark it.

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

/// The x86-64 extensions fastdrop has paths for (all false elsewhere).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub aes: bool,
    pub sse41: bool,
    pub vaes: bool,
    pub avx2: bool,
    pub f16c: bool,
    /// AVX-512 Foundation: with `vaes`, the generator's VAES backend draws four blocks per
    /// instruction instead of two.
    pub avx512f: bool,
}

/// What this CPU has, probed once because `is_x86_feature_detected!` is not free and the answer
/// cannot change while the process runs.
pub fn features() -> Features {
    static DETECTED: OnceLock<Features> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            Features {
                aes: std::is_x86_feature_detected!("aes"),
                sse41: std::is_x86_feature_detected!("sse4.1"),
                vaes: std::is_x86_feature_detected!("vaes"),
                avx2: std::is_x86_feature_detected!("avx2"),
                f16c: std::is_x86_feature_detected!("f16c"),
                avx512f: std::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Features::default()
    })
}

/// The instruction sets the element loops may use. Every path gives the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, for every CPU.
    Portable,
    /// x86-64 AVX2 with F16C conversions.
    Avx2,
}

/// The best element-loop path this CPU runs, or the portable one when `FASTDROP_SIMD` is
/// `portable` (or `scalar`); decided once, like the generator's `rng::backend`.
pub fn isa() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        if simd() == Simd::Portable {
            Isa::Portable
        } else {
            best_isa()
        }
    })
}

/// The best element-loop path this CPU runs, whatever the environment says.
pub fn best_isa() -> Isa {
    let f = features();
    if f.avx2 && f.f16c {
        Isa::Avx2
    } else {
        Isa::Portable
    }
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

    #[test]
    fn the_probe_agrees_with_std_and_the_portable_switch_wins() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(features().avx2, std::is_x86_feature_detected!("avx2"));
        assert!(best_isa() == Isa::Portable || features().avx2 && features().f16c);
        if simd() == Simd::Portable {
            assert_eq!(isa(), Isa::Portable);
        } else {
            assert_eq!(isa(), best_isa());
        }
    }
}
