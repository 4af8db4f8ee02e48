// `fluxswap serve` over loopback with a real HTTP client, on the tiny fixture pipeline and the CPU reference:
// images and their parameters, validation messages, the LoRA registry, adapter swaps (byte-identical to a fresh
// server), queueing (429, grouping), timeouts and disconnects (the next request still right), and /metrics.
// Plus the pieces that need no model: the queue order, request parsing, name checks, PNG/base64.
#include <gtest/gtest.h>
#include <httplib.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <nlohmann/json.hpp>
#include <thread>

#include "backend/backend.h"
#include "core/compare.h"
#include "pipeline/flux_pipeline.h"
#include "io/safetensors.h"
#include "pipeline/png_image.h"
#include "server/http_error.h"
#include "server/http_server.h"
#include "server/image_request.h"
#include "server/lora_registry.h"
#include "server/metrics.h"
#include "pipeline/png_image.h"
#include "server/base64.h"
#include "server/request_queue.h"
#include "test_support.h"

namespace fluxswap {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace fsys = std::filesystem;

// ---------------------------------------------------------------------------------------------------------------
// Helpers

std::string fixture_pipeline() { return test::fixtures_dir() + "/tiny/pipeline"; }

// A LoRA directory as a deployment would have it: the fixture adapters, one file that is not a LoRA, and a link
// that leads out of the directory.
void fill_lora_dir(const test::TempDir& dir) {
  for (const char* name : {"lora_a_peft", "lora_b_peft", "lora_c_kohya"})
    fsys::copy_file(test::fixtures_dir() + "/tiny/" + name + ".safetensors", dir / (std::string(name) + ".safetensors"));
  std::ofstream(dir / "broken.safetensors") << "\x10\x00\x00\x00\x00\x00\x00\x00{not json";
  fsys::create_directories(dir.path() / "styles");
  fsys::copy_file(test::fixtures_dir() + "/tiny/lora_d_xlabs.safetensors", dir / "styles/xlabs.safetensors");
  fsys::create_symlink(test::fixtures_dir() + "/tiny/lora_a_peft.safetensors", dir / "escape.safetensors");
}

struct Reply {
  int status = 0;
  json body;
  std::string text;
  std::string header(const std::string& key) const { return headers.count(key) ? headers.at(key) : ""; }
  std::map<std::string, std::string> headers;
};

Reply to_reply(const httplib::Result& r) {
  Reply out;
  if (!r) {
    out.status = -int(r.error());
    return out;
  }
  out.status = r->status;
  out.text = r->body;
  for (const auto& [k, v] : r->headers) out.headers[k] = v;
  if (r->get_header_value("Content-Type").find("json") != std::string::npos) out.body = json::parse(r->body);
  return out;
}

std::string error_message(const Reply& r) {
  return r.body.is_object() && r.body.contains("error") ? r.body["error"].value("message", "") : r.text;
}

class Running {
 public:
  explicit Running(ServerOptions o) {
    o.host = "127.0.0.1";
    o.port = 0;
    o.model = fixture_pipeline();
    server_ = std::make_unique<ImageServer>(o, [] { return make_cpu_backend(); });
    port_ = server_->start();
    EXPECT_TRUE(server_->wait_ready(30)) << server_->load_error();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(60, 0);
    return c;
  }
  Reply post(const std::string& path, const std::string& body) const {
    auto c = client();
    return to_reply(c.Post(path.c_str(), body, "application/json"));
  }
  Reply post(const std::string& path, const json& body) const { return post(path, body.dump()); }
  Reply get(const std::string& path) const {
    auto c = client();
    return to_reply(c.Get(path.c_str()));
  }
  // The value of one series in /metrics ("fluxswap_http_errors_total{status=\"400\"}"); -1 when absent.
  double metric(const std::string& series) const {
    const std::string text = get("/metrics").text;
    for (size_t at = 0; (at = text.find(series + " ", at)) != std::string::npos; ++at)
      if (at == 0 || text[at - 1] == '\n') return std::stod(text.substr(at + series.size() + 1));
    return -1;
  }
  // Polls until `series` reaches `value` (the worker and handlers run concurrently with the test).
  bool wait_metric(const std::string& series, double value, double timeout_s = 10) const {
    const auto until = Clock::now() + std::chrono::duration<double>(timeout_s);
    while (Clock::now() < until) {
      if (metric(series) == value) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }
  ImageServer& server() { return *server_; }

 private:
  std::unique_ptr<ImageServer> server_;
  int port_ = 0;
};

json image_request(uint64_t seed, const json& loras = json::array(), int steps = 3, const std::string& size = "32x32") {
  json j = {{"prompt", "a red fox"}, {"size", size}, {"steps", steps}, {"seed", seed}, {"response_format", "b64_json"}};
  if (!loras.empty()) j["lora"] = loras;
  return j;
}

json lora(const std::string& name, double scale) { return {{"name", name}, {"scale", scale}}; }

// The PNG files of a 200 response, checked to be PNGs.
std::vector<std::string> pngs_of(const Reply& r) {
  std::vector<std::string> out;
  EXPECT_EQ(r.status, 200) << r.text.substr(0, 400);
  if (r.status != 200) return out;
  for (const auto& d : r.body.at("data")) {
    std::string png = base64_decode(d.at("b64_json").get<std::string>());
    EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
    out.push_back(std::move(png));
  }
  return out;
}

uint32_t be32(const std::string& s, size_t at) {
  return uint32_t(uint8_t(s[at])) << 24 | uint32_t(uint8_t(s[at + 1])) << 16 | uint32_t(uint8_t(s[at + 2])) << 8 |
         uint8_t(s[at + 3]);
}

// ---------------------------------------------------------------------------------------------------------------
// No model needed

std::shared_ptr<GenerationJob> job_with_key(const std::string& key) {
  auto j = std::make_shared<GenerationJob>();
  j->adapter_key = key;
  return j;
}

TEST(ServerQueue, PrefersTheLoadedAdaptersButBoundsHowOftenARequestIsPassedOver) {
  RequestQueue q(16, 2);
  auto a1 = job_with_key("A"), b1 = job_with_key("B"), a2 = job_with_key("A"), a3 = job_with_key("A"),
       a4 = job_with_key("A");
  for (auto& j : {a1, b1, a2, a3, a4}) ASSERT_TRUE(q.push(j));
  EXPECT_EQ(q.pop("A"), a1);  // oldest and matching
  EXPECT_EQ(q.pop("A"), a2);  // b1 passed over once
  EXPECT_EQ(q.pop("A"), a3);  // twice: the bound
  EXPECT_EQ(q.pop("A"), b1);  // goes next although a4 matches
  EXPECT_EQ(q.pop("B"), a4);
  EXPECT_EQ(q.depth(), 0u);
  // Nothing matches the loaded set: plain arrival order.
  auto c = job_with_key("C"), d = job_with_key("D");
  q.push(c);
  q.push(d);
  EXPECT_EQ(q.pop("A"), c);
  EXPECT_EQ(q.pop("A"), d);
}

TEST(ServerQueue, RefusesWhenFullDropsCancelledJobsAndHandsBackTheRestOnClose) {
  RequestQueue q(2, 4);
  auto a = job_with_key(""), b = job_with_key(""), c = job_with_key("");
  EXPECT_TRUE(q.push(a));
  EXPECT_TRUE(q.push(b));
  EXPECT_FALSE(q.push(c));
  EXPECT_TRUE(a->request_cancel(CancelReason::Timeout));
  EXPECT_FALSE(a->request_cancel(CancelReason::Disconnect));  // the first reason stays
  EXPECT_EQ(q.pop(""), b);                                    // a was cancelled while waiting
  EXPECT_TRUE(q.push(c));
  EXPECT_TRUE(q.remove(c.get()));
  EXPECT_FALSE(q.remove(c.get()));
  q.push(c);
  auto left = q.close();
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0], c);
  EXPECT_EQ(q.pop(""), nullptr);
  EXPECT_FALSE(q.push(a));
}

