/*
 * tvmq_rpc_server: a TVM RPC server for a board (Raspberry Pi, or an emulated one under qemu).
 *
 * Speaks the protocol of TVM's Python server (tvm/rpc/server.py, tvm/rpc/base.py): RPC magic,
 * key handshake, optional tracker registration. Binds 127.0.0.1 unless --host says otherwise.
 *
 *   tvmq_rpc_server --host 127.0.0.1 --port 9190 [--tracker HOST:PORT --key rpi4]
 *                   [--label "Raspberry Pi 4"]   (port 0: any free port, printed at start)
 *
 * How it stays available (no peer can hold it, whatever it sends or does not send):
 *  - The parent process never blocks on a client. It accepts, reads each handshake
 *    without blocking (poll) under a deadline (--handshake-timeout), and hands a connection
 *    whose handshake is complete to a forked child that serves the session.
 *  - At most --max-sessions sessions run at once (1 by default: timings are honest only when
 *    the board runs one model). Handshaken clients beyond that wait in a queue for at most
 *    --queue-timeout seconds, then are refused (RPC "busy" code) and closed.
 *  - Every session is killed after --session-timeout seconds (0: never), whatever the client
 *    asked for; a client may ask for less (-timeout=N in its key).
 *  - The parent creates each session's work directory and removes it when it reaps the child,
 *    however the child ended (normal end, crash, timeout kill). Files are confined to it.
 *    Beside each directory, DIR.owner names the server (pid and start time): a server that
 *    starts removes the directories of servers that are gone (SIGKILLed: no chance to clean
 *    up), and nothing else in --work-dir.
 *  - Lengths read from the network are bounded by --max-upload-mb (tvm/support/limits.h).
 */
#include <dirent.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/support/limits.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../support/socket.h"

