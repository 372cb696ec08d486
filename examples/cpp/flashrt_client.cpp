// A FlashRT policy client in C++: libzmq + msgpack-c (Debian: libzmq3-dev, libmsgpack-cxx-dev).
// Written from docs/protocol.md alone, to show that any language with ZeroMQ and msgpack can drive
// the server. It pings, reads the model's metadata, sends synthetic observations (uint8 images of the
// model's size and a float32 state, as openpi-form arrays), checks each action chunk and times it.
//
//   make && ../../build/cpp-example/flashrt_client [ENDPOINT] [N]   (default tcp://127.0.0.1:5555, N=5)
//
// Exits 0 when every reply is what the protocol says, non-zero (with a message) otherwise.

#include <zmq.h>

#include <msgpack.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using Object = msgpack::object;

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error(what); }

// Map lookup that accepts str or bin keys (the server writes array fields with bin keys, as openpi does).
const Object* find(const Object& map, const std::string& key) {
  if (map.type != msgpack::type::MAP) return nullptr;
  for (uint32_t i = 0; i < map.via.map.size; ++i) {
    const Object& k = map.via.map.ptr[i].key;
    const char* p = nullptr;
    uint32_t n = 0;
    if (k.type == msgpack::type::STR) p = k.via.str.ptr, n = k.via.str.size;
    if (k.type == msgpack::type::BIN) p = k.via.bin.ptr, n = k.via.bin.size;
    if (p && n == key.size() && std::memcmp(p, key.data(), n) == 0) return &map.via.map.ptr[i].val;
  }
  return nullptr;
}

const Object& get(const Object& map, const std::string& key) {
  const Object* v = find(map, key);
  if (!v) fail("reply has no '" + key + "'");
  return *v;
}

std::string str(const Object& o) {
  if (o.type == msgpack::type::STR) return std::string(o.via.str.ptr, o.via.str.size);
  if (o.type == msgpack::type::BIN) return std::string(o.via.bin.ptr, o.via.bin.size);
  fail("expected a string");
}

int64_t integer(const Object& o) {
  if (o.type == msgpack::type::POSITIVE_INTEGER) return static_cast<int64_t>(o.via.u64);
  if (o.type == msgpack::type::NEGATIVE_INTEGER) return o.via.i64;
  fail("expected an integer");
}

std::vector<int64_t> ints(const Object& o) {
  if (o.type != msgpack::type::ARRAY) fail("expected an array of integers");
  std::vector<int64_t> out;
  for (uint32_t i = 0; i < o.via.array.size; ++i) out.push_back(integer(o.via.array.ptr[i]));
  return out;
}

// An array in the wire's native (openpi) form: {__ndarray__: true, data: bin, dtype: str, shape: [..]}.
void pack_array(msgpack::packer<msgpack::sbuffer>& pk, const void* data, size_t bytes, const char* dtype,
                const std::vector<int64_t>& shape) {
  pk.pack_map(4);
  pk.pack(std::string("__ndarray__"));
  pk.pack_true();
  pk.pack(std::string("data"));
  pk.pack_bin(static_cast<uint32_t>(bytes));
  pk.pack_bin_body(static_cast<const char*>(data), static_cast<uint32_t>(bytes));
  pk.pack(std::string("dtype"));
  pk.pack(std::string(dtype));
  pk.pack(std::string("shape"));
  pk.pack(shape);
}

class Client {
 public:
  Client(const std::string& endpoint, int timeout_ms) : ctx_(zmq_ctx_new()), sock_(zmq_socket(ctx_, ZMQ_REQ)) {
    int linger = 0;
    zmq_setsockopt(sock_, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock_, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    if (zmq_connect(sock_, endpoint.c_str()) != 0) fail("cannot connect to " + endpoint + ": " + zmq_strerror(errno));
  }
  ~Client() {
    zmq_close(sock_);
    zmq_ctx_term(ctx_);
  }

  // Sends one request; returns the reply envelope, checked: ok is true and the id is ours.
  msgpack::object_handle call(const msgpack::sbuffer& request, int64_t id, bool expect_ok = true) {
    if (zmq_send(sock_, request.data(), request.size(), 0) < 0) fail(std::string("send: ") + zmq_strerror(errno));
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, sock_, 0) < 0) {
      zmq_msg_close(&msg);
      fail(std::string("no reply: ") + zmq_strerror(errno));
    }
    msgpack::object_handle oh = msgpack::unpack(static_cast<const char*>(zmq_msg_data(&msg)), zmq_msg_size(&msg));
    zmq_msg_close(&msg);
    const Object& reply = oh.get();
    if (integer(get(reply, "id")) != id) fail("reply id does not match the request");
    const Object& ok = get(reply, "ok");
    if (ok.type != msgpack::type::BOOLEAN) fail("reply 'ok' is not a boolean");
    if (expect_ok && !ok.via.boolean) {
      const Object& error = get(reply, "error");
      fail("server error " + str(get(error, "code")) + ": " + str(get(error, "message")));
    }
    return oh;
  }

 private:
  void* ctx_;
  void* sock_;
};

