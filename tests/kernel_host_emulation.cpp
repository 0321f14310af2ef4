// Runs the CUDA C kernels of kernels/*.cu on the CPU, one thread after another, so their index
// arithmetic and floating-point steps can be checked against kernels/reference.py on machines
// without a GPU (tests/test_kernels_gpu.py builds this with g++ into a shared library).
//
// What this does not emulate: warps (the kernels' warp reductions are compiled only for the
// device, #ifdef __CUDA_ARCH__; here every thread is its own leader) and real concurrency
// (atomics are plain read-modify-writes). The GPU tests cover those.
#include <cmath>
#include <algorithm>

struct dim3 {
    unsigned x, y, z;
};
static dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
using std::max;
using std::min;

static inline int atomicMin(int* a, int v) { int o = *a; if (v < o) *a = v; return o; }
static inline int atomicMax(int* a, int v) { int o = *a; if (v > o) *a = v; return o; }
static inline int atomicAdd(int* a, int v) { int o = *a; *a = o + v; return o; }

#include "lung_bbox.cu"
#include "crop_resize_normalize.cu"

template <class Kernel, class... Args>
static void run(dim3 grid, dim3 block, Kernel kernel, Args... args) {
    gridDim = grid;
    blockDim = block;
    for (blockIdx.z = 0; blockIdx.z < grid.z; ++blockIdx.z)
        for (blockIdx.y = 0; blockIdx.y < grid.y; ++blockIdx.y)
            for (blockIdx.x = 0; blockIdx.x < grid.x; ++blockIdx.x)
                for (threadIdx.z = 0; threadIdx.z < block.z; ++threadIdx.z)
                    for (threadIdx.y = 0; threadIdx.y < block.y; ++threadIdx.y)
                        for (threadIdx.x = 0; threadIdx.x < block.x; ++threadIdx.x)
                            kernel(args...);
}

// The launch configurations are passed in by the caller (kernels/nvrtc.py's, in the tests).
extern "C" void host_lung_bbox(const float* masks, int n, int h, int w, float threshold,
                               double margin, float* boxes, float* fraction, unsigned rows_grid,
                               unsigned block, unsigned blocks_x) {
    run(dim3{rows_grid, 1, 1}, dim3{block, 1, 1}, lung_bbox_init, n, boxes, fraction);
    run(dim3{blocks_x, (unsigned)n, 1}, dim3{block, 1, 1}, lung_bbox_reduce, masks, h, w,
        threshold, boxes, fraction);
    run(dim3{rows_grid, 1, 1}, dim3{block, 1, 1}, lung_bbox_finalize, n, h, w, margin, boxes,
        fraction);
}

extern "C" void host_crop_resize_normalize(const float* images, int n, int H, int W,
                                           const float* boxes, int oh, int ow, int channels,
                                           const float* norm8, float* out, unsigned tile) {
    ChannelNorm norm;
    for (int c = 0; c < CXR_MAX_CHANNELS; ++c) {
        norm.mean[c] = norm8[c];
        norm.std[c] = norm8[CXR_MAX_CHANNELS + c];
    }
    dim3 grid{(ow + tile - 1) / tile, (oh + tile - 1) / tile, (unsigned)n};
    run(grid, dim3{tile, tile, 1}, crop_resize_normalize, images, H, W, boxes, oh, ow, channels,
        norm, out);
}
