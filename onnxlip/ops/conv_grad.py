"""Weight-gradient of a convolution on the companion mantissas (theory.md section 4):

    grad[o, j, k] = sum_pos small[o, pos] * big[g(o)*m + j, pos*stride + k*dilation - pad]

o the small channels, j the big channels of o's group (m per group), k the kernel offsets; big is zero outside
its extent. Conv: big is the input, small the output adjoint; ConvTranspose: big is the output adjoint, small
the input. Two formulations, picked per layer by speed on onnxruntime's CPU kernels:
- im2col: the (Cb, K, Q) patch matrix of `big`, then one GEMM with `small` (a batched MatMul over groups). The
  patches come from one depthwise Conv with one-hot kernels, which copies each entry exactly (1*x plus zeros),
  handles pads, strides and dilations in one pass and runs faster than a Slice per offset and a Concat;
- the correlation as one Conv with the channels on the batch axis (stride and dilation swap roles), which
  onnxruntime runs as one GEMM of width K per big channel: faster for stems (>= 25 offsets and a stride, e.g.
  7x7 stride 2 on 3 channels: 3.4 ms against 4.0 ms) and depthwise layers, slower elsewhere (up to 4x)."""

from __future__ import annotations

import numpy as np


def correlate(em, big, small, big_shape, small_shape, pads_begin, group, strides, dilations, kernel) -> str:
    """grad as above, (Cs, Cb/group, *kernel). big: (1, Cb, *spatial) unpadded, its zero padding before the
    start given by `pads_begin` (the end padding follows from the shapes); small: (1, Cs, *out_spatial)."""
    cb, cs, n = big_shape[1], small_shape[1], len(kernel)
    m, k_size = cb // group, int(np.prod(kernel))
    out = list(small_shape[2:])
    need = [(out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(n)]
    end = [need[i] - pads_begin[i] - big_shape[2 + i] for i in range(n)]
    if any(e <= -s for e, s in zip(end, strides)):  # more than the last window reaches: crop
        keep = [big_shape[2 + i] + min(end[i], 0) for i in range(n)]
        big = em.op("Slice", [big, em.i64([0] * n), em.i64(keep), em.i64(range(2, n + 2))], "crop")
        big_shape = (*big_shape[:2], *keep)
    pads = [*pads_begin, *[max(e, 0) for e in end]]
    # stems: group 1, a stride, >= 25 offsets, and a weight no larger than the big activation (its Transpose)
    stem = group == 1 and any(s > 1 for s in strides) and k_size >= 25 and cs * k_size <= np.prod(big_shape[2:])
    if m == 1 or stem:
        return _correlate_conv(em, big, small, big_shape, small_shape, pads, group, strides, dilations, kernel)
    q_size = int(np.prod(out))
    col = _im2col(em, big, big_shape, pads, strides, dilations, kernel)  # (1, Cb*K, *out) = (Cb, K, Q)
    if group == 1:
        col = em.op("Reshape", [col, em.i64([cb * k_size, q_size])], "col2")
        s2 = em.op("Reshape", [small, em.i64([cs, q_size])], "s2")
        grad = em.op("Gemm", [s2, col], "wgrad", transB=1)
    else:  # batched over groups: (g, m*K, Q) @ (g, Q, n) -> (g, m*K, n)
        n_out = cs // group
        col = em.op("Reshape", [col, em.i64([group, m * k_size, q_size])], "colg")
        if n_out == 1:
            st = em.op("Reshape", [small, em.i64([group, q_size, 1])], "sT")
        else:
            st = em.op("Reshape", [small, em.i64([group, n_out, q_size])], "sg")
            st = em.op("Transpose", [st], "sT", perm=[0, 2, 1])
        grad = em.op("MatMul", [col, st], "wgrad")
        if n_out > 1:
            grad = em.op("Transpose", [grad], "wgradT", perm=[0, 2, 1])
    return em.op("Reshape", [grad, em.i64([cs, m, *kernel])], "wshape")


def _im2col(em, big, big_shape, pads, strides, dilations, kernel) -> str:
    """Patches (1, Cb*K, *out): channel c*K + k holds big[c, pos*stride + k*dilation - pad]."""
    cb, k_size = big_shape[1], int(np.prod(kernel))
    if k_size == 1 and not any(pads) and all(s == 1 for s in strides):
        return big
    eye = np.eye(k_size, dtype=np.float32).reshape(k_size, 1, *kernel)
    onehot = em.const(np.tile(eye, (cb,) + (1,) * (len(kernel) + 1)), "onehot")
    return em.op("Conv", [big, onehot], "im2col", group=cb, pads=pads, strides=strides, dilations=dilations)


def _correlate_conv(em, big, small, big_shape, small_shape, pads, group, strides, dilations, kernel) -> str:
    """The correlation as one Conv over the big channels on the batch axis, with the small tensor as kernel."""
    cb, cs, n = big_shape[1], small_shape[1], len(kernel)
    m = cb // group
    swap = [1, 0, *range(2, n + 2)]
    if group > 1 and m > 1:
        b = em.op("Reshape", [big, em.i64([group, m, *big_shape[2:]])], "bg")
        b = em.op("Transpose", [b], "bgT", perm=swap)
    else:  # the same move is a Reshape
        b = em.op("Reshape", [big, em.i64([m, group, *big_shape[2:]])], "bg")
    s = em.op("Reshape", [small, em.i64([cs, 1, *small_shape[2:]])], "sg")
    attrs = dict(group=group, pads=pads, strides=list(dilations), dilations=list(strides))
    out = em.op("Conv", [b, s], "wgrad", **attrs)  # (m, Cs, >= kernel)
    out = em.op("Slice", [out, em.i64([0] * n), em.i64(kernel), em.i64(range(2, n + 2))], "wslice")
    if m == 1:
        return em.op("Reshape", [out, em.i64([cs, 1, *kernel])], "wgradT")
    return em.op("Transpose", [out], "wgradT", perm=swap)