std::string parse_error(const std::string& body, const ServerOptions& o = {}) {
  try {
    parse_image_request(body, o);
  } catch (const HttpError& e) {
    EXPECT_EQ(e.status(), 400);
    return e.what();
  }
  return "(accepted)";
}

TEST(ServerRequest, ParsesTheOpenAIShapeAndTheExtensions) {
  ImageRequest r = parse_image_request(
      R"({"prompt":"a fox","n":2,"size":"64x48","response_format":"b64_json","model":"dall-e-3","steps":7,)"
      R"("guidance":4.5,"seed":18446744073709551615,"timeout":2.5,"lora":[{"name":"a","scale":-0.5},{"name":"b"}]})",
      {});
  EXPECT_EQ(r.prompt, "a fox");
  EXPECT_EQ(r.n, 2);
  EXPECT_EQ(r.width, 64);
  EXPECT_EQ(r.height, 48);
  EXPECT_EQ(r.steps, 7);
  EXPECT_FLOAT_EQ(r.guidance, 4.5f);
  EXPECT_EQ(r.seed.value(), UINT64_MAX);
  EXPECT_DOUBLE_EQ(r.timeout_s, 2.5);
  ASSERT_EQ(r.loras.size(), 2u);
  EXPECT_EQ(r.loras[0].name, "a");
  EXPECT_FLOAT_EQ(r.loras[0].scale, -0.5f);
  EXPECT_FLOAT_EQ(r.loras[1].scale, 1.0f);
  ImageRequest d = parse_image_request(R"({"prompt":"x"})", {});
  EXPECT_EQ(d.width, 0);  // the model's default
  EXPECT_FALSE(d.seed.has_value());
}

