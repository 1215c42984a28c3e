//! The strided walk: an input, an output, a residual and a mask of a broadcastable shape, their
//! dimensions merged where they are contiguous in all of them, visited in logical (C) order one
//! innermost run at a time. The mask is walked in bits, the operands in bytes.

/// Dimensions after dropping size-1 dimensions and merging neighbours that are contiguous in
/// every operand and in the mask, so a C-contiguous element dropout becomes one flat loop.
pub(crate) struct Plan {
    pub(crate) shape: Vec<usize>,
    // strides[k][d]: 0 = src, 1 = dst, 2 = residual (bytes), 3 = mask (bits)
    pub(crate) strides: [Vec<isize>; 4],
    pub(crate) src: *const u8,
    pub(crate) dst: *mut u8,
    pub(crate) res: Option<*const u8>,
}

// SAFETY: a Plan only carries the caller's pointers between the threads of one call; every
// thread writes a disjoint range of logical indices and `run`'s contract is that distinct logical
// indices of `dst` are distinct addresses and `dst` overlaps no other operand unless it is the
// very same view as `src` (in place), where each element is read and written by one thread.
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

pub(crate) fn mask_bit_strides(shape: &[usize], mask_shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for d in (0..shape.len()).rev() {
        strides[d] = if mask_shape[d] == 1 { 0 } else { acc };
        acc *= mask_shape[d] as isize;
    }
    strides
}

/// The dimensions of `shape` longer than 1, in logical (C) order.
pub(crate) fn logical_order(shape: &[usize]) -> Vec<usize> {
    (0..shape.len()).filter(|&d| shape[d] != 1).collect()
}

/// The output's memory order (the dimensions longer than 1 by decreasing output stride, C order
/// among equals) where it differs from the logical one; `None` where they agree.
///
/// A walk in this order suits masks whose bits are given: each element still reads the bit of
/// its own logical index (the mask's bit strides move with their dimensions), so only the order
/// of the visits changes, and a channels-last output is walked along its channels instead of
/// across them (one element every C).
pub(crate) fn memory_order(shape: &[usize], dst_strides: &[isize]) -> Option<Vec<usize>> {
    let logical = logical_order(shape);
    let mut order = logical.clone();
    order.sort_by_key(|&d| std::cmp::Reverse(dst_strides[d].unsigned_abs()));
    (order != logical).then_some(order)
}

impl Plan {
    /// The plan of a walk visiting the dimensions of `shape` in `order` (outermost first; every
    /// dimension longer than 1 once), merging neighbours contiguous in every operand and in the
    /// mask.
    pub(crate) fn in_order(
        shape: &[usize],
        mask_shape: &[usize],
        order: &[usize],
        ops: [&[isize]; 3],
        src: *const u8,
        dst: *mut u8,
        res: Option<*const u8>,
    ) -> Plan {
        let mask = mask_bit_strides(shape, mask_shape);
        let strides = [ops[0], ops[1], ops[2], &mask[..]];
        let mut out_shape: Vec<usize> = Vec::with_capacity(shape.len());
        let mut out: [Vec<isize>; 4] = Default::default();
        for &d in order {
            let st = [strides[0][d], strides[1][d], strides[2][d], strides[3][d]];
            if let Some(&inner) = out_shape.last() {
                // This dim is inner to the last kept one: merge when last stride == this stride * size.
                let last = out_shape.len() - 1;
                if (0..4).all(|k| out[k][last] == st[k] * shape[d] as isize) {
                    out_shape[last] = inner * shape[d];
                    for (k, s) in st.iter().enumerate() {
                        out[k][last] = *s;
                    }
                    continue;
                }
            }
            out_shape.push(shape[d]);
            for (k, s) in st.iter().enumerate() {
                out[k].push(*s);
            }
        }
        if out_shape.is_empty() {
            out_shape.push(1);
            for v in out.iter_mut() {
                v.push(0);
            }
        }
        Plan {
            shape: out_shape,
            strides: out,
            src,
            dst,
            res,
        }
    }

    /// Calls `seg(offsets, mask_bit, len)` for each innermost run of the index range
    /// [start, end), counted in the plan's order of dimensions (logical order for `new`).
    pub(crate) fn walk(
        &self,
        start: usize,
        end: usize,
        mut seg: impl FnMut([isize; 4], isize, usize),
    ) {
        let nd = self.shape.len();
        let inner = self.shape[nd - 1];
        // Merged plans rarely have many dimensions: keep the index off the heap.
        let mut fixed = [0usize; 16];
        let mut heap = Vec::new();
        let idx: &mut [usize] = if nd <= fixed.len() {
            &mut fixed[..nd]
        } else {
            heap.resize(nd, 0);
            &mut heap
        };
        let mut rem = start;
        for d in (0..nd).rev() {
            idx[d] = rem % self.shape[d];
            rem /= self.shape[d];
        }
        // Offsets follow the index incrementally: short rows (a channel mask over small
        // planes) would otherwise pay a product per dimension per row.
        let st = &self.strides;
        let mut off = [0isize; 4];
        for (k, o) in off.iter_mut().enumerate() {
            *o = (0..nd).map(|d| idx[d] as isize * st[k][d]).sum();
        }
        let mut pos = start;
        while pos < end {
            let len = (inner - idx[nd - 1]).min(end - pos);
            seg([off[0], off[1], off[2], 0], off[3], len);
            pos += len;
            for (k, o) in off.iter_mut().enumerate() {
                *o -= idx[nd - 1] as isize * st[k][nd - 1];
            }
            idx[nd - 1] = 0;
            for d in (0..nd - 1).rev() {
                idx[d] += 1;
                for (k, o) in off.iter_mut().enumerate() {
                    *o += st[k][d];
                }
                if idx[d] < self.shape[d] {
                    break;
                }
                for (k, o) in off.iter_mut().enumerate() {
                    *o -= self.shape[d] as isize * st[k][d];
                }
                idx[d] = 0;
            }
        }
    }
}