namespace {

using tvm::support::SockAddr;
using tvm::support::TCPSocket;

constexpr int kRPCMagic = 0xFF271;
constexpr int kRPCBusy = kRPCMagic + 1;      // RPC_CODE_DUPLICATE: we use it for "no free slot"
constexpr int kRPCMismatch = kRPCMagic + 2;  // RPC_CODE_MISMATCH: wrong key
constexpr int kMaxKeyBytes = 4096;           // "client:KEY -timeout=N": far below this
constexpr int kTrackerMagic = 0x2F271;
constexpr int kMaxTrackerReply = 1 << 20;    // a tracker's replies are short JSON
enum TrackerCode { kSuccess = 0, kPut = 3, kUpdateInfo = 5, kGetPendingMatchKeys = 7 };

#if defined(__aarch64__)
constexpr uint16_t kThisMachine = EM_AARCH64;
#elif defined(__x86_64__)
constexpr uint16_t kThisMachine = EM_X86_64;
#else
constexpr uint16_t kThisMachine = EM_NONE;
#endif

const char* MachineName(uint16_t m) {
  switch (m) {
    case EM_AARCH64: return "aarch64";
    case EM_X86_64: return "x86_64";
    case EM_ARM: return "arm (32-bit)";
    case EM_RISCV: return "riscv";
    default: return "unknown";
  }
}

std::string g_work_dir;         // the current session's directory (set in the session child)
std::string g_label = "board";  // what the client reports this board as (e.g. "emulated ...")
volatile sig_atomic_t g_stop = 0;

void Log(const std::string& msg) { std::cerr << "[tvmq_rpc_server] " << msg << std::endl; }

double Now() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/*! \brief s as a JSON string literal (quotes, backslashes and control characters escaped). */
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char esc[8];
      std::snprintf(esc, sizeof(esc), "\\u%04x", c);
      out += esc;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

/*! \brief The path of a client-supplied file name inside the session directory. Only plain
 * relative names are accepted: an absolute path or a ".." component would reach files outside
 * the session (other sessions', the board's own). The empty name is the session directory
 * itself, as in TVM's own server (MetaSchedule's runner cleans up with remove("")). */
std::string SessionPath(const std::string& name) {
  if (name.empty()) return g_work_dir;
  bool bad = name[0] == '/' || name.find('\0') != std::string::npos;
  std::istringstream parts(name);
  for (std::string part; !bad && std::getline(parts, part, '/');) bad = part == "..";
  if (bad) {
    TVM_FFI_THROW(ValueError) << "file name '" << name << "' is not allowed: use a relative "
                              << "name inside the session directory (no '..', not absolute)";
  }
  return g_work_dir + "/" + name;
}

/*! \brief Refuse a library for another CPU with a message naming both architectures. */
void CheckLibraryArch(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  Elf64_Ehdr h{};
  if (!f.read(reinterpret_cast<char*>(&h), sizeof(h)) || std::string(reinterpret_cast<char*>(h.e_ident), 4) != ELFMAG) {
    TVM_FFI_THROW(RuntimeError) << path << " is not an ELF shared library";
  }
  if (h.e_machine != kThisMachine) {
    TVM_FFI_THROW(RuntimeError) << "wrong architecture: " << path << " is built for "
                                << MachineName(h.e_machine) << ", this board is "
                                << MachineName(kThisMachine);
  }
}

/*! \brief The optional CPU features a model may be compiled for, as the kernel reports them
 * (under qemu-user: the emulated CPU's), in LLVM's names. */
std::string CpuFeatures() {
  std::string features = "[";
#if defined(__aarch64__)
  unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  const std::pair<bool, const char*> known[] = {
      {(hw & (1UL << 1)) != 0, "neon"}, {(hw & (1UL << 20)) != 0, "dotprod"},
      {(hw & (1UL << 22)) != 0, "sve"}, {(hw2 & (1UL << 13)) != 0, "i8mm"}};
  for (const auto& [present, name] : known) {
    if (present) features += std::string(features.size() > 1 ? ", " : "") + "\"" + name + "\"";
  }
#endif
  return features + "]";
}

void RegisterSessionFunctions() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      // upload, download and remove (rpc_server_env.cc) resolve names through this
      .def("tvm.rpc.server.workpath", [](std::string name) { return SessionPath(name); })
      .def("tvm.rpc.server.load_module",
           [](std::string name) {
             std::string path = SessionPath(name);
             CheckLibraryArch(path);
             Log("load_module " + path);
             return tvm::ffi::Module::LoadFromFile(path);
           })
      .def("tvmq.board.info", []() {  // JSON: {"machine", "label", "features"}
        return std::string("{\"machine\": ") + JsonString(MachineName(kThisMachine)) +
               ", \"label\": " + JsonString(g_label) + ", \"features\": " + CpuFeatures() + "}";
      });
}

/*! \brief Remove a session directory and everything in it (no shell: the path may hold any
 * character). Symlinks are removed, not followed. */
void RemoveTree(const std::string& dir) {
  auto rm = [](const char* path, const struct stat*, int, FTW*) { return ::remove(path); };
  if (nftw(dir.c_str(), rm, 16, FTW_DEPTH | FTW_PHYS) != 0 && errno != ENOENT) {
    Log("could not remove " + dir + ": " + std::strerror(errno));
  }
}

/*! \brief "PID STARTTIME" of a live process (its start in clock ticks after boot, field 22 of
 * /proc/PID/stat: a reused pid has another), or "" when there is no such process. */
std::string ProcessIdentity(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!f || !std::getline(f, stat)) return "";
  size_t close = stat.rfind(')');  // the command name may hold spaces and parentheses
  if (close == std::string::npos) return "";
  std::istringstream rest(stat.substr(close + 1));
  std::string field;
  for (int i = 3; i <= 22 && rest >> field; ++i) {
    if (i == 22) return std::to_string(pid) + " " + field;
  }
  return "";
}

constexpr char kSessionPrefix[] = "tvmq_rpc_";
constexpr char kOwnerSuffix[] = ".owner";

/*! \brief Record this server as the owner of a session directory (DIR.owner, beside it). */
void WriteOwner(const std::string& dir) {
  std::ofstream f(dir + kOwnerSuffix, std::ios::trunc);
  f << ProcessIdentity(getpid()) << "\n";
}