TEST(ServerRequest, EveryProblemIsA400ThatNamesIt) {
  ServerOptions o;
  o.max_pixels = 512 * 512;
  EXPECT_NE(parse_error("{\"prompt\": ", o).find("not valid JSON"), std::string::npos);
  EXPECT_EQ(parse_error("[1]", o), "request body must be a JSON object (got [1])");
  EXPECT_EQ(parse_error("{}", o), "'prompt' is required");
  EXPECT_EQ(parse_error(R"({"prompt":7})", o), "'prompt' must be a string (got 7)");
  EXPECT_EQ(parse_error(R"({"prompt":"  "})", o), "'prompt' is empty");
  EXPECT_EQ(parse_error(R"({"prompt":"x","step":4})", o), "unknown field 'step'");
  EXPECT_EQ(parse_error(R"({"prompt":"x","size":"big"})", o),
            "'size' must be 'WIDTHxHEIGHT' such as \"1024x1024\" (got \"big\")");
  EXPECT_EQ(parse_error(R"({"prompt":"x","size":"100x64"})", o),
            "'size' 100x64: width and height must be positive multiples of 16");
  EXPECT_EQ(parse_error(R"({"prompt":"x","size":"1024x1024"})", o),
            "'size' 1024x1024 is 1048576 pixels, over the server's limit of 262144 (--max-pixels)");
  EXPECT_EQ(parse_error(R"({"prompt":"x","steps":0})", o), "'steps' must be in 1..50 (--max-steps) (got 0)");
  EXPECT_EQ(parse_error(R"({"prompt":"x","steps":2.5})", o), "'steps' must be an integer (got 2.5)");
  EXPECT_EQ(parse_error(R"({"prompt":"x","n":5})", o), "'n' must be in 1..4 (--max-n) (got 5)");
  EXPECT_EQ(parse_error(R"({"prompt":"x","seed":-1})", o), "'seed' must be in 0..9223372036854775807 (got -1)");
  EXPECT_EQ(parse_error(R"({"prompt":"x","response_format":"url"})", o),
            "'response_format' must be \"b64_json\" (got \"url\"): this server returns images inline, it does not "
            "host URLs");
  EXPECT_EQ(parse_error(R"({"prompt":"x","lora":[{"name":"a","scale":"big"}]})", o),
            "'lora[0].scale' must be a number (got \"big\")");
  EXPECT_EQ(parse_error(R"({"prompt":"x","lora":[{"name":"a","scale":11}]})", o),
            "'lora[0].scale' must be a number in -10..10 (got 11)");
  EXPECT_EQ(parse_error(R"({"prompt":"x","lora":[{"scale":1}]})", o), "'lora[0]' needs a non-empty string 'name'");
  EXPECT_EQ(parse_error(R"({"prompt":"x","lora":[{"name":"a"},{"name":"a"}]})", o),
            "'lora[1]': LoRA 'a' is listed twice; combine the scales");
  EXPECT_EQ(parse_error(R"({"prompt":"x","timeout":301})", o), "'timeout' must be a number in 0.001..300 (got 301)");
}

TEST(ServerLoraRegistry, NamesNeverLeaveTheDirectory) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir dir;
  fill_lora_dir(dir);
  LoraRegistry reg(dir.path().string());
  std::vector<std::string> names;
  for (const auto& e : reg.list()) names.push_back(e.name);
  // The escaping link is not offered; the broken file is (it is only found broken when parsed).
  EXPECT_EQ(names, (std::vector<std::string>{"broken", "lora_a_peft", "lora_b_peft", "lora_c_kohya", "styles/xlabs"}));
  EXPECT_EQ(reg.resolve("styles/xlabs"), fsys::canonical(dir / "styles/xlabs.safetensors").string());
  EXPECT_EQ(reg.resolve("lora_a_peft.safetensors"), fsys::canonical(dir / "lora_a_peft.safetensors").string());
  auto status_of = [&](const std::string& name) {
    try {
      reg.resolve(name);
    } catch (const HttpError& e) {
      return std::make_pair(e.status(), std::string(e.what()));
    }
    return std::make_pair(200, std::string());
  };
  for (const char* bad : {"../x", "/etc/passwd", "styles/../lora_a_peft", "./lora_a_peft", "a//b", "c:\\x", ""})
    EXPECT_EQ(status_of(bad).first, 400) << bad;
  EXPECT_EQ(status_of("escape"), std::make_pair(400, std::string("LoRA 'escape' is a link leading outside the LoRA directory")));
  EXPECT_EQ(status_of("nope"), std::make_pair(404, std::string("unknown LoRA 'nope' (GET /v1/loras lists the available ones)")));
}

