/*
 * tvmq: the one bound on how much memory a length read from the network (or from an uploaded
 * file) may make the board allocate. Every length the RPC endpoint's ring buffer, the arena and
 * the serializer are given is checked against it *before* anything is allocated, so a 16-byte
 * packet announcing 6 GiB is refused instead of reserving 6 GiB.
 *
 * The server sets it from --max-upload-mb (an upload is the largest message a session needs:
 * the library travels as one packet). The default suits a Raspberry Pi with 1-8 GiB.
 */
#ifndef TVMQ_SUPPORT_LIMITS_H_
#define TVMQ_SUPPORT_LIMITS_H_

#include <tvm/ffi/error.h>

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

/*! \brief Largest single message / allocation driven by peer data, in bytes. An inline
 * variable: the server executable and libtvm_runtime.so share one instance. */
inline size_t max_message_bytes = (size_t{256} << 20) + (size_t{1} << 20);  // 256 MiB + headers

/*! \brief count * elem_size, refused if it overflows or exceeds max_message_bytes. */
inline size_t CheckedMessageBytes(uint64_t count, size_t elem_size, const char* what) {
  if (elem_size != 0 && count > max_message_bytes / elem_size) {
    TVM_FFI_THROW(ValueError) << what << ": " << count << " x " << elem_size
                              << " bytes exceeds the board's limit of " << max_message_bytes
                              << " bytes per message (tvmq_rpc_server --max-upload-mb)";
  }
  return static_cast<size_t>(count) * elem_size;
}

}  // namespace support
}  // namespace tvm

#endif  // TVMQ_SUPPORT_LIMITS_H_