/*! \brief Remove the session directories in root whose owner server is gone: only entries
 * named tvmq_rpc_*.owner written by a server, and the directory (ours, not a symlink) beside
 * each. Anything else in root is not ours and stays. */
void RemoveStaleSessions(const std::string& root) {
  DIR* d = opendir(root.c_str());
  if (d == nullptr) return;
  std::vector<std::string> owners;
  const size_t p = sizeof(kSessionPrefix) - 1, o = sizeof(kOwnerSuffix) - 1;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    size_t n = name.size();
    if (n > p + o && name.compare(0, p, kSessionPrefix) == 0 &&
        name.compare(n - o, o, kOwnerSuffix) == 0) {
      owners.push_back(name);
    }
  }
  closedir(d);
  for (const std::string& name : owners) {
    std::string owner_path = root + "/" + name, dir = owner_path.substr(0, owner_path.size() - o);
    std::ifstream f(owner_path);
    std::string pid_text, start;
    if (!(f >> pid_text >> start)) continue;  // being written, or not a server's: leave it
    char* end = nullptr;
    long pid = std::strtol(pid_text.c_str(), &end, 10);
    if (*end != '\0' || pid <= 0 || pid > 1 << 30) continue;
    if (ProcessIdentity(static_cast<pid_t>(pid)) == pid_text + " " + start) continue;  // alive
    struct stat st{};
    if (lstat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == getuid()) {
      RemoveTree(dir);
      Log("removed " + dir + ", left by server pid " + pid_text + ", which is gone");
    }
    ::remove(owner_path.c_str());
  }
}

// tracker messages: int32 length + JSON text
void SendJson(TCPSocket* s, const std::string& json) {
  int32_t n = static_cast<int32_t>(json.size());
  if (s->SendAll(&n, 4) != 4 || s->SendAll(json.data(), n) != json.size())
    TVM_FFI_THROW(RuntimeError) << "lost the tracker";
}
std::string RecvJson(TCPSocket* s) {
  int32_t n = 0;
  if (s->RecvAll(&n, 4) != 4) TVM_FFI_THROW(RuntimeError) << "lost the tracker";
  if (n < 0 || n > kMaxTrackerReply)
    TVM_FFI_THROW(RuntimeError) << "tracker sent a reply of " << n << " bytes: not a tracker";
  std::string json(n, '\0');
  if (n && s->RecvAll(&json[0], n) != static_cast<size_t>(n))
    TVM_FFI_THROW(RuntimeError) << "lost the tracker";
  return json;
}

struct Options {
  std::string host = "127.0.0.1";
  int port = 9190;
  std::string key;
  std::string tracker;  // HOST:PORT
  std::string custom_addr;
  std::string work_root = "/tmp";
  std::string label = "board";
  int session_timeout = 900;   // s a session may last (0: no limit)
  int handshake_timeout = 10;  // s a client has to send its handshake
  int queue_timeout = 60;      // s a handshaken client waits for a free session slot
  int max_sessions = 1;        // sessions at once
  int max_pending = 32;        // connections handshaking or queued at once
  int max_upload_mb = 256;     // largest upload (one RPC message), MiB
  bool exit_with_parent = false;
};

class Tracker {
 public:
  explicit Tracker(const Options& opt) : opt_(opt) {}
  bool enabled() const { return !opt_.tracker.empty(); }

  bool connected() const { return !sock_.BadSocket(); }
  void Close() {
    sock_.Close();
    offered_ = false;
  }
  /*! \brief In a session child: drop our copy of the tracker connection, say nothing on it. */
  void CloseInChild() { sock_.Close(); }
  bool offered() const { return offered_; }
  void set_port(int p) { port_ = p; }