TEST(ServerPng, SameBytesAsWritePngAndBase64RoundTrips) {
  test::TempDir tmp;
  Rgb8Image img;
  img.width = 5;
  img.height = 3;
  for (int i = 0; i < 45; ++i) img.pixels.push_back(uint8_t(i * 37));
  write_png(tmp / "a.png", img, {{"parameters", "a fox\nSteps: 2"}});
  std::ifstream f(tmp / "a.png", std::ios::binary);
  const std::string file((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_EQ(encode_png(img, {{"parameters", "a fox\nSteps: 2"}}), file);
  for (const std::string& s : std::vector<std::string>{"", "f", "fo", "foo", "foob", std::string("\0\xff\x10", 3)})
    EXPECT_EQ(base64_decode(base64_encode(s)), s);
  EXPECT_EQ(base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(base64_encode("fooba"), "Zm9vYmE=");
}

// The hook the server cancels through: a throw between steps, after which the pipeline makes the same image again.
TEST(ServerPipelineCancel, StopsBetweenStepsAndLeavesThePipelineUsable) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto backend = make_cpu_backend();
  auto pipe = FluxPipeline::from_pretrained(fixture_pipeline(), *backend);
  GenerateParams p;
  p.prompts = {"a red fox"};
  p.width = p.height = 32;
  p.steps = 4;
  p.seed = 5;
  const GenerateResult want = pipe->generate(p);
  int polls = 0;
  p.should_cancel = [&] { return ++polls == 2; };
  try {
    pipe->generate(p);
    ADD_FAILURE() << "not cancelled";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "generation cancelled after step 2/4");
  }
  p.should_cancel = [] { return false; };
  const GenerateResult again = pipe->generate(p);
  EXPECT_EQ(again.images.at(0).pixels, want.images.at(0).pixels);
  EXPECT_EQ(max_rel_error(again.latents, want.latents), 0.0);
}

// ---------------------------------------------------------------------------------------------------------------
// Over HTTP, with the tiny model

class ServerHttp : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::have_fixtures()) GTEST_SKIP() << "no fixtures at " << test::fixtures_dir();
    fill_lora_dir(loras_);
    options_.lora_dir = loras_.path().string();
  }
  test::TempDir loras_;
  ServerOptions options_;
};

TEST_F(ServerHttp, AGenerationIsADecodablePngOfTheRequestedSizeWithItsParameters) {
  Running s(options_);
  json req = image_request(11, json::array({lora("lora_a_peft", 0.5)}), 3, "48x32");
  req["n"] = 2;
  Reply r = s.post("/v1/images/generations", req);
  auto pngs = pngs_of(r);
  ASSERT_EQ(pngs.size(), 2u);
  EXPECT_EQ(r.body["seed"], 11);
  EXPECT_EQ(r.body["size"], "48x32");
  test::TempDir tmp;
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(pngs[i].substr(12, 4), "IHDR");
    EXPECT_EQ(be32(pngs[i], 16), 48u);  // width
    EXPECT_EQ(be32(pngs[i], 20), 32u);  // height
    std::ofstream(tmp / "i.png", std::ios::binary) << pngs[i];
    std::map<std::string, std::string> text;
    Rgb8Image img = read_png(tmp / "i.png", &text);
    EXPECT_EQ(img.width, 48);
    EXPECT_EQ(img.height, 32);
    EXPECT_EQ(text["parameters"].rfind("a red fox\nSteps: 3, Sampler: Euler", 0), 0u) << text["parameters"];
    EXPECT_NE(text["parameters"].find("Seed: 11, Size: 48x32, Model: tiny/pipeline, Lora: lora_a_peft:0.500000"),
              std::string::npos)
        << text["parameters"];
  }
  EXPECT_NE(pngs[0], pngs[1]);  // one batch, different noise per image

  // The same request as `fluxswap generate` gives the same file, byte for byte (n = 1: the batch shares noise).
  req["n"] = 1;
  const std::string served = pngs_of(s.post("/v1/images/generations", req)).at(0);
  const std::string cmd = std::string(FLUXSWAP_BINARY) + " generate --device cpu --model " + fixture_pipeline() +
                          " -p 'a red fox' --width 48 --height 32 --steps 3 --seed 11 --lora " +
                          (loras_ / "lora_a_peft.safetensors") + ":0.5 -o " + (tmp / "cli.png") + " > /dev/null 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream f(tmp / "cli.png", std::ios::binary);
  EXPECT_EQ(served, std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>()));
}

