"""l2 operator norms (largest singular values) of the linear operators of ReLU networks, for AutoLip.

Two kinds of numbers, never to be confused:

* ESTIMATES (``*_estimate_power``): power iteration on A^T A. Each iterate gives ||A x|| / ||x|| <= sigma_max(A)
  (up to float32 rounding of the operator), so estimates approach sigma_max from BELOW. An estimate is not a
  certificate: a slow convergence or an unlucky start vector leaves it short of sigma_max.
* CERTIFIED values (``dense_norm``, ``conv_norm_certified``, ``diag_norm``): mathematically valid upper bounds on
  sigma_max, with an a-posteriori verification that covers the float64 rounding of the computation itself.

Certification method (the same for dense and conv). An upper bound t on lambda_max(G) for a Hermitian PSD Gram
matrix G = B B^H is verified by a floating-point Cholesky factorisation of t*I - G: if LAPACK completes it, then
R^H R = (t*I - G) + E with |E| <= g |R^H| |R| (Demmel 1989; Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., Thm 10.3, valid for any order of the inner products, hence for blocked LAPACK), which gives
||E||_2 <= g/(1-g) * trace(t*I - G), so lambda_max(G) <= t + g/(1-g) * n * t. The rounding of the Gram product
itself, |fl(B B^H) - B B^H| <= g' |B| |B|^H, is covered by g' * ||B||_F^2 (Cauchy-Schwarz), and the rounding of
t*I - G by u*t. The candidate t is the float64 eigenvalue (numpy.linalg.eigvalsh, of the matrices a batched
Lanczos ranks highest) times (1 + tau) with a tiny tau; a failed Cholesky raises t and tries again. Eigenvalue
solvers only propose t: nothing they return is trusted. All constants g are the textbook gamma_k = k*u/(1 - k*u),
u = 2**-53, with k doubled and then the whole term doubled for complex arithmetic (Higham section 3.6), so the
margins are generous: they are ~1e-10 relative for 512 channels, invisible next to the bound's own looseness.
Assumptions (standard for such a-posteriori proofs): IEEE double arithmetic with round-to-nearest in numpy/BLAS/
LAPACK (no Strassen-like products; OpenBLAS uses none), libm cos/sin within 1 ulp, no overflow (weights are
scaled by a power of two first, which is exact) and underflow only where it cannot matter (an absolute 1e-280
term covers it).

Conv certificate (Sedghi, Gupta, Long 2019, theory.md section 5): a zero-padded conv on an input of spatial size
n with pads (b, e) equals P o C o E, with E the isometric placement of the input at offset b in a zero canvas of
size N >= n + b + e, C the circular conv on that canvas and P the selection of the strided output positions, so
||conv|| <= ||S o C|| where S keeps every s-th canvas position (N is taken a multiple of the stride s). In the
unitary DFT basis the strided circular conv decouples into (N/s)^d blocks: for each output frequency g the
C_out x (s^d C_in) matrix B(g) = s^{-d/2} [M(f_1) ... M(f_{s^d})] over the s^d frequencies f = g + a N/s that alias
to g, with M(f) = sum_k W[:, :, k] exp(2 pi i <k*dil, f/N>) the C_out x C_in kernel DFT. So
||conv|| <= max_g sigma_max(B(g)) exactly for the circular operator (for stride 1 this is the classical
max_f sigma_max(M(f))), which is at least as tight as ignoring the stride. Groups give a block-diagonal operator:
the max over groups. The kernel DFT is computed directly (a small matrix product, not an FFT), so its rounding
has a simple bound, added at the end. Frequencies f and -f give conjugate matrices and are computed once, and
alias classes giving identical matrix sets (e.g. every frequency of a 1x1 kernel) are computed once.

Conventions (ONNX, batch 1): dense y = x @ W with W of shape (K, N) (or y = W @ x: same norm). Conv weight
(C_out, C_in/group, k_1..k_d), d = 1, 2 or 3; pads as ONNX [begin_1..begin_d, end_1..end_d] (resolve auto_pad
to explicit pads first); ConvTranspose weight (C_in, C_out/group, k...) with the same attributes plus
output_padding: it is the adjoint of the Conv with the same weight on an input of the ConvTranspose's output size
L_i = s_i (n_i - 1) + output_padding_i + (k_i - 1) dil_i + 1 - pad_begin_i - pad_end_i, so it has the same norm.
"""

from .conv import conv_norm_certified, conv_norms_certified
from .dense import PowerEstimate, dense_norm, dense_norm_estimate_power, dense_norm_svd, diag_norm
from .geometry import ConvLayer, conv_output_shape
from .power import conv_norm_estimate_power, conv_norms_estimate_power, explicit_matrix

__all__ = [
    "ConvLayer",
    "PowerEstimate",
    "conv_norm_certified",
    "conv_norm_estimate_power",
    "conv_norms_certified",
    "conv_norms_estimate_power",
    "conv_output_shape",
    "dense_norm",
    "dense_norm_estimate_power",
    "dense_norm_svd",
    "diag_norm",
    "explicit_matrix",
]
