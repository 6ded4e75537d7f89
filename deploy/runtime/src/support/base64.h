/* tvmq: base64 streams (RFC 4648), used when a Tensor is written into JSON. */
#ifndef TVMQ_SUPPORT_BASE64_H_
#define TVMQ_SUPPORT_BASE64_H_

#include <tvm/support/io.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

constexpr const char* kBase64Alphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/*! \brief Encodes what is written to it into `out`; call Finish() at the end. */
class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* out) : out_(out) {}
  using Stream::Read;
  using Stream::Write;
  size_t Write(const void* ptr, size_t size) final {
    const unsigned char* p = static_cast<const unsigned char*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      group_[n_++] = p[i];
      if (n_ == 3) Flush();
    }
    return size;
  }
  size_t Read(void*, size_t) final { return 0; }
  void Finish() {
    if (n_ != 0) Flush();
  }

 private:
  void Flush() {
    char enc[4];
    unsigned v = (group_[0] << 16) | ((n_ > 1 ? group_[1] : 0) << 8) | (n_ > 2 ? group_[2] : 0);
    for (int i = 0; i < 4; ++i) enc[i] = kBase64Alphabet[(v >> (18 - 6 * i)) & 63];
    if (n_ < 3) enc[3] = '=';
    if (n_ < 2) enc[2] = '=';
    out_->Write(static_cast<const void*>(enc), 4);
    n_ = 0;
  }
  Stream* out_;
  unsigned char group_[3] = {0, 0, 0};
  int n_ = 0;
};

/*! \brief Decodes base64 read from `in`; InitPosition() reads and decodes all of it. */
class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* in) : in_(in) {}
  using Stream::Read;
  using Stream::Write;
  void InitPosition() {
    std::string text;
    char buf[4096];
    for (size_t n; (n = in_->Read(static_cast<void*>(buf), sizeof(buf))) != 0;) text.append(buf, n);
    unsigned v = 0;
    int bits = 0;
    for (char c : text) {
      const char* at = std::strchr(kBase64Alphabet, c);
      if (c == '\0' || at == nullptr) continue;  // '=', whitespace, quotes
      v = (v << 6) | static_cast<unsigned>(at - kBase64Alphabet);
      bits += 6;
      if (bits >= 8) {
        bits -= 8;
        decoded_.push_back(static_cast<char>((v >> bits) & 0xFF));
      }
    }
  }
  size_t Read(void* ptr, size_t size) final {
    size_t n = std::min(size, decoded_.size() - pos_);
    std::memcpy(ptr, decoded_.data() + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void*, size_t) final { return 0; }

 private:
  Stream* in_;
  std::string decoded_;
  size_t pos_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVMQ_SUPPORT_BASE64_H_
