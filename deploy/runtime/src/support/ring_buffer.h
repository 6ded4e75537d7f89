/* tvmq: the RPC endpoint's byte queue (socket <-> message handler). A contiguous queue whose
 * consumed prefix is dropped lazily; the API is what rpc_endpoint.cc calls. */
#ifndef TVMQ_SUPPORT_RING_BUFFER_H_
#define TVMQ_SUPPORT_RING_BUFFER_H_

#include <tvm/ffi/error.h>
#include <tvm/support/limits.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace tvm {
namespace support {

class RingBuffer {
 public:
  size_t bytes_available() const { return end_ - begin_; }

  /*! \brief Make room for n more bytes. The endpoint reserves a whole packet as soon as it has
   * read the packet's length, before the data arrives: refuse a length beyond the message limit
   * here, so a peer cannot make the board allocate what it never sends. */
  void Reserve(size_t n) {
    if (n > max_message_bytes || bytes_available() > max_message_bytes - n) {
      TVM_FFI_THROW(ValueError) << "RPC message of " << n << " bytes (" << bytes_available()
                                << " queued) exceeds the board's limit of " << max_message_bytes
                                << " bytes (tvmq_rpc_server --max-upload-mb)";
    }
    if (begin_ != 0 && begin_ == end_) begin_ = end_ = 0;
    if (end_ + n <= buf_.size()) return;
    if (begin_ != 0) {  // drop what was consumed before growing
      std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    if (end_ + n > buf_.size()) buf_.resize(std::max(end_ + n, buf_.size() * 2));
  }

  void Read(void* data, size_t size) {
    // never read past what was received (the caller's length may come from the peer)
    if (size > bytes_available()) {
      TVM_FFI_THROW(InternalError) << "RingBuffer::Read of " << size << " bytes, only "
                                   << bytes_available() << " available";
    }
    std::memcpy(data, buf_.data() + begin_, size);
    begin_ += size;
  }

  void Write(const void* data, size_t size) {
    Reserve(size);
    std::memcpy(buf_.data() + end_, data, size);
    end_ += size;
  }

  /*! \brief Hand up to max_nbytes queued bytes to f(ptr, n) -> consumed; \return consumed. */
  template <typename F>
  size_t ReadWithCallback(F f, size_t max_nbytes) {
    size_t n = f(buf_.data() + begin_, std::min(max_nbytes, bytes_available()));
    begin_ += n;
    return n;
  }

  /*! \brief Let f(ptr, n) -> produced fill up to max_nbytes; \return produced. */
  template <typename F>
  size_t WriteWithCallback(F f, size_t max_nbytes) {
    Reserve(max_nbytes);
    size_t n = f(buf_.data() + end_, max_nbytes);
    end_ += n;
    return n;
  }

 private:
  std::vector<char> buf_;
  size_t begin_ = 0, end_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVMQ_SUPPORT_RING_BUFFER_H_
