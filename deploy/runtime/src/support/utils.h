/* tvmq: the two string helpers the runtime sources use. */
#ifndef TVMQ_SUPPORT_UTILS_H_
#define TVMQ_SUPPORT_UTILS_H_

#include <cctype>
#include <string>

namespace tvm {
namespace support {

inline bool IsNumber(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

inline bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

}  // namespace support
}  // namespace tvm

#endif  // TVMQ_SUPPORT_UTILS_H_
