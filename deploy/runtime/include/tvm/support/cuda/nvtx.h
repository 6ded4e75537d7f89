/* tvmq: NVTX profiling ranges are a CUDA feature; on the CPU board they are a no-op. */
#ifndef TVMQ_SUPPORT_CUDA_NVTX_H_
#define TVMQ_SUPPORT_CUDA_NVTX_H_
#include <string>
namespace tvm {
namespace support {
class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const std::string&) {}
  explicit NVTXScopedRange(const char*) {}
};
}  // namespace support
}  // namespace tvm
#endif  // TVMQ_SUPPORT_CUDA_NVTX_H_
