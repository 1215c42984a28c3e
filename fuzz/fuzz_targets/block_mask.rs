//! `mask::block_keep_words` against a naive DropBlock: seeds are the documented keep decisions
//! (uniform word e of `rng::uniform_words` below the threshold), each seed at (r, c) drops rows
//! r - kh/2 .. r - kh/2 + kh - 1 and the columns alike, clipped (timm's placement).
#![no_main]

use fastdrop::mask::{block_keep_words, BlockGeometry};
use fastdrop::rng::{self, Key};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn check(u: &mut Unstructured) -> Result<()> {
    let maps = u.int_in_range(0..=4usize)?;
    let h = u.int_in_range(1..=20usize)?;
    let w = u.int_in_range(1..=20usize)?;
    let kh = u.int_in_range(1..=h)?;
    let kw = u.int_in_range(1..=w)?;
    let key = Key {
        seed: u.arbitrary()?,
        stream: u.arbitrary()?,
    };
    let first: u64 = u.arbitrary()?;
    let threshold = match u.int_in_range(0..=3u8)? {
        0 => 0,
        1 => 1u64 << 32,
        _ => u.int_in_range(0..=(1u64 << 30))?,
    };
    let g = BlockGeometry { maps, h, w, kh, kw };
    let (words, kept) = block_keep_words(key, first, threshold, g);
    let n = maps * h * w;
    let mut r = vec![0u32; n];
    rng::uniform_words(key, first, &mut r);
    let seed = |m: usize| (r[m] as u64) < threshold;
    let mut count = 0;
    for map in 0..maps {
        for i in 0..h {
            for j in 0..w {
                let mut dropped = false;
                for sr in 0..h {
                    for sc in 0..w {
                        let (r0, c0) = (
                            sr as isize - (kh / 2) as isize,
                            sc as isize - (kw / 2) as isize,
                        );
                        let inside = (r0..r0 + kh as isize).contains(&(i as isize))
                            && (c0..c0 + kw as isize).contains(&(j as isize));
                        if inside && seed(map * h * w + sr * w + sc) {
                            dropped = true;
                        }
                    }
                }
                let m = map * h * w + i * w + j;
                let bit = (words[m / 64] >> (m % 64)) & 1 == 1;
                assert_eq!(
                    bit, !dropped,
                    "map {map} ({i}, {j}) of {h}x{w}, block {kh}x{kw}"
                );
                count += usize::from(!dropped);
            }
        }
    }
    assert_eq!(kept, count);
    assert_eq!(words.len(), n.div_ceil(64));
    if !n.is_multiple_of(64) {
        assert_eq!(words[n / 64] >> (n % 64), 0, "bits past the mask are set");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = check(&mut Unstructured::new(data));
});
