// The open-loop load generator of `python -m benches.grpc` (its unary phase), in gRPC's C++ library.
//
// Why C++: the generator runs on the same two cores as the server it measures, so every microsecond it
// spends per call is taken from the server. grpcio's Python client costs 0.3-0.7 ms of CPU per unary call
// on the reference VMs and @grpc/grpc-js more; this one a few tens of microseconds. It is also a third
// gRPC implementation that knows nothing of the project's Python code: it sends bytes serialized from
// the .proto files through a generic stub.
//
// Open loop, no coordinated omission: request n is due at start + n / rate, fixed before the run, whatever
// the answers do; its latency runs from that due time to its answer, so a generator (or a machine) that
// falls behind shows as latency, never hides it. `send_lag` says how late the generator itself sent. The
// sending thread sleeps until each request's due time (absolute CLOCK_MONOTONIC: no drift) and sends every
// request already due when it wakes; one thread takes the answers off the completion queue.
//
// Input on stdin (so the bearer token never shows in a process list), one `key value` a line:
//   address 127.0.0.1:50051        token cc1_...           payloads /path/file      rate 2000
//   start_ns <CLOCK_MONOTONIC ns: Python's time.perf_counter_ns()>   method /citycard.v1.Ledger/CreateTransfers
//   deadline_ms 10000              connections 2           warmup 250
// The payloads file holds serialized requests, each behind its length as a u32 little-endian.
// Output on stdout, the same JSON object as grpc_unary_load.js: per request the latency and send lag in
// microseconds (in due order) and its outcome ("OK", "REFUSED_TRANSFERS" when the answer lists transfers
// not booked, or the status code's name), the CPU the generator used from the first counted request on,
// and the span from that request's due time to the last answer.
//
// Built by `make bench-tools` (benches/grpc_unary_load, git-ignored) against Debian's libgrpc++-dev.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>
#include <time.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

const char* const kStatusNames[] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};

struct Config {
  std::string address, token, payloads, method = "/citycard.v1.Ledger/CreateTransfers";
  double rate = 0;
  int64_t start_ns = 0;
  int64_t deadline_ms = 10000;
  int connections = 1;
  size_t warmup = 0;
};

Config read_config(std::istream& in) {
  std::map<std::string, std::string> values;
  std::string key, value;
  while (in >> key >> value) values[key] = value;
  auto need = [&](const char* name) -> const std::string& {
    auto found = values.find(name);
    if (found == values.end()) throw std::runtime_error(std::string("config: missing ") + name);
    return found->second;
  };
  Config config;
  config.address = need("address");
  config.token = need("token");
  config.payloads = need("payloads");
  config.rate = std::stod(need("rate"));
  config.start_ns = std::stoll(need("start_ns"));
  if (values.count("method")) config.method = values["method"];
  if (values.count("deadline_ms")) config.deadline_ms = std::stoll(values["deadline_ms"]);
  if (values.count("connections")) config.connections = std::stoi(values["connections"]);
  if (values.count("warmup")) config.warmup = std::stoul(values["warmup"]);
  if (config.rate <= 0 || config.connections < 1) throw std::runtime_error("config: rate and connections must be > 0");
  return config;
}

std::vector<grpc::ByteBuffer> read_payloads(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  std::vector<grpc::ByteBuffer> payloads;
  unsigned char prefix[4];
  while (file.read(reinterpret_cast<char*>(prefix), 4)) {
    uint32_t length = prefix[0] | prefix[1] << 8 | prefix[2] << 16 | static_cast<uint32_t>(prefix[3]) << 24;
    std::string bytes(length, '\0');
    if (!file.read(bytes.data(), length)) throw std::runtime_error(path + ": a payload is cut short");
    grpc::Slice slice(bytes);
    payloads.emplace_back(&slice, 1);
  }
  if (payloads.empty()) throw std::runtime_error(path + ": no payloads");
  return payloads;
}

int64_t monotonic_ns() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return now.tv_sec * 1000000000LL + now.tv_nsec;
}

void sleep_until_ns(int64_t when_ns) {
  timespec until{static_cast<time_t>(when_ns / 1000000000LL), static_cast<long>(when_ns % 1000000000LL)};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, nullptr) != 0) {
  }
}

