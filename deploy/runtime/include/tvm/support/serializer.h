/*
 * tvmq: the binary encoding behind Stream::Read/Write<T>, byte-compatible with what the host's
 * TVM writes (executables, params, tensors): little-endian PODs as raw bytes, strings and
 * vectors as a uint64 length followed by their elements, classes through Save/Load.
 */
#ifndef TVMQ_SUPPORT_SERIALIZER_H_
#define TVMQ_SUPPORT_SERIALIZER_H_

#include <tvm/support/io.h>
#include <tvm/support/limits.h>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <map>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

/*! \brief Read n trivially copyable T into a fresh buffer (std::string / std::vector). The
 * length n comes from the data itself (a packet, an uploaded file): bound it, and grow the
 * buffer one chunk at a time as bytes really arrive, so a lying length costs what was sent,
 * not what was announced. */
template <typename T, typename Buffer>
bool ReadTrivialElements(Stream* s, Buffer* v, uint64_t n) {
  CheckedMessageBytes(n, sizeof(T), "serialized length");
  constexpr size_t kChunk = std::max<size_t>(1, (size_t{1} << 20) / sizeof(T));
  v->clear();
  size_t done = 0;
  while (done < n) {
    size_t k = static_cast<size_t>(std::min<uint64_t>(n - done, kChunk));
    v->resize(done + k);
    if (s->Read(static_cast<void*>(&(*v)[done]), k * sizeof(T)) != k * sizeof(T)) return false;
    done += k;
  }
  return true;
}

template <typename T, typename = void>
struct Serializer {
  // PODs (ints, floats, enums, DLDataType, DLDevice) as raw bytes
  static_assert(std::is_trivially_copyable<T>::value, "no serializer for this type");
  static void Write(Stream* s, const T& v) { s->Write(static_cast<const void*>(&v), sizeof(T)); }
  static bool Read(Stream* s, T* v) { return s->Read(static_cast<void*>(v), sizeof(T)) == sizeof(T); }
};

// classes that serialize themselves (Tensor, VMFuncInfo, ...)
template <typename T>
struct Serializer<T, std::enable_if_t<!std::is_trivially_copyable<T>::value &&
                                      std::is_same<decltype(std::declval<T&>().Load(
                                                       static_cast<Stream*>(nullptr))),
                                                   bool>::value>> {
  static void Write(Stream* s, const T& v) { v.Save(s); }
  static bool Read(Stream* s, T* v) { return v->Load(s); }
};

template <>
struct Serializer<std::string> {
  static void Write(Stream* s, const std::string& v) {
    uint64_t n = v.size();
    Serializer<uint64_t>::Write(s, n);
    if (n != 0) s->Write(static_cast<const void*>(v.data()), n);
  }
  static bool Read(Stream* s, std::string* v) {
    uint64_t n;
    if (!Serializer<uint64_t>::Read(s, &n)) return false;
    return ReadTrivialElements<char>(s, v, n);
  }
};

template <>
struct Serializer<ffi::String> {
  static void Write(Stream* s, const ffi::String& v) {
    Serializer<std::string>::Write(s, std::string(v.data(), v.size()));
  }
  static bool Read(Stream* s, ffi::String* v) {
    std::string str;
    if (!Serializer<std::string>::Read(s, &str)) return false;
    *v = ffi::String(std::move(str));
    return true;
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {  // as a std::vector<T>
  static void Write(Stream* s, const ffi::Array<T>& v) {
    Serializer<std::vector<T>>::Write(s, std::vector<T>(v.begin(), v.end()));
  }
  static bool Read(Stream* s, ffi::Array<T>* v) {
    std::vector<T> items;
    if (!Serializer<std::vector<T>>::Read(s, &items)) return false;
    *v = ffi::Array<T>(items.begin(), items.end());
    return true;
  }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static void Write(Stream* s, const std::vector<T>& v) {
    uint64_t n = v.size();
    Serializer<uint64_t>::Write(s, n);
    if (std::is_trivially_copyable<T>::value) {
      if (n != 0) s->Write(static_cast<const void*>(v.data()), n * sizeof(T));
    } else {
      for (const T& e : v) Serializer<T>::Write(s, e);
    }
  }
  static bool Read(Stream* s, std::vector<T>* v) {
    uint64_t n;
    if (!Serializer<uint64_t>::Read(s, &n)) return false;
    if constexpr (std::is_trivially_copyable<T>::value) {
      return ReadTrivialElements<T>(s, v, n);
    } else {
      // each element takes at least one byte of input: n beyond the limit is a lie
      CheckedMessageBytes(n, 1, "serialized element count");
      v->clear();
      v->reserve(static_cast<size_t>(std::min<uint64_t>(n, 1024)));
      for (uint64_t i = 0; i < n; ++i) {
        T e{};
        if (!Serializer<T>::Read(s, &e)) return false;
        v->push_back(std::move(e));
      }
      return true;
    }
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static void Write(Stream* s, const std::pair<A, B>& v) {
    Serializer<A>::Write(s, v.first);
    Serializer<B>::Write(s, v.second);
  }
  static bool Read(Stream* s, std::pair<A, B>* v) {
    return Serializer<A>::Read(s, &v->first) && Serializer<B>::Read(s, &v->second);
  }
};

// maps as a length followed by (key, value) pairs
template <typename M>
struct MapSerializer {
  static void Write(Stream* s, const M& m) {
    std::vector<std::pair<typename M::key_type, typename M::mapped_type>> items(m.begin(), m.end());
    Serializer<decltype(items)>::Write(s, items);
  }
  static bool Read(Stream* s, M* m) {
    std::vector<std::pair<typename M::key_type, typename M::mapped_type>> items;
    if (!Serializer<decltype(items)>::Read(s, &items)) return false;
    m->clear();
    m->insert(items.begin(), items.end());
    return true;
  }
};
template <typename K, typename V>
struct Serializer<std::map<K, V>> : MapSerializer<std::map<K, V>> {};
template <typename K, typename V>
struct Serializer<std::unordered_map<K, V>> : MapSerializer<std::unordered_map<K, V>> {};

template <typename T>
void Stream::Write(const T& data) {
  Serializer<T>::Write(this, data);
}
template <typename T>
bool Stream::Read(T* out) {
  return Serializer<T>::Read(this, out);
}
template <typename T>
void Stream::WriteArray(const T* data, size_t count) {
  if (std::is_trivially_copyable<T>::value) {  // one write, not one per element
    Write(static_cast<const void*>(data), count * sizeof(T));
    return;
  }
  for (size_t i = 0; i < count; ++i) Serializer<T>::Write(this, data[i]);
}
template <typename T>
bool Stream::ReadArray(T* data, size_t count) {
  CheckedMessageBytes(count, sizeof(T), "array read");  // count * sizeof(T) must not wrap
  if (std::is_trivially_copyable<T>::value) {
    return Read(static_cast<void*>(data), count * sizeof(T)) == count * sizeof(T);
  }
  for (size_t i = 0; i < count; ++i) {
    if (!Serializer<T>::Read(this, data + i)) return false;
  }
  return true;
}

}  // namespace support
}  // namespace tvm

#endif  // TVMQ_SUPPORT_SERIALIZER_H_
