/*
 * tvmq: the byte-stream interface the TVM runtime sources (shipped in the apache-tvm wheel)
 * serialize through. The wheel ships the sources but not this header; tvmq provides it so the
 * runtime can be cross-built for the board. Written for tvmq against the API those sources use.
 */
#ifndef TVMQ_SUPPORT_IO_H_
#define TVMQ_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

/*! \brief A byte stream; typed Read/Write go through Serializer<T> (serializer.h). */
class Stream {
 public:
  virtual ~Stream() = default;
  /*! \return bytes read (0 at end of stream) */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \return bytes written */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& data);
  template <typename T>
  bool Read(T* out);
  template <typename T>
  void WriteArray(const T* data, size_t count);
  template <typename T>
  bool ReadArray(T* data, size_t count);
};

}  // namespace support
}  // namespace tvm

#include <tvm/support/serializer.h>

#endif  // TVMQ_SUPPORT_IO_H_
