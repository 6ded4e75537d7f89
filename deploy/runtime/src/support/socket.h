/* tvmq: blocking TCP sockets for the RPC runtime and tvmq's board server (POSIX only). */
#ifndef TVMQ_SUPPORT_SOCKET_H_
#define TVMQ_SUPPORT_SOCKET_H_

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
#include <tvm/ffi/error.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

/*! \brief A resolved host:port (IPv4 or IPv6). */
class SockAddr {
 public:
  SockAddr() = default;
  SockAddr(const char* host, int port) {
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int err = getaddrinfo(host, std::to_string(port).c_str(), &hints, &res);
    if (err != 0 || res == nullptr) {
      TVM_FFI_THROW(RuntimeError) << "cannot resolve " << host << ":" << port << ": "
                                  << gai_strerror(err);
    }
    std::memcpy(&addr_, res->ai_addr, res->ai_addrlen);
    len_ = res->ai_addrlen;
    freeaddrinfo(res);
  }
  int ss_family() const { return addr_.ss_family; }
  const sockaddr* addr() const { return reinterpret_cast<const sockaddr*>(&addr_); }
  sockaddr* addr() { return reinterpret_cast<sockaddr*>(&addr_); }
  socklen_t len() const { return len_; }
  socklen_t* mutable_len() { return &len_; }
  int port() const {
    return ntohs(addr_.ss_family == AF_INET6
                     ? reinterpret_cast<const sockaddr_in6*>(&addr_)->sin6_port
                     : reinterpret_cast<const sockaddr_in*>(&addr_)->sin_port);
  }
  std::string AsString() const {
    char host[NI_MAXHOST] = "?";
    getnameinfo(addr(), len_, host, sizeof(host), nullptr, 0, NI_NUMERICHOST);
    return std::string(host) + ":" + std::to_string(port());
  }

 private:
  sockaddr_storage addr_{};
  socklen_t len_ = sizeof(sockaddr_storage);
};

class Socket {
 public:
  using SockType = int;
  SockType sockfd;
  explicit Socket(SockType fd = -1) : sockfd(fd) {}
  bool BadSocket() const { return sockfd < 0; }
  void Close() {
    if (sockfd >= 0) ::close(sockfd);
    sockfd = -1;
  }
  /*! \brief Throw with the OS's reason for the last failure. */
  [[noreturn]] static void Error(const char* what) { Error(what, errno); }
  /*! \brief Throw with the reason for error number err. Take errno first, at the failing call:
   * building the exception (TVM_FFI_THROW records a backtrace, allocates) may change errno. */
  [[noreturn]] static void Error(const char* what, int err) {
    TVM_FFI_THROW(RuntimeError) << "socket error in " << what << ": " << std::strerror(err);
    throw;  // unreachable: TVM_FFI_THROW throws
  }
};

class TCPSocket : public Socket {
 public:
  TCPSocket() = default;
  explicit TCPSocket(SockType fd) : Socket(fd) {}

  void Create(int family = AF_INET) {
    sockfd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sockfd < 0) Error("socket", errno);
  }
  bool Connect(const SockAddr& a) { return ::connect(sockfd, a.addr(), a.len()) == 0; }
  /*! \brief Bind (with SO_REUSEADDR) and listen. */
  void Listen(const SockAddr& a, int backlog = 16) {
    int one = 1;
    setsockopt(sockfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(sockfd, a.addr(), a.len()) != 0) Error("bind", errno);
    if (::listen(sockfd, backlog) != 0) Error("listen", errno);
  }
  TCPSocket Accept(SockAddr* peer) {
    *peer->mutable_len() = sizeof(sockaddr_storage);
    int fd = ::accept4(sockfd, peer->addr(), peer->mutable_len(), SOCK_CLOEXEC);
    if (fd < 0) Error("accept", errno);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return TCPSocket(fd);
  }
  SockAddr LocalAddr() const {
    SockAddr a;
    getsockname(sockfd, a.addr(), a.mutable_len());
    return a;
  }
  ssize_t Send(const void* buf, size_t len) {
    ssize_t n;
    do n = ::send(sockfd, buf, len, MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
    return n;
  }
  ssize_t Recv(void* buf, size_t len) {
    ssize_t n;
    do n = ::recv(sockfd, buf, len, 0); while (n < 0 && errno == EINTR);
    return n;
  }
  /*! \brief Send all of buf; \return bytes sent (len unless the peer went away). */
  size_t SendAll(const void* buf, size_t len) {
    size_t done = 0;
    while (done < len) {
      ssize_t n = Send(static_cast<const char*>(buf) + done, len - done);
      if (n <= 0) break;
      done += n;
    }
    return done;
  }
  size_t RecvAll(void* buf, size_t len) {
    size_t done = 0;
    while (done < len) {
      ssize_t n = Recv(static_cast<char*>(buf) + done, len - done);
      if (n <= 0) break;
      done += n;
    }
    return done;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVMQ_SUPPORT_SOCKET_H_
