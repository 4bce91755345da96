// PLE_CHECK(cond, pieces...): TORCH_CHECK with its message built from std::string pieces (numbers via
// std::to_string), never through std::ostream as TORCH_CHECK's variadic form does.
//
// Why: on the GPU image (torch 2.11.0+cu130, nvcc 13; H200, 2026-11-28) the CUDA dual_layout op
// segfaulted inside std::ostream::_M_insert<long> while formatting a TORCH_CHECK message that streams
// an int64 (cuda-gdb backtrace: c10::detail::_str_wrapper<const char*, long, const char*> in _C), where
// its valid calls ran and were right. A single std::string message skips the stream: c10::str returns
// it as is, and c10 (not _C) raises it.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace ple_fast::detail {

inline std::string message_piece(const char* text) { return text; }
inline std::string message_piece(const std::string& text) { return text; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char>, int> = 0>
std::string message_piece(T value) {
  return std::to_string(value);
}
inline std::string message_piece(const c10::Device& device) { return device.str(); }
inline std::string message_piece(c10::ScalarType dtype) { return c10::toString(dtype); }
inline std::string message_piece(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

template <typename... Pieces>
std::string message(const Pieces&... pieces) {
  std::string out;
  ((out += message_piece(pieces)), ...);
  return out;
}

}  // namespace ple_fast::detail

#define PLE_CHECK(cond, ...) TORCH_CHECK((cond), ::ple_fast::detail::message(__VA_ARGS__))