TEST_F(ServerHttp, HealthReadyAndMetricsMatchWhatHappened) {
  Running s(options_);
  EXPECT_EQ(s.get("/health").body, json({{"status", "ok"}}));
  Reply ready = s.get("/ready");
  EXPECT_EQ(ready.status, 200);
  EXPECT_EQ(ready.body["status"], "ready");
  EXPECT_EQ(ready.body["model"], "tiny/pipeline");

  EXPECT_EQ(pngs_of(s.post("/v1/images/generations", image_request(1))).size(), 1u);
  json two = image_request(2, json::array({lora("lora_a_peft", 1.0)}));
  two["n"] = 2;
  EXPECT_EQ(pngs_of(s.post("/v1/images/generations", two)).size(), 2u);
  EXPECT_EQ(s.post("/v1/images/generations", std::string("{bad")).status, 400);
  EXPECT_EQ(s.post("/v1/images/generations", image_request(3, json::array({lora("nope", 1.0)}))).status, 404);
  EXPECT_EQ(s.get("/v1/nothing").status, 404);

  EXPECT_EQ(s.metric("fluxswap_ready"), 1);
  EXPECT_EQ(s.metric("fluxswap_generations_total"), 2);
  EXPECT_EQ(s.metric("fluxswap_images_total"), 3);
  EXPECT_EQ(s.metric("fluxswap_lora_swaps_total"), 1);
  EXPECT_EQ(s.metric("fluxswap_adapter_cache_misses_total"), 1);
  EXPECT_EQ(s.metric("fluxswap_adapter_cache_hits_total"), 0);
  EXPECT_EQ(s.metric("fluxswap_queue_depth"), 0);
  EXPECT_EQ(s.metric("fluxswap_request_duration_seconds_count"), 2);  // the queued ones
  EXPECT_EQ(s.metric("fluxswap_request_duration_seconds_bucket{le=\"+Inf\"}"), 2);
  EXPECT_GT(s.metric("fluxswap_request_duration_seconds_sum"), 0);
  EXPECT_EQ(s.metric("fluxswap_http_errors_total{status=\"400\"}"), 1);
  EXPECT_EQ(s.metric("fluxswap_http_errors_total{status=\"404\"}"), 2);
  EXPECT_EQ(s.metric("fluxswap_requests_cancelled_total{reason=\"timeout\"}"), 0);
  EXPECT_EQ(s.metric("fluxswap_gpu_memory_bytes"), -1);  // the CPU backend reports none: no series
  const std::string text = s.get("/metrics").text;
  EXPECT_NE(text.find("# TYPE fluxswap_request_duration_seconds histogram"), std::string::npos);
  EXPECT_NE(text.find("fluxswap_request_duration_seconds_bucket{le=\"0.025\"}"), std::string::npos);
}

