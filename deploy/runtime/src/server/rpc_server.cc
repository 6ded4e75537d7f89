/*
 * tvmq_rpc_server: a TVM RPC server for a board (Raspberry Pi, or an emulated one under qemu).
 *
 * Speaks the protocol of TVM's Python server (tvm/rpc/server.py, tvm/rpc/base.py): RPC magic,
 * key handshake, optional tracker registration; each session runs in a forked child with its
 * own work directory, so a crashing model (illegal instruction, segfault) ends that session
 * and not the server. Binds 127.0.0.1 unless --host says otherwise.
 *
 *   tvmq_rpc_server --host 127.0.0.1 --port 9190 [--tracker HOST:PORT --key rpi4]
 *                   [--label "Raspberry Pi 4"]   (port 0: any free port, printed at start)
 */
#include <dlfcn.h>
#include <elf.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/select.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>

#include "../support/socket.h"

namespace {

using tvm::support::SockAddr;
using tvm::support::TCPSocket;

constexpr int kRPCMagic = 0xFF271;
constexpr int kTrackerMagic = 0x2F271;
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

std::string g_work_dir;  // the current session's directory
std::string g_label = "board";  // what the client reports this board as (e.g. "emulated ...")

void Log(const std::string& msg) { std::cerr << "[tvmq_rpc_server] " << msg << std::endl; }

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
      .def("tvm.rpc.server.workpath",
           [](std::string name) { return g_work_dir + "/" + name; })
      .def("tvm.rpc.server.load_module",
           [](std::string name) {
             std::string path = g_work_dir + "/" + name;
             CheckLibraryArch(path);
             Log("load_module " + path);
             return tvm::ffi::Module::LoadFromFile(path);
           })
      .def("tvmq.board.info", []() {  // JSON: {"machine", "label", "features"}
        return std::string("{\"machine\": \"") + MachineName(kThisMachine) +
               "\", \"label\": \"" + g_label + "\", \"features\": " + CpuFeatures() + "}";
      });
}

// tracker messages: int32 length + JSON text
void SendJson(TCPSocket* s, const std::string& json) {
  int32_t n = static_cast<int32_t>(json.size());
  if (s->SendAll(&n, 4) != 4 || s->SendAll(json.data(), n) != json.size())
    TVM_FFI_THROW(RuntimeError) << "lost the tracker";
}
std::string RecvJson(TCPSocket* s) {
  int32_t n = 0;
  if (s->RecvAll(&n, 4) != 4 || n < 0) TVM_FFI_THROW(RuntimeError) << "lost the tracker";
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
};

class Tracker {
 public:
  Tracker(const Options& opt) : opt_(opt) {}
  bool enabled() const { return !opt_.tracker.empty(); }

  bool connected() const { return !sock_.BadSocket(); }
  void Close() { sock_.Close(); }

  void Connect() {
    auto colon = opt_.tracker.rfind(':');
    SockAddr addr(opt_.tracker.substr(0, colon).c_str(), std::stoi(opt_.tracker.substr(colon + 1)));
    sock_ = TCPSocket();
    sock_.Create(addr.ss_family());
    if (!sock_.Connect(addr)) TVM_FFI_THROW(RuntimeError) << "cannot reach tracker " << opt_.tracker;
    int magic = kTrackerMagic;
    sock_.SendAll(&magic, 4);
    if (sock_.RecvAll(&magic, 4) != 4 || magic != kTrackerMagic)
      TVM_FFI_THROW(RuntimeError) << opt_.tracker << " is not a TVM RPC tracker";
    SendJson(&sock_, "[" + std::to_string(kUpdateInfo) + ", {\"key\": \"server:" + opt_.key +
                         "\", \"addr\": [" + Addr() + ", " + std::to_string(port_) + "]}]");
    Expect();
  }
  /*! \brief Offer this board under a fresh match key; \return the key a client must send. */
  std::string Put() {
    std::mt19937 rng(std::random_device{}());
    matchkey_ = opt_.key + ":" + std::to_string(rng() % 1000000);
    SendJson(&sock_, "[" + std::to_string(kPut) + ", \"" + opt_.key + "\", [" +
                         std::to_string(port_) + ", \"" + matchkey_ + "\"], " + Addr() + "]");
    Expect();
    return matchkey_;
  }
  /*! \brief A client took our match key but never came: offer a new one. */
  bool KeyAbandoned() {
    SendJson(&sock_, "[" + std::to_string(kGetPendingMatchKeys) + "]");
    std::string pending = RecvJson(&sock_);
    bool abandoned = pending.find("\"" + matchkey_ + "\"") == std::string::npos;
    unused_periods_ = abandoned ? unused_periods_ + 1 : 0;
    return unused_periods_ > 3;
  }
  void set_port(int p) { port_ = p; }

 private:
  std::string Addr() const { return opt_.custom_addr.empty() ? "null" : "\"" + opt_.custom_addr + "\""; }
  void Expect() {
    if (RecvJson(&sock_) != std::to_string(kSuccess)) TVM_FFI_THROW(RuntimeError) << "tracker refused";
  }
  const Options& opt_;
  TCPSocket sock_;
  std::string matchkey_;
  int port_ = 0;
  int unused_periods_ = 0;
};

