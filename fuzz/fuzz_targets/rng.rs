//! The generator's entry points: every backend gives the portable stream bit for bit, at any
//! length and counter (including the 2^64 wrap); `keep_words` is `uniform_words < threshold`; a
//! counter range read from an offset equals the same words of a longer read; deviates are finite.
#![no_main]

use fastdrop::kernel::normal_at;
use fastdrop::rng::{self, Backend, Key};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn check(u: &mut Unstructured) -> Result<()> {
    let key = Key {
        seed: u.arbitrary()?,
        stream: u.arbitrary()?,
    };
    let first: u64 = if u.arbitrary::<bool>()? {
        u64::MAX - u.int_in_range(0..=40u64)?
    } else {
        u.arbitrary()?
    };
    let len = u.int_in_range(0..=600usize)?;
    let words = u.int_in_range(0..=20usize)?;
    let threshold = match u.int_in_range(0..=3u8)? {
        0 => 0,
        1 => 1u64 << 32,
        _ => u.int_in_range(0..=(1u64 << 32))?,
    };
    let mut reference = vec![0u32; len];
    rng::fill_u32_with(Backend::Portable, key, first, &mut reference);
    let skip = u.int_in_range(0..=len / 4)?;
    let mut tail = vec![0u32; len - 4 * skip];
    rng::fill_u32_with(
        Backend::Portable,
        key,
        first.wrapping_add(skip as u64),
        &mut tail,
    );
    assert_eq!(
        &reference[4 * skip..],
        &tail[..],
        "counter offsets disagree"
    );

    let mut bits_ref = vec![0u32; words * 64];
    rng::uniform_words(key, first, &mut bits_ref);
    for b in rng::available_backends() {
        let mut out = vec![0u32; len];
        rng::fill_u32_with(b, key, first, &mut out);
        assert_eq!(out, reference, "{b:?} fill_u32");
        let mut kw = vec![0u64; words];
        rng::keep_words_with(b, key, first, threshold, &mut kw);
        for (e, &r) in bits_ref.iter().enumerate() {
            assert_eq!(
                (kw[e / 64] >> (e % 64)) & 1 == 1,
                (r as u64) < threshold,
                "{b:?} keep bit {e}"
            );
        }
    }
    let keep: f64 = u.arbitrary()?;
    let t = rng::threshold_for(keep);
    assert!(t <= 1 << 32);
    for i in 0..8usize {
        assert!(normal_at(key, first, i.wrapping_mul(first as usize)).is_finite());
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = check(&mut Unstructured::new(data));
});