  void Connect() {
    auto colon = opt_.tracker.rfind(':');
    SockAddr addr(opt_.tracker.substr(0, colon).c_str(), std::stoi(opt_.tracker.substr(colon + 1)));
    sock_ = TCPSocket();
    sock_.Create(addr.ss_family());
    // a tracker that stops answering must not freeze the server (SO_SNDTIMEO bounds connect)
    timeval tv{10, 0};
    setsockopt(sock_.sockfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(sock_.sockfd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (!sock_.Connect(addr)) TVM_FFI_THROW(RuntimeError) << "cannot reach tracker " << opt_.tracker;
    int magic = kTrackerMagic;
    sock_.SendAll(&magic, 4);
    if (sock_.RecvAll(&magic, 4) != 4 || magic != kTrackerMagic)
      TVM_FFI_THROW(RuntimeError) << opt_.tracker << " is not a TVM RPC tracker";
    SendJson(&sock_, "[" + std::to_string(kUpdateInfo) + ", {\"key\": " +
                         JsonString("server:" + opt_.key) + ", \"addr\": [" + Addr() + ", " +
                         std::to_string(port_) + "]}]");
    Expect();
  }
  /*! \brief Offer this board under a fresh match key; \return the key a client must send. */
  std::string Put() {
    std::mt19937 rng(std::random_device{}());
    matchkey_ = opt_.key + ":" + std::to_string(rng() % 1000000);
    SendJson(&sock_, "[" + std::to_string(kPut) + ", " + JsonString(opt_.key) + ", [" +
                         std::to_string(port_) + ", " + JsonString(matchkey_) + "], " + Addr() +
                         "]");
    Expect();
    offered_ = true;
    unused_periods_ = 0;
    return matchkey_;
  }
  /*! \brief A client came with our match key: it is used up. */
  void Taken() { offered_ = false; }
  /*! \brief A client took our match key but never came: offer a new one. */
  bool KeyAbandoned() {
    SendJson(&sock_, "[" + std::to_string(kGetPendingMatchKeys) + "]");
    std::string pending = RecvJson(&sock_);
    bool abandoned = pending.find(JsonString(matchkey_)) == std::string::npos;
    unused_periods_ = abandoned ? unused_periods_ + 1 : 0;
    return unused_periods_ > 3;
  }

 private:
  std::string Addr() const { return opt_.custom_addr.empty() ? "null" : JsonString(opt_.custom_addr); }
  void Expect() {
    if (RecvJson(&sock_) != std::to_string(kSuccess)) TVM_FFI_THROW(RuntimeError) << "tracker refused";
  }
  const Options& opt_;
  TCPSocket sock_;
  std::string matchkey_;
  bool offered_ = false;
  int port_ = 0;
  int unused_periods_ = 0;
};

/*! \brief A connection the parent holds: handshaking, or handshaken and waiting for a slot. */
struct Pending {
  TCPSocket sock;
  std::string peer;
  std::string buf;       // handshake bytes so far: magic, key length, key
  double deadline = 0;   // handshake deadline, then queue deadline once ready
  bool ready = false;    // handshake complete and key accepted
  int client_timeout = 0;
};

struct Session {
  std::string peer, dir;
  double deadline = 0;  // 0: none
  bool killed = false;
};

/*! \brief Bytes of the handshake still to read: magic (4), key length (4), key. */
size_t HandshakeBytesNeeded(const Pending& p) {
  if (p.buf.size() < 8) return 8 - p.buf.size();
  int32_t len;
  std::memcpy(&len, p.buf.data() + 4, 4);
  return 8 + static_cast<size_t>(len) - p.buf.size();
}

class Server {
 public:
  explicit Server(const Options& opt) : opt_(opt), tracker_(opt) {}

  int Run() {
    SockAddr bind_addr(opt_.host.c_str(), opt_.port);
    listener_.Create(bind_addr.ss_family());
    int one = 1;
    setsockopt(listener_.sockfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(listener_.sockfd, bind_addr.addr(), bind_addr.len()) != 0 ||
        ::listen(listener_.sockfd, 64) != 0) {
      int err = errno;  // taken at once: anything below may change errno
      std::cerr << "tvmq_rpc_server: cannot listen on " << opt_.host << ":" << opt_.port << ": "
                << std::strerror(err) << std::endl;
      return 1;
    }
    port_ = listener_.LocalAddr().port();
    RemoveStaleSessions(opt_.work_root);
    parent_pid_ = getppid();
    tracker_.set_port(port_);
    std::cout << "tvmq_rpc_server listening on " << opt_.host << ":" << port_
              << (opt_.key.empty() ? "" : " key=" + opt_.key) << std::endl;
    // with a tracker, only a client holding the match key we offered may connect (none yet)
    expected_ = "client:" + opt_.key + (tracker_.enabled() ? ":<not offered>" : "");

    while (!g_stop) {
      double now = Now();
      Reap();
      EnforceSessionDeadlines(now);
      StartQueuedSessions(now);
      ExpirePending(now);
      TrackerUpkeep(now);
      if (opt_.exit_with_parent && getppid() != parent_pid_) {
        Log("parent process ended: stopping");
        break;
      }
      PollOnce();
    }
    Shutdown();
    return 0;
  }

 private:
  int active() const { return static_cast<int>(sessions_.size()); }

  /*! \brief Wait (at most 200 ms: deadlines and children are checked between waits) for a new
   * connection or handshake bytes, and take them. */
  void PollOnce() {
    std::vector<pollfd> fds{{listener_.sockfd, POLLIN, 0}};
    for (const Pending& p : pending_) {
      // a queued client only needs watching for hanging up
      fds.push_back({p.sock.sockfd, static_cast<short>(p.ready ? POLLRDHUP : POLLIN), 0});
    }
    int n = poll(fds.data(), fds.size(), 200);
    if (n <= 0) return;  // timeout, or EINTR (a signal: SIGTERM, SIGCHLD)
    // fds[i + 1] belongs to pending_[i]; collect the ones to drop, then accept
    std::vector<bool> drop(pending_.size(), false);
    for (size_t i = 0; i < pending_.size(); ++i) {
      short ev = fds[i + 1].revents;
      if (ev == 0) continue;
      if (pending_[i].ready || (ev & (POLLERR | POLLHUP | POLLNVAL))) {
        drop[i] = true;  // queued client left, or the connection broke
      } else {
        drop[i] = !ReadHandshake(&pending_[i]);
      }
    }
    std::deque<Pending> kept;
    for (size_t i = 0; i < pending_.size(); ++i) {
      if (drop[i]) pending_[i].sock.Close(); else kept.push_back(std::move(pending_[i]));
    }
    pending_.swap(kept);
    if (fds[0].revents & POLLIN) Accept();
  }

  void Accept() {
    SockAddr peer;
    int fd = ::accept4(listener_.sockfd, peer.addr(), peer.mutable_len(), SOCK_CLOEXEC);
    if (fd < 0) {  // ECONNABORTED, EMFILE, ...: log it and carry on serving
      int err = errno;
      if (err != EAGAIN && err != EINTR) Log(std::string("accept failed: ") + std::strerror(err));
      if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) usleep(100000);
      return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    TCPSocket conn(fd);
    if (static_cast<int>(pending_.size()) >= opt_.max_pending) {
      Log("refused " + peer.AsString() + ": " + std::to_string(pending_.size()) +
          " connections already waiting (--max-pending)");
      int code = kRPCBusy;
      ::send(conn.sockfd, &code, 4, MSG_DONTWAIT | MSG_NOSIGNAL);
      conn.Close();
      return;
    }
    Pending p;
    p.sock = conn;
    p.peer = peer.AsString();
    p.deadline = Now() + opt_.handshake_timeout;
    pending_.push_back(std::move(p));
  }

  /*! \brief Read what has arrived of p's handshake (never more than the handshake: what
   * follows belongs to the session). \return false to drop the connection. */
  bool ReadHandshake(Pending* p) {
    char chunk[512];
    size_t want = std::min(HandshakeBytesNeeded(*p), sizeof(chunk));
    ssize_t n = ::recv(p->sock.sockfd, chunk, want, MSG_DONTWAIT);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
    if (n == 0) return false;  // closed before finishing its handshake
    p->buf.append(chunk, n);
    if (p->buf.size() >= 4) {
      int32_t magic;
      std::memcpy(&magic, p->buf.data(), 4);
      if (magic != kRPCMagic) return false;  // not a TVM RPC client
    }
    if (p->buf.size() >= 8) {
      int32_t len;
      std::memcpy(&len, p->buf.data() + 4, 4);
      if (len < 0 || len > kMaxKeyBytes) {
        Log("dropped " + p->peer + ": handshake key of " + std::to_string(len) + " bytes");
        return false;
      }
    }
    if (HandshakeBytesNeeded(*p) != 0) return true;  // more to come
    std::istringstream words(p->buf.substr(8));
    std::string client_key, opt;
    words >> client_key;
    if (client_key != expected_) {
      int code = kRPCMismatch;
      ::send(p->sock.sockfd, &code, 4, MSG_DONTWAIT | MSG_NOSIGNAL);
      Log("refused " + p->peer + ": key '" + client_key.substr(0, 100) + "'");
      return false;
    }
    while (words >> opt) {
      if (opt.rfind("-timeout=", 0) == 0) p->client_timeout = std::max(0, std::atoi(opt.c_str() + 9));
    }
    if (tracker_.enabled()) {  // the match key is used up: the next client needs a new one
      tracker_.Taken();
      expected_ = "client:" + opt_.key + ":<not offered>";
    }
    p->ready = true;
    p->deadline = Now() + opt_.queue_timeout;
    return true;
  }

  void StartQueuedSessions(double now) {
    while (active() < opt_.max_sessions) {
      auto it = std::find_if(pending_.begin(), pending_.end(), [](const Pending& p) { return p.ready; });
      if (it == pending_.end()) return;
      Pending p = std::move(*it);
      pending_.erase(it);
      StartSession(&p, now);
    }
  }

  void ExpirePending(double now) {
    std::deque<Pending> kept;
    for (Pending& p : pending_) {
      if (now < p.deadline) {
        kept.push_back(std::move(p));
        continue;
      }
      if (p.ready) {
        Log("refused " + p.peer + ": no free session slot within " +
            std::to_string(opt_.queue_timeout) + " s (--max-sessions " +
            std::to_string(opt_.max_sessions) + ")");
        int code = kRPCBusy;
        ::send(p.sock.sockfd, &code, 4, MSG_DONTWAIT | MSG_NOSIGNAL);
      } else {
        Log("dropped " + p.peer + ": no handshake within " + std::to_string(opt_.handshake_timeout) + " s");
      }
      p.sock.Close();
    }
    pending_.swap(kept);
  }

  /*! \brief Fork the child that serves p's session in a fresh work directory. */
  void StartSession(Pending* p, double now) {
    std::string tmpl = opt_.work_root + "/" + kSessionPrefix + "XXXXXX";
    if (mkdtemp(&tmpl[0]) == nullptr) {
      Log("refused " + p->peer + ": cannot create a session directory in " + opt_.work_root +
          ": " + std::strerror(errno));
      p->sock.Close();
      return;
    }
    WriteOwner(tmpl);
    pid_t server_pid = getpid();
    pid_t pid = fork();
    if (pid < 0) {
      Log(std::string("refused ") + p->peer + ": fork failed: " + std::strerror(errno));
      p->sock.Close();
      RemoveSession(tmpl);
      return;
    }
    if (pid == 0) ServeSession(p, tmpl, server_pid);  // never returns
    Log("session from " + p->peer + " (pid " + std::to_string(pid) + ", " + tmpl + ")");
    p->sock.Close();
    Session s;
    s.peer = p->peer;
    s.dir = tmpl;
    s.deadline = opt_.session_timeout > 0 ? now + opt_.session_timeout : 0;
    sessions_[pid] = s;
  }

  /*! \brief The session child: reply to the handshake, then run TVM's RPC server loop. */
  [[noreturn]] void ServeSession(Pending* p, const std::string& dir, pid_t server_pid) {
    // die with the server, whatever kills it (a SIGKILLed server cannot clean up after us)
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != server_pid) _exit(1);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    // the connections and sockets that belong to the parent
    listener_.Close();
    tracker_.CloseInChild();
    for (Pending& other : pending_) other.sock.Close();
    g_work_dir = dir;
    if (chdir(dir.c_str()) != 0) _exit(2);
    // the client may ask for a shorter session than the server allows (-timeout=N): SIGALRM
    // ends it. The server's own limit is enforced by the parent (EnforceSessionDeadlines).
    int limit = p->client_timeout;
    if (limit > 0 && (opt_.session_timeout == 0 || limit < opt_.session_timeout)) alarm(limit);
    std::string server_key = "server:" + opt_.key;
    int code = kRPCMagic, slen = static_cast<int>(server_key.size());
    if (p->sock.SendAll(&code, 4) != 4 || p->sock.SendAll(&slen, 4) != 4 ||
        p->sock.SendAll(server_key.data(), slen) != server_key.size()) {
      _exit(0);  // the client left while queued
    }
    static auto loop = tvm::ffi::Function::GetGlobalRequired("rpc.ServerLoop");
    try {
      loop(static_cast<int64_t>(p->sock.sockfd));
    } catch (const std::exception& e) {
      Log(std::string("session ended: ") + e.what());
    }
    std::cerr.flush();
    _exit(0);
  }

  /*! \brief A session directory and its owner record. */
  static void RemoveSession(const std::string& dir) {
    RemoveTree(dir);
    ::remove((dir + kOwnerSuffix).c_str());
  }

  /*! \brief Wait for ended sessions; remove their directories whatever the way they ended. */
  void Reap() {
    int status = 0;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
      auto it = sessions_.find(pid);
      if (it == sessions_.end()) continue;
      if (WIFSIGNALED(status) && !it->second.killed) {
        Log("session from " + it->second.peer + " killed by signal " + std::to_string(WTERMSIG(status)));
      }
      RemoveSession(it->second.dir);
      sessions_.erase(it);
    }
  }

