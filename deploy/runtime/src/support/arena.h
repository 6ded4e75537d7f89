/* tvmq: per-message scratch memory of the RPC endpoint, freed all at once. */
#ifndef TVMQ_SUPPORT_ARENA_H_
#define TVMQ_SUPPORT_ARENA_H_

#include <tvm/support/limits.h>

#include <cstddef>
#include <memory>
#include <new>
#include <vector>

namespace tvm {
namespace support {

class Arena {
 public:
  template <typename T>
  T* allocate_(size_t count = 1) {
    static_assert(alignof(T) <= alignof(std::max_align_t), "over-aligned arena type");
    // count comes from the peer (and arrives as a signed int upstream: a negative one is huge
    // here): bound it and check the arithmetic before allocating
    size_t bytes = CheckedMessageBytes(count, sizeof(T), "RPC arena allocation");
    size_t words = bytes / sizeof(std::max_align_t) + (bytes % sizeof(std::max_align_t) != 0);
    chunks_.emplace_back(new std::max_align_t[words == 0 ? 1 : words]);
    return reinterpret_cast<T*>(chunks_.back().get());
  }
  void RecycleAll() { chunks_.clear(); }

 private:
  std::vector<std::unique_ptr<std::max_align_t[]>> chunks_;
};

}  // namespace support
}  // namespace tvm

#endif  // TVMQ_SUPPORT_ARENA_H_
