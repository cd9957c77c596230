// The activation dtypes every foe:: kernel supports: float32, bfloat16, float16 (fp32 accumulation).
#pragma once

#include <ATen/Dispatch.h>

#define FOE_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
