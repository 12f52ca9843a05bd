// Numbers in error messages, formatted without std::ostream.
//
// On the H200 image (GCC 13 headers, torch 2.11.0+cu130) a TORCH_CHECK message that inserted an
// integer (a size, an IntArrayRef) into its ostream crashed kvpo_kernels._C with SIGSEGV inside
// std::ostream::_M_insert<long> (cuda-gdb, 2026-12-04) instead of raising; messages made of
// strings raised as they should. So every number a message of this library shows goes through
// std::to_string first.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace kvpo {

inline std::string num(int64_t x) { return std::to_string(x); }

// "[2, 3, 4]", as torch prints a shape.
inline std::string dims(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

}  // namespace kvpo
