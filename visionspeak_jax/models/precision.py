"""Matmuls and 1x1 convolutions in mixed precision, forward and backward.

`matmul(x, w)` multiplies in the dtype of `w` (float32, or a bfloat16 copy
of the weight) and sums in float32. With float32 weights it is a plain
`jnp.dot`. With bfloat16 weights its gradient is written out so that the
backward pass multiplies in bfloat16 too: autodiff of a float32-accumulated
dot pairs the float32 cotangent with the bfloat16 weight, which promotes
both gradient matmuls to float32 (the weight cast back to float32 first)
and leaves the backward pass, two thirds of the step's FLOPs, at the
float32 matmul rate. As in flax/examples and big_vision's half precision,
where activations and so their cotangents are bfloat16, the cotangent is
rounded to bfloat16 for the two products; they still sum in float32, and
the loss, softmax and parameters stay float32.

`conv_general_dilated` gives the ResNet's bfloat16 1x1 convolutions the
same matmul, as XLA:CPU runs bfloat16 convolutions in float32.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def product(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] in `w`'s dtype, summed in float32, with JAX's own
  gradient: `matmul` for float32 weights, and its forward pass."""
  return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N]: inputs in `w`'s dtype, summed in float32.

  Returns:
    [..., N] float32.
  """
  if w.dtype == jnp.float32:
    return product(x, w)
  return _low_precision_matmul(x, w)


_low_precision_matmul = jax.custom_vjp(product)


def _low_precision_matmul_fwd(x, w):
  # The zero-size array carries x's dtype to the backward pass.
  return product(x, w), (x.astype(w.dtype), w, jnp.zeros((0,), x.dtype))


def _low_precision_matmul_bwd(residuals, g):
  x_low, w, x_dtype = residuals
  g_low = g.astype(w.dtype)
  dx = jnp.dot(g_low, w.T, preferred_element_type=jnp.float32)
  k, n = w.shape
  # dw = x^T g, summed over every row. XLA:CPU hands a product whose one
  # contracting axis is the left operand's first to its own dot, which runs
  # bfloat16 in float32; written with two contracting axes (a leading one
  # of size 1), XLA lays the operands out for the matmul library instead.
  dw = jnp.einsum("ark,arn->kn", x_low.reshape(1, -1, k),
                  g_low.reshape(1, -1, n), preferred_element_type=jnp.float32)
  # Cast to w's dtype (a custom VJP's cotangent has its input's dtype)
  # behind a barrier: XLA would fold the cast into the product, and a dot
  # with a bfloat16 result is run in float32 on both operands.
  dw = jax.lax.optimization_barrier(dw).astype(w.dtype)
  return dx.astype(x_dtype.dtype), dw


_low_precision_matmul.defvjp(_low_precision_matmul_fwd,
                             _low_precision_matmul_bwd)



def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         **kwargs: Any) -> jax.Array:
  """`lax.conv_general_dilated`, with bfloat16 1x1 convolutions as matmuls.

  flax's `nn.Conv(..., conv_general_dilated=...)` calls it. XLA:CPU runs a
  bfloat16 convolution in float32 (it converts both operands first), so
  bfloat16 gains nothing there; a 1x1 convolution is a matmul, and written
  as one (`matmul`, backward pass included) it runs on the matrix units in
  bfloat16. Every other convolution, and every float32 one, is
  `lax.conv_general_dilated` itself.

  Args:
    lhs: [N, H, W, C] inputs (flax's layout).
    rhs: [kh, kw, C, F] kernel.
    window_strides: (sh, sw).
    padding: as `lax.conv_general_dilated` takes it.
    **kwargs: `lax.conv_general_dilated`'s other arguments.

  Returns:
    [N, H', W', F] in the inputs' dtype, as `lax.conv_general_dilated`.
  """
  if _is_low_precision_pointwise(lhs, rhs, padding, **kwargs):
    stride_h, stride_w = window_strides
    x = lhs[:, ::stride_h, ::stride_w]  # [N, H', W', C]
    return matmul(x, rhs[0, 0]).astype(lhs.dtype)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                      **kwargs)


def _is_low_precision_pointwise(lhs: jax.Array, rhs: jax.Array, padding: Any,
                                *, lhs_dilation: Any = None,
                                rhs_dilation: Any = None,
                                dimension_numbers: Any = None,
                                feature_group_count: int = 1,
                                **unused: Any) -> bool:
  """Whether a convolution is a bfloat16 1x1 one in flax's NHWC layout."""
  del unused
  if (lhs.ndim != 4 or rhs.shape[:2] != (1, 1)
      or lhs.dtype == jnp.float32 or rhs.dtype != lhs.dtype
      or feature_group_count != 1
      or any(d != 1 for d in (lhs_dilation or (1, 1)))
      or any(d != 1 for d in (rhs_dilation or (1, 1)))):
    return False
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                        ("NHWC", "HWIO", "NHWC"))
  if (dimension_numbers is not None and jax.lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers) != nhwc):
    return False
  # A 1x1 window needs no padding for "SAME" or "VALID"; explicit pairs
  # must be zeros.
  return isinstance(padding, str) or all(p == (0, 0) for p in map(tuple,
                                                                   padding))
