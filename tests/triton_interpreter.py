"""Workarounds for two bugs of Triton 3.6's CPU interpreter, so the kernels run unchanged under it.

Both are interpreter-only: compiled kernels on a GPU never go through this code.
1. A scalar tensor used as a `range` bound is converted with int() on a shape-(1,) array, which numpy >= 2.4
   rejects (triton-lang/triton#9171). Convert through the array's one item instead.
2. `tl.dot` on bfloat16 multiplies the raw uint16 bit patterns the interpreter stores bf16 in. Upcast both
   operands to float32 first: exact, and what the tensor cores do (bf16 products, fp32 accumulation).
"""

from __future__ import annotations


def patch_triton_interpreter() -> None:
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if getattr(interpreter, "minisgl_patched", False):
        return
    interpreter.minisgl_patched = True

    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_lang_tensor is not None:

        def patch_with_item_index(tensor, scope) -> None:
            patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        interpreter._patch_lang_tensor = patch_with_item_index

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is not None and hasattr(builder, "create_dot") and hasattr(builder, "cast_impl"):
        create_dot = builder.create_dot

        def create_dot_bf16_as_fp32(self, a, b, d, input_precision, max_num_imprecise_acc):
            if a.dtype.scalar == tl.bfloat16:
                a, b = self.cast_impl(a, tl.float32), self.cast_impl(b, tl.float32)
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

        builder.create_dot = create_dot_bf16_as_fp32