msgpack::sbuffer simple_request(const std::string& endpoint, int64_t id) {
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(&buf);
  pk.pack_map(2);
  pk.pack(std::string("endpoint"));
  pk.pack(endpoint);
  pk.pack(std::string("id"));
  pk.pack(id);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string endpoint = argc > 1 ? argv[1] : "tcp://127.0.0.1:5555";
  const int n = argc > 2 ? std::atoi(argv[2]) : 5;
  try {
    Client client(endpoint, 10000);
    int64_t id = 1;

    client.call(simple_request("ping", id), id);
    std::printf("ping: ok\n");

    ++id;
    auto meta_handle = client.call(simple_request("metadata", id), id);
    const Object& meta = get(meta_handle.get(), "data");
    const Object& spec = get(meta, "spec");
    std::vector<std::string> cameras, optional;
    const Object& cams = get(spec, "cameras");
    for (uint32_t i = 0; i < cams.via.array.size; ++i) cameras.push_back(str(cams.via.array.ptr[i]));
    const Object& opt = get(spec, "optional_cameras");
    for (uint32_t i = 0; i < opt.via.array.size; ++i) optional.push_back(str(opt.via.array.ptr[i]));
    std::vector<int64_t> hw = ints(get(spec, "image_size"));
    const int64_t state_dim = integer(get(spec, "state_dim"));
    const std::vector<int64_t> expected = ints(get(get(get(meta, "outputs"), "actions"), "shape"));
    std::vector<std::string> required;
    for (const auto& c : cameras)
      if (std::find(optional.begin(), optional.end(), c) == optional.end()) required.push_back(c);
    std::printf("model %s: %zu required cameras of %lldx%lld, state [%lld], actions [%lld, %lld]\n",
                str(get(meta, "model")).c_str(), required.size(), (long long)hw[0], (long long)hw[1],
                (long long)state_dim, (long long)expected[0], (long long)expected[1]);

    // A synthetic observation: a gradient per camera, a state ramp, a prompt.
    std::vector<uint8_t> image(static_cast<size_t>(hw[0] * hw[1] * 3));
    for (size_t i = 0; i < image.size(); ++i) image[i] = static_cast<uint8_t>(i * 7 % 251);
    std::vector<float> state(static_cast<size_t>(state_dim));
    for (size_t i = 0; i < state.size(); ++i) state[i] = 0.1f * static_cast<float>(i);

    std::vector<double> latencies;
    for (int k = 0; k < n; ++k) {
      ++id;
      msgpack::sbuffer buf;
      msgpack::packer<msgpack::sbuffer> pk(&buf);
      pk.pack_map(3);
      pk.pack(std::string("endpoint"));
      pk.pack(std::string("infer"));
      pk.pack(std::string("id"));
      pk.pack(id);
      pk.pack(std::string("data"));
      pk.pack_map(3);
      pk.pack(std::string("images"));
      pk.pack_map(static_cast<uint32_t>(required.size()));
      for (const auto& cam : required) {
        pk.pack(cam);
        pack_array(pk, image.data(), image.size(), "|u1", {hw[0], hw[1], 3});
      }
      pk.pack(std::string("state"));
      pack_array(pk, state.data(), state.size() * sizeof(float), "<f4", {state_dim});
      pk.pack(std::string("prompt"));
      pk.pack(std::string("pick up the red cube"));

      auto t0 = std::chrono::steady_clock::now();
      auto handle = client.call(buf, id);
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      latencies.push_back(ms);

      const Object& actions = get(get(handle.get(), "data"), "actions");
      if (str(get(actions, "dtype")) != "<f4") fail("actions dtype is not <f4");
      const std::vector<int64_t> shape = ints(get(actions, "shape"));
      if (shape != expected) fail("actions shape differs from the metadata's");
      const Object& data = get(actions, "data");
      if (data.type != msgpack::type::BIN || data.via.bin.size != shape[0] * shape[1] * sizeof(float))
        fail("actions data size does not match its shape");
      std::vector<float> a(static_cast<size_t>(shape[0] * shape[1]));
      std::memcpy(a.data(), data.via.bin.ptr, data.via.bin.size);
      std::printf("[%d] actions [%lld, %lld] float32, first row:", k, (long long)shape[0], (long long)shape[1]);
      for (int64_t j = 0; j < shape[1]; ++j) std::printf(" %.3f", a[static_cast<size_t>(j)]);
      std::printf("  round trip %.2f ms\n", ms);
    }
    if (!latencies.empty()) {
      std::sort(latencies.begin(), latencies.end());
      std::printf("round trip p50 %.2f ms over %zu\n", latencies[latencies.size() / 2], latencies.size());
    }

    // Errors are replies too: an unknown endpoint gets ok=false with a code and a message.
    ++id;
    auto err_handle = client.call(simple_request("no_such_endpoint", id), id, /*expect_ok=*/false);
    const Object& err = get(err_handle.get(), "error");
    if (str(get(err, "code")) != "unknown_endpoint") fail("expected an unknown_endpoint error");
    std::printf("error reply: %s: %s\n", str(get(err, "code")).c_str(), str(get(err, "message")).c_str());
    std::printf("cpp client: ok\n");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flashrt_client: %s\n", e.what());
    return 1;
  }
}