TEST_F(ServerHttp, BadRequestsGetAStatusAndAMessageThatSaysWhatIsWrong) {
  options_.max_body_bytes = 4096;
  Running s(options_);
  const char* path = "/v1/images/generations";
  Reply r = s.post(path, std::string("{\"prompt\": \"x\",,}"));
  EXPECT_EQ(r.status, 400);
  EXPECT_NE(error_message(r).find("request body is not valid JSON: parse error at line 1, column 16"),
            std::string::npos) << error_message(r);
  EXPECT_EQ(r.body["error"]["type"], "invalid_request_error");
  r = s.post(path, json{{"size", "32x32"}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(error_message(r), "'prompt' is required");
  r = s.post(path, json{{"prompt", "x"}, {"size", "40x33"}});
  EXPECT_EQ(error_message(r), "'size' 40x33: width and height must be positive multiples of 16");
  r = s.post(path, image_request(1, json::array({lora("lora_x", 1.0)})));
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(error_message(r), "unknown LoRA 'lora_x' (GET /v1/loras lists the available ones)");
  r = s.post(path, image_request(1, json::array({lora("../x", 1.0)})));
  EXPECT_EQ(r.status, 400);
  EXPECT_NE(error_message(r).find("LoRA name '../x'"), std::string::npos) << error_message(r);
  r = s.post(path, image_request(1, json::array({lora("escape", 1.0)})));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(error_message(r), "LoRA 'escape' is a link leading outside the LoRA directory");
  r = s.post(path, image_request(1, json::array({json{{"name", "lora_a_peft"}, {"scale", nullptr}}})));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(error_message(r), "'lora[0].scale' must be a number (got null)");
  r = s.post(path, json{{"prompt", std::string(5000, 'x')}});
  EXPECT_EQ(r.status, 413);
  EXPECT_EQ(error_message(r), "request body is over 4096 bytes (--max-body-bytes)");
  // A file that is not a LoRA is the request's problem, named, and the server goes on.
  r = s.post(path, image_request(1, json::array({lora("broken", 1.0)})));
  EXPECT_EQ(r.status, 422);
  EXPECT_NE(error_message(r).find("LoRA 'broken' cannot be used: "), std::string::npos) << error_message(r);
  EXPECT_NE(error_message(r).find("broken.safetensors"), std::string::npos) << error_message(r);
  EXPECT_EQ(pngs_of(s.post(path, image_request(1, json::array({lora("lora_b_peft", 1.0)})))).size(), 1u);
  EXPECT_EQ(s.metric("fluxswap_http_errors_total{status=\"400\"}"), 6);
  EXPECT_EQ(s.metric("fluxswap_http_errors_total{status=\"413\"}"), 1);
  EXPECT_EQ(s.metric("fluxswap_http_errors_total{status=\"422\"}"), 1);
}

// A LoRA on CLIP alone is a LoRA like any other: it loads, changes the image, and one that does not fit this CLIP is
// the request's problem (422, naming the key), leaving the server as it was.
TEST_F(ServerHttp, ClipLorasApplyAndAMisfitIsA422) {
  auto clip_lora = [&](const std::string& name, int layer) {
    Tensor down = Tensor::empty(DType::F32, {4, 24}), up = Tensor::empty(DType::F32, {37, 4});  // tiny CLIP's fc1
    std::mt19937 rng(9);
    test::fill_normal(down, rng, 0.5f);
    test::fill_normal(up, rng, 0.2f);
    const std::string stem = "lora_te1_text_model_encoder_layers_" + std::to_string(layer) + "_mlp_fc1";
    write_safetensors(loras_ / (name + ".safetensors"), {{stem + ".lora_down.weight", down}, {stem + ".lora_up.weight", up}});
  };
  clip_lora("clip_style", 0);
  clip_lora("clip_misfit", 5);  // the tiny CLIP has 2 layers
  Running s(options_);
  const char* path = "/v1/images/generations";
  Reply load = s.post("/v1/loras/load", json{{"name", "clip_style"}});
  ASSERT_EQ(load.status, 200) << load.text;
  EXPECT_EQ(load.body["pairs"], 0);
  EXPECT_EQ(load.body["clip_pairs"], 1);
  EXPECT_EQ(load.body["clip_tensors"], 2);

  const std::string base = pngs_of(s.post(path, image_request(4))).at(0);
  const std::string styled = pngs_of(s.post(path, image_request(4, json::array({lora("clip_style", 1.0)})))).at(0);
  EXPECT_NE(styled, base);
  Reply r = s.post(path, image_request(4, json::array({lora("lora_a_peft", 1.0), lora("clip_misfit", 1.0)})));
  EXPECT_EQ(r.status, 422);
  EXPECT_NE(error_message(r).find("lora_te1_text_model_encoder_layers_5_mlp_fc1"), std::string::npos)
      << error_message(r);
  EXPECT_EQ(pngs_of(s.post(path, image_request(4, json::array({lora("clip_style", 1.0)})))).at(0), styled);
  EXPECT_EQ(pngs_of(s.post(path, image_request(4))).at(0), base);
}

TEST_F(ServerHttp, LoraEndpointsListAndPreloadAdapters) {
  Running s(options_);
  Reply list = s.get("/v1/loras");
  ASSERT_EQ(list.status, 200);
  std::vector<std::string> names;
  for (const auto& e : list.body["data"]) names.push_back(e["name"]);
  EXPECT_EQ(names, (std::vector<std::string>{"broken", "lora_a_peft", "lora_b_peft", "lora_c_kohya", "styles/xlabs"}));
  EXPECT_EQ(list.body["data"][2]["cached"], false);

  Reply load = s.post("/v1/loras/load", json{{"name", "lora_b_peft"}});
  ASSERT_EQ(load.status, 200) << load.text;
  EXPECT_EQ(load.body["format"], "peft");
  EXPECT_EQ(load.body["was_cached"], false);
  EXPECT_GT(load.body["pairs"].get<int>(), 0);
  EXPECT_EQ(s.post("/v1/loras/load", json{{"name", "lora_b_peft"}}).body["was_cached"], true);
  EXPECT_EQ(s.post("/v1/loras/load", json{{"name", "styles/xlabs"}}).body["format"], "xlabs");
  EXPECT_EQ(s.get("/v1/loras").body["data"][2]["cached"], true);
  Reply broken = s.post("/v1/loras/load", json{{"name", "broken"}});
  EXPECT_EQ(broken.status, 422);
  EXPECT_NE(error_message(broken).find("broken.safetensors"), std::string::npos) << error_message(broken);
  EXPECT_EQ(s.post("/v1/loras/load", json{{"name", "../../etc/passwd"}}).status, 400);
  EXPECT_EQ(s.post("/v1/loras/load", json{{"name", "missing"}}).status, 404);
  // Preloaded: the generation finds it cached.
  EXPECT_EQ(pngs_of(s.post("/v1/images/generations", image_request(5, json::array({lora("lora_b_peft", 1.0)})))).size(), 1u);
  EXPECT_EQ(s.metric("fluxswap_adapter_cache_hits_total"), 2);
  EXPECT_EQ(s.metric("fluxswap_adapter_cache_misses_total"), 3);  // b, xlabs, broken
}

class ServerSwaps : public ServerHttp, public ::testing::WithParamInterface<std::string> {};

// Swapping adapters between requests leaves nothing behind: each image is the one a fresh server makes.
TEST_P(ServerSwaps, SwitchingAdaptersGivesTheImagesOfAFreshServer) {
  options_.lora_mode = GetParam();
  const json a = json::array({lora("lora_a_peft", 0.8)}), b = json::array({lora("lora_b_peft", 1.0)}),
             ab = json::array({lora("lora_a_peft", 0.7), lora("lora_c_kohya", -0.5)});
  std::vector<std::string> seq;
  {
    Running s(options_);
    for (const json& l : {a, b, json::array(), ab, a, b}) seq.push_back(pngs_of(s.post("/v1/images/generations", image_request(9, l))).at(0));
    EXPECT_EQ(s.metric("fluxswap_lora_swaps_total"), 6);
    EXPECT_EQ(s.metric("fluxswap_adapter_cache_misses_total"), 3);
    EXPECT_EQ(s.metric("fluxswap_adapter_cache_hits_total"), 3);
  }
  EXPECT_EQ(seq[0], seq[4]);
  EXPECT_NE(seq[0], seq[1]);
  EXPECT_NE(seq[2], seq[1]);
  for (auto [lo, index] : {std::make_pair(b, 5), std::make_pair(ab, 3), std::make_pair(json::array(), 2)}) {
    Running fresh(options_);
    EXPECT_EQ(pngs_of(fresh.post("/v1/images/generations", image_request(9, lo))).at(0), seq[size_t(index)])
        << "request " << index;
  }
}

INSTANTIATE_TEST_SUITE_P(ServerLoraModes, ServerSwaps, ::testing::Values("merged", "runtime"));

TEST_F(ServerHttp, ConcurrentClientsAllGetTheirOwnImages) {
  Running s(options_);
  const std::vector<json> loras = {json::array(), json::array({lora("lora_a_peft", 1.0)}),
                                   json::array({lora("lora_b_peft", 0.5)})};
  constexpr int kThreads = 4, kEach = 3;
  std::array<std::array<std::string, kEach>, kThreads> got;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        const auto r = s.post("/v1/images/generations", image_request(uint64_t(t), loras[size_t(i + t) % 3], 2));
        if (r.status == 200) got[size_t(t)][size_t(i)] = base64_decode(r.body["data"][0]["b64_json"]);
      }
    });
  for (auto& th : threads) th.join();
  // Each equals the same request made alone afterwards: no request saw another's adapters or noise.
  for (int t = 0; t < kThreads; ++t)
    for (int i = 0; i < kEach; ++i) {
      ASSERT_FALSE(got[size_t(t)][size_t(i)].empty()) << t << "/" << i;
      EXPECT_EQ(got[size_t(t)][size_t(i)],
                pngs_of(s.post("/v1/images/generations", image_request(uint64_t(t), loras[size_t(i + t) % 3], 2))).at(0))
          << t << "/" << i;
    }
  EXPECT_EQ(s.metric("fluxswap_generations_total"), 2 * kThreads * kEach);
}