/*! \brief Handshake; \return the session timeout in seconds (0: none), or -1 to drop the peer. */
int Handshake(TCPSocket* conn, const std::string& expected_key, const std::string& server_key) {
  int magic = 0, len = 0;
  if (conn->RecvAll(&magic, 4) != 4 || magic != kRPCMagic) return -1;
  if (conn->RecvAll(&len, 4) != 4 || len < 0 || len > 4096) return -1;
  std::string key(len, '\0');
  if (len && conn->RecvAll(&key[0], len) != static_cast<size_t>(len)) return -1;
  std::istringstream words(key);
  std::string client_key, opt;
  words >> client_key;
  if (client_key != "client:" + expected_key) {
    int code = kRPCMagic + 2;  // mismatch
    conn->SendAll(&code, 4);
    Log("refused a client with key '" + client_key + "'");
    return -1;
  }
  int timeout = 0;
  while (words >> opt) {
    if (opt.rfind("-timeout=", 0) == 0) timeout = std::atoi(opt.c_str() + 9);
  }
  int code = kRPCMagic;
  int slen = static_cast<int>(server_key.size());
  conn->SendAll(&code, 4);
  conn->SendAll(&slen, 4);
  conn->SendAll(server_key.data(), slen);
  return timeout;
}

/*! \brief Serve one session in a child process; wait for it (one session at a time). */
void Serve(TCPSocket conn, TCPSocket* listener, int timeout) {
  char tmpl[4096];
  std::snprintf(tmpl, sizeof(tmpl), "%s/tvmq_rpc_XXXXXX", g_work_dir.c_str());
  pid_t pid = fork();
  if (pid == 0) {
    listener->Close();
    if (timeout > 0) alarm(timeout);
    char* dir = mkdtemp(tmpl);
    if (dir == nullptr) _exit(2);
    g_work_dir = dir;
    static auto loop = tvm::ffi::Function::GetGlobalRequired("rpc.ServerLoop");
    try {
      loop(static_cast<int64_t>(conn.sockfd));
    } catch (const std::exception& e) {
      Log(std::string("session ended: ") + e.what());
    }
    std::string rm = "rm -rf '" + g_work_dir + "'";
    if (std::system(rm.c_str()) != 0) Log("could not remove " + g_work_dir);
    _exit(0);
  }
  conn.Close();
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) Log("session killed by signal " + std::to_string(WTERMSIG(status)));
}

int Run(const Options& opt) {
  SockAddr bind_addr(opt.host.c_str(), opt.port);
  TCPSocket listener;
  listener.Create(bind_addr.ss_family());
  listener.Listen(bind_addr);
  int port = listener.LocalAddr().port();
  g_work_dir = opt.work_root;
  g_label = opt.label;
  RegisterSessionFunctions();
  std::cout << "tvmq_rpc_server listening on " << opt.host << ":" << port
            << (opt.key.empty() ? "" : " key=" + opt.key) << std::endl;

  Tracker tracker(opt);
  tracker.set_port(port);
  while (true) {
    std::string expected = opt.key;
    try {
      if (tracker.enabled()) {
        if (!tracker.connected()) tracker.Connect();
        expected = tracker.Put();
      }
      while (tracker.enabled()) {  // ping the tracker every 2 s until a client comes
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(listener.sockfd, &fds);
        timeval tv{2, 0};
        if (select(listener.sockfd + 1, &fds, nullptr, nullptr, &tv) > 0) break;
        if (tracker.KeyAbandoned()) expected = tracker.Put();
      }
    } catch (const std::exception& e) {
      Log(std::string("tracker: ") + e.what() + "; retrying in 2 s");
      tracker.Close();
      sleep(2);
      continue;
    }
    SockAddr peer;
    TCPSocket conn = listener.Accept(&peer);
    int timeout = Handshake(&conn, expected, "server:" + opt.key);
    if (timeout < 0) {
      conn.Close();
      continue;
    }
    Log("session from " + peer.AsString());
    Serve(conn, &listener, timeout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& name) -> std::string {
      if (a.rfind(name + "=", 0) == 0) return a.substr(name.size() + 1);
      if (a == name && i + 1 < argc) return argv[++i];
      std::cerr << "missing value for " << name << std::endl;
      std::exit(2);
    };
    if (a.rfind("--host", 0) == 0) opt.host = value("--host");
    else if (a.rfind("--port", 0) == 0) opt.port = std::stoi(value("--port"));
    else if (a.rfind("--key", 0) == 0) opt.key = value("--key");
    else if (a.rfind("--tracker", 0) == 0) opt.tracker = value("--tracker");
    else if (a.rfind("--custom-addr", 0) == 0) opt.custom_addr = value("--custom-addr");
    else if (a.rfind("--work-dir", 0) == 0) opt.work_root = value("--work-dir");
    else if (a.rfind("--label", 0) == 0) opt.label = value("--label");
    else {
      std::cerr << "usage: " << argv[0]
                << " [--host 127.0.0.1] [--port 9190] [--key KEY] [--tracker HOST:PORT]"
                   " [--custom-addr ADDR] [--work-dir DIR] [--label TEXT]" << std::endl;
      return a == "--help" ? 0 : 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  try {
    return Run(opt);
  } catch (const std::exception& e) {
    std::cerr << "tvmq_rpc_server: " << e.what() << std::endl;
    return 1;
  }
}
