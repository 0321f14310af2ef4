"""CUDA kernels (kernels/*.cu, compiled with NVRTC by kernels.nvrtc) and their NumPy specification (kernels.reference)."""
