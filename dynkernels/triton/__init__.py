"""Triton kernels (optional: imported only when backend="triton" is used).

Each kernel is exposed with torch.library.triton_op so torch.compile can trace into it.
On a machine without a GPU they run on CPU tensors under TRITON_INTERPRET=1, which must be
set before this package is imported.
"""
