#include "server/image_request.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "server/http_error.h"

namespace fluxswap {

namespace {

using nlohmann::json;

[[noreturn]] void bad(const std::string& message) { throw HttpError(400, message); }

std::string dump_short(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// Integers only: JSON has one number type, and 2.5 steps must be an error rather than 2.
int64_t integer_field(const json& v, const char* name, int64_t lo, int64_t hi, const char* why_hi) {
  if (!v.is_number_integer() && !(v.is_number_float() && std::nearbyint(v.get<double>()) == v.get<double>() &&
                                  std::abs(v.get<double>()) < 1e15))
    bad(std::string("'") + name + "' must be an integer (got " + dump_short(v) + ")");
  const int64_t x = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX
                    : v.is_number_integer()                                          ? v.get<int64_t>()
                                                                                     : int64_t(v.get<double>());
  if (x < lo || x > hi)
    bad(std::string("'") + name + "' must be in " + std::to_string(lo) + ".." + std::to_string(hi) + why_hi +
        " (got " + dump_short(v) + ")");
  return x;
}

double number_field(const json& v, const std::string& name, double lo, double hi) {
  if (!v.is_number()) bad("'" + name + "' must be a number (got " + dump_short(v) + ")");
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || x > hi) {
    char range[64];
    std::snprintf(range, sizeof range, "%g..%g", lo, hi);
    bad("'" + name + "' must be a number in " + range + " (got " + dump_short(v) + ")");
  }
  return x;
}

void parse_size(const json& v, const ServerOptions& limits, ImageRequest& r) {
  if (!v.is_string()) bad("'size' must be a string 'WIDTHxHEIGHT' such as \"1024x1024\" (got " + dump_short(v) + ")");
  const std::string s = v.get<std::string>();
  const auto x = s.find('x');
  auto digits = [](const std::string& t) {
    return !t.empty() && t.size() <= 6 && t.find_first_not_of("0123456789") == std::string::npos;
  };
  if (x == std::string::npos || !digits(s.substr(0, x)) || !digits(s.substr(x + 1)))
    bad("'size' must be 'WIDTHxHEIGHT' such as \"1024x1024\" (got \"" + s.substr(0, 40) + "\")");
  r.width = std::stoi(s.substr(0, x));
  r.height = std::stoi(s.substr(x + 1));
  if (r.width < 16 || r.height < 16 || r.width % 16 || r.height % 16)
    bad("'size' " + s + ": width and height must be positive multiples of 16");
  const int64_t pixels = int64_t(r.width) * r.height;
  if (pixels > limits.max_pixels)
    bad("'size' " + s + " is " + std::to_string(pixels) + " pixels, over the server's limit of " +
        std::to_string(limits.max_pixels) + " (--max-pixels)");
}

void parse_loras(const json& v, ImageRequest& r) {
  if (!v.is_array()) bad("'lora' must be an array of {\"name\": ..., \"scale\": ...} (got " + dump_short(v) + ")");
  if (v.size() > kMaxLorasPerRequest)
    bad("'lora' lists " + std::to_string(v.size()) + " adapters; at most " + std::to_string(kMaxLorasPerRequest));
  std::set<std::string> seen;
  for (size_t i = 0; i < v.size(); ++i) {
    const json& e = v[i];
    const std::string where = "'lora[" + std::to_string(i) + "]'";
    if (!e.is_object()) bad(where + " must be an object {\"name\": ..., \"scale\": ...} (got " + dump_short(e) + ")");
    for (const auto& [key, _] : e.items())
      if (key != "name" && key != "scale") bad(where + " has an unknown field '" + key + "' (expected name, scale)");
    if (!e.contains("name") || !e["name"].is_string() || e["name"].get<std::string>().empty())
      bad(where + " needs a non-empty string 'name'");
    LoraChoice c;
    c.name = e["name"].get<std::string>();
    if (e.contains("scale"))
      c.scale = float(number_field(e["scale"], "lora[" + std::to_string(i) + "].scale", -kMaxLoraScale, kMaxLoraScale));
    // The same file twice would be applied twice: almost certainly a mistake, and its scale can say "twice".
    if (!seen.insert(c.name).second) bad(where + ": LoRA '" + c.name + "' is listed twice; combine the scales");
    r.loras.push_back(std::move(c));
  }
}

}  // namespace

ImageRequest parse_image_request(const std::string& body, const ServerOptions& limits) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    if (auto at = what.find("] "); what.rfind("[json.exception", 0) == 0 && at != std::string::npos)
      what = what.substr(at + 2);
    bad("request body is not valid JSON: " + what);
  }
  if (!j.is_object()) bad("request body must be a JSON object (got " + dump_short(j) + ")");

  // OpenAI fields that change nothing here are accepted so that its clients work unchanged.
  static const std::set<std::string> known = {"prompt", "n",      "size",     "response_format", "lora",
                                              "steps",  "guidance", "seed",   "timeout",         "model",
                                              "quality", "style",  "user",   "output_format"};
  for (const auto& [key, _] : j.items())
    if (!known.count(key)) bad("unknown field '" + key + "'");

  ImageRequest r;
  if (!j.contains("prompt")) bad("'prompt' is required");
  if (!j["prompt"].is_string()) bad("'prompt' must be a string (got " + dump_short(j["prompt"]) + ")");
  r.prompt = j["prompt"].get<std::string>();
  if (r.prompt.find_first_not_of(" \t\r\n") == std::string::npos) bad("'prompt' is empty");

  if (j.contains("n")) r.n = int(integer_field(j["n"], "n", 1, limits.max_n, " (--max-n)"));
  if (j.contains("size")) parse_size(j["size"], limits, r);
  if (j.contains("steps")) r.steps = int(integer_field(j["steps"], "steps", 1, limits.max_steps, " (--max-steps)"));
  if (j.contains("guidance")) r.guidance = float(number_field(j["guidance"], "guidance", 0, kMaxGuidance));
  if (j.contains("seed")) {
    const json& s = j["seed"];
    if (s.is_number_unsigned())
      r.seed = s.get<uint64_t>();
    else
      r.seed = uint64_t(integer_field(s, "seed", 0, INT64_MAX, ""));
  }
  if (j.contains("timeout"))
    r.timeout_s = number_field(j["timeout"], "timeout", 1e-3, limits.timeout_s);
  if (j.contains("response_format") &&
      !(j["response_format"].is_string() && j["response_format"].get<std::string>() == "b64_json"))
    bad("'response_format' must be \"b64_json\" (got " + dump_short(j["response_format"]) +
        "): this server returns images inline, it does not host URLs");
  if (j.contains("output_format") &&
      !(j["output_format"].is_string() && j["output_format"].get<std::string>() == "png"))
    bad("'output_format' must be \"png\" (got " + dump_short(j["output_format"]) + ")");
  if (j.contains("lora")) parse_loras(j["lora"], r);
  return r;
}

}  // namespace fluxswap