// A request that would take ~10 s keeps the worker busy while the test fills the one queue slot.
json slow_request(double timeout_s = 0) {
  json j = image_request(4, json::array(), 600);
  if (timeout_s > 0) j["timeout"] = timeout_s;
  return j;
}

TEST_F(ServerHttp, AFullQueueAnswers429AndShutdownAnswersTheRest) {
  options_.queue_size = 1;
  options_.max_steps = 1000;
  auto s = std::make_unique<Running>(options_);
  Reply slow, queued;
  std::thread t1([&] { slow = s->post("/v1/images/generations", slow_request()); });
  ASSERT_TRUE(s->wait_metric("fluxswap_requests_in_progress", 1));
  std::thread t2([&] { queued = s->post("/v1/images/generations", image_request(1)); });
  ASSERT_TRUE(s->wait_metric("fluxswap_queue_depth", 1));
  Reply full = s->post("/v1/images/generations", image_request(2));
  EXPECT_EQ(full.status, 429);
  EXPECT_EQ(error_message(full), "the queue is full (1 requests waiting, --queue-size): retry later");
  EXPECT_EQ(full.header("Retry-After"), "1");
  EXPECT_EQ(s->get("/health").status, 200);  // still observable while full
  EXPECT_EQ(s->metric("fluxswap_http_errors_total{status=\"429\"}"), 1);
  s->server().stop();  // cancels the running generation between steps and answers the waiting one
  t1.join();
  t2.join();
  EXPECT_EQ(slow.status, 503);
  EXPECT_EQ(queued.status, 503);
  EXPECT_EQ(error_message(queued), "the server is shutting down");
}

