/* tvmq: streams over an in-memory byte string (the runtime's (de)serialization buffers). */
#ifndef TVMQ_SUPPORT_BYTES_IO_H_
#define TVMQ_SUPPORT_BYTES_IO_H_

#include <tvm/support/io.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

/*! \brief Appends to a std::string. */
class BytesOutStream : public Stream {
 public:
  explicit BytesOutStream(std::string* out) : out_(out) {}
  using Stream::Read;
  using Stream::Write;
  size_t Write(const void* ptr, size_t size) final {
    out_->append(static_cast<const char*>(ptr), size);
    return size;
  }
  size_t Read(void*, size_t) final { return 0; }

 private:
  std::string* out_;
};

/*! \brief Reads a byte buffer that outlives the stream (std::string, ffi::Bytes). */
class BytesInStream : public Stream {
 public:
  template <typename Buffer>
  explicit BytesInStream(const Buffer& buf) : data_(buf.data()), size_(buf.size()) {}
  BytesInStream(const char* data, size_t size) : data_(data), size_(size) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void* ptr, size_t size) final {
    size_t n = std::min(size, size_ - pos_);
    if (n != 0) std::memcpy(ptr, data_ + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void*, size_t) final { return 0; }

 private:
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVMQ_SUPPORT_BYTES_IO_H_