  void EnforceSessionDeadlines(double now) {
    for (auto& [pid, s] : sessions_) {
      if (s.deadline > 0 && now > s.deadline && !s.killed) {
        Log("session from " + s.peer + " exceeded --session-timeout " +
            std::to_string(opt_.session_timeout) + " s: killed");
        kill(pid, SIGKILL);
        s.killed = true;
      }
    }
  }

  /*! \brief Keep the board registered and offered (a match key) while a session slot is free. */
  void TrackerUpkeep(double now) {
    if (!tracker_.enabled() || now < tracker_next_) return;
    tracker_next_ = now + 2;
    try {
      if (!tracker_.connected()) tracker_.Connect();
      int queued = static_cast<int>(
          std::count_if(pending_.begin(), pending_.end(), [](const Pending& p) { return p.ready; }));
      if (!tracker_.offered() && active() + queued < opt_.max_sessions) {
        expected_ = "client:" + tracker_.Put();
      } else if (tracker_.offered() && tracker_.KeyAbandoned()) {
        expected_ = "client:" + tracker_.Put();
      }
    } catch (const std::exception& e) {
      Log(std::string("tracker: ") + e.what() + "; retrying in 2 s");
      tracker_.Close();
    }
  }

  void Shutdown() {
    listener_.Close();
    for (Pending& p : pending_) p.sock.Close();
    for (auto& [pid, s] : sessions_) kill(pid, SIGKILL);
    for (auto& [pid, s] : sessions_) {
      waitpid(pid, nullptr, 0);
      RemoveSession(s.dir);
    }
    sessions_.clear();
  }