TEST_F(ServerHttp, TimeoutsAnswer504AndTheNextRequestIsRight) {
  options_.max_steps = 1000;
  Running s(options_);
  const json req = image_request(3, json::array({lora("lora_a_peft", 1.0)}));
  const std::string before = pngs_of(s.post("/v1/images/generations", req)).at(0);

  // Cancelled while generating: the answer comes at the deadline, not when the 600 steps would be done.
  const auto t0 = Clock::now();
  Reply r = s.post("/v1/images/generations", slow_request(0.3));
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_EQ(r.status, 504);
  EXPECT_EQ(error_message(r), "the request timed out after 0.300 s while generating: cancelled between steps");
  EXPECT_LT(took, 3.0);
  ASSERT_TRUE(s.wait_metric("fluxswap_requests_in_progress", 0));

  // Timed out while waiting behind another one.
  Reply slow;
  std::thread t([&] { slow = s.post("/v1/images/generations", slow_request(2.0)); });
  ASSERT_TRUE(s.wait_metric("fluxswap_requests_in_progress", 1));
  json waiting = image_request(1);
  waiting["timeout"] = 0.05;
  r = s.post("/v1/images/generations", waiting);
  EXPECT_EQ(r.status, 504);
  EXPECT_EQ(error_message(r), "the request timed out after 0.050 s while waiting in the queue");
  t.join();
  EXPECT_EQ(slow.status, 504);

  EXPECT_EQ(pngs_of(s.post("/v1/images/generations", req)).at(0), before);
  EXPECT_EQ(s.metric("fluxswap_requests_cancelled_total{reason=\"timeout\"}"), 3);
  EXPECT_EQ(s.metric("fluxswap_http_errors_total{status=\"504\"}"), 3);
  EXPECT_EQ(s.metric("fluxswap_generations_total"), 2);
}

TEST_F(ServerHttp, AClientThatHangsUpCancelsItsGeneration) {
  options_.max_steps = 1000;
  Running s(options_);
  const std::string before = pngs_of(s.post("/v1/images/generations", image_request(6))).at(0);
  {
    httplib::Client impatient("127.0.0.1", s.server().port());
    impatient.set_read_timeout(0, 300 * 1000);  // gives up and closes the connection after 0.3 s
    const auto t0 = Clock::now();
    auto r = impatient.Post("/v1/images/generations", slow_request().dump(), "application/json");
    EXPECT_FALSE(r);
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 3.0);
  }
  // The worker stops within a step of the hang-up (a 600-step request would otherwise hold it for seconds).
  EXPECT_TRUE(s.wait_metric("fluxswap_requests_cancelled_total{reason=\"disconnect\"}", 1, 3));
  EXPECT_TRUE(s.wait_metric("fluxswap_requests_in_progress", 0, 3));
  EXPECT_EQ(pngs_of(s.post("/v1/images/generations", image_request(6))).at(0), before);
  EXPECT_EQ(s.metric("fluxswap_generations_total"), 2);
}

}  // namespace
}  // namespace fluxswap
