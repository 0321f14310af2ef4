// Lung bounding box of segmenter masks: the GPU twin of kernels/reference.py::lung_bbox.
//
// Three launches on one stream (kernels/nvrtc.py drives them):
//   lung_bbox_init      grid n/256, block 256   one thread per image: empty statistics
//   lung_bbox_reduce    grid (bx, n), block 256  grid-stride over one image's pixels: min/max
//                                                row and column of pixels >= threshold, count
//   lung_bbox_finalize  grid n/256, block 256   statistics -> box with margin, clipped; empty
//                                                mask -> full box (0, 0, 1, 1), fraction 0
// The statistics live in the output buffers themselves (5 words per image: the 4 box floats
// and the fraction float, reinterpreted as int), so no scratch memory is needed; finalize
// reads all five words of its image before it writes any.
//
// Bit-exactness with NumPy: the threshold is compared in float32 (NumPy 2 casts the Python
// float threshold to the array's float32), box arithmetic is done in double and rounded to
// float32 once (NumPy computes in float64, clips, then casts), the fraction is count / (h*w)
// in double. Compiled with --fmad=false so no multiply-add is contracted.

#define CXR_INT_MAX 0x7fffffff

extern "C" __global__ void lung_bbox_init(int n, float* __restrict__ boxes,
                                          float* __restrict__ fraction) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int* s = reinterpret_cast<int*>(boxes) + 4 * i;
    s[0] = CXR_INT_MAX;  // min row
    s[1] = -1;           // max row
    s[2] = CXR_INT_MAX;  // min col
    s[3] = -1;           // max col
    reinterpret_cast<int*>(fraction)[i] = 0;  // foreground count
}

__device__ __forceinline__ void warp_reduce(int& min_r, int& max_r, int& min_c, int& max_c,
                                            int& count) {
#ifdef __CUDA_ARCH__
    for (int offset = 16; offset > 0; offset >>= 1) {
        min_r = min(min_r, __shfl_down_sync(0xffffffffu, min_r, offset));
        max_r = max(max_r, __shfl_down_sync(0xffffffffu, max_r, offset));
        min_c = min(min_c, __shfl_down_sync(0xffffffffu, min_c, offset));
        max_c = max(max_c, __shfl_down_sync(0xffffffffu, max_c, offset));
        count += __shfl_down_sync(0xffffffffu, count, offset);
    }
#endif
}

// blockDim.x must be a multiple of 32: every lane reaches the warp reduction.
extern "C" __global__ void lung_bbox_reduce(const float* __restrict__ masks, int h, int w,
                                            float threshold, float* __restrict__ boxes,
                                            float* __restrict__ fraction) {
    const int image = blockIdx.y;
    const long long hw = (long long)h * w;
    const float* m = masks + image * hw;
    int min_r = CXR_INT_MAX, max_r = -1, min_c = CXR_INT_MAX, max_c = -1, count = 0;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < hw; p += step) {
        if (m[p] >= threshold) {  // NaN is never foreground, as in NumPy
            int r = (int)(p / w);
            int c = (int)(p - (long long)r * w);
            min_r = min(min_r, r);
            max_r = max(max_r, r);
            min_c = min(min_c, c);
            max_c = max(max_c, c);
            count += 1;
        }
    }
    warp_reduce(min_r, max_r, min_c, max_c, count);
#ifdef __CUDA_ARCH__
    const bool leader = (threadIdx.x & 31) == 0;
#else
    const bool leader = true;  // host emulation (tests): no warps, every thread is its own
#endif
    if (leader && count > 0) {
        int* s = reinterpret_cast<int*>(boxes) + 4 * image;
        atomicMin(s + 0, min_r);
        atomicMax(s + 1, max_r);
        atomicMin(s + 2, min_c);
        atomicMax(s + 3, max_c);
        atomicAdd(reinterpret_cast<int*>(fraction) + image, count);
    }
}

__device__ __forceinline__ double clip01(double v) { return v < 0.0 ? 0.0 : (v > 1.0 ? 1.0 : v); }

extern "C" __global__ void lung_bbox_finalize(int n, int h, int w, double margin,
                                              float* __restrict__ boxes,
                                              float* __restrict__ fraction) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int* s = reinterpret_cast<const int*>(boxes) + 4 * i;
    const int min_r = s[0], max_r = s[1], min_c = s[2], max_c = s[3];
    const int count = reinterpret_cast<const int*>(fraction)[i];
    float* box = boxes + 4 * i;
    if (count == 0) {
        box[0] = 0.0f;
        box[1] = 0.0f;
        box[2] = 1.0f;
        box[3] = 1.0f;
        fraction[i] = 0.0f;
        return;
    }
    // pixel-edge convention: the box ends after the last foreground row/column
    const double x0 = min_c, x1 = max_c + 1, y0 = min_r, y1 = max_r + 1;
    const double bw = (x1 - x0) * margin, bh = (y1 - y0) * margin;
    box[0] = (float)clip01((x0 - bw) / w);
    box[1] = (float)clip01((y0 - bh) / h);
    box[2] = (float)clip01((x1 + bw) / w);
    box[3] = (float)clip01((y1 + bh) / h);
    fraction[i] = (float)((double)count / ((double)h * (double)w));
}