  const Options& opt_;
  Tracker tracker_;
  TCPSocket listener_;
  int port_ = 0;
  pid_t parent_pid_ = 0;
  double tracker_next_ = 0;
  std::string expected_;  // the key a client must send: "client:KEY" or "client:MATCHKEY"
  std::deque<Pending> pending_;
  std::map<pid_t, Session> sessions_;
};

/*! \brief A whole-string integer in [lo, hi], or a one-line error and exit 2. */
int ParseInt(const std::string& name, const std::string& text, long lo, long hi) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || v < lo || v > hi) {
    std::cerr << "tvmq_rpc_server: " << name << " must be an integer in " << lo << ".." << hi
              << ", got '" << text << "'" << std::endl;
    std::exit(2);
  }
  return static_cast<int>(v);
}

void OnStopSignal(int) { g_stop = 1; }

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  const char* usage =
      " [--host 127.0.0.1] [--port 9190] [--key KEY] [--tracker HOST:PORT] [--custom-addr ADDR]"
      " [--work-dir DIR] [--label TEXT] [--session-timeout S (900; 0: none)]"
      " [--handshake-timeout S (10)] [--queue-timeout S (60)] [--max-sessions N (1)]"
      " [--max-pending N (32)] [--max-upload-mb MB (256)] [--exit-with-parent]";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], name = a, text;
    bool has_value = false;
    if (a.rfind("--", 0) == 0 && a.find('=') != std::string::npos) {
      name = a.substr(0, a.find('='));
      text = a.substr(a.find('=') + 1);
      has_value = true;
    }
    auto value = [&]() -> std::string {
      if (has_value) return text;
      if (i + 1 < argc) return argv[++i];
      std::cerr << "tvmq_rpc_server: missing value for " << name << std::endl;
      std::exit(2);
    };
    if (name == "--host") opt.host = value();
    else if (name == "--port") opt.port = ParseInt(name, value(), 0, 65535);
    else if (name == "--key") opt.key = value();
    else if (name == "--tracker") opt.tracker = value();
    else if (name == "--custom-addr") opt.custom_addr = value();
    else if (name == "--work-dir") opt.work_root = value();
    else if (name == "--label") opt.label = value();
    else if (name == "--session-timeout") opt.session_timeout = ParseInt(name, value(), 0, 1 << 30);
    else if (name == "--handshake-timeout") opt.handshake_timeout = ParseInt(name, value(), 1, 3600);
    else if (name == "--queue-timeout") opt.queue_timeout = ParseInt(name, value(), 0, 1 << 30);
    else if (name == "--max-sessions") opt.max_sessions = ParseInt(name, value(), 1, 1024);
    else if (name == "--max-pending") opt.max_pending = ParseInt(name, value(), 1, 1024);
    else if (name == "--max-upload-mb") opt.max_upload_mb = ParseInt(name, value(), 1, 1 << 20);
    else if (name == "--exit-with-parent" && !has_value) opt.exit_with_parent = true;
    else {
      bool help = a == "--help" || a == "-h";
      (help ? std::cout : std::cerr) << (help ? "" : "tvmq_rpc_server: unknown argument '" + a + "'\n")
                                     << "usage: " << argv[0] << usage << std::endl;
      return help ? 0 : 2;
    }
  }
  if (!opt.tracker.empty()) {
    auto colon = opt.tracker.rfind(':');
    if (colon == std::string::npos || colon == 0) {
      std::cerr << "tvmq_rpc_server: --tracker must be HOST:PORT, got '" << opt.tracker << "'" << std::endl;
      return 2;
    }
    ParseInt("--tracker port", opt.tracker.substr(colon + 1), 1, 65535);
  }
  // the largest message: one upload plus its packet headers (function name, argument codes)
  tvm::support::max_message_bytes = (static_cast<size_t>(opt.max_upload_mb) << 20) + (size_t{1} << 20);
  g_label = opt.label;
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa {};
  sa.sa_handler = OnStopSignal;  // no SA_RESTART: poll returns, the loop sees g_stop
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  if (opt.exit_with_parent) prctl(PR_SET_PDEATHSIG, SIGTERM);
  try {
    RegisterSessionFunctions();
    Server server(opt);
    return server.Run();
  } catch (const std::exception& e) {
    std::cerr << "tvmq_rpc_server: " << e.what() << std::endl;
    return 1;
  }
}