double process_cpu_s() {
  rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

// One request in flight: what the completion queue hands back when its answer (or status) is in.
struct Call {
  size_t index;
  grpc::ClientContext context;
  grpc::ByteBuffer answer;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
};

void write_array(std::ostream& out, const char* name, const std::vector<double>& values) {
  out << '"' << name << "\":[";
  for (size_t n = 0; n < values.size(); ++n) {
    if (n) out << ',';
    if (std::isnan(values[n])) out << "null";
    else out << values[n];
  }
  out << ']';
}

int run(const Config& config) {
  std::vector<grpc::ByteBuffer> payloads = read_payloads(config.payloads);
  const size_t count = payloads.size();
  const size_t warmup = std::min(config.warmup, count - 1);
  const double period_ns = 1e9 / config.rate;
  auto due_ns = [&](size_t n) { return config.start_ns + static_cast<int64_t>(std::llround(n * period_ns)); };

  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int c = 0; c < config.connections; ++c) {
    grpc::ChannelArguments args;
    args.SetInt("citycard.bench.connection", c);  // an argument that differs keeps the connections apart
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    channels.push_back(grpc::CreateCustomChannel(config.address, grpc::InsecureChannelCredentials(), args));
    if (!channels.back()->WaitForConnected(std::chrono::system_clock::now() +
                                           std::chrono::milliseconds(config.deadline_ms))) {
      std::cerr << "grpc_unary_load: cannot connect to " << config.address << "\n";
      return 2;
    }
    stubs.push_back(std::make_unique<grpc::GenericStub>(channels.back()));
  }

  std::vector<double> latency_us(count, NAN), lag_us(count, NAN);
  std::vector<std::string> outcomes(count, "?");
  std::atomic<double> cpu_start{0};
  int64_t last_answer_ns = 0;
  grpc::CompletionQueue queue;
  const std::string bearer = "Bearer " + config.token;

  std::thread answers([&] {
    void* tag;
    bool ok;
    for (size_t taken = 0; taken < count && queue.Next(&tag, &ok); ++taken) {
      std::unique_ptr<Call> call(static_cast<Call*>(tag));
      int64_t now = monotonic_ns();
      latency_us[call->index] = (now - due_ns(call->index)) / 1e3;
      last_answer_ns = now;
      int code = call->status.error_code();
      if (code != 0) outcomes[call->index] = code < 17 ? kStatusNames[code] : std::to_string(code);
      else outcomes[call->index] = call->answer.Length() ? "REFUSED_TRANSFERS" : "OK";  // lists only failures
    }
  });

  sleep_until_ns(due_ns(0));
  for (size_t next = 0; next < count;) {
    int64_t now = monotonic_ns();
    for (; next < count && due_ns(next) <= now; ++next) {  // everything due (several only if this thread was late)
      if (next == warmup) cpu_start = process_cpu_s();
      auto* call = new Call;
      call->index = next;
      call->context.AddMetadata("authorization", bearer);
      call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(config.deadline_ms));
      lag_us[next] = (monotonic_ns() - due_ns(next)) / 1e3;
      call->reader = stubs[next % stubs.size()]->PrepareUnaryCall(&call->context, config.method, payloads[next], &queue);
      call->reader->StartCall();
      call->reader->Finish(&call->answer, &call->status, call);
    }
    if (next < count) sleep_until_ns(due_ns(next));
  }
  answers.join();
  double cpu_s = process_cpu_s() - cpu_start;
  queue.Shutdown();

  std::ostringstream out;
  out.precision(10);
  out << '{';
  write_array(out, "latency_us", latency_us);
  out << ',';
  write_array(out, "send_lag_us", lag_us);
  out << ",\"outcomes\":[";
  for (size_t n = 0; n < count; ++n) out << (n ? ",\"" : "\"") << outcomes[n] << '"';
  out << "],\"span_s\":" << (last_answer_ns - due_ns(warmup)) / 1e9 << ",\"cpu_s\":" << cpu_s << '}';
  std::cout << out.str();
  return 0;
}

}  // namespace

int main() {
  try {
    return run(read_config(std::cin));
  } catch (const std::exception& error) {
    std::cerr << "grpc_unary_load: " << error.what() << "\n";
    return 2;
  }
}
