// Fused lung crop + bilinear resize + normalise + channel replication: the GPU twin of
// kernels/reference.py::crop_resize_normalize.
//
// grid (ceil(ow/16), ceil(oh/16), n), block (16, 16): one thread per output pixel, which it
// writes to all C channels as (v - mean[c]) / std[c].
//
// Output pixel (i, j) samples the source at the centre of its cell (half-pixel convention),
// coordinates clamped to the image, exactly as the reference does it in NumPy:
//   ys = f32(y0 * H) + (i + 0.5) * f32((y1 - y0) * H / oh) - 0.5     (float32 arithmetic)
// where the two scalars are computed in double (Python floats) and rounded to float32 (NumPy 2
// casts a Python float operand to the array's float32). Compiled with --fmad=false so every
// product and sum is rounded separately, as NumPy's ufuncs do.

#define CXR_MAX_CHANNELS 4

struct ChannelNorm {
    float mean[CXR_MAX_CHANNELS];
    float std[CXR_MAX_CHANNELS];
};

__device__ __forceinline__ float clampf(float v, float lo, float hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

extern "C" __global__ void crop_resize_normalize(const float* __restrict__ images, int H, int W,
                                                 const float* __restrict__ boxes, int oh, int ow,
                                                 int channels, ChannelNorm norm,
                                                 float* __restrict__ out) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    if (i >= oh || j >= ow) return;

    const float* box = boxes + 4 * b;
    const double bx0 = box[0], by0 = box[1], bx1 = box[2], by1 = box[3];
    const float origin_y = (float)(by0 * H);
    const float origin_x = (float)(bx0 * W);
    const float scale_y = (float)((by1 - by0) * H / oh);
    const float scale_x = (float)((bx1 - bx0) * W / ow);

    float ys = origin_y + ((float)i + 0.5f) * scale_y;
    ys = ys - 0.5f;
    float xs = origin_x + ((float)j + 0.5f) * scale_x;
    xs = xs - 0.5f;
    ys = clampf(ys, 0.0f, (float)(H - 1));
    xs = clampf(xs, 0.0f, (float)(W - 1));

    const int y0 = (int)floorf(ys);
    const int x0 = (int)floorf(xs);
    const int y1 = min(y0 + 1, H - 1);
    const int x1 = min(x0 + 1, W - 1);
    const float wy = ys - (float)y0;  // exact: ys and its floor share the exponent range
    const float wx = xs - (float)x0;

    const float* img = images + (long long)b * H * W;
    const float* row0 = img + (long long)y0 * W;
    const float* row1 = img + (long long)y1 * W;
    const float top = row0[x0] * (1.0f - wx) + row0[x1] * wx;
    const float bottom = row1[x0] * (1.0f - wx) + row1[x1] * wx;
    const float v = top * (1.0f - wy) + bottom * wy;

    const long long plane = (long long)oh * ow;
    float* o = out + (long long)b * channels * plane + (long long)i * ow + j;
    for (int c = 0; c < channels; ++c) {
        o[c * plane] = (v - norm.mean[c]) / norm.std[c];
    }
}
